//! RabbitMQ end to end (the relay's RabbitMQ sink, the inbox's RabbitMQ consumer adapter)
//! against a real RabbitMQ 3.10: a vhost of a test's own on the shared server (127.0.0.1:5672),
//! or a node of a test's own ([`RabbitServer`]) where the test kills, freezes or alarms the
//! broker.
#![cfg(feature = "rabbitmq")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::types::{AMQPValue, FieldTable};
use tidings_examples::{charge, IssueCard, PaymentSucceeded, Verdict, SCHEMA, TOPIC};
use tidings_inbox::rabbitmq::{QueueSetup, RabbitAdapter, RabbitConsumerConfig, RabbitDelivery};
use tidings_inbox::runner::postgres::PgStore;
use tidings_inbox::runner::{
    Adapter, AdapterError, Decoded, Deliveries, Delivery, Runner, RunnerConfig,
};
use tidings_outbox::{Message, MessageId, WireMessage};
use tidings_relay::sink::{RabbitSink, RabbitSinkConfig, Unroutable};
use tidings_relay::{Envelope, Relay, RelayConfig, Sink, SinkError};
use tidings_tests::conformance::{sink_conformance, BrokerUnderTest, Received, SinkFeatures};
use tidings_tests::runner_conformance::{runner_conformance, ConsumerBroker};
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
    // A node that has just restarted, on a loaded machine (CI runs every RabbitMQ test, each
    // with a node of its own, at once), may answer some confirms of a batch late while others
    // arrive: those count as attempts (the broker works), so three attempts 20 ms apart are too
    // few here. What this test is about: nothing lost, no attempt counted while it is down.
    let config = RelayConfig {
        max_attempts: 100,
        backoff_max: Duration::from_millis(200),
        ..relay_config()
    };
    let relay = Arc::new(Relay::new(pool(&db, 2), s, config).unwrap());
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
    let dead = dead_letters(&db).await;
    assert!(
        dead.is_empty(),
        "{} dead letters, the first: {:?}",
        dead.len(),
        dead.first()
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

// ---------------------------------------------------------------------------------------------
// The consumer adapter (tidings_inbox::rabbitmq).

/// The shared server as the runner conformance suite's broker: a vhost of the test's own,
/// published to through the relay's RabbitMQ sink (exchange `tidings`, routing key = topic),
/// one durable queue per topic, named after it. Each adapter declares and binds its queue
/// (`QueueSetup`); what the broker holds unacked is read with `rabbitmqctl list_queues`
/// (`messages`: ready plus delivered and unacked).
struct RabbitConsumers {
    vhost: RabbitVhost,
    sink: RabbitSink,
    bound: Mutex<BTreeSet<String>>,
    /// The queue (topic) of each consumer.
    queues: Mutex<BTreeMap<String, String>>,
}

fn consumer_config(url: &str, queue: &str, binding_key: &str) -> RabbitConsumerConfig {
    RabbitConsumerConfig {
        url: url.to_owned(),
        queue: queue.to_owned(),
        declare: Some(QueueSetup {
            exchange: EXCHANGE.into(),
            binding_keys: vec![binding_key.to_owned()],
        }),
        ..Default::default()
    }
}

impl ConsumerBroker for RabbitConsumers {
    type Adapter = RabbitAdapter;

    fn publish<'a>(&'a self, messages: &'a [WireMessage]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for (i, m) in messages.iter().enumerate() {
                // The queue exists before its messages are published (else they are unroutable).
                if self.bound.lock().unwrap().insert(m.topic.clone()) {
                    amqp_bind(
                        &self.vhost.url,
                        EXCHANGE,
                        &m.topic,
                        &m.topic,
                        FieldTable::default(),
                    )
                    .await;
                }
                self.sink
                    .publish(&Envelope {
                        seq: i as i64,
                        message: m.clone(),
                    })
                    .await
                    .unwrap();
            }
        })
    }

    fn adapter<'a>(
        &'a self,
        name: &'a str,
        topic: &'a str,
        // RabbitMQ redelivers what a consumer left unacked when its channel closes.
        _redeliver_after: Duration,
    ) -> BoxFuture<'a, RabbitAdapter> {
        self.queues
            .lock()
            .unwrap()
            .insert(name.to_owned(), topic.to_owned());
        Box::pin(async move {
            RabbitAdapter::connect(&consumer_config(&self.vhost.url, topic, topic))
                .await
                .unwrap()
        })
    }

    fn unacked<'a>(&'a self, name: &'a str) -> BoxFuture<'a, u64> {
        Box::pin(async move {
            let queue = self.queues.lock().unwrap()[name].clone();
            self.vhost.queue_messages(&queue).await
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_adapter_passes_the_runner_conformance_suite() {
    let vhost = RabbitVhost::create();
    let sink = sink(&vhost.url, Duration::from_secs(2), Unroutable::DeadLetter).await;
    runner_conformance(&RabbitConsumers {
        vhost,
        sink,
        bound: Default::default(),
        queues: Default::default(),
    })
    .await;
}

/// An adapter whose acks never reach the broker (a consumer that commits and then dies before
/// acking).
struct NeverAcks(RabbitAdapter);

struct Unacked(RabbitDelivery);

impl Delivery for Unacked {
    fn decode(&self) -> Decoded {
        self.0.decode()
    }
    fn ack(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async { Ok(()) })
    }
}

impl Adapter for NeverAcks {
    type Delivery = Unacked;
    fn open(&self) -> BoxFuture<'_, Result<Deliveries<'_, Unacked>, AdapterError>> {
        Box::pin(async move {
            let s = self.0.open().await?;
            Ok(s.map(|d| d.map(Unacked)).boxed())
        })
    }
    fn hold_interval(&self) -> Option<Duration> {
        self.0.hold_interval()
    }
}

/// A child process SIGKILLed and reaped when dropped, also when the test fails (a relay or card
/// service left running would keep working against a dropped database).
struct Proc(std::process::Child);

impl Proc {
    /// SIGKILLs it and waits until it is gone.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn card_runner_config() -> RunnerConfig {
    RunnerConfig {
        name: "card-service".into(),
        concurrency: 8,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        reopen_backoff_max: Duration::from_secs(1),
        replay_poll_interval: None,
        ..Default::default()
    }
}

/// `n` payments committed with their `payment.succeeded` messages in the outbox of the
/// database at `url`.
async fn pay(url: &str, from: usize, n: usize) {
    let mut c = tidings_tests::connect(url).await;
    let outbox = tidings_outbox::Outbox::default();
    for i in from..from + n {
        let e = PaymentSucceeded {
            payment_id: format!("pay_{i}"),
            customer: format!("c{}", i % 25),
            n: (i / 25) as i64,
            cents: 100 + i as i64,
        };
        let tx = c.transaction().await.unwrap();
        charge(&tx, &outbox, &e).await.unwrap();
        tx.commit().await.unwrap();
    }
}

async fn cards_db() -> TestDb {
    let db = TestDb::migrated().await;
    db.client().await.batch_execute(SCHEMA).await.unwrap();
    db
}

/// A consumer that committed its effects and crashed before acking (its task aborted, the
/// adapter dropped with every delivery unacked): RabbitMQ requeues them when the connection
/// goes, the next consumer gets them again (marked redelivered), and the inbox absorbs every
/// one: no second card.
#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_consumer_leaves_its_deliveries_to_the_next_and_the_inbox_absorbs_them() {
    let vhost = RabbitVhost::create();
    let db = cards_db().await;
    let config = consumer_config(&vhost.url, "cards", TOPIC);
    // Declares the queue before anything is published.
    let first = NeverAcks(RabbitAdapter::connect(&config).await.unwrap());
    pay(&db.url, 0, 50).await;
    let relay = Relay::new(
        pool(&db, 2),
        Arc::new(sink(&vhost.url, Duration::from_secs(2), Unroutable::DeadLetter).await),
        relay_config(),
    )
    .unwrap();
    assert_eq!(drain(&relay, &db).await.delivered, 50);

    let runner = Runner::new(
        first,
        PgStore::new(pool(&db, 8), Arc::new(IssueCard)),
        card_runner_config(),
    )
    .unwrap();
    let runner = Arc::new(runner);
    let task = tokio::spawn({
        let runner = runner.clone();
        async move { runner.run(CancellationToken::new()).await }
    });
    let c = db.client().await;
    eventually("50 cards issued", Duration::from_secs(30), || async {
        Verdict::read(&c).await.unwrap().cards == 50
    })
    .await;
    assert_eq!(
        vhost.queue_messages("cards").await,
        50,
        "committed, never acked: all still held by RabbitMQ"
    );
    // The crash: the run loop is dropped mid-run, no shutdown, no close.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop(runner);

    let second = Runner::new(
        RabbitAdapter::connect(&config).await.unwrap(),
        PgStore::new(pool(&db, 8), Arc::new(IssueCard)),
        card_runner_config(),
    )
    .unwrap();
    let second = Arc::new(second);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (runner, stop) = (second.clone(), stop.clone());
        async move { runner.run(stop).await }
    });
    eventually(
        "every redelivery absorbed and acked",
        Duration::from_secs(30),
        || async { vhost.queue_messages("cards").await == 0 },
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let s = second.stats();
    assert_eq!(s.processed.load(Ordering::SeqCst), 0, "no effect again");
    assert_eq!(s.duplicates.load(Ordering::SeqCst), 50);
    let v = Verdict::read(&c).await.unwrap();
    assert!(v.exactly_once(), "{v:?}");
    assert_eq!((v.cards, v.absorbed), (50, 50), "{v:?}");
}

