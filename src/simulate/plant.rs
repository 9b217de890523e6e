//! A deterministic model of a small plant: production lines (cells) of machines (nodes), each
//! reporting vibration, temperature, pressure and current once per step, with faults injected
//! at seeded random times.
//!
//! Invariant: the same [`PlantSpec`] and seed produce the same readings and the same fault list,
//! bit for bit, whatever the wall clock says; event time is `start_ms + step * cadence_ms`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The channels every simulated machine reports, in model order, with units.
pub const CHANNELS: [(&str, &str); 4] = [
    ("vibration_rms", "mm/s"),
    ("temperature", "degC"),
    ("pressure", "bar"),
    ("current", "A"),
];

/// Shape of the simulated plant.
#[derive(Debug, Clone)]
pub struct PlantSpec {
    /// Number of production lines; each is one cell.
    pub lines: usize,
    /// Machines per line (nodes per cell).
    pub machines_per_line: usize,
    /// Event-time distance between two readings of one machine.
    pub cadence_ms: i64,
    /// Event time of step 0.
    pub start_ms: i64,
    /// Mean number of steps between two faults on one line; `None` disables faults.
    pub mean_steps_between_faults: Option<u64>,
    /// No fault starts before this many steps (lets windows fill first).
    pub warmup_steps: u64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for PlantSpec {
    fn default() -> Self {
        Self {
            lines: 3,
            machines_per_line: 5,
            cadence_ms: 1_000,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            mean_steps_between_faults: Some(150),
            warmup_steps: 60,
            seed: 7,
        }
    }
}

/// A fault the simulator injected, the ground truth the demo's precision and recall use.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub cell_id: String,
    pub node_id: String,
    pub kind: FaultKind,
    /// Event time of the first affected reading.
    pub start_ms: i64,
    /// Event time just after the last affected reading.
    pub end_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Bearing wear: vibration jumps and keeps rising.
    Bearing,
    /// Cooling loss: temperature climbs quickly.
    Overheating,
    /// Cavitation: pressure drops, vibration gets noisy.
    Cavitation,
    /// Winding fault: current jumps.
    Overcurrent,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Bearing => "bearing",
            FaultKind::Overheating => "overheating",
            FaultKind::Cavitation => "cavitation",
            FaultKind::Overcurrent => "overcurrent",
        }
    }
}

/// One simulated reading: node, event time and the four channel values in [`CHANNELS`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReading {
    pub cell_id: String,
    pub node_id: String,
    pub event_time_ms: i64,
    pub values: [f64; 4],
}

/// A machine's fixed operating point.
#[derive(Debug, Clone)]
struct Machine {
    node_id: String,
    vibration0: f64,
    temperature0: f64,
    pressure0: f64,
    current0: f64,
    /// First-order lag state of temperature following load.
    thermal: f64,
}

#[derive(Debug, Clone)]
struct Line {
    cell_id: String,
    phase: f64,
    /// Shared AR(1) load disturbance of the line.
    disturbance: f64,
    machines: Vec<Machine>,
    next_fault_step: Option<u64>,
    active: Option<ActiveFault>,
}

#[derive(Debug, Clone)]
struct ActiveFault {
    machine: usize,
    kind: FaultKind,
    start_step: u64,
    end_step: u64,
}

/// The plant: call [`Plant::step`] to get the next step's readings.
pub struct Plant {
    spec: PlantSpec,
    rng: ChaCha8Rng,
    lines: Vec<Line>,
    step: u64,
    faults: Vec<Fault>,
}

/// Standard normal sample (Box-Muller), kept local so the stream of draws never changes with a
/// dependency upgrade.
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Exponentially distributed gap with the given mean, at least 1.
fn gap(rng: &mut ChaCha8Rng, mean: u64) -> u64 {
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    ((-u.ln()) * mean as f64).round().max(1.0) as u64
}

/// Identifier of line `line` (0-based) as a cell id.
pub fn cell_id(line: usize) -> String {
    format!("line-{}", line + 1)
}

