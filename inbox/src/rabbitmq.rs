//! The RabbitMQ adapter of the consumer runner ([`crate::runner`]): a consumer of one queue,
//! with a prefetch limit (`basic.qos`) and manual acks, whose deliveries the runner handles
//! through the inbox.
//!
//! - **Ack after commit.** A delivery is acked (`basic.ack`) only after the transaction holding
//!   its effect and its inbox record committed; an ack lost with the connection means a
//!   redelivery, which the inbox recognises. A message the runner gives back at shutdown is
//!   nacked with `requeue=true` (RabbitMQ puts it back at its original place in the queue where
//!   it can); what is still unacked when the connection closes (a crash, a lost connection)
//!   RabbitMQ requeues by itself.
//! - **Retries without blocking the queue.** RabbitMQ has no delayed nack (a requeued message
//!   comes straight back, in a tight loop), so the runner retries a failing message in place
//!   with its backoff, keeping it unacked: a failing key holds only itself (and the later
//!   messages of its key, which wait behind it), other messages keep flowing within the
//!   prefetch, and after `max_deliveries` the message is parked in
//!   `tidings.inbox_dead_letters` and acked. The limit: a failing key with more messages waiting
//!   than the prefetch fills it, and the consumer then waits for that key's head to succeed or
//!   be parked.
//! - **No in-progress signal.** RabbitMQ has no per-message timer to restart, so
//!   [`Adapter::hold_interval`] is `None`. RabbitMQ does close the channel of a consumer that
//!   keeps a delivery unacked longer than its `consumer_timeout` (30 minutes by default):
//!   keep it above the longest handling *including retries* (`max_deliveries` x `backoff_max`).
//!   The runner then reopens and the messages come again, which is safe, only slow.
//! - **Delivery count.** The `x-delivery-count` header plus one where RabbitMQ sets it (quorum
//!   queues); otherwise 2 for a message marked `redelivered`, else 1. Classic queues cannot
//!   tell a fifth delivery from a second, so a message that crashes its consumer every time is
//!   only parked by the count of a quorum queue (or a `delivery-limit` policy).
//! - **Decoding.** The headers the RabbitMQ sink writes (`Tidings-*` long strings, the
//!   producer's own), read with [`WireMessage::decode`]; the AMQP `message_id` stands in for a
//!   missing `Tidings-Message-Id`, the routing key for a missing `Tidings-Topic`. Header values
//!   that are not strings are shown as text when they are scalars (numbers, booleans,
//!   timestamps) and left out otherwise (tables, arrays, bytes that are not UTF-8). A message
//!   without a usable id (not from a Tidings relay) is parked, never dropped, under an id
//!   derived from its queue and content, the same on every redelivery.
//! - **Connection loss.** The stream of deliveries ends with an error; the runner reopens it
//!   with its growing pause, and [`Adapter::open`] makes a new connection and channel (the old
//!   connection closed, so nothing stays unacked on it). Connecting and setting up are bounded
//!   by a timeout; acks and nacks by the runner's `ack_timeout`.
//! - **Ordering.** One consumer receives a queue in order, and the runner keeps each key's
//!   order. Several consumers of one queue (several instances of a service) share it round
//!   robin, so two messages of one key can be handled at the same time by two of them; for a
//!   strict per-key order across instances, declare the queue with `x-single-active-consumer`
//!   (then one instance consumes and the others stand by).
//! - **Credentials** are never logged nor put in an error: lapin gets the URL without its
//!   password and the credentials through an authentication provider
//!   ([`tidings_outbox::amqp`], shared with the relay's sink); lapin's own trace events show the
//!   handshake's SASL response, so never let them through.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ErrorKind, ExchangeKind};
use sha2::{Digest, Sha256};
use tidings_outbox::amqp::AmqpUrl;
use tidings_outbox::{MessageId, WireMessage};

use crate::runner::{Adapter, AdapterError, Decoded, Delivered, Deliveries, Delivery};
use crate::Error;

