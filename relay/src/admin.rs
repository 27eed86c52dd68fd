//! Read and repair: the queries behind `tidings status`, `tidings dlq` and `tidings inbox dlq`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::Error;

const STATUS: &str = include_str!("sql/status.sql");
/// relays: every registered instance; alive = its last heartbeat is within three of its
/// heartbeat intervals (a relay that died without deregistering shows as dead until another
/// relay removes its row, after 20 missed intervals and at least an hour).
const RELAYS: &str = "SELECT name, host, pid, sink, started_at, \
     extract(epoch FROM now() - heartbeat_at)::float8, delivered, failed, dead_lettered, duplicates, \
     heartbeat_at > now() - 3 * heartbeat_interval_secs * interval '1 second' \
     FROM tidings.relays ORDER BY name";
const DLQ_LIST: &str = "SELECT id, topic, ordering_key, biz_id, attempts, last_error, reason, \
     created_at, dead_at FROM tidings.dead_letters ORDER BY dead_at DESC LIMIT $1";
const DLQ_REPLAY: &str = include_str!("sql/dlq_replay.sql");
/// dlq_purge: $1 uuid[] ids, $2 bool all.
const DLQ_PURGE: &str = "DELETE FROM tidings.dead_letters WHERE $2 OR id = ANY($1::uuid[])";

/// inbox_dlq_list: $1 text consumer (NULL: every consumer), $2 int8 limit. Newest first,
/// without payload and headers. A full sort of the parked rows (no index on dead_at): parked
/// messages are few, and an operator's list is rare.
const INBOX_DLQ_LIST: &str = "SELECT consumer, message_id, topic, ordering_key, biz_id, \
     deliveries, last_error, created_at, dead_at, replay_requested_at \
     FROM tidings.inbox_dead_letters WHERE ($1::text IS NULL OR consumer = $1) \
     ORDER BY dead_at DESC, consumer, message_id LIMIT $2";
/// inbox_dlq_replay: $1 text consumer, $2 uuid[] ids, $3 bool all. Only asks: the consumer's
/// runner polls its requested rows (partial index inbox_dead_letters_replay_idx), runs them
/// and deletes each row in the handler's transaction. A row locked by a replay in progress is
/// waited for: if the runner deleted it, it is skipped (not counted); if the runner parked it
/// again, it is asked for once more.
const INBOX_DLQ_REPLAY: &str = "UPDATE tidings.inbox_dead_letters SET replay_requested_at = now() \
     WHERE consumer = $1 AND ($3 OR message_id = ANY($2::uuid[]))";
/// inbox_dlq_purge: $1 text consumer, $2 uuid[] ids, $3 bool all.
const INBOX_DLQ_PURGE: &str = "DELETE FROM tidings.inbox_dead_letters \
     WHERE consumer = $1 AND ($3 OR message_id = ANY($2::uuid[]))";

/// Every admin statement, for the test that prepares them all.
pub const ADMIN_STATEMENTS: &[&str] = &[
    STATUS,
    RELAYS,
    DLQ_LIST,
    DLQ_REPLAY,
    DLQ_PURGE,
    INBOX_DLQ_LIST,
    INBOX_DLQ_REPLAY,
    INBOX_DLQ_PURGE,
];

/// Health of the outbox and its relays.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Messages not yet delivered.
    pub backlog: i64,
    /// Of those, due now.
    pub ready: i64,
    /// Of those, with at least one failed attempt.
    pub retrying: i64,
    /// Seconds since the oldest due message first became due (retries do not reset it); alert
    /// when it grows.
    pub oldest_ready_age_secs: Option<f64>,
    /// Messages in the dead-letter store.
    pub dead_letters: i64,
    /// Relay instances and their heartbeats.
    pub relays: Vec<RelayInfo>,
}

/// One relay instance's row.
#[derive(Debug, Clone, Serialize)]
pub struct RelayInfo {
    /// Instance name.
    pub name: String,
    /// Host it runs on.
    pub host: String,
    /// Process id.
    pub pid: i32,
    /// Sink name.
    pub sink: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Seconds since its last heartbeat; a large value means it is dead or stuck.
    pub heartbeat_age_secs: f64,
    /// Messages it delivered.
    pub delivered: i64,
    /// Failed attempts it recorded.
    pub failed: i64,
    /// Messages it dead-lettered.
    pub dead_lettered: i64,
    /// Re-sends the broker recognised by message id and dropped.
    pub duplicates: i64,
    /// Whether it heartbeated within its last three heartbeat intervals.
    pub alive: bool,
}

