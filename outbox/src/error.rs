use std::time::Duration;

/// What can go wrong when enqueueing. Bad input is reported before anything is written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The topic breaks the topic rule (see [`crate::validate_topic`]).
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic given (cut at 208 characters).
        topic: String,
        /// Which part of the rule it breaks.
        reason: &'static str,
    },
    /// A header name or value cannot be carried by every broker.
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// The header name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A header from JSON was a number, object, array, bool or null.
    #[error("header {name:?} is not a string")]
    HeaderNotString {
        /// The header name.
        name: String,
    },
    /// The biz-id or ordering key is empty, too long or has control characters.
    #[error("invalid {what}: {reason}")]
    InvalidId {
        /// `biz-id` or `ordering key`.
        what: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The payload is larger than [`crate::OutboxConfig::max_payload_bytes`].
    #[error("payload is {size} bytes, over the maximum of {max}")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The delay is absurdly long (over 100 years).
    #[error("delay of {delay:?} is too long")]
    InvalidDelay {
        /// The delay given.
        delay: Duration,
    },
    /// The JSON payload could not be serialised.
    #[error("could not serialise the payload as JSON")]
    Serialize(#[source] serde_json::Error),
    /// A message of a batch failed a check; nothing of the batch was written.
    #[error("message {index} of the batch: {source}")]
    InBatch {
        /// Position of the message in the batch, from 0.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: Box<Error>,
    },
    /// The configuration is unusable.
    #[error("invalid outbox config: {0}")]
    Config(&'static str),
    /// The database has no Tidings schema.
    #[error("the tidings schema is missing from this database: run `tidings migrate up`")]
    NotMigrated(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database failed the insert (including a rolled-back or broken transaction).
    #[error("database error while enqueueing")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
}
