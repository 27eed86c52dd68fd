//! What the relay records through the `metrics` facade: nothing happens unless the application
//! installs a recorder (the `tidings relay` binary installs a Prometheus one with
//! `--admin-listen`). Names follow Prometheus conventions (`_total` counters, `_seconds`
//! histograms); labels are bounded: the sink's name, and the topic, of which at most
//! [`MAX_TOPIC_LABELS`] distinct values are used (later topics are counted under `(other)`, which no topic can be: topics are A-Z a-z 0-9 _ - and dots).
//! Never a message id or a biz-id.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// Messages locked by claims.
pub const CLAIMED: &str = "tidings_relay_claimed_total";
/// Messages the broker acknowledged (removed from the outbox).
pub const DELIVERED: &str = "tidings_relay_delivered_total";
/// Of those, acknowledged as a duplicate of an earlier send (dropped by the broker's dedup).
pub const DUPLICATES: &str = "tidings_relay_broker_duplicates_total";
/// Failed publishes scheduled for a retry (an attempt counted).
pub const RETRIED: &str = "tidings_relay_retried_total";
/// Messages moved to the dead-letter store.
pub const DEAD_LETTERED: &str = "tidings_relay_dead_lettered_total";
/// Messages whose destination was down (waiting, no attempt counted).
pub const POSTPONED: &str = "tidings_relay_postponed_total";
/// Messages released untouched (broker unavailable, or behind a failed message of their key).
pub const RELEASED: &str = "tidings_relay_released_total";
/// Seconds from sending a batch's first publish to the broker's last answer (all its rounds:
/// a keyed chain goes one message after the other).
pub const PUBLISH_SECONDS: &str = "tidings_relay_publish_duration_seconds";
/// Seconds of a whole batch: claim, publish, record, commit.
pub const BATCH_SECONDS: &str = "tidings_relay_batch_duration_seconds";
/// 1 while the relay backs off because the broker is unavailable, else 0 (label: sink).
pub const SINK_UNAVAILABLE: &str = "tidings_relay_sink_unavailable";
/// Ticks that failed on the database.
pub const DB_ERRORS: &str = "tidings_relay_database_errors_total";

/// Gauges read from the database when `/metrics` is scraped (see `tidings status`).
/// Messages in the outbox.
pub const BACKLOG: &str = "tidings_outbox_backlog";
/// Of those, due now.
pub const DUE: &str = "tidings_outbox_due";
/// Of those, with at least one failed attempt.
pub const RETRYING: &str = "tidings_outbox_retrying";
/// Seconds since the oldest due message first became due.
pub const OLDEST_DUE_AGE: &str = "tidings_outbox_oldest_due_age_seconds";
/// Messages in the dead-letter store.
pub const DEAD_LETTERS: &str = "tidings_dead_letters";
/// Relay instances whose heartbeat is recent.
pub const RELAYS_ALIVE: &str = "tidings_relays_alive";
/// Consumer messages parked in `tidings.inbox_dead_letters`.
pub const INBOX_PARKED: &str = "tidings_inbox_parked";
/// 1 when the last scrape could read the database, else 0.
pub const DATABASE_UP: &str = "tidings_database_up";

/// Histogram buckets in seconds (publish, batch, handler and lag durations).
pub const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// At most this many distinct topic label values.
pub const MAX_TOPIC_LABELS: usize = 200;

/// The label value for `topic`: itself while fewer than [`MAX_TOPIC_LABELS`] topics were seen,
/// else `(other)` (parentheses are not allowed in topics, so it cannot be mistaken for one).
pub fn topic_label(topic: &str) -> String {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    if seen.contains(topic) {
        return topic.to_owned();
    }
    if seen.len() < MAX_TOPIC_LABELS {
        seen.insert(topic.to_owned());
        return topic.to_owned();
    }
    "(other)".to_owned()
}

/// Every metric name the relay and `/metrics` use, with its help text (for the README's list
/// and the exporter's `# HELP` lines).
pub const DESCRIPTIONS: &[(&str, &str)] = &[
    (CLAIMED, "Messages locked by the relay's claims."),
    (DELIVERED, "Messages the broker acknowledged and the relay removed from the outbox."),
    (DUPLICATES, "Deliveries the broker reported as a duplicate of an earlier send."),
    (RETRIED, "Failed publishes scheduled for a retry (an attempt counted)."),
    (DEAD_LETTERED, "Messages moved to the dead-letter store."),
    (POSTPONED, "Messages whose destination was down: waiting, no attempt counted."),
    (RELEASED, "Messages released untouched (broker unavailable, or behind a failed message of their key)."),
    (PUBLISH_SECONDS, "Seconds from sending a batch's first publish to the broker's last answer."),
    (BATCH_SECONDS, "Seconds of a whole batch: claim, publish, record, commit."),
    (SINK_UNAVAILABLE, "1 while the relay backs off because the broker is unavailable."),
    (DB_ERRORS, "Relay ticks that failed on the database."),
    (BACKLOG, "Messages in the outbox (read at scrape time)."),
    (DUE, "Messages in the outbox that are due now."),
    (RETRYING, "Messages in the outbox with at least one failed attempt."),
    (OLDEST_DUE_AGE, "Seconds since the oldest due message first became due (retries do not reset it)."),
    (DEAD_LETTERS, "Messages in the dead-letter store."),
    (RELAYS_ALIVE, "Relay instances with a recent heartbeat."),
    (INBOX_PARKED, "Consumer messages parked in tidings.inbox_dead_letters."),
    (DATABASE_UP, "1 when the last scrape could read the database."),
];

/// Registers the help texts with the installed recorder (call once, after installing it).
pub fn describe() {
    for (name, help) in DESCRIPTIONS {
        if name.ends_with("_total") {
            metrics::describe_counter!(*name, *help);
        } else if name.ends_with("_duration_seconds") {
            metrics::describe_histogram!(*name, metrics::Unit::Seconds, *help);
        } else {
            metrics::describe_gauge!(*name, *help);
        }
    }
}
