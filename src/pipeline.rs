//! pipeline: wires source → decode → registry → assemble → infer → detect → sink.
//!
//! ```text
//!  consumer ──► ingest loop ──windows──► infer (batches, blocking pool) ──► detect + publish
//!  (group)      decode, registry,  │                                          │ acks release
//!               assemble           └──dead letters──► dead-letter publisher ──┤ holds in the
//!                 ▲                                                           ▼ offset ledger
//!                 └──────────── store/commit what the ledger allows ◄─────────┘
//! ```
//!
//! Every arrow is a bounded channel, so a slow stage slows the consumer instead of growing
//! memory. Cancellation reaches only the ingest loop: it stops consuming and closes its output
//! channels; each later stage drains what it has and ends when its input closes; then the final
//! offsets are committed. See `source` for the commit invariant this wiring upholds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::assemble::{Admission, AssembleSpec, Assembler, Provenance, Window};
use crate::changelog::{Changelog, JudgeStore};
use crate::config::{BadInputPolicy, ClientRole, Config, TopicConfig};
use crate::decode::{self, Decoder, PayloadKind};
use crate::detect::{Detector, Judge, JudgeState, Judgement};
use crate::infer::contract::Standardisation;
use crate::infer::{self, Inferred, Model, ModelContract};
use crate::registry::Registry;
use crate::schema::fast::Readings;
use crate::schema::{self, AnomalyEvent, DeadLetterReason, RecordKind, SchemaIds, Severity};
use crate::sink::{DeadLetter, Sink};
use crate::source::{self, OffsetLedger, SourceContext, SourcePartitions};
use crate::table;
use crate::telemetry::{self, Health, Stats};

/// Most publishes awaiting acknowledgement at once, per publisher.
const MAX_IN_FLIGHT: usize = 512;

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

/// Loads the registry ([`load_registry`]), then subscribes `group_id` to `topics`. `None` when
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
            .await?
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
    let changelog = match (&config.detect.changelog, judge_store) {
        (Some(c), Some(store)) => Some((
            Changelog::new(store, c.topic.clone(), Arc::clone(&sink)),
            c.interval,
        )),
        _ => None,
    };
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

    let mut ingest = Ingest {
        decoder,
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
        decoded: Readings::default(),
        future: decode::FutureLimit::new(config.assemble.max_future),
    };
    let ingest_result = ingest
        .run(&consumer, config.source.commit_interval, &cancel, &failed)
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
    if sync {
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {}
            // The group is rebalancing (another member left or joined as this one stops): the
            // partitions' next owners resume from the last commit, never past what this
            // instance finished, so what it did since is done again, not lost.
            Err(error) if is_rebalance(&error) => {
                tracing::warn!(%error, "The last commit was refused during a rebalance; the next owners resume from the commit before it.");
                return Ok(RunReport::default());
            }
            Err(error) => return Err(error.into()),
        }
    } else if let Err(error) = consumer.store_offsets(&tpl) {
        // A partition revoked a moment ago cannot be stored; the next owner resumes from the
        // last commit, which is never past what this instance finished.
        tracing::debug!(%error, "Could not store offsets.");
    }
    telemetry::offsets_stored(stats, report.committed.len());
    Ok(report)
}

/// The consuming half: everything up to and including window assembly runs here, in order.
struct Ingest {
    decoder: Decoder,
    registry: Arc<Registry>,
    assembler: Assembler,
    partitions: SourcePartitions,
    ledger: Arc<Mutex<OffsetLedger>>,
    stats: Arc<Stats>,
    policy: BadInputPolicy,
    windows: mpsc::Sender<Window>,
    /// Windows sent so far, to place the cells ingest stops holding among them.
    sent: u64,
    ended: mpsc::UnboundedSender<Ended>,
    letters: mpsc::Sender<PendingLetter>,
    scratch: Vec<Window>,
    /// The last message's readings; their memory serves the next message.
    decoded: Readings,
    future: decode::FutureLimit,
}

