//! config: one TOML file, compiled-in defaults, environment overrides.
//!
//! Invariant: a [`Config`] that [`Config::load`] returns has passed [`Config::validate`]; every
//! key it read exists in the tree below (unknown keys are errors naming the key and the file),
//! and every `GRIDWATCH__SECTION__KEY` (or `GRIDWATCH__SECTION__TABLE__KEY`) environment
//! variable has replaced the value of `section.key` (`section.table.key`) before validation.
//! librdkafka properties pass through `[kafka]` untouched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decode::PayloadKind;
use crate::detect::incident::IncidentConfig;
use crate::detect::spot::SpotConfig;
use crate::schema::WireFormat;

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "GRIDWATCH__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// librdkafka client properties, passed through untouched to every consumer and producer
    /// (`bootstrap.servers`, `security.protocol`, `sasl.*`, `ssl.*`, …).
    pub kafka: KafkaProperties,
    pub source: SourceConfig,
    pub registry: RegistryConfig,
    pub assemble: AssembleConfig,
    pub model: ModelConfig,
    pub infer: InferConfig,
    pub detect: DetectConfig,
    pub sink: SinkConfig,
    pub pipeline: PipelineConfig,
    pub admin: AdminConfig,
    pub route: RouteConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kafka: KafkaProperties(BTreeMap::from([(
                "bootstrap.servers".to_owned(),
                "localhost:9092".to_owned(),
            )])),
            source: SourceConfig::default(),
            registry: RegistryConfig::default(),
            assemble: AssembleConfig::default(),
            model: ModelConfig::default(),
            infer: InferConfig::default(),
            detect: DetectConfig::default(),
            sink: SinkConfig::default(),
            pipeline: PipelineConfig::default(),
            admin: AdminConfig::default(),
            route: RouteConfig::default(),
        }
    }
}

/// librdkafka properties. Behaves as a map; its `Debug` output redacts secrets, so a logged
/// configuration never shows a password.
///
/// A property for one kind of client only is written `consumer.<property>` or
/// `producer.<property>` (the prefixes of Kafka Streams' configuration), or inside a
/// `[kafka.consumer]` / `[kafka.producer]` table, which is read into the same prefixed keys.
/// No librdkafka property begins with either prefix.
#[derive(Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

/// The kind of librdkafka client a set of properties is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    Consumer,
    Producer,
}

impl ClientRole {
    const ALL: [ClientRole; 2] = [ClientRole::Consumer, ClientRole::Producer];

    /// The table name, and the key prefix, of this kind's own properties.
    pub fn name(self) -> &'static str {
        match self {
            ClientRole::Consumer => "consumer",
            ClientRole::Producer => "producer",
        }
    }
}

impl KafkaProperties {
    /// The client kind and the property of a `consumer.<property>` / `producer.<property>`
    /// key; `None` for a property of every client.
    fn split(key: &str) -> Option<(ClientRole, &str)> {
        ClientRole::ALL
            .into_iter()
            .find_map(|r| Some((r, key.strip_prefix(r.name())?.strip_prefix('.')?)))
    }

    /// The properties a client of `role` gets: every property for all clients, then the ones
    /// for `role` (prefix removed), which win over a shared setting of the same property.
    pub fn for_role(&self, role: ClientRole) -> BTreeMap<&str, &str> {
        let mut shared = BTreeMap::new();
        let mut own = Vec::new();
        for (key, value) in &self.0 {
            match Self::split(key) {
                None => {
                    shared.insert(key.as_str(), value.as_str());
                }
                Some((kind, property)) if kind == role => own.push((property, value.as_str())),
                Some(_) => {}
            }
        }
        shared.extend(own);
        shared
    }

    /// Whether a client of `role` gets `property` set.
    pub fn sets(&self, role: ClientRole, property: &str) -> bool {
        self.for_role(role).contains_key(property)
    }
}

impl<'de> Deserialize<'de> for KafkaProperties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Entry {
            Value(String),
            Table(BTreeMap<String, String>),
        }
        let entries = BTreeMap::<String, Entry>::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "[kafka] values must be strings (quote numbers and booleans: \"5000\", \"true\"); only [kafka.consumer] and [kafka.producer] may be tables of them",
            )
        })?;
        let mut properties = BTreeMap::new();
        for (key, entry) in entries {
            match entry {
                Entry::Value(value) => {
                    properties.insert(key, value);
                }
                Entry::Table(table) => {
                    if !ClientRole::ALL.iter().any(|r| r.name() == key) {
                        return Err(serde::de::Error::custom(format!(
                            "[kafka.{key}] is not a kind of client: use [kafka.consumer] or [kafka.producer]"
                        )));
                    }
                    for (property, value) in table {
                        properties.insert(format!("{key}.{property}"), value);
                    }
                }
            }
        }
        Ok(Self(properties))
    }
}

