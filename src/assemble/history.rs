//! The kept steps of one cell, stored flat.
//!
//! Per step there are `width` entries (nodes × channels, node slots in arrival order), each a
//! running mean of the readings it got and how many it got, and one least source offset per
//! partition slot. Three ring buffers hold them, sized exactly: a step costs 5 bytes an entry
//! plus 8 bytes a partition, against the 4 bytes an entry of the `f32` tensor it stands for,
//! and nothing per step besides.

use std::collections::VecDeque;

/// No reading of this partition in the step.
const NO_OFFSET: i64 = i64::MAX;

#[derive(Debug, Default)]
pub(super) struct History {
    /// Steps held.
    steps: usize,
    /// Entries per step.
    width: usize,
    /// Partition slots per step.
    partitions: usize,
    /// `[steps × width]` running means.
    means: VecDeque<f32>,
    /// `[steps × width]` readings per entry, saturating at 255: past that the mean weighs each
    /// new reading as 1/255, which only a sensor sending hundreds of readings per step notices.
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
        self.means = relayout(&self.means, self.steps, old, width, 0.0);
        self.counts = relayout(&self.counts, self.steps, old, width, 0);
        self.width = width;
    }

    /// Adds a partition slot to every step; slots are numbered in the order they were added.
    pub(super) fn add_partition(&mut self) {
        let old = self.partitions;
        self.lows = relayout(&self.lows, self.steps, old, old + 1, NO_OFFSET);
        self.partitions += 1;
    }

    /// Appends `n` empty steps.
    pub(super) fn extend_back(&mut self, n: usize) {
        self.reserve(n);
        self.means.extend(std::iter::repeat_n(0.0, n * self.width));
        self.counts.extend(std::iter::repeat_n(0, n * self.width));
        self.lows
            .extend(std::iter::repeat_n(NO_OFFSET, n * self.partitions));
        self.steps += n;
    }

    /// Prepends `n` empty steps.
    pub(super) fn extend_front(&mut self, n: usize) {
        self.reserve(n);
        for _ in 0..n * self.width {
            self.means.push_front(0.0);
            self.counts.push_front(0);
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
        self.counts.drain(..self.width);
        self.lows.drain(..self.partitions);
        self.steps -= 1;
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
        let i = step * self.width + entry;
        let count = self.counts[i].saturating_add(1);
        self.counts[i] = count;
        self.means[i] += (value - self.means[i]) / f32::from(count);
        let low = &mut self.lows[step * self.partitions + partition];
        *low = (*low).min(offset);
    }

    /// The mean of entry `entry` of step `step`, or `None` if it got no reading.
    #[cfg(test)]
    pub(super) fn mean(&self, step: usize, entry: usize) -> Option<f32> {
        let i = step * self.width + entry;
        (self.counts[i] > 0).then(|| self.means[i])
    }

    /// Lays the buffers out in one piece each, so that [`History::row`] can hand out slices.
    /// A ring that has wrapped is rotated once; until the next step is added or dropped this
    /// costs nothing.
    pub(super) fn make_contiguous(&mut self) {
        self.means.make_contiguous();
        self.counts.make_contiguous();
        self.lows.make_contiguous();
    }

    /// Step `step`'s means and counts, entry by entry. Call [`History::make_contiguous`] first.
    pub(super) fn row(&self, step: usize) -> (&[f32], &[u8]) {
        let (means, rest) = self.means.as_slices();
        let (counts, rest_counts) = self.counts.as_slices();
        debug_assert!(
            rest.is_empty() && rest_counts.is_empty(),
            "make_contiguous first"
        );
        let entries = step * self.width..(step + 1) * self.width;
        (&means[entries.clone()], &counts[entries])
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
        assert_eq!(h.row(1), (&[1.5f32, 0.0, 0.0][..], &[2u8, 0, 0][..]));
        assert_eq!(h.lows(1).collect::<Vec<_>>(), vec![(0, 11)]);
    }

    #[test]
    fn a_steady_history_holds_no_slack() {
        let mut h = History::default();
        h.widen(32);
        h.add_partition();
        for step in 0..100 {
            h.extend_back(1);
            h.add(h.len() - 1, 0, step as f32, 0, step);
            if h.len() > 40 {
                h.pop_front();
            }
        }
        assert_eq!(h.len(), 40);
        // 40 steps × (32 × 5 + 8) bytes, allowing for the allocator rounding up.
        let exact = 40 * (32 * 5 + 8);
        assert!(
            h.bytes() <= exact + exact / 10,
            "{} bytes for {exact}",
            h.bytes()
        );
    }
}
