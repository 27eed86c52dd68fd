//! Tidings benchmarks, each comparison measured side by side in one run so machine noise
//! cancels in the ratio. Prints tables and writes JSON.
//!
//! ```text
//! cargo run --release -p tidings-bench                      # full run (about 20 minutes + 12 sustained)
//! cargo run --release -p tidings-bench -- --quick           # under a minute; what CI runs
//! cargo run --release -p tidings-bench -- --sustained 10m   # the sustained run (default 0 = skipped in --quick)
//! ```
//!
//! Needs the local PostgreSQL and NATS (JetStream). Creates (and drops first) the database
//! `tidings_bench` and the stream `TIDINGS_BENCH`.

/// The allocator the `tidings` binary uses too (see relay/src/main.rs): the relay allocates per
/// message (rows, payloads, headers), and glibc malloc took a fifth of its CPU in a profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod anatomy;
mod drain;
mod latency;
mod overhead;
mod sustained;

use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Clone)]
#[command(about = "Tidings benchmarks")]
pub struct Args {
    /// PostgreSQL server URL, without a database name.
    #[arg(
        long,
        env = "BENCH_PG",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pub pg: String,
    /// NATS URL (JetStream enabled).
    #[arg(long, env = "BENCH_NATS", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// Kafka bootstrap servers: adds the Kafka rows to the drain benchmark (build with
    /// `--features kafka`; `bash bench/kafka.sh` starts a tansu broker and passes it).
    #[arg(long, env = "BENCH_KAFKA")]
    pub kafka: Option<String>,
    /// RabbitMQ URL: adds the RabbitMQ rows to the drain benchmark (build with
    /// `--features rabbitmq`), e.g. `amqp://127.0.0.1:5672/%2f`. The bench declares an exchange
    /// and a durable queue named `tidings-bench` and deletes them afterwards.
    #[arg(long, env = "BENCH_AMQP")]
    pub amqp: Option<String>,
    /// Redis URL: adds the Redis Streams rows to the drain benchmark (build with
    /// `--features redis`), e.g. `redis://127.0.0.1:6379`. The bench writes streams under the
    /// prefix `tidings-bench:` and deletes them afterwards.
    #[arg(long, env = "BENCH_REDIS")]
    pub redis: Option<String>,
    /// Adds the HTTP webhook rows to the drain benchmark (build with `--features http`): the
    /// bench answers the webhooks itself, from an in-process endpoint on 127.0.0.1.
    #[arg(long)]
    pub http: bool,
    /// Short run for CI: small sizes, one round, loose regression floors checked.
    #[arg(long)]
    pub quick: bool,
    /// Which parts to run (comma-separated): overhead, floors, anatomy, drain, lanes (one
    /// relay's loop with 1 to 4 lanes: null sink, JetStream, JetStream keyed), latency,
    /// sustained; or, not in the default, `null` (the drain's PostgreSQL rows alone) and `nats`
    /// (JetStream's raw publish beside the relay's 2 lanes): for A/B runs and profiling.
    #[arg(
        long,
        default_value = "overhead,floors,anatomy,drain,lanes,latency,sustained",
        value_delimiter = ','
    )]
    pub only: Vec<String>,
    /// Length of the sustained run (e.g. 10m), after its 2-minute warm-up when 3 minutes or
    /// longer; 0 skips it. Defaults to 10m, or 0 with --quick.
    #[arg(long, value_parser = parse_minutes)]
    pub sustained: Option<Duration>,
    /// The sustained run's sink: `nats` (JetStream, the default) or `null` (no broker: whether
    /// a change over the minutes is the relay's and PostgreSQL's, or the broker's).
    #[arg(long, default_value = "nats", value_parser = ["nats", "null"])]
    pub sustained_sink: String,
    /// Backlog size for the drain benchmark. Defaults to 100000 (10000 with --quick).
    #[arg(long)]
    pub backlog: Option<usize>,
    /// Relay batch size for the drain benchmark. Defaults to the relay's default (500).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench.json")]
    pub json: String,
}

