//! Apply Tidings migrations over a sqlx (0.8) [`PgConnection`](sqlx::PgConnection). Each
//! migration runs in its own transaction under an advisory lock, together with its ledger row.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use crate::plan::{self, Applied, Migration};
use crate::{Error, Result, Status};

fn db(e: sqlx::Error) -> Error {
    Error::Database(Box::new(e))
}

async fn read_ledger(conn: &mut PgConnection) -> Result<Vec<Applied>> {
    let present: bool = sqlx::query(plan::LEDGER_EXISTS)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?
        .try_get(0)
        .map_err(db)?;
    if !present {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(plan::LEDGER_SELECT)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
    rows.iter()
        .map(|r| {
            Ok(Applied {
                version: r.try_get(0).map_err(db)?,
                checksum: r.try_get(1).map_err(db)?,
                applied_at: r.try_get(2).map_err(db)?,
            })
        })
        .collect()
}

/// Reads the state of every migration without changing anything.
pub async fn status(conn: &mut PgConnection) -> Result<Status> {
    Ok(Status::new(&read_ledger(conn).await?))
}

/// Fails with [`Error::Pending`] (naming `tidings migrate up`) unless the schema is current.
pub async fn ensure_current(conn: &mut PgConnection) -> Result<()> {
    status(conn).await?.ensure_current()
}

/// Applies every pending migration, oldest first; returns those it applied (none when current).
/// Safe to call from several processes at once.
pub async fn up(conn: &mut PgConnection) -> Result<Vec<&'static Migration>> {
    let mut done = Vec::new();
    while let Some(m) = step(conn, true).await? {
        done.push(m);
    }
    Ok(done)
}

/// Reverts the newest `steps` applied migrations; returns those it reverted.
pub async fn down(conn: &mut PgConnection, steps: usize) -> Result<Vec<&'static Migration>> {
    let mut done = Vec::new();
    for _ in 0..steps {
        match step(conn, false).await? {
            Some(m) => done.push(m),
            None => break,
        }
    }
    Ok(done)
}

async fn step(conn: &mut PgConnection, forward: bool) -> Result<Option<&'static Migration>> {
    let mut tx = conn.begin().await.map_err(db)?;
    sqlx::raw_sql(&plan::bootstrap_sql())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let applied = read_ledger(&mut tx).await?;
    let next = if forward {
        plan::next_up(&applied)?
    } else {
        plan::next_down(&applied)?
    };
    let Some(m) = next else {
        return Ok(None);
    };
    let failed = |e: sqlx::Error| Error::Migration {
        version: m.version,
        name: m.name,
        source: Box::new(e),
    };
    if forward {
        sqlx::raw_sql(m.up)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query(plan::LEDGER_INSERT)
            .bind(m.version)
            .bind(m.name)
            .bind(m.checksum())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    } else {
        sqlx::raw_sql(m.down)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        sqlx::query(plan::LEDGER_DELETE)
            .bind(m.version)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    Ok(Some(m))
}
