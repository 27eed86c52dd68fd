//! Where the cost of Tidings' outbox row goes: the one-INSERT business transaction of the
//! producer floors at 8 clients, its message inserted directly into a copy of `tidings.outbox`
//! (`LIKE ... INCLUDING ALL`: identity, defaults, CHECKs, indexes; not the NOTIFY trigger, which
//! is off by default), once whole and once without each CHECK constraint or index in turn, and
//! once as the plain outbox-shaped row (uuid primary key, text, jsonb). Rounds interleave the
//! variants; the table is recreated before each sample.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{connect, median, Args, BoxError};

/// What a variant leaves out of the copy.
#[derive(Clone, Debug)]
enum Variant {
    Whole,
    WithoutCheck(String),
    WithoutIndex(String),
    WithoutChecks,
    Plain,
}

impl Variant {
    fn name(&self) -> String {
        match self {
            Variant::Whole => "whole row (copy of tidings.outbox)".into(),
            Variant::WithoutCheck(c) => format!("without CHECK {c}"),
            Variant::WithoutIndex(i) => format!("without index {i}"),
            Variant::WithoutChecks => "without any CHECK".into(),
            Variant::Plain => "plain row (uuid pk, text, jsonb)".into(),
        }
    }
}

async fn prepare_table(c: &tokio_postgres::Client, v: &Variant) -> Result<(), BoxError> {
    c.batch_execute(
        "DROP TABLE IF EXISTS anatomy; TRUNCATE orders; \
         CREATE TABLE anatomy (LIKE tidings.outbox INCLUDING ALL)",
    )
    .await?;
    match v {
        Variant::Whole => {}
        // Names come from the catalog of the copy, quoted as identifiers.
        Variant::WithoutCheck(name) => {
            c.batch_execute(&format!(
                "ALTER TABLE anatomy DROP CONSTRAINT {}",
                quote_ident(name)
            ))
            .await?
        }
        Variant::WithoutIndex(name) => {
            let con: Option<String> = c
                .query_opt(
                    "SELECT conname::text FROM pg_constraint WHERE conindid = $1::text::regclass AND conrelid = 'anatomy'::regclass",
                    &[&name],
                )
                .await?
                .map(|r| r.get(0));
            let sql = match con {
                Some(con) => format!("ALTER TABLE anatomy DROP CONSTRAINT {}", quote_ident(&con)),
                None => format!("DROP INDEX {}", quote_ident(name)),
            };
            c.batch_execute(&sql).await?
        }
        Variant::WithoutChecks => {
            for name in checks(c).await? {
                c.batch_execute(&format!(
                    "ALTER TABLE anatomy DROP CONSTRAINT {}",
                    quote_ident(&name)
                ))
                .await?;
            }
        }
        Variant::Plain => {
            c.batch_execute(
                "DROP TABLE anatomy; \
                 CREATE TABLE anatomy (id uuid PRIMARY KEY, topic text NOT NULL, payload jsonb NOT NULL)",
            )
            .await?
        }
    }
    c.batch_execute("CHECKPOINT").await?;
    Ok(())
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

async fn checks(c: &tokio_postgres::Client) -> Result<Vec<String>, BoxError> {
    Ok(c
        .query(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = 'anatomy'::regclass AND contype = 'c' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

async fn sample(url: &str, plain: bool, clients: usize, secs: f64) -> Result<f64, BoxError> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await?;
            let order = client
                .prepare("INSERT INTO orders (customer, cents) VALUES ($1, $2)")
                .await?;
            let row = if plain {
                client
                    .prepare("INSERT INTO anatomy (id, topic, payload) VALUES ($1, $2, $3::text::jsonb)")
                    .await?
            } else {
                client
                    .prepare("INSERT INTO anatomy (id, topic, biz_id, payload) VALUES ($1, $2, $3, convert_to($4, 'UTF8'))")
                    .await?
            };
            let customer = format!("cust_{c}");
            let mut n = 0u64;
            while Instant::now() < deadline {
                let tx = client.transaction().await?;
                tx.execute(&order, &[&customer, &4200i64]).await?;
                let id = uuid::Uuid::now_v7();
                let biz = format!("{c}-{n}");
                let payload = format!("{{\"n\":{n}}}");
                if plain {
                    tx.execute(&row, &[&id, &"orders.created", &payload])
                        .await?;
                } else {
                    tx.execute(&row, &[&id, &"orders.created", &biz, &payload])
                        .await?;
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

pub async fn run(args: &Args, url: &str) -> Result<Value, BoxError> {
    let c = connect(url).await?;
    prepare_table(&c, &Variant::Whole).await?;
    let mut variants = vec![Variant::Whole, Variant::Plain, Variant::WithoutChecks];
    variants.extend(checks(&c).await?.into_iter().map(Variant::WithoutCheck));
    let indexes: Vec<String> = c
        .query(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'anatomy'::regclass ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    variants.extend(indexes.into_iter().map(Variant::WithoutIndex));
    let (secs, rounds, clients) = if args.quick { (0.5, 1, 8) } else { (3.0, 3, 8) };
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, v) in variants.iter().enumerate() {
            prepare_table(&c, v).await?;
            let plain = matches!(v, Variant::Plain);
            samples[i].push(sample(url, plain, clients, secs).await?);
        }
    }
    c.batch_execute("DROP TABLE IF EXISTS anatomy").await?;
    let m: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    println!(
        "\n== row anatomy: 1-INSERT transaction + one row, {clients} clients, tx/s (median); change vs. the whole row"
    );
    let mut out = serde_json::Map::new();
    for (v, tps) in variants.iter().zip(&m) {
        println!(
            "{:>66} {tps:>9.0} ({:>+5.1}%)",
            v.name(),
            (tps / m[0] - 1.0) * 100.0
        );
        out.insert(v.name(), json!(tps));
    }
    Ok(Value::Object(out))
}
