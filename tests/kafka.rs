//! Kafka end to end against a real Kafka-protocol broker (tansu, one per test on a free
//! 127.0.0.1 port): the sink passes the sink conformance suite, the consumer adapter the runner
//! conformance suite.
#![cfg(feature = "kafka")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tidings_inbox::kafka::{KafkaAdapter, KafkaConsumerConfig};
use tidings_relay::sink::{KafkaSink, KafkaSinkConfig};
use tidings_relay::{Envelope, Sink};
use tidings_tests::conformance::{sink_conformance, BrokerUnderTest, Received, SinkFeatures};
use tidings_tests::runner_conformance::{runner_conformance, ConsumerBroker};
use tidings_tests::KafkaServer;

async fn sink(brokers: &str) -> KafkaSink {
    KafkaSink::connect(KafkaSinkConfig {
        brokers: brokers.to_owned(),
        create_topics: true,
        partitions: 3,
        delivery_timeout: Duration::from_millis(800),
        ..Default::default()
    })
    .await
    .unwrap()
}

struct Kafka(KafkaServer);

impl BrokerUnderTest for Kafka {
    fn sink(&self) -> BoxFuture<'_, Arc<dyn Sink>> {
        Box::pin(async move { Arc::new(sink(&self.0.brokers).await) as Arc<dyn Sink> })
    }
    fn read_back(&self) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(async move {
            tidings_tests::kafka_records(&self.0.brokers)
                .await
                .into_iter()
                .map(|(topic, key, h, payload)| {
                    assert_eq!(
                        h.get("Tidings-Topic"),
                        Some(&topic),
                        "topic = Tidings topic"
                    );
                    assert_eq!(
                        key.as_ref(),
                        h.get("Tidings-Key"),
                        "Kafka key = ordering key"
                    );
                    (h["Tidings-Message-Id"].clone(), h, payload)
                })
                .collect()
        })
    }
    fn stop(&mut self) -> BoxFuture<'_, ()> {
        self.0.stop();
        Box::pin(async {})
    }
    fn start(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.restart())
    }
    fn freeze(&self) {
        self.0.signal("-STOP");
    }
    fn thaw(&self) {
        self.0.signal("-CONT");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_sink_passes_the_conformance_suite() {
    sink_conformance(
        &mut Kafka(KafkaServer::start().await),
        SinkFeatures {
            dedup_by_id: false,
            max_payload: Some(1_000_000),
            can_stop: true,
        },
    )
    .await;
}

/// Kafka as the runner conformance suite's broker: published through the relay's Kafka sink
/// (Kafka topic = Tidings topic), consumed by a consumer group per case.
struct KafkaConsumers {
    server: KafkaServer,
    sink: KafkaSink,
    /// Records published per topic (offsets are dense from 0 on this broker).
    published: Mutex<HashMap<String, i64>>,
    /// The topic of each consumer (group).
    topics: Mutex<HashMap<String, String>>,
}

impl ConsumerBroker for KafkaConsumers {
    type Adapter = KafkaAdapter;

    fn publish<'a>(&'a self, messages: &'a [tidings_outbox::WireMessage]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for (i, m) in messages.iter().enumerate() {
                self.sink
                    .publish(&Envelope {
                        seq: i as i64,
                        message: m.clone(),
                    })
                    .await
                    .unwrap();
                *self
                    .published
                    .lock()
                    .unwrap()
                    .entry(m.topic.clone())
                    .or_default() += 1;
            }
        })
    }

    fn adapter<'a>(
        &'a self,
        name: &'a str,
        topic: &'a str,
        _redeliver_after: Duration,
    ) -> BoxFuture<'a, KafkaAdapter> {
        self.topics
            .lock()
            .unwrap()
            .insert(name.to_owned(), topic.to_owned());
        Box::pin(async move {
            KafkaAdapter::connect(&KafkaConsumerConfig {
                brokers: self.server.brokers.clone(),
                group_id: name.to_owned(),
                topics: vec![topic.to_owned()],
                properties: vec![],
            })
            .unwrap()
        })
    }

    fn unacked<'a>(&'a self, name: &'a str) -> BoxFuture<'a, u64> {
        Box::pin(async move {
            let topic = self.topics.lock().unwrap()[name].clone();
            let published = self
                .published
                .lock()
                .unwrap()
                .get(&topic)
                .copied()
                .unwrap_or(0);
            let committed =
                tidings_tests::kafka_committed(&self.server.brokers, name, &topic).await;
            (published - committed).max(0) as u64
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_adapter_passes_the_runner_conformance_suite() {
    let server = KafkaServer::start().await;
    let sink = sink(&server.brokers).await;
    runner_conformance(&KafkaConsumers {
        server,
        sink,
        published: Default::default(),
        topics: Default::default(),
    })
    .await;
}
