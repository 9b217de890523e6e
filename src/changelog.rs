//! changelog: the judge's per-cell state kept in a compacted topic, so that a cell's new owner
//! after a rebalance (or any instance after a restart) takes over what its last owner learnt.
//!
//! What the judge learns per cell takes long to learn again: the divergence baselines a day
//! (`[detect.divergence] warmup`), the floors days (`[detect.floor] days`), a SPOT threshold
//! `spot_init_windows` windows. Without this, every rebalance would leave the moved cells that
//! blind, and would open a second incident for one that was open. Kafka Streams keeps its state
//! stores the same way.
//!
//! Invariants:
//! - A record is keyed by its cell; its value is the cell's [`JudgeState`] as JSON (the same
//!   shape as `[detect] state_file`, holding that one cell). The latest record of a cell is
//!   what it is restored from, so the topic can be compacted.
//! - The owner writes a cell's record every `interval` while it judges the cell, when the
//!   cell's partition is revoked (just before it forgets the cell), and at a graceful stop.
//!   A crash loses at most the last `interval` of learning. One periodic write is in flight at
//!   a time: while it is unacknowledged the next interval's cells wait for it.
//! - A record carries the cell's incident only while every event of it is acknowledged, so the
//!   windows the saved incident took are windows whose events are out. A cell with nothing to
//!   keep whose record exists gets a tombstone (its incident closed).
//! - Every instance reads the whole topic ([`crate::table`]) and keeps the latest record of
//!   every cell; its own writes it keeps at once, so a cell revoked and assigned straight back
//!   does not wait for its record to come round. A cell is restored from it at its first
//!   window on the instance, when the judge holds nothing of it; the judge's own rules decide
//!   what of the record it takes ([`crate::detect::Judge::restore`]: same model channels, no
//!   older than the divergence memory; SPOT and incidents only for the same model file, SPOT
//!   for the same settings). A taken-over incident whose last window the first one here does
//!   not overlap is closed first ([`crate::detect::Judge::close_if_apart`]).
//! - Writes are not on the event's delivery path: a failed write is logged and counted, and
//!   costs only warm-up after the next move of the cell.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use rdkafka::Message;
use rdkafka::message::BorrowedMessage;

use crate::FastHash;
use crate::assemble::Window;
use crate::config::ChangelogConfig;
use crate::decode::wall_clock_ms;
use crate::detect::{Judge, JudgeState};
use crate::schema::AnomalyEvent;
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

    /// Whether `cell` has a record.
    pub fn holds(&self, cell: &str) -> bool {
        self.cells.contains_key(cell)
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
    /// How often [`Changelog::write_due`] is due.
    pub interval: Duration,
    /// Cells judged since their last write.
    judged: HashSet<Arc<str>, FastHash>,
    /// Cells judged here since they came to this instance: restored once, at their first window.
    known: HashSet<Arc<str>, FastHash>,
    /// Per cell, its incident transitions (events) not yet acknowledged: while there are any,
    /// its record leaves the incident out.
    unacknowledged: std::collections::HashMap<Arc<str>, u32, FastHash>,
    /// The last periodic write and its cells, until it is acknowledged.
    periodic: Option<(tokio::task::JoinHandle<()>, Vec<Arc<str>>)>,
}

impl Changelog {
    pub fn new(store: Arc<JudgeStore>, config: &ChangelogConfig, sink: Arc<Sink>) -> Self {
        Self {
            store,
            topic: config.topic.clone(),
            sink,
            interval: config.interval,
            judged: HashSet::default(),
            known: HashSet::default(),
            unacknowledged: Default::default(),
            periodic: None,
        }
    }

    /// Before `window` is judged: at its cell's first window on this instance (new to it, or
    /// back after a revocation), a judge that holds nothing of the cell takes over its saved
    /// state. Returns the CLOSE of a taken-over incident that `window` does not go on with
    /// ([`Judge::close_if_apart`]), to publish before the window's own event.
    pub fn before_window(&mut self, judge: &mut Judge, window: &Window) -> Option<AnomalyEvent> {
        let cell = &window.cell;
        self.changed(cell);
        if self.known.contains(cell) {
            return None;
        }
        self.known.insert(Arc::clone(cell));
        if judge.has_state(cell) {
            return None;
        }
        let state = self.store.get(cell)?;
        let restored = judge.restore(state, wall_clock_ms());
        for (part, result) in restored.parts() {
            telemetry::judge_state_restored(cell, part, result);
        }
        let close = judge.close_if_apart(cell, window.start_ms);
        if close.is_some() {
            tracing::debug!(cell = %cell, "Closed the incident taken over: its next window was not judged here.");
        }
        close
    }

    /// `cell`'s state changed other than by a window (its incident was closed for silence):
    /// its record is due at the next write.
    pub fn changed(&mut self, cell: &Arc<str>) {
        if !self.judged.contains(cell) {
            self.judged.insert(Arc::clone(cell));
        }
    }