/// Longest wait for connecting and setting up (declares, qos, consume).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for closing a connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The header quorum queues count deliveries in (RabbitMQ's own, not the producer's).
const DELIVERY_COUNT: &str = "x-delivery-count";

/// RabbitMQ consumer settings.
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitConsumerConfig {
    /// `amqp://user:password@host:port/vhost` or `amqps://...` (percent-encoded; vhost `/` is
    /// `%2f`); query parameters `heartbeat`, `frame_max`, `channel_max`, `auth_mechanism`
    /// (`plain`). `amqps://` trusts the system's CA roots. Never logged with its password.
    /// Defaults to `amqp://127.0.0.1:5672/%2f` (guest/guest).
    pub url: String,
    /// The queue to consume. Defaults to `tidings-consumer`.
    pub queue: String,
    /// Deliveries RabbitMQ sends ahead of their acks (`basic.qos`), at least 1: messages being
    /// handled, waiting for a retry, or queued behind their key all count. Defaults to 64.
    pub prefetch: u16,
    /// Declare the queue (durable) and bind it when missing; `None`: the queue must exist.
    /// Defaults to `None`.
    pub declare: Option<QueueSetup>,
}

/// The queue a consumer declares: durable, bound to `exchange` (an existing one of any type, or
/// one declared as a durable topic exchange) with each binding key. A queue or exchange that
/// exists already is used as it is (its type and arguments untouched; the bindings added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSetup {
    /// The exchange the relay publishes to (`--amqp-exchange`, `tidings` by default). The empty
    /// name is the default exchange, which routes by queue name and takes no bindings.
    pub exchange: String,
    /// Binding keys, e.g. `payment.succeeded` or `payment.*` (the relay's routing key is the
    /// Tidings topic).
    pub binding_keys: Vec<String>,
}

impl Default for RabbitConsumerConfig {
    fn default() -> Self {
        RabbitConsumerConfig {
            url: "amqp://127.0.0.1:5672/%2f".into(),
            queue: "tidings-consumer".into(),
            prefetch: 64,
            declare: None,
        }
    }
}

/// Shows the URL without its credentials.
impl std::fmt::Debug for RabbitConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitConsumerConfig")
            .field("url", &tidings_outbox::amqp::shown(&self.url))
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("declare", &self.declare)
            .finish()
    }
}

/// The connection and channel in use.
struct Link {
    conn: Connection,
    /// Kept open while its deliveries may still be acked (dropping it would close it).
    _channel: Option<Channel>,
}

#[derive(Default)]
struct State {
    link: Option<Link>,
    /// The link `connect` made and no stream consumed yet: the first `open` uses it.
    fresh: bool,
}

/// The RabbitMQ side of a consumer: one queue, consumed with manual acks.
pub struct RabbitAdapter {
    url: AmqpUrl,
    queue: ShortString,
    queue_name: Arc<str>,
    prefetch: u16,
    declare: Option<(ShortString, Vec<ShortString>)>,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for RabbitAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitAdapter")
            .field("server", &self.url.shown())
            .field("queue", &self.queue_name)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

/// A setup step that failed: what, and why.
type Failed = (String, Box<dyn std::error::Error + Send + Sync>);

fn short(what: &'static str, s: &str) -> Result<ShortString, Error> {
    ShortString::try_new(s.to_owned()).map_err(|_| Error::Invalid {
        what,
        reason: "it is longer than 255 bytes",
    })
}

/// The AMQP reply code of an error that closed a channel (404 not found, ...).
fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(a) => Some(a.get_id()),
        _ => None,
    }
}

