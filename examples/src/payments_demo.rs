//! The payments demo: a payment service charges cards and, in the SAME transaction, enqueues
//! `payment.succeeded` with biz-id = payment id; the relay delivers to NATS JetStream.
//!
//! It injects the fault that creates duplicates in the upper half (the relay dies after
//! publishing, before recording delivery) and shows JetStream dropping every re-send by message
//! id. It also rolls back a payment and shows its message never leaves. Exits non-zero unless
//! the stream holds exactly one `payment.succeeded` per committed payment.
//!
//! Needs only the local PostgreSQL and NATS (with JetStream); creates the database
//! `tidings_demo` (dropped and recreated on each run) and a stream of its own.
//! Environment: `DEMO_PG` (server URL, default postgres://postgres@127.0.0.1:5432),
//! `DEMO_NATS` (default nats://127.0.0.1:4222), `DEMO_PAYMENTS` (default 1000).
//!
//! The card service (consumer with the inbox, one membership card per payment) is the next
//! step of the demo and is not built yet.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::BoxFuture;
use futures::StreamExt;
use tidings_outbox::{Message, Outbox};
use tidings_relay::sink::{NatsSink, NatsSinkConfig, StreamSetup};
use tidings_relay::{Delivery, Envelope, Relay, RelayConfig, Sink, SinkError};
use tokio_postgres::NoTls;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(serde::Serialize)]
struct PaymentSucceeded<'a> {
    payment_id: &'a str,
    customer: &'a str,
    cents: i64,
}

/// Publishes through the real NATS sink and signals once `limit` publishes have gone out, so the
/// demo can "kill" the relay at exactly that moment: after publishing, before recording.
struct CrashAfter {
    inner: NatsSink,
    published: AtomicUsize,
    limit: usize,
    reached: tokio::sync::Notify,
}

impl Sink for CrashAfter {
    fn name(&self) -> &'static str {
        "nats"
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

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDINGS_LOG")
                .unwrap_or_else(|_| "warn,tokio_postgres=error".into()),
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
    let server =
        std::env::var("DEMO_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let nats_url = std::env::var("DEMO_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let payments: usize = std::env::var("DEMO_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);

    // 1. A fresh database with the Tidings schema and the payment service's own table.
    let admin = connect(&format!("{server}/postgres")).await?;
    admin
        .batch_execute("DROP DATABASE IF EXISTS tidings_demo WITH (FORCE)")
        .await?;
    admin.batch_execute("CREATE DATABASE tidings_demo").await?;
    let db_url = format!("{server}/tidings_demo");
    let mut db = connect(&db_url).await?;
    let applied = tidings_migrations::postgres::up(&mut db).await?;
    db.batch_execute(
        "CREATE TABLE payments (id text PRIMARY KEY, customer text NOT NULL, cents bigint NOT NULL)",
    )
    .await?;
    println!("migrated tidings_demo ({} migration(s))", applied.len());

    // A subject prefix of this run's own, so earlier runs' messages do not count.
    let prefix = format!("demo{}", std::process::id());

    // 2. The payment service: business row + outbox message, one transaction each.
    let outbox = Outbox::default();
    let started = Instant::now();
    for i in 0..payments {
        let (id, customer) = (format!("pay_{i:05}"), format!("cust_{}", i % 50));
        let tx = db.transaction().await?;
        tx.execute(
            "INSERT INTO payments (id, customer, cents) VALUES ($1, $2, $3)",
            &[&id, &customer, &4200i64],
        )
        .await?;
        let msg = Message::json(
            "payment.succeeded",
            &PaymentSucceeded {
                payment_id: &id,
                customer: &customer,
                cents: 4200,
            },
        )?
        .biz_id(id.as_str())
        .key(customer.as_str());
        outbox.enqueue_pg(&tx, &msg).await?;
        tx.commit().await?;
    }
    // A payment whose transaction fails: neither the row nor the message may survive.
    let tx = db.transaction().await?;
    tx.execute(
        "INSERT INTO payments VALUES ('pay_declined', 'cust_x', 1)",
        &[],
    )
    .await?;
    outbox
        .enqueue_pg(
            &tx,
            &Message::json(
                "payment.succeeded",
                &PaymentSucceeded {
                    payment_id: "pay_declined",
                    customer: "cust_x",
                    cents: 1,
                },
            )?
            .biz_id("pay_declined"),
        )
        .await?;
    tx.rollback().await?;
    println!(
        "charged {payments} payments in {:.2?} (one transaction each: payment row + outbox message); 1 rolled back",
        started.elapsed()
    );

    // 3. The relay, first run: it dies after publishing 300 messages, before recording them.
    let pool =
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(db_url.parse()?, NoTls))
            .max_size(4)
            .build()?;
    let crashing = Arc::new(CrashAfter {
        inner: NatsSink::connect(nats_config(&nats_url, &prefix)).await?,
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
    println!(
        "relay crashed after {} acknowledged publishes (more were in flight), before recording any delivery",
        crashing.published.load(Ordering::SeqCst)
    );

    // 4. A new relay takes over and re-sends; JetStream drops re-sends by Nats-Msg-Id.
    let relay = Relay::new(
        pool.clone(),
        Arc::new(NatsSink::connect(nats_config(&nats_url, &prefix)).await?),
        config,
    )?;
    let (mut delivered, mut duplicates) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = relay.tick().await?;
        delivered += r.delivered;
        duplicates += r.duplicates;
        let left: i64 = db
            .query_one("SELECT count(*) FROM tidings.outbox", &[])
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{left} messages still undelivered after 120 s").into());
        }
    }
    println!("relay restarted: delivered {delivered}, of which {duplicates} re-sends JetStream dropped as duplicates");

    // 5. What the broker holds: exactly one message per committed payment.
    let js = jetstream::new(async_nats::connect(&nats_url).await?);
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
    let mut msgs = consumer.messages().await?;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), msgs.next()).await {
        let m = m?;
        stored += 1;
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        seen.insert(v["payment_id"].as_str().unwrap_or_default().to_owned());
    }
    let committed: i64 = db
        .query_one("SELECT count(*) FROM payments", &[])
        .await?
        .get(0);
    let ok = stored == payments
        && seen.len() == payments
        && committed as usize == payments
        && !seen.contains("pay_declined");
    println!("payments committed:            {committed}");
    println!(
        "messages stored in JetStream:  {stored} ({} distinct payments)",
        seen.len()
    );
    println!("upper-half duplicates dropped: {duplicates}");
    println!(
        "rolled-back payment delivered: {}",
        seen.contains("pay_declined")
    );
    println!(
        "{}",
        if ok {
            "OK: exactly one payment.succeeded per committed payment"
        } else {
            "FAILED: the broker does not hold exactly one message per payment"
        }
    );
    Ok(ok)
}
