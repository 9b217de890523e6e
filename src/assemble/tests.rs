//! Event time is supplied by each test; nothing here sleeps or reads a clock.

use super::*;
use proptest::prelude::*;

fn spec(lateness_ms: i64) -> AssembleSpec {
    AssembleSpec {
        cadence_ms: 1_000,
        window_steps: 4,
        hop_steps: 2,
        stagger: false,
        channels: vec!["temperature".into(), "current".into()],
        allowed_lateness_ms: lateness_ms,
        max_nodes: 3,
        min_observed_fraction: 0.0,
        max_cells: 100_000,
        idle_cell_ms: 600_000,
    }
}

fn reading(node: &str, t: i64, values: &[(&str, f64)]) -> Reading {
    Reading {
        node_id: node.into(),
        event_time_ms: t,
        values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        sequence: None,
    }
}

struct Feed {
    assembler: Assembler,
    cell: Arc<str>,
    windows: Vec<Window>,
    offset: i64,
}

impl Feed {
    fn new(spec: AssembleSpec) -> Self {
        Self {
            assembler: Assembler::new(spec),
            cell: Arc::from("line-1"),
            windows: Vec::new(),
            offset: 0,
        }
    }

    fn add(&mut self, r: Reading) -> Admission {
        let node: Arc<str> = Arc::from(r.node_id.as_str());
        let at = Provenance {
            partition: 0,
            offset: self.offset,
        };
        self.offset += 1;
        let cell = Arc::clone(&self.cell);
        self.assembler
            .add(&cell, &node, &r, at, &mut self.windows)
            .0
    }
}

#[test]
fn buckets_average_with_a_mask() {
    let mut feed = Feed::new(spec(0));
    // Node a at step 3 opens the cell's history; windows starting at step 4 are whole.
    feed.add(reading("a", 3_000, &[("current", 0.0)]));
    // Steps 4..8 for node a; node b only reports temperature at steps 5 and 7.
    for s in 4..8 {
        feed.add(reading(
            "a",
            s * 1_000,
            &[("temperature", 60.0), ("current", s as f64)],
        ));
        feed.add(reading("a", s * 1_000 + 500, &[("temperature", 70.0)]));
        if s % 2 == 1 {
            feed.add(reading("b", s * 1_000 + 10, &[("temperature", 40.0)]));
        }
    }
    // The watermark is at 7.51 s: steps below 7 closed. Windows ending at 4 and 6 begin before
    // the history is whole (warm-up), so nothing is out yet.
    assert_eq!(feed.windows.len(), 0);
    // Move time to 8 s: step 7 closes and the window [4, 8) is emitted.
    feed.add(reading("a", 8_000, &[("current", 9.0)]));
    assert_eq!(feed.windows.len(), 1);
    let w = &feed.windows[0];
    assert_eq!((w.start_ms, w.end_ms), (4_000, 8_000));
    assert_eq!(w.nodes, vec![Arc::<str>::from("a"), Arc::from("b")]);
    // [T=4][N=2][F=2]
    let at =
        |t: usize, n: usize, f: usize| (w.values[t * 4 + n * 2 + f], w.mask[t * 4 + n * 2 + f]);
    // Node a temperature: mean of 60 and 70.
    assert_eq!(at(0, 0, 0), (65.0, 1.0));
    // Node a current at step 6 is 6.0 (one reading; the 500 ms reading had no current).
    assert_eq!(at(2, 0, 1), (6.0, 1.0));
    // Node b: observed at steps 5 and 7 for temperature only; current never observed.
    assert_eq!(at(0, 1, 0), (0.0, 0.0));
    assert_eq!(at(1, 1, 0), (40.0, 1.0));
    assert_eq!(at(1, 1, 1), (0.0, 0.0));
    // 16 entries: a has 8, b has 2 observed.
    assert!((w.missing_fraction - 6.0 / 16.0).abs() < 1e-12);
}

