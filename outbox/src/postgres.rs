//! tokio-postgres driver (also deadpool-postgres, whose objects deref to tokio-postgres types).

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;

use crate::sql::{Columns, INSERT_MESSAGE, INSERT_MESSAGES};
use crate::{Error, Message, MessageId, Outbox};

pub(crate) fn map_err(e: tokio_postgres::Error) -> Error {
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

/// The typed parameters of `INSERT_MESSAGE` for the one message of `c` (shared with the sync
/// `postgres` driver, whose types are tokio-postgres').
pub(crate) fn one_params(c: &Columns) -> [(&(dyn ToSql + Sync), Type); 8] {
    [
        (&c.ids[0], Type::UUID),
        (&c.topics[0], Type::TEXT),
        (&c.keys[0], Type::TEXT),
        (&c.biz_ids[0], Type::TEXT),
        (&c.payloads[0], Type::BYTEA),
        (&c.headers[0], Type::JSONB),
        (&c.deliver_at[0], Type::TIMESTAMPTZ),
        (&c.delays[0], Type::FLOAT8),
    ]
}

/// The typed parameters of `INSERT_MESSAGES` for the batch `c`.
pub(crate) fn batch_params(c: &Columns) -> [(&(dyn ToSql + Sync), Type); 8] {
    [
        (&c.ids, Type::UUID_ARRAY),
        (&c.topics, Type::TEXT_ARRAY),
        (&c.keys, Type::TEXT_ARRAY),
        (&c.biz_ids, Type::TEXT_ARRAY),
        (&c.payloads, Type::BYTEA_ARRAY),
        (&c.headers, Type::JSONB_ARRAY),
        (&c.deliver_at, Type::TIMESTAMPTZ_ARRAY),
        (&c.delays, Type::FLOAT8_ARRAY),
    ]
}

#[cfg(feature = "deadpool-postgres")]
/// The parameter types of `INSERT_MESSAGE`, for statements prepared once and cached.
pub(crate) const ONE_TYPES: [Type; 8] = [
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::BYTEA,
    Type::JSONB,
    Type::TIMESTAMPTZ,
    Type::FLOAT8,
];

#[cfg(feature = "deadpool-postgres")]
/// The parameter types of `INSERT_MESSAGES`, for statements prepared once and cached.
pub(crate) const BATCH_TYPES: [Type; 8] = [
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::JSONB_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::FLOAT8_ARRAY,
];

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        map_err(e)
    }
}

impl Outbox {
    /// Writes one message through a tokio-postgres `Transaction` (or `Client`, which then
    /// commits it on its own); returns its id. With deadpool-postgres pass `&*tx` or `&**client`.
    pub async fn enqueue_pg<C>(&self, client: &C, msg: &Message) -> Result<MessageId, Error>
    where
        C: GenericClient + Sync,
    {
        let ids = self
            .enqueue_batch_pg(client, std::slice::from_ref(msg))
            .await?;
        Ok(ids[0])
    }

    /// Writes a batch of messages in ONE statement and one round trip (typed parameters, no
    /// separate prepare); returns their ids in order. Every message is checked first.
    pub async fn enqueue_batch_pg<C>(
        &self,
        client: &C,
        msgs: &[Message],
    ) -> Result<Vec<MessageId>, Error>
    where
        C: GenericClient + Sync,
    {
        let (c, ids) = Columns::build(&self.config, msgs)?;
        if ids.is_empty() {
            return Ok(ids);
        }
        if ids.len() == 1 {
            client
                .query_typed(INSERT_MESSAGE, &one_params(&c))
                .await
                .map_err(map_err)?;
            return Ok(ids);
        }
        client
            .query_typed(INSERT_MESSAGES, &batch_params(&c))
            .await
            .map_err(map_err)?;
        Ok(ids)
    }
}

#[cfg(feature = "deadpool-postgres")]
impl Outbox {
    /// Like [`Outbox::enqueue_pg`], for deadpool-postgres clients and transactions: the
    /// statement is prepared once per pooled connection and cached there, so PostgreSQL neither
    /// parses nor plans it again (measurably faster for producers; see the README).
    pub async fn enqueue_deadpool<C>(&self, client: &C, msg: &Message) -> Result<MessageId, Error>
    where
        C: deadpool_postgres::GenericClient + Sync,
    {
        let ids = self
            .enqueue_batch_deadpool(client, std::slice::from_ref(msg))
            .await?;
        Ok(ids[0])
    }

    /// Like [`Outbox::enqueue_batch_pg`], with the statement cached per pooled connection.
    /// Refused when `OutboxConfig::statement_cache` is off (PgBouncer in transaction mode).
    pub async fn enqueue_batch_deadpool<C>(
        &self,
        client: &C,
        msgs: &[Message],
    ) -> Result<Vec<MessageId>, Error>
    where
        C: deadpool_postgres::GenericClient + Sync,
    {
        // deadpool's GenericClient has no unnamed-statement call to fall back on, and an
        // uncached named statement is no safer through a transaction pooler (its name can
        // collide on the server connection another client gets next): refuse, naming the
        // method that works.
        if !self.config.statement_cache {
            return Err(Error::Config(
                "statement_cache is off: enqueue_deadpool caches prepared statements; use enqueue_pg (pass &*tx or &**client)",
            ));
        }
        let (c, ids) = Columns::build(&self.config, msgs)?;
        if ids.is_empty() {
            return Ok(ids);
        }
        if ids.len() == 1 {
            let stmt = client
                .prepare_typed_cached(INSERT_MESSAGE, &ONE_TYPES)
                .await
                .map_err(map_err)?;
            client
                .execute(
                    &stmt,
                    &[
                        &c.ids[0],
                        &c.topics[0],
                        &c.keys[0],
                        &c.biz_ids[0],
                        &c.payloads[0],
                        &c.headers[0],
                        &c.deliver_at[0],
                        &c.delays[0],
                    ],
                )
                .await
                .map_err(map_err)?;
        } else {
            let stmt = client
                .prepare_typed_cached(INSERT_MESSAGES, &BATCH_TYPES)
                .await
                .map_err(map_err)?;
            client
                .execute(
                    &stmt,
                    &[
                        &c.ids,
                        &c.topics,
                        &c.keys,
                        &c.biz_ids,
                        &c.payloads,
                        &c.headers,
                        &c.deliver_at,
                        &c.delays,
                    ],
                )
                .await
                .map_err(map_err)?;
        }
        Ok(ids)
    }
}
