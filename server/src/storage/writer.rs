//! A revision being written: a clone of its parent under `.partial/`, the
//! pushed ranges applied to it, then a checked, atomic commit.

use super::clone::clone_or_copy;
use super::durable;
use super::jobdir::JobDir;
use super::streamed::Streamed;
use crate::work::Gate;
use backy_common::blockset::BlockSet;
use backy_common::checksum::StreamChecksum;
use backy_common::granules;
use backy_common::manifest::{digest, Digest, Manifest};
use backy_common::ranges::{blocks_of, Extent, GRANULE};
use backy_common::resume::{checkpoint_at, ResumeRecord};
use backy_common::revision::{RevisionMeta, SourceInfo, Stats, StorageMode, Trust};
use backy_common::writeback::Flusher;
use backy_common::{fault, Error, Result, RevisionId, MAX_FRAME_DATA};
use chrono::{DateTime, Utc};
use rustix::fs::FallocateFlags;
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

/// What the client announced in its `PushBegin`, validated.
#[derive(Clone, Debug)]
pub struct NewRevisionSpec {
    pub id: RevisionId,
    pub size: u64,
    pub block_size: u32,
    pub tags: BTreeSet<String>,
    pub source: SourceInfo,
    /// Hex key check value of a client-encrypted image (docs/encryption.md).
    pub key_check: Option<String>,
}

impl NewRevisionSpec {
    /// A replica's copy of a source's revision: its id, size, tags, source
    /// and key check as listed.
    pub fn copy_of(target: &backy_common::revision::RevisionMeta) -> Self {
        NewRevisionSpec {
            id: target.id,
            size: target.size,
            block_size: target.block_size,
            tags: target.tags.clone(),
            source: target.source.clone(),
            key_check: target.key_check.clone(),
        }
    }
}

/// What the client announced in its `PushEnd`.
#[derive(Clone, Debug, Default)]
pub struct PushEnd {
    pub stream_checksum: Vec<u8>,
    /// Empty when the client does not know every block's digest.
    pub manifest_digest: Vec<u8>,
    /// The audit of the change tracker the push relied on, recorded with
    /// the revision.
    pub audit: Option<backy_common::tracker_audit::AuditOutcome>,
}

/// A revision under construction. Dropping it uncommitted removes its
/// files, unless it was suspended for resuming.
pub struct NewRevision {
    job: JobDir,
    spec: NewRevisionSpec,
    parent: Option<RevisionId>,
    parent_size: u64,
    /// The parent's manifest resized to the new size (zeros for a full push).
    baseline: Manifest,
    /// The image's digests as far as known: `baseline` with the blocks
    /// below the last checkpoint (or a resumed push's) filled in.
    current: Manifest,
    file: File,
    path: PathBuf,
    /// Blocks written since their digest in `current` was taken.
    touched: BlockSet,
    /// Digests of blocks that arrived whole: not re-read at commit.
    streamed: Streamed,
    flusher: Flusher,
    checksum: StreamChecksum,
    /// Frames must come in ascending order: the end of the last one.
    position: u64,
    /// Durable checkpoints every this many received bytes; `None`: the
    /// push is not resumable.
    checkpoint_every: Option<u64>,
    since_checkpoint: u64,
    /// Counters of earlier sessions of a resumed push.
    earlier: Stats,
    stats: Stats,
    storage: StorageMode,
    first_started: DateTime<Utc>,
    timestamp: DateTime<Utc>,
    started: Instant,
    committed: bool,
    kept: bool,
    /// Reading blocks back goes through the server's work pool.
    gate: Gate,
    /// Blocks answered in the granule exchange and not yet passed: their
    /// granules arrive because they differ, so they are written unread.
    exchanged: BTreeSet<u64>,
    /// The last block answered: each is asked about once, ascending.
    last_exchanged: Option<u64>,
    /// Scratch for the stored bytes a range is compared with.
    stored: Vec<u8>,
    /// Deduplication against other revisions; `None`: off.
    sources: Option<Box<dyn BlockSource>>,
    /// Blocks cloned from another revision: shared already.
    cloned: BlockSet,
}

/// Where a push finds blocks that other stored revisions hold (the
/// implementation, `crate::dedup::source`, knows the index and the scope).
pub trait BlockSource: Send {
    /// Makes `dst`'s `len` bytes at `offset`, which hold a block of
    /// `digest`, share the extents of another revision's copy if the
    /// filesystem finds the bytes equal; returns the bytes now shared.
    /// The kernel's comparison is work of the fair pool: a slot of `gate`
    /// is taken once a candidate is found.
    fn dedupe(&self, digest: &Digest, dst: &File, offset: u64, len: u64, gate: &Gate) -> Result<u64>;
    /// Writes a block of `digest` into `dst` at `offset` by cloning a
    /// stored copy the pushing client may be spared sending (in the job's
    /// dedup scope), read and checked against `digest` first; `false`:
    /// none found. Reading and hashing the candidate takes a slot of
    /// `gate`.
    fn clone_held(&self, digest: &Digest, dst: &File, offset: u64, len: u64, gate: &Gate) -> Result<bool>;
}

/// Blocks a client may have answered ahead of the ranges it sent: bounds
/// what a push makes the server remember (a client keeps far fewer).
pub const MAX_EXCHANGED_AHEAD: usize = 64;

