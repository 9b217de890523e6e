//! spot: an adaptive threshold on the stream of window scores of one cell, by streaming
//! peaks-over-threshold (SPOT and DSPOT; Siffer et al., "Anomaly Detection in Streams with
//! Extreme Value Theory", KDD 2017).
//!
//! Invariants:
//! - [`Spot::fit`] returns an error or a detector: `t` is the value at rank `⌊init_level·n⌋` of
//!   the `n` sorted finite calibration scores; the peaks are the excesses `x − t` of the scores
//!   above `t`; a generalised Pareto tail (shape γ, scale σ) is fitted to them by Grimshaw's
//!   method, and the threshold is `z_q = t + σ/γ·((q·n/N_t)^(−γ) − 1)`
//!   (`t − σ·ln(q·n/N_t)` when γ = 0), where `N_t` is the number of peaks.
//! - `t` never moves after the fit. [`Spot::step`] leaves the state unchanged for an anomaly
//!   (`x > z_q`) and for a non-finite score (reported [`Verdict::Normal`]; the caller counts
//!   those); any other score counts in `n`, and a peak (`t < x ≤ z_q`) also joins the peaks,
//!   counts in `N_t` and refits the tail, which moves `z_q`.
//! - DSPOT (`depth = d > 0`) does all of the above on `x − M`, where `M` is the mean of the last
//!   `d` scores taken in (not anomalies); the first `d` finite calibration scores only fill that
//!   window. Thresholds are reported in score units, i.e. with `M` added back.
//! - Memory is bounded: at most `max_peaks` excesses (the oldest goes first; `n` and `N_t` keep
//!   counting every score and peak, so `N_t / n` stays the observed peak rate) and `d` scores.
//! - Never NaN, never a panic: calibration scores that are not finite are skipped and the rest
//!   are checked against [`MIN_CALIBRATION`] and [`MIN_PEAKS`]; `z_q` may be `+∞` when the
//!   fitted tail is too heavy for `f64`, in which case nothing is an anomaly.
//! - As specified by the paper, anomalies never enter the tail fit, so the fit sees a tail cut
//!   at `z_q`: on a stationary stream the fitted shape drifts negative and `z_q` creeps down.
//!   Measured on Exp(1) scores with q = 1e-3 and 20 000 calibration scores: 2.0–2.2·q flagged
//!   over the next 200 000 (three seeds); 4.5·q over scores 800 000 to 1 000 000 with
//!   `max_peaks` 10 000, 11·q with 2 000 (one seed). Fit anew on recent scores from time to
//!   time to bound this. Likewise a lasting upward shift is flagged until the next fit, as
//!   its scores never enter the peaks nor DSPOT's window.
//! - Deterministic: the same configuration, calibration and stream give bit-identical
//!   thresholds and verdicts (no randomness, no clocks, no iteration over hash maps).

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Fewest scores [`Spot::fit`] accepts: finite calibration scores after the first `depth`.
pub const MIN_CALIBRATION: usize = 100;

/// Fewest peaks (calibration scores above `t`) [`Spot::fit`] accepts; also the least
/// `max_peaks`.
pub const MIN_PEAKS: usize = 10;

/// Configuration of one [`Spot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpotConfig {
    /// Risk `q`: the probability of a normal score above the threshold (the false-alarm rate
    /// aimed at). Must be above 0 and below `1 − init_level`.
    #[serde(default = "default_risk")]
    pub risk: f64,
    /// Quantile of the calibration scores taken as the initial threshold `t`; the scores above
    /// it are the peaks the tail is fitted to. Strictly between 0 and 1.
    #[serde(default = "default_init_level")]
    pub init_level: f64,
    /// 0: SPOT. `d > 0`: DSPOT, which works on each score minus the mean of the last `d`
    /// scores that were not anomalies, and so follows a drifting baseline.
    #[serde(default = "default_depth")]
    pub depth: usize,
    /// Most peaks kept for the tail fit (the oldest is dropped first); at least [`MIN_PEAKS`].
    /// A refit costs time proportional to it.
    #[serde(default = "default_max_peaks")]
    pub max_peaks: usize,
}

fn default_risk() -> f64 {
    1e-4
}

fn default_init_level() -> f64 {
    0.98
}

fn default_depth() -> usize {
    0
}

