//! Micro-benchmarks of the per-reading path: Avro decoding (the direct decoder against
//! apache-avro's generic path), bucketing into the tensor, window extraction, and the
//! divergence and floor checks' per-window work (both off by default).
//!
//! `cargo bench --bench hot_path`; figures in docs/performance.md. With `--features
//! bench-serde-avro-fast` the decode group also runs serde_avro_fast on the same datums.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gridwatch::assemble::{AssembleSpec, Assembler, Provenance};
use gridwatch::decode::{Decoder, PayloadKind};
use gridwatch::detect::divergence::{Divergence, DivergenceConfig};
use gridwatch::detect::floor::{FloorConfig, Floors};
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
    #[cfg(feature = "bench-serde-avro-fast")]
    serde_avro_fast_cases::bench(&mut group, &single, &batch, list.len());
    group.finish();
}

/// serde_avro_fast on the same datums, into readings that own their strings (what
/// `single/direct` makes) and into readings that borrow them from the datum (the least work a
/// decoder can do; `direct-reused` instead overwrites the last message's strings in place).
#[cfg(feature = "bench-serde-avro-fast")]
mod serde_avro_fast_cases {
    use std::fmt;
    use std::hint::black_box;
    use std::marker::PhantomData;

    use criterion::measurement::WallTime;
    use criterion::{BenchmarkGroup, BenchmarkId};
    use gridwatch::schema::{READING_AVSC, READING_BATCH_AVSC, Reading, fast};
    use serde::Deserialize;
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_avro_fast::{Schema, from_datum_slice};

    #[derive(Debug, Deserialize)]
    #[serde(bound(deserialize = "S: Deserialize<'de> + AsRef<str>"))]
    struct AvroReading<S> {
        node_id: S,
        event_time: i64,
        values: Channels<S>,
        sequence: Option<i64>,
    }

    #[derive(Deserialize)]
    #[serde(bound(deserialize = "S: Deserialize<'de> + AsRef<str>"))]
    struct AvroBatch<S> {
        readings: Vec<AvroReading<S>>,
    }

    /// The `values` map sorted by channel name, as the direct decoder leaves it.
    #[derive(Debug)]
    struct Channels<S>(Vec<(S, f64)>);

    impl<'de, S: Deserialize<'de> + AsRef<str>> Deserialize<'de> for Channels<S> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Pairs<S>(PhantomData<S>);
            impl<'de, S: Deserialize<'de> + AsRef<str>> Visitor<'de> for Pairs<S> {
                type Value = Channels<S>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a map of channel values")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(4));
                    while let Some(pair) = map.next_entry()? {
                        pairs.push(pair);
                    }
                    pairs.sort_by(|a: &(S, f64), b| a.0.as_ref().cmp(b.0.as_ref()));
                    Ok(Channels(pairs))
                }
            }
            deserializer.deserialize_map(Pairs(PhantomData))
        }
    }

    impl<S: AsRef<str>> AvroReading<S> {
        fn same_as(&self, r: &Reading) -> bool {
            self.node_id.as_ref() == r.node_id
                && self.event_time == r.event_time_ms
                && self.sequence == r.sequence
                && self.values.0.len() == r.values.len()
                && (self.values.0.iter().zip(&r.values))
                    .all(|((n, v), (m, w))| n.as_ref() == m && v == w)
        }
    }

    pub fn bench(group: &mut BenchmarkGroup<'_, WallTime>, single: &[u8], batch: &[u8], n: usize) {
        let reading_schema: Schema = READING_AVSC.parse().expect("reading.avsc");
        let batch_schema: Schema = READING_BATCH_AVSC.parse().expect("reading_batch.avsc");
        // The same readings the direct decoder makes, in the payload's order, or the
        // comparison means nothing.
        let one: AvroReading<&str> = from_datum_slice(single, &reading_schema).unwrap();
        let direct = fast::read_reading(single).unwrap();
        assert!(one.same_as(&direct), "{one:?} against {direct:?}");
        let all: AvroBatch<String> = from_datum_slice(batch, &batch_schema).unwrap();
        let direct = fast::read_batch(batch).unwrap();
        assert!(all.readings.len() == direct.len());
        assert!(all.readings.iter().zip(&direct).all(|(a, r)| a.same_as(r)));

        group.throughput(criterion::Throughput::Elements(1));
        group.bench_function("single/serde-avro-fast-owned", |b| {
            b.iter(|| {
                from_datum_slice::<AvroReading<String>>(black_box(single), &reading_schema).unwrap()
            })
        });
        group.bench_function("single/serde-avro-fast-borrowed", |b| {
            b.iter(|| {
                from_datum_slice::<AvroReading<&str>>(black_box(single), &reading_schema).unwrap()
            })
        });
        group.throughput(criterion::Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("batch/serde-avro-fast-owned", n), |b| {
            b.iter(|| {
                from_datum_slice::<AvroBatch<String>>(black_box(batch), &batch_schema).unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("batch/serde-avro-fast-borrowed", n), |b| {
            b.iter(|| from_datum_slice::<AvroBatch<&str>>(black_box(batch), &batch_schema).unwrap())
        });
    }
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

/// The windows of `cells` cells of `nodes` nodes over 64 steps of the plant.
fn plant_windows(cells: usize, nodes: usize) -> Vec<gridwatch::assemble::Window> {
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
    windows
}

/// A check's per-window work over the windows of 64 cells × 8 nodes, a fresh check (`new`) per
/// iteration. One check sees every cell's windows (its state is keyed by node): the same work
/// per window as one check per cell.
fn per_window_check<C>(
    c: &mut Criterion,
    name: &str,
    new: impl Fn() -> C,
    observe: impl Fn(&mut C, &gridwatch::assemble::Window) -> usize,
) {
    let mut group = c.benchmark_group(name);
    let (cells, nodes) = (64, 8);
    let windows = plant_windows(cells, nodes);
    group.throughput(Throughput::Elements(windows.len() as u64));
    group.bench_function(
        BenchmarkId::new("windows", format!("{cells}x{nodes}")),
        |b| {
            b.iter(|| {
                let mut check = new();
                let found: usize = windows.iter().map(|w| observe(&mut check, w)).sum();
                black_box(found)
            })
        },
    );
    group.finish();
}

fn divergence(c: &mut Criterion) {
    let config = DivergenceConfig {
        warmup: std::time::Duration::ZERO,
        ..DivergenceConfig::default()
    };
    let channels = spec().channels.len();
    per_window_check(
        c,
        "divergence",
        || Divergence::new(config.clone(), &vec![1.0; channels]),
        |check, w| check.observe(w).len(),
    );
}

/// The floor check's per-window work (off by default): every step of every node/channel judged
/// against its slot and learnt; then the same with a ceiling beside each floor.
fn floor(c: &mut Criterion) {
    let channels = spec().channels.len();
    let count = |check: &mut Floors, w: &gridwatch::assemble::Window| {
        let found = check.observe(w);
        found.below_floor.len() + found.above_ceiling.len()
    };
    per_window_check(
        c,
        "floor",
        || Floors::new(FloorConfig::default(), channels),
        count,
    );
    let with_ceiling = FloorConfig {
        ceiling: Some(1.05),
        ..FloorConfig::default()
    };
    per_window_check(
        c,
        "floor+ceiling",
        || Floors::new(with_ceiling.clone(), channels),
        count,
    );
}

criterion_group!(benches, decode, assemble, divergence, floor);
criterion_main!(benches);
