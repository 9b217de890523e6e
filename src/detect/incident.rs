//! incident: consecutive anomalous windows of one cell → one incident with a stable id,
//! reported as OPEN, UPDATE and CLOSE transitions, so a consumer gets one alert per incident
//! rather than one per window.
//!
//! Invariants:
//! - Per cell, windows are taken in increasing `window_end_ms`. A window whose end is not after
//!   the last one taken for that cell is ignored: nothing changes and `observe` returns `None`.
//!   Only a cell with a pending or open incident remembers its last window, so a stale window
//!   of a cell without one is taken as new.
//! - "Consecutive" means consecutive windows taken for the cell; a gap in event time is not a
//!   normal window.
//! - OPEN is emitted at the `open_after`-th consecutive anomalous window, and `opened_at_ms` is
//!   the end of the first of them; a normal window before then drops the streak silently.
//! - An open incident stays open through fewer than `close_after` consecutive normal windows;
//!   the `close_after`-th emits CLOSE and the cell's state is removed.
//! - UPDATE is emitted at an anomalous window of an open incident when its severity is above
//!   every earlier one of the incident, or when it is the `update_every`-th anomalous window
//!   since the last OPEN or UPDATE (never, for `update_every = 0`). At most one transition per
//!   window.
//! - The incident id is a UUIDv5 of (scope, cell, `opened_at_ms`) only, so replaying the same
//!   windows gives the same ids, and every transition of an incident carries the same id.
//! - Memory: state exists only for cells with a pending or open incident; CLOSE,
//!   [`IncidentTracker::expire`] (the cell fell silent: an open incident gets its CLOSE) and
//!   [`IncidentTracker::forget`] (its partition was revoked: no transition) remove it. No clocks, no randomness, no iteration over the state: the
//!   transitions are a function of the windows observed.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::SettingError;

/// Namespace of incident ids (UUIDv5).
const INCIDENT_NAMESPACE: uuid::Uuid = uuid::uuid!("b3d85f0e-2c49-5e17-8a6d-41f9c07e2a93");

/// Deterministic id of the incident of `cell` whose first anomalous window ended at
/// `opened_at_ms`, within `scope` (for example the model name).
pub fn incident_id(scope: &str, cell: &str, opened_at_ms: i64) -> String {
    let name = format!("{scope}\u{1f}{cell}\u{1f}{opened_at_ms}");
    uuid::Uuid::new_v5(&INCIDENT_NAMESPACE, name.as_bytes()).to_string()
}

/// When incidents open, report and close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentConfig {
    /// Consecutive anomalous windows that open an incident; at least 1.
    #[serde(default = "default_open_after")]
    pub open_after: u32,
    /// Consecutive normal windows that close an open incident; at least 1.
    #[serde(default = "default_close_after")]
    pub close_after: u32,
    /// While open, an UPDATE every this many anomalous windows (and always when the severity
    /// rises); 0: only when the severity rises.
    #[serde(default = "default_update_every")]
    pub update_every: u32,
}

fn default_open_after() -> u32 {
    1
}

fn default_close_after() -> u32 {
    3
}

fn default_update_every() -> u32 {
    1
}

impl Default for IncidentConfig {
    fn default() -> Self {
        Self {
            open_after: default_open_after(),
            close_after: default_close_after(),
            update_every: default_update_every(),
        }
    }
}

impl IncidentConfig {
    /// Refuses 0 for `open_after` and `close_after`.
    pub fn validate(&self) -> Result<(), SettingError> {
        if self.open_after == 0 {
            return Err(SettingError(
                "incident open_after is 0: an incident opens after at least 1 anomalous window",
            ));
        }
        if self.close_after == 0 {
            return Err(SettingError(
                "incident close_after is 0: an incident closes after at least 1 normal window",
            ));
        }
        Ok(())
    }
}

/// What a transition says about its incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Open,
    Update,
    Close,
}

impl Status {
    /// `"OPEN"`, `"UPDATE"` or `"CLOSE"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Update => "UPDATE",
            Self::Close => "CLOSE",
        }
    }
}

/// An anomalous window, as the tracker needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The window's score.
    pub score: f64,
    /// Rank of the window's severity; higher is more severe.
    pub severity_rank: u8,
}

