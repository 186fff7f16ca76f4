//! A push into the pool (docs/DESIGN.md "A push writes a revision"): the
//! received ranges, in ascending order, become one `rbd diff` stream piped
//! into `rbd import-diff`; the block digests are taken as the bytes pass.
//! The end record, which makes `rbd` create the revision's snapshot, is
//! written only after the stream checksum and the manifest digest match
//! the client's; then the snapshot is checked to hold only this push's
//! writes, the manifest is written, and the record committed under the
//! lease's epoch. A push that fails or is dropped before that writes no
//! end record: no snapshot, no record.

use super::blocks::BlockDigests;
use super::error::{PoolError, Result};
use super::names;
use super::parts;
use super::store::PoolStore;
use super::tool::ImportDiff;
use crate::ceph::{Image, LeaseKeeper, WriteOp, JOB_IMAGE_FEATURES};
use crate::storage::{NewRevisionSpec, PushEnd};
use backy_common::checksum::StreamChecksum;
use backy_common::manifest::{digest, Manifest};
use backy_common::ranges::{blocks_of, Extent};
use backy_common::rbd_diff::DiffHeader;
use backy_common::revision::{RevisionMeta, Stats, StorageMode, Trust};
use backy_common::{JobName, MAX_FRAME_DATA};
use chrono::{DateTime, Utc};
use std::sync::Mutex;
use std::time::Instant;

/// A revision being pushed into the pool.
pub struct PoolPush {
    store: PoolStore,
    job: JobName,
    spec: NewRevisionSpec,
    parent: Option<RevisionMeta>,
    /// The parent's snapshot, read for the blocks the push writes in part
    /// (in a mutex: digests are taken on another thread than the stream's
    /// write, and an image is used by one thread at a time).
    parent_image: Mutex<Option<Image>>,
    parent_size: u64,
    digests: Option<BlockDigests>,
    import: ImportDiff,
    checksum: StreamChecksum,
    /// Ranges must ascend: the end of the last one.
    position: u64,
    /// A full push onto an image that holds data: what it does not send
    /// must read zeros, so the gaps are zeroed in the stream.
    zero_gaps: bool,
    stats: Stats,
    timestamp: DateTime<Utc>,
    started: Instant,
}

impl PoolPush {
    /// Starts revision `spec.id` of `job` on `parent` (its record and
    /// manifest; `None`: a full push). Step 1: the parent must be the
    /// image's newest snapshot (an orphan after it is removed first by
    /// `PoolStore::clean_orphans`). Makes the image when there is none.
    pub fn begin(
        store: &PoolStore,
        keeper: &LeaseKeeper,
        job: &JobName,
        spec: NewRevisionSpec,
        parent: Option<(&RevisionMeta, Manifest)>,
    ) -> Result<PoolPush> {
        keeper.may_write_at(Instant::now())?;
        let io = store.io();
        let image_name = names::image_name(job);
        let head = match Image::open_read_only(io, image_name, None) {
            Ok(i) => Some(i),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        let snaps = match &head {
            Some(h) => h.snapshots()?,
            None => Vec::new(),
        };
        if snaps.iter().any(|s| s.name == names::snapshot_name(&spec.id)) {
            return Err(PoolError::Precondition(format!(
                "job {job}: a snapshot {} exists already; nothing was pushed",
                spec.id
            )));
        }
        let (manifest, parent_meta) = match parent {
            Some((meta, manifest)) => {
                let newest = snaps.iter().max_by_key(|s| s.id).map(|s| s.name.as_str());
                if newest != Some(names::snapshot_name(&meta.id).as_str()) {
                    return Err(PoolError::Precondition(format!(
                        "job {job}: parent {} is not the image's newest snapshot ({}); nothing was pushed",
                        meta.id,
                        newest.unwrap_or("none")
                    )));
                }
                if manifest.block_size() != spec.block_size {
                    return Err(PoolError::Invalid(format!(
                        "block size {} differs from the parent's {}",
                        spec.block_size,
                        manifest.block_size()
                    )));
                }
                (manifest, Some(meta.clone()))
            }
            None => (Manifest::zeroed(0, spec.block_size)?, None),
        };
        if head.is_none() {
            io.rbd_create(image_name, spec.size, JOB_IMAGE_FEATURES)?;
        }
        let parent_image = parent_meta
            .as_ref()
            .map(|m| Image::open_read_only(io, image_name, Some(&names::snapshot_name(&m.id))))
            .transpose()?;
        let parent_size = parent_meta.as_ref().map_or(0, |m| m.size);
        let digests = BlockDigests::new(manifest, spec.size)?;
        let header = DiffHeader {
            from_snap: parent_meta.as_ref().map(|m| names::snapshot_name(&m.id)),
            to_snap: Some(names::snapshot_name(&spec.id)),
            size: spec.size,
        };
        let import = ImportDiff::start(&store.rbd_tool(), &store.image_spec(job), &header)?;
        Ok(PoolPush {
            store: store.clone(),
            job: job.clone(),
            zero_gaps: parent_meta.is_none() && head.is_some(),
            spec,
            parent: parent_meta,
            parent_image: Mutex::new(parent_image),
            parent_size,
            digests: Some(digests),
            import,
            checksum: StreamChecksum::new(),
            position: 0,
            stats: Stats::default(),
            timestamp: Utc::now(),
            started: Instant::now(),
        })
    }

    fn check_extent(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = backy_common::ranges::next_extent(self.position, offset, len, self.spec.size)
            .map_err(PoolError::Invalid)?
            .end();
        if self.zero_gaps && offset > self.position {
            self.import.zero(self.position, offset - self.position)?;
        }
        self.position = end;
        Ok(())
    }

    /// One data range (after every earlier one).
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() || data.len() > MAX_FRAME_DATA {
            return Err(PoolError::Invalid(format!(
                "data range of {} bytes: must be 1..={MAX_FRAME_DATA}",
                data.len()
            )));
        }
        self.check_extent(offset, data.len() as u64)?;
        // The stream's write and the two digests of the same bytes (the
        // blocks', the stream's) run at once, as in the filesystem store's
        // full push: `rbd` reads the pipe while this side hashes.
        let (image, parent_size) = (&self.parent_image, self.parent_size);
        let (import, digests, checksum) = (&mut self.import, &mut self.digests, &mut self.checksum);
        let (written, digested) = rayon_core::join(
            || import.data(offset, data),
            || {
                checksum.data(offset, data);
                match digests {
                    Some(d) => d.data(offset, data, &mut |o, buf| read_base(image, parent_size, o, buf)),
                    None => Ok(()),
                }
            },
        );
        written?;
        digested?;
        self.stats.bytes_received += data.len() as u64;
        self.stats.bytes_written += data.len() as u64;
        Ok(())
    }

