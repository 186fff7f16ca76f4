//! Block manifests (`<rev>.digests`): one BLAKE3-256 digest per block of an
//! image, behind a fixed, self-describing header. Reader and writer live
//! side by side; the header's size is asserted at compile time.
//!
//! ```text
//! offset size  field
//! 0      8     magic "BACKYDIG"
//! 8      2     version (1), little endian like every field
//! 10     2     algorithm (1 = BLAKE3-256)
//! 12     4     digest length (32)
//! 16     4     block size
//! 20     4     reserved, 0
//! 24     8     image size
//! 32     8     block count = ceil(image size / block size)
//! 40     24    reserved, 0
//! 64     32*n  digests, block 0 first
//! ```

use crate::error::{Error, Result};
use std::sync::OnceLock;

pub type Digest = [u8; 32];

pub const MAGIC: [u8; 8] = *b"BACKYDIG";
pub const VERSION: u16 = 1;
pub const ALGO_BLAKE3: u16 = 1;
pub const HEADER_LEN: usize = 64;
pub const DIGEST_LEN: usize = 32;
/// Smallest and largest block sizes accepted (64 KiB .. 64 MiB, powers of two).
pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Largest image a manifest may describe (1 PiB); bounds allocation when
/// reading a header from outside.
pub const MAX_IMAGE_SIZE: u64 = 1 << 50;

#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    version: u16,
    algorithm: u16,
    digest_len: u32,
    block_size: u32,
    reserved0: u32,
    image_size: u64,
    block_count: u64,
    reserved1: [u8; 24],
}
const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_LEN);

/// Digest of one block's bytes.
pub fn digest(data: &[u8]) -> Digest {
    if data.len() >= 1 << 20 {
        // Large blocks: BLAKE3's tree lets all cores share one block.
        let mut h = blake3::Hasher::new();
        h.update_rayon(data);
        *h.finalize().as_bytes()
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// Digest of `len` zero bytes; the full default block size is cached.
pub fn zero_digest(len: u64) -> Digest {
    static FULL: OnceLock<Digest> = OnceLock::new();
    let compute = || {
        let mut h = blake3::Hasher::new();
        let zeros = [0u8; 64 << 10];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            h.update(&zeros[..n]);
            left -= n as u64;
        }
        *h.finalize().as_bytes()
    };
    if len == crate::DEFAULT_BLOCK_SIZE as u64 {
        *FULL.get_or_init(compute)
    } else {
        compute()
    }
}

/// Checks a block size is one backy accepts.
pub fn check_block_size(bs: u32) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::invalid(format!(
            "block size {bs} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

/// Number of blocks of an image.
pub fn block_count(image_size: u64, block_size: u32) -> u64 {
    image_size.div_ceil(block_size as u64)
}

/// The digests of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    block_size: u32,
    image_size: u64,
    digests: Vec<Digest>,
}

impl Manifest {
    /// The manifest of an all-zero image.
    pub fn zeroed(image_size: u64, block_size: u32) -> Result<Self> {
        check_block_size(block_size)?;
        check_image_size(image_size)?;
        let n = block_count(image_size, block_size);
        let mut m = Manifest {
            block_size,
            image_size,
            digests: Vec::with_capacity(n as usize),
        };
        let full = zero_digest(block_size as u64);
        for i in 0..n {
            let len = m.block_len(i);
            m.digests.push(if len == block_size as u64 {
                full
            } else {
                zero_digest(len)
            });
        }
        Ok(m)
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    pub fn block_count(&self) -> u64 {
        self.digests.len() as u64
    }

    pub fn digests(&self) -> &[Digest] {
        &self.digests
    }

    pub fn get(&self, block: u64) -> Option<&Digest> {
        self.digests.get(block as usize)
    }

    /// Byte offset of a block.
    pub fn block_offset(&self, block: u64) -> u64 {
        block * self.block_size as u64
    }

    /// Length of a block (the last one may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        let start = self.block_offset(block);
        (self.image_size - start.min(self.image_size)).min(self.block_size as u64)
    }

    /// Whether the block is known to be all zeros.
    pub fn is_zero(&self, block: u64) -> bool {
        self.get(block)
            .is_some_and(|d| *d == zero_digest(self.block_len(block)))
    }

    pub fn set(&mut self, block: u64, digest: Digest) -> Result<()> {
        let n = self.digests.len();
        let slot = self
            .digests
            .get_mut(block as usize)
            .ok_or_else(|| Error::internal(format!("block {block} beyond manifest of {n} blocks")))?;
        *slot = digest;
        Ok(())
    }

    /// Changes the image size. Blocks that are new become zero blocks; the
    /// caller must recompute the block that was last before (its length may
    /// have changed), see [`Manifest::resize_touched`].
    pub fn resize(&mut self, image_size: u64) -> Result<()> {
        check_image_size(image_size)?;
        self.image_size = image_size;
        let n = block_count(image_size, self.block_size) as usize;
        self.digests.truncate(n);
        while self.digests.len() < n {
            let len = self.block_len(self.digests.len() as u64);
            self.digests.push(zero_digest(len));
        }
        Ok(())
    }

    /// Blocks whose content may differ after a resize from `old_size` to the
    /// current size without any data written: the old last block and the new
    /// last block (when partial).
    pub fn resize_touched(&self, old_size: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if old_size == self.image_size {
            return out;
        }
        let bs = self.block_size as u64;
        for size in [old_size, self.image_size] {
            if size % bs != 0 && size > 0 {
                let b = size / bs;
                if b < self.block_count() && !out.contains(&b) {
                    out.push(b);
                }
            }
        }
        out
    }

    /// The encoded `.digests` file.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.digests.len() * DIGEST_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&ALGO_BLAKE3.to_le_bytes());
        out.extend_from_slice(&(DIGEST_LEN as u32).to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0u8; 24]);
        debug_assert_eq!(out.len(), HEADER_LEN);
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        out
    }

    /// BLAKE3 of the encoded manifest: the value `.rev` records and the
    /// client's end-to-end check compares.
    pub fn file_digest(&self) -> Digest {
        *blake3::hash(&self.encode()).as_bytes()
    }

    /// Decodes a `.digests` file; `what` names it in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let header = Header::parse(bytes, what)?;
        let body = &bytes[HEADER_LEN..];
        let want = header.block_count as usize * DIGEST_LEN;
        if body.len() != want {
            return Err(Error::data_loss(format!(
                "{what}: manifest has {} digest bytes, header says {want}",
                body.len()
            )));
        }
        let digests = body
            .chunks_exact(DIGEST_LEN)
            .map(|c| {
                let mut d = [0u8; DIGEST_LEN];
                d.copy_from_slice(c);
                d
            })
            .collect();
        Ok(Manifest {
            block_size: header.block_size,
            image_size: header.image_size,
            digests,
        })
    }
}

