//! Micro-benchmarks of the per-reading path: Avro decoding (the direct decoder against
//! apache-avro's generic path), bucketing into the tensor, window extraction, and the
//! divergence check's per-window work (off by default).
//!
//! `cargo bench --bench hot_path`; figures in docs/performance.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gridwatch::assemble::{AssembleSpec, Assembler, Provenance};
use gridwatch::decode::{Decoder, PayloadKind};
use gridwatch::detect::divergence::{Divergence, DivergenceConfig};
use gridwatch::schema::fast::Readings;
use gridwatch::schema::{
    Reading, RecordKind, SchemaIds, WireFormat, read_datum, records, write_datum,
};
use gridwatch::simulate::{self, Plant, PlantSpec};

fn readings(cells: usize, nodes: usize, steps: usize) -> Vec<(String, Reading)> {
    let mut plant = Plant::new(PlantSpec {
        lines: cells,
        machines_per_line: nodes,
        mean_steps_between_faults: None,
        ..PlantSpec::default()
    });
    (0..steps)
        .flat_map(|_| {
            simulate::by_cell(&plant.step())
                .into_iter()
                .flat_map(|(cell, list)| list.into_iter().map(move |r| (cell.clone(), r)))
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let sample = readings(1, 8, 25);
    let single = write_datum(RecordKind::Reading.schema(), &sample[0].1.to_value()).unwrap();
    let list: Vec<Reading> = sample.iter().map(|(_, r)| r.clone()).collect();
    let batch = write_datum(
        RecordKind::ReadingBatch.schema(),
        &records::batch_to_value(&list),
    )
    .unwrap();
    let decoder = Decoder::new(WireFormat::Plain, None, None, SchemaIds::default());
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("single/direct", |b| {
        b.iter(|| {
            decoder
                .decode(PayloadKind::Reading, Some(black_box(&single)))
                .unwrap()
        })
    });
    group.bench_function("single/direct-reused", |b| {
        let mut out = Readings::default();
        b.iter(|| {
            decoder
                .decode_into(PayloadKind::Reading, Some(black_box(&single)), &mut out)
                .unwrap()
        })
    });
    group.bench_function("single/apache-avro", |b| {
        let schema = RecordKind::Reading.schema();
        b.iter(|| {
            Reading::from_value(&read_datum(schema, schema, black_box(&single)).unwrap()).unwrap()
        })
    });
    group.throughput(Throughput::Elements(list.len() as u64));
    group.bench_function(BenchmarkId::new("batch/direct", list.len()), |b| {
        b.iter(|| {
            decoder
                .decode(PayloadKind::Batch, Some(black_box(&batch)))
                .unwrap()
        })
    });
    group.bench_function(BenchmarkId::new("batch/direct-reused", list.len()), |b| {
        let mut out = Readings::default();
        b.iter(|| {
            decoder
                .decode_into(PayloadKind::Batch, Some(black_box(&batch)), &mut out)
                .unwrap()
        })
    });
    group.bench_function(BenchmarkId::new("batch/apache-avro", list.len()), |b| {
        let schema = RecordKind::ReadingBatch.schema();
        b.iter(|| {
            records::batch_from_value(&read_datum(schema, schema, black_box(&batch)).unwrap())
                .unwrap()
        })
    });
    group.finish();
}

fn spec() -> AssembleSpec {
    AssembleSpec {
        cadence_ms: 1_000,
        window_steps: 16,
        hop_steps: 4,
        // Every cell ends its windows on the same steps, as when docs/performance.md's
        // bucketing figures were measured; staggering moves work between steps, not its total.
        stagger: false,
        channels: simulate::plant::CHANNELS
            .iter()
            .map(|(n, _)| (*n).to_owned())
            .collect(),
        allowed_lateness_ms: 2_000,
        max_nodes: 32,
        min_observed_fraction: 0.5,
        max_cells: 100_000,
        idle_cell_ms: 600_000,
    }
}

fn assemble(c: &mut Criterion) {
    let mut group = c.benchmark_group("assemble");
    for (cells, nodes) in [(64, 8), (512, 8)] {
        let data = readings(cells, nodes, 64);
        let interned: Vec<(Arc<str>, Arc<str>, Reading)> = data
            .into_iter()
            .map(|(cell, r)| (Arc::from(cell.as_str()), Arc::from(r.node_id.as_str()), r))
            .collect();
        group.throughput(Throughput::Elements(interned.len() as u64));
        group.bench_function(
            BenchmarkId::new("bucket+windows", format!("{cells}x{nodes}")),
            |b| {
                b.iter(|| {
                    let mut assembler = Assembler::new(spec());
                    let mut out = Vec::new();
                    for (i, (cell, node, r)) in interned.iter().enumerate() {
                        let at = Provenance {
                            partition: 0,
                            offset: i as i64,
                        };
                        assembler.add(cell, node, r, at, &mut out);
                    }
                    black_box(out.len())
                })
            },
        );
    }
    group.finish();
}

fn divergence(c: &mut Criterion) {
    let mut group = c.benchmark_group("divergence");
    let (cells, nodes) = (64, 8);
    let data = readings(cells, nodes, 64);
    let mut assembler = Assembler::new(spec());
    let mut windows = Vec::new();
    for (i, (cell, r)) in data.iter().enumerate() {
        let at = Provenance {
            partition: 0,
            offset: i as i64,
        };
        let node: Arc<str> = Arc::from(r.node_id.as_str());
        assembler.add(&Arc::from(cell.as_str()), &node, r, at, &mut windows);
    }
    let config = DivergenceConfig {
        warmup: std::time::Duration::ZERO,
        ..DivergenceConfig::default()
    };
    let channels = spec().channels.len();
    group.throughput(Throughput::Elements(windows.len() as u64));
    group.bench_function(
        BenchmarkId::new("windows", format!("{cells}x{nodes}")),
        |b| {
            b.iter(|| {
                // One check sees every cell's windows (its baselines are keyed by node): the same
                // work per window as one check per cell.
                let mut check = Divergence::new(config.clone(), &vec![1.0; channels]);
                let found: usize = windows.iter().map(|w| check.observe(w).len()).sum();
                black_box(found)
            })
        },
    );
    group.finish();
}

criterion_group!(benches, decode, assemble, divergence);
criterion_main!(benches);
