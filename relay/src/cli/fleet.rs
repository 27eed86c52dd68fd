//! Many databases, one relay process: `tidings relay --database NAME=URL` (repeatable) or
//! `--databases-file PATH` (one `NAME=URL` per line, `#` comments), for teams with a database
//! per tenant.
//!
//! Each database gets a relay of its own, as if it were the only one: its own pool
//! (`--pool-size`), its own LISTEN connection, its own run loop as a task of its own, so a busy
//! database never holds a quiet one's batches back (the tasks share the runtime and the sink's
//! connection, nothing else). Every log line a database's relay writes carries `db=NAME` (a
//! span), every metric a `db` label, every readiness reason the name as a prefix; the URL is
//! never shown. A database that is down or not migrated is reported (log, `/readyz`,
//! `tidings_database_up{db}`) and retried with backoff up to a minute, while the others go on.
//! Several processes serving the same databases share each one's work through row locks, as
//! relays of one database always do: no double publishing, per-key order per database.
//!
//! The file is re-read every `--databases-reload` and on SIGHUP: a database added is served at
//! once, a removed one is stopped gracefully (its batch in flight finishes), a changed URL
//! restarts that database's relay. A file that does not parse is refused at start-up (exit 2)
//! and, later, logged and ignored: the databases being served stay as they are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{usage, Db, Failure};
use crate::observe::{Target, Targets};
use crate::{ErrorChain, Relay, RelayConfig, Sink};

/// One named database. Its URL is never shown (not in `Debug` either).
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub name: String,
    url: String,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entry({:?})", self.name)
    }
}

/// Where the databases come from.
pub(super) enum Source {
    /// `--database NAME=URL`, fixed for the life of the process.
    Flags(Vec<Entry>),
    /// `--databases-file`, re-read while the relay runs.
    File(PathBuf),
}

impl Source {
    /// The databases named now; a configuration failure (exit 2) names what is wrong and where,
    /// never a URL.
    pub async fn load(&self) -> Result<Vec<Entry>, Failure> {
        match self {
            Source::Flags(e) => Ok(e.clone()),
            Source::File(path) => load_file(path).await.map_err(usage),
        }
    }
}

/// libpq connection keywords: never database names, so that a conninfo string given without
/// `NAME=` (`password=... host=...`) is refused rather than read as a name and a URL.
const CONNINFO_KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "options",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "keepalives_retries",
    "tcp_user_timeout",
    "sslmode",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslpassword",
    "sslnegotiation",
    "sslcompression",
    "requiressl",
    "channel_binding",
    "target_session_attrs",
    "load_balance_hosts",
    "service",
    "gssencmode",
    "krbsrvname",
    "require_auth",
    "replication",
];

/// A database name: 1 to 63 of A-Z a-z 0-9 `_` `-` (a label value, a path segment of the
/// operator page, a word in a log line: nothing to escape anywhere), and not a libpq keyword.
fn check_name(name: &str) -> Result<(), String> {
    if CONNINFO_KEYWORDS
        .iter()
        .any(|k| k.eq_ignore_ascii_case(name))
    {
        return Err("a database name (before =) may not be a connection keyword such as host or password: give NAME=URL".into());
    }
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        // Not echoed: a URL given without `NAME=` has its password before its first `=`.
        return Err("a database name (before =) must be 1 to 63 of A-Z a-z 0-9 _ -".into());
    }
    Ok(())
}

/// `NAME=URL`; the error names the name at most, never the value after `=`.
fn parse_entry(s: &str) -> Result<Entry, String> {
    let Some((name, url)) = s.split_once('=') else {
        return Err("expected NAME=URL (e.g. tenant_a=postgres://...)".into());
    };
    let name = name.trim();
    check_name(name)?;
    let url = url.trim();
    if url.is_empty() {
        return Err(format!("database {name} has no URL after ="));
    }
    Ok(Entry {
        name: name.to_owned(),
        url: url.to_owned(),
    })
}

