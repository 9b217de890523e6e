use super::plan::drift_bias;
use super::*;

const N: usize = 40;
const ROWS: usize = 500;

/// A ring road of `n` sensors: weight 0.9 to the next sensor either way, 0.6 two away, 0.2
/// three away (below the default 0.3 threshold). Speeds 35–71 mph, changing every row.
fn fixture(n: usize, rows: usize) -> (Series, Vec<f64>) {
    let nodes = (0..n).map(|i| format!("s{i}")).collect();
    let mut values = Vec::with_capacity(rows * n);
    for r in 0..rows {
        for i in 0..n {
            values.push(55.0 + 10.0 * (r as f64 * 0.05 + i as f64).sin() + (i % 7) as f64);
        }
    }
    let mut adj = vec![0.0; n * n];
    for i in 0..n {
        adj[i * n + i] = 1.0;
        for (d, w) in [(1, 0.9), (2, 0.6), (3, 0.2)] {
            if d < n {
                adj[i * n + (i + d) % n] = w;
                adj[i * n + (i + n - d) % n] = w;
            }
        }
    }
    (
        Series {
            nodes,
            values,
            rows,
        },
        adj,
    )
}

/// The default configuration over `rows`, asking for `[incident, stuck, spike, drift, dropout]`
/// faults.
fn only(rows: std::ops::Range<usize>, counts: [usize; 5]) -> InjectConfig {
    let mut c = InjectConfig {
        from_row: rows.start,
        to_row: rows.end,
        ..InjectConfig::default()
    };
    [
        c.incident.count,
        c.stuck.count,
        c.spike.count,
        c.drift.count,
        c.dropout.count,
    ] = counts;
    c
}

fn config(seed: u64) -> InjectConfig {
    InjectConfig {
        seed,
        ..only(50..450, [4, 4, 6, 3, 4])
    }
}

fn run(seed: u64) -> (Series, Series, Vec<f64>, Vec<InjectedFault>) {
    let (orig, adj) = fixture(N, ROWS);
    let mut series = orig.clone();
    let faults = inject(&mut series, &adj, &config(seed)).expect("inject");
    (orig, series, adj, faults)
}

fn col(s: &Series, id: &str) -> usize {
    s.nodes.iter().position(|x| x == id).expect("node")
}

fn at(s: &Series, row: usize, node: usize) -> f64 {
    s.values[row * s.nodes.len() + node]
}

fn ms(row: usize) -> i64 {
    METR_LA_START_MS + row as i64 * METR_LA_STEP_MS
}