impl Ingest {
    async fn run(
        &mut self,
        consumer: &StreamConsumer<SourceContext>,
        commit_interval: Duration,
        cancel: &CancellationToken,
        failed: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(commit_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Made once, not once per message: registering and dropping a waiter on each token for
        // every message was about a twentieth of the single-reading ingest profile.
        let cancelled = cancel.cancelled();
        let failure = failed.cancelled();
        tokio::pin!(cancelled, failure);
        // One stream for the whole loop: `recv()` makes a stream per message, which registers
        // and removes a waker slot under a mutex each time.
        let mut messages = consumer.stream();
        loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => return Ok(()),
                _ = &mut failure => anyhow::bail!("a later stage failed; stopped consuming"),
                _ = ticker.tick() => {
                    commit(consumer, &self.ledger, &self.assembler, &self.partitions, &self.stats, false)?;
                }
                message = messages.next() => {
                    // A rebalance is served inside the stream's poll: forget what was revoked
                    // before handling anything of the new assignment.
                    self.forget_revoked(consumer);
                    match message {
                        Some(Ok(message)) => self.handle(&message).await?,
                        Some(Err(error)) => tracing::warn!(%error, "Consumer error."),
                        None => anyhow::bail!("the consumer's message stream ended"),
                    }
                }
            }
        }
    }

    /// Drops the window state and the commit position of revoked partitions. Their windows
    /// already emitted are still scored and published (and release their holds); the new owner
    /// resumes from the last commit, which trails every open window by its whole history, so
    /// it rebuilds the same windows by replaying without emitting the incomplete ones. The
    /// judging task drops the cells' thresholds, baselines and incidents once it has judged
    /// those windows.
    fn forget_revoked(&mut self, consumer: &StreamConsumer<SourceContext>) {
        for (topic, partition) in consumer.context().take_revoked() {
            let id = self.partitions.id(&topic, partition);
            let cells = self.assembler.forget_partition(id);
            self.end(cells.into_iter().map(|c| (c, Ending::Revoked)).collect());
            self.ledger.lock().expect("ledger lock").forget(id);
            tracing::debug!(topic, partition, "Forgot a revoked partition's windows.");
        }
    }

    async fn handle(&mut self, message: &BorrowedMessage<'_>) -> anyhow::Result<()> {
        let topic = message.topic();
        let (partition, offset) = (message.partition(), message.offset());
        let id = self.partitions.id(topic, partition);
        let expected = self
            .ledger
            .lock()
            .expect("ledger lock")
            .consumed(id, offset);
        match expected {
            None => tracing::debug!(topic, partition, offset, "First message since assignment."),
            // Compaction and transaction markers leave gaps too; a gap on a reading topic
            // written without either means the broker skipped records.
            Some(next) if offset > next => {
                tracing::debug!(
                    topic,
                    partition,
                    offset,
                    expected = next,
                    "Offsets skipped."
                )
            }
            Some(_) => {}
        }
        let kind = self.partitions.kind(id);
        // The decode buffer is taken out for this message and put back after it, so that its
        // memory is reused (an error that ends the job drops it, which costs nothing then).
        let mut readings = std::mem::take(&mut self.decoded);
        match self
            .decoder
            .decode_into(kind, message.payload(), &mut readings)
        {
            Ok(()) => {}
            Err(error) => {
                self.decoded = readings;
                telemetry::message_consumed(&self.stats, self.partitions.messages(id), 0);
                let letter = DeadLetter {
                    reason: error.reason(),
                    error: error.to_string(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec),
                    topic: topic.to_owned(),
                    partition,
                    offset,
                    batch_index: None,
                };
                return self.reject(id, letter).await;
            }
        };
        telemetry::message_consumed(
            &self.stats,
            self.partitions.messages(id),
            readings.as_slice().len(),
        );
        let batch = kind == PayloadKind::Batch;
        for (index, reading) in readings.as_slice().iter().enumerate() {
            let refused = |reason: DeadLetterReason, error: String| DeadLetter {
                reason,
                error,
                key: message.key().map(<[u8]>::to_vec),
                payload: if batch {
                    schema::write_datum(RecordKind::Reading.schema(), &reading.to_value()).ok()
                } else {
                    message.payload().map(<[u8]>::to_vec)
                },
                topic: topic.to_owned(),
                partition,
                offset,
                batch_index: batch.then_some(index),
            };
            if let Err(error) = decode::validate(reading) {
                self.reject(id, refused(error.reason(), error.to_string()))
                    .await?;
                continue;
            }
            if !self
                .future
                .allows(reading.event_time_ms, decode::wall_clock_ms)
            {
                let error = format!(
                    "event time {} is more than [assemble] max_future ahead of the wall clock",
                    reading.event_time_ms
                );
                self.reject(id, refused(DeadLetterReason::InvalidValue, error))
                    .await?;
                continue;
            }
            let Some(node) = self.registry.lookup(&reading.node_id) else {
                let error = format!(
                    "node `{}` is not on the spatial-node topic",
                    reading.node_id
                );
                self.reject(id, refused(DeadLetterReason::UnknownNode, error))
                    .await?;
                continue;
            };
            let at = Provenance {
                partition: id,
                offset,
            };
            let (admission, closed) =
                self.assembler
                    .add(&node.cell, &node.node_id, reading, at, &mut self.scratch);
            match admission {
                Admission::Accepted { ignored } => {
                    telemetry::reading_accepted(&self.stats, ignored)
                }
                Admission::NoModelChannel => telemetry::reading_without_model_channel(&self.stats),
                Admission::Duplicate => telemetry::duplicate_reading(),
                Admission::Late {
                    step_end_ms,
                    watermark_ms,
                } => {
                    let error = format!(
                        "event time {} is in a step that closed at {step_end_ms} (cell watermark {watermark_ms})",
                        reading.event_time_ms
                    );
                    self.reject(id, refused(DeadLetterReason::Late, error))
                        .await?;
                }
                Admission::CellFull => {
                    let error = format!(
                        "cell `{}` already has the model's maximum of {} nodes",
                        node.cell,
                        self.assembler.spec().max_nodes
                    );
                    self.reject(id, refused(DeadLetterReason::CellFull, error))
                        .await?;
                }
                Admission::TooManyCells => {
                    let error = format!(
                        "cell `{}` would be one more than [assemble] max_cells = {}",
                        node.cell,
                        self.assembler.spec().max_cells
                    );
                    self.reject(id, refused(DeadLetterReason::CellLimit, error))
                        .await?;
                }
            }
            telemetry::windows_closed(&self.stats, closed.emitted, closed.sparse, closed.warmup);
            let silent = closed.silent.into_iter();
            self.end(
                silent
                    .map(|(c, at_ms)| (c, Ending::Silent { at_ms }))
                    .collect(),
            );
            self.emit().await?;
        }
        self.decoded = readings;
        Ok(())
    }

    /// Tells the judging task about cells no longer held, placed after the windows sent so far.
    fn end(&self, cells: Vec<(Arc<str>, Ending)>) {
        if cells.is_empty() {
            return;
        }
        // Fails only when the judging task has ended, and then nothing is left to end.
        let _ = self.ended.send(Ended {
            after: self.sent,
            cells,
        });
    }

    /// Sends the windows that just closed to inference, holding their offsets first.
    async fn emit(&mut self) -> anyhow::Result<()> {
        if self.scratch.is_empty() {
            return Ok(());
        }
        {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            for window in &self.scratch {
                for &(p, o) in &window.holds {
                    ledger.hold(p, o);
                }
            }
        }
        for window in self.scratch.drain(..) {
            self.windows
                .send(window)
                .await
                .map_err(|_| anyhow::anyhow!("the inference stage stopped"))?;
            self.sent += 1;
        }
        Ok(())
    }

    /// Applies the bad-input policy to one refused message or reading.
    async fn reject(&mut self, id: i32, letter: DeadLetter) -> anyhow::Result<()> {
        if !refuse(self.policy, &self.stats, &letter)? {
            return Ok(());
        }
        self.ledger
            .lock()
            .expect("ledger lock")
            .hold(id, letter.offset);
        self.letters
            .send(PendingLetter { id, letter })
            .await
            .map_err(|_| anyhow::anyhow!("the dead-letter publisher stopped"))
    }
}

