//! detect: a window and its reconstruction → an anomaly score, and an event when it is high.
//!
//! Invariants:
//! - The score is the model contract's formula, nothing else: for each node `n` and channel
//!   `c`, `e[n,c]` is the mean over the last `scored_steps` steps where `(t,n,c)` was observed of
//!   `(reconstruction − normalised value)² / error_scale[c]`, normalised with the contract's
//!   channel statistics; entries never observed there are left out;
//!   the window's score is the largest `e[n,c]`. A window with no observed scored entry scores 0.
//!   Each entry also names its *peak step*, the scored step with its largest squared error (the
//!   earliest of equals): where in the window the deviation is.
//! - With `[detect] flatline_steps` = k > 0, a node/channel observed at each of the window's last
//!   k steps with bit-identical values is *flatlined*; a window with one is anomalous whatever
//!   its score, and its event lists them. Like the score, this is a function of the window only.
//! - With `[detect] spike_sigmas` = k > 0, a node/channel whose value at a checked step differs
//!   from both its neighbouring steps by more than k of its channel's standard deviations, in
//!   the same direction, is a *spike*; a window with one is anomalous whatever its score, and its
//!   event lists them. The checked steps are the scored steps shifted one back (a spike needs
//!   the step after it), so with the hop equal to the scored steps each step is checked once.
//! - With `[detect.divergence]`, the [`Judge`] also flags a node that left its usual place among
//!   its cell's nodes ([`divergence`]); that check remembers earlier windows, so it is the
//!   judge's, not this detector's, and [`Score::diverged`] is empty here.
//! - An event is emitted iff `score ≥ threshold`. Its id is a function of (model name, model
//!   version, cell, window end) only, and every other field is a function of the window and the
//!   model, so scoring the same window again yields a byte-identical event.

pub mod divergence;
pub mod floor;
pub mod incident;
pub mod judge;
pub mod spot;

pub use judge::{Judge, JudgeState, Judgement};

use crate::assemble::Window;
use crate::config::DetectConfig;
use crate::infer::ModelContract;
use crate::schema::{AnomalyEvent, Contributor, Diverged, Flatline, Severity, Spike};

/// A detection setting (`[detect.incidents]`, `[detect.divergence]`) that its `validate`
/// refused, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError(&'static str);

impl std::fmt::Display for SettingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for SettingError {}

/// Namespace of event ids (UUIDv5).
const EVENT_NAMESPACE: uuid::Uuid = uuid::uuid!("6c1e8a52-3f7b-5d2e-9a41-0b7e5c3d2f10");

/// Deterministic id of the event for one window.
pub fn event_id(model: &str, version: &str, cell: &str, window_end_ms: i64) -> String {
    let name = format!("{model}\u{1f}{version}\u{1f}{cell}\u{1f}{window_end_ms}");
    uuid::Uuid::new_v5(&EVENT_NAMESPACE, name.as_bytes()).to_string()
}

/// Severity from how far the score is above the threshold; `None` below it.
pub fn severity(score: f64, threshold: f64) -> Option<Severity> {
    let ratio = score / threshold;
    match ratio {
        r if r.is_nan() || r < 1.0 => None,
        r if r < 2.0 => Some(Severity::Low),
        r if r < 4.0 => Some(Severity::Medium),
        r if r < 8.0 => Some(Severity::High),
        _ => Some(Severity::Critical),
    }
}

/// The score of one window and its parts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Score {
    pub score: f64,
    /// Every node/channel observed in the scored steps.
    pub entries: Vec<Entry>,
    /// `(node slot, channel, value)` of every flatlined entry.
    pub flat: Vec<(usize, usize, f32)>,
    /// Every spike found in the checked steps.
    pub spikes: Vec<SpikeAt>,
    /// Every node/channel the divergence check found away from its usual level, furthest first
    /// (set by the [`Judge`]).
    pub diverged: Vec<divergence::DivergedAt>,
    /// Every node/channel the floor check found below its time-of-day floor (set by the
    /// [`Judge`]).
    pub below_floor: Vec<floor::Beyond>,
    /// Every node/channel the floor check found above its time-of-day ceiling (set by the
    /// [`Judge`]).
    pub above_ceiling: Vec<floor::Beyond>,
}

