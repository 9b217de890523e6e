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

/// The injector's configuration: seed, row range, spacing and each kind's count and ranges.
///
/// Ranges are `[min, max]`, inclusive, drawn uniformly. The defaults suit the 2 test days of the
/// METR-LA week (rows 1440..2016, 576 rows × 207 sensors): about 1.5 % of those sensor-rows are
/// labelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectConfig {
    /// Seed of the one random generator every draw comes from.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// First row faults may touch (inclusive). Default 1440: day 6 of the METR-LA week.
    #[serde(default = "default_from_row")]
    pub from_row: usize,
    /// End of the rows faults may touch (exclusive). Default 2016: the end of the week.
    #[serde(default = "default_to_row")]
    pub to_row: usize,
    /// Rows no fault touches between two faults on one sensor. Default 12 (1 h).
    #[serde(default = "default_gap_rows")]
    pub gap_rows: usize,
    /// Lowest and highest value a spike or a drift may write; they clamp to it. Default `[0, 90]`
    /// mph. Must be at least twice `spike.jump[0]` wide, so that a spike can always jump that far.
    #[serde(default = "default_value_range")]
    pub value_range: [f64; 2],
    /// Placement tries per fault before giving up with [`InjectError::NoRoom`]. Default 1000.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Traffic incidents.
    #[serde(default)]
    pub incident: IncidentConfig,
    /// Stuck sensors.
    #[serde(default)]
    pub stuck: StuckConfig,
    /// Isolated spikes.
    #[serde(default)]
    pub spike: SpikeConfig,
    /// Dead sensors.
    #[serde(default)]
    pub dropout: DropoutConfig,
    /// Gradual calibration drift.
    #[serde(default)]
    pub drift: DriftConfig,
}

/// Traffic incidents (see [`FaultKind::Incident`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentConfig {
    /// How many. Default 12.
    #[serde(default = "default_incident_count")]
    pub count: usize,
    /// Rows each node's drop lasts, ramps included. Default `[6, 18]` (30–90 min).
    #[serde(default = "default_incident_duration")]
    pub duration_rows: [usize; 2],
    /// Fraction of its speed the primary keeps at the plateau, in `[0, 1]`. Default `[0.3, 0.5]`.
    #[serde(default = "default_incident_factor")]
    pub factor: [f64; 2],
    /// A neighbour needs an adjacency weight above this. Default 0.3.
    #[serde(default = "default_incident_min_weight")]
    pub min_weight: f64,
    /// At most this many neighbours, the strongest. Default 4.
    #[serde(default = "default_incident_max_neighbours")]
    pub max_neighbours: usize,
    /// Only sensors with at least this many neighbours are primaries. Default 1.
    #[serde(default = "default_incident_min_neighbours")]
    pub min_neighbours: usize,
    /// Propagation delay to each neighbour, in rows. Default `[1, 2]`.
    #[serde(default = "default_incident_delay")]
    pub delay_rows: [usize; 2],
    /// Rows of the ramp in and of the ramp out; 0 is a hard step. Default 2.
    #[serde(default = "default_incident_ramp")]
    pub ramp_rows: usize,
}

/// Stuck sensors (see [`FaultKind::Stuck`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StuckConfig {
    /// How many. Default 10.
    #[serde(default = "default_stuck_count")]
    pub count: usize,
    /// Rows the value repeats. Default `[12, 48]` (1–4 h).
    #[serde(default = "default_stuck_duration")]
    pub duration_rows: [usize; 2],
}

/// Isolated spikes (see [`FaultKind::Spike`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpikeConfig {
    /// How many faults (each of one or more spiked rows). Default 10.
    #[serde(default = "default_spike_count")]
    pub count: usize,
    /// Spiked rows per fault. Default `[1, 3]`.
    #[serde(default = "default_spike_spikes")]
    pub spikes: [usize; 2],
    /// Rows from one spiked row to the next; at least 2 keeps them isolated. Default `[2, 4]`.
    #[serde(default = "default_spike_spacing")]
    pub spacing_rows: [usize; 2],
    /// Size of each jump, up or down at random; a jump that the clamp would cut below the
    /// minimum goes the other way. Default `[25, 45]` mph.
    #[serde(default = "default_spike_jump")]
    pub jump: [f64; 2],
}

