//! The Redis Streams adapter of the consumer runner: one consumer of a consumer group on one
//! stream (the relay's `--sink redis` writes it: fields `id`, `payload`, `h:<header>`).
//!
//! - **Group.** `XGROUP CREATE <stream> <group> 0 MKSTREAM` when the group is missing
//!   (`create_group`), so a new group reads the stream from its start.
//! - **Reading.** `XREADGROUP GROUP <group> <consumer> COUNT <batch> BLOCK <block> STREAMS
//!   <stream> >` on a connection of its own (a blocked read would hold up acks on a shared
//!   one). On open, the consumer first reads its own pending entries (`... STREAMS <stream> 0`):
//!   what it was given before a crash or a shutdown comes again at once, in stream order.
//! - **Ack after commit.** `XACK` only when the runner acks, after the inbox transaction
//!   committed; an unacked entry stays in the group's pending list.
//! - **Dead consumers.** Every half `claim_idle`, `XAUTOCLAIM` takes over entries pending for
//!   longer than `claim_idle` (with any consumer of the group, this one included: an entry
//!   whose ack was lost), so a consumer that died does not strand its entries. Give each
//!   instance its own, stable `consumer` name (a pod or host name): a restarted instance then
//!   reads its own pending entries at once instead of after `claim_idle`.
//! - **Hold.** An entry being handled (or retried in place) is held with `XCLAIM ... 0 <id>
//!   JUSTID` every third of `claim_idle`: that resets its idle time without counting a
//!   delivery, so no other consumer claims it while it is worked on.
//! - **Delivery count.** 1 for a new entry; for a pending entry read again or claimed, Redis's
//!   own delivery counter (`XPENDING`), which parking uses.
//! - **Decoding.** Through [`WireMessage::decode`]; an entry without a usable message id, or
//!   without a `payload` field, is [`Decoded::Unusable`] (parked under a stable id made from
//!   the stream and entry id). An entry deleted while pending (trimmed by `MAXLEN`) is acked
//!   and skipped, with a warning.
//!
//! Redis 7 has no dedup on XADD: a relay's re-send is a second entry, which the inbox absorbs.
//! The URL's password is never logged nor put in an error.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::{AsyncConnectionConfig, Value};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tidings_outbox::redis_url::{shown, RedisUrl};
use tidings_outbox::{MessageId, WireMessage};

use crate::runner::{Adapter, AdapterError, Decoded, Delivered, Deliveries, Delivery};

/// The entry field holding the message id (as the relay's Redis sink writes it).
const FIELD_ID: &str = "id";
/// The entry field holding the payload.
const FIELD_PAYLOAD: &str = "payload";
/// Prefix of the entry fields holding the headers.
const FIELD_HEADER_PREFIX: &str = "h:";

/// Redis Streams consumer settings.
#[derive(Clone)]
pub struct RedisConsumerConfig {
    /// `redis://[user:password@]host[:port][/db]` or `rediss://...`. Never logged with its
    /// password. Defaults to `redis://127.0.0.1:6379`.
    pub url: String,
    /// The stream key (the relay's `--redis-stream-template` with the topic, e.g.
    /// `tidings:payment.succeeded`). Defaults to empty (must be set).
    pub stream: String,
    /// The consumer group (one per consuming service). Defaults to `tidings`.
    pub group: String,
    /// This instance's name in the group: unique per instance, stable across its restarts.
    /// Defaults to `tidings-consumer`.
    pub consumer: String,
    /// Create the group (reading from the stream's start, creating the stream) if missing.
    /// Defaults to true.
    pub create_group: bool,
    /// Entries read at once (`COUNT`). Defaults to 64.
    pub batch: usize,
    /// How long one read waits for new entries (`BLOCK`). Defaults to 1 second.
    pub block: Duration,
    /// Entries pending for longer are taken over (`XAUTOCLAIM`); entries being worked on are
    /// held every third of it. Defaults to 60 seconds.
    pub claim_idle: Duration,
    /// Bounds connecting and every command (a blocking read: its `block` plus this). Defaults to
    /// 5 seconds.
    pub timeout: Duration,
}

