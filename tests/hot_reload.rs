//! Model hot reload through the real inference stage and ONNX Runtime: a new model version
//! written over the contract takes over between batches without dropping a window; a model that
//! fails its checks (wrong file hash, incompatible window geometry) is refused, counted, and the
//! running model keeps scoring.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gridwatch::assemble::Window;
use gridwatch::config::ModelConfig;
use gridwatch::infer::{self, Inferred, Model};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn copy_model(dir: &Path) -> PathBuf {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    for file in ["plant-attention-v1.json", "plant-attention-v1.onnx"] {
        std::fs::copy(models.join(file), dir.join(file)).unwrap();
    }
    dir.join("plant-attention-v1.json")
}

/// Rewrites the contract with `edit` applied, atomically (as a deployment would).
fn edit_contract(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut contract: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut contract);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, contract.to_string()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn window(i: i64) -> Window {
    let (t, n, f) = (16, 2, 4);
    let base = [2.9f32, 67.0, 5.5, 29.8];
    Window {
        cell: Arc::from("line-1"),
        start_ms: i * 4_000,
        end_ms: i * 4_000 + 16_000,
        nodes: vec![Arc::from("a"), Arc::from("b")],
        values: (0..t * n * f).map(|k| base[k % f]).collect(),
        mask: vec![1.0; t * n * f],
        missing_fraction: 0.0,
        holds: vec![(0, i)],
        closed_at: std::time::Instant::now(),
    }
}

/// Sends windows until one comes back scored by `version`; every window sent comes back.
async fn until_version(
    windows: &mpsc::Sender<Window>,
    out: &mut mpsc::Receiver<Vec<Inferred>>,
    next: &mut i64,
    version: &str,
) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        windows.send(window(*next)).await.unwrap();
        let batch = out.recv().await.unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(
            batch[0].window.end_ms,
            *next * 4_000 + 16_000,
            "windows come back in order"
        );
        *next += 1;
        if batch[0].model.version == version {
            return *next as usize;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "model {version} never took over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn reloads(metrics: &str, result: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "gridwatch_model_reloads_total{{result=\"{result}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_models_take_over_and_bad_ones_are_refused() {
    let metrics = gridwatch::admin::metrics_handle();
    let dir = tempfile::tempdir().unwrap();
    let contract = copy_model(dir.path());
    let config = ModelConfig::default();
    let model = Model::load(&contract, &config).unwrap();
    let current = Arc::clone(&model.contract);
    let (windows_tx, windows_rx) = mpsc::channel(8);
    let (out_tx, mut out_rx) = mpsc::channel(8);
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let cancel = CancellationToken::new();
    let infer = tokio::spawn(infer::run_batches(
        model,
        windows_rx,
        out_tx,
        reload_rx,
        1,
        Duration::from_millis(1),
        |_, _| {},
    ));
    let watcher = tokio::spawn(infer::watch(
        contract.clone(),
        config,
        Duration::from_millis(50),
        current,
        reload_tx,
        cancel.clone(),
    ));
    let mut next = 0;
    until_version(&windows_tx, &mut out_rx, &mut next, "1").await;

    // A new version: takes over, nothing dropped on the way.
    edit_contract(&contract, |c| c["version"] = "2".into());
    let sent = until_version(&windows_tx, &mut out_rx, &mut next, "2").await;
    assert!(sent >= 2);
    assert_eq!(reloads(&metrics.render(), "loaded"), 1);

    // A contract whose ONNX hash does not match: refused; version 2 keeps scoring.
    edit_contract(&contract, |c| {
        c["version"] = "3".into();
        c["onnx_sha256"] = "0".repeat(64).into();
    });
    // An incompatible geometry (another cadence): refused as well.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sha = {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/plant-attention-v1.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(models).unwrap()).unwrap();
        v["onnx_sha256"].clone()
    };
    edit_contract(&contract, |c| {
        c["version"] = "4".into();
        c["onnx_sha256"] = sha;
        c["cadence_ms"] = 500.into();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        windows_tx.send(window(next)).await.unwrap();
        let batch = out_rx.recv().await.unwrap();
        assert_eq!(
            batch[0].model.version, "2",
            "the refused models never scored"
        );
        next += 1;
    }
    let rendered = metrics.render();
    assert!(reloads(&rendered, "rejected") >= 2, "{rendered}");
    assert_eq!(reloads(&rendered, "loaded"), 1);

    cancel.cancel();
    watcher.await.unwrap();
    drop(windows_tx);
    let model = infer.await.unwrap().unwrap();
    assert_eq!(model.contract.version, "2");
}
