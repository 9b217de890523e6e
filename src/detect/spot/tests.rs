use super::*;

/// SplitMix64: a small seeded generator, so the tests need no `rand`.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform on (0, 1), both ends excluded.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn exponential(&mut self) -> f64 {
        -self.uniform().ln()
    }

    /// Generalised Pareto with scale 1 and shape `gamma` (≠ 0), by inversion.
    fn pareto(&mut self, gamma: f64) -> f64 {
        (self.uniform().powf(-gamma) - 1.0) / gamma
    }
}

fn exponentials(seed: u64, count: usize) -> Vec<f64> {
    let mut rng = SplitMix(seed);
    (0..count).map(|_| rng.exponential()).collect()
}

fn config(risk: f64) -> SpotConfig {
    SpotConfig {
        risk,
        ..SpotConfig::default()
    }
}

#[test]
fn exponential_calibration_gives_the_true_quantile() {
    let spot = Spot::fit(config(1e-3), &exponentials(1, 20_000)).unwrap();
    let truth = -(1e-3f64).ln();
    let error = (spot.threshold() - truth).abs() / truth;
    assert!(error < 0.1, "z_q {} vs {truth}", spot.threshold());
    // The 98 % quantile of Exp(1) is ln 50 ≈ 3.91.
    assert!((spot.initial_threshold() - 50f64.ln()).abs() < 0.15);
    assert!(spot.shape().abs() < 0.1, "shape {}", spot.shape());
}

#[test]
fn pareto_tails_give_their_shape() {
    for (seed, gamma) in [(2, 0.2), (3, 0.5), (4, -0.2)] {
        let mut rng = SplitMix(seed);
        let sample: Vec<f64> = (0..50_000).map(|_| rng.pareto(gamma)).collect();
        let config = SpotConfig {
            init_level: 0.95,
            ..config(1e-3)
        };
        let spot = Spot::fit(config, &sample).unwrap();
        assert!(
            (spot.shape() - gamma).abs() < 0.1,
            "fitted shape {} for {gamma}",
            spot.shape()
        );
        // Over t the excesses are GPD with scale 1 + γt.
        let scale = 1.0 + gamma * spot.initial_threshold();
        assert!((spot.scale() / scale - 1.0).abs() < 0.15);
    }
}

#[test]
fn stationary_stream_flags_about_the_risk() {
    let risk = 1e-3;
    let mut spot = Spot::fit(config(risk), &exponentials(5, 20_000)).unwrap();
    let initial = spot.threshold();
    let mut twin = spot.clone();
    let stream = exponentials(6, 200_000);
    let (mut anomalies, mut above_initial) = (0usize, 0usize);
    for &x in &stream {
        let verdict = spot.step(x);
        anomalies += usize::from(verdict == Verdict::Anomaly);
        above_initial += usize::from(x > initial);
        // Deterministic: a copy fed the same stream agrees bit for bit.
        assert_eq!(twin.step(x), verdict);
    }
    assert_eq!(spot.threshold().to_bits(), twin.threshold().to_bits());
    let expected = risk * stream.len() as f64;
    // The fitted quantile itself is right: within a factor 2 of q.
    let rate = above_initial as f64 / expected;
    assert!(
        (0.5..=2.0).contains(&rate),
        "{above_initial} above z_q, {expected} expected"
    );
    // Adapting, SPOT flags more, as anomalies never enter the tail fit (see the module
    // doc): 423 here, 2.1 q; within a factor 3.
    let rate = anomalies as f64 / expected;
    assert!(
        (0.5..=3.0).contains(&rate),
        "{anomalies} anomalies, {expected} expected"
    );
}

#[test]
fn dspot_follows_a_drift_that_spot_flags() {
    // Exp(1) noise on a baseline rising by 8 over the stream.
    let noise = exponentials(7, 22_000);
    let drifting: Vec<f64> = noise
        .iter()
        .enumerate()
        .map(|(i, x)| x + 4e-4 * i as f64)
        .collect();
    let (calibration, stream) = drifting.split_at(2_000);
    let base = SpotConfig {
        max_peaks: 500,
        ..config(1e-3)
    };
    let mut spot = Spot::fit(base.clone(), calibration).unwrap();
    let dspot_config = SpotConfig { depth: 20, ..base };
    let mut dspot = Spot::fit(dspot_config, calibration).unwrap();
    let count = |spot: &mut Spot| {
        stream
            .iter()
            .filter(|&&x| spot.step(x) == Verdict::Anomaly)
            .count()
    };
    let (flagged, flagged_dspot) = (count(&mut spot), count(&mut dspot));
    assert!(
        flagged_dspot * 10 < flagged,
        "SPOT {flagged}, DSPOT {flagged_dspot}"
    );
    assert!(flagged_dspot < 100, "DSPOT {flagged_dspot}");
    // DSPOT's threshold moved up with the baseline.
    assert!(dspot.threshold() > 8.0);
    assert!(dspot.baseline.as_ref().unwrap().values.len() == 20);
}

