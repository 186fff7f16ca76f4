//! Digests of blocks computed from the pushed data as it arrives, so the
//! commit re-reads from disk only blocks that were not sent whole.
//!
//! A block counts as known when one run of data frames and zero ranges
//! covers it from its first to its last byte in order (what a scanning
//! client sends for every changed block: its all-zero granules go as zero
//! ranges), or one zero range covers it whole. Anything else that touches
//! a block (a partial range, a gap, an overlap, a later frame) forgets it,
//! and the commit reads it back as before. A block of data and holes is
//! common (a data run ends inside a block): reading it back cost a full
//! push about a tenth of the server's CPU, mostly zeroing page-cache pages
//! for the holes only to hash them.

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
            let end = self.block_end(block);
            let n = ((end - pos) as usize).min(rest.len());
            let (piece, tail) = rest.split_at(n);
            self.piece(block, pos, n as u64, |h| {
                h.update(piece);
            })?;
            pos += n as u64;
            rest = tail;
        }
        Ok(())
    }

    /// `len` bytes of `block` at `pos`, fed to the block's hasher by
    /// `feed` when they continue it (a block starts at its first byte),
    /// else the block forgotten.
    fn piece(
        &mut self,
        block: u64,
        pos: u64,
        len: u64,
        feed: impl FnOnce(&mut blake3::Hasher),
    ) -> Result<()> {
        let continues = matches!(&self.current, Some((b, next, _)) if *b == block && *next == pos);
        if !continues {
            self.current = None;
            self.forget(block);
            if pos == self.digests.block_offset(block) {
                self.current = Some((block, pos, blake3::Hasher::new()));
            }
        }
        let end = self.block_end(block);
        if let Some((_, next, hasher)) = &mut self.current {
            feed(hasher);
            *next += len;
            if *next == end {
                let d = *hasher.finalize().as_bytes();
                self.current = None;
                self.digests.set(block, d)?;
                self.known.insert(block..block + 1);
            }
        }
        Ok(())
    }

    fn covers(&self, e: Extent, block: u64) -> bool {
        e.offset <= self.digests.block_offset(block) && self.block_end(block) <= e.end()
    }

    /// The part of `block` inside the zero range `e`, as zeros.
    fn zero_piece(&mut self, e: Extent, block: u64) -> Result<()> {
        let from = e.offset.max(self.digests.block_offset(block));
        let len = e.end().min(self.block_end(block)) - from;
        self.piece(block, from, len, |h| hash_zeros(h, len))
    }

    fn block_end(&self, block: u64) -> u64 {
        self.digests.block_offset(block) + self.digests.block_len(block)
    }

    /// A zero range (already validated): whole blocks become known zeros;
    /// a part of a block continues its run like data of zeros. Time follows
    /// the partly covered blocks, not the range's length.
    pub fn zero(&mut self, e: Extent) -> Result<()> {
        let blocks = blocks_of(e, self.block_size as u32);
        if blocks.is_empty() {
            return Ok(());
        }
        let (first, last) = (blocks.start, blocks.end - 1);
        let mut whole = blocks;
        if !self.covers(e, first) {
            self.zero_piece(e, first)?;
            whole.start += 1;
        }
        if last != first && !self.covers(e, last) {
            self.zero_piece(e, last)?;
            whole.end -= 1;
        }
        if whole.start < whole.end {
            if matches!(&self.current, Some((b, _, _)) if whole.contains(b)) {
                self.current = None;
            }
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

/// Feeds `len` zero bytes to `hasher`.
fn hash_zeros(hasher: &mut blake3::Hasher, mut len: u64) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
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

    #[test]
    fn data_and_zero_ranges_in_order_make_a_block_known() {
        let mut s = streamed(4 * B);
        let a = bytes(B, 5);
        // Data, a hole, data again: one block (a data run ending inside it).
        let mut want = a.clone();
        want[100..300].fill(0);
        s.data(0, &a[..100]).unwrap();
        s.zero(Extent {
            offset: 100,
            len: 200,
        })
        .unwrap();
        assert_eq!(s.get(0), None, "not complete yet");
        s.data(300, &a[300..]).unwrap();
        assert_eq!(s.get(0), Some(&digest(&want)));
        // A zero range from inside block 1 over block 2 into block 3, then
        // the rest of block 3 as data.
        s.data(B, &a[..10]).unwrap();
        s.zero(Extent {
            offset: B + 10,
            len: 2 * B,
        })
        .unwrap();
        let mut one = vec![0u8; B as usize];
        one[..10].copy_from_slice(&a[..10]);
        assert_eq!(s.get(1), Some(&digest(&one)));
        assert_eq!(s.get(2), Some(&zero_digest(B)));
        assert_eq!(s.get(3), None);
        s.data(3 * B + 10, &a[10..]).unwrap();
        let mut three = a.clone();
        three[..10].fill(0);
        assert_eq!(s.get(3), Some(&digest(&three)));
    }

    #[test]
    fn a_zero_range_that_does_not_continue_a_block_forgets_it() {
        let mut s = streamed(2 * B);
        let a = bytes(B, 6);
        s.data(0, &a[..100]).unwrap();
        // A gap before the zero range.
        s.zero(Extent { offset: 200, len: 10 }).unwrap();
        s.data(210, &a[210..]).unwrap();
        assert_eq!(s.get(0), None);
        // A zero range over data already hashed.
        s.data(B, &a).unwrap();
        s.zero(Extent {
            offset: B + 5,
            len: 5,
        })
        .unwrap();
        assert_eq!(s.get(1), None);
    }

    proptest::proptest! {
        /// Any stream of ranges in order (data and zeros, frames cut
        /// anywhere, over a written image): every block it reports known
        /// has the digest of the image's bytes.
        #[test]
        fn known_digests_match_the_image(
            cuts in proptest::collection::vec((1u64..3 * B, proptest::bool::ANY, 0u64..3), 1..40)
        ) {
            let size = 5 * B + 77;
            let mut s = streamed(size);
            let mut image = bytes(size, 9);
            let mut pos = 0;
            for (len, is_zero, skip) in cuts {
                // Sometimes a gap (a range not sent).
                pos += skip * 1000;
                if pos >= size {
                    break;
                }
                let len = len.min(size - pos);
                if is_zero {
                    image[pos as usize..(pos + len) as usize].fill(0);
                    s.zero(Extent { offset: pos, len }).unwrap();
                } else {
                    let data = bytes(len, (pos % 251) as u8);
                    image[pos as usize..(pos + len) as usize].copy_from_slice(&data);
                    s.data(pos, &data).unwrap();
                }
                pos += len;
            }
            for block in 0..size.div_ceil(B) {
                if let Some(d) = s.get(block) {
                    let start = (block * B) as usize;
                    let end = ((block + 1) * B).min(size) as usize;
                    proptest::prop_assert_eq!(d, &digest(&image[start..end]), "block {}", block);
                }
            }
        }
    }
}