/// An OPEN, UPDATE or CLOSE of one incident.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub status: Status,
    /// Same for every transition of the incident: [`incident_id`] of its scope, cell and
    /// `opened_at_ms`.
    pub incident_id: String,
    /// Window end of the first anomalous window of the incident.
    pub opened_at_ms: i64,
    /// Anomalous windows of the incident so far (normal windows inside it not counted).
    pub windows: u32,
    /// Highest score of the incident so far (NaN scores are passed over by `f64::max`).
    pub peak_score: f64,
    /// Highest severity rank of the incident so far.
    pub severity_rank: u8,
}

/// State of a cell with a pending or open incident; what the judge state saves of it, so
/// that the cell's next owner goes on with the same incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentState {
    last_end_ms: i64,
    opened_at_ms: i64,
    windows: u32,
    peak_score: f64,
    severity_rank: u8,
    /// Present once the incident is open.
    open: Option<OpenState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OpenState {
    id: String,
    /// Anomalous windows since the last OPEN or UPDATE.
    since_report: u32,
    /// Consecutive normal windows just seen.
    normal_run: u32,
}

impl IncidentState {
    /// The state after the first anomalous window of a streak.
    fn start(window_end_ms: i64, observation: Observation) -> Self {
        Self {
            last_end_ms: window_end_ms,
            opened_at_ms: window_end_ms,
            windows: 1,
            peak_score: observation.score,
            severity_rank: observation.severity_rank,
            open: None,
        }
    }

    /// Opens the pending incident if its streak has reached `open_after` windows.
    fn open_if_due(
        &mut self,
        config: &IncidentConfig,
        scope: &str,
        cell: &str,
    ) -> Option<Transition> {
        if self.open.is_some() || self.windows < config.open_after {
            return None;
        }
        let id = incident_id(scope, cell, self.opened_at_ms);
        let transition = self.transition(Status::Open, &id);
        self.open = Some(OpenState {
            id,
            since_report: 0,
            normal_run: 0,
        });
        Some(transition)
    }

    fn absorb(&mut self, observation: Observation) {
        self.windows = self.windows.saturating_add(1);
        self.peak_score = self.peak_score.max(observation.score);
        self.severity_rank = self.severity_rank.max(observation.severity_rank);
    }

    fn transition(&self, status: Status, id: &str) -> Transition {
        Transition {
            status,
            incident_id: id.to_owned(),
            opened_at_ms: self.opened_at_ms,
            windows: self.windows,
            peak_score: self.peak_score,
            severity_rank: self.severity_rank,
        }
    }
}

/// Turns each cell's sequence of window verdicts into incident transitions.
#[derive(Debug, Clone)]
pub struct IncidentTracker {
    config: IncidentConfig,
    scope: String,
    cells: HashMap<Arc<str>, IncidentState>,
    /// Cells of `cells` whose incident is open.
    open_incidents: usize,
}

impl IncidentTracker {
    /// A tracker with no state; `scope` (for example the model name) goes into every id.
    pub fn new(config: IncidentConfig, scope: impl Into<String>) -> Result<Self, SettingError> {
        config.validate()?;
        Ok(Self {
            config,
            scope: scope.into(),
            cells: HashMap::new(),
            open_incidents: 0,
        })
    }

