//! The consumer runner conformance suite: what every broker's consumer adapter must do with the
//! runner core, against the real broker. A new adapter's test implements [`ConsumerBroker`]
//! (publish as the relay would, make an adapter, count what the broker still holds unacked)
//! and calls [`runner_conformance`].
//!
//! Cases: exactly one effect under redelivery (lost acks and producer re-sends), ack only after
//! commit (and never after a handler swallowed an SQL error), per-key order under failures
//! (counted and transient), a failing key holding only itself and keeping its order across a
//! shutdown, parking (both error classes) and replay (failing again, then
//! succeeding, by a direct call and by the run loop's poll), and shutdown with messages in
//! flight (finished within the deadline, or abandoned unacked and redelivered).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use tidings_inbox::runner::postgres::{Handler, PgStore};
use tidings_inbox::runner::{
    Adapter, AdapterError, Decoded, Delivered, Deliveries, Delivery, HandlerError, Runner,
    RunnerConfig,
};
use tidings_outbox::{MessageId, WireMessage};
use tokio::sync::Notify;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use crate::{eventually, pool, TestDb};

/// The broker side of a consumer adapter under test.
pub trait ConsumerBroker: Send + Sync {
    /// The adapter.
    type Adapter: Adapter;
    /// Publishes `messages` in order, as the relay would (through the broker's sink).
    fn publish<'a>(&'a self, messages: &'a [WireMessage]) -> BoxFuture<'a, ()>;
    /// A new adapter for consumer `name` reading topic `topic` from the start, whose broker
    /// redelivers an unacked message after about `redeliver_after`.
    fn adapter<'a>(
        &'a self,
        name: &'a str,
        topic: &'a str,
        redeliver_after: Duration,
    ) -> BoxFuture<'a, Self::Adapter>;
    /// How many messages of consumer `name` the broker holds unacked (delivered or not).
    fn unacked<'a>(&'a self, name: &'a str) -> BoxFuture<'a, u64>;
}

/// Runs every case; each has its own database, consumer name and topic.
pub async fn runner_conformance<B: ConsumerBroker>(broker: &B) {
    exactly_one_effect_under_redelivery(broker).await;
    acks_only_after_commit(broker).await;
    key_order_under_failures(broker).await;
    a_failing_key_holds_only_itself_and_keeps_its_order_across_shutdown(broker).await;
    parking_and_replay(broker).await;
    shutdown_with_messages_in_flight(broker).await;
}

/// A message of `topic`; its payload tells the test handler what to do.
pub fn message(topic: &str, biz: &str, key: Option<&str>, payload: &str) -> WireMessage {
    WireMessage {
        id: MessageId::from_uuid(uuid::Uuid::now_v7()),
        topic: topic.into(),
        key: key.map(str::to_owned),
        biz_id: Some(biz.into()),
        headers: BTreeMap::from([(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        )]),
        payload: Bytes::from(payload.to_owned()),
        created_at: Some(chrono::Utc::now()),
        attempts: 0,
    }
}

/// The suite's handler: applies the payload to `effects` in the order it runs; its payload
/// says how to misbehave:
/// - `fail-once:*` fails its first attempt (counted), `transient-once:*` its first attempt with
///   a serialization failure (not counted);
/// - `park:*` asks to be parked, `fail:*` fails until [`Effects::fix`];
/// - `swallow:*` swallows an SQL error and returns Ok;
/// - `block:*` waits for [`Effects::release`] (after writing its effect, inside the
///   transaction) and signals `entered`.
#[derive(Default)]
pub struct Effects {
    tried: Mutex<HashSet<String>>,
    fixed: AtomicBool,
    released: AtomicBool,
    gate: Notify,
    /// Signalled when a `block:*` message is inside its transaction.
    pub entered: Notify,
}

impl Effects {
    /// From now on `fail:*` and `park:*` succeed.
    pub fn fix(&self) {
        self.fixed.store(true, Ordering::SeqCst);
    }
    /// Lets `block:*` messages (waiting and future) finish.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.gate.notify_waiters();
    }
}

