//! The payments story on RabbitMQ (`--broker rabbitmq`, cargo feature `rabbitmq`): the relay
//! dies after publishing, before recording, so its successor re-sends; RabbitMQ keeps both
//! messages (it has no dedup by message id), and the card service's inbox absorbs them. The
//! card service dies after committing cards, before acking, so RabbitMQ redelivers those
//! messages to its successor: absorbed too.
//!
//! Broker: `DEMO_AMQP` (default `amqp://127.0.0.1:5672/%2f`, guest/guest); the demo's exchange
//! `tidings-demo` and queue `card-service-demo` are deleted and recreated at every run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tidings_examples::{IssueCard, Verdict};
use tidings_inbox::rabbitmq::{QueueSetup, RabbitAdapter, RabbitConsumerConfig};
use tidings_inbox::runner::postgres::PgStore;
use tidings_inbox::runner::{Runner, RunnerConfig};
use tidings_relay::sink::{RabbitSink, RabbitSinkConfig};

use super::never_acks::NeverAcks;
use super::{demo_pool, relay_crashes_then_a_new_one_resends, run_until, BoxError};

const EXCHANGE: &str = "tidings-demo";
const QUEUE: &str = "card-service-demo";

/// The demo's own connection, for setting up and counting (never for the story's messages).
async fn admin(url: &str) -> Result<(lapin::Connection, lapin::Channel), BoxError> {
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
    .map_err(|_| "RabbitMQ did not answer within 10 s (DEMO_AMQP)")?
    .map_err(|e| format!("cannot connect to RabbitMQ (DEMO_AMQP): {e}"))?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

/// How many messages the card service's queue holds (ready, not delivered).
async fn queued(channel: &lapin::Channel) -> Result<u32, BoxError> {
    let q = channel
        .queue_declare(
            QUEUE.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    Ok(q.message_count())
}

fn consumer_config(url: &str) -> RabbitConsumerConfig {
    RabbitConsumerConfig {
        url: url.to_owned(),
        queue: QUEUE.into(),
        prefetch: 64,
        declare: Some(QueueSetup {
            exchange: EXCHANGE.into(),
            binding_keys: vec!["payment.succeeded".into()],
        }),
    }
}

pub(crate) async fn run(
    db_url: &str,
    db: &tokio_postgres::Client,
    payments: usize,
) -> Result<bool, BoxError> {
    let url = std::env::var("DEMO_AMQP").unwrap_or_else(|_| "amqp://127.0.0.1:5672/%2f".into());

    // The demo's own exchange and queue, recreated at every run so only this run's messages
    // count. The sink declares the exchange; the card service's adapter declares its queue
    // and binds it before anything is published (an unbound publish would be unroutable).
    let (_admin_conn, admin) = admin(&url).await?;
    admin.queue_delete(QUEUE.into(), Default::default()).await?;
    admin
        .exchange_delete(EXCHANGE.into(), Default::default())
        .await?;
    let sink_config = RabbitSinkConfig {
        url: url.clone(),
        exchange: EXCHANGE.into(),
        declare_exchange: true,
        ..Default::default()
    };
    let first_sink = RabbitSink::connect(sink_config.clone()).await?;
    let doomed_cards = NeverAcks(RabbitAdapter::connect(&consumer_config(&url)).await?);

    // 3. The relay, first run: it dies after publishing 300 messages, before recording them.
    // 4. A new relay takes over and re-sends: RabbitMQ keeps the re-sends (no dedup by id).
    let pool = demo_pool(db_url)?;
    let (crashed_after, delivered, _) = relay_crashes_then_a_new_one_resends(
        &pool,
        db,
        Arc::new(first_sink),
        Arc::new(RabbitSink::connect(sink_config).await?),
        payments,
    )
    .await?;
    println!(
        "relay crashed after {crashed_after} confirmed publishes (more were in flight), before recording any delivery"
    );
    let stored = queued(&admin).await? as usize;
    println!(
        "relay restarted: delivered {delivered}; the queue holds {stored} messages (the re-sends twice: RabbitMQ cannot drop them)"
    );

    // 5. The card service, first run: it commits cards for the first 50 messages, then dies
    //    before acking any (its connection closes: RabbitMQ requeues them as redelivered).
    let runner_config = RunnerConfig {
        name: "card-service-demo".into(),
        ..Default::default()
    };
    let crash_after = 50.min(payments) as u64;
    {
        let doomed = Arc::new(Runner::new(
            doomed_cards,
            PgStore::new(pool.clone(), Arc::new(IssueCard)),
            runner_config.clone(),
        )?);
        let crashed = run_until(&doomed, Duration::from_secs(60), |s| {
            s.processed.load(Ordering::SeqCst) >= crash_after
        });
        if !crashed.await? {
            return Err("the card service's first run got no messages within 60 s".into());
        }
        println!(
            "card service crashed after committing {} cards, before acking any",
            doomed.stats().processed.load(Ordering::SeqCst)
        );
    }

    // 6. The card service restarts: RabbitMQ redelivers what the first run never acked, and the
    //    inbox absorbs every one it already applied.
    let cards_service = Arc::new(Runner::new(
        RabbitAdapter::connect(&consumer_config(&url)).await?,
        PgStore::new(pool.clone(), Arc::new(IssueCard)),
        runner_config,
    )?);
    // Until every message the broker held was handled (processed or absorbed), 120 s at most.
    run_until(&cards_service, Duration::from_secs(120), |s| {
        (s.processed.load(Ordering::SeqCst) + s.duplicates.load(Ordering::SeqCst)) as usize
            >= stored
    })
    .await?;
    let left = queued(&admin).await?;

    let v = Verdict::read(db).await?;
    let ok = v.exactly_once()
        && v.payments as usize == payments
        && stored >= payments
        && left == 0
        && v.orphan_cards == 0;
    println!("payments charged:                        {}", v.payments);
    println!("messages RabbitMQ held:                  {stored} ({left} left unconsumed)");
    println!("membership cards issued:                 {}", v.cards);
    println!(
        "payments without a card / with several:  {} / {}",
        v.without_card, v.with_several
    );
    println!(
        "duplicates absorbed by the inbox (relay re-sends and card-service redeliveries): {}",
        v.absorbed
    );
    println!(
        "cards for a payment never committed (the rolled-back one): {}",
        v.orphan_cards
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
