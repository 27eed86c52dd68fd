//! A NATS JetStream consumer that runs a handler inside the inbox transaction and acks only after
//! that transaction commits.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::PullConsumer, AckKind};
use futures::future::BoxFuture;
use futures::future::{FutureExt, Shared};
use futures::StreamExt;
use tidings_outbox::{envelope, MessageId, WireMessage};
use tokio::sync::oneshot;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::postgres::map_err;
use crate::{DedupKey, Error, Inbox, Recorded};

/// A message as the handler sees it: the message decoded from the wire format every sink
/// writes ([`WireMessage`]; `Nats-Msg-Id` stands in for a missing `Tidings-Message-Id`), plus
/// what NATS says about this delivery. Derefs to the message (`d.id`, `d.biz_id`, ...).
#[derive(Debug, Clone)]
pub struct Delivered {
    /// The message.
    pub message: WireMessage,
    /// The NATS subject.
    pub subject: String,
    /// Which delivery this is (1 = first).
    pub delivery: i64,
}

impl std::ops::Deref for Delivered {
    type Target = WireMessage;
    fn deref(&self) -> &WireMessage {
        &self.message
    }
}

/// A handler failure: the transaction is rolled back and the message retried (nak with delay)
/// until `max_deliveries`, then parked.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The consumer's business logic, run inside the inbox transaction.
pub trait Handler: Send + Sync + 'static {
    /// Runs the effect of a first delivery, in `tx` (committed by the runner on `Ok`).
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Called in the same transaction when the inbox recognises a redelivery, e.g. to count it.
    /// The default does nothing.
    fn duplicate<'a>(
        &'a self,
        _tx: &'a Transaction<'a>,
        _msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Consumer runner settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// Inbox consumer name, also the JetStream durable consumer name (letters, digits, `-`, `_`).
    /// Deduplication is per (name, biz-id): if this consumer handles several topics whose
    /// messages can share a biz-id (`payment.succeeded` and `payment.refunded` of one payment),
    /// give each topic its own consumer, or the second would be taken for a duplicate.
    /// Defaults to `tidings-consumer`.
    pub name: String,
    /// JetStream stream to consume. Defaults to `TIDINGS`.
    pub stream: String,
    /// Subject filter, e.g. `tidings.payment.succeeded`. Defaults to `tidings.>`.
    pub filter_subject: String,
    /// Messages handled at once. Defaults to 16.
    pub concurrency: usize,
    /// Deliveries before a failing message is parked in `tidings.inbox_dead_letters` and acked.
    /// Defaults to 5.
    pub max_deliveries: i64,
    /// How long JetStream waits for an ack before redelivering. Defaults to 30 seconds.
    pub ack_wait: Duration,
    /// Delay of the first retry after a failure (nak); doubles per delivery. Defaults to 1 second.
    pub backoff_base: Duration,
    /// Longest retry delay. Defaults to 1 minute.
    pub backoff_max: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            name: "tidings-consumer".into(),
            stream: "TIDINGS".into(),
            filter_subject: "tidings.>".into(),
            concurrency: 16,
            max_deliveries: 5,
            ack_wait: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Counters of one runner (since it started).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Effects committed.
    pub processed: AtomicU64,
    /// Redeliveries the inbox recognised (effect skipped).
    pub duplicates: AtomicU64,
    /// Failed handler runs (rolled back, retried).
    pub failed: AtomicU64,
    /// Messages parked after `max_deliveries`.
    pub parked: AtomicU64,
}

