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
CREATE TABLE plain_outbox (id uuid PRIMARY KEY, topic text NOT NULL, payload jsonb NOT NULL);
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
    /// The floor: a plain outbox-shaped row (uuid primary key, text, jsonb) in a table of the
    /// bench's own, no Tidings at all.
    PlainRow,
    /// Tidings' row by a direct INSERT into `tidings.outbox`: the same row `tidings.enqueue()`
    /// writes (id from Rust, the JSON payload's text, the content-type header, a biz-id).
    DirectInsert,
    /// `SELECT tidings.enqueue(topic, payload, biz_id)`, the SQL function producers in any
    /// language can call.
    SqlFunction,
    /// `Outbox::begin_deadpool`: the message checked at once and its INSERT sent with the
    /// COMMIT, one round trip for both (statement cached per pooled connection).
    Pipelined,
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
        .batch_execute("TRUNCATE orders, ledger, cards, plain_outbox, tidings.outbox, tidings.inbox; CHECKPOINT")
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
            let plain = client
                .prepare("INSERT INTO plain_outbox (id, topic, payload) VALUES ($1, $2, $3::text::jsonb)")
                .await?;
            let direct = client
                .prepare("INSERT INTO tidings.outbox (id, topic, biz_id, payload, headers) VALUES ($1, $2, $3, convert_to($4::text::jsonb::text, 'UTF8'), '{\"content-type\": \"application/json\"}')")
                .await?;
            let function = client
                .prepare("SELECT tidings.enqueue($1, $2::text::jsonb, $3)")
                .await?;
            let customer = format!("cust_{c}");
            // Each client its own account: no lock contention between clients.
            let acct = (c % 64) as i32;
            let mut n = 0u64;
            while Instant::now() < deadline {
                if mode == Mode::Pipelined {
                    let mut tx = outbox.begin_deadpool(&mut client).await?;
                    tx.execute(&order, &[&customer, &4200i64]).await?;
                    if shape == Shape::Payment {
                        tx.execute(&account, &[&acct, &4200i64]).await?;
                        tx.execute(&ledger, &[&acct, &4200i64]).await?;
                    }
                    let msg = Message::new("orders.created", format!("{{\"n\":{n}}}"))
                        .biz_id(format!("{c}-{n}"));
                    tx.enqueue(&msg)?;
                    tx.commit().await?;
                    n += 1;
                    continue;
                }
                let tx = client.transaction().await?;
                tx.execute(&order, &[&customer, &4200i64]).await?;
                if shape == Shape::Payment {
                    tx.execute(&account, &[&acct, &4200i64]).await?;
                    tx.execute(&ledger, &[&acct, &4200i64]).await?;
                }
                let payload = format!("{{\"n\":{n}}}");
                let biz = format!("{c}-{n}");
                match mode {
                    Mode::Without => {}
                    Mode::PlainRow => {
                        let id = uuid::Uuid::now_v7();
                        tx.execute(&plain, &[&id, &"orders.created", &payload])
                            .await?;
                    }
                    Mode::DirectInsert => {
                        let id = uuid::Uuid::now_v7();
                        tx.execute(&direct, &[&id, &"orders.created", &biz, &payload])
                            .await?;
                    }
                    Mode::SqlFunction => {
                        tx.execute(&function, &[&"orders.created", &payload, &biz])
                            .await?;
                    }
                    Mode::Pipelined => unreachable!("handled above"),
                    Mode::OutboxCached => {
                        let msg = Message::new("orders.created", payload).biz_id(biz);
                        outbox.enqueue_deadpool(&tx, &msg).await?;
                    }
                    Mode::OutboxNotifyOff | Mode::OutboxNotifyOn => {
                        let msg = Message::new("orders.created", payload).biz_id(biz);
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

/// The producer overhead and inbox tables (`overhead`) and the producer floors (`floors`).
pub async fn run(
    args: &Args,
    url: &str,
    overhead: bool,
    floors: bool,
) -> Result<(Value, bool), BoxError> {
    let mut out = serde_json::Map::new();
    let mut ok = true;
    if overhead {
        producer_overhead(args, url, &mut out, &mut ok).await?;
    }
    if floors {
        producer_floors(args, url, &mut out).await?;
    }
    if overhead {
        inbox_overhead(args, url, &mut out).await?;
    }
    Ok((Value::Object(out), ok))
}

async fn producer_overhead(
    args: &Args,
    url: &str,
    out: &mut serde_json::Map<String, Value>,
    ok: &mut bool,
) -> Result<(), BoxError> {
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
                *ok &= floor(
                    &format!("producer {name} x{clients} outbox/without %"),
                    m[1] / m[0] * 100.0,
                    25.0,
                );
            }
        }
    }

    Ok(())
}

/// The floors (issue: an outbox row as cheap as a plain row): one-INSERT business
/// transaction, one message per transaction, NOTIFY off, the same rounds interleaved.
async fn producer_floors(
    args: &Args,
    url: &str,
    out: &mut serde_json::Map<String, Value>,
) -> Result<(), BoxError> {
    println!(
        "\n== producer floors: 1-INSERT transaction + one message, tx/s (median); % = change vs. the transaction alone"
    );
    println!(
        "{:>8} {:>9} {:>18} {:>18} {:>20} {:>18} {:>18} {:>18}",
        "clients",
        "alone",
        "plain row",
        "direct INSERT",
        "tidings.enqueue()",
        "enqueue_pg",
        "enqueue_deadpool",
        "begin_deadpool"
    );
    for clients in [1usize, 8] {
        let arms = [
            (Shape::Insert, Mode::Without),
            (Shape::Insert, Mode::PlainRow),
            (Shape::Insert, Mode::DirectInsert),
            (Shape::Insert, Mode::SqlFunction),
            (Shape::Insert, Mode::OutboxNotifyOff),
            (Shape::Insert, Mode::OutboxCached),
            (Shape::Insert, Mode::Pipelined),
        ];
        let m = compare(url, args, &arms, clients).await?;
        let pct = |v: f64| (v / m[0] - 1.0) * 100.0;
        print!("{clients:>8} {:>9.0}", m[0]);
        for v in &m[1..] {
            print!(" {v:>9.0} ({:>+5.1}%)", pct(*v));
        }
        println!();
        let cost = |v: f64| 1.0 - v / m[0];
        out.insert(
            format!("producer_floors_{clients}"),
            json!({
                "alone_tps": m[0],
                "plain_row_tps": m[1],
                "direct_insert_tps": m[2],
                "sql_enqueue_tps": m[3],
                "enqueue_pg_tps": m[4],
                "enqueue_deadpool_tps": m[5],
                "cost_plain_row": cost(m[1]),
                "cost_direct_insert": cost(m[2]),
                "cost_sql_enqueue": cost(m[3]),
                "cost_enqueue_pg": cost(m[4]),
                "cost_enqueue_deadpool": cost(m[5]),
                "pipelined_tps": m[6],
                "cost_pipelined": cost(m[6]),
                "pipelined_points_over_plain_row": (cost(m[6]) - cost(m[1])) * 100.0,
                // The targets, in points of the transaction's throughput.
                "enqueue_deadpool_points_over_plain_row": (cost(m[5]) - cost(m[1])) * 100.0,
                "sql_enqueue_points_over_direct_insert": (cost(m[3]) - cost(m[2])) * 100.0,
            }),
        );
    }

    Ok(())
}

async fn inbox_overhead(
    args: &Args,
    url: &str,
    out: &mut serde_json::Map<String, Value>,
) -> Result<(), BoxError> {
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
    Ok(())
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
