//! NATS JetStream sink. Subject = `<prefix>.<topic>`; `Nats-Msg-Id` = the message id, so
//! JetStream drops a re-send within the stream's duplicate window; success only on the PubAck.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use futures::future::BoxFuture;

use super::{Capabilities, Delivery, Envelope, Sink, SinkError};
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
#[derive(Clone)]
pub struct NatsSinkConfig {
    /// Server URL(s), comma-separated (`nats://`, `tls://`, or `host:port`); `user:password@` or
    /// `token@` in the URLs are taken out and sent as the connection's credentials (the same
    /// credentials on every URL), so no URL handed to the NATS client carries a secret.
    /// Defaults to `nats://127.0.0.1:4222`.
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

/// Shows the servers without their credentials (the URL may carry a password or token).
impl std::fmt::Debug for NatsSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers = parse_servers(&self.url)
            .map(|s| s.addrs.join(","))
            .unwrap_or_else(|_| "<invalid>".into());
        f.debug_struct("NatsSinkConfig")
            .field("url", &servers)
            .field("subject_prefix", &self.subject_prefix)
            .field("stream", &self.stream)
            .field("ack_timeout", &self.ack_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("tls_required", &self.tls_required)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("credentials_file", &self.credentials_file)
            .finish()
    }
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

/// The NATS sink's flags and environment variables (`tidings relay --sink nats`).
#[derive(clap::Args)]
#[command(next_help_heading = "NATS JetStream sink (--sink nats)")]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated; credentials in the URL are never logged.
    #[arg(
        long,
        env = "TIDINGS_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,
    /// Subject prefix: topic `t` is published on `<prefix>.t`.
    #[arg(long, env = "TIDINGS_NATS_SUBJECT_PREFIX", default_value = "tidings")]
    pub nats_subject_prefix: String,
    /// Stream to create when none captures `<prefix>.>` (with --nats-create-stream).
    #[arg(long, env = "TIDINGS_NATS_STREAM", default_value = "TIDINGS")]
    pub nats_stream: String,
    /// Create the stream if missing (true), or require an existing one and fail clearly (false).
    #[arg(long, env = "TIDINGS_NATS_CREATE_STREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub nats_create_stream: bool,
    /// Duplicate window of a created stream: re-sends within it are dropped by message id. An
    /// existing stream keeps its own; either way it must outlast --claim-timeout +
    /// --publish-timeout + --backoff-max (checked at start-up).
    #[arg(long, env = "TIDINGS_NATS_DUPLICATE_WINDOW", value_parser = crate::parse_duration, default_value = "2m")]
    pub nats_duplicate_window: Duration,
    /// Require TLS to NATS.
    #[arg(long, env = "TIDINGS_NATS_TLS")]
    pub nats_tls: bool,
    /// Extra CA certificate (PEM) for NATS TLS.
    #[arg(long, env = "TIDINGS_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// NATS credentials file (JWT + nkey).
    #[arg(long, env = "TIDINGS_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
}

impl NatsArgs {
    /// Checks the flags and connects (see [`NatsSink::connect`]); publishes wait
    /// `ack_timeout` for their PubAck.
    pub async fn connect(self, ack_timeout: Duration) -> Result<NatsSink, Error> {
        let name = &self.nats_stream;
        if name.is_empty()
            || name.len() > 255
            || name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
        {
            return Err(config_err(format!(
                "--nats-stream {:?} is not a JetStream stream name (1-255 characters, none of whitespace . * > / \\)",
                name.escape_debug().to_string()
            )));
        }
        for (flag, path) in [
            ("--nats-tls-ca", self.nats_tls_ca.as_ref()),
            ("--nats-creds", self.nats_creds.as_ref()),
        ] {
            if let Some(p) = path {
                std::fs::metadata(p)
                    .map_err(|e| config_err(format!("{flag}: cannot read {}: {e}", p.display())))?;
            }
        }
        NatsSink::connect(NatsSinkConfig {
            url: self.nats_url,
            subject_prefix: self.nats_subject_prefix,
            stream: if self.nats_create_stream {
                StreamSetup::Create {
                    name: self.nats_stream,
                    duplicate_window: self.nats_duplicate_window,
                }
            } else {
                StreamSetup::Existing
            },
            ack_timeout,
            tls_required: self.nats_tls,
            tls_ca_file: self.nats_tls_ca,
            credentials_file: self.nats_creds,
            ..Default::default()
        })
        .await
    }
}

/// Publishes to NATS JetStream.
pub struct NatsSink {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    capabilities: Capabilities,
    probe_timeout: Duration,
    stream_name: String,
}

/// Server addresses without credentials, and the credentials they carried.
#[derive(Debug, PartialEq, Eq)]
struct Servers {
    addrs: Vec<String>,
    auth: Option<Auth>,
}