impl Handler for Effects {
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let p = String::from_utf8(msg.payload.to_vec())?;
            let first = self.tried.lock().unwrap().insert(p.clone());
            let fixed = self.fixed.load(Ordering::SeqCst);
            if p.starts_with("fail-once:") && first {
                return Err("first attempt fails".into());
            }
            if p.starts_with("transient-once:") && first {
                tx.batch_execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                )
                .await?;
            }
            if p.starts_with("park:") && !fixed {
                return Err(HandlerError::park("refused for good"));
            }
            if p.starts_with("fail:") && !fixed {
                return Err("still failing".into());
            }
            if p.starts_with("swallow:") {
                let _ = tx
                    .execute("INSERT INTO no_such_table VALUES (1)", &[])
                    .await;
            }
            tx.execute(
                "INSERT INTO effects (biz_id, payload) VALUES ($1, $2)",
                &[&msg.biz_id, &p],
            )
            .await?;
            if p.starts_with("block:") {
                let wait = self.gate.notified();
                self.entered.notify_one();
                if !self.released.load(Ordering::SeqCst) {
                    wait.await;
                }
            }
            Ok(())
        })
    }
}

/// Fast settings for the suite.
fn config(name: &str) -> RunnerConfig {
    RunnerConfig {
        name: name.into(),
        concurrency: 8,
        max_deliveries: 3,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        replay_poll_interval: None,
        shutdown_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn effects_db() -> TestDb {
    let db = TestDb::migrated().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE effects (n bigserial PRIMARY KEY, biz_id text, payload text NOT NULL)",
        )
        .await
        .unwrap();
    db
}

async fn effects(db: &TestDb) -> Vec<(String, String)> {
    db.client()
        .await
        .query("SELECT biz_id, payload FROM effects ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A runner running in a task until stopped.
struct Running<A: Adapter> {
    runner: Arc<Runner<A, PgStore>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), tidings_inbox::Error>>,
}

fn start<A: Adapter>(runner: Runner<A, PgStore>) -> Running<A> {
    let runner = Arc::new(runner);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (runner, stop) = (runner.clone(), stop.clone());
        async move { runner.run(stop).await }
    });
    Running { runner, stop, task }
}

impl<A: Adapter> Running<A> {
    async fn until(
        &self,
        what: &str,
        done: impl Fn(&tidings_inbox::runner::ConsumerStats) -> bool,
    ) {
        eventually(what, Duration::from_secs(30), || async {
            done(self.runner.stats())
        })
        .await;
    }
    async fn stop(self) -> Result<(), tidings_inbox::Error> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the runner stops within its shutdown timeout")
            .unwrap()
    }
}

fn n(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

async fn drained<B: ConsumerBroker>(broker: &B, name: &str) {
    let what = format!("the broker to hold nothing unacked for {name}");
    eventually(&what, Duration::from_secs(30), || async {
        broker.unacked(name).await == 0
    })
    .await;
}

/// An adapter whose first `lose` acks are silently dropped (an ack lost on the way): the broker
/// redelivers those messages.
struct LosesAcks<A> {
    inner: A,
    lose: AtomicUsize,
}

struct MaybeAcked<D> {
    inner: D,
    lost: bool,
}

impl<D: Delivery> Delivery for MaybeAcked<D> {
    fn decode(&self) -> Decoded {
        self.inner.decode()
    }
    fn ack(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        if self.lost {
            Box::pin(async { Ok(()) })
        } else {
            self.inner.ack()
        }
    }
    fn hold(&self) -> BoxFuture<'_, ()> {
        self.inner.hold()
    }
    fn retry_later(&self, delay: Duration) -> BoxFuture<'_, ()> {
        self.inner.retry_later(delay)
    }
}

