//! NATS JetStream sink. Subject = `<prefix>.<topic>`; `Nats-Msg-Id` = the message id, so
//! JetStream drops a re-send within the stream's duplicate window; success only on the PubAck.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use futures::future::BoxFuture;

use super::{Delivery, Envelope, Sink, SinkError};
use crate::Error;

/// How the sink finds the JetStream stream that stores its subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSetup {
    /// Some stream must already capture `<prefix>.>`; checked at start-up (a clear error if
    /// none does, never a hang).
    Existing,
    /// Create this stream capturing `<prefix>.>` if no stream captures the prefix yet.
    /// An existing stream is used as it is.
    Create {
        /// Stream name.
        name: String,
        /// JetStream's dedup window: re-sends with the same `Nats-Msg-Id` within it are dropped.
        /// It must outlast the longest re-send horizon (relay failover plus retry backoff).
        duplicate_window: Duration,
    },
}

/// NATS JetStream sink settings.
#[derive(Debug, Clone)]
pub struct NatsSinkConfig {
    /// Server URL(s), comma-separated; user:password or token in the URL are allowed and never
    /// logged. Defaults to `nats://127.0.0.1:4222`.
    pub url: String,
    /// Subject prefix: a message on topic `t` goes to `<prefix>.t`. Must not be empty (a stream
    /// capturing `>` would also capture request/reply inboxes). Defaults to `tidings`.
    pub subject_prefix: String,
    /// How the stream is found or created. Defaults to creating `TIDINGS` with a 2 minute
    /// duplicate window.
    pub stream: StreamSetup,
    /// How long to wait for a PubAck. Defaults to 5 seconds.
    pub ack_timeout: Duration,
    /// Publishes awaiting their PubAck at once (further ones wait). Defaults to 4096.
    pub max_in_flight: usize,
    /// Require TLS. Defaults to false (true when the URL is `tls://`).
    pub tls_required: bool,
    /// Extra CA certificate (PEM) to trust. Defaults to none (system roots).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS. Defaults to none.
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// NATS credentials file (JWT + nkey). Defaults to none.
    pub credentials_file: Option<PathBuf>,
}

impl Default for NatsSinkConfig {
    fn default() -> Self {
        NatsSinkConfig {
            url: "nats://127.0.0.1:4222".into(),
            subject_prefix: "tidings".into(),
            stream: StreamSetup::Create {
                name: "TIDINGS".into(),
                duplicate_window: Duration::from_secs(120),
            },
            ack_timeout: Duration::from_secs(5),
            max_in_flight: 4096,
            tls_required: false,
            tls_ca_file: None,
            tls_client_cert: None,
            credentials_file: None,
        }
    }
}

/// Publishes to NATS JetStream.
pub struct NatsSink {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
}

fn config_err(what: impl Into<String>) -> Error {
    Error::Config(what.into())
}

impl NatsSink {
    /// Connects, and finds or creates the stream as configured. Fails with a clear error when
    /// the server is unreachable or no stream captures the prefix.
    pub async fn connect(config: NatsSinkConfig) -> Result<Self, Error> {
        tidings_outbox::validate_topic(&config.subject_prefix).map_err(|e| {
            config_err(format!(
                "invalid NATS subject prefix {:?}: {e}",
                config.subject_prefix
            ))
        })?;
        if config.max_in_flight == 0 {
            return Err(config_err("NATS max_in_flight must be greater than 0"));
        }
        let mut opts = async_nats::ConnectOptions::new()
            .name("tidings-relay")
            .connection_timeout(Duration::from_secs(5))
            .require_tls(config.tls_required);
        if let Some(ca) = &config.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &config.tls_client_cert {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(creds) = &config.credentials_file {
            opts = opts.credentials_file(creds).await.map_err(|e| {
                config_err(format!(
                    "cannot read NATS credentials file {}: {e}",
                    creds.display()
                ))
            })?;
        }
        let shown = crate::redact_url(&config.url);
        let client = opts
            .connect(config.url.as_str())
            .await
            .map_err(|e| Error::Sink(format!("cannot connect to NATS at {shown}: {e}")))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .max_ack_inflight(config.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let probe = format!("{}.tidings-probe", config.subject_prefix);
        match js.stream_by_subject(probe.clone()).await {
            Ok(name) => tracing::info!(stream = %name, prefix = %config.subject_prefix, "using JetStream stream"),
            Err(lookup) => match &config.stream {
                StreamSetup::Existing => {
                    return Err(Error::Sink(format!(
                        "no JetStream stream captures subjects {}.> on {shown} ({lookup}); create one, or let tidings create it",
                        config.subject_prefix
                    )))
                }
                StreamSetup::Create {
                    name,
                    duplicate_window,
                } => {
                    js.get_or_create_stream(stream::Config {
                        name: name.clone(),
                        subjects: vec![format!("{}.>", config.subject_prefix)],
                        duplicate_window: *duplicate_window,
                        storage: stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        Error::Sink(format!(
                            "cannot create JetStream stream {name} for {}.> on {shown}: {e}",
                            config.subject_prefix
                        ))
                    })?;
                    // get_or_create returns an existing stream of that name as it is: make
                    // sure it really captures our subjects.
                    if let Err(e) = js.stream_by_subject(probe.clone()).await {
                        return Err(Error::Sink(format!(
                            "JetStream stream {name} exists on {shown} but does not capture {}.> ({e}); add the subject to it or choose another stream name",
                            config.subject_prefix
                        )));
                    }
                    tracing::info!(stream = %name, prefix = %config.subject_prefix, "using JetStream stream (created if missing)");
                }
            },
        }
        Ok(NatsSink {
            client,
            js,
            prefix: config.subject_prefix,
        })
    }

    /// The subject a topic is published on.
    pub fn subject(&self, topic: &str) -> String {
        format!("{}.{topic}", self.prefix)
    }
}

fn classify(e: jetstream::context::PublishError) -> SinkError {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => SinkError::Permanent(Box::new(e)),
        // A missing stream or a dead connection affects every message, not this one.
        PublishErrorKind::StreamNotFound | PublishErrorKind::BrokenPipe => {
            SinkError::Unavailable(Box::new(e))
        }
        // A timed-out ack may still have been stored: the re-send carries the same
        // Nats-Msg-Id and JetStream drops it.
        _ => SinkError::Retryable(Box::new(e)),
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            if self.client.connection_state() != State::Connected {
                return Err(SinkError::Unavailable(
                    "not connected to the NATS server".into(),
                ));
            }
            let mut headers = HeaderMap::new();
            for (name, value) in msg.wire_headers() {
                headers.insert(name, value);
            }
            let publish = PublishMessage::build()
                .payload(msg.payload.clone())
                .headers(headers)
                .message_id(msg.id.to_string());
            let ack = self
                .js
                .send_publish(self.subject(&msg.topic), publish)
                .await
                .map_err(classify)?
                .await
                .map_err(classify)?;
            Ok(Delivery {
                duplicate: ack.duplicate,
            })
        })
    }
}
