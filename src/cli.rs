//! cli: the `gridwatch` command line and what each subcommand does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::decode::PayloadKind;
use crate::schema::WireFormat;
use crate::simulate::{self, Plant, PlantSpec, PublishSpec};
use crate::telemetry::{Health, LogFormat, Stats};
use crate::{admin, demo, pipeline};

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
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything on an embedded Kafka (librdkafka's mock cluster): a simulated plant with
    /// injected faults, the detector, and a live view of the anomaly topic; ends with a summary
    /// (readings, windows, events, precision and recall against the injected faults).
    Demo(DemoArgs),
    /// Run the detector against a Kafka cluster.
    Run(RunArgs),
    /// Publish simulated plant readings (and its spatial-node records) to a Kafka cluster, or
    /// write them to a CSV file for training.
    Simulate(SimulateArgs),
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long to run (wall clock), e.g. 60s, 5m. Ctrl-C ends early with the summary.
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
            let admin = match config.admin.address() {
                Some(address) => {
                    Some(admin::serve(address, Arc::clone(&health), cancel.clone()).await?)
                }
                None => None,
            };
            let result =
                pipeline::run(&config, loaded, Arc::clone(&stats), health, cancel.clone()).await;
            cancel.cancel();
            if let Some((_, task)) = admin {
                let _ = task.await;
            }
            // A missed shutdown deadline is an error here, so the exit code is non-zero.
            let report = result?;
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
        Command::Simulate(args) => simulate_command(args).await,
    }
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
        wire_format: match args.wire_format {
            Framing::Plain => WireFormat::Plain,
            Framing::Confluent => WireFormat::Confluent,
        },
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