/// park_message: keep a message the consumer gave up on, with its error.
const PARK: &str = "\
INSERT INTO tidings.inbox_dead_letters
       (consumer, message_id, biz_id, topic, payload, headers, deliveries, last_error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (consumer, message_id) DO UPDATE
   SET deliveries = excluded.deliveries, last_error = excluded.last_error, dead_at = now()";

/// Consumes a JetStream stream through the inbox.
pub struct NatsConsumer {
    pool: deadpool_postgres::Pool,
    consumer: PullConsumer,
    inbox: Inbox,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
    stats: Arc<ConsumerStats>,
}

enum Step {
    Processed,
    Duplicate,
    Failed(HandlerError),
}

impl NatsConsumer {
    /// Checks the config and finds or creates the durable pull consumer.
    pub async fn new(
        pool: deadpool_postgres::Pool,
        client: async_nats::Client,
        config: ConsumerConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<Self, Error> {
        let bad = |reason| {
            Err(Error::Invalid {
                what: "consumer config",
                reason,
            })
        };
        if config.name.is_empty()
            || !config
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("name must be letters, digits, '-' or '_' (a JetStream durable name)");
        }
        if config.concurrency == 0 || config.max_deliveries < 1 || config.ack_wait.is_zero() {
            return bad("concurrency and max_deliveries must be at least 1, ack_wait above 0");
        }
        let inbox = Inbox::new(config.name.clone())?;
        let js = jetstream::new(client);
        let nats_err = |what: &str, e: &dyn std::fmt::Display| {
            Error::Database(format!("{what} {:?}: {e}", config.stream).into())
        };
        let stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|e| nats_err("cannot find JetStream stream", &e))?;
        let consumer = stream
            .get_or_create_consumer(
                &config.name,
                pull::Config {
                    durable_name: Some(config.name.clone()),
                    filter_subject: config.filter_subject.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    // The runner counts deliveries and parks; the server never gives up on its own.
                    max_deliver: -1,
                    max_ack_pending: (config.concurrency * 8) as i64,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats_err("cannot create durable consumer on stream", &e))?;
        Ok(NatsConsumer {
            pool,
            consumer,
            inbox,
            config,
            handler,
            stats: Arc::new(ConsumerStats::default()),
        })
    }

    /// The runner's counters.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// The underlying JetStream pull consumer.
    pub fn pull_consumer(&self) -> &PullConsumer {
        &self.consumer
    }

    /// Consumes until `shutdown` is cancelled; messages in flight are finished (committed and
    /// acked, or rolled back and left for redelivery) before it returns.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let messages = match self.consumer.messages().await {
                Ok(m) => {
                    failures = 0;
                    m
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "cannot read from JetStream; retrying");
                    let pause = (Duration::from_millis(200) * 2u32.pow(failures.min(7)))
                        .min(Duration::from_secs(30));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => continue,
                    }
                }
            };
            // Per-key order: each message of an ordering key waits for the one of its key that
            // arrived before it (a chain of completion signals set up here, in arrival order);
            // different keys and unkeyed messages run concurrently. A predecessor always started
            // earlier, so the concurrency bound cannot deadlock the chain.
            let mut last_of_key: HashMap<String, Shared<oneshot::Receiver<()>>> = HashMap::new();
            let mut seen = 0u64;
            let shutdown = &shutdown;
            messages
                .take_until(shutdown.cancelled())
                .map(|m| {
                    seen += 1;
                    if seen.is_multiple_of(1024) {
                        last_of_key.retain(|_, done| done.peek().is_none());
                    }
                    let (done, finished) = oneshot::channel();
                    let key = m
                        .as_ref()
                        .ok()
                        .and_then(Delivered::from_message)
                        .and_then(|d| d.message.key);
                    let before = key.and_then(|k| last_of_key.insert(k, finished.shared()));
                    (m, before, done)
                })
                .for_each_concurrent(self.config.concurrency, |(m, before, done)| async move {
                    if let Some(before) = before {
                        let _ = before.await;
                    }
                    match m {
                        Ok(m) => self.handle(m, shutdown).await,
                        Err(e) => tracing::warn!(error = %e, "JetStream message stream error"),
                    }
                    let _ = done.send(());
                })
                .await;
        }
        Ok(())
    }

    async fn handle(&self, msg: jetstream::Message, shutdown: &CancellationToken) {
        let delivered = match Delivered::from_message(&msg) {
            Some(d) => d,
            None => {
                // Not from a Tidings relay (no usable message id): park it under a fresh id
                // rather than drop it.
                let d = Delivered::unidentified(&msg);
                tracing::error!(subject = %msg.subject, "message without a usable Tidings-Message-Id or Nats-Msg-Id");
                self.park(
                    &msg,
                    &d,
                    &*HandlerError::from("message has no usable message id"),
                )
                .await;
                return;
            }
        };
        let traceparent = delivered
            .headers
            .get(envelope::HEADER_TRACEPARENT)
            .cloned()
            .unwrap_or_default();
        // W3C traceparent: version-traceid-parentid-flags; the span carries the producer's trace.
        let mut parts = traceparent.split('-');
        let (trace_id, parent_id) = (parts.nth(1).unwrap_or(""), parts.next().unwrap_or(""));
        let span = tracing::info_span!("tidings_consume", consumer = %self.config.name,
            message_id = %delivered.id, biz_id = delivered.biz_id.as_deref().unwrap_or(""),
            delivery = delivered.delivery, trace_id, parent_span_id = parent_id);
        #[cfg(feature = "opentelemetry")]
        set_remote_parent(&span, &traceparent);
        async {
            let mut d = delivered;
            loop {
                let failure: HandlerError = match self.transact(&d).await {
                    Ok(step @ (Step::Processed | Step::Duplicate)) => {
                        if matches!(step, Step::Processed) {
                            self.stats.processed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!("redelivery recognised by the inbox; effect skipped");
                        }
                        // Acked only now, after the commit. A lost ack means a redelivery,
                        // which the inbox recognises.
                        if let Err(e) = msg.ack().await {
                            tracing::warn!(error = %e, "ack failed; the redelivery will be recognised");
                        }
                        return;
                    }
                    Ok(Step::Failed(e)) => e,
                    // The inbox transaction failed (database down, a failing COMMIT, a key the
                    // inbox refuses).
                    Err(e) => Box::new(e),
                };
                // A transient database condition (deadlock, serialization failure, lock
                // timeout, lost connection) is not the message's fault: retried without
                // counting towards parking.
                let transient = is_transient(&*failure);
                if !transient {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    if d.delivery >= self.config.max_deliveries {
                        self.park(&msg, &d, &*failure).await;
                        return;
                    }
                }
                // Retried here, not with a delayed nak: later messages of this key wait behind
                // it (a nak would let them overtake it). The ack deadline is extended meanwhile.
                let delay = self.backoff(d.delivery);
                tracing::warn!(error = %failure, retry_in = ?delay, transient, "handler failed; will retry");
                if !self.wait_holding(&msg, delay, shutdown).await {
                    // Shutting down: leave it unacked; JetStream redelivers it after ack_wait.
                    return;
                }
                if !transient {
                    d.delivery += 1;
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One transaction: record the key, run the handler on a first delivery, commit.
    async fn transact(&self, d: &Delivered) -> Result<Step, Error> {
        let mut obj = self
            .pool
            .get()
            .await
            .map_err(|e| Error::Database(Box::new(e)))?;
        let client: &mut tokio_postgres::Client = &mut obj;
        let tx = client.transaction().await.map_err(map_err)?;
        let key = DedupKey::for_message(d.biz_id.as_deref(), d.id);
        match self.inbox.record_pg(&tx, &key).await? {
            Recorded::Duplicate => {
                if let Err(e) = self.handler.duplicate(&tx, d).await {
                    tracing::warn!(error = %e, "duplicate hook failed");
                }
                tx.commit().await.map_err(map_err)?;
                Ok(Step::Duplicate)
            }
            Recorded::First => match self.handler.handle(&tx, d).await {
                Ok(()) => {
                    // A handler that swallowed an SQL error leaves the transaction aborted, and
                    // COMMIT of an aborted transaction silently rolls back: the message would
                    // be acked with neither effect nor record. This probe fails (25P02) then.
                    if let Err(e) = tx.batch_execute("SELECT 1").await {
                        let _ = tx.rollback().await;
                        return Ok(Step::Failed(Box::new(e)));
                    }
                    tx.commit().await.map_err(map_err)?;
                    Ok(Step::Processed)
                }
                Err(e) => {
                    tx.rollback().await.map_err(map_err)?;
                    Ok(Step::Failed(e))
                }
            },
        }
    }

    /// Waits `delay` while keeping the message: JetStream is told the work is in progress (which
    /// restarts its ack timer) at the start and every half `ack_wait`. False when shutdown came
    /// first.
    async fn wait_holding(
        &self,
        msg: &jetstream::Message,
        delay: Duration,
        shutdown: &CancellationToken,
    ) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            let _ = msg.ack_with(AckKind::Progress).await;
            let step = until
                .saturating_duration_since(tokio::time::Instant::now())
                .min(self.config.ack_wait / 2);
            if step.is_zero() {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(step) => {}
            }
        }
    }

    fn backoff(&self, delivery: i64) -> Duration {
        let exp = self
            .config
            .backoff_base
            .saturating_mul(1u32 << (delivery - 1).clamp(0, 20) as u32);
        exp.min(self.config.backoff_max)
    }

    /// Keeps a message the consumer gave up on in `tidings.inbox_dead_letters`, then acks it.
    /// If parking fails, the message is nak'ed for a later redelivery.
    async fn park(
        &self,
        msg: &jetstream::Message,
        d: &Delivered,
        e: &(dyn std::error::Error + Send + Sync),
    ) {
        let headers = serde_json::Value::Object(
            d.headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        );
        let parked = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| Error::Database(Box::new(e)))?;
            client
                .execute(
                    PARK,
                    &[
                        &self.config.name,
                        &d.id.as_uuid(),
                        &d.biz_id,
                        &d.topic,
                        &d.payload.to_vec(),
                        &headers,
                        &(d.delivery as i32),
                        &chain(e),
                    ],
                )
                .await
                .map_err(map_err)
        }
        .await;
        match parked {
            Ok(_) => {
                self.stats.parked.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, deliveries = d.delivery, "message parked in tidings.inbox_dead_letters");
                let _ = msg.ack().await;
            }
            Err(pe) => {
                tracing::error!(error = %pe, "cannot park message; will retry");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(self.config.backoff_max)))
                    .await;
            }
        }
    }
}

