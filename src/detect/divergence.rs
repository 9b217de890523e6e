//! divergence: a sensor that moves away from the other sensors of its cell and stays away.
//!
//! The model and the other sensor checks see one window; a sensor drifting by a few mph an hour
//! looks normal inside any one of them. This check remembers, per node and channel, where the
//! node usually sits relative to its neighbours, and flags a node that leaves that place.
//!
//! Invariants:
//! - A node/channel's *residual* at a step is its value minus the median of the values of the
//!   cell's nodes observed at that step (same channel, the node included); none with fewer than
//!   3 observed. The median of three or more is not moved by one node alone, so a node's move
//!   shows in its own residual and hardly in its neighbours'.
//! - Its *level* in a window is the mean of its residuals over the window's last `steps` steps,
//!   when at least half of those steps have one.
//! - Each node/channel keeps a *baseline* of its levels: an exponentially weighted mean and mean
//!   absolute deviation, each window weighing `elapsed / memory` (at least `1 / n` over the
//!   first `n` windows, a plain mean). A level further from the baseline's mean than
//!   `deviations` × its deviation (at least [`DEVIATION_FLOOR`] of the channel's standard
//!   deviation) is *diverged*, once the baseline has learnt for `warmup`.
//! - A diverged level does not move its baseline, so a drift cannot teach it that the drift is
//!   normal; a node still diverged `memory` after it first diverged starts a new baseline (a
//!   sensor moved or recalibrated for good is reported for `memory`, then accepted).
//! - A baseline whose node/channel had no level for longer than `memory` starts again at its
//!   next level (what was usual then says nothing now).
//! - Windows must reach a cell in time order; one that does not end after the last one seen
//!   is judged but does not move the baseline (a replay after a restart).
//! - State is this instance's, like SPOT's: a rebalance starts every baseline again, and the
//!   check is blind for `warmup`; so does a restart, unless `[detect] state_file` carried the
//!   baselines over ([`Divergence::baselines`], [`Divergence::adopt`]). A new model keeps them
//!   (they compare sensors with each other, not with a model; see
//!   [`crate::detect::Judge::for_model`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SettingError;
use crate::assemble::Window;

/// Smallest baseline deviation, as a share of the channel's standard deviation: a node that
/// always read exactly its neighbours' median must still move noticeably to be diverged.
pub const DEVIATION_FLOOR: f64 = 0.05;

/// Fewest nodes observed at a step for their residuals there: with two, the median is their
/// mean, and neither can be told from the other.
const MIN_NODES: usize = 3;

/// The divergence check's settings (`[detect.divergence]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DivergenceConfig {
    /// How far a level must be from its baseline's mean, in baseline deviations.
    #[serde(default = "default_deviations")]
    pub deviations: f64,
    /// Steps at the window's end averaged into a level.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Time constant of the baselines: how long they remember.
    #[serde(default = "default_memory", with = "humantime_serde")]
    pub memory: Duration,
    /// How long a baseline learns before its node can diverge.
    #[serde(default = "default_warmup", with = "humantime_serde")]
    pub warmup: Duration,
}

fn default_deviations() -> f64 {
    6.0
}

fn default_steps() -> usize {
    12
}

fn default_memory() -> Duration {
    Duration::from_secs(6 * 3600)
}

fn default_warmup() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for DivergenceConfig {
    fn default() -> Self {
        Self {
            deviations: default_deviations(),
            steps: default_steps(),
            memory: default_memory(),
            warmup: default_warmup(),
        }
    }
}

impl DivergenceConfig {
    /// Refuses a non-positive `deviations`, `steps` or `memory`.
    pub fn validate(&self) -> Result<(), SettingError> {
        if !(self.deviations.is_finite() && self.deviations > 0.0) {
            return Err(SettingError(
                "deviations must be a positive number of baseline deviations",
            ));
        }
        if self.steps == 0 {
            return Err(SettingError("steps is 0: a level needs at least 1 step"));
        }
        if self.memory.is_zero() {
            return Err(SettingError(
                "memory is 0s: a baseline must remember something",
            ));
        }
        Ok(())
    }
}

