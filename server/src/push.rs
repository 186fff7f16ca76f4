//! Receiving a push: validate the begin frame, lock the job, write the new
//! revision from the ranges as they arrive, commit, expire.

use crate::job::Txn;
use crate::state::Server;
use crate::storage::{NewRevision, NewRevisionSpec, PushEnd};
use crate::work::Gate;
use backy_common::granules;
use backy_common::manifest::Digest;
use backy_common::revision::{GroupInstant, RevisionMeta, SourceInfo};
use backy_common::schedule::ExpiryRun;
use backy_common::{fault, Error, ErrorKind, JobName, Result, RevisionId, DEFAULT_BLOCK_SIZE};
use backy_proto::PushBegin;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The largest image of a job without `max-size` (16 TiB).
pub const DEFAULT_MAX_SIZE: u64 = 16 << 40;

/// One decoded frame after the begin frame.
pub enum Step {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
    /// Granule digests of a block (`PushExchange` only), and its digest
    /// when the client asks whether the server holds it (protocol 5).
    Granules(u64, Vec<u8>, Option<Digest>),
    End(PushEnd),
    /// The client broke the protocol: discard, failing with this reason.
    /// (A channel that closes without `End` or `Abort` means the client
    /// went away: what arrived is kept for resuming.)
    Abort(String),
}

/// What a push's begin frame says the new revision is.
pub fn new_revision_spec(
    begin: &PushBegin,
    id: RevisionId,
    tags: BTreeSet<String>,
    group: Option<GroupInstant>,
    key_check: Option<String>,
) -> NewRevisionSpec {
    NewRevisionSpec {
        id,
        size: begin.size,
        block_size: begin.block_size,
        tags,
        source: SourceInfo {
            kind: backy_proto::source_kind_name(begin.source_kind()).to_string(),
            snapshot: begin.source_snapshot.clone(),
            group,
        },
        key_check,
    }
}

/// The key check of a client-encrypted push (hex; `None`: a plain push),
/// checked against its parent's: an incremental push on a parent of
/// another key would mix two keys in one image (docs/encryption.md), so
/// it is refused before anything is written. Any store.
pub fn check_key(job: &JobName, begin: &PushBegin, parent: Option<&RevisionMeta>) -> Result<Option<String>> {
    let key_check =
        backy_common::encryption::parse_key_check(&begin.key_check).map_err(|e| e.context("push"))?;
    if key_check.is_some() {
        backy_common::encryption::check_size(begin.size)?;
    }
    if let Some(meta) = parent {
        let stored = backy_common::encryption::stored_key_check(meta.key_check.as_deref())
            .map_err(|e| e.context(format!("revision {}", meta.id)))?;
        if let Some(why) = backy_common::encryption::key_change(stored.as_ref(), key_check.as_ref()) {
            return Err(Error::precondition(format!(
                "job {job}: {why}: push with --new-key for a full backup (docs/encryption.md)"
            )));
        }
    }
    Ok(key_check.map(hex::encode))
}

/// The checks of a push's begin frame against the job's stored revisions,
/// whichever store holds them: the revision is new, the source has not
/// shrunk (compared with the revision a push would build on, whatever
/// parent the client names: a full backup of a shrunken disk is refused
/// too) unless the client says so, and a named parent exists and is
/// trusted. Returns that parent.
pub fn check_against_stored<'r>(
    job: &JobName,
    id: RevisionId,
    begin: &PushBegin,
    revs: &'r [RevisionMeta],
) -> Result<Option<&'r RevisionMeta>> {
    if revs.iter().any(|r| r.id == id) {
        return Err(Error::exists(format!("job {job}: revision {id} exists already")));
    }
    if let Some(newest) = crate::plan::choose_parent(revs) {
        if begin.size < newest.size && !begin.allow_shrink {
            return Err(Error::precondition(format!(
                "job {job}: the source has {} but revision {} has {}: a disk shrinks \
                 rarely and by mistake often; check the source, or push with \
                 --allow-shrink if it really shrank",
                backy_common::units::format_bytes(begin.size),
                newest.id.short(),
                backy_common::units::format_bytes(newest.size),
            )));
        }
    }
    if begin.parent_id.is_empty() {
        return Ok(None);
    }
    let pid: RevisionId = begin
        .parent_id
        .parse()
        .map_err(|e: Error| e.context("push: parent_id"))?;
    let meta = revs.iter().find(|r| r.id == pid).ok_or_else(|| {
        Error::precondition(format!(
            "parent revision {pid} no longer exists; run the push again"
        ))
    })?;
    if !meta.trust.usable_as_parent() {
        return Err(Error::precondition(format!(
            "parent revision {pid} is distrusted; run the push again for a full backup"
        )));
    }
    Ok(Some(meta))
}

/// Where the answers of the granule exchange go (block, bitmap, held); an
/// error means the client went away.
pub type Answer = Box<dyn FnMut(u64, Vec<u8>, bool) -> Result<()> + Send>;

