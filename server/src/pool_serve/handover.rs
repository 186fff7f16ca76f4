//! Handing a job's lease to another server on the serving side
//! (docs/DESIGN.md "Handing a job over"); `backy_common::handover` decides,
//! [`crate::pool::PoolStore`]'s hand-over calls read and remove requests.
//!
//! Each lease round (after the renewals) reads every request in one call:
//! - the holder of a requested job marks it leaving: new work on it
//!   (`PoolBackend::lease`, `refuse_if_held_elsewhere`) is refused naming the
//!   target; once nothing uses the job's keeper any more (a running push,
//!   change or verify holds a clone of it) the lease is released cleanly
//!   (nobody to fence) and the keeper dropped;
//! - the target takes the lease of a job reserved for it as soon as it is
//!   free, and removes the request.
//!
//! A server that does not hold the job reads the job's request before it
//! takes the lease: reserved for another server, it refuses naming that
//! server; reserved for itself but still held by the old holder (work
//! running there), it refuses without a redirect (there is nowhere to go
//! yet); lapsed or absent, it takes the lease as ever and removes a lapsed
//! request.

use super::{lock, lock_map, PoolBackend};
use crate::pool::StoredHandover;
use backy_common::handover::{for_holder, for_taker, ForHolder, ForTaker};
use backy_common::{Error, ErrorKind, JobName, Result};
use chrono::Utc;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// This server's side of the hand-overs in progress.
#[derive(Default)]
pub(super) struct Handovers {
    /// Held jobs being handed over, by target URL: new work is refused.
    leaving: Mutex<HashMap<JobName, String>>,
    /// Requests for this server of jobs it does not serve (not in its
    /// config), already logged: said once, not every round.
    ignored: Mutex<HashSet<(JobName, String)>>,
}

/// What a server not holding the job found before taking its lease.
pub(super) enum Take {
    /// No request stands; a lapsed one (if any) is removed once taken.
    Free(Option<StoredHandover>),
    /// Reserved for this server: the request is removed once taken.
    Mine(StoredHandover),
}

/// The refusal of work on a job reserved for server `to`: ABORTED, with
/// the target's URL for the client to follow.
fn reserved_for(job: &JobName, to: &str, until: Option<chrono::DateTime<Utc>>) -> Error {
    let until = until
        .map(|u| {
            format!(
                " (reserved until {})",
                backy_common::handover::clock(u, Utc::now())
            )
        })
        .unwrap_or_default();
    Error::busy(format!("job {job}: handed over to server {to}{until}")).with_redirect(to)
}

/// The target's refusal while the old holder still holds the job: nowhere
/// to send the client to, so no redirect; a retry later lands.
fn not_released_yet(job: &JobName, holder: &str) -> Error {
    Error::busy(format!(
        "job {job}: being handed over to this server; {holder} has not released it yet (work on \
         the job still runs there): try again shortly"
    ))
}

impl PoolBackend {
    /// The target of the hand-over of `job` when this server holds it and
    /// is handing it over.
    pub(super) fn leaving_to(&self, job: &JobName) -> Option<String> {
        lock_map(&self.handovers.leaving).get(job).cloned()
    }

    /// Refuses work on a held job being handed over, naming the target.
    pub(super) fn refuse_if_leaving(&self, job: &JobName) -> Result<()> {
        match self.leaving_to(job) {
            Some(to) => Err(reserved_for(job, &to, None)),
            None => Ok(()),
        }
    }

    /// Before taking `job`'s lease (this server does not hold it): refuses
    /// when the job is reserved for another server.
    pub(super) fn check_take(&self, job: &JobName) -> Result<Take> {
        let stored = self
            .store
            .handover(job)
            .map_err(|e| Error::from(e).context(format!("job {job}: reading its hand-over request")))?;
        let me = lock_map(&self.name).clone();
        match for_taker(stored.as_ref().map(|s| &s.request), &me, Utc::now()) {
            ForTaker::Reserved(to) => Err(reserved_for(job, &to, stored.map(|s| s.request.until))),
            ForTaker::Mine => Ok(Take::Mine(stored.ok_or_else(|| {
                Error::internal("a hand-over request for this server without a request")
            })?)),
            ForTaker::Free => Ok(Take::Free(stored)),
        }
    }

    /// A take refused while the job is reserved for this server: its old
    /// holder has not let it go yet, so no redirect back to it.
    pub(super) fn take_refused(&self, job: &JobName, take: &Take, refused: Error) -> Error {
        match take {
            Take::Mine(_) if refused.kind == ErrorKind::Busy => {
                let holder = refused.redirect.as_deref().unwrap_or("its holder");
                not_released_yet(job, holder)
            }
            _ => refused,
        }
    }

