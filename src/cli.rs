//! cli: the `gridwatch` command line and what each subcommand does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::decode::PayloadKind;
use crate::infer::ModelContract;
use crate::schema::{Severity, WireFormat};
use crate::simulate::{self, Plant, PlantSpec, PublishSpec};
use crate::telemetry::{Health, LogFormat, Stats};
use crate::{admin, demo, pipeline, tail};

/// gridwatch: finds anomalies in multi-sensor telemetry as it flows through Kafka.
///
/// Readings (Avro) are bucketed in event time into per-cell spatio-temporal windows, scored by
/// an ONNX spatio-temporal attention model through ONNX Runtime, and anomalous windows are
/// published as AnomalyEvent records. Start with `gridwatch demo`: it needs no broker.
#[derive(Debug, Parser)]
#[command(name = "gridwatch", version, propagate_version = true)]
pub struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `debug` or `info,gridwatch::assemble=trace`);
    /// RUST_LOG overrides it. Default: `info,ort=warn`, and `warn` for the demo, whose output is
    /// its event lines.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log filter to start with.
    pub fn log_filter(&self) -> String {
        match (&self.log_level, &self.command) {
            (Some(level), _) => level.clone(),
            (
                None,
                Command::Demo(_)
                | Command::Tail(_)
                | Command::Bench(_)
                | Command::Eval(_)
                | Command::Inject(_),
            ) => "warn".into(),
            (None, _) => "info,ort=warn".into(),
        }
    }
}

// The bracketed names in these doc comments are configuration sections for `--help`, not
// rustdoc links.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything on an embedded Kafka (librdkafka's mock cluster): a simulated plant with
    /// injected faults, the detector, and a live view of the anomaly topic; ends with a summary
    /// (readings, windows, events, precision and recall against the injected faults).
    Demo(DemoArgs),
    /// Run the detector against a Kafka cluster.
    Run(RunArgs),
    /// Republish node-keyed reading topics ([route] topics) keyed by cell, to [route]
    /// output_topic, so that every reading of a cell lands in one partition. Needed when
    /// producers key readings by sensor and more than one `gridwatch run` shares the work.
    Route(RunArgs),
    /// Publish simulated plant readings (and its spatial-node records) to a Kafka cluster, or
    /// write them to a CSV file for training.
    Simulate(SimulateArgs),
    /// Follow the anomaly topic and print one line per event, for people.
    Tail(TailArgs),
    /// Measure throughput against the bare-consumer ceiling, CPU, memory and latency, on the
    /// embedded mock cluster (or a broker given with --brokers). See docs/performance.md.
    Bench(BenchArgs),
    /// Measure detection quality on a labelled dataset (CSV): replays it through the same
    /// assemble → infer → detect code as `run`, and prints point-wise precision, recall, F1,
    /// FAR and MAR (no point-adjust), event recall, false alarms per day and detection delay,
    /// beside three baselines. Formats and protocol: docs/eval.md.
    Eval(EvalArgs),
    /// Inject documented, seeded faults (incident slowdowns spreading along the road graph,
    /// stuck sensors, spikes, dropouts, drifts) into a wide readings CSV, and write the faulted
    /// CSV and its labels for `gridwatch eval --labels`. See docs/eval.md.
    Inject(InjectArgs),
    /// Validate a configuration file (and the model contract and schema files it names)
    /// without connecting to anything.
    CheckConfig(CheckConfigArgs),
    /// Inspect models.
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Kafka bootstrap servers (HOST:PORT[,HOST:PORT…]).
    #[arg(long)]
    pub brokers: String,
    /// The anomaly topic.
    #[arg(long, default_value = "anomalies")]
    pub topic: String,
    /// Only events at or above this severity.
    #[arg(long, value_enum)]
    pub severity: Option<SeverityArg>,
    /// Only events of this cell (repeatable).
    #[arg(long = "cell")]
    pub cells: Vec<String>,
    /// Start from the beginning of the topic instead of its end.
    #[arg(long)]
    pub from_beginning: bool,
    /// Framing of the events.
    #[arg(long, value_enum, default_value_t = Framing::Plain)]
    pub wire_format: Framing,
    /// Print each event as JSON instead of a line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Readings per topic (single-reading and batched topics each get this many).
    #[arg(long, default_value_t = 500_000)]
    pub readings: u64,
    /// Cells, and nodes per cell.
    #[arg(long, default_value_t = 64)]
    pub cells: usize,
    #[arg(long, default_value_t = 8)]
    pub nodes_per_cell: usize,
    /// Steps of one cell per ReadingBatch message.
    #[arg(long, default_value_t = 25)]
    pub batch_steps: usize,
    /// Partitions of the reading topics (the mock cluster keeps 5 MB per partition).
    #[arg(long, default_value_t = 16)]
    pub partitions: i32,
    /// Use this broker (e.g. tansu at 127.0.0.1:9092, started empty) instead of the in-process
    /// mock cluster.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Seconds of the half-load latency run (0 skips it).
    #[arg(long, default_value_t = 10)]
    pub latency_seconds: u64,
    /// Offered load of the latency run in readings/s (default: half the measured maximum).
    #[arg(long)]
    pub latency_rate: Option<f64>,
    /// Runs of each throughput stage; the table shows each stage's median run. The in-process
    /// mock cluster's delivery varies by up to 2x from run to run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub repeat: u32,
}

