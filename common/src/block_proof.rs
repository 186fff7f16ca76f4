//! Checking part of a block against the manifest's digest of the whole
//! block. BLAKE3 hashes a tree of 1 KiB chunks, and each 64 KiB granule of
//! a block (the last one may be short) is a subtree of that tree. Given
//! the chaining values of all the block's granules, a reader holding only
//! some granules recomputes theirs from the bytes, merges all of them up to
//! the root and compares the root with the manifest's digest: a wrong byte
//! or a wrong chaining value from the sender changes the root (finding one
//! that does not is finding a BLAKE3 collision).
//!
//! This is how the NBD export serves a 4 KiB read from one fetched granule
//! instead of a whole 4 MiB block, and still never serves a byte the
//! manifest does not vouch for.

use crate::manifest::Digest;
use crate::ranges::GRANULE;
use crate::{Error, Result};
use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

/// Bytes of one chaining value.
pub const CV_LEN: usize = 32;

/// A granule's chaining value (a non-root node of its block's tree).
pub type ChainingValue = [u8; CV_LEN];

/// Granules of a block of `len` bytes.
pub fn granule_count(len: u64) -> usize {
    len.div_ceil(GRANULE) as usize
}

/// Whether a block of `len` bytes has a tree of granules at all: a block of
/// one granule is its own root, checked by hashing it whole.
pub fn has_granule_tree(len: u64) -> bool {
    len > GRANULE
}

/// The chaining value of granule `index` of a block of more than one
/// granule, from its bytes.
pub fn granule_cv(index: usize, data: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(index as u64 * GRANULE)
        .update(data)
        .finalize_non_root()
}

/// The chaining values of all granules of `block`, concatenated (empty for
/// a block of one granule).
pub fn chaining_values(block: &[u8]) -> Vec<u8> {
    if !has_granule_tree(block.len() as u64) {
        return Vec::new();
    }
    block
        .chunks(GRANULE as usize)
        .enumerate()
        .flat_map(|(i, g)| granule_cv(i, g))
        .collect()
}

/// The non-root chaining value of the subtree of `len` bytes whose first
/// granule is `first`.
fn subtree(cvs: &[ChainingValue], first: usize, len: u64) -> ChainingValue {
    if len <= GRANULE {
        return cvs[first];
    }
    let left = left_subtree_len(len);
    let right_first = first + (left / GRANULE) as usize;
    merge_subtrees_non_root(
        &subtree(cvs, first, left),
        &subtree(cvs, right_first, len - left),
        Mode::Hash,
    )
}

/// The BLAKE3 hash of a block of `len` bytes (more than one granule) whose
/// granules have the chaining values `cvs`.
pub fn root(cvs: &[ChainingValue], len: u64) -> Digest {
    debug_assert!(has_granule_tree(len) && cvs.len() == granule_count(len));
    let left = left_subtree_len(len);
    let right_first = (left / GRANULE) as usize;
    let hash = merge_subtrees_root(
        &subtree(cvs, 0, left),
        &subtree(cvs, right_first, len - left),
        Mode::Hash,
    );
    *hash.as_bytes()
}

/// Parses the chaining values a peer sent for a block of `len` bytes.
pub fn parse_cvs(bytes: &[u8], len: u64) -> Result<Vec<ChainingValue>> {
    let want = granule_count(len) * CV_LEN;
    if !has_granule_tree(len) || bytes.len() != want {
        return Err(Error::data_loss(format!(
            "{} bytes of chaining values for a block of {len} bytes (expected {})",
            bytes.len(),
            if has_granule_tree(len) { want } else { 0 }
        )));
    }
    Ok(bytes
        .chunks_exact(CV_LEN)
        .map(|c| {
            let mut cv = [0u8; CV_LEN];
            cv.copy_from_slice(c);
            cv
        })
        .collect())
}

/// Checks `data`, the bytes of granules `first..` of a block of `len`
/// bytes, against the block's manifest `digest` with the chaining values
/// `cvs` of all its granules (as sent, untrusted). On success the
/// chaining values are proven too (each contributed to the root) and may
/// check later granules alone with [`check_against`].
pub fn check_granules(
    digest: &Digest,
    len: u64,
    cvs: &mut [ChainingValue],
    first: usize,
    data: &[u8],
) -> Result<()> {
    if !has_granule_tree(len) || cvs.len() != granule_count(len) {
        return Err(Error::internal("check_granules: not a block of several granules"));
    }
    let start = first as u64 * GRANULE;
    if data.is_empty() || start + data.len() as u64 > len {
        return Err(Error::data_loss(format!(
            "{} bytes at granule {first} of a block of {len} bytes",
            data.len()
        )));
    }
    let sent: Vec<ChainingValue> = cvs[first..first + granule_count(data.len() as u64)].to_vec();
    for (i, g) in data.chunks(GRANULE as usize).enumerate() {
        cvs[first + i] = granule_cv(first + i, g);
    }
    if &root(cvs, len) != digest {
        // Put back what was sent: nothing unproven stays behind.
        cvs[first..first + sent.len()].copy_from_slice(&sent);
        return Err(Error::data_loss(
            "the bytes read do not match the manifest's digest of their block",
        ));
    }
    Ok(())
}

