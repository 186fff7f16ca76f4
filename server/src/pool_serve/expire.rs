//! Expiry on a pool (docs/DESIGN.md "Served from a pool"): the job's
//! schedule applied to its records by the filesystem store's pure logic
//! (`backy_common::schedule::expire`), after each commit and on a timer,
//! only on the server holding the job's lease. Tags are rewritten in one
//! op, deletions go through `PoolStore::delete` (journal, `rbd snap rm`,
//! manifest pieces, records).

use super::{lock, PoolBackend};
use crate::ceph::LeaseKeeper;
use crate::state::Server;
use backy_common::schedule::{self, ExpiryRun};
use backy_common::{JobName, Result, RevisionId};
use chrono::Utc;
use std::sync::Arc;

/// Applies `job`'s schedule to its revisions in the pool as `run`; the
/// caller holds the lease's keeper (`k`). Returns the deleted ids. What
/// `crate::schedule::expire_at` does in a `Txn`: revisions in use on this
/// server, the newest trusted one and locked ones are never deleted (the
/// plan's rules).
pub(super) fn expire_job(
    server: &Server,
    pool: &PoolBackend,
    job: &JobName,
    k: &mut LeaseKeeper,
    run: ExpiryRun,
) -> Result<Vec<RevisionId>> {
    let config = server.config();
    let revs = pool.revisions(job)?;
    // Locked revisions' snapshots are protected at their commit; a
    // protect that failed there is done here.
    let now = Utc::now();
    for m in revs.iter().filter(|m| m.locked_at(now).is_some()) {
        pool.store.protect(job, &m.id)?;
    }
    let Some(schedule) = config.schedule_of(config.job(job)?) else {
        return Ok(Vec::new());
    };
    let protected = server.jobs.activity.protected(job);
    let plan = schedule::expire(schedule, &revs, now, &protected, run);
    if plan.is_noop() {
        return Ok(Vec::new());
    }
    let retagged = plan.retagged_records(&revs);
    if !retagged.is_empty() {
        pool.store.write_records(k, job, &retagged)?;
        for m in &retagged {
            tracing::info!(job = %job, rev = %m.id, "expiry: tags now {:?} ({})", m.tags, plan.reason(&m.id));
        }
    }
    let deleted: Vec<RevisionId> = plan.deleted.iter().copied().collect();
    pool.store.delete(k, job, &deleted)?;
    for id in &deleted {
        server.metrics.expired(plan.removals.get(id));
        tracing::info!(job = %job, rev = %id, reason = %plan.reason(id), "expiry: deleted revision");
    }
    Ok(deleted)
}

/// Expiry after revision `committed` of `job` (its push still holding the
/// keeper `k`). A failure keeps the revision and is logged: the next
/// round retries.
pub(super) fn after_commit(
    server: &Server,
    pool: &PoolBackend,
    job: &JobName,
    k: &mut LeaseKeeper,
    committed: RevisionId,
) -> Vec<RevisionId> {
    expire_job(server, pool, job, k, ExpiryRun::AfterCommit(committed)).unwrap_or_else(|e| {
        tracing::error!(job = %job, rev = %committed, "after the commit: {e}; the revision is kept, expiry retries within a minute");
        Vec::new()
    })
}

/// One periodic round: every job whose lease this server holds and that
/// runs no push (its commit expires anyway). Jobs held by other servers
/// are theirs to expire.
pub fn expire_held(server: &Server, pool: &PoolBackend) {
    let held: Vec<_> = pool
        .keepers()
        .iter()
        .map(|(j, k)| (j.clone(), k.clone()))
        .collect();
    for (job, keeper) in held {
        if server.jobs.activity.job_runtime(&job).push.is_some() {
            continue;
        }
        let mut k = lock(&keeper);
        if let Err(e) = expire_job(server, pool, &job, &mut k, ExpiryRun::Periodic) {
            tracing::error!(job = %job, "expiry: {e}");
        }
    }
}

/// Runs [`expire_held`] every `every` until the process ends.
pub fn spawn(server: Arc<Server>, pool: Arc<PoolBackend>, every: std::time::Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            let (s, p) = (server.clone(), pool.clone());
            if let Err(e) = tokio::task::spawn_blocking(move || expire_held(&s, &p)).await {
                tracing::error!("pool expiry round failed: {e}");
            }
        }
    });
}
