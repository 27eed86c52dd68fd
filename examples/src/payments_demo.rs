//! The payments demo: a payment service charges payments and, in the SAME transaction, enqueues
//! `payment.succeeded` with biz-id = payment id; the relay delivers to NATS JetStream; a card
//! service consumes with the inbox and issues one membership card per payment.
//!
//! It injects the two faults that create duplicates: the relay dies after publishing but
//! before recording delivery (re-send: JetStream drops it by message id), and the card service
//! dies after committing but before acking (redelivery: the inbox drops it). It also rolls back
//! a payment and shows its message never leaves. Exits non-zero unless every payment has
//! exactly one card (and the stream exactly one message per payment).
//!
//! Needs only the local PostgreSQL and NATS (with JetStream); creates the database
//! `tidings_demo` (`DEMO_DB` to name another; dropped and recreated on each run) and a stream
//! of its own.
//! Environment: `DEMO_PG` (server URL, default postgres://postgres@127.0.0.1:5432),
//! `DEMO_NATS` (default nats://127.0.0.1:4222), `DEMO_PAYMENTS` (default 1000).
//! `--broker kafka` (feature `kafka`, `DEMO_KAFKA`), `--broker rabbitmq` (feature `rabbitmq`,
//! `DEMO_AMQP`) and `--broker redis` (feature `redis`, `DEMO_REDIS`) tell the same story on
//! those brokers; `--broker http` (feature `http`) tells it over signed HTTP webhooks to a card
//! service with the inbox's webhook receiver, no broker at all.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::BoxFuture;
use futures::StreamExt;
use tidings_examples::{charge, IssueCard, PaymentSucceeded, Verdict, SCHEMA};
use tidings_inbox::nats::{ConsumerConfig, Delivered, Handler, NatsConsumer};
use tidings_inbox::{DedupKey, Inbox, Recorded};
use tidings_outbox::Outbox;
use tidings_relay::sink::{NatsSink, NatsSinkConfig, StreamSetup};
use tidings_relay::{Delivery, Envelope, Relay, RelayConfig, Sink, SinkError};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Publishes through the real NATS sink and signals once `limit` publishes have gone out, so the
/// demo can "kill" the relay at exactly that moment: after publishing, before recording.
struct CrashAfter {
    inner: Arc<dyn Sink>,
    published: AtomicUsize,
    limit: usize,
    reached: tokio::sync::Notify,
}

impl Sink for CrashAfter {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let d = self.inner.publish(msg).await?;
            if self.published.fetch_add(1, Ordering::SeqCst) + 1 == self.limit {
                self.reached.notify_one();
            }
            Ok(d)
        })
    }
}

/// Ticks `relay` until the outbox is empty (120 s at most), backing off as the daemon would
/// while the broker is unavailable; returns (delivered, duplicates the broker dropped).
async fn relay_until_empty(
    relay: &Relay,
    db: &tokio_postgres::Client,
) -> Result<(usize, usize), BoxError> {
    let (mut delivered, mut duplicates) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = relay.tick().await?;
        delivered += r.delivered;
        duplicates += r.duplicates;
        if let Some(pause) = relay.sink_backoff() {
            tokio::time::sleep(pause).await;
        }
        let left: i64 = db
            .query_one("SELECT count(*) FROM tidings.outbox", &[])
            .await?
            .get(0);
        if left == 0 {
            return Ok((delivered, duplicates));
        }
        if Instant::now() > deadline {
            return Err(format!("{left} messages still undelivered after 120 s").into());
        }
    }
}

