//! Relay drain rate: a backlog drained by plain SQL (claim + delete, no publishing: the raw
//! PostgreSQL rate), by the relay to a null sink, and by the relay to NATS JetStream; with
//! `--kafka`, `--amqp`, `--redis` and `--http`, also to Kafka, RabbitMQ, Redis Streams and HTTP
//! webhooks, each beside the broker's (or endpoint's) own rate for the same messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tidings_relay::sink::{NatsSink, NatsSinkConfig, StreamSetup};
use tidings_relay::{Delivery, Envelope, Relay, RelayConfig, Sink, SinkError};

use crate::{connect, floor, pool, Args, BoxError};

/// Accepts everything at once: the relay's own cost without a broker.
pub struct NullSink;

impl Sink for NullSink {
    fn name(&self) -> &'static str {
        "null"
    }
    fn publish<'a>(&'a self, _: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async { Ok(Delivery::default()) })
    }
    /// One answer for the whole batch, as a broker client that batches does: no future per
    /// message (the default runs one per message).
    fn publish_batch<'a>(
        &'a self,
        msgs: &'a [&'a Envelope],
    ) -> BoxFuture<'a, Vec<Result<Delivery, SinkError>>> {
        Box::pin(async move { msgs.iter().map(|_| Ok(Delivery::default())).collect() })
    }
}

/// The raw PostgreSQL rate: what claiming and deleting the same rows costs with plain SQL, in
/// batches of the relay's size, nothing published.
const RAW_DRAIN: &str = "\
WITH c AS (SELECT seq FROM tidings.outbox WHERE deliver_at <= now() ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)
DELETE FROM tidings.outbox o USING c WHERE o.seq = c.seq";

/// Fills the outbox with `n` messages (100-byte JSON payloads; keyed over `keys` keys if some).
pub async fn backlog(url: &str, n: usize, keys: Option<usize>) -> Result<(), BoxError> {
    let c = connect(url).await?;
    c.batch_execute("TRUNCATE tidings.outbox").await?;
    let keys = keys.map(|k| k as i64).unwrap_or(0);
    c.execute(
        "INSERT INTO tidings.outbox (id, topic, ordering_key, biz_id, payload, headers)
         SELECT tidings.uuid_v7(), 'bench.drain', CASE WHEN $2::bigint > 0 THEN 'k' || (g % $2::bigint) END, 'b' || g,
                convert_to('{\"n\":' || g || ',\"pad\":\"' || repeat('x', 80) || '\"}', 'UTF8'),
                '{\"content-type\":\"application/json\"}'
           FROM generate_series(1, $1::bigint) g",
        &[&(n as i64), &keys],
    )
    .await?;
    c.batch_execute("VACUUM ANALYZE tidings.outbox").await?;
    Ok(())
}

async fn drain_raw(url: &str, batch: i64) -> Result<f64, BoxError> {
    let c = connect(url).await?;
    let started = Instant::now();
    let mut total = 0;
    loop {
        let n = c.execute(RAW_DRAIN, &[&batch]).await?;
        total += n;
        if n == 0 {
            break;
        }
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Drains with `relays` relay instances ticking concurrently; returns (msg/s, duplicates).
async fn drain_relays(
    url: &str,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    relays: usize,
) -> Result<(f64, u64), BoxError> {
    let relays: Vec<Relay> = (0..relays)
        .map(|_| Ok::<_, BoxError>(Relay::new(pool(url, 2)?, sink.clone(), config.clone())?))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let results = futures::future::join_all(relays.iter().map(|relay| async move {
        let (mut total, mut dups) = (0u64, 0u64);
        loop {
            let r = relay.tick().await?;
            total += r.delivered as u64;
            dups += r.duplicates as u64;
            if r.claimed == 0 {
                return Ok::<_, BoxError>((total, dups));
            }
        }
    }))
    .await;
    let (mut total, mut dups) = (0, 0);
    for r in results {
        let (t, d) = r?;
        total += t;
        dups += d;
    }
    Ok((total as f64 / started.elapsed().as_secs_f64(), dups))
}

/// Counts the messages the inner sink acknowledged and says when `target` is reached (the bench
/// watching the relay's own loop without querying the outbox, which would cost PostgreSQL a
/// scan over the dead rows at its head every time).
struct Counting {
    inner: tidings_relay::sink::SharedSink,
    done: Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>,
    target: usize,
}

impl Sink for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(async move {
            let r = self.inner.publish(msg).await;
            if r.is_ok() {
                self.count(1);
            }
            r
        })
    }
    fn publish_batch<'a>(
        &'a self,
        msgs: &'a [&'a Envelope],
    ) -> BoxFuture<'a, Vec<Result<Delivery, SinkError>>> {
        Box::pin(async move {
            let r = self.inner.publish_batch(msgs).await;
            self.count(r.iter().filter(|r| r.is_ok()).count());
            r
        })
    }
    fn capabilities(&self) -> tidings_relay::Capabilities {
        self.inner.capabilities()
    }
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        self.inner.check()
    }
}

