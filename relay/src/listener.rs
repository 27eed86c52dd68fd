//! LISTEN on a dedicated connection (never a pooled one: pools drive connections in a way that
//! drops notifications). A notification is only a hint to look now; after every (re)connect the
//! relay is woken too, because notifications sent while disconnected are lost.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Socket};
use tokio_util::sync::CancellationToken;

/// The channel the outbox trigger notifies.
pub const CHANNEL: &str = "tidings_outbox";

pub(crate) async fn listen<T>(
    pg: tokio_postgres::Config,
    tls: T,
    wake: Arc<Notify>,
    stop: CancellationToken,
) where
    T: MakeTlsConnect<Socket> + Clone + Send,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match pg.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                // The LISTEN must be sent while the connection is being polled.
                let listen = client.batch_execute("LISTEN tidings_outbox");
                tokio::pin!(listen);
                let ok = loop {
                    tokio::select! {
                        r = &mut listen => break r.is_ok(),
                        m = messages.next() => if !matches!(m, Some(Ok(_))) { break false },
                    }
                };
                if ok {
                    tracing::debug!("listening for outbox notifications");
                    failures = 0;
                    wake.notify_one(); // rescan: anything sent while we were away is lost
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            m = messages.next() => match m {
                                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                                Some(Ok(_)) => {}
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, "notification connection lost; polling until it is back");
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                }
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(error = %e, "cannot open the notification connection; polling until it is back");
                }
            }
        }
        failures += 1;
        let pause = Duration::from_millis(200) * 2u32.pow(failures.min(7));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause.min(Duration::from_secs(30))) => {}
        }
    }
}
