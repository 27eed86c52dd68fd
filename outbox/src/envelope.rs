//! Names that travel on the wire with every message. Defined here, once; the relay's sinks and
//! the inbox read them from this module.

/// Header names starting with this (any case) are set by Tidings only; producers may not use them.
pub const RESERVED_HEADER_PREFIX: &str = "Tidings-";
/// Header name prefixes (any case) producers may not use: set by Tidings (`Tidings-`), obeyed by
/// JetStream (`Nats-Msg-Id`, `Nats-Expected-*`, `Nats-Rollup`, ...) or set by the webhook sink
/// (`webhook-id`, `webhook-signature`, ...). The schema's CHECK holds the same list.
pub const RESERVED_HEADER_PREFIXES: &[&str] = &["tidings-", "nats-", "webhook-"];
/// Header names (any case) producers may not use: the webhook sink's `Idempotency-Key`, RabbitMQ's
/// sender-selected distribution (`CC`, `BCC`) and delayed-message plugin (`x-delay`), and HTTP
/// framing and hop-by-hop headers. The schema's CHECK holds the same list.
pub const RESERVED_HEADER_NAMES: &[&str] = &[
    "idempotency-key",
    "cc",
    "bcc",
    "x-delay",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];
/// The internal message id (UUIDv7). Sinks also map it to the broker's own dedup id.
pub const HEADER_MESSAGE_ID: &str = "Tidings-Message-Id";
/// The producer's biz-id, when the message has one.
pub const HEADER_BIZ_ID: &str = "Tidings-Biz-Id";
/// The ordering key, when the message has one.
pub const HEADER_KEY: &str = "Tidings-Key";
/// The topic the producer wrote (sinks may prefix it for the broker's subject or routing key).
pub const HEADER_TOPIC: &str = "Tidings-Topic";
/// When the producer enqueued the message (RFC 3339).
pub const HEADER_CREATED_AT: &str = "Tidings-Created-At";
/// How many delivery attempts the relay made before this one.
pub const HEADER_ATTEMPT: &str = "Tidings-Attempt";
/// W3C trace context header; producers set it, consumers continue the trace from it.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Content type header set by [`crate::Message::json`].
pub const CONTENT_TYPE: &str = "content-type";
/// The JSON content type.
pub const JSON: &str = "application/json";
