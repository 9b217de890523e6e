//! pipeline: wires source → decode → registry → assemble → infer → detect → sink.
//!
//! ```text
//!  consumer ──► reading task ──chunks──► ingest loop ──windows──► infer (batches, blocking pool)
//!  (group)      poll, decode             registry,   │                          │
//!                                        assemble    │                          ▼
//!                                          ▲         └─dead letters─► publisher  detect + publish
//!                                          │                            │ acks release holds
//!                                          └── store/commit what the ───┘ in the offset ledger
//!                                              ledger allows
//! ```
//!
//! Every arrow is a bounded channel, so a slow stage slows the consumer instead of growing
//! memory. The reading task runs beside the ingest loop, so that the two use both cores; it
//! holds nothing a commit depends on. Cancellation reaches only the reading task and the ingest
//! loop: they stop consuming and the loop closes its output channels; each later stage drains
//! what it has and ends when its input closes; then the final offsets are committed. See
//! `source` for the commit invariant this wiring upholds.
//!
//! This file loads, wires, drains and commits; `read.rs` is the reading task, `ingest.rs` the
//! consuming loop and `publish.rs` the judging task and the dead-letter publisher.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::assemble::{AssembleSpec, Assembler, Window};
use crate::changelog::{Changelog, JudgeStore};
use crate::config::{ClientRole, Config, TopicConfig};
use crate::decode::{self, Decoder, PayloadKind};
use crate::detect::{Detector, Judge};
use crate::infer::contract::Standardisation;
use crate::infer::{self, Inferred, Model, ModelContract};
use crate::registry::Registry;
use crate::schema::{self, SchemaIds};
use crate::sink::Sink;
use crate::source::{self, OffsetLedger, SourceContext, SourcePartitions};
use crate::table;
use crate::telemetry::{self, Health, Stats};

mod ingest;
mod publish;
mod read;

pub use ingest::refuse;
use ingest::{Ended, Ingest, PendingLetter};
use publish::{
    Endings, Judging, publish_dead_letters, publish_events, restore_judge_state, save_judge_state,
};
use read::Reader;

/// Most publishes awaiting acknowledgement at once, per publisher.
pub(super) const MAX_IN_FLIGHT: usize = 512;

/// librdkafka configuration for a client of `role`, from `[kafka]`.
pub fn client_config(config: &Config, role: ClientRole) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in config.kafka.for_role(role) {
        client.set(key, value);
    }
    client
}

/// What a finished run committed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunReport {
    /// Final committed offset per (topic, partition).
    pub committed: Vec<(String, i32, i64)>,
}

/// A model and what configuration derives from it: the window shape and the detector.
pub struct Loaded {
    pub model: Model,
    pub spec: AssembleSpec,
    pub detector: Detector,
}

/// The detector `config` asks for with the model `contract` describes, after checking that the
/// two fit: a streamable standardisation, step settings within the model's windows, scored
/// channels the model has. `gridwatch check-config` runs it without loading the model.
pub fn detector_for(config: &Config, contract: &ModelContract) -> anyhow::Result<Detector> {
    if contract.standardisation == Standardisation::PerSeriesFit {
        anyhow::bail!(
            "{}: the model expects every series standardised with its own fit-range statistics \
             (standardisation = \"per-series-fit\"), which `gridwatch eval` does; to stream with it, \
             write the site's channel mean and std into the contract and set standardisation to \"contract\"",
            config.model.contract.display()
        );
    }
    let step_settings = [
        (
            "[detect] flatline_steps",
            Some(config.detect.flatline_steps),
        ),
        (
            "[detect.divergence] steps",
            config.detect.divergence.as_ref().map(|d| d.steps),
        ),
        (
            "[detect.floor] steps",
            config.detect.floor.as_ref().map(|f| f.steps),
        ),
    ];
    for (setting, steps) in step_settings {
        if let Some(steps) = steps
            && steps > contract.window_steps
        {
            anyhow::bail!(
                "{setting} is {steps}: longer than the windows of {} ({} steps)",
                config.model.contract.display(),
                contract.window_steps
            );
        }
    }
    Detector::try_new(contract, &config.detect).map_err(anyhow::Error::msg)
}

