//! A transaction whose outbox rows travel with its COMMIT (tokio-postgres and deadpool-postgres).
//!
//! `enqueue_pg` inside a transaction costs a network round trip of its own: the INSERT goes out,
//! its answer comes back, then the COMMIT goes out. [`OutboxTransaction`] checks and buffers the
//! messages instead (ids assigned at once) and sends their INSERT and the COMMIT together when
//! the transaction commits, so a producer pays for the row and not for another round trip.
//!
//! A failed INSERT aborts the transaction on the server; the COMMIT that follows it in the same
//! pipeline then rolls back, and `commit` returns the INSERT's error. (tokio-postgres' own
//! `Transaction::commit` reports success when the server answers a COMMIT with ROLLBACK, for
//! instance after an earlier statement failed and its error was ignored; this commit does not:
//! the INSERT fails in the aborted transaction and its error is returned.)

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::task::Poll;

use tokio_postgres::{Client, Statement};

use crate::postgres::{batch_params, map_err, one_params};
#[cfg(feature = "deadpool-postgres")]
use crate::postgres::{BATCH_TYPES, ONE_TYPES};
use crate::sql::{Columns, INSERT_MESSAGE, INSERT_MESSAGES};
use crate::{Error, Message, MessageId, Outbox, OutboxConfig};

/// A top-level database transaction (a tokio-postgres [`tokio_postgres::Transaction`], reached
/// through `Deref`) whose messages are written by its COMMIT's round trip. Made by
/// [`Outbox::begin_pg`] or [`Outbox::begin_deadpool`].
///
/// Run the business statements through it as through any transaction (`tx.execute(...)`),
/// add messages with [`OutboxTransaction::enqueue`] (checked at once, written at commit), and
/// finish with [`OutboxTransaction::commit`]. Dropped without a commit, it rolls back like any
/// tokio-postgres transaction and its messages are never written.
///
/// ```no_run
/// # async fn f(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use tidings_outbox::{Message, Outbox};
/// let outbox = Outbox::default();
/// let mut tx = outbox.begin_pg(client).await?;
/// tx.execute("UPDATE payments SET state = 'paid' WHERE id = $1", &[&"pay_1"]).await?;
/// tx.enqueue(&Message::new("payments.paid", r#"{"id":"pay_1"}"#).biz_id("pay_1"))?;
/// tx.commit().await?; // the outbox INSERT and the COMMIT, one round trip
/// # Ok(()) }
/// ```
pub struct OutboxTransaction<'c> {
    tx: tokio_postgres::Transaction<'c>,
    config: OutboxConfig,
    columns: Columns,
    /// The prepared INSERTs (one message, a batch) when deadpool caches them.
    cached: Option<(Statement, Statement)>,
}

impl<'c> Deref for OutboxTransaction<'c> {
    type Target = tokio_postgres::Transaction<'c>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl DerefMut for OutboxTransaction<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl Outbox {
    /// Starts a transaction on a tokio-postgres client whose messages are written in the
    /// round trip of its COMMIT (see [`OutboxTransaction`]). Sends BEGIN and waits for it, like
    /// `Client::transaction`. The INSERT is an unnamed statement (parsed at each commit), safe
    /// through any pooler; with deadpool-postgres prefer [`Outbox::begin_deadpool`].
    pub async fn begin_pg<'c>(
        &self,
        client: &'c mut Client,
    ) -> Result<OutboxTransaction<'c>, Error> {
        let tx = client.transaction().await.map_err(map_err)?;
        Ok(OutboxTransaction {
            tx,
            config: self.config.clone(),
            columns: Columns::with_capacity(1),
            cached: None,
        })
    }

    /// Like [`Outbox::begin_pg`] for a deadpool-postgres connection (`&mut *object`): the
    /// INSERT statements are prepared once per pooled connection and cached there (the first
    /// call on a connection prepares them, before BEGIN). Refused when
    /// `OutboxConfig::statement_cache` is off; use `begin_pg(&mut **object)` then.
    #[cfg(feature = "deadpool-postgres")]
    pub async fn begin_deadpool<'c>(
        &self,
        client: &'c mut deadpool_postgres::ClientWrapper,
    ) -> Result<OutboxTransaction<'c>, Error> {
        if !self.config.statement_cache {
            return Err(Error::Config(
                "statement_cache is off: begin_deadpool caches prepared statements; use begin_pg(&mut **client)",
            ));
        }
        let one = client
            .prepare_typed_cached(INSERT_MESSAGE, &ONE_TYPES)
            .await
            .map_err(map_err)?;
        let batch = client
            .prepare_typed_cached(INSERT_MESSAGES, &BATCH_TYPES)
            .await
            .map_err(map_err)?;
        let tx = Client::transaction(client).await.map_err(map_err)?;
        Ok(OutboxTransaction {
            tx,
            config: self.config.clone(),
            columns: Columns::with_capacity(1),
            cached: Some((one, batch)),
        })
    }
}

