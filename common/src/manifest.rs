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
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};

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

/// Blocks per chunk of the in-memory manifest (2 KiB of digests).
const CHUNK: u64 = 64;
type Chunk = [Digest; CHUNK as usize];

/// The digests of one image, held sparsely: memory grows with the blocks
/// that are not all zeros, never with the image's announced size, so a
/// huge sparse image costs what its data costs. Clones share chunks until
/// one side writes (a push keeps its parent's manifest and its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    block_size: u32,
    image_size: u64,
    block_count: u64,
    /// Chunks with at least one block that is not all zeros (never an
    /// all-zero chunk, so equal manifests compare equal); every block
    /// outside them is zeros. Entries past the last block hold `full_zero`.
    chunks: BTreeMap<u64, Arc<Chunk>>,
    /// Digest of a whole block of zeros, and of the last block's zeros.
    full_zero: Digest,
    tail_zero: Digest,
}

impl Manifest {
    /// The manifest of an all-zero image.
    pub fn zeroed(image_size: u64, block_size: u32) -> Result<Self> {
        check_block_size(block_size)?;
        check_image_size(image_size)?;
        let mut m = Manifest {
            block_size,
            image_size: 0,
            block_count: 0,
            chunks: BTreeMap::new(),
            full_zero: zero_digest(block_size as u64),
            tail_zero: zero_digest(block_size as u64),
        };
        m.set_size(image_size);
        Ok(m)
    }

    fn set_size(&mut self, image_size: u64) {
        self.image_size = image_size;
        self.block_count = block_count(image_size, self.block_size);
        let tail = image_size % self.block_size as u64;
        self.tail_zero = if tail == 0 {
            self.full_zero
        } else {
            zero_digest(tail)
        };
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Bytes of digests held in memory (chunks with data).
    pub fn resident_bytes(&self) -> usize {
        self.chunks.len() * std::mem::size_of::<Chunk>()
    }

    /// The digest of a block of zeros at `block`'s position.
    fn zero_of(&self, block: u64) -> &Digest {
        if block + 1 == self.block_count {
            &self.tail_zero
        } else {
            &self.full_zero
        }
    }

    pub fn get(&self, block: u64) -> Option<&Digest> {
        if block >= self.block_count {
            return None;
        }
        Some(match self.chunks.get(&(block / CHUNK)) {
            Some(chunk) => &chunk[(block % CHUNK) as usize],
            None => self.zero_of(block),
        })
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

    /// The blocks that are not all zeros, with their digests, in order;
    /// memory and time follow the data, not the image's size.
    pub fn data_blocks(&self) -> impl Iterator<Item = (u64, &Digest)> + '_ {
        self.chunks.iter().flat_map(move |(key, chunk)| {
            let first = key * CHUNK;
            (first..(first + CHUNK).min(self.block_count))
                .map(move |b| (b, &chunk[(b - first) as usize]))
                .filter(move |(b, d)| *d != self.zero_of(*b))
        })
    }

    /// Whether the block is known to be all zeros.
    pub fn is_zero(&self, block: u64) -> bool {
        self.get(block).is_some_and(|d| d == self.zero_of(block))
    }

    pub fn set(&mut self, block: u64, digest: Digest) -> Result<()> {
        if block >= self.block_count {
            return Err(Error::internal(format!(
                "block {block} beyond manifest of {} blocks",
                self.block_count
            )));
        }
        let zero = *self.zero_of(block);
        let key = block / CHUNK;
        if digest == zero && !self.chunks.contains_key(&key) {
            return Ok(());
        }
        let fresh = self.zero_chunk(key);
        let chunk = Arc::make_mut(self.chunks.entry(key).or_insert_with(|| Arc::new(fresh)));
        chunk[(block % CHUNK) as usize] = digest;
        if digest == zero {
            self.drop_if_zero(key);
        }
        Ok(())
    }

    /// Marks blocks `first..end` (clipped to the image) as zeros, in time
    /// proportional to the chunks they touch that hold data.
    pub fn set_zero(&mut self, first: u64, end: u64) {
        let end = end.min(self.block_count);
        if first >= end {
            return;
        }
        let keys: Vec<u64> = self
            .chunks
            .range(first / CHUNK..=(end - 1) / CHUNK)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let lo = (key * CHUNK).max(first);
            let hi = ((key + 1) * CHUNK).min(end);
            if lo == key * CHUNK && hi >= ((key + 1) * CHUNK).min(self.block_count) {
                self.chunks.remove(&key);
                continue;
            }
            let zeros: Vec<Digest> = (lo..hi).map(|b| *self.zero_of(b)).collect();
            if let Some(chunk) = self.chunks.get_mut(&key) {
                let chunk = Arc::make_mut(chunk);
                for (b, z) in (lo..hi).zip(zeros) {
                    chunk[(b % CHUNK) as usize] = z;
                }
            }
            self.drop_if_zero(key);
        }
    }