impl<A: Adapter> Adapter for LosesAcks<A> {
    type Delivery = MaybeAcked<A::Delivery>;
    fn open(&self) -> BoxFuture<'_, Result<Deliveries<'_, Self::Delivery>, AdapterError>> {
        Box::pin(async move {
            let s = self.inner.open().await?;
            Ok(s.map(|d| {
                d.map(|inner| MaybeAcked {
                    inner,
                    lost: self
                        .lose
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok(),
                })
            })
            .boxed())
        })
    }
    fn hold_interval(&self) -> Option<Duration> {
        self.inner.hold_interval()
    }
}

async fn exactly_one_effect_under_redelivery<B: ConsumerBroker>(broker: &B) {
    let db = effects_db().await;
    let (name, topic) = ("conf-redelivery", "conf.redelivery");
    // 20 payments, each also re-published under a NEW message id (a producer's retry, which no
    // broker can drop); and the first 5 acks are lost, so the broker redelivers those.
    let mut msgs = Vec::new();
    for i in 0..20 {
        let m = message(topic, &format!("pay_{i}"), None, &format!("ok:{i}"));
        msgs.push(WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            ..m.clone()
        });
        msgs.push(m);
    }
    broker.publish(&msgs).await;
    let adapter = LosesAcks {
        inner: broker
            .adapter(name, topic, Duration::from_millis(1500))
            .await,
        lose: AtomicUsize::new(5),
    };
    let store = PgStore::new(pool(&db, 4), Arc::new(Effects::default()));
    let r = start(Runner::new(adapter, store, config(name)).unwrap());
    r.until("every payment and every re-send handled", |s| {
        n(&s.processed) == 20 && n(&s.duplicates) >= 20
    })
    .await;
    let first = n(&r.runner.stats().duplicates);
    r.stop().await.unwrap();
    // A new runner: the broker redelivers what was not acked (by its timer, or from the last
    // committed offset), and the inbox absorbs it.
    let adapter = broker
        .adapter(name, topic, Duration::from_millis(1500))
        .await;
    let store = PgStore::new(pool(&db, 4), Arc::new(Effects::default()));
    let r = start(Runner::new(adapter, store, config(name)).unwrap());
    drained(broker, name).await;
    let s = r.runner.stats();
    assert_eq!(n(&s.processed), 0, "no effect again");
    assert!(
        first + n(&s.duplicates) >= 25,
        "the 20 re-sends and the 5 lost acks came back as duplicates"
    );
    r.stop().await.unwrap();
    let fx = effects(&db).await;
    assert_eq!(fx.len(), 20, "exactly one effect per payment: {fx:?}");
    let distinct: HashSet<_> = fx.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(distinct.len(), 20);
}