#[test]
fn same_seed_gives_same_series_and_labels() {
    let (_, a, _, fa) = run(7);
    let (_, b, _, fb) = run(7);
    assert!(
        a.values
            .iter()
            .zip(&b.values)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert_eq!(fa, fb);
    assert_eq!(labels_csv(&fa, ms), labels_csv(&fb, ms));
}

#[test]
fn different_seed_gives_different_faults() {
    let (_, a, _, fa) = run(7);
    let (_, b, _, fb) = run(8);
    assert_ne!(fa, fb);
    assert_ne!(a.values, b.values);
}

#[test]
fn every_requested_fault_is_placed_with_sorted_ids() {
    let (_, _, _, faults) = run(3);
    let c = config(3);
    for kind in FaultKind::PLACEMENT_ORDER {
        assert_eq!(
            faults.iter().filter(|f| f.kind == kind).count(),
            c.count(kind)
        );
    }
    for (i, f) in faults.iter().enumerate() {
        assert_eq!(f.id as usize, i + 1);
        assert_eq!(f.primary, f.nodes[0]);
    }
    assert!(faults.windows(2).all(|w| w[0].start_row <= w[1].start_row));
}

#[test]
fn nothing_changes_outside_the_labels() {
    for seed in 0..20 {
        let (orig, series, _, faults) = run(seed);
        let mut labelled = vec![false; ROWS * N];
        for f in &faults {
            for id in &f.nodes {
                let j = col(&orig, id);
                for r in f.start_row..f.end_row {
                    labelled[r * N + j] = true;
                }
            }
        }
        for (k, (a, b)) in orig.values.iter().zip(&series.values).enumerate() {
            if !labelled[k] {
                assert_eq!(a.to_bits(), b.to_bits(), "seed {seed} cell {k} changed");
            }
        }
        // Every labelled node was written somewhere in its range.
        for f in &faults {
            for id in &f.nodes {
                let j = col(&orig, id);
                let changed =
                    (f.start_row..f.end_row).any(|r| at(&orig, r, j) != at(&series, r, j));
                assert!(
                    changed || f.kind == FaultKind::Stuck,
                    "fault {} node {id}",
                    f.id
                );
            }
        }
    }
}

#[test]
fn faults_stay_in_range_and_apart() {
    for seed in 0..20 {
        let (orig, _, _, faults) = run(seed);
        let c = config(seed);
        let mut per_node: Vec<Vec<(usize, usize)>> = vec![Vec::new(); N];
        for f in &faults {
            assert!(f.start_row >= c.from_row && f.end_row <= c.to_row);
            assert!(f.start_row < f.end_row);
            for id in &f.nodes {
                per_node[col(&orig, id)].push((f.start_row, f.end_row));
            }
        }
        for spans in &mut per_node {
            spans.sort_unstable();
            for w in spans.windows(2) {
                assert!(w[0].1 + c.gap_rows <= w[1].0, "seed {seed}: {w:?}");
            }
        }
    }
}

#[test]
fn incidents_spread_to_the_strongest_neighbours() {
    let (orig, series, adj, faults) = run(11);
    let ramp = config(11).incident.ramp_rows;
    for f in faults.iter().filter(|f| f.kind == FaultKind::Incident) {
        let FaultParams::Incident {
            factor,
            duration_rows,
            neighbours,
            ..
        } = &f.params
        else {
            panic!("incident without incident params");
        };
        let p = col(&orig, &f.primary);
        // The ring gives each sensor exactly four neighbours above 0.3: ±1 and ±2.
        let mut got: Vec<usize> = f.nodes[1..].iter().map(|id| col(&orig, id)).collect();
        got.sort_unstable();
        let mut want: Vec<usize> = [1, 2, N - 1, N - 2].iter().map(|d| (p + d) % N).collect();
        want.sort_unstable();
        assert_eq!(got, want);
        let mut last_w = f64::INFINITY;
        for (nb, id) in neighbours.iter().zip(&f.nodes[1..]) {
            assert_eq!(&nb.node, id);
            let j = col(&orig, id);
            assert_eq!(nb.weight, adj[p * N + j]);
            assert!(nb.weight > 0.3 && nb.weight <= last_w);
            last_w = nb.weight;
            assert!((1..=2).contains(&nb.delay_rows));
            assert!(nb.factor > *factor && nb.factor < 1.0);
            // Untouched before its delay, slowed (never sped up) after.
            for r in f.start_row..f.start_row + nb.delay_rows {
                assert_eq!(at(&orig, r, j), at(&series, r, j));
            }
            for t in 0..*duration_rows {
                let r = f.start_row + nb.delay_rows + t;
                let ratio = at(&series, r, j) / at(&orig, r, j);
                assert!(ratio < 1.0 && ratio >= nb.factor - 1e-12);
            }
        }
        // The primary ramps in, reaches the plateau factor, and ramps out.
        let ratios: Vec<f64> = (0..*duration_rows)
            .map(|t| at(&series, f.start_row + t, p) / at(&orig, f.start_row + t, p))
            .collect();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        assert!((min - factor).abs() < 1e-9, "{min} vs {factor}");
        assert!((0.3..=0.5).contains(factor));
        assert!(ratios[0] > min + 0.1 && ratios[duration_rows - 1] > min + 0.1);
        for t in 0..ramp {
            assert!(ratios[t] > ratios[t + 1]);
        }
    }
}

#[test]
fn each_kind_writes_what_it_says() {
    for seed in 0..10 {
        let (orig, series, _, faults) = run(seed);
        let c = config(seed);
        for f in &faults {
            let j = col(&orig, &f.primary);
            let rows = f.start_row..f.end_row;
            match &f.params {
                FaultParams::Stuck { value } => {
                    assert_eq!(*value, at(&orig, f.start_row, j));
                    assert!(rows.clone().all(|r| at(&series, r, j) == *value));
                    assert!((12..=48).contains(&rows.len()));
                }
                FaultParams::Dropout { blank } => {
                    assert!(!blank);
                    assert!(rows.clone().all(|r| at(&series, r, j) == 0.0));
                    assert!((6..=24).contains(&rows.len()));
                }
                FaultParams::Spike { rows: hit, jumps } => {
                    assert!((1..=3).contains(&hit.len()));
                    assert_eq!(hit[0], f.start_row);
                    assert_eq!(hit[hit.len() - 1] + 1, f.end_row);
                    for r in rows.clone() {
                        let d = at(&series, r, j) - at(&orig, r, j);
                        match hit.iter().position(|&h| h == r) {
                            Some(k) => {
                                assert!(d.abs() >= c.spike.jump[0], "jump {d}");
                                assert_eq!(d, jumps[k]);
                                let v = at(&series, r, j);
                                assert!((0.0..=90.0).contains(&v));
                            }
                            None => assert_eq!(d, 0.0),
                        }
                    }
                }
                FaultParams::Drift { bias, ramp_rows } => {
                    assert!((10.0..=20.0).contains(&bias.abs()));
                    let mut last = 0.0;
                    for (t, r) in rows.clone().enumerate() {
                        let b = drift_bias(t, *bias, *ramp_rows);
                        assert!(b.abs() >= last && b.signum() == bias.signum());
                        last = b.abs();
                        let d = at(&series, r, j) - at(&orig, r, j);
                        // The fixture stays far from the clamp, so the bias shows in full.
                        assert!((d - b).abs() < 1e-9);
                    }
                    assert!((last - bias.abs()).abs() < 1e-12);
                }
                FaultParams::Incident { .. } => {}
            }
        }
    }
}

#[test]
fn blank_dropouts_write_nan() {
    let (orig, adj) = fixture(5, 100);
    let mut series = orig.clone();
    let mut c = only(0..100, [0, 0, 0, 0, 2]);
    c.dropout.blank = true;
    let faults = inject(&mut series, &adj, &c).expect("inject");
    assert_eq!(faults.len(), 2);
    for f in &faults {
        let j = col(&orig, &f.primary);
        assert!((f.start_row..f.end_row).all(|r| at(&series, r, j).is_nan()));
    }
}

#[test]
fn blank_cells_are_never_faulted() {
    let (mut orig, adj) = fixture(6, 200);
    // Blank every other row of sensors 0–2.
    for r in (0..200).step_by(2) {
        for j in 0..3 {
            orig.values[r * 6 + j] = f64::NAN;
        }
    }
    let mut c = only(0..200, [0, 2, 3, 1, 2]);
    c.gap_rows = 2;
    let mut series = orig.clone();
    let faults = inject(&mut series, &adj, &c).expect("inject");
    for f in &faults {
        assert!(col(&orig, &f.primary) >= 3, "{f:?}");
    }
}

#[test]
fn labels_csv_lists_each_fault() {
    let (_, _, _, faults) = run(5);
    let csv = labels_csv(&faults, ms);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("start_ms,end_ms,node_ids,kind,fault_id"));
    for (line, f) in lines.zip(&faults) {
        let cols: Vec<&str> = line.split(',').collect();
        assert_eq!(cols.len(), 5);
        assert_eq!(cols[0].parse::<i64>().ok(), Some(ms(f.start_row)));
        assert_eq!(cols[1].parse::<i64>().ok(), Some(ms(f.end_row)));
        assert_eq!(cols[2].split(';').collect::<Vec<_>>(), f.nodes);
        assert_eq!(cols[3], f.kind.as_str());
        assert_eq!(cols[4], f.id.to_string());
    }
    assert_eq!(csv.lines().count(), faults.len() + 1);
    assert_eq!(
        labels_csv(&[], ms),
        "start_ms,end_ms,node_ids,kind,fault_id\n"
    );
}

