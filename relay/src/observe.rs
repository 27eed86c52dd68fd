//! The relay's admin listener (`tidings relay --admin-listen ADDR`): Prometheus text at
//! `/metrics`, liveness at `/healthz`, readiness at `/readyz`.
//!
//! - `/metrics`: everything recorded through the `metrics` facade (the relay's counters and
//!   histograms, see [`crate::metrics`]), plus gauges read from the database at scrape time
//!   (backlog, due, retrying, oldest due age, dead letters, relays alive, parked consumer
//!   messages), the same numbers `tidings status --json` shows. A database that does not answer
//!   within two seconds leaves those gauges at their last value and sets
//!   `tidings_database_up 0`.
//! - `/healthz`: 200 while the process serves requests; it never touches the database, so a
//!   database outage does not turn into a restart loop.
//! - `/readyz`: 200 `{"ready":true}` when the database answers, the sink's health check passes
//!   and the relay is not backing off from a broker outage; else 503 with the reasons as JSON.
//!
//! A process serving several databases reports on each: its gauges carry a `db` label (the
//! database's name, never its URL), and it is ready when every database is, each reason
//! prefixed with the database's name.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::metrics as m;
use crate::Relay;

/// How long a scrape or a readiness probe waits for the database (and the sink).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One database the admin listener reports on.
#[derive(Clone)]
pub struct Target {
    /// Its name when the process serves several (`tidings relay --database NAME=URL`): the
    /// `db` label of its gauges and the prefix of its readiness reasons. None for a relay of
    /// one database.
    pub db: Option<String>,
    /// The relay serving it.
    pub relay: Arc<Relay>,
    /// The admin pool its gauges are read with (never the relay's own connections).
    pub pool: deadpool_postgres::Pool,
    /// Why its relay is not running now (the database is down or not migrated): it is not
    /// ready. None while it runs.
    pub problem: Arc<std::sync::Mutex<Option<String>>>,
}

/// The databases served, shared with whoever adds and removes them (the fleet supervisor
/// when `--databases-file` changes).
pub type Targets = Arc<std::sync::RwLock<Vec<Target>>>;

#[derive(Clone)]
struct State {
    targets: Targets,
    prometheus: PrometheusHandle,
    /// One gauge refresh at a time; scrapes that waited for one share it.
    refreshed: Arc<tokio::sync::Mutex<Option<std::time::Instant>>>,
}

/// The admin routes over the databases in `targets`.
pub fn router(targets: Targets, prometheus: PrometheusHandle) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readyz))
        .with_state(State {
            targets,
            prometheus,
            refreshed: Arc::default(),
        })
}

fn snapshot(targets: &Targets) -> Vec<Target> {
    targets.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Reads the database's gauges into the recorder, on `pool` (the admin pool, never the relay's
/// own); false when the database did not answer.
pub async fn refresh_gauges(pool: &deadpool_postgres::Pool) -> bool {
    refresh_gauges_of(pool, None).await
}

/// [`refresh_gauges`] with a `db` label on every gauge when `db` is given.
pub async fn refresh_gauges_of(pool: &deadpool_postgres::Pool, db: Option<&str>) -> bool {
    let read = async {
        let client = crate::console::checkout(pool).await?;
        let status = crate::admin::status(&**client).await?;
        // The relay's own role may not read parked messages (least-privilege grants): then
        // the gauge is left out, not the scrape failed.
        let parked: Option<i64> = client
            .query_one("SELECT count(*) FROM tidings.inbox_dead_letters", &[])
            .await
            .ok()
            .map(|r| r.get(0));
        Ok::<_, crate::Error>((status, parked))
    };
    let labels: Vec<metrics::Label> = db
        .map(|d| metrics::Label::new("db", d.to_owned()))
        .into_iter()
        .collect();
    let gauge = |name: &'static str| metrics::gauge!(name, labels.clone());
    match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Ok(Ok((s, parked))) => {
            gauge(m::BACKLOG).set(s.backlog as f64);
            gauge(m::DUE).set(s.ready as f64);
            gauge(m::RETRYING).set(s.retrying as f64);
            gauge(m::OLDEST_DUE_AGE).set(s.oldest_ready_age_secs.unwrap_or(0.0));
            gauge(m::DEAD_LETTERS).set(s.dead_letters as f64);
            gauge(m::RELAYS_ALIVE).set(s.relays.iter().filter(|r| r.alive).count() as f64);
            if let Some(parked) = parked {
                gauge(m::INBOX_PARKED).set(parked as f64);
            }
            gauge(m::DATABASE_UP).set(1.0);
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(db, error = %crate::ErrorChain(&e), "metrics: cannot read the database");
            gauge(m::DATABASE_UP).set(0.0);
            false
        }
        Err(_) => {
            tracing::warn!(
                db,
                "metrics: the database did not answer within {PROBE_TIMEOUT:?}"
            );
            gauge(m::DATABASE_UP).set(0.0);
            false
        }
    }
}

async fn metrics(axum::extract::State(s): axum::extract::State<State>) -> Response {
    {
        // One refresh at a time: a scrape that waited for another's refresh, which finished
        // after this scrape arrived, takes its reading instead of reading again.
        let arrived = std::time::Instant::now();
        let mut last = s.refreshed.lock().await;
        if last.is_none_or(|t| t < arrived) {
            let targets = snapshot(&s.targets);
            futures::future::join_all(
                targets
                    .iter()
                    .map(|t| refresh_gauges_of(&t.pool, t.db.as_deref())),
            )
            .await;
            *last = Some(std::time::Instant::now());
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.prometheus.render(),
    )
        .into_response()
}

async fn readyz(axum::extract::State(s): axum::extract::State<State>) -> Response {
    let targets = snapshot(&s.targets);
    let each = futures::future::join_all(targets.iter().map(|t| async move {
        let problem = t.problem.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let reasons = match problem {
            Some(p) => vec![format!("database: {p}")],
            None => t.relay.readiness().await.reasons,
        };
        match &t.db {
            None => reasons,
            Some(db) => reasons.into_iter().map(|r| format!("{db}: {r}")).collect(),
        }
    }))
    .await;
    let reasons: Vec<String> = each.into_iter().flatten().collect();
    let r = crate::Readiness {
        ready: reasons.is_empty(),
        reasons,
    };
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&r).unwrap_or_default(),
    )
        .into_response()
}
