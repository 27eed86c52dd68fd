//! RabbitMQ end to end (the relay's RabbitMQ sink) against a real RabbitMQ 3.10: a vhost of a
//! test's own on the shared server (127.0.0.1:5672), or a node of a test's own
//! ([`RabbitServer`]) where the test kills, freezes or alarms the broker.
#![cfg(feature = "rabbitmq")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use lapin::types::{AMQPValue, FieldTable};
use tidings_outbox::{Message, MessageId, WireMessage};
use tidings_relay::sink::{RabbitSink, RabbitSinkConfig, Unroutable};
use tidings_relay::{Envelope, Relay, RelayConfig, Sink, SinkError};
use tidings_tests::conformance::{sink_conformance, BrokerUnderTest, Received, SinkFeatures};
use tidings_tests::{
    amqp_bind, amqp_take_all, drain, eventually, pool, AmqpMessage, RabbitServer, RabbitVhost,
    TestDb,
};
use tokio_util::sync::CancellationToken;

const EXCHANGE: &str = "tidings";

async fn sink(url: &str, timeout: Duration, unroutable: Unroutable) -> RabbitSink {
    RabbitSink::connect(RabbitSinkConfig {
        url: url.to_owned(),
        exchange: EXCHANGE.into(),
        declare_exchange: true,
        unroutable,
        timeout,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Checks what the sink promises about a message it published, and returns it as the
/// conformance suite reads it.
fn received(m: AmqpMessage) -> Received {
    let h = m.headers;
    let id = m
        .properties
        .message_id()
        .as_ref()
        .expect("message_id is set")
        .to_string();
    assert_eq!(Some(&id), h.get("Tidings-Message-Id"), "message_id = id");
    assert_eq!(
        Some(&m.routing_key),
        h.get("Tidings-Topic"),
        "routing key = topic"
    );
    assert_eq!(*m.properties.delivery_mode(), Some(2), "persistent");
    let ct = m.properties.content_type().as_ref().map(|c| c.to_string());
    let want = h
        .get("content-type")
        .cloned()
        .unwrap_or_else(|| "application/octet-stream".into());
    assert_eq!(ct, Some(want), "content type");
    assert!(
        m.properties.timestamp().is_some(),
        "timestamp = enqueue time"
    );
    (id, h, m.payload)
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 100,
        poll_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        claim_timeout: Duration::from_secs(8),
        publish_timeout: Duration::from_secs(1),
        unavailable_backoff_max: Duration::from_millis(200),
        max_attempts: 3,
        listen: false,
        ..Default::default()
    }
}

async fn attempts(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT coalesce(sum(attempts), 0) FROM tidings.outbox", &[])
        .await
        .unwrap()
        .get(0)
}

async fn dead_letters(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query("SELECT last_error FROM tidings.dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A node of the test's own, with a queue `all` bound to every routing key; read back
/// consumes the queue and remembers everything read.
struct Rabbit {
    server: RabbitServer,
    seen: Mutex<Vec<Received>>,
}

impl BrokerUnderTest for Rabbit {
    fn sink(&self) -> BoxFuture<'_, Arc<dyn Sink>> {
        Box::pin(async move {
            Arc::new(
                sink(
                    &self.server.url,
                    Duration::from_millis(800),
                    Unroutable::DeadLetter,
                )
                .await,
            ) as Arc<dyn Sink>
        })
    }
    fn read_back(&self) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(async move {
            let got = amqp_take_all(&self.server.url, "all").await;
            let mut seen = self.seen.lock().unwrap();
            seen.extend(got.into_iter().map(received));
            seen.clone()
        })
    }
    fn stop(&mut self) -> BoxFuture<'_, ()> {
        self.server.stop();
        Box::pin(async {})
    }
    fn start(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.server.restart())
    }
    fn freeze(&self) {
        self.server.signal("-STOP");
    }
    fn thaw(&self) {
        self.server.signal("-CONT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_sink_passes_the_conformance_suite() {
    // The broker's own limit, below the sink's default (128 MiB): the oversized case is
    // RabbitMQ refusing the message (it closes the channel), which must be permanent.
    let server = RabbitServer::start_with(&["max_message_size = 1048576"]).await;
    eprintln!("RabbitMQ node started in {:?}", server.started_in);
    amqp_bind(&server.url, EXCHANGE, "all", "#", FieldTable::default()).await;
    sink_conformance(
        &mut Rabbit {
            server,
            seen: Mutex::new(Vec::new()),
        },
        SinkFeatures {
            dedup_by_id: false,
            max_payload: Some(1_048_576),
            can_stop: true,
        },
    )
    .await;
}

fn envelope(topic: &str, payload: &str) -> Envelope {
    Envelope {
        seq: 1,
        message: WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic: topic.into(),
            key: None,
            biz_id: Some("biz-1".into()),
            payload: Bytes::from(payload.to_owned()),
            headers: BTreeMap::new(),
            created_at: Some(chrono::Utc::now()),
            attempts: 0,
        },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unroutable_messages_are_dead_lettered_or_retried_never_lost() {
    let vhost = RabbitVhost::create();
    let db = TestDb::migrated().await;
    db.enqueue(
        (0..3)
            .map(|i| Message::new("orders.created", format!("{i}")))
            .collect(),
    )
    .await;
    // No queue is bound: RabbitMQ acks each mandatory publish with the message returned.
    let dead_letter =
        Arc::new(sink(&vhost.url, Duration::from_secs(2), Unroutable::DeadLetter).await);
    match dead_letter.publish(&envelope("orders.created", "x")).await {
        Err(SinkError::Permanent(e)) => assert!(e.to_string().contains("unroutable"), "{e}"),
        other => panic!("an unroutable message is permanent by default: {other:?}"),
    }
    let relay = Relay::new(pool(&db, 2), dead_letter, relay_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!((r.delivered, r.dead_lettered), (0, 3), "{r:?}");
    let reasons = dead_letters(&db).await;
    assert_eq!(reasons.len(), 3);
    for r in &reasons {
        assert!(
            r.contains("unroutable") && r.contains("orders.created"),
            "{r}"
        );
    }

    // --amqp-unroutable retry: retried with backoff until a queue is bound, then delivered.
    db.enqueue(
        (0..3)
            .map(|i| Message::new("orders.paid", format!("{i}")))
            .collect(),
    )
    .await;
    let retry = Arc::new(sink(&vhost.url, Duration::from_secs(2), Unroutable::Retry).await);
    let relay = Relay::new(
        pool(&db, 2),
        retry,
        RelayConfig {
            max_attempts: 100,
            ..relay_config()
        },
    )
    .unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!((r.retried, r.dead_lettered), (3, 0), "{r:?}");
    assert_eq!(attempts(&db).await, 3, "retries count as attempts");
    amqp_bind(
        &vhost.url,
        EXCHANGE,
        "orders",
        "orders.*",
        FieldTable::default(),
    )
    .await;
    let total = drain(&relay, &db).await;
    assert_eq!(total.delivered, 3, "{total:?}");
    let got: Vec<_> = amqp_take_all(&vhost.url, "orders")
        .await
        .into_iter()
        .map(received)
        .collect();
    assert_eq!(got.len(), 3);
    assert_eq!(dead_letters(&db).await.len(), 3, "only the first three");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nack_is_retryable() {
    let vhost = RabbitVhost::create();
    // A full queue that rejects publishes (overflow reject-publish): RabbitMQ nacks.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    amqp_bind(&vhost.url, EXCHANGE, "full", "#", args).await;
    let s = sink(&vhost.url, Duration::from_secs(2), Unroutable::DeadLetter).await;
    match s.publish(&envelope("a.b", "x")).await {
        Err(SinkError::Retryable(e)) => assert!(e.to_string().contains("nack"), "{e}"),
        other => panic!("a nack is retryable: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn what_amqp_cannot_carry_is_a_permanent_failure_of_that_message() {
    let vhost = RabbitVhost::create();
    amqp_bind(&vhost.url, EXCHANGE, "q", "#", FieldTable::default()).await;
    let s = RabbitSink::connect(RabbitSinkConfig {
        url: vhost.url.clone(),
        exchange: EXCHANGE.into(),
        timeout: Duration::from_secs(2),
        max_message_bytes: 1000,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(s.capabilities().max_message_bytes, Some(1000));
    assert_eq!(s.capabilities().dedup_window, None);
    let mut cases: Vec<(&str, Envelope)> = Vec::new();
    let mut m = envelope("a.b", "x");
    m.headers.insert("h".repeat(256), "v".into());
    cases.push(("longer than AMQP allows", m));
    let mut m = envelope("a.b", "x");
    m.headers.insert("content-type".into(), "t".repeat(300));
    cases.push(("content-type", m));
    let mut m = envelope("a.b", "x");
    for i in 0..40 {
        m.headers.insert(format!("h{i}"), "v".repeat(4000));
    }
    cases.push(("more than one AMQP frame", m));
    cases.push((
        "--amqp-max-message-size",
        envelope("a.b", &"x".repeat(1001)),
    ));
    cases.push(("routing key", envelope(&"t".repeat(300), "x")));
    for (want, m) in &cases {
        match s.publish(m).await {
            Err(SinkError::Permanent(e)) => assert!(e.to_string().contains(want), "{e}"),
            other => panic!("{want}: must be permanent: {other:?}"),
        }
    }
    // The connection is unharmed, and the producer's content type is the AMQP one.
    let mut ok = envelope("a.b", "{}");
    ok.headers
        .insert("content-type".into(), "application/json".into());
    ok.headers.insert("traceparent".into(), "00-x-y-01".into());
    s.publish(&ok).await.expect("a normal message still goes");
    let got = amqp_take_all(&vhost.url, "q").await;
    assert_eq!(got.len(), 1);
    let (id, h, payload) = received(got.into_iter().next().unwrap());
    assert_eq!(id, ok.id.to_string());
    assert_eq!(h["traceparent"], "00-x-y-01");
    assert_eq!(h["Tidings-Biz-Id"], "biz-1");
    assert_eq!(payload, b"{}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_exchange_is_a_start_up_error_naming_the_flag() {
    let vhost = RabbitVhost::create();
    let e = RabbitSink::connect(RabbitSinkConfig {
        url: vhost.url.clone(),
        exchange: "nope".into(),
        timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .err()
    .expect("the exchange is missing");
    assert!(
        matches!(&e, tidings_relay::Error::Config(m) if m.contains("--amqp-declare-exchange") && m.contains("nope")),
        "{e}"
    );
    // Declared with the flag, then found without it.
    for declare in [true, false] {
        RabbitSink::connect(RabbitSinkConfig {
            url: vhost.url.clone(),
            exchange: "nope".into(),
            declare_exchange: declare,
            timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // An existing exchange of another type is a configuration error too.
    let e = RabbitSink::connect(RabbitSinkConfig {
        url: vhost.url.clone(),
        exchange: "nope".into(),
        declare_exchange: true,
        exchange_type: "fanout".into(),
        timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .err()
    .unwrap();
    assert!(
        matches!(&e, tidings_relay::Error::Config(m) if m.contains("--amqp-exchange-type")),
        "{e}"
    );
}

/// The relay's run loop goes on across a RabbitMQ crash (SIGKILL) and restart: rows published
/// before are in the durable queue (a confirm means stored), rows claimed during the outage are
/// released with no attempt counted, and everything is delivered after the restart.
#[tokio::test(flavor = "multi_thread")]
async fn relay_keeps_going_across_a_broker_restart_without_loss_or_attempts() {
    let mut server = RabbitServer::start().await;
    eprintln!("RabbitMQ node started in {:?}", server.started_in);
    amqp_bind(&server.url, EXCHANGE, "all", "#", FieldTable::default()).await;
    let db = TestDb::migrated().await;
    let s = Arc::new(
        sink(
            &server.url,
            Duration::from_millis(800),
            Unroutable::DeadLetter,
        )
        .await,
    );
    let relay = Arc::new(Relay::new(pool(&db, 2), s, relay_config()).unwrap());
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    let batch = |from: usize| {
        (from..from + 200)
            .map(|i| Message::new("orders.created", format!("{i}")).key(format!("k{}", i % 7)))
            .collect::<Vec<_>>()
    };
    db.enqueue(batch(0)).await;
    eventually(
        "the first 200 delivered",
        Duration::from_secs(30),
        || async { db.outbox_count().await == 0 },
    )
    .await;

    server.stop();
    db.enqueue(batch(200)).await;
    eventually(
        "the relay to see the outage",
        Duration::from_secs(30),
        || async { relay.sink_backoff().is_some() },
    )
    .await;
    assert_eq!(db.outbox_count().await, 200, "nothing delivered while down");
    assert_eq!(
        attempts(&db).await,
        0,
        "no attempt counted during the outage"
    );
    assert!(dead_letters(&db).await.is_empty());

    server.restart().await;
    eventually(
        "the backlog delivered after the restart",
        Duration::from_secs(60),
        || async { db.outbox_count().await == 0 },
    )
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert!(
        dead_letters(&db).await.is_empty(),
        "{:?}",
        dead_letters(&db).await
    );
    let got: BTreeSet<String> = amqp_take_all(&server.url, "all")
        .await
        .into_iter()
        .map(|m| String::from_utf8(received(m).2).unwrap())
        .collect();
    let want: BTreeSet<String> = (0..400).map(|i| i.to_string()).collect();
    assert_eq!(
        want.difference(&got).count(),
        0,
        "every message is in the durable queue, also those confirmed before the crash"
    );
}

/// A memory alarm (`set_vm_memory_high_watermark 0`) makes RabbitMQ block publishing
/// connections: a publish ends as `Unavailable` within the sink's timeout instead of hanging,
/// the health check fails, the relay releases its rows without counting attempts, and after the
/// alarm clears (`0.4`) everything is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_connection_is_an_outage_within_the_timeout_not_a_hang() {
    let server = RabbitServer::start().await;
    eprintln!("RabbitMQ node started in {:?}", server.started_in);
    amqp_bind(&server.url, EXCHANGE, "all", "#", FieldTable::default()).await;
    let timeout = Duration::from_millis(800);
    let s = Arc::new(sink(&server.url, timeout, Unroutable::DeadLetter).await);
    s.publish(&envelope("a.b", "before")).await.unwrap();

    server.ctl(&["set_vm_memory_high_watermark", "0"]);
    let started = Instant::now();
    match s.publish(&envelope("a.b", "blocked")).await {
        Err(SinkError::Unavailable(e)) => assert!(e.to_string().contains("blocked"), "{e}"),
        other => panic!("a blocked connection is an outage: {other:?}"),
    }
    assert!(
        started.elapsed() < timeout + Duration::from_millis(500),
        "bounded by the timeout: {:?}",
        started.elapsed()
    );
    assert!(
        matches!(s.check().await, Err(SinkError::Unavailable(_))),
        "the health check says so too"
    );

    let db = TestDb::migrated().await;
    db.enqueue(
        (0..10)
            .map(|i| Message::new("orders.created", format!("{i}")))
            .collect(),
    )
    .await;
    let relay = Relay::new(pool(&db, 2), s.clone(), relay_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert!(
        r.sink_unavailable && r.delivered == 0 && r.retried == 0 && r.dead_lettered == 0,
        "{r:?}"
    );
    assert_eq!(attempts(&db).await, 0, "no attempt counted while blocked");

    server.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    let total = drain(&relay, &db).await;
    assert_eq!(total.dead_lettered, 0, "{:?}", dead_letters(&db).await);
    let got: BTreeSet<String> = amqp_take_all(&server.url, "all")
        .await
        .into_iter()
        .map(|m| String::from_utf8(received(m).2).unwrap())
        .collect();
    for i in 0..10 {
        assert!(
            got.contains(&i.to_string()),
            "{i} delivered after the alarm: {got:?}"
        );
    }
}

/// Runs a command, panicking with its output when it fails.
fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `amqps://` verifies the server's certificate: with the CA that signed it (`tls_ca_file`) the
/// sink connects and delivers; without it (only the system roots), or under a name the
/// certificate does not carry, it does not connect.
#[tokio::test(flavor = "multi_thread")]
async fn amqps_verifies_the_server_certificate() {
    let dir = std::env::temp_dir().join(format!("tidings-amqps-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    std::fs::write(
        f("ext.cnf"),
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let openssl = || std::process::Command::new("openssl");
    run(openssl()
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=tidings test CA",
            "-keyout",
            &f("ca.key"),
            "-out",
            &f("ca.pem"),
        ]));
    run(openssl()
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-keyout", &f("server.key"), "-out", &f("server.csr")]));
    run(openssl()
        .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
        .args([
            "-in",
            &f("server.csr"),
            "-CA",
            &f("ca.pem"),
            "-CAkey",
            &f("ca.key"),
            "-extfile",
            &f("ext.cnf"),
            "-out",
            &f("server.pem"),
        ]));
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = [
        format!("listeners.ssl.default = 127.0.0.1:{tls_port}"),
        format!("ssl_options.cacertfile = {}", f("ca.pem")),
        format!("ssl_options.certfile = {}", f("server.pem")),
        format!("ssl_options.keyfile = {}", f("server.key")),
        "ssl_options.verify = verify_none".into(),
        "ssl_options.fail_if_no_peer_cert = false".into(),
    ];
    let server =
        RabbitServer::start_with(&conf.iter().map(String::as_str).collect::<Vec<_>>()).await;
    eventually("the TLS listener", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .is_ok()
    })
    .await;
    amqp_bind(&server.url, EXCHANGE, "all", "#", FieldTable::default()).await;
    let config = |host: &str, ca: bool| RabbitSinkConfig {
        url: format!("amqps://guest:guest@{host}:{tls_port}/%2f"),
        exchange: EXCHANGE.into(),
        timeout: Duration::from_secs(3),
        tls_ca_file: ca.then(|| f("ca.pem").into()),
        ..Default::default()
    };
    let s = RabbitSink::connect(config("localhost", true))
        .await
        .unwrap();
    s.publish(&envelope("a.b", "over tls")).await.unwrap();
    let got = amqp_take_all(&server.url, "all").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"over tls");
    for (host, ca, why) in [
        ("localhost", false, "a CA the system does not trust"),
        ("127.0.0.1", true, "a name the certificate does not carry"),
    ] {
        match RabbitSink::connect(config(host, ca)).await {
            Err(tidings_relay::Error::Sink(m)) => {
                assert!(
                    m.contains("cannot connect to RabbitMQ at") && m.contains("certificate"),
                    "{why}: {m}"
                )
            }
            Err(e) => panic!("{why}: {e}"),
            Ok(_) => panic!("{why}: connected"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