impl Score {
    /// Whether a sensor check found a fault (a flatline, a spike, a divergence, a value beyond
    /// its floor or ceiling): such a window is anomalous whatever its score.
    pub fn has_sensor_fault(&self) -> bool {
        !self.flat.is_empty()
            || !self.spikes.is_empty()
            || !self.diverged.is_empty()
            || !self.below_floor.is_empty()
            || !self.above_ceiling.is_empty()
    }
}

/// One node/channel's part in a window's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub slot: usize,
    pub channel: usize,
    /// `e[n,c]`: its mean scaled squared error over the scored steps where it was observed.
    pub error: f64,
    /// The step of the window with its largest squared error.
    pub peak_step: usize,
}

/// One value of a window that stands out from both its neighbouring steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpikeAt {
    pub slot: usize,
    pub channel: usize,
    /// Step within the window.
    pub step: usize,
    pub value: f32,
    pub before: f32,
    pub after: f32,
}

/// Scores windows and turns anomalous ones into events, for one model.
#[derive(Debug, Clone)]
pub struct Detector {
    model_name: String,
    model_version: String,
    model_hash: String,
    /// Hashes of earlier files of the same model (re-exports with identical outputs).
    earlier_hashes: Vec<String>,
    channels: Vec<String>,
    /// Per channel: whether it counts towards the score and the contributors.
    scored_channels: Vec<bool>,
    /// Per channel `(mean, std)`: values are compared with the reconstruction in model units.
    normalisation: Vec<(f64, f64)>,
    error_scale: Vec<f64>,
    window_steps: usize,
    scored_steps: usize,
    threshold: f64,
    top_contributors: usize,
    /// 0: no flatline check.
    flatline_steps: usize,
    /// 0: no spike check.
    spike_sigmas: f64,
    cadence_ms: i64,
}

impl Detector {
    pub fn new(contract: &ModelContract, config: &DetectConfig) -> Self {
        Self {
            model_name: contract.name.clone(),
            model_version: contract.version.clone(),
            model_hash: contract.onnx_sha256.clone(),
            earlier_hashes: contract.earlier_hashes().map(str::to_owned).collect(),
            channels: contract.channels.iter().map(|c| c.name.clone()).collect(),
            scored_channels: contract
                .channels
                .iter()
                .map(|c| {
                    config.score_channels.is_empty() || config.score_channels.contains(&c.name)
                })
                .collect(),
            normalisation: contract.channels.iter().map(|c| (c.mean, c.std)).collect(),
            error_scale: contract.calibration.error_scale.clone(),
            window_steps: contract.window_steps,
            scored_steps: contract.scored_steps,
            threshold: config.threshold.unwrap_or(contract.calibration.threshold)
                * config.threshold_scale,
            top_contributors: config.top_contributors,
            flatline_steps: config.flatline_steps.min(contract.window_steps),
            spike_sigmas: config.spike_sigmas,
            cadence_ms: contract.cadence_ms,
        }
    }

    /// [`Detector::new`], refusing a `[detect] score_channels` that names a channel `contract`
    /// does not have (what a job checks at start-up; a reloaded model keeps the channels).
    pub fn try_new(contract: &ModelContract, config: &DetectConfig) -> Result<Self, String> {
        let names: Vec<&str> = contract.channels.iter().map(|c| c.name.as_str()).collect();
        let unknown: Vec<&String> = config
            .score_channels
            .iter()
            .filter(|n| !names.contains(&n.as_str()))
            .collect();
        if unknown.is_empty() {
            Ok(Self::new(contract, config))
        } else {
            Err(format!(
                "[detect] score_channels names {unknown:?}, which model {} does not have (its channels: {names:?})",
                contract.label()
            ))
        }
    }

    /// The divergence check's state for one cell, measuring in this model's channel deviations.
    pub fn divergence(&self, config: &divergence::DivergenceConfig) -> divergence::Divergence {
        let std: Vec<f64> = self.normalisation.iter().map(|&(_, std)| std).collect();
        divergence::Divergence::new(config.clone(), &std)
    }

