//! judge: the threshold policy and the incidents on top of the [`Detector`]'s scores.
//!
//! Invariants:
//! - Under the `static` policy a window is anomalous iff its score reaches the detector's
//!   threshold or a sensor check found a fault (flatline, spike, or the judge's divergence
//!   check), and every anomalous window is an event: without divergence, exactly what the
//!   detector alone does. Under either policy such a window is anomalous.
//! - Under the `spot` policy each cell has its own streaming peaks-over-threshold threshold
//!   ([`Spot`]). Until the cell has one — fitted on its first `spot_init_windows` scores, or by
//!   [`Judge::calibrate`] — the model's calibrated threshold decides. SPOT's state is this
//!   instance's: a rebalance or a new model starts it again from the calibration, and so does
//!   a restart unless a saved [`JudgeState`] of the same model and settings is restored.
//! - With `[detect.divergence]` each cell keeps its nodes' baselines ([`Divergence`]), fed every
//!   window the judge sees; a node found diverged makes the window anomalous under either
//!   policy. That state is this instance's too, but a judge for a new model takes it over
//!   ([`Judge::for_model`]): it does not depend on the model.
//! - With incidents on, an anomalous window is published only when its cell's
//!   [`IncidentTracker`] reports a transition (OPEN, UPDATE), and the window that closes an
//!   incident is published as its CLOSE although it is normal. Incident state is this
//!   instance's too: after a restart mid-incident the incident is opened again, under the id of
//!   the first anomalous window the new instance sees.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::divergence::{BaselineEntry, Divergence};
use super::floor::{FloorEntry, Floors};
use super::incident::{IncidentState, IncidentTracker, Observation, Status, Transition};
use super::spot::{Spot, Verdict};
use super::{Detector, Score, severity};
use crate::assemble::Window;
use crate::config::{DetectConfig, ThresholdPolicy};
use crate::schema::{AnomalyEvent, Incident, IncidentStatus};

/// What the judge made of one window.
#[derive(Debug, Clone)]
pub struct Judgement {
    pub score: Score,
    pub threshold: f64,
    pub anomalous: bool,
    /// What to publish, if anything.
    pub event: Option<AnomalyEvent>,
}

#[derive(Default)]
struct CellThreshold {
    warmup: Vec<f64>,
    spot: Option<Spot>,
    /// The fit failed (too few peaks): this cell stays on the static threshold.
    failed: bool,
    divergence: Option<Divergence>,
    floor: Option<Floors>,
}

/// What a judge keeps across a graceful restart (`[detect] state_file`) and hands a cell's next
/// owner (`[detect.changelog]`): the divergence baselines (a day to learn), the floors (days)
/// and the SPOT thresholds (`spot_init_windows` windows to fit); to the next owner also the
/// incidents, pending or open, so that an incident goes on under its id.
#[derive(Clone, Serialize, Deserialize)]
pub struct JudgeState {
    /// The model channels the baselines' channel indices refer to.
    pub channels: Vec<String>,
    /// When it was saved (wall clock, ms since the epoch).
    pub saved_at_ms: i64,
    /// Per cell, its nodes' divergence baselines.
    pub divergence: BTreeMap<String, Vec<BaselineEntry>>,
    /// The model the SPOT states were fitted to (its ONNX file's SHA-256).
    #[serde(default)]
    pub model_hash: String,
    /// Per cell, its SPOT state (`threshold_policy = "spot"` only).
    #[serde(default)]
    pub spot: BTreeMap<String, SpotState>,
    /// Per cell, its nodes' time-of-day floors (`[detect.floor]`).
    #[serde(default)]
    pub floors: BTreeMap<String, Vec<FloorEntry>>,
    /// Per cell, its pending or open incident (`[detect.incidents]`, changelog records only).
    /// Saved only where every transition of the cell is acknowledged, so that the windows it
    /// has taken are ones whose events are out.
    #[serde(default)]
    pub incidents: BTreeMap<String, IncidentState>,
}

