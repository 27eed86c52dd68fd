//! Test support: every test gets its own PostgreSQL database, cloned from a migrated template,
//! so tests run in parallel and LISTEN channels never collide.
//!
//! The server is the local one (`postgres://postgres@127.0.0.1:5432`, trust auth); set
//! `TIDINGS_TEST_PG` to point elsewhere on 127.0.0.1.

pub mod conformance;
pub mod runner_conformance;
#[cfg(feature = "http")]
pub mod webhook;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio_postgres::{Client, NoTls};

/// Server URL without a database name.
pub fn server_url() -> String {
    std::env::var("TIDINGS_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Opens a tokio-postgres connection and drives it on the current runtime.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn admin_url() -> String {
    format!("{}/postgres", server_url())
}

/// Key of the session advisory lock that serialises template creation across test processes.
const TEMPLATE_LOCK: i64 = 0x7469_6474_6573_7473;
/// Test databases older than this are left-overs of crashed runs and are dropped.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Name of the template for the migrations embedded in this build.
fn template_name() -> String {
    let mut h = Sha256::new();
    for m in tidings_migrations::migrations() {
        h.update(m.version);
        h.update(m.up);
        h.update(m.down);
    }
    let hex: String = h.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("tidings_tmpl_{hex}")
}

static SWEPT: OnceLock<()> = OnceLock::new();

/// Creates the migrated template if missing (under a lock, once per server), and on the first
/// call in this process drops stale test databases.
async fn ensure_template(admin: &Client) -> String {
    let tmpl = template_name();
    admin
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK])
        .await
        .unwrap();
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&tmpl])
        .await
        .unwrap()
        .is_some();
    if SWEPT.set(()).is_ok() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let rows = admin
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 't\\_%\\_%' OR (datname LIKE 'tidings\\_tmpl\\_%' AND datname <> $1)",
                &[&tmpl],
            )
            .await
            .unwrap();
        for row in rows {
            let name: String = row.get(0);
            let stale = match name.strip_prefix("t_").and_then(|r| r.split('_').next()) {
                Some(ts) => ts
                    .parse::<u64>()
                    .map(|ts| now.saturating_sub(ts) > STALE_AFTER.as_secs())
                    .unwrap_or(false),
                None => true, // a template for other migrations, or a half-built one
            };
            if stale {
                // Names come from pg_database and match the patterns above; quoted as identifiers.
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            }
        }
    }
    if !exists {
        let building = format!("{tmpl}_building");
        // Separate statements: a multi-statement string runs as one transaction block, which
        // CREATE/DROP DATABASE refuse.
        for sql in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
        {
            let url = format!("{}/{building}", server_url());
            let (mut c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            let driver = tokio::spawn(conn);
            tidings_migrations::postgres::up(&mut c).await.unwrap();
            // The session must be gone before the rename and before any clone: dropping the
            // client makes the driver send Terminate and finish.
            drop(c);
            let _ = driver.await;
        }
        for sql in [
            format!("ALTER DATABASE {building} RENAME TO {tmpl}"),
            format!("ALTER DATABASE {tmpl} IS_TEMPLATE true"),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
    }
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
        .await
        .unwrap();
    tmpl
}

/// A database of one test's own, dropped (with FORCE) when the value is dropped.
pub struct TestDb {
    /// Database name, `t_<unix seconds>_<random>`.
    pub name: String,
    /// Connection URL.
    pub url: String,
}

impl TestDb {
    /// A fresh database with every Tidings migration applied.
    pub async fn migrated() -> TestDb {
        let admin = connect(&admin_url()).await;
        let tmpl = ensure_template(&admin).await;
        Self::create(&admin, Some(&tmpl)).await
    }

    /// A fresh empty database (no Tidings schema).
    pub async fn empty() -> TestDb {
        let admin = connect(&admin_url()).await;
        Self::create(&admin, None).await
    }

    async fn create(admin: &Client, template: Option<&str>) -> TestDb {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = format!(
            "t_{now}_{}",
            &uuid::Uuid::now_v7().simple().to_string()[22..]
        );
        let sql = match template {
            Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
            None => format!("CREATE DATABASE {name}"),
        };
        // Cloning fails while another session is connected to the template; only the brief
        // build above ever connects, so a retry loop is not needed.
        admin.batch_execute(&sql).await.unwrap();
        TestDb {
            url: format!("{}/{name}", server_url()),
            name,
        }
    }

    /// A new tokio-postgres connection to this database.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Commits `msgs` to the outbox, 1,000 per statement.
    pub async fn enqueue(&self, msgs: Vec<tidings_outbox::Message>) {
        let c = self.client().await;
        for chunk in msgs.chunks(1000) {
            tidings_outbox::Outbox::default()
                .enqueue_batch_pg(&c, chunk)
                .await
                .unwrap();
        }
    }

    /// Rows in the outbox (messages not yet delivered).
    pub async fn outbox_count(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM tidings.outbox", &[])
            .await
            .unwrap()
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside a runtime; a plain thread with its own runtime avoids blocking it.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&admin_url(), NoTls).await {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Sends a signal to a server process of a test (`-STOP` freezes it, `-CONT` thaws it).
fn signal_child(child: Option<&std::process::Child>, signal: &str) {
    let pid = child.expect("server is running").id();
    let ok = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {signal} {pid}");
}

/// Kills a server process of a test (as a crash would).
fn kill_child(child: &mut Option<std::process::Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A `tidings relay` process for the chaos tests: `--sink SINK --batch-size 200` and `args`,
/// on `database_url`, with `env` (the sink's URL), logging errors only, output discarded.
pub fn chaos_relay(
    tidings: &std::path::Path,
    database_url: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Child {
    std::process::Command::new(tidings)
        .args(["relay", "--batch-size", "200"])
        .args(args)
        .envs(env.iter().copied())
        .env("DATABASE_URL", database_url)
        .env("TIDINGS_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A child process of a test that is killed (and reaped) when dropped, also when the test
/// panics first; the process itself through `Deref`.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (20 s at most) until 127.0.0.1:`port` accepts connections.
pub async fn wait_for_port(port: u16, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 request to 127.0.0.1:port (connection: close): (status, body).
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // Host as given (to test the page's host check), else this address.
    let host = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map_or(format!("127.0.0.1:{port}"), |(_, v)| v.to_string());
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
    {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    // Read the head, then exactly the body its content-length announces (chromedriver keeps
    // the connection open whatever the request says), or chunks until the last one.
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let lower = head.to_lowercase();
                let len = lower
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let done = match len {
                    Some(len) => body.len() >= len,
                    None if lower.contains("transfer-encoding: chunked") => {
                        body.ends_with("0\r\n\r\n")
                    }
                    None => n == 0,
                };
                if done || n == 0 {
                    return text;
                }
            } else if n == 0 {
                return text;
            }
        }
    };
    let text = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("an answer within 60 s");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head.to_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `GET path` on 127.0.0.1:port: (status, body); (0, "") when nothing answers.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_as(port, path, "127.0.0.1").await
}

/// [`http_get`] with another `Host` header.
pub async fn http_get_as(port: u16, path: &str, host: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of an unlabelled (or exactly labelled) sample in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The sum of every sample of `metric` (any labels) whose labels include `with` (e.g.
/// `db="a"`; empty for all) in Prometheus text.
pub fn sum_samples(text: &str, metric: &str, with: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            labels
                .contains(with)
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// A nats-server with JetStream of a test's own, on a free port of 127.0.0.1, with its store in a
/// temporary folder; stopped (killed) when dropped. Can be stopped and restarted on the same port.
pub struct NatsServer {
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts a server and waits (with a deadline) until it accepts connections.
    pub async fn start() -> NatsServer {
        NatsServer::start_with(&[]).await
    }

    /// Like [`NatsServer::start`], with extra nats-server arguments (e.g. `--user`, `--pass`).
    pub async fn start_with(extra: &[&str]) -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("tidings-nats-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = NatsServer {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            dir,
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.restart().await;
        s
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends a signal to the server process (`-STOP` freezes it, `-CONT` thaws it).
    pub fn signal(&self, signal: &str) {
        signal_child(self.child.as_ref(), signal);
    }

    /// Kills the server (as a crash would).
    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts it again on the same port and store; waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server must be installed (Debian package nats-server)");
        self.child = Some(child);
        wait_for_port(self.port, "nats-server").await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A deadpool-postgres pool on a test database.
pub fn pool(db: &TestDb, size: usize) -> deadpool_postgres::Pool {
    let cfg: tokio_postgres::Config = db.url.parse().unwrap();
    let mgr = deadpool_postgres::Manager::from_config(
        cfg,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(mgr)
        .max_size(size)
        .build()
        .unwrap()
}

/// Waits until `cond` holds, checking every `every`, failing after `deadline`. For conditions
/// outside the test's control (a server reconnecting, another process working).
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every message stored in a JetStream stream, in stream order (read with an ephemeral
/// consumer; fails if the read stalls for 10 s).
pub async fn stream_messages(url: &str, stream: &str) -> Vec<async_nats::jetstream::Message> {
    use async_nats::jetstream;
    use futures::StreamExt;
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    let mut stream = js.get_stream(stream).await.unwrap();
    let n = stream.info().await.unwrap().state.messages as usize;
    if n == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap().take(n);
    let mut out = Vec::with_capacity(n);
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), msgs.next())
        .await
        .expect("stream read stalled")
    {
        out.push(m.unwrap());
    }
    out
}

/// How many messages a JetStream stream holds.
pub async fn stream_len(url: &str, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// A NATS JetStream sink on `nats` (the default `TIDINGS` stream, created if missing).
pub async fn nats_sink(nats: &NatsServer) -> std::sync::Arc<tidings_relay::sink::NatsSink> {
    std::sync::Arc::new(
        tidings_relay::sink::NatsSink::connect(tidings_relay::sink::NatsSinkConfig {
            url: nats.url.clone(),
            ..Default::default()
        })
        .await
        .unwrap(),
    )
}

/// Ticks `relay` until the outbox is empty (60 s deadline); returns the summed reports.
pub async fn drain(relay: &tidings_relay::Relay, db: &TestDb) -> tidings_relay::TickReport {
    let mut total = tidings_relay::TickReport::default();
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = relay
            .tick()
            .await
            .expect("a tick never fails on a working database");
        total += &r;
        if r.claimed == 0 && db.outbox_count().await == 0 {
            return total;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "outbox did not drain: {total:?}"
        );
        if r.claimed == 0 {
            // Only rows waiting for their (millisecond) retry time are left.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A Kafka-protocol broker of a test's own (tansu, in memory), on a free port of 127.0.0.1;
/// killed when dropped. Can be stopped (as a crash: what it held is gone, its topics too),
/// frozen (SIGSTOP) and restarted on the same port.
#[cfg(feature = "kafka")]
pub struct KafkaServer {
    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub brokers: String,
    port: u16,
    /// The broker's working directory, removed on drop.
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

#[cfg(feature = "kafka")]
impl KafkaServer {
    /// Starts a broker (memory storage) and waits (with a deadline) until it accepts
    /// connections. The memory storage loses everything on restart, and answers a fetch from
    /// an offset inside a stored record batch with the NEXT batch: a consumer group resuming
    /// mid-batch never sees the rest of that batch (tansu 0.6.0, `dynostore.rs`). Tests whose
    /// consumers resume from committed offsets make producers send one record per batch
    /// (`batch.num.messages=1`). (Its sqlite storage keeps data across restarts but served a
    /// 3-partition group a few hundred records in two minutes: not usable here.)
    ///
    /// Its group coordinator has no rejoin barrier: a rebalance soon after a member was
    /// killed hands the dead member partitions, which wait for its session to expire (on a
    /// live member's heartbeat; tansu 0.6.0, `coordinator/group/administrator.rs`). Usually a
    /// new rebalance then follows; once in CI (the Kafka chaos test, after the broker froze) a
    /// partition stayed without a live owner for over a minute, as the source allows when the
    /// expiry keeps the group's generation and stored assignments. Tests that kill group
    /// members make a fresh member join when a partition stays unheld.
    pub async fn start() -> KafkaServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("tidings-tansu-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = KafkaServer {
            brokers: format!("127.0.0.1:{port}"),
            port,
            dir,
            child: None,
        };
        s.restart().await;
        s
    }

    /// Sends a signal to the broker process (`-STOP` freezes it, `-CONT` thaws it).
    pub fn signal(&self, signal: &str) {
        signal_child(self.child.as_ref(), signal);
    }

    /// Kills the broker.
    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts it again on the same port; waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.stop();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = std::process::Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .current_dir(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu must be installed (.ci/test installs it: cargo install tansu)");
        self.child = Some(child);
        wait_for_port(self.port, "tansu").await;
    }
}

#[cfg(feature = "kafka")]
impl Drop for KafkaServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every record of every topic on `brokers` (internal ones excepted), partition by partition
/// in offset order: (topic, key, headers, payload). Reads until no record arrived for 1 s
/// (end offsets are not reliable on tansu), at most 30 s.
#[cfg(feature = "kafka")]
pub async fn kafka_records(
    brokers: &str,
) -> Vec<(String, Option<String>, BTreeMapHeaders, Vec<u8>)> {
    kafka_records_at(brokers)
        .await
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// [`kafka_records`], each with its partition and offset.
#[cfg(feature = "kafka")]
pub async fn kafka_records_at(brokers: &str) -> Vec<((i32, i64), KafkaRecord)> {
    let brokers = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("read-back-{}", uuid::Uuid::now_v7()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for t in md.topics() {
            if t.name().starts_with("__") {
                continue;
            }
            for p in t.partitions() {
                tpl.add_partition_offset(t.name(), p.id(), rdkafka::Offset::Beginning)
                    .unwrap();
            }
        }
        let mut per_partition: std::collections::BTreeMap<(String, i32), Vec<_>> =
            Default::default();
        if tpl.count() == 0 {
            return Vec::new();
        }
        consumer.assign(&tpl).unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < end {
            match consumer.poll(Duration::from_secs(1)) {
                None => break,
                Some(Err(e)) => panic!("reading back from Kafka: {e}"),
                Some(Ok(m)) => {
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    (
                                        h.key.to_owned(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    per_partition
                        .entry((m.topic().to_owned(), m.partition()))
                        .or_default()
                        .push((
                            (m.partition(), m.offset()),
                            (
                                m.topic().to_owned(),
                                m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                                headers,
                                m.payload().unwrap_or_default().to_vec(),
                            ),
                        ));
                }
            }
        }
        per_partition
            .into_values()
            .flat_map(|mut v| {
                v.sort_by_key(|(o, _)| *o);
                v
            })
            .collect()
    })
    .await
    .unwrap()
}

/// A Kafka record read back: (topic, key, headers, payload).
#[cfg(feature = "kafka")]
pub type KafkaRecord = (String, Option<String>, BTreeMapHeaders, Vec<u8>);

/// Kafka record headers by name.
#[cfg(feature = "kafka")]
pub type BTreeMapHeaders = std::collections::BTreeMap<String, String>;

/// The sum of consumer group `group`'s committed offsets over the partitions of `topic` (a
/// partition without a commit counts 0).
#[cfg(feature = "kafka")]
pub async fn kafka_committed(brokers: &str, group: &str, topic: &str) -> i64 {
    let (brokers, group, topic) = (brokers.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition(&topic, p.id());
            }
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => o,
                _ => 0,
            })
            .sum()
    })
    .await
    .unwrap()
}

/// The RabbitMQ server tests share (`rabbitmq-server -detached`, started by `.ci/test`), on
/// 127.0.0.1:5672 with the default guest/guest; tests never change its settings, each works in
/// a vhost of its own ([`RabbitVhost`]).
#[cfg(feature = "rabbitmq")]
pub const SHARED_AMQP: &str = "127.0.0.1:5672";

/// A vhost of a test's own on the shared RabbitMQ server (created with `rabbitmqctl add_vhost`,
/// guest may do anything in it), deleted with everything in it when dropped, also when the test
/// fails.
#[cfg(feature = "rabbitmq")]
pub struct RabbitVhost {
    /// Vhost name, `tidings-test-<uuid>`.
    pub name: String,
    /// `amqp://guest:guest@127.0.0.1:5672/<name>`.
    pub url: String,
}

#[cfg(feature = "rabbitmq")]
impl RabbitVhost {
    /// Creates the vhost and gives guest every permission in it.
    pub fn create() -> RabbitVhost {
        let name = format!("tidings-test-{}", uuid::Uuid::now_v7().simple());
        let v = RabbitVhost {
            url: format!("amqp://guest:guest@{SHARED_AMQP}/{name}"),
            name,
        };
        rabbitmqctl(None, &["add_vhost", &v.name]);
        rabbitmqctl(
            None,
            &["set_permissions", "-p", &v.name, "guest", ".*", ".*", ".*"],
        );
        v
    }
}

#[cfg(feature = "rabbitmq")]
impl Drop for RabbitVhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[cfg(feature = "rabbitmq")]
impl RabbitVhost {
    /// How many messages `queue` holds, ready or delivered and not yet acked (0 when it does
    /// not exist). Read with `rabbitmqctl list_queues` (no management plugin needed).
    pub async fn queue_messages(&self, queue: &str) -> u64 {
        queue_messages(None, &self.name, queue).await
    }
}

/// `rabbitmqctl list_queues name messages` of `vhost`, for `queue`: ready plus unacked.
#[cfg(feature = "rabbitmq")]
async fn queue_messages(node: Option<(&str, &std::path::Path)>, vhost: &str, queue: &str) -> u64 {
    let mut cmd = match node {
        None => tokio::process::Command::new("rabbitmqctl"),
        Some((name, home)) => {
            let mut c = tokio::process::Command::new(rabbitmq_bin("rabbitmqctl"));
            c.env("HOME", home).args(["-n", name]);
            c
        }
    };
    let out = cmd
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "-p",
            vhost,
            "name",
            "messages",
        ])
        .output()
        .await
        .expect("rabbitmqctl must be installed (Debian package rabbitmq-server)");
    assert!(
        out.status.success(),
        "rabbitmqctl list_queues: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.rsplit_once(char::is_whitespace))
        .filter(|(name, _)| name.trim() == queue)
        .map(|(_, n)| {
            n.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("list_queues: {l:?}", l = n))
        })
        .sum()
}

/// Runs `rabbitmqctl` against the shared server (`node` None, through the Debian wrapper) or a
/// test's own node (`Some((node name, its home with the Erlang cookie))`); panics on failure.
#[cfg(feature = "rabbitmq")]
fn rabbitmqctl(node: Option<(&str, &std::path::Path)>, args: &[&str]) {
    let mut cmd = match node {
        None => std::process::Command::new("rabbitmqctl"),
        Some((name, home)) => {
            let mut c = std::process::Command::new(rabbitmq_bin("rabbitmqctl"));
            c.env("HOME", home).args(["-n", name]);
            c
        }
    };
    let out = cmd
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed (Debian package rabbitmq-server)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// RabbitMQ's own scripts (not Debian's wrappers in /usr/sbin, which switch to the rabbitmq
/// user and its Erlang cookie).
#[cfg(feature = "rabbitmq")]
fn rabbitmq_bin(name: &str) -> std::path::PathBuf {
    let own = std::path::Path::new("/usr/lib/rabbitmq/bin").join(name);
    if own.exists() {
        own
    } else {
        name.into()
    }
}

/// A RabbitMQ node of a test's own, for outages the shared server must not have: on free ports
/// of 127.0.0.1, named `tidings-<uuid>@localhost`, with its database, logs, Erlang cookie and
/// config in a temporary folder, no plugins. Killed when dropped. Can be killed (as a crash)
/// and restarted with what it held, frozen (SIGSTOP), and driven with `rabbitmqctl` (e.g. a
/// memory alarm that blocks publishers). Starts in about 4 s on the development machine.
#[cfg(feature = "rabbitmq")]
pub struct RabbitServer {
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub url: String,
    /// The AMQP port.
    pub port: u16,
    /// The Erlang node name.
    pub node: String,
    /// How long the last (re)start took until the AMQP port accepted connections.
    pub started_in: Duration,
    dist_port: u16,
    dir: std::path::PathBuf,
    /// The `rabbitmq-server` script: it runs the VM as its child and waits.
    child: Option<std::process::Child>,
    /// The node's VM (from its pid file), which signals and kills go to.
    vm: Option<u32>,
}

#[cfg(feature = "rabbitmq")]
impl RabbitServer {
    /// Starts a node and waits (60 s at most) until it accepts AMQP connections.
    pub async fn start() -> RabbitServer {
        RabbitServer::start_with(&[]).await
    }

    /// Like [`RabbitServer::start`], with extra `rabbitmq.conf` lines (e.g.
    /// `max_message_size = 1048576`).
    pub async fn start_with(conf: &[&str]) -> RabbitServer {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (port, dist_port) = (free(), free());
        let id = uuid::Uuid::now_v7().simple().to_string();
        let dir = std::env::temp_dir().join(format!("tidings-rabbitmq-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        let mut lines = vec![format!("listeners.tcp.default = 127.0.0.1:{port}")];
        lines.extend(conf.iter().map(|l| l.to_string()));
        std::fs::write(dir.join("rabbitmq.conf"), lines.join("\n") + "\n").unwrap();
        let mut s = RabbitServer {
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            port,
            node: format!("tidings-{id}@localhost"),
            started_in: Duration::ZERO,
            dist_port,
            dir,
            child: None,
            vm: None,
        };
        s.restart().await;
        s
    }

    /// Sends a signal to the node's Erlang VM (`-STOP` freezes it, `-CONT` thaws it).
    pub fn signal(&self, signal: &str) {
        let pid = self.vm.expect("the node is running");
        let ok = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {signal} {pid}");
    }

    /// Kills the node (SIGKILL to its VM, as a crash would) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(pid) = self.vm.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        // The script exits once its VM has; reaping it reaps the VM's exit too.
        if let Some(mut c) = self.child.take() {
            let end = std::time::Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports with what it held; waits until it accepts AMQP
    /// connections.
    pub async fn restart(&mut self) {
        self.stop();
        let started = std::time::Instant::now();
        let d = |f: &str| self.dir.join(f);
        // In the foreground the script runs the VM as its child and waits; the VM writes its pid.
        let child = std::process::Command::new(rabbitmq_bin("rabbitmq-server"))
            .current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_ENABLED_PLUGINS", "")
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", d("pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(d("stdout.log")).unwrap())
            .stderr(std::fs::File::create(d("stderr.log")).unwrap())
            .spawn()
            .expect("rabbitmq-server must be installed (Debian package rabbitmq-server)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                let out = std::fs::read_to_string(d("stdout.log")).unwrap_or_default();
                panic!(
                    "rabbitmq-server did not start ({exited:?}): {}",
                    &out[out.len().saturating_sub(3000)..]
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.started_in = started.elapsed();
        let pid = std::fs::read_to_string(d("pid")).unwrap_or_default();
        self.vm = Some(
            pid.trim()
                .parse()
                .unwrap_or_else(|_| panic!("no pid in the node's pid file: {pid:?}")),
        );
    }

    /// Runs `rabbitmqctl -n <node> args`, e.g. `set_vm_memory_high_watermark 0` (a memory
    /// alarm: publishers are blocked) and `... 0.4` (lifted); panics on failure.
    pub fn ctl(&self, args: &[&str]) {
        rabbitmqctl(Some((&self.node, &self.dir)), args);
    }

    /// How many messages `queue` of vhost `/` holds, ready or delivered and not yet acked (0
    /// when it does not exist).
    pub async fn queue_messages(&self, queue: &str) -> u64 {
        queue_messages(Some((&self.node, &self.dir)), "/", queue).await
    }
}

#[cfg(feature = "rabbitmq")]
impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A message read back from a RabbitMQ queue: routing key, AMQP properties, headers (long
/// strings as text) and payload.
#[cfg(feature = "rabbitmq")]
#[derive(Debug, Clone)]
pub struct AmqpMessage {
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its AMQP properties.
    pub properties: lapin::BasicProperties,
    /// Its headers, long-string values as text.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Its body.
    pub payload: Vec<u8>,
}

/// Takes every message from `queue` (acknowledged: gone from the queue), in queue order.
#[cfg(feature = "rabbitmq")]
pub async fn amqp_take_all(url: &str, queue: &str) -> Vec<AmqpMessage> {
    use lapin::options::BasicGetOptions;
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("reading back from RabbitMQ: {e}"));
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = tokio::time::timeout(
        Duration::from_secs(10),
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get stalled")
    .unwrap()
    {
        let d = m.delivery;
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .filter_map(|(k, v)| match v {
                        lapin::types::AMQPValue::LongString(s) => Some((
                            k.to_string(),
                            String::from_utf8_lossy(s.as_bytes()).into_owned(),
                        )),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(AmqpMessage {
            routing_key: d.routing_key.to_string(),
            properties: d.properties,
            headers,
            payload: d.data,
        });
    }
    let _ = conn.close(200, "OK".into()).await;
    out
}

/// Declares a durable queue `queue` and binds it to `exchange` (declared durable, of type
/// `topic`, if missing) with `binding_key`; `arguments` as queue arguments.
#[cfg(feature = "rabbitmq")]
pub async fn amqp_bind(
    url: &str,
    exchange: &str,
    queue: &str,
    binding_key: &str,
    arguments: lapin::types::FieldTable,
) {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        arguments,
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        binding_key.into(),
        QueueBindOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "OK".into()).await;
}

/// The shared Redis server (127.0.0.1:6379), where tests keep to key prefixes of their own.
#[cfg(feature = "redis")]
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A key prefix of a test's own on a Redis server: every key the test makes starts with
/// `prefix`; dropping it deletes them all (never FLUSHDB: other tests share the server).
#[cfg(feature = "redis")]
pub struct RedisKeys {
    /// The server.
    pub url: String,
    /// `t-<uuid>`, unique per test.
    pub prefix: String,
}

#[cfg(feature = "redis")]
impl RedisKeys {
    /// A fresh prefix on the shared server.
    pub fn new() -> RedisKeys {
        RedisKeys::on(REDIS_URL)
    }

    /// A fresh prefix on the server at `url`.
    pub fn on(url: &str) -> RedisKeys {
        RedisKeys {
            url: url.to_owned(),
            prefix: format!("t-{}", uuid::Uuid::now_v7().simple()),
        }
    }

    /// The keys with the prefix, sorted.
    pub async fn keys(&self) -> Vec<String> {
        let mut c = redis_conn(&self.url).await;
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// Every entry of every stream with the prefix: (stream, entry id, fields), streams sorted
    /// by name, entries in stream order.
    pub async fn entries(&self) -> Vec<RedisEntry> {
        let mut c = redis_conn(&self.url).await;
        let mut out = Vec::new();
        for key in self.keys().await {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
            if kind != "stream" {
                continue;
            }
            let range: Vec<(String, Fields)> = redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut c)
                .await
                .unwrap();
            for (id, fields) in range {
                out.push(RedisEntry {
                    stream: key.clone(),
                    id,
                    fields,
                });
            }
        }
        out
    }
}

#[cfg(feature = "redis")]
impl Default for RedisKeys {
    fn default() -> Self {
        RedisKeys::new()
    }
}

#[cfg(feature = "redis")]
impl Drop for RedisKeys {
    fn drop(&mut self) {
        // A blocking client: Drop cannot await (and may run outside a runtime).
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut c) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let mut cursor: u64 = 0;
        loop {
            let Ok((next, keys)) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query::<(u64, Vec<String>)>(&mut c)
            else {
                return;
            };
            if !keys.is_empty() {
                let _ = redis::cmd("DEL").arg(&keys).query::<i64>(&mut c);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

/// A stream entry's fields, in order.
#[cfg(feature = "redis")]
pub type Fields = Vec<(String, Vec<u8>)>;

/// One stream entry as Redis holds it.
#[cfg(feature = "redis")]
#[derive(Debug, Clone)]
pub struct RedisEntry {
    /// The stream key.
    pub stream: String,
    /// The entry id Redis gave it.
    pub id: String,
    /// Its fields, in order.
    pub fields: Fields,
}

#[cfg(feature = "redis")]
impl RedisEntry {
    /// A field's value.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// An async connection to the Redis server at `url`.
#[cfg(feature = "redis")]
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    // redis-rs gives up on an answer after 500 ms by default: a test's read of a whole stream
    // on a loaded CI machine (every test binary's Redis traffic at once) can take longer.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(10)))
        .set_response_timeout(Some(std::time::Duration::from_secs(30)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("Redis at {url} must run: {e}"))
}

/// A Redis server of a test's own, for outages the shared server must not have: on a free port
/// of 127.0.0.1, its files in a temporary folder, append-only file with `appendfsync always`
/// (so a kill and restart keeps every acknowledged write). Killed when dropped. Can be killed
/// (as a crash) and restarted with what it held, and frozen (SIGSTOP).
#[cfg(feature = "redis")]
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
    /// The port.
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

#[cfg(feature = "redis")]
impl RedisServer {
    /// Starts a server and waits (10 s at most) until it answers PING.
    pub async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("tidings-redis-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = RedisServer {
            url: format!("redis://127.0.0.1:{port}"),
            port,
            dir,
            child: None,
        };
        s.restart().await;
        s
    }

    /// Sends a signal to the server (`-STOP` freezes it, `-CONT` thaws it).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is running").id();
        let ok = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill {signal} {pid}");
    }

    /// Kills the server (SIGKILL, as a crash would) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with what it held; waits until it answers PING.
    pub async fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (Debian package redis-server)");
        self.child = Some(child);
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                panic!(
                    "redis-server did not start ({exited:?}): {}",
                    &log[log.len().saturating_sub(3000)..]
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for RedisServer {
    fn drop(&mut self) {
        // A frozen server must be thawed to die cleanly; SIGKILL works on a stopped process too.
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