/// Identifier of machine `machine` of line `line` (both 0-based).
pub fn node_id(line: usize, machine: usize) -> String {
    format!("line-{}/m{:02}", line + 1, machine + 1)
}

impl Plant {
    pub fn new(spec: PlantSpec) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let lines = (0..spec.lines)
            .map(|l| {
                let phase = rng.random::<f64>() * std::f64::consts::TAU;
                // The plant is already running: temperatures start at their steady state.
                let load0 = 0.7 + 0.2 * phase.sin();
                let machines = (0..spec.machines_per_line)
                    .map(|m| Machine {
                        node_id: node_id(l, m),
                        vibration0: 1.8 + 0.6 * rng.random::<f64>(),
                        temperature0: 55.0 + 10.0 * rng.random::<f64>(),
                        pressure0: 4.0 + 1.0 * rng.random::<f64>(),
                        current0: 20.0 + 8.0 * rng.random::<f64>(),
                        thermal: load0,
                    })
                    .collect();
                let next_fault_step = spec
                    .mean_steps_between_faults
                    .map(|mean| spec.warmup_steps + gap(&mut rng, mean));
                Line {
                    cell_id: cell_id(l),
                    phase,
                    disturbance: 0.0,
                    machines,
                    next_fault_step,
                    active: None,
                }
            })
            .collect();
        Self {
            spec,
            rng,
            lines,
            step: 0,
            faults: Vec::new(),
        }
    }

    pub fn spec(&self) -> &PlantSpec {
        &self.spec
    }

    /// Event time of the step [`Plant::step`] will produce next.
    pub fn next_event_time_ms(&self) -> i64 {
        self.spec.start_ms + self.step as i64 * self.spec.cadence_ms
    }

    /// Faults started so far (a fault is listed from its first step on).
    pub fn faults(&self) -> &[Fault] {
        &self.faults
    }

    /// All (cell, node) pairs of the plant.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().flat_map(|line| {
            line.machines
                .iter()
                .map(move |m| (line.cell_id.as_str(), m.node_id.as_str()))
        })
    }

    /// Produces one reading per machine for the next step.
    pub fn step(&mut self) -> Vec<SimReading> {
        let step = self.step;
        let t_ms = self.next_event_time_ms();
        let cadence_s = self.spec.cadence_ms as f64 / 1000.0;
        let t_s = step as f64 * cadence_s;
        let mut out = Vec::with_capacity(self.spec.lines * self.spec.machines_per_line);
        for line in &mut self.lines {
            Self::schedule_fault(
                &mut self.rng,
                &self.spec,
                line,
                step,
                t_ms,
                &mut self.faults,
            );
            line.disturbance = 0.97 * line.disturbance + 0.02 * gaussian(&mut self.rng);
            let load = 0.7
                + 0.2 * (std::f64::consts::TAU * t_s / 300.0 + line.phase).sin()
                + line.disturbance;
            for (index, machine) in line.machines.iter_mut().enumerate() {
                // Temperature follows load with a 60 s first-order lag.
                let alpha = (cadence_s / 60.0).min(1.0);
                machine.thermal += alpha * (load - machine.thermal);
                let mut values = [
                    machine.vibration0 + 1.2 * load + 0.15 * gaussian(&mut self.rng),
                    machine.temperature0 + 10.0 * machine.thermal + 0.2 * gaussian(&mut self.rng),
                    machine.pressure0 + 1.5 * load + 0.05 * gaussian(&mut self.rng),
                    machine.current0 + 8.0 * load + 0.3 * gaussian(&mut self.rng),
                ];
                if let Some(fault) = &line.active
                    && fault.machine == index
                {
                    let progress = (step - fault.start_step) as f64
                        / (fault.end_step - fault.start_step) as f64;
                    apply_fault(fault.kind, progress, &mut values, &mut self.rng);
                }
                out.push(SimReading {
                    cell_id: line.cell_id.clone(),
                    node_id: machine.node_id.clone(),
                    event_time_ms: t_ms,
                    values,
                });
            }
            if line.active.as_ref().is_some_and(|f| step + 1 >= f.end_step) {
                line.active = None;
            }
        }
        self.step += 1;
        out
    }

    fn schedule_fault(
        rng: &mut ChaCha8Rng,
        spec: &PlantSpec,
        line: &mut Line,
        step: u64,
        t_ms: i64,
        faults: &mut Vec<Fault>,
    ) {
        let (Some(mean), Some(next)) = (spec.mean_steps_between_faults, line.next_fault_step)
        else {
            return;
        };
        if step < next || line.active.is_some() {
            return;
        }
        let machine = rng.random_range(0..line.machines.len());
        let kind = match rng.random_range(0..4) {
            0 => FaultKind::Bearing,
            1 => FaultKind::Overheating,
            2 => FaultKind::Cavitation,
            _ => FaultKind::Overcurrent,
        };
        let duration = rng.random_range(20..=40u64);
        line.active = Some(ActiveFault {
            machine,
            kind,
            start_step: step,
            end_step: step + duration,
        });
        faults.push(Fault {
            cell_id: line.cell_id.clone(),
            node_id: line.machines[machine].node_id.clone(),
            kind,
            start_ms: t_ms,
            end_ms: t_ms + duration as i64 * spec.cadence_ms,
        });
        // The next fault starts at least two fault lengths after this one ends.
        line.next_fault_step = Some(step + 3 * duration + gap(rng, mean));
    }
}

