//! sqlx (0.8, PostgreSQL): record a key and run the effect in one transaction.

use sqlx::postgres::PgConnection;
use sqlx::Connection;

use crate::{DedupKey, Error, Inbox, Outcome, Recorded, RECORD_KEY};

pub(crate) fn map_err(e: sqlx::Error) -> Error {
    let unmigrated = matches!(&e, sqlx::Error::Database(d)
        if matches!(d.code().as_deref(), Some("42P01" | "3F000")));
    if unmigrated {
        Error::NotMigrated(Box::new(e))
    } else {
        Error::Database(Box::new(e))
    }
}

impl Inbox {
    /// Records `key` inside the caller's open transaction (`&mut *tx`); run the effect only on
    /// [`Recorded::First`]. If the transaction rolls back, the record goes with it.
    pub async fn record_sqlx(
        &self,
        conn: &mut PgConnection,
        key: &DedupKey,
    ) -> Result<Recorded, Error> {
        let (consumer, k, mid) = self.params(key)?;
        let r = sqlx::query(RECORD_KEY)
            .bind(consumer)
            .bind(k)
            .bind(mid)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        Ok(Recorded::from_count(r.rows_affected()))
    }

    /// Records `key` and runs `effect` in ONE transaction: a savepoint of the caller's
    /// transaction (`&mut *tx`), or a transaction of its own on a bare connection. If `effect`
    /// fails, neither the record nor the effect stays, the error is returned and the caller's
    /// transaction remains usable.
    pub async fn process_sqlx<T, E, F>(
        &self,
        conn: &mut PgConnection,
        key: &DedupKey,
        effect: F,
    ) -> Result<Outcome<T>, E>
    where
        F: AsyncFnOnce(&mut PgConnection) -> Result<T, E>,
        E: From<Error>,
    {
        let mut sp = conn.begin().await.map_err(map_err)?;
        match self.record_sqlx(&mut sp, key).await? {
            Recorded::Duplicate => {
                sp.commit().await.map_err(map_err)?;
                Ok(Outcome::Duplicate)
            }
            Recorded::First => match effect(&mut sp).await {
                Ok(v) => {
                    sp.commit().await.map_err(map_err)?;
                    Ok(Outcome::Processed(v))
                }
                Err(e) => {
                    sp.rollback().await.map_err(map_err)?;
                    Err(e)
                }
            },
        }
    }
}
