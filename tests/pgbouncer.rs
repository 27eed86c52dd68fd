//! Through a real PgBouncer (Debian `pgbouncer`, started by each test on a free port) in
//! transaction mode, with fewer server connections than clients so they are really shared:
//! producers enqueue with `enqueue_pg` and two relays with `statement_cache: false` deliver
//! every message exactly once; the default prepared-statement path breaks there.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tidings_outbox::{Message, MessageId, Outbox, OutboxConfig};
use tidings_relay::{Delivery, Envelope, Relay, RelayConfig, Sink, SinkError};
use tidings_tests::{eventually, TestDb};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// A pgbouncer process of this test's own, killed on drop.
struct PgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl PgBouncer {
    /// Starts pgbouncer in transaction mode in front of `db` with `pool_size` server
    /// connections, and waits (bounded) until it accepts a session.
    async fn start(db: &TestDb, pool_size: usize) -> PgBouncer {
        let binary = which_pgbouncer().unwrap_or_else(|| {
            panic!(
                "pgbouncer is not installed: this test needs a real PgBouncer; \
                 install the Debian package (apt-get install pgbouncer)"
            )
        });
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("tidings-pgbouncer-{}-{port}", db.name));
        std::fs::create_dir_all(&dir).unwrap();
        let (pg_host, pg_port) = server_host_port();
        let ini = format!(
            "[databases]\n\
             {db} = host={pg_host} port={pg_port} dbname={db} user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {auth}\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             min_pool_size = 0\n\
             reserve_pool_size = 0\n\
             max_client_conn = 200\n\
             server_lifetime = 3600\n\
             logfile = {log}\n\
             pidfile = {pid}\n",
            db = db.name,
            auth = dir.join("users.txt").display(),
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let ini = dir.join("pgbouncer.ini");
        // PgBouncer refuses to run as root: as root (CI), run it as the postgres OS user,
        // which must be able to write its log and pid file here.
        let mut cmd = if running_as_root() {
            Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&binary).arg(&ini);
            c
        } else {
            let mut c = Command::new(&binary);
            c.arg(&ini);
            c
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let bouncer = PgBouncer { child, dir, port };
        let url = bouncer.url(db);
        let end = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio_postgres::connect(&url, NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    if client.simple_query("SELECT 1").await.is_ok() {
                        break;
                    }
                }
                Err(e) => assert!(
                    tokio::time::Instant::now() < end,
                    "pgbouncer did not accept a session within 15 s: {e}; its log: {}",
                    bouncer.log()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bouncer
    }

    fn url(&self, db: &TestDb) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db.name)
    }

    /// A deadpool pool of `size` client connections through this pgbouncer.
    fn pool(&self, db: &TestDb, size: usize) -> deadpool_postgres::Pool {
        let cfg: tokio_postgres::Config = self.url(db).parse().unwrap();
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // Under runuser, signal pgbouncer itself (its pid file) and let runuser reap it and
        // exit: killing runuser first would orphan pgbouncer.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill")
                .args(["-TERM", pid.trim()])
                .stderr(Stdio::null())
                .status();
        }
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which_pgbouncer() -> Option<PathBuf> {
    if Path::new(PGBOUNCER).exists() {
        return Some(PGBOUNCER.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("pgbouncer"))
            .find(|p| p.exists())
    })
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Host and port of the test PostgreSQL server (from `TIDINGS_TEST_PG`, default 127.0.0.1:5432).
fn server_host_port() -> (String, u16) {
    let cfg: tokio_postgres::Config = format!("{}/postgres", tidings_tests::server_url())
        .parse()
        .unwrap();
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    (host, cfg.get_ports().first().copied().unwrap_or(5432))
}

/// Counts every publish per message id.
#[derive(Default)]
struct Counting {
    seen: Mutex<HashMap<MessageId, usize>>,
}

impl Counting {
    fn delivered(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Sink for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        *self.seen.lock().unwrap().entry(msg.id).or_default() += 1;
        Box::pin(async { Ok(Delivery { duplicate: false }) })
    }
}

fn pgbouncer_config(name: &str) -> RelayConfig {
    RelayConfig {
        name: name.into(),
        batch_size: 50,
        poll_interval: Duration::from_millis(20),
        listen: false,
        statement_cache: false,
        claim_timeout: Duration::from_secs(5),
        publish_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(100),
        vacuum_every: 200,
        ..Default::default()
    }
}

const PRODUCERS: usize = 4;
const TRANSACTIONS: usize = 50;
const PER_TRANSACTION: usize = 5;

