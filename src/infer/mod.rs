//! infer: windows → model reconstructions, through ONNX Runtime.
//!
//! Invariants:
//! - A model is used only after its contract checked out against itself, against the hash of its
//!   `.onnx` file, and against the input/output names the ONNX Runtime session reports.
//! - A batch runs in groups of one node count, one model call each, so no window is padded
//!   to a larger cell's nodes (`node_mask` is all 1; the model would also take padded nodes
//!   with `node_mask = 0`, see docs/model.md). Every window that enters
//!   [`run_batches`] comes out exactly once, with its reconstruction, in arrival order.
//! - A batch takes every window already queued, up to `max_batch`, and runs at once; only a
//!   window that arrives to an idle, empty queue waits up to `max_wait` for others.
//! - One worker owns the session (`Session::run` takes `&mut self`); inference runs on the
//!   blocking pool, never on an async worker thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{Tensor, TensorRef};
use tokio::sync::mpsc;

use crate::assemble::Window;
use crate::config::{ExecutionProvider, ModelConfig};

pub mod contract;

pub use contract::ModelContract;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("ONNX Runtime library not found: {0}")]
    RuntimeMissing(String),
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    #[error("model contract {path}: {message}")]
    Contract { path: String, message: String },
}

impl InferError {
    /// Runtime errors of a single batch may pass; missing libraries and broken contracts do not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, InferError::Runtime(_))
    }
}

fn runtime_error(e: impl std::fmt::Display) -> InferError {
    InferError::Runtime(e.to_string())
}

/// Where `libonnxruntime.so` is looked for when configuration names none: `ORT_DYLIB_PATH`,
/// then `.venv/lib/python3*/site-packages/onnxruntime/capi/` under the working directory and
/// the executable's ancestors (where `scripts/setup.sh` installs the PyPI wheel).
pub fn find_runtime_library(configured: Option<&Path>) -> Result<PathBuf, InferError> {
    if let Some(path) = configured {
        return Ok(path.to_owned());
    }
    if let Ok(path) = std::env::var("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(path));
    }
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in roots {
        let lib = root.join(".venv/lib");
        let Ok(pythons) = std::fs::read_dir(&lib) else {
            continue;
        };
        for python in pythons.flatten() {
            let capi = python.path().join("site-packages/onnxruntime/capi");
            let Ok(files) = std::fs::read_dir(&capi) else {
                continue;
            };
            let mut candidates: Vec<PathBuf> = files
                .flatten()
                .map(|f| f.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect();
            // Prefer the fully versioned file name.
            candidates.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
            if let Some(found) = candidates.into_iter().next() {
                return Ok(found);
            }
        }
    }
    Err(InferError::RuntimeMissing(
        "set [model] onnxruntime_library or ORT_DYLIB_PATH, or run scripts/setup.sh to install it into .venv".into(),
    ))
}

/// Loads ONNX Runtime once per process.
pub fn environment(
    library: Option<&Path>,
) -> Result<&'static ort::environment::Environment, InferError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    let result = ENV.get_or_init(|| {
        let path = find_runtime_library(library).map_err(|e| e.to_string())?;
        tracing::info!(library = %path.display(), "Loading ONNX Runtime.");
        ort::init_from(&path)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?
            .with_name("gridwatch")
            .build()
            .map_err(|e| e.to_string())
    });
    result
        .as_ref()
        .map_err(|e| InferError::RuntimeMissing(e.clone()))
}

/// A loaded model: its contract and the session that runs it.
pub struct Model {
    pub contract: Arc<ModelContract>,
    /// Per channel `(mean, std)`, from the contract.
    normalisation: Vec<(f32, f32)>,
    pub onnx_path: PathBuf,
    /// `cpu` or `cuda`: the execution provider actually in use.
    pub provider: &'static str,
    /// Where each call's `values` and `mask` are written: ONNX Runtime's pinned host memory when
    /// the session runs on the GPU (copied to it without staging through pageable memory),
    /// its CPU allocator otherwise. Declared before `session`, so that it is dropped first.
    input_memory: Allocator,
    session: Session,
}