impl Default for RedisConsumerConfig {
    fn default() -> Self {
        RedisConsumerConfig {
            url: "redis://127.0.0.1:6379".into(),
            stream: String::new(),
            group: "tidings".into(),
            consumer: "tidings-consumer".into(),
            create_group: true,
            batch: 64,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Shows the URL without its credentials.
impl std::fmt::Debug for RedisConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConsumerConfig")
            .field("url", &shown(&self.url))
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("create_group", &self.create_group)
            .field("batch", &self.batch)
            .field("block", &self.block)
            .field("claim_idle", &self.claim_idle)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why the adapter could not start or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisConsumerError {
    /// A setting is wrong.
    #[error("redis consumer config: {0}")]
    Config(String),
    /// Redis refused or failed a command.
    #[error("redis at {server}: {what}")]
    Redis {
        /// `host:port`.
        server: String,
        /// What failed.
        what: String,
        /// The cause.
        #[source]
        source: ::redis::RedisError,
    },
    /// Redis did not answer in time.
    #[error("redis at {server}: {what}: no answer within {timeout:?}")]
    Timeout {
        /// `host:port`.
        server: String,
        /// What timed out.
        what: String,
        /// The bound.
        timeout: Duration,
    },
}

struct Shared {
    config: RedisConsumerConfig,
    server: String,
    client: ::redis::Client,
    /// Acks, holds, claims and setup (never a blocking read).
    conn: ConnectionManager,
    /// Entry ids handed to the runner and not yet acked or dropped: a pending entry read again
    /// (after a reopen) or claimed while it is worked on is not handed out twice.
    inflight: Mutex<HashSet<String>>,
}

impl Shared {
    async fn call<T: ::redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &::redis::Cmd,
    ) -> Result<T, RedisConsumerError> {
        let mut conn = self.conn.clone();
        self.bounded(what, self.config.timeout, cmd.query_async(&mut conn))
            .await
    }

    async fn bounded<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl std::future::Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, RedisConsumerError> {
        match tokio::time::timeout(timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(RedisConsumerError::Redis {
                server: self.server.clone(),
                what: what.to_owned(),
                source,
            }),
            Err(_) => Err(RedisConsumerError::Timeout {
                server: self.server.clone(),
                what: what.to_owned(),
                timeout,
            }),
        }
    }

    /// Creates the group if missing (an existing one is used as it is); without
    /// `create_group`, checks that it exists (so a wrong name fails at once, not on every read).
    async fn ensure_group(&self) -> Result<(), RedisConsumerError> {
        if !self.config.create_group {
            let mut cmd = ::redis::cmd("XINFO");
            cmd.arg("GROUPS").arg(&self.config.stream);
            let groups: Vec<HashMap<String, Value>> = match self.call("XINFO GROUPS", &cmd).await {
                Ok(g) => g,
                // No such stream: no group either.
                Err(RedisConsumerError::Redis { source, .. })
                    if source.code() == Some("ERR") && !source.is_io_error() =>
                {
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            let exists = groups.iter().any(|g| {
                g.get("name").and_then(text).as_deref() == Some(self.config.group.as_str())
            });
            if !exists {
                return Err(RedisConsumerError::Config(format!(
                    "consumer group {:?} does not exist on stream {:?}: create it, or set create_group",
                    self.config.group, self.config.stream
                )));
            }
            return Ok(());
        }
        let mut cmd = ::redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg("0")
            .arg("MKSTREAM");
        match self.call::<()>("XGROUP CREATE", &cmd).await {
            Err(RedisConsumerError::Redis { source, .. }) if source.code() == Some("BUSYGROUP") => {
                Ok(())
            }
            r => r,
        }
    }

    /// Redis's delivery counters of this consumer's pending entries `ids`.
    async fn delivery_counts(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, i64>, RedisConsumerError> {
        let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
            return Ok(HashMap::new());
        };
        let mut cmd = ::redis::cmd("XPENDING");
        cmd.arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(first)
            .arg(last)
            .arg(ids.len())
            .arg(&self.config.consumer);
        let rows: Vec<(String, String, i64, i64)> = self.call("XPENDING", &cmd).await?;
        Ok(rows
            .into_iter()
            .map(|(id, _, _, count)| (id, count))
            .collect())
    }

    async fn ack(&self, id: &str) -> Result<(), RedisConsumerError> {
        let mut cmd = ::redis::cmd("XACK");
        cmd.arg(&self.config.stream).arg(&self.config.group).arg(id);
        self.call::<i64>("XACK", &cmd).await.map(|_| ())
    }
}

/// A consumer of one stream in a consumer group, for the runner.
pub struct RedisAdapter {
    shared: Arc<Shared>,
}

impl RedisAdapter {
    /// Checks the settings, connects, and creates the group if missing (`create_group`).
    pub async fn connect(config: &RedisConsumerConfig) -> Result<RedisAdapter, RedisConsumerError> {
        let bad = |m: &str| Err(RedisConsumerError::Config(m.to_owned()));
        if config.stream.is_empty() {
            return bad("stream must not be empty");
        }
        if config.group.is_empty() || config.consumer.is_empty() {
            return bad("group and consumer must not be empty");
        }
        if config.batch == 0 {
            return bad("batch must be greater than 0");
        }
        if config.timeout.is_zero() || config.block.is_zero() || config.claim_idle.is_zero() {
            return bad("timeout, block and claim_idle must be greater than 0");
        }
        let server = RedisUrl::parse(&config.url, "url")
            .map_err(|e| RedisConsumerError::Config(e.to_string()))?
            .shown()
            .to_owned();
        let client = ::redis::Client::open(config.url.as_str()).map_err(|e| {
            RedisConsumerError::Config(format!("url is not a Redis URL ({})", e.category()))
        })?;
        let mc = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2));
        let conn = match tokio::time::timeout(
            config.timeout,
            ConnectionManager::new_with_config(client.clone(), mc),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                return Err(RedisConsumerError::Redis {
                    server,
                    what: "connect".into(),
                    source,
                })
            }
            Err(_) => {
                return Err(RedisConsumerError::Timeout {
                    server,
                    what: "connect".into(),
                    timeout: config.timeout,
                })
            }
        };
        let shared = Arc::new(Shared {
            config: config.clone(),
            server,
            client,
            conn,
            inflight: Mutex::new(HashSet::new()),
        });
        shared.ensure_group().await?;
        Ok(RedisAdapter { shared })
    }
}

/// One stream entry, parsed.
struct Entry {
    id: String,
    /// `None`: deleted while pending.
    fields: Option<Vec<(String, Vec<u8>)>>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn bytes_of(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

/// `[[id, [field, value, ...] | nil], ...]`.
fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| {
            let Value::Array(pair) = e else { return None };
            let id = text(pair.first()?)?;
            let fields = match pair.get(1) {
                Some(Value::Array(kv)) => Some(
                    kv.chunks(2)
                        .filter_map(|c| Some((text(&c[0])?, bytes_of(c.get(1)?))))
                        .collect(),
                ),
                Some(Value::Map(kv)) => Some(
                    kv.iter()
                        .filter_map(|(k, v)| Some((text(k)?, bytes_of(v))))
                        .collect(),
                ),
                _ => None,
            };
            Some(Entry { id, fields })
        })
        .collect()
}

/// The entries of an XREADGROUP reply (one stream): `[[key, entries]]`, a map in RESP3, or nil.
fn read_reply(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => entries(&kv[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, e)| entries(e)).collect(),
        _ => Vec::new(),
    }
}