/// Loads the configured model and derives the assembler's spec and the detector from it.
pub fn load_model(config: &Config) -> anyhow::Result<Loaded> {
    let model = Model::load(&config.model.contract, &config.model)?;
    let contract = &model.contract;
    let detector = detector_for(config, contract)?;
    let spec = AssembleSpec {
        cadence_ms: contract.cadence_ms,
        window_steps: contract.window_steps,
        hop_steps: contract.scored_steps,
        stagger: config.assemble.stagger_windows,
        channels: contract.channels.iter().map(|c| c.name.clone()).collect(),
        allowed_lateness_ms: config.assemble.allowed_lateness.as_millis() as i64,
        max_nodes: contract.max_nodes,
        min_observed_fraction: config.assemble.min_observed_fraction,
        max_cells: config.assemble.max_cells,
        idle_cell_ms: config.assemble.idle_cell_timeout.as_millis() as i64,
    };
    Ok(Loaded {
        model,
        spec,
        detector,
    })
}

/// Builds the reading decoder from `[source]`.
pub fn decoder(config: &Config) -> anyhow::Result<Decoder> {
    let load = |p: &Option<std::path::PathBuf>| -> anyhow::Result<Option<apache_avro::Schema>> {
        Ok(match p {
            Some(path) => Some(schema::load_schema_file(path)?),
            None => None,
        })
    };
    Ok(Decoder::new(
        config.source.wire_format,
        load(&config.source.reading_writer_schema)?,
        load(&config.source.batch_writer_schema)?,
        SchemaIds::load(&config.schema_ids())?,
    ))
}

/// Runs the job until `cancel` fires, then drains and commits.
pub async fn run(
    config: &Config,
    loaded: Loaded,
    stats: Arc<Stats>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> anyhow::Result<RunReport> {
    run_with(config, loaded, stats, health, cancel, Scoring::On).await
}

/// A pipeline running on its own task: its counters, health, stop switch and outcome.
pub struct Running {
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
    pub cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<RunReport>>,
}

/// Starts [`run_with`] on a task of its own, counting into `stats`.
pub fn spawn(config: &Config, loaded: Loaded, stats: Arc<Stats>, scoring: Scoring) -> Running {
    let health = Arc::new(Health::default());
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let (config, stats, health, cancel) = (
            config.clone(),
            Arc::clone(&stats),
            Arc::clone(&health),
            cancel.clone(),
        );
        async move { run_with(&config, loaded, stats, health, cancel, scoring).await }
    });
    Running {
        stats,
        health,
        cancel,
        task,
    }
}

/// Whether emitted windows are scored. `Off` measures ingest alone (benchmarks): windows are
/// counted and released as soon as they are emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    On,
    Off,
}

/// A job's inputs: the loaded registry (kept current by its task) and the group consumer.
pub struct Inputs {
    pub registry: Arc<Registry>,
    pub registry_task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub consumer: StreamConsumer<SourceContext>,
    /// The payload kind of each subscribed topic.
    pub kinds: HashMap<String, PayloadKind>,
}

