use super::*;
use crate::schema::Severity;

/// One node, one channel, two steps of which the last is scored; threshold 2. A window
/// whose reconstruction of the last step is `r` scores `r²`.
fn detector() -> Detector {
    let contract = crate::detect::test_support::contract("1", (2, 1, 1), &["a"], vec![1.0], 2.0);
    Detector::new(&contract, &DetectConfig::default())
}

fn window(end_s: i64) -> Window {
    crate::detect::test_support::window("c", end_s)
}

/// The divergence check on: 6 deviations over both steps of a window, after a minute.
fn divergence_config() -> DetectConfig {
    use crate::detect::divergence::DivergenceConfig;
    use std::time::Duration;
    DetectConfig {
        divergence: Some(DivergenceConfig {
            deviations: 6.0,
            steps: 2,
            memory: Duration::from_secs(3600),
            warmup: Duration::from_secs(60),
        }),
        ..DetectConfig::default()
    }
}

/// Three nodes of one channel, two-step windows, a threshold no score reaches.
fn three_node_detector(version: &str, config: &DetectConfig) -> Detector {
    let contract =
        crate::detect::test_support::contract(version, (2, 1, 3), &["a"], vec![1.0], 1e9);
    Detector::new(&contract, config)
}

/// The window of nodes x, y and z ending at second `end_s`: x and y steady, z at `z`.
fn three_nodes(end_s: i64, z: f32) -> Window {
    Window {
        nodes: ["x", "y", "z"].into_iter().map(Arc::from).collect(),
        values: vec![10.0, 11.0, z, 10.5, 11.5, z],
        mask: vec![1.0; 6],
        ..window(end_s)
    }
}

/// Where z usually reads: about 12.
fn usual_z(end_s: i64) -> f32 {
    12.0 + (end_s % 3) as f32 * 0.1
}

/// A judge of model "1" under `config` after 198 windows of three nodes with z where it
/// usually is.
fn judged_usual(config: &DetectConfig) -> Judge {
    let mut judge = Judge::new(three_node_detector("1", config), config);
    for end_s in 2..200 {
        judge.judge(&three_nodes(end_s, usual_z(end_s)), &[0.0; 6]);
    }
    judge
}

#[test]
fn a_new_model_keeps_the_divergence_baselines() {
    let config = divergence_config();
    let judge = judged_usual(&config);
    // Right after the swap the new model's judge still knows where z usually is.
    let mut judge = judge.for_model(three_node_detector("2", &config));
    assert!(judge.judge(&three_nodes(200, 30.0), &[0.0; 6]).anomalous);
    // A judge that started over would still be learning.
    let mut fresh = Judge::new(three_node_detector("2", &config), &config);
    assert!(!fresh.judge(&three_nodes(200, 30.0), &[0.0; 6]).anomalous);
}

#[test]
fn a_diverged_node_makes_a_quiet_window_anomalous_and_its_event_names_it() {
    let config = divergence_config();
    let mut judge = Judge::new(three_node_detector("1", &config), &config);
    for end_s in 2..200 {
        let j = judge.judge(&three_nodes(end_s, usual_z(end_s)), &[0.0; 6]);
        assert!(!j.anomalous, "second {end_s}");
    }
    let j = judge.judge(&three_nodes(200, 30.0), &[0.0; 6]);
    assert!(j.anomalous);
    let event = j.event.expect("an anomalous window is published");
    assert_eq!(event.diverged.len(), 1, "{:?}", event.diverged);
    assert_eq!(event.diverged[0].node_id, "z");
}

/// The floor check on: a slot judges from its first day, both steps of a window checked.
fn floor_config() -> DetectConfig {
    DetectConfig {
        floor: Some(crate::detect::floor::FloorConfig {
            steps: 2,
            days: 1,
            ..Default::default()
        }),
        ..DetectConfig::default()
    }
}