impl std::ops::Deref for KafkaProperties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KafkaProperties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                (
                    k,
                    if is_secret(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            }))
            .finish()
    }
}

/// The reading topics and how their payloads are framed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Consumer group shared by every instance of this job.
    pub group_id: String,
    /// Reading topics and what each message holds.
    pub topics: Vec<TopicConfig>,
    /// `plain` Avro datums or `confluent` framing (magic byte + schema id).
    pub wire_format: WireFormat,
    /// For `plain`: writer schema files when producers use an older `Reading` / `ReadingBatch`
    /// than the compiled-in one. Empty means the compiled-in schema.
    pub reading_writer_schema: Option<PathBuf>,
    pub batch_writer_schema: Option<PathBuf>,
    /// For `confluent`: schema id → `.avsc` file of every writer schema producers may use
    /// (TOML keys are strings: `41 = "schemas/reading.avsc"`).
    pub schema_ids: BTreeMap<String, PathBuf>,
    /// How often the offsets that are safe to commit are stored and committed.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            group_id: "gridwatch".into(),
            topics: vec![TopicConfig {
                name: "readings".into(),
                payload: PayloadKind::Reading,
            }],
            wire_format: WireFormat::Plain,
            reading_writer_schema: None,
            batch_writer_schema: None,
            schema_ids: BTreeMap::new(),
            commit_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Topic name.
    pub name: String,
    /// `reading` (one Reading per message) or `batch` (one ReadingBatch per message).
    #[serde(default)]
    pub payload: PayloadKind,
}

/// `gridwatch route`: republishes node-keyed reading topics keyed by cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// Consumer group of the route stage (distinct from `[source] group_id`).
    pub group_id: String,
    /// Raw reading topics, keyed by anything (usually the sensor).
    pub topics: Vec<TopicConfig>,
    /// Where readings go, one `ReadingBatch` per cell and input message, keyed by cell: a
    /// `[source] topics` entry of the run job with `payload = "batch"`.
    pub output_topic: String,
    /// Schema id written in front of each routed batch with `[source] wire_format =
    /// "confluent"`; required there.
    pub output_schema_id: Option<u32>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self {
            group_id: "gridwatch-route".into(),
            topics: vec![TopicConfig {
                name: "raw-readings".into(),
                payload: PayloadKind::Reading,
            }],
            output_topic: "readings".into(),
            output_schema_id: None,
        }
    }
}

/// The compacted spatial-node topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Compacted topic of `SpatialNode` records keyed by node id.
    pub topic: String,
    /// H3 resolution (0–15) for nodes placed by coordinates.
    pub h3_resolution: u8,
    /// How long start-up waits for the topic to be read to its end.
    #[serde(with = "humantime_serde")]
    pub load_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            topic: "spatial-nodes".into(),
            h3_resolution: 8,
            load_timeout: Duration::from_secs(30),
        }
    }
}

/// Event-time windowing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssembleConfig {
    /// How far behind a partition's newest event time a reading may arrive and still count.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// Windows with a smaller fraction of observed entries are skipped, not scored.
    pub min_observed_fraction: f64,
    /// Readings stamped further than this ahead of the wall clock are dead-lettered as
    /// `invalid_value`: one far-future timestamp would otherwise push the watermark ahead and
    /// make every later reading of its partition late. "0s" disables the check (replays of
    /// simulated or shifted time).
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
    /// Most cells one instance holds at once. A reading that would open one more is
    /// dead-lettered as `cell_limit`, so a flood of bogus cell or node ids cannot grow memory
    /// without bound.
    pub max_cells: usize,
    /// A cell that received nothing for this long in event time, with no window left to close,
    /// is dropped from memory; if its readings come back it starts afresh, with its warm-up.
    #[serde(with = "humantime_serde")]
    pub idle_cell_timeout: Duration,
    /// Offsets each cell's window ends within the model's hop by a hash of the cell id, so
    /// cells close windows spread over the hop rather than all at one step boundary: inference
    /// gets a steady flow of small batches instead of one burst per hop. false: every window
    /// ends on a multiple of the hop, counted from the epoch.
    pub stagger_windows: bool,
}

