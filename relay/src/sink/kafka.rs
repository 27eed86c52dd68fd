//! Kafka sink (librdkafka through rdkafka). Kafka topic = `--kafka-topic-template` with
//! `{topic}` replaced by the Tidings topic; Kafka key = the ordering key (so a key's order is its
//! partition's order; messages without a key are spread); the `Tidings-*` and the producer's
//! headers (`traceparent`) as Kafka headers; the Kafka timestamp = the enqueue time.
//!
//! The producer is idempotent (`enable.idempotence`, `acks=all`): librdkafka's own retries never
//! duplicate or reorder a message within one producer session. A re-send from a new session (a
//! relay restart, a lost delivery report) is a second record: Kafka has no dedup by message id,
//! so the sink declares no dedup window and consumers must use the inbox. Success is the
//! delivery report only; a local timeout is "outcome unknown" and retried.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::{Capabilities, Delivery, Envelope, Sink, SinkError};
use crate::Error;

/// Longest wait for a metadata request (start-up check, topic lookup, health probe).
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Kafka sink settings.
#[derive(Clone)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers, comma-separated `host:port`. Defaults to `127.0.0.1:9092`.
    pub brokers: String,
    /// Kafka topic of a message: `{topic}` is replaced by the Tidings topic (e.g.
    /// `outbox.{topic}`); without `{topic}`, every message goes to this one topic. Defaults to
    /// `{topic}`.
    pub topic_template: String,
    /// Create a missing topic (with `partitions` partitions, replication 1 unless
    /// `replication` says otherwise) instead of dead-lettering its messages. Defaults to false.
    pub create_topics: bool,
    /// Partitions of a created topic. Defaults to 6.
    pub partitions: i32,
    /// Replication factor of a created topic. Defaults to 1.
    pub replication: i32,
    /// Debezium outbox-router compatible records: an `id` header with the message id, and the
    /// biz-id as the key when the message has no ordering key. Defaults to false.
    pub debezium: bool,
    /// Any librdkafka property (`security.protocol`, `sasl.mechanism`, `sasl.username`,
    /// `sasl.password`, `ssl.ca.location`, ...), applied after the sink's own. Values are never
    /// logged.
    pub properties: Vec<(String, String)>,
    /// How long librdkafka tries to deliver one message before it reports it timed out
    /// (`message.timeout.ms`); keep it below the relay's publish timeout. Defaults to 4 s.
    pub delivery_timeout: Duration,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        KafkaSinkConfig {
            brokers: "127.0.0.1:9092".into(),
            topic_template: "{topic}".into(),
            create_topics: false,
            partitions: 6,
            replication: 1,
            debezium: false,
            properties: Vec::new(),
            delivery_timeout: Duration::from_secs(4),
        }
    }
}

/// Shows the properties' names only (values may be passwords).
impl std::fmt::Debug for KafkaSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.properties.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaSinkConfig")
            .field("brokers", &self.brokers)
            .field("topic_template", &self.topic_template)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("debezium", &self.debezium)
            .field("properties", &names)
            .field("delivery_timeout", &self.delivery_timeout)
            .finish()
    }
}

