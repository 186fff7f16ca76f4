//! Scrubbing: which stored revision to re-verify next, and how fast.
//!
//! Every revision that is not distrusted is re-read at least once per
//! scrub interval, oldest check first; reading is throttled so the scrub
//! never competes with pushes and restores for the disks.

use crate::revision::{RevisionMeta, Trust};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// When the revision's data was last known good: its last clean verify,
/// else its commit.
pub fn last_checked(meta: &RevisionMeta) -> DateTime<Utc> {
    meta.verified_at.unwrap_or(meta.timestamp)
}

/// The revision whose check is most overdue at `now`, if any is due.
/// Distrusted revisions are left to the operator (`verify` restores their
/// trust once they read back clean).
pub fn next_due<'a>(
    revs: impl IntoIterator<Item = &'a RevisionMeta>,
    now: DateTime<Utc>,
    interval: Duration,
) -> Option<&'a RevisionMeta> {
    let interval = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
    revs.into_iter()
        .filter(|m| m.trust != Trust::Distrusted)
        .filter(|m| now.signed_duration_since(last_checked(m)) >= interval)
        .min_by_key(|m| last_checked(m))
}

/// Paces reading to `rate` bytes per second.
#[derive(Clone, Copy, Debug)]
pub struct Throttle {
    rate: u64,
}

impl Throttle {
    /// `rate` 0 means unthrottled.
    pub fn new(rate: u64) -> Self {
        Throttle { rate }
    }

    /// How long to pause after `done` bytes in `elapsed` so the average
    /// stays at or below the rate.
    pub fn pause(&self, done: u64, elapsed: Duration) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(done as f64 / self.rate as f64);
        due.saturating_sub(elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::RevisionId;
    use crate::revision::{SourceInfo, Stats, StorageMode};
    use chrono::TimeZone;

    fn rev(day: u32, verified_day: Option<u32>, trust: Trust) -> RevisionMeta {
        let t = |d| Utc.with_ymd_and_hms(2026, 5, d, 10, 0, 0).unwrap();
        RevisionMeta {
            id: RevisionId::new_random(),
            timestamp: t(day),
            parent: None,
            size: 0,
            block_size: 4 << 20,
            tags: Default::default(),
            trust,
            verified_at: verified_day.map(t),
            source: SourceInfo::default(),
            stats: Stats::default(),
            manifest_digest: String::new(),
            storage: StorageMode::Reflink,
            locked_until: None,
            key_check: None,
        }
    }

    #[test]
    fn picks_the_most_overdue_revision() {
        let week = Duration::from_secs(7 * 86400);
        let now = Utc.with_ymd_and_hms(2026, 5, 20, 10, 0, 0).unwrap();
        let a = rev(1, Some(15), Trust::Verified); // checked 5 days ago
        let b = rev(2, None, Trust::Trusted); // never verified, 18 days old
        let c = rev(3, Some(4), Trust::Verified); // checked 16 days ago
        let d = rev(1, None, Trust::Distrusted); // left to the operator
        let e = rev(19, None, Trust::Trusted); // fresh
        let all = [a.clone(), b.clone(), c.clone(), d, e];
        assert_eq!(next_due(&all, now, week).map(|m| m.id), Some(b.id));
        let rest = [a.clone(), c.clone()];
        assert_eq!(next_due(&rest, now, week).map(|m| m.id), Some(c.id));
        assert_eq!(next_due(&[a], now, week).map(|m| m.id), None);
        assert!(next_due(&[], now, week).is_none());
        // Exactly one interval old is due.
        let f = rev(13, None, Trust::Trusted);
        assert_eq!(
            next_due(std::slice::from_ref(&f), now, week).map(|m| m.id),
            Some(f.id)
        );
    }

    #[test]
    fn throttle_keeps_the_average_rate() {
        let t = Throttle::new(100 << 20);
        assert_eq!(
            t.pause(100 << 20, Duration::from_millis(250)),
            Duration::from_millis(750)
        );
        assert_eq!(t.pause(100 << 20, Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(t.pause(0, Duration::ZERO), Duration::ZERO);
        assert_eq!(Throttle::new(0).pause(u64::MAX, Duration::ZERO), Duration::ZERO);
    }
}
