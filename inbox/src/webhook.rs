//! The webhook receiver: the consumer side of the relay's HTTP sink, as a handler for an axum
//! service (or any HTTP server, through [`WebhookReceiver::receive`]).
//!
//! For every `POST` it:
//! 1. checks `webhook-timestamp` against the tolerance (5 minutes by default) and
//!    `webhook-signature` against the body with any of its secrets (Standard Webhooks; several
//!    secrets while one is rotated), and `Tidings-Signature` against the metadata headers its
//!    inbox deduplicates on ([`tidings_outbox::webhook`]): a request that fails is answered
//!    401 and nothing runs;
//! 2. decodes the message (the same [`WireMessage`] every adapter reads: `webhook-id` is the
//!    message id, `Tidings-*` the metadata); one that cannot be read is answered 400;
//! 3. runs the handler with the inbox record in one transaction through a runner [`Store`]
//!    ([`crate::runner::postgres::PgStore`] or the diesel-async one), and answers **only after
//!    the commit**: 200 for an effect committed, and 200 for a duplicate (the inbox already
//!    holds its key: the effect is not run again, and the sender must stop re-sending);
//! 4. on a handler failure answers 500 (the sender retries it with backoff), or parks the
//!    message in `tidings.inbox_dead_letters` and answers 200 when the handler asks for parking
//!    or the delivery reaches `max_deliveries` (the sender's `Tidings-Attempt` + 1); a
//!    transient database condition or a database that does not answer is 503 with
//!    `Retry-After` (not the message's fault).
//!
//! At most `max_in_flight` signed requests run at once (those whose sender hung up included);
//! one more waits half a second for a place, then is answered 503 with `Retry-After` without
//! running.
//!
//! Answers never carry the message's content or the database's error text (the sender may be
//! another company's relay); the receiver logs the reason.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tidings_outbox::envelope::{
    HEADER_ATTEMPT, HEADER_BIZ_ID, HEADER_CREATED_AT, HEADER_KEY, HEADER_MESSAGE_ID, HEADER_TOPIC,
};
use tidings_outbox::webhook::{self, Secret, SignatureError};
use tidings_outbox::{MessageId, WireMessage};
use tracing::Instrument;

use crate::runner::{
    chain, consume_span, metric, note, park, record_lag, transact_caught, ConsumerStats, Delivered,
    ErrorClass, Step, Store, TimedOut,
};
use crate::{Error, Inbox};

/// Receiver settings.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Inbox consumer name (1-512 bytes, no control characters): deduplication is per (name,
    /// biz-id).
    pub consumer: String,
    /// The secrets a request may be signed with (`whsec_...`); at least one.
    pub secrets: Vec<String>,
    /// How far `webhook-timestamp` may be from now. Defaults to 5 minutes.
    pub tolerance: Duration,
    /// Largest body accepted (larger: 413). Defaults to 16 MiB, the sink's default limit.
    pub max_body_bytes: usize,
    /// The delivery (the sender's attempt + 1) at which a failing message is parked instead of
    /// answered 500. Defaults to 10, the relay's default `--max-attempts`: keep it at most that,
    /// or the sender dead-letters first.
    pub max_deliveries: i64,
    /// Bounds the inbox transaction and parking. Defaults to 3 seconds: below the sender's
    /// default request timeout (4 s), so that a slow database is a 503, not a lost answer.
    pub db_timeout: Duration,
    /// Signed requests running at once, at most; one more waits up to half a second (at most
    /// `db_timeout`) for a place, then is answered 503 with `Retry-After: 1` without running
    /// (counted as transient; the sender may count it as an attempt). A request's work goes
    /// on after its sender hung up (see [`WebhookReceiver::receive`]): this bounds what such
    /// senders can pile up, and with `max_body_bytes` the memory their bodies hold. Defaults
    /// to 256; size it above the senders' concurrency (the HTTP sink's default is 16 requests
    /// per endpoint per relay process). The database pool bounds throughput, not this: a
    /// request waits for a pooled connection up to `db_timeout`, then is answered 503.
    pub max_in_flight: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            consumer: String::new(),
            secrets: Vec::new(),
            tolerance: Duration::from_secs(webhook::DEFAULT_TOLERANCE_SECS as u64),
            max_body_bytes: 16 * 1024 * 1024,
            max_deliveries: 10,
            db_timeout: Duration::from_secs(3),
            max_in_flight: 256,
        }
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("consumer", &self.consumer)
            .field("secrets", &format!("<{} redacted>", self.secrets.len()))
            .field("tolerance", &self.tolerance)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_deliveries", &self.max_deliveries)
            .field("db_timeout", &self.db_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

/// What a request came to; [`WebhookReceiver::receive`] returns it with the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The effect committed (200).
    Processed,
    /// The inbox already held its key; nothing ran (200).
    Duplicate,
    /// Parked in `tidings.inbox_dead_letters` (200).
    Parked,
    /// The handler failed; the sender retries (500).
    Failed,
    /// The database did not answer or failed transiently; the sender retries (503).
    Unavailable,
    /// Signature, timestamp or required header wrong (401), or not a readable message (400).
    Refused,
}