#[allow(rustdoc::broken_intra_doc_links)] // configuration sections in `--help`, not links
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example (SKAB's protocol):\n  gridwatch eval --model models/skab-attention-v1.json --fit-rows 400 \\\n    --label-column anomaly --ignore-columns changepoint \\\n    ../shared/data/skab/data/valve1 ../shared/data/skab/data/valve2 ../shared/data/skab/data/other"
)]
pub struct EvalArgs {
    /// Readings CSV files, or directories (every *.csv below them). Each file is one series
    /// with its own fit range; metrics are pooled over all of them.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Model contract to evaluate instead of the configured one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Configuration file ([model], [assemble] min_observed_fraction, [detect]).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The first N rows of each file are for fitting and calibration only.
    #[arg(long, conflicts_with = "fit_until")]
    pub fit_rows: Option<usize>,
    /// Rows stamped before this time (RFC 3339 or epoch milliseconds) are for fitting and
    /// calibration only.
    #[arg(long, value_parser = parse_eval_time)]
    pub fit_until: Option<i64>,
    /// `fit`: each cell's threshold is quantile × factor of its fit-range window scores
    /// (default when a fit range is given); `contract`: the model's calibrated threshold;
    /// `spot`: SPOT/DSPOT per cell ([detect.spot]), fitted on the fit-range scores.
    #[arg(long, value_enum)]
    pub threshold: Option<crate::eval::ThresholdPolicy>,
    #[arg(long, default_value_t = 0.999)]
    pub fit_quantile: f64,
    /// Default 4/3, SKAB's reference rule.
    #[arg(long, default_value_t = 4.0 / 3.0)]
    pub fit_factor: f64,
    /// Per-row 0/1 anomaly label column.
    #[arg(long)]
    pub label_column: Option<String>,
    /// Labelled anomalous ranges: CSV (start,end[,node_ids][,series]) or JSON.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Node metadata CSV (node id, lat/lon and/or cell); without it each file is one cell.
    #[arg(long)]
    pub nodes: Option<PathBuf>,
    /// H3 resolution that places nodes with coordinates and no cell.
    #[arg(long, default_value_t = 8)]
    pub h3_resolution: u8,
    /// Time column (default: ts_ms, timestamp, datetime or time if present, else row number
    /// × cadence from --start).
    #[arg(long)]
    pub time_column: Option<String>,
    /// Cadence of files without a time column (default: the model's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub cadence: Option<Duration>,
    /// Time of the first row of files without a time column.
    #[arg(long, value_parser = parse_eval_time, default_value = "0")]
    pub start: i64,
    /// Long format: the column with the node id (one row per node and time).
    #[arg(long)]
    pub node_column: Option<String>,
    /// Wide format: the node id of columns named after a model channel.
    #[arg(long, default_value = "node")]
    pub node_id: String,
    /// Columns to skip (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub ignore_columns: Vec<String>,
    /// Field separator (default: `;` if the header has more of them than `,`).
    #[arg(long)]
    pub delimiter: Option<char>,
    /// Flagged runs of a cell separated by fewer than this many steps count as one alarm
    /// (default: [detect.incidents] close_after when incidents are configured — an alarm is
    /// then an incident —, else 0).
    #[arg(long)]
    pub merge_gap: Option<usize>,
    /// Seed of the random baseline.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Windows per inference call.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Also write the report as JSON to this file (`-`: standard output, instead of the table).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write every test point of every cell to this CSV file: series, cell, step start,
    /// the score and threshold of the window ending with that step, flagged, label.
    #[arg(long, value_name = "FILE")]
    pub points_csv: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example (METR-LA, faults in the last two days):\n  gridwatch inject --readings ../shared/data/metr-la-week/los_speed.csv \\\n    --adjacency ../shared/data/metr-la-week/los_adj.csv --seed 1 \\\n    --out /tmp/metr-faulted.csv --labels /tmp/metr-labels.csv"
)]
pub struct InjectArgs {
    /// Wide readings CSV: a header of node ids, one row per step, one column per node.
    #[arg(long)]
    pub readings: PathBuf,
    /// Node × node adjacency weights (CSV without header, rows and columns in header order).
    #[arg(long)]
    pub adjacency: PathBuf,
    /// Fault configuration (TOML; every field optional, defaults in docs/eval.md).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Seed (replaces the configuration's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Time of row 0 (labels are in epoch milliseconds); default 2012-03-05T00:00:00Z, the
    /// Monday METR-LA's week is taken to start on.
    #[arg(long, value_parser = parse_eval_time)]
    pub start: Option<i64>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub cadence: Duration,
    /// The faulted readings, same layout as the input.
    #[arg(long)]
    pub out: PathBuf,
    /// Labelled ranges: start_ms,end_ms,node_ids,kind,fault_id.
    #[arg(long)]
    pub labels: PathBuf,
    /// Also write every fault with its drawn parameters as JSON.
    #[arg(long)]
    pub faults_json: Option<PathBuf>,
}

