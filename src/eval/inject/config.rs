//! The injector's configuration: each fault kind's count and ranges, their defaults, and the
//! rules [`InjectConfig::validate`] checks.

use serde::{Deserialize, Serialize};

use super::{FaultKind, InjectError};

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
    /// Checks the rules that span fields or bound a field's domain.
    /// [`inject`](super::inject) calls it.
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
