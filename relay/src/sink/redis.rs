//! Redis Streams sink (redis-rs). Every message is one stream entry, added with `XADD <stream> *`
//! (Redis assigns the entry id). Stream key = `--redis-stream-template` with `{topic}` replaced
//! by the Tidings topic (default `tidings:{topic}`: topic `payment.succeeded` goes to stream
//! `tidings:payment.succeeded`); without `{topic}`, every message goes to that one stream.
//!
//! Entry fields (the scheme the inbox's Redis adapter decodes):
//! - `id`: the Tidings message id;
//! - `payload`: the payload, as bytes;
//! - `h:<name>`: one field per header, the producer's (`h:traceparent`) and the `Tidings-*`
//!   ones (`h:Tidings-Topic`, `h:Tidings-Key`, ...), values as strings.
//!
//! A batch is one pipeline (one round trip); each XADD succeeds or fails on its own, so one
//! failure does not fail the messages behind it, which is why a key's messages go one at a time
//! (`ordered_in_flight: false`). Success is Redis's reply with the entry id: the entry is in
//! the server's memory, and on disk only as its persistence settings say (`appendonly yes` with
//! `appendfsync always` for no loss on a crash; Redis acknowledges before it fsyncs otherwise).
//!
//! `--redis-maxlen N` adds `MAXLEN ~ N` to every XADD: the stream is trimmed to about N entries.
//! Trimming does not look at consumer groups: an entry nobody has read yet is dropped all the
//! same, so set it well above any backlog consumers may build (or trim elsewhere, by `MINID`).
//!
//! Dedup: Redis before 8.6 has no idempotent XADD, so a re-send (a lost reply, a relay crash
//! between publish and commit) is a second entry, and consumers dedup in the inbox. On Redis
//! 8.6+ (its version from `INFO server` at start-up, and `IDMP` among XADD's arguments in
//! `COMMAND DOCS XADD`) the sink adds `IDMP tidings <message id>` to every
//! XADD (`--redis-idmp auto`, the default; `on` refuses to start without it, `off` never sends
//! it): every relay uses the one producer id `tidings`, so a re-send by any relay of a message
//! id the stream still remembers is dropped by Redis, which answers with the first entry's id.
//! The sink still declares no dedup window: IDMP keeps per producer at most `IDMP-MAXSIZE`
//! (default 100, at most 10,000) recent ids for `IDMP-DURATION` (default 100 s, at most a day),
//! set per stream with `XCFGSET`, so its window is bounded by a count as well as a time, which
//! a time-based `dedup_window` cannot promise. IDMP makes duplicates rarer; the inbox makes
//! them harmless.
//!
//! Failure classes: no connection (refused, reset, closed) is `Unavailable` (released, no
//! attempt counted; the connection manager reconnects with backoff). A reply that times out is
//! `Retryable` (the outcome is unknown); when a whole batch fails so, the relay's health check
//! (PING, bounded too) tells an outage. An error reply about the message (`WRONGTYPE`: the key
//! holds something else than a stream; any other `ERR`) is `Permanent`. Replies that are about
//! the server, not the message, are `Unavailable`: `OOM` (maxmemory reached with a policy that
//! cannot evict: the server takes no writes until memory is freed, which says nothing about
//! this message), `LOADING`, `READONLY` (a replica), `MASTERDOWN`, `MISCONF`, `NOAUTH`,
//! `WRONGPASS`. `NOPERM` (an ACL, perhaps per key) is `Retryable`.
//!
//! Credentials in `--redis-url` are never logged or put in an error: errors name host, port and
//! database only. redis-rs (with the features Tidings uses) logs nothing.

use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, RedisError, Value};

use tidings_outbox::redis_url::RedisUrl;

use super::{Capabilities, Delivery, Envelope, Sink, SinkError};
use crate::Error;

