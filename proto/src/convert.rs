//! Wire ⇄ domain conversions.

use crate::v1::{self as wire, RevisionInfo};
use backy_common::revision::{GroupInstant, RevisionMeta, SourceInfo, Stats, StorageMode, Trust};
use backy_common::tracker_audit::AuditOutcome;
use backy_common::{Error, Result, RevisionId};
use chrono::{DateTime, Utc};

/// A time on the wire.
pub fn timestamp(t: &DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A time from the wire; `None` when out of range.
pub fn datetime(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

fn wire_trust(t: Trust) -> wire::Trust {
    match t {
        Trust::Trusted => wire::Trust::Trusted,
        Trust::Distrusted => wire::Trust::Distrusted,
        Trust::Verified => wire::Trust::Verified,
    }
}

fn model_trust(t: wire::Trust) -> Result<Trust> {
    match t {
        wire::Trust::Trusted => Ok(Trust::Trusted),
        wire::Trust::Distrusted => Ok(Trust::Distrusted),
        wire::Trust::Verified => Ok(Trust::Verified),
        wire::Trust::Unspecified => Err(Error::invalid("revision without a trust state")),
    }
}

/// A storage mode on the wire.
pub fn wire_storage(m: StorageMode) -> wire::StorageMode {
    match m {
        StorageMode::Reflink => wire::StorageMode::Reflink,
        StorageMode::Copy => wire::StorageMode::Copy,
    }
}

/// A storage mode from the wire; `None` when unspecified.
pub fn model_storage(m: wire::StorageMode) -> Option<StorageMode> {
    match m {
        wire::StorageMode::Reflink => Some(StorageMode::Reflink),
        wire::StorageMode::Copy => Some(StorageMode::Copy),
        wire::StorageMode::Unspecified => None,
    }
}

/// The wire kind of a source type as `.rev` files name it (`file`,
/// `block`, `ceph-rbd`).
pub fn source_kind(name: &str) -> wire::SourceKind {
    match name {
        "file" => wire::SourceKind::File,
        "block" => wire::SourceKind::Block,
        "ceph-rbd" => wire::SourceKind::CephRbd,
        "qemu" => wire::SourceKind::Qemu,
        _ => wire::SourceKind::Unspecified,
    }
}

/// The name `.rev` files use for a wire source kind.
pub fn source_kind_name(kind: wire::SourceKind) -> &'static str {
    match kind {
        wire::SourceKind::File => "file",
        wire::SourceKind::Block => "block",
        wire::SourceKind::CephRbd => "ceph-rbd",
        wire::SourceKind::Qemu => "qemu",
        wire::SourceKind::Unspecified => "unknown",
    }
}

/// A change tracker's audit on the wire.
pub fn wire_audit(a: &AuditOutcome) -> wire::TrackerAudit {
    wire::TrackerAudit {
        tracker: a.tracker.clone(),
        sampled: a.sampled,
        mismatched: a.mismatched,
    }
}

/// A change tracker's audit from the wire.
pub fn model_audit(a: &wire::TrackerAudit) -> AuditOutcome {
    AuditOutcome {
        tracker: a.tracker.clone(),
        sampled: a.sampled,
        mismatched: a.mismatched,
    }
}

/// A group instant as a peer sent it, checked.
pub fn group_instant(g: &wire::GroupInstant) -> Result<GroupInstant> {
    let model = GroupInstant {
        name: g.name.clone(),
        instant: g.instant.clone(),
        disks: g.disks,
    };
    model.check()?;
    Ok(model)
}

pub fn wire_group(g: &GroupInstant) -> wire::GroupInstant {
    wire::GroupInstant {
        name: g.name.clone(),
        instant: g.instant.clone(),
        disks: g.disks,
    }
}

impl From<&RevisionMeta> for RevisionInfo {
    fn from(m: &RevisionMeta) -> Self {
        RevisionInfo {
            id: m.id.uuid().to_string(),
            short_id: m.id.short(),
            timestamp: Some(timestamp(&m.timestamp)),
            parent_id: m.parent.map(|p| p.uuid().to_string()).unwrap_or_default(),
            size: m.size,
            block_size: m.block_size,
            tags: m.tags.iter().cloned().collect(),
            trust: wire_trust(m.trust) as i32,
            source_kind: source_kind(&m.source.kind) as i32,
            source_snapshot: m.source.snapshot.clone(),
            group: m.source.group.as_ref().map(wire_group),
            bytes_received: m.stats.bytes_received,
            bytes_written: m.stats.bytes_written,
            changed_blocks: m.stats.changed_blocks,
            bytes_deduplicated: m.stats.bytes_deduplicated,
            audit: m.stats.audit.as_ref().map(wire_audit),
            duration_secs: m.stats.duration,
            manifest_digest: m.manifest_digest.clone(),
            storage: wire_storage(m.storage) as i32,
            verified_at: m.verified_at.as_ref().map(timestamp),
            locked_until: m.locked_until.as_ref().map(timestamp),
            key_check: m
                .key_check
                .as_deref()
                .and_then(|k| hex::decode(k).ok())
                .unwrap_or_default(),
            // Not metadata: the server's status adds it.
            space: None,
        }
    }
}

/// A revision as the server sent it, checked: what the client works with.
impl TryFrom<&RevisionInfo> for RevisionMeta {
    type Error = Error;

    fn try_from(r: &RevisionInfo) -> Result<Self> {
        let time = |t: &Option<prost_types::Timestamp>| -> Result<Option<DateTime<Utc>>> {
            t.as_ref()
                .map(|t| {
                    datetime(t)
                        .ok_or_else(|| Error::invalid(format!("revision {}: bad time {t:?}", r.short_id)))
                })
                .transpose()
        };
        Ok(RevisionMeta {
            id: r.id.parse::<RevisionId>()?,
            timestamp: time(&r.timestamp)?
                .ok_or_else(|| Error::invalid(format!("revision {} without a time", r.short_id)))?,
            parent: if r.parent_id.is_empty() {
                None
            } else {
                Some(r.parent_id.parse()?)
            },
            size: r.size,
            block_size: r.block_size,
            tags: r.tags.iter().cloned().collect(),
            trust: model_trust(r.trust())?,
            verified_at: time(&r.verified_at)?,
            source: SourceInfo {
                kind: source_kind_name(r.source_kind()).to_string(),
                snapshot: r.source_snapshot.clone(),
                group: r.group.as_ref().map(group_instant).transpose()?,
            },
            stats: Stats {
                bytes_received: r.bytes_received,
                bytes_written: r.bytes_written,
                changed_blocks: r.changed_blocks,
                duration: r.duration_secs,
                bytes_deduplicated: r.bytes_deduplicated,
                audit: r.audit.as_ref().map(model_audit),
            },
            manifest_digest: r.manifest_digest.clone(),
            storage: model_storage(r.storage()).unwrap_or_default(),
            locked_until: time(&r.locked_until)?,
            key_check: backy_common::encryption::parse_key_check(&r.key_check)
                .map_err(|e| e.context(format!("revision {}", r.short_id)))?
                .map(hex::encode),
        })
    }
}

use crate::v1::{ErrorDetail, ErrorKind as WireKind, ErrorReason};
use backy_common::{ErrorKind, Reason};

fn wire_kind(k: ErrorKind) -> WireKind {
    match k {
        ErrorKind::InvalidArgument => WireKind::InvalidArgument,
        ErrorKind::NotFound => WireKind::NotFound,
        ErrorKind::AlreadyExists => WireKind::AlreadyExists,
        ErrorKind::FailedPrecondition => WireKind::FailedPrecondition,
        ErrorKind::Busy => WireKind::Busy,
        ErrorKind::ResourceExhausted => WireKind::ResourceExhausted,
        ErrorKind::DataLoss => WireKind::DataLoss,
        ErrorKind::Unauthenticated => WireKind::Unauthenticated,
        ErrorKind::PermissionDenied => WireKind::PermissionDenied,
        ErrorKind::Unavailable => WireKind::Unavailable,
        ErrorKind::Internal => WireKind::Internal,
    }
}

fn model_kind(k: WireKind) -> Option<ErrorKind> {
    Some(match k {
        WireKind::Unspecified => return None,
        WireKind::InvalidArgument => ErrorKind::InvalidArgument,
        WireKind::NotFound => ErrorKind::NotFound,
        WireKind::AlreadyExists => ErrorKind::AlreadyExists,
        WireKind::FailedPrecondition => ErrorKind::FailedPrecondition,
        WireKind::Busy => ErrorKind::Busy,
        WireKind::ResourceExhausted => ErrorKind::ResourceExhausted,
        WireKind::DataLoss => ErrorKind::DataLoss,
        WireKind::Unauthenticated => ErrorKind::Unauthenticated,
        WireKind::PermissionDenied => ErrorKind::PermissionDenied,
        WireKind::Unavailable => ErrorKind::Unavailable,
        WireKind::Internal => ErrorKind::Internal,
    })
}

fn wire_reason(r: Reason) -> ErrorReason {
    match r {
        Reason::Unspecified => ErrorReason::Unspecified,
        Reason::ManifestMismatch => ErrorReason::ManifestMismatch,
        Reason::StreamChecksumMismatch => ErrorReason::StreamChecksumMismatch,
        Reason::StreamClosed => ErrorReason::StreamClosed,
        Reason::IncompatibleVersion => ErrorReason::IncompatibleVersion,
    }
}

fn model_reason(r: ErrorReason) -> Reason {
    match r {
        ErrorReason::Unspecified => Reason::Unspecified,
        ErrorReason::ManifestMismatch => Reason::ManifestMismatch,
        ErrorReason::StreamChecksumMismatch => Reason::StreamChecksumMismatch,
        ErrorReason::StreamClosed => Reason::StreamClosed,
        ErrorReason::IncompatibleVersion => Reason::IncompatibleVersion,
    }
}

/// The encoded details of an error status: kind, reason, retryable.
pub fn error_detail(kind: ErrorKind, reason: Reason) -> Vec<u8> {
    error_detail_to(kind, reason, None)
}

/// [`error_detail`] naming the server to send the request to instead.
pub fn error_detail_to(kind: ErrorKind, reason: Reason, redirect: Option<&str>) -> Vec<u8> {
    prost::Message::encode_to_vec(&ErrorDetail {
        kind: wire_kind(kind) as i32,
        reason: wire_reason(reason) as i32,
        retryable: kind.is_retryable(),
        redirect: redirect.unwrap_or_default().to_string(),
    })
}

/// The server an error status's details send the request to, if any.
pub fn redirect_of_detail(details: &[u8]) -> Option<String> {
    let d: ErrorDetail = prost::Message::decode(details).ok()?;
    (!d.redirect.is_empty()).then_some(d.redirect)
}

/// Kind and reason from an error status's details; `None` when there are
/// none (an older server, or an error made by the transport).
pub fn error_of_detail(details: &[u8]) -> Option<(ErrorKind, Reason)> {
    if details.is_empty() {
        return None;
    }
    let d: ErrorDetail = prost::Message::decode(details).ok()?;
    let kind = model_kind(WireKind::try_from(d.kind).ok()?)?;
    // A reason this build does not know is no reason it can act on.
    let reason = ErrorReason::try_from(d.reason).map_or(Reason::Unspecified, model_reason);
    Some((kind, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = RevisionMeta {
            id: RevisionId::new_random(),
            timestamp: "2026-05-10T10:00:00Z".parse().unwrap(),
            parent: Some(RevisionId::new_random()),
            size: 42,
            block_size: 4 << 20,
            tags: ["daily".to_string()].into(),
            trust: Trust::Distrusted,
            verified_at: None,
            source: SourceInfo {
                kind: "file".into(),
                snapshot: "s".into(),
                group: Some(backy_common::revision::GroupInstant {
                    name: "vm1".into(),
                    instant: "A".repeat(22),
                    disks: 2,
                }),
            },
            stats: Stats {
                bytes_received: 1,
                bytes_written: 2,
                changed_blocks: 3,
                duration: 0.5,
                bytes_deduplicated: 4,
                audit: Some(AuditOutcome {
                    tracker: "qemu-bitmap".into(),
                    sampled: 5,
                    mismatched: 1,
                }),
            },
            manifest_digest: "00".repeat(32),
            storage: StorageMode::Copy,
            locked_until: Some("2026-05-17T10:00:00Z".parse().unwrap()),
            key_check: Some("00112233445566778899aabbccddeeff".into()),
        };
        let info = RevisionInfo::from(&m);
        assert_eq!(info.short_id.len(), 22);
        assert_eq!(info.key_check.len(), 16);
        assert_eq!(RevisionMeta::try_from(&info).unwrap(), m);
        // A key check of another length is refused, none is plaintext.
        let bad = RevisionInfo {
            key_check: vec![1, 2, 3],
            ..info.clone()
        };
        assert!(RevisionMeta::try_from(&bad).is_err());
        let plain = RevisionInfo {
            key_check: Vec::new(),
            ..info
        };
        assert_eq!(RevisionMeta::try_from(&plain).unwrap().key_check, None);
    }

    #[test]
    fn error_details_round_trip_and_tolerate_the_unknown() {
        let bytes = error_detail(ErrorKind::DataLoss, Reason::ManifestMismatch);
        assert_eq!(
            error_of_detail(&bytes),
            Some((ErrorKind::DataLoss, Reason::ManifestMismatch))
        );
        assert_eq!(error_of_detail(&[]), None);
        assert_eq!(error_of_detail(&[0xff, 0xff]), None);
        // A newer server's reason this build does not know.
        let newer = prost::Message::encode_to_vec(&ErrorDetail {
            kind: WireKind::Busy as i32,
            reason: 999,
            retryable: true,
            redirect: String::new(),
        });
        assert_eq!(
            error_of_detail(&newer),
            Some((ErrorKind::Busy, Reason::Unspecified))
        );
        assert_eq!(redirect_of_detail(&newer), None);
        let to = error_detail_to(ErrorKind::Busy, Reason::Unspecified, Some("https://b:6023"));
        assert_eq!(error_of_detail(&to), Some((ErrorKind::Busy, Reason::Unspecified)));
        assert_eq!(redirect_of_detail(&to).as_deref(), Some("https://b:6023"));
        assert_eq!(redirect_of_detail(&bytes), None);
    }
}
