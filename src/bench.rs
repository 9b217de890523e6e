//! bench: how close gridwatch runs to what Kafka itself delivers, measured end to end.
//!
//! One run, one broker, the same pre-produced data for every stage:
//! 1. **ceiling**: a bare librdkafka consumer (`BaseConsumer`) that reads each topic and touches
//!    every payload byte, nothing else;
//! 2. **ingest**: gridwatch's own pipeline with scoring off: consume, decode, registry lookup,
//!    bucketing and window extraction;
//! 3. **full**: the whole pipeline: ingest, inference, detection, produced events;
//!
//! each for single-reading messages and for `ReadingBatch` messages; then the full pipeline at
//! half its measured maximum load for the window-close → event-acknowledged latency.
//!
//! Invariant: every stage reads the same topics from the beginning with its own consumer group,
//! and a stage's time runs from its first consumed message to its last progress, so group joins
//! and set-up are not counted. CPU time is the whole process's (the in-process mock broker
//! included, for every stage alike).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::config::{ClientRole, Config, TopicConfig};
use crate::decode::PayloadKind;
use crate::pipeline::{self, Scoring};
use crate::schema::{Codec, RecordKind, WireFormat, records};
use crate::simulate::{self, Plant, PlantSpec};
use crate::source;
use crate::telemetry::Stats;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Readings per topic.
    pub readings: u64,
    pub cells: usize,
    pub nodes_per_cell: usize,
    /// Steps of one cell per `ReadingBatch` message.
    pub batch_steps: usize,
    pub partitions: i32,
    /// A broker to use instead of the in-process mock cluster.
    pub brokers: Option<String>,
    /// Seconds of the half-load latency run (0 skips it).
    pub latency_seconds: u64,
    /// Offered load of the latency run, readings/s; `None` is half the measured maximum.
    pub latency_rate: Option<f64>,
    /// Runs of each throughput stage; the report keeps each stage's median run.
    pub repeat: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            readings: 500_000,
            cells: 64,
            nodes_per_cell: 8,
            batch_steps: 25,
            partitions: 16,
            brokers: None,
            latency_seconds: 10,
            latency_rate: None,
            repeat: 1,
        }
    }
}

/// One stage on one topic.
#[derive(Debug, Clone)]
pub struct StageResult {
    pub stage: &'static str,
    pub payload: PayloadKind,
    pub readings: u64,
    pub seconds: f64,
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
    /// Windows scored (full) or emitted (ingest).
    pub windows: u64,
    /// Every run's readings/s, in the order run; this result is the median run.
    pub runs: Vec<f64>,
}

impl StageResult {
    pub fn readings_per_second(&self) -> f64 {
        self.readings as f64 / self.seconds.max(1e-9)
    }

    pub fn cpu_seconds_per_million(&self) -> f64 {
        self.cpu_seconds / self.readings as f64 * 1e6
    }
}

/// The median run by readings/s (the lower middle one of an even count), carrying every run's
/// rate.
fn median(mut runs: Vec<StageResult>) -> StageResult {
    let rates: Vec<f64> = runs.iter().map(StageResult::readings_per_second).collect();
    runs.sort_by(|a, b| a.readings_per_second().total_cmp(&b.readings_per_second()));
    let mut middle = runs.swap_remove((runs.len() - 1) / 2);
    middle.runs = rates;
    middle
}

/// Latency of the full pipeline at a fixed offered load.
#[derive(Debug, Clone, Default)]
pub struct LatencyResult {
    pub offered_readings_per_second: f64,
    /// The reading consumer's `fetch.wait.max.ms` where the benchmark set it (mock cluster).
    pub fetch_wait_ms: Option<String>,
    /// Inference batches the latency run's windows took.
    pub batches: u64,
    /// Window close → scored (inference done): p50, p99.
    pub scored_p50_ms: f64,
    pub scored_p99_ms: f64,
    pub events: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub broker: String,
    pub options: BenchOptions,
    pub stages: Vec<StageResult>,
    pub latency: Option<LatencyResult>,
    pub node_windows_per_window: usize,
    /// Window state held by the assembler, and the raw `f32` tensor bytes it represents.
    pub window_state_bytes: (usize, usize),
}

