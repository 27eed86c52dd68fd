//! Redis Streams end to end (the relay's Redis sink) against a real Redis 7.0: a key prefix of
//! a test's own on the shared server (127.0.0.1:6379), or a server of a test's own
//! ([`RedisServer`]) where the test kills or freezes it.
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tidings_outbox::{Message, MessageId, WireMessage};
use tidings_relay::sink::{
    RedisSink, RedisSinkConfig, FIELD_HEADER_PREFIX, FIELD_ID, FIELD_PAYLOAD,
};
use tidings_relay::{Envelope, Relay, RelayConfig, Sink, SinkError};
use tidings_tests::conformance::{sink_conformance, BrokerUnderTest, Received, SinkFeatures};
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
