//! Redis Streams end to end (the relay's Redis sink, the inbox's Redis consumer adapter) against a real Redis 7.0: a key prefix of
//! a test's own on the shared server (127.0.0.1:6379), or a server of a test's own
//! ([`RedisServer`]) where the test kills or freezes it.
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tidings_inbox::redis::{RedisAdapter, RedisConsumerConfig};
use tidings_outbox::{Message, MessageId, WireMessage};
use tidings_relay::sink::{
    Idmp, RedisSink, RedisSinkConfig, FIELD_HEADER_PREFIX, FIELD_ID, FIELD_PAYLOAD,
};
use tidings_relay::{Envelope, Relay, RelayConfig, Sink, SinkError};
use tidings_tests::conformance::{sink_conformance, BrokerUnderTest, Received, SinkFeatures};
use tidings_tests::runner_conformance::{runner_conformance, ConsumerBroker};
use tidings_tests::{pool, redis_conn, RedisEntry, RedisKeys, RedisServer, TestDb};

/// The conformance suite's oversized-payload case: the sink's own limit (Redis would close the
/// connection on a bulk string over its proto-max-bulk-len rather than refuse the command).
const MAX: usize = 1024 * 1024;

async fn sink(keys: &RedisKeys, timeout: Duration) -> RedisSink {
    RedisSink::connect(RedisSinkConfig {
        url: keys.url.clone(),
        stream_template: format!("{}:{{topic}}", keys.prefix),
        timeout,
        max_message_bytes: MAX,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Checks the entry scheme the sink promises and returns the entry as the suite reads it.
fn received(keys: &RedisKeys, e: RedisEntry) -> Received {
    let text = |v: &[u8]| String::from_utf8(v.to_vec()).expect("fields are text");
    let id = text(e.field(FIELD_ID).expect("an id field"));
    let payload = e.field(FIELD_PAYLOAD).expect("a payload field").to_vec();
    let headers: BTreeMap<String, String> = e
        .fields
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(FIELD_HEADER_PREFIX)
                .map(|k| (k.to_owned(), text(v)))
        })
        .collect();
    assert_eq!(headers.get("Tidings-Message-Id"), Some(&id), "id = header");
    let topic = headers.get("Tidings-Topic").expect("a topic header");
    assert_eq!(
        e.stream,
        format!("{}:{topic}", keys.prefix),
        "stream = template with the topic"
    );
    assert_eq!(
        e.fields.len(),
        2 + headers.len(),
        "only id, payload and h: fields: {:?}",
        e.fields
    );
    (id, headers, payload)
}

/// A server of the test's own (streams under one prefix).
struct Redis {
    server: RedisServer,
    keys: RedisKeys,
}

impl BrokerUnderTest for Redis {
    fn sink(&self) -> BoxFuture<'_, Arc<dyn Sink>> {
        Box::pin(async move {
            Arc::new(sink(&self.keys, Duration::from_millis(800)).await) as Arc<dyn Sink>
        })
    }
    fn read_back(&self) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(async move {
            self.keys
                .entries()
                .await
                .into_iter()
                .map(|e| received(&self.keys, e))
                .collect()
        })
    }
    fn stop(&mut self) -> BoxFuture<'_, ()> {
        self.server.stop();
        Box::pin(async {})
    }
    fn start(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.server.restart())
    }
    fn freeze(&self) {
        self.server.signal("-STOP");
    }
    fn thaw(&self) {
        self.server.signal("-CONT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_sink_passes_the_conformance_suite() {
    let server = RedisServer::start().await;
    let keys = RedisKeys::on(&server.url);
    sink_conformance(
        &mut Redis { server, keys },
        SinkFeatures {
            // Redis 7.0 has no idempotent XADD.
            dedup_by_id: false,
            max_payload: Some(MAX),
            can_stop: true,
        },
    )
    .await;
}

fn envelope(topic: &str, payload: &str) -> Envelope {
    Envelope {
        seq: 1,
        message: WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic: topic.into(),
            key: None,
            biz_id: Some("biz-1".into()),
            payload: Bytes::from(payload.to_owned()),
            headers: BTreeMap::new(),
            created_at: Some(chrono::Utc::now()),
            attempts: 0,
        },
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 100,
        poll_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        publish_timeout: Duration::from_secs(2),
        max_attempts: 3,
        listen: false,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_that_is_not_a_stream_dead_letters_its_messages_and_no_others() {
    let keys = RedisKeys::new();
    let mut c = redis_conn(&keys.url).await;
    let blocked = format!("{}:orders.created", keys.prefix);
    redis::cmd("SET")
        .arg(&blocked)
        .arg("not a stream")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let sink = Arc::new(sink(&keys, Duration::from_secs(2)).await);

    match sink.publish(&envelope("orders.created", "x")).await {
        Err(SinkError::Permanent(e)) => assert!(e.to_string().contains("WRONGTYPE"), "{e}"),
        other => panic!("WRONGTYPE is permanent: {other:?}"),
    }
    // In one pipeline: the refused XADD fails alone, the others are stored.
    let (a, b, d) = (
        envelope("orders.paid", "1"),
        envelope("orders.created", "2"),
        envelope("orders.paid", "3"),
    );
    let results = sink.publish_batch(&[&a, &b, &d]).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(&results[1], Err(SinkError::Permanent(e)) if e.to_string().contains("WRONGTYPE")),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    let paid: Vec<String> = keys
        .entries()
        .await
        .into_iter()
        .map(|e| String::from_utf8(e.field(FIELD_PAYLOAD).unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(paid, ["1", "3"], "in order, in orders.paid");

    // Through the relay: dead-lettered at once, with Redis's reason; the other topic delivered.
    let db = TestDb::migrated().await;
    db.enqueue(vec![
        Message::new("orders.created", "a"),
        Message::new("orders.paid", "b"),
    ])
    .await;
    let relay = Relay::new(pool(&db, 2), sink, relay_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!(
        (r.delivered, r.dead_lettered, r.retried),
        (1, 1, 0),
        "{r:?}"
    );
    let reason: String = db
        .client()
        .await
        .query_one("SELECT last_error FROM tidings.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        reason.contains("permanent") && reason.contains("WRONGTYPE"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn maxlen_trims_streams_approximately() {
    let keys = RedisKeys::new();
    let sink = RedisSink::connect(RedisSinkConfig {
        url: keys.url.clone(),
        stream_template: format!("{}:{{topic}}", keys.prefix),
        maxlen: Some(10),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(sink
        .server_version()
        .starts_with(|c: char| c.is_ascii_digit()));
    let msgs: Vec<Envelope> = (0..300)
        .map(|i| envelope("trimmed", &i.to_string()))
        .collect();
    let refs: Vec<&Envelope> = msgs.iter().collect();
    for r in sink.publish_batch(&refs).await {
        r.unwrap();
    }
    let mut c = redis_conn(&keys.url).await;
    let len: u64 = redis::cmd("XLEN")
        .arg(format!("{}:trimmed", keys.prefix))
        .query_async(&mut c)
        .await
        .unwrap();
    // `~` trims whole stream nodes (100 entries each by default): about 10, never all 300.
    assert!((10..300).contains(&len), "{len}");
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_errors_name_the_flag() {
    for (config, want) in [
        (
            RedisSinkConfig {
                url: "http://u:hunter2@h/".into(),
                ..Default::default()
            },
            "--redis-url",
        ),
        (
            RedisSinkConfig {
                stream_template: String::new(),
                ..Default::default()
            },
            "--redis-stream-template",
        ),
        (
            RedisSinkConfig {
                maxlen: Some(0),
                ..Default::default()
            },
            "--redis-maxlen",
        ),
    ] {
        let e = RedisSink::connect(config).await.err().unwrap().to_string();
        assert!(e.contains(want) && !e.contains("hunter2"), "{e}");
    }
}

/// Server-side dedup (`XADD ... IDMP`, Redis 8.6+) is read from the server at start-up: the
/// local 7.0 has none, so `auto` leaves it out (a re-send is a second entry: consumers dedup),
/// `on` refuses to start naming the flag and the server's version, and `off` never sends it.
#[tokio::test(flavor = "multi_thread")]
async fn idmp_is_used_only_when_the_server_has_it() {
    let keys = RedisKeys::new();
    let config = |idmp| RedisSinkConfig {
        url: keys.url.clone(),
        stream_template: format!("{}:{{topic}}", keys.prefix),
        idmp,
        ..Default::default()
    };
    let auto = RedisSink::connect(config(Idmp::Auto)).await.unwrap();
    let version = auto.server_version().to_owned();
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    let has_idmp = (major, minor) >= (8, 6);
    assert_eq!(auto.uses_idmp(), has_idmp, "{version}");
    assert!(!RedisSink::connect(config(Idmp::Off))
        .await
        .unwrap()
        .uses_idmp());
    match RedisSink::connect(config(Idmp::On)).await {
        Ok(s) => assert!(has_idmp && s.uses_idmp(), "{version}"),
        Err(e) => {
            let e = e.to_string();
            assert!(!has_idmp, "{version}: {e}");
            assert!(
                e.contains("--redis-idmp on needs Redis 8.6") && e.contains(&version),
                "{e}"
            );
        }
    }
    // The same message twice: one entry with IDMP, two without (the inbox absorbs those).
    let msg = envelope("idmp", "x");
    for _ in 0..2 {
        auto.publish(&msg).await.unwrap();
    }
    let mut c = redis_conn(&keys.url).await;
    let len: u64 = redis::cmd("XLEN")
        .arg(format!("{}:idmp", keys.prefix))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, if has_idmp { 1 } else { 2 });
}

/// The consumer side on the shared server: streams and groups under the test's prefix.
struct RedisConsumers {
    keys: RedisKeys,
    sink: RedisSink,
    /// Consumer (group) name -> its stream.
    groups: Mutex<HashMap<String, String>>,
}

impl ConsumerBroker for RedisConsumers {
    type Adapter = RedisAdapter;

    fn publish<'a>(&'a self, messages: &'a [WireMessage]) -> BoxFuture<'a, ()> {
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
    ) -> BoxFuture<'a, RedisAdapter> {
        let stream = format!("{}:{topic}", self.keys.prefix);
        self.groups
            .lock()
            .unwrap()
            .insert(name.to_owned(), stream.clone());
        Box::pin(async move {
            RedisAdapter::connect(&RedisConsumerConfig {
                url: self.keys.url.clone(),
                stream,
                group: name.to_owned(),
                consumer: name.to_owned(),
                block: Duration::from_millis(200),
                claim_idle: redeliver_after,
                timeout: Duration::from_secs(2),
                ..Default::default()
            })
            .await
            .unwrap()
        })
    }

    fn unacked<'a>(&'a self, name: &'a str) -> BoxFuture<'a, u64> {
        Box::pin(async move {
            let stream = self.groups.lock().unwrap()[name].clone();
            group_backlog(&self.keys.url, &stream, name).await
        })
    }
}

/// Entries of `stream` group `group` has not acked: pending (delivered, unacked) plus not yet
/// delivered (`lag`, Redis 7.0+).
async fn group_backlog(url: &str, stream: &str, group: &str) -> u64 {
    let mut c = redis_conn(url).await;
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    let int = |v: Option<&redis::Value>| match v {
        Some(redis::Value::Int(n)) => *n as u64,
        _ => 0,
    };
    groups
        .iter()
        .find(|g| {
            matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n.as_slice() == group.as_bytes())
        })
        .map_or(0, |g| int(g.get("pending")) + int(g.get("lag")))
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_adapter_passes_the_runner_conformance_suite() {
    let keys = RedisKeys::new();
    let sink = sink(&keys, Duration::from_secs(2)).await;
    runner_conformance(&RedisConsumers {
        keys,
        sink,
        groups: Default::default(),
    })
    .await;
}

fn consumer_config(keys: &RedisKeys, topic: &str, consumer: &str) -> RedisConsumerConfig {
    RedisConsumerConfig {
        url: keys.url.clone(),
        stream: format!("{}:{topic}", keys.prefix),
        group: "cards".into(),
        consumer: consumer.into(),
        block: Duration::from_millis(100),
        claim_idle: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_of_a_dead_consumer_are_claimed_with_their_delivery_count() {
    use futures::StreamExt;
    use tidings_inbox::runner::{Adapter, Decoded, Delivery};
    let keys = RedisKeys::new();
    let sink = sink(&keys, Duration::from_secs(2)).await;
    let msgs: Vec<Envelope> = (0..3).map(|i| envelope("cards", &i.to_string())).collect();
    for m in &msgs {
        sink.publish(m).await.unwrap();
    }
    // Consumer a takes all three and dies without acking.
    let a = RedisAdapter::connect(&consumer_config(&keys, "cards", "a"))
        .await
        .unwrap();
    {
        let mut s = a.open().await.unwrap();
        for _ in 0..3 {
            let d = s.next().await.unwrap().unwrap();
            assert!(matches!(d.decode(), Decoded::Message(m) if m.delivery == 1));
        }
    }
    drop(a);
    let stream = format!("{}:cards", keys.prefix);
    assert_eq!(group_backlog(&keys.url, &stream, "cards").await, 3);
    // Consumer b gets them once they are idle for longer than claim_idle, as second deliveries,
    // in stream order.
    let b = RedisAdapter::connect(&consumer_config(&keys, "cards", "b"))
        .await
        .unwrap();
    let mut s = b.open().await.unwrap();
    for m in &msgs {
        let d = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("claimed within a few claim_idle")
            .unwrap()
            .unwrap();
        match d.decode() {
            Decoded::Message(got) => {
                assert_eq!((got.id, got.delivery), (m.id, 2));
                assert_eq!(got.payload, m.payload);
                assert_eq!(got.biz_id, m.biz_id);
            }
            Decoded::Unusable { reason, .. } => panic!("{reason}"),
        }
        d.ack().await.unwrap();
    }
    assert_eq!(group_backlog(&keys.url, &stream, "cards").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_that_is_not_a_tidings_message_is_parked_not_a_panic() {
    use tidings_inbox::runner::postgres::PgStore;
    use tidings_inbox::runner::{Runner, RunnerConfig};
    use tidings_tests::runner_conformance::Effects;
    let keys = RedisKeys::new();
    let stream = format!("{}:odd", keys.prefix);
    let mut c = redis_conn(&keys.url).await;
    for fields in [
        vec![("foo", "bar")],
        vec![("id", "not-an-id"), ("payload", "x")],
        vec![("h:Tidings-Message-Id", "garbage"), ("payload", "y")],
    ] {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd.query_async::<String>(&mut c).await.unwrap();
    }
    let db = TestDb::migrated().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE effects (n bigserial PRIMARY KEY, biz_id text, payload text NOT NULL)",
        )
        .await
        .unwrap();
    let adapter = RedisAdapter::connect(&consumer_config(&keys, "odd", "c"))
        .await
        .unwrap();
    let runner = Arc::new(
        Runner::new(
            adapter,
            PgStore::new(pool(&db, 2), Arc::new(Effects::default())),
            RunnerConfig {
                name: "odd".into(),
                replay_poll_interval: None,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (runner, stop) = (runner.clone(), stop.clone());
        async move { runner.run(stop).await }
    });
    tidings_tests::eventually("three parked", Duration::from_secs(20), || async {
        runner
            .stats()
            .parked
            .load(std::sync::atomic::Ordering::SeqCst)
            == 3
    })
    .await;
    tidings_tests::eventually("all acked", Duration::from_secs(10), || async {
        group_backlog(&keys.url, &stream, "cards").await == 0
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let reasons: Vec<String> = db
        .client()
        .await
        .query(
            "SELECT last_error FROM tidings.inbox_dead_letters ORDER BY last_error",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.contains("not a Tidings message")),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_held_while_it_is_handled_is_not_claimed_by_another_consumer() {
    use std::sync::atomic::Ordering::SeqCst;
    use tidings_inbox::runner::postgres::PgStore;
    use tidings_inbox::runner::{Runner, RunnerConfig};
    use tidings_tests::runner_conformance::{message, Effects};
    let keys = RedisKeys::new();
    let sink = sink(&keys, Duration::from_secs(2)).await;
    sink.publish(&Envelope {
        seq: 1,
        message: message("slow", "pay_slow", None, "block:1"),
    })
    .await
    .unwrap();
    let db = TestDb::migrated().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE effects (n bigserial PRIMARY KEY, biz_id text, payload text NOT NULL)",
        )
        .await
        .unwrap();
    let handler = Arc::new(Effects::default());
    let start = |consumer: &'static str| {
        let (keys, db, handler) = (&keys, &db, handler.clone());
        async move {
            let adapter = RedisAdapter::connect(&consumer_config(keys, "slow", consumer))
                .await
                .unwrap();
            let runner = Arc::new(
                Runner::new(
                    adapter,
                    PgStore::new(pool(db, 2), handler),
                    RunnerConfig {
                        name: "cards".into(),
                        replay_poll_interval: None,
                        ..Default::default()
                    },
                )
                .unwrap(),
            );
            let stop = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn({
                let (runner, stop) = (runner.clone(), stop.clone());
                async move { runner.run(stop).await }
            });
            (runner, stop, task)
        }
    };
    let entered = handler.entered.notified();
    let (a, stop_a, task_a) = start("a").await;
    tokio::time::timeout(Duration::from_secs(10), entered)
        .await
        .expect("a handles the entry");
    // b claims entries idle for 300 ms, every 150 ms; a holds its entry every 100 ms. Five
    // claim periods later, b has not taken it.
    let (b, stop_b, task_b) = start("b").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stream = format!("{}:slow", keys.prefix);
    let mut c = redis_conn(&keys.url).await;
    let pending: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("cards")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(
        (pending[0].1.as_str(), pending[0].3),
        ("a", 1),
        "still a's, delivered once: {pending:?}"
    );
    handler.release();
    tidings_tests::eventually("a commits and acks", Duration::from_secs(10), || async {
        group_backlog(&keys.url, &stream, "cards").await == 0
    })
    .await;
    stop_a.cancel();
    stop_b.cancel();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
    assert_eq!(a.stats().processed.load(SeqCst), 1);
    assert_eq!(
        (
            b.stats().processed.load(SeqCst),
            b.stats().duplicates.load(SeqCst)
        ),
        (0, 0),
        "b never got it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_rides_out_a_server_restart_with_exactly_one_effect_each() {
    ride_out(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_rides_out_a_frozen_server_with_exactly_one_effect_each() {
    ride_out(true).await;
}

/// A runner consumes 400 entries of 7 keys while its server is SIGKILLed and restarted, or
/// frozen (SIGSTOP) for 3 s, a sixth of the way through: exactly one effect each, nothing
/// parked, nothing left pending.
async fn ride_out(freeze: bool) {
    use std::sync::atomic::Ordering::SeqCst;
    use tidings_inbox::runner::postgres::PgStore;
    use tidings_inbox::runner::{Runner, RunnerConfig};
    use tidings_tests::runner_conformance::{message, Effects};
    let mut server = RedisServer::start().await;
    let keys = RedisKeys::on(&server.url);
    let publish = |from: usize, to: usize| {
        let keys = &keys;
        async move {
            let sink = sink(keys, Duration::from_secs(2)).await;
            let msgs: Vec<Envelope> = (from..to)
                .map(|i| Envelope {
                    seq: i as i64,
                    message: message(
                        "restart",
                        &format!("pay_{i}"),
                        Some(&format!("k{}", i % 7)),
                        &format!("ok:{i}"),
                    ),
                })
                .collect();
            for r in sink.publish_batch(&msgs.iter().collect::<Vec<_>>()).await {
                r.unwrap();
            }
        }
    };
    publish(0, 300).await;
    let db = TestDb::migrated().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE effects (n bigserial PRIMARY KEY, biz_id text, payload text NOT NULL)",
        )
        .await
        .unwrap();
    let adapter = RedisAdapter::connect(&consumer_config(&keys, "restart", "c"))
        .await
        .unwrap();
    let runner = Arc::new(
        Runner::new(
            adapter,
            PgStore::new(pool(&db, 4), Arc::new(Effects::default())),
            RunnerConfig {
                name: "cards".into(),
                replay_poll_interval: None,
                reopen_backoff_max: Duration::from_millis(500),
                ack_timeout: Duration::from_secs(1),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (runner, stop) = (runner.clone(), stop.clone());
        async move { runner.run(stop).await }
    });
    tidings_tests::eventually("some processed", Duration::from_secs(20), || async {
        runner.stats().processed.load(SeqCst) >= 50
    })
    .await;
    let at_kill = runner.stats().processed.load(SeqCst);
    if freeze {
        server.signal("-STOP");
        // The outage's length: reads, acks and reopens time out meanwhile (2 s each).
        tokio::time::sleep(Duration::from_secs(3)).await;
        server.signal("-CONT");
    } else {
        assert!(runner.readiness().ready, "{:?}", runner.readiness());
        server.stop();
        // The runner says it cannot work while the server is gone (its stream failed), and
        // why.
        tidings_tests::eventually("not ready", Duration::from_secs(20), || async {
            let r = runner.readiness();
            !r.ready && r.to_json().contains("broker: the stream is not open")
        })
        .await;
        server.restart().await;
        tidings_tests::eventually("ready again", Duration::from_secs(20), || async {
            runner.readiness().ready
        })
        .await;
    }
    publish(300, 400).await;
    let stream = format!("{}:restart", keys.prefix);
    tidings_tests::eventually(
        "all 400 applied and acked",
        Duration::from_secs(60),
        || async {
            runner.stats().processed.load(SeqCst) == 400
                && group_backlog(&keys.url, &stream, "cards").await == 0
        },
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let (effects, distinct): (i64, i64) = {
        let r = db
            .client()
            .await
            .query_one("SELECT count(*), count(DISTINCT biz_id) FROM effects", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((effects, distinct), (400, 400), "exactly one effect each");
    assert_eq!(runner.stats().parked.load(SeqCst), 0);
    eprintln!(
        "{at_kill} processed when the server was {}; {} duplicates absorbed",
        if freeze { "frozen" } else { "killed" },
        runner.stats().duplicates.load(SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_out_of_memory_is_an_outage_not_the_messages_fault() {
    let server = RedisServer::start().await;
    let keys = RedisKeys::on(&server.url);
    let sink = Arc::new(sink(&keys, Duration::from_secs(2)).await);
    let mut c = redis_conn(&server.url).await;
    let maxmemory = |bytes: &'static str| {
        let mut c = c.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(bytes)
                .query_async::<()>(&mut c)
                .await
                .unwrap()
        }
    };
    // Over maxmemory with the default policy (noeviction): Redis refuses every write with OOM.
    maxmemory("1").await;
    match sink.publish(&envelope("orders.created", "x")).await {
        Err(SinkError::Unavailable(e)) => assert!(e.to_string().contains("OOM"), "{e}"),
        other => panic!("OOM is an outage: {other:?}"),
    }
    let db = TestDb::migrated().await;
    db.enqueue(
        (0..5)
            .map(|i| Message::new("orders.created", format!("{i}")))
            .collect(),
    )
    .await;
    let relay = Relay::new(pool(&db, 2), sink, relay_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert!(
        r.sink_unavailable && r.delivered == 0 && r.retried == 0 && r.dead_lettered == 0,
        "{r:?}"
    );
    let attempts: i64 = db
        .client()
        .await
        .query_one("SELECT coalesce(sum(attempts), 0) FROM tidings.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 0, "no attempt counted");
    maxmemory("0").await;
    let total = tidings_tests::drain(&relay, &db).await;
    assert_eq!((total.delivered, total.dead_lettered), (5, 0), "{total:?}");
    let len: i64 = redis::cmd("XLEN")
        .arg(format!("{}:orders.created", keys.prefix))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_group_without_create_group_fails_at_connect_naming_it() {
    let keys = RedisKeys::new();
    let config = RedisConsumerConfig {
        create_group: false,
        ..consumer_config(&keys, "nogroup", "c")
    };
    // Neither stream nor group exists.
    let e = RedisAdapter::connect(&config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("\"cards\" does not exist") && e.contains("create_group"),
        "{e}"
    );
    // The stream exists, the group does not.
    RedisAdapter::connect(&consumer_config(&keys, "nogroup", "c"))
        .await
        .unwrap();
    let other = RedisConsumerConfig {
        group: "other".into(),
        ..config.clone()
    };
    let e = RedisAdapter::connect(&other)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("\"other\" does not exist"), "{e}");
    // An existing group is used as it is.
    RedisAdapter::connect(&config).await.unwrap();
}

/// A child process SIGKILLed and reaped when dropped, also when the test fails (a relay or card
/// service left running would keep working against a dropped database).
struct Proc(std::process::Child);

impl Proc {
    /// SIGKILLs it and waits until it is gone.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The chaos test: 10,000 payments (CHAOS_PAYMENTS to change it) from 4 producers while two
/// `tidings relay --sink redis` processes and two card services (`card-service` with
/// REDIS_URL) are SIGKILLed at random every 0.5-2 s and restarted, and the Redis server (one of
/// the test's own, append-only with `appendfsync always`, so it keeps every acknowledged write)
/// is SIGKILLed and restarted once, a quarter of the way. Each card-service slot has a stable
/// consumer name (`card-0`, `card-1`) that its restarts reuse, so a restarted instance reads
/// its own pending entries at once; `claim_idle` is 5 s, so the other slot can take them over
/// too. A process that exits by itself (it started while the server was down) is restarted,
/// as a process manager would. Then: every committed payment has exactly one card, nothing
/// dead-lettered or parked, the outbox empty, and nothing pending or unread in the group.
///
/// CHAOS_LOG_DIR=DIR writes each card service's log (the runner's and the adapter's, debug)
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_chaos_every_payment_gets_exactly_one_card() {
    use rand::Rng;
    use std::process::{Command, Stdio};
    use std::time::Instant;
    use tidings_examples::{charge, PaymentSucceeded, Verdict, SCHEMA, TOPIC};

    const CARD_SERVICE: &str = env!("CARGO_BIN_EXE_card-service");
    const GROUP: &str = "card-service";
    let tidings = std::path::PathBuf::from(CARD_SERVICE).with_file_name("tidings");
    assert!(
        tidings.exists(),
        "{} is missing: cargo build -p tidings-relay --features redis --bin tidings",
        tidings.display()
    );
    let payments: usize = std::env::var("CHAOS_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let producers = 4;
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    let mut server = RedisServer::start().await;
    // The relay's default stream template, on the test's own server.
    let stream = format!("tidings:{TOPIC}");
    // The card service's group, before anyone publishes (the card services would create it
    // too, reading from the stream's start).
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(&mut redis_conn(&server.url).await)
        .await
        .unwrap();
    let url = server.url.clone();
    let relay = || -> Proc {
        Proc(tidings_tests::chaos_relay(
            &tidings,
            &db.url,
            &["--sink", "redis"],
            &[("TIDINGS_REDIS_URL", &url)],
        ))
    };
    let log_dir = std::env::var("CHAOS_LOG_DIR").ok();
    let spawned = std::cell::Cell::new(0);
    // Slot `slot`'s card service: the same consumer name at every restart.
    let card_service = |slot: usize| -> Proc {
        let mut cmd = Command::new(CARD_SERVICE);
        cmd.env("DATABASE_URL", &db.url)
            .env("REDIS_URL", &url)
            .env("REDIS_STREAM", &stream)
            .env("REDIS_CONSUMER", format!("card-{slot}"))
            .env("REDIS_CLAIM_IDLE_MS", "5000")
            .env_remove("KAFKA_BROKERS")
            .env_remove("AMQP_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(dir) = &log_dir {
            spawned.set(spawned.get() + 1);
            let file =
                std::fs::File::create(format!("{dir}/card-{slot}-{}.log", spawned.get())).unwrap();
            cmd.env("CARD_LOG", "tidings_inbox=debug").stderr(file);
        }
        Proc(cmd.spawn().unwrap())
    };
    let mut relays: Vec<Proc> = (0..2).map(|_| relay()).collect();
    let mut cards: Vec<Proc> = (0..2).map(card_service).collect();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let url = db.url.clone();
        let per = payments / producers;
        tasks.push(tokio::spawn(async move {
            let mut c = tidings_tests::connect(&url).await;
            let outbox = tidings_outbox::Outbox::default();
            for i in 0..per {
                let e = PaymentSucceeded {
                    payment_id: format!("pay_{p}_{i}"),
                    customer: format!("p{p}-c{}", i % 25),
                    n: (i / 25) as i64,
                    cents: 100 + i as i64,
                };
                let tx = c.transaction().await.unwrap();
                charge(&tx, &outbox, &e).await.unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(100);
    let (mut kills, mut exits, mut server_restarted) = (0, 0, false);
    loop {
        // A process that ended by itself (started while the server was down, or gave up on
        // it) is started again.
        for p in relays.iter_mut() {
            if p.0.try_wait().unwrap().is_some() {
                *p = relay();
                exits += 1;
            }
        }
        for (slot, p) in cards.iter_mut().enumerate() {
            if p.0.try_wait().unwrap().is_some() {
                *p = card_service(slot);
                exits += 1;
            }
        }
        let v = Verdict::read(&c).await.unwrap();
        let produced = tasks.iter().all(|t| t.is_finished());
        if produced && v.payments as usize == payments && v.cards >= v.payments {
            break;
        }
        if Instant::now() > deadline {
            let state = c
                .query_one(
                    "SELECT (SELECT count(*) FROM tidings.outbox), (SELECT count(*) FROM tidings.dead_letters),
                            (SELECT string_agg(DISTINCT left(last_error, 200), ' | ') FROM tidings.inbox_dead_letters),
                            (SELECT count(*) FROM tidings.inbox_dead_letters)",
                    &[],
                )
                .await
                .unwrap();
            panic!(
                "no convergence within 100 s: {v:?}; outbox {}, dead letters {}, parked {} ({:?}); group backlog {}",
                state.get::<_, i64>(0),
                state.get::<_, i64>(1),
                state.get::<_, i64>(3),
                state.get::<_, Option<String>>(2),
                group_backlog(&server.url, &stream, GROUP).await
            );
        }
        // Chaos while producing and until half the cards are issued.
        if produced && v.cards as usize > payments / 2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // Once, a quarter of the way: the server is SIGKILLed and restarted. Relays see an
        // outage (no attempt counted), card services lose their connections (what they had
        // not acked stays pending under their names), and both reconnect by themselves.
        if !server_restarted && v.cards as usize > payments / 4 {
            server_restarted = true;
            let down = Instant::now();
            server.restart().await;
            eprintln!(
                "server restarted at {} cards (up again in {:?})",
                v.cards,
                down.elapsed()
            );
            continue;
        }
        if rand::rng().random_bool(0.5) {
            let i = rand::rng().random_range(0..relays.len());
            relays[i].kill();
            relays[i] = relay();
        } else {
            let i = rand::rng().random_range(0..cards.len());
            cards[i].kill();
            cards[i] = card_service(i);
        }
        kills += 1;
        let pause = rand::rng().random_range(500..2000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Chaos over: the card services work off the re-sends still unread and what is pending.
    tidings_tests::eventually(
        "every entry of the stream read and acked",
        Duration::from_secs(30),
        || async { group_backlog(&server.url, &stream, GROUP).await == 0 },
    )
    .await;
    for p in relays.iter_mut().chain(cards.iter_mut()) {
        p.kill();
    }
    let entries: u64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut redis_conn(&server.url).await)
        .await
        .unwrap();
    let v = Verdict::read(&c).await.unwrap();
    eprintln!(
        "redis chaos: {} payments in {:.1?}, {kills} SIGKILLs, 1 server restart, {exits} processes restarted after exiting on their own; {entries} stream entries, cards {}, duplicates absorbed by the inbox {}",
        v.payments,
        started.elapsed(),
        v.cards,
        v.absorbed
    );
    assert_eq!(v.payments as usize, payments);
    assert!(v.exactly_once(), "{v:?}");
    assert!(server_restarted);
    assert!(entries as usize >= payments, "{entries} entries");
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM tidings.outbox").await, 0);
    assert_eq!(
        count("SELECT count(*) FROM tidings.dead_letters").await,
        0,
        "the server restart dead-lettered messages"
    );
    assert_eq!(
        count("SELECT count(*) FROM tidings.inbox_dead_letters").await,
        0,
        "the card services parked messages"
    );
}
