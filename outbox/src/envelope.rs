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

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::MessageId;

/// A message as it travels between the relay and a consumer, whatever the broker: the relay
/// encodes it with [`WireMessage::encode_headers`] and every consumer adapter decodes it with
/// [`WireMessage::decode`]. A broker's own header names (`Nats-Msg-Id`, AMQP `message_id`, the
/// Kafka key) stay in that broker's sink and adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct WireMessage {
    /// The internal message id.
    pub id: MessageId,
    /// The producer's topic.
    pub topic: String,
    /// The ordering key, if any.
    pub key: Option<String>,
    /// The business id, if any.
    pub biz_id: Option<String>,
    /// The producer's own headers (`traceparent`, `content-type`, ...), never `Tidings-*`.
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub payload: Bytes,
    /// When the producer enqueued it (absent on a message from elsewhere).
    pub created_at: Option<DateTime<Utc>>,
    /// Delivery attempts the relay made before this one (0 on the first).
    pub attempts: i32,
}

/// Why a delivered message cannot be read as a Tidings message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// It carries no message id (`Tidings-Message-Id`, nor one from the broker's own header).
    #[error("the message carries no message id")]
    NoId,
    /// A `Tidings-*` header holds a value that does not parse.
    #[error("header {name} holds an invalid value")]
    BadHeader {
        /// The header's name.
        name: &'static str,
    },
}

impl WireMessage {
    /// The headers to send: the producer's, then the `Tidings-*` ones (message id, topic,
    /// created time, attempt, biz-id and key when present).
    pub fn encode_headers(&self) -> Vec<(&str, String)> {
        let mut h: Vec<(&str, String)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        h.push((HEADER_MESSAGE_ID, self.id.to_string()));
        h.push((HEADER_TOPIC, self.topic.clone()));
        if let Some(t) = self.created_at {
            h.push((
                HEADER_CREATED_AT,
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ));
        }
        h.push((HEADER_ATTEMPT, self.attempts.to_string()));
        if let Some(b) = &self.biz_id {
            h.push((HEADER_BIZ_ID, b.clone()));
        }
        if let Some(k) = &self.key {
            h.push((HEADER_KEY, k.clone()));
        }
        h
    }

    /// Reads a message back from the headers a broker delivered (names compared without regard
    /// to case: HTTP and some brokers lower-case them). `fallback_id` is the broker's own dedup
    /// id when `Tidings-Message-Id` is missing (the adapter reads it from its broker's header);
    /// `fallback_topic` stands in for a missing `Tidings-Topic` (the subject, routing key or
    /// stream). Every header that is not `Tidings-*` is the producer's.
    pub fn decode<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        payload: Bytes,
        fallback_id: Option<MessageId>,
        fallback_topic: &str,
    ) -> Result<WireMessage, WireError> {
        let mut own = BTreeMap::new();
        let (mut id, mut topic, mut key, mut biz_id, mut created_at, mut attempts) =
            (None, None, None, None, None, 0);
        for (name, value) in headers {
            let is = |h: &str| name.eq_ignore_ascii_case(h);
            if is(HEADER_MESSAGE_ID) {
                id = Some(
                    value
                        .parse::<MessageId>()
                        .map_err(|_| WireError::BadHeader {
                            name: HEADER_MESSAGE_ID,
                        })?,
                );
            } else if is(HEADER_TOPIC) {
                topic = Some(value.to_owned());
            } else if is(HEADER_KEY) {
                key = Some(value.to_owned());
            } else if is(HEADER_BIZ_ID) {
                biz_id = Some(value.to_owned());
            } else if is(HEADER_CREATED_AT) {
                created_at = DateTime::parse_from_rfc3339(value)
                    .map(|t| Some(t.with_timezone(&Utc)))
                    .map_err(|_| WireError::BadHeader {
                        name: HEADER_CREATED_AT,
                    })?;
            } else if is(HEADER_ATTEMPT) {
                attempts = value.parse().map_err(|_| WireError::BadHeader {
                    name: HEADER_ATTEMPT,
                })?;
            } else if name
                .as_bytes()
                .get(..RESERVED_HEADER_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX.as_bytes()))
            {
                // (Compared as bytes: slicing the str could split a multi-byte character.)
                // A Tidings header this version does not know: not the producer's.
            } else {
                own.insert(name.to_owned(), value.to_owned());
            }
        }
        Ok(WireMessage {
            id: id.or(fallback_id).ok_or(WireError::NoId)?,
            topic: topic.unwrap_or_else(|| fallback_topic.to_owned()),
            key,
            biz_id,
            headers: own,
            payload,
            created_at,
            attempts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_encoded_decodes_to_the_same_message_whatever_the_case() {
        let m = WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic: "payment.succeeded".into(),
            key: Some("cust_7".into()),
            biz_id: Some("pay_1".into()),
            headers: [("traceparent".to_owned(), "00-ab-cd-01".to_owned())].into(),
            payload: Bytes::from_static(b"{}"),
            created_at: Some(Utc::now()),
            attempts: 2,
        };
        let sent = m.encode_headers();
        let lower: Vec<(String, String)> = sent
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        let back = WireMessage::decode(
            lower.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            m.payload.clone(),
            None,
            "ignored",
        )
        .unwrap();
        // Micro-second precision on the wire.
        let mut want = m.clone();
        want.created_at = back.created_at;
        assert_eq!(back, want);
        let t = m.created_at.unwrap() - back.created_at.unwrap();
        assert!(t.num_microseconds().unwrap().abs() < 1);
        assert_eq!(
            WireMessage::decode([("x", "y")], Bytes::new(), None, "t"),
            Err(WireError::NoId)
        );
        assert!(matches!(
            WireMessage::decode([(HEADER_ATTEMPT, "many")], Bytes::new(), Some(m.id), "t"),
            Err(WireError::BadHeader { .. })
        ));
    }

    /// Header names of any Unicode, around the length of the reserved prefix: no panic (a
    /// name whose 8th byte falls inside a character once panicked every consumer).
    #[test]
    fn hostile_header_names_never_panic() {
        let id = MessageId::from_uuid(uuid::Uuid::now_v7());
        for name in [
            "abcdefgé",
            "tidings",
            "Tidingsé",
            "é",
            "",
            "tidings-é",
            "ééééé",
        ] {
            let m = WireMessage::decode([(name, "v")], Bytes::new(), Some(id), "t").unwrap();
            let reserved = name.to_ascii_lowercase().starts_with("tidings-");
            assert_eq!(m.headers.contains_key(name), !reserved, "{name:?}");
        }
    }
}
