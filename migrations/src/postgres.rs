//! Apply Tidings migrations over a tokio-postgres [`Client`](tokio_postgres::Client)
//! (a deadpool-postgres object derefs to one). Each migration runs in its own transaction under
//! an advisory lock, together with its ledger row.

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::plan::{self, Applied, Migration};
use crate::{Error, Result, Status};

fn db(e: tokio_postgres::Error) -> Error {
    Error::Database(Box::new(e))
}

/// Unnamed statements (`query_typed`): one round trip each, and safe through PgBouncer in
/// transaction mode, where the relay checks the schema at start-up.
async fn read_ledger(client: &impl tokio_postgres::GenericClient) -> Result<Vec<Applied>> {
    let present: bool = client
        .query_typed_one(plan::LEDGER_EXISTS, &[])
        .await
        .map_err(db)?
        .get(0);
    if !present {
        return Ok(Vec::new());
    }
    let rows = client
        .query_typed(plan::LEDGER_SELECT, &[])
        .await
        .map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| Applied {
            version: r.get(0),
            checksum: r.get(1),
            applied_at: r.get(2),
        })
        .collect())
}

/// Reads the state of every migration without changing anything.
pub async fn status(client: &Client) -> Result<Status> {
    Ok(Status::new(&read_ledger(client).await?))
}

/// Fails with [`Error::Pending`] (naming `tidings migrate up`) unless the schema is current.
pub async fn ensure_current(client: &Client) -> Result<()> {
    status(client).await?.ensure_current()
}

/// Applies every pending migration, oldest first; returns those it applied (none when current).
/// Safe to call from several processes at once.
pub async fn up(client: &mut Client) -> Result<Vec<&'static Migration>> {
    let mut done = Vec::new();
    while let Some(m) = step(client, true).await? {
        done.push(m);
    }
    Ok(done)
}

/// Reverts the newest `steps` applied migrations; returns those it reverted.
pub async fn down(client: &mut Client, steps: usize) -> Result<Vec<&'static Migration>> {
    let mut done = Vec::new();
    for _ in 0..steps {
        match step(client, false).await? {
            Some(m) => done.push(m),
            None => break,
        }
    }
    Ok(done)
}

/// One transaction: lock, re-read the ledger (another process may have moved it), apply or
/// revert one migration and record it.
async fn step(client: &mut Client, forward: bool) -> Result<Option<&'static Migration>> {
    let tx = client.transaction().await.map_err(db)?;
    tx.batch_execute(&plan::bootstrap_sql()).await.map_err(db)?;
    let applied = read_ledger(&tx).await?;
    let next = if forward {
        plan::next_up(&applied)?
    } else {
        plan::next_down(&applied)?
    };
    let Some(m) = next else {
        return Ok(None);
    };
    let failed = |e: tokio_postgres::Error| Error::Migration {
        version: m.version,
        name: m.name,
        source: Box::new(e),
    };
    if forward {
        tx.batch_execute(m.up).await.map_err(failed)?;
        let sum = m.checksum();
        tx.query_typed(
            plan::LEDGER_INSERT,
            &[
                (&m.version, Type::TEXT),
                (&m.name, Type::TEXT),
                (&sum, Type::TEXT),
            ],
        )
        .await
        .map_err(db)?;
    } else {
        tx.batch_execute(m.down).await.map_err(failed)?;
        tx.query_typed(plan::LEDGER_DELETE, &[(&m.version, Type::TEXT)])
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    Ok(Some(m))
}
