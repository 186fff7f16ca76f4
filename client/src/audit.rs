//! The audit of a change tracker (issue 34; the sample is chosen in
//! `backy_common::tracker_audit`): before an incremental push trusts a
//! tracker's list of changed extents, a sample of the blocks outside them
//! is read and digested; each must have the parent's digest. One that
//! differs is a write the tracker missed, and the push then reads the
//! whole source instead of trusting the list.

use crate::source::Source;
use backy_common::manifest::{zero_digest, Manifest};
use backy_common::ranges::{blocks_of, coalesce, Extent};
use backy_common::tracker_audit::{sample, AuditOutcome, SamplePercent};
use backy_common::Result;
use std::ops::Range;

/// What to audit: which tracker, how much, and the sample's seed.
#[derive(Clone, Debug)]
pub struct AuditPlan {
    pub tracker: &'static str,
    pub percent: SamplePercent,
    pub seed: u64,
}

/// Reads the sample of the blocks `changed` leaves out and compares each
/// block's digest with `baseline` (the parent's manifest at the source's
/// size).
pub fn run(
    source: &mut dyn Source,
    baseline: &Manifest,
    changed: &[Extent],
    plan: &AuditPlan,
    key: Option<&backy_common::encryption::Key>,
) -> Result<AuditOutcome> {
    let count = baseline.block_count();
    let bs = baseline.block_size();
    let touched = changed_block_ranges(changed, bs);
    let blocks = sample(count, &touched, plan.percent, plan.seed);
    let mut buf = vec![0u8; bs as usize];
    let mut mismatched = 0u64;
    for &b in &blocks {
        let offset = baseline.block_offset(b);
        let len = baseline.block_len(b);
        // Holes the source reports read as zeros without reading them.
        let data = source.next_data(offset)?.is_some_and(|r| r.offset < offset + len);
        let digest = if data {
            let block = &mut buf[..len as usize];
            source.read_at(offset, block)?;
            // An encrypted job's manifest holds digests of ciphertext.
            if let Some(key) = key {
                key.encrypt(offset, block)?;
            }
            crate::scan::block_digest(block)
        } else {
            zero_digest(len)
        };
        if baseline.get(b) != Some(&digest) {
            mismatched += 1;
            tracing::warn!(
                tracker = plan.tracker,
                block = b,
                offset,
                "block differs from the parent revision, but the change tracker calls it unchanged"
            );
        }
    }
    Ok(AuditOutcome {
        tracker: plan.tracker.to_string(),
        sampled: blocks.len() as u64,
        mismatched,
    })
}

/// The blocks extents touch, as ascending, disjoint ranges.
fn changed_block_ranges(changed: &[Extent], block_size: u32) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for e in coalesce(changed.to_vec()) {
        let r = blocks_of(e, block_size);
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::mem::MemSource;
    use backy_common::manifest::digest;

    const BS: u32 = 64 << 10;

    fn manifest_of(image: &[u8]) -> Manifest {
        let mut m = Manifest::zeroed(image.len() as u64, BS).unwrap();
        for (i, block) in image.chunks(BS as usize).enumerate() {
            m.set(i as u64, digest(block)).unwrap();
        }
        m
    }

    #[test]
    fn a_missed_write_is_caught_at_100_percent() {
        let b = BS as usize;
        let parent: Vec<u8> = (0..8 * b).map(|i| (i % 251) as u8).collect();
        let mut now = parent.clone();
        now[b + 3] ^= 1; // named by the tracker
        now[5 * b + 7] ^= 1; // missed by it
        let changed = [Extent {
            offset: BS as u64,
            len: 10,
        }];
        let plan = AuditPlan {
            tracker: "changed-ranges",
            percent: SamplePercent::new(100.0).unwrap(),
            seed: 1,
        };
        let mut src = MemSource::new(now.clone());
        let got = run(&mut src, &manifest_of(&parent), &changed, &plan, None).unwrap();
        assert_eq!((got.sampled, got.mismatched), (7, 1));
        // Block 1 (changed) was never read.
        assert!(!src.reads.contains(&(BS as u64)), "{:?}", src.reads);
        // An honest list: nothing differs.
        let honest = [
            changed[0],
            Extent {
                offset: 5 * BS as u64,
                len: 8,
            },
        ];
        let got = run(
            &mut MemSource::new(now),
            &manifest_of(&parent),
            &honest,
            &plan,
            None,
        )
        .unwrap();
        assert_eq!((got.sampled, got.mismatched), (6, 0));
    }

    #[test]
    fn holes_read_as_zeros() {
        let b = BS as usize;
        let mut src = MemSource::new(vec![0u8; 4 * b]);
        src.regions = Some(vec![]);
        let plan = AuditPlan {
            tracker: "qemu-bitmap",
            percent: SamplePercent::new(100.0).unwrap(),
            seed: 9,
        };
        let zeros = Manifest::zeroed(4 * BS as u64, BS).unwrap();
        let got = run(&mut src, &zeros, &[], &plan, None).unwrap();
        assert_eq!((got.sampled, got.mismatched), (4, 0));
        assert!(src.reads.is_empty());
    }

    #[test]
    fn touched_blocks_merge() {
        let e = |offset, len| Extent { offset, len };
        let bs = BS as u64;
        assert_eq!(
            changed_block_ranges(&[e(5 * bs, 1), e(0, 1), e(bs - 1, 2), e(5 * bs + 9, bs)], BS),
            [0..2, 5..7]
        );
    }
}