#[test]
fn a_node_below_its_floor_makes_the_window_anomalous_and_its_floors_move_with_the_cell() {
    let config = floor_config();
    let mut judge = Judge::new(three_node_detector("1", &config), &config);
    assert!(!judge.judge(&three_nodes(2, 12.0), &[0.0; 6]).anomalous);
    // z at 5, under 0.85 × its floor of 12, in both steps.
    let j = judge.judge(&three_nodes(4, 5.0), &[0.0; 6]);
    assert!(j.anomalous);
    let event = j.event.expect("an anomalous window is published");
    assert_eq!(event.below_floor.len(), 1, "{:?}", event.below_floor);
    assert_eq!(
        (
            event.below_floor[0].node_id.as_str(),
            event.below_floor[0].bound
        ),
        ("z", 12.0)
    );

    // Saved and taken over: with the check on only, for the model's channels only.
    let state = judge.cell_state("c", 0, false).unwrap();
    assert_eq!(state.floors["c"].len(), 3, "x, y and z on one channel");
    let mut off = Judge::new(
        three_node_detector("1", &DetectConfig::default()),
        &DetectConfig::default(),
    );
    assert_eq!(
        off.restore(state.clone(), 0).floors,
        Err("[detect.floor] is off".into())
    );
    let mut next = Judge::new(three_node_detector("1", &config), &config);
    assert_eq!(next.restore(state, 0).floors, Ok(1));
    assert!(
        next.judge(&three_nodes(6, 5.0), &[0.0; 6]).anomalous,
        "the floor came along"
    );

    // A new model keeps them: they are the sensors' values, not the model's.
    let next = next.for_model(three_node_detector("2", &config));
    assert!(
        next.cell_state("c", 0, false)
            .is_some_and(|s| s.floors.contains_key("c"))
    );
}

#[test]
fn a_node_above_its_ceiling_makes_the_window_anomalous_and_its_ceilings_move_with_the_cell() {
    let mut config = floor_config();
    if let Some(floor) = config.floor.as_mut() {
        floor.ceiling = Some(1.05);
    }
    let mut judge = Judge::new(three_node_detector("1", &config), &config);
    assert!(!judge.judge(&three_nodes(2, 12.0), &[0.0; 6]).anomalous);
    // z at 13, over 1.05 × its ceiling of 12, in both steps.
    let j = judge.judge(&three_nodes(4, 13.0), &[0.0; 6]);
    let event = j.event.expect("an anomalous window is published");
    assert!(event.below_floor.is_empty());
    assert_eq!(event.above_ceiling.len(), 1, "{:?}", event.above_ceiling);
    let above = &event.above_ceiling[0];
    assert_eq!((above.node_id.as_str(), above.bound), ("z", 12.0));

    // Saved beside the floors and taken over with them.
    let state = judge.cell_state("c", 0, false).unwrap();
    assert_eq!(state.ceilings["c"].len(), 3, "x, y and z on one channel");
    let mut next = Judge::new(three_node_detector("1", &config), &config);
    assert_eq!(next.restore(state.clone(), 0).floors, Ok(1));
    let j = next.judge(&three_nodes(6, 13.0), &[0.0; 6]);
    assert_eq!(
        j.event.map(|e| e.above_ceiling.len()),
        Some(1),
        "the ceiling came along"
    );
    // Without a ceiling the saved ceilings are left out; the floors still come.
    let floors_only = floor_config();
    let mut plain = Judge::new(three_node_detector("1", &floors_only), &floors_only);
    assert_eq!(plain.restore(state, 0).floors, Ok(1));
    assert!(!plain.judge(&three_nodes(6, 13.0), &[0.0; 6]).anomalous);
}

