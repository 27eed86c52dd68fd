use std::time::Duration;

use crate::Error;

/// Relay settings. Build with struct update syntax over `Default`; checked by `Relay::new`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Instance name shown in `tidings status`. Defaults to `<host>-<pid>`.
    pub name: String,
    /// Rows claimed and published per batch. Defaults to 500.
    pub batch_size: usize,
    /// Batches one relay works on at once (1 to 16). With 2, while a batch waits for its
    /// acknowledgements the next one is claimed and published: each lane has its own claim
    /// transaction and pooled connection, SKIP LOCKED keeps their rows apart, and per-key order
    /// holds exactly as between two relays. Extra lanes work only while there is a backlog
    /// (after a full batch) and sleep otherwise; one whose batch was mostly held back (keyed
    /// rows behind rows another lane holds) waits a poll interval before claiming again. Needs
    /// a pool of at least `lanes` connections (one more for heartbeats is best). Keyed traffic
    /// gains nothing: lanes claiming behind each other pay an index probe per keyed row.
    /// Defaults to 1 here (the service sizes its pool); the `tidings relay` daemon runs
    /// [`DEFAULT_LANES`].
    pub lanes: usize,
    /// How often to look for work when no notification arrives (the fallback that keeps the relay
    /// correct when LISTEN/NOTIFY is unavailable, e.g. behind PgBouncer in transaction mode); also
    /// the resolution of delayed messages and retries. Defaults to 100 ms.
    pub poll_interval: Duration,
    /// How soon to look again after a batch that found messages but was not full: while traffic
    /// flows the relay polls this often, which keeps latency low without producers' NOTIFY;
    /// one second after the last batch with messages it falls back to `poll_interval`.
    /// Defaults to 2 ms.
    pub busy_poll_interval: Duration,
    /// Wake up on NOTIFY from producers' commits (a dedicated LISTEN connection). Defaults to true.
    pub listen: bool,
    /// Longest a relay may hold claimed rows while silent: PostgreSQL ends a claim transaction that
    /// is idle (or a statement that runs) longer than this, releasing its rows to other relays.
    /// Bounds failover of a hung relay. Defaults to 15 seconds.
    pub claim_timeout: Duration,
    /// Longest wait for one broker acknowledgement (and for the broker health check after a
    /// batch that failed as a whole); at most (`claim_timeout` - 1 second) / 2. Messages of one key go one after another; a batch stops starting new
    /// ones in time to finish inside `claim_timeout`.
    /// Defaults to 5 seconds.
    pub publish_timeout: Duration,
    /// Attempts before a message is dead-lettered (1 to 10,000). Attempts are counted only while
    /// the broker works: failures during an outage are not the messages' fault. Defaults to 10.
    pub max_attempts: i32,
    /// Backoff before the first retry; doubles per attempt, with jitter. Defaults to 1 second.
    pub backoff_base: Duration,
    /// Longest backoff between retries of a message. Together with `claim_timeout` and
    /// `publish_timeout` it must stay inside the broker's dedup window (checked at start-up):
    /// a re-send after the window is stored twice. Defaults to 1 minute (JetStream's default
    /// window is 2 minutes).
    pub backoff_max: Duration,
    /// Longest pause while the broker is unavailable (released messages are not counted as
    /// attempts). Defaults to 30 seconds.
    pub unavailable_backoff_max: Duration,
    /// How often the relay refreshes its row in `tidings.relays`. Defaults to 5 seconds.
    pub heartbeat_interval: Duration,
    /// Run `VACUUM tidings.outbox` from the run loop after this many rows left the outbox
    /// (delivered or dead-lettered), at most once per 5 seconds; 0 turns it off. A queue table
    /// collects dead rows as fast as it delivers, and autovacuum wakes at most once a minute
    /// (`autovacuum_naptime`), or never where it is off; without this, claims slow down as dead
    /// index entries pile up. Needs the relay's role to own the table (PostgreSQL 15); without
    /// that it logs one warning and stops trying. Defaults to 20,000.
    pub vacuum_every: u64,
    /// Prepare the claim and finish statements once per pooled connection and reuse them.
    /// Turn it off when the pool goes through PgBouncer in transaction mode (before 1.21, or
    /// without `max_prepared_statements`): a named statement lives on one server connection,
    /// and the pooler hands the next transaction another one ("prepared statement does not
    /// exist"). Off, every statement is sent unnamed with typed parameters (parsed and planned
    /// each time). LISTEN does not work through such a pooler either: set `listen` to false
    /// too, or give [`crate::Relay::with_listener`] a direct connection. Defaults to true.
    pub statement_cache: bool,
    /// After shutdown is requested, how long [`crate::Relay::run`] lets the batch in flight
    /// finish before abandoning it (its rows are released and delivered again later).
    /// Defaults to 20 seconds.
    pub shutdown_timeout: Duration,
    /// The database's name when one process serves several (`tidings relay --database
    /// NAME=URL`): a `db` label on every metric the relay records. None (the default) for a
    /// relay of one database: no `db` label. Never a URL.
    pub database: Option<String>,
}