impl OutboxTransaction<'_> {
    /// Checks `msg` now (the same rules as `enqueue_pg`) and keeps it for the commit; returns
    /// its id. Nothing reaches the database before [`OutboxTransaction::commit`].
    pub fn enqueue(&mut self, msg: &Message) -> Result<MessageId, Error> {
        let ids = self
            .columns
            .extend(&self.config, std::slice::from_ref(msg))?;
        Ok(ids[0])
    }

    /// Checks every message of `msgs` now (none is kept if one is bad) and keeps them, in
    /// order, for the commit; returns their ids.
    pub fn enqueue_batch(&mut self, msgs: &[Message]) -> Result<Vec<MessageId>, Error> {
        self.columns.extend(&self.config, msgs)
    }

    /// How many messages wait for the commit.
    pub fn pending(&self) -> usize {
        self.columns.len()
    }

    /// Writes the kept messages (one INSERT) and commits, in one round trip. On any error the
    /// transaction is over and nothing of it was committed, except when the COMMIT itself was
    /// sent and the connection broke before its answer (then, as with any commit, the outcome
    /// is unknown). With no message kept, a `SELECT 1` takes the INSERT's place, so that a
    /// transaction an earlier failure aborted is reported here too, not committed as a ROLLBACK.
    pub async fn commit(self) -> Result<(), Error> {
        let OutboxTransaction {
            tx,
            columns,
            cached,
            ..
        } = self;
        let mut insert = Box::pin(async {
            match (&cached, columns.len()) {
                (_, 0) => tx.batch_execute("SELECT 1").await.map(|()| 0),
                (Some((one, _)), 1) => {
                    let p = one_params(&columns);
                    let params: Vec<_> = p.iter().map(|(v, _)| *v).collect();
                    tx.execute(one, &params).await
                }
                (Some((_, batch)), _) => {
                    let p = batch_params(&columns);
                    let params: Vec<_> = p.iter().map(|(v, _)| *v).collect();
                    tx.execute(batch, &params).await
                }
                (None, 1) => {
                    tx.execute_typed(INSERT_MESSAGE, &one_params(&columns))
                        .await
                }
                (None, _) => {
                    tx.execute_typed(INSERT_MESSAGES, &batch_params(&columns))
                        .await
                }
            }
        });
        // First poll: the INSERT is encoded and queued on the connection, or it fails before
        // anything was sent (a parameter that cannot be encoded, a closed connection). Then no
        // COMMIT may follow it: the business writes would commit without their messages.
        if let Poll::Ready(r) =
            std::future::poll_fn(|cx| Poll::Ready(insert.as_mut().poll(cx))).await
        {
            drop(insert);
            if let Err(e) = r {
                let _ = tx.rollback().await;
                return Err(map_err(e));
            }
            // (Answered before the COMMIT was even sent: not seen, but then commit as usual.)
            return tx.commit().await.map_err(map_err);
        }
        // The INSERT is on its way; the COMMIT follows it in the same flight, before either
        // answer is awaited.
        let (inserted, committed) = {
            let mut commit = std::pin::pin!(tx.batch_execute("COMMIT"));
            let (mut inserted, mut committed) = (None, None);
            std::future::poll_fn(|cx| {
                if committed.is_none() {
                    if let Poll::Ready(r) = commit.as_mut().poll(cx) {
                        committed = Some(r);
                    }
                }
                if inserted.is_none() {
                    if let Poll::Ready(r) = insert.as_mut().poll(cx) {
                        inserted = Some(r);
                    }
                }
                match (inserted.take(), committed.take()) {
                    (Some(i), Some(c)) => Poll::Ready((i, c)),
                    (i, c) => {
                        (inserted, committed) = (i, c);
                        Poll::Pending
                    }
                }
            })
            .await
        };
        drop(insert);
        // Both statements were sent: the server ended the transaction (committed, or rolled
        // back after a failed INSERT). The Transaction must not send its ROLLBACK on drop (the
        // server would warn "there is no transaction in progress" into its log); it is a
        // top-level transaction (made by begin_pg/begin_deadpool), so forgetting it leaks
        // nothing: in tokio-postgres 0.7 it holds a borrow of the client, no savepoint and a
        // flag (tests/outbox.rs checks the connection is clean afterwards).
        std::mem::forget(tx);
        inserted.map_err(map_err)?;
        committed.map_err(map_err)
    }

    /// Rolls back; the kept messages are dropped.
    pub async fn rollback(self) -> Result<(), Error> {
        self.tx.rollback().await.map_err(map_err)
    }
}