    /// An event of `cell`'s incident was handed to the sink.
    pub fn transition_sent(&mut self, cell: &Arc<str>) {
        *self.unacknowledged.entry(Arc::clone(cell)).or_default() += 1;
    }

    /// An event of `cell`'s incident was acknowledged: once none is left, the cell's next
    /// record carries its incident again. (Not for a cell revoked meanwhile: its record is the
    /// one written at the revocation, which its next owner reads.)
    pub fn transition_acknowledged(&mut self, cell: &Arc<str>) {
        if let Some(n) = self.unacknowledged.get_mut(cell) {
            *n -= 1;
            if *n == 0 {
                self.unacknowledged.remove(cell);
                if self.known.contains(cell) {
                    self.changed(cell);
                }
            }
        }
    }

    /// Writes the state of every cell judged since the last write, acknowledged on a task of
    /// its own. While the last such write is unacknowledged (the broker is slow or down, and
    /// the sink retries), the cells wait for the next interval instead: an outage holds one
    /// write's records, not one per interval.
    pub fn write_due(&mut self, judge: &Judge) {
        if let Some((last, _)) = &self.periodic
            && !last.is_finished()
        {
            tracing::debug!(
                waiting = self.judged.len(),
                "The last judge-state write is unacknowledged; this interval's waits for it."
            );
            return;
        }
        let cells: Vec<Arc<str>> = self.judged.drain().collect();
        let task = self.write(judge, &cells);
        self.periodic = Some((task, cells));
    }

    /// The write at a graceful stop: every cell judged since the last write, and the cells of
    /// a periodic write still unacknowledged (written again, with what the judge holds now).
    /// The returned task ends when all are acknowledged.
    pub fn write_final(&mut self, judge: &Judge) -> tokio::task::JoinHandle<()> {
        let cells = self.final_cells();
        self.write(judge, &cells)
    }

    fn final_cells(&mut self) -> Vec<Arc<str>> {
        let mut cells: HashSet<Arc<str>, FastHash> = self.judged.drain().collect();
        if let Some((last, unacknowledged)) = self.periodic.take()
            && !last.is_finished()
        {
            cells.extend(unacknowledged);
        }
        cells.into_iter().collect()
    }

    /// Writes `cell`'s state now: its partition was revoked, and the judge is about to forget
    /// it.
    pub fn write_cell(&mut self, judge: &Judge, cell: &Arc<str>) -> tokio::task::JoinHandle<()> {
        self.judged.remove(cell);
        self.known.remove(cell);
        self.write(judge, std::slice::from_ref(cell))
    }

