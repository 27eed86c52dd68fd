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

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::metrics as m;
use crate::Relay;

/// How long a scrape or a readiness probe waits for the database (and the sink).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct State {
    relay: Arc<Relay>,
    prometheus: PrometheusHandle,
    /// The admin pool (the gauges' queries never take the relay's connections).
    pool: deadpool_postgres::Pool,
    /// One gauge refresh at a time; scrapes that waited for one share it.
    refreshed: Arc<tokio::sync::Mutex<Option<std::time::Instant>>>,
}

/// The admin routes; `pool` is the admin pool the gauges are read with.
pub fn router(
    relay: Arc<Relay>,
    prometheus: PrometheusHandle,
    pool: deadpool_postgres::Pool,
) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readyz))
        .with_state(State {
            relay,
            prometheus,
            pool,
            refreshed: Arc::default(),
        })
}

/// Reads the database's gauges into the recorder, on `pool` (the admin pool, never the relay's
/// own); false when the database did not answer.
pub async fn refresh_gauges(pool: &deadpool_postgres::Pool) -> bool {
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
    match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Ok(Ok((s, parked))) => {
            metrics::gauge!(m::BACKLOG).set(s.backlog as f64);
            metrics::gauge!(m::DUE).set(s.ready as f64);
            metrics::gauge!(m::RETRYING).set(s.retrying as f64);
            metrics::gauge!(m::OLDEST_DUE_AGE).set(s.oldest_ready_age_secs.unwrap_or(0.0));
            metrics::gauge!(m::DEAD_LETTERS).set(s.dead_letters as f64);
            metrics::gauge!(m::RELAYS_ALIVE)
                .set(s.relays.iter().filter(|r| r.alive).count() as f64);
            if let Some(parked) = parked {
                metrics::gauge!(m::INBOX_PARKED).set(parked as f64);
            }
            metrics::gauge!(m::DATABASE_UP).set(1.0);
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %crate::ErrorChain(&e), "metrics: cannot read the database");
            metrics::gauge!(m::DATABASE_UP).set(0.0);
            false
        }
        Err(_) => {
            tracing::warn!("metrics: the database did not answer within {PROBE_TIMEOUT:?}");
            metrics::gauge!(m::DATABASE_UP).set(0.0);
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
            refresh_gauges(&s.pool).await;
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
    let r = s.relay.readiness().await;
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