#[test]
fn a_cell_state_holds_that_cell_alone_and_restores_it() {
    let config = divergence_config();
    let mut judge = Judge::new(three_node_detector("1", &config), &config);
    let other = |end_s| Window {
        cell: Arc::from("d"),
        ..three_nodes(end_s, usual_z(end_s))
    };
    for end_s in 2..200 {
        judge.judge(&three_nodes(end_s, usual_z(end_s)), &[0.0; 6]);
        judge.judge(&other(end_s), &[0.0; 6]);
    }
    assert!(judge.has_state("c") && judge.has_state("d"));
    assert!(
        judge.cell_state("e", 1_000_000, true).is_none(),
        "nothing learnt of e"
    );
    let state = judge.cell_state("c", 1_000_000, true).unwrap();
    assert_eq!(state.divergence.keys().collect::<Vec<_>>(), ["c"]);

    // The cell's next owner: z's usual place is known at once, d's is not.
    let mut next = Judge::new(three_node_detector("1", &config), &config);
    assert!(!next.has_state("c"));
    assert_eq!(next.restore(state, 1_060_000).divergence, Ok(1));
    assert!(next.has_state("c") && !next.has_state("d"));
    assert!(next.judge(&three_nodes(200, 30.0), &[0.0; 6]).anomalous);
    let far_d = Window {
        cell: Arc::from("d"),
        ..three_nodes(200, 30.0)
    };
    assert!(
        !next.judge(&far_d, &[0.0; 6]).anomalous,
        "d learns from nothing"
    );
}

#[test]
fn a_saved_state_restores_the_baselines_and_refuses_what_does_not_fit() {
    let config = divergence_config();
    let judge = judged_usual(&config);
    let saved_at_ms = 1_000_000;
    let json = serde_json::to_string(&judge.state(saved_at_ms)).unwrap();
    let state: JudgeState = serde_json::from_str(&json).unwrap();
    assert_eq!(
        serde_json::to_string(&state).unwrap(),
        json,
        "a JSON round trip keeps it whole"
    );
    assert_eq!(state.divergence["c"].len(), 3, "x, y and z on one channel");
    assert!(state.spot.is_empty(), "the static policy has no SPOT state");

    // A new process, a minute later: it knows at once where z usually is.
    let mut restored = Judge::new(three_node_detector("1", &config), &config);
    let took = restored.restore(state.clone(), saved_at_ms + 60_000);
    assert_eq!(
        took,
        Restored {
            divergence: Ok(1),
            spot: Ok(0),
            incidents: Ok(0),
            floors: Ok(0)
        }
    );
    assert!(restored.judge(&three_nodes(200, 30.0), &[0.0; 6]).anomalous);

    // Older than the memory (an hour), for another model's channels, or with the check
    // off: refused, and the judge starts from nothing.
    let mut fresh = Judge::new(three_node_detector("1", &config), &config);
    let late = fresh
        .restore(state.clone(), saved_at_ms + 3_601_000)
        .divergence;
    assert!(
        late.unwrap_err()
            .contains("more than [detect.divergence] memory")
    );
    let other = JudgeState {
        channels: vec!["b".into()],
        ..state.clone()
    };
    let other = fresh.restore(other, saved_at_ms).divergence;
    assert!(other.unwrap_err().contains("channels"));
    let off = DetectConfig::default();
    let mut plain = Judge::new(three_node_detector("1", &off), &off);
    assert!(plain.restore(state, saved_at_ms).divergence.is_err());
    assert_eq!(fresh.cell_count(), 0);
    assert!(!fresh.judge(&three_nodes(200, 30.0), &[0.0; 6]).anomalous);
}

/// The SPOT policy, fitted after 200 windows at risk 1e-3 from the 0.9 quantile.
fn spot_config() -> DetectConfig {
    DetectConfig {
        threshold_policy: ThresholdPolicy::Spot,
        spot_init_windows: 200,
        spot: crate::detect::spot::SpotConfig {
            risk: 1e-3,
            init_level: 0.9,
            ..Default::default()
        },
        ..DetectConfig::default()
    }
}

/// 200 normal scores spread in [0, 1.9): below the static threshold 2.
fn spread_scores() -> Vec<f64> {
    (0..200)
        .map(|i| (i * 37 % 200) as f64 / 200.0 * 1.9)
        .collect()
}

