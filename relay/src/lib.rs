#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod admin;
pub mod cli;
mod config;
pub mod console;
mod listener;
pub mod metrics;
pub mod observe;
mod relay;
pub mod sink;

pub use admin::{
    dlq_list, dlq_purge, dlq_replay, inbox_dlq_list, inbox_dlq_purge, inbox_dlq_replay, shown,
    status, DeadLetter, ParkedMessage, RelayInfo, Status, ADMIN_STATEMENTS,
};
pub use config::{parse_duration, RelayArgs, RelayConfig, DEFAULT_LANES};
pub use listener::CHANNEL;
pub use relay::{Readiness, Relay, TickReport, STATEMENTS};
pub use sink::{Capabilities, Delivery, Envelope, Sink, SinkError};

/// What can stop the relay or an admin command. Per-message failures are not errors: they are
/// recorded on the message (attempts, last error, next attempt time).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is unusable; the message names it.
    #[error("invalid config: {0}")]
    Config(String),
    /// No database connection could be had from the pool.
    #[error("cannot get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The database failed a statement.
    #[error("database error")]
    Database(#[from] tokio_postgres::Error),
    /// The schema is missing, outdated or newer than this build.
    #[error(transparent)]
    Schema(#[from] tidings_migrations::Error),
    /// The broker could not be set up (connect, stream lookup or creation).
    #[error("{0}")]
    Sink(String),
    /// The database accepted the connection but did not answer in time (frozen server, dead
    /// proxy, lost network); the relay logs it and tries again.
    #[error("the database did not answer within {0:?}")]
    DatabaseTimeout(std::time::Duration),
    /// The batch in flight at shutdown did not finish within the shutdown timeout and was
    /// abandoned (its rows are released, nothing is lost).
    #[error("in-flight work did not finish within {0:?}")]
    ShutdownTimeout(std::time::Duration),
}

/// Displays an error with its whole source chain, for log lines.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}

/// A connection string fit for logs: passwords in URLs (`scheme://user:secret@host`, also in
/// comma-separated lists) and in key=value strings (`password=secret`) become `***`.
pub fn redact_url(s: &str) -> String {
    if !s.contains("://") {
        // key=value form (libpq conninfo): hide the value of password=...
        return s
            .split_whitespace()
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    s.split(',')
        .map(|part| match url::Url::parse(part.trim()) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                } else if !u.username().is_empty() && u.scheme().starts_with("nats") {
                    // A NATS token travels as the user part.
                    let _ = u.set_username("***");
                }
                let mut pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k.eq_ignore_ascii_case("password") {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                if !pairs.is_empty() {
                    u.query_pairs_mut().clear().extend_pairs(pairs.drain(..));
                }
                u.to_string()
            }
            Err(_) => redact_userinfo(part),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Fallback for strings the URL parser rejects: hide everything between the first ':' of the
/// user-info and the last '@' before the host.
fn redact_userinfo(s: &str) -> String {
    let Some(start) = s.find("://").map(|i| i + 3) else {
        return s.to_owned();
    };
    let rest = &s[start..];
    let end = rest.find('/').unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &s[..start], &rest[at..])
        }
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_a_log_line() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db.internal:5432/shop?sslmode=require"),
            "postgres://app:***@db.internal:5432/shop?sslmode=require"
        );
        assert_eq!(
            redact_url("host=db user=app password=s3cret dbname=shop"),
            "host=db user=app password=*** dbname=shop"
        );
        assert_eq!(
            redact_url("nats://u:p@a:4222,nats://tok@b:4222"),
            "nats://u:***@a:4222,nats://***@b:4222"
        );
        assert_eq!(
            redact_url("postgres://h/db?password=x"),
            "postgres://h/db?password=***"
        );
        assert_eq!(
            redact_url("postgres://u:pw@host:notaport/db"),
            "postgres://u:***@host:notaport/db"
        );
    }
}