#[test]
fn readings_behind_the_watermark_are_late_and_change_nothing() {
    let mut feed = Feed::new(spec(1_500));
    feed.add(reading("a", 0, &[("current", 1.0)]));
    feed.add(reading("a", 10_000, &[("current", 1.0)]));
    // Watermark 8.5 s: steps below 8 are closed.
    assert_eq!(
        feed.add(reading("a", 7_999, &[("current", 1.0)])),
        Admission::Late {
            step_end_ms: 8_000,
            watermark_ms: 8_000
        }
    );
    // Within the allowed lateness: accepted.
    assert!(matches!(
        feed.add(reading("a", 8_000, &[("current", 1.0)])),
        Admission::Accepted { .. }
    ));
    // History is whole from step 3 (first reading + 2 lateness steps + 1): window [4, 8) went out
    // when step 7 closed; the late reading changed nothing, and 11.6 s closes [6, 10).
    feed.add(reading("a", 11_600, &[("current", 1.0)]));
    let ends: Vec<i64> = feed.windows.iter().map(|w| w.end_ms).collect();
    assert_eq!(ends, vec![8_000, 10_000]);
    assert_eq!(
        feed.windows[0].mask.iter().sum::<f32>(),
        0.0,
        "the late 7.999 s reading is not in [4, 8)"
    );
}

#[test]
fn windows_are_aligned_to_the_epoch_and_hop() {
    let mut feed = Feed::new(spec(0));
    for s in 3..20 {
        feed.add(reading("a", s * 1_000, &[("current", 1.0)]));
    }
    let ends: Vec<i64> = feed.windows.iter().map(|w| w.end_ms / 1_000).collect();
    // Data starts at step 3, so history is whole from step 4; closed up to 19: ends 8, ..., 18.
    assert_eq!(ends, vec![8, 10, 12, 14, 16, 18]);
    // Each window has four steps; only current is ever observed.
    assert_eq!(feed.windows[0].start_ms, 4_000);
    assert!((feed.windows[0].missing_fraction - 0.5).abs() < 1e-12);
}

#[test]
fn unknown_channels_are_ignored_and_useless_readings_refused() {
    let mut feed = Feed::new(spec(0));
    assert_eq!(
        feed.add(reading("a", 0, &[("current", 1.0), ("flow", 3.0)])),
        Admission::Accepted { ignored: 1 }
    );
    assert_eq!(
        feed.add(reading("a", 0, &[("flow", 3.0)])),
        Admission::NoModelChannel
    );
}

#[test]
fn a_full_cell_refuses_new_nodes() {
    let mut feed = Feed::new(spec(0));
    for node in ["a", "b", "c"] {
        assert!(matches!(
            feed.add(reading(node, 0, &[("current", 1.0)])),
            Admission::Accepted { .. }
        ));
    }
    assert_eq!(
        feed.add(reading("d", 0, &[("current", 1.0)])),
        Admission::CellFull
    );
    assert!(matches!(
        feed.add(reading("a", 0, &[("current", 1.0)])),
        Admission::Accepted { .. }
    ));
}

#[test]
fn sparse_windows_are_skipped() {
    let mut feed = Feed::new(AssembleSpec {
        min_observed_fraction: 0.6,
        ..spec(0)
    });
    // Step 0, then a gap until step 5.
    feed.add(reading("a", 0, &[("current", 1.0), ("temperature", 50.0)]));
    for s in 5..13 {
        feed.add(reading(
            "a",
            s * 1_000,
            &[("current", 1.0), ("temperature", 50.0)],
        ));
    }
    // [2, 6) holds one observed step of four: skipped. [4, 8) holds three: emitted.
    let ends: Vec<i64> = feed.windows.iter().map(|w| w.end_ms / 1_000).collect();
    assert_eq!(ends, vec![8, 10, 12]);
}