enum Phase {
    /// Reading this consumer's own pending entries after this id.
    History(String),
    /// Reading new entries (and claiming idle ones).
    Live,
}

struct Reader {
    shared: Arc<Shared>,
    read: MultiplexedConnection,
    phase: Phase,
    next_claim: Instant,
    claim_cursor: String,
    buf: VecDeque<RedisDelivery>,
    failed: bool,
}

impl Reader {
    /// Turns entries into deliveries (skipping those in flight, acking deleted ones).
    async fn take(&mut self, got: Vec<Entry>, new: bool) -> Result<(), RedisConsumerError> {
        let s = self.shared.clone();
        let mut fresh = Vec::new();
        for e in got {
            if s.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&e.id)
            {
                continue;
            }
            match e.fields {
                Some(f) => fresh.push((e.id, f)),
                None => {
                    tracing::warn!(stream = %s.config.stream, entry = %e.id,
                        "a pending stream entry was deleted (trimmed?) before it was handled; acking it");
                    s.ack(&e.id).await?;
                }
            }
        }
        let counts = if new {
            HashMap::new()
        } else {
            let ids: Vec<String> = fresh.iter().map(|(id, _)| id.clone()).collect();
            s.delivery_counts(&ids).await?
        };
        for (id, fields) in fresh {
            let delivery = counts.get(&id).copied().unwrap_or(1).max(1);
            s.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.clone());
            self.buf.push_back(RedisDelivery {
                shared: s.clone(),
                id,
                fields,
                delivery,
            });
        }
        Ok(())
    }

    async fn fill(&mut self) -> Result<(), RedisConsumerError> {
        let s = self.shared.clone();
        let c = &s.config;
        if let Phase::History(after) = &self.phase {
            let mut cmd = ::redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&c.group)
                .arg(&c.consumer)
                .arg("COUNT")
                .arg(c.batch)
                .arg("STREAMS")
                .arg(&c.stream)
                .arg(after);
            let v: Value = s
                .bounded(
                    "XREADGROUP (pending)",
                    c.timeout,
                    cmd.query_async(&mut self.read),
                )
                .await?;
            let got = read_reply(&v);
            match got.last() {
                None => self.phase = Phase::Live,
                Some(last) => {
                    self.phase = Phase::History(last.id.clone());
                    return self.take(got, false).await;
                }
            }
        }
        if Instant::now() >= self.next_claim {
            self.next_claim = Instant::now() + (c.claim_idle / 2).max(Duration::from_millis(100));
            let mut cmd = ::redis::cmd("XAUTOCLAIM");
            cmd.arg(&c.stream)
                .arg(&c.group)
                .arg(&c.consumer)
                .arg(c.claim_idle.as_millis() as u64)
                .arg(&self.claim_cursor)
                .arg("COUNT")
                .arg(c.batch);
            let v: Value = s.call("XAUTOCLAIM", &cmd).await?;
            if let Value::Array(parts) = &v {
                self.claim_cursor = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
                let got = parts.get(1).map(entries).unwrap_or_default();
                if !got.is_empty() {
                    tracing::info!(stream = %c.stream, group = %c.group, claimed = got.len(),
                        "took over stream entries pending for longer than claim_idle");
                    return self.take(got, false).await;
                }
            }
        }
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&c.group)
            .arg(&c.consumer)
            .arg("COUNT")
            .arg(c.batch)
            .arg("BLOCK")
            .arg(c.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&c.stream)
            .arg(">");
        let v: Value = s
            .bounded(
                "XREADGROUP",
                c.block + c.timeout,
                cmd.query_async(&mut self.read),
            )
            .await?;
        self.take(read_reply(&v), true).await
    }
}

