//! gridwatch finds anomalies in multi-sensor telemetry as it flows through Kafka.
//!
//! # Layout
//! Follow a reading from Kafka to an anomaly event by opening the stage modules in order:
//!
//! - [`source`]: the group consumer of the reading topics and the offset-commit invariant.
//! - [`decode`]: Kafka payloads (plain Avro or Confluent framing) → validated readings.
//! - [`registry`]: the compacted spatial-node topic → node → cell (explicit or H3).
//! - [`assemble`]: event-time buckets, watermarks, late data → per-cell windows with masks.
//! - [`infer`]: the model contract, ONNX Runtime sessions, batching and padding.
//! - [`detect`]: scores, thresholds (static or per-cell SPOT), severity, contributors,
//!   incidents, deterministic event ids.
//! - [`sink`]: anomaly events and dead letters → Kafka, acknowledged.
//! - [`changelog`]: the judge's per-cell state in a compacted topic, taken over by a cell's
//!   next owner after a rebalance ([`table`]: a compacted topic read whole, as the registry is).
//! - [`pipeline`]: wires the stages with bounded channels; drains and commits on shutdown.
//! - [`route`]: a stage of its own, before all of these, that republishes node-keyed readings
//!   keyed by cell (scale-out needs every reading of a cell in one partition).
//!
//! At the edges: [`schema`] (Avro schemas and wire framing), [`config`] (TOML + environment),
//! [`telemetry`] (logging and counters), [`admin`] (metrics and health endpoints), [`cli`] (the command line), and the demo plant:
//! [`simulate`] (the plant simulator as a producer), [`tail`] (the anomaly topic for people) and
//! [`demo`] (everything on an in-process
//! mock cluster), [`bench`](mod@bench) (throughput against the bare-consumer ceiling, latency) and
//! [`eval`] (detection quality on labelled datasets, through the same assemble → infer → detect
//! code).

/// The hasher of the maps the consuming loop looks up once per reading (node ids, cells):
/// foldhash, seeded per process, instead of the standard library's SipHash, which was a few
/// per cent of the single-reading ingest profile. Keys are ids already on the spatial-node
/// topic, not arbitrary input.
pub type FastHash = foldhash::fast::RandomState;

pub mod admin;
pub mod assemble;
pub mod bench;
pub mod changelog;
pub mod cli;
pub mod config;
pub mod decode;
pub mod demo;
pub mod detect;
pub mod eval;
pub mod infer;
pub mod pipeline;
pub mod registry;
pub mod route;
pub mod schema;
pub mod simulate;
pub mod sink;
pub mod source;
pub mod table;
pub mod tail;
pub mod telemetry;
