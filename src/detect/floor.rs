//! floor: a sensor reading far below the lowest it has read at this time of day, and, when
//! asked, far above the highest (its ceiling).
//!
//! Traffic has a daily shape: a road that is free-flowing at 1 a.m. every night and crawls at
//! 1 a.m. tonight has an incident, although a crawl is ordinary at 5 p.m. The model sees two
//! hours and scores tonight's crawl against every congestion onset it knows; this check
//! remembers, per node, channel and time of day, the lowest value of the last days. A loop
//! detector reading 80 mph on a road where nobody drove faster than 68 at that hour all week is
//! miscalibrated, not fast: the ceiling remembers the highest value the same way.
//!
//! Invariants:
//! - The day (UTC) is cut into slots of `slot`; a step belongs to the slot its start falls in.
//! - Per node/channel/slot the check keeps the lowest value of each of the last `keep_days`
//!   days (UTC) that had one; the slot's *floor* is the lowest of them. The slot *judges* once
//!   it holds at least `days` days.
//! - A node/channel is *below its floor* in a window when each of the window's last `steps`
//!   steps is observed and under `factor` × the floor of its slot, every slot judging.
//! - A value under `factor` × a judging slot's floor never teaches the slot, so a fault cannot
//!   lower the floor it is measured against; every other observed value does. Once a slot's
//!   judging days fall out of `keep_days`, it stops judging and learns again, so a lasting
//!   change of a sensor's normal is accepted after about `keep_days` + `days` days.
//! - The ceiling, when `ceiling` is set, is the same with every "lowest" read "highest",
//!   "under" read "over" and `factor` read `ceiling`, kept apart from the floors.
//! - Learning is a minimum (for a ceiling a maximum) per day, so a step seen in several
//!   overlapping windows, or again in a replay, teaches the same: no order of windows is
//!   assumed.
//! - Time of day is UTC: a daylight-saving change shifts local patterns by an hour, which
//!   slots of an hour notice until the kept days have turned over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SettingError;
use crate::assemble::Window;

const DAY_MS: i64 = 86_400_000;

/// The floor check's settings (`[detect.floor]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloorConfig {
    /// A value under this share of its slot's floor is below it (0 < factor < 1 for a floor
    /// of positive values such as speeds).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// Consecutive steps at the window's end that must all be below their floors.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Length of a time-of-day slot; a whole number of them makes a day.
    #[serde(default = "default_slot", with = "humantime_serde")]
    pub slot: Duration,
    /// Days a slot must have learnt before it judges.
    #[serde(default = "default_days")]
    pub days: usize,
    /// Days a slot remembers.
    #[serde(default = "default_keep_days")]
    pub keep_days: usize,
    /// Present: a value over this multiple of its slot's ceiling (the highest of the kept days)
    /// is above it (above 1 for positive values such as speeds), with the same `steps`, `slot`,
    /// `days` and `keep_days`. Absent (default): no ceiling.
    #[serde(default)]
    pub ceiling: Option<f64>,
}

fn default_factor() -> f64 {
    0.85
}
fn default_steps() -> usize {
    5
}
fn default_slot() -> Duration {
    Duration::from_secs(3600)
}
fn default_days() -> usize {
    3
}
fn default_keep_days() -> usize {
    7
}

impl Default for FloorConfig {
    fn default() -> Self {
        Self {
            factor: default_factor(),
            steps: default_steps(),
            slot: default_slot(),
            days: default_days(),
            keep_days: default_keep_days(),
            ceiling: None,
        }
    }
}

impl FloorConfig {
    /// Refuses a factor or ceiling that is not a positive number, a ceiling not above the
    /// factor, 0 steps, a slot that does not divide a day, or `days` outside 1..=`keep_days`.
    pub fn validate(&self) -> Result<(), SettingError> {
        if !(self.factor.is_finite() && self.factor > 0.0) {
            return Err(SettingError("factor must be a positive share of the floor"));
        }
        if self.ceiling.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return Err(SettingError(
                "ceiling must be a positive multiple of the highest value",
            ));
        }
        if self.ceiling.is_some_and(|c| c <= self.factor) {
            return Err(SettingError(
                "ceiling must be above factor (e.g. 1.05 with 0.85): a lower one flags most values",
            ));
        }
        if self.steps == 0 {
            return Err(SettingError("steps is 0: a fault needs at least 1 step"));
        }
        let slot_ms = self.slot.as_millis();
        if slot_ms == 0 || !(DAY_MS as u128).is_multiple_of(slot_ms) {
            return Err(SettingError(
                "slot must divide a day into whole slots (e.g. \"1h\", \"30m\")",
            ));
        }
        if self.days == 0 || self.days > self.keep_days {
            return Err(SettingError(
                "days must be at least 1 and at most keep_days",
            ));
        }
        Ok(())
    }

    fn slot_ms(&self) -> i64 {
        self.slot.as_millis() as i64
    }
}

