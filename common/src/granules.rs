//! The granule exchange of a push (protocol 2): for a block whose digest
//! differs from the parent's, the client sends one short digest per 64 KiB
//! granule, the server answers with a bitmap of the granules whose digests
//! differ from the parent's, and only those travel. Both sides validate
//! what the other sends with the functions here.
//!
//! Granule digests are BLAKE3 cut to 16 bytes: 1 KiB for a 4 MiB block. A
//! collision only makes a granule stay the parent's; the server's digest of
//! the block then differs from the client's manifest and nothing commits.

use crate::manifest::{zero_digest, Digest};
use crate::ranges::{is_all_zero, GRANULE};
use crate::{Error, Result};
use std::ops::Range;

/// Bytes of one granule digest.
pub const GRANULE_DIGEST_LEN: usize = 16;

/// Granules of a block of `len` bytes (the last one may be short).
pub fn granule_count(len: u64) -> usize {
    len.div_ceil(GRANULE) as usize
}

/// The short digest of one granule; all-zero granules are not hashed.
fn granule_digest(data: &[u8]) -> [u8; GRANULE_DIGEST_LEN] {
    let full: Digest = if is_all_zero(data) {
        zero_digest(data.len() as u64)
    } else {
        *blake3::hash(data).as_bytes()
    };
    let mut short = [0u8; GRANULE_DIGEST_LEN];
    short.copy_from_slice(&full[..GRANULE_DIGEST_LEN]);
    short
}

/// The granule digests of a block's bytes, concatenated.
pub fn digests(block: &[u8]) -> Vec<u8> {
    block.chunks(GRANULE as usize).flat_map(granule_digest).collect()
}

/// Checks granule digests a client sent for a block of `len` bytes.
pub fn check_digests(digests: &[u8], len: u64) -> Result<()> {
    let want = granule_count(len) * GRANULE_DIGEST_LEN;
    if digests.len() != want {
        return Err(Error::invalid(format!(
            "granule digests of {} bytes for a block of {len} bytes: must be {want}",
            digests.len()
        )));
    }
    Ok(())
}

/// The bitmap of granules whose digests differ (bit `i % 8` of byte
/// `i / 8` for granule `i`). Both must be checked with [`check_digests`].
pub fn differing(ours: &[u8], theirs: &[u8]) -> Vec<u8> {
    let count = ours.len() / GRANULE_DIGEST_LEN;
    let mut bitmap = vec![0u8; count.div_ceil(8)];
    let pairs = ours
        .chunks_exact(GRANULE_DIGEST_LEN)
        .zip(theirs.chunks_exact(GRANULE_DIGEST_LEN));
    for (i, (a, b)) in pairs.enumerate() {
        if a != b {
            bitmap[i / 8] |= 1 << (i % 8);
        }
    }
    bitmap
}

/// The bitmap asking for every granule of a block of `len` bytes.
pub fn all_wanted(len: u64) -> Vec<u8> {
    let count = granule_count(len);
    let mut bitmap = vec![0xffu8; count.div_ceil(8)];
    if !count.is_multiple_of(8) {
        if let Some(last) = bitmap.last_mut() {
            *last = (1u8 << (count % 8)) - 1;
        }
    }
    bitmap
}

/// The bitmap asking for nothing of a block of `len` bytes.
pub fn none_wanted(len: u64) -> Vec<u8> {
    vec![0u8; granule_count(len).div_ceil(8)]
}

/// The byte ranges inside a block of `len` bytes that a bitmap asks for,
/// neighbouring granules merged; refuses a bitmap of the wrong length or
/// naming granules beyond the block (a server's answer is validated, not
/// trusted).
pub fn wanted_ranges(bitmap: &[u8], len: u64) -> Result<Vec<Range<usize>>> {
    let count = granule_count(len);
    if bitmap.len() != count.div_ceil(8) {
        return Err(Error::invalid(format!(
            "granule bitmap of {} bytes for a block of {count} granules",
            bitmap.len()
        )));
    }
    let is_set = |i: usize| bitmap[i / 8] & (1 << (i % 8)) != 0;
    if (count..bitmap.len() * 8).any(is_set) {
        return Err(Error::invalid(format!(
            "granule bitmap names granules beyond the block's {count}"
        )));
    }
    let g = GRANULE as usize;
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for i in (0..count).filter(|&i| is_set(i)) {
        let r = i * g..((i + 1) * g).min(len as usize);
        match ranges.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => ranges.push(r),
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: usize = GRANULE as usize;

    #[test]
    fn only_changed_granules_are_wanted() {
        let parent: Vec<u8> = (0..4 * G + 100).map(|i| (i % 251) as u8).collect();
        let mut block = parent.clone();
        block[G + 5] ^= 1; // granule 1
        block[4 * G + 99] ^= 1; // the short last granule
        let (ours, theirs) = (digests(&parent), digests(&block));
        check_digests(&theirs, block.len() as u64).unwrap();
        assert_eq!(theirs.len(), 5 * GRANULE_DIGEST_LEN);
        let bitmap = differing(&ours, &theirs);
        assert_eq!(bitmap, [0b1_0010]);
        let ranges = wanted_ranges(&bitmap, block.len() as u64).unwrap();
        assert_eq!(ranges, [G..2 * G, 4 * G..4 * G + 100]);
        // Neighbours merge; nothing differing asks for nothing.
        let merged = wanted_ranges(&[0b110], 3 * G as u64).unwrap();
        assert_eq!((merged.len(), merged[0].clone()), (1, G..3 * G));
        assert!(wanted_ranges(&differing(&ours, &ours), block.len() as u64)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn zero_granules_digest_like_hashed_zeros() {
        let zeros = vec![0u8; G];
        let d = digests(&zeros);
        assert_eq!(d[..], blake3::hash(&zeros).as_bytes()[..GRANULE_DIGEST_LEN]);
    }

    #[test]
    fn bad_digests_and_bitmaps_are_refused() {
        assert!(check_digests(&[0; 16], 2 * G as u64).is_err());
        assert!(check_digests(&[0; 32], 2 * G as u64).is_ok());
        // Wrong length, and a bit beyond the block's 3 granules.
        assert!(wanted_ranges(&[0, 0], 3 * G as u64).is_err());
        assert!(wanted_ranges(&[0b1000], 3 * G as u64).is_err());
    }

    #[test]
    fn all_and_none_wanted_cover_exactly_the_block() {
        for len in [
            1,
            GRANULE - 1,
            GRANULE,
            GRANULE + 1,
            7 * GRANULE,
            8 * GRANULE,
            9 * GRANULE + 3,
            64 * GRANULE,
        ] {
            let all = wanted_ranges(&all_wanted(len), len).unwrap();
            assert_eq!(all, vec![0..len as usize], "len {len}");
            assert!(
                wanted_ranges(&none_wanted(len), len).unwrap().is_empty(),
                "len {len}"
            );
        }
    }
}
