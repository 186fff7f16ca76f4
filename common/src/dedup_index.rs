//! The digest index's on-disk format and its hash table logic
//! (docs/DESIGN.md, "Deduplication"): a persistent open-addressing table
//! from a block's BLAKE3 digest to one place that held that block. It is a
//! hint: every user reads the candidate's bytes (or lets the kernel compare
//! them) before relying on it. The buckets are read and written through
//! [`BucketIo`], handed in by the caller, so this stays free of files.
//!
//! One shard file:
//!
//! ```text
//! offset size  field
//! 0      4096  header page: the header below, then zeros
//! 4096   4096  bucket 0: 64 entries of 64 bytes
//! ...          bucket n-1 (n a power of two)
//! ```
//!
//! Header (little endian like every field):
//!
//! ```text
//! 0      8     magic "BACKYDX1"
//! 8      2     version (1)
//! 10     2     entry length (64)
//! 12     4     bucket length (4096)
//! 16     1     log2 of the bucket count
//! 17     1     flags: bit 0 = complete (built from every manifest)
//! 18     6     reserved, 0
//! 24     8     live entries
//! 32     8     dead entries (tombstones)
//! 40     32    salt: key of the bucket hash
//! 72     24    reserved, 0
//! 96     32    BLAKE3 of bytes 0..96
//! ```
//!
//! Entry: digest (32), job key (8), revision id (16, the UUID's bytes),
//! block index (8). Job key 0 marks a free slot: all zeros is empty (never
//! used, ends a lookup), block `u64::MAX` is a tombstone (was used; a
//! lookup goes on past it).
//!
//! A digest's home bucket is a keyed hash of it under the shard's salt, so
//! blocks chosen to share a home (cheap with plain digest bits) cannot pile
//! up one probe chain. Lookup scans buckets from home on, linearly, and
//! stops at a bucket with an empty slot.

use crate::manifest::Digest;
use crate::RevisionId;

pub const MAGIC: [u8; 8] = *b"BACKYDX1";
pub const VERSION: u16 = 1;
pub const ENTRY_LEN: usize = 64;
pub const BUCKET_LEN: usize = 4096;
pub const SLOTS: usize = BUCKET_LEN / ENTRY_LEN;
/// The header's page, before bucket 0.
pub const HEADER_PAGE: u64 = 4096;
pub const HEADER_LEN: usize = 128;
/// Bytes the header's checksum covers.
const CHECKED_LEN: usize = 96;
/// Largest table: 2^32 buckets (16 TiB), far past any store; bounds what
/// a damaged header can make a reader believe.
pub const MAX_LOG2_BUCKETS: u8 = 32;
const FLAG_COMPLETE: u8 = 1;
const TOMBSTONE: u64 = u64::MAX;

#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    version: u16,
    entry_len: u16,
    bucket_len: u32,
    log2_buckets: u8,
    flags: u8,
    reserved0: [u8; 6],
    live: u64,
    dead: u64,
    salt: [u8; 32],
    reserved1: [u8; 24],
    checksum: [u8; 32],
}
const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_LEN);

#[repr(C)]
struct RawEntry {
    digest: Digest,
    job_key: u64,
    rev: [u8; 16],
    block: u64,
}
const _: () = assert!(std::mem::size_of::<RawEntry>() == ENTRY_LEN);
const _: () = assert!(SLOTS * ENTRY_LEN == BUCKET_LEN);

/// The key of a job in the index: the first 8 bytes of a BLAKE3 key
/// derived from its name; never 0 (which marks free slots).
pub fn job_key(name: &str) -> u64 {
    let k = blake3::derive_key("backy 2026 dedup index job key", name.as_bytes());
    match u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]) {
        0 => 1,
        k => k,
    }
}

/// Where a block was stored: job (by [`job_key`]), revision, block index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    pub job_key: u64,
    pub rev: RevisionId,
    pub block: u64,
}

/// A shard's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub log2_buckets: u8,
    /// Built from every committed manifest (by a rebuild), so a miss means
    /// "probably nowhere", not "never looked".
    pub complete: bool,
    pub live: u64,
    pub dead: u64,
    pub salt: [u8; 32],
}