/// Redis's default `proto-max-bulk-len`: 512 MiB. A larger bulk string makes Redis close the
/// connection, so the sink refuses such a payload itself.
pub const REDIS_MAX_MESSAGE_SIZE: usize = 512 * 1024 * 1024;

/// The entry field holding the message id.
pub const FIELD_ID: &str = "id";
/// The entry field holding the payload.
pub const FIELD_PAYLOAD: &str = "payload";
/// Prefix of the entry fields holding the headers (`h:traceparent`, `h:Tidings-Topic`, ...).
pub const FIELD_HEADER_PREFIX: &str = "h:";
/// The IDMP producer id every relay sends (Redis 8.6+): one for all, so that a message re-sent
/// by another relay is recognised too.
pub const IDMP_PRODUCER: &str = "tidings";

/// Whether XADD carries `IDMP tidings <message id>` (Redis 8.6+ server-side dedup).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Idmp {
    /// Used when the server has it (8.6+), left out otherwise.
    #[default]
    Auto,
    /// Required: the sink refuses to start on a server without it.
    On,
    /// Never sent.
    Off,
}

/// Redis Streams sink settings.
#[derive(Clone)]
pub struct RedisSinkConfig {
    /// `redis://[user:password@]host[:port][/db]` or `rediss://...` (TLS, the certificate is
    /// verified against the system roots). Never logged with its password. Defaults to
    /// `redis://127.0.0.1:6379`.
    pub url: String,
    /// Stream key of a message: `{topic}` is replaced by the Tidings topic; without `{topic}`,
    /// every message goes to this one stream. Defaults to `tidings:{topic}`.
    pub stream_template: String,
    /// Trim every stream to about this many entries (`XADD ... MAXLEN ~ N`). Trimming drops
    /// entries no consumer group has read yet. Defaults to none (no trimming).
    pub maxlen: Option<u64>,
    /// Bounds connecting, one XADD (or one batch's pipeline) and the health check; keep it below
    /// the relay's publish timeout. Defaults to 4 seconds.
    pub timeout: Duration,
    /// Largest payload sent; a larger one is a permanent failure. Defaults to 512 MiB (Redis's
    /// default `proto-max-bulk-len`).
    pub max_message_bytes: usize,
    /// Server-side dedup by message id (`XADD ... IDMP`, Redis 8.6+). Defaults to
    /// [`Idmp::Auto`].
    pub idmp: Idmp,
}

impl Default for RedisSinkConfig {
    fn default() -> Self {
        RedisSinkConfig {
            url: "redis://127.0.0.1:6379".into(),
            stream_template: "tidings:{topic}".into(),
            maxlen: None,
            timeout: Duration::from_secs(4),
            max_message_bytes: REDIS_MAX_MESSAGE_SIZE,
            idmp: Idmp::Auto,
        }
    }
}

/// Shows the URL without its credentials.
impl std::fmt::Debug for RedisSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSinkConfig")
            .field("url", &tidings_outbox::redis_url::shown(&self.url))
            .field("stream_template", &self.stream_template)
            .field("maxlen", &self.maxlen)
            .field("timeout", &self.timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("idmp", &self.idmp)
            .finish()
    }
}

