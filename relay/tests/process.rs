//! The `tidings` binary as an operator runs it: SIGKILL and hang failover, graceful SIGTERM,
//! exit codes and messages for bad configuration, no password in any output.
//! (Here rather than in the top-level tests/ because cargo only hands a package's own
//! integration tests the path of its binary.)

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tidings_outbox::Message;
use tidings_relay::sink::{NatsSink, NatsSinkConfig};
use tidings_relay::{Relay, RelayConfig, TickReport};
use tidings_tests::{eventually, pool, NatsServer, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_tidings");

fn tidings(db: &TestDb) -> Command {
    let mut c = Command::new(BIN);
    c.env("DATABASE_URL", &db.url).env("TIDINGS_LOG", "warn");
    c
}

fn output(cmd: &mut Command) -> (i32, String) {
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

async fn enqueue(db: &TestDb, n: usize, payload_len: usize) {
    let msgs: Vec<Message> = (0..n)
        .map(|i| {
            Message::new("orders.created", format!("{i:0>payload_len$}")).biz_id(format!("o-{i}"))
        })
        .collect();
    db.enqueue(msgs).await;
}

async fn drain(relay: &Relay, db: &TestDb) -> TickReport {
    let mut total = TickReport::default();
    let end = Instant::now() + Duration::from_secs(60);
    while db.outbox_count().await > 0 {
        let r = relay.tick().await.unwrap();
        total.delivered += r.delivered;
        total.duplicates += r.duplicates;
        assert!(Instant::now() < end, "did not drain");
    }
    total
}

fn kill(child: &mut Child, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_batch_loses_nothing_and_jetstream_drops_the_resends() {
    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    let n = 20_000;
    enqueue(&db, n, 8).await;
    let mut child = tidings(&db)
        .args([
            "relay",
            "--sink",
            "nats",
            "--nats-url",
            &nats.url,
            "--batch-size",
            "2000",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        "the relay to be publishing",
        Duration::from_secs(30),
        || async {
            let js = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
            match js.get_stream("TIDINGS").await {
                Ok(mut s) => s.info().await.unwrap().state.messages > 3000,
                Err(_) => false,
            }
        },
    )
    .await;
    child.kill().unwrap(); // SIGKILL, mid-batch
    child.wait().unwrap();
    // Let anything the dead process had already written reach the stream.
    let mut at_restart = tidings_tests::stream_len(&nats.url, "TIDINGS").await;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = tidings_tests::stream_len(&nats.url, "TIDINGS").await;
        if now == at_restart {
            break;
        }
        at_restart = now;
    }
    let remaining = db.outbox_count().await as u64;
    assert!(remaining > 0, "killed before the end");
    let resends = at_restart + remaining - n as u64;

    let sink = Arc::new(
        NatsSink::connect(NatsSinkConfig {
            url: nats.url.clone(),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let relay = Relay::new(
        pool(&db, 2),
        sink,
        RelayConfig {
            batch_size: 2000,
            ..Default::default()
        },
    )
    .unwrap();
    let total = drain(&relay, &db).await;
    assert_eq!(
        tidings_tests::stream_len(&nats.url, "TIDINGS").await,
        n as u64,
        "no loss, no duplicate stored"
    );
    assert_eq!(
        total.duplicates as u64, resends,
        "every re-send was reported as a duplicate by JetStream"
    );
    eprintln!("killed with {remaining} rows left, {resends} of them already published: re-sent and dropped as duplicates");
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_relay_releases_its_rows_within_the_claim_timeout() {
    let db = TestDb::migrated().await;
    enqueue(&db, 3000, 200).await;
    // A relay whose stdout nobody reads: after 64 KiB the pipe is full and the process hangs
    // in the middle of a batch, holding its claimed rows.
    let mut hung = tidings(&db)
        .args([
            "relay",
            "--sink",
            "stdout",
            "--batch-size",
            "500",
            "--claim-timeout",
            "2s",
            "--publish-timeout",
            "1s",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let c = db.client().await;
    eventually("the relay to hang holding rows", Duration::from_secs(30), || async {
        let idle: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        idle > 0
    })
    .await;
    let started = Instant::now();
    let sink = Arc::new(tidings_relay::sink::StdoutSink::new(Box::new(
        std::io::sink(),
    )));
    let relay = Relay::new(pool(&db, 2), sink, RelayConfig::default()).unwrap();
    let total = drain(&relay, &db).await;
    let took = started.elapsed();
    assert!(total.delivered > 0);
    assert!(
        took < Duration::from_secs(8),
        "rows of the hung relay taken over in {took:?} (claim timeout 2 s)"
    );
    hung.kill().unwrap();
    hung.wait().unwrap();
    eprintln!("took over the hung relay's rows in {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_relay_gracefully_with_exit_0() {
    let db = TestDb::migrated().await;
    let mut child = tidings(&db)
        .args(["relay"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let c = db.client().await;
    eventually("the relay to register", Duration::from_secs(20), || async {
        let n: i64 = c
            .query_one("SELECT count(*) FROM tidings.relays", &[])
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    kill(&mut child, "-TERM");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    let n: i64 = c
        .query_one("SELECT count(*) FROM tidings.relays", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "deregistered");
}

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_bad_value() {
    let db = TestDb::migrated().await;
    for (args, want) in [
        (
            vec!["relay", "--batch-size", "0"],
            "batch_size must be between 1 and 10000",
        ),
        (
            vec!["relay", "--sink", "kafka"],
            "invalid value 'kafka' for '--sink <SINK>'",
        ),
        (
            vec!["relay", "--poll-interval", "5 parsecs"],
            "unknown unit",
        ),
        (
            vec!["relay", "--publish-timeout", "30s"],
            "publish_timeout must be greater than 0 and less than claim_timeout",
        ),
        (
            vec!["relay", "--sink", "nats", "--nats-subject-prefix", "a b"],
            "invalid NATS subject prefix \"a b\"",
        ),
    ] {
        let (code, text) = output(tidings(&db).args(&args));
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
    }
    let (code, text) = output(Command::new(BIN).args(["status"]).env(
        "DATABASE_URL",
        "postgres://app:s3cret@127.0.0.1:notaport/db",
    ));
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid database URL postgres://app:***@127.0.0.1:notaport/db"),
        "{text}"
    );
    assert!(!text.contains("s3cret"));
    let (code, text) = output(Command::new(BIN).args(["relay"]).env_remove("DATABASE_URL"));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("set DATABASE_URL"), "{text}");
}

#[test]
fn grants_prints_sql_without_a_database_and_refuses_bad_names_with_exit_2() {
    let (code, text) = output(
        Command::new(BIN)
            .args([
                "grants",
                "--producer",
                "app",
                "--consumer",
                "card_service=card,card-refunds",
            ])
            .args([
                "--relay",
                "tidings_relay",
                "--pruner",
                "pruner",
                "--operator",
                "ops",
            ])
            .env_remove("DATABASE_URL"),
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("-- grants:") && text.trim_end().ends_with("COMMIT;"),
        "{text}"
    );
    assert!(
        text.contains("USING (consumer IN ('card', 'card-refunds'))"),
        "{text}"
    );
    for (args, flag) in [
        (vec!["--producer", "app;drop table x"], "--producer <ROLE>"),
        (vec!["--relay", "Relay"], "--relay <ROLE>"),
        (vec!["--operator", "pg_monitor"], "--operator <ROLE>"),
        (
            vec!["--consumer", "svc=it's"],
            "--consumer <ROLE[=NAME,...]>",
        ),
    ] {
        let (code, text) = output(Command::new(BIN).arg("grants").args(&args));
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(
            text.contains(flag) && !text.contains("GRANT"),
            "{args:?}: {text}"
        );
    }
    let (code, text) = output(Command::new(BIN).arg("grants"));
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("name at least one role"), "{text}");
}

#[tokio::test]
async fn no_password_reaches_the_output_when_the_database_is_unreachable() {
    let (code, text) = output(
        Command::new(BIN)
            .args(["relay"])
            .env("DATABASE_URL", "postgres://app:s3cret@127.0.0.1:1/db")
            .env("TIDINGS_LOG", "debug"),
    );
    assert_ne!(code, 0);
    assert!(!text.contains("s3cret"), "{text}");
}

#[tokio::test]
async fn relay_refuses_an_unmigrated_database_and_migrate_cli_round_trips() {
    let db = TestDb::empty().await;
    let (code, text) = output(tidings(&db).args(["relay"]));
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("run `tidings migrate up`"), "{text}");

    let (code, text) = output(tidings(&db).args(["migrate", "status"]));
    assert_eq!(code, 0);
    assert!(text.contains("pending"), "{text}");
    let (code, text) = output(tidings(&db).args(["migrate", "up"]));
    assert!(
        code == 0 && text.contains("applied 20261127000001 tidings_core"),
        "{text}"
    );
    let (code, text) = output(tidings(&db).args(["migrate", "down", "--all"]));
    assert!(code == 0 && text.contains("reverted"), "{text}");
    let (code, _) = output(tidings(&db).args(["migrate", "up"]));
    assert_eq!(code, 0);
    let (code, text) = output(tidings(&db).args(["status"]));
    assert!(code == 0 && text.contains("backlog:"), "{text}");
    let (code, text) = output(Command::new(BIN).args(["migrate", "sql"]));
    assert!(
        code == 0 && text.contains("CREATE TABLE tidings.outbox"),
        "{text}"
    );
}

#[tokio::test]
async fn sslmode_require_uses_tls_and_says_so_when_the_server_has_none() {
    let db = TestDb::migrated().await;
    // The local test server has no TLS: the binary must try TLS (not fall back silently).
    let (code, text) = output(
        Command::new(BIN)
            .args(["status"])
            .env("DATABASE_URL", format!("{}?sslmode=require", db.url)),
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("cannot connect to the database"), "{text}");
    assert!(text.to_lowercase().contains("tls"), "{text}");
    let (code, text) = output(tidings(&db).args(["status", "--pg-ca-file", "/nonexistent.pem"]));
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("--pg-ca-file needs sslmode=require"),
        "{text}"
    );
}
