//! assemble: readings → per-cell spatio-temporal windows in event time.
//!
//! Time is cut into steps of the model's cadence: step `s` holds event times
//! `[s·cadence, (s+1)·cadence)`. Each partition has a watermark, its largest event time so far
//! minus the allowed lateness; a cell's watermark is the least watermark of the partitions that
//! have fed it. Step `s` of a cell is *closed* once the cell's watermark reaches `(s+1)·cadence`.
//!
//! Invariants:
//! - A reading whose step is already closed for its cell is *late*: it is refused (the caller
//!   dead-letters it) and changes nothing, so the windows emitted never depend on how late data
//!   arrived.
//! - A cell's windows end on the steps `e` with `e ≡ phase (mod hop)`, counted from the epoch, so
//!   every instance cuts the same windows. The phase is 0 for every cell unless
//!   [`AssembleSpec::stagger`] is set; then it is a hash of the cell id, so that cells close
//!   their windows spread over the hop instead of all at one step boundary (inference gets a
//!   steady flow of small batches, not one burst per hop). The window ending at step `e` covers
//!   steps `[e−T, e)` and is emitted exactly
//!   once, when step `e−1` closes, unless it begins before the cell's history is whole on this
//!   instance (within the allowed lateness plus one step of the earliest reading it accepted for
//!   the cell): after a start, or a restart from committed offsets, no window with a truncated
//!   history is emitted. It is a `[T × N × F]` tensor of per-step means of the raw values
//!   (physical units; normalisation belongs to the model that scores them) plus a mask that is 1 exactly where something was observed; unobserved entries are 0
//!   in the values and 0 in the mask, never a silent zero reading. Its node axis is in node-id
//!   order, whatever order the nodes arrived in, so a replay builds the same tensor.
//! - A step is kept until no future window needs it, nor the warm-up margin before the next
//!   window (so a restart from committed offsets can emit that window whole). [`Assembler::low_water`] is the least
//!   source offset, per partition, of any reading in a kept step; every emitted [`Window`]
//!   carries in [`Window::holds`] the least offsets of its own readings and of the warm-up
//!   margin before it (the allowed lateness plus one step), so that a restart from a commit
//!   that stopped at a hold replays enough history to emit the held window again. Together
//!   they are what an offset commit must not pass.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;

use crate::FastHash;
use crate::schema::Reading;

mod history;
use history::History;

/// Where a reading came from: the partition and offset of its Kafka message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Provenance {
    pub partition: i32,
    pub offset: i64,
}

/// Shape of the windows, from the model contract and configuration.
#[derive(Debug, Clone)]
pub struct AssembleSpec {
    pub cadence_ms: i64,
    /// Steps per window (T).
    pub window_steps: usize,
    /// Steps between two window ends of a cell.
    pub hop_steps: usize,
    /// Each cell's window ends are offset within the hop by a hash of its id; otherwise every
    /// cell's windows end on multiples of the hop.
    pub stagger: bool,
    /// Channel names in model order (F).
    pub channels: Vec<String>,
    pub allowed_lateness_ms: i64,
    /// Most nodes one cell may hold.
    pub max_nodes: usize,
    /// Windows with a smaller observed fraction are skipped (counted, not scored).
    pub min_observed_fraction: f64,
    /// Most cells held at once; readings that would open one more are refused.
    pub max_cells: usize,
    /// A cell with no reading for this long in event time, and nothing left to close, is
    /// dropped; it starts afresh (with its warm-up) if readings come back.
    pub idle_cell_ms: i64,
}

impl AssembleSpec {
    fn step_of(&self, event_time_ms: i64) -> i64 {
        event_time_ms.div_euclid(self.cadence_ms)
    }

    fn features(&self) -> usize {
        self.channels.len()
    }

    /// The step (mod the hop) on which `cell`'s windows end: FNV-1a of its id when staggered,
    /// the same on every instance and every run.
    fn phase_of(&self, cell: &str) -> i64 {
        if !self.stagger {
            return 0;
        }
        let hash = cell.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        (hash % self.hop_steps as u64) as i64
    }
}

/// One window ready to be scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub cell: Arc<str>,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Node of each slot of the N axis.
    pub nodes: Vec<Arc<str>>,
    /// `[T × N × F]`, row-major, per-step means in physical units; 0 where unobserved.
    pub values: Vec<f32>,
    /// `[T × N × F]`, 1 where observed.
    pub mask: Vec<f32>,
    pub missing_fraction: f64,
    /// Least source offset per partition of the readings in this window and in its warm-up
    /// margin (the steps a restart must replay to emit it again).
    pub holds: Vec<(i32, i64)>,
    /// When the window closed (wall clock), for the close → acknowledged latency.
    pub closed_at: std::time::Instant,
}

