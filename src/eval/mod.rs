//! eval: detection quality on a labelled dataset, through the streaming path's own code.
//!
//! Each readings file is a series. Its rows become [`Reading`]s fed, in time order, to an
//! [`Assembler`] cutting one window per step (hop 1); the windows are scored in batches by the
//! [`Model`] and the [`Detector`] — the same assemble → infer → detect code `gridwatch run`
//! uses, with no second implementation. Only the thresholds (and, for models that ask for it,
//! the channel statistics) are calibrated here, on each series' fit range.
//!
//! Invariants:
//! - Rows of the fit range are used for calibration only: no test point is scored with
//!   anything learnt from the test part (thresholds, statistics, SPOT's initial tail).
//! - A test point is one (cell, row); it is flagged iff the window ending with its step is
//!   anomalous. Points without a window (warm-up, too sparse) are not flagged. A flagged
//!   window's spikes are late findings of their own, earlier steps ([`metrics`]).
//! - The baselines are computed on the same points in the same run, from the same series.
//! - The report is a function of the inputs, the model and the options (seeded randomness).

pub mod dataset;
pub mod inject;
pub mod metrics;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::assemble::{Admission, AssembleSpec, Assembler, Provenance, Window};
use crate::config::Config;
use crate::detect::divergence::Divergence;
use crate::detect::floor::Floors;
use crate::detect::{Detector, Judge};
use crate::infer::Model;
use crate::infer::contract::Standardisation;
use crate::schema::{Reading, SpatialNode};
use dataset::{Format, RangeLabel, Series};
use metrics::{LabelledRange, Metrics, Track};

/// Which rows of each series are for fitting and calibration only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fit {
    /// The first `n` rows.
    Rows(usize),
    /// Rows stamped before this time.
    Until(i64),
    /// None: the model's own calibration is used as it is.
    Nothing,
}

/// How the threshold of each cell is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThresholdPolicy {
    /// The model contract's calibrated threshold (times `[detect] threshold_scale`).
    Contract,
    /// `quantile × factor` of the scores of the windows inside the cell's fit range.
    Fit,
    /// SPOT/DSPOT ([detect.spot]) per cell, its tail fitted on the cell's fit-range scores.
    Spot,
}

/// Everything `gridwatch eval` is asked to do.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub inputs: Vec<PathBuf>,
    pub format: Format,
    /// Node metadata (cells or coordinates); without it each series is one cell.
    pub nodes: Option<PathBuf>,
    pub h3_resolution: u8,
    /// Labelled ranges (CSV or JSON).
    pub labels: Option<PathBuf>,
    pub fit: Fit,
    pub threshold: ThresholdPolicy,
    pub fit_quantile: f64,
    pub fit_factor: f64,
    /// Flagged runs closer than this many steps count as one alarm.
    pub merge_gap: usize,
    pub seed: u64,
    pub batch: usize,
    pub progress: bool,
    /// Where to write every test point (`--points-csv`).
    pub points_csv: Option<PathBuf>,
}

/// What the run found, for people (`report_text`) and machines (JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dataset: DatasetSummary,
    pub model: ModelSummary,
    pub results: Vec<DetectorResult>,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DatasetSummary {
    pub files: usize,
    pub nodes: usize,
    pub cells: usize,
    pub rows: usize,
    pub fit_rows: usize,
    pub readings: u64,
    /// Readings the assembler refused (cell full, no model channel, …), by reason.
    pub refused: std::collections::BTreeMap<String, u64>,
    pub windows_scored: u64,
    pub windows_sparse: u64,
    pub windows_warmup: u64,
    pub test_points: u64,
    pub anomalous_points: u64,
    pub labelled_ranges: u64,
    pub single_node_ranges: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub standardisation: Standardisation,
    pub threshold_policy: ThresholdPolicy,
    /// Thresholds over cells: least, median, largest.
    pub thresholds: [f64; 3],
}

#[derive(Debug, Clone, Serialize)]
pub struct DetectorResult {
    pub detector: String,
    pub metrics: Metrics,
    /// For labelled ranges of a single node that were found: how often that node was the top
    /// contributor of the windows flagged inside the range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Attribution {
    pub ranges: u64,
    pub top1: u64,
    pub top1_share: f64,
    /// Found ranges where at least one flagged window inside names the faulted node first:
    /// found because of that node, not only because another node of its cell was flagged.
    pub named: u64,
    /// Per labelled kind: (found ranges, of them named).
    pub named_by_kind: std::collections::BTreeMap<String, (u64, u64)>,
    /// Flagged windows inside found ranges whose largest model error is the faulted node's.
    pub top_error_windows: u64,
    /// Of those, the ones where that error peaks at a step inside the range (the event's
    /// contributor `peak_at`): the time step attribution, checked against the labels.
    pub peak_inside: u64,
}

/// A labelled range of one node, placed on the track of that node's cell.
struct SingleNodeRange {
    track: usize,
    node: String,
    kind: String,
    start_ms: i64,
    end_ms: i64,
}

/// Per node, its largest `e[n,c]` in one window.
type NodeScores = Vec<(Arc<str>, f64)>;