impl Default for AssembleConfig {
    fn default() -> Self {
        Self {
            allowed_lateness: Duration::from_secs(2),
            min_observed_fraction: 0.5,
            max_future: Duration::from_secs(3600),
            max_cells: 100_000,
            idle_cell_timeout: Duration::from_secs(600),
            stagger_windows: true,
        }
    }
}

/// Which model to run and where ONNX Runtime lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Path of the model contract (`.json` next to the `.onnx`).
    pub contract: PathBuf,
    /// Path of `libonnxruntime.so`. Empty: `ORT_DYLIB_PATH`, then the `.venv` that
    /// `scripts/setup.sh` creates.
    pub onnxruntime_library: Option<PathBuf>,
    /// `cpu`, or `cuda` (needs the `cuda` cargo feature; falls back to CPU with a warning).
    pub execution_provider: ExecutionProvider,
    /// Threads ONNX Runtime may use inside one inference.
    pub intra_threads: usize,
    /// How often the contract and its ONNX file are checked for a new model (SIGHUP checks at
    /// once). A new model that passes its checks takes over at the next batch; "0s" disables.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            contract: PathBuf::from("models/plant-attention-v1.json"),
            onnxruntime_library: None,
            execution_provider: ExecutionProvider::Cpu,
            intra_threads: 1,
            reload_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionProvider {
    Cpu,
    Cuda,
}

/// Batching of windows for inference.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferConfig {
    /// Most windows in one inference call.
    pub max_batch: usize,
    /// Longest a window that finds no others waiting (inference idle) waits for company; a
    /// batch that finds windows already queued runs at once.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for InferConfig {
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_wait: Duration::from_millis(5),
        }
    }
}

/// Scoring and events.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Replaces the model's calibrated threshold when set.
    pub threshold: Option<f64>,
    /// Multiplies the threshold (model's or configured); above 1 means fewer, surer events.
    pub threshold_scale: f64,
    /// Contributors listed per event.
    pub top_contributors: usize,
    /// `static`: one threshold for every cell (the model's, or `threshold`, times
    /// `threshold_scale`). `spot`: each cell's own streaming peaks-over-threshold threshold
    /// (SPOT/DSPOT, [detect.spot]), fitted on the cell's first `spot_init_windows` scores; the
    /// static threshold decides until then.
    pub threshold_policy: ThresholdPolicy,
    /// Normal window scores a cell collects before its SPOT threshold is fitted.
    pub spot_init_windows: usize,
    pub spot: SpotConfig,
    /// Steps over which a node/channel reading exactly one value, every step observed, makes
    /// the window anomalous whatever its score (a stuck sensor: the model forecasts a flat
    /// value well when flat is plausible). 0 (default): off. At least 2, and at most the
    /// model's window length.
    pub flatline_steps: usize,
    /// How far, in standard deviations of its channel (the model's statistics), a value must
    /// stand out from both the step before and the step after, in the same direction, to be a
    /// spike that makes the window anomalous whatever its score (a glitch the model averages
    /// away or mistakes for traffic). 0 (default): off.
    pub spike_sigmas: f64,
    /// Present: a node that leaves its usual level among its cell's nodes (a drifting or
    /// miscalibrated sensor) makes the window anomalous whatever its score
    /// (`src/detect/divergence.rs`). Absent (default): off.
    pub divergence: Option<crate::detect::divergence::DivergenceConfig>,
    /// Present: a node far below the lowest it read at this time of day on recent days (a
    /// road crawling at an hour it never crawled at) makes the window anomalous whatever its
    /// score (`src/detect/floor.rs`). Absent (default): off.
    pub floor: Option<crate::detect::floor::FloorConfig>,
    /// Present: consecutive anomalous windows of a cell form one incident, and only its OPEN,
    /// UPDATE and CLOSE are published (events carry `incident`). Absent (default): one event
    /// per anomalous window, `incident` null.
    pub incidents: Option<IncidentConfig>,
    /// The model channels the score (and the contributors) are taken over. Empty (default):
    /// all. A channel left out is still model input, so it still informs the others'
    /// forecasts; leave out one whose slow drift is normal operation (e.g. a temperature that
    /// follows the weather), and recalibrate the threshold (`threshold`, or `gridwatch eval`),
    /// since the model's calibrated one was fitted over every channel.
    pub score_channels: Vec<String>,
    /// Where the judge keeps what it learnt across a graceful restart: written at shutdown,
    /// read at start. The divergence baselines, the floors and the SPOT thresholds, so that a
    /// restart does not cost their warm-up. Absent (default): nothing is kept.
    pub state_file: Option<PathBuf>,
    /// Present: the judge's per-cell state (divergence baselines, floors, SPOT thresholds, incidents)
    /// is also written to a compacted topic, so a cell's new owner after a rebalance takes over
    /// what the last owner learnt instead of learning from nothing, and goes on with its open
    /// incident (`src/changelog.rs`). Absent (default): each instance's state is its own.
    pub changelog: Option<ChangelogConfig>,
}

