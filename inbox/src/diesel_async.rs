//! diesel-async driver (kept apart from the sync one: two `RunQueryDsl` traits in scope clash).

use diesel::pg::Pg;
use diesel::sql_types::{Nullable, Text, Uuid};
use diesel_async::{AsyncConnection, RunQueryDsl};

use crate::{from_diesel, DedupKey, Error, Inbox, Recorded, RECORD_KEY};

impl Inbox {
    /// Records `key` inside the caller's open diesel-async transaction; run the effect only on
    /// [`Recorded::First`], in the same transaction:
    ///
    /// ```text
    /// conn.transaction(async |conn| {
    ///     if inbox.record_async(conn, &key).await? == Recorded::First {
    ///         issue_card(conn, &payment).await?;
    ///     }
    ///     Ok::<_, MyError>(())
    /// }).await?;
    /// ```
    pub async fn record_async<C>(&self, conn: &mut C, key: &DedupKey) -> Result<Recorded, Error>
    where
        C: AsyncConnection<Backend = Pg>,
    {
        let (consumer, k, mid) = self.params(key)?;
        let n = diesel::sql_query(RECORD_KEY)
            .bind::<Text, _>(consumer)
            .bind::<Text, _>(k)
            .bind::<Nullable<Uuid>, _>(mid)
            .execute(conn)
            .await
            .map_err(from_diesel)?;
        Ok(Recorded::from_count(n as u64))
    }
}
