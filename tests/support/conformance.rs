//! The sink conformance suite: what every broker's sink must do, run against the real broker.
//! A new sink's test implements [`BrokerUnderTest`] (how to connect a sink, read back what the
//! broker holds, and take the broker down) and calls [`sink_conformance`] with the
//! [`SinkFeatures`] its broker has. A capability a broker lacks is a declared flag: the suite
//! then checks that the sink says so (e.g. no dedup window), never skips silently.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tidings_outbox::{Message, MessageId, WireMessage};
use tidings_relay::{Delivery, Envelope, Relay, RelayConfig, Sink, SinkError, TickReport};
use tokio_util::sync::CancellationToken;

use crate::{pool, TestDb};

/// A message as the broker holds it: its message id, every header (the `Tidings-*` ones and
/// the producer's; a broker without headers maps its fields to these names), the payload.
pub type Received = (String, BTreeMap<String, String>, Vec<u8>);

/// What a sink's broker can do.
#[derive(Debug, Clone)]
pub struct SinkFeatures {
    /// The broker drops a re-send with the same message id and says so (`Delivery::duplicate`);
    /// the sink must then declare a dedup window, and must not otherwise.
    pub dedup_by_id: bool,
    /// Largest payload the broker takes; a larger one must fail as `Permanent`.
    pub max_payload: Option<usize>,
    /// The harness can stop and restart the broker and freeze it (the outage cases run).
    pub can_stop: bool,
}

/// The broker a conformance run talks to.
pub trait BrokerUnderTest: Send + Sync {
    /// A sink connected to the broker, publishing messages of topic `topic`.
    fn sink(&self) -> BoxFuture<'_, Arc<dyn Sink>>;
    /// Everything the broker holds (all topics the run used), in the broker's order.
    fn read_back(&self) -> BoxFuture<'_, Vec<Received>>;
    /// Makes the broker unreachable until [`BrokerUnderTest::start`] (only with `can_stop`).
    fn stop(&mut self) -> BoxFuture<'_, ()>;
    /// Brings it back, with what it held.
    fn start(&mut self) -> BoxFuture<'_, ()>;
    /// Freezes it: connections stay open, nothing is answered (only with `can_stop`).
    fn freeze(&self);
    /// Thaws it.
    fn thaw(&self);
}

fn envelope(i: i64, key: Option<&str>) -> Envelope {
    Envelope {
        seq: i,
        message: WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic: "conformance.direct".into(),
            key: key.map(str::to_owned),
            biz_id: Some(format!("biz-{i}")),
            payload: Bytes::from(format!("{{\"n\":{i}}}")),
            headers: BTreeMap::from([(
                "traceparent".to_owned(),
                format!("00-{i:032x}-{i:016x}-01"),
            )]),
            created_at: Some(chrono::Utc::now()),
            attempts: 0,
        },
    }
}

/// Relay settings for the suite: fast retries, short timeouts, one-message chains allowed.
fn config() -> RelayConfig {
    RelayConfig {
        batch_size: 100,
        poll_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        claim_timeout: Duration::from_secs(8),
        publish_timeout: Duration::from_secs(1),
        unavailable_backoff_max: Duration::from_millis(200),
        max_attempts: 3,
        listen: false,
        ..Default::default()
    }
}

/// Ticks until the outbox is empty (bounded by a deadline); sums the reports.
async fn drain(relays: &[&Relay], db: &TestDb) -> TickReport {
    let mut total = TickReport::default();
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reports = futures::future::join_all(relays.iter().map(|r| r.tick())).await;
        let mut claimed = 0;
        for r in reports {
            let r = r.expect("a tick never fails on a working database");
            claimed += r.claimed;
            total.claimed += r.claimed;
            total.released += r.released;
            total.sink_unavailable |= r.sink_unavailable;
            total.delivered += r.delivered;
            total.retried += r.retried;
            total.dead_lettered += r.dead_lettered;
            total.duplicates += r.duplicates;
        }
        if claimed == 0 && db.outbox_count().await == 0 {
            return total;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "outbox did not drain: {total:?}"
        );
        if claimed == 0 {
            // Only rows waiting for their (millisecond) retry time or the broker's return.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Fails a deterministic share of first attempts retryably, some after the broker took the
/// message (a lost ack), to exercise retries and re-sends.
struct Flaky {
    inner: Arc<dyn Sink>,
    calls: AtomicUsize,
}

impl Sink for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            match (msg.attempts, n % 7) {
                (0, 0) => Err(SinkError::Retryable("injected failure".into())),
                (0, 3) => {
                    self.inner.publish(msg).await?;
                    Err(SinkError::Retryable("injected lost ack".into()))
                }
                _ => self.inner.publish(msg).await,
            }
        })
    }
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        self.inner.check()
    }
}

