//! Change detection on in-memory blocks: what to send for a block, given
//! the parent's digest of it.

use crate::manifest::{digest, zero_digest, Digest, MIN_BLOCK_SIZE};

/// The smallest piece of a block handled on its own: all-zero pieces of a
/// data block travel as zero ranges (and stay holes), changed-range lists
/// are rounded to it. The smallest block size a job can have, so rounding
/// never makes a push read a block it would otherwise skip.
pub const GRANULE: u64 = MIN_BLOCK_SIZE as u64;

/// What a block needs on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Same digest as the parent's block: send nothing.
    Unchanged,
    /// All zeros (and the parent's block was not): send a zero range.
    Zero,
    /// Send the data.
    Data,
}

/// Whether every byte is zero. Comparing fixed 16-byte chunks lets the
/// optimiser vectorise without `unsafe`.
pub fn is_all_zero(data: &[u8]) -> bool {
    // Page-sized pieces keep the early exit for data blocks cheap.
    data.chunks(4096).all(|page| {
        let words = page.chunks_exact(16);
        let tail = words.remainder();
        words.fold(0u128, |acc, c| {
            acc | u128::from_ne_bytes(c.try_into().unwrap_or([1; 16]))
        }) == 0
            && tail.iter().all(|&b| b == 0)
    })
}

/// Splits `data`, found at image offset `offset`, into maximal runs that are
/// all zero or not, judged in pieces of `granule` bytes aligned in the
/// image (the first and last piece may be shorter). Yields `(start, end,
/// zero)` as indices into `data`. `granule` must not be 0.
pub fn zero_runs(offset: u64, data: &[u8], granule: u64) -> impl Iterator<Item = (usize, usize, bool)> + '_ {
    let piece_end = move |from: usize| {
        let at = offset + from as u64;
        let next = (at / granule + 1) * granule;
        (from as u64 + (next - at)).min(data.len() as u64) as usize
    };
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= data.len() {
            return None;
        }
        let zero = is_all_zero(&data[start..piece_end(start)]);
        let mut end = piece_end(start);
        while end < data.len() && is_all_zero(&data[end..piece_end(end)]) == zero {
            end = piece_end(end);
        }
        let run = (start, end, zero);
        start = end;
        Some(run)
    })
}

/// Classifies one block and returns its digest.
pub fn classify(data: &[u8], parent: Option<&Digest>) -> (Change, Digest) {
    if is_all_zero(data) {
        let d = zero_digest(data.len() as u64);
        let change = if parent == Some(&d) {
            Change::Unchanged
        } else {
            Change::Zero
        };
        return (change, d);
    }
    let d = digest(data);
    let change = if parent == Some(&d) {
        Change::Unchanged
    } else {
        Change::Data
    };
    (change, d)
}

