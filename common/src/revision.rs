//! Revision metadata: the `<rev>.rev` YAML file whose presence commits a
//! revision.

use crate::error::{Error, Result};
use crate::id::RevisionId;
use crate::spec::Spec;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// How far a revision's stored data can be relied on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    /// Written and checked at commit, not re-read since.
    #[default]
    Trusted,
    /// A verify found blocks that do not match the manifest.
    Distrusted,
    /// Re-read completely and found intact (see `verified_at`).
    Verified,
}

impl Trust {
    pub fn as_str(self) -> &'static str {
        match self {
            Trust::Trusted => "trusted",
            Trust::Distrusted => "distrusted",
            Trust::Verified => "verified",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "trusted" => Ok(Trust::Trusted),
            "distrusted" => Ok(Trust::Distrusted),
            "verified" => Ok(Trust::Verified),
            _ => Err(Error::invalid(format!("unknown trust {s:?}"))),
        }
    }

    /// Whether the revision may serve as a parent.
    pub fn usable_as_parent(self) -> bool {
        self != Trust::Distrusted
    }
}

/// How the revision's image file shares data with its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// A reflink clone: unchanged extents are shared.
    #[default]
    Reflink,
    /// A sparse copy: the filesystem cannot share extents.
    Copy,
}

impl StorageMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageMode::Reflink => "reflink",
            StorageMode::Copy => "copy",
        }
    }
}

/// Where the revision's data came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Source type, e.g. `file`, `block`, `ceph-rbd`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Source-side snapshot name (e.g. `backy-<id>`), empty if none.
    #[serde(default)]
    pub snapshot: String,
    /// The group push it was taken in: one disk of a VM whose disks were
    /// all taken at this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupInstant>,
}

/// The group push a revision was taken in (docs/DESIGN.md, "Groups").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInstant {
    /// The group's name in the client's config.
    pub name: String,
    /// The instant's id, shared by the revisions of all its disks.
    pub instant: String,
    /// How many disks the group push took: the instant is complete when
    /// this many revisions carry it.
    pub disks: u32,
}

/// Most disks one group push takes.
pub const MAX_GROUP_DISKS: u32 = 64;

impl GroupInstant {
    /// As a peer sends it (a push's begin frame, a replication source's
    /// listing): a job name's form for the group, an id's for the instant.
    pub fn check(&self) -> Result<()> {
        crate::JobName::new(&self.name).map_err(|e| e.context("group name"))?;
        if crate::id::RevisionId::from_short(&self.instant).is_err() {
            return Err(Error::invalid(format!(
                "group instant {:?} is not an id (22 base-58 characters)",
                self.instant
            )));
        }
        if self.disks == 0 || self.disks > MAX_GROUP_DISKS {
            return Err(Error::invalid(format!(
                "a group push of {} disks (1 to {MAX_GROUP_DISKS})",
                self.disks
            )));
        }
        Ok(())
    }
}

/// Counters of the push that made the revision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Payload bytes received (data ranges).
    pub bytes_received: u64,
    /// Bytes written into the image file.
    pub bytes_written: u64,
    /// Blocks whose digest changed relative to the parent.
    pub changed_blocks: u64,
    /// Wall time of the push, seconds.
    pub duration: f64,
    /// Bytes of blocks stored by sharing another revision's extents
    /// (deduplicated: cloned instead of received, or shared after writing).
    #[serde(default, skip_serializing_if = "crate::revision::is_zero")]
    pub bytes_deduplicated: u64,
    /// The audit of the change tracker the push relied on (issue 34);
    /// absent when it relied on none, or the audit was off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::tracker_audit::AuditOutcome>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The contents of a `.rev` file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevisionMeta {
    pub id: RevisionId,
    pub timestamp: DateTime<Utc>,
    #[serde(default)]
    pub parent: Option<RevisionId>,
    pub size: u64,
    pub block_size: u32,
    #[serde(default)]
    pub tags: BTreeSet<String>,
    #[serde(default)]
    pub trust: Trust,
    #[serde(default)]
    pub verified_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub source: SourceInfo,
    #[serde(default)]
    pub stats: Stats,
    /// Hex BLAKE3 of the `.digests` file.
    pub manifest_digest: String,
    #[serde(default)]
    pub storage: StorageMode,
    /// Until when no deletion may remove it (docs/DESIGN.md, "Retention
    /// lock"): its timestamp plus the job's `retention-lock` when it was
    /// committed here. Absent (older revisions, no lock): unlocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<DateTime<Utc>>,
    /// Hex key check value of the key its image was encrypted with on the
    /// client (docs/encryption.md); absent: stored in the clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_check: Option<String>,
}