async fn acks_only_after_commit<B: ConsumerBroker>(broker: &B) {
    let db = effects_db().await;
    let (name, topic) = ("conf-ack", "conf.ack");
    broker
        .publish(&[
            message(topic, "pay_block", None, "block:1"),
            message(topic, "pay_swallow", None, "swallow:1"),
        ])
        .await;
    let handler = Arc::new(Effects::default());
    let store = PgStore::new(pool(&db, 4), handler.clone());
    let adapter = broker.adapter(name, topic, Duration::from_secs(5)).await;
    let entered = handler.entered.notified();
    let r = start(Runner::new(adapter, store, config(name)).unwrap());
    tokio::time::timeout(Duration::from_secs(20), entered)
        .await
        .expect("the blocking message reaches its handler");
    // Inside the transaction: its effect is written but not committed, and the broker still
    // holds the message unacked.
    assert!(
        broker.unacked(name).await >= 1,
        "not acked before the commit"
    );
    assert!(effects(&db).await.is_empty(), "nothing committed yet");
    handler.release();
    // The swallowed SQL error is caught before COMMIT: never acked as processed; parked after
    // max_deliveries, with no inbox record and no effect.
    r.until(
        "the blocking message processed, the swallowing one parked",
        |s| n(&s.processed) == 1 && n(&s.parked) == 1,
    )
    .await;
    drained(broker, name).await;
    r.stop().await.unwrap();
    assert_eq!(
        effects(&db).await,
        vec![("pay_block".to_owned(), "block:1".to_owned())]
    );
    let c = db.client().await;
    let recorded: Vec<String> = c
        .query("SELECT biz_id FROM tidings.inbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        recorded,
        vec!["pay_block"],
        "no inbox record without its effect"
    );
    let err: String = c
        .query_one(
            "SELECT last_error FROM tidings.inbox_dead_letters WHERE biz_id = 'pay_swallow'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(err.contains("aborted"), "{err}");
}

async fn key_order_under_failures<B: ConsumerBroker>(broker: &B) {
    let db = effects_db().await;
    let (name, topic) = ("conf-order", "conf.order");
    // 4 keys x 5 messages, interleaved as a relay publishes them; index 1 of each key fails its
    // first attempt (counted), index 3 its first with a serialization failure (not counted).
    let mut msgs = Vec::new();
    for i in 0..5 {
        for k in 0..4 {
            let kind = match i {
                1 => "fail-once",
                3 => "transient-once",
                _ => "ok",
            };
            msgs.push(message(
                topic,
                &format!("pay_{k}_{i}"),
                Some(&format!("k{k}")),
                &format!("{kind}:k{k}:{i}"),
            ));
        }
    }
    broker.publish(&msgs).await;
    let adapter = broker.adapter(name, topic, Duration::from_secs(5)).await;
    let store = PgStore::new(pool(&db, 4), Arc::new(Effects::default()));
    let r = start(Runner::new(adapter, store, config(name)).unwrap());
    r.until("all 20 applied", |s| n(&s.processed) == 20).await;
    drained(broker, name).await;
    let s = r.runner.stats();
    assert_eq!(n(&s.parked), 0);
    assert_eq!(n(&s.failed), 4, "one counted failure per key");
    assert_eq!(n(&s.transient), 4, "one transient failure per key");
    r.stop().await.unwrap();
    let fx = effects(&db).await;
    for k in 0..4 {
        let of_key: Vec<String> = fx
            .iter()
            .map(|(_, p)| p.clone())
            .filter(|p| p.contains(&format!(":k{k}:")))
            .map(|p| p.rsplit(':').next().unwrap().to_owned())
            .collect();
        assert_eq!(
            of_key,
            ["0", "1", "2", "3", "4"],
            "key k{k} applied in order"
        );
    }
}

async fn a_failing_key_holds_only_itself_and_keeps_its_order_across_shutdown<B: ConsumerBroker>(
    broker: &B,
) {
    let db = effects_db().await;
    let (name, topic) = ("conf-stuck", "conf.stuck");
    // Key A's first message fails until fixed; four more of A queue behind it. Eight messages
    // of other keys must all go through meanwhile, with only two slots.
    let mut msgs = vec![message(topic, "a0", Some("A"), "fail:A:0")];
    for i in 1..5 {
        msgs.push(message(
            topic,
            &format!("a{i}"),
            Some("A"),
            &format!("ok:A:{i}"),
        ));
    }
    for i in 0..8 {
        msgs.push(message(
            topic,
            &format!("o{i}"),
            Some(&format!("O{i}")),
            &format!("ok:O{i}:0"),
        ));
    }
    broker.publish(&msgs).await;
    let handler = Arc::new(Effects::default());
    let slow_retries = RunnerConfig {
        concurrency: 2,
        max_deliveries: 1000,
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_millis(200),
        ..config(name)
    };
    let adapter = broker.adapter(name, topic, Duration::from_secs(5)).await;
    let store = PgStore::new(pool(&db, 4), handler.clone());
    let r = start(Runner::new(adapter, store, slow_retries.clone()).unwrap());
    r.until("the other keys processed while A fails", |s| {
        n(&s.processed) == 8 && n(&s.failed) >= 2
    })
    .await;
    // Shutdown while A's head waits for a retry: it is left unacked, and so is everything
    // queued behind it: none of A's later messages may run before it.
    r.stop().await.unwrap();
    let fx = effects(&db).await;
    assert_eq!(fx.len(), 8, "only the other keys: {fx:?}");
    assert!(fx.iter().all(|(b, _)| b.starts_with('o')), "{fx:?}");
    // (A broker may count a message given back for redelivery twice: pending and in flight.)
    assert!(
        broker.unacked(name).await >= 5,
        "A's five messages left for redelivery"
    );

    handler.fix();
    let adapter = broker.adapter(name, topic, Duration::from_secs(5)).await;
    let store = PgStore::new(pool(&db, 4), handler.clone());
    let r = start(Runner::new(adapter, store, slow_retries).unwrap());
    r.until("A redelivered and applied", |s| n(&s.processed) == 5)
        .await;
    drained(broker, name).await;
    r.stop().await.unwrap();
    let of_a: Vec<String> = effects(&db)
        .await
        .into_iter()
        .filter(|(b, _)| b.starts_with('a'))
        .map(|(b, _)| b)
        .collect();
    assert_eq!(
        of_a,
        ["a0", "a1", "a2", "a3", "a4"],
        "A in order after the restart"
    );
}

async fn parking_and_replay<B: ConsumerBroker>(broker: &B) {
    let db = effects_db().await;
    let (name, topic) = ("conf-park", "conf.park");
    broker
        .publish(&[
            message(topic, "pay_park", Some("k1"), "park:1"),
            message(topic, "pay_fail", Some("k2"), "fail:2"),
            message(topic, "pay_ok", None, "ok:3"),
        ])
        .await;
    let handler = Arc::new(Effects::default());
    let store = PgStore::new(pool(&db, 4), handler.clone());
    let adapter = broker.adapter(name, topic, Duration::from_secs(5)).await;
    let runner = Runner::new(adapter, store, config(name)).unwrap();
    let r = start(runner);
    r.until("two parked, one processed", |s| {
        n(&s.parked) == 2 && n(&s.processed) == 1
    })
    .await;
    drained(broker, name).await;
    let c = db.client().await;
    let parked = |biz: &'static str| {
        let c = &c;
        async move {
            c.query_opt(
                "SELECT deliveries, last_error, convert_from(payload, 'UTF8'), headers->>'traceparent',
                        ordering_key, created_at IS NOT NULL, replay_requested_at IS NOT NULL
                   FROM tidings.inbox_dead_letters WHERE consumer = $1 AND biz_id = $2",
                &[&name, &biz],
            )
            .await
            .unwrap()
            .map(|r| {
                (
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, Option<String>>(3),
                    r.get::<_, Option<String>>(4),
                    r.get::<_, bool>(5),
                    r.get::<_, bool>(6),
                )
            })
        }
    };
    let p = parked("pay_park").await.expect("parked at once");
    assert_eq!(p.0, 1, "a park-class error parks on the first delivery");
    assert!(p.1.contains("refused for good"), "{}", p.1);
    assert_eq!(p.2, "park:1", "payload kept");
    assert!(p.3.is_some(), "headers kept");
    assert_eq!(p.4.as_deref(), Some("k1"), "ordering key kept");
    assert!(p.5, "enqueue time kept");
    let f = parked("pay_fail").await.expect("parked after retries");
    assert_eq!(f.0, 3, "parked after max_deliveries");
    assert!(f.1.contains("still failing"), "{}", f.1);

    // A replay that fails again parks it again, with the request cleared.
    let request = |biz: &'static str| {
        let c = &c;
        async move {
            c.execute(
                "UPDATE tidings.inbox_dead_letters SET replay_requested_at = now()
                  WHERE consumer = $1 AND biz_id = $2",
                &[&name, &biz],
            )
            .await
            .unwrap()
        }
    };
    request("pay_fail").await;
    assert_eq!(r.runner.replay_parked().await.unwrap(), 0);
    let f = parked("pay_fail").await.expect("still parked");
    assert_eq!(f.0, 4, "one more delivery counted");
    assert!(!f.6, "request cleared");

    // Fixed: replayed by a direct call, then by the run loop's poll of a new runner.
    handler.fix();
    request("pay_fail").await;
    assert_eq!(r.runner.replay_parked().await.unwrap(), 1);
    assert!(
        parked("pay_fail").await.is_none(),
        "unparked with its effect"
    );
    r.stop().await.unwrap();

    let adapter = broker.adapter(name, topic, Duration::from_secs(5)).await;
    let store = PgStore::new(pool(&db, 4), handler.clone());
    let r = start(
        Runner::new(
            adapter,
            store,
            RunnerConfig {
                replay_poll_interval: Some(Duration::from_millis(50)),
                ..config(name)
            },
        )
        .unwrap(),
    );
    request("pay_park").await;
    r.until("the poll replays it", |s| n(&s.replayed) == 1)
        .await;
    assert!(parked("pay_park").await.is_none());
    // Replaying a message whose effect is already recorded is a duplicate: unparked, no effect.
    c.execute(
        "INSERT INTO tidings.inbox_dead_letters
                (consumer, message_id, biz_id, topic, payload, headers, deliveries, last_error,
                 replay_requested_at)
         VALUES ($1, gen_random_uuid(), 'pay_ok', $2, 'ok:3', '{}', 1, 'x', now())",
        &[&name, &topic],
    )
    .await
    .unwrap();
    r.until("the duplicate replay", |s| n(&s.replayed) == 2)
        .await;
    assert_eq!(n(&r.runner.stats().duplicates), 1);
    r.stop().await.unwrap();
    let left: i64 = c
        .query_one("SELECT count(*) FROM tidings.inbox_dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let mut fx: Vec<String> = effects(&db).await.into_iter().map(|(b, _)| b).collect();
    fx.sort();
    assert_eq!(fx, ["pay_fail", "pay_ok", "pay_park"], "one effect each");
}

