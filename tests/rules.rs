//! The schema is the one validator: the Rust checks agree with it on random input, whatever a
//! producer can write through SQL is either refused or delivered/dead-lettered by the relay, and
//! rows that slipped in before the rules (or past a dropped constraint) cannot crash or wedge it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidings_outbox::Message;
use tidings_relay::sink::NatsSink;
use tidings_relay::{Delivery, Envelope, Relay, RelayConfig, Sink, SinkError};
use tidings_tests::{drain, nats_sink, pool, NatsServer, TestDb};

/// Characters that break one rule or another, mixed with ordinary ones.
const POOL: &[char] = &[
    'a', 'Z', '0', '9', '.', '-', '_', ' ', '\t', '\n', '\r', '\u{1}', '\u{1b}', '\u{7f}',
    '\u{85}', '\u{9f}', '\u{a0}', 'é', '😀', '*', '>', ':', '"', '\\', '\'', '{', '%', '/',
];

fn random_string(rng: &mut StdRng) -> String {
    let len = match rng.random_range(0..10) {
        0 => 0,
        1 => rng.random_range(120..135),
        2 => rng.random_range(195..205),
        3 => rng.random_range(505..520),
        4 => rng.random_range(4090..4100),
        _ => rng.random_range(1..12),
    };
    // Mostly one "clean" character repeated, so long strings sit right at the limits, with a
    // few random characters mixed in.
    let base = ['a', 'é', '😀'][rng.random_range(0..3)];
    let dirty = rng.random_bool(0.5);
    (0..len)
        .map(|_| {
            if dirty && rng.random_bool(0.1) {
                POOL[rng.random_range(0..POOL.len())]
            } else if rng.random_bool(0.9) {
                base
            } else {
                POOL[rng.random_range(0..8)]
            }
        })
        .collect()
}