impl RevisionMeta {
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml::to_string(self).map_err(|e| Error::internal(format!("encoding revision: {e}")))
    }

    /// Until when the revision is locked, if it still is at `now`.
    pub fn locked_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.locked_until.filter(|until| *until > now)
    }

    /// Parses a `.rev` file; `what` names it in errors. A file in the
    /// form [`RevisionMeta::to_yaml`] writes is read the fast way (checked
    /// to give the same: `crate::revision_fast`), anything else by the
    /// YAML parser.
    pub fn from_yaml(text: &str, what: &str) -> Result<Self> {
        if let Some(meta) = crate::revision_fast::parse(text) {
            return Ok(meta);
        }
        Self::from_yaml_full(text, what)
    }

    /// [`RevisionMeta::from_yaml`] by the YAML parser alone.
    pub fn from_yaml_full(text: &str, what: &str) -> Result<Self> {
        serde_yaml::from_str(text)
            .map_err(|e| Error::data_loss(format!("{what}: bad revision metadata: {e}")))
    }
}

/// Checks a new tag: its form ([`check_tag_format`]), and that a revision
/// spec reads it as a tag (docs/DESIGN.md, "Revision specs"): `all`,
/// `latest`, `last`, numbers of up to 9 digits and full ids mean something
/// else there, so `forget -r 1` would never reach a tag `1`. Exactly the
/// words [`Spec::parse`] reads as [`Spec::Word`] pass. `manual:` tags are
/// the operator's and never expire.
pub fn check_tag(tag: &str) -> Result<()> {
    check_tag_format(tag)?;
    let read_as = match Spec::parse(tag) {
        Ok(Spec::Word(w)) if w == tag => return Ok(()),
        Ok(Spec::All) => "every revision".to_string(),
        Ok(Spec::Latest) => "the newest revision".to_string(),
        Ok(Spec::Nth(n)) => format!("revision number {n}"),
        Ok(Spec::Id(id)) => format!("the revision id {id}"),
        Ok(Spec::Word(_)) | Err(_) => "something else".to_string(),
    };
    Err(Error::invalid(format!(
        "tag {tag:?} cannot be used: revision specs read it as {read_as}"
    )))
}

/// The form of a tag: 1..=64 printable characters without whitespace,
/// commas or slashes. Enough for tags already stored (and copies of
/// them), which may predate [`check_tag`]'s rule.
pub fn check_tag_format(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag.bytes().all(|c| c.is_ascii_graphic() && !b",/\\".contains(&c));
    if ok {
        Ok(())
    } else {
        // Echo at most the start of what a peer sent.
        let shown: String = tag.chars().take(70).collect();
        let more = if shown.len() < tag.len() { "..." } else { "" };
        Err(Error::invalid(format!(
            "invalid tag {shown:?}{more}: 1-64 printable characters, no ',', '/' or spaces"
        )))
    }
}

/// Longest source snapshot name a revision records, in bytes.
pub const MAX_SNAPSHOT_LEN: usize = 1024;