/// One cell's SPOT state: the scores collected towards its fit, or its fitted tail.
#[derive(Clone, Serialize, Deserialize)]
pub struct SpotState {
    warmup: Vec<f64>,
    spot: Option<Spot>,
    failed: bool,
}

/// What [`Judge::restore`] took over of a saved state, or why not, per part.
#[derive(Debug, PartialEq)]
pub struct Restored {
    /// Cells whose divergence baselines were taken over.
    pub divergence: Result<usize, String>,
    /// Cells whose SPOT state was taken over.
    pub spot: Result<usize, String>,
    /// Cells whose pending or open incident was taken over.
    pub incidents: Result<usize, String>,
    /// Cells whose time-of-day floors were taken over.
    pub floors: Result<usize, String>,
}

impl Restored {
    /// Each part, named as logs and the `part` label of the restore counters name it.
    pub fn parts(&self) -> [(&'static str, &Result<usize, String>); 4] {
        [
            ("divergence baselines", &self.divergence),
            ("SPOT thresholds", &self.spot),
            ("time-of-day floors", &self.floors),
            ("incidents", &self.incidents),
        ]
    }
}

/// Thresholds per cell and incidents, for one model.
pub struct Judge {
    detector: Detector,
    config: DetectConfig,
    cells: HashMap<Arc<str>, CellThreshold>,
    incidents: Option<IncidentTracker>,
}

impl Judge {
    pub fn new(detector: Detector, config: &DetectConfig) -> Self {
        let incidents = config.incidents.clone().map(|c| {
            IncidentTracker::new(c, detector.model_name.clone())
                .expect("incident configuration is validated with the config")
        });
        Self {
            detector,
            config: config.clone(),
            cells: HashMap::new(),
            incidents,
        }
    }

    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    /// Fits `cell`'s SPOT threshold on calibration scores now (an offline evaluation's fit
    /// range), instead of on the cell's first windows. Returns the fit's error, if any; the
    /// cell then stays on the static threshold.
    pub fn calibrate(&mut self, cell: &Arc<str>, scores: &[f64]) -> Result<(), String> {
        let state = self.cells.entry(Arc::clone(cell)).or_default();
        match Spot::fit(self.config.spot.clone(), scores) {
            Ok(spot) => {
                state.spot = Some(spot);
                Ok(())
            }
            Err(e) => {
                state.failed = true;
                Err(e.to_string())
            }
        }
    }

    /// The judge for windows scored by `model`: this one if it is for that model already, else
    /// [`Judge::for_model`] with a detector for `model` under the same settings.
    pub fn for_contract(self, model: &crate::infer::ModelContract) -> Self {
        if self.detector.is_for(model) {
            return self;
        }
        let detector = Detector::new(model, &self.config);
        self.for_model(detector)
    }

    /// The judge for another model (a hot reload): thresholds and incidents start again, since
    /// they are the old model's scores; the divergence baselines carry over, since they compare
    /// sensors with each other (their floors stay the old contract's channel deviations).
    pub fn for_model(self, detector: Detector) -> Self {
        let mut next = Judge::new(detector, &self.config);
        for (cell, state) in self.cells {
            if let Some(divergence) = state.divergence {
                next.adopt_divergence(&cell, divergence);
            }
            if let Some(floors) = state.floor {
                next.adopt_floors(&cell, floors);
            }
        }
        next
    }

    /// Hands `cell` divergence baselines that learnt elsewhere (an offline evaluation's fit
    /// range), instead of starting them on the cell's first window here.
    pub fn adopt_divergence(&mut self, cell: &Arc<str>, divergence: Divergence) {
        self.cells.entry(Arc::clone(cell)).or_default().divergence = Some(divergence);
    }

    /// Hands `cell` floors that learnt elsewhere (an offline evaluation's fit range).
    pub fn adopt_floors(&mut self, cell: &Arc<str>, floors: Floors) {
        self.cells.entry(Arc::clone(cell)).or_default().floor = Some(floors);
    }

