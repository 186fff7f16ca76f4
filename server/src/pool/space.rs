//! What a job takes in the pool, as `rbd du` counts it (docs/DESIGN.md
//! "Space on a pool"): per snapshot the objects that hold data and those
//! that differ from the snapshot before it, read from the image's object
//! map (whole objects, no data read).
//!
//! A committed snapshot never changes, so its figures are kept once
//! computed, keyed by the snapshot before it (a deletion in between changes
//! what the next one adds, and so its key).

use super::error::Result;
use super::names;
use super::store::PoolStore;
use crate::ceph::{DiffExtent, Image};
use backy_common::{JobName, RevisionId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// One revision's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSpace {
    /// Bytes of the objects that hold data in the snapshot (`rbd du`'s
    /// provisioned-and-written: what reading it back finds allocated).
    pub data_bytes: u64,
    /// Bytes of the objects that differ from the snapshot before it (`rbd
    /// du`'s USED of the snapshot: what it added to the pool).
    pub added_bytes: u64,
}

/// A job's space: its revisions' and what the head holds beyond the
/// newest (writes of a push that died).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobSpace {
    pub revisions: Vec<(RevisionId, SnapshotSpace)>,
    pub head_added_bytes: u64,
}

impl JobSpace {
    /// Every revision's data, shared objects counted per revision.
    pub fn total_bytes(&self) -> u64 {
        self.revisions.iter().map(|(_, s)| s.data_bytes).sum()
    }

    /// What the job takes in the pool (before replication): each object
    /// once, in the snapshot that added it, and the head's own.
    pub fn used_bytes(&self) -> u64 {
        self.revisions.iter().map(|(_, s)| s.added_bytes).sum::<u64>() + self.head_added_bytes
    }
}

type Key = (JobName, RevisionId, Option<RevisionId>);

/// Figures of committed snapshots, shared by every clone of a store.
#[derive(Debug, Clone, Default)]
pub(super) struct SpaceCache(Arc<Mutex<HashMap<Key, SnapshotSpace>>>);

impl SpaceCache {
    fn get(&self, key: &Key) -> Option<SnapshotSpace> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    fn put(&self, key: Key, space: SnapshotSpace) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, space);
    }

    /// Forgets the figures of `job`'s snapshots not in `ids` (deleted).
    fn keep_only(&self, job: &JobName, ids: &[RevisionId]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(j, id, _), _| j != job || ids.contains(id));
    }
}

fn data_of(extents: &[DiffExtent]) -> u64 {
    extents.iter().filter(|e| e.exists).map(|e| e.len).sum()
}

impl PoolStore {
    /// The space of `job`'s revisions `ids` (oldest first, as listed) and
    /// of its head. A job without an image takes nothing.
    pub fn space(&self, job: &JobName, ids: &[RevisionId]) -> Result<JobSpace> {
        self.space_cache().keep_only(job, ids);
        let mut out = JobSpace::default();
        let mut prev: Option<&RevisionId> = None;
        for id in ids {
            let key = (job.clone(), *id, prev.copied());
            let space = match self.space_cache().get(&key) {
                Some(s) => s,
                None => {
                    let image = match Image::open_read_only(
                        self.io(),
                        names::image_name(job),
                        Some(&names::snapshot_name(id)),
                    ) {
                        Ok(i) => i,
                        Err(e) if e.is_not_found() => {
                            self.space_cache().keep_only(job, &[]);
                            return Ok(JobSpace::default());
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let size = image.size()?;
                    let data = data_of(&image.diff_iterate(None, 0, size, true)?);
                    let added = match prev {
                        None => data,
                        Some(p) => {
                            data_of(&image.diff_iterate(Some(&names::snapshot_name(p)), 0, size, true)?)
                        }
                    };
                    let s = SnapshotSpace {
                        data_bytes: data,
                        added_bytes: added,
                    };
                    self.space_cache().put(key, s);
                    s
                }
            };
            out.revisions.push((*id, space));
            prev = Some(id);
        }
        // The head changes with every push: never kept.
        let head = match Image::open_read_only(self.io(), names::image_name(job), None) {
            Ok(i) => i,
            Err(e) if e.is_not_found() => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        let size = head.size()?;
        let from = prev.map(names::snapshot_name);
        out.head_added_bytes = data_of(&head.diff_iterate(from.as_deref(), 0, size, true)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_uses_what_each_snapshot_added_and_the_head() {
        let s = JobSpace {
            revisions: vec![
                (
                    RevisionId::new_random(),
                    SnapshotSpace {
                        data_bytes: 8 << 20,
                        added_bytes: 8 << 20,
                    },
                ),
                (
                    RevisionId::new_random(),
                    SnapshotSpace {
                        data_bytes: 12 << 20,
                        added_bytes: 4 << 20,
                    },
                ),
            ],
            head_added_bytes: 4 << 20,
        };
        assert_eq!(s.total_bytes(), 20 << 20);
        assert_eq!(s.used_bytes(), 16 << 20);
    }

    #[test]
    fn figures_are_kept_per_predecessor_and_dropped_with_their_snapshot() {
        let cache = SpaceCache::default();
        let job = JobName::new("vm1").expect("a valid name");
        let (a, b, c) = (
            RevisionId::new_random(),
            RevisionId::new_random(),
            RevisionId::new_random(),
        );
        let s = SnapshotSpace {
            data_bytes: 1,
            added_bytes: 1,
        };
        cache.put((job.clone(), c, Some(b)), s);
        assert_eq!(cache.get(&(job.clone(), c, Some(b))), Some(s));
        // With its predecessor deleted, what it added is computed again.
        assert_eq!(cache.get(&(job.clone(), c, Some(a))), None);
        cache.put((job.clone(), a, None), s);
        cache.keep_only(&job, std::slice::from_ref(&a));
        assert_eq!(cache.get(&(job.clone(), c, Some(b))), None);
        assert_eq!(cache.get(&(job, a, None)), Some(s));
    }
}