/// Counts one refused message or reading and applies `[sink] bad_input`: `Ok(true)` when it is
/// to be dead-lettered, `Ok(false)` when dropped, an error naming it under `fail`.
pub fn refuse(policy: BadInputPolicy, stats: &Stats, letter: &DeadLetter) -> anyhow::Result<bool> {
    telemetry::reading_rejected(
        stats,
        letter.reason,
        &letter.topic,
        letter.partition,
        letter.offset,
        &letter.error,
        policy == BadInputPolicy::DeadLetter,
    );
    match policy {
        BadInputPolicy::Drop => Ok(false),
        BadInputPolicy::DeadLetter => Ok(true),
        BadInputPolicy::Fail => anyhow::bail!(
            "bad input on {}[{}] at offset {} ({}): {}; [sink] bad_input = \"fail\"",
            letter.topic,
            letter.partition,
            letter.offset,
            letter.reason.as_str(),
            letter.error
        ),
    }
}

/// A dead letter with the ledger id of its source partition.
struct PendingLetter {
    id: i32,
    letter: DeadLetter,
}

/// Why ingest no longer holds a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Its partition was revoked: its judge state goes, without a transition.
    Revoked,
    /// It was dropped as idle, silent up to `at_ms` (event time): an open incident is closed.
    Silent { at_ms: i64 },
}