/// A dead-lettered message (without its payload).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Message id.
    pub id: Uuid,
    /// Topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Business id.
    pub biz_id: Option<String>,
    /// Attempts made.
    pub attempts: i32,
    /// The last error.
    pub last_error: String,
    /// `max_attempts` or `permanent`.
    pub reason: String,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

/// A message a consumer's runner parked (`tidings.inbox_dead_letters`), without its payload
/// and headers.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedMessage {
    /// The consumer that parked it.
    pub consumer: String,
    /// Message id.
    pub message_id: Uuid,
    /// Topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Business id.
    pub biz_id: Option<String>,
    /// Deliveries the consumer counted before it parked the message.
    pub deliveries: i32,
    /// The handler's last error.
    pub last_error: String,
    /// When it was enqueued (unknown for messages parked before migration 000003).
    pub created_at: Option<DateTime<Utc>>,
    /// When it was (last) parked.
    pub dead_at: DateTime<Utc>,
    /// When an operator asked for a replay that the consumer's runner has not run yet; `None`
    /// when no replay is pending.
    pub replay_requested_at: Option<DateTime<Utc>>,
}

// Every admin statement is sent unnamed with typed parameters (`query_typed`): one round trip,
// and safe through PgBouncer in transaction mode, where a named statement prepared in one
// round trip may be gone (or belong to another client) in the next.

/// Reads the liveness signals.
pub async fn status(client: &impl GenericClient) -> Result<Status, Error> {
    let row = client.query_typed_one(STATUS, &[]).await?;
    let relays = client
        .query_typed(RELAYS, &[])
        .await?
        .iter()
        .map(|r| RelayInfo {
            name: r.get(0),
            host: r.get(1),
            pid: r.get(2),
            sink: r.get(3),
            started_at: r.get(4),
            heartbeat_age_secs: r.get(5),
            delivered: r.get(6),
            failed: r.get(7),
            dead_lettered: r.get(8),
            duplicates: r.get(9),
            alive: r.get(10),
        })
        .collect();
    Ok(Status {
        backlog: row.get("backlog"),
        ready: row.get("ready"),
        retrying: row.get("retrying"),
        oldest_ready_age_secs: row.get("oldest_ready_age"),
        dead_letters: row.get("dead_letters"),
        relays,
    })
}

/// The newest `limit` dead letters.
pub async fn dlq_list(client: &impl GenericClient, limit: i64) -> Result<Vec<DeadLetter>, Error> {
    Ok(client
        .query_typed(DLQ_LIST, &[(&limit, Type::INT8)])
        .await?
        .iter()
        .map(|r| DeadLetter {
            id: r.get(0),
            topic: r.get(1),
            key: r.get(2),
            biz_id: r.get(3),
            attempts: r.get(4),
            last_error: r.get(5),
            reason: r.get(6),
            created_at: r.get(7),
            dead_at: r.get(8),
        })
        .collect())
}

/// Moves dead letters back into the outbox (same id, attempts reset); `None` means all.
/// Returns how many were moved.
pub async fn dlq_replay(client: &impl GenericClient, ids: Option<&[Uuid]>) -> Result<u64, Error> {
    let (ids, all) = (ids.unwrap_or(&[]), ids.is_none());
    execute_typed(
        client,
        DLQ_REPLAY,
        &[(&ids, Type::UUID_ARRAY), (&all, Type::BOOL)],
    )
    .await
}

/// Deletes dead letters for good; `None` means all. Returns how many were deleted.
pub async fn dlq_purge(client: &impl GenericClient, ids: Option<&[Uuid]>) -> Result<u64, Error> {
    let (ids, all) = (ids.unwrap_or(&[]), ids.is_none());
    execute_typed(
        client,
        DLQ_PURGE,
        &[(&ids, Type::UUID_ARRAY), (&all, Type::BOOL)],
    )
    .await
}

/// The newest `limit` parked messages, of one consumer or (`None`) of every consumer.
pub async fn inbox_dlq_list(
    client: &impl GenericClient,
    consumer: Option<&str>,
    limit: i64,
) -> Result<Vec<ParkedMessage>, Error> {
    Ok(client
        .query_typed(
            INBOX_DLQ_LIST,
            &[(&consumer, Type::TEXT), (&limit, Type::INT8)],
        )
        .await?
        .iter()
        .map(|r| ParkedMessage {
            consumer: r.get(0),
            message_id: r.get(1),
            topic: r.get(2),
            key: r.get(3),
            biz_id: r.get(4),
            deliveries: r.get(5),
            last_error: r.get(6),
            created_at: r.get(7),
            dead_at: r.get(8),
            replay_requested_at: r.get(9),
        })
        .collect())
}

