//! diesel-async driver. Kept apart from the sync one: both `RunQueryDsl` traits in one scope
//! make `execute` ambiguous.

use diesel::pg::Pg;
use diesel::sql_types::{Array, Bytea, Double, Jsonb, Nullable, Text, Timestamptz, Uuid};
use diesel_async::{AsyncConnection, RunQueryDsl};

use crate::sql::{looks_unmigrated, Columns, INSERT_MESSAGE, INSERT_MESSAGES};
use crate::{Error, Message, MessageId, Outbox};

fn map_err(e: diesel::result::Error) -> Error {
    if looks_unmigrated(&e.to_string()) {
        Error::NotMigrated(Box::new(e))
    } else {
        Error::Database(Box::new(e))
    }
}

impl Outbox {
    /// Writes one message in the caller's transaction over diesel-async; returns its id.
    ///
    /// Works with `AsyncPgConnection` and with its deadpool pooled object (`&mut *obj`).
    pub async fn enqueue_async<C>(&self, conn: &mut C, msg: &Message) -> Result<MessageId, Error>
    where
        C: AsyncConnection<Backend = Pg>,
    {
        let ids = self
            .enqueue_batch_async(conn, std::slice::from_ref(msg))
            .await?;
        Ok(ids[0])
    }

    /// Writes a batch of messages in ONE statement; returns their ids in order.
    /// Every message is checked before anything is written.
    pub async fn enqueue_batch_async<C>(
        &self,
        conn: &mut C,
        msgs: &[Message],
    ) -> Result<Vec<MessageId>, Error>
    where
        C: AsyncConnection<Backend = Pg>,
    {
        let (cols, ids) = Columns::build(&self.config, msgs)?;
        if ids.is_empty() {
            return Ok(ids);
        }
        if ids.len() == 1 {
            let mut c = cols;
            diesel::sql_query(INSERT_MESSAGE)
                .bind::<Uuid, _>(c.ids[0])
                .bind::<Text, _>(c.topics.swap_remove(0))
                .bind::<Nullable<Text>, _>(c.keys.swap_remove(0))
                .bind::<Nullable<Text>, _>(c.biz_ids.swap_remove(0))
                .bind::<Bytea, _>(c.payloads.swap_remove(0))
                .bind::<Jsonb, _>(c.headers.swap_remove(0))
                .bind::<Nullable<Timestamptz>, _>(c.deliver_at[0])
                .bind::<Double, _>(c.delays[0])
                .execute(conn)
                .await
                .map_err(map_err)?;
            return Ok(ids);
        }
        diesel::sql_query(INSERT_MESSAGES)
            .bind::<Array<Uuid>, _>(cols.ids)
            .bind::<Array<Text>, _>(cols.topics)
            .bind::<Array<Nullable<Text>>, _>(cols.keys)
            .bind::<Array<Nullable<Text>>, _>(cols.biz_ids)
            .bind::<Array<Bytea>, _>(cols.payloads)
            .bind::<Array<Jsonb>, _>(cols.headers)
            .bind::<Array<Nullable<Timestamptz>>, _>(cols.deliver_at)
            .bind::<Array<Double>, _>(cols.delays)
            .execute(conn)
            .await
            .map_err(map_err)?;
        Ok(ids)
    }
}
