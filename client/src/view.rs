//! JSON views of what the server reports, for `--json`: stable snake_case
//! keys, `null` where the wire has an empty string for "none".

use backy_proto::RevisionInfo;
use serde::Serialize;

/// One revision as `--json` shows it.
#[derive(Debug, Serialize, PartialEq)]
pub struct RevisionView {
    pub id: String,
    pub short_id: String,
    pub timestamp: String,
    pub parent_id: Option<String>,
    pub size: u64,
    pub block_size: u32,
    pub tags: Vec<String>,
    pub trust: String,
    pub source_type: String,
    pub source_snapshot: Option<String>,
    pub bytes_received: u64,
    pub bytes_written: u64,
    pub changed_blocks: u64,
    pub duration_secs: f64,
    pub manifest_digest: String,
    pub storage: String,
    pub verified_at: Option<String>,
}

/// `None` for the wire's empty string.
pub fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl From<&RevisionInfo> for RevisionView {
    fn from(r: &RevisionInfo) -> Self {
        RevisionView {
            id: r.id.clone(),
            short_id: r.short_id.clone(),
            timestamp: r.timestamp.clone(),
            parent_id: non_empty(&r.parent_id),
            size: r.size,
            block_size: r.block_size,
            tags: r.tags.clone(),
            trust: r.trust.clone(),
            source_type: r.source_type.clone(),
            source_snapshot: non_empty(&r.source_snapshot),
            bytes_received: r.bytes_received,
            bytes_written: r.bytes_written,
            changed_blocks: r.changed_blocks,
            duration_secs: r.duration_secs,
            manifest_digest: r.manifest_digest.clone(),
            storage: r.storage.clone(),
            verified_at: non_empty(&r.verified_at),
        }
    }
}

/// The short id when the server sent one, else the full id.
pub fn short_id(r: &RevisionInfo) -> &str {
    if r.short_id.is_empty() {
        &r.id
    } else {
        &r.short_id
    }
}
