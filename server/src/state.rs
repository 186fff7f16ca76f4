//! The server: its configuration and the parts every request shares (the
//! jobs' cache and activity, connections, the work pool, metrics, the
//! replication records). Built once at start-up; handlers, background
//! work and the replica take it.

use crate::storage::JobDir;
use backy_common::config::ServerConfig;
use backy_common::revision::StorageMode;
use backy_common::{JobName, Result, RevisionId};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub struct Server {
    config: RwLock<Arc<ServerConfig>>,
    /// The jobs' read cache and what runs on them now.
    pub jobs: crate::job::Jobs,
    /// Open connections (before and after authentication).
    pub connections: Arc<crate::listener::Connections>,
    /// The jobs of each client identity, from the current config.
    by_client: RwLock<Arc<JobsByClient>>,
    pub storage_mode: StorageMode,
    /// Bounds re-digest and verify work, shared fairly between callers.
    pub work: Arc<crate::work::WorkPool>,
    /// Counters and histograms for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Set once SIGTERM/SIGINT came: `/readyz` answers 503 from then on.
    pub stopping: std::sync::atomic::AtomicBool,
    /// As a replica: the jobs it copies and how they stand.
    pub replication: crate::replication::Replication,
    /// As a source: what each replica fetched.
    pub fetched: crate::replication::FetchLog,
    /// Log lines of refused requests per peer address (see `audit::refused`).
    pub refusals: std::sync::Mutex<backy_common::throttle::Throttle<String>>,
    /// As a replica: the bandwidth limit of the copies from the source
    /// (`replicate.bwlimit`, set anew by each copy).
    pub replica_bwlimit: Arc<backy_common::bwlimit::Limiter>,
    /// The disks of group pushes waiting for their group's commit.
    pub groups: Arc<crate::group::HeldGroups>,
    /// Set at start-up when revisions live in a Ceph pool (`store:`).
    pub pool: std::sync::OnceLock<Arc<crate::pool_serve::PoolBackend>>,
    /// Jobs ordered by agent sessions and not yet reported.
    pub agent_orders: crate::agent::Ordered,
}

impl Server {
    pub fn new(config: ServerConfig, storage_mode: StorageMode) -> Self {
        let replication = crate::replication::Replication::load(&config.base_dir);
        let fetched = crate::replication::FetchLog::load(&config.base_dir);
        let config = replication.effective(config);
        let by_client = jobs_by_client(&config);
        Server {
            config: RwLock::new(Arc::new(config)),
            jobs: Default::default(),
            connections: Default::default(),
            by_client: RwLock::new(Arc::new(by_client)),
            storage_mode,
            work: Arc::new(crate::work::WorkPool::for_this_host()),
            metrics: Default::default(),
            stopping: Default::default(),
            replication,
            fetched,
            replica_bwlimit: Default::default(),
            groups: Default::default(),
            pool: Default::default(),
            agent_orders: Default::default(),
            refusals: std::sync::Mutex::new(backy_common::throttle::Throttle::new(
                backy_common::throttle::Limits::REFUSALS,
            )),
        }
    }