/// Whether a failure is a transient database condition: serialization failure (40001),
/// deadlock (40P01), lock not available (55P03), an administrator's or crash shutdown (57P01,
/// 57P02, 57P03), a connection failure (class 08), a closed connection, or no pooled connection.
fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
            if pg.is_closed() {
                return true;
            }
            if let Some(code) = pg.code() {
                let c = code.code();
                if ["40001", "40P01", "55P03", "57P01", "57P02", "57P03"].contains(&c)
                    || c.starts_with("08")
                {
                    return true;
                }
            }
        }
        if err.downcast_ref::<deadpool_postgres::PoolError>().is_some() {
            return true;
        }
        cur = err.source();
    }
    false
}

impl Delivered {
    /// Reads a JetStream message published by the Tidings relay; None without a message id.
    pub fn from_message(msg: &jetstream::Message) -> Option<Delivered> {
        parse(msg)
    }

    /// A message without a usable id, under a fresh one, so it can be parked.
    fn unidentified(msg: &jetstream::Message) -> Delivered {
        Delivered {
            message: WireMessage {
                id: MessageId::from_uuid(uuid::Uuid::now_v7()),
                topic: msg.subject.to_string(),
                key: None,
                biz_id: None,
                headers: headers_of(msg),
                payload: msg.payload.clone(),
                created_at: None,
                attempts: 0,
            },
            subject: msg.subject.to_string(),
            delivery: msg.info().map(|i| i.delivered).unwrap_or(1),
        }
    }
}