impl Window {
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

/// What happened to one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Added; `ignored` of its channels are not model channels and were skipped.
    Accepted { ignored: usize },
    /// None of its channels is a model channel; nothing was added.
    NoModelChannel,
    /// Its step had closed: `step_end_ms` is at or below the cell's watermark.
    Late { step_end_ms: i64, watermark_ms: i64 },
    /// The cell is full and the node is new to it.
    CellFull,
    /// The cell is new and this instance already holds `max_cells` cells.
    TooManyCells,
    /// A numbered reading already seen (same node, sequence and event time no newer than the
    /// node's newest): ignored.
    Duplicate,
}

/// What happened to the windows that closed while adding a reading.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Closed {
    pub emitted: usize,
    /// Closed windows below `min_observed_fraction`.
    pub sparse: usize,
    /// Closed windows that begin before this instance saw the cell's history whole.
    pub warmup: usize,
    /// Cells dropped for being idle ([`AssembleSpec::idle_cell_ms`]), each with the event time
    /// up to which it was silent: the start of the first step still open.
    pub silent: Vec<(Arc<str>, i64)>,
}

fn merge_low(low: &mut Vec<(i32, i64)>, partition: i32, offset: i64) {
    match low.iter_mut().find(|(p, _)| *p == partition) {
        Some((_, o)) => *o = (*o).min(offset),
        None => low.push((partition, offset)),
    }
}

#[derive(Debug)]
struct CellState {
    nodes: Vec<Arc<str>>,
    slots: HashMap<Arc<str>, usize, FastHash>,
    /// Per slot, the (sequence, event time) of the newest numbered reading accepted.
    latest: Vec<Option<(i64, i64)>>,
    /// Step index of the first step of `history`.
    base_step: i64,
    history: History,
    /// Every step below this is closed.
    closed_before: i64,
    /// Partitions that have fed this cell, in the order of `history`'s partition slots.
    partitions: Vec<i32>,
    last_data_step: i64,
    /// Earliest step of any reading this instance accepted for the cell.
    first_data_step: i64,
    /// Window ends are the steps `e ≡ phase (mod hop)`.
    phase: i64,
}

impl CellState {
    /// The first window end after step `step`.
    fn end_after(&self, step: i64, hop: i64) -> i64 {
        (step.saturating_sub(self.phase).div_euclid(hop) + 1) * hop + self.phase
    }
}

#[derive(Debug, Clone, Copy)]
struct PartitionClock {
    max_event_time_ms: i64,
    /// `closed_before` this partition allows, when cells were last swept.
    swept: i64,
}

/// Event-time state of every cell this instance assembles.
pub struct Assembler {
    spec: AssembleSpec,
    cells: DashMap<Arc<str>, CellState, FastHash>,
    clocks: HashMap<i32, PartitionClock, FastHash>,
    cells_of_partition: HashMap<i32, Vec<Arc<str>>, FastHash>,
    /// The model channels of the reading being added, as (feature, value); kept between
    /// readings so that adding one allocates nothing.
    features: Vec<(usize, f32)>,
}

impl Assembler {
    pub fn new(spec: AssembleSpec) -> Self {
        assert!(spec.cadence_ms > 0 && spec.window_steps > 0 && spec.hop_steps > 0);
        Self {
            spec,
            cells: DashMap::with_hasher(FastHash::default()),
            clocks: HashMap::default(),
            cells_of_partition: HashMap::default(),
            features: Vec::new(),
        }
    }

    pub fn spec(&self) -> &AssembleSpec {
        &self.spec
    }

    /// First step a partition's watermark has not closed, or `i64::MIN` before any data.
    fn partition_closed(&self, partition: i32) -> i64 {
        self.clocks
            .get(&partition)
            .map_or(i64::MIN, |c| self.closed_for(c.max_event_time_ms))
    }

    fn closed_for(&self, max_event_time_ms: i64) -> i64 {
        max_event_time_ms
            .saturating_sub(self.spec.allowed_lateness_ms)
            .div_euclid(self.spec.cadence_ms)
    }

