//! The consuming loop: decoded readings → registry → per-cell windows, in order, with the
//! offset ledger's holds; dead letters and ended cells go out beside the windows. The reading
//! task (`read.rs`) polls the consumer and decodes beside it. See the parent module for the
//! wiring and `source` for the commit invariant.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::StreamConsumer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::assemble::{Admission, Assembler, Provenance, Window};
use crate::config::BadInputPolicy;
use crate::decode::{self, PayloadKind};
use crate::registry::Registry;
use crate::schema::{self, DeadLetterReason, RecordKind};
use crate::sink::DeadLetter;
use crate::source::{OffsetLedger, SourceContext, SourcePartitions};
use crate::telemetry::{self, Stats};

use super::commit;
use super::read::{Chunk, Consumed, Handover, Item, Reader};

/// The consuming half: everything after decoding up to and including window assembly runs
/// here, in the order the messages were consumed.
pub(super) struct Ingest {
    pub(super) registry: Arc<Registry>,
    pub(super) assembler: Assembler,
    /// The reading task's ids, handed out here in the same order (`Chunk::partitions`).
    pub(super) partitions: SourcePartitions,
    pub(super) ledger: Arc<Mutex<OffsetLedger>>,
    pub(super) stats: Arc<Stats>,
    pub(super) policy: BadInputPolicy,
    pub(super) windows: mpsc::Sender<Window>,
    /// Windows sent so far, to place the cells ingest stops holding among them.
    pub(super) sent: u64,
    pub(super) ended: mpsc::UnboundedSender<Ended>,
    pub(super) letters: mpsc::Sender<PendingLetter>,
    pub(super) scratch: Vec<Window>,
    pub(super) future: decode::FutureLimit,
}

impl Ingest {
    /// Runs `reader` on a task of its own and assembles what it reads, committing what the
    /// ledger allows every `commit_interval`.
    pub(super) async fn run(
        &mut self,
        reader: Reader,
        handover: Handover,
        consumer: &Arc<StreamConsumer<SourceContext>>,
        commit_interval: Duration,
        cancel: &CancellationToken,
        failed: &CancellationToken,
    ) -> anyhow::Result<()> {
        let stop = cancel.child_token();
        let reading = tokio::spawn(reader.run(Arc::clone(consumer), stop.clone()));
        let assembled = self
            .assemble(handover, consumer, commit_interval, cancel, failed)
            .await;
        stop.cancel();
        // A reader that failed closed its channel, and its error is the cause.
        reading.await??;
        assembled
    }

