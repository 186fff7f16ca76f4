//! Operations on committed revisions: tags, forget, distrust, verify.
//! Metadata rewrites go through one read-modify-write helper, serialised
//! per server, so a verify and an expiry never lose each other's update.

use crate::state::Server;
use crate::storage::{durable, JobDir};
use backy_common::manifest::digest;
use backy_common::revision::{check_tag, RevisionMeta, Trust};
use backy_common::spec::Spec;
use backy_common::{Error, Result, RevisionId};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The revisions `spec` names (newest first); `all` allowed.
pub fn select(job: &JobDir, spec: &str) -> Result<Vec<RevisionMeta>> {
    let spec = Spec::parse(spec)?;
    let revs = job.revisions()?;
    let idx = spec
        .resolve(&revs)
        .map_err(|e| e.context(format!("job {}", job.name())))?;
    Ok(idx.into_iter().map(|i| revs[i].clone()).collect())
}

/// Re-reads a revision's `.rev`, applies `f`, writes it back atomically.
pub fn update_meta(
    server: &Server,
    job: &JobDir,
    id: &RevisionId,
    f: impl FnOnce(&mut RevisionMeta),
) -> Result<RevisionMeta> {
    let _serial = server.meta_lock();
    let mut meta = job.meta(id)?;
    f(&mut meta);
    durable::write_atomic(&job.rev_path(id), meta.to_yaml()?.as_bytes())?;
    Ok(meta)
}

/// The job lock for a change to stored revisions; refused at once while a
/// push runs (it may take hours), waited for behind short maintenance.
fn lock_unless_pushing(server: &Server, job: &JobDir) -> Result<crate::storage::lock::JobLock> {
    if server.job_runtime(job.name()).push.is_some() {
        return Err(Error::busy(format!(
            "job {} is busy: a push is running; try again later",
            job.name()
        )));
    }
    job.lock()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagAction {
    Set,
    Add,
    Remove,
}

/// Changes tags of the selected revisions, under the job lock.
pub fn tags(
    server: &Server,
    job: &JobDir,
    spec: &str,
    action: TagAction,
    tags: &[String],
) -> Result<Vec<RevisionMeta>> {
    for t in tags {
        check_tag(t)?;
    }
    let _lock = lock_unless_pushing(server, job)?;
    let tags: BTreeSet<String> = tags.iter().cloned().collect();
    let mut out = Vec::new();
    for meta in select(job, spec)? {
        out.push(update_meta(server, job, &meta.id, |m| match action {
            TagAction::Set => m.tags = tags.clone(),
            TagAction::Add => m.tags.extend(tags.iter().cloned()),
            TagAction::Remove => m.tags.retain(|t| !tags.contains(t)),
        })?);
    }
    job.update_latest()?;
    Ok(out)
}

/// Deletes the selected revisions, under the job lock; refuses revisions
/// in use by a restore or as the base of a push.
pub fn forget(server: &Server, job: &JobDir, spec: &str) -> Result<Vec<RevisionMeta>> {
    let _lock = lock_unless_pushing(server, job)?;
    let selected = select(job, spec)?;
    let protected = server.protected(job.name());
    if let Some(busy) = selected.iter().find(|m| protected.contains(&m.id)) {
        return Err(Error::precondition(format!(
            "revision {} is in use by a restore or a push; try again later",
            busy.id
        )));
    }
    for meta in &selected {
        job.delete(&meta.id)?;
        tracing::info!(job = %job.name(), rev = %meta.id, "forgot revision");
    }
    job.update_latest()?;
    Ok(selected)
}

/// Marks the selected revisions distrusted.
pub fn distrust(server: &Server, job: &JobDir, spec: &str) -> Result<Vec<RevisionMeta>> {
    select(job, spec)?
        .iter()
        .map(|meta| update_meta(server, job, &meta.id, |m| m.trust = Trust::Distrusted))
        .collect()
}

/// Outcome of verifying one revision.
pub struct Verified {
    pub meta: RevisionMeta,
    pub bytes_checked: u64,
    pub bad_blocks: Vec<u64>,
}

/// Re-reads every block of a revision and compares it with the manifest;
/// marks the revision `verified` (with the time) or `distrusted`.
/// `on_block` is called with the bytes read so far (progress, throttling).
pub fn verify(
    server: &std::sync::Arc<Server>,
    job: &JobDir,
    meta: &RevisionMeta,
    mut on_block: impl FnMut(u64),
) -> Result<Verified> {
    let _reading = server.start_read(job.name(), meta.id);
    let manifest = job.manifest(meta)?;
    let path = job.image_path(&meta.id);
    let file = File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .len();
    let mut bad = Vec::new();
    let mut checked = 0u64;
    if len != meta.size {
        bad.push(len.min(meta.size));
    } else {
        let mut buf = vec![0u8; manifest.block_size() as usize];
        for block in 0..manifest.block_count() {
            let n = manifest.block_len(block) as usize;
            let off = manifest.block_offset(block);
            file.read_exact_at(&mut buf[..n], off)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            if Some(&digest(&buf[..n])) != manifest.get(block) {
                bad.push(off);
            }
            checked += n as u64;
            on_block(checked);
        }
    }
    let now = chrono::Utc::now();
    let meta = update_meta(server, job, &meta.id, |m| {
        if bad.is_empty() {
            m.trust = Trust::Verified;
            m.verified_at = Some(now);
        } else {
            m.trust = Trust::Distrusted;
        }
    })?;
    if !bad.is_empty() {
        tracing::error!(job = %job.name(), rev = %meta.id, "verify: {} blocks do not match the manifest: {bad:?}", bad.len());
    }
    Ok(Verified {
        meta,
        bytes_checked: checked,
        bad_blocks: bad,
    })
}
