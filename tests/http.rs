//! HTTP webhooks end to end: the relay's HTTP sink against a real HTTP server of the test's own
//! (a recording endpoint, or the inbox's webhook receiver on a real database). Signatures are
//! checked by the Standard Webhooks authors' Python library, an implementation independent of
//! Tidings.
#![cfg(feature = "http")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use bytes::Bytes;
use futures::future::BoxFuture;
use tidings_inbox::runner::postgres::{Handler, PgStore};
use tidings_inbox::runner::{Delivered, HandlerError};
use tidings_inbox::webhook::{Received as Got, WebhookConfig, WebhookReceiver};
use tidings_outbox::webhook::{self, Secret};
use tidings_outbox::{Message, MessageId, WireMessage};
use tidings_relay::sink::{HttpSink, HttpSinkConfig};
use tidings_relay::{Envelope, Relay, RelayConfig, Sink, SinkError};
use tidings_tests::conformance::{sink_conformance, BrokerUnderTest, Received, SinkFeatures};
use tidings_tests::webhook::{
    message_headers, verify_with_standardwebhooks, Recorder, WebhookServer,
};
use tidings_tests::{drain, pool, TestDb};
use tokio::sync::Notify;

const MAX: usize = 1024 * 1024;

fn secret() -> String {
    Secret::generate()
}

async fn sink_to(url: &str, secrets: Vec<String>, timeout: Duration) -> HttpSink {
    HttpSink::connect(HttpSinkConfig {
        url: Some(format!("{url}/hooks/{{topic}}")),
        secrets,
        timeout,
        max_message_bytes: MAX,
        ..Default::default()
    })
    .await
    .unwrap()
}

struct Http {
    server: WebhookServer,
    recorder: Recorder,
    secret: String,
}