/// Cells ingest stopped holding when it had sent `after` windows.
struct Ended {
    after: u64,
    cells: Vec<(Arc<str>, Ending)>,
}

/// Places the cells ingest stopped holding among the windows the judging task takes. Windows
/// keep their order through inference, and ingest sends an `Ended` before the window it
/// counts, so its cells are due just before window number `after` (counted from 0) is judged:
/// the windows they emitted before are judged with their state, and a window of a cell that
/// came back starts afresh, as on any other instance.
struct Endings {
    input: mpsc::UnboundedReceiver<Ended>,
    pending: std::collections::VecDeque<Ended>,
    judged: u64,
}

impl Endings {
    fn new(input: mpsc::UnboundedReceiver<Ended>) -> Self {
        Self {
            input,
            pending: std::collections::VecDeque::new(),
            judged: 0,
        }
    }

    /// Takes in what ingest has sent; everything due within a batch was sent before the
    /// batch's windows, so once per batch received is enough.
    fn receive(&mut self) {
        while let Ok(ended) = self.input.try_recv() {
            self.pending.push_back(ended);
        }
    }

    /// The cells due now: every window sent before them has been judged.
    fn due(&mut self) -> Vec<(Arc<str>, Ending)> {
        let mut due = Vec::new();
        while let Some(ended) = self.pending.pop_front_if(|e| e.after <= self.judged) {
            due.extend(ended.cells);
        }
        due
    }

    /// The cells due before the next window, which this counts as judged.
    fn before_window(&mut self) -> Vec<(Arc<str>, Ending)> {
        let due = self.due();
        self.judged += 1;
        due
    }
}

/// What a published event comes back with: the holds to release, its severity, the window
/// close → acknowledged latency (none for an event without a window of readings), the result.
type Published = (
    Vec<(i32, i64)>,
    Severity,
    Option<f64>,
    Result<(), crate::sink::SinkError>,
);

async fn publish(
    sink: Arc<Sink>,
    event: AnomalyEvent,
    holds: Vec<(i32, i64)>,
    closed_at: Option<std::time::Instant>,
) -> Published {
    let result = sink.publish_event(&event).await;
    let latency = closed_at.map(|at| at.elapsed().as_secs_f64());
    (holds, event.severity, latency, result)
}

/// What the judging task judges with: the judge, the cells that ended, and the state changelog.
struct Judging {
    judge: Judge,
    endings: Endings,
    /// With `[detect.changelog]`, and how often it writes.
    changelog: Option<(Changelog, Duration)>,
}

