//! source: the reading topics' consumer and the rule for what may be committed.
//!
//! # The commit invariant (at-least-once)
//! The offset stored for partition `p` is never greater than the least of:
//! 1. the next offset not yet consumed from `p`,
//! 2. the least offset of a reading of `p` still held in an open window step (the assembler's
//!    low water), and
//! 3. the least offset of `p` held by work in flight: emitted windows until they are scored and
//!    their event (if any) is acknowledged by the broker, and dead letters until acknowledged.
//!
//! So after a crash, the group resumes at or before the first reading whose effect has not been
//! durably published, and every event is published at least once. `enable.auto.offset.store`
//! is off: only [`OffsetLedger::committable`] decides what is stored; librdkafka's auto-commit
//! then commits stored offsets periodically, and shutdown stores its final offsets and commits
//! them synchronously.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext, Statistics, TopicPartitionList};

use crate::config::TopicConfig;
use crate::decode::PayloadKind;
use crate::telemetry::{self, Health};

/// Offsets held by in-flight work, and the consumption position, per partition.
#[derive(Debug, Default)]
pub struct OffsetLedger {
    /// Multiset of held offsets per partition.
    holds: HashMap<i32, BTreeMap<i64, u32>>,
    /// Next offset to consume per partition.
    next: HashMap<i32, i64>,
}

impl OffsetLedger {
    /// Records that the message at `offset` of `partition` has been consumed, and returns the
    /// offset expected next before it (`None` for the first message since the partition was
    /// assigned). Offsets of one partition arrive in increasing order, except after a reset or
    /// a re-assignment, which start over from an earlier offset: the latest one always tells
    /// the position.
    pub fn consumed(&mut self, partition: i32, offset: i64) -> Option<i64> {
        self.next.insert(partition, offset + 1)
    }

    /// Stops reporting a partition as committable (it was revoked). Holds of work still in
    /// flight stay until released, so a partition that comes back never commits past them.
    pub fn forget(&mut self, partition: i32) {
        self.next.remove(&partition);
    }

    /// Holds `offset` of `partition` until a matching [`OffsetLedger::release`].
    pub fn hold(&mut self, partition: i32, offset: i64) {
        *self
            .holds
            .entry(partition)
            .or_default()
            .entry(offset)
            .or_insert(0) += 1;
    }

    pub fn release(&mut self, partition: i32, offset: i64) {
        if let Some(held) = self.holds.get_mut(&partition)
            && let Some(count) = held.get_mut(&offset)
        {
            *count -= 1;
            if *count == 0 {
                held.remove(&offset);
            }
        }
    }

    /// Number of holds in flight.
    pub fn in_flight(&self) -> usize {
        self.holds
            .values()
            .map(|h| h.values().sum::<u32>() as usize)
            .sum()
    }

    /// The offset each consumed partition may commit, given the assembler's low water.
    pub fn committable(&self, low_water: &HashMap<i32, i64>) -> BTreeMap<i32, i64> {
        self.next
            .iter()
            .map(|(&partition, &next)| {
                let held = self
                    .holds
                    .get(&partition)
                    .and_then(|h| h.keys().next().copied())
                    .unwrap_or(i64::MAX);
                let open = low_water.get(&partition).copied().unwrap_or(i64::MAX);
                (partition, next.min(held).min(open))
            })
            .collect()
    }
}

/// Keeps [`Health`] and the lag gauges current from librdkafka's callbacks, and hands the
/// partitions a rebalance revoked to the ingest loop.
pub struct SourceContext {
    pub health: Arc<Health>,
    revoked: Mutex<Vec<(String, i32)>>,
    any_revoked: AtomicBool,
}

impl SourceContext {
    pub fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            revoked: Mutex::new(Vec::new()),
            any_revoked: AtomicBool::new(false),
        }
    }

    /// The partitions revoked since the last call. Cheap when there are none.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        if !self.any_revoked.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.revoked.lock().expect("revoked lock"))
    }
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        let up = statistics.brokers.values().any(|b| b.state == "UP");
        self.health.set_broker_reachable(up);
        for (topic, t) in &statistics.topics {
            for (&partition, p) in &t.partitions {
                if partition >= 0 && p.consumer_lag >= 0 {
                    telemetry::consumer_lag(topic, partition, p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.health.set_broker_reachable(false);
        }
        tracing::warn!(%error, reason, "Kafka client error.");
    }
}

impl ConsumerContext for SourceContext {
    /// Runs inside the consumer's poll, before any message of the new assignment is returned:
    /// the ingest loop sees the revocation before it could see anything else.
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut revoked = self.revoked.lock().expect("revoked lock");
            for element in tpl.elements() {
                revoked.push((element.topic().to_owned(), element.partition()));
            }
            self.any_revoked.store(true, Ordering::Release);
            tracing::info!(partitions = tpl.count(), "Partitions revoked.");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.health.set_assigned_partitions(assigned);
        tracing::info!(assigned, ?rebalance, "Partitions rebalanced.");
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) => telemetry::commit_result(true, None),
            // Nothing to commit is not a failure.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => telemetry::commit_result(false, Some(&error)),
        }
    }
}

/// [`consumer`], subscribed to `topics`, with the payload kind of each topic.
pub fn subscribe(
    client: ClientConfig,
    group_id: &str,
    topics: &[TopicConfig],
    commit_interval: Duration,
    health: Arc<Health>,
) -> anyhow::Result<(StreamConsumer<SourceContext>, HashMap<String, PayloadKind>)> {
    let consumer = consumer(client, group_id, commit_interval.as_millis() as u64, health)?;
    let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    consumer.subscribe(&names)?;
    let kinds = topics.iter().map(|t| (t.name.clone(), t.payload)).collect();
    Ok((consumer, kinds))
}

