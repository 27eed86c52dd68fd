//! The card service as a process of its own, for the chaos test: consumes `payment.succeeded`
//! from JetStream through the inbox and issues one membership card per payment
//! (`tidings_examples::IssueCard`). Runs until SIGTERM/SIGINT (or SIGKILL, in the chaos test).
//!
//! Environment: DATABASE_URL, NATS_URL, CARD_ACK_WAIT_MS (default 2000); or, with the `kafka`
//! feature, KAFKA_BROKERS instead of NATS_URL (consumer group `card-service`, topic
//! `payment.succeeded`); or, with the `rabbitmq` feature, AMQP_URL instead (queue AMQP_QUEUE,
//! default `card-service`, declared durable and bound to exchange `tidings` with
//! `payment.succeeded` if missing); or, with the `redis` feature, REDIS_URL instead (stream
//! REDIS_STREAM, default `tidings:payment.succeeded`, consumer group `card-service` created if
//! missing, consumer name REDIS_CONSUMER, default `card-service`: give each instance its own and
//! reuse it across its restarts; REDIS_CLAIM_IDLE_MS, default 60000, after which another
//! consumer takes over a dead one's entries). CARD_LOG (an EnvFilter, e.g.
//! `tidings_inbox=debug`) logs to stderr.

use std::sync::Arc;
use std::time::Duration;

use tidings_inbox::nats::{ConsumerConfig, NatsConsumer};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if let Ok(filter) = std::env::var("CARD_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let db = std::env::var("DATABASE_URL")?;
    let ack_wait = std::env::var("CARD_ACK_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(
        db.parse()?,
        tokio_postgres::NoTls,
    ))
    .max_size(8)
    .build()?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
    });
    #[cfg(feature = "kafka")]
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
        use tidings_inbox::kafka::{KafkaAdapter, KafkaConsumerConfig};
        let adapter = KafkaAdapter::connect(&KafkaConsumerConfig {
            brokers,
            group_id: "card-service".into(),
            topics: vec!["payment.succeeded".into()],
            // A SIGKILLed member holds its partitions until its session times out.
            // KAFKA_SESSION_TIMEOUT_MS shortens that (librdkafka's default is 45 s).
            properties: std::env::var("KAFKA_SESSION_TIMEOUT_MS")
                .map(|ms| vec![("session.timeout.ms".to_owned(), ms)])
                .unwrap_or_default(),
        })?;
        return issue_cards(adapter, pool, stop).await;
    }
    #[cfg(feature = "rabbitmq")]
    if let Ok(url) = std::env::var("AMQP_URL") {
        use tidings_inbox::rabbitmq::{QueueSetup, RabbitAdapter, RabbitConsumerConfig};
        let config = RabbitConsumerConfig {
            url,
            queue: std::env::var("AMQP_QUEUE").unwrap_or_else(|_| "card-service".into()),
            declare: Some(QueueSetup {
                exchange: "tidings".into(),
                binding_keys: vec!["payment.succeeded".into()],
            }),
            ..Default::default()
        };
        let adapter = keep_trying(|| RabbitAdapter::connect(&config)).await?;
        return issue_cards(adapter, pool, stop).await;
    }
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        use tidings_inbox::redis::{RedisAdapter, RedisConsumerConfig};
        let config = RedisConsumerConfig {
            url,
            stream: std::env::var("REDIS_STREAM")
                .unwrap_or_else(|_| "tidings:payment.succeeded".into()),
            group: "card-service".into(),
            consumer: std::env::var("REDIS_CONSUMER").unwrap_or_else(|_| "card-service".into()),
            claim_idle: Duration::from_millis(
                std::env::var("REDIS_CLAIM_IDLE_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(60_000),
            ),
            ..Default::default()
        };
        let adapter = keep_trying(|| RedisAdapter::connect(&config)).await?;
        return issue_cards(adapter, pool, stop).await;
    }
    let nats = std::env::var("NATS_URL")?;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats.as_str())
        .await?;
    let config = ConsumerConfig {
        name: "card-service".into(),
        filter_subject: "tidings.payment.succeeded".into(),
        ack_wait: Duration::from_millis(ack_wait),
        concurrency: 8,
        ..Default::default()
    };
    let consumer =
        NatsConsumer::new(pool, client, config, Arc::new(tidings_examples::IssueCard)).await?;
    consumer.run(stop).await?;
    Ok(())
}

/// Issues one card per payment through `adapter` until stopped.
#[cfg(any(feature = "kafka", feature = "rabbitmq", feature = "redis"))]
async fn issue_cards<A: tidings_inbox::runner::Adapter>(
    adapter: A,
    pool: deadpool_postgres::Pool,
    stop: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use tidings_inbox::runner::{postgres::PgStore, Runner, RunnerConfig};
    let runner = Runner::new(
        adapter,
        PgStore::new(pool, Arc::new(tidings_examples::IssueCard)),
        RunnerConfig {
            name: "card-service".into(),
            concurrency: 8,
            ..Default::default()
        },
    )?;
    runner.run(stop).await?;
    Ok(())
}

/// The broker may be restarting when this process starts (the chaos tests restart it): keep
/// trying for a minute, as a process manager would restart the service.
#[cfg(any(feature = "rabbitmq", feature = "redis"))]
async fn keep_trying<T, E, F, Fut>(connect: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut tries = 0;
    loop {
        match connect().await {
            Ok(a) => return Ok(a),
            Err(e) if tries < 120 => {
                eprintln!("cannot start consuming ({e}); retrying");
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
