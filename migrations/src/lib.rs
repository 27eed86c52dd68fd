#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod grants;
mod plan;

#[cfg(feature = "diesel")]
pub mod diesel;
#[cfg(feature = "tokio-postgres")]
pub mod postgres;
#[cfg(feature = "sqlx")]
pub mod sqlx;
#[cfg(feature = "postgres")]
pub mod sync_postgres;

pub use grants::{check_role, ConsumerGrant, Grants};
pub use plan::{Applied, Migration, MigrationState, Status};

/// Every migration embedded in this build, oldest first.
pub fn migrations() -> &'static [Migration] {
    plan::MIGRATIONS
}

/// The full SQL of every migration plus the ledger rows, for teams that vendor it into their own
/// tool (sqlx, refinery, Flyway). Running it leaves the same ledger `tidings migrate up` would,
/// so `tidings migrate status` recognises the result.
pub fn script() -> String {
    plan::script()
}

/// What can go wrong while migrating.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database rejected a statement or the connection failed.
    #[error("database error while migrating")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A migration's SQL failed to apply or revert.
    #[error("migration {version} ({name}) failed")]
    Migration {
        /// Version of the failing migration.
        version: &'static str,
        /// Name of the failing migration.
        name: &'static str,
        /// What the database said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An applied migration's SQL differs from the one embedded in this build.
    #[error("migration {version} was changed after it was applied (checksum mismatch); migrations are append-only, add a new one")]
    Modified {
        /// Version whose checksum differs.
        version: String,
    },
    /// The database has a migration this build does not know (a newer Tidings applied it).
    #[error(
        "database has migration {version}, unknown to this build of tidings; use a newer tidings"
    )]
    Unknown {
        /// Version found in the ledger.
        version: String,
    },
    /// A role or consumer name given for the grants script breaks the rule it must follow.
    #[error("invalid {what} {name:?}: {rule}")]
    InvalidName {
        /// `role name` or `consumer name`.
        what: &'static str,
        /// The name as given.
        name: String,
        /// What a valid name looks like.
        rule: &'static str,
    },
    /// Migrations are pending, so the schema is not what this build expects.
    #[error("database is missing tidings migrations ({}): run `tidings migrate up`", versions.join(", "))]
    Pending {
        /// Versions not yet applied.
        versions: Vec<&'static str>,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