    async fn assemble(
        &mut self,
        handover: Handover,
        consumer: &StreamConsumer<SourceContext>,
        commit_interval: Duration,
        cancel: &CancellationToken,
        failed: &CancellationToken,
    ) -> anyhow::Result<()> {
        let Handover { mut chunks, spent } = handover;
        let mut ticker = tokio::time::interval(commit_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Made once, not once per chunk.
        let cancelled = cancel.cancelled();
        let failure = failed.cancelled();
        tokio::pin!(cancelled, failure);
        loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => return Ok(()),
                _ = &mut failure => anyhow::bail!("a later stage failed; stopped consuming"),
                _ = ticker.tick() => {
                    commit(consumer, &self.ledger, &self.assembler, &self.partitions, &self.stats, false)?;
                }
                chunk = chunks.recv() => {
                    let Some(mut chunk) = chunk else {
                        anyhow::bail!("the reading task stopped");
                    };
                    self.take(&chunk).await?;
                    chunk.clear();
                    // Fails only when the reading task has ended.
                    let _ = spent.send(chunk);
                }
            }
        }
    }

    async fn take(&mut self, chunk: &Chunk) -> anyhow::Result<()> {
        for (topic, partition) in &chunk.partitions {
            let id = self.partitions.id(topic, *partition);
            debug_assert_eq!(
                id as usize + 1,
                self.partitions.len(),
                "ids handed out in order"
            );
        }
        for item in &chunk.items {
            match item {
                Item::Revoked(ids) => self.forget_revoked(ids),
                Item::Message(message) => self.handle(chunk, message).await?,
            }
        }
        Ok(())
    }

    /// Drops the window state and the commit position of revoked partitions. Their windows
    /// already emitted are still scored and published (and release their holds); the new owner
    /// resumes from the last commit, which trails every open window by its whole history, so
    /// it rebuilds the same windows by replaying without emitting the incomplete ones. The
    /// judging task drops the cells' thresholds, baselines and incidents once it has judged
    /// those windows.
    fn forget_revoked(&mut self, ids: &[i32]) {
        for &id in ids {
            let cells = self.assembler.forget_partition(id);
            self.end(cells.into_iter().map(|c| (c, Ending::Revoked)).collect());
            self.ledger.lock().expect("ledger lock").forget(id);
            let (topic, partition) = self.partitions.pair(id);
            tracing::debug!(topic, partition, "Forgot a revoked partition's windows.");
        }
    }

    async fn handle(&mut self, chunk: &Chunk, message: &Consumed) -> anyhow::Result<()> {
        let Consumed { id, offset, .. } = *message;
        let partition = self.partitions.pair(id).1;
        let expected = self
            .ledger
            .lock()
            .expect("ledger lock")
            .consumed(id, offset);
        match expected {
            None => tracing::debug!(
                topic = self.partitions.pair(id).0,
                partition,
                offset,
                "First message since assignment."
            ),
            // Compaction and transaction markers leave gaps too; a gap on a reading topic
            // written without either means the broker skipped records.
            Some(next) if offset > next => {
                tracing::debug!(
                    topic = self.partitions.pair(id).0,
                    partition,
                    offset,
                    expected = next,
                    "Offsets skipped."
                )
            }
            Some(_) => {}
        }
        let readings = &chunk.readings.as_slice()[message.readings.clone()];
        telemetry::message_consumed(&self.stats, self.partitions.messages(id), readings.len());
        if let Some(error) = &message.error {
            let letter = DeadLetter {
                reason: error.reason(),
                error: error.to_string(),
                key: chunk.bytes(&message.key).map(<[u8]>::to_vec),
                payload: chunk.bytes(&message.payload).map(<[u8]>::to_vec),
                topic: self.topic(id),
                partition,
                offset,
                batch_index: None,
            };
            return self.reject(id, letter).await;
        }
        let batch = self.partitions.kind(id) == PayloadKind::Batch;
        for (index, reading) in readings.iter().enumerate() {
            let refused = |topic: String, reason: DeadLetterReason, error: String| DeadLetter {
                reason,
                error,
                key: chunk.bytes(&message.key).map(<[u8]>::to_vec),
                payload: if batch {
                    schema::write_datum(RecordKind::Reading.schema(), &reading.to_value()).ok()
                } else {
                    chunk.bytes(&message.payload).map(<[u8]>::to_vec)
                },
                topic,
                partition,
                offset,
                batch_index: batch.then_some(index),
            };
            if let Err(error) = decode::validate(reading) {
                self.reject(
                    id,
                    refused(self.topic(id), error.reason(), error.to_string()),
                )
                .await?;
                continue;
            }
            if !self
                .future
                .allows(reading.event_time_ms, decode::wall_clock_ms)
            {
                let error = format!(
                    "event time {} is more than [assemble] max_future ahead of the wall clock",
                    reading.event_time_ms
                );
                self.reject(
                    id,
                    refused(self.topic(id), DeadLetterReason::InvalidValue, error),
                )
                .await?;
                continue;
            }
            let Some(node) = self.registry.lookup(&reading.node_id) else {
                let error = format!(
                    "node `{}` is not on the spatial-node topic",
                    reading.node_id
                );
                self.reject(
                    id,
                    refused(self.topic(id), DeadLetterReason::UnknownNode, error),
                )
                .await?;
                continue;
            };
            let at = Provenance {
                partition: id,
                offset,
            };
            let (admission, closed) =
                self.assembler
                    .add(&node.cell, &node.node_id, reading, at, &mut self.scratch);
            match admission {
                Admission::Accepted { ignored } => {
                    telemetry::reading_accepted(&self.stats, ignored)
                }
                Admission::NoModelChannel => telemetry::reading_without_model_channel(&self.stats),
                Admission::Duplicate => telemetry::duplicate_reading(),
                Admission::Late {
                    step_end_ms,
                    watermark_ms,
                } => {
                    let error = format!(
                        "event time {} is in a step that closed at {step_end_ms} (cell watermark {watermark_ms})",
                        reading.event_time_ms
                    );
                    self.reject(id, refused(self.topic(id), DeadLetterReason::Late, error))
                        .await?;
                }
                Admission::CellFull => {
                    let error = format!(
                        "cell `{}` already has the model's maximum of {} nodes",
                        node.cell,
                        self.assembler.spec().max_nodes
                    );
                    self.reject(
                        id,
                        refused(self.topic(id), DeadLetterReason::CellFull, error),
                    )
                    .await?;
                }
                Admission::TooManyCells => {
                    let error = format!(
                        "cell `{}` would be one more than [assemble] max_cells = {}",
                        node.cell,
                        self.assembler.spec().max_cells
                    );
                    self.reject(
                        id,
                        refused(self.topic(id), DeadLetterReason::CellLimit, error),
                    )
                    .await?;
                }
            }
            telemetry::windows_closed(&self.stats, closed.emitted, closed.sparse, closed.warmup);
            // Checked here, not only inside: this runs for every reading, and collecting the
            // empty list was about 1.5 % of the batch ingest profile.
            if !closed.silent.is_empty() {
                let silent = closed.silent.into_iter();
                self.end(
                    silent
                        .map(|(c, at_ms)| (c, Ending::Silent { at_ms }))
                        .collect(),
                );
            }
            if !self.scratch.is_empty() {
                self.emit().await?;
            }
        }
        Ok(())
    }

    /// The name of the topic of `id`, for a dead letter.
    fn topic(&self, id: i32) -> String {
        self.partitions.pair(id).0.clone()
    }

    /// Tells the judging task about cells no longer held, placed after the windows sent so far.
    fn end(&self, cells: Vec<(Arc<str>, Ending)>) {
        if cells.is_empty() {
            return;
        }
        // Fails only when the judging task has ended, and then nothing is left to end.
        let _ = self.ended.send(Ended {
            after: self.sent,
            cells,
        });
    }

    /// Sends the windows that just closed to inference, holding their offsets first.
    async fn emit(&mut self) -> anyhow::Result<()> {
        if self.scratch.is_empty() {
            return Ok(());
        }
        {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            for window in &self.scratch {
                for &(p, o) in &window.holds {
                    ledger.hold(p, o);
                }
            }
        }
        for window in self.scratch.drain(..) {
            self.windows
                .send(window)
                .await
                .map_err(|_| anyhow::anyhow!("the inference stage stopped"))?;
            self.sent += 1;
        }
        Ok(())
    }

    /// Applies the bad-input policy to one refused message or reading.
    async fn reject(&mut self, id: i32, letter: DeadLetter) -> anyhow::Result<()> {
        if !refuse(self.policy, &self.stats, &letter)? {
            return Ok(());
        }
        self.ledger
            .lock()
            .expect("ledger lock")
            .hold(id, letter.offset);
        self.letters
            .send(PendingLetter { id, letter })
            .await
            .map_err(|_| anyhow::anyhow!("the dead-letter publisher stopped"))
    }
}

