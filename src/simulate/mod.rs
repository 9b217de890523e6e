//! simulate: the demo plant as a Kafka producer (and as a CSV file for training).
//!
//! Invariant: what the simulator publishes is exactly what [`plant::Plant`] generates, step by
//! step in event-time order, keyed by cell id (one `ReadingBatch` per cell and step, or one
//! `Reading` per message), after the spatial-node records of every machine. Injected bad input
//! is published alongside and counted in the [`SimReport`], so a run can check what the detector
//! dead-lettered against what was sent.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::decode::PayloadKind;
use crate::schema::{Channel, Codec, Reading, RecordKind, SpatialNode, WireFormat, records};

pub mod plant;

pub use plant::{Fault, FaultKind, Plant, PlantSpec, SimReading};

/// The spatial-node record of every machine: explicit cell (its line), plant x/y position.
pub fn node_records(plant: &Plant) -> Vec<SpatialNode> {
    plant
        .nodes()
        .enumerate()
        .map(|(i, (cell, node))| SpatialNode {
            node_id: node.to_owned(),
            cell_id: Some(cell.to_owned()),
            x: Some((i % 8) as f64 * 4.0),
            y: Some((i / 8) as f64 * 6.0),
            kind: "pump".into(),
            channels: plant::CHANNELS
                .iter()
                .map(|(name, unit)| Channel {
                    name: (*name).into(),
                    unit: (*unit).into(),
                })
                .collect(),
            ..SpatialNode::default()
        })
        .collect()
}

/// As a wire `Reading`.
pub fn to_reading(r: &SimReading) -> Reading {
    Reading {
        node_id: r.node_id.clone(),
        event_time_ms: r.event_time_ms,
        values: plant::CHANNELS
            .iter()
            .zip(r.values)
            .map(|((name, _), v)| ((*name).to_owned(), v))
            .collect(),
        sequence: None,
    }
}

/// One step's readings grouped by cell, cells in plant order: what a line's gateway batches.
pub fn by_cell(step: &[SimReading]) -> Vec<(String, Vec<Reading>)> {
    let mut cells: Vec<(String, Vec<Reading>)> = Vec::new();
    for r in step {
        match cells.iter_mut().find(|(c, _)| *c == r.cell_id) {
            Some((_, list)) => list.push(to_reading(r)),
            None => cells.push((r.cell_id.clone(), vec![to_reading(r)])),
        }
    }
    cells
}

/// Writes `steps` steps of the plant as CSV: `ts_ms,node_id,cell_id,<channels…>`.
pub fn write_csv(plant: &mut Plant, steps: u64, path: &Path) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let names: Vec<&str> = plant::CHANNELS.iter().map(|(n, _)| *n).collect();
    writeln!(out, "ts_ms,node_id,cell_id,{}", names.join(","))?;
    for _ in 0..steps {
        for r in plant.step() {
            write!(out, "{},{},{}", r.event_time_ms, r.node_id, r.cell_id)?;
            for v in r.values {
                write!(out, ",{v:.6}")?;
            }
            writeln!(out)?;
        }
    }
    out.flush()
}

/// Where and how the simulator publishes.
#[derive(Debug, Clone)]
pub struct PublishSpec {
    pub readings_topic: String,
    pub nodes_topic: String,
    pub payload: PayloadKind,
    pub wire_format: WireFormat,
    /// Event-time seconds per wall-clock second (1 = real time).
    pub speed: f64,
    /// Steps to publish; `None` runs until cancelled.
    pub steps: Option<u64>,
    /// Every this many steps, publish one of each kind of bad input.
    pub bad_input_every: Option<u64>,
}

/// What a simulation published.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub steps: u64,
    pub readings: u64,
    pub messages: u64,
    pub faults: Vec<Fault>,
    /// Bad inputs sent, by the dead-letter reason they should get.
    pub bad_undecodable: u64,
    pub bad_unknown_node: u64,
    pub bad_invalid_value: u64,
    pub bad_late: u64,
    /// Event time just after the last published step.
    pub end_ms: i64,
}

fn producer(client: &ClientConfig) -> anyhow::Result<FutureProducer> {
    Ok(client
        .clone()
        .set("linger.ms", "5")
        .set("acks", "all")
        .create()?)
}