/// The Redis sink's flags and environment variables (`tidings relay --sink redis`).
#[derive(clap::Args)]
#[command(next_help_heading = "Redis Streams sink (--sink redis)")]
pub struct RedisArgs {
    /// Redis URL, redis://[user:password@]host[:port][/db] or rediss:// (TLS, certificate
    /// verified). Credentials are never logged.
    #[arg(
        long,
        env = "TIDINGS_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// Stream key of a message; `{topic}` is replaced by its Tidings topic (topic `a.b` ->
    /// stream `tidings:a.b`). Without `{topic}`, every message goes to that one stream.
    #[arg(
        long,
        env = "TIDINGS_REDIS_STREAM_TEMPLATE",
        default_value = "tidings:{topic}"
    )]
    pub redis_stream_template: String,
    /// Trim each stream to about N entries (XADD MAXLEN ~ N). DANGER: trimming drops entries
    /// no consumer group has read yet; set it well above any consumer backlog.
    #[arg(long, env = "TIDINGS_REDIS_MAXLEN")]
    pub redis_maxlen: Option<u64>,
    /// Largest payload in bytes (at most the server's proto-max-bulk-len); a larger message is
    /// dead-lettered.
    #[arg(long, env = "TIDINGS_REDIS_MAX_MESSAGE_SIZE", default_value_t = REDIS_MAX_MESSAGE_SIZE)]
    pub redis_max_message_size: usize,
    /// Server-side dedup by message id, `XADD ... IDMP tidings <id>` (Redis 8.6+): auto (when
    /// the server has it), on (refuse to start without it) or off. Consumers deduplicate
    /// either way (the inbox): IDMP remembers a bounded number of recent ids per stream.
    #[arg(long, env = "TIDINGS_REDIS_IDMP", value_enum, default_value_t = Idmp::Auto)]
    pub redis_idmp: Idmp,
}

impl RedisArgs {
    /// Checks the flags and connects (see [`RedisSink::connect`]); connects, publishes and
    /// health checks end within four fifths of `publish_timeout`, so that the sink, not the
    /// relay's own timeout, says why.
    pub async fn connect(self, publish_timeout: Duration) -> Result<RedisSink, Error> {
        RedisSink::connect(RedisSinkConfig {
            url: self.redis_url,
            stream_template: self.redis_stream_template,
            maxlen: self.redis_maxlen,
            timeout: (publish_timeout * 4 / 5).max(Duration::from_millis(100)),
            max_message_bytes: self.redis_max_message_size,
            idmp: self.redis_idmp,
        })
        .await
    }
}

fn config_err(what: impl Into<String>) -> Error {
    Error::Config(what.into())
}

/// A checked `--redis-url`: the client, and how the server is named in messages.
struct Target {
    client: redis::Client,
    /// `host:port` (and `db N` when not 0): never the credentials.
    shown: String,
}

/// Parses `--redis-url` (the checks are shared with the inbox's Redis adapter). Errors never
/// repeat the URL (it may hold a password).
fn parse_url(s: &str) -> Result<Target, Error> {
    let u = RedisUrl::parse(s, "--redis-url").map_err(|e| config_err(e.to_string()))?;
    // redis-rs's own parse error is not shown: it may not be careful with the URL.
    let client = redis::Client::open(s)
        .map_err(|e| config_err(format!("--redis-url is not a Redis URL ({})", e.category())))?;
    Ok(Target {
        client,
        shown: u.shown().to_owned(),
    })
}

/// Publishes to Redis Streams.
pub struct RedisSink {
    config: RedisSinkConfig,
    shown: String,
    conn: ConnectionManager,
    /// The server's `redis_version`, as read at start-up.
    version: String,
    /// Whether every XADD carries `IDMP` (decided at start-up from the version and the flag).
    idmp: bool,
}

