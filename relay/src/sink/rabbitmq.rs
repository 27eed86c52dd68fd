//! RabbitMQ sink (AMQP 0-9-1 through lapin). Every message is published to one exchange
//! (`--amqp-exchange`, default `tidings`; empty for the default exchange) with the Tidings topic
//! as its routing key, unchanged: topic `payment.succeeded` is routing key `payment.succeeded`,
//! so a topic exchange binds it with `payment.*` or `#`. AMQP properties: `message_id` = the
//! Tidings message id, `delivery_mode` 2 (persistent), `content_type` = the producer's
//! `content-type` header or `application/octet-stream`, `timestamp` = the enqueue time (seconds),
//! and the producer's headers plus the `Tidings-*` headers as AMQP headers (long strings).
//!
//! Publisher confirms are on and every publish is `mandatory`: success is a broker ack without a
//! returned message. An unroutable message (no queue bound for its routing key) comes back acked
//! *with* the message attached; it is dead-lettered with a reason containing `unroutable`
//! (`--amqp-unroutable dead-letter`, the default) or retried with backoff (`retry`). A nack is
//! retried. RabbitMQ has no dedup by message id: a re-send (a lost confirm, a relay crash
//! between publish and commit) is a second message, so the sink declares no dedup window and
//! consumers dedup in the inbox.
//!
//! Each publish has a channel of its own while it waits for its confirm (channels are pooled):
//! lapin hands a returned message to whichever confirm it completes next, which is only
//! unambiguous with one publish in flight per channel. It also makes a channel error (RabbitMQ
//! closes the channel on a message it refuses, e.g. one over its `max_message_size`) the fault
//! of that one message: such refusals are permanent.
//!
//! A lost connection fails the publishes as `Unavailable` (released, no attempt counted); the
//! next publish or health check reconnects, at most one attempt at a time and with backoff
//! after a failure. Connecting, declaring, publishing and the confirm wait are bounded by the
//! sink's timeout. A connection RabbitMQ blocks (a memory or disk alarm: `connection.blocked`)
//! is an outage too: a publish that times out on it is `Unavailable`, and so is the health check
//! while it lasts.
//!
//! Credentials in `--amqp-url` are never logged or put in an error: errors name host, port and
//! vhost; the password is given to lapin through an authentication provider, never in the URI
//! it keeps (`tidings_outbox::amqp`, shared with the inbox's RabbitMQ adapter). lapin traces the handshake frames, SASL response included (as bytes), at trace
//! level: the `tidings` binary never lets lapin's trace events through.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ErrorKind, ExchangeKind};
use tidings_outbox::amqp::AmqpUrl;

use super::{Capabilities, Delivery, Envelope, Sink, SinkError};
use crate::Error;

/// RabbitMQ's default `max_message_size` (3.10 and later): 128 MiB.
pub const RABBITMQ_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;
/// RabbitMQ's hard upper bound for `max_message_size`: 512 MiB.
const RABBITMQ_MAX_MESSAGE_SIZE_LIMIT: usize = 512 * 1024 * 1024;
/// Channels a connection may have when the broker sets no limit (RabbitMQ's default
/// `channel_max`).
const DEFAULT_CHANNEL_MAX: usize = 2047;
/// First pause before reconnecting after a failed attempt; doubles up to `RECONNECT_MAX`.
const RECONNECT_BASE: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// What happens to a message no queue is bound for (RabbitMQ returns a `mandatory` publish).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Unroutable {
    /// Dead-letter it at once, with a reason containing `unroutable`.
    #[default]
    DeadLetter,
    /// Retry it with backoff (counted as attempts, dead-lettered after `--max-attempts`), for
    /// queues that are bound after the producers start.
    Retry,
}

