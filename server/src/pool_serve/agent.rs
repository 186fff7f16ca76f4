//! An agent's planning on a pool store: the schedule of a job runs only
//! on the server holding its lease. A job another server holds (or is
//! being handed to) is that server's to order: the agent is sent there
//! (docs/DESIGN.md, "Agents in front of a pool").

use super::PoolBackend;
use crate::state::Server;
use backy_common::config::Schedule;
use backy_common::schedule::DueState;
use backy_common::JobName;

/// Where a job of an agent is planned.
pub enum Here {
    /// Here: this server holds the lease, or nobody does.
    Due(DueState),
    /// By the server at this URL.
    Elsewhere(String),
    /// Not this round: the pool did not answer for it (logged).
    Unknown,
}

/// The job's due state when this server may order it.
pub fn due_here(server: &Server, pool: &PoolBackend, job: &JobName, schedule: &Schedule) -> Here {
    if let Err(e) = pool.refuse_if_held_elsewhere(job) {
        return match e.redirect {
            Some(url) => Here::Elsewhere(url),
            None => {
                tracing::warn!(job = %job, "planning: {e}");
                Here::Unknown
            }
        };
    }
    match pool.revisions(job) {
        Ok(revs) => Here::Due(crate::schedule::due_state(server, job, schedule, &revs)),
        Err(e) => {
            tracing::warn!(job = %job, "planning: reading its revisions: {e}");
            Here::Unknown
        }
    }
}

/// Whether this server took (or holds) the lease of a due job.
pub enum Taken {
    Yes,
    /// Another server was quicker (or the job is handed to it).
    Elsewhere(String),
    /// Not now (logged): the next round tries again.
    No,
}

/// Takes the due job's lease before ordering it, so two servers in front
/// of one pool never order the same job: the first to take it orders.
pub fn take(pool: &PoolBackend, job: &JobName) -> Taken {
    match pool.lease(job) {
        Ok(_) => Taken::Yes,
        Err(e) => match e.redirect {
            Some(url) => Taken::Elsewhere(url),
            None => {
                tracing::warn!(job = %job, "planning: taking the job's lease: {e}");
                Taken::No
            }
        },
    }
}