    /// Takes the window of `cell` that ended at `window_end_ms`; `observation` is present iff
    /// the window was anomalous. Returns the transition it causes, if any (see the module doc);
    /// a window not newer than the last one taken for the cell is ignored.
    pub fn observe(
        &mut self,
        cell: &Arc<str>,
        window_end_ms: i64,
        observation: Option<Observation>,
    ) -> Option<Transition> {
        let Self {
            config,
            scope,
            cells,
            open_incidents,
        } = self;
        let Some(state) = cells.get_mut(&**cell) else {
            let mut state = IncidentState::start(window_end_ms, observation?);
            let transition = state.open_if_due(config, scope, cell);
            *open_incidents += usize::from(transition.is_some());
            cells.insert(Arc::clone(cell), state);
            return transition;
        };
        if window_end_ms <= state.last_end_ms {
            return None;
        }
        state.last_end_ms = window_end_ms;
        match (observation, state.open.as_mut()) {
            // A streak too short to open: forget it.
            (None, None) => {
                cells.remove(&**cell);
                None
            }
            (None, Some(open)) => {
                open.normal_run = open.normal_run.saturating_add(1);
                if open.normal_run < config.close_after {
                    return None;
                }
                let state = cells.remove(&**cell)?;
                *open_incidents -= 1;
                let id = &state.open.as_ref()?.id;
                Some(state.transition(Status::Close, id))
            }
            (Some(observation), None) => {
                state.absorb(observation);
                let transition = state.open_if_due(config, scope, cell);
                *open_incidents += usize::from(transition.is_some());
                transition
            }
            (Some(observation), Some(open)) => {
                let rose = observation.severity_rank > state.severity_rank;
                open.normal_run = 0;
                open.since_report = open.since_report.saturating_add(1);
                let due = config.update_every > 0 && open.since_report >= config.update_every;
                if !(rose || due) {
                    state.absorb(observation);
                    return None;
                }
                open.since_report = 0;
                let id = open.id.clone();
                state.absorb(observation);
                Some(state.transition(Status::Update, &id))
            }
        }
    }

    /// Ends what `cell` has going because it fell silent (no window will come to close it):
    /// an open incident is closed, a streak too short to open is dropped. Returns the CLOSE
    /// transition and the end of the incident's last window taken.
    pub fn expire(&mut self, cell: &str) -> Option<(Transition, i64)> {
        let state = self.cells.remove(cell)?;
        let open = state.open.as_ref()?;
        self.open_incidents -= 1;
        Some((state.transition(Status::Close, &open.id), state.last_end_ms))
    }

    /// Drops all state of `cell` (its partition was revoked), open incident included, without
    /// a transition. Returns whether there was any.
    pub fn forget(&mut self, cell: &str) -> bool {
        match self.cells.remove(cell) {
            Some(state) => {
                if state.open.is_some() {
                    self.open_incidents -= 1;
                }
                true
            }
            None => false,
        }
    }

    /// What the tracker holds of `cell`, to save. A peak score that is not finite (a window
    /// scored NaN that a sensor check made anomalous) is saved as 0: JSON has no NaN.
    pub fn state(&self, cell: &str) -> Option<IncidentState> {
        let mut state = self.cells.get(cell)?.clone();
        if !state.peak_score.is_finite() {
            state.peak_score = 0.0;
        }
        Some(state)
    }

    /// Takes over a saved state of `cell` (see [`IncidentTracker::state`]): its windows up to
    /// the saved one are taken already, and an open incident goes on under its id.
    pub fn adopt(&mut self, cell: &Arc<str>, state: IncidentState) {
        let opens = usize::from(state.open.is_some());
        if let Some(old) = self.cells.insert(Arc::clone(cell), state)
            && old.open.is_some()
        {
            self.open_incidents -= 1;
        }
        self.open_incidents += opens;
    }

    /// The end of the last window `cell`'s pending or open incident took.
    pub fn last_window_end(&self, cell: &str) -> Option<i64> {
        Some(self.cells.get(cell)?.last_end_ms)
    }

    /// Whether `cell` has a pending or open incident.
    pub fn holds(&self, cell: &str) -> bool {
        self.cells.contains_key(cell)
    }

    /// Cells with a pending or open incident.
    pub fn cells(&self) -> impl Iterator<Item = &Arc<str>> {
        self.cells.keys()
    }

