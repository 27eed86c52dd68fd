//! The relay: claim a batch, publish it, record the outcome, repeat.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tidings_outbox::MessageId;
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, Json, ToSql, Type};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::{hostname, jitter};
use crate::metrics as m;
use crate::sink::{Envelope, Sink, SinkError};
use crate::{Error, RelayConfig};

const CLAIM_BATCH: &str = include_str!("sql/claim_batch.sql");
const FINISH_BATCH: &str = include_str!("sql/finish_batch.sql");
const HEARTBEAT: &str = include_str!("sql/heartbeat.sql");
/// Time kept free between the last possible publish and the claim timeout.
pub(crate) const CLAIM_MARGIN: Duration = Duration::from_secs(1);
/// Not more often than this, whatever `vacuum_every` says.
const VACUUM_MIN_GAP: Duration = Duration::from_secs(5);
/// vacuum_outbox: reclaim the dead rows delivered batches leave behind. Not in a transaction.
const VACUUM: &str = "VACUUM (SKIP_LOCKED) tidings.outbox";
/// may_vacuum: whether the relay's role owns the outbox (or is a superuser).
const MAY_VACUUM: &str = "SELECT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false) \
     OR pg_has_role(current_user, c.relowner, 'MEMBER') FROM pg_class c WHERE c.oid = 'tidings.outbox'::regclass";
/// How long a row whose outcome the database refuses to record (and to dead-letter) is left
/// alone by this relay before it is tried again.
const QUARANTINE: Duration = Duration::from_secs(300);
/// The longest a relay waits for its VACUUM of the outbox (client side).
const VACUUM_LIMIT: Duration = Duration::from_secs(600);
/// The longest a stopping relay waits to remove its row from `tidings.relays`.
const DEREGISTER_LIMIT: Duration = Duration::from_secs(2);
/// Added to claim timeout + publish timeout to bound a whole tick on the client side.
const TICK_GRACE: Duration = Duration::from_secs(5);
/// How long the run loop keeps busy-polling after the last batch that found messages.
const BUSY_LINGER: Duration = Duration::from_secs(1);
const DEREGISTER: &str = "DELETE FROM tidings.relays WHERE id = $1";
/// Pipelined before the finish statement, so that a finish the database refuses can be undone
/// without losing the claim (see `record_outcomes`).
const SAVEPOINT: &str = "SAVEPOINT tidings_finish";
/// Undoes a refused finish and drops the savepoint, so that refused rows do not leave nested
/// subtransactions open behind them.
const ROLLBACK_TO_SAVEPOINT: &str =
    "ROLLBACK TO SAVEPOINT tidings_finish; RELEASE SAVEPOINT tidings_finish";
const RELEASE_SAVEPOINT: &str = "RELEASE SAVEPOINT tidings_finish";
/// Pipelined after the finish statement: one simple query, so that when the finish was refused
/// the RELEASE fails and the COMMIT behind it is not run (the claim stays open).
const RELEASE_AND_COMMIT: &str = "RELEASE SAVEPOINT tidings_finish; COMMIT";

/// Every statement the relay runs, for a test that prepares them against a migrated database.
pub const STATEMENTS: &[&str] = &[CLAIM_BATCH, FINISH_BATCH, HEARTBEAT, DEREGISTER, MAY_VACUUM];

/// Whether a relay can work now ([`Relay::readiness`]), as `/readyz` serves it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    /// Everything below is fine.
    pub ready: bool,
    /// What is not, one line each (names the sink, never a URL or a password).
    pub reasons: Vec<String>,
}

/// What one [`Relay::tick`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Rows locked by the claim.
    pub claimed: usize,
    /// Published and acknowledged, and removed from the outbox.
    pub delivered: usize,
    /// Of those, how many the broker reported as duplicates of an earlier send.
    pub duplicates: usize,
    /// Failed and scheduled for a retry with backoff.
    pub retried: usize,
    /// Moved to the dead-letter store (including `isolated` ones).
    pub dead_lettered: usize,
    /// Of those, rows whose outcome the database refused to record with the rest of the
    /// batch; each was dead-lettered on its own so that the rest of the batch could commit.
    pub isolated: usize,
    /// Claimed but not publishable yet: an older message of the same key is pending.
    pub held_back: usize,
    /// Released untouched: the broker was unavailable, or an older message of the same key
    /// failed in this batch.
    pub released: usize,
    /// The broker was unavailable; the relay backs off before the next claim.
    pub sink_unavailable: bool,
    /// Failed because their destination was down (one webhook endpoint of several): each
    /// waits for the time the sink asked, without counting an attempt.
    pub postponed: usize,
}

impl std::ops::AddAssign<&TickReport> for TickReport {
    /// Sums counts (for a drain of several ticks); `sink_unavailable` if any tick had it.
    fn add_assign(&mut self, r: &TickReport) {
        self.claimed += r.claimed;
        self.delivered += r.delivered;
        self.duplicates += r.duplicates;
        self.retried += r.retried;
        self.dead_lettered += r.dead_lettered;
        self.isolated += r.isolated;
        self.held_back += r.held_back;
        self.released += r.released;
        self.sink_unavailable |= r.sink_unavailable;
        self.postponed += r.postponed;
    }
}

type ListenerFactory =
    Box<dyn Fn(Arc<Notify>, CancellationToken) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Default)]
struct Counters {
    delivered: i64,
    failed: i64,
    dead: i64,
    duplicates: i64,
}

struct State {
    counters: Counters,
    /// Rows removed from the outbox since the last VACUUM.
    removed_since_vacuum: u64,
    last_vacuum: Option<Instant>,
    /// Set when VACUUM was refused (not the owner): stop trying.
    vacuum_refused: bool,
    last_heartbeat: Option<Instant>,
    /// Consecutive ticks that found the broker unavailable.
    unavailable_streak: u32,
    unavailable_since_log: Option<Instant>,
    /// Ticks run so far.
    ticks: u64,
    /// Rows whose outcome could neither be recorded nor dead-lettered, by seq, with when: not
    /// published again for `QUARANTINE`, so that such a row is not re-sent every busy tick.
    quarantine: std::collections::HashMap<i64, Instant>,
}

/// Delivers committed outbox rows to a [`Sink`], at least once.
///
/// Drive it with [`Relay::run`] (the daemon loop) or one step at a time with [`Relay::tick`].
/// Any number of relays may run against one database.
pub struct Relay {
    pool: deadpool_postgres::Pool,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    id: Uuid,
    listener: Option<ListenerFactory>,
    state: Mutex<State>,
    /// BEGIN and the claim transaction's settings, built once from the config.
    begin: String,
}

enum Outcome {
    Delivered {
        duplicate: bool,
    },
    Failed(SinkError),
    /// Not attempted: an older message of its key failed earlier in this batch.
    Skipped,
}

impl Relay {
    /// A relay claiming through `pool` and publishing to `sink`. Checks the config.
    /// Without [`Relay::with_listener`] it finds work by polling only.
    pub fn new(
        pool: deadpool_postgres::Pool,
        sink: Arc<dyn Sink>,
        config: RelayConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        check_dedup_window(&config, sink.as_ref())?;
        let connections = pool.status().max_size;
        if connections < config.lanes {
            return Err(Error::Config(format!(
                "the pool holds {connections} connections, fewer than the relay's {} lanes: each lane holds one while it works on a batch (give the pool lanes + 1)",
                config.lanes
            )));
        }
        // Bound how long a claim transaction may hold its rows if this process hangs:
        // PostgreSQL then ends the session and another relay takes the rows (failover).
        // JIT off: see claim_batch.sql.
        let timeout_ms = config.claim_timeout.as_millis();
        let begin = format!(
            "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {timeout_ms}; \
             SET LOCAL statement_timeout = {timeout_ms}; SET LOCAL jit = off"
        );
        Ok(Relay {
            begin,
            pool,
            sink,
            config,
            id: Uuid::now_v7(),
            listener: None,
            state: Mutex::new(State {
                counters: Counters::default(),
                removed_since_vacuum: 0,
                last_vacuum: None,
                vacuum_refused: false,
                last_heartbeat: None,
                unavailable_streak: 0,
                unavailable_since_log: None,
                ticks: 0,
                quarantine: std::collections::HashMap::new(),
            }),
        })
    }

