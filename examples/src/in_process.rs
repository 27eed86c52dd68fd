//! A service that runs its own relay inside its process, next to its handlers: no `tidings
//! relay` daemon to deploy. The payment service's requests write payments with their outbox
//! messages; a relay task in the same process delivers them to NATS JetStream; the card
//! service's consumer, also in this process, issues one card per payment. On SIGTERM or Ctrl-C
//! (or once every card is issued) one cancellation token stops both, and each finishes its
//! work in flight within its own deadline (`shutdown_timeout`).
//!
//! Environment: `DEMO_PG` (server URL, default postgres://postgres@127.0.0.1:5432), `DEMO_NATS`
//! (default nats://127.0.0.1:4222), `DEMO_PAYMENTS` (default 500). Creates the database
//! `tidings_inproc` and the stream `TIDINGS_INPROC` (both recreated each run).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidings_examples::{charge, IssueCard, PaymentSucceeded, Verdict, SCHEMA};
use tidings_inbox::nats::{ConsumerConfig, NatsConsumer};
use tidings_outbox::Outbox;
use tidings_relay::sink::{NatsSink, NatsSinkConfig, StreamSetup};
use tidings_relay::{Relay, RelayConfig};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
            eprintln!("in-process service failed: {e}");
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
        .unwrap_or(500);

    // The service's database, migrated at start-up (safe with several instances at once).
    let (admin, conn) = tokio_postgres::connect(&format!("{server}/postgres"), NoTls).await?;
    tokio::spawn(conn);
    // Two statements: CREATE DATABASE cannot share an implicit transaction with another.
    admin
        .batch_execute("DROP DATABASE IF EXISTS tidings_inproc WITH (FORCE)")
        .await?;
    admin
        .batch_execute("CREATE DATABASE tidings_inproc")
        .await?;
    let db_url = format!("{server}/tidings_inproc");
    let (mut db, conn) = tokio_postgres::connect(&db_url, NoTls).await?;
    tokio::spawn(conn);
    tidings_migrations::postgres::up(&mut db).await?;
    db.batch_execute(SCHEMA).await?;
    let pool =
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(db_url.parse()?, NoTls))
            .max_size(8)
            .build()?;
    {
        let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await?);
        let _ = js.delete_stream("TIDINGS_INPROC").await;
    }

    // One token stops everything: a signal, or (for this demo) every card issued.
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            eprintln!("signal: shutting down");
            shutdown.cancel();
        }
    });

    // The relay, as a task of this process.
    let sink = NatsSink::connect(NatsSinkConfig {
        url: nats_url.clone(),
        subject_prefix: "inproc".into(),
        stream: StreamSetup::Create {
            name: "TIDINGS_INPROC".into(),
            duplicate_window: Duration::from_secs(120),
        },
        ..Default::default()
    })
    .await?;
    let relay = Arc::new(Relay::new(
        pool.clone(),
        Arc::new(sink),
        RelayConfig {
            name: "in-process".into(),
            listen: false,
            poll_interval: Duration::from_millis(50),
            shutdown_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )?);
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay.run(shutdown).await }
    });

    // The card service's consumer, as another task of this process.
    let consumer = Arc::new(
        NatsConsumer::new(
            pool.clone(),
            async_nats::connect(&nats_url).await?,
            ConsumerConfig {
                name: "card-service".into(),
                stream: "TIDINGS_INPROC".into(),
                filter_subject: "inproc.>".into(),
                ..Default::default()
            },
            Arc::new(IssueCard),
        )
        .await?,
    );
    let consumer_task = tokio::spawn({
        let (consumer, shutdown) = (consumer.clone(), shutdown.clone());
        async move { consumer.run(shutdown).await }
    });

    // The payment service's requests: payment row and outbox message in one transaction each.
    let outbox = Outbox::default();
    let started = Instant::now();
    for i in 0..payments {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        let event = PaymentSucceeded {
            payment_id: format!("pay_{i:05}"),
            customer: format!("cust_{}", i % 25),
            n: (i / 25) as i64,
            cents: 1999,
        };
        charge(&tx, &outbox, &event).await?;
        tx.commit().await?;
    }
    println!("charged {payments} payments in {:.2?}", started.elapsed());

    // Until every card is issued (or a signal), then the graceful shutdown.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !shutdown.is_cancelled() && Instant::now() < deadline {
        let cards: i64 = db
            .query_one("SELECT count(*) FROM cards", &[])
            .await?
            .get(0);
        if cards as usize >= payments {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    println!(
        "all cards issued after {:.2?}; shutting down",
        started.elapsed()
    );
    shutdown.cancel();
    let stopping = Instant::now();
    relay_task.await??;
    consumer_task.await??;
    println!(
        "relay and consumer stopped in {:.2?} (each within its shutdown_timeout)",
        stopping.elapsed()
    );
    let v = Verdict::read(&db).await?;
    let left: i64 = db
        .query_one("SELECT count(*) FROM tidings.outbox", &[])
        .await?
        .get(0);
    println!(
        "payments {}, cards {}, without a card {}, with several {}, outbox left {left}",
        v.payments, v.cards, v.without_card, v.with_several
    );
    let ok = v.exactly_once() && v.payments as usize == payments && left == 0;
    println!(
        "{}",
        if ok {
            "OK: one card per payment, relay and handlers in one process"
        } else {
            "FAILED"
        }
    );
    Ok(ok)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