/// Publishes the spatial-node record of every machine of the plant.
pub async fn publish_nodes(
    client: &ClientConfig,
    plant: &Plant,
    spec: &PublishSpec,
) -> anyhow::Result<usize> {
    let producer = producer(client)?;
    let nodes = Codec::new(RecordKind::SpatialNode, spec.wire_format);
    let records = node_records(plant);
    for node in &records {
        let payload = nodes.encode(&node.to_value())?;
        send(
            &producer,
            &spec.nodes_topic,
            node.node_id.as_bytes(),
            &payload,
        )
        .await?;
    }
    Ok(records.len())
}

/// Publishes the plant's steps paced at `speed`, until the step count is reached or `cancel`
/// fires; `on_fault` sees each fault as it starts.
pub async fn publish_readings(
    client: &ClientConfig,
    mut plant: Plant,
    spec: &PublishSpec,
    cancel: CancellationToken,
    on_fault: impl Fn(&Fault),
) -> anyhow::Result<SimReport> {
    let producer = producer(client)?;
    let readings = Codec::new(RecordKind::Reading, spec.wire_format);
    let batches = Codec::new(RecordKind::ReadingBatch, spec.wire_format);
    let cadence = Duration::from_millis(plant.spec().cadence_ms as u64);
    let mut ticker = tokio::time::interval(cadence.div_f64(spec.speed.max(1e-3)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut report = SimReport::default();
    loop {
        if spec.steps.is_some_and(|n| report.steps >= n) {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let known_faults = plant.faults().len();
        let step = plant.step();
        for fault in &plant.faults()[known_faults..] {
            on_fault(fault);
        }
        let mut pending = Vec::new();
        match spec.payload {
            PayloadKind::Batch => {
                for (cell, list) in by_cell(&step) {
                    let payload = batches.encode(&records::batch_to_value(&list))?;
                    pending.push((cell, payload));
                }
            }
            PayloadKind::Reading => {
                for r in &step {
                    pending.push((
                        r.cell_id.clone(),
                        readings.encode(&to_reading(r).to_value())?,
                    ));
                }
            }
        }
        report.readings += step.len() as u64;
        if let Some(every) = spec.bad_input_every
            && report.steps > 0
            && report.steps % every == 0
            && let Some(first) = step.first()
        {
            pending.extend(bad_inputs(first, spec, &readings, &batches, &mut report)?);
        }
        report.messages += pending.len() as u64;
        let sends = pending
            .iter()
            .map(|(key, payload)| send(&producer, &spec.readings_topic, key.as_bytes(), payload));
        futures::future::try_join_all(sends).await?;
        report.steps += 1;
        report.end_ms = plant.next_event_time_ms();
    }
    report.faults = plant.faults().to_vec();
    Ok(report)
}

/// One message of each kind of bad input, keyed like `like`'s cell.
fn bad_inputs(
    like: &SimReading,
    spec: &PublishSpec,
    readings: &Codec,
    batches: &Codec,
    report: &mut SimReport,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let encode = |r: Reading| -> anyhow::Result<Vec<u8>> {
        Ok(match spec.payload {
            PayloadKind::Batch => batches.encode(&records::batch_to_value(&[r]))?,
            PayloadKind::Reading => readings.encode(&r.to_value())?,
        })
    };
    let base = to_reading(like);
    let unknown = Reading {
        node_id: "ghost/m99".into(),
        ..base.clone()
    };
    let mut nan = base.clone();
    nan.values[0].1 = f64::NAN;
    let late = Reading {
        event_time_ms: base.event_time_ms - 60_000,
        ..base
    };
    report.bad_undecodable += 1;
    report.bad_unknown_node += 1;
    report.bad_invalid_value += 1;
    report.bad_late += 1;
    let key = like.cell_id.clone();
    Ok(vec![
        (key.clone(), b"\x02\xffnot avro at all".to_vec()),
        (key.clone(), encode(unknown)?),
        (key.clone(), encode(nan)?),
        (key, encode(late)?),
    ])
}

async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
) -> anyhow::Result<()> {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("cannot publish to `{topic}`: {e}"))?;
    Ok(())
}
