//! Detection-quality metrics of `gridwatch eval`, computed from flags and labels alone.
//!
//! Invariants:
//! - The unit of the point-wise metrics is one (cell, step) of the test part: its label is 1
//!   when the step is labelled anomalous for that cell, and it is flagged when the window that
//!   ends with that step was anomalous. Nothing is point-adjusted: a labelled range counts
//!   every one of its points, found or not.
//! - A labelled range is *found* when any flagged point of one of its cells lies inside it, or
//!   a *late finding* names a step inside it: a flagged point whose window found something at
//!   an earlier step (a spike, which the check can only tell once the step after it is in).
//!   Its detection delay is the time from its start to the first such point (for a late
//!   finding, the point that flagged it, not the step it names). Late findings change no
//!   point-wise figure: those stay with the flagged point.
//! - An *alarm* is a run of flagged points of one cell, runs closer than `merge_gap` steps
//!   counting as one (what one incident would be); an alarm that covers no labelled point, and
//!   holds no late finding of one, is a false alarm.
//! - Every ratio with an empty denominator is 0, never NaN, so a JSON report always parses.

use serde::Serialize;

/// The test points of one cell of one series, in time order at a fixed cadence.
#[derive(Debug, Clone, Default)]
pub struct Track {
    /// Index of the series (input file) the cell belongs to.
    pub series: usize,
    pub cadence_ms: i64,
    /// Start time of each point's step.
    pub times_ms: Vec<i64>,
    pub labels: Vec<bool>,
    pub flagged: Vec<bool>,
    /// Late findings: (start of the step found anomalous, start of the flagged point's step
    /// that found it).
    pub late: Vec<(i64, i64)>,
}

impl Track {
    /// The label of the point whose step starts at `t_ms`; false for a time it has no point of.
    fn label_at(&self, t_ms: i64) -> bool {
        (self.times_ms.binary_search(&t_ms)).is_ok_and(|i| self.labels[i])
    }
}

/// One labelled anomaly: a time range on some cells.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledRange {
    pub start_ms: i64,
    /// Exclusive.
    pub end_ms: i64,
    /// Indices of the tracks (cells) it concerns.
    pub tracks: Vec<usize>,
    /// What kind of anomaly it is (e.g. an injected fault's kind); may be empty.
    pub kind: String,
}

/// Labelled ranges of one kind, and how many were found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KindRecall {
    pub ranges: u64,
    pub found: u64,
}

/// A labelled range no flagged point lies in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MissedRange {
    pub start_ms: i64,
    pub end_ms: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
}

/// Every figure `gridwatch eval` reports for one detector.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metrics {
    pub points: u64,
    pub anomalous_points: u64,
    pub true_positives: u64,
    pub false_positives: u64,
    pub false_negatives: u64,
    pub true_negatives: u64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// False alarm rate: flagged normal points / normal points.
    pub far: f64,
    /// Missed alarm rate: unflagged anomalous points / anomalous points.
    pub mar: f64,
    pub ranges: u64,
    pub ranges_found: u64,
    pub event_recall: f64,
    pub alarms: u64,
    pub false_alarms: u64,
    /// Test time of the series, summed, in days.
    pub test_days: f64,
    /// Test time of every cell, summed, in days.
    pub cell_days: f64,
    pub false_alarms_per_day: f64,
    pub false_alarms_per_cell_day: f64,
    /// Over found ranges: start → first flagged point inside, in seconds.
    pub mean_delay_s: f64,
    pub median_delay_s: f64,
    /// Event recall per kind of labelled range (ranges with a kind only).
    pub by_kind: std::collections::BTreeMap<String, KindRecall>,
    /// The labelled ranges not found, in label order: where to look first.
    pub missed: Vec<MissedRange>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

const DAY_MS: f64 = 86_400_000.0;