struct Inner<S> {
    store: S,
    inbox: Inbox,
    secrets: Vec<Secret>,
    config: WebhookConfig,
    stats: ConsumerStats,
    /// The requests' tasks, for [`WebhookReceiver::shutdown`].
    tasks: tokio_util::task::TaskTracker,
    /// One permit per request running (`max_in_flight`).
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// A webhook endpoint backed by a runner [`Store`]. Cheap to clone.
pub struct WebhookReceiver<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for WebhookReceiver<S> {
    fn clone(&self) -> Self {
        WebhookReceiver {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Store> WebhookReceiver<S> {
    /// A receiver running `store`'s handler, after checking `config` (the consumer name and
    /// every secret).
    pub fn new(store: S, config: WebhookConfig) -> Result<Self, Error> {
        let inbox = Inbox::new(config.consumer.clone())?;
        if config.secrets.is_empty() {
            return Err(Error::Invalid {
                what: "webhook secrets",
                reason: "at least one whsec_ secret is needed",
            });
        }
        let secrets = config
            .secrets
            .iter()
            .map(|s| Secret::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::Invalid {
                what: "webhook secret",
                reason: "a secret is whsec_ followed by base64 of 24 to 64 bytes",
            })?;
        if config.max_deliveries < 1
            || config.db_timeout.is_zero()
            || config.max_body_bytes == 0
            || config.max_in_flight == 0
        {
            return Err(Error::Invalid {
                what: "webhook receiver settings",
                reason: "max_deliveries, db_timeout, max_body_bytes and max_in_flight must be greater than 0",
            });
        }
        let in_flight = Arc::new(tokio::sync::Semaphore::new(
            config
                .max_in_flight
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        Ok(WebhookReceiver {
            inner: Arc::new(Inner {
                store,
                inbox,
                secrets,
                config,
                stats: ConsumerStats::default(),
                tasks: tokio_util::task::TaskTracker::new(),
                in_flight,
            }),
        })
    }

    /// The receiver's counters (`processed`, `duplicates`, `failed`, `transient`, `parked`).
    pub fn stats(&self) -> &ConsumerStats {
        &self.inner.stats
    }

    /// An axum router answering `POST path` (with the body limit set).
    pub fn router(&self, path: &str) -> axum::Router {
        let me = self.clone();
        axum::Router::new()
            .route(
                path,
                axum::routing::post(
                    |State(me): State<WebhookReceiver<S>>,
                     uri: axum::http::Uri,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        me.receive(uri.path(), &headers, body).await.1
                    },
                ),
            )
            .layer(DefaultBodyLimit::max(self.inner.config.max_body_bytes))
            .with_state(me)
    }

    /// Handles one request (for servers other than axum): what it came to, and the answer to
    /// send. `source` names where it arrived (the path) in the handler's [`Delivered::source`].
    ///
    /// The work runs in a task of its own, so it finishes even if this future is dropped: a
    /// server drops a request's future when its sender hangs up (a sender whose timeout is
    /// shorter than `db_timeout`), and the handler's transaction may be about to commit.
    /// Finishing it means the re-send finds it committed (a duplicate) instead of running the
    /// effect again after a rollback halfway, and the counters add up once the task is done.
    /// The task takes at most twice `db_timeout` (the transaction, then parking); call
    /// [`WebhookReceiver::shutdown`] after the server stopped to let the last ones finish. A
    /// handler that panics fails like one that returns an error (500, parked at
    /// `max_deliveries`). After `shutdown`, and while `max_in_flight` requests are running,
    /// requests are answered 503 without running.
    pub async fn receive(
        &self,
        source: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> (Received, Response) {
        if self.inner.tasks.is_closed() {
            return (Received::Unavailable, unavailable());
        }
        // Checked first: a request that is not signed never takes a place. A panic while
        // reading hostile input is this request's permanent failure (400), not the server's.
        let verified =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.verify(headers, body)))
                .unwrap_or_else(|_| {
                    Err((StatusCode::BAD_REQUEST, "not a readable message".to_owned()))
                });
        let msg = match verified {
            Ok(m) => m,
            Err((status, why)) => {
                tracing::warn!(status = status.as_u16(), reason = %why, "webhook request refused");
                return (Received::Refused, (status, why).into_response());
            }
        };
        // At the cap, a request waits a moment for a place (a burst queues), then is answered
        // 503: each such answer may count as one of the sender's attempts.
        let wait = self.inner.config.db_timeout.min(BUSY_WAIT);
        let in_flight = &self.inner.in_flight;
        let permit = match in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match tokio::time::timeout(wait, in_flight.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => {
                    note(
                        &self.inner.stats.transient,
                        metric::TRANSIENT,
                        &self.inner.config.consumer,
                    );
                    tracing::debug!(consumer = %self.inner.config.consumer,
                        max_in_flight = self.inner.config.max_in_flight,
                        "too many requests in flight; answered 503");
                    return (Received::Unavailable, busy());
                }
            },
        };
        let me = self.clone();
        let (source, headers) = (source.to_owned(), headers.clone());
        let work = async move {
            // Held until the work is done, also when the sender hung up meanwhile.
            let _permit = permit;
            me.receive_here(&source, &headers, msg).await
        };
        match self.inner.tasks.spawn(work.in_current_span()).await {
            Ok(done) => done,
            // The task did not finish: the runtime is shutting down, or a panic outside the
            // handler (which runs under transact_caught). The sender retries.
            Err(e) if e.is_panic() => {
                note(
                    &self.inner.stats.failed,
                    metric::FAILED,
                    &self.inner.config.consumer,
                );
                tracing::error!(consumer = %self.inner.config.consumer,
                    "the receiver panicked on a request; answered 500");
                (
                    Received::Failed,
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the handler failed; retry later",
                    )
                        .into_response(),
                )
            }
            Err(_) => {
                tracing::warn!(consumer = %self.inner.config.consumer,
                    "the request's task was cancelled (shutting down); answered 503");
                (Received::Unavailable, unavailable())
            }
        }
    }

    /// Stops taking requests (503 from now on) and waits up to `timeout` for the requests in
    /// flight to finish, those whose sender hung up included; true if all did. Call it after
    /// the HTTP server's own graceful shutdown and before the runtime ends: a task still running
    /// then is dropped and its transaction rolls back (the sender re-sends; nothing is lost).
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        self.inner.tasks.close();
        tokio::time::timeout(timeout, self.inner.tasks.wait())
            .await
            .is_ok()
    }