    /// Writes the records of `cells`: each cell's state, or a tombstone where the judge holds
    /// nothing of a cell the topic has a record of (an incident closed since, say), so that
    /// no later owner takes over what is over.
    fn write(&self, judge: &Judge, cells: &[Arc<str>]) -> tokio::task::JoinHandle<()> {
        let now = wall_clock_ms();
        let records: Vec<(Arc<str>, Option<Vec<u8>>)> = cells
            .iter()
            .filter_map(|cell| {
                let settled = !self.unacknowledged.contains_key(cell);
                let state = judge.cell_state(cell, now, settled).map(|s| encode(&s));
                if state.is_none() && !self.store.holds(cell) {
                    return None;
                }
                self.store.put(cell, state.as_deref());
                Some((Arc::clone(cell), state))
            })
            .collect();
        let (sink, topic) = (Arc::clone(&self.sink), self.topic.clone());
        tokio::spawn(async move {
            let writes = records.iter().map(|(cell, state)| {
                let (sink, topic) = (&sink, &topic);
                async move {
                    (
                        cell,
                        sink.publish_state(topic, cell, state.as_deref()).await,
                    )
                }
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
    use crate::schema::IncidentStatus;

    fn state(saved_at_ms: i64) -> JudgeState {
        JudgeState {
            channels: vec!["speed".into()],
            saved_at_ms,
            divergence: Default::default(),
            model_hash: "abc".into(),
            spot: Default::default(),
            floors: Default::default(),
            ceilings: Default::default(),
            incidents: Default::default(),
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

    /// A changelog whose writes are never acknowledged: its broker does not exist, and the
    /// sink retries until the test ends.
    fn unacknowledged_changelog() -> Changelog {
        let mut client = rdkafka::ClientConfig::new();
        client.set("bootstrap.servers", "127.0.0.1:9");
        let sink = Sink::new(client, &crate::config::SinkConfig::default()).unwrap();
        let config = ChangelogConfig {
            topic: "judge-state".into(),
            interval: Duration::from_secs(60),
            load_timeout: Duration::from_secs(60),
        };
        Changelog::new(Arc::default(), &config, Arc::new(sink))
    }

    /// A judge holding a fitted SPOT threshold of `cell`: a record to write.
    fn learn(judge: &mut Judge, changelog: &mut Changelog, cell: &Arc<str>) {
        let scores: Vec<f64> = (0..1000)
            .map(|i| f64::from(i * 37 % 1000) / 500.0)
            .collect();
        judge.calibrate(cell, &scores).unwrap();
        changelog.before_window(judge, &window(cell, 2));
    }

    fn sorted(mut cells: Vec<Arc<str>>) -> Vec<Arc<str>> {
        cells.sort();
        cells
    }

    #[tokio::test]
    async fn an_unacknowledged_write_holds_back_the_next_and_is_repeated_at_the_stop() {
        use crate::config::{DetectConfig, ThresholdPolicy};
        let contract =
            crate::detect::test_support::contract("1", (2, 1, 1), &["a"], vec![1.0], 2.0);
        let config = DetectConfig {
            threshold_policy: ThresholdPolicy::Spot,
            ..DetectConfig::default()
        };
        let mut judge = Judge::new(crate::detect::Detector::new(&contract, &config), &config);
        let mut changelog = unacknowledged_changelog();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));

        learn(&mut judge, &mut changelog, &a);
        changelog.write_due(&judge);
        assert!(changelog.judged.is_empty(), "a's record is on its way");
        learn(&mut judge, &mut changelog, &b);
        changelog.write_due(&judge);
        assert_eq!(
            sorted(changelog.judged.iter().cloned().collect()),
            vec![Arc::clone(&b)],
            "b waits while a's write is unacknowledged"
        );
        let (_, cells) = changelog.periodic.as_ref().unwrap();
        assert_eq!(cells, &vec![Arc::clone(&a)], "no second write was started");
        assert_eq!(sorted(changelog.final_cells()), vec![a, b]);
    }

    /// The window of `cell` ending at `end_s`: one node, one channel, the last of two steps
    /// scored.
    fn window(cell: &Arc<str>, end_s: i64) -> Window {
        crate::detect::test_support::window(cell, end_s)
    }

    /// Judges [`window`] with the last step reconstructed as `r` (scored r²) and returns its
    /// incident's transition.
    fn judge_window(
        judge: &mut Judge,
        changelog: &mut Changelog,
        cell: &Arc<str>,
        end_s: i64,
        r: f32,
    ) -> IncidentStatus {
        let window = window(cell, end_s);
        assert!(changelog.before_window(judge, &window).is_none());
        let event = judge.judge(&window, &[0.0, r]).event.unwrap();
        event.incident.unwrap().status
    }

    /// (Its writes never complete, but each is in the local store at once, which is what the
    /// assertions read.)
    #[tokio::test]
    async fn an_incident_is_saved_once_its_events_are_out_and_deleted_once_over() {
        use crate::config::DetectConfig;
        use crate::detect::incident::IncidentConfig;
        use crate::schema::IncidentStatus;
        let contract =
            crate::detect::test_support::contract("1", (2, 1, 1), &["a"], vec![1.0], 2.0);
        let config = DetectConfig {
            incidents: Some(IncidentConfig {
                open_after: 1,
                close_after: 1,
                update_every: 0,
            }),
            ..DetectConfig::default()
        };
        let mut judge = Judge::new(crate::detect::Detector::new(&contract, &config), &config);
        let mut changelog = unacknowledged_changelog();
        let cell: Arc<str> = Arc::from("c");
        let status = judge_window(&mut judge, &mut changelog, &cell, 2, 2.0);
        assert_eq!(status, IncidentStatus::Open);
        changelog.transition_sent(&cell);
        drop(changelog.write(&judge, std::slice::from_ref(&cell)));
        assert!(
            !changelog.store.holds("c"),
            "not while the OPEN is unacknowledged"
        );
        changelog.transition_acknowledged(&cell);
        assert!(
            changelog.judged.contains(&cell),
            "due again once acknowledged"
        );
        drop(changelog.write(&judge, std::slice::from_ref(&cell)));
        let saved = changelog.store.get("c").unwrap();
        assert_eq!(saved.incidents.keys().collect::<Vec<_>>(), ["c"]);

        let status = judge_window(&mut judge, &mut changelog, &cell, 3, 0.0);
        assert_eq!(status, IncidentStatus::Close);
        changelog.before_window(&mut judge, &window(&cell, 4));
        assert!(
            !judge.has_state("c"),
            "a cell judged here is not restored again: its record is behind"
        );
        drop(changelog.write(&judge, std::slice::from_ref(&cell)));
        assert!(
            !changelog.store.holds("c"),
            "a tombstone: the incident is over"
        );

        // A revoked cell's record is the one written at its revocation: an acknowledgement
        // that arrives after it does not make the cell due again (the judge has forgotten it,
        // so the write would delete the record its next owner reads).
        let status = judge_window(&mut judge, &mut changelog, &cell, 4, 2.0);
        assert_eq!(status, IncidentStatus::Open);
        changelog.transition_sent(&cell);
        drop(changelog.write_cell(&judge, &cell));
        judge.forget(&cell);
        changelog.transition_acknowledged(&cell);
        assert!(changelog.judged.is_empty());
    }

    #[test]
    fn an_unreadable_record_is_no_state() {
        let store = JudgeStore::default();
        store.put("c1", Some(b"{not json"));
        assert!(store.get("c1").is_none());
    }
}
