//! Rollback (delta restore): a client holding a target of the revision's
//! size compares it block by block with the revision's manifest, and for
//! each block that differs sends the granule digests of its own bytes
//! (`RestoreRequest.granules`); the server sends only the granules whose
//! digests differ from the revision's. The rules both sides apply are here:
//! what to do with a local block, how a request is bounded, and which byte
//! ranges of a block the server sends.

use crate::granules::{check_digests, differing, wanted_ranges, GRANULE_DIGEST_LEN};
use crate::manifest::{digest, Manifest};
use crate::ranges::is_all_zero;
use crate::{Error, Result};
use std::ops::Range;

/// Blocks one rollback request may name.
pub const MAX_BLOCKS: usize = 1024;
/// Bytes of granule digests one rollback request may carry (1 KiB per
/// 4 MiB block: 256 full blocks of 64 MiB, or 1024 of 4 MiB).
pub const MAX_DIGEST_BYTES: usize = 1 << 20;

/// What the target's copy of a block needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It holds what the revision does: nothing to do.
    Same,
    /// The revision's block is all zeros: the client zeroes it locally,
    /// nothing is fetched.
    Zero,
    /// It differs: ask for the granules whose digests differ (these are the
    /// target's granule digests).
    Differs(Vec<u8>),
}

/// Compares the target's bytes of `block` with the revision's manifest.
/// Zeros on either side are settled without hashing the block (half a
/// typical image is holes).
pub fn compare(manifest: &Manifest, block: u64, ours: &[u8]) -> Verdict {
    let theirs_zero = manifest.is_zero(block);
    let ours_zero = is_all_zero(ours);
    if theirs_zero {
        return if ours_zero { Verdict::Same } else { Verdict::Zero };
    }
    if !ours_zero && manifest.get(block) == Some(&digest(ours)) {
        Verdict::Same
    } else {
        Verdict::Differs(crate::granules::digests(ours))
    }
}

/// Collects the differing blocks of one request within its bounds.
#[derive(Debug, Default)]
pub struct Batch {
    pub blocks: Vec<(u64, Vec<u8>)>,
    digest_bytes: usize,
}

impl Batch {
    /// Whether a block of `len` bytes (its granule digests) still fits.
    pub fn fits(&self, len: u64) -> bool {
        let digests = crate::granules::granule_count(len) * GRANULE_DIGEST_LEN;
        self.blocks.len() < MAX_BLOCKS && self.digest_bytes + digests <= MAX_DIGEST_BYTES
    }

