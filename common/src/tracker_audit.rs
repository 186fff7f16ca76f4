//! Auditing a change tracker (issue 34): an incremental push that trusts
//! a tracker (a `--changed-ranges` file, a QEMU dirty bitmap, Ceph's
//! `rbd diff`) to name every
//! block written since the parent re-reads a random sample of the blocks
//! it calls unchanged and compares their digests with the parent's
//! manifest. A tracker that missed a write would otherwise make every
//! later revision silently lack it.
//!
//! Pure: which blocks to sample (deterministic given a seed, so a test or
//! a log line can name them again), how many, and how the outcome reads.
//! The reading is the client's.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;

/// Percent of the unchanged blocks sampled when nothing says otherwise.
pub const DEFAULT_PERCENT: f64 = 0.5;

/// The share of a tracker's unchanged blocks to re-read, in percent
/// (0 to 100); 0 turns the audit off.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct SamplePercent(f64);

impl SamplePercent {
    pub const DEFAULT: SamplePercent = SamplePercent(DEFAULT_PERCENT);
    pub const OFF: SamplePercent = SamplePercent(0.0);

    pub fn new(percent: f64) -> Result<Self> {
        if percent.is_finite() && (0.0..=100.0).contains(&percent) {
            Ok(SamplePercent(percent))
        } else {
            Err(Error::invalid(format!(
                "audit sample {percent}% is outside 0% to 100%"
            )))
        }
    }

    /// Parses `0.5%`, `0.5` (percent either way), `100%`, `0`.
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim();
        let number = t.strip_suffix('%').unwrap_or(t).trim();
        let percent: f64 = number.parse().map_err(|_| {
            Error::invalid(format!(
                "bad audit sample {s:?}: a percentage like 0.5% (0 turns the audit off)"
            ))
        })?;
        Self::new(percent)
    }

    pub fn percent(self) -> f64 {
        self.0
    }

    pub fn is_off(self) -> bool {
        self.0 == 0.0
    }
}

impl Default for SamplePercent {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for SamplePercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for SamplePercent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SamplePercent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => SamplePercent::new(n),
            Raw::S(s) => SamplePercent::parse(&s),
        }
        .map_err(|e| serde::de::Error::custom(e.message))
    }
}

/// How many of `unchanged` blocks a sample of `percent` re-reads: the
/// share rounded up, at least one while there is any and the audit is on.
pub fn sample_size(unchanged: u64, percent: SamplePercent) -> u64 {
    if percent.is_off() || unchanged == 0 {
        return 0;
    }
    let share = (unchanged as f64 * percent.0 / 100.0).ceil() as u64;
    share.clamp(1, unchanged)
}

/// The blocks to re-read: a sample of `percent` of the blocks below
/// `count` outside `changed` (ascending, disjoint block ranges), ascending,
/// each once, the same for the same `seed`.
pub fn sample(count: u64, changed: &[Range<u64>], percent: SamplePercent, seed: u64) -> Vec<u64> {
    let changed_blocks: u64 = changed
        .iter()
        .map(|r| r.end.min(count).saturating_sub(r.start.min(count)))
        .sum();
    let unchanged = count - changed_blocks.min(count);
    let k = sample_size(unchanged, percent);
    // Ranks among the unchanged blocks (Floyd's algorithm: k distinct of
    // 0..unchanged without a table of all), then mapped to block indices.
    let mut rng = SplitMix64(seed);
    let mut ranks = std::collections::BTreeSet::new();
    for j in (unchanged - k)..unchanged {
        let t = rng.below(j + 1);
        if !ranks.insert(t) {
            ranks.insert(j);
        }
    }
    let mut out = Vec::with_capacity(k as usize);
    let mut skipped = 0u64;
    let mut gaps = changed.iter().peekable();
    for rank in ranks {
        // The block of this rank: its rank plus the changed blocks before it.
        loop {
            match gaps.peek() {
                Some(r) if r.start.min(count) <= rank + skipped => {
                    skipped += r.end.min(count) - r.start.min(count);
                    gaps.next();
                }
                _ => break,
            }
        }
        out.push(rank + skipped);
    }
    out
}