impl Counting {
    fn count(&self, n: usize) {
        let before = self
            .done
            .0
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        if before < self.target && before + n >= self.target {
            self.done.1.notify_one();
        }
    }
}

/// Drains with one relay running its own loop (`Relay::run`: polling, heartbeats, vacuum) with
/// `lanes` lanes; stops it once `n` messages were acknowledged. Returns msg/s.
async fn drain_run(
    url: &str,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    lanes: usize,
    n: usize,
) -> Result<f64, BoxError> {
    let config = RelayConfig {
        lanes,
        listen: false,
        ..config
    };
    let done = Arc::new((
        std::sync::atomic::AtomicUsize::new(0),
        tokio::sync::Notify::new(),
    ));
    // Shared: the relay closes its sink when it stops, and the next rows use this one.
    let sink = Arc::new(Counting {
        inner: tidings_relay::sink::SharedSink(sink),
        done: done.clone(),
        target: n,
    });
    let relay = Arc::new(Relay::new(pool(url, lanes + 1)?, sink, config)?);
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn({
        let (relay, stop) = (relay.clone(), stop.clone());
        async move { relay.run(stop).await }
    });
    let mut run = run;
    tokio::select! {
        _ = done.1.notified() => {}
        r = &mut run => return Err(format!("the relay loop stopped before the backlog was drained: {:?}", r?).into()),
        _ = tokio::time::sleep(Duration::from_secs(300)) => {
            return Err("the relay loop did not drain the backlog within 5 minutes".into())
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    run.await??;
    Ok(rate)
}

async fn drain_relay(
    url: &str,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
) -> Result<(f64, u64), BoxError> {
    drain_relays(url, sink, config, 1).await
}

/// `n` messages like the backlog's (100-byte JSON payloads, a content-type header), for the
/// raw rows that publish without PostgreSQL.
fn raw_messages(n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| Envelope {
            seq: i as i64,
            message: tidings_outbox::WireMessage {
                id: tidings_outbox::MessageId::from_uuid(uuid::Uuid::now_v7()),
                topic: "drain".into(),
                key: None,
                biz_id: Some(format!("b{i}")),
                payload: bytes::Bytes::from(format!(
                    "{{\"n\":{i},\"pad\":\"{}\"}}",
                    "x".repeat(80)
                )),
                headers: [("content-type".to_owned(), "application/json".to_owned())].into(),
                created_at: Some(chrono::Utc::now()),
                attempts: 0,
            },
        })
        .collect()
}

/// The broker's own ceiling here: the same number of messages published through its sink
/// in batches of `batch`, all acks awaited per batch, with no PostgreSQL involved.
async fn publish_raw(sink: &dyn Sink, n: usize, batch: usize) -> Result<f64, BoxError> {
    let msgs = raw_messages(n);
    let started = Instant::now();
    for chunk in msgs.chunks(batch) {
        for r in futures::future::join_all(chunk.iter().map(|m| sink.publish(m))).await {
            r?;
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// A bench stream with a size cap, so long runs do not fill the disk.
pub async fn bench_stream(args: &Args) -> Result<Arc<NatsSink>, BoxError> {
    bench_stream_sized(args, 1 << 30).await
}

/// [`bench_stream`] with its size cap: a stream at its cap discards its oldest messages on
/// every publish, which is work the broker did not do before; the sustained run sizes the
/// stream to hold the whole run, so that its minutes compare like with like.
pub async fn bench_stream_sized(args: &Args, max_bytes: i64) -> Result<Arc<NatsSink>, BoxError> {
    let js = async_nats::jetstream::new(async_nats::connect(&args.nats).await?);
    let _ = js.delete_stream("TIDINGS_BENCH").await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TIDINGS_BENCH".into(),
        subjects: vec!["bench.>".into()],
        max_bytes,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    Ok(Arc::new(
        NatsSink::connect(NatsSinkConfig {
            url: args.nats.clone(),
            subject_prefix: "bench".into(),
            stream: StreamSetup::Existing,
            ..Default::default()
        })
        .await?,
    ))
}

/// One round of the PostgreSQL and JetStream rows, in a fixed order; returns them with the
/// duplicates JetStream reported (none expected: nothing fails).
async fn core_round(
    url: &str,
    n: usize,
    config: &RelayConfig,
    sink: &Arc<NatsSink>,
) -> Result<(Vec<(&'static str, f64)>, u64), BoxError> {
    let batch = config.batch_size as i64;
    let mut rows: Vec<(&'static str, f64)> = Vec::new();

    backlog(url, n, None).await?;
    let raw = drain_raw(url, batch).await?;
    rows.push(("raw PostgreSQL (claim + delete, plain SQL)", raw));

    backlog(url, n, None).await?;
    let (null, _) = drain_relay(url, Arc::new(NullSink), config.clone()).await?;
    rows.push(("relay -> null sink", null));

    // The PgBouncer transaction-mode setting, directly against PostgreSQL: what unnamed
    // claim/finish statements (parsed and planned every batch) cost.
    backlog(url, n, None).await?;
    let uncached = RelayConfig {
        statement_cache: false,
        ..config.clone()
    };
    let (null_uncached, _) = drain_relay(url, Arc::new(NullSink), uncached).await?;
    rows.push(("relay -> null sink, statement_cache off", null_uncached));

    backlog(url, n, Some(1000)).await?;
    let (null_keyed, _) = drain_relay(url, Arc::new(NullSink), config.clone()).await?;
    rows.push(("relay -> null sink, 1000 ordering keys", null_keyed));

    // One relay's own loop (Relay::run) with 2 lanes: the next batch claimed while the last
    // one is finished.
    backlog(url, n, None).await?;
    let null_run2 = drain_run(url, Arc::new(NullSink), config.clone(), 2, n).await?;
    rows.push(("relay loop, 2 lanes -> null sink", null_run2));

    // The curve: more relays on the same backlog (each its own pool), until the database (and
    // the machine's two cores, shared with PostgreSQL) is the limit.
    backlog(url, n, None).await?;
    let (null2, _) = drain_relays(url, Arc::new(NullSink), config.clone(), 2).await?;
    rows.push(("2 relays -> null sink", null2));
    backlog(url, n, None).await?;
    let (null4, _) = drain_relays(url, Arc::new(NullSink), config.clone(), 4).await?;
    rows.push(("4 relays -> null sink", null4));

    let nats_raw = publish_raw(&**sink, n, batch as usize).await?;
    rows.push(("raw NATS JetStream publish (no PostgreSQL)", nats_raw));
    backlog(url, n, None).await?;
    let (nats, dups) = drain_relay(url, sink.clone(), config.clone()).await?;
    rows.push(("relay -> NATS JetStream", nats));

    backlog(url, n, Some(1000)).await?;
    let (nats_keyed, _) = drain_relay(url, sink.clone(), config.clone()).await?;
    rows.push(("relay -> NATS JetStream, 1000 ordering keys", nats_keyed));

    // One relay's own loop (Relay::run: polling, heartbeats, vacuum), with 1 and 2 lanes.
    backlog(url, n, None).await?;
    let nats_run1 = drain_run(url, sink.clone(), config.clone(), 1, n).await?;
    rows.push(("relay loop (1 lane) -> NATS JetStream", nats_run1));
    backlog(url, n, None).await?;
    let nats_run2 = drain_run(url, sink.clone(), config.clone(), 2, n).await?;
    rows.push(("relay loop, 2 lanes -> NATS JetStream", nats_run2));
    backlog(url, n, None).await?;
    let (nats2, dups2) = drain_relays(url, sink.clone(), config.clone(), 2).await?;
    rows.push(("2 relays -> NATS JetStream", nats2));
    backlog(url, n, None).await?;
    let (nats4, dups4) = drain_relays(url, sink.clone(), config.clone(), 4).await?;
    rows.push(("4 relays -> NATS JetStream", nats4));

    Ok((rows, dups + dups2 + dups4))
}

pub async fn run(args: &Args, url: &str) -> Result<(Value, bool), BoxError> {
    let n = args
        .backlog
        .unwrap_or(if args.quick { 10_000 } else { 100_000 });
    let mut config = RelayConfig::default();
    if let Some(b) = args.batch_size {
        config.batch_size = b;
    }
    let batch = config.batch_size as i64;
    println!(
        "\n== relay drain: a backlog of {n} messages, batches of {batch}, msg/s{}",
        if args.quick {
            ""
        } else {
            " (PostgreSQL and JetStream rows: medians of 3 rounds)"
        }
    );
    // The PostgreSQL and JetStream rows: medians of 3 rounds (full mode), the rounds
    // interleaved, because this shared 2-core machine varies by a fifth from one drain to the
    // next; the ratios are taken between medians of the same run.
    let sink = bench_stream(args).await?;
    let rounds = if args.quick { 1 } else { 3 };
    let mut samples: Vec<(&'static str, Vec<f64>)> = Vec::new();
    let mut dups = 0;
    for _ in 0..rounds {
        let (round, d) = core_round(url, n, &config, &sink).await?;
        dups += d;
        for (i, (name, rate)) in round.into_iter().enumerate() {
            if samples.len() <= i {
                samples.push((name, Vec::new()));
            }
            samples[i].1.push(rate);
        }
    }
    #[allow(unused_mut)] // pushed to only with broker features
    let mut rows: Vec<(&str, f64)> = samples
        .iter_mut()
        .map(|(name, v)| (*name, crate::median(v)))
        .collect();
    let get = |name: &str| {
        rows.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
            .unwrap_or(f64::NAN)
    };
    let raw = get("raw PostgreSQL (claim + delete, plain SQL)");
    let null = get("relay -> null sink");
    let null_uncached = get("relay -> null sink, statement_cache off");
    let null_keyed = get("relay -> null sink, 1000 ordering keys");
    let null_run2 = get("relay loop, 2 lanes -> null sink");
    let null2 = get("2 relays -> null sink");
    let null4 = get("4 relays -> null sink");
    let nats_raw = get("raw NATS JetStream publish (no PostgreSQL)");
    let nats = get("relay -> NATS JetStream");
    let nats_keyed = get("relay -> NATS JetStream, 1000 ordering keys");
    let nats_run1 = get("relay loop (1 lane) -> NATS JetStream");
    let nats_run2 = get("relay loop, 2 lanes -> NATS JetStream");
    let nats2 = get("2 relays -> NATS JetStream");
    let nats4 = get("4 relays -> NATS JetStream");

    // Kafka, when a broker is given: its own produce rate beside the relay's.
    #[allow(unused_mut)]
    let mut kafka: (Option<f64>, Option<f64>, Option<f64>) = (None, None, None);
    if let Some(brokers) = &args.kafka {
        #[cfg(feature = "kafka")]
        {
            let sink: Arc<dyn Sink> = Arc::new(
                tidings_relay::sink::KafkaSink::connect(tidings_relay::sink::KafkaSinkConfig {
                    brokers: brokers.clone(),
                    topic_template: "bench.{topic}".into(),
                    create_topics: true,
                    partitions: 6,
                    ..Default::default()
                })
                .await?,
            );
            let raw_kafka = publish_raw(&*sink, n, batch as usize).await?;
            rows.push(("raw Kafka produce (no PostgreSQL)", raw_kafka));
            backlog(url, n, None).await?;
            let (k, _) = drain_relay(url, sink.clone(), config.clone()).await?;
            rows.push(("relay -> Kafka", k));
            backlog(url, n, Some(1000)).await?;
            let (k_keyed, _) = drain_relay(url, sink, config.clone()).await?;
            rows.push(("relay -> Kafka, 1000 ordering keys", k_keyed));
            kafka = (Some(raw_kafka), Some(k), Some(k_keyed));
        }
        #[cfg(not(feature = "kafka"))]
        return Err(format!(
            "--kafka {brokers}: this bench was built without Kafka (cargo run --release -p tidings-bench --features kafka)"
        )
        .into());
    }

    // RabbitMQ, when a URL is given: its own confirmed-publish rate beside the relay's.
    #[allow(unused_mut)]
    let mut rabbit: (Option<f64>, Option<f64>, Option<f64>) = (None, None, None);
    if let Some(amqp) = &args.amqp {
        #[cfg(feature = "rabbitmq")]
        {
            let queue = RabbitQueue::declare(amqp).await?;
            let sink: Arc<dyn Sink> = Arc::new(
                tidings_relay::sink::RabbitSink::connect(tidings_relay::sink::RabbitSinkConfig {
                    url: amqp.clone(),
                    exchange: "tidings-bench".into(),
                    declare_exchange: true,
                    ..Default::default()
                })
                .await?,
            );
            queue.bind().await?;
            let raw_rabbit = publish_raw(&*sink, n, batch as usize).await?;
            rows.push(("raw RabbitMQ confirmed publish (no PostgreSQL)", raw_rabbit));
            queue.purge().await?;
            backlog(url, n, None).await?;
            let (r, _) = drain_relay(url, sink.clone(), config.clone()).await?;
            rows.push(("relay -> RabbitMQ", r));
            queue.purge().await?;
            backlog(url, n, Some(1000)).await?;
            let (r_keyed, _) = drain_relay(url, sink.clone(), config.clone()).await?;
            rows.push(("relay -> RabbitMQ, 1000 ordering keys", r_keyed));
            let _ = sink.close().await;
            queue.delete().await?;
            rabbit = (Some(raw_rabbit), Some(r), Some(r_keyed));
        }
        #[cfg(not(feature = "rabbitmq"))]
        return Err(format!(
            "--amqp {amqp}: this bench was built without RabbitMQ (cargo run --release -p tidings-bench --features rabbitmq)"
        )
        .into());
    }

    // Redis Streams, when a URL is given: pipelined XADD of the same messages beside the relay.
    #[allow(unused_mut)]
    let mut redis_rates: (Option<f64>, Option<f64>, Option<f64>) = (None, None, None);
    if let Some(redis_url) = &args.redis {
        #[cfg(feature = "redis")]
        {
            let mut conn = redis::Client::open(redis_url.as_str())?
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("--redis: cannot connect: {e}"))?;
            let raw_xadd = redis_raw_xadd(&mut conn, n, batch as usize).await?;
            rows.push(("raw Redis pipelined XADD (no PostgreSQL)", raw_xadd));
            let sink = Arc::new(
                tidings_relay::sink::RedisSink::connect(tidings_relay::sink::RedisSinkConfig {
                    url: redis_url.clone(),
                    stream_template: format!("{REDIS_PREFIX}{{topic}}"),
                    ..Default::default()
                })
                .await?,
            );
            let stream = sink.stream_key("bench.drain");
            redis_del(&mut conn, &stream).await?;
            backlog(url, n, None).await?;
            let (r, _) = drain_relay(url, sink.clone(), config.clone()).await?;
            rows.push(("relay -> Redis Streams", r));
            redis_added(&mut conn, &stream, n, "relay -> Redis Streams").await?;
            redis_del(&mut conn, &stream).await?;
            backlog(url, n, Some(1000)).await?;
            let (r_keyed, _) = drain_relay(url, sink.clone(), config.clone()).await?;
            rows.push(("relay -> Redis Streams, 1000 ordering keys", r_keyed));
            redis_added(&mut conn, &stream, n, "relay -> Redis Streams, keyed").await?;
            redis_del(&mut conn, &stream).await?;
            redis_rates = (Some(raw_xadd), Some(r), Some(r_keyed));
        }
        #[cfg(not(feature = "redis"))]
        return Err(format!(
            "--redis {redis_url}: this bench was built without Redis (cargo run --release -p tidings-bench --features redis)"
        )
        .into());
    }

    // HTTP webhooks, when asked: POSTs to an endpoint of the bench's own, raw beside the relay.
    #[allow(unused_mut)]
    let mut http_rates: (Option<f64>, Option<f64>, Option<f64>) = (None, None, None);
    if args.http {
        #[cfg(feature = "http")]
        {
            let hooks = Hooks::start().await?;
            let concurrency = tidings_relay::sink::HttpSinkConfig::default().concurrency;
            let raw_post = http_raw_post(&hooks, n, concurrency).await?;
            rows.push(("raw HTTP POST, 16 in flight (no PostgreSQL)", raw_post));
            let sink = Arc::new(
                tidings_relay::sink::HttpSink::connect(tidings_relay::sink::HttpSinkConfig {
                    url: Some(format!("{}/hooks/{{topic}}", hooks.base)),
                    secrets: vec![tidings_outbox::webhook::Secret::generate()],
                    ..Default::default()
                })
                .await?,
            );
            backlog(url, n, None).await?;
            let before = hooks.received();
            let (h, _) = drain_relay(url, sink.clone(), config.clone()).await?;
            rows.push(("relay -> HTTP webhooks", h));
            hooks.check(before, n, "relay -> HTTP webhooks");
            backlog(url, n, Some(1000)).await?;
            let before = hooks.received();
            let (h_keyed, _) = drain_relay(url, sink.clone(), config.clone()).await?;
            rows.push(("relay -> HTTP webhooks, 1000 ordering keys", h_keyed));
            hooks.check(before, n, "relay -> HTTP webhooks, keyed");
            let _ = sink.close().await;
            hooks.stop();
            http_rates = (Some(raw_post), Some(h), Some(h_keyed));
        }
        #[cfg(not(feature = "http"))]
        return Err(
            "--http: this bench was built without HTTP (cargo run --release -p tidings-bench --features http)"
                .into(),
        );
    }

    for (name, rate) in &rows {
        println!(
            "{name:>46} {rate:>10.0} msg/s  ({:>5.1}% of raw)",
            rate / raw * 100.0
        );
    }
    let mut ok = dups == 0;
    if dups != 0 {
        println!("  unexpected: JetStream reported {dups} duplicates in a fault-free drain");
    }
    if args.quick {
        ok &= floor("relay -> null sink msg/s", null, 2_000.0);
        ok &= floor("relay -> NATS msg/s", nats, 1_000.0);
    }
    Ok((
        json!({"backlog": n, "batch_size": batch, "raw_msgs": raw, "null_msgs": (null), "null_uncached_msgs": null_uncached, "null_keyed_msgs": null_keyed,
               "nats_msgs": nats, "nats_keyed_msgs": nats_keyed, "nats_2_relays_msgs": nats2, "nats_4_relays_msgs": nats4,
               "nats_run_1_lane_msgs": nats_run1, "nats_run_2_lanes_msgs": nats_run2, "nats_run_2_lanes_vs_raw_publish": (nats_run2 / nats_raw),
               "null_run_2_lanes_msgs": null_run2, "null_run_2_lanes_vs_raw": (null_run2 / raw), "null_2_relays_msgs": null2, "null_4_relays_msgs": null4, "null_keyed_vs_null": (null_keyed / null), "nats_raw_publish_msgs": nats_raw, "nats_vs_raw_publish": (nats / nats_raw), "nats_vs_raw": (nats / raw), "null_vs_raw": (null / raw),
               "kafka_raw_produce_msgs": kafka.0, "kafka_msgs": kafka.1, "kafka_keyed_msgs": kafka.2,
               "rabbitmq_raw_publish_msgs": rabbit.0, "rabbitmq_msgs": rabbit.1, "rabbitmq_keyed_msgs": rabbit.2,
               "redis_raw_xadd_msgs": redis_rates.0, "redis_msgs": redis_rates.1, "redis_keyed_msgs": redis_rates.2,
               "http_raw_post_msgs": http_rates.0, "http_msgs": http_rates.1, "http_keyed_msgs": http_rates.2}),
        ok,
    ))
}

/// The durable queue the RabbitMQ rows publish into (bound to every topic of the bench
/// exchange, so no publish is unroutable), purged between rows and deleted at the end.
#[cfg(feature = "rabbitmq")]
struct RabbitQueue {
    _conn: lapin::Connection,
    channel: lapin::Channel,
}

#[cfg(feature = "rabbitmq")]
impl RabbitQueue {
    const NAME: &'static str = "tidings-bench";

    async fn declare(url: &str) -> Result<Self, BoxError> {
        use lapin::options::QueueDeclareOptions;
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .map_err(|e| format!("--amqp: cannot connect: {e}"))?;
        let channel = conn.create_channel().await?;
        channel
            .queue_declare(
                Self::NAME.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await?;
        Ok(RabbitQueue {
            _conn: conn,
            channel,
        })
    }

    /// Binds the queue to the exchange the sink declared.
    async fn bind(&self) -> Result<(), BoxError> {
        self.channel
            .queue_bind(
                Self::NAME.into(),
                "tidings-bench".into(),
                "#".into(),
                Default::default(),
                Default::default(),
            )
            .await?;
        Ok(())
    }

    async fn purge(&self) -> Result<(), BoxError> {
        self.channel
            .queue_purge(Self::NAME.into(), Default::default())
            .await?;
        Ok(())
    }

    async fn delete(&self) -> Result<(), BoxError> {
        self.channel
            .queue_delete(Self::NAME.into(), Default::default())
            .await?;
        self.channel
            .exchange_delete("tidings-bench".into(), Default::default())
            .await?;
        Ok(())
    }
}

/// Prefix of the bench's Redis keys.
#[cfg(feature = "redis")]
const REDIS_PREFIX: &str = "tidings-bench:";

/// Redis's own ceiling here: the same messages, with the fields the sink writes (id, payload,
/// one `h:` field per header), added by pipelines of `batch` XADDs, one round trip each and
/// awaited in turn (as the relay sends its batches), to a fresh stream deleted afterwards.
#[cfg(feature = "redis")]
async fn redis_raw_xadd(
    conn: &mut redis::aio::MultiplexedConnection,
    n: usize,
    batch: usize,
) -> Result<f64, BoxError> {
    use tidings_relay::sink::{FIELD_HEADER_PREFIX, FIELD_ID, FIELD_PAYLOAD};
    let key = format!("{REDIS_PREFIX}raw-xadd");
    redis_del(conn, &key).await?;
    let msgs = raw_messages(n);
    let started = Instant::now();
    for chunk in msgs.chunks(batch) {
        let mut pipe = redis::Pipeline::with_capacity(chunk.len());
        for m in chunk {
            let cmd = pipe
                .cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg(FIELD_ID)
                .arg(m.id.to_string())
                .arg(FIELD_PAYLOAD)
                .arg(m.payload.as_ref());
            for (name, value) in m.wire_headers() {
                cmd.arg(format!("{FIELD_HEADER_PREFIX}{name}")).arg(value);
            }
        }
        let ids: Vec<String> = pipe.query_async(conn).await?;
        if ids.len() != chunk.len() {
            return Err(format!("{} XADDs answered with {} ids", chunk.len(), ids.len()).into());
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    redis_added(conn, &key, n, "raw XADD").await?;
    redis_del(conn, &key).await?;
    Ok(rate)
}

#[cfg(feature = "redis")]
async fn redis_del(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Result<(), BoxError> {
    redis::cmd("DEL").arg(key).query_async::<()>(conn).await?;
    Ok(())
}

/// Prints a warning unless the stream holds `n` entries.
#[cfg(feature = "redis")]
async fn redis_added(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    n: usize,
    row: &str,
) -> Result<(), BoxError> {
    let len: usize = redis::cmd("XLEN").arg(key).query_async(conn).await?;
    if len != n {
        println!("  unexpected: {row} left {len} stream entries for {n} messages");
    }
    Ok(())
}

/// The bench's own webhook endpoint: POST /hooks/{topic} reads the body and answers 204,
/// counting requests.
#[cfg(feature = "http")]
struct Hooks {
    base: String,
    received: Arc<std::sync::atomic::AtomicU64>,
    server: tokio::task::JoinHandle<()>,
}

#[cfg(feature = "http")]
impl Hooks {
    async fn start() -> Result<Hooks, BoxError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let app = axum::Router::new().route(
            "/hooks/{topic}",
            axum::routing::post(move |_body: axum::body::Bytes| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("bench webhook endpoint failed: {e}");
            }
        });
        Ok(Hooks {
            base,
            received,
            server,
        })
    }

    fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Prints a warning unless `n` requests arrived since `before`.
    fn check(&self, before: u64, n: usize, row: &str) {
        let got = self.received() - before;
        if got != n as u64 {
            println!("  unexpected: {row} made {got} requests for {n} messages");
        }
    }

    fn stop(self) {
        self.server.abort();
    }
}

/// The endpoint's own ceiling here: the same number of POSTs with the same bodies (and
/// content-type), sent by a plain reqwest client with `concurrency` in flight, unsigned, with
/// no PostgreSQL involved.
#[cfg(feature = "http")]
async fn http_raw_post(hooks: &Hooks, n: usize, concurrency: usize) -> Result<f64, BoxError> {
    use futures::StreamExt;
    // reqwest is built without a TLS provider of its own (the sink hands it a ring config);
    // building a client needs one installed, even for http:// only.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let msgs = raw_messages(n);
    let target = format!("{}/hooks/raw", hooks.base);
    let before = hooks.received();
    let started = Instant::now();
    let mut answers = futures::stream::iter(&msgs)
        .map(|m| {
            client
                .post(&target)
                .header("content-type", "application/json")
                .body(m.payload.clone())
                .send()
        })
        .buffer_unordered(concurrency);
    while let Some(r) = answers.next().await {
        let status = r?.status();
        if status != reqwest::StatusCode::NO_CONTENT {
            return Err(format!("the bench endpoint answered {status}").into());
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    hooks.check(before, n, "raw HTTP POST");
    Ok(rate)
}

/// The `--only` modes' backlog size (`--backlog`, default 100,000) and relay configuration
/// (`--batch-size`).
fn only_setup(args: &Args) -> (usize, RelayConfig) {
    let mut config = RelayConfig::default();
    if let Some(b) = args.batch_size {
        config.batch_size = b;
    }
    (args.backlog.unwrap_or(100_000), config)
}

/// Deletes the bench's stream: after the `--only` modes it can hold gigabytes.
async fn delete_bench_stream(args: &Args) -> Result<(), BoxError> {
    let js = async_nats::jetstream::new(async_nats::connect(&args.nats).await?);
    let _ = js.delete_stream("TIDINGS_BENCH").await;
    Ok(())
}

/// `--only null`: the PostgreSQL rows alone (raw claim + delete, the relay to the null sink,
/// unkeyed and with 1,000 keys), 3 interleaved rounds, medians printed: a quick A/B of a relay
/// change, and a steady load to profile (`perf record -p`).
pub async fn null_only(args: &Args, url: &str) -> Result<Value, BoxError> {
    let (n, config) = only_setup(args);
    let batch = config.batch_size as i64;
    println!("\n== the PostgreSQL rows alone: {n} messages, batches of {batch}, 3 rounds, msg/s");
    let mut rates: [Vec<f64>; 4] = Default::default();
    for _ in 0..3 {
        backlog(url, n, None).await?;
        rates[0].push(drain_raw(url, batch).await?);
        backlog(url, n, None).await?;
        rates[1].push(
            drain_relay(url, Arc::new(NullSink), config.clone())
                .await?
                .0,
        );
        backlog(url, n, Some(1000)).await?;
        rates[2].push(
            drain_relay(url, Arc::new(NullSink), config.clone())
                .await?
                .0,
        );
        backlog(url, n, None).await?;
        rates[3].push(drain_run(url, Arc::new(NullSink), config.clone(), 2, n).await?);
        let last: Vec<f64> = rates.iter().map(|v| v[v.len() - 1]).collect();
        println!(
            "    round: raw {:.0}, null {:.0}, keyed {:.0}, loop with 2 lanes {:.0}",
            last[0], last[1], last[2], last[3]
        );
    }
    let [raw, null, keyed, lanes2] = rates.map(|mut v| crate::median(&mut v));
    println!(
        "    medians: raw {raw:.0}, null {null:.0} ({:.1}% of raw), keyed {keyed:.0} ({:.1}% of unkeyed), loop with 2 lanes {lanes2:.0} ({:.1}% of raw)",
        null / raw * 100.0,
        keyed / null * 100.0,
        lanes2 / raw * 100.0
    );
    Ok(
        json!({"raw_msgs": raw, "null_msgs": null, "null_keyed_msgs": keyed, "null_run_2_lanes_msgs": lanes2}),
    )
}

/// `--only lanes`: one relay's own loop with 1 to 4 lanes, to the null sink beside the raw
/// claim + delete and to JetStream beside its raw publish, 3 interleaved rounds, medians: the
/// curve that shows what each lane adds on this machine.
pub async fn lanes_only(args: &Args, url: &str) -> Result<Value, BoxError> {
    let (n, config) = only_setup(args);
    let batch = config.batch_size;
    // About 3.4 million messages in all: more than the usual 1 GiB cap holds.
    let sink = bench_stream_sized(args, 8 << 30).await?;
    println!("\n== lanes: {n} messages, batches of {batch}, 3 rounds, msg/s");
    const LANES: [usize; 4] = [1, 2, 3, 4];
    // [raw pg, null x4, raw nats, nats x4, nats keyed x4]
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 2 + 3 * LANES.len()];
    for _ in 0..3 {
        backlog(url, n, None).await?;
        rates[0].push(drain_raw(url, batch as i64).await?);
        for (i, lanes) in LANES.iter().enumerate() {
            backlog(url, n, None).await?;
            rates[1 + i].push(drain_run(url, Arc::new(NullSink), config.clone(), *lanes, n).await?);
        }
        rates[1 + LANES.len()].push(publish_raw(&*sink, n, batch).await?);
        for (i, lanes) in LANES.iter().enumerate() {
            backlog(url, n, None).await?;
            rates[2 + LANES.len() + i]
                .push(drain_run(url, sink.clone(), config.clone(), *lanes, n).await?);
        }
        for (i, lanes) in LANES.iter().enumerate() {
            backlog(url, n, Some(1000)).await?;
            rates[2 + 2 * LANES.len() + i]
                .push(drain_run(url, sink.clone(), config.clone(), *lanes, n).await?);
        }
        let last: Vec<String> = rates
            .iter()
            .map(|v| format!("{:.0}", v[v.len() - 1]))
            .collect();
        println!("    round: {}", last.join(", "));
    }
    // The stream holds about a gigabyte by now.
    delete_bench_stream(args).await?;
    let m: Vec<f64> = rates
        .into_iter()
        .map(|mut v| crate::median(&mut v))
        .collect();
    let (raw, nats_raw) = (m[0], m[1 + LANES.len()]);
    println!("    raw PostgreSQL claim + delete {raw:.0}; raw JetStream publish {nats_raw:.0}");
    let mut out = serde_json::Map::new();
    out.insert("raw_msgs".into(), json!(raw));
    out.insert("nats_raw_publish_msgs".into(), json!(nats_raw));
    for (i, lanes) in LANES.iter().enumerate() {
        let (null_sink, nats, keyed) =
            (m[1 + i], m[2 + LANES.len() + i], m[2 + 2 * LANES.len() + i]);
        println!(
            "    {lanes} lane(s): null sink {null_sink:.0} ({:.1}% of raw), JetStream {nats:.0} ({:.1}% of its raw publish), JetStream with 1,000 keys {keyed:.0} ({:.1}%)",
            null_sink / raw * 100.0,
            nats / nats_raw * 100.0,
            keyed / nats_raw * 100.0
        );
        out.insert(format!("nats_keyed_run_{lanes}_lanes_msgs"), json!(keyed));
        out.insert(format!("null_run_{lanes}_lanes_msgs"), json!(null_sink));
        out.insert(format!("nats_run_{lanes}_lanes_msgs"), json!(nats));
    }
    Ok(Value::Object(out))
}

/// `--only nats`: JetStream alone: its raw publish and one relay's loop with the daemon's 2
/// lanes, 3 interleaved rounds, medians; for A/B runs of the JetStream path and a steady load
/// to profile (`perf record -p`).
pub async fn nats_only(args: &Args, url: &str) -> Result<Value, BoxError> {
    let (n, config) = only_setup(args);
    let batch = config.batch_size;
    let sink = bench_stream_sized(args, 8 << 30).await?;
    let lanes = tidings_relay::DEFAULT_LANES;
    println!(
        "\n== JetStream alone: {n} messages, batches of {batch}, {lanes} lanes, 3 rounds, msg/s"
    );
    let (mut raw, mut relay) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        raw.push(publish_raw(&*sink, n, batch).await?);
        backlog(url, n, None).await?;
        relay.push(drain_run(url, sink.clone(), config.clone(), lanes, n).await?);
        println!(
            "    round: raw publish {:.0}, relay {:.0}",
            raw[raw.len() - 1],
            relay[relay.len() - 1]
        );
    }
    delete_bench_stream(args).await?;
    let (raw, relay) = (crate::median(&mut raw), crate::median(&mut relay));
    println!(
        "    medians: raw publish {raw:.0}, relay {relay:.0} ({:.1}% of raw)",
        relay / raw * 100.0
    );
    Ok(json!({"nats_raw_publish_msgs": raw, "nats_run_2_lanes_msgs": relay}))
}
