//! The kept steps of one cell, stored flat.
//!
//! Per step there are `width` entries (nodes × channels, node slots in arrival order), each the
//! mean of the readings it got, NaN where it got none (readings are finite, so NaN is free to
//! mean "missing"), and one least source offset per partition slot. While a step is open (the
//! watermark has not passed it) each entry also keeps how many readings it got, to fold the next
//! one into the mean; a closed step gets no more readings, so its counts are dropped. Ring
//! buffers hold all of it, sized exactly: a closed step costs the 4 bytes an entry of the `f32`
//! tensor it stands for plus 8 bytes a partition; only the few open steps cost a fifth byte.

use std::collections::VecDeque;

/// No reading of this partition in the step.
const NO_OFFSET: i64 = i64::MAX;

#[derive(Debug, Default)]
pub(super) struct History {
    /// Steps held.
    steps: usize,
    /// Leading steps that are closed: they have no counts.
    sealed: usize,
    /// Entries per step.
    width: usize,
    /// Partition slots per step.
    partitions: usize,
    /// `[steps × width]` means, NaN where unobserved.
    means: VecDeque<f32>,
    /// `[(steps − sealed) × width]` readings per entry of the open steps, saturating at 255:
    /// past that the mean weighs each new reading as 1/255, which only a sensor sending hundreds
    /// of readings per step notices.
    counts: VecDeque<u8>,
    /// `[steps × partitions]` least offset, [`NO_OFFSET`] where the partition sent nothing.
    lows: VecDeque<i64>,
}

impl History {
    pub(super) fn len(&self) -> usize {
        self.steps
    }

    pub(super) fn is_empty(&self) -> bool {
        self.steps == 0
    }

    /// Makes every step `width` entries wide; the new entries (a node that joined) come last
    /// in each step and are unobserved.
    pub(super) fn widen(&mut self, width: usize) {
        debug_assert!(width >= self.width);
        if width == self.width {
            return;
        }
        let old = self.width;
        self.means = relayout(&self.means, self.steps, old, width, f32::NAN);
        self.counts = relayout(&self.counts, self.steps - self.sealed, old, width, 0);
        self.width = width;
    }

    /// Adds a partition slot to every step; slots are numbered in the order they were added.
    pub(super) fn add_partition(&mut self) {
        let old = self.partitions;
        self.lows = relayout(&self.lows, self.steps, old, old + 1, NO_OFFSET);
        self.partitions += 1;
    }

    /// Appends `n` empty open steps.
    pub(super) fn extend_back(&mut self, n: usize) {
        self.reserve(n);
        self.means
            .extend(std::iter::repeat_n(f32::NAN, n * self.width));
        self.counts.extend(std::iter::repeat_n(0, n * self.width));
        self.lows
            .extend(std::iter::repeat_n(NO_OFFSET, n * self.partitions));
        self.steps += n;
    }

    /// Prepends `n` empty open steps. Only a history with no closed step can grow at the
    /// front: a reading for a step before a closed one is late, and never added.
    pub(super) fn extend_front(&mut self, n: usize) {
        debug_assert_eq!(self.sealed, 0, "open steps before a closed one");
        self.reserve(n);
        for _ in 0..n * self.width {
            self.means.push_front(f32::NAN);
        }
        if self.sealed == 0 {
            for _ in 0..n * self.width {
                self.counts.push_front(0);
            }
        } else {
            self.sealed += n;
        }
        for _ in 0..n * self.partitions {
            self.lows.push_front(NO_OFFSET);
        }
        self.steps += n;
    }

    /// Drops the first step, if any.
    pub(super) fn pop_front(&mut self) {
        if self.steps == 0 {
            return;
        }
        self.means.drain(..self.width);
        if self.sealed > 0 {
            self.sealed -= 1;
        } else {
            self.counts.drain(..self.width);
        }
        self.lows.drain(..self.partitions);
        self.steps -= 1;
    }