fn default_max_peaks() -> usize {
    2_000
}

impl Default for SpotConfig {
    fn default() -> Self {
        Self {
            risk: default_risk(),
            init_level: default_init_level(),
            depth: default_depth(),
            max_peaks: default_max_peaks(),
        }
    }
}

impl SpotConfig {
    /// Checks the rules that span fields; [`Spot::fit`] calls it first.
    pub fn validate(&self) -> Result<(), SpotError> {
        let invalid = |message: String| Err(SpotError::InvalidConfig(message));
        if !(self.init_level > 0.0 && self.init_level < 1.0) {
            return invalid(format!(
                "spot init_level is {}: it must lie strictly between 0 and 1",
                self.init_level
            ));
        }
        if !(self.risk > 0.0 && self.risk < 1.0 - self.init_level) {
            return invalid(format!(
                "spot risk is {}: it must be above 0 and below 1 - init_level = {} \
                 (the share of calibration scores that are peaks)",
                self.risk,
                1.0 - self.init_level
            ));
        }
        if self.max_peaks < MIN_PEAKS {
            return invalid(format!(
                "spot max_peaks is {}: keep at least {MIN_PEAKS} peaks",
                self.max_peaks
            ));
        }
        Ok(())
    }
}

/// Why [`Spot::fit`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpotError {
    /// The configuration breaks a rule of [`SpotConfig::validate`].
    InvalidConfig(String),
    /// Fewer finite calibration scores than `needed` ([`MIN_CALIBRATION`] plus `depth`).
    TooFewValues { found: usize, needed: usize },
    /// Fewer calibration scores above `t` than `needed` ([`MIN_PEAKS`]).
    TooFewPeaks { found: usize, needed: usize },
}

impl fmt::Display for SpotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidConfig(message) => f.write_str(message),
            Self::TooFewValues { found, needed } => write!(
                f,
                "{found} finite calibration scores; SPOT needs at least {needed}"
            ),
            Self::TooFewPeaks { found, needed } => write!(
                f,
                "{found} calibration scores above the initial threshold; SPOT needs at least \
                 {needed} (more calibration scores or a lower init_level)"
            ),
        }
    }
}

impl std::error::Error for SpotError {}

/// What [`Spot::step`] made of one score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Above the threshold `z_q`; the state is unchanged.
    Anomaly,
    /// Above `t`, not above `z_q`: taken into the tail, which was refitted.
    Peak,
    /// Not above `t`, or not finite.
    Normal,
}

/// Streaming peaks-over-threshold detector of one cell's scores. Serialisable, so that a
/// fitted tail can be kept across a restart (`[detect] state_file`).
#[derive(Clone, Serialize, Deserialize)]
pub struct Spot {
    config: SpotConfig,
    /// Initial threshold `t` (DSPOT: of `x − M`).
    t: f64,
    /// Current threshold `z_q` (DSPOT: of `x − M`).
    z: f64,
    /// Fitted tail shape γ.
    shape: f64,
    /// Fitted tail scale σ.
    scale: f64,
    /// The newest excesses over `t`, oldest first; at most `max_peaks`.
    peaks: VecDeque<f64>,
    /// `N_t`: peaks since calibration began, dropped ones included.
    peaks_seen: u64,
    /// `n`: scores taken in since calibration began (anomalies and non-finite ones excluded).
    seen: u64,
    /// DSPOT's window of the last `depth` scores taken in.
    baseline: Option<Baseline>,
    /// Reused buffer of the normalised excesses during a fit.
    #[serde(skip)]
    scratch: Vec<f64>,
}

impl fmt::Debug for Spot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the peaks themselves: there can be thousands.
        f.debug_struct("Spot")
            .field("config", &self.config)
            .field("initial_threshold", &self.initial_threshold())
            .field("threshold", &self.threshold())
            .field("shape", &self.shape)
            .field("scale", &self.scale)
            .field("peaks_kept", &self.peaks.len())
            .field("peaks_seen", &self.peaks_seen)
            .field("seen", &self.seen)
            .finish()
    }
}

