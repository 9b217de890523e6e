//! Seeded fault injection: labelled anomalies written into clean, unlabelled sensor data.
//!
//! METR-LA carries no anomaly labels, so detection quality on it is measured on faults that this
//! module writes into a clean series. [`inject`] takes a `rows × nodes` matrix of readings (one row
//! per time step, row-major), the road-graph adjacency and an [`InjectConfig`]; it changes the
//! matrix in place and returns one [`InjectedFault`] per fault. [`labels_csv`] turns those into
//! the labels file the evaluator reads (`start_ms,end_ms,node_ids,kind,fault_id`).
//!
//! Everything is counted in rows. For METR-LA a row is 5 minutes, so the defaults read as
//! "30–90 min" and so on; [`METR_LA_START_MS`] and [`METR_LA_STEP_MS`] map rows to event time the
//! same way `scripts/metr_la_to_long.py` does.
//!
//! # Invariants
//! - **Deterministic.** The changed matrix and the returned faults are a pure function of
//!   (matrix, adjacency, config): every random draw comes from one `ChaCha8Rng` seeded with
//!   `config.seed`, and placement runs in a fixed order (kinds in the order incident, stuck, drift,
//!   dropout, spike; within a kind, one fault after another).
//! - **Inside the range.** Every changed cell lies in rows `[from_row, to_row)`, and so does every
//!   label.
//! - **No overlap.** Two faults never share a sensor at overlapping times: between the label ranges
//!   of two faults on one sensor lie at least `gap_rows` rows that no fault touches.
//! - **Labels list exactly what was changed.** A cell `(row, node)` differs from the input only if
//!   a returned fault has `start_row <= row < end_row` and lists the node in `nodes`; every listed
//!   node is written somewhere in that range. (A written cell can keep its value by coincidence: a
//!   stuck sensor's first row, a speed already at the clamp.)
//! - **Finite cells only.** A fault is placed only where every cell its label covers holds a
//!   finite value, so blank (NaN) readings are never faulted or mistaken for dropouts.
//! - **No panics, all or nothing.** Bad shapes, ranges, node ids and configurations are
//!   [`InjectError`]s, as is a configuration asking for more faults than fit
//!   ([`InjectError::NoRoom`]). Faults are planned first and written last, so on an error the
//!   matrix is unchanged. Every error is final: retrying with the same input gives the same error.

use std::fmt::{self, Write as _};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

mod config;

pub use config::{
    DriftConfig, DropoutConfig, IncidentConfig, InjectConfig, SpikeConfig, StuckConfig,
};

/// Event time of row 0 of the METR-LA week: 2012-03-05T00:00:00Z, a Monday. The data files carry
/// no timestamps; this is a convention shared with `scripts/metr_la_to_long.py`.
pub const METR_LA_START_MS: i64 = 1_330_905_600_000;

/// Spacing of METR-LA rows: 5 minutes.
pub const METR_LA_STEP_MS: i64 = 300_000;

/// A `rows × nodes` matrix of readings.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Node (sensor) ids in column order. They must be unique and non-empty and must not contain
    /// `,`, `;`, `"` or a line break, because they are written into the labels CSV.
    pub nodes: Vec<String>,
    /// Readings, row-major: `values[row * nodes.len() + node]`. NaN marks a blank reading.
    pub values: Vec<f64>,
    /// Number of rows (time steps).
    pub rows: usize,
}

/// What kind of fault an [`InjectedFault`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A traffic incident: the primary sensor's speed drops to a fraction of what it was, ramping
    /// in and out; its strongest road-graph neighbours get a smaller drop, scaled by the adjacency
    /// weight, after a short propagation delay.
    Incident,
    /// The sensor repeats its value at the fault's first row.
    Stuck,
    /// One to a few isolated rows jump by a large amount, up or down (clamped to `value_range`).
    Spike,
    /// The sensor reports 0 (what a dead loop detector reports), or blank if configured.
    Dropout,
    /// A bias growing linearly from 0 to its full size, then holding to the end of the fault.
    Drift,
}

