//! Bytes revisions take on disk after compression (docs/DESIGN.md,
//! "Space"), counted the way `compsize` counts them: each data extent's
//! on-disk size once however many files and offsets reference it, plus the
//! data stored inline in metadata items. Pure arithmetic over the file
//! extent items btrfs reports; the server's storage layer reads them.
//!
//! Shown only where it says something: when none of the counted extents
//! is compressed the figure is the logical one again, and `None` says so.

/// One file extent item of a file, as btrfs stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataItem {
    /// Data kept in the metadata item itself: `disk` bytes as stored.
    Inline { disk: u64, compressed: bool },
    /// A reference to (part of) the data extent at disk address `bytenr`,
    /// which takes `disk` bytes on disk whatever part is referenced.
    /// `bytenr` 0 is a hole.
    Extent {
        bytenr: u64,
        disk: u64,
        compressed: bool,
    },
}

/// The on-disk data of a set of files (one revision's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OnDisk {
    /// Inline bytes (each item is its own file's: never shared).
    inline: u64,
    /// `(bytenr, disk bytes)` of each data extent, sorted, each once.
    extents: Vec<(u64, u64)>,
    /// Whether any item is compressed.
    compressed: bool,
}

impl OnDisk {
    pub fn of(items: impl IntoIterator<Item = DataItem>) -> Self {
        let mut on = OnDisk::default();
        for item in items {
            match item {
                DataItem::Inline { disk, compressed } => {
                    on.inline = on.inline.saturating_add(disk);
                    on.compressed |= compressed;
                }
                DataItem::Extent { bytenr: 0, .. } => {}
                DataItem::Extent {
                    bytenr,
                    disk,
                    compressed,
                } => {
                    on.extents.push((bytenr, disk));
                    on.compressed |= compressed;
                }
            }
        }
        on.extents.sort_unstable();
        on.extents.dedup_by_key(|e| e.0);
        on
    }

    /// Bytes on disk after compression; `None` when nothing is compressed.
    pub fn bytes(&self) -> Option<u64> {
        set_bytes([self])
    }
}

/// Bytes on disk after compression of several sets (a job's revisions),
/// each data extent once; `None` when nothing of them is compressed.
pub fn set_bytes<'a>(sets: impl IntoIterator<Item = &'a OnDisk>) -> Option<u64> {
    let mut inline = 0u64;
    let mut compressed = false;
    let mut extents = Vec::new();
    for s in sets {
        inline = inline.saturating_add(s.inline);
        compressed |= s.compressed;
        extents.extend_from_slice(&s.extents);
    }
    if !compressed {
        return None;
    }
    extents.sort_unstable();
    extents.dedup_by_key(|e| e.0);
    Some(
        extents
            .iter()
            .fold(inline, |sum, &(_, disk)| sum.saturating_add(disk)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(bytenr: u64, disk: u64, compressed: bool) -> DataItem {
        DataItem::Extent {
            bytenr,
            disk,
            compressed,
        }
    }

    #[test]
    fn nothing_compressed_shows_nothing() {
        let plain = OnDisk::of([ext(4096, 8192, false), ext(0, 0, false)]);
        assert_eq!(plain.bytes(), None);
        assert_eq!(set_bytes([&plain, &plain]), None);
        assert_eq!(OnDisk::default().bytes(), None);
    }

    #[test]
    fn an_extent_referenced_twice_counts_once_and_holes_count_nothing() {
        // A compressed 128 KiB extent stored in 8 KiB, referenced at two
        // offsets (after a partial overwrite), a hole, inline data.
        let rev = OnDisk::of([
            ext(1 << 20, 8192, true),
            ext(0, 0, false),
            ext(1 << 20, 8192, true),
            ext(2 << 20, 4096, false),
            DataItem::Inline {
                disk: 100,
                compressed: true,
            },
        ]);
        assert_eq!(rev.bytes(), Some(8192 + 4096 + 100));
    }

    #[test]
    fn revisions_sharing_extents_count_them_once_per_job() {
        let rev1 = OnDisk::of([ext(100, 10, true), ext(200, 20, true)]);
        let rev2 = OnDisk::of([ext(100, 10, true), ext(300, 5, true)]);
        assert_eq!(rev1.bytes(), Some(30));
        assert_eq!(rev2.bytes(), Some(15));
        assert_eq!(set_bytes([&rev1, &rev2]), Some(35));
        // One compressed revision makes the job's figure worth showing,
        // and it counts the plain one's extents too.
        let plain = OnDisk::of([ext(400, 7, false)]);
        assert_eq!(set_bytes([&rev1, &plain]), Some(37));
    }

    proptest! {
        /// The job's figure is the sum over distinct extents, whatever the
        /// order and split into revisions, and never more than the
        /// revisions' figures added up.
        #[test]
        fn each_extent_counts_once(
            revs in prop::collection::vec(
                prop::collection::vec((0u64..20, any::<bool>()), 0..10), 1..5),
        ) {
            // Disk size a function of the address, as on a filesystem.
            let item = |&(b, c): &(u64, bool)| ext(b, b * 3 + 1, c);
            let sets: Vec<OnDisk> =
                revs.iter().map(|r| OnDisk::of(r.iter().map(item))).collect();
            let any_compressed = revs.iter().flatten().any(|&(b, c)| c && b != 0);
            let distinct: std::collections::BTreeSet<u64> =
                revs.iter().flatten().map(|&(b, _)| b).filter(|&b| b != 0).collect();
            let expected = distinct.iter().map(|b| b * 3 + 1).sum::<u64>();
            let job = set_bytes(&sets);
            prop_assert_eq!(job, any_compressed.then_some(expected));
            prop_assert_eq!(set_bytes(sets.iter().rev()), job);
            let each: u64 = sets.iter().flat_map(|s| &s.extents).map(|e| e.1).sum();
            if let Some(j) = job {
                prop_assert!(j <= each);
            }
        }
    }
}
