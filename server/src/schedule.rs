//! The server's use of the pure schedule logic in `backy_common::schedule`:
//! due decisions for plans and agents, expiry after commits and on a timer,
//! and expiry previews (dry runs).

use crate::job::Txn;
use crate::state::Server;
use crate::storage::JobDir;
use backy_common::config::{Schedule, ServerConfig};
use backy_common::revision::RevisionMeta;
use backy_common::schedule::{self, DueState, ExpiryPlan, ExpiryRun, FailureState, Held};
use backy_common::{fault, JobName, Result, RevisionId};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;

/// The due state of a scheduled job now. Revisions dated after the
/// server's clock count as dated when found, and the reason says so.
pub fn due_state(server: &Server, job: &JobName, schedule: &Schedule, revs: &[RevisionMeta]) -> DueState {
    let now = Utc::now();
    let rt = server.jobs.activity.job_runtime(job);
    let failures = FailureState {
        consecutive: rt.failures,
        last_failure: rt.last_failure,
    };
    let offset = schedule::spread_offset(job.as_str(), schedule);
    let dated = server.jobs.activity.dated(job, revs, now);
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
    expire_at(txn, schedule, run, metrics, Utc::now())
}

/// [`expire_in`] as of `now`: a group commit expires every member's job
/// as of one time, so revisions of one time and tags go or stay together.
pub fn expire_at(
    txn: &mut Txn<'_>,
    schedule: &Schedule,
    run: ExpiryRun,
    metrics: &crate::metrics::Metrics,
    now: chrono::DateTime<Utc>,
) -> Result<Vec<RevisionId>> {
    let protected = txn.protected();
    let plan = schedule::expire(schedule, txn.revisions(), now, &protected, run);
    if plan.is_noop() {
        return Ok(Vec::new());
    }
    let job = txn.job().name().clone();
    let retagged = plan.retagged_records(txn.revisions());
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
/// leftovers (periodic background work). Only jobs the index says may
/// expire, and jobs marked as maybe holding leftovers (a push or copy
/// ended, a deletion left files: [`crate::job::Activity::mark_leftovers`]),
/// are read from disk: a quiet store costs no I/O per round.
pub fn expire_all(server: &Server) {
    // Group pushes whose client never came back for the commit free their
    // jobs' push slots here too.
    server.groups.sweep();
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
        let entry = server.jobs.indexed(&job).ok();
        let may_expire = schedule.is_some_and(|schedule| {
            entry.as_ref().is_none_or(|entry| {
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
        // Taken before the disk is read: a push ending meanwhile marks
        // the job again.
        let marked = server.jobs.activity.take_leftovers(name);
        let leftovers = marked && job.has_leftovers();
        if !may_expire && !leftovers {
            continue;
        }
        let result = Txn::try_begin(&server.jobs, &job).and_then(|mut txn| {
            let resumable = job.resumable(window, chrono::Utc::now()).map(|r| r.id);
            txn.clean_leftovers(resumable)?;
            if resumable.is_some() {
                // Kept for resuming: looked at again next round, removed
                // once its window has passed.
                server.jobs.activity.mark_leftovers(name);
            }
            if let Some(schedule) = schedule {
                expire_in(&mut txn, schedule, ExpiryRun::Periodic, &server.metrics)?;
            }
            txn.point_latest("latest");
            // Nothing expired: the index keeps what was read, agents sleep on.
            txn.keep_index(entry.as_ref().and_then(|e| e.since).or_else(|| job.since()));
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(e) => {
                // Looked at again next round.
                if leftovers {
                    server.jobs.activity.mark_leftovers(name);
                }
                if e.kind != backy_common::ErrorKind::Busy {
                    tracing::error!(job = %name, "expiry failed: {e}");
                }
            }
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
        key_check: None,
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
        key_check: None,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::test_server;
    use crate::storage::durable;
    use chrono::TimeDelta;
    use std::sync::Arc;

    /// Writes `n` daily revisions of `job` (the newest an hour old), as
    /// committed ones look on disk to the index and expiry.
    pub(crate) fn daily_revisions(job: &JobDir, n: i64) -> Vec<RevisionId> {
        job.ensure().unwrap();
        let now = Utc::now();
        (0..n)
            .rev()
            .map(|k| {
                let meta = RevisionMeta {
                    tags: ["daily".to_string()].into(),
                    ..placeholder(now - TimeDelta::hours(1) - TimeDelta::days(k))
                };
                std::fs::write(job.image_path(&meta.id), b"").unwrap();
                durable::write_atomic(&job.rev_path(&meta.id), meta.to_yaml().unwrap().as_bytes()).unwrap();
                meta.id
            })
            .collect()
    }

    fn partial_files(job: &JobDir) -> usize {
        std::fs::read_dir(job.partial_dir()).unwrap().count()
    }

    /// Issue 32: the round reads only jobs the index says may expire, and
    /// those it expires as before.
    #[test]
    fn the_periodic_round_expires_what_the_index_says_may_expire() {
        let dir = tempfile::tempdir().unwrap();
        let server = test_server(dir.path(), "  vm1: {schedule: daily}\n  vm2: {schedule: daily}\n");
        let (vm1, vm2) = (server.job("vm1").unwrap(), server.job("vm2").unwrap());
        let ids = daily_revisions(&vm1, 5); // keep: 3
        daily_revisions(&vm2, 3);
        let quiet = server.jobs.indexed(&vm2).unwrap();
        expire_all(&server);
        let left: Vec<RevisionId> = vm1.revisions().unwrap().iter().map(|r| r.id).collect();
        assert_eq!(left, ids[2..], "the two oldest expire");
        let indexed: Vec<RevisionId> = server
            .jobs
            .indexed(&vm1)
            .unwrap()
            .revisions
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(indexed, left, "the index follows the deletion");
        // The quiet job was not taken: its entry is the same one.
        assert!(Arc::ptr_eq(&quiet, &server.jobs.indexed(&vm2).unwrap()));
        assert_eq!(vm2.revisions().unwrap().len(), 3);
    }

    /// Issue 32: the files of a push that ended without its commit are
    /// removed by the next round; a quiet job's directory is not looked at
    /// (leftovers nobody marked, which only a crash leaves, are start-up's).
    #[test]
    fn the_periodic_round_removes_leftovers_of_a_push_that_ended_and_reads_no_quiet_job() {
        let dir = tempfile::tempdir().unwrap();
        let server = test_server(dir.path(), "  vm1: {schedule: daily}\n  vm2: {schedule: daily}\n");
        let (vm1, vm2) = (server.job("vm1").unwrap(), server.job("vm2").unwrap());
        daily_revisions(&vm1, 2);
        daily_revisions(&vm2, 2);
        let push = server
            .jobs
            .activity
            .try_start_push(vm1.name(), RevisionId::new_random())
            .unwrap();
        std::fs::write(vm1.partial_dir().join("left.img"), b"x").unwrap();
        std::fs::write(vm2.partial_dir().join("planted.img"), b"x").unwrap();
        expire_all(&server);
        assert_eq!(partial_files(&vm1), 1, "a running push's files stay");
        drop(push); // the push failed
        let agents = server.jobs.index.subscribe();
        expire_all(&server);
        assert_eq!(partial_files(&vm1), 0, "the failed push's files are removed");
        assert!(
            !server.jobs.activity.job_runtime(vm1.name()).leftovers,
            "nothing left to look at"
        );
        assert!(
            !agents.has_changed().unwrap(),
            "a cleanup that changed no revision wakes no agent"
        );
        assert_eq!(
            server.jobs.indexed(&vm1).unwrap().revisions,
            vm1.revisions().unwrap()
        );
        assert_eq!(partial_files(&vm2), 1, "the quiet job's directory was not read");
        assert_eq!(vm1.revisions().unwrap().len(), 2);
    }

    /// A deletion whose files could not all go is completed by a later
    /// round (the job is marked), not only at the next change or start.
    #[test]
    fn an_unfinished_deletion_is_completed_by_the_periodic_round() {
        let dir = tempfile::tempdir().unwrap();
        let server = test_server(dir.path(), "  vm1: {schedule: daily}\n");
        let vm1 = server.job("vm1").unwrap();
        let ids = daily_revisions(&vm1, 2);
        // What a deletion that failed after its commit point leaves: the
        // journal, the files, and the mark its transaction set.
        std::fs::write(
            vm1.path().join(crate::storage::jobdir::DELETIONS_FILE),
            format!("{}\n", ids[0]),
        )
        .unwrap();
        server.jobs.activity.mark_leftovers(vm1.name());
        expire_all(&server);
        assert!(!vm1.path().join(crate::storage::jobdir::DELETIONS_FILE).exists());
        assert!(!vm1.rev_path(&ids[0]).exists() && !vm1.image_path(&ids[0]).exists());
        assert_eq!(vm1.revisions().unwrap().len(), 1);
    }
}