impl RedisSink {
    /// Checks the settings, connects, and reads the server's version (`INFO server`).
    pub async fn connect(config: RedisSinkConfig) -> Result<RedisSink, Error> {
        let target = parse_url(&config.url)?;
        if config.stream_template.is_empty() {
            return Err(config_err("--redis-stream-template must not be empty"));
        }
        if config.maxlen == Some(0) {
            return Err(config_err(
                "--redis-maxlen must be greater than 0 (leave it out for no trimming)",
            ));
        }
        if config.max_message_bytes == 0 {
            return Err(config_err(
                "--redis-max-message-size must be greater than 0",
            ));
        }
        if config.timeout.is_zero() {
            return Err(config_err("the Redis timeout must be greater than 0"));
        }
        let shown = target.shown;
        let mc = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout * 3 / 4))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2));
        let conn = match tokio::time::timeout(
            config.timeout,
            ConnectionManager::new_with_config(target.client, mc),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Error::Sink(format!(
                    "cannot connect to Redis at {shown}: {}",
                    describe(&e)
                )))
            }
            Err(_) => {
                return Err(Error::Sink(format!(
                    "cannot connect to Redis at {shown}: no answer within {:?}",
                    config.timeout
                )))
            }
        };
        let mut sink = RedisSink {
            config,
            shown,
            conn,
            version: String::new(),
            idmp: false,
        };
        let info: String = match tokio::time::timeout(
            sink.config.timeout,
            redis::cmd("INFO")
                .arg("server")
                .query_async(&mut sink.conn.clone()),
        )
        .await
        {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                return Err(Error::Sink(format!(
                    "Redis at {} refused INFO: {}",
                    sink.shown,
                    describe(&e)
                )))
            }
            Err(_) => {
                return Err(Error::Sink(format!(
                    "Redis at {} did not answer INFO within {:?}",
                    sink.shown, sink.config.timeout
                )))
            }
        };
        sink.version = server_version(&info).unwrap_or("unknown").to_owned();
        // 8.6+ by its version, and its XADD documents IDMP (COMMAND DOCS, read-only): a proxy
        // or a look-alike server that reports 8.6 but would refuse the argument would otherwise
        // make every XADD an error reply, which dead-letters the message.
        let new_enough = version_at_least(&sink.version, (8, 6));
        let documented = if new_enough {
            let mut cmd = redis::cmd("COMMAND");
            cmd.arg("DOCS").arg("XADD");
            let mut conn = sink.conn.clone();
            match tokio::time::timeout(sink.config.timeout, cmd.query_async::<Value>(&mut conn))
                .await
            {
                Ok(Ok(v)) if mentions(&v, "idmp") => Ok(()),
                Ok(Ok(_)) => Err("COMMAND DOCS XADD does not list IDMP".to_owned()),
                Ok(Err(e)) => Err(format!("COMMAND DOCS XADD failed: {}", describe(&e))),
                Err(_) => Err(format!(
                    "COMMAND DOCS XADD got no answer within {:?}",
                    sink.config.timeout
                )),
            }
        } else {
            Err(String::new())
        };
        sink.idmp = match (sink.config.idmp, &documented) {
            (Idmp::Off, _) => false,
            (_, Ok(())) => true,
            (Idmp::On, Err(_)) if !new_enough => {
                return Err(config_err(format!(
                "--redis-idmp on needs Redis 8.6 or later (XADD ... IDMP); the server at {} is {}",
                sink.shown, sink.version
            )))
            }
            (Idmp::On, Err(why)) => {
                return Err(config_err(format!(
                    "--redis-idmp on: the server at {} is {} but {why}",
                    sink.shown, sink.version
                )))
            }
            (Idmp::Auto, Err(why)) => {
                if new_enough {
                    tracing::warn!(server = %sink.shown, version = %sink.version, reason = %why,
                        "Redis 8.6+ without a usable XADD IDMP: sending without it (consumers deduplicate)");
                }
                false
            }
        };
        tracing::info!(server = %sink.shown, version = %sink.version,
            stream_template = %sink.config.stream_template, maxlen = ?sink.config.maxlen,
            idmp = sink.idmp, "using Redis Streams");
        if sink.idmp {
            tracing::info!(
                producer = IDMP_PRODUCER,
                "XADD IDMP on: Redis drops a re-send of a message id the stream still remembers \
                 (IDMP-DURATION, IDMP-MAXSIZE: XCFGSET); consumers still deduplicate"
            );
        }
        Ok(sink)
    }

    /// The server's version, as `INFO server` said at start-up.
    pub fn server_version(&self) -> &str {
        &self.version
    }

    /// Whether every XADD carries `IDMP tidings <message id>` (decided at start-up).
    pub fn uses_idmp(&self) -> bool {
        self.idmp
    }

    /// The stream key of a Tidings topic.
    pub fn stream_key(&self, topic: &str) -> String {
        self.config.stream_template.replace("{topic}", topic)
    }

    /// The XADD of one message, or why it can never be sent.
    fn xadd(&self, msg: &Envelope) -> Result<redis::Cmd, SinkError> {
        xadd(
            &self.stream_key(&msg.topic),
            self.config.maxlen,
            self.idmp,
            self.config.max_message_bytes,
            msg,
        )
    }

    /// What a failed call means (a connection error, or an error reply).
    fn classify(&self, e: &RedisError) -> SinkError {
        let boxed = || -> Box<dyn std::error::Error + Send + Sync> { Box::new(e.clone()) };
        if e.is_timeout() {
            return SinkError::Retryable(
                format!(
                    "no reply from Redis at {} within {:?} (outcome unknown): {}",
                    self.shown,
                    self.config.timeout,
                    describe(e)
                )
                .into(),
            );
        }
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            return SinkError::Unavailable(
                format!("no connection to Redis at {}: {}", self.shown, describe(e)).into(),
            );
        }
        match e.code() {
            Some("OOM" | "LOADING" | "READONLY" | "MASTERDOWN" | "MISCONF" | "NOAUTH")
            | Some("WRONGPASS" | "BUSY" | "CLUSTERDOWN" | "TRYAGAIN") => {
                SinkError::Unavailable(boxed())
            }
            Some("NOPERM") => SinkError::Retryable(boxed()),
            // WRONGTYPE (the key is not a stream), ERR (an argument Redis refuses), ...: about
            // this message.
            Some(_) => SinkError::Permanent(boxed()),
            // Not a reply (a parse or client error): counted, so a message that causes it
            // ends dead.
            None => SinkError::Retryable(boxed()),
        }
    }

    /// Why a call did not finish within the timeout.
    fn timed_out(&self) -> SinkError {
        SinkError::Retryable(
            format!(
                "no reply from Redis at {} within {:?} (outcome unknown)",
                self.shown, self.config.timeout
            )
            .into(),
        )
    }
}

