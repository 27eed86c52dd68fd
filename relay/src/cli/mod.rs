//! The `tidings` command line as a library: its flags ([`Cli`]), what each subcommand does
//! ([`run`]) and the exit code each failure maps to ([`Failure`]). The binary only parses,
//! installs the tracing subscriber, builds the runtime and turns a [`Failure`] into its exit
//! code, so the whole command line is testable and reusable from Rust.
//!
//! ```no_run
//! use clap::Parser;
//! # async fn demo() -> Result<(), tidings_relay::cli::Failure> {
//! let cli = tidings_relay::cli::Cli::parse_from(["tidings", "status", "--json"]);
//! tidings_relay::cli::run(cli).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::{parse_duration, ErrorChain, Relay};

/// `println!` that does not panic when stdout is closed (`tidings dlq list | head -1`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that does not panic when stdout is closed.
macro_rules! out_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

// After the macros: textual scope makes them visible in these modules.
mod admin;
mod db;
mod fleet;

use db::Db;

/// The `tidings` command line: global flags and one subcommand.
#[derive(Parser)]
#[command(
    name = "tidings",
    version,
    about = "Transactional outbox relay and tooling for PostgreSQL"
)]
pub struct Cli {
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
    /// A database to serve, as NAME=URL (repeatable): `tidings relay` runs one relay per
    /// database in this process (its own pool and LISTEN connection, logs and metrics labelled
    /// db=NAME, never the URL); `status` and `migrate` go through each in turn. NAME is 1 to 63
    /// of A-Z a-z 0-9 _ -. Instead of --database-url.
    #[arg(long = "database", value_name = "NAME=URL", global = true)]
    databases: Vec<String>,
    /// A file of databases to serve, one NAME=URL per line (blank lines and # comments
    /// skipped), like repeated --database. `tidings relay` re-reads it every
    /// --databases-reload and on SIGHUP: added databases start, removed ones stop gracefully,
    /// a changed URL restarts that database's relay; a file that does not parse is ignored
    /// (logged) and the databases served stay as they were.
    #[arg(long, env = "TIDINGS_DATABASES_FILE", global = true)]
    databases_file: Option<std::path::PathBuf>,
    /// CA certificate(s) (PEM) that PostgreSQL's certificate must chain to, instead of the system
    /// roots (like libpq's sslrootcert); needs sslmode=require, verify-ca or verify-full.
    #[arg(long, env = "TIDINGS_PG_CA_FILE", global = true)]
    pg_ca_file: Option<std::path::PathBuf>,
    /// Longest wait for PostgreSQL: bounds connecting and getting a pooled connection, and
    /// each admin command (status, dlq, migrate, inbox prune, inbox dlq) as a whole, also as its
    /// statement_timeout. Raise it for long migrations or prunes.
    #[arg(long, env = "TIDINGS_DB_TIMEOUT", value_parser = parse_duration, default_value = "30s", global = true)]
    db_timeout: Duration,
    /// Log format.
    #[arg(long, env = "TIDINGS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The log format asked for (`--log-format`), for the binary's tracing subscriber.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
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
    Relay(Box<crate::RelayArgs>),
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
    /// Role `tidings status`, `tidings dlq` and `tidings inbox dlq` run as.
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
    /// List, replay or purge messages a consumer parked (tidings.inbox_dead_letters). A replay
    /// is run by the consumer's own runner, which must be running for it to happen.
    Dlq {
        #[command(subcommand)]
        action: InboxDlqAction,
    },
}