/// Counts one refused message or reading and applies `[sink] bad_input`: `Ok(true)` when it is
/// to be dead-lettered, `Ok(false)` when dropped, an error naming it under `fail`.
pub fn refuse(policy: BadInputPolicy, stats: &Stats, letter: &DeadLetter) -> anyhow::Result<bool> {
    telemetry::reading_rejected(
        stats,
        letter.reason,
        &letter.topic,
        letter.partition,
        letter.offset,
        &letter.error,
        policy == BadInputPolicy::DeadLetter,
    );
    match policy {
        BadInputPolicy::Drop => Ok(false),
        BadInputPolicy::DeadLetter => Ok(true),
        BadInputPolicy::Fail => anyhow::bail!(
            "bad input on {}[{}] at offset {} ({}): {}; [sink] bad_input = \"fail\"",
            letter.topic,
            letter.partition,
            letter.offset,
            letter.reason.as_str(),
            letter.error
        ),
    }
}

/// A dead letter with the ledger id of its source partition.
pub(super) struct PendingLetter {
    pub(super) id: i32,
    pub(super) letter: DeadLetter,
}

/// Why ingest no longer holds a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Its partition was revoked: its judge state goes, without a transition.
    Revoked,
    /// It was dropped as idle, silent up to `at_ms` (event time): an open incident is closed.
    Silent { at_ms: i64 },
}

/// Cells ingest stopped holding when it had sent `after` windows.
pub(super) struct Ended {
    pub(super) after: u64,
    pub(super) cells: Vec<(Arc<str>, Ending)>,
}
