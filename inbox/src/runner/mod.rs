//! The broker-independent consumer runner: a broker adapter ([`Adapter`]) hands it deliveries,
//! a store ([`Store`]: tokio-postgres/deadpool or diesel-async) runs the handler and the inbox
//! record in one transaction, and the runner acks the broker only after that commit.
//!
//! What the runner guarantees, whatever the broker:
//! - **ack after commit**: a delivery is acked only after the transaction holding its effect and
//!   its inbox record committed (a handler that swallowed an SQL error is caught before COMMIT);
//!   a lost ack means a redelivery, which the inbox recognises;
//! - **per-key order**: messages of one ordering key are handled one at a time in arrival order,
//!   different keys and unkeyed messages concurrently (up to `concurrency` running; a key's
//!   later messages wait in its queue without a slot); a failing message is retried in place,
//!   with the broker told it is still being worked on, so later messages of its key never
//!   overtake it, not even at shutdown (they are given back after it);
//! - **error classes**: a handler error is retried later ([`HandlerError::retry`], the default
//!   for `?`) until `max_deliveries`, or parked at once ([`HandlerError::park`]); transient
//!   database conditions (serialization failure, deadlock, lock timeout, lost connection, empty
//!   pool) are retried without counting towards parking;
//! - **parking and replay**: a message given up on is kept in `tidings.inbox_dead_letters` with
//!   its payload, headers, key and error, then acked; `tidings inbox dlq replay` asks the runner
//!   to run it again, which it does from the database (no broker involved), deleting the parked
//!   row in the transaction of the effect;
//! - **no spinning**: a broker that fails to deliver (consumer deleted, connection lost) is
//!   reopened with a growing pause, never in a tight loop;
//! - **bounded shutdown**: on shutdown no new delivery is started, those in flight get
//!   `shutdown_timeout` to finish, and anything unfinished is left unacked for redelivery.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use tidings_outbox::{envelope, WireMessage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Error, Inbox};

#[cfg(feature = "diesel-async")]
pub mod diesel;
#[cfg(feature = "tokio-postgres")]
pub mod postgres;
#[cfg(feature = "sqlx")]
pub mod sqlx;

/// A message as a handler sees it: the message decoded from the wire format every sink writes
/// ([`WireMessage`]), plus what the broker says about this delivery. Derefs to the message
/// (`d.id`, `d.biz_id`, `d.payload`, ...).
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The message.
    pub message: WireMessage,
    /// Where the broker delivered it from: the NATS subject, Kafka topic, queue or stream.
    pub source: String,
    /// Which delivery this is (1 = first). For a replay of a parked message, one more than its
    /// deliveries so far.
    pub delivery: i64,
    /// Whether this is an operator's replay of a parked message (run from the database).
    pub replayed: bool,
}

impl std::ops::Deref for Delivered {
    type Target = WireMessage;
    fn deref(&self) -> &WireMessage {
        &self.message
    }
}

/// What a handler failure asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Roll back and try again later (with backoff), parking after `max_deliveries`.
    Retry,
    /// Roll back and park the message now: trying again cannot help (a payload that does not
    /// parse, a business rule that refuses it).
    Park,
}

/// A handler failure: its class and cause. Any error converts into one with `?` (class
/// [`ErrorClass::Retry`]); [`HandlerError::park`] asks for parking at once.
pub struct HandlerError {
    class: ErrorClass,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl HandlerError {
    /// A failure worth retrying later (the default for `?`).
    pub fn retry(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError {
            class: ErrorClass::Retry,
            source: e.into(),
        }
    }

    /// A failure no retry can fix: park the message now.
    pub fn park(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError {
            class: ErrorClass::Park,
            source: e.into(),
        }
    }

    /// Its class.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The cause.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

// HandlerError is deliberately not std::error::Error, so that every error converts into it.
impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::retry(e)
    }
}

impl std::fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}({:?})", self.class, self.source)
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&chain(&*self.source))
    }
}

/// An adapter's failure to receive (connection lost, consumer deleted, ...).
pub type AdapterError = Box<dyn std::error::Error + Send + Sync>;

/// The stream of deliveries an adapter opens.
pub type Deliveries<'a, D> = BoxStream<'a, Result<D, AdapterError>>;

/// A delivery read as a message.
#[derive(Debug)]
pub enum Decoded {
    /// A Tidings message.
    Message(Delivered),
    /// Not usable as one (no message id): parked under the fresh id of `parked_as`.
    Unusable {
        /// The delivery under a fresh message id, its payload and headers as received.
        parked_as: Delivered,
        /// Why it is not usable.
        reason: String,
    },
}