    /// Wakes the relay on producers' commits through LISTEN on a dedicated connection (never a
    /// pooled one) made from `pg` and `tls`. Ignored when `config.listen` is false.
    pub fn with_listener<T>(mut self, pg: tokio_postgres::Config, tls: T) -> Self
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>
            + Clone
            + Send
            + Sync
            + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
    {
        if self.config.listen {
            self.listener = Some(Box::new(move |notify, stop| {
                Box::pin(crate::listener::listen(
                    pg.clone(),
                    tls.clone(),
                    notify,
                    stop,
                ))
            }));
        }
        self
    }

    /// The longest one database round trip of a tick may take on the client side: a third of
    /// the claim timeout, between 1 and 10 seconds (5 s by default). A claim or finish that
    /// takes longer is a database in trouble; the tick fails, rolls back, and is retried.
    fn db_step_limit(&self) -> Duration {
        (self.config.claim_timeout / 3).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// Metric labels: `pairs`, then `db` when the relay serves a named database of a fleet.
    fn labels(&self, pairs: &[(&'static str, &str)]) -> Vec<metrics::Label> {
        let mut v: Vec<metrics::Label> = pairs
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.to_string()))
            .collect();
        if let Some(db) = &self.config.database {
            v.push(metrics::Label::new("db", db.clone()));
        }
        v
    }

    /// How many ticks this relay has run (a test and metrics hook).
    pub fn ticks(&self) -> u64 {
        self.state.lock().map(|s| s.ticks).unwrap_or(0)
    }

    /// This instance's id (its row in `tidings.relays`).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The settings in force.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Fails with an error naming `tidings migrate up` unless the schema is current.
    pub async fn check_schema(&self) -> Result<(), Error> {
        self.bounded(self.config.claim_timeout, async |client| {
            tidings_migrations::postgres::ensure_current(client).await?;
            Ok(())
        })
        .await
    }

    /// Runs `work` on a pooled connection, bounded on the client side by `limit` (getting the
    /// connection included): a server that stopped answering never enforces its own timeouts.
    /// On timeout the connection is taken out of the pool and closed, so that the next user
    /// gets a fresh one instead of queueing behind a request that will never be answered.
    async fn bounded<T>(
        &self,
        limit: Duration,
        work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut client = match tokio::time::timeout(limit, self.pool.get()).await {
            Ok(c) => c?,
            Err(_) => return Err(Error::DatabaseTimeout(limit)),
        };
        match tokio::time::timeout(limit, work(&mut client)).await {
            // A step inside `work` gave up on the database: same treatment.
            Ok(Err(Error::DatabaseTimeout(d))) => {
                drop(deadpool_postgres::Object::take(client));
                Err(Error::DatabaseTimeout(d))
            }
            Ok(r) => r,
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Err(Error::DatabaseTimeout(limit))
            }
        }
    }