/// A small, fast PRNG: enough to spread a sample, nothing secret.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// What an audit found: recorded with the revision (`.rev`, `stats.audit`)
/// and shown by `status` and `check`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AuditOutcome {
    /// The tracker audited: `changed-ranges`, `qemu-bitmap`, `ceph-rbd-diff`.
    pub tracker: String,
    /// Unchanged blocks by the tracker's word that were re-read.
    pub sampled: u64,
    /// Of those, the ones whose digest differs from the parent's: writes
    /// the tracker missed. Any makes the push read the whole source.
    pub mismatched: u64,
}

impl AuditOutcome {
    /// Refuses what a client cannot have found: a tracker name that is not
    /// a short lower-case word (it is shown in `status` and `check`), more
    /// mismatches than blocks sampled.
    pub fn check(&self) -> Result<()> {
        let t = &self.tracker;
        if t.is_empty()
            || t.len() > 32
            || !t
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::invalid(format!(
                "tracker audit: bad tracker name {:?}",
                crate::escape::escape(t)
            )));
        }
        if self.mismatched > self.sampled {
            return Err(Error::invalid(format!(
                "tracker audit: {} mismatches of {} blocks sampled",
                self.mismatched, self.sampled
            )));
        }
        Ok(())
    }

    /// Whether the tracker was caught missing writes.
    pub fn failed(&self) -> bool {
        self.mismatched > 0
    }

    /// The warning `status` and `check` give for a revision `short_id` made
    /// after a failed audit; `None` when it passed.
    pub fn warning(&self, short_id: &str) -> Option<String> {
        self.failed().then(|| {
            format!(
                "change tracker {} missed writes: {} of {} sampled unchanged blocks differ \
                 (revision {short_id} read the whole source)",
                tracker_label(&self.tracker),
                self.mismatched,
                self.sampled
            )
        })
    }
}

impl fmt::Display for AuditOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} audit: {} re-read, {} differ",
            tracker_label(&self.tracker),
            crate::units::count(self.sampled, "unchanged block"),
            self.mismatched
        )
    }
}

/// A tracker's name as people read it; the name itself when unknown.
pub fn tracker_label(tracker: &str) -> &str {
    match tracker {
        CHANGED_RANGES => "--changed-ranges file",
        QEMU_BITMAP => "QEMU dirty bitmap",
        CEPH_RBD_DIFF => "Ceph rbd diff",
        other => other,
    }
}

/// The trackers' names as recorded.
pub const CHANGED_RANGES: &str = "changed-ranges";
pub const QEMU_BITMAP: &str = "qemu-bitmap";
pub const CEPH_RBD_DIFF: &str = "ceph-rbd-diff";