/// The card service (a process) SIGKILLed mid-run: what it had not acked comes back to the
/// next one; every payment gets exactly one card.
#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_card_service_loses_nothing_and_issues_no_second_card() {
    const CARD_SERVICE: &str = env!("CARGO_BIN_EXE_card-service");
    let vhost = RabbitVhost::create();
    let db = cards_db().await;
    amqp_bind(
        &vhost.url,
        EXCHANGE,
        "card-service",
        TOPIC,
        FieldTable::default(),
    )
    .await;
    let n = 3000;
    pay(&db.url, 0, n).await;
    let relay = Relay::new(
        pool(&db, 2),
        Arc::new(sink(&vhost.url, Duration::from_secs(2), Unroutable::DeadLetter).await),
        RelayConfig {
            batch_size: 500,
            ..relay_config()
        },
    )
    .unwrap();
    assert_eq!(drain(&relay, &db).await.delivered, n);
    let card_service = || {
        Proc(
            std::process::Command::new(CARD_SERVICE)
                .env("DATABASE_URL", &db.url)
                .env("AMQP_URL", &vhost.url)
                .env_remove("KAFKA_BROKERS")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let c = db.client().await;
    let mut first = card_service();
    eventually("a third of the cards", Duration::from_secs(60), || async {
        Verdict::read(&c).await.unwrap().cards >= (n / 3) as i64
    })
    .await;
    first.kill();
    let at_kill = Verdict::read(&c).await.unwrap().cards;
    assert!(at_kill < n as i64, "killed mid-run ({at_kill} cards)");
    let left = vhost.queue_messages("card-service").await;
    assert!(
        left as i64 >= n as i64 - at_kill,
        "what has no card is still in the queue: {left}"
    );
    let mut second = card_service();
    eventually("every message acked", Duration::from_secs(60), || async {
        vhost.queue_messages("card-service").await == 0
    })
    .await;
    second.kill();
    let v = Verdict::read(&c).await.unwrap();
    eprintln!("killed at {at_kill} cards; {v:?}");
    assert_eq!(v.payments, n as i64);
    assert!(v.exactly_once(), "{v:?}");
}

/// The broker (a node of the test's own) SIGKILLed and restarted while payments flow through a
/// relay to a runner: the relay and the runner reconnect by themselves, the durable queue keeps
/// what was confirmed, unacked deliveries come again, and every payment gets exactly one card.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_mid_run_loses_nothing_and_the_runner_reconnects() {
    let mut server = RabbitServer::start().await;
    let db = cards_db().await;
    let adapter = RabbitAdapter::connect(&consumer_config(&server.url, "cards", TOPIC))
        .await
        .unwrap();
    let relay = Arc::new(
        Relay::new(
            pool(&db, 2),
            Arc::new(
                sink(
                    &server.url,
                    Duration::from_millis(800),
                    Unroutable::DeadLetter,
                )
                .await,
            ),
            RelayConfig {
                max_attempts: 1000,
                ..relay_config()
            },
        )
        .unwrap(),
    );
    let runner = Arc::new(
        Runner::new(
            adapter,
            PgStore::new(pool(&db, 8), Arc::new(IssueCard)),
            card_runner_config(),
        )
        .unwrap(),
    );
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    let runner_task = tokio::spawn({
        let (runner, stop) = (runner.clone(), stop.clone());
        async move { runner.run(stop).await }
    });
    let n = 2000;
    let producer = tokio::spawn({
        let url = db.url.clone();
        async move { pay(&url, 0, n).await }
    });
    let c = db.client().await;
    eventually("a fifth of the cards", Duration::from_secs(60), || async {
        Verdict::read(&c).await.unwrap().cards >= (n / 5) as i64
    })
    .await;
    server.restart().await;
    let restarted_at = Verdict::read(&c).await.unwrap().cards;
    producer.await.unwrap();
    eventually(
        "every payment carded and every message acked",
        Duration::from_secs(90),
        || async {
            Verdict::read(&c).await.unwrap().cards >= n as i64
                && db.outbox_count().await == 0
                && server.queue_messages("cards").await == 0
        },
    )
    .await;
    stop.cancel();
    relay_task.await.unwrap().unwrap();
    runner_task.await.unwrap().unwrap();
    let v = Verdict::read(&c).await.unwrap();
    let s = runner.stats();
    eprintln!(
        "restarted at {restarted_at} cards (node up again in {:?}); {v:?}; stream failures {}",
        server.started_in,
        s.receive_errors.load(Ordering::SeqCst)
    );
    assert!(restarted_at < n as i64, "restarted mid-run");
    assert_eq!(v.payments, n as i64);
    assert!(v.exactly_once(), "{v:?}");
    assert!(
        s.receive_errors.load(Ordering::SeqCst) >= 1,
        "the runner saw the outage"
    );
    assert_eq!(s.parked.load(Ordering::SeqCst), 0);
    assert!(dead_letters(&db).await.is_empty());
}

