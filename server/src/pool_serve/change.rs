//! Changes to a pool job's committed revisions: tags, distrust, forget
//! (docs/DESIGN.md "Served from a pool"). Each has the filesystem store's
//! checks, codes and messages (`crate::revisions`, whose pure parts both
//! stores call) on the records in the pool.
//!
//! A change that applies holds the job's lease and its keeper's lock from
//! the read of the records to their write: no other change, push commit or
//! verify of this server comes between (they all write under that lock),
//! and no other server writes meanwhile (every write is one op checked
//! against the lease's epoch). That is what the filesystem's job lock
//! gives `Txn`, so no record version (`omap_cmp`) is needed. A dry run
//! reads only: it takes no lease.

use super::{job_name, lock, PoolBackend};
use crate::revisions::{check_forgettable, check_tag_request, retag, Apply, TagAction};
use crate::state::Server;
use backy_common::revision::{RevisionMeta, Trust};
use backy_common::spec::Spec;
use backy_common::{Error, JobName, Result, RevisionId};
use backy_proto::TagsRequest;

/// The revisions `spec` names in `revs` (oldest first), newest first.
pub(super) fn select(job: &JobName, revs: &[RevisionMeta], spec: &str) -> Result<Vec<RevisionMeta>> {
    let spec = Spec::parse(spec)?;
    let idx = spec.resolve(revs).map_err(|e| e.context(format!("job {job}")))?;
    Ok(idx.into_iter().filter_map(|i| revs.get(i).cloned()).collect())
}

/// Runs `change` on the selected revisions and, unless a dry run, writes
/// what it returns in one op under the job's lease (see the module doc).
fn change_records(
    server: &Server,
    pool: &PoolBackend,
    job: &str,
    spec: &str,
    apply: Apply,
    change: impl FnOnce(Vec<RevisionMeta>) -> Result<Vec<RevisionMeta>>,
) -> Result<Vec<RevisionMeta>> {
    let job = job_name(server, job)?;
    if apply == Apply::DryRun {
        return change(select(&job, &pool.revisions(&job)?, spec)?);
    }
    let keeper = pool.lease(&job)?;
    let mut k = lock(&keeper);
    let changed = change(select(&job, &pool.revisions(&job)?, spec)?)?;
    pool.store.write_records(&mut k, &job, &changed)?;
    Ok(changed)
}

/// `tags` on a pool job (see `crate::revisions::tags`), as `req` asks
/// with `action` (decoded from it by the caller).
pub fn tags(
    server: &Server,
    pool: &PoolBackend,
    req: &TagsRequest,
    action: TagAction,
) -> Result<Vec<RevisionMeta>> {
    let name = job_name(server, &req.job)?;
    let config = server.config();
    let schedule = config.schedule_of(config.job(&name)?);
    check_tag_request(action, &req.tags, schedule, req.allow_unscheduled)?;
    let scheduled = schedule.is_some();
    let apply = crate::service::apply(req.dry_run);
    let changed = change_records(server, pool, &req.job, &req.revisions, apply, |selected| {
        retag(selected, action, &req.tags, scheduled)
    })?;
    if apply == Apply::Yes {
        for m in &changed {
            tracing::info!(job = %name, rev = %m.id, "tags now {:?}", m.tags);
        }
    }
    Ok(changed)
}

/// `distrust` on a pool job (see `crate::revisions::distrust`): the
/// revisions are no parent from now on (a push planned on one is refused
/// at its commit, see `super::push`).
pub fn distrust(
    server: &Server,
    pool: &PoolBackend,
    job: &str,
    spec: &str,
    apply: Apply,
) -> Result<Vec<RevisionMeta>> {
    let changed = change_records(server, pool, job, spec, apply, |mut selected| {
        for m in &mut selected {
            m.trust = Trust::Distrusted;
        }
        Ok(selected)
    })?;
    if apply == Apply::Yes {
        for m in &changed {
            tracing::info!(job = %job, rev = %m.id, "distrusted (by request)");
        }
    }
    Ok(changed)
}

/// `forget` on a pool job (see `crate::revisions::forget`): refused whole
/// while a selected revision is in use on this server (a restore, a
/// verify, the base of a running push: `Activity::protected`) or under its
/// retention lock; then `PoolStore::delete` (journal, `rbd snap rm`,
/// manifest pieces, records), which refuses a protected snapshot.
pub fn forget(
    server: &Server,
    pool: &PoolBackend,
    job: &str,
    spec: &str,
    apply: Apply,
) -> Result<Vec<RevisionMeta>> {
    let name = job_name(server, job)?;
    let check = |job: &JobName, selected: &[RevisionMeta]| {
        check_forgettable(job, selected, &server.jobs.activity.protected(job))
    };
    if apply == Apply::DryRun {
        let selected = select(&name, &pool.revisions(&name)?, spec)?;
        check(&name, &selected)?;
        return Ok(selected);
    }
    let keeper = pool.lease(&name)?;
    let mut k = lock(&keeper);
    // Under the keeper's lock: a push names its base (`set_parent`) before
    // it takes this lock to begin, so either it is protected here or the
    // push finds its parent gone.
    let selected = select(&name, &pool.revisions(&name)?, spec)?;
    check(&name, &selected)?;
    let ids: Vec<_> = selected.iter().map(|m| m.id).collect();
    pool.store.delete(&mut k, &name, &ids)?;
    for meta in &selected {
        tracing::info!(job = %name, rev = %meta.id, "forgot revision (by request)");
    }
    Ok(selected)
}

/// The parent checks of a push's commit (`Txn::check_publishable`'s, with
/// its messages), called under the keeper's lock right before the record
/// is written: a forget or a distrust during the push wins.
pub(super) fn check_parent(pool: &PoolBackend, job: &JobName, parent: Option<RevisionId>) -> Result<()> {
    let Some(pid) = parent else { return Ok(()) };
    match pool.revisions(job)?.into_iter().find(|m| m.id == pid) {
        None => Err(Error::precondition(format!(
            "parent revision {pid} was removed during the push; nothing was committed, \
             run the push again"
        ))),
        Some(p) if !p.trust.usable_as_parent() => Err(Error::precondition(format!(
            "parent revision {pid} was distrusted during the push; nothing was committed, \
             run the push again for a full backup"
        ))),
        Some(_) => Ok(()),
    }
}