#[test]
fn a_saved_spot_threshold_is_taken_over_by_the_same_model_only() {
    let config = spot_config();
    let scores = spread_scores();
    let mut judge = Judge::new(detector(), &config);
    judge_scores(&mut judge, &scores);
    let fitted = judge.threshold_of("c");
    assert_ne!(fitted, 2.0, "fitted after 200 windows");
    let state = judge.state(0);

    let mut restored = Judge::new(detector(), &config);
    assert_eq!(
        restored.threshold_of("c"),
        2.0,
        "the static threshold until fitted"
    );
    assert_eq!(restored.restore(state.clone(), 0).spot, Ok(1));
    assert_eq!(restored.threshold_of("c"), fitted);

    // Another model (another ONNX hash), or other SPOT settings: not taken over.
    let mut contract =
        crate::detect::test_support::contract("1", (2, 1, 1), &["a"], vec![1.0], 2.0);
    contract.onnx_sha256 = "another file".into();
    let mut other_model = Judge::new(Detector::new(&contract, &config), &config);
    let refused = other_model.restore(state.clone(), 0).spot;
    assert!(refused.unwrap_err().contains("another model"));
    let mut changed = config.clone();
    changed.spot.risk /= 10.0;
    let mut other_settings = Judge::new(detector(), &changed);
    let refused = other_settings.restore(state, 0).spot;
    assert!(refused.unwrap_err().contains("[detect.spot] changed"));
    assert_eq!(other_settings.threshold_of("c"), 2.0);
}

#[test]
fn a_saved_spot_threshold_is_taken_over_by_a_re_export_of_its_model() {
    let config = spot_config();
    let mut judge = Judge::new(detector(), &config);
    judge_scores(&mut judge, &spread_scores());
    let fitted = judge.threshold_of("c");
    let state = judge.state(0);

    // The same weights re-exported: a new file hash, the old one among the earlier hashes.
    let reexported = |earlier: &str| {
        let mut contract =
            crate::detect::test_support::contract("1", (2, 1, 1), &["a"], vec![1.0], 2.0);
        contract.onnx_sha256 = "re-exported file".into();
        contract.training = serde_json::json!({
            "reexports": [{ "from_sha256": earlier, "max_abs_diff": 0.0 }]
        });
        contract
    };
    let contract = reexported(&state.model_hash);
    let mut restored = Judge::new(Detector::new(&contract, &config), &config);
    assert_eq!(restored.restore(state.clone(), 0).spot, Ok(1));
    assert_eq!(restored.threshold_of("c"), fitted);
    assert!(
        detector().is_for(&contract),
        "a hot reload onto the re-export keeps the judge"
    );

    // A contract whose earlier hashes name another file: refused as before.
    let contract = reexported("yet another file");
    let mut other = Judge::new(Detector::new(&contract, &config), &config);
    let refused = other.restore(state, 0).spot;
    assert!(refused.unwrap_err().contains("another model"));
    assert!(!detector().is_for(&contract));
}

#[test]
fn a_forgotten_cell_starts_over() {
    let config = DetectConfig {
        incidents: Some(crate::detect::incident::IncidentConfig {
            open_after: 1,
            ..Default::default()
        }),
        ..divergence_config()
    };
    let mut judge = judged_usual(&config);
    let opened = judge.judge(&three_nodes(200, 30.0), &[0.0; 6]).event;
    assert!(
        opened.and_then(|e| e.incident).is_some(),
        "z's divergence opens an incident"
    );
    assert_eq!(judge.cell_count(), 1);

    judge.forget("c");
    assert_eq!(judge.cell_count(), 0);
    // The baselines went with it: z at 30 is no longer known to be unusual.
    assert!(!judge.judge(&three_nodes(201, 30.0), &[0.0; 6]).anomalous);
    assert_eq!(
        judge.cell_count(),
        1,
        "the cell's next window starts its state again"
    );
}

fn judge_scores(judge: &mut Judge, scores: &[f64]) -> Vec<Judgement> {
    scores
        .iter()
        .enumerate()
        .map(|(i, s)| judge.judge(&window(i as i64 + 2), &[0.0, s.sqrt() as f32]))
        .collect()
}

