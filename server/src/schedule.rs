//! The server's use of the pure schedule logic in `backy_common::schedule`:
//! due decisions for plans and agents, expiry after commits and on a timer,
//! and expiry previews (dry runs).

use crate::state::Server;
use crate::storage::JobDir;
use backy_common::config::{Schedule, ServerConfig};
use backy_common::revision::RevisionMeta;
use backy_common::schedule::{self, DueState, ExpiryPlan, ExpiryRun, FailureState};
use backy_common::{fault, Result, RevisionId};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;

/// The due state of a scheduled job now. Revisions dated after the
/// server's clock count as dated when found, and the reason says so.
pub fn due_state(server: &Server, job: &JobDir, schedule: &Schedule, revs: &[RevisionMeta]) -> DueState {
    let now = Utc::now();
    let rt = server.job_runtime(job.name());
    let failures = FailureState {
        consecutive: rt.failures,
        last_failure: rt.last_failure,
    };
    let offset = schedule::spread_offset(job.name().as_str(), schedule);
    let dated = server.dated(job.name(), revs, now);
    let mut state = schedule::due(schedule, offset, &dated.revisions, &failures, now);
    if !dated.future.is_empty() {
        state.reason.push_str(&future_note(&dated.future));
    }
    state
}

/// The warning appended to reasons while a job has revisions dated after
/// the server's clock.
pub fn future_note(ids: &[RevisionId]) -> String {
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    format!(
        "; warning: {} dated after the server's clock ({}) counted as dated when found",
        backy_common::units::count(ids.len() as u64, "revision"),
        ids.join(", ")
    )
}

