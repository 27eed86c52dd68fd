//! `tidings`: the relay daemon and the admin tool. Parses flags and environment, installs the
//! tracing subscriber, builds pools, calls the library, and maps errors to exit codes:
//! 0 ok, 1 failure at run time, 2 bad configuration or usage.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// `println!` that does not panic when stdout is closed (`tidings dlq list | head -1`).
macro_rules! out {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that does not panic when stdout is closed.
macro_rules! out_raw {
    ($($t:tt)*) => {{
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

#[path = "bin_support/db.rs"]
mod db;
use db::Db;
use tidings_relay::{parse_duration, ErrorChain, Relay};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tidings",
    version,
    about = "Transactional outbox relay and tooling for PostgreSQL"
)]
struct Cli {
    /// PostgreSQL URL (postgres://user:password@host:port/db?sslmode=...). Passwords are never logged.
    ///
    /// sslmode, with libpq's meaning:
    ///   disable      plain text
    ///   prefer       the default: TLS if the server offers it, else plain text; certificate
    ///                not verified
    ///   require      TLS; certificate not verified, unless a CA is given (then as verify-ca)
    ///   verify-ca    TLS; chain verified against the CA (--pg-ca-file or sslrootcert=<file>,
    ///                required), host name not checked
    ///   verify-full  TLS; chain and host name verified, against the CA or else the system roots
    ///   (allow is taken as prefer; sslrootcert=system means the system roots, with verify-full)
    /// Where Tidings differs from libpq: verify-ca needs a CA given explicitly and verify-full
    /// without one uses the system roots (~/.postgresql/root.crt is never read); no client
    /// certificates (sslcert, sslkey) or CRLs; rustls rules (TLS 1.2 or later, no SHA-1).
    /// connect_timeout defaults to --db-timeout and TCP keepalives to 15s idle, 5s interval,
    /// 3 probes, unless the URL sets connect_timeout or keepalives_idle/_interval/_retries.
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        hide_env_values = true,
        verbatim_doc_comment
    )]
    database_url: Option<String>,
    /// CA certificate(s) (PEM) that PostgreSQL's certificate must chain to, instead of the system
    /// roots (like libpq's sslrootcert); needs sslmode=require, verify-ca or verify-full.
    #[arg(long, env = "TIDINGS_PG_CA_FILE", global = true)]
    pg_ca_file: Option<std::path::PathBuf>,
    /// Longest wait for PostgreSQL: bounds connecting and getting a pooled connection, and
    /// each admin command (status, dlq, migrate, inbox prune) as a whole, also as its
    /// statement_timeout. Raise it for long migrations or prunes.
    #[arg(long, env = "TIDINGS_DB_TIMEOUT", value_parser = parse_duration, default_value = "30s", global = true)]
    db_timeout: Duration,
    /// Log format.
    #[arg(long, env = "TIDINGS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Apply, revert or inspect the Tidings schema (schema `tidings`, ledger `tidings.schema_migrations`).
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Run the relay: deliver committed outbox rows to a broker until SIGTERM/SIGINT.
    Relay(Box<tidings_relay::RelayArgs>),
    /// Show backlog, oldest waiting message, dead letters and relay heartbeats.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List, replay or purge dead-lettered messages.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Print the SQL that gives each role least privilege on the tidings schema (no database
    /// needed). Run it as the schema owner after every `migrate up`; it is idempotent.
    Grants(GrantsArgs),
    /// Consumer-side maintenance of the inbox.
    Inbox {
        #[command(subcommand)]
        action: InboxAction,
    },
}

#[derive(clap::Args)]
struct GrantsArgs {
    /// Role that enqueues messages (repeatable).
    #[arg(long, value_name = "ROLE", value_parser = role_name)]
    producer: Vec<String>,
    /// Role that consumes through the inbox, and the consumer names it alone may use
    /// (repeatable); without `=`, the consumer name is the role name.
    #[arg(long, value_name = "ROLE[=NAME,...]", value_parser = consumer_grant)]
    consumer: Vec<tidings_migrations::ConsumerGrant>,
    /// Role the relay runs as.
    #[arg(long, value_name = "ROLE", value_parser = role_name)]
    relay: Option<String>,
    /// Role `tidings inbox prune` runs as (reads and deletes every consumer's inbox records).
    #[arg(long, value_name = "ROLE", value_parser = role_name)]
    pruner: Option<String>,
    /// Role `tidings status` and `tidings dlq` run as.
    #[arg(long, value_name = "ROLE", value_parser = role_name)]
    operator: Option<String>,
}