    /// Runs until `shutdown` is cancelled: refuses to start on a schema with pending migrations,
    /// then ticks whenever notified, when the poll interval passes, or at once while batches come
    /// back full. An in-flight batch is finished before returning. Database errors are logged
    /// and retried with backoff; they do not end the loop.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), Error> {
        self.check_schema().await?;
        let wake = Arc::new(Notify::new());
        let listener_stop = shutdown.child_token();
        let listener = self
            .listener
            .as_ref()
            .map(|f| tokio::spawn(f(wake.clone(), listener_stop.clone()).in_current_span()));
        tracing::info!(relay = %self.config.name, id = %self.id, sink = self.sink.name(),
            listen = listener.is_some(), lanes = self.config.lanes, "relay started");
        // Lanes: each claims, publishes and commits its own batches; a lane that finds a full
        // batch (a backlog) wakes the others, so the next batch is claimed while this one's
        // acknowledgements are awaited.
        let more = Notify::new();
        let abandoned = futures::future::join_all(
            (0..self.config.lanes.max(1)).map(|lane| self.lane(lane, &shutdown, &wake, &more)),
        )
        .await
        .into_iter()
        .any(|abandoned| abandoned);
        listener_stop.cancel();
        if let Some(l) = listener {
            let _ = l.await;
        }
        // Unnamed statements, here and below: safe through PgBouncer in transaction mode, and
        // one round trip instead of a prepare plus an execute. Bounded: shutdown must finish.
        let _ = self
            .bounded(DEREGISTER_LIMIT, async |client| {
                client
                    .query_typed(DEREGISTER, &[(&self.id, Type::UUID)])
                    .await?;
                Ok(())
            })
            .await;
        match tokio::time::timeout(self.config.publish_timeout, self.sink.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "closing the sink failed"),
            Err(_) => tracing::warn!("the sink did not close within the publish timeout"),
        }
        if abandoned {
            tracing::warn!(relay = %self.config.name, timeout = ?self.config.shutdown_timeout,
                "the batch in flight did not finish in time and was abandoned; its rows are released");
            return Err(Error::ShutdownTimeout(self.config.shutdown_timeout));
        }
        tracing::info!(relay = %self.config.name, "relay stopped");
        Ok(())
    }

    /// One lane of [`Relay::run`]: ticks until `shutdown`; returns whether its batch in flight
    /// was abandoned at the shutdown deadline. Lane 0 polls, listens (`wake`) and heartbeats
    /// while idle; the other lanes only help with a backlog: after a batch that was not full
    /// they sleep until a lane finds a full one (`more`), and after a batch that was mostly
    /// held back they wait a poll interval.
    async fn lane(
        &self,
        lane: usize,
        shutdown: &CancellationToken,
        wake: &Notify,
        more: &Notify,
    ) -> bool {
        let mut db_errors = 0u32;
        let mut last_traffic = Instant::now() - BUSY_LINGER;
        // After shutdown is requested, the batch in flight gets `shutdown_timeout` to finish;
        // then it is abandoned: dropping it rolls its claim back, and its rows are released
        // (delivered again later; the broker drops what it already has).
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(self.config.shutdown_timeout).await;
        };
        tokio::pin!(deadline);
        while !shutdown.is_cancelled() {
            let tick = tokio::select! {
                t = self.tick() => t,
                _ = &mut deadline => return true,
            };
            if tick.is_ok() {
                self.maybe_vacuum().await;
            }
            // An extra lane whose batch was mostly held back (keyed rows whose older rows
            // another lane or relay holds) waits a poll interval before claiming again:
            // re-claiming them at once only takes the database from the lane that can deliver
            // them (with 1,000 keys, 4 lanes that did so delivered half of what one lane did).
            // (Not during a broker outage: that is lane 0's to back off from, below.)
            if lane > 0 && matches!(&tick, Ok(r) if !r.sink_unavailable && mostly_held_back(r)) {
                db_errors = 0;
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(jitter(self.config.poll_interval)) => {}
                }
                continue;
            }
            // An extra lane stops at anything but a full batch that moved something (an empty
            // or partial batch, a broker outage, a database error): lane 0 alone polls, backs
            // off and logs, and wakes the others when a backlog shows up again.
            let idle = lane > 0
                && !matches!(&tick, Ok(r) if !r.sink_unavailable
                    && r.claimed >= self.config.batch_size
                    && r.delivered + r.retried + r.dead_lettered > 0);
            let wait = match tick {
                Ok(r) if r.sink_unavailable => self.unavailable_pause(),
                Ok(r) => {
                    db_errors = 0;
                    // More is waiting, unless the full batch was all held back (another relay is
                    // still on those keys): re-claiming at once would only spin.
                    let progressed = r.delivered + r.retried + r.dead_lettered > 0;
                    if r.claimed >= self.config.batch_size && progressed {
                        more.notify_waiters();
                        continue;
                    }
                    // Only batches that moved something count as traffic: a claim that found only
                    // held-back rows (another session holds their key's head) waits a full poll
                    // interval instead of re-claiming every busy-poll tick.
                    if progressed {
                        last_traffic = Instant::now();
                    }
                    // While traffic flows (and for a second after), poll fast; a single empty
                    // batch between two commits must not cost a whole poll interval.
                    if last_traffic.elapsed() < BUSY_LINGER {
                        self.config.busy_poll_interval
                    } else {
                        self.config.poll_interval
                    }
                }
                Err(e) => {
                    db_errors += 1;
                    metrics::counter!(m::DB_ERRORS, self.labels(&[])).increment(1);
                    let pause = jitter(
                        (Duration::from_millis(250) * 2u32.pow(db_errors.min(7)))
                            .min(Duration::from_secs(30)),
                    );
                    // Every failure while few, then one in 16: a long database outage logs
                    // about twice a minute, not on every attempt.
                    if db_errors <= 3 || db_errors.is_multiple_of(16) {
                        tracing::warn!(error = %crate::ErrorChain(&e), failures = db_errors, lane, retry_in = ?pause, "relay tick failed (database); retrying");
                    }
                    pause
                }
            };
            if idle {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = more.notified() => {}
                }
                continue;
            }
            // Long pauses (broker outage, database errors, a long poll interval) are cut into
            // heartbeat intervals, so that `tidings status` never shows a live relay as dead.
            let until = tokio::time::Instant::now() + wait;
            loop {
                let step = until
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(self.config.heartbeat_interval);
                let woke = tokio::select! {
                    _ = shutdown.cancelled() => true,
                    _ = wake.notified(), if lane == 0 => true,
                    _ = tokio::time::sleep(step) => false,
                };
                if woke || tokio::time::Instant::now() >= until {
                    break;
                }
                self.heartbeat_if_due().await;
            }
        }
        false
    }

    fn unavailable_pause(&self) -> Duration {
        jitter(self.sink_backoff().unwrap_or(self.config.poll_interval))
    }

    /// The relay's connection pool.
    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.pool
    }

    /// The sink.
    pub fn sink(&self) -> &Arc<dyn Sink> {
        &self.sink
    }

    /// Whether this relay can do its work now: the database answers (`SELECT 1`), the sink's
    /// health check passes, and the relay is not backing off from a broker outage; each probe
    /// bounded by two seconds. What a readiness probe (`/readyz`) serves.
    pub async fn readiness(&self) -> Readiness {
        const LIMIT: Duration = Duration::from_secs(2);
        let mut reasons = Vec::new();
        let db = async {
            let c = self.pool.get().await.map_err(Error::from)?;
            c.simple_query("SELECT 1").await.map_err(Error::from)?;
            Ok::<_, Error>(())
        };
        match tokio::time::timeout(LIMIT, db).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => reasons.push(format!("database: {}", crate::ErrorChain(&e))),
            Err(_) => reasons.push(format!("database: no answer within {LIMIT:?}")),
        }
        let sink_ok = match tokio::time::timeout(LIMIT, self.sink.check()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                reasons.push(format!("sink {}: {e}", self.sink.name()));
                false
            }
            Err(_) => {
                reasons.push(format!(
                    "sink {}: no answer to its health check within {LIMIT:?}",
                    self.sink.name()
                ));
                false
            }
        };
        // A backoff left from an outage the check no longer sees does not hold readiness
        // (another relay may have drained the backlog, so this one claims nothing to reset it).
        if let (Some(b), false) = (self.sink_backoff(), sink_ok) {
            reasons.push(format!(
                "sink {}: backing off {b:?} after finding the broker unavailable",
                self.sink.name()
            ));
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
        }
    }

    /// How long the run loop pauses before the next claim because the broker was unavailable,
    /// growing with consecutive outages up to `unavailable_backoff_max`. None while the broker
    /// is fine.
    pub fn sink_backoff(&self) -> Option<Duration> {
        let streak = self.state.lock().map(|s| s.unavailable_streak).unwrap_or(0);
        if streak == 0 {
            return None;
        }
        let exp =
            Duration::from_millis(500).saturating_mul(2u32.saturating_pow((streak - 1).min(16)));
        Some(exp.min(self.config.unavailable_backoff_max))
    }

    /// One step: claim a batch, publish it, record the outcome, commit. Per-message failures are
    /// data in the report (and on the rows), not errors; an error means the database failed, and
    /// then every claimed row is released by the rollback.
    pub async fn tick(&self) -> Result<TickReport, Error> {
        let span = tracing::info_span!("relay_batch", relay = %self.config.name,
            claimed = tracing::field::Empty, delivered = tracing::field::Empty,
            retried = tracing::field::Empty, dead = tracing::field::Empty,
            held_back = tracing::field::Empty, ms = tracing::field::Empty);
        let started = Instant::now();
        if let Ok(mut s) = self.state.lock() {
            s.ticks += 1;
        }
        // A database that accepts the connection and then never answers (frozen server, dead
        // proxy) must not hang the relay silently: PostgreSQL ends a claim after the claim
        // timeout, so a tick that takes much longer is waiting on a server that is gone.
        let limit = self.config.claim_timeout + self.config.publish_timeout + TICK_GRACE;
        let report = async {
            let conn = match tokio::time::timeout(limit, self.pool.get()).await {
                Ok(c) => c?,
                Err(_) => return Err(Error::DatabaseTimeout(limit)),
            };
            // Dropped with its transaction open (an error, a timeout, or this future dropped at
            // the shutdown deadline), the guard closes the connection: see ClaimTx.
            let tx = ClaimTx::new(conn);
            match tokio::time::timeout(limit, self.tick_inner(&tx)).await {
                Ok(r) => r,
                Err(_) => Err(Error::DatabaseTimeout(limit)),
            }
        }
        .instrument(span.clone())
        .await?;
        if report.claimed > 0 {
            metrics::histogram!(m::BATCH_SECONDS, self.labels(&[("sink", self.sink.name())]))
                .record(started.elapsed().as_secs_f64());
            span.record("claimed", report.claimed);
            span.record("delivered", report.delivered);
            span.record("retried", report.retried);
            span.record("dead", report.dead_lettered);
            span.record("held_back", report.held_back);
            span.record("ms", started.elapsed().as_secs_f64() * 1e3);
            span.in_scope(|| tracing::debug!("batch done"));
        }
        self.after_tick(&report).await;
        Ok(report)
    }

    async fn tick_inner(&self, tx: &ClaimTx) -> Result<TickReport, Error> {
        // Prepared once per pooled connection: no parse/plan and no extra round trip per batch.
        // Without the cache (PgBouncer in transaction mode, where a named statement does not
        // outlive the transaction's server connection) both run as unnamed statements with
        // typed parameters, parsed and planned every time (in the same flights either way).
        // Each database step is bounded on its own, so that a database that stops answering is
        // noticed (and logged) within seconds, not only after a whole tick's allowance.
        let step = self.db_step_limit();
        let client = tx.client();
        let (claim, finish) = if self.config.statement_cache {
            let (claim, finish) = bounded_step(step, async {
                tokio::try_join!(
                    client.prepare_cached(CLAIM_BATCH),
                    client.prepare_cached(FINISH_BATCH)
                )
            })
            .await?;
            (Stmt::Cached(claim), Stmt::Cached(finish))
        } else {
            (Stmt::Unnamed(CLAIM_BATCH), Stmt::Unnamed(FINISH_BATCH))
        };
        // BEGIN and the settings go in the same flight as the claim.
        let limit = self.config.batch_size as i64;
        let params: [(&(dyn ToSql + Sync), Type); 1] = [(&limit, Type::INT8)];
        let rows = bounded_step(step, async {
            let (begun, rows) = tokio::join!(
                biased;
                client.batch_execute(&self.begin),
                claim.query(client, &params)
            );
            begun.and(rows)
        })
        .await?;
        let claim_deadline = Instant::now() + self.config.claim_timeout;
        let mut report = TickReport {
            claimed: rows.len(),
            ..Default::default()
        };
        if rows.is_empty() {
            bounded_step(step, tx.commit()).await?;
            return Ok(report);
        }
        col::check(&rows[0])?;
        let mut batch = Vec::with_capacity(rows.len());
        // Per message of `batch`: why it can never be published, for rows the schema did not
        // (yet) refuse (written before the hardening migration, or by a table owner who
        // dropped a constraint). Such a row is dead-lettered, never handed to the sink.
        let mut invalid = Vec::with_capacity(rows.len());
        // Where each message of `batch` is in the table, for the finish to delete it by TID.
        let mut tids = Vec::with_capacity(rows.len());
        // Topics already found valid in this batch (a batch usually has a handful).
        let mut topics: Vec<String> = Vec::new();
        // Walked in seq order: the claim returns rows in that order (the order it was
        // materialised in); sorted if they ever are not. A key's messages are published in
        // batch order, and eligibility is decided down each key's chain.
        let mut order: Vec<(i64, usize)> = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            order.push((row.try_get(col::SEQ)?, i));
        }
        if !order.is_sorted() {
            order.sort_unstable();
        }
        // Keyed rows of this claim and whether each may go (see prev_seq in claim_batch.sql).
        let mut keyed: std::collections::HashMap<i64, bool> = std::collections::HashMap::new();
        for &(seq, i) in &order {
            let row = &rows[i];
            let prev: Option<i64> = row.try_get(col::PREV_SEQ)?;
            let eligible = prev.is_none_or(|p| keyed.get(&p) == Some(&true));
            // A key that cannot be read counts as a key (the row is dead-lettered as invalid).
            let has_key = row
                .try_get::<_, Option<&str>>(col::KEY)
                .map_or(true, |k| k.is_some());
            if prev.is_some() || has_key {
                keyed.insert(seq, eligible);
            }
            if !eligible {
                report.held_back += 1;
                continue;
            }
            let (env, bad) = envelope_from_row(row, &mut topics)?;
            tids.push(row.try_get::<_, Tid>(col::CTID)?);
            batch.push(env);
            invalid.push(bad);
        }
        drop(rows);
        let hold: Vec<bool> = match self.state.lock() {
            Ok(mut s) => {
                s.quarantine.retain(|_, since| since.elapsed() < QUARANTINE);
                batch
                    .iter()
                    .map(|m| s.quarantine.contains_key(&m.seq))
                    .collect()
            }
            Err(_) => vec![false; batch.len()],
        };
        let publish_started = Instant::now();
        // One span per message, a child of the producer's span (its traceparent), open while
        // the message is published.
        #[cfg(feature = "opentelemetry")]
        let spans: Vec<tracing::Span> = batch
            .iter()
            .map(|m| {
                let span = tracing::info_span!("tidings_publish", sink = self.sink.name(),
                    message_id = %m.id, topic = %m.topic, outcome = tracing::field::Empty);
                let header = |name: &str| {
                    m.headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.as_str())
                };
                if let Some(tp) = header("traceparent") {
                    tidings_outbox::trace::set_parent(&span, tp, header("tracestate"));
                }
                span
            })
            .collect();
        let mut outcomes = self.publish_all(&batch, &invalid, &hold).await;
        #[cfg(feature = "opentelemetry")]
        for (span, o) in spans.iter().zip(&outcomes) {
            let outcome = match o {
                Outcome::Delivered { .. } => "delivered",
                Outcome::Skipped => "held",
                Outcome::Failed(_) => "failed",
            };
            span.record("outcome", outcome);
        }
        if !batch.is_empty() {
            metrics::histogram!(
                m::PUBLISH_SECONDS,
                self.labels(&[("sink", self.sink.name())])
            )
            .record(publish_started.elapsed().as_secs_f64());
        }
        let all_postponed = self.check_outage(&mut outcomes, claim_deadline).await;

        let mut rec = Outcomes::default();
        // What happened to each message of `batch`, for the metrics once the batch commits.
        let mut kinds = Vec::with_capacity(batch.len());
        for ((msg, outcome), tid) in batch.iter().zip(outcomes).zip(tids) {
            kinds.push(match &outcome {
                Outcome::Delivered { duplicate: true } => Kind::Duplicate,
                Outcome::Delivered { duplicate: false } => Kind::Delivered,
                Outcome::Skipped | Outcome::Failed(SinkError::Unavailable(_)) => Kind::Released,
                Outcome::Failed(SinkError::Postpone(_, _)) => Kind::Postponed,
                Outcome::Failed(SinkError::Permanent(_)) => Kind::Dead,
                Outcome::Failed(_)
                    if msg.attempts.saturating_add(1) >= self.config.max_attempts =>
                {
                    Kind::Dead
                }
                Outcome::Failed(_) => Kind::Retried,
            });
            match outcome {
                Outcome::Delivered { duplicate } => {
                    rec.delivered.push(msg.seq);
                    rec.delivered_tids.push(tid);
                    report.duplicates += usize::from(duplicate);
                }
                Outcome::Skipped => report.released += 1,
                Outcome::Failed(SinkError::Unavailable(e)) => {
                    report.released += 1;
                    if !report.sink_unavailable {
                        report.sink_unavailable = true;
                        self.log_unavailable(&*e);
                    }
                }
                Outcome::Failed(SinkError::Postpone(after, e)) => {
                    // Its destination is down, not the message at fault: it waits, uncounted.
                    let after = after.clamp(Duration::from_millis(1), self.config.backoff_max);
                    report.postponed += 1;
                    tracing::debug!(id = %msg.id, topic = %msg.topic, error = %e, retry_in = ?after, "destination down, message postponed");
                    rec.failed.push(msg.seq);
                    rec.errors.push(SinkError::Postpone(after, e).to_string());
                    rec.backoffs.push(after.as_secs_f64());
                    rec.dead.push(None);
                    rec.counted.push(false);
                }
                Outcome::Failed(e) => {
                    let attempt = msg.attempts.saturating_add(1);
                    let dead = match e {
                        SinkError::Permanent(_) => Some("permanent"),
                        _ if attempt >= self.config.max_attempts => Some("max_attempts"),
                        _ => None,
                    };
                    let backoff = match &e {
                        // The broker said when; capped, so the dedup window check still holds.
                        SinkError::RetryAfter(after, _) => {
                            (*after).clamp(Duration::from_millis(1), self.config.backoff_max)
                        }
                        _ => self.config.backoff(attempt),
                    };
                    if dead.is_some() {
                        report.dead_lettered += 1;
                        tracing::warn!(id = %msg.id, topic = %msg.topic, attempt, error = %e, reason = dead, "message dead-lettered");
                    } else {
                        report.retried += 1;
                        tracing::debug!(id = %msg.id, topic = %msg.topic, attempt, error = %e, retry_in = ?backoff, "publish failed, will retry");
                    }
                    rec.failed.push(msg.seq);
                    rec.errors.push(e.to_string());
                    rec.backoffs.push(backoff.as_secs_f64());
                    rec.dead.push(dead);
                    rec.counted.push(true);
                }
            }
        }
        if let Some(verdict) = all_postponed {
            if !report.sink_unavailable {
                report.sink_unavailable = true;
                self.log_unavailable(&*Box::<dyn std::error::Error + Send + Sync>::from(verdict));
            }
        }
        report.delivered = rec.delivered.len();
        // If the commit is lost (crash, network), the rows stay and are published again later
        // with the same message id, which the broker drops as a duplicate.
        if rec.delivered.is_empty() && rec.failed.is_empty() {
            bounded_step(step, tx.commit()).await?;
        } else {
            let recorded =
                match tokio::time::timeout(step, self.record_outcomes(tx, &finish, &rec, &batch))
                    .await
                {
                    Ok(r) => r?,
                    Err(_) => return Err(Error::DatabaseTimeout(step)),
                };
            // Those rows were counted as delivered, retried or dead above; correct that.
            let uncount = |report: &mut TickReport, seq: &i64| {
                if rec.delivered.contains(seq) {
                    report.delivered -= 1;
                } else if let Some(i) = rec.failed.iter().position(|s| s == seq) {
                    if !rec.counted[i] {
                        report.postponed -= 1;
                    } else if rec.dead[i].is_none() {
                        report.retried -= 1;
                    } else {
                        report.dead_lettered -= 1;
                    }
                }
            };
            for seq in &recorded.isolated {
                uncount(&mut report, seq);
                report.dead_lettered += 1;
                report.isolated += 1;
                if let Some(i) = batch.iter().position(|m| m.seq == *seq) {
                    kinds[i] = Kind::Dead;
                }
            }
            for seq in &recorded.left {
                uncount(&mut report, seq);
                report.released += 1;
                if let Some(i) = batch.iter().position(|m| m.seq == *seq) {
                    kinds[i] = Kind::Released;
                }
            }
            if !recorded.left.is_empty() {
                if let Ok(mut s) = self.state.lock() {
                    for seq in &recorded.left {
                        s.quarantine.insert(*seq, Instant::now());
                    }
                }
            }
        }
        self.record_metrics(&report, &batch, &kinds);
        if report.retried > 0 {
            tracing::warn!(
                retried = report.retried,
                "messages failed and will be retried with backoff"
            );
        }
        Ok(report)
    }

    /// Counts a committed batch's outcomes (labels: sink, and topic, bounded).
    fn record_metrics(&self, report: &TickReport, batch: &[Envelope], kinds: &[Kind]) {
        let sink = self.sink.name();
        metrics::counter!(m::CLAIMED, self.labels(&[("sink", sink)]))
            .increment(report.claimed as u64);
        // Counted per (topic, outcome) first: one label lookup and one counter update for each
        // distinct pair of the batch, not for each message.
        let mut counts: BTreeMap<(&str, &'static str), u64> = BTreeMap::new();
        for (msg, kind) in batch.iter().zip(kinds) {
            let name = match kind {
                Kind::Delivered | Kind::Duplicate => m::DELIVERED,
                Kind::Retried => m::RETRIED,
                Kind::Dead => m::DEAD_LETTERED,
                Kind::Postponed => m::POSTPONED,
                Kind::Released => m::RELEASED,
            };
            *counts.entry((msg.topic.as_str(), name)).or_default() += 1;
            if *kind == Kind::Duplicate {
                *counts
                    .entry((msg.topic.as_str(), m::DUPLICATES))
                    .or_default() += 1;
            }
        }
        for ((topic, name), n) in counts {
            metrics::counter!(
                name,
                self.labels(&[("sink", sink), ("topic", &m::topic_label(topic))])
            )
            .increment(n);
        }
        // Held back or released before publishing (a failed message ahead of them).
        let unpublished = report.claimed.saturating_sub(batch.len());
        if unpublished > 0 {
            metrics::counter!(
                m::RELEASED,
                self.labels(&[("sink", sink), ("topic", "(held back)")])
            )
            .increment(unpublished as u64);
        }
    }

    /// Decides whether the batch's failures are the messages' or the broker's. If something got
    /// through, a message the broker refused as "unavailable" (e.g. no responders for one
    /// subject) failed on its own account. Then, if any message failed retryably, the broker
    /// is asked whether it works at all (`Sink::check`, one round trip, bounded by the publish
    /// timeout and the time left in the claim). If it does not, the failures are the outage's
    /// (a broker that froze or filled up, also in the middle of this batch): they become
    /// `Unavailable` (released, no attempt counted, the relay backs off). A frozen or full
    /// broker therefore never burns attempts or dead-letters messages. A batch in which nothing
    /// got through and the rest was postponed (every destination the sink knows is down) is
    /// asked about too: when the check fails, the postponed rows keep their new times and the
    /// relay backs off as for any outage (the returned `Some(verdict)`).
    async fn check_outage(
        &self,
        outcomes: &mut [Outcome],
        claim_deadline: Instant,
    ) -> Option<String> {
        let delivered = outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Delivered { .. }));
        if delivered {
            for o in outcomes.iter_mut() {
                if let Outcome::Failed(SinkError::Unavailable(e)) = o {
                    let cause = format!("refused while the broker accepted others: {e}");
                    *o = Outcome::Failed(SinkError::Retryable(cause.into()));
                }
            }
        }
        let failed = outcomes
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Outcome::Failed(SinkError::Retryable(_) | SinkError::RetryAfter(_, _))
                )
            })
            .count();
        let postponed = outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Failed(SinkError::Postpone(_, _))));
        if failed == 0 && (delivered || !postponed) {
            return None;
        }
        let left = claim_deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(CLAIM_MARGIN);
        let limit = self.config.publish_timeout.min(left);
        let verdict = match tokio::time::timeout(limit, self.sink.check()).await {
            Ok(Ok(())) => return None,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("the broker did not answer a health check within {limit:?}"),
        };
        for o in outcomes.iter_mut() {
            if let Outcome::Failed(e @ (SinkError::Retryable(_) | SinkError::RetryAfter(_, _))) = o
            {
                let cause = format!("{verdict} (after: {e})");
                *o = Outcome::Failed(SinkError::Unavailable(cause.into()));
            }
        }
        (!delivered && postponed).then_some(verdict)
    }

    /// Records the batch's outcome in one statement and ends the claim transaction, in one
    /// flight: SAVEPOINT, the finish statement, then `RELEASE SAVEPOINT ...; COMMIT` as one
    /// simple query. If the database refuses the finish (a row that breaks a rule the relay
    /// cannot see, e.g. a trigger, or two rows sharing an id from before the unique index), the
    /// RELEASE fails too and the COMMIT behind it in the same query is never run: the
    /// transaction, and with it the claim's locks, stays open. It is rolled back to the
    /// savepoint and the rows are recorded one by one; a row whose outcome still cannot be
    /// recorded is dead-lettered alone with the database's error, and its id is logged. The
    /// rest of the batch commits, so no row can make the relay re-publish a whole batch
    /// forever, and no other relay can take the batch in between.
    async fn record_outcomes(
        &self,
        tx: &ClaimTx,
        finish: &Stmt,
        rec: &Outcomes,
        batch: &[Envelope],
    ) -> Result<Recorded, Error> {
        let client = tx.client();
        let params = rec.params();
        let (sp, done, commit) = tokio::join!(
            biased;
            client.batch_execute(SAVEPOINT),
            finish.query(client, &params),
            client.batch_execute(RELEASE_AND_COMMIT)
        );
        sp?;
        let err = match done {
            Ok(_) => {
                commit?;
                tx.set_open(false);
                return Ok(Recorded::default());
            }
            // Only a refusal caused by the rows' data is a row's problem (see is_data_error);
            // anything else fails the tick (the guard closes the aborted transaction's
            // connection).
            Err(e) if is_data_error(&e) => e,
            Err(e) => return Err(e.into()),
        };
        // The RELEASE was refused (the transaction is aborted) and the COMMIT skipped. Any
        // other answer means the claim is not intact: the tick fails, nothing is recorded
        // from here (the rows are published again later, the broker drops the copies).
        match commit {
            Err(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {}
            Err(e) => return Err(e.into()),
            Ok(()) => return Err(err.into()),
        }
        client.batch_execute(ROLLBACK_TO_SAVEPOINT).await?;
        tracing::warn!(error = %crate::ErrorChain(&err), rows = rec.delivered.len() + rec.failed.len(),
            "the database refused the batch's outcome; recording its rows one by one");
        let mut recorded = Recorded::default();
        let rows = (0..rec.delivered.len())
            .map(|i| rec.one_delivered(i))
            .chain((0..rec.failed.len()).map(|i| rec.one_failed(i)));
        for one in rows {
            let seq = one
                .delivered
                .first()
                .or(one.failed.first())
                .copied()
                .unwrap_or(0);
            // Each step releases its savepoint: a batch recorded row by row must not pile up
            // hundreds of open subtransactions.
            let Err(e) = finish_step(client, finish, &one).await? else {
                continue;
            };
            let id = batch
                .iter()
                .find(|m| m.seq == seq)
                .map(|m| m.id.to_string());
            let reason = format!(
                "permanent: the database refused to record this message's outcome: {}",
                crate::ErrorChain(&e)
            );
            let bury = Outcomes {
                failed: vec![seq],
                errors: vec![reason],
                backoffs: vec![0.0],
                dead: vec![Some("permanent")],
                counted: vec![true],
                ..Default::default()
            };
            match finish_step(client, finish, &bury).await? {
                Ok(()) => {
                    tracing::error!(id, seq, error = %crate::ErrorChain(&e),
                        "message isolated: its outcome could not be recorded; dead-lettered alone");
                    recorded.isolated.push(seq);
                }
                Err(e2) => {
                    // Not even the dead-letter store takes it: leave the row as it was (it is
                    // tried again with a later batch, not before its key's next claim) but let
                    // the rest of this batch commit.
                    tracing::error!(id, seq, error = %crate::ErrorChain(&e2),
                        "message isolated but could not be dead-lettered either; left in the outbox");
                    recorded.left.push(seq);
                }
            }
        }
        tx.commit().await?;
        Ok(recorded)
    }

    /// Publishes a batch concurrently: messages without a key all at once, messages of one key
    /// one after the other in seq order (stopping at the first failure of that key).
    ///
    /// The whole phase must end well inside the claim timeout, or PostgreSQL would end the
    /// claim while this relay still publishes and another relay would take the same rows. So
    /// a chain starts its next message only while one more publish and a broker health check
    /// (each bounded by `publish_timeout`) still end a second before the claim timeout; later
    /// messages of the chain are skipped and stay for the next batch.
    async fn publish_all(
        &self,
        batch: &[Envelope],
        invalid: &[Option<String>],
        hold: &[bool],
    ) -> Vec<Outcome> {
        let last_start = Instant::now()
            + self
                .config
                .claim_timeout
                .saturating_sub(self.config.publish_timeout * 2 + CLAIM_MARGIN);
        let mut chains: Vec<Vec<usize>> = Vec::new();
        let mut by_key: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, m) in batch.iter().enumerate() {
            match &m.key {
                None => chains.push(vec![i]),
                Some(k) => match by_key.get(k.as_str()) {
                    Some(&c) => chains[c].push(i),
                    None => {
                        by_key.insert(k, chains.len());
                        chains.push(vec![i]);
                    }
                },
            }
        }
        let in_flight = self.sink.capabilities().ordered_in_flight;
        let mut outcomes: Vec<Option<Outcome>> = (0..batch.len()).map(|_| None).collect();
        // Next position in each chain; a chain ends at its first message that is not delivered
        // (the rest of the key waits for the next batch).
        let mut pos = vec![0usize; chains.len()];
        let mut open = vec![true; chains.len()];
        loop {
            // One round: the next message of every open chain (or, for a broker that keeps a
            // key's order with several in flight, the whole rest of each chain), published
            // together. The first round always goes (validated: 2 x publish_timeout +
            // CLAIM_MARGIN <= claim_timeout); later rounds only while there is time.
            let late = Instant::now() > last_start;
            let mut round: Vec<usize> = Vec::new();
            let mut round_chain: Vec<usize> = Vec::new();
            for (c, chain) in chains.iter().enumerate() {
                if !open[c] {
                    continue;
                }
                if pos[c] > 0 && late {
                    open[c] = false;
                    continue;
                }
                let take = if in_flight { chain.len() - pos[c] } else { 1 };
                for &i in &chain[pos[c]..pos[c] + take] {
                    if hold[i] {
                        open[c] = false;
                        break;
                    }
                    if let Some(why) = &invalid[i] {
                        outcomes[i] =
                            Some(Outcome::Failed(SinkError::Permanent(why.clone().into())));
                        open[c] = false;
                        break;
                    }
                    round.push(i);
                    round_chain.push(c);
                }
            }
            if round.is_empty() {
                break;
            }
            let results = self.publish_round(batch, &round).await;
            for ((i, c), outcome) in round.into_iter().zip(round_chain).zip(results) {
                if open[c] {
                    pos[c] += 1;
                }
                if !matches!(outcome, Outcome::Delivered { .. }) {
                    open[c] = false;
                }
                outcomes[i] = Some(outcome);
            }
            for (c, chain) in chains.iter().enumerate() {
                if pos[c] >= chain.len() {
                    open[c] = false;
                }
            }
        }
        // Whatever a chain did not get to stays for the next batch.
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Skipped))
            .collect()
    }

    /// Publishes one round through `Sink::publish_batch`, bounded by the publish timeout. A
    /// panic inside the sink (a client library's assertion) is narrowed down by publishing the
    /// round's messages one by one, so that only the message that causes it fails, for good.
    async fn publish_round(&self, batch: &[Envelope], round: &[usize]) -> Vec<Outcome> {
        let msgs: Vec<&Envelope> = round.iter().map(|&i| &batch[i]).collect();
        let publish = std::panic::AssertUnwindSafe(self.sink.publish_batch(&msgs)).catch_unwind();
        match tokio::time::timeout(self.config.publish_timeout, publish).await {
            Ok(Ok(results)) => {
                let mut results = results.into_iter();
                (0..msgs.len())
                    .map(|_| match results.next() {
                        Some(Ok(d)) => Outcome::Delivered {
                            duplicate: d.duplicate,
                        },
                        Some(Err(e)) => Outcome::Failed(e),
                        None => Outcome::Failed(SinkError::Retryable(
                            "the sink returned fewer results than messages".into(),
                        )),
                    })
                    .collect()
            }
            Ok(Err(_)) if msgs.len() > 1 => {
                futures::future::join_all(msgs.iter().map(|m| self.publish_one(m))).await
            }
            Ok(Err(panic)) => vec![self.panicked(panic)],
            Err(_) => (0..msgs.len()).map(|_| self.no_ack()).collect(),
        }
    }

    fn no_ack(&self) -> Outcome {
        Outcome::Failed(SinkError::Retryable(
            format!(
                "no acknowledgement within {:?}",
                self.config.publish_timeout
            )
            .into(),
        ))
    }

    fn panicked(&self, panic: Box<dyn std::any::Any + Send>) -> Outcome {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Outcome::Failed(SinkError::Permanent(
            format!(
                "the {} sink panicked on this message: {what}",
                self.sink.name()
            )
            .into(),
        ))
    }

    async fn publish_one(&self, msg: &Envelope) -> Outcome {
        let publish = std::panic::AssertUnwindSafe(self.sink.publish(msg)).catch_unwind();
        match tokio::time::timeout(self.config.publish_timeout, publish).await {
            Ok(Ok(Ok(d))) => Outcome::Delivered {
                duplicate: d.duplicate,
            },
            Ok(Ok(Err(e))) => Outcome::Failed(e),
            Ok(Err(panic)) => self.panicked(panic),
            Err(_) => self.no_ack(),
        }
    }

    fn log_unavailable(&self, e: &(dyn std::error::Error + Send + Sync)) {
        let Ok(mut s) = self.state.lock() else { return };
        // One warning when the outage starts, then one a minute: no log flood.
        let due = s
            .unavailable_since_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            tracing::warn!(sink = self.sink.name(), error = %e, "broker unavailable; messages released, backing off");
            s.unavailable_since_log = Some(Instant::now());
        }
    }

    async fn after_tick(&self, r: &TickReport) {
        {
            let Ok(mut s) = self.state.lock() else { return };
            if r.sink_unavailable {
                s.unavailable_streak += 1;
            } else if r.claimed > 0 && s.unavailable_streak > 0 {
                tracing::info!(sink = self.sink.name(), "broker available again");
                s.unavailable_streak = 0;
                s.unavailable_since_log = None;
            }
            metrics::gauge!(
                m::SINK_UNAVAILABLE,
                self.labels(&[("sink", self.sink.name())])
            )
            .set(if s.unavailable_streak > 0 { 1.0 } else { 0.0 });
            s.removed_since_vacuum += (r.delivered + r.dead_lettered) as u64;
            s.counters.delivered += r.delivered as i64;
            s.counters.failed += r.retried as i64;
            s.counters.dead += r.dead_lettered as i64;
            s.counters.duplicates += r.duplicates as i64;
        }
        self.heartbeat_if_due().await;
    }

    async fn heartbeat_if_due(&self) {
        let due = match self.state.lock() {
            Ok(s) => s
                .last_heartbeat
                .is_none_or(|t| t.elapsed() >= self.config.heartbeat_interval),
            Err(_) => false,
        };
        if due {
            if let Err(e) = self.heartbeat().await {
                tracing::warn!(error = %crate::ErrorChain(&e), "relay heartbeat failed");
            }
        }
    }

    /// Vacuums the outbox when enough rows have left it (see `RelayConfig::vacuum_every`).
    /// Run between batches, on a pooled connection, outside any transaction.
    async fn maybe_vacuum(&self) {
        let due = {
            let Ok(mut s) = self.state.lock() else { return };
            let due = self.config.vacuum_every > 0
                && !s.vacuum_refused
                && s.removed_since_vacuum >= self.config.vacuum_every
                && s.last_vacuum.is_none_or(|t| t.elapsed() >= VACUUM_MIN_GAP);
            // Taken now, so that another lane does not start a second VACUUM meanwhile.
            if due {
                s.last_vacuum = Some(Instant::now());
            }
            due
        };
        if !due {
            return;
        }
        let started = Instant::now();
        let result = self
            .bounded(VACUUM_LIMIT, async |c| {
                // A non-owner's VACUUM only warns and skips the table: check ownership instead.
                let rows = c.query_typed(MAY_VACUUM, &[]).await?;
                let may = match rows.first() {
                    Some(row) => row.try_get::<_, bool>(0)?,
                    None => false,
                };
                if !may {
                    return Ok(false);
                }
                // SKIP_LOCKED: when another relay is vacuuming, do not queue behind it.
                c.batch_execute(VACUUM).await?;
                Ok(true)
            })
            .await;
        let Ok(mut s) = self.state.lock() else { return };
        s.last_vacuum = Some(Instant::now());
        match result {
            Ok(false) => {
                s.vacuum_refused = true;
                tracing::warn!("the relay may not VACUUM tidings.outbox (its role does not own it); make sure autovacuum keeps up with it, or dead rows will slow claiming down");
            }
            Ok(true) => {
                tracing::debug!(
                    removed = s.removed_since_vacuum,
                    ms = started.elapsed().as_millis() as u64,
                    "vacuumed tidings.outbox"
                );
                s.removed_since_vacuum = 0;
            }
            Err(e) => {
                tracing::warn!(error = %crate::ErrorChain(&e), "VACUUM of tidings.outbox failed");
            }
        }
    }

    /// Registers this relay or refreshes its row in `tidings.relays`, with its counters.
    pub async fn heartbeat(&self) -> Result<(), Error> {
        let c = {
            let Ok(mut s) = self.state.lock() else {
                return Ok(());
            };
            s.last_heartbeat = Some(Instant::now());
            std::mem::take(&mut s.counters)
        };
        let pid = std::process::id() as i32;
        let interval = self.config.heartbeat_interval.as_secs_f64();
        let (host, sink) = (hostname(), self.sink.name());
        let res = self
            .bounded(self.config.claim_timeout, async |client| {
                client
                    .query_typed(
                        HEARTBEAT,
                        &[
                            (&self.id, Type::UUID),
                            (&self.config.name, Type::TEXT),
                            (&host, Type::TEXT),
                            (&pid, Type::INT4),
                            (&sink, Type::TEXT),
                            (&c.delivered, Type::INT8),
                            (&c.failed, Type::INT8),
                            (&c.dead, Type::INT8),
                            (&c.duplicates, Type::INT8),
                            (&interval, Type::FLOAT8),
                        ],
                    )
                    .await?;
                Ok(())
            })
            .await;
        if res.is_err() {
            // Keep the counts for the next heartbeat.
            if let Ok(mut s) = self.state.lock() {
                s.counters.delivered += c.delivered;
                s.counters.failed += c.failed;
                s.counters.dead += c.dead;
                s.counters.duplicates += c.duplicates;
            }
        }
        res?;
        Ok(())
    }
}