/// RabbitMQ sink settings.
#[derive(Clone)]
pub struct RabbitSinkConfig {
    /// `amqp://user:password@host:port/vhost` or `amqps://...` (percent-encoded; vhost `/` is
    /// `%2f`, no path is vhost `/`); query parameters `heartbeat`, `frame_max`, `channel_max`
    /// and `auth_mechanism` (`plain` only). Never logged with its password. Defaults to
    /// `amqp://127.0.0.1:5672/%2f` (guest/guest).
    pub url: String,
    /// Exchange every message is published to; the empty name is the default exchange
    /// (routing key = queue name). Defaults to `tidings`.
    pub exchange: String,
    /// Declare the exchange (durable, of `exchange_type`) if missing; otherwise it must exist
    /// at start-up. Defaults to false.
    pub declare_exchange: bool,
    /// Type of a declared exchange: `topic`, `direct`, `fanout`, `headers` or a plugin's type.
    /// Defaults to `topic`.
    pub exchange_type: String,
    /// What an unroutable message becomes. Defaults to [`Unroutable::DeadLetter`].
    pub unroutable: Unroutable,
    /// Bounds connecting (and the start-up declare), one publish with its confirm, and the
    /// health check; keep it below the relay's publish timeout. Defaults to 4 seconds.
    pub timeout: Duration,
    /// Largest payload sent; a larger one is a permanent failure. Set it to the broker's
    /// `max_message_size`. Defaults to 128 MiB (RabbitMQ's default).
    pub max_message_bytes: usize,
    /// Extra CA certificate (PEM) trusted for `amqps://`, besides the system roots. Defaults to
    /// none.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for RabbitSinkConfig {
    fn default() -> Self {
        RabbitSinkConfig {
            url: "amqp://127.0.0.1:5672/%2f".into(),
            exchange: "tidings".into(),
            declare_exchange: false,
            exchange_type: "topic".into(),
            unroutable: Unroutable::DeadLetter,
            timeout: Duration::from_secs(4),
            max_message_bytes: RABBITMQ_MAX_MESSAGE_SIZE,
            tls_ca_file: None,
        }
    }
}