#[derive(PartialEq, Eq)]
enum Auth {
    UserPassword(String, String),
    Token(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::UserPassword(u, _) => write!(f, "UserPassword({u:?}, ***)"),
            Auth::Token(_) => write!(f, "Token(***)"),
        }
    }
}

/// Splits `--nats-url` into credential-free server URLs and the credentials. Errors never
/// repeat a secret.
fn parse_servers(urls: &str) -> Result<Servers, Error> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| {
                config_err("--nats-url: credentials are not valid UTF-8 after percent-decoding")
            })
    };
    let mut addrs = Vec::new();
    let mut auth: Option<Auth> = None;
    for (i, part) in urls.split(',').map(str::trim).enumerate() {
        if part.is_empty() {
            return Err(config_err(format!(
                "--nats-url: server {} of the list is empty",
                i + 1
            )));
        }
        let with_scheme = if part.contains("://") {
            part.to_owned()
        } else {
            format!("nats://{part}")
        };
        // Errors never show the URL, not even redacted: a password may hold a comma (which
        // splits it here) or other characters that defeat redaction. Percent-encode them.
        let mut url = url::Url::parse(&with_scheme).map_err(|e| {
            config_err(format!(
                "--nats-url: server {} of the list is not a server URL ({e}); percent-encode special characters in credentials",
                i + 1
            ))
        })?;
        if !matches!(url.scheme(), "nats" | "tls" | "ws" | "wss") {
            return Err(config_err(format!(
                "--nats-url: unsupported scheme {:?} (use nats://, tls://, ws:// or wss://)",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(config_err(format!(
                "--nats-url: server {} has no host",
                i + 1
            )));
        }
        let this = match (url.username(), url.password()) {
            ("", None) => None,
            (user, Some(pass)) => Some(Auth::UserPassword(decode(user)?, decode(pass)?)),
            (token, None) => Some(Auth::Token(decode(token)?)),
        };
        if let Some(this) = this {
            match &auth {
                Some(prev) if *prev != this => {
                    return Err(config_err(
                        "--nats-url: the servers of the list carry different credentials; one connection uses one set",
                    ))
                }
                _ => auth = Some(this),
            }
        }
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let mut clean = url.to_string();
        if clean.ends_with('/') && url.path() == "/" {
            clean.pop();
        }
        addrs.push(clean);
    }
    Ok(Servers { addrs, auth })
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
                "--nats-subject-prefix: invalid NATS subject prefix {:?}: {e}",
                config.subject_prefix
            ))
        })?;
        if config.max_in_flight == 0 {
            return Err(config_err("NATS max_in_flight must be greater than 0"));
        }
        let servers = parse_servers(&config.url)?;
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
                    "--nats-creds: cannot read NATS credentials file {}: {e}",
                    creds.display()
                ))
            })?;
        }
        opts = match servers.auth {
            Some(Auth::UserPassword(u, p)) => opts.user_and_password(u, p),
            Some(Auth::Token(t)) => opts.token(t),
            None => opts,
        };
        // Only credential-free addresses reach the client, which logs them.
        let shown = servers.addrs.join(",");
        let addrs = servers
            .addrs
            .iter()
            .map(|a| async_nats::ServerAddr::from_str(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| config_err(format!("--nats-url: {shown}: {e}")))?;
        let client = opts
            .connect(addrs)
            .await
            .map_err(|e| Error::Sink(format!("cannot connect to NATS at {shown}: {e}")))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .max_ack_inflight(config.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let probe = format!("{}.tidings-probe", config.subject_prefix);
        let stream_name = match js.stream_by_subject(probe.clone()).await {
            Ok(name) => {
                tracing::info!(stream = %name, prefix = %config.subject_prefix, "using JetStream stream");
                name
            }
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
                    name.clone()
                }
            },
        };
        // What the stream really does (an existing stream keeps its own settings): the relay
        // checks its re-send horizon against this duplicate window at start-up.
        let info = js
            .get_stream(&stream_name)
            .await
            .map_err(|e| Error::Sink(format!("cannot read JetStream stream {stream_name}: {e}")))?
            .cached_info()
            .clone();
        let server_max = client.server_info().max_payload;
        let stream_max = usize::try_from(info.config.max_message_size).ok();
        let capabilities = Capabilities {
            dedup_window: Some(info.config.duplicate_window),
            max_message_bytes: Some(stream_max.map_or(server_max, |m| m.min(server_max))),
            // A publish that fails (e.g. its ack times out) does not fail the ones sent after
            // it, so a key's messages go one at a time.
            ordered_in_flight: false,
        };
        Ok(NatsSink {
            client,
            js,
            prefix: config.subject_prefix,
            capabilities,
            probe_timeout: config.ack_timeout,
            stream_name,
        })
    }

    /// The subject a topic is published on.
    pub fn subject(&self, topic: &str) -> String {
        format!("{}.{topic}", self.prefix)
    }
}

