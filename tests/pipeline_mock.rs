//! The whole pipeline on librdkafka's in-process mock cluster, with the real model.
//!
//! Readings of a simulated two-line plant are produced with one planted fault and one message of
//! each kind of bad input. The events read back from the anomaly topic must be exactly the events
//! that the same readings give when pushed straight through assemble → infer → detect (no Kafka),
//! must all point at the planted fault, and the dead-letter topic must hold exactly the bad
//! inputs with the right reasons and source coordinates.

mod common;

use std::sync::Arc;
use std::time::Duration;

use gridwatch::assemble::{Assembler, Provenance};
use gridwatch::config::{Config, TopicConfig};
use gridwatch::decode::PayloadKind;
use gridwatch::pipeline::{self, Scoring};
use gridwatch::schema::{
    AnomalyEvent, Codec, DeadLetterReason, Reading, RecordKind, WireFormat, dead_letter_headers,
    records,
};
use gridwatch::simulate::{self, Plant, PlantSpec};
use gridwatch::telemetry::Stats;
use rdkafka::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

const READINGS: &str = "readings";
const NODES: &str = "spatial-nodes";
const STEPS: u64 = 120;
/// Steps of the planted fault: line-2/m03 runs 10 °C hot.
const FAULT: std::ops::Range<u64> = 70..90;
const FAULTY_NODE: &str = "line-2/m03";

fn plant() -> Plant {
    Plant::new(PlantSpec {
        lines: 2,
        machines_per_line: 4,
        mean_steps_between_faults: None,
        seed: 11,
        ..PlantSpec::default()
    })
}

/// The readings of each step, per cell, with the planted fault.
fn steps() -> Vec<Vec<(String, Vec<Reading>)>> {
    let mut plant = plant();
    (0..STEPS)
        .map(|step| {
            let mut cells = simulate::by_cell(&plant.step());
            for reading in cells.iter_mut().flat_map(|(_, list)| list.iter_mut()) {
                if reading.node_id == FAULTY_NODE && FAULT.contains(&step) {
                    reading.values[1].1 += 10.0;
                }
            }
            cells
        })
        .collect()
}

/// A mock cluster with the topics the tests use and the plant's spatial-node records.
struct Fixture {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    bootstrap: String,
    producer: FutureProducer,
}

impl Fixture {
    async fn new() -> Self {
        gridwatch::telemetry::init_logging(Default::default(), "warn");
        let cluster = MockCluster::new(1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        cluster.create_topic(READINGS, 2, 1).unwrap();
        cluster.create_topic(NODES, 1, 1).unwrap();
        cluster.create_topic("anomalies", 2, 1).unwrap();
        cluster.create_topic("gridwatch-dlq", 1, 1).unwrap();
        let producer: FutureProducer = common::client(&bootstrap).create().unwrap();
        let nodes = Codec::new(RecordKind::SpatialNode, WireFormat::Plain);
        for node in simulate::node_records(&plant()) {
            let payload = nodes.encode(&node.to_value()).unwrap();
            common::produce(&producer, NODES, &node.node_id, &payload).await;
        }
        Self {
            cluster,
            bootstrap,
            producer,
        }
    }

    /// Produces one batch per cell and step, keyed by cell; returns the number of messages.
    async fn produce_steps(&self) -> i64 {
        self.produce_steps_placed().await.len() as i64
    }

    /// Produces one batch per cell and step, keyed by cell; returns where each landed:
    /// (step, cell, partition, offset).
    async fn produce_steps_placed(&self) -> Vec<(u64, String, i32, i64)> {
        let batches = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
        let mut placed = Vec::new();
        for (step, cells) in steps().into_iter().enumerate() {
            for (cell, readings) in &cells {
                let payload = batches.encode(&records::batch_to_value(readings)).unwrap();
                let (partition, offset) =
                    common::produce(&self.producer, READINGS, cell, &payload).await;
                placed.push((step as u64, cell.clone(), partition, offset));
            }
        }
        placed
    }

    /// Drops the clients before the cluster, so nothing reports the cluster gone.
    fn close(self) {
        drop(self.producer);
        drop(self.cluster);
    }
}

fn config(bootstrap: &str) -> Config {
    let mut config = Config::default();
    config
        .kafka
        .insert("bootstrap.servers".into(), bootstrap.into());
    config.source.topics = vec![TopicConfig {
        name: READINGS.into(),
        payload: PayloadKind::Batch,
    }];
    config.source.commit_interval = Duration::from_millis(100);
    // A run that stops without draining (the shutdown-deadline tests) leaves its member behind;
    // the next run of the group should not wait librdkafka's default 45 s for it to expire.
    config
        .kafka
        .insert("consumer.session.timeout.ms".into(), "6000".into());
    config.registry.topic = NODES.into();
    config.infer.max_wait = Duration::from_millis(1);
    config.validate().unwrap();
    config
}

/// Two bad readings made from a step's `readings`: one of a node no spatial-node record names,
/// and one with a NaN value.
fn unknown_and_nan(readings: &[Reading]) -> (Reading, Reading) {
    let mut unknown = readings[0].clone();
    unknown.node_id = "ghost".into();
    let mut nan = readings[1].clone();
    nan.values[2].1 = f64::NAN;
    (unknown, nan)
}

/// The events the same readings give without Kafka: assemble, infer in batches, detect.
fn reference_events(config: &Config) -> Vec<AnomalyEvent> {
    let loaded = pipeline::load_model(config).unwrap();
    let mut model = loaded.model;
    let mut assembler = Assembler::new(loaded.spec);
    let mut windows = Vec::new();
    let mut offset = 0;
    for step in steps() {
        for (cell, readings) in step {
            let cell: Arc<str> = Arc::from(cell.as_str());
            for r in readings {
                let node: Arc<str> = Arc::from(r.node_id.as_str());
                let at = Provenance {
                    partition: 0,
                    offset,
                };
                assembler.add(&cell, &node, &r, at, &mut windows);
            }
            offset += 1;
        }
    }
    let reconstructions = model.run(&windows).unwrap();
    let mut events: Vec<AnomalyEvent> = windows
        .iter()
        .zip(&reconstructions)
        .filter_map(|(w, r)| loaded.detector.detect(w, r).1)
        .collect();
    events.sort_by(|a, b| (&a.cell_id, a.window_end_ms).cmp(&(&b.cell_id, b.window_end_ms)));
    events
}

/// Asserts that the anomaly topic holds exactly the events `want` (in the reference's order:
/// by cell, then window end).
fn assert_published(bootstrap: &str, want: &[AnomalyEvent]) {
    let codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain);
    let mut got: Vec<AnomalyEvent> = common::read_all(bootstrap, "anomalies")
        .iter()
        .map(|m| AnomalyEvent::from_value(&codec.decode(m.payload().unwrap()).unwrap()).unwrap())
        .collect();
    got.sort_by(|a, b| (&a.cell_id, a.window_end_ms).cmp(&(&b.cell_id, b.window_end_ms)));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_same_event(g, w);
    }
}