/// The metrics of `tracks` against `ranges`; alarms closer than `merge_gap` steps are one.
pub fn compute(tracks: &[Track], ranges: &[LabelledRange], merge_gap: usize) -> Metrics {
    let mut m = Metrics::default();
    for t in tracks {
        for (&label, &flag) in t.labels.iter().zip(&t.flagged) {
            m.points += 1;
            match (label, flag) {
                (true, true) => m.true_positives += 1,
                (false, true) => m.false_positives += 1,
                (true, false) => m.false_negatives += 1,
                (false, false) => m.true_negatives += 1,
            }
        }
        for alarm in alarms(&t.flagged, merge_gap) {
            m.alarms += 1;
            let (from, to) = (t.times_ms[alarm.0], t.times_ms[alarm.1 - 1]);
            let finds_label =
                (t.late.iter()).any(|&(step, by)| by >= from && by <= to && t.label_at(step));
            if !t.labels[alarm.0..alarm.1].iter().any(|&l| l) && !finds_label {
                m.false_alarms += 1;
            }
        }
        m.cell_days += t.times_ms.len() as f64 * t.cadence_ms as f64 / DAY_MS;
    }
    m.anomalous_points = m.true_positives + m.false_negatives;
    let (tp, fp, fn_, tn) = (
        m.true_positives as f64,
        m.false_positives as f64,
        m.false_negatives as f64,
        m.true_negatives as f64,
    );
    m.precision = ratio(tp, tp + fp);
    m.recall = ratio(tp, tp + fn_);
    m.f1 = ratio(2.0 * m.precision * m.recall, m.precision + m.recall);
    m.far = ratio(fp, fp + tn);
    m.mar = ratio(fn_, fn_ + tp);

    // A series' test time is that of its longest cell.
    let mut series_ms: std::collections::BTreeMap<usize, f64> = Default::default();
    for t in tracks {
        let ms = t.times_ms.len() as f64 * t.cadence_ms as f64;
        let e = series_ms.entry(t.series).or_default();
        *e = e.max(ms);
    }
    m.test_days = series_ms.values().sum::<f64>() / DAY_MS;
    m.false_alarms_per_day = ratio(m.false_alarms as f64, m.test_days);
    m.false_alarms_per_cell_day = ratio(m.false_alarms as f64, m.cell_days);

    let mut delays = Vec::new();
    for r in ranges {
        m.ranges += 1;
        let first = r
            .tracks
            .iter()
            .filter_map(|&i| first_flag_in(&tracks[i], r.start_ms, r.end_ms))
            .min();
        let kind = (!r.kind.is_empty()).then(|| m.by_kind.entry(r.kind.clone()).or_default());
        if let Some(k) = kind {
            k.ranges += 1;
            k.found += u64::from(first.is_some());
        }
        match first {
            Some(at) => {
                m.ranges_found += 1;
                delays.push((at - r.start_ms).max(0) as f64 / 1000.0);
            }
            None => m.missed.push(MissedRange {
                start_ms: r.start_ms,
                end_ms: r.end_ms,
                kind: r.kind.clone(),
            }),
        }
    }
    m.event_recall = ratio(m.ranges_found as f64, m.ranges as f64);
    if !delays.is_empty() {
        m.mean_delay_s = delays.iter().sum::<f64>() / delays.len() as f64;
        delays.sort_by(f64::total_cmp);
        let mid = delays.len() / 2;
        m.median_delay_s = if delays.len() % 2 == 1 {
            delays[mid]
        } else {
            (delays[mid - 1] + delays[mid]) / 2.0
        };
    }
    m
}

/// Time of the first flagged point of `track` in `[start_ms, end_ms)`, or of the first point
/// whose late finding lies there, whichever is earlier.
fn first_flag_in(track: &Track, start_ms: i64, end_ms: i64) -> Option<i64> {
    let inside = |t: i64| t >= start_ms && t < end_ms;
    let flagged = (track.times_ms.iter().zip(&track.flagged))
        .find(|&(&t, &f)| f && inside(t))
        .map(|(&t, _)| t);
    let late = (track.late.iter())
        .filter(|&&(step, _)| inside(step))
        .map(|&(_, by)| by)
        .min();
    flagged.into_iter().chain(late).min()
}

/// Half-open index ranges of the alarms in `flags`: runs of flagged points, merged when fewer
/// than `merge_gap` unflagged points separate them.
pub fn alarms(flags: &[bool], merge_gap: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        if !flags[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < flags.len() && flags[i] {
            i += 1;
        }
        match out.last_mut() {
            Some(last) if start - last.1 < merge_gap => last.1 = i,
            _ => out.push((start, i)),
        }
    }
    out
}