fn role_name(s: &str) -> Result<String, String> {
    tidings_migrations::check_role(s)
        .map(str::to_owned)
        .map_err(|e| e.to_string())
}

fn consumer_grant(s: &str) -> Result<tidings_migrations::ConsumerGrant, String> {
    s.parse()
        .map_err(|e: tidings_migrations::Error| e.to_string())
}

#[derive(Subcommand)]
enum InboxAction {
    /// Delete inbox records older than --older-than, in small batches. Keep records longer than
    /// any redelivery or replay can arrive, or a late redelivery runs its effect again.
    Prune {
        /// Age beyond which records go (e.g. 7d, 12h).
        #[arg(long, env = "TIDINGS_INBOX_RETENTION", value_parser = parse_duration, default_value = "7d")]
        older_than: Duration,
        /// Only this consumer's records [default: every consumer].
        #[arg(long)]
        consumer: Option<String>,
        /// Rows deleted per statement (each its own short transaction).
        #[arg(long, default_value_t = 1000)]
        batch: i64,
        /// Allow --older-than below 1 hour (a redelivery after that runs its effect again).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum MigrateAction {
    /// Apply every pending migration (safe to run from several processes at once).
    Up,
    /// Revert the newest migration (or more with --steps, or all with --all). Refused while the
    /// outbox, the dead letters or the inbox hold rows (a revert may drop them) unless --force.
    Down {
        /// Revert even though Tidings tables hold rows that the revert may drop.
        #[arg(long)]
        force: bool,
        /// How many migrations to revert.
        #[arg(long, default_value_t = 1, conflicts_with = "all")]
        steps: usize,
        /// Revert every migration.
        #[arg(long)]
        all: bool,
    },
    /// Show each migration and whether it is applied.
    Status,
    /// Print the full SQL (every migration plus ledger rows) to vendor into another tool.
    Sql,
}

#[derive(Subcommand)]
enum DlqAction {
    /// List the newest dead letters.
    List {
        /// How many to show (1 to 10000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
    /// Move dead letters back into the outbox (same message id, attempts reset).
    Replay {
        /// Message ids to replay.
        ids: Vec<uuid::Uuid>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete dead letters for good.
    Purge {
        /// Message ids to delete.
        ids: Vec<uuid::Uuid>,
        /// Delete every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

/// `tidings inbox prune` refuses a retention below this unless --force.
const PRUNE_FLOOR: Duration = Duration::from_secs(3600);

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            message: ErrorChain(&e).to_string(),
        }
    }
}

fn main() -> ExitCode {
    // One crypto provider for the process (ring, as async-nats uses), so rustls never has to
    // guess between providers.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDINGS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    // Log lines go through a thread of their own and are dropped (counted) when stderr does not
    // drain: a reader that stops reading must never block the runtime, or SIGTERM.
    let (stderr, _flush_on_exit) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(stderr.clone());
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli));
    // Work still blocked on a pipe nobody reads (or a DNS lookup) must not keep the process.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let mut out = stderr;
            let _ = writeln!(out, "error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let pg = Db::new(
        cli.database_url.as_deref(),
        cli.pg_ca_file.as_deref(),
        cli.db_timeout,
    );
    match cli.command {
        Command::Migrate {
            action: MigrateAction::Sql,
        } => {
            out_raw!("{}", tidings_migrations::script());
            Ok(())
        }
        Command::Grants(a) => {
            let grants = tidings_migrations::Grants {
                producers: a.producer,
                consumers: a.consumer,
                relay: a.relay,
                pruner: a.pruner,
                operator: a.operator,
            };
            if grants.producers.is_empty()
                && grants.consumers.is_empty()
                && [&grants.relay, &grants.pruner, &grants.operator]
                    .iter()
                    .all(|r| r.is_none())
            {
                return Err(usage("name at least one role (--producer, --consumer, --relay, --pruner, --operator)"));
            }
            out_raw!("{}", grants.sql().map_err(|e| usage(e.to_string()))?);
            Ok(())
        }
        Command::Migrate { action } => pg?.admin(async |c| migrate(c, action).await).await,
        Command::Status { json } => pg?.admin(async |c| status(c, json).await).await,
        Command::Dlq { action } => pg?.admin(async |c| dlq(c, action).await).await,
        Command::Relay(args) => relay(pg?, *args).await,
        Command::Inbox {
            action:
                InboxAction::Prune {
                    older_than,
                    consumer,
                    batch,
                    force,
                },
        } => {
            if batch < 1 {
                return Err(usage("--batch must be at least 1"));
            }
            if older_than < PRUNE_FLOOR && !force {
                return Err(usage(format!(
                    "--older-than {older_than:?} would forget messages that may still be redelivered (the floor is 1h); pass --force if you mean it"
                )));
            }
            pg?.admin(async |client| {
                tidings_migrations::postgres::ensure_current(client).await?;
                let n =
                    tidings_inbox::prune(client, consumer.as_deref(), older_than, batch).await?;
                out!("pruned {n} inbox records older than {older_than:?}");
                Ok(())
            })
            .await
        }
    }
}