fn assert_same_event(got: &AnomalyEvent, want: &AnomalyEvent) {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
    assert_eq!(got.event_id, want.event_id);
    assert_eq!(
        (
            &got.cell_id,
            got.window_start_ms,
            got.window_end_ms,
            got.severity,
            got.node_count
        ),
        (
            &want.cell_id,
            want.window_start_ms,
            want.window_end_ms,
            want.severity,
            want.node_count
        )
    );
    assert!(
        close(got.score, want.score),
        "{} vs {}",
        got.score,
        want.score
    );
    assert_eq!(got.contributors.len(), want.contributors.len());
    for (g, w) in got.contributors.iter().zip(&want.contributors) {
        assert_eq!((&g.node_id, &g.channel), (&w.node_id, &w.channel));
        assert!(close(g.share, w.share));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_publishes_the_expected_events_and_dead_letters() {
    let metrics = gridwatch::admin::metrics_handle();
    let fixture = Fixture::new().await;
    let (bootstrap, producer) = (fixture.bootstrap.clone(), &fixture.producer);
    let mut config = config(&bootstrap);
    // Window ends on multiples of the hop: with this plant seed every event is then about the
    // planted fault, which the checks below rely on. Staggered ends cut other windows, and some
    // of line-1's score above the threshold with no fault; the routed test runs staggered.
    config.assemble.stagger_windows = false;

    // Readings, with the four kinds of bad input planted after step 100.
    let batches = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
    let mut produced = 0u64;
    let mut bad = Vec::new();
    for (step, cells) in steps().into_iter().enumerate() {
        for (cell, readings) in &cells {
            let payload = batches.encode(&records::batch_to_value(readings)).unwrap();
            common::produce(producer, READINGS, cell, &payload).await;
            produced += 1;
        }
        if step == 100 {
            let (cell, readings) = &cells[0];
            let (unknown, nan) = unknown_and_nan(readings);
            let mut late = readings[2].clone();
            late.event_time_ms -= 30_000;
            let garbage = b"\x02\xffnot avro".to_vec();
            let mut future = readings[0].clone();
            future.event_time_ms = i64::MAX;
            let flow_only = Reading {
                values: vec![("flow".into(), 3.5)],
                ..readings[3].clone()
            };
            let cases = [
                (DeadLetterReason::Undecodable, garbage.clone(), None),
                (
                    DeadLetterReason::UnknownNode,
                    batches
                        .encode(&records::batch_to_value(std::slice::from_ref(&unknown)))
                        .unwrap(),
                    Some(unknown),
                ),
                (
                    // The first reading is usable (it only has a channel the model ignores);
                    // only the second is dead-lettered.
                    DeadLetterReason::InvalidValue,
                    batches
                        .encode(&records::batch_to_value(&[flow_only, nan.clone()]))
                        .unwrap(),
                    Some(nan),
                ),
                (
                    // A timestamp far ahead of the wall clock would drag the watermark along.
                    DeadLetterReason::InvalidValue,
                    batches
                        .encode(&records::batch_to_value(&[future.clone()]))
                        .unwrap(),
                    Some(future),
                ),
                (
                    DeadLetterReason::Late,
                    batches
                        .encode(&records::batch_to_value(&[late.clone()]))
                        .unwrap(),
                    Some(late),
                ),
            ];
            for (reason, payload, reading) in cases {
                let (partition, offset) = common::produce(producer, READINGS, cell, &payload).await;
                produced += 1;
                bad.push((reason, partition, offset, payload, reading));
            }
        }
    }

    let loaded = pipeline::load_model(&config).unwrap();
    let running = pipeline::spawn(&config, loaded, Arc::new(Stats::default()), Scoring::On);
    let (stats, health, cancel, run) =
        (running.stats, running.health, running.cancel, running.task);
    // Wait until every message is consumed and every emitted window scored.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats.snapshot();
        if s.messages_consumed == produced
            && s.windows_scored == s.windows_emitted
            && s.windows_emitted > 0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipeline stalled: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        health.failing_checks(),
        Vec::<&str>::new(),
        "ready while running"
    );
    cancel.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(health.assigned_partitions(), 0, "left the group");

    // The metrics an operator scrapes, by name and bounded labels.
    let rendered = metrics.render();
    for name in [
        "gridwatch_messages_consumed_total{topic=\"readings\"}",
        "gridwatch_readings_decoded_total",
        "gridwatch_dead_lettered_total{reason=\"late\"}",
        "gridwatch_dead_lettered_total{reason=\"undecodable\"}",
        "gridwatch_windows_emitted_total",
        "gridwatch_windows_skipped_total{reason=\"warmup\"}",
        "gridwatch_inference_batch_size_bucket",
        "gridwatch_inference_seconds_bucket",
        "gridwatch_window_score_bucket",
        "gridwatch_events_published_total{severity=",
        "gridwatch_event_latency_seconds_bucket",
        "gridwatch_model_info{model=\"plant-attention\",version=\"1\",provider=\"cpu\"}",
        "gridwatch_offset_stores_total",
    ] {
        assert!(
            rendered.contains(name),
            "/metrics lacks {name}:\n{rendered}"
        );
    }
    for forbidden in ["line-1", "line-2", "/m0"] {
        assert!(
            !rendered.contains(forbidden),
            "a metric label carries a cell or node id"
        );
    }

    // Events: exactly the reference, all about the planted fault.
    let want = reference_events(&config);
    let event_codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain);
    let mut got: Vec<AnomalyEvent> = common::read_all(&bootstrap, "anomalies")
        .iter()
        .map(|m| {
            let event =
                AnomalyEvent::from_value(&event_codec.decode(m.payload().unwrap()).unwrap())
                    .unwrap();
            assert_eq!(
                m.key(),
                Some(event.cell_id.as_bytes()),
                "events are keyed by cell"
            );
            event
        })
        .collect();
    got.sort_by(|a, b| (&a.cell_id, a.window_end_ms).cmp(&(&b.cell_id, b.window_end_ms)));
    assert!(!want.is_empty(), "the planted fault must be detected");
    assert_eq!(got.len(), want.len(), "got {got:#?}\nwant {want:#?}");
    for (g, w) in got.iter().zip(&want) {
        assert_same_event(g, w);
    }
    let start = PlantSpec::default().start_ms;
    for event in &got {
        assert_eq!(event.cell_id, "line-2");
        assert_eq!(event.contributors[0].node_id, FAULTY_NODE);
        assert_eq!(event.contributors[0].channel, "temperature");
        // The scored steps overlap the fault, or its wake within one window.
        let fault = (
            start + FAULT.start as i64 * 1_000,
            start + (FAULT.end as i64 + 16) * 1_000,
        );
        assert!(
            event.window_end_ms > fault.0 && event.window_end_ms - 4_000 < fault.1,
            "{event:?}"
        );
    }
    assert_eq!(stats.events_total() as usize, got.len());

    // Dead letters: exactly the four bad inputs, with reasons and source coordinates.
    let letters = common::read_all(&bootstrap, "gridwatch-dlq");
    assert_eq!(letters.len(), bad.len());
    let reading_codec = Codec::new(RecordKind::Reading, WireFormat::Plain);
    for (reason, partition, offset, payload, reading) in &bad {
        let letter = dead_letter(&letters, *reason, READINGS, *partition, *offset);
        match reading {
            // Whole undecodable messages keep their bytes.
            None => assert_eq!(letter.payload(), Some(payload.as_slice())),
            // A bad reading of a batch comes alone, as a Reading, with its index in the batch.
            Some(reading) => {
                let value = reading_codec.decode(letter.payload().unwrap()).unwrap();
                let decoded = Reading::from_value(&value).unwrap();
                assert_eq!(decoded.node_id, reading.node_id);
                assert_eq!(decoded.event_time_ms, reading.event_time_ms);
                // The header points at the reading within the original batch.
                let index: usize = common::header(letter, dead_letter_headers::BATCH_INDEX)
                    .expect("a batch index")
                    .parse()
                    .unwrap();
                let original =
                    records::batch_from_value(&batches.decode(payload).unwrap()).unwrap();
                assert_eq!(original[index].node_id, reading.node_id);
                assert_eq!(original[index].event_time_ms, reading.event_time_ms);
            }
        }
        let expected = bad.iter().filter(|b| b.0 == *reason).count() as u64;
        assert_eq!(stats.dead_lettered(*reason), expected);
    }

    // Offsets: committed, never past a reading still needed by an open window.
    assert!(!report.committed.is_empty());
    for (topic, _, offset) in &report.committed {
        assert_eq!(topic, READINGS);
        assert!(*offset >= 0);
    }
    let total_committed: i64 = report.committed.iter().map(|c| c.2).sum();
    assert!(
        total_committed < produced as i64,
        "the last steps are still open and hold their offsets"
    );
    fixture.close();
}

