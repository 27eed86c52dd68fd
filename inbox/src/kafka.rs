//! The Kafka adapter of the consumer runner ([`crate::runner`]): a consumer group whose records
//! the runner handles through the inbox.
//!
//! Offsets: a partition's offset is committed only past records whose inbox transactions have
//! all committed (a cursor from where the assignment started, moved over finished offsets one
//! by one), so no gap is ever committed past, also when records fetched before a rebalance
//! finish after it; a record left unfinished (shutdown) keeps the offset before it, and the
//! group resumes there, in partition order. On a rebalance the revoked partitions' finished offsets are
//! committed synchronously, and acks of their records still in flight are dropped (another
//! member gets them again; the inbox absorbs an effect that committed meanwhile). Kafka has no
//! redelivery timer, so nothing needs holding; the runner's own retry count parks a poison
//! record instead of blocking its partition forever.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tidings_outbox::{MessageId, WireMessage};

use crate::runner::{AdapterError, Decoded, Delivered, Deliveries, Delivery};
use crate::Error;

/// Kafka consumer settings.
#[derive(Clone)]
pub struct KafkaConsumerConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Consumer group id (commonly the inbox consumer name).
    pub group_id: String,
    /// Kafka topics to consume.
    pub topics: Vec<String>,
    /// Any librdkafka property (TLS, SASL, ...), applied after the adapter's own. Values are
    /// never logged.
    pub properties: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.properties.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaConsumerConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("properties", &names)
            .finish()
    }
}

/// Per partition: the assignment (generation) and the offsets finished in it.
#[derive(Default)]
struct Tracker {
    partitions: HashMap<(String, i32), PartitionState>,
}

/// The commit cursor of one assigned partition. It starts at the offset the assignment starts
/// from (the group's committed offset) and moves only over offsets whose records are finished,
/// one by one: records fetched before a rebalance and handed out after it (beyond the restart
/// point) can finish first without the commit passing the records before them. Offsets are
/// taken to be dense (a topic the relay writes: no compaction, no transactions); a gap stops
/// the cursor, which costs redeliveries after a restart, never a lost record.
#[derive(Default)]
struct PartitionState {
    /// Whether the partition is assigned to this member now. Records of a partition that is
    /// not (fetched before it was revoked, handed out after) are still handled, but never
    /// move a commit: the partition's owner commits it.
    assigned: bool,
    generation: u64,
    /// Next offset to commit (every record below it is finished); None until known.
    cursor: Option<i64>,
    /// Finished offsets at or above the cursor.
    done: BTreeSet<i64>,
    /// Last offset committed.
    committed: Option<i64>,
}

impl PartitionState {
    fn finish(&mut self, offset: i64) {
        let Some(mut cursor) = self.cursor else {
            return;
        };
        if offset < cursor {
            return;
        }
        self.done.insert(offset);
        while self.done.remove(&cursor) {
            cursor += 1;
        }
        self.cursor = Some(cursor);
    }
}

impl Tracker {
    /// Offsets worth committing now (cursors advanced since the last commit).
    fn due(&mut self, only: Option<&(String, i32)>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (tp, s) in &mut self.partitions {
            if only.is_some_and(|o| o != tp) {
                continue;
            }
            if !s.assigned {
                continue;
            }
            if let Some(point) = s.cursor {
                if s.committed.is_none_or(|c| c < point) {
                    let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(point));
                    s.committed = Some(point);
                }
            }
        }
        tpl
    }
}

/// Commits what is finished of revoked partitions, then forgets them (acks of their records
/// still in flight are dropped); learns where newly assigned partitions start.
struct Context {
    tracker: Arc<Mutex<Tracker>>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let tpl = {
                let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
                let mut tpl = TopicPartitionList::new();
                for e in revoked.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    if let Some(s) = t.partitions.get_mut(&tp) {
                        if let Some(point) = s.cursor {
                            if s.committed.is_none_or(|c| c < point) {
                                let _ =
                                    tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(point));
                            }
                        }
                        *s = PartitionState {
                            assigned: false,
                            generation: s.generation + 1,
                            ..Default::default()
                        };
                    }
                }
                tpl
            };
            if tpl.count() > 0 {
                if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                    tracing::warn!(error = %e, "cannot commit revoked partitions' offsets; their records come again");
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            // Where each partition starts: the group's committed offset (none: its first
            // record, as no one has finished anything of it).
            let committed = consumer
                .committed_offsets((*assigned).clone(), Duration::from_secs(10))
                .map_err(|e| tracing::warn!(error = %e, "cannot read committed offsets; commits wait for the first record"))
                .ok();
            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            for e in assigned.elements() {
                let tp = (e.topic().to_owned(), e.partition());
                let start = committed.as_ref().and_then(|c| {
                    c.find_partition(&tp.0, tp.1)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                });
                let s = t.partitions.entry(tp).or_default();
                *s = PartitionState {
                    assigned: true,
                    generation: s.generation + 1,
                    cursor: start,
                    committed: start,
                    ..Default::default()
                };
            }
        }
    }
}

/// The Kafka side of a consumer: a group member subscribed to the configured topics.
pub struct KafkaAdapter {
    inner: Arc<Inner>,
}

struct Inner {
    consumer: StreamConsumer<Context>,
    tracker: Arc<Mutex<Tracker>>,
}

