//! Checking a restore stream as it arrives: ranges in order, without gaps,
//! inside the image, each block's bytes matching the manifest, and an end
//! marker that agrees with what came.

use backy_common::manifest::Manifest;
use backy_common::{Error, Result};

/// Pieces of zeros hashed at a time for zero ranges that cover part of a
/// block.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Follows a restore stream against the revision's manifest.
pub struct StreamCheck {
    manifest: Manifest,
    /// Names the revision in errors.
    revision: String,
    /// Offset the next range must start at.
    next: u64,
    /// Hash of the bytes of the current block so far.
    block: blake3::Hasher,
    data_bytes: u64,
    ended: bool,
    /// Record mismatching blocks instead of failing (restoring a revision
    /// that is known to be damaged).
    tolerant: bool,
    bad_blocks: Vec<u64>,
}

impl StreamCheck {
    pub fn new(manifest: Manifest, revision: &str) -> Self {
        StreamCheck {
            manifest,
            revision: revision.to_string(),
            next: 0,
            block: blake3::Hasher::new(),
            data_bytes: 0,
            ended: false,
            tolerant: false,
            bad_blocks: Vec::new(),
        }
    }

    /// A check that records mismatching blocks instead of failing: for a
    /// distrusted revision, which is restored as far as it goes.
    pub fn tolerant(manifest: Manifest, revision: &str) -> Self {
        StreamCheck {
            tolerant: true,
            ..Self::new(manifest, revision)
        }
    }

    /// Offsets of blocks that did not match (tolerant checks only).
    pub fn bad_blocks(&self) -> &[u64] {
        &self.bad_blocks
    }