    /// A range that reads zeros (after every earlier one).
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(PoolError::Invalid("zero range of length 0".into()));
        }
        self.check_extent(offset, len)?;
        self.checksum.zero(offset, len);
        let (image, parent_size) = (&self.parent_image, self.parent_size);
        if let Some(d) = &mut self.digests {
            d.zero(offset, len, &mut |o, buf| read_base(image, parent_size, o, buf))?;
        }
        self.import.zero(offset, len)
    }

    /// The end-to-end checks, then the end record (the snapshot), the check
    /// that the snapshot holds only this push's writes, and the manifest in
    /// the pool. What is left is to publish the record.
    pub fn seal(self, end: &PushEnd) -> Result<PoolSealed> {
        if end.stream_checksum.as_slice() != self.checksum.finish() {
            return Err(PoolError::StreamChecksum);
        }
        if end.manifest_digest.is_empty() {
            return Err(PoolError::Invalid(
                "the push's end frame has no manifest digest: the server commits only what it can check end to end"
                    .into(),
            ));
        }
        let timestamp = self.timestamp;
        self.seal_checked(&end.manifest_digest, timestamp, end.audit.clone())
    }

    /// Seals a replica's copy of a source's revision: no stream checksum
    /// (the source's restore stream has none), the manifest digest must be
    /// the source's, and the revision keeps the source's time and audit.
    pub fn seal_copy(
        self,
        manifest_digest: &[u8],
        timestamp: DateTime<Utc>,
        audit: Option<backy_common::tracker_audit::AuditOutcome>,
    ) -> Result<PoolSealed> {
        self.seal_checked(manifest_digest, timestamp, audit)
    }

    fn seal_checked(
        mut self,
        expected_manifest: &[u8],
        timestamp: DateTime<Utc>,
        audit: Option<backy_common::tracker_audit::AuditOutcome>,
    ) -> Result<PoolSealed> {
        let (image, parent_size) = (&self.parent_image, self.parent_size);
        let digests = self
            .digests
            .take()
            .ok_or_else(|| PoolError::Invalid("sealed twice".into()))?;
        let finished = digests.finish(&mut |o, buf| read_base(image, parent_size, o, buf))?;
        let manifest_digest = finished.manifest.file_digest();
        if expected_manifest != manifest_digest {
            return Err(PoolError::ManifestMismatch);
        }
        if self.zero_gaps && self.position < self.spec.size {
            self.import.zero(self.position, self.spec.size - self.position)?;
        }
        let PoolPush {
            store,
            job,
            spec,
            parent,
            import,
            stats,
            started,
            ..
        } = self;
        import.finish()?;
        let io = store.io();
        let snap = names::snapshot_name(&spec.id);
        let revision = Image::open_read_only(io, names::image_name(&job), Some(&snap)).map_err(|e| {
            if e.is_not_found() {
                PoolError::Tool {
                    command: format!("rbd import-diff - {}", store.image_spec(&job)),
                    detail: format!("it succeeded but made no snapshot {snap}"),
                }
            } else {
                e.into()
            }
        })?;
        if parent.is_some() {
            if let Err(e) = check_only_ours(&revision, parent.as_ref(), &finished, &job, &spec) {
                drop(revision);
                if let Err(rm) = Image::open(io, names::image_name(&job)).and_then(|h| h.snap_remove(&snap)) {
                    tracing::error!(job = %job, rev = %spec.id, "removing the snapshot with foreign writes: {rm}");
                }
                return Err(e);
            }
        }
        drop(revision);
        let written = parts::write_manifest(io, &job, &spec.id, &finished.manifest)?;
        if written != manifest_digest {
            return Err(PoolError::Invalid(
                "the manifest written differs from the one checked".into(),
            ));
        }
        let meta = RevisionMeta {
            id: spec.id,
            timestamp,
            parent: parent.map(|p| p.id),
            size: spec.size,
            block_size: spec.block_size,
            tags: spec.tags.clone(),
            trust: Trust::Trusted,
            verified_at: None,
            source: spec.source.clone(),
            stats: Stats {
                changed_blocks: finished.changed,
                duration: started.elapsed().as_secs_f64(),
                audit,
                ..stats
            },
            manifest_digest: hex::encode(manifest_digest),
            // Snapshots share what did not change, as reflinks do.
            storage: StorageMode::Reflink,
            locked_until: None,
            key_check: spec.key_check.clone(),
        };
        Ok(PoolSealed { store, job, meta })
    }

    /// [`PoolPush::seal`], then [`PoolSealed::publish`].
    pub fn finish(self, end: &PushEnd, keeper: &mut LeaseKeeper) -> Result<RevisionMeta> {
        self.seal(end)?.publish(keeper)
    }
}

