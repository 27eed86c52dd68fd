//! The inbox: one effect per (consumer, key) for every driver, under real concurrency; the
//! JetStream consumer runner; retention.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use diesel::Connection as _;
use diesel_async::AsyncConnection as _;
use futures::future::BoxFuture;
use tidings_inbox::nats::{
    ConsumerConfig, ConsumerStats, Delivered, Handler, HandlerError, NatsConsumer,
};
use tidings_inbox::{DedupKey, Inbox, Outcome, Recorded};
use tidings_outbox::MessageId;
use tidings_relay::sink::{NatsSink, NatsSinkConfig};
use tidings_relay::{Envelope, Sink};
use tidings_tests::{eventually, pool, NatsServer, TestDb};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn setup() -> (TestDb, Client) {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE cards (id bigserial PRIMARY KEY, payment_id text NOT NULL)")
        .await
        .unwrap();
    (db, c)
}

async fn cards(c: &Client, payment: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM cards WHERE payment_id = $1",
        &[&payment],
    )
    .await
    .unwrap()
    .get(0)
}

async fn issue_pg(
    inbox: &Inbox,
    c: &mut Client,
    payment: &str,
    fail: bool,
) -> Result<Outcome<()>, BoxError> {
    let mut tx = c.transaction().await?;
    let out = inbox
        .process_pg(&mut tx, &DedupKey::biz_id(payment), async |tx| {
            tx.execute("INSERT INTO cards (payment_id) VALUES ($1)", &[&payment])
                .await?;
            if fail {
                return Err::<(), BoxError>("card printer jammed".into());
            }
            Ok(())
        })
        .await?;
    tx.commit().await?;
    Ok(out)
}