/// Steps 3 and 4 of every story: a relay publishing through `first` dies once 300 messages
/// (or all) are acknowledged, before recording any delivery; a new relay publishing through
/// `second` takes over and re-sends. Returns (publishes acknowledged before the crash,
/// delivered by the new relay, re-sends the broker dropped).
async fn relay_crashes_then_a_new_one_resends(
    pool: &deadpool_postgres::Pool,
    db: &tokio_postgres::Client,
    first: Arc<dyn Sink>,
    second: Arc<dyn Sink>,
    payments: usize,
) -> Result<(usize, usize, usize), BoxError> {
    let crashing = Arc::new(CrashAfter {
        inner: first,
        published: AtomicUsize::new(0),
        limit: 300.min(payments),
        reached: tokio::sync::Notify::new(),
    });
    let config = RelayConfig {
        batch_size: 500,
        ..Default::default()
    };
    let doomed = Relay::new(pool.clone(), crashing.clone(), config.clone())?;
    tokio::select! {
        r = doomed.tick() => { r?; }
        _ = crashing.reached.notified() => {}
    }
    drop(doomed);
    let crashed_after = crashing.published.load(Ordering::SeqCst);
    let relay = Relay::new(pool.clone(), second, config)?;
    let (delivered, duplicates) = relay_until_empty(&relay, db).await?;
    Ok((crashed_after, delivered, duplicates))
}

/// Runs `runner` until `done` holds for its counters or `within` passes, then stops it and
/// waits for it; returns whether `done` held.
#[cfg(any(feature = "kafka", feature = "rabbitmq", feature = "redis"))]
async fn run_until<A, S>(
    runner: &Arc<tidings_inbox::runner::Runner<A, S>>,
    within: Duration,
    done: impl Fn(&tidings_inbox::runner::ConsumerStats) -> bool,
) -> Result<bool, BoxError>
where
    A: tidings_inbox::runner::Adapter,
    S: tidings_inbox::runner::Store,
{
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (r, stop) = (runner.clone(), stop.clone());
        async move { r.run(stop).await }
    });
    let deadline = Instant::now() + within;
    let reached = loop {
        if done(runner.stats()) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    task.await??;
    Ok(reached)
}

fn demo_pool(db_url: &str) -> Result<deadpool_postgres::Pool, BoxError> {
    Ok(
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(db_url.parse()?, NoTls))
            .max_size(4)
            .build()?,
    )
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, BoxError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

fn nats_config(url: &str, prefix: &str) -> NatsSinkConfig {
    NatsSinkConfig {
        url: url.into(),
        subject_prefix: prefix.into(),
        stream: StreamSetup::Create {
            name: "TIDINGS_DEMO".into(),
            duplicate_window: Duration::from_secs(120),
        },
        ..Default::default()
    }
}

