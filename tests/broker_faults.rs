//! The delivery guarantee on a real broker process (tansu), under faults.
//!
//! A seeded load generator (the simulated plant, with planted faults and per-node sequence
//! numbers) writes readings keyed by cell to explicit partitions while `gridwatch run`
//! processes are killed, added and removed. The expected events come from the same readings
//! pushed straight through assemble → infer → detect without Kafka. The checker reads the event
//! topic and requires every expected event, nothing else, and duplicates only as byte-identical
//! copies of one deterministic event id.
//!
//! Each scenario prints one `checker:` line with its counts (expected, found, duplicates,
//! lost). The tests run one at a time: each starts its own broker and processes.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::{Gridwatch, Tansu};
use gridwatch::assemble::{Assembler, Provenance};
use gridwatch::config::Config;
use gridwatch::pipeline;
use gridwatch::schema::{AnomalyEvent, Codec, Reading, RecordKind, WireFormat, records};
use gridwatch::simulate::{self, Plant, PlantSpec};
use rdkafka::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

const READINGS: &str = "readings";
const NODES: &str = "spatial-nodes";
const EVENTS: &str = "anomalies";
const DLQ: &str = "gridwatch-dlq";
const JUDGE_STATE: &str = "gridwatch-judge-state";
const PARTITIONS: i32 = 4;

/// One scenario at a time: each runs a broker and several gridwatch processes on 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn plant(seed: u64) -> Plant {
    Plant::new(PlantSpec {
        lines: 4,
        machines_per_line: 5,
        mean_steps_between_faults: Some(120),
        warmup_steps: 40,
        seed,
        ..PlantSpec::default()
    })
}

/// One produced message: cell (key), partition, and the batch of one step.
struct Batch {
    cell: String,
    partition: i32,
    readings: Vec<Reading>,
}

/// The seeded load: every step of the plant, cell `i` always on partition `i % PARTITIONS`,
/// each reading numbered per node (its step index).
fn load(seed: u64, steps: u64) -> Vec<Vec<Batch>> {
    let mut plant = plant(seed);
    (0..steps)
        .map(|step| {
            simulate::by_cell(&plant.step())
                .into_iter()
                .enumerate()
                .map(|(i, (cell, mut readings))| {
                    for r in &mut readings {
                        r.sequence = Some(step as i64);
                    }
                    Batch {
                        cell,
                        partition: i as i32 % PARTITIONS,
                        readings,
                    }
                })
                .collect()
        })
        .collect()
}

