//! What the outbox costs a producer, and what the inbox costs a consumer: the same transaction
//! with and without the Tidings write, at 1 and 8 clients, scenarios interleaved over rounds.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidings_inbox::{DedupKey, Inbox};
use tidings_outbox::{Message, Outbox};

use crate::{connect, floor, median, Args, BoxError};

/// Business tables of the benchmark.
pub const SCHEMA: &str = "
CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, cents bigint NOT NULL);
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO accounts SELECT g, 0 FROM generate_series(0, 63) g;
CREATE TABLE ledger (id bigserial PRIMARY KEY, account int NOT NULL, cents bigint NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE cards (id bigserial PRIMARY KEY, payment_id text NOT NULL);
";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Shape {
    /// One INSERT: the smallest possible business transaction, the worst case for the ratio.
    Insert,
    /// A payment: INSERT order, UPDATE account balance, INSERT ledger entry.
    Payment,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Without,
    OutboxNotifyOn,
    OutboxNotifyOff,
    /// NOTIFY off, through `enqueue_deadpool` (statement cached per pooled connection).
    OutboxCached,
}

async fn scenario(
    url: &str,
    shape: Shape,
    mode: Mode,
    clients: usize,
    secs: f64,
) -> Result<f64, BoxError> {
    let setup = connect(url).await?;
    setup
        .batch_execute("TRUNCATE orders, ledger, cards, tidings.outbox, tidings.inbox; CHECKPOINT")
        .await?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            // A pooled connection (deadpool-postgres) for every arm, as a service would have.
            let pool = crate::pool(&url, 1)?;
            let mut client = pool.get().await?;
            if mode == Mode::OutboxNotifyOn {
                client.batch_execute("SET tidings.notify = on").await?;
            }
            let outbox = Outbox::default();
            let order = client
                .prepare("INSERT INTO orders (customer, cents) VALUES ($1, $2)")
                .await?;
            let account = client
                .prepare("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
                .await?;
            let ledger = client
                .prepare("INSERT INTO ledger (account, cents) VALUES ($1, $2)")
                .await?;
            let customer = format!("cust_{c}");
            // Each client its own account: no lock contention between clients.
            let acct = (c % 64) as i32;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let tx = client.transaction().await?;
                tx.execute(&order, &[&customer, &4200i64]).await?;
                if shape == Shape::Payment {
                    tx.execute(&account, &[&acct, &4200i64]).await?;
                    tx.execute(&ledger, &[&acct, &4200i64]).await?;
                }
                if mode != Mode::Without {
                    let msg = Message::new("orders.created", format!("{{\"n\":{n}}}"))
                        .biz_id(format!("{c}-{n}"));
                    if mode == Mode::OutboxCached {
                        outbox.enqueue_deadpool(&tx, &msg).await?;
                    } else {
                        outbox.enqueue_pg(&*tx, &msg).await?;
                    }
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

async fn compare(
    url: &str,
    args: &Args,
    arms: &[(Shape, Mode)],
    clients: usize,
) -> Result<Vec<f64>, BoxError> {
    let (secs, rounds) = if args.quick { (0.5, 1) } else { (3.0, 3) };
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    for _ in 0..rounds {
        for (i, (shape, mode)) in arms.iter().enumerate() {
            samples[i].push(scenario(url, *shape, *mode, clients, secs).await?);
        }
    }
    Ok(samples.iter_mut().map(|s| median(s)).collect())
}

pub async fn run(args: &Args, url: &str) -> Result<(Value, bool), BoxError> {
    let mut out = serde_json::Map::new();
    let mut ok = true;
    println!(
        "\n== producer overhead: tx/s (median), change vs. the same transaction without the outbox"
    );
    println!(
        "{:>8} {:>22} {:>9} {:>20} {:>20} {:>22}",
        "clients",
        "business transaction",
        "without",
        "enqueue_pg",
        "enqueue_pg+NOTIFY",
        "enqueue_deadpool"
    );
    for clients in [1usize, 8] {
        for shape in [Shape::Insert, Shape::Payment] {
            let arms = [
                (shape, Mode::Without),
                (shape, Mode::OutboxNotifyOff),
                (shape, Mode::OutboxNotifyOn),
                (shape, Mode::OutboxCached),
            ];
            let m = compare(url, args, &arms, clients).await?;
            let pct = |v: f64| (v / m[0] - 1.0) * 100.0;
            let name = match shape {
                Shape::Insert => "1 INSERT",
                Shape::Payment => "payment (3 statements)",
            };
            println!(
                "{clients:>8} {name:>22} {:>9.0} {:>11.0} ({:>+5.1}%) {:>11.0} ({:>+5.1}%) {:>13.0} ({:>+5.1}%)",
                m[0],
                m[1],
                pct(m[1]),
                m[2],
                pct(m[2]),
                m[3],
                pct(m[3])
            );
            out.insert(
                format!("producer_{shape:?}_{clients}").to_lowercase(),
                json!({"without_tps": m[0], "notify_off_tps": m[1], "notify_on_tps": m[2],
                       "overhead_notify_off": 1.0 - m[1] / m[0], "overhead_notify_on": 1.0 - m[2] / m[0], "cached_tps": m[3], "overhead_cached": 1.0 - m[3] / m[0]}),
            );
            if args.quick {
                // Catch gross regressions only: the outbox must keep at least a quarter of the
                // rate (it keeps about half; one-round quick samples are noisy).
                ok &= floor(
                    &format!("producer {name} x{clients} outbox/without %"),
                    m[1] / m[0] * 100.0,
                    25.0,
                );
            }
        }
    }

    println!("\n== inbox overhead: consumer tx/s (median); effect = one INSERT");
    println!(
        "{:>8} {:>14} {:>22}",
        "clients", "effect only", "effect + inbox record"
    );
    for clients in [1usize, 8] {
        let (secs, rounds) = if args.quick { (0.5, 1) } else { (3.0, 3) };
        let mut without = Vec::new();
        let mut with = Vec::new();
        for _ in 0..rounds {
            without.push(consumer(url, false, clients, secs).await?);
            with.push(consumer(url, true, clients, secs).await?);
        }
        let (a, b) = (median(&mut without), median(&mut with));
        println!(
            "{clients:>8} {a:>14.0} {b:>14.0} ({:>+5.1}%)",
            (b / a - 1.0) * 100.0
        );
        out.insert(
            format!("inbox_{clients}"),
            json!({"effect_tps": a, "effect_inbox_tps": b, "overhead": 1.0 - b / a}),
        );
    }
    Ok((Value::Object(out), ok))
}

/// Consumer transactions: INSERT a card, with or without the inbox record first.
async fn consumer(url: &str, with_inbox: bool, clients: usize, secs: f64) -> Result<f64, BoxError> {
    let setup = connect(url).await?;
    setup
        .batch_execute("TRUNCATE cards, tidings.inbox; CHECKPOINT")
        .await?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await?;
            let inbox = Inbox::new("bench")?;
            let card = client
                .prepare("INSERT INTO cards (payment_id) VALUES ($1)")
                .await?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let id = format!("{c}-{n}");
                let tx = client.transaction().await?;
                if with_inbox {
                    let _recorded = inbox.record_pg(&tx, &DedupKey::biz_id(id.as_str())).await?;
                }
                tx.execute(&card, &[&id]).await?;
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
