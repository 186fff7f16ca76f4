//! `agent`: a long-running process on a hypervisor. It holds a stream to
//! the server, runs the pushes the server orders (at most `workers` at a
//! time) and reports each outcome; when the server goes away it reconnects
//! with exponential backoff.

use crate::connect::{connect_with, status_error, Client, Credentials};
use crate::push::{push, PushArgs};
use backy_common::{Error, JobName, Result};
use backy_proto::agent_report::Report;
use backy_proto::{AgentHello, AgentOrder, AgentOutcome, AgentReport};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Runs until interrupted.
pub async fn run(url: &str, creds: &Credentials, name: &str, workers: u32) -> Result<()> {
    let mut backoff = Duration::from_secs(1);
    loop {
        match session(url, creds, name, workers, &mut backoff).await {
            Ok(()) => tracing::warn!("server closed the agent stream; reconnecting"),
            Err(e) => tracing::warn!("agent session ended: {e}; reconnecting in {}s", backoff.as_secs()),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn session(
    url: &str,
    creds: &Credentials,
    name: &str,
    workers: u32,
    backoff: &mut Duration,
) -> Result<()> {
    let mut client = connect_with(url, creds).await?;
    let (reports, rx) = mpsc::channel(16);
    reports
        .send(AgentReport {
            report: Some(Report::Hello(AgentHello {
                agent: name.into(),
                workers,
            })),
        })
        .await
        .map_err(|_| Error::internal("agent report channel closed"))?;
    let mut orders = client
        .agent(ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    tracing::info!(agent = name, workers, "connected to {url}");
    *backoff = Duration::from_secs(1);
    let slots = Arc::new(Semaphore::new(workers.max(1) as usize));
    while let Some(order) = orders.message().await.map_err(status_error)? {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("worker pool closed"))?;
        let reports = reports.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let outcome = run_order(client, &order).await;
            drop(permit);
            let _ = reports
                .send(AgentReport {
                    report: Some(Report::Outcome(outcome)),
                })
                .await;
        });
    }
    Ok(())
}

async fn run_order(mut client: Client, order: &AgentOrder) -> AgentOutcome {
    tracing::info!(job = order.job, tags = ?order.tags, "running ordered push");
    let result = async {
        let job = JobName::new(&order.job)?;
        let args = PushArgs {
            job,
            source: None,
            force: true,
            tags: order.tags.clone(),
            allow_unscheduled: false,
            allow_shrink: false,
            changed_ranges: None,
        };
        push(&mut client, &args, false).await
    }
    .await;
    match result {
        Ok(Some(pushed)) => {
            tracing::info!(job = order.job, rev = pushed.revision.short_id, "push committed");
            AgentOutcome {
                job: order.job.clone(),
                ok: true,
                error: String::new(),
                rev_id: pushed.revision.id,
            }
        }
        Ok(None) => AgentOutcome {
            job: order.job.clone(),
            ok: true,
            error: String::new(),
            rev_id: String::new(),
        },
        Err(e) => {
            tracing::error!(job = order.job, "ordered push failed: {e}");
            AgentOutcome {
                job: order.job.clone(),
                ok: false,
                error: e.message,
                rev_id: String::new(),
            }
        }
    }
}
