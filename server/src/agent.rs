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

/// How often the server looks for due jobs of each connected agent.
pub const TICK: Duration = Duration::from_secs(1);

/// Serves one agent connection until it goes away.
pub async fn serve(
    server: Arc<Server>,
    caller: crate::auth::Caller,
    mut reports: Streaming<AgentReport>,
    orders: mpsc::Sender<std::result::Result<AgentOrder, Status>>,
) {
    let hello = match reports.message().await {
        Ok(Some(AgentReport {
            report: Some(Report::Hello(h)),
        })) => h,
        Ok(_) => {
            let _ = orders
                .send(Err(Status::invalid_argument("an agent must start with hello")))
                .await;
            return;
        }
        Err(_) => return,
    };
    if let Err(status) = crate::auth::authorize_agent(&caller, &hello.agent) {
        let _ = orders.send(Err(status)).await;
        return;
    }
    let agent = hello.agent.clone();
    let workers = hello.workers.clamp(1, 64) as usize;
    tracing::info!(agent, workers, "agent connected");
    let mut outstanding: BTreeMap<JobName, chrono::DateTime<chrono::Utc>> = BTreeMap::new();
    let mut tick = tokio::time::interval(TICK);
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
                        tracing::info!(agent, job = %job, ok = o.ok, rev = o.rev_id, error = o.error, "agent outcome");
                    }
                }
                Ok(Some(_)) => {
                    let _ = orders.send(Err(Status::invalid_argument("unexpected agent report"))).await;
                    break;
                }
                Ok(None) | Err(_) => break,
            },
            _ = tick.tick() => {
                let due = {
                    let s = server.clone();
                    let agent = agent.clone();
                    let busy: BTreeSet<JobName> = outstanding.keys().cloned().collect();
                    let room = workers.saturating_sub(outstanding.len());
                    tokio::task::spawn_blocking(move || due_orders(&s, &agent, &busy, room)).await
                };
                match due {
                    Ok(Ok(list)) => {
                        for (job, order) in list {
                            tracing::info!(agent, job = %job, tags = ?order.tags, "ordering push");
                            if orders.send(Ok(order)).await.is_err() {
                                return;
                            }
                            outstanding.insert(job, chrono::Utc::now());
                        }
                    }
                    Ok(Err(e)) => tracing::error!(agent, "planning orders failed: {e}"),
                    Err(e) => tracing::error!(agent, "planning orders failed: {e}"),
                }
            }
        }
    }
    tracing::info!(agent, "agent disconnected");
}

/// Orders for the agent's due jobs that are not already ordered or running.
fn due_orders(
    server: &Server,
    agent: &str,
    outstanding: &BTreeSet<JobName>,
    room: usize,
) -> Result<Vec<(JobName, AgentOrder)>> {
    let config = server.config();
    let mut out = Vec::new();
    for (name, job_cfg) in &config.jobs {
        if out.len() >= room {
            break;
        }
        if job_cfg.client.as_deref() != Some(agent) || outstanding.contains(name) {
            continue;
        }
        let Some(schedule) = config.schedule_of(job_cfg) else {
            continue;
        };
        if server.job_runtime(name).push.is_some() {
            continue;
        }
        let job = server.job(name.as_str())?;
        let revs = job.revisions()?;
        let state = crate::schedule::due_state(server, &job, schedule, &revs);
        if state.due_now {
            out.push((
                name.clone(),
                AgentOrder {
                    job: name.to_string(),
                    tags: state.tags.iter().cloned().collect(),
                    source_json: job_cfg.source.as_ref().map(|s| s.to_json()).unwrap_or_default(),
                },
            ));
        }
    }
    Ok(out)
}
