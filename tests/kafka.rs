//! Kafka end to end against a real Kafka-protocol broker (tansu, one per test on a free
//! 127.0.0.1 port): the sink passes the sink conformance suite, the consumer adapter the runner
//! conformance suite.
#![cfg(feature = "kafka")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tidings_inbox::kafka::{KafkaAdapter, KafkaConsumerConfig};
use tidings_relay::sink::{KafkaSink, KafkaSinkConfig};
use tidings_relay::{Envelope, Sink};
use tidings_tests::conformance::{sink_conformance, BrokerUnderTest, Received, SinkFeatures};
use tidings_tests::runner_conformance::{runner_conformance, ConsumerBroker};
use tidings_tests::{KafkaServer, KillOnDrop};

async fn sink(brokers: &str) -> KafkaSink {
    KafkaSink::connect(KafkaSinkConfig {
        brokers: brokers.to_owned(),
        create_topics: true,
        partitions: 3,
        delivery_timeout: Duration::from_millis(800),
        ..Default::default()
    })
    .await
    .unwrap()
}

struct Kafka(KafkaServer);

impl BrokerUnderTest for Kafka {
    fn sink(&self) -> BoxFuture<'_, Arc<dyn Sink>> {
        Box::pin(async move { Arc::new(sink(&self.0.brokers).await) as Arc<dyn Sink> })
    }
    fn read_back(&self) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(async move {
            tidings_tests::kafka_records(&self.0.brokers)
                .await
                .into_iter()
                .map(|(topic, key, h, payload)| {
                    assert_eq!(
                        h.get("Tidings-Topic"),
                        Some(&topic),
                        "topic = Tidings topic"
                    );
                    assert_eq!(
                        key.as_ref(),
                        h.get("Tidings-Key"),
                        "Kafka key = ordering key"
                    );
                    (h["Tidings-Message-Id"].clone(), h, payload)
                })
                .collect()
        })
    }
    fn stop(&mut self) -> BoxFuture<'_, ()> {
        self.0.stop();
        Box::pin(async {})
    }
    fn start(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.restart())
    }
    fn freeze(&self) {
        self.0.signal("-STOP");
    }
    fn thaw(&self) {
        self.0.signal("-CONT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_sink_passes_the_conformance_suite() {
    sink_conformance(
        &mut Kafka(KafkaServer::start().await),
        SinkFeatures {
            dedup_by_id: false,
            max_payload: Some(1_000_000),
            can_stop: true,
        },
    )
    .await;
}

/// Kafka as the runner conformance suite's broker: published through the relay's Kafka sink
/// (Kafka topic = Tidings topic), consumed by a consumer group per case.
struct KafkaConsumers {
    server: KafkaServer,
    sink: KafkaSink,
    /// Records published per topic (offsets are dense from 0 on this broker).
    published: Mutex<HashMap<String, i64>>,
    /// The topic of each consumer (group).
    topics: Mutex<HashMap<String, String>>,
}

impl ConsumerBroker for KafkaConsumers {
    type Adapter = KafkaAdapter;

    fn publish<'a>(&'a self, messages: &'a [tidings_outbox::WireMessage]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for (i, m) in messages.iter().enumerate() {
                self.sink
                    .publish(&Envelope {
                        seq: i as i64,
                        message: m.clone(),
                    })
                    .await
                    .unwrap();
                *self
                    .published
                    .lock()
                    .unwrap()
                    .entry(m.topic.clone())
                    .or_default() += 1;
            }
        })
    }

    fn adapter<'a>(
        &'a self,
        name: &'a str,
        topic: &'a str,
        _redeliver_after: Duration,
    ) -> BoxFuture<'a, KafkaAdapter> {
        self.topics
            .lock()
            .unwrap()
            .insert(name.to_owned(), topic.to_owned());
        Box::pin(async move {
            KafkaAdapter::connect(&KafkaConsumerConfig {
                brokers: self.server.brokers.clone(),
                group_id: name.to_owned(),
                topics: vec![topic.to_owned()],
                properties: vec![],
            })
            .unwrap()
        })
    }

    fn unacked<'a>(&'a self, name: &'a str) -> BoxFuture<'a, u64> {
        Box::pin(async move {
            let topic = self.topics.lock().unwrap()[name].clone();
            let published = self
                .published
                .lock()
                .unwrap()
                .get(&topic)
                .copied()
                .unwrap_or(0);
            let committed =
                tidings_tests::kafka_committed(&self.server.brokers, name, &topic).await;
            (published - committed).max(0) as u64
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_adapter_passes_the_runner_conformance_suite() {
    let server = KafkaServer::start().await;
    let sink = sink(&server.brokers).await;
    runner_conformance(&KafkaConsumers {
        server,
        sink,
        published: Default::default(),
        topics: Default::default(),
    })
    .await;
}

/// Chaos on Kafka: 10,000 payments (CHAOS_PAYMENTS) from 4 producers while 2 `tidings relay
/// --sink kafka` processes and 2 Kafka card services are SIGKILLed at random moments (every
/// 0.5-2 s, while producing and until half the cards are issued) and restarted, and the broker
/// freezes once for longer than the group's session timeout. Then: every committed payment has exactly one card, nothing
/// was dead-lettered, and in the topic each customer's payments first appear in order
/// (re-sends, which Kafka keeps, come after the original). After the chaos, a partition the
/// test broker leaves without a live owner for 15 s gets one by a fresh member's join (a tansu
/// quirk, see KafkaServer::start; [`GroupWatch`]; counted and printed).
///
/// CHAOS_LOG_DIR=DIR writes each card service's adapter log (assignments, cursors, records,
/// commits) there; on failure the test prints where the records of payments without a card are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_chaos_every_payment_gets_exactly_one_card() {
    use rand::Rng;
    use std::process::{Command, Stdio};
    use std::time::Instant;
    use tidings_examples::{charge, PaymentSucceeded, Verdict, SCHEMA};
    use tidings_outbox::Outbox;
    use tidings_tests::TestDb;

    const CARD_SERVICE: &str = env!("CARGO_BIN_EXE_card-service");
    let tidings = std::path::PathBuf::from(CARD_SERVICE).with_file_name("tidings");
    assert!(tidings.exists(), "{} is missing", tidings.display());
    let payments: usize = std::env::var("CHAOS_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let producers = 4;
    let (db, kafka) = (TestDb::migrated().await, KafkaServer::start().await);
    let c = db.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    // The topic exists before anyone consumes.
    drop(
        KafkaSink::connect(KafkaSinkConfig {
            brokers: kafka.brokers.clone(),
            topic_template: "payment.succeeded".into(),
            create_topics: true,
            partitions: 3,
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let brokers = kafka.brokers.clone();
    let relay = || -> KillOnDrop {
        // One record per produce batch: the test broker's memory storage skips the rest of a
        // batch when a group resumes from an offset inside it (KafkaServer::start).
        KillOnDrop(tidings_tests::chaos_relay(
            &tidings,
            &db.url,
            &[
                "--sink",
                "kafka",
                "--heartbeat-interval",
                "200ms",
                "--kafka-brokers",
                &brokers,
                "--kafka-config",
                "batch.num.messages=1",
            ],
            &[],
        ))
    };
    // Each card service logs its adapter's assignments to a file (what the group watchdog
    // below reads); with CHAOS_LOG_DIR, in that directory and at trace level (cursors, records
    // and commits too), for tracing a lost record.
    let log_dir = std::env::var("CHAOS_LOG_DIR").ok();
    let (dir, filter) = match &log_dir {
        Some(d) => (std::path::PathBuf::from(d), "tidings_inbox=trace"),
        None => (
            std::env::temp_dir().join(format!("tidings-kafka-chaos-{}", uuid::Uuid::now_v7())),
            "tidings_inbox::kafka=debug",
        ),
    };
    std::fs::create_dir_all(&dir).unwrap();
    let spawned = std::cell::Cell::new(0);
    let card_logs = std::cell::RefCell::new(HashMap::<u32, std::path::PathBuf>::new());
    let card_service = || -> KillOnDrop {
        spawned.set(spawned.get() + 1);
        let log = dir.join(format!("card-{}.log", spawned.get()));
        let child = Command::new(CARD_SERVICE)
            .env("DATABASE_URL", &db.url)
            .env("KAFKA_BROKERS", &brokers)
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("CARD_LOG", filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        card_logs.borrow_mut().insert(child.id(), log);
        KillOnDrop(child)
    };
    let mut relays: Vec<KillOnDrop> = (0..2).map(|_| relay()).collect();
    let mut cards: Vec<KillOnDrop> = (0..2).map(|_| card_service()).collect();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let url = db.url.clone();
        let per = payments / producers;
        tasks.push(tokio::spawn(async move {
            let mut c = tidings_tests::connect(&url).await;
            let outbox = Outbox::default();
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
    // Generous: a pass takes 20-90 s here (the longer ones on a loaded machine, with 50 kills).
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut kills, mut broker_frozen) = (0, false);
    let mut watch = GroupWatch::default();
    loop {
        let v = Verdict::read(&c).await.unwrap();
        let produced = tasks.iter().all(|t| t.is_finished());
        if produced && v.payments as usize == payments && v.cards >= v.payments {
            break;
        }
        if Instant::now() > deadline + UNHELD * watch.joins {
            let state = c
                .query_one(
                    "SELECT (SELECT count(*) FROM tidings.outbox), (SELECT count(*) FROM tidings.dead_letters),
                            (SELECT string_agg(DISTINCT left(last_error, 200), ' | ') FROM tidings.inbox_dead_letters),
                            (SELECT count(*) FROM tidings.inbox_dead_letters)",
                    &[],
                )
                .await
                .unwrap();
            let all = tidings_tests::kafka_records_at(&kafka.brokers).await;
            let records = all.len();
            let missing: Vec<String> = c
                .query(
                    "SELECT p.id FROM payments p WHERE NOT EXISTS (SELECT 1 FROM cards c WHERE c.payment_id = p.id)",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            // Where each missing payment's records are: (partition, offset).
            let in_topic: Vec<(String, Vec<(i32, i64)>)> = missing
                .iter()
                .map(|m| {
                    let at = all
                        .iter()
                        .filter(|(_, (_, _, h, _))| h.get("Tidings-Biz-Id") == Some(m))
                        .map(|(at, _)| *at)
                        .collect();
                    (m.clone(), at)
                })
                .collect();
            let inboxed: i64 = c
                .query_one(
                    "SELECT count(*) FROM tidings.inbox WHERE biz_id = ANY($1)",
                    &[&missing],
                )
                .await
                .unwrap()
                .get(0);
            eprintln!(
                "{} missing cards, the first: {:?}; of them recorded in the inbox: {inboxed}",
                in_topic.len(),
                &in_topic[..in_topic.len().min(20)]
            );
            let committed =
                tidings_tests::kafka_committed(&kafka.brokers, "card-service", "payment.succeeded")
                    .await;
            let held = watch.tend(&mut cards, &card_logs, &card_service);
            panic!(
                "no convergence within 180 s: {v:?}; outbox {}, dead letters {}, parked {} ({:?}); records {records}, committed {committed}; partitions held by live card services {held:?}, fresh joins {}; their logs in {}",
                state.get::<_, i64>(0),
                state.get::<_, i64>(1),
                state.get::<_, i64>(3),
                state.get::<_, Option<String>>(2),
                watch.joins,
                dir.display()
            );
        }
        // Chaos while producing and until half the cards are issued (and the broker has
        // frozen once: a fast run can pass a quarter and a half between two looks); then the
        // group settles (a killed member's partitions wait for its session to time out, 6 s).
        if produced && v.cards as usize > payments / 2 && broker_frozen {
            watch.tend(&mut cards, &card_logs, &card_service);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        // Once, a quarter of the way: the broker freezes (SIGSTOP) for 3-8 s, longer than
        // the group's session timeout, then thaws. (Not a restart: the test broker's memory
        // storage would lose the topic, which a real broker does not.) Relays see an outage
        // and must not burn attempts; on thaw the group's sessions expire and it rebalances.
        if !broker_frozen && v.cards as usize > payments / 4 {
            broker_frozen = true;
            kafka.signal("-STOP");
            tokio::time::sleep(Duration::from_millis(rand::rng().random_range(3000..8000))).await;
            kafka.signal("-CONT");
            continue;
        }
        let (list, fresh): (&mut Vec<KillOnDrop>, &dyn Fn() -> KillOnDrop) =
            if rand::rng().random_bool(0.5) {
                (&mut relays, &relay)
            } else {
                (&mut cards, &card_service)
            };
        let i = rand::rng().random_range(0..list.len());
        let _ = list[i].kill();
        let _ = list[i].wait();
        list[i] = fresh();
        kills += 1;
        let pause = rand::rng().random_range(500..2000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Rows whose publish failed or timed out during the chaos (their record may be in the
    // topic already) wait out their backoff, up to a minute, and are sent again: the relays
    // stay up until the outbox is empty (seen once: every card issued, a row still waiting).
    tidings_tests::eventually("the outbox drained", Duration::from_secs(90), || async {
        c.query_one("SELECT count(*) = 0 FROM tidings.outbox", &[])
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    // Chaos over: the card services work off what killed members had not committed.
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let records = tidings_tests::kafka_records(&kafka.brokers).await.len() as i64;
        let committed =
            tidings_tests::kafka_committed(&kafka.brokers, "card-service", "payment.succeeded")
                .await;
        if committed >= records {
            break;
        }
        let held = watch.tend(&mut cards, &card_logs, &card_service);
        assert!(
            Instant::now() < end + UNHELD * watch.joins,
            "the card-service group committed {committed} of {records} records within 90 s; partitions held by live card services {held:?}; their logs in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop((relays, cards));
    let v = Verdict::read(&c).await.unwrap();
    eprintln!(
        "kafka chaos: {} payments in {:.1?}, {kills} SIGKILLs, {} fresh joins for unheld partitions; cards {}, duplicates absorbed by the inbox {}",
        v.payments,
        started.elapsed(),
        watch.joins,
        v.cards,
        v.absorbed
    );
    assert_eq!(v.payments as usize, payments);
    assert!(v.exactly_once(), "{v:?}");
    let left: i64 = c
        .query_one("SELECT count(*) FROM tidings.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let dead: i64 = c
        .query_one("SELECT count(*) FROM tidings.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "the broker outage dead-lettered messages");
    assert!(broker_frozen);

    // Per-key order in the topic: each customer's payments first appear in n order.
    let mut next: HashMap<String, i64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (_, _, h, payload) in tidings_tests::kafka_records(&kafka.brokers).await {
        if !seen.insert(h["Tidings-Message-Id"].clone()) {
            continue; // a re-send Kafka kept: the inbox absorbed it
        }
        let e: PaymentSucceeded = serde_json::from_slice(&payload).unwrap();
        let want = next.entry(e.customer.clone()).or_insert(0);
        assert_eq!(e.n, *want, "customer {} out of order", e.customer);
        *want += 1;
    }
    assert_eq!(seen.len(), payments);
    assert_eq!(next.len(), producers * 25);
    if log_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// How long a partition may be without a live owner before [`GroupWatch`] acts: twice the
/// card services' session timeout (6 s), plus time for a slow rebalance.
const UNHELD: Duration = Duration::from_secs(15);

/// After the chaos, watches which partitions the live card services hold, by their own logs.
/// The test broker's group coordinator can leave a partition without a live owner for good (see
/// `KafkaServer::start`; Kafka rebalances then): a partition unheld for [`UNHELD`] gets a fresh
/// member's join, which makes tansu rebalance, at most 3 times. Members are only ever added,
/// never replaced: a member that holds partitions but is stuck still fails the test, and so
/// does a card service that exits by itself.
#[derive(Default)]
struct GroupWatch {
    unheld_since: std::collections::BTreeMap<i32, std::time::Instant>,
    joins: u32,
}

impl GroupWatch {
    /// One look (every half second): the partitions the live card services hold now.
    fn tend(
        &mut self,
        cards: &mut Vec<tidings_tests::KillOnDrop>,
        logs: &std::cell::RefCell<HashMap<u32, std::path::PathBuf>>,
        spawn: &dyn Fn() -> tidings_tests::KillOnDrop,
    ) -> std::collections::BTreeSet<i32> {
        for c in cards.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("a card service exited by itself ({status})");
            }
        }
        let held = {
            let logs = logs.borrow();
            held_partitions(cards.iter().filter_map(|c| logs.get(&c.id())))
        };
        let now = std::time::Instant::now();
        self.unheld_since.retain(|p, _| !held.contains(p));
        for p in (0..3).filter(|p| !held.contains(p)) {
            self.unheld_since.entry(p).or_insert(now);
        }
        let due: Vec<i32> = self
            .unheld_since
            .iter()
            .filter(|(_, since)| since.elapsed() > UNHELD)
            .map(|(p, _)| *p)
            .collect();
        if !due.is_empty() && self.joins < 3 {
            eprintln!(
                "kafka chaos: partitions {due:?} without a live owner for {UNHELD:?} (the test broker left them to a member that is gone); a fresh card service joins the group"
            );
            cards.push(spawn());
            self.joins += 1;
            self.unheld_since.clear();
        }
        held
    }
}

/// The partitions the card services whose logs are `logs` hold now, by their Kafka adapters'
/// "partition assigned" and "partition revoked" lines (complete lines only: a file may be
/// mid-write).
fn held_partitions<'a>(
    logs: impl Iterator<Item = &'a std::path::PathBuf>,
) -> std::collections::BTreeSet<i32> {
    let mut held = std::collections::BTreeSet::new();
    for log in logs {
        let bytes = std::fs::read(log).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let mut mine = std::collections::BTreeSet::new();
        for line in complete.lines() {
            let Some(p) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("partition="))
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            if line.contains("partition assigned") {
                mine.insert(p);
            } else if line.contains("partition revoked") {
                mine.remove(&p);
            }
        }
        held.extend(mine);
    }
    held
}

/// A Kafka topic name the template makes too long (the schema allows Tidings topics of 200
/// characters; Kafka refuses names over 249) is a permanent failure of that message, naming the
/// flag, and the sink goes on delivering the others.
#[tokio::test(flavor = "multi_thread")]
async fn a_topic_name_kafka_refuses_is_a_permanent_failure_of_that_message() {
    let kafka = KafkaServer::start().await;
    let sink = KafkaSink::connect(KafkaSinkConfig {
        brokers: kafka.brokers.clone(),
        topic_template: format!("{}.{{topic}}", "p".repeat(60)),
        create_topics: true,
        partitions: 1,
        delivery_timeout: Duration::from_millis(800),
        ..Default::default()
    })
    .await
    .unwrap();
    let envelope = |topic: String| Envelope {
        seq: 0,
        message: tidings_outbox::WireMessage {
            id: tidings_outbox::MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic,
            key: None,
            biz_id: None,
            payload: bytes::Bytes::from_static(b"{}"),
            headers: Default::default(),
            created_at: None,
            attempts: 0,
        },
    };
    let long = envelope("t".repeat(200));
    let short = envelope("payment.succeeded".into());
    let results = sink.publish_batch(&[&long, &short]).await;
    match &results[0] {
        Err(e @ tidings_relay::SinkError::Permanent(_)) => {
            let text = e.to_string();
            assert!(text.contains("not a valid Kafka topic name"), "{text}");
            assert!(text.contains("--kafka-topic-template"), "{text}");
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert!(results[1].is_ok(), "{:?}", results[1]);
    let records = tidings_tests::kafka_records(&kafka.brokers).await;
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0].0,
        format!("{}.payment.succeeded", "p".repeat(60))
    );
}
