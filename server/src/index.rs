//! The in-memory index of committed revisions, per job: what status, plans,
//! agents, expiry and scrub read instead of re-parsing every `.rev` file.
//!
//! The server is the only writer of its store, so the index stays true by
//! invalidation: every path that changes a job's revisions holds an
//! [`Invalidate`] guard, which drops the job's entry when it ends (also on
//! errors and panics, so a half-done change is re-read, never assumed).
//! Each invalidation also bumps a change counter that agents wait on.

use crate::storage::JobDir;
use backy_common::revision::RevisionMeta;
use backy_common::{JobName, Result};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// What the index holds of one job.
#[derive(Debug)]
pub struct JobEntry {
    /// Committed revisions, oldest first.
    pub revisions: Vec<RevisionMeta>,
    /// Bytes allocated by the job's files.
    pub allocated_bytes: u64,
    /// When the server first knew the job.
    pub since: Option<DateTime<Utc>>,
}

pub struct Index {
    jobs: Mutex<HashMap<JobName, Arc<JobEntry>>>,
    changes: watch::Sender<u64>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            jobs: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
        }
    }
}

impl Index {
    /// The job's entry, read from disk if not indexed.
    pub fn get(&self, job: &JobDir) -> Result<Arc<JobEntry>> {
        if let Some(e) = self.lock().get(job.name()) {
            return Ok(e.clone());
        }
        // Read outside the lock: other jobs' lookups do not wait on disk. A
        // change finishing meanwhile invalidates again after we insert
        // (its guard drops after its write), so nothing stale stays.
        let generation = *self.changes.borrow();
        let entry = Arc::new(JobEntry {
            revisions: job.revisions()?,
            allocated_bytes: job.allocated_bytes(),
            since: job.since(),
        });
        if *self.changes.borrow() == generation {
            self.lock().insert(job.name().clone(), entry.clone());
        }
        Ok(entry)
    }

    /// Forgets the job's entry and wakes whoever waits for changes.
    pub fn invalidate(&self, job: &JobName) {
        self.lock().remove(job);
        self.notify();
    }

    /// Forgets every entry (a new configuration).
    pub fn clear(&self) {
        self.lock().clear();
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

    /// A guard that invalidates `job` when it drops.
    pub fn guard<'a>(&'a self, job: &JobName) -> Invalidate<'a> {
        Invalidate {
            index: self,
            job: job.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobName, Arc<JobEntry>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Invalidates a job's entry when dropped: hold it across any change to the
/// job's committed revisions.
pub struct Invalidate<'a> {
    index: &'a Index,
    job: JobName,
}

impl Drop for Invalidate<'_> {
    fn drop(&mut self) {
        self.index.invalidate(&self.job);
    }
}