impl Model {
    /// Loads and checks the model a contract describes.
    pub fn load(contract_path: &Path, config: &ModelConfig) -> Result<Self, InferError> {
        let (contract, onnx_path) = ModelContract::load(contract_path)?;
        let env = environment(config.onnxruntime_library.as_deref())?;
        let mut builder = Session::builder(env)
            .map_err(runtime_error)?
            .with_intra_threads(config.intra_threads.max(1))
            .map_err(runtime_error)?;
        let provider = register_provider(&mut builder, config.execution_provider);
        let session = builder
            .commit_from_file(&onnx_path)
            .map_err(runtime_error)?;
        let input_memory = input_memory(&session, provider)?;
        let normalisation = contract
            .channels
            .iter()
            .map(|c| (c.mean as f32, c.std as f32))
            .collect();
        let model = Self {
            contract: Arc::new(contract),
            normalisation,
            onnx_path,
            provider,
            input_memory,
            session,
        };
        model
            .check_session()
            .map_err(|message| InferError::Contract {
                path: contract_path.display().to_string(),
                message,
            })?;
        Ok(model)
    }

    /// Replaces the contract by one of the same geometry with other channel statistics (an
    /// offline evaluation standardises each series with its own fit range); the session stays.
    pub fn set_normalisation(&mut self, stats: &[(f64, f64)]) -> Result<(), InferError> {
        if stats.len() != self.contract.channels.len() {
            return Err(InferError::Runtime(format!(
                "{} channel statistics for a model of {} channels",
                stats.len(),
                self.contract.channels.len()
            )));
        }
        let mut contract = (*self.contract).clone();
        for (channel, &(mean, std)) in contract.channels.iter_mut().zip(stats) {
            channel.mean = mean;
            channel.std = std;
        }
        self.normalisation = stats.iter().map(|&(m, s)| (m as f32, s as f32)).collect();
        self.contract = Arc::new(contract);
        Ok(())
    }

    /// The session's inputs and outputs are the contract's, by name and rank.
    fn check_session(&self) -> Result<(), String> {
        let describe = |outlets: &[ort::value::Outlet]| {
            outlets
                .iter()
                .map(|o| {
                    let rank = o.dtype().tensor_shape().map_or(0, |s| s.len());
                    (o.name().to_owned(), rank)
                })
                .collect::<Vec<_>>()
        };
        let expect = |specs: &[contract::TensorSpec]| {
            specs
                .iter()
                .map(|s| (s.name.clone(), s.shape.len()))
                .collect::<Vec<_>>()
        };
        let (inputs, outputs) = (
            describe(self.session.inputs()),
            describe(self.session.outputs()),
        );
        if inputs != expect(&self.contract.inputs) || outputs != expect(&self.contract.outputs) {
            return Err(format!(
                "the ONNX file has inputs {inputs:?} and outputs {outputs:?}; the contract says {:?} and {:?}",
                expect(&self.contract.inputs),
                expect(&self.contract.outputs)
            ));
        }
        Ok(())
    }

