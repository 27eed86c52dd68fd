//! The card service as a process of its own, for the chaos test: consumes `payment.succeeded`
//! from JetStream through the inbox and issues one membership card per payment
//! (`tidings_examples::IssueCard`). Runs until SIGTERM/SIGINT (or SIGKILL, in the chaos test).
//!
//! Environment: DATABASE_URL, NATS_URL, CARD_ACK_WAIT_MS (default 2000).

use std::sync::Arc;
use std::time::Duration;

use tidings_inbox::nats::{ConsumerConfig, NatsConsumer};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let db = std::env::var("DATABASE_URL")?;
    let nats = std::env::var("NATS_URL")?;
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
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
    });
    consumer.run(stop).await?;
    Ok(())
}
