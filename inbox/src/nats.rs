//! The NATS JetStream adapter of the consumer runner ([`crate::runner`]): a durable pull
//! consumer whose deliveries the runner handles through the inbox, acking only after commit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::{self, consumer::pull, consumer::PullConsumer, AckKind};
use futures::future::BoxFuture;
use futures::StreamExt;
use tidings_outbox::{MessageId, WireMessage};

pub use crate::runner::postgres::{Handler, PgStore};
use crate::runner::{
    Adapter, AdapterError, Decoded, Deliveries, Delivery, Runner, RunnerConfig, Store,
};
pub use crate::runner::{ConsumerStats, Delivered, ErrorClass, HandlerError};
use crate::Error;

/// Consumer runner settings for JetStream.
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
    /// Messages handled at once (different keys). Defaults to 16.
    pub concurrency: usize,
    /// Deliveries before a failing message is parked in `tidings.inbox_dead_letters` and acked.
    /// Defaults to 5.
    pub max_deliveries: i64,
    /// How long JetStream waits for an ack before redelivering; the runner tells it the message
    /// is in progress every half of it while handling or retrying. Defaults to 30 seconds.
    pub ack_wait: Duration,
    /// Delay of the first retry after a failure; doubles per delivery. Defaults to 1 second.
    pub backoff_base: Duration,
    /// Longest retry delay. Defaults to 1 minute.
    pub backoff_max: Duration,
    /// How often requested replays of parked messages are looked for (`None`: never).
    /// Defaults to 5 seconds.
    pub replay_poll_interval: Option<Duration>,
    /// How long messages in flight may take to finish after shutdown. Defaults to 10 seconds.
    pub shutdown_timeout: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        let r = RunnerConfig::default();
        ConsumerConfig {
            name: r.name,
            stream: "TIDINGS".into(),
            filter_subject: "tidings.>".into(),
            concurrency: r.concurrency,
            max_deliveries: r.max_deliveries,
            ack_wait: Duration::from_secs(30),
            backoff_base: r.backoff_base,
            backoff_max: r.backoff_max,
            replay_poll_interval: r.replay_poll_interval,
            shutdown_timeout: r.shutdown_timeout,
        }
    }
}

impl ConsumerConfig {
    /// The runner's part of these settings.
    pub fn runner(&self) -> RunnerConfig {
        RunnerConfig {
            name: self.name.clone(),
            concurrency: self.concurrency,
            max_deliveries: self.max_deliveries,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            replay_poll_interval: self.replay_poll_interval,
            shutdown_timeout: self.shutdown_timeout,
            ..RunnerConfig::default()
        }
    }
}

/// How long one pull request waits at the server.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The JetStream side of a consumer: a durable pull consumer, created if missing, and created
/// again when it is deleted while the runner runs.
pub struct NatsAdapter {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    consumer_config: pull::Config,
    ack_wait: Duration,
    current: std::sync::Mutex<PullConsumer>,
}

impl NatsAdapter {
    /// Checks the settings and finds or creates the durable pull consumer `config.name` on
    /// `config.stream`.
    pub async fn connect(
        client: async_nats::Client,
        config: &ConsumerConfig,
    ) -> Result<Self, Error> {
        if config.name.is_empty()
            || !config
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::Invalid {
                what: "consumer config",
                reason: "name must be letters, digits, '-' or '_' (a JetStream durable name)",
            });
        }
        if config.ack_wait < Duration::from_millis(100) {
            return Err(Error::Invalid {
                what: "consumer config",
                reason: "ack_wait must be at least 100ms",
            });
        }
        let consumer_config = pull::Config {
            durable_name: Some(config.name.clone()),
            filter_subject: config.filter_subject.clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            // The runner counts deliveries and parks; the server never gives up on its own.
            max_deliver: -1,
            max_ack_pending: (config.concurrency * 8) as i64,
            ..Default::default()
        };
        let js = jetstream::new(client.clone());
        let current = find_or_create(&js, &config.stream, &consumer_config)
            .await
            .map_err(|e| Error::Database(e.to_string().into()))?;
        Ok(NatsAdapter {
            client,
            js,
            stream: config.stream.clone(),
            consumer_config,
            ack_wait: config.ack_wait,
            current: std::sync::Mutex::new(current),
        })
    }

    /// The JetStream pull consumer in use.
    pub fn pull_consumer(&self) -> PullConsumer {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

async fn find_or_create(
    js: &jetstream::Context,
    stream: &str,
    config: &pull::Config,
) -> Result<PullConsumer, String> {
    let name = config.durable_name.as_deref().unwrap_or_default();
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("cannot find JetStream stream {stream:?}: {e}"))?;
    stream
        .get_or_create_consumer(name, config.clone())
        .await
        .map_err(|e| format!("cannot create durable consumer {name:?}: {e}"))
}

impl Adapter for NatsAdapter {
    type Delivery = NatsDelivery;