/// The configuration of an instance in `group`. tansu 0.6 pauses a follower's JoinGroup for 3 s
/// and checks sessions only when a group request arrives, so the session timeout decides how
/// its group coordinator behaves (docs/notes.md): 3 s lets a dead member expire while a new
/// one joins (a lone instance killed and restarted gets its partitions back), but expels
/// members that are themselves waiting in a JoinGroup, which can leave partitions owned by
/// nobody when several instances rejoin at once; a longer timeout avoids that, at the price
/// of a dead member holding its partitions until it expires.
fn config_file(dir: &Path, bootstrap: &str, group: &str, session_timeout_ms: u32) -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let heartbeat_ms = session_timeout_ms / 10;
    let text = format!(
        r#"
[kafka]
"bootstrap.servers" = "{bootstrap}"
# A restarted in-memory broker comes back without topics; the clients see them recreated at
# their next metadata refresh.
"topic.metadata.refresh.interval.ms" = "2000"

[kafka.consumer]
"session.timeout.ms" = "{session_timeout_ms}"
"heartbeat.interval.ms" = "{heartbeat_ms}"

[source]
group_id = "{group}"
topics = [{{ name = "{READINGS}", payload = "batch" }}]
commit_interval = "200ms"

[registry]
topic = "{NODES}"

[model]
contract = "{root}/models/plant-attention-v1.json"

[infer]
max_wait = "2ms"

[sink]
events_topic = "{EVENTS}"
dead_letter_topic = "{DLQ}"

[pipeline]
shutdown_timeout = "20s"

[admin]
listen = "127.0.0.1:0"
"#
    );
    let path = dir.join(format!("{group}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The events the load gives without Kafka, by event id.
fn expected(load: &[Vec<Batch>]) -> BTreeMap<String, AnomalyEvent> {
    let mut config = Config::default();
    config.model.contract =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/plant-attention-v1.json");
    let loaded = pipeline::load_model(&config).unwrap();
    let mut model = loaded.model;
    let mut assembler = Assembler::new(loaded.spec);
    let mut windows = Vec::new();
    let mut offsets = [0i64; PARTITIONS as usize];
    for step in load {
        for m in step {
            let cell: Arc<str> = Arc::from(m.cell.as_str());
            let at = Provenance {
                partition: m.partition,
                offset: offsets[m.partition as usize],
            };
            offsets[m.partition as usize] += 1;
            for r in &m.readings {
                let node: Arc<str> = Arc::from(r.node_id.as_str());
                assembler.add(&cell, &node, r, at, &mut windows);
            }
        }
    }
    let reconstructions = model.run(&windows).unwrap();
    windows
        .iter()
        .zip(&reconstructions)
        .filter_map(|(w, r)| loaded.detector.detect(w, r).1)
        .map(|e| (e.event_id.clone(), e))
        .collect()
}

/// A broker with the topics and the plant's spatial-node records.
async fn broker(dir: &Path) -> (Tansu, FutureProducer) {
    let tansu = Tansu::start(dir);
    create_topics(&tansu).await;
    let producer = producer(&tansu.bootstrap());
    publish_nodes(&producer).await;
    (tansu, producer)
}

async fn create_topics(tansu: &Tansu) {
    tansu.create_topic(READINGS, PARTITIONS, false).await;
    tansu.create_topic(NODES, 1, true).await;
    tansu.create_topic(EVENTS, 2, false).await;
    tansu.create_topic(DLQ, 1, false).await;
}

fn producer(bootstrap: &str) -> FutureProducer {
    common::client(bootstrap)
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()
        .unwrap()
}

async fn publish_nodes(producer: &FutureProducer) {
    let codec = Codec::new(RecordKind::SpatialNode, WireFormat::Plain);
    for node in simulate::node_records(&plant(0)) {
        let payload = codec.encode(&node.to_value()).unwrap();
        common::produce(producer, NODES, &node.node_id, &payload).await;
    }
}

/// Produces `steps`, one step per `pace`, each step acknowledged before the next.
async fn produce(producer: &FutureProducer, steps: &[Vec<Batch>], pace: Duration) {
    let codec = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
    let mut ticker = tokio::time::interval(pace);
    for step in steps {
        ticker.tick().await;
        let sends = step.iter().map(|m| {
            let payload = codec.encode(&records::batch_to_value(&m.readings)).unwrap();
            async move {
                producer
                    .send(
                        FutureRecord::to(READINGS)
                            .partition(m.partition)
                            .key(&m.cell)
                            .payload(&payload),
                        Timeout::After(Duration::from_secs(30)),
                    )
                    .await
                    .expect("produce a step")
            }
        });
        futures::future::join_all(sends).await;
    }
}

/// Key of the checker's fence records on the event topic.
const FENCE: &[u8] = b"checker-fence";

/// Writes one empty record keyed [`FENCE`] to each partition of the event topic. tansu 0.6
/// (in-memory storage) can report a partition's high watermark one record short of the last
/// acknowledged write until that partition is written again, and the checker reads up to the
/// high watermark; the fence moves it past every event gridwatch had acknowledged.
fn fence(bootstrap: &str) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = common::client(bootstrap)
        .set("acks", "all")
        .create()
        .unwrap();
    for partition in 0..2 {
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to(EVENTS)
                    .partition(partition)
                    .key(FENCE),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// What the checker found on the event topic.
#[derive(Debug, Default)]
struct Found {
    /// Payload of each distinct event id.
    events: HashMap<String, Vec<u8>>,
    messages: usize,
    /// Copies of an id whose bytes differ from the first copy.
    differing: usize,
}

impl Found {
    fn read(bootstrap: &str) -> Self {
        fence(bootstrap);
        let mut found = Found::default();
        let codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain);
        for m in common::read_all(bootstrap, EVENTS) {
            if m.key() == Some(FENCE) {
                continue;
            }
            let payload = m.payload().unwrap().to_vec();
            let event = AnomalyEvent::from_value(&codec.decode(&payload).unwrap()).unwrap();
            found.messages += 1;
            if let Some(first) = found.events.get(&event.event_id) {
                found.differing += usize::from(*first != payload);
            } else {
                found.events.insert(event.event_id, payload);
            }
        }
        found
    }

    fn missing<'a>(&self, want: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
        want.into_iter()
            .filter(|id| !self.events.contains_key(*id))
            .collect()
    }
}

/// Waits until every id of `want` is on the event topic, or until `timeout`; returns what
/// was found either way (the caller's check reports what is missing).
async fn wait_for(bootstrap: &str, want: &BTreeSet<String>, timeout: Duration) -> Found {
    let deadline = Instant::now() + timeout;
    loop {
        let b = bootstrap.to_owned();
        let found = tokio::task::spawn_blocking(move || Found::read(&b))
            .await
            .unwrap();
        if found.missing(want).is_empty() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The checker's verdict: every expected event, nothing else, duplicates byte-identical.
fn check(
    scenario: &str,
    dir: &Path,
    (bootstrap, group): (&str, &str),
    found: &Found,
    want: &BTreeMap<String, AnomalyEvent>,
) {
    println!(
        "checker: {scenario}: readings committed/end by partition: {}",
        consumption(bootstrap, group)
    );
    let missing = found.missing(want.keys());
    let lost = missing.len();
    let acknowledged = acknowledgements(dir);
    for id in missing.iter().take(20) {
        let e = &want[*id];
        // Whether some instance had the event acknowledged tells a broker that lost an
        // acknowledged write from a window that was never published.
        let acks = acknowledged.get(id.as_str()).map_or_else(
            || "never acknowledged".to_owned(),
            |acks| format!("acknowledged {}", acks.join("; ")),
        );
        println!(
            "missing: cell {} window [{}, {}) severity {:?} score {} threshold {}: {acks}",
            e.cell_id, e.window_start_ms, e.window_end_ms, e.severity, e.score, e.threshold
        );
    }
    let unexpected: Vec<&String> = found
        .events
        .keys()
        .filter(|id| !want.contains_key(*id))
        .collect();
    // Each event found is byte for byte the event an uninterrupted run gives: a window rebuilt
    // after a crash or a rebalance is whole, not merely the same window id.
    let codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain);
    let unlike: Vec<&String> = found
        .events
        .iter()
        .filter(|(id, payload)| {
            want.get(*id)
                .is_some_and(|e| codec.encode(&e.to_value()).unwrap() != **payload)
        })
        .map(|(id, _)| id)
        .collect();
    let duplicates = found.messages - found.events.len();
    println!(
        "checker: {scenario}: expected {}, found {}, identical to the uninterrupted run {}, duplicates {duplicates} (all byte-identical: {}), lost {lost}, unexpected {}",
        want.len(),
        found.events.len(),
        found.events.len() - unlike.len(),
        found.differing == 0,
        unexpected.len()
    );
    assert!(
        unlike.is_empty(),
        "{scenario}: events differ from the uninterrupted run: {unlike:?}"
    );
    assert!(!want.is_empty(), "the load must plant detectable faults");
    assert_eq!(lost, 0, "{scenario}: events lost");
    assert!(
        unexpected.is_empty(),
        "{scenario}: unexpected events {unexpected:?}"
    );
    assert_eq!(
        found.differing, 0,
        "{scenario}: a duplicate differs from its first copy"
    );
}

/// Per event id, where the instances' logs (`*.log` in `dir`, gridwatch's debug lines) say it
/// was acknowledged: `instance partition=P offset=O`.
fn acknowledgements(dir: &Path) -> HashMap<String, Vec<String>> {
    let mut acks: HashMap<String, Vec<String>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return acks;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("Event acknowledged.")) {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or("?")
                    .to_owned()
            };
            let id = field("event_id=");
            acks.entry(id).or_default().push(format!(
                "{name} partition={} offset={}",
                field("partition="),
                field("offset=")
            ));
        }
    }
    acks
}