impl Spot {
    /// SPOT's initialisation on `calibration` (scores in stream order; non-finite ones are
    /// skipped). Refuses an invalid `config`, fewer than [`MIN_CALIBRATION`] scores (after the
    /// first `depth`) and fewer than [`MIN_PEAKS`] peaks.
    pub fn fit(config: SpotConfig, calibration: &[f64]) -> Result<Self, SpotError> {
        config.validate()?;
        let mut baseline = (config.depth > 0).then(|| Baseline::new(config.depth));
        let mut finite = 0usize;
        let mut values = Vec::new();
        for &x in calibration.iter().filter(|x| x.is_finite()) {
            finite += 1;
            match baseline.as_mut() {
                Some(window) if !window.is_full() => window.push(x),
                Some(window) => {
                    // Only an overflow makes this infinite; such a score is left out.
                    let v = x - window.mean();
                    if v.is_finite() {
                        values.push(v);
                    }
                    window.push(x);
                }
                None => values.push(x),
            }
        }
        if values.len() < MIN_CALIBRATION {
            return Err(SpotError::TooFewValues {
                found: finite,
                needed: MIN_CALIBRATION.saturating_add(config.depth),
            });
        }

        let mut sorted = values.clone();
        sorted.sort_unstable_by(f64::total_cmp);
        // `as` saturates, and 0 < init_level < 1: the rank is in bounds.
        let rank = ((config.init_level * sorted.len() as f64) as usize).min(sorted.len() - 1);
        let t = sorted[rank];

        // Excesses in stream order; one that overflows is left out.
        let excesses: Vec<f64> = values
            .iter()
            .filter(|&&v| v > t)
            .map(|&v| v - t)
            .filter(|e| e.is_finite())
            .collect();
        if excesses.len() < MIN_PEAKS {
            return Err(SpotError::TooFewPeaks {
                found: excesses.len(),
                needed: MIN_PEAKS,
            });
        }
        let kept = excesses.len().min(config.max_peaks);
        let peaks: VecDeque<f64> = excesses[excesses.len() - kept..].iter().copied().collect();

        let mut spot = Self {
            t,
            z: t,
            shape: 0.0,
            scale: 1.0,
            peaks,
            peaks_seen: excesses.len() as u64,
            seen: values.len() as u64,
            baseline,
            scratch: Vec::with_capacity(kept),
            config,
        };
        spot.refit();
        Ok(spot)
    }

    /// The settings it was fitted with.
    pub fn config(&self) -> &SpotConfig {
        &self.config
    }

    /// The current threshold `z_q` in score units (DSPOT: plus the current local mean): a
    /// score above it is an anomaly. May be `+∞` (see the module doc).
    pub fn threshold(&self) -> f64 {
        self.z + self.local_mean()
    }

    /// The initial threshold `t` in score units (DSPOT: plus the current local mean): a score
    /// above it and not above [`Spot::threshold`] is a peak.
    pub fn initial_threshold(&self) -> f64 {
        self.t + self.local_mean()
    }

    /// Fitted shape γ of the tail: 0 exponential, above 0 heavy, below 0 bounded.
    pub fn shape(&self) -> f64 {
        self.shape
    }

    /// Fitted scale σ of the tail, in score units.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Peaks kept for the tail fit (at most `max_peaks`).
    pub fn peak_count(&self) -> usize {
        self.peaks.len()
    }

    /// Classifies the next score of the stream and adapts to it (see the module doc). A
    /// non-finite score is [`Verdict::Normal`] and changes nothing.
    pub fn step(&mut self, x: f64) -> Verdict {
        if !x.is_finite() {
            return Verdict::Normal;
        }
        let v = x - self.local_mean();
        let excess = v - self.t;
        // An infinite excess is an overflow of a score far above `t`.
        if v > self.z || excess == f64::INFINITY {
            return Verdict::Anomaly;
        }
        self.seen = self.seen.saturating_add(1);
        if let Some(window) = self.baseline.as_mut() {
            window.push(x);
        }
        if excess > 0.0 {
            if self.peaks.len() == self.config.max_peaks {
                self.peaks.pop_front();
            }
            self.peaks.push_back(excess);
            self.peaks_seen = self.peaks_seen.saturating_add(1);
            self.refit();
            Verdict::Peak
        } else {
            Verdict::Normal
        }
    }

    fn local_mean(&self) -> f64 {
        self.baseline.as_ref().map_or(0.0, Baseline::mean)
    }