impl Header {
    pub fn new(log2_buckets: u8, salt: [u8; 32]) -> Self {
        Header {
            log2_buckets: log2_buckets.min(MAX_LOG2_BUCKETS),
            complete: false,
            live: 0,
            dead: 0,
            salt,
        }
    }

    pub fn buckets(&self) -> u64 {
        1u64 << self.log2_buckets
    }

    pub fn slots(&self) -> u64 {
        self.buckets() * SLOTS as u64
    }

    /// The file's length.
    pub fn file_len(&self) -> u64 {
        HEADER_PAGE + self.buckets() * BUCKET_LEN as u64
    }

    /// Byte offset of bucket `i`.
    pub fn bucket_offset(i: u64) -> u64 {
        HEADER_PAGE + i * BUCKET_LEN as u64
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&VERSION.to_le_bytes());
        out[10..12].copy_from_slice(&(ENTRY_LEN as u16).to_le_bytes());
        out[12..16].copy_from_slice(&(BUCKET_LEN as u32).to_le_bytes());
        out[16] = self.log2_buckets;
        out[17] = if self.complete { FLAG_COMPLETE } else { 0 };
        out[24..32].copy_from_slice(&self.live.to_le_bytes());
        out[32..40].copy_from_slice(&self.dead.to_le_bytes());
        out[40..72].copy_from_slice(&self.salt);
        let sum = blake3::hash(&out[..CHECKED_LEN]);
        out[CHECKED_LEN..].copy_from_slice(sum.as_bytes());
        out
    }

    /// Parses a header; the error says why it is not one this code can use
    /// (torn, foreign, another version): the shard is then started anew.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!("{} bytes, shorter than the header", bytes.len()));
        }
        if bytes[..8] != MAGIC {
            return Err("not a digest index (bad magic)".into());
        }
        if blake3::hash(&bytes[..CHECKED_LEN]).as_bytes()[..] != bytes[CHECKED_LEN..HEADER_LEN] {
            return Err("header checksum mismatch (torn write?)".into());
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if u16_at(8) != VERSION {
            return Err(format!("version {}, this is {VERSION}", u16_at(8)));
        }
        if u16_at(10) as usize != ENTRY_LEN || u32_at(12) as usize != BUCKET_LEN {
            return Err(format!("entry/bucket length {}/{}", u16_at(10), u32_at(12)));
        }
        if bytes[16] > MAX_LOG2_BUCKETS {
            return Err(format!("2^{} buckets", bytes[16]));
        }
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&bytes[40..72]);
        Ok(Header {
            log2_buckets: bytes[16],
            complete: bytes[17] & FLAG_COMPLETE != 0,
            live: u64_at(24),
            dead: u64_at(32),
            salt,
        })
    }

    /// The bucket a digest's probe starts at.
    pub fn home(&self, digest: &Digest) -> u64 {
        let h = blake3::keyed_hash(&self.salt, digest);
        let b = h.as_bytes();
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) & (self.buckets() - 1)
    }

    /// Whether one more entry would fill more than 3/4 of the slots
    /// (tombstones count: they lengthen probes like entries do).
    pub fn should_grow(&self) -> bool {
        (self.live + self.dead + 1).saturating_mul(4) > self.slots().saturating_mul(3)
    }

    /// The bucket count (log2) of the table the live entries move to when
    /// this one is full: the smallest that holds them at most half full, so
    /// a table of tombstones shrinks and one of live entries doubles.
    pub fn grown_log2(&self) -> u8 {
        let want = (self.live + 1).saturating_mul(2);
        let mut log2 = 0u8;
        while (SLOTS as u64) << log2 < want && log2 < MAX_LOG2_BUCKETS {
            log2 += 1;
        }
        log2
    }
}

/// One slot of a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Empty,
    Dead,
    Live(Digest, Location),
}

/// One bucket's bytes.
#[derive(Clone)]
pub struct Bucket(pub [u8; BUCKET_LEN]);

impl Default for Bucket {
    fn default() -> Self {
        Bucket([0; BUCKET_LEN])
    }
}

impl Bucket {
    fn entry(&self, i: usize) -> &[u8] {
        &self.0[i * ENTRY_LEN..(i + 1) * ENTRY_LEN]
    }

