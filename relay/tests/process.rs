//! The `tidings` binary as an operator runs it: SIGKILL and hang failover, graceful SIGTERM,
//! exit codes and messages for bad configuration, no password in any output.
//! (Here rather than in the top-level tests/ because cargo only hands a package's own
//! integration tests the path of its binary.)

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tidings_outbox::Message;
use tidings_relay::sink::{NatsSink, NatsSinkConfig};
use tidings_relay::{Relay, RelayConfig};
use tidings_tests::{drain, eventually, http_get, pool, sample, KillOnDrop, NatsServer, TestDb};

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
            "3s",
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
        "rows of the hung relay taken over in {took:?} (claim timeout 3 s)"
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
            "--batch-size must be between 1 and 10000",
        ),
        (
            vec!["relay", "--lanes", "0"],
            "--lanes must be between 1 and 16",
        ),
        (
            vec!["relay", "--lanes", "4", "--pool-size", "4"],
            "--pool-size 4 is too small for --lanes 4",
        ),
        (
            vec!["relay", "--sink", "carrier-pigeon"],
            "invalid value 'carrier-pigeon' for '--sink <SINK>'",
        ),
        (
            vec!["relay", "--poll-interval", "5 parsecs"],
            "unknown unit",
        ),
        (
            vec!["relay", "--publish-timeout", "30s"],
            "--publish-timeout must be greater than 0 and at most (--claim-timeout - 1 second) / 2",
        ),
        (
            vec!["relay", "--claim-timeout", "30d"],
            "--claim-timeout must be between 1 second and 1 hour",
        ),
        (
            vec!["relay", "--sink", "nats", "--nats-url", "http://u:pw@x"],
            "--nats-url: unsupported scheme",
        ),
        (
            vec!["relay", "--sink", "nats", "--nats-stream", "A B"],
            "--nats-stream \"A B\" is not a JetStream stream name",
        ),
        (
            vec![
                "relay",
                "--sink",
                "nats",
                "--nats-tls-ca",
                "/nonexistent/ca.pem",
            ],
            "--nats-tls-ca: cannot read /nonexistent/ca.pem",
        ),
        (vec!["dlq", "list", "--limit=-1"], "--limit"),
        (
            vec!["inbox", "prune", "--older-than", "0s"],
            "--older-than 0ns would forget messages",
        ),
        (
            vec!["relay", "--sink", "nats", "--nats-subject-prefix", "a b"],
            "--nats-subject-prefix: invalid NATS subject prefix \"a b\"",
        ),
    ] {
        let (code, text) = output(tidings(&db).args(&args));
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
    }
    #[cfg(feature = "kafka")]
    for (args, want) in [
        (
            vec![
                "relay",
                "--sink",
                "kafka",
                "--kafka-config",
                "enable.idempotence=false",
            ],
            "--kafka-config enable.idempotence: Tidings needs the idempotent producer",
        ),
        (
            vec![
                "relay",
                "--sink",
                "kafka",
                "--kafka-config",
                "no-equals-sign",
            ],
            "expected KEY=VALUE",
        ),
        (
            vec![
                "relay",
                "--sink",
                "kafka",
                "--kafka-config",
                "not.a.librdkafka.property=1",
            ],
            "--kafka-config",
        ),
        (
            // A misspelt secret property: refused, and its value never shown.
            vec![
                "relay",
                "--sink",
                "kafka",
                "--kafka-config",
                "sasl.pasword=SECRETPW",
            ],
            "--kafka-config: sasl.pasword",
        ),
        (
            vec!["relay", "--sink", "kafka", "--kafka-partitions", "0"],
            "--kafka-partitions must be between 1 and 10000",
        ),
    ] {
        let (code, text) = output(tidings(&db).args(&args));
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
        assert!(!text.contains("SECRETPW"), "{args:?}: {text}");
    }
    for bad in [
        "postgres://app:s3cret@127.0.0.1:notaport/db",
        "postgres://app:s3,cret@db/x?foo=1",
        "host=h password = s3cret bogus",
        "password='s3 cret' foo=1",
    ] {
        let (code, text) = output(Command::new(BIN).args(["status"]).env("DATABASE_URL", bad));
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("invalid database URL"), "{text}");
        assert!(
            !text.contains("s3") && !text.contains("cret"),
            "{bad}: {text}"
        );
    }
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