#[test]
fn bad_calibration_is_refused_not_a_panic() {
    let too_few = |found| SpotError::TooFewValues {
        found,
        needed: MIN_CALIBRATION,
    };
    assert_eq!(
        Spot::fit(SpotConfig::default(), &[]).unwrap_err(),
        too_few(0)
    );
    assert_eq!(
        Spot::fit(SpotConfig::default(), &[f64::NAN; 1_000]).unwrap_err(),
        too_few(0)
    );
    let infinities = [f64::INFINITY, f64::NEG_INFINITY].repeat(500);
    assert_eq!(
        Spot::fit(SpotConfig::default(), &infinities).unwrap_err(),
        too_few(0)
    );
    assert_eq!(
        Spot::fit(SpotConfig::default(), &[1.0; 99]).unwrap_err(),
        too_few(99)
    );
    assert_eq!(
        Spot::fit(SpotConfig::default(), &[3.5; 10_000]).unwrap_err(),
        SpotError::TooFewPeaks {
            found: 0,
            needed: MIN_PEAKS
        }
    );
    // DSPOT needs `depth` scores more.
    let dspot = SpotConfig {
        depth: usize::MAX,
        ..SpotConfig::default()
    };
    assert!(matches!(
        Spot::fit(dspot, &exponentials(8, 1_000)),
        Err(SpotError::TooFewValues {
            found: 1_000,
            needed: usize::MAX
        })
    ));
    for bad in [
        SpotConfig {
            risk: 0.0,
            ..SpotConfig::default()
        },
        SpotConfig {
            risk: f64::NAN,
            ..SpotConfig::default()
        },
        SpotConfig {
            risk: 0.05,
            ..SpotConfig::default()
        },
        SpotConfig {
            init_level: 1.0,
            ..SpotConfig::default()
        },
        SpotConfig {
            init_level: f64::NAN,
            ..SpotConfig::default()
        },
        SpotConfig {
            max_peaks: 0,
            ..SpotConfig::default()
        },
    ] {
        let error = Spot::fit(bad, &exponentials(9, 1_000)).unwrap_err();
        assert!(matches!(error, SpotError::InvalidConfig(_)), "{error}");
    }
}

#[test]
fn non_finite_scores_are_skipped() {
    let clean = exponentials(10, 5_000);
    let mut dirty = Vec::new();
    for (i, &x) in clean.iter().enumerate() {
        dirty.push(x);
        if i % 7 == 0 {
            dirty.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
        }
    }
    let mut spot = Spot::fit(config(1e-3), &dirty).unwrap();
    let reference = Spot::fit(config(1e-3), &clean).unwrap();
    assert_eq!(spot.threshold().to_bits(), reference.threshold().to_bits());
    // In the stream: Normal, and nothing changes.
    for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert_eq!(spot.step(x), Verdict::Normal);
    }
    assert_eq!(spot.seen, reference.seen);
    assert_eq!(spot.threshold().to_bits(), reference.threshold().to_bits());
    // Extreme finite scores neither panic nor make the threshold NaN.
    let mut dspot = Spot::fit(
        SpotConfig {
            depth: 5,
            ..config(1e-3)
        },
        &clean,
    )
    .unwrap();
    for x in [
        f64::MAX,
        -f64::MAX,
        f64::MIN_POSITIVE,
        0.0,
        -0.0,
        1e300,
        -1e300,
    ] {
        spot.step(x);
        dspot.step(x);
        for threshold in [
            spot.threshold(),
            spot.initial_threshold(),
            dspot.threshold(),
        ] {
            assert!(!threshold.is_nan());
        }
    }
    // Nor leave a value JSON cannot hold (serde_json writes NaN and ±∞ as null, which does not
    // read back as a number): the state file and the changelog records keep the tails.
    for kept in [&spot, &dspot] {
        let json = serde_json::to_string(kept).unwrap();
        let back: Spot = serde_json::from_str(&json).expect("the state reads back");
        assert_eq!(back.threshold().to_bits(), kept.threshold().to_bits());
    }
}

#[test]
fn max_peaks_bounds_memory() {
    let config = SpotConfig {
        max_peaks: 50,
        ..config(1e-3)
    };
    let mut spot = Spot::fit(config, &exponentials(11, 20_000)).unwrap();
    // t is the score at rank 19 600 of 20 000: 399 calibration peaks, the newest 50 kept.
    assert_eq!(spot.peak_count(), 50);
    assert_eq!(spot.peaks_seen, 399);
    let mut peaks = 0u64;
    for x in exponentials(12, 20_000) {
        peaks += u64::from(spot.step(x) == Verdict::Peak);
        assert!(spot.peak_count() <= 50);
    }
    assert!(peaks > 200);
    assert_eq!(spot.peak_count(), 50);
    assert_eq!(spot.peaks_seen, 399 + peaks);
    assert!(spot.scratch.capacity() <= 64);
}

#[test]
fn config_defaults_and_unknown_fields() {
    use serde::de::value::{Error, MapDeserializer};
    let parse = |pairs: Vec<(&'static str, f64)>| {
        SpotConfig::deserialize(MapDeserializer::<_, Error>::new(pairs.into_iter()))
    };
    assert_eq!(parse(vec![]).unwrap(), SpotConfig::default());
    let config = parse(vec![("risk", 1e-3)]).unwrap();
    assert_eq!(config.risk, 1e-3);
    assert_eq!(config.max_peaks, 2_000);
    assert!(parse(vec![("riks", 1e-3)]).is_err());
    SpotConfig::default().validate().unwrap();
}