    pub fn slot(&self, i: usize) -> Slot {
        let e = self.entry(i);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&e[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let job_key = u64_at(32);
        let block = u64_at(56);
        if job_key == 0 {
            return if block == TOMBSTONE {
                Slot::Dead
            } else {
                Slot::Empty
            };
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&e[..32]);
        let mut rev = [0u8; 16];
        rev.copy_from_slice(&e[40..56]);
        Slot::Live(
            digest,
            Location {
                job_key,
                rev: RevisionId::from(uuid::Uuid::from_bytes(rev)),
                block,
            },
        )
    }

    /// The job key of slot `i` (0: free), read without decoding the rest.
    fn key_of(&self, i: usize) -> u64 {
        let e = self.entry(i);
        u64::from_le_bytes([e[32], e[33], e[34], e[35], e[36], e[37], e[38], e[39]])
    }

    /// The slot holding `digest`, and where it points.
    pub fn find(&self, digest: &Digest) -> Option<(usize, Location)> {
        // Raw bytes first: a probe compares up to 64 digests per bucket.
        (0..SLOTS)
            .filter(|&i| self.entry(i)[..32] == digest[..] && self.key_of(i) != 0)
            .find_map(|i| match self.slot(i) {
                Slot::Live(_, loc) => Some((i, loc)),
                _ => None,
            })
    }

    /// Whether a slot was never used: a probe for a digest ends here.
    pub fn has_empty(&self) -> bool {
        (0..SLOTS).any(|i| self.key_of(i) == 0 && self.slot(i) == Slot::Empty)
    }

    /// The first slot an entry can go into (empty or dead).
    pub fn free_slot(&self) -> Option<usize> {
        (0..SLOTS).find(|&i| self.key_of(i) == 0)
    }

    pub fn set(&mut self, i: usize, digest: &Digest, loc: &Location) {
        let e = &mut self.0[i * ENTRY_LEN..(i + 1) * ENTRY_LEN];
        e[..32].copy_from_slice(digest);
        e[32..40].copy_from_slice(&loc.job_key.to_le_bytes());
        e[40..56].copy_from_slice(loc.rev.uuid().as_bytes());
        e[56..64].copy_from_slice(&loc.block.to_le_bytes());
    }

    /// Turns slot `i` into a tombstone.
    pub fn kill(&mut self, i: usize) {
        let e = &mut self.0[i * ENTRY_LEN..(i + 1) * ENTRY_LEN];
        e.fill(0);
        e[56..64].copy_from_slice(&TOMBSTONE.to_le_bytes());
    }
}

/// Reads and writes a shard's buckets (a file, or memory in tests).
pub trait BucketIo {
    fn read_bucket(&mut self, i: u64, into: &mut Bucket) -> std::io::Result<()>;
    fn write_bucket(&mut self, i: u64, bucket: &Bucket) -> std::io::Result<()>;
}

/// Where a digest's entry is: bucket, slot, location.
pub type Found = (u64, usize, Location);

/// Finds `digest`: scans from its home bucket until it is found or a
/// bucket with an empty slot (or every bucket) has been seen.
pub fn lookup<I: BucketIo>(io: &mut I, header: &Header, digest: &Digest) -> std::io::Result<Option<Found>> {
    Ok(probe(io, header, digest)?.0)
}

/// A slot by bucket and index.
type SlotAt = (u64, usize);

/// The entry of `digest` if held, and else the first free slot on its
/// probe path.
fn probe<I: BucketIo>(
    io: &mut I,
    header: &Header,
    digest: &Digest,
) -> std::io::Result<(Option<Found>, Option<SlotAt>)> {
    let mut bucket = Bucket::default();
    let mut free = None;
    let home = header.home(digest);
    for step in 0..header.buckets() {
        let i = (home + step) & (header.buckets() - 1);
        io.read_bucket(i, &mut bucket)?;
        if let Some((slot, loc)) = bucket.find(digest) {
            return Ok((Some((i, slot, loc)), free));
        }
        if free.is_none() {
            free = bucket.free_slot().map(|s| (i, s));
        }
        if bucket.has_empty() {
            break;
        }
    }
    Ok((None, free))
}

/// What [`insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// The digest was held already (first holder wins).
    Present,
    Added,
    /// No free slot on the probe path: grow, then insert again.
    Full,
}

