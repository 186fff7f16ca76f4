//! What happens to the jobs right now, in memory: the push running on each
//! (and the revision it builds on), the revisions being read, recent push
//! outcomes, and revisions found dated after the clock. Expiry and forget
//! consult it so they never remove a revision in use.

use backy_common::revision::RevisionMeta;
use backy_common::schedule::{Dated, FutureDated};
use backy_common::{Error, JobName, Result, RevisionId};
use chrono::{DateTime, Utc};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// What is happening to one job right now, and its recent failures.
#[derive(Debug, Default, Clone)]
pub struct JobRuntime {
    /// The revision being pushed and its parent.
    pub push: Option<(RevisionId, Option<RevisionId>)>,
    /// Revisions being read (restore, manifest streaming), with counts.
    pub readers: HashMap<RevisionId, usize>,
    pub failures: u32,
    pub last_failure: Option<DateTime<Utc>>,
    /// When a push outcome was last recorded (success or failure).
    pub last_outcome: Option<DateTime<Utc>>,
    pub last_error: String,
    /// The revision id of the last failed push the server saw, so a
    /// client's report of the same attempt is not counted twice.
    pub last_failed_rev: Option<RevisionId>,
    /// The job may hold leftovers (files of a push that ended, an
    /// unfinished deletion): the periodic round looks at its disk. Jobs
    /// without the mark are not read every minute; start-up cleans all.
    pub leftovers: bool,
}

/// The activity of every job, behind its own lock (held only to copy or
/// change a job's record, never across I/O).
#[derive(Default)]
pub struct Activity {
    runtime: Mutex<HashMap<JobName, JobRuntime>>,
    /// Per job with revisions dated after the clock: when each was found.
    future: Mutex<HashMap<JobName, FutureDated>>,
}

impl Activity {
    fn runtime(&self) -> MutexGuard<'_, HashMap<JobName, JobRuntime>> {
        self.runtime.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn job_runtime(&self, job: &JobName) -> JobRuntime {
        self.runtime().get(job).cloned().unwrap_or_default()
    }

    /// Revisions that must not be removed now: the parent of a running push
    /// and everything being read.
    pub fn protected(&self, job: &JobName) -> BTreeSet<RevisionId> {
        let rt = self.runtime();
        let Some(r) = rt.get(job) else {
            return BTreeSet::new();
        };
        r.readers
            .keys()
            .copied()
            .chain(r.push.iter().filter_map(|(_, parent)| *parent))
            .collect()
    }

    /// Marks the job as one that may hold leftovers (see
    /// [`JobRuntime::leftovers`]).
    pub fn mark_leftovers(&self, job: &JobName) {
        self.runtime().entry(job.clone()).or_default().leftovers = true;
    }

    /// Clears the job's leftovers mark and says whether it was set. Taken
    /// before the disk is looked at, so a mark set meanwhile stays.
    pub fn take_leftovers(&self, job: &JobName) -> bool {
        self.runtime()
            .get_mut(job)
            .is_some_and(|r| std::mem::take(&mut r.leftovers))
    }

    /// Takes the job's push slot (one push or copy per job at a time), or
    /// fails with `Busy`; cleared when the guard drops. Its base is named
    /// with [`PushGuard::set_parent`] inside the transaction that chose it.
    pub fn try_start_push(self: &Arc<Self>, job: &JobName, id: RevisionId) -> Result<PushGuard> {
        let mut rt = self.runtime();
        let r = rt.entry(job.clone()).or_default();
        if r.push.is_some() {
            return Err(Error::busy(format!("job {job} is busy: another push is running")));
        }
        r.push = Some((id, None));
        Ok(PushGuard {
            activity: self.clone(),
            job: job.clone(),
        })
    }

    /// Registers a reader of a revision; cleared when the guard drops.
    pub fn start_read(self: &Arc<Self>, job: &JobName, id: RevisionId) -> ReadGuard {
        *self
            .runtime()
            .entry(job.clone())
            .or_default()
            .readers
            .entry(id)
            .or_default() += 1;
        ReadGuard {
            activity: self.clone(),
            job: job.clone(),
            id,
        }
    }

    /// Records how a push ended: a success clears the failure count, a
    /// failure (its reason clipped for display) adds one.
    pub fn record_outcome(&self, job: &JobName, result: &std::result::Result<(), String>) {
        let mut rt = self.runtime();
        let r = rt.entry(job.clone()).or_default();
        let now = Utc::now();
        r.last_outcome = Some(now);
        match result {
            Ok(()) => {
                r.failures = 0;
                r.last_error.clear();
            }
            Err(e) => {
                r.failures = r.failures.saturating_add(1);
                r.last_failure = Some(now);
                r.last_error = crate::text::clip(e);
            }
        }
    }