#[derive(clap::Args)]
/// The `tidings relay` flags and environment variables: the relay's settings, its pool and the
/// sink with its own flags. [`RelayArgs::config`] turns them into a [`RelayConfig`].
pub struct RelayArgs {
    /// Where to deliver messages, and each sink's own flags (behind its cargo feature).
    #[command(flatten)]
    pub sink: crate::sink::SinkArgs,
    /// Instance name shown in `tidings status` [default: <host>-<pid>].
    #[arg(long, env = "TIDINGS_RELAY_NAME")]
    pub name: Option<String>,
    /// Rows claimed and published per batch.
    #[arg(long, env = "TIDINGS_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Batches the relay works on at once (1-16): while one waits for the broker, the next is
    /// claimed and published (needs --pool-size > lanes) [default: 2, or 1 with --pool-size 1
    /// or 2].
    #[arg(long, env = "TIDINGS_LANES")]
    pub lanes: Option<usize>,
    /// Polling interval when no notification arrives (e.g. 500ms, 2s).
    #[arg(long, env = "TIDINGS_POLL_INTERVAL", value_parser = parse_duration, default_value = "100ms")]
    pub poll_interval: Duration,
    /// Polling interval right after a batch that found messages (while traffic flows).
    #[arg(long, env = "TIDINGS_BUSY_POLL_INTERVAL", value_parser = parse_duration, default_value = "2ms")]
    pub busy_poll_interval: Duration,
    /// Do not LISTEN for producers' notifications; find work by polling only (PgBouncer in
    /// transaction mode).
    #[arg(long, env = "TIDINGS_NO_LISTEN")]
    pub no_listen: bool,
    /// The database URL goes through PgBouncer in transaction mode: no prepared statements
    /// (every statement is sent unnamed) and no LISTEN (implies --no-listen).
    #[arg(long, env = "TIDINGS_PGBOUNCER")]
    pub pgbouncer: bool,
    /// Longest a relay may hold claimed rows while silent; bounds failover of a hung relay.
    #[arg(long, env = "TIDINGS_CLAIM_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    pub claim_timeout: Duration,
    /// Longest wait for one broker acknowledgement (below --claim-timeout).
    #[arg(long, env = "TIDINGS_PUBLISH_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub publish_timeout: Duration,
    /// Attempts before a message is dead-lettered.
    #[arg(long, env = "TIDINGS_MAX_ATTEMPTS", default_value_t = 10)]
    pub max_attempts: i32,
    /// First retry backoff; doubles per attempt, with jitter.
    #[arg(long, env = "TIDINGS_BACKOFF_BASE", value_parser = parse_duration, default_value = "1s")]
    pub backoff_base: Duration,
    /// Longest retry backoff; claim timeout + publish timeout + this must fit in the broker's
    /// dedup window (checked at start-up).
    #[arg(long, env = "TIDINGS_BACKOFF_MAX", value_parser = parse_duration, default_value = "1m")]
    pub backoff_max: Duration,
    /// How often the relay refreshes its row (and counters) in tidings.relays.
    #[arg(long, env = "TIDINGS_HEARTBEAT_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub heartbeat_interval: Duration,
    /// VACUUM tidings.outbox after this many rows left it (0 = never; needs table ownership).
    #[arg(long, env = "TIDINGS_VACUUM_EVERY", default_value_t = 20_000)]
    pub vacuum_every: u64,
    /// Database connections in the relay's pool (the LISTEN connection is extra) [default:
    /// lanes + 1].
    #[arg(long, env = "TIDINGS_PG_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// With --databases-file: how often the file is re-read (SIGHUP re-reads it at once).
    #[arg(long, env = "TIDINGS_DATABASES_RELOAD", value_parser = crate::parse_duration, default_value = "10s")]
    pub databases_reload: Duration,
    /// Serve Prometheus metrics at /metrics, liveness at /healthz and readiness at /readyz on
    /// this address (e.g. 127.0.0.1:9464, or 0.0.0.0:9464 inside a container). Off unless set.
    #[arg(long, env = "TIDINGS_ADMIN_LISTEN")]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Token that allows the operator page's actions (replay, purge), sent by the page as a
    /// bearer token. Without it the page is read-only. Prefer the variable: command lines are
    /// visible to other users.
    #[arg(long, env = "TIDINGS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Database URL the operator page reads and acts with (e.g. the operator role of the
    /// shipped grants, which may replay and purge; the relay's own role may not). Defaults to
    /// the relay's.
    #[arg(long, env = "TIDINGS_ADMIN_DATABASE_URL", hide_env_values = true)]
    pub admin_database_url: Option<String>,
    /// Host names the operator page answers to besides localhost and IP addresses (requests
    /// naming another host are refused: DNS rebinding). Comma-separated or repeated.
    #[arg(
        long = "admin-hosts",
        env = "TIDINGS_ADMIN_HOSTS",
        value_delimiter = ','
    )]
    pub admin_hosts: Vec<String>,
    /// Longest wait for in-flight work on SIGTERM/SIGINT before exiting anyway.
    #[arg(long, env = "TIDINGS_SHUTDOWN_TIMEOUT", value_parser = parse_duration, default_value = "20s")]
    pub shutdown_timeout: Duration,
}