#[cfg(feature = "http")]
mod http_story;
#[cfg(feature = "kafka")]
mod kafka_story;
#[cfg(any(feature = "kafka", feature = "rabbitmq", feature = "redis"))]
mod never_acks;
#[cfg(feature = "rabbitmq")]
mod rabbit_story;
#[cfg(feature = "redis")]
mod redis_story;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDINGS_LOG")
                // lapin off: the RabbitMQ adapter's passive queue check logs a channel-close
                // ERROR when the queue does not exist yet (first run); failures surface as the
                // demo's own errors.
                .unwrap_or_else(|_| "warn,tokio_postgres=error,lapin=off".into()),
        )
        .init();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<bool, BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let broker = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] | ["--broker", "nats"] => "nats",
        ["--broker", "kafka"] => "kafka",
        ["--broker", "rabbitmq"] => "rabbitmq",
        ["--broker", "redis"] => "redis",
        ["--broker", "http"] => "http",
        _ => return Err("usage: payments-demo [--broker nats|kafka|rabbitmq|redis|http]".into()),
    };
    let server =
        std::env::var("DEMO_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let payments: usize = std::env::var("DEMO_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let db_url = prepare(&server).await?;
    let mut db = connect(&db_url).await?;
    if broker == "kafka" {
        #[cfg(feature = "kafka")]
        {
            charge_all(&mut db, payments).await?;
            return kafka_story::run(&db_url, &db, payments).await;
        }
        #[cfg(not(feature = "kafka"))]
        return Err(
            "this build has no Kafka: cargo run -p tidings-examples --features kafka --bin payments-demo -- --broker kafka (or bash examples/kafka-demo.sh)".into(),
        );
    }
    if broker == "rabbitmq" {
        #[cfg(feature = "rabbitmq")]
        {
            charge_all(&mut db, payments).await?;
            return rabbit_story::run(&db_url, &db, payments).await;
        }
        #[cfg(not(feature = "rabbitmq"))]
        return Err(
            "this build has no RabbitMQ: cargo run -p tidings-examples --features rabbitmq --bin payments-demo -- --broker rabbitmq".into(),
        );
    }
    if broker == "redis" {
        #[cfg(feature = "redis")]
        {
            charge_all(&mut db, payments).await?;
            return redis_story::run(&db_url, &db, payments).await;
        }
        #[cfg(not(feature = "redis"))]
        return Err(
            "this build has no Redis: cargo run -p tidings-examples --features redis --bin payments-demo -- --broker redis".into(),
        );
    }
    if broker == "http" {
        #[cfg(feature = "http")]
        {
            charge_all(&mut db, payments).await?;
            return http_story::run(&db_url, &db, payments).await;
        }
        #[cfg(not(feature = "http"))]
        return Err(
            "this build has no HTTP webhooks: cargo run -p tidings-examples --features http --bin payments-demo -- --broker http".into(),
        );
    }
    let nats_url = std::env::var("DEMO_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    // The demo's own stream, emptied at every run so only this run's messages count.
    let prefix = "demo".to_owned();
    {
        let js = jetstream::new(async_nats::connect(&nats_url).await?);
        let _ = js.delete_stream("TIDINGS_DEMO").await;
    }
    charge_all(&mut db, payments).await?;
    nats_story(&db_url, &db, &nats_url, &prefix, payments).await
}

/// 1. A fresh database with the Tidings schema and the payment service's own table.
async fn prepare(server: &str) -> Result<String, BoxError> {
    let admin = connect(&format!("{server}/postgres")).await?;
    // A name of letters, digits and underscores only: it goes into DROP/CREATE DATABASE.
    let name = std::env::var("DEMO_DB").unwrap_or_else(|_| "tidings_demo".into());
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("DEMO_DB: 1-63 of a-z, 0-9 and _".into());
    }
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let db_url = format!("{server}/{name}");
    let mut db = connect(&db_url).await?;
    let applied = tidings_migrations::postgres::up(&mut db).await?;
    db.batch_execute(SCHEMA).await?;
    println!("migrated {name} ({} migration(s))", applied.len());
    Ok(db_url)
}

/// 2. The payment service: business row + outbox message, one transaction each; and one
///    payment rolled back.
async fn charge_all(db: &mut tokio_postgres::Client, payments: usize) -> Result<(), BoxError> {
    let outbox = Outbox::default();
    let started = Instant::now();
    for i in 0..payments {
        let event = PaymentSucceeded {
            payment_id: format!("pay_{i:05}"),
            customer: format!("cust_{}", i % 50),
            n: (i / 50) as i64,
            cents: 4200,
        };
        let tx = db.transaction().await?;
        charge(&tx, &outbox, &event).await?;
        tx.commit().await?;
    }
    // A payment whose transaction fails: neither the row nor the message may survive.
    let tx = db.transaction().await?;
    let declined = PaymentSucceeded {
        payment_id: "pay_declined".into(),
        customer: "cust_x".into(),
        n: 0,
        cents: 1,
    };
    charge(&tx, &outbox, &declined).await?;
    tx.rollback().await?;
    println!(
        "charged {payments} payments in {:.2?} (one transaction each: payment row + outbox message); 1 rolled back",
        started.elapsed()
    );
    Ok(())
}

