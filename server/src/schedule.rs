//! The server's use of the pure schedule logic in `backy_common::schedule`:
//! due decisions for plans and agents, expiry after commits and on a timer,
//! and expiry previews (dry runs).

use crate::job::Txn;
use crate::state::Server;
use crate::storage::JobDir;
use backy_common::config::{Schedule, ServerConfig};
use backy_common::revision::RevisionMeta;
use backy_common::schedule::{self, DueState, ExpiryPlan, ExpiryRun, FailureState, Held};
use backy_common::{fault, Result, RevisionId};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;

/// The due state of a scheduled job now. Revisions dated after the
/// server's clock count as dated when found, and the reason says so.
pub fn due_state(server: &Server, job: &JobDir, schedule: &Schedule, revs: &[RevisionMeta]) -> DueState {
    let now = Utc::now();
    let rt = server.jobs.activity.job_runtime(job.name());
    let failures = FailureState {
        consecutive: rt.failures,
        last_failure: rt.last_failure,
    };
    let offset = schedule::spread_offset(job.name().as_str(), schedule);
    let dated = server.jobs.activity.dated(job.name(), revs, now);
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

/// Applies expiry to a job in `txn` (its revisions as read from disk);
/// returns the ids of deleted revisions. Tags are rewritten atomically;
/// deletions are journaled, so none is half done. Every deletion is logged
/// with its reason. Revisions in use are kept.
pub fn expire_in(
    txn: &mut Txn<'_>,
    schedule: &Schedule,
    run: ExpiryRun,
    metrics: &crate::metrics::Metrics,
) -> Result<Vec<RevisionId>> {
    let protected = txn.protected();
    let plan = schedule::expire(schedule, txn.revisions(), Utc::now(), &protected, run);
    if plan.is_noop() {
        return Ok(Vec::new());
    }
    let job = txn.job().name().clone();
    let retagged: Vec<RevisionMeta> = txn
        .revisions()
        .iter()
        .filter(|m| plan.retagged.contains(&m.id) && !plan.deleted.contains(&m.id))
        .filter_map(|m| {
            plan.kept.get(&m.id).map(|tags| RevisionMeta {
                tags: tags.clone(),
                ..m.clone()
            })
        })
        .collect();
    for m in retagged {
        txn.write(std::slice::from_ref(&m))?;
        tracing::info!(job = %job, rev = %m.id, "expiry: tags now {:?} ({})", m.tags, plan.reason(&m.id));
        fault::point("expiry.retagged");
    }
    let deleted: Vec<RevisionId> = plan.deleted.iter().copied().collect();
    txn.delete(&deleted)?;
    for id in &deleted {
        metrics.expired(plan.removals.get(id));
        tracing::info!(job = %job, rev = %id, reason = %plan.reason(id), "expiry: deleted revision");
    }
    fault::point("expiry.deleted");
    Ok(deleted)
}

/// Expires every scheduled job whose lock is free now, and removes
/// leftovers (periodic background work).
pub fn expire_all(server: &Server) {
    let config = server.config();
    let window = config.resume.window.as_duration();
    for (name, job_cfg) in &config.jobs {
        let job = JobDir::new(&config.base_dir, name.clone());
        if server.jobs.activity.job_runtime(name).push.is_some() {
            continue; // expiry runs after the push's commit anyway
        }
        // The index says which jobs may have work (a hint: the transaction
        // decides from disk), so a quiet store is not read every minute.
        let schedule = config.schedule_of(job_cfg);
        let may_expire = schedule.is_some_and(|schedule| {
            server.jobs.indexed(&job).map_or(true, |entry| {
                let protected = server.jobs.activity.protected(name);
                !schedule::expire(
                    schedule,
                    &entry.revisions,
                    Utc::now(),
                    &protected,
                    ExpiryRun::Periodic,
                )
                .is_noop()
            })
        });
        if !may_expire && !job.has_leftovers() {
            continue;
        }
        let result = Txn::try_begin(&server.jobs, &job).and_then(|mut txn| {
            let keep = job.resumable(window, chrono::Utc::now()).map(|r| r.id);
            txn.clean_leftovers(keep)?;
            if let Some(schedule) = schedule {
                expire_in(&mut txn, schedule, ExpiryRun::Periodic, &server.metrics)?;
            }
            txn.point_latest("latest");
            Ok(())
        });
        match result {
            Ok(()) => {}
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
        locked_until: None,
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
        locked_until: None,
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
        } else {
            let _ = writeln!(out, "  {what}: deletes {}", plan.deleted.len());
        }
        for r in p.revisions.iter().filter(|r| plan.deleted.contains(&r.id)) {
            let _ = writeln!(
                out,
                "    {}  {}  {}",
                r.id.short(),
                r.timestamp.format("%Y-%m-%d %H:%M:%S"),
                plan.reason(&r.id)
            );
        }
        // Those it would delete but for their retention lock.
        for r in &p.revisions {
            if let Some(held @ Held::Locked { .. }) = plan.held.get(&r.id) {
                let _ = writeln!(
                    out,
                    "    {}  {}  kept: {held}",
                    r.id.short(),
                    r.timestamp.format("%Y-%m-%d %H:%M:%S")
                );
            }
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
