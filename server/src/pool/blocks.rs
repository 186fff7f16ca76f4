//! The digests of a push's blocks, taken from the bytes as they arrive
//! (the pool has no file to read back before the end record is written):
//! a block the ranges cover whole is digested from them; a block they
//! touch in part is completed from its base, the parent snapshot's bytes
//! (zeros for a full push or beyond the parent's end), read by the caller's
//! `base` function. Ranges come in ascending order, so one block is open
//! at a time and its bytes arrive from its start to its end: it is hashed
//! as they come (the base read for the gaps between the ranges), never
//! copied into a buffer of the block first.

use backy_common::blockset::BlockSet;
use backy_common::manifest::{digest, Manifest};
use backy_common::ranges::blocks_of;
use backy_common::ranges::Extent;

/// Reads a block's base bytes into the buffer (its length is the block's)
/// from the given image offset.
pub type BaseRead<'a, E> = dyn FnMut(u64, &mut [u8]) -> Result<(), E> + 'a;

struct Open {
    block: u64,
    /// The block's bytes below `filled`, hashed in order.
    hasher: blake3::Hasher,
    filled: usize,
    /// Some of them came from the base (a gap between the ranges).
    from_base: bool,
}

/// Zeros hashed for the parts of a block a zero range covers.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// What a piece of a block is made of.
enum Piece<'a> {
    Data(&'a [u8]),
    Zeros(usize),
}

/// Per-block digests of one push: the parent's manifest, resized, with the
/// touched blocks replaced as they complete.
pub struct BlockDigests {
    baseline: Manifest,
    current: Manifest,
    /// Blocks the ranges wrote (whole or in part).
    touched: BlockSet,
    /// Blocks whose length changed with the image's size: their digest
    /// changes with no data sent.
    resized: Vec<u64>,
    /// Blocks whose digest includes base bytes: those the snapshot is read
    /// back for.
    completed: BlockSet,
    open: Option<Open>,
    scratch: Vec<u8>,
    changed: u64,
}

impl BlockDigests {
    /// For a push onto `parent` (a full push: a zeroed manifest of size 0)
    /// giving an image of `size` bytes.
    pub fn new(parent: Manifest, size: u64) -> backy_common::Result<Self> {
        let mut baseline = parent;
        let old = baseline.image_size();
        baseline.resize(size)?;
        let resized = baseline.resize_touched(old);
        Ok(BlockDigests {
            current: baseline.clone(),
            baseline,
            touched: BlockSet::new(),
            resized,
            completed: BlockSet::new(),
            open: None,
            scratch: Vec::new(),
            changed: 0,
        })
    }

    fn block_size(&self) -> u64 {
        u64::from(self.current.block_size())
    }