/// A topic of single-reading messages, spread over three partitions, is read in chunks beside
/// the consuming loop: every valid reading is accepted, in the same windows and events as the
/// batches give, and a refused message's dead letter carries that message's own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_reading_messages_dead_letter_their_own_bytes() {
    const SINGLES: &str = "single-readings";
    let fixture = Fixture::new().await;
    fixture.cluster.create_topic(SINGLES, 3, 1).unwrap();
    let mut config = config(&fixture.bootstrap);
    config.source.topics = vec![TopicConfig {
        name: SINGLES.into(),
        payload: PayloadKind::Reading,
    }];
    config.validate().unwrap();

    let codec = Codec::new(RecordKind::Reading, WireFormat::Plain);
    let mut produced = 0u64;
    let mut bad = Vec::new();
    for (step, cells) in steps().into_iter().enumerate() {
        for (cell, readings) in &cells {
            for reading in readings {
                let payload = codec.encode(&reading.to_value()).unwrap();
                common::produce(&fixture.producer, SINGLES, cell, &payload).await;
                produced += 1;
            }
        }
        if step == 100 {
            let (cell, readings) = &cells[0];
            let (unknown, nan) = unknown_and_nan(readings);
            let cases = [
                (DeadLetterReason::Undecodable, b"\x02\xffnot avro".to_vec()),
                (
                    DeadLetterReason::UnknownNode,
                    codec.encode(&unknown.to_value()).unwrap(),
                ),
                (
                    DeadLetterReason::InvalidValue,
                    codec.encode(&nan.to_value()).unwrap(),
                ),
            ];
            for (reason, payload) in cases {
                let (partition, offset) =
                    common::produce(&fixture.producer, SINGLES, cell, &payload).await;
                produced += 1;
                bad.push((reason, partition, offset, payload));
            }
        }
    }

    let (stats, cancel, task) = start(&config);
    let want = reference_events(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats.snapshot();
        if s.messages_consumed == produced
            && s.windows_emitted > 0
            && s.windows_scored == s.windows_emitted
            && stats.events_total() as usize >= want.len()
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "stalled: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    task.await.unwrap().unwrap();
    let s = stats.snapshot();
    assert_eq!(s.readings_accepted, produced - bad.len() as u64);
    assert_eq!(s.dead_lettered, bad.len() as u64);

    assert_published(&fixture.bootstrap, &want);

    let letters = common::read_all(&fixture.bootstrap, "gridwatch-dlq");
    assert_eq!(letters.len(), bad.len());
    for (reason, partition, offset, payload) in &bad {
        let letter = dead_letter(&letters, *reason, SINGLES, *partition, *offset);
        assert_eq!(letter.payload(), Some(payload.as_slice()));
        assert_eq!(
            common::header(letter, dead_letter_headers::BATCH_INDEX),
            None
        );
    }
    fixture.close();
}

