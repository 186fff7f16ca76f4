//! The in-memory index of committed revisions, per job: what status, plans,
//! agents, expiry and scrub read instead of re-parsing every `.rev` file.
//!
//! A read cache, never the ground for a change: every change to a job's
//! revisions is a [`crate::job::Txn`], which reads the job from disk under
//! its lock and invalidates the job's entry when it ends (also on errors
//! and panics, so a half-done change is re-read, never assumed). Each
//! invalidation also wakes the agents waiting for changes.

use crate::storage::JobDir;
use backy_common::revision::RevisionMeta;
use backy_common::{JobName, Result};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::watch;

/// What the index holds of one job.
#[derive(Debug)]
pub struct JobEntry {
    /// Committed revisions, oldest first.
    pub revisions: Vec<RevisionMeta>,
    /// Bytes allocated by the job's files, counted when first asked for
    /// (a stat of every file: start-up does not pay it for 10,000 jobs;
    /// the entry is dropped with every change, so it counts after the last).
    allocated: OnceLock<u64>,
    /// When the server first knew the job.
    pub since: Option<DateTime<Utc>>,
}

impl JobEntry {
    pub fn new(revisions: Vec<RevisionMeta>, since: Option<DateTime<Utc>>) -> Self {
        JobEntry {
            revisions,
            allocated: OnceLock::new(),
            since,
        }
    }

    /// Bytes allocated by the files of `job` (this entry's job).
    pub fn allocated_bytes(&self, job: &JobDir) -> u64 {
        *self.allocated.get_or_init(|| job.allocated_bytes())
    }
}

/// The entries and the change counter, moved together under one lock: a
/// reader that read the disk before a change finished can never insert
/// what it read after that change's invalidation.
#[derive(Default)]
struct Entries {
    jobs: HashMap<JobName, Arc<JobEntry>>,
    generation: u64,
}

pub struct Index {
    entries: Mutex<Entries>,
    changes: watch::Sender<u64>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            entries: Mutex::new(Entries::default()),
            changes: watch::channel(0).0,
        }
    }
}

impl Index {
    /// The job's entry, read from disk if not indexed.
    pub fn get(&self, job: &JobDir) -> Result<Arc<JobEntry>> {
        self.get_with(job, |job| Ok(JobEntry::new(job.revisions()?, job.since())))
    }

    /// [`Index::get`] with the disk read given (tests put a change between
    /// the read and the insert).
    fn get_with(
        &self,
        job: &JobDir,
        read: impl FnOnce(&JobDir) -> Result<JobEntry>,
    ) -> Result<Arc<JobEntry>> {
        let generation = {
            let entries = self.lock();
            if let Some(e) = entries.jobs.get(job.name()) {
                return Ok(e.clone());
            }
            entries.generation
        };
        // Read outside the lock: other jobs' lookups do not wait on disk.
        let entry = Arc::new(read(job)?);
        let mut entries = self.lock();
        // Any invalidation since (of any job: they are rare) makes what was
        // read suspect: answer it, but do not keep it.
        if entries.generation == generation {
            entries.jobs.insert(job.name().clone(), entry.clone());
        }
        Ok(entry)
    }

    /// Sets the job's entry to `entry`, read from disk under the job's lock
    /// by a transaction that changed nothing (its lock still held): the
    /// next reader need not read the disk again, and nobody is woken.
    pub fn put(&self, job: &JobName, entry: JobEntry) {
        let mut entries = self.lock();
        entries.jobs.insert(job.clone(), Arc::new(entry));
        // Reads begun before are not kept: they may be older than this.
        entries.generation = entries.generation.wrapping_add(1);
    }

    /// Forgets the job's entry and wakes whoever waits for changes.
    pub fn invalidate(&self, job: &JobName) {
        {
            let mut entries = self.lock();
            entries.jobs.remove(job);
            entries.generation = entries.generation.wrapping_add(1);
        }
        self.notify();
    }

    /// Forgets every entry (a new configuration).
    pub fn clear(&self) {
        {
            let mut entries = self.lock();
            entries.jobs.clear();
            entries.generation = entries.generation.wrapping_add(1);
        }
        self.notify();
    }

    /// Wakes whoever waits for changes without dropping entries (a push
    /// outcome changed a job's failure count).
    pub fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry told apart by its `since`.
    fn entry(n: i64) -> JobEntry {
        JobEntry::new(Vec::new(), DateTime::from_timestamp(n, 0))
    }

    fn mark(e: &JobEntry) -> i64 {
        e.since.map_or(-1, |t| t.timestamp())
    }

    #[test]
    fn an_entry_read_before_an_invalidation_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobDir::new(dir.path(), JobName::new("vm1").unwrap());
        let index = Index::default();
        // A change lands between the disk read and the insert.
        let stale = index
            .get_with(&job, |_| {
                index.invalidate(job.name());
                Ok(entry(1))
            })
            .unwrap();
        assert_eq!(mark(&stale), 1);
        let fresh = index.get_with(&job, |_| Ok(entry(2))).unwrap();
        assert_eq!(mark(&fresh), 2, "the stale read was kept");
        // An undisturbed read is kept.
        let kept = index.get_with(&job, |_| Ok(entry(3))).unwrap();
        assert_eq!(mark(&kept), 2);
    }
}