async fn migrate(
    client: &mut tokio_postgres::Client,
    action: MigrateAction,
) -> Result<(), Failure> {
    use tidings_migrations::postgres as m;
    match action {
        MigrateAction::Up => {
            let done = m::up(client).await?;
            for mig in &done {
                out!("applied {} {}", mig.version, mig.name);
            }
            if done.is_empty() {
                out!("schema is current; nothing to apply");
            }
        }
        MigrateAction::Down { steps, all, force } => {
            if !force {
                guard_down(client).await?;
            }
            let done = m::down(client, if all { usize::MAX } else { steps }).await?;
            for mig in &done {
                out!("reverted {} {}", mig.version, mig.name);
            }
            if done.is_empty() {
                out!("nothing to revert");
            }
        }
        MigrateAction::Status => {
            let s = m::status(client).await?;
            for (mig, state) in &s.migrations {
                let state = match state {
                    tidings_migrations::MigrationState::Pending => "pending".to_owned(),
                    tidings_migrations::MigrationState::Applied(t) => format!("applied {t}"),
                    tidings_migrations::MigrationState::Modified(t) => {
                        format!("applied {t}, but CHANGED since (checksum mismatch)")
                    }
                };
                out!("{} {:<24} {state}", mig.version, mig.name);
            }
            for v in &s.unknown {
                out!("{v} (unknown to this build: applied by a newer tidings)");
            }
        }
        MigrateAction::Sql => unreachable!("handled without a database"),
    }
    Ok(())
}

/// Refuses a revert while Tidings tables hold rows it could drop.
async fn guard_down(client: &tokio_postgres::Client) -> Result<(), Failure> {
    let mut held = Vec::new();
    for (table, what) in [
        ("outbox", "undelivered messages"),
        ("dead_letters", "dead letters"),
        ("inbox", "inbox records"),
        ("inbox_dead_letters", "parked consumer messages"),
    ] {
        // Table names come from the list above, never from input.
        let sql = format!(
            "SELECT CASE WHEN to_regclass('tidings.{table}') IS NULL THEN 0 \
             ELSE (SELECT count(*) FROM (SELECT 1 FROM tidings.{table} LIMIT 1000000) t) END"
        );
        // to_regclass makes a missing table count 0; any other failure stops the revert.
        let n: i64 = client
            .query_typed(&sql, &[])
            .await?
            .first()
            .map_or(Ok(0), |row| row.try_get(0))?;
        if n > 0 {
            held.push(format!("{n} {what}"));
        }
    }
    if held.is_empty() {
        return Ok(());
    }
    Err(usage(format!(
        "refusing to revert: tidings tables hold {}; a revert may drop them. Deliver or purge them first, or pass --force",
        held.join(", ")
    )))
}

async fn status(client: &tokio_postgres::Client, json: bool) -> Result<(), Failure> {
    tidings_migrations::postgres::ensure_current(client).await?;
    let s = tidings_relay::status(client).await?;
    if json {
        out!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(());
    }
    out_raw!("{s}");
    Ok(())
}