/// A source snapshot name as a peer sends it (a push's begin frame, a
/// replication source's listing): stored in the `.rev` and shown by
/// status, so bounded and free of control characters.
pub fn check_source_snapshot(name: &str) -> Result<()> {
    if name.len() > MAX_SNAPSHOT_LEN {
        return Err(Error::invalid(format!(
            "source snapshot name longer than {MAX_SNAPSHOT_LEN} bytes ({} bytes)",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid("source snapshot name with a control character"));
    }
    Ok(())
}

pub const MANUAL_PREFIX: &str = "manual:";

pub fn is_manual_tag(tag: &str) -> bool {
    tag.starts_with(MANUAL_PREFIX)
}

/// When a retention lock of `lock` on a revision of `timestamp` ends:
/// rounded up to a whole second, as status shows times (the lock shown is
/// the lock enforced). Both stores lock a revision so at its commit.
pub fn lock_end(timestamp: DateTime<Utc>, lock: crate::units::Interval) -> Result<DateTime<Utc>> {
    let too_long = || Error::invalid(format!("retention-lock {lock} reaches past the end of time"));
    let secs = i64::try_from(lock.secs()).map_err(|_| too_long())?;
    let up = i64::from(timestamp.timestamp_subsec_nanos() > 0);
    timestamp
        .timestamp()
        .checked_add(secs)
        .and_then(|t| t.checked_add(up))
        .and_then(|t| DateTime::from_timestamp(t, 0))
        .ok_or_else(too_long)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_ends_its_interval_after_the_timestamp_rounded_up_to_a_second() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let hour = crate::units::Interval::from_secs(3600);
        assert_eq!(
            super::lock_end(at("2026-01-01T00:00:00Z"), hour).unwrap(),
            at("2026-01-01T01:00:00Z")
        );
        assert_eq!(
            super::lock_end(at("2026-01-01T00:00:00.25Z"), hour).unwrap(),
            at("2026-01-01T01:00:01Z")
        );
    }

    #[test]
    fn source_snapshot_names_are_bounded_and_printable() {
        check_source_snapshot("").unwrap();
        check_source_snapshot("backy-0d9f/rbd pool/image@snap name").unwrap();
        check_source_snapshot(&"s".repeat(MAX_SNAPSHOT_LEN)).unwrap();
        let long = check_source_snapshot(&"s".repeat(MAX_SNAPSHOT_LEN + 1)).unwrap_err();
        assert!(
            long.message.contains("longer than 1024 bytes"),
            "{}",
            long.message
        );
        for bad in ["a\nb", "a\rb", "\u{1b}[2J", "a\u{7f}", "a\u{85}b"] {
            let e = check_source_snapshot(bad).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn yaml_round_trip() {
        let meta = RevisionMeta {
            id: RevisionId::new_random(),
            timestamp: "2026-05-10T10:00:00Z".parse().unwrap(),
            parent: Some(RevisionId::new_random()),
            size: 1 << 30,
            block_size: 4 << 20,
            tags: ["daily".to_string(), "manual:x".to_string()].into(),
            trust: Trust::Verified,
            verified_at: Some("2026-05-11T00:00:00Z".parse().unwrap()),
            source: SourceInfo {
                kind: "file".into(),
                snapshot: String::new(),
                group: None,
            },
            stats: Stats {
                bytes_received: 5,
                bytes_written: 6,
                changed_blocks: 1,
                duration: 1.5,
                bytes_deduplicated: 0,
                audit: None,
            },
            manifest_digest: "ab".repeat(32),
            storage: StorageMode::Copy,
            locked_until: Some("2026-06-10T10:00:00Z".parse().unwrap()),
            key_check: None,
        };
        let text = meta.to_yaml().unwrap();
        assert!(text.contains("trust: verified"), "{text}");
        assert!(text.contains("locked_until: 2026-06-10T10:00:00Z"), "{text}");
        assert_eq!(RevisionMeta::from_yaml(&text, "x.rev").unwrap(), meta);
        let e = RevisionMeta::from_yaml("id: [", "vm1/x.rev").unwrap_err();
        assert!(e.message.starts_with("vm1/x.rev: bad revision metadata"));
        assert!(!text.contains("group"), "absent unless a group push: {text}");

        // One disk of a group push: the fast reader leaves it to the full one.
        let instant = RevisionId::new_random().short();
        let grouped = RevisionMeta {
            source: SourceInfo {
                kind: "qemu".into(),
                snapshot: "backy-x".into(),
                group: Some(GroupInstant {
                    name: "vm1".into(),
                    instant: instant.clone(),
                    disks: 2,
                }),
            },
            ..meta
        };
        let text = grouped.to_yaml().unwrap();
        assert!(text.contains(&format!("instant: {instant}")), "{text}");
        assert_eq!(RevisionMeta::from_yaml(&text, "x.rev").unwrap(), grouped);
    }

    #[test]
    fn group_instants_as_peers_send_them() {
        let good = GroupInstant {
            name: "vm1".into(),
            instant: RevisionId::new_random().short(),
            disks: 2,
        };
        good.check().unwrap();
        for (bad, want) in [
            (
                GroupInstant {
                    name: "../x".into(),
                    ..good.clone()
                },
                "group name",
            ),
            (
                GroupInstant {
                    instant: "short".into(),
                    ..good.clone()
                },
                "is not an id",
            ),
            (
                GroupInstant {
                    disks: 0,
                    ..good.clone()
                },
                "a group push of 0 disks",
            ),
            (
                GroupInstant {
                    disks: MAX_GROUP_DISKS + 1,
                    ..good.clone()
                },
                "a group push of 65 disks",
            ),
        ] {
            let e = bad.check().unwrap_err();
            assert!(e.message.contains(want), "want {want:?} in {}", e.message);
        }
    }

    #[test]
    fn tags() {
        for ok in ["daily", "manual:keep-forever", "a"] {
            assert!(check_tag(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a,b", "a/b", &"x".repeat(65)] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
        assert!(is_manual_tag("manual:x") && !is_manual_tag("daily"));
    }

    /// Issue 27, item 9: a tag a revision spec reads as something else
    /// (a keyword, a position, a full id) is refused: `forget -r 1` meant
    /// for the tag `1` forgot the second-newest revision.
    #[test]
    fn tags_that_specs_misread_are_refused() {
        let uuid = "0191c3a2-5b6e-7c1d-8e2f-3a4b5c6d7e8f";
        for bad in ["all", "latest", "last", "0", "1", "007", "123456789", uuid] {
            let e = check_tag(bad).unwrap_err();
            assert_eq!(e.kind, crate::error::ErrorKind::InvalidArgument, "{bad}");
            assert!(
                e.message.contains("revision specs read it as"),
                "{bad}: {}",
                e.message
            );
            assert!(check_tag_format(bad).is_ok(), "{bad}: stored ones still load");
        }
        for ok in ["All", "latest2", "manual:1", "1234567890", "daily-1", "x7"] {
            assert!(check_tag(ok).is_ok(), "{ok}");
        }
    }
}
