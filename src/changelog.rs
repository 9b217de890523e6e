//! changelog: the judge's per-cell state kept in a compacted topic, so that a cell's new owner
//! after a rebalance (or any instance after a restart) takes over what its last owner learnt.
//!
//! What the judge learns per cell takes long to learn again: the divergence baselines a day
//! (`[detect.divergence] warmup`), a SPOT threshold `spot_init_windows` windows. Without this,
//! every rebalance would leave the moved cells that blind. Kafka Streams keeps its state stores
//! the same way.
//!
//! Invariants:
//! - A record is keyed by its cell; its value is the cell's [`JudgeState`] as JSON (the same
//!   shape as `[detect] state_file`, holding that one cell). The latest record of a cell is
//!   what it is restored from, so the topic can be compacted.
//! - The owner writes a cell's record every `interval` while it judges the cell, when the
//!   cell's partition is revoked (just before it forgets the cell), and at a graceful stop.
//!   A crash loses at most the last `interval` of learning.
//! - Every instance reads the whole topic ([`crate::table`]) and keeps the latest record of
//!   every cell; its own writes it keeps at once, so a cell revoked and assigned straight back
//!   does not wait for its record to come round. A cell is restored from it when a window of the cell reaches a judge that holds
//!   nothing of it; the judge's own rules decide what of the record it takes
//!   ([`crate::detect::Judge::restore`]: same model channels, no older than the divergence
//!   memory; SPOT only for the same model file and settings).
//! - Writes are not on the event's delivery path: a failed write is logged and counted, and
//!   costs only warm-up after the next move of the cell.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use rdkafka::Message;
use rdkafka::message::BorrowedMessage;

use crate::FastHash;
use crate::config::ChangelogConfig;
use crate::decode::wall_clock_ms;
use crate::detect::{Judge, JudgeState};
use crate::sink::Sink;
use crate::table::Table;
use crate::telemetry;

/// The latest record of every cell in the changelog topic.
#[derive(Default)]
pub struct JudgeStore {
    cells: DashMap<Arc<str>, Arc<[u8]>, FastHash>,
}

impl JudgeStore {
    /// `cell`'s latest saved state, if the topic holds a readable one.
    pub fn get(&self, cell: &str) -> Option<JudgeState> {
        let bytes = Arc::clone(self.cells.get(cell)?.value());
        match serde_json::from_slice(&bytes) {
            Ok(state) => Some(state),
            Err(error) => {
                tracing::warn!(cell, %error, "The cell's saved judge state is not readable; it learns from nothing.");
                None
            }
        }
    }

    /// Cells with a record.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Takes one record: a value replaces the cell's, a tombstone removes it.
    pub fn put(&self, cell: &str, value: Option<&[u8]>) {
        match value {
            Some(value) => {
                self.cells.insert(Arc::from(cell), Arc::from(value));
            }
            None => {
                self.cells.remove(cell);
            }
        }
    }
}

impl Table for JudgeStore {
    fn apply(&self, message: &BorrowedMessage<'_>) {
        match message.key().map(std::str::from_utf8) {
            Some(Ok(cell)) => self.put(cell, message.payload()),
            _ => tracing::warn!(
                partition = message.partition(),
                offset = message.offset(),
                "Ignored a judge-state record without a cell key."
            ),
        }
    }
}

/// A cell's record: its state as JSON.
pub fn encode(state: &JudgeState) -> Vec<u8> {
    serde_json::to_vec(state).expect("a judge state serialises")
}

/// The judging task's side of the changelog: it restores cells new to the judge and writes
/// the state of the cells it judged.
pub struct Changelog {
    store: Arc<JudgeStore>,
    topic: String,
    sink: Arc<Sink>,
    /// How often [`Changelog::write_judged`] is due.
    pub interval: Duration,
    /// Cells judged since their last write.
    judged: HashSet<Arc<str>, FastHash>,
}

impl Changelog {
    pub fn new(store: Arc<JudgeStore>, config: &ChangelogConfig, sink: Arc<Sink>) -> Self {
        Self {
            store,
            topic: config.topic.clone(),
            sink,
            interval: config.interval,
            judged: HashSet::default(),
        }
    }

    /// Before a window of `cell` is judged: when the judge holds nothing of the cell (new to
    /// this instance, or forgotten at a revocation), it takes over the cell's saved state.
    pub fn before_window(&mut self, judge: &mut Judge, cell: &Arc<str>) {
        if !self.judged.contains(cell) {
            self.judged.insert(Arc::clone(cell));
        }
        if judge.has_state(cell) {
            return;
        }
        let Some(state) = self.store.get(cell) else {
            return;
        };
        let restored = judge.restore(state, wall_clock_ms());
        telemetry::judge_state_restored(cell, "divergence baselines", &restored.divergence);
        telemetry::judge_state_restored(cell, "SPOT thresholds", &restored.spot);
    }

    /// Writes the state of every cell judged since the last write. The writes are
    /// acknowledged on a task of their own, which is returned.
    pub fn write_judged(&mut self, judge: &Judge) -> tokio::task::JoinHandle<()> {
        let cells: Vec<Arc<str>> = self.judged.drain().collect();
        self.write(judge, cells)
    }

    /// Writes `cell`'s state now: its partition was revoked, and the judge is about to forget
    /// it.
    pub fn write_cell(&mut self, judge: &Judge, cell: &Arc<str>) -> tokio::task::JoinHandle<()> {
        self.judged.remove(cell);
        self.write(judge, vec![Arc::clone(cell)])
    }

    fn write(&self, judge: &Judge, cells: Vec<Arc<str>>) -> tokio::task::JoinHandle<()> {
        let now = wall_clock_ms();
        let records: Vec<(Arc<str>, Vec<u8>)> = cells
            .into_iter()
            .filter_map(|cell| {
                let state = encode(&judge.cell_state(&cell, now)?);
                self.store.put(&cell, Some(&state));
                Some((cell, state))
            })
            .collect();
        let (sink, topic) = (Arc::clone(&self.sink), self.topic.clone());
        tokio::spawn(async move {
            let writes = records.iter().map(|(cell, state)| {
                let (sink, topic) = (&sink, &topic);
                async move { (cell, sink.publish_state(topic, cell, state).await) }
            });
            for (cell, result) in futures::future::join_all(writes).await {
                let error = result.as_ref().err().map(|e| e as &dyn std::fmt::Display);
                telemetry::judge_state_written(cell, error);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(saved_at_ms: i64) -> JudgeState {
        JudgeState {
            channels: vec!["speed".into()],
            saved_at_ms,
            divergence: Default::default(),
            model_hash: "abc".into(),
            spot: Default::default(),
        }
    }

    #[test]
    fn the_latest_record_of_a_cell_wins_and_a_tombstone_removes_it() {
        let store = JudgeStore::default();
        assert!(store.get("c1").is_none());
        store.put("c1", Some(&encode(&state(1))));
        store.put("c1", Some(&encode(&state(2))));
        store.put("c2", Some(&encode(&state(3))));
        assert_eq!(store.get("c1").unwrap().saved_at_ms, 2);
        assert_eq!(store.len(), 2);
        store.put("c1", None);
        assert!(store.get("c1").is_none());
        assert_eq!(store.get("c2").unwrap().saved_at_ms, 3);
    }

    #[test]
    fn an_unreadable_record_is_no_state() {
        let store = JudgeStore::default();
        store.put("c1", Some(b"{not json"));
        assert!(store.get("c1").is_none());
    }
}