    /// Adds one validated reading of node `node` in cell `cell`, and appends to `out` every
    /// window that closes because of it.
    pub fn add(
        &mut self,
        cell: &Arc<str>,
        node: &Arc<str>,
        reading: &Reading,
        at: Provenance,
        out: &mut Vec<Window>,
    ) -> (Admission, Closed) {
        let mut features = std::mem::take(&mut self.features);
        let admission = self.insert(cell, node, reading, at, &mut features);
        self.features = features;
        let closed = self.advance(at.partition, reading.event_time_ms, out);
        (admission, closed)
    }

    fn insert(
        &mut self,
        cell: &Arc<str>,
        node: &Arc<str>,
        reading: &Reading,
        at: Provenance,
        features: &mut Vec<(usize, f32)>,
    ) -> Admission {
        let step = self.spec.step_of(reading.event_time_ms);
        // Looked up first: a known cell (nearly every reading) needs no key clone and no
        // entry under the map's write lock.
        let mut state = match self.cells.get_mut(cell) {
            Some(state) => state,
            None if self.cells.len() >= self.spec.max_cells => return Admission::TooManyCells,
            None => {
                let closed_before = self.partition_closed(at.partition);
                self.cells
                    .entry(Arc::clone(cell))
                    .or_insert_with(|| CellState {
                        nodes: Vec::new(),
                        slots: HashMap::default(),
                        latest: Vec::new(),
                        base_step: step,
                        history: History::default(),
                        closed_before,
                        partitions: Vec::new(),
                        last_data_step: i64::MIN,
                        first_data_step: step,
                        phase: self.spec.phase_of(cell),
                    })
            }
        };
        let known_slot = state.slots.get(node).copied();
        // A numbered reading no newer than the node's newest, in sequence and in event time, is
        // a copy from an upstream replay (a restarted `gridwatch route`, a producer retry
        // without idempotence): averaging it in again would skew the step's mean, and calling
        // it late would fill the dead-letter topic with copies. A sensor that restarts its
        // numbering sends newer event times, so it is not mistaken for one.
        if let (Some(sequence), Some(slot)) = (reading.sequence, known_slot)
            && let Some((seq, time)) = state.latest[slot]
            && sequence <= seq
            && reading.event_time_ms <= time
        {
            return Admission::Duplicate;
        }
        if step < state.closed_before {
            return Admission::Late {
                step_end_ms: step.saturating_add(1).saturating_mul(self.spec.cadence_ms),
                watermark_ms: state.closed_before.saturating_mul(self.spec.cadence_ms),
            };
        }
        features.clear();
        features.extend(reading.values.iter().filter_map(|(name, value)| {
            let f = self.spec.channels.iter().position(|c| c == name)?;
            Some((f, *value as f32))
        }));
        let ignored = reading.values.len() - features.len();
        if features.is_empty() {
            return Admission::NoModelChannel;
        }
        let width = self.spec.features();
        let slot = match known_slot {
            Some(slot) => slot,
            None if state.nodes.len() >= self.spec.max_nodes => return Admission::CellFull,
            None => {
                let slot = state.nodes.len();
                state.nodes.push(Arc::clone(node));
                state.slots.insert(Arc::clone(node), slot);
                state.latest.push(None);
                let entries = state.nodes.len() * width;
                state.history.widen(entries);
                slot
            }
        };
        let (partition_slot, new_partition) =
            match state.partitions.iter().position(|&p| p == at.partition) {
                Some(slot) => (slot, false),
                None => {
                    state.partitions.push(at.partition);
                    state.history.add_partition();
                    (state.partitions.len() - 1, true)
                }
            };
        if state.history.is_empty() {
            state.base_step = step;
        }
        if step < state.base_step {
            let before = (state.base_step - step) as usize;
            state.history.extend_front(before);
            state.base_step = step;
        }
        let index = (step - state.base_step) as usize;
        if index >= state.history.len() {
            let more = index + 1 - state.history.len();
            state.history.extend_back(more);
        }
        for &(f, value) in features.iter() {
            state
                .history
                .add(index, slot * width + f, value, partition_slot, at.offset);
        }
        state.last_data_step = state.last_data_step.max(step);
        state.first_data_step = state.first_data_step.min(step);
        if let Some(sequence) = reading.sequence {
            let newest = state.latest[slot].map_or((sequence, reading.event_time_ms), |(s, t)| {
                (s.max(sequence), t.max(reading.event_time_ms))
            });
            state.latest[slot] = Some(newest);
        }
        if new_partition {
            drop(state);
            self.cells_of_partition
                .entry(at.partition)
                .or_default()
                .push(Arc::clone(cell));
        }
        Admission::Accepted { ignored }
    }