#[tokio::test]
async fn tokio_postgres_redelivery_is_recognised_and_failed_effects_leave_nothing() {
    let (db, _) = setup().await;
    let mut c = db.client().await;
    let inbox = Inbox::new("card-service").unwrap();
    let err = issue_pg(&inbox, &mut c, "pay_1", true).await.unwrap_err();
    assert_eq!(err.to_string(), "card printer jammed");
    assert_eq!(
        cards(&c, "pay_1").await,
        0,
        "the failed effect left nothing"
    );
    let recorded: i64 = c
        .query_one("SELECT count(*) FROM tidings.inbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        recorded, 0,
        "nor the inbox record: the message can be retried"
    );
    assert_eq!(
        issue_pg(&inbox, &mut c, "pay_1", false).await.unwrap(),
        Outcome::Processed(())
    );
    assert_eq!(
        issue_pg(&inbox, &mut c, "pay_1", false).await.unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(cards(&c, "pay_1").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn diesel_redelivery_is_recognised_and_failed_effects_leave_nothing() {
    let (db, c) = setup().await;
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        #[derive(Debug)]
        struct Jammed;
        #[derive(Debug)]
        #[allow(dead_code)] // only Effect is matched; the others carry the conversion paths
        enum AppError {
            Inbox,
            Db,
            Effect,
        }
        impl From<tidings_inbox::Error> for AppError {
            fn from(_: tidings_inbox::Error) -> Self {
                AppError::Inbox
            }
        }
        impl From<diesel::result::Error> for AppError {
            fn from(_: diesel::result::Error) -> Self {
                AppError::Db
            }
        }
        impl From<Jammed> for AppError {
            fn from(_: Jammed) -> Self {
                AppError::Effect
            }
        }
        use diesel::RunQueryDsl;
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        let inbox = Inbox::new("card-service").unwrap();
        let issue = |conn: &mut diesel::PgConnection, fail: bool| {
            inbox.process(conn, &DedupKey::biz_id("pay_1"), |conn| {
                diesel::sql_query("INSERT INTO cards (payment_id) VALUES ('pay_1')")
                    .execute(conn)?;
                if fail {
                    Err(Jammed)?;
                }
                Ok::<_, AppError>(())
            })
        };
        assert!(matches!(issue(&mut conn, true), Err(AppError::Effect)));
        assert_eq!(issue(&mut conn, false).unwrap(), Outcome::Processed(()));
        // Inside the caller's own transaction (a savepoint): still one effect.
        let again = conn
            .transaction::<_, AppError, _>(|conn| issue(conn, false))
            .unwrap();
        assert_eq!(again, Outcome::Duplicate);
    })
    .await
    .unwrap();
    assert_eq!(cards(&c, "pay_1").await, 1);
}

#[tokio::test]
async fn diesel_async_record_in_the_callers_transaction() {
    let (db, c) = setup().await;
    let mut conn = diesel_async::AsyncPgConnection::establish(&db.url)
        .await
        .unwrap();
    let inbox = Inbox::new("card-service").unwrap();
    for expected in [Recorded::First, Recorded::Duplicate] {
        let inbox = inbox.clone();
        let got = conn
            .transaction::<_, BoxError, _>(async move |conn| {
                let r = inbox.record_async(conn, &DedupKey::biz_id("pay_1")).await?;
                if r == Recorded::First {
                    use diesel_async::RunQueryDsl;
                    diesel::sql_query("INSERT INTO cards (payment_id) VALUES ('pay_1')")
                        .execute(conn)
                        .await?;
                }
                Ok(r)
            })
            .await
            .unwrap();
        assert_eq!(got, expected);
    }
    // A rolled-back record is forgotten.
    let _ = conn
        .transaction::<(), BoxError, _>(async |conn| {
            let r = Inbox::new("other")
                .unwrap()
                .record_async(conn, &DedupKey::biz_id("pay_1"))
                .await?;
            assert_eq!(r, Recorded::First);
            Err("rollback".into())
        })
        .await;
    let other: i64 = c
        .query_one(
            "SELECT count(*) FROM tidings.inbox WHERE consumer = 'other'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(other, 0);
    assert_eq!(cards(&c, "pay_1").await, 1);
}

/// The second of two concurrent deliveries waits for the first transaction, then sees a duplicate.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_deliveries_of_one_key_give_exactly_one_effect() {
    let (db, c) = setup().await;
    let inbox = Inbox::new("card-service").unwrap();
    let key = DedupKey::biz_id("pay_1");
    let mut first = db.client().await;
    let tx1 = first.transaction().await.unwrap();
    assert_eq!(inbox.record_pg(&tx1, &key).await.unwrap(), Recorded::First);
    tx1.execute("INSERT INTO cards (payment_id) VALUES ('pay_1')", &[])
        .await
        .unwrap();

    let second = tokio::spawn({
        let (url, inbox, key) = (db.url.clone(), inbox.clone(), key.clone());
        async move {
            let mut c = tidings_tests::connect(&url).await;
            let tx = c.transaction().await.unwrap();
            let pid: i32 = tx
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            let r = inbox.record_pg(&tx, &key).await.unwrap();
            tx.commit().await.unwrap();
            (pid, r)
        }
    });
    eventually("the second delivery to wait on the first's lock", Duration::from_secs(10), || async {
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        waiting == 1
    })
    .await;
    assert!(!second.is_finished());
    tx1.commit().await.unwrap();
    let (_, r) = second.await.unwrap();
    assert_eq!(r, Recorded::Duplicate);

    // And a crowd: 16 concurrent deliveries of one key, one effect.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (url, inbox) = (db.url.clone(), inbox.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = tidings_tests::connect(&url).await;
            issue_pg(&inbox, &mut c, "pay_2", false).await.unwrap()
        }));
    }
    let mut processed = 0;
    for t in tasks {
        processed += usize::from(t.await.unwrap().is_processed());
    }
    assert_eq!(processed, 1);
    assert_eq!(cards(&c, "pay_2").await, 1);
}

#[tokio::test]
async fn consumers_dedup_independently_and_message_id_is_the_key_without_biz_id() {
    let (db, _) = setup().await;
    let mut c = db.client().await;
    let (a, b) = (
        Inbox::new("card-service").unwrap(),
        Inbox::new("mailer").unwrap(),
    );
    assert!(issue_pg(&a, &mut c, "pay_1", false)
        .await
        .unwrap()
        .is_processed());
    assert!(issue_pg(&b, &mut c, "pay_1", false)
        .await
        .unwrap()
        .is_processed());
    let id: MessageId = "01a21c12-80e8-722f-a870-77424c2b05f4".parse().unwrap();
    let key = DedupKey::for_message(None, id);
    assert_eq!(key.as_str(), id.to_string());
    assert_eq!(DedupKey::for_message(Some("pay_9"), id).as_str(), "pay_9");
    assert_eq!(a.record_pg(&c, &key).await.unwrap(), Recorded::First);
    assert_eq!(a.record_pg(&c, &key).await.unwrap(), Recorded::Duplicate);
    assert!(Inbox::new("").is_err());
    assert!(a.record_pg(&c, &DedupKey::biz_id("")).await.is_err());
}

