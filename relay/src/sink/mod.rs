//! The seam between the relay and a broker: one `publish` per message, with failure classes.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use tidings_outbox::WireMessage;

#[cfg(feature = "http")]
mod http;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;
#[cfg(feature = "redis")]
mod redis;
mod stdout;

#[cfg(feature = "redis")]
pub use self::redis::{
    Idmp, RedisArgs, RedisSink, RedisSinkConfig, FIELD_HEADER_PREFIX, FIELD_ID, FIELD_PAYLOAD,
    IDMP_PRODUCER, REDIS_MAX_MESSAGE_SIZE,
};
#[cfg(feature = "http")]
pub use http::{HttpArgs, HttpSink, HttpSinkConfig, HTTP_MAX_MESSAGE_SIZE};
#[cfg(feature = "kafka")]
pub use kafka::{KafkaArgs, KafkaSink, KafkaSinkConfig};
#[cfg(feature = "nats")]
pub use nats::{NatsArgs, NatsSink, NatsSinkConfig, StreamSetup};
#[cfg(feature = "rabbitmq")]
pub use rabbitmq::{
    RabbitArgs, RabbitSink, RabbitSinkConfig, Unroutable, RABBITMQ_MAX_MESSAGE_SIZE,
};
pub use stdout::StdoutSink;

/// The sinks this build has (each behind its cargo feature; stdout always).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// JSON lines on standard output.
    Stdout,
    /// NATS JetStream (feature `nats`).
    #[cfg(feature = "nats")]
    Nats,
    /// Kafka (feature `kafka`).
    #[cfg(feature = "kafka")]
    Kafka,
    /// RabbitMQ (feature `rabbitmq`).
    #[cfg(feature = "rabbitmq")]
    Rabbitmq,
    /// Redis Streams (feature `redis`).
    #[cfg(feature = "redis")]
    Redis,
    /// HTTP webhooks, Standard Webhooks signed (feature `http`).
    #[cfg(feature = "http")]
    Http,
}

/// The `--sink` choice and every sink's own flags and environment variables, for the
/// `tidings relay` command line. A new broker adds its `Args` group here, behind its feature.
#[derive(clap::Args)]
pub struct SinkArgs {
    /// Where to deliver messages.
    #[arg(long, env = "TIDINGS_SINK", value_enum, default_value_t = SinkKind::Stdout)]
    pub sink: SinkKind,
    /// NATS JetStream sink settings.
    #[cfg(feature = "nats")]
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Kafka sink settings.
    #[cfg(feature = "kafka")]
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// RabbitMQ sink settings.
    #[cfg(feature = "rabbitmq")]
    #[command(flatten)]
    pub rabbitmq: RabbitArgs,
    /// Redis Streams sink settings.
    #[cfg(feature = "redis")]
    #[command(flatten)]
    pub redis: RedisArgs,
    /// HTTP webhook sink settings.
    #[cfg(feature = "http")]
    #[command(flatten)]
    pub http: HttpArgs,
}

impl SinkArgs {
    /// Builds the chosen sink; `publish_timeout` bounds its acknowledgements. Configuration
    /// errors are `Error::Config` naming the flag.
    pub async fn connect(
        self,
        publish_timeout: std::time::Duration,
    ) -> Result<std::sync::Arc<dyn Sink>, crate::Error> {
        // Without any broker feature, only stdout exists and `publish_timeout` is unused.
        let _ = publish_timeout;
        Ok(match self.sink {
            SinkKind::Stdout => std::sync::Arc::new(StdoutSink::default()),
            #[cfg(feature = "nats")]
            SinkKind::Nats => std::sync::Arc::new(self.nats.connect(publish_timeout).await?),
            #[cfg(feature = "kafka")]
            SinkKind::Kafka => std::sync::Arc::new(self.kafka.connect(publish_timeout).await?),
            #[cfg(feature = "rabbitmq")]
            SinkKind::Rabbitmq => {
                std::sync::Arc::new(self.rabbitmq.connect(publish_timeout).await?)
            }
            #[cfg(feature = "redis")]
            SinkKind::Redis => std::sync::Arc::new(self.redis.connect(publish_timeout).await?),
            #[cfg(feature = "http")]
            SinkKind::Http => std::sync::Arc::new(self.http.connect(publish_timeout).await?),
        })
    }

    /// Which flag sets the chosen broker's dedup window, for the start-up error when it is too
    /// short.
    pub fn dedup_window_hint(&self) -> Option<&'static str> {
        match self.sink {
            SinkKind::Stdout => None,
            #[cfg(feature = "nats")]
            SinkKind::Nats => Some(
                "--nats-duplicate-window sets it for a stream tidings creates; an existing stream keeps its own duplicate_window",
            ),
            #[cfg(feature = "kafka")]
            SinkKind::Kafka => None,
            #[cfg(feature = "rabbitmq")]
            SinkKind::Rabbitmq => None,
            #[cfg(feature = "redis")]
            SinkKind::Redis => None,
            #[cfg(feature = "http")]
            SinkKind::Http => None,
        }
    }
}

/// One outbox row on its way to a broker: its position in the outbox and the message as it
/// goes on the wire ([`WireMessage`], the type every consumer adapter decodes too). Derefs to
/// the message, so `envelope.id`, `envelope.topic`, ... read its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Position in the outbox (database-assigned insertion order).
    pub seq: i64,
    /// The message.
    pub message: WireMessage,
}

impl std::ops::Deref for Envelope {
    type Target = WireMessage;
    fn deref(&self) -> &WireMessage {
        &self.message
    }
}

impl std::ops::DerefMut for Envelope {
    fn deref_mut(&mut self) -> &mut WireMessage {
        &mut self.message
    }
}

