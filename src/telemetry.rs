//! telemetry: logging set-up and the one place each observable occurrence is defined.
//!
//! Invariant: every occurrence worth knowing about (a dead-lettered reading, an emitted window,
//! a published event, …) goes through one function here that both counts it (in [`Stats`] for
//! the run's summary and in the `metrics` registry for exporters) and logs it at a fitting level.
//! Metric labels are bounded sets (topic, partition, reason, severity), never a cell or node id.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::schema::{DeadLetterReason, Severity};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to a file or a collector stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A second initialisation (tests) keeps the first subscriber.
    let _ = result;
}

/// Counters of one pipeline run, read for its summary.
#[derive(Debug, Default)]
pub struct Stats {
    pub messages_consumed: AtomicU64,
    pub readings_decoded: AtomicU64,
    pub readings_accepted: AtomicU64,
    pub channels_ignored: AtomicU64,
    pub readings_without_model_channel: AtomicU64,
    pub dead_lettered: [AtomicU64; DeadLetterReason::ALL.len()],
    pub dropped: AtomicU64,
    pub windows_emitted: AtomicU64,
    pub windows_skipped: AtomicU64,
    pub windows_scored: AtomicU64,
    pub inference_batches: AtomicU64,
    pub events_published: [AtomicU64; Severity::ALL.len()],
    pub commits: AtomicU64,
    /// When the first message was consumed and when work last progressed (a message consumed,
    /// a batch scored, an event acknowledged): what benchmarks time. Both count nanoseconds
    /// from `epoch`, when these statistics began (0: not yet).
    first_message_ns: AtomicU64,
    last_progress_ns: AtomicU64,
    epoch: Epoch,
    /// Window close → event acknowledged, seconds, when recording is on.
    latencies: std::sync::Mutex<Option<Vec<f64>>>,
    /// Window close → scored (inference done), seconds, when recording is on.
    scored_latencies: std::sync::Mutex<Option<Vec<f64>>>,
    /// Metric handles of the per-message path, registered once instead of looked up each time.
    hot: std::sync::OnceLock<HotCounters>,
}

/// The moment a [`Stats`] was made.
#[derive(Debug, Clone, Copy)]
struct Epoch(std::time::Instant);

impl Default for Epoch {
    fn default() -> Self {
        Self(std::time::Instant::now())
    }
}

#[derive(Debug)]
struct HotCounters {
    readings_decoded: metrics::Counter,
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Stats {
    fn hot(&self) -> &HotCounters {
        self.hot.get_or_init(|| HotCounters {
            readings_decoded: metrics::counter!("gridwatch_readings_decoded_total"),
        })
    }

    /// Nanoseconds since `epoch`, never 0 (0 marks "not yet").
    fn now_ns(&self) -> u64 {
        (self.epoch.0.elapsed().as_nanos() as u64).max(1)
    }

    /// Work progressed now. Lock-free: the consuming loop marks it.
    pub fn progress(&self) {
        self.last_progress_ns
            .store(self.now_ns(), Ordering::Relaxed);
    }

    /// From the first consumed message to the last progress.
    pub fn busy_span(&self) -> Option<std::time::Duration> {
        let first = self.first_message_ns.load(Ordering::Relaxed);
        let last = self.last_progress_ns.load(Ordering::Relaxed);
        (first > 0 && last > 0).then(|| std::time::Duration::from_nanos(last.saturating_sub(first)))
    }

    /// Starts keeping every window close → acknowledged latency (benchmarks).
    pub fn record_latencies(&self) {
        *self.latencies.lock().expect("stats lock") = Some(Vec::new());
        *self.scored_latencies.lock().expect("stats lock") = Some(Vec::new());
    }

    /// The close → scored times kept so far, in seconds.
    pub fn scored_latencies(&self) -> Vec<f64> {
        self.scored_latencies
            .lock()
            .expect("stats lock")
            .clone()
            .unwrap_or_default()
    }

    /// The latencies kept so far, in seconds.
    pub fn latencies(&self) -> Vec<f64> {
        self.latencies
            .lock()
            .expect("stats lock")
            .clone()
            .unwrap_or_default()
    }

    pub fn dead_lettered(&self, reason: DeadLetterReason) -> u64 {
        get(&self.dead_lettered[reason as usize])
    }

    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.iter().map(get).sum()
    }