/// The dead letter of the message at `partition`/`offset` of `topic`, after checking that it
/// says so in its headers, with `reason` and an error message.
fn dead_letter<'a>(
    letters: &'a [rdkafka::message::OwnedMessage],
    reason: DeadLetterReason,
    topic: &str,
    partition: i32,
    offset: i64,
) -> &'a rdkafka::message::OwnedMessage {
    let letter = letters
        .iter()
        .find(|m| {
            common::header(m, dead_letter_headers::SOURCE_OFFSET) == Some(offset.to_string())
                && common::header(m, dead_letter_headers::SOURCE_PARTITION)
                    == Some(partition.to_string())
        })
        .unwrap_or_else(|| panic!("no dead letter for {reason:?} at {partition}/{offset}"));
    assert_eq!(
        common::header(letter, dead_letter_headers::REASON).as_deref(),
        Some(reason.as_str())
    );
    assert_eq!(
        common::header(letter, dead_letter_headers::SOURCE_TOPIC).as_deref(),
        Some(topic)
    );
    assert!(common::header(letter, dead_letter_headers::ERROR).is_some_and(|e| !e.is_empty()));
    letter
}

/// Starts the pipeline on `config` and returns its stats, cancel token and task.
fn start(
    config: &Config,
) -> (
    Arc<Stats>,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<pipeline::RunReport>>,
) {
    let loaded = pipeline::load_model(config).unwrap();
    let running = pipeline::spawn(config, loaded, Arc::new(Stats::default()), Scoring::On);
    (running.stats, running.cancel, running.task)
}

/// Waits until the run has emitted `n` windows; fails after a minute.
async fn windows_emitted(stats: &Stats, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stats.snapshot().windows_emitted < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled: {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A graceful stop while windows are in flight, then a restart of the same group from the
/// committed offsets: every event of the reference is published, any duplicate is byte-identical,
/// and nothing else is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_and_restart_lose_nothing() {
    let fixture = Fixture::new().await;
    let bootstrap = fixture.bootstrap.clone();
    let config = config(&bootstrap);
    let produced = fixture.produce_steps().await;

    // First run: stop as soon as the fault's windows are being scored.
    let (stats, cancel, task) = start(&config);
    windows_emitted(&stats, 30).await;
    cancel.cancel();
    let first = task.await.unwrap().unwrap();
    let s = stats.snapshot();
    assert_eq!(
        s.windows_scored, s.windows_emitted,
        "the drain scored every emitted window"
    );
    let committed: i64 = first.committed.iter().map(|c| c.2).sum();
    assert!(committed < produced, "the first run stopped before the end");

    // Second run, same group: resumes from the committed offsets.
    let (stats, cancel, task) = start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats.snapshot();
        if s.messages_consumed as i64 == produced - committed
            && s.windows_scored == s.windows_emitted
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "second run stalled: {s:?}; {produced} produced, {committed} committed by the first run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    task.await.unwrap().unwrap();

    let want = reference_events(&config);
    assert!(!want.is_empty());
    let messages = common::read_all(&bootstrap, "anomalies");
    let codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain);
    let mut by_id: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut duplicates = 0;
    for m in &messages {
        let payload = m.payload().unwrap().to_vec();
        let event = AnomalyEvent::from_value(&codec.decode(&payload).unwrap()).unwrap();
        if let Some(previous) = by_id.insert(event.event_id.clone(), payload.clone()) {
            assert_eq!(
                previous, payload,
                "a duplicate of {} differs",
                event.event_id
            );
            duplicates += 1;
        }
    }
    let want_ids: std::collections::BTreeSet<&str> =
        want.iter().map(|e| e.event_id.as_str()).collect();
    let got_ids: std::collections::BTreeSet<&str> = by_id.keys().map(String::as_str).collect();
    assert_eq!(
        got_ids, want_ids,
        "every reference event, and nothing else ({duplicates} duplicates)"
    );
    fixture.close();
}