/// Step 4: the snapshot's diff from the parent lies inside the blocks the
/// push touched, and the blocks it wrote in part read back as digested
/// (their other bytes came from the parent: a stale writer or a dead
/// push's head writes there would otherwise go unseen).
fn check_only_ours(
    revision: &Image,
    parent: Option<&RevisionMeta>,
    finished: &super::blocks::Finished,
    job: &JobName,
    spec: &NewRevisionSpec,
) -> Result<()> {
    let foreign = |detail: String| PoolError::ForeignWrites {
        job: job.clone(),
        id: spec.id,
        detail,
    };
    let from = parent.map(|p| names::snapshot_name(&p.id));
    for e in revision.diff_iterate(from.as_deref(), 0, spec.size, false)? {
        let blocks = blocks_of(
            Extent {
                offset: e.offset,
                len: e.len,
            },
            spec.block_size,
        );
        if let Some(b) = blocks.clone().find(|&b| !finished.touched.contains(b)) {
            return Err(foreign(format!(
                "{}+{} differs from the parent, block {b} was not written",
                e.offset, e.len
            )));
        }
    }
    let m = &finished.manifest;
    let mut buf = Vec::new();
    for range in finished.completed.ranges() {
        for b in range {
            buf.resize(m.block_len(b) as usize, 0);
            let got = revision.read_into(m.block_offset(b), &mut buf)?;
            buf[got..].fill(0);
            if Some(&digest(&buf)) != m.get(b) {
                return Err(foreign(format!("block {b} does not read back as digested")));
            }
        }
    }
    Ok(())
}

/// The parent's bytes at `offset` (zeros beyond its end, or without one).
fn read_base(image: &Mutex<Option<Image>>, parent_size: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
    buf.fill(0);
    if offset >= parent_size {
        return Ok(());
    }
    let image = image.lock().unwrap_or_else(|e| e.into_inner());
    let Some(image) = image.as_ref() else {
        return Ok(());
    };
    let n = ((parent_size - offset) as usize).min(buf.len());
    image.read_into(offset, &mut buf[..n])?;
    Ok(())
}

/// A revision whose snapshot and manifest are in the pool, not yet
/// recorded: dropped unpublished, it stays an orphan for
/// `PoolStore::clean_orphans`.
#[derive(Debug)]
pub struct PoolSealed {
    store: PoolStore,
    job: JobName,
    meta: RevisionMeta,
}

impl PoolSealed {
    pub fn meta(&self) -> &RevisionMeta {
        &self.meta
    }

    /// Sets when its retention lock ends (none: unlocked), as recorded.
    pub fn set_locked_until(&mut self, until: Option<DateTime<Utc>>) {
        self.meta.locked_until = until;
    }

    /// Step 5: records the revision in one write op that compares the
    /// lease's epoch first: refused (the lease lost or expired), nothing is
    /// recorded and the snapshot is an orphan.
    pub fn publish(self, keeper: &mut LeaseKeeper) -> Result<RevisionMeta> {
        let key = names::record_key(&self.meta.id);
        let yaml = self.meta.to_yaml()?;
        keeper.commit_if_holder(WriteOp::new().omap_set(&[(key.as_str(), yaml.as_bytes())]))?;
        tracing::info!(job = %self.job, rev = %self.meta.id, pool = %self.store.config().pool, "revision committed");
        Ok(self.meta)
    }
}