fn classify(e: jetstream::context::PublishError) -> SinkError {
    use async_nats::jetstream::ErrorCode;
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => return SinkError::Permanent(Box::new(e)),
        // A missing stream, no responders (a stream without quorum) or a dead connection
        // affect every message, not this one.
        PublishErrorKind::StreamNotFound | PublishErrorKind::BrokenPipe => {
            return SinkError::Unavailable(Box::new(e))
        }
        _ => {}
    }
    let api = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
    // "maximum messages per subject exceeded" (a per-subject limit with discard new) concerns
    // this message's subject, not the stream: retryable, and counted.
    if api.is_some_and(|j| j.to_string().contains("per subject")) {
        return SinkError::Retryable(Box::new(e));
    }
    match api.map(|j| j.error_code()) {
        // The stream refuses this message's size for good (max_msg_size, header limit).
        Some(
            ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM,
        ) => SinkError::Permanent(Box::new(e)),
        // Stream full (discard new), storage or memory exhausted, cluster unavailable: the
        // broker as a whole, not this message.
        Some(
            ErrorCode::STREAM_STORE_FAILED
            | ErrorCode::MEMORY_RESOURCES_EXCEEDED
            | ErrorCode::INSUFFICIENT_RESOURCES
            | ErrorCode::CLUSTER_NOT_AVAILABLE
            | ErrorCode::CLUSTER_NO_PEERS
            | ErrorCode::CLUSTER_NOT_LEADER
            | ErrorCode::STREAM_OFFLINE
            | ErrorCode::STREAM_NOT_FOUND,
        ) => SinkError::Unavailable(Box::new(e)),
        // A timed-out ack may still have been stored: the re-send carries the same
        // Nats-Msg-Id and JetStream drops it. A frozen server times out every message of the
        // batch; the relay then probes the server (`check`) and treats it as an outage.
        _ => SinkError::Retryable(Box::new(e)),
    }
}

/// The message's headers as NATS headers; a header the NATS protocol cannot carry (a row
/// written before the schema refused it) is this message's permanent failure, not a panic.
fn nats_headers(msg: &Envelope) -> Result<HeaderMap, SinkError> {
    let mut headers = HeaderMap::new();
    for (name, value) in msg.wire_headers() {
        let n = HeaderName::from_str(name).map_err(|_| {
            SinkError::Permanent(format!("header name {name:?} cannot be carried by NATS").into())
        })?;
        let v = HeaderValue::from_str(&value).map_err(|_| {
            SinkError::Permanent(
                format!("header {name:?} has a value NATS cannot carry (a line break)").into(),
            )
        })?;
        headers.insert(n, v);
    }
    Ok(headers)
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
            let headers = nats_headers(msg)?;
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

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            // Writes out whatever the client still buffers; every publish the relay counted
            // was acknowledged already, so this only matters for abandoned ones.
            self.client
                .flush()
                .await
                .map_err(|e| SinkError::Unavailable(Box::new(e)))
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if self.client.connection_state() != State::Connected {
                return Err(SinkError::Unavailable(
                    "not connected to the NATS server".into(),
                ));
            }
            // A JetStream API round trip to the stream the sink publishes to: a frozen server,
            // a stream without quorum or a deleted stream does not answer it.
            match tokio::time::timeout(self.probe_timeout, self.js.get_stream(&self.stream_name))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(SinkError::Unavailable(Box::new(e))),
                Err(_) => Err(SinkError::Unavailable(
                    format!("JetStream did not answer within {:?}", self.probe_timeout).into(),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_taken_out_of_every_server_url() {
        let s = parse_servers("nats://u:p%40ss@a:4222, b:4223,tls://u:p%40ss@c").unwrap();
        assert_eq!(s.addrs, ["nats://a:4222", "nats://b:4223", "tls://c"]);
        assert_eq!(s.auth, Some(Auth::UserPassword("u".into(), "p@ss".into())));
        let s = parse_servers("s3cr3t@127.0.0.1:4222").unwrap();
        assert_eq!(s.addrs, ["nats://127.0.0.1:4222"]);
        assert_eq!(s.auth, Some(Auth::Token("s3cr3t".into())));
        let e = parse_servers("nats://u:pw1x@a,nats://u:pw2x@b")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("different credentials") && !e.contains("pw1x") && !e.contains("pw2x"),
            "{e}"
        );
        let e = parse_servers("http://u:pw@a").unwrap_err().to_string();
        assert!(e.contains("--nats-url") && !e.contains("pw"), "{e}");
        assert!(parse_servers("a,,b").is_err());
        let e = parse_servers("nats://u:pa,ss@h").unwrap_err().to_string();
        assert!(!e.contains("u:pa") && e.contains("percent-encode"), "{e}");
        assert!(format!("{:?}", Auth::Token("t0k".into())).contains("***"));
        let c = NatsSinkConfig {
            url: "nats://u:hunter2@h:4222".into(),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
    }
}