    /// Marks the first `steps` steps closed (no reading will be added to them) and drops their
    /// counts.
    pub(super) fn seal(&mut self, steps: usize) {
        let steps = steps.min(self.steps);
        if steps > self.sealed {
            self.counts.drain(..(steps - self.sealed) * self.width);
            self.sealed = steps;
        }
    }

    /// Room for `n` more steps, without the doubling slack of ordinary growth: a cell's
    /// history stops growing once it spans a window, so slack would never be used.
    fn reserve(&mut self, n: usize) {
        self.means.reserve_exact(n * self.width);
        self.counts.reserve_exact(n * self.width);
        self.lows.reserve_exact(n * self.partitions);
    }

    /// Folds `value` into entry `entry` of step `step`, read at `offset` of partition slot
    /// `partition`.
    pub(super) fn add(
        &mut self,
        step: usize,
        entry: usize,
        value: f32,
        partition: usize,
        offset: i64,
    ) {
        let mean = &mut self.means[step * self.width + entry];
        let count = if step >= self.sealed {
            let count = &mut self.counts[(step - self.sealed) * self.width + entry];
            *count = count.saturating_add(1);
            *count
        } else if mean.is_nan() {
            // A closed step gets no readings (they are late); should one come, it is folded in
            // as if the step held at most one before it.
            1
        } else {
            2
        };
        if count == 1 {
            *mean = value;
        } else {
            *mean += (value - *mean) / f32::from(count);
        }
        let low = &mut self.lows[step * self.partitions + partition];
        *low = (*low).min(offset);
    }

    /// The mean of entry `entry` of step `step`, or `None` if it got no reading.
    #[cfg(test)]
    pub(super) fn mean(&self, step: usize, entry: usize) -> Option<f32> {
        let mean = self.means[step * self.width + entry];
        (!mean.is_nan()).then_some(mean)
    }

    /// Lays the means out in one piece, so that [`History::row`] can hand out slices. A ring
    /// that has wrapped is rotated once; until the next step is added or dropped this costs
    /// nothing.
    pub(super) fn make_contiguous(&mut self) {
        self.means.make_contiguous();
    }

    /// Step `step`'s means, entry by entry, NaN where unobserved. Call
    /// [`History::make_contiguous`] first.
    pub(super) fn row(&self, step: usize) -> &[f32] {
        let (means, rest) = self.means.as_slices();
        debug_assert!(rest.is_empty(), "make_contiguous first");
        &means[step * self.width..(step + 1) * self.width]
    }

    /// The least offset of each partition slot's readings in step `step`.
    pub(super) fn lows(&self, step: usize) -> impl Iterator<Item = (usize, i64)> + '_ {
        let first = step * self.partitions;
        (0..self.partitions)
            .map(move |slot| (slot, self.lows[first + slot]))
            .filter(|&(_, offset)| offset != NO_OFFSET)
    }

    /// Bytes of the buffers (their capacity, used or not).
    pub(super) fn bytes(&self) -> usize {
        self.means.capacity() * size_of::<f32>()
            + self.counts.capacity() * size_of::<u8>()
            + self.lows.capacity() * size_of::<i64>()
    }
}

