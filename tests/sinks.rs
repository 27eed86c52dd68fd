//! Every sink passes the conformance suite (`tidings_tests::conformance`), against its real
//! broker. A new broker's sink adds one test here: a `BrokerUnderTest` and its features.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tidings_relay::sink::{NatsSink, NatsSinkConfig, StdoutSink};
use tidings_relay::Sink;
use tidings_tests::conformance::{sink_conformance, BrokerUnderTest, Received, SinkFeatures};
use tidings_tests::NatsServer;

/// An in-memory "terminal" the stdout sink writes its JSON lines to.
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

struct Stdout(Buffer);

impl BrokerUnderTest for Stdout {
    fn sink(&self) -> BoxFuture<'_, Arc<dyn Sink>> {
        let buf = self.0.clone();
        Box::pin(async move { Arc::new(StdoutSink::new(Box::new(buf))) as Arc<dyn Sink> })
    }
    fn read_back(&self) -> BoxFuture<'_, Vec<Received>> {
        let text = String::from_utf8(self.0 .0.lock().unwrap().clone()).unwrap();
        Box::pin(async move {
            text.lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let mut h: BTreeMap<String, String> =
                        serde_json::from_value(v["headers"].clone()).unwrap();
                    // stdout prints the envelope as JSON fields, not as Tidings-* headers.
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
        })
    }
    fn stop(&mut self) -> BoxFuture<'_, ()> {
        unreachable!("declared: can_stop = false")
    }
    fn start(&mut self) -> BoxFuture<'_, ()> {
        unreachable!("declared: can_stop = false")
    }
    fn freeze(&self) {
        unreachable!("declared: can_stop = false")
    }
    fn thaw(&self) {
        unreachable!("declared: can_stop = false")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_sink_passes_the_conformance_suite() {
    sink_conformance(
        &mut Stdout(Buffer::default()),
        SinkFeatures {
            dedup_by_id: false,
            max_payload: None,
            // A terminal has no outage the harness could cause; the process tests cover a
            // reader that stops reading.
            can_stop: false,
        },
    )
    .await;
}

struct Nats(NatsServer);

impl BrokerUnderTest for Nats {
    fn sink(&self) -> BoxFuture<'_, Arc<dyn Sink>> {
        Box::pin(async move {
            Arc::new(
                NatsSink::connect(NatsSinkConfig {
                    url: self.0.url.clone(),
                    ..Default::default()
                })
                .await
                .unwrap(),
            ) as Arc<dyn Sink>
        })
    }
    fn read_back(&self) -> BoxFuture<'_, Vec<Received>> {
        Box::pin(async move {
            tidings_tests::stream_messages(&self.0.url, "TIDINGS")
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
async fn nats_sink_passes_the_conformance_suite() {
    sink_conformance(
        &mut Nats(NatsServer::start().await),
        SinkFeatures {
            dedup_by_id: true,
            max_payload: Some(1024 * 1024),
            can_stop: true,
        },
    )
    .await;
}