fn random_header_name(rng: &mut StdRng) -> String {
    const RESERVED: &[&str] = &[
        "Tidings-Biz-Id",
        "tidings-x",
        "Nats-Rollup",
        "NATS-Expected-Stream",
        "Nats-Msg-Id",
        "webhook-signature",
        "Idempotency-Key",
        "CC",
        "bcc",
        "X-Delay",
        "Content-Length",
        "transfer-encoding",
        "Host",
        "TE",
    ];
    match rng.random_range(0..4) {
        0 => {
            let r = RESERVED[rng.random_range(0..RESERVED.len())];
            // Random case, sometimes a suffix (which keeps prefixes reserved, frees exact names).
            let mut s: String = r
                .chars()
                .map(|c| {
                    if rng.random_bool(0.5) {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect();
            if rng.random_bool(0.3) {
                s.push_str("-x");
            }
            s
        }
        // The names the schema's shortcut accepts (migration 000004), in the case it accepts
        // and in others.
        1 => SHORTCUT_NAMES[rng.random_range(0..SHORTCUT_NAMES.len())].into(),
        _ => random_string(rng),
    }
}

/// Header names the headers CHECK accepts without running tidings.headers_are_valid (lower
/// case only), and the same in other cases (judged by the function).
const SHORTCUT_NAMES: &[&str] = &[
    "content-type",
    "content-encoding",
    "traceparent",
    "tracestate",
    "baggage",
    "Content-Type",
    "TRACEPARENT",
];

/// Whether a direct INSERT of a message with these fields is accepted by the schema.
async fn schema_accepts(
    c: &mut tokio_postgres::Client,
    topic: &str,
    key: Option<&str>,
    biz_id: Option<&str>,
    headers: &serde_json::Value,
) -> bool {
    let tx = c.transaction().await.unwrap();
    let r = tx
        .execute(
            "INSERT INTO tidings.outbox (id, topic, ordering_key, biz_id, payload, headers) \
             VALUES (gen_random_uuid(), $1, $2, $3, '\\x00', $4)",
            &[&topic, &key, &biz_id, headers],
        )
        .await;
    tx.rollback().await.unwrap();
    accepted_by_the_rules(&r)
}

/// Whether a write was accepted; a refusal must be a rule's (a CHECK violation), nothing else.
fn accepted_by_the_rules(r: &Result<u64, tokio_postgres::Error>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => {
            assert_eq!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
                "only rule violations expected: {e:?}"
            );
            false
        }
    }
}

#[tokio::test]
async fn rust_checks_and_the_schema_agree_on_random_input() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    let empty = serde_json::json!({});
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..1200 {
        let s = random_string(&mut rng);
        let (rust_ok, sql_ok, what) = match case % 5 {
            0 => (
                tidings_outbox::validate_topic(&s).is_ok(),
                schema_accepts(&mut c, &s, None, None, &empty).await,
                "topic",
            ),
            1 => (
                tidings_outbox::validate_biz_id(&s).is_ok(),
                schema_accepts(&mut c, "t", None, Some(&s), &empty).await,
                "biz-id",
            ),
            2 => (
                tidings_outbox::validate_key(&s).is_ok(),
                schema_accepts(&mut c, "t", Some(&s), None, &empty).await,
                "key",
            ),
            3 => {
                let name = random_header_name(&mut rng);
                let h = serde_json::json!({ name.clone(): "v" });
                (
                    tidings_outbox::validate_header_pair(&name, "v").is_ok(),
                    schema_accepts(&mut c, "t", None, None, &h).await,
                    "header name",
                )
            }
            _ => {
                // A value under an ordinary name (judged by tidings.headers_are_valid), or under
                // a name of the CHECK's shortcut (judged by its regex first), sometimes beside a
                // second header.
                let name = match rng.random_range(0..3) {
                    0 => "x-note",
                    _ => SHORTCUT_NAMES[rng.random_range(0..5)],
                };
                let mut h = serde_json::json!({ name: s.clone() });
                if name != "traceparent" && rng.random_bool(0.3) {
                    h["traceparent"] =
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
                }
                (
                    tidings_outbox::validate_header_pair(name, &s).is_ok(),
                    schema_accepts(&mut c, "t", None, None, &h).await,
                    "header value",
                )
            }
        };
        assert_eq!(
            rust_ok,
            sql_ok,
            "seed {seed}: Rust and the schema disagree on the {what} {s:?} ({} chars, {} bytes)",
            s.chars().count(),
            s.len()
        );
        if sql_ok {
            accepted += 1
        } else {
            refused += 1
        }
    }
    // The generator must exercise both sides of the rules.
    assert!(accepted > 200 && refused > 200, "{accepted} / {refused}");
    // A non-string header value: refused by both.
    let bad = Message::new("t", "x").headers_json(&serde_json::json!({"n": 1}));
    assert!(tidings_outbox::Outbox::default()
        .enqueue_pg(&c, &bad)
        .await
        .is_err());
    assert!(!schema_accepts_json(&mut c, serde_json::json!({"n": 1})).await);
}

/// Whether a direct INSERT of this inbox record is accepted by the schema.
async fn inbox_accepts(c: &mut tokio_postgres::Client, consumer: &str, biz_id: &str) -> bool {
    let tx = c.transaction().await.unwrap();
    let r = tx
        .execute(
            "INSERT INTO tidings.inbox (consumer, biz_id) VALUES ($1, $2)",
            &[&consumer, &biz_id],
        )
        .await;
    tx.rollback().await.unwrap();
    let accepted = accepted_by_the_rules(&r);
    if let Err(e) = &r {
        // Named after the rule, whichever column broke it (migration 000006 moved the rules
        // into domains under the same names).
        let msg = e.as_db_error().expect("a database error").message();
        assert!(
            msg.contains("_1_to_512_bytes_without_control_characters"),
            "{e:?}"
        );
    }
    accepted
}