async fn shutdown_with_messages_in_flight<B: ConsumerBroker>(broker: &B) {
    let db = effects_db().await;
    let (name, topic) = ("conf-shutdown", "conf.shutdown");
    broker
        .publish(&[
            message(topic, "pay_block", Some("a"), "block:1"),
            message(topic, "pay_ok", Some("b"), "ok:2"),
        ])
        .await;
    // A handler stuck past the deadline: abandoned unacked, its transaction rolled back.
    let handler = Arc::new(Effects::default());
    let adapter = broker.adapter(name, topic, Duration::from_secs(2)).await;
    let store = PgStore::new(pool(&db, 4), handler.clone());
    let entered = handler.entered.notified();
    let r = start(
        Runner::new(
            adapter,
            store,
            RunnerConfig {
                shutdown_timeout: Duration::from_millis(500),
                ..config(name)
            },
        )
        .unwrap(),
    );
    tokio::time::timeout(Duration::from_secs(20), entered)
        .await
        .expect("the blocking message reaches its handler");
    r.until("the other message processed and acked", |s| {
        n(&s.processed) == 1 && n(&s.acked) == 1
    })
    .await;
    let stopping = tokio::time::Instant::now();
    let res = r.stop().await;
    assert!(
        matches!(res, Err(tidings_inbox::Error::ShutdownTimeout(_))),
        "{res:?}"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "stopped at its deadline"
    );
    assert_eq!(
        broker.unacked(name).await,
        1,
        "the abandoned message is not acked"
    );

    // A new runner gets it again; in-flight work that finishes within the deadline is acked.
    let adapter = broker.adapter(name, topic, Duration::from_secs(2)).await;
    let store = PgStore::new(pool(&db, 4), handler.clone());
    let entered = handler.entered.notified();
    let r = start(Runner::new(adapter, store, config(name)).unwrap());
    tokio::time::timeout(Duration::from_secs(20), entered)
        .await
        .expect("redelivered to the new runner");
    r.stop.cancel();
    handler.release();
    r.stop().await.expect("finished within the deadline");
    drained(broker, name).await;
    let fx = effects(&db).await;
    assert_eq!(fx.len(), 2, "one effect each: {fx:?}");
}
