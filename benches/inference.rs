//! Inference throughput of the default model per batch size (1, 8, 64, 256, 1024 windows of 8
//! nodes), reported as node-windows per second; and of a batch of 64 windows of cells of 1 to 8
//! nodes (`mixed-node-windows`, counting each window's real nodes), as a city's cells are.
//! `GRIDWATCH_EXECUTION_PROVIDER=cuda` (with the `cuda` feature) runs it on the GPU;
//! scripts/gpu-bench.sh does that on a GPU machine (`GRIDWATCH_BENCH_ROOT` names the tree whose
//! `models/` it reads, when that is not the one it was built in; `GRIDWATCH_BENCH_BATCHES`, a
//! comma-separated list, replaces the batch sizes).
//!
//! On the GPU it also measures the model call through ONNX Runtime's I/O binding, which
//! `Model::run` does not use, to show what the host side costs: `pinned` (the plain call on
//! inputs in pinned host memory), `device` (inputs already on the GPU, output left there: the
//! model's own GPU time) and `cuda-graph` (the same, replayed as one CUDA graph).

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
    let cuda = std::env::var("GRIDWATCH_EXECUTION_PROVIDER").as_deref() == Ok("cuda");
    if cuda {
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
    // A GPU run that fell back to the CPU would measure the CPU at the GPU's batch sizes.
    assert!(
        !cuda || model.provider == "cuda",
        "GRIDWATCH_EXECUTION_PROVIDER=cuda, but ONNX Runtime's CUDA execution provider is not usable here (no GPU, a CPU build of ONNX Runtime, or CUDA 13 libraries missing)"
    );
    let (t, f) = (model.contract.window_steps, model.contract.channels.len());
    let batches = batch_sizes();
    let mut group = c.benchmark_group(format!("inference/{}", model.provider));
    for &batch in &batches {
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
    #[cfg(feature = "cuda")]
    if model.provider == "cuda" {
        bound::io_binding(c, &model, &batches);
    }
}

/// `GRIDWATCH_BENCH_BATCHES` (e.g. `1,64,4096`), else 1, 8, 64, 256 and 1024 windows.
fn batch_sizes() -> Vec<usize> {
    match std::env::var("GRIDWATCH_BENCH_BATCHES") {
        Ok(list) => list
            .split(',')
            .map(|b| {
                b.trim()
                    .parse()
                    .expect("GRIDWATCH_BENCH_BATCHES: comma-separated sizes")
            })
            .collect(),
        Err(_) => vec![1, 8, 64, 256, 1024],
    }
}

#[cfg(feature = "cuda")]
mod bound {
    use std::hint::black_box;

    use criterion::{BenchmarkId, Criterion, Throughput};
    use gridwatch::infer::{Model, contract::OUTPUT_NAME, environment, input_memory};
    use ort::ep::CUDA;
    use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
    use ort::session::Session;
    use ort::value::Tensor;

    use super::NODES;

    /// Standardised values (what `Model::run` hands the session), the mask and the node mask.
    fn inputs(batch: usize, t: usize, f: usize) -> [(Vec<usize>, Vec<f32>); 3] {
        let size = batch * t * NODES * f;
        let values = (0..size).map(|k| ((k % 13) as f32 - 6.0) * 0.2).collect();
        [
            (vec![batch, t, NODES, f], values),
            (vec![batch, t, NODES, f], vec![1.0; size]),
            (vec![batch, NODES], vec![1.0; batch * NODES]),
        ]
    }

    const NAMES: [&str; 3] = ["values", "mask", "node_mask"];

    fn session(model: &Model, graph: bool) -> ort::Result<Session> {
        let env = environment(None).expect("ONNX Runtime is loaded");
        Session::builder(env)?
            .with_execution_providers([CUDA::default().with_cuda_graph(graph).build()])?
            .commit_from_file(&model.onnx_path)
    }

    /// One `pinned` measurement: the session's plain call (as `Model::run` makes it) on inputs
    /// that live in pinned host memory, which the GPU copies from without staging.
    fn pinned(c: &mut Criterion, name: &str, model: &Model, batch: usize) -> ort::Result<()> {
        let (t, f) = (model.contract.window_steps, model.contract.channels.len());
        let mut session = session(model, false)?;
        let memory = input_memory(&session, "cuda").map_err(|e| ort::Error::new(e.to_string()))?;
        let mut tensors = Vec::new();
        for (shape, data) in inputs(batch, t, f) {
            let mut tensor = Tensor::<f32>::new(&memory, shape)?;
            tensor.extract_tensor_mut().1.copy_from_slice(&data);
            tensors.push(tensor);
        }
        let mut call = move || -> ort::Result<f32> {
            let outputs = session.run(ort::inputs![
                NAMES[0] => &tensors[0],
                NAMES[1] => &tensors[1],
                NAMES[2] => &tensors[2],
            ])?;
            Ok(outputs[OUTPUT_NAME].try_extract_tensor::<f32>()?.1[0])
        };
        // A first call shows an error here rather than inside the measurement.
        call()?;
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements((batch * NODES) as u64));
        group.bench_function(BenchmarkId::new("pinned", batch), |b| {
            b.iter(|| black_box(call().unwrap()))
        });
        group.finish();
        Ok(())
    }

    /// One `device` or `cuda-graph` measurement: inputs copied to the GPU once, output kept there.
    fn resident(
        c: &mut Criterion,
        name: &str,
        model: &Model,
        batch: usize,
        graph: bool,
    ) -> ort::Result<()> {
        let (t, f) = (model.contract.window_steps, model.contract.channels.len());
        let mut session = session(model, graph)?;
        let mut binding = session.create_binding()?;
        let mut on_gpu = Vec::new();
        for (shape, data) in inputs(batch, t, f) {
            on_gpu.push(Tensor::from_array((shape, data))?.to(AllocationDevice::CUDA, 0)?);
        }
        for (name, tensor) in NAMES.iter().zip(&on_gpu) {
            binding.bind_input(*name, tensor)?;
        }
        let gpu = Allocator::new(
            &session,
            MemoryInfo::new(
                AllocationDevice::CUDA,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?,
        )?;
        binding.bind_output(OUTPUT_NAME, Tensor::<f32>::new(&gpu, [batch, t, NODES, f])?)?;
        // The first call runs (and, with CUDA graphs, captures) the model; an error shows here.
        session.run_binding(&binding)?;
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements((batch * NODES) as u64));
        let label = if graph { "cuda-graph" } else { "device" };
        group.bench_function(BenchmarkId::new(label, batch), |b| {
            b.iter(|| black_box(session.run_binding(&binding).unwrap().len()))
        });
        group.finish();
        Ok(())
    }

    pub fn io_binding(c: &mut Criterion, model: &Model, batches: &[usize]) {
        let name = "inference/cuda-io-binding";
        for &batch in batches {
            let measured = pinned(c, name, model, batch)
                .and_then(|()| resident(c, name, model, batch, false))
                .and_then(|()| resident(c, name, model, batch, true));
            if let Err(error) = measured {
                eprintln!("{name} at batch {batch}: {error}");
            }
        }
    }
}

criterion_group!(benches, inference);
criterion_main!(benches);
