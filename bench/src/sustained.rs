//! Sustained run: producers keep a backlog topped up while the relay drains to JetStream as fast
//! as it can, for minutes. Throughput per minute must stay flat (no decay from table or index
//! bloat); the outbox's size and dead tuples are reported each minute.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidings_outbox::{Message, Outbox};
use tidings_relay::{Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

use crate::{connect, drain::bench_stream, pool, Args, BoxError};

/// Producers pause above this backlog, so the relay is never starved and the table stays bounded.
const HIGH_WATER: i64 = 50_000;

pub async fn run(args: &Args, url: &str, length: Duration) -> Result<(Value, bool), BoxError> {
    let minute = if length >= Duration::from_secs(180) {
        Duration::from_secs(60)
    } else {
        length / 4
    };
    println!(
        "\n== sustained run: {:?}, reported every {:?}",
        length, minute
    );
    let sink = bench_stream(args).await?;
    let c = connect(url).await?;
    c.batch_execute("TRUNCATE tidings.outbox").await?;
    let config = RelayConfig {
        heartbeat_interval: Duration::from_secs(1),
        ..Default::default()
    };
    let relay = Arc::new(Relay::new(pool(url, 2)?, sink, config)?);
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    let produced = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..2 {
        let (url, produced, done) = (url.to_owned(), produced.clone(), done.clone());
        producers.push(tokio::spawn(async move {
            let mut c = connect(&url).await?;
            let outbox = Outbox::default();
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                let backlog: i64 = c
                    .query_one(
                        "SELECT count(*) FROM (SELECT 1 FROM tidings.outbox LIMIT $1) s",
                        &[&HIGH_WATER],
                    )
                    .await?
                    .get(0);
                if backlog >= HIGH_WATER {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let msgs: Vec<Message> = (0..100)
                    .map(|i| {
                        Message::new(
                            "bench.sustained",
                            format!("{{\"p\":{p},\"n\":{n},\"i\":{i}}}"),
                        )
                        .key(format!("k{}", (n * 100 + i) % 500))
                    })
                    .collect();
                let tx = c.transaction().await?;
                outbox.enqueue_batch_pg(&tx, &msgs).await?;
                tx.commit().await?;
                produced.fetch_add(100, Ordering::Relaxed);
                n += 1;
            }
            Ok::<_, BoxError>(())
        }));
    }

    println!(
        "{:>8} {:>14} {:>14} {:>10} {:>14} {:>12}",
        "minute", "delivered/s", "produced/s", "backlog", "outbox bytes", "dead tuples"
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut last_delivered = delivered(&c).await?;
    let mut last_produced = 0;
    let mut i = 0;
    while started.elapsed() < length {
        tokio::time::sleep(minute).await;
        i += 1;
        let d = delivered(&c).await?;
        let p = produced.load(Ordering::Relaxed);
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM tidings.outbox), pg_total_relation_size('tidings.outbox'),
                        (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'tidings.outbox'::regclass)",
                &[],
            )
            .await?;
        let (backlog, bytes, dead): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        let secs = minute.as_secs_f64();
        let rate = (d - last_delivered) as f64 / secs;
        let prate = (p - last_produced) as f64 / secs;
        println!("{i:>8} {rate:>14.0} {prate:>14.0} {backlog:>10} {bytes:>14} {dead:>12}");
        rows.push(json!({"interval": i, "delivered_per_s": rate, "produced_per_s": prate, "backlog": backlog, "outbox_bytes": bytes, "dead_tuples": dead}));
        last_delivered = d;
        last_produced = p;
    }
    done.store(true, Ordering::Relaxed);
    for p in producers {
        p.await??;
    }
    stop.cancel();
    relay_task.await??;
    let first = rows
        .first()
        .and_then(|r| r["delivered_per_s"].as_f64())
        .unwrap_or(0.0);
    let last = rows
        .last()
        .and_then(|r| r["delivered_per_s"].as_f64())
        .unwrap_or(0.0);
    let ratio = last / first;
    println!(
        "last interval / first interval: {:.1}% (target: within 5%: {})",
        ratio * 100.0,
        if (ratio - 1.0).abs() <= 0.05 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok((json!({"intervals": rows, "last_vs_first": ratio}), true))
}

/// Messages delivered so far, from the relay's heartbeat counters.
async fn delivered(c: &tokio_postgres::Client) -> Result<i64, BoxError> {
    Ok(c.query_one(
        "SELECT coalesce(sum(delivered), 0)::bigint FROM tidings.relays",
        &[],
    )
    .await?
    .get(0))
}
