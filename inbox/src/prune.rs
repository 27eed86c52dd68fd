//! Inbox retention: delete old records in small batches.

use std::time::Duration;

use tokio_postgres::Client;

use crate::postgres::map_err;
use crate::Error;

/// prune_inbox: delete up to $3 records older than $2 seconds, of consumer $1 (NULL = all).
/// Each call is one short statement in its own transaction (autocommit), oldest first through
/// inbox_processed_at_idx, so it never holds locks on many rows or for long.
pub const PRUNE: &str = "\
DELETE FROM tidings.inbox WHERE ctid IN (
    SELECT ctid FROM tidings.inbox
     WHERE processed_at < now() - $2 * interval '1 second'
       AND ($1::text IS NULL OR consumer = $1)
     ORDER BY processed_at
     LIMIT $3)";

/// Deletes inbox records older than `older_than` (of one consumer, or all), `batch` rows per
/// statement, until none are left; returns how many it deleted.
///
/// Keep records longer than any redelivery can arrive: the broker's redelivery horizon (JetStream:
/// ack wait x max deliveries, plus backoff), and any replay of dead letters or of the stream.
/// A record pruned too early lets a late redelivery run its effect again.
pub async fn prune(
    client: &Client,
    consumer: Option<&str>,
    older_than: Duration,
    batch: i64,
) -> Result<u64, Error> {
    let secs = older_than.as_secs_f64();
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let n = client
            .execute(PRUNE, &[&consumer, &secs, &batch])
            .await
            .map_err(map_err)?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}
