//! Tracing across the wire: the consumer's span continues the producer's trace.
//!
//! Its own test binary (one process, one test): a thread-scoped tracing subscriber races with
//! other tests' threads over tracing's global callsite-interest cache, which can leave the
//! span's callsite disabled for the whole process (a CI run lost the span that way).

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::BoxFuture;
use std::sync::Arc;
use tidings_inbox::nats::{ConsumerConfig, Delivered, Handler, HandlerError, NatsConsumer};
use tidings_outbox::MessageId;
use tidings_relay::sink::{NatsSink, NatsSinkConfig};
use tidings_relay::{Envelope, Sink};
use tidings_tests::{eventually, pool, NatsServer, TestDb};
use tokio_util::sync::CancellationToken;

struct IssueCard;

impl Handler for IssueCard {
    fn handle<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let payment = msg.biz_id.as_deref().ok_or("no biz-id")?;
            tx.execute("INSERT INTO cards (payment_id) VALUES ($1)", &[&payment])
                .await?;
            Ok(())
        })
    }
}

fn envelope(biz: &str) -> Envelope {
    Envelope {
        seq: 0,
        message: tidings_outbox::WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic: "payment.succeeded".into(),
            key: None,
            biz_id: Some(biz.into()),
            payload: bytes::Bytes::from_static(b"{}"),
            headers: [(
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            )]
            .into(),
            created_at: Some(chrono::Utc::now()),
            attempts: 0,
        },
    }
}

/// The consumer's span is a child of the producer's span named in `traceparent`, in
/// OpenTelemetry (feature `opentelemetry`), so one trace runs from producer to consumer.
#[tokio::test(flavor = "current_thread")]
async fn consumer_span_continues_the_producers_traceparent() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    let (db, nats) = (TestDb::migrated().await, NatsServer::start().await);
    db.client()
        .await
        .batch_execute("CREATE TABLE cards (id bigserial PRIMARY KEY, payment_id text NOT NULL)")
        .await
        .unwrap();
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    // Scoped to this thread; the current-thread runtime runs the consumer here.
    let _guard = tracing::subscriber::set_default(subscriber);

    let sink = NatsSink::connect(NatsSinkConfig {
        url: nats.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    sink.publish(&envelope("pay_traced")).await.unwrap();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let config = ConsumerConfig {
        name: "card-service".into(),
        ..Default::default()
    };
    let consumer = NatsConsumer::new(pool(&db, 2), client, config, Arc::new(IssueCard))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let run = consumer.run(stop.clone());
    let watch = async {
        eventually(
            "the message to be processed",
            Duration::from_secs(20),
            || async { consumer.stats().processed.load(Ordering::SeqCst) == 1 },
        )
        .await;
        stop.cancel();
    };
    let (res, ()) = tokio::join!(run, watch);
    res.unwrap();

    let _ = provider.force_flush();
    let spans = exporter.get_finished_spans().unwrap();
    let span = spans
        .iter()
        .find(|s| s.name == "tidings_consume")
        .expect("a tidings_consume span");
    assert_eq!(
        span.span_context.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(span.parent_span_id.to_string(), "00f067aa0ba902b7");
}
