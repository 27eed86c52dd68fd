//! The Kafka adapter of the consumer runner ([`crate::runner`]): a consumer group whose records
//! the runner handles through the inbox.
//!
//! Offsets: a partition's offset is committed only past records whose inbox transactions have
//! all committed (a cursor from where the assignment started, moved over finished offsets
//! and over offsets the broker showed have no record), so no unfinished record is ever
//! committed past, also when records fetched before a rebalance finish after it; a record left
//! unfinished (shutdown) keeps the offset before it, and the group resumes there, in partition
//! order. On a rebalance the revoked partitions' finished offsets are committed synchronously, and acks of their records still in flight are dropped (another
//! member gets them again; the inbox absorbs an effect that committed meanwhile). Kafka has no
//! redelivery timer, so nothing needs holding; the runner's own retry count parks a poison
//! record instead of blocking its partition forever.

use std::collections::{BTreeMap, HashMap};
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
    /// Any librdkafka property (TLS, SASL, ...), applied after the adapter's own, except
    /// `enable.auto.commit` and `enable.auto.offset.store`, which stay off. Values are never
    /// logged.
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
/// or that the broker showed are not in the log: records fetched before a rebalance and handed
/// out after it (beyond the restart point) can finish first without the commit passing the
/// records before them.
///
/// Offsets need not be dense. The broker hands out a partition's records in offset order, so
/// an offset it jumped over within one assignment (compaction, transaction markers, aborted
/// records, or retention having deleted records beyond the committed offset) never comes: it
/// counts as finished, or the commit would stop at it for good.
#[derive(Default)]
struct PartitionState {
    /// Whether the partition is assigned to this member now. Records of a partition that is
    /// not (fetched before it was revoked, handed out after) are still handled, but never
    /// move a commit: the partition's owner commits it.
    assigned: bool,
    generation: u64,
    /// Next offset to commit (every record below it is finished); None until known.
    cursor: Option<i64>,
    /// Finished offset ranges at or above the cursor: start -> end (exclusive).
    done: BTreeMap<i64, i64>,
    /// The offset after the last record handed out in this assignment.
    next: Option<i64>,
    /// Last offset committed.
    committed: Option<i64>,
}

impl PartitionState {
    fn finish(&mut self, offset: i64) {
        self.finish_range(offset, offset + 1);
    }

    fn finish_range(&mut self, start: i64, end: i64) {
        let Some(mut cursor) = self.cursor else {
            return;
        };
        if end <= cursor {
            return;
        }
        let start = start.max(cursor);
        let end = self.done.get(&start).map_or(end, |e| (*e).max(end));
        self.done.insert(start, end);
        while let Some((&s, &e)) = self.done.first_key_value() {
            if s > cursor {
                break;
            }
            self.done.pop_first();
            cursor = cursor.max(e);
        }
        self.cursor = Some(cursor);
    }

    /// A record at `offset` is handed out: offsets the broker jumped over since the last one
    /// (or since the assignment's start) are not in the log.
    fn handed_out(&mut self, tp: &(String, i32), offset: i64) {
        let from = match (self.next, self.cursor) {
            (Some(next), _) => next,
            (None, Some(start)) => start,
            (None, None) => {
                tracing::debug!(topic = %tp.0, partition = tp.1, offset,
                    "no committed offset known: the cursor starts at the first record");
                self.cursor = Some(offset);
                offset
            }
        };
        if offset > from {
            if self.next.is_none() {
                // Loud: on a real Kafka broker this means records were deleted unconsumed.
                tracing::warn!(topic = %tp.0, partition = tp.1, from, to = offset,
                    "the broker resumed the partition after its committed offset: the records in between are not in the log (retention or compaction); skipped");
            } else {
                tracing::debug!(topic = %tp.0, partition = tp.1, from, to = offset,
                    "offsets without records (compaction or transaction markers)");
            }
            self.finish_range(from, offset);
        }
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
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
                        tracing::debug!(topic = %tp.0, partition = tp.1, cursor = ?s.cursor,
                            committed = ?s.committed, pending = s.done.len(), "partition revoked");
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
                tracing::debug!(topic = %tp.0, partition = tp.1, start = ?start, "partition assigned");
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
        // Never overridable: librdkafka committing on its own would commit past records whose
        // inbox transactions have not committed.
        cc.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let consumer: StreamConsumer<Context> = cc
            .create_with_context(Context {
                tracker: tracker.clone(),
            })
            .map_err(|e| {
                // Not rdkafka's own text for a refused property: it ends with the value, which
                // may be a password.
                let why = match &e {
                    rdkafka::error::KafkaError::ClientConfig(_, desc, key, _) => {
                        format!("{key}: {desc}")
                    }
                    e => e.to_string(),
                };
                Error::Database(format!("kafka consumer config: {why}").into())
            })?;
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
            tracing::trace!(offsets = ?tpl, "commit");
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
                            s.handed_out(&tp, m.offset());
                            s.generation
                        }
                    };
                    tracing::trace!(topic = %tp.0, partition = tp.1, offset = m.offset(), generation, "record");
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