    /// The Ceph pool store, when revisions live in one.
    pub fn pool(&self) -> Option<Arc<crate::pool_serve::PoolBackend>> {
        self.pool.get().cloned()
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Takes `config` (with the jobs this server copies from a source
    /// added, see [`crate::replication::Replication::effective`]).
    pub fn replace_config(&self, config: ServerConfig) {
        let config = self.replication.effective(config);
        let by_client = Arc::new(jobs_by_client(&config));
        match self.by_client.write() {
            Ok(mut b) => *b = by_client,
            Err(p) => *p.into_inner() = by_client,
        }
        match self.config.write() {
            Ok(mut c) => *c = Arc::new(config),
            Err(p) => *p.into_inner() = Arc::new(config),
        }
        // Jobs and schedules may have changed: agents plan again.
        self.jobs.index.clear();
        let current = self.config();
        self.jobs.space.retain(|j| current.jobs.contains_key(j));
    }

    /// The jobs whose `client` is `name`.
    pub fn jobs_of(&self, name: &str) -> Arc<Vec<JobName>> {
        let map = self
            .by_client
            .read()
            .map(|b| b.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        map.get(name).cloned().unwrap_or_default()
    }

    /// Whether `job` is a copy of another server's (it takes no pushes).
    pub fn is_copy(&self, job: &JobName) -> bool {
        self.replication.copies(&self.config(), job)
    }

    /// A configured job's directory; unknown jobs are `NotFound`.
    pub fn job(&self, name: &str) -> Result<JobDir> {
        let name = JobName::new(name)?;
        let config = self.config();
        config.job(&name)?;
        Ok(JobDir::new(&config.base_dir, name))
    }

    /// Records how a push of `job` (as the client named it) ended, for
    /// configured jobs only: a peer cannot grow this table with made-up names.
    pub fn record_push_outcome<T>(&self, job: &str, rev: &str, result: &Result<T>) {
        let Ok(name) = JobName::new(job) else { return };
        if !self.config().jobs.contains_key(&name) {
            return;
        }
        match result {
            Ok(_) => self.record_outcome(&name, &Ok(())),
            Err(e) => {
                // The client may have reported this attempt already (its
                // report can overtake the server noticing the stream end):
                // counted once, with the client's reason.
                if self
                    .jobs
                    .activity
                    .count_server_failure(&name, rev.parse().ok(), &e.message)
                {
                    self.jobs.index.notify();
                }
            }
        }
    }

    /// A push that failed on the client: counted, unless the server already
    /// counted the same attempt (`rev`), whose reason the client's then
    /// replaces (it knows better why its stream broke). Returns the
    /// consecutive failures now.
    pub fn record_client_failure(&self, job: &JobName, rev: Option<RevisionId>, error: &str) -> u32 {
        let failures = self.jobs.activity.count_client_failure(job, rev, error);
        self.metrics.push_failed_on_client();
        self.jobs.index.notify();
        failures
    }

    pub fn record_outcome(&self, job: &JobName, result: &std::result::Result<(), String>) {
        self.jobs.activity.record_outcome(job, result);
        // After the update: agents woken by it plan with the new counts.
        self.jobs.index.notify();
    }
}

impl Server {
    /// An agent reported a failure for an order given at `ordered_at`: count
    /// it unless the push itself already reached the server and was recorded.
    pub fn record_agent_failure(&self, job: &JobName, ordered_at: DateTime<Utc>, error: &str) {
        let already = self
            .jobs
            .activity
            .job_runtime(job)
            .last_outcome
            .is_some_and(|t| t >= ordered_at);
        if !already {
            self.metrics.push_failed_on_client();
            self.record_outcome(job, &Err(error.to_string()));
        }
    }
}

type JobsByClient = HashMap<String, Arc<Vec<JobName>>>;

fn jobs_by_client(config: &ServerConfig) -> JobsByClient {
    let mut map: HashMap<String, Vec<JobName>> = HashMap::new();
    for (name, job) in &config.jobs {
        if let Some(client) = &job.client {
            map.entry(client.clone()).or_default().push(name.clone());
        }
    }
    map.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
}

/// A server on a store of its own, for the server's unit tests.
#[cfg(test)]
pub(crate) fn test_server(base: &std::path::Path, jobs: &str) -> std::sync::Arc<Server> {
    let text = format!(
        "listen: 127.0.0.1:1\ninsecure-plaintext: true\nbase-dir: {}\n\
         schedules:\n  daily: {{daily: {{interval: 1d, keep: 3}}}}\njobs:\n{jobs}",
        base.display()
    );
    let config = backy_common::config::ServerConfig::from_yaml(&text, "test").expect("test config");
    std::sync::Arc::new(Server::new(config, backy_common::revision::StorageMode::Copy))
}
