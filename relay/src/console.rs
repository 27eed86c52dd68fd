//! The operator's page, served with the metrics by `tidings relay --admin-listen` at `/`: one
//! HTML file inside the binary (no front-end build) that reads and acts through the JSON API
//! below.
//!
//! - `GET /api/overview`: backlog, due, retrying, oldest due age, dead letters, parked consumer
//!   messages, the relay instances with their heartbeats, and messages delivered per minute
//!   over the last hour (all relays, sampled from their heartbeat counters while this process
//!   runs).
//! - `GET /api/dead-letters?topic=&error=&since=&until=&limit=`, `GET /api/dead-letters/{id}`
//!   (payload, headers, attempts, last error), `POST /api/dead-letters/replay` and `/purge`
//!   with `{"ids":[...]}` or `{"filter":{...}}` (everything matching, in batches of 500).
//! - `GET /api/parked?consumer=&topic=&error=&since=&until=&limit=`,
//!   `GET /api/parked/{consumer}/{id}`, `POST /api/parked/replay` and `/purge` likewise (a
//!   replay asks the consumer's runner to run it again).
//! - `GET /api/inbox?consumer=&biz_id=`: was this biz-id processed by this consumer, and when.
//!
//! **Read-only unless `--admin-token` is set.** Actions need `Authorization: Bearer <token>`
//! and a JSON body (`Content-Type: application/json`): a browser never adds either to a
//! cross-site request on its own (no cookie is used, and a cross-site JSON POST needs a CORS
//! preflight, which this server never grants), so another site cannot make an operator's
//! browser act. Without a token configured every action is refused (403). Every action is
//! logged (what, how many, the filter, the client's address). The page shows every message
//! field through `textContent`, never as HTML: a payload or header is hostile input. All SQL
//! is fixed statements with parameters.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

const PAGE: &str = include_str!("console.html");
/// Rows a list returns at most, and ids an action names at most.
const LIST_MAX: i64 = 500;
/// Rows one statement of a filtered replay or purge touches.
const BATCH: i64 = 500;
/// Rows a filtered action touches at most per request.
const ACTION_MAX: u64 = 100_000;
/// How long a page request waits for the database.
const DB_LIMIT: Duration = Duration::from_secs(5);

const DL_WHERE: &str = "($1::text IS NULL OR topic = $1) \
     AND ($2::text IS NULL OR strpos(lower(last_error), lower($2)) > 0) \
     AND ($3::timestamptz IS NULL OR dead_at >= $3) \
     AND ($4::timestamptz IS NULL OR dead_at < $4)";
const PARKED_WHERE: &str = "($1::text IS NULL OR consumer = $1) \
     AND ($2::text IS NULL OR topic = $2) \
     AND ($3::text IS NULL OR strpos(lower(last_error), lower($3)) > 0) \
     AND ($4::timestamptz IS NULL OR dead_at >= $4) \
     AND ($5::timestamptz IS NULL OR dead_at < $5)";

/// Messages delivered between two samples (every 10 s): (time, delivered since the previous
/// sample, summed over each relay's own counter, so a relay that stops or restarts does not
/// show as a spike).
pub(crate) type Samples = Arc<Mutex<VecDeque<(DateTime<Utc>, i64)>>>;

/// What the console needs.
#[derive(Clone)]
pub struct Console {
    pool: deadpool_postgres::Pool,
    token: Option<Arc<str>>,
    samples: Samples,
    hosts: Arc<Vec<String>>,
}

/// Answers only requests addressed to `localhost`, an IP address or one of the allowed host
/// names (a page reached through another name is a DNS-rebinding attempt), and marks every
/// answer as not to be cached.
pub(crate) async fn guard(
    State(hosts): State<Arc<Vec<String>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let allowed = name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok()
        || hosts.iter().any(|h| h.eq_ignore_ascii_case(name));
    if !allowed {
        return fail(
            StatusCode::MISDIRECTED_REQUEST,
            "this host name is not allowed for the operator page (--admin-hosts)",
        );
    }
    let mut r = next.run(req).await;
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    r
}

impl Console {
    /// A console on `pool` (the role's privileges decide what the actions may do); actions,
    /// and payloads and headers, only with `token` when one is set.
    /// `hosts`: host names (besides `localhost` and IP addresses) the page answers to.
    pub fn new(
        pool: deadpool_postgres::Pool,
        token: Option<String>,
        hosts: Vec<String>,
    ) -> Console {
        Console {
            pool,
            token: token.filter(|t| !t.is_empty()).map(Arc::from),
            samples: Arc::default(),
            hosts: Arc::new(hosts),
        }
    }

