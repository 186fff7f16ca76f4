//! Operations on committed revisions: tags, forget, distrust, verify.
//! Metadata rewrites go through one read-modify-write helper, serialised
//! per server, so a verify and an expiry never lose each other's update.

use crate::state::Server;
use crate::storage::{durable, JobDir};
use crate::work::Gate;
use backy_common::config::{Schedule, ServerConfig};
use backy_common::manifest::digest;
use backy_common::revision::{check_tag, check_tag_format, is_manual_tag, RevisionMeta, Trust};
use backy_common::spec::Spec;
use backy_common::{fault, Error, Result, RevisionId};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The revisions `spec` names (newest first); `all` allowed.
pub fn select(server: &Server, job: &JobDir, spec: &str) -> Result<Vec<RevisionMeta>> {
    let spec = Spec::parse(spec)?;
    let entry = server.indexed(job)?;
    let revs = &entry.revisions;
    let idx = spec
        .resolve(revs)
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
    let _changed = server.index.guard(job.name());
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

impl TagAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TagAction::Set => "set",
            TagAction::Add => "add",
            TagAction::Remove => "remove",
        }
    }
}

/// Whether a change applies or only answers what it would do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    Yes,
    DryRun,
}

/// Checks tags an operator gives (plan, push, tags): at most [`crate::push::MAX_TAGS`], each well-formed; with a
/// schedule, each in it or `manual:`, unless `allow_unscheduled` (such tags
/// keep a revision only until the expiry after the next commit).
pub fn check_tags(tags: &[String], schedule: Option<&Schedule>, allow_unscheduled: bool) -> Result<()> {
    if tags.len() > crate::push::MAX_TAGS {
        return Err(Error::invalid(format!(
            "more than {} tags",
            crate::push::MAX_TAGS
        )));
    }
    for t in tags {
        check_tag(t)?;
    }
    let Some(schedule) = schedule else {
        return Ok(());
    };
    let outside: Vec<&str> = tags
        .iter()
        .filter(|t| !is_manual_tag(t) && !schedule.contains_key(t.as_str()))
        .map(String::as_str)
        .collect();
    if outside.is_empty() || allow_unscheduled {
        return Ok(());
    }
    let known: Vec<&str> = schedule.keys().map(String::as_str).collect();
    Err(Error::invalid(format!(
        "tag {} not in the job's schedule ({}): expiry would remove {} and delete the revision; \
         use a schedule tag, a manual:NAME tag (never expires), or --allow-unscheduled to keep \
         it only until the next backup",
        outside.join(", "),
        known.join(", "),
        if outside.len() == 1 { "it" } else { "them" },
    )))
}

/// Tags of stored revisions that revision specs read as something else
/// (refused for new tags since issue 27, item 9; older stores may hold
/// some): one line per tag, naming job, revision and what a spec reads.
/// For `check-config`; reads the `.rev` files, changes nothing.
pub fn misread_tags(config: &ServerConfig) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for name in config.jobs.keys() {
        let job = JobDir::new(&config.base_dir, name.clone());
        for meta in job.revisions()? {
            for tag in &meta.tags {
                if check_tag_format(tag).is_ok() {
                    if let Err(e) = check_tag(tag) {
                        lines.push(format!("job {name}, revision {}: {}", meta.id, e.message));
                    }
                }
            }
        }
    }
    Ok(lines)
}

/// Changes tags of the selected revisions, under the job lock; all of them
/// or none. On a scheduled job, tags outside the schedule need
/// `allow_unscheduled`, and no revision may be left without tags (expiry
/// would delete it: that is what `forget` is for).
pub fn tags(
    server: &Server,
    job: &JobDir,
    spec: &str,
    action: TagAction,
    tags: &[String],
    allow_unscheduled: bool,
    apply: Apply,
) -> Result<Vec<RevisionMeta>> {
    let config = server.config();
    let schedule = config.schedule_of(config.job(job.name())?);
    if action != TagAction::Remove {
        check_tags(tags, schedule, allow_unscheduled)?;
    } else {
        // Removing a tag specs misread (stored before they were refused)
        // must stay possible: the form only.
        if tags.len() > crate::push::MAX_TAGS {
            return Err(Error::invalid(format!(
                "more than {} tags",
                crate::push::MAX_TAGS
            )));
        }
        for t in tags {
            check_tag_format(t)?;
        }
    }
    let _lock = lock_unless_pushing(server, job)?;
    let tags: BTreeSet<String> = tags.iter().cloned().collect();
    let mut changed = Vec::new();
    for mut meta in select(server, job, spec)? {
        match action {
            TagAction::Set => meta.tags = tags.clone(),
            TagAction::Add => meta.tags.extend(tags.iter().cloned()),
            TagAction::Remove => meta.tags.retain(|t| !tags.contains(t)),
        }
        if meta.tags.len() > crate::push::MAX_TAGS {
            return Err(Error::invalid(format!(
                "revision {} would have more than {} tags",
                meta.id,
                crate::push::MAX_TAGS
            )));
        }
        if schedule.is_some() && meta.tags.is_empty() {
            return Err(Error::invalid(format!(
                "revision {} would be left without tags, and expiry would delete it; \
                 use forget to delete a revision",
                meta.id.short()
            )));
        }
        changed.push(meta);
    }
    if apply == Apply::Yes {
        write_metas(server, job, &changed)?;
        for m in &changed {
            tracing::info!(job = %job.name(), rev = %m.id, "tags now {:?}", m.tags);
        }
        after_change(job, "tags.applied");
    }
    Ok(changed)
}