fn headers_of(msg: &jetstream::Message) -> BTreeMap<String, String> {
    msg.headers
        .iter()
        .flat_map(|h| h.iter())
        .filter_map(|(k, v)| v.first().map(|v| (k.to_string(), v.to_string())))
        .collect()
}

/// JetStream's own dedup id header: the message id when `Tidings-Message-Id` is missing, and
/// never one of the producer's headers.
const NATS_MSG_ID: &str = "Nats-Msg-Id";

fn parse(msg: &jetstream::Message) -> Option<Delivered> {
    let headers = headers_of(msg);
    let nats_id = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(NATS_MSG_ID))
        .and_then(|(_, v)| v.parse::<MessageId>().ok());
    let message = WireMessage::decode(
        headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case(NATS_MSG_ID))
            .map(|(k, v)| (k.as_str(), v.as_str())),
        msg.payload.clone(),
        nats_id,
        &msg.subject,
    )
    .ok()?;
    Some(Delivered {
        message,
        subject: msg.subject.to_string(),
        delivery: msg.info().map(|i| i.delivered).unwrap_or(1),
    })
}

/// Makes `span` a child of the remote span named by a W3C `traceparent`
/// (`00-<trace id>-<parent span id>-<flags>`); ignores a malformed one.
#[cfg(feature = "opentelemetry")]
fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let [_, trace, parent, flags, ..] = parts[..] else {
        return;
    };
    let (Ok(trace), Ok(parent), Ok(flags)) = (
        TraceId::from_hex(trace),
        SpanId::from_hex(parent),
        u8::from_str_radix(flags, 16),
    ) else {
        return;
    };
    if trace == TraceId::INVALID || parent == SpanId::INVALID {
        return;
    }
    let remote = SpanContext::new(
        trace,
        parent,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// An error with its sources, as stored in `last_error` (driver errors say little on their own).
fn chain(e: &(dyn std::error::Error + Send + Sync)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
