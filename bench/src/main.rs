//! Producer overhead: the same business transaction (one INSERT) with and without one outbox
//! message, with the outbox NOTIFY on and off, at 1 and 8 concurrent clients, measured side by
//! side in one run (scenarios interleaved over rounds, so machine noise cancels in the ratios).
//! Prints a table and writes JSON.
//!
//! `cargo run --release -p tidings-bench -- [--seconds 5] [--rounds 3] [--json bench.json]`
//! Needs the local PostgreSQL; creates (and drops first) the database `tidings_bench`.

use std::time::{Duration, Instant};

use clap::Parser;
use tidings_outbox::{Message, Outbox};
use tokio_postgres::{Client, NoTls};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
struct Args {
    /// PostgreSQL server URL, without a database name.
    #[arg(
        long,
        env = "BENCH_PG",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pg: String,
    /// Seconds per scenario per round.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Rounds; each round runs every scenario once, in turn.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench-producer.json")]
    json: String,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// The business INSERT only.
    Baseline,
    /// Plus one outbox message, with `SET tidings.notify = on`.
    OutboxNotify,
    /// Plus one outbox message, NOTIFY off (the default).
    OutboxQuiet,
}

async fn connect(url: &str) -> Result<Client, BoxError> {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// Runs `clients` producers for `secs`; returns committed transactions per second.
async fn run(url: &str, mode: Mode, clients: usize, secs: f64) -> Result<f64, BoxError> {
    let setup = connect(url).await?;
    setup
        .batch_execute("TRUNCATE orders; TRUNCATE tidings.outbox; CHECKPOINT")
        .await?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await?;
            if mode == Mode::OutboxNotify {
                client.batch_execute("SET tidings.notify = on").await?;
            }
            let outbox = Outbox::default();
            let insert = client
                .prepare("INSERT INTO orders (customer, cents) VALUES ($1, $2)")
                .await?;
            let customer = format!("cust_{c}");
            let mut n = 0u64;
            while Instant::now() < deadline {
                let tx = client.transaction().await?;
                tx.execute(&insert, &[&customer, &4200i64]).await?;
                if mode != Mode::Baseline {
                    let msg = Message::new("orders.created", format!("{{\"n\":{n}}}"))
                        .biz_id(format!("{c}-{n}"));
                    outbox.enqueue_pg(&tx, &msg).await?;
                }
                tx.commit().await?;
                n += 1;
            }
            Ok::<u64, BoxError>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / secs)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let admin = connect(&format!("{}/postgres", args.pg)).await?;
    admin
        .batch_execute("DROP DATABASE IF EXISTS tidings_bench WITH (FORCE)")
        .await?;
    admin.batch_execute("CREATE DATABASE tidings_bench").await?;
    let url = format!("{}/tidings_bench", args.pg);
    let mut db = connect(&url).await?;
    tidings_migrations::postgres::up(&mut db).await?;
    db.batch_execute("CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, cents bigint NOT NULL)")
        .await?;

    let modes = [Mode::Baseline, Mode::OutboxNotify, Mode::OutboxQuiet];
    let mut results = serde_json::Map::new();
    println!(
        "producer overhead: tx/s (median of {} rounds of {}s), ratio to baseline",
        args.rounds, args.seconds
    );
    println!(
        "{:>8} {:>12} {:>22} {:>22}",
        "clients", "baseline", "outbox, NOTIFY on", "outbox, NOTIFY off"
    );
    for clients in [1usize, 8] {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for _ in 0..args.rounds {
            for (i, mode) in modes.iter().enumerate() {
                samples[i].push(run(&url, *mode, clients, args.seconds).await?);
            }
        }
        let median: Vec<f64> = samples
            .iter_mut()
            .map(|s| {
                s.sort_by(|a, b| a.total_cmp(b));
                s[s.len() / 2]
            })
            .collect();
        let ratio = |v: f64| v / median[0];
        println!(
            "{clients:>8} {:>12.0} {:>14.0} ({:>5.1}%) {:>14.0} ({:>5.1}%)",
            median[0],
            median[1],
            (ratio(median[1]) - 1.0) * 100.0,
            median[2],
            (ratio(median[2]) - 1.0) * 100.0
        );
        results.insert(
            format!("clients_{clients}"),
            serde_json::json!({
                "baseline_tps": median[0],
                "outbox_notify_tps": median[1],
                "outbox_quiet_tps": median[2],
                "overhead_notify": 1.0 - ratio(median[1]),
                "overhead_quiet": 1.0 - ratio(median[2]),
                "samples": samples,
            }),
        );
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    println!("wrote {}", args.json);
    admin
        .batch_execute("DROP DATABASE IF EXISTS tidings_bench WITH (FORCE)")
        .await?;
    Ok(())
}