    /// The threshold `cell` is judged by now.
    pub fn threshold_of(&self, cell: &str) -> f64 {
        match self.cells.get(cell).and_then(|c| c.spot.as_ref()) {
            Some(spot) if self.config.threshold_policy == ThresholdPolicy::Spot => spot.threshold(),
            _ => self.detector.threshold(),
        }
    }

    /// Scores `window`, decides whether it is anomalous, and what to publish.
    pub fn judge(&mut self, window: &Window, reconstruction: &[f32]) -> Judgement {
        let mut score = self.detector.score(window, reconstruction);
        if let Some(config) = self.config.divergence.as_ref() {
            let state = self.cells.entry(Arc::clone(&window.cell)).or_default();
            let divergence = state
                .divergence
                .get_or_insert_with(|| self.detector.divergence(config));
            score.diverged = divergence.observe(window);
        }
        if let Some(config) = self.config.floor.as_ref() {
            let state = self.cells.entry(Arc::clone(&window.cell)).or_default();
            let floors = state
                .floor
                .get_or_insert_with(|| self.detector.floors(config));
            score.below_floor = floors.observe(window);
        }
        let (threshold, above) = match self.config.threshold_policy {
            ThresholdPolicy::Static => {
                let t = self.detector.threshold();
                (t, severity(score.score, t).is_some())
            }
            ThresholdPolicy::Spot => self.spot_step(&window.cell, score.score),
        };
        // A sensor fault (flatline, spike, divergence) makes the window anomalous under either
        // policy.
        let anomalous = above || score.has_sensor_fault();
        let mut event = anomalous.then(|| self.detector.event(window, &score, threshold));
        if let Some(tracker) = self.incidents.as_mut() {
            let observation = event.as_ref().map(|e| Observation {
                score: score.score,
                severity_rank: e.severity as u8,
            });
            match tracker.observe(&window.cell, window.end_ms, observation) {
                None => event = None,
                Some(t) => {
                    let mut e = event
                        .take()
                        .unwrap_or_else(|| self.detector.event(window, &score, threshold));
                    if t.status == Status::Close {
                        // A normal window closes the incident: it reports the incident's peak.
                        e.severity = severity(t.peak_score, threshold)
                            .unwrap_or(crate::schema::Severity::Low);
                    }
                    e.incident = Some(incident(&t));
                    event = Some(e);
                }
            }
        }
        Judgement {
            score,
            threshold,
            anomalous,
            event,
        }
    }

    fn spot_step(&mut self, cell: &Arc<str>, score: f64) -> (f64, bool) {
        let fixed = self.detector.threshold();
        let init = self.config.spot_init_windows;
        let state = self.cells.entry(Arc::clone(cell)).or_default();
        if let Some(spot) = state.spot.as_mut() {
            let threshold = spot.threshold();
            return (threshold, spot.step(score) == Verdict::Anomaly);
        }
        let anomalous = severity(score, fixed).is_some();
        if !state.failed && !anomalous && score.is_finite() {
            state.warmup.push(score);
            if state.warmup.len() >= init {
                match Spot::fit(self.config.spot.clone(), &state.warmup) {
                    Ok(spot) => state.spot = Some(spot),
                    Err(error) => {
                        tracing::warn!(cell = %cell, %error, "SPOT could not be fitted; the cell keeps the static threshold.");
                        state.failed = true;
                    }
                }
                state.warmup = Vec::new();
            }
        }
        (fixed, anomalous)
    }

    /// What this judge has learnt that is worth keeping across a graceful restart: thresholds
    /// and baselines. Not the incidents: the file stays on disk after the start that read it,
    /// and a later start (after a crash) would take over incidents the run in between went on
    /// with and closed.
    pub fn state(&self, saved_at_ms: i64) -> JudgeState {
        self.state_of(saved_at_ms, || self.cells.iter())
    }