/// The claim transaction of one tick, on a pooled connection. BEGIN goes out in the claim's
/// flight and COMMIT in the finish's, so a batch costs two round trips; tokio-postgres'
/// `Transaction` cannot do that (it awaits BEGIN alone, and its commit awaits COMMIT alone).
/// `open` is true from the start until a COMMIT was answered. Dropped while open (the tick
/// failed, timed out, or was dropped at the shutdown deadline), the guard takes the connection
/// out of the pool and closes it, so no later user of the pool can find itself inside the
/// transaction. PostgreSQL then rolls the claim back and releases its rows, unless the COMMIT
/// had already been sent (tokio-postgres reads the answers still owed before it closes the
/// socket): then the batch is recorded, and only this tick's report of it is lost.
struct ClaimTx {
    /// Always `Some` until dropped.
    conn: Option<deadpool_postgres::Object>,
    open: std::sync::atomic::AtomicBool,
}

impl ClaimTx {
    /// Unsettled from the start: until a COMMIT was answered, the connection may owe an
    /// answer (a prepare cut off by a timeout) or be inside the transaction.
    fn new(conn: deadpool_postgres::Object) -> Self {
        ClaimTx {
            conn: Some(conn),
            open: true.into(),
        }
    }

    fn client(&self) -> &deadpool_postgres::Object {
        // Invariant: `conn` is only taken in `drop`.
        self.conn
            .as_ref()
            .expect("the connection is taken only on drop")
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends COMMIT alone and, once it is answered, marks the connection settled.
    async fn commit(&self) -> Result<(), tokio_postgres::Error> {
        self.client().batch_execute("COMMIT").await?;
        self.set_open(false);
        Ok(())
    }
}

impl Drop for ClaimTx {
    fn drop(&mut self) {
        if *self.open.get_mut() {
            if let Some(conn) = self.conn.take() {
                drop(deadpool_postgres::Object::take(conn));
            }
        }
    }
}

/// The claim or finish statement: prepared and cached on the pooled connection, or sent as
/// the unnamed statement with its parameter types (`RelayConfig::statement_cache`).
enum Stmt {
    Cached(tokio_postgres::Statement),
    Unnamed(&'static str),
}

impl Stmt {
    /// Runs the statement on `client`; one request either way (the cached statement's types
    /// were checked when it was prepared; the unnamed one is parsed with the given types).
    async fn query(
        &self,
        client: &tokio_postgres::Client,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        match self {
            Stmt::Cached(s) => {
                let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
                client.query(s, &values).await
            }
            Stmt::Unnamed(sql) => client.query_typed(sql, params).await,
        }
    }
}

/// The columns of claim_batch.sql's output, by position: looking each field up by name cost
/// a few percent of the relay's CPU. [`col::check`] compares the names once per batch.
mod col {
    pub const SEQ: usize = 0;
    pub const CTID: usize = 1;
    pub const ID: usize = 2;
    pub const TOPIC: usize = 3;
    pub const KEY: usize = 4;
    pub const BIZ_ID: usize = 5;
    pub const PAYLOAD: usize = 6;
    pub const HEADERS: usize = 7;
    pub const CREATED_AT: usize = 8;
    pub const ATTEMPTS: usize = 9;
    pub const PREV_SEQ: usize = 10;
    const NAMES: [&str; 11] = [
        "seq",
        "ctid",
        "id",
        "topic",
        "ordering_key",
        "biz_id",
        "payload",
        "headers",
        "created_at",
        "attempts",
        "prev_seq",
    ];

