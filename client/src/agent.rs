//! `agent`: a long-running process on a hypervisor. It holds a stream to
//! the server, runs the pushes the server orders (at most `workers` at a
//! time) and reports each outcome; when the server goes away it reconnects
//! with exponential backoff. The server decides when a job runs, never
//! what it reads or runs: an order for a job this hypervisor's client
//! config does not list is reported as failed and nothing runs.
//!
//! An order for a member of a group (client.yaml `groups:`) runs the
//! group's push (every disk at one instant), once: orders for other
//! members that come while it runs wait for it and report its outcome for
//! their disk (docs/DESIGN.md, "Groups").

use crate::connect::{connect_within, status_error, Client, Credentials};
use crate::push::{push, push_group, GroupPushed, PushArgs};
use backy_common::config::ClientConfig;
use backy_common::{Error, JobName, Result};
use backy_proto::agent_report::Report;
use backy_proto::{AgentHello, AgentOrder, AgentOutcome, AgentReport};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

/// Waits between attempts grow ×2 up to this while they fail at once.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The cap for refusals that only an operator can lift (a wrong name or
/// role, bad credentials): the server is asked rarely, not every second.
const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(300);
/// A session that lasted this long was a working one: the next attempt
/// starts again at one second.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Where the agent learns its jobs: the client config, read again for
/// each order so an edit takes effect without a restart.
#[derive(Clone)]
pub struct JobsConfig {
    path: Option<PathBuf>,
    loaded: ClientConfig,
    name: String,
    /// The one bandwidth limit of this process: every order's push takes
    /// from it, at the rate the config says when the order comes.
    limiter: Arc<crate::bwlimit::Limiter>,
    /// The group pushes running, by group (one at a time per group).
    groups: GroupFlights,
}

/// How a group push ended, shared by every order that waited for it.
type GroupDone = Arc<Result<Option<GroupPushed>>>;

/// The group pushes in flight: an order for a member of one joins it.
#[derive(Clone, Default)]
struct GroupFlights(Arc<Mutex<HashMap<JobName, watch::Receiver<Option<GroupDone>>>>>);

/// What an order for a group member does: run the group's push, or wait
/// for the one running.
enum Flight {
    Run(watch::Sender<Option<GroupDone>>),
    Join(watch::Receiver<Option<GroupDone>>),
}

impl GroupFlights {
    fn join_or_start(&self, group: &JobName) -> Flight {
        let mut running = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A flight whose runner went away without finishing (its task
        // panicked) is stale: joining it would fail every later order.
        if let Some(rx) = running.get(group).filter(|rx| rx.has_changed().is_ok()) {
            return Flight::Join(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        running.insert(group.clone(), rx);
        Flight::Run(tx)
    }

    /// Ends the flight: removed under the lock before the outcome goes
    /// out, so a later order starts a push of its own (which plans again:
    /// nothing is due right after this one).
    fn finish(&self, group: &JobName, tx: watch::Sender<Option<GroupDone>>, done: GroupDone) {
        let mut running = self.0.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(group);
        let _ = tx.send(Some(done));
    }
}

impl JobsConfig {
    /// `path`: the `--config` given (else the default file, if present);
    /// `loaded`: what it held at start.
    pub fn new(path: Option<PathBuf>, loaded: ClientConfig, name: String) -> Self {
        let limiter = crate::bwlimit::Limiter::new(loaded.bwlimit);
        JobsConfig {
            path,
            loaded,
            name,
            limiter,
            groups: GroupFlights::default(),
        }
    }

    /// The client config as it is now; at start's copy if it cannot be
    /// read (an order then runs under the config the agent started with).
    fn current(&self) -> ClientConfig {
        match crate::settings::load(self.path.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("{e}; using the config read at start");
                self.loaded.clone()
            }
        }
    }
}

/// How the agent connects and runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The client identity whose jobs it runs; `None`: the one its
    /// credentials prove (the server says which).
    pub name: Option<String>,
    /// This host's name, the server's choice when `name` is `None` and the
    /// credentials may run any client's agent.
    pub host: String,
    /// Pushes at the same time.
    pub workers: u32,
    /// How long each connection attempt may take (`--timeout`).
    pub connect_timeout: Duration,
}

/// What every session of one agent shares: how to connect, what to run,
/// the worker slots (`--workers` counts pushes on this host, whichever
/// server ordered them) and the servers it holds sessions with.
struct Agent {
    creds: Credentials,
    options: AgentOptions,
    jobs: JobsConfig,
    slots: Arc<Semaphore>,
    servers: Mutex<std::collections::HashSet<String>>,
}

impl Agent {
    /// Holds a session with `holder` too, the server another one named as
    /// a job's lease holder (servers in front of one Ceph pool), unless
    /// one is held already. A URL that would not pass as a configured one
    /// is refused (logged).
    fn follow(self: &Arc<Self>, holder: &str, job: &str) {
        if let Err(e) = crate::connect::check_url(holder) {
            tracing::warn!(job, "not following the job to its holder: {e}");
            return;
        }
        let new = self
            .servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(holder.to_string());
        if new {
            tracing::info!(job, "the job is held by {holder}: holding a session there too");
            let agent = self.clone();
            let url = holder.to_string();
            tokio::spawn(async move { agent.keep_session(&url).await });
        }
    }