/// Scores inferred windows, publishes events, and releases each window's holds once its event
/// is acknowledged (or at once when it has none). Cells ingest stopped holding lose their
/// judge state when revoked (written to the changelog first, if there is one); when silent, an
/// open incident of theirs is closed.
async fn publish_events(
    mut input: mpsc::Receiver<Vec<Inferred>>,
    judging: Judging,
    sink: Arc<Sink>,
    ledger: Arc<Mutex<OffsetLedger>>,
    stats: Arc<Stats>,
    failed: CancellationToken,
) -> anyhow::Result<Judge> {
    let Judging {
        mut judge,
        mut endings,
        changelog,
    } = judging;
    let (mut changelog, write_every) = match changelog {
        Some((changelog, every)) => (Some(changelog), every),
        None => (None, Duration::from_secs(3600)),
    };
    let start = tokio::time::Instant::now() + write_every;
    let mut write_ticker = tokio::time::interval_at(start, write_every);
    write_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight = FuturesUnordered::new();
    let release = |holds: &[(i32, i64)]| {
        let mut ledger = ledger.lock().expect("ledger lock");
        for &(p, o) in holds {
            ledger.release(p, o);
        }
    };
    let end = |judge: &mut Judge,
               changelog: Option<&mut Changelog>,
               cells: Vec<(Arc<str>, Ending)>|
     -> Vec<AnomalyEvent> {
        let mut closes = Vec::new();
        let mut changelog = changelog;
        for (cell, ending) in cells {
            match ending {
                Ending::Revoked => {
                    if let Some(changelog) = changelog.as_deref_mut() {
                        changelog.write_cell(judge, &cell);
                    }
                    judge.forget(&cell);
                    tracing::debug!(cell = %cell, "Forgot a revoked cell's thresholds, baselines and incident.");
                }
                Ending::Silent { at_ms } => {
                    if let Some(close) = judge.expire(&cell, at_ms) {
                        tracing::debug!(cell = %cell, at_ms, "Closed the incident of a silent cell.");
                        closes.push(close);
                    }
                }
            }
        }
        closes
    };
    loop {
        tokio::select! {
            batch = input.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(batch) = batch else { break };
                endings.receive();
                for Inferred { window, reconstruction, model } in batch {
                    for close in end(&mut judge, changelog.as_mut(), endings.before_window()) {
                        in_flight.push(publish(Arc::clone(&sink), close, Vec::new(), None));
                    }
                    // Each window is judged by the model that scored it.
                    judge = judge.for_contract(&model);
                    if let Some(changelog) = changelog.as_mut() {
                        changelog.before_window(&mut judge, &window.cell);
                    }
                    let Judgement { score, event, .. } = judge.judge(&window, &reconstruction);
                    telemetry::window_scored(&stats, score.score, window.closed_at.elapsed().as_secs_f64());
                    match event {
                        None => release(&window.holds),
                        Some(event) => in_flight.push(publish(
                            Arc::clone(&sink),
                            event,
                            window.holds,
                            Some(window.closed_at),
                        )),
                    }
                }
                telemetry::cells_judged(judge.cell_count());
            }
            // Cells that ended after the last window sent: nothing is left to judge before them.
            Some(ended) = endings.input.recv() => {
                endings.pending.push_back(ended);
                for close in end(&mut judge, changelog.as_mut(), endings.due()) {
                    in_flight.push(publish(Arc::clone(&sink), close, Vec::new(), None));
                }
                telemetry::cells_judged(judge.cell_count());
            }
            _ = write_ticker.tick(), if changelog.is_some() => {
                if let Some(changelog) = changelog.as_mut() {
                    changelog.write_judged(&judge);
                }
            }
            Some((holds, severity, latency, result)) = in_flight.next() => {
                if let Err(error) = result {
                    failed.cancel();
                    return Err(error.into());
                }
                telemetry::event_published(&stats, severity, latency);
                release(&holds);
            }
        }
    }
    while let Some((holds, severity, latency, result)) = in_flight.next().await {
        if let Err(error) = result {
            failed.cancel();
            return Err(error.into());
        }
        telemetry::event_published(&stats, severity, latency);
        release(&holds);
    }
    if let Some(mut changelog) = changelog {
        changelog.write_judged(&judge).await?;
    }
    Ok(judge)
}

/// Takes over the judge state saved at `path` by the last graceful stop, if any and if it
/// fits (see [`Judge::restore`]); otherwise the judge learns from nothing, as without a file.
fn restore_judge_state(judge: &mut Judge, path: &std::path::Path) {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "No judge state saved yet; the judge learns from nothing.");
            return;
        }
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "Cannot read the judge state; the judge learns from nothing.");
            return;
        }
    };
    let state = match serde_json::from_slice::<JudgeState>(&bytes) {
        Ok(state) => state,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "The judge state is not readable; the judge learns from nothing.");
            return;
        }
    };
    let restored = judge.restore(state, decode::wall_clock_ms());
    for (part, result) in [
        ("divergence baselines", restored.divergence),
        ("SPOT thresholds", restored.spot),
    ] {
        match result {
            Ok(0) => {}
            Ok(cells) => tracing::info!(path = %path.display(), cells, "Restored the {part}."),
            Err(why) => {
                tracing::warn!(path = %path.display(), "The saved {part} were not used: {why}.")
            }
        }
    }
}