impl FaultKind {
    /// Every kind, in the order faults are placed (largest footprint first).
    pub const PLACEMENT_ORDER: [FaultKind; 5] = [
        FaultKind::Incident,
        FaultKind::Stuck,
        FaultKind::Drift,
        FaultKind::Dropout,
        FaultKind::Spike,
    ];

    /// The snake_case name used in configs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Incident => "incident",
            FaultKind::Stuck => "stuck",
            FaultKind::Spike => "spike",
            FaultKind::Dropout => "dropout",
            FaultKind::Drift => "drift",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One neighbour an incident spread to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentNeighbour {
    /// The neighbour's node id.
    pub node: String,
    /// Adjacency weight from the primary to this neighbour.
    pub weight: f64,
    /// Fraction of its speed the neighbour keeps at the plateau: `1 - (1 - factor) * weight`.
    pub factor: f64,
    /// Rows after the incident's start at which the neighbour's drop begins.
    pub delay_rows: usize,
}

/// The magnitudes drawn for one fault, enough to recompute every value it wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultParams {
    /// Row `start + t` of the primary becomes `orig * (1 - (1 - factor) * envelope(t))`, where the
    /// envelope is `min(1, (t + 1) / (ramp_rows + 1), (duration_rows - t) / (ramp_rows + 1))` for
    /// `0 <= t < duration_rows`; a neighbour does the same with its own factor, `delay_rows` later.
    Incident {
        /// Fraction of its speed the primary keeps at the plateau.
        factor: f64,
        /// Rows each node's drop lasts, ramps included.
        duration_rows: usize,
        /// Rows of the ramp in and of the ramp out.
        ramp_rows: usize,
        /// The neighbours it spread to, strongest first (same order as `nodes[1..]`).
        neighbours: Vec<IncidentNeighbour>,
    },
    /// Every row holds `value`, the sensor's reading at `start_row`.
    Stuck {
        /// The repeated value.
        value: f64,
    },
    /// Row `rows[i]` moved by `jumps[i]` (signed, after clamping); rows between them are untouched.
    Spike {
        /// The rows that jumped, ascending; the first is `start_row`, the last is `end_row - 1`.
        rows: Vec<usize>,
        /// The realised jump of each row.
        jumps: Vec<f64>,
    },
    /// Every row holds 0, or NaN when `blank`.
    Dropout {
        /// Whether the rows were blanked (NaN) rather than set to 0.
        blank: bool,
    },
    /// Row `start + t` becomes `clamp(orig + bias * min(1, (t + 1) / ramp_rows))`.
    Drift {
        /// The full bias (signed).
        bias: f64,
        /// Rows over which the bias grows to its full size.
        ramp_rows: usize,
    },
}

/// One fault written into the series; one line of the labels file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InjectedFault {
    /// 1-based id, in order of `(start_row, primary column, kind)`.
    pub id: u32,
    /// The kind of fault.
    pub kind: FaultKind,
    /// The faulted sensor.
    pub primary: String,
    /// Every sensor the fault wrote to, primary first.
    pub nodes: Vec<String>,
    /// First row written (inclusive).
    pub start_row: usize,
    /// End of the rows written (exclusive), covering every changed row of every node.
    pub end_row: usize,
    /// The drawn magnitudes.
    pub params: FaultParams,
}

