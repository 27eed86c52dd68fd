//! The synchronous `postgres` crate (rust-postgres' blocking client): enqueue on a
//! `postgres::Transaction` or `postgres::Client`, the same statements, checks and errors as the
//! other drivers. Its calls block the thread: never call them on an async runtime's thread.

use postgres::types::{ToSql, Type};
use postgres::GenericClient;

use crate::sql::{Columns, INSERT_MESSAGE, INSERT_MESSAGES};
use crate::{Error, Message, MessageId, Outbox};

fn map_err(e: postgres::Error) -> Error {
    use postgres::error::SqlState;
    match e.code() {
        Some(c)
            if *c == SqlState::UNDEFINED_TABLE
                || *c == SqlState::INVALID_SCHEMA_NAME
                || *c == SqlState::UNDEFINED_FUNCTION =>
        {
            Error::NotMigrated(Box::new(e))
        }
        _ => Error::Database(Box::new(e)),
    }
}

impl Outbox {
    /// Writes one message through a sync `postgres` transaction (or client, which then commits
    /// it on its own); returns its id.
    pub fn enqueue_sync<C>(&self, client: &mut C, msg: &Message) -> Result<MessageId, Error>
    where
        C: GenericClient,
    {
        let ids = self.enqueue_batch_sync(client, std::slice::from_ref(msg))?;
        Ok(ids[0])
    }

    /// Writes a batch of messages in ONE statement and one round trip; returns their ids in
    /// order. Every message is checked first (nothing is written if one is bad).
    pub fn enqueue_batch_sync<C>(
        &self,
        client: &mut C,
        msgs: &[Message],
    ) -> Result<Vec<MessageId>, Error>
    where
        C: GenericClient,
    {
        let (c, ids) = Columns::build(&self.config, msgs)?;
        if ids.is_empty() {
            return Ok(ids);
        }
        if ids.len() == 1 {
            let params: [(&(dyn ToSql + Sync), Type); 8] = [
                (&c.ids[0], Type::UUID),
                (&c.topics[0], Type::TEXT),
                (&c.keys[0], Type::TEXT),
                (&c.biz_ids[0], Type::TEXT),
                (&c.payloads[0], Type::BYTEA),
                (&c.headers[0], Type::JSONB),
                (&c.deliver_at[0], Type::TIMESTAMPTZ),
                (&c.delays[0], Type::FLOAT8),
            ];
            client
                .query_typed(INSERT_MESSAGE, &params)
                .map_err(map_err)?;
            return Ok(ids);
        }
        let params: [(&(dyn ToSql + Sync), Type); 8] = [
            (&c.ids, Type::UUID_ARRAY),
            (&c.topics, Type::TEXT_ARRAY),
            (&c.keys, Type::TEXT_ARRAY),
            (&c.biz_ids, Type::TEXT_ARRAY),
            (&c.payloads, Type::BYTEA_ARRAY),
            (&c.headers, Type::JSONB_ARRAY),
            (&c.deliver_at, Type::TIMESTAMPTZ_ARRAY),
            (&c.delays, Type::FLOAT8_ARRAY),
        ];
        client
            .query_typed(INSERT_MESSAGES, &params)
            .map_err(map_err)?;
        Ok(ids)
    }
}
