//! Inference throughput of the default model per batch size (1, 8, 64, 256, 1024 windows of 8
//! nodes), reported as node-windows per second; and of a batch of 64 windows of cells of 1 to 8
//! nodes (`mixed-node-windows`, counting each window's real nodes), as a city's cells are.
//! `GRIDWATCH_EXECUTION_PROVIDER=cuda` (with the `cuda` feature) runs it on the GPU;
//! scripts/gpu-bench.sh does that on a GPU machine (`GRIDWATCH_BENCH_ROOT` names the tree whose
//! `models/` it reads, when that is not the one it was built in).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gridwatch::assemble::Window;
use gridwatch::config::{ExecutionProvider, ModelConfig};
use gridwatch::infer::Model;

const NODES: usize = 8;

fn window(i: usize, nodes: usize, t: usize, f: usize) -> Window {
    let base = [2.9f32, 67.0, 5.5, 29.8];
    Window {
        cell: Arc::from(format!("cell-{i}").as_str()),
        start_ms: 0,
        end_ms: 16_000,
        nodes: (0..nodes)
            .map(|n| Arc::from(format!("n{n}").as_str()))
            .collect(),
        values: (0..t * nodes * f)
            .map(|k| base[k % f] + (k % 7) as f32 * 0.01)
            .collect(),
        mask: vec![1.0; t * nodes * f],
        missing_fraction: 0.0,
        holds: vec![],
        closed_at: std::time::Instant::now(),
    }
}

fn inference(c: &mut Criterion) {
    let mut config = ModelConfig::default();
    if std::env::var("GRIDWATCH_EXECUTION_PROVIDER").as_deref() == Ok("cuda") {
        config.execution_provider = ExecutionProvider::Cuda;
    }
    // `GRIDWATCH_BENCH_ROOT`: where `models/` is when the binary runs outside the tree it was
    // built in (scripts/gpu-bench.sh run).
    let root = std::env::var_os("GRIDWATCH_BENCH_ROOT").map_or_else(
        || env!("CARGO_MANIFEST_DIR").into(),
        std::path::PathBuf::from,
    );
    let contract = root.join(&config.contract);
    let mut model = Model::load(&contract, &config).expect("the default model loads");
    let (t, f) = (model.contract.window_steps, model.contract.channels.len());
    let mut group = c.benchmark_group(format!("inference/{}", model.provider));
    for batch in [1usize, 8, 64, 256, 1024] {
        let windows: Vec<Window> = (0..batch).map(|i| window(i, NODES, t, f)).collect();
        group.throughput(Throughput::Elements((batch * NODES) as u64));
        group.bench_function(BenchmarkId::new("node-windows", batch), |b| {
            b.iter(|| black_box(model.run(black_box(&windows)).unwrap()))
        });
    }
    let mixed: Vec<Window> = (0..64).map(|i| window(i, 1 + i % NODES, t, f)).collect();
    let nodes: usize = mixed.iter().map(Window::node_count).sum();
    group.throughput(Throughput::Elements(nodes as u64));
    group.bench_function(BenchmarkId::new("mixed-node-windows", 64), |b| {
        b.iter(|| black_box(model.run(black_box(&mixed)).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, inference);
criterion_main!(benches);