/// The inbox's own CHECKs (consumer and biz-id: 1-512 bytes, no control character) against
/// the Rust checks (`Inbox::new`, `validate_biz_id`), on random strings at the limits.
#[tokio::test]
async fn rust_checks_and_the_inbox_table_agree_on_random_input() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..400 {
        let s = random_string(&mut rng);
        let (rust_ok, sql_ok, what) = if case % 2 == 0 {
            (
                tidings_inbox::Inbox::new(s.clone()).is_ok(),
                inbox_accepts(&mut c, &s, "pay-1").await,
                "consumer",
            )
        } else {
            (
                tidings_outbox::validate_biz_id(&s).is_ok(),
                inbox_accepts(&mut c, "card", &s).await,
                "biz-id",
            )
        };
        assert_eq!(
            rust_ok,
            sql_ok,
            "seed {seed}: Rust and the inbox table disagree on the {what} {s:?} ({} bytes)",
            s.len()
        );
        if sql_ok {
            accepted += 1
        } else {
            refused += 1
        }
    }
    assert!(accepted > 50 && refused > 50, "{accepted} / {refused}");
}

/// Migration 000004 put shortcuts in front of the headers rule (`'{}'`, and a few lower-case
/// names with printable ASCII values judged on jsonb's text). A shortcut must never accept a set
/// the full rule (tidings.headers_are_valid) refuses; sets near its edges, each judged by the
/// table's CHECK and by the function alone.
#[tokio::test]
async fn the_headers_check_shortcut_never_accepts_what_the_full_rule_refuses() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let long = "a".repeat(4090);
    let cases: Vec<serde_json::Value> = vec![
        serde_json::json!({}),
        serde_json::json!({"content-type": "application/json"}),
        serde_json::json!({"content-type": "a", "traceparent": "00-ab-01", "baggage": "k=v"}),
        serde_json::json!({"content-type": "a\"b"}),
        serde_json::json!({"content-type": "a\\b"}),
        serde_json::json!({"content-type": "a\tb"}),
        serde_json::json!({"content-type": "a\nb"}),
        serde_json::json!({"content-type": "a\\\nb"}),
        serde_json::json!({"content-type": "a\u{1}b"}),
        serde_json::json!({"content-type": "a\u{7f}b"}),
        serde_json::json!({"content-type": "a\u{85}b"}),
        serde_json::json!({"content-type": "a\u{a0}b"}),
        serde_json::json!({"content-type": "é"}),
        serde_json::json!({"content-type": "a\": 1"}),
        serde_json::json!({"content-type": 1}),
        serde_json::json!({"content-type": null}),
        serde_json::json!({"content-type": true}),
        serde_json::json!({"content-type": []}),
        serde_json::json!({"content-type": {"a": "b"}}),
        serde_json::json!({"content-type": long.clone()}),
        serde_json::json!({"content-type": format!("{long}aaaaaaaaa")}),
        serde_json::json!({"Content-Type": "x"}),
        serde_json::json!({"content-type": "a", "tidings-x": "b"}),
        serde_json::json!({"content-type": "a", "host": "b"}),
        serde_json::json!({"content-type": "a", "x-note": "b"}),
        serde_json::json!(["content-type"]),
        serde_json::json!([]),
        serde_json::json!("content-type"),
        serde_json::json!(1),
        serde_json::json!(null),
    ];
    for h in cases {
        let full: bool = c
            .query_one("SELECT tidings.headers_are_valid($1)", &[&h])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            schema_accepts_json(&mut c, h.clone()).await,
            full,
            "the CHECK and tidings.headers_are_valid disagree on {h}"
        );
    }
}

