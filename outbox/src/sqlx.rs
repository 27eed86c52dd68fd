//! sqlx (0.8, PostgreSQL): enqueue on a `&mut PgConnection`, which a
//! `sqlx::Transaction<'_, Postgres>` derefs to (`&mut *tx`), or a pooled connection. The same
//! statements, checks and errors as the other drivers. With `OutboxConfig::statement_cache`
//! off (PgBouncer in transaction mode) the statements are not kept prepared on the connection.

use sqlx::postgres::PgConnection;

use crate::sql::{Columns, INSERT_MESSAGE, INSERT_MESSAGES};
use crate::{Error, Message, MessageId, Outbox};

pub(crate) fn map_err(e: sqlx::Error) -> Error {
    let unmigrated = matches!(&e, sqlx::Error::Database(d)
        if matches!(d.code().as_deref(), Some("42P01" | "3F000" | "42883")));
    if unmigrated {
        Error::NotMigrated(Box::new(e))
    } else {
        Error::Database(Box::new(e))
    }
}

impl Outbox {
    /// Writes one message on a sqlx PostgreSQL connection: pass `&mut *tx` to write it in the
    /// caller's transaction (a bare connection commits it on its own); returns its id.
    pub async fn enqueue_sqlx(
        &self,
        conn: &mut PgConnection,
        msg: &Message,
    ) -> Result<MessageId, Error> {
        let ids = self
            .enqueue_batch_sqlx(conn, std::slice::from_ref(msg))
            .await?;
        Ok(ids[0])
    }

    /// Writes a batch of messages in ONE statement and one round trip; returns their ids in
    /// order. Every message is checked first (nothing is written if one is bad).
    pub async fn enqueue_batch_sqlx(
        &self,
        conn: &mut PgConnection,
        msgs: &[Message],
    ) -> Result<Vec<MessageId>, Error> {
        let (c, ids) = Columns::build(&self.config, msgs)?;
        if ids.is_empty() {
            return Ok(ids);
        }
        let persistent = self.config.statement_cache;
        if ids.len() == 1 {
            let mut c = c;
            sqlx::query(INSERT_MESSAGE)
                .persistent(persistent)
                .bind(c.ids[0])
                .bind(c.topics.swap_remove(0))
                .bind(c.keys.swap_remove(0))
                .bind(c.biz_ids.swap_remove(0))
                .bind(c.payloads.swap_remove(0))
                .bind(c.headers.swap_remove(0))
                .bind(c.deliver_at[0])
                .bind(c.delays[0])
                .execute(&mut *conn)
                .await
                .map_err(map_err)?;
            return Ok(ids);
        }
        sqlx::query(INSERT_MESSAGES)
            .persistent(persistent)
            .bind(c.ids)
            .bind(c.topics)
            .bind(c.keys)
            .bind(c.biz_ids)
            .bind(c.payloads)
            .bind(c.headers)
            .bind(c.deliver_at)
            .bind(c.delays)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        Ok(ids)
    }
}