/// Loads the registry (`load_registry`), then subscribes `group_id` to `topics`. `None` when
/// `cancel` fires first.
pub async fn connect(
    config: &Config,
    group_id: &str,
    topics: &[TopicConfig],
    health: &Arc<Health>,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<Inputs>> {
    let client = client_config(config, ClientRole::Consumer);
    let Some((registry, registry_task)) = load_registry(config, &client, health, cancel).await?
    else {
        return Ok(None);
    };
    let (consumer, kinds) = source::subscribe(
        client,
        group_id,
        topics,
        config.source.commit_interval,
        Arc::clone(health),
    )?;
    Ok(Some(Inputs {
        registry,
        registry_task,
        consumer,
        kinds,
    }))
}

/// Follows the spatial-node topic on a task of its own and waits until it has been read to its
/// end (`[registry] load_timeout`), then marks it in `health`. `None` when `cancel` fires first.
async fn load_registry(
    config: &Config,
    client: &ClientConfig,
    health: &Health,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<(Arc<Registry>, tokio::task::JoinHandle<anyhow::Result<()>>)>> {
    let resolution = h3o::Resolution::try_from(config.registry.h3_resolution)?;
    let registry = Arc::new(Registry::new(resolution, config.source.wire_format));
    let Some(registry_task) = table::load(
        &registry,
        client,
        &config.registry.topic,
        "gridwatch-registry",
        (config.registry.load_timeout, "[registry] load_timeout"),
        cancel,
        "spatial-node",
    )
    .await?
    else {
        return Ok(None);
    };
    tracing::info!(nodes = registry.len(), "Registry ready.");
    health.set_registry_loaded(true);
    health.set_broker_reachable(true);
    Ok(Some((registry, registry_task)))
}

/// [`run`], with scoring switched on or off.
pub async fn run_with(
    config: &Config,
    loaded: Loaded,
    stats: Arc<Stats>,
    health: Arc<Health>,
    cancel: CancellationToken,
    scoring: Scoring,
) -> anyhow::Result<RunReport> {
    health.set_model_loaded(true);
    telemetry::model_in_use(
        &loaded.model.contract.name,
        &loaded.model.contract.version,
        loaded.model.provider,
    );
    // The judge-state changelog is read before the group is joined: a cell's first window
    // must find its saved state there.
    let (judge_store, judge_store_task) = match &config.detect.changelog {
        None => (None, None),
        Some(changelog) => {
            let store = Arc::new(JudgeStore::default());
            let Some(task) = table::load(
                &store,
                &client_config(config, ClientRole::Consumer),
                &changelog.topic,
                "gridwatch-judge-state",
                (changelog.load_timeout, "[detect.changelog] load_timeout"),
                &cancel,
                "judge-state",
            )
            .await
            .map_err(|e| {
                e.context(format!(
                    "cannot read [detect.changelog] topic `{}` (create it beforehand, with cleanup.policy=compact)",
                    changelog.topic
                ))
            })?
            else {
                return Ok(RunReport::default());
            };
            tracing::info!(topic = %changelog.topic, cells = store.len(), "Judge-state changelog read.");
            (Some(store), Some(task))
        }
    };
    let Some(Inputs {
        registry,
        registry_task,
        consumer,
        kinds,
    }) = connect(
        config,
        &config.source.group_id,
        &config.source.topics,
        &health,
        &cancel,
    )
    .await?
    else {
        return Ok(RunReport::default());
    };

    let decoder = decoder(config)?;
    let sink = Arc::new(Sink::new(
        client_config(config, ClientRole::Producer),
        &config.sink,
    )?);
    let ledger = Arc::new(Mutex::new(OffsetLedger::default()));
    let capacity = config.pipeline.channel_capacity;
    let (windows_tx, windows_rx) = mpsc::channel::<Window>(capacity);
    let (inferred_tx, inferred_rx) = mpsc::channel::<Vec<Inferred>>(capacity.div_ceil(8).max(2));
    let (letters_tx, letters_rx) = mpsc::channel::<PendingLetter>(capacity);
    let (ended_tx, ended_rx) = mpsc::unbounded_channel::<Ended>();
    let failed = CancellationToken::new();

    let (reload_tx, reload_rx) = mpsc::channel::<Model>(1);
    let watcher = (!config.model.reload_interval.is_zero()).then(|| {
        tokio::spawn(infer::watch(
            config.model.contract.clone(),
            config.model.clone(),
            config.model.reload_interval,
            Arc::clone(&loaded.model.contract),
            reload_tx,
            cancel.child_token(),
        ))
    });
    let infer_stats = Arc::clone(&stats);
    let infer_task = match scoring {
        Scoring::On => tokio::spawn(infer::run_batches(
            loaded.model,
            windows_rx,
            inferred_tx,
            reload_rx,
            config.infer.max_batch,
            config.infer.max_wait,
            move |n, seconds| telemetry::batch_inferred(&infer_stats, n, seconds),
        )),
        Scoring::Off => {
            let (ledger, model) = (Arc::clone(&ledger), loaded.model);
            let mut windows_rx = windows_rx;
            tokio::spawn(async move {
                drop((inferred_tx, reload_rx));
                while let Some(window) = windows_rx.recv().await {
                    let mut ledger = ledger.lock().expect("ledger lock");
                    for &(p, o) in &window.holds {
                        ledger.release(p, o);
                    }
                    infer_stats.progress();
                }
                Ok(model)
            })
        }
    };
    let mut judge = Judge::new(loaded.detector, &config.detect);
    if let Some(path) = config.detect.state_file.as_deref() {
        restore_judge_state(&mut judge, path);
    }
    let changelog = config
        .detect
        .changelog
        .as_ref()
        .zip(judge_store)
        .map(|(c, store)| Changelog::new(store, c, Arc::clone(&sink)));
    let judging = Judging {
        judge,
        endings: Endings::new(ended_rx),
        changelog,
    };
    let publish_task = tokio::spawn(publish_events(
        inferred_rx,
        judging,
        Arc::clone(&sink),
        Arc::clone(&ledger),
        Arc::clone(&stats),
        failed.clone(),
    ));
    let letters_task = tokio::spawn(publish_dead_letters(
        letters_rx,
        Arc::clone(&sink),
        Arc::clone(&ledger),
        failed.clone(),
    ));

    let consumer = Arc::new(consumer);
    let (reader, handover) = Reader::new(decoder, SourcePartitions::new(kinds.clone()));
    let mut ingest = Ingest {
        registry: Arc::clone(&registry),
        assembler: Assembler::new(loaded.spec),
        partitions: SourcePartitions::new(kinds),
        ledger: Arc::clone(&ledger),
        stats: Arc::clone(&stats),
        policy: config.sink.bad_input,
        windows: windows_tx,
        sent: 0,
        ended: ended_tx,
        letters: letters_tx,
        scratch: Vec::new(),
        future: decode::FutureLimit::new(config.assemble.max_future),
    };
    let ingest_result = ingest
        .run(
            reader,
            handover,
            &consumer,
            config.source.commit_interval,
            &cancel,
            &failed,
        )
        .await;

    // Drain: closing the channels lets each later stage finish what it holds, in order.
    let Ingest {
        assembler,
        partitions,
        windows,
        letters,
        ..
    } = ingest;
    drop(windows);
    drop(letters);
    let drain = async {
        let infer_result = infer_task.await?;
        let publish_result = publish_task.await?;
        let letters_result = letters_task.await?;
        infer_result?;
        let judge = publish_result?;
        letters_result?;
        if let Some(path) = config.detect.state_file.as_deref() {
            save_judge_state(&judge, path);
        }
        anyhow::Ok(())
    };
    let drained = match tokio::time::timeout(config.pipeline.shutdown_timeout, drain).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!(
            "shutdown did not drain within {:?} ([pipeline] shutdown_timeout); committed only what was complete",
            config.pipeline.shutdown_timeout
        )),
    };
    // Whatever happened, the ledger only allows offsets whose effects are durable.
    let report = commit(&consumer, &ledger, &assembler, &partitions, &stats, true);
    registry_task.abort();
    if let Some(task) = judge_store_task {
        task.abort();
    }
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    consumer.unsubscribe();
    health.set_assigned_partitions(0);
    ingest_result?;
    drained?;
    report
}