/// Distorts one machine's values for a fault that is `progress` (0..1) through its course.
fn apply_fault(kind: FaultKind, progress: f64, values: &mut [f64; 4], rng: &mut ChaCha8Rng) {
    match kind {
        FaultKind::Bearing => values[0] += 1.5 + 2.0 * progress,
        FaultKind::Overheating => values[1] += 3.0 + 9.0 * progress,
        FaultKind::Cavitation => {
            values[2] -= 0.5;
            values[0] += 0.8 * gaussian(rng).abs();
        }
        FaultKind::Overcurrent => values[3] += 4.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_plant() {
        let run = |seed| {
            let mut plant = Plant::new(PlantSpec {
                seed,
                ..PlantSpec::default()
            });
            let readings: Vec<_> = (0..600).flat_map(|_| plant.step()).collect();
            (readings, plant.faults().to_vec())
        };
        let (a, fa) = run(1);
        let (b, fb) = run(1);
        let (c, _) = run(2);
        assert_eq!(a, b);
        assert_eq!(fa, fb);
        assert_ne!(a, c);
        assert!(
            !fa.is_empty(),
            "600 steps with faults every ~150 steps must inject some"
        );
    }

    #[test]
    fn fault_interval_is_reported_in_event_time() {
        let spec = PlantSpec {
            lines: 1,
            mean_steps_between_faults: Some(10),
            warmup_steps: 5,
            ..PlantSpec::default()
        };
        let mut faulty = Plant::new(spec.clone());
        let readings: Vec<_> = (0..60).flat_map(|_| faulty.step()).collect();
        let fault = faulty.faults()[0].clone();
        assert!(fault.start_ms >= spec.start_ms + 5 * spec.cadence_ms);
        let during: Vec<_> = readings
            .iter()
            .filter(|r| r.event_time_ms >= fault.start_ms && r.event_time_ms < fault.end_ms)
            .collect();
        let steps = ((fault.end_ms - fault.start_ms) / spec.cadence_ms) as usize;
        assert!((20..=40).contains(&steps));
        assert_eq!(during.len(), spec.machines_per_line * steps);
    }

    #[test]
    fn no_faults_when_disabled() {
        let mut plant = Plant::new(PlantSpec {
            mean_steps_between_faults: None,
            ..PlantSpec::default()
        });
        for _ in 0..1_000 {
            plant.step();
        }
        assert!(plant.faults().is_empty());
    }
}