    /// Runs one batch: normalises values with the contract's channel statistics (unobserved
    /// entries stay 0) and returns each window's `[T × N × F]` reconstruction in normalised
    /// units, in input order. Windows of one node count run together; different node counts
    /// run as separate model calls, so that no window pays for nodes padded up to the
    /// batch's largest (in a city of cells of 1 to 10 sensors, most of the work).
    pub fn run(&mut self, windows: &[Window]) -> Result<Vec<Vec<f32>>, InferError> {
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&i| windows[i].node_count());
        let mut out = vec![Vec::new(); windows.len()];
        for group in order.chunk_by(|&a, &b| windows[a].node_count() == windows[b].node_count()) {
            let batch: Vec<&Window> = group.iter().map(|&i| &windows[i]).collect();
            let n = batch[0].node_count();
            for (&i, reconstruction) in group.iter().zip(self.run_group(&batch, n)?) {
                out[i] = reconstruction;
            }
        }
        Ok(out)
    }

    /// Runs one model call on `windows`, which all have `n` nodes (`node_mask` all 1).
    fn run_group(&mut self, windows: &[&Window], n: usize) -> Result<Vec<Vec<f32>>, InferError> {
        if windows.is_empty() || n == 0 {
            return Ok(vec![Vec::new(); windows.len()]);
        }
        let t = self.contract.window_steps;
        let f = self.contract.channels.len();
        let b = windows.len();
        let size = t * n * f;
        let shape4 = [b, t, n, f];
        let mut values = Tensor::<f32>::new(&self.input_memory, shape4).map_err(runtime_error)?;
        let mut mask = Tensor::<f32>::new(&self.input_memory, shape4).map_err(runtime_error)?;
        standardise(
            windows,
            &self.normalisation,
            values.extract_tensor_mut().1,
            mask.extract_tensor_mut().1,
        );
        let node_mask = vec![1.0f32; b * n];
        let inputs = ort::inputs![
            "values" => &values,
            "mask" => &mask,
            "node_mask" => TensorRef::from_array_view(([b, n], node_mask.as_slice())).map_err(runtime_error)?,
        ];
        let outputs = self.session.run(inputs).map_err(runtime_error)?;
        let (shape, data) = outputs[contract::OUTPUT_NAME]
            .try_extract_tensor::<f32>()
            .map_err(runtime_error)?;
        let dims: Vec<i64> = shape.iter().copied().collect();
        if dims != [b as i64, t as i64, n as i64, f as i64] {
            return Err(InferError::Runtime(format!(
                "output shape {dims:?}, expected [{b}, {t}, {n}, {f}]"
            )));
        }
        Ok(data.chunks(size).map(<[f32]>::to_vec).collect())
    }
}

/// Writes `windows` (each `values.len() / windows.len()` long) into a model call's inputs: values
/// standardised with the per-channel `(mean, std)` of `normalisation` (0 where unobserved), and
/// the mask as it is.
fn standardise(
    windows: &[&Window],
    normalisation: &[(f32, f32)],
    values: &mut [f32],
    mask: &mut [f32],
) {
    let f = normalisation.len();
    let size = values.len() / windows.len().max(1);
    let slots = values
        .chunks_exact_mut(size)
        .zip(mask.chunks_exact_mut(size));
    for (w, (values, mask)) in windows.iter().zip(slots) {
        mask.copy_from_slice(&w.mask);
        // One reading's `f` channels at a time, so that each finds its statistics without a
        // division of the element index.
        let readings = w.values.chunks_exact(f).zip(w.mask.chunks_exact(f));
        for (out, (readings, observed)) in values.chunks_exact_mut(f).zip(readings) {
            for (out, ((&value, &observed), &(mean, std))) in out
                .iter_mut()
                .zip(readings.iter().zip(observed).zip(normalisation))
            {
                *out = if observed > 0.0 {
                    (value - mean) / std
                } else {
                    0.0
                };
            }
        }
    }
}

/// The allocator of a model call's inputs: pinned host memory for the CUDA execution provider
/// (which the GPU reads without a staging copy), else ONNX Runtime's CPU allocator. Public for
/// the inference benchmark, which measures sessions of its own with the same inputs.
pub fn input_memory(session: &Session, provider: &str) -> Result<Allocator, InferError> {
    if provider != "cuda" {
        return Ok(Allocator::default());
    }
    let pinned = MemoryInfo::new(
        AllocationDevice::CUDA_PINNED,
        0,
        AllocatorType::Device,
        MemoryType::CPUInput,
    )
    .map_err(runtime_error)?;
    Allocator::new(session, pinned).map_err(runtime_error)
}