/// Dead sensors (see [`FaultKind::Dropout`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropoutConfig {
    /// How many. Default 10.
    #[serde(default = "default_dropout_count")]
    pub count: usize,
    /// Rows the sensor is dead. Default `[6, 24]` (30–120 min).
    #[serde(default = "default_dropout_duration")]
    pub duration_rows: [usize; 2],
    /// Write NaN (a blank reading) instead of 0. Default false: a dead loop detector reports
    /// 0 mph, and the METR-LA week has no blanks, so 0 is the realistic fault there; blanks test
    /// the assembler's missing-value masks instead of the detector.
    #[serde(default)]
    pub blank: bool,
}

/// Gradual drift (see [`FaultKind::Drift`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    /// How many. Default 8.
    #[serde(default = "default_drift_count")]
    pub count: usize,
    /// Rows over which the bias grows to its full size. Default `[24, 72]` (2–6 h).
    #[serde(default = "default_drift_ramp")]
    pub ramp_rows: [usize; 2],
    /// Rows the full bias then holds. Default `[6, 24]` (30 min–2 h).
    #[serde(default = "default_drift_hold")]
    pub hold_rows: [usize; 2],
    /// Size of the full bias, up or down at random. Default `[10, 20]` mph.
    #[serde(default = "default_drift_bias")]
    pub bias: [f64; 2],
}

fn default_seed() -> u64 {
    1
}
fn default_from_row() -> usize {
    1440
}
fn default_to_row() -> usize {
    2016
}
fn default_gap_rows() -> usize {
    12
}
fn default_value_range() -> [f64; 2] {
    [0.0, 90.0]
}
fn default_max_attempts() -> u32 {
    1000
}
fn default_incident_count() -> usize {
    12
}
fn default_incident_duration() -> [usize; 2] {
    [6, 18]
}
fn default_incident_factor() -> [f64; 2] {
    [0.3, 0.5]
}
fn default_incident_min_weight() -> f64 {
    0.3
}
fn default_incident_max_neighbours() -> usize {
    4
}
fn default_incident_min_neighbours() -> usize {
    1
}
fn default_incident_delay() -> [usize; 2] {
    [1, 2]
}
fn default_incident_ramp() -> usize {
    2
}
fn default_stuck_count() -> usize {
    10
}
fn default_stuck_duration() -> [usize; 2] {
    [12, 48]
}
fn default_spike_count() -> usize {
    10
}
fn default_spike_spikes() -> [usize; 2] {
    [1, 3]
}
fn default_spike_spacing() -> [usize; 2] {
    [2, 4]
}
fn default_spike_jump() -> [f64; 2] {
    [25.0, 45.0]
}
fn default_dropout_count() -> usize {
    10
}
fn default_dropout_duration() -> [usize; 2] {
    [6, 24]
}
fn default_drift_count() -> usize {
    8
}
fn default_drift_ramp() -> [usize; 2] {
    [24, 72]
}
fn default_drift_hold() -> [usize; 2] {
    [6, 24]
}
fn default_drift_bias() -> [f64; 2] {
    [10.0, 20.0]
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            seed: default_seed(),
            from_row: default_from_row(),
            to_row: default_to_row(),
            gap_rows: default_gap_rows(),
            value_range: default_value_range(),
            max_attempts: default_max_attempts(),
            incident: IncidentConfig::default(),
            stuck: StuckConfig::default(),
            spike: SpikeConfig::default(),
            dropout: DropoutConfig::default(),
            drift: DriftConfig::default(),
        }
    }
}

impl Default for IncidentConfig {
    fn default() -> Self {
        IncidentConfig {
            count: default_incident_count(),
            duration_rows: default_incident_duration(),
            factor: default_incident_factor(),
            min_weight: default_incident_min_weight(),
            max_neighbours: default_incident_max_neighbours(),
            min_neighbours: default_incident_min_neighbours(),
            delay_rows: default_incident_delay(),
            ramp_rows: default_incident_ramp(),
        }
    }
}