impl NewRevision {
    /// Creates `.partial/<id>` as a clone of `parent` (or an empty sparse
    /// file) sized to the new image. The job must be locked by the caller.
    /// `fs_mode` is what the filesystem can do, recorded for full pushes.
    pub fn create(
        job: &JobDir,
        spec: NewRevisionSpec,
        parent: Option<(&RevisionMeta, Manifest)>,
        fs_mode: StorageMode,
        checkpoint_every: Option<u64>,
        gate: Gate,
    ) -> Result<Self> {
        let path = job.partial_image_path(&spec.id);
        let file = durable::create_new(&path)?;
        let mut guard = RemoveOnError(Some(path.clone()));
        let (parent_id, mut baseline, storage) = match parent {
            Some((meta, manifest)) => {
                let src = open_parent(job, meta)?;
                let storage = clone_or_copy(&src, &file)?;
                (Some(meta.id), manifest, storage)
            }
            None => (None, Manifest::zeroed(0, spec.block_size)?, fs_mode),
        };
        if baseline.block_size() != spec.block_size {
            return Err(Error::invalid(format!(
                "block size {} differs from the parent's {}",
                spec.block_size,
                baseline.block_size()
            )));
        }
        let old_size = baseline.image_size();
        baseline.resize(spec.size)?;
        file.set_len(spec.size).map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error()) {
                Error::exhausted(format!(
                    "an image of {} is larger than the server's filesystem allows for one file",
                    backy_common::units::format_bytes(spec.size)
                ))
            } else {
                Error::io(format!("sizing {}", path.display()), e)
            }
        })?;
        let mut touched = BlockSet::new();
        for b in baseline.resize_touched(old_size) {
            touched.insert(b..b + 1);
        }
        guard.0 = None;
        let now = Utc::now();
        let streamed = Streamed::new(baseline.clone());
        let flusher = Flusher::new(&file);
        Ok(NewRevision {
            job: job.clone(),
            spec,
            parent: parent_id,
            parent_size: old_size,
            current: baseline.clone(),
            baseline,
            file,
            path,
            touched,
            streamed,
            flusher,
            checksum: StreamChecksum::new(),
            position: 0,
            checkpoint_every,
            since_checkpoint: 0,
            earlier: Stats::default(),
            stats: Stats::default(),
            storage,
            first_started: now,
            timestamp: now,
            started: Instant::now(),
            committed: false,
            kept: false,
            gate,
            exchanged: BTreeSet::new(),
            last_exchanged: None,
            stored: Vec::new(),
            sources: None,
            cloned: BlockSet::new(),
        })
    }

    /// Reopens the partial revision an interrupted push left, after
    /// resetting everything above its checkpoint to the parent. The job
    /// must be locked and `record` checked by the caller.
    pub fn resume(
        job: &JobDir,
        spec: NewRevisionSpec,
        record: &ResumeRecord,
        parent: Option<(&RevisionMeta, Manifest)>,
        checkpoint_every: Option<u64>,
        gate: Gate,
    ) -> Result<Self> {
        if spec.id != record.id || spec.size != record.size || spec.block_size != record.block_size {
            return Err(Error::precondition(format!(
                "push {} does not match the interrupted one ({} bytes); run it again without resuming",
                spec.id, record.size
            )));
        }
        if parent.as_ref().map(|(m, _)| m.id) != record.parent {
            return Err(Error::precondition("the interrupted push had another parent"));
        }
        let path = job.partial_image_path(&spec.id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let (mut baseline, parent_file) = match &parent {
            Some((meta, manifest)) => (manifest.clone(), Some(open_parent(job, meta)?)),
            None => (Manifest::zeroed(0, spec.block_size)?, None),
        };
        let old_size = baseline.image_size();
        baseline.resize(spec.size)?;
        super::resume::reset_tail(
            &file,
            parent_file.as_ref(),
            old_size,
            record.checkpoint,
            spec.size,
        )?;
        let current = job.resume_manifest(record, &baseline)?;
        let mut touched = BlockSet::new();
        let done = record.checkpoint / u64::from(spec.block_size);
        for b in baseline.resize_touched(old_size) {
            if b >= done {
                touched.insert(b..b + 1);
            }
        }
        let now = Utc::now();
        let streamed = Streamed::new(current.clone());
        let flusher = Flusher::new(&file);
        Ok(NewRevision {
            job: job.clone(),
            spec,
            parent: record.parent,
            parent_size: old_size,
            baseline,
            current,
            file,
            path,
            touched,
            streamed,
            flusher,
            checksum: StreamChecksum::new(),
            position: 0,
            checkpoint_every,
            since_checkpoint: 0,
            earlier: record.stats.clone(),
            stats: Stats::default(),
            storage: record.storage,
            first_started: record.started,
            timestamp: now,
            started: Instant::now(),
            committed: false,
            kept: false,
            gate,
            exchanged: BTreeSet::new(),
            last_exchanged: None,
            stored: Vec::new(),
            sources: None,
            cloned: BlockSet::new(),
        })
    }

    pub fn storage(&self) -> StorageMode {
        self.storage
    }

    /// The length of `block` (the last one may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        self.current.block_len(block)
    }

    /// Deduplicates this revision's blocks against other stored revisions:
    /// held blocks are cloned (see [`Self::held`]), written ones shared at
    /// the commit where the filesystem finds them equal.
    pub fn with_sources(mut self, sources: Box<dyn BlockSource>) -> Self {
        self.sources = Some(sources);
        self
    }

    fn check_extent(&mut self, offset: u64, len: u64) -> Result<Extent> {
        let e = backy_common::ranges::next_extent(self.position, offset, len, self.spec.size)
            .map_err(Error::invalid)?;
        self.position = e.end();
        Ok(e)
    }

    /// Writes one data range: of its whole granules only those that
    /// differ from what the image holds (the parent's data, cloned), so
    /// unchanged granules keep sharing the parent's extents and new ones are
    /// written in pieces of at least a granule.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() || data.len() > MAX_FRAME_DATA {
            return Err(Error::invalid(format!(
                "data range of {} bytes: must be 1..={MAX_FRAME_DATA}",
                data.len()
            )));
        }
        let extent = self.check_extent(offset, data.len() as u64)?;
        let written = if self.parent.is_none() {
            // A full push: the write and the two digests of the same bytes
            // (the block's, the stream's) run at once, on the hashing
            // pool's threads; the bulk of a full push is this.
            let (file, path) = (&self.file, &self.path);
            let (streamed, checksum) = (&mut self.streamed, &mut self.checksum);
            let (write, digest) = rayon_core::join(
                || {
                    file.write_all_at(data, offset)
                        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
                },
                || {
                    checksum.data(offset, data);
                    streamed.data(offset, data)
                },
            );
            write?;
            digest?;
            data.len() as u64
        } else {
            let written = self.write_changed(offset, data)?;
            self.streamed.data(offset, data)?;
            self.checksum.data(offset, data);
            written
        };
        self.flusher.wrote(written);
        self.stats.bytes_received += data.len() as u64;
        self.stats.bytes_written += written;
        // A checkpoint reads back the blocks that did not arrive whole, so
        // a block this range starts to touch other than as a full first
        // frame counts whole towards the next one: the read-back stays
        // bounded when granules arrive scattered over many blocks.
        let partial = blocks_of(extent, self.spec.block_size)
            .filter(|&b| {
                let (start, len) = (self.current.block_offset(b), self.current.block_len(b));
                let first_frame = offset == start && data.len() as u64 >= len.min(MAX_FRAME_DATA as u64);
                !self.touched.contains(b) && !first_frame
            })
            .count() as u64;
        self.touch(extent);
        self.since_checkpoint += data.len() as u64 + partial * u64::from(self.spec.block_size);
        if self
            .checkpoint_every
            .is_some_and(|every| self.since_checkpoint >= every)
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Writes the pieces of `data` (split at granule boundaries of the
    /// image) that differ from the image's bytes; returns the bytes written.
    /// A piece is written unread when it is not a whole granule, when the
    /// baseline's block is zero, or when the exchange said it differs;
    /// skipping needs the stored bytes read and equal.
    fn write_changed(&mut self, offset: u64, data: &[u8]) -> Result<u64> {
        let end = offset + data.len() as u64;
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < end {
            let granule_end = ((at / GRANULE + 1) * GRANULE).min(self.spec.size);
            let to = granule_end.min(end);
            let whole = at.is_multiple_of(GRANULE) && to == granule_end;
            let block = at / u64::from(self.spec.block_size);
            let compare = whole && !self.baseline.is_zero(block) && !self.exchanged.contains(&block);
            pieces.push((at, to, compare));
            at = to;
        }
        let len = data.len();
        let compared = pieces.iter().any(|p| p.2);
        if compared {
            self.stored.resize(len, 0);
            self.file
                .read_exact_at(&mut self.stored[..len], offset)
                .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?;
        }
        // Runs of pieces to write, merged.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (from, to, compare) in pieces {
            let (i, j) = ((from - offset) as usize, (to - offset) as usize);
            if compare && self.stored[i..j] == data[i..j] {
                continue;
            }
            match runs.last_mut() {
                Some(last) if last.1 == from => last.1 = to,
                _ => runs.push((from, to)),
            }
        }
        let mut written = 0;
        for (from, to) in runs {
            let piece = &data[(from - offset) as usize..(to - offset) as usize];
            self.file
                .write_all_at(piece, from)
                .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))?;
            written += piece.len() as u64;
        }
        Ok(written)
    }

    /// The granule exchange: which granules of `block` differ from the
    /// client's `digests`, as a bitmap, compared with what the image holds
    /// there now (the parent's data: blocks are asked about in ascending
    /// order, at or above the ranges sent so far). Each block is read once.
    pub fn granules(&mut self, block: u64, digests: &[u8]) -> Result<Vec<u8>> {
        if block >= self.current.block_count() {
            return Err(Error::invalid(format!(
                "granule digests for block {block} beyond the image's {} blocks",
                self.current.block_count()
            )));
        }
        let (offset, len) = self.asked_in_order(block)?;
        granules::check_digests(digests, len)?;
        self.bound_exchanged()?;
        // A 1 KiB frame asks for a whole block read and hashed: work of the
        // fair pool, so a few pushes cannot starve everyone else's. A
        // caller that left gets no slot (the push keeps what it received
        // for resuming, see `crate::push`).
        let _slot = self.gate.slot()?;
        self.stored.resize(len as usize, 0);
        self.file
            .read_exact_at(&mut self.stored[..len as usize], offset)
            .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?;
        let ours = granules::digests(&self.stored[..len as usize]);
        self.last_exchanged = Some(block);
        self.exchanged.insert(block);
        Ok(granules::differing(&ours, digests))
    }

    /// Checks a block asked about comes after the ranges sent and the
    /// blocks asked before; returns its offset and length.
    fn asked_in_order(&self, block: u64) -> Result<(u64, u64)> {
        if block >= self.current.block_count() {
            return Err(Error::invalid(format!(
                "granule digests for block {block} beyond the image's {} blocks",
                self.current.block_count()
            )));
        }
        let offset = self.current.block_offset(block);
        if offset < self.position || self.last_exchanged.is_some_and(|last| block <= last) {
            return Err(Error::invalid(format!(
                "granule digests out of order: block {block} after ranges up to {} and block {:?}",
                self.position, self.last_exchanged
            )));
        }
        Ok((offset, self.current.block_len(block)))
    }

    /// Forgets the answered blocks the ranges have passed, and refuses a
    /// client that asks too far ahead.
    fn bound_exchanged(&mut self) -> Result<()> {
        let passed = self.position / u64::from(self.spec.block_size);
        self.exchanged.retain(|&b| b >= passed);
        if self.exchanged.len() >= MAX_EXCHANGED_AHEAD {
            return Err(Error::exhausted(format!(
                "more than {MAX_EXCHANGED_AHEAD} blocks asked about ahead of the ranges sent"
            )));
        }
        Ok(())
    }

    /// A block of `digest` the client offers to spare sending (protocol 5):
    /// cloned from a stored copy in the job's dedup scope, checked by its
    /// digest; `false` when there is none and the client must send it.
    /// Must come in the order of the granule exchange.
    pub fn held(&mut self, block: u64, digest: &Digest) -> Result<bool> {
        let (offset, len) = self.asked_in_order(block)?;
        let Some(sources) = &self.sources else {
            return Ok(false);
        };
        if self.baseline.is_zero(block) && *digest == backy_common::manifest::zero_digest(len) {
            return Ok(false);
        }
        if !sources.clone_held(digest, &self.file, offset, len, &self.gate)? {
            return Ok(false);
        }
        self.last_exchanged = Some(block);
        self.streamed.known(block, *digest)?;
        self.touch(Extent { offset, len });
        self.cloned.insert(block..block + 1);
        self.stats.bytes_deduplicated += len;
        Ok(true)
    }

    /// A block the client will send whole (protocol 5: it asked whether the
    /// server holds it, with no granule digests to compare): every granule
    /// is wanted, and written unread.
    pub fn wanted_whole(&mut self, block: u64) -> Result<Vec<u8>> {
        let (_, len) = self.asked_in_order(block)?;
        self.bound_exchanged()?;
        self.last_exchanged = Some(block);
        self.exchanged.insert(block);
        Ok(granules::all_wanted(len))
    }

    /// Shares the extents of written blocks that another stored revision
    /// holds too (the kernel compares the bytes, so a stale hint only
    /// costs a read); returns the bytes shared.
    fn dedupe_written(&mut self) -> Result<u64> {
        let Some(sources) = &self.sources else {
            return Ok(0);
        };
        let mut shared = 0;
        for block in 0..self.current.block_count() {
            let Some(d) = self.current.get(block) else {
                continue;
            };
            if self.current.is_zero(block)
                || Some(d) == self.baseline.get(block)
                || self.cloned.contains(block)
            {
                continue;
            }
            let (offset, len) = (self.current.block_offset(block), self.current.block_len(block));
            shared += sources.dedupe(d, &self.file, offset, len, &self.gate)?;
        }
        Ok(shared)
    }

    /// Digests the blocks below `upto` written since their last digest.
    fn digest_touched_below(&mut self, upto: u64, keep: bool) -> Result<()> {
        let limit = upto / u64::from(self.spec.block_size);
        let mut buf = Vec::new();
        for range in self.touched.ranges_below(limit) {
            for block in range {
                // Blocks that arrived whole were digested as they came.
                let d: Digest = match self.streamed.get(block) {
                    Some(d) => *d,
                    None => {
                        let _slot = if keep {
                            self.gate.slot_to_keep()?
                        } else {
                            self.gate.slot()?
                        };
                        let len = self.current.block_len(block) as usize;
                        let offset = self.current.block_offset(block);
                        buf.resize(len, 0);
                        self.file
                            .read_exact_at(&mut buf, offset)
                            .map_err(|e| Error::io(format!("reading back {}", self.path.display()), e))?;
                        digest(&buf)
                    }
                };
                if Some(&d) != self.baseline.get(block) && Some(&d) != self.current.get(block) {
                    self.stats.changed_blocks += 1;
                }
                self.current.set(block, d)?;
            }
        }
        self.touched.remove(0..limit);
        Ok(())
    }

    /// Makes the progress so far durable: the image synced, the digests of
    /// every block below the checkpoint recorded, then the record.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.checkpoint_as(false)
    }

    /// A checkpoint; with `keep`, the one of a push whose client went
    /// away, whose read-back is not cancelled by that.
    fn checkpoint_as(&mut self, keep: bool) -> Result<()> {
        let checkpoint = checkpoint_at(self.position, self.spec.block_size);
        self.digest_touched_below(checkpoint, keep)?;
        self.file
            .sync_data()
            .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        let record = ResumeRecord {
            id: self.spec.id,
            parent: self.parent,
            parent_size: self.parent_size,
            size: self.spec.size,
            block_size: self.spec.block_size,
            checkpoint,
            storage: self.storage,
            stats: self.total_stats(),
            started: self.first_started,
            written: Utc::now(),
        };
        self.job.write_checkpoint(&record, &self.current)?;
        self.since_checkpoint = 0;
        fault::point("push.checkpointed");
        tracing::info!(job = %self.job.name(), rev = %self.spec.id, checkpoint, "push checkpointed");
        Ok(())
    }

    /// The connection broke: keep the partial revision for resuming when
    /// this push is resumable and got past its first block; returns the
    /// checkpoint kept.
    pub fn suspend(mut self) -> Result<Option<u64>> {
        let checkpoint = checkpoint_at(self.position, self.spec.block_size);
        if self.checkpoint_every.is_none() || checkpoint == 0 {
            return Ok(None);
        }
        self.checkpoint_as(true)?;
        self.kept = true;
        Ok(Some(checkpoint))
    }

    fn total_stats(&self) -> Stats {
        Stats {
            bytes_received: self.earlier.bytes_received + self.stats.bytes_received,
            bytes_written: self.earlier.bytes_written + self.stats.bytes_written,
            changed_blocks: self.earlier.changed_blocks + self.stats.changed_blocks,
            bytes_deduplicated: self.earlier.bytes_deduplicated + self.stats.bytes_deduplicated,
            duration: self.earlier.duration + self.started.elapsed().as_secs_f64(),
            audit: None,
        }
    }

    /// Makes a range zero by punching a hole (zeros written where the
    /// filesystem cannot punch).
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::invalid("zero range of length 0"));
        }
        let extent = self.check_extent(offset, len)?;
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => {}
            Err(rustix::io::Errno::OPNOTSUPP) => self.write_zeros(extent)?,
            Err(e) => {
                return Err(Error::io(
                    format!("punching hole in {}", self.path.display()),
                    e.into(),
                ))
            }
        }
        self.streamed.zero(extent)?;
        self.checksum.zero(offset, len);
        self.touch(extent);
        Ok(())
    }

    fn write_zeros(&mut self, e: Extent) -> Result<()> {
        let zeros = vec![0u8; MAX_FRAME_DATA];
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], pos)
                .map_err(|err| Error::io(format!("writing {}", self.path.display()), err))?;
            self.stats.bytes_written += n as u64;
            self.flusher.wrote(n as u64);
            pos += n as u64;
        }
        Ok(())
    }

    fn touch(&mut self, e: Extent) {
        self.touched.insert(blocks_of(e, self.spec.block_size));
    }

    /// Checks the client's end-to-end checksums (both required), takes the digests of every
    /// touched block (from the data as it arrived when a block came whole,
    /// else read back from the file), and commits: image and manifest
    /// moved into the job directory, then the `.rev` written last.
    pub fn commit(self, end: &PushEnd) -> Result<Sealed> {
        if end.stream_checksum.as_slice() != self.checksum.finish() {
            return Err(Error::data_loss(
                "end-to-end check failed: the data received does not match the client's stream checksum",
            )
            .with_reason(backy_common::Reason::StreamChecksumMismatch));
        }
        if end.manifest_digest.is_empty() {
            return Err(Error::invalid(
                "the push's end frame has no manifest digest: the server commits only what it can check end to end (upgrade backy-client)",
            ));
        }
        let mut sealed = self.seal(&end.manifest_digest, "the client's")?;
        sealed.meta.stats.audit = end.audit.clone();
        Ok(sealed)
    }

    /// Commits a copy of another server's revision: under its timestamp,
    /// and only if the image's manifest is the one the source holds (a
    /// copy has no stream checksum: every block is checked by digest).
    /// `audit`: the source's audit of the change tracker its push relied
    /// on, kept so the replica's `check` warns as the source's does.
    pub fn commit_copy(
        mut self,
        timestamp: DateTime<Utc>,
        manifest_digest: &[u8],
        audit: Option<backy_common::tracker_audit::AuditOutcome>,
    ) -> Result<Sealed> {
        if manifest_digest.is_empty() {
            return Err(Error::invalid("a copy needs the source's manifest digest"));
        }
        self.timestamp = timestamp;
        let mut sealed = self.seal(manifest_digest, "the source server's")?;
        sealed.meta.stats.audit = audit;
        Ok(sealed)
    }

    /// Everything of a commit that needs no lock: the touched blocks
    /// digested, the end-to-end check, the image synced, the manifest
    /// written beside it. `whose`: whose manifest `expected_manifest` is,
    /// for the error.
    fn seal(mut self, expected_manifest: &[u8], whose: &str) -> Result<Sealed> {
        // Never a revision dated after this server's clock (a clock that
        // stepped back during the push, a source whose clock runs ahead):
        // its tags' next slots and the SLA deadline would follow its date.
        let now = Utc::now();
        if self.timestamp > now {
            return Err(Error::precondition(format!(
                "revision {} would be dated {}, after this server's clock ({now}): not committed",
                self.spec.id, self.timestamp
            )));
        }
        tracing::info!(
            job = %self.job.name(), rev = %self.spec.id, blocks = self.touched.len(),
            "commit: digesting the blocks written since the last checkpoint"
        );
        self.digest_touched_below(u64::MAX, false)?;
        fault::point("commit.digested");
        let manifest_digest = self.current.file_digest();
        if expected_manifest != manifest_digest {
            return Err(Error::data_loss(format!(
                "end-to-end check failed: the stored image's manifest differs from {whose}"
            ))
            .with_reason(backy_common::Reason::ManifestMismatch));
        }
        // Checked whole: now its new blocks may share another revision's
        // extents (before the sync, which then writes less).
        self.stats.bytes_deduplicated += self.dedupe_written()?;
        self.flusher.finish();
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        fault::point("commit.synced");
        let stats = self.total_stats();

        let id = self.spec.id;
        let partial_digests = self.job.sealed_digests_path(&id);
        // From here on the push is no longer resumable.
        self.job.discard_resume(&id);
        let written = durable::write_manifest(&partial_digests, &self.current)?;
        if written != manifest_digest {
            return Err(Error::internal(
                "the manifest written differs from the one checked",
            ));
        }
        fault::point("commit.digests-written");
        let meta = RevisionMeta {
            id,
            timestamp: self.timestamp,
            parent: self.parent,
            size: self.spec.size,
            block_size: self.spec.block_size,
            tags: self.spec.tags.clone(),
            trust: Trust::Trusted,
            verified_at: None,
            source: self.spec.source.clone(),
            stats,
            manifest_digest: hex::encode(manifest_digest),
            storage: self.storage,
            locked_until: None,
            key_check: self.spec.key_check.clone(),
        };
        Ok(Sealed {
            rev: self,
            meta,
            partial_digests: RemoveOnError(Some(partial_digests)),
        })
    }
}