    pub fn events_total(&self) -> u64 {
        self.events_published.iter().map(get).sum()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            messages_consumed: get(&self.messages_consumed),
            readings_decoded: get(&self.readings_decoded),
            readings_accepted: get(&self.readings_accepted),
            dead_lettered: self.dead_lettered_total(),
            dropped: get(&self.dropped),
            windows_emitted: get(&self.windows_emitted),
            windows_skipped: get(&self.windows_skipped),
            windows_scored: get(&self.windows_scored),
            inference_batches: get(&self.inference_batches),
            events_published: self.events_total(),
            commits: get(&self.commits),
        }
    }
}

/// Plain copy of the headline counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub messages_consumed: u64,
    pub readings_decoded: u64,
    pub readings_accepted: u64,
    pub dead_lettered: u64,
    pub dropped: u64,
    pub windows_emitted: u64,
    pub windows_skipped: u64,
    pub windows_scored: u64,
    pub inference_batches: u64,
    pub events_published: u64,
    pub commits: u64,
}

/// Readings between two progress marks of the consuming loop: reading the clock for every
/// single-reading message was a twentieth of the ingest profile on a virtual machine. A message
/// of at least this many readings is marked itself, so a mark trails the last message by fewer
/// than this many readings, which changes no measured span noticeably.
const PROGRESS_EVERY: u64 = 64;

/// The counter of messages consumed from `topic`; a consumer registers it once per partition
/// and passes it to [`message_consumed`].
pub fn messages_consumed_counter(topic: &str) -> metrics::Counter {
    metrics::counter!("gridwatch_messages_consumed_total", "topic" => topic.to_owned())
}

/// A message was consumed; `messages` is its topic's [`messages_consumed_counter`].
pub fn message_consumed(stats: &Stats, messages: &metrics::Counter, readings: usize) {
    let before = stats.messages_consumed.fetch_add(1, Ordering::Relaxed);
    if before == 0 {
        stats
            .first_message_ns
            .store(stats.now_ns(), Ordering::Relaxed);
    }
    if readings as u64 >= PROGRESS_EVERY || before.is_multiple_of(PROGRESS_EVERY) {
        stats.progress();
    }
    bump(&stats.readings_decoded, readings as u64);
    let hot = stats.hot();
    hot.readings_decoded.increment(readings as u64);
    messages.increment(1);
}

pub fn reading_accepted(stats: &Stats, ignored_channels: usize) {
    bump(&stats.readings_accepted, 1);
    if ignored_channels > 0 {
        bump(&stats.channels_ignored, ignored_channels as u64);
        metrics::counter!("gridwatch_channels_ignored_total").increment(ignored_channels as u64);
    }
}

pub fn reading_without_model_channel(stats: &Stats) {
    bump(&stats.readings_without_model_channel, 1);
    metrics::counter!("gridwatch_readings_ignored_total").increment(1);
}

/// A message or reading could not be used. `dead_lettered` is false when the policy drops it.
pub fn reading_rejected(
    stats: &Stats,
    reason: DeadLetterReason,
    topic: &str,
    partition: i32,
    offset: i64,
    error: &dyn std::fmt::Display,
    dead_lettered: bool,
) {
    if dead_lettered {
        bump(&stats.dead_lettered[reason as usize], 1);
        metrics::counter!("gridwatch_dead_lettered_total", "reason" => reason.as_str())
            .increment(1);
    } else {
        bump(&stats.dropped, 1);
        metrics::counter!("gridwatch_dropped_total", "reason" => reason.as_str()).increment(1);
    }
    tracing::debug!(
        reason = reason.as_str(),
        topic,
        partition,
        offset,
        error = %error,
        dead_lettered,
        "Rejected a reading."
    );
}

pub fn node_record_rejected(partition: i32, offset: i64, error: &dyn std::fmt::Display) {
    metrics::counter!("gridwatch_node_records_rejected_total").increment(1);
    tracing::warn!(partition, offset, error = %error, "Refused a spatial-node record.");
}