fn check_unique(entries: &[Entry]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for e in entries {
        if !seen.insert(e.name.as_str()) {
            return Err(format!("database {} is named twice", e.name));
        }
    }
    if entries.is_empty() {
        return Err("no database named".into());
    }
    Ok(())
}

/// The `--database` values.
pub(super) fn parse_flags(values: &[String]) -> Result<Vec<Entry>, Failure> {
    let entries = values
        .iter()
        .enumerate()
        .map(|(i, v)| parse_entry(v).map_err(|e| format!("--database (#{}): {e}", i + 1)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(usage)?;
    check_unique(&entries).map_err(|e| usage(format!("--database: {e}")))?;
    Ok(entries)
}

/// A databases file: `NAME=URL` per line; blank lines and lines starting with `#` are skipped.
fn parse_file(text: &str) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        entries.push(parse_entry(line).map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    check_unique(&entries)?;
    Ok(entries)
}

async fn load_file(path: &Path) -> Result<Vec<Entry>, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("--databases-file {}: {e}", path.display()))?;
    parse_file(&text).map_err(|e| format!("--databases-file {}: {e}", path.display()))
}

/// A database's connection settings from its entry; errors name the database, never the URL.
pub(super) fn db_of(e: &Entry, ca_file: Option<&Path>, timeout: Duration) -> Result<Db, Failure> {
    Db::new(Some(&e.url), ca_file, timeout).map_err(|mut f| {
        f.message = f.message.replace(
            "(--database-url / DATABASE_URL)",
            &format!("of database {} (--database / --databases-file)", e.name),
        );
        f
    })
}

/// The operator pages, one per database, by name.
pub(super) type Consoles = Arc<RwLock<BTreeMap<String, axum::Router>>>;

/// What the admin listener needs of each database: its operator page's settings.
#[derive(Clone)]
pub(super) struct AdminOpts {
    pub token: Option<String>,
    pub hosts: Vec<String>,
}

struct Member {
    entry: Entry,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), crate::Error>>,
}

impl Member {
    /// Waits for a member asked to stop; logs how it ended. `Some("name (timeout)")` when its
    /// batch in flight did not finish within `--shutdown-timeout`.
    async fn stopped(self) -> Option<String> {
        let name = self.entry.name;
        match self.task.await {
            Ok(Ok(())) => None,
            Ok(Err(crate::Error::ShutdownTimeout(d))) => Some(format!("{name} ({d:?})")),
            Ok(Err(e)) => {
                tracing::warn!(db = name, error = %ErrorChain(&e), "relay stopped with an error");
                None
            }
            Err(e) => {
                tracing::error!(db = name, error = %e, "this database's relay task failed");
                None
            }
        }
    }
}

/// The relays of a set of databases, and what the admin listener sees of them.
pub(super) struct Fleet {
    sink: Arc<dyn Sink>,
    /// What each relay publishes through (closing it does nothing).
    shared: Arc<dyn Sink>,
    /// Cancelled at shutdown; every member's stop token is a child of it.
    shutdown: CancellationToken,
    config: RelayConfig,
    pool_size: usize,
    ca_file: Option<PathBuf>,
    db_timeout: Duration,
    admin: Option<AdminOpts>,
    pub targets: Targets,
    pub consoles: Consoles,
    members: BTreeMap<String, Member>,
}

/// A member ready to start: nothing has connected yet.
struct Prepared {
    relay: Arc<Relay>,
    admin_pool: deadpool_postgres::Pool,
}

impl Fleet {
    pub fn new(
        sink: Arc<dyn Sink>,
        config: RelayConfig,
        pool_size: usize,
        ca_file: Option<PathBuf>,
        db_timeout: Duration,
        admin: Option<AdminOpts>,
        shutdown: CancellationToken,
    ) -> Fleet {
        Fleet {
            shared: Arc::new(crate::sink::SharedSink(sink.clone())),
            shutdown,
            sink,
            config,
            pool_size,
            ca_file,
            db_timeout,
            admin,
            targets: Arc::default(),
            consoles: Arc::default(),
            members: BTreeMap::new(),
        }
    }

