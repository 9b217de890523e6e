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

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
/// owner (`[detect.changelog]`): the divergence baselines (a day to learn), the floors and
/// ceilings (days) and the SPOT thresholds (`spot_init_windows` windows to fit); to the next
/// owner also the incidents, pending or open, so that an incident goes on under its id.
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
    /// Per cell, its nodes' time-of-day ceilings (`[detect.floor] ceiling`).
    #[serde(default)]
    pub ceilings: BTreeMap<String, Vec<FloorEntry>>,
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
    /// Cells whose time-of-day floors (and ceilings) were taken over.
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
            let outside = floors.observe(window);
            score.below_floor = outside.below_floor;
            score.above_ceiling = outside.above_ceiling;
        }
        let (threshold, above) = match self.config.threshold_policy {
            ThresholdPolicy::Static => {
                let t = self.detector.threshold();
                (t, severity(score.score, t).is_some())
            }
            ThresholdPolicy::Spot => self.spot_step(&window.cell, score.score),
        };
        // A sensor fault (flatline, spike, divergence, floor, ceiling) makes the window
        // anomalous under either policy.
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
            && state.ceilings.is_empty()
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
        let ceilings = cells()
            .filter_map(|(cell, state)| Some((cell, state.floor.as_ref()?.ceiling_entries())))
            .filter(|(_, entries)| !entries.is_empty())
            .map(|(cell, entries)| (cell.to_string(), entries))
            .collect();
        JudgeState {
            channels: self.detector.channels.clone(),
            saved_at_ms,
            divergence,
            model_hash: self.detector.model_hash.clone(),
            spot,
            floors,
            ceilings,
            incidents: BTreeMap::new(),
        }
    }

    /// Takes over a saved state at `now_ms` (wall clock), each part where it fits: the
    /// divergence baselines, which need the check on, the same model channels and a state no
    /// older than the check's memory; the SPOT states, which need the same model file (or a
    /// re-export of it, [`Detector::fits_file`]) and the same `[detect.spot]` settings; the
    /// incidents, which need incidents on and the same model file (their scores and ids are
    /// that model's).
    pub fn restore(&mut self, state: JudgeState, now_ms: i64) -> Restored {
        let spot = self.restore_spot(&state.model_hash, state.spot);
        let incidents = self.restore_incidents(&state.model_hash, state.incidents);
        let floors = self.restore_floors(&state.channels, state.floors, state.ceilings);
        let divergence =
            self.restore_divergence(state.channels, state.saved_at_ms, state.divergence, now_ms);
        Restored {
            divergence,
            spot,
            incidents,
            floors,
        }
    }

    /// Takes over saved floors and ceilings: refused when the check is off or the model's
    /// channels are not the ones they were saved with; slots of another `[detect.floor] slot`
    /// are left out, and ceilings when no `ceiling` is set.
    fn restore_floors(
        &mut self,
        channels: &[String],
        mut floors: BTreeMap<String, Vec<FloorEntry>>,
        mut ceilings: BTreeMap<String, Vec<FloorEntry>>,
    ) -> Result<usize, String> {
        if floors.is_empty() && ceilings.is_empty() {
            return Ok(0);
        }
        let Some(config) = self.config.floor.clone() else {
            return Err("[detect.floor] is off".into());
        };
        self.has_channels(channels)?;
        let cells: BTreeSet<String> = floors.keys().chain(ceilings.keys()).cloned().collect();
        let mut restored = 0;
        for cell in cells {
            let mut bounds = self.detector.floors(&config);
            bounds.adopt(floors.remove(&cell).unwrap_or_default());
            bounds.adopt_ceilings(ceilings.remove(&cell).unwrap_or_default());
            if !bounds.is_empty() {
                restored += 1;
                self.adopt_floors(&Arc::from(cell), bounds);
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
        if !self.detector.fits_file(model_hash) {
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
        if !self.detector.fits_file(model_hash) {
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
mod tests;