/// A node/channel beyond its bound (below its floor, above its ceiling) over the window's last
/// steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Beyond {
    pub slot: usize,
    pub channel: usize,
    /// The value at the window's last step.
    pub value: f64,
    /// The bound of that step's slot: its floor or its ceiling.
    pub bound: f64,
}

/// What one window is beyond.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outside {
    pub below_floor: Vec<Beyond>,
    pub above_ceiling: Vec<Beyond>,
}

/// Which bound a [`Bounds`] keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Floor,
    Ceiling,
}

impl Side {
    /// Of two values, the one this bound keeps.
    fn extreme(self, a: f32, b: f32) -> f32 {
        match self {
            Side::Floor => a.min(b),
            Side::Ceiling => a.max(b),
        }
    }

    /// Whether `value` is beyond `factor` × `bound`.
    fn beyond(self, value: f32, bound: f32, factor: f64) -> bool {
        let limit = factor * f64::from(bound);
        match self {
            Side::Floor => f64::from(value) < limit,
            Side::Ceiling => f64::from(value) > limit,
        }
    }
}

/// The extreme value of one node/channel/slot on each kept day: `(day, lowest)` for a floor,
/// `(day, highest)` for a ceiling, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotDays(Vec<(i64, f32)>);

impl SlotDays {
    /// The bound on `day`: the extreme of the kept days before or on it, when they are at
    /// least `days`.
    fn bound(&self, side: Side, day: i64, days: usize, keep_days: usize) -> Option<f32> {
        let mut kept = (self.0.iter()).filter(|d| d.0 > day - keep_days as i64 && d.0 <= day);
        let first = kept.next()?.1;
        let (count, extreme) = kept.fold((1, first), |(n, x), d| (n + 1, side.extreme(x, d.1)));
        (count >= days).then_some(extreme)
    }

    fn learn(&mut self, side: Side, day: i64, value: f32, keep_days: usize) {
        self.0.retain(|d| d.0 > day - keep_days as i64);
        match self.0.iter_mut().find(|d| d.0 == day) {
            Some(d) => d.1 = side.extreme(d.1, value),
            None => {
                let at = self.0.partition_point(|d| d.0 < day);
                self.0.insert(at, (day, value));
            }
        }
    }
}

/// One bound (floor or ceiling) of one cell's nodes: per node and channel, one [`SlotDays`] per
/// slot.
#[derive(Debug, Clone)]
struct Bounds {
    side: Side,
    /// How far beyond the bound a value must be: `factor` or `ceiling`.
    factor: f64,
    nodes: HashMap<(Arc<str>, usize), Vec<SlotDays>>,
}

impl Bounds {
    fn new(side: Side, factor: f64) -> Self {
        Self {
            side,
            factor,
            nodes: HashMap::new(),
        }
    }

    fn entries(&self) -> Vec<FloorEntry> {
        let mut out: Vec<FloorEntry> = (self.nodes.iter())
            .map(|((node, channel), slots)| (node.to_string(), *channel, slots.clone()))
            .collect();
        out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        out
    }

    fn adopt(&mut self, entries: Vec<FloorEntry>, slots: usize, channels: usize) {
        for (node, channel, days) in entries {
            if days.len() == slots && channel < channels {
                self.nodes.insert((Arc::from(node), channel), days);
            }
        }
    }

    /// Judges one node/channel of the window `steps` places against its bounds, then learns
    /// from it: the last value and its bound when each of the last `config.steps` steps is
    /// beyond its bound.
    fn observe(
        &mut self,
        config: &FloorConfig,
        steps: &Steps<'_>,
        node: usize,
        channel: usize,
    ) -> Option<Beyond> {
        let window = steps.window;
        let (n, count) = (window.node_count(), steps.at.len());
        let checked = config.steps.min(count);
        let key = (Arc::clone(&window.nodes[node]), channel);
        let slots = steps.slots;
        let bounds = (self.nodes.entry(key)).or_insert_with(|| vec![SlotDays::default(); slots]);
        let mut beyond = 0;
        let mut last = None;
        for (t, &(day, slot)) in steps.at.iter().enumerate() {
            let at = (t * n + node) * steps.channels + channel;
            if window.mask[at] <= 0.0 {
                continue;
            }
            let value = window.values[at];
            let bound = bounds[slot].bound(self.side, day, config.days, config.keep_days);
            match bound {
                Some(b) if self.side.beyond(value, b, self.factor) => {
                    if t >= count - checked {
                        beyond += 1;
                        last = Some((value, b));
                    }
                }
                _ => bounds[slot].learn(self.side, day, value, config.keep_days),
            }
        }
        let (value, bound) = last.filter(|_| beyond == checked)?;
        Some(Beyond {
            slot: node,
            channel,
            value: f64::from(value),
            bound: f64::from(bound),
        })
    }
}

