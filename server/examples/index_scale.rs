//! Measures the deduplication index of a store (`scripts/bench-scale.sh`
//! makes one with `scale_fixture --data`): rebuilds it from every manifest,
//! then looks up digests of stored blocks, and prints one JSON line:
//! entries, bytes of its files, rebuild seconds, the median lookup in
//! microseconds, and this process's peak RSS, which stays a few MiB
//! whatever the index holds (it reads a bucket at a time).
//!
//! Usage: index_scale BASE-DIR

use backy_server::dedup::index::{rebuild, DigestIndex};
use backy_server::dedup::job_dirs;
use std::path::Path;
use std::time::Instant;

/// Digests looked up (from the first jobs' manifests).
const LOOKUPS: usize = 20_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, base] = &args[..] else {
        return Err("usage: index_scale BASE-DIR".into());
    };
    let store = Path::new(base);
    let started = Instant::now();
    let stats = rebuild(store)?;
    let rebuild_secs = started.elapsed().as_secs_f64();

    let mut digests = Vec::new();
    'jobs: for job in job_dirs(store)? {
        for meta in job.revisions()? {
            for (_, d) in job.manifest(&meta)?.data_blocks() {
                digests.push(*d);
                if digests.len() == LOOKUPS {
                    break 'jobs;
                }
            }
        }
    }
    let index = DigestIndex::open(store)?;
    let mut times = Vec::with_capacity(digests.len());
    for d in &digests {
        let t = Instant::now();
        let found = index.lookup(d)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        if found.is_none() {
            return Err("a stored block's digest is not in the rebuilt index".into());
        }
    }
    times.sort_by(f64::total_cmp);
    let lookup_us = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let peak_rss_mib = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0);
    println!(
        "{{\"entries\": {}, \"bytes\": {}, \"rebuild_secs\": {rebuild_secs:.3}, \"lookups\": {}, \
         \"lookup_us\": {lookup_us:.2}, \"peak_rss_mib\": {peak_rss_mib:.1}}}",
        stats.live,
        stats.bytes,
        times.len()
    );
    Ok(())
}