    pub fn push(&mut self, block: u64, digests: Vec<u8>) {
        self.digest_bytes += digests.len();
        self.blocks.push((block, digests));
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn take(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.digest_bytes = 0;
        std::mem::take(&mut self.blocks)
    }
}

/// Checks a rollback request against the revision's manifest before any
/// data is read: within the bounds, blocks ascending and inside the image,
/// each with one digest per granule of that block.
pub fn check_request<'a>(
    manifest: &Manifest,
    blocks: impl ExactSizeIterator<Item = (u64, &'a [u8])>,
) -> Result<()> {
    if blocks.len() > MAX_BLOCKS {
        return Err(Error::invalid(format!(
            "rollback request names {} blocks: at most {MAX_BLOCKS}",
            blocks.len()
        )));
    }
    let mut total = 0usize;
    let mut last: Option<u64> = None;
    for (block, digests) in blocks {
        if block >= manifest.block_count() {
            return Err(Error::invalid(format!(
                "rollback request names block {block}: the revision has {}",
                manifest.block_count()
            )));
        }
        if last.is_some_and(|l| block <= l) {
            return Err(Error::invalid(format!(
                "rollback request names block {block} out of order: blocks must ascend, each once"
            )));
        }
        last = Some(block);
        check_digests(digests, manifest.block_len(block))?;
        total += digests.len();
        if total > MAX_DIGEST_BYTES {
            return Err(Error::invalid(format!(
                "rollback request carries more than {MAX_DIGEST_BYTES} bytes of granule digests"
            )));
        }
    }
    Ok(())
}

/// The byte ranges of a block (within it) to send: the granules where the
/// revision's bytes (`theirs`) differ from the digests the client holds.
/// `ours` must have passed [`check_request`].
pub fn ranges_to_send(ours: &[u8], theirs: &[u8]) -> Result<Vec<Range<usize>>> {
    let len = theirs.len() as u64;
    let revision = crate::granules::digests(theirs);
    debug_assert_eq!(ours.len(), revision.len());
    debug_assert_eq!(ours.len() % GRANULE_DIGEST_LEN, 0);
    wanted_ranges(&differing(ours, &revision), len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::granules::digests;
    use crate::ranges::GRANULE;
    use proptest::prelude::*;

    const G: usize = GRANULE as usize;
    const BS: u32 = 4 * GRANULE as u32;

    fn manifest_of(img: &[u8]) -> Manifest {
        let mut m = Manifest::zeroed(img.len() as u64, BS).unwrap();
        for (i, b) in img.chunks(BS as usize).enumerate() {
            m.set(i as u64, digest(b)).unwrap();
        }
        m
    }

    #[test]
    fn verdicts() {
        let mut img = vec![0u8; 3 * BS as usize];
        img[BS as usize..].fill(5);
        let m = manifest_of(&img);
        let bs = BS as usize;
        assert_eq!(compare(&m, 1, &img[bs..2 * bs]), Verdict::Same);
        assert_eq!(compare(&m, 0, &[1u8; BS as usize]), Verdict::Zero);
        assert_eq!(compare(&m, 0, &img[..bs]), Verdict::Same);
        let other = vec![6u8; bs];
        assert_eq!(compare(&m, 2, &other), Verdict::Differs(digests(&other)));
        // Zeros where the revision has data.
        let zeros = vec![0u8; bs];
        assert_eq!(compare(&m, 2, &zeros), Verdict::Differs(digests(&zeros)));
    }

    #[test]
    fn requests_are_bounded_and_ordered() {
        let img = vec![1u8; 3 * BS as usize + 10];
        let m = manifest_of(&img);
        let d = digests(&img[..BS as usize]);
        let short = digests(&img[3 * BS as usize..]);
        assert!(check_request(&m, [(0, &d[..]), (3, &short[..])].into_iter()).is_ok());
        let e = check_request(&m, [(1, &d[..]), (1, &d[..])].into_iter()).unwrap_err();
        assert!(e.message.contains("out of order"), "{}", e.message);
        let e = check_request(&m, [(4, &d[..])].into_iter()).unwrap_err();
        assert!(e.message.contains("block 4"), "{}", e.message);
        let e = check_request(&m, [(3, &d[..])].into_iter()).unwrap_err();
        assert!(e.message.contains("granule digests"), "{}", e.message);
        let many = vec![(0u64, &d[..]); MAX_BLOCKS + 1];
        let e = check_request(&m, many.into_iter()).unwrap_err();
        assert!(e.message.contains("at most"), "{}", e.message);
        let mut batch = Batch::default();
        // Blocks of 32 MiB: 8 KiB of digests each, 128 fill the bound.
        let big = 32 << 20;
        for b in 0..128 {
            assert!(batch.fits(big));
            batch.push(b, vec![0; 8 << 10]);
        }
        assert!(!batch.fits(GRANULE));
        assert_eq!(batch.take().len(), 128);
        assert!(batch.is_empty() && batch.fits(big));
        for b in 0..MAX_BLOCKS as u64 {
            batch.push(b, vec![0; 16]);
        }
        assert!(!batch.fits(GRANULE), "at most {MAX_BLOCKS} blocks");
    }

    proptest! {
        /// Patching the target's block with the ranges sent gives the
        /// revision's block, and only changed granules travel.
        #[test]
        fn sent_ranges_turn_ours_into_theirs(
            len in 1usize..6 * G,
            changes in proptest::collection::vec((0usize..6 * G, any::<u8>()), 0..12),
            seed in any::<u8>(),
        ) {
            let ours: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let mut theirs = ours.clone();
            for (at, v) in &changes {
                if *at < len {
                    theirs[*at] ^= v | 1;
                }
            }
            let ranges = ranges_to_send(&digests(&ours), &theirs).unwrap();
            let mut patched = ours.clone();
            let mut sent = 0;
            for r in &ranges {
                patched[r.clone()].copy_from_slice(&theirs[r.clone()]);
                sent += r.len();
                prop_assert_eq!(r.start % G, 0);
            }
            prop_assert_eq!(&patched, &theirs);
            let changed_granules = (0..len.div_ceil(G))
                .filter(|g| ours[g * G..((g + 1) * G).min(len)] != theirs[g * G..((g + 1) * G).min(len)])
                .count();
            prop_assert!(sent <= changed_granules * G);
            // Ranges are merged: none touches the next.
            for w in ranges.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
        }
    }
}