/// The judge-state changelog (`[detect.changelog]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangelogConfig {
    /// The topic, created beforehand with `cleanup.policy=compact` (like the spatial-node
    /// topic); every instance of the group reads all of it.
    pub topic: String,
    /// How often the state of the cells judged since the last write is written; a crash loses
    /// at most this much learning.
    #[serde(default = "default_changelog_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How long a start may take to read the topic to its end before it fails.
    #[serde(default = "default_changelog_load_timeout", with = "humantime_serde")]
    pub load_timeout: Duration,
}

fn default_changelog_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_changelog_load_timeout() -> Duration {
    Duration::from_secs(60)
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            threshold: None,
            threshold_scale: 1.0,
            top_contributors: 3,
            threshold_policy: ThresholdPolicy::Static,
            spot_init_windows: 1_000,
            spot: SpotConfig::default(),
            flatline_steps: 0,
            spike_sigmas: 0.0,
            divergence: None,
            floor: None,
            incidents: None,
            score_channels: Vec::new(),
            state_file: None,
            changelog: None,
        }
    }
}

/// How windows are judged anomalous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdPolicy {
    Static,
    Spot,
}

/// What happens to input that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BadInputPolicy {
    /// Publish to the dead-letter topic with reason headers (default).
    DeadLetter,
    /// Count and drop.
    Drop,
    /// Stop the job with an error, committing nothing past the bad message.
    Fail,
}

/// The delivery guarantee of events and dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Every event at least once; duplicates are byte-identical with the same `event_id`.
    AtLeastOnce,
    /// Transactions (KIP-98/KIP-447). Not implemented: refused at start-up.
    ExactlyOnce,
}

/// Output topics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Topic that receives `AnomalyEvent`s keyed by cell id.
    pub events_topic: String,
    /// Topic that receives every message or reading that could not be used.
    pub dead_letter_topic: String,
    pub bad_input: BadInputPolicy,
    /// Framing of published events.
    pub wire_format: WireFormat,
    /// Schema id written in front of events when `wire_format = "confluent"`.
    pub event_schema_id: u32,
    /// `at-least-once` (the only one implemented; `exactly-once` is refused).
    pub delivery: Delivery,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            events_topic: "anomalies".into(),
            dead_letter_topic: "gridwatch-dlq".into(),
            bad_input: BadInputPolicy::DeadLetter,
            wire_format: WireFormat::Plain,
            event_schema_id: 1,
            delivery: Delivery::AtLeastOnce,
        }
    }
}

/// Wiring between stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Capacity of each bounded channel between two stages.
    pub channel_capacity: usize,
    /// Longest a graceful shutdown may take to drain and commit.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            channel_capacity: 1024,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// The operator's HTTP endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of `/metrics` (Prometheus), `/healthz` and `/readyz`; `""` disables them.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
        }
    }
}

impl AdminConfig {
    /// The address to serve on, or `None` when disabled.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        (!self.listen.is_empty()).then(|| self.listen.parse().expect("validated"))
    }
}

