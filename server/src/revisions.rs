//! Operations on committed revisions: tags, forget, distrust, verify. Each
//! change is one job transaction ([`crate::job::Txn`]): read from disk
//! under the job's lock, written all or none.

use crate::job::Txn;
use crate::state::Server;
use crate::storage::JobDir;
use crate::work::Gate;
use backy_common::config::{Schedule, ServerConfig};
use backy_common::manifest::digest;
use backy_common::revision::{check_tag, check_tag_format, is_manual_tag, RevisionMeta, Trust};
use backy_common::spec::Spec;
use backy_common::{Error, Result, RevisionId};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The revisions `spec` names (newest first), from the index (reads only:
/// changes select in their transaction); `all` allowed.
pub fn select(server: &Server, job: &JobDir, spec: &str) -> Result<Vec<RevisionMeta>> {
    let spec = Spec::parse(spec)?;
    let entry = server.jobs.indexed(job)?;
    let revs = &entry.revisions;
    let idx = spec
        .resolve(revs)
        .map_err(|e| e.context(format!("job {}", job.name())))?;
    Ok(idx.into_iter().map(|i| revs[i].clone()).collect())
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

/// Most tags one revision may carry.
pub const MAX_TAGS: usize = 32;

/// Checks tags an operator gives (plan, push, tags): at most [`MAX_TAGS`], each well-formed; with a
/// schedule, each in it or `manual:`, unless `allow_unscheduled` (such tags
/// keep a revision only until the expiry after the next commit).
pub fn check_tags(tags: &[String], schedule: Option<&Schedule>, allow_unscheduled: bool) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid(format!("more than {} tags", MAX_TAGS)));
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
    check_tag_request(action, tags, schedule, allow_unscheduled)?;
    let mut txn = Txn::begin(&server.jobs, job)?;
    let changed = retag(txn.select(spec)?, action, tags, schedule.is_some())?;
    if apply == Apply::Yes {
        txn.write(&changed)?;
        for m in &changed {
            tracing::info!(job = %job.name(), rev = %m.id, "tags now {:?}", m.tags);
        }
        txn.point_latest("tags.applied");
    }
    Ok(changed)
}

/// The checks of a tags request's tags, before anything is read (both
/// stores): for set and add those of [`check_tags`]; removing a tag specs
/// misread (stored before they were refused) must stay possible, so for
/// remove the form only.
pub fn check_tag_request(
    action: TagAction,
    tags: &[String],
    schedule: Option<&Schedule>,
    allow_unscheduled: bool,
) -> Result<()> {
    if action != TagAction::Remove {
        return check_tags(tags, schedule, allow_unscheduled);
    }
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid(format!("more than {} tags", MAX_TAGS)));
    }
    for t in tags {
        check_tag_format(t)?;
    }
    Ok(())
}

/// The `selected` revisions with their tags changed, all or the refusal
/// (both stores): at most [`MAX_TAGS`] each, and on a `scheduled` job none
/// left without tags (expiry would delete it: that is what `forget` is
/// for).
pub fn retag(
    selected: Vec<RevisionMeta>,
    action: TagAction,
    tags: &[String],
    scheduled: bool,
) -> Result<Vec<RevisionMeta>> {
    let tags: BTreeSet<String> = tags.iter().cloned().collect();
    let mut changed = Vec::new();
    for mut meta in selected {
        match action {
            TagAction::Set => meta.tags = tags.clone(),
            TagAction::Add => meta.tags.extend(tags.iter().cloned()),
            TagAction::Remove => meta.tags.retain(|t| !tags.contains(t)),
        }
        if meta.tags.len() > MAX_TAGS {
            return Err(Error::invalid(format!(
                "revision {} would have more than {} tags",
                meta.id, MAX_TAGS
            )));
        }
        if scheduled && meta.tags.is_empty() {
            return Err(Error::invalid(format!(
                "revision {} would be left without tags, and expiry would delete it; \
                 use forget to delete a revision",
                meta.id.short()
            )));
        }
        changed.push(meta);
    }
    Ok(changed)
}

/// The refusals of a forget (both stores, dry run included): a selected
/// revision in use (`protected`: read by a restore or a verify, the base
/// of a running push), or under its retention lock.
pub fn check_forgettable(
    job: &backy_common::JobName,
    selected: &[RevisionMeta],
    protected: &BTreeSet<RevisionId>,
) -> Result<()> {
    if let Some(busy) = selected.iter().find(|m| protected.contains(&m.id)) {
        return Err(Error::precondition(format!(
            "revision {} is in use by a restore or a push; try again later",
            busy.id
        )));
    }
    let now = chrono::Utc::now();
    if let Some((m, until)) = selected.iter().find_map(|m| m.locked_at(now).map(|u| (m, u))) {
        return Err(crate::job::txn::locked(job, &m.id, until));
    }
    Ok(())
}

/// Deletes the selected revisions, all or none, in one transaction;
/// refuses revisions in use by a restore or as the base of a push.
pub fn forget(server: &Server, job: &JobDir, spec: &str, apply: Apply) -> Result<Vec<RevisionMeta>> {
    let mut txn = Txn::begin(&server.jobs, job)?;
    let selected = txn.select(spec)?;
    // Refused whole, dry run included (the transaction's delete would
    // refuse it too).
    check_forgettable(job.name(), &selected, &txn.protected())?;
    if apply == Apply::DryRun {
        return Ok(selected);
    }
    let ids: Vec<RevisionId> = selected.iter().map(|m| m.id).collect();
    txn.delete(&ids)?;
    for meta in &selected {
        tracing::info!(job = %job.name(), rev = %meta.id, "forgot revision (by request)");
    }
    txn.point_latest("forget.latest");
    Ok(selected)
}

/// Marks the selected revisions distrusted, all of them or none, in one
/// transaction (a revision forgotten meanwhile is not found, never
/// written back).
pub fn distrust(server: &Server, job: &JobDir, spec: &str, apply: Apply) -> Result<Vec<RevisionMeta>> {
    let mut txn = Txn::begin(&server.jobs, job)?;
    let mut selected = txn.select(spec)?;
    for m in &mut selected {
        m.trust = Trust::Distrusted;
    }
    if apply == Apply::Yes {
        txn.write(&selected)?;
        for m in &selected {
            tracing::info!(job = %job.name(), rev = %m.id, "distrusted (by request)");
        }
        txn.point_latest("distrust.applied");
    }
    Ok(selected)
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
    let _reading = server.jobs.activity.start_read(job.name(), meta.id);
    // What the outcome is compared with when it is written: the record as
    // on disk now, not as the caller (or the index) saw it.
    let seen = job.rev_version(&meta.id)?;
    let meta = &job.meta(&meta.id)?;
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
    let (to, at) = if bad.is_empty() {
        (Trust::Verified, Some(now))
    } else {
        (Trust::Distrusted, None)
    };
    let (meta, moved) = Txn::begin(&server.jobs, job)?.move_trust(&meta.id, seen, to, at)?;
    if !moved {
        tracing::warn!(job = %job.name(), rev = %meta.id, trust = %meta.trust.as_str(),
            "verify: clean, but the revision's record changed while it ran (a distrust, tags); left as it is now");
    }
    if !bad.is_empty() {
        tracing::error!(job = %job.name(), rev = %meta.id, "verify: {} the manifest: {bad:?}", backy_common::units::blocks_not_matching(bad.len() as u64));
    }
    Ok(Verified {
        meta,
        bytes_checked: checked,
        bad_blocks: bad,
    })
}