impl BrokerUnderTest for Http {
    fn sink(&self) -> BoxFuture<'_, Arc<dyn Sink>> {
        Box::pin(async move {
            Arc::new(
                sink_to(
                    &self.server.url,
                    vec![self.secret.clone()],
                    Duration::from_millis(800),
                )
                .await,
            ) as Arc<dyn Sink>
        })
    }
    fn read_back(&self) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(async move {
            self.recorder
                .requests()
                .into_iter()
                .map(|r| {
                    let id = r.header("webhook-id").expect("webhook-id").to_owned();
                    let h = message_headers(&r);
                    assert_eq!(
                        h.get("Tidings-Message-Id"),
                        Some(&id),
                        "webhook-id = message id"
                    );
                    assert_eq!(
                        r.header("idempotency-key"),
                        Some(id.as_str()),
                        "Idempotency-Key"
                    );
                    let topic = h.get("Tidings-Topic").expect("a topic header");
                    assert_eq!(r.path, format!("/hooks/{topic}"), "endpoint = template");
                    (id, h, r.body)
                })
                .collect()
        })
    }
    fn stop(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.server.stop())
    }
    fn start(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.server.restart())
    }
    fn freeze(&self) {
        self.server.freeze();
    }
    fn thaw(&self) {
        self.server.thaw();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http_sink_passes_the_conformance_suite_and_its_signatures_verify_independently() {
    let recorder = Recorder::default();
    let server = WebhookServer::start(recorder.router()).await;
    let mut http = Http {
        server,
        recorder: recorder.clone(),
        secret: secret(),
    };
    sink_conformance(
        &mut http,
        SinkFeatures {
            // HTTP drops nothing by id: receivers deduplicate.
            dedup_by_id: false,
            max_payload: Some(MAX),
            can_stop: true,
        },
    )
    .await;
    let all = recorder.requests();
    assert!(all.len() > 600, "{}", all.len());
    verify_with_standardwebhooks(&http.secret, &all);
}

fn envelope(topic: &str, payload: &str) -> Envelope {
    Envelope {
        seq: 1,
        message: WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic: topic.into(),
            key: Some("k-1".into()),
            biz_id: Some("pay-1".into()),
            payload: Bytes::from(payload.to_owned()),
            headers: [(
                "traceparent".to_owned(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
            )]
            .into(),
            created_at: Some(chrono::Utc::now()),
            attempts: 0,
        },
    }
}

/// Rotation: a sink holding the old and the new secret signs with both; receivers (here the
/// Python library) holding either accept, one holding neither refuses.
#[tokio::test(flavor = "multi_thread")]
async fn secret_rotation_signs_with_every_secret() {
    let recorder = Recorder::default();
    let server = WebhookServer::start(recorder.router()).await;
    let (old, new) = (secret(), secret());
    let sink = sink_to(
        &server.url,
        vec![old.clone(), new.clone()],
        Duration::from_secs(2),
    )
    .await;
    sink.publish(&envelope("rotate", r#"{"a":1}"#))
        .await
        .unwrap();
    let got = recorder.requests();
    assert_eq!(
        got[0]
            .header("webhook-signature")
            .unwrap()
            .split(' ')
            .count(),
        2
    );
    verify_with_standardwebhooks(&old, &got);
    verify_with_standardwebhooks(&new, &got);
    let outsider = std::panic::catch_unwind(|| verify_with_standardwebhooks(&secret(), &got));
    assert!(outsider.is_err(), "a third secret must not verify");
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 50,
        poll_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_secs(60),
        publish_timeout: Duration::from_secs(2),
        unavailable_backoff_max: Duration::from_millis(200),
        max_attempts: 5,
        listen: false,
        ..Default::default()
    }
}

/// Seconds until each row of `topic` is due, and its attempts.
async fn schedule(db: &TestDb, topic: &str) -> Vec<(f64, i32, Option<String>)> {
    db.client()
        .await
        .query(
            "SELECT extract(epoch FROM deliver_at - now())::float8, attempts, last_error \
             FROM tidings.outbox WHERE topic = $1 ORDER BY seq",
            &[&topic],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn dead(db: &TestDb) -> Vec<(String, String)> {
    db.client()
        .await
        .query(
            "SELECT topic, last_error FROM tidings.dead_letters ORDER BY topic",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// 429 and 503 with `Retry-After` (seconds, or an HTTP date) are retried at that time: the hint
/// is the row's next attempt time, one attempt counted. 408 and 500 are retried with backoff;
/// 410, 400 and a redirect are dead-lettered at once.
#[tokio::test(flavor = "multi_thread")]
async fn answers_decide_retry_time_or_dead_letter() {
    let recorder = Recorder::default();
    recorder.answer(|r| {
        let topic = r.path.trim_start_matches("/hooks/");
        let date = (chrono::Utc::now() + chrono::Duration::seconds(40))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        match topic {
            "slow" => (
                StatusCode::TOO_MANY_REQUESTS,
                vec![("retry-after", "30".into())],
            ),
            "maintenance" => (StatusCode::SERVICE_UNAVAILABLE, vec![("retry-after", date)]),
            "busy" => (StatusCode::INTERNAL_SERVER_ERROR, vec![]),
            "timeout" => (StatusCode::REQUEST_TIMEOUT, vec![]),
            "gone" => (StatusCode::GONE, vec![]),
            "bad" => (StatusCode::BAD_REQUEST, vec![]),
            "moved" => (
                StatusCode::MOVED_PERMANENTLY,
                vec![("location", "https://elsewhere.invalid/".into())],
            ),
            _ => (StatusCode::NO_CONTENT, vec![]),
        }
    });
    let server = WebhookServer::start(recorder.router()).await;
    let db = TestDb::migrated().await;
    let topics = [
        "slow",
        "maintenance",
        "busy",
        "timeout",
        "gone",
        "bad",
        "moved",
        "fine",
    ];
    db.enqueue(topics.iter().map(|t| Message::new(*t, "{}")).collect())
        .await;
    let sink = Arc::new(sink_to(&server.url, vec![secret()], Duration::from_secs(1)).await);
    let relay = Relay::new(pool(&db, 2), sink, relay_config()).unwrap();
    let r = relay.tick().await.unwrap();
    assert_eq!(
        (r.delivered, r.retried, r.dead_lettered),
        (1, 4, 3),
        "{r:?}"
    );
    let (due, attempts, _) = schedule(&db, "slow").await[0].clone();
    assert!(
        (25.0..=30.5).contains(&due) && attempts == 1,
        "429 Retry-After: 30 -> {due} s"
    );
    let (due, attempts, _) = schedule(&db, "maintenance").await[0].clone();
    assert!(
        (30.0..=40.5).contains(&due) && attempts == 1,
        "503 Retry-After <date> -> {due} s"
    );
    for t in ["busy", "timeout"] {
        let (due, attempts, err) = schedule(&db, t).await[0].clone();
        assert!(due < 1.0 && attempts == 1, "{t}: backoff, {due} s");
        assert!(err.unwrap().contains("answered"), "{t}");
    }
    let dead = dead(&db).await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(dead[0].0 == "bad" && dead[0].1.contains("400"), "{dead:?}");
    assert!(dead[1].0 == "gone" && dead[1].1.contains("410"), "{dead:?}");
    assert!(
        dead[2].0 == "moved" && dead[2].1.contains("redirect"),
        "{dead:?}"
    );
    // The answer's body is quoted, the endpoint named by host and port only.
    assert!(
        dead[1].1.contains("answer from the test endpoint"),
        "{dead:?}"
    );
    assert!(!dead[1].1.contains("/hooks/"), "{dead:?}");

    // A retried message is the same webhook: the same webhook-id (the message id) and
    // Idempotency-Key on every attempt, so the receiver can drop a repeat.
    recorder.answer(|_| (StatusCode::NO_CONTENT, vec![]));
    db.client()
        .await
        .execute(
            "UPDATE tidings.outbox SET deliver_at = now() WHERE topic = 'busy'",
            &[],
        )
        .await
        .unwrap();
    let r = relay.tick().await.unwrap();
    assert!(r.delivered >= 1, "{r:?}");
    let busy: Vec<_> = recorder
        .seen()
        .into_iter()
        .filter(|r| r.path == "/hooks/busy")
        .collect();
    assert_eq!(busy.len(), 2, "a 500, then a 204");
    let id = busy[0].header("webhook-id").expect("webhook-id").to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    for attempt in &busy {
        assert_eq!(attempt.header("webhook-id"), Some(id.as_str()));
        assert_eq!(attempt.header("idempotency-key"), Some(id.as_str()));
    }
}

/// One endpoint down among several: its messages wait without counting attempts while the
/// other endpoint's flow; once it is back, a probe closes its circuit and its backlog goes.
/// One endpoint answering 500 to everything opens its circuit after the threshold, and its
/// messages are not dead-lettered on the way.
#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_down_postpones_its_messages_without_counting_attempts() {
    let (up, down) = (Recorder::default(), Recorder::default());
    let up_server = WebhookServer::start(up.router()).await;
    let mut down_server = WebhookServer::start(down.router()).await;
    down_server.stop().await;
    let sink = Arc::new(
        HttpSink::connect(HttpSinkConfig {
            routes: vec![
                ("up.*".into(), format!("{}/hooks/{{topic}}", up_server.url)),
                (
                    "down.*".into(),
                    format!("{}/hooks/{{topic}}", down_server.url),
                ),
            ],
            secrets: vec![secret()],
            timeout: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let db = TestDb::migrated().await;
    let mut msgs = Vec::new();
    for i in 0..20 {
        msgs.push(Message::new("up.orders", format!("{i}")));
        msgs.push(Message::new("down.orders", format!("{i}")));
    }
    db.enqueue(msgs).await;
    let relay = Relay::new(pool(&db, 2), sink.clone(), relay_config()).unwrap();
    let mut total = tidings_relay::TickReport::default();
    for _ in 0..5 {
        total += &relay.tick().await.unwrap();
    }
    assert_eq!(
        up.requests().len(),
        20,
        "the other endpoint's messages flow"
    );
    assert!(
        total.postponed >= 20 && total.retried == 0 && total.dead_lettered == 0,
        "{total:?}"
    );
    assert!(
        !total.sink_unavailable,
        "one endpoint down is not the whole sink: {total:?}"
    );
    let rows = schedule(&db, "down.orders").await;
    assert_eq!(rows.len(), 20);
    for (due, attempts, err) in &rows {
        assert_eq!(*attempts, 0, "no attempt counted");
        assert!(*due > 0.0, "it waits");
        assert!(
            err.as_deref().unwrap().contains("destination down"),
            "{err:?}"
        );
    }
    down_server.restart().await;
    let total = drain(&relay, &db).await;
    assert_eq!(total.dead_lettered, 0, "{total:?}");
    assert_eq!(
        down.requests().len(),
        20,
        "the backlog went once it was back"
    );

    // An endpoint answering 500 to everything: at most threshold - 1 attempts are counted in
    // all, however many messages wait for it.
    let failing = Recorder::default();
    failing.answer(|_| (StatusCode::INTERNAL_SERVER_ERROR, vec![]));
    let failing_server = WebhookServer::start(failing.router()).await;
    let sink = Arc::new(sink_to(&failing_server.url, vec![secret()], Duration::from_secs(1)).await);
    let relay = Relay::new(pool(&db, 2), sink, relay_config()).unwrap();
    db.enqueue(
        (0..40)
            .map(|i| Message::new("failing", format!("{i}")))
            .collect(),
    )
    .await;
    let mut total = tidings_relay::TickReport::default();
    for _ in 0..4 {
        total += &relay.tick().await.unwrap();
    }
    let attempts: i64 = schedule(&db, "failing")
        .await
        .iter()
        .map(|(_, a, _)| i64::from(*a))
        .sum();
    assert!(attempts <= 4, "attempts counted: {attempts} ({total:?})");
    assert!(
        total.sink_unavailable,
        "its only endpoint down: the sink is: {total:?}"
    );
    assert_eq!(total.dead_lettered, 0);
}

/// A header HTTP cannot carry twice (names differ only in case) is a permanent failure of that
/// message, not a panic or a retry.
#[tokio::test(flavor = "multi_thread")]
async fn headers_http_cannot_carry_fail_that_message_permanently() {
    let recorder = Recorder::default();
    let server = WebhookServer::start(recorder.router()).await;
    let sink = sink_to(&server.url, vec![secret()], Duration::from_secs(2)).await;
    let mut env = envelope("t", "{}");
    env.headers.insert("X-Trace".into(), "a".into());
    env.headers.insert("x-trace".into(), "b".into());
    match sink.publish(&env).await {
        Err(SinkError::Permanent(e)) => assert!(e.to_string().contains("twice"), "{e}"),
        other => panic!("{other:?}"),
    }
    let mut env = envelope("t", "{}");
    env.headers.insert("x-unicode".into(), "café ☕".into());
    sink.publish(&env)
        .await
        .expect("UTF-8 values travel as bytes");
    assert_eq!(recorder.requests()[0].header("x-unicode"), Some("café ☕"));
    // A biz-id (or any header value) with a leading or trailing space or tab, which the schema
    // allows but HTTP strips on the way: permanent, never a changed biz-id at the receiver.
    for biz in [" pay-1", "pay-1\t"] {
        let mut env = envelope("t", "{}");
        env.message.biz_id = Some(biz.into());
        match sink.publish(&env).await {
            Err(SinkError::Permanent(e)) => assert!(e.to_string().contains("HTTP strips"), "{e}"),
            other => panic!("{biz:?}: {other:?}"),
        }
    }
    assert_eq!(recorder.seen().len(), 1, "nothing else was sent");
}

// ---------------------------------------------------------------------------------------------
// The receiver.

/// Issues one card per payment (biz-id), in the inbox transaction; can be held at a gate, and
/// fails on payloads that ask for it.
struct Cards {
    gate: Option<(Arc<Notify>, Arc<Notify>)>,
}

impl Handler for Cards {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            match msg.payload.as_ref() {
                b"\"retry\"" => return Err(HandlerError::retry("asked to fail")),
                b"\"park\"" => return Err(HandlerError::park("asked to park")),
                _ => {}
            }
            tx.execute(
                "INSERT INTO cards (payment) VALUES ($1)",
                &[&msg.biz_id.as_deref().unwrap_or("")],
            )
            .await?;
            if msg.payload.as_ref() == b"\"panic\"" {
                panic!("asked to panic, with the card written");
            }
            if let Some((entered, release)) = &self.gate {
                entered.notify_one();
                release.notified().await;
            }
            Ok(())
        })
    }
}

async fn cards_db() -> TestDb {
    let db = TestDb::migrated().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE cards (payment text PRIMARY KEY)")
        .await
        .unwrap();
    db
}

async fn cards(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM cards", &[])
        .await
        .unwrap()
        .get(0)
}

fn receiver(db: &TestDb, secrets: Vec<String>, handler: Cards) -> WebhookReceiver<PgStore> {
    WebhookReceiver::new(
        PgStore::new(pool(db, 4), Arc::new(handler)),
        WebhookConfig {
            consumer: "card-service".into(),
            secrets,
            max_deliveries: 5,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A receiver whose handler stops at a gate after writing its card: `entered` is notified
/// there, and it goes on when `release` is.
fn gated_receiver(
    db: &TestDb,
    secret: &str,
) -> (WebhookReceiver<PgStore>, Arc<Notify>, Arc<Notify>) {
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let rx = receiver(
        db,
        vec![secret.to_owned()],
        Cards {
            gate: Some((entered.clone(), release.clone())),
        },
    );
    (rx, entered, release)
}

/// The payments story over HTTP: the relay's sink posts to the receiver; a payment sent twice
/// (same biz-id, two messages) and a re-send of the same message give one card each, and every
/// one is answered 2xx, so nothing stays in the outbox.
#[tokio::test(flavor = "multi_thread")]
async fn receiver_issues_one_card_per_payment_however_often_it_is_sent() {
    let db = cards_db().await;
    let s = secret();
    let rx = receiver(&db, vec![s.clone()], Cards { gate: None });
    let server = WebhookServer::start(rx.router("/hooks/{topic}")).await;
    let mut msgs = Vec::new();
    for i in 0..30 {
        msgs.push(
            Message::new("payment.succeeded", format!("{i}")).biz_id(format!("pay-{}", i % 20)),
        );
    }
    db.enqueue(msgs).await;
    let sink = Arc::new(sink_to(&server.url, vec![s], Duration::from_secs(2)).await);
    let relay = Relay::new(pool(&db, 2), sink.clone(), relay_config()).unwrap();
    let total = drain(&relay, &db).await;
    assert_eq!(
        (total.delivered, total.retried, total.dead_lettered),
        (30, 0, 0),
        "{total:?}"
    );
    assert_eq!(cards(&db).await, 20);
    let mut env = envelope("payment.succeeded", "{}");
    env.message.biz_id = Some("pay-new".into());
    sink.publish(&env).await.unwrap();
    sink.publish(&env)
        .await
        .expect("a re-send is answered 2xx too");
    assert_eq!(cards(&db).await, 21);
    let st = rx.stats();
    assert_eq!(st.processed.load(Ordering::Relaxed), 21);
    assert_eq!(st.duplicates.load(Ordering::Relaxed), 11);
}

/// 2xx only after the commit: while the handler's transaction is open the request has no
/// answer and the card is invisible; the answer comes after the commit, and the card is there.
#[tokio::test(flavor = "multi_thread")]
async fn receiver_answers_only_after_the_commit() {
    let db = cards_db().await;
    let s = secret();
    let (rx, entered, release) = gated_receiver(&db, &s);
    let server = WebhookServer::start(rx.router("/hooks/{topic}")).await;
    let sink = Arc::new(sink_to(&server.url, vec![s], Duration::from_secs(10)).await);
    let answered = Arc::new(AtomicBool::new(false));
    let send = tokio::spawn({
        let (sink, answered) = (sink.clone(), answered.clone());
        async move {
            let r = sink.publish(&envelope("payment.succeeded", "{}")).await;
            answered.store(true, Ordering::SeqCst);
            r
        }
    });
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("the handler runs");
    assert!(
        !answered.load(Ordering::SeqCst),
        "no answer before the commit"
    );
    assert_eq!(cards(&db).await, 0, "the effect is not committed yet");
    release.notify_one();
    send.await.unwrap().expect("2xx after the commit");
    assert_eq!(cards(&db).await, 1, "committed when the answer came");
}

fn signed(secrets: &[Secret], env: &Envelope, ts: i64) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in env.wire_headers() {
        h.insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v.as_bytes()).unwrap(),
        );
    }
    let id = env.id.to_string();
    let created = h
        .get("tidings-created-at")
        .map(|v| v.to_str().unwrap().to_owned());
    let meta = webhook::metadata_text(
        &env.topic,
        env.key.as_deref(),
        env.biz_id.as_deref(),
        created.as_deref(),
    );
    h.insert("webhook-id", id.parse().unwrap());
    h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
    h.insert(
        "webhook-signature",
        webhook::sign(secrets, &id, ts, &env.payload)
            .parse()
            .unwrap(),
    );
    h.insert(
        "tidings-signature",
        webhook::sign_metadata(secrets, &id, ts, &meta)
            .parse()
            .unwrap(),
    );
    h
}

/// A sender that gives up (its request timed out) hangs up, and the server drops that request's
/// future. The work goes on in a task of its own: the transaction commits, and the re-send is
/// a duplicate. Before, the dropped future rolled the transaction back halfway and the re-send
/// ran the effect again (a second "first delivery", and counters that did not add up).
/// `shutdown` waits for such tasks, then refuses new requests.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_sender_hung_up_still_commits() {
    let db = cards_db().await;
    let s = secret();
    let (rx, entered, release) = gated_receiver(&db, &s);
    let keys = vec![Secret::parse(&s).unwrap()];
    let mut env = envelope("payment.succeeded", "{}");
    env.message.biz_id = Some("pay-1".into());
    let headers = signed(&keys, &env, chrono::Utc::now().timestamp());
    {
        let request = rx.receive("/", &headers, env.payload.clone());
        tokio::pin!(request);
        tokio::select! {
            _ = &mut request => panic!("answered while the handler was held"),
            r = tokio::time::timeout(Duration::from_secs(10), entered.notified()) => {
                r.expect("the handler runs")
            }
        }
        // Dropped here, with the effect written and the transaction open.
    }
    release.notify_one();
    let (got, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        rx.receive("/", &headers, env.payload.clone()),
    )
    .await
    .expect("the re-send is answered");
    assert_eq!(
        got,
        Got::Duplicate,
        "the first request's transaction committed"
    );
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(cards(&db).await, 1);
    // Shutdown waits for the abandoned request's task: its effect is counted by then.
    assert!(rx.shutdown(Duration::from_secs(10)).await);
    let st = rx.stats();
    assert_eq!(st.processed.load(Ordering::SeqCst), 1);
    assert_eq!(st.duplicates.load(Ordering::SeqCst), 1);
    // After shutdown nothing runs: 503, and the sender retries later.
    let (got, resp) = rx.receive("/", &headers, env.payload.clone()).await;
    assert_eq!(
        (got, resp.status()),
        (Got::Unavailable, StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(st.duplicates.load(Ordering::SeqCst), 1, "nothing ran");
}

/// At most `max_in_flight` requests run at once: with one held in its handler, the next waits
/// a moment for a place and is answered 503 with `Retry-After`, without running (counted as
/// transient); once the first is done, the re-send runs. An unsigned request is refused (401)
/// without waiting for a place.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_beyond_max_in_flight_is_answered_503_without_running() {
    let db = cards_db().await;
    let s = secret();
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let rx = WebhookReceiver::new(
        PgStore::new(
            pool(&db, 4),
            Arc::new(Cards {
                gate: Some((entered.clone(), release.clone())),
            }),
        ),
        WebhookConfig {
            consumer: "card-service".into(),
            secrets: vec![s.clone()],
            max_in_flight: 1,
            // The first request waits at its gate inside its transaction meanwhile.
            db_timeout: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .unwrap();
    let keys = vec![Secret::parse(&s).unwrap()];
    let now = chrono::Utc::now().timestamp();
    let (mut first, mut second) = (
        envelope("payment.succeeded", "{}"),
        envelope("payment.succeeded", "{}"),
    );
    first.message.biz_id = Some("pay-1".into());
    second.message.biz_id = Some("pay-2".into());
    let held = tokio::spawn({
        let (rx, headers, body) = (
            rx.clone(),
            signed(&keys, &first, now),
            first.payload.clone(),
        );
        async move { rx.receive("/", &headers, body).await.0 }
    });
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("the first request runs");
    let h2 = signed(&keys, &second, now);
    let (got, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        rx.receive("/", &h2, second.payload.clone()),
    )
    .await
    .expect("answered after a moment, not queued until a place is free");
    assert_eq!(
        (got, resp.status()),
        (Got::Unavailable, StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(rx.stats().transient.load(Ordering::SeqCst), 1);
    let (got, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        rx.receive(
            "/",
            &signed(&[Secret::parse(&secret()).unwrap()], &second, now),
            second.payload.clone(),
        ),
    )
    .await
    .expect("a forged request is refused without waiting");
    assert_eq!(
        (got, resp.status()),
        (Got::Refused, StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        cards(&db).await,
        0,
        "the second did not run; the first is uncommitted"
    );
    release.notify_one();
    assert_eq!(held.await.unwrap(), Got::Processed);
    // The first request's permit is back: the re-send runs (its gate opened beforehand).
    release.notify_one();
    let (got, _) = rx.receive("/", &h2, second.payload.clone()).await;
    assert_eq!(got, Got::Processed);
    assert_eq!(cards(&db).await, 2);
    // Zero is refused at construction.
    let zero = WebhookReceiver::new(
        PgStore::new(pool(&db, 1), Arc::new(Cards { gate: None })),
        WebhookConfig {
            consumer: "card-service".into(),
            secrets: vec![s],
            max_in_flight: 0,
            ..Default::default()
        },
    );
    let err = zero.err().expect("max_in_flight 0 is refused").to_string();
    assert!(err.contains("max_in_flight"), "{err}");
}

/// What the receiver refuses, and that nothing runs then: another secret, a changed body, a
/// changed biz-id (the metadata signature), a missing metadata signature, a timestamp outside
/// the tolerance, an id that is not a message id. Rotation: a receiver holding the old and the
/// new secret accepts either.
#[tokio::test(flavor = "multi_thread")]
async fn receiver_refuses_forged_tampered_and_stale_requests() {
    let db = cards_db().await;
    let (old, new) = (secret(), secret());
    let rx = receiver(&db, vec![old.clone(), new.clone()], Cards { gate: None });
    let parse = |s: &str| vec![Secret::parse(s).unwrap()];
    let now = chrono::Utc::now().timestamp();
    let env = envelope("payment.succeeded", r#"{"amount":5}"#);
    let body = env.payload.clone();
    let refused = |(got, resp): (Got, axum::response::Response)| {
        assert_eq!(got, Got::Refused);
        resp.status()
    };
    let stranger = refused(
        rx.receive("/", &signed(&parse(&secret()), &env, now), body.clone())
            .await,
    );
    assert_eq!(stranger, StatusCode::UNAUTHORIZED);
    let tampered_body = refused(
        rx.receive(
            "/",
            &signed(&parse(&new), &env, now),
            Bytes::from_static(br#"{"amount":500}"#),
        )
        .await,
    );
    assert_eq!(tampered_body, StatusCode::UNAUTHORIZED);
    let mut h = signed(&parse(&new), &env, now);
    h.insert("tidings-biz-id", "pay-2".parse().unwrap());
    assert_eq!(
        refused(rx.receive("/", &h, body.clone()).await),
        StatusCode::UNAUTHORIZED
    );
    let mut h = signed(&parse(&new), &env, now);
    h.remove("tidings-signature");
    assert_eq!(
        refused(rx.receive("/", &h, body.clone()).await),
        StatusCode::UNAUTHORIZED
    );
    let stale = signed(&parse(&new), &env, now - 600);
    assert_eq!(
        refused(rx.receive("/", &stale, body.clone()).await),
        StatusCode::UNAUTHORIZED
    );
    let mut odd = env.clone();
    odd.message.id = MessageId::from_uuid(uuid::Uuid::nil());
    let mut h = signed(&parse(&new), &odd, now);
    let fake = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    h.insert("webhook-id", fake.parse().unwrap());
    h.insert(
        "webhook-signature",
        webhook::sign(&parse(&new), fake, now, &body)
            .parse()
            .unwrap(),
    );
    let meta = webhook::metadata_text(
        &odd.topic,
        odd.key.as_deref(),
        odd.biz_id.as_deref(),
        h.get("tidings-created-at").map(|v| v.to_str().unwrap()),
    );
    h.insert(
        "tidings-signature",
        webhook::sign_metadata(&parse(&new), fake, now, &meta)
            .parse()
            .unwrap(),
    );
    assert_eq!(
        refused(rx.receive("/", &h, body.clone()).await),
        StatusCode::BAD_REQUEST
    );
    // A second Tidings-Biz-Id (the signature checks would read the first, the message the
    // last) and a Tidings-Message-Id other than the signed webhook-id are refused.
    let mut h = signed(&parse(&new), &env, now);
    h.append("tidings-biz-id", "pay-2".parse().unwrap());
    assert_eq!(
        refused(rx.receive("/", &h, body.clone()).await),
        StatusCode::BAD_REQUEST
    );
    let mut h = signed(&parse(&new), &env, now);
    h.insert(
        "tidings-message-id",
        uuid::Uuid::now_v7().to_string().parse().unwrap(),
    );
    assert_eq!(
        refused(rx.receive("/", &h, body.clone()).await),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(cards(&db).await, 0, "nothing ran");

    let (got, resp) = rx
        .receive("/", &signed(&parse(&old), &env, now), body.clone())
        .await;
    assert_eq!((got, resp.status()), (Got::Processed, StatusCode::OK));
    let (got, resp) = rx
        .receive("/", &signed(&parse(&new), &env, now), body)
        .await;
    assert_eq!((got, resp.status()), (Got::Duplicate, StatusCode::OK));
    assert_eq!(cards(&db).await, 1);
}

/// A handler failure is answered 500 (the sender retries) and runs nothing; a handler asking
/// for parking, or a delivery reaching max_deliveries, parks the message in
/// tidings.inbox_dead_letters and answers 200 so the sender stops.
#[tokio::test(flavor = "multi_thread")]
async fn receiver_answers_500_for_a_retry_and_parks_what_cannot_succeed() {
    let prometheus = prometheus();
    let db = cards_db().await;
    let s = secret();
    // A consumer name of its own: the failure and park counters below are this test's.
    let consumer = format!("parks-{}", uuid::Uuid::now_v7().simple());
    let rx = WebhookReceiver::new(
        PgStore::new(pool(&db, 4), Arc::new(Cards { gate: None })),
        WebhookConfig {
            consumer: consumer.clone(),
            secrets: vec![s.clone()],
            max_deliveries: 5,
            ..Default::default()
        },
    )
    .unwrap();
    let keys = vec![Secret::parse(&s).unwrap()];
    let now = chrono::Utc::now().timestamp();
    let retry = envelope("t", "\"retry\"");
    let (got, resp) = rx
        .receive("/", &signed(&keys, &retry, now), retry.payload.clone())
        .await;
    assert_eq!(
        (got, resp.status()),
        (Got::Failed, StatusCode::INTERNAL_SERVER_ERROR)
    );
    // A handler that panics (after writing its card) fails like one that returns an error:
    // 500 and its transaction rolled back, then parked at max_deliveries.
    let mut panics = envelope("t", "\"panic\"");
    let (got, resp) = rx
        .receive("/", &signed(&keys, &panics, now), panics.payload.clone())
        .await;
    assert_eq!(
        (got, resp.status()),
        (Got::Failed, StatusCode::INTERNAL_SERVER_ERROR)
    );
    panics.message.attempts = 4;
    let (got, resp) = rx
        .receive("/", &signed(&keys, &panics, now), panics.payload.clone())
        .await;
    assert_eq!((got, resp.status()), (Got::Parked, StatusCode::OK));
    let mut last = retry.clone();
    last.message.attempts = 4; // the sender's fifth attempt = max_deliveries
    let (got, resp) = rx
        .receive("/", &signed(&keys, &last, now), last.payload.clone())
        .await;
    assert_eq!((got, resp.status()), (Got::Parked, StatusCode::OK));
    let park = envelope("t", "\"park\"");
    let (got, resp) = rx
        .receive("/", &signed(&keys, &park, now), park.payload.clone())
        .await;
    assert_eq!((got, resp.status()), (Got::Parked, StatusCode::OK));
    let parked: Vec<(uuid::Uuid, i32)> = db
        .client()
        .await
        .query(
            "SELECT message_id, deliveries FROM tidings.inbox_dead_letters ORDER BY message_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        parked,
        {
            let mut want = vec![
                (park.id.as_uuid(), 1),
                (retry.id.as_uuid(), 5),
                (panics.id.as_uuid(), 5),
            ];
            want.sort();
            want
        },
        "all three parked with their deliveries"
    );
    assert_eq!(cards(&db).await, 0);
    // Counted through the metrics facade: every failed handler run, and the three parkings.
    let text = prometheus.render();
    let get = |series: &str| tidings_tests::sample(&text, series);
    let label = format!("{{consumer=\"{consumer}\"}}");
    assert_eq!(
        get(&format!("tidings_consumer_parked_total{label}")),
        Some(3.0),
        "{text}"
    );
    assert!(
        get(&format!("tidings_consumer_failed_total{label}")) == Some(5.0),
        "{text}"
    );
    assert_eq!(
        get(&format!("tidings_consumer_processed_total{label}")),
        None,
        "{text}"
    );
}

/// A message that makes its endpoint fail (500) whenever it is sent. Alone, it cannot be told
/// from an endpoint outage: it opens the circuit (its first failure counted, the rest the
/// endpoint's) and waits, uncounted. With other traffic to the endpoint, it cannot hold the
/// endpoint down, and it still ends dead.
#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_cannot_hold_its_endpoint_down_and_still_ends_dead() {
    let recorder = Recorder::default();
    recorder.answer(|r| {
        if String::from_utf8_lossy(&r.body).contains("poison") {
            (StatusCode::INTERNAL_SERVER_ERROR, vec![])
        } else {
            (StatusCode::OK, vec![])
        }
    });
    let server = WebhookServer::start(recorder.router()).await;
    let sink = Arc::new(
        HttpSink::connect(HttpSinkConfig {
            url: Some(format!("{}/hooks/{{topic}}", server.url)),
            secrets: vec![secret()],
            timeout: Duration::from_secs(1),
            failure_threshold: 2,
            cooldown_max: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let db = TestDb::migrated().await;
    db.enqueue(vec![Message::new("t", "poison")]).await;
    let relay = Relay::new(
        pool(&db, 2),
        sink,
        RelayConfig {
            max_attempts: 3,
            ..relay_config()
        },
    )
    .unwrap();
    // Alone, until its endpoint counts as down.
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        relay.tick().await.unwrap();
        let (_, attempts, err) = schedule(&db, "t").await[0].clone();
        if err
            .as_deref()
            .is_some_and(|e| e.contains("destination down"))
        {
            assert_eq!(attempts, 1, "only the failure before the threshold counted");
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the circuit never opened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Other traffic shows the endpoint works: a failed probe waits twice as long as the rest,
    // so the next probe is another message, which closes the circuit; between the other
    // messages' successes the poison message's failures count again, and it ends dead.
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut fine = 0;
    while dead(&db).await.is_empty() {
        db.enqueue(vec![Message::new("t", "fine")]).await;
        fine += 1;
        relay.tick().await.unwrap();
        assert!(
            tokio::time::Instant::now() < end,
            "the poison message never ended dead"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drain(&relay, &db).await;
    let dead = dead(&db).await;
    assert_eq!(dead.len(), 1, "only the poison message: {dead:?}");
    assert!(dead[0].1.contains("500"), "{dead:?}");
    assert_eq!(
        recorder.requests().len(),
        fine,
        "every other message got through"
    );
}

/// TLS is verified: an https endpoint whose certificate no trusted CA signed is not sent to
/// (it counts as the endpoint down: postponed, no attempt), and with the certificate given as
/// `tls_ca_file` (`--http-tls-ca`) the same endpoint gets the message.
#[tokio::test(flavor = "multi_thread")]
async fn https_endpoints_are_verified_against_the_roots_and_the_extra_ca() {
    let recorder = Recorder::default();
    let (server, cert) = WebhookServer::start_tls(recorder.router()).await;
    let config = HttpSinkConfig {
        url: Some(format!("{}/hooks/{{topic}}", server.url)),
        secrets: vec![secret()],
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let untrusting = HttpSink::connect(config.clone()).await.unwrap();
    match untrusting.publish(&envelope("tls", "{}")).await {
        Err(SinkError::Postpone(_, e)) => {
            assert!(e.to_string().contains("certificate"), "{e}")
        }
        other => panic!("an unverified certificate must not be sent to: {other:?}"),
    }
    assert!(recorder.seen().is_empty(), "nothing reached the endpoint");
    let trusting = HttpSink::connect(HttpSinkConfig {
        tls_ca_file: Some(cert),
        ..config
    })
    .await
    .unwrap();
    trusting
        .publish(&envelope("tls", "{}"))
        .await
        .expect("delivered over verified TLS");
    assert_eq!(recorder.requests().len(), 1);
}

/// The receiver records through the `metrics` facade: with a Prometheus recorder installed,
/// effects, duplicates, handler durations and lags appear under its consumer name (and no
/// message id or biz-id appears in any label).
#[tokio::test(flavor = "multi_thread")]
async fn receiver_metrics_count_effects_duplicates_and_lag() {
    let prometheus = prometheus();
    let db = cards_db().await;
    let s = secret();
    let consumer = format!("metrics-{}", uuid::Uuid::now_v7().simple());
    let rx = WebhookReceiver::new(
        PgStore::new(pool(&db, 2), Arc::new(Cards { gate: None })),
        WebhookConfig {
            consumer: consumer.clone(),
            secrets: vec![s.clone()],
            ..Default::default()
        },
    )
    .unwrap();
    let server = WebhookServer::start(rx.router("/hooks/{topic}")).await;
    let sink = sink_to(&server.url, vec![s], Duration::from_secs(2)).await;
    let mut a = envelope("payment.succeeded", "{}");
    a.message.biz_id = Some("pay-a".into());
    let mut b = envelope("payment.succeeded", "{}");
    b.message.biz_id = Some("pay-b".into());
    for e in [&a, &b, &a] {
        sink.publish(e).await.unwrap();
    }
    let text = prometheus.render();
    let get = |series: &str| tidings_tests::sample(&text, series);
    let label = format!("{{consumer=\"{consumer}\"}}");
    assert_eq!(
        get(&format!("tidings_consumer_processed_total{label}")),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        get(&format!(
            "tidings_consumer_duplicates_absorbed_total{label}"
        )),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        get(&format!(
            "tidings_consumer_handler_duration_seconds_count{label}"
        )),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        get(&format!("tidings_consumer_lag_seconds_count{label}")),
        Some(3.0),
        "{text}"
    );
    assert!(
        !text.contains("pay-a") && !text.contains(&a.id.to_string()),
        "{text}"
    );
}

/// One Prometheus recorder for this test binary.
fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("the only recorder of this test binary")
        })
        .clone()
}