fn assert_dead_letter_topic_empty(bootstrap: &str) {
    let letters = common::read_all(bootstrap, DLQ);
    assert!(
        letters.is_empty(),
        "valid readings were dead-lettered: {}",
        letters.len()
    );
}

/// `kill -9` of the only instance, five times while the load runs, each time restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = common::broker::work_dir("kill-9");
    let (tansu, producer) = broker(&dir).await;
    let bootstrap = tansu.bootstrap();
    let steps = load(3, 1_200);
    let want = expected(&steps);
    let config = config_file(&dir, &bootstrap, "kill-9", 3000);

    let mut instance = Gridwatch::start(&config, &dir, "gridwatch");
    let load = tokio::spawn({
        let producer = producer.clone();
        async move { produce(&producer, &steps, Duration::from_millis(30)).await }
    });
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for kill in 1..=5 {
        // Each instance joins and gets work done (the group's commits move), then dies at a
        // pseudo-random moment after that.
        let before = committed_total(&bootstrap, "kill-9");
        let deadline = Instant::now() + Duration::from_secs(60);
        while committed_total(&bootstrap, "kill-9") <= before {
            assert!(
                Instant::now() < deadline,
                "no progress:\n{}",
                instance.log_tail(30)
            );
            assert!(
                instance.running(),
                "gridwatch exited:\n{}",
                instance.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(rng % 1_000)).await;
        instance.kill9();
        println!(
            "kill -9 number {kill}: committed {}",
            committed_total(&bootstrap, "kill-9")
        );
        instance = Gridwatch::start(&config, &dir, "gridwatch");
    }
    load.await.unwrap();
    let ids: BTreeSet<String> = want.keys().cloned().collect();
    let found = wait_for(&bootstrap, &ids, Duration::from_secs(120)).await;
    let status = instance.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "graceful stop failed: {status}\n{}",
        instance.log_tail(30)
    );
    let _ = found;
    let found = Found::read(&bootstrap);
    check("kill -9 x5", &dir, (&bootstrap, "kill-9"), &found, &want);
    assert_dead_letter_topic_empty(&bootstrap);
}