async fn schema_accepts_json(c: &mut tokio_postgres::Client, h: serde_json::Value) -> bool {
    schema_accepts(c, "t", None, None, &h).await
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 100,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        claim_timeout: Duration::from_secs(5),
        publish_timeout: Duration::from_secs(2),
        max_attempts: 3,
        ..Default::default()
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_strings_through_every_sql_entry_point_end_delivered_or_dead_lettered() {
    let db = TestDb::migrated().await;
    let nats = NatsServer::start().await;
    let c = db.client().await;
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut written = 0i64;
    for i in 0..300 {
        let topic = if rng.random_bool(0.7) {
            "hostile.t".to_owned()
        } else {
            random_string(&mut rng)
        };
        let opt = |rng: &mut StdRng| rng.random_bool(0.6).then(|| random_string(rng));
        let (key, biz) = (opt(&mut rng), opt(&mut rng));
        let mut h = serde_json::Map::new();
        for _ in 0..rng.random_range(0..3) {
            let v = match rng.random_range(0..6) {
                0 => serde_json::json!(1e300),
                1 => serde_json::json!(null),
                2 => serde_json::json!({"nested": "x"}),
                _ => serde_json::json!(random_string(&mut rng)),
            };
            h.insert(random_header_name(&mut rng), v);
        }
        let headers = serde_json::Value::Object(h);
        let payload: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
        let ok = if i % 2 == 0 {
            c.execute(
                "SELECT tidings.enqueue($1, $2, biz_id => $3, key => $4, headers => $5)",
                &[&topic, &serde_json::json!({"i": i}), &biz, &key, &headers],
            )
            .await
        } else {
            c.execute(
                "INSERT INTO tidings.outbox (id, topic, ordering_key, biz_id, payload, headers, deliver_at) \
                 VALUES (gen_random_uuid(), $1, $2, $3, $4, $5, now())",
                &[&topic, &key, &biz, &payload, &headers],
            )
            .await
        };
        if ok.is_ok() {
            written += 1;
        }
    }
    assert!(
        written > 30,
        "seed {seed}: too few accepted rows ({written}) to test the relay"
    );
    let relay = Relay::new(pool(&db, 2), nats_sink(&nats).await, relay_config()).unwrap();
    let total = drain(&relay, &db).await;
    let dead = count(&db, "SELECT count(*) FROM tidings.dead_letters").await;
    assert_eq!(
        total.delivered as i64 + dead,
        written,
        "seed {seed}: every accepted row is delivered or dead-lettered: {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_from_before_the_rules_are_dead_lettered_and_cannot_wedge_the_relay() {
    let db = TestDb::migrated().await;
    let nats = NatsServer::start().await;
    let c = db.client().await;
    // What a database upgraded with poison rows already in it (the constraints are NOT VALID),
    // or a table owner who dropped a rule, can hold.
    c.batch_execute(
        "ALTER TABLE tidings.outbox DROP CONSTRAINT biz_id_1_to_512_bytes_without_control_characters;
         ALTER TABLE tidings.outbox DROP CONSTRAINT headers_string_values_token_names_none_reserved;
         ALTER TABLE tidings.outbox DROP CONSTRAINT attempts_between_0_and_1000000;
         DROP INDEX tidings.outbox_id_key;
         INSERT INTO tidings.outbox (id, topic, biz_id, payload) VALUES (gen_random_uuid(), 't', E'pay_1\\nX', 'a');
         INSERT INTO tidings.outbox (id, topic, payload, headers) VALUES (gen_random_uuid(), 't', 'b', '{\"a\": \"x\\ny\"}');
         INSERT INTO tidings.outbox (id, topic, payload, headers) VALUES (gen_random_uuid(), 't', 'c', '{\"Nats-Rollup\": \"all\"}');
         INSERT INTO tidings.outbox (id, topic, payload, headers) VALUES (gen_random_uuid(), 't', 'd', '{\"n\": 1e400}');
         INSERT INTO tidings.outbox (id, topic, payload, headers) VALUES (gen_random_uuid(), 't', 'e', '{\"bad name\": \"v\"}');
         INSERT INTO tidings.outbox (id, topic, payload, headers, attempts) VALUES (gen_random_uuid(), 't', 'f', '{\"a b\": \"v\"}', 2147483647);
         INSERT INTO tidings.outbox (id, topic, biz_id, payload) VALUES ('0190a000-0000-7000-8000-000000000001', 't', E'x\\ry', 'g1'),
                                                                        ('0190a000-0000-7000-8000-000000000001', 't', E'x\\ry', 'g2');",
    )
    .await
    .unwrap();
    let poison = 8;
    db.enqueue(
        (0..20)
            .map(|i| Message::new("good", format!("{i}")))
            .collect(),
    )
    .await;
    let relay = Relay::new(pool(&db, 2), nats_sink(&nats).await, relay_config()).unwrap();
    let total = drain(&relay, &db).await;
    assert_eq!(total.delivered, 20, "{total:?}");
    assert!(
        total.claimed <= 20 + poison + 10,
        "no batch is published again and again: {total:?}"
    );
    assert_eq!(
        tidings_tests::stream_len(&nats.url, "TIDINGS").await,
        20,
        "each good message reached the stream once"
    );
    let dead: Vec<(String, String)> = c
        .query("SELECT reason, last_error FROM tidings.dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The two rows sharing an id share one dead-letter row (its primary key).
    assert_eq!(dead.len(), poison - 1, "{dead:?}");
    assert!(
        dead.iter().all(|(reason, _)| reason == "permanent"),
        "{dead:?}"
    );
}

/// Fails every publish of biz-id `boom` retryably; everything else goes to the real sink.
struct FailBoom(Arc<NatsSink>);

impl Sink for FailBoom {
    fn name(&self) -> &'static str {
        "fail-boom"
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            if msg.biz_id.as_deref() == Some("boom") {
                return Err(SinkError::Retryable("injected".into()));
            }
            self.0.publish(msg).await
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_whose_outcome_cannot_be_recorded_is_isolated_not_republished_forever() {
    let db = TestDb::migrated().await;
    let nats = NatsServer::start().await;
    let c = db.client().await;
    // Recording a retry of `boom` fails (a rule the relay cannot see, here a trigger).
    c.batch_execute(
        "CREATE FUNCTION pg_temp_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.biz_id = 'boom' THEN RAISE EXCEPTION 'refused by a trigger'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON tidings.outbox FOR EACH ROW EXECUTE FUNCTION pg_temp_refuse();",
    )
    .await
    .unwrap();
    let mut msgs: Vec<Message> = (0..19).map(|i| Message::new("t", format!("{i}"))).collect();
    msgs.insert(7, Message::new("t", "boom").biz_id("boom"));
    db.enqueue(msgs).await;
    let relay = Relay::new(
        pool(&db, 2),
        Arc::new(FailBoom(nats_sink(&nats).await)),
        relay_config(),
    )
    .unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!(
        (r.delivered, r.isolated, r.dead_lettered),
        (19, 1, 1),
        "{r:?}"
    );
    assert_eq!(db.outbox_count().await, 0);
    assert_eq!(relay.tick().await.unwrap().claimed, 0);
    assert_eq!(tidings_tests::stream_len(&nats.url, "TIDINGS").await, 19);
    let err: String = c
        .query_one(
            "SELECT last_error FROM tidings.dead_letters WHERE biz_id = 'boom'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(err.contains("refused by a trigger"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_database_error_fails_the_tick_and_never_dead_letters() {
    let db = TestDb::migrated().await;
    let nats = NatsServer::start().await;
    let c = db.client().await;
    // Recording the retry of `boom` hits a serialization failure (SQLSTATE 40001): the
    // database's state, not the row's data. Nothing may be dead-lettered for it.
    c.batch_execute(
        "CREATE FUNCTION pg_temp_busy() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.biz_id = 'boom' THEN RAISE EXCEPTION 'busy' USING ERRCODE = '40001'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER busy BEFORE UPDATE ON tidings.outbox FOR EACH ROW EXECUTE FUNCTION pg_temp_busy();",
    )
    .await
    .unwrap();
    let mut msgs: Vec<Message> = (0..5).map(|i| Message::new("t", format!("{i}"))).collect();
    msgs.push(Message::new("t", "boom").biz_id("boom"));
    db.enqueue(msgs).await;
    let relay = Relay::new(
        pool(&db, 2),
        Arc::new(FailBoom(nats_sink(&nats).await)),
        relay_config(),
    )
    .unwrap();
    assert!(relay.tick().await.is_err(), "the tick fails and rolls back");
    assert_eq!(db.outbox_count().await, 6, "nothing recorded, nothing lost");
    assert_eq!(
        count(&db, "SELECT count(*) FROM tidings.dead_letters").await,
        0
    );
    // Once the database is fine again, the batch is recorded; the broker dropped the re-sends.
    c.batch_execute("DROP TRIGGER busy ON tidings.outbox")
        .await
        .unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!((r.delivered, r.retried, r.duplicates), (5, 1, 5), "{r:?}");
    assert_eq!(tidings_tests::stream_len(&nats.url, "TIDINGS").await, 5);
}