    /// A push that failed on the server: counted, unless the client's
    /// report of the same attempt (`rev`) came first, whose reason then
    /// stays (it knows better why its stream broke). Returns whether it
    /// was counted.
    pub fn count_server_failure(&self, job: &JobName, rev: Option<RevisionId>, error: &str) -> bool {
        let mut rt = self.runtime();
        let r = rt.entry(job.clone()).or_default();
        let now = Utc::now();
        r.last_outcome = Some(now);
        if rev.is_some() && r.last_failed_rev == rev && r.failures > 0 {
            return false;
        }
        r.failures = r.failures.saturating_add(1);
        r.last_failure = Some(now);
        r.last_error = crate::text::clip(error);
        r.last_failed_rev = rev;
        true
    }

    /// A push that failed on the client: counted, unless the server already
    /// counted the same attempt (`rev`), whose reason the client's then
    /// replaces (it knows better why its stream broke). Returns the
    /// consecutive failures now.
    pub fn count_client_failure(&self, job: &JobName, rev: Option<RevisionId>, error: &str) -> u32 {
        let error = crate::text::clip(error);
        let mut rt = self.runtime();
        let r = rt.entry(job.clone()).or_default();
        let now = Utc::now();
        if rev.is_none() || r.last_failed_rev != rev || r.failures == 0 {
            r.failures = r.failures.saturating_add(1);
        }
        r.last_failure = Some(now);
        r.last_outcome = Some(now);
        r.last_error = error;
        r.last_failed_rev = rev;
        r.failures
    }

    /// `revs` of `job` as scheduling and SLA see them at `now`: revisions
    /// dated after `now` count as dated when first found (see
    /// [`FutureDated`]). Each is logged once, as a warning, when found.
    pub fn dated<'a>(&self, job: &JobName, revs: &'a [RevisionMeta], now: DateTime<Utc>) -> Dated<'a> {
        let mut all = self.future.lock().unwrap_or_else(|p| p.into_inner());
        // Most jobs have none: nothing is kept for them.
        let mut mine = all.remove(job).unwrap_or_default();
        let dated = mine.date(revs, now);
        if !mine.is_empty() {
            all.insert(job.clone(), mine);
        }
        drop(all);
        for id in &dated.found {
            let at = revs.iter().find(|r| r.id == *id).map(|r| r.timestamp);
            tracing::warn!(
                job = %job, rev = %id, timestamp = ?at, now = %now,
                "revision dated after the server's clock (the clock stepped back?): \
                 scheduling and SLA count it as dated now until its date is reached"
            );
        }
        dated
    }
}

/// A job's push slot; see [`Activity::try_start_push`].
pub struct PushGuard {
    activity: Arc<Activity>,
    job: JobName,
}

impl PushGuard {
    /// Names the revision the push builds on: protected from expiry and
    /// forget until the guard drops. Call inside the job's transaction.
    pub fn set_parent(&self, parent: Option<RevisionId>) {
        if let Some(r) = self.activity.runtime().get_mut(&self.job) {
            if let Some(p) = r.push.as_mut() {
                p.1 = parent;
            }
        }
    }
}

impl Drop for PushGuard {
    fn drop(&mut self) {
        if let Some(r) = self.activity.runtime().get_mut(&self.job) {
            r.push = None;
            // However it ended (a failure, a crash of the handler, a
            // commit), the periodic round looks once.
            r.leftovers = true;
        }
    }
}

/// A reader of one revision; see [`Activity::start_read`].
pub struct ReadGuard {
    activity: Arc<Activity>,
    job: JobName,
    id: RevisionId,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        if let Some(r) = self.activity.runtime().get_mut(&self.job) {
            if let Some(n) = r.readers.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    r.readers.remove(&self.id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One failed attempt counts once, whichever side tells first; the
    /// client's reason wins either way.
    #[test]
    fn a_failed_attempt_counts_once_whichever_side_tells_first() {
        let activity = Arc::new(Activity::default());
        let job = JobName::new("vm1").expect("a name");
        let (a, b) = (RevisionId::new_random(), RevisionId::new_random());
        // The server first, then the client's report.
        assert!(activity.count_server_failure(&job, Some(a), "stream ended"));
        assert_eq!(activity.count_client_failure(&job, Some(a), "scratch full"), 1);
        assert_eq!(activity.job_runtime(&job).last_error, "scratch full");
        // The client's report first, then the server noticing.
        assert_eq!(
            activity.count_client_failure(&job, Some(b), "scratch full again"),
            2
        );
        assert!(!activity.count_server_failure(&job, Some(b), "stream ended"));
        let rt = activity.job_runtime(&job);
        assert_eq!((rt.failures, rt.last_error.as_str()), (2, "scratch full again"));
        // Another attempt counts.
        assert!(activity.count_server_failure(&job, None, "refused"));
        assert_eq!(activity.job_runtime(&job).failures, 3);
    }
}