    /// The floor check's state for one cell, over this model's channels.
    pub fn floors(&self, config: &floor::FloorConfig) -> floor::Floors {
        floor::Floors::new(config.clone(), self.channels.len())
    }

    /// The threshold in use.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The same detector with another threshold (an offline evaluation calibrates its own).
    pub fn with_threshold(&self, threshold: f64) -> Self {
        Self {
            threshold,
            ..self.clone()
        }
    }

    /// Whether this detector was built for `contract`: same name and version, and the same
    /// file or a re-export of it (the one lists the other's hash among its earlier ones).
    pub fn is_for(&self, contract: &ModelContract) -> bool {
        self.model_name == contract.name
            && self.model_version == contract.version
            && (self.fits_file(&contract.onnx_sha256)
                || contract.earlier_hashes().any(|h| h == self.model_hash))
    }

    /// Whether scores of the model file with sha256 `hash` are this detector's scores: its own
    /// file, or an earlier export of the same weights that its contract names.
    pub fn fits_file(&self, hash: &str) -> bool {
        self.model_hash == hash || self.earlier_hashes.iter().any(|h| h == hash)
    }

    /// The contract's score of `window` given the model's `reconstruction` of it.
    pub fn score(&self, window: &Window, reconstruction: &[f32]) -> Score {
        let n = window.node_count();
        let f = self.channels.len();
        let mut sums = vec![0.0f64; n * f];
        let mut counts = vec![0u32; n * f];
        let mut peaks = vec![(0usize, f64::NEG_INFINITY); n * f];
        for t in self.window_steps - self.scored_steps..self.window_steps {
            for i in 0..n * f {
                let at = t * n * f + i;
                // Channels left out of the score are not summed at all.
                if window.mask[at] > 0.0 && self.scored_channels[i % f] {
                    let (mean, std) = self.normalisation[i % f];
                    let value = (f64::from(window.values[at]) - mean) / std;
                    let diff = f64::from(reconstruction[at]) - value;
                    let error = diff * diff / self.error_scale[i % f];
                    sums[i] += error;
                    counts[i] += 1;
                    if error > peaks[i].1 {
                        peaks[i] = (t, error);
                    }
                }
            }
        }
        let entries: Vec<Entry> = (0..n * f)
            .filter(|&i| counts[i] > 0)
            .map(|i| Entry {
                slot: i / f,
                channel: i % f,
                error: sums[i] / f64::from(counts[i]),
                peak_step: peaks[i].0,
            })
            .collect();
        let score = entries.iter().map(|e| e.error).fold(0.0, f64::max);
        let flat = self.flatlined(window);
        let spikes = self.spikes(window);
        Score {
            score,
            entries,
            flat,
            spikes,
            diverged: Vec::new(),
            below_floor: Vec::new(),
            above_ceiling: Vec::new(),
        }
    }

    /// Every spike of `window` at the checked steps (the scored steps, one step earlier); none
    /// when the check is off.
    fn spikes(&self, window: &Window) -> Vec<SpikeAt> {
        if self.spike_sigmas <= 0.0 {
            return Vec::new();
        }
        let t = self.window_steps;
        let f = self.channels.len();
        let width = window.node_count() * f;
        let first = (t - self.scored_steps).saturating_sub(1).max(1);
        let mut found = Vec::new();
        for step in first..t - 1 {
            for i in 0..width {
                let at = |s: usize| s * width + i;
                if [step - 1, step, step + 1]
                    .iter()
                    .any(|&s| window.mask[at(s)] <= 0.0)
                {
                    continue;
                }
                let (before, value, after) = (
                    window.values[at(step - 1)],
                    window.values[at(step)],
                    window.values[at(step + 1)],
                );
                let jump = self.spike_sigmas * self.normalisation[i % f].1;
                let up = f64::from(value - before) > jump && f64::from(value - after) > jump;
                let down = f64::from(before - value) > jump && f64::from(after - value) > jump;
                if up || down {
                    found.push(SpikeAt {
                        slot: i / f,
                        channel: i % f,
                        step,
                        value,
                        before,
                        after,
                    });
                }
            }
        }
        found
    }