    /// What this judge holds of `cell` alone (its record in the state changelog), its
    /// incident only `with_incident` (every transition of the cell acknowledged), or `None`
    /// when that is nothing.
    pub fn cell_state(
        &self,
        cell: &str,
        saved_at_ms: i64,
        with_incident: bool,
    ) -> Option<JudgeState> {
        let mut state = self.state_of(saved_at_ms, || self.cells.get_key_value(cell).into_iter());
        if with_incident && let Some(incident) = self.incidents.as_ref().and_then(|t| t.state(cell))
        {
            state.incidents.insert(cell.to_owned(), incident);
        }
        let empty = state.divergence.is_empty()
            && state.spot.is_empty()
            && state.floors.is_empty()
            && state.incidents.is_empty();
        (!empty).then_some(state)
    }

    /// The thresholds and baselines of the cells `cells` yields (called once per part).
    fn state_of<'a, I>(&'a self, saved_at_ms: i64, cells: impl Fn() -> I) -> JudgeState
    where
        I: Iterator<Item = (&'a Arc<str>, &'a CellThreshold)>,
    {
        let divergence = cells()
            .filter_map(|(cell, state)| Some((cell.to_string(), state.divergence.as_ref()?)))
            .map(|(cell, d)| (cell, d.baselines()))
            .collect();
        let spot = cells()
            .filter(|(_, s)| s.spot.is_some() || !s.warmup.is_empty() || s.failed)
            .map(|(cell, s)| {
                let state = SpotState {
                    warmup: s.warmup.clone(),
                    spot: s.spot.clone(),
                    failed: s.failed,
                };
                (cell.to_string(), state)
            })
            .collect();
        let floors = cells()
            .filter_map(|(cell, state)| Some((cell.to_string(), state.floor.as_ref()?.entries())))
            .collect();
        JudgeState {
            channels: self.detector.channels.clone(),
            saved_at_ms,
            divergence,
            model_hash: self.detector.model_hash.clone(),
            spot,
            floors,
            incidents: BTreeMap::new(),
        }
    }

    /// Takes over a saved state at `now_ms` (wall clock), each part where it fits: the
    /// divergence baselines, which need the check on, the same model channels and a state no
    /// older than the check's memory; the SPOT states, which need the same model file and the
    /// same `[detect.spot]` settings; the incidents, which need incidents on and the same
    /// model file (their scores and ids are that model's).
    pub fn restore(&mut self, state: JudgeState, now_ms: i64) -> Restored {
        let spot = self.restore_spot(&state.model_hash, state.spot);
        let incidents = self.restore_incidents(&state.model_hash, state.incidents);
        let floors = self.restore_floors(&state.channels, state.floors);
        let divergence =
            self.restore_divergence(state.channels, state.saved_at_ms, state.divergence, now_ms);
        Restored {
            divergence,
            spot,
            incidents,
            floors,
        }
    }

    /// Takes over saved floors: refused when the check is off or the model's channels are not
    /// the ones they were saved with; slots of another `[detect.floor] slot` are left out.
    fn restore_floors(
        &mut self,
        channels: &[String],
        cells: BTreeMap<String, Vec<FloorEntry>>,
    ) -> Result<usize, String> {
        if cells.is_empty() {
            return Ok(0);
        }
        let Some(config) = self.config.floor.clone() else {
            return Err("[detect.floor] is off".into());
        };
        self.has_channels(channels)?;
        let mut restored = 0;
        for (cell, entries) in cells {
            let mut floors = self.detector.floors(&config);
            floors.adopt(entries);
            if !floors.is_empty() {
                restored += 1;
                self.adopt_floors(&Arc::from(cell), floors);
            }
        }
        if restored == 0 {
            return Err("they were saved with another [detect.floor] slot".into());
        }
        Ok(restored)
    }

