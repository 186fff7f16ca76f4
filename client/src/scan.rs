//! Reading a source block by block and deciding what to send: the heart of
//! a push, free of networking so it can be tested on in-memory images.
//!
//! [`Scanner`] turns blocks (in ascending order) and the baseline manifest
//! into push frames, the new manifest and the stream checksum. [`scan`]
//! drives it over a [`Source`], skipping holes and, for sources that know
//! their changes, untouched blocks; of a changed block it then sends only
//! the known changed bytes. With the granule exchange (protocol 2) a
//! changed block first sends its granule digests and, once the server has
//! answered, only the granules it asked for; blocks behind it wait in a
//! bounded queue, so the answers of several blocks are awaited at once.

use crate::frames::PushFrames;
use crate::source::Source;
use backy_common::encryption::Key;
use backy_common::granules;
use backy_common::manifest::{zero_digest, Digest, Manifest};
use backy_common::ranges::{blocks_of, coalesce, is_all_zero, Change, Extent, GRANULE};
use backy_common::{Error, Result};
use backy_proto::push_frame::Frame;
use backy_proto::{GranuleDigests, GranulesWanted};
use std::collections::VecDeque;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};

/// What a scan produced besides its frames.
#[derive(Debug)]
pub struct Scanned {
    /// Every block's digest: the manifest the server must end up with.
    pub manifest: Manifest,
    /// [`StreamChecksum`] over exactly the frames emitted.
    pub checksum: [u8; 32],
    /// Bytes read from the source (holes are not read).
    pub bytes_read: u64,
    /// Payload bytes of the data frames and granule digests.
    pub bytes_sent: u64,
    /// Of `bytes_sent`, the granule digests.
    pub digest_bytes: u64,
    /// Blocks sent as data or zeros.
    pub changed_blocks: u64,
    /// Bytes of changed blocks the server held already (deduplicated
    /// transfer): not sent.
    pub bytes_held: u64,
}

/// Classifies blocks against the baseline and emits the frames for them.
pub struct Scanner<E> {
    /// Starts as the baseline; each visited block's digest replaces the
    /// parent's once it has been compared.
    manifest: Manifest,
    frames: PushFrames<E>,
    full_zero: Digest,
    next_block: u64,
    bytes_read: u64,
    changed_blocks: u64,
    /// Known changes since the baseline (coalesced, ascending): a changed
    /// block sends only its bytes inside them, the rest being the
    /// baseline's already. `None`: changed blocks are sent whole.
    known: Option<Vec<Extent>>,
    /// The first of `known` that may still overlap the next block.
    known_next: usize,
    /// The granule exchange, when the server speaks it and there is a
    /// parent to compare with.
    exchange: Option<Exchange>,
    /// Aligned all-zero runs of this size in sent data go as zero ranges.
    zero_granule: u64,
    /// The job's key: [`Scanner::block`] encrypts what it is handed.
    key: Option<std::sync::Arc<Key>>,
}

/// The server's answers to granule digests, in the order asked: with
/// `true` it waits for the next, else returns `None` when none is there.
/// An error means the push stream ended.
pub type Answers = Box<dyn FnMut(bool) -> Result<Option<GranulesWanted>> + Send>;

/// Changed blocks whose granule digests may await an answer at once: the
/// pipeline's depth, and (times the block size) the data held meanwhile.
pub const EXCHANGE_WINDOW: usize = 8;

struct Exchange {
    answers: Answers,
    /// Ask with each block's digest whether the server holds it (protocol
    /// 5), also for blocks with no parent data to compare granules with.
    dedup: bool,
    bytes_held: u64,
    /// Ranges waiting behind the first block that awaits its answer.
    queue: VecDeque<Queued>,
    /// Blocks in `queue`.
    asked: usize,
    digest_bytes: u64,
}

enum Queued {
    Block { index: u64, offset: u64, data: Vec<u8> },
    Zero(u64, u64),
}

impl<E: FnMut(Frame) -> Result<()>> Scanner<E> {
    /// `baseline` has the source's size: the parent's manifest (resized),
    /// or an all-zero manifest for a full backup.
    pub fn new(baseline: Manifest, emit: E) -> Self {
        let full_zero = zero_digest(baseline.block_size() as u64);
        Scanner {
            manifest: baseline,
            frames: PushFrames::new(emit),
            full_zero,
            next_block: 0,
            bytes_read: 0,
            changed_blocks: 0,
            known: None,
            known_next: 0,
            exchange: None,
            zero_granule: ZERO_GRANULE,
            key: None,
        }
    }

    /// Encrypts each block [`Scanner::block`] is handed (zero granules
    /// stay zeros) before anything else sees it, and widens the known
    /// changes (set before or after) to whole granules: a granule's
    /// ciphertext depends on all of its bytes.
    pub fn with_key(mut self, key: Option<std::sync::Arc<Key>>) -> Self {
        self.key = key;
        self.widen_known();
        self
    }

    fn widen_known(&mut self) {
        if self.key.is_some() {
            if let Some(known) = self.known.take() {
                self.known = Some(widen(known, GRANULE, self.manifest.image_size()));
            }
        }
    }

    /// Detects zeros in sent data at `granule` bytes (a power of two)
    /// instead of [`ZERO_GRANULE`]: finer for small scattered changes.
    pub fn with_zero_granule(mut self, granule: u64) -> Self {
        self.zero_granule = granule;
        self
    }

    /// Sends changed blocks through the granule exchange (ignored for
    /// known changes, which send only their granules anyway).
    pub fn with_exchange(mut self, answers: Answers) -> Self {
        self.exchange = Some(Exchange {
            answers,
            dedup: false,
            bytes_held: 0,
            queue: VecDeque::new(),
            asked: 0,
            digest_bytes: 0,
        });
        self
    }

    /// Asks the server, with each changed block's digest, whether it holds
    /// the block already (it then clones it and nothing is sent); blocks
    /// whose parent data is zeros send no granule digests. Needs
    /// [`Self::with_exchange`] first.
    pub fn with_dedup(mut self) -> Self {
        if let Some(x) = &mut self.exchange {
            x.dedup = true;
        }
        self
    }