    /// Data at `offset` (inside the image, after every earlier range).
    pub fn data<E>(&mut self, offset: u64, data: &[u8], base: &mut BaseRead<'_, E>) -> Result<(), E> {
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let block = pos / self.block_size();
            let start = self.current.block_offset(block);
            let len = self.current.block_len(block) as usize;
            let at = (pos - start) as usize;
            let n = (len - at).min(rest.len());
            let (piece, tail) = rest.split_at(n);
            if at == 0 && n == len {
                self.close_unless(block, base)?;
                self.set(block, digest(piece));
            } else {
                self.piece(block, at, Piece::Data(piece), base)?;
            }
            pos += n as u64;
            rest = tail;
        }
        Ok(())
    }

    /// A range that reads zeros.
    pub fn zero<E>(&mut self, offset: u64, len: u64, base: &mut BaseRead<'_, E>) -> Result<(), E> {
        let e = Extent { offset, len };
        let blocks = blocks_of(e, self.current.block_size());
        if blocks.is_empty() {
            return Ok(());
        }
        // The part of `block` inside the range, as offsets in the block;
        // `None` when the range covers it whole.
        let part = |m: &Manifest, block: u64| {
            let start = m.block_offset(block);
            let blen = m.block_len(block);
            let (from, to) = (offset.max(start), e.end().min(start + blen));
            (from != start || to != start + blen).then(|| ((from - start) as usize, (to - from) as usize))
        };
        let (first, last) = (blocks.start, blocks.end - 1);
        let mut whole = blocks.clone();
        if let Some((at, n)) = part(&self.current, first) {
            self.piece(first, at, Piece::Zeros(n), base)?;
            whole.start += 1;
        }
        let last_part = if last != first {
            part(&self.current, last)
        } else {
            None
        };
        if last_part.is_some() {
            whole.end -= 1;
        }
        if whole.start < whole.end {
            self.close_unless(whole.start, base)?;
            for b in whole.clone() {
                if !self.baseline.is_zero(b) {
                    self.changed += 1;
                }
            }
            self.current.set_zero(whole.start, whole.end);
            self.touched.insert(whole);
        }
        if let Some((at, n)) = last_part {
            self.piece(last, at, Piece::Zeros(n), base)?;
        }
        Ok(())
    }

    fn set(&mut self, block: u64, d: backy_common::manifest::Digest) {
        if self.baseline.get(block) != Some(&d) {
            self.changed += 1;
        }
        // `block` lies inside the image: set cannot fail.
        let _ = self.current.set(block, d);
        self.touched.insert(block..block + 1);
    }

    /// Closes the open block unless it is `block`.
    fn close_unless<E>(&mut self, block: u64, base: &mut BaseRead<'_, E>) -> Result<(), E> {
        if self.open.as_ref().is_some_and(|o| o.block != block) {
            self.close(base)?;
        }
        Ok(())
    }

    /// A piece of `block` at `at` within it (ranges ascend: at or after
    /// what the open block holds so far; a gap before it is the base's).
    fn piece<E>(
        &mut self,
        block: u64,
        at: usize,
        piece: Piece<'_>,
        base: &mut BaseRead<'_, E>,
    ) -> Result<(), E> {
        self.close_unless(block, base)?;
        if self.open.is_none() {
            self.open = Some(Open {
                block,
                hasher: blake3::Hasher::new(),
                filled: 0,
                from_base: false,
            });
        }
        self.fill_from_base(at, base)?;
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        match piece {
            Piece::Data(data) => {
                open.hasher.update(data);
                open.filled += data.len();
            }
            Piece::Zeros(n) => {
                let mut left = n;
                while left > 0 {
                    let k = left.min(ZEROS.len());
                    open.hasher.update(&ZEROS[..k]);
                    left -= k;
                }
                open.filled += n;
            }
        }
        Ok(())
    }

    /// Hashes the open block's base bytes from what it holds up to `to`.
    fn fill_from_base<E>(&mut self, to: usize, base: &mut BaseRead<'_, E>) -> Result<(), E> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        if to <= open.filled {
            return Ok(());
        }
        let start = self.current.block_offset(open.block) + open.filled as u64;
        self.scratch.resize(to - open.filled, 0);
        base(start, &mut self.scratch)?;
        open.hasher.update(&self.scratch);
        open.filled = to;
        open.from_base = true;
        Ok(())
    }

    /// Digests the open block, its end from the base when the ranges
    /// stopped short of it.
    fn close<E>(&mut self, base: &mut BaseRead<'_, E>) -> Result<(), E> {
        let Some(block) = self.open.as_ref().map(|o| o.block) else {
            return Ok(());
        };
        let len = self.current.block_len(block) as usize;
        self.fill_from_base(len, base)?;
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        if open.from_base {
            self.completed.insert(block..block + 1);
        }
        self.set(block, *open.hasher.finalize().as_bytes());
        Ok(())
    }

    /// Closes the open block and digests the blocks whose length changed
    /// that no range touched (from their base); returns the manifest.
    pub fn finish<E>(mut self, base: &mut BaseRead<'_, E>) -> Result<Finished, E> {
        self.close(base)?;
        for b in std::mem::take(&mut self.resized) {
            if self.touched.contains(b) {
                continue;
            }
            let len = self.current.block_len(b) as usize;
            self.scratch.resize(len, 0);
            base(self.current.block_offset(b), &mut self.scratch)?;
            self.completed.insert(b..b + 1);
            let d = digest(&self.scratch);
            self.set(b, d);
        }
        Ok(Finished {
            manifest: self.current,
            touched: self.touched,
            completed: self.completed,
            changed: self.changed,
        })
    }
}

/// What a finished [`BlockDigests`] gives.
pub struct Finished {
    pub manifest: Manifest,
    /// Every block whose bytes may differ from the parent's: written, or
    /// its length changed.
    pub touched: BlockSet,
    /// Blocks whose digest includes base bytes.
    pub completed: BlockSet,
    /// Blocks whose digest differs from the parent's.
    pub changed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    const BS: u32 = 64 << 10;

    fn members(set: &BlockSet, below: u64) -> Vec<u64> {
        (0..below).filter(|&b| set.contains(b)).collect()
    }