/// Deletes the selected revisions, under the job lock; refuses revisions
/// in use by a restore or as the base of a push. Their `.rev` files go
/// first, together: that is the commit point; the data files after it
/// (what a failure there leaves is removed as leftovers).
pub fn forget(server: &Server, job: &JobDir, spec: &str, apply: Apply) -> Result<Vec<RevisionMeta>> {
    let _lock = lock_unless_pushing(server, job)?;
    let selected = select(server, job, spec)?;
    let protected = server.protected(job.name());
    if let Some(busy) = selected.iter().find(|m| protected.contains(&m.id)) {
        return Err(Error::precondition(format!(
            "revision {} is in use by a restore or a push; try again later",
            busy.id
        )));
    }
    if apply == Apply::DryRun {
        return Ok(selected);
    }
    let _changed = server.index.guard(job.name());
    for meta in &selected {
        let rev = job.rev_path(&meta.id);
        if let Err(e) = std::fs::remove_file(&rev) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(Error::io(format!("removing {}", rev.display()), e));
            }
        }
    }
    durable::fsync_dir(job.path())?;
    for meta in &selected {
        tracing::info!(job = %job.name(), rev = %meta.id, "forgot revision (by request)");
    }
    let remove_data = || -> Result<()> {
        fault::fail("forget.applied")?;
        for meta in &selected {
            job.delete(&meta.id)?;
        }
        Ok(())
    };
    if let Err(e) = remove_data() {
        tracing::error!(job = %job.name(), "forget: removing data files: {e}; removed as leftovers later");
    }
    after_change(job, "forget.latest");
    Ok(selected)
}

/// Marks the selected revisions distrusted; all of them or none.
pub fn distrust(server: &Server, job: &JobDir, spec: &str, apply: Apply) -> Result<Vec<RevisionMeta>> {
    let mut selected = select(server, job, spec)?;
    for m in &mut selected {
        m.trust = Trust::Distrusted;
    }
    if apply == Apply::Yes {
        write_metas(server, job, &selected)?;
        for m in &selected {
            tracing::info!(job = %job.name(), rev = %m.id, "distrusted (by request)");
        }
        after_change(job, "distrust.applied");
    }
    Ok(selected)
}

/// Writes the `.rev` files of `metas` together (all or none).
fn write_metas(server: &Server, job: &JobDir, metas: &[RevisionMeta]) -> Result<()> {
    let _serial = server.meta_lock();
    let _changed = server.index.guard(job.name());
    let texts: Vec<(std::path::PathBuf, String)> = metas
        .iter()
        .map(|m| Ok((job.rev_path(&m.id), m.to_yaml()?)))
        .collect::<Result<_>>()?;
    let files: Vec<(&std::path::Path, &[u8])> =
        texts.iter().map(|(p, t)| (p.as_path(), t.as_bytes())).collect();
    durable::write_atomic_all(&files)
}

/// Housekeeping after a change has applied: its failure is logged, never
/// answered as an error (the caller would retry a change that happened).
/// `point` names the error point tests use to force such a late failure.
fn after_change(job: &JobDir, point: &str) {
    if let Err(e) = fault::fail(point).and_then(|()| job.update_latest()) {
        tracing::error!(job = %job.name(), "updating latest: {e}; fixed by the next expiry run");
    }
}

/// Where the next data at or after `offset` starts: the file's size when
/// only a hole follows, `offset` itself when the filesystem cannot tell.
fn next_data_at(file: &File, offset: u64) -> u64 {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
        Ok(at) => at,
        Err(rustix::io::Errno::NXIO) => u64::MAX,
        Err(_) => offset,
    }
}

/// Outcome of verifying one revision.
pub struct Verified {
    pub meta: RevisionMeta,
    pub bytes_checked: u64,
    pub bad_blocks: Vec<u64>,
}

/// Re-reads every block of a revision and compares it with the manifest;
/// marks the revision `verified` (with the time) or `distrusted`. Holes
/// (found with `SEEK_DATA`) are zeros without reading them, so a sparse
/// image costs what its data costs; each block read takes a slot of the
/// server's work pool through `gate`. `on_block` is called with the bytes
/// read so far (throttling) and answers whether to go on: a verify whose
/// caller went away stops at the next block, changes no trust, and fails
/// as cancelled.
pub fn verify(
    server: &std::sync::Arc<Server>,
    job: &JobDir,
    meta: &RevisionMeta,
    gate: &Gate,
    mut on_block: impl FnMut(u64) -> bool,
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
    let mut read = 0u64;
    let cancelled = |checked: u64| {
        Error::unavailable(format!(
            "verify of revision {} cancelled after {checked} bytes: nothing changed",
            meta.id
        ))
    };
    if len != meta.size {
        bad.push(len.min(meta.size));
    } else {
        let mut buf = vec![0u8; manifest.block_size() as usize];
        // No data lies in [checked, next_data).
        let mut next_data = 0u64;
        for block in 0..manifest.block_count() {
            let n = manifest.block_len(block) as usize;
            let off = manifest.block_offset(block);
            if next_data <= off {
                next_data = next_data_at(&file, off);
            }
            if next_data >= off + n as u64 {
                if !manifest.is_zero(block) {
                    bad.push(off);
                }
            } else {
                let _slot = gate.slot().map_err(|_| cancelled(checked))?;
                file.read_exact_at(&mut buf[..n], off)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                if Some(&digest(&buf[..n])) != manifest.get(block) {
                    bad.push(off);
                }
                read += n as u64;
                if !on_block(read) {
                    return Err(cancelled(checked));
                }
            }
            checked += n as u64;
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
        tracing::error!(job = %job.name(), rev = %meta.id, "verify: {} the manifest: {bad:?}", backy_common::units::blocks_not_matching(bad.len() as u64));
    }
    Ok(Verified {
        meta,
        bytes_checked: checked,
        bad_blocks: bad,
    })
}