    /// Sends of changed blocks only their bytes inside `changed` (which
    /// must cover every byte that differs from the baseline): what the
    /// server holds outside them is the parent's and right already. A
    /// range list that misses a write is caught by the server, whose
    /// digests of the blocks then differ from this scan's manifest.
    pub fn with_known_changes(mut self, changed: Vec<Extent>) -> Self {
        self.known = Some(coalesce(changed));
        self.exchange = None;
        self.widen_known();
        self
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// A block read from the source; `data` is the whole block (as read:
    /// with a key it is encrypted here).
    pub fn block(&mut self, index: u64, data: &[u8]) -> Result<()> {
        if let Some(key) = self.key.clone() {
            let mut sealed = data.to_vec();
            key.encrypt(self.manifest.block_offset(index), &mut sealed)?;
            return self.block_digested(index, &sealed, block_digest(&sealed));
        }
        self.block_digested(index, data, block_digest(data))
    }

    /// A block read from the source with its digest (from
    /// [`block_digest`], computed by the reader thread).
    pub fn block_digested(&mut self, index: u64, data: &[u8], digest: Digest) -> Result<()> {
        self.settle(false)?;
        let (offset, len) = self.visit(index)?;
        if data.len() as u64 != len {
            return Err(Error::internal(format!(
                "block {index} has {} bytes, expected {len}",
                data.len()
            )));
        }
        self.bytes_read += len;
        let parent_zero = self.manifest.get(index) == Some(&self.zero_digest(len));
        let change = if self.manifest.get(index) == Some(&digest) {
            Change::Unchanged
        } else if digest == self.zero_digest(len) {
            Change::Zero
        } else {
            Change::Data
        };
        self.manifest.set(index, digest)?;
        match change {
            Change::Unchanged => Ok(()),
            Change::Zero => {
                self.changed_blocks += 1;
                self.zero(offset, len)
            }
            Change::Data if self.exchange.is_some() => {
                self.changed_blocks += 1;
                self.ask(index, offset, data, digest, parent_zero)
            }
            Change::Data => {
                self.changed_blocks += 1;
                match self.known_parts(offset, len) {
                    None => self.data(offset, data),
                    Some(parts) => {
                        for part in parts {
                            let within = (part.offset - offset) as usize..(part.end() - offset) as usize;
                            self.data(part.offset, &data[within])?;
                        }
                        Ok(())
                    }
                }
            }
        }
    }

    /// The pieces of the block at `offset` inside the known changes, or
    /// `None` when changes are not known.
    fn known_parts(&mut self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        let known = self.known.as_ref()?;
        let end = offset + len;
        while known.get(self.known_next).is_some_and(|e| e.end() <= offset) {
            self.known_next += 1;
        }
        let parts = known[self.known_next..]
            .iter()
            .take_while(|e| e.offset < end)
            .map(|e| {
                let from = e.offset.max(offset);
                Extent {
                    offset: from,
                    len: e.end().min(end) - from,
                }
            })
            .collect();
        Some(parts)
    }

    /// A block the source knows to be all zeros (a hole), not read.
    pub fn hole(&mut self, index: u64) -> Result<()> {
        self.settle(false)?;
        let (offset, len) = self.visit(index)?;
        let digest = self.zero_digest(len);
        if self.manifest.get(index) == Some(&digest) {
            return Ok(());
        }
        self.manifest.set(index, digest)?;
        self.changed_blocks += 1;
        self.zero(offset, len)
    }

    /// Emits what is pending (waiting for the last answers) and returns
    /// the results.
    pub fn finish(mut self) -> Result<Scanned> {
        self.settle(true)?;
        let digest_bytes = self.exchange.as_ref().map_or(0, |x| x.digest_bytes);
        let bytes_held = self.exchange.as_ref().map_or(0, |x| x.bytes_held);
        let (checksum, data_bytes) = self.frames.finish()?;
        Ok(Scanned {
            manifest: self.manifest,
            checksum,
            bytes_read: self.bytes_read,
            bytes_sent: data_bytes + digest_bytes,
            digest_bytes,
            changed_blocks: self.changed_blocks,
            bytes_held,
        })
    }

    /// A changed block in the exchange: its granule digests go now, its
    /// data waits for the answer.
    fn ask(&mut self, index: u64, offset: u64, data: &[u8], digest: Digest, parent_zero: bool) -> Result<()> {
        let dedup = self.exchange.as_ref().is_some_and(|x| x.dedup);
        // Granules compared with zeros would all differ: the block's digest
        // alone asks whether the server holds it.
        let digests = if dedup && parent_zero {
            Vec::new()
        } else {
            granules::digests(data)
        };
        let block_digest = if dedup { digest.to_vec() } else { Vec::new() };
        let n = (digests.len() + block_digest.len()) as u64;
        self.frames.other(Frame::Granules(GranuleDigests {
            block: index,
            digests,
            block_digest,
        }))?;
        if let Some(x) = &mut self.exchange {
            x.digest_bytes += n;
            x.asked += 1;
            x.queue.push_back(Queued::Block {
                index,
                offset,
                data: data.to_vec(),
            });
        }
        self.settle(false)
    }

    /// Sends what the queue holds up to the first block still without an
    /// answer; waits for answers while the window is full, or for all of
    /// them with `all`. A server's answer is checked against the block
    /// asked about, never trusted beyond it.
    fn settle(&mut self, all: bool) -> Result<()> {
        let Some(x) = &mut self.exchange else {
            return Ok(());
        };
        while let Some(front) = x.queue.front() {
            if let Queued::Zero(offset, len) = *front {
                self.frames.zero(offset, len)?;
                x.queue.pop_front();
                continue;
            }
            let wait = all || x.asked >= EXCHANGE_WINDOW;
            let Some(answer) = (x.answers)(wait)? else {
                if wait {
                    return Err(Error::internal("no granule answer while waiting for one"));
                }
                break;
            };
            let Some(Queued::Block { index, offset, data }) = x.queue.pop_front() else {
                break;
            };
            x.asked -= 1;
            let bad = |why: String| Error::internal(format!("server sent a bad granule answer: {why}"));
            if answer.block != index {
                return Err(bad(format!("for block {}, asked about {index}", answer.block)));
            }
            if answer.held {
                if !x.dedup {
                    return Err(bad(format!("block {index} held, but not asked whether it is")));
                }
                x.bytes_held += data.len() as u64;
                continue;
            }
            let wanted =
                granules::wanted_ranges(&answer.bitmap, data.len() as u64).map_err(|e| bad(e.message))?;
            for r in wanted {
                self.frames
                    .data(offset + r.start as u64, &data[r], ZERO_GRANULE)?;
            }
        }
        Ok(())
    }

    /// Checks the block comes after the previous one (frames must be in
    /// offset order) and returns its offset and length.
    fn visit(&mut self, index: u64) -> Result<(u64, u64)> {
        if index < self.next_block || index >= self.manifest.block_count() {
            return Err(Error::internal(format!(
                "block {index} out of order or beyond the image (next {}, count {})",
                self.next_block,
                self.manifest.block_count()
            )));
        }
        self.next_block = index + 1;
        Ok((self.manifest.block_offset(index), self.manifest.block_len(index)))
    }

    fn zero_digest(&self, len: u64) -> Digest {
        if len == self.manifest.block_size() as u64 {
            self.full_zero
        } else {
            zero_digest(len)
        }
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match &mut self.exchange {
            // Behind a block awaiting its answer: ranges go in order.
            Some(x) if !x.queue.is_empty() => {
                x.queue.push_back(Queued::Zero(offset, len));
                Ok(())
            }
            _ => self.frames.zero(offset, len),
        }
    }

    /// Changed bytes at `offset`: all-zero granules travel as zero ranges
    /// (nothing to send, holes on the server), the rest as data. Granules
    /// keep the server's writes and holes in pieces of at least 64 KiB, so
    /// revisions do not fragment into page-sized extents.
    fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.frames.data(offset, data, self.zero_granule)
    }
}

