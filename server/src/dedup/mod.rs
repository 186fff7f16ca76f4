//! Deduplication across revisions and jobs by reflink (docs/DESIGN.md,
//! "Deduplication"): the digest index of stored blocks (`index`), the
//! ioctls that share a range of one file with another (`reflink`), keeping
//! the index current (`hints`), the stored blocks a push may use
//! (`source`), and the walk over a store that shares what is stored twice
//! (`store`, `backy-server dedup`). Above `storage` (it reads job
//! directories and manifests), below `job`, except `attach`, which the
//! server calls at start.

pub mod hints;
pub mod index;
pub mod reflink;
pub mod source;
pub mod store;

use crate::state::Server;
use crate::storage::JobDir;
use backy_common::revision::StorageMode;
use backy_common::{Error, JobName, Result};
use std::path::Path;
use std::sync::Arc;

/// Below the index's directory: per job, the revisions `backy-server
/// dedup` has walked.
pub const DIR_DONE: &str = "done";

/// Every job directory below `store` (directories named like a job; the
/// store's own entries start with a dot), sorted by name.
pub fn job_dirs(store: &Path) -> Result<Vec<JobDir>> {
    let entries = match std::fs::read_dir(store) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", store.display()), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("listing {}", store.display()), e))?;
        let Some(name) = entry.file_name().to_str().and_then(|n| JobName::new(n).ok()) else {
            continue;
        };
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().map(|n| JobDir::new(store, n)).collect())
}

/// Opens the store's digest index for the server's pushes and commits
/// (on a filesystem that shares extents: elsewhere nothing can be shared),
/// and rebuilds it in the background when it is missing or unreadable:
/// until then pushes are simply not deduplicated.
pub fn attach(server: &Arc<Server>) {
    if server.storage_mode != StorageMode::Reflink {
        return;
    }
    let base = server.config().base_dir.clone();
    let index = match index::DigestIndex::open(&base) {
        Ok(index) => Arc::new(index),
        Err(e) => {
            tracing::warn!("digest index: {e}; pushes are not deduplicated");
            return;
        }
    };
    let rebuild = index.needs_rebuild();
    // A store without revisions is indexed at once (nothing to read): a
    // rebuild running beside the first pushes would drop their entries.
    let empty = job_dirs(&base).is_ok_and(|jobs| {
        jobs.iter()
            .all(|j| j.revisions().is_ok_and(|revs| revs.is_empty()))
    });
    if rebuild && empty {
        if let Err(e) = index::rebuild(&base) {
            tracing::warn!("starting the digest index: {e}; pushes are not deduplicated");
            return;
        }
    }
    server.jobs.hints.attach(index);
    if rebuild && !empty {
        std::thread::spawn(move || {
            tracing::info!("digest index: rebuilding from the stored manifests");
            match index::rebuild(&base) {
                Ok(stats) => tracing::info!("digest index rebuilt: {stats:?}"),
                Err(e) => tracing::warn!("rebuilding the digest index: {e}"),
            }
        });
    }
}
