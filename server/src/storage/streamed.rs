//! Digests of blocks computed from the pushed data as it arrives, so the
//! commit re-reads from disk only blocks that were not sent whole.
//!
//! A block counts as known when one run of data frames covers it from its
//! first to its last byte in order (what a scanning client sends for every
//! changed block), or one zero range covers it whole. Anything else that
//! touches a block (a partial range, a gap, an overlap, a later frame)
//! forgets it, and the commit reads it back as before.

use backy_common::blockset::BlockSet;
use backy_common::manifest::{Digest, Manifest};
use backy_common::ranges::{blocks_of, Extent};
use backy_common::Result;

pub struct Streamed {
    block_size: u64,
    /// Digests of known blocks (others hold stale values); shares its
    /// unwritten chunks with the manifest it started from.
    digests: Manifest,
    known: BlockSet,
    /// The block being hashed and the offset its next byte must come from.
    current: Option<(u64, u64, blake3::Hasher)>,
}

impl Streamed {
    /// For an image described by `manifest` (any digests; only its size and
    /// block size matter).
    pub fn new(manifest: Manifest) -> Self {
        Streamed {
            block_size: manifest.block_size() as u64,
            known: BlockSet::new(),
            digests: manifest,
            current: None,
        }
    }

    /// The digest of `block` if the stream covered it whole.
    pub fn get(&self, block: u64) -> Option<&Digest> {
        self.is_known(block).then(|| self.digests.get(block)).flatten()
    }

    /// Data written at `offset` (already validated to lie in the image).
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let block = pos / self.block_size;
            let start = self.digests.block_offset(block);
            let end = start + self.digests.block_len(block);
            let n = ((end - pos) as usize).min(rest.len());
            let (piece, tail) = rest.split_at(n);
            let continues = matches!(&self.current, Some((b, next, _)) if *b == block && *next == pos);
            if !continues {
                self.current = None;
                self.forget(block);
                if pos == start {
                    self.current = Some((block, pos, blake3::Hasher::new()));
                }
            }
            if let Some((_, next, hasher)) = &mut self.current {
                hasher.update(piece);
                *next += n as u64;
                if *next == end {
                    let d = *hasher.finalize().as_bytes();
                    self.current = None;
                    self.digests.set(block, d)?;
                    self.known.insert(block..block + 1);
                }
            }
            pos += n as u64;
            rest = tail;
        }
        Ok(())
    }

    /// A zero range (already validated): whole blocks become known zeros,
    /// partly covered ones unknown. Time follows the blocks with data in
    /// the range, not its length.
    pub fn zero(&mut self, e: Extent) -> Result<()> {
        let blocks = blocks_of(e, self.block_size as u32);
        if blocks.is_empty() {
            return Ok(());
        }
        if matches!(&self.current, Some((b, _, _)) if blocks.contains(b)) {
            self.current = None;
        }
        let covered = |m: &Manifest, b: u64| {
            let start = m.block_offset(b);
            e.offset <= start && start + m.block_len(b) <= e.end()
        };
        let mut whole = blocks.clone();
        if !covered(&self.digests, whole.start) {
            self.forget(whole.start);
            whole.start += 1;
        }
        if whole.start < whole.end && !covered(&self.digests, whole.end - 1) {
            self.forget(whole.end - 1);
            whole.end -= 1;
        }
        if whole.start < whole.end {
            self.digests.set_zero(whole.start, whole.end);
            self.known.insert(whole);
        }
        Ok(())
    }

    /// A block written whole by other means (cloned from a stored copy
    /// whose digest was checked): known as `digest`.
    pub fn known(&mut self, block: u64, digest: Digest) -> Result<()> {
        if matches!(&self.current, Some((b, _, _)) if *b == block) {
            self.current = None;
        }
        self.digests.set(block, digest)?;
        self.known.insert(block..block + 1);
        Ok(())
    }

    fn is_known(&self, block: u64) -> bool {
        self.known.contains(block)
    }

    fn forget(&mut self, block: u64) {
        self.known.remove(block..block + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::manifest::{digest, zero_digest};

    const BS: u32 = 64 << 10;
    const B: u64 = BS as u64;

    fn streamed(size: u64) -> Streamed {
        Streamed::new(Manifest::zeroed(size, BS).unwrap())
    }

    fn bytes(len: u64, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn whole_blocks_in_order_are_known() {
        let mut s = streamed(3 * B + 10);
        let a = bytes(B, 1);
        s.data(0, &a[..1000]).unwrap();
        assert_eq!(s.get(0), None, "not complete yet");
        s.data(1000, &a[1000..]).unwrap();
        assert_eq!(s.get(0), Some(&digest(&a)));
        // One frame spanning two blocks and the short last block.
        let b = bytes(2 * B + 10, 2);
        s.data(B, &b).unwrap();
        assert_eq!(s.get(1), Some(&digest(&b[..B as usize])));
        assert_eq!(s.get(2), Some(&digest(&b[B as usize..2 * B as usize])));
        assert_eq!(s.get(3), Some(&digest(&b[2 * B as usize..])));
    }

    #[test]
    fn partial_gappy_or_overwritten_blocks_are_unknown() {
        let mut s = streamed(4 * B);
        let a = bytes(B, 3);
        // Starts mid-block.
        s.data(1, &a[1..]).unwrap();
        assert_eq!(s.get(0), None);
        // A gap.
        s.data(B, &a[..100]).unwrap();
        s.data(B + 200, &a[200..]).unwrap();
        assert_eq!(s.get(1), None);
        // Known, then partly overwritten.
        s.data(2 * B, &a).unwrap();
        assert!(s.get(2).is_some());
        s.data(2 * B + 5, &a[..5]).unwrap();
        assert_eq!(s.get(2), None);
        // Interrupted by a zero range inside it.
        s.data(3 * B, &a[..100]).unwrap();
        s.zero(Extent {
            offset: 3 * B + 100,
            len: 10,
        })
        .unwrap();
        s.data(3 * B + 100, &a[100..]).unwrap();
        assert_eq!(s.get(3), None);
    }

    #[test]
    fn zero_ranges_know_whole_blocks_only() {
        let mut s = streamed(4 * B + 10);
        s.data(0, &bytes(B, 4)).unwrap();
        s.zero(Extent {
            offset: 10,
            len: 3 * B - 5,
        })
        .unwrap();
        assert_eq!(s.get(0), None, "partly zeroed");
        assert_eq!(s.get(1), Some(&zero_digest(B)));
        assert_eq!(s.get(2), Some(&zero_digest(B)));
        assert_eq!(s.get(3), None, "partly zeroed");
        s.zero(Extent {
            offset: 4 * B,
            len: 10,
        })
        .unwrap();
        assert_eq!(s.get(4), Some(&zero_digest(10)));
    }
}