    /// One server's session, reconnected for as long as the agent runs. A
    /// session that fails at once is retried after a wait that doubles
    /// each time (capped); its reason is logged when it changes, not at
    /// every attempt.
    async fn keep_session(self: Arc<Self>, url: &str) {
        let mut backoff = Duration::from_secs(1);
        let mut last_reason = String::new();
        loop {
            let started = tokio::time::Instant::now();
            let ended = session(url, &self, &mut last_reason).await;
            if started.elapsed() >= STABLE_SESSION {
                backoff = Duration::from_secs(1);
            }
            let cap = match &ended {
                Err(e) if refused(e) => MAX_REFUSED_BACKOFF,
                _ => MAX_BACKOFF,
            };
            backoff = backoff.min(cap);
            let reason = match &ended {
                Ok(()) => format!("{url}: server closed the agent stream"),
                Err(e) => format!("{url}: agent session ended: {e}"),
            };
            if reason == last_reason {
                tracing::info!("{url}: reconnecting in {} s", backoff.as_secs());
            } else {
                tracing::warn!("{reason}; reconnecting in {} s", backoff.as_secs());
                last_reason = reason;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(cap);
        }
    }
}

/// Runs until interrupted: a session with each of `urls` (one server, or
/// several in front of one Ceph pool, each ordering the jobs whose lease
/// it holds), and with every server they name as a job's holder.
pub async fn run(
    urls: &[String],
    creds: &Credentials,
    options: &AgentOptions,
    jobs: JobsConfig,
) -> Result<()> {
    let agent = Arc::new(Agent {
        creds: creds.clone(),
        options: options.clone(),
        jobs,
        slots: Arc::new(Semaphore::new(options.workers.max(1) as usize)),
        servers: Mutex::new(urls.iter().cloned().collect()),
    });
    let mut sessions = tokio::task::JoinSet::new();
    for url in urls {
        let agent = agent.clone();
        let url = url.clone();
        sessions.spawn(async move { agent.keep_session(&url).await });
    }
    while let Some(ended) = sessions.join_next().await {
        ended.map_err(|e| Error::internal(format!("agent session task: {e}")))?;
    }
    Err(Error::invalid("no server to hold an agent session with"))
}

/// A refusal that retrying cannot lift: only an operator can.
fn refused(e: &Error) -> bool {
    use backy_common::ErrorKind::*;
    matches!(
        e.kind,
        PermissionDenied | Unauthenticated | InvalidArgument | NotFound
    )
}

async fn session(url: &str, agent: &Arc<Agent>, last_reason: &mut String) -> Result<()> {
    let options = &agent.options;
    let workers = options.workers;
    let mut client = connect_within(url, &agent.creds, options.connect_timeout).await?;
    let (reports, rx) = mpsc::channel(16);
    reports
        .send(AgentReport {
            report: Some(Report::Hello(AgentHello {
                agent: options.name.clone().unwrap_or_default(),
                workers,
                host: options.host.clone(),
            })),
        })
        .await
        .map_err(|_| Error::internal("agent report channel closed"))?;
    let response = client
        .agent(ReceiverStream::new(rx))
        .await
        .map_err(status_error)?;
    // Servers before the name was optional do not say it.
    let name = response
        .metadata()
        .get(backy_proto::AGENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| options.name.clone())
        .unwrap_or_default();
    let mut orders = response.into_inner();
    tracing::info!(workers, "connected to {url} as {name}");
    // Connected: a later failure is news again.
    last_reason.clear();
    while let Some(order) = orders.message().await.map_err(status_error)? {
        if !order.holder.is_empty() {
            // Not an order: another server orders this job.
            agent.follow(&order.holder, &order.job);
            continue;
        }
        let permit = agent
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("worker pool closed"))?;
        let reports = reports.clone();
        let client = client.clone();
        let jobs = agent.jobs.clone();
        tokio::spawn(async move {
            let outcome = run_order(client, &order, &jobs, permit).await;
            let _ = reports
                .send(AgentReport {
                    report: Some(Report::Outcome(outcome)),
                })
                .await;
        });
    }
    Ok(())
}

/// Runs one order and says how it went; `permit` is the worker slot it
/// holds while it pushes.
async fn run_order(
    client: Client,
    order: &AgentOrder,
    jobs: &JobsConfig,
    permit: OwnedSemaphorePermit,
) -> AgentOutcome {
    let config = jobs.current();
    let member = JobName::new(&order.job)
        .ok()
        .and_then(|job| crate::group::containing(&config, &job).map(|(g, _)| (g.clone(), job)));
    if let Some((group, job)) = member {
        return run_group_order(client, order, jobs, &config, &group, &job, permit).await;
    }
    let outcome = run_job_order(client, order, jobs, config).await;
    drop(permit);
    outcome
}

/// An ordered member of a group: the group's push, run here or joined.
async fn run_group_order(
    mut client: Client,
    order: &AgentOrder,
    jobs: &JobsConfig,
    config: &ClientConfig,
    group: &JobName,
    job: &JobName,
    permit: OwnedSemaphorePermit,
) -> AgentOutcome {
    let done = match jobs.groups.join_or_start(group) {
        Flight::Join(mut rx) => {
            // Its worker slot is free for other orders while it waits.
            drop(permit);
            tracing::info!(
                job = order.job,
                group = group.as_str(),
                "ordered member: joining its group's running push"
            );
            match rx.wait_for(Option::is_some).await {
                Ok(done) => done
                    .clone()
                    .unwrap_or_else(|| Arc::new(Err(Error::internal("no outcome")))),
                Err(_) => Arc::new(Err(Error::internal(format!(
                    "the push of group {group} ended without an outcome"
                )))),
            }
        }
        Flight::Run(tx) => {
            tracing::info!(
                job = order.job,
                group = group.as_str(),
                "ordered member: pushing its group (every disk at one instant)"
            );
            jobs.limiter.set_rate(config.bwlimit);
            let options = crate::group::PushOptions {
                bwlimit: Some(jobs.limiter.clone()),
                ..Default::default()
            };
            let result = match crate::group::push_args(config, group, &jobs.name, options) {
                Ok(args) => push_group(&mut client, &args, &crate::progress::Silent).await,
                Err(e) => Err(e),
            };
            drop(permit);
            if let Ok(Some(pushed)) = &result {
                tracing::info!(
                    group = group.as_str(),
                    "group push: {}",
                    pushed.to_string().replace('\n', "; ")
                );
            }
            let done = Arc::new(result);
            jobs.groups.finish(group, tx, done.clone());
            done
        }
    };
    group_outcome(job, &done)
}

/// The outcome of the group push for one ordered member.
fn group_outcome(job: &JobName, done: &Result<Option<GroupPushed>>) -> AgentOutcome {
    let outcome = |ok: bool, error: String, rev_id: String| AgentOutcome {
        job: job.to_string(),
        ok,
        error,
        rev_id,
    };
    match done {
        Ok(None) => {
            tracing::info!(job = job.as_str(), "nothing to push: no job of its group is due");
            outcome(true, String::new(), String::new())
        }
        Err(e) => {
            tracing::error!(job = job.as_str(), "ordered group push failed: {e}");
            outcome(false, e.message.clone(), String::new())
        }
        Ok(Some(pushed)) => match pushed.disks.iter().find(|d| d.job == job.as_str()) {
            Some(disk) => match (&disk.pushed, &disk.error) {
                (Some(p), _) => outcome(true, String::new(), p.revision.id.clone()),
                (None, error) => {
                    let error = error.clone().unwrap_or_else(|| "not pushed".to_string());
                    tracing::error!(
                        job = job.as_str(),
                        "ordered push failed in its group's push: {error}"
                    );
                    outcome(
                        false,
                        format!("group {} instant {}: {error}", pushed.group, pushed.instant),
                        String::new(),
                    )
                }
            },
            None => outcome(
                false,
                format!(
                    "group {}: its push did not take {job} (the config changed?)",
                    pushed.group
                ),
                String::new(),
            ),
        },
    }
}

async fn run_job_order(
    mut client: Client,
    order: &AgentOrder,
    jobs: &JobsConfig,
    config: ClientConfig,
) -> AgentOutcome {
    tracing::info!(job = order.job, tags = %order.tags.join(","), "running ordered push");
    let result = async {
        let job = JobName::new(&order.job)?;
        let Some(configured) = config.source_of(&job).cloned() else {
            return Err(Error::precondition(format!(
                "job {job} is not listed in {} (jobs:): this agent runs only the jobs its \
                 client config lists; nothing was run",
                jobs.name
            )));
        };
        let audit_sample = config.audit_sample_of(&job);
        jobs.limiter.set_rate(config.bwlimit);
        let key = crate::encryption::job_key(config.encryption_of(&job))?;
        let args = PushArgs {
            configured: Some(configured),
            config_name: jobs.name.clone(),
            job,
            source: None,
            force: true,
            tags: order.tags.clone(),
            allow_unscheduled: false,
            allow_shrink: false,
            changed_ranges: None,
            audit_sample,
            bwlimit: Some(jobs.limiter.clone()),
            group: None,
            key,
            new_key: false,
        };
        push(&mut client, &args, &crate::progress::Silent).await
    }
    .await;
    match result {
        Ok(Some(pushed)) => {
            tracing::info!(job = order.job, "push committed: {pushed}");
            AgentOutcome {
                job: order.job.clone(),
                ok: true,
                error: String::new(),
                rev_id: pushed.revision.id,
            }
        }
        Ok(None) => {
            tracing::info!(job = order.job, "nothing to push: the job is not due");
            AgentOutcome {
                job: order.job.clone(),
                ok: true,
                error: String::new(),
                rev_id: String::new(),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One flight per group: a second order joins it and sees its outcome;
    /// after it finished, or when its runner vanished without finishing, the
    /// next order starts a push of its own.
    #[test]
    fn group_flights_run_once_and_never_stay_stale() {
        let flights = GroupFlights::default();
        let g = JobName::new("vm6").expect("a name");
        let Flight::Run(tx) = flights.join_or_start(&g) else {
            panic!("the first order runs the push")
        };
        let Flight::Join(mut rx) = flights.join_or_start(&g) else {
            panic!("a second order joins it")
        };
        flights.finish(&g, tx, Arc::new(Ok(None)));
        assert!(matches!(rx.borrow_and_update().as_deref(), Some(Ok(None))));
        let Flight::Run(tx) = flights.join_or_start(&g) else {
            panic!("a finished flight is not joined")
        };
        drop(tx);
        assert!(
            matches!(flights.join_or_start(&g), Flight::Run(_)),
            "a runner that vanished leaves no flight to join"
        );
    }
}