#[tokio::test]
async fn prune_deletes_only_old_records_in_batches() {
    let (db, c) = setup().await;
    c.batch_execute(
        "INSERT INTO tidings.inbox (consumer, biz_id, processed_at)
         SELECT 'a', 'old-' || i, now() - interval '10 days' FROM generate_series(1, 25) i;
         INSERT INTO tidings.inbox (consumer, biz_id, processed_at)
         SELECT 'b', 'old-' || i, now() - interval '10 days' FROM generate_series(1, 5) i;
         INSERT INTO tidings.inbox (consumer, biz_id) SELECT 'a', 'new-' || i FROM generate_series(1, 7) i;",
    )
    .await
    .unwrap();
    let week = Duration::from_secs(7 * 24 * 3600);
    assert_eq!(
        tidings_inbox::prune(&c, Some("a"), week, 10).await.unwrap(),
        25
    );
    assert_eq!(tidings_inbox::prune(&c, None, week, 10).await.unwrap(), 5);
    let left: i64 = c
        .query_one("SELECT count(*) FROM tidings.inbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 7);
    drop(db);
}

// ---------------------------------------------------------------- JetStream consumer runner

struct IssueCard;

impl Handler for IssueCard {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let payment = msg.biz_id.as_deref().ok_or("no biz-id")?;
            if payment.starts_with("poison") {
                return Err("cannot issue a card for this payment".into());
            }
            tx.execute("INSERT INTO cards (payment_id) VALUES ($1)", &[&payment])
                .await?;
            if payment.starts_with("panic") {
                panic!("a handler bug, with the card written");
            }
            Ok(())
        })
    }
}