    fn manifest_of(image: &[u8]) -> Manifest {
        let mut m = Manifest::zeroed(image.len() as u64, BS).unwrap();
        for (b, chunk) in image.chunks(BS as usize).enumerate() {
            m.set(b as u64, digest(chunk)).unwrap();
        }
        m
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// Random ascending data and zero ranges over a parent, checked against
    /// the model image's manifest.
    fn run(seed: u64, parent_len: usize, size: usize, full: bool) {
        let mut rng = Rng(seed | 1);
        let parent: Vec<u8> = (0..parent_len).map(|i| (i as u8).wrapping_mul(7) | 1).collect();
        let mut model = if full { Vec::new() } else { parent.clone() };
        model.resize(size, 0);
        let start = if full {
            Manifest::zeroed(0, BS).unwrap()
        } else {
            manifest_of(&parent)
        };
        let mut d = BlockDigests::new(start, size as u64).unwrap();
        let mut base = |offset: u64, buf: &mut [u8]| -> Result<(), Infallible> {
            buf.fill(0);
            if !full {
                let from = (offset as usize).min(parent.len());
                let to = (offset as usize + buf.len()).min(parent.len());
                buf[..to - from].copy_from_slice(&parent[from..to]);
            }
            Ok(())
        };
        let mut pos = 0u64;
        while pos < size as u64 {
            pos += rng.below(3 * BS as u64);
            if pos >= size as u64 {
                break;
            }
            let len = (1 + rng.below(3 * BS as u64)).min(size as u64 - pos);
            let (o, l) = (pos as usize, len as usize);
            if rng.below(3) == 0 {
                d.zero(pos, len, &mut base).unwrap();
                model[o..o + l].fill(0);
            } else {
                let data: Vec<u8> = (0..l).map(|_| rng.next() as u8).collect();
                // Sent in frames of at most one block, as a client does.
                for (i, frame) in data.chunks(BS as usize).enumerate() {
                    d.data(pos + (i * BS as usize) as u64, frame, &mut base).unwrap();
                }
                model[o..o + l].copy_from_slice(&data);
            }
            pos += len;
        }
        let f = d.finish(&mut base).unwrap();
        assert_eq!(
            f.manifest,
            manifest_of(&model),
            "seed {seed} parent {parent_len} size {size}"
        );
    }

    #[test]
    fn digests_equal_the_model_images_manifest() {
        let bs = BS as usize;
        for seed in 1..40 {
            run(seed, 10 * bs + 100, 10 * bs + 100, false);
            run(seed, 10 * bs + 100, 14 * bs + 7, false);
            run(seed, 10 * bs + 100, 6 * bs + 3, false);
            run(seed, 0, 9 * bs + 1, true);
        }
    }

    #[test]
    fn only_partly_written_blocks_read_their_base() {
        let mut reads = Vec::new();
        let mut base = |offset: u64, buf: &mut [u8]| -> Result<(), Infallible> {
            reads.push(offset);
            buf.fill(0);
            Ok(())
        };
        let bs = BS as u64;
        let mut d = BlockDigests::new(Manifest::zeroed(4 * bs, BS).unwrap(), 4 * bs).unwrap();
        d.data(0, &vec![1; BS as usize], &mut base).unwrap();
        d.data(bs, &[2; 100], &mut base).unwrap();
        d.zero(bs + 100, bs - 100, &mut base).unwrap();
        d.zero(2 * bs, bs, &mut base).unwrap();
        d.data(3 * bs + 10, &[3; 10], &mut base).unwrap();
        let f = d.finish(&mut base).unwrap();
        assert_eq!(
            reads,
            [3 * bs, 3 * bs + 20],
            "blocks 0-2 were covered whole; block 3's gaps are read"
        );
        assert_eq!(members(&f.completed, 8), [3]);
        assert_eq!(members(&f.touched, 8), [0, 1, 2, 3]);
        assert_eq!(f.changed, 3, "block 2 stayed zeros");
    }

    #[test]
    fn a_grown_image_redigests_the_old_last_block_from_its_base() {
        let bs = BS as usize;
        let parent = vec![9u8; bs + 10];
        let mut base = |offset: u64, buf: &mut [u8]| -> Result<(), Infallible> {
            buf.fill(0);
            let from = (offset as usize).min(parent.len());
            let to = (offset as usize + buf.len()).min(parent.len());
            buf[..to - from].copy_from_slice(&parent[from..to]);
            Ok(())
        };
        let d = BlockDigests::new(manifest_of(&parent), 3 * BS as u64).unwrap();
        let f = d.finish(&mut base).unwrap();
        let mut model = parent.clone();
        model.resize(3 * bs, 0);
        assert_eq!(f.manifest, manifest_of(&model));
        assert_eq!(members(&f.touched, 8), [1]);
    }
}
