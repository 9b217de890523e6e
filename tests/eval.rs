//! `gridwatch eval` as a user runs it: the simulated plant with its injected faults, written as
//! CSV with its labels and node metadata, replayed through the real model.

use std::path::Path;
use std::process::Command;

fn gridwatch(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gridwatch"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("gridwatch runs")
}

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/plant-attention-v1.json")
        .display()
        .to_string()
}

#[test]
fn eval_scores_the_simulated_plant_and_its_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let out = gridwatch(
        dir.path(),
        &[
            "simulate",
            "--csv",
            "plant.csv",
            "--steps",
            "2400",
            "--lines",
            "3",
            "--seed",
            "11",
            "--labels-csv",
            "labels.csv",
            "--nodes-csv",
            "nodes.csv",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = model();
    let out = gridwatch(
        dir.path(),
        &[
            "eval",
            "--model",
            &model,
            "--node-column",
            "node_id",
            "--ignore-columns",
            "cell_id",
            "--nodes",
            "nodes.csv",
            "--labels",
            "labels.csv",
            "--fit-rows",
            "300",
            "--threshold",
            "contract",
            "--quiet",
            "--json",
            "-",
            "--points-csv",
            "points.csv",
            "plant.csv",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &report["dataset"];
    assert_eq!(d["cells"], 3);
    assert_eq!(d["nodes"], 15);
    assert_eq!(d["readings"], 2400 * 15);
    assert_eq!(d["test_points"], (2400 - 300) * 3);
    let results = report["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["detector"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "plant-attention v1");
    assert!(
        names[1].contains("all anomalous")
            && names[2].contains("random")
            && names[3].contains("last-value")
    );
    let metric = |i: usize, k: &str| results[i]["metrics"][k].as_f64().unwrap();
    // All-anomalous: recall 1, precision = the labelled share.
    let prevalence = d["anomalous_points"].as_f64().unwrap() / d["test_points"].as_f64().unwrap();
    assert_eq!(metric(1, "recall"), 1.0);
    assert!((metric(1, "precision") - prevalence).abs() < 1e-12);
    // The model finds the simulator's faults, names the faulty machine, and beats every baseline.
    assert!(
        metric(0, "event_recall") >= 0.9,
        "event recall {}",
        metric(0, "event_recall")
    );
    assert!(results[0]["attribution"]["top1_share"].as_f64().unwrap() >= 0.9);
    // The points written out are the ones the metrics count.
    let mut points = csv::Reader::from_path(dir.path().join("points.csv")).unwrap();
    let (fit, rows): (Vec<csv::StringRecord>, Vec<_>) = points
        .records()
        .map(Result::unwrap)
        .partition(|r| &r[2] == "fit");
    // The fit part's windows are scored too, for rules fitted on them; its first steps have
    // no whole window yet.
    assert_eq!(fit.len(), 300 * 3);
    assert!(fit.iter().filter(|r| r[4].parse::<f64>().is_ok()).count() > 250 * 3);
    let count = |column: usize| rows.iter().filter(|r| &r[column] == "1").count() as u64;
    let counted = |k: &str| results[0]["metrics"][k].as_u64().unwrap();
    assert_eq!(rows.len() as u64, d["test_points"].as_u64().unwrap());
    assert_eq!(
        count(6),
        counted("true_positives") + counted("false_positives")
    );
    assert_eq!(count(7), d["anomalous_points"].as_u64().unwrap());
    // Every step of the test part closes a window, judged by the contract's threshold.
    let threshold: f64 = rows[0][5].parse().unwrap();
    assert!(threshold > 0.0);
    assert!(
        rows.iter()
            .all(|r| r[4].parse::<f64>().is_ok() && r[5].parse::<f64>() == Ok(threshold))
    );
    for (baseline, name) in names.iter().enumerate().skip(1) {
        assert!(
            metric(0, "f1") > metric(baseline, "f1"),
            "{name} beats the model"
        );
    }
}

#[test]
fn eval_names_a_column_it_cannot_place() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.csv"),
        "ts_ms,vibration_rms,humidity,anomaly\n0,1,2,0\n1000,1,2,1\n",
    )
    .unwrap();
    let model = model();
    let out = gridwatch(
        dir.path(),
        &[
            "eval",
            "--model",
            &model,
            "--label-column",
            "anomaly",
            "--fit-rows",
            "1",
            "r.csv",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("humidity") && err.contains("--ignore-columns"),
        "{err}"
    );
}