#[derive(Subcommand)]
enum InboxDlqAction {
    /// List the newest parked messages (without payloads), and whether a replay is pending.
    List {
        /// Only this consumer's parked messages [default: every consumer].
        #[arg(long)]
        consumer: Option<String>,
        /// How many to show (1 to 10000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ask the consumer's runner to run parked messages again (it deletes each one it handles,
    /// or parks it again with the new error).
    Replay {
        /// The consumer whose parked messages to replay.
        #[arg(long)]
        consumer: String,
        /// Message ids to replay.
        ids: Vec<uuid::Uuid>,
        /// Replay every parked message of the consumer.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete parked messages for good.
    Purge {
        /// The consumer whose parked messages to delete.
        #[arg(long)]
        consumer: String,
        /// Message ids to delete.
        ids: Vec<uuid::Uuid>,
        /// Delete every parked message of the consumer.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[derive(Subcommand, Clone)]
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

/// Why a command failed, and the exit code that says so: 2 for bad configuration or usage,
/// 1 for a failure at run time.
#[derive(Debug)]
pub struct Failure {
    /// The process exit code: 2 configuration or usage, 1 run time.
    pub code: u8,
    /// What went wrong, for `error: ...` on stderr; names the flag where one is at fault.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A configuration or usage failure (exit code 2).
fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

/// Any error is a run-time failure (exit code 1), shown with its whole source chain.
impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            message: ErrorChain(&e).to_string(),
        }
    }
}

/// Runs the subcommand `cli` names until it is done (the relay: until SIGTERM or SIGINT).
/// Output goes to stdout and never panics when stdout is closed; log lines go to the tracing
/// subscriber the caller installed.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    // Which commands serve several databases: the rest work on one (--database-url), and
    // ignore --database / --databases-file (TIDINGS_DATABASES_FILE may be set for the relay).
    let fleet_command = matches!(
        cli.command,
        Command::Relay(_)
            | Command::Status { .. }
            | Command::Migrate {
                action: MigrateAction::Up | MigrateAction::Status
            }
    );
    let named = !cli.databases.is_empty() || cli.databases_file.is_some();
    if named && !fleet_command && cli.database_url.is_none() {
        return Err(usage(
            "this command works on one database: pass --database-url (--database and --databases-file serve relay, status, migrate up and migrate status)",
        ));
    }
    let source = match (&cli.database_url, cli.databases.is_empty(), &cli.databases_file) {
        _ if !fleet_command => None,
        (_, true, None) => None,
        (Some(_), _, _) => {
            return Err(usage(
                "give the database as --database-url / DATABASE_URL, or as --database / --databases-file, not both",
            ))
        }
        (None, false, Some(_)) => {
            return Err(usage(
                "give the databases as --database or as --databases-file, not both",
            ))
        }
        (None, false, None) => Some(fleet::Source::Flags(fleet::parse_flags(&cli.databases)?)),
        (None, true, Some(path)) => Some(fleet::Source::File(path.clone())),
    };
    if let Some(source) = source {
        let ca = cli.pg_ca_file.as_deref();
        if let Command::Relay(args) = cli.command {
            return relay_fleet(source, *args, ca, cli.db_timeout).await;
        }
        let entries = source.load().await?;
        // Every URL parses (a configuration failure, exit 2) before any database is touched.
        for e in &entries {
            fleet::db_of(e, ca, cli.db_timeout)?;
        }
        return match cli.command {
            Command::Status { json } => fleet::status(entries, ca, cli.db_timeout, json).await,
            Command::Migrate { action } => {
                fleet::migrate(entries, ca, cli.db_timeout, action).await
            }
            _ => unreachable!("only fleet commands get here"),
        };
    }
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
        Command::Grants(a) => admin::grants(a),
        Command::Migrate { action } => pg?.admin(async |c| admin::migrate(c, action).await).await,
        Command::Status { json } => pg?.admin(async |c| admin::status(c, json).await).await,
        Command::Dlq { action } => pg?.admin(async |c| admin::dlq(c, action).await).await,
        Command::Relay(args) => relay(pg?, *args, cli.pg_ca_file.as_deref(), cli.db_timeout).await,
        Command::Inbox { action } => admin::inbox(pg, action).await,
    }
}

/// `--pool-size` against `--lanes`: each lane holds a connection while it works on a batch,
/// and heartbeats need one more (checked from 2 lanes; one lane works with one connection).
fn check_pool_size(args: &crate::RelayArgs) -> Result<(), Failure> {
    let (pool, lanes) = (args.pool_size(), args.lanes());
    if pool == 0 {
        return Err(usage("--pool-size must be at least 1"));
    }
    if lanes > 1 && lanes <= 16 && pool <= lanes {
        return Err(usage(format!(
            "--pool-size {pool} is too small for --lanes {lanes}: each lane holds a connection while it works on a batch, and heartbeats need one more (use --pool-size {} or more)",
            lanes + 1
        )));
    }
    Ok(())
}

