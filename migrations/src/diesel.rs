//! Apply Tidings migrations over a sync diesel [`PgConnection`](diesel::PgConnection) (or any
//! connection with the Pg backend, such as an r2d2 pooled one). Same protocol as
//! [`crate::postgres`]: one transaction per migration, under an advisory lock.

use chrono::{DateTime, Utc};
use diesel::connection::LoadConnection;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Text, Timestamptz};

use crate::plan::{self, Applied, Migration};
use crate::{Error, Result, Status};

fn db(e: diesel::result::Error) -> Error {
    Error::Database(Box::new(e))
}

#[derive(QueryableByName)]
struct Present {
    #[diesel(sql_type = Bool)]
    present: bool,
}

#[derive(QueryableByName)]
struct LedgerRow {
    #[diesel(sql_type = Text)]
    version: String,
    #[diesel(sql_type = Text)]
    checksum: String,
    #[diesel(sql_type = Timestamptz)]
    applied_at: DateTime<Utc>,
}

fn read_ledger<C: LoadConnection<Backend = Pg>>(conn: &mut C) -> Result<Vec<Applied>> {
    let present = diesel::sql_query(plan::LEDGER_EXISTS)
        .get_result::<Present>(conn)
        .map_err(db)?
        .present;
    if !present {
        return Ok(Vec::new());
    }
    Ok(diesel::sql_query(plan::LEDGER_SELECT)
        .load::<LedgerRow>(conn)
        .map_err(db)?
        .into_iter()
        .map(|r| Applied {
            version: r.version,
            checksum: r.checksum,
            applied_at: r.applied_at,
        })
        .collect())
}

/// Reads the state of every migration without changing anything.
pub fn status<C: LoadConnection<Backend = Pg>>(conn: &mut C) -> Result<Status> {
    Ok(Status::new(&read_ledger(conn)?))
}

/// Fails with [`Error::Pending`] (naming `tidings migrate up`) unless the schema is current.
pub fn ensure_current<C: LoadConnection<Backend = Pg>>(conn: &mut C) -> Result<()> {
    status(conn)?.ensure_current()
}

/// Applies every pending migration, oldest first; returns those it applied.
/// Safe to call from several processes at once.
pub fn up<C: LoadConnection<Backend = Pg>>(conn: &mut C) -> Result<Vec<&'static Migration>> {
    let mut done = Vec::new();
    while let Some(m) = step(conn, true)? {
        done.push(m);
    }
    Ok(done)
}

/// Reverts the newest `steps` applied migrations; returns those it reverted.
pub fn down<C: LoadConnection<Backend = Pg>>(
    conn: &mut C,
    steps: usize,
) -> Result<Vec<&'static Migration>> {
    let mut done = Vec::new();
    for _ in 0..steps {
        match step(conn, false)? {
            Some(m) => done.push(m),
            None => break,
        }
    }
    Ok(done)
}

fn step<C: LoadConnection<Backend = Pg>>(
    conn: &mut C,
    forward: bool,
) -> Result<Option<&'static Migration>> {
    conn.transaction::<_, Error, _>(|conn| {
        conn.batch_execute(&plan::bootstrap_sql()).map_err(db)?;
        let applied = read_ledger(conn)?;
        let next = if forward {
            plan::next_up(&applied)?
        } else {
            plan::next_down(&applied)?
        };
        let Some(m) = next else {
            return Ok(None);
        };
        let failed = |e: diesel::result::Error| Error::Migration {
            version: m.version,
            name: m.name,
            source: Box::new(e),
        };
        if forward {
            conn.batch_execute(m.up).map_err(failed)?;
            diesel::sql_query(plan::LEDGER_INSERT)
                .bind::<Text, _>(m.version)
                .bind::<Text, _>(m.name)
                .bind::<Text, _>(m.checksum())
                .execute(conn)
                .map_err(db)?;
        } else {
            conn.batch_execute(m.down).map_err(failed)?;
            diesel::sql_query(plan::LEDGER_DELETE)
                .bind::<Text, _>(m.version)
                .execute(conn)
                .map_err(db)?;
        }
        Ok(Some(m))
    })
}

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        db(e)
    }
}
