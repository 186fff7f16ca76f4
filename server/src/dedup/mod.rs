//! Deduplication across jobs (docs/DESIGN.md, "Deduplication"): the
//! digest index of stored blocks (`index`) and the ioctls that share a
//! range of one file with another (`reflink`), and the walk over a store
//! that shares what is stored twice (`store`). Above `storage` (it reads
//! job directories and manifests), below `job`.

pub mod index;
pub mod reflink;
pub mod store;

use crate::storage::JobDir;
use backy_common::{Error, JobName, Result};
use std::path::Path;

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