    /// Incidents open now.
    pub fn open_count(&self) -> usize {
        self.open_incidents
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anomalous(score: f64, severity_rank: u8) -> Option<Observation> {
        Some(Observation {
            score,
            severity_rank,
        })
    }

    fn new_tracker(open_after: u32, close_after: u32, update_every: u32) -> IncidentTracker {
        let config = IncidentConfig {
            open_after,
            close_after,
            update_every,
        };
        IncidentTracker::new(config, "model-a").unwrap()
    }

    /// Feeds `(window end, observation)` pairs of `cell`; the transitions, one slot per window.
    fn feed(
        tracker: &mut IncidentTracker,
        cell: &Arc<str>,
        windows: &[(i64, Option<Observation>)],
    ) -> Vec<Option<Transition>> {
        windows
            .iter()
            .map(|&(end, observation)| tracker.observe(cell, end, observation))
            .collect()
    }

    fn statuses(transitions: &[Option<Transition>]) -> Vec<Option<Status>> {
        transitions
            .iter()
            .map(|t| t.as_ref().map(|t| t.status))
            .collect()
    }

    #[test]
    fn lifecycle_opens_updates_and_closes() {
        let mut tracker = IncidentTracker::new(IncidentConfig::default(), "model-a").unwrap();
        let cell: Arc<str> = Arc::from("cell-1");
        let out = feed(
            &mut tracker,
            &cell,
            &[
                (1_000, None),
                (2_000, anomalous(2.0, 1)),
                (3_000, anomalous(5.0, 2)),
                (4_000, anomalous(3.0, 1)),
                (5_000, None),
                (6_000, None),
                (7_000, None),
                (8_000, None),
            ],
        );
        use Status::*;
        assert_eq!(
            statuses(&out),
            [
                None,
                Some(Open),
                Some(Update),
                Some(Update),
                None,
                None,
                Some(Close),
                None
            ]
        );
        let id = incident_id("model-a", "cell-1", 2_000);
        let expect = |status, windows, peak_score, severity_rank| Transition {
            status,
            incident_id: id.clone(),
            opened_at_ms: 2_000,
            windows,
            peak_score,
            severity_rank,
        };
        assert_eq!(out[1], Some(expect(Open, 1, 2.0, 1)));
        assert_eq!(out[2], Some(expect(Update, 2, 5.0, 2)));
        assert_eq!(out[3], Some(expect(Update, 3, 5.0, 2)));
        assert_eq!(out[6], Some(expect(Close, 3, 5.0, 2)));
        assert_eq!(tracker.open_count(), 0);
        // A closed cell keeps no state.
        assert!(tracker.cells.is_empty());
    }

    #[test]
    fn open_after_two_ignores_a_blip() {
        let mut tracker = new_tracker(2, 3, 1);
        let cell: Arc<str> = Arc::from("cell-1");
        let out = feed(
            &mut tracker,
            &cell,
            &[
                (1_000, anomalous(4.0, 1)),
                (2_000, None),
                (3_000, anomalous(3.0, 1)),
                (4_000, anomalous(6.0, 3)),
            ],
        );
        assert_eq!(&out[..3], [None, None, None]);
        let open = out[3].clone().unwrap();
        assert_eq!(open.status, Status::Open);
        assert_eq!(open.opened_at_ms, 3_000);
        assert_eq!(open.windows, 2);
        assert_eq!(open.peak_score, 6.0);
        assert_eq!(open.severity_rank, 3);
        assert_eq!(open.incident_id, incident_id("model-a", "cell-1", 3_000));
        assert_eq!(tracker.open_count(), 1);
    }

    #[test]
    fn a_short_gap_keeps_one_incident() {
        let mut tracker = new_tracker(1, 3, 1);
        let cell: Arc<str> = Arc::from("cell-1");
        let out = feed(
            &mut tracker,
            &cell,
            &[
                (1_000, anomalous(2.0, 1)),
                (2_000, None),
                (3_000, None),
                (4_000, anomalous(2.5, 1)),
                (5_000, None),
                (6_000, None),
                (7_000, None),
            ],
        );
        use Status::*;
        assert_eq!(
            statuses(&out),
            [
                Some(Open),
                None,
                None,
                Some(Update),
                None,
                None,
                Some(Close)
            ]
        );
        let ids: Vec<&str> = out
            .iter()
            .flatten()
            .map(|t| t.incident_id.as_str())
            .collect();
        assert!(ids.iter().all(|&id| id == ids[0]));
        let close = out[6].as_ref().unwrap();
        assert_eq!((close.windows, close.opened_at_ms), (2, 1_000));
    }

    #[test]
    fn a_severity_rise_forces_an_update() {
        let mut tracker = new_tracker(1, 3, 0);
        let cell: Arc<str> = Arc::from("cell-1");
        let out = feed(
            &mut tracker,
            &cell,
            &[
                (1_000, anomalous(2.0, 1)),
                (2_000, anomalous(2.0, 1)),
                (3_000, anomalous(3.0, 2)),
                (4_000, anomalous(3.0, 2)),
                (5_000, anomalous(9.0, 1)),
                (6_000, anomalous(9.0, 3)),
            ],
        );
        use Status::*;
        assert_eq!(
            statuses(&out),
            [Some(Open), None, Some(Update), None, None, Some(Update)]
        );
        assert_eq!(out[5].as_ref().unwrap().peak_score, 9.0);
        assert_eq!(out[5].as_ref().unwrap().windows, 6);

        // update_every = 2: every second anomalous window, and still on a rise.
        let mut tracker = new_tracker(1, 3, 2);
        let out = feed(
            &mut tracker,
            &cell,
            &[
                (1_000, anomalous(2.0, 1)),
                (2_000, anomalous(2.0, 1)),
                (3_000, anomalous(2.0, 1)),
                (4_000, anomalous(2.0, 2)),
                (5_000, anomalous(2.0, 2)),
                (6_000, anomalous(2.0, 2)),
            ],
        );
        assert_eq!(
            statuses(&out),
            [
                Some(Open),
                None,
                Some(Update),
                Some(Update),
                None,
                Some(Update)
            ]
        );
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a: Arc<str> = Arc::from("cell-a");
        let b: Arc<str> = Arc::from("cell-b");
        let run = || {
            let mut tracker = new_tracker(1, 1, 1);
            let mut ids = Vec::new();
            for (cell, end, observation) in [
                (&a, 1_000, anomalous(2.0, 1)),
                (&b, 1_000, anomalous(2.0, 1)),
                (&a, 2_000, None),
                (&a, 3_000, anomalous(2.0, 1)),
                (&b, 2_000, anomalous(2.0, 1)),
            ] {
                if let Some(t) = tracker.observe(cell, end, observation) {
                    ids.push((t.status, t.incident_id));
                }
            }
            ids
        };
        let first = run();
        assert_eq!(first, run());
        use Status::*;
        let statuses: Vec<Status> = first.iter().map(|t| t.0).collect();
        assert_eq!(statuses, [Open, Open, Close, Open, Update]);
        let (a1, b1, a1_closed, a2, b1_again) = (
            &first[0].1,
            &first[1].1,
            &first[2].1,
            &first[3].1,
            &first[4].1,
        );
        assert_ne!(a1, b1, "cells differ");
        assert_ne!(a1, a2, "incidents of one cell differ");
        assert_eq!(a1, a1_closed);
        assert_eq!(b1, b1_again);
        assert_ne!(
            incident_id("model-a", "cell-a", 1_000),
            incident_id("model-b", "cell-a", 1_000)
        );
    }

    #[test]
    fn stale_windows_are_ignored() {
        let mut tracker = new_tracker(1, 2, 1);
        let cell: Arc<str> = Arc::from("cell-1");
        let out = feed(
            &mut tracker,
            &cell,
            &[
                (2_000, anomalous(2.0, 1)),
                (2_000, anomalous(9.0, 4)),
                (1_000, None),
                (1_500, None),
                (3_000, anomalous(3.0, 1)),
                (4_000, None),
                (3_500, None),
                (5_000, None),
            ],
        );
        use Status::*;
        assert_eq!(
            statuses(&out),
            [
                Some(Open),
                None,
                None,
                None,
                Some(Update),
                None,
                None,
                Some(Close)
            ]
        );
        let update = out[4].as_ref().unwrap();
        assert_eq!(
            (update.windows, update.peak_score, update.severity_rank),
            (2, 3.0, 1)
        );
    }

    #[test]
    fn an_adopted_state_goes_on_with_the_same_incident() {
        let cell: Arc<str> = Arc::from("c");
        let mut first = new_tracker(2, 2, 0);
        let opened = feed(
            &mut first,
            &cell,
            &[(1, anomalous(5.0, 1)), (2, anomalous(7.0, 2))],
        );
        assert_eq!(statuses(&opened), [None, Some(Status::Open)]);
        let id = opened[1].as_ref().unwrap().incident_id.clone();
        let saved: IncidentState =
            serde_json::from_slice(&serde_json::to_vec(&first.state("c").unwrap()).unwrap())
                .unwrap();

        let mut next = new_tracker(2, 2, 0);
        next.adopt(&cell, saved);
        assert_eq!(next.open_count(), 1);
        // Windows the saved state had taken are taken already; later ones go on with it.
        let after = feed(
            &mut next,
            &cell,
            &[(2, anomalous(9.0, 3)), (3, None), (4, None)],
        );
        assert_eq!(statuses(&after), [None, None, Some(Status::Close)]);
        let close = after[2].as_ref().unwrap();
        assert_eq!(
            (&close.incident_id, close.windows, close.peak_score),
            (&id, 2, 7.0)
        );
        assert_eq!(next.open_count(), 0);
    }

    #[test]
    fn a_saved_peak_that_is_not_a_number_is_saved_as_zero() {
        let cell: Arc<str> = Arc::from("c");
        let mut tracker = new_tracker(2, 2, 0);
        feed(&mut tracker, &cell, &[(1, anomalous(f64::NAN, 1))]);
        let json = serde_json::to_vec(&tracker.state("c").unwrap()).unwrap();
        let saved: IncidentState = serde_json::from_slice(&json).unwrap();
        assert_eq!(saved.peak_score, 0.0);
    }

    #[test]
    fn forget_drops_the_state() {
        let mut tracker = new_tracker(2, 3, 1);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("cell-a"), Arc::from("cell-b"));
        assert!(tracker.observe(&a, 1_000, anomalous(2.0, 1)).is_none());
        assert!(tracker.observe(&a, 2_000, anomalous(2.0, 1)).is_some());
        assert!(tracker.observe(&b, 1_000, anomalous(2.0, 1)).is_none());
        assert_eq!(tracker.open_count(), 1);
        assert!(tracker.forget(&a));
        assert!(tracker.forget(&b));
        assert!(!tracker.forget("cell-c"));
        assert_eq!(tracker.open_count(), 0);
        assert!(tracker.cells.is_empty());
        // After forgetting, the cell starts over: an older window is taken, a new streak.
        assert_eq!(tracker.observe(&a, 1_500, anomalous(2.0, 1)), None);
        let open = tracker.observe(&a, 2_500, anomalous(2.0, 1)).unwrap();
        assert_eq!(
            (open.status, open.opened_at_ms, open.windows),
            (Status::Open, 1_500, 2)
        );
    }

