//! Prints each message as one JSON line: the default sink, so a new user sees messages flow with
//! nothing but PostgreSQL.

use std::io::Write;
use std::sync::Mutex;

use futures::future::BoxFuture;
use serde_json::json;

use super::{Delivery, Envelope, Sink, SinkError};

/// Writes JSON lines to a writer (standard output by default).
pub struct StdoutSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl Default for StdoutSink {
    fn default() -> Self {
        StdoutSink::new(Box::new(std::io::stdout()))
    }
}

impl StdoutSink {
    /// A sink writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        StdoutSink {
            out: Mutex::new(out),
        }
    }

    fn line(msg: &Envelope) -> String {
        // JSON payloads are shown as JSON; anything else as a UTF-8 string or, failing that,
        // as an array of bytes.
        let payload = serde_json::from_slice::<serde_json::Value>(&msg.payload)
            .or_else(|_| std::str::from_utf8(&msg.payload).map(|s| json!(s)))
            .unwrap_or_else(|_| json!(msg.payload.to_vec()));
        json!({
            "id": msg.id,
            "topic": msg.topic,
            "key": msg.key,
            "biz_id": msg.biz_id,
            "headers": msg.headers,
            "created_at": msg.created_at,
            "attempt": msg.attempts,
            "payload": payload,
        })
        .to_string()
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        let line = Self::line(msg);
        Box::pin(async move {
            let mut out = self
                .out
                .lock()
                .map_err(|_| SinkError::Unavailable("stdout writer poisoned".into()))?;
            writeln!(out, "{line}")
                .and_then(|_| out.flush())
                .map_err(|e| SinkError::Unavailable(Box::new(e)))?;
            Ok(Delivery::default())
        })
    }
}