    /// Whether the claim's columns are the ones these positions name.
    pub fn check(row: &tokio_postgres::Row) -> Result<(), crate::Error> {
        let names: Vec<&str> = row.columns().iter().map(|c| c.name()).collect();
        if names == NAMES {
            Ok(())
        } else {
            Err(crate::Error::Config(format!(
                "claim_batch.sql returns the columns {names:?}, the relay reads {NAMES:?}"
            )))
        }
    }
}

/// A row's physical location (`ctid`), in PostgreSQL's binary form (block number, then line
/// pointer): read from the claim and sent back to the finish as `tid[]`, with no text form
/// made or parsed on either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tid([u8; 6]);

impl<'a> FromSql<'a> for Tid {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Tid(raw.try_into().map_err(|_| {
            format!("a tid is 6 bytes, the server sent {}", raw.len())
        })?))
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }
}

impl ToSql for Tid {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::TID
    }
    tokio_postgres::types::to_sql_checked!();
}

/// Awaits one database step, at most `limit`.
async fn bounded_step<T>(
    limit: Duration,
    step: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, step).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::DatabaseTimeout(limit)),
    }
}

/// What recording a batch's outcome row by row did.
#[derive(Default)]
struct Recorded {
    /// Dead-lettered alone because their outcome could not be recorded.
    isolated: Vec<i64>,
    /// Neither recorded nor dead-lettered: left untouched in the outbox.
    left: Vec<i64>,
}