/// Instances join and leave (gracefully and by `kill -9`) while the load runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_storm_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = common::broker::work_dir("rebalance-storm");
    let (tansu, producer) = broker(&dir).await;
    let bootstrap = tansu.bootstrap();
    let steps = load(5, 600);
    let want = expected(&steps);
    // Several members rejoin at once here: with a 3 s session tansu expels some mid-join.
    let config = config_file(&dir, &bootstrap, "storm", 10000);
    // The judge's state moves with the cells through a compacted topic. The divergence check
    // learns for a day before it reports, so the events stay those of the static threshold.
    tansu.create_topic(JUDGE_STATE, 1, true).await;
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[detect.divergence]\n\n[detect.changelog]\ntopic = \"{JUDGE_STATE}\"\ninterval = \"1s\"\n"
    ));
    std::fs::write(&config, text).unwrap();

    let mut instances = vec![Gridwatch::start(&config, &dir, "a")];
    let load = tokio::spawn({
        let producer = producer.clone();
        async move { produce(&producer, &steps, Duration::from_millis(40)).await }
    });
    // +b, +c, -a (SIGTERM), +d, -b (kill -9), -c (SIGTERM): d ends alone.
    let pause = Duration::from_millis(3_000);
    tokio::time::sleep(pause).await;
    instances.push(Gridwatch::start(&config, &dir, "b"));
    tokio::time::sleep(pause).await;
    instances.push(Gridwatch::start(&config, &dir, "c"));
    tokio::time::sleep(pause).await;
    let status = instances[0].terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "a: {status}\n{}",
        instances[0].log_tail(30)
    );
    instances.push(Gridwatch::start(&config, &dir, "d"));
    tokio::time::sleep(pause).await;
    instances[1].kill9();
    tokio::time::sleep(pause).await;
    let status = instances[2].terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "c: {status}\n{}",
        instances[2].log_tail(30)
    );
    load.await.unwrap();

    let ids: BTreeSet<String> = want.keys().cloned().collect();
    wait_for(&bootstrap, &ids, Duration::from_secs(120)).await;
    let status = instances[3].terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "d: {status}\n{}",
        instances[3].log_tail(30)
    );
    // b's arrival revoked a's partitions, and a went on judging windows for six seconds: it
    // dropped the judge state of their cells rather than keep it for cells it might not own.
    let a_log = std::fs::read_to_string(&instances[0].log).unwrap();
    assert!(
        a_log.contains("Forgot a revoked cell's thresholds"),
        "a kept the judge state of revoked cells\n{}",
        instances[0].log_tail(30)
    );
    // A later instance took over cells the earlier ones had judged, with their baselines.
    let logs: Vec<String> = instances
        .iter()
        .map(|i| std::fs::read_to_string(&i.log).unwrap())
        .collect();
    let restored = logs[1..]
        .iter()
        .any(|log| log.contains("Restored the cell's divergence baselines from the changelog"));
    assert!(
        !logs.iter().any(|log| log.contains("were not used")),
        "a saved state was refused"
    );
    assert!(
        restored,
        "no instance restored a cell's baselines\n{}",
        instances[3].log_tail(30)
    );
    assert!(
        !common::read_all(&bootstrap, JUDGE_STATE).is_empty(),
        "nothing in the changelog"
    );
    let found = Found::read(&bootstrap);
    check(
        "rebalance storm",
        &dir,
        (&bootstrap, "storm"),
        &found,
        &want,
    );
    assert_dead_letter_topic_empty(&bootstrap);
}