fn check_image_size(size: u64) -> Result<()> {
    if size > MAX_IMAGE_SIZE {
        return Err(Error::invalid(format!(
            "image size {size} exceeds the maximum of {MAX_IMAGE_SIZE}"
        )));
    }
    Ok(())
}

/// A validated manifest header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub block_size: u32,
    pub image_size: u64,
    pub block_count: u64,
}

impl Header {
    /// Parses and checks the first [`HEADER_LEN`] bytes.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self> {
        let bad = |why: String| Error::data_loss(format!("{what}: not a backy manifest: {why}"));
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, shorter than the header", bytes.len())));
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
        if bytes[..8] != MAGIC {
            return Err(bad("bad magic".into()));
        }
        if u16_at(8) != VERSION {
            return Err(bad(format!("unsupported version {}", u16_at(8))));
        }
        if u16_at(10) != ALGO_BLAKE3 || u32_at(12) != DIGEST_LEN as u32 {
            return Err(bad(format!(
                "unsupported digest algorithm {}/{}",
                u16_at(10),
                u32_at(12)
            )));
        }
        let block_size = u32_at(16);
        check_block_size(block_size).map_err(|e| bad(e.message))?;
        let image_size = u64_at(24);
        check_image_size(image_size).map_err(|e| bad(e.message))?;
        let block_count = u64_at(32);
        if block_count != block_count_of(image_size, block_size) {
            return Err(bad(format!(
                "block count {block_count} does not fit image size {image_size}"
            )));
        }
        Ok(Header {
            block_size,
            image_size,
            block_count,
        })
    }
}

fn block_count_of(image_size: u64, block_size: u32) -> u64 {
    block_count(image_size, block_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BS: u32 = 64 << 10;

    #[test]
    fn zeroed_matches_digest_of_zeros() {
        let m = Manifest::zeroed(3 * BS as u64 + 100, BS).unwrap();
        assert_eq!(m.block_count(), 4);
        assert_eq!(m.block_len(3), 100);
        assert_eq!(m.get(0).unwrap(), &digest(&vec![0u8; BS as usize]));
        assert_eq!(m.get(3).unwrap(), &digest(&[0u8; 100]));
        assert!((0..4).all(|b| m.is_zero(b)));
        assert_eq!(zero_digest(4 << 20), digest(&vec![0u8; 4 << 20]));
    }

    #[test]
    fn round_trip_and_file_digest() {
        let mut m = Manifest::zeroed(10 * BS as u64, BS).unwrap();
        m.set(3, digest(b"hello")).unwrap();
        let bytes = m.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 10 * 32);
        let back = Manifest::decode(&bytes, "t").unwrap();
        assert_eq!(back, m);
        assert_eq!(back.file_digest(), *blake3::hash(&bytes).as_bytes());
        assert!(!back.is_zero(3));
    }

    #[test]
    fn refuses_bad_headers() {
        let good = Manifest::zeroed(BS as u64, BS).unwrap().encode();
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        let mut magic = good.clone();
        magic[0] = b'X';
        cases.push((magic, "magic"));
        let mut version = good.clone();
        version[8] = 9;
        cases.push((version, "version"));
        let mut bs = good.clone();
        bs[16..20].copy_from_slice(&1000u32.to_le_bytes());
        cases.push((bs, "block size"));
        let mut count = good.clone();
        count[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes());
        cases.push((count, "block count"));
        cases.push((good[..good.len() - 1].to_vec(), "digest bytes"));
        cases.push((good[..10].to_vec(), "shorter than the header"));
        for (bytes, why) in cases {
            let e = Manifest::decode(&bytes, "vm1/x.digests").unwrap_err();
            assert!(e.message.contains(why), "{why}: {}", e.message);
            assert!(e.message.starts_with("vm1/x.digests"), "{}", e.message);
        }
    }

    #[test]
    fn resize_grow_and_shrink() {
        let mut m = Manifest::zeroed(2 * BS as u64 + 10, BS).unwrap();
        m.set(0, digest(b"a")).unwrap();
        m.resize(5 * BS as u64).unwrap();
        assert_eq!(m.block_count(), 5);
        assert_eq!(m.resize_touched(2 * BS as u64 + 10), vec![2]);
        assert!(m.is_zero(4));
        m.resize(BS as u64 / 2).unwrap();
        assert_eq!(m.block_count(), 1);
        assert_eq!(m.resize_touched(5 * BS as u64), vec![0]);
        assert_eq!(m.get(0).unwrap(), &digest(b"a"));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes, "fuzz");
        }

        #[test]
        fn decode_never_panics_with_valid_magic(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&tail);
            let _ = Manifest::decode(&bytes, "fuzz");
        }
    }
}