/// 3-7 on NATS JetStream.
async fn nats_story(
    db_url: &str,
    db: &tokio_postgres::Client,
    nats_url: &str,
    prefix: &str,
    payments: usize,
) -> Result<bool, BoxError> {
    let (nats_url, prefix) = (nats_url.to_owned(), prefix.to_owned());
    // 3. The relay, first run: it dies after publishing 300 messages, before recording them.
    // 4. A new relay takes over and re-sends; JetStream drops re-sends by Nats-Msg-Id.
    let pool = demo_pool(db_url)?;
    let (crashed_after, delivered, duplicates) = relay_crashes_then_a_new_one_resends(
        &pool,
        db,
        Arc::new(NatsSink::connect(nats_config(&nats_url, &prefix)).await?),
        Arc::new(NatsSink::connect(nats_config(&nats_url, &prefix)).await?),
        payments,
    )
    .await?;
    println!(
        "relay crashed after {crashed_after} acknowledged publishes (more were in flight), before recording any delivery"
    );
    println!("relay restarted: delivered {delivered}, of which {duplicates} re-sends JetStream dropped as duplicates");

    // 5. What the broker holds: exactly one message per committed payment.
    let client = async_nats::connect(&nats_url).await?;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream("TIDINGS_DEMO").await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: format!("{prefix}.>"),
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut seen = HashSet::new();
    let mut stored = 0usize;
    let mut msgs = consumer.messages().await?.take(payments);
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), msgs.next()).await {
        let m = m?;
        stored += 1;
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        seen.insert(v["payment_id"].as_str().unwrap_or_default().to_owned());
    }

    // 6. The card service, first run: it commits cards for the first 100 messages, then dies
    //    before acking them.
    let card_config = ConsumerConfig {
        name: format!("card-service-{prefix}"),
        stream: "TIDINGS_DEMO".into(),
        filter_subject: format!("{prefix}.payment.succeeded"),
        ack_wait: Duration::from_secs(2),
        ..Default::default()
    };
    // Fewer than the consumer's max_ack_pending (16 x 8), so all arrive in one fetch.
    let crash_after = 100.min(payments);
    {
        let doomed = NatsConsumer::new(
            pool.clone(),
            client.clone(),
            card_config.clone(),
            Arc::new(IssueCard),
        )
        .await?;
        let inbox = Inbox::new(card_config.name.clone())?;
        let mut batch = doomed
            .pull_consumer()
            .fetch()
            .max_messages(crash_after)
            .messages()
            .await?;
        let mut pg = pool.get().await?;
        let mut committed = 0;
        while let Some(m) = batch.next().await {
            let m = m?;
            let d = Delivered::from_message(&m).ok_or("message without an id")?;
            let pg: &mut tokio_postgres::Client = &mut pg;
            let tx = pg.transaction().await?;
            if inbox
                .record_pg(&tx, &DedupKey::for_message(d.biz_id.as_deref(), d.id))
                .await?
                == Recorded::First
            {
                IssueCard.handle(&tx, &d).await.map_err(|e| e.to_string())?;
            }
            tx.commit().await?;
            committed += 1;
            // ...and no ack: the process "dies" here.
        }
        println!("card service crashed after committing {committed} cards, before acking them");
    }

    // 7. The card service restarts: JetStream redelivers the unacked messages after ack_wait;
    //    the inbox recognises them and skips the effect.
    let cards_service = Arc::new(
        NatsConsumer::new(
            pool.clone(),
            client.clone(),
            card_config,
            Arc::new(IssueCard),
        )
        .await?,
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (c, stop) = (cards_service.clone(), stop.clone());
        async move { c.run(stop).await }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = Verdict::read(db).await?;
        let s = cards_service.stats();
        let handled = s.processed.load(Ordering::SeqCst) + s.duplicates.load(Ordering::SeqCst);
        if v.cards as usize >= payments && handled as usize >= payments {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await??;

    let v = Verdict::read(db).await?;
    let ok = v.exactly_once()
        && v.payments as usize == payments
        && stored == payments
        && seen.len() == payments
        && !seen.contains("pay_declined");
    println!("payments charged:                        {}", v.payments);
    println!(
        "messages in JetStream:                   {stored} ({} distinct payments)",
        seen.len()
    );
    println!("membership cards issued:                 {}", v.cards);
    println!(
        "payments without a card / with several:  {} / {}",
        v.without_card, v.with_several
    );
    println!("duplicates absorbed, upper half (JetStream, by message id): {duplicates}");
    println!(
        "duplicates absorbed, lower half (inbox, by payment id):      {}",
        v.absorbed
    );
    println!(
        "rolled-back payment delivered:           {}",
        seen.contains("pay_declined")
    );
    println!(
        "{}",
        if ok {
            "OK: every payment has exactly one membership card"
        } else {
            "FAILED: not exactly one card per payment"
        }
    );
    Ok(ok)
}
