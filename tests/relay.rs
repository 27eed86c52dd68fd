//! The relay against real PostgreSQL and a real nats-server (each test starts its own), driven
//! one `tick()` at a time unless the run loop itself is under test.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::future::BoxFuture;
use tidings_outbox::{Message, Outbox};
use tidings_relay::sink::{NatsSink, NatsSinkConfig};
use tidings_relay::{Delivery, Envelope, Relay, RelayConfig, Sink, SinkError, TickReport};
use tidings_tests::{drain, eventually, nats_sink, pool, NatsServer, TestDb};
use tokio_util::sync::CancellationToken;

fn fast_config() -> RelayConfig {
    RelayConfig {
        batch_size: 200,
        poll_interval: Duration::from_millis(50),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(40),
        claim_timeout: Duration::from_secs(5),
        publish_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

/// Every message in the TIDINGS stream, in stream order: (message id header, key header, payload).
async fn read_stream(url: &str) -> Vec<(String, Option<String>, String)> {
    tidings_tests::stream_messages(url, "TIDINGS")
        .await
        .into_iter()
        .map(|m| {
            let h = m.headers.clone().unwrap_or_default();
            (
                h.get("Nats-Msg-Id").unwrap().to_string(),
                h.get("Tidings-Key").map(|v| v.to_string()),
                String::from_utf8(m.payload.to_vec()).unwrap(),
            )
        })
        .collect()
}

type FaultRule = Box<dyn Fn(&Envelope) -> Option<Fault> + Send + Sync>;

/// Wraps a real sink, counts publishes, and injects failures chosen by `fail`.
struct Faulty<S> {
    inner: Arc<S>,
    publishes: AtomicUsize,
    fail: FaultRule,
}

#[derive(Clone, Copy)]
enum Fault {
    /// Fails before sending.
    Before,
    /// Sends, then reports a failure (a lost ack): the re-send is a duplicate.
    LostAck,
    Permanent,
}

impl<S: Sink> Faulty<S> {
    fn new(
        inner: Arc<S>,
        fail: impl Fn(&Envelope) -> Option<Fault> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Faulty {
            inner,
            publishes: AtomicUsize::new(0),
            fail: Box::new(fail),
        })
    }
}

impl<S: Sink> Sink for Faulty<S> {
    fn name(&self) -> &'static str {
        "faulty"
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            self.publishes.fetch_add(1, Ordering::SeqCst);
            match (self.fail)(msg) {
                Some(Fault::Before) => Err(SinkError::Retryable("injected failure".into())),
                Some(Fault::Permanent) => Err(SinkError::Permanent("injected rejection".into())),
                Some(Fault::LostAck) => {
                    self.inner.publish(msg).await?;
                    Err(SinkError::Retryable("injected lost ack".into()))
                }
                None => self.inner.publish(msg).await,
            }
        })
    }
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        self.inner.check()
    }
}

