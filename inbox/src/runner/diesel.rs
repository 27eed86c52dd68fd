//! The runner's store on diesel-async through its deadpool pool.

use std::sync::Arc;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{Bytea, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures::future::BoxFuture;

use super::{headers_json, replayed, Delivered, HandlerError, Parked, Step, Store};
use super::{PARK, REPLAYS, UNPARK};
use crate::{from_diesel, DedupKey, Error, Inbox, Recorded};

/// A consumer's business logic on diesel-async, run inside the inbox transaction.
pub trait DieselHandler: Send + Sync + 'static {
    /// Runs the effect of a first delivery on `conn`, inside the runner's transaction
    /// (committed on `Ok`). Return [`HandlerError::park`] for a message no retry can fix; any
    /// other error (`?`) is retried.
    fn handle<'a>(
        &'a self,
        conn: &'a mut AsyncPgConnection,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Called in the same transaction when the inbox recognises a redelivery. The default does
    /// nothing.
    fn duplicate<'a>(
        &'a self,
        _conn: &'a mut AsyncPgConnection,
        _msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Runs a [`DieselHandler`] on connections from a diesel-async deadpool pool.
pub struct DieselStore {
    pool: Pool<AsyncPgConnection>,
    handler: Arc<dyn DieselHandler>,
}

impl DieselStore {
    /// A store running `handler` on `pool`'s connections.
    pub fn new(pool: Pool<AsyncPgConnection>, handler: Arc<dyn DieselHandler>) -> Self {
        DieselStore { pool, handler }
    }

    async fn conn(&self) -> Result<Object<AsyncPgConnection>, Error> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::Database(Box::new(e)))
    }
}

/// Why the runner's diesel transaction rolled back.
enum Abort {
    Handler(HandlerError),
    Inbox(Error),
    Db(DieselError),
    NotParked,
}

impl From<DieselError> for Abort {
    fn from(e: DieselError) -> Self {
        Abort::Db(e)
    }
}

#[derive(diesel::QueryableByName)]
struct ReplayRow {
    #[diesel(sql_type = SqlUuid)]
    message_id: uuid::Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    biz_id: Option<String>,
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Nullable<Text>)]
    ordering_key: Option<String>,
    #[diesel(sql_type = Bytea)]
    payload: Vec<u8>,
    #[diesel(sql_type = Text)]
    headers: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<chrono::DateTime<chrono::Utc>>,
    #[diesel(sql_type = Integer)]
    deliveries: i32,
}

impl Store for DieselStore {
    fn transact<'a>(
        &'a self,
        inbox: &'a Inbox,
        d: &'a Delivered,
    ) -> BoxFuture<'a, Result<Step, Error>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let handler = &*self.handler;
            let key = DedupKey::for_message(d.biz_id.as_deref(), d.id);
            let result = conn
                .transaction(async |conn| -> Result<Step, Abort> {
                    if d.replayed {
                        // The parked row goes with the effect, first; gone already (purged,
                        // replayed elsewhere): nothing to do.
                        let n = diesel::sql_query(UNPARK)
                            .bind::<Text, _>(inbox.consumer())
                            .bind::<SqlUuid, _>(d.id.as_uuid())
                            .execute(conn)
                            .await?;
                        if n == 0 {
                            return Err(Abort::NotParked);
                        }
                    }
                    let step = match inbox.record_async(conn, &key).await.map_err(Abort::Inbox)? {
                        Recorded::Duplicate => {
                            // A nested transaction is a savepoint: a failing hook must not fail
                            // the message (its effect is already there).
                            let hook = conn
                                .transaction(async |conn| -> Result<(), Abort> {
                                    super::hook_caught(handler.duplicate(conn, d))
                                        .await
                                        .map_err(Abort::Handler)
                                })
                                .await;
                            if let Err(Abort::Handler(e)) = hook {
                                tracing::warn!(error = %e, "duplicate hook failed");
                            } else if let Err(Abort::Db(e)) = hook {
                                tracing::warn!(error = %e, "duplicate hook failed");
                            }
                            Step::Duplicate
                        }
                        Recorded::First => {
                            handler.handle(conn, d).await.map_err(Abort::Handler)?;
                            Step::Processed
                        }
                    };
                    // A handler that swallowed an SQL error leaves the transaction aborted:
                    // this probe fails then, and the transaction rolls back.
                    diesel::sql_query("SELECT 1").execute(conn).await?;
                    Ok(step)
                })
                .await;
            match result {
                Ok(step) => Ok(step),
                Err(Abort::Handler(e)) => Ok(Step::Failed(e)),
                Err(Abort::Db(e)) => Ok(Step::Failed(HandlerError::retry(e))),
                Err(Abort::Inbox(e)) => Err(e),
                Err(Abort::NotParked) => Ok(Step::NotParked),
            }
        })
    }

    fn park<'a>(&'a self, p: Parked<'a>) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let d = p.message;
            let headers = headers_json(d);
            let mut conn = self.conn().await?;
            diesel::sql_query(PARK)
                .bind::<Text, _>(p.consumer)
                .bind::<SqlUuid, _>(d.id.as_uuid())
                .bind::<Nullable<Text>, _>(d.biz_id.as_deref())
                .bind::<Text, _>(&d.topic)
                .bind::<Nullable<Text>, _>(d.key.as_deref())
                .bind::<Bytea, _>(d.payload.as_ref())
                .bind::<Jsonb, _>(headers)
                .bind::<Nullable<Timestamptz>, _>(d.created_at)
                .bind::<Integer, _>(p.deliveries)
                .bind::<Text, _>(p.error)
                .execute(&mut *conn)
                .await
                .map_err(from_diesel)?;
            Ok(())
        })
    }

    fn replays<'a>(
        &'a self,
        consumer: &'a str,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<Delivered>, Error>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let rows: Vec<ReplayRow> = diesel::sql_query(REPLAYS)
                .bind::<Text, _>(consumer)
                .bind::<diesel::sql_types::BigInt, _>(limit)
                .load(&mut *conn)
                .await
                .map_err(from_diesel)?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    replayed(
                        r.message_id,
                        r.biz_id,
                        r.topic,
                        r.ordering_key,
                        r.payload,
                        &r.headers,
                        r.created_at,
                        r.deliveries,
                    )
                })
                .collect())
        })
    }

    fn is_transient(&self, e: &(dyn std::error::Error + 'static)) -> bool {
        is_transient(e)
    }
}

/// Whether a failure is a transient database condition as diesel reports it: serialization
/// failure, a lost connection, a deadlock or lock timeout (recognised by PostgreSQL's
/// message, as diesel does not expose SQLSTATE for them), or no pooled connection.
pub fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(DieselError::DatabaseError(kind, info)) = err.downcast_ref::<DieselError>() {
            let m = info.message();
            if matches!(
                kind,
                DatabaseErrorKind::SerializationFailure
                    | DatabaseErrorKind::ClosedConnection
                    | DatabaseErrorKind::UnableToSendCommand
            ) || m.contains("deadlock detected")
                || m.contains("could not obtain lock")
                || m.contains("due to lock timeout")
                || m.contains("terminating connection")
            {
                return true;
            }
        }
        if err
            .downcast_ref::<diesel_async::pooled_connection::deadpool::PoolError>()
            .is_some()
        {
            return true;
        }
        cur = err.source();
    }
    false
}
