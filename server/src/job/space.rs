//! The space of each job's revisions, cached (docs/DESIGN.md, "Space").
//!
//! FIEMAP of every image on every status call or scrape would read the
//! extent trees of the whole store each time. A revision's files do not
//! change once committed, but whether an extent is shared does: a new
//! clone shares its parent's extents, a deletion leaves others exclusive.
//! So the cache is per job, kept while the job's committed revisions are
//! the same ones and for at most [`MAX_AGE`] (outside changes: a
//! deduplication or a snapshot of the filesystem); then every revision of
//! the job is mapped again, outside the cache's lock.

use crate::storage::space::revision_space;
use crate::storage::JobDir;
use backy_common::revision::RevisionMeta;
use backy_common::space::{set_usage, FilesSpace, Usage};
use backy_common::{JobName, RevisionId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a job's counted space is reused when its revisions stay.
pub const MAX_AGE: Duration = Duration::from_secs(3600);

/// One job's space, as counted for one set of revisions.
#[derive(Debug)]
pub struct JobSpace {
    /// The revisions counted, oldest first.
    counted: Vec<RevisionId>,
    at: Instant,
    /// Per revision; absent when the filesystem cannot tell.
    pub revisions: HashMap<RevisionId, Usage>,
    /// The job (`btrfs filesystem du -s` of its revisions); `None` when
    /// any revision's space is unknown.
    pub job: Option<Usage>,
}

#[derive(Default)]
pub struct SpaceCache {
    jobs: Mutex<HashMap<JobName, Arc<JobSpace>>>,
}

impl SpaceCache {
    /// The space of `revisions` (the job's committed ones), counted now if
    /// not cached for them.
    pub fn get(&self, job: &JobDir, revisions: &[RevisionMeta]) -> Arc<JobSpace> {
        let ids: Vec<RevisionId> = revisions.iter().map(|r| r.id).collect();
        if let Some(s) = self.lock().get(job.name()) {
            if s.counted == ids && s.at.elapsed() < MAX_AGE {
                return s.clone();
            }
        }
        let space = Arc::new(count(job, ids));
        self.lock().insert(job.name().clone(), space.clone());
        space
    }

    /// Forgets jobs no longer configured.
    pub fn retain(&self, keep: impl Fn(&JobName) -> bool) {
        self.lock().retain(|name, _| keep(name));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobName, Arc<JobSpace>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Maps every revision of the job. A revision that cannot be mapped (its
/// files went with a deletion meanwhile, an I/O error) leaves its own and
/// the job's space unknown this time, and is logged.
fn count(job: &JobDir, ids: Vec<RevisionId>) -> JobSpace {
    let mut files: HashMap<RevisionId, FilesSpace> = HashMap::new();
    let mut complete = true;
    for id in &ids {
        match revision_space(job, id) {
            Ok(Some(s)) => {
                files.insert(*id, s);
            }
            Ok(None) => complete = false,
            Err(e) => {
                tracing::warn!(job = %job.name(), rev = %id.short(), "space of the revision unknown: {e}");
                complete = false;
            }
        }
    }
    JobSpace {
        job: complete.then(|| set_usage(files.values())),
        revisions: files.iter().map(|(id, s)| (*id, s.usage())).collect(),
        counted: ids,
        at: Instant::now(),
    }
}