/// Shows the URL without its credentials.
impl std::fmt::Debug for RabbitSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = tidings_outbox::amqp::shown(&self.url);
        f.debug_struct("RabbitSinkConfig")
            .field("url", &url)
            .field("exchange", &self.exchange)
            .field("declare_exchange", &self.declare_exchange)
            .field("exchange_type", &self.exchange_type)
            .field("unroutable", &self.unroutable)
            .field("timeout", &self.timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// The RabbitMQ sink's flags and environment variables (`tidings relay --sink rabbitmq`).
#[derive(clap::Args)]
#[command(next_help_heading = "RabbitMQ sink (--sink rabbitmq)")]
pub struct RabbitArgs {
    /// AMQP URL, amqp://user:password@host:port/vhost or amqps:// (vhost `/` is `%2f`;
    /// percent-encode special characters). Credentials are never logged.
    #[arg(
        long,
        env = "TIDINGS_AMQP_URL",
        default_value = "amqp://127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// Exchange every message is published to, with the Tidings topic as the routing key
    /// (topic `a.b` -> routing key `a.b`). Empty: the default exchange (routing key = queue).
    #[arg(long, env = "TIDINGS_AMQP_EXCHANGE", default_value = "tidings")]
    pub amqp_exchange: String,
    /// Declare the exchange (durable, --amqp-exchange-type) if missing; without it the
    /// exchange must exist at start-up.
    #[arg(long, env = "TIDINGS_AMQP_DECLARE_EXCHANGE")]
    pub amqp_declare_exchange: bool,
    /// Type of an exchange declared with --amqp-declare-exchange: topic, direct, fanout,
    /// headers, or a plugin's type.
    #[arg(long, env = "TIDINGS_AMQP_EXCHANGE_TYPE", default_value = "topic")]
    pub amqp_exchange_type: String,
    /// A message no queue is bound for (returned by RabbitMQ): dead-letter it (reason
    /// `unroutable`), or retry it with backoff.
    #[arg(long, env = "TIDINGS_AMQP_UNROUTABLE", value_enum, default_value_t = Unroutable::DeadLetter)]
    pub amqp_unroutable: Unroutable,
    /// Largest payload in bytes (the broker's max_message_size); a larger message is
    /// dead-lettered.
    #[arg(long, env = "TIDINGS_AMQP_MAX_MESSAGE_SIZE", default_value_t = RABBITMQ_MAX_MESSAGE_SIZE)]
    pub amqp_max_message_size: usize,
    /// Extra CA certificate (PEM) to trust for amqps://, besides the system roots.
    #[arg(long, env = "TIDINGS_AMQP_TLS_CA")]
    pub amqp_tls_ca: Option<PathBuf>,
}

impl RabbitArgs {
    /// Checks the flags and connects (see [`RabbitSink::connect`]); connects, publishes and
    /// health checks end within four fifths of `publish_timeout`, so that the sink, not the
    /// relay's own timeout, says why.
    pub async fn connect(self, publish_timeout: Duration) -> Result<RabbitSink, Error> {
        RabbitSink::connect(RabbitSinkConfig {
            url: self.amqp_url,
            exchange: self.amqp_exchange,
            declare_exchange: self.amqp_declare_exchange,
            exchange_type: self.amqp_exchange_type,
            unroutable: self.amqp_unroutable,
            timeout: (publish_timeout * 4 / 5).max(Duration::from_millis(100)),
            max_message_bytes: self.amqp_max_message_size,
            tls_ca_file: self.amqp_tls_ca,
        })
        .await
    }
}

fn config_err(what: impl Into<String>) -> Error {
    Error::Config(what.into())
}

/// Parses `--amqp-url` (the URL handling is shared with the inbox's RabbitMQ adapter). Errors
/// never repeat the URL (it may hold a password).
fn parse_url(s: &str) -> Result<AmqpUrl, Error> {
    AmqpUrl::parse(s, "--amqp-url").map_err(|e| config_err(e.to_string()))
}

/// One connection with its pool of idle confirm-mode channels.
struct Link {
    conn: Connection,
    idle: Mutex<Vec<Channel>>,
    /// Publishes in flight at once: one channel each, within the broker's `channel_max` (a few
    /// left for health checks). Further publishes wait (within their timeout).
    slots: tokio::sync::Semaphore,
    max_idle: usize,
    /// Negotiated largest frame (0: no limit): the content header frame must fit in one.
    frame_max: usize,
}

impl Link {
    fn usable(&self) -> bool {
        self.conn.status().connected()
    }

    /// An idle channel, or a new one in confirm mode.
    async fn channel(&self) -> Result<Channel, lapin::Error> {
        loop {
            let ch = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match ch {
                Some(ch) if ch.status().connected() => return Ok(ch),
                Some(_) => continue,
                None => break,
            }
        }
        let ch = self.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ch)
    }

    /// Puts a channel whose publish is settled back in the pool (dropping one closes it).
    fn give_back(&self, ch: Channel) {
        if ch.status().connected() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < self.max_idle {
                idle.push(ch);
            }
        }
    }
}