/// One delivery from a broker, as its adapter exposes it to the runner.
pub trait Delivery: Send + Sync + 'static {
    /// The message, decoded from the wire format. `Err` for a message without a usable message
    /// id (not from a Tidings relay): the runner parks it, under the fresh id the adapter gives
    /// it, with the reason.
    fn decode(&self) -> Decoded;

    /// Acknowledges it: the broker will not deliver it again (to this consumer).
    fn ack(&self) -> BoxFuture<'_, Result<(), AdapterError>>;

    /// Tells the broker the message is still being worked on (restarting its redelivery timer
    /// where it has one). Called every [`Adapter::hold_interval`] while the runner handles or
    /// retries it. The default does nothing.
    fn hold(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Gives the message back for a redelivery after about `delay` (zero: at once, to any
    /// consumer of the group). The runner calls it at shutdown for a message it leaves unfinished,
    /// a key's messages in arrival order, so that the broker redelivers them in that order. The
    /// default does nothing: the broker redelivers an unacked message on its own, when its
    /// timer expires.
    fn retry_later(&self, _delay: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// False once the broker has taken the message back on its own (its channel closed, its
    /// partition was revoked): another consumer may have it now, so the runner stops retrying
    /// or parking it and leaves it to that redelivery. The default: always live.
    fn is_live(&self) -> bool {
        true
    }
}

/// A broker's side of a consumer: opens a stream of deliveries for the runner.
pub trait Adapter: Send + Sync + 'static {
    /// The broker's delivery.
    type Delivery: Delivery;

    /// Opens (or reopens, after a failure) the stream of deliveries. An error item, or the
    /// stream ending, makes the runner reopen it after a pause that grows while nothing is
    /// delivered.
    fn open(&self) -> BoxFuture<'_, Result<Deliveries<'_, Self::Delivery>, AdapterError>>;

    /// Flushes what the adapter still buffers (acks) to the broker; called once when
    /// [`Runner::run`] ends, bounded by a few seconds. The default does nothing.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// How often [`Delivery::hold`] must be called to keep a message from being redelivered
    /// while it is handled or waits for a retry; `None` when the broker has no such timer.
    fn hold_interval(&self) -> Option<Duration>;
}

/// The outcome of one inbox transaction.
#[derive(Debug)]
pub enum Step {
    /// The effect committed with its inbox record.
    Processed,
    /// The inbox already held the key: the effect was skipped (and the transaction committed).
    Duplicate,
    /// The handler failed: rolled back.
    Failed(HandlerError),
    /// A replay found its parked row gone (purged, or replayed by another runner, since it was
    /// read): nothing was done.
    NotParked,
}

/// The store's transaction, with a panic inside it (the handler's code, on this message's
/// content) turned into a failed handler run like any other: its transaction was dropped and
/// rolls back, the message is retried and parked at `max_deliveries`, and the runner, or the
/// webhook receiver, goes on with the next message. The panic's own text is not kept (it may
/// quote the message); the process's panic hook still prints it.
pub(crate) async fn transact_caught<S: Store + ?Sized>(
    store: &S,
    inbox: &Inbox,
    d: &Delivered,
) -> Result<Step, Error> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(store.transact(inbox, d))
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            tracing::error!(message_id = %d.id, "the handler panicked; its transaction rolled back");
            Ok(Step::Failed(HandlerError::retry("the handler panicked")))
        }
    }
}

/// A duplicate hook, with a panic inside it turned into its error. The hook runs in a savepoint
/// after the message's effect was already committed once: failing, or panicking, it must not
/// fail the message; its savepoint is rolled back and the delivery is still a duplicate.
pub(crate) async fn hook_caught(
    hook: impl std::future::Future<Output = Result<(), HandlerError>>,
) -> Result<(), HandlerError> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(hook)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(HandlerError::retry("the duplicate hook panicked")))
}

/// A parked message as the runner writes it.
#[derive(Debug)]
pub struct Parked<'a> {
    /// The consumer.
    pub consumer: &'a str,
    /// The message.
    pub message: &'a Delivered,
    /// Deliveries so far.
    pub deliveries: i32,
    /// Why it was parked, with its sources.
    pub error: &'a str,
}

/// The database side of a runner: runs a handler with the inbox record in one transaction,
/// parks messages, and reads the replays an operator asked for. Implemented for tokio-postgres
/// through deadpool ([`postgres::PgStore`]) and for diesel-async ([`diesel::DieselStore`]).
pub trait Store: Send + Sync + 'static {
    /// One transaction: record the message's dedup key in `inbox`; on a first delivery run the
    /// handler; commit unless it failed. With `replayed`, the parked row of the message is
    /// deleted in the same transaction.
    fn transact<'a>(
        &'a self,
        inbox: &'a Inbox,
        d: &'a Delivered,
    ) -> BoxFuture<'a, Result<Step, Error>>;

    /// Keeps a message the runner gave up on (replacing an earlier parking of it, and clearing
    /// a replay request).
    fn park<'a>(&'a self, parked: Parked<'a>) -> BoxFuture<'a, Result<(), Error>>;

    /// Up to `limit` parked messages of `consumer` whose replay was requested, oldest first.
    fn replays<'a>(
        &'a self,
        consumer: &'a str,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<Delivered>, Error>>;

    /// Whether an error (a handler's cause or the store's own) is a transient database
    /// condition: retried without counting towards parking.
    fn is_transient(&self, e: &(dyn std::error::Error + 'static)) -> bool;
}

/// Runner settings (a broker adapter's own settings live in the adapter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Inbox consumer name (1-512 bytes, no control characters). Deduplication is per (name,
    /// biz-id).
    pub name: String,
    /// Messages handled at once (different keys). Defaults to 16.
    pub concurrency: usize,
    /// Deliveries before a failing message is parked. Defaults to 5.
    pub max_deliveries: i64,
    /// Delay of the first retry after a failure; doubles per delivery. Defaults to 1 second.
    pub backoff_base: Duration,
    /// Longest retry delay. Defaults to 1 minute.
    pub backoff_max: Duration,
    /// How often the runner looks for replays an operator asked for; `None` turns replays off
    /// (call [`Runner::replay_parked`] yourself). Defaults to 5 seconds.
    pub replay_poll_interval: Option<Duration>,
    /// How long messages in flight may take to finish after shutdown is asked for; past it they
    /// are abandoned unacked (the broker redelivers them) and `run` returns
    /// [`Error::ShutdownTimeout`]. Defaults to 10 seconds.
    pub shutdown_timeout: Duration,
    /// Longest pause before reopening a broker stream that failed. Defaults to 30 seconds.
    pub reopen_backoff_max: Duration,
    /// Longest one database step may take: a message's whole inbox transaction (the handler
    /// included), a parking, a read of requested replays. Past it the step counts as a
    /// transient failure (rolled back, retried, not counted). Defaults to 60 seconds.
    pub db_timeout: Duration,
    /// Longest wait for the broker to take an ack or an in-progress signal. Defaults to 5
    /// seconds.
    pub ack_timeout: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            name: "tidings-consumer".into(),
            concurrency: 16,
            max_deliveries: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            replay_poll_interval: Some(Duration::from_secs(5)),
            shutdown_timeout: Duration::from_secs(10),
            reopen_backoff_max: Duration::from_secs(30),
            db_timeout: Duration::from_secs(60),
            ack_timeout: Duration::from_secs(5),
        }
    }
}