    /// A chunk of zero blocks at chunk index `key`.
    fn zero_chunk(&self, key: u64) -> Chunk {
        let mut chunk = [self.full_zero; CHUNK as usize];
        let last = self.block_count.saturating_sub(1);
        if last / CHUNK == key {
            chunk[(last % CHUNK) as usize] = self.tail_zero;
        }
        chunk
    }

    fn drop_if_zero(&mut self, key: u64) {
        let zero = self.zero_chunk(key);
        if self.chunks.get(&key).is_some_and(|c| **c == zero) {
            self.chunks.remove(&key);
        }
    }

    /// Changes the image size. Blocks that are new become zero blocks; the
    /// caller must recompute the block that was last before (its length may
    /// have changed), see [`Manifest::resize_touched`].
    pub fn resize(&mut self, image_size: u64) -> Result<()> {
        check_image_size(image_size)?;
        let old_last = self.block_count.checked_sub(1);
        let old_last_zero = old_last.filter(|&b| self.is_zero(b));
        self.set_size(image_size);
        let count = self.block_count;
        self.chunks.retain(|&k, _| k < count.div_ceil(CHUNK));
        let last_key = count / CHUNK;
        if !count.is_multiple_of(CHUNK) {
            let full_zero = self.full_zero;
            if let Some(chunk) = self.chunks.get_mut(&last_key) {
                for slot in &mut Arc::make_mut(chunk)[(count % CHUNK) as usize..] {
                    *slot = full_zero;
                }
            }
        }
        // Zero blocks whose length changed stay zero blocks at the new length.
        let new_last = count.checked_sub(1);
        let was_zero = |m: &Self, b: u64| Some(b) == old_last_zero || m.get(b) == Some(&m.full_zero);
        for b in [old_last_zero, new_last].into_iter().flatten() {
            if b < count && was_zero(self, b) {
                let zero = *self.zero_of(b);
                self.set(b, zero)?;
            }
        }
        for key in [old_last, new_last].into_iter().flatten() {
            self.drop_if_zero(key / CHUNK);
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

    /// The encoded header.
    fn header(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&VERSION.to_le_bytes());
        out[10..12].copy_from_slice(&ALGO_BLAKE3.to_le_bytes());
        out[12..16].copy_from_slice(&(DIGEST_LEN as u32).to_le_bytes());
        out[16..20].copy_from_slice(&self.block_size.to_le_bytes());
        out[24..32].copy_from_slice(&self.image_size.to_le_bytes());
        out[32..40].copy_from_slice(&self.block_count.to_le_bytes());
        out
    }

    /// Writes the `.digests` file to `w` piece by piece (memory stays at
    /// one buffer however large the image) and returns its BLAKE3: the
    /// value `.rev` records and the client's end-to-end check compares.
    pub fn write_to<W: Write>(&self, mut w: W) -> std::io::Result<Digest> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = Vec::with_capacity(64 << 10);
        buf.extend_from_slice(&self.header());
        for key in 0..self.block_count.div_ceil(CHUNK) {
            let blocks = key * CHUNK..((key + 1) * CHUNK).min(self.block_count);
            match self.chunks.get(&key) {
                Some(chunk) => {
                    for b in blocks {
                        buf.extend_from_slice(&chunk[(b % CHUNK) as usize]);
                    }
                }
                None => {
                    for b in blocks {
                        buf.extend_from_slice(self.zero_of(b));
                    }
                }
            }
            if buf.len() >= 60 << 10 {
                hasher.update(&buf);
                w.write_all(&buf)?;
                buf.clear();
            }
        }
        hasher.update(&buf);
        w.write_all(&buf)?;
        Ok(*hasher.finalize().as_bytes())
    }

    /// The encoded `.digests` file.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// BLAKE3 of the encoded manifest, computed without holding it.
    pub fn file_digest(&self) -> Digest {
        self.write_to(std::io::sink()).unwrap_or_default()
    }