/// A node/channel whose level left its baseline, in the channel's physical units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DivergedAt {
    pub slot: usize,
    pub channel: usize,
    /// The level: the node's mean residual from its cell's median over the last steps.
    pub level: f64,
    /// The baseline's mean: the level the node usually has.
    pub usual: f64,
    /// The baseline's deviation (floored) that the distance was measured in.
    pub deviation: f64,
}

impl DivergedAt {
    /// How far the level is from the usual one, in deviations.
    pub fn distance(&self) -> f64 {
        (self.level - self.usual).abs() / self.deviation
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    mean: f64,
    deviation: f64,
    windows: u64,
    learning_since_ms: i64,
    last_ms: i64,
    diverged_since_ms: Option<i64>,
}

impl Baseline {
    fn new(level: f64, end_ms: i64) -> Self {
        Self {
            mean: level,
            deviation: 0.0,
            windows: 1,
            learning_since_ms: end_ms,
            last_ms: end_ms,
            diverged_since_ms: None,
        }
    }
}

/// One node/channel's baseline as a snapshot keeps it; the channel is the model's index.
pub type BaselineEntry = (String, usize, Baseline);

/// The baselines of one cell's nodes.
#[derive(Debug, Clone)]
pub struct Divergence {
    config: DivergenceConfig,
    /// Per channel: the smallest baseline deviation.
    floors: Vec<f64>,
    baselines: HashMap<(Arc<str>, usize), Baseline>,
}

impl Divergence {
    /// `channel_std`: each model channel's standard deviation (the contract's statistics).
    pub fn new(config: DivergenceConfig, channel_std: &[f64]) -> Self {
        Self {
            config,
            floors: channel_std.iter().map(|s| s * DEVIATION_FLOOR).collect(),
            baselines: HashMap::new(),
        }
    }

    /// Every baseline, in node and channel order.
    pub fn baselines(&self) -> Vec<BaselineEntry> {
        let mut entries: Vec<BaselineEntry> = self
            .baselines
            .iter()
            .map(|((node, channel), b)| (node.to_string(), *channel, b.clone()))
            .collect();
        entries.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        entries
    }

    /// Takes over baselines another instance of this check learnt (a snapshot); channels the
    /// model does not have are passed over.
    pub fn adopt(&mut self, entries: Vec<BaselineEntry>) {
        for (node, channel, baseline) in entries {
            if channel < self.floors.len() {
                self.baselines.insert((Arc::from(node), channel), baseline);
            }
        }
    }

