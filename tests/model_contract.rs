//! Every model in `models/` against its contract, through the real ONNX Runtime.
//!
//! The fixtures are written by `scripts/train_model.py` (the LSTM ones by
//! `scripts/train_lstm_ae.py`; attention graphs rebuilt from their weights by
//! `scripts/reexport_model.py`, recorded in the contract's `training.reexports`): `NAME.onnx`, its
//! contract `NAME.json`, and `NAME.golden.json`, a small batch (two windows of up to three nodes,
//! one padded node, missing entries, one planted anomaly) with ONNX Runtime's output and the scores
//! computed in Python by the contract's formula. Here the same inputs go through gridwatch's own
//! batching (one model call per node count, so without the padded node), session and scoring, which
//! must agree within the file's tolerance. The windows are built from the golden file's raw
//! (physical) values, as the assembler builds them, so gridwatch's own normalisation is checked
//! too.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gridwatch::assemble::Window;
use gridwatch::config::{DetectConfig, ModelConfig};
use gridwatch::detect::Detector;
use gridwatch::infer::{Model, ModelContract};
use serde_json::Value;

fn contracts() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("models/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".json") && !name.ends_with(".golden.json")
        })
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "models/ holds at least one model contract"
    );
    found
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Null => vec![None],
        other => vec![Some(other.as_f64().expect("number"))],
    }
}