    /// Parses the entry's URL and builds its pools and relay (a configuration failure is
    /// exit 2); connects to nothing.
    fn prepare(&self, e: &Entry) -> Result<Prepared, Failure> {
        let db = db_of(e, self.ca_file.as_deref(), self.db_timeout)?;
        let pool = db.pool(self.pool_size)?;
        let admin_pool = if self.admin.is_some() {
            db.pool(2)?
        } else {
            pool.clone()
        };
        let config = RelayConfig {
            database: Some(e.name.clone()),
            ..self.config.clone()
        };
        let relay = Relay::new(pool, self.shared.clone(), config).map_err(super::config_failure)?;
        Ok(Prepared {
            relay: Arc::new(db.with_listener(relay)),
            admin_pool,
        })
    }

    /// Prepares every entry (any failure refuses them all), then starts them.
    pub fn start_all(&mut self, entries: Vec<Entry>) -> Result<(), Failure> {
        let prepared = entries
            .iter()
            .map(|e| self.prepare(e))
            .collect::<Result<Vec<_>, _>>()?;
        for (e, p) in entries.into_iter().zip(prepared) {
            self.start(e, p);
        }
        Ok(())
    }

    fn start(&mut self, entry: Entry, p: Prepared) {
        let name = entry.name.clone();
        let stop = self.shutdown.child_token();
        let problem = Arc::new(Mutex::new(None));
        self.targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Target {
                db: Some(name.clone()),
                relay: p.relay.clone(),
                pool: p.admin_pool.clone(),
                problem: problem.clone(),
            });
        let span = tracing::info_span!("db", db = %name);
        if let Some(admin) = &self.admin {
            let console = crate::console::Console::new(
                p.admin_pool,
                admin.token.clone(),
                admin.hosts.clone(),
            );
            tokio::spawn(
                console
                    .clone()
                    .sample(stop.clone())
                    .instrument(span.clone()),
            );
            self.consoles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), console.router());
        }
        let task = tokio::spawn(serve(p.relay, problem, stop.clone()).instrument(span));
        self.members.insert(name, Member { entry, stop, task });
    }

    /// Takes a member out of the admin views and asks its relay to stop (its batch in flight
    /// finishes within `--shutdown-timeout`); the task to wait for.
    fn detach(&mut self, name: &str) -> Option<Member> {
        let m = self.members.remove(name)?;
        self.targets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|t| t.db.as_deref() != Some(name));
        self.consoles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        m.stop.cancel();
        Some(m)
    }

    /// Serves exactly `entries` from now on: starts the new, stops the removed, restarts the
    /// changed (the stopping ones all at once). An entry whose URL does not parse is logged
    /// and left out (or, when it was served before, served on with its old URL).
    pub async fn apply(&mut self, entries: Vec<Entry>) {
        let wanted: BTreeMap<String, Entry> =
            entries.into_iter().map(|e| (e.name.clone(), e)).collect();
        let mut stopping = Vec::new();
        let gone: Vec<String> = self
            .members
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            tracing::info!(
                db = name,
                "database removed from --databases-file: stopping its relay"
            );
            stopping.extend(self.detach(&name));
        }
        let mut starting = Vec::new();
        for (name, e) in wanted {
            if self.members.get(&name).is_some_and(|m| m.entry == e) {
                continue;
            }
            let p = match self.prepare(&e) {
                Ok(p) => p,
                Err(f) => {
                    tracing::error!(db = name, error = %f,
                        "cannot serve this database as --databases-file now names it; left as it was");
                    continue;
                }
            };
            if self.members.contains_key(&name) {
                tracing::info!(
                    db = name,
                    "database URL changed in --databases-file: restarting its relay"
                );
                stopping.extend(self.detach(&name));
            } else {
                tracing::info!(
                    db = name,
                    "database added in --databases-file: starting its relay"
                );
            }
            starting.push((e, p));
        }
        futures::future::join_all(stopping.into_iter().map(Member::stopped)).await;
        for (e, p) in starting {
            self.start(e, p);
        }
    }

    /// The names served now.
    pub fn names(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }

    /// Stops every relay (each finishes its batch in flight within `--shutdown-timeout`, all at
    /// once); fails when one did not.
    pub async fn shutdown(mut self) -> Result<(), Failure> {
        self.shutdown.cancel();
        let late: Vec<String> = futures::future::join_all(
            std::mem::take(&mut self.members)
                .into_values()
                .map(Member::stopped),
        )
        .await
        .into_iter()
        .flatten()
        .collect();
        // Once, after every relay has stopped (each one's close does nothing).
        match tokio::time::timeout(self.config.publish_timeout, self.sink.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "closing the sink failed"),
            Err(_) => tracing::warn!("the sink did not close within the publish timeout"),
        }
        if late.is_empty() {
            Ok(())
        } else {
            Err(Failure {
                code: 1,
                message: format!(
                    "in-flight work did not finish within --shutdown-timeout for database(s) {}",
                    late.join(", ")
                ),
            })
        }
    }
}

