//! Verify on a pool (docs/DESIGN.md "Served from a pool"): a revision's
//! snapshot re-read through librbd (`RevisionReader`) and every block's
//! digest compared with the manifest in the pool, as
//! `crate::revisions::verify` does on the filesystem: the same report, and
//! the same outcome (verified with the time, or distrusted).

use super::{job_name, lock, PoolBackend};
use crate::revisions::Verified;
use crate::state::Server;
use crate::work::Gate;
use backy_common::manifest::digest;
use backy_common::revision::{RevisionMeta, Trust};
use backy_common::{Error, JobName, Result};
use std::sync::Arc;

/// Whether any of `ranges` (ascending `(offset, len)`) overlaps
/// `[off, off + len)`; `from` is where to start looking and moves on past
/// the ranges that end before `off` (blocks are asked in order).
fn holds_data(ranges: &[(u64, u64)], from: &mut usize, off: u64, len: u64) -> bool {
    while *from < ranges.len() && ranges[*from].0 + ranges[*from].1 <= off {
        *from += 1;
    }
    ranges.get(*from).is_some_and(|&(o, _)| o < off + len)
}

/// The configured job `job` and the revisions `spec` names in it (newest
/// first; `all` allowed), as `crate::revisions::select` on the filesystem.
pub fn select(
    server: &Server,
    pool: &PoolBackend,
    job: &str,
    spec: &str,
) -> Result<(JobName, Vec<RevisionMeta>)> {
    let job = job_name(server, job)?;
    let selected = super::change::select(&job, &pool.revisions(&job)?, spec)?;
    Ok((job, selected))
}

/// Re-reads every block of revision `meta` of pool job `job` and compares
/// it with the manifest; marks the revision `verified` (with the time) or
/// `distrusted`, under the job's lease. Ranges the snapshot holds no data
/// in are zeros without reading; each block read takes a slot of the work
/// pool through `gate`. `on_block` as in `crate::revisions::verify`: a
/// verify whose caller went away changes no trust. A clean verify does not
/// mark a revision whose record changed while it ran (a distrust, tags):
/// the record is compared with the one read at the start under the
/// keeper's lock, which every write of the job's records holds.
pub fn verify(
    server: &Arc<Server>,
    pool: &PoolBackend,
    job: &JobName,
    meta: &RevisionMeta,
    gate: &Gate,
    mut on_block: impl FnMut(u64) -> bool,
) -> Result<Verified> {
    let _reading = server.jobs.activity.start_read(job, meta.id);
    // The outcome is written under the lease: one held by another server
    // fails now, before the reading.
    let keeper = pool.lease(job)?;
    let seen = pool.store.meta(job, &meta.id)?;
    let manifest = pool.store.manifest(job, &seen)?;
    let reader = pool.store.open_revision(job, &meta.id)?;
    let len = reader.size()?;
    let ranges = reader.data_ranges()?;
    let cancelled = |checked: u64| {
        Error::unavailable(format!(
            "verify of revision {} cancelled after {checked} bytes: nothing changed",
            meta.id
        ))
    };
    let mut bad = Vec::new();
    let mut checked = 0u64;
    let mut read = 0u64;
    if len != seen.size {
        bad.push(len.min(seen.size));
    } else {
        let mut buf = vec![0u8; manifest.block_size() as usize];
        let mut at = 0usize;
        for block in 0..manifest.block_count() {
            let n = manifest.block_len(block) as usize;
            let off = manifest.block_offset(block);
            if !holds_data(&ranges, &mut at, off, n as u64) {
                if !manifest.is_zero(block) {
                    bad.push(off);
                }
            } else {
                let _slot = gate.slot().map_err(|_| cancelled(checked))?;
                let got = reader.read_at(off, &mut buf[..n])?;
                if got != n || Some(&digest(&buf[..n])) != manifest.get(block) {
                    bad.push(off);
                }
                read += n as u64;
                if !on_block(read) {
                    return Err(cancelled(checked));
                }
            }
            checked += n as u64;
        }
    }
    let (to, at) = if bad.is_empty() {
        (Trust::Verified, Some(chrono::Utc::now()))
    } else {
        (Trust::Distrusted, None)
    };
    let (meta, moved) = {
        let mut k = lock(&keeper);
        let now = pool.store.meta(job, &meta.id)?;
        // Distrusting always applies (it only makes a revision safer).
        if to != Trust::Distrusted && now != seen {
            (now, false)
        } else {
            let mut m = now;
            m.trust = to;
            if at.is_some() {
                m.verified_at = at;
            }
            pool.store.write_records(&mut k, job, std::slice::from_ref(&m))?;
            (m, true)
        }
    };
    if !moved {
        tracing::warn!(job = %job, rev = %meta.id, trust = %meta.trust.as_str(),
            "verify: clean, but the revision's record changed while it ran (a distrust, tags); left as it is now");
    }
    if !bad.is_empty() {
        tracing::error!(job = %job, rev = %meta.id, "verify: {} the manifest: {bad:?}",
            backy_common::units::blocks_not_matching(bad.len() as u64));
    }
    Ok(Verified {
        meta,
        bytes_checked: checked,
        bad_blocks: bad,
    })
}

#[cfg(test)]
mod tests {
    use super::holds_data;

    #[test]
    fn blocks_overlapping_a_data_range_hold_data_and_the_rest_are_holes() {
        let ranges = [(4096, 100), (10_000, 5000)];
        let mut at = 0;
        let asked: Vec<bool> = [
            (0, 4096),
            (4096, 4096),
            (8192, 4096),
            (12_288, 4096),
            (16_384, 4096),
        ]
        .iter()
        .map(|&(o, l)| holds_data(&ranges, &mut at, o, l))
        .collect();
        assert_eq!(asked, [false, true, true, true, false]);
        assert!(!holds_data(&[], &mut 0, 0, 1));
    }
}