    /// Moves `partition`'s clock to `event_time_ms` as if a reading stamped then had arrived,
    /// and appends every window that closes. An offline replay calls it once past its last
    /// reading to close the final windows.
    pub fn advance_to(
        &mut self,
        partition: i32,
        event_time_ms: i64,
        out: &mut Vec<Window>,
    ) -> Closed {
        self.advance(partition, event_time_ms, out)
    }

    /// Moves the partition's clock to `event_time_ms` and closes what that allows.
    fn advance(&mut self, partition: i32, event_time_ms: i64, out: &mut Vec<Window>) -> Closed {
        let clock = self.clocks.entry(partition).or_insert(PartitionClock {
            max_event_time_ms: event_time_ms,
            swept: i64::MIN,
        });
        clock.max_event_time_ms = clock.max_event_time_ms.max(event_time_ms);
        let max = clock.max_event_time_ms;
        let closed = self.closed_for(max);
        let clock = self.clocks.get_mut(&partition).expect("inserted above");
        if closed <= clock.swept {
            return Closed::default();
        }
        clock.swept = closed;
        let mut result = Closed::default();
        let cells = self
            .cells_of_partition
            .get(&partition)
            .cloned()
            .unwrap_or_default();
        let idle_steps = self
            .spec
            .idle_cell_ms
            .div_euclid(self.spec.cadence_ms)
            .max(1);
        let mut idle = Vec::new();
        for cell in cells {
            let Some(mut state) = self.cells.get_mut(&cell) else {
                continue;
            };
            let target = state
                .partitions
                .iter()
                .map(|p| self.partition_closed(*p))
                .min()
                .unwrap_or(closed);
            if target > state.closed_before {
                let r = close(&self.spec, &cell, &mut state, target, out);
                result.emitted += r.emitted;
                result.sparse += r.sparse;
                result.warmup += r.warmup;
            }
            if state.history.is_empty() && target.saturating_sub(state.last_data_step) > idle_steps
            {
                idle.push((cell, target));
            }
        }
        for (cell, target) in idle {
            self.drop_cell(&cell);
            result.silent.push((cell, target * self.spec.cadence_ms));
        }
        result
    }

    /// Forgets a cell entirely: its steps, its nodes and its place in the partition index.
    fn drop_cell(&mut self, cell: &Arc<str>) {
        let Some((_, state)) = self.cells.remove(cell) else {
            return;
        };
        for partition in state.partitions {
            if let Some(cells) = self.cells_of_partition.get_mut(&partition) {
                cells.retain(|c| c != cell);
            }
        }
    }

    /// Forgets everything a partition fed: its clock and every cell it fed (their windows
    /// cannot be completed here any more). Called when the partition is revoked; if it comes
    /// back, its cells are rebuilt by replaying from the committed offset. Returns the cells
    /// dropped, so that the later stages can drop what they hold of them too.
    pub fn forget_partition(&mut self, partition: i32) -> Vec<Arc<str>> {
        self.clocks.remove(&partition);
        let cells = self
            .cells_of_partition
            .remove(&partition)
            .unwrap_or_default();
        for cell in &cells {
            self.drop_cell(cell);
        }
        cells
    }

    /// Number of cells held.
    pub fn cell_count(&self) -> usize {
        self.cells.len()
    }

    /// Least source offset per partition still held by a kept step.
    pub fn low_water(&self) -> HashMap<i32, i64> {
        let mut low = HashMap::new();
        for cell in self.cells.iter() {
            for step in 0..cell.history.len() {
                for (slot, o) in cell.history.lows(step) {
                    low.entry(cell.partitions[slot])
                        .and_modify(|m: &mut i64| *m = (*m).min(o))
                        .or_insert(o);
                }
            }
        }
        low
    }

    /// Bytes of window state held (every cell's history: its buffers, used or not, and their
    /// headers), and the bytes of the raw `[steps × N × F]` f32 tensor it represents.
    pub fn memory(&self) -> (usize, usize) {
        let mut held = 0;
        let mut raw = 0;
        for cell in self.cells.iter() {
            held += size_of::<History>() + cell.history.bytes();
            raw += cell.history.len() * cell.nodes.len() * self.spec.features() * 4;
        }
        (held, raw)
    }
}