/// Feeds `steps` steps of the plant through an assembler (the pipeline's own) and returns its
/// (held, raw tensor) bytes at the end.
fn window_state(options: &BenchOptions, steps: u64) -> anyhow::Result<(usize, usize)> {
    let config = bench_config(&ClientConfig::new(), PayloadKind::Batch, "memory", 1);
    let loaded = pipeline::load_model(&config)?;
    let mut assembler = crate::assemble::Assembler::new(loaded.spec);
    let mut plant = plant(options);
    let mut out = Vec::new();
    let mut offset = 0;
    for _ in 0..steps {
        for (cell, readings) in simulate::by_cell(&plant.step()) {
            let cell: Arc<str> = Arc::from(cell.as_str());
            for r in readings {
                let node: Arc<str> = Arc::from(r.node_id.as_str());
                let at = crate::assemble::Provenance {
                    partition: 0,
                    offset,
                };
                assembler.add(&cell, &node, &r, at, &mut out);
                offset += 1;
            }
        }
        out.clear();
    }
    Ok(assembler.memory())
}

/// Process CPU time (user + system), in seconds.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// Peak resident set size since the last [`reset_peak_rss`], in bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resets the peak RSS counter (Linux `clear_refs` 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

const NODES: &str = "bench-nodes";

fn topic(kind: PayloadKind) -> &'static str {
    match kind {
        PayloadKind::Reading => "bench-single",
        PayloadKind::Batch => "bench-batch",
    }
}

fn plant(options: &BenchOptions) -> Plant {
    Plant::new(PlantSpec {
        lines: options.cells,
        machines_per_line: options.nodes_per_cell,
        mean_steps_between_faults: None,
        seed: 3,
        ..PlantSpec::default()
    })
}

fn producer(client: &ClientConfig) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(client
        .clone()
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()?)
}

/// Sends one record, waiting while the local queue is full.
fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                r,
            )) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => anyhow::bail!("cannot produce to {topic}: {e}"),
        }
    }
}

