//! Sustained run: producers keep a backlog topped up while the relay drains to JetStream as fast
//! as it can, for minutes. Throughput per minute must stay flat (no decay from table or index
//! bloat); the outbox's size and dead tuples are reported each minute.
//!
//! The producers can write faster than the relay drains (three of them, 500 messages per
//! transaction), so the backlog sits at its cap and the relay, not the producers, sets the
//! pace: the figure per minute is the relay's. The stream is sized to hold the whole run, so
//! that JetStream does not start discarding old messages halfway (work it did not do before).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidings_outbox::{Message, Outbox};
use tidings_relay::{Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

use crate::{connect, drain::bench_stream_sized, pool, Args, BoxError};

/// Producers pause at this backlog, so the relay is never starved and the table stays bounded.
const HIGH_WATER: i64 = 50_000;
/// Producers and messages per producer transaction: together well above the relay's rate.
const PRODUCERS: usize = 3;
const PER_TX: u64 = 500;
/// The stream's cap: more than a 12-minute run writes at this machine's rates (about 5 GB).
const STREAM_BYTES: i64 = 8 << 30;
/// Before the measured minutes: the stream's duplicate window (see `drain::bench_stream`).
const WARMUP: Duration = Duration::from_secs(120);
/// The backlog as the span of the sequence numbers still in the table: two index lookups,
/// where counting the rows would scan up to `HIGH_WATER` of them on every transaction. (A row
/// left waiting for a retry would stretch the span; nothing fails in this run.)
const BACKLOG: &str = "SELECT coalesce(max(seq) - min(seq) + 1, 0) FROM tidings.outbox";

pub async fn run(args: &Args, url: &str, length: Duration) -> Result<(Value, bool), BoxError> {
    let minute = if length >= Duration::from_secs(180) {
        Duration::from_secs(60)
    } else {
        length / 4
    };
    println!(
        "\n== sustained run: {:?}, reported every {:?}, sink {}",
        length, minute, args.sustained_sink
    );
    let sink: Arc<dyn tidings_relay::Sink> = if args.sustained_sink == "null" {
        Arc::new(crate::drain::NullSink)
    } else {
        bench_stream_sized(args, STREAM_BYTES).await?
    };
    let js = async_nats::jetstream::new(async_nats::connect(&args.nats).await?);
    let c = connect(url).await?;
    c.batch_execute("TRUNCATE tidings.outbox").await?;
    // The daemon's defaults: 2 lanes, a pool of 3.
    let lanes = tidings_relay::DEFAULT_LANES;
    let config = RelayConfig {
        heartbeat_interval: Duration::from_secs(1),
        lanes,
        ..Default::default()
    };
    let relay = Arc::new(Relay::new(pool(url, lanes + 1)?, sink, config)?);
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    let produced = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (url, produced, done) = (url.to_owned(), produced.clone(), done.clone());
        producers.push(tokio::spawn(async move {
            let mut c = connect(&url).await?;
            let outbox = Outbox::default();
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                let backlog: i64 = c.query_one(BACKLOG, &[]).await?.get(0);
                if backlog >= HIGH_WATER {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let msgs: Vec<Message> = (0..PER_TX)
                    .map(|i| {
                        Message::new(
                            "bench.sustained",
                            format!("{{\"p\":{p},\"n\":{n},\"i\":{i}}}"),
                        )
                        .key(format!("k{}", (n * PER_TX + i) % 500))
                    })
                    .collect();
                let tx = c.transaction().await?;
                outbox.enqueue_batch_pg(&tx, &msgs).await?;
                tx.commit().await?;
                produced.fetch_add(PER_TX, Ordering::Relaxed);
                n += 1;
            }
            Ok::<_, BoxError>(())
        }));
    }

    println!(
        "{:>8} {:>14} {:>14} {:>10} {:>14} {:>12} {:>14}",
        "minute",
        "delivered/s",
        "produced/s",
        "backlog",
        "outbox bytes",
        "dead tuples",
        "stream bytes"
    );
    // Warm-up: JetStream remembers every message id for its duplicate window (2 minutes on
    // the bench stream), so its dedup table grows for that long and only then levels off; the
    // measured minutes start once it is full. The warm-up's own rate is printed and kept.
    let mut warmup = Value::Null;
    if length >= Duration::from_secs(180) {
        let before = delivered(&c).await?;
        tokio::time::sleep(WARMUP).await;
        let d = delivered(&c).await?;
        let p = produced.load(Ordering::Relaxed);
        let rate = (d - before) as f64 / WARMUP.as_secs_f64();
        let prate = p as f64 / WARMUP.as_secs_f64();
        println!("{:>8} {rate:>14.0} {prate:>14.0}", "warm-up");
        warmup =
            json!({"seconds": WARMUP.as_secs(), "delivered_per_s": rate, "produced_per_s": prate});
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut last_delivered = delivered(&c).await?;
    let mut last_produced = produced.load(Ordering::Relaxed);
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
        let stream = match js.get_stream("TIDINGS_BENCH").await {
            Ok(mut s) if args.sustained_sink != "null" => s.info().await?.state.bytes,
            _ => 0,
        };
        let secs = minute.as_secs_f64();
        let rate = (d - last_delivered) as f64 / secs;
        let prate = (p - last_produced) as f64 / secs;
        println!(
            "{i:>8} {rate:>14.0} {prate:>14.0} {backlog:>10} {bytes:>14} {dead:>12} {stream:>14}"
        );
        rows.push(json!({"interval": i, "delivered_per_s": rate, "produced_per_s": prate, "backlog": backlog, "outbox_bytes": bytes, "dead_tuples": dead, "stream_bytes": stream}));
        last_delivered = d;
        last_produced = p;
    }
    done.store(true, Ordering::Relaxed);
    for p in producers {
        p.await??;
    }
    stop.cancel();
    relay_task.await??;
    // The stream may hold gigabytes by now.
    let _ = js.delete_stream("TIDINGS_BENCH").await;
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
    Ok((
        json!({"warmup": warmup, "intervals": rows, "last_vs_first": ratio}),
        true,
    ))
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
