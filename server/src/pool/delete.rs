//! Deleting revisions from the pool and removing orphans, under the lease.
//! As on a filesystem store, a deletion is journaled first (the
//! `deleting` entry: from then on the revisions are not listed), then
//! their snapshots and manifest pieces go, then their records and the
//! journal in one write op. A crash in between is finished by the next
//! [`PoolStore::finish_deletions`].

use super::error::{PoolError, Result};
use super::names::{self, DELETING_KEY};
use super::parts;
use super::store::PoolStore;
use crate::ceph::{Image, LeaseKeeper, WriteOp};
use backy_common::{JobName, RevisionId};
use std::time::Instant;

impl PoolStore {
    /// The job's image opened for snapshot changes, if there is one.
    fn head(&self, job: &JobName) -> Result<Option<Image>> {
        match Image::open(self.io(), names::image_name(job)) {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes revisions `ids` of `job`, all or none: each must be
    /// committed and its snapshot unprotected ([`PoolError::Protected`]
    /// otherwise, nothing changed); then journaled and removed.
    pub fn delete(&self, keeper: &mut LeaseKeeper, job: &JobName, ids: &[RevisionId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let revisions = self.revisions(job)?;
        for id in ids {
            if !revisions.iter().any(|r| r.id == *id) {
                return Err(PoolError::NoRevision {
                    job: job.clone(),
                    id: *id,
                });
            }
        }
        if let Some(head) = self.head(job)? {
            let now = chrono::Utc::now();
            for id in ids {
                // backy protects the snapshot of a revision under its
                // retention lock; once the lock has passed it may go.
                let lock_passed = revisions
                    .iter()
                    .find(|r| r.id == *id)
                    .is_some_and(|r| r.locked_until.is_some() && r.locked_at(now).is_none());
                match head.snap_is_protected(&names::snapshot_name(id)) {
                    Ok(true) if lock_passed => head.snap_unprotect(&names::snapshot_name(id))?,
                    Ok(true) => {
                        return Err(PoolError::Protected {
                            job: job.clone(),
                            id: *id,
                        })
                    }
                    Ok(false) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.journal_deletions(keeper, job, ids)?;
        self.finish_deletions(keeper, job)
    }

    /// Protects revision `id`'s snapshot (`rbd snap protect`: it cannot be
    /// removed until unprotected): a revision under its retention lock.
    /// Protected already is fine.
    pub fn protect(&self, job: &JobName, id: &RevisionId) -> Result<()> {
        let Some(head) = self.head(job)? else {
            return Err(PoolError::NoRevision {
                job: job.clone(),
                id: *id,
            });
        };
        let snap = names::snapshot_name(id);
        if head.snap_is_protected(&snap)? {
            return Ok(());
        }
        Ok(head.snap_protect(&snap)?)
    }

    /// The commit point of a deletion: `ids` join the `deleting` entry
    /// (under the lease). From here on they are not listed.
    pub fn journal_deletions(
        &self,
        keeper: &mut LeaseKeeper,
        job: &JobName,
        ids: &[RevisionId],
    ) -> Result<()> {
        let mut all = self.deleting(job)?;
        for id in ids {
            if !all.contains(id) {
                all.push(*id);
            }
        }
        let value = names::encode_deleting(&all);
        keeper.commit_if_holder(WriteOp::new().omap_set(&[(DELETING_KEY, value.as_slice())]))?;
        Ok(())
    }

    /// Removes the snapshots, manifest pieces and records of the journaled
    /// deletions, then the journal. A snapshot that cannot go (protected:
    /// EBUSY) keeps its revision journaled (unlisted) and is the error
    /// returned; the others complete.
    pub fn finish_deletions(&self, keeper: &mut LeaseKeeper, job: &JobName) -> Result<()> {
        let ids = self.deleting(job)?;
        if ids.is_empty() {
            return Ok(());
        }
        keeper.may_write_at(Instant::now())?;
        let head = self.head(job)?;
        let mut first: Option<PoolError> = None;
        let mut done = Vec::new();
        for id in &ids {
            let removed = match &head {
                Some(h) => match h.snap_remove(&names::snapshot_name(id)) {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_not_found() => Ok(()),
                    Err(e) if e.is_busy() => Err(PoolError::Protected {
                        job: job.clone(),
                        id: *id,
                    }),
                    Err(e) => Err(e.into()),
                },
                None => Ok(()),
            };
            match removed.and_then(|()| parts::remove_manifest(self.io(), job, id)) {
                Ok(_) => done.push(*id),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        let left: Vec<RevisionId> = ids.iter().filter(|id| !done.contains(id)).copied().collect();
        let keys: Vec<String> = done.iter().map(names::record_key).collect();
        let mut op = WriteOp::new().omap_rm_keys(&keys.iter().map(String::as_str).collect::<Vec<_>>());
        op = if left.is_empty() {
            op.omap_rm_keys(&[DELETING_KEY])
        } else {
            op.omap_set(&[(DELETING_KEY, names::encode_deleting(&left).as_slice())])
        };
        keeper.commit_if_holder(op)?;
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Removes snapshots without a record (a push whose commit died after
    /// `rbd import-diff`, or was refused by the lease) and their manifest
    /// pieces, except those of `keep` (running pushes). Only snapshots
    /// named as revision ids are looked at. Returns the ids removed.
    pub fn clean_orphans(
        &self,
        keeper: &mut LeaseKeeper,
        job: &JobName,
        keep: &[RevisionId],
    ) -> Result<Vec<RevisionId>> {
        keeper.may_write_at(Instant::now())?;
        let Some(head) = self.head(job)? else {
            return Ok(Vec::new());
        };
        let recorded: Vec<RevisionId> = self.all_records(job)?.iter().map(|m| m.id).collect();
        let deleting = self.deleting(job)?;
        let mut removed = Vec::new();
        for snap in head.snapshots()? {
            let Ok(id) = RevisionId::from_short(&snap.name) else {
                continue;
            };
            if recorded.contains(&id) || deleting.contains(&id) || keep.contains(&id) {
                continue;
            }
            // Checked again right before: a commit may not come between
            // (the caller holds the lease and runs no push of this job).
            keeper.may_write_at(Instant::now())?;
            match head.snap_remove(&snap.name) {
                Ok(()) => {}
                Err(e) if e.is_busy() => return Err(PoolError::Protected { job: job.clone(), id }),
                Err(e) => return Err(e.into()),
            }
            parts::remove_manifest(self.io(), job, &id)?;
            tracing::info!(job = %job, rev = %id, "removed an orphaned snapshot");
            removed.push(id);
        }
        Ok(removed)
    }
}
