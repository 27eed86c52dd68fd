//! Chaos: 10,000 payments from 4 concurrent producers while 2 relay processes (`tidings relay`)
//! and 2 card-service processes are killed with SIGKILL at random moments and restarted, and
//! the NATS server is restarted once. Then: every committed payment has exactly one card, no
//! card lacks a payment, per-key order held in the stream, and duplicates were absorbed
//! (proof that the faults really hit in-flight work).
//!
//! Sizes can be changed with CHAOS_PAYMENTS (default 10000).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use rand::Rng;
use tidings_examples::{charge, PaymentSucceeded, Verdict, SCHEMA};
use tidings_outbox::Outbox;
use tidings_relay::sink::{NatsSink, NatsSinkConfig};
use tidings_tests::{NatsServer, TestDb};

const CARD_SERVICE: &str = env!("CARGO_BIN_EXE_card-service");

/// The `tidings` binary sits next to `card-service` in cargo's target folder; `cargo test
/// --workspace` builds it for the relay's own process tests.
fn tidings_bin() -> PathBuf {
    let p = PathBuf::from(CARD_SERVICE).with_file_name("tidings");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p tidings-relay` (or `cargo test --workspace`)",
        p.display()
    );
    p
}

struct Fleet {
    db_url: String,
    nats_url: String,
    relays: Vec<Child>,
    cards: Vec<Child>,
    kills: usize,
}

impl Fleet {
    fn relay(&self) -> Child {
        Command::new(tidings_bin())
            .args([
                "relay",
                "--sink",
                "nats",
                "--batch-size",
                "200",
                "--heartbeat-interval",
                "200ms",
            ])
            .args(["--nats-url", &self.nats_url])
            .env("DATABASE_URL", &self.db_url)
            .env("TIDINGS_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn card_service(&self) -> Child {
        Command::new(CARD_SERVICE)
            .env("DATABASE_URL", &self.db_url)
            .env("NATS_URL", &self.nats_url)
            .env("CARD_ACK_WAIT_MS", "1500")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// SIGKILLs one random process and starts a replacement.
    fn strike(&mut self) {
        let relay = rand::rng().random_bool(0.5);
        let (list, i) = if relay {
            let i = rand::rng().random_range(0..self.relays.len());
            (&mut self.relays, i)
        } else {
            let i = rand::rng().random_range(0..self.cards.len());
            (&mut self.cards, i)
        };
        let _ = list[i].kill();
        let _ = list[i].wait();
        let fresh = if relay {
            self.relay()
        } else {
            self.card_service()
        };
        let list = if relay {
            &mut self.relays
        } else {
            &mut self.cards
        };
        list[i] = fresh;
        self.kills += 1;
    }

    fn stop(&mut self) {
        for c in self.relays.iter_mut().chain(self.cards.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_every_payment_gets_exactly_one_card() {
    let payments: usize = std::env::var("CHAOS_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let producers = 4;
    let (db, mut nats) = (TestDb::migrated().await, NatsServer::start().await);
    let c = db.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    // The stream exists before anyone consumes (the relay would create it too).
    drop(
        NatsSink::connect(NatsSinkConfig {
            url: nats.url.clone(),
            ..Default::default()
        })
        .await
        .unwrap(),
    );

    let mut fleet = Fleet {
        db_url: db.url.clone(),
        nats_url: nats.url.clone(),
        relays: vec![],
        cards: vec![],
        kills: 0,
    };
    fleet.relays = (0..2).map(|_| fleet.relay()).collect();
    fleet.cards = (0..2).map(|_| fleet.card_service()).collect();

    // Producers: each owns 25 customers (ordering keys) and charges them in turn, one
    // transaction per payment, so each key's payments commit one after the other.
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

    // Chaos while producing and consuming: a SIGKILL every 0.3-1.2 s, NATS restarted once.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut nats_restarted = false;
    loop {
        let v = Verdict::read(&c).await.unwrap();
        let produced = tasks.iter().all(|t| t.is_finished());
        if produced && v.payments as usize == payments && v.cards >= v.payments {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence within 240 s: {v:?}"
        );
        if !nats_restarted && v.cards as usize > payments / 3 {
            nats.restart().await; // kill -9 and start again on the same port and store
            nats_restarted = true;
        } else {
            fleet.strike();
        }
        let pause = rand::rng().random_range(300..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Chaos over. Let the card services work off every redelivery of messages a killed consumer
    // had committed but not acked: they must be recognised as duplicates, not issue cards.
    let js = jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    tidings_tests::eventually(
        "every message acked by the card service",
        Duration::from_secs(60),
        || async {
            let mut consumer: jetstream::consumer::PullConsumer = js
                .get_stream("TIDINGS")
                .await
                .unwrap()
                .get_consumer("card-service")
                .await
                .unwrap();
            let info = consumer.info().await.unwrap();
            info.num_ack_pending == 0 && info.num_pending == 0
        },
    )
    .await;
    fleet.stop();
    let v = Verdict::read(&c).await.unwrap();
    let upper: i64 = c
        .query_one(
            "SELECT coalesce(sum(duplicates), 0)::bigint FROM tidings.relays",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "chaos: {} payments in {:.1?}, {} SIGKILLs, NATS restarted: {nats_restarted}; cards {}, \
         duplicates absorbed: upper half (JetStream, reported by relays) >= {upper}, lower half (inbox) {}",
        v.payments, started.elapsed(), fleet.kills, v.cards, v.absorbed
    );
    assert!(nats_restarted);
    assert_eq!(v.payments as usize, payments);
    assert!(v.exactly_once(), "{v:?}");
    assert!(
        upper + v.absorbed > 0,
        "faults hit in-flight work: duplicates were absorbed"
    );
    let left: i64 = c
        .query_one("SELECT count(*) FROM tidings.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // Per-key order in the stream: each customer's payments appear in n order, each once.
    let stored = tidings_tests::stream_messages(&nats.url, "TIDINGS").await;
    assert_eq!(stored.len(), payments, "JetStream dropped every re-send");
    let mut next: BTreeMap<String, i64> = BTreeMap::new();
    for m in stored {
        let e: PaymentSucceeded = serde_json::from_slice(&m.payload).unwrap();
        let want = next.entry(e.customer.clone()).or_insert(0);
        assert_eq!(e.n, *want, "customer {} out of order", e.customer);
        *want += 1;
    }
    assert_eq!(next.len(), producers * 25);
}