/// The commit of a graceful stop is the group's last word: a periodic auto-commit of an older
/// stored offset, sent while that commit waits for the broker, must not land after it and move
/// the group back (the next run would do again what this one finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_commit_is_not_overtaken_by_an_older_one() {
    let fixture = Fixture::new().await;
    let config = config(&fixture.bootstrap);
    fixture.produce_steps().await;
    // Answers slower than the commit interval (100 ms): the job consumes slowly, its stored
    // offsets run ahead of the last answered commit, and periodic commits go out while the final
    // one is unanswered.
    fixture
        .cluster
        .broker_round_trip_time(1, Duration::from_millis(150))
        .unwrap();
    let (stats, cancel, task) = start(&config);
    windows_emitted(&stats, 2).await;
    cancel.cancel();
    let report = task.await.unwrap().unwrap();
    fixture
        .cluster
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    assert!(!report.committed.is_empty());
    let on_broker = committed(&fixture.bootstrap, &config.source.group_id);
    for (topic, partition, offset) in &report.committed {
        assert_eq!(
            on_broker.get(partition),
            Some(offset),
            "{topic} [{partition}]: the broker holds {on_broker:?}, the stop committed {:?}",
            report.committed
        );
    }
    fixture.close();
}

/// A shutdown that cannot drain within `[pipeline] shutdown_timeout` is an error (the binary
/// exits non-zero), and still commits only what was complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_shutdown_deadline_is_an_error() {
    let fixture = Fixture::new().await;
    let mut config = config(&fixture.bootstrap);
    config.pipeline.shutdown_timeout = Duration::from_millis(200);
    // Every window becomes an event, so events are in flight when the stop comes.
    config.detect.threshold = Some(1e-12);
    fixture.produce_steps().await;
    let (stats, cancel, task) = start(&config);
    windows_emitted(&stats, 5).await;
    // The broker now answers after two seconds: acknowledgements cannot arrive in time.
    fixture
        .cluster
        .broker_round_trip_time(1, Duration::from_secs(2))
        .unwrap();
    cancel.cancel();
    let error = task.await.unwrap().unwrap_err().to_string();
    assert!(error.contains("shutdown_timeout"), "{error}");
    fixture
        .cluster
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    fixture.close();
}

/// The committed offset of each partition of the readings topic for `group`.
fn committed(bootstrap: &str, group: &str) -> std::collections::BTreeMap<i32, i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = common::client(bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(READINGS, 0);
    tpl.add_partition(READINGS, 1);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                rdkafka::Offset::Offset(o) => o,
                _ => 0,
            };
            (e.partition(), offset)
        })
        .collect()
}

/// The output topic is unavailable for a while (its partitions have no leader). Events back up
/// without failing the job; no offset is committed past a reading of a window whose event is
/// unacknowledged, neither by the periodic commits nor by a shutdown that misses its deadline;
/// once the topic is back, a restart publishes every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_output_topic_commits_nothing_unpublished() {
    let fixture = Fixture::new().await;
    let bootstrap = fixture.bootstrap.clone();
    let mut config = config(&bootstrap);
    config.pipeline.shutdown_timeout = Duration::from_secs(1);
    let want = reference_events(&config);
    assert!(!want.is_empty());
    for partition in 0..2 {
        fixture
            .cluster
            .partition_leader("anomalies", partition, None)
            .unwrap();
    }
    let placed = fixture.produce_steps_placed().await;
    // The least offset, per partition, of a reading in a window that gives an event.
    let start_ms = PlantSpec::default().start_ms;
    let mut bound: std::collections::BTreeMap<i32, i64> = Default::default();
    for event in &want {
        for (step, cell, partition, offset) in &placed {
            let t = start_ms + *step as i64 * 1_000;
            if *cell == event.cell_id && t >= event.window_start_ms && t < event.window_end_ms {
                let b = bound.entry(*partition).or_insert(i64::MAX);
                *b = (*b).min(*offset);
            }
        }
    }

    let (stats, cancel, task) = start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats.snapshot();
        if s.messages_consumed as usize == placed.len() && s.windows_scored == s.windows_emitted {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "stalled: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several commit intervals pass with every event still unacknowledged.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stats.events_total(), 0, "nothing can be acknowledged");
    let during = committed(&bootstrap, "gridwatch");
    for (partition, limit) in &bound {
        assert!(
            during.get(partition).copied().unwrap_or(0) <= *limit,
            "committed {during:?} passes an unpublished window (bounds {bound:?})"
        );
    }
    assert!(
        during.values().any(|o| *o > 0),
        "offsets before the events' windows are committed: {during:?}"
    );
    cancel.cancel();
    let error = task.await.unwrap().unwrap_err().to_string();
    assert!(error.contains("shutdown_timeout"), "{error}");
    let after_stop = committed(&bootstrap, "gridwatch");
    for (partition, limit) in &bound {
        assert!(after_stop.get(partition).copied().unwrap_or(0) <= *limit);
    }

    // The topic comes back; the restarted job publishes every event.
    for partition in 0..2 {
        fixture
            .cluster
            .partition_leader("anomalies", partition, Some(1))
            .unwrap();
    }
    let (stats, cancel, task) = start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (stats.events_total() as usize) < want.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events missing: {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    task.await.unwrap().unwrap();
    let codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain);
    let mut by_id: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let messages = common::read_all(&bootstrap, "anomalies");
    for m in &messages {
        let payload = m.payload().unwrap().to_vec();
        let event = AnomalyEvent::from_value(&codec.decode(&payload).unwrap()).unwrap();
        if let Some(previous) = by_id.insert(event.event_id.clone(), payload.clone()) {
            assert_eq!(previous, payload, "a duplicate differs");
        }
    }
    let want_ids: std::collections::BTreeSet<&str> =
        want.iter().map(|e| e.event_id.as_str()).collect();
    let got_ids: std::collections::BTreeSet<&str> = by_id.keys().map(String::as_str).collect();
    println!(
        "checker: output topic outage: expected {}, found {}, duplicates {}, lost {}; committed during the outage {during:?}, after the failed stop {after_stop:?}, bounds {bound:?}",
        want_ids.len(),
        got_ids.intersection(&want_ids).count(),
        messages.len() - by_id.len(),
        want_ids.difference(&got_ids).count()
    );
    assert_eq!(got_ids, want_ids);
    fixture.close();
}