/// The broker process is killed (`kill -9`) mid-stream, stays away for eight seconds and is
/// restarted on its persistent storage (SQLite): gridwatch keeps running while it is away,
/// reports it unready, and afterwards publishes every expected event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = common::broker::work_dir("broker-restart");
    let mut tansu = Tansu::start_persistent(&dir);
    create_topics(&tansu).await;
    let bootstrap = tansu.bootstrap();
    let producer = producer(&bootstrap);
    publish_nodes(&producer).await;
    let steps = load(7, 600);
    let want = expected(&steps);
    let config = config_file(&dir, &bootstrap, "restart", 3000);
    let (before, after) = steps.split_at(300);

    let mut instance = Gridwatch::start(&config, &dir, "gridwatch");
    produce(&producer, before, Duration::from_millis(20)).await;
    wait_committed(&bootstrap, "restart", 4 * 200, &instance).await;
    tansu.kill();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        instance.running(),
        "gridwatch died with the broker:\n{}",
        instance.log_tail(30)
    );
    let ready = instance.http_status("/readyz");
    tansu.restart();
    produce(&producer, after, Duration::from_millis(20)).await;
    let ids: BTreeSet<String> = want.keys().cloned().collect();
    wait_for(&bootstrap, &ids, Duration::from_secs(120)).await;
    assert!(
        instance.running(),
        "gridwatch exited:\n{}",
        instance.log_tail(30)
    );
    let status = instance.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "graceful stop failed: {status}\n{}",
        instance.log_tail(30)
    );
    let found = Found::read(&bootstrap);
    check(
        "broker restart",
        &dir,
        (&bootstrap, "restart"),
        &found,
        &want,
    );
    assert_dead_letter_topic_empty(&bootstrap);
    assert_eq!(ready, Some(503), "/readyz while the broker was away");
}

