//! A job's revisions and every change to them.
//!
//! - [`Txn`] (`txn.rs`): the one way to change a job, under its lock, read
//!   from disk when it begins.
//! - [`Index`] (`index.rs`): the read cache of committed revisions per job
//!   that status, plans and agents read; a transaction invalidates it.
//! - [`Activity`] (`activity.rs`): what runs now (pushes, readers, recent
//!   outcomes), which deletions consult.
//!
//! Locking, in short (docs/DESIGN.md, "One way to change a job"): a change
//! holds the job's flock for one short transaction; a push or copy holds
//! the job's push slot in [`Activity`] while data streams in, taking a
//! transaction only to begin and to publish; the index and the activity
//! each have their own mutex, held only to copy or swap an entry.

pub mod activity;
pub mod index;
pub mod space;
pub mod txn;

pub use activity::{Activity, JobRuntime, PushGuard, ReadGuard};
pub use index::{Index, JobEntry};
pub use space::{JobSpace, SpaceCache};
pub use txn::Txn;

use crate::storage::JobDir;
use backy_common::Result;
use std::sync::Arc;

/// The jobs' state in memory: the read caches and the activity.
#[derive(Default)]
pub struct Jobs {
    pub index: Arc<Index>,
    pub activity: Arc<Activity>,
    /// What each job's revisions take on disk (counted on demand).
    pub space: SpaceCache,
    /// The store's digest index, kept current by every commit and deletion.
    pub hints: crate::dedup::hints::Hints,
}

impl Jobs {
    /// The committed revisions (and allocation, first-seen time) of a job,
    /// from the index.
    pub fn indexed(&self, job: &JobDir) -> Result<Arc<JobEntry>> {
        self.index.get(job)
    }

    /// What the job's committed revisions (`entry`'s) take on disk,
    /// counted now if need be.
    pub fn space(&self, job: &JobDir, entry: &JobEntry) -> Arc<JobSpace> {
        self.space.get(job, &entry.revisions)
    }

    /// The job's last counted space at once (see [`SpaceCache::last`]).
    pub fn last_space(&self, job: &JobDir, entry: &JobEntry) -> Option<Arc<JobSpace>> {
        self.space.last(job, &entry.revisions, &self.index)
    }
}
