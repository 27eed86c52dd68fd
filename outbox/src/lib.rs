#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
// Without a driver feature only the types are compiled; the write path is unused.
#![cfg_attr(
    not(any(
        feature = "diesel",
        feature = "diesel-async",
        feature = "tokio-postgres"
    )),
    allow(dead_code)
)]

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod envelope;
mod error;
mod message;
#[cfg(feature = "redis-url")]
pub mod redis_url;
mod sql;
#[cfg(feature = "sqlx")]
mod sqlx;
#[cfg(feature = "postgres")]
mod sync_postgres;
#[cfg(feature = "opentelemetry")]
pub mod trace;
#[cfg(feature = "webhook")]
pub mod webhook;

#[cfg(feature = "diesel-async")]
mod diesel_async;
#[cfg(feature = "diesel")]
mod diesel_sync;
#[cfg(feature = "tokio-postgres")]
mod pipelined;
#[cfg(feature = "tokio-postgres")]
mod postgres;

pub use envelope::{WireError, WireMessage};
pub use error::Error;
pub use message::{
    is_reserved_header, validate_biz_id, validate_header_pair, validate_key, validate_topic,
    Message, MessageId, MAX_TOPIC_LEN,
};
#[cfg(feature = "tokio-postgres")]
pub use pipelined::OutboxTransaction;

/// Outbox settings. Build with struct update syntax over `Default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Largest payload accepted, in bytes. Keep it at or below the broker's limit (NATS:
    /// `max_payload`, 1 MiB by default), or the relay will dead-letter the message.
    /// Defaults to 1 MiB (1,048,576).
    pub max_payload_bytes: usize,
    /// Whether `enqueue_deadpool`/`enqueue_batch_deadpool` may prepare their statement once per
    /// pooled connection and cache it there. Set it to false when the database URL goes
    /// through PgBouncer in transaction mode (before 1.21, or without
    /// `max_prepared_statements`): a cached statement lives on one server connection, and the
    /// next transaction gets another. They then refuse with [`Error::Config`] instead of
    /// failing at random; use `enqueue_pg`/`enqueue_batch_pg` (unnamed statements, one round
    /// trip, safe through any pooler). Defaults to true.
    pub statement_cache: bool,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_payload_bytes: 1024 * 1024,
            statement_cache: true,
        }
    }
}

/// Writes messages into the outbox inside the caller's transaction.
///
/// Cheap to clone. Each driver has its own pair of methods, behind its cargo feature:
/// `enqueue`/`enqueue_batch` (sync diesel), `enqueue_async`/`enqueue_batch_async` (diesel-async),
/// `enqueue_pg`/`enqueue_batch_pg` (tokio-postgres and deadpool-postgres).
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    config: OutboxConfig,
}

impl Outbox {
    /// An outbox with the given settings, checked once here.
    pub fn new(config: OutboxConfig) -> Result<Self, Error> {
        if config.max_payload_bytes == 0 {
            return Err(Error::Config("max_payload_bytes must be greater than 0"));
        }
        // PostgreSQL's bytea tops out at 1 GiB; brokers far earlier.
        if config.max_payload_bytes > 256 * 1024 * 1024 {
            return Err(Error::Config("max_payload_bytes must be at most 256 MiB"));
        }
        Ok(Outbox { config })
    }

    /// The settings in force.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }
}