/// What happened to one message of a batch, for the metrics.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delivered,
    Duplicate,
    Retried,
    Dead,
    Postponed,
    Released,
}

/// A batch's outcome, as the finish statement binds it.
#[derive(Default)]
struct Outcomes {
    delivered: Vec<i64>,
    /// The delivered rows' ctids (as claim_batch returned them), in the order of `delivered`.
    delivered_tids: Vec<Tid>,
    failed: Vec<i64>,
    errors: Vec<String>,
    backoffs: Vec<f64>,
    dead: Vec<Option<&'static str>>,
    /// Per failed row: whether it counts as an attempt (false for a postponed one).
    counted: Vec<bool>,
}

impl Outcomes {
    /// The finish statement's parameters.
    fn params(&self) -> [(&(dyn ToSql + Sync), Type); 6] {
        [
            (&self.delivered_tids, Type::TID_ARRAY),
            (&self.failed, Type::INT8_ARRAY),
            (&self.errors, Type::TEXT_ARRAY),
            (&self.backoffs, Type::FLOAT8_ARRAY),
            (&self.dead, Type::TEXT_ARRAY),
            (&self.counted, Type::BOOL_ARRAY),
        ]
    }

    fn one_delivered(&self, i: usize) -> Outcomes {
        Outcomes {
            delivered: vec![self.delivered[i]],
            delivered_tids: vec![self.delivered_tids[i]],
            ..Default::default()
        }
    }

