//! Answering "what should a push of this job do now?".

use crate::state::Server;
use backy_common::revision::RevisionMeta;
use backy_common::{Result, RevisionId, DEFAULT_BLOCK_SIZE};
use backy_proto::{PlanReply, PlanRequest};

/// The revision a new push builds on: the newest one that is not
/// distrusted.
pub fn choose_parent(revs: &[RevisionMeta]) -> Option<&RevisionMeta> {
    revs.iter().rev().find(|r| r.trust.usable_as_parent())
}

pub fn plan(server: &Server, req: &PlanRequest) -> Result<PlanReply> {
    let job = server.job(&req.job)?;
    let config = server.config();
    let job_cfg = config.job(job.name())?;
    for t in &req.tags {
        backy_common::revision::check_tag(t)?;
    }
    let revs = job.revisions()?;
    let (due, tags, reason) = match config.schedule_of(job_cfg) {
        None => (true, req.tags.clone(), "job has no schedule".to_string()),
        Some(schedule) => {
            let state = crate::schedule::due_state(server, &job, schedule, &revs);
            if req.force {
                // Forced: the given tags, else those of the next slot, so a
                // forced revision is never born without tags (expiry would
                // delete it at once).
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
    };
    let parent = choose_parent(&revs);
    Ok(PlanReply {
        due,
        tags,
        parent_id: parent.map(|p| p.id.uuid().to_string()).unwrap_or_default(),
        parent_snapshot: parent.map(|p| p.source.snapshot.clone()).unwrap_or_default(),
        parent_size: parent.map(|p| p.size).unwrap_or(0),
        block_size: DEFAULT_BLOCK_SIZE,
        source_json: job_cfg.source.as_ref().map(|s| s.to_json()).unwrap_or_default(),
        new_id: RevisionId::new_random().uuid().to_string(),
        reason,
    })
}