/// Maximal runs of labelled points of a track, as ranges on it (for labels given per row).
pub fn label_runs(track: &Track, index: usize) -> Vec<LabelledRange> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < track.labels.len() {
        if !track.labels[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < track.labels.len() && track.labels[i] {
            i += 1;
        }
        out.push(LabelledRange {
            start_ms: track.times_ms[start],
            end_ms: track.times_ms[i - 1] + track.cadence_ms,
            tracks: vec![index],
            kind: String::new(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(labels: &str, flags: &str) -> Track {
        let bit = |c: char| c == '1';
        Track {
            series: 0,
            cadence_ms: 1_000,
            times_ms: (0..labels.len() as i64).map(|i| i * 1_000).collect(),
            labels: labels.chars().map(bit).collect(),
            flagged: flags.chars().map(bit).collect(),
            late: Vec::new(),
        }
    }

    #[test]
    fn point_metrics_by_hand() {
        // labels 0011110000, flags 0001100110:
        // TP = 2 (3, 4), FP = 2 (7, 8), FN = 2 (2, 5), TN = 4.
        let t = track("0011110000", "0001100110");
        let ranges = label_runs(&t, 0);
        let m = compute(&[t], &ranges, 0);
        assert_eq!(
            (
                m.true_positives,
                m.false_positives,
                m.false_negatives,
                m.true_negatives
            ),
            (2, 2, 2, 4)
        );
        assert_eq!(m.precision, 0.5);
        assert_eq!(m.recall, 0.5);
        assert_eq!(m.f1, 0.5);
        assert_eq!(m.far, 2.0 / 6.0);
        assert_eq!(m.mar, 0.5);
        // One range, found at point 3, one second after its start at point 2.
        assert_eq!((m.ranges, m.ranges_found), (1, 1));
        assert_eq!(m.mean_delay_s, 1.0);
        // Two alarms: points 3-4 (true) and 7-8 (false).
        assert_eq!((m.alarms, m.false_alarms), (2, 1));
        assert!((m.test_days - 10.0 / 86_400.0).abs() < 1e-15);
        assert!((m.false_alarms_per_day - 8_640.0).abs() < 1e-6);
    }

    #[test]
    fn no_point_adjust() {
        // One flagged point inside a long range: the range is found, but only one point counts.
        let t = track("0111111110", "0000100000");
        let ranges = label_runs(&t, 0);
        let m = compute(&[t], &ranges, 0);
        assert_eq!(m.true_positives, 1);
        assert_eq!(m.false_negatives, 7);
        assert_eq!(m.event_recall, 1.0);
        assert_eq!(m.recall, 1.0 / 8.0);
    }

    #[test]
    fn a_late_finding_finds_its_range_and_changes_no_point() {
        // A one-step range at point 3, flagged only at point 4 by a finding about point 3.
        let mut t = track("0001000000", "0000100000");
        let ranges = label_runs(&t, 0);
        let missed = compute(std::slice::from_ref(&t), &ranges, 0);
        assert_eq!(missed.ranges_found, 0);
        t.late = vec![(3_000, 4_000)];
        let m = compute(std::slice::from_ref(&t), &ranges, 0);
        assert_eq!((m.ranges_found, m.mean_delay_s), (1, 1.0));
        assert_eq!((m.true_positives, m.false_positives), (0, 1));
        assert_eq!(
            (m.alarms, m.false_alarms),
            (1, 0),
            "the alarm found the range"
        );
        assert_eq!((missed.alarms, missed.false_alarms), (1, 1));
        // A late finding outside the range finds nothing, and its alarm is false.
        t.late = vec![(2_000, 4_000)];
        let outside = compute(&[t], &ranges, 0);
        assert_eq!((outside.ranges_found, outside.false_alarms), (0, 1));
    }

    #[test]
    fn all_anomalous_and_nothing_flagged() {
        let all = compute(&[track("0110", "1111")], &[], 0);
        assert_eq!(
            (all.precision, all.recall, all.far, all.mar),
            (0.5, 1.0, 1.0, 0.0)
        );
        assert!((all.f1 - 2.0 / 3.0).abs() < 1e-12);
        let none = compute(&[track("0110", "0000")], &[], 0);
        assert_eq!((none.precision, none.recall, none.f1), (0.0, 0.0, 0.0));
        assert_eq!((none.far, none.mar), (0.0, 1.0));
        let empty = compute(&[], &[], 0);
        assert_eq!(empty, Metrics::default());
    }

    #[test]
    fn alarms_merge_across_short_gaps() {
        let flags: Vec<bool> = "1101000111".chars().map(|c| c == '1').collect();
        assert_eq!(alarms(&flags, 0), vec![(0, 2), (3, 4), (7, 10)]);
        assert_eq!(alarms(&flags, 2), vec![(0, 4), (7, 10)]);
        assert_eq!(alarms(&flags, 4), vec![(0, 10)]);
    }

    #[test]
    fn ranges_on_several_cells_and_delays() {
        // A range on cells 0 and 1 is found by cell 1 at t=3 s; a range on cell 0 only is
        // missed even though cell 1 flags inside it.
        let a = track("0011000000", "0000000000");
        let b = track("0000000000", "0001000110");
        let ranges = vec![
            LabelledRange {
                start_ms: 2_000,
                end_ms: 4_000,
                tracks: vec![0, 1],
                kind: "spike".into(),
            },
            LabelledRange {
                start_ms: 6_000,
                end_ms: 9_000,
                tracks: vec![0],
                kind: "spike".into(),
            },
        ];
        let m = compute(&[a, b], &ranges, 0);
        assert_eq!((m.ranges, m.ranges_found), (2, 1));
        assert_eq!(
            m.by_kind["spike"],
            KindRecall {
                ranges: 2,
                found: 1
            }
        );
        assert_eq!(m.mean_delay_s, 1.0);
        assert_eq!(m.median_delay_s, 1.0);
        assert_eq!(
            m.missed,
            [MissedRange {
                start_ms: 6_000,
                end_ms: 9_000,
                kind: "spike".into()
            }]
        );
        // Cell 1's two alarms cover no label of cell 1: both false.
        assert_eq!(m.false_alarms, 2);
        // One series of 10 s, two cells of 10 s each.
        assert!((m.false_alarms_per_cell_day * m.cell_days - 2.0).abs() < 1e-9);
        assert!((m.cell_days - 2.0 * m.test_days).abs() < 1e-15);
    }
}
