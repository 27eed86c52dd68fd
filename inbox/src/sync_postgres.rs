//! The synchronous `postgres` crate: record a key and run the effect in one transaction. Its
//! calls block the thread: never call them on an async runtime's thread.

use postgres::{GenericClient, Transaction};

use crate::postgres::map_err;
use crate::{DedupKey, Error, Inbox, Outcome, Recorded, RECORD_KEY};

impl Inbox {
    /// Records `key` inside the caller's open transaction; run the effect only on
    /// [`Recorded::First`]. If the transaction rolls back, the record goes with it.
    pub fn record_sync<C>(&self, tx: &mut C, key: &DedupKey) -> Result<Recorded, Error>
    where
        C: GenericClient,
    {
        let (consumer, k, mid) = self.params(key)?;
        let n = tx
            .execute(RECORD_KEY, &[&consumer, &k, &mid])
            .map_err(map_err)?;
        Ok(Recorded::from_count(n))
    }

    /// Records `key` and runs `effect` in ONE transaction: a savepoint of the caller's `tx`.
    /// If `effect` fails, the savepoint is rolled back (neither the record nor the effect
    /// stays) and the error returned; the caller's transaction remains usable.
    pub fn process_sync<T, E, F>(
        &self,
        tx: &mut Transaction<'_>,
        key: &DedupKey,
        effect: F,
    ) -> Result<Outcome<T>, E>
    where
        F: FnOnce(&mut Transaction<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let mut sp = tx.savepoint("tidings_inbox").map_err(map_err)?;
        match self.record_sync(&mut sp, key)? {
            Recorded::Duplicate => {
                sp.commit().map_err(map_err)?;
                Ok(Outcome::Duplicate)
            }
            Recorded::First => match effect(&mut sp) {
                Ok(v) => {
                    sp.commit().map_err(map_err)?;
                    Ok(Outcome::Processed(v))
                }
                Err(e) => {
                    sp.rollback().map_err(map_err)?;
                    Err(e)
                }
            },
        }
    }
}
