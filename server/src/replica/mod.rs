//! Pull replication (docs/DESIGN.md, "Replication"). On a replica: the
//! worker that copies a source's revisions, and what `status` says of the
//! copies. On a source: the record of what each replica fetched.

mod copy;
pub mod fetched;
mod round;
pub mod state;

pub use fetched::FetchLog;
pub use round::spawn;
pub use state::Replication;

use backy_common::{Error, Result};
use std::path::Path;

/// A small YAML record under the base dir, or its default when absent or
/// unreadable (these files are reports and history, not backups: losing
/// one must not stop the server).
fn load_yaml<T: serde::de::DeserializeOwned + Default>(path: &Path) -> T {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            serde_yaml::from_str(&t)
                .map_err(|e| tracing::warn!("{}: {e}; starting afresh", path.display()))
                .ok()
        })
        .unwrap_or_default()
}

/// Writes such a record durably (temp file, fsync, rename).
fn save_yaml<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_yaml::to_string(value)
        .map_err(|e| Error::internal(format!("encoding {}: {e}", path.display())))?;
    crate::storage::durable::write_atomic(path, text.as_bytes())
}