    #[test]
    fn a_silent_cell_closes_its_open_incident_and_drops_a_pending_streak() {
        let mut tracker = new_tracker(2, 3, 1);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("cell-a"), Arc::from("cell-b"));
        tracker.observe(&a, 1_000, anomalous(2.0, 1));
        let open = tracker.observe(&a, 2_000, anomalous(5.0, 2)).unwrap();
        tracker.observe(&b, 1_000, anomalous(2.0, 1));
        let (close, last_end_ms) = tracker.expire(&a).expect("a's incident is open");
        assert_eq!(
            (
                close.status,
                close.incident_id,
                close.windows,
                close.peak_score
            ),
            (Status::Close, open.incident_id, 2, 5.0)
        );
        assert_eq!((close.opened_at_ms, last_end_ms), (1_000, 2_000));
        // b's streak never opened: nothing to close, and nothing left.
        assert_eq!(tracker.expire(&b), None);
        assert_eq!(tracker.expire("cell-c"), None);
        assert_eq!(tracker.open_count(), 0);
        assert!(tracker.cells.is_empty());
    }

    #[test]
    fn config_is_validated() {
        for (open_after, close_after) in [(0, 3), (1, 0)] {
            let config = IncidentConfig {
                open_after,
                close_after,
                update_every: 1,
            };
            let error = IncidentTracker::new(config, "m").unwrap_err();
            assert!(error.to_string().contains("is 0"), "{error}");
        }
        use serde::de::value::{Error, MapDeserializer};
        let parse = |pairs: Vec<(&'static str, u32)>| {
            IncidentConfig::deserialize(MapDeserializer::<_, Error>::new(pairs.into_iter()))
        };
        assert_eq!(parse(vec![]).unwrap(), IncidentConfig::default());
        let config = parse(vec![("close_after", 5)]).unwrap();
        assert_eq!(
            (config.open_after, config.close_after, config.update_every),
            (1, 5, 1)
        );
        assert!(parse(vec![("close_afterr", 5)]).is_err());
    }
}