/// Readings keyed by sensor, one `Reading` per message, go through `gridwatch route` into a
/// cell-keyed topic; the run job on that topic publishes exactly the reference events. A reading
/// of an unknown node is dead-lettered by the route stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_sensor_keyed_readings_give_the_reference_events() {
    let metrics = gridwatch::admin::metrics_handle();
    let fixture = Fixture::new().await;
    let bootstrap = fixture.bootstrap.clone();
    fixture.cluster.create_topic("raw-readings", 1, 1).unwrap();
    let mut config = config(&bootstrap);
    config.route.topics = vec![TopicConfig {
        name: "raw-readings".into(),
        payload: PayloadKind::Reading,
    }];
    config.route.output_topic = READINGS.into();
    config.validate().unwrap();

    let codec = Codec::new(RecordKind::Reading, WireFormat::Plain);
    let mut produced = 0;
    for (step, cells) in steps().into_iter().enumerate() {
        for reading in cells.iter().flat_map(|(_, list)| list) {
            let payload = codec.encode(&reading.to_value()).unwrap();
            common::produce(
                &fixture.producer,
                "raw-readings",
                &reading.node_id,
                &payload,
            )
            .await;
            produced += 1;
        }
        if step == 50 {
            let ghost = Reading {
                node_id: "ghost".into(),
                ..cells[0].1[0].clone()
            };
            let payload = codec.encode(&ghost.to_value()).unwrap();
            common::produce(&fixture.producer, "raw-readings", "ghost", &payload).await;
            produced += 1;
        }
    }

    let route_stats = Arc::new(Stats::default());
    let route_cancel = CancellationToken::new();
    let route = tokio::spawn({
        let (config, stats, cancel) = (
            config.clone(),
            Arc::clone(&route_stats),
            route_cancel.clone(),
        );
        async move { gridwatch::route::run(&config, stats, Arc::new(Default::default()), cancel).await }
    });
    let (stats, cancel, task) = start(&config);
    let want = reference_events(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (stats.events_total() as usize) < want.len()
        || route_stats.snapshot().messages_consumed < produced
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "route {:?}, run {:?}",
            route_stats.snapshot(),
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    route_cancel.cancel();
    let report = route.await.unwrap().unwrap();
    assert_eq!(report.messages, produced);
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(report.routed, produced - 1);
    let rendered = metrics.render();
    for name in [
        "gridwatch_routed_readings_total",
        "gridwatch_routed_batches_total",
    ] {
        assert!(rendered.contains(name), "/metrics lacks {name}");
    }
    cancel.cancel();
    task.await.unwrap().unwrap();

    assert_published(&bootstrap, &want);
    // Every routed message is keyed by its cell.
    for m in common::read_all(&bootstrap, READINGS) {
        let key = std::str::from_utf8(m.key().unwrap()).unwrap();
        assert!(key.starts_with("line-"), "{key}");
    }
    let letters = common::read_all(&bootstrap, "gridwatch-dlq");
    assert_eq!(letters.len(), 1);
    assert_eq!(
        common::header(&letters[0], dead_letter_headers::REASON).as_deref(),
        Some("unknown_node")
    );
    fixture.close();
}