pub fn windows_closed(stats: &Stats, emitted: usize, sparse: usize, warmup: usize) {
    if emitted > 0 {
        bump(&stats.windows_emitted, emitted as u64);
        metrics::counter!("gridwatch_windows_emitted_total").increment(emitted as u64);
    }
    for (reason, n) in [("sparse", sparse), ("warmup", warmup)] {
        if n > 0 {
            bump(&stats.windows_skipped, n as u64);
            metrics::counter!("gridwatch_windows_skipped_total", "reason" => reason)
                .increment(n as u64);
        }
    }
}

pub fn batch_inferred(stats: &Stats, windows: usize, seconds: f64) {
    stats.progress();
    bump(&stats.inference_batches, 1);
    bump(&stats.windows_scored, windows as u64);
    metrics::histogram!("gridwatch_inference_batch_size").record(windows as f64);
    metrics::histogram!("gridwatch_inference_seconds").record(seconds);
    tracing::trace!(windows, seconds, "Scored a batch.");
}

/// An event was acknowledged; `latency_seconds` from its window's close, for an event that
/// has a window of readings (not the CLOSE of a silent cell's incident).
pub fn event_published(stats: &Stats, severity: Severity, latency_seconds: Option<f64>) {
    stats.progress();
    if let Some(latency_seconds) = latency_seconds {
        if let Some(kept) = stats.latencies.lock().expect("stats lock").as_mut() {
            kept.push(latency_seconds);
        }
        metrics::histogram!("gridwatch_event_latency_seconds").record(latency_seconds);
    }
    bump(&stats.events_published[severity as usize], 1);
    metrics::counter!("gridwatch_events_published_total", "severity" => severity.as_str())
        .increment(1);
}

pub fn produce_failed(topic: &str, error: &dyn std::fmt::Display) {
    metrics::counter!("gridwatch_produce_errors_total", "topic" => topic.to_owned()).increment(1);
    tracing::warn!(topic, error = %error, "Produce failed; retrying.");
}

pub fn offsets_stored(stats: &Stats, partitions: usize) {
    bump(&stats.commits, 1);
    metrics::counter!("gridwatch_offset_stores_total").increment(1);
    tracing::trace!(partitions, "Stored offsets.");
}

/// A numbered reading that was already used (an upstream replay) was ignored.
pub fn duplicate_reading() {
    metrics::counter!("gridwatch_duplicate_readings_total").increment(1);
}

/// `gridwatch route` enqueued one cell-keyed batch of `readings` readings.
pub fn readings_routed(readings: usize) {
    metrics::counter!("gridwatch_routed_readings_total").increment(readings as u64);
    metrics::counter!("gridwatch_routed_batches_total").increment(1);
}

/// Cells whose windows this instance holds (bounded by `[assemble] max_cells`).
pub fn cells_held(cells: usize) {
    metrics::gauge!("gridwatch_cells").set(cells as f64);
}

/// Cells the judging task keeps thresholds, divergence baselines or incidents for.
pub fn cells_judged(cells: usize) {
    metrics::gauge!("gridwatch_judged_cells").set(cells as f64);
}

/// One cell's judge state reached the changelog topic (or did not).
pub fn judge_state_written(cell: &str, error: Option<&dyn std::fmt::Display>) {
    match error {
        None => {
            metrics::counter!("gridwatch_judge_state_writes_total", "result" => "ok").increment(1)
        }
        Some(error) => {
            metrics::counter!("gridwatch_judge_state_writes_total", "result" => "failed")
                .increment(1);
            tracing::warn!(cell, error = %error, "Could not write the cell's judge state; after its next move it learns from nothing.");
        }
    }
}