/// Kafka credentials passed as librdkafka properties (flags and the environment variable)
/// reach no output, at trace level, when the brokers cannot be reached.
#[cfg(feature = "kafka")]
#[tokio::test]
async fn no_kafka_secret_reaches_the_output_at_trace_level() {
    let db = TestDb::migrated().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for format in ["text", "json"] {
        let (code, text) = output(
            tidings(&db)
                .args(["relay", "--sink", "kafka", "--log-format", format])
                .args(["--kafka-brokers", &format!("127.0.0.1:{port}")])
                .args(["--kafka-config", "security.protocol=SASL_PLAINTEXT"])
                .args(["--kafka-config", "sasl.mechanism=PLAIN"])
                .args(["--kafka-config", "sasl.username=relay"])
                .args(["--kafka-config", "sasl.password=hunter2-flag"])
                .env("TIDINGS_KAFKA_CONFIG", "ssl.key.password=hunter2-env")
                .env("TIDINGS_LOG", "trace"),
        );
        assert_eq!(code, 1, "unreachable brokers are a runtime failure: {text}");
        assert!(text.contains("cannot reach Kafka"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}

/// `--sink rabbitmq` settings RabbitMQ or Tidings refuse exit 2 naming the flag, never
/// repeating a password; a missing exchange without `--amqp-declare-exchange` too (checked
/// against the local RabbitMQ).
#[cfg(feature = "rabbitmq")]
#[tokio::test]
async fn rabbitmq_configuration_errors_exit_2_naming_the_flag() {
    let db = TestDb::migrated().await;
    let missing = format!("tidings-missing-{}", uuid::Uuid::now_v7().simple());
    for (flags, want) in [
        (
            vec!["--amqp-exchange", missing.as_str()],
            "pass --amqp-declare-exchange",
        ),
        (
            vec!["--amqp-url", "http://u:hunter2@h/"],
            "--amqp-url: unsupported scheme",
        ),
        (
            vec!["--amqp-url", "amqp://u:hunter2@h:notaport/"],
            "--amqp-url is not a URL",
        ),
        (
            vec!["--amqp-exchange-type", "tpoic"],
            "--amqp-exchange-type",
        ),
        (vec!["--amqp-exchange", "a b"], "--amqp-exchange \"a b\""),
        (
            vec!["--amqp-max-message-size", "0"],
            "--amqp-max-message-size",
        ),
        (vec!["--amqp-unroutable", "drop"], "--amqp-unroutable"),
        (
            vec!["--amqp-tls-ca", "/nonexistent/ca.pem"],
            "--amqp-tls-ca needs an amqps://",
        ),
    ] {
        let (code, text) = output(
            tidings(&db)
                .args(["relay", "--sink", "rabbitmq"])
                .args(&flags),
        );
        assert_eq!(code, 2, "{flags:?}: {text}");
        assert!(text.contains(want), "{flags:?}: {text}");
        assert!(!text.contains("hunter2"), "{flags:?}: {text}");
    }
}

/// The AMQP password reaches no output at trace level, in text and JSON, from the flag or the
/// environment: not for a server that is down, nor for one that refuses the password. lapin
/// traces the handshake's SASL response as a byte list, so the bytes are looked for too.
#[cfg(feature = "rabbitmq")]
#[tokio::test]
async fn no_amqp_password_reaches_the_output_at_trace_level() {
    const PASSWORD: &str = "Rabb1tSecretPw";
    let bytes = format!("{:?}", PASSWORD.as_bytes());
    let bytes = bytes.trim_matches(|c| c == '[' || c == ']');
    let db = TestDb::migrated().await;
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (port, want) in [(down, "Connection refused"), (5672, "ACCESS_REFUSED")] {
        let url = format!("amqp://guest:{PASSWORD}@127.0.0.1:{port}/%2f");
        for format in ["text", "json"] {
            for from_env in [false, true] {
                let mut cmd = tidings(&db);
                cmd.args(["relay", "--sink", "rabbitmq", "--log-format", format])
                    .env("TIDINGS_LOG", "trace");
                if from_env {
                    cmd.env("TIDINGS_AMQP_URL", &url);
                } else {
                    cmd.args(["--amqp-url", &url]);
                }
                let (code, text) = output(&mut cmd);
                assert_eq!(
                    code, 1,
                    "a broker it cannot use is a runtime failure: {text}"
                );
                assert!(
                    text.contains(&format!(
                        "cannot connect to RabbitMQ at 127.0.0.1:{port} vhost"
                    )) && text.contains(want),
                    "{text}"
                );
                assert!(text.contains("TRACE"), "trace level is on: {text}");
                assert!(
                    !text.contains(PASSWORD) && !text.contains(bytes) && !text.contains("Rabb1t"),
                    "{text}"
                );
            }
        }
    }
}

/// `tidings relay --sink redis` end to end against the local Redis: the messages land in the
/// stream of their topic, the relay says that consumers must deduplicate, and SIGTERM stops it
/// with exit 0.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread")]
async fn redis_relay_delivers_to_the_topics_stream_and_says_consumers_deduplicate() {
    /// Deletes the test's stream, also when the test fails.
    struct DelOnDrop(String);
    impl Drop for DelOnDrop {
        fn drop(&mut self) {
            if let Ok(mut c) = redis::Client::open("redis://127.0.0.1:6379")
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            {
                let _ = redis::cmd("DEL").arg(&self.0).query::<i64>(&mut c);
            }
        }
    }
    let prefix = format!("t-{}", uuid::Uuid::now_v7().simple());
    let stream = DelOnDrop(format!("{prefix}:orders.created"));
    let db = TestDb::migrated().await;
    enqueue(&db, 5, 4).await;
    let log = std::env::temp_dir().join(format!("{prefix}.log"));
    let mut child = tidings(&db)
        .args(["relay", "--sink", "redis"])
        .args(["--redis-stream-template", &format!("{prefix}:{{topic}}")])
        .env("TIDINGS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut c = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually(
        "five entries in the stream",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            let key = stream.0.clone();
            async move {
                redis::cmd("XLEN")
                    .arg(&key)
                    .query_async::<i64>(&mut c)
                    .await
                    .unwrap()
                    == 5
            }
        },
    )
    .await;
    kill(&mut child, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("exit within 10 s of SIGTERM");
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("using Redis Streams"), "{text}");
    assert!(text.contains("consumers must deduplicate"), "{text}");
    let first: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&stream.0)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    let fields = &first[0].1;
    assert_eq!(fields[0].0, "id");
    assert_eq!(fields[1], ("payload".to_owned(), "0000".to_owned()));
    assert!(
        fields.contains(&("h:Tidings-Biz-Id".to_owned(), "o-0".to_owned())),
        "{fields:?}"
    );
}

/// `--sink redis` settings Tidings refuses exit 2 naming the flag, never repeating a password.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_configuration_errors_exit_2_naming_the_flag() {
    let db = TestDb::migrated().await;
    for (flags, want) in [
        (
            vec!["--redis-url", "http://u:hunter2@h/"],
            "--redis-url: unsupported scheme",
        ),
        (
            vec!["--redis-url", "redis://u:hunter2@h:notaport/"],
            "--redis-url is not a URL",
        ),
        (
            vec!["--redis-url", "rediss://u:hunter2@h/#insecure"],
            "--redis-url: a #fragment",
        ),
        (
            vec!["--redis-stream-template", ""],
            "--redis-stream-template",
        ),
        (vec!["--redis-maxlen", "0"], "--redis-maxlen"),
        (vec!["--redis-maxlen", "many"], "--redis-maxlen"),
        (
            vec!["--redis-max-message-size", "0"],
            "--redis-max-message-size",
        ),
        (vec!["--redis-idmp", "maybe"], "--redis-idmp"),
    ] {
        let (code, text) = output(tidings(&db).args(["relay", "--sink", "redis"]).args(&flags));
        assert_eq!(code, 2, "{flags:?}: {text}");
        assert!(text.contains(want), "{flags:?}: {text}");
        assert!(!text.contains("hunter2"), "{flags:?}: {text}");
    }
    // `--redis-idmp on` against the local server: refused (exit 2) unless it has XADD IDMP
    // (Redis 8.6+; the local one is 7.0).
    let mut c = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .unwrap();
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap()
        .trim()
        .to_owned();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    if (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) < (8, 6) {
        let (code, text) = output(
            tidings(&db)
                .args(["relay", "--sink", "redis"])
                .args(["--redis-idmp", "on"]),
        );
        assert_eq!(code, 2, "{text}");
        assert!(
            text.contains("--redis-idmp on needs Redis 8.6") && text.contains(&version),
            "{text}"
        );
    }
}

