//! A set of block indexes kept as disjoint ranges: memory and time follow
//! the number of ranges a push wrote, not the blocks they span (one zero
//! range over a 16 TiB image is one entry).

use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockSet {
    /// start -> end (exclusive); ranges neither overlap nor touch.
    ranges: BTreeMap<u64, u64>,
}

impl BlockSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many blocks the set holds.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    pub fn contains(&self, block: u64) -> bool {
        self.ranges
            .range(..=block)
            .next_back()
            .is_some_and(|(_, &end)| block < end)
    }

    pub fn insert(&mut self, blocks: Range<u64>) {
        if blocks.is_empty() {
            return;
        }
        let (mut start, mut end) = (blocks.start, blocks.end);
        // Merge with a range that overlaps or touches on the left.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Swallow every range starting inside or right after.
        let inside: Vec<(u64, u64)> = self.ranges.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    pub fn remove(&mut self, blocks: Range<u64>) {
        if blocks.is_empty() {
            return;
        }
        let first = self
            .ranges
            .range(..blocks.start)
            .next_back()
            .filter(|(_, &e)| e > blocks.start)
            .map(|(&s, _)| s)
            .unwrap_or(blocks.start);
        let hit: Vec<(u64, u64)> = self
            .ranges
            .range(first..blocks.end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.ranges.remove(&s);
            if s < blocks.start {
                self.ranges.insert(s, blocks.start);
            }
            if e > blocks.end {
                self.ranges.insert(blocks.end, e);
            }
        }
    }

    /// The ranges in ascending order.
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }

    /// The ranges below `limit`, clipped to it, in ascending order.
    pub fn ranges_below(&self, limit: u64) -> Vec<Range<u64>> {
        self.ranges
            .range(..limit)
            .map(|(&s, &e)| s..e.min(limit))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn merges_and_splits() {
        let mut s = BlockSet::new();
        s.insert(10..20);
        s.insert(20..25);
        s.insert(0..3);
        assert_eq!(s.ranges().collect::<Vec<_>>(), [0..3, 10..25]);
        assert_eq!(s.len(), 18);
        s.remove(12..14);
        assert_eq!(s.ranges().collect::<Vec<_>>(), [0..3, 10..12, 14..25]);
        assert!(s.contains(11) && !s.contains(12) && s.contains(14) && !s.contains(25));
        assert_eq!(s.ranges_below(15), [0..3, 10..12, 14..15]);
        s.insert(2..30);
        assert_eq!(s.ranges().next(), Some(0..30));
        assert_eq!(s.ranges().count(), 1);
        s.remove(0..u64::MAX);
        assert!(s.is_empty());
    }

    proptest! {
        #[test]
        fn behaves_like_a_bitmap(ops in proptest::collection::vec((any::<bool>(), 0u64..300, 0u64..40), 0..60)) {
            let mut s = BlockSet::new();
            let mut model = vec![false; 400];
            for (insert, start, len) in ops {
                if insert { s.insert(start..start + len) } else { s.remove(start..start + len) }
                for b in start..start + len {
                    model[b as usize] = insert;
                }
                let ranges: Vec<_> = s.ranges().collect();
                for w in ranges.windows(2) {
                    prop_assert!(w[0].end < w[1].start, "disjoint, not touching");
                }
                for (b, &want) in model.iter().enumerate() {
                    prop_assert_eq!(s.contains(b as u64), want);
                }
            }
        }
    }
}