#[test]
fn static_policy_is_the_detector() {
    let d = detector();
    let mut judge = Judge::new(d.clone(), &DetectConfig::default());
    for (i, s) in [1.0f64, 3.0, 9.0, 1.5].iter().enumerate() {
        let w = window(i as i64 + 2);
        let r = [0.0, s.sqrt() as f32];
        let j = judge.judge(&w, &r);
        assert_eq!(j.event, d.detect(&w, &r).1);
        assert_eq!(j.anomalous, j.event.is_some());
        assert_eq!(j.threshold, 2.0);
    }
}

/// The one-node judge with incidents: open at the first anomalous window, close at the
/// second normal one, no periodic updates.
fn incident_judge() -> Judge {
    let config = DetectConfig {
        incidents: Some(crate::detect::incident::IncidentConfig {
            open_after: 1,
            close_after: 2,
            update_every: 0,
        }),
        ..DetectConfig::default()
    };
    Judge::new(detector(), &config)
}

#[test]
fn a_silent_cell_gets_the_close_of_its_open_incident() {
    let mut judge = incident_judge();
    // Windows end at 2, 3 and 4 s; the last two are anomalous, 9 is 4.5 × the threshold.
    let js = judge_scores(&mut judge, &[1.0, 3.0, 9.0]);
    let open = js[1].event.clone().unwrap();
    let cell: Arc<str> = Arc::from("c");
    let close = judge.expire(&cell, 60_000).expect("the incident was open");
    let incident = close.incident.as_ref().unwrap();
    assert_eq!(incident.status, IncidentStatus::Close);
    assert_eq!(incident.incident_id, open.incident.unwrap().incident_id);
    assert_eq!((incident.windows, incident.peak_score), (2, 9.0));
    // The silence from the last window to the moment the cell was known silent.
    assert_eq!(
        (close.window_start_ms, close.window_end_ms),
        (4_000, 60_000)
    );
    assert_eq!(close.severity, Severity::High);
    assert!(close.contributors.is_empty());
    assert_ne!(close.event_id, js[2].event.as_ref().unwrap().event_id);
    // Closed once; a cell without an open incident has nothing to close.
    assert!(judge.expire(&cell, 61_000).is_none());
    // The cell's next window starts a new incident.
    let next = judge.judge(&window(70), &[0.0, 3.0]);
    assert_eq!(
        next.event.unwrap().incident.unwrap().status,
        IncidentStatus::Open
    );
}

#[test]
fn an_open_incident_goes_on_at_the_cells_next_owner() {
    let mut judge = incident_judge();
    // Windows ending at 2, 3 and 4 s: normal, then anomalous twice (OPEN at 3 s).
    let js = judge_scores(&mut judge, &[1.0, 4.0, 4.0]);
    let open = js[1].event.as_ref().unwrap().incident.clone().unwrap();
    assert_eq!(open.status, IncidentStatus::Open);
    assert!(
        judge.cell_state("c", 0, false).is_none(),
        "the incident is left out while its events are unacknowledged"
    );
    let state = judge.cell_state("c", 0, true).unwrap();
    assert_eq!(state.incidents.keys().collect::<Vec<_>>(), ["c"]);

    let mut off = Judge::new(detector(), &DetectConfig::default());
    let refused = off.restore(state.clone(), 0).incidents;
    assert_eq!(refused, Err("[detect.incidents] is off".into()));
    let mut other_model = incident_judge();
    let mut foreign = state.clone();
    foreign.model_hash = "another model".into();
    let refused = other_model.restore(foreign, 0).incidents;
    assert_eq!(
        refused,
        Err("the incidents were opened by another model".into())
    );

    let mut next = incident_judge();
    assert_eq!(next.restore(state, 0).incidents, Ok(1));
    assert!(next.has_state("c"));
    let mut judged = [(4, 4.0), (5, 1.0), (6, 1.0)]
        .map(|(end_s, score): (i64, f64)| next.judge(&window(end_s), &[0.0, score.sqrt() as f32]))
        .into_iter();
    let replayed = judged.next().unwrap();
    assert!(
        replayed.anomalous && replayed.event.is_none(),
        "the old owner's window is not reported again"
    );
    assert!(judged.next().unwrap().event.is_none());
    let close = judged.next().unwrap().event.unwrap().incident.unwrap();
    assert_eq!(close.status, IncidentStatus::Close);
    assert_eq!(
        close.incident_id, open.incident_id,
        "one incident, not a second"
    );
    assert_eq!((close.windows, close.peak_score), (2, 4.0));
}