/// Adds `digest` → `loc` unless the digest is held; counts it in `header`
/// (which the caller writes back).
pub fn insert<I: BucketIo>(
    io: &mut I,
    header: &mut Header,
    digest: &Digest,
    loc: &Location,
) -> std::io::Result<Inserted> {
    let (found, free) = probe(io, header, digest)?;
    if found.is_some() {
        return Ok(Inserted::Present);
    }
    let Some((i, slot)) = free else {
        return Ok(Inserted::Full);
    };
    let mut bucket = Bucket::default();
    io.read_bucket(i, &mut bucket)?;
    if bucket.slot(slot) == Slot::Dead {
        header.dead = header.dead.saturating_sub(1);
    }
    bucket.set(slot, digest, loc);
    io.write_bucket(i, &bucket)?;
    header.live += 1;
    Ok(Inserted::Added)
}

/// Where `digest`'s entry is `old`: points it at `new`, or makes it a
/// tombstone (`None`). Returns whether it changed anything.
pub fn replace<I: BucketIo>(
    io: &mut I,
    header: &mut Header,
    digest: &Digest,
    old: &Location,
    new: Option<&Location>,
) -> std::io::Result<bool> {
    let Some((i, slot, loc)) = lookup(io, header, digest)? else {
        return Ok(false);
    };
    if loc != *old {
        return Ok(false);
    }
    let mut bucket = Bucket::default();
    io.read_bucket(i, &mut bucket)?;
    match new {
        Some(new) => bucket.set(slot, digest, new),
        None => {
            bucket.kill(slot);
            header.live = header.live.saturating_sub(1);
            header.dead += 1;
        }
    }
    io.write_bucket(i, &bucket)?;
    Ok(true)
}

/// Moves every live entry of `from` into the (empty) table `to`: a grown
/// or compacted copy. Memory stays at two buckets.
pub fn rehash<F: BucketIo, T: BucketIo>(
    from: &mut F,
    from_header: &Header,
    to: &mut T,
    to_header: &mut Header,
) -> std::io::Result<()> {
    let mut bucket = Bucket::default();
    for i in 0..from_header.buckets() {
        from.read_bucket(i, &mut bucket)?;
        for s in 0..SLOTS {
            if let Slot::Live(d, loc) = bucket.slot(s) {
                if insert(to, to_header, &d, &loc)? == Inserted::Full {
                    return Err(std::io::Error::other("grown digest index shard is full"));
                }
            }
        }
    }
    Ok(())
}

/// A table in memory, for tests.
#[derive(Clone, Default)]
pub struct MemBuckets(pub Vec<Bucket>);

impl MemBuckets {
    pub fn new(header: &Header) -> Self {
        MemBuckets(vec![Bucket::default(); header.buckets() as usize])
    }
}

impl BucketIo for MemBuckets {
    fn read_bucket(&mut self, i: u64, into: &mut Bucket) -> std::io::Result<()> {
        let b = self
            .0
            .get(i as usize)
            .ok_or_else(|| std::io::Error::other("no such bucket"))?;
        into.0.copy_from_slice(&b.0);
        Ok(())
    }

