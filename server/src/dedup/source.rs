//! A push's view of the blocks other revisions store (docs/DESIGN.md,
//! "Deduplication"). The digest index only names candidates: a block is
//! cloned into a new revision only after its bytes were read and their
//! digest checked, and written blocks are shared only where the kernel
//! found the bytes equal (`FIDEDUPERANGE`). A candidate that proves wrong
//! (changed, deleted) loses its index entry and the data is written.

use super::hints::Hints;
use super::index::{job_key, DigestIndex, Location};
use super::reflink::{self, DedupeOutcome};
use crate::storage::writer::BlockSource;
use crate::storage::JobDir;
use crate::work::Gate;
use backy_common::config::{DedupScope, ServerConfig};
use backy_common::manifest::{self, Digest};
use backy_common::revision::StorageMode;
use backy_common::{Error, JobName, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The stored blocks one push may use.
pub struct StoredBlocks {
    index: Arc<DigestIndex>,
    block_size: u64,
    /// Jobs whose blocks may spare the client sending one (the job's dedup
    /// scope), by index key.
    shareable: HashMap<u64, JobDir>,
    /// Every job of the store: written blocks are shared with any of them
    /// (the client learns nothing of it).
    store: HashMap<u64, JobDir>,
}

/// Whether pushes of `job` may be spared sending blocks stored elsewhere:
/// what `PlanReply.dedup` tells the client.
pub fn transfer_offered(config: &ServerConfig, mode: StorageMode, hints: &Hints, job: &JobName) -> bool {
    !posing_as_older()
        && mode == StorageMode::Reflink
        && hints.index().is_some()
        && config.dedup != DedupScope::Off
        && config.jobs.contains_key(job)
}

/// Tests: the server poses as one from before deduplication, to make the
/// stores `backy-server dedup` is for.
fn posing_as_older() -> bool {
    backy_common::fault::mode("no-dedup")
}

impl StoredBlocks {
    /// For a push of `job` into the store at `base`; `None` where nothing
    /// can be shared (no reflinks, no index yet).
    pub fn for_push(
        config: &ServerConfig,
        mode: StorageMode,
        hints: &Hints,
        job: &JobName,
        block_size: u32,
    ) -> Option<Self> {
        if mode != StorageMode::Reflink || config.dedup == DedupScope::Off || posing_as_older() {
            return None;
        }
        let index = hints.index()?.clone();
        let base: &Path = &config.base_dir;
        let owner = config.jobs.get(job).map(|j| j.client.clone());
        let mut shareable = HashMap::new();
        let mut store = HashMap::new();
        for (name, cfg) in &config.jobs {
            let dir = JobDir::new(base, name.clone());
            let key = job_key(name.as_str());
            let share = match config.dedup {
                DedupScope::Client => owner.as_ref() == Some(&cfg.client),
                DedupScope::Host => true,
                DedupScope::Off => false,
            };
            if share {
                shareable.insert(key, dir.clone());
            }
            store.insert(key, dir);
        }
        Some(StoredBlocks {
            index,
            block_size: u64::from(block_size),
            shareable,
            store,
        })
    }

    /// The candidate the index names for `digest` among `jobs`, opened.
    fn candidate(
        &self,
        digest: &Digest,
        jobs: &HashMap<u64, JobDir>,
    ) -> Result<Option<(Location, File, u64)>> {
        let Some(loc) = self.index.lookup(digest)? else {
            return Ok(None);
        };
        let Some(job) = jobs.get(&loc.job_key) else {
            return Ok(None);
        };
        let Some(offset) = loc.block.checked_mul(self.block_size) else {
            self.forget(digest, &loc);
            return Ok(None);
        };
        // A revision deleted since: its entry is stale.
        match File::open(job.image_path(&loc.rev)) {
            Ok(file) => Ok(Some((loc, file, offset))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(digest, &loc);
                Ok(None)
            }
            Err(e) => Err(Error::io(
                format!("opening revision {} of a stored block", loc.rev),
                e,
            )),
        }
    }

    /// Drops an entry that proved wrong (logged: a failure only leaves a
    /// stale hint, which the next user checks again).
    fn forget(&self, digest: &Digest, loc: &Location) {
        if let Err(e) = self.index.replace(digest, loc, None) {
            tracing::warn!("dropping a stale digest index entry: {e}");
        }
    }
}

impl BlockSource for StoredBlocks {
    fn dedupe(&self, digest: &Digest, dst: &File, offset: u64, len: u64, gate: &Gate) -> Result<u64> {
        let Some((loc, src, src_offset)) = self.candidate(digest, &self.store)? else {
            return Ok(0);
        };
        let _slot = gate.slot()?;
        match reflink::dedupe_range(&src, src_offset, len, dst, offset)? {
            DedupeOutcome::Deduped(n) => Ok(n),
            DedupeOutcome::Differs => {
                self.forget(digest, &loc);
                Ok(0)
            }
            DedupeOutcome::Unsupported => Ok(0),
        }
    }

    fn clone_held(&self, digest: &Digest, dst: &File, offset: u64, len: u64, gate: &Gate) -> Result<bool> {
        let Some((loc, src, src_offset)) = self.candidate(digest, &self.shareable)? else {
            return Ok(false);
        };
        let _slot = gate.slot()?;
        // Read from the descriptor that is then cloned: committed images
        // are never written again, so the bytes checked are the bytes
        // shared, even if the revision is deleted meanwhile.
        let mut buf = vec![0u8; len as usize];
        let read = src.read_exact_at(&mut buf, src_offset);
        if read.is_err() || manifest::digest(&buf) != *digest {
            self.forget(digest, &loc);
            return Ok(false);
        }
        match reflink::clone_range(&src, src_offset, len, dst, offset) {
            Ok(()) => Ok(true),
            // Unaligned (a short last block) or no reflinks here after all:
            // the client sends it.
            Err(e) if reflink::unsupported(&e) => Ok(false),
            Err(e) => Err(Error::io("cloning a stored block into the new revision", e)),
        }
    }
}
