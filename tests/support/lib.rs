//! Test support: every test gets its own PostgreSQL database, cloned from a migrated template,
//! so tests run in parallel and LISTEN channels never collide.
//!
//! The server is the local one (`postgres://postgres@127.0.0.1:5432`, trust auth); set
//! `TIDINGS_TEST_PG` to point elsewhere on 127.0.0.1.

pub mod conformance;
pub mod runner_conformance;

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

/// Waits (20 s at most) until 127.0.0.1:`port` accepts connections.
async fn wait_for_port(port: u16, what: &str) {
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