/// Reconnection state: one attempt at a time, with backoff after failures.
#[derive(Default)]
struct Reconnect {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

/// Publishes to RabbitMQ.
pub struct RabbitSink {
    config: RabbitSinkConfig,
    target: AmqpUrl,
    tls: OwnedTLSConfig,
    exchange: ShortString,
    link: RwLock<Option<Arc<Link>>>,
    reconnect: tokio::sync::Mutex<Reconnect>,
}

/// Exchange names: at most 255 bytes of letters, digits, `-`, `_`, `.`, `:` (AMQP 0-9-1).
fn valid_exchange_name(name: &str) -> bool {
    name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

fn exchange_kind(t: &str) -> Result<ExchangeKind, Error> {
    Ok(match t {
        "topic" => ExchangeKind::Topic,
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        other if other.starts_with("x-") && valid_exchange_name(other) => {
            ExchangeKind::Custom(other.to_owned())
        }
        other => {
            return Err(config_err(format!(
                "--amqp-exchange-type {:?} is not an exchange type (topic, direct, fanout, headers, or a plugin's x-...)",
                other.escape_debug().to_string()
            )))
        }
    })
}

/// Whether a lapin error is RabbitMQ closing the channel or connection with `code`.
fn amqp_code(e: &lapin::Error) -> Option<(u16, String)> {
    match e.kind() {
        ErrorKind::ProtocolError(a) => Some((a.get_id(), a.get_message().to_string())),
        _ => None,
    }
}

impl RabbitSink {
    /// Checks the settings, connects, and declares the exchange (`declare_exchange`) or checks
    /// that it exists: a missing exchange is a configuration error naming
    /// `--amqp-declare-exchange`.
    pub async fn connect(config: RabbitSinkConfig) -> Result<RabbitSink, Error> {
        let target = parse_url(&config.url)?;
        if !valid_exchange_name(&config.exchange) {
            return Err(config_err(format!(
                "--amqp-exchange {:?} is not an exchange name (at most 255 of a-z A-Z 0-9 - _ . :)",
                config.exchange.escape_debug().to_string()
            )));
        }
        let kind = exchange_kind(&config.exchange_type)?;
        if config.max_message_bytes == 0
            || config.max_message_bytes > RABBITMQ_MAX_MESSAGE_SIZE_LIMIT
        {
            return Err(config_err(format!(
                "--amqp-max-message-size must be between 1 and {RABBITMQ_MAX_MESSAGE_SIZE_LIMIT} bytes (RabbitMQ's limit)"
            )));
        }
        if config.timeout.is_zero() {
            return Err(config_err("the RabbitMQ timeout must be greater than 0"));
        }
        let mut tls = OwnedTLSConfig::default();
        if let Some(ca) = &config.tls_ca_file {
            if !target.is_tls() {
                return Err(config_err("--amqp-tls-ca needs an amqps:// --amqp-url"));
            }
            let pem = std::fs::read_to_string(ca).map_err(|e| {
                config_err(format!("--amqp-tls-ca: cannot read {}: {e}", ca.display()))
            })?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(config_err(format!(
                    "--amqp-tls-ca: {} holds no PEM certificate",
                    ca.display()
                )));
            }
            tls.cert_chain = Some(pem);
        }
        let exchange = ShortString::try_new(config.exchange.clone())
            .map_err(|_| config_err("--amqp-exchange is longer than 255 bytes"))?;
        let sink = RabbitSink {
            config,
            target,
            tls,
            exchange,
            link: RwLock::new(None),
            reconnect: tokio::sync::Mutex::new(Reconnect::default()),
        };
        // The error names the server (host, port, vhost), never the URL.
        let link = sink
            .link()
            .await
            .map_err(|e| Error::Sink(e.cause().to_string()))?;
        if !sink.config.exchange.is_empty() {
            sink.setup_exchange(&link, kind).await?;
        }
        tracing::info!(server = %sink.target.shown(), exchange = %sink.config.exchange,
            unroutable = ?sink.config.unroutable, "using RabbitMQ exchange");
        Ok(sink)
    }

    /// Declares the exchange, or checks that it exists (a passive declare, on a channel of its
    /// own: RabbitMQ closes the channel when it is missing).
    async fn setup_exchange(&self, link: &Link, kind: ExchangeKind) -> Result<(), Error> {
        let name = &self.config.exchange;
        let shown = self.target.shown();
        let declare = async {
            let ch = link.conn.create_channel().await?;
            ch.exchange_declare(
                self.exchange.clone(),
                kind,
                ExchangeDeclareOptions {
                    passive: !self.config.declare_exchange,
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        };
        match tokio::time::timeout(self.config.timeout, declare).await {
            Ok(Ok(())) => Ok(()),
            Err(_) => Err(Error::Sink(format!(
                "RabbitMQ at {shown} did not answer an exchange declare within {:?}",
                self.config.timeout
            ))),
            Ok(Err(e)) => Err(match amqp_code(&e) {
                Some((404, _)) => config_err(format!(
                    "RabbitMQ exchange {name:?} does not exist at {shown}: declare it, or pass --amqp-declare-exchange"
                )),
                Some((406, m)) => config_err(format!(
                    "RabbitMQ exchange {name:?} at {shown} exists with other settings than --amqp-exchange-type {} (durable): {m}",
                    self.config.exchange_type
                )),
                Some((403, m)) => config_err(format!(
                    "RabbitMQ refused declaring exchange {name:?} at {shown} (--amqp-exchange): {m}"
                )),
                _ => Error::Sink(format!(
                    "cannot declare RabbitMQ exchange {name:?} at {shown}: {e}"
                )),
            }),
        }
    }

    /// The live connection, or a new one: one attempt at a time, and none before the backoff
    /// after a failed one has passed (then `Unavailable` at once: no reconnect storm).
    async fn link(&self) -> Result<Arc<Link>, SinkError> {
        if let Some(l) = self.current() {
            return Ok(l);
        }
        let mut rc = self.reconnect.lock().await;
        if let Some(l) = self.current() {
            return Ok(l);
        }
        if let Some(at) = rc.retry_at {
            let now = Instant::now();
            if now < at {
                return Err(SinkError::Unavailable(
                    format!(
                        "not connected to RabbitMQ at {} ({}); next attempt in {:?}",
                        self.target.shown(),
                        rc.last_error,
                        at - now
                    )
                    .into(),
                ));
            }
        }
        let was_connected =
            rc.failures == 0 && self.link.read().map(|l| l.is_some()).unwrap_or(false);
        // Shorter than the publish's own bound, so that a connect that hangs is recorded (and
        // backed off) rather than cut off with the publish.
        let limit = self.config.timeout * 3 / 4;
        match tokio::time::timeout(limit, self.open()).await {
            Ok(Ok(link)) => {
                if rc.failures > 0 || was_connected {
                    tracing::info!(server = %self.target.shown(), "reconnected to RabbitMQ");
                }
                *rc = Reconnect::default();
                let link = Arc::new(link);
                *self.link.write().unwrap_or_else(|p| p.into_inner()) = Some(link.clone());
                Ok(link)
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {limit:?}"),
                };
                rc.failures = rc.failures.saturating_add(1);
                let pause = RECONNECT_BASE
                    .saturating_mul(1u32 << (rc.failures - 1).min(16))
                    .min(RECONNECT_MAX);
                rc.retry_at = Some(Instant::now() + crate::config::jitter(pause));
                rc.last_error = why.clone();
                *self.link.write().unwrap_or_else(|p| p.into_inner()) = None;
                Err(SinkError::Unavailable(
                    format!(
                        "cannot connect to RabbitMQ at {}: {why}",
                        self.target.shown()
                    )
                    .into(),
                ))
            }
        }
    }

    /// The connection, while it is up.
    fn current(&self) -> Option<Arc<Link>> {
        self.link
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|l| l.usable())
            .cloned()
    }

    async fn open(&self) -> Result<Link, lapin::Error> {
        let conn = self
            .target
            .connect("tidings-relay", self.tls.clone())
            .await?;
        let frame_max = conn.configuration().frame_max() as usize;
        let channel_max = match conn.configuration().channel_max() {
            0 => DEFAULT_CHANNEL_MAX,
            n => usize::from(n),
        };
        let slots = channel_max.saturating_sub(8).max(1);
        Ok(Link {
            conn,
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(slots),
            max_idle: slots,
            frame_max,
        })
    }

    /// Why a publish did not finish within the timeout.
    fn timed_out(&self) -> SinkError {
        let t = self.config.timeout;
        let link = self.link.read().unwrap_or_else(|p| p.into_inner()).clone();
        match link {
            Some(l) if l.conn.status().blocked() => SinkError::Unavailable(
                format!(
                    "RabbitMQ at {} blocked the connection (a memory or disk alarm) and did not confirm within {t:?}",
                    self.target.shown()
                )
                .into(),
            ),
            Some(l) if l.usable() => SinkError::Retryable(
                format!("no publisher confirm within {t:?} (outcome unknown)").into(),
            ),
            _ => SinkError::Unavailable(
                format!("no connection to RabbitMQ at {} within {t:?}", self.target.shown()).into(),
            ),
        }
    }

    /// What a failed AMQP operation of a publish means.
    fn classify(&self, e: lapin::Error) -> SinkError {
        match e.kind() {
            ErrorKind::ProtocolError(a) => match a.kind() {
                // RabbitMQ closed this publish's channel (one publish per channel) over this
                // message: over max_message_size, a header it cannot take.
                AMQPErrorKind::Soft(
                    AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::CONTENTTOOLARGE,
                ) => SinkError::Permanent(Box::new(e)),
                // The exchange was deleted: every message, not this one.
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => SinkError::Unavailable(
                    format!(
                        "RabbitMQ exchange {:?} is gone at {}: {e}",
                        self.config.exchange,
                        self.target.shown()
                    )
                    .into(),
                ),
                // Refused (permissions, perhaps per routing key) or another channel error:
                // counted; the health check tells a broker-wide problem.
                AMQPErrorKind::Soft(_) => SinkError::Retryable(Box::new(e)),
                // The connection is gone (broker shut down, forced close).
                AMQPErrorKind::Hard(_) => SinkError::Unavailable(Box::new(e)),
            },
            // A frame lapin could not write: counted, so a message that causes it ends dead.
            ErrorKind::SerialisationError(_) => SinkError::Retryable(Box::new(e)),
            // IO errors, closed connection or channel, missed heartbeats, channel limit.
            _ => SinkError::Unavailable(Box::new(e)),
        }
    }

    /// Routing key and properties of a message; what AMQP cannot carry is permanent.
    fn prepare(&self, msg: &Envelope) -> Result<(ShortString, BasicProperties), SinkError> {
        let permanent = |m: String| SinkError::Permanent(m.into());
        if msg.payload.len() > self.config.max_message_bytes {
            return Err(permanent(format!(
                "message of {} bytes is larger than RabbitMQ's limit of {} bytes (--amqp-max-message-size)",
                msg.payload.len(),
                self.config.max_message_bytes
            )));
        }
        let routing_key = ShortString::try_new(msg.topic.clone()).map_err(|_| {
            permanent(format!(
                "topic of {} bytes is longer than an AMQP routing key (255 bytes)",
                msg.topic.len()
            ))
        })?;
        let mut headers = FieldTable::default();
        let mut content_type = None;
        for (name, value) in msg.wire_headers() {
            if name.eq_ignore_ascii_case("content-type") {
                content_type = Some(value.clone());
            }
            let key = ShortString::try_new(name).map_err(|_| {
                permanent(format!(
                    "a header name of {} bytes is longer than AMQP allows (255 bytes)",
                    name.len()
                ))
            })?;
            headers.insert(
                key,
                AMQPValue::LongString(LongString::from(value.into_bytes())),
            );
        }
        let content_type = content_type.unwrap_or_else(|| "application/octet-stream".into());
        let content_type = ShortString::try_new(content_type).map_err(|_| {
            permanent("the content-type header is longer than AMQP allows (255 bytes)".into())
        })?;
        let mut props = BasicProperties::default()
            .with_message_id(ShortString::from(msg.id.to_string()))
            .with_delivery_mode(2)
            .with_content_type(content_type)
            .with_headers(headers);
        if let Some(t) = msg.created_at {
            props = props.with_timestamp(u64::try_from(t.timestamp()).unwrap_or(0));
        }
        Ok((routing_key, props))
    }

    async fn send(
        &self,
        msg: &Envelope,
        routing_key: ShortString,
        props: BasicProperties,
    ) -> Result<Delivery, SinkError> {
        let link = self.link().await?;
        let header_len = content_header_len(&props);
        if link.frame_max > 0 && header_len > link.frame_max {
            return Err(SinkError::Permanent(
                format!(
                    "the message's headers take {header_len} bytes, more than one AMQP frame holds ({} bytes, the broker's frame_max)",
                    link.frame_max
                )
                .into(),
            ));
        }
        // The semaphore is never closed.
        let _slot = link.slots.acquire().await.ok();
        let ch = link.channel().await.map_err(|e| self.classify(e))?;
        let confirm = ch
            .basic_publish(
                self.exchange.clone(),
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &msg.payload,
                props,
            )
            .await
            .map_err(|e| self.classify(e))?
            .await
            .map_err(|e| self.classify(e))?;
        link.give_back(ch);
        match confirm {
            Confirmation::Ack(None) => Ok(Delivery::default()),
            Confirmation::Ack(Some(returned)) => {
                let id = msg.id.to_string();
                if returned
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str())
                    != Some(id.as_str())
                {
                    // Cannot happen with one publish per channel; never count it delivered.
                    return Err(SinkError::Retryable(
                        "RabbitMQ returned another message with this one's confirm (outcome unknown)"
                            .into(),
                    ));
                }
                let why = format!(
                    "unroutable: RabbitMQ returned the message ({} {}): no queue is bound to exchange {:?} for routing key {:?}",
                    returned.reply_code, returned.reply_text, self.config.exchange, msg.topic
                );
                Err(match self.config.unroutable {
                    Unroutable::DeadLetter => SinkError::Permanent(why.into()),
                    Unroutable::Retry => SinkError::Retryable(why.into()),
                })
            }
            Confirmation::Nack(_) => Err(SinkError::Retryable(
                "RabbitMQ refused the message (basic.nack)".into(),
            )),
            Confirmation::NotRequested => Err(SinkError::Retryable(
                "RabbitMQ sent no publisher confirm (outcome unknown)".into(),
            )),
        }
    }
}

