//! demo: the whole job on one machine with nothing installed: librdkafka's in-process mock
//! cluster as the broker, the plant simulator as the producer, the real pipeline and model, and
//! a consumer of the anomaly topic that prints what a SOC analyst would see.
//!
//! Invariant: the summary's precision and recall compare the events *read back from the anomaly
//! topic* with the faults the simulator injected, using [`matches()`]; nothing is taken from the
//! pipeline's own view of what it published.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::config::{ClientRole, Config, TopicConfig};
use crate::decode::PayloadKind;
use crate::pipeline::{self, Scoring};
use crate::schema::{AnomalyEvent, Severity, WireFormat};
use crate::simulate::{self, Fault, Plant, PlantSpec, PublishSpec, SimReport};
use crate::tail::{self, utc};
use crate::telemetry::{Stats, StatsSnapshot};

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long the plant runs at `speed`: it publishes `duration × speed` of event time, a
    /// fixed number of steps, however long a busy machine takes for them.
    pub duration: Duration,
    /// Event-time seconds per wall second.
    pub speed: f64,
    pub seed: u64,
    /// Every this many steps, inject one of each kind of bad input.
    pub bad_input_every: Option<u64>,
    /// Print each event and fault as it happens.
    pub verbose: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(60),
            speed: 10.0,
            seed: 7,
            bad_input_every: Some(100),
            verbose: true,
        }
    }
}

/// Topics of the demo cluster.
pub const READINGS: &str = "readings";
pub const NODES: &str = "spatial-nodes";

/// Whether an event found a fault: same cell, and the steps the event scored overlap the fault
/// or the window after it (a fault still inside a window's history can make it anomalous).
pub fn matches(event: &AnomalyEvent, fault: &Fault, scored_ms: i64, window_ms: i64) -> bool {
    let scored = (event.window_end_ms - scored_ms, event.window_end_ms);
    let affected = (fault.start_ms, fault.end_ms + window_ms);
    event.cell_id == fault.cell_id && scored.0 < affected.1 && affected.0 < scored.1
}

/// Precision and recall of events against faults.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Quality {
    pub events: usize,
    pub true_events: usize,
    pub faults: usize,
    pub faults_found: usize,
    /// Mean event time from fault start to the end of the first window that found it.
    pub mean_delay_ms: f64,
}

impl Quality {
    pub fn precision(&self) -> f64 {
        if self.events == 0 {
            1.0
        } else {
            self.true_events as f64 / self.events as f64
        }
    }

    pub fn recall(&self) -> f64 {
        if self.faults == 0 {
            1.0
        } else {
            self.faults_found as f64 / self.faults as f64
        }
    }

    pub fn compute(
        events: &[AnomalyEvent],
        faults: &[Fault],
        scored_ms: i64,
        window_ms: i64,
    ) -> Self {
        let true_events = events
            .iter()
            .filter(|e| faults.iter().any(|f| matches(e, f, scored_ms, window_ms)))
            .count();
        let delays: Vec<i64> = faults
            .iter()
            .filter_map(|f| {
                events
                    .iter()
                    .filter(|e| matches(e, f, scored_ms, window_ms))
                    .map(|e| e.window_end_ms - f.start_ms)
                    .min()
            })
            .collect();
        Self {
            events: events.len(),
            true_events,
            faults: faults.len(),
            faults_found: delays.len(),
            mean_delay_ms: if delays.is_empty() {
                0.0
            } else {
                delays.iter().sum::<i64>() as f64 / delays.len() as f64
            },
        }
    }
}

/// Everything the demo's summary reports.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub stats: StatsSnapshot,
    pub sim: SimReport,
    pub events: Vec<AnomalyEvent>,
    pub faults_scored: Vec<Fault>,
    pub quality: Quality,
    pub dead_letters: Vec<(String, u64)>,
    pub model: String,
    pub provider: &'static str,
}