/// Asks `consumer`'s runner to run its parked messages `ids` again (`None`: all of them) by
/// setting `replay_requested_at`; publishes nothing. The runner, which must be running, runs
/// each with the inbox record in one transaction and deletes it, or parks it again with the
/// new error. Returns how many rows were asked for.
pub async fn inbox_dlq_replay(
    client: &impl GenericClient,
    consumer: &str,
    ids: Option<&[Uuid]>,
) -> Result<u64, Error> {
    let (ids, all) = (ids.unwrap_or(&[]), ids.is_none());
    execute_typed(
        client,
        INBOX_DLQ_REPLAY,
        &[
            (&consumer, Type::TEXT),
            (&ids, Type::UUID_ARRAY),
            (&all, Type::BOOL),
        ],
    )
    .await
}

/// Deletes `consumer`'s parked messages `ids` (`None`: all of them) for good. Returns how many
/// were deleted.
pub async fn inbox_dlq_purge(
    client: &impl GenericClient,
    consumer: &str,
    ids: Option<&[Uuid]>,
) -> Result<u64, Error> {
    let (ids, all) = (ids.unwrap_or(&[]), ids.is_none());
    execute_typed(
        client,
        INBOX_DLQ_PURGE,
        &[
            (&consumer, Type::TEXT),
            (&ids, Type::UUID_ARRAY),
            (&all, Type::BOOL),
        ],
    )
    .await
}

/// Runs an unnamed statement that returns no rows; returns how many rows it changed.
async fn execute_typed(
    client: &impl GenericClient,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<u64, Error> {
    use futures::TryStreamExt;
    let stream = client
        .query_typed_raw(sql, params.iter().map(|(v, t)| (*v, t.clone())))
        .await?;
    futures::pin_mut!(stream);
    while stream.try_next().await?.is_some() {}
    Ok(stream.rows_affected().unwrap_or(0))
}

/// Text from the database made safe for an operator's terminal: control characters (which can
/// clear the screen or forge lines) and bidirectional overrides (which can disguise text) are
/// shown escaped, e.g. `\n`, `\u{1b}`.
pub fn shown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}');
        if c.is_control() || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The operator's view of `tidings status`, message fields escaped.
impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "backlog:          {}", self.backlog)?;
        writeln!(f, "ready now:        {}", self.ready)?;
        writeln!(f, "retrying:         {}", self.retrying)?;
        match self.oldest_ready_age_secs {
            Some(a) => writeln!(f, "oldest due age:   {a:.1}s (since first due)")?,
            None => writeln!(f, "oldest due age:   -")?,
        }
        writeln!(f, "dead letters:     {}", self.dead_letters)?;
        let alive = self.relays.iter().filter(|r| r.alive).count();
        writeln!(
            f,
            "relays:           {alive} alive, {} dead",
            self.relays.len() - alive
        )?;
        for r in &self.relays {
            writeln!(
                f,
                "  {} {} ({} pid {}, sink {}): heartbeat {:.1}s ago, delivered {}, failed {}, dead-lettered {}, broker duplicates {}",
                if r.alive { "alive" } else { "DEAD " },
                shown(&r.name), shown(&r.host), r.pid, shown(&r.sink), r.heartbeat_age_secs,
                r.delivered, r.failed, r.dead_lettered, r.duplicates
            )?;
        }
        Ok(())
    }
}

/// One line of `tidings dlq list`, message fields escaped.
impl std::fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} key={} biz_id={} attempts={} {} at {}: {}",
            self.id,
            shown(&self.topic),
            shown(self.key.as_deref().unwrap_or("-")),
            shown(self.biz_id.as_deref().unwrap_or("-")),
            self.attempts,
            shown(&self.reason),
            self.dead_at,
            shown(&self.last_error)
        )
    }
}

/// One line of `tidings inbox dlq list`, message fields escaped.
impl std::fmt::Display for ParkedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} consumer={} {} key={} biz_id={} deliveries={} parked at {}",
            self.message_id,
            shown(&self.consumer),
            shown(&self.topic),
            shown(self.key.as_deref().unwrap_or("-")),
            shown(self.biz_id.as_deref().unwrap_or("-")),
            self.deliveries,
            self.dead_at,
        )?;
        if let Some(at) = self.replay_requested_at {
            write!(f, " replay requested at {at} (pending)")?;
        }
        write!(f, ": {}", shown(&self.last_error))
    }
}
