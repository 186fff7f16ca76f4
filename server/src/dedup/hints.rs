//! Keeping the digest index current as revisions come and go. The index
//! is a hint (see `source.rs`): a failure here is logged, never a failed
//! commit or deletion, and costs at most a missed deduplication.

use super::index::{job_key, DigestIndex, Location};
use crate::storage::JobDir;
use backy_common::manifest::{Digest, Manifest};
use backy_common::revision::RevisionMeta;
use backy_common::RevisionId;
use std::sync::{Arc, OnceLock};

/// The store's digest index once the server attached it.
#[derive(Default)]
pub struct Hints {
    index: OnceLock<Arc<DigestIndex>>,
}

impl Hints {
    pub fn attach(&self, index: Arc<DigestIndex>) {
        let _ = self.index.set(index);
    }

    pub fn index(&self) -> Option<&Arc<DigestIndex>> {
        self.index.get()
    }

    /// A revision was published: the blocks it brought (`blocks`, see
    /// `Sealed::new_blocks`) become findable under it.
    pub fn published(&self, job: &JobDir, id: RevisionId, blocks: &[(u64, Digest)]) {
        let Some(index) = self.index() else {
            return;
        };
        let key = job_key(job.name().as_str());
        let entries: Vec<(Digest, Location)> = blocks
            .iter()
            .map(|&(block, d)| {
                (
                    d,
                    Location {
                        job_key: key,
                        rev: id,
                        block,
                    },
                )
            })
            .collect();
        if let Err(e) = index.insert(&entries) {
            tracing::warn!(job = %job.name(), rev = %id, "adding to the digest index: {e}");
        }
    }

    /// Revisions are about to be deleted (their files still there): each
    /// entry naming one moves to the nearest remaining revision of the job
    /// that holds the same block, or goes.
    pub fn deleting(&self, job: &JobDir, deleted: &[RevisionMeta], remaining: &[RevisionMeta]) {
        let Some(index) = self.index() else {
            return;
        };
        for meta in deleted {
            if let Err(e) = repoint(index, job, meta, remaining) {
                tracing::warn!(job = %job.name(), rev = %meta.id, "updating the digest index: {e}");
            }
        }
    }
}

fn repoint(
    index: &DigestIndex,
    job: &JobDir,
    gone: &RevisionMeta,
    remaining: &[RevisionMeta],
) -> backy_common::Result<()> {
    let key = job_key(job.name().as_str());
    let manifest = job.manifest(gone)?;
    // The revisions beside it in time share most of its blocks; farther
    // ones are not read (their manifests could be large): a block only
    // they hold loses its entry until the next rebuild.
    let older = remaining.iter().rev().find(|r| r.timestamp < gone.timestamp);
    let newer = remaining.iter().find(|r| r.timestamp > gone.timestamp);
    let mut near: Vec<(RevisionId, Option<Manifest>)> = Vec::new();
    for meta in newer.into_iter().chain(older) {
        near.push((meta.id, job.manifest(meta).ok()));
    }
    for block in 0..manifest.block_count() {
        let Some(d) = manifest.get(block) else {
            continue;
        };
        if manifest.is_zero(block) {
            continue;
        }
        let Some(loc) = index.lookup(d)? else {
            continue;
        };
        if loc.job_key != key || loc.rev != gone.id {
            continue;
        }
        let heir = near
            .iter()
            .find(|(_, m)| m.as_ref().and_then(|m| m.get(loc.block)) == Some(d))
            .map(|(id, _)| Location {
                job_key: key,
                rev: *id,
                block: loc.block,
            });
        index.replace(d, &loc, heir.as_ref())?;
    }
    Ok(())
}
