//! Apply Tidings migrations over the synchronous `postgres` crate's
//! [`Client`](postgres::Client). Each migration runs in its own transaction under an advisory
//! lock, together with its ledger row. Blocks the thread: never call it on an async runtime's
//! thread.

use postgres::types::Type;
use postgres::Client;

use crate::plan::{self, Applied, Migration};
use crate::{Error, Result, Status};

fn db(e: postgres::Error) -> Error {
    Error::Database(Box::new(e))
}

fn read_ledger(client: &mut impl postgres::GenericClient) -> Result<Vec<Applied>> {
    let present: bool = client
        .query_typed(plan::LEDGER_EXISTS, &[])
        .map_err(db)?
        .first()
        .map(|r| r.get(0))
        .unwrap_or(false);
    if !present {
        return Ok(Vec::new());
    }
    let rows = client.query_typed(plan::LEDGER_SELECT, &[]).map_err(db)?;
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
pub fn status(client: &mut Client) -> Result<Status> {
    Ok(Status::new(&read_ledger(client)?))
}

/// Fails with [`Error::Pending`] (naming `tidings migrate up`) unless the schema is current.
pub fn ensure_current(client: &mut Client) -> Result<()> {
    status(client)?.ensure_current()
}

/// Applies every pending migration, oldest first; returns those it applied (none when current).
/// Safe to call from several processes at once.
pub fn up(client: &mut Client) -> Result<Vec<&'static Migration>> {
    let mut done = Vec::new();
    while let Some(m) = step(client, true)? {
        done.push(m);
    }
    Ok(done)
}

/// Reverts the newest `steps` applied migrations; returns those it reverted.
pub fn down(client: &mut Client, steps: usize) -> Result<Vec<&'static Migration>> {
    let mut done = Vec::new();
    for _ in 0..steps {
        match step(client, false)? {
            Some(m) => done.push(m),
            None => break,
        }
    }
    Ok(done)
}

fn step(client: &mut Client, forward: bool) -> Result<Option<&'static Migration>> {
    let mut tx = client.transaction().map_err(db)?;
    tx.batch_execute(&plan::bootstrap_sql()).map_err(db)?;
    let applied = read_ledger(&mut tx)?;
    let next = if forward {
        plan::next_up(&applied)?
    } else {
        plan::next_down(&applied)?
    };
    let Some(m) = next else {
        return Ok(None);
    };
    let failed = |e: postgres::Error| Error::Migration {
        version: m.version,
        name: m.name,
        source: Box::new(e),
    };
    if forward {
        tx.batch_execute(m.up).map_err(failed)?;
        let sum = m.checksum();
        tx.query_typed(
            plan::LEDGER_INSERT,
            &[
                (&m.version, Type::TEXT),
                (&m.name, Type::TEXT),
                (&sum, Type::TEXT),
            ],
        )
        .map_err(db)?;
    } else {
        tx.batch_execute(m.down).map_err(failed)?;
        tx.query_typed(plan::LEDGER_DELETE, &[(&m.version, Type::TEXT)])
            .map_err(db)?;
    }
    tx.commit().map_err(db)?;
    Ok(Some(m))
}