async fn relay(
    pg: Db,
    args: crate::RelayArgs,
    ca_file: Option<&std::path::Path>,
    db_timeout: std::time::Duration,
) -> Result<(), Failure> {
    let config = args.config();
    check_pool_size(&args)?;
    let pool = pg.pool(args.pool_size())?;
    pg.first_connection(&pool).await?;

    let dedup_hint = args.sink.dedup_window_hint();
    let sink = args
        .sink
        .connect(args.publish_timeout)
        .await
        .map_err(|e| match e {
            crate::Error::Config(m) => usage(m),
            other => Failure::from(other),
        })?;
    let relay = Relay::new(pool, sink, config).map_err(|e| {
        let mut f = config_failure(e);
        if let Some(hint) = dedup_hint.filter(|_| f.message.contains("dedup window")) {
            f.message.push_str(&format!(" ({hint})"));
        }
        f
    })?;
    let relay = pg.with_listener(relay);

    let relay = std::sync::Arc::new(relay);
    let shutdown = CancellationToken::new();
    if let Some(addr) = args.admin_listen {
        let prometheus = install_prometheus(&shutdown)?;
        // The operator page's pool: its own URL (another role) or the relay's database.
        let console_pool = match &args.admin_database_url {
            Some(url) => {
                let rename = |mut f: Failure| {
                    f.message = f.message.replace(
                        "--database-url / DATABASE_URL",
                        "--admin-database-url / TIDINGS_ADMIN_DATABASE_URL",
                    );
                    f
                };
                let db = Db::new(Some(url), ca_file, db_timeout).map_err(rename)?;
                db.pool(2).map_err(rename)?
            }
            // A pool of its own on the same database: a slow page or scrape never takes the
            // relay's connections.
            None => pg.pool(2)?,
        };
        let console = crate::console::Console::new(
            console_pool,
            args.admin_token.clone(),
            args.admin_hosts.clone(),
        );
        tokio::spawn(console.clone().sample(shutdown.clone()));
        let targets = std::sync::Arc::new(std::sync::RwLock::new(vec![crate::observe::Target {
            db: None,
            relay: relay.clone(),
            pool: console.pool().clone(),
            problem: Default::default(),
        }]));
        let app = crate::observe::router(targets, prometheus).merge(console.router());
        serve_admin(addr, app, args.admin_token.is_some(), &shutdown).await?;
    }
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing the batch in flight");
        signals.cancel();
    });
    // The run loop owns the shutdown deadline (--shutdown-timeout).
    relay.run(shutdown).await.map_err(|e| match e {
        crate::Error::ShutdownTimeout(d) => Failure {
            code: 1,
            message: format!("in-flight work did not finish within {d:?} (--shutdown-timeout)"),
        },
        other => Failure::from(other),
    })
}

/// A relay config error as exit 2, naming flags.
fn config_failure(e: crate::Error) -> Failure {
    usage(flagify(&e.to_string()))
}

/// Installs the Prometheus recorder and its housekeeping task (until `shutdown`).
fn install_prometheus(
    shutdown: &CancellationToken,
) -> Result<metrics_exporter_prometheus::PrometheusHandle, Failure> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(crate::metrics::BUCKETS)
        // Gauges not set for 10 minutes go: those of a database no longer served. (The
        // database gauges are read at every scrape, the relay's at every tick.)
        .map(|b| {
            b.idle_timeout(
                metrics_util::MetricKindMask::GAUGE,
                Some(std::time::Duration::from_secs(600)),
            )
        })
        .and_then(|b| b.install_recorder())
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot install the metrics recorder: {e}"),
        })?;
    crate::metrics::describe();
    // The recorder's housekeeping (histogram windows), whether or not anyone scrapes.
    let upkeep = prometheus.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = every.tick() => upkeep.run_upkeep(),
                _ = stop.cancelled() => return,
            }
        }
    });
    Ok(prometheus)
}

