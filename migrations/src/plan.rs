//! Driver-independent part of the runner: the embedded list, the ledger SQL and the decision of
//! what to run next. The drivers (`postgres`, `diesel`) only do the I/O.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// One embedded migration: diesel's `VERSION_name/{up,down}.sql` layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Digits of the folder's version prefix, e.g. `20261127000001`.
    pub version: &'static str,
    /// The folder name after the version, e.g. `tidings_core`.
    pub name: &'static str,
    /// SQL that applies it.
    pub up: &'static str,
    /// SQL that reverts it.
    pub down: &'static str,
}

impl Migration {
    /// Hex SHA-256 of `up`, stored in the ledger to detect edited migrations.
    pub fn checksum(&self) -> String {
        Sha256::digest(self.up.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

pub(crate) const MIGRATIONS: &[Migration] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// A row of Tidings' own ledger, `tidings.schema_migrations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Version applied.
    pub version: String,
    /// Checksum of its `up.sql` when it was applied.
    pub checksum: String,
    /// When it was applied.
    pub applied_at: DateTime<Utc>,
}

/// Where one embedded migration stands in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// Not applied yet.
    Pending,
    /// Applied, with the same SQL as this build.
    Applied(DateTime<Utc>),
    /// Applied, but from different SQL than this build embeds.
    Modified(DateTime<Utc>),
}

/// The state of every migration in one database.
#[derive(Debug, Clone)]
pub struct Status {
    /// Each embedded migration with its state, oldest first.
    pub migrations: Vec<(Migration, MigrationState)>,
    /// Versions in the ledger that this build does not embed.
    pub unknown: Vec<String>,
}

impl Status {
    pub(crate) fn new(applied: &[Applied]) -> Self {
        let migrations = MIGRATIONS
            .iter()
            .map(|m| {
                let state = match applied.iter().find(|a| a.version == m.version) {
                    None => MigrationState::Pending,
                    Some(a) if a.checksum == m.checksum() => MigrationState::Applied(a.applied_at),
                    Some(a) => MigrationState::Modified(a.applied_at),
                };
                (*m, state)
            })
            .collect();
        let unknown = applied
            .iter()
            .filter(|a| !MIGRATIONS.iter().any(|m| m.version == a.version))
            .map(|a| a.version.clone())
            .collect();
        Status {
            migrations,
            unknown,
        }
    }

    /// Versions not applied yet.
    pub fn pending(&self) -> Vec<&'static str> {
        self.migrations
            .iter()
            .filter(|(_, s)| *s == MigrationState::Pending)
            .map(|(m, _)| m.version)
            .collect()
    }

    /// Ok when every embedded migration is applied unmodified and the ledger knows nothing newer.
    pub fn ensure_current(&self) -> Result<()> {
        if let Some(v) = self.unknown.first() {
            return Err(Error::Unknown { version: v.clone() });
        }
        if let Some((m, _)) = self
            .migrations
            .iter()
            .find(|(_, s)| matches!(s, MigrationState::Modified(_)))
        {
            return Err(Error::Modified {
                version: m.version.to_owned(),
            });
        }
        let versions = self.pending();
        if versions.is_empty() {
            Ok(())
        } else {
            Err(Error::Pending { versions })
        }
    }
}

/// Key of the transaction-level advisory lock every migrating transaction takes first, so two
/// processes migrating at once run one after the other ("tidings!" in ASCII).
pub(crate) const LOCK_KEY: i64 = 0x7469_6469_6e67_7321;

/// Run first in every migrating transaction: serialise migrators, then make sure the schema and
/// the ledger exist (IF NOT EXISTS is safe here only because of the lock: two concurrent
/// `CREATE SCHEMA IF NOT EXISTS` can still fail on the catalog's unique index).
pub(crate) fn bootstrap_sql() -> String {
    format!("SELECT pg_advisory_xact_lock({LOCK_KEY});\n{}", LEDGER_DDL)
}

const LEDGER_DDL: &str = "CREATE SCHEMA IF NOT EXISTS tidings;
CREATE TABLE IF NOT EXISTS tidings.schema_migrations (
    version    text        PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
";

/// Whether the ledger exists (read-only status must not create it).
pub(crate) const LEDGER_EXISTS: &str =
    "SELECT to_regclass('tidings.schema_migrations') IS NOT NULL AS present";
/// Reads the ledger.
pub(crate) const LEDGER_SELECT: &str =
    "SELECT version, checksum, applied_at FROM tidings.schema_migrations ORDER BY version";
/// Records an applied migration. $1 version, $2 name, $3 checksum.
pub(crate) const LEDGER_INSERT: &str =
    "INSERT INTO tidings.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)";
/// Forgets a reverted migration. $1 version.
pub(crate) const LEDGER_DELETE: &str = "DELETE FROM tidings.schema_migrations WHERE version = $1";

/// The next migration to apply, or None when the database is current.
pub(crate) fn next_up(applied: &[Applied]) -> Result<Option<&'static Migration>> {
    let status = Status::new(applied);
    match status.ensure_current() {
        Ok(()) => Ok(None),
        Err(Error::Pending { versions }) => {
            Ok(MIGRATIONS.iter().find(|m| m.version == versions[0]))
        }
        Err(e) => Err(e),
    }
}

/// The newest applied migration, which `down` reverts next, or None when nothing is applied.
pub(crate) fn next_down(applied: &[Applied]) -> Result<Option<&'static Migration>> {
    let Some(last) = applied.iter().max_by(|a, b| a.version.cmp(&b.version)) else {
        return Ok(None);
    };
    MIGRATIONS
        .iter()
        .find(|m| m.version == last.version)
        .map(Some)
        .ok_or_else(|| Error::Unknown {
            version: last.version.clone(),
        })
}

pub(crate) fn script() -> String {
    let mut out = String::from(
        "-- Tidings schema, every migration in order, for vendoring into another migration tool.\n\
         -- Generated by `tidings migrate sql`; the ledger rows let `tidings migrate status` see it.\n\
         BEGIN;\n",
    );
    out.push_str(&bootstrap_sql());
    for m in MIGRATIONS {
        out.push_str(&format!("\n-- migration {} {}\n", m.version, m.name));
        out.push_str(m.up);
        out.push_str(&format!(
            "\nINSERT INTO tidings.schema_migrations (version, name, checksum) VALUES ('{}', '{}', '{}');\n",
            m.version,
            m.name,
            m.checksum()
        ));
    }
    out.push_str("COMMIT;\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_unique_and_sorted() {
        let v: Vec<_> = MIGRATIONS.iter().map(|m| m.version).collect();
        let mut sorted = v.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(v, sorted);
        assert!(v
            .iter()
            .all(|v| v.len() == 14 && v.bytes().all(|b| b.is_ascii_digit())));
    }

    #[test]
    fn next_up_refuses_a_modified_migration() {
        let applied = vec![Applied {
            version: MIGRATIONS[0].version.into(),
            checksum: "0".into(),
            applied_at: Utc::now(),
        }];
        assert!(matches!(next_up(&applied), Err(Error::Modified { .. })));
    }
}