fn parse_minutes(s: &str) -> Result<Duration, String> {
    let (n, mul) = match s.strip_suffix('m') {
        Some(n) => (n, 60.0),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    n.parse::<f64>()
        .map(|n| Duration::from_secs_f64(n * mul))
        .map_err(|_| format!("{s:?} is not a duration like 10m or 30s"))
}

pub async fn connect(url: &str) -> Result<Client, BoxError> {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

pub fn pool(url: &str, size: usize) -> Result<deadpool_postgres::Pool, BoxError> {
    Ok(
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(url.parse()?, NoTls))
            .max_size(size)
            .build()?,
    )
}

/// Median of a sample.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("bench: a regression floor was missed (see above)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(2);
        }
    }
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let admin = connect(&format!("{}/postgres", args.pg)).await?;
    admin
        .batch_execute("DROP DATABASE IF EXISTS tidings_bench WITH (FORCE)")
        .await?;
    admin.batch_execute("CREATE DATABASE tidings_bench").await?;
    let url = format!("{}/tidings_bench", args.pg);
    let mut db = connect(&url).await?;
    tidings_migrations::postgres::up(&mut db).await?;
    db.batch_execute(overhead::SCHEMA).await?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let pg_version: String = db.query_one("SHOW server_version", &[]).await?.get(0);
    println!(
        "machine: {cores} cores; PostgreSQL {pg_version} and NATS on the same machine; mode: {}",
        if args.quick { "quick" } else { "full" }
    );

    let mut report = serde_json::Map::new();
    report.insert("cores".into(), json!(cores));
    report.insert("quick".into(), json!(args.quick));
    let mut ok = true;
    let wants = |part: &str| args.only.iter().any(|p| p == part);
    if wants("overhead") || wants("floors") {
        let (v, floor_ok) = overhead::run(&args, &url, wants("overhead"), wants("floors")).await?;
        report.insert("overhead".into(), v);
        ok &= floor_ok;
    }
    // Where the row's cost goes; not in --quick (CI catches regressions with the floors).
    if wants("anatomy") && !args.quick {
        report.insert("anatomy".into(), anatomy::run(&args, &url).await?);
    }
    if wants("drain") {
        let (v, floor_ok) = drain::run(&args, &url).await?;
        report.insert("drain".into(), v);
        ok &= floor_ok;
    }
    if wants("null") {
        report.insert("null".into(), drain::null_only(&args, &url).await?);
    }
    if wants("nats") {
        report.insert("nats".into(), drain::nats_only(&args, &url).await?);
    }
    if wants("lanes") && !args.quick {
        report.insert("lanes".into(), drain::lanes_only(&args, &url).await?);
    }
    if wants("latency") {
        let (v, floor_ok) = latency::run(&args, &url).await?;
        report.insert("latency".into(), v);
        ok &= floor_ok;
    }
    let sustained = args.sustained.unwrap_or(if args.quick {
        Duration::ZERO
    } else {
        Duration::from_secs(600)
    });
    if wants("sustained") && !sustained.is_zero() {
        let (v, floor_ok) = sustained::run(&args, &url, sustained).await?;
        report.insert("sustained".into(), v);
        ok &= floor_ok;
    }
    std::fs::write(
        &args.json,
        serde_json::to_string_pretty(&Value::Object(report))?,
    )?;
    println!("\nwrote {}", args.json);
    admin
        .batch_execute("DROP DATABASE IF EXISTS tidings_bench WITH (FORCE)")
        .await?;
    Ok(ok)
}

/// Prints a regression-floor check; returns whether it held.
pub fn floor(what: &str, value: f64, min: f64) -> bool {
    let held = value >= min;
    if !held {
        println!("  REGRESSION: {what} = {value:.1}, below the floor of {min:.1}");
    }
    held
}