/// Binds `--admin-listen` and serves `app` on it until `shutdown`.
async fn serve_admin(
    addr: std::net::SocketAddr,
    app: axum::Router,
    actions: bool,
    shutdown: &CancellationToken,
) -> Result<(), Failure> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| usage(format!("--admin-listen {addr}: cannot listen: {e}")))?;
    tracing::info!(%addr, actions,
        "serving the operator page at /, /metrics, /healthz and /readyz");
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the admin listener stopped");
        }
    });
    Ok(())
}

/// `tidings relay` over several databases ([`fleet`]): one relay per database, the sink
/// shared; with a file, re-read every `--databases-reload` and on SIGHUP.
async fn relay_fleet(
    source: fleet::Source,
    args: crate::RelayArgs,
    ca_file: Option<&std::path::Path>,
    db_timeout: std::time::Duration,
) -> Result<(), Failure> {
    check_pool_size(&args)?;
    if args.admin_database_url.is_some() {
        return Err(usage(
            "--admin-database-url names one database; with --database / --databases-file each database's page uses that database's URL",
        ));
    }
    if args.databases_reload.is_zero() {
        return Err(usage("--databases-reload must be greater than 0"));
    }
    // First, so that a SIGHUP sent early never kills the process (its default action).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let entries = source.load().await?;
    // Every URL parses before anything connects.
    for e in &entries {
        fleet::db_of(e, ca_file, db_timeout)?;
    }
    let config = args.config();
    let pool_size = args.pool_size();
    let dedup_hint = args.sink.dedup_window_hint();
    let sink = args
        .sink
        .connect(args.publish_timeout)
        .await
        .map_err(|e| match e {
            crate::Error::Config(m) => usage(m),
            other => Failure::from(other),
        })?;
    let shutdown = CancellationToken::new();
    let admin = args.admin_listen.map(|_| fleet::AdminOpts {
        token: args.admin_token.clone(),
        hosts: args.admin_hosts.clone(),
    });
    let mut fleet = fleet::Fleet::new(
        sink,
        config,
        pool_size,
        ca_file.map(|p| p.to_owned()),
        db_timeout,
        admin,
        shutdown.clone(),
    );
    // The admin listener before any relay starts: a port that cannot be bound (exit 2) leaves
    // nothing running.
    if let Some(addr) = args.admin_listen {
        let prometheus = install_prometheus(&shutdown)?;
        let app = crate::observe::router(fleet.targets.clone(), prometheus).merge(
            fleet::console_router(fleet.consoles.clone(), args.admin_hosts.clone()),
        );
        serve_admin(addr, app, args.admin_token.is_some(), &shutdown).await?;
    }
    fleet.start_all(entries).map_err(|mut f| {
        if let Some(hint) = dedup_hint.filter(|_| f.message.contains("dedup window")) {
            f.message.push_str(&format!(" ({hint})"));
        }
        f
    })?;
    tracing::info!(databases = ?fleet.names(), "serving several databases");
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing the batches in flight");
        signals.cancel();
    });
    if let fleet::Source::File(_) = &source {
        let mut every = tokio::time::interval(args.databases_reload);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => {}
                _ = hangup => tracing::info!("SIGHUP: re-reading --databases-file"),
            }
            match source.load().await {
                Ok(entries) => fleet.apply(entries).await,
                Err(f) => tracing::error!(error = %f.message,
                    "cannot re-read --databases-file; the databases served stay as they are"),
            }
        }
    } else {
        shutdown.cancelled().await;
    }
    fleet.shutdown().await
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
        ("lanes", "--lanes"),
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

/// Resolves on SIGTERM or SIGINT (on ctrl-c alone where those handlers cannot be installed).
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
        assert_eq!(crate::shown("pay_1\u{1b}[2J\nX"), "pay_1\\u{1b}[2J\\nX");
        assert_eq!(crate::shown("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(crate::shown("plain é"), "plain é");
    }
}
