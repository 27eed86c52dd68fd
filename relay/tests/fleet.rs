//! One `tidings relay` process serving several databases (`--database NAME=URL`,
//! `--databases-file`): fairness between a busy and a quiet database, a database that is down
//! or not migrated reported and retried while the others go on, `db` labels on logs, metrics,
//! readiness and status (never a URL or a password), the file re-read on SIGHUP, and two
//! processes sharing the same databases with no double publishing and per-key order.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidings_outbox::Message;
use tidings_tests::{eventually, http_get, http_get_as, sample, sum_samples, NatsServer, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_tidings");

/// `tidings` with no DATABASE_URL (the databases come as flags or a file).
fn tidings() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("DATABASE_URL")
        .env("TIDINGS_LOG", "info,tidings_relay=debug")
        .env_remove("TIDINGS_DATABASES_FILE");
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// SIGTERM, then the exit code (within 15 s).
async fn terminate(mut child: Child) -> Option<i32> {
    signal(&child, "-TERM");
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(Instant::now() < end, "no exit within 15 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Relay instances registered in the database (a relay that stopped has deregistered).
async fn relays(db: &TestDb) -> i64 {
    tidings_tests::connect(&db.url)
        .await
        .query_one("SELECT count(*) FROM tidings.relays", &[])
        .await
        .unwrap()
        .get(0)
}

fn keyed(topic: &str, from: usize, n: usize, keys: usize) -> Vec<Message> {
    (from..from + n)
        .map(|i| {
            Message::new(topic, format!("{}:{i}", i % keys))
                .key(format!("k{}", i % keys))
                .biz_id(format!("{topic}-{i}"))
        })
        .collect()
}

/// A busy database (20,000 messages waiting) and a quiet one in one process: the quiet one's
/// messages are delivered within a second while the busy one still has a backlog. A database
/// that is down and one that is not migrated are reported (log lines, /readyz, metrics,
/// status) and do not stop the others; once migrated (`tidings migrate up --database`), the
/// relay serves it without a restart. Logs, metrics and status name databases, never a URL
/// or a password.
#[tokio::test(flavor = "multi_thread")]
async fn one_process_serves_several_databases_fairly_and_reports_the_broken_ones() {
    let nats = NatsServer::start().await;
    let (busy, quiet, bare) = (
        TestDb::migrated().await,
        TestDb::migrated().await,
        TestDb::empty().await,
    );
    busy.enqueue(keyed("busy.orders", 0, 20_000, 1000)).await;
    let down_url = format!(
        "postgres://tidings:hunter2-secret@127.0.0.1:{}/nowhere?connect_timeout=1",
        free_port()
    );
    let admin = free_port();
    let dbs = [
        format!("busy={}", busy.url),
        format!("quiet={}", quiet.url),
        format!("down={down_url}"),
        format!("bare={}", bare.url),
    ];
    let log = std::env::temp_dir().join(format!("fleet-{}.log", uuid::Uuid::now_v7()));
    let mut cmd = tidings();
    cmd.args(["relay", "--sink", "nats", "--nats-url", &nats.url])
        .args(["--batch-size", "200", "--pool-size", "2"])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")]);
    for d in &dbs {
        cmd.args(["--database", d]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    eventually(
        "the busy database to be draining",
        Duration::from_secs(30),
        || async { busy.outbox_count().await < 19_800 },
    )
    .await;
    quiet.enqueue(keyed("quiet.orders", 0, 20, 5)).await;
    let sent = Instant::now();
    eventually(
        "the quiet database's 20 messages delivered",
        Duration::from_secs(10),
        || async { quiet.outbox_count().await == 0 },
    )
    .await;
    let took = sent.elapsed();
    let busy_left = busy.outbox_count().await;
    eprintln!("quiet database delivered in {took:?}; the busy one still had {busy_left} waiting");
    assert!(
        busy_left > 0,
        "the busy database was still draining when the quiet one's messages went out"
    );
    // Starved, it would wait for the whole backlog (about 20 s here, longer on a loaded machine).
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The broken ones are reported, by name.
    let (code, body) = http_get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("down: database:"), "{body}");
    assert!(body.contains("bare: database:"), "{body}");
    assert!(body.contains("tidings migrate up"), "{body}");
    assert!(!body.contains("quiet:"), "{body}");
    assert!(!body.contains("hunter2"), "{body}");

    // Migrating the bare one from the command line (several databases at once) gets it served
    // without a restart.
    let out = tidings()
        .args(["migrate", "up", "--database", &format!("bare={}", bare.url)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("database bare"));
    bare.enqueue(keyed("bare.orders", 0, 5, 5)).await;
    eventually(
        "the newly migrated database served (retry backoff: 1 s doubling up to 60 s)",
        Duration::from_secs(90),
        || async { bare.outbox_count().await == 0 },
    )
    .await;
    eventually(
        "the busy database drained",
        Duration::from_secs(120),
        || async { busy.outbox_count().await == 0 },
    )
    .await;

    let (_, metrics) = http_get(admin, "/metrics").await;
    for (db, n) in [("busy", 20_000.0), ("quiet", 20.0), ("bare", 5.0)] {
        assert_eq!(
            sum_samples(
                &metrics,
                "tidings_relay_delivered_total",
                &format!("db=\"{db}\"")
            ),
            n,
            "{db}"
        );
        assert_eq!(
            sample(&metrics, &format!("tidings_database_up{{db=\"{db}\"}}")),
            Some(1.0),
            "{db}"
        );
    }
    assert_eq!(
        sample(&metrics, "tidings_database_up{db=\"down\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, "tidings_outbox_backlog{db=\"busy\"}"),
        Some(0.0)
    );
    assert!(!metrics.contains("hunter2") && !metrics.contains("127.0.0.1:"));

    // The operator page lists the databases and serves each one's page under /db/NAME/.
    let (code, index) = http_get(admin, "/").await;
    assert_eq!(code, 200);
    assert!(
        index.contains("db/quiet/") && index.contains("db/down/"),
        "{index}"
    );
    let (code, _) = http_get(admin, "/db/quiet").await;
    assert_eq!(code, 308, "a page without its slash is redirected");
    let (code, page) = http_get(admin, "/db/quiet/").await;
    assert_eq!(code, 200);
    assert!(page.contains("api/overview"));
    let (code, overview) = http_get(admin, "/db/busy/api/overview").await;
    assert_eq!(code, 200, "{overview}");
    assert!(overview.contains("\"backlog\":0"), "{overview}");
    assert_eq!(http_get(admin, "/db/nope/").await.0, 404);
    // The Host guard covers the list of databases and every database's page.
    assert_eq!(http_get_as(admin, "/", "evil.example").await.0, 421);
    assert_eq!(
        http_get_as(admin, "/db/quiet/", "evil.example").await.0,
        421
    );
    assert_eq!(http_get_as(admin, "/db/nope/", "evil.example").await.0, 421);

    // `tidings status` over the same databases: each by name, the unreachable one with its
    // error (exit 1 after showing the others), no URL.
    let mut status = tidings();
    status.args(["status", "--json"]);
    for d in &dbs {
        status.args(["--database", d]);
    }
    let out = status.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_name: BTreeMap<String, serde_json::Value> = doc["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["db"].as_str().unwrap().to_owned(), d.clone()))
        .collect();
    assert_eq!(by_name["busy"]["status"]["backlog"], 0);
    assert_eq!(by_name["quiet"]["status"]["relays"][0]["alive"], true);
    assert!(by_name["down"]["error"].is_string());
    let all = format!("{out:?}");
    assert!(!all.contains("hunter2"), "{all}");

    assert_eq!(terminate(child).await, Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(!text.contains("hunter2"), "no password in the log");
    assert!(
        !text.contains(&busy.url) && !text.contains("/nowhere"),
        "no URL in the log"
    );
    let warned = |db: &str, what: &str| {
        text.lines()
            .any(|l| l.contains(&format!("db{{db={db}}}")) && l.contains(what))
    };
    assert!(
        warned("down", "cannot serve this database now"),
        "the down database is reported by name:\n{text}"
    );
    assert!(
        warned("bare", "tidings migrate up"),
        "the unmigrated one too:\n{text}"
    );
    assert!(
        warned("bare", "serving it again"),
        "and its recovery:\n{text}"
    );
    assert!(
        warned("quiet", "relay started") && warned("busy", "relay started"),
        "every relay's log lines carry its database's name:\n{text}"
    );
}

/// `--databases-file` is re-read on SIGHUP: a database added is served, one removed is stopped
/// gracefully (it deregisters), a file that does not parse is logged and ignored (the databases
/// served go on), and configuration errors at start-up exit 2 without showing a URL.
#[tokio::test(flavor = "multi_thread")]
async fn the_databases_file_is_reread_on_sighup_without_a_restart() {
    let nats = NatsServer::start().await;
    let (a, b) = (TestDb::migrated().await, TestDb::migrated().await);
    let dir = std::env::temp_dir().join(format!("fleet-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("databases");
    let log = dir.join("log");
    std::fs::write(&file, format!("# tenants\na={}\n", a.url)).unwrap();
    let child = tidings()
        .args(["relay", "--sink", "nats", "--nats-url", &nats.url])
        .args(["--databases-reload", "1h", "--heartbeat-interval", "200ms"])
        .arg("--databases-file")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    a.enqueue(keyed("a.orders", 0, 10, 3)).await;
    eventually("a served", Duration::from_secs(20), || async {
        a.outbox_count().await == 0
    })
    .await;

    std::fs::write(&file, format!("a={}\nb={}\n", a.url, b.url)).unwrap();
    signal(&child, "-HUP");
    b.enqueue(keyed("b.orders", 0, 10, 3)).await;
    eventually("b served after SIGHUP", Duration::from_secs(20), || async {
        b.outbox_count().await == 0
    })
    .await;

    std::fs::write(&file, "a=postgres://u:hunter2@h/a\na=postgres://h/b\n").unwrap();
    signal(&child, "-HUP");
    let logged = |what: &'static str| {
        let log = log.clone();
        move || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(what)
            }
        }
    };
    eventually(
        "the bad file refused",
        Duration::from_secs(10),
        logged("cannot re-read --databases-file"),
    )
    .await;
    a.enqueue(keyed("a.orders", 10, 5, 3)).await;
    b.enqueue(keyed("b.orders", 10, 5, 3)).await;
    eventually("both still served", Duration::from_secs(20), || async {
        a.outbox_count().await == 0 && b.outbox_count().await == 0
    })
    .await;

    // A changed URL (same database, another application_name) restarts that relay.
    std::fs::write(
        &file,
        format!("a={}?application_name=tidings_a\nb={}\n", a.url, b.url),
    )
    .unwrap();
    signal(&child, "-HUP");
    eventually(
        "a's relay restarted",
        Duration::from_secs(10),
        logged("database URL changed"),
    )
    .await;
    a.enqueue(keyed("a.orders", 15, 5, 3)).await;
    eventually(
        "a served after its restart",
        Duration::from_secs(20),
        || async { a.outbox_count().await == 0 },
    )
    .await;

    std::fs::write(&file, format!("b={}\n", b.url)).unwrap();
    signal(&child, "-HUP");
    eventually(
        "a's relay stopped and deregistered",
        Duration::from_secs(20),
        || async { relays(&a).await == 0 },
    )
    .await;
    assert_eq!(relays(&b).await, 1);

    assert_eq!(terminate(child).await, Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("database added"), "{text}");
    assert!(text.contains("database removed"), "{text}");
    assert!(text.contains("database a is named twice"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    // Start-up refusals: exit 2, naming the problem and never the URL.
    let bad = dir.join("bad");
    for (content, want) in [
        (
            "postgres://u:hunter2@h/a?sslmode=require\n",
            "line 1: a database name",
        ),
        (
            "a=postgres://u:hunter2@h/a\na=postgres://u:hunter2@h/b\n",
            "named twice",
        ),
        (
            "a=postgres://u:hunter2@h/a?sslmode=sometimes\n",
            "of database a",
        ),
    ] {
        std::fs::write(&bad, content).unwrap();
        let out = tidings()
            .args(["relay", "--sink", "stdout", "--databases-file"])
            .arg(&bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    let out = tidings()
        .env("DATABASE_URL", &a.url)
        .args([
            "relay",
            "--sink",
            "stdout",
            "--database",
            &format!("a={}", a.url),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not both"));
    let out = tidings()
        .args(["dlq", "list", "--database", &format!("a={}", a.url)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("works on one database"), "{err}");
    assert!(!err.contains(&a.url), "{err}");
    // A databases file in the environment (for the relay) does not get in the way of a
    // command on one database.
    let out = tidings()
        .env("TIDINGS_DATABASES_FILE", &file)
        .env("DATABASE_URL", &a.url)
        .args(["dlq", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // A conninfo string without NAME= is refused without being echoed.
    let out = tidings()
        .args(["status", "--database", "password=hunter2=x host=127.0.0.1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("connection keyword") && !err.contains("hunter2"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two processes serving the same two databases: every message is published once (JetStream
/// reports no re-send as a duplicate), in order per key within each database, and both
/// processes did part of the work.
#[tokio::test(flavor = "multi_thread")]
async fn two_processes_share_the_same_databases_without_double_publishing() {
    let nats = NatsServer::start().await;
    let (a, b) = (TestDb::migrated().await, TestDb::migrated().await);
    let n = 20_000;
    a.enqueue(keyed("a.orders", 0, n, 50)).await;
    b.enqueue(keyed("b.orders", 0, n, 50)).await;
    let ports = [free_port(), free_port()];
    let children: Vec<Child> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            tidings()
                .env("TIDINGS_LOG", "warn")
                .args(["relay", "--sink", "nats", "--nats-url", &nats.url])
                .args(["--name", &format!("p{i}"), "--batch-size", "100"])
                .args(["--admin-listen", &format!("127.0.0.1:{port}")])
                .args(["--database", &format!("a={}", a.url)])
                .args(["--database", &format!("b={}", b.url)])
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    eventually(
        "both databases drained",
        Duration::from_secs(180),
        || async { a.outbox_count().await == 0 && b.outbox_count().await == 0 },
    )
    .await;
    let mut delivered = Vec::new();
    for port in ports {
        let (_, m) = http_get(port, "/metrics").await;
        assert_eq!(
            sum_samples(&m, "tidings_relay_broker_duplicates_total", ""),
            0.0,
            "no message was published twice"
        );
        delivered.push(sum_samples(&m, "tidings_relay_delivered_total", ""));
    }
    eprintln!("delivered by each process: {delivered:?}");
    assert_eq!(delivered.iter().sum::<f64>(), 2.0 * n as f64);
    assert!(delivered.iter().all(|d| *d > 0.0), "{delivered:?}");
    for child in children {
        assert_eq!(terminate(child).await, Some(0));
    }

    let stored = tidings_tests::stream_messages(&nats.url, "TIDINGS").await;
    assert_eq!(stored.len(), 2 * n);
    let mut last: BTreeMap<(String, String), usize> = BTreeMap::new();
    for m in &stored {
        let text = String::from_utf8(m.payload.to_vec()).unwrap();
        let (key, seq) = text.split_once(':').unwrap();
        let seq: usize = seq.parse().unwrap();
        let prev = last.insert((m.subject.to_string(), key.to_owned()), seq);
        assert!(
            prev.is_none_or(|p| p < seq),
            "{} key {key}: {seq} after {prev:?}",
            m.subject
        );
    }
}

/// The databases of a fleet share the sink's broker connection: one leaving (removed from the
/// file) must not close it under the others. With RabbitMQ a closed connection shows as an
/// outage ("broker unavailable") and a reconnect; neither may happen, and every message is in
/// the queue once.
#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread")]
async fn a_database_leaving_the_fleet_does_not_close_the_shared_broker_connection() {
    use lapin::options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let (a, b) = (TestDb::migrated().await, TestDb::migrated().await);
    let name = format!("t-fleet-{}", uuid::Uuid::now_v7().simple());
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        name.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        name.as_str().into(),
        name.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();

    let dir = std::env::temp_dir().join(format!("fleet-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let (file, log) = (dir.join("databases"), dir.join("log"));
    std::fs::write(&file, format!("a={}\nb={}\n", a.url, b.url)).unwrap();
    let child = tidings()
        .args(["relay", "--sink", "rabbitmq", "--amqp-url", AMQP])
        .args(["--amqp-exchange", &name, "--databases-reload", "1h"])
        .arg("--databases-file")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    a.enqueue(keyed("a.orders", 0, 10, 3)).await;
    b.enqueue(keyed("b.orders", 0, 10, 3)).await;
    eventually("both served", Duration::from_secs(30), || async {
        a.outbox_count().await == 0 && b.outbox_count().await == 0
    })
    .await;
    let before = amqp_sockets(child.id());
    assert_eq!(before.len(), 1, "one broker connection for both databases");
    std::fs::write(&file, format!("b={}\n", b.url)).unwrap();
    signal(&child, "-HUP");
    eventually(
        "a's relay stopped (it deregisters)",
        Duration::from_secs(20),
        || async { relays(&a).await == 0 },
    )
    .await;
    b.enqueue(keyed("b.orders", 10, 10, 3)).await;
    eventually("b still served", Duration::from_secs(30), || async {
        b.outbox_count().await == 0
    })
    .await;
    assert_eq!(
        amqp_sockets(child.id()),
        before,
        "the same connection after a's relay stopped"
    );
    assert_eq!(terminate(child).await, Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("database removed"), "{text}");
    assert!(
        !text.contains("broker unavailable") && !text.contains("reconnected"),
        "the shared connection stayed up:\n{text}"
    );
    let q = ch
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 30);
    let _ = ch
        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "OK".into()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The process's TCP connections to port 5672, as their socket inodes (from /proc): the same
/// set before and after means no connection was closed and opened again.
#[cfg(feature = "rabbitmq")]
fn amqp_sockets(pid: u32) -> std::collections::BTreeSet<String> {
    let mine: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // remote address is field 2 (ADDR:PORT in hex), state field 3 (01 =
                    // established), inode field 9.
                    (f.len() > 9 && f[2].ends_with(":1628") && f[3] == "01")
                        .then(|| f[9].to_owned())
                })
                .collect::<Vec<_>>()
        })
        .filter(|inode| mine.contains(inode))
        .collect()
}
