//! Writes a store of many jobs with many revisions for `scripts/bench-scale.sh`:
//! real `.rev` and `.digests` files and tiny sparse images, made directly
//! (pushing 200,000 revisions would take hours), in the exact formats the
//! server writes.
//!
//! Usage: scale_fixture BASE-DIR JOBS REVISIONS [--data] [--first-start]
//!        [--quiet-hours H --names FILE]
//! Jobs are `job00000`...; revision k of a job is k days old (the newest
//! one minute old), tagged `daily`, so a schedule of `daily: {interval: 1d,
//! keep: REVISIONS}` keeps them all. Each job's daily slot lies at its own
//! time of day (`backy_common::schedule::spread_offset`), so on a real host
//! a few of 10,000 jobs come due every minute; with `--quiet-hours H` the
//! names skip every `jobNNNNN` whose next slot falls within the next H
//! hours (nothing is due meanwhile) and FILE gets the names, one a line.
//!
//! `--first-start` leaves out what the server's first start on a store
//! creates (each job's `.since`, `.partial/` and `latest`), so that start is
//! measured too.
//!
//! Manifests are all zeros, or with `--data` name data in every block (a
//! job's own four blocks, one of them new in each later revision: JOBS x
//! (REVISIONS + 3) distinct digests, for the deduplication index), while
//! the images stay sparse: such a store is for metadata work only (status,
//! the index), never for verify or restore.

use backy_common::config::{Schedule, TagRule};
use backy_common::manifest::Manifest;
use backy_common::revision::{RevisionMeta, SourceInfo, Stats, StorageMode, Trust};
use backy_common::units::Interval;
use backy_common::{RevisionId, DEFAULT_BLOCK_SIZE};
use chrono::{TimeDelta, Utc};
use std::path::Path;

const IMAGE_SIZE: u64 = 16 << 20;

const USAGE: &str =
    "usage: scale_fixture BASE-DIR JOBS REVISIONS [--data] [--first-start] [--quiet-hours H --names FILE]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, jobs, revisions, flags @ ..] = &args[..] else {
        return Err(USAGE.into());
    };
    let (mut data, mut first_start, mut quiet_hours, mut names_out) = (false, false, None, None);
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        match flag.as_str() {
            "--data" => data = true,
            "--first-start" => first_start = true,
            "--quiet-hours" => quiet_hours = Some(flags.next().ok_or(USAGE)?.parse::<i64>()?),
            "--names" => names_out = Some(flags.next().ok_or(USAGE)?.clone()),
            _ => return Err(USAGE.into()),
        }
    }
    if quiet_hours.is_some() != names_out.is_some() {
        return Err(USAGE.into());
    }
    let (jobs, revisions): (usize, i64) = (jobs.parse()?, revisions.parse()?);
    let zeroed = Manifest::zeroed(IMAGE_SIZE, DEFAULT_BLOCK_SIZE)?;
    let now = Utc::now();
    let newest_age = TimeDelta::minutes(1);
    let names: Vec<String> = match quiet_hours {
        None => (0..jobs).map(|j| format!("job{j:05}")).collect(),
        Some(hours) => {
            let interval = Interval::from_secs(86_400);
            let daily: Schedule = [(
                "daily".to_string(),
                TagRule {
                    interval,
                    keep: revisions as u32,
                },
            )]
            .into();
            let quiet_until = now + TimeDelta::hours(hours);
            (0..)
                .map(|j| format!("job{j:05}"))
                .filter(|name| {
                    let offset = backy_common::schedule::spread_offset(name, &daily);
                    backy_common::schedule::next_slot(interval, offset, now - newest_age)
                        .is_some_and(|slot| slot > quiet_until)
                })
                .take(jobs)
                .collect()
        }
    };
    if let Some(path) = &names_out {
        std::fs::write(path, names.iter().map(|n| format!("{n}\n")).collect::<String>())?;
    }
    for (j, name) in names.iter().enumerate() {
        let dir = Path::new(base).join(name);
        if first_start {
            std::fs::create_dir_all(&dir)?;
        } else {
            std::fs::create_dir_all(dir.join(".partial"))?;
        }
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
            let age = if k == 0 { newest_age } else { TimeDelta::days(k) };
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
                    group: None,
                },
                stats: Stats {
                    bytes_received: 4096,
                    bytes_written: 4096,
                    changed_blocks: 1,
                    duration: 0.1,
                    bytes_deduplicated: 0,
                    audit: None,
                },
                manifest_digest,
                storage: StorageMode::Reflink,
                locked_until: None,
                key_check: None,
            };
            std::fs::File::create(dir.join(id.short()))?.set_len(IMAGE_SIZE)?;
            std::fs::write(dir.join(format!("{}.digests", id.short())), &manifest)?;
            std::fs::write(dir.join(format!("{}.rev", id.short())), meta.to_yaml()?)?;
            parent = Some(id);
        }
        if first_start {
            continue;
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
