//! The runner's store on sqlx (0.8, PostgreSQL) through a `PgPool`.

use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Connection, Row};

use super::{headers_json, replayed, Delivered, HandlerError, Parked, Step, Store};
use super::{PARK, REPLAYS, UNPARK};
use crate::sqlx::map_err;
use crate::{DedupKey, Error, Inbox, Recorded};

/// A consumer's business logic on sqlx, run inside the inbox transaction.
pub trait SqlxHandler: Send + Sync + 'static {
    /// Runs the effect of a first delivery on `conn`, inside the inbox transaction (committed
    /// by the runner on `Ok`). Return [`HandlerError::park`] for a message no retry can fix;
    /// any other error (`?`) is retried.
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Called in the same transaction (in a savepoint) when the inbox recognises a redelivery.
    /// The default does nothing.
    fn duplicate<'a>(
        &'a self,
        _conn: &'a mut PgConnection,
        _msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Runs a [`SqlxHandler`] on connections from a sqlx `PgPool`.
pub struct SqlxStore {
    pool: PgPool,
    handler: Arc<dyn SqlxHandler>,
}

impl SqlxStore {
    /// A store running `handler` on `pool`'s connections.
    pub fn new(pool: PgPool, handler: Arc<dyn SqlxHandler>) -> Self {
        SqlxStore { pool, handler }
    }
}

impl Store for SqlxStore {
    fn transact<'a>(
        &'a self,
        inbox: &'a Inbox,
        d: &'a Delivered,
    ) -> BoxFuture<'a, Result<Step, Error>> {
        Box::pin(async move {
            // BEGIN in a task of its own: if this future is dropped while BEGIN is on the wire
            // (the runner's db_timeout), sqlx 0.8 has not yet armed the rollback of the
            // transaction it is opening and pools the connection inside it (sqlx issue #4393),
            // where the next borrower's statements (a parking, say) would never commit. The
            // task finishes BEGIN and then drops a real transaction, which rolls back.
            let pool = self.pool.clone();
            let mut tx = tokio::spawn(async move { pool.begin().await })
                .await
                .map_err(|e| Error::Database(format!("opening the transaction: {e}").into()))?
                .map_err(map_err)?;
            if d.replayed {
                let gone = sqlx::query(UNPARK)
                    .bind(inbox.consumer())
                    .bind(d.id.as_uuid())
                    .execute(&mut *tx)
                    .await;
                match gone {
                    Ok(r) if r.rows_affected() == 0 => {
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
            let step = match inbox.record_sqlx(&mut tx, &key).await? {
                Recorded::Duplicate => {
                    // In a savepoint: a failing hook must not fail the message.
                    let mut sp = tx.begin().await.map_err(map_err)?;
                    match super::hook_caught(self.handler.duplicate(&mut sp, d)).await {
                        Ok(()) => sp.commit().await.map_err(map_err)?,
                        Err(e) => {
                            tracing::warn!(error = %e, "duplicate hook failed");
                            sp.rollback().await.map_err(map_err)?;
                        }
                    }
                    Step::Duplicate
                }
                Recorded::First => match self.handler.handle(&mut tx, d).await {
                    Ok(()) => Step::Processed,
                    Err(e) => {
                        tx.rollback().await.map_err(map_err)?;
                        return Ok(Step::Failed(e));
                    }
                },
            };
            // A handler that swallowed an SQL error leaves the transaction aborted, and COMMIT
            // of an aborted transaction rolls back: this probe fails (25P02) then.
            if let Err(e) = sqlx::query("SELECT 1").execute(&mut *tx).await {
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
            sqlx::query(PARK)
                .bind(p.consumer)
                .bind(d.id.as_uuid())
                .bind(d.biz_id.as_deref())
                .bind(d.topic.as_str())
                .bind(d.key.as_deref())
                .bind(d.payload.as_ref())
                .bind(headers_json(d))
                .bind(d.created_at)
                .bind(p.deliveries)
                .bind(p.error)
                .execute(&self.pool)
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
            let rows = sqlx::query(REPLAYS)
                .bind(consumer)
                .bind(limit)
                .fetch_all(&self.pool)
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
                        r.try_get::<String, _>(5)?.as_str(),
                        r.try_get(6)?,
                        r.try_get(7)?,
                    ))
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(map_err)
        })
    }

    fn is_transient(&self, e: &(dyn std::error::Error + 'static)) -> bool {
        is_transient(e)
    }
}

/// Whether a failure is a transient database condition: serialization failure (40001),
/// deadlock (40P01), lock not available (55P03), shutdown (57P01-57P03), a connection failure
/// (class 08), an I/O error, or no pooled connection.
pub fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(s) = err.downcast_ref::<sqlx::Error>() {
            match s {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                    return true
                }
                sqlx::Error::Database(d)
                    if d.code().is_some_and(|c| super::transient_sqlstate(&c)) =>
                {
                    return true
                }
                _ => {}
            }
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