    /// After this server took `job`'s lease: the request it found is done
    /// (for this server) or moot (lapsed), and removed.
    pub(super) fn taken(&self, job: &JobName, take: Take) {
        let (stored, mine) = match take {
            Take::Mine(s) => (s, true),
            Take::Free(Some(s)) => (s, false),
            Take::Free(None) => return,
        };
        let r = &stored.request;
        if mine {
            tracing::info!(
                job = %job, from = %r.by, requested = %r.requested,
                "took the job handed over to this server"
            );
        } else {
            tracing::info!(
                job = %job, to = %r.to, until = %r.until,
                "took the job after its hand-over lapsed (the target never took it)"
            );
        }
        self.withdraw(job, &stored);
    }

    fn withdraw(&self, job: &JobName, stored: &StoredHandover) {
        if let Err(e) = self.store.withdraw_handover(job, stored) {
            tracing::warn!(job = %job, "removing the job's hand-over request: {e}");
        }
    }
}

/// One lease round's hand-overs (after the renewals): see the module
/// comment. `serves` says whether this server's config lists a job.
pub(super) fn round(pool: &PoolBackend, serves: &dyn Fn(&JobName) -> bool) {
    let requests = match pool.store.handovers() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("reading the hand-over requests: {e}");
            return;
        }
    };
    let me = lock_map(&pool.name).clone();
    let now = Utc::now();
    let held: HashSet<JobName> = pool.keepers().keys().cloned().collect();
    for job in &held {
        let stored = requests.get(job);
        match for_holder(stored.map(|s| &s.request), &me, now) {
            ForHolder::Keep => stop_leaving(pool, job, "its hand-over request was withdrawn"),
            ForHolder::Stale => {
                stop_leaving(pool, job, "its hand-over lapsed: the job stays here");
                if let Some(s) = stored {
                    pool.withdraw(job, s);
                }
            }
            ForHolder::Leave(to) => {
                let newly = lock_map(&pool.handovers.leaving)
                    .insert(job.clone(), to.clone())
                    .is_none();
                if let (true, Some(s)) = (newly, stored) {
                    tracing::info!(
                        job = %job, to = %to, by = %s.request.by, until = %s.request.until,
                        "handing the job over: new work on it is refused, the lease is released \
                         once the work running on it ended"
                    );
                }
                release_if_idle(pool, job, &to);
            }
        }
    }
    // A lease lost meanwhile is nothing to hand over any more.
    lock_map(&pool.handovers.leaving).retain(|j, _| held.contains(j));
    for (job, stored) in &requests {
        if held.contains(job) || for_taker(Some(&stored.request), &me, now) != ForTaker::Mine {
            continue;
        }
        if !serves(job) {
            let key = (job.clone(), stored.request.requested.to_rfc3339());
            if lock_map(&pool.handovers.ignored).insert(key) {
                tracing::warn!(
                    job = %job, "a hand-over to this server of a job its config does not list: \
                     not taken (add the job to server.yaml; the request lapses at {})",
                    stored.request.until
                );
            }
            continue;
        }
        match pool.lease(job) {
            Ok(_) => {}
            // Its holder has not released it yet: a later round.
            Err(e) if e.kind == ErrorKind::Busy => {
                tracing::debug!(job = %job, "hand-over: not free yet: {e}")
            }
            Err(e) => tracing::warn!(job = %job, "taking the job handed over to this server: {e}"),
        }
    }
}

fn stop_leaving(pool: &PoolBackend, job: &JobName, why: &str) {
    if lock_map(&pool.handovers.leaving).remove(job).is_some() {
        tracing::info!(job = %job, "no longer handing the job over: {why}");
    }
}

/// Releases `job`'s lease for `to` unless work still uses its keeper
/// (a push, change or verify holds a clone of it): a later round then.
fn release_if_idle(pool: &PoolBackend, job: &JobName, to: &str) {
    let keeper = {
        let mut keepers = pool.keepers();
        match keepers.get(job) {
            Some(k) if Arc::strong_count(k) == 1 => keepers.remove(job),
            Some(_) => {
                tracing::debug!(job = %job, "hand-over: waiting for the work running on the job");
                return;
            }
            None => None,
        }
    };
    let Some(keeper) = keeper else { return };
    // From here `lease()` finds no keeper and reads the request: refused,
    // naming the target.
    let released = lock(&keeper).release();
    lock_map(&pool.handovers.leaving).remove(job);
    match released {
        Ok(()) => tracing::info!(job = %job, to = %to, "released the job's lease to hand it over"),
        Err(e) => tracing::warn!(
            job = %job, to = %to,
            "releasing the job's lease to hand it over: {e}; it expires after the lease time"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_target_or_nobody() {
        let job = JobName::new("vm1").unwrap();
        let e = reserved_for(&job, "http://b:6023", None);
        assert_eq!(e.kind, ErrorKind::Busy);
        assert_eq!(e.redirect.as_deref(), Some("http://b:6023"));
        assert_eq!(e.message, "job vm1: handed over to server http://b:6023");
        let e = not_released_yet(&job, "http://a:6023");
        assert_eq!((e.kind, e.redirect.as_deref()), (ErrorKind::Busy, None));
        assert!(e.message.contains("http://a:6023 has not released it yet"), "{e}");
    }
}