impl KafkaDelivery {
    fn delivered(&self, message: WireMessage) -> Delivered {
        Delivered {
            message,
            source: self.msg.topic().to_owned(),
            delivery: 1,
            replayed: false,
        }
    }

    /// Parked under an id stable per record, so a lost ack after parking does not park it twice.
    fn unusable(
        &self,
        headers: BTreeMap<String, String>,
        payload: bytes::Bytes,
        reason: String,
    ) -> Decoded {
        let id = uuid::Uuid::from_u64_pair(
            fnv(self.msg.topic()) ^ self.msg.partition() as u64,
            self.msg.offset() as u64,
        );
        Decoded::Unusable {
            parked_as: self.delivered(WireMessage {
                id: MessageId::from_uuid(id),
                topic: self.msg.topic().to_owned(),
                key: None,
                biz_id: None,
                headers,
                payload,
                created_at: None,
                attempts: 0,
            }),
            reason,
        }
    }
}

impl Delivery for KafkaDelivery {
    fn decode(&self) -> Decoded {
        // rdkafka 0.39 unwraps a header NAME as UTF-8 (`Headers::try_get`), and Kafka does not
        // check names: one hostile record would panic the runner on every redelivery. Caught,
        // and the record parked without its headers.
        let headers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.msg
                .headers()
                .map(|h| {
                    h.iter()
                        .filter_map(|h| {
                            let v = std::str::from_utf8(h.value?).ok()?;
                            Some((h.key.to_owned(), v.to_owned()))
                        })
                        .collect::<BTreeMap<String, String>>()
                })
                .unwrap_or_default()
        }));
        let payload = bytes::Bytes::copy_from_slice(self.msg.payload().unwrap_or_default());
        let headers = match headers {
            Ok(h) => h,
            Err(_) => {
                return self.unusable(
                    BTreeMap::new(),
                    payload,
                    "not a Tidings message: a header name is not UTF-8".into(),
                )
            }
        };
        let fallback = headers
            .get(DEBEZIUM_ID)
            .and_then(|v| v.parse::<MessageId>().ok());
        let decoded = WireMessage::decode(
            headers
                .iter()
                .filter(|(k, _)| k.as_str() != DEBEZIUM_ID)
                .map(|(k, v)| (k.as_str(), v.as_str())),
            payload.clone(),
            fallback,
            self.msg.topic(),
        );
        match decoded {
            Ok(m) => Decoded::Message(self.delivered(m)),
            Err(e) => self.unusable(headers, payload, format!("not a Tidings message: {e}")),
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

    /// False once the record's partition was revoked from this member (its next owner gets
    /// the record again from the committed offset).
    fn is_live(&self) -> bool {
        let t = self.inner.tracker.lock().unwrap_or_else(|p| p.into_inner());
        t.partitions
            .get(&self.tp)
            .is_some_and(|s| s.assigned && s.generation == self.generation)
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::PartitionState;

    fn assigned(start: Option<i64>) -> PartitionState {
        PartitionState {
            assigned: true,
            cursor: start,
            committed: start,
            ..Default::default()
        }
    }

    #[test]
    fn the_cursor_passes_only_finished_or_missing_offsets() {
        let tp = ("t".to_owned(), 0);
        let mut s = assigned(Some(10));
        for o in 10..15 {
            s.handed_out(&tp, o);
        }
        // Finished out of order: the cursor waits for 10.
        s.finish(12);
        s.finish(11);
        assert_eq!(s.cursor, Some(10));
        s.finish(10);
        assert_eq!(s.cursor, Some(13));
        // 15..20 have no records (compaction): jumped over once 13 and 14 finish.
        s.handed_out(&tp, 20);
        s.finish(14);
        assert_eq!(s.cursor, Some(13));
        s.finish(13);
        assert_eq!(s.cursor, Some(20));
        s.finish(20);
        assert_eq!(s.cursor, Some(21));
        assert!(s.done.is_empty());
    }

    #[test]
    fn a_resume_after_the_committed_offset_skips_what_the_log_no_longer_has() {
        let tp = ("t".to_owned(), 0);
        let mut s = assigned(Some(100));
        // Retention deleted 100..5000: the broker resumes at the log start.
        s.handed_out(&tp, 5000);
        assert_eq!(s.cursor, Some(5000));
        // A redelivered lower offset neither moves the cursor back nor makes a gap.
        s.handed_out(&tp, 4990);
        s.handed_out(&tp, 5001);
        s.finish(5001);
        s.finish(5000);
        assert_eq!(s.cursor, Some(5002));
        // Unknown start: the first record is where the cursor starts.
        let mut s = assigned(None);
        s.handed_out(&tp, 7);
        assert_eq!(s.cursor, Some(7));
        s.finish(7);
        assert_eq!(s.cursor, Some(8));
    }
}