/// A redis-rs error as text: it names no URL or credentials (checked by the binary's trace
/// test), only the category, the reply and the cause.
fn describe(e: &RedisError) -> String {
    e.to_string()
}

/// `XADD <stream> [IDMP tidings <id>] [MAXLEN ~ n] * id <id> payload <bytes> h:<name> <value>...`
/// (IDMP goes before the trimming arguments), or why the message can never be sent.
fn xadd(
    stream: &str,
    maxlen: Option<u64>,
    idmp: bool,
    max_message_bytes: usize,
    msg: &Envelope,
) -> Result<redis::Cmd, SinkError> {
    if msg.payload.len() > max_message_bytes {
        return Err(SinkError::Permanent(
            format!(
                "message of {} bytes is larger than the limit of {} bytes (--redis-max-message-size)",
                msg.payload.len(),
                max_message_bytes
            )
            .into(),
        ));
    }
    let id = msg.id.to_string();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream);
    if idmp {
        cmd.arg("IDMP").arg(IDMP_PRODUCER).arg(&id);
    }
    if let Some(n) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    cmd.arg("*")
        .arg(FIELD_ID)
        .arg(id)
        .arg(FIELD_PAYLOAD)
        .arg(msg.payload.as_ref());
    for (name, value) in msg.wire_headers() {
        cmd.arg(format!("{FIELD_HEADER_PREFIX}{name}")).arg(value);
    }
    Ok(cmd)
}

/// Whether a reply holds the word (any case) as one of its strings, at any depth.
fn mentions(v: &Value, word: &str) -> bool {
    match v {
        Value::BulkString(b) => b.eq_ignore_ascii_case(word.as_bytes()),
        Value::SimpleString(s) => s.eq_ignore_ascii_case(word),
        Value::VerbatimString { text, .. } => text.eq_ignore_ascii_case(word),
        Value::Array(items) | Value::Set(items) => items.iter().any(|i| mentions(i, word)),
        Value::Map(pairs) => pairs
            .iter()
            .any(|(k, v)| mentions(k, word) || mentions(v, word)),
        _ => false,
    }
}

