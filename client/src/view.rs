//! JSON views of what the server reports, for `--json`: stable snake_case
//! keys, `null` where the wire has an empty string for "none".

use backy_common::units::format_bytes;
use backy_proto::prost_types::Timestamp;
use backy_proto::{RevisionInfo, SourceKind, Space, StorageMode, StoreSpace, Trust};
use serde::Serialize;

/// RFC 3339 (UTC, whole seconds) of a wire time; `None` when absent.
pub fn rfc3339(t: &Option<Timestamp>) -> Option<String> {
    t.as_ref()
        .and_then(backy_proto::datetime)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// The name `.rev` files and `--json` use for a trust state.
pub fn trust_name(trust: i32) -> &'static str {
    match Trust::try_from(trust) {
        Ok(Trust::Trusted) => "trusted",
        Ok(Trust::Distrusted) => "distrusted",
        Ok(Trust::Verified) => "verified",
        Ok(Trust::Unspecified) | Err(_) => "unknown",
    }
}

/// Whether a revision is distrusted.
pub fn distrusted(r: &RevisionInfo) -> bool {
    r.trust() == Trust::Distrusted
}

/// The name of a storage mode.
pub fn storage_name(mode: i32) -> &'static str {
    match StorageMode::try_from(mode) {
        Ok(StorageMode::Reflink) => "reflink",
        Ok(StorageMode::Copy) => "copy",
        Ok(StorageMode::Unspecified) | Err(_) => "unknown",
    }
}

/// The name of a source kind, as `client.yaml` writes its `type`.
pub fn source_name(kind: i32) -> &'static str {
    backy_proto::source_kind_name(SourceKind::try_from(kind).unwrap_or(SourceKind::Unspecified))
}

/// A revision id as backy shows it everywhere (text, JSON, file names,
/// specs): the 22-character form, whichever form the wire carried.
pub fn revision_id(wire: &str) -> String {
    wire.parse::<backy_common::id::RevisionId>()
        .map(|id| id.short())
        .unwrap_or_else(|_| wire.to_string())
}

/// One revision as `--json` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RevisionView {
    pub id: String,
    pub timestamp: String,
    pub parent_id: Option<String>,
    pub size: u64,
    pub block_size: u32,
    pub tags: Vec<String>,
    pub trust: String,
    pub source_type: String,
    pub source_snapshot: Option<String>,
    /// The group push it was taken in (one disk of a VM's instant).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupView>,
    pub bytes_received: u64,
    pub bytes_written: u64,
    pub changed_blocks: u64,
    /// Bytes shared with other stored revisions instead of received or
    /// written (deduplication).
    pub bytes_deduplicated: u64,
    pub duration_secs: f64,
    pub manifest_digest: String,
    pub storage: String,
    pub verified_at: Option<String>,
    /// Until when the server refuses to delete it (retention lock).
    pub locked_until: Option<String>,
    /// Hex key check value of the key it was encrypted with on the client
    /// (docs/encryption.md); `null`: stored in the clear.
    pub key_check: Option<String>,
    /// What its files take on disk (`status` only); `null` when the server
    /// did not count it.
    pub space: Option<SpaceView>,
    /// The audit of the change tracker its push relied on; absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<backy_common::tracker_audit::AuditOutcome>,
}

/// The group push a revision was taken in: every disk's revision of the
/// instant carries the same `name` and `instant`; `disks` of them make it
/// complete.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GroupView {
    pub name: String,
    pub instant: String,
    pub disks: u32,
}

impl From<&backy_proto::GroupInstant> for GroupView {
    fn from(g: &backy_proto::GroupInstant) -> Self {
        GroupView {
            name: g.name.clone(),
            instant: g.instant.clone(),
            disks: g.disks,
        }
    }
}

impl GroupView {
    /// `group vm1, instant 5Hq…, 2 disks`, as `status` shows it.
    pub fn line(&self) -> String {
        format!(
            "group {}, instant {}, {}",
            self.name,
            self.instant,
            backy_common::units::count(u64::from(self.disks), "disk")
        )
    }
}

/// Disk space as `btrfs filesystem du` counts it (docs/json.md).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SpaceView {
    pub total_bytes: u64,
    pub exclusive_bytes: u64,
    pub shared_bytes: u64,
    /// exclusive + shared: what the files really take.
    pub used_bytes: u64,
    /// Bytes on disk after compression; absent when nothing is compressed
    /// or the filesystem cannot tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

impl From<&Space> for SpaceView {
    fn from(s: &Space) -> Self {
        SpaceView {
            total_bytes: s.total_bytes,
            exclusive_bytes: s.exclusive_bytes,
            shared_bytes: s.shared_bytes,
            used_bytes: used_bytes(s),
            disk_bytes: (s.disk_bytes > 0).then_some(s.disk_bytes),
        }
    }
}

/// What a job's or revision's files really take: exclusive + shared.
pub fn used_bytes(s: &Space) -> u64 {
    s.exclusive_bytes.saturating_add(s.shared_bytes)
}

/// The store's filesystem (`df`).
#[derive(Debug, Serialize, PartialEq)]
pub struct StoreView {
    pub size_bytes: u64,
    pub used_bytes: u64,
}

impl From<&StoreSpace> for StoreView {
    fn from(s: &StoreSpace) -> Self {
        StoreView {
            size_bytes: s.size_bytes,
            used_bytes: s.used_bytes,
        }
    }
}

/// `store: 1.20 GiB of 2.00 GiB used (the filesystem)`.
pub fn store_line(s: &StoreSpace) -> String {
    format!(
        "store: {} of {} used (the whole filesystem)\n",
        format_bytes(s.used_bytes),
        format_bytes(s.size_bytes)
    )
}

/// `None` for the wire's empty string.
pub fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl From<&RevisionInfo> for RevisionView {
    fn from(r: &RevisionInfo) -> Self {
        RevisionView {
            id: short_id(r).to_string(),
            timestamp: rfc3339(&r.timestamp).unwrap_or_default(),
            parent_id: non_empty(&r.parent_id).map(|p| revision_id(&p)),
            size: r.size,
            block_size: r.block_size,
            tags: r.tags.clone(),
            trust: trust_name(r.trust).to_string(),
            source_type: source_name(r.source_kind).to_string(),
            source_snapshot: non_empty(&r.source_snapshot),
            group: r.group.as_ref().map(GroupView::from),
            bytes_received: r.bytes_received,
            bytes_written: r.bytes_written,
            changed_blocks: r.changed_blocks,
            bytes_deduplicated: r.bytes_deduplicated,
            duration_secs: r.duration_secs,
            manifest_digest: r.manifest_digest.clone(),
            storage: storage_name(r.storage).to_string(),
            verified_at: rfc3339(&r.verified_at),
            locked_until: rfc3339(&r.locked_until),
            key_check: (!r.key_check.is_empty()).then(|| hex::encode(&r.key_check)),
            space: r.space.as_ref().map(SpaceView::from),
            audit: r.audit.as_ref().map(backy_proto::model_audit),
        }
    }
}

/// The warning a job's newest revision carries when the audit of the
/// change tracker its push relied on caught missed writes.
pub fn audit_warning(newest: Option<&RevisionInfo>) -> Option<String> {
    let r = newest?;
    backy_proto::model_audit(r.audit.as_ref()?).warning(&short_id(r))
}

/// The revision's id as shown: the server's short form, else the wire id
/// converted.
pub fn short_id(r: &RevisionInfo) -> std::borrow::Cow<'_, str> {
    if r.short_id.is_empty() {
        revision_id(&r.id).into()
    } else {
        r.short_id.as_str().into()
    }
}