/// Per cell of a series: what scoring it produced.
#[derive(Default)]
struct CellRun {
    fit_scores: Vec<f64>,
    /// The divergence check's baselines while the fit range plays ([detect.divergence]).
    divergence: Option<Divergence>,
    /// The floor check's floors while the fit range plays ([detect.floor]).
    floor: Option<Floors>,
    judge: Option<Judge>,
    /// Window end → flagged.
    flagged: HashMap<i64, bool>,
    /// Window end → (score, threshold; NaN in the fit range), kept only for `--points-csv`.
    scored: HashMap<i64, (f64, f64)>,
    /// Flagged test windows.
    attributions: Vec<FlaggedWindow>,
}

/// A flagged window, for attribution and late findings.
struct FlaggedWindow {
    end_ms: i64,
    /// Start of each step where it found a spike: the spike check tells a spike only once the
    /// step after it is in, so the window ends later than its spike's step.
    spikes_ms: Vec<i64>,
    /// Per node its largest entry, raised by the window's score where a sensor check named it.
    per_node: NodeScores,
    /// The node of the window's largest model error, and the start of its peak step.
    top_error: Option<(Arc<str>, i64)>,
}

impl FlaggedWindow {
    /// Whether it flagged a step in `[start_ms, end_ms)`: its own last step or a spike's.
    fn in_range(&self, start_ms: i64, end_ms: i64, cadence_ms: i64) -> bool {
        let inside = |t: i64| t >= start_ms && t < end_ms;
        inside(self.end_ms - cadence_ms) || self.spikes_ms.iter().any(|&t| inside(t))
    }
}