impl KafkaAdapter {
    /// Creates the group member and subscribes (offsets are committed by the adapter only;
    /// a new group starts at the earliest record).
    pub fn connect(config: &KafkaConsumerConfig) -> Result<Self, Error> {
        let bad = |reason| Error::Invalid {
            what: "kafka consumer config",
            reason,
        };
        if config.topics.is_empty() {
            return Err(bad("name at least one topic"));
        }
        if config.group_id.is_empty() {
            return Err(bad("group_id must not be empty"));
        }
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("client.id", "tidings-consumer")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // The runner may stop reading while its slots are busy: a long pause must not
            // cost the group membership.
            .set("max.poll.interval.ms", "600000");
        for (k, v) in &config.properties {
            cc.set(k, v);
        }
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let consumer: StreamConsumer<Context> = cc
            .create_with_context(Context {
                tracker: tracker.clone(),
            })
            .map_err(|e| Error::Database(format!("kafka consumer config: {e}").into()))?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| Error::Database(format!("cannot subscribe to {topics:?}: {e}").into()))?;
        Ok(KafkaAdapter {
            inner: Arc::new(Inner { consumer, tracker }),
        })
    }
}

impl Inner {
    /// Commits the partitions whose commit point moved (all, or one).
    fn commit_due(&self, only: Option<&(String, i32)>, mode: CommitMode) {
        let tpl = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .due(only);
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, mode) {
                tracing::warn!(error = %e, "cannot commit offsets; those records may come again");
            }
        }
    }
}

impl crate::runner::Adapter for KafkaAdapter {
    type Delivery = KafkaDelivery;

    fn open(&self) -> BoxFuture<'_, Result<Deliveries<'_, KafkaDelivery>, AdapterError>> {
        Box::pin(async move {
            let inner = self.inner.clone();
            Ok(self
                .inner
                .consumer
                .stream()
                .map(move |m| {
                    let m = m.map_err(AdapterError::from)?.detach();
                    let tp = (m.topic().to_owned(), m.partition());
                    let generation = {
                        let mut t = inner.tracker.lock().unwrap_or_else(|p| p.into_inner());
                        let s = t.partitions.entry(tp.clone()).or_default();
                        if !s.assigned {
                            // Not ours (any more): handled, never committed by us.
                            u64::MAX
                        } else {
                            // A partition nobody committed starts at its first record.
                            if s.cursor.is_none() {
                                s.cursor = Some(m.offset());
                            }
                            s.generation
                        }
                    };
                    Ok(KafkaDelivery {
                        generation,
                        tp,
                        msg: m,
                        inner: inner.clone(),
                    })
                })
                .boxed())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            // A synchronous commit blocks: off the runtime.
            let _ =
                tokio::task::spawn_blocking(move || inner.commit_due(None, CommitMode::Sync)).await;
        })
    }

    fn hold_interval(&self) -> Option<Duration> {
        None
    }
}

/// A Kafka record.
pub struct KafkaDelivery {
    msg: OwnedMessage,
    tp: (String, i32),
    generation: u64,
    inner: Arc<Inner>,
}

impl KafkaDelivery {
    /// The record.
    pub fn record(&self) -> &OwnedMessage {
        &self.msg
    }
}

/// Debezium's outbox router puts the event id in this header.
const DEBEZIUM_ID: &str = "id";

impl Delivery for KafkaDelivery {
    fn decode(&self) -> Decoded {
        let headers: BTreeMap<String, String> = self
            .msg
            .headers()
            .map(|h| {
                h.iter()
                    .filter_map(|h| {
                        let v = std::str::from_utf8(h.value?).ok()?;
                        Some((h.key.to_owned(), v.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let fallback = headers
            .get(DEBEZIUM_ID)
            .and_then(|v| v.parse::<MessageId>().ok());
        let payload = bytes::Bytes::copy_from_slice(self.msg.payload().unwrap_or_default());
        let decoded = WireMessage::decode(
            headers
                .iter()
                .filter(|(k, _)| k.as_str() != DEBEZIUM_ID)
                .map(|(k, v)| (k.as_str(), v.as_str())),
            payload.clone(),
            fallback,
            self.msg.topic(),
        );
        let delivered = |message| Delivered {
            message,
            source: self.msg.topic().to_owned(),
            delivery: 1,
            replayed: false,
        };
        match decoded {
            Ok(m) => Decoded::Message(delivered(m)),
            Err(e) => {
                // Stable per record, so a lost ack after parking does not park it twice.
                let id = uuid::Uuid::from_u64_pair(
                    fnv(self.msg.topic()) ^ self.msg.partition() as u64,
                    self.msg.offset() as u64,
                );
                Decoded::Unusable {
                    parked_as: delivered(WireMessage {
                        id: MessageId::from_uuid(id),
                        topic: self.msg.topic().to_owned(),
                        key: None,
                        biz_id: None,
                        headers,
                        payload,
                        created_at: None,
                        attempts: 0,
                    }),
                    reason: format!("not a Tidings message: {e}"),
                }
            }
        }
    }

    fn ack(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async move {
            {
                let mut t = self.inner.tracker.lock().unwrap_or_else(|p| p.into_inner());
                match t.partitions.get_mut(&self.tp) {
                    Some(s) if s.generation == self.generation => s.finish(self.msg.offset()),
                    // Revoked meanwhile: another member has the partition now.
                    _ => return Ok(()),
                }
            }
            // Asynchronous: librdkafka queues the commit and returns at once.
            self.inner.commit_due(Some(&self.tp), CommitMode::Async);
            Ok(())
        })
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