impl RabbitAdapter {
    /// Checks the settings, connects, and declares and binds the queue (`declare`) or checks
    /// that it exists. Errors name the server (host, port, vhost), never the credentials.
    pub async fn connect(config: &RabbitConsumerConfig) -> Result<Self, Error> {
        let invalid = |reason| Error::Invalid {
            what: "rabbitmq consumer config",
            reason,
        };
        let url = AmqpUrl::parse(&config.url, "the RabbitMQ url").map_err(|e| Error::Broker {
            context: "unusable RabbitMQ url".into(),
            source: Box::new(e),
        })?;
        if config.queue.is_empty() {
            return Err(invalid("queue must not be empty"));
        }
        if config.prefetch == 0 {
            return Err(invalid(
                "prefetch must be at least 1 (0 is unlimited in AMQP)",
            ));
        }
        let declare = match &config.declare {
            None => None,
            Some(q) => {
                if q.exchange.is_empty() && !q.binding_keys.is_empty() {
                    return Err(invalid(
                        "the default exchange (empty name) takes no binding keys",
                    ));
                }
                if !q
                    .exchange
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
                {
                    return Err(invalid(
                        "exchange must be letters, digits, '-', '_', '.' or ':'",
                    ));
                }
                let keys = q
                    .binding_keys
                    .iter()
                    .map(|k| short("binding key", k))
                    .collect::<Result<Vec<_>, _>>()?;
                Some((short("exchange name", &q.exchange)?, keys))
            }
        };
        let adapter = RabbitAdapter {
            queue: short("queue name", &config.queue)?,
            queue_name: config.queue.as_str().into(),
            prefetch: config.prefetch,
            declare,
            url,
            state: tokio::sync::Mutex::new(State::default()),
        };
        let conn = adapter
            .setup()
            .await
            .map_err(|(context, source)| Error::Broker { context, source })?;
        *adapter.state.lock().await = State {
            link: Some(Link {
                conn,
                _channel: None,
            }),
            fresh: true,
        };
        tracing::info!(server = %adapter.url.shown(), queue = %adapter.queue_name,
            prefetch = adapter.prefetch, "using RabbitMQ queue");
        Ok(adapter)
    }

