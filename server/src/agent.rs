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

/// The jobs ordered and not yet reported, over every agent session of
/// this server: an agent may hold several sessions with one server (under
/// two URLs that name it, or two agents of one name), and a job is ordered
/// by one of them at a time.
#[derive(Default)]
pub struct Ordered {
    by_job: std::sync::Mutex<std::collections::HashMap<JobName, u64>>,
    sessions: std::sync::atomic::AtomicU64,
}

impl Ordered {
    fn new_session(&self) -> u64 {
        self.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<JobName, u64>> {
        self.by_job.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `job` for `session`'s order; false while another session's
    /// order of it is outstanding.
    fn claim(&self, job: &JobName, session: u64) -> bool {
        *self.map().entry(job.clone()).or_insert(session) == session
    }

    fn release(&self, job: &JobName, session: u64) {
        let mut map = self.map();
        if map.get(job) == Some(&session) {
            map.remove(job);
        }
    }

    fn release_session(&self, session: u64) {
        self.map().retain(|_, s| *s != session);
    }
}

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
    let session = server.agent_orders.new_session();
    // The name as logs show it (an admin may run an agent of any name).
    let shown = crate::text::quoted(&agent);
    tracing::info!(agent = %shown, workers, "agent connected");
    let mut outstanding: BTreeMap<JobName, chrono::DateTime<chrono::Utc>> = BTreeMap::new();
    // Jobs this session sent elsewhere, and where (pool stores).
    let mut told: BTreeMap<JobName, String> = BTreeMap::new();
    // Planning wakes at the earliest next due time of the agent's jobs, or
    // when anything changes (a commit, expiry, an outcome, a reload): an
    // idle site costs nothing per second, however many jobs and agents.
    let mut changes = server.jobs.index.subscribe();
    let mut wake = tokio::time::Instant::now();
    'session: loop {
        tokio::select! {
            msg = reports.message() => match msg {
                Ok(Some(AgentReport { report: Some(Report::Outcome(o)) })) => {
                    let Ok(job) = JobName::new(&o.job) else { continue };
                    if let Some(ordered_at) = outstanding.remove(&job) {
                        server.agent_orders.release(&job, session);
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
                    tokio::task::spawn_blocking(move || due_orders(&s, &agent, session, &busy, room)).await
                };
                let planned = match planned {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        tracing::error!(agent = %shown, "planning orders failed: {e}");
                        Planned::default()
                    }
                    Err(e) => {
                        tracing::error!(agent = %shown, "planning orders failed: {e}");
                        Planned::default()
                    }
                };
                for (job, order) in planned.orders {
                    tracing::info!(agent = %shown, job = %job, tags = %order.tags.join(","), "ordering push");
                    if orders.send(Ok(order)).await.is_err() {
                        break 'session;
                    }
                    told.remove(&job);
                    outstanding.insert(job, chrono::Utc::now());
                }
                // Said once per job and holder: the agent connects there
                // and that server's session orders the job.
                for (job, holder) in planned.elsewhere {
                    if told.get(&job) == Some(&holder) {
                        continue;
                    }
                    tracing::info!(agent = %shown, job = %job, holder = %holder, "job held by another server: sending the agent there");
                    let order = AgentOrder { job: job.to_string(), holder: holder.clone(), ..AgentOrder::default() };
                    if orders.send(Ok(order)).await.is_err() {
                        break 'session;
                    }
                    told.insert(job, holder);
                }
                wake = next_wake(planned.next);
            }
        }
    }
    server.agent_orders.release_session(session);
    tracing::info!(agent = %shown, "agent disconnected");
}

/// What one planning round found.
#[derive(Default)]
struct Planned {
    orders: Vec<(JobName, AgentOrder)>,
    /// Jobs of the agent whose lease another server in front of the same
    /// pool holds (or is being handed): that server orders them; its URL.
    elsewhere: Vec<(JobName, String)>,
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
/// and when the next of the others is due. On a pool store, only jobs this
/// server holds the lease of, or takes now because they are due and free;
/// the others go to `elsewhere`.
fn due_orders(
    server: &Server,
    agent: &str,
    session: u64,
    outstanding: &BTreeSet<JobName>,
    room: usize,
) -> Result<Planned> {
    let config = server.config();
    let pool = server.pool();
    let mut planned = Planned::default();
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
        let state = match &pool {
            None => {
                let job = server.job(name.as_str())?;
                let entry = server.jobs.indexed(&job)?;
                crate::schedule::due_state(server, name, schedule, &entry.revisions)
            }
            Some(pool) => match crate::pool_serve::agent::due_here(server, pool, name, schedule) {
                crate::pool_serve::agent::Here::Due(state) => state,
                crate::pool_serve::agent::Here::Elsewhere(url) => {
                    planned.elsewhere.push((name.clone(), url));
                    continue;
                }
                crate::pool_serve::agent::Here::Unknown => continue,
            },
        };
        let ordered = state.due_now
            && planned.orders.len() < room
            && match &pool {
                None => true,
                Some(pool) => match crate::pool_serve::agent::take(pool, name) {
                    crate::pool_serve::agent::Taken::Yes => true,
                    crate::pool_serve::agent::Taken::Elsewhere(url) => {
                        planned.elsewhere.push((name.clone(), url));
                        continue;
                    }
                    crate::pool_serve::agent::Taken::No => false,
                },
            };
        if ordered && server.agent_orders.claim(name, session) {
            planned.orders.push((
                name.clone(),
                AgentOrder {
                    job: name.to_string(),
                    tags: state.tags.iter().cloned().collect(),
                    ..AgentOrder::default()
                },
            ));
        } else if let Some(at) = state.next_due {
            planned.next = Some(planned.next.map_or(at, |n| n.min(at)));
        }
    }
    Ok(planned)
}