    /// The pool the page (and the scrape's gauges) use.
    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.pool
    }

    /// Samples the relays' delivered counters every 10 s for the per-minute chart, until
    /// `stop`.
    pub async fn sample(self, stop: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        let mut last: Option<std::collections::HashMap<Uuid, i64>> = None;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            let read = async {
                let c = checkout(&self.pool).await.ok()?;
                let rows = c
                    .query("SELECT id, delivered FROM tidings.relays", &[])
                    .await
                    .ok()?;
                Some(
                    rows.iter()
                        .map(|r| (r.get::<_, Uuid>(0), r.get::<_, i64>(1)))
                        .collect::<std::collections::HashMap<_, _>>(),
                )
            };
            let Ok(Some(now)) = tokio::time::timeout(DB_LIMIT, read).await else {
                continue;
            };
            if let Some(prev) = &last {
                // Each relay's own increase; a relay new since the last sample counts from 0.
                let delta: i64 = now
                    .iter()
                    .map(|(id, n)| (n - prev.get(id).copied().unwrap_or(0)).max(0))
                    .sum();
                let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
                s.push_back((Utc::now(), delta));
                while s.len() > 6 * 61 {
                    s.pop_front();
                }
            }
            last = Some(now);
        }
    }

    /// The routes: the page at `/` and the API under `/api`.
    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .route("/", axum::routing::get(page))
            .route("/api/overview", axum::routing::get(overview))
            .route("/api/dead-letters", axum::routing::get(dead_letters))
            .route(
                "/api/dead-letters/{id}",
                axum::routing::get(dead_letter).post(dead_letter_action),
            )
            .route("/api/parked", axum::routing::get(parked))
            .route(
                "/api/parked/{consumer}/{id}",
                axum::routing::get(parked_one),
            )
            .route("/api/parked/{action}", axum::routing::post(parked_action))
            .route("/api/inbox", axum::routing::get(inbox))
            .layer(axum::middleware::from_fn_with_state(
                self.hosts.clone(),
                guard,
            ))
            .with_state(self)
    }
}

/// The page's Content-Security-Policy: its one inline script by hash, nothing from elsewhere.
fn csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest;
        let script = PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map(|(s, _)| s)
            .unwrap_or("");
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; \
             form-action 'none'"
        )
    })
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Only this page's own script (by hash) and styles; no frames.
            (header::CONTENT_SECURITY_POLICY, csp()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(PAGE),
    )
        .into_response()
}

/// A failure as JSON `{"error": "..."}`.
fn fail(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// A connection of the admin pool, with every statement bounded on the server too (a slow
/// filter over a large table must not run on after the page gave up).
pub(crate) async fn checkout(
    pool: &deadpool_postgres::Pool,
) -> Result<deadpool_postgres::Object, crate::Error> {
    let o = tokio::time::timeout(DB_LIMIT, pool.get())
        .await
        .map_err(|_| crate::Error::DatabaseTimeout(DB_LIMIT))??;
    tokio::time::timeout(DB_LIMIT, o.batch_execute("SET statement_timeout = 5000"))
        .await
        .map_err(|_| crate::Error::DatabaseTimeout(DB_LIMIT))??;
    Ok(o)
}

async fn client(c: &Console) -> Result<deadpool_postgres::Object, Response> {
    checkout(&c.pool).await.map_err(|e| {
        fail(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database: {}", crate::ErrorChain(&e)),
        )
    })
}

fn db_fail(e: tokio_postgres::Error) -> Response {
    let status = if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    fail(status, format!("database: {}", crate::ErrorChain(&e)))
}

async fn overview(State(c): State<Console>) -> Response {
    let o = match client(&c).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let status = match tokio::time::timeout(DB_LIMIT, crate::admin::status(&**o)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("database: {}", crate::ErrorChain(&e)),
            )
        }
        Err(_) => {
            return fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "database: no answer within 5 s",
            )
        }
    };
    // Parked messages: the relay's own role may not read them (least-privilege grants).
    let parked = o
        .query_one("SELECT count(*) FROM tidings.inbox_dead_letters", &[])
        .await
        .ok()
        .map(|r| r.get::<_, i64>(0));
    let per_minute = per_minute(&c.samples);
    axum::Json(json!({
        "backlog": status.backlog,
        "due": status.ready,
        "retrying": status.retrying,
        "oldest_due_age_secs": status.oldest_ready_age_secs,
        "dead_letters": status.dead_letters,
        "parked": parked,
        "relays": status.relays,
        "delivered_per_minute": per_minute,
    }))
    .into_response()
}