/// A revision whose data and manifest are complete and synced under
/// `.partial/`: what is left of its commit is to publish it, in a job
/// transaction. Dropped unpublished, its files are removed.
pub struct Sealed {
    rev: NewRevision,
    meta: RevisionMeta,
    partial_digests: RemoveOnError,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl Sealed {
    pub fn meta(&self) -> &RevisionMeta {
        &self.meta
    }

    pub fn job(&self) -> &JobDir {
        &self.rev.job
    }

    /// Dates the revision `at` (a group's disks share one revision time);
    /// never later than its own push's start, so never after the clock.
    pub fn date(&mut self, at: DateTime<Utc>) {
        self.meta.timestamp = self.meta.timestamp.min(at);
    }

    /// The blocks whose data this revision brought (not its parent's, not
    /// zeros): what the digest index learns when it is published.
    pub fn new_blocks(&self) -> Vec<(u64, Digest)> {
        let (current, baseline) = (&self.rev.current, &self.rev.baseline);
        (0..current.block_count())
            .filter(|&b| !current.is_zero(b) && current.get(b) != baseline.get(b))
            .filter_map(|b| current.get(b).map(|d| (b, *d)))
            .collect()
    }

    /// Locks the revision for `lock` from its timestamp on (none: not
    /// locked), as written into its `.rev` when it is installed. Rounded
    /// up to a whole second, as status shows times: the lock shown is the
    /// lock enforced.
    pub fn lock_for(&mut self, lock: Option<backy_common::units::Interval>) -> Result<()> {
        self.meta.locked_until = match lock {
            None => None,
            Some(lock) => Some(backy_common::revision::lock_end(self.meta.timestamp, lock)?),
        };
        Ok(())
    }

    /// Makes the revision visible: moves the image and the manifest into
    /// place without replacing anything, and writes the `.rev` last. Only
    /// the job's transaction calls this (see `crate::job::Txn::publish`),
    /// after checking the id and the parent on disk: it takes the job's
    /// lock as proof.
    pub fn install(mut self, held: &super::lock::JobLock) -> Result<RevisionMeta> {
        let job = self.rev.job.clone();
        let id = self.meta.id;
        // Files of this id without a `.rev` are leftovers of an earlier
        // attempt (no revision owns them): they must not block the rename,
        // and nothing else may be replaced by it.
        job.remove_orphan(held, &id)?;
        let partial_digests = self
            .partial_digests
            .0
            .clone()
            .ok_or_else(|| Error::internal("sealed revision without its manifest"))?;
        rename_new(&self.rev.path, &job.image_path(&id))?;
        fault::point("commit.image-moved");
        rename_new(&partial_digests, &job.digests_path(&id))?;
        self.partial_digests.0 = None;
        fault::point("commit.digests-moved");
        durable::fsync_dir(job.path())?;
        durable::fsync_dir(&job.partial_dir())?;
        durable::write_atomic(&job.rev_path(&id), self.meta.to_yaml()?.as_bytes())?;
        self.rev.committed = true;
        fault::point("commit.rev-written");
        Ok(self.meta)
    }
}

impl Drop for NewRevision {
    fn drop(&mut self) {
        if !self.committed && !self.kept {
            self.job.discard_resume(&self.spec.id);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn open_parent(job: &JobDir, meta: &RevisionMeta) -> Result<File> {
    File::open(job.image_path(&meta.id))
        .map_err(|e| Error::io(format!("opening parent revision {}", meta.id), e))
}

struct RemoveOnError(Option<PathBuf>);

impl Drop for RemoveOnError {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Renames `from` to `to`, failing if `to` exists (a commit never
/// replaces a file silently).
fn rename_new(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE)
        .map_err(|e| Error::io(format!("moving {} to {}", from.display(), to.display()), e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::work::WorkPool;
    use backy_common::{ErrorKind, JobName, Reason};
    use std::sync::Arc;

    const BS: u32 = 64 << 10;
    const B: u64 = BS as u64;

    fn gate() -> Gate {
        Gate::new(Arc::new(WorkPool::new(1)), "test", Arc::new(|| false))
    }

    fn job(dir: &std::path::Path) -> JobDir {
        let job = JobDir::new(dir, JobName::new("vm1").unwrap());
        job.ensure().unwrap();
        job
    }

    fn spec(size: u64) -> NewRevisionSpec {
        NewRevisionSpec {
            id: RevisionId::new_random(),
            size,
            block_size: BS,
            tags: BTreeSet::new(),
            source: SourceInfo {
                kind: "file".into(),
                snapshot: String::new(),
                group: None,
            },
            key_check: None,
        }
    }

    fn full(job: &JobDir, size: u64) -> NewRevision {
        NewRevision::create(job, spec(size), None, StorageMode::Copy, None, gate()).unwrap()
    }

    fn end(checksum: &StreamChecksum, manifest: &Manifest) -> PushEnd {
        PushEnd {
            stream_checksum: checksum.finish().to_vec(),
            manifest_digest: manifest.file_digest().to_vec(),
            audit: None,
        }
    }

    /// Publishes a sealed revision as the server does: in a transaction.
    fn publish(job: &JobDir, sealed: Sealed) -> RevisionMeta {
        let base = job.path().parent().unwrap();
        let server = crate::state::test_server(base, &format!("  {}: {{schedule: none}}\n", job.name()));
        let mut txn = crate::job::Txn::begin(&server.jobs, job).unwrap();
        txn.publish(sealed, None).unwrap()
    }

    /// The manifest of a whole image in blocks of `bs` bytes.
    fn manifest_of(image: &[u8], bs: u32) -> Manifest {
        let mut m = Manifest::zeroed(image.len() as u64, bs).unwrap();
        for (i, block) in image.chunks(bs as usize).enumerate() {
            m.set(i as u64, digest(block)).unwrap();
        }
        m
    }

    fn partial_files(job: &JobDir) -> usize {
        std::fs::read_dir(job.partial_dir()).unwrap().count()
    }

    #[test]
    fn a_commit_digests_what_is_on_disk_whole_or_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let mut rev = full(&job, 3 * B + 10);
        let mut sum = StreamChecksum::new();
        let whole = vec![7u8; B as usize];
        rev.data(0, &whole).unwrap();
        sum.data(0, &whole);
        // A few bytes inside block 2: read back at the commit.
        rev.data(2 * B + 5, b"abc").unwrap();
        sum.data(2 * B + 5, b"abc");
        let mut image = vec![0u8; (3 * B + 10) as usize];
        image[..B as usize].copy_from_slice(&whole);
        image[(2 * B + 5) as usize..(2 * B + 8) as usize].copy_from_slice(b"abc");
        let mut want = Manifest::zeroed(3 * B + 10, BS).unwrap();
        for b in 0..4 {
            let (s, e) = (b * B, ((b + 1) * B).min(3 * B + 10));
            want.set(b, digest(&image[s as usize..e as usize])).unwrap();
        }
        let meta = publish(&job, rev.commit(&end(&sum, &want)).unwrap());
        assert_eq!(meta.manifest_digest, hex::encode(want.file_digest()));
        assert_eq!(std::fs::read(job.image_path(&meta.id)).unwrap(), image);
        assert_eq!(job.manifest(&meta).unwrap(), want);
        assert_eq!(meta.stats.changed_blocks, 2);
        assert!(job.rev_path(&meta.id).exists());
    }

    #[test]
    fn a_failed_end_to_end_check_commits_nothing_and_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        for wrong in ["checksum", "manifest"] {
            let mut rev = full(&job, 2 * B);
            let id = rev.spec.id;
            let mut sum = StreamChecksum::new();
            rev.data(0, b"data").unwrap();
            sum.data(0, b"data");
            let mut image = vec![0u8; 2 * B as usize];
            image[..4].copy_from_slice(b"data");
            let mut end = end(&sum, &manifest_of(&image, BS));
            if wrong == "checksum" {
                end.stream_checksum[0] ^= 1;
            } else {
                end.manifest_digest = vec![0; 32];
            }
            let e = rev.commit(&end).unwrap_err();
            assert_eq!(e.kind, ErrorKind::DataLoss);
            let reason = if wrong == "checksum" {
                Reason::StreamChecksumMismatch
            } else {
                Reason::ManifestMismatch
            };
            assert_eq!(e.reason, reason, "{wrong}");
            assert!(!job.rev_path(&id).exists() && !job.image_path(&id).exists());
            assert_eq!(partial_files(&job), 0, "{wrong}: the partial revision is gone");
        }
    }

    #[test]
    fn frames_must_ascend_and_stay_inside_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let mut rev = full(&job, 2 * B);
        rev.data(B, b"x").unwrap();
        let e = rev.data(10, b"y").unwrap_err();
        assert!(e.message.contains("out of order"), "{}", e.message);
        let e = rev.zero(2 * B - 1, 2).unwrap_err();
        assert!(
            e.message.contains("beyond the announced image size"),
            "{}",
            e.message
        );
        assert_eq!(rev.data(2 * B, b"").unwrap_err().kind, ErrorKind::InvalidArgument);
        drop(rev);
        assert_eq!(partial_files(&job), 0, "dropped uncommitted: removed");
    }

    /// A committed parent of `image` (blocks of four granules) and a new
    /// revision on it.
    fn on_parent(job: &JobDir, image: &[u8]) -> (RevisionMeta, NewRevision) {
        on_parent_with(job, image, gate())
    }

    fn on_parent_with(job: &JobDir, image: &[u8], child_gate: Gate) -> (RevisionMeta, NewRevision) {
        let bs = 4 * GRANULE as u32;
        let size = image.len() as u64;
        let mut parent_spec = spec(size);
        parent_spec.block_size = bs;
        let mut rev = NewRevision::create(job, parent_spec, None, StorageMode::Copy, None, gate()).unwrap();
        let mut sum = StreamChecksum::new();
        for (i, chunk) in image.chunks(MAX_FRAME_DATA).enumerate() {
            let at = (i * MAX_FRAME_DATA) as u64;
            rev.data(at, chunk).unwrap();
            sum.data(at, chunk);
        }
        let meta = publish(job, rev.commit(&end(&sum, &manifest_of(image, bs))).unwrap());
        let manifest = job.manifest(&meta).unwrap();
        let mut child_spec = spec(size);
        child_spec.block_size = bs;
        let child = NewRevision::create(
            job,
            child_spec,
            Some((&meta, manifest)),
            StorageMode::Copy,
            None,
            child_gate,
        )
        .unwrap();
        (meta, child)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn a_whole_block_writes_only_the_granules_that_differ() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let g = GRANULE as usize;
        let parent = pattern(8 * g, 1);
        let (_, mut rev) = on_parent(&job, &parent);
        // Block 1 arrives whole, changed in granules 5 and 6 only.
        let mut image = parent.clone();
        image[5 * g + 1] ^= 1;
        image[7 * g - 1] ^= 1;
        let mut sum = StreamChecksum::new();
        rev.data(4 * GRANULE, &image[4 * g..8 * g]).unwrap();
        sum.data(4 * GRANULE, &image[4 * g..8 * g]);
        let meta = publish(
            &job,
            rev.commit(&end(&sum, &manifest_of(&image, 4 * GRANULE as u32)))
                .unwrap(),
        );
        assert_eq!(meta.stats.bytes_received, 4 * GRANULE);
        assert_eq!(meta.stats.bytes_written, 2 * GRANULE);
        assert_eq!(meta.stats.changed_blocks, 1);
        assert_eq!(std::fs::read(job.image_path(&meta.id)).unwrap(), image);
    }

    /// A stand-in for the stored blocks of other revisions: holds blocks by
    /// digest, "clones" by writing (the unit test's filesystem may have no
    /// reflinks), and records what the commit asked to share.
    struct FakeSource {
        held: Vec<Vec<u8>>,
        asked: Arc<std::sync::Mutex<Vec<Digest>>>,
    }

    impl BlockSource for FakeSource {
        fn dedupe(&self, digest: &Digest, _dst: &File, _offset: u64, len: u64, _gate: &Gate) -> Result<u64> {
            self.asked.lock().unwrap().push(*digest);
            Ok(len)
        }

        fn clone_held(
            &self,
            wanted: &Digest,
            dst: &File,
            offset: u64,
            _len: u64,
            _gate: &Gate,
        ) -> Result<bool> {
            match self.held.iter().find(|b| digest(b) == *wanted) {
                Some(b) => {
                    dst.write_all_at(b, offset).unwrap();
                    Ok(true)
                }
                None => Ok(false),
            }
        }
    }

    /// Protocol 5: a block the server holds is cloned, not sent; the commit
    /// checks it with the rest and shares only the blocks that were written.
    #[test]
    fn held_blocks_are_cloned_and_written_ones_shared_at_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let image = [
            pattern(B as usize, 9),
            pattern(B as usize, 10),
            pattern(B as usize, 11),
        ]
        .concat();
        let block = |b: u64| &image[(b * B) as usize..((b + 1) * B) as usize];
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = FakeSource {
            held: vec![block(1).to_vec()],
            asked: asked.clone(),
        };
        let mut rev = full(&job, 3 * B).with_sources(Box::new(source));
        let mut sum = StreamChecksum::new();
        // Block 0: not held, sent whole.
        assert!(!rev.held(0, &digest(block(0))).unwrap());
        assert_eq!(rev.wanted_whole(0).unwrap(), granules::all_wanted(B));
        rev.data(0, block(0)).unwrap();
        sum.data(0, block(0));
        // Block 1: held, nothing sent.
        assert!(rev.held(1, &digest(block(1))).unwrap());
        // Asked again, or behind the ranges: refused.
        assert_eq!(
            rev.held(1, &digest(block(1))).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            rev.held(0, &digest(block(0))).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        rev.data(2 * B, block(2)).unwrap();
        sum.data(2 * B, block(2));
        let meta = publish(&job, rev.commit(&end(&sum, &manifest_of(&image, BS))).unwrap());
        assert_eq!(std::fs::read(job.image_path(&meta.id)).unwrap(), image);
        assert_eq!(meta.stats.bytes_received, 2 * B);
        // B cloned, and the two written blocks "shared" by the fake.
        assert_eq!(meta.stats.bytes_deduplicated, 3 * B);
        assert_eq!(*asked.lock().unwrap(), vec![digest(block(0)), digest(block(2))]);
    }

    /// Issue 28, item 9: the block a granule-digest frame makes the server
    /// read and hash is work of the fair pool, like a read-back: a caller
    /// that left gets no slot, and the read is not done.
    #[test]
    fn granule_answers_take_a_slot_of_the_work_pool() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let g = GRANULE as usize;
        let parent = pattern(8 * g, 3);
        let left = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = left.clone();
        let child_gate = Gate::new(
            Arc::new(WorkPool::new(1)),
            "test",
            Arc::new(move || flag.load(std::sync::atomic::Ordering::SeqCst)),
        );
        let (_, mut rev) = on_parent_with(&job, &parent, child_gate);
        let digests = granules::digests(&parent[..4 * g]);
        assert_eq!(rev.granules(0, &digests).unwrap(), [0]);
        left.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = rev.granules(1, &granules::digests(&parent[4 * g..])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable, "{}", e.message);
    }

    #[test]
    fn granule_answers_name_what_differs_and_refuse_disorder() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let g = GRANULE as usize;
        let parent = pattern(12 * g + 100, 2);
        let (_, mut rev) = on_parent(&job, &parent);
        let mut block = parent[4 * g..8 * g].to_vec();
        block[2 * g] ^= 1;
        let digests = granules::digests(&block);
        // Wrong length, beyond the image.
        let e = rev.granules(1, &digests[..16]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert_eq!(
            rev.granules(4, &digests).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        assert_eq!(rev.granules(1, &digests).unwrap(), [0b0100]);
        // Asked once, ascending; never below the ranges sent.
        assert!(rev.granules(1, &digests).is_err());
        assert!(rev.granules(0, &digests).is_err());
        let mut sum = StreamChecksum::new();
        rev.data(4 * GRANULE + 2 * GRANULE, &block[2 * g..3 * g]).unwrap();
        sum.data(6 * GRANULE, &block[2 * g..3 * g]);
        // The short last block: one granule and 100 bytes.
        let tail = granules::digests(&parent[12 * g..]);
        assert_eq!(rev.granules(3, &tail).unwrap(), [0]);
        let mut image = parent.clone();
        image[6 * g] ^= 1;
        let meta = publish(
            &job,
            rev.commit(&end(&sum, &manifest_of(&image, 4 * GRANULE as u32)))
                .unwrap(),
        );
        assert_eq!(
            meta.stats.bytes_written, GRANULE,
            "asked-for granules are written unread"
        );
        assert_eq!(std::fs::read(job.image_path(&meta.id)).unwrap(), image);
    }

    #[test]
    fn a_client_cannot_make_the_server_remember_unbounded_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let g = GRANULE as usize;
        let parent = pattern(4 * g * (MAX_EXCHANGED_AHEAD + 1), 3);
        let (_, mut rev) = on_parent(&job, &parent);
        for b in 0..=MAX_EXCHANGED_AHEAD {
            let d = granules::digests(&parent[b * 4 * g..(b + 1) * 4 * g]);
            let r = rev.granules(b as u64, &d);
            if b < MAX_EXCHANGED_AHEAD {
                r.unwrap();
            } else {
                assert_eq!(r.unwrap_err().kind, ErrorKind::ResourceExhausted);
            }
        }
    }

    #[test]
    fn a_commit_whose_caller_left_stops_before_reading_back() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let gone = Gate::new(Arc::new(WorkPool::new(1)), "test", Arc::new(|| true));
        let mut rev = NewRevision::create(&job, spec(2 * B), None, StorageMode::Copy, None, gone).unwrap();
        let mut sum = StreamChecksum::new();
        rev.data(5, b"partial").unwrap();
        sum.data(5, b"partial");
        let id = rev.spec.id;
        let mut image = vec![0u8; 2 * B as usize];
        image[5..12].copy_from_slice(b"partial");
        let e = rev.commit(&end(&sum, &manifest_of(&image, BS))).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(!job.rev_path(&id).exists());
        assert_eq!(partial_files(&job), 0);
    }

    /// Issue 27, item 6: a revision dated after the server's clock (a push
    /// whose clock stepped back while it ran, a copy from a source whose
    /// clock runs ahead) is not committed.
    #[test]
    fn a_timestamp_after_the_clock_is_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path());
        let ahead = Utc::now() + chrono::Duration::hours(1);
        let mut rev = full(&job, B);
        let id = rev.spec.id;
        rev.timestamp = ahead;
        let e = rev
            .commit(&end(&StreamChecksum::new(), &Manifest::zeroed(B, BS).unwrap()))
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{e}");
        assert!(e.message.contains("after this server's clock"), "{e}");
        let rev = full(&job, B);
        let copy = rev.spec.id;
        let manifest = Manifest::zeroed(B, BS).unwrap();
        let e = rev.commit_copy(ahead, &manifest.file_digest(), None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{e}");
        for id in [id, copy] {
            assert!(!job.rev_path(&id).exists() && !job.image_path(&id).exists());
        }
        assert_eq!(partial_files(&job), 0);
    }
}