impl RunnerConfig {
    /// Checks the settings together.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |reason| {
            Err(Error::Invalid {
                what: "consumer config",
                reason,
            })
        };
        if self.concurrency == 0 || self.max_deliveries < 1 {
            return bad("concurrency and max_deliveries must be at least 1");
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return bad("backoff_base must be above 0 and backoff_max at least backoff_base");
        }
        if self.shutdown_timeout.is_zero()
            || self.reopen_backoff_max.is_zero()
            || self.db_timeout.is_zero()
            || self.ack_timeout.is_zero()
        {
            return bad(
                "shutdown_timeout, reopen_backoff_max, db_timeout and ack_timeout must be above 0",
            );
        }
        if self.replay_poll_interval.is_some_and(|d| d.is_zero()) {
            return bad("replay_poll_interval must be above 0 (or None)");
        }
        Ok(())
    }
}

/// Counters of one runner (since it started).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Effects committed.
    pub processed: AtomicU64,
    /// Redeliveries the inbox recognised (effect skipped).
    pub duplicates: AtomicU64,
    /// Failed handler runs counted towards parking (rolled back, retried or parked).
    pub failed: AtomicU64,
    /// Transient database failures (retried, not counted).
    pub transient: AtomicU64,
    /// Messages parked.
    pub parked: AtomicU64,
    /// Parked messages replayed (effect committed, or found a duplicate, and the parked row
    /// deleted).
    pub replayed: AtomicU64,
    /// Broker stream failures (each followed by a growing pause before reopening).
    pub receive_errors: AtomicU64,
    /// Messages acked (after their commit, or after parking).
    pub acked: AtomicU64,
    /// Acks the broker refused or lost (the redelivery is recognised by the inbox).
    pub ack_errors: AtomicU64,
}

/// A database step or broker call that did not finish in time.
#[derive(Debug)]
pub(crate) struct TimedOut(pub(crate) &'static str, pub(crate) Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} did not finish within {:?}", self.0, self.1)
    }
}

impl std::error::Error for TimedOut {}

/// Longest wait for an adapter's close (flush) when `run` ends.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What consumers record through the `metrics` facade (nothing happens unless the application
/// installs a recorder). One label, `consumer` (the inbox consumer name); never a message id or
/// a biz-id.
pub mod metric {
    /// Effects committed.
    pub const PROCESSED: &str = "tidings_consumer_processed_total";
    /// Redeliveries the inbox recognised (effect skipped).
    pub const DUPLICATES: &str = "tidings_consumer_duplicates_absorbed_total";
    /// Handler runs that failed (counted towards parking).
    pub const FAILED: &str = "tidings_consumer_failed_total";
    /// Transient database failures (retried, not counted).
    pub const TRANSIENT: &str = "tidings_consumer_transient_failures_total";
    /// Messages parked in `tidings.inbox_dead_letters`.
    pub const PARKED: &str = "tidings_consumer_parked_total";
    /// Parked messages replayed.
    pub const REPLAYED: &str = "tidings_consumer_replayed_total";
    /// Broker stream failures.
    pub const RECEIVE_ERRORS: &str = "tidings_consumer_receive_errors_total";
    /// Seconds of one inbox transaction (record, handler, commit).
    pub const HANDLER_SECONDS: &str = "tidings_consumer_handler_duration_seconds";
    /// Seconds from the producer's enqueue (the message's created time) to its receipt by the
    /// consumer.
    pub const LAG_SECONDS: &str = "tidings_consumer_lag_seconds";
}

/// Counts one event in a runner's stats and in the metrics facade.
pub(crate) fn note(stats: &AtomicU64, name: &'static str, consumer: &str) {
    bump(stats);
    metrics::counter!(name, "consumer" => consumer.to_owned()).increment(1);
}