/// Saves the judge's state at `path`, through a file beside it renamed into place, so that a
/// stop during the write leaves the last whole state. A failure is logged, not fatal: the
/// events and offsets are already safe.
fn save_judge_state(judge: &Judge, path: &std::path::Path) {
    let state = judge.state(decode::wall_clock_ms());
    let cells = state.divergence.len();
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let written = serde_json::to_vec(&state)
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(&part, json))
        .and_then(|()| std::fs::rename(&part, path));
    match written {
        Ok(()) => tracing::info!(path = %path.display(), cells, "Saved the judge state."),
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "Could not save the judge state; the next start learns from nothing.")
        }
    }
}

/// Publishes dead letters and releases their holds once acknowledged.
async fn publish_dead_letters(
    mut input: mpsc::Receiver<PendingLetter>,
    sink: Arc<Sink>,
    ledger: Arc<Mutex<OffsetLedger>>,
    failed: CancellationToken,
) -> anyhow::Result<()> {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            letter = input.recv(), if open && in_flight.len() < MAX_IN_FLIGHT => match letter {
                Some(PendingLetter { id, letter }) => {
                    let sink = Arc::clone(&sink);
                    in_flight.push(async move {
                        let result = sink.publish_dead_letter(&letter).await;
                        (id, letter.offset, result)
                    });
                }
                None => open = false,
            },
            Some((id, offset, result)) = in_flight.next() => {
                if let Err(error) = result {
                    failed.cancel();
                    return Err(error.into());
                }
                ledger.lock().expect("ledger lock").release(id, offset);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Judges `windows` windows, returning before which window (by number) each cell ended.
    fn judge_windows(endings: &mut Endings, windows: u64) -> Vec<(u64, String)> {
        let mut ended = Vec::new();
        endings.receive();
        for _ in 0..windows {
            let number = endings.judged;
            for (cell, _) in endings.before_window() {
                ended.push((number, cell.to_string()));
            }
        }
        ended
    }

    fn ended(after: u64, cells: &[&str]) -> Ended {
        Ended {
            after,
            cells: cells
                .iter()
                .map(|c| (Arc::from(*c), Ending::Revoked))
                .collect(),
        }
    }

    #[test]
    fn cells_end_after_the_windows_sent_before_them() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut endings = Endings::new(rx);
        // Ingest: a revocation before any window, another after 3 windows, two after 5.
        tx.send(ended(0, &["a"])).unwrap();
        tx.send(ended(3, &["b", "c"])).unwrap();
        tx.send(ended(5, &["d"])).unwrap();
        tx.send(ended(5, &["e"])).unwrap();
        // The first batch holds windows 0..4: "a" goes before window 0, "b" and "c" before 3.
        assert_eq!(
            judge_windows(&mut endings, 4),
            [(0, "a".into()), (3, "b".into()), (3, "c".into())]
        );
        // Window 4 does not reach the revocation after 5; window 5 does, and both of its
        // endings apply before it.
        assert_eq!(judge_windows(&mut endings, 1), []);
        assert_eq!(
            judge_windows(&mut endings, 1),
            [(5, "d".into()), (5, "e".into())]
        );
        assert!(endings.pending.is_empty());
        // Sent after windows yet to come, it waits for them.
        tx.send(ended(8, &["f"])).unwrap();
        assert_eq!(judge_windows(&mut endings, 1), []);
        assert_eq!(endings.pending.len(), 1);
        assert!(endings.due().is_empty(), "window 7 is not judged yet");
        // Sent after the last window judged, it is due at once.
        assert_eq!(judge_windows(&mut endings, 1), []);
        let (cell, ending) = endings.due().pop().expect("due once window 7 is judged");
        assert_eq!((&*cell, ending), ("f", Ending::Revoked));
    }

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
        let message = refused(|c| c.detect.score_channels = vec!["nope".into()]);
        assert!(message.contains("score_channels"), "{message}");
    }
}