/// A byte range of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The next range of a push stream, checked: ranges ascend (none starts
/// before `position`, the end of the last) and lie inside an image of
/// `size`. The error is the one-line reason.
pub fn next_extent(position: u64, offset: u64, len: u64, size: u64) -> Result<Extent, String> {
    if offset < position {
        return Err(format!(
            "frames out of order: range at {offset} after one ending at {position}"
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(Extent { offset, len }),
        _ => Err(format!(
            "range {offset}+{len} lies beyond the announced image size {size}"
        )),
    }
}

/// Merges touching or overlapping extents (input in any order).
pub fn coalesce(mut extents: Vec<Extent>) -> Vec<Extent> {
    extents.retain(|e| e.len > 0);
    extents.sort_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                let end = last.end().max(e.end());
                last.len = end - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

/// Extents widened to whole `granule`s (aligned in the image), cut at
/// `size`, merged: change lists from outside (QEMU bitmaps of any
/// granularity) then split blocks no finer than range lists do.
pub fn round_out(extents: &[Extent], granule: u64, size: u64) -> Vec<Extent> {
    let g = granule.max(1);
    let widened = extents
        .iter()
        .filter(|e| e.len > 0 && e.offset < size)
        .map(|e| {
            let start = e.offset / g * g;
            let end = e
                .offset
                .saturating_add(e.len)
                .div_ceil(g)
                .saturating_mul(g)
                .min(size);
            Extent {
                offset: start,
                len: end - start,
            }
        })
        .collect();
    coalesce(widened)
}

/// Block indexes an extent touches.
pub fn blocks_of(e: Extent, block_size: u32) -> std::ops::Range<u64> {
    let bs = block_size as u64;
    if e.len == 0 {
        return 0..0;
    }
    e.offset / bs..e.end().div_ceil(bs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_streams_ranges_ascend_inside_the_image() {
        assert_eq!(next_extent(0, 0, 10, 10), Ok(Extent { offset: 0, len: 10 }));
        assert_eq!(next_extent(10, 12, 3, 20), Ok(Extent { offset: 12, len: 3 }));
        assert_eq!(
            next_extent(10, 9, 1, 20),
            Err("frames out of order: range at 9 after one ending at 10".into())
        );
        assert_eq!(
            next_extent(0, 15, 6, 20),
            Err("range 15+6 lies beyond the announced image size 20".into())
        );
        // No overflow past u64::MAX.
        assert!(next_extent(0, u64::MAX, 2, u64::MAX).is_err());
    }
    use proptest::prelude::*;

    #[test]
    fn round_out_widens_to_granules() {
        let e = |offset, len| Extent { offset, len };
        let got = round_out(
            &[
                e(4096, 10),
                e(65536 + 4096, 4096),
                e(200_000, 1),
                e(0, 0),
                e(1000, 1),
            ],
            65536,
            200_001,
        );
        assert_eq!(got, [e(0, 131072), e(196608, 3393)]);
        assert_eq!(
            round_out(&[e(u64::MAX - 1, 1)], 65536, u64::MAX),
            [e(u64::MAX / 65536 * 65536, u64::MAX % 65536)]
        );
    }

    #[test]
    fn classify_table() {
        let zeros = vec![0u8; 4096];
        let mut data = zeros.clone();
        data[4095] = 1;
        let dz = zero_digest(4096);
        let dd = digest(&data);
        let cases = [
            (&zeros, None, Change::Zero),
            (&zeros, Some(dz), Change::Unchanged),
            (&zeros, Some(dd), Change::Zero),
            (&data, None, Change::Data),
            (&data, Some(dz), Change::Data),
            (&data, Some(dd), Change::Unchanged),
        ];
        for (block, parent, want) in cases {
            assert_eq!(classify(block, parent.as_ref()).0, want);
        }
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        for len in [0, 1, 15, 16, 17, 4097] {
            let mut v = vec![0u8; len];
            assert!(is_all_zero(&v));
            for i in 0..len {
                v[i] = 1;
                assert!(!is_all_zero(&v), "len {len} byte {i}");
                v[i] = 0;
            }
        }
    }

    #[test]
    fn blocks_of_extents() {
        assert_eq!(blocks_of(Extent { offset: 0, len: 1 }, 4096), 0..1);
        assert_eq!(blocks_of(Extent { offset: 4095, len: 2 }, 4096), 0..2);
        assert_eq!(
            blocks_of(
                Extent {
                    offset: 4096,
                    len: 4096
                },
                4096
            ),
            1..2
        );
        assert_eq!(blocks_of(Extent { offset: 10, len: 0 }, 4096), 0..0);
    }

    #[test]
    fn zero_runs_table() {
        let mut data = vec![0u8; 40];
        data[12] = 1; // piece 10..20 (granule 10, data at offset 3: 7..17)
        data[39] = 1;
        let runs: Vec<_> = zero_runs(3, &data, 10).collect();
        assert_eq!(
            runs,
            [(0, 7, true), (7, 17, false), (17, 37, true), (37, 40, false)]
        );
        assert_eq!(zero_runs(0, &[], 10).count(), 0);
        assert_eq!(zero_runs(5, &[0; 3], 4096).collect::<Vec<_>>(), [(0, 3, true)]);
    }

    proptest! {
        #[test]
        fn zero_runs_tile_the_data_and_judge_each_granule(
            offset in 0u64..10_000,
            granule in 1u64..600,
            ones in proptest::collection::vec(0usize..2000, 0..6),
            len in 0usize..2000,
        ) {
            let mut data = vec![0u8; len];
            for i in ones {
                if i < len {
                    data[i] = 1;
                }
            }
            let runs: Vec<_> = zero_runs(offset, &data, granule).collect();
            let mut next = 0;
            for (i, &(start, end, zero)) in runs.iter().enumerate() {
                prop_assert_eq!(start, next);
                prop_assert!(end > start);
                prop_assert_eq!(is_all_zero(&data[start..end]), zero);
                if i > 0 {
                    prop_assert_ne!(runs[i - 1].2, zero, "runs are maximal");
                }
                if end < len {
                    prop_assert_eq!((offset + end as u64) % granule, 0, "runs end on granules");
                }
                next = end;
            }
            prop_assert_eq!(next, len);
        }

        #[test]
        fn coalesce_covers_same_bytes(raw in proptest::collection::vec((0u64..1000, 0u64..50), 0..40)) {
            let input: Vec<Extent> = raw.iter().map(|&(o, l)| Extent { offset: o, len: l }).collect();
            let out = coalesce(input.clone());
            for w in out.windows(2) {
                prop_assert!(w[0].end() < w[1].offset, "sorted, disjoint, not touching");
            }
            let covered = |set: &[Extent], x: u64| set.iter().any(|e| e.offset <= x && x < e.end());
            for x in 0..1100 {
                prop_assert_eq!(covered(&input, x), covered(&out, x));
            }
        }
    }
}