/// Runs the demo until `options.duration` passes or `cancel` fires, then drains and summarises.
pub async fn run(
    mut config: Config,
    options: DemoOptions,
    cancel: CancellationToken,
) -> anyhow::Result<DemoSummary> {
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(READINGS, 3, 1)?;
    cluster.create_topic(NODES, 1, 1)?;
    cluster.create_topic(&config.sink.events_topic, 3, 1)?;
    cluster.create_topic(&config.sink.dead_letter_topic, 1, 1)?;
    config
        .kafka
        .insert("bootstrap.servers".into(), cluster.bootstrap_servers());
    config.source.topics = vec![TopicConfig {
        name: READINGS.into(),
        payload: PayloadKind::Batch,
    }];
    config.registry.topic = NODES.into();
    // The plant runs faster than the wall clock: its event time is ahead by design.
    config.assemble.max_future = Duration::ZERO;
    let client = pipeline::client_config(&config, ClientRole::Producer);

    let loaded = pipeline::load_model(&config)?;
    let model = loaded.model.contract.label();
    let provider = loaded.model.provider;
    let cadence = loaded.spec.cadence_ms;
    let scored_ms = loaded.spec.hop_steps as i64 * cadence;
    let window_ms = loaded.spec.window_steps as i64 * cadence;
    let lateness_ms = loaded.spec.allowed_lateness_ms;

    // Event time starts now, on a step boundary, so event timestamps look current.
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let plant = Plant::new(PlantSpec {
        cadence_ms: cadence,
        start_ms: now_ms - now_ms.rem_euclid(window_ms),
        seed: options.seed,
        ..PlantSpec::default()
    });
    let publish = PublishSpec {
        readings_topic: READINGS.into(),
        nodes_topic: NODES.into(),
        payload: PayloadKind::Batch,
        wire_format: config.source.wire_format,
        speed: options.speed,
        // A fixed number of steps, not "whatever fits in the duration": the same seed gives the
        // same readings, faults and bad input on a fast machine and a busy one.
        steps: Some(
            (options.duration.as_secs_f64() * options.speed * 1000.0 / cadence as f64).round()
                as u64,
        ),
        bad_input_every: options.bad_input_every,
    };
    simulate::publish_nodes(&client, &plant, &publish).await?;

    let running = pipeline::spawn(&config, loaded, Arc::new(Stats::default()), Scoring::On);
    let stats = Arc::clone(&running.stats);
    let stop_tail = CancellationToken::new();
    let tailed = Arc::new(AtomicUsize::new(0));
    let tail_task = tokio::spawn(tail(
        pipeline::client_config(&config, ClientRole::Consumer),
        config.sink.events_topic.clone(),
        config.sink.wire_format,
        options.verbose,
        Arc::clone(&tailed),
        stop_tail.clone(),
    ));

    if options.verbose {
        println!(
            "gridwatch demo: {} lines x {} machines, model {model} on {provider}, {}x real time for {:?}",
            plant.spec().lines,
            plant.spec().machines_per_line,
            options.speed,
            options.duration
        );
    }
    let stop_sim = CancellationToken::new();
    let mut sim_task = {
        let (client, stop, verbose) = (client.clone(), stop_sim.clone(), options.verbose);
        tokio::spawn(async move {
            simulate::publish_readings(&client, plant, &publish, stop, |f| {
                if verbose {
                    println!(
                        "{}  {:<8} fault    {} on {} (until {})",
                        utc(f.start_ms),
                        f.cell_id,
                        f.kind.as_str(),
                        f.node_id,
                        utc(f.end_ms)
                    );
                }
            })
            .await
        })
    };
    let sim = tokio::select! {
        done = &mut sim_task => done??,
        _ = cancel.cancelled() => {
            stop_sim.cancel();
            sim_task.await??
        }
    };
    // Let the pipeline catch up with what was published, then drain it.
    let settle = tokio::time::Instant::now() + Duration::from_secs(10);
    while stats.snapshot().messages_consumed < sim.messages && tokio::time::Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.cancel.cancel();
    running.task.await??;
    let published = stats.events_total() as usize;
    let settle = tokio::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        if tailed.load(Ordering::Acquire) >= published || tokio::time::Instant::now() > settle {
            stop_tail.cancel();
            break tail_task.await??;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A fault counts once the detector could have scored it: its first step closed and a window
    // ending after it was due before the last published step.
    let horizon = sim.end_ms - lateness_ms - 2 * scored_ms;
    let faults_scored: Vec<Fault> = sim
        .faults
        .iter()
        .filter(|f| f.start_ms + scored_ms <= horizon)
        .cloned()
        .collect();
    let quality = Quality::compute(&events, &faults_scored, scored_ms, window_ms);
    let dead_letters = crate::schema::DeadLetterReason::ALL
        .iter()
        .map(|r| (r.as_str().to_owned(), stats.dead_lettered(*r)))
        .filter(|(_, n)| *n > 0)
        .collect();
    drop(cluster);
    Ok(DemoSummary {
        stats: stats.snapshot(),
        sim,
        events,
        faults_scored,
        quality,
        dead_letters,
        model,
        provider,
    })
}

/// Reads the anomaly topic from the beginning, printing each event, until `stop`.
async fn tail(
    client: ClientConfig,
    topic: String,
    format: WireFormat,
    verbose: bool,
    seen: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<AnomalyEvent>> {
    let mut events = Vec::new();
    tail::follow(
        client,
        &topic,
        format,
        true,
        &tail::Filter::default(),
        stop,
        |event| {
            if verbose {
                println!("{}", tail::event_line(&event));
            }
            events.push(event);
            seen.store(events.len(), Ordering::Release);
        },
    )
    .await?;
    Ok(events)
}

/// The end-of-run summary as text.
pub fn summary_text(s: &DemoSummary) -> String {
    let q = &s.quality;
    let mut out = String::new();
    let severities: Vec<String> = Severity::ALL
        .iter()
        .map(|sev| {
            let n = s.events.iter().filter(|e| e.severity == *sev).count();
            format!("{} {n}", sev.as_str())
        })
        .collect();
    let letters: Vec<String> = s
        .dead_letters
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    out.push_str("\n── gridwatch demo summary ──\n");
    out.push_str(&format!(
        "model               {} ({})\n",
        s.model, s.provider
    ));
    out.push_str(&format!(
        "simulated           {} steps, {} readings in {} messages, {} faults injected\n",
        s.sim.steps,
        s.sim.readings,
        s.sim.messages,
        s.sim.faults.len()
    ));
    out.push_str(&format!(
        "readings consumed   {} decoded from {} messages, {} accepted\n",
        s.stats.readings_decoded, s.stats.messages_consumed, s.stats.readings_accepted
    ));
    out.push_str(&format!(
        "dead-lettered       {} ({})\n",
        s.stats.dead_lettered,
        if letters.is_empty() {
            "none".into()
        } else {
            letters.join(", ")
        }
    ));
    out.push_str(&format!(
        "windows scored      {} in {} batches ({} skipped: warm-up or too sparse)\n",
        s.stats.windows_scored, s.stats.inference_batches, s.stats.windows_skipped
    ));
    out.push_str(&format!(
        "events published    {} ({})\n",
        s.stats.events_published,
        severities.join(", ")
    ));
    out.push_str(&format!(
        "precision           {:.2}  ({} of {} events overlap an injected fault)\n",
        q.precision(),
        q.true_events,
        q.events
    ));
    out.push_str(&format!(
        "recall              {:.2}  ({} of {} scoreable faults found; mean delay {:.1} s event time)\n",
        q.recall(),
        q.faults_found,
        q.faults,
        q.mean_delay_ms / 1000.0
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::FaultKind;

    fn event(cell: &str, end_ms: i64) -> AnomalyEvent {
        AnomalyEvent::sample(cell, end_ms)
    }

    fn fault(cell: &str, start_ms: i64, end_ms: i64) -> Fault {
        Fault {
            cell_id: cell.into(),
            node_id: "n".into(),
            kind: FaultKind::Bearing,
            start_ms,
            end_ms,
        }
    }

    #[test]
    fn precision_and_recall_by_hand() {
        let faults = [fault("a", 100_000, 130_000), fault("b", 200_000, 220_000)];
        let events = [
            event("a", 104_000), // scores 100..104 s: inside the fault
            event("a", 148_000), // 144..148 s: within one window after the end (146 s)
            event("a", 150_000), // 146..150 s: too late, false
            event("b", 104_000), // wrong time for b
        ];
        let q = Quality::compute(&events, &faults, 4_000, 16_000);
        assert_eq!(
            (q.events, q.true_events, q.faults, q.faults_found),
            (4, 2, 2, 1)
        );
        assert_eq!(q.precision(), 0.5);
        assert_eq!(q.recall(), 0.5);
        assert_eq!(q.mean_delay_ms, 4_000.0);
    }
}