#[test]
fn holds_and_low_water_track_source_offsets() {
    let mut feed = Feed::new(spec(0));
    for s in 0..7 {
        feed.add(reading("a", s * 1_000, &[("current", 1.0)]));
    }
    // Offsets equal steps here. Closed below 6; only [2, 6) is past the warm-up. It holds its
    // own readings and its one-step warm-up margin, step 1: a restart from offset 1 emits it
    // again.
    let holds: Vec<_> = feed.windows.iter().map(|w| w.holds.clone()).collect();
    assert_eq!(holds, vec![vec![(0, 1)]]);
    // The next window [4, 8) needs steps 4 and up, and its one-step warm-up margin, step 3.
    assert_eq!(feed.assembler.low_water().get(&0), Some(&3));
}

#[test]
fn cells_follow_the_slowest_partition_that_feeds_them() {
    let mut a = Assembler::new(spec(0));
    let cell: Arc<str> = Arc::from("c");
    let node: Arc<str> = Arc::from("n");
    let mut out = Vec::new();
    let r = |t| reading("n", t, &[("current", 1.0)]);
    a.add(
        &cell,
        &node,
        &r(0),
        Provenance {
            partition: 0,
            offset: 0,
        },
        &mut out,
    );
    a.add(
        &cell,
        &node,
        &r(1_000),
        Provenance {
            partition: 1,
            offset: 0,
        },
        &mut out,
    );
    // Partition 0 races ahead; partition 1 stays at 1 s, so the cell stays at 1 s.
    for s in 2..10 {
        a.add(
            &cell,
            &node,
            &r(s * 1_000),
            Provenance {
                partition: 0,
                offset: s,
            },
            &mut out,
        );
    }
    assert!(
        out.iter().all(|w| w.end_ms <= 2_000),
        "{:?}",
        out.iter().map(|w| w.end_ms).collect::<Vec<_>>()
    );
}

/// Readings of a few steps, each with a distinct value so that windows differ.
fn arb_readings() -> impl Strategy<Value = Vec<Reading>> {
    prop::collection::vec((0i64..3, 0i64..30_000, 0.0f64..100.0), 1..120).prop_map(|raw| {
        raw.into_iter()
            .map(|(node, t, v)| reading(["a", "b", "c"][node as usize], t, &[("current", v)]))
            .collect()
    })
}

