//! A revision being written: a clone of its parent under `.partial/`, the
//! pushed ranges applied to it, then a checked, atomic commit.

use super::clone::clone_or_copy;
use super::durable;
use super::flush::Flusher;
use super::jobdir::JobDir;
use super::streamed::Streamed;
use backy_common::checksum::StreamChecksum;
use backy_common::manifest::{digest, Digest, Manifest};
use backy_common::ranges::{blocks_of, Extent};
use backy_common::revision::{RevisionMeta, SourceInfo, Stats, StorageMode, Trust};
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
}

/// What the client announced in its `PushEnd`.
#[derive(Clone, Debug, Default)]
pub struct PushEnd {
    pub stream_checksum: Vec<u8>,
    /// Empty when the client does not know every block's digest.
    pub manifest_digest: Vec<u8>,
}

/// A revision under construction. Dropping it uncommitted removes its files.
pub struct NewRevision {
    job: JobDir,
    spec: NewRevisionSpec,
    parent: Option<RevisionId>,
    /// The parent's manifest resized to the new size (zeros for a full push).
    baseline: Manifest,
    file: File,
    path: PathBuf,
    touched: Bitmap,
    /// Digests of blocks that arrived whole: not re-read at commit.
    streamed: Streamed,
    flusher: Flusher,
    checksum: StreamChecksum,
    stats: Stats,
    storage: StorageMode,
    timestamp: DateTime<Utc>,
    started: Instant,
    committed: bool,
}

impl NewRevision {
    /// Creates `.partial/<id>` as a clone of `parent` (or an empty sparse
    /// file) sized to the new image. The job must be locked by the caller.
    /// `fs_mode` is what the filesystem can do, recorded for full pushes.
    pub fn create(
        job: &JobDir,
        spec: NewRevisionSpec,
        parent: Option<(&RevisionMeta, Manifest)>,
        fs_mode: StorageMode,
    ) -> Result<Self> {
        let path = job.partial_dir().join(spec.id.short());
        let file = durable::create_new(&path)?;
        let mut guard = RemoveOnError(Some(path.clone()));
        let (parent_id, mut baseline, storage) = match parent {
            Some((meta, manifest)) => {
                let src = File::open(job.image_path(&meta.id))
                    .map_err(|e| Error::io(format!("opening parent revision {}", meta.id), e))?;
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
        file.set_len(spec.size)
            .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
        let mut touched = Bitmap::new(baseline.block_count());
        for b in baseline.resize_touched(old_size) {
            touched.set(b);
        }
        guard.0 = None;
        let streamed = Streamed::new(baseline.clone());
        let flusher = Flusher::new(&file);
        Ok(NewRevision {
            job: job.clone(),
            spec,
            parent: parent_id,
            baseline,
            file,
            path,
            touched,
            streamed,
            flusher,
            checksum: StreamChecksum::new(),
            stats: Stats::default(),
            storage,
            timestamp: Utc::now(),
            started: Instant::now(),
            committed: false,
        })
    }

    pub fn storage(&self) -> StorageMode {
        self.storage
    }

    fn check_extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.spec.size)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "range {offset}+{len} lies beyond the announced image size {}",
                    self.spec.size
                ))
            })?;
        Ok(Extent {
            offset,
            len: end - offset,
        })
    }

    /// Writes one data range.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() || data.len() > MAX_FRAME_DATA {
            return Err(Error::invalid(format!(
                "data range of {} bytes: must be 1..={MAX_FRAME_DATA}",
                data.len()
            )));
        }
        let extent = self.check_extent(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))?;
        self.flusher.wrote(data.len() as u64);
        self.streamed.data(offset, data)?;
        self.checksum.data(offset, data);
        self.stats.bytes_received += data.len() as u64;
        self.stats.bytes_written += data.len() as u64;
        self.touch(extent);
        Ok(())
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
        for b in blocks_of(e, self.spec.block_size) {
            self.touched.set(b);
        }
    }

    /// Checks the client's end-to-end checksums, takes the digests of every
    /// touched block (from the data as it arrived when a block came whole,
    /// else read back from the file), and commits: image and manifest
    /// moved into the job directory, then the `.rev` written last.
    pub fn commit(mut self, end: &PushEnd) -> Result<RevisionMeta> {
        if end.stream_checksum.as_slice() != self.checksum.finish() {
            return Err(Error::data_loss(
                "end-to-end check failed: the data received does not match the client's stream checksum",
            ));
        }
        let mut manifest = self.baseline.clone();
        let mut buf = vec![0u8; self.spec.block_size as usize];
        for block in self.touched.iter() {
            let d: Digest = match self.streamed.get(block) {
                Some(d) => *d,
                None => {
                    let len = manifest.block_len(block) as usize;
                    let offset = manifest.block_offset(block);
                    self.file
                        .read_exact_at(&mut buf[..len], offset)
                        .map_err(|e| Error::io(format!("reading back {}", self.path.display()), e))?;
                    digest(&buf[..len])
                }
            };
            if Some(&d) != self.baseline.get(block) {
                self.stats.changed_blocks += 1;
            }
            manifest.set(block, d)?;
        }
        fault::point("commit.digested");
        let manifest_bytes = manifest.encode();
        let manifest_digest = *blake3::hash(&manifest_bytes).as_bytes();
        if !end.manifest_digest.is_empty() && end.manifest_digest.as_slice() != manifest_digest {
            return Err(Error::data_loss(
                "end-to-end check failed: the stored image's manifest differs from the client's",
            ));
        }
        self.flusher.finish();
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        fault::point("commit.synced");
        self.stats.duration = self.started.elapsed().as_secs_f64();

        let id = self.spec.id;
        let partial_digests = self.job.partial_dir().join(format!("{}.digests", id.short()));
        durable::write_atomic(&partial_digests, &manifest_bytes)?;
        fault::point("commit.digests-written");
        rename(&self.path, &self.job.image_path(&id))?;
        fault::point("commit.image-moved");
        rename(&partial_digests, &self.job.digests_path(&id))?;
        fault::point("commit.digests-moved");
        durable::fsync_dir(self.job.path())?;
        durable::fsync_dir(&self.job.partial_dir())?;

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
            stats: self.stats.clone(),
            manifest_digest: hex::encode(manifest_digest),
            storage: self.storage,
        };
        durable::write_atomic(&self.job.rev_path(&id), meta.to_yaml()?.as_bytes())?;
        self.committed = true;
        fault::point("commit.rev-written");
        Ok(meta)
    }
}

impl Drop for NewRevision {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct RemoveOnError(Option<PathBuf>);

impl Drop for RemoveOnError {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn rename(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::rename(from, to)
        .map_err(|e| Error::io(format!("moving {} to {}", from.display(), to.display()), e))
}

/// One bit per block: which blocks a push touched.
struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    fn new(len: u64) -> Self {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len).filter(|&i| self.words[(i / 64) as usize] & (1 << (i % 64)) != 0)
    }
}