    /// A new connection with the queue set up (declared and bound, or checked), bounded.
    async fn setup(&self) -> Result<Connection, Failed> {
        let shown = self.url.shown();
        let work = async {
            let conn = self
                .url
                .connect("tidings-consumer", OwnedTLSConfig::default())
                .await
                .map_err(|e| (format!("cannot connect to RabbitMQ at {shown}"), e.into()))?;
            match self.declare_queue(&conn).await {
                Ok(()) => Ok(conn),
                Err(e) => {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "OK".into())).await;
                    Err(e)
                }
            }
        };
        match tokio::time::timeout(OPEN_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err((
                format!("RabbitMQ at {shown} did not answer"),
                format!("connecting and setting up took longer than {OPEN_TIMEOUT:?}").into(),
            )),
        }
    }

    /// Checks that the queue exists, or (with `declare`) declares it and binds it. A passive
    /// declare that finds nothing closes its channel, so each step has a channel of its own.
    async fn declare_queue(&self, conn: &Connection) -> Result<(), Failed> {
        let (shown, queue) = (self.url.shown(), &self.queue_name);
        let failed = |what: String| move |e: lapin::Error| (what, Box::new(e) as _);
        let channel = || async {
            conn.create_channel().await.map_err(failed(format!(
                "cannot open a channel to RabbitMQ at {shown}"
            )))
        };
        let exists = channel()
            .await?
            .queue_declare(
                self.queue.clone(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .map(|_| true)
            .or_else(|e| match reply_code(&e) {
                Some(404) => Ok(false),
                _ => Err(failed(format!(
                    "cannot look up RabbitMQ queue {queue:?} at {shown}"
                ))(e)),
            })?;
        let Some((exchange, keys)) = &self.declare else {
            return if exists {
                Ok(())
            } else {
                Err((
                    format!("RabbitMQ queue {queue:?} does not exist at {shown}"),
                    "declare it, or set `declare` in the consumer config".into(),
                ))
            };
        };
        let ch = channel().await?;
        if !exists {
            ch.queue_declare(
                self.queue.clone(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(failed(format!(
                "cannot declare RabbitMQ queue {queue:?} at {shown}"
            )))?;
        }
        if exchange.as_str().is_empty() {
            return Ok(());
        }
        let exchange_exists = channel()
            .await?
            .exchange_declare(
                exchange.clone(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|_| true)
            .or_else(|e| match reply_code(&e) {
                Some(404) => Ok(false),
                _ => Err(failed(format!(
                    "cannot look up RabbitMQ exchange {exchange:?} at {shown}"
                ))(e)),
            })?;
        if !exchange_exists {
            ch.exchange_declare(
                exchange.clone(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(failed(format!(
                "cannot declare RabbitMQ exchange {exchange:?} at {shown}"
            )))?;
        }
        for key in keys {
            ch.queue_bind(
                self.queue.clone(),
                exchange.clone(),
                key.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed(format!(
                "cannot bind RabbitMQ queue {queue:?} to exchange {exchange:?} with {key:?} at {shown}"
            )))?;
        }
        Ok(())
    }

    /// A channel with the prefetch set, consuming the queue with manual acks, bounded.
    async fn consume(&self, conn: &Connection) -> Result<(Channel, lapin::Consumer), Failed> {
        let shown = self.url.shown();
        let work = async {
            let ch = conn.create_channel().await?;
            ch.basic_qos(self.prefetch, BasicQosOptions { global: false })
                .await?;
            let tag = format!("tidings-{}", uuid::Uuid::now_v7().simple());
            let consumer = ch
                .basic_consume(
                    self.queue.clone(),
                    tag.into(),
                    BasicConsumeOptions {
                        no_ack: false,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((ch, consumer))
        };
        match tokio::time::timeout(OPEN_TIMEOUT, work).await {
            Ok(r) => r.map_err(|e| {
                (
                    format!(
                        "cannot consume RabbitMQ queue {:?} at {shown}",
                        self.queue_name
                    ),
                    e.into(),
                )
            }),
            Err(_) => Err((
                format!("RabbitMQ at {shown} did not answer"),
                format!("starting the consumer took longer than {OPEN_TIMEOUT:?}").into(),
            )),
        }
    }
}

/// Closes a connection (its unacked deliveries go back to the queue), bounded; a connection
/// already lost needs nothing.
async fn close(link: Link, why: &str) {
    if !link.conn.status().connected() {
        return;
    }
    match tokio::time::timeout(CLOSE_TIMEOUT, link.conn.close(200, why.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "closing the RabbitMQ connection failed"),
        Err(_) => tracing::debug!("RabbitMQ did not confirm closing the connection in time"),
    }
}

/// One failed setup step as the runner sees it.
struct OpenError(Failed);

impl std::fmt::Debug for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:?}", self.0 .0, self.0 .1)
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0 .0)
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0 .1)
    }
}

impl Adapter for RabbitAdapter {
    type Delivery = RabbitDelivery;

    fn open(&self) -> BoxFuture<'_, Result<Deliveries<'_, RabbitDelivery>, AdapterError>> {
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let fresh = std::mem::take(&mut state.fresh);
            let reusable = state
                .link
                .take()
                .filter(|l| fresh && l.conn.status().connected());
            if reusable.is_none() {
                // Its deliveries were all settled (the runner finishes them before reopening)
                // or are given back to the queue by the close.
                if let Some(old) = state.link.take() {
                    close(old, "tidings consumer reconnecting").await;
                }
            }
            let conn = match reusable {
                Some(l) => l.conn,
                None => self.setup().await.map_err(OpenError)?,
            };
            let (channel, consumer) = match self.consume(&conn).await {
                Ok(c) => c,
                Err(e) => {
                    close(
                        Link {
                            conn,
                            _channel: None,
                        },
                        "tidings consumer failed to start",
                    )
                    .await;
                    return Err(OpenError(e).into());
                }
            };
            state.link = Some(Link {
                conn,
                _channel: Some(channel),
            });
            tracing::debug!(server = %self.url.shown(), queue = %self.queue_name, "consuming");
            let queue = self.queue_name.clone();
            // Dropping the stream cancels the consumer (lapin sends basic.cancel): at shutdown
            // nothing more is delivered while the last messages finish.
            Ok(consumer
                .map(move |d| match d {
                    Ok(d) => Ok(RabbitDelivery::new(d, queue.clone())),
                    Err(e) => Err(AdapterError::from(e)),
                })
                .boxed())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Acks are written in order before the close: none is lost. What is unacked goes
            // back to the queue.
            let link = self.state.lock().await.link.take();
            if let Some(l) = link {
                close(l, "tidings consumer stopping").await;
            }
        })
    }

    fn hold_interval(&self) -> Option<Duration> {
        None
    }
}

/// A RabbitMQ delivery.
pub struct RabbitDelivery {
    acker: lapin::Acker,
    routing_key: ShortString,
    redelivered: bool,
    properties: BasicProperties,
    payload: Bytes,
    queue: Arc<str>,
}

impl RabbitDelivery {
    fn new(d: lapin::message::Delivery, queue: Arc<str>) -> Self {
        RabbitDelivery {
            acker: d.acker,
            routing_key: d.routing_key,
            redelivered: d.redelivered,
            properties: d.properties,
            payload: Bytes::from(d.data),
            queue,
        }
    }

    /// The AMQP properties (headers included).
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        self.routing_key.as_str()
    }

    /// Whether RabbitMQ delivered it before (to this or another consumer).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Which delivery this is: quorum queues count (`x-delivery-count`), classic queues only say
    /// whether it is a redelivery.
    fn delivery_count(&self) -> i64 {
        let counted = self
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(DELIVERY_COUNT))
            .and_then(integer);
        match counted {
            Some(n) => n.saturating_add(1).max(1),
            None if self.redelivered => 2,
            None => 1,
        }
    }

    /// Where the topic comes from when `Tidings-Topic` is missing: the routing key, or the
    /// queue name when it is empty.
    fn fallback_topic(&self) -> &str {
        match self.routing_key.as_str() {
            "" => &self.queue,
            rk => rk,
        }
    }
}