/// With incidents on, a cell that falls silent in the middle of an incident gets its CLOSE once
/// it is dropped as idle: the SOC's open alert does not hang forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_cell_gets_the_close_of_its_incident() {
    const ONE_PARTITION: &str = "readings-one-partition";
    const SILENT_FROM: u64 = 85;
    let fixture = Fixture::new().await;
    // One partition, so that line-1's readings move the clock line-2 is judged idle by.
    fixture.cluster.create_topic(ONE_PARTITION, 1, 1).unwrap();
    let mut config = config(&fixture.bootstrap);
    config.source.topics[0].name = ONE_PARTITION.into();
    config.assemble.stagger_windows = false;
    config.assemble.idle_cell_timeout = Duration::from_secs(2);
    // No normal window of line-2 closes the incident: only its silence can.
    config.detect.incidents = Some(gridwatch::detect::incident::IncidentConfig {
        open_after: 1,
        close_after: 1_000,
        update_every: 0,
    });
    config.validate().unwrap();

    let batches = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
    let mut produced = 0;
    for (step, cells) in steps().into_iter().enumerate() {
        for (cell, readings) in &cells {
            // line-2 falls silent in the middle of its fault.
            if cell.starts_with("line-2") && step as u64 >= SILENT_FROM {
                continue;
            }
            let payload = batches.encode(&records::batch_to_value(readings)).unwrap();
            common::produce(&fixture.producer, ONE_PARTITION, cell, &payload).await;
            produced += 1;
        }
    }

    let (stats, cancel, run) = start(&config);
    let codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain);
    let incidents_of_line_2 = || -> Vec<AnomalyEvent> {
        common::read_all(&fixture.bootstrap, "anomalies")
            .iter()
            .map(|m| AnomalyEvent::from_value(&codec.decode(m.payload().unwrap()).unwrap()))
            .map(Result::unwrap)
            .filter(|e| e.cell_id.starts_with("line-2") && e.incident.is_some())
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let events = loop {
        let s = stats.snapshot();
        let events = incidents_of_line_2();
        let closed = events
            .iter()
            .any(|e| e.incident.as_ref().unwrap().status == records::IncidentStatus::Close);
        if s.messages_consumed == produced && closed {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no CLOSE for line-2: {s:?}, {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cancel.cancel();
    run.await.unwrap().unwrap();

    let status = |e: &AnomalyEvent| e.incident.as_ref().unwrap().status;
    let open = events
        .iter()
        .find(|e| status(e) == records::IncidentStatus::Open)
        .expect("the fault opened an incident");
    let closes: Vec<&AnomalyEvent> = events
        .iter()
        .filter(|e| status(e) == records::IncidentStatus::Close)
        .collect();
    assert_eq!(closes.len(), 1, "{events:?}");
    let close = closes[0];
    let incident = close.incident.as_ref().unwrap();
    assert_eq!(
        incident.incident_id,
        open.incident.as_ref().unwrap().incident_id
    );
    // The CLOSE stands for the silence: from the incident's last window taken (published or
    // not) to the moment the cell was known silent.
    let last_published_end = events
        .iter()
        .filter(|e| status(e) != records::IncidentStatus::Close)
        .map(|e| e.window_end_ms)
        .max()
        .unwrap();
    assert!(close.window_start_ms >= last_published_end, "{close:?}");
    assert!(close.window_end_ms > close.window_start_ms, "{close:?}");
    assert_eq!(
        incident.opened_at_ms,
        open.incident.as_ref().unwrap().opened_at_ms
    );
    assert!(close.contributors.is_empty());
    assert_eq!(close.node_count, 0);
    fixture.close();
}

/// With `[detect] state_file`, a graceful stop saves the divergence baselines and the next
/// start takes them over: after a restart on the next readings, every baseline is the one that
/// began before the stop, not a new one learning from nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_divergence_baselines_survive_a_graceful_restart() {
    use gridwatch::detect::JudgeState;
    let fixture = Fixture::new().await;
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("judge-state.json");
    let mut config = config(&fixture.bootstrap);
    config.detect.divergence = Some(gridwatch::detect::divergence::DivergenceConfig {
        steps: 4,
        warmup: Duration::from_secs(30),
        ..Default::default()
    });
    config.detect.state_file = Some(state_file.clone());

    let batches = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
    let steps = steps();
    let mut produced = 0u64;
    let mut pass = async |range: std::ops::Range<usize>| -> JudgeState {
        for cells in &steps[range] {
            for (cell, readings) in cells {
                let payload = batches.encode(&records::batch_to_value(readings)).unwrap();
                common::produce(&fixture.producer, READINGS, cell, &payload).await;
                produced += 1;
            }
        }
        // The restart resumes from the committed offsets, behind the last readings.
        let resume: i64 = committed(&fixture.bootstrap, &config.source.group_id)
            .values()
            .sum();
        let (stats, cancel, run) = start(&config);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = stats.snapshot();
            if s.messages_consumed as i64 == produced as i64 - resume
                && s.windows_scored == s.windows_emitted
            {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "stalled: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cancel.cancel();
        run.await.unwrap().unwrap();
        let saved = std::fs::read(&state_file).expect("a graceful stop saves the state");
        serde_json::from_slice::<JudgeState>(&saved).unwrap()
    };
    let before = pass(0..60).await;
    let after = pass(60..STEPS as usize).await;
    assert_eq!(before.divergence.len(), 2, "both lines");
    assert_baselines_went_on(&before.divergence, &after.divergence, "the restart");
    fixture.close();
}

/// Every baseline of `before` is in `after` still learning since the same moment, with more
/// windows learnt: it went on across `what`, rather than starting again.
fn assert_baselines_went_on(
    before: &std::collections::BTreeMap<String, Vec<gridwatch::detect::divergence::BaselineEntry>>,
    after: &std::collections::BTreeMap<String, Vec<gridwatch::detect::divergence::BaselineEntry>>,
    what: &str,
) {
    let field = |b: &gridwatch::detect::divergence::Baseline, name: &str| {
        serde_json::to_value(b).unwrap()[name].as_i64().unwrap()
    };
    for (cell, baselines) in before {
        for (node, channel, b) in baselines {
            let (_, _, a) = after[cell]
                .iter()
                .find(|(n, c, _)| n == node && c == channel)
                .expect("still there");
            assert_eq!(
                field(a, "learning_since_ms"),
                field(b, "learning_since_ms"),
                "{cell} {node} {channel}: a new baseline after {what}"
            );
            assert!(
                field(a, "windows") > field(b, "windows"),
                "{cell} {node} {channel}"
            );
        }
    }
}

/// A changelog topic that does not exist stops the start with an error that names it, before
/// anything is consumed (like a missing spatial-node topic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_changelog_topic_stops_the_start() {
    let fixture = Fixture::new().await;
    let mut config = config(&fixture.bootstrap);
    config.detect.changelog = Some(gridwatch::config::ChangelogConfig {
        topic: "no-such-judge-state".into(),
        interval: Duration::from_secs(1),
        load_timeout: Duration::from_secs(20),
    });
    fixture.produce_steps().await;
    let (stats, _cancel, task) = start(&config);
    let error = format!("{:#}", task.await.unwrap().unwrap_err());
    assert!(
        error.contains("[detect.changelog] topic `no-such-judge-state`"),
        "{error}"
    );
    assert!(error.contains("cleanup.policy=compact"), "{error}");
    assert!(error.contains("does not exist"), "{error}");
    assert_eq!(stats.snapshot().messages_consumed, 0);
    fixture.close();
}

/// With `[detect.changelog]`, a cell's judge state moves with the cell: a second instance joins
/// the group, takes over one of the two cells' partitions in the rebalance, and goes on with the
/// divergence baselines and the open incident the first instance had, read from the changelog
/// topic, instead of starting them again. No state file is involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judge_state_moves_with_a_cell_to_its_new_owner() {
    use gridwatch::detect::JudgeState;
    use gridwatch::detect::incident::IncidentConfig;
    use gridwatch::schema::IncidentStatus;
    const CHANGELOG: &str = "gridwatch-judge-state";
    let fixture = Fixture::new().await;
    fixture.cluster.create_topic(CHANGELOG, 1, 1).unwrap();
    let mut config = config(&fixture.bootstrap);
    config.detect.divergence = Some(gridwatch::detect::divergence::DivergenceConfig {
        steps: 4,
        warmup: Duration::from_secs(30),
        ..Default::default()
    });
    // Every window is anomalous: each cell opens one incident at its first window, and it
    // stays open (no severity above its first, no periodic UPDATE) for the whole run.
    config.detect.threshold = Some(1e-9);
    config.detect.incidents = Some(IncidentConfig {
        open_after: 1,
        close_after: 2,
        update_every: 0,
    });
    config.detect.changelog = Some(gridwatch::config::ChangelogConfig {
        topic: CHANGELOG.into(),
        interval: Duration::from_secs(1),
        load_timeout: Duration::from_secs(30),
    });
    config.validate().unwrap();
    // The latest record of each cell.
    let saved = |bootstrap: &str| -> std::collections::BTreeMap<String, JudgeState> {
        common::read_all(bootstrap, CHANGELOG)
            .iter()
            .map(|m| {
                let cell = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
                (cell, serde_json::from_slice(m.payload().unwrap()).unwrap())
            })
            .collect()
    };

    let batches = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
    let steps = steps();
    // Produces the steps of `range`, each cell to a partition of its own (both cells' keys
    // hash to one of the two); returns the partitions they went to.
    let produce = async |range: std::ops::Range<usize>| {
        use rdkafka::producer::FutureRecord;
        let mut partitions = Vec::new();
        for cells in &steps[range] {
            for (partition, (cell, readings)) in cells.iter().enumerate() {
                let payload = batches.encode(&records::batch_to_value(readings)).unwrap();
                let record = FutureRecord::to(READINGS)
                    .key(cell)
                    .payload(&payload)
                    .partition(partition as i32);
                let timeout = rdkafka::util::Timeout::After(Duration::from_secs(10));
                let delivery = fixture.producer.send(record, timeout).await.unwrap();
                partitions.push(delivery.partition);
            }
        }
        partitions
    };
    let settled = async |instances: &[&Arc<Stats>], produced: u64| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut last = (0, tokio::time::Instant::now());
        loop {
            let snapshots: Vec<_> = instances.iter().map(|s| s.snapshot()).collect();
            let consumed: u64 = snapshots.iter().map(|s| s.messages_consumed).sum();
            let idle = snapshots
                .iter()
                .all(|s| s.windows_scored == s.windows_emitted);
            if consumed != last.0 {
                last = (consumed, tokio::time::Instant::now());
            }
            if consumed >= produced && idle && last.1.elapsed() > Duration::from_secs(1) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "stalled: {snapshots:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // The first instance alone judges both cells until it has written their state.
    let mut partitions = produce(0..60).await;
    let (first, first_cancel, first_run) = start(&config);
    settled(&[&first], partitions.len() as u64).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let before = loop {
        let before = saved(&fixture.bootstrap);
        if before.len() == 2 {
            break before;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cells saved: {:?}",
            before.keys()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let distinct: std::collections::BTreeSet<i32> = partitions.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        2,
        "the two cells are on different partitions"
    );

    // A second instance joins while readings go on: each instance gets one partition, so one
    // cell, from the rebalance on.
    let (second, second_cancel, second_run) = start(&config);
    let mut step = 60;
    while second.snapshot().messages_consumed == 0 {
        assert!(
            step < STEPS as usize - 10,
            "the second instance got no readings"
        );
        partitions.extend(produce(step..step + 1).await);
        step += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    partitions.extend(produce(step..STEPS as usize).await);
    settled(&[&first, &second], partitions.len() as u64).await;
    assert!(
        second.snapshot().windows_scored > 0,
        "the second instance judged a cell"
    );
    first_cancel.cancel();
    second_cancel.cancel();
    first_run.await.unwrap().unwrap();
    second_run.await.unwrap().unwrap();

    // Each cell's record holds that cell alone.
    let baselines = |saved: &std::collections::BTreeMap<String, JudgeState>| {
        saved
            .iter()
            .map(|(cell, state)| (cell.clone(), state.divergence[cell].clone()))
            .collect()
    };
    let after = saved(&fixture.bootstrap);
    assert_baselines_went_on(&baselines(&before), &baselines(&after), "the rebalance");
    for (cell, state) in &after {
        assert!(
            state.incidents.contains_key(cell),
            "{cell}: the open incident is saved"
        );
    }

    // One incident per cell: the new owner went on with the moved cell's incident instead of
    // opening a second one.
    let event_codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain);
    let mut opened = std::collections::BTreeMap::<String, Vec<String>>::new();
    for m in common::read_all(&fixture.bootstrap, "anomalies") {
        let value = event_codec.decode(m.payload().unwrap()).unwrap();
        let event = AnomalyEvent::from_value(&value).unwrap();
        let incident = event.incident.expect("every event is an incident's");
        assert_eq!(incident.status, IncidentStatus::Open, "{}", event.cell_id);
        opened
            .entry(event.cell_id)
            .or_default()
            .push(incident.incident_id);
    }
    assert_eq!(opened.len(), 2, "{opened:?}");
    assert!(opened.values().all(|ids| ids.len() == 1), "{opened:?}");
    fixture.close();
}