/// The Kafka sink's flags and environment variables (`tidings relay --sink kafka`).
#[derive(clap::Args)]
#[command(next_help_heading = "Kafka sink (--sink kafka)")]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "TIDINGS_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Kafka topic of a message; `{topic}` is replaced by its Tidings topic (e.g.
    /// `outbox.{topic}`). Without `{topic}`, every message goes to that one topic.
    #[arg(long, env = "TIDINGS_KAFKA_TOPIC_TEMPLATE", default_value = "{topic}")]
    pub kafka_topic_template: String,
    /// Create missing topics (else a message for a missing topic is dead-lettered, and a
    /// fixed --kafka-topic-template topic must exist at start-up).
    #[arg(long, env = "TIDINGS_KAFKA_CREATE_TOPICS")]
    pub kafka_create_topics: bool,
    /// Partitions of a topic created with --kafka-create-topics.
    #[arg(long, env = "TIDINGS_KAFKA_PARTITIONS", default_value_t = 6)]
    pub kafka_partitions: i32,
    /// Replication factor of a topic created with --kafka-create-topics.
    #[arg(long, env = "TIDINGS_KAFKA_REPLICATION", default_value_t = 1)]
    pub kafka_replication: i32,
    /// Debezium outbox-router compatible records (`id` header = message id; key = the biz-id
    /// when there is no ordering key), so consumers can move between Debezium and Tidings.
    #[arg(long, env = "TIDINGS_KAFKA_DEBEZIUM")]
    pub kafka_debezium: bool,
    /// A librdkafka property, key=value (repeatable; the environment variable takes them
    /// comma-separated), e.g. security.protocol=SASL_SSL, sasl.mechanism=SCRAM-SHA-512,
    /// sasl.username=..., sasl.password=..., ssl.ca.location=... Values are never logged.
    #[arg(long = "kafka-config", env = "TIDINGS_KAFKA_CONFIG", value_name = "KEY=VALUE",
          value_delimiter = ',', value_parser = parse_property, hide_env_values = true)]
    pub kafka_config: Vec<(String, String)>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE (a librdkafka property)".to_owned())?;
    let k = k.trim();
    if k.is_empty()
        || !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
    {
        return Err(format!(
            "{:?} is not a librdkafka property name",
            k.escape_debug().to_string()
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

impl KafkaArgs {
    /// Checks the flags and connects (see [`KafkaSink::connect`]); librdkafka gives up on a
    /// message a second before `publish_timeout`.
    pub async fn connect(self, publish_timeout: Duration) -> Result<KafkaSink, Error> {
        for (flag, n) in [
            ("--kafka-partitions", self.kafka_partitions),
            ("--kafka-replication", self.kafka_replication),
        ] {
            if !(1..=10_000).contains(&n) {
                return Err(Error::Config(format!("{flag} must be between 1 and 10000")));
            }
        }
        KafkaSink::connect(KafkaSinkConfig {
            brokers: self.kafka_brokers,
            topic_template: self.kafka_topic_template,
            create_topics: self.kafka_create_topics,
            partitions: self.kafka_partitions,
            replication: self.kafka_replication,
            debezium: self.kafka_debezium,
            properties: self.kafka_config,
            delivery_timeout: publish_timeout
                .saturating_sub(Duration::from_secs(1))
                .max(Duration::from_millis(500)),
        })
        .await
    }
}

/// Publishes to Kafka.
pub struct KafkaSink {
    /// Replaced when librdkafka reports a fatal error (an idempotent producer that lost its
    /// sequence cannot go on).
    producer: std::sync::RwLock<FutureProducer>,
    client_config: ClientConfig,
    admin: Option<AdminClient<DefaultClientContext>>,
    config: KafkaSinkConfig,
    max_message_bytes: usize,
    /// Kafka topics seen to exist (or created).
    known: Mutex<HashSet<String>>,
    /// When a produce request last timed out with no delivery since: for a little while
    /// (twice the delivery timeout) the health probe reports it as an outage even though
    /// metadata answers (a broker that takes no writes; after a broker restart the idempotent
    /// producer re-registers first), so the relay counts no attempts; then it tries again.
    /// (first, last) produce timeout since the last delivery. Timeouts that go on for long
    /// (a producer wedged after the broker lost its state) replace the producer.
    stalled: Mutex<Option<(std::time::Instant, std::time::Instant)>>,
}

/// The client configuration: the sink's own settings, then the user's properties.
fn client_config(config: &KafkaSinkConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", "tidings-relay")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().max(1).to_string(),
        )
        // Metadata of a missing topic must not create it behind the sink's back.
        .set("allow.auto.create.topics", "false");
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

fn config_err(m: impl Into<String>) -> Error {
    Error::Config(m.into())
}

impl KafkaSink {
    /// Checks the settings, creates the idempotent producer and checks that the brokers answer
    /// (and, for a fixed topic, that it exists or is created).
    pub async fn connect(config: KafkaSinkConfig) -> Result<KafkaSink, Error> {
        if config.topic_template.is_empty() {
            return Err(config_err("--kafka-topic-template must not be empty"));
        }
        for (k, v) in &config.properties {
            let bad = match k.as_str() {
                "enable.idempotence" => v != "true",
                "acks" => v != "all" && v != "-1",
                _ => false,
            };
            if bad {
                return Err(config_err(format!(
                    "--kafka-config {k}: Tidings needs the idempotent producer (enable.idempotence=true, acks=all)"
                )));
            }
        }
        let cc = client_config(&config);
        // librdkafka checks property names and values here.
        let producer: FutureProducer = cc
            .create()
            .map_err(|e| config_err(format!("--kafka-config: {}", config_error(&e))))?;
        let admin = if config.create_topics {
            Some(
                cc.create::<AdminClient<DefaultClientContext>>()
                    .map_err(|e| config_err(format!("--kafka-config: {}", config_error(&e))))?,
            )
        } else {
            None
        };
        let max_message_bytes = config
            .properties
            .iter()
            .find(|(k, _)| k == "message.max.bytes")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1_000_000);
        let sink = KafkaSink {
            producer: std::sync::RwLock::new(producer),
            client_config: cc,
            admin,
            config,
            max_message_bytes,
            known: Mutex::new(HashSet::new()),
            stalled: Mutex::new(None),
        };
        sink.metadata(None).await.map_err(|e| {
            Error::Sink(format!(
                "cannot reach Kafka at {}: {e}",
                sink.config.brokers
            ))
        })?;
        if !sink.config.topic_template.contains("{topic}") {
            let topic = sink.config.topic_template.clone();
            sink.ensure_topic(&topic).await.map_err(|e| match e {
                SinkError::Permanent(m) => config_err(m.to_string()),
                other => Error::Sink(other.to_string()),
            })?;
        }
        Ok(sink)
    }

    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// After a failed produce: a fatal error (the idempotent producer's sequence is broken, it
    /// was fenced) makes librdkafka refuse every later message, so a new producer takes over
    /// (a new session: a re-send is then a second record, which the inbox absorbs).
    fn renew_if_fatal(&self, used: &FutureProducer) {
        if let Some((code, reason)) = used.client().fatal_error() {
            tracing::warn!(%code, %reason, "Kafka producer hit a fatal error; starting a new one");
            match self.client_config.create::<FutureProducer>() {
                Ok(p) => *self.producer.write().unwrap_or_else(|p| p.into_inner()) = p,
                Err(e) => tracing::error!(error = %e, "cannot create a new Kafka producer"),
            }
        }
    }

    /// The Kafka topic of a Tidings topic.
    pub fn kafka_topic(&self, topic: &str) -> String {
        self.config.topic_template.replace("{topic}", topic)
    }

    /// Fetches metadata (of one topic, or the cluster's brokers) off the runtime: librdkafka's
    /// call blocks. Returns whether the topic exists (always true without a topic).
    async fn metadata(&self, topic: Option<&str>) -> Result<bool, KafkaError> {
        let client = self.producer();
        let topic = topic.map(str::to_owned);
        let lookup = tokio::task::spawn_blocking(move || {
            let md = client
                .client()
                .fetch_metadata(topic.as_deref(), Timeout::After(METADATA_TIMEOUT))?;
            Ok(match topic {
                None => true,
                Some(t) => md.topics().iter().any(|mt| {
                    mt.name() == t && mt.error().is_none() && !mt.partitions().is_empty()
                }),
            })
        });
        match tokio::time::timeout(METADATA_TIMEOUT + Duration::from_secs(1), lookup).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(KafkaError::MetadataFetch(RDKafkaErrorCode::Fail)),
            Err(_) => Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::OperationTimedOut,
            )),
        }
    }

    /// Makes sure `topic` exists: known, looked up, or created (with `create_topics`); a
    /// missing topic otherwise is a permanent failure naming the flag.
    async fn ensure_topic(&self, topic: &str) -> Result<(), SinkError> {
        if self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(topic)
        {
            return Ok(());
        }
        let exists = self
            .metadata(Some(topic))
            .await
            .map_err(|e| SinkError::Retryable(Box::new(e)))?;
        if !exists {
            let Some(admin) = &self.admin else {
                return Err(SinkError::Permanent(
                    format!(
                        "Kafka topic {:?} does not exist: create it, or pass --kafka-create-topics",
                        topic.escape_debug().to_string()
                    )
                    .into(),
                ));
            };
            let new = NewTopic::new(
                topic,
                self.config.partitions,
                TopicReplication::Fixed(self.config.replication),
            );
            let opts = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
            let results = tokio::time::timeout(
                METADATA_TIMEOUT + Duration::from_secs(1),
                admin.create_topics([&new], &opts),
            )
            .await
            .map_err(|_| SinkError::Retryable("creating the Kafka topic timed out".into()))?
            .map_err(|e| SinkError::Retryable(Box::new(e)))?;
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, RDKafkaErrorCode::InvalidTopic)) => {
                        return Err(SinkError::Permanent(
                            format!(
                                "{:?} is not a valid Kafka topic name (see --kafka-topic-template)",
                                topic.escape_debug().to_string()
                            )
                            .into(),
                        ))
                    }
                    Err((_, code)) => {
                        return Err(SinkError::Retryable(
                            format!("cannot create Kafka topic: {code}").into(),
                        ))
                    }
                }
            }
            tracing::info!(
                topic,
                partitions = self.config.partitions,
                "created Kafka topic"
            );
        }
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned());
        Ok(())
    }
}