/// Where one window's steps fall, worked out once for every node/channel and both bounds.
struct Steps<'a> {
    window: &'a Window,
    /// Model channels per node.
    channels: usize,
    /// Per step, its UTC day and its time-of-day slot.
    at: Vec<(i64, usize)>,
    /// Slots in a day.
    slots: usize,
}

impl<'a> Steps<'a> {
    fn new(window: &'a Window, channels: usize, slot_ms: i64) -> Self {
        let count = window.values.len() / (window.node_count() * channels).max(1);
        let cadence = (window.end_ms - window.start_ms) / count.max(1) as i64;
        let at = (0..count as i64)
            .map(|t| {
                let start = window.start_ms + t * cadence;
                let slot = start.rem_euclid(DAY_MS) / slot_ms;
                (start.div_euclid(DAY_MS), slot as usize)
            })
            .collect();
        Self {
            window,
            channels,
            at,
            slots: (DAY_MS / slot_ms) as usize,
        }
    }
}

/// The floors of one cell's nodes, and their ceilings when `[detect.floor] ceiling` is set.
#[derive(Debug, Clone)]
pub struct Floors {
    config: FloorConfig,
    /// Model channels per node in a window.
    channels: usize,
    floors: Bounds,
    ceilings: Option<Bounds>,
}

/// One node/channel's slots, as saved.
pub type FloorEntry = (String, usize, Vec<SlotDays>);

impl Floors {
    pub fn new(config: FloorConfig, channels: usize) -> Self {
        Self {
            floors: Bounds::new(Side::Floor, config.factor),
            ceilings: config.ceiling.map(|c| Bounds::new(Side::Ceiling, c)),
            config,
            channels,
        }
    }

    /// Every node/channel's floor slots, to save.
    pub fn entries(&self) -> Vec<FloorEntry> {
        self.floors.entries()
    }

    /// Every node/channel's ceiling slots, to save; none without a ceiling.
    pub fn ceiling_entries(&self) -> Vec<FloorEntry> {
        self.ceilings
            .as_ref()
            .map(Bounds::entries)
            .unwrap_or_default()
    }

    /// Takes over saved floor slots; those of another slot length are left out.
    pub fn adopt(&mut self, entries: Vec<FloorEntry>) {
        let slots = self.slots_per_day();
        self.floors.adopt(entries, slots, self.channels);
    }

    /// Takes over saved ceiling slots, as [`Floors::adopt`]; ignored without a ceiling.
    pub fn adopt_ceilings(&mut self, entries: Vec<FloorEntry>) {
        let slots = self.slots_per_day();
        if let Some(ceilings) = self.ceilings.as_mut() {
            ceilings.adopt(entries, slots, self.channels);
        }
    }

    /// Whether no node/channel has slots.
    pub fn is_empty(&self) -> bool {
        self.floors.nodes.is_empty() && self.ceilings.as_ref().is_none_or(|c| c.nodes.is_empty())
    }

    fn slots_per_day(&self) -> usize {
        (DAY_MS / self.config.slot_ms()) as usize
    }