/// Runs one database's relay until `stop`: while the database is down or not migrated, says
/// why (first failure, then every tenth) and tries again with backoff (1 s doubling up to a
/// minute, jittered); the other databases' relays are other tasks and go on.
async fn serve(
    relay: Arc<Relay>,
    problem: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
) -> Result<(), crate::Error> {
    let mut failures = 0u32;
    loop {
        let checked = tokio::select! {
            r = relay.check_schema() => r,
            _ = stop.cancelled() => return Ok(()),
        };
        let why = match checked {
            Ok(()) => {
                *problem.lock().unwrap_or_else(|p| p.into_inner()) = None;
                if failures > 0 {
                    tracing::info!(
                        failures,
                        "database reachable and migrated: serving it again"
                    );
                }
                failures = 0;
                // In a task of its own, so that a panic is this database's failure, reported
                // and retried like any other, not a silent end of its service.
                let run = tokio::spawn(
                    {
                        let (relay, stop) = (relay.clone(), stop.clone());
                        async move { relay.run(stop).await }
                    }
                    .in_current_span(),
                );
                match run.await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e @ crate::Error::ShutdownTimeout(_))) => return Err(e),
                    Ok(Err(e)) => ErrorChain(&e).to_string(),
                    Err(e) => format!("the relay task failed: {e}"),
                }
            }
            Err(e) => ErrorChain(&e).to_string(),
        };
        if stop.is_cancelled() {
            return Ok(());
        }
        failures += 1;
        let pause = crate::config::jitter(
            (Duration::from_secs(1) * 2u32.pow((failures - 1).min(6))).min(Duration::from_secs(60)),
        );
        if failures == 1 || failures.is_multiple_of(10) {
            tracing::warn!(error = %why, failures, retry_in = ?pause,
                "cannot serve this database now; the other databases go on; retrying");
        }
        *problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// The operator pages of a fleet: `/` lists the databases, `/db/NAME/` is that database's page
/// (the same page and API as a relay of one database serves at `/`).
pub(super) fn console_router(consoles: Consoles, hosts: Vec<String>) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(index))
        .fallback(dispatch)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(hosts),
            crate::console::guard,
        ))
        .with_state(consoles)
}

async fn index(State(consoles): State<Consoles>) -> Response {
    let names: Vec<String> = consoles
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    // Names are A-Z a-z 0-9 _ - (checked when read): nothing in them needs escaping.
    let items: String = names
        .iter()
        .map(|n| format!("<li><a href=\"db/{n}/\">{n}</a></li>"))
        .collect();
    let mut r = Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Tidings relay</title></head>\
         <body><h1>Tidings relay: {} database(s)</h1><ul>{items}</ul></body></html>",
        names.len()
    ))
    .into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_SECURITY_POLICY,
        axum::http::HeaderValue::from_static("default-src 'none'"),
    );
    r
}