    /// Fits the tail to the kept peaks and recomputes `z_q`.
    fn refit(&mut self) {
        let (shape, scale) = fit_gpd(&self.peaks, &mut self.scratch);
        self.shape = shape;
        self.scale = scale;
        // peaks_seen ≥ MIN_PEAKS > 0 and seen ≥ peaks_seen: the ratio is positive and finite.
        let ratio = self.config.risk * self.seen as f64 / self.peaks_seen as f64;
        self.z = tail_quantile(self.t, shape, scale, ratio);
    }
}

/// `t + σ/γ·(r^(−γ) − 1)`, or `t − σ·ln r` for γ = 0, without cancellation near γ = 0.
/// Never NaN for finite `t`, finite γ, `0 < σ < ∞` and `0 < r < ∞`.
fn tail_quantile(t: f64, shape: f64, scale: f64, ratio: f64) -> f64 {
    let l = -ratio.ln();
    let gl = shape * l;
    // σ/γ·(e^(γl) − 1), expanded to second order where γl is tiny.
    let h = if gl.abs() < 1e-9 {
        l * (1.0 + 0.5 * gl)
    } else {
        gl.exp_m1() / shape
    };
    t + scale * h
}

/// Smallest |θ| searched for a root, with θ in units of `1 / max excess`. Below it
/// `|γ| < 1e-3`, which the exponential candidate (γ = 0) already stands for.
const THETA_MIN: f64 = 1e-3;
/// Largest θ searched (same units); caps Grimshaw's upper bound when the smallest excess is tiny.
const THETA_MAX: f64 = 1e12;
/// Ratio between neighbouring grid points on the positive side (two per decade).
const THETA_STEP: f64 = 3.162_277_660_168_379_5;
/// Grid of the negative side, θ ∈ (−1, −THETA_MIN], in increasing order: dense towards the
/// bound −1, then two points per decade towards 0.
const THETA_LEFT: [f64; 13] = [
    -0.999_999,
    -0.999_99,
    -0.999_9,
    -0.999,
    -0.99,
    -0.9,
    -0.6,
    -0.316_227_766,
    -0.1,
    -0.031_622_777,
    -0.01,
    -0.003_162_278,
    -THETA_MIN,
];
/// Iterations of the bracketing root refinement at most.
const REFINE_ITERATIONS: usize = 60;
/// Relative width at which a bracketed root is taken as found.
const REFINE_TOLERANCE: f64 = 1e-10;

/// Maximum-likelihood generalised Pareto fit `(shape γ, scale σ)` of the excesses, by
/// Grimshaw's method as in SPOT: with `θ = γ/σ`, the likelihood's stationary points are the
/// roots of `w(θ) = (1 + mean ln(1 + θY))·mean(1/(1 + θY)) − 1`, and there
/// `γ = mean ln(1 + θY)`. Roots are bracketed on a grid of `(−1/Y_max, 0)` and of
/// `(0, 2(Ȳ − Y_min)/Y_min²]` and refined; the candidate of highest log-likelihood wins, the
/// exponential (`γ = 0`, `σ = Ȳ`) included, which wins ties. Always returns a finite γ and a
/// finite σ > 0. `peaks` must be positive, finite and not empty.
fn fit_gpd(peaks: &VecDeque<f64>, scratch: &mut Vec<f64>) -> (f64, f64) {
    let y_max = peaks.iter().copied().fold(0.0, f64::max);
    if !(y_max > 0.0 && y_max.is_finite()) {
        return (0.0, 1.0);
    }
    // Work in units of the largest excess: y ∈ (0, 1], and 1 + θy > 0 on the whole grid.
    scratch.clear();
    scratch.extend(peaks.iter().map(|&y| y / y_max));
    let y = scratch.as_slice();
    let count = y.len() as f64;
    let mean = y.iter().sum::<f64>() / count;
    let y_min = y.iter().copied().fold(1.0, f64::min);

    // (γ, σ in units of y_max, log-likelihood per peak up to a shared constant).
    let mut best = (0.0, mean, -mean.ln() - 1.0);
    let mut consider = |theta: f64, gamma: f64| {
        let sigma = gamma / theta;
        let ll = -sigma.ln() - (1.0 + gamma);
        if sigma > 0.0 && sigma.is_finite() && ll > best.2 {
            best = (gamma, sigma, ll);
        }
    };

    let upper = (2.0 * (mean - y_min) / (y_min * y_min)).min(THETA_MAX);
    let right = std::iter::successors(Some(THETA_MIN), |&theta| Some(theta * THETA_STEP))
        .take_while(|&theta| theta < upper)
        .chain((upper >= THETA_MIN).then_some(upper));
    scan_roots(y, THETA_LEFT.into_iter(), &mut consider);
    scan_roots(y, right, &mut consider);

    let (gamma, sigma, _) = best;
    let scale = sigma * y_max;
    if gamma.is_finite() && scale > 0.0 && scale.is_finite() {
        (gamma, scale)
    } else {
        (0.0, (mean * y_max).clamp(f64::MIN_POSITIVE, f64::MAX))
    }
}