/// Why [`inject`] refused. Every variant is final.
#[derive(Debug, Clone, PartialEq)]
pub enum InjectError {
    /// `values.len()` is not `rows × nodes.len()`.
    Shape {
        /// Length of `values`.
        values: usize,
        /// `rows` as given.
        rows: usize,
        /// Number of node ids.
        nodes: usize,
    },
    /// The adjacency is not `nodes × nodes`.
    Adjacency {
        /// Length of the adjacency slice.
        len: usize,
        /// Number of node ids.
        nodes: usize,
    },
    /// `[from_row, to_row)` reaches past the last row of the series.
    Range {
        /// `from_row` as configured.
        from_row: usize,
        /// `to_row` as configured.
        to_row: usize,
        /// Rows in the series.
        rows: usize,
    },
    /// A node id is duplicated, empty or holds a character the labels CSV cannot carry.
    NodeId {
        /// The offending id.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A configuration field is outside its domain.
    Config {
        /// The field, dotted (`spike.jump`).
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A fault found no place within `max_attempts` tries.
    NoRoom {
        /// The kind that did not fit.
        kind: FaultKind,
        /// How many of that kind were placed.
        placed: usize,
        /// How many were asked for.
        requested: usize,
    },
}

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InjectError::Shape {
                values,
                rows,
                nodes,
            } => write!(
                f,
                "series has {values} values, expected rows ({rows}) × nodes ({nodes})"
            ),
            InjectError::Adjacency { len, nodes } => {
                write!(f, "adjacency has {len} weights, expected {nodes} × {nodes}")
            }
            InjectError::Range {
                from_row,
                to_row,
                rows,
            } => write!(
                f,
                "row range [{from_row}, {to_row}) does not fit a series of {rows} rows"
            ),
            InjectError::NodeId { id, reason } => write!(f, "node id {id:?} {reason}"),
            InjectError::Config { field, reason } => write!(f, "config field {field} {reason}"),
            InjectError::NoRoom {
                kind,
                placed,
                requested,
            } => write!(
                f,
                "no room for {kind} fault {} of {requested} (placed {placed})",
                placed + 1
            ),
        }
    }
}

impl std::error::Error for InjectError {}

/// Writes faults into `series` as `config` asks and returns them, sorted by start row.
///
/// `adjacency` is the `nodes × nodes` road-graph weight matrix, row-major in the column order of
/// `series` (`adjacency[i * n + j]` is the weight from `i` to `j`; non-finite weights count as 0,
/// the diagonal is ignored). It is only read for incidents. On an error `series` is unchanged.
pub fn inject(
    series: &mut Series,
    adjacency: &[f64],
    config: &InjectConfig,
) -> Result<Vec<InjectedFault>, InjectError> {
    config.validate()?;
    let n = series.nodes.len();
    if n.checked_mul(series.rows) != Some(series.values.len()) {
        return Err(InjectError::Shape {
            values: series.values.len(),
            rows: series.rows,
            nodes: n,
        });
    }
    if n.checked_mul(n) != Some(adjacency.len()) {
        return Err(InjectError::Adjacency {
            len: adjacency.len(),
            nodes: n,
        });
    }
    check_node_ids(&series.nodes)?;
    if config.to_row > series.rows {
        return Err(InjectError::Range {
            from_row: config.from_row,
            to_row: config.to_row,
            rows: series.rows,
        });
    }

    let mut planner = Planner {
        values: &series.values,
        nodes: &series.nodes,
        n,
        config,
        rng: ChaCha8Rng::seed_from_u64(config.seed),
        busy: vec![Vec::new(); n],
        neighbours: Vec::new(),
        primaries: Vec::new(),
    };
    if config.incident.count > 0 {
        planner.find_neighbours(adjacency);
    }
    let mut plans = Vec::new();
    for kind in FaultKind::PLACEMENT_ORDER {
        let requested = config.count(kind);
        for placed in 0..requested {
            match planner.place(kind) {
                Some(plan) => plans.push(plan),
                None => {
                    return Err(InjectError::NoRoom {
                        kind,
                        placed,
                        requested,
                    });
                }
            }
        }
    }
    plans.sort_by_key(|p| (p.start_row, p.nodes[0], p.kind));

    let mut faults = Vec::with_capacity(plans.len());
    for (i, plan) in plans.into_iter().enumerate() {
        for &(row, node, value) in &plan.writes {
            series.values[row * n + node] = value;
        }
        faults.push(InjectedFault {
            id: u32::try_from(i + 1).unwrap_or(u32::MAX),
            kind: plan.kind,
            primary: series.nodes[plan.nodes[0]].clone(),
            nodes: plan
                .nodes
                .iter()
                .map(|&j| series.nodes[j].clone())
                .collect(),
            start_row: plan.start_row,
            end_row: plan.end_row,
            params: plan.params,
        });
    }
    Ok(faults)
}