impl Adapter for RedisAdapter {
    type Delivery = RedisDelivery;

    fn open(&self) -> BoxFuture<'_, Result<Deliveries<'_, RedisDelivery>, AdapterError>> {
        Box::pin(async move {
            let s = &self.shared;
            let cc = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(s.config.timeout))
                .set_response_timeout(Some(s.config.block + s.config.timeout));
            let read = s
                .bounded(
                    "connect",
                    s.config.timeout,
                    s.client.get_multiplexed_async_connection_with_config(&cc),
                )
                .await?;
            // The stream or group may have been deleted since the last open.
            s.ensure_group().await?;
            tracing::debug!(server = %s.server, stream = %s.config.stream,
                group = %s.config.group, consumer = %s.config.consumer, "consuming");
            let reader = Reader {
                shared: s.clone(),
                read,
                phase: Phase::History("0".into()),
                next_claim: Instant::now(),
                claim_cursor: "0-0".into(),
                buf: VecDeque::new(),
                failed: false,
            };
            let stream = futures::stream::unfold(reader, |mut r| async move {
                if r.failed {
                    return None;
                }
                loop {
                    if let Some(d) = r.buf.pop_front() {
                        return Some((Ok(d), r));
                    }
                    if let Err(e) = r.fill().await {
                        r.failed = true;
                        return Some((Err(Box::new(e) as AdapterError), r));
                    }
                }
            });
            Ok(stream.boxed())
        })
    }

    fn hold_interval(&self) -> Option<Duration> {
        Some(self.shared.config.claim_idle / 3)
    }
}