/// Whether a SQLSTATE is a transient database condition: serialization failure (40001),
/// deadlock (40P01), lock not available (55P03), an administrator's or crash shutdown
/// (57P01-57P03), or a connection failure (class 08). Shared by the stores' `is_transient`.
#[cfg(any(feature = "tokio-postgres", feature = "sqlx"))]
pub(crate) fn transient_sqlstate(code: &str) -> bool {
    ["40001", "40P01", "55P03", "57P01", "57P02", "57P03"].contains(&code) || code.starts_with("08")
}

/// Parks `d` for `consumer` through `store` and counts it (the runner and the webhook receiver).
/// PostgreSQL text and jsonb cannot hold NUL: a message carrying one is parked with it replaced
/// (U+FFFD), never refused (the payload, bytea, is kept as it came).
pub(crate) async fn park<S: Store>(
    store: &S,
    consumer: &str,
    stats: &ConsumerStats,
    d: &Delivered,
    error: &str,
) -> Result<(), Error> {
    let clean;
    let d = if has_nul(d) {
        clean = without_nul(d);
        &clean
    } else {
        d
    };
    store
        .park(Parked {
            consumer,
            message: d,
            deliveries: d.delivery.clamp(0, i32::MAX as i64) as i32,
            error: &error.replace('\0', "\u{fffd}"),
        })
        .await?;
    note(&stats.parked, metric::PARKED, consumer);
    tracing::error!(%error, deliveries = d.delivery, message_id = %d.id,
        "message parked in tidings.inbox_dead_letters");
    Ok(())
}

/// Records the lag of a received message (now minus its created time), when it has one.
pub(crate) fn record_lag(consumer: &str, d: &Delivered) {
    if let Some(t) = d.created_at {
        let lag = (chrono::Utc::now() - t)
            .num_microseconds()
            .unwrap_or(0)
            .max(0) as f64
            / 1e6;
        metrics::histogram!(metric::LAG_SECONDS, "consumer" => consumer.to_owned()).record(lag);
    }
}

/// A consumer runner: one broker adapter, one store, one inbox consumer name.
pub struct Runner<A: Adapter, S: Store> {
    adapter: A,
    store: S,
    inbox: Inbox,
    config: RunnerConfig,
    stats: Arc<ConsumerStats>,
    /// The broker's stream is open.
    receiving: std::sync::atomic::AtomicBool,
    /// The last inbox transaction failed on the database (cleared by the next that commits).
    db_failing: std::sync::atomic::AtomicBool,
}

/// Whether a consumer can work now ([`Runner::readiness`]), for an application's readiness
/// probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Everything below is fine.
    pub ready: bool,
    /// What is not, one line each.
    pub reasons: Vec<String>,
}

impl Readiness {
    /// As JSON: `{"ready":false,"reasons":["..."]}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({"ready": self.ready, "reasons": self.reasons}).to_string()
    }
}