    fn restore_incidents(
        &mut self,
        model_hash: &str,
        cells: BTreeMap<String, IncidentState>,
    ) -> Result<usize, String> {
        if cells.is_empty() {
            return Ok(0);
        }
        let Some(tracker) = self.incidents.as_mut() else {
            return Err("[detect.incidents] is off".into());
        };
        if model_hash != self.detector.model_hash {
            return Err("the incidents were opened by another model".into());
        }
        let restored = cells.len();
        for (cell, state) in cells {
            tracker.adopt(&Arc::from(cell), state);
        }
        Ok(restored)
    }

    fn restore_spot(
        &mut self,
        model_hash: &str,
        cells: BTreeMap<String, SpotState>,
    ) -> Result<usize, String> {
        if cells.is_empty() {
            return Ok(0);
        }
        if self.config.threshold_policy != ThresholdPolicy::Spot {
            return Err("threshold_policy is not \"spot\" any more".into());
        }
        if model_hash != self.detector.model_hash {
            return Err("the SPOT thresholds were fitted to another model".into());
        }
        let config = &self.config.spot;
        if cells
            .values()
            .any(|s| s.spot.as_ref().is_some_and(|s| s.config() != config))
        {
            return Err("[detect.spot] changed since the SPOT thresholds were fitted".into());
        }
        let restored = cells.len();
        for (cell, s) in cells {
            let state = self.cells.entry(Arc::from(cell)).or_default();
            (state.warmup, state.spot, state.failed) = (s.warmup, s.spot, s.failed);
        }
        Ok(restored)
    }

    /// Takes over saved divergence baselines. Refused, with the reason, when the check is
    /// off, when the model's channels are not the ones they were saved with, or when they
    /// are older than the check's memory (they would judge today by what was usual then).
    /// Returns the cells restored.
    fn restore_divergence(
        &mut self,
        channels: Vec<String>,
        saved_at_ms: i64,
        cells: BTreeMap<String, Vec<BaselineEntry>>,
        now_ms: i64,
    ) -> Result<usize, String> {
        if cells.is_empty() {
            return Ok(0);
        }
        let Some(config) = self.config.divergence.clone() else {
            return Err("[detect.divergence] is off".into());
        };
        self.has_channels(&channels)?;
        let age_ms = now_ms.saturating_sub(saved_at_ms);
        if age_ms > config.memory.as_millis() as i64 {
            return Err(format!(
                "they are {} old, more than [detect.divergence] memory ({})",
                humantime::format_duration(std::time::Duration::from_secs(age_ms as u64 / 1000)),
                humantime::format_duration(config.memory)
            ));
        }
        let restored = cells.len();
        for (cell, entries) in cells {
            let mut divergence = self.detector.divergence(&config);
            divergence.adopt(entries);
            self.adopt_divergence(&Arc::from(cell), divergence);
        }
        Ok(restored)
    }

    /// Closes the incident of `cell` taken over from its last owner when the window about to be
    /// judged, starting at `window_start_ms`, does not overlap the last window the incident
    /// took: the windows between were judged elsewhere (and may have closed it) or there were
    /// none (the cell was silent), so it is closed as a silent cell's is (see
    /// [`Judge::expire`]). Returns that CLOSE.
    pub fn close_if_apart(
        &mut self,
        cell: &Arc<str>,
        window_start_ms: i64,
    ) -> Option<AnomalyEvent> {
        let last_end_ms = self.incidents.as_ref()?.last_window_end(cell)?;
        if window_start_ms <= last_end_ms {
            return None;
        }
        self.expire(cell, window_start_ms)
    }

    /// Refuses state saved for other model channels than this judge's: its channel indices
    /// would point at other channels.
    fn has_channels(&self, channels: &[String]) -> Result<(), String> {
        if channels != self.detector.channels {
            return Err(format!(
                "they were saved for channels {channels:?}, the model has {:?}",
                self.detector.channels
            ));
        }
        Ok(())
    }