/// `redis_version` from an `INFO server` reply.
fn server_version(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
}

/// Whether a `major.minor.patch` version is at least `(major, minor)`.
fn version_at_least(v: &str, want: (u32, u32)) -> bool {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

/// The entry id of a successful XADD reply.
fn added(v: &Value) -> bool {
    matches!(v, Value::BulkString(_) | Value::SimpleString(_))
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let cmd = self.xadd(msg)?;
            let mut conn = self.conn.clone();
            match tokio::time::timeout(self.config.timeout, cmd.query_async::<Value>(&mut conn))
                .await
            {
                Ok(Ok(v)) if added(&v) => Ok(Delivery::default()),
                Ok(Ok(v)) => Err(SinkError::Retryable(
                    format!("unexpected XADD reply from Redis: {v:?}").into(),
                )),
                Ok(Err(e)) => Err(self.classify(&e)),
                Err(_) => Err(self.timed_out()),
            }
        })
    }

    fn publish_batch<'a>(
        &'a self,
        msgs: &'a [&'a Envelope],
    ) -> BoxFuture<'a, Vec<Result<Delivery, SinkError>>> {
        Box::pin(async move {
            let mut results: Vec<Option<Result<Delivery, SinkError>>> =
                Vec::with_capacity(msgs.len());
            let mut pipe = Pipeline::with_capacity(msgs.len());
            pipe.ignore_errors();
            let mut sent = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                match self.xadd(m) {
                    Ok(cmd) => {
                        pipe.add_command(cmd);
                        sent.push(i);
                        results.push(None);
                    }
                    Err(e) => results.push(Some(Err(e))),
                }
            }
            if !sent.is_empty() {
                let mut conn = self.conn.clone();
                let reply = tokio::time::timeout(
                    self.config.timeout,
                    pipe.query_async::<Vec<Value>>(&mut conn),
                )
                .await;
                match reply {
                    Ok(Ok(values)) if values.len() == sent.len() => {
                        for (i, v) in sent.iter().zip(values) {
                            results[*i] = Some(match v {
                                v if added(&v) => Ok(Delivery::default()),
                                Value::ServerError(e) => Err(self.classify(&e.into())),
                                v => Err(SinkError::Retryable(
                                    format!("unexpected XADD reply from Redis: {v:?}").into(),
                                )),
                            });
                        }
                    }
                    Ok(Ok(values)) => {
                        for i in &sent {
                            results[*i] = Some(Err(SinkError::Retryable(
                                format!(
                                    "Redis answered a pipeline of {} XADDs with {} replies (outcome unknown)",
                                    sent.len(),
                                    values.len()
                                )
                                .into(),
                            )));
                        }
                    }
                    Ok(Err(e)) => {
                        for i in &sent {
                            results[*i] = Some(Err(self.classify(&e)));
                        }
                    }
                    Err(_) => {
                        for i in &sent {
                            results[*i] = Some(Err(self.timed_out()));
                        }
                    }
                }
            }
            results
                .into_iter()
                .map(|r| {
                    // Every slot is filled above: refused before sending, or one reply each.
                    r.unwrap_or_else(|| {
                        Err(SinkError::Retryable("no reply for this message".into()))
                    })
                })
                .collect()
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Before 8.6 XADD stores a re-send as a new entry; IDMP (8.6+) remembers a bounded
            // number of recent ids per stream, not a time window: none is promised.
            dedup_window: None,
            max_message_bytes: Some(self.config.max_message_bytes),
            // A failed XADD does not fail the ones after it in the pipeline: one message per key
            // at a time.
            ordered_in_flight: false,
        }
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            match tokio::time::timeout(
                self.config.timeout,
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(SinkError::Unavailable(
                    format!(
                        "Redis at {} does not answer PING: {}",
                        self.shown,
                        describe(&e)
                    )
                    .into(),
                )),
                Err(_) => Err(SinkError::Unavailable(
                    format!(
                        "Redis at {} did not answer PING within {:?}",
                        self.shown, self.config.timeout
                    )
                    .into(),
                )),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        // Every XADD the relay counted was answered already: nothing is buffered, and the
        // connection closes when the sink is dropped.
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_never_reach_a_message() {
        // The checks themselves are tested in tidings_outbox::redis_url; here: the sink's use.
        let t = parse_url("redis://relay:s3cr%40t@cache.internal:6380/2").unwrap();
        assert_eq!(t.shown, "cache.internal:6380 db 2");
        for bad in [
            "http://u:hunter2@h/",
            "redis://u:hunter2@h:notaport/",
            "redis://u:hunter2@h/notadb",
            "rediss://u:hunter2@h/#insecure",
            "redis://u:hunter2@/",
            "hunter2",
        ] {
            let e = parse_url(bad).err().unwrap().to_string();
            assert!(
                e.contains("--redis-url") && !e.contains("hunter2"),
                "{bad}: {e}"
            );
        }
        let c = RedisSinkConfig {
            url: "redis://u:hunter2@h:6379".into(),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
    }

    #[test]
    fn idmp_goes_before_trimming_and_carries_the_message_id() {
        let msg = Envelope {
            seq: 1,
            message: tidings_outbox::WireMessage {
                id: tidings_outbox::MessageId::from_uuid(uuid::Uuid::now_v7()),
                topic: "t".into(),
                key: None,
                biz_id: None,
                headers: Default::default(),
                payload: bytes::Bytes::from_static(b"{}"),
                created_at: None,
                attempts: 0,
            },
        };
        let id = msg.id.to_string();
        let args = |idmp: bool, maxlen: Option<u64>| -> Vec<String> {
            xadd("s", maxlen, idmp, 1024, &msg)
                .unwrap()
                .args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                    _ => "<not a plain argument>".into(),
                })
                .take(9)
                .collect()
        };
        assert_eq!(
            args(true, Some(5)),
            [
                "XADD",
                "s",
                "IDMP",
                IDMP_PRODUCER,
                &id,
                "MAXLEN",
                "~",
                "5",
                "*"
            ]
        );
        assert_eq!(
            args(true, None)[..6],
            ["XADD", "s", "IDMP", IDMP_PRODUCER, &id, "*"]
        );
        assert_eq!(args(false, None)[..5], ["XADD", "s", "*", FIELD_ID, &id]);
        assert!(matches!(
            xadd("s", None, true, 1, &msg),
            Err(SinkError::Permanent(_))
        ));
    }

    #[test]
    fn idmp_is_found_in_command_docs_at_any_depth() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let docs = Value::Array(vec![
            bulk("xadd"),
            Value::Map(vec![(
                bulk("arguments"),
                Value::Array(vec![Value::Map(vec![
                    (bulk("name"), bulk("idmp")),
                    (bulk("token"), bulk("IDMP")),
                ])]),
            )]),
        ]);
        assert!(mentions(&docs, "idmp"));
        let old = Value::Array(vec![bulk("xadd"), Value::Array(vec![bulk("nomkstream")])]);
        assert!(!mentions(&old, "idmp"));
        assert!(!mentions(&Value::Nil, "idmp"));
    }

    #[test]
    fn versions_are_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(server_version(info), Some("7.0.15"));
        assert!(!version_at_least("7.0.15", (8, 6)));
        assert!(version_at_least("8.6.0", (8, 6)));
        assert!(version_at_least("9.0.1", (8, 6)));
        assert!(!version_at_least("unknown", (8, 6)));
    }
}
