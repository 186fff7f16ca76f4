//! The background scrub: re-reads the most overdue revision (see
//! `backy_common::scrub`), throttled, and records the outcome like a
//! `verify` does: `verified` with the time, or `distrusted` with the bad
//! block offsets in the log. On a pool store it checks the revisions of
//! the jobs whose lease this server holds, reading their snapshots.

use crate::state::Server;
use crate::storage::JobDir;
use backy_common::config::ServerConfig;
use backy_common::revision::RevisionMeta;
use backy_common::scrub::{next_due, Throttle};
use backy_common::units::format_bytes;
use backy_common::{JobName, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Starts the scrub thread; it lives as long as the process.
pub fn spawn(server: Arc<Server>) {
    let started = std::thread::Builder::new()
        .name("scrub".into())
        .spawn(move || loop {
            let config = server.config();
            let tick = (config.scrub.interval.as_duration() / 2)
                .clamp(Duration::from_secs(1), Duration::from_secs(60));
            if config.scrub.enabled {
                match scrub_one(&server) {
                    Ok(true) => continue, // more may be due
                    Ok(false) => {}
                    Err(e) => tracing::error!("scrub: {e}"),
                }
            }
            std::thread::sleep(tick);
        });
    if let Err(e) = started {
        tracing::error!("scrub: cannot start its thread: {e}");
    }
}

/// The revisions the scrub may check: every job's on a filesystem store;
/// on a pool, those of the jobs whose lease this server holds (a check's
/// outcome is written under it; the other jobs are their holders' to
/// scrub).
fn candidates(server: &Server, config: &ServerConfig) -> Vec<(JobName, RevisionMeta)> {
    let mut candidates = Vec::new();
    let mut add = |name: &JobName, listed: Result<Vec<RevisionMeta>>| match listed {
        Ok(revs) => candidates.extend(revs.into_iter().map(|m| (name.clone(), m))),
        Err(e) => tracing::error!(job = %name, "scrub: listing revisions: {e}"),
    };
    match server.pool() {
        None => {
            for name in config.jobs.keys() {
                let job = JobDir::new(&config.base_dir, name.clone());
                add(name, server.jobs.indexed(&job).map(|e| e.revisions.clone()));
            }
        }
        Some(pool) => {
            for name in pool.held_jobs() {
                if config.jobs.contains_key(&name) {
                    add(&name, pool.revisions(&name));
                }
            }
        }
    }
    candidates
}

/// Verifies the most overdue revision of all jobs; false when none is due.
fn scrub_one(server: &Arc<Server>) -> Result<bool> {
    let config = server.config();
    let candidates = candidates(server, &config);
    let now = chrono::Utc::now();
    let Some(due) = next_due(
        candidates.iter().map(|(_, m)| m),
        now,
        config.scrub.interval.as_duration(),
    ) else {
        return Ok(false);
    };
    let Some((job, meta)) = candidates.iter().find(|(_, m)| m.id == due.id) else {
        return Ok(false);
    };
    let throttle = Throttle::new(config.scrub.rate);
    let started = Instant::now();
    let gate = crate::work::Gate::new(server.work.clone(), "scrub", std::sync::Arc::new(|| false));
    let paced = |done| {
        let pause = throttle.pause(done, started.elapsed());
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        true
    };
    let verified = match server.pool() {
        None => crate::revisions::verify(
            server,
            &JobDir::new(&config.base_dir, job.clone()),
            meta,
            &gate,
            paced,
        ),
        Some(pool) => crate::pool_serve::verify::verify(server, &pool, job, meta, &gate, paced),
    }
    .inspect_err(|_| server.metrics.scrub_done(None, 0))?;
    server
        .metrics
        .scrub_done(Some(verified.bad_blocks.len()), verified.bytes_checked);
    let secs = started.elapsed().as_secs_f64();
    if verified.bad_blocks.is_empty() {
        tracing::info!(
            job = %job, rev = %meta.id,
            "scrub: clean, {} checked in {secs:.1} s ({}/s)",
            format_bytes(verified.bytes_checked),
            format_bytes((verified.bytes_checked as f64 / secs.max(1e-3)) as u64)
        );
    } else {
        tracing::error!(
            job = %job, rev = %meta.id,
            "scrub: revision distrusted: {} the manifest, at offsets {:?}",
            backy_common::units::blocks_not_matching(verified.bad_blocks.len() as u64), verified.bad_blocks
        );
    }
    Ok(true)
}