/// Chaos on RabbitMQ: 10,000 payments (CHAOS_PAYMENTS) from 4 producers while 2 `tidings relay
/// --sink rabbitmq` processes and 2 RabbitMQ card services are SIGKILLed at random moments
/// (every 0.5-2 s, while producing and until half the cards are issued) and restarted, and the
/// broker (a node of the test's own; durable exchange and queue, persistent messages) is
/// SIGKILLed and restarted once, a quarter of the way. A process that exits by itself (it
/// started while the broker was down) is restarted too, as a process manager would. Then:
/// every committed payment has exactly one card, nothing was dead-lettered or parked, the
/// outbox and the queue are empty.
///
/// CHAOS_LOG_DIR=DIR writes each card service's log (the runner's and the adapter's, debug)
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_chaos_every_payment_gets_exactly_one_card() {
    use rand::Rng;
    use std::process::{Command, Stdio};

    const CARD_SERVICE: &str = env!("CARGO_BIN_EXE_card-service");
    let tidings = std::path::PathBuf::from(CARD_SERVICE).with_file_name("tidings");
    assert!(
        tidings.exists(),
        "{} is missing: cargo build -p tidings-relay --features rabbitmq --bin tidings",
        tidings.display()
    );
    let payments: usize = std::env::var("CHAOS_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let producers = 4;
    let (db, mut server) = (cards_db().await, RabbitServer::start().await);
    let c = db.client().await;
    // The exchange and the card service's queue, durable, before anyone publishes.
    amqp_bind(
        &server.url,
        EXCHANGE,
        "card-service",
        TOPIC,
        FieldTable::default(),
    )
    .await;
    let url = server.url.clone();
    let relay = || -> Proc {
        Proc(tidings_tests::chaos_relay(
            &tidings,
            &db.url,
            &["--sink", "rabbitmq", "--heartbeat-interval", "200ms"],
            &[("TIDINGS_AMQP_URL", &url)],
        ))
    };
    let log_dir = std::env::var("CHAOS_LOG_DIR").ok();
    let spawned = std::cell::Cell::new(0);
    let card_service = || -> Proc {
        let mut cmd = Command::new(CARD_SERVICE);
        cmd.env("DATABASE_URL", &db.url)
            .env("AMQP_URL", &url)
            .env_remove("KAFKA_BROKERS")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(dir) = &log_dir {
            spawned.set(spawned.get() + 1);
            let file = std::fs::File::create(format!("{dir}/card-{}.log", spawned.get())).unwrap();
            cmd.env("CARD_LOG", "tidings_inbox=debug").stderr(file);
        }
        Proc(cmd.spawn().unwrap())
    };
    let mut relays: Vec<Proc> = (0..2).map(|_| relay()).collect();
    let mut cards: Vec<Proc> = (0..2).map(|_| card_service()).collect();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let url = db.url.clone();
        let per = payments / producers;
        tasks.push(tokio::spawn(async move {
            let mut c = tidings_tests::connect(&url).await;
            let outbox = tidings_outbox::Outbox::default();
            for i in 0..per {
                let e = PaymentSucceeded {
                    payment_id: format!("pay_{p}_{i}"),
                    customer: format!("p{p}-c{}", i % 25),
                    n: (i / 25) as i64,
                    cents: 100 + i as i64,
                };
                let tx = c.transaction().await.unwrap();
                charge(&tx, &outbox, &e).await.unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut kills, mut exits, mut broker_restarted) = (0, 0, false);
    loop {
        // A process that ended by itself (started while the broker was down, or gave up on
        // it) is started again.
        for (list, fresh) in [
            (&mut relays, &relay as &dyn Fn() -> Proc),
            (&mut cards, &card_service),
        ] {
            for p in list.iter_mut() {
                if p.0.try_wait().unwrap().is_some() {
                    *p = fresh();
                    exits += 1;
                }
            }
        }
        let v = Verdict::read(&c).await.unwrap();
        let produced = tasks.iter().all(|t| t.is_finished());
        if produced && v.payments as usize == payments && v.cards >= v.payments {
            break;
        }
        if Instant::now() > deadline {
            let state = c
                .query_one(
                    "SELECT (SELECT count(*) FROM tidings.outbox), (SELECT count(*) FROM tidings.dead_letters),
                            (SELECT string_agg(DISTINCT left(last_error, 200), ' | ') FROM tidings.inbox_dead_letters),
                            (SELECT count(*) FROM tidings.inbox_dead_letters)",
                    &[],
                )
                .await
                .unwrap();
            panic!(
                "no convergence within 120 s: {v:?}; outbox {}, dead letters {}, parked {} ({:?}); queue {}",
                state.get::<_, i64>(0),
                state.get::<_, i64>(1),
                state.get::<_, i64>(3),
                state.get::<_, Option<String>>(2),
                server.queue_messages("card-service").await
            );
        }
        // Chaos while producing and until half the cards are issued.
        if produced && v.cards as usize > payments / 2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // Once, a quarter of the way: the broker is SIGKILLed and restarted. Relays see an
        // outage (no attempt counted), card services lose their connection (what they had not
        // acked is requeued), and both reconnect by themselves.
        if !broker_restarted && v.cards as usize > payments / 4 {
            broker_restarted = true;
            server.restart().await;
            eprintln!(
                "broker restarted at {} cards (up again in {:?})",
                v.cards, server.started_in
            );
            continue;
        }
        let (list, fresh): (&mut Vec<Proc>, &dyn Fn() -> Proc) = if rand::rng().random_bool(0.5) {
            (&mut relays, &relay)
        } else {
            (&mut cards, &card_service)
        };
        let i = rand::rng().random_range(0..list.len());
        list[i].kill();
        list[i] = fresh();
        kills += 1;
        let pause = rand::rng().random_range(500..2000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Chaos over: the card services work off the re-sends and redeliveries still queued.
    eventually(
        "the queue emptied and every message acked",
        Duration::from_secs(60),
        || async { server.queue_messages("card-service").await == 0 },
    )
    .await;
    for p in relays.iter_mut().chain(cards.iter_mut()) {
        p.kill();
    }
    let v = Verdict::read(&c).await.unwrap();
    eprintln!(
        "rabbitmq chaos: {} payments in {:.1?}, {kills} SIGKILLs, 1 broker restart, {exits} processes restarted after exiting on their own; cards {}, duplicates absorbed by the inbox {}",
        v.payments,
        started.elapsed(),
        v.cards,
        v.absorbed
    );
    assert_eq!(v.payments as usize, payments);
    assert!(v.exactly_once(), "{v:?}");
    assert!(broker_restarted);
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM tidings.outbox").await, 0);
    assert_eq!(
        count("SELECT count(*) FROM tidings.dead_letters").await,
        0,
        "the broker restart dead-lettered messages"
    );
    assert_eq!(
        count("SELECT count(*) FROM tidings.inbox_dead_letters").await,
        0,
        "the card services parked messages"
    );
}

/// A queue that exists already is used as it is (here a quorum queue, which a plain declare
/// would refuse as inequivalent), and a quorum queue's `x-delivery-count` is the delivery count:
/// a message given back twice comes a third time as delivery 3 (a classic queue can only say
/// "redelivered": 2).
#[tokio::test(flavor = "multi_thread")]
async fn quorum_queues_count_deliveries_and_existing_queues_are_used_as_they_are() {
    let vhost = RabbitVhost::create();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    amqp_bind(&vhost.url, EXCHANGE, "quorum", "q.*", args).await;
    let adapter = RabbitAdapter::connect(&consumer_config(&vhost.url, "quorum", "q.x"))
        .await
        .unwrap();
    let s = sink(&vhost.url, Duration::from_secs(2), Unroutable::DeadLetter).await;
    let sent = envelope("q.x", "hello");
    s.publish(&sent).await.unwrap();
    let mut stream = adapter.open().await.unwrap();
    for want in 1..=3 {
        let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("delivered")
            .unwrap()
            .unwrap();
        let Decoded::Message(m) = d.decode() else {
            panic!("a Tidings message")
        };
        assert_eq!(
            (m.id, m.delivery, m.source.as_str()),
            (sent.id, want, "quorum")
        );
        assert_eq!(m.payload.as_ref(), b"hello");
        if want < 3 {
            d.retry_later(Duration::ZERO).await;
        } else {
            d.ack().await.unwrap();
        }
    }
    drop(stream);
    adapter.close().await;
    eventually("the message acked", Duration::from_secs(10), || async {
        vhost.queue_messages("quorum").await == 0
    })
    .await;
}

/// Setup failures are start-up errors naming the server and what is wrong, never the password;
/// an existing exchange of another type is used as it is.
#[tokio::test(flavor = "multi_thread")]
async fn setup_errors_name_the_server_never_the_password() {
    let vhost = RabbitVhost::create();
    let chain = |e: &tidings_inbox::Error| {
        let mut out = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            out = format!("{out}: {s}");
            src = s.source();
        }
        out
    };
    let wrong = vhost.url.replace("guest:guest@", "guest:hunter2@");
    let e = RabbitAdapter::connect(&consumer_config(&wrong, "q", "a"))
        .await
        .unwrap_err();
    let text = format!("{} {e:?}", chain(&e));
    assert!(text.contains("127.0.0.1:5672"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    let e = RabbitAdapter::connect(&RabbitConsumerConfig {
        url: vhost.url.clone(),
        queue: "nope".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(
        chain(&e).contains("\"nope\" does not exist"),
        "{}",
        chain(&e)
    );

    // An exchange that exists with another type is bound to as it is.
    let conn = lapin::Connection::connect(&vhost.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    conn.create_channel()
        .await
        .unwrap()
        .exchange_declare(
            "fan".into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "OK".into()).await;
    RabbitAdapter::connect(&RabbitConsumerConfig {
        url: vhost.url.clone(),
        queue: "fanned".into(),
        declare: Some(QueueSetup {
            exchange: "fan".into(),
            binding_keys: vec!["".into()],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
}