/// The daemon's lanes when neither `--lanes` nor a smaller `--pool-size` says otherwise: enough
/// overlap for a broker whose acknowledgements take longer than the database's side of a batch
/// (see "Performance" in the README). Extra lanes work only while there is a backlog.
pub const DEFAULT_LANES: usize = 2;

impl RelayArgs {
    /// `--lanes`, or [`DEFAULT_LANES`], fewer when `--pool-size` leaves no room for them (a lane
    /// per connection, and one connection for heartbeats).
    pub fn lanes(&self) -> usize {
        match (self.lanes, self.pool_size) {
            (Some(lanes), _) => lanes,
            (None, Some(pool)) => pool.saturating_sub(1).clamp(1, DEFAULT_LANES),
            (None, None) => DEFAULT_LANES,
        }
    }

    /// `--pool-size`, or one connection per lane and one for heartbeats.
    pub fn pool_size(&self) -> usize {
        self.pool_size.unwrap_or(self.lanes().saturating_add(1))
    }

    /// The relay settings these flags ask for (checked by `Relay::new`).
    pub fn config(&self) -> RelayConfig {
        let mut config = RelayConfig {
            batch_size: self.batch_size,
            lanes: self.lanes(),
            poll_interval: self.poll_interval,
            busy_poll_interval: self.busy_poll_interval,
            // LISTEN through a transaction pooler registers on whichever server connection the
            // statement lands on: notifications then go to other clients or nowhere.
            listen: !self.no_listen && !self.pgbouncer,
            statement_cache: !self.pgbouncer,
            claim_timeout: self.claim_timeout,
            publish_timeout: self.publish_timeout,
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            heartbeat_interval: self.heartbeat_interval,
            vacuum_every: self.vacuum_every,
            shutdown_timeout: self.shutdown_timeout,
            ..Default::default()
        };
        if let Some(name) = &self.name {
            config.name = name.clone();
        }
        config
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        let host = hostname();
        RelayConfig {
            name: format!("{host}-{}", std::process::id()),
            batch_size: 500,
            lanes: 1,
            poll_interval: Duration::from_millis(100),
            busy_poll_interval: Duration::from_millis(2),
            listen: true,
            claim_timeout: Duration::from_secs(15),
            publish_timeout: Duration::from_secs(5),
            max_attempts: 10,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            unavailable_backoff_max: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            vacuum_every: 20_000,
            statement_cache: true,
            shutdown_timeout: Duration::from_secs(20),
            database: None,
        }
    }
}