/// Produces node records and `steps` steps of the plant to both reading topics; returns the
/// message count per topic.
fn produce_data(
    client: &ClientConfig,
    options: &BenchOptions,
    steps: u64,
) -> anyhow::Result<(u64, u64)> {
    let producer = producer(client)?;
    let mut plant = plant(options);
    let nodes = Codec::new(RecordKind::SpatialNode, WireFormat::Plain);
    for node in simulate::node_records(&plant) {
        send(
            &producer,
            NODES,
            None,
            &node.node_id,
            &nodes.encode(&node.to_value())?,
        )?;
    }
    let single = Codec::new(RecordKind::Reading, WireFormat::Plain);
    let batches = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
    let (mut singles, mut batched) = (0, 0);
    let mut pending: Vec<(String, Vec<crate::schema::Reading>)> = Vec::new();
    let mut last_time_ms = 0;
    for step in 0..steps {
        for (cell, readings) in simulate::by_cell(&plant.step()) {
            for r in &readings {
                last_time_ms = last_time_ms.max(r.event_time_ms);
                send(
                    &producer,
                    topic(PayloadKind::Reading),
                    None,
                    &cell,
                    &single.encode(&r.to_value())?,
                )?;
                singles += 1;
            }
            match pending.iter_mut().find(|(c, _)| *c == cell) {
                Some((_, list)) => list.extend(readings),
                None => pending.push((cell, readings)),
            }
        }
        if (step + 1) % options.batch_steps as u64 == 0 || step + 1 == steps {
            for (cell, readings) in pending.drain(..) {
                let payload = batches.encode(&records::batch_to_value(&readings))?;
                send(&producer, topic(PayloadKind::Batch), None, &cell, &payload)?;
                batched += 1;
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    write_fences(&producer, &plant, last_time_ms, options.partitions)?;
    check_retained(client, topic(PayloadKind::Reading), singles)?;
    check_retained(client, topic(PayloadKind::Batch), batched)?;
    Ok((singles, batched))
}

/// The key of the records [`write_fences`] writes.
const FENCE_KEY: &str = "bench-fence";

/// Writes one record after the data to each partition of every topic the stages read, so that
/// a broker whose high watermark trails a partition's last write (tansu 0.6's in-memory
/// storage, docs/notes.md) still shows every data record. The fences are harmless to the
/// stages: a node record of a fence node in a cell of its own, and readings of that node at the
/// last step on a channel no model has (counted as "without a model channel", not
/// dead-lettered). A cell of its own, because a broker may deliver one partition's fence
/// before another partition's data (tansu does, partition by partition), and a reading of a
/// real node would then open that node's cell with a watermark at the end of the data.
fn write_fences(
    producer: &ThreadedProducer<DefaultProducerContext>,
    plant: &Plant,
    event_time_ms: i64,
    partitions: i32,
) -> anyhow::Result<()> {
    let nodes = simulate::node_records(plant);
    let Some(first) = nodes.first() else {
        return Ok(());
    };
    let mut fence_node = first.clone();
    fence_node.node_id = FENCE_KEY.to_owned();
    fence_node.cell_id = Some(FENCE_KEY.to_owned());
    let node_codec = Codec::new(RecordKind::SpatialNode, WireFormat::Plain);
    send(
        producer,
        NODES,
        None,
        FENCE_KEY,
        &node_codec.encode(&fence_node.to_value())?,
    )?;
    let reading = crate::schema::Reading {
        node_id: FENCE_KEY.to_owned(),
        event_time_ms,
        values: vec![("bench_fence".to_owned(), 0.0)],
        sequence: None,
    };
    let single = Codec::new(RecordKind::Reading, WireFormat::Plain).encode(&reading.to_value())?;
    let batch = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain)
        .encode(&records::batch_to_value(std::slice::from_ref(&reading)))?;
    for partition in 0..partitions {
        send(
            producer,
            topic(PayloadKind::Reading),
            Some(partition),
            FENCE_KEY,
            &single,
        )?;
        send(
            producer,
            topic(PayloadKind::Batch),
            Some(partition),
            FENCE_KEY,
            &batch,
        )?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Checks that `topic` holds `messages` from offset 0: the mock cluster keeps at most 100 000
/// messages and 5 MB per partition and silently drops older ones.
fn check_retained(client: &ClientConfig, topic: &str, messages: u64) -> anyhow::Result<()> {
    let consumer: BaseConsumer = client.clone().set("group.id", "bench-check").create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut held = 0;
    for p in metadata.topics()[0].partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        anyhow::ensure!(
            low == 0,
            "`{topic}` partition {} lost its oldest messages (low watermark {low}): the broker's retention is too small for this run; use more partitions or fewer readings (the mock cluster keeps 100 000 messages and 5 MB per partition)",
            p.id()
        );
        held += high as u64;
    }
    // Each partition ends with a fence, which a broker whose watermark trails its last write
    // does not count yet.
    anyhow::ensure!(
        held >= messages,
        "`{topic}` holds {held} messages by its high watermarks, {messages} were produced"
    );
    Ok(())
}

/// The bare consumer: reads every message of `topic` and touches every payload byte. It fetches
/// as gridwatch's consumer does (`source::FETCH_QUEUE_BACKOFF_MS`): with librdkafka's default
/// of 1 s it would now and then sit out a second once its local queue held 100 000 messages,
/// and the ceiling would measure that pause.
fn ceiling(client: &ClientConfig, topic: &str, messages: u64) -> anyhow::Result<(f64, f64, u64)> {
    let consumer: BaseConsumer = client
        .clone()
        .set("group.id", format!("bench-ceiling-{topic}"))
        .set("enable.auto.commit", "false")
        .set("fetch.queue.backoff.ms", source::FETCH_QUEUE_BACKOFF_MS)
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    reset_peak_rss();
    let cpu0 = cpu_seconds();
    let mut first = None;
    let mut seen = 0u64;
    let mut checksum = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < messages {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the ceiling consumer stalled at {seen}/{messages}"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            if message.key() == Some(FENCE_KEY.as_bytes()) {
                continue;
            }
            first.get_or_insert_with(Instant::now);
            if let Some(payload) = message.payload() {
                checksum = payload
                    .iter()
                    .fold(checksum, |acc, b| acc.wrapping_add(u64::from(*b)));
            }
            seen += 1;
        }
    }
    let seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    std::hint::black_box(checksum);
    Ok((seconds, cpu_seconds() - cpu0, peak_rss_bytes()))
}

fn bench_config(
    client: &ClientConfig,
    kind: PayloadKind,
    group: &str,
    batch_steps: usize,
) -> Config {
    // Defaults with GRIDWATCH__SECTION__KEY overrides (e.g. GRIDWATCH__INFER__MAX_BATCH=16), so
    // settings can be compared; topics, groups and the broker are the benchmark's own.
    let mut config = Config::load(None, std::env::vars()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "Ignoring GRIDWATCH__ overrides for the benchmark.");
        Config::default()
    });
    // A batch spans `batch_steps` steps of one cell, and the cells of a partition take turns:
    // the allowed lateness must cover a batch's span, as it must for any batching gateway.
    config.assemble.allowed_lateness = Duration::from_secs(batch_steps as u64 + 2);
    // Simulated time may run ahead of the wall clock.
    config.assemble.max_future = Duration::ZERO;
    config.kafka.insert(
        "bootstrap.servers".into(),
        client
            .get("bootstrap.servers")
            .unwrap_or_default()
            .to_owned(),
    );
    config.source.group_id = group.to_owned();
    config.source.topics = vec![TopicConfig {
        name: topic(kind).into(),
        payload: kind,
    }];
    config.registry.topic = NODES.into();
    config.sink.events_topic = "bench-anomalies".into();
    config.sink.dead_letter_topic = "bench-dlq".into();
    config.admin.listen = String::new();
    config.model.reload_interval = Duration::ZERO;
    config
}