impl<A: Adapter, S: Store> Runner<A, S> {
    /// A runner of `adapter`'s deliveries through `store`, after checking `config`.
    pub fn new(adapter: A, store: S, config: RunnerConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Runner {
            inbox: Inbox::new(config.name.clone())?,
            adapter,
            store,
            config,
            stats: Arc::new(ConsumerStats::default()),
            receiving: Default::default(),
            db_failing: Default::default(),
        })
    }

    fn note(&self, c: &AtomicU64, name: &'static str) {
        note(c, name, &self.config.name);
    }

    /// Whether the runner can work now: its broker stream is open (not reopening after a
    /// failure) and its last inbox transaction did not fail on the database. No I/O: cheap
    /// enough for every probe.
    pub fn readiness(&self) -> Readiness {
        let mut reasons = Vec::new();
        if !self.receiving.load(Ordering::Relaxed) {
            reasons.push(
                "broker: the stream is not open (connecting, or reopening after a failure)"
                    .to_owned(),
            );
        }
        if self.db_failing.load(Ordering::Relaxed) {
            reasons.push("database: the last inbox transaction failed".to_owned());
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
        }
    }

    /// The runner's counters.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// The broker adapter.
    pub fn adapter(&self) -> &A {
        &self.adapter
    }

    /// The settings.
    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// Consumes until `shutdown` is cancelled, and runs requested replays every
    /// `replay_poll_interval`. Messages in flight at shutdown get `shutdown_timeout` to finish
    /// (committed and acked, or rolled back and left for redelivery).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), Error> {
        let work = async {
            tokio::join!(self.consume(&shutdown), self.poll_replays(&shutdown));
        };
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(self.config.shutdown_timeout).await;
        };
        let result = tokio::select! {
            () = work => Ok(()),
            () = deadline => {
                tracing::warn!(timeout = ?self.config.shutdown_timeout,
                    "messages in flight did not finish in time; left unacked for redelivery");
                Err(Error::ShutdownTimeout(self.config.shutdown_timeout))
            }
        };
        // The last acks may still sit in the client's buffer: a process that exits right after
        // `run` returns would otherwise lose them (and get those messages redelivered).
        if tokio::time::timeout(CLOSE_TIMEOUT, self.adapter.close())
            .await
            .is_err()
        {
            tracing::warn!("the broker did not take the last acks within {CLOSE_TIMEOUT:?}");
        }
        result
    }

    async fn poll_replays(&self, shutdown: &CancellationToken) {
        let Some(every) = self.config.replay_poll_interval else {
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.replay_parked().await {
                tracing::warn!(error = %chain(&e), "cannot read requested replays; will retry");
            }
        }
    }

    /// Runs the replays an operator asked for (`tidings inbox dlq replay`), oldest first, one
    /// at a time: each runs the handler with the inbox record and deletes its parked row in one
    /// transaction; a failure parks it again with the new error (and clears the request).
    /// Returns how many were replayed (processed or found to be duplicates).
    pub async fn replay_parked(&self) -> Result<u64, Error> {
        let mut done = 0;
        loop {
            let batch = tokio::time::timeout(
                self.config.db_timeout,
                self.store.replays(&self.config.name, 100),
            )
            .await
            .map_err(|_| {
                Error::Database(Box::new(TimedOut(
                    "reading requested replays",
                    self.config.db_timeout,
                )))
            })??;
            let n = batch.len();
            let mut progressed = false;
            for d in batch {
                let span = consume_span(&self.config.name, &d);
                let outcome = async {
                    match self.transact(&d).await {
                        Ok(Step::NotParked) => Ok(false),
                        Ok(Step::Processed) => {
                            self.note(&self.stats.processed, metric::PROCESSED);
                            Ok(true)
                        }
                        Ok(Step::Duplicate) => {
                            self.note(&self.stats.duplicates, metric::DUPLICATES);
                            Ok(true)
                        }
                        Ok(Step::Failed(e)) if self.store.is_transient(e.cause()) => {
                            self.note(&self.stats.transient, metric::TRANSIENT);
                            Ok(false)
                        }
                        Err(e) if self.store.is_transient(&e) => Err(e),
                        Ok(Step::Failed(e)) => {
                            self.note(&self.stats.failed, metric::FAILED);
                            self.bounded_park(&d, &e.to_string()).await.map(|()| false)
                        }
                        Err(e) => {
                            self.note(&self.stats.failed, metric::FAILED);
                            self.bounded_park(&d, &chain(&e)).await.map(|()| false)
                        }
                    }
                }
                .instrument(span)
                .await?;
                if outcome {
                    self.note(&self.stats.replayed, metric::REPLAYED);
                    tracing::info!(message_id = %d.id, consumer = %self.config.name, "parked message replayed");
                    done += 1;
                    progressed = true;
                }
            }
            // A batch that made no progress (transient failures) is retried at the next poll.
            if n < 100 || !progressed {
                return Ok(done);
            }
        }
    }

    async fn bounded_park(&self, d: &Delivered, error: &str) -> Result<(), Error> {
        tokio::time::timeout(self.config.db_timeout, self.park(d, error))
            .await
            .unwrap_or_else(|_| {
                Err(Error::Database(Box::new(TimedOut(
                    "parking",
                    self.config.db_timeout,
                ))))
            })
    }

    async fn park(&self, d: &Delivered, error: &str) -> Result<(), Error> {
        park(&self.store, &self.config.name, &self.stats, d, error).await
    }

    async fn consume(&self, shutdown: &CancellationToken) {
        // Consecutive opens that delivered nothing: the pause before the next grows with them.
        let mut idle_failures = 0u32;
        while !shutdown.is_cancelled() {
            let stream = match self.adapter.open().await {
                Ok(s) => s,
                Err(e) => {
                    self.note(&self.stats.receive_errors, metric::RECEIVE_ERRORS);
                    idle_failures += 1;
                    tracing::warn!(error = %chain(&*e), "cannot open the broker's stream; retrying");
                    if !self.pause(idle_failures, shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            self.receiving.store(true, Ordering::Relaxed);
            let (delivered, failed) = self.dispatch(stream, shutdown).await;
            self.receiving.store(false, Ordering::Relaxed);
            if shutdown.is_cancelled() {
                return;
            }
            if delivered > 0 {
                idle_failures = 0;
            }
            idle_failures += 1;
            if !failed {
                tracing::debug!("broker stream ended; reopening");
            }
            if !self.pause(idle_failures, shutdown).await {
                return;
            }
        }
    }

    /// Runs one opened stream until it fails or ends, or shutdown; returns how many deliveries
    /// it gave and whether it failed.
    ///
    /// Per-key order: a message whose key has a message running waits in that key's queue and
    /// starts only after it, in arrival order, and only if it was acked (a predecessor left
    /// unacked, at shutdown, makes the key's queued messages wait for their redelivery too, so
    /// they never overtake it). Only running messages take one of the `concurrency` slots, so
    /// a key whose message keeps failing holds only that key. Queued messages are held at the
    /// broker like running ones. After shutdown no message starts; the running ones finish.
    async fn dispatch(
        &self,
        stream: Deliveries<'_, A::Delivery>,
        shutdown: &CancellationToken,
    ) -> (u64, bool) {
        type Job<D> = (D, Decoded);
        let mut stream = stream.fuse();
        let mut running = futures::stream::FuturesUnordered::new();
        let mut queued: HashMap<String, VecDeque<Job<A::Delivery>>> = HashMap::new();
        let mut queued_len = 0usize;
        // Queued messages beyond this stop the reading (the broker's own in-flight limit
        // normally stops it first).
        let queue_cap = self.config.concurrency.saturating_mul(64);
        let (mut delivered, mut failed, mut reading) = (0u64, false, true);
        let hold_every = self
            .adapter
            .hold_interval()
            .unwrap_or(Duration::from_secs(3600));
        let mut hold_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + hold_every, hold_every);
        let start = |job: Job<A::Delivery>, key: Option<String>| async move {
            let acked = self.handle(&job.0, job.1, shutdown).await;
            (key, acked)
        };
        loop {
            if !reading && running.is_empty() {
                break;
            }
            let room = running.len() < self.config.concurrency && queued_len < queue_cap;
            tokio::select! {
                biased;
                Some((key, acked)) = running.next(), if !running.is_empty() => {
                    let Some(key) = key else { continue };
                    let next = match queued.get_mut(&key) {
                        Some(q) if acked && !shutdown.is_cancelled() => q.pop_front(),
                        _ => None,
                    };
                    match next {
                        Some(job) => {
                            queued_len -= 1;
                            running.push(start(job, Some(key)));
                        }
                        None => {
                            // The key is idle, or its queued messages are given back behind a
                            // predecessor left for redelivery, in arrival order (the broker
                            // then redelivers them in that order).
                            if let Some(q) = queued.remove(&key) {
                                queued_len -= q.len();
                                for (d, _) in &q {
                                    self.give_back(d).await;
                                }
                            }
                        }
                    }
                }
                () = shutdown.cancelled(), if reading => {
                    reading = false;
                    // Read no more: a pull left open would take deliveries nobody handles.
                    stream = futures::stream::empty().boxed().fuse();
                }
                item = stream.next(), if reading && room => match item {
                    Some(Ok(delivery)) => {
                        delivered += 1;
                        let decoded = delivery.decode();
                        let key = match &decoded {
                            Decoded::Message(d) => d.key.clone(),
                            Decoded::Unusable { .. } => None,
                        };
                        match key {
                            Some(k) => match queued.get_mut(&k) {
                                Some(q) => {
                                    q.push_back((delivery, decoded));
                                    queued_len += 1;
                                }
                                None => {
                                    queued.insert(k.clone(), VecDeque::new());
                                    running.push(start((delivery, decoded), Some(k)));
                                }
                            },
                            None => running.push(start((delivery, decoded), None)),
                        }
                    }
                    Some(Err(e)) => {
                        self.note(&self.stats.receive_errors, metric::RECEIVE_ERRORS);
                        tracing::warn!(error = %chain(&*e), "broker stream failed; reopening");
                        (reading, failed) = (false, true);
                        self.receiving.store(false, Ordering::Relaxed);
                    }
                    None => {
                        reading = false;
                        self.receiving.store(false, Ordering::Relaxed);
                    }
                },
                _ = hold_tick.tick(), if queued_len > 0 => {
                    let holds = queued.values().flatten().map(|(d, _)| self.bounded_hold(d));
                    futures::future::join_all(holds).await;
                }
            }
        }
        (delivered, failed)
    }

    /// Gives a message back for an immediate redelivery (to another runner), bounded.
    async fn give_back(&self, delivery: &A::Delivery) {
        if tokio::time::timeout(
            self.config.ack_timeout,
            delivery.retry_later(Duration::ZERO),
        )
        .await
        .is_err()
        {
            tracing::debug!("the broker did not take a message back in time");
        }
    }

    async fn bounded_hold(&self, delivery: &A::Delivery) {
        if tokio::time::timeout(self.config.ack_timeout, delivery.hold())
            .await
            .is_err()
        {
            tracing::debug!("the broker did not take an in-progress signal in time");
        }
    }

    /// Waits before reopening: 100 ms doubling per consecutive idle failure, up to
    /// `reopen_backoff_max`. False when shutdown came first.
    async fn pause(&self, failures: u32, shutdown: &CancellationToken) -> bool {
        let pause = (Duration::from_millis(100) * 2u32.pow(failures.saturating_sub(1).min(12)))
            .min(self.config.reopen_backoff_max);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }

    /// Handles one delivery until it is acked (true: committed, or parked) or left unacked for
    /// the broker to redeliver (false: shutdown came first).
    async fn handle(
        &self,
        delivery: &A::Delivery,
        decoded: Decoded,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut d = match decoded {
            Decoded::Message(d) => d,
            Decoded::Unusable {
                parked_as: d,
                reason,
            } => {
                // Not from a Tidings relay (no usable message id): parked rather than dropped.
                tracing::error!(source = %d.source, %reason, "undecodable message");
                return self
                    .holding(delivery, self.give_up(delivery, &d, &reason, shutdown))
                    .await;
            }
        };
        let span = consume_span(&self.config.name, &d);
        if d.delivery <= 1 {
            record_lag(&self.config.name, &d);
        }
        let work = async {
            loop {
                let failure = match self.transact(&d).await {
                    Ok(step @ (Step::Processed | Step::Duplicate)) => {
                        if matches!(step, Step::Processed) {
                            self.note(&self.stats.processed, metric::PROCESSED);
                        } else {
                            self.note(&self.stats.duplicates, metric::DUPLICATES);
                            tracing::debug!("redelivery recognised by the inbox; effect skipped");
                        }
                        // Acked only now, after the commit. A lost ack means a redelivery,
                        // which the inbox recognises.
                        self.ack(delivery).await;
                        return true;
                    }
                    Ok(Step::NotParked) => unreachable!("only replays unpark"),
                    Ok(Step::Failed(e)) => e,
                    // A message the inbox refuses (its dedup key breaks the rules): no retry
                    // can fix it.
                    Err(e @ Error::Invalid { .. }) => HandlerError::park(e),
                    // The inbox transaction itself failed (database down, a failing COMMIT).
                    Err(e) => HandlerError::retry(e),
                };
                if !delivery.is_live() {
                    // Retrying or parking it here would race the consumer that has it now.
                    tracing::debug!(error = %failure, "the broker took the message back; left to its redelivery");
                    return false;
                }
                let transient = failure.class() == ErrorClass::Retry
                    && self.store.is_transient(failure.cause());
                if transient {
                    self.note(&self.stats.transient, metric::TRANSIENT);
                } else {
                    self.note(&self.stats.failed, metric::FAILED);
                    if failure.class() == ErrorClass::Park
                        || d.delivery >= self.config.max_deliveries
                    {
                        return self
                            .give_up(delivery, &d, &failure.to_string(), shutdown)
                            .await;
                    }
                }
                // Retried here, not by the broker: later messages of this key wait behind it
                // (a broker redelivery would let them overtake it).
                let delay = self.backoff(d.delivery);
                tracing::warn!(error = %failure, retry_in = ?delay, transient, "handler failed; will retry");
                if !self.wait(delay, shutdown).await {
                    // Shutting down: given back for redelivery (before the key's later ones).
                    self.give_back(delivery).await;
                    return false;
                }
                if !transient {
                    d.delivery += 1;
                }
            }
        };
        self.holding(delivery, work).instrument(span).await
    }

    /// One inbox transaction, bounded by `db_timeout` (expiry is a transient failure: the
    /// transaction is dropped and rolls back, or had committed and the retry finds the record).
    async fn transact(&self, d: &Delivered) -> Result<Step, Error> {
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(
            self.config.db_timeout,
            transact_caught(&self.store, &self.inbox, d),
        )
        .await;
        metrics::histogram!(metric::HANDLER_SECONDS, "consumer" => self.config.name.clone())
            .record(started.elapsed().as_secs_f64());
        // Only what says the database cannot work now: a transient condition or no answer (an
        // error about one message, which gets parked, says nothing about readiness).
        let db_failed = match &r {
            Ok(Ok(Step::Failed(e))) => self.store.is_transient(e.cause()),
            Ok(Ok(_)) => false,
            Ok(Err(e)) => self.store.is_transient(e),
            Err(_) => true,
        };
        self.db_failing.store(db_failed, Ordering::Relaxed);
        match r {
            Ok(r) => r,
            Err(_) => Ok(Step::Failed(HandlerError::retry(TimedOut(
                "the inbox transaction",
                self.config.db_timeout,
            )))),
        }
    }

    /// Acks, bounded by `ack_timeout`; a failed or lost ack means a redelivery, which the inbox
    /// recognises.
    async fn ack(&self, delivery: &A::Delivery) {
        match tokio::time::timeout(self.config.ack_timeout, delivery.ack()).await {
            Ok(Ok(())) => bump(&self.stats.acked),
            Ok(Err(e)) => {
                bump(&self.stats.ack_errors);
                tracing::warn!(error = %chain(&*e), "ack failed; the redelivery will be recognised");
            }
            Err(_) => {
                bump(&self.stats.ack_errors);
                tracing::warn!(timeout = ?self.config.ack_timeout, "ack not taken in time; the redelivery will be recognised");
            }
        }
    }

    /// Parks a message, then acks it. Parking that fails (database down) is retried in place,
    /// holding the message, so its key's later messages still wait behind it; false when
    /// shutdown came first (left unacked).
    async fn give_up(
        &self,
        delivery: &A::Delivery,
        d: &Delivered,
        error: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut tries = 0u32;
        loop {
            match self.bounded_park(d, error).await {
                Ok(()) => {
                    self.ack(delivery).await;
                    return true;
                }
                Err(e) => {
                    tries += 1;
                    let delay = self.backoff(i64::from(tries));
                    tracing::error!(error = %chain(&e), retry_in = ?delay, "cannot park message; will retry");
                    if !self.wait(delay, shutdown).await {
                        self.give_back(delivery).await;
                        return false;
                    }
                }
            }
        }
    }

    /// Runs `work` while telling the broker, every hold interval, that the message is still
    /// being worked on.
    async fn holding(
        &self,
        delivery: &A::Delivery,
        work: impl std::future::Future<Output = bool>,
    ) -> bool {
        let Some(every) = self.adapter.hold_interval() else {
            return work.await;
        };
        let keep = async {
            loop {
                tokio::time::sleep(every).await;
                self.bounded_hold(delivery).await;
            }
        };
        tokio::select! {
            acked = work => acked,
            () = keep => unreachable!("holding never ends"),
        }
    }

    /// Waits `delay`; false when shutdown came first.
    async fn wait(&self, delay: Duration, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    fn backoff(&self, delivery: i64) -> Duration {
        let exp = self
            .config
            .backoff_base
            .saturating_mul(1u32 << (delivery - 1).clamp(0, 20) as u32);
        exp.min(self.config.backoff_max)
    }
}

/// The span of one message's handling, carrying the producer's W3C trace context: as fields
/// always, and as the OpenTelemetry parent with the `opentelemetry` feature.
pub(crate) fn consume_span(consumer: &str, d: &Delivered) -> tracing::Span {
    let traceparent = d
        .headers
        .get(envelope::HEADER_TRACEPARENT)
        .map(String::as_str)
        .unwrap_or_default();
    let mut parts = traceparent.split('-');
    let (trace_id, parent_id) = (parts.nth(1).unwrap_or(""), parts.next().unwrap_or(""));
    let span = tracing::info_span!("tidings_consume", consumer = %consumer,
        message_id = %d.id, biz_id = d.biz_id.as_deref().unwrap_or(""),
        delivery = d.delivery, replayed = d.replayed, trace_id, parent_span_id = parent_id);
    #[cfg(feature = "opentelemetry")]
    set_remote_parent(
        &span,
        traceparent,
        d.headers.get("tracestate").map(String::as_str),
    );
    span
}

/// Makes `span` a child of the remote span named by a W3C `traceparent`
/// (`00-<trace id>-<parent span id>-<flags>`); ignores a malformed one.
#[cfg(feature = "opentelemetry")]
fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    tidings_outbox::trace::set_parent(span, traceparent, tracestate);
}

/// An error with its sources, as stored in `last_error` (driver errors say little on their own).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// park_message: keep a message the consumer gave up on, with its error; a later parking of
/// the same message replaces the bookkeeping and clears a replay request.
/// $1 consumer, $2 message id, $3 biz-id, $4 topic, $5 ordering key, $6 payload, $7 headers,
/// $8 created at, $9 deliveries, $10 last error.
pub(crate) const PARK: &str = "\
INSERT INTO tidings.inbox_dead_letters
       (consumer, message_id, biz_id, topic, ordering_key, payload, headers, created_at,
        deliveries, last_error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (consumer, message_id) DO UPDATE
   SET deliveries = excluded.deliveries, last_error = excluded.last_error, dead_at = now(),
       replay_requested_at = NULL";

/// replays: the parked messages of $1 whose replay was requested, oldest parking first, at most
/// $2. Two runners of one consumer may read the same row: the inbox record makes the second a
/// duplicate (its INSERT waits for the first transaction), so the effect still runs once.
pub(crate) const REPLAYS: &str = "\
SELECT message_id, biz_id, topic, ordering_key, payload, headers::text, created_at, deliveries
  FROM tidings.inbox_dead_letters
 WHERE consumer = $1 AND replay_requested_at IS NOT NULL
 ORDER BY dead_at
 LIMIT $2";

/// unpark: the replayed message's parked row goes in the transaction of its effect, first
/// (so a concurrent purge or replay waits for it, and one that came first leaves 0 rows: then
/// nothing is done). $1 consumer, $2 message id.
pub(crate) const UNPARK: &str = "DELETE FROM tidings.inbox_dead_letters \
     WHERE consumer = $1 AND message_id = $2 AND replay_requested_at IS NOT NULL";

pub(crate) fn has_nul(d: &Delivered) -> bool {
    let nul = |s: &str| s.contains('\0');
    nul(&d.topic)
        || d.key.as_deref().is_some_and(nul)
        || d.biz_id.as_deref().is_some_and(nul)
        || d.headers.iter().any(|(k, v)| nul(k) || nul(v))
}

pub(crate) fn without_nul(d: &Delivered) -> Delivered {
    let fix = |s: &str| s.replace('\0', "\u{fffd}");
    let mut d = d.clone();
    d.message.topic = fix(&d.message.topic);
    d.message.key = d.message.key.as_deref().map(fix);
    d.message.biz_id = d.message.biz_id.as_deref().map(fix);
    d.message.headers = d
        .message
        .headers
        .iter()
        .map(|(k, v)| (fix(k), fix(v)))
        .collect();
    d
}

/// Headers as stored in `inbox_dead_letters.headers` (a JSON object of strings).
pub(crate) fn headers_json(d: &Delivered) -> serde_json::Value {
    serde_json::Value::Object(
        d.headers
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// A parked row read back for a replay.
#[allow(clippy::too_many_arguments)]
pub(crate) fn replayed(
    id: uuid::Uuid,
    biz_id: Option<String>,
    topic: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: &str,
    created_at: Option<chrono::DateTime<chrono::Utc>>,
    deliveries: i32,
) -> Delivered {
    let headers: BTreeMap<String, String> =
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(headers)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(s) => Some((k, s)),
                _ => None,
            })
            .collect();
    Delivered {
        message: WireMessage {
            id: tidings_outbox::MessageId::from_uuid(id),
            topic: topic.clone(),
            key,
            biz_id,
            headers,
            payload: Bytes::from(payload),
            created_at,
            attempts: 0,
        },
        source: topic,
        delivery: i64::from(deliveries) + 1,
        replayed: true,
    }
}