/// What a push ended with.
pub struct Received {
    pub meta: RevisionMeta,
    /// What expiry removed after the commit.
    pub expired: Vec<RevisionId>,
    /// Sealed and held for its group's commit (`PushBegin.hold`), not
    /// committed yet.
    pub held: bool,
}

/// Runs a whole push on a blocking thread and returns the new revision and
/// the ids expiry removed after it; `rx` ends without `End` when the
/// client went away, and then nothing is committed. `answer` is `None` for
/// pushes without the granule exchange. `identity`: the client's, which
/// alone may commit a group instant it holds disks of.
pub fn run(
    server: Arc<Server>,
    begin: PushBegin,
    mut rx: mpsc::Receiver<Step>,
    gate: Gate,
    mut answer: Option<Answer>,
    identity: &str,
) -> Result<Received> {
    let job = server.job(&begin.job)?;
    let config = server.config();
    let job_cfg = config.job(job.name())?;
    crate::plan::refuse_copies(&server, &job)?;
    let id: RevisionId = begin
        .rev_id
        .parse()
        .map_err(|e: Error| e.context("push: rev_id"))?;
    if begin.block_size != DEFAULT_BLOCK_SIZE {
        return Err(Error::invalid(format!(
            "block size {} is not this server's {DEFAULT_BLOCK_SIZE}",
            begin.block_size
        )));
    }
    backy_common::revision::check_source_snapshot(&begin.source_snapshot)?;
    let group = begin.group.as_ref().map(backy_proto::group_instant).transpose()?;
    let max = job_cfg.max_size.unwrap_or(DEFAULT_MAX_SIZE);
    if begin.size > max {
        return Err(Error::exhausted(format!(
            "image size {} exceeds job {}'s limit of {max} bytes (max-size)",
            begin.size,
            job.name()
        )));
    }
    if begin.size > backy_common::manifest::MAX_IMAGE_SIZE {
        return Err(Error::invalid(format!("image size {} is too large", begin.size)));
    }
    if begin.size == 0 {
        return Err(Error::invalid(format!(
            "job {}: the source is empty (0 bytes): nothing to back up; is it the right disk?",
            job.name()
        )));
    }
    let tags = check_tags(&begin.tags, config.schedule_of(job_cfg), begin.allow_unscheduled)?;
    // A disk of a group push: sealed here, committed with the others by
    // the client's `CommitGroup` (crate::group).
    let joined = match (&group, begin.hold) {
        (Some(g), true) => Some(server.groups.join(g, identity)?),
        (None, true) => return Err(Error::invalid("a held push needs its group instant")),
        (_, false) => None,
    };

    // The push slot for the whole push; the job's lock only for the
    // transactions that begin and commit it.
    let running = server.jobs.activity.try_start_push(job.name(), id)?;
    let now = chrono::Utc::now();
    let window = config.resume.window.as_duration();
    let txn = Txn::begin(&server.jobs, &job)?;
    let resuming = if begin.resume {
        let record = job.resumable(window, now).filter(|r| r.id == id).ok_or_else(|| {
            Error::precondition(format!(
                "push {id} of job {} can no longer be resumed; run the push again",
                job.name()
            ))
        })?;
        Some(record)
    } else {
        None
    };
    txn.clean_leftovers_for_push(resuming.as_ref().map(|r| r.id))?;
    fault::point("push.locked");
    let parent = check_against_stored(job.name(), id, &begin, txn.revisions())?.cloned();
    let key_check = check_key(job.name(), &begin, parent.as_ref())?;
    // Registered under the lock: from here on expiry and forget keep the
    // parent, and leftover cleanup keeps this push's files.
    running.set_parent(parent.as_ref().map(|p| p.id));
    drop(txn);
    let parent = match &parent {
        Some(meta) => Some((meta, job.manifest(meta)?)),
        None => None,
    };
    let spec = new_revision_spec(&begin, id, tags, group, key_check);
    let checkpoint_every = (config.resume.enabled && begin.resumable).then_some(config.resume.checkpoint);
    let mut rev = match &resuming {
        Some(record) => {
            tracing::info!(job = %job.name(), rev = %id, checkpoint = record.checkpoint, "resuming push");
            NewRevision::resume(&job, spec, record, parent, checkpoint_every, gate)?
        }
        None => NewRevision::create(&job, spec, parent, server.storage_mode, checkpoint_every, gate)?,
    };
    let sources = crate::dedup::source::StoredBlocks::for_push(
        &config,
        server.storage_mode,
        &server.jobs.hints,
        job.name(),
        begin.block_size,
    );
    if let Some(sources) = sources {
        rev = rev.with_sources(Box::new(sources));
    }
    fault::point("push.cloned");
    let sealed = loop {
        let step = rx.blocking_recv();
        // The client went away (its answers undeliverable, too).
        let mut gone = step.is_none();
        match step {
            Some(Step::Data(offset, data)) => {
                rev.data(offset, &data)?;
                fault::point("push.frame");
            }
            Some(Step::Zero(offset, len)) => {
                rev.zero(offset, len)?;
                fault::point("push.frame");
            }
            Some(Step::Granules(block, digests, block_digest)) => {
                let Some(answer) = answer.as_mut() else {
                    return Err(Error::invalid("granule digests outside the granule exchange"));
                };
                match exchange(&mut rev, block, &digests, block_digest.as_ref()) {
                    Ok((wanted, held)) => {
                        fault::point("push.granules");
                        gone = answer(block, wanted, held).is_err();
                    }
                    // The work pool gives a departed client no slot.
                    Err(e) if e.kind == ErrorKind::Unavailable => gone = true,
                    Err(e) => return Err(e),
                }
            }
            Some(Step::End(end)) => break rev.commit(&end)?,
            Some(Step::Abort(why)) => return Err(Error::invalid(why)),
            None => {}
        }
        if gone {
            let why = "push stream ended before its end frame";
            return Err(match rev.suspend()? {
                Some(at) => Error::unavailable(format!(
                    "{why}; {} kept for resuming within {}: run the push again",
                    backy_common::units::format_bytes(at),
                    config.resume.window
                )),
                None => Error::unavailable(format!("{why}; nothing was committed")),
            });
        }
    };
    if let Some(joined) = joined {
        let meta = sealed.meta().clone();
        joined.hold(sealed, running)?;
        tracing::info!(job = %job.name(), rev = %meta.id, "sealed; held for its group's commit");
        return Ok(Received {
            meta,
            expired: Vec::new(),
            held: true,
        });
    }
    let (meta, expired) = publish_and_expire(&server, &job, sealed, &running, "push.after-commit")?;
    fault::point("push.committed");
    // The parent is no longer read: it expires like any other revision now.
    drop(running);
    tracing::info!(
        job = %job.name(), rev = %meta.id, size = meta.size, received = meta.stats.bytes_received,
        changed_blocks = meta.stats.changed_blocks, storage = meta.storage.as_str(), "committed revision"
    );
    Ok(Received {
        meta,
        expired,
        held: false,
    })
}

