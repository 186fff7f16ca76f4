//! Disk space of revisions counted the way `btrfs filesystem du` counts it
//! (docs/DESIGN.md, "Space"): from the extents FIEMAP reports per file, a
//! file's *total* (its extents, shared or not), its *exclusive* bytes
//! (extents no other file references) and, for a set of files, the *set
//! shared* bytes (the shared extents' physical ranges, each byte once).
//! A job's real use is its exclusive bytes plus its set shared bytes: an
//! extent shared by several revisions counts once. Pure arithmetic; the
//! server's storage layer does the ioctl.

/// FIEMAP extent flags (linux/fiemap.h) this module reads.
pub mod flags {
    /// The file's last extent.
    pub const LAST: u32 = 0x0000_0001;
    /// Location not known yet.
    pub const UNKNOWN: u32 = 0x0000_0002;
    /// Delayed allocation: no space chosen yet.
    pub const DELALLOC: u32 = 0x0000_0004;
    /// Data stored in the metadata (takes no data space).
    pub const DATA_INLINE: u32 = 0x0000_0200;
    /// The extent is referenced more than once (btrfs, XFS).
    pub const SHARED: u32 = 0x0000_2000;
}

/// Extents `btrfs filesystem du` leaves out: inline data takes no data
/// space; unknown and delayed ones have no place on disk yet.
const SKIPPED: u32 = flags::UNKNOWN | flags::DELALLOC | flags::DATA_INLINE;

/// One extent as FIEMAP reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// Physical bytes `[start, end)`.
pub type Range = (u64, u64);

/// What a set of files (one revision's) holds: enough to count it alone
/// and, with other revisions, a job's shared extents once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilesSpace {
    pub total: u64,
    pub exclusive: u64,
    /// Physical ranges of the shared extents: sorted, disjoint, not touching.
    pub shared_ranges: Vec<Range>,
}

impl FilesSpace {
    /// Counts the extents of one or more files.
    pub fn of(extents: impl IntoIterator<Item = Extent>) -> Self {
        let mut space = FilesSpace::default();
        let mut shared = Vec::new();
        for e in extents {
            if e.flags & SKIPPED != 0 || e.length == 0 {
                continue;
            }
            space.total = space.total.saturating_add(e.length);
            if e.flags & flags::SHARED != 0 {
                shared.push((e.physical, e.physical.saturating_add(e.length)));
            } else {
                space.exclusive = space.exclusive.saturating_add(e.length);
            }
        }
        space.shared_ranges = merge(shared);
        space
    }

    /// Alone, as `btrfs filesystem du` prints a file: shared is what is
    /// not exclusive (counted per reference).
    pub fn usage(&self) -> Usage {
        Usage {
            total: self.total,
            exclusive: self.exclusive,
            shared: self.total - self.exclusive,
        }
    }
}

/// Total, exclusive and shared bytes, as `btrfs filesystem du` prints them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every extent of every file, shared ones once per reference.
    pub total: u64,
    /// Extents no other file references.
    pub exclusive: u64,
    /// Of one file: `total - exclusive`. Of a set: "set shared", each
    /// shared physical byte once.
    pub shared: u64,
}

impl Usage {
    /// What the files really take on disk: exclusive plus shared (each
    /// shared byte once; for a set, also those it shares with files
    /// outside it).
    pub fn used(&self) -> u64 {
        self.exclusive.saturating_add(self.shared)
    }
}

/// A set of revisions (a job) as `btrfs filesystem du -s` of their files:
/// totals and exclusives add up, shared extents count once however many
/// revisions reference them.
pub fn set_usage<'a>(revisions: impl IntoIterator<Item = &'a FilesSpace>) -> Usage {
    let mut usage = Usage::default();
    let mut shared = Vec::new();
    for r in revisions {
        usage.total = usage.total.saturating_add(r.total);
        usage.exclusive = usage.exclusive.saturating_add(r.exclusive);
        shared.extend_from_slice(&r.shared_ranges);
    }
    usage.shared = merge(shared).iter().map(|(s, e)| e - s).sum();
    usage
}

