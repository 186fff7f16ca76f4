//! Agents: hypervisor processes that hold a stream open and receive an
//! order whenever one of their jobs is due. The server owns the schedule;
//! an agent only runs what it is told, at most `workers` at a time.

use crate::state::Server;
use backy_common::{JobName, Result};
use backy_proto::agent_report::Report;
use backy_proto::{AgentOrder, AgentReport};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// The longest an agent's planning sleeps without an event.
pub const REPLAN: Duration = Duration::from_secs(60);
/// The shortest: planning at most this often per agent.
pub const MIN_REPLAN: Duration = Duration::from_secs(1);

/// What an agent's hello establishes.
pub struct Hello {
    /// The client identity whose jobs it runs.
    pub agent: String,
    pub workers: usize,
}

/// Reads an agent's hello and decides its name: the one it gives, else the
/// identity its credentials prove (an identity that may run any client's
/// agent, admin, takes the host name it sends). Refusals are audited.
pub async fn hello(
    caller: &crate::auth::Caller,
    reports: &mut Streaming<AgentReport>,
) -> std::result::Result<Hello, Status> {
    let hello = match reports.message().await {
        Ok(Some(AgentReport {
            report: Some(Report::Hello(h)),
        })) => h,
        Ok(_) => return Err(Status::invalid_argument("an agent must start with hello")),
        Err(e) => return Err(e),
    };
    let agent = if !hello.agent.is_empty() {
        hello.agent
    } else if caller.role == backy_common::config::Role::Admin {
        hello.host
    } else {
        caller.name.clone()
    };
    let action = format!("agent connect {}", crate::text::clip(&agent));
    let named = if agent.is_empty() {
        Err(Status::invalid_argument("the agent has no name: give --name"))
    } else {
        crate::auth::authorize_agent(caller, &agent)
    };
    if let Err(status) = named {
        crate::audit::record(
            caller,
            &action,
            "",
            "",
            crate::audit::Outcome::Failed(&status.message()),
        );
        return Err(status);
    }
    crate::audit::record(caller, &action, "", "", crate::audit::Outcome::Ok);
    Ok(Hello {
        agent,
        workers: hello.workers.clamp(1, 64) as usize,
    })
}

/// Serves one agent connection, after its [`hello`], until it goes away.
pub async fn serve(
    server: Arc<Server>,
    hello: Hello,
    mut reports: Streaming<AgentReport>,
    orders: mpsc::Sender<std::result::Result<AgentOrder, Status>>,
) {
    let Hello { agent, workers } = hello;
    // The name as logs show it (an admin may run an agent of any name).
    let shown = crate::text::quoted(&agent);
    tracing::info!(agent = %shown, workers, "agent connected");
    let mut outstanding: BTreeMap<JobName, chrono::DateTime<chrono::Utc>> = BTreeMap::new();
    // Planning wakes at the earliest next due time of the agent's jobs, or
    // when anything changes (a commit, expiry, an outcome, a reload): an
    // idle site costs nothing per second, however many jobs and agents.
    let mut changes = server.jobs.index.subscribe();
    let mut wake = tokio::time::Instant::now();
    loop {
        tokio::select! {
            msg = reports.message() => match msg {
                Ok(Some(AgentReport { report: Some(Report::Outcome(o)) })) => {
                    let Ok(job) = JobName::new(&o.job) else { continue };
                    if let Some(ordered_at) = outstanding.remove(&job) {
                        if !o.ok {
                            // Failures before the push reached the server
                            // (source unreadable, ...) count for backoff too.
                            server.record_agent_failure(&job, ordered_at, &o.error);
                        }
                        tracing::info!(
                            agent = %shown, job = %job, ok = o.ok,
                            rev = %crate::text::quoted(&o.rev_id), error = %crate::text::quoted(&o.error),
                            "agent outcome"
                        );
                        wake = tokio::time::Instant::now(); // a worker is free
                    }
                }
                Ok(Some(_)) => {
                    let _ = orders.send(Err(Status::invalid_argument("unexpected agent report"))).await;
                    break;
                }
                Ok(None) | Err(_) => break,
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    break; // the server is going away
                }
                wake = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(wake) => {
                let planned = {
                    let s = server.clone();
                    let agent = agent.clone();
                    let busy: BTreeSet<JobName> = outstanding.keys().cloned().collect();
                    let room = workers.saturating_sub(outstanding.len());
                    tokio::task::spawn_blocking(move || due_orders(&s, &agent, &busy, room)).await
                };
                let planned = match planned {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        tracing::error!(agent = %shown, "planning orders failed: {e}");
                        Planned { orders: Vec::new(), next: None }
                    }
                    Err(e) => {
                        tracing::error!(agent = %shown, "planning orders failed: {e}");
                        Planned { orders: Vec::new(), next: None }
                    }
                };
                for (job, order) in planned.orders {
                    tracing::info!(agent = %shown, job = %job, tags = %order.tags.join(","), "ordering push");
                    if orders.send(Ok(order)).await.is_err() {
                        return;
                    }
                    outstanding.insert(job, chrono::Utc::now());
                }
                wake = next_wake(planned.next);
            }
        }
    }
    tracing::info!(agent = %shown, "agent disconnected");
}

/// What one planning round found.
struct Planned {
    orders: Vec<(JobName, AgentOrder)>,
    /// The earliest time a job of the agent that was not ordered now becomes
    /// due (failure backoff included).
    next: Option<chrono::DateTime<chrono::Utc>>,
}

/// When to plan again: at `next`, but at least every [`REPLAN`] (clock
/// jumps, a due time computed before a change that sent no event) and at
/// most every [`MIN_REPLAN`] (a job due now that could not be ordered, for
/// lack of a free worker, waits for an outcome or the next round).
fn next_wake(next: Option<chrono::DateTime<chrono::Utc>>) -> tokio::time::Instant {
    let now = chrono::Utc::now();
    let wait = next
        .and_then(|t| (t - now).to_std().ok())
        .unwrap_or(REPLAN)
        .clamp(MIN_REPLAN, REPLAN);
    tokio::time::Instant::now() + wait
}

/// Orders for the agent's due jobs that are not already ordered or running,
/// and when the next of the others is due.
fn due_orders(server: &Server, agent: &str, outstanding: &BTreeSet<JobName>, room: usize) -> Result<Planned> {
    let config = server.config();
    let mut planned = Planned {
        orders: Vec::new(),
        next: None,
    };
    for name in server.jobs_of(agent).iter() {
        let Some(job_cfg) = config.jobs.get(name) else {
            continue;
        };
        let Some(schedule) = config.schedule_of(job_cfg) else {
            continue; // schedule: none: never ordered
        };
        if server.is_copy(name) {
            continue; // its revisions come from the source
        }
        if outstanding.contains(name) || server.jobs.activity.job_runtime(name).push.is_some() {
            continue; // its outcome wakes planning again
        }
        let job = server.job(name.as_str())?;
        let entry = server.jobs.indexed(&job)?;
        let state = crate::schedule::due_state(server, &job, schedule, &entry.revisions);
        if state.due_now && planned.orders.len() < room {
            planned.orders.push((
                name.clone(),
                AgentOrder {
                    job: name.to_string(),
                    tags: state.tags.iter().cloned().collect(),
                },
            ));
        } else if let Some(at) = state.next_due {
            planned.next = Some(planned.next.map_or(at, |n| n.min(at)));
        }
    }
    Ok(planned)
}