fn parse_eval_time(s: &str) -> Result<i64, String> {
    crate::eval::dataset::parse_time(s)
        .ok_or_else(|| format!("`{s}` is neither epoch milliseconds nor an RFC 3339 time"))
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SeverityArg {
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The configuration file to check.
    pub file: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Print a model's contract: interface, window geometry, channels, calibration, training.
    Inspect {
        /// Path of the model contract (`.json` next to the `.onnx`).
        path: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long the plant runs at --speed, e.g. 60s, 5m: it publishes duration × speed of
    /// event time, the same steps on any machine. Ctrl-C ends early with the summary.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Simulated seconds per wall-clock second.
    #[arg(long, default_value_t = 10.0)]
    pub speed: f64,
    /// Seed of the simulated plant and its faults.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Inject one of each kind of bad input every N steps (0 disables).
    #[arg(long, default_value_t = 100)]
    pub bad_input_every: u64,
    /// Configuration file; Kafka settings and topics are replaced by the embedded cluster's.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Model contract to use instead of the configured one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print only the summary.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file (TOML). Defaults are compiled in; GRIDWATCH__SECTION__KEY
    /// environment variables override both.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Kafka bootstrap servers (HOST:PORT[,HOST:PORT…]).
    #[arg(long, required_unless_present = "csv")]
    pub brokers: Option<String>,
    /// Topic of the readings.
    #[arg(long, default_value = "readings")]
    pub topic: String,
    /// Compacted topic of the spatial-node records.
    #[arg(long, default_value = "spatial-nodes")]
    pub nodes_topic: String,
    /// One `Reading` per message, or one `ReadingBatch` per cell and step.
    #[arg(long, value_enum, default_value_t = Payload::Batch)]
    pub payload: Payload,
    /// Framing of the Avro payloads.
    #[arg(long, value_enum, default_value_t = Framing::Plain)]
    pub wire_format: Framing,
    /// Simulated seconds per wall-clock second.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Steps to produce (default: until Ctrl-C; required with --csv).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Production lines (cells) and machines per line.
    #[arg(long, default_value_t = 3)]
    pub lines: usize,
    #[arg(long, default_value_t = 5)]
    pub machines_per_line: usize,
    /// Seed of the plant and its faults.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Inject no faults (normal operation, e.g. for training data).
    #[arg(long)]
    pub no_faults: bool,
    /// Inject one of each kind of bad input every N steps.
    #[arg(long)]
    pub bad_input_every: Option<u64>,
    /// Write CSV (ts_ms,node_id,cell_id,channels…) to this file instead of publishing.
    #[arg(long, requires = "steps")]
    pub csv: Option<PathBuf>,
    /// With --csv: also write the injected faults as labelled ranges
    /// (`start_ms,end_ms,node_ids,kind`, the format `gridwatch eval --labels` reads).
    #[arg(long, requires = "csv")]
    pub labels_csv: Option<PathBuf>,
    /// With --csv: also write each node's cell (`node_id,cell`, for `gridwatch eval --nodes`).
    #[arg(long, requires = "csv")]
    pub nodes_csv: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Payload {
    Reading,
    Batch,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Framing {
    Plain,
    Confluent,
}

/// Serves the admin endpoints (when `[admin] listen` is set) while `job` runs; stops them
/// when it ends.
async fn with_admin<T>(
    config: &Config,
    health: Arc<Health>,
    cancel: CancellationToken,
    job: impl std::future::Future<Output = T>,
) -> anyhow::Result<T> {
    let admin = match config.admin.address() {
        Some(address) => Some(admin::serve(address, health, cancel.clone()).await?),
        None => None,
    };
    let result = job.await;
    cancel.cancel();
    if let Some((_, task)) = admin {
        let _ = task.await;
    }
    Ok(result)
}

/// Cancelled on the first Ctrl-C or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("Shutting down: draining in-flight windows, then committing.");
        cancel.cancel();
    });
    token
}

fn env_vars() -> Vec<(String, String)> {
    std::env::vars().collect()
}

pub async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => {
            let mut config = Config::load(args.config.as_deref(), env_vars())?;
            if let Some(model) = args.model {
                config.model.contract = model;
            }
            let options = demo::DemoOptions {
                duration: args.duration,
                speed: args.speed,
                seed: args.seed,
                bad_input_every: (args.bad_input_every > 0).then_some(args.bad_input_every),
                verbose: !args.quiet,
            };
            let summary = demo::run(config, options, shutdown_signal()).await?;
            print!("{}", demo::summary_text(&summary));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let config = Config::load(args.config.as_deref(), env_vars())?;
            if args.print_config {
                print!("{}", config.to_redacted_toml());
                return Ok(ExitCode::SUCCESS);
            }
            let loaded = pipeline::load_model(&config)?;
            tracing::info!(
                model = %loaded.model.contract.label(),
                provider = loaded.model.provider,
                "Model loaded."
            );
            let stats = Arc::new(Stats::default());
            let health = Arc::new(Health::default());
            let cancel = shutdown_signal();
            let job = pipeline::run(
                &config,
                loaded,
                Arc::clone(&stats),
                Arc::clone(&health),
                cancel.clone(),
            );
            // A missed shutdown deadline is an error here, so the exit code is non-zero.
            let report = with_admin(&config, health, cancel, job).await??;
            let s = stats.snapshot();
            tracing::info!(
                messages = s.messages_consumed,
                readings = s.readings_decoded,
                windows = s.windows_scored,
                events = s.events_published,
                dead_lettered = s.dead_lettered,
                committed = ?report.committed,
                "Stopped."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Route(args) => {
            let config = Config::load(args.config.as_deref(), env_vars())?;
            if args.print_config {
                print!("{}", config.to_redacted_toml());
                return Ok(ExitCode::SUCCESS);
            }
            let stats = Arc::new(Stats::default());
            let health = Arc::new(Health::default());
            let cancel = shutdown_signal();
            let job = crate::route::run(&config, stats, Arc::clone(&health), cancel.clone());
            let report = with_admin(&config, health, cancel, job).await??;
            tracing::info!(
                messages = report.messages,
                routed = report.routed,
                batches = report.batches,
                dead_lettered = report.dead_lettered,
                "Stopped."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(args) => simulate_command(args).await,
        Command::Tail(args) => tail_command(args).await,
        Command::Bench(args) => {
            let options = crate::bench::BenchOptions {
                readings: args.readings,
                cells: args.cells,
                nodes_per_cell: args.nodes_per_cell,
                batch_steps: args.batch_steps,
                partitions: args.partitions,
                brokers: args.brokers,
                latency_seconds: args.latency_seconds,
                latency_rate: args.latency_rate,
                repeat: args.repeat as usize,
            };
            let report = crate::bench::run(options, |step| eprintln!("bench: {step}...")).await?;
            print!("{}", crate::bench::report_text(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => eval_command(args),
        Command::Inject(args) => inject_command(args),
        Command::CheckConfig(args) => check_config(&args.file),
        Command::Model(ModelCommand::Inspect { path }) => {
            let (contract, onnx) = ModelContract::load(&path)?;
            print!("{}", inspect(&contract, &onnx));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn framing(f: Framing) -> WireFormat {
    match f {
        Framing::Plain => WireFormat::Plain,
        Framing::Confluent => WireFormat::Confluent,
    }
}

async fn tail_command(args: TailArgs) -> anyhow::Result<ExitCode> {
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", &args.brokers);
    let filter = tail::Filter {
        min_severity: args.severity.map(|s| match s {
            SeverityArg::Low => Severity::Low,
            SeverityArg::Medium => Severity::Medium,
            SeverityArg::High => Severity::High,
            SeverityArg::Critical => Severity::Critical,
        }),
        cells: args.cells,
    };
    let json = args.json;
    tail::follow(
        client,
        &args.topic,
        framing(args.wire_format),
        args.from_beginning,
        &filter,
        shutdown_signal(),
        |event| {
            if json {
                println!("{}", tail::event_json(&event));
            } else {
                println!("{}", tail::event_line(&event));
            }
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

fn inject_command(args: InjectArgs) -> anyhow::Result<ExitCode> {
    use crate::eval::inject;
    let mut config: inject::InjectConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => inject::InjectConfig::default(),
    };
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    let (nodes, values) = read_matrix(&args.readings, true)?;
    let rows = values.len() / nodes.len().max(1);
    let (_, adjacency) = read_matrix(&args.adjacency, false)?;
    let mut series = inject::Series {
        nodes,
        values,
        rows,
    };
    let faults = inject::inject(&mut series, &adjacency, &config)?;
    let start = args.start.unwrap_or(inject::METR_LA_START_MS);
    let step = args.cadence.as_millis() as i64;
    let mut out = series.nodes.join(",") + "\n";
    for r in 0..series.rows {
        let row: Vec<String> = series.values[r * series.nodes.len()..(r + 1) * series.nodes.len()]
            .iter()
            .map(|v| {
                if v.is_finite() {
                    v.to_string()
                } else {
                    String::new()
                }
            })
            .collect();
        out += &row.join(",");
        out += "\n";
    }
    std::fs::write(&args.out, out)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", args.out.display()))?;
    std::fs::write(
        &args.labels,
        inject::labels_csv(&faults, |r| start + r as i64 * step),
    )
    .map_err(|e| anyhow::anyhow!("writing {}: {e}", args.labels.display()))?;
    if let Some(path) = &args.faults_json {
        std::fs::write(path, serde_json::to_string_pretty(&faults)? + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    let mut kinds = std::collections::BTreeMap::new();
    for f in &faults {
        *kinds.entry(f.kind.as_str()).or_insert(0) += 1;
    }
    eprintln!(
        "Injected {} faults (seed {}) into {} rows × {} nodes: {kinds:?}; wrote {} and {}.",
        faults.len(),
        config.seed,
        series.rows,
        series.nodes.len(),
        args.out.display(),
        args.labels.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// A numeric CSV: its header (when `header`) and its values row-major; blanks are NaN.
fn read_matrix(path: &std::path::Path, header: bool) -> anyhow::Result<(Vec<String>, Vec<f64>)> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(header)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let names: Vec<String> = if header {
        rdr.headers()?.iter().map(str::to_string).collect()
    } else {
        Vec::new()
    };
    let mut values = Vec::new();
    for (i, record) in rdr.records().enumerate() {
        let record = record.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for field in record.iter() {
            let v = if field.is_empty() {
                f64::NAN
            } else {
                field.parse::<f64>().map_err(|_| {
                    anyhow::anyhow!(
                        "{}: line {}: `{field}` is not a number",
                        path.display(),
                        i + 1 + usize::from(header)
                    )
                })?
            };
            values.push(v);
        }
    }
    Ok((names, values))
}

fn eval_command(args: EvalArgs) -> anyhow::Result<ExitCode> {
    use crate::eval::{self, Fit, ThresholdPolicy};
    let mut config = Config::load(args.config.as_deref(), env_vars())?;
    if let Some(model) = args.model {
        config.model.contract = model;
    }
    let fit = match (args.fit_rows, args.fit_until) {
        (Some(n), _) => Fit::Rows(n),
        (None, Some(t)) => Fit::Until(t),
        (None, None) => Fit::Nothing,
    };
    let delimiter = match args.delimiter {
        Some(c) if c.is_ascii() => Some(c as u8),
        Some(c) => anyhow::bail!("--delimiter `{c}` is not an ASCII character"),
        None => None,
    };
    let options = eval::EvalOptions {
        inputs: args.inputs,
        format: eval::dataset::Format {
            delimiter,
            time_column: args.time_column,
            cadence_ms: args.cadence.map_or(0, |d| d.as_millis() as i64),
            start_ms: args.start,
            node_column: args.node_column,
            node_id: args.node_id,
            label_column: args.label_column,
            ignore_columns: args.ignore_columns,
            channels: Vec::new(),
        },
        nodes: args.nodes,
        h3_resolution: args.h3_resolution,
        labels: args.labels,
        fit,
        threshold: args.threshold.unwrap_or(if fit == Fit::Nothing {
            ThresholdPolicy::Contract
        } else {
            ThresholdPolicy::Fit
        }),
        fit_quantile: args.fit_quantile,
        fit_factor: args.fit_factor,
        merge_gap: args.merge_gap.unwrap_or_else(|| {
            config
                .detect
                .incidents
                .as_ref()
                .map_or(0, |i| i.close_after as usize)
        }),
        seed: args.seed,
        batch: args.batch,
        progress: !args.quiet,
        points_csv: args.points_csv,
    };
    let report = eval::run(&config, &options)?;
    let json = serde_json::to_string_pretty(&report)?;
    match args.json.as_deref() {
        Some(p) if p == std::path::Path::new("-") => println!("{json}"),
        Some(p) => {
            std::fs::write(p, json + "\n")
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))?;
            print!("{}", eval::report_text(&report));
        }
        None => print!("{}", eval::report_text(&report)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads and validates `file`, then the files it names, without connecting anywhere.
fn check_config(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(Some(file), env_vars())?;
    let (contract, onnx) = ModelContract::load(&config.model.contract)
        .map_err(|e| anyhow::anyhow!("[model] contract: {e}"))?;
    pipeline::detector_for(&config, &contract)?;
    pipeline::decoder(&config)?;
    let changelog = config
        .detect
        .changelog
        .as_ref()
        .map(|c| format!(", judge state to `{}`", c.topic))
        .unwrap_or_default();
    println!(
        "{}: valid; model {} ({}), {} reading topic(s), events to `{}`, dead letters to `{}`{changelog}",
        file.display(),
        contract.label(),
        onnx.display(),
        config.source.topics.len(),
        config.sink.events_topic,
        config.sink.dead_letter_topic
    );
    Ok(ExitCode::SUCCESS)
}

/// The human-readable summary of a model contract.
pub fn inspect(c: &ModelContract, onnx: &std::path::Path) -> String {
    let mut out = String::new();
    let shape = |s: &crate::infer::contract::TensorSpec| {
        let dims: Vec<String> = s
            .shape
            .iter()
            .map(|d| match d {
                crate::infer::contract::Dim::Fixed(n) => n.to_string(),
                crate::infer::contract::Dim::Symbolic(name) => name.clone(),
            })
            .collect();
        format!("{} [{}]", s.name, dims.join(", "))
    };
    out.push_str(&format!("model        {} ({})\n", c.label(), c.family));
    out.push_str(&format!(
        "onnx         {} (sha256 {})\n",
        onnx.display(),
        c.onnx_sha256
    ));
    for i in &c.inputs {
        out.push_str(&format!("input        {}\n", shape(i)));
    }
    for o in &c.outputs {
        out.push_str(&format!("output       {}\n", shape(o)));
    }
    out.push_str(&format!(
        "window       {} steps of {} ms, last {} scored, up to {} nodes\n",
        c.window_steps, c.cadence_ms, c.scored_steps, c.max_nodes
    ));
    for (ch, scale) in c.channels.iter().zip(&c.calibration.error_scale) {
        out.push_str(&format!(
            "channel      {:<14} {:<6} mean {:>9.4}  std {:>8.4}  error scale {:.5}\n",
            ch.name, ch.unit, ch.mean, ch.std, scale
        ));
    }
    out.push_str(&format!(
        "threshold    {:.4} ({}; {} calibration windows)\n",
        c.calibration.threshold, c.calibration.rule, c.calibration.windows
    ));
    out.push_str(&format!("scoring      {}\n", c.scoring));
    for key in ["data", "date", "command"] {
        if let Some(v) = c.training.get(key) {
            out.push_str(&format!(
                "training     {key}: {}\n",
                v.as_str().map_or_else(|| v.to_string(), str::to_owned)
            ));
        }
    }
    out
}

async fn simulate_command(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let spec = PlantSpec {
        lines: args.lines,
        machines_per_line: args.machines_per_line,
        seed: args.seed,
        mean_steps_between_faults: if args.no_faults {
            None
        } else {
            PlantSpec::default().mean_steps_between_faults
        },
        ..PlantSpec::default()
    };
    let mut plant = Plant::new(spec);
    if let Some(path) = args.csv {
        let steps = args.steps.unwrap_or(0);
        simulate::write_csv(&mut plant, steps, &path)?;
        if let Some(labels) = &args.labels_csv {
            let mut text = String::from("start_ms,end_ms,node_ids,kind\n");
            for f in plant.faults() {
                text += &format!(
                    "{},{},{},{}\n",
                    f.start_ms,
                    f.end_ms,
                    f.node_id,
                    f.kind.as_str()
                );
            }
            std::fs::write(labels, text)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", labels.display()))?;
        }
        if let Some(nodes) = &args.nodes_csv {
            let mut text = String::from("node_id,cell\n");
            for (cell, node) in plant.nodes() {
                text += &format!("{node},{cell}\n");
            }
            std::fs::write(nodes, text)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", nodes.display()))?;
        }
        eprintln!(
            "Wrote {steps} steps of {} nodes to {} ({} faults).",
            plant.nodes().count(),
            path.display(),
            plant.faults().len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut client = rdkafka::ClientConfig::new();
    client.set(
        "bootstrap.servers",
        args.brokers.as_deref().unwrap_or("localhost:9092"),
    );
    let publish = PublishSpec {
        readings_topic: args.topic,
        nodes_topic: args.nodes_topic,
        payload: match args.payload {
            Payload::Reading => PayloadKind::Reading,
            Payload::Batch => PayloadKind::Batch,
        },
        wire_format: framing(args.wire_format),
        speed: args.speed,
        steps: args.steps,
        bad_input_every: args.bad_input_every,
    };
    let nodes = simulate::publish_nodes(&client, &plant, &publish).await?;
    tracing::info!(nodes, topic = %publish.nodes_topic, "Published spatial-node records.");
    let report = simulate::publish_readings(&client, plant, &publish, shutdown_signal(), |f| {
        tracing::info!(cell = %f.cell_id, node = %f.node_id, kind = f.kind.as_str(), start_ms = f.start_ms, end_ms = f.end_ms, "Injected a fault.");
    })
    .await?;
    tracing::info!(
        steps = report.steps,
        readings = report.readings,
        messages = report.messages,
        faults = report.faults.len(),
        "Simulation stopped."
    );
    Ok(ExitCode::SUCCESS)
}