/// Delivered per minute over the last hour from the samples: `[{"minute": t, "delivered": n}]`,
/// oldest first (counter restarts count from zero).
fn per_minute(samples: &Samples) -> Vec<serde_json::Value> {
    let s = samples.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<(i64, i64)> = Vec::new();
    for (t, delta) in s.iter() {
        let minute = t.timestamp() / 60 * 60;
        match out.last_mut() {
            Some((m, d)) if *m == minute => *d += delta,
            _ => out.push((minute, *delta)),
        }
    }
    let keep = out.len().saturating_sub(60);
    out[keep..]
        .iter()
        .map(|(m, d)| json!({"minute": DateTime::from_timestamp(*m, 0), "delivered": d}))
        .collect()
}

/// The filter of a list or of an action.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
pub struct Filter {
    /// Exact topic.
    pub topic: Option<String>,
    /// Text the last error contains (any case).
    pub error: Option<String>,
    /// Dead (parked) at or after.
    pub since: Option<DateTime<Utc>>,
    /// Dead (parked) before.
    pub until: Option<DateTime<Utc>>,
    /// Consumer (parked messages).
    pub consumer: Option<String>,
    /// Rows at most (lists).
    pub limit: Option<i64>,
}

impl Filter {
    fn clean(mut self) -> Filter {
        let none_if_empty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        self.topic = none_if_empty(self.topic);
        self.error = none_if_empty(self.error);
        self.consumer = none_if_empty(self.consumer);
        self
    }

    fn dl_params(&self) -> [(&(dyn ToSql + Sync), Type); 4] {
        [
            (&self.topic, Type::TEXT),
            (&self.error, Type::TEXT),
            (&self.since, Type::TIMESTAMPTZ),
            (&self.until, Type::TIMESTAMPTZ),
        ]
    }

    fn parked_params(&self) -> [(&(dyn ToSql + Sync), Type); 5] {
        [
            (&self.consumer, Type::TEXT),
            (&self.topic, Type::TEXT),
            (&self.error, Type::TEXT),
            (&self.since, Type::TIMESTAMPTZ),
            (&self.until, Type::TIMESTAMPTZ),
        ]
    }
}