impl Envelope {
    /// Producer headers plus the `Tidings-*` headers every sink carries (see
    /// [`WireMessage::encode_headers`]).
    pub fn wire_headers(&self) -> Vec<(&str, String)> {
        self.message.encode_headers()
    }
}

/// What a broker said about a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// The broker recognised the dedup id and dropped the message as a re-send.
    pub duplicate: bool,
}

/// Why a publish failed. The class decides what the relay does next.
#[derive(Debug)]
#[non_exhaustive]
pub enum SinkError {
    /// This message failed but may succeed later: retried with backoff, counted as an attempt.
    Retryable(Box<dyn std::error::Error + Send + Sync>),
    /// This message can never be delivered (too large, refused): dead-lettered at once.
    Permanent(Box<dyn std::error::Error + Send + Sync>),
    /// The broker as a whole is unreachable or misconfigured: the message is released untouched
    /// (no attempt counted) and the relay backs off before claiming again.
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    /// Like `Retryable`, with the broker's own word on when to try again (HTTP `Retry-After`,
    /// back-pressure): the relay stores it as the row's next attempt time (capped by the
    /// relay's longest backoff, which the dedup window was checked against).
    RetryAfter(
        std::time::Duration,
        Box<dyn std::error::Error + Send + Sync>,
    ),
    /// Not the message's fault and not the whole broker's: its destination (one webhook
    /// endpoint of several) is down. The row waits this long (capped by the relay's longest
    /// backoff) without counting an attempt, and the relay goes on with other messages.
    Postpone(
        std::time::Duration,
        Box<dyn std::error::Error + Send + Sync>,
    ),
}

impl SinkError {
    /// The cause.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            SinkError::Retryable(e)
            | SinkError::Permanent(e)
            | SinkError::Unavailable(e)
            | SinkError::RetryAfter(_, e)
            | SinkError::Postpone(_, e) => e.as_ref(),
        }
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let class = match self {
            SinkError::Retryable(_) => "retryable",
            SinkError::Permanent(_) => "permanent",
            SinkError::Unavailable(_) => "broker unavailable",
            SinkError::RetryAfter(_, _) => "retry later",
            SinkError::Postpone(_, _) => "destination down",
        };
        // The whole source chain, so what is stored as last_error keeps the cause.
        write!(f, "{class}: {}", self.cause())?;
        let mut src = self.cause().source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}

impl std::error::Error for SinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.cause())
    }
}

/// What a broker can do, as far as the relay must know. Build with struct update syntax over
/// `Default` (which promises nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The broker drops a re-send whose message id it stored within this window (JetStream's
    /// stream `duplicate_window`). `None`: no dedup by id, so every re-send (a crash between
    /// publish and commit, a lost ack) reaches consumers, and they need the inbox. The relay
    /// refuses to start when the window is shorter than its own re-send horizon.
    pub dedup_window: Option<Duration>,
    /// Largest message (payload and headers) the broker accepts, when known.
    pub max_message_bytes: Option<usize>,
    /// Several messages of one ordering key may be in flight at once without losing their
    /// order, also when one fails (Kafka's idempotent producer: a failure fails the ones behind
    /// it). The relay then hands a key's whole chain to [`Sink::publish_batch`] at once;
    /// otherwise it sends a key's messages one at a time, each after the previous one's ack.
    pub ordered_in_flight: bool,
}

/// A broker the relay publishes to. Implementations must be safe to call concurrently: the relay
/// publishes a batch at once (messages of one ordering key one after the other) and success
/// means the broker has durably accepted the message (e.g. the JetStream PubAck).
pub trait Sink: Send + Sync + 'static {
    /// Short name for logs and `tidings status`, e.g. `nats`.
    fn name(&self) -> &'static str;

    /// Publishes one message and waits for the broker's acknowledgement. Anything about the
    /// message that the broker or its client would refuse (a header it cannot carry, a size)
    /// must come back as [`SinkError::Permanent`], never as a panic.
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>>;

    /// Publishes several messages and waits for all their acknowledgements; one result per
    /// message, in order. The relay calls it with the messages it may send at once (one per key,
    /// or whole key chains when `ordered_in_flight`). Defaults to calling [`Sink::publish`] for
    /// all of them concurrently; brokers that pipeline or batch (Kafka, Redis) override it.
    fn publish_batch<'a>(
        &'a self,
        msgs: &'a [&'a Envelope],
    ) -> BoxFuture<'a, Vec<Result<Delivery, SinkError>>> {
        Box::pin(futures::future::join_all(
            msgs.iter().map(|m| self.publish(m)),
        ))
    }

    /// What the broker can do. Defaults to promising nothing.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Flushes what the client still buffers and closes, at shutdown (the relay bounds it with
    /// the publish timeout). Defaults to nothing to do.
    fn close(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    /// Asks the broker whether it works as a whole (a round trip to the server, no message).
    /// The relay calls it after a batch in which every publish failed retryably: when the probe
    /// fails too, the broker is down, the batch is released without counting attempts, and the
    /// relay backs off. The relay bounds it with a timeout. Defaults to `Ok` (no probe: such
    /// failures count as the messages' attempts).
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A sink several relays share (one process serving several databases, or several relays on
/// one broker connection): everything but `close` goes to the inner sink, so a relay that stops
/// does not close it under the others. Whoever made the inner sink closes it once, after every
/// relay using it has stopped.
pub struct SharedSink(pub std::sync::Arc<dyn Sink>);

impl Sink for SharedSink {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        self.0.publish(msg)
    }
    fn publish_batch<'a>(
        &'a self,
        msgs: &'a [&'a Envelope],
    ) -> BoxFuture<'a, Vec<Result<Delivery, SinkError>>> {
        self.0.publish_batch(msgs)
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        self.0.check()
    }
}