/// Applies expiry to a job whose lock the caller holds; returns the ids of
/// deleted revisions. Tags are rewritten atomically; deletion removes the
/// `.rev` first, so a crash never leaves a listed revision without data.
/// Every deletion is logged with its reason.
pub fn expire_locked(
    server: &Server,
    job: &JobDir,
    schedule: &Schedule,
    run: ExpiryRun,
) -> Result<Vec<RevisionId>> {
    let entry = server.indexed(job)?;
    let revs = &entry.revisions;
    let protected = server.protected(job.name());
    let plan = schedule::expire(schedule, revs, Utc::now(), &protected, run);
    if plan.is_noop() {
        // A commit just before still needs `latest` to point at it.
        if matches!(run, ExpiryRun::AfterCommit(_)) {
            job.point_latest(revs.last().map(|r| &r.id))?;
        }
        return Ok(Vec::new());
    }
    let _changed = server.index.guard(job.name());
    for meta in revs {
        if plan.retagged.contains(&meta.id) && !plan.deleted.contains(&meta.id) {
            if let Some(tags) = plan.kept.get(&meta.id) {
                let m = crate::revisions::update_meta(server, job, &meta.id, |m| m.tags = tags.clone())?;
                tracing::info!(job = %job.name(), rev = %m.id, "expiry: tags now {:?} ({})", m.tags, plan.reason(&m.id));
                fault::point("expiry.retagged");
            }
        }
    }
    let mut deleted = Vec::new();
    for id in &plan.deleted {
        job.delete(id)?;
        server.metrics.expired(plan.removals.get(id));
        tracing::info!(job = %job.name(), rev = %id, reason = %plan.reason(id), "expiry: deleted revision");
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
                Some(schedule) => expire_locked(server, &job, schedule, ExpiryRun::Periodic).map(|_| ()),
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

/// What expiry would do to one job, computed without changing anything.
pub struct Preview {
    pub revisions: Vec<RevisionMeta>,
    /// The next periodic run (at start, on reload, every minute).
    pub periodic: ExpiryPlan,
    /// The run after the next backup, assuming it commits now with
    /// `next_tags`.
    pub after_backup: ExpiryPlan,
    pub next_tags: BTreeSet<String>,
}

/// Expiry dry run of a scheduled job at `now`; `None` for a job without a
/// schedule (nothing expires). Revisions in use are not known offline: a
/// real run may keep more.
pub fn preview(config: &ServerConfig, job: &JobDir, now: DateTime<Utc>) -> Result<Option<Preview>> {
    let job_cfg = config.job(job.name())?;
    let Some(schedule) = config.schedule_of(job_cfg) else {
        return Ok(None);
    };
    let revisions = job.revisions()?;
    let none = BTreeSet::new();
    let periodic = schedule::expire(schedule, &revisions, now, &none, ExpiryRun::Periodic);
    let offset = schedule::spread_offset(job.name().as_str(), schedule);
    let due = schedule::due(schedule, offset, &revisions, &FailureState::default(), now);
    let next_tags = if due.next_tags.is_empty() {
        schedule.keys().cloned().collect()
    } else {
        due.next_tags
    };
    let mut with_new = revisions.clone();
    let new = RevisionMeta {
        id: RevisionId::new_random(),
        timestamp: now,
        tags: next_tags.clone(),
        trust: backy_common::revision::Trust::Trusted,
        ..revisions.last().cloned().unwrap_or_else(|| placeholder(now))
    };
    let new_id = new.id;
    with_new.push(new);
    let mut after_backup = schedule::expire(schedule, &with_new, now, &none, ExpiryRun::AfterCommit(new_id));
    after_backup.kept.remove(&new_id);
    after_backup.retagged.remove(&new_id);
    after_backup.removals.remove(&new_id);
    after_backup.held.remove(&new_id);
    Ok(Some(Preview {
        revisions,
        periodic,
        after_backup,
        next_tags,
    }))
}

/// A stand-in revision for previews of jobs that have none yet.
fn placeholder(now: DateTime<Utc>) -> RevisionMeta {
    RevisionMeta {
        id: RevisionId::new_random(),
        timestamp: now,
        parent: None,
        size: 0,
        block_size: backy_common::DEFAULT_BLOCK_SIZE,
        tags: BTreeSet::new(),
        trust: Default::default(),
        verified_at: None,
        source: Default::default(),
        stats: Default::default(),
        manifest_digest: String::new(),
        storage: Default::default(),
    }
}

/// The dry-run report of one job, as `backy-server expire --dry-run`
/// prints it.
pub fn format_preview(job: &backy_common::JobName, preview: Option<&Preview>) -> String {
    use backy_common::units::count;
    use std::fmt::Write as _;
    let Some(p) = preview else {
        return format!("{job}: no schedule: nothing expires\n");
    };
    let mut out = format!("{job}: {}\n", count(p.revisions.len() as u64, "revision"));
    let list = |out: &mut String, what: &str, plan: &ExpiryPlan| {
        if plan.deleted.is_empty() {
            let _ = writeln!(out, "  {what}: deletes nothing");
            return;
        }
        let _ = writeln!(out, "  {what}: deletes {}", plan.deleted.len());
        for r in p.revisions.iter().filter(|r| plan.deleted.contains(&r.id)) {
            let _ = writeln!(
                out,
                "    {}  {}  {}",
                r.id.short(),
                r.timestamp.format("%Y-%m-%d %H:%M:%S"),
                plan.reason(&r.id)
            );
        }
    };
    list(&mut out, "next periodic expiry", &p.periodic);
    if !p.periodic.pending.is_empty() {
        let tags: BTreeSet<&String> = p.periodic.pending.values().flatten().collect();
        let tags: Vec<&str> = tags.into_iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "  tags outside the schedule ({}) on {}: kept until a backup under the current schedule commits",
            tags.join(", "),
            count(p.periodic.pending.len() as u64, "revision")
        );
    }
    let next: Vec<&str> = p.next_tags.iter().map(String::as_str).collect();
    list(
        &mut out,
        &format!("after the next backup (tags {})", next.join(", ")),
        &p.after_backup,
    );
    out
}
