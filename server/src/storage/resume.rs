//! The on-disk side of resumable pushes: an interrupted push leaves
//! `.partial/<id>` (the image so far), `.partial/<id>.resume.digests` (its
//! manifest below the checkpoint) and `.partial/<id>.resume` (the record,
//! written last). See `backy_common::resume` for the rules.

use super::clone::sparse_copy_range;
use super::durable;
use super::jobdir::JobDir;
use backy_common::manifest::Manifest;
use backy_common::resume::ResumeRecord;
use backy_common::{Error, Result, RevisionId};
use chrono::{DateTime, Utc};
use rustix::fs::FallocateFlags;
use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

impl JobDir {
    pub fn partial_image_path(&self, id: &RevisionId) -> PathBuf {
        self.partial_dir().join(id.short())
    }

    pub fn resume_record_path(&self, id: &RevisionId) -> PathBuf {
        self.partial_dir().join(format!("{}.resume", id.short()))
    }

    pub fn resume_digests_path(&self, id: &RevisionId) -> PathBuf {
        self.partial_dir().join(format!("{}.resume.digests", id.short()))
    }

    /// The manifest of a sealed revision, complete and synced, until its
    /// commit moves it beside the image (a group's disks wait there for
    /// the group's commit).
    pub fn sealed_digests_path(&self, id: &RevisionId) -> PathBuf {
        self.partial_dir().join(format!("{}.digests", id.short()))
    }

    /// The newest interrupted push that can still be resumed at `now`:
    /// its record sane and inside `window`, its files present, not
    /// committed since, its parent still there. Others are ignored here
    /// (and removed by [`JobDir::clean_leftovers`]).
    pub fn resumable(&self, window: Duration, now: DateTime<Utc>) -> Option<ResumeRecord> {
        let entries = std::fs::read_dir(self.partial_dir()).ok()?;
        let mut best: Option<ResumeRecord> = None;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".resume")) else {
                continue;
            };
            let Ok(id) = RevisionId::from_short(stem) else {
                continue;
            };
            match self.usable_record(&id, window, now) {
                Ok(r) if best.as_ref().is_none_or(|b| b.written < r.written) => best = Some(r),
                Ok(_) => {}
                Err(e) => tracing::info!(job = %self.name(), "not resumable: {e}"),
            }
        }
        best
    }

    fn usable_record(&self, id: &RevisionId, window: Duration, now: DateTime<Utc>) -> Result<ResumeRecord> {
        let path = self.resume_record_path(id);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let record = ResumeRecord::from_yaml(&text, &path.display().to_string())?;
        if record.id != *id {
            return Err(Error::data_loss(format!(
                "{} names revision {}",
                path.display(),
                record.id
            )));
        }
        if self.rev_path(id).exists() {
            return Err(Error::exists(format!("revision {id} was committed")));
        }
        if let Some(parent) = &record.parent {
            if !self.rev_path(parent).exists() {
                return Err(Error::not_found(format!("parent {parent} of {id} is gone")));
            }
        }
        record
            .check(now, window, record.parent)
            .map_err(|s| Error::precondition(format!("push {id}: {s}")))?;
        let len = std::fs::metadata(self.partial_image_path(id))
            .map_err(|e| Error::io(format!("partial image of {id}"), e))?
            .len();
        if len != record.size {
            return Err(Error::data_loss(format!(
                "partial image of {id} has {len} bytes, its record says {}",
                record.size
            )));
        }
        if !self.resume_digests_path(id).exists() {
            return Err(Error::not_found(format!("digests of partial {id} are missing")));
        }
        Ok(record)
    }

    /// What the partial image of `record` holds once [`reset_tail`] ran:
    /// the recorded digests below the checkpoint, `baseline` (the parent's
    /// manifest at the new size, or zeros) above it.
    pub fn resume_manifest(&self, record: &ResumeRecord, baseline: &Manifest) -> Result<Manifest> {
        let path = self.resume_digests_path(&record.id);
        let file =
            std::fs::File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let (recorded, _) = Manifest::read_from(std::io::BufReader::new(file), &path.display().to_string())?;
        if recorded.image_size() != record.size
            || recorded.block_size() != record.block_size
            || baseline.image_size() != record.size
            || baseline.block_size() != record.block_size
        {
            return Err(Error::data_loss(format!(
                "{} does not describe the partial image of {} bytes",
                path.display(),
                record.size
            )));
        }
        let mut out = baseline.clone();
        let done = record.checkpoint / u64::from(record.block_size);
        for b in 0..done.min(out.block_count()) {
            if let Some(d) = recorded.get(b) {
                out.set(b, *d)?;
            }
        }
        Ok(out)
    }

    /// Writes the checkpoint files of a push: its manifest, then the
    /// record that makes them count. The image must be synced before.
    pub fn write_checkpoint(&self, record: &ResumeRecord, manifest: &Manifest) -> Result<()> {
        durable::write_manifest(&self.resume_digests_path(&record.id), manifest)?;
        durable::write_atomic(&self.resume_record_path(&record.id), record.to_yaml()?.as_bytes())
    }

    /// Removes the resume files of `id` (record first, so a crash half-way
    /// never leaves a record without its digests).
    pub fn discard_resume(&self, id: &RevisionId) {
        let _ = std::fs::remove_file(self.resume_record_path(id));
        let _ = std::fs::remove_file(self.resume_digests_path(id));
    }
}

/// Makes everything of `image` from `checkpoint` on equal to the parent
/// again (or zeros without one): writes of the interrupted session above
/// its last checkpoint are not recorded and must not survive.
pub fn reset_tail(
    image: &File,
    parent: Option<&File>,
    parent_size: u64,
    checkpoint: u64,
    size: u64,
) -> Result<()> {
    if checkpoint < size {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(image, flags, checkpoint, size - checkpoint)
            .map_err(|e| Error::io("resetting the partial image after its checkpoint", e.into()))?;
    }
    if let Some(parent) = parent {
        let end = parent_size.min(size);
        if checkpoint < end {
            sparse_copy_range(parent, image, checkpoint, end)?;
        }
    }
    Ok(())
}