/// Runs the pipeline over one topic until every message is consumed and every window settled.
async fn pipeline_stage(
    client: &ClientConfig,
    kind: PayloadKind,
    scoring: Scoring,
    messages: u64,
    batch_steps: usize,
    round: usize,
) -> anyhow::Result<(f64, f64, u64, u64)> {
    // A group of its own per run: each run reads the topic from its beginning.
    let group = format!("bench-{}-{:?}-{round}", topic(kind), scoring);
    let config = bench_config(client, kind, &group, batch_steps);
    let loaded = pipeline::load_model(&config)?;
    reset_peak_rss();
    let cpu0 = cpu_seconds();
    let running = pipeline::spawn(&config, loaded, Arc::new(Stats::default()), scoring);
    let (stats, task) = (Arc::clone(&running.stats), running.task);
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut settled_since: Option<(Instant, u64)> = None;
    loop {
        anyhow::ensure!(!task.is_finished(), "the pipeline stopped early");
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipeline stalled: {:?}",
            stats.snapshot()
        );
        let s = stats.snapshot();
        let done = s.messages_consumed >= messages
            && (scoring == Scoring::Off || s.windows_scored == s.windows_emitted);
        if done {
            // Settled when nothing moves for a moment.
            let marker = s.windows_scored + s.events_published + s.windows_emitted;
            match settled_since {
                Some((since, m)) if m == marker && since.elapsed() > Duration::from_millis(300) => {
                    break;
                }
                Some((_, m)) if m == marker => {}
                _ => settled_since = Some((Instant::now(), marker)),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = cpu_seconds() - cpu0;
    let rss = peak_rss_bytes();
    let seconds = stats.busy_span().map_or(0.0, |d| d.as_secs_f64());
    running.cancel.cancel();
    task.await??;
    let s = stats.snapshot();
    // The fences' readings name no model channel.
    let fences = stats
        .readings_without_model_channel
        .load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(
        s.dead_lettered == 0 && s.readings_accepted + fences == s.readings_decoded,
        "the bench data should be clean, yet {} readings were dead-lettered and {} of {} not accepted",
        s.dead_lettered,
        s.readings_decoded - s.readings_accepted,
        s.readings_decoded
    );
    let windows = if scoring == Scoring::On {
        s.windows_scored
    } else {
        s.windows_emitted
    };
    Ok((seconds, cpu, rss, windows))
}

/// librdkafka's longest wait for a fetch that finds no data.
const FETCH_WAIT: &str = "fetch.wait.max.ms";

/// The fetch wait of the latency run on the mock cluster. A broker answers a waiting fetch as
/// soon as data arrives (`fetch.min.bytes` is 1); librdkafka's mock cluster answers a fetch
/// that found no data only when the whole wait has passed (`rdkafka_mock_handlers.c`), so with
/// the default 500 ms every reading produced meanwhile would wait for it, and the run would
/// measure the mock. A short wait makes the mock answer about as soon as a broker would.
const MOCK_FETCH_WAIT_MS: &str = "10";

/// The full pipeline on a topic fed at `rate` readings/s for `seconds`: latency percentiles.
async fn latency_stage(
    client: &ClientConfig,
    options: &BenchOptions,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<LatencyResult> {
    let kind = PayloadKind::Batch;
    // The latency run publishes one batch per cell and step, as it happens.
    let mut config = bench_config(client, kind, "bench-latency", 1);
    config.source.topics[0].name = "bench-latency".into();
    let fetch_wait = if options.brokers.is_none() {
        if !config.kafka.sets(ClientRole::Consumer, FETCH_WAIT) {
            config
                .kafka
                .insert(format!("consumer.{FETCH_WAIT}"), MOCK_FETCH_WAIT_MS.into());
        }
        config
            .kafka
            .for_role(ClientRole::Consumer)
            .get(FETCH_WAIT)
            .map(|wait| wait.to_string())
    } else {
        None
    };
    // Every window becomes an event, so every window's close → ack time is measured.
    config.detect.threshold = Some(1e-12);
    let loaded = pipeline::load_model(&config)?;
    let stats = Arc::new(Stats::default());
    stats.record_latencies();
    let running = pipeline::spawn(&config, loaded, Arc::clone(&stats), Scoring::On);
    // Offer the load in real time only once the group owns every partition: readings that
    // waited for the assignment would arrive as one burst and measure the rebalance.
    let deadline = Instant::now() + Duration::from_secs(60);
    while running.health.assigned_partitions() < options.partitions as usize {
        anyhow::ensure!(!running.task.is_finished(), "the pipeline stopped early");
        anyhow::ensure!(
            Instant::now() < deadline,
            "the latency run's consumer was not assigned all {} partitions within 60 s",
            options.partitions
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let producer = producer(client)?;
    let batches = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
    let mut plant = plant(options);
    let per_step = (options.cells * options.nodes_per_cell) as f64;
    let steps_per_second = rate / per_step;
    let started = Instant::now();
    let mut step = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let due = (started.elapsed().as_secs_f64() * steps_per_second) as u64;
        while step < due {
            for (cell, readings) in simulate::by_cell(&plant.step()) {
                send(
                    &producer,
                    "bench-latency",
                    None,
                    &cell,
                    &batches.encode(&records::batch_to_value(&readings))?,
                )?;
            }
            step += 1;
        }
        producer.poll(Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    producer.flush(Duration::from_secs(30))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.cancel.cancel();
    running.task.await??;
    let mut latencies = stats.latencies();
    latencies.sort_by(f64::total_cmp);
    let mut scored = stats.scored_latencies();
    scored.sort_by(f64::total_cmp);
    let quantile = |sorted: &[f64], q: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |s| s * 1e3)
    };
    let pick = |q: f64| quantile(&latencies, q);
    Ok(LatencyResult {
        offered_readings_per_second: rate,
        fetch_wait_ms: fetch_wait,
        batches: stats.snapshot().inference_batches,
        scored_p50_ms: quantile(&scored, 0.5),
        scored_p99_ms: quantile(&scored, 0.99),
        events: latencies.len(),
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: latencies.last().map_or(0.0, |s| s * 1e3),
    })
}

/// Runs every stage and returns the results.
pub async fn run(options: BenchOptions, progress: impl Fn(&str)) -> anyhow::Result<BenchReport> {
    let mut client = ClientConfig::new();
    let topics = [
        (NODES, 1),
        (topic(PayloadKind::Reading), options.partitions),
        (topic(PayloadKind::Batch), options.partitions),
        ("bench-latency", options.partitions),
        ("bench-anomalies", options.partitions),
        ("bench-dlq", 1),
    ];
    let (cluster, broker) = match &options.brokers {
        None => {
            let cluster = MockCluster::new(1)?;
            client.set("bootstrap.servers", cluster.bootstrap_servers());
            for (name, partitions) in topics {
                cluster.create_topic(name, partitions, 1)?;
            }
            (
                Some(cluster),
                "librdkafka mock cluster (in process)".to_owned(),
            )
        }
        Some(brokers) => {
            client.set("bootstrap.servers", brokers);
            let admin: AdminClient<_> = client.create()?;
            let topics: Vec<NewTopic> = topics
                .into_iter()
                .map(|(name, p)| NewTopic::new(name, p, TopicReplication::Fixed(1)))
                .collect();
            admin.create_topics(&topics, &AdminOptions::new()).await?;
            (None, format!("Kafka at {brokers}"))
        }
    };
    let per_step = (options.cells * options.nodes_per_cell) as u64;
    let steps = options.readings.div_ceil(per_step);
    let readings = steps * per_step;
    progress(&format!("producing {readings} readings to each topic"));
    let (singles, batched) = {
        let (client, options) = (client.clone(), options.clone());
        tokio::task::spawn_blocking(move || produce_data(&client, &options, steps)).await??
    };
    let mut stages = Vec::new();
    for (kind, messages) in [
        (PayloadKind::Reading, singles),
        (PayloadKind::Batch, batched),
    ] {
        let rounds = options.repeat.max(1);
        let round_of = |round: usize| {
            if rounds > 1 {
                format!(" (run {} of {rounds})", round + 1)
            } else {
                String::new()
            }
        };
        let measured = [
            ("ceiling", None),
            ("ingest", Some(Scoring::Off)),
            ("full", Some(Scoring::On)),
        ];
        for (stage, scoring) in measured {
            let mut runs = Vec::new();
            for round in 0..rounds {
                progress(&format!("{stage} on {}{}", topic(kind), round_of(round)));
                let (seconds, cpu, rss, windows) = match scoring {
                    None => {
                        let client = client.clone();
                        let (seconds, cpu, rss) = tokio::task::spawn_blocking(move || {
                            ceiling(&client, topic(kind), messages)
                        })
                        .await??;
                        (seconds, cpu, rss, 0)
                    }
                    Some(scoring) => {
                        pipeline_stage(&client, kind, scoring, messages, options.batch_steps, round)
                            .await?
                    }
                };
                runs.push(StageResult {
                    stage,
                    payload: kind,
                    readings,
                    seconds,
                    cpu_seconds: cpu,
                    peak_rss_bytes: rss,
                    windows,
                    runs: Vec::new(),
                });
            }
            stages.push(median(runs));
        }
    }
    let latency = if options.latency_seconds > 0 {
        let full_batch = stages
            .iter()
            .find(|s| s.stage == "full" && s.payload == PayloadKind::Batch)
            .map_or(10_000.0, StageResult::readings_per_second);
        let rate = options.latency_rate.unwrap_or(full_batch / 2.0);
        progress(&format!("latency at {rate:.0} readings/s"));
        Some(latency_stage(&client, &options, rate, options.latency_seconds).await?)
    } else {
        None
    };
    drop(cluster);
    let window_state_bytes = window_state(&options, steps.min(200))?;
    Ok(BenchReport {
        broker,
        window_state_bytes,
        node_windows_per_window: options.nodes_per_cell,
        options,
        stages,
        latency,
    })
}

fn payload_name(kind: PayloadKind) -> &'static str {
    match kind {
        PayloadKind::Reading => "single",
        PayloadKind::Batch => "batch",
    }
}

/// The report as a table.
pub fn report_text(r: &BenchReport) -> String {
    let mut out = format!(
        "gridwatch bench: {} readings per topic ({} cells x {} nodes), {} partitions, broker: {}\n\n",
        r.stages.first().map_or(0, |s| s.readings),
        r.options.cells,
        r.options.nodes_per_cell,
        r.options.partitions,
        r.broker
    );
    out.push_str(&format!(
        "{:<8} {:<8} {:>12} {:>10} {:>14} {:>10} {:>12}\n",
        "payload", "stage", "readings/s", "vs ceiling", "cpu-s/M rdgs", "peak RSS", "windows/s"
    ));
    for s in &r.stages {
        let ceiling = r
            .stages
            .iter()
            .find(|c| c.stage == "ceiling" && c.payload == s.payload)
            .map_or(1.0, StageResult::readings_per_second);
        let payload = payload_name(s.payload);
        let windows = if s.windows > 0 {
            format!("{:.0}", s.windows as f64 / s.seconds.max(1e-9))
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "{:<8} {:<8} {:>12.0} {:>9.0}% {:>14.2} {:>8} MB {:>12}\n",
            payload,
            s.stage,
            s.readings_per_second(),
            s.readings_per_second() / ceiling * 100.0,
            s.cpu_seconds_per_million(),
            s.peak_rss_bytes / (1 << 20),
            windows
        ));
    }
    if r.options.repeat > 1 {
        out.push_str(&format!(
            "\neach row is the median of {} runs; every run's readings/s, in the order run:\n",
            r.options.repeat
        ));
        for s in &r.stages {
            let runs: Vec<String> = s.runs.iter().map(|v| format!("{v:.0}")).collect();
            let payload = payload_name(s.payload);
            out.push_str(&format!(
                "  {payload:<8} {:<8} {}\n",
                s.stage,
                runs.join(", ")
            ));
        }
    }
    let (held, raw) = r.window_state_bytes;
    out.push_str(&format!(
        "\nwindow state: {} KiB held for {} KiB of raw f32 tensor ({:.2}x)\n",
        held / 1024,
        raw / 1024,
        held as f64 / raw.max(1) as f64
    ));
    if let Some(l) = &r.latency {
        out.push_str(&format!(
            "\nlatency, full pipeline at {:.0} readings/s offered, window close -> event acknowledged, {} windows:\n  p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms\n",
            l.offered_readings_per_second, l.events, l.p50_ms, l.p99_ms, l.max_ms
        ));
        out.push_str(&format!(
            "  of which window close -> scored: p50 {:.1} ms   p99 {:.1} ms ({} inference batches)\n",
            l.scored_p50_ms, l.scored_p99_ms, l.batches
        ));
        if let Some(wait) = &l.fetch_wait_ms {
            out.push_str(&format!(
                "  (mock cluster: fetch.wait.max.ms = {wait}; the mock answers a fetch that found no data only after the whole wait, a broker as soon as data arrives)\n"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seconds: f64) -> StageResult {
        StageResult {
            stage: "ingest",
            payload: PayloadKind::Reading,
            readings: 1_000,
            seconds,
            cpu_seconds: seconds / 2.0,
            peak_rss_bytes: 0,
            windows: 0,
            runs: Vec::new(),
        }
    }

    #[test]
    fn a_stage_reports_its_median_run_and_every_rate_in_order() {
        let m = median(vec![run(1.0), run(4.0), run(2.0)]);
        assert_eq!(m.seconds, 2.0, "the middle rate is 500 readings/s");
        assert_eq!(
            m.cpu_seconds, 1.0,
            "the whole median run, not a mix of runs"
        );
        assert_eq!(m.runs, vec![1000.0, 250.0, 500.0]);
        // An even count takes the lower of the two middle rates.
        assert_eq!(median(vec![run(1.0), run(2.0)]).seconds, 2.0);
        assert_eq!(median(vec![run(3.0)]).runs, vec![1000.0 / 3.0]);
    }
}
