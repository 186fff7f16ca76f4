//! Wire ⇄ domain conversions.

use crate::v1::RevisionInfo;
use backy_common::revision::{RevisionMeta, SourceInfo, Stats, StorageMode, Trust};
use backy_common::{Error, Result, RevisionId};
use chrono::{DateTime, SecondsFormat, Utc};

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl From<&RevisionMeta> for RevisionInfo {
    fn from(m: &RevisionMeta) -> Self {
        RevisionInfo {
            id: m.id.uuid().to_string(),
            short_id: m.id.short(),
            timestamp: rfc3339(&m.timestamp),
            parent_id: m.parent.map(|p| p.uuid().to_string()).unwrap_or_default(),
            size: m.size,
            block_size: m.block_size,
            tags: m.tags.iter().cloned().collect(),
            trust: m.trust.as_str().to_string(),
            source_type: m.source.kind.clone(),
            source_snapshot: m.source.snapshot.clone(),
            bytes_received: m.stats.bytes_received,
            bytes_written: m.stats.bytes_written,
            changed_blocks: m.stats.changed_blocks,
            duration_secs: m.stats.duration,
            manifest_digest: m.manifest_digest.clone(),
            storage: m.storage.as_str().to_string(),
            verified_at: m.verified_at.as_ref().map(rfc3339).unwrap_or_default(),
        }
    }
}

impl TryFrom<&RevisionInfo> for RevisionMeta {
    type Error = Error;

    fn try_from(r: &RevisionInfo) -> Result<Self> {
        let time = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| Error::invalid(format!("bad timestamp {s:?}: {e}")))
        };
        Ok(RevisionMeta {
            id: r.id.parse::<RevisionId>()?,
            timestamp: time(&r.timestamp)?,
            parent: if r.parent_id.is_empty() {
                None
            } else {
                Some(r.parent_id.parse()?)
            },
            size: r.size,
            block_size: r.block_size,
            tags: r.tags.iter().cloned().collect(),
            trust: Trust::parse(&r.trust)?,
            verified_at: if r.verified_at.is_empty() {
                None
            } else {
                Some(time(&r.verified_at)?)
            },
            source: SourceInfo {
                kind: r.source_type.clone(),
                snapshot: r.source_snapshot.clone(),
            },
            stats: Stats {
                bytes_received: r.bytes_received,
                bytes_written: r.bytes_written,
                changed_blocks: r.changed_blocks,
                duration: r.duration_secs,
            },
            manifest_digest: r.manifest_digest.clone(),
            storage: if r.storage == "copy" {
                StorageMode::Copy
            } else {
                StorageMode::Reflink
            },
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
    prost::Message::encode_to_vec(&ErrorDetail {
        kind: wire_kind(kind) as i32,
        reason: wire_reason(reason) as i32,
        retryable: kind.is_retryable(),
    })
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
            },
            stats: Stats {
                bytes_received: 1,
                bytes_written: 2,
                changed_blocks: 3,
                duration: 0.5,
            },
            manifest_digest: "00".repeat(32),
            storage: StorageMode::Copy,
        };
        let info = RevisionInfo::from(&m);
        assert_eq!(info.short_id.len(), 22);
        assert_eq!(RevisionMeta::try_from(&info).unwrap(), m);
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
        });
        assert_eq!(
            error_of_detail(&newer),
            Some((ErrorKind::Busy, Reason::Unspecified))
        );
    }
}