#[test]
fn every_model_loads_and_matches_its_contract() {
    for path in contracts() {
        let model = Model::load(&path, &ModelConfig::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let c = &model.contract;
        assert_eq!(
            c.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["values", "mask", "node_mask"]
        );
        assert_eq!(c.outputs[0].name, "reconstruction");
        assert!(c.window_steps >= c.scored_steps && c.scored_steps > 0);
        assert_eq!(c.calibration.error_scale.len(), c.channels.len());
        for key in ["date", "command", "data"] {
            assert!(
                c.training.get(key).is_some(),
                "{}: training.{key} is recorded",
                path.display()
            );
        }
    }
}

#[test]
fn a_contract_whose_onnx_changed_is_refused() {
    let path = &contracts()[0];
    let mut contract: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    contract["onnx_sha256"] = Value::String("0".repeat(64));
    let dir = tempfile::tempdir().unwrap();
    let onnx = path
        .parent()
        .unwrap()
        .join(contract["onnx_file"].as_str().unwrap());
    std::fs::copy(&onnx, dir.path().join(onnx.file_name().unwrap())).unwrap();
    let tampered = dir.path().join("tampered.json");
    std::fs::write(&tampered, contract.to_string()).unwrap();
    let error = ModelContract::load(&tampered).unwrap_err().to_string();
    assert!(error.contains("SHA-256"), "{error}");
}

#[test]
fn golden_vectors_agree_with_ort_padding_and_scoring() {
    for path in contracts() {
        let golden_path = path.with_extension("golden.json");
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(&golden_path)
                .unwrap_or_else(|_| panic!("{} has a golden vector", path.display())),
        )
        .unwrap();
        let mut model = Model::load(&path, &ModelConfig::default()).unwrap();
        let detector = Detector::new(&model.contract, &DetectConfig::default());
        let tolerance = golden["tolerance"].as_f64().unwrap();
        let shape = &golden["shape"];
        let (b, t, n_max, f) = (
            shape["batch"].as_u64().unwrap() as usize,
            shape["window_steps"].as_u64().unwrap() as usize,
            shape["nodes"].as_u64().unwrap() as usize,
            shape["channels"].as_u64().unwrap() as usize,
        );
        // gridwatch windows hold physical units; the model normalises them itself.
        let raw = floats(&golden["raw_values"]);
        let mask = floats(&golden["inputs"]["mask"]);
        let node_mask = floats(&golden["inputs"]["node_mask"]);
        let expected = floats(&golden["outputs"]["reconstruction"]);
        // Build each window with only its real nodes, as the assembler does.
        let windows: Vec<Window> = (0..b)
            .map(|wi| {
                let n = (0..n_max)
                    .filter(|&ni| node_mask[wi * n_max + ni] == Some(1.0))
                    .count();
                let mut w = Window {
                    cell: Arc::from(format!("golden-{wi}").as_str()),
                    start_ms: 0,
                    end_ms: t as i64 * 1_000,
                    nodes: (0..n)
                        .map(|i| Arc::from(format!("n{i}").as_str()))
                        .collect(),
                    values: Vec::with_capacity(t * n * f),
                    mask: Vec::with_capacity(t * n * f),
                    missing_fraction: 0.0,
                    holds: vec![],
                    closed_at: std::time::Instant::now(),
                };
                for ti in 0..t {
                    for ni in 0..n {
                        for fi in 0..f {
                            let at = ((wi * t + ti) * n_max + ni) * f + fi;
                            let observed = mask[at].unwrap() as f32;
                            w.values.push(if observed > 0.0 {
                                raw[at].unwrap() as f32
                            } else {
                                0.0
                            });
                            w.mask.push(observed);
                        }
                    }
                }
                w
            })
            .collect();
        let reconstructions = model.run(&windows).unwrap();
        let scores = floats(&golden["expected"]["score"]);
        let errors = floats(&golden["expected"]["errors"]);
        for (wi, (w, recon)) in windows.iter().zip(&reconstructions).enumerate() {
            let n = w.node_count();
            for ti in 0..t {
                for ni in 0..n {
                    for fi in 0..f {
                        let got = f64::from(recon[(ti * n + ni) * f + fi]);
                        let want = expected[((wi * t + ti) * n_max + ni) * f + fi].unwrap();
                        assert!(
                            (got - want).abs() < tolerance,
                            "window {wi} t{ti} n{ni} c{fi}: {got} vs {want}"
                        );
                    }
                }
            }
            let score = detector.score(w, recon);
            let want = scores[wi].unwrap();
            assert!(
                (score.score - want).abs() < tolerance * want.max(1.0),
                "window {wi}: {} vs {want}",
                score.score
            );
            for e in &score.entries {
                let want = errors[(wi * n_max + e.slot) * f + e.channel]
                    .expect("observed entries have errors");
                assert!((e.error - want).abs() < tolerance * want.max(1.0));
            }
            let excluded = (0..n * f)
                .filter(|i| errors[wi * n_max * f + i].is_none())
                .count();
            assert_eq!(
                score.entries.len(),
                n * f - excluded,
                "excluded entries match"
            );
        }
        let anomalous: Vec<bool> = golden["expected"]["anomalous"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        let detected: Vec<bool> = windows
            .iter()
            .zip(&reconstructions)
            .map(|(w, r)| detector.detect(w, r).1.is_some())
            .collect();
        assert_eq!(
            detected, anomalous,
            "the planted anomaly, and only it, is detected"
        );
    }
}

/// A window's reconstruction must not depend on the batch it is scored in: after a restart a
/// replayed window lands in another batch, and its event must come out byte-identical (same
/// score, same contributors) for consumers that deduplicate by event id.
#[test]
fn reconstructions_do_not_depend_on_the_batch() {
    use gridwatch::assemble::{Assembler, Provenance};
    use gridwatch::simulate::{self, Plant, PlantSpec};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/plant-attention-v1.json");
    let mut model = Model::load(&path, &ModelConfig::default()).unwrap();
    let c = &model.contract;
    let mut assembler = Assembler::new(gridwatch::assemble::AssembleSpec {
        cadence_ms: c.cadence_ms,
        window_steps: c.window_steps,
        hop_steps: c.scored_steps,
        stagger: true,
        channels: c.channels.iter().map(|ch| ch.name.clone()).collect(),
        allowed_lateness_ms: 0,
        max_nodes: c.max_nodes,
        min_observed_fraction: 0.0,
        max_cells: 1_000,
        idle_cell_ms: 600_000,
    });
    let mut plant = Plant::new(PlantSpec {
        lines: 3,
        seed: 4,
        ..PlantSpec::default()
    });
    let mut windows = Vec::new();
    for offset in 0..200 {
        for (cell, readings) in simulate::by_cell(&plant.step()) {
            let cell: Arc<str> = Arc::from(cell.as_str());
            for r in readings {
                let node: Arc<str> = Arc::from(r.node_id.as_str());
                let at = Provenance {
                    partition: 0,
                    offset,
                };
                assembler.add(&cell, &node, &r, at, &mut windows);
            }
        }
    }
    assert!(windows.len() > 100);
    let together = model.run(&windows).unwrap();
    for (size, chunk_start) in [(1, 0), (7, 3), (64, 10)] {
        let chunk = &windows[chunk_start..chunk_start + size];
        let alone = model.run(chunk).unwrap();
        for (i, r) in alone.iter().enumerate() {
            let same = r
                .iter()
                .zip(&together[chunk_start + i])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "window {} scored in a batch of {size} differs from a batch of {}",
                chunk_start + i,
                windows.len()
            );
        }
    }

    // Cells of different sizes in one batch (a city's cells hold 1 to 10 sensors): each
    // window comes out as it does alone, whatever the other windows' node counts.
    let f = model.contract.channels.len();
    let cut = |w: &Window, keep: usize| -> Window {
        let n = w.node_count();
        let rows = |v: &[f32]| -> Vec<f32> {
            v.chunks(n * f)
                .flat_map(|row| row[..keep * f].iter().copied())
                .collect()
        };
        Window {
            nodes: w.nodes[..keep].to_vec(),
            values: rows(&w.values),
            mask: rows(&w.mask),
            ..w.clone()
        }
    };
    let mixed: Vec<Window> = windows[..48]
        .iter()
        .enumerate()
        .map(|(i, w)| cut(w, 1 + i % w.node_count()))
        .collect();
    let together = model.run(&mixed).unwrap();
    for (i, w) in mixed.iter().enumerate() {
        let alone = model.run(std::slice::from_ref(w)).unwrap();
        assert_eq!(alone[0].len(), together[i].len());
        assert!(
            alone[0]
                .iter()
                .zip(&together[i])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "window {i} of {} nodes differs in a batch of cells of 1 to 5 nodes",
            w.node_count()
        );
    }
}
