//! What pull replication remembers (docs/DESIGN.md, "Replication"): on a
//! replica, the jobs it copies and how they stand; on a source, what each
//! replica fetched. Small YAML records under the base dir, read by status;
//! the worker that copies is [`crate::replica`].

pub mod fetched;
pub mod jobs;

pub use fetched::FetchLog;
pub use jobs::Replication;

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