/// An AMQP integer as i64.
fn integer(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    })
}

/// A header value as text: strings as they are, scalars shown; None for what has no text form
/// (tables, arrays, void, bytes that are not UTF-8).
fn text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.to_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::DecimalValue(d) => {
            let scale = u32::from(d.scale.min(9));
            let (int, frac) = (d.value / 10u32.pow(scale), d.value % 10u32.pow(scale));
            if scale == 0 {
                int.to_string()
            } else {
                format!("{int}.{frac:0width$}", width = scale as usize)
            }
        }
        other => integer(other)?.to_string(),
    })
}

/// The headers as text (see [`text`]), without RabbitMQ's own delivery count.
fn headers_of(p: &BasicProperties) -> BTreeMap<String, String> {
    p.headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .filter(|(k, _)| !k.as_str().eq_ignore_ascii_case(DELIVERY_COUNT))
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), text(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

impl Delivery for RabbitDelivery {
    fn decode(&self) -> Decoded {
        let headers = headers_of(&self.properties);
        let amqp_id = self.properties.message_id().as_ref().map(|s| s.as_str());
        let fallback = amqp_id.and_then(|s| s.parse::<MessageId>().ok());
        let delivered = |message| Delivered {
            message,
            source: self.queue.to_string(),
            delivery: self.delivery_count(),
            replayed: false,
        };
        match WireMessage::decode(
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            self.payload.clone(),
            fallback,
            self.fallback_topic(),
        ) {
            Ok(m) => Decoded::Message(delivered(m)),
            Err(e) => {
                // Stable per message, so a lost ack after parking does not park it twice.
                let id = fallback.unwrap_or_else(|| {
                    MessageId::from_uuid(stable_id(
                        &self.queue,
                        amqp_id,
                        self.routing_key.as_str(),
                        &headers,
                        &self.payload,
                    ))
                });
                Decoded::Unusable {
                    parked_as: delivered(WireMessage {
                        id,
                        topic: self.fallback_topic().to_owned(),
                        key: None,
                        biz_id: None,
                        headers,
                        payload: self.payload.clone(),
                        created_at: None,
                        attempts: 0,
                    }),
                    reason: format!("not a Tidings message: {e}"),
                }
            }
        }
    }

    fn ack(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move {
            match self.acker.ack(BasicAckOptions::default()).await {
                Ok(true) => Ok(()),
                // Its channel closed (the connection was lost): RabbitMQ redelivers it.
                Ok(false) => {
                    Err("the delivery's channel is closed: RabbitMQ redelivers the message".into())
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    /// RabbitMQ has no delayed nack: the message is requeued at once (at its place in the
    /// queue), whatever `delay`. The runner only gives messages back this way at shutdown.
    fn retry_later(&self, _delay: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            if let Err(e) = self.acker.nack(requeue).await {
                tracing::debug!(error = %e, "cannot give a message back; the connection's close requeues it");
            }
        })
    }

    /// False once the delivery's channel is gone (RabbitMQ requeued the message) or it was
    /// settled.
    fn is_live(&self) -> bool {
        self.acker.usable()
    }
}

/// The id a message without a usable one is parked under: from its queue and content, so a
/// redelivery is parked under the same id.
fn stable_id(
    queue: &str,
    amqp_id: Option<&str>,
    routing_key: &str,
    headers: &BTreeMap<String, String>,
    payload: &[u8],
) -> uuid::Uuid {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(queue.as_bytes());
    field(amqp_id.unwrap_or_default().as_bytes());
    field(routing_key.as_bytes());
    for (k, v) in headers {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    field(payload);
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{DecimalValue, FieldArray, LongString};

    fn delivery(
        props: BasicProperties,
        routing_key: &str,
        redelivered: bool,
        data: &[u8],
    ) -> RabbitDelivery {
        let mut d = lapin::message::Delivery::mock(
            1,
            "tidings".into(),
            routing_key.into(),
            redelivered,
            data.to_vec(),
        );
        d.properties = props;
        RabbitDelivery::new(d, "q".into())
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
    }

    #[test]
    fn what_the_sink_writes_decodes() {
        let m = WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic: "payment.succeeded".into(),
            key: Some("cust_7".into()),
            biz_id: Some("pay_1".into()),
            headers: [("traceparent".to_owned(), "00-ab-cd-01".to_owned())].into(),
            payload: Bytes::from_static(b"{}"),
            created_at: Some(chrono::Utc::now()),
            attempts: 1,
        };
        let mut t = FieldTable::default();
        for (k, v) in m.encode_headers() {
            t.insert(k.into(), long(&v));
        }
        let props = BasicProperties::default()
            .with_message_id(m.id.to_string().into())
            .with_headers(t.clone());
        let Decoded::Message(d) = delivery(props, "payment.succeeded", false, b"{}").decode()
        else {
            panic!("a Tidings message")
        };
        assert_eq!(d.id, m.id);
        assert_eq!(d.biz_id.as_deref(), Some("pay_1"));
        assert_eq!(d.key.as_deref(), Some("cust_7"));
        assert_eq!(d.topic, "payment.succeeded");
        assert_eq!(d.attempts, 1);
        assert_eq!(d.headers["traceparent"], "00-ab-cd-01");
        assert_eq!((d.source.as_str(), d.delivery), ("q", 1));

        // Redelivered by a classic queue: 2; a quorum queue counts.
        let props = BasicProperties::default().with_headers(t.clone());
        let Decoded::Message(d) = delivery(props, "x", true, b"").decode() else {
            panic!()
        };
        assert_eq!(d.delivery, 2);
        t.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(4));
        let props = BasicProperties::default().with_headers(t);
        let Decoded::Message(d) = delivery(props, "x", true, b"").decode() else {
            panic!()
        };
        assert_eq!(d.delivery, 5);
        assert!(
            !d.headers.contains_key(DELIVERY_COUNT),
            "not the producer's"
        );
    }

    #[test]
    fn a_message_from_elsewhere_is_parked_under_a_stable_id_never_a_panic() {
        let mut t = FieldTable::default();
        t.insert("n".into(), AMQPValue::LongInt(-3));
        t.insert("ok".into(), AMQPValue::Boolean(true));
        t.insert(
            "price".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1234,
            }),
        );
        t.insert("bin".into(), AMQPValue::LongString(vec![0xff, 0xfe].into()));
        t.insert("arr".into(), AMQPValue::FieldArray(FieldArray::default()));
        t.insert("tbl".into(), AMQPValue::FieldTable(FieldTable::default()));
        t.insert("void".into(), AMQPValue::Void);
        let props = BasicProperties::default()
            .with_message_id("order-17".into())
            .with_headers(t);
        let d = delivery(props.clone(), "orders.created", true, b"{\"x\":1}");
        let Decoded::Unusable { parked_as, reason } = d.decode() else {
            panic!("no Tidings id")
        };
        assert!(reason.contains("no message id"), "{reason}");
        assert_eq!(parked_as.topic, "orders.created");
        assert_eq!(parked_as.payload.as_ref(), b"{\"x\":1}");
        assert_eq!(parked_as.delivery, 2);
        let h = &parked_as.headers;
        assert_eq!(
            (h["n"].as_str(), h["ok"].as_str(), h["price"].as_str()),
            ("-3", "true", "12.34")
        );
        assert!(!h.contains_key("bin") && !h.contains_key("arr") && !h.contains_key("tbl"));
        // The same message again: the same id; other content: another.
        let again = delivery(props.clone(), "orders.created", false, b"{\"x\":1}").decode();
        let Decoded::Unusable { parked_as: p2, .. } = again else {
            panic!()
        };
        assert_eq!(p2.id, parked_as.id);
        let other = delivery(props, "orders.created", false, b"{\"x\":2}").decode();
        let Decoded::Unusable { parked_as: p3, .. } = other else {
            panic!()
        };
        assert_ne!(p3.id, parked_as.id);

        // A bad Tidings header with a usable AMQP message_id: parked under that id.
        let id = MessageId::from_uuid(uuid::Uuid::now_v7());
        let mut t = FieldTable::default();
        t.insert("Tidings-Attempt".into(), long("many"));
        let props = BasicProperties::default()
            .with_message_id(id.to_string().into())
            .with_headers(t);
        let Decoded::Unusable { parked_as, .. } = delivery(props, "", false, b"").decode() else {
            panic!()
        };
        assert_eq!(parked_as.id, id);
        assert_eq!(
            parked_as.topic, "q",
            "the queue when there is no routing key"
        );
        // No headers at all, and a message_id that is a UUID: a message (dedup by that id).
        let props = BasicProperties::default().with_message_id(id.to_string().into());
        let Decoded::Message(d) = delivery(props, "a.b", false, b"").decode() else {
            panic!()
        };
        assert_eq!(
            (d.id, d.topic.as_str(), d.biz_id.as_deref()),
            (id, "a.b", None)
        );
    }

    #[tokio::test]
    async fn settings_are_checked_and_never_show_the_password() {
        let c = RabbitConsumerConfig {
            url: "amqp://u:hunter2@h:5672/%2f".into(),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
        assert_eq!(RabbitConsumerConfig::default().prefetch, 64);
        let bad = [
            RabbitConsumerConfig {
                url: "amqp://u:hunter2@h:nope/".into(),
                ..Default::default()
            },
            RabbitConsumerConfig {
                prefetch: 0,
                ..Default::default()
            },
            RabbitConsumerConfig {
                queue: String::new(),
                ..Default::default()
            },
            RabbitConsumerConfig {
                queue: "q".repeat(256),
                ..Default::default()
            },
            RabbitConsumerConfig {
                declare: Some(QueueSetup {
                    exchange: String::new(),
                    binding_keys: vec!["a".into()],
                }),
                ..Default::default()
            },
            RabbitConsumerConfig {
                declare: Some(QueueSetup {
                    exchange: "a b".into(),
                    binding_keys: vec![],
                }),
                ..Default::default()
            },
        ];
        for c in bad {
            let e = RabbitAdapter::connect(&c).await.unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(
                matches!(e, Error::Invalid { .. } | Error::Broker { .. }),
                "{shown}"
            );
        }
    }
}
