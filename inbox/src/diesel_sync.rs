//! Sync diesel driver (kept apart from diesel-async: two `RunQueryDsl` traits in scope clash).

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text, Uuid};

use crate::{from_diesel, DedupKey, Error, Inbox, Outcome, Recorded, RECORD_KEY};

impl Inbox {
    /// Records `key` inside the caller's open transaction; run the effect only on
    /// [`Recorded::First`]. If the transaction rolls back, the record goes with it.
    pub fn record<C>(&self, conn: &mut C, key: &DedupKey) -> Result<Recorded, Error>
    where
        C: Connection<Backend = Pg>,
    {
        let (consumer, k, mid) = self.params(key)?;
        let n = diesel::sql_query(RECORD_KEY)
            .bind::<Text, _>(consumer)
            .bind::<Text, _>(k)
            .bind::<Nullable<Uuid>, _>(mid)
            .execute(conn)
            .map_err(from_diesel)?;
        Ok(Recorded::from_count(n as u64))
    }

    /// Records `key` and runs `effect` in ONE transaction: the caller's (as a savepoint) when
    /// called inside one, else a transaction of its own. If `effect` fails, neither the record
    /// nor the effect is committed and the message can be retried.
    pub fn process<C, T, E, F>(
        &self,
        conn: &mut C,
        key: &DedupKey,
        effect: F,
    ) -> Result<Outcome<T>, E>
    where
        C: Connection<Backend = Pg>,
        F: FnOnce(&mut C) -> Result<T, E>,
        E: From<Error> + From<diesel::result::Error>,
    {
        conn.transaction(|conn| match self.record(conn, key)? {
            Recorded::Duplicate => Ok(Outcome::Duplicate),
            Recorded::First => effect(conn).map(Outcome::Processed),
        })
    }
}