    fn one_failed(&self, i: usize) -> Outcomes {
        Outcomes {
            failed: vec![self.failed[i]],
            errors: vec![self.errors[i].clone()],
            backoffs: vec![self.backoffs[i]],
            dead: vec![self.dead[i]],
            counted: vec![self.counted[i]],
            ..Default::default()
        }
    }
}

/// Runs the finish statement for one row's outcome behind a savepoint (the SAVEPOINT pipelined
/// with it; the RELEASE, or the rollback to the savepoint, a round trip of its own), in the
/// row-by-row recording of a refused batch. The outer error is the connection's (the tick
/// fails); the inner one is the database refusing the statement, which has then been rolled
/// back to the savepoint and the savepoint released.
async fn finish_step(
    client: &tokio_postgres::Client,
    finish: &Stmt,
    rec: &Outcomes,
) -> Result<Result<(), tokio_postgres::Error>, Error> {
    let params = rec.params();
    let (sp, done) = tokio::join!(
        biased;
        client.batch_execute(SAVEPOINT),
        finish.query(client, &params)
    );
    sp?;
    match done {
        Ok(_) => {
            client.batch_execute(RELEASE_SAVEPOINT).await?;
            Ok(Ok(()))
        }
        // Only a refusal caused by the rows' data is a row's problem. A timeout, a deadlock, a
        // serialization failure, a full disk or a missing privilege is the database's: the tick
        // fails, the claim rolls back, and the batch is tried again later (nothing is counted).
        Err(e) if is_data_error(&e) => {
            client.batch_execute(ROLLBACK_TO_SAVEPOINT).await?;
            Ok(Err(e))
        }
        Err(e) => Err(e.into()),
    }
}