/// A part of a cell's judge state was taken over from the changelog, or refused and why.
pub fn judge_state_restored(cell: &str, part: &str, result: &Result<usize, String>) {
    match result {
        Ok(0) => {}
        Ok(_) => {
            metrics::counter!("gridwatch_judge_state_restored_total", "part" => part.to_owned())
                .increment(1);
            tracing::debug!(cell, "Restored the cell's {part} from the changelog.");
        }
        Err(why) => {
            metrics::counter!("gridwatch_judge_state_refused_total", "part" => part.to_owned())
                .increment(1);
            tracing::warn!(cell, "The cell's saved {part} were not used: {why}.");
        }
    }
}

/// What readiness depends on, updated by the pipeline and read by the admin endpoints.
#[derive(Debug, Default)]
pub struct Health {
    registry_loaded: std::sync::atomic::AtomicBool,
    model_loaded: std::sync::atomic::AtomicBool,
    assigned_partitions: std::sync::atomic::AtomicUsize,
    broker_reachable: std::sync::atomic::AtomicBool,
}

impl Health {
    pub fn set_registry_loaded(&self, loaded: bool) {
        self.registry_loaded.store(loaded, Ordering::Release);
    }

    pub fn set_model_loaded(&self, loaded: bool) {
        self.model_loaded.store(loaded, Ordering::Release);
    }

    pub fn set_assigned_partitions(&self, count: usize) {
        self.assigned_partitions.store(count, Ordering::Release);
        metrics::gauge!("gridwatch_assigned_partitions").set(count as f64);
    }

    pub fn set_broker_reachable(&self, reachable: bool) {
        self.broker_reachable.store(reachable, Ordering::Release);
    }

    pub fn assigned_partitions(&self) -> usize {
        self.assigned_partitions.load(Ordering::Acquire)
    }

    /// Names of the readiness checks that fail now; empty when ready.
    pub fn failing_checks(&self) -> Vec<&'static str> {
        let mut failing = Vec::new();
        if self.assigned_partitions.load(Ordering::Acquire) == 0 {
            failing.push("no partitions assigned");
        }
        if !self.registry_loaded.load(Ordering::Acquire) {
            failing.push("registry not loaded");
        }
        if !self.model_loaded.load(Ordering::Acquire) {
            failing.push("model not loaded");
        }
        if !self.broker_reachable.load(Ordering::Acquire) {
            failing.push("no broker reachable");
        }
        failing
    }
}

/// Which model scores windows now.
pub fn model_in_use(name: &str, version: &str, provider: &'static str) {
    metrics::gauge!(
        "gridwatch_model_info",
        "model" => name.to_owned(),
        "version" => version.to_owned(),
        "provider" => provider
    )
    .set(1.0);
    tracing::info!(model = name, version, provider, "Model in use.");
}

/// A window was scored, `since_close` seconds after it closed.
pub fn window_scored(stats: &Stats, score: f64, since_close: f64) {
    metrics::histogram!("gridwatch_window_score").record(score);
    metrics::histogram!("gridwatch_window_scored_seconds").record(since_close);
    if let Some(kept) = stats.scored_latencies.lock().expect("stats lock").as_mut() {
        kept.push(since_close);
    }
}

/// Consumer lag of one partition, from librdkafka's statistics.
pub fn consumer_lag(topic: &str, partition: i32, lag: i64) {
    metrics::gauge!(
        "gridwatch_consumer_lag",
        "topic" => topic.to_owned(),
        "partition" => partition.to_string()
    )
    .set(lag as f64);
}

/// Result of one offset commit.
pub fn commit_result(ok: bool, error: Option<&dyn std::fmt::Display>) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!("gridwatch_commits_total", "result" => result).increment(1);
    if let Some(error) = error {
        tracing::warn!(error = %error, "Offset commit failed.");
    }
}

/// A model reload was attempted: `loaded` names the new model, or the refusal says why.
pub fn model_reload(loaded: bool, what: &str, error: Option<&dyn std::fmt::Display>) {
    let result = if loaded { "loaded" } else { "rejected" };
    metrics::counter!("gridwatch_model_reloads_total", "result" => result).increment(1);
    match error {
        None => tracing::info!(
            model = what,
            "Loaded a new model; it takes over at the next batch."
        ),
        Some(error) => tracing::error!(
            contract = what,
            error = %error,
            "Refused a new model; the current model keeps running."
        ),
    }
}