/// Answers one block of the granule exchange: held (cloned from a stored
/// copy, nothing wanted), else the granules that differ, or all of them
/// when the client sent only the block's digest.
fn exchange(
    rev: &mut NewRevision,
    block: u64,
    digests: &[u8],
    block_digest: Option<&Digest>,
) -> Result<(Vec<u8>, bool)> {
    if let Some(d) = block_digest {
        if rev.held(block, d)? {
            return Ok((granules::none_wanted(rev.block_len(block)), true));
        }
        if digests.is_empty() {
            return Ok((rev.wanted_whole(block)?, false));
        }
    }
    Ok((rev.granules(block, digests)?, false))
}

/// Publishes a sealed revision and runs the expiry after it, in one
/// transaction. What follows the publication is housekeeping: its failure
/// is logged and retried by the periodic run, never a failed push (the
/// client would retry and back off for a backup it has). `point` names the
/// error point tests use for such a failure.
pub fn publish_and_expire(
    server: &Server,
    job: &crate::storage::JobDir,
    sealed: crate::storage::Sealed,
    slot: &crate::job::PushGuard,
    point: &str,
) -> Result<(RevisionMeta, Vec<RevisionId>)> {
    let config = server.config();
    let job_cfg = config.job(job.name()).ok();
    // This server's lock for the job, also for a replica's copy (never the
    // source's: each site decides what it keeps).
    let lock = job_cfg.and_then(|j| config.retention_lock_of(j));
    let mut txn = Txn::begin(&server.jobs, job)?;
    let meta = txn.publish(sealed, lock)?;
    // Published: the parent is no longer read, and expires like any other
    // revision from here on.
    slot.set_parent(None);
    let schedule = job_cfg.and_then(|j| config.schedule_of(j));
    let expired = fault::fail(point)
        .and_then(|()| match schedule {
            Some(schedule) => crate::schedule::expire_in(&mut txn, schedule, ExpiryRun::AfterCommit(meta.id), &server.metrics),
            None => Ok(Vec::new()),
        })
        .unwrap_or_else(|e| {
            tracing::error!(job = %job.name(), rev = %meta.id, "after the commit: {e}; the revision is kept, expiry retries within a minute");
            Vec::new()
        });
    txn.point_latest("latest");
    Ok((meta, expired))
}

/// Validates a new revision's tags: see [`crate::revisions::check_tags`].
pub(crate) fn check_tags(
    tags: &[String],
    schedule: Option<&backy_common::config::Schedule>,
    allow_unscheduled: bool,
) -> Result<BTreeSet<String>> {
    crate::revisions::check_tags(tags, schedule, allow_unscheduled)?;
    if schedule.is_some() && tags.is_empty() {
        return Err(Error::invalid(
            "a revision of a scheduled job needs at least one tag (expiry deletes untagged revisions)",
        ));
    }
    Ok(tags.iter().cloned().collect())
}
