//! The synchronous `postgres` crate (rust-postgres' blocking client): enqueue on a
//! `postgres::Transaction` or `postgres::Client`, the same statements, checks and errors as the
//! other drivers. Its calls block the thread: never call them on an async runtime's thread.

use postgres::GenericClient;

use crate::postgres::{batch_params, map_err, one_params};
use crate::sql::{Columns, INSERT_MESSAGE, INSERT_MESSAGES};
use crate::{Error, Message, MessageId, Outbox};

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
            client
                .query_typed(INSERT_MESSAGE, &one_params(&c))
                .map_err(map_err)?;
        } else {
            client
                .query_typed(INSERT_MESSAGES, &batch_params(&c))
                .map_err(map_err)?;
        }
        Ok(ids)
    }
}