/// Checks granules `first..` against chaining values already proven by
/// [`check_granules`].
pub fn check_against(proven: &[ChainingValue], first: usize, data: &[u8]) -> Result<()> {
    for (i, g) in data.chunks(GRANULE as usize).enumerate() {
        if proven.get(first + i) != Some(&granule_cv(first + i, g)) {
            return Err(Error::data_loss(
                "the bytes read do not match the manifest's digest of their block",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::digest;
    use proptest::prelude::*;

    fn block(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
            .collect()
    }

    fn cvs_of(b: &[u8]) -> Vec<ChainingValue> {
        parse_cvs(&chaining_values(b), b.len() as u64).unwrap()
    }

    #[test]
    fn the_root_of_the_granule_tree_is_the_blocks_digest() {
        for len in [
            GRANULE as usize + 1,
            2 * GRANULE as usize,
            3 * GRANULE as usize - 7,
            (4 << 20) - 100,
            4 << 20,
            (4 << 20) + 4096,
        ] {
            let b = block(len, 3);
            assert_eq!(root(&cvs_of(&b), len as u64), digest(&b), "len {len}");
        }
    }

    #[test]
    fn a_single_granule_has_no_tree() {
        assert!(chaining_values(&block(GRANULE as usize, 1)).is_empty());
        assert!(parse_cvs(&[], GRANULE).is_err());
    }

    #[test]
    fn a_wrong_byte_or_a_wrong_cv_is_refused_and_nothing_unproven_stays() {
        let len = 4 << 20;
        let b = block(len, 9);
        let d = digest(&b);
        let good = cvs_of(&b);
        let g = GRANULE as usize;

        let mut cvs = good.clone();
        check_granules(&d, len as u64, &mut cvs, 5, &b[5 * g..7 * g]).unwrap();
        assert_eq!(cvs, good);

        let mut bad = b[5 * g..6 * g].to_vec();
        bad[100] ^= 1;
        let mut cvs = good.clone();
        assert!(check_granules(&d, len as u64, &mut cvs, 5, &bad).is_err());
        assert_eq!(cvs, good);

        // A lying sender: a wrong chaining value elsewhere in the block.
        let mut cvs = good.clone();
        cvs[40][0] ^= 1;
        assert!(check_granules(&d, len as u64, &mut cvs, 5, &b[5 * g..6 * g]).is_err());
        // Or the right bytes' chaining values but for other granules.
        let mut cvs = good.clone();
        cvs.swap(1, 2);
        assert!(check_granules(&d, len as u64, &mut cvs, 5, &b[5 * g..6 * g]).is_err());

        check_against(&good, 9, &b[9 * g..10 * g]).unwrap();
        assert!(check_against(&good, 9, &b[10 * g..11 * g]).is_err());
        assert!(check_against(&good, 63, &b[63 * g..]).is_ok());
        assert!(check_against(&good, 64, &b[..g]).is_err());
    }

    #[test]
    fn data_past_the_block_is_refused() {
        let b = block(2 * GRANULE as usize, 1);
        let mut cvs = cvs_of(&b);
        let d = digest(&b);
        assert!(check_granules(&d, b.len() as u64, &mut cvs, 1, &b).is_err());
        assert!(check_granules(&d, b.len() as u64, &mut cvs, 1, &[]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_granule_run_checks_and_any_flip_fails(
            len in (GRANULE as usize + 1)..(1usize << 20),
            seed in any::<u8>(),
            pick in any::<(u16, u16)>(),
            flip in any::<u32>(),
        ) {
            let b = block(len, seed);
            let d = digest(&b);
            let n = granule_count(len as u64);
            let first = pick.0 as usize % n;
            let count = 1 + pick.1 as usize % (n - first);
            let g = GRANULE as usize;
            let run = &b[first * g..((first + count) * g).min(len)];
            let mut cvs = cvs_of(&b);
            prop_assert!(check_granules(&d, len as u64, &mut cvs, first, run).is_ok());
            let mut bad = run.to_vec();
            let at = flip as usize % bad.len();
            bad[at] ^= 1 << (flip % 8);
            let mut cvs = cvs_of(&b);
            prop_assert!(check_granules(&d, len as u64, &mut cvs, first, &bad).is_err());
        }
    }
}