/// Scans a source against `baseline` (which must have the source's size).
/// `changed`: extents known to differ from the baseline; blocks outside them
/// keep the baseline's digest unread. `exchange`: the server's answers in
/// the granule exchange. `progress` gets the offset scanned to.
///
/// `key`: the job's encryption key: each block read is encrypted in place
/// (zero granules stay zeros) before it is digested, compared and sent,
/// so everything after the read, and the server, sees only ciphertext;
/// known changes are widened to whole granules, since a granule's
/// ciphertext (or its being a hole) depends on all of its bytes.
#[allow(clippy::too_many_arguments)]
pub fn scan<E: FnMut(Frame) -> Result<()>>(
    source: &mut dyn Source,
    baseline: Manifest,
    changed: Option<Vec<Extent>>,
    exchange: Option<(Answers, bool)>,
    key: Option<&Key>,
    emit: E,
    mut progress: impl FnMut(u64),
) -> Result<Scanned> {
    let size = source.size();
    if baseline.image_size() != size {
        return Err(Error::internal(format!(
            "baseline manifest is for {} bytes, source has {size}",
            baseline.image_size()
        )));
    }
    let block_size = baseline.block_size();
    let count = baseline.block_count();
    let mut scanner = Scanner::new(baseline, emit);
    if let Some((answers, dedup)) = exchange {
        scanner = scanner.with_exchange(answers);
        if dedup {
            scanner = scanner.with_dedup();
        }
    }
    let changed = match (changed, key) {
        (Some(extents), Some(_)) => Some(widen(extents, GRANULE, size)),
        (changed, _) => changed,
    };
    let blocks: Box<dyn Iterator<Item = u64> + Send> = match changed {
        None => Box::new(0..count),
        Some(extents) => {
            scanner = scanner.with_known_changes(extents.clone());
            Box::new(changed_blocks(extents, block_size, count))
        }
    };
    let geometry = Manifest::zeroed(size, block_size)?;
    // A reader thread keeps a few blocks read ahead, digest threads hash
    // them (block k on thread k mod n, so each hashes whole blocks with
    // SIMD and nothing waits on a split), and this one takes them back in
    // order, compares and sends: reading, hashing and the network overlap,
    // and a warm source is read about as fast as it is copied.
    std::thread::scope(|threads| {
        let digesters = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(1, 4);
        let (free_tx, free_rx) = channel::<Vec<u8>>();
        let mut fetch_txs = Vec::with_capacity(digesters);
        let mut read_rxs = Vec::with_capacity(digesters);
        // The blocks in flight stay as many whatever the thread count.
        let ahead = READ_AHEAD.div_ceil(digesters);
        for _ in 0..digesters {
            let (fetch_tx, fetch_rx) = sync_channel::<Result<Fetched>>(ahead);
            let (read_tx, read_rx) = sync_channel::<Result<Read>>(ahead);
            threads.spawn(move || digest_blocks(fetch_rx, read_tx, key, block_size));
            fetch_txs.push(fetch_tx);
            read_rxs.push(read_rx);
        }
        threads.spawn(move || read_blocks(source, &geometry, blocks, fetch_txs, free_rx));
        // The reader's end closes every digest thread's input, so the
        // first missing block's channel ends the loop.
        for read in (0..).map_while(|k: usize| read_rxs[k % digesters].recv().ok()) {
            match read? {
                Read::Hole(index) => {
                    scanner.hole(index)?;
                    progress(scanner.manifest().block_offset(index) + scanner.manifest().block_len(index));
                }
                Read::Block(index, buf, digest) => {
                    let len = scanner.manifest().block_len(index);
                    scanner.block_digested(index, &buf[..len as usize], digest)?;
                    progress(scanner.manifest().block_offset(index) + len);
                    // The reader may have stopped; then the buffer just goes.
                    let _ = free_tx.send(buf);
                }
            }
        }
        // Returning early (an error) drops the receivers first, which
        // stops the reader at its next send.
        scanner.finish()
    })
}

/// Smallest all-zero piece of a changed block sent as a zero range.
const ZERO_GRANULE: u64 = backy_common::ranges::GRANULE;

/// Blocks read ahead of the digesting and sending.
const READ_AHEAD: usize = 4;

/// Blocks the source is asked to fetch ahead of the reader.
const PREFETCH: usize = 4;

/// What the reader thread hands over, in block order.
enum Fetched {
    /// A block in a hole: all zeros, not read.
    Hole(u64),
    /// A block's bytes: the first `len` of the buffer.
    Block(u64, Vec<u8>, usize),
}

/// What the digest thread hands over, in block order.
enum Read {
    /// A block in a hole: all zeros, not read.
    Hole(u64),
    /// A block's bytes (the buffer may be longer than the block) and digest.
    Block(u64, Vec<u8>, Digest),
}

/// A digest thread: each block it is handed gets its digest, in order;
/// stops at the first error (passed on) or when either side is gone.
/// With a key, each block is encrypted first (on these threads, so the
/// cores share the encryption as they share the hashing).
fn digest_blocks(
    fetched: Receiver<Result<Fetched>>,
    out: SyncSender<Result<Read>>,
    key: Option<&Key>,
    block_size: u32,
) {
    for f in fetched {
        let read = f.and_then(|f| match f {
            Fetched::Hole(index) => Ok(Read::Hole(index)),
            Fetched::Block(index, mut buf, len) => {
                if let Some(key) = key {
                    key.encrypt(index * block_size as u64, &mut buf[..len])?;
                }
                let digest = block_digest(&buf[..len]);
                Ok(Read::Block(index, buf, digest))
            }
        });
        let failed = read.is_err();
        if out.send(read).is_err() || failed {
            return;
        }
    }
}

