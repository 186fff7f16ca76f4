//! Deduplication across revisions and jobs by reflink (docs/DESIGN.md,
//! "Deduplication"): the digest index of stored blocks, the ioctls, and
//! what pushes and `backy-server dedup` do with them.

pub mod hints;
pub mod index;
pub mod reflink;
pub mod source;

use crate::state::Server;
use backy_common::revision::StorageMode;
use std::sync::Arc;

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
    server.jobs.hints.attach(index);
    if rebuild {
        std::thread::spawn(move || {
            tracing::info!("digest index: rebuilding from the stored manifests");
            match index::rebuild(&base) {
                Ok(stats) => tracing::info!("digest index rebuilt: {stats:?}"),
                Err(e) => tracing::warn!("rebuilding the digest index: {e}"),
            }
        });
    }
}