/// A client creation error without the property's value: rdkafka's own text for a refused
/// property ends with the value, which may be a password.
fn config_error(e: &rdkafka::error::KafkaError) -> String {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, desc, key, _) => format!("{key}: {desc}"),
        e => e.to_string(),
    }
}

/// Kafka topic names: 1-249 characters of ASCII letters, digits, `.`, `_`, `-`, not `.` or `..`.
fn check_topic_name(t: &str) -> Result<(), SinkError> {
    if t.is_empty()
        || t.len() > 249
        || t == "."
        || t == ".."
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(SinkError::Permanent(
            format!(
                "{:?} is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -; see --kafka-topic-template)",
                t.escape_debug().to_string()
            )
            .into(),
        ));
    }
    Ok(())
}

/// How a failed produce is classified.
fn classify(e: KafkaError) -> SinkError {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        // The message can never be accepted.
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::MessageBatchTooLarge
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::InvalidArgument,
        ) => SinkError::Permanent(Box::new(e)),
        // Everything else (timeouts: outcome unknown; leader changes; transport; a full local
        // queue) is retried; the relay's probe tells an outage from failing messages.
        _ => SinkError::Retryable(Box::new(e)),
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let topic = self.kafka_topic(&msg.topic);
            check_topic_name(&topic)?;
            let headers = msg.wire_headers();
            let size = msg.payload.len()
                + headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
                + msg.key.as_ref().map_or(0, String::len);
            if size > self.max_message_bytes {
                return Err(SinkError::Permanent(
                    format!(
                        "message of {size} bytes is larger than Kafka's limit of {} bytes (message.max.bytes)",
                        self.max_message_bytes
                    )
                    .into(),
                ));
            }
            self.ensure_topic(&topic).await?;
            let mut kafka_headers = OwnedHeaders::new_with_capacity(headers.len() + 1);
            for (k, v) in &headers {
                kafka_headers = kafka_headers.insert(Header {
                    key: k,
                    value: Some(v.as_str()),
                });
            }
            let id = msg.id.to_string();
            if self.config.debezium {
                kafka_headers = kafka_headers.insert(Header {
                    key: "id",
                    value: Some(id.as_str()),
                });
            }
            let key = msg.key.as_deref().or(if self.config.debezium {
                msg.biz_id.as_deref()
            } else {
                None
            });
            let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
                .payload(msg.payload.as_ref())
                .headers(kafka_headers);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(t) = msg.created_at {
                record = record.timestamp(t.timestamp_millis());
            }
            let producer = self.producer();
            match producer
                .send(record, Timeout::After(self.config.delivery_timeout))
                .await
            {
                Ok(_) => {
                    *self.stalled.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    Ok(Delivery::default())
                }
                Err((e, _)) => {
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::MessageTimedOut
                                | RDKafkaErrorCode::RequestTimedOut
                                | RDKafkaErrorCode::AllBrokersDown
                                | RDKafkaErrorCode::BrokerTransportFailure
                        )
                    ) {
                        let now = std::time::Instant::now();
                        let mut st = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
                        *st = Some((st.map_or(now, |(first, _)| first), now));
                    }
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::UnknownTopicOrPartition
                                | RDKafkaErrorCode::UnknownTopic
                        )
                    ) {
                        // Deleted since it was seen (or the broker lost it): looked up again.
                        self.known
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&topic);
                    }
                    self.renew_if_fatal(&producer);
                    Err(classify(e))
                }
            }
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Idempotence holds within one producer session only: a re-send after a restart is
            // a second record.
            dedup_window: None,
            max_message_bytes: Some(self.max_message_bytes),
            // One message of a key at a time: a failed message must not be overtaken by the
            // next of its key that librdkafka would still deliver.
            ordered_in_flight: false,
        }
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            self.metadata(None)
                .await
                .map_err(|e| SinkError::Unavailable(Box::new(e)))?;
            let dt = self.config.delivery_timeout;
            let stalled = *self.stalled.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((first, last)) = stalled {
                if first.elapsed() > dt * 4 {
                    // Writes have failed for a while although the broker answers: a new
                    // producer session (a wedged idempotent producer does not recover).
                    tracing::warn!(
                        "Kafka produce requests keep timing out; starting a new producer"
                    );
                    if let Ok(p) = self.client_config.create::<FutureProducer>() {
                        *self.producer.write().unwrap_or_else(|p| p.into_inner()) = p;
                    }
                    *self.stalled.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                if last.elapsed() < dt * 2 {
                    return Err(SinkError::Unavailable(
                        "Kafka answers metadata requests but produce requests time out".into(),
                    ));
                }
            }
            Ok(())
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        let producer = self.producer();
        let timeout = self.config.delivery_timeout;
        Box::pin(async move {
            tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
                .await
                .map_err(|e| SinkError::Retryable(Box::new(e)))?
                .map_err(|e| SinkError::Retryable(Box::new(e)))
        })
    }
}