    fn open(&self) -> BoxFuture<'_, Result<Deliveries<'_, NatsDelivery>, AdapterError>> {
        Box::pin(async move {
            // Looked up (and created if it was deleted) on every open: after a failure the
            // runner reopens with a growing pause, so a deleted consumer is recreated and never
            // makes it spin.
            let consumer = find_or_create(&self.js, &self.stream, &self.consumer_config).await?;
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = consumer.clone();
            // Short pull requests: one left behind by a stopped or reopened stream holds
            // messages delivered to it (until their ack wait) only until it expires.
            let messages = consumer
                .stream()
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_EXPIRES / 2)
                .messages()
                .await?;
            Ok(messages
                .filter_map(|m| {
                    futures::future::ready(match m {
                        Ok(msg) => Some(Ok(NatsDelivery { msg })),
                        // The stream recovers from a missed heartbeat by itself (new pull
                        // requests); reopening would only leave a pull request behind.
                        Err(e) if e.kind() == MessagesErrorKind::MissingHeartbeat => {
                            tracing::warn!(error = %e, "JetStream missed a heartbeat");
                            None
                        }
                        Err(e) => Some(Err(AdapterError::from(e))),
                    })
                })
                .boxed())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.client.flush().await {
                tracing::warn!(error = %e, "cannot flush the last acks to NATS");
            }
        })
    }

    fn hold_interval(&self) -> Option<Duration> {
        Some(self.ack_wait / 2)
    }
}

/// A JetStream delivery.
pub struct NatsDelivery {
    msg: jetstream::Message,
}

impl NatsDelivery {
    /// The JetStream message.
    pub fn message(&self) -> &jetstream::Message {
        &self.msg
    }
}

impl Delivery for NatsDelivery {
    fn decode(&self) -> Decoded {
        match parse(&self.msg) {
            Some(d) => Decoded::Message(d),
            None => Decoded::Unusable {
                parked_as: unidentified(&self.msg),
                reason: "message has no usable message id (no Tidings-Message-Id or Nats-Msg-Id)"
                    .into(),
            },
        }
    }

    fn ack(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move { self.msg.ack().await })
    }

    fn hold(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.msg.ack_with(AckKind::Progress).await;
        })
    }

    fn retry_later(&self, delay: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Not sooner than this runner's last pull request expires: JetStream would hand the
            // message straight back to that request, which nobody reads any more, and it would
            // come back only after ack_wait, behind the key's later messages.
            let delay = delay.max(PULL_EXPIRES + Duration::from_secs(1));
            let _ = self.msg.ack_with(AckKind::Nak(Some(delay))).await;
        })
    }
}

/// Consumes a JetStream stream through the inbox: the runner core on the JetStream adapter
/// (derefs to [`Runner`]: `run`, `stats`, `replay_parked`).
pub struct NatsConsumer<S: Store = PgStore> {
    runner: Runner<NatsAdapter, S>,
}

impl NatsConsumer<PgStore> {
    /// Checks the config, finds or creates the durable pull consumer, and runs `handler` on
    /// `pool`'s tokio-postgres connections.
    pub async fn new(
        pool: deadpool_postgres::Pool,
        client: async_nats::Client,
        config: ConsumerConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<Self, Error> {
        NatsConsumer::with_store(PgStore::new(pool, handler), client, config).await
    }
}

impl<S: Store> NatsConsumer<S> {
    /// A consumer whose handler runs in `store` (e.g. [`crate::runner::diesel::DieselStore`]
    /// for a diesel-async handler).
    pub async fn with_store(
        store: S,
        client: async_nats::Client,
        config: ConsumerConfig,
    ) -> Result<Self, Error> {
        let runner = config.runner();
        runner.validate()?;
        let adapter = NatsAdapter::connect(client, &config).await?;
        Ok(NatsConsumer {
            runner: Runner::new(adapter, store, runner)?,
        })
    }

    /// The JetStream pull consumer in use.
    pub fn pull_consumer(&self) -> PullConsumer {
        self.runner.adapter().pull_consumer()
    }
}

impl<S: Store> std::ops::Deref for NatsConsumer<S> {
    type Target = Runner<NatsAdapter, S>;
    fn deref(&self) -> &Self::Target {
        &self.runner
    }
}

impl Delivered {
    /// Reads a JetStream message published by the Tidings relay; None without a usable message
    /// id (for code that fetches from JetStream itself).
    pub fn from_message(msg: &jetstream::Message) -> Option<Delivered> {
        parse(msg)
    }
}

fn delivery_count(msg: &jetstream::Message) -> i64 {
    msg.info().map(|i| i.delivered).unwrap_or(1)
}

/// A message without a usable id, so it can be parked: under an id derived from its stream
/// and stream sequence (the same on every redelivery, so a lost ack after parking does not park
/// it twice), or a fresh one when JetStream does not say.
fn unidentified(msg: &jetstream::Message) -> Delivered {
    let id = match msg.info() {
        Ok(info) => {
            // FNV-1a of the stream name, beside the stream sequence.
            let stream = info.stream.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            uuid::Uuid::from_u64_pair(stream, info.stream_sequence)
        }
        Err(_) => uuid::Uuid::now_v7(),
    };
    Delivered {
        message: WireMessage {
            id: MessageId::from_uuid(id),
            topic: msg.subject.to_string(),
            key: None,
            biz_id: None,
            headers: headers_of(msg),
            payload: msg.payload.clone(),
            created_at: None,
            attempts: 0,
        },
        source: msg.subject.to_string(),
        delivery: delivery_count(msg),
        replayed: false,
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

/// Reads a JetStream message published by the Tidings relay; None without a message id.
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
        source: msg.subject.to_string(),
        delivery: delivery_count(msg),
        replayed: false,
    })
}