/// Observed entries of windows as `((window end, node, step, channel), value)`, sorted, so that
/// slot order (which follows first arrival) does not matter.
fn entries(windows: &[Window]) -> Vec<((i64, String, usize, usize), f32)> {
    let mut out = Vec::new();
    for w in windows {
        let (n, f) = (w.nodes.len(), 2);
        for (i, (&v, &m)) in w.values.iter().zip(&w.mask).enumerate() {
            if m > 0.0 {
                let (t, slot, c) = (i / (n * f), (i / f) % n, i % f);
                out.push(((w.end_ms, w.nodes[slot].to_string(), t, c), v));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

proptest! {
    /// Any arrival order whose disorder stays within the allowed lateness yields the same
    /// windows as time order.
    #[test]
    fn order_within_lateness_does_not_change_windows(
        mut readings in arb_readings(),
        swaps in prop::collection::vec((0usize..120, 0usize..120), 0..200),
    ) {
        const LATENESS: i64 = 3_000;
        readings.sort_by_key(|r| r.event_time_ms);
        let mut shuffled = readings.clone();
        for (i, j) in swaps {
            let (i, j) = (i % shuffled.len(), j % shuffled.len());
            // Only swap when it keeps every reading within the lateness of what came before.
            let mut candidate = shuffled.clone();
            candidate.swap(i, j);
            let mut max = i64::MIN;
            let within = candidate.iter().all(|r| {
                let ok = r.event_time_ms >= max.saturating_sub(LATENESS - 999);
                max = max.max(r.event_time_ms);
                ok
            });
            if within {
                shuffled = candidate;
            }
        }
        let run = |order: &[Reading]| {
            let mut feed = Feed::new(spec(LATENESS));
            for r in order {
                let admitted = matches!(feed.add(r.clone()), Admission::Accepted { .. });
                prop_assert!(admitted, "refused {:?}", r);
            }
            Ok(entries(&feed.windows))
        };
        let in_order = run(&readings)?;
        let out_of_order = run(&shuffled)?;
        prop_assert_eq!(in_order.len(), out_of_order.len());
        for (a, b) in in_order.iter().zip(&out_of_order) {
            prop_assert_eq!(&a.0, &b.0);
            prop_assert!((a.1 - b.1).abs() < 1e-4, "{:?} vs {:?}", a, b);
        }
    }
}

/// Adds a reading of `node` to `cell` from `partition` with the given offset.
fn add_to(
    assembler: &mut Assembler,
    cell: &str,
    partition: i32,
    offset: i64,
    r: Reading,
    out: &mut Vec<Window>,
) -> Admission {
    let (cell, node): (Arc<str>, Arc<str>) = (Arc::from(cell), Arc::from(r.node_id.as_str()));
    let at = Provenance { partition, offset };
    assembler.add(&cell, &node, &r, at, out).0
}

#[test]
fn cells_beyond_the_cap_are_refused_and_known_cells_still_accepted() {
    let mut assembler = Assembler::new(AssembleSpec {
        max_cells: 2,
        ..spec(0)
    });
    let mut out = Vec::new();
    let mut add = |cell: &str, node: &str| {
        add_to(
            &mut assembler,
            cell,
            0,
            0,
            reading(node, 0, &[("current", 1.0)]),
            &mut out,
        )
    };
    assert!(matches!(add("c1", "a"), Admission::Accepted { .. }));
    assert!(matches!(add("c2", "b"), Admission::Accepted { .. }));
    assert_eq!(add("c3", "c"), Admission::TooManyCells);
    assert!(matches!(add("c1", "d"), Admission::Accepted { .. }));
    assert_eq!(assembler.cell_count(), 2);
}

#[test]
fn idle_cells_are_dropped_and_start_afresh() {
    let mut assembler = Assembler::new(AssembleSpec {
        idle_cell_ms: 10_000,
        ..spec(0)
    });
    let mut out = Vec::new();
    // Cell "quiet" speaks once; cell "busy" (same partition) keeps the watermark moving.
    add_to(
        &mut assembler,
        "quiet",
        0,
        0,
        reading("q", 0, &[("current", 1.0)]),
        &mut out,
    );
    // Returns the cells reported silent on the way.
    let busy = |assembler: &mut Assembler, steps: std::ops::Range<i64>, out: &mut Vec<Window>| {
        let (cell, node): (Arc<str>, Arc<str>) = (Arc::from("busy"), Arc::from("b"));
        let mut silent = Vec::new();
        for s in steps {
            let r = reading("b", s * 1_000, &[("current", 1.0)]);
            let at = Provenance {
                partition: 0,
                offset: s + 1,
            };
            silent.extend(assembler.add(&cell, &node, &r, at, out).1.silent);
        }
        silent
    };
    assert!(busy(&mut assembler, 0..10, &mut out).is_empty());
    assert_eq!(assembler.cell_count(), 2, "not idle for 10 s yet");
    let silent = busy(&mut assembler, 10..20, &mut out);
    assert_eq!(assembler.cell_count(), 1, "the quiet cell was dropped");
    // Reported once, silent up to the start of the first step still open (step 11: its
    // last data in step 0, more than 10 steps before).
    assert_eq!(silent, [(Arc::from("quiet"), 11_000)]);
    // It comes back as a new cell, which is not late and not refused.
    assert!(matches!(
        add_to(
            &mut assembler,
            "quiet",
            0,
            99,
            reading("q", 19_500, &[("current", 1.0)]),
            &mut out
        ),
        Admission::Accepted { .. }
    ));
    assert_eq!(assembler.cell_count(), 2);
}

#[test]
fn a_forgotten_partition_is_rebuilt_from_a_replay() {
    let mut assembler = Assembler::new(spec(0));
    let mut first = Vec::new();
    for s in 0..10 {
        add_to(
            &mut assembler,
            "c",
            3,
            s,
            reading("a", s * 1_000, &[("current", s as f64)]),
            &mut first,
        );
    }
    assert!(!assembler.low_water().is_empty());
    assembler.forget_partition(3);
    assert_eq!(assembler.cell_count(), 0);
    assert!(assembler.low_water().is_empty(), "no offsets held");
    // Replaying the same readings is accepted (nothing is late) and cuts the same windows.
    let mut again = Vec::new();
    for s in 0..10 {
        let admission = add_to(
            &mut assembler,
            "c",
            3,
            s,
            reading("a", s * 1_000, &[("current", s as f64)]),
            &mut again,
        );
        assert!(matches!(admission, Admission::Accepted { .. }));
    }
    let ends = |w: &[Window]| {
        w.iter()
            .map(|w| (w.end_ms, w.values.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ends(&first), ends(&again));
}

#[test]
fn staggered_cells_end_windows_on_their_own_phase_of_the_hop() {
    let spec = AssembleSpec {
        hop_steps: 4,
        stagger: true,
        ..spec(0)
    };
    let cells: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    let run = || {
        let mut assembler = Assembler::new(spec.clone());
        let mut out = Vec::new();
        let mut offset = 0;
        for s in 0..40 {
            for cell in &cells {
                let r = reading("a", s * 1_000, &[("current", 1.0)]);
                add_to(&mut assembler, cell, 0, offset, r, &mut out);
                offset += 1;
            }
        }
        out
    };
    let windows = run();
    let mut phases = Vec::new();
    for cell in &cells {
        let ends: Vec<i64> = (windows.iter())
            .filter(|w| *w.cell == **cell)
            .map(|w| w.end_ms / 1_000)
            .collect();
        assert!(ends.len() >= 8, "{cell}: {ends:?}");
        assert!(
            ends.windows(2).all(|e| e[1] - e[0] == 4),
            "{cell}: {ends:?}"
        );
        assert!(ends.iter().all(|e| e % 4 == ends[0] % 4));
        phases.push(ends[0] % 4);
    }
    // Spread over the hop: not every cell closes at the same step (FNV-1a of c0..c7 mod 4
    // is 2, 1, 0, 3, 2, 1, 0, 3).
    assert_eq!(phases, vec![2, 1, 0, 3, 2, 1, 0, 3]);
    // The same cells get the same windows on another instance.
    let cut = |ws: &[Window]| -> Vec<(Arc<str>, i64, Vec<f32>)> {
        (ws.iter())
            .map(|w| (Arc::clone(&w.cell), w.end_ms, w.values.clone()))
            .collect()
    };
    assert!(cut(&run()) == cut(&windows));
    // Unstaggered, every cell ends on multiples of the hop.
    let aligned = Assembler::new(AssembleSpec {
        stagger: false,
        ..spec.clone()
    });
    assert_eq!(aligned.spec.phase_of("c0"), 0);
}

#[test]
fn a_restart_from_any_windows_hold_emits_that_window_again() {
    // Unstaggered, and staggered with "line-1" on phase 1 of a 3-step hop.
    for spec in [
        spec(1_500),
        AssembleSpec {
            hop_steps: 3,
            stagger: true,
            ..spec(1_500)
        },
    ] {
        restart_from_holds(spec);
    }
}

fn restart_from_holds(spec: AssembleSpec) {
    let mut feed = Feed::new(spec.clone());
    for s in 0..30 {
        feed.add(reading("a", s * 1_000, &[("current", s as f64)]));
    }
    assert!(feed.windows.len() > 5);
    for window in &feed.windows {
        // A crash before this window's event was acknowledged: the commit stopped at its hold.
        let (_, from) = window.holds[0];
        let mut again = Feed::new(spec.clone());
        again.offset = from;
        for s in from..30 {
            again.add(reading("a", s * 1_000, &[("current", s as f64)]));
        }
        let replayed = again.windows.iter().find(|w| w.end_ms == window.end_ms);
        assert_eq!(
            replayed.map(|w| &w.values),
            Some(&window.values),
            "the window ending at {} is emitted again, whole",
            window.end_ms
        );
    }
}

#[test]
fn the_node_axis_is_in_id_order_whatever_the_arrival_order() {
    let mut windows = Vec::new();
    for arrival in [["b", "a", "c"], ["c", "b", "a"]] {
        let mut feed = Feed::new(spec(0));
        for s in 0..8 {
            for node in arrival {
                let v = node.as_bytes()[0] as f64 + s as f64;
                feed.add(reading(node, s * 1_000, &[("current", v)]));
            }
        }
        windows.push(feed.windows.remove(0));
    }
    let names: Vec<&str> = windows[0].nodes.iter().map(|n| &**n).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(windows[0].nodes, windows[1].nodes);
    assert_eq!(windows[0].values, windows[1].values);
    assert_eq!(windows[0].mask, windows[1].mask);
}

#[test]
fn replayed_numbered_readings_are_duplicates_and_change_nothing() {
    let numbered = |node: &str, t: i64, seq: i64, v: f64| Reading {
        sequence: Some(seq),
        ..reading(node, t, &[("current", v)])
    };
    let mut once = Feed::new(spec(2_000));
    let mut replayed = Feed::new(spec(2_000));
    for s in 0..12 {
        // Two readings of node a per step, numbered; b unnumbered.
        let a = [
            numbered("a", s * 1_000, 2 * s, s as f64),
            numbered("a", s * 1_000 + 500, 2 * s + 1, 3.0 * s as f64),
        ];
        for r in &a {
            once.add(r.clone());
            replayed.add(r.clone());
        }
        once.add(reading("b", s * 1_000, &[("current", 1.0)]));
        replayed.add(reading("b", s * 1_000, &[("current", 1.0)]));
        // An upstream replay sends the last three readings of a again, some in closed steps.
        if s >= 2 && s % 3 == 0 {
            for back in [
                numbered("a", (s - 1) * 1_000 + 500, 2 * s - 1, 3.0 * (s - 1) as f64),
                a[0].clone(),
                a[1].clone(),
            ] {
                assert_eq!(replayed.add(back), Admission::Duplicate);
            }
        }
    }
    assert!(!once.windows.is_empty());
    assert_eq!(once.windows.len(), replayed.windows.len());
    for (x, y) in once.windows.iter().zip(&replayed.windows) {
        assert_eq!(
            (x.end_ms, &x.values, &x.mask),
            (y.end_ms, &y.values, &y.mask)
        );
    }
    // A sensor that restarts its numbering is not a replay: its event times are newer.
    assert!(matches!(
        once.add(numbered("a", 12_000, 0, 1.0)),
        Admission::Accepted { .. }
    ));
}

#[test]
fn window_state_stays_within_one_and_a_half_times_the_raw_tensor() {
    // A plant-sized cell: 8 nodes × 4 channels, 32-step windows cut every step.
    let channels: Vec<String> = ["vibration", "temperature", "pressure", "current"]
        .into_iter()
        .map(String::from)
        .collect();
    let mut feed = Feed::new(AssembleSpec {
        window_steps: 32,
        hop_steps: 1,
        channels: channels.clone(),
        max_nodes: 8,
        ..spec(0)
    });
    for s in 0..200 {
        for node in 0..8 {
            let values: Vec<(&str, f64)> =
                channels.iter().map(|c| (c.as_str(), s as f64)).collect();
            feed.add(reading(&format!("n{node}"), s * 1_000, &values));
        }
    }
    assert!(!feed.windows.is_empty());
    let (held, raw) = feed.assembler.memory();
    assert!(raw > 0);
    assert!(
        held as f64 <= 1.5 * raw as f64,
        "{held} bytes held for {raw} bytes of tensor ({:.2}x)",
        held as f64 / raw as f64
    );
}
