//! The injector's planner: where each fault goes and what it writes, drawn from one seeded
//! generator. Nothing is written here; [`super::inject`] writes the plans once all of them fit.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{FaultKind, FaultParams, IncidentNeighbour, InjectConfig};

/// A fault decided but not yet written.
pub(super) struct Plan {
    pub(super) kind: FaultKind,
    /// Column indices, primary first.
    pub(super) nodes: Vec<usize>,
    pub(super) start_row: usize,
    pub(super) end_row: usize,
    pub(super) params: FaultParams,
    /// `(row, column, new value)`.
    pub(super) writes: Vec<(usize, usize, f64)>,
}

/// Draws and places faults on the original readings, remembering what each column holds.
pub(super) struct Planner<'a> {
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
pub(super) fn drift_bias(t: usize, bias: f64, ramp_rows: usize) -> f64 {
    bias * ((t as f64 + 1.0) / ramp_rows.max(1) as f64).min(1.0)
}

/// A fault that holds column `node` at `value` for `duration` rows from `start` (stuck, dropout).
fn held(
    kind: FaultKind,
    node: usize,
    start: usize,
    duration: usize,
    value: f64,
    params: FaultParams,
) -> Plan {
    Plan {
        kind,
        nodes: vec![node],
        start_row: start,
        end_row: start + duration,
        params,
        writes: (start..start + duration)
            .map(|r| (r, node, value))
            .collect(),
    }
}

/// Clamps without `f64::clamp`'s panic on a bad range.
fn clamp(x: f64, [lo, hi]: [f64; 2]) -> f64 {
    x.max(lo).min(hi)
}

impl<'a> Planner<'a> {
    /// A planner over `values` (`rows × nodes.len()`, row-major), drawing from `config.seed`.
    pub(super) fn new(values: &'a [f64], nodes: &'a [String], config: &'a InjectConfig) -> Self {
        let n = nodes.len();
        Self {
            values,
            nodes,
            n,
            config,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            busy: vec![Vec::new(); n],
            neighbours: Vec::new(),
            primaries: Vec::new(),
        }
    }

    /// Finds each column's incident neighbours in `adjacency` (`n × n`, row-major).
    pub(super) fn find_neighbours(&mut self, adjacency: &[f64]) {
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
    pub(super) fn place(&mut self, kind: FaultKind) -> Option<Plan> {
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
        let params = FaultParams::Stuck { value };
        Some(held(FaultKind::Stuck, node, start, duration, value, params))
    }

    fn try_dropout(&mut self) -> Option<Plan> {
        let duration = self.draw_rows(self.config.dropout.duration_rows);
        let (node, start) = self.single(duration)?;
        let blank = self.config.dropout.blank;
        let value = if blank { f64::NAN } else { 0.0 };
        let params = FaultParams::Dropout { blank };
        Some(held(
            FaultKind::Dropout,
            node,
            start,
            duration,
            value,
            params,
        ))
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
