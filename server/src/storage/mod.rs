//! Revision storage on the server's filesystem (docs/DESIGN.md, "Storage").
//! Knows nothing of gRPC: the service decodes and validates requests and
//! calls in here.

pub mod clone;
pub mod durable;
pub mod jobdir;
pub mod lock;
pub mod ondisk;
pub mod resume;
pub mod space;
pub mod streamed;
pub mod writer;

pub use jobdir::JobDir;
pub use writer::{NewRevision, NewRevisionSpec, PushEnd, Sealed};

use backy_common::revision::StorageMode;
use backy_common::Result;
use std::path::Path;

/// Finds out once whether `base` can share extents, by cloning a scratch
/// file, so `status` can say "copy, not CoW" before the first push.
pub fn probe_storage(base: &Path) -> Result<StorageMode> {
    durable::create_dir(base)?;
    let a_path = base.join(format!(".tmp.probe.{}", uuid::Uuid::new_v4().simple()));
    let b_path = base.join(format!(".tmp.probe.{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let a = durable::create_new(&a_path)?;
        std::os::unix::fs::FileExt::write_all_at(&a, &[1u8; 4096], 0)
            .map_err(|e| backy_common::Error::io("writing probe file", e))?;
        let b = durable::create_new(&b_path)?;
        clone::clone_or_copy(&a, &b)
    })();
    let _ = std::fs::remove_file(&a_path);
    let _ = std::fs::remove_file(&b_path);
    result
}
