//! `backy-server hand-over JOB... --to URL` (docs/DESIGN.md "Handing a job
//! over"): records the requests in the pool as the store's identity, in
//! one op, then watches the jobs' lock records (bounded by `--wait`) until
//! the target holds each job, and says per job where it stands. The servers
//! do the hand-over ([`super::handover`]); this command only asks and
//! watches.

use crate::pool::PoolStore;
use backy_common::handover::{progress, Line, Progress, Request};
use backy_common::{JobName, Result};
use chrono::Utc;
use std::time::{Duration, Instant};

/// How often the command reads the lock records while it waits.
const POLL: Duration = Duration::from_millis(250);

pub struct Options {
    /// The target's URL, checked (`backy_common::handover::check_target`).
    pub to: String,
    /// How long to wait for the target to hold each job.
    pub wait: Duration,
    /// How long the job is reserved for the target.
    pub reserve: Duration,
    /// Who asks (`user@host`).
    pub by: String,
}

/// One job's outcome.
pub struct Outcome {
    pub line: String,
    /// The hand-over went as asked: the target holds the job, or it is
    /// free and reserved for the target.
    pub done: bool,
}

struct Job {
    name: JobName,
    /// The lease's holder when asked (its URL).
    before: Option<String>,
    /// The standing request for another server this command withdrew.
    withdrawn: Option<String>,
    progress: Progress,
}

/// Hands `jobs` to `o.to`; one outcome per job, in order.
pub fn run(store: &PoolStore, jobs: &[JobName], o: &Options) -> Result<Vec<Outcome>> {
    let requested = Utc::now();
    let reserve = chrono::Duration::from_std(o.reserve)
        .map_err(|_| backy_common::Error::invalid("--reserve is out of range"))?;
    let until = requested + reserve;
    let mut state = Vec::new();
    let mut requests = Vec::new();
    for job in jobs {
        let before = store.lease_holder(job)?.map(|l| l.cookie);
        let progress = progress(before.as_deref(), before.as_deref(), &o.to);
        let mut withdrawn = None;
        if progress == Progress::AlreadyHeld {
            // Handing a job to its holder is a no-op; it also withdraws a
            // standing request for another server.
            if let Some(standing) = store.handover(job)? {
                if store.withdraw_handover(job, &standing)?
                    && !backy_common::handover::same_server(&standing.request.to, &o.to)
                {
                    withdrawn = Some(standing.request.to);
                }
            }
        } else {
            requests.push((
                job.clone(),
                Request {
                    to: o.to.clone(),
                    requested,
                    until,
                    by: o.by.clone(),
                },
            ));
        }
        state.push(Job {
            name: job.clone(),
            before,
            withdrawn,
            progress,
        });
    }
    if !requests.is_empty() {
        store.request_handovers(&requests)?;
    }
    let started = Instant::now();
    loop {
        for j in state.iter_mut().filter(|j| !j.progress.settled()) {
            let now = store.lease_holder(&j.name)?.map(|l| l.cookie);
            j.progress = progress(j.before.as_deref(), now.as_deref(), &o.to);
        }
        if state.iter().all(|j| j.progress.settled()) || started.elapsed() >= o.wait {
            break;
        }
        std::thread::sleep(POLL);
    }
    let (now, waited) = (Utc::now(), started.elapsed().as_secs());
    Ok(state
        .iter()
        .map(|j| Outcome {
            line: Line {
                job: j.name.as_str(),
                to: &o.to,
                before: j.before.as_deref(),
                progress: &j.progress,
                until,
                now,
                waited,
                withdrawn: j.withdrawn.as_deref(),
            }
            .text(),
            done: j.progress.done(),
        })
        .collect())
}