    /// Judges every node/channel of `window` against its floors (and ceilings), then learns
    /// from the window.
    pub fn observe(&mut self, window: &Window) -> Outside {
        let (n, f) = (window.node_count(), self.channels);
        let mut found = Outside::default();
        if window.values.len() < n * f || n * f == 0 {
            return found;
        }
        let steps = Steps::new(window, f, self.config.slot_ms());
        for node in 0..n {
            for c in 0..f {
                let below = self.floors.observe(&self.config, &steps, node, c);
                found.below_floor.extend(below);
                if let Some(ceilings) = self.ceilings.as_mut() {
                    let above = ceilings.observe(&self.config, &steps, node, c);
                    found.above_ceiling.extend(above);
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    impl Floors {
        /// What `window` is below, checking that no ceiling is crossed.
        fn below(&mut self, window: &Window) -> Vec<Beyond> {
            let found = self.observe(window);
            assert!(found.above_ceiling.is_empty(), "{found:?}");
            found.below_floor
        }
    }
    const STEP: i64 = 300_000;

    /// One node, one channel, 5-minute steps from `start_ms`.
    fn window(start_ms: i64, values: &[f32]) -> Window {
        Window {
            cell: Arc::from("c"),
            start_ms,
            end_ms: start_ms + values.len() as i64 * STEP,
            nodes: vec![Arc::from("n")],
            values: values.to_vec(),
            mask: vec![1.0; values.len()],
            missing_fraction: 0.0,
            holds: vec![],
            closed_at: std::time::Instant::now(),
        }
    }

    /// Every hour of `days`, a window of 12 steps at `speed`.
    fn learn_days(floors: &mut Floors, days: std::ops::Range<i64>, speed: f32) {
        for day in days {
            for hour in 0..24 {
                let found = floors.below(&window(day * DAY_MS + hour * HOUR, &[speed; 12]));
                assert!(found.is_empty(), "day {day} hour {hour}");
            }
        }
    }

    /// Day `day`, 01:00: 7 steps at 60, then `slow` steps at 30.
    fn slowdown(day: i64, slow: usize) -> Window {
        let mut values = vec![60.0; 12 - slow];
        values.extend(std::iter::repeat_n(30.0, slow));
        window(day * DAY_MS + HOUR, &values)
    }

    #[test]
    fn a_slot_judges_once_it_has_learnt_its_days() {
        let mut floors = Floors::new(FloorConfig::default(), 1);
        learn_days(&mut floors, 0..3, 60.0);
        let found = floors.below(&slowdown(3, 5));
        assert_eq!(
            found,
            [Beyond {
                slot: 0,
                channel: 0,
                value: 30.0,
                bound: 60.0
            }]
        );
        assert!(
            floors.below(&slowdown(3, 4)).is_empty(),
            "4 of the last 5 steps"
        );
    }

    #[test]
    fn before_its_days_a_slot_learns_everything() {
        let mut floors = Floors::new(FloorConfig::default(), 1);
        learn_days(&mut floors, 0..2, 60.0);
        let slow = window(2 * DAY_MS + HOUR, &[30.0; 12]);
        assert!(floors.below(&slow).is_empty(), "two days of three");
        let found = floors.below(&window(3 * DAY_MS + HOUR, &[20.0; 12]));
        assert_eq!(found[0].bound, 30.0, "day 2's 30 is now the floor");
    }

    #[test]
    fn a_value_below_the_floor_does_not_lower_it() {
        let mut floors = Floors::new(FloorConfig::default(), 1);
        learn_days(&mut floors, 0..3, 60.0);
        for _ in 0..3 {
            assert_eq!(floors.below(&slowdown(3, 12)).len(), 1);
        }
        // Slower than 60 but not under 0.85 × 60: 52 is learnt, and lowers the floor to 52.
        let slower = window(3 * DAY_MS + 2 * HOUR, &[52.0; 12]);
        assert!(floors.below(&slower).is_empty());
        let found = floors.below(&window(3 * DAY_MS + 2 * HOUR, &[44.0; 12]));
        assert_eq!(found[0].bound, 52.0);
    }

    #[test]
    fn a_lasting_change_is_accepted_once_the_kept_days_turn_over() {
        let config = FloorConfig {
            days: 2,
            keep_days: 3,
            ..FloorConfig::default()
        };
        let mut floors = Floors::new(config, 1);
        learn_days(&mut floors, 0..2, 60.0);
        let slow = |day| window(day * DAY_MS + HOUR, &[30.0; 12]);
        assert_eq!(floors.below(&slow(2)).len(), 1);
        // Day 3 keeps days 1 to 3, so day 1 alone of the judging days: the slot stops judging
        // and learns 30, and judges again once it holds two days of it.
        for day in 3..6 {
            assert!(floors.below(&slow(day)).is_empty(), "day {day}");
        }
        let found = floors.below(&window(6 * DAY_MS + HOUR, &[20.0; 12]));
        assert_eq!(found[0].bound, 30.0);
    }

    #[test]
    fn unobserved_steps_neither_judge_nor_teach() {
        let mut floors = Floors::new(FloorConfig::default(), 1);
        learn_days(&mut floors, 0..3, 60.0);
        let mut gap = slowdown(3, 12);
        gap.mask[11] = 0.0;
        gap.values[11] = 0.0;
        assert!(
            floors.below(&gap).is_empty(),
            "the last step is not observed"
        );
        assert_eq!(floors.below(&slowdown(3, 12))[0].bound, 60.0);
    }

    #[test]
    fn saved_slots_are_taken_over() {
        let mut floors = Floors::new(FloorConfig::default(), 1);
        learn_days(&mut floors, 0..3, 60.0);
        let json = serde_json::to_string(&floors.entries()).unwrap();
        let mut next = Floors::new(FloorConfig::default(), 1);
        next.adopt(serde_json::from_str(&json).unwrap());
        assert_eq!(next.below(&slowdown(3, 5)).len(), 1);
        let mut other_slots = Floors::new(
            FloorConfig {
                slot: Duration::from_secs(1800),
                ..FloorConfig::default()
            },
            1,
        );
        other_slots.adopt(serde_json::from_str(&json).unwrap());
        assert!(
            other_slots.entries().is_empty(),
            "slots of another length are left out"
        );
    }

    #[test]
    fn config_is_validated() {
        assert!(FloorConfig::default().validate().is_ok());
        assert!(with_ceiling().validate().is_ok());
        let bad = [
            FloorConfig {
                factor: 0.0,
                ..FloorConfig::default()
            },
            FloorConfig {
                steps: 0,
                ..FloorConfig::default()
            },
            FloorConfig {
                slot: Duration::from_secs(7 * 60),
                ..FloorConfig::default()
            },
            FloorConfig {
                days: 8,
                ..FloorConfig::default()
            },
            FloorConfig {
                ceiling: Some(0.0),
                ..FloorConfig::default()
            },
            FloorConfig {
                ceiling: Some(f64::NAN),
                ..FloorConfig::default()
            },
            FloorConfig {
                ceiling: Some(0.8),
                ..FloorConfig::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }

    fn with_ceiling() -> FloorConfig {
        FloorConfig {
            ceiling: Some(1.05),
            ..FloorConfig::default()
        }
    }

    /// Day `day`, 01:00: 12 − `fast` steps at 60, then `fast` steps at `speed`.
    fn speedup(day: i64, fast: usize, speed: f32) -> Window {
        let mut values = vec![60.0; 12 - fast];
        values.extend(std::iter::repeat_n(speed, fast));
        window(day * DAY_MS + HOUR, &values)
    }

    #[test]
    fn a_ceiling_judges_values_over_the_highest_of_its_days() {
        let mut floors = Floors::new(with_ceiling(), 1);
        learn_days(&mut floors, 0..3, 60.0);
        let found = floors.observe(&speedup(3, 5, 70.0));
        assert!(found.below_floor.is_empty());
        assert_eq!(
            found.above_ceiling,
            [Beyond {
                slot: 0,
                channel: 0,
                value: 70.0,
                bound: 60.0
            }]
        );
        let four = floors.observe(&speedup(3, 4, 70.0));
        assert!(four.above_ceiling.is_empty(), "4 of the last 5 steps");
        // 62 is within 1.05 × 60: learnt, so the ceiling is 62 from now on, and 70 is still
        // over 1.05 × 62 while 65 is not.
        assert!(
            floors
                .observe(&speedup(3, 12, 62.0))
                .above_ceiling
                .is_empty()
        );
        assert_eq!(
            floors.observe(&speedup(3, 5, 70.0)).above_ceiling[0].bound,
            62.0
        );
        assert!(
            floors
                .observe(&speedup(3, 5, 65.0))
                .above_ceiling
                .is_empty()
        );
    }

    #[test]
    fn a_value_over_the_ceiling_does_not_raise_it_and_floors_ignore_it() {
        let mut floors = Floors::new(with_ceiling(), 1);
        learn_days(&mut floors, 0..3, 60.0);
        for _ in 0..3 {
            assert_eq!(floors.observe(&speedup(3, 12, 90.0)).above_ceiling.len(), 1);
        }
        assert_eq!(
            floors.observe(&speedup(3, 5, 70.0)).above_ceiling[0].bound,
            60.0
        );
        // The floors learnt nothing from the fast steps: a slowdown is judged against 60.
        assert_eq!(floors.below(&slowdown(3, 5))[0].bound, 60.0);
        let without = Floors::new(FloorConfig::default(), 1);
        assert!(without.ceiling_entries().is_empty(), "no ceiling asked for");
    }

    #[test]
    fn saved_ceilings_are_taken_over_apart_from_the_floors() {
        let mut floors = Floors::new(with_ceiling(), 1);
        learn_days(&mut floors, 0..3, 60.0);
        let ceilings = serde_json::to_string(&floors.ceiling_entries()).unwrap();
        let mut next = Floors::new(with_ceiling(), 1);
        next.adopt_ceilings(serde_json::from_str(&ceilings).unwrap());
        assert!(!next.is_empty());
        assert_eq!(next.observe(&speedup(3, 5, 70.0)).above_ceiling.len(), 1);
        assert!(
            next.below(&slowdown(3, 5)).is_empty(),
            "the floors start learning again"
        );
    }
}