    /// Decodes a `.digests` file; `what` names it in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        Self::read_from(bytes, what).map(|(m, _)| m)
    }

    /// Reads a `.digests` file piece by piece and returns it with the
    /// BLAKE3 of the bytes read; `what` names it in errors. Memory follows
    /// the blocks with data, not the header's claims.
    pub fn read_from<R: Read>(mut r: R, what: &str) -> Result<(Self, Digest)> {
        let io = |e: std::io::Error| Error::io(format!("reading {what}"), e);
        let mut hasher = blake3::Hasher::new();
        let mut head = [0u8; HEADER_LEN];
        let got = read_full(&mut r, &mut head).map_err(io)?;
        hasher.update(&head[..got]);
        let header = Header::parse(&head[..got], what)?;
        let mut m = Manifest::zeroed(header.image_size, header.block_size)?;
        let want = header.block_count * DIGEST_LEN as u64;
        let mut buf = vec![0u8; 64 << 10];
        let mut block = 0u64;
        let mut body = 0u64;
        while body < want {
            let n = ((want - body).min(buf.len() as u64)) as usize;
            let got = read_full(&mut r, &mut buf[..n]).map_err(io)?;
            body += got as u64;
            if got < n {
                return Err(Error::data_loss(format!(
                    "{what}: manifest has {body} digest bytes, header says {want}"
                )));
            }
            hasher.update(&buf[..n]);
            for d in buf[..n].chunks_exact(DIGEST_LEN) {
                let mut digest = [0u8; DIGEST_LEN];
                digest.copy_from_slice(d);
                m.set(block, digest)?;
                block += 1;
            }
        }
        if read_full(&mut r, &mut [0u8; 1]).map_err(io)? > 0 {
            return Err(Error::data_loss(format!(
                "{what}: manifest has more digest bytes than the {want} its header says"
            )));
        }
        Ok((m, *hasher.finalize().as_bytes()))
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
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

    #[test]
    fn memory_follows_the_data_not_the_size() {
        let mut m = Manifest::zeroed(MAX_IMAGE_SIZE, 4 << 20).unwrap();
        assert_eq!(m.resident_bytes(), 0);
        let far = m.block_count() - 1;
        m.set(far, digest(b"x")).unwrap();
        m.set(7, digest(b"y")).unwrap();
        assert_eq!(m.resident_bytes(), 2 * 64 * DIGEST_LEN);
        let copy = m.clone();
        m.set_zero(0, m.block_count());
        assert_eq!(m.resident_bytes(), 0);
        assert!(m.is_zero(far) && !copy.is_zero(far), "clones do not share writes");
    }

    /// The dense model the sparse manifest must behave like.
    fn dense(m: &Manifest) -> Vec<Digest> {
        (0..m.block_count()).map(|b| *m.get(b).unwrap()).collect()
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(u64, u8),
        Zero(u64, u64),
        Resize(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..200, any::<u8>()).prop_map(|(b, v)| Op::Set(b, v)),
            (0u64..200, 0u64..200).prop_map(|(a, n)| Op::Zero(a, a + n)),
            (0u64..200 * BS as u64).prop_map(Op::Resize),
        ]
    }

    proptest! {
        #[test]
        fn sparse_manifest_behaves_like_a_dense_one(size in 0u64..200 * BS as u64, ops in proptest::collection::vec(op(), 0..40)) {
            let mut m = Manifest::zeroed(size, BS).unwrap();
            let mut model: Vec<Digest> = dense(&m);
            let zero_at = |size: u64, b: u64| {
                zero_digest((size - b * BS as u64).min(BS as u64))
            };
            for op in ops {
                match op {
                    Op::Set(b, v) => {
                        // v == 0 writes a zero block.
                        let d = if v == 0 && (b as usize) < model.len() { zero_at(m.image_size(), b) } else { digest(&[v]) };
                        let r = m.set(b, d);
                        prop_assert_eq!(r.is_ok(), (b as usize) < model.len());
                        if let Some(slot) = model.get_mut(b as usize) {
                            *slot = d;
                        }
                    }
                    Op::Zero(a, e) => {
                        m.set_zero(a, e);
                        for b in a..e.min(model.len() as u64) {
                            model[b as usize] = zero_at(m.image_size(), b);
                        }
                    }
                    Op::Resize(new) => {
                        let old = m.image_size();
                        let old_last_zero = model.last().map(|d| *d == zero_at(old, model.len() as u64 - 1));
                        m.resize(new).unwrap();
                        let n = block_count(new, BS) as usize;
                        let had = model.len();
                        model.truncate(n);
                        while model.len() < n {
                            model.push(zero_at(new, model.len() as u64));
                        }
                        // The old last block keeps being zeros at its new length.
                        if old_last_zero == Some(true) && had <= n {
                            model[had - 1] = zero_at(new, had as u64 - 1);
                        }
                        // A whole zero block that became the short last one.
                        if n > 0 && n <= had && model[n - 1] == zero_digest(BS as u64) {
                            model[n - 1] = zero_at(new, n as u64 - 1);
                        }
                    }
                }
                prop_assert_eq!(&dense(&m), &model);
            }
            let data: Vec<(u64, Digest)> = m.data_blocks().map(|(b, d)| (b, *d)).collect();
            let want: Vec<(u64, Digest)> = model.iter().enumerate()
                .filter(|(b, d)| **d != zero_at(m.image_size(), *b as u64))
                .map(|(b, d)| (b as u64, *d)).collect();
            prop_assert_eq!(data, want, "data_blocks: the non-zero blocks, in order");
            let bytes = m.encode();
            prop_assert_eq!(bytes.len(), HEADER_LEN + model.len() * DIGEST_LEN);
            prop_assert!(bytes[HEADER_LEN..].chunks(DIGEST_LEN).zip(&model).all(|(a, b)| a == b));
            let (back, file_digest) = Manifest::read_from(&bytes[..], "t").unwrap();
            prop_assert_eq!(file_digest, m.file_digest());
            prop_assert_eq!(&back, &m, "normalised: equal content, equal value");
        }

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