/// Runs `consumer` until `done` holds for its counters (30 s deadline), then stops it and
/// waits (10 s at most) for it to return.
async fn run_until(
    consumer: &Arc<NatsConsumer>,
    what: &str,
    done: impl Fn(&ConsumerStats) -> bool,
) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (consumer, stop) = (consumer.clone(), stop.clone());
        async move { consumer.run(stop).await }
    });
    eventually(what, Duration::from_secs(30), || async {
        done(consumer.stats())
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

fn envelope(biz: &str) -> Envelope {
    Envelope {
        seq: 0,
        message: tidings_outbox::WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic: "payment.succeeded".into(),
            key: None,
            biz_id: Some(biz.into()),
            payload: bytes::Bytes::from_static(b"{}"),
            headers: [(
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            )]
            .into(),
            created_at: Some(chrono::Utc::now()),
            attempts: 0,
        },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jetstream_consumer_issues_one_card_per_payment_and_parks_poison() {
    let ((db, c), nats) = (setup().await, NatsServer::start().await);
    let sink = NatsSink::connect(NatsSinkConfig {
        url: nats.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // 50 payments, each also re-published under a NEW message id (as a producer retry would):
    // JetStream cannot drop those, the inbox must.
    for i in 0..50 {
        let e = envelope(&format!("pay_{i}"));
        sink.publish(&e).await.unwrap();
        sink.publish(&Envelope {
            message: tidings_outbox::WireMessage {
                id: MessageId::from_uuid(uuid::Uuid::now_v7()),
                ..e.message.clone()
            },
            ..e
        })
        .await
        .unwrap();
    }
    sink.publish(&envelope("poison_1")).await.unwrap();
    // A handler that panics on this message: a failure of this message, not of the runner.
    sink.publish(&envelope("panic_1")).await.unwrap();

    let client = async_nats::connect(&nats.url).await.unwrap();
    let config = ConsumerConfig {
        name: "card-service".into(),
        filter_subject: "tidings.payment.succeeded".into(),
        max_deliveries: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ..Default::default()
    };
    let consumer = Arc::new(
        NatsConsumer::new(pool(&db, 4), client, config, Arc::new(IssueCard))
            .await
            .unwrap(),
    );
    run_until(
        &consumer,
        "all payments handled and the poison and the panicking message parked",
        |s| {
            s.processed.load(Ordering::SeqCst) + s.duplicates.load(Ordering::SeqCst) == 100
                && s.parked.load(Ordering::SeqCst) == 2
        },
    )
    .await;

    let s = consumer.stats();
    assert_eq!(s.processed.load(Ordering::SeqCst), 50);
    assert_eq!(s.duplicates.load(Ordering::SeqCst), 50);
    assert_eq!(
        s.failed.load(Ordering::SeqCst),
        6,
        "the poison and the panicking message were each tried max_deliveries times"
    );
    let per_payment: Vec<i64> = c
        .query("SELECT count(*) FROM cards GROUP BY payment_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(per_payment.len(), 50);
    assert_eq!(
        cards(&c, "panic_1").await,
        0,
        "the panicking handler's card was rolled back"
    );
    assert!(
        per_payment.iter().all(|n| *n == 1),
        "exactly one card per payment"
    );
    let parked = c
        .query(
            "SELECT biz_id, deliveries, last_error FROM tidings.inbox_dead_letters ORDER BY biz_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(parked.len(), 2);
    assert_eq!(parked[0].get::<_, String>(0), "panic_1");
    assert_eq!(parked[0].get::<_, i32>(1), 3);
    assert!(parked[0]
        .get::<_, String>(2)
        .contains("the handler panicked"));
    assert_eq!(parked[1].get::<_, String>(0), "poison_1");
    assert_eq!(parked[1].get::<_, i32>(1), 3);
    assert!(parked[1]
        .get::<_, String>(2)
        .contains("cannot issue a card"));

    // Everything was acked: a new runner on the same durable consumer gets nothing.
    let info = consumer
        .pull_consumer()
        .clone()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
}

/// A handler that swallows an SQL error and returns Ok leaves an aborted transaction, whose
/// COMMIT would silently roll back: the runner must not ack that as processed.
struct SwallowsErrors;

impl Handler for SwallowsErrors {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        _: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let _ = tx
                .execute("INSERT INTO no_such_table VALUES (1)", &[])
                .await;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn swallowed_sql_error_is_not_acked_as_processed_and_unidentified_messages_are_parked() {
    let ((db, c), nats) = (setup().await, NatsServer::start().await);
    let sink = NatsSink::connect(NatsSinkConfig {
        url: nats.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    sink.publish(&envelope("pay_1")).await.unwrap();
    // Not from a Tidings relay: no message id at all.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    js.publish("tidings.payment.succeeded", "stray".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let config = ConsumerConfig {
        name: "card-service".into(),
        max_deliveries: 2,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(20),
        ..Default::default()
    };
    let consumer = Arc::new(
        NatsConsumer::new(pool(&db, 2), client, config, Arc::new(SwallowsErrors))
            .await
            .unwrap(),
    );
    run_until(&consumer, "both messages parked", |s| {
        s.parked.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(consumer.stats().processed.load(Ordering::SeqCst), 0);
    let recorded: i64 = c
        .query_one("SELECT count(*) FROM tidings.inbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 0, "no inbox record without its effect");
    let parked: Vec<String> = c
        .query(
            "SELECT last_error FROM tidings.inbox_dead_letters ORDER BY last_error",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(parked.len(), 2);
    assert!(
        parked.iter().any(|e| e.contains("no usable message id")),
        "{parked:?}"
    );
    assert!(parked.iter().any(|e| e.contains("aborted")), "{parked:?}");
}

/// Applies `k:i` payloads in a table, in the order it runs them; fails the first attempt of
/// every message whose index is 1 (a handler error, counted), and the first attempt of index 3
/// with a serialization failure (transient: not counted).
struct Ordered {
    tried: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Handler for Ordered {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let p = String::from_utf8(msg.payload.to_vec())?;
            let first = self.tried.lock().unwrap().insert(p.clone());
            if first && p.ends_with(":1") {
                return Err("first attempt of index 1 fails".into());
            }
            if first && p.ends_with(":3") {
                tx.batch_execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                )
                .await?;
            }
            tx.execute("INSERT INTO applied (payload) VALUES ($1)", &[&p])
                .await?;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_applies_each_keys_messages_in_order_across_retries() {
    let ((db, c), nats) = (setup().await, NatsServer::start().await);
    c.batch_execute("CREATE TABLE applied (n bigserial PRIMARY KEY, payload text NOT NULL)")
        .await
        .unwrap();
    let sink = NatsSink::connect(NatsSinkConfig {
        url: nats.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // 4 keys x 5 messages, interleaved as a relay would publish them.
    for i in 0..5 {
        for k in 0..4 {
            let mut e = envelope(&format!("pay_{k}_{i}"));
            e.message.key = Some(format!("k{k}"));
            e.message.payload = bytes::Bytes::from(format!("k{k}:{i}"));
            sink.publish(&e).await.unwrap();
        }
    }
    let client = async_nats::connect(&nats.url).await.unwrap();
    let config = ConsumerConfig {
        name: "ordered".into(),
        filter_subject: "tidings.payment.succeeded".into(),
        // One counted failure is allowed; the transient one must not count.
        max_deliveries: 2,
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_millis(200),
        ..Default::default()
    };
    let handler = Arc::new(Ordered {
        tried: Default::default(),
    });
    let consumer = Arc::new(
        NatsConsumer::new(pool(&db, 4), client, config, handler)
            .await
            .unwrap(),
    );
    run_until(&consumer, "all 20 applied", |s| {
        s.processed.load(Ordering::SeqCst) == 20
    })
    .await;
    let applied: Vec<String> = c
        .query("SELECT payload FROM applied ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for k in 0..4 {
        let of_key: Vec<&String> = applied
            .iter()
            .filter(|p| p.starts_with(&format!("k{k}:")))
            .collect();
        let want: Vec<String> = (0..5).map(|i| format!("k{k}:{i}")).collect();
        assert_eq!(
            of_key,
            want.iter().collect::<Vec<_>>(),
            "key k{k} applied in order"
        );
    }
    let s = consumer.stats();
    assert_eq!(s.parked.load(Ordering::SeqCst), 0, "nothing parked");
    assert_eq!(
        s.failed.load(Ordering::SeqCst),
        4,
        "one counted failure per key (index 1); the serialization failures did not count"
    );
}

// ---------------------------------------------------------------- runner conformance (JetStream)

/// JetStream as the runner conformance suite's broker: published through the relay's NATS sink,
/// consumed through the NATS adapter, each consumer filtered to its case's topic.
struct JetStream {
    nats: NatsServer,
    sink: Arc<NatsSink>,
}

impl tidings_tests::runner_conformance::ConsumerBroker for JetStream {
    type Adapter = tidings_inbox::nats::NatsAdapter;

    fn publish<'a>(&'a self, messages: &'a [tidings_outbox::WireMessage]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for (i, m) in messages.iter().enumerate() {
                self.sink
                    .publish(&Envelope {
                        seq: i as i64,
                        message: m.clone(),
                    })
                    .await
                    .unwrap();
            }
        })
    }

    fn adapter<'a>(
        &'a self,
        name: &'a str,
        topic: &'a str,
        redeliver_after: Duration,
    ) -> BoxFuture<'a, Self::Adapter> {
        Box::pin(async move {
            let client = async_nats::connect(&self.nats.url).await.unwrap();
            tidings_inbox::nats::NatsAdapter::connect(
                client,
                &ConsumerConfig {
                    name: name.into(),
                    filter_subject: format!("tidings.{topic}"),
                    ack_wait: redeliver_after,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        })
    }

    fn unacked<'a>(&'a self, name: &'a str) -> BoxFuture<'a, u64> {
        Box::pin(async move {
            let js = async_nats::jetstream::new(async_nats::connect(&self.nats.url).await.unwrap());
            let stream = js.get_stream("TIDINGS").await.unwrap();
            let info = stream.consumer_info(name).await.unwrap();
            info.num_pending + info.num_ack_pending as u64
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jetstream_adapter_passes_the_runner_conformance_suite() {
    let nats = NatsServer::start().await;
    let sink = tidings_tests::nats_sink(&nats).await;
    tidings_tests::runner_conformance::runner_conformance(&JetStream { nats, sink }).await;
}

/// Deleting the durable consumer under a running runner: the stream fails, the runner reopens
/// with a growing pause (no spinning), the adapter recreates the consumer, and consumption
/// goes on.
#[tokio::test(flavor = "multi_thread")]
async fn runner_does_not_spin_when_its_consumer_is_deleted_and_recreates_it() {
    let ((db, c), nats) = (setup().await, NatsServer::start().await);
    let sink = tidings_tests::nats_sink(&nats).await;
    sink.publish(&envelope("pay_before")).await.unwrap();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let config = ConsumerConfig {
        name: "card-service".into(),
        filter_subject: "tidings.payment.succeeded".into(),
        ..Default::default()
    };
    let consumer = Arc::new(
        NatsConsumer::new(pool(&db, 2), client.clone(), config, Arc::new(IssueCard))
            .await
            .unwrap(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (consumer, stop) = (consumer.clone(), stop.clone());
        async move { consumer.run(stop).await }
    });
    eventually("the first card", Duration::from_secs(20), || async {
        consumer.stats().processed.load(Ordering::SeqCst) == 1
    })
    .await;
    let js = async_nats::jetstream::new(client);
    js.get_stream("TIDINGS")
        .await
        .unwrap()
        .delete_consumer("card-service")
        .await
        .unwrap();
    let deleted = tokio::time::Instant::now();
    eventually("the runner to notice", Duration::from_secs(20), || async {
        consumer.stats().receive_errors.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Recreated with the default deliver policy (all): the first message comes again, as a
    // duplicate, and a new one is processed.
    sink.publish(&envelope("pay_after")).await.unwrap();
    eventually(
        "the recreated consumer to deliver",
        Duration::from_secs(30),
        || async { cards(&c, "pay_after").await == 1 },
    )
    .await;
    let errors = consumer.stats().receive_errors.load(Ordering::SeqCst);
    let secs = deleted.elapsed().as_secs_f64();
    // A pause of at least 100 ms doubling per idle failure: a handful in these seconds, where a
    // tight loop would make thousands.
    assert!(
        (errors as f64) <= 5.0 + secs * 10.0,
        "{errors} stream failures in {secs:.1}s"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(cards(&c, "pay_before").await, 1);
}

/// The handler written against diesel-async: the same runner, effect and inbox record in one
/// diesel transaction, a redelivery skipped, a failure parked.
struct IssueCardDiesel;

impl tidings_inbox::runner::diesel::DieselHandler for IssueCardDiesel {
    fn handle<'a>(
        &'a self,
        conn: &'a mut diesel_async::AsyncPgConnection,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            use diesel_async::RunQueryDsl;
            let payment = msg.biz_id.as_deref().ok_or("no biz-id")?;
            if payment.starts_with("poison") {
                return Err(HandlerError::park("cannot issue a card for this payment"));
            }
            diesel::sql_query("INSERT INTO cards (payment_id) VALUES ($1)")
                .bind::<diesel::sql_types::Text, _>(payment)
                .execute(conn)
                .await?;
            Ok(())
        })
    }
}

/// Ten payments, each published twice, and a poison one, through a NATS runner on the store
/// `make` builds for the test's database: one card per payment, ten duplicates recognised, the
/// poison message parked at once.
async fn handler_runs_on_the_runner<S, F>(make: F)
where
    S: tidings_inbox::runner::Store,
    F: AsyncFnOnce(&TestDb) -> S,
{
    let ((db, c), nats) = (setup().await, NatsServer::start().await);
    let sink = tidings_tests::nats_sink(&nats).await;
    for i in 0..10 {
        let e = envelope(&format!("pay_{i}"));
        sink.publish(&e).await.unwrap();
        sink.publish(&Envelope {
            message: tidings_outbox::WireMessage {
                id: MessageId::from_uuid(uuid::Uuid::now_v7()),
                ..e.message.clone()
            },
            ..e
        })
        .await
        .unwrap();
    }
    sink.publish(&envelope("poison_1")).await.unwrap();
    let consumer = Arc::new(
        NatsConsumer::with_store(
            make(&db).await,
            async_nats::connect(&nats.url).await.unwrap(),
            ConsumerConfig {
                name: "card-service".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (consumer, stop) = (consumer.clone(), stop.clone());
        async move { consumer.run(stop).await }
    });
    eventually("all handled", Duration::from_secs(30), || async {
        let s = consumer.stats();
        s.processed.load(Ordering::SeqCst) == 10
            && s.duplicates.load(Ordering::SeqCst) == 10
            && s.parked.load(Ordering::SeqCst) == 1
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let total: i64 = c
        .query_one(
            "SELECT count(DISTINCT payment_id) + count(*) FROM cards",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 20, "ten payments, one card each");
    let parked: i32 = c
        .query_one(
            "SELECT deliveries FROM tidings.inbox_dead_letters WHERE biz_id = 'poison_1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(parked, 1, "parked at once: the handler said so");
}

#[tokio::test(flavor = "multi_thread")]
async fn diesel_async_handler_runs_on_the_runner() {
    handler_runs_on_the_runner(async |db: &TestDb| {
        let manager = diesel_async::pooled_connection::AsyncDieselConnectionManager::<
            diesel_async::AsyncPgConnection,
        >::new(&db.url);
        let pool = diesel_async::pooled_connection::deadpool::Pool::builder(manager)
            .max_size(4)
            .build()
            .unwrap();
        tidings_inbox::runner::diesel::DieselStore::new(pool, Arc::new(IssueCardDiesel))
    })
    .await;
}

/// A replay whose parked row was purged (or replayed by another runner) after it was read does
/// nothing; a duplicate hook that fails does not fail a message whose effect is already there.
#[tokio::test]
async fn replay_of_a_purged_row_does_nothing_and_a_failing_duplicate_hook_is_contained() {
    use tidings_inbox::runner::postgres::PgStore;
    use tidings_inbox::runner::{Parked, Step, Store};

    struct FailingHook;
    impl Handler for FailingHook {
        fn handle<'a>(
            &'a self,
            tx: &'a tokio_postgres::Transaction<'a>,
            msg: &'a Delivered,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async move {
                tx.execute("INSERT INTO cards (payment_id) VALUES ($1)", &[&msg.biz_id])
                    .await?;
                Ok(())
            })
        }
        fn duplicate<'a>(
            &'a self,
            tx: &'a tokio_postgres::Transaction<'a>,
            msg: &'a Delivered,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async move {
                if msg.biz_id.as_deref() == Some("pay_panic") {
                    tx.execute(
                        "INSERT INTO cards (payment_id) VALUES ('from the hook')",
                        &[],
                    )
                    .await?;
                    panic!("a bug in the duplicate hook");
                }
                // Leaves the savepoint aborted.
                tx.batch_execute("SELECT * FROM no_such_table").await?;
                Ok(())
            })
        }
    }

    let (db, c) = setup().await;
    let store = PgStore::new(pool(&db, 2), Arc::new(FailingHook));
    let inbox = Inbox::new("card-service").unwrap();
    let e = envelope("pay_1");
    let d = Delivered {
        message: e.message.clone(),
        source: "tidings.payment.succeeded".into(),
        delivery: 1,
        replayed: false,
    };
    assert!(matches!(
        store.transact(&inbox, &d).await.unwrap(),
        Step::Processed
    ));
    assert!(matches!(
        store.transact(&inbox, &d).await.unwrap(),
        Step::Duplicate
    ));
    // A hook that panics is contained the same way: still a duplicate, its savepoint rolled
    // back, the message's own effect kept.
    let panics = Delivered {
        message: envelope("pay_panic").message,
        ..d.clone()
    };
    assert!(matches!(
        store.transact(&inbox, &panics).await.unwrap(),
        Step::Processed
    ));
    assert!(matches!(
        store.transact(&inbox, &panics).await.unwrap(),
        Step::Duplicate
    ));
    assert_eq!(cards(&c, "pay_panic").await, 1);
    assert_eq!(cards(&c, "from the hook").await, 0);

    let parked = envelope("pay_2");
    let p = Delivered {
        message: parked.message.clone(),
        ..d.clone()
    };
    store
        .park(Parked {
            consumer: "card-service",
            message: &p,
            deliveries: 5,
            error: "boom",
        })
        .await
        .unwrap();
    c.batch_execute("UPDATE tidings.inbox_dead_letters SET replay_requested_at = now()")
        .await
        .unwrap();
    let replays = store.replays("card-service", 10).await.unwrap();
    assert_eq!(replays.len(), 1);
    // Purged by an operator after the runner read it.
    c.batch_execute("DELETE FROM tidings.inbox_dead_letters")
        .await
        .unwrap();
    assert!(matches!(
        store.transact(&inbox, &replays[0]).await.unwrap(),
        Step::NotParked
    ));
    assert_eq!(
        cards(&c, "pay_2").await,
        0,
        "no effect for a purged message"
    );
    assert_eq!(cards(&c, "pay_1").await, 1);
}

/// Messages whose content PostgreSQL or the inbox refuses (a control character in the biz-id,
/// a NUL in a header) are parked at once, with the NUL replaced, never retried forever; a
/// message without an id is parked once, however often it is redelivered.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_messages_are_parked_at_once() {
    let ((db, c), nats) = (setup().await, NatsServer::start().await);
    let _sink = tidings_tests::nats_sink(&nats).await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let publish = |biz: &'static str, note: &'static str| {
        let js = js.clone();
        async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert(
                "Tidings-Message-Id",
                uuid::Uuid::now_v7().to_string().as_str(),
            );
            h.insert("Tidings-Biz-Id", biz);
            h.insert("x-note", note);
            js.publish_with_headers("tidings.payment.succeeded", h, "{}".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish("pay\u{1}ctl", "fine").await;
    publish("pay\u{0}nul", "a\u{0}b").await;
    let consumer = Arc::new(
        NatsConsumer::new(
            pool(&db, 2),
            client,
            ConsumerConfig {
                name: "card-service".into(),
                max_deliveries: 1000,
                backoff_base: Duration::from_millis(10),
                backoff_max: Duration::from_millis(10),
                ..Default::default()
            },
            Arc::new(IssueCard),
        )
        .await
        .unwrap(),
    );
    run_until(&consumer, "both parked", |s| {
        s.parked.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(
        consumer.stats().failed.load(Ordering::SeqCst),
        2,
        "parked on the first failure, not after max_deliveries"
    );
    let rows: Vec<(String, i32, String)> = c
        .query(
            "SELECT biz_id, deliveries, headers->>'x-note' FROM tidings.inbox_dead_letters ORDER BY biz_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("pay\u{1}ctl".to_owned(), 1, "fine".to_owned()),
            ("pay\u{fffd}nul".to_owned(), 1, "a\u{fffd}b".to_owned()),
        ]
    );
}

/// The same over the synchronous `postgres` crate (on a thread of its own: it runs its own
/// runtime), and an unmigrated database names the migrate command.
#[tokio::test]
async fn sync_postgres_redelivery_is_recognised_and_failed_effects_leave_nothing() {
    let (db, c) = setup().await;
    let url = db.url.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let inbox = Inbox::new("card-service").unwrap();
        let mut issue = |fail: bool| -> Result<Outcome<()>, BoxError> {
            let mut tx = client.transaction()?;
            let out = inbox.process_sync(&mut tx, &DedupKey::biz_id("pay_1"), |tx| {
                tx.execute("INSERT INTO cards (payment_id) VALUES ('pay_1')", &[])?;
                if fail {
                    return Err::<(), BoxError>("card printer jammed".into());
                }
                Ok(())
            })?;
            tx.commit()?;
            Ok(out)
        };
        let failed = issue(true).unwrap_err().to_string();
        (failed, issue(false).unwrap(), issue(false).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        (
            "card printer jammed".to_owned(),
            Outcome::Processed(()),
            Outcome::Duplicate
        )
    );
    assert_eq!(cards(&c, "pay_1").await, 1);

    let empty = TestDb::empty().await;
    let url = empty.url.clone();
    let err = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let mut tx = client.transaction().unwrap();
        Inbox::new("card-service")
            .unwrap()
            .record_sync(&mut tx, &DedupKey::biz_id("pay_1"))
            .unwrap_err()
            .to_string()
    })
    .await
    .unwrap();
    assert!(err.contains("tidings migrate up"), "{err}");
}

/// The handler written against sqlx: the same runner, effect and inbox record in one sqlx
/// transaction, a redelivery skipped, a failure parked.
struct IssueCardSqlx;

impl tidings_inbox::runner::sqlx::SqlxHandler for IssueCardSqlx {
    fn handle<'a>(
        &'a self,
        conn: &'a mut sqlx::PgConnection,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let payment = msg.biz_id.as_deref().ok_or("no biz-id")?;
            if payment.starts_with("poison") {
                return Err(HandlerError::park("cannot issue a card for this payment"));
            }
            sqlx::query("INSERT INTO cards (payment_id) VALUES ($1)")
                .bind(payment)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlx_handler_runs_on_the_runner() {
    handler_runs_on_the_runner(async |db: &TestDb| {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.url)
            .await
            .unwrap();
        tidings_inbox::runner::sqlx::SqlxStore::new(pool, Arc::new(IssueCardSqlx))
    })
    .await;
}

/// `process_sqlx` in the caller's sqlx transaction: a failed effect leaves neither the effect
/// nor the record, a redelivery is skipped; an unmigrated database names the migrate command.
#[tokio::test]
async fn sqlx_redelivery_is_recognised_and_failed_effects_leave_nothing() {
    use sqlx::Connection as _;
    let (db, c) = setup().await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let inbox = Inbox::new("card-service").unwrap();
    async fn issue(
        inbox: &Inbox,
        conn: &mut sqlx::PgConnection,
        fail: bool,
    ) -> Result<Outcome<()>, BoxError> {
        let mut tx = conn.begin().await?;
        let out = inbox
            .process_sqlx(&mut tx, &DedupKey::biz_id("pay_1"), async |conn| {
                sqlx::query("INSERT INTO cards (payment_id) VALUES ('pay_1')")
                    .execute(&mut *conn)
                    .await?;
                if fail {
                    return Err::<(), BoxError>("card printer jammed".into());
                }
                Ok(())
            })
            .await?;
        tx.commit().await?;
        Ok(out)
    }
    let err = issue(&inbox, &mut conn, true).await.unwrap_err();
    assert_eq!(err.to_string(), "card printer jammed");
    assert_eq!(cards(&c, "pay_1").await, 0);
    assert_eq!(
        issue(&inbox, &mut conn, false).await.unwrap(),
        Outcome::Processed(())
    );
    assert_eq!(
        issue(&inbox, &mut conn, false).await.unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(cards(&c, "pay_1").await, 1);

    let empty = TestDb::empty().await;
    let mut conn = sqlx::PgConnection::connect(&empty.url).await.unwrap();
    let err = inbox
        .record_sqlx(&mut conn, &DedupKey::biz_id("pay_1"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tidings migrate up"), "{err}");
}
