//! Prints each message as one JSON line: the default sink, so a new user sees messages flow with
//! nothing but PostgreSQL.
//!
//! Writing to a pipe blocks when nobody reads it, so the writes happen on a thread of the sink's
//! own, never on the async runtime: a reader that stops reading makes publishes time out (and,
//! through [`Sink::check`], counts as an outage), and never stops the relay from shutting down.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::{Delivery, Envelope, Sink, SinkError};

/// A write the writer thread has been stuck in for this long means nobody reads the output.
const STUCK_AFTER: Duration = Duration::from_millis(500);

type Line = (String, oneshot::Sender<std::io::Result<()>>);

/// Writes JSON lines to a writer (standard output by default).
pub struct StdoutSink {
    lines: mpsc::Sender<Line>,
    /// Milliseconds since `epoch` when the current write started; 0 while idle.
    busy_since: Arc<AtomicU64>,
    epoch: Instant,
}

impl Default for StdoutSink {
    fn default() -> Self {
        StdoutSink::new(Box::new(std::io::stdout()))
    }
}

impl StdoutSink {
    /// A sink writing to `out`, from a thread of its own.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Line>(1024);
        let busy_since = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let busy = busy_since.clone();
        let spawned = std::thread::Builder::new()
            .name("tidings-stdout".into())
            .spawn(move || {
                let mut out = out;
                while let Some((line, done)) = rx.blocking_recv() {
                    busy.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
                    let r = writeln!(out, "{line}").and_then(|_| out.flush());
                    busy.store(0, Ordering::Relaxed);
                    let _ = done.send(r);
                }
            });
        if let Err(e) = spawned {
            // Without the thread every publish fails as "unavailable"; the relay backs off and
            // says so, which is the most a sink can do here.
            tracing::error!(error = %e, "cannot start the stdout writer thread");
        }
        StdoutSink {
            lines: tx,
            busy_since,
            epoch,
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

    fn stuck(&self) -> bool {
        let since = self.busy_since.load(Ordering::Relaxed);
        since != 0
            && self.epoch.elapsed().as_millis() as u64 > since - 1 + STUCK_AFTER.as_millis() as u64
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        let line = Self::line(msg);
        Box::pin(async move {
            let gone = || SinkError::Unavailable("the stdout writer thread is gone".into());
            let (done, written) = oneshot::channel();
            self.lines.send((line, done)).await.map_err(|_| gone())?;
            written
                .await
                .map_err(|_| gone())?
                .map_err(|e| SinkError::Unavailable(Box::new(e)))?;
            Ok(Delivery::default())
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if self.stuck() {
                Err(SinkError::Unavailable(
                    "standard output is not being read (a write has been blocked)".into(),
                ))
            } else {
                Ok(())
            }
        })
    }
}