/// One stream entry handed to the runner.
pub struct RedisDelivery {
    shared: Arc<Shared>,
    id: String,
    fields: Vec<(String, Vec<u8>)>,
    delivery: i64,
}

impl RedisDelivery {
    /// The entry id Redis gave it.
    pub fn entry_id(&self) -> &str {
        &self.id
    }
}

impl Drop for RedisDelivery {
    fn drop(&mut self) {
        // Acked, or left pending for a later read of this consumer's pending entries.
        self.shared
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// A stable id for an unusable entry: the same on every delivery of it.
fn stable_id(stream: &str, entry: &str) -> uuid::Uuid {
    let mut h = Sha256::new();
    h.update((stream.len() as u64).to_be_bytes());
    h.update(stream.as_bytes());
    h.update(entry.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

impl Delivery for RedisDelivery {
    fn decode(&self) -> Decoded {
        let stream = &self.shared.config.stream;
        let mut headers = BTreeMap::new();
        let (mut id_field, mut payload) = (None, None);
        for (k, v) in &self.fields {
            if let Some(name) = k.strip_prefix(FIELD_HEADER_PREFIX) {
                headers.insert(name.to_owned(), String::from_utf8_lossy(v).into_owned());
            } else if k == FIELD_ID {
                id_field = Some(String::from_utf8_lossy(v).into_owned());
            } else if k == FIELD_PAYLOAD {
                payload = Some(Bytes::from(v.clone()));
            }
        }
        let fallback = id_field
            .as_deref()
            .and_then(|s| s.parse::<MessageId>().ok());
        let delivered = |message| Delivered {
            message,
            source: stream.clone(),
            delivery: self.delivery,
            replayed: false,
        };
        let decoded = match &payload {
            None => Err(format!("entry {} has no {FIELD_PAYLOAD} field", self.id)),
            Some(p) => WireMessage::decode(
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                p.clone(),
                fallback,
                stream,
            )
            .map_err(|e| e.to_string()),
        };
        match decoded {
            Ok(m) => Decoded::Message(delivered(m)),
            Err(e) => Decoded::Unusable {
                parked_as: delivered(WireMessage {
                    id: fallback
                        .unwrap_or_else(|| MessageId::from_uuid(stable_id(stream, &self.id))),
                    topic: stream.clone(),
                    key: None,
                    biz_id: None,
                    headers: self
                        .fields
                        .iter()
                        .filter(|(k, _)| k != FIELD_PAYLOAD)
                        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                    payload: payload.unwrap_or_default(),
                    created_at: None,
                    attempts: 0,
                }),
                reason: format!("not a Tidings message: {e}"),
            },
        }
    }

    fn ack(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move {
            self.shared.ack(&self.id).await?;
            Ok(())
        })
    }

    fn hold(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let c = &self.shared.config;
            let mut cmd = ::redis::cmd("XCLAIM");
            cmd.arg(&c.stream)
                .arg(&c.group)
                .arg(&c.consumer)
                .arg(0)
                .arg(&self.id)
                .arg("JUSTID");
            if let Err(e) = self.shared.call::<Value>("XCLAIM (hold)", &cmd).await {
                tracing::debug!(error = %e, entry = %self.id, "could not hold a stream entry");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_parsed_and_urls_shown_without_credentials() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            b("s"),
            Value::Array(vec![
                Value::Array(vec![b("1-0"), Value::Array(vec![b("id"), b("x")])]),
                Value::Array(vec![b("2-0"), Value::Nil]),
            ]),
        ])]);
        let got = read_reply(&reply);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id, "1-0");
        assert_eq!(got[0].fields.as_ref().unwrap()[0].1, b"x");
        assert!(got[1].fields.is_none());
        assert!(read_reply(&Value::Nil).is_empty());
        let c = RedisConsumerConfig {
            url: "redis://u:hunter2@h".into(),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(stable_id("s", "1-0"), stable_id("s", "1-0"));
        assert_ne!(stable_id("s", "1-0"), stable_id("s", "1-1"));
    }
}