/// The group's committed offset of each readings partition (0 for none).
fn committed(bootstrap: &str, group: &str) -> Vec<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = common::client(bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        tpl.add_partition(READINGS, partition);
    }
    let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(5)) else {
        return vec![0; PARTITIONS as usize];
    };
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => 0,
        })
        .collect()
}

/// The sum of the group's committed offsets on the readings topic (0 for none).
fn committed_total(bootstrap: &str, group: &str) -> i64 {
    committed(bootstrap, group).iter().sum()
}

/// Each readings partition's committed offset against its end, e.g. `0: 582/600`. At the
/// finish the commit trails the end by the history of the windows still open (about 20
/// steps); a partition far further behind was not consumed to the end by any instance, which
/// tells a group that stopped assigning a partition from a window gridwatch skipped.
fn consumption(bootstrap: &str, group: &str) -> String {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = common::client(bootstrap).create().unwrap();
    committed(bootstrap, group)
        .iter()
        .zip(0..PARTITIONS)
        .map(|(done, partition)| {
            let end = consumer
                .fetch_watermarks(READINGS, partition, Duration::from_secs(5))
                .map_or(-1, |(_, high)| high);
            format!("{partition}: {done}/{end}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A flood of bogus ids: 10^6 readings from distinct node ids that are on no spatial-node
/// record, then 20 000 bogus nodes registered each in a cell of its own, with one reading
/// each, against `[assemble] max_cells = 5000`. Nothing about unknown ids is remembered, the
/// cells beyond the cap are refused (`cell_limit`), and the process's memory stays bounded.
/// Prints the resident memory at each stage. The refused readings are dropped
/// (`bad_input = "drop"`): a million dead letters would measure the broker, not gridwatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bogus_ids_keeps_memory_bounded() {
    let _serial = SERIAL.lock().await;
    let dir = common::broker::work_dir("flood");
    let (tansu, producer) = broker(&dir).await;
    let bootstrap = tansu.bootstrap();
    let config = config_file(&dir, &bootstrap, "flood", 3000);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace("[sink]\n", "[sink]\nbad_input = \"drop\"\n");
    text.push_str("\n[assemble]\nmax_cells = 5000\n");
    std::fs::write(&config, text).unwrap();

    // Real readings first, so the instance is up, assigned and committing.
    let steps = load(9, 60);
    let mut instance = Gridwatch::start_logging(&config, &dir, "gridwatch", "info,ort=warn");
    produce(&producer, &steps, Duration::from_millis(1)).await;
    let real = (steps.len() * 4) as i64;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    wait_committed(&bootstrap, "flood", real / 2, &instance).await;
    let (start_rss, _) = instance.rss();

    // 10^6 unknown node ids, 1000 per batch message, one second of event time apart (the
    // plant's cells go idle and are dropped, so commits reach the end).
    let t0 = steps.last().unwrap()[0].readings[0].event_time_ms;
    produce_numbered(&producer, "bogus", 1_000, t0).await;
    // Unknown readings never reach a window, so they do not move the watermark and the plant's
    // open windows keep the commits where they are: count the drops instead.
    let dropped_unknown = wait_metric(
        &instance,
        "gridwatch_dropped_total{reason=\"unknown_node\"}",
        1_000_000.0,
    )
    .await;
    let (unknown_rss, unknown_peak) = instance.rss();

    // 20 000 registered bogus nodes, each in a cell of its own, one reading each.
    let nodes = Codec::new(RecordKind::SpatialNode, WireFormat::Plain);
    let mut pending = Vec::new();
    for i in 0..20_000 {
        let node = gridwatch::schema::SpatialNode {
            node_id: format!("squatter-{i}"),
            cell_id: Some(format!("squat-cell-{i}")),
            kind: "pump".into(),
            ..Default::default()
        };
        pending.push((
            node.node_id.clone(),
            nodes.encode(&node.to_value()).unwrap(),
        ));
    }
    for chunk in pending.chunks(500) {
        let sends = chunk.iter().map(|(key, payload)| {
            producer.send(
                FutureRecord::to(NODES).key(key).payload(payload),
                Timeout::After(Duration::from_secs(30)),
            )
        });
        for result in futures::future::join_all(sends).await {
            result.expect("produce a node record");
        }
    }
    // Give the registry time to read them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    produce_numbered(&producer, "squatter", 20, t0 + 1_000_000).await;
    let refused = wait_metric(
        &instance,
        "gridwatch_dropped_total{reason=\"cell_limit\"}",
        15_000.0,
    )
    .await;
    // The gauge follows at the next commit interval.
    let cells = wait_metric(&instance, "gridwatch_cells", 5_000.0).await;
    let (cells_rss, peak) = instance.rss();
    println!(
        "memory: RSS {:.1} MiB at start; {:.1} MiB after 10^6 unknown ids (peak {:.1}, {dropped_unknown} dropped); {:.1} MiB after 20 000 bogus cells (peak {:.1}; {refused} refused as cell_limit, {cells} cells held)",
        mib(start_rss),
        mib(unknown_rss),
        mib(unknown_peak),
        mib(cells_rss),
        mib(peak)
    );
    assert!(instance.running(), "{}", instance.log_tail(30));
    assert_eq!(dropped_unknown, 1_000_000.0);
    assert_eq!(refused, 15_000.0, "cells beyond the cap are refused");
    assert_eq!(
        cells, 5_000.0,
        "cells held (the plant's went idle and were dropped)"
    );
    assert!(
        unknown_rss < start_rss + 64 * 1024 * 1024,
        "10^6 unknown ids grew memory from {:.1} to {:.1} MiB",
        mib(start_rss),
        mib(unknown_rss)
    );
    let status = instance.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", instance.log_tail(30));
}

/// Produces `batches` batches of 1 000 readings of nodes `{prefix}-0`, `{prefix}-1`, …, one
/// node per reading; batch `i` is stamped `t0 + i` seconds and goes to partition `i % 4`.
async fn produce_numbered(producer: &FutureProducer, prefix: &str, batches: i64, t0: i64) {
    let codec = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
    for chunk in 0..batches {
        let batch: Vec<Reading> = (0..1_000i64)
            .map(|i| Reading {
                node_id: format!("{prefix}-{}", chunk * 1_000 + i),
                event_time_ms: t0 + chunk * 1_000,
                values: vec![("temperature".into(), 50.0)],
                sequence: Some(0),
            })
            .collect();
        let payload = codec.encode(&records::batch_to_value(&batch)).unwrap();
        producer
            .send(
                FutureRecord::to(READINGS)
                    .partition((chunk % PARTITIONS as i64) as i32)
                    .key(prefix)
                    .payload(&payload),
                Timeout::After(Duration::from_secs(30)),
            )
            .await
            .expect("produce");
    }
}

/// Waits (up to two minutes) until a metric of `instance` reaches `target`; returns its value.
async fn wait_metric(instance: &Gridwatch, metric: &str, target: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let value = instance.metric(metric).unwrap_or(0.0);
        if value >= target || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the group's committed offsets on the readings topic sum to at least `target`.
async fn wait_committed(bootstrap: &str, group: &str, target: i64, instance: &Gridwatch) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while committed_total(bootstrap, group) < target {
        assert!(
            Instant::now() < deadline,
            "commits stuck at {} of {target}:\n{}",
            committed_total(bootstrap, group),
            instance.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
