//! tokio-postgres driver (deadpool-postgres objects deref to these types).

use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, Transaction};

use crate::{DedupKey, Error, Inbox, Outcome, Recorded, RECORD_KEY};

pub(crate) fn map_err(e: tokio_postgres::Error) -> Error {
    match e.code() {
        Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME => {
            Error::NotMigrated(Box::new(e))
        }
        _ => Error::Database(Box::new(e)),
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        map_err(e)
    }
}

impl Inbox {
    /// Records `key` inside the caller's open transaction; run the effect only on
    /// [`Recorded::First`]. If the transaction rolls back, the record goes with it.
    pub async fn record_pg<C>(&self, tx: &C, key: &DedupKey) -> Result<Recorded, Error>
    where
        C: GenericClient + Sync,
    {
        let (consumer, k, mid) = self.params(key)?;
        let n = tx
            .execute(RECORD_KEY, &[&consumer, &k, &mid])
            .await
            .map_err(map_err)?;
        Ok(Recorded::from_count(n))
    }

    /// Records `key` and runs `effect` in ONE transaction: a savepoint of the caller's `tx`.
    /// If `effect` fails, the savepoint is rolled back (neither the record nor the effect stays)
    /// and the error returned; the caller's transaction remains usable.
    pub async fn process_pg<T, E, F>(
        &self,
        tx: &mut Transaction<'_>,
        key: &DedupKey,
        effect: F,
    ) -> Result<Outcome<T>, E>
    where
        F: AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let sp = tx.savepoint("tidings_inbox").await.map_err(map_err)?;
        match self.record_pg(&sp, key).await? {
            Recorded::Duplicate => {
                sp.commit().await.map_err(map_err)?;
                Ok(Outcome::Duplicate)
            }
            Recorded::First => match effect(&sp).await {
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