async fn attempts(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT coalesce(sum(attempts), 0) FROM tidings.outbox", &[])
        .await
        .unwrap()
        .get(0)
}

/// The distinct reasons in the dead-letter store, for failure messages.
async fn dead_reasons(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT DISTINCT left(last_error, 300) FROM tidings.dead_letters",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn count_topic(got: &[Received], topic: &str) -> usize {
    got.iter()
        .filter(|(_, h, _)| h.get("Tidings-Topic").map(String::as_str) == Some(topic))
        .count()
}

/// Runs every case against `broker`. Panics with the case's name on the first failure.
pub async fn sink_conformance(broker: &mut dyn BrokerUnderTest, features: SinkFeatures) {
    let sink = broker.sink().await;

    // 1. Capabilities say what the broker does.
    let caps = sink.capabilities();
    assert_eq!(
        caps.dedup_window.is_some(),
        features.dedup_by_id,
        "capabilities: a dedup window exactly when the broker drops re-sends by id: {caps:?}"
    );

    // 2. Concurrent publishes all succeed and arrive intact, with the Tidings headers.
    let msgs: Vec<Envelope> = (0..50)
        .map(|i| envelope(i, if i % 2 == 0 { Some("k") } else { None }))
        .collect();
    let refs: Vec<&Envelope> = msgs.iter().collect();
    for r in sink.publish_batch(&refs).await {
        assert!(r.is_ok(), "delivery: {r:?}");
    }
    let got = broker.read_back().await;
    assert_eq!(count_topic(&got, "conformance.direct"), 50, "delivery");
    let by_id: BTreeMap<_, _> = got.into_iter().map(|(id, h, p)| (id, (h, p))).collect();
    for m in &msgs {
        let (h, p) = by_id
            .get(&m.id.to_string())
            .expect("delivery: every message arrives, carrying its id");
        assert_eq!(p, &m.payload.to_vec(), "delivery: payload");
        assert_eq!(
            h.get("Tidings-Biz-Id"),
            m.biz_id.as_ref(),
            "headers: biz-id"
        );
        assert_eq!(h.get("Tidings-Key"), m.key.as_ref(), "headers: key");
        assert_eq!(
            h.get("traceparent"),
            m.headers.get("traceparent"),
            "headers: the producer's"
        );
    }

    // 3. A re-send of the same message id.
    let again = sink.publish(&msgs[0]).await.expect("a re-send is accepted");
    let held = count_topic(&broker.read_back().await, "conformance.direct");
    if features.dedup_by_id {
        assert!(again.duplicate, "dedup: the broker recognises the re-send");
        assert_eq!(held, 50, "dedup: and stores it once");
    } else {
        assert!(
            !again.duplicate,
            "dedup: a broker without dedup reports none"
        );
    }

    // 4. A payload the broker can never take fails as permanent, not retryable.
    if let Some(max) = features.max_payload {
        let mut big = envelope(99, None);
        big.payload = Bytes::from(vec![b'x'; max + 1]);
        match sink.publish(&big).await {
            Err(SinkError::Permanent(_)) => {}
            other => panic!("permanent refusal: oversized payload must be permanent: {other:?}"),
        }
    }

    // 5. Key order under injected failures and lost acks, two relays at once: every message
    //    exactly once (re-sends dropped, or absorbed by the consumer without dedup), and each
    //    key's messages first stored in order.
    let db = TestDb::migrated().await;
    let n = 600;
    db.enqueue(
        (0..n)
            .map(|i| {
                Message::new("conformance.order", format!("k{}:{}", i % 20, i / 20))
                    .key(format!("k{}", i % 20))
            })
            .collect(),
    )
    .await;
    let flaky: Arc<dyn Sink> = Arc::new(Flaky {
        inner: broker.sink().await,
        calls: AtomicUsize::new(0),
    });
    let a = Relay::new(pool(&db, 2), flaky.clone(), config()).expect("relay a");
    let b = Relay::new(pool(&db, 2), flaky, config()).expect("relay b");
    let total = drain(&[&a, &b], &db).await;
    assert!(total.retried > 0, "order: failures were injected");
    assert_eq!(
        total.dead_lettered,
        0,
        "order: nothing dead-lettered: {:?}",
        dead_reasons(&db).await
    );
    let got = broker.read_back().await;
    let mut first_seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    for (id, h, p) in &got {
        if h.get("Tidings-Topic").map(String::as_str) != Some("conformance.order") {
            continue;
        }
        if first_seen.insert(id.clone(), 0).is_some() {
            continue; // a re-send the broker could not drop: the consumer's inbox absorbs it
        }
        let text = String::from_utf8_lossy(p);
        let (k, idx) = text
            .trim_matches('"')
            .split_once(':')
            .expect("order: payload k:i");
        let idx: usize = idx.parse().expect("order: index");
        let want = next.entry(k.to_owned()).or_insert(0);
        assert_eq!(idx, *want, "order: key {k} out of order");
        *want += 1;
    }
    assert_eq!(first_seen.len(), n, "order: every message stored");

    // 6. Flush on shutdown: a run loop stopped after its work is done returns cleanly and
    //    everything it reported delivered is in the broker.
    db.enqueue(
        (0..20)
            .map(|i| Message::new("conformance.shutdown", format!("{i}")))
            .collect(),
    )
    .await;
    let relay = Arc::new(Relay::new(pool(&db, 2), broker.sink().await, config()).expect("relay"));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    crate::eventually(
        "shutdown: the run loop to deliver",
        Duration::from_secs(30),
        || async { db.outbox_count().await == 0 },
    )
    .await;
    stop.cancel();
    run.await
        .expect("shutdown: run loop task")
        .expect("shutdown: run returns Ok");
    assert_eq!(
        count_topic(&broker.read_back().await, "conformance.shutdown"),
        20,
        "shutdown: everything delivered is in the broker"
    );

    if !features.can_stop {
        return;
    }
    // 7. Broker down: messages released untouched (no attempt counted), the relay backs off,
    //    and the backlog goes once the broker is back.
    db.enqueue(
        (0..30)
            .map(|i| Message::new("conformance.down", format!("{i}")))
            .collect(),
    )
    .await;
    let relay = Relay::new(pool(&db, 2), broker.sink().await, config()).expect("relay");
    broker.stop().await;
    for i in 0..3 {
        let r = relay.tick().await.expect("broker down: tick");
        // A sink that postpones the messages of a destination that is down (HTTP) leaves
        // nothing to claim until their new time: after the first tick, that is fine too.
        assert!(
            (r.sink_unavailable || (i > 0 && r.claimed == 0))
                && r.delivered == 0
                && r.retried == 0
                && r.dead_lettered == 0,
            "broker down: an outage, not the messages' fault: {r:?}"
        );
    }
    assert!(
        relay.sink_backoff().is_some(),
        "broker down: the relay backs off"
    );
    assert_eq!(attempts(&db).await, 0, "broker down: no attempt counted");
    broker.start().await;
    let total = drain(&[&relay], &db).await;
    assert_eq!(
        total.dead_lettered,
        0,
        "broker down: nothing dead-lettered: {:?}",
        dead_reasons(&db).await
    );
    assert!(
        count_topic(&broker.read_back().await, "conformance.down") >= 30,
        "broker down: the backlog delivered after the restart"
    );

    // 8. Broker too slow (frozen): publishes time out, the health check fails too, and that is
    //    an outage: no attempt counted, nothing dead-lettered, all delivered after the thaw.
    db.enqueue(
        (0..10)
            .map(|i| Message::new("conformance.slow", format!("{i}")))
            .collect(),
    )
    .await;
    let relay = Relay::new(pool(&db, 2), broker.sink().await, config()).expect("relay");
    broker.freeze();
    let r = relay.tick().await.expect("broker too slow: tick");
    assert!(
        r.sink_unavailable && r.retried == 0 && r.dead_lettered == 0,
        "broker too slow: an outage: {r:?}"
    );
    assert_eq!(
        attempts(&db).await,
        0,
        "broker too slow: no attempt counted"
    );
    broker.thaw();
    let total = drain(&[&relay], &db).await;
    assert_eq!(
        total.dead_lettered,
        0,
        "broker too slow: nothing dead-lettered: {:?}",
        dead_reasons(&db).await
    );
}