#[test]
fn a_taken_over_incident_is_closed_when_the_next_window_is_apart() {
    let mut judge = incident_judge();
    let js = judge_scores(&mut judge, &[4.0]);
    let open = js[0].event.as_ref().unwrap().incident.clone().unwrap();
    let state = judge.cell_state("c", 0, true).unwrap();
    let cell: Arc<str> = Arc::from("c");

    let mut next = incident_judge();
    next.restore(state, 0);
    // The incident's last window is [0 s, 2 s): one from 1 s overlaps it, one from 2 s
    // follows it, one from 3 s leaves a second unjudged.
    assert!(next.close_if_apart(&cell, 1_000).is_none());
    assert!(next.close_if_apart(&cell, 2_000).is_none());
    let close = next.close_if_apart(&cell, 3_000).unwrap().incident.unwrap();
    assert_eq!(close.status, IncidentStatus::Close);
    assert_eq!(close.incident_id, open.incident_id);
    assert!(!next.has_state("c"));
}

#[test]
fn incidents_publish_open_updates_and_close() {
    let mut judge = incident_judge();
    // normal, anomalous ×3 (severity rises at the third), normal, anomalous, normal ×2.
    let js = judge_scores(&mut judge, &[1.0, 3.0, 3.0, 9.0, 1.0, 3.0, 1.0, 1.0, 1.0]);
    let status: Vec<Option<IncidentStatus>> = js
        .iter()
        .map(|j| {
            j.event
                .as_ref()
                .and_then(|e| e.incident.as_ref())
                .map(|i| i.status)
        })
        .collect();
    use IncidentStatus::*;
    assert_eq!(
        status,
        vec![
            None,
            Some(Open),
            None,
            Some(Update),
            None,
            None,
            None,
            Some(Close),
            None
        ]
    );
    let incidents: Vec<&Incident> = js
        .iter()
        .filter_map(|j| j.event.as_ref()?.incident.as_ref())
        .collect();
    assert!(
        incidents
            .iter()
            .all(|i| i.incident_id == incidents[0].incident_id)
    );
    assert!(incidents.iter().all(|i| i.opened_at_ms == 3_000));
    let close = js[7].event.as_ref().unwrap();
    assert!(!js[7].anomalous, "a normal window closes the incident");
    assert_eq!(close.incident.as_ref().unwrap().windows, 4);
    assert_eq!(close.incident.as_ref().unwrap().peak_score, 9.0);
    assert_eq!(
        close.severity,
        Severity::High,
        "the CLOSE reports the incident's peak"
    );
}

#[test]
fn spot_takes_over_from_the_static_threshold_after_its_warm_up() {
    let config = spot_config();
    let mut judge = Judge::new(detector(), &config);
    let normal = spread_scores();
    let js = judge_scores(&mut judge, &normal);
    assert!(js.iter().all(|j| j.threshold == 2.0 && !j.anomalous));
    let spot = judge.threshold_of("c");
    assert!(spot != 2.0 && spot > 1.7 && spot < 3.0, "{spot}");
    // A score between SPOT's threshold and the static one: now judged by SPOT.
    let j = judge.judge(
        &window(500),
        &[0.0, ((spot + 2.0) / 2.0).max(spot + 0.01).sqrt() as f32],
    );
    assert_eq!(j.threshold, spot);
    assert!(j.anomalous);
}
