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

use serde::{Deserialize, Serialize};

mod config;
mod plan;

pub use config::{
    DriftConfig, DropoutConfig, IncidentConfig, InjectConfig, SpikeConfig, StuckConfig,
};
use plan::Planner;

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

    let mut planner = Planner::new(&series.values, &series.nodes, config);
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

#[cfg(test)]
mod tests;
