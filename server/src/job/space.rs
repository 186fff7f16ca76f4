//! The space of each job's revisions, cached (docs/DESIGN.md, "Space").
//!
//! FIEMAP of every image on every status call or scrape would read the
//! extent trees of the whole store each time. A revision's files do not
//! change once committed, but whether an extent is shared does: a new
//! clone shares its parent's extents, a deletion leaves others exclusive.
//! So the cache is per job, fresh while the job's committed revisions are
//! the same ones and for at most [`MAX_AGE`] (outside changes: a
//! deduplication or a snapshot of the filesystem). `status JOB` counts a
//! stale job at once ([`SpaceCache::get`]: one job's work, for the one who
//! asked); summaries of every job and scrapes take the last count at once
//! and queue stale jobs for one background thread ([`SpaceCache::last`]),
//! so they never wait for the extent trees of a whole store.

use super::Index;
use crate::storage::ondisk::{on_btrfs, revision_on_disk};
use crate::storage::space::revision_space;
use crate::storage::JobDir;
use backy_common::ondisk::{set_bytes, OnDisk};
use backy_common::revision::RevisionMeta;
use backy_common::space::{set_usage, FilesSpace, Usage};
use backy_common::{JobName, RevisionId};
use std::collections::{HashMap, HashSet, VecDeque};
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
    /// Bytes on disk after compression, per revision: only those with
    /// compressed data, and only where the filesystem tells.
    pub revisions_on_disk: HashMap<RevisionId, u64>,
    /// The job's, each extent once; `None` when nothing is compressed or
    /// any revision's is unknown.
    pub job_on_disk: Option<u64>,
}

impl JobSpace {
    fn fresh_for(&self, ids: &[RevisionId]) -> bool {
        self.counted == ids && self.at.elapsed() < MAX_AGE
    }
}

#[derive(Default)]
struct State {
    jobs: HashMap<JobName, Arc<JobSpace>>,
    /// Jobs the background thread counts next, and their names (no job
    /// twice).
    queue: VecDeque<JobDir>,
    queued: HashSet<JobName>,
    /// Whether the background thread runs (it ends when the queue is empty).
    counting: bool,
}

#[derive(Default)]
pub struct SpaceCache {
    state: Arc<Mutex<State>>,
}

impl SpaceCache {
    /// The space of `revisions` (the job's committed ones), counted now if
    /// the cached count is not fresh for them.
    pub fn get(&self, job: &JobDir, revisions: &[RevisionMeta]) -> Arc<JobSpace> {
        let ids = ids(revisions);
        if let Some(s) = lock(&self.state).jobs.get(job.name()) {
            if s.fresh_for(&ids) {
                return s.clone();
            }
        }
        store(&self.state, job.name(), count(job, ids))
    }

    /// The job's last count at once, maybe of older revisions (`None`
    /// before the first); a stale or missing one is queued for the
    /// background thread.
    /// The background thread takes the revisions it counts from `index`
    /// (not from the `.rev` files: parsing 200,000 of them was half of a
    /// whole store's count).
    pub fn last(
        &self,
        job: &JobDir,
        revisions: &[RevisionMeta],
        index: &Arc<Index>,
    ) -> Option<Arc<JobSpace>> {
        let ids = ids(revisions);
        let mut st = lock(&self.state);
        let last = st.jobs.get(job.name()).cloned();
        if !last.as_ref().is_some_and(|s| s.fresh_for(&ids)) && st.queued.insert(job.name().clone()) {
            st.queue.push_back(job.clone());
            if !st.counting {
                st.counting = true;
                let state = self.state.clone();
                let index = index.clone();
                let spawned = std::thread::Builder::new()
                    .name("space".into())
                    .spawn(move || count_queued(&state, &index));
                if let Err(e) = spawned {
                    tracing::warn!("cannot start the space counter: {e}");
                    st.counting = false;
                }
            }
        }
        last
    }

    /// Forgets jobs no longer configured.
    pub fn retain(&self, keep: impl Fn(&JobName) -> bool) {
        lock(&self.state).jobs.retain(|name, _| keep(name));
    }
}

fn ids(revisions: &[RevisionMeta]) -> Vec<RevisionId> {
    revisions.iter().map(|r| r.id).collect()
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn store(state: &Mutex<State>, job: &JobName, space: JobSpace) -> Arc<JobSpace> {
    let space = Arc::new(space);
    lock(state).jobs.insert(job.clone(), space.clone());
    space
}

/// The background thread: counts queued jobs one at a time (their
/// committed revisions as they are when it gets to them), then ends.
fn count_queued(state: &Mutex<State>, index: &Index) {
    loop {
        let job = {
            let mut st = lock(state);
            match st.queue.pop_front() {
                Some(job) => job,
                None => {
                    st.counting = false;
                    return;
                }
            }
        };
        match index.get(&job) {
            Ok(entry) => {
                let ids = ids(&entry.revisions);
                let fresh = lock(state)
                    .jobs
                    .get(job.name())
                    .is_some_and(|s| s.fresh_for(&ids));
                if !fresh {
                    store(state, job.name(), count(&job, ids));
                }
            }
            Err(e) => tracing::warn!(job = %job.name(), "space not counted: {e}"),
        }
        lock(state).queued.remove(job.name());
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
    let (revisions_on_disk, job_on_disk) = count_on_disk(job, &ids);
    JobSpace {
        revisions_on_disk,
        job_on_disk,
        // Without revisions there is nothing to count (not "0 B").
        job: (complete && !ids.is_empty()).then(|| set_usage(files.values())),
        revisions: files.iter().map(|(id, s)| (*id, s.usage())).collect(),
        counted: ids,
        at: Instant::now(),
    }
}

/// The bytes on disk after compression (btrfs only; see
/// `crate::storage::ondisk`). Unknown for one revision, unknown for the job.
fn count_on_disk(job: &JobDir, ids: &[RevisionId]) -> (HashMap<RevisionId, u64>, Option<u64>) {
    // Elsewhere each file would answer "cannot tell": one look for the job.
    if !on_btrfs(job.path()) {
        return (HashMap::new(), None);
    }
    let mut sets: HashMap<RevisionId, OnDisk> = HashMap::new();
    let mut complete = true;
    for id in ids {
        match revision_on_disk(job, id) {
            Ok(Some(s)) => {
                sets.insert(*id, s);
            }
            Ok(None) => complete = false,
            Err(e) => {
                tracing::warn!(job = %job.name(), rev = %id.short(), "bytes on disk of the revision unknown: {e}");
                complete = false;
            }
        }
    }
    let job_bytes = if complete && !ids.is_empty() {
        set_bytes(sets.values())
    } else {
        None
    };
    let revisions = sets
        .iter()
        .filter_map(|(id, s)| s.bytes().map(|b| (*id, b)))
        .collect();
    (revisions, job_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_count_comes_at_once_and_the_background_refreshes_it() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobDir::new(dir.path(), JobName::new("vm1").unwrap());
        let cache = SpaceCache::default();
        let index = Arc::new(Index::default());
        assert!(cache.last(&job, &[], &index).is_none(), "nothing counted yet");
        let deadline = Instant::now() + Duration::from_secs(30);
        let counted = loop {
            if let Some(s) = cache.last(&job, &[], &index) {
                break s;
            }
            assert!(Instant::now() < deadline, "the background count never came");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(counted.job.is_none(), "no revisions, no job space");
        assert!(counted.revisions.is_empty());
        // Fresh: the same count, no new one.
        assert!(Arc::ptr_eq(&counted, &cache.get(&job, &[])));
    }
}