/// The Redis password reaches no output at trace level, in text and JSON, from the flag or the
/// environment: not for a server that is down, nor for one that refuses it (the shared Redis
/// has no password: it answers AUTH with an error). redis-rs logs nothing with the features
/// Tidings uses; this checks it stays so.
#[cfg(feature = "redis")]
#[tokio::test]
async fn no_redis_password_reaches_the_output_at_trace_level() {
    const PASSWORD: &str = "Red1sSecretPw";
    let db = TestDb::migrated().await;
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (port, want) in [
        (down, "Connection refused"),
        (6379, "authentication failed"),
    ] {
        let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}");
        for format in ["text", "json"] {
            for from_env in [false, true] {
                let mut cmd = tidings(&db);
                cmd.args(["relay", "--sink", "redis", "--log-format", format])
                    .env("TIDINGS_LOG", "trace");
                if from_env {
                    cmd.env("TIDINGS_REDIS_URL", &url);
                } else {
                    cmd.args(["--redis-url", &url]);
                }
                let (code, text) = output(&mut cmd);
                assert_eq!(
                    code, 1,
                    "a server it cannot use is a runtime failure: {text}"
                );
                assert!(
                    text.contains(&format!("cannot connect to Redis at 127.0.0.1:{port}"))
                        && text.contains(want),
                    "{text}"
                );
                assert!(text.contains("TRACE"), "trace level is on: {text}");
                assert!(
                    !text.contains(PASSWORD) && !text.contains("Red1s"),
                    "{text}"
                );
            }
        }
    }
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

