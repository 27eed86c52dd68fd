#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![cfg_attr(
    not(any(
        feature = "diesel",
        feature = "diesel-async",
        feature = "tokio-postgres"
    )),
    allow(dead_code)
)]

#[cfg(feature = "diesel-async")]
mod diesel_async;
#[cfg(feature = "diesel")]
mod diesel_sync;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "tokio-postgres")]
mod postgres;
#[cfg(feature = "tokio-postgres")]
mod prune;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "runner")]
pub mod runner;
#[cfg(feature = "sqlx")]
mod sqlx;
#[cfg(feature = "postgres")]
mod sync_postgres;
#[cfg(feature = "webhook")]
pub mod webhook;

use tidings_outbox::MessageId;

#[cfg(feature = "tokio-postgres")]
pub use prune::{prune, PRUNE};

/// What happened to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Outcome<T> {
    /// First time this consumer saw the key: the effect ran (in the same transaction) and
    /// returned this.
    Processed(T),
    /// The key was already recorded: the effect did not run.
    Duplicate,
}

impl<T> Outcome<T> {
    /// Whether the effect ran.
    pub fn is_processed(&self) -> bool {
        matches!(self, Outcome::Processed(_))
    }
}

/// Whether [`Inbox`]'s record call was the first for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Recorded {
    /// The key is new: run the effect in this same transaction.
    First,
    /// The key was already recorded (or is being recorded by a transaction that then
    /// committed): skip the effect.
    Duplicate,
}

impl Recorded {
    pub(crate) fn from_count(n: u64) -> Self {
        if n == 0 {
            Recorded::Duplicate
        } else {
            Recorded::First
        }
    }
}

/// The key a consumer deduplicates on: the biz-id when the message has one, else its message id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupKey {
    key: String,
    message_id: Option<MessageId>,
}

impl DedupKey {
    /// The key for a delivered message: its biz-id when present, else its message id.
    pub fn for_message(biz_id: Option<&str>, message_id: MessageId) -> Self {
        DedupKey {
            key: match biz_id {
                Some(b) if !b.is_empty() => b.to_owned(),
                _ => message_id.to_string(),
            },
            message_id: Some(message_id),
        }
    }

    /// A key chosen by the caller (a payment id, an order id).
    pub fn biz_id(biz_id: impl Into<String>) -> Self {
        DedupKey {
            key: biz_id.into(),
            message_id: None,
        }
    }

    /// The key as stored in `tidings.inbox.biz_id`.
    pub fn as_str(&self) -> &str {
        &self.key
    }
}

/// What can go wrong in the inbox (the effect's own errors are the caller's type).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The consumer name or key is unusable.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// `consumer name` or `dedup key`.
        what: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The database has no Tidings schema.
    #[error("the tidings schema is missing from this database: run `tidings migrate up`")]
    NotMigrated(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database failed.
    #[error("database error in the inbox")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A broker refused or failed a consumer adapter's setup (connecting, declaring,
    /// subscribing); the message names the server, never its credentials.
    #[error("{context}")]
    Broker {
        /// What failed, where.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A consumer runner's messages in flight did not finish within its shutdown timeout; they
    /// were left unacked for the broker to redeliver.
    #[error("messages in flight did not finish within {0:?}; left for redelivery")]
    ShutdownTimeout(std::time::Duration),
}

fn check(what: &'static str, v: &str) -> Result<(), Error> {
    let reason = if v.is_empty() {
        "it is empty"
    } else if v.len() > 512 {
        "it is longer than 512 bytes"
    } else if v.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(Error::Invalid { what, reason })
}

/// record_key: the dedup check itself, run inside the consumer's transaction.
/// $1 consumer, $2 key, $3 message id (NULL when not known).
/// A second delivery of the same key conflicts on the primary key; if the first transaction is
/// still open, this INSERT waits for it (row lock on the index entry) and then sees the
/// conflict, so two concurrent deliveries give exactly one effect. RETURNING yields a row only
/// when this call inserted it: the affected-row count (1 or 0) says which.
pub(crate) const RECORD_KEY: &str = "INSERT INTO tidings.inbox (consumer, biz_id, message_id) \
     VALUES ($1, $2, $3) ON CONFLICT (consumer, biz_id) DO NOTHING";

/// The inbox of one consumer (a service, or one handler of it). Keys are scoped by consumer, so
/// services sharing a database deduplicate independently.
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
}

impl Inbox {
    /// The inbox of `consumer` (1-512 bytes, no control characters).
    pub fn new(consumer: impl Into<String>) -> Result<Self, Error> {
        let consumer = consumer.into();
        check("consumer name", &consumer)?;
        Ok(Inbox { consumer })
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn params<'a>(
        &'a self,
        key: &'a DedupKey,
    ) -> Result<(&'a str, &'a str, Option<uuid::Uuid>), Error> {
        check("dedup key", &key.key)?;
        Ok((
            &self.consumer,
            &key.key,
            key.message_id.map(|m| m.as_uuid()),
        ))
    }
}

/// Maps a driver error, recognising a missing schema from the message for drivers without
/// SQLSTATE access.
#[cfg(any(feature = "diesel", feature = "diesel-async"))]
pub(crate) fn from_diesel(e: diesel::result::Error) -> Error {
    let m = e.to_string();
    if m.contains("tidings") && m.contains("does not exist") {
        Error::NotMigrated(Box::new(e))
    } else {
        Error::Database(Box::new(e))
    }
}