async fn dlq(client: &tokio_postgres::Client, action: DlqAction) -> Result<(), Failure> {
    tidings_migrations::postgres::ensure_current(client).await?;
    let pick = |ids: &[uuid::Uuid], all: bool| -> Result<Option<Vec<uuid::Uuid>>, Failure> {
        match (all, ids.is_empty()) {
            (true, _) => Ok(None),
            (false, false) => Ok(Some(ids.to_vec())),
            (false, true) => Err(usage("name message ids, or pass --all")),
        }
    };
    match action {
        DlqAction::List { limit } => {
            for d in tidings_relay::dlq_list(client, limit).await? {
                out!("{d}");
            }
        }
        DlqAction::Replay { ids, all } => {
            let ids = pick(&ids, all)?;
            let n = tidings_relay::dlq_replay(client, ids.as_deref()).await?;
            out!("replayed {n} messages");
        }
        DlqAction::Purge { ids, all } => {
            let ids = pick(&ids, all)?;
            let n = tidings_relay::dlq_purge(client, ids.as_deref()).await?;
            out!("purged {n} messages");
        }
    }
    Ok(())
}

async fn relay(pg: Db, args: tidings_relay::RelayArgs) -> Result<(), Failure> {
    let config = args.config();
    if args.pool_size == 0 {
        return Err(usage("--pool-size must be at least 1"));
    }
    let pool = pg.pool(args.pool_size)?;
    pg.first_connection(&pool).await?;

    let dedup_hint = args.sink.dedup_window_hint();
    let sink = args
        .sink
        .connect(args.publish_timeout)
        .await
        .map_err(|e| match e {
            tidings_relay::Error::Config(m) => usage(m),
            other => Failure::from(other),
        })?;
    let relay = pg.with_listener(Relay::new(pool, sink, config).map_err(|e| {
        let mut m = flagify(&e.to_string());
        if let Some(hint) = dedup_hint.filter(|_| m.contains("dedup window")) {
            m.push_str(&format!(" ({hint})"));
        }
        usage(m)
    })?);

    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing the batch in flight");
        signals.cancel();
    });
    // The run loop owns the shutdown deadline (--shutdown-timeout).
    relay.run(shutdown).await.map_err(|e| match e {
        tidings_relay::Error::ShutdownTimeout(d) => Failure {
            code: 1,
            message: format!("in-flight work did not finish within {d:?} (--shutdown-timeout)"),
        },
        other => Failure::from(other),
    })
}

/// Names the flags in a library config error: `claim_timeout` becomes `--claim-timeout`.
fn flagify(message: &str) -> String {
    const FIELDS: &[(&str, &str)] = &[
        (
            "unavailable_backoff_max",
            "unavailable_backoff_max (not a flag)",
        ),
        ("busy_poll_interval", "--busy-poll-interval"),
        ("heartbeat_interval", "--heartbeat-interval"),
        ("publish_timeout", "--publish-timeout"),
        ("poll_interval", "--poll-interval"),
        ("claim_timeout", "--claim-timeout"),
        ("backoff_base", "--backoff-base"),
        ("max_attempts", "--max-attempts"),
        ("vacuum_every", "--vacuum-every"),
        ("shutdown_timeout", "--shutdown-timeout"),
        ("backoff_max", "--backoff-max"),
        ("batch_size", "--batch-size"),
    ];
    let mut out = String::with_capacity(message.len() + 16);
    let mut rest = message;
    'scan: while !rest.is_empty() {
        let prev_ident = out
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !prev_ident {
            for (field, flag) in FIELDS {
                if let Some(after) = rest.strip_prefix(field) {
                    if !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                        out.push_str(flag);
                        rest = after;
                        continue 'scan;
                    }
                }
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    if let Some(m) = out.strip_prefix("invalid config: name must") {
        out = format!("invalid config: --name must{m}");
    }
    out
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::flagify;

    #[test]
    fn config_errors_name_flags_not_fields() {
        assert_eq!(
            flagify("invalid config: publish_timeout must be less than claim_timeout"),
            "invalid config: --publish-timeout must be less than --claim-timeout"
        );
        assert_eq!(
            flagify("invalid config: busy_poll_interval must be at most poll_interval"),
            "invalid config: --busy-poll-interval must be at most --poll-interval"
        );
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(
            tidings_relay::shown("pay_1\u{1b}[2J\nX"),
            "pay_1\\u{1b}[2J\\nX"
        );
        assert_eq!(tidings_relay::shown("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(tidings_relay::shown("plain é"), "plain é");
    }
}