/// A server that accepts connections and never answers (nor reads), holding them open: a
/// PostgreSQL that froze.
async fn frozen_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

/// Waits for `child` (spawned with piped output at `started`) to exit, failing the test if
/// that takes longer than `deadline`; returns its exit code, output and run time.
async fn finish_within(
    mut child: Child,
    started: Instant,
    deadline: Duration,
) -> (i32, String, Duration) {
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > deadline {
            child.kill().unwrap();
            panic!("still running after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let o = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text, took)
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_commands_and_the_relay_give_up_on_a_frozen_database_naming_db_timeout() {
    let port = frozen_server().await;
    let url = format!("postgres://postgres:s3cret@127.0.0.1:{port}/x");
    let started = Instant::now();
    let children: Vec<_> = [
        &["status"][..],
        &["dlq", "list"],
        &["dlq", "purge", "--all"],
        &["migrate", "status"],
        &["migrate", "up"],
        &["inbox", "prune"],
        &["relay", "--sink", "stdout"],
    ]
    .into_iter()
    .map(|args| {
        let child = Command::new(BIN)
            .args(args)
            .args(["--database-url", &url, "--db-timeout", "2s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (args, child)
    })
    .collect();
    for (args, child) in children {
        let (code, text, took) = finish_within(child, started, Duration::from_secs(10)).await;
        assert_eq!(code, 1, "{args:?}: {text}");
        assert!(
            text.contains("error: the database did not answer within 2s (--db-timeout)"),
            "{args:?}: {text}"
        );
        assert!(!text.contains("s3cret"), "{args:?}: {text}");
        assert!(
            took >= Duration::from_secs(2),
            "{args:?} gave up early: {took:?}"
        );
    }
    let (code, text) =
        output(Command::new(BIN).args(["status", "--database-url", &url, "--db-timeout", "0s"]));
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("--db-timeout must be greater than 0"),
        "{text}"
    );
}

/// A server without TLS: answers PostgreSQL's SSLRequest with "N", then reports the first
/// 8 bytes the client sends next (a plain-text startup message when the client falls back).
async fn server_without_tls() -> (u16, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 8];
            if socket.read_exact(&mut request).await.is_err() {
                continue;
            }
            // SSLRequest: length 8, code 80877103.
            assert_eq!(request, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
            socket.write_all(b"N").await.unwrap();
            let mut next = [0u8; 8];
            let got = match socket.read_exact(&mut next).await {
                Ok(_) => next.to_vec(),
                Err(_) => Vec::new(),
            };
            let _ = tx.send(got);
        }
    });
    (port, rx)
}

// Multi-threaded: the fake server answers while this thread waits for the process.
#[tokio::test(flavor = "multi_thread")]
async fn sslmode_require_uses_tls_and_says_so_when_the_server_has_none() {
    let (port, mut seen) = server_without_tls().await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/x");
    let (code, text) = output(
        Command::new(BIN)
            .args(["status", "--db-timeout", "5s"])
            .env("DATABASE_URL", format!("{url}?sslmode=require")),
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("cannot connect to the database (sslmode=require)"),
        "{text}"
    );
    assert!(text.contains("TLS"), "{text}");
    assert_eq!(
        seen.recv().await.unwrap(),
        Vec::<u8>::new(),
        "no plain-text fallback"
    );
    // prefer (the default) falls back to plain text, as libpq does: the next thing the server
    // reads is a protocol 3.0 startup message.
    let (code, text) = output(
        Command::new(BIN)
            .args(["status", "--db-timeout", "5s"])
            .env("DATABASE_URL", &url),
    );
    assert_eq!(code, 1, "{text}");
    let startup = seen.recv().await.unwrap();
    assert_eq!(startup[4..], [0, 3, 0, 0], "{startup:?}");
}

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

#[tokio::test]
async fn sslmodes_check_the_local_servers_certificate_as_documented() {
    let db = TestDb::migrated().await;
    // The local server's certificate is self-signed and names only localhost.
    let status = |url: String, ca: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(["status"]).env("DATABASE_URL", url);
        if let Some(ca) = ca {
            c.args(["--pg-ca-file", ca]);
        }
        // System roots: the public bundle only (this machine's SSL_CERT_DIR also holds the
        // snakeoil certificate).
        c.env_remove("SSL_CERT_DIR")
            .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt");
        output(&mut c)
    };
    let at = |mode: &str| format!("{}?sslmode={mode}", db.url);
    let by_name = |mode: &str| at(mode).replace("127.0.0.1", "localhost");
    for (url, ca) in [
        (db.url.clone(), None),
        (at("disable"), None),
        (at("prefer"), None),
        (at("require"), None),
        (at("require"), Some(SNAKEOIL)),
        (at("verify-ca"), Some(SNAKEOIL)),
        (format!("{}&sslrootcert={SNAKEOIL}", at("verify-ca")), None),
        (by_name("verify-full"), Some(SNAKEOIL)),
    ] {
        let (code, text) = status(url.clone(), ca);
        assert!(
            code == 0 && text.contains("backlog:"),
            "{url} {ca:?}: {text}"
        );
    }
    for (url, ca, want) in [
        (
            at("verify-full"),
            Some(SNAKEOIL),
            "certificate not valid for name \"127.0.0.1\"",
        ),
        (by_name("verify-full"), None, "UnknownIssuer"),
        (
            at("require"),
            Some("/etc/ssl/certs/ISRG_Root_X1.pem"),
            "UnknownIssuer",
        ),
    ] {
        let (code, text) = status(url.clone(), ca);
        assert_eq!(code, 1, "{url} {ca:?}: {text}");
        assert!(
            text.contains("cannot connect to the database (sslmode=") && text.contains(want),
            "{url} {ca:?}: {text}"
        );
    }
    for (url, ca, want) in [
        (
            at("verify-ca"),
            None,
            "sslmode=verify-ca needs a CA certificate: pass --pg-ca-file",
        ),
        (
            db.url.clone(),
            Some(SNAKEOIL),
            "--pg-ca-file (or sslrootcert) needs sslmode=require, verify-ca or verify-full",
        ),
        (
            format!("{}&sslrootcert=system", at("verify-ca")),
            None,
            "sslrootcert=system needs sslmode=verify-full",
        ),
        (
            at("verify-fuller"),
            None,
            "sslmode \"verify-fuller\" is not one of",
        ),
        (
            format!("{}&sslcert=/c.pem", at("require")),
            None,
            "sslcert is not supported",
        ),
    ] {
        let (code, text) = status(url.clone(), ca);
        assert_eq!(code, 2, "{url} {ca:?}: {text}");
        assert!(text.contains(want), "{url} {ca:?}: {text}");
    }
}