async fn dead_letters(State(c): State<Console>, Query(f): Query<Filter>) -> Response {
    let f = f.clean();
    let o = match client(&c).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let limit = f.limit.unwrap_or(100).clamp(1, LIST_MAX);
    let sql = format!(
        "SELECT id, topic, ordering_key, biz_id, attempts, last_error, reason, created_at, dead_at \
         FROM tidings.dead_letters WHERE {DL_WHERE} ORDER BY dead_at DESC, id LIMIT $5"
    );
    let p = f.dl_params();
    let params: Vec<(&(dyn ToSql + Sync), Type)> = p
        .into_iter()
        .chain([(&limit as &(dyn ToSql + Sync), Type::INT8)])
        .collect();
    match o.query_typed(&sql, &params).await {
        Ok(rows) => axum::Json(
            rows.iter()
                .map(|r| {
                    json!({
                        "id": r.get::<_, Uuid>(0), "topic": r.get::<_, String>(1),
                        "key": r.get::<_, Option<String>>(2), "biz_id": r.get::<_, Option<String>>(3),
                        "attempts": r.get::<_, i32>(4), "last_error": r.get::<_, String>(5),
                        "reason": r.get::<_, String>(6), "created_at": r.get::<_, DateTime<Utc>>(7),
                        "dead_at": r.get::<_, DateTime<Utc>>(8),
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => db_fail(e),
    }
}

/// A payload as the page shows it: UTF-8 text when it is, and always base64.
fn payload_json(p: &[u8]) -> serde_json::Value {
    use base64::Engine;
    json!({
        "text": std::str::from_utf8(p).ok(),
        "base64": base64::engine::general_purpose::STANDARD.encode(p),
        "bytes": p.len(),
    })
}

async fn dead_letter(
    State(c): State<Console>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = may_read_content(&c, &headers) {
        return r;
    }
    let o = match client(&c).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let row = o
        .query_opt(
            "SELECT id, topic, ordering_key, biz_id, payload, headers, attempts, last_error, \
             reason, created_at, dead_at FROM tidings.dead_letters WHERE id = $1",
            &[&id],
        )
        .await;
    match row {
        Ok(Some(r)) => axum::Json(json!({
            "id": r.get::<_, Uuid>(0), "topic": r.get::<_, String>(1),
            "key": r.get::<_, Option<String>>(2), "biz_id": r.get::<_, Option<String>>(3),
            "payload": payload_json(r.get::<_, &[u8]>(4)),
            "headers": r.get::<_, serde_json::Value>(5),
            "attempts": r.get::<_, i32>(6), "last_error": r.get::<_, String>(7),
            "reason": r.get::<_, String>(8), "created_at": r.get::<_, DateTime<Utc>>(9),
            "dead_at": r.get::<_, DateTime<Utc>>(10),
        }))
        .into_response(),
        Ok(None) => fail(StatusCode::NOT_FOUND, "no such dead letter"),
        Err(e) => db_fail(e),
    }
}

async fn parked(State(c): State<Console>, Query(f): Query<Filter>) -> Response {
    let f = f.clean();
    let o = match client(&c).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let limit = f.limit.unwrap_or(100).clamp(1, LIST_MAX);
    let sql = format!(
        "SELECT consumer, message_id, topic, ordering_key, biz_id, deliveries, last_error, \
         created_at, dead_at, replay_requested_at FROM tidings.inbox_dead_letters \
         WHERE {PARKED_WHERE} ORDER BY dead_at DESC, consumer, message_id LIMIT $6"
    );
    let p = f.parked_params();
    let params: Vec<(&(dyn ToSql + Sync), Type)> = p
        .into_iter()
        .chain([(&limit as &(dyn ToSql + Sync), Type::INT8)])
        .collect();
    match o.query_typed(&sql, &params).await {
        Ok(rows) => axum::Json(
            rows.iter()
                .map(|r| {
                    json!({
                        "consumer": r.get::<_, String>(0), "id": r.get::<_, Uuid>(1),
                        "topic": r.get::<_, String>(2), "key": r.get::<_, Option<String>>(3),
                        "biz_id": r.get::<_, Option<String>>(4), "deliveries": r.get::<_, i32>(5),
                        "last_error": r.get::<_, String>(6),
                        "created_at": r.get::<_, Option<DateTime<Utc>>>(7),
                        "dead_at": r.get::<_, DateTime<Utc>>(8),
                        "replay_requested_at": r.get::<_, Option<DateTime<Utc>>>(9),
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => db_fail(e),
    }
}

async fn parked_one(
    State(c): State<Console>,
    Path((consumer, id)): Path<(String, Uuid)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = may_read_content(&c, &headers) {
        return r;
    }
    let o = match client(&c).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let row = o
        .query_opt(
            "SELECT consumer, message_id, topic, ordering_key, biz_id, payload, headers, \
             deliveries, last_error, created_at, dead_at FROM tidings.inbox_dead_letters \
             WHERE consumer = $1 AND message_id = $2",
            &[&consumer, &id],
        )
        .await;
    match row {
        Ok(Some(r)) => axum::Json(json!({
            "consumer": r.get::<_, String>(0), "id": r.get::<_, Uuid>(1),
            "topic": r.get::<_, String>(2), "key": r.get::<_, Option<String>>(3),
            "biz_id": r.get::<_, Option<String>>(4),
            "payload": payload_json(r.get::<_, &[u8]>(5)),
            "headers": r.get::<_, serde_json::Value>(6),
            "deliveries": r.get::<_, i32>(7), "last_error": r.get::<_, String>(8),
            "created_at": r.get::<_, Option<DateTime<Utc>>>(9),
            "dead_at": r.get::<_, DateTime<Utc>>(10),
        }))
        .into_response(),
        Ok(None) => fail(StatusCode::NOT_FOUND, "no such parked message"),
        Err(e) => db_fail(e),
    }
}

#[derive(Debug, Clone, Deserialize)]
struct InboxQuery {
    consumer: String,
    biz_id: String,
}

async fn inbox(State(c): State<Console>, Query(q): Query<InboxQuery>) -> Response {
    let o = match client(&c).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    // Row-level security may hide other consumers' records from this role: then "not
    // processed" would be a guess, so say that it cannot tell.
    match o
        .query_one(
            "SELECT row_security_active('tidings.inbox'::regclass)",
            &[],
        )
        .await
    {
        Ok(r) if r.get::<_, bool>(0) => {
            return fail(
                StatusCode::FORBIDDEN,
                "unknown: row-level security hides other consumers' inbox records from this role (use the owner or a consumer's role)",
            )
        }
        Ok(_) => {}
        Err(e) => return db_fail(e),
    }
    match o
        .query_opt(
            "SELECT message_id, processed_at FROM tidings.inbox WHERE consumer = $1 AND biz_id = $2",
            &[&q.consumer, &q.biz_id],
        )
        .await
    {
        Ok(Some(r)) => axum::Json(json!({
            "processed": true, "message_id": r.get::<_, Option<Uuid>>(0),
            "processed_at": r.get::<_, DateTime<Utc>>(1),
        }))
        .into_response(),
        Ok(None) => axum::Json(json!({ "processed": false })).into_response(),
        Err(e) => db_fail(e),
    }
}

/// The body of an action: the ids chosen, or everything matching a filter.
#[derive(Debug, Clone, Deserialize)]
struct Action {
    #[serde(default)]
    ids: Vec<Uuid>,
    filter: Option<Filter>,
    /// Parked messages: the consumer of `ids`.
    consumer: Option<String>,
}

/// Whether the request carries the admin token as a bearer token (compared in constant time).
fn has_token(token: &str, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A message's payload and headers (personal or business data) need the token when one is
/// configured; without one the page is read-only and shows them on the port the operator chose.
#[allow(clippy::result_large_err)]
fn may_read_content(c: &Console, headers: &HeaderMap) -> Result<(), Response> {
    match &c.token {
        Some(t) if !has_token(t, headers) => Err(fail(
            StatusCode::UNAUTHORIZED,
            "payloads and headers need the admin token",
        )),
        _ => Ok(()),
    }
}

/// Whether the request may act: a token is configured, the request carries it as a bearer
/// token (compared in constant time), and its body is JSON.
#[allow(clippy::result_large_err)]
fn authorize(c: &Console, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &c.token else {
        return Err(fail(
            StatusCode::FORBIDDEN,
            "read-only: no --admin-token is configured, so no action is allowed",
        ));
    };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "actions take a JSON body",
        ));
    }
    if !has_token(token, headers) {
        return Err(fail(
            StatusCode::UNAUTHORIZED,
            "the admin token is missing or wrong",
        ));
    }
    Ok(())
}

async fn dead_letter_action(
    State(c): State<Console>,
    Path(action): Path<String>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&c, &headers) {
        tracing::warn!(%from, action, "console action refused");
        return r;
    }
    let a: Action = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("not an action: {e}")),
    };
    if !matches!(action.as_str(), "replay" | "purge") {
        return fail(StatusCode::NOT_FOUND, "actions: replay, purge");
    }
    if a.ids.len() > LIST_MAX as usize {
        tracing::warn!(%from, action, ids = a.ids.len(), "console action refused: too many ids");
        return fail(
            StatusCode::BAD_REQUEST,
            format!("at most {LIST_MAX} ids per request; act on a filter for more"),
        );
    }
    let o = match client(&c).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    // Only what was dead when the request came: a replayed message that dies again at once is
    // not picked up again by the same request.
    let started = Utc::now();
    let filter = a.filter.clone().map(Filter::clean).map(|mut f| {
        f.until = Some(f.until.map_or(started, |u| u.min(started)));
        f
    });
    let mut done = 0u64;
    let run = |ids: Vec<Uuid>| {
        let o = &o;
        let action = action.clone();
        async move {
            match action.as_str() {
                "replay" => crate::admin::dlq_replay(&***o, Some(&ids)).await,
                _ => crate::admin::dlq_purge(&***o, Some(&ids)).await,
            }
        }
    };
    let result: Result<(), crate::Error> = async {
        match &filter {
            None => done = run(a.ids.clone()).await?,
            Some(f) => {
                let sql = format!(
                    "SELECT id FROM tidings.dead_letters WHERE {DL_WHERE} ORDER BY dead_at, id LIMIT $5"
                );
                while done < ACTION_MAX {
                    let p = f.dl_params();
                    let params: Vec<(&(dyn ToSql + Sync), Type)> =
                        p.into_iter().chain([(&BATCH as &(dyn ToSql + Sync), Type::INT8)]).collect();
                    let ids: Vec<Uuid> =
                        o.query_typed(&sql, &params).await?.iter().map(|r| r.get(0)).collect();
                    if ids.is_empty() {
                        break;
                    }
                    // Every selected row leaves the dead letters (a replay moves it, or finds
                    // it already in the outbox), so the selection shrinks each time.
                    let selected = ids.len() as u64;
                    done += run(ids).await?.min(selected);
                    if selected < BATCH as u64 {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    tracing::warn!(%from, action, rows = done, ids = a.ids.len(), filter = ?filter,
        ok = result.is_ok(), "console action on dead letters");
    match result {
        Ok(()) => axum::Json(json!({ "action": action, "rows": done })).into_response(),
        Err(crate::Error::Database(e)) => db_fail(e),
        Err(e) => fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::ErrorChain(&e).to_string(),
        ),
    }
}

async fn parked_action(
    State(c): State<Console>,
    Path(action): Path<String>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&c, &headers) {
        tracing::warn!(%from, action, "console action refused");
        return r;
    }
    if !matches!(action.as_str(), "replay" | "purge") {
        return fail(StatusCode::NOT_FOUND, "actions: replay, purge");
    }
    let a: Action = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("not an action: {e}")),
    };
    if a.ids.len() > LIST_MAX as usize {
        tracing::warn!(%from, action, ids = a.ids.len(), "console action refused: too many ids");
        return fail(
            StatusCode::BAD_REQUEST,
            format!("at most {LIST_MAX} ids per request; act on a filter for more"),
        );
    }
    let o = match client(&c).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let filter = a.filter.clone().map(Filter::clean);
    let mut done = 0u64;
    let result: Result<(), crate::Error> = async {
        // (consumer, ids) groups to act on.
        let act = |consumer: String, ids: Vec<Uuid>| {
            let o = &o;
            let action = action.clone();
            async move {
                match action.as_str() {
                    "replay" => crate::admin::inbox_dlq_replay(&***o, &consumer, Some(&ids)).await,
                    _ => crate::admin::inbox_dlq_purge(&***o, &consumer, Some(&ids)).await,
                }
            }
        };
        match &filter {
            None => {
                let consumer = a.consumer.clone().unwrap_or_default();
                done = act(consumer, a.ids.clone()).await?;
            }
            Some(f) => {
                // A replay only asks (the row stays until the runner runs it): walk by key.
                let sql = format!(
                    "SELECT consumer, message_id FROM tidings.inbox_dead_letters WHERE {PARKED_WHERE} \
                     AND ($6::text IS NULL OR (consumer, message_id) > ($6, $7::uuid)) \
                     ORDER BY consumer, message_id LIMIT $8"
                );
                let (mut after_c, mut after_id): (Option<String>, Option<Uuid>) = (None, None);
                while done < ACTION_MAX {
                    let p = f.parked_params();
                    let params: Vec<(&(dyn ToSql + Sync), Type)> = p
                        .into_iter()
                        .chain([
                            (&after_c as &(dyn ToSql + Sync), Type::TEXT),
                            (&after_id as &(dyn ToSql + Sync), Type::UUID),
                            (&BATCH as &(dyn ToSql + Sync), Type::INT8),
                        ])
                        .collect();
                    let rows = o.query_typed(&sql, &params).await?;
                    if rows.is_empty() {
                        break;
                    }
                    let mut groups: std::collections::BTreeMap<String, Vec<Uuid>> = Default::default();
                    for r in &rows {
                        groups.entry(r.get(0)).or_default().push(r.get(1));
                    }
                    let last = rows.last().expect("not empty");
                    after_c = Some(last.get(0));
                    after_id = Some(last.get::<_, Uuid>(1));
                    for (consumer, ids) in groups {
                        done += act(consumer, ids).await?;
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    tracing::warn!(%from, action, rows = done, ids = a.ids.len(), consumer = ?a.consumer,
        filter = ?filter, ok = result.is_ok(), "console action on parked messages");
    match result {
        Ok(()) => axum::Json(json!({ "action": action, "rows": done })).into_response(),
        Err(crate::Error::Database(e)) => db_fail(e),
        Err(e) => fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::ErrorChain(&e).to_string(),
        ),
    }
}
