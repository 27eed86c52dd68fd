//! The least-privilege recipe as the README gives it: a LOGIN owner role (not a superuser) runs
//! the migrations and the `tidings grants` script; then each role connects as itself, does its
//! job through the real library calls, and is refused (SQLSTATE 42501) what it must not do.
//! Roles are cluster-wide: each test creates its own, uniquely named, and drops them after its
//! database (also when the test fails).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use tidings_inbox::{DedupKey, Inbox, Outcome, Recorded};
use tidings_migrations::{ConsumerGrant, Grants};
use tidings_outbox::{Message, Outbox};
use tidings_relay::{Delivery, Envelope, Relay, RelayConfig, Sink, SinkError};
use tidings_tests::TestDb;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A parking as the runner wrote it before migration 000003 (without ordering_key and
/// created_at): still allowed. The runner's own statements, as a consumer role runs them, are
/// tested through its store in `consumer_role_parks_and_replays_through_the_runners_store`.
const PARK: &str = "\
INSERT INTO tidings.inbox_dead_letters
       (consumer, message_id, biz_id, topic, payload, headers, deliveries, last_error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (consumer, message_id) DO UPDATE
   SET deliveries = excluded.deliveries, last_error = excluded.last_error, dead_at = now()";

/// One test's database and roles, set up as the README says; drops the database, then the roles.
struct Recipe {
    db: Option<TestDb>,
    owner: String,
    producer: String,
    consumer_a: String,
    consumer_b: String,
    relay: String,
    pruner: String,
    operator: String,
    created: Vec<String>,
}

impl Recipe {
    async fn new() -> Recipe {
        // Role names: lower-case hex keeps them inside the grants' strict rule.
        let tag = &Uuid::now_v7().simple().to_string()[20..];
        let name = |kind: &str| format!("tg_{tag}_{kind}");
        let mut r = Recipe {
            db: None,
            owner: name("owner"),
            producer: name("producer"),
            consumer_a: name("consumer_a"),
            consumer_b: name("consumer_b"),
            relay: name("relay"),
            pruner: name("pruner"),
            operator: name("operator"),
            created: Vec::new(),
        };
        let admin =
            tidings_tests::connect(&format!("{}/postgres", tidings_tests::server_url())).await;
        for role in [
            &r.owner,
            &r.producer,
            &r.consumer_a,
            &r.consumer_b,
            &r.relay,
            &r.pruner,
            &r.operator,
        ] {
            // Trust auth on 127.0.0.1: no password. The name is ours, built above.
            admin
                .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN"))
                .await
                .unwrap();
            r.created.push(role.clone());
        }
        let db = TestDb::empty().await;
        admin
            .batch_execute(&format!(
                "GRANT CREATE ON DATABASE \"{}\" TO \"{}\"",
                db.name, r.owner
            ))
            .await
            .unwrap();
        r.db = Some(db);
        let mut owner = r.connect(&r.owner).await;
        tidings_migrations::postgres::up(&mut owner).await.unwrap();
        owner
            .batch_execute(&r.grants().sql().unwrap())
            .await
            .unwrap();
        r
    }

    /// What the README's `tidings grants` line asks for.
    fn grants(&self) -> Grants {
        Grants {
            producers: vec![self.producer.clone()],
            consumers: vec![
                format!("{}=a-main,a-audit", self.consumer_a)
                    .parse()
                    .unwrap(),
                ConsumerGrant {
                    role: self.consumer_b.clone(),
                    names: vec!["b".into()],
                },
            ],
            relay: Some(self.relay.clone()),
            pruner: Some(self.pruner.clone()),
            operator: Some(self.operator.clone()),
        }
    }

    fn config(&self, role: &str) -> tokio_postgres::Config {
        let db = self.db.as_ref().expect("set up in new");
        let mut cfg: tokio_postgres::Config = db.url.parse().unwrap();
        cfg.user(role);
        cfg
    }

    /// A connection as `role`.
    async fn connect(&self, role: &str) -> Client {
        let (client, conn) = self
            .config(role)
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("{role} cannot connect: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// A connection as `role` that keeps the server's notices (warnings) it receives.
    async fn connect_noting(&self, role: &str) -> (Client, Arc<Mutex<Vec<String>>>) {
        let (client, mut conn) = self.config(role).connect(NoTls).await.unwrap();
        let notes = Arc::new(Mutex::new(Vec::new()));
        let keep = notes.clone();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            // A notice is read (and kept) before the reply of the statement that raised it.
            while let Some(Ok(m)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notice(n) = m {
                    keep.lock().unwrap().push(n.message().to_owned());
                }
            }
        });
        (client, notes)
    }

    /// A pool connecting as `role`.
    fn pool(&self, role: &str) -> deadpool_postgres::Pool {
        let mgr = deadpool_postgres::Manager::from_config(
            self.config(role),
            NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        deadpool_postgres::Pool::builder(mgr)
            .max_size(2)
            .build()
            .unwrap()
    }

    async fn owner(&self) -> Client {
        self.connect(&self.owner).await
    }
}

impl Drop for Recipe {
    fn drop(&mut self) {
        // The database first: a role cannot be dropped while objects or grants in it name it.
        drop(self.db.take());
        let roles = std::mem::take(&mut self.created);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let url = format!("{}/postgres", tidings_tests::server_url());
                if let Ok((c, conn)) = tokio_postgres::connect(&url, NoTls).await {
                    tokio::spawn(conn);
                    for role in roles {
                        let _ = c
                            .batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\""))
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

/// The SQLSTATE anywhere in an error's source chain.
fn sqlstate(e: &(dyn std::error::Error + 'static)) -> Option<SqlState> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
            return pg.code().cloned();
        }
        cur = e.source();
    }
    None
}

/// Asserts a privilege refusal (42501), and whether row-level security made it.
fn assert_refused(e: &(dyn std::error::Error + 'static), rls: bool, what: &str) {
    assert_eq!(
        sqlstate(e),
        Some(SqlState::INSUFFICIENT_PRIVILEGE),
        "{what}: {e:?}"
    );
    let by_rls = format!("{e:?}").contains("row-level security");
    assert_eq!(by_rls, rls, "{what}: {e:?}");
}

/// Runs each statement as `c` and asserts each is refused for lack of a privilege.
async fn refused(c: &Client, statements: &[&str]) {
    for sql in statements {
        let e = c
            .batch_execute(sql)
            .await
            .expect_err(&format!("allowed: {sql}"));
        assert_refused(&e, false, sql);
    }
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn producer_enqueues_by_every_door_and_can_do_nothing_else() {
    let r = Recipe::new().await;
    let mut p = r.connect(&r.producer).await;

    // The SQL function (runs with the producer's own rights).
    p.batch_execute("SELECT tidings.enqueue('orders.created', '{\"n\": 1}', 'o-1', 'cust-1')")
        .await
        .unwrap();
    // The Rust API, in the producer's transaction, one and many.
    let tx = p.transaction().await.unwrap();
    let outbox = Outbox::default();
    outbox
        .enqueue_pg(&tx, &Message::new("orders.created", "2").biz_id("o-2"))
        .await
        .unwrap();
    outbox
        .enqueue_batch_pg(
            &tx,
            &[
                Message::new("orders.created", "3"),
                Message::new("orders.created", "4").key("cust-1"),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // A plain INSERT of the producer's columns.
    p.batch_execute(
        "INSERT INTO tidings.outbox (id, topic, ordering_key, biz_id, payload, headers, deliver_at)
         VALUES (tidings.uuid_v7(), 'orders.created', 'cust-1', 'o-5', '5', '{}', now())",
    )
    .await
    .unwrap();
    assert_eq!(
        count(&r.owner().await, "SELECT count(*) FROM tidings.outbox").await,
        5
    );

    refused(
        &p,
        &[
            // seq is the database's: OVERRIDING SYSTEM VALUE needs INSERT on seq.
            "INSERT INTO tidings.outbox (seq, id, topic, payload) OVERRIDING SYSTEM VALUE
             VALUES (1, gen_random_uuid(), 'x', 'p')",
            "INSERT INTO tidings.outbox (id, topic, payload, attempts) VALUES (gen_random_uuid(), 'x', 'p', 9)",
            "INSERT INTO tidings.outbox (id, topic, payload, last_error) VALUES (gen_random_uuid(), 'x', 'p', 'e')",
            "INSERT INTO tidings.outbox (id, topic, payload, last_attempt_at) VALUES (gen_random_uuid(), 'x', 'p', now())",
            "INSERT INTO tidings.outbox (id, topic, payload, first_due_at) VALUES (gen_random_uuid(), 'x', 'p', now())",
            "INSERT INTO tidings.outbox (id, topic, payload, created_at) VALUES (gen_random_uuid(), 'x', 'p', now())",
            "SELECT count(*) FROM tidings.outbox",
            "UPDATE tidings.outbox SET payload = 'x'",
            "DELETE FROM tidings.outbox",
            "SELECT count(*) FROM tidings.dead_letters",
            "SELECT count(*) FROM tidings.inbox",
            "DELETE FROM tidings.relays",
        ],
    )
    .await;
}

/// Publishes everything except: `flaky` fails once (retryable), `bad` always (permanent).
#[derive(Default)]
struct Scripted {
    published: Mutex<Vec<String>>,
    flaked: AtomicBool,
}

impl Sink for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let body = String::from_utf8_lossy(&msg.payload).into_owned();
            match body.as_str() {
                "bad" => return Err(SinkError::Permanent("refused".into())),
                "flaky" if !self.flaked.swap(true, Ordering::SeqCst) => {
                    return Err(SinkError::Retryable("try again".into()))
                }
                _ => {}
            }
            self.published.lock().unwrap().push(body);
            Ok(Delivery::default())
        })
    }
}

#[tokio::test]
async fn relay_delivers_retries_dead_letters_and_heartbeats_but_cannot_rewrite_messages() {
    let r = Recipe::new().await;
    let p = r.connect(&r.producer).await;
    let owner = r.owner().await;
    let outbox = Outbox::default();
    for body in ["ok", "flaky", "bad"] {
        outbox
            .enqueue_pg(&p, &Message::new("orders.created", body))
            .await
            .unwrap();
    }
    let sink = Arc::new(Scripted::default());
    let config = RelayConfig {
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(10),
        ..Default::default()
    };
    let relay = Relay::new(r.pool(&r.relay), sink.clone(), config).unwrap();
    relay.check_schema().await.unwrap();
    // What /metrics and /readyz read works under the relay's role.
    assert!(
        tidings_relay::observe::refresh_gauges(relay.pool()).await,
        "the scrape's database gauges"
    );
    assert!(
        relay.readiness().await.ready,
        "{:?}",
        relay.readiness().await
    );

    let first = relay.tick().await.unwrap();
    assert_eq!(
        (
            first.claimed,
            first.delivered,
            first.retried,
            first.dead_lettered
        ),
        (3, 1, 1, 1),
        "{first:?}"
    );
    // Make the retry due now instead of waiting out its backoff.
    owner
        .batch_execute("UPDATE tidings.outbox SET deliver_at = now()")
        .await
        .unwrap();
    let second = relay.tick().await.unwrap();
    assert_eq!((second.delivered, second.retried), (1, 0), "{second:?}");
    assert_eq!(*sink.published.lock().unwrap(), ["ok", "flaky"]);
    assert_eq!(
        count(&owner, "SELECT count(*) FROM tidings.outbox").await,
        0
    );
    assert_eq!(
        count(
            &owner,
            "SELECT count(*) FROM tidings.dead_letters WHERE reason = 'permanent' AND attempts = 1"
        )
        .await,
        1
    );
    // The first tick registered it; an explicit heartbeat refreshes the row.
    relay.heartbeat().await.unwrap();
    assert_eq!(
        count(&owner, "SELECT delivered FROM tidings.relays").await,
        2,
        "heartbeat counters"
    );
    // The run loop: schema check, and deregistration on shutdown.
    let stop = CancellationToken::new();
    stop.cancel();
    relay.run(stop).await.unwrap();
    assert_eq!(
        count(&owner, "SELECT count(*) FROM tidings.relays").await,
        0
    );

    // The delivery state (first_due_at included) is the relay's to write; the message is not.
    outbox
        .enqueue_pg(&p, &Message::new("orders.created", "kept").biz_id("o-1"))
        .await
        .unwrap();
    let c = r.connect(&r.relay).await;
    c.batch_execute(
        "UPDATE tidings.outbox SET attempts = attempts + 1, last_error = 'e', \
         last_attempt_at = now(), deliver_at = now(), first_due_at = now()",
    )
    .await
    .unwrap();
    refused(
        &c,
        &[
            "UPDATE tidings.outbox SET payload = 'rewritten'",
            "UPDATE tidings.outbox SET headers = '{\"x\": \"y\"}'",
            "UPDATE tidings.outbox SET topic = 'elsewhere'",
            "UPDATE tidings.outbox SET biz_id = 'o-2'",
            "UPDATE tidings.outbox SET ordering_key = 'k'",
            "INSERT INTO tidings.outbox (id, topic, payload) VALUES (gen_random_uuid(), 'x', 'p')",
            "DELETE FROM tidings.dead_letters",
            "SELECT count(*) FROM tidings.inbox",
            "SELECT count(*) FROM tidings.inbox_dead_letters",
        ],
    )
    .await;
    let row = owner
        .query_one("SELECT payload, attempts FROM tidings.outbox", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, Vec<u8>>(0), row.get::<_, i32>(1)),
        (b"kept".to_vec(), 1)
    );
}

#[tokio::test]
async fn consumer_uses_only_its_own_consumer_names_and_never_sees_another_consumers_rows() {
    let r = Recipe::new().await;
    let mut a = r.connect(&r.consumer_a).await;
    let b = r.connect(&r.consumer_b).await;
    let main = Inbox::new("a-main").unwrap();
    let key = DedupKey::biz_id("pay_1");

    for want in [Outcome::Processed(()), Outcome::Duplicate] {
        let mut tx = a.transaction().await.unwrap();
        let out = main
            .process_pg(&mut tx, &key, async |_tx| Ok::<_, tidings_inbox::Error>(()))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(out, want);
    }
    let audit = Inbox::new("a-audit").unwrap();
    assert_eq!(audit.record_pg(&a, &key).await.unwrap(), Recorded::First);
    let theirs = Inbox::new("b").unwrap();
    assert_eq!(theirs.record_pg(&b, &key).await.unwrap(), Recorded::First);

    // Writing under b's name is refused by the policy, for a key b has and for a new one alike
    // (the check runs before the conflict check, so it reveals nothing about b's keys).
    for k in ["pay_1", "pay_2"] {
        let e = theirs
            .record_pg(&a, &DedupKey::biz_id(k))
            .await
            .unwrap_err();
        assert_refused(&e, true, "a records as b");
    }
    // Reading: b's rows are not there for a.
    assert_eq!(count(&a, "SELECT count(*) FROM tidings.inbox").await, 2);
    assert_eq!(
        count(
            &a,
            "SELECT count(*) FROM tidings.inbox WHERE consumer = 'b'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&r.owner().await, "SELECT count(*) FROM tidings.inbox").await,
        3
    );

    // Parking a message, twice (the ON CONFLICT DO UPDATE path), under its own name only.
    let park = |c: &'static str| {
        (
            c,
            Uuid::nil(),
            "pay_9",
            "orders.created",
            b"{}".to_vec(),
            serde_json::json!({}),
        )
    };
    for deliveries in [5i32, 6] {
        let (c, id, biz, topic, payload, headers) = park("a-main");
        a.execute(
            PARK,
            &[
                &c,
                &id,
                &biz,
                &topic,
                &payload,
                &headers,
                &deliveries,
                &"boom",
            ],
        )
        .await
        .unwrap();
    }
    let (c, id, biz, topic, payload, headers) = park("b");
    b.execute(
        PARK,
        &[&c, &id, &biz, &topic, &payload, &headers, &1i32, &"boom"],
    )
    .await
    .unwrap();
    let e = a
        .execute(
            PARK,
            &[&c, &id, &biz, &topic, &payload, &headers, &1i32, &"boom"],
        )
        .await
        .unwrap_err();
    assert_refused(&e, true, "a parks as b");
    assert_eq!(
        count(&a, "SELECT count(*) FROM tidings.inbox_dead_letters").await,
        1
    );
    assert_eq!(
        count(
            &a,
            "SELECT max(deliveries)::int8 FROM tidings.inbox_dead_letters"
        )
        .await,
        6
    );

    refused(
        &a,
        &[
            "UPDATE tidings.inbox SET biz_id = 'x' WHERE consumer = 'b'",
            "DELETE FROM tidings.inbox WHERE consumer = 'b'",
            "INSERT INTO tidings.inbox (consumer, biz_id, processed_at) VALUES ('a-main', 'k', now())",
            "SELECT count(*) FROM tidings.outbox",
        ],
    )
    .await;
    // Since migration 000003 a consumer deletes parked rows (a replay that succeeded), but only
    // its own: b's are invisible to a, so a delete of them deletes nothing.
    assert_eq!(
        a.execute(
            "DELETE FROM tidings.inbox_dead_letters WHERE consumer = 'b'",
            &[]
        )
        .await
        .unwrap(),
        0
    );
    assert_eq!(
        count(
            &r.owner().await,
            "SELECT count(*) FROM tidings.inbox_dead_letters WHERE consumer = 'b'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn pruner_prunes_every_consumers_old_records_and_writes_nothing() {
    let r = Recipe::new().await;
    let owner = r.owner().await;
    // The owner is not subject to row-level security.
    owner
        .batch_execute(
            "INSERT INTO tidings.inbox (consumer, biz_id, processed_at)
             SELECT c, 'old-' || i, now() - interval '30 days'
               FROM unnest(ARRAY['a-main', 'b']) c, generate_series(1, 3) i;
             INSERT INTO tidings.inbox (consumer, biz_id) VALUES ('a-main', 'new'), ('b', 'new');",
        )
        .await
        .unwrap();
    let p = r.connect(&r.pruner).await;
    tidings_migrations::postgres::ensure_current(&p)
        .await
        .unwrap();
    let week = Duration::from_secs(7 * 86400);
    assert_eq!(
        tidings_inbox::prune(&p, Some("b"), week, 2).await.unwrap(),
        3
    );
    assert_eq!(tidings_inbox::prune(&p, None, week, 2).await.unwrap(), 3);
    assert_eq!(count(&owner, "SELECT count(*) FROM tidings.inbox").await, 2);

    refused(
        &p,
        &[
            "INSERT INTO tidings.inbox (consumer, biz_id) VALUES ('b', 'forged')",
            "UPDATE tidings.inbox SET processed_at = now()",
            "SELECT count(*) FROM tidings.inbox_dead_letters",
            "SELECT count(*) FROM tidings.outbox",
        ],
    )
    .await;
}

#[tokio::test]
async fn operator_lists_replays_and_purges_dead_letters_and_reads_status_but_no_payloads() {
    let r = Recipe::new().await;
    let owner = r.owner().await;
    Outbox::default()
        .enqueue_pg(
            &r.connect(&r.producer).await,
            &Message::new("orders.created", "1"),
        )
        .await
        .unwrap();
    let (id1, id2) = (Uuid::now_v7(), Uuid::now_v7());
    owner
        .execute(
            "INSERT INTO tidings.dead_letters
                    (id, topic, payload, headers, created_at, attempts, last_error, reason)
             SELECT id, 'orders.created', 'p', '{}', now(), 10, 'broker said no', 'max_attempts'
               FROM unnest($1::uuid[]) id",
            &[&vec![id1, id2]],
        )
        .await
        .unwrap();

    let o = r.connect(&r.operator).await;
    tidings_migrations::postgres::ensure_current(&o)
        .await
        .unwrap();
    let s = tidings_relay::status(&o).await.unwrap();
    assert_eq!((s.backlog, s.ready, s.dead_letters), (1, 1, 2));
    assert_eq!(tidings_relay::dlq_list(&o, 10).await.unwrap().len(), 2);
    assert_eq!(
        tidings_relay::dlq_replay(&o, Some(&[id1])).await.unwrap(),
        1
    );
    assert_eq!(
        count(
            &owner,
            &format!("SELECT count(*) FROM tidings.outbox WHERE id = '{id1}' AND attempts = 0")
        )
        .await,
        1,
        "replayed with its id"
    );
    assert_eq!(tidings_relay::dlq_purge(&o, None).await.unwrap(), 1);
    let s = tidings_relay::status(&o).await.unwrap();
    assert_eq!((s.backlog, s.dead_letters), (2, 0));

    refused(
        &o,
        &[
            "SELECT payload FROM tidings.outbox",
            "SELECT headers FROM tidings.outbox",
            "SELECT * FROM tidings.outbox",
            "UPDATE tidings.outbox SET deliver_at = now()",
            "DELETE FROM tidings.outbox",
            "INSERT INTO tidings.outbox (seq, id, topic, payload) OVERRIDING SYSTEM VALUE
             VALUES (1, gen_random_uuid(), 'x', 'p')",
            "DELETE FROM tidings.relays",
            "SELECT count(*) FROM tidings.inbox",
        ],
    )
    .await;
}

#[tokio::test]
async fn operator_lists_requests_replay_and_purges_any_consumers_parked_messages_but_cannot_park_or_rewrite(
) {
    let r = Recipe::new().await;
    let owner = r.owner().await;
    let a = r.connect(&r.consumer_a).await;
    let b = r.connect(&r.consumer_b).await;
    // Each consumer parks two messages through its own role, as its runner would.
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    for (c, consumer, id) in [
        (&a, "a-main", ids[0]),
        (&a, "a-main", ids[1]),
        (&b, "b", ids[2]),
        (&b, "b", ids[3]),
    ] {
        c.execute(
            PARK,
            &[
                &consumer,
                &id,
                &"pay_1",
                &"orders.created",
                &b"{}".to_vec(),
                &serde_json::json!({}),
                &5i32,
                &"boom",
            ],
        )
        .await
        .unwrap();
    }

    let o = r.connect(&r.operator).await;
    tidings_migrations::postgres::ensure_current(&o)
        .await
        .unwrap();
    assert_eq!(
        tidings_relay::inbox_dlq_list(&o, None, 10)
            .await
            .unwrap()
            .len(),
        4,
        "every consumer's parked messages"
    );
    let bs = tidings_relay::inbox_dlq_list(&o, Some("b"), 10)
        .await
        .unwrap();
    assert_eq!(bs.len(), 2);
    assert!(bs
        .iter()
        .all(|p| p.consumer == "b" && p.replay_requested_at.is_none()));

    assert_eq!(
        tidings_relay::inbox_dlq_replay(&o, "a-main", Some(&ids[..1]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        tidings_relay::inbox_dlq_replay(&o, "b", None)
            .await
            .unwrap(),
        2
    );
    let requested: Vec<Uuid> = owner
        .query(
            "SELECT message_id FROM tidings.inbox_dead_letters
              WHERE replay_requested_at IS NOT NULL ORDER BY message_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(requested, [ids[0], ids[2], ids[3]]);
    assert!(tidings_relay::inbox_dlq_list(&o, Some("b"), 10)
        .await
        .unwrap()
        .iter()
        .all(|p| p.replay_requested_at.is_some()));

    // The consumers' own restrictions still hold with the operator's policy in place: each
    // sees, and can ask for replays of, only its own parked messages.
    assert_eq!(
        count(&a, "SELECT count(*) FROM tidings.inbox_dead_letters").await,
        2
    );
    assert_eq!(
        a.execute(
            "UPDATE tidings.inbox_dead_letters SET replay_requested_at = now() WHERE consumer = 'b'",
            &[],
        )
        .await
        .unwrap(),
        0,
        "b's rows are invisible to a"
    );

    refused(
        &o,
        &[
            "INSERT INTO tidings.inbox_dead_letters
                    (consumer, message_id, biz_id, topic, payload, headers, deliveries, last_error)
             VALUES ('a-main', gen_random_uuid(), 'forged', 't', 'p', '{}', 1, 'e')",
            "UPDATE tidings.inbox_dead_letters SET payload = 'rewritten'",
            "UPDATE tidings.inbox_dead_letters SET headers = '{}'",
            "UPDATE tidings.inbox_dead_letters SET consumer = 'b'",
            "UPDATE tidings.inbox_dead_letters SET last_error = 'e', deliveries = 0",
            "SELECT count(*) FROM tidings.inbox",
        ],
    )
    .await;

    assert_eq!(
        tidings_relay::inbox_dlq_purge(&o, "a-main", Some(&ids[1..2]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        tidings_relay::inbox_dlq_purge(&o, "b", None).await.unwrap(),
        2
    );
    let left: Vec<Uuid> = owner
        .query("SELECT message_id FROM tidings.inbox_dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, [ids[0]]);
}

#[tokio::test]
async fn rerunning_the_grants_converges_and_removes_stale_table_wide_grants() {
    let r = Recipe::new().await;
    let owner = r.owner().await;
    // The old README recipe: table-wide privileges that column grants alone would not undo.
    owner
        .batch_execute(&format!(
            "GRANT SELECT, INSERT ON tidings.outbox TO \"{p}\";
             GRANT UPDATE ON tidings.outbox TO \"{rl}\";
             GRANT SELECT, INSERT ON tidings.inbox TO \"{a}\";",
            p = r.producer,
            rl = r.relay,
            a = r.consumer_a
        ))
        .await
        .unwrap();
    let p = r.connect(&r.producer).await;
    p.batch_execute("SELECT count(*) FROM tidings.outbox")
        .await
        .unwrap();

    // a loses a-audit in the new recipe.
    let mut grants = r.grants();
    grants.consumers[0] = format!("{}=a-main", r.consumer_a).parse().unwrap();
    for _ in 0..2 {
        owner.batch_execute(&grants.sql().unwrap()).await.unwrap();
    }
    refused(
        &p,
        &[
            "SELECT count(*) FROM tidings.outbox",
            "INSERT INTO tidings.outbox (seq, id, topic, payload) OVERRIDING SYSTEM VALUE
             VALUES (1, gen_random_uuid(), 'x', 'p')",
        ],
    )
    .await;
    p.batch_execute("SELECT tidings.enqueue('orders.created', '{}')")
        .await
        .unwrap();
    refused(
        &r.connect(&r.relay).await,
        &["UPDATE tidings.outbox SET payload = 'x'"],
    )
    .await;
    let a = r.connect(&r.consumer_a).await;
    let e = Inbox::new("a-audit")
        .unwrap()
        .record_pg(&a, &DedupKey::biz_id("k"))
        .await
        .unwrap_err();
    assert_refused(&e, true, "a-audit after it was taken away");
    assert_eq!(
        Inbox::new("a-main")
            .unwrap()
            .record_pg(&a, &DedupKey::biz_id("k"))
            .await
            .unwrap(),
        Recorded::First
    );
}

#[tokio::test]
async fn relay_role_cannot_vacuum_so_the_grants_warn_when_autovacuum_is_off_for_the_outbox() {
    let r = Recipe::new().await;
    let (owner, notes) = r.connect_noting(&r.owner).await;
    let warned = |notes: &Mutex<Vec<String>>| {
        std::mem::take(&mut *notes.lock().unwrap())
            .into_iter()
            .filter(|n| n.starts_with("tidings: autovacuum"))
            .collect::<Vec<_>>()
    };
    let server_on: bool = owner
        .query_one(
            "SELECT current_setting('autovacuum')::bool AND current_setting('track_counts')::bool",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    owner
        .batch_execute(&r.grants().sql().unwrap())
        .await
        .unwrap();
    assert_eq!(warned(&notes).len(), usize::from(!server_on));

    owner
        .batch_execute("ALTER TABLE tidings.outbox SET (autovacuum_enabled = off)")
        .await
        .unwrap();
    owner
        .batch_execute(&r.grants().sql().unwrap())
        .await
        .unwrap();
    let w = warned(&notes);
    assert!(
        w.iter().any(|n| n.contains("disabled for tidings.outbox")),
        "{w:?}"
    );

    // PostgreSQL 15: VACUUM by a non-owner is skipped with a warning, not an error.
    let (relay, notes) = r.connect_noting(&r.relay).await;
    relay.batch_execute("VACUUM tidings.outbox").await.unwrap();
    let n = notes.lock().unwrap().clone();
    assert!(
        n.iter()
            .any(|n| n.contains("only table or database owner can vacuum it")),
        "{n:?}"
    );
}

/// The consumer runner's database work (park, read requested replays, replay with the parked
/// row deleted in the effect's transaction), run through its store as a consumer role: the
/// shipped grants are enough, and only the role's own consumer names are reachable. The
/// replay is requested by the operator role through `tidings inbox dlq replay`'s function.
#[tokio::test]
async fn consumer_role_parks_and_replays_through_the_runners_store() {
    use tidings_inbox::runner::postgres::{Handler, PgStore};
    use tidings_inbox::runner::{Delivered, HandlerError, Parked, Step, Store};

    struct Effect;
    impl Handler for Effect {
        fn handle<'a>(
            &'a self,
            tx: &'a tokio_postgres::Transaction<'a>,
            _: &'a Delivered,
        ) -> futures::future::BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async move {
                tx.batch_execute("SELECT 1").await?;
                Ok(())
            })
        }
    }

    let r = Recipe::new().await;
    let store = PgStore::new(r.pool(&r.consumer_a), Arc::new(Effect));
    let message = |consumer: &str| Delivered {
        message: tidings_outbox::WireMessage {
            id: tidings_outbox::MessageId::from_uuid(Uuid::now_v7()),
            topic: "payment.succeeded".into(),
            key: Some("k1".into()),
            biz_id: Some(format!("pay-{consumer}")),
            headers: [("traceparent".to_owned(), "00-x".to_owned())].into(),
            payload: bytes::Bytes::from_static(b"{}"),
            created_at: Some(chrono::Utc::now()),
            attempts: 0,
        },
        source: "tidings.payment.succeeded".into(),
        delivery: 3,
        replayed: false,
    };
    let mine = message("a-main");
    for _ in 0..2 {
        store
            .park(Parked {
                consumer: "a-main",
                message: &mine,
                deliveries: 3,
                error: "boom",
            })
            .await
            .unwrap();
    }
    let theirs = message("b");
    let e = store
        .park(Parked {
            consumer: "b",
            message: &theirs,
            deliveries: 3,
            error: "boom",
        })
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("row-level security"), "{e:?}");

    let operator = r.connect(&r.operator).await;
    assert_eq!(
        tidings_relay::inbox_dlq_replay(&operator, "a-main", None)
            .await
            .unwrap(),
        1
    );
    assert!(store.replays("b", 10).await.unwrap().is_empty());
    let replays = store.replays("a-main", 10).await.unwrap();
    assert_eq!(replays.len(), 1);
    let d = &replays[0];
    assert!(d.replayed);
    assert_eq!(d.id, mine.id);
    assert_eq!(d.key.as_deref(), Some("k1"));
    assert_eq!(d.headers, mine.headers);
    assert_eq!(d.delivery, 4, "one more than its deliveries so far");
    let inbox = tidings_inbox::Inbox::new("a-main").unwrap();
    assert!(matches!(
        store.transact(&inbox, d).await.unwrap(),
        Step::Processed
    ));
    let owner = r.owner().await;
    assert_eq!(
        count(&owner, "SELECT count(*) FROM tidings.inbox_dead_letters").await,
        0,
        "unparked in the effect's transaction"
    );
    assert_eq!(
        count(
            &owner,
            "SELECT count(*) FROM tidings.inbox WHERE consumer = 'a-main'"
        )
        .await,
        1
    );
}
