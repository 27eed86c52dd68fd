//! The payments story on Kafka (`--broker kafka`, cargo feature `kafka`): the relay dies after
//! publishing, before recording, so its successor re-sends; Kafka keeps both records (it has no
//! dedup by message id across producer sessions), and the card service's inbox absorbs them.
//! The card service dies after committing cards, before committing its offsets, so its
//! successor gets those records again: absorbed too.
//!
//! Broker: `DEMO_KAFKA` (bootstrap servers, default 127.0.0.1:9092); the demo's topic is
//! `demo.payment.succeeded`, deleted and recreated at every run.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use tidings_examples::{IssueCard, Verdict};
use tidings_inbox::kafka::{KafkaAdapter, KafkaConsumerConfig};
use tidings_inbox::runner::postgres::PgStore;
use tidings_inbox::runner::{Runner, RunnerConfig};
use tidings_relay::sink::{KafkaSink, KafkaSinkConfig};

use super::never_acks::NeverAcks;
use super::{demo_pool, relay_crashes_then_a_new_one_resends, run_until, BoxError};

const TOPIC: &str = "demo.payment.succeeded";
const GROUP: &str = "card-service-demo";

fn consumer_config(brokers: &str) -> KafkaConsumerConfig {
    KafkaConsumerConfig {
        brokers: brokers.to_owned(),
        group_id: GROUP.into(),
        topics: vec![TOPIC.into()],
        properties: vec![],
    }
}

/// Every payment id in the topic, and how many records hold them (read from the start of each
/// partition until nothing arrives for 2 s).
fn read_topic(brokers: &str) -> Result<(usize, HashSet<String>), BoxError> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "demo-read-back")
        .set("enable.auto.commit", "false")
        .create()?;
    let md = c.fetch_metadata(Some(TOPIC), Duration::from_secs(10))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(TOPIC, p.id(), rdkafka::Offset::Beginning)?;
        }
    }
    c.assign(&tpl)?;
    let (mut stored, mut seen) = (0, HashSet::new());
    while let Some(m) = c.poll(Duration::from_secs(2)) {
        let m = m?;
        stored += 1;
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        seen.insert(v["payment_id"].as_str().unwrap_or_default().to_owned());
    }
    Ok((stored, seen))
}

pub(crate) async fn run(
    db_url: &str,
    db: &tokio_postgres::Client,
    payments: usize,
) -> Result<bool, BoxError> {
    let brokers = std::env::var("DEMO_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());

    // The demo's own topic, recreated at every run so only this run's records count.
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let _ = admin.delete_topics(&[TOPIC], &opts).await?;
    admin
        .create_topics(
            [&NewTopic::new(TOPIC, 3, TopicReplication::Fixed(1))],
            &opts,
        )
        .await?;
    let sink_config = KafkaSinkConfig {
        brokers: brokers.clone(),
        topic_template: "demo.{topic}".into(),
        ..Default::default()
    };

    // 3. The relay, first run: it dies after publishing 300 messages, before recording them.
    // 4. A new relay takes over and re-sends: Kafka keeps the re-sends (a new producer session).
    let pool = demo_pool(db_url)?;
    let (crashed_after, delivered, _) = relay_crashes_then_a_new_one_resends(
        &pool,
        db,
        Arc::new(KafkaSink::connect(sink_config.clone()).await?),
        Arc::new(KafkaSink::connect(sink_config).await?),
        payments,
    )
    .await?;
    println!(
        "relay crashed after {crashed_after} acknowledged publishes (more were in flight), before recording any delivery"
    );
    println!("relay restarted: delivered {delivered} (the re-sends are in the topic twice: Kafka cannot drop them)");

    // 5. What the broker holds: every committed payment, some twice, the rolled-back one never.
    let b = brokers.clone();
    let (stored, seen) = tokio::task::spawn_blocking(move || read_topic(&b)).await??;

    // 6. The card service, first run: it commits cards for the first 100 records, then dies
    //    before committing its offsets.
    let runner_config = RunnerConfig {
        name: GROUP.into(),
        ..Default::default()
    };
    let crash_after = 100.min(payments) as u64;
    {
        let doomed = Arc::new(Runner::new(
            NeverAcks(KafkaAdapter::connect(&consumer_config(&brokers))?),
            PgStore::new(pool.clone(), Arc::new(IssueCard)),
            runner_config.clone(),
        )?);
        let crashed = run_until(&doomed, Duration::from_secs(60), |s| {
            s.processed.load(Ordering::SeqCst) >= crash_after
        });
        if !crashed.await? {
            return Err("the card service's first run got no records within 60 s".into());
        }
        println!(
            "card service crashed after committing {} cards, before committing any offset",
            doomed.stats().processed.load(Ordering::SeqCst)
        );
    }

    // 7. The card service restarts in the same group: it gets those records again from the
    //    last committed offset (none), and the inbox absorbs every one it already applied.
    let cards_service = Arc::new(Runner::new(
        KafkaAdapter::connect(&consumer_config(&brokers))?,
        PgStore::new(pool.clone(), Arc::new(IssueCard)),
        runner_config,
    )?);
    // Until every message the broker held was handled (processed or absorbed), 120 s at most.
    run_until(&cards_service, Duration::from_secs(120), |s| {
        (s.processed.load(Ordering::SeqCst) + s.duplicates.load(Ordering::SeqCst)) as usize
            >= stored
    })
    .await?;

    let v = Verdict::read(db).await?;
    let ok = v.exactly_once()
        && v.payments as usize == payments
        && stored >= payments
        && seen.len() == payments
        && !seen.contains("pay_declined");
    println!("payments charged:                        {}", v.payments);
    println!(
        "records in Kafka:                        {stored} ({} distinct payments)",
        seen.len()
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
        "rolled-back payment delivered:           {}",
        seen.contains("pay_declined")
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