impl Default for StuckConfig {
    fn default() -> Self {
        StuckConfig {
            count: default_stuck_count(),
            duration_rows: default_stuck_duration(),
        }
    }
}

impl Default for SpikeConfig {
    fn default() -> Self {
        SpikeConfig {
            count: default_spike_count(),
            spikes: default_spike_spikes(),
            spacing_rows: default_spike_spacing(),
            jump: default_spike_jump(),
        }
    }
}

impl Default for DropoutConfig {
    fn default() -> Self {
        DropoutConfig {
            count: default_dropout_count(),
            duration_rows: default_dropout_duration(),
            blank: false,
        }
    }
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            count: default_drift_count(),
            ramp_rows: default_drift_ramp(),
            hold_rows: default_drift_hold(),
            bias: default_drift_bias(),
        }
    }
}

fn config_err(field: &'static str, reason: &'static str) -> InjectError {
    InjectError::Config { field, reason }
}

fn check_rows(field: &'static str, range: [usize; 2], min: usize) -> Result<(), InjectError> {
    if range[0] > range[1] {
        return Err(config_err(field, "has min above max"));
    }
    if range[0] < min {
        return Err(if min == 1 {
            config_err(field, "must be at least 1")
        } else {
            config_err(field, "is below its minimum")
        });
    }
    Ok(())
}

/// Checks a non-negative, finite `[min, max]` range no larger than `cap`.
fn check_magnitude(field: &'static str, range: [f64; 2], cap: f64) -> Result<(), InjectError> {
    if !(range[0].is_finite() && range[1].is_finite()) {
        return Err(config_err(field, "must be finite"));
    }
    if range[0] < 0.0 || range[1] > cap {
        return Err(config_err(field, "is outside its domain"));
    }
    if range[0] > range[1] {
        return Err(config_err(field, "has min above max"));
    }
    Ok(())
}

impl InjectConfig {
    /// Checks the rules that span fields or bound a field's domain. [`inject`] calls it.
    pub fn validate(&self) -> Result<(), InjectError> {
        if self.from_row >= self.to_row {
            return Err(config_err("from_row", "must be below to_row"));
        }
        let [lo, hi] = self.value_range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(config_err(
                "value_range",
                "must be finite with min below max",
            ));
        }
        if self.max_attempts == 0 {
            return Err(config_err("max_attempts", "must be at least 1"));
        }
        let i = &self.incident;
        check_rows("incident.duration_rows", i.duration_rows, 1)?;
        check_magnitude("incident.factor", i.factor, 1.0)?;
        if !i.min_weight.is_finite() {
            return Err(config_err("incident.min_weight", "must be finite"));
        }
        if i.min_neighbours > i.max_neighbours {
            return Err(config_err(
                "incident.min_neighbours",
                "must not exceed max_neighbours",
            ));
        }
        check_rows("incident.delay_rows", i.delay_rows, 0)?;
        check_rows("stuck.duration_rows", self.stuck.duration_rows, 1)?;
        let s = &self.spike;
        check_rows("spike.spikes", s.spikes, 1)?;
        check_rows("spike.spacing_rows", s.spacing_rows, 1)?;
        check_magnitude("spike.jump", s.jump, f64::MAX)?;
        if hi - lo < 2.0 * s.jump[0] {
            return Err(config_err(
                "spike.jump",
                "minimum must be at most half the width of value_range",
            ));
        }
        check_rows("dropout.duration_rows", self.dropout.duration_rows, 1)?;
        let d = &self.drift;
        check_rows("drift.ramp_rows", d.ramp_rows, 1)?;
        check_rows("drift.hold_rows", d.hold_rows, 0)?;
        check_magnitude("drift.bias", d.bias, f64::MAX)?;
        Ok(())
    }

    /// How many faults of `kind` are asked for.
    pub fn count(&self, kind: FaultKind) -> usize {
        match kind {
            FaultKind::Incident => self.incident.count,
            FaultKind::Stuck => self.stuck.count,
            FaultKind::Spike => self.spike.count,
            FaultKind::Dropout => self.dropout.count,
            FaultKind::Drift => self.drift.count,
        }
    }
}

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