/// Parses `250ms`, `15s`, `5m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use e.g. 500ms, 15s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl RelayConfig {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        if !(1..=10_000).contains(&self.batch_size) {
            return bad("batch_size must be between 1 and 10000");
        }
        if !(1..=16).contains(&self.lanes) {
            return bad("lanes must be between 1 and 16");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval must be greater than 0");
        }
        if self.busy_poll_interval > self.poll_interval {
            return bad("busy_poll_interval must be at most poll_interval");
        }
        // PostgreSQL takes the claim timeout as a statement/idle timeout in milliseconds (at
        // most 2^31 - 1, about 24 days); an hour is far past any sane failover time.
        if self.claim_timeout < Duration::from_secs(1)
            || self.claim_timeout > Duration::from_secs(3600)
        {
            return bad("claim_timeout must be between 1 second and 1 hour");
        }
        // A batch's publishes and, after a batch that failed as a whole, a health check of the
        // broker (each bounded by the publish timeout) must end inside the claim.
        if self.publish_timeout.is_zero()
            || self.publish_timeout * 2 + crate::relay::CLAIM_MARGIN > self.claim_timeout
        {
            return bad(
                "publish_timeout must be greater than 0 and at most (claim_timeout - 1 second) / 2: a batch's publishes and a broker health check must both fit in the claim",
            );
        }
        if !(1..=10_000).contains(&self.max_attempts) {
            return bad("max_attempts must be between 1 and 10000");
        }
        if self.backoff_base.is_zero() || self.backoff_base > self.backoff_max {
            return bad("backoff_base must be greater than 0 and at most backoff_max");
        }
        if self.backoff_max > Duration::from_secs(7 * 86400) {
            return bad("backoff_max must be at most 7 days");
        }
        if self.poll_interval > Duration::from_secs(3600)
            || self.heartbeat_interval > Duration::from_secs(3600)
            || self.unavailable_backoff_max > Duration::from_secs(3600)
        {
            return bad("poll_interval, heartbeat_interval and unavailable_backoff_max must be at most 1 hour");
        }
        if self.unavailable_backoff_max.is_zero() || self.heartbeat_interval.is_zero() {
            return bad("unavailable_backoff_max and heartbeat_interval must be greater than 0");
        }
        if self.shutdown_timeout.is_zero() || self.shutdown_timeout > Duration::from_secs(3600) {
            return bad("shutdown_timeout must be between 0 and 1 hour");
        }
        if self.name.is_empty() {
            return bad("name must not be empty");
        }
        Ok(())
    }

    /// Backoff before retry number `attempt` (1 = first retry): base * 2^(attempt-1), capped,
    /// then "equal jitter" (half fixed, half random) so failed messages do not retry in lockstep.
    pub(crate) fn backoff(&self, attempt: i32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << (attempt - 1).clamp(0, 30) as u32);
        jitter(exp.min(self.backoff_max))
    }
}

/// Half of `d` plus a random part of the other half.
pub(crate) fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        relay: RelayArgs,
    }

    /// The daemon runs 2 lanes with a pool of 3 unless told otherwise; a small pool alone
    /// lowers the lanes (never an error), an explicit --lanes sizes the pool.
    #[test]
    fn lanes_and_pool_default_together() {
        use clap::Parser;
        // clap reads the environment: these would decide instead of the flags under test.
        if ["TIDINGS_LANES", "TIDINGS_PG_POOL_SIZE"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
        {
            eprintln!("skipped: TIDINGS_LANES or TIDINGS_PG_POOL_SIZE is set");
            return;
        }
        for (flags, lanes, pool) in [
            (&[][..], 2, 3),
            (&["--pool-size", "1"][..], 1, 1),
            (&["--pool-size", "2"][..], 1, 2),
            (&["--pool-size", "3"][..], 2, 3),
            (&["--pool-size", "10"][..], 2, 10),
            (&["--lanes", "1"][..], 1, 2),
            (&["--lanes", "6"][..], 6, 7),
            (&["--lanes", "3", "--pool-size", "8"][..], 3, 8),
        ] {
            let cli = Cli::try_parse_from(std::iter::once("tidings").chain(flags.iter().copied()))
                .unwrap();
            assert_eq!(
                (cli.relay.lanes(), cli.relay.pool_size()),
                (lanes, pool),
                "{flags:?}"
            );
            assert_eq!(cli.relay.config().lanes, lanes, "{flags:?}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let c = RelayConfig {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            ..Default::default()
        };
        for (attempt, full) in [(1, 1), (2, 2), (3, 4), (7, 60), (40, 60)] {
            let b = c.backoff(attempt);
            let full = Duration::from_secs(full);
            assert!(b >= full / 2 && b <= full, "attempt {attempt}: {b:?}");
        }
    }

    #[test]
    fn publish_timeout_must_stay_below_claim_timeout() {
        let c = RelayConfig {
            publish_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("publish_timeout"));
        assert!(RelayConfig::default().validate().is_ok());
    }
}