/// A batch that was mostly keyed rows held back behind rows another lane or relay holds: an
/// extra lane then waits a poll interval instead of claiming them again at once. Exactly half
/// held back is not "mostly" (the batch delivered as much as it held).
fn mostly_held_back(r: &TickReport) -> bool {
    r.held_back * 2 > r.claimed
}

/// SQLSTATEs that blame the data of a statement, not the database's state: cardinality
/// violations (21, e.g. ON CONFLICT touching a row twice), data exceptions (22, e.g. numeric
/// overflow), integrity constraint violations (23) and errors raised by PL/pgSQL (P0, e.g. a
/// trigger's RAISE).
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        ["21", "22", "23", "P0"]
            .iter()
            .any(|p| c.code().starts_with(p))
    })
}

/// Reads one claimed row. A row the schema's rules would refuse today (written before them, or
/// with a constraint dropped) still becomes an envelope, with the reason it can never be
/// published; the caller dead-letters it. Only a row without a usable seq or id is an error
/// (the schema makes both impossible: NOT NULL, typed).
fn envelope_from_row(
    row: &tokio_postgres::Row,
    valid_topics: &mut Vec<String>,
) -> Result<(Envelope, Option<String>), Error> {
    let seq: i64 = row.try_get(col::SEQ)?;
    let id: Uuid = row.try_get(col::ID)?;
    let mut bad: Option<String> = None;
    let mut note = |why: String| {
        bad.get_or_insert(format!(
            "invalid message (refused by the current schema rules): {why}"
        ));
    };
    let topic: String = row.try_get(col::TOPIC).unwrap_or_default();
    if !valid_topics.contains(&topic) {
        match tidings_outbox::validate_topic(&topic) {
            Ok(()) if valid_topics.len() < 16 => valid_topics.push(topic.clone()),
            Ok(()) => {}
            Err(e) => note(e.to_string()),
        }
    }
    let key: Option<String> = row.try_get(col::KEY).unwrap_or(None);
    if let Some(Err(e)) = key.as_deref().map(tidings_outbox::validate_key) {
        note(e.to_string());
    }
    let biz_id: Option<String> = row.try_get(col::BIZ_ID).unwrap_or(None);
    if let Some(Err(e)) = biz_id.as_deref().map(tidings_outbox::validate_biz_id) {
        note(e.to_string());
    }
    // Header sets are string to string (the schema's rule): read straight into the map; only
    // a set that is not (a row from before the rule) goes through serde_json::Value, to say why.
    let mut headers = BTreeMap::new();
    match row.try_get::<_, Json<BTreeMap<String, String>>>(col::HEADERS) {
        Ok(Json(map)) => {
            for (k, v) in &map {
                if let Err(e) = tidings_outbox::validate_header_pair(k, v) {
                    note(e.to_string());
                }
            }
            headers = map;
        }
        Err(_) => match row.try_get::<_, serde_json::Value>(col::HEADERS) {
            Ok(serde_json::Value::Object(map)) => {
                for (k, v) in map {
                    match v {
                        serde_json::Value::String(v) => {
                            if let Err(e) = tidings_outbox::validate_header_pair(&k, &v) {
                                note(e.to_string());
                            }
                            headers.insert(k, v);
                        }
                        _ => note(format!("header {k:?} is not a string")),
                    }
                }
            }
            Ok(_) => note("headers are not a JSON object".into()),
            Err(e) => note(format!("headers cannot be read: {e}")),
        },
    }
    let payload = row
        .try_get::<_, &[u8]>(col::PAYLOAD)
        .map(Bytes::copy_from_slice)
        .unwrap_or_else(|e| {
            note(format!("payload cannot be read: {e}"));
            Bytes::new()
        });
    let created_at = row.try_get(col::CREATED_AT).unwrap_or_else(|e| {
        note(format!("created_at cannot be read: {e}"));
        chrono::DateTime::<chrono::Utc>::UNIX_EPOCH
    });
    let attempts: i32 = row.try_get(col::ATTEMPTS).unwrap_or(0).max(0);
    let env = Envelope {
        seq,
        message: tidings_outbox::WireMessage {
            id: MessageId::from_uuid(id),
            topic,
            key,
            biz_id,
            headers,
            payload,
            created_at: Some(created_at),
            attempts,
        },
    };
    Ok((env, bad))
}

/// Refuses a relay whose re-send horizon outlasts the broker's dedup window: a message re-sent
/// after the window (a retry after the longest backoff, or after a hung relay's claim timed
/// out) would be stored twice. Says at start-up when the broker has no dedup at all.
fn check_dedup_window(config: &RelayConfig, sink: &dyn Sink) -> Result<(), Error> {
    let horizon = config.claim_timeout + config.publish_timeout + config.backoff_max;
    match sink.capabilities().dedup_window {
        Some(w) if w < horizon => Err(Error::Config(format!(
            "the broker's dedup window ({} sink: {w:?}) is shorter than the relay's re-send horizon \
             claim_timeout + publish_timeout + backoff_max = {:?} + {:?} + {:?} = {horizon:?}; a late \
             re-send would be stored twice: lengthen the window or shorten backoff_max",
            sink.name(),
            config.claim_timeout,
            config.publish_timeout,
            config.backoff_max
        ))),
        Some(_) => Ok(()),
        None => {
            tracing::info!(sink = sink.name(), "this broker does not drop re-sends by message id: consumers must deduplicate (the inbox)");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extra_lane_pauses_only_when_most_of_its_batch_was_held_back() {
        let report = |claimed, held_back| TickReport {
            claimed,
            held_back,
            delivered: claimed - held_back,
            ..Default::default()
        };
        for (claimed, held, pause) in [
            (0, 0, false),
            (500, 0, false),
            (500, 250, false),
            (500, 251, true),
            (500, 500, true),
            (1, 1, true),
        ] {
            assert_eq!(
                mostly_held_back(&report(claimed, held)),
                pause,
                "{held} of {claimed} held back"
            );
        }
    }
}
