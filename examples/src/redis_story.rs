//! The payments story on Redis Streams (`--broker redis`, cargo feature `redis`): the relay dies
//! after publishing, before recording, so its successor re-sends; the stream keeps both entries
//! (Redis 7 has no dedup on XADD), and the card service's inbox absorbs them. The card service
//! dies after committing cards, before XACK, so the entries stay pending with its consumer
//! name; its successor, under the same name, reads its own pending entries first: absorbed too.
//!
//! Broker: `DEMO_REDIS` (default `redis://127.0.0.1:6379`); the demo's stream
//! `tidings-demo:payment.succeeded` (and with it its consumer group `card-service-demo`) is
//! deleted at the start of every run.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;
use tidings_examples::{IssueCard, Verdict, TOPIC};
use tidings_inbox::redis::{RedisAdapter, RedisConsumerConfig};
use tidings_inbox::runner::postgres::PgStore;
use tidings_inbox::runner::{Runner, RunnerConfig};
use tidings_relay::sink::{RedisSink, RedisSinkConfig};

use super::never_acks::NeverAcks;
use super::{demo_pool, relay_crashes_then_a_new_one_resends, run_until, BoxError};

const STREAM_TEMPLATE: &str = "tidings-demo:{topic}";
const GROUP: &str = "card-service-demo";
/// The card service's consumer name, the same for its restart: Redis keeps pending entries per
/// consumer name, and a consumer reads its own pending entries first when it opens.
const CONSUMER: &str = "card-service-demo-0";

fn stream() -> String {
    STREAM_TEMPLATE.replace("{topic}", TOPIC)
}

/// The demo's own connection, for setting up and counting (never for the story's messages).
async fn admin(url: &str) -> Result<MultiplexedConnection, BoxError> {
    let client = redis::Client::open(url)
        .map_err(|e| format!("DEMO_REDIS is not a Redis URL ({})", e.category()))?;
    Ok(tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "Redis did not answer within 10 s (DEMO_REDIS)")?
    .map_err(|e| format!("cannot connect to Redis (DEMO_REDIS): {e}"))?)
}

/// How many entries the stream holds (`XLEN`).
async fn stream_len(conn: &mut MultiplexedConnection) -> Result<u64, BoxError> {
    Ok(redis::cmd("XLEN").arg(stream()).query_async(conn).await?)
}

/// The card service's group: (entries delivered and not acked, entries not delivered yet).
async fn group_state(conn: &mut MultiplexedConnection) -> Result<(i64, i64), BoxError> {
    let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream())
        .query_async(conn)
        .await?;
    let g = groups
        .iter()
        .find(|g| matches!(g.get("name"), Some(Value::BulkString(n)) if n == GROUP.as_bytes()))
        .ok_or("the card service's consumer group is missing")?;
    let int = |k: &str| match g.get(k) {
        Some(Value::Int(i)) => Ok(*i),
        other => Err(format!("XINFO GROUPS: {k} is {other:?}")),
    };
    Ok((int("pending")?, int("lag")?))
}

fn consumer_config(url: &str) -> RedisConsumerConfig {
    RedisConsumerConfig {
        url: url.to_owned(),
        stream: stream(),
        group: GROUP.into(),
        consumer: CONSUMER.into(),
        ..Default::default()
    }
}

pub(crate) async fn run(
    db_url: &str,
    db: &tokio_postgres::Client,
    payments: usize,
) -> Result<bool, BoxError> {
    let url = std::env::var("DEMO_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());

    // The demo's own stream, deleted at every run (its consumer group goes with it) so only this
    // run's entries count. The card service's adapter creates the group, reading from the
    // stream's start, before anything is published.
    let mut admin = admin(&url).await?;
    redis::cmd("DEL")
        .arg(stream())
        .query_async::<i64>(&mut admin)
        .await?;
    let sink_config = RedisSinkConfig {
        url: url.clone(),
        stream_template: STREAM_TEMPLATE.into(),
        ..Default::default()
    };
    let first_sink = RedisSink::connect(sink_config.clone()).await?;
    let idmp = first_sink.uses_idmp();
    let doomed_cards = NeverAcks(RedisAdapter::connect(&consumer_config(&url)).await?);

    // 3. The relay, first run: it dies after publishing 300 messages, before recording them.
    // 4. A new relay takes over and re-sends: the stream keeps the re-sends (no dedup by id).
    let pool = demo_pool(db_url)?;
    let (crashed_after, delivered, _) = relay_crashes_then_a_new_one_resends(
        &pool,
        db,
        Arc::new(first_sink),
        Arc::new(RedisSink::connect(sink_config).await?),
        payments,
    )
    .await?;
    println!(
        "relay crashed after {crashed_after} acknowledged XADDs (more were in flight), before recording any delivery"
    );
    let stored = stream_len(&mut admin).await? as usize;
    let why = if idmp {
        "XADD IDMP (Redis 8.6+) dropped the re-sends it still remembered"
    } else {
        "the re-sends twice: Redis before 8.6 cannot drop them"
    };
    println!("relay restarted: delivered {delivered}; the stream holds {stored} entries ({why})");

    // 5. The card service, first run: it commits cards for the first 50 entries, then dies
    //    before XACK; what it was given stays pending under its consumer name.
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
            return Err("the card service's first run got no entries within 60 s".into());
        }
        let (pending, _) = group_state(&mut admin).await?;
        println!(
            "card service crashed after committing {} cards, before XACK: {pending} entries pending under {CONSUMER}",
            doomed.stats().processed.load(Ordering::SeqCst)
        );
    }

    // 6. The card service restarts under the same consumer name: it reads its own pending
    //    entries first, and the inbox absorbs every one it already applied.
    let cards_service = Arc::new(Runner::new(
        RedisAdapter::connect(&consumer_config(&url)).await?,
        PgStore::new(pool.clone(), Arc::new(IssueCard)),
        runner_config,
    )?);
    // Until every message the broker held was handled (processed or absorbed), 120 s at most.
    run_until(&cards_service, Duration::from_secs(120), |s| {
        (s.processed.load(Ordering::SeqCst) + s.duplicates.load(Ordering::SeqCst)) as usize
            >= stored
    })
    .await?;
    let (pending, lag) = group_state(&mut admin).await?;

    let v = Verdict::read(db).await?;
    let ok = v.exactly_once()
        && v.payments as usize == payments
        && stored >= payments
        && pending == 0
        && lag == 0
        && v.orphan_cards == 0;
    println!("payments charged:                        {}", v.payments);
    println!(
        "entries in the stream:                   {stored} ({pending} pending, {lag} never read)"
    );
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