/// Closes a cell's steps below `target`, emitting the windows that end in `(closed_before,
/// target]`, then drops the steps no future window needs.
fn close(
    spec: &AssembleSpec,
    cell: &Arc<str>,
    state: &mut CellState,
    target: i64,
    out: &mut Vec<Window>,
) -> Closed {
    let hop = spec.hop_steps as i64;
    let t = spec.window_steps as i64;
    let mut result = Closed::default();
    // The history is whole from one step past the allowed lateness after the earliest reading:
    // an earlier reading could only have come before this instance started (a restart from
    // committed offsets), and a window that might lack it is never emitted.
    let margin = warmup_margin(spec);
    let first_full_step = state.first_data_step + margin;
    // Only windows that contain data can be worth building.
    let last_useful = target.min(state.last_data_step.saturating_add(t));
    let first_end = state.end_after(state.closed_before, hop);
    // Skip straight past empty history after a long gap.
    let mut end = first_end.max(state.end_after(state.base_step, hop));
    if end <= last_useful {
        // Rows are read as slices; most closes (every step, against a window every hop) build
        // nothing and leave the ring as it is.
        state.history.make_contiguous();
    }
    while end <= last_useful {
        if end - t < first_full_step {
            result.warmup += 1;
            end += hop;
            continue;
        }
        match build(spec, cell, state, end) {
            Some(window) => {
                out.push(window);
                result.emitted += 1;
            }
            None => result.sparse += 1,
        }
        end += hop;
    }
    state.closed_before = target;
    let closed_steps = (target - state.base_step).max(0) as usize;
    state.history.seal(closed_steps);
    // Keep what the next window needs, plus the warm-up margin before it: a restart from the
    // offsets these steps hold then sees the next window's history whole and emits it.
    let next_end = state.end_after(target, hop);
    let keep_from = next_end - t - margin;
    while state.base_step < keep_from && !state.history.is_empty() {
        state.history.pop_front();
        state.base_step += 1;
    }
    if state.history.is_empty() {
        state.base_step = keep_from.max(state.base_step);
    }
    result
}

/// Steps of history a window needs before its start to count as whole after a (re)start: the
/// allowed lateness, rounded up to steps, plus one.
fn warmup_margin(spec: &AssembleSpec) -> i64 {
    (spec.allowed_lateness_ms + spec.cadence_ms - 1) / spec.cadence_ms + 1
}

/// The window ending at step `end`, or `None` when too little of it was observed.
fn build(spec: &AssembleSpec, cell: &Arc<str>, state: &CellState, end: i64) -> Option<Window> {
    let t = spec.window_steps;
    let f = spec.features();
    let n = state.nodes.len();
    let start = end - t as i64;
    // Nodes in id order, not arrival order: a replay that meets the nodes in another order
    // still builds the same tensor, so its scores (float sums included) are bit-identical.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by(|&a, &b| state.nodes[a].cmp(&state.nodes[b]));
    let mut values = vec![0.0f32; t * n * f];
    let mut mask = vec![0.0f32; t * n * f];
    let mut observed = 0usize;
    let mut holds: Vec<(i32, i64)> = Vec::new();
    // A restart must replay the margin before the window too, or the warm-up rule would keep
    // the window from being emitted again.
    let margin = warmup_margin(spec);
    let held = state.history.len();
    let first_held = ((start - margin - state.base_step).max(0) as usize).min(held);
    let last = ((end - state.base_step).max(0) as usize).min(held);
    for step in first_held..last {
        for (slot, o) in state.history.lows(step) {
            merge_low(&mut holds, state.partitions[slot], o);
        }
    }
    for ti in 0..t {
        let step = start + ti as i64 - state.base_step;
        if step < 0 || step as usize >= held {
            continue;
        }
        let means = state.history.row(step as usize);
        for (to, &from) in order.iter().enumerate() {
            for (k, &mean) in means[from * f..(from + 1) * f].iter().enumerate() {
                if !mean.is_nan() {
                    let i = ti * n * f + to * f + k;
                    values[i] = mean;
                    mask[i] = 1.0;
                    observed += 1;
                }
            }
        }
    }
    let total = t * n * f;
    let observed_fraction = observed as f64 / total as f64;
    if total == 0 || observed_fraction < spec.min_observed_fraction {
        return None;
    }
    holds.sort_unstable();
    Some(Window {
        cell: Arc::clone(cell),
        start_ms: start.saturating_mul(spec.cadence_ms),
        end_ms: end.saturating_mul(spec.cadence_ms),
        nodes: order.iter().map(|&i| Arc::clone(&state.nodes[i])).collect(),
        values,
        mask,
        missing_fraction: 1.0 - observed_fraction,
        holds,
        closed_at: std::time::Instant::now(),
    })
}

#[cfg(test)]
mod tests;
