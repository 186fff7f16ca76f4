//! The server's use of the pure schedule logic in `backy_common::schedule`:
//! due decisions for plans and agents, expiry after commits and on a timer.

use crate::state::Server;
use crate::storage::JobDir;
use backy_common::config::Schedule;
use backy_common::revision::RevisionMeta;
use backy_common::schedule::{self, DueState, FailureState};
use backy_common::{fault, Result, RevisionId};
use chrono::Utc;

/// The due state of a scheduled job now.
pub fn due_state(server: &Server, job: &JobDir, schedule: &Schedule, revs: &[RevisionMeta]) -> DueState {
    let rt = server.job_runtime(job.name());
    let failures = FailureState {
        consecutive: rt.failures,
        last_failure: rt.last_failure,
    };
    let offset = schedule::spread_offset(job.name().as_str(), schedule);
    schedule::due(schedule, offset, revs, &failures, Utc::now())
}

/// Applies expiry to a job whose lock the caller holds; returns the ids of
/// deleted revisions. Tags are rewritten atomically; deletion removes the
/// `.rev` first, so a crash never leaves a listed revision without data.
pub fn expire_locked(server: &Server, job: &JobDir, schedule: &Schedule) -> Result<Vec<RevisionId>> {
    let revs = job.revisions()?;
    let protected = server.protected(job.name());
    let plan = schedule::expire(schedule, &revs, Utc::now(), &protected);
    if plan.is_noop() {
        // A commit just before still needs `latest` to point at it.
        job.update_latest()?;
        return Ok(Vec::new());
    }
    for meta in &revs {
        if plan.retagged.contains(&meta.id) && !plan.deleted.contains(&meta.id) {
            if let Some(tags) = plan.kept.get(&meta.id) {
                let m = crate::revisions::update_meta(server, job, &meta.id, |m| m.tags = tags.clone())?;
                tracing::info!(job = %job.name(), rev = %m.id, "expiry: tags now {:?}", m.tags);
                fault::point("expiry.retagged");
            }
        }
    }
    let mut deleted = Vec::new();
    for id in &plan.deleted {
        job.delete(id)?;
        tracing::info!(job = %job.name(), rev = %id, "expiry: deleted revision");
        deleted.push(*id);
        fault::point("expiry.deleted");
    }
    job.update_latest()?;
    Ok(deleted)
}

/// Expires every scheduled job that is not busy (periodic background work).
pub fn expire_all(server: &Server) {
    let config = server.config();
    let window = config.resume.window.as_duration();
    for (name, job_cfg) in &config.jobs {
        let job = JobDir::new(&config.base_dir, name.clone());
        if server.job_runtime(name).push.is_some() {
            continue; // expiry runs after the push's commit anyway
        }
        let result = job.try_lock().and_then(|_lock| {
            let keep = job.resumable(window, chrono::Utc::now()).map(|r| r.id);
            for p in job.clean_leftovers(keep)? {
                tracing::info!(job = %name, "removed leftover {}", p.display());
            }
            match config.schedule_of(job_cfg) {
                Some(schedule) => expire_locked(server, &job, schedule).map(|_| ()),
                None => Ok(()),
            }
        });
        match result {
            Ok(_) => {}
            Err(e) if e.kind == backy_common::ErrorKind::Busy => {} // next round
            Err(e) => tracing::error!(job = %name, "expiry failed: {e}"),
        }
    }
}