#[tokio::test]
async fn a_pg_ca_file_without_a_certificate_exits_2_naming_the_flag() {
    let dir = std::env::temp_dir().join(format!("tidings-ca-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let no_pem = dir.join("key.pem");
    std::fs::write(&no_pem, "not a certificate\n").unwrap();
    let url = "postgres://postgres@127.0.0.1:5432/x?sslmode=verify-full";
    for (file, want) in [
        (empty.clone(), "holds no PEM certificate"),
        (no_pem.clone(), "holds no PEM certificate"),
        (dir.join("missing.pem"), "cannot read --pg-ca-file"),
    ] {
        let (code, text) = output(
            Command::new(BIN)
                .args(["status", "--pg-ca-file"])
                .arg(&file)
                .env("DATABASE_URL", url),
        );
        assert_eq!(code, 2, "{file:?}: {text}");
        assert!(
            text.contains("--pg-ca-file") && text.contains(want),
            "{file:?}: {text}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A TCP proxy to the test PostgreSQL that can be frozen: from then on it forwards nothing,
/// in either direction, on old or new connections, and holds every socket open (a database
/// host that hangs without closing anything).
async fn freezable_proxy() -> (u16, Arc<AtomicBool>) {
    let server = url::Url::parse(&tidings_tests::server_url()).unwrap();
    let upstream = format!(
        "{}:{}",
        server.host_str().unwrap(),
        server.port().unwrap_or(5432)
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (f, upstream) = (f.clone(), upstream.clone());
            tokio::spawn(async move {
                if f.load(Ordering::SeqCst) {
                    let _held = client;
                    return std::future::pending().await;
                }
                let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(pump(cr, sw, f.clone()), pump(sr, cw, f));
            });
        }
    });
    (port, frozen)
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await.unwrap_or(0);
        if frozen.load(Ordering::SeqCst) {
            let _held = (r, w);
            return std::future::pending().await;
        }
        if n == 0 || w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_logs_within_seconds_when_its_database_freezes() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::migrated().await;
    let (port, frozen) = freezable_proxy().await;
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_port(Some(port)).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["relay", "--sink", "stdout", "--db-timeout", "2s"])
        // Default claim and publish timeouts: each database step of a tick is bounded by a
        // third of the claim timeout (5 s), so the warning comes within seconds.
        .env("DATABASE_URL", url.as_str())
        .env("TIDINGS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next_line = async |within: Duration, what: &str| {
        tokio::time::timeout(within, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no log line within {within:?}: {what}"))
            .unwrap()
            .unwrap_or_else(|| panic!("stderr closed: {what}"))
    };
    while !next_line(Duration::from_secs(20), "start")
        .await
        .contains("relay started")
    {}
    frozen.store(true, Ordering::SeqCst);
    let frozen_at = Instant::now();
    loop {
        let line = next_line(Duration::from_secs(10), "a warning after the freeze").await;
        if line.contains("WARN") || line.contains("ERROR") {
            eprintln!("after {:?}: {line}", frozen_at.elapsed());
            break;
        }
    }
    assert!(frozen_at.elapsed() < Duration::from_secs(10));
    // ... and recovers when the database answers again: connections stuck on the frozen path
    // are thrown away, fresh ones deliver.
    frozen.store(false, Ordering::SeqCst);
    db.enqueue((0..3).map(|i| Message::new("t", format!("{i}"))).collect())
        .await;
    eventually(
        "the relay to deliver after the database came back",
        Duration::from_secs(40),
        || async { db.outbox_count().await == 0 },
    )
    .await;
}

/// `--sink http` settings Tidings refuses exit 2 naming the flag, never repeating a secret or
/// the URL's path and query.
#[cfg(feature = "http")]
#[tokio::test]
async fn http_configuration_errors_exit_2_naming_the_flag() {
    let db = TestDb::migrated().await;
    let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    for (flags, want) in [
        (vec!["--http-secret", good], "needs --http-url"),
        (
            vec!["--http-url", "http://127.0.0.1:9/hook/{topic}"],
            "needs a signing secret",
        ),
        (
            vec![
                "--http-url",
                "http://127.0.0.1:9/x",
                "--http-secret",
                "hunter2hunter2",
            ],
            "starts with whsec_",
        ),
        (
            vec![
                "--http-url",
                "http://127.0.0.1:9/x",
                "--http-secret",
                "whsec_aHVudGVyMg==",
            ],
            "24 to 64 bytes",
        ),
        (
            vec![
                "--http-url",
                "ftp://127.0.0.1/hunter2",
                "--http-secret",
                good,
            ],
            "--http-url: the scheme must be http or https",
        ),
        (
            vec!["--http-url", "https://u:hunter2@h/x", "--http-secret", good],
            "--http-url: credentials in the URL are refused",
        ),
        (
            vec!["--http-route", "payments", "--http-secret", good],
            "--http-route must be PATTERN=URL",
        ),
        (
            vec!["--http-route", "a*b=http://h/x", "--http-secret", good],
            "may have * only at its end",
        ),
        (
            vec![
                "--http-url",
                "http://h/x",
                "--http-secret",
                good,
                "--http-concurrency",
                "0",
            ],
            "--http-concurrency",
        ),
        (
            vec![
                "--http-url",
                "http://h/x",
                "--http-secret",
                good,
                "--http-tls-ca",
                "/nonexistent/ca.pem",
            ],
            "--http-tls-ca: cannot read",
        ),
        (
            vec![
                "--http-url",
                "http://h/x",
                "--http-secret-file",
                "/nonexistent/secrets",
            ],
            "--http-secret-file: cannot read",
        ),
    ] {
        let (code, text) = output(tidings(&db).args(["relay", "--sink", "http"]).args(&flags));
        assert_eq!(code, 2, "{flags:?}: {text}");
        assert!(text.contains(want), "{flags:?}: {text}");
        assert!(
            !text.contains("hunter2") && !text.contains("aHVudGVy"),
            "{flags:?}: {text}"
        );
        assert!(!text.contains("MfKQ9r8"), "{flags:?}: {text}");
    }
}

/// Neither the signing secret nor the URL's path and query (which may hold a token) reach the
/// output at trace level, in text and JSON, while the relay delivers to an endpoint that is
/// down: the endpoint is named by scheme, host and port.
#[cfg(feature = "http")]
#[tokio::test(flavor = "multi_thread")]
async fn no_webhook_secret_or_url_token_reaches_the_output_at_trace_level() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let db = TestDb::migrated().await;
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let up = answer_204().await;
    for (port, format, want) in [
        (down, "text", "is down"),
        (down, "json", "is down"),
        (up, "text", "delivered"),
        (up, "json", "delivered"),
    ] {
        enqueue(&db, 3, 4).await;
        let url = format!("http://127.0.0.1:{port}/hooks/PathT0ken/{{topic}}?token=QueryT0ken");
        let log = std::env::temp_dir().join(format!(
            "tidings-http-{}.log",
            uuid::Uuid::now_v7().simple()
        ));
        let mut child = tidings(&db)
            .args(["relay", "--sink", "http", "--log-format", format])
            .env("TIDINGS_HTTP_URL", &url)
            .env("TIDINGS_HTTP_SECRET", SECRET)
            .env("TIDINGS_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        eventually(want, Duration::from_secs(30), || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains(want) && (want != "delivered" || db.outbox_count().await == 0)
        })
        .await;
        kill(&mut child, "-TERM");
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let _ = std::fs::remove_file(&log);
        assert!(status.success(), "{text}");
        assert!(
            text.contains(&format!("http://127.0.0.1:{port}")),
            "the endpoint is named: {text}"
        );
        assert!(text.contains("TRACE"), "trace level is on");
        for secret in ["MfKQ9r8", "PathT0ken", "QueryT0ken"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
}

/// A minimal HTTP endpoint on a free port of 127.0.0.1 answering 204 to every request (one per
/// connection); returns the port.
#[cfg(feature = "http")]
async fn answer_204() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    port
}

/// `--admin-listen`: /metrics counts what the relay delivered (by sink and topic) and reads the
/// outbox's gauges at scrape time, agreeing with `tidings status --json` and the operator
/// page's overview; /healthz is 200
/// throughout; /readyz is 200 while the broker works and 503 with the reason once it is gone.
#[tokio::test(flavor = "multi_thread")]
async fn admin_listener_serves_metrics_health_and_readiness_agreeing_with_status() {
    let (db, mut nats) = (TestDb::migrated().await, NatsServer::start().await);
    enqueue(&db, 5, 4).await;
    let first: uuid::Uuid = db
        .client()
        .await
        .query_one("SELECT id FROM tidings.outbox WHERE biz_id = 'o-0'", &[])
        .await
        .unwrap()
        .get(0);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Killed if a step below fails (else stopped with SIGTERM at the end).
    let mut child = KillOnDrop(
        tidings(&db)
            .args(["relay", "--sink", "nats", "--nats-url", &nats.url])
            .args(["--admin-listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let delivered = r#"tidings_relay_delivered_total{sink="nats",topic="orders.created"}"#;
    eventually(
        "5 delivered and an empty backlog in /metrics",
        Duration::from_secs(30),
        || async {
            let text = http_get(port, "/metrics").await.1;
            sample(&text, delivered) == Some(5.0)
                && sample(&text, "tidings_outbox_backlog") == Some(0.0)
        },
    )
    .await;
    let (code, text) = http_get(port, "/metrics").await;
    assert_eq!(code, 200);
    for (series, want) in [
        ("tidings_outbox_backlog", 0.0),
        ("tidings_dead_letters", 0.0),
        ("tidings_relays_alive", 1.0),
        ("tidings_database_up", 1.0),
        (r#"tidings_relay_claimed_total{sink="nats"}"#, 5.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series}: {text}");
    }
    assert!(
        text.contains("# HELP tidings_relay_delivered_total"),
        "{text}"
    );
    assert!(
        text.contains("tidings_relay_publish_duration_seconds"),
        "{text}"
    );
    assert!(!text.contains("o-1"), "no biz-id in any label: {text}");

    // A re-send JetStream drops (the first message's id again: counted as delivered and as a
    // broker duplicate) and a message larger than the server's max_payload (dead-lettered at
    // once): each counted under its own topic, with the batch histogram and the gauges.
    db.client()
        .await
        .execute(
            "INSERT INTO tidings.outbox (id, topic, biz_id, payload) VALUES ($1, 'orders.created', 'o-0', '0')",
            &[&first],
        )
        .await
        .unwrap();
    // Through SQL (the Rust enqueue's own limit is 1 MiB by default; the schema allows more).
    db.client()
        .await
        .execute(
            "INSERT INTO tidings.outbox (id, topic, payload) \
             VALUES (gen_random_uuid(), 'orders.big', convert_to(repeat('x', 2097152), 'UTF8'))",
            &[],
        )
        .await
        .unwrap();
    let duplicates = r#"tidings_relay_broker_duplicates_total{sink="nats",topic="orders.created"}"#;
    let dead = r#"tidings_relay_dead_lettered_total{sink="nats",topic="orders.big"}"#;
    eventually(
        "a duplicate and a dead letter in /metrics",
        Duration::from_secs(30),
        || async {
            let text = http_get(port, "/metrics").await.1;
            sample(&text, duplicates) == Some(1.0)
                && sample(&text, dead) == Some(1.0)
                && sample(&text, "tidings_dead_letters") == Some(1.0)
        },
    )
    .await;
    let text = http_get(port, "/metrics").await.1;
    assert_eq!(sample(&text, delivered), Some(6.0), "{text}");
    assert!(
        sample(
            &text,
            r#"tidings_relay_batch_duration_seconds_count{sink="nats"}"#
        )
        .is_some_and(|n| n >= 2.0),
        "{text}"
    );
    assert_eq!(http_get(port, "/healthz").await.0, 200);
    let (code, body) = http_get(port, "/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"ready":true,"reasons":[]}"#)
    );

    // The broker goes away: not ready, saying why; still alive.
    nats.stop();
    enqueue(&db, 7, 4).await;
    eventually("/readyz to say 503", Duration::from_secs(30), || async {
        let (code, body) = http_get(port, "/readyz").await;
        code == 503 && body.contains(r#""ready":false"#) && body.contains("sink nats")
    })
    .await;
    assert_eq!(http_get(port, "/healthz").await.0, 200);

    // The same numbers as `tidings status --json` (nothing moves while the broker is gone).
    let (code, status) = output(tidings(&db).args(["status", "--json"]));
    assert_eq!(code, 0, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let metrics = http_get(port, "/metrics").await.1;
    for (field, series) in [
        ("backlog", "tidings_outbox_backlog"),
        ("ready", "tidings_outbox_due"),
        ("retrying", "tidings_outbox_retrying"),
        ("dead_letters", "tidings_dead_letters"),
    ] {
        assert_eq!(
            status[field].as_f64(),
            sample(&metrics, series),
            "{field} / {series}: {status} / {metrics}"
        );
    }
    assert_eq!(status["backlog"].as_f64(), Some(7.0));
    assert_eq!(status["dead_letters"].as_f64(), Some(1.0));
    // The oldest due message's age: the same measure in both (read a moment apart).
    let (age, gauge) = (
        status["oldest_ready_age_secs"]
            .as_f64()
            .expect("an age: 7 are due"),
        sample(&metrics, "tidings_outbox_oldest_due_age_seconds").expect("the age gauge"),
    );
    assert!(
        age > 0.0 && (age - gauge).abs() < 5.0,
        "status {age} / metrics {gauge}"
    );
    // And the operator page's overview says the same.
    let (code, page) = http_get(port, "/api/overview").await;
    assert_eq!(code, 200, "{page}");
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    for (field, series) in [
        ("backlog", "tidings_outbox_backlog"),
        ("due", "tidings_outbox_due"),
        ("retrying", "tidings_outbox_retrying"),
        ("dead_letters", "tidings_dead_letters"),
        ("parked", "tidings_inbox_parked"),
    ] {
        assert_eq!(
            page[field].as_f64(),
            sample(&metrics, series),
            "page {field} / {series}: {page} / {metrics}"
        );
    }
    let alive = status["relays"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["alive"].as_bool() == Some(true))
        .count() as f64;
    assert_eq!(Some(alive), sample(&metrics, "tidings_relays_alive"));
    kill(&mut child, "-TERM");
    assert!(child.wait().unwrap().success());
}