#[test]
fn config_defaults_and_strictness() {
    let c: InjectConfig = serde_json::from_str("{}").expect("empty config");
    assert_eq!(c, InjectConfig::default());
    let c: InjectConfig =
        serde_json::from_str(r#"{"seed": 9, "spike": {"count": 2}}"#).expect("partial");
    assert_eq!((c.seed, c.spike.count, c.spike.jump), (9, 2, [25.0, 45.0]));
    let json = serde_json::to_string(&InjectConfig::default()).expect("serialise");
    let back: InjectConfig = serde_json::from_str(&json).expect("round trip");
    assert_eq!(back, InjectConfig::default());
    assert!(serde_json::from_str::<InjectConfig>(r#"{"sead": 1}"#).is_err());
    assert!(serde_json::from_str::<InjectConfig>(r#"{"drift": {"slope": 1}}"#).is_err());
    assert_eq!(
        serde_json::to_string(&FaultKind::Dropout).expect("kind"),
        "\"dropout\""
    );
    assert!(InjectConfig::default().validate().is_ok());
}

#[test]
fn invalid_configs_are_errors() {
    let bad: Vec<fn(&mut InjectConfig)> = vec![
        |c| c.to_row = c.from_row,
        |c| c.value_range = [90.0, 0.0],
        |c| c.value_range = [0.0, f64::NAN],
        |c| c.max_attempts = 0,
        |c| c.incident.duration_rows = [0, 3],
        |c| c.incident.factor = [0.5, 1.5],
        |c| c.incident.min_weight = f64::NAN,
        |c| c.incident.min_neighbours = 5,
        |c| c.incident.delay_rows = [3, 1],
        |c| c.stuck.duration_rows = [48, 12],
        |c| c.spike.spikes = [0, 1],
        |c| c.spike.spacing_rows = [0, 1],
        |c| c.spike.jump = [-1.0, 5.0],
        |c| c.spike.jump = [50.0, 60.0],
        |c| c.dropout.duration_rows = [0, 0],
        |c| c.drift.ramp_rows = [0, 5],
        |c| c.drift.bias = [1.0, f64::INFINITY],
    ];
    for (k, breaks) in bad.into_iter().enumerate() {
        let mut c = config(1);
        breaks(&mut c);
        let (orig, adj) = fixture(N, ROWS);
        let mut series = orig.clone();
        let err = inject(&mut series, &adj, &c).expect_err("bad config accepted");
        assert!(matches!(err, InjectError::Config { .. }), "case {k}: {err}");
        assert_eq!(series, orig);
    }
}

#[test]
fn bad_inputs_are_errors_and_leave_the_series_alone() {
    let c = config(1);
    let (orig, adj) = fixture(N, ROWS);

    let mut s = orig.clone();
    s.values.pop();
    assert!(matches!(
        inject(&mut s, &adj, &c),
        Err(InjectError::Shape { .. })
    ));

    let mut s = orig.clone();
    let r = inject(&mut s, &adj[1..], &c);
    assert!(matches!(r, Err(InjectError::Adjacency { .. })));

    for bad in ["s1", "", "a,b", "a;b", "a\"b", "a\nb"] {
        let mut s = orig.clone();
        s.nodes[0] = bad.to_string();
        let r = inject(&mut s, &adj, &c);
        assert!(matches!(r, Err(InjectError::NodeId { .. })), "{bad:?}");
    }

    let mut s = orig.clone();
    let far = InjectConfig {
        to_row: ROWS + 1,
        ..c.clone()
    };
    assert!(matches!(
        inject(&mut s, &adj, &far),
        Err(InjectError::Range { .. })
    ));

    // Too many faults for the room: an error, and nothing written.
    let mut s = orig.clone();
    let mut crowded = c.clone();
    crowded.stuck.count = 10_000;
    let err = inject(&mut s, &adj, &crowded).expect_err("crowded");
    assert!(
        matches!(
            err,
            InjectError::NoRoom {
                kind: FaultKind::Stuck,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(s, orig);
}

#[test]
fn empty_and_tiny_inputs_do_not_panic() {
    // Empty matrix: the default range lies past the data.
    let mut empty = Series {
        nodes: Vec::new(),
        values: Vec::new(),
        rows: 0,
    };
    let r = inject(&mut empty, &[], &InjectConfig::default());
    assert!(matches!(r, Err(InjectError::Range { .. })));

    // One sensor: no neighbours, so no incident can be placed.
    let (mut one, adj) = fixture(1, 2016);
    let r = inject(&mut one, &adj, &InjectConfig::default());
    assert!(
        matches!(
            r,
            Err(InjectError::NoRoom {
                kind: FaultKind::Incident,
                placed: 0,
                ..
            })
        ),
        "{r:?}"
    );
    // One sensor, one stuck fault: fine.
    let mut c = InjectConfig::default();
    (
        c.incident.count,
        c.spike.count,
        c.dropout.count,
        c.drift.count,
    ) = (0, 0, 0, 0);
    c.stuck.count = 1;
    let faults = inject(&mut one, &adj, &c).expect("one sensor");
    assert_eq!(faults.len(), 1);

    // No faults asked for: nothing happens.
    let (orig, adj) = fixture(3, 10);
    let mut s = orig.clone();
    let mut none = InjectConfig {
        from_row: 0,
        to_row: 10,
        ..InjectConfig::default()
    };
    for kind in FaultKind::PLACEMENT_ORDER {
        match kind {
            FaultKind::Incident => none.incident.count = 0,
            FaultKind::Stuck => none.stuck.count = 0,
            FaultKind::Spike => none.spike.count = 0,
            FaultKind::Dropout => none.dropout.count = 0,
            FaultKind::Drift => none.drift.count = 0,
        }
    }
    assert_eq!(inject(&mut s, &adj, &none), Ok(Vec::new()));
    assert_eq!(s, orig);

    // A sweep of small shapes, ranges and extreme settings: any result, never a panic.
    for n in 0..4 {
        for rows in [0, 1, 2, 7, 40] {
            for (from, to) in [(0, 1), (0, rows.max(1)), (rows, rows + 3), (1, 2)] {
                for counts in [1, 3] {
                    let (mut s, mut adj) = fixture(n, rows);
                    if let Some(w) = adj.get_mut(1) {
                        *w = f64::NAN;
                    }
                    let mut c = InjectConfig {
                        from_row: from,
                        to_row: to,
                        gap_rows: usize::MAX,
                        max_attempts: 20,
                        ..InjectConfig::default()
                    };
                    c.incident.min_neighbours = 0;
                    c.incident.delay_rows = [0, usize::MAX];
                    c.drift.hold_rows = [usize::MAX - 1, usize::MAX];
                    c.spike.spacing_rows = [usize::MAX - 1, usize::MAX];
                    c.spike.spikes = [1, counts];
                    (c.incident.count, c.stuck.count, c.spike.count) = (counts, counts, counts);
                    (c.dropout.count, c.drift.count) = (counts, counts);
                    let _ = inject(&mut s, &adj, &c);
                }
            }
        }
    }
}

#[test]
fn errors_display() {
    let e = InjectError::NoRoom {
        kind: FaultKind::Spike,
        placed: 2,
        requested: 5,
    };
    assert_eq!(e.to_string(), "no room for spike fault 3 of 5 (placed 2)");
    let boxed: Box<dyn std::error::Error> = Box::new(e);
    assert!(!boxed.to_string().is_empty());
}