/// Size of the content header frame `props` make (frame overhead included); exact for the
/// properties the sink sets.
fn content_header_len(props: &BasicProperties) -> usize {
    let short = |s: Option<&ShortString>| s.map_or(0, |s| 1 + s.as_str().len());
    let headers = props.headers().as_ref().map_or(0, |t| {
        4 + t
            .inner()
            .iter()
            .map(|(k, v)| {
                1 + k.as_str().len()
                    + 1
                    + match v {
                        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
                        // Not set by the sink; generous.
                        _ => 16,
                    }
            })
            .sum::<usize>()
    });
    // frame type, channel, size, end (8); class, weight, body size (12); property flags (2).
    8 + 12
        + 2
        + short(props.content_type().as_ref())
        + short(props.message_id().as_ref())
        + headers
        + 1 // delivery mode
        + 8 // timestamp
}

impl Sink for RabbitSink {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let (routing_key, props) = self.prepare(msg)?;
            match tokio::time::timeout(self.config.timeout, self.send(msg, routing_key, props))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(self.timed_out()),
            }
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // RabbitMQ stores a re-send with the same message_id again.
            dedup_window: None,
            max_message_bytes: Some(self.config.max_message_bytes),
            // A failed publish does not fail the ones after it: one message per key at a time.
            ordered_in_flight: false,
        }
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let probe = async {
                let link = self.link().await?;
                if link.conn.status().blocked() {
                    return Err(SinkError::Unavailable(
                        format!(
                            "RabbitMQ at {} blocks publishing (a memory or disk alarm)",
                            self.target.shown()
                        )
                        .into(),
                    ));
                }
                // A round trip on a channel of its own (a missing exchange closes it).
                let unavailable = |e: lapin::Error| SinkError::Unavailable(Box::new(e));
                let ch = link.conn.create_channel().await.map_err(unavailable)?;
                if !self.config.exchange.is_empty() {
                    ch.exchange_declare(
                        self.exchange.clone(),
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(unavailable)?;
                }
                Ok(())
            };
            match tokio::time::timeout(self.config.timeout, probe).await {
                Ok(r) => r,
                Err(_) => Err(SinkError::Unavailable(
                    format!(
                        "RabbitMQ at {} did not answer within {:?}",
                        self.target.shown(),
                        self.config.timeout
                    )
                    .into(),
                )),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            // Every publish the relay counted was confirmed already: closing loses nothing.
            let link = self.link.write().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(l) = link.filter(|l| l.usable()) {
                let close = l
                    .conn
                    .close(200, ShortString::from("tidings relay stopping"));
                match tokio::time::timeout(self.config.timeout, close).await {
                    Ok(r) => r.map_err(|e| SinkError::Unavailable(Box::new(e)))?,
                    Err(_) => {
                        return Err(SinkError::Unavailable(
                            "RabbitMQ did not confirm closing the connection".into(),
                        ))
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_never_reach_lapin_or_a_message() {
        // The parsing itself is tested in tidings_outbox::amqp; here: the sink's use of it.
        let t = parse_url("amqps://relay:s3cr%40t@mq.internal:5671/shop?heartbeat=10").unwrap();
        assert_eq!(t.uri().authority.userinfo.username, "relay");
        assert_eq!(t.uri().authority.userinfo.password, "");
        assert_eq!(t.uri().authority.host, "mq.internal");
        assert_eq!(t.uri().vhost, "shop");
        assert_eq!(t.uri().query.heartbeat, Some(10));
        assert_eq!(t.shown(), "mq.internal:5671 vhost \"shop\"");
        assert!(!format!("{:?}", t.uri()).contains("s3cr"));
        assert!(!format!("{t:?}").contains("s3cr"));

        let t = parse_url("amqp://127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (t.uri().authority.host.as_str(), t.uri().vhost.as_str()),
            ("127.0.0.1", "/")
        );
        assert_eq!(parse_url("amqp://h").unwrap().uri().vhost, "/");
        assert_eq!(
            parse_url("amqp://[::1]:5672/v")
                .unwrap()
                .uri()
                .authority
                .host,
            "::1"
        );

        for bad in [
            "http://u:hunter2@h/",
            "amqp://u:hunter2@h/?password=hunter2",
            "amqp://u:hunter2@h:notaport/",
            "amqp://u:hunter2@h/?heartbeat=hunter2",
            "amqp:///nohost",
            "amqp://u:hunter2@h/?auth_mechanism=external",
            "amqp://u:hunter2@h/?auth_mechanism=hunter2",
        ] {
            let e = parse_url(bad).err().unwrap().to_string();
            assert!(
                e.contains("--amqp-url") && !e.contains("hunter2"),
                "{bad}: {e}"
            );
        }
        let c = RabbitSinkConfig {
            url: "amqp://u:hunter2@h:5672/%2f".into(),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
    }

    #[test]
    fn exchange_settings_are_checked() {
        assert!(valid_exchange_name("tidings.events:v1-x_y"));
        assert!(valid_exchange_name(""));
        assert!(!valid_exchange_name("a b"));
        assert!(!valid_exchange_name(&"x".repeat(256)));
        assert_eq!(exchange_kind("topic").unwrap(), ExchangeKind::Topic);
        assert_eq!(
            exchange_kind("x-consistent-hash").unwrap(),
            ExchangeKind::Custom("x-consistent-hash".into())
        );
        assert!(exchange_kind("tpoic")
            .unwrap_err()
            .to_string()
            .contains("--amqp-exchange-type"));
    }
}