    /// Whether this judge holds a threshold, baselines or an incident of `cell`.
    pub fn has_state(&self, cell: &str) -> bool {
        self.cells.contains_key(cell) || (self.incidents.as_ref()).is_some_and(|t| t.holds(cell))
    }

    /// Cells with judge state: a threshold, divergence baselines or an incident.
    pub fn cell_count(&self) -> usize {
        let incidents_only = self.incidents.as_ref().map_or(0, |t| {
            t.cells().filter(|c| !self.cells.contains_key(*c)).count()
        });
        self.cells.len() + incidents_only
    }

    /// Ends the incident of `cell`, which fell silent at `at_ms` (event time): no window will
    /// come to close it. Returns the CLOSE event of an open incident. It stands for the
    /// silence from the incident's last window to `at_ms`: no score, no contributors, the
    /// incident's peak severity, and an event id of its own. The cell's thresholds and
    /// baselines stay, for when it speaks again.
    pub fn expire(&mut self, cell: &Arc<str>, at_ms: i64) -> Option<AnomalyEvent> {
        let (transition, last_end_ms) = self.incidents.as_mut()?.expire(cell)?;
        let silence = Window {
            cell: Arc::clone(cell),
            start_ms: last_end_ms,
            end_ms: at_ms.max(last_end_ms + 1),
            nodes: Vec::new(),
            values: Vec::new(),
            mask: Vec::new(),
            missing_fraction: 1.0,
            holds: Vec::new(),
            closed_at: std::time::Instant::now(),
        };
        let threshold = self.threshold_of(cell);
        let mut event = self.detector.event(&silence, &Score::default(), threshold);
        event.severity =
            severity(transition.peak_score, threshold).unwrap_or(crate::schema::Severity::Low);
        event.incident = Some(incident(&transition));
        Some(event)
    }

    /// Forgets a cell (its partition was revoked).
    pub fn forget(&mut self, cell: &str) {
        self.cells.remove(cell);
        if let Some(t) = self.incidents.as_mut() {
            t.forget(cell);
        }
    }
}

fn incident(t: &Transition) -> Incident {
    Incident {
        incident_id: t.incident_id.clone(),
        status: match t.status {
            Status::Open => IncidentStatus::Open,
            Status::Update => IncidentStatus::Update,
            Status::Close => IncidentStatus::Close,
        },
        opened_at_ms: t.opened_at_ms,
        windows: i32::try_from(t.windows).unwrap_or(i32::MAX),
        peak_score: t.peak_score,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Severity;

    /// One node, one channel, two steps of which the last is scored; threshold 2. A window
    /// whose reconstruction of the last step is `r` scores `r²`.
    fn detector() -> Detector {
        let contract =
            crate::detect::test_support::contract("1", (2, 1, 1), &["a"], vec![1.0], 2.0);
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

    #[test]
    fn a_new_model_keeps_the_divergence_baselines() {
        let config = divergence_config();
        let mut judge = Judge::new(three_node_detector("1", &config), &config);
        for end_s in 2..200 {
            judge.judge(&three_nodes(end_s, usual_z(end_s)), &[0.0; 6]);
        }
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
                event.below_floor[0].floor
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
        let mut judge = Judge::new(three_node_detector("1", &config), &config);
        for end_s in 2..200 {
            judge.judge(&three_nodes(end_s, usual_z(end_s)), &[0.0; 6]);
        }
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
    fn a_forgotten_cell_starts_over() {
        let config = DetectConfig {
            incidents: Some(crate::detect::incident::IncidentConfig {
                open_after: 1,
                ..Default::default()
            }),
            ..divergence_config()
        };
        let mut judge = Judge::new(three_node_detector("1", &config), &config);
        for end_s in 2..200 {
            judge.judge(&three_nodes(end_s, usual_z(end_s)), &[0.0; 6]);
        }
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
            .map(|(end_s, score): (i64, f64)| {
                next.judge(&window(end_s), &[0.0, score.sqrt() as f32])
            })
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
}