fn numbered(n: usize, keys: Option<usize>) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let m = Message::new("orders.created", format!("{i}")).biz_id(format!("order-{i}"));
            match keys {
                Some(k) => m.key(format!("k{}", i % k)),
                None => m,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn n_messages_are_delivered_exactly_once_with_their_envelope() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    db.enqueue(numbered(2000, None)).await;
    let c = db.client().await;
    Outbox::default()
        .enqueue_pg(
            &c,
            &Message::new("payment.succeeded", "{}")
                .biz_id("pay_1")
                .key("cust_1")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
        )
        .await
        .unwrap();
    let relay = Relay::new(pool(&db, 2), nats_sink(&nats).await, fast_config()).unwrap();
    let total = drain(&relay, &db).await;
    assert_eq!(
        (total.delivered, total.duplicates, total.retried),
        (2001, 0, 0)
    );

    let got = read_stream(&nats.url).await;
    assert_eq!(got.len(), 2001);
    let ids: HashSet<_> = got.iter().map(|g| g.0.clone()).collect();
    assert_eq!(ids.len(), 2001, "every message once");
    // The envelope: subject, Nats-Msg-Id, Tidings-* headers and traceparent.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let stream = jetstream::new(client).get_stream("TIDINGS").await.unwrap();
    let last = stream
        .get_last_raw_message_by_subject("tidings.payment.succeeded")
        .await
        .unwrap();
    let h = last.headers;
    assert_eq!(h.get("Tidings-Biz-Id").unwrap().as_str(), "pay_1");
    assert_eq!(h.get("Tidings-Key").unwrap().as_str(), "cust_1");
    assert_eq!(
        h.get("Tidings-Topic").unwrap().as_str(),
        "payment.succeeded"
    );
    assert_eq!(
        h.get("Nats-Msg-Id").unwrap().as_str(),
        h.get("Tidings-Message-Id").unwrap().as_str()
    );
    assert!(h
        .get("traceparent")
        .unwrap()
        .as_str()
        .starts_with("00-4bf92f35"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rolled_back_messages_are_never_delivered() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    Outbox::default()
        .enqueue_batch_pg(&tx, &numbered(10, None))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // An open (uncommitted) transaction's rows are invisible too.
    let open = c.transaction().await.unwrap();
    Outbox::default()
        .enqueue_pg(&open, &Message::new("late", "x"))
        .await
        .unwrap();
    let mut other = db.client().await;
    let tx2 = other.transaction().await.unwrap();
    Outbox::default()
        .enqueue_pg(&tx2, &Message::new("kept", "1"))
        .await
        .unwrap();
    tx2.commit().await.unwrap();

    let relay = Relay::new(pool(&db, 2), nats_sink(&nats).await, fast_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!((r.claimed, r.delivered), (1, 1));
    open.rollback().await.unwrap();
    assert_eq!(relay.tick().await.unwrap().claimed, 0);
    let got = read_stream(&nats.url).await;
    assert_eq!(got.iter().map(|g| g.2.as_str()).collect::<Vec<_>>(), ["1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_messages_are_not_delivered_before_their_time() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    db.enqueue(vec![
        Message::new("later", "a").delay(Duration::from_secs(3600)),
        Message::new("later", "b").deliver_at(chrono::Utc::now() + chrono::Duration::hours(2)),
        Message::new("now", "c"),
    ])
    .await;
    let relay = Relay::new(pool(&db, 2), nats_sink(&nats).await, fast_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!((r.claimed, r.delivered), (1, 1));
    assert_eq!(
        relay.tick().await.unwrap().claimed,
        0,
        "not before their time"
    );
    // Let the clock "pass" the first one's time without sleeping: move it into the past.
    db.client()
        .await
        .execute("UPDATE tidings.outbox SET deliver_at = now() - interval '1 second' WHERE payload = 'a'", &[])
        .await
        .unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!((r.claimed, r.delivered), (1, 1));
    assert_eq!(db.outbox_count().await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_down_then_up_backs_off_then_delivers_the_backlog() {
    let (db, mut nats) = (TestDb::migrated().await, NatsServer::start().await);
    let relay = Relay::new(pool(&db, 2), nats_sink(&nats).await, fast_config()).unwrap();
    db.enqueue(numbered(300, Some(7))).await;
    nats.stop();
    let sink_down = |r: &TickReport| r.sink_unavailable && r.delivered == 0;
    let mut pauses = Vec::new();
    for _ in 0..4 {
        let r = relay.tick().await.unwrap();
        assert!(sink_down(&r), "{r:?}");
        pauses.push(relay.sink_backoff().unwrap());
    }
    assert_eq!(
        pauses,
        [500, 1000, 2000, 4000].map(Duration::from_millis),
        "the relay backs off, doubling, while the broker is down"
    );
    // An outage is not the messages' fault: no attempts are burnt, nothing dead-lettered.
    let c = db.client().await;
    let attempts: i64 = c
        .query_one("SELECT coalesce(sum(attempts), 0) FROM tidings.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 0);

    nats.restart().await;
    let delivered = AtomicUsize::new(0);
    eventually(
        "the backlog to be delivered after NATS restarts",
        Duration::from_secs(30),
        || async {
            delivered.fetch_add(relay.tick().await.unwrap().delivered, Ordering::SeqCst);
            db.outbox_count().await == 0
        },
    )
    .await;
    assert_eq!(delivered.load(Ordering::SeqCst), 300);
    assert_eq!(relay.sink_backoff(), None);
    assert_eq!(read_stream(&nats.url).await.len(), 300);
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_message_is_retried_with_backoff_then_dead_lettered() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    let sink = Faulty::new(nats_sink(&nats).await, |m| match m.topic.as_str() {
        "poison" => Some(Fault::Before),
        "rejected" => Some(Fault::Permanent),
        _ => None,
    });
    let config = RelayConfig {
        max_attempts: 3,
        backoff_base: Duration::from_secs(60),
        backoff_max: Duration::from_secs(600),
        ..fast_config()
    };
    let relay = Relay::new(pool(&db, 2), sink, config).unwrap();
    db.enqueue(vec![
        Message::new("poison", "p").key("k"),
        Message::new("fine", "after-poison").key("k"),
        Message::new("rejected", "r"),
        Message::new("fine", "f"),
    ])
    .await;
    let c = db.client().await;
    let r = relay.tick().await.unwrap();
    assert_eq!(
        (r.delivered, r.retried, r.dead_lettered, r.released),
        (1, 1, 1, 1),
        "{r:?}"
    );
    let row = c
        .query_one(
            "SELECT attempts, last_error, extract(epoch FROM deliver_at - now())::float8 FROM tidings.outbox WHERE topic = 'poison'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert!(row.get::<_, String>(1).contains("injected failure"));
    let wait: f64 = row.get(2);
    assert!(
        (29.0..=61.0).contains(&wait),
        "first retry in 30-60 s, got {wait}"
    );
    assert_eq!(
        relay.tick().await.unwrap().claimed,
        0,
        "nothing due before the backoff; the key's next message waits behind its failed head"
    );

    for expected_attempts in [2, 3] {
        c.execute(
            "UPDATE tidings.outbox SET deliver_at = now() WHERE topic = 'poison'",
            &[],
        )
        .await
        .unwrap();
        let r = relay.tick().await.unwrap();
        assert_eq!(r.claimed, 2, "{r:?}");
        assert_eq!(
            r.released, 1,
            "the key's later message is not sent after its head failed"
        );
        if expected_attempts == 3 {
            assert_eq!(r.dead_lettered, 1);
        }
    }
    let dead = tidings_relay::dlq_list(&c, 10).await.unwrap();
    let by_topic: BTreeMap<_, _> = dead.iter().map(|d| (d.topic.as_str(), d)).collect();
    assert_eq!(by_topic["poison"].reason, "max_attempts");
    assert_eq!(by_topic["poison"].attempts, 3);
    assert!(by_topic["poison"].last_error.contains("injected failure"));
    assert_eq!(by_topic["rejected"].reason, "permanent");
    assert_eq!(by_topic["rejected"].attempts, 1);
    // With the poison message out of the way, its key flows again.
    let r = relay.tick().await.unwrap();
    assert_eq!(r.delivered, 1);
    assert_eq!(db.outbox_count().await, 0);

    // Replay puts it back with the same id; purge removes the other.
    let poison_id = by_topic["poison"].id;
    assert_eq!(
        tidings_relay::dlq_replay(&c, Some(&[poison_id]))
            .await
            .unwrap(),
        1
    );
    let back: uuid::Uuid = c
        .query_one("SELECT id FROM tidings.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(back, poison_id);
    assert_eq!(tidings_relay::dlq_purge(&c, None).await.unwrap(), 1);
    let s = tidings_relay::status(&c).await.unwrap();
    assert_eq!((s.backlog, s.dead_letters), (1, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_payload_for_the_broker_is_dead_lettered_at_once() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    // nats-server's default max_payload is 1 MiB; the outbox allows up to 4 MiB here.
    let outbox = Outbox::new(tidings_outbox::OutboxConfig {
        max_payload_bytes: 4 << 20,
        ..Default::default()
    })
    .unwrap();
    let c = db.client().await;
    outbox
        .enqueue_pg(&c, &Message::new("big", vec![b'x'; 2 << 20]))
        .await
        .unwrap();
    let relay = Relay::new(pool(&db, 2), nats_sink(&nats).await, fast_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!(r.dead_lettered, 1, "{r:?}");
    let d = &tidings_relay::dlq_list(&c, 1).await.unwrap()[0];
    assert_eq!(d.reason, "permanent");
    assert!(d.last_error.contains("max payload"), "{}", d.last_error);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_at_once_never_publish_a_message_twice() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    db.enqueue(numbered(4000, None)).await;
    let sink = Faulty::new(nats_sink(&nats).await, |_| None);
    let a = Relay::new(pool(&db, 2), sink.clone(), fast_config()).unwrap();
    let b = Relay::new(pool(&db, 2), sink.clone(), fast_config()).unwrap();
    let (ra, rb) = tokio::join!(drain(&a, &db), drain(&b, &db));
    assert!(
        ra.delivered > 0 && rb.delivered > 0,
        "both relays worked: {ra:?} {rb:?}"
    );
    assert_eq!(ra.delivered + rb.delivered, 4000);
    assert_eq!(
        sink.publishes.load(Ordering::SeqCst),
        4000,
        "no message was published twice"
    );
    assert_eq!(ra.duplicates + rb.duplicates, 0);
    assert_eq!(read_stream(&nats.url).await.len(), 4000);
}

/// A crash after publishing but before recording delivery: the batch is re-sent, and JetStream
/// recognises every re-send by its Nats-Msg-Id.
#[tokio::test(flavor = "multi_thread")]
async fn crash_after_publish_resends_and_jetstream_drops_the_duplicates() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    db.enqueue(numbered(100, Some(10))).await;
    let published = Arc::new(tokio::sync::Notify::new());
    let inner = nats_sink(&nats).await;
    let count = Arc::new(AtomicUsize::new(0));
    let (p2, c2) = (published.clone(), count.clone());
    let sink = Faulty::new(inner, move |_| {
        if c2.fetch_add(1, Ordering::SeqCst) + 1 == 100 {
            p2.notify_one();
        }
        None
    });
    let relay = Relay::new(
        pool(&db, 2),
        sink,
        RelayConfig {
            batch_size: 100,
            // Room for every chain of 10 to publish in one tick (a chain starts its next message
            // only while a publish and a health check still fit in the claim).
            claim_timeout: Duration::from_secs(10),
            ..fast_config()
        },
    )
    .unwrap();
    // Abandon the tick the moment all 100 are published: its transaction never commits.
    tokio::select! {
        r = relay.tick() => panic!("the tick should have been cut off: {r:?}"),
        _ = published.notified() => {}
    }
    assert_eq!(
        db.outbox_count().await,
        100,
        "nothing was recorded as delivered"
    );
    let fresh = Relay::new(pool(&db, 2), nats_sink(&nats).await, fast_config()).unwrap();
    let total = drain(&fresh, &db).await;
    assert_eq!(
        (total.delivered, total.duplicates),
        (100, 100),
        "every re-send was a duplicate"
    );
    assert_eq!(read_stream(&nats.url).await.len(), 100);
}

/// Per-key order with two relays, 100 keys and injected failures (before send and lost acks).
#[tokio::test(flavor = "multi_thread")]
async fn per_key_order_holds_with_two_relays_100_keys_and_failures() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    let n = 3000;
    // Payload "<key>:<index within key>".
    let msgs: Vec<Message> = (0..n)
        .map(|i| {
            Message::new("orders.updated", format!("k{}:{}", i % 100, i / 100))
                .key(format!("k{}", i % 100))
        })
        .collect();
    // Two producers interleave their commits.
    let (first, second) = msgs.split_at(n / 2);
    db.enqueue(first.to_vec()).await;
    let inner = nats_sink(&nats).await;
    let sink = Faulty::new(inner, |_| match rand::random::<u8>() % 20 {
        0 => Some(Fault::Before),
        1 => Some(Fault::LostAck),
        _ => None,
    });
    let config = RelayConfig {
        batch_size: 150,
        ..fast_config()
    };
    let a = Relay::new(pool(&db, 2), sink.clone(), config.clone()).unwrap();
    let b = Relay::new(pool(&db, 2), sink.clone(), config).unwrap();
    let produce = async {
        for chunk in second.chunks(100) {
            Outbox::default()
                .enqueue_batch_pg(&db.client().await, chunk)
                .await
                .unwrap();
        }
    };
    let (ra, rb, ()) = tokio::join!(drain(&a, &db), drain(&b, &db), produce);
    let (ra, rb) = if db.outbox_count().await > 0 {
        // The producer may have finished after both drains saw an empty outbox.
        (drain(&a, &db).await, rb)
    } else {
        (ra, rb)
    };
    assert!(ra.retried + rb.retried > 0, "failures were injected");
    let got = read_stream(&nats.url).await;
    assert_eq!(got.len(), n, "each message exactly once in the stream");
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    for (_, key, payload) in &got {
        let (k, idx) = payload.split_once(':').unwrap();
        assert_eq!(key.as_deref(), Some(k));
        let idx: usize = idx.parse().unwrap();
        let want = next.entry(k.to_owned()).or_insert(0);
        assert_eq!(idx, *want, "key {k} out of order");
        *want += 1;
    }
    assert_eq!(next.len(), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_loop_wakes_on_notify_without_polling() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    let config = RelayConfig {
        poll_interval: Duration::from_secs(3600),
        ..fast_config()
    };
    let pg: tokio_postgres::Config = db.url.parse().unwrap();
    let relay = Arc::new(
        Relay::new(pool(&db, 2), nats_sink(&nats).await, config)
            .unwrap()
            .with_listener(pg, tokio_postgres::NoTls),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    // The run loop ticks once at start; a message committed afterwards is only found through
    // NOTIFY, since the poll interval is an hour.
    eventually("the relay to register", Duration::from_secs(10), || async {
        tidings_relay::status(&db.client().await)
            .await
            .unwrap()
            .relays
            .len()
            == 1
    })
    .await;
    // Producers opt in to NOTIFY (off by default: it costs producers throughput).
    let producer = db.client().await;
    producer
        .batch_execute("SET tidings.notify = on")
        .await
        .unwrap();
    Outbox::default()
        .enqueue_batch_pg(&producer, &numbered(5, None))
        .await
        .unwrap();
    eventually(
        "delivery woken by NOTIFY",
        Duration::from_secs(10),
        || async { db.outbox_count().await == 0 },
    )
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        tidings_relay::status(&db.client().await)
            .await
            .unwrap()
            .relays
            .is_empty(),
        "deregistered on shutdown"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_loop_without_notifications_delivers_by_polling() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    let config = RelayConfig {
        listen: false,
        poll_interval: Duration::from_millis(100),
        vacuum_every: 5,
        ..fast_config()
    };
    let pg: tokio_postgres::Config = db.url.parse().unwrap();
    let relay = Arc::new(
        Relay::new(pool(&db, 2), nats_sink(&nats).await, config)
            .unwrap()
            .with_listener(pg, tokio_postgres::NoTls),
    );
    // Producers' NOTIFY is off (the default): nothing would arrive anyway.
    let c = db.client().await;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    Outbox::default()
        .enqueue_batch_pg(&c, &numbered(5, None))
        .await
        .unwrap();
    eventually("delivery by polling", Duration::from_secs(10), || async {
        db.outbox_count().await == 0
    })
    .await;
    // 5 rows left the outbox, vacuum_every is 5: the run loop vacuums the table itself
    // (autovacuum may be off, as on the CI machine, or a minute away).
    eventually("the relay to VACUUM the outbox", Duration::from_secs(10), || async {
        let n: i64 = c
            .query_one(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'tidings.outbox'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n > 0
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn run_refuses_to_start_on_an_unmigrated_database() {
    let db = TestDb::empty().await;
    let relay = Relay::new(
        pool(&db, 1),
        Arc::new(tidings_relay::sink::StdoutSink::default()),
        fast_config(),
    )
    .unwrap();
    let err = relay.run(CancellationToken::new()).await.unwrap_err();
    assert!(
        err.to_string().contains("run `tidings migrate up`"),
        "{err}"
    );
}

#[tokio::test]
async fn every_relay_statement_prepares_against_the_schema() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    for sql in tidings_relay::STATEMENTS
        .iter()
        .chain(tidings_relay::ADMIN_STATEMENTS)
    {
        c.prepare(sql)
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{sql}"));
    }
}

#[tokio::test]
async fn missing_stream_is_a_clear_error_not_a_hang() {
    let nats = NatsServer::start().await;
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        NatsSink::connect(NatsSinkConfig {
            url: nats.url.clone(),
            stream: tidings_relay::sink::StreamSetup::Existing,
            ..Default::default()
        }),
    )
    .await
    .expect("no hang");
    let err = res.err().unwrap().to_string();
    assert!(
        err.contains("no JetStream stream captures subjects tidings.>"),
        "{err}"
    );
}

/// Slow acks on one key must not stretch a batch past the claim timeout (PostgreSQL would end
/// the claim while this relay still publishes, and another relay would take the same rows):
/// the chain stops starting messages in time, and the rest waits for the next batch.
#[tokio::test(flavor = "multi_thread")]
async fn slow_keyed_publishes_stop_in_time_to_finish_inside_the_claim_timeout() {
    struct Slow(Arc<NatsSink>);
    impl Sink for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                self.0.publish(msg).await
            })
        }
    }
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    db.enqueue(numbered(3, Some(1))).await;
    let config = RelayConfig {
        claim_timeout: Duration::from_secs(3),
        publish_timeout: Duration::from_secs(1),
        ..fast_config()
    };
    let relay = Relay::new(pool(&db, 2), Arc::new(Slow(nats_sink(&nats).await)), config).unwrap();
    let started = std::time::Instant::now();
    let r = relay.tick().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!((r.delivered, r.released), (1, 2), "{r:?}");
    let r = relay.tick().await.unwrap();
    assert_eq!(r.delivered, 1, "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_broker_burns_no_attempts_and_dead_letters_nothing() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    // The whole retry horizon (3 attempts, backoff up to 20 ms) is far shorter than the freeze.
    let config = RelayConfig {
        max_attempts: 3,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        publish_timeout: Duration::from_secs(1),
        claim_timeout: Duration::from_secs(4),
        ..fast_config()
    };
    let relay = Relay::new(pool(&db, 2), nats_sink(&nats).await, config).unwrap();
    db.enqueue(numbered(60, Some(6))).await;
    nats.signal("-STOP");
    let frozen = tokio::time::Instant::now();
    let mut ticks = 0;
    while frozen.elapsed() < Duration::from_secs(5) {
        let r = relay.tick().await.unwrap();
        assert!(
            r.sink_unavailable && r.retried == 0 && r.dead_lettered == 0 && r.delivered == 0,
            "a frozen broker is an outage: {r:?}"
        );
        ticks += 1;
    }
    assert!(ticks >= 2, "{ticks}");
    let c = db.client().await;
    let attempts: i64 = c
        .query_one("SELECT coalesce(sum(attempts), 0) FROM tidings.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 0, "no attempt counted during the outage");
    nats.signal("-CONT");
    eventually(
        "the backlog after SIGCONT",
        Duration::from_secs(60),
        || async {
            let _ = relay.tick().await.unwrap();
            db.outbox_count().await == 0
        },
    )
    .await;
    let dead: i64 = c
        .query_one("SELECT count(*) FROM tidings.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
    let stream = read_stream(&nats.url).await;
    let ids: HashSet<&String> = stream.iter().map(|(id, _, _)| id).collect();
    assert_eq!((stream.len(), ids.len()), (60, 60), "each message once");
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for (_, key, payload) in &stream {
        let n: i64 = payload.parse().unwrap();
        let prev = last.insert(key.clone().unwrap(), n);
        assert!(
            prev.is_none_or(|p| p < n),
            "order of {key:?}: {prev:?} then {n}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_streams_max_msg_size_is_dead_lettered_as_permanent() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    let client = async_nats::connect(&nats.url).await.unwrap();
    jetstream::new(client)
        .create_stream(jetstream::stream::Config {
            name: "SMALL".into(),
            subjects: vec!["tidings.>".into()],
            max_message_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    db.enqueue(vec![
        Message::new("big", vec![b'x'; 5000]),
        Message::new("small", "ok"),
    ])
    .await;
    let relay = Relay::new(pool(&db, 2), nats_sink(&nats).await, fast_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!(
        (r.delivered, r.dead_lettered, r.retried),
        (1, 1, 0),
        "{r:?}"
    );
    let d = &tidings_relay::dlq_list(&db.client().await, 1)
        .await
        .unwrap()[0];
    assert_eq!(d.reason, "permanent", "{d:?}");
    assert_eq!(d.attempts, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dedup_window_shorter_than_the_resend_horizon_is_refused_at_start() {
    let nats = NatsServer::start().await;
    let db = TestDb::migrated().await;
    let sink = Arc::new(
        NatsSink::connect(NatsSinkConfig {
            url: nats.url.clone(),
            stream: tidings_relay::sink::StreamSetup::Create {
                name: "SHORT".into(),
                duplicate_window: Duration::from_secs(10),
            },
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    assert_eq!(
        sink.capabilities().dedup_window,
        Some(Duration::from_secs(10))
    );
    let err = Relay::new(pool(&db, 1), sink.clone(), RelayConfig::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("dedup window") && err.contains("10s") && err.contains("backoff_max"),
        "{err}"
    );
    // Inside the window: accepted.
    let short = RelayConfig {
        backoff_max: Duration::from_secs(1),
        claim_timeout: Duration::from_secs(5),
        publish_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    assert!(Relay::new(pool(&db, 1), sink, short).is_ok());
    // The defaults are consistent with the window of a stream Tidings creates by default.
    let fresh = NatsServer::start().await;
    assert!(Relay::new(
        pool(&db, 1),
        nats_sink(&fresh).await,
        RelayConfig::default()
    )
    .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_of_only_held_back_rows_waits_a_poll_interval_not_a_busy_tick() {
    let db = TestDb::migrated().await;
    db.enqueue(vec![
        Message::new("t", "1").key("k"),
        Message::new("t", "2").key("k"),
    ])
    .await;
    // Another session holds the key's head: the relay can claim only the second row, which is
    // held back behind it.
    let mut other = db.client().await;
    let tx = other.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM tidings.outbox WHERE seq = (SELECT min(seq) FROM tidings.outbox) FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let relay = Arc::new(
        Relay::new(
            pool(&db, 2),
            Arc::new(tidings_relay::sink::StdoutSink::new(Box::new(
                std::io::sink(),
            ))),
            RelayConfig {
                poll_interval: Duration::from_millis(100),
                busy_poll_interval: Duration::from_millis(2),
                listen: false,
                ..fast_config()
            },
        )
        .unwrap(),
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    // A measurement window, not a wait for work: count the claims made in one second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ticks = relay.ticks();
    stop.cancel();
    run.await.unwrap().unwrap();
    assert!(
        (3..=30).contains(&ticks),
        "about 10 claims a second at a 100 ms poll interval, not hundreds: {ticks}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(db.outbox_count().await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_counts_age_from_first_due_and_shows_dead_relays() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO tidings.outbox (id, topic, payload, deliver_at)
         VALUES (gen_random_uuid(), 'late', 'x', now() - interval '1 hour');
         INSERT INTO tidings.relays (id, name, host, pid, sink, heartbeat_at, heartbeat_interval_secs)
         VALUES (gen_random_uuid(), 'gone-a-minute', 'h', 1, 'nats', now() - interval '1 minute', 5),
                (gen_random_uuid(), 'gone-for-hours', 'h', 2, 'nats', now() - interval '3 hours', 5);",
    )
    .await
    .unwrap();
    // The message fails and waits for its retry: its age still counts from when it was due.
    let sink = Faulty::new(nats_sink(&nats).await, |_| Some(Fault::Before));
    let relay = Relay::new(
        pool(&db, 2),
        sink,
        RelayConfig {
            backoff_base: Duration::from_secs(30),
            backoff_max: Duration::from_secs(30),
            ..fast_config()
        },
    )
    .unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!(r.retried, 1, "{r:?}");
    let s = tidings_relay::status(&c).await.unwrap();
    assert_eq!((s.backlog, s.ready, s.retrying), (1, 0, 1));
    let age = s.oldest_ready_age_secs.unwrap();
    assert!(
        age >= 3599.0,
        "age from first due, not from the retry: {age}"
    );
    // The relay's heartbeat removed the long-dead row; the recent one is shown dead.
    let by_name: BTreeMap<String, bool> =
        s.relays.iter().map(|r| (r.name.clone(), r.alive)).collect();
    assert_eq!(by_name.get("gone-a-minute"), Some(&false), "{by_name:?}");
    assert!(!by_name.contains_key("gone-for-hours"), "{by_name:?}");
    assert_eq!(
        by_name.get(&relay.config().name),
        Some(&true),
        "{by_name:?}"
    );
}

/// A sink for the contract tests: answers each message with `answer`, records the size of every
/// `publish_batch` call, and counts `close` calls.
type Answer = Box<dyn Fn(&Envelope) -> Result<Delivery, SinkError> + Send + Sync>;

struct Contract {
    answer: Answer,
    in_flight: bool,
    rounds: std::sync::Mutex<Vec<usize>>,
    closed: AtomicUsize,
}

impl Contract {
    fn new(
        in_flight: bool,
        answer: impl Fn(&Envelope) -> Result<Delivery, SinkError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Contract {
            answer: Box::new(answer),
            in_flight,
            rounds: Default::default(),
            closed: AtomicUsize::new(0),
        })
    }
}

impl Sink for Contract {
    fn name(&self) -> &'static str {
        "contract"
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move { (self.answer)(msg) })
    }
    fn publish_batch<'a>(
        &'a self,
        msgs: &'a [&'a Envelope],
    ) -> BoxFuture<'a, Vec<Result<Delivery, SinkError>>> {
        self.rounds.lock().unwrap().push(msgs.len());
        Box::pin(async move { msgs.iter().map(|m| (self.answer)(m)).collect() })
    }
    fn capabilities(&self) -> tidings_relay::Capabilities {
        tidings_relay::Capabilities {
            ordered_in_flight: self.in_flight,
            ..Default::default()
        }
    }
    fn close(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        self.closed.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_goes_one_at_a_time_unless_the_sink_keeps_order_in_flight() {
    for (in_flight, rounds) in [(false, vec![2, 1, 1, 1, 1]), (true, vec![6])] {
        let db = TestDb::migrated().await;
        let mut msgs: Vec<Message> = (0..5)
            .map(|i| Message::new("t", format!("{i}")).key("k"))
            .collect();
        msgs.push(Message::new("t", "unkeyed"));
        db.enqueue(msgs).await;
        let sink = Contract::new(in_flight, |_| Ok(Delivery::default()));
        let config = RelayConfig {
            claim_timeout: Duration::from_secs(10),
            ..fast_config()
        };
        let relay = Relay::new(pool(&db, 2), sink.clone(), config).unwrap();
        let r = relay.tick().await.unwrap();
        assert_eq!(r.delivered, 6, "{r:?}");
        assert_eq!(
            *sink.rounds.lock().unwrap(),
            rounds,
            "in_flight = {in_flight}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_hint_becomes_the_rows_next_attempt_time() {
    let db = TestDb::migrated().await;
    db.enqueue(vec![Message::new("t", "throttled")]).await;
    let sink = Contract::new(false, |_| {
        Err(SinkError::RetryAfter(
            Duration::from_secs(45),
            "429 Too Many Requests".into(),
        ))
    });
    let relay = Relay::new(
        pool(&db, 2),
        sink,
        RelayConfig {
            backoff_max: Duration::from_secs(60),
            ..fast_config()
        },
    )
    .unwrap();
    assert_eq!(relay.tick().await.unwrap().retried, 1);
    let wait: f64 = db
        .client()
        .await
        .query_one(
            "SELECT extract(epoch FROM deliver_at - now())::float8 FROM tidings.outbox",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (43.0..=46.0).contains(&wait),
        "next attempt in {wait} s, not 45"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sink_that_panics_on_one_message_fails_only_that_message() {
    let db = TestDb::migrated().await;
    db.enqueue(
        (0..5)
            .map(|i| Message::new("t", format!("{i}")).biz_id(format!("b{i}")))
            .collect(),
    )
    .await;
    let sink = Contract::new(false, |m| {
        if m.biz_id.as_deref() == Some("b3") {
            panic!("client library assertion");
        }
        Ok(Delivery::default())
    });
    let relay = Relay::new(pool(&db, 2), sink, fast_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!((r.delivered, r.dead_lettered), (4, 1), "{r:?}");
    let d = &tidings_relay::dlq_list(&db.client().await, 1)
        .await
        .unwrap()[0];
    assert_eq!(
        (d.biz_id.as_deref(), d.reason.as_str()),
        (Some("b3"), "permanent")
    );
    assert!(d.last_error.contains("panicked"), "{}", d.last_error);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_abandons_a_batch_that_outlives_the_deadline_and_closes_the_sink() {
    struct Stuck(Arc<Contract>);
    impl Sink for Stuck {
        fn name(&self) -> &'static str {
            "stuck"
        }
        fn publish<'a>(&'a self, _: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
            Box::pin(std::future::pending())
        }
        fn close(&self) -> BoxFuture<'_, Result<(), SinkError>> {
            self.0.close()
        }
    }
    let db = TestDb::migrated().await;
    db.enqueue(vec![Message::new("t", "x")]).await;
    let closes = Contract::new(false, |_| Ok(Delivery::default()));
    let relay = Arc::new(
        Relay::new(
            pool(&db, 2),
            Arc::new(Stuck(closes.clone())),
            RelayConfig {
                claim_timeout: Duration::from_secs(30),
                publish_timeout: Duration::from_secs(10),
                shutdown_timeout: Duration::from_millis(500),
                listen: false,
                ..fast_config()
            },
        )
        .unwrap(),
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    eventually(
        "the batch to be in flight",
        Duration::from_secs(10),
        || async { relay.ticks() > 0 },
    )
    .await;
    let asked = std::time::Instant::now();
    stop.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("run returns after the shutdown deadline")
        .unwrap();
    assert!(
        matches!(result, Err(tidings_relay::Error::ShutdownTimeout(_))),
        "{result:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        closes.closed.load(Ordering::SeqCst),
        1,
        "the sink was closed"
    );
    assert_eq!(
        db.outbox_count().await,
        1,
        "the abandoned row is still there"
    );
}

/// Counts the batch rounds being published at once (each waits 5 ms, a slow broker).
struct Overlap<S> {
    inner: Arc<S>,
    in_flight: AtomicUsize,
    max: AtomicUsize,
}

impl<S: Sink> Sink for Overlap<S> {
    fn name(&self) -> &'static str {
        "overlap"
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        self.inner.publish(msg)
    }
    fn publish_batch<'a>(
        &'a self,
        msgs: &'a [&'a Envelope],
    ) -> BoxFuture<'a, Vec<Result<Delivery, SinkError>>> {
        Box::pin(async move {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            let r = self.inner.publish_batch(msgs).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            r
        })
    }
}

/// Lanes: one relay publishes a batch while its next one is claimed and published. Per-key
/// order and each message once in the stream hold as with two relays, with injected failures
/// (before sending, lost acks), and the loop stops within its deadline.
#[tokio::test(flavor = "multi_thread")]
async fn run_loop_with_two_lanes_overlaps_batches_and_keeps_per_key_order() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    // 2,000 messages over 100 keys ("<key>:<index within key>") and 2,000 without a key.
    let mut msgs: Vec<Message> = (0..2000)
        .map(|i| {
            Message::new("orders.updated", format!("k{}:{}", i % 100, i / 100))
                .key(format!("k{}", i % 100))
        })
        .collect();
    msgs.extend((0..2000).map(|i| Message::new("orders.noted", format!("n:{i}"))));
    let n = msgs.len();
    db.enqueue(msgs).await;
    let faulty = Faulty::new(nats_sink(&nats).await, |_| {
        match rand::random::<u8>() % 20 {
            0 => Some(Fault::Before),
            1 => Some(Fault::LostAck),
            _ => None,
        }
    });
    let sink = Arc::new(Overlap {
        inner: faulty,
        in_flight: AtomicUsize::new(0),
        max: AtomicUsize::new(0),
    });
    let config = RelayConfig {
        batch_size: 150,
        lanes: 2,
        listen: false,
        ..fast_config()
    };
    let relay = Arc::new(Relay::new(pool(&db, 3), sink.clone(), config).unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    eventually("the backlog to drain", Duration::from_secs(60), || async {
        db.outbox_count().await == 0
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the lanes stop within their deadline")
        .unwrap()
        .unwrap();
    assert_eq!(
        sink.max.load(Ordering::SeqCst),
        2,
        "two batches in flight at once, never more than the lanes"
    );
    let got = read_stream(&nats.url).await;
    assert_eq!(got.len(), n, "each message exactly once in the stream");
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    for (_, key, payload) in &got {
        let (k, idx) = payload.split_once(':').unwrap();
        if k == "n" {
            assert_eq!(key, &None);
            continue;
        }
        assert_eq!(key.as_deref(), Some(k));
        let idx: usize = idx.parse().unwrap();
        let want = next.entry(k.to_owned()).or_insert(0);
        assert_eq!(idx, *want, "key {k} out of order");
        *want += 1;
    }
    assert_eq!(next.len(), 100);
}

#[tokio::test]
async fn lanes_are_checked_against_their_bounds_and_the_pool() {
    let db = TestDb::migrated().await;
    for lanes in [0, 17] {
        let err = Relay::new(
            pool(&db, 20),
            Arc::new(tidings_relay::sink::StdoutSink::default()),
            RelayConfig {
                lanes,
                ..fast_config()
            },
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("lanes must be between 1 and 16"),
            "{err}"
        );
    }
    let err = Relay::new(
        pool(&db, 2),
        Arc::new(tidings_relay::sink::StdoutSink::default()),
        RelayConfig {
            lanes: 3,
            ..fast_config()
        },
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("the pool holds 2 connections"),
        "{err}"
    );
}

/// The claim transaction is begun in the claim's own flight (no tokio-postgres `Transaction`):
/// a tick dropped in the middle of its batch (a caller's timeout, the shutdown deadline) must
/// not hand its connection back to the pool inside the open transaction. The connection is
/// closed instead: the rows are released at once, and the next tick on the same one-connection
/// pool claims and delivers them.
#[tokio::test(flavor = "multi_thread")]
async fn a_tick_dropped_mid_batch_releases_its_rows_and_leaves_the_pool_clean() {
    /// Never answers the first batch; accepts everything after.
    struct StuckOnce(std::sync::atomic::AtomicBool);
    impl Sink for StuckOnce {
        fn name(&self) -> &'static str {
            "stuck-once"
        }
        fn publish<'a>(&'a self, _: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
            Box::pin(async { Ok(Delivery::default()) })
        }
        fn publish_batch<'a>(
            &'a self,
            msgs: &'a [&'a Envelope],
        ) -> BoxFuture<'a, Vec<Result<Delivery, SinkError>>> {
            let first = !self.0.swap(true, Ordering::SeqCst);
            Box::pin(async move {
                if first {
                    std::future::pending::<()>().await;
                }
                msgs.iter().map(|_| Ok(Delivery::default())).collect()
            })
        }
    }
    let db = TestDb::migrated().await;
    db.enqueue(numbered(3, Some(2))).await;
    // Time for a key's second message in the same batch (see publish_all).
    let config = RelayConfig {
        claim_timeout: Duration::from_secs(30),
        ..fast_config()
    };
    let sink = Arc::new(StuckOnce(false.into()));
    let relay = Relay::new(pool(&db, 1), sink.clone(), config).unwrap();
    // The tick is dropped once its batch is being published (its transaction open).
    tokio::select! {
        r = relay.tick() => panic!("the first batch never finishes: {r:?}"),
        _ = eventually("the batch to be published", Duration::from_secs(10), || async {
            sink.0.load(Ordering::SeqCst)
        }) => {}
    }
    // Nothing holds the rows once the server has seen the connection go.
    let other = db.client().await;
    eventually(
        "the dropped batch's rows to be released",
        Duration::from_secs(10),
        || async {
            let free: i64 = other
                .query_one(
                    "SELECT count(*) FROM (SELECT 1 FROM tidings.outbox FOR UPDATE SKIP LOCKED) f",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            free == 3
        },
    )
    .await;
    let r = relay.tick().await.unwrap();
    assert_eq!((r.claimed, r.delivered, r.held_back), (3, 3, 0), "{r:?}");
    assert_eq!(db.outbox_count().await, 0);
}

/// Per-key order when the claim cannot take a contiguous run of the oldest rows (rows held by
/// another session): a key's row behind one that is not in the claim is held back, another
/// key's row is not, and the keyed rows of a contiguous claim all go. Both halves of the
/// claim's whole-claim check are failed in turn (the table's oldest row left out; a row in the
/// middle left out), then passed (claim_batch.sql, prev_seq). The outcome of a passed check is
/// the same as the probes' would be; what it saves is measured by the bench (`--only null`).
#[tokio::test(flavor = "multi_thread")]
async fn keyed_rows_behind_a_row_outside_the_claim_are_held_back() {
    /// Records what it is given, in order.
    #[derive(Default)]
    struct Recording(std::sync::Mutex<Vec<String>>);
    impl Sink for Recording {
        fn name(&self) -> &'static str {
            "recording"
        }
        fn publish<'a>(&'a self, m: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
            let p = String::from_utf8_lossy(&m.payload).into_owned();
            self.0.lock().unwrap().push(p);
            Box::pin(async { Ok(Delivery::default()) })
        }
    }
    impl Recording {
        /// What was published since the last call, in publishing order.
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }
    /// Sorted (a key's rows go in rounds, one at a time), after checking that each key's rows
    /// went in order.
    fn sorted(got: Vec<String>) -> Vec<String> {
        for key in ['k', 'j'] {
            let of_key: Vec<&String> = got.iter().filter(|p| p.starts_with(key)).collect();
            assert!(of_key.is_sorted(), "{key}: {got:?}");
        }
        let mut v = got;
        v.sort();
        v
    }
    let db = TestDb::migrated().await;
    let sink = Arc::new(Recording::default());
    // Time for a key's second message in the same batch (see publish_all).
    let config = RelayConfig {
        claim_timeout: Duration::from_secs(30),
        ..fast_config()
    };
    let relay = Relay::new(pool(&db, 2), sink.clone(), config).unwrap();
    let mut other = db.client().await;
    for (held, behind, rest) in [
        // The table's oldest row held: k3 waits behind it, j2 and j4 go.
        ("k1", "k3", ["j2", "j4", "u5"]),
        // A row in the middle held: j4 waits behind it, k1 and k3 go.
        ("j2", "j4", ["k1", "k3", "u5"]),
    ] {
        db.enqueue(vec![
            Message::new("t", "k1").key("k"),
            Message::new("t", "j2").key("j"),
            Message::new("t", "k3").key("k"),
            Message::new("t", "j4").key("j"),
            Message::new("t", "u5"),
        ])
        .await;
        let tx = other.transaction().await.unwrap();
        tx.execute(
            "SELECT 1 FROM tidings.outbox WHERE payload = convert_to($1, 'UTF8') FOR UPDATE",
            &[&held],
        )
        .await
        .unwrap();
        let r = relay.tick().await.unwrap();
        assert_eq!(
            (r.claimed, r.delivered, r.held_back),
            (4, 3, 1),
            "{held}: {r:?}"
        );
        assert_eq!(sorted(sink.take()), rest, "{held} held");
        tx.rollback().await.unwrap();
        // Now the held row and the one behind it are the oldest rows and nothing is left out.
        let r = relay.tick().await.unwrap();
        assert_eq!(
            (r.claimed, r.delivered, r.held_back),
            (2, 2, 0),
            "{held}: {r:?}"
        );
        assert_eq!(sink.take(), [held, behind]);
        assert_eq!(db.outbox_count().await, 0);
    }
}