/// The labels file the evaluator reads: a header, then per fault
/// `start_ms,end_ms,node_ids,kind,fault_id` with `node_ids` `;`-separated (primary first) and
/// `end_ms` exclusive. `row_to_ms` maps a row to its event time; for METR-LA use
/// `|r| METR_LA_START_MS + r as i64 * METR_LA_STEP_MS`. Node ids are written as they are
/// ([`inject`] has checked they need no quoting).
pub fn labels_csv(faults: &[InjectedFault], row_to_ms: impl Fn(usize) -> i64) -> String {
    let mut out = String::from("start_ms,end_ms,node_ids,kind,fault_id\n");
    for f in faults {
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            "{},{},{},{},{}",
            row_to_ms(f.start_row),
            row_to_ms(f.end_row),
            f.nodes.join(";"),
            f.kind,
            f.id
        );
    }
    out
}

fn check_node_ids(nodes: &[String]) -> Result<(), InjectError> {
    let mut seen = std::collections::HashSet::with_capacity(nodes.len());
    for id in nodes {
        let reason = if id.is_empty() {
            Some("is empty")
        } else if id.contains([',', ';', '"', '\n', '\r']) {
            Some("contains one of , ; \" or a line break")
        } else if !seen.insert(id.as_str()) {
            Some("is duplicated")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(InjectError::NodeId {
                id: id.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// A fault decided but not yet written.
struct Plan {
    kind: FaultKind,
    /// Column indices, primary first.
    nodes: Vec<usize>,
    start_row: usize,
    end_row: usize,
    params: FaultParams,
    /// `(row, column, new value)`.
    writes: Vec<(usize, usize, f64)>,
}

struct Planner<'a> {
    /// The original readings; nothing is written until every fault is planned.
    values: &'a [f64],
    /// Node ids, in column order.
    nodes: &'a [String],
    n: usize,
    config: &'a InjectConfig,
    rng: ChaCha8Rng,
    /// Per column, the label ranges `[start, end)` of the faults placed on it.
    busy: Vec<Vec<(usize, usize)>>,
    /// Per column, its incident neighbours `(column, weight)`, strongest first.
    neighbours: Vec<Vec<(usize, f64)>>,
    /// Columns with at least `incident.min_neighbours` neighbours.
    primaries: Vec<usize>,
}

/// Incident envelope at `t` rows into a drop of `duration` rows with `ramp`-row ramps; in (0, 1].
fn envelope(t: usize, duration: usize, ramp: usize) -> f64 {
    let r = ramp as f64 + 1.0;
    let rise = (t as f64 + 1.0) / r;
    let fall = duration.saturating_sub(t) as f64 / r;
    rise.min(fall).min(1.0)
}

/// Drift bias `t` rows into the fault.
fn drift_bias(t: usize, bias: f64, ramp_rows: usize) -> f64 {
    bias * ((t as f64 + 1.0) / ramp_rows.max(1) as f64).min(1.0)
}

/// Clamps without `f64::clamp`'s panic on a bad range.
fn clamp(x: f64, [lo, hi]: [f64; 2]) -> f64 {
    x.max(lo).min(hi)
}

impl Planner<'_> {
    fn find_neighbours(&mut self, adjacency: &[f64]) {
        let inc = &self.config.incident;
        self.neighbours = (0..self.n)
            .map(|i| {
                let row = &adjacency[i * self.n..(i + 1) * self.n];
                let mut nb: Vec<(usize, f64)> = row
                    .iter()
                    .enumerate()
                    .filter(|&(j, &w)| j != i && w.is_finite() && w > inc.min_weight)
                    .map(|(j, &w)| (j, w))
                    .collect();
                nb.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                nb.truncate(inc.max_neighbours);
                nb
            })
            .collect();
        self.primaries = (0..self.n)
            .filter(|&i| self.neighbours[i].len() >= inc.min_neighbours)
            .collect();
    }

    fn value(&self, row: usize, node: usize) -> f64 {
        self.values[row * self.n + node]
    }

    fn draw_rows(&mut self, [lo, hi]: [usize; 2]) -> usize {
        if lo >= hi {
            lo
        } else {
            self.rng.random_range(lo..=hi)
        }
    }

    fn draw_f64(&mut self, [lo, hi]: [f64; 2]) -> f64 {
        let u: f64 = self.rng.random();
        lo + (hi - lo) * u
    }

    fn draw_sign(&mut self) -> f64 {
        if self.rng.random_bool(0.5) { 1.0 } else { -1.0 }
    }

    fn draw_node(&mut self) -> Option<usize> {
        (self.n > 0).then(|| self.rng.random_range(0..self.n))
    }

    /// A start row for a fault spanning `extent` rows, if one fits in the range.
    fn draw_start(&mut self, extent: usize) -> Option<usize> {
        let (from, to) = (self.config.from_row, self.config.to_row);
        if extent == 0 || extent > to - from {
            return None;
        }
        Some(self.rng.random_range(from..=to - extent))
    }

    /// Whether `[start, end)` on every node is clear of other faults (by the gap) and finite.
    fn fits(&self, nodes: &[usize], start: usize, end: usize) -> bool {
        let gap = self.config.gap_rows;
        nodes.iter().all(|&j| {
            self.busy[j]
                .iter()
                .all(|&(s, e)| e.saturating_add(gap) <= start || end.saturating_add(gap) <= s)
                && (start..end).all(|r| self.value(r, j).is_finite())
        })
    }

    /// Places one fault of `kind`, trying up to `max_attempts` times.
    fn place(&mut self, kind: FaultKind) -> Option<Plan> {
        for _ in 0..self.config.max_attempts {
            let attempt = match kind {
                FaultKind::Incident => self.try_incident(),
                FaultKind::Stuck => self.try_stuck(),
                FaultKind::Spike => self.try_spike(),
                FaultKind::Dropout => self.try_dropout(),
                FaultKind::Drift => self.try_drift(),
            };
            if let Some(plan) = attempt {
                for &j in &plan.nodes {
                    self.busy[j].push((plan.start_row, plan.end_row));
                }
                return Some(plan);
            }
        }
        None
    }

    fn try_incident(&mut self) -> Option<Plan> {
        if self.primaries.is_empty() {
            return None;
        }
        let primary = self.primaries[self.rng.random_range(0..self.primaries.len())];
        let cfg = &self.config.incident;
        let (duration_rows, factor_range, delay_range, ramp) =
            (cfg.duration_rows, cfg.factor, cfg.delay_rows, cfg.ramp_rows);
        let duration = self.draw_rows(duration_rows);
        let factor = self.draw_f64(factor_range);
        let mut effects = vec![(primary, 1.0, factor, 0)];
        for k in 0..self.neighbours[primary].len() {
            let (j, w) = self.neighbours[primary][k];
            let delay = self.draw_rows(delay_range);
            effects.push((j, w, 1.0 - (1.0 - factor) * w.min(1.0), delay));
        }
        let extent = effects
            .iter()
            .map(|&(_, _, _, d)| d.saturating_add(duration))
            .max()
            .unwrap_or(duration);
        let start = self.draw_start(extent)?;
        let end = start + extent;
        let nodes: Vec<usize> = effects.iter().map(|e| e.0).collect();
        if !self.fits(&nodes, start, end) {
            return None;
        }
        let mut writes = Vec::new();
        for &(j, _, f, delay) in &effects {
            for t in 0..duration {
                let row = start + delay + t;
                let drop = (1.0 - f) * envelope(t, duration, ramp);
                writes.push((row, j, self.value(row, j) * (1.0 - drop)));
            }
        }
        let neighbours = effects[1..]
            .iter()
            .map(|&(j, weight, factor, delay_rows)| IncidentNeighbour {
                node: self.nodes[j].clone(),
                weight,
                factor,
                delay_rows,
            })
            .collect();
        Some(Plan {
            kind: FaultKind::Incident,
            nodes,
            start_row: start,
            end_row: end,
            params: FaultParams::Incident {
                factor,
                duration_rows: duration,
                ramp_rows: ramp,
                neighbours,
            },
            writes,
        })
    }

    /// A single-node fault of `extent` rows; `None` if it does not fit.
    fn single(&mut self, extent: usize) -> Option<(usize, usize)> {
        let node = self.draw_node()?;
        let start = self.draw_start(extent)?;
        self.fits(&[node], start, start + extent)
            .then_some((node, start))
    }

    fn try_stuck(&mut self) -> Option<Plan> {
        let duration = self.draw_rows(self.config.stuck.duration_rows);
        let (node, start) = self.single(duration)?;
        let value = self.value(start, node);
        Some(Plan {
            kind: FaultKind::Stuck,
            nodes: vec![node],
            start_row: start,
            end_row: start + duration,
            params: FaultParams::Stuck { value },
            writes: (start..start + duration)
                .map(|r| (r, node, value))
                .collect(),
        })
    }

    fn try_dropout(&mut self) -> Option<Plan> {
        let duration = self.draw_rows(self.config.dropout.duration_rows);
        let (node, start) = self.single(duration)?;
        let blank = self.config.dropout.blank;
        let value = if blank { f64::NAN } else { 0.0 };
        Some(Plan {
            kind: FaultKind::Dropout,
            nodes: vec![node],
            start_row: start,
            end_row: start + duration,
            params: FaultParams::Dropout { blank },
            writes: (start..start + duration)
                .map(|r| (r, node, value))
                .collect(),
        })
    }

    fn try_drift(&mut self) -> Option<Plan> {
        let d = &self.config.drift;
        let (ramp_range, hold_range, bias_range) = (d.ramp_rows, d.hold_rows, d.bias);
        let ramp = self.draw_rows(ramp_range);
        let hold = self.draw_rows(hold_range);
        let bias = self.draw_sign() * self.draw_f64(bias_range);
        let extent = ramp.saturating_add(hold);
        let (node, start) = self.single(extent)?;
        let range = self.config.value_range;
        let writes = (0..extent)
            .map(|t| {
                let row = start + t;
                let v = clamp(self.value(row, node) + drift_bias(t, bias, ramp), range);
                (row, node, v)
            })
            .collect();
        Some(Plan {
            kind: FaultKind::Drift,
            nodes: vec![node],
            start_row: start,
            end_row: start + extent,
            params: FaultParams::Drift {
                bias,
                ramp_rows: ramp,
            },
            writes,
        })
    }

    fn try_spike(&mut self) -> Option<Plan> {
        let s = &self.config.spike;
        let (spikes_range, spacing_range, jump_range) = (s.spikes, s.spacing_rows, s.jump);
        let spikes = self.draw_rows(spikes_range);
        let mut offsets = vec![0usize];
        for _ in 1..spikes {
            let step = self.draw_rows(spacing_range);
            let next = offsets.last().copied().unwrap_or(0).saturating_add(step);
            offsets.push(next);
        }
        let extent = offsets.last().copied().unwrap_or(0).saturating_add(1);
        let (node, start) = self.single(extent)?;
        let range = self.config.value_range;
        let mut rows = Vec::with_capacity(offsets.len());
        let mut jumps = Vec::with_capacity(offsets.len());
        let mut writes = Vec::with_capacity(offsets.len());
        for off in offsets {
            let row = start + off;
            let orig = self.value(row, node);
            let size = self.draw_f64(jump_range);
            let sign = self.draw_sign();
            let mut new = clamp(orig + sign * size, range);
            if (new - orig).abs() < jump_range[0] {
                // The clamp cut the jump short; `validate` guarantees the other way has room.
                new = clamp(orig - sign * size, range);
            }
            rows.push(row);
            jumps.push(new - orig);
            writes.push((row, node, new));
        }
        Some(Plan {
            kind: FaultKind::Spike,
            nodes: vec![node],
            start_row: start,
            end_row: start + extent,
            params: FaultParams::Spike { rows, jumps },
            writes,
        })
    }
}

#[cfg(test)]
mod tests;
