//! Writes a store of many jobs with many revisions for `scripts/bench-scale.sh`:
//! real `.rev` and `.digests` files and tiny sparse images, made directly
//! (pushing 200,000 revisions would take hours), in the exact formats the
//! server writes.
//!
//! Usage: scale_fixture BASE-DIR JOBS REVISIONS [--data]
//! Jobs are `job00000`...; revision k of a job is k days old (the newest
//! one minute old), tagged `daily`, so a schedule of `daily: {interval: 1d,
//! keep: REVISIONS}` keeps them all and nothing is due.
//!
//! Manifests are all zeros, or with `--data` name data in every block (a
//! job's own four blocks, one of them new in each later revision: JOBS x
//! (REVISIONS + 3) distinct digests, for the deduplication index), while
//! the images stay sparse: such a store is for metadata work only (status,
//! the index), never for verify or restore.

use backy_common::manifest::Manifest;
use backy_common::revision::{RevisionMeta, SourceInfo, Stats, StorageMode, Trust};
use backy_common::{RevisionId, DEFAULT_BLOCK_SIZE};
use chrono::{TimeDelta, Utc};
use std::path::Path;

const IMAGE_SIZE: u64 = 16 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (base, jobs, revisions, data) = match &args[..] {
        [_, base, jobs, revisions] => (base, jobs, revisions, false),
        [_, base, jobs, revisions, flag] if flag == "--data" => (base, jobs, revisions, true),
        _ => return Err("usage: scale_fixture BASE-DIR JOBS REVISIONS [--data]".into()),
    };
    let (jobs, revisions): (usize, i64) = (jobs.parse()?, revisions.parse()?);
    let zeroed = Manifest::zeroed(IMAGE_SIZE, DEFAULT_BLOCK_SIZE)?;
    let now = Utc::now();
    for j in 0..jobs {
        let dir = Path::new(base).join(format!("job{j:05}"));
        std::fs::create_dir_all(dir.join(".partial"))?;
        let mut parent = None;
        let mut digests = zeroed.clone();
        for k in (0..revisions).rev() {
            if data {
                // The oldest revision brings all four blocks; each later
                // one rewrites one of them.
                let oldest = k == revisions - 1;
                for b in 0..digests.block_count() {
                    if oldest || (revisions - 1 - k) as u64 % digests.block_count() == b {
                        let name = format!("scale fixture job {j} block {b} revision {k}");
                        digests.set(b, *blake3::hash(name.as_bytes()).as_bytes())?;
                    }
                }
            }
            let manifest = digests.encode();
            let manifest_digest = blake3::hash(&manifest).to_hex().to_string();
            let id = RevisionId::new_random();
            let age = if k == 0 {
                TimeDelta::minutes(1)
            } else {
                TimeDelta::days(k)
            };
            let meta = RevisionMeta {
                id,
                timestamp: now - age,
                parent,
                size: IMAGE_SIZE,
                block_size: DEFAULT_BLOCK_SIZE,
                tags: ["daily".to_string()].into(),
                trust: Trust::Trusted,
                verified_at: None,
                source: SourceInfo {
                    kind: "file".into(),
                    snapshot: String::new(),
                },
                stats: Stats {
                    bytes_received: 4096,
                    bytes_written: 4096,
                    changed_blocks: 1,
                    duration: 0.1,
                    bytes_deduplicated: 0,
                },
                manifest_digest,
                storage: StorageMode::Reflink,
                locked_until: None,
            };
            std::fs::File::create(dir.join(id.short()))?.set_len(IMAGE_SIZE)?;
            std::fs::write(dir.join(format!("{}.digests", id.short())), &manifest)?;
            std::fs::write(dir.join(format!("{}.rev", id.short())), meta.to_yaml()?)?;
            parent = Some(id);
        }
        // As a store the server has run on has them.
        if let Some(newest) = parent {
            std::os::unix::fs::symlink(newest.short(), dir.join("latest"))?;
        }
        let since = (now - TimeDelta::days(revisions)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        std::fs::write(dir.join(".since"), format!("{since}\n"))?;
    }
    Ok(())
}