async fn dispatch(State(consoles): State<Consoles>, mut req: Request) -> Response {
    use tower::ServiceExt as _;
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/db/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (name, tail) = match rest.split_once('/') {
        Some((n, t)) => (n, format!("/{t}")),
        None => (rest, String::new()),
    };
    if check_name(name).is_err() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Some(router) = consoles
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned()
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if tail.is_empty() {
        // The page's API paths are relative to it.
        return Redirect::permanent(&format!("{name}/")).into_response();
    }
    let uri = match req.uri().query() {
        Some(q) => format!("{tail}?{q}"),
        None => tail,
    };
    match uri.parse() {
        Ok(u) => *req.uri_mut() = u,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    }
    match router.oneshot(req).await {
        Ok(r) => r,
        Err(e) => match e {},
    }
}

/// `tidings status` over several databases: each one's status under its name, then exit 1 if
/// one could not be read (after showing the others).
pub(super) async fn status(
    entries: Vec<Entry>,
    ca_file: Option<&Path>,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let mut failed = Vec::new();
    let mut docs = Vec::new();
    for e in &entries {
        let read = async {
            let db = db_of(e, ca_file, timeout)?;
            db.admin(async |c| {
                tidings_migrations::postgres::ensure_current(c).await?;
                Ok(crate::status(c).await?)
            })
            .await
        };
        match read.await {
            Ok(s) if json => docs.push(serde_json::json!({"db": e.name, "status": s})),
            Ok(s) => out_raw!("database {}\n{s}\n", e.name),
            Err(f) => {
                if json {
                    docs.push(serde_json::json!({"db": e.name, "error": f.message}));
                } else {
                    out!("database {}\nerror: {}\n", e.name, f.message);
                }
                failed.push(e.name.clone());
            }
        }
    }
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "databases": docs }))
                .unwrap_or_default()
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            message: format!("cannot read database(s) {}", failed.join(", ")),
        })
    }
}

/// `tidings migrate` over several databases, one after the other, each under its name; exit 1
/// if one failed (after trying the others).
pub(super) async fn migrate(
    entries: Vec<Entry>,
    ca_file: Option<&Path>,
    timeout: Duration,
    action: super::MigrateAction,
) -> Result<(), Failure> {
    let mut failed = Vec::new();
    for e in &entries {
        out!("database {}", e.name);
        let done = async {
            let db = db_of(e, ca_file, timeout)?;
            db.admin(async |c| super::admin::migrate(c, action.clone()).await)
                .await
        };
        if let Err(f) = done.await {
            out!("error: {}", f.message);
            failed.push(e.name.clone());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure {
            code: 1,
            message: format!("migrating database(s) {} failed", failed.join(", ")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_parse_and_errors_never_show_a_url() {
        let ok =
            parse_file("# tenants\n\na=postgres://u:pw@h/a\n  b = postgres://h/b  \n").unwrap();
        assert_eq!(
            ok.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(ok[1].url, "postgres://h/b");
        for (text, want) in [
            (
                "a=postgres://u:secret@h/a\na=postgres://u:secret@h/b",
                "named twice",
            ),
            ("postgres://u:secret@h/a", "line 1: expected NAME=URL"),
            ("x y=postgres://u:secret@h/a", "line 1: a database name"),
            (
                "postgres://u:secret@h/a?sslmode=require",
                "line 1: a database name",
            ),
            (
                "ok=postgres://u:secret@h/a\nb=",
                "line 2: database b has no URL",
            ),
            ("# nothing", "no database named"),
        ] {
            let e = parse_file(text).unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
        assert!(format!("{:?}", ok[0]).find("pw").is_none());
    }
}