#[tokio::test(flavor = "multi_thread")]
async fn producers_and_two_relays_deliver_exactly_once_through_pgbouncer_in_transaction_mode() {
    let db = TestDb::migrated().await;
    let bouncer = PgBouncer::start(&db, 2).await;
    let outbox = Outbox::new(OutboxConfig {
        statement_cache: false,
        ..Default::default()
    })
    .unwrap();

    // The cached-statement producer call refuses at once instead of failing at random.
    let producer_pool = bouncer.pool(&db, 8);
    let c = producer_pool.get().await.unwrap();
    let err = outbox
        .enqueue_deadpool(&c, &Message::new("t.refused", b"x".to_vec()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("enqueue_pg"), "{err}");
    drop(c);

    let sink = Arc::new(Counting::default());
    // Relay A is driven by ticks; relay B runs its loop (schema check, heartbeats, VACUUM,
    // deregistration), all through the pooler.
    let a = Relay::new(bouncer.pool(&db, 3), sink.clone(), pgbouncer_config("a")).unwrap();
    let b =
        Arc::new(Relay::new(bouncer.pool(&db, 3), sink.clone(), pgbouncer_config("b")).unwrap());
    a.check_schema().await.unwrap();
    let stop = CancellationToken::new();
    let b_run = tokio::spawn({
        let (b, stop) = (b.clone(), stop.clone());
        async move { b.run(stop).await }
    });

    let producers = (0..PRODUCERS).map(|p| {
        let (pool, outbox) = (producer_pool.clone(), outbox.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for t in 0..TRANSACTIONS {
                let mut client = pool.get().await.unwrap();
                let tx = client.transaction().await.unwrap();
                if t % 2 == 0 {
                    for i in 0..PER_TRANSACTION {
                        let msg = Message::new("orders.created", format!("{p}-{t}-{i}"))
                            .key(format!("k{}", i % 3));
                        ids.push(outbox.enqueue_pg(&*tx, &msg).await.unwrap());
                    }
                } else {
                    let msgs: Vec<Message> = (0..PER_TRANSACTION)
                        .map(|i| Message::new("orders.paid", format!("{p}-{t}-{i}")))
                        .collect();
                    ids.extend(outbox.enqueue_batch_pg(&*tx, &msgs).await.unwrap());
                }
                tx.commit().await.unwrap();
            }
            ids
        })
    });
    let producers = futures::future::join_all(producers);
    let ticking = async {
        let mut delivered = 0;
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while sink.delivered() < PRODUCERS * TRANSACTIONS * PER_TRANSACTION {
            let r = a.tick().await.unwrap();
            delivered += r.delivered;
            assert!(
                tokio::time::Instant::now() < end,
                "not delivered within 60 s"
            );
            if r.claimed == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        delivered
    };
    let (produced, a_delivered) = tokio::join!(producers, ticking);
    let produced: Vec<MessageId> = produced.into_iter().flat_map(|r| r.unwrap()).collect();
    assert_eq!(produced.len(), PRODUCERS * TRANSACTIONS * PER_TRANSACTION);

    eventually(
        "the outbox to be empty",
        Duration::from_secs(30),
        || async { db.outbox_count().await == 0 },
    )
    .await;
    let direct = db.client().await;
    eventually(
        "relay b's heartbeat with its deliveries",
        Duration::from_secs(30),
        || async {
            let n: i64 = direct
                .query_one(
                    "SELECT coalesce(sum(delivered), 0)::int8 FROM tidings.relays WHERE name = 'b'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n as usize + a_delivered == produced.len()
        },
    )
    .await;
    stop.cancel();
    b_run.await.unwrap().unwrap();

    let seen = sink.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), produced.len(), "every message delivered");
    for id in &produced {
        assert_eq!(seen.get(id), Some(&1), "{id} delivered exactly once");
    }
    assert!(
        a_delivered > 0 && a_delivered < produced.len(),
        "both relays delivered: a {a_delivered} of {}",
        produced.len()
    );
    let relays: i64 = direct
        .query_one("SELECT count(*) FROM tidings.relays WHERE name = 'b'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(relays, 0, "relay b deregistered on shutdown");
    drop(bouncer);
}

/// Proves the flag matters: with the statement cache on (the default), a relay's cached
/// statements live on one server connection, and as soon as PgBouncer gives the relay's next
/// transaction another server connection the claim fails.
#[tokio::test(flavor = "multi_thread")]
async fn cached_prepared_statements_fail_through_pgbouncer_in_transaction_mode() {
    let db = TestDb::migrated().await;
    db.enqueue((0..20).map(|i| Message::new("t", format!("{i}"))).collect())
        .await;
    let bouncer = PgBouncer::start(&db, 2).await;
    let config = RelayConfig {
        statement_cache: true,
        ..pgbouncer_config("cached")
    };
    let relay = Relay::new(bouncer.pool(&db, 1), Arc::new(Counting::default()), config).unwrap();
    let (blocker, conn) = tokio_postgres::connect(&bouncer.url(&db), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut errors = Vec::new();
    for _ in 0..10 {
        if let Err(e) = relay.tick().await {
            errors.push(tidings_relay::ErrorChain(&e).to_string());
        }
        // Another client holds a server connection in a transaction (PgBouncer hands out the
        // most recently used one first: the relay's), so the relay's next transaction runs on
        // the other server connection, where its statements were never prepared.
        blocker.batch_execute("BEGIN; SELECT 1").await.unwrap();
        if let Err(e) = relay.tick().await {
            errors.push(tidings_relay::ErrorChain(&e).to_string());
        }
        blocker.batch_execute("COMMIT").await.unwrap();
    }
    assert!(
        errors.iter().any(|e| e.contains("prepared statement")),
        "expected 'prepared statement ... does not exist' through pgbouncer, got {errors:?}"
    );
    drop(bouncer);
}