/// A block's digest: zero blocks get the known zero digest unhashed. One
/// thread (SIMD) per block: the digest threads share the cores by blocks,
/// where splitting each block (rayon) cost more in idle spinning than it
/// saved on a small, shared machine.
pub(crate) fn block_digest(data: &[u8]) -> Digest {
    if is_all_zero(data) {
        zero_digest(data.len() as u64)
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// The reader thread: reads `blocks` in order (skipping holes), handing
/// the k-th to `outs[k mod n]` and reusing buffers that come back through
/// `free`. Stops at the first error (sent on) or when a receiver is gone.
fn read_blocks(
    source: &mut dyn Source,
    geometry: &Manifest,
    mut blocks: Box<dyn Iterator<Item = u64> + Send + '_>,
    outs: Vec<SyncSender<Result<Fetched>>>,
    free: Receiver<Vec<u8>>,
) {
    let mut sent = 0usize;
    let mut map = DataMap::default();
    // The next blocks to read with their data pieces; each is prefetched
    // as it joins, PREFETCH blocks before it is read.
    let mut upcoming = VecDeque::with_capacity(PREFETCH + 1);
    loop {
        while upcoming.len() <= PREFETCH {
            let Some(next) = blocks.next() else { break };
            let pieces = map.pieces(source, geometry.block_offset(next), geometry.block_len(next));
            // Only its data: prefetching holes would fill the cache with zeros.
            for p in pieces.iter().flatten() {
                source.will_need(p.offset, p.len);
            }
            upcoming.push_back((next, pieces));
        }
        let Some((index, pieces)) = upcoming.pop_front() else {
            break;
        };
        let read = pieces.and_then(|pieces| {
            if pieces.is_empty() {
                return Ok(Fetched::Hole(index));
            }
            let offset = geometry.block_offset(index);
            let len = geometry.block_len(index) as usize;
            let mut buf = free
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; geometry.block_size() as usize]);
            read_pieces(source, offset, &mut buf[..len], &pieces)?;
            Ok(Fetched::Block(index, buf, len))
        });
        let failed = read.is_err();
        if outs[sent % outs.len()].send(read).is_err() || failed {
            return;
        }
        sent += 1;
    }
}

/// Fills `block` (the bytes at `offset`, in a reused buffer) from the
/// source's `pieces` of it (ascending, inside it) and zeros between them:
/// the same bytes as one read of the whole block, holes reading as zeros.
fn read_pieces(source: &mut dyn Source, offset: u64, block: &mut [u8], pieces: &[Extent]) -> Result<()> {
    let mut at = 0;
    for p in pieces {
        let from = (p.offset - offset) as usize;
        let to = from + p.len as usize;
        block[at..from].fill(0);
        source.read_at(p.offset, &mut block[from..to])?;
        at = to;
    }
    block[at..].fill(0);
    Ok(())
}

/// Data regions read one by one in a block at most; a block more
/// fragmented reads the rest whole (each region costs a seek and a read,
/// and the page cache bookkeeping remembers a few blocks' pieces).
const MAX_PIECES: usize = 8;

/// Where the data of ascending blocks is, with one [`Source::next_data`]
/// per data region: the last answer holds for every offset up to the end
/// of the region it found (a region may span many blocks, a hole too).
#[derive(Default)]
struct DataMap {
    /// The offset last asked about and the answer.
    last: Option<(u64, Option<Extent>)>,
}

impl DataMap {
    /// The first data at or after `at`, clipped to start there.
    fn next_data(&mut self, source: &mut dyn Source, at: u64) -> Result<Option<Extent>> {
        let known = self
            .last
            .is_some_and(|(asked, found)| asked <= at && found.is_none_or(|r| at < r.end()));
        if !known {
            let found = source.next_data(at)?;
            if found.is_some_and(|r| r.end() <= at) {
                return Err(Error::internal(format!(
                    "the source reported data ending before offset {at}, asked from there"
                )));
            }
            self.last = Some((at, found));
        }
        Ok(self.last.and_then(|(_, found)| found).map(|r| {
            let from = r.offset.max(at);
            Extent {
                offset: from,
                len: r.end() - from,
            }
        }))
    }

    /// What to read of the `len` bytes at `offset`, ascending: nothing for
    /// a hole; the whole block where any data is, unless the source reads
    /// data only ([`Source::reads_data_only`]): then its data regions.
    fn pieces(&mut self, source: &mut dyn Source, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset + len;
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < end {
            let Some(r) = self.next_data(source, at)? else {
                break;
            };
            if r.offset >= end {
                break;
            }
            if !source.reads_data_only() {
                return Ok(vec![Extent { offset, len }]);
            }
            if pieces.len() + 1 == MAX_PIECES {
                pieces.push(Extent {
                    offset: r.offset,
                    len: end - r.offset,
                });
                break;
            }
            let to = r.end().min(end);
            pieces.push(Extent {
                offset: r.offset,
                len: to - r.offset,
            });
            at = to;
        }
        Ok(pieces)
    }
}

/// Extents grown to whole `unit`s (within `size`), coalesced.
fn widen(extents: Vec<Extent>, unit: u64, size: u64) -> Vec<Extent> {
    let grown = extents
        .into_iter()
        .filter(|e| e.len > 0)
        .map(|e| {
            let start = e.offset / unit * unit;
            let end = e.end().div_ceil(unit).saturating_mul(unit).min(size);
            Extent {
                offset: start,
                len: end.saturating_sub(start),
            }
        })
        .filter(|e| e.len > 0)
        .collect();
    coalesce(grown)
}