/// Runs the evaluation; `tick` receives the number of rows done (for a progress bar).
pub fn run(config: &Config, options: &EvalOptions) -> anyhow::Result<Report> {
    let started = Instant::now();
    let files = dataset::expand_inputs(&options.inputs)?;
    let mut model = Model::load(&config.model.contract, &config.model)
        .with_context(|| format!("loading {}", config.model.contract.display()))?;
    let contract = Arc::clone(&model.contract);
    let mut format = options.format.clone();
    format.channels = contract.channels.iter().map(|c| c.name.clone()).collect();
    if format.cadence_ms <= 0 {
        format.cadence_ms = contract.cadence_ms;
    }
    if contract.standardisation == Standardisation::PerSeriesFit && options.fit == Fit::Nothing {
        bail!(
            "{} standardises each series with its fit range (standardisation = \"per-series-fit\"): \
             give --fit-rows or --fit-until",
            config.model.contract.display()
        );
    }
    if options.threshold == ThresholdPolicy::Fit && options.fit == Fit::Nothing {
        bail!("--threshold fit needs a fit range: give --fit-rows or --fit-until");
    }
    let series: Vec<Series> = files
        .iter()
        .map(|f| dataset::load_series(f, &format))
        .collect::<anyhow::Result<_>>()?;
    let node_info = match &options.nodes {
        Some(path) => Some(dataset::load_nodes(path)?),
        None => None,
    };
    let ranges = match &options.labels {
        Some(path) => dataset::load_ranges(path)?,
        None => Vec::new(),
    };
    if ranges.is_empty() && series.iter().all(|s| s.row_labels.is_none()) {
        bail!("no labels: give --label-column or --labels");
    }
    let resolution = h3o::Resolution::try_from(options.h3_resolution)
        .map_err(|e| anyhow::anyhow!("--h3-resolution {}: {e}", options.h3_resolution))?;

    let total_rows: u64 = series.iter().map(|s| s.rows() as u64).sum();
    let bar = if options.progress {
        let bar = indicatif::ProgressBar::new(total_rows);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {pos}/{len} rows ({per_sec}, eta {eta})",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix("scoring");
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let mut summary = DatasetSummary {
        files: series.len(),
        ..DatasetSummary::default()
    };
    let mut tracks: Vec<Track> = Vec::new();
    let mut labelled: Vec<LabelledRange> = Vec::new();
    let mut single_node: Vec<SingleNodeRange> = Vec::new();
    let mut baseline_last: Vec<Vec<bool>> = Vec::new();
    let mut track_cells: Vec<(usize, Arc<str>)> = Vec::new();
    let mut thresholds = Vec::new();
    let mut points = match options.points_csv.as_ref() {
        Some(path) => {
            let mut out = csv::Writer::from_path(path)
                .with_context(|| format!("creating {}", path.display()))?;
            out.write_record([
                "series",
                "cell",
                "part",
                "step_ms",
                "score",
                "threshold",
                "flagged",
                "label",
            ])?;
            Some(out)
        }
        None => None,
    };
    let mut runs: Vec<HashMap<Arc<str>, CellRun>> = Vec::new();

    for (si, s) in series.iter().enumerate() {
        let fit_rows = match options.fit {
            Fit::Rows(n) => n.min(s.rows()),
            Fit::Until(t) => s.times_ms.iter().take_while(|&&x| x < t).count(),
            Fit::Nothing => 0,
        };
        summary.rows += s.rows();
        summary.fit_rows += fit_rows;
        summary.nodes += s.nodes.len();
        if fit_rows == s.rows() {
            bail!(
                "{}: every row is in the fit range; nothing is left to test",
                s.name
            );
        }
        let cell_of_node = place_nodes(s, node_info.as_ref(), resolution)?;
        let cadence = contract.cadence_ms;
        let fit_end_ms = s.times_ms[fit_rows].div_euclid(cadence) * cadence;

        if contract.standardisation == Standardisation::PerSeriesFit {
            model.set_normalisation(&fit_statistics(s, fit_rows, &std_floor(&contract)))?;
        }
        let detector =
            Detector::try_new(&model.contract, &config.detect).map_err(anyhow::Error::msg)?;

        let spec = AssembleSpec {
            cadence_ms: cadence,
            window_steps: contract.window_steps,
            hop_steps: 1,
            // A window ends at every step: there is nothing to stagger.
            stagger: false,
            channels: format.channels.clone(),
            allowed_lateness_ms: 0,
            max_nodes: contract.max_nodes,
            min_observed_fraction: config.assemble.min_observed_fraction,
            max_cells: usize::MAX,
            idle_cell_ms: i64::MAX,
        };
        let mut assembler = Assembler::new(spec);
        let mut cells: HashMap<Arc<str>, CellRun> = HashMap::new();
        let mut pending: Vec<Window> = Vec::new();
        let node_ids: Vec<Arc<str>> = s.nodes.iter().map(|n| Arc::from(n.as_str())).collect();
        let score_pending = |pending: &mut Vec<Window>,
                             cells: &mut HashMap<Arc<str>, CellRun>,
                             model: &mut Model|
         -> anyhow::Result<()> {
            for chunk in pending.chunks(options.batch.max(1)) {
                let recon = model.run(chunk)?;
                for (w, r) in chunk.iter().zip(&recon) {
                    let cell = cells.entry(Arc::clone(&w.cell)).or_default();
                    if w.end_ms <= fit_end_ms {
                        let score = detector.score(w, r).score;
                        cell.fit_scores.push(score);
                        if options.points_csv.is_some() {
                            cell.scored.insert(w.end_ms, (score, f64::NAN));
                        }
                        if let Some(config) = config.detect.divergence.as_ref() {
                            cell.divergence
                                .get_or_insert_with(|| detector.divergence(config))
                                .observe(w);
                        }
                        if let Some(config) = config.detect.floor.as_ref() {
                            (cell.floor)
                                .get_or_insert_with(|| detector.floors(config))
                                .observe(w);
                        }
                        continue;
                    }
                    if cell.judge.is_none() {
                        let no_fit = || {
                            anyhow::anyhow!(
                                "{} cell {}: no window lies inside the fit range \
                                 (it needs more than {} rows)",
                                s.name,
                                w.cell,
                                contract.window_steps
                            )
                        };
                        let mut detect = config.detect.clone();
                        detect.threshold_policy = crate::config::ThresholdPolicy::Static;
                        let mut judge = match options.threshold {
                            ThresholdPolicy::Contract => Judge::new(detector.clone(), &detect),
                            ThresholdPolicy::Fit => {
                                let t = fit_threshold(
                                    &cell.fit_scores,
                                    options.fit_quantile,
                                    options.fit_factor,
                                )
                                .ok_or_else(no_fit)?;
                                Judge::new(detector.with_threshold(t), &detect)
                            }
                            ThresholdPolicy::Spot => {
                                detect.threshold_policy = crate::config::ThresholdPolicy::Spot;
                                let mut judge = Judge::new(detector.clone(), &detect);
                                if let Err(e) = judge.calibrate(&w.cell, &cell.fit_scores) {
                                    bail!("{} cell {}: SPOT: {e}", s.name, w.cell);
                                }
                                judge
                            }
                        };
                        if let Some(divergence) = cell.divergence.take() {
                            judge.adopt_divergence(&w.cell, divergence);
                        }
                        if let Some(floors) = cell.floor.take() {
                            judge.adopt_floors(&w.cell, floors);
                        }
                        cell.judge = Some(judge);
                    }
                    let judge = cell.judge.as_mut().expect("set above");
                    let judgement = judge.judge(w, r);
                    let score = judgement.score;
                    cell.flagged.insert(w.end_ms, judgement.anomalous);
                    if options.points_csv.is_some() {
                        cell.scored
                            .insert(w.end_ms, (score.score, judgement.threshold));
                    }
                    if judgement.anomalous {
                        let mut per_node: NodeScores = Vec::new();
                        for &crate::detect::Entry { slot, error: e, .. } in &score.entries {
                            match per_node.iter_mut().find(|(n, _)| *n == w.nodes[slot]) {
                                Some((_, m)) => *m = m.max(e),
                                None => per_node.push((Arc::clone(&w.nodes[slot]), e)),
                            }
                        }
                        // A flatlined or spiking sensor is what the event names as the cause:
                        // it ranks above the window's largest model error.
                        let top = score.score;
                        let faulty = score.flat.iter().map(|f| f.0);
                        // Of the diverged nodes only the furthest: one node's move can nudge
                        // the median its neighbours are measured against.
                        let furthest = score.diverged.first().map(|d| d.slot);
                        let beyond = score.below_floor.iter().chain(&score.above_ceiling);
                        let faulty = faulty.chain(furthest).chain(beyond.map(|b| b.slot));
                        for slot in faulty.chain(score.spikes.iter().map(|s| s.slot)) {
                            match per_node.iter_mut().find(|(n, _)| *n == w.nodes[slot]) {
                                Some((_, m)) => *m += top,
                                None => per_node.push((Arc::clone(&w.nodes[slot]), top)),
                            }
                        }
                        let spikes_ms = (score.spikes.iter())
                            .map(|s| w.start_ms + s.step as i64 * cadence)
                            .collect();
                        let top_error = (score.entries.iter())
                            .max_by(|a, b| a.error.total_cmp(&b.error))
                            .map(|e| {
                                let at = w.start_ms + e.peak_step as i64 * cadence;
                                (Arc::clone(&w.nodes[e.slot]), at)
                            });
                        cell.attributions.push(FlaggedWindow {
                            end_ms: w.end_ms,
                            spikes_ms,
                            per_node,
                            top_error,
                        });
                    }
                }
            }
            pending.clear();
            Ok(())
        };

        for row in 0..s.rows() {
            let time = s.times_ms[row];
            for (ni, node) in node_ids.iter().enumerate() {
                let values: Vec<(String, f64)> = (0..s.channels)
                    .filter_map(|c| {
                        let v = s.value(row, ni, c);
                        v.is_finite().then(|| (format.channels[c].clone(), v))
                    })
                    .collect();
                if values.is_empty() {
                    continue;
                }
                let reading = Reading {
                    node_id: node.to_string(),
                    event_time_ms: time,
                    values,
                    sequence: None,
                };
                summary.readings += 1;
                let at = Provenance {
                    partition: 0,
                    offset: row as i64,
                };
                let (admission, closed) =
                    assembler.add(&cell_of_node[ni], node, &reading, at, &mut pending);
                summary.windows_sparse += closed.sparse as u64;
                summary.windows_warmup += closed.warmup as u64;
                if let Some(reason) = refusal(admission) {
                    *summary.refused.entry(reason.into()).or_default() += 1;
                }
            }
            if pending.len() >= options.batch {
                summary.windows_scored += pending.len() as u64;
                score_pending(&mut pending, &mut cells, &mut model)?;
            }
            bar.inc(1);
        }
        let last = *s.times_ms.last().expect("a series has rows");
        let closed = assembler.advance_to(0, last + 2 * cadence, &mut pending);
        summary.windows_sparse += closed.sparse as u64;
        summary.windows_warmup += closed.warmup as u64;
        summary.windows_scored += pending.len() as u64;
        score_pending(&mut pending, &mut cells, &mut model)?;

        // The test points of every cell of this series, and their labels.
        let mut cell_names: Vec<Arc<str>> = cell_of_node.clone();
        cell_names.sort();
        cell_names.dedup();
        let test_rows = fit_rows..s.rows();
        let series_ranges: Vec<&RangeLabel> = ranges.iter().filter(|r| r.applies_to(s)).collect();
        let first_track = tracks.len();
        for cell in &cell_names {
            let nodes_here: Vec<usize> = (0..s.nodes.len())
                .filter(|&n| cell_of_node[n] == *cell)
                .collect();
            let run = cells.get(cell);
            if let Some(j) = run.and_then(|r| r.judge.as_ref()) {
                thresholds.push(j.threshold_of(cell));
            }
            let mut track = Track {
                series: si,
                cadence_ms: cadence,
                ..Track::default()
            };
            if let Some(out) = points.as_mut() {
                for row in 0..fit_rows {
                    let t = s.times_ms[row];
                    let end = (t.div_euclid(cadence) + 1) * cadence;
                    let score = run.and_then(|r| r.scored.get(&end));
                    let score = score.map_or_else(String::new, |x| x.0.to_string());
                    out.write_record([
                        &s.name,
                        &**cell,
                        "fit",
                        &t.to_string(),
                        &score,
                        "",
                        "",
                        "",
                    ])?;
                }
            }
            for row in test_rows.clone() {
                let t = s.times_ms[row];
                let end = (t.div_euclid(cadence) + 1) * cadence;
                let by_row = s.row_labels.as_ref().is_some_and(|l| l[row]);
                let by_range = series_ranges.iter().any(|r| {
                    t >= r.start_ms
                        && t < r.end_ms
                        && (r.nodes.is_empty()
                            || nodes_here.iter().any(|&n| r.nodes.contains(&s.nodes[n])))
                });
                let flagged = run
                    .and_then(|r| r.flagged.get(&end))
                    .copied()
                    .unwrap_or(false);
                if let Some(out) = points.as_mut() {
                    let scored = run.and_then(|r| r.scored.get(&end));
                    let number = |v: Option<f64>| v.map_or_else(String::new, |v| v.to_string());
                    out.write_record([
                        s.name.as_str(),
                        cell,
                        "test",
                        &t.to_string(),
                        &number(scored.map(|x| x.0)),
                        &number(scored.map(|x| x.1)),
                        if flagged { "1" } else { "0" },
                        if by_row || by_range { "1" } else { "0" },
                    ])?;
                }
                track.times_ms.push(t);
                track.labels.push(by_row || by_range);
                track.flagged.push(flagged);
            }
            // A spike is flagged by the windows after it; those windows found its step.
            track.late = (run.iter().flat_map(|r| &r.attributions))
                .flat_map(|w| w.spikes_ms.iter().map(|&t| (t, w.end_ms - cadence)))
                .collect();
            baseline_last.push(last_value_flags(s, &nodes_here, fit_rows, options));
            track_cells.push((si, Arc::clone(cell)));
            tracks.push(track);
        }
        // Ranges: per-row label runs, and the given ranges placed on this series' cells.
        if s.row_labels.is_some() {
            for (ti, track) in tracks.iter().enumerate().skip(first_track) {
                labelled.extend(metrics::label_runs(track, ti));
            }
        }
        let test_start = s.times_ms[fit_rows];
        for r in &series_ranges {
            let start = r.start_ms.max(test_start);
            if start >= r.end_ms {
                continue;
            }
            let on: Vec<usize> = (first_track..tracks.len())
                .filter(|&ti| {
                    r.nodes.is_empty()
                        || (0..s.nodes.len()).any(|n| {
                            cell_of_node[n] == track_cells[ti].1 && r.nodes.contains(&s.nodes[n])
                        })
                })
                .collect();
            if on.is_empty() {
                continue;
            }
            if let [node] = r.nodes.as_slice() {
                single_node.push(SingleNodeRange {
                    track: on[0],
                    node: node.clone(),
                    kind: r.kind.clone(),
                    start_ms: start,
                    end_ms: r.end_ms,
                });
            }
            labelled.push(LabelledRange {
                start_ms: start,
                end_ms: r.end_ms,
                tracks: on,
                kind: r.kind.clone(),
            });
        }
        summary.cells += cell_names.len();
        runs.push(cells);
    }
    bar.finish_and_clear();
    if let Some(mut out) = points {
        out.flush().context("writing --points-csv")?;
    }

    summary.test_points = tracks.iter().map(|t| t.labels.len() as u64).sum();
    summary.anomalous_points = tracks
        .iter()
        .map(|t| t.labels.iter().filter(|&&l| l).count() as u64)
        .sum();
    summary.labelled_ranges = labelled.len() as u64;
    summary.single_node_ranges = single_node.len() as u64;

    let mut results = Vec::new();
    let model_metrics = metrics::compute(&tracks, &labelled, options.merge_gap);
    let attribution = attribution(&track_cells, &runs, &single_node, contract.cadence_ms);
    results.push(DetectorResult {
        detector: format!("{} v{}", contract.name, contract.version),
        metrics: model_metrics,
        attribution: Some(attribution),
    });
    let with_flags = |flags: &dyn Fn(usize, &Track) -> Vec<bool>| -> Vec<Track> {
        tracks
            .iter()
            .enumerate()
            .map(|(i, t)| Track {
                flagged: flags(i, t),
                late: Vec::new(),
                ..t.clone()
            })
            .collect()
    };
    let all = with_flags(&|_, t| vec![true; t.labels.len()]);
    results.push(DetectorResult {
        detector: "baseline: all anomalous".into(),
        metrics: metrics::compute(&all, &labelled, options.merge_gap),
        attribution: None,
    });
    let prevalence = if summary.test_points > 0 {
        summary.anomalous_points as f64 / summary.test_points as f64
    } else {
        0.0
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed);
    let random: Vec<Vec<bool>> = tracks
        .iter()
        .map(|t| {
            t.labels
                .iter()
                .map(|_| rng.random::<f64>() < prevalence)
                .collect()
        })
        .collect();
    let random = with_flags(&|i, _| random[i].clone());
    results.push(DetectorResult {
        detector: format!("baseline: random ({:.1} % flagged)", prevalence * 100.0),
        metrics: metrics::compute(&random, &labelled, options.merge_gap),
        attribution: None,
    });
    if options.fit != Fit::Nothing {
        let last = with_flags(&|i, _| baseline_last[i].clone());
        results.push(DetectorResult {
            detector: "baseline: last-value error".into(),
            metrics: metrics::compute(&last, &labelled, options.merge_gap),
            attribution: None,
        });
    }

    thresholds.sort_by(f64::total_cmp);
    let spread = if thresholds.is_empty() {
        [0.0; 3]
    } else {
        [
            thresholds[0],
            thresholds[thresholds.len() / 2],
            thresholds[thresholds.len() - 1],
        ]
    };
    Ok(Report {
        dataset: summary,
        model: ModelSummary {
            name: contract.name.clone(),
            version: contract.version.clone(),
            sha256: contract.onnx_sha256.clone(),
            standardisation: contract.standardisation,
            threshold_policy: options.threshold,
            thresholds: spread,
        },
        results,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

fn refusal(admission: Admission) -> Option<&'static str> {
    match admission {
        Admission::Accepted { .. } => None,
        Admission::NoModelChannel => Some("no_model_channel"),
        Admission::Late { .. } => Some("late"),
        Admission::CellFull => Some("cell_full"),
        Admission::TooManyCells => Some("cell_limit"),
        Admission::Duplicate => Some("duplicate"),
    }
}

/// The cell of every node of `s`: from the metadata (its cell, else the H3 cell of its
/// coordinates, as the registry places nodes), or the series' name without metadata.
fn place_nodes(
    s: &Series,
    info: Option<&HashMap<String, dataset::NodeInfo>>,
    resolution: h3o::Resolution,
) -> anyhow::Result<Vec<Arc<str>>> {
    let Some(info) = info else {
        let cell: Arc<str> = Arc::from(s.name.as_str());
        return Ok(vec![cell; s.nodes.len()]);
    };
    let missing: Vec<&String> = s.nodes.iter().filter(|n| !info.contains_key(*n)).collect();
    if !missing.is_empty() {
        bail!(
            "{}: {} node(s) have no metadata, e.g. {:?}",
            s.name,
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
    s.nodes
        .iter()
        .map(|n| {
            let i = &info[n];
            let node = SpatialNode {
                node_id: n.clone(),
                latitude: i.latitude,
                longitude: i.longitude,
                cell_id: i.cell.clone(),
                ..SpatialNode::default()
            };
            crate::registry::cell_of(&node, resolution)
                .map(|c| Arc::from(c.as_str()))
                .map_err(anyhow::Error::from)
        })
        .collect()
}

/// The floor under per-series standard deviations the model was trained with
/// (`training.standardisation.std_floor`, one per channel), if its contract records one.
fn std_floor(contract: &crate::infer::ModelContract) -> Vec<f64> {
    contract.training["standardisation"]["std_floor"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect())
        .unwrap_or_default()
}

/// Per channel `(mean, std)` of the fit rows of `s`, over every node, the std raised to
/// `floor[c]` where given; a channel that still does not vary gets std 1 (its deviations then
/// read in its own units).
pub fn fit_statistics(s: &Series, fit_rows: usize, floor: &[f64]) -> Vec<(f64, f64)> {
    (0..s.channels)
        .map(|c| {
            let values: Vec<f64> = (0..fit_rows)
                .flat_map(|r| (0..s.nodes.len()).map(move |n| (r, n)))
                .map(|(r, n)| s.value(r, n, c))
                .filter(|v| v.is_finite())
                .collect();
            if values.is_empty() {
                return (0.0, 1.0);
            }
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
            let std = var.sqrt().max(floor.get(c).copied().unwrap_or(0.0));
            (
                mean,
                if std > 1e-9 * mean.abs().max(1.0) {
                    std
                } else {
                    1.0
                },
            )
        })
        .collect()
}

/// `quantile × factor` of `scores` (linear interpolation, numpy's default); `None` if empty.
pub fn fit_threshold(scores: &[f64], quantile: f64, factor: f64) -> Option<f64> {
    let mut s: Vec<f64> = scores.iter().copied().filter(|v| v.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let pos = quantile.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let q = s[lo] + (s[hi] - s[lo]) * (pos - lo as f64);
    Some(q * factor)
}

/// The last-value baseline's flags on the test rows of the nodes `nodes` of `s`: a row's
/// score is the largest squared change since the previous row over its nodes and channels,
/// each in units of the standard deviation of that node and channel's changes in the fit
/// rows; the threshold follows the same fit rule as the model's.
fn last_value_flags(
    s: &Series,
    nodes: &[usize],
    fit_rows: usize,
    options: &EvalOptions,
) -> Vec<bool> {
    let scale: Vec<f64> = nodes
        .iter()
        .flat_map(|&n| (0..s.channels).map(move |c| (n, c)))
        .map(|(n, c)| {
            let diffs: Vec<f64> = (1..fit_rows)
                .map(|r| s.value(r, n, c) - s.value(r - 1, n, c))
                .filter(|d| d.is_finite())
                .collect();
            if diffs.len() < 2 {
                return 1.0;
            }
            let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
            let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / diffs.len() as f64;
            if var > 0.0 { var.sqrt() } else { 1.0 }
        })
        .collect();
    let score = |r: usize| -> f64 {
        if r == 0 {
            return 0.0;
        }
        let mut best = 0.0f64;
        for (k, (&n, c)) in nodes
            .iter()
            .flat_map(|n| (0..s.channels).map(move |c| (n, c)))
            .enumerate()
        {
            let d = (s.value(r, n, c) - s.value(r - 1, n, c)) / scale[k];
            if d.is_finite() {
                best = best.max(d * d);
            }
        }
        best
    };
    let fit: Vec<f64> = (1..fit_rows).map(score).collect();
    let Some(threshold) = fit_threshold(&fit, options.fit_quantile, options.fit_factor) else {
        return vec![false; s.rows() - fit_rows];
    };
    (fit_rows..s.rows())
        .map(|r| score(r) >= threshold)
        .collect()
}

/// How often the labelled node of a found single-node range is the top contributor, summed
/// over the windows flagged inside the range.
fn attribution(
    track_cells: &[(usize, Arc<str>)],
    runs: &[HashMap<Arc<str>, CellRun>],
    single_node: &[SingleNodeRange],
    cadence_ms: i64,
) -> Attribution {
    let mut a = Attribution::default();
    for range in single_node {
        let (node, start, end) = (&range.node, &range.start_ms, &range.end_ms);
        let (si, cell) = &track_cells[range.track];
        let Some(run) = runs[*si].get(cell) else {
            continue;
        };
        let mut totals: NodeScores = Vec::new();
        let mut named = false;
        for flagged in &run.attributions {
            if !flagged.in_range(*start, *end, cadence_ms) {
                continue;
            }
            let per_node = &flagged.per_node;
            let first = per_node
                .iter()
                .max_by(|x, y| x.1.total_cmp(&y.1).then(y.0.cmp(&x.0)));
            named |= first.is_some_and(|(n, _)| &**n == node.as_str());
            if let Some((n, at)) = &flagged.top_error
                && &**n == node.as_str()
            {
                a.top_error_windows += 1;
                a.peak_inside += u64::from(*at >= *start && *at < *end);
            }
            for (n, e) in per_node {
                match totals.iter_mut().find(|(m, _)| m == n) {
                    Some((_, t)) => *t += e,
                    None => totals.push((Arc::clone(n), *e)),
                }
            }
        }
        if totals.is_empty() {
            continue; // not found
        }
        a.ranges += 1;
        let kind = a.named_by_kind.entry(range.kind.clone()).or_default();
        kind.0 += 1;
        if named {
            a.named += 1;
            kind.1 += 1;
        }
        totals.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
        if &*totals[0].0 == node.as_str() {
            a.top1 += 1;
        }
    }
    a.top1_share = if a.ranges > 0 {
        a.top1 as f64 / a.ranges as f64
    } else {
        0.0
    };
    a
}

/// The results table, for people.
pub fn report_text(r: &Report) -> String {
    use std::fmt::Write;
    let d = &r.dataset;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} file(s), {} node(s) in {} cell(s), {} rows ({} fit/calibration only), {} readings; \
         {} windows scored",
        d.files, d.nodes, d.cells, d.rows, d.fit_rows, d.readings, d.windows_scored
    );
    let _ = writeln!(
        out,
        "test: {} points ({} anomalous, {:.1} %), {} labelled ranges ({} of a single node)",
        d.test_points,
        d.anomalous_points,
        100.0 * d.anomalous_points as f64 / d.test_points.max(1) as f64,
        d.labelled_ranges,
        d.single_node_ranges
    );
    if !d.refused.is_empty() {
        let _ = writeln!(out, "readings refused by the assembler: {:?}", d.refused);
    }
    let _ = writeln!(
        out,
        "model {} v{} ({}), thresholds: {} policy, least {:.3} / median {:.3} / largest {:.3}",
        r.model.name,
        r.model.version,
        match r.model.standardisation {
            Standardisation::Contract => "contract statistics",
            Standardisation::PerSeriesFit => "per-series fit statistics",
        },
        match r.model.threshold_policy {
            ThresholdPolicy::Contract => "contract",
            ThresholdPolicy::Fit => "fit",
            ThresholdPolicy::Spot => "spot",
        },
        r.model.thresholds[0],
        r.model.thresholds[1],
        r.model.thresholds[2]
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<40} {:>6} {:>6} {:>6} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8}",
        "detector", "F1", "P", "R", "FAR %", "MAR %", "event R", "FA/day", "FA/cell·d", "delay s"
    );
    for res in &r.results {
        let m = &res.metrics;
        let _ = writeln!(
            out,
            "{:<40} {:>6.3} {:>6.3} {:>6.3} {:>7.2} {:>7.2} {:>8.3} {:>8.2} {:>9.3} {:>8.1}",
            res.detector,
            m.f1,
            m.precision,
            m.recall,
            100.0 * m.far,
            100.0 * m.mar,
            m.event_recall,
            m.false_alarms_per_day,
            m.false_alarms_per_cell_day,
            m.mean_delay_s
        );
    }
    if let Some(model) = r.results.first()
        && !model.metrics.by_kind.is_empty()
    {
        let kinds: Vec<String> = model
            .metrics
            .by_kind
            .iter()
            .map(|(k, v)| format!("{k} {}/{}", v.found, v.ranges))
            .collect();
        let _ = writeln!(
            out,
            "\nevent recall by kind ({}): {}",
            model.detector,
            kinds.join(", ")
        );
    }
    if let Some(model) = r.results.first()
        && !model.metrics.missed.is_empty()
    {
        const SHOWN: usize = 12;
        let missed = &model.metrics.missed;
        let _ = writeln!(out, "\nmissed ({}):", model.detector);
        for range in missed.iter().take(SHOWN) {
            let _ = writeln!(
                out,
                "  {} .. {}  {}",
                crate::tail::utc(range.start_ms),
                crate::tail::utc(range.end_ms),
                range.kind
            );
        }
        if missed.len() > SHOWN {
            let _ = writeln!(out, "  and {} more (all in --json)", missed.len() - SHOWN);
        }
    }
    if let Some(a) = r.results.first().and_then(|res| res.attribution.as_ref())
        && a.ranges > 0
    {
        let _ = writeln!(
            out,
            "\nattribution: the faulted node ranked first in {} of {} found single-node ranges ({:.1} %)",
            a.top1,
            a.ranges,
            100.0 * a.top1_share
        );
        let kinds: Vec<String> = a
            .named_by_kind
            .iter()
            .map(|(k, (found, named))| format!("{k} {named}/{found}"))
            .collect();
        let _ = writeln!(
            out,
            "named first by a flagged window inside the range in {} of {} ({})",
            a.named,
            a.ranges,
            kinds.join(", ")
        );
        let _ = writeln!(
            out,
            "time step: where the faulted node has a window's largest model error, it peaks inside the range in {} of {} windows",
            a.peak_inside, a.top_error_windows
        );
    }
    let _ = writeln!(out, "\n({:.1} s)", r.elapsed_s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribution_ranks_by_summed_errors_and_counts_windows_that_name_the_node() {
        const CAD: i64 = 300_000;
        let cell: Arc<str> = Arc::from("c");
        let scores = |a: f64, b: f64| vec![(Arc::from("a"), a), (Arc::from("b"), b)];
        // Window ends; a window's flagged step is the one before its end.
        // `peak`: the step where the window's largest model error peaks.
        let window = |end: i64, spikes_ms: Vec<i64>, per_node: NodeScores, peak: i64| {
            let top = per_node.iter().max_by(|x, y| x.1.total_cmp(&y.1)).unwrap();
            FlaggedWindow {
                end_ms: end * CAD,
                spikes_ms,
                top_error: Some((Arc::clone(&top.0), peak * CAD)),
                per_node,
            }
        };
        let run = CellRun {
            attributions: vec![
                window(2, vec![], scores(1.0, 3.0), 1),
                // a's largest error, peaking before a's range.
                window(3, vec![], scores(4.0, 0.0), 0),
                window(5, vec![], scores(1.0, 2.0), 4),
                window(6, vec![], scores(2.0, 0.5), 5),
                // Its last step is 8, outside the spike's range; its spike at 7 is inside.
                window(9, vec![7 * CAD], scores(0.5, 3.0), 7),
            ],
            ..CellRun::default()
        };
        let runs = vec![HashMap::from([(Arc::clone(&cell), run)])];
        let range = |node: &str, kind: &str, from: i64, to: i64| SingleNodeRange {
            track: 0,
            node: node.into(),
            kind: kind.into(),
            start_ms: from * CAD,
            end_ms: to * CAD,
        };
        let ranges = [
            // a: summed 5 against b's 3, and first in the second window.
            range("a", "drift", 1, 3),
            // b: summed 2.5 against a's 3, but first in the window ending at 5.
            range("b", "stuck", 4, 6),
            // Nothing flagged inside: not found, not counted.
            range("b", "stuck", 10, 12),
            // Found by the spike a later window told.
            range("b", "spike", 7, 8),
        ];
        let a = attribution(&[(0, cell)], &runs, &ranges, CAD);
        assert_eq!((a.ranges, a.top1, a.named), (3, 2, 3));
        assert_eq!(a.named_by_kind["drift"], (1, 1));
        assert_eq!(a.named_by_kind["stuck"], (1, 1));
        assert_eq!(a.named_by_kind["spike"], (1, 1));
        // The faulted node's largest error in windows 3 (peak at 0, outside), 5 and 9 (inside).
        assert_eq!((a.top_error_windows, a.peak_inside), (3, 2));
    }

    #[test]
    fn fit_threshold_interpolates_like_numpy() {
        // numpy.quantile([1, 2, 3, 4], 0.5) = 2.5; 0.999 of 1..=1000 = 999.001.
        assert_eq!(fit_threshold(&[4.0, 1.0, 3.0, 2.0], 0.5, 1.0), Some(2.5));
        let s: Vec<f64> = (1..=1000).map(f64::from).collect();
        let q = fit_threshold(&s, 0.999, 1.0).unwrap();
        assert!((q - 999.001).abs() < 1e-9, "{q}");
        assert_eq!(fit_threshold(&[2.0], 0.999, 4.0 / 3.0), Some(8.0 / 3.0));
        assert_eq!(fit_threshold(&[f64::NAN], 0.5, 1.0), None);
        assert_eq!(fit_threshold(&[], 0.5, 1.0), None);
    }

    #[test]
    fn fit_statistics_skip_missing_and_flat_channels() {
        let s = Series {
            name: "s".into(),
            path: "s.csv".into(),
            nodes: vec!["a".into()],
            channels: 2,
            times_ms: vec![0, 1, 2],
            values: vec![1.0, 5.0, 3.0, 5.0, f64::NAN, 5.0],
            row_labels: None,
        };
        let stats = fit_statistics(&s, 3, &[]);
        assert_eq!(stats[0], (2.0, 1.0));
        assert_eq!(stats[1], (5.0, 1.0), "a flat channel keeps std 1");
        let stats = fit_statistics(&s, 2, &[]);
        assert_eq!(stats[0], (2.0, 1.0));
        let stats = fit_statistics(&s, 3, &[0.5, 0.25]);
        assert_eq!(stats[1], (5.0, 0.25), "the trained floor applies");
    }
}