impl Config {
    /// Defaults, then the file (if any), then `GRIDWATCH__…` variables from `env`; validated.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut tree = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid(format!("defaults do not serialise: {e}")))?;
        let origin = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                let file_tree: toml::Table =
                    toml::from_str(&text).map_err(|e| ConfigError::Parse {
                        path: path.display().to_string(),
                        message: syntax_error(&text, &e),
                    })?;
                merge(&mut tree, file_tree);
                path.display().to_string()
            }
            None => "<defaults>".to_owned(),
        };
        let mut overridden = Vec::new();
        for (var, value) in env {
            let Some(path) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            set_path(&mut tree, &var, path, &value)?;
            overridden.push(var);
        }
        let origin = if overridden.is_empty() {
            origin
        } else {
            format!("{origin} (with {})", overridden.join(", "))
        };
        let config: Config =
            toml::Value::Table(tree)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: origin,
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Rules that span fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !self.kafka.contains_key("bootstrap.servers") {
            return invalid("[kafka] needs `bootstrap.servers` (e.g. \"localhost:9092\")".into());
        }
        if self.source.topics.is_empty() {
            return invalid("[source] topics is empty: name at least one reading topic".into());
        }
        let outputs = [
            &self.sink.events_topic,
            &self.sink.dead_letter_topic,
            &self.registry.topic,
        ];
        for topic in &self.source.topics {
            if outputs.contains(&&topic.name) {
                return invalid(format!(
                    "topic `{}` is both a reading topic and an output or node topic; use distinct topics",
                    topic.name
                ));
            }
        }
        if self
            .route
            .topics
            .iter()
            .any(|t| t.name == self.route.output_topic)
        {
            return invalid(format!(
                "[route] output_topic `{}` is also one of [route] topics: routing would loop",
                self.route.output_topic
            ));
        }
        if self.route.group_id == self.source.group_id {
            return invalid(
                "[route] group_id must differ from [source] group_id: the route stage is a consumer group of its own"
                    .into(),
            );
        }
        if self.sink.delivery == Delivery::ExactlyOnce {
            return invalid(
                "[sink] delivery = \"exactly-once\" is not implemented: gridwatch delivers at least once, and a re-published event is byte-identical with the same event_id, so consumers that key on event_id see each event once (docs/operations.md, \"Delivery guarantee\")"
                    .into(),
            );
        }
        if self.sink.events_topic == self.sink.dead_letter_topic {
            return invalid("[sink] events_topic and dead_letter_topic must differ".into());
        }
        if self.source.wire_format == WireFormat::Confluent && self.source.schema_ids.is_empty() {
            return invalid(
                "[source] wire_format = \"confluent\" needs [source.schema_ids] mapping each schema id to an .avsc file"
                    .into(),
            );
        }
        if let Some(bad) = self
            .source
            .schema_ids
            .keys()
            .find(|k| k.parse::<u32>().is_err())
        {
            return invalid(format!(
                "[source.schema_ids] key `{bad}` is not a schema id (a number from 0 to 4294967295)"
            ));
        }
        if h3o::Resolution::try_from(self.registry.h3_resolution).is_err() {
            return invalid(format!(
                "[registry] h3_resolution = {} is outside 0..=15",
                self.registry.h3_resolution
            ));
        }
        if self.assemble.max_cells == 0 {
            return invalid("[assemble] max_cells must be at least 1".into());
        }
        if self.assemble.idle_cell_timeout.is_zero() {
            return invalid("[assemble] idle_cell_timeout must be positive, e.g. \"10m\"".into());
        }
        if !(0.0..=1.0).contains(&self.assemble.min_observed_fraction) {
            return invalid("[assemble] min_observed_fraction must be within 0..=1".into());
        }
        if self.infer.max_batch == 0 {
            return invalid("[infer] max_batch must be at least 1".into());
        }
        if self.detect.threshold_scale <= 0.0 || self.detect.threshold.is_some_and(|t| t <= 0.0) {
            return invalid("[detect] threshold and threshold_scale must be positive".into());
        }
        if let Err(e) = self.detect.spot.validate() {
            return invalid(format!("[detect.spot] {e}"));
        }
        if self.detect.threshold_policy == ThresholdPolicy::Spot
            && self.detect.spot_init_windows
                < crate::detect::spot::MIN_CALIBRATION + self.detect.spot.depth
        {
            return invalid(format!(
                "[detect] spot_init_windows is {}: SPOT needs at least {} scores to fit (100 + [detect.spot] depth)",
                self.detect.spot_init_windows,
                crate::detect::spot::MIN_CALIBRATION + self.detect.spot.depth
            ));
        }
        if self.detect.flatline_steps == 1 {
            return invalid(
                "[detect] flatline_steps is 1: one step always holds one value; use 0 (off) or at least 2"
                    .into(),
            );
        }
        if !(self.detect.spike_sigmas.is_finite() && self.detect.spike_sigmas >= 0.0) {
            return invalid(format!(
                "[detect] spike_sigmas is {}: use 0 (off) or a positive number of standard deviations",
                self.detect.spike_sigmas
            ));
        }
        if let Some(Err(e)) = self.detect.divergence.as_ref().map(|d| d.validate()) {
            return invalid(format!("[detect.divergence] {e}"));
        }
        if let Some(Err(e)) = self.detect.floor.as_ref().map(|f| f.validate()) {
            return invalid(format!("[detect.floor] {e}"));
        }
        if let Some(path) = self.detect.state_file.as_deref() {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            if dir.is_some_and(|d| !d.is_dir()) || path.is_dir() {
                return invalid(format!(
                    "[detect] state_file `{}` cannot be written: it is a directory, or the directory it names does not exist",
                    path.display()
                ));
            }
        }
        if let Some(changelog) = self.detect.changelog.as_ref() {
            if changelog.topic.is_empty() {
                return invalid("[detect.changelog] topic is empty".into());
            }
            if outputs.contains(&&changelog.topic)
                || self.source.topics.iter().any(|t| t.name == changelog.topic)
            {
                return invalid(format!(
                    "[detect.changelog] topic `{}` is also a reading, node, event or dead-letter topic; use a topic of its own",
                    changelog.topic
                ));
            }
            if changelog.interval < Duration::from_secs(1) {
                return invalid(format!(
                    "[detect.changelog] interval is {:?}: use at least 1s",
                    changelog.interval
                ));
            }
        }
        if let Some(Err(e)) = self.detect.incidents.as_ref().map(|i| i.validate()) {
            return invalid(format!("[detect.incidents] {e}"));
        }
        if !self.admin.listen.is_empty()
            && self.admin.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return invalid(format!(
                "[admin] listen = \"{}\" is not an address like \"0.0.0.0:9464\" (\"\" disables the endpoints)",
                self.admin.listen
            ));
        }
        if self.pipeline.channel_capacity == 0 {
            return invalid("[pipeline] channel_capacity must be at least 1".into());
        }
        for key in ["enable.auto.offset.store", "enable.auto.commit", "group.id"] {
            if self.kafka.sets(ClientRole::Consumer, key) {
                return invalid(format!(
                    "[kafka] must not set `{key}`: gridwatch manages it to keep its delivery guarantee (group id: [source] group_id)"
                ));
            }
        }
        Ok(())
    }

    /// `[source.schema_ids]` with numeric ids (checked by [`Config::validate`]).
    pub fn schema_ids(&self) -> BTreeMap<u32, PathBuf> {
        self.source
            .schema_ids
            .iter()
            .filter_map(|(id, path)| Some((id.parse().ok()?, path.clone())))
            .collect()
    }

    /// The configuration as TOML with secrets (`*password*`, `*secret*`, `*key*` values of
    /// `[kafka]` except file locations) replaced by `"<redacted>"`.
    pub fn to_redacted_toml(&self) -> String {
        let mut copy = self.clone();
        for (key, value) in copy.kafka.0.iter_mut() {
            if is_secret(key) {
                *value = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// Whether a librdkafka property holds a secret.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    (key.contains("password")
        || key.contains("secret")
        || key.ends_with(".key.pem")
        || key == "sasl.oauthbearer.config")
        && !key.ends_with(".location")
}

/// A TOML syntax error as `line L, column C: message`, without quoting the offending line: it may
/// hold a secret.
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {}", error.message())
        }
        None => error.message().to_owned(),
    }
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Sets `path` (`SECTION__KEY`, or `SECTION__TABLE__KEY` for a table below a section;
/// lower-cased) in `tree`. `kafka` keys are librdkafka properties: one level, `_` for `.`.
fn set_path(tree: &mut toml::Table, var: &str, path: &str, value: &str) -> Result<(), ConfigError> {
    let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
    let env_error = |message: String| ConfigError::Env {
        var: var.to_owned(),
        message,
    };
    let (key, tables) = match parts.split_last() {
        Some((key, tables)) if !tables.is_empty() && parts.iter().all(|p| !p.is_empty()) => {
            (key, tables)
        }
        _ => return Err(env_error("expected GRIDWATCH__SECTION__KEY".into())),
    };
    let kafka = tables[0] == "kafka";
    if kafka && tables.len() > 1 {
        return Err(env_error(
            "librdkafka properties take one level: GRIDWATCH__KAFKA__SASL_PASSWORD".into(),
        ));
    }
    // GRIDWATCH__KAFKA__SASL_PASSWORD -> sasl.password.
    let key = if kafka {
        key.replace('_', ".")
    } else {
        key.clone()
    };
    let mut table = tree;
    for name in tables {
        table = table
            .entry(name.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| env_error(format!("`{name}` is not a table")))?;
    }
    // Parse as a TOML value when it is one (numbers, booleans, arrays); else take the string.
    let parsed = if kafka {
        toml::Value::String(value.to_owned())
    } else {
        toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_owned()))
    };
    table.insert(key, parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, []).unwrap();
        assert_eq!(c.sink.events_topic, "anomalies");
        assert_eq!(c.assemble.allowed_lateness, Duration::from_secs(2));
    }

    #[test]
    fn file_then_environment() {
        let f = file(
            "[kafka]\n\"bootstrap.servers\" = \"b:9092\"\n[assemble]\nallowed_lateness = \"5s\"\n[infer]\nmax_batch = 8\n",
        );
        let env = [
            ("GRIDWATCH__INFER__MAX_BATCH".to_owned(), "16".to_owned()),
            (
                "GRIDWATCH__KAFKA__SASL_PASSWORD".to_owned(),
                "hunter2".to_owned(),
            ),
            ("OTHER".to_owned(), "x".to_owned()),
        ];
        let c = Config::load(Some(f.path()), env).unwrap();
        assert_eq!(c.kafka["bootstrap.servers"], "b:9092");
        assert_eq!(c.assemble.allowed_lateness, Duration::from_secs(5));
        assert_eq!(c.infer.max_batch, 16);
        assert_eq!(c.kafka["sasl.password"], "hunter2");
    }

    #[test]
    fn environment_reaches_tables_below_a_section() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c = Config::load(
            None,
            env(&[
                ("GRIDWATCH__DETECT__SPOT__RISK", "0.001"),
                ("GRIDWATCH__DETECT__CHANGELOG__TOPIC", "judge-state"),
                ("GRIDWATCH__DETECT__CHANGELOG__INTERVAL", "30s"),
            ]),
        )
        .unwrap();
        assert_eq!(c.detect.spot.risk, 0.001);
        let changelog = c.detect.changelog.unwrap();
        assert_eq!(changelog.topic, "judge-state");
        assert_eq!(changelog.interval, Duration::from_secs(30));
        // A table that cannot be made whole from the variables is an error naming the field.
        let message = Config::load(
            None,
            env(&[("GRIDWATCH__DETECT__CHANGELOG__INTERVAL", "30s")]),
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains("topic"), "{message}");
        for bad in [
            "GRIDWATCH__KAFKA__CONSUMER__FETCH_WAIT_MAX_MS",
            "GRIDWATCH__DETECT__THRESHOLD_POLICY__X",
            "GRIDWATCH__DETECT",
        ] {
            assert!(Config::load(None, env(&[(bad, "1")])).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        let f = file("[assemble]\nallowed_latenes = \"5s\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("allowed_latenes"), "{message}");
        assert!(
            message.contains(&f.path().display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn cross_field_rules_say_how_to_fix() {
        let f = file("[source]\nwire_format = \"confluent\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("schema_ids"), "{message}");
        let f = file("[sink]\nevents_topic = \"readings\"\n");
        assert!(Config::load(Some(f.path()), []).is_err());
        let f = file(
            "[kafka]\n\"bootstrap.servers\" = \"x\"\n\"enable.auto.offset.store\" = \"true\"\n",
        );
        assert!(
            Config::load(Some(f.path()), [])
                .unwrap_err()
                .to_string()
                .contains("enable.auto.offset.store")
        );
        let f = file("[sink]\ndelivery = \"exactly-once\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("not implemented"), "{message}");
        let f = file("[route]\noutput_topic = \"raw-readings\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("loop"), "{message}");
        let f = file("[detect]\nflatline_steps = 1\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("at least 2"), "{message}");
        let f = file("[detect]\nspike_sigmas = -1.0\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("spike_sigmas"), "{message}");
        let f = file("[detect.divergence]\ndeviations = 0\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(
            message.contains("[detect.divergence] deviations"),
            "{message}"
        );
        let f = file("[detect.divergence]\nmemory = \"6h\"\n");
        let c = Config::load(Some(f.path()), []).unwrap();
        assert_eq!(c.detect.divergence.map(|d| d.steps), Some(12));
        let f = file("[detect.floor]\nslot = \"7m\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("[detect.floor] slot"), "{message}");
        let f = file("[detect.floor]\n");
        let c = Config::load(Some(f.path()), []).unwrap();
        assert_eq!(
            c.detect.floor,
            Some(crate::detect::floor::FloorConfig::default())
        );
        let f = file("[detect.changelog]\ntopic = \"anomalies\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("a topic of its own"), "{message}");
        let f = file("[detect.changelog]\ntopic = \"judge\"\ninterval = \"100ms\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("at least 1s"), "{message}");
        let f = file("[detect.changelog]\ntopic = \"judge\"\n");
        let c = Config::load(Some(f.path()), []).unwrap();
        let changelog = c.detect.changelog.unwrap();
        assert_eq!(changelog.interval, Duration::from_secs(60));
        let f = file("[detect]\nstate_file = \"/no/such/dir/judge.json\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("state_file"), "{message}");
        let f = file("[detect]\nstate_file = \"judge.json\"\n");
        assert!(
            Config::load(Some(f.path()), []).is_ok(),
            "a file in the working directory"
        );
    }

    #[test]
    fn client_kind_properties_reach_only_that_kind() {
        let f = file(concat!(
            "[kafka]\n\"bootstrap.servers\" = \"b:9092\"\n\"linger.ms\" = \"5\"\n",
            "\"producer.linger.ms\" = \"20\"\n",
            "[kafka.consumer]\n\"fetch.wait.max.ms\" = \"10\"\n",
        ));
        let c = Config::load(Some(f.path()), []).unwrap();
        let consumer = c.kafka.for_role(ClientRole::Consumer);
        let producer = c.kafka.for_role(ClientRole::Producer);
        assert_eq!(consumer.get("fetch.wait.max.ms"), Some(&"10"));
        assert_eq!(consumer.get("linger.ms"), Some(&"5"));
        assert_eq!(consumer.get("bootstrap.servers"), Some(&"b:9092"));
        assert!(!producer.contains_key("fetch.wait.max.ms"));
        // A kind's own setting wins over the shared one.
        assert_eq!(producer.get("linger.ms"), Some(&"20"));
        assert!(!producer.keys().any(|k| k.starts_with("consumer")));
        // What --print-config shows loads back to the same properties.
        let printed = file(&c.to_redacted_toml());
        let again = Config::load(Some(printed.path()), []).unwrap();
        assert_eq!(again.kafka, c.kafka);
        // The environment reaches a kind's properties through its prefix.
        let env = [(
            "GRIDWATCH__KAFKA__CONSUMER_FETCH_WAIT_MAX_MS".to_owned(),
            "25".to_owned(),
        )];
        let c = Config::load(None, env).unwrap();
        assert_eq!(
            c.kafka
                .for_role(ClientRole::Consumer)
                .get("fetch.wait.max.ms"),
            Some(&"25")
        );
        assert!(!c.kafka.sets(ClientRole::Producer, "fetch.wait.max.ms"));
    }

    #[test]
    fn kafka_tables_are_only_client_kinds_and_cannot_take_over_the_group() {
        let f = file("[kafka.admin]\n\"request.timeout.ms\" = \"5\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(
            message.contains("[kafka.consumer] or [kafka.producer]"),
            "{message}"
        );
        let f = file("[kafka]\n\"session.timeout.ms\" = 5000\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("must be strings"), "{message}");
        let f = file("[kafka.consumer]\n\"enable.auto.commit\" = \"false\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("enable.auto.commit"), "{message}");
    }

    #[test]
    fn shipped_examples_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        let examples = std::fs::read_dir(root.join("examples"))
            .unwrap()
            .map(|e| e.unwrap().path());
        for path in examples.chain([root.join("compose/gridwatch.toml")]) {
            // Every example is a complete, valid configuration.
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(Some(&path), []).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen > 0);
    }

    #[test]
    fn printed_config_redacts_secrets() {
        let env = [
            (
                "GRIDWATCH__KAFKA__SASL_PASSWORD".to_owned(),
                "hunter2".to_owned(),
            ),
            (
                "GRIDWATCH__KAFKA__SSL_KEY_PASSWORD".to_owned(),
                "s3cret".to_owned(),
            ),
            (
                "GRIDWATCH__KAFKA__SSL_KEY_LOCATION".to_owned(),
                "/etc/k.pem".to_owned(),
            ),
        ];
        let printed = Config::load(None, env).unwrap().to_redacted_toml();
        assert!(
            !printed.contains("hunter2") && !printed.contains("s3cret"),
            "{printed}"
        );
        assert!(printed.contains("/etc/k.pem"));
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn errors_never_quote_secrets() {
        // A syntax error on the password's own line: the message points at it, never quotes it.
        let f = file("[kafka]\n\"sasl.password\" = hunter2\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        // A type error elsewhere in a file that holds a password.
        let f = file("[kafka]\n\"sasl.password\" = \"hunter2\"\n[infer]\nmax_batch = \"many\"\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(!message.contains("hunter2"), "{message}");
        // An unquoted password is a type error that does not echo the value.
        let f = file("[kafka]\n\"sasl.password\" = 271828\n");
        let message = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(!message.contains("271828"), "{message}");
        // Debug output of a loaded config is what logs would show: redact there too.
        let env = [(
            "GRIDWATCH__KAFKA__SASL_PASSWORD".to_owned(),
            "hunter2".to_owned(),
        )];
        let config = Config::load(None, env).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