/// Hands every root of `w` bracketed by neighbouring points of `grid` (increasing), and every
/// grid point where `w` is exactly 0, to `consider(θ, mean ln(1 + θy))`.
fn scan_roots(y: &[f64], grid: impl Iterator<Item = f64>, consider: &mut impl FnMut(f64, f64)) {
    let mut previous: Option<(f64, f64)> = None;
    for theta in grid {
        let (gamma, w) = auxiliary(y, theta);
        if w == 0.0 {
            consider(theta, gamma);
        } else if let Some((left, w_left)) = previous
            && (w_left < 0.0) != (w < 0.0)
            && !w.is_nan()
        {
            let (root, gamma) = refine_root(y, (left, w_left), (theta, w));
            consider(root, gamma);
        }
        previous = (w != 0.0 && !w.is_nan()).then_some((theta, w));
    }
}

/// `(mean ln(1 + θy), w(θ))` over the normalised excesses.
fn auxiliary(y: &[f64], theta: f64) -> (f64, f64) {
    let mut sum_ln = 0.0;
    let mut sum_inv = 0.0;
    for &yi in y {
        let s = 1.0 + theta * yi;
        sum_ln += s.ln();
        sum_inv += 1.0 / s;
    }
    let count = y.len() as f64;
    let gamma = sum_ln / count;
    (gamma, (1.0 + gamma) * (sum_inv / count) - 1.0)
}

/// A root of `w` between `a` and `b`, where `w` has opposite signs, by the Illinois variant of
/// regula falsi (it keeps the bracket). Returns `(θ, mean ln(1 + θy))`.
fn refine_root(y: &[f64], a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    let ((mut a, mut w_a), (mut b, mut w_b)) = (a, b);
    let mut gamma_b = auxiliary(y, b).0;
    for _ in 0..REFINE_ITERATIONS {
        let c = b - w_b * (b - a) / (w_b - w_a);
        let (gamma_c, w_c) = auxiliary(y, c);
        if w_c == 0.0 || w_c.is_nan() {
            return (c, gamma_c);
        }
        if (w_c < 0.0) != (w_b < 0.0) {
            (a, w_a) = (b, w_b);
        } else {
            w_a *= 0.5;
        }
        (b, w_b, gamma_b) = (c, w_c, gamma_c);
        if (b - a).abs() <= REFINE_TOLERANCE * b.abs() {
            break;
        }
    }
    (b, gamma_b)
}

/// DSPOT's window of the last `depth` scores taken in, with their mean.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Baseline {
    depth: usize,
    values: VecDeque<f64>,
    /// Σ x / depth over `values`: no larger in magnitude than the largest score in it.
    sum: f64,
    /// Pushes since `sum` was last recomputed from `values`, which bounds its rounding drift.
    since_resum: usize,
}

impl Baseline {
    fn new(depth: usize) -> Self {
        // No capacity up front: `depth` comes from configuration and may be huge.
        Self {
            depth,
            values: VecDeque::new(),
            sum: 0.0,
            since_resum: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.values.len() >= self.depth
    }

    /// Mean of the window; only used once it is full.
    fn mean(&self) -> f64 {
        self.sum
    }

    fn push(&mut self, x: f64) {
        let d = self.depth as f64;
        if self.is_full()
            && let Some(old) = self.values.pop_front()
        {
            self.sum -= old / d;
        }
        self.values.push_back(x);
        self.sum += x / d;
        self.since_resum += 1;
        if self.since_resum >= self.depth {
            self.sum = self.values.iter().map(|v| v / d).sum();
            self.since_resum = 0;
        }
    }
}

#[cfg(test)]
mod tests;