    async fn receive_here(
        &self,
        source: &str,
        headers: &HeaderMap,
        msg: WireMessage,
    ) -> (Received, Response) {
        let delivery = headers
            .get(HEADER_ATTEMPT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0)
            .clamp(0, i64::MAX - 1)
            + 1;
        let d = Delivered {
            message: msg,
            source: source.to_owned(),
            delivery,
            replayed: false,
        };
        let span = consume_span(&self.inner.config.consumer, &d);
        if d.delivery <= 1 {
            record_lag(&self.inner.config.consumer, &d);
        }
        let started = std::time::Instant::now();
        let got = self.handle(&d).instrument(span).await;
        metrics::histogram!(metric::HANDLER_SECONDS, "consumer" => self.inner.config.consumer.clone())
            .record(started.elapsed().as_secs_f64());
        let answer = match got {
            Received::Processed | Received::Duplicate | Received::Parked => {
                (StatusCode::OK, "ok").into_response()
            }
            Received::Failed => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the handler failed; retry later",
            )
                .into_response(),
            Received::Unavailable | Received::Refused => unavailable(),
        };
        (got, answer)
    }

    /// Signature, timestamp and metadata checks, then the message. Errors are the status and a
    /// text naming the rule (never the content).
    #[allow(clippy::result_large_err)]
    fn verify(
        &self,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<WireMessage, (StatusCode, String)> {
        let unauthorized = |e: SignatureError| (StatusCode::UNAUTHORIZED, e.to_string());
        let get = |name: &'static str| -> Result<&str, (StatusCode, String)> {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| unauthorized(SignatureError::MissingHeader(name)))
        };
        // One value each for what is signed or read as metadata: with two, the checks below
        // would read the first and the message the last.
        for (name, _) in headers {
            let n = name.as_str();
            if (n.starts_with("tidings-") || n.starts_with("webhook-"))
                && headers.get_all(name).iter().nth(1).is_some()
            {
                return Err((StatusCode::BAD_REQUEST, format!("header {n} appears twice")));
            }
        }
        let id = get(webhook::WEBHOOK_ID)?;
        let now = chrono::Utc::now().timestamp();
        let tolerance = self.inner.config.tolerance.as_secs().min(i64::MAX as u64) as i64;
        let ts = webhook::check_timestamp(get(webhook::WEBHOOK_TIMESTAMP)?, now, tolerance)
            .map_err(unauthorized)?;
        let secrets = &self.inner.secrets;
        webhook::verify(
            secrets,
            get(webhook::WEBHOOK_SIGNATURE)?,
            webhook::WEBHOOK_SIGNATURE,
            id,
            ts,
            &body,
        )
        .map_err(unauthorized)?;
        // The metadata headers, as text (a value that is not UTF-8 cannot be Tidings').
        let text = |name: &str| -> Result<Option<&str>, (StatusCode, String)> {
            match headers.get(name) {
                None => Ok(None),
                Some(v) => std::str::from_utf8(v.as_bytes()).map(Some).map_err(|_| {
                    (
                        StatusCode::BAD_REQUEST,
                        format!("header {name} is not UTF-8"),
                    )
                }),
            }
        };
        let topic = text(HEADER_TOPIC)?.unwrap_or("");
        let metadata = webhook::metadata_text(
            topic,
            text(HEADER_KEY)?,
            text(HEADER_BIZ_ID)?,
            text(HEADER_CREATED_AT)?,
        );
        webhook::verify_metadata(secrets, get(webhook::TIDINGS_SIGNATURE)?, id, ts, &metadata)
            .map_err(unauthorized)?;
        // The message id is webhook-id (signed); a Tidings-Message-Id saying otherwise is not
        // from the relay.
        if let Some(other) = headers.get(HEADER_MESSAGE_ID) {
            if other.as_bytes() != id.as_bytes() {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "Tidings-Message-Id differs from webhook-id".to_owned(),
                ));
            }
        }
        let message_id: MessageId = id.parse().map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                "webhook-id is not a Tidings message id".to_owned(),
            )
        })?;
        let mut pairs = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            if is_transport(name.as_str()) {
                continue;
            }
            let v = std::str::from_utf8(value.as_bytes()).map_err(|_| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("header {} is not UTF-8", name.as_str()),
                )
            })?;
            pairs.push((name.as_str(), v));
        }
        WireMessage::decode(pairs, body, Some(message_id), "").map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("not a Tidings message: {e}"),
            )
        })
    }

    async fn handle(&self, d: &Delivered) -> Received {
        let inner = &*self.inner;
        let limit = inner.config.db_timeout;
        let step = match tokio::time::timeout(limit, transact_caught(&inner.store, &inner.inbox, d))
            .await
        {
            Ok(Ok(step)) => step,
            Ok(Err(e)) => {
                note(
                    &inner.stats.transient,
                    metric::TRANSIENT,
                    &inner.config.consumer,
                );
                tracing::warn!(error = %chain(&e), "inbox transaction failed; answered 503");
                return Received::Unavailable;
            }
            Err(_) => {
                note(
                    &inner.stats.transient,
                    metric::TRANSIENT,
                    &inner.config.consumer,
                );
                tracing::warn!(error = %TimedOut("the inbox transaction", limit), "answered 503");
                return Received::Unavailable;
            }
        };
        match step {
            Step::Processed | Step::NotParked => {
                note(
                    &inner.stats.processed,
                    metric::PROCESSED,
                    &inner.config.consumer,
                );
                Received::Processed
            }
            Step::Duplicate => {
                note(
                    &inner.stats.duplicates,
                    metric::DUPLICATES,
                    &inner.config.consumer,
                );
                Received::Duplicate
            }
            Step::Failed(e) if inner.store.is_transient(e.cause()) => {
                note(
                    &inner.stats.transient,
                    metric::TRANSIENT,
                    &inner.config.consumer,
                );
                tracing::warn!(error = %e, "transient database failure; answered 503");
                Received::Unavailable
            }
            Step::Failed(e) => {
                note(&inner.stats.failed, metric::FAILED, &inner.config.consumer);
                let park =
                    e.class() == ErrorClass::Park || d.delivery >= inner.config.max_deliveries;
                if !park {
                    tracing::warn!(error = %e, delivery = d.delivery, "handler failed; answered 500 for a retry");
                    return Received::Failed;
                }
                let error = e.to_string();
                match tokio::time::timeout(limit, self.park(d, &error)).await {
                    Ok(Ok(())) => Received::Parked,
                    Ok(Err(pe)) => {
                        tracing::warn!(error = %chain(&pe), "cannot park; answered 503");
                        Received::Unavailable
                    }
                    Err(_) => {
                        tracing::warn!(error = %TimedOut("parking", limit), "answered 503");
                        Received::Unavailable
                    }
                }
            }
        }
    }

    async fn park(&self, d: &Delivered, error: &str) -> Result<(), Error> {
        let inner = &*self.inner;
        park(&inner.store, &inner.config.consumer, &inner.stats, d, error).await
    }
}

/// How long a request at the `max_in_flight` cap waits for a place (at most `db_timeout`).
const BUSY_WAIT: Duration = Duration::from_millis(500);

/// The answer while `max_in_flight` requests are running: soon again.
fn busy() -> Response {
    retry_later("too many requests in flight; retry later", "1")
}

/// 503 with `Retry-After: 5`.
fn unavailable() -> Response {
    retry_later("the database is unavailable; retry later", "5")
}

/// 503 with `why` and `Retry-After: seconds`.
fn retry_later(why: &'static str, seconds: &'static str) -> Response {
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        HeaderValue::from_static(seconds),
    );
    r
}

/// Headers of the request itself or of the proxies on its way (credentials among them), not
/// of the message: never handed to the handler nor stored with a parked message.
fn is_transport(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
            | "user-agent"
            | "accept"
            | "accept-encoding"
            | "authorization"
            | "cookie"
            | "forwarded"
            | "via"
            | "x-real-ip"
            | "idempotency-key"
            | "tidings-signature"
    ) || name.starts_with("webhook-")
        || name.starts_with("x-forwarded-")
        || name.starts_with("proxy-")
}
