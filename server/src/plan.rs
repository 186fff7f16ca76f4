//! Answering "what should a push of this job do now?".

use crate::state::Server;
use crate::storage::JobDir;
use backy_common::config::Schedule;
use backy_common::manifest::Manifest;
use backy_common::revision::RevisionMeta;
use backy_common::{Error, JobName, Result, RevisionId, DEFAULT_BLOCK_SIZE};
use backy_proto::{PlanReply, PlanRequest, RevisionInfo};

/// The revision a new push builds on: the newest one that is not
/// distrusted.
pub fn choose_parent(revs: &[RevisionMeta]) -> Option<&RevisionMeta> {
    revs.iter().rev().find(|r| r.trust.usable_as_parent())
}

/// Whether a push asked for by `req` runs now, with which tags, and why:
/// the schedule's decision (any store).
pub fn decide(
    server: &Server,
    job: &JobName,
    schedule: Option<&Schedule>,
    revs: &[RevisionMeta],
    req: &PlanRequest,
) -> (bool, Vec<String>, String) {
    let Some(schedule) = schedule else {
        return (
            true,
            req.tags.clone(),
            "job has no schedule: every push runs".to_string(),
        );
    };
    let state = crate::schedule::due_state(server, job, schedule, revs);
    // An agent's order is forced (the order, not a second look, decides),
    // but a push that is due anyway says why it is due.
    if req.force && !state.due_now {
        // Forced: the given tags, else those of the next slot, so a forced
        // revision is never born without tags (expiry would delete it at
        // once).
        let tags = if !req.tags.is_empty() {
            req.tags.clone()
        } else if !state.next_tags.is_empty() {
            state.next_tags.iter().cloned().collect()
        } else {
            schedule.keys().cloned().collect()
        };
        (true, tags, "forced".to_string())
    } else if state.due_now {
        let tags = if req.tags.is_empty() {
            state.tags.iter().cloned().collect()
        } else {
            req.tags.clone()
        };
        (true, tags, state.reason)
    } else {
        (false, Vec::new(), state.reason)
    }
}

pub fn plan(server: &Server, req: &PlanRequest) -> Result<PlanReply> {
    let job = server.job(&req.job)?;
    let config = server.config();
    let job_cfg = config.job(job.name())?;
    refuse_copies(server, &job)?;
    crate::revisions::check_tags(&req.tags, config.schedule_of(job_cfg), req.allow_unscheduled)?;
    let entry = server.jobs.indexed(&job)?;
    let revs = &entry.revisions;
    let (due, tags, reason) = decide(server, job.name(), config.schedule_of(job_cfg), revs, req);
    let parent = choose_parent(revs);
    // An interrupted push on the same parent continues under its own id.
    let resume = job
        .resumable(config.resume.window.as_duration(), chrono::Utc::now())
        .filter(|r| due && r.parent == parent.map(|p| p.id));
    let new_id = resume
        .as_ref()
        .map(|r| r.id)
        .unwrap_or_else(RevisionId::new_random);
    Ok(PlanReply {
        due,
        tags,
        parent_id: parent.map(|p| p.id.uuid().to_string()).unwrap_or_default(),
        parent_snapshot: parent.map(|p| p.source.snapshot.clone()).unwrap_or_default(),
        parent_size: parent.map(|p| p.size).unwrap_or(0),
        parent_key_check: parent
            .and_then(|p| p.key_check.as_deref())
            .and_then(|k| hex::decode(k).ok())
            .unwrap_or_default(),
        block_size: DEFAULT_BLOCK_SIZE,
        new_id: new_id.uuid().to_string(),
        reason,
        resume: resume.is_some(),
        resume_size: resume.as_ref().map(|r| r.size).unwrap_or(0),
        resume_checkpoint: resume.as_ref().map(|r| r.checkpoint).unwrap_or(0),
        dedup: crate::dedup::source::transfer_offered(
            &config,
            server.storage_mode,
            &server.jobs.hints,
            job.name(),
        ),
    })
}

/// The manifest of the interrupted push `id` as a resumed push will find
/// its partial image: what the client compares its source with.
pub fn resume_manifest(server: &Server, job: &JobDir, id: &str) -> Result<(RevisionInfo, Manifest)> {
    let id: RevisionId = id.parse().map_err(|e: Error| e.context("resume manifest"))?;
    let config = server.config();
    let record = job
        .resumable(config.resume.window.as_duration(), chrono::Utc::now())
        .filter(|r| r.id == id)
        .ok_or_else(|| {
            Error::not_found(format!(
                "no interrupted push {id} to resume in job {}",
                job.name()
            ))
        })?;
    let mut baseline = match &record.parent {
        Some(pid) => {
            let meta = job.meta(pid)?;
            job.manifest(&meta)?
        }
        None => Manifest::zeroed(0, record.block_size)?,
    };
    baseline.resize(record.size)?;
    let manifest = job.resume_manifest(&record, &baseline)?;
    let info = RevisionInfo {
        id: id.uuid().to_string(),
        short_id: id.short(),
        parent_id: record.parent.map(|p| p.uuid().to_string()).unwrap_or_default(),
        size: record.size,
        block_size: record.block_size,
        manifest_digest: hex::encode(manifest.file_digest()),
        ..RevisionInfo::default()
    };
    Ok((info, manifest))
}

/// A job copied from another server takes no pushes: its revisions are
/// that server's, under the same ids.
pub fn refuse_copies(server: &Server, job: &JobDir) -> Result<()> {
    if !server.is_copy(job.name()) {
        return Ok(());
    }
    let config = server.config();
    Err(Error::precondition(format!(
        "job {} here is a copy of {}'s: push to that server",
        job.name(),
        config
            .replicate
            .as_ref()
            .map_or("another server", |r| r.source.as_str())
    )))
}
