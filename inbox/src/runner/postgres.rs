//! The runner's store on tokio-postgres through a deadpool-postgres pool.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_postgres::Transaction;

use super::{headers_json, replayed, Delivered, HandlerError, Parked, Step, Store};
use super::{PARK, REPLAYS, UNPARK};
use crate::postgres::map_err;
use crate::{DedupKey, Error, Inbox, Recorded};

/// A consumer's business logic on tokio-postgres, run inside the inbox transaction.
pub trait Handler: Send + Sync + 'static {
    /// Runs the effect of a first delivery, in `tx` (committed by the runner on `Ok`). Return
    /// [`HandlerError::park`] for a message no retry can fix; any other error (`?`) is retried.
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Called in the same transaction when the inbox recognises a redelivery, e.g. to count it.
    /// The default does nothing.
    fn duplicate<'a>(
        &'a self,
        _tx: &'a Transaction<'a>,
        _msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Runs a [`Handler`] on connections from a deadpool-postgres pool.
pub struct PgStore {
    pool: deadpool_postgres::Pool,
    handler: Arc<dyn Handler>,
}

impl PgStore {
    /// A store running `handler` on `pool`'s connections.
    pub fn new(pool: deadpool_postgres::Pool, handler: Arc<dyn Handler>) -> Self {
        PgStore { pool, handler }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::Database(Box::new(e)))
    }
}

impl Store for PgStore {
    fn transact<'a>(
        &'a self,
        inbox: &'a Inbox,
        d: &'a Delivered,
    ) -> BoxFuture<'a, Result<Step, Error>> {
        Box::pin(async move {
            let mut obj = self.client().await?;
            let client: &mut tokio_postgres::Client = &mut obj;
            let mut tx = client.transaction().await.map_err(map_err)?;
            if d.replayed {
                // The parked row goes with the effect (or, if this fails, neither happens);
                // gone already (purged, replayed elsewhere): nothing to do.
                match tx
                    .execute(UNPARK, &[&inbox.consumer(), &d.id.as_uuid()])
                    .await
                {
                    Ok(0) => {
                        let _ = tx.rollback().await;
                        return Ok(Step::NotParked);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.rollback().await;
                        return Ok(Step::Failed(HandlerError::retry(e)));
                    }
                }
            }
            let key = DedupKey::for_message(d.biz_id.as_deref(), d.id);
            let step = match inbox.record_pg(&tx, &key).await? {
                Recorded::Duplicate => {
                    // In a savepoint: a failing hook must not fail the message (its effect is
                    // already there).
                    let sp = tx
                        .savepoint("tidings_duplicate_hook")
                        .await
                        .map_err(map_err)?;
                    match super::hook_caught(self.handler.duplicate(&sp, d)).await {
                        Ok(()) => sp.commit().await.map_err(map_err)?,
                        Err(e) => {
                            tracing::warn!(error = %e, "duplicate hook failed");
                            sp.rollback().await.map_err(map_err)?;
                        }
                    }
                    Step::Duplicate
                }
                Recorded::First => match self.handler.handle(&tx, d).await {
                    Ok(()) => Step::Processed,
                    Err(e) => {
                        tx.rollback().await.map_err(map_err)?;
                        return Ok(Step::Failed(e));
                    }
                },
            };
            // A handler that swallowed an SQL error leaves the transaction aborted, and COMMIT
            // of an aborted transaction silently rolls back: the message would be acked with
            // neither effect nor record. This probe fails (25P02) then.
            if let Err(e) = tx.batch_execute("SELECT 1").await {
                let _ = tx.rollback().await;
                return Ok(Step::Failed(HandlerError::retry(e)));
            }
            tx.commit().await.map_err(map_err)?;
            Ok(step)
        })
    }

    fn park<'a>(&'a self, p: Parked<'a>) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let d = p.message;
            let headers = headers_json(d);
            self.client()
                .await?
                .execute(
                    PARK,
                    &[
                        &p.consumer,
                        &d.id.as_uuid(),
                        &d.biz_id,
                        &d.topic,
                        &d.key,
                        &d.payload.as_ref(),
                        &headers,
                        &d.created_at,
                        &p.deliveries,
                        &p.error,
                    ],
                )
                .await
                .map_err(map_err)?;
            Ok(())
        })
    }

    fn replays<'a>(
        &'a self,
        consumer: &'a str,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<Delivered>, Error>> {
        Box::pin(async move {
            let rows = self
                .client()
                .await?
                .query(REPLAYS, &[&consumer, &limit])
                .await
                .map_err(map_err)?;
            rows.iter()
                .map(|r| {
                    Ok(replayed(
                        r.try_get(0)?,
                        r.try_get(1)?,
                        r.try_get(2)?,
                        r.try_get(3)?,
                        r.try_get(4)?,
                        r.try_get::<_, String>(5)?.as_str(),
                        r.try_get(6)?,
                        r.try_get(7)?,
                    ))
                })
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(map_err)
        })
    }

    fn is_transient(&self, e: &(dyn std::error::Error + 'static)) -> bool {
        is_transient(e)
    }
}

/// Whether a failure is a transient database condition: serialization failure (40001),
/// deadlock (40P01), lock not available (55P03), an administrator's or crash shutdown (57P01,
/// 57P02, 57P03), a connection failure (class 08), a closed connection, or no pooled connection.
pub fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
            if pg.is_closed() {
                return true;
            }
            if pg
                .code()
                .is_some_and(|c| super::transient_sqlstate(c.code()))
            {
                return true;
            }
        }
        if err.downcast_ref::<deadpool_postgres::PoolError>().is_some() {
            return true;
        }
        if let Some(Error::Database(inner)) = err.downcast_ref::<Error>() {
            if is_transient(&**inner) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