/// How long librdkafka waits before fetching again for a partition once its local queue holds
/// `queued.min.messages` (100 000 by default). That count is taken of the consumer's one shared
/// queue, so a consumer that works through 100 000 single-reading messages in less than
/// librdkafka's default 1 s backoff sits idle for the rest of it: that capped single-reading
/// ingest at about 155 k messages/s (docs/performance.md). A user's own value wins.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// The group consumer of the reading topics, with offsets stored only by gridwatch.
pub fn consumer(
    mut client: ClientConfig,
    group_id: &str,
    commit_interval_ms: u64,
    health: Arc<Health>,
) -> anyhow::Result<StreamConsumer<SourceContext>> {
    if client.get("fetch.queue.backoff.ms").is_none() {
        client.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    }
    client
        .set("statistics.interval.ms", "5000")
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", commit_interval_ms.to_string())
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    Ok(client.create_with_context(SourceContext::new(health))?)
}

/// Stores `offsets` for librdkafka's auto-commit and, with `sync`, commits them now.
///
/// Stored first also before a synchronous commit: the auto-commit sends the stored offset
/// whenever it is past the last *answered* commit, so an older stored offset sent while the
/// synchronous commit awaits its answer would land after it and move the group back.
pub fn store_and_commit(
    consumer: &StreamConsumer<SourceContext>,
    offsets: &TopicPartitionList,
    sync: bool,
) -> KafkaResult<()> {
    let stored = consumer.store_offsets(offsets);
    if sync {
        return consumer.commit(offsets, CommitMode::Sync);
    }
    if let Err(error) = stored {
        // A partition revoked a moment ago cannot be stored; the next owner resumes from the
        // last commit, which is never past what this instance finished.
        tracing::debug!(%error, "Could not store offsets.");
    }
    Ok(())
}

/// Dense ids for (topic, partition) pairs, so that per-partition state is keyed by one integer,
/// with each topic's payload kind.
#[derive(Debug, Default)]
pub struct SourcePartitions {
    ids: HashMap<String, HashMap<i32, i32>>,
    pairs: Vec<(String, i32)>,
    /// The payload kind of each subscribed topic, and of each id's topic.
    topic_kinds: HashMap<String, PayloadKind>,
    kinds: Vec<PayloadKind>,
    /// Each id's count of consumed messages, labelled by topic.
    messages: Vec<metrics::Counter>,
    /// The last id handed out: consecutive messages mostly come from one partition (a fetch
    /// returns runs of them), and comparing a short topic name is cheaper than hashing it.
    last: Option<i32>,
}

impl SourcePartitions {
    pub fn new(topic_kinds: HashMap<String, PayloadKind>) -> Self {
        Self {
            topic_kinds,
            ..Self::default()
        }
    }

    pub fn id(&mut self, topic: &str, partition: i32) -> i32 {
        if let Some(last) = self.last {
            let (t, p) = &self.pairs[last as usize];
            if *p == partition && t == topic {
                return last;
            }
        }
        let id = self.lookup(topic, partition);
        self.last = Some(id);
        id
    }

    fn lookup(&mut self, topic: &str, partition: i32) -> i32 {
        if let Some(id) = self.ids.get(topic).and_then(|p| p.get(&partition)) {
            return *id;
        }
        let id = self.pairs.len() as i32;
        self.pairs.push((topic.to_owned(), partition));
        self.kinds
            .push(self.topic_kinds.get(topic).copied().unwrap_or_default());
        self.messages
            .push(telemetry::messages_consumed_counter(topic));
        self.ids
            .entry(topic.to_owned())
            .or_default()
            .insert(partition, id);
        id
    }

    /// How many ids have been handed out.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub fn pair(&self, id: i32) -> &(String, i32) {
        &self.pairs[id as usize]
    }

    /// The counter of messages consumed from the topic of `id`.
    pub fn messages(&self, id: i32) -> &metrics::Counter {
        &self.messages[id as usize]
    }

    /// The payload kind of the topic of `id`.
    pub fn kind(&self, id: i32) -> PayloadKind {
        self.kinds[id as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_never_passes_held_open_or_unconsumed_offsets() {
        let mut ledger = OffsetLedger::default();
        for offset in 0..10 {
            ledger.consumed(0, offset);
        }
        ledger.consumed(1, 4);
        let none = HashMap::new();
        assert_eq!(ledger.committable(&none), BTreeMap::from([(0, 10), (1, 5)]));
        // A window in flight holds offset 3; the assembler still has offset 6 of partition 0.
        ledger.hold(0, 3);
        ledger.hold(0, 3);
        let low = HashMap::from([(0, 6)]);
        assert_eq!(ledger.committable(&low)[&0], 3);
        ledger.release(0, 3);
        assert_eq!(
            ledger.committable(&low)[&0],
            3,
            "one hold of offset 3 is left"
        );
        ledger.release(0, 3);
        assert_eq!(ledger.committable(&low)[&0], 6);
        assert_eq!(ledger.committable(&none)[&0], 10);
        assert_eq!(ledger.in_flight(), 0);
    }

    #[test]
    fn releasing_unknown_holds_is_harmless() {
        let mut ledger = OffsetLedger::default();
        ledger.release(3, 9);
        // A reset to an earlier offset moves the position back.
        ledger.consumed(3, 7);
        ledger.consumed(3, 0);
        assert_eq!(ledger.committable(&HashMap::new())[&3], 1);
        ledger.forget(3);
        assert!(ledger.committable(&HashMap::new()).is_empty());
    }
}
