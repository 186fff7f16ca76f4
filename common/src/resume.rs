//! Resumable pushes: the progress record an interrupted push leaves next to
//! its partial image (`.partial/<id>.resume`), and the rules for when it may
//! be resumed.
//!
//! A push writes its ranges in ascending offset order. At a checkpoint the
//! server syncs the partial image, digests every block below the
//! checkpoint and records them; whatever was written after the checkpoint
//! lies above it. Resuming therefore keeps the blocks below the checkpoint
//! and resets everything above it to the parent, so the partial image is
//! again exactly what the recorded manifest says.

use crate::error::{Error, Result};
use crate::id::RevisionId;
use crate::revision::{Stats, StorageMode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The durable progress record of an interrupted push.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ResumeRecord {
    pub id: RevisionId,
    pub parent: Option<RevisionId>,
    /// Image size of the parent (0 without one).
    pub parent_size: u64,
    pub size: u64,
    pub block_size: u32,
    /// Every block below this offset is in the partial image and in the
    /// recorded manifest; a multiple of the block size.
    pub checkpoint: u64,
    /// How the partial image shares data with the parent.
    pub storage: StorageMode,
    /// Counters of the sessions so far.
    pub stats: Stats,
    /// When the push first started.
    pub started: DateTime<Utc>,
    /// When this record was written.
    pub written: DateTime<Utc>,
}

/// Why a record cannot be resumed (it is then discarded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stale {
    Expired,
    ParentChanged,
    Malformed(String),
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::Expired => f.write_str("the resume window has passed"),
            Stale::ParentChanged => f.write_str("the parent revision changed"),
            Stale::Malformed(why) => write!(f, "malformed record: {why}"),
        }
    }
}

impl ResumeRecord {
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml::to_string(self).map_err(|e| Error::internal(format!("encoding resume record: {e}")))
    }

    pub fn from_yaml(text: &str, what: &str) -> Result<Self> {
        serde_yaml::from_str(text).map_err(|e| Error::data_loss(format!("{what}: {e}")))
    }

    /// Whether this record may be resumed at `now` by a push whose parent
    /// would be `parent`: written within `window`, same parent, sane.
    pub fn check(
        &self,
        now: DateTime<Utc>,
        window: std::time::Duration,
        parent: Option<RevisionId>,
    ) -> std::result::Result<(), Stale> {
        let bs = u64::from(self.block_size);
        if bs == 0 || !self.checkpoint.is_multiple_of(bs) || self.checkpoint > self.size {
            return Err(Stale::Malformed(format!(
                "checkpoint {} does not fit size {} and block size {bs}",
                self.checkpoint, self.size
            )));
        }
        let age = now.signed_duration_since(self.written);
        let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        if age > window || age < -chrono::Duration::minutes(5) {
            return Err(Stale::Expired);
        }
        if self.parent != parent {
            return Err(Stale::ParentChanged);
        }
        Ok(())
    }
}

/// The checkpoint for a push whose frames so far end at `position`: the
/// start of the block holding `position` (that block may be incomplete).
pub fn checkpoint_at(position: u64, block_size: u32) -> u64 {
    let bs = u64::from(block_size);
    position / bs * bs
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    fn record() -> ResumeRecord {
        let t = Utc.with_ymd_and_hms(2026, 5, 10, 10, 0, 0).unwrap();
        ResumeRecord {
            id: RevisionId::new_random(),
            parent: Some(RevisionId::new_random()),
            parent_size: 8 << 20,
            size: (12 << 20) + 5,
            block_size: 4 << 20,
            checkpoint: 8 << 20,
            storage: StorageMode::Reflink,
            stats: Stats::default(),
            started: t,
            written: t,
        }
    }

    #[test]
    fn round_trips_as_yaml() {
        let r = record();
        assert_eq!(ResumeRecord::from_yaml(&r.to_yaml().unwrap(), "x").unwrap(), r);
        let e = ResumeRecord::from_yaml("id: 1\n", "vm1/.partial/x.resume").unwrap_err();
        assert!(e.message.starts_with("vm1/.partial/x.resume: "), "{}", e.message);
    }

    #[test]
    fn resumable_within_the_window_with_the_same_parent() {
        let r = record();
        let hour = Duration::from_secs(3600);
        let at = |mins| r.written + chrono::Duration::minutes(mins);
        type Case = (DateTime<Utc>, Option<RevisionId>, std::result::Result<(), Stale>);
        let table: Vec<Case> = vec![
            (at(0), r.parent, Ok(())),
            (at(59), r.parent, Ok(())),
            (at(60), r.parent, Ok(())),
            (at(61), r.parent, Err(Stale::Expired)),
            // A clock far behind the record: not trusted either.
            (at(-10), r.parent, Err(Stale::Expired)),
            (at(1), None, Err(Stale::ParentChanged)),
            (at(1), Some(RevisionId::new_random()), Err(Stale::ParentChanged)),
        ];
        for (now, parent, want) in table {
            assert_eq!(r.check(now, hour, parent), want, "at {now} parent {parent:?}");
        }
    }

    #[test]
    fn rejects_checkpoints_that_do_not_fit() {
        let hour = Duration::from_secs(3600);
        for cp in [1u64, (4 << 20) + 1, 16 << 20] {
            let r = ResumeRecord {
                checkpoint: cp,
                ..record()
            };
            assert!(
                matches!(r.check(r.written, hour, r.parent), Err(Stale::Malformed(_))),
                "checkpoint {cp}"
            );
        }
        // The end of the last (partial) block is a valid checkpoint.
        let r = ResumeRecord {
            checkpoint: 12 << 20,
            ..record()
        };
        assert_eq!(r.check(r.written, hour, r.parent), Ok(()));
    }

    #[test]
    fn checkpoints_fall_on_block_starts() {
        let bs = 4 << 20;
        assert_eq!(checkpoint_at(0, bs), 0);
        assert_eq!(checkpoint_at((4 << 20) - 1, bs), 0);
        assert_eq!(checkpoint_at(4 << 20, bs), 4 << 20);
        assert_eq!(checkpoint_at((9 << 20) + 7, bs), 8 << 20);
    }
}