    /// `(node slot, channel, value)` of every entry of `window` observed at each of its last
    /// `flatline_steps` steps with one bit-identical value; none when the check is off (< 2).
    fn flatlined(&self, window: &Window) -> Vec<(usize, usize, f32)> {
        let steps = self.flatline_steps;
        if steps < 2 {
            return Vec::new();
        }
        let (t, width) = (self.window_steps, window.node_count() * self.channels.len());
        let f = self.channels.len();
        (0..width)
            .filter(|&i| {
                let first = window.values[(t - steps) * width + i];
                (t - steps..t).all(|step| {
                    let at = step * width + i;
                    window.mask[at] > 0.0 && window.values[at].to_bits() == first.to_bits()
                })
            })
            .map(|i| (i / f, i % f, window.values[(t - 1) * width + i]))
            .collect()
    }

    /// The event for `window`, if its score reaches the threshold.
    pub fn detect(&self, window: &Window, reconstruction: &[f32]) -> (Score, Option<AnomalyEvent>) {
        let score = self.score(window, reconstruction);
        if severity(score.score, self.threshold).is_none() && !score.has_sensor_fault() {
            return (score, None);
        }
        let event = self.event(window, &score, self.threshold);
        (score, Some(event))
    }

    /// The event for `window` scored `score` against `threshold` (its severity at least LOW).
    pub fn event(&self, window: &Window, score: &Score, threshold: f64) -> AnomalyEvent {
        let severity = severity(score.score, threshold).unwrap_or(Severity::Low);
        let beyond = |b: &floor::Beyond| crate::schema::BeyondBound {
            node_id: window.nodes[b.slot].to_string(),
            channel: self.channels[b.channel].clone(),
            value: b.value,
            bound: b.bound,
        };
        let total: f64 = score.entries.iter().map(|e| e.error).sum();
        let mut ranked = score.entries.clone();
        // Largest first; ties broken by slot and channel so the order is deterministic.
        ranked.sort_by(|a, b| {
            (b.error.total_cmp(&a.error))
                .then(a.slot.cmp(&b.slot))
                .then(a.channel.cmp(&b.channel))
        });
        let contributors = ranked
            .iter()
            .take(self.top_contributors)
            .map(|e| Contributor {
                node_id: window.nodes[e.slot].to_string(),
                channel: self.channels[e.channel].clone(),
                share: if total > 0.0 { e.error / total } else { 0.0 },
                score: e.error,
                peak_at_ms: Some(window.start_ms + e.peak_step as i64 * self.cadence_ms),
            })
            .collect();
        AnomalyEvent {
            event_id: event_id(
                &self.model_name,
                &self.model_version,
                &window.cell,
                window.end_ms,
            ),
            cell_id: window.cell.to_string(),
            window_start_ms: window.start_ms,
            window_end_ms: window.end_ms,
            detected_at_ms: window.end_ms,
            score: score.score,
            threshold,
            severity,
            contributors,
            model_name: self.model_name.clone(),
            model_version: self.model_version.clone(),
            model_hash: self.model_hash.clone(),
            missing_fraction: window.missing_fraction,
            node_count: window.node_count() as i32,
            incident: None,
            flatlined: score
                .flat
                .iter()
                .map(|&(node, channel, value)| Flatline {
                    node_id: window.nodes[node].to_string(),
                    channel: self.channels[channel].clone(),
                    value: f64::from(value),
                })
                .collect(),
            spikes: score
                .spikes
                .iter()
                .map(|s| Spike {
                    node_id: window.nodes[s.slot].to_string(),
                    channel: self.channels[s.channel].clone(),
                    at_ms: window.start_ms + s.step as i64 * self.cadence_ms,
                    value: f64::from(s.value),
                    before: f64::from(s.before),
                    after: f64::from(s.after),
                })
                .collect(),
            diverged: score
                .diverged
                .iter()
                .map(|d| Diverged {
                    node_id: window.nodes[d.slot].to_string(),
                    channel: self.channels[d.channel].clone(),
                    level: d.level,
                    usual: d.usual,
                    deviation: d.deviation,
                })
                .collect(),
            below_floor: score.below_floor.iter().map(beyond).collect(),
            above_ceiling: score.above_ceiling.iter().map(beyond).collect(),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::infer::ModelContract;
    use crate::infer::contract::{Calibration, ChannelSpec};

    /// A contract for scoring tests: model `m` of `version`, identity channel statistics,
    /// the given window geometry, channels, error scales and threshold.
    pub fn contract(
        version: &str,
        (window_steps, scored_steps, max_nodes): (usize, usize, usize),
        channels: &[&str],
        error_scale: Vec<f64>,
        threshold: f64,
    ) -> ModelContract {
        ModelContract {
            name: "m".into(),
            version: version.into(),
            onnx_file: "m.onnx".into(),
            onnx_sha256: "abc".into(),
            family: String::new(),
            inputs: vec![],
            outputs: vec![],
            cadence_ms: 1_000,
            window_steps,
            scored_steps,
            max_nodes,
            channels: channels
                .iter()
                .map(|name| ChannelSpec {
                    name: (*name).into(),
                    unit: "u".into(),
                    mean: 0.0,
                    std: 1.0,
                })
                .collect(),
            calibration: Calibration {
                error_scale,
                threshold,
                score_quantiles: Default::default(),
                windows: 0,
                rule: String::new(),
            },
            scoring: String::new(),
            architecture: serde_json::Value::Null,
            training: serde_json::Value::Null,
            standardisation: Default::default(),
        }
    }

    /// A window of `cell` ending at second `end_s`: one node `n`, one channel, two steps of
    /// value 0, both observed.
    pub fn window(cell: &str, end_s: i64) -> crate::assemble::Window {
        crate::assemble::Window {
            cell: std::sync::Arc::from(cell),
            start_ms: (end_s - 2) * 1_000,
            end_ms: end_s * 1_000,
            nodes: vec![std::sync::Arc::from("n")],
            values: vec![0.0, 0.0],
            mask: vec![1.0, 1.0],
            missing_fraction: 0.0,
            holds: vec![],
            closed_at: std::time::Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn contract() -> ModelContract {
        test_support::contract("3", (3, 2, 4), &["a", "b"], vec![1.0, 4.0], 2.0)
    }

    /// Two nodes, two channels, three steps; everything observed except node 1 channel b.
    fn window() -> Window {
        let (t, n, f) = (3, 2, 2);
        let mut mask = vec![1.0; t * n * f];
        for ti in 0..t {
            mask[ti * n * f + f + 1] = 0.0;
        }
        Window {
            cell: Arc::from("line-1"),
            start_ms: 0,
            end_ms: 3_000,
            nodes: vec![Arc::from("n0"), Arc::from("n1")],
            values: vec![0.0; t * n * f],
            mask,
            missing_fraction: 3.0 / 12.0,
            holds: vec![],
            closed_at: std::time::Instant::now(),
        }
    }

    #[test]
    fn score_follows_the_contract_formula() {
        let detector = Detector::new(&contract(), &DetectConfig::default());
        let w = window();
        let mut recon = vec![0.0f32; 12];
        // Step 0 is not scored: a huge error there changes nothing.
        recon[0] = 100.0;
        // Node 0 channel b: errors 2 and 4 at steps 1, 2 -> (4/4 + 16/4) / 2 = 2.5.
        recon[4 + 1] = 2.0;
        recon[8 + 1] = 4.0;
        // Node 1 channel a: error 1 at step 2 only -> (0 + 1) / 2 = 0.5.
        recon[8 + 2] = 1.0;
        // Node 1 channel b is unobserved: any error there is ignored.
        recon[8 + 3] = 50.0;
        let s = detector.score(&w, &recon);
        let entries: Vec<_> = (s.entries.iter())
            .map(|e| (e.slot, e.channel, e.error, e.peak_step))
            .collect();
        // Peak steps: node 0 b at step 2 (16 > 4); node 0 a has no error, so its first scored
        // step; node 1 a at step 2.
        assert_eq!(
            entries,
            vec![(0, 0, 0.0, 1), (0, 1, 2.5, 2), (1, 0, 0.5, 2)]
        );
        assert_eq!(s.score, 2.5);
    }

    #[test]
    fn score_channels_leave_the_others_out_of_score_and_contributors() {
        let config = DetectConfig {
            score_channels: vec!["a".into()],
            ..DetectConfig::default()
        };
        let detector = Detector::new(&contract(), &config);
        let w = window();
        let mut recon = vec![0.0f32; 12];
        // Node 0 channel b would score 2.5, but b is not scored.
        recon[4 + 1] = 2.0;
        recon[8 + 1] = 4.0;
        // Node 1 channel a: 0.5, now the highest scored entry.
        recon[8 + 2] = 1.0;
        let s = detector.score(&w, &recon);
        let entries: Vec<_> = (s.entries.iter())
            .map(|e| (e.slot, e.channel, e.error))
            .collect();
        assert_eq!(entries, vec![(0, 0, 0.0), (1, 0, 0.5)]);
        assert_eq!(s.score, 0.5);
        assert!(detector.detect(&w, &recon).1.is_none(), "0.5 < threshold 2");
        // Every channel named must be the model's.
        assert!(Detector::try_new(&contract(), &config).is_ok());
        let typo = DetectConfig {
            score_channels: vec!["a".into(), "c".into()],
            ..DetectConfig::default()
        };
        let message = Detector::try_new(&contract(), &typo).unwrap_err();
        assert!(
            message.contains("\"c\"") && message.contains("\"b\""),
            "{message}"
        );
    }

    #[test]
    fn events_carry_severity_contributors_and_a_stable_id() {
        let detector = Detector::new(&contract(), &DetectConfig::default());
        let w = window();
        let mut recon = vec![0.0f32; 12];
        recon[4 + 1] = 2.0;
        recon[8 + 1] = 4.0;
        recon[8 + 2] = 1.0;
        let (_, event) = detector.detect(&w, &recon);
        let event = event.expect("2.5 >= threshold 2");
        assert_eq!(event.severity, Severity::Low);
        assert_eq!(event.contributors[0].node_id, "n0");
        assert_eq!(event.contributors[0].channel, "b");
        assert!((event.contributors[0].share - 2.5 / 3.0).abs() < 1e-12);
        assert_eq!(event.contributors.len(), 3);
        assert_eq!(event.event_id, event_id("m", "3", "line-1", 3_000));
        // Same window again: identical event.
        assert_eq!(detector.detect(&w, &recon).1.unwrap(), event);
        // Below threshold: no event.
        assert!(detector.detect(&w, &[0.0; 12]).1.is_none());
    }

    #[test]
    fn event_ids_differ_by_every_part() {
        let base = event_id("m", "1", "c", 10);
        assert_eq!(base, event_id("m", "1", "c", 10));
        for other in [
            event_id("n", "1", "c", 10),
            event_id("m", "2", "c", 10),
            event_id("m", "1", "d", 10),
            event_id("m", "1", "c", 11),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn severity_bands() {
        assert_eq!(severity(0.99, 1.0), None);
        assert_eq!(severity(f64::NAN, 1.0), None);
        assert_eq!(severity(1.0, 1.0), Some(Severity::Low));
        assert_eq!(severity(3.0, 1.0), Some(Severity::Medium));
        assert_eq!(severity(5.0, 1.0), Some(Severity::High));
        assert_eq!(severity(80.0, 1.0), Some(Severity::Critical));
    }

    #[test]
    fn flatlines_need_every_checked_step_observed_and_bit_identical() {
        let config = DetectConfig {
            flatline_steps: 2,
            ..DetectConfig::default()
        };
        let detector = Detector::new(&contract(), &config);
        let (n, f) = (2, 2);
        let mut w = window();
        // Every entry but node 1 channel b (never observed) varies between steps 1 and 2...
        for (i, v) in w.values.iter_mut().enumerate() {
            *v = i as f32;
        }
        // ...except node 0 channel b, stuck at 7.5 from step 1 on (step 0 differs: not checked).
        for ti in 1..3 {
            w.values[ti * n * f + 1] = 7.5;
        }
        let recon = vec![0.0f32; 12];
        let s = detector.score(&w, &recon);
        assert_eq!(s.flat, vec![(0, 1, 7.5)]);
        // A perfect reconstruction scores 0: the flatline alone makes the window anomalous.
        let (score, event) = detector.detect(&w, &w.values);
        assert_eq!(score.score, 0.0);
        let event = event.expect("a flatlined window is anomalous");
        assert_eq!(event.severity, Severity::Low);
        assert_eq!(event.flatlined.len(), 1);
        assert_eq!(
            (
                event.flatlined[0].node_id.as_str(),
                event.flatlined[0].channel.as_str()
            ),
            ("n0", "b")
        );
        // One unobserved step in the checked ones: not a flatline.
        w.mask[2 * n * f + 1] = 0.0;
        assert!(detector.score(&w, &recon).flat.is_empty());
        // Off by default.
        let off = Detector::new(&contract(), &DetectConfig::default());
        w.mask[2 * n * f + 1] = 1.0;
        assert!(off.score(&w, &recon).flat.is_empty());
    }

    #[test]
    fn spikes_stand_out_from_both_neighbours_in_their_channels_deviations() {
        let mut c = test_support::contract("3", (8, 2, 2), &["a", "b"], vec![1.0, 1.0], 1e9);
        c.channels[1].std = 2.0;
        let config = DetectConfig {
            spike_sigmas: 3.0,
            ..DetectConfig::default()
        };
        let detector = Detector::new(&c, &config);
        let (t, n, f) = (8, 1, 2);
        let flat = Window {
            cell: Arc::from("c"),
            start_ms: 100_000,
            end_ms: 108_000,
            nodes: vec![Arc::from("n0")],
            values: vec![10.0; t * n * f],
            mask: vec![1.0; t * n * f],
            missing_fraction: 0.0,
            holds: Vec::new(),
            closed_at: std::time::Instant::now(),
        };
        let at = |step: usize, channel: usize| step * n * f + channel;
        let spikes = |w: &Window| detector.score(w, &w.values).spikes;
        assert!(spikes(&flat).is_empty());
        // Checked steps are 5 and 6: the scored steps (6, 7) one step earlier.
        let mut w = flat.clone();
        w.values[at(6, 0)] = 14.0;
        w.values[at(3, 0)] = 30.0;
        assert_eq!(
            spikes(&w),
            vec![SpikeAt {
                slot: 0,
                channel: 0,
                step: 6,
                value: 14.0,
                before: 10.0,
                after: 10.0
            }]
        );
        // Channel b's deviation is 2: a jump of 5 is 2.5 deviations, 7 is 3.5; downwards too.
        let mut w = flat.clone();
        w.values[at(5, 1)] = 5.0;
        assert!(spikes(&w).is_empty());
        w.values[at(5, 1)] = 3.0;
        assert_eq!(spikes(&w).len(), 1);
        // A step change is not a spike, nor a value whose neighbour is missing.
        let mut w = flat.clone();
        w.values[at(6, 0)] = 14.0;
        w.values[at(7, 0)] = 14.0;
        assert!(spikes(&w).is_empty());
        let mut w = flat.clone();
        w.values[at(6, 0)] = 14.0;
        w.mask[at(5, 0)] = 0.0;
        assert!(spikes(&w).is_empty());
        // A spike alone makes an event that names it, at its step's start.
        let mut w = flat.clone();
        w.values[at(5, 1)] = 20.0;
        // A perfect reconstruction (in model units: channel b divided by its deviation).
        let recon: Vec<f32> = (w.values.iter().enumerate())
            .map(|(i, v)| if i % f == 1 { v / 2.0 } else { *v })
            .collect();
        let (score, event) = detector.detect(&w, &recon);
        assert_eq!(score.score, 0.0);
        let event = event.expect("a spiking window is anomalous");
        assert_eq!(event.spikes.len(), 1);
        let spike = &event.spikes[0];
        assert_eq!(
            (spike.node_id.as_str(), spike.channel.as_str(), spike.at_ms),
            ("n0", "b", 105_000)
        );
        assert_eq!((spike.value, spike.before, spike.after), (20.0, 10.0, 10.0));
        // Off by default.
        let off = Detector::new(&c, &DetectConfig::default());
        assert!(off.score(&w, &w.values).spikes.is_empty());
    }
}