/// Whether a commit was refused because the group is rebalancing (or this member was already
/// out of it).
fn is_rebalance(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::RebalanceInProgress
                | Code::IllegalGeneration
                | Code::UnknownMemberId
                | Code::AssignmentLost
                | Code::State
        )
    )
}

/// Stores (and with `sync`, commits) the offsets the ledger allows.
fn commit(
    consumer: &StreamConsumer<SourceContext>,
    ledger: &Mutex<OffsetLedger>,
    assembler: &Assembler,
    partitions: &SourcePartitions,
    stats: &Stats,
    sync: bool,
) -> anyhow::Result<RunReport> {
    telemetry::cells_held(assembler.cell_count());
    let low_water = assembler.low_water();
    let committable = ledger.lock().expect("ledger lock").committable(&low_water);
    if committable.is_empty() {
        return Ok(RunReport::default());
    }
    let mut tpl = TopicPartitionList::new();
    let mut report = RunReport::default();
    for (id, offset) in committable {
        let (topic, partition) = partitions.pair(id);
        tpl.add_partition_offset(topic, *partition, Offset::Offset(offset))?;
        report.committed.push((topic.clone(), *partition, offset));
    }
    match source::store_and_commit(consumer, &tpl, sync) {
        Ok(()) => {}
        // The group is rebalancing (another member left or joined as this one stops): the
        // partitions' next owners resume from the last commit, never past what this instance
        // finished, so what it did since is done again, not lost.
        Err(error) if is_rebalance(&error) => {
            tracing::warn!(%error, "The last commit was refused during a rebalance; the next owners resume from the commit before it.");
            return Ok(RunReport::default());
        }
        Err(error) => return Err(error.into()),
    }
    telemetry::offsets_stored(stats, report.committed.len());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_do_not_fit_the_model_are_refused_before_it_is_loaded() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/plant-attention-v1.json");
        let (contract, _) = ModelContract::load(&path).unwrap();
        assert!(detector_for(&Config::default(), &contract).is_ok());
        let refused = |edit: fn(&mut Config)| {
            let mut config = Config::default();
            edit(&mut config);
            detector_for(&config, &contract).unwrap_err().to_string()
        };
        let message = refused(|c| c.detect.flatline_steps = 99);
        assert!(
            message.contains("[detect] flatline_steps is 99"),
            "{message}"
        );
        let message = refused(|c| {
            c.detect.divergence = Some(crate::detect::divergence::DivergenceConfig {
                steps: 99,
                ..Default::default()
            })
        });
        assert!(
            message.contains("[detect.divergence] steps is 99"),
            "{message}"
        );
        let message = refused(|c| {
            c.detect.floor = Some(crate::detect::floor::FloorConfig {
                steps: 99,
                ..Default::default()
            })
        });
        assert!(message.contains("[detect.floor] steps is 99"), "{message}");
        let message = refused(|c| c.detect.score_channels = vec!["nope".into()]);
        assert!(message.contains("score_channels"), "{message}");
    }
}
