//! table: a compacted topic read whole by every instance, as a table kept current.
//!
//! Invariants:
//! - Every instance reads every partition of the topic itself from its beginning (plain
//!   `assign`, no consumer group, nothing committed), and hands each record to the table in
//!   offset order per partition: the table is the fold of the topic.
//! - A table is *loaded* once every partition has been read up to the end offset it had when
//!   the reader started; [`load`] returns only then (or fails after its timeout), so nothing
//!   downstream sees a half-read table. The reader then follows the topic until cancelled.
//!
//! The spatial-node registry ([`crate::registry`]) and the judge's state changelog
//! ([`crate::changelog`]) are such tables.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

/// What a compacted topic is folded into.
pub trait Table: Send + Sync + 'static {
    /// Takes one record (a null payload is a tombstone). A record the table cannot take is
    /// the table's to log and count; the reader goes on.
    fn apply(&self, message: &BorrowedMessage<'_>);
}

/// Reads `topic` from the beginning of every partition into `table`, sets `loaded` once it
/// has caught up with the end offsets seen at start, then follows the topic until `cancel`
/// fires. `group_id` is only what librdkafka asks for; this consumer never joins or commits.
async fn follow<T: Table>(
    table: Arc<T>,
    loaded: Arc<AtomicBool>,
    mut client: ClientConfig,
    topic: String,
    group_id: &'static str,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    client
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = client.create()?;
    tracing::debug!(topic, "Fetching the table topic's metadata.");
    let metadata = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))
    })?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(
        !partitions.is_empty(),
        "the topic `{topic}` does not exist or has no partitions"
    );
    let mut assignment = TopicPartitionList::new();
    let mut remaining = HashMap::new();
    for &partition in &partitions {
        assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
        let (low, high) = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))
        })?;
        // A partition whose records were all deleted (retention) has nothing to wait for.
        if high > low {
            remaining.insert(partition, high);
        }
    }
    consumer.assign(&assignment)?;
    tracing::debug!(topic, ?remaining, "Reading the table topic.");
    if remaining.is_empty() {
        loaded.store(true, Ordering::Release);
    }
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(topic, %error, "Table consumer error; retrying.");
                continue;
            }
        };
        tracing::trace!(
            topic,
            partition = message.partition(),
            offset = message.offset(),
            "Table record."
        );
        table.apply(&message);
        if let Some(high) = remaining.get(&message.partition()).copied()
            && message.offset() + 1 >= high
        {
            remaining.remove(&message.partition());
            if remaining.is_empty() {
                loaded.store(true, Ordering::Release);
            }
        }
    }
}

/// Follows `topic` into `table` on a task of its own (`follow`) and waits until the table
/// is loaded, at most `timeout` (the `setting` that sets it, for the error). Returns the
/// following task, or `None` when `cancel` fires first. `what` names the table in errors.
pub async fn load<T: Table>(
    table: &Arc<T>,
    client: &ClientConfig,
    topic: &str,
    group_id: &'static str,
    (timeout, setting): (Duration, &str),
    cancel: &CancellationToken,
    what: &str,
) -> anyhow::Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let loaded = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(follow(
        Arc::clone(table),
        Arc::clone(&loaded),
        client.clone(),
        topic.to_owned(),
        group_id,
        cancel.child_token(),
    ));
    let deadline = tokio::time::Instant::now() + timeout;
    while !loaded.load(Ordering::Acquire) {
        if task.is_finished() {
            task.await?
                .map_err(|e| e.context(format!("the {what} reader failed")))?;
            anyhow::bail!("the {what} reader stopped before the topic was read");
        }
        if tokio::time::Instant::now() > deadline {
            task.abort();
            anyhow::bail!(
                "the {what} topic `{topic}` was not read to its end within {timeout:?} ({setting})"
            );
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                task.abort();
                return Ok(None);
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    Ok(Some(task))
}