#[cfg(feature = "cuda")]
fn register_provider(
    builder: &mut ort::session::builder::SessionBuilder,
    wanted: ExecutionProvider,
) -> &'static str {
    use ort::ep::ExecutionProvider as _;
    if wanted != ExecutionProvider::Cuda {
        return "cpu";
    }
    match ort::ep::CUDA::default().register(builder) {
        Ok(()) => "cuda",
        Err(error) => {
            tracing::warn!(%error, "CUDA execution provider is not usable; running on CPU.");
            "cpu"
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn register_provider(
    _builder: &mut ort::session::builder::SessionBuilder,
    wanted: ExecutionProvider,
) -> &'static str {
    if wanted == ExecutionProvider::Cuda {
        tracing::warn!(
            "execution_provider = \"cuda\" but gridwatch was built without the `cuda` feature; running on CPU."
        );
    }
    "cpu"
}

/// One window and what the model made of it.
pub struct Inferred {
    pub window: Window,
    pub reconstruction: Vec<f32>,
    /// The contract of the model that scored it (models can be swapped while running).
    pub model: Arc<ModelContract>,
}

/// Windows per model call from which the CUDA execution provider passes 1 M node-windows/s for
/// the default model on an H100 (docs/performance.md, GPU).
const GPU_BATCH: usize = 1024;

/// Batches windows from `input` (up to `max_batch`, waiting at most `max_wait` for a batch to
/// fill), runs each batch on the blocking pool, and sends every window with its reconstruction
/// to `output`. A model arriving on `reloads` replaces the current one between two batches, so
/// no window is dropped and each is scored by exactly one model. Returns the model in use when
/// `input` closes and every window has been sent.
pub async fn run_batches(
    mut model: Model,
    mut input: mpsc::Receiver<Window>,
    output: mpsc::Sender<Vec<Inferred>>,
    mut reloads: mpsc::Receiver<Model>,
    max_batch: usize,
    max_wait: Duration,
    on_batch: impl Fn(usize, f64) + Send + 'static,
) -> Result<Model, InferError> {
    if model.provider == "cuda" && max_batch < GPU_BATCH {
        tracing::info!(
            max_batch,
            "Inference runs on the GPU, which reaches its throughput from about {GPU_BATCH} windows per call; \
             under heavy load set [infer] max_batch = {GPU_BATCH} (docs/performance.md, GPU)."
        );
    }
    let mut reloads_open = true;
    loop {
        let first = tokio::select! {
            biased;
            next = reloads.recv(), if reloads_open => {
                match next {
                    Some(next) => {
                        tracing::info!(from = %model.contract.label(), to = %next.contract.label(), "Swapped the model.");
                        crate::telemetry::model_in_use(&next.contract.name, &next.contract.version, next.provider);
                        model = next;
                    }
                    None => reloads_open = false,
                }
                continue;
            }
            first = input.recv() => match first {
                Some(window) => window,
                None => return Ok(model),
            },
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match input.try_recv() {
                Ok(window) => batch.push(window),
                Err(_) => break,
            }
        }
        // Windows were already waiting: the runtime is behind, and more will queue while this
        // batch runs, so it goes at once. A lone window waits up to `max_wait` for company.
        if batch.len() == 1 {
            let deadline = tokio::time::Instant::now() + max_wait;
            while batch.len() < max_batch {
                match tokio::time::timeout_at(deadline, input.recv()).await {
                    Ok(Some(window)) => batch.push(window),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let (returned, batch, result, seconds) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = model.run(&batch);
            (model, batch, result, started.elapsed().as_secs_f64())
        })
        .await
        .map_err(|e| InferError::Runtime(format!("inference worker panicked: {e}")))?;
        model = returned;
        let reconstructions = result?;
        on_batch(batch.len(), seconds);
        let inferred = batch
            .into_iter()
            .zip(reconstructions)
            .map(|(window, reconstruction)| Inferred {
                window,
                reconstruction,
                model: Arc::clone(&model.contract),
            })
            .collect();
        if output.send(inferred).await.is_err() {
            return Ok(model);
        }
    }
}

/// What identifies the model files on disk: the contract's bytes and the ONNX file's size and
/// modification time.
type Fingerprint = (Vec<u8>, Option<(u64, std::time::SystemTime)>);

fn fingerprint(contract: &Path) -> Option<Fingerprint> {
    let bytes = std::fs::read(contract).ok()?;
    let onnx = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("onnx_file")?.as_str().map(str::to_owned))
        .and_then(|file| {
            let meta = std::fs::metadata(contract.parent()?.join(file)).ok()?;
            Some((meta.len(), meta.modified().ok()?))
        });
    Some((bytes, onnx))
}

/// Watches the model contract at `path`: every `interval`, and at once on SIGHUP, a changed
/// contract or ONNX file is loaded and checked (contract, hash, session, and the window geometry
/// the running assembler uses); a model that passes is sent on `reloads`, one that fails is
/// refused (logged and counted) and the current model keeps running.
pub async fn watch(
    path: PathBuf,
    config: ModelConfig,
    interval: Duration,
    current: Arc<ModelContract>,
    reloads: mpsc::Sender<Model>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut current = current;
    let mut seen = fingerprint(&path);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => false,
            _ = signalled => true,
        };
        let now = fingerprint(&path);
        if now == seen && !forced {
            continue;
        }
        seen = now;
        let (p, c) = (path.clone(), config.clone());
        let loaded = tokio::task::spawn_blocking(move || Model::load(&p, &c))
            .await
            .map_err(|e| InferError::Runtime(e.to_string()))
            .and_then(|r| r);
        let checked = loaded.and_then(|model| {
            if model.contract.name == current.name
                && model.contract.version == current.version
                && model.contract.onnx_sha256 == current.onnx_sha256
            {
                return Ok(None);
            }
            current
                .compatible_with(&model.contract)
                .map_err(|message| InferError::Contract {
                    path: path.display().to_string(),
                    message,
                })?;
            Ok(Some(model))
        });
        match checked {
            Ok(None) => {}
            Ok(Some(model)) => {
                crate::telemetry::model_reload(true, &model.contract.label(), None);
                current = Arc::clone(&model.contract);
                if reloads.send(model).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                crate::telemetry::model_reload(false, &path.display().to_string(), Some(&error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(values: Vec<f32>, mask: Vec<f32>) -> Window {
        Window {
            cell: Arc::from("c"),
            start_ms: 0,
            end_ms: 1,
            nodes: vec![Arc::from("a"), Arc::from("b")],
            values,
            mask,
            missing_fraction: 0.0,
            holds: vec![],
            closed_at: Instant::now(),
        }
    }

    #[test]
    fn inputs_standardise_each_channel_and_zero_what_was_not_observed() {
        // Two windows of one step, two nodes, two channels (means 10 and 100, stds 2 and 5); an
        // unobserved entry counts as 0 whatever its value.
        let normalisation = [(10.0, 2.0), (100.0, 5.0)];
        let first = window(vec![12.0, 110.0, 8.0, 7.0], vec![1.0, 1.0, 1.0, 0.0]);
        let second = window(vec![10.0, 95.0, 14.0, 100.0], vec![1.0, 1.0, 1.0, 1.0]);
        let (mut values, mut mask) = (vec![f32::NAN; 8], vec![f32::NAN; 8]);
        standardise(&[&first, &second], &normalisation, &mut values, &mut mask);
        assert_eq!(values, [1.0, 2.0, -1.0, 0.0, 0.0, -1.0, 2.0, 0.0]);
        assert_eq!(mask, [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    }
}