/// The union of `ranges` as sorted, disjoint ranges that do not touch;
/// empty ranges are dropped.
pub fn merge(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.retain(|(s, e)| s < e);
    ranges.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            physical,
            length,
            flags,
        }
    }

    #[test]
    fn a_file_counts_its_extents_and_skips_what_btrfs_du_skips() {
        let s = FilesSpace::of([
            ext(0, 10, 0),
            ext(100, 20, flags::SHARED),
            ext(0, 60, flags::DATA_INLINE | flags::LAST),
            ext(500, 7, flags::DELALLOC),
            ext(600, 7, flags::UNKNOWN),
            ext(700, 0, 0),
        ]);
        assert_eq!(
            s,
            FilesSpace {
                total: 30,
                exclusive: 10,
                shared_ranges: vec![(100, 120)],
            }
        );
        assert_eq!(
            s.usage(),
            Usage {
                total: 30,
                exclusive: 10,
                shared: 20
            }
        );
    }

    #[test]
    fn a_full_revision_and_a_small_change_count_one_image_plus_the_change() {
        // Revision 1: 100 bytes at 0, of which 10..20 were later replaced
        // in revision 2 (a clone with 10 new bytes at 1000).
        let rev1 = FilesSpace::of([
            ext(0, 10, flags::SHARED),
            ext(10, 10, 0),
            ext(20, 80, flags::SHARED),
        ]);
        let rev2 = FilesSpace::of([
            ext(0, 10, flags::SHARED),
            ext(1000, 10, 0),
            ext(20, 80, flags::SHARED),
        ]);
        let job = set_usage([&rev1, &rev2]);
        assert_eq!(
            job,
            Usage {
                total: 200,
                exclusive: 20,
                shared: 90
            }
        );
        assert_eq!(job.used(), 110, "one image plus the change");
    }

    #[test]
    fn merging_joins_overlapping_and_touching_ranges() {
        assert_eq!(
            merge(vec![(5, 9), (0, 3), (3, 4), (8, 12), (20, 20), (15, 16)]),
            vec![(0, 4), (5, 12), (15, 16)]
        );
    }

    fn extents() -> impl Strategy<Value = Vec<Extent>> {
        let flag = prop_oneof![
            4 => Just(0u32),
            4 => Just(flags::SHARED),
            1 => Just(flags::DATA_INLINE),
            1 => Just(flags::DELALLOC | flags::SHARED),
        ];
        prop::collection::vec(
            (0u64..200, 0u64..40, flag).prop_map(|(p, l, f)| ext(p, l, f)),
            0..20,
        )
    }

    proptest! {
        /// Set shared is the number of distinct physical bytes in shared
        /// extents (counted byte by byte here), whatever the order.
        #[test]
        fn set_shared_counts_each_physical_byte_once(
            files in prop::collection::vec(extents(), 0..5),
        ) {
            let spaces: Vec<FilesSpace> =
                files.iter().map(|f| FilesSpace::of(f.iter().copied())).collect();
            let usage = set_usage(&spaces);
            let mut bytes = std::collections::BTreeSet::new();
            for e in files.iter().flatten() {
                if e.flags & SKIPPED == 0 && e.flags & flags::SHARED != 0 {
                    bytes.extend(e.physical..e.physical + e.length);
                }
            }
            prop_assert_eq!(usage.shared, bytes.len() as u64);
            let reversed = set_usage(spaces.iter().rev());
            prop_assert_eq!(reversed, usage);
            // Real use never exceeds the per-file count, and is at least
            // each revision's own.
            prop_assert!(usage.used() <= usage.total);
            for s in &spaces {
                prop_assert!(s.usage().used() == s.total);
                prop_assert!(usage.used() >= s.exclusive + s.shared_ranges.iter().map(|(a, b)| b - a).sum::<u64>());
            }
        }

        /// Merged ranges are sorted, disjoint, apart, and cover the same
        /// bytes.
        #[test]
        fn merged_ranges_cover_the_same_bytes(
            ranges in prop::collection::vec((0u64..300, 0u64..50), 0..30),
        ) {
            let ranges: Vec<Range> = ranges.into_iter().map(|(s, l)| (s, s + l)).collect();
            let merged = merge(ranges.clone());
            for w in merged.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
            let covered = |rs: &[Range]| {
                rs.iter().flat_map(|&(s, e)| s..e).collect::<std::collections::BTreeSet<u64>>()
            };
            prop_assert_eq!(covered(&merged), covered(&ranges));
        }
    }
}