    fn write_bucket(&mut self, i: u64, bucket: &Bucket) -> std::io::Result<()> {
        let b = self
            .0
            .get_mut(i as usize)
            .ok_or_else(|| std::io::Error::other("no such bucket"))?;
        b.0.copy_from_slice(&bucket.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn loc(job: u64, block: u64) -> Location {
        Location {
            job_key: job,
            rev: RevisionId::from(uuid::Uuid::from_u128(job as u128 * 1000 + 7)),
            block,
        }
    }

    fn digest_of(n: u64) -> Digest {
        *blake3::hash(&n.to_le_bytes()).as_bytes()
    }

    /// A table that grows like the server's shards do.
    struct Table {
        header: Header,
        io: MemBuckets,
    }

    impl Table {
        fn new() -> Self {
            let header = Header::new(0, [9; 32]);
            Table {
                io: MemBuckets::new(&header),
                header,
            }
        }

        fn grow(&mut self) {
            let mut h = Header::new(self.header.grown_log2(), self.header.salt);
            let mut io = MemBuckets::new(&h);
            rehash(&mut self.io, &self.header, &mut io, &mut h).unwrap();
            self.header = h;
            self.io = io;
        }

        fn insert(&mut self, d: &Digest, l: &Location) -> Inserted {
            if self.header.should_grow() {
                self.grow();
            }
            match insert(&mut self.io, &mut self.header, d, l).unwrap() {
                Inserted::Full => {
                    self.grow();
                    insert(&mut self.io, &mut self.header, d, l).unwrap()
                }
                other => other,
            }
        }

        fn get(&mut self, d: &Digest) -> Option<Location> {
            lookup(&mut self.io, &self.header, d).unwrap().map(|f| f.2)
        }
    }

    #[test]
    fn header_round_trips_and_refuses_damage() {
        let mut h = Header::new(5, [3; 32]);
        h.live = 10;
        h.dead = 2;
        h.complete = true;
        let bytes = h.encode();
        assert_eq!(Header::parse(&bytes), Ok(h));
        assert_eq!(h.file_len(), 4096 + 32 * 4096);
        let mut torn = bytes;
        torn[25] ^= 1;
        assert!(Header::parse(&torn).unwrap_err().contains("checksum"));
        let mut foreign = bytes;
        foreign[0] = b'X';
        assert!(Header::parse(&foreign).unwrap_err().contains("magic"));
        assert!(Header::parse(&bytes[..100]).unwrap_err().contains("shorter"));
        assert!(
            Header::parse(&[0u8; HEADER_LEN]).is_err(),
            "a zeroed page is no header"
        );
        // Another version, with a valid checksum.
        let mut v2 = bytes;
        v2[8] = 2;
        let sum = blake3::hash(&v2[..CHECKED_LEN]);
        v2[CHECKED_LEN..].copy_from_slice(sum.as_bytes());
        assert!(Header::parse(&v2).unwrap_err().contains("version 2"));
    }

    #[test]
    fn slots_tell_empty_dead_and_live_apart() {
        let mut b = Bucket::default();
        assert_eq!(b.slot(0), Slot::Empty);
        let d = digest_of(1);
        b.set(3, &d, &loc(5, 6));
        assert_eq!(b.slot(3), Slot::Live(d, loc(5, 6)));
        assert_eq!(b.find(&d), Some((3, loc(5, 6))));
        assert_eq!(b.free_slot(), Some(0));
        b.kill(3);
        assert_eq!(b.slot(3), Slot::Dead);
        assert_eq!(b.find(&d), None);
        for i in 0..SLOTS {
            b.set(i, &digest_of(i as u64), &loc(1, i as u64));
        }
        assert!(!b.has_empty());
        assert_eq!(b.free_slot(), None);
        b.kill(10);
        assert!(!b.has_empty(), "a tombstone does not end a probe");
        assert_eq!(b.free_slot(), Some(10));
    }

    #[test]
    fn job_keys_are_never_zero_and_differ() {
        assert_ne!(job_key("vm1"), 0);
        assert_ne!(job_key("vm1"), job_key("vm2"));
        assert_eq!(job_key("vm1"), job_key("vm1"));
    }

    #[test]
    fn first_holder_wins_and_a_full_table_says_so() {
        let mut h = Header::new(0, [1; 32]);
        let mut io = MemBuckets::new(&h);
        let d = digest_of(1);
        assert_eq!(insert(&mut io, &mut h, &d, &loc(1, 0)).unwrap(), Inserted::Added);
        assert_eq!(
            insert(&mut io, &mut h, &d, &loc(2, 0)).unwrap(),
            Inserted::Present
        );
        assert_eq!(lookup(&mut io, &h, &d).unwrap().map(|f| f.2), Some(loc(1, 0)));
        for n in 2..=SLOTS as u64 {
            assert_eq!(
                insert(&mut io, &mut h, &digest_of(n), &loc(1, n)).unwrap(),
                Inserted::Added
            );
        }
        assert_eq!(h.live, SLOTS as u64);
        assert_eq!(
            insert(&mut io, &mut h, &digest_of(1000), &loc(1, 0)).unwrap(),
            Inserted::Full
        );
        // A lookup in a table without any empty slot still ends.
        assert_eq!(lookup(&mut io, &h, &digest_of(1000)).unwrap(), None);
    }

    #[test]
    fn replace_moves_or_removes_only_the_expected_entry() {
        let mut h = Header::new(0, [1; 32]);
        let mut io = MemBuckets::new(&h);
        let d = digest_of(7);
        insert(&mut io, &mut h, &d, &loc(1, 0)).unwrap();
        assert!(
            !replace(&mut io, &mut h, &d, &loc(2, 0), None).unwrap(),
            "not the holder"
        );
        assert!(replace(&mut io, &mut h, &d, &loc(1, 0), Some(&loc(3, 4))).unwrap());
        assert_eq!(lookup(&mut io, &h, &d).unwrap().map(|f| f.2), Some(loc(3, 4)));
        assert!(replace(&mut io, &mut h, &d, &loc(3, 4), None).unwrap());
        assert_eq!(lookup(&mut io, &h, &d).unwrap(), None);
        assert_eq!((h.live, h.dead), (0, 1));
        // The tombstone's slot (first on the one bucket's path) is used again.
        insert(&mut io, &mut h, &digest_of(8), &loc(1, 1)).unwrap();
        assert_eq!((h.live, h.dead), (1, 0));
    }

    #[test]
    fn growth_keeps_every_entry_and_drops_tombstones() {
        let mut t = Table::new();
        for n in 0..5000 {
            t.insert(&digest_of(n), &loc(1, n));
        }
        assert!(t.header.buckets() >= 128, "{:?}", t.header);
        for n in 0..5000 {
            assert_eq!(t.get(&digest_of(n)), Some(loc(1, n)));
        }
        assert!(t.header.live * 4 <= t.header.slots() * 3);
        for n in 0..4900 {
            replace(&mut t.io, &mut t.header, &digest_of(n), &loc(1, n), None).unwrap();
        }
        t.grow();
        assert_eq!((t.header.live, t.header.dead), (100, 0));
        assert!(t.header.buckets() <= 4, "shrunk: {:?}", t.header);
        assert_eq!(t.get(&digest_of(4950)), Some(loc(1, 4950)));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u8),
        Replace(u8, u8, Option<u8>),
        Lookup(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), 1u8..4).prop_map(|(d, j)| Op::Insert(d, j)),
            (any::<u8>(), 1u8..4, proptest::option::of(1u8..4)).prop_map(|(d, j, n)| Op::Replace(d, j, n)),
            any::<u8>().prop_map(Op::Lookup),
        ]
    }

    proptest! {
        #[test]
        fn the_table_behaves_like_a_map(ops in proptest::collection::vec(op(), 0..600)) {
            let mut t = Table::new();
            let mut model: HashMap<Digest, Location> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(d, j) => {
                        let (d, l) = (digest_of(d as u64), loc(j as u64, d as u64));
                        let r = t.insert(&d, &l);
                        prop_assert_eq!(r == Inserted::Added, !model.contains_key(&d));
                        model.entry(d).or_insert(l);
                    }
                    Op::Replace(d, j, new) => {
                        let (d, old) = (digest_of(d as u64), loc(j as u64, d as u64));
                        let new = new.map(|n| loc(n as u64, 99));
                        let changed = replace(&mut t.io, &mut t.header, &d, &old, new.as_ref()).unwrap();
                        prop_assert_eq!(changed, model.get(&d) == Some(&old));
                        if changed {
                            match new {
                                Some(n) => { model.insert(d, n); }
                                None => { model.remove(&d); }
                            }
                        }
                    }
                    Op::Lookup(d) => {
                        let d = digest_of(d as u64);
                        prop_assert_eq!(t.get(&d), model.get(&d).copied());
                    }
                }
                prop_assert_eq!(t.header.live, model.len() as u64);
            }
            for (d, l) in &model {
                prop_assert_eq!(t.get(d), Some(*l));
            }
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Header::parse(&bytes);
        }
    }
}
