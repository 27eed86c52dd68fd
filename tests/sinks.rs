//! The conformance suite every sink must pass, with capability flags for what a broker can do.
//! Future sinks (RabbitMQ, Redis Streams, Kafka, HTTP) add one test calling `conformance`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tidings_outbox::{MessageId, WireMessage};
use tidings_relay::sink::{NatsSink, NatsSinkConfig, StdoutSink};
use tidings_relay::{Envelope, Sink, SinkError};
use tidings_tests::NatsServer;

/// What a sink's broker can do.
struct Features {
    /// The broker drops a re-send with the same message id and says so (`Delivery::duplicate`).
    dedup_by_id: bool,
    /// Largest payload the broker takes; a larger one must fail as `Permanent`.
    max_payload: Option<usize>,
}

/// A message as the broker stored it: id, headers, payload.
type Received = (String, BTreeMap<String, String>, Vec<u8>);

fn envelope(i: i64, key: Option<&str>) -> Envelope {
    Envelope {
        seq: i,
        message: WireMessage {
            id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            topic: "conformance.test".into(),
            key: key.map(str::to_owned),
            biz_id: Some(format!("biz-{i}")),
            payload: Bytes::from(format!("{{\"n\":{i}}}")),
            headers: BTreeMap::from([(
                "traceparent".to_owned(),
                format!("00-{i:032x}-{i:016x}-01"),
            )]),
            created_at: Some(chrono::Utc::now()),
            attempts: 0,
        },
    }
}

async fn conformance<F, Fut>(sink: Arc<dyn Sink>, features: Features, read_back: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Vec<Received>>,
{
    // 1. Concurrent publishes all succeed and arrive intact, with the Tidings headers.
    let msgs: Vec<Envelope> = (0..50)
        .map(|i| envelope(i, if i % 2 == 0 { Some("k") } else { None }))
        .collect();
    let results = futures::future::join_all(msgs.iter().map(|m| sink.publish(m))).await;
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    let got = read_back(50).await;
    assert_eq!(got.len(), 50);
    let by_id: BTreeMap<_, _> = got.into_iter().map(|(id, h, p)| (id, (h, p))).collect();
    for m in &msgs {
        let (h, p) = by_id
            .get(&m.id.to_string())
            .expect("every message arrives, carrying its id");
        assert_eq!(p, &m.payload.to_vec());
        assert_eq!(h.get("Tidings-Biz-Id"), m.biz_id.as_ref());
        assert_eq!(h.get("Tidings-Key"), m.key.as_ref());
        assert_eq!(
            h.get("Tidings-Topic").map(String::as_str),
            Some("conformance.test")
        );
        assert_eq!(h.get("traceparent"), m.headers.get("traceparent"));
    }
    // 2. A re-send of the same message id.
    let again = sink.publish(&msgs[0]).await.unwrap();
    if features.dedup_by_id {
        assert!(again.duplicate, "the broker recognises the re-send");
        assert_eq!(read_back(50).await.len(), 50, "and stores it once");
    }
    // 3. A payload the broker can never take fails as permanent, not retryable.
    if let Some(max) = features.max_payload {
        let mut big = envelope(99, None);
        big.payload = Bytes::from(vec![b'x'; max + 1]);
        match sink.publish(&big).await {
            Err(SinkError::Permanent(_)) => {}
            other => panic!("oversized payload must be permanent: {other:?}"),
        }
    }
}

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn stdout_sink_passes_the_conformance_suite() {
    let buf = Buffer::default();
    let sink = Arc::new(StdoutSink::new(Box::new(buf.clone())));
    conformance(
        sink,
        Features {
            dedup_by_id: false,
            max_payload: None,
        },
        |_| {
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            async move {
                text.lines()
                    .map(|l| {
                        let v: serde_json::Value = serde_json::from_str(l).unwrap();
                        let mut h: BTreeMap<String, String> =
                            serde_json::from_value(v["headers"].clone()).unwrap();
                        // stdout prints the envelope fields as JSON fields, not as Tidings-* headers.
                        if let Some(b) = v["biz_id"].as_str() {
                            h.insert("Tidings-Biz-Id".into(), b.into());
                        }
                        if let Some(k) = v["key"].as_str() {
                            h.insert("Tidings-Key".into(), k.into());
                        }
                        h.insert("Tidings-Topic".into(), v["topic"].as_str().unwrap().into());
                        (
                            v["id"].as_str().unwrap().to_owned(),
                            h,
                            v["payload"].to_string().into_bytes(),
                        )
                    })
                    .collect()
            }
        },
    )
    .await;
}

#[tokio::test]
async fn nats_sink_passes_the_conformance_suite() {
    let nats = NatsServer::start().await;
    let sink = Arc::new(
        NatsSink::connect(NatsSinkConfig {
            url: nats.url.clone(),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let url = nats.url.clone();
    conformance(
        sink,
        Features {
            dedup_by_id: true,
            max_payload: Some(1024 * 1024),
        },
        |_| {
            let url = url.clone();
            async move {
                tidings_tests::stream_messages(&url, "TIDINGS")
                    .await
                    .into_iter()
                    .map(|m| {
                        let h: BTreeMap<String, String> = m
                            .headers
                            .iter()
                            .flat_map(|h| h.iter())
                            .map(|(k, v)| {
                                (
                                    k.to_string(),
                                    v.first().map(|v| v.to_string()).unwrap_or_default(),
                                )
                            })
                            .collect();
                        assert_eq!(h["Nats-Msg-Id"], h["Tidings-Message-Id"]);
                        (h["Nats-Msg-Id"].clone(), h, m.payload.to_vec())
                    })
                    .collect()
            }
        },
    )
    .await;
}