    /// Judges every node/channel of `window` against its baseline and learns from the window.
    pub fn observe(&mut self, window: &Window) -> Vec<DivergedAt> {
        let f = self.floors.len();
        let levels = levels(window, f, self.config.steps);
        let warmup_ms = self.config.warmup.as_millis() as i64;
        let memory_ms = self.config.memory.as_millis() as f64;
        let end = window.end_ms;
        let mut found = Vec::new();
        for (i, level) in levels.into_iter().enumerate() {
            let Some(level) = level else { continue };
            let (slot, channel) = (i / f, i % f);
            let key = (Arc::clone(&window.nodes[slot]), channel);
            let Some(b) = self.baselines.get_mut(&key) else {
                self.baselines.insert(key, Baseline::new(level, end));
                continue;
            };
            // Unheard of for longer than the memory (a sensor back from a long outage, or a
            // baseline restored from a state saved long ago): what was usual then says
            // nothing now, so it learns again.
            if end - b.last_ms > memory_ms as i64 {
                *b = Baseline::new(level, end);
                continue;
            }
            let deviation = b.deviation.max(self.floors[channel]);
            let learnt = end - b.learning_since_ms >= warmup_ms;
            let diverged = learnt && (level - b.mean).abs() > self.config.deviations * deviation;
            if diverged {
                found.push(DivergedAt {
                    slot,
                    channel,
                    level,
                    usual: b.mean,
                    deviation,
                });
            }
            if end <= b.last_ms {
                continue;
            }
            if diverged {
                let since = *b.diverged_since_ms.get_or_insert(end);
                if (end - since) as f64 >= memory_ms {
                    *b = Baseline::new(level, end);
                } else {
                    b.last_ms = end;
                }
                continue;
            }
            let weight = ((end - b.last_ms) as f64 / memory_ms)
                .max(1.0 / (b.windows + 1) as f64)
                .min(1.0);
            b.deviation += weight * ((level - b.mean).abs() - b.deviation);
            b.mean += weight * (level - b.mean);
            b.windows += 1;
            b.last_ms = end;
            b.diverged_since_ms = None;
        }
        // Furthest first: the node that moved, before neighbours whose median it nudged.
        found.sort_by(|a, b| b.distance().total_cmp(&a.distance()));
        found
    }
}

/// Each node/channel's level in `window` (`[N × F]`, node-major), `None` where it has none.
fn levels(window: &Window, f: usize, steps: usize) -> Vec<Option<f64>> {
    let n = window.node_count();
    let width = n * f;
    let t_end = window.values.len() / width.max(1);
    let first = t_end.saturating_sub(steps);
    let mut sums = vec![0.0f64; width];
    let mut counts = vec![0usize; width];
    let mut observed: Vec<(f32, usize)> = Vec::with_capacity(n);
    for t in first..t_end {
        for c in 0..f {
            observed.clear();
            observed.extend((0..n).filter_map(|node| {
                let at = t * width + node * f + c;
                (window.mask[at] > 0.0).then(|| (window.values[at], node))
            }));
            if observed.len() < MIN_NODES {
                continue;
            }
            observed.sort_by(|a, b| a.0.total_cmp(&b.0));
            let median = median(&observed);
            for &(value, node) in &observed {
                sums[node * f + c] += f64::from(value) - median;
                counts[node * f + c] += 1;
            }
        }
    }
    let needed = (t_end - first).div_ceil(2).max(1);
    (0..width)
        .map(|i| (counts[i] >= needed).then(|| sums[i] / counts[i] as f64))
        .collect()
}

/// The median of `sorted` (ascending by value, not empty).
fn median(sorted: &[(f32, usize)]) -> f64 {
    let m = sorted.len();
    if m % 2 == 1 {
        f64::from(sorted[m / 2].0)
    } else {
        (f64::from(sorted[m / 2 - 1].0) + f64::from(sorted[m / 2].0)) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP_MS: i64 = 300_000;

    /// A window of `steps` steps ending at step `end`, three nodes of one channel reading
    /// `value(node, step)`.
    fn window(end: i64, steps: usize, value: impl Fn(usize, i64) -> f32) -> Window {
        let nodes: Vec<Arc<str>> = ["a", "b", "c"].into_iter().map(Arc::from).collect();
        let mut values = Vec::new();
        for t in 0..steps as i64 {
            let step = end - steps as i64 + t;
            values.extend((0..3).map(|n| value(n, step)));
        }
        Window {
            cell: Arc::from("cell"),
            start_ms: (end - steps as i64) * STEP_MS,
            end_ms: end * STEP_MS,
            nodes,
            mask: vec![1.0; values.len()],
            values,
            missing_fraction: 0.0,
            holds: Vec::new(),
            closed_at: std::time::Instant::now(),
        }
    }

    /// Traffic-like readings: every node follows one daily wave, node `b` 5 below the others,
    /// each with a little noise of its own.
    fn normal(node: usize, step: i64) -> f32 {
        let wave = 50.0 + 15.0 * ((step as f32) * std::f32::consts::TAU / 288.0).sin();
        let offset = if node == 1 { -5.0 } else { 0.0 };
        let noise = (((step * 7 + node as i64 * 13) % 11) as f32 - 5.0) * 0.2;
        wave + offset + noise
    }

    fn config() -> DivergenceConfig {
        DivergenceConfig {
            deviations: 5.0,
            steps: 6,
            memory: Duration::from_secs(24 * 3600),
            warmup: Duration::from_secs(12 * 3600),
        }
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let sorted = [(1.0, 0), (2.0, 1), (4.0, 2), (8.0, 3)];
        assert_eq!(median(&sorted), 3.0);
        assert_eq!(median(&sorted[..3]), 2.0);
    }

    #[test]
    fn a_drifting_node_diverges_and_the_common_wave_does_not() {
        let mut check = Divergence::new(config(), &[10.0]);
        // Two days of normal readings: the shared daily wave and b's constant offset are learnt.
        for end in 12..576 {
            assert!(
                check.observe(&window(end, 12, normal)).is_empty(),
                "step {end}"
            );
        }
        // Node c drifts 1 a step (12 an hour) from step 576 on.
        let drifting = |node: usize, step: i64| {
            normal(node, step)
                + if node == 2 {
                    (step - 575).max(0) as f32
                } else {
                    0.0
                }
        };
        let first = (576..700)
            .find_map(|end| {
                let found = check.observe(&window(end, 12, drifting));
                (!found.is_empty()).then_some((end, found))
            })
            .expect("the drift is found");
        let (end, found) = first;
        assert!(end < 576 + 12, "found after {} steps", end - 576);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].slot, found[0].channel), (2, 0));
        assert!(found[0].level > found[0].usual);
    }

    #[test]
    fn a_baseline_unheard_of_for_longer_than_the_memory_learns_again() {
        let shifted =
            |node: usize, step: i64| normal(node, step) + if node == 2 { 30.0 } else { 0.0 };
        let learnt = || {
            let mut check = Divergence::new(config(), &[10.0]);
            for end in 12..576 {
                check.observe(&window(end, 12, normal));
            }
            check
        };
        // Back after two hours, node c 30 higher: found.
        let mut check = learnt();
        assert!(!check.observe(&window(576 + 24, 12, shifted)).is_empty());
        // Back after a day and a half (the memory is a day): what was usual then is not
        // held against it; it learns again, warm-up and all.
        let mut check = learnt();
        for end in 1008..1008 + 100 {
            assert!(
                check.observe(&window(end, 12, shifted)).is_empty(),
                "step {end}"
            );
        }
    }

    #[test]
    fn nothing_diverges_while_the_baseline_learns() {
        let mut check = Divergence::new(config(), &[10.0]);
        let shifted = |node: usize, step: i64| {
            normal(node, step) + if node == 0 && step > 60 { 30.0 } else { 0.0 }
        };
        // Warm-up is 12 hours (144 steps): the shift at step 60 is learnt, not reported.
        for end in 12..140 {
            assert!(
                check.observe(&window(end, 12, shifted)).is_empty(),
                "step {end}"
            );
        }
    }

    #[test]
    fn a_lasting_shift_is_reported_for_memory_then_accepted() {
        let mut check = Divergence::new(
            DivergenceConfig {
                memory: Duration::from_secs(6 * 3600),
                ..config()
            },
            &[10.0],
        );
        for end in 12..300 {
            check.observe(&window(end, 12, normal));
        }
        let moved =
            |node: usize, step: i64| normal(node, step) + if node == 0 { 20.0 } else { 0.0 };
        let reported: Vec<bool> = (300..600)
            .map(|end| !check.observe(&window(end, 12, moved)).is_empty())
            .collect();
        let last = reported
            .iter()
            .rposition(|&r| r)
            .expect("the shift is reported");
        // Reported from its first full level for 6 hours (72 steps), then a new baseline learns.
        assert!(reported[12..70].iter().all(|&r| r));
        assert!(last < 12 + 72 + 2, "still reported {last} steps in");
        assert!(reported[last + 1..].iter().all(|&r| !r));
    }

    #[test]
    fn a_replayed_window_is_judged_without_moving_the_baseline() {
        let mut check = Divergence::new(config(), &[10.0]);
        for end in 12..300 {
            check.observe(&window(end, 12, normal));
        }
        let before = check.baselines.clone();
        let w = window(200, 12, |n, s| {
            normal(n, s) + if n == 0 { 40.0 } else { 0.0 }
        });
        let found = check.observe(&w);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].slot, 0);
        for (key, b) in &before {
            let now = &check.baselines[key];
            assert_eq!((now.mean, now.windows), (b.mean, b.windows));
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(DivergenceConfig::default().validate().is_ok());
        let bad = [
            DivergenceConfig {
                deviations: 0.0,
                ..DivergenceConfig::default()
            },
            DivergenceConfig {
                steps: 0,
                ..DivergenceConfig::default()
            },
            DivergenceConfig {
                memory: Duration::ZERO,
                ..DivergenceConfig::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }
}