/// A seed from bytes (a revision id): each push samples other blocks, and
/// the same push the same ones.
pub fn seed_of(bytes: &[u8]) -> u64 {
    let h = blake3::hash(bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct(p: f64) -> SamplePercent {
        SamplePercent::new(p).unwrap()
    }

    #[test]
    fn size_is_the_share_rounded_up_and_at_least_one() {
        assert_eq!(sample_size(0, pct(0.5)), 0);
        assert_eq!(sample_size(1, pct(0.5)), 1);
        assert_eq!(sample_size(199, pct(0.5)), 1);
        assert_eq!(sample_size(200, pct(0.5)), 1);
        assert_eq!(sample_size(201, pct(0.5)), 2);
        assert_eq!(sample_size(16384, pct(0.5)), 82);
        assert_eq!(sample_size(1000, pct(100.0)), 1000);
        assert_eq!(sample_size(1000, SamplePercent::OFF), 0);
    }

    #[test]
    fn sample_avoids_changed_blocks_and_is_deterministic() {
        let changed = [2..5, 7..8, 20..40];
        for seed in 0..200 {
            let s = sample(50, &changed, pct(10.0), seed);
            // 50 - 24 = 26 unchanged: 10 % is 2.6, so 3.
            assert_eq!(s.len(), 3, "seed {seed}");
            assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
            for b in &s {
                assert!(*b < 50 && !changed.iter().any(|r| r.contains(b)), "{b} in {s:?}");
            }
            assert_eq!(s, sample(50, &changed, pct(10.0), seed));
        }
        assert_ne!(sample(1000, &[], pct(1.0), 1), sample(1000, &[], pct(1.0), 2));
    }

    #[test]
    fn everything_at_100_percent_and_nothing_when_off() {
        let changed = [0..1, 3..4, 9..12];
        assert_eq!(sample(10, &changed, pct(100.0), 7), [1, 2, 4, 5, 6, 7, 8]);
        assert_eq!(sample(10, &changed, SamplePercent::OFF, 7), Vec::<u64>::new());
        assert_eq!(
            sample(4, std::slice::from_ref(&(0..4)), pct(100.0), 7),
            Vec::<u64>::new()
        );
        // One block at least, even of a tiny share.
        assert_eq!(sample(3, &[], pct(0.001), 7).len(), 1);
    }

    #[test]
    fn every_unchanged_block_is_picked_now_and_then() {
        let changed = [1..3, 5..6];
        let mut seen = [0u32; 8];
        for seed in 0..2000 {
            for b in sample(8, &changed, pct(20.0), seed) {
                seen[b as usize] += 1;
            }
        }
        // 5 unchanged blocks, one picked per sample: about 400 each.
        for (b, n) in seen.iter().enumerate() {
            if [1, 2, 5].contains(&b) {
                assert_eq!(*n, 0, "block {b}");
            } else {
                assert!((300..500).contains(n), "block {b}: {n}");
            }
        }
    }

    #[test]
    fn percent_parses_and_refuses() {
        assert_eq!(SamplePercent::parse("0.5%").unwrap(), pct(0.5));
        assert_eq!(SamplePercent::parse(" 100 % ").unwrap(), pct(100.0));
        assert_eq!(SamplePercent::parse("0").unwrap(), SamplePercent::OFF);
        for bad in ["", "x", "-1", "101%", "NaN", "inf"] {
            let e = SamplePercent::parse(bad).unwrap_err();
            assert!(e.message.contains("audit sample"), "{bad}: {}", e.message);
        }
        let y: SamplePercent = serde_yaml::from_str("2.5%").unwrap();
        assert_eq!(y, pct(2.5));
        let y: SamplePercent = serde_yaml::from_str("1").unwrap();
        assert_eq!(y, pct(1.0));
        assert!(serde_yaml::from_str::<SamplePercent>("200").is_err());
        assert_eq!(serde_yaml::to_string(&pct(0.5)).unwrap().trim(), "0.5%");
    }

    #[test]
    fn outcomes_from_a_peer_are_checked() {
        let good = AuditOutcome {
            tracker: "qemu-bitmap".into(),
            sampled: 3,
            mismatched: 3,
        };
        assert!(good.check().is_ok());
        for bad in [
            AuditOutcome {
                tracker: String::new(),
                ..good.clone()
            },
            AuditOutcome {
                tracker: "Qemu bitmap\n".into(),
                ..good.clone()
            },
            AuditOutcome {
                tracker: "x".repeat(33),
                ..good.clone()
            },
            AuditOutcome {
                mismatched: 4,
                ..good.clone()
            },
        ] {
            assert!(
                bad.check().unwrap_err().message.starts_with("tracker audit: "),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn outcome_reads() {
        let ok = AuditOutcome {
            tracker: QEMU_BITMAP.into(),
            sampled: 82,
            mismatched: 0,
        };
        assert_eq!(
            ok.to_string(),
            "QEMU dirty bitmap audit: 82 unchanged blocks re-read, 0 differ"
        );
        assert_eq!(ok.warning("abc"), None);
        let bad = AuditOutcome {
            mismatched: 1,
            tracker: CHANGED_RANGES.into(),
            ..ok
        };
        assert_eq!(
            bad.warning("abc").unwrap(),
            "change tracker --changed-ranges file missed writes: 1 of 82 sampled unchanged blocks \
             differ (revision abc read the whole source)"
        );
        let ceph = AuditOutcome {
            tracker: CEPH_RBD_DIFF.into(),
            ..ok
        };
        assert!(ceph.check().is_ok());
        assert_eq!(
            ceph.to_string(),
            "Ceph rbd diff audit: 82 unchanged blocks re-read, 0 differ"
        );
    }
}