/// Blocks touched by a set of extents, ascending and each once.
fn changed_blocks(extents: Vec<Extent>, block_size: u32, count: u64) -> impl Iterator<Item = u64> {
    let mut last = None;
    coalesce(extents)
        .into_iter()
        .flat_map(move |e| blocks_of(e, block_size))
        .filter(move |&b| {
            let fresh = b < count && last.is_none_or(|l| b > l);
            if fresh {
                last = Some(b);
            }
            fresh
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::mem::MemSource;
    use backy_common::checksum::StreamChecksum;
    use backy_common::manifest::digest;
    use backy_common::MAX_FRAME_DATA;
    use proptest::prelude::*;

    const BS: u32 = 64 << 10;
    const B: usize = BS as usize;

    /// Runs a scan and collects its frames.
    fn run(src: &mut MemSource, baseline: Manifest, changed: Option<Vec<Extent>>) -> (Vec<Frame>, Scanned) {
        let mut frames = Vec::new();
        let scanned = scan(
            src,
            baseline,
            changed,
            None,
            None,
            |f| {
                frames.push(f);
                Ok(())
            },
            |_| {},
        )
        .unwrap();
        (frames, scanned)
    }

    fn manifest_of(image: &[u8], bs: u32) -> Manifest {
        let mut m = Manifest::zeroed(image.len() as u64, bs).unwrap();
        for (i, block) in image.chunks(bs as usize).enumerate() {
            m.set(i as u64, digest(block)).unwrap();
        }
        m
    }

    /// The parent image with the frames applied, as the server does it.
    fn apply(parent: &[u8], size: usize, frames: &[Frame]) -> Vec<u8> {
        let mut img = parent.to_vec();
        img.resize(size, 0);
        for f in frames {
            match f {
                Frame::Data(d) => {
                    let o = d.offset as usize;
                    img[o..o + d.data.len()].copy_from_slice(&d.data);
                }
                Frame::Zero(z) => {
                    let o = z.offset as usize;
                    img[o..o + z.length as usize].fill(0);
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        img
    }

    fn recompute_checksum(frames: &[Frame]) -> [u8; 32] {
        let mut c = StreamChecksum::new();
        for f in frames {
            match f {
                Frame::Data(d) => c.data(d.offset, &d.data),
                Frame::Zero(z) => c.zero(z.offset, z.length),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        c.finish()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn unchanged_blocks_send_nothing() {
        let image = pattern(4 * B + 100, 1);
        let mut src = MemSource::new(image.clone());
        let (frames, scanned) = run(&mut src, manifest_of(&image, BS), None);
        assert!(frames.is_empty(), "{frames:?}");
        assert_eq!(scanned.bytes_sent, 0);
        assert_eq!(scanned.bytes_read, image.len() as u64);
        assert_eq!(scanned.changed_blocks, 0);
        assert_eq!(scanned.manifest, manifest_of(&image, BS));
        assert_eq!(scanned.checksum, StreamChecksum::new().finish());
    }

    #[test]
    fn changed_block_sends_its_data_in_small_frames() {
        // 4 MiB blocks: one changed block is four 1 MiB frames.
        let bs = 4u32 << 20;
        let parent = pattern(3 * bs as usize, 1);
        let mut image = parent.clone();
        image[bs as usize + 5] ^= 0xff;
        let mut src = MemSource::new(image.clone());
        let (frames, scanned) = run(&mut src, manifest_of(&parent, bs), None);
        assert_eq!(frames.len(), 4);
        for (i, f) in frames.iter().enumerate() {
            let Frame::Data(d) = f else { panic!("{f:?}") };
            assert_eq!(d.offset, bs as u64 + (i * MAX_FRAME_DATA) as u64);
            assert_eq!(d.data.len(), MAX_FRAME_DATA);
        }
        assert_eq!(scanned.bytes_sent, bs as u64);
        assert_eq!(scanned.changed_blocks, 1);
        assert_eq!(apply(&parent, image.len(), &frames), image);
        assert_eq!(scanned.checksum, recompute_checksum(&frames));
    }

    #[test]
    fn zero_granules_of_a_changed_block_travel_as_zero_ranges() {
        // A 4 MiB block over a parent's data: new bytes in its first 100 KiB
        // and its last 10, zeros between; then a zero block, coalesced with
        // the zeros before it.
        let bs = 4u32 << 20;
        let g = ZERO_GRANULE;
        let parent = pattern(2 * bs as usize, 1);
        let mut image = vec![0u8; 2 * bs as usize];
        image[..100 << 10].copy_from_slice(&pattern(100 << 10, 2));
        image[bs as usize - 10..bs as usize].fill(3);
        let mut src = MemSource::new(image.clone());
        let (frames, scanned) = run(&mut src, manifest_of(&parent, bs), None);
        let sent = crate::frames::summary(&frames);
        let b = bs as u64;
        assert_eq!(
            sent,
            [
                ('D', 0, 2 * g),
                ('Z', 2 * g, b - 3 * g),
                ('D', b - g, g),
                ('Z', b, b)
            ]
        );
        assert_eq!(scanned.bytes_sent, 3 * g);
        assert_eq!(scanned.changed_blocks, 2);
        assert_eq!(apply(&parent, image.len(), &frames), image);
        assert_eq!(scanned.checksum, recompute_checksum(&frames));
    }

    #[test]
    fn zero_runs_coalesce_and_holes_are_not_read() {
        // Parent: all data. Source: blocks 1-3 and 5 zero (2 and 3 in a hole).
        let parent = pattern(7 * B, 3);
        let mut image = parent.clone();
        image[B..4 * B].fill(0);
        image[5 * B..6 * B].fill(0);
        let mut src = MemSource::new(image.clone());
        src.regions = Some(vec![
            Extent {
                offset: 0,
                len: 2 * B as u64,
            },
            Extent {
                offset: 4 * B as u64,
                len: 3 * B as u64,
            },
        ]);
        let (frames, scanned) = run(&mut src, manifest_of(&parent, BS), None);
        let zeros: Vec<_> = frames
            .iter()
            .map(|f| match f {
                Frame::Zero(z) => (z.offset, z.length),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(zeros, [(B as u64, 3 * B as u64), (5 * B as u64, B as u64)]);
        assert_eq!(src.reads, [0, B as u64, 4 * B as u64, 5 * B as u64, 6 * B as u64]);
        assert_eq!(scanned.bytes_read, 5 * B as u64);
        assert_eq!(scanned.changed_blocks, 4);
        assert_eq!(scanned.manifest, manifest_of(&image, BS));
        assert_eq!(apply(&parent, image.len(), &frames), image);
    }

    /// An image of 8 blocks and a short ninth with data regions inside
    /// blocks (one spanning two, one of zeros), and its regions.
    fn holey_image() -> (Vec<u8>, Vec<Extent>) {
        const K: usize = 4096;
        let regions = [
            (0, B),         // block 0 whole
            (B + K, 2 * K), // block 1: two pieces
            (B + 10 * K, K),
            (4 * B + 15 * K, 3 * K), // blocks 4-5: one region across
            (6 * B + 5 * K, 2 * K),  // block 6: data that is zeros
            (8 * B, K),              // the short last block
        ];
        let mut image = vec![0u8; 8 * B + 2 * K];
        for (i, &(at, len)) in regions.iter().enumerate() {
            if at != 6 * B + 5 * K {
                image[at..at + len].copy_from_slice(&pattern(len, i as u8));
            }
        }
        let regions = regions
            .iter()
            .map(|&(at, len)| Extent {
                offset: at as u64,
                len: len as u64,
            })
            .collect();
        (image, regions)
    }

    /// A scan of the image read whole (every byte) and of the same image
    /// read by its data regions only.
    fn whole_and_data_only(image: &[u8], regions: Vec<Extent>) -> ((Vec<Frame>, Scanned), MemSource) {
        let baseline = || Manifest::zeroed(image.len() as u64, BS).unwrap();
        let whole = run(&mut MemSource::new(image.to_vec()), baseline(), None);
        let mut src = MemSource::new(image.to_vec());
        src.regions = Some(regions);
        src.data_only = true;
        let (frames, scanned) = run(&mut src, baseline(), None);
        assert_eq!(frames, whole.0);
        assert_eq!(scanned.checksum, whole.1.checksum);
        assert_eq!(scanned.manifest, whole.1.manifest);
        assert_eq!(scanned.manifest, manifest_of(image, BS));
        ((frames, scanned), src)
    }

    #[test]
    fn data_only_sources_read_the_data_and_zero_the_holes() {
        let (image, regions) = holey_image();
        let (_, src) = whole_and_data_only(&image, regions);
        let k = 4096;
        let b = B as u64;
        assert_eq!(
            src.reads,
            [0, b + k, b + 10 * k, 4 * b + 15 * k, 5 * b, 6 * b + 5 * k, 8 * b],
            "each block's data regions only, the one across two blocks in two reads"
        );
    }

    #[test]
    fn a_block_of_many_regions_reads_the_rest_whole() {
        // Block 1 has 12 regions of 1 KiB with holes between them.
        let k = 1024;
        let mut image = vec![0u8; 3 * B];
        image[..B].copy_from_slice(&pattern(B, 1));
        let mut regions = vec![Extent {
            offset: 0,
            len: B as u64,
        }];
        for i in 0..12 {
            let at = B + (2 * i + 1) * k;
            image[at..at + k].copy_from_slice(&pattern(k, i as u8));
            regions.push(Extent {
                offset: at as u64,
                len: k as u64,
            });
        }
        let (_, src) = whole_and_data_only(&image, regions);
        let mut expected = vec![0];
        expected.extend((0..MAX_PIECES as u64).map(|i| B as u64 + (2 * i + 1) * k as u64));
        assert_eq!(
            src.reads, expected,
            "{MAX_PIECES} reads, the last to the block's end"
        );
    }

    /// A real sparse file: each block the reader hands over (in buffers
    /// full of old bytes) holds exactly the file's bytes, and the scan's
    /// frames, checksum and digests are those of the file read whole.
    #[test]
    fn a_sparse_file_reads_as_if_read_whole() {
        use std::io::{Seek, SeekFrom, Write};
        let (image, regions) = holey_image();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(image.len() as u64).unwrap();
        for r in &regions {
            f.seek(SeekFrom::Start(r.offset)).unwrap();
            f.write_all(&image[r.offset as usize..r.end() as usize]).unwrap();
        }
        f.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), image);
        let mut src = crate::source::open_path(&path).unwrap();
        assert!(src.reads_data_only(), "this filesystem reports holes");
        let holes = src.next_data(2 * B as u64).unwrap().unwrap();
        assert!(holes.offset >= 4 * B as u64, "blocks 2-3 are a hole: {holes:?}");

        let geometry = Manifest::zeroed(image.len() as u64, BS).unwrap();
        let count = geometry.block_count();
        let (free_tx, free_rx) = channel();
        for _ in 0..count {
            free_tx.send(vec![0xa5; B]).unwrap();
        }
        let (tx, rx) = sync_channel(count as usize);
        read_blocks(&mut *src, &geometry, Box::new(0..count), vec![tx], free_rx);
        let mut seen = Vec::new();
        for fetched in rx.try_iter() {
            match fetched.unwrap() {
                Fetched::Hole(i) => {
                    let range = geometry.block_offset(i) as usize
                        ..(geometry.block_offset(i) + geometry.block_len(i)) as usize;
                    assert!(is_all_zero(&image[range]), "block {i} is no hole");
                    seen.push((i, false));
                }
                Fetched::Block(i, buf, len) => {
                    let at = geometry.block_offset(i) as usize;
                    assert_eq!(&buf[..len], &image[at..at + len], "block {i}");
                    seen.push((i, true));
                }
            }
        }
        let read: Vec<_> = seen.iter().map(|&(_, data)| data).collect();
        assert_eq!(read, [true, true, false, false, true, true, true, false, true]);

        let baseline = Manifest::zeroed(image.len() as u64, BS).unwrap();
        let whole = run(&mut MemSource::new(image.clone()), baseline.clone(), None);
        let mut frames = Vec::new();
        let scanned = scan(
            &mut *src,
            baseline,
            None,
            None,
            None,
            |f| {
                frames.push(f);
                Ok(())
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(frames, whole.0);
        assert_eq!(scanned.checksum, whole.1.checksum);
        assert_eq!(scanned.manifest, manifest_of(&image, BS));
    }

    #[test]
    fn full_backup_of_sparse_image_sends_only_data() {
        let mut image = vec![0u8; 6 * B + 10];
        image[2 * B + 7] = 9;
        image[6 * B + 3] = 1; // in the short last block
        let mut src = MemSource::new(image.clone());
        let baseline = Manifest::zeroed(image.len() as u64, BS).unwrap();
        let (frames, scanned) = run(&mut src, baseline, None);
        assert_eq!(frames.len(), 2);
        assert!(matches!(&frames[1], Frame::Data(d) if d.offset == 6 * B as u64 && d.data.len() == 10));
        assert_eq!(scanned.bytes_sent, B as u64 + 10);
        assert_eq!(scanned.manifest, manifest_of(&image, BS));
        assert_eq!(apply(&[], image.len(), &frames), image);
    }

    #[test]
    fn grown_and_shrunk_images() {
        let parent = pattern(3 * B + 100, 5);
        for size in [B / 2, B, 2 * B + 1, 3 * B + 100, 3 * B + 200, 5 * B, 6 * B + 3] {
            // The source keeps the parent's bytes where both have them,
            // and zeros beyond (like a grown disk).
            let mut image = parent.clone();
            image.resize(size, 0);
            let mut baseline = manifest_of(&parent, BS);
            baseline.resize(size as u64).unwrap();
            let mut src = MemSource::new(image.clone());
            let (frames, scanned) = run(&mut src, baseline, None);
            assert_eq!(apply(&parent, size, &frames), image, "size {size}");
            assert_eq!(scanned.manifest, manifest_of(&image, BS), "size {size}");
            assert_eq!(scanned.checksum, recompute_checksum(&frames));
            // At most the blocks at the old and new end change.
            assert!(
                scanned.changed_blocks <= 2,
                "size {size}: {}",
                scanned.changed_blocks
            );
        }
    }

    #[test]
    fn known_changes_read_only_their_blocks() {
        let parent = pattern(8 * B, 1);
        let mut image = parent.clone();
        image[3 * B + 1] ^= 1;
        image[6 * B..6 * B + 10].fill(0);
        let mut src = MemSource::new(image.clone());
        src.changed = Some(vec![
            Extent {
                offset: 6 * B as u64,
                len: 10,
            },
            Extent {
                offset: 3 * B as u64,
                len: 2,
            },
            Extent {
                offset: 3 * B as u64 + 100,
                len: 2,
            },
            Extent {
                offset: 100 * B as u64,
                len: 1,
            },
        ]);
        let changed = src.changed.clone();
        let (frames, scanned) = run(&mut src, manifest_of(&parent, BS), changed);
        assert_eq!(src.reads, [3 * B as u64, 6 * B as u64]);
        // Only the changed bytes of the changed blocks: two data ranges in
        // block 3 and the zeroed one in block 6, which travels as zeros.
        let sent = crate::frames::summary(&frames);
        let b = B as u64;
        assert_eq!(sent, [('D', 3 * b, 2), ('D', 3 * b + 100, 2), ('Z', 6 * b, 10)]);
        assert_eq!(scanned.bytes_sent, 4);
        assert_eq!(scanned.changed_blocks, 2);
        assert_eq!(scanned.manifest, manifest_of(&image, BS));
        assert_eq!(apply(&parent, image.len(), &frames), image);
    }

    #[test]
    fn emit_failure_stops_the_scan() {
        let image = pattern(3 * B, 1);
        let mut src = MemSource::new(image.clone());
        let baseline = Manifest::zeroed(image.len() as u64, BS).unwrap();
        let mut sent = 0;
        let e = scan(
            &mut src,
            baseline,
            None,
            None,
            None,
            |_| {
                sent += 1;
                Err(Error::unavailable("closed"))
            },
            |_| {},
        )
        .unwrap_err();
        assert_eq!(e.message, "closed");
        assert_eq!(sent, 1);
        // The reader may be a few blocks ahead, never further.
        assert!(src.reads.len() <= 2 + READ_AHEAD, "{:?}", src.reads);
    }

    #[test]
    fn refuses_out_of_order_blocks() {
        let mut s = Scanner::new(Manifest::zeroed(3 * B as u64, BS).unwrap(), |_| Ok(()));
        s.hole(1).unwrap();
        assert!(s.hole(1).is_err());
        assert!(s.hole(3).is_err());
        assert!(s.block(2, &[1, 2]).is_err());
    }

    /// A scan through the granule exchange, answered as the server would
    /// from `parent` (or by `answer` when given).
    fn run_exchange(
        src: &mut MemSource,
        parent: &[u8],
        bs: u32,
        answer: Option<fn(u64, Vec<u8>) -> GranulesWanted>,
    ) -> Result<(Vec<Frame>, Scanned)> {
        use std::sync::{Arc, Mutex};
        let pending = Arc::new(Mutex::new(VecDeque::new()));
        let asked = pending.clone();
        let answers: Answers = Box::new(move |_wait| Ok(pending.lock().unwrap().pop_front()));
        let mut frames = Vec::new();
        let mut baseline = manifest_of(parent, bs);
        baseline.resize(src.size()).unwrap();
        let parent = parent.to_vec();
        let scanned = scan(
            src,
            baseline,
            None,
            Some((answers, false)),
            None,
            |f| {
                if let Frame::Granules(g) = &f {
                    let start = g.block as usize * bs as usize;
                    let theirs = granules::digests(&parent[start..(start + bs as usize).min(parent.len())]);
                    let bitmap = granules::differing(&theirs, &g.digests);
                    let a = match answer {
                        Some(make) => make(g.block, bitmap),
                        None => GranulesWanted {
                            block: g.block,
                            bitmap,
                            held: false,
                        },
                    };
                    asked.lock().unwrap().push_back(a);
                }
                frames.push(f);
                Ok(())
            },
            |_| {},
        )?;
        Ok((frames, scanned))
    }

    /// Protocol 5: a full push asks about each data block with its digest
    /// alone (no parent granules to compare); a block the server holds is
    /// not sent, the others go whole.
    #[test]
    fn dedup_asks_with_block_digests_and_sends_no_held_block() {
        use std::sync::{Arc, Mutex};
        let bs = 4 * ZERO_GRANULE as u32;
        let b = bs as usize;
        let image = [pattern(b, 1), vec![0; b], pattern(b, 2), pattern(b, 3)].concat();
        let held = digest(&image[2 * b..3 * b]);
        let pending = Arc::new(Mutex::new(VecDeque::new()));
        let asked = pending.clone();
        let answers: Answers = Box::new(move |_wait| Ok(pending.lock().unwrap().pop_front()));
        let mut frames = Vec::new();
        let mut src = MemSource::new(image.clone());
        let baseline = Manifest::zeroed(image.len() as u64, bs).unwrap();
        let scanned = scan(
            &mut src,
            baseline,
            None,
            Some((answers, true)),
            None,
            |f| {
                if let Frame::Granules(g) = &f {
                    assert!(g.digests.is_empty(), "no granules compared with zeros");
                    let start = g.block as usize * b;
                    assert_eq!(g.block_digest, digest(&image[start..start + b]).to_vec());
                    let is_held = g.block_digest == held.to_vec();
                    asked.lock().unwrap().push_back(GranulesWanted {
                        block: g.block,
                        bitmap: if is_held {
                            granules::none_wanted(b as u64)
                        } else {
                            granules::all_wanted(b as u64)
                        },
                        held: is_held,
                    });
                }
                frames.push(f);
                Ok(())
            },
            |_| {},
        )
        .unwrap();
        let asked: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Granules(x) => Some(x.block),
                _ => None,
            })
            .collect();
        assert_eq!(asked, [0, 2, 3], "data blocks only");
        let ranges: Vec<Frame> = frames
            .into_iter()
            .filter(|f| !matches!(f, Frame::Granules(_)))
            .collect();
        let sent = apply(&[], image.len(), &ranges);
        let mut expected = image.clone();
        expected[2 * b..3 * b].fill(0);
        assert_eq!(sent, expected, "everything but the held block");
        assert_eq!(scanned.bytes_held, b as u64);
        assert_eq!(scanned.manifest, manifest_of(&image, bs));
    }

    #[test]
    fn the_exchange_sends_only_differing_granules_in_order() {
        // 256 KiB blocks of four granules. Block 0: granule 1 changed,
        // granule 3 zeroed; block 1 unchanged; block 2 now zero; block 3
        // changed in every granule.
        let bs = 4 * ZERO_GRANULE as u32;
        let (b, g) = (bs as usize, ZERO_GRANULE as usize);
        let parent = pattern(4 * b, 1);
        let mut image = parent.clone();
        image[g + 7] ^= 0xff;
        image[3 * g..4 * g].fill(0);
        image[2 * b..3 * b].fill(0);
        image[3 * b..4 * b].copy_from_slice(&pattern(b, 9));
        let mut src = MemSource::new(image.clone());
        let (frames, scanned) = run_exchange(&mut src, &parent, bs, None).unwrap();
        let asked: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Granules(x) => Some(x.block),
                _ => None,
            })
            .collect();
        assert_eq!(asked, [0, 3]);
        let ranges: Vec<Frame> = frames
            .into_iter()
            .filter(|f| !matches!(f, Frame::Granules(_)))
            .collect();
        let (b, g) = (b as u64, g as u64);
        assert_eq!(
            crate::frames::summary(&ranges),
            [('D', g, g), ('Z', 3 * g, g), ('Z', 2 * b, b), ('D', 3 * b, b)]
        );
        let digests = 2 * 4 * granules::GRANULE_DIGEST_LEN as u64;
        assert_eq!(scanned.digest_bytes, digests);
        assert_eq!(scanned.bytes_sent, g + b + digests);
        assert_eq!(apply(&parent, image.len(), &ranges), image);
        assert_eq!(scanned.checksum, recompute_checksum(&ranges));
        assert_eq!(scanned.manifest, manifest_of(&image, bs));
    }

    #[test]
    fn a_bad_granule_answer_stops_the_scan() {
        let bs = 4 * ZERO_GRANULE as u32;
        let parent = pattern(2 * bs as usize, 1);
        let mut image = parent.clone();
        image[5] ^= 1;
        let answers: [fn(u64, Vec<u8>) -> GranulesWanted; 4] = [
            |block, bitmap| GranulesWanted {
                block: block + 1,
                bitmap,
                held: false,
            },
            |block, _| GranulesWanted {
                block,
                bitmap: vec![0b1_0000],
                held: false,
            },
            |block, _| GranulesWanted {
                block,
                bitmap: vec![1, 0],
                held: false,
            },
            // Held, though the client did not ask whether it is.
            |block, bitmap| GranulesWanted {
                block,
                bitmap,
                held: true,
            },
        ];
        for answer in answers {
            let mut src = MemSource::new(image.clone());
            let e = run_exchange(&mut src, &parent, bs, Some(answer)).unwrap_err();
            assert!(
                e.message.starts_with("server sent a bad granule answer"),
                "{}",
                e.message
            );
        }
    }

    /// A block of a generated image: zero, equal to the parent's, or new.
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Zero,
        Same,
        New(u8),
    }

    proptest! {
        /// Writes into a parent, the written ranges (and extra ones) as the
        /// known changes: the frames rebuild the image, carry no byte
        /// outside the ranges, and the manifest is the image's.
        #[test]
        fn known_changes_rebuild_the_image(
            writes in proptest::collection::vec((0usize..6 * B, 1usize..B, any::<u8>(), any::<bool>()), 0..8),
            extra in proptest::collection::vec((0usize..6 * B, 1usize..B), 0..3),
        ) {
            let size = 6 * B;
            let parent = pattern(size, 9);
            let mut image = parent.clone();
            let mut changed = Vec::new();
            for &(at, len, seed, zero) in &writes {
                let len = len.min(size - at);
                if zero {
                    image[at..at + len].fill(0);
                } else {
                    image[at..at + len].copy_from_slice(&pattern(len, seed));
                }
                changed.push(Extent { offset: at as u64, len: len as u64 });
            }
            for &(at, len) in &extra {
                changed.push(Extent { offset: at as u64, len: len.min(size - at) as u64 });
            }
            let covered: u64 = coalesce(changed.clone()).iter().map(|e| e.len).sum();
            let mut src = MemSource::new(image.clone());
            src.changed = Some(changed.clone());
            let (frames, scanned) = run(&mut src, manifest_of(&parent, BS), Some(changed));
            prop_assert_eq!(apply(&parent, size, &frames), image.clone());
            prop_assert_eq!(scanned.manifest, manifest_of(&image, BS));
            prop_assert_eq!(scanned.checksum, recompute_checksum(&frames));
            let carried: u64 = frames.iter().map(|f| match f {
                Frame::Data(d) => d.data.len() as u64,
                Frame::Zero(z) => z.length,
                _ => 0,
            }).sum();
            prop_assert!(carried <= covered, "{} bytes in frames, {} covered", carried, covered);
        }

        #[test]
        fn frames_rebuild_the_image(
            parent_len in 0usize..5 * B,
            kinds in proptest::collection::vec(
                prop_oneof![Just(Kind::Zero), Just(Kind::Same), any::<u8>().prop_map(Kind::New)],
                0..6,
            ),
            tail in 0usize..B,
            with_parent: bool,
        ) {
            let parent = if with_parent { pattern(parent_len, 7) } else { Vec::new() };
            let size = (kinds.len() * B).saturating_sub(tail);
            let mut image = vec![0u8; size];
            for (i, k) in kinds.iter().enumerate() {
                let range = i * B..((i + 1) * B).min(size);
                match k {
                    Kind::Zero => {}
                    Kind::Same => {
                        for j in range {
                            image[j] = parent.get(j).copied().unwrap_or(0);
                        }
                    }
                    Kind::New(seed) => {
                        let len = range.len();
                        image[range].copy_from_slice(&pattern(len, *seed));
                    }
                }
            }
            let baseline = if with_parent {
                let mut m = manifest_of(&parent, BS);
                m.resize(size as u64).unwrap();
                m
            } else {
                Manifest::zeroed(size as u64, BS).unwrap()
            };
            let mut src = MemSource::new(image.clone());
            let (frames, scanned) = run(&mut src, baseline, None);
            prop_assert_eq!(apply(&parent, size, &frames), image.clone());
            prop_assert_eq!(scanned.manifest.file_digest(), manifest_of(&image, BS).file_digest());
            prop_assert_eq!(scanned.checksum, recompute_checksum(&frames));
            let data: u64 = frames.iter().map(|f| match f {
                Frame::Data(d) => d.data.len() as u64,
                _ => 0,
            }).sum();
            prop_assert_eq!(scanned.bytes_sent, data);
            let mut next = 0;
            for f in &frames {
                let (o, l) = match f {
                    Frame::Data(d) => (d.offset, d.data.len() as u64),
                    Frame::Zero(z) => (z.offset, z.length),
                    _ => unreachable!(),
                };
                prop_assert!(o >= next && l > 0, "frames in order, not empty");
                next = o + l;
            }
            for w in frames.windows(2) {
                if let (Frame::Zero(a), Frame::Zero(b)) = (&w[0], &w[1]) {
                    prop_assert!(a.offset + a.length < b.offset, "touching zero ranges coalesce");
                }
            }
        }
    }
}