    /// Offset up to which the image has arrived and been checked (up to the
    /// last complete block).
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Data payload bytes received.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// A data range; checked before the caller writes it anywhere, except
    /// for the block digest, which is known only when the block is complete.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.range(offset, data.len() as u64)?;
        self.data_bytes += data.len() as u64;
        let mut rest = data;
        while !rest.is_empty() {
            let room = (self.block_end() - self.next) as usize;
            let (piece, tail) = rest.split_at(room.min(rest.len()));
            // One thread (SIMD): the network side decodes in parallel, and
            // rayon's idle spinning costs more than it gains on 2 cores.
            self.block.update(piece);
            self.advance(piece.len() as u64)?;
            rest = tail;
        }
        Ok(())
    }

    /// A zero range. Whole blocks are compared with the manifest's zero
    /// digest without hashing; parts of blocks are hashed.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.range(offset, len)?;
        let end = offset + len;
        while self.next < end {
            let block_end = self.block_end();
            let at_block_start = self.next == self.manifest.block_offset(self.current_block());
            if at_block_start && block_end <= end {
                let index = self.current_block();
                if !self.manifest.is_zero(index) {
                    if !self.tolerant {
                        return Err(self.mismatch(index));
                    }
                    self.bad_blocks.push(self.manifest.block_offset(index));
                }
                self.next = block_end;
                continue;
            }
            let n = (block_end.min(end) - self.next).min(ZEROS.len() as u64);
            self.block.update(&ZEROS[..n as usize]);
            self.advance(n)?;
        }
        Ok(())
    }

    /// The end marker: everything arrived, and as much data as the server
    /// says it sent.
    pub fn end(&mut self, bytes_sent: u64) -> Result<()> {
        if self.ended {
            return Err(Error::data_loss("restore stream has two end markers"));
        }
        if self.next != self.manifest.image_size() {
            return Err(Error::data_loss(format!(
                "restore stream ended at offset {} of {}",
                self.next,
                self.manifest.image_size()
            )));
        }
        if bytes_sent != self.data_bytes {
            return Err(Error::data_loss(format!(
                "server says it sent {bytes_sent} data bytes, {} arrived",
                self.data_bytes
            )));
        }
        self.ended = true;
        Ok(())
    }

    /// Checks a range continues the stream inside the image.
    fn range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.manifest.image_size();
        if self.ended {
            return Err(Error::data_loss("restore stream goes on after its end marker"));
        }
        if offset != self.next {
            return Err(Error::data_loss(format!(
                "restore stream out of order: expected offset {}, got {offset}",
                self.next
            )));
        }
        if len == 0 {
            return Err(Error::data_loss(format!("empty range at offset {offset}")));
        }
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::data_loss(format!(
                "range at offset {offset} of {len} bytes goes beyond the image size {size}"
            )));
        }
        Ok(())
    }

    fn current_block(&self) -> u64 {
        self.next / self.manifest.block_size() as u64
    }

    fn block_end(&self) -> u64 {
        let b = self.current_block();
        self.manifest.block_offset(b) + self.manifest.block_len(b)
    }

    /// Moves on by `n` bytes hashed into the current block, checking the
    /// block when it is complete.
    fn advance(&mut self, n: u64) -> Result<()> {
        let index = self.current_block();
        self.next += n;
        if self.next == self.manifest.block_offset(index) + self.manifest.block_len(index) {
            let digest = *self.block.finalize().as_bytes();
            self.block.reset();
            if self.manifest.get(index) != Some(&digest) {
                if !self.tolerant {
                    return Err(self.mismatch(index));
                }
                self.bad_blocks.push(self.manifest.block_offset(index));
            }
        }
        Ok(())
    }

    fn mismatch(&self, index: u64) -> Error {
        Error::data_loss(format!(
            "block at offset {} does not match the manifest of revision {}",
            self.manifest.block_offset(index),
            self.revision
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::manifest::digest;
    use backy_common::ErrorKind;

    const BS: u32 = 64 << 10;
    const B: u64 = BS as u64;

    /// An image with data in block 1 and the short last block 3.
    fn image() -> Vec<u8> {
        let mut img = vec![0u8; 3 * B as usize + 100];
        img[B as usize..2 * B as usize].fill(5);
        img[3 * B as usize + 50] = 1;
        img
    }

    fn manifest(img: &[u8]) -> Manifest {
        let mut m = Manifest::zeroed(img.len() as u64, BS).unwrap();
        for (i, b) in img.chunks(BS as usize).enumerate() {
            m.set(i as u64, digest(b)).unwrap();
        }
        m
    }

    #[test]
    fn accepts_a_good_stream_in_any_framing() {
        let img = image();
        // Whole blocks, as the server sends them.
        let mut c = StreamCheck::new(manifest(&img), "r");
        c.zero(0, B).unwrap();
        c.data(B, &img[B as usize..2 * B as usize]).unwrap();
        c.zero(2 * B, B).unwrap();
        c.data(3 * B, &img[3 * B as usize..]).unwrap();
        c.end(B + 100).unwrap();
        assert!(c.ended());
        // Odd framing: ranges across block boundaries, zeros as data.
        let mut c = StreamCheck::new(manifest(&img), "r");
        c.zero(0, 10).unwrap();
        c.data(10, &img[10..B as usize + 7]).unwrap();
        c.data(B + 7, &img[B as usize + 7..2 * B as usize]).unwrap();
        c.zero(2 * B, B + 50).unwrap();
        c.data(3 * B + 50, &img[3 * B as usize + 50..]).unwrap();
        assert_eq!(c.position(), img.len() as u64);
        c.end(c.data_bytes()).unwrap();
    }

    #[test]
    fn tolerant_check_records_damaged_blocks() {
        let img = image();
        let mut bad = img.clone();
        bad[B as usize + 3] ^= 1;
        let mut c = StreamCheck::tolerant(manifest(&img), "r");
        c.zero(0, B).unwrap();
        c.data(B, &bad[B as usize..2 * B as usize]).unwrap();
        c.data(2 * B, &bad[2 * B as usize..3 * B as usize]).unwrap();
        c.zero(3 * B, 100).unwrap(); // block 3 is not zero in the manifest
        c.end(2 * B).unwrap();
        assert_eq!(c.bad_blocks(), &[B, 3 * B]);
        let mut strict = StreamCheck::new(manifest(&img), "r");
        strict.zero(0, B).unwrap();
        assert!(strict.data(B, &bad[B as usize..2 * B as usize]).is_err());
    }

    #[test]
    fn refuses_bad_streams() {
        let img = image();
        let m = manifest(&img);
        let fresh = || StreamCheck::new(m.clone(), "3xK");
        type Case = Box<dyn Fn(&mut StreamCheck) -> Result<()>>;
        let cases: Vec<(&str, Case)> = vec![
            ("expected offset 0, got 5", Box::new(|c| c.zero(5, 1))),
            (
                "expected offset 65536, got 131072",
                Box::new(|c| {
                    c.zero(0, B)?;
                    c.zero(2 * B, B)
                }),
            ),
            ("beyond the image size", Box::new(|c| c.zero(0, 10 * B))),
            ("beyond the image size", Box::new(|c| c.zero(0, u64::MAX))),
            ("empty range", Box::new(|c| c.data(0, &[]))),
            (
                "block at offset 65536 does not match the manifest of revision 3xK",
                Box::new(|c| {
                    c.zero(0, B)?;
                    c.zero(B, B)
                }),
            ),
            (
                "block at offset 65536 does not match",
                Box::new(|c| {
                    c.zero(0, B)?;
                    c.data(B, &vec![6u8; B as usize])
                }),
            ),
            (
                "block at offset 0 does not match",
                Box::new(|c| c.data(0, &vec![1u8; B as usize])),
            ),
            (
                "ended at offset 65536",
                Box::new(|c| {
                    c.zero(0, B)?;
                    c.end(0)
                }),
            ),
            (
                "server says it sent 1 data bytes, 65636 arrived",
                Box::new(|c| {
                    c.zero(0, B)?;
                    c.data(B, &image()[B as usize..2 * B as usize])?;
                    c.zero(2 * B, B)?;
                    c.data(3 * B, &image()[3 * B as usize..])?;
                    c.end(1)
                }),
            ),
            (
                "after its end marker",
                Box::new(|c| {
                    let img = image();
                    c.zero(0, B)?;
                    c.data(B, &img[B as usize..])?;
                    c.end(img.len() as u64 - B)?;
                    c.zero(img.len() as u64, 1)
                }),
            ),
        ];
        for (want, run) in cases {
            let e = run(&mut fresh()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::DataLoss, "{want}");
            assert!(e.message.contains(want), "want {want:?}, got {:?}", e.message);
        }
    }
}
