//! Tracing across the wire: one trace from the producer's span, through the relay, to the
//! consumer.
//!
//! Its own test binary (one process, one test): a thread-scoped tracing subscriber races with
//! other tests' threads over tracing's global callsite-interest cache, which can leave the
//! span's callsite disabled for the whole process (a CI run lost the span that way).

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::BoxFuture;
use std::sync::Arc;
use tidings_inbox::nats::{ConsumerConfig, Delivered, Handler, HandlerError, NatsConsumer};
use tidings_relay::sink::{NatsSink, NatsSinkConfig};
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

/// One trace from the producer's span, through the relay's publish, to the consumer's effect
/// (feature `opentelemetry` of the outbox, relay and inbox), for every driver's enqueue
/// (tokio-postgres, deadpool, diesel, diesel-async, sync postgres, sqlx, and the pipelined
/// `begin_pg`/`begin_deadpool` transaction): the
/// outbox stores the current span's context as `traceparent` when the message has none; the
/// relay's `tidings_publish` span and the consumer's `tidings_consume` span are children of the
/// producer's span. A message that sets its own `traceparent` keeps it.
#[tokio::test(flavor = "current_thread")]
async fn one_trace_from_the_producers_span_through_the_relay_to_the_consumer() {
    use diesel::Connection as _;
    use diesel_async::AsyncConnection as _;
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing::Instrument as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
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
    // Scoped to this thread; the current-thread runtime runs producer, relay and consumer here
    // (the sync driver's thread sets the same dispatch for itself).
    let dispatch = tracing::Dispatch::new(subscriber);
    let _guard = tracing::dispatcher::set_default(&dispatch);

    // The producers: one message per driver, each inside a span of its own.
    let outbox = tidings_outbox::Outbox::default();
    let msg = |biz: &str| tidings_outbox::Message::new("payment.succeeded", "{}").biz_id(biz);
    let ids = |span: &tracing::Span| {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.trace_id().to_string(), sc.span_id().to_string())
    };
    let mut producers = Vec::new();
    {
        let span = tracing::info_span!("produce", driver = "tokio-postgres");
        let mut c = db.client().await;
        async {
            let tx = c.transaction().await.unwrap();
            outbox.enqueue_pg(&tx, &msg("pay_pg")).await.unwrap();
            tx.commit().await.unwrap();
        }
        .instrument(span.clone())
        .await;
        producers.push(("pay_pg", ids(&span)));
    }
    {
        let span = tracing::info_span!("produce", driver = "deadpool-postgres");
        let pool = pool(&db, 1);
        async {
            let mut c = pool.get().await.unwrap();
            let tx = c.transaction().await.unwrap();
            outbox
                .enqueue_deadpool(&tx, &msg("pay_deadpool"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        .instrument(span.clone())
        .await;
        producers.push(("pay_deadpool", ids(&span)));
    }
    {
        let span = tracing::info_span!("produce", driver = "diesel");
        let mut conn = diesel::PgConnection::establish(&db.url).unwrap();
        span.in_scope(|| {
            conn.transaction::<_, tidings_outbox::Error, _>(|conn| {
                outbox.enqueue(conn, &msg("pay_diesel"))?;
                Ok(())
            })
            .unwrap()
        });
        producers.push(("pay_diesel", ids(&span)));
    }
    {
        let span = tracing::info_span!("produce", driver = "diesel-async");
        let mut conn = diesel_async::AsyncPgConnection::establish(&db.url)
            .await
            .unwrap();
        async {
            outbox
                .enqueue_async(&mut conn, &msg("pay_diesel_async"))
                .await
                .unwrap();
        }
        .instrument(span.clone())
        .await;
        producers.push(("pay_diesel_async", ids(&span)));
    }
    {
        // The sync client blocks: on a blocking thread, under this test's dispatch, in the span.
        let span = tracing::info_span!("produce", driver = "postgres (sync)");
        let (url, dispatch, inner) = (db.url.clone(), dispatch.clone(), span.clone());
        tokio::task::spawn_blocking(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                inner.in_scope(|| {
                    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                    let mut tx = c.transaction().unwrap();
                    tidings_outbox::Outbox::default()
                        .enqueue_sync(&mut tx, &msg("pay_sync"))
                        .unwrap();
                    tx.commit().unwrap();
                })
            })
        })
        .await
        .unwrap();
        producers.push(("pay_sync", ids(&span)));
    }
    {
        use sqlx::Connection as _;
        let span = tracing::info_span!("produce", driver = "sqlx");
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        async {
            let mut tx = conn.begin().await.unwrap();
            outbox
                .enqueue_sqlx(&mut tx, &msg("pay_sqlx"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        .instrument(span.clone())
        .await;
        producers.push(("pay_sqlx", ids(&span)));
    }
    {
        // The pipelined transaction keeps the message until its commit: the span current at
        // enqueue is the one recorded.
        let span = tracing::info_span!("produce", driver = "begin_pg");
        let mut c = db.client().await;
        let mut tx = outbox.begin_pg(&mut c).await.unwrap();
        span.in_scope(|| tx.enqueue(&msg("pay_begin_pg")).unwrap());
        tx.commit().await.unwrap();
        producers.push(("pay_begin_pg", ids(&span)));
    }
    {
        let span = tracing::info_span!("produce", driver = "begin_deadpool");
        let pool = pool(&db, 1);
        let mut obj = pool.get().await.unwrap();
        async {
            let mut tx = outbox.begin_deadpool(&mut obj).await.unwrap();
            tx.enqueue(&msg("pay_begin_deadpool")).unwrap();
            tx.commit().await.unwrap();
        }
        .instrument(span.clone())
        .await;
        producers.push(("pay_begin_deadpool", ids(&span)));
    }
    // A message with its own traceparent keeps it, inside a producer span or not.
    {
        let span = tracing::info_span!("produce", driver = "explicit");
        async {
            let c = db.client().await;
            let own = msg("pay_explicit").header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            );
            outbox.enqueue_pg(&c, &own).await.unwrap();
        }
        .instrument(span)
        .await;
        producers.push((
            "pay_explicit",
            (
                "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
                "00f067aa0ba902b7".to_owned(),
            ),
        ));
    }
    // A caller's tracestate too long for a header (20 entries, about 4 KB): the message keeps
    // the traceparent and goes without the tracestate; the enqueue does not fail.
    {
        let span = tracing::info_span!("produce", driver = "long-tracestate");
        let long: String = (0..20)
            .map(|i| format!("k{i}={}", "a".repeat(200)))
            .collect::<Vec<_>>()
            .join(",");
        tidings_outbox::trace::set_parent(
            &span,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some(&long),
        );
        let c = db.client().await;
        async {
            let (_, state) = tidings_outbox::trace::current().expect("a trace context");
            assert!(
                state.is_some_and(|s| s.len() > 4000),
                "the long tracestate is current"
            );
            outbox.enqueue_pg(&c, &msg("pay_long_state")).await.unwrap();
        }
        .instrument(span.clone())
        .await;
        let headers: serde_json::Value = c
            .query_one(
                "SELECT headers FROM tidings.outbox WHERE biz_id = 'pay_long_state'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(headers["traceparent"]
            .as_str()
            .is_some_and(|t| t.contains("0af7651916cd43dd8448eb211c80319c")));
        assert!(headers.get("tracestate").is_none(), "{headers}");
        producers.push(("pay_long_state", ids(&span)));
    }
    for (biz, (trace, _)) in &producers {
        assert_ne!(
            trace, "00000000000000000000000000000000",
            "{biz}: a producer span"
        );
    }

    // The relay.
    let sink = NatsSink::connect(NatsSinkConfig {
        url: nats.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let relay = tidings_relay::Relay::new(
        pool(&db, 2),
        Arc::new(sink),
        tidings_relay::RelayConfig {
            listen: false,
            ..Default::default()
        },
    )
    .unwrap();
    let drained = tidings_tests::drain(&relay, &db).await;
    assert_eq!(drained.delivered, producers.len());

    // The consumer.
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
            "every message to be processed",
            Duration::from_secs(20),
            || async {
                consumer.stats().processed.load(Ordering::SeqCst) == producers.len() as u64
            },
        )
        .await;
        stop.cancel();
    };
    let (res, ()) = tokio::join!(run, watch);
    res.unwrap();

    let _ = provider.force_flush();
    let spans = exporter.get_finished_spans().unwrap();
    for (biz, (trace, parent)) in &producers {
        for name in ["tidings_publish", "tidings_consume"] {
            let found = spans.iter().any(|s| {
                s.name == name
                    && s.span_context.trace_id().to_string() == *trace
                    && s.parent_span_id.to_string() == *parent
            });
            assert!(
                found,
                "{biz}: a {name} span in trace {trace} with parent {parent}: {:#?}",
                spans
                    .iter()
                    .map(|s| (&s.name, s.span_context.trace_id(), s.parent_span_id))
                    .collect::<Vec<_>>()
            );
        }
    }
}