/// `steps` rows of `old` items as rows of `new` items, each padded with `fill`, in a buffer of
/// exactly that size.
fn relayout<T: Copy>(
    from: &VecDeque<T>,
    steps: usize,
    old: usize,
    new: usize,
    fill: T,
) -> VecDeque<T> {
    let mut to = VecDeque::with_capacity(steps * new);
    for row in 0..steps {
        to.extend(from.range(row * old..(row + 1) * old).copied());
        to.extend(std::iter::repeat_n(fill, new - old));
    }
    to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_and_new_partitions_keep_what_was_held() {
        let mut h = History::default();
        h.widen(2);
        h.add_partition();
        h.extend_back(2);
        h.add(0, 1, 4.0, 0, 10);
        h.add(1, 0, 1.0, 0, 12);
        h.add(1, 0, 2.0, 0, 11);
        h.widen(3);
        h.add_partition();
        h.extend_front(1);
        h.add(0, 2, 7.0, 1, 5);
        assert_eq!(h.len(), 3);
        assert_eq!(h.mean(0, 2), Some(7.0));
        assert_eq!(h.mean(1, 0), None);
        assert_eq!(h.mean(1, 1), Some(4.0));
        assert_eq!(h.mean(1, 2), None);
        assert_eq!(h.mean(2, 0), Some(1.5));
        assert_eq!(h.lows(0).collect::<Vec<_>>(), vec![(1, 5)]);
        assert_eq!(h.lows(1).collect::<Vec<_>>(), vec![(0, 10)]);
        assert_eq!(h.lows(2).collect::<Vec<_>>(), vec![(0, 11)]);
        h.pop_front();
        assert_eq!(h.len(), 2);
        assert_eq!(h.mean(0, 1), Some(4.0));
        h.make_contiguous();
        let row = h.row(1);
        assert_eq!(row[0], 1.5);
        assert!(row[1].is_nan() && row[2].is_nan());
        assert_eq!(h.lows(1).collect::<Vec<_>>(), vec![(0, 11)]);
    }

    /// Bytes of a 32-entry history fed one step at a time for 100 steps, keeping 40, the
    /// last `open` of them open (all of them when `None`).
    fn steady_bytes(open: Option<usize>) -> usize {
        let mut h = History::default();
        h.widen(32);
        h.add_partition();
        for step in 0..100 {
            h.extend_back(1);
            h.add(h.len() - 1, 0, step as f32, 0, step);
            if let Some(open) = open {
                h.seal(h.len().saturating_sub(open));
            }
            if h.len() > 40 {
                h.pop_front();
            }
        }
        assert_eq!(h.len(), 40);
        h.bytes()
    }

    #[test]
    fn a_steady_history_holds_no_slack() {
        // Allowing for the allocator rounding up: 40 steps × (32 × 5 + 8) bytes with every step
        // open; with 36 closed (a window of 36 steps behind a 4-step lateness) only the open
        // steps keep a count byte.
        for (open, exact) in [
            (None, 40 * (32 * 5 + 8)),
            (Some(4), 40 * (32 * 4 + 8) + 4 * 32),
        ] {
            let bytes = steady_bytes(open);
            assert!(bytes <= exact + exact / 10, "{bytes} bytes for {exact}");
        }
    }

    #[test]
    fn closed_steps_keep_means_but_drop_counts() {
        let mut h = History::default();
        h.widen(2);
        h.add_partition();
        h.extend_back(3);
        h.add(0, 0, 1.0, 0, 1);
        h.add(0, 0, 3.0, 0, 2);
        h.add(2, 1, 5.0, 0, 3);
        h.seal(2);
        assert_eq!(h.mean(0, 0), Some(2.0));
        assert_eq!(h.mean(0, 1), None);
        assert_eq!(h.mean(2, 1), Some(5.0));
        // The open step still averages.
        h.add(2, 1, 7.0, 0, 4);
        assert_eq!(h.mean(2, 1), Some(6.0));
        // Sealing never reopens, and more than held is all of it.
        h.seal(1);
        h.seal(9);
        h.extend_back(1);
        h.add(3, 0, 2.0, 0, 5);
        h.add(3, 0, 4.0, 0, 6);
        assert_eq!(h.mean(3, 0), Some(3.0));
        h.pop_front();
        h.pop_front();
        h.pop_front();
        assert_eq!(h.len(), 1);
        assert_eq!(h.mean(0, 0), Some(3.0));
        // Widening reaches the counts of the open step too.
        h.widen(3);
        h.add(0, 2, 1.0, 0, 7);
        h.add(0, 2, 2.0, 0, 8);
        assert_eq!(h.mean(0, 2), Some(1.5));
        assert_eq!(h.lows(0).collect::<Vec<_>>(), vec![(0, 5)]);
    }
}
