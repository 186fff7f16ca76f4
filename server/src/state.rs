//! The server's shared state: configuration, storage root, and what is
//! running right now (pushes, readers), which expiry and forget consult so
//! they never remove a revision in use.

use crate::storage::JobDir;
use backy_common::config::ServerConfig;
use backy_common::revision::{RevisionMeta, StorageMode};
use backy_common::schedule::{Dated, FutureDated};
use backy_common::{JobName, Result, RevisionId};
use chrono::{DateTime, Utc};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// What is happening to one job right now, and its recent failures.
#[derive(Debug, Default, Clone)]
pub struct JobRuntime {
    /// The revision being pushed and its parent.
    pub push: Option<(RevisionId, Option<RevisionId>)>,
    /// Revisions being read (restore, manifest streaming), with counts.
    pub readers: HashMap<RevisionId, usize>,
    pub failures: u32,
    pub last_failure: Option<DateTime<Utc>>,
    /// When a push outcome was last recorded (success or failure).
    pub last_outcome: Option<DateTime<Utc>>,
    pub last_error: String,
    /// The revision id of the last failed push the server saw, so a
    /// client's report of the same attempt is not counted twice.
    pub last_failed_rev: Option<RevisionId>,
}

pub struct Server {
    config: RwLock<Arc<ServerConfig>>,
    /// Committed revisions per job, kept true by invalidation.
    pub index: crate::index::Index,
    /// Open connections (before and after authentication).
    pub connections: Arc<crate::listener::Connections>,
    /// The jobs of each client identity, from the current config.
    by_client: RwLock<Arc<JobsByClient>>,
    pub storage_mode: StorageMode,
    runtime: Mutex<HashMap<JobName, JobRuntime>>,
    /// Bounds re-digest and verify work, shared fairly between callers.
    pub work: Arc<crate::work::WorkPool>,
    /// Counters and histograms for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Set once SIGTERM/SIGINT came: `/readyz` answers 503 from then on.
    pub stopping: std::sync::atomic::AtomicBool,
    /// As a replica: the jobs it copies and how they stand.
    pub replication: crate::replica::Replication,
    /// As a source: what each replica fetched.
    pub fetched: crate::replica::FetchLog,
    /// Per job with revisions dated after the clock: when each was found.
    future: Mutex<HashMap<JobName, FutureDated>>,
}

impl Server {
    pub fn new(config: ServerConfig, storage_mode: StorageMode) -> Self {
        let replication = crate::replica::Replication::load(&config.base_dir);
        let fetched = crate::replica::FetchLog::load(&config.base_dir);
        let config = replication.effective(config);
        let by_client = jobs_by_client(&config);
        Server {
            config: RwLock::new(Arc::new(config)),
            index: Default::default(),
            connections: Default::default(),
            by_client: RwLock::new(Arc::new(by_client)),
            storage_mode,
            runtime: Mutex::new(HashMap::new()),
            work: Arc::new(crate::work::WorkPool::for_this_host()),
            metrics: Default::default(),
            stopping: Default::default(),
            replication,
            fetched,
            future: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Takes `config` (with the jobs this server copies from a source
    /// added, see [`crate::replica::Replication::effective`]).
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
        self.index.clear();
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

    /// The committed revisions (and allocation, first-seen time) of a job,
    /// from the index.
    pub fn indexed(&self, job: &JobDir) -> Result<Arc<crate::index::JobEntry>> {
        self.index.get(job)
    }

    fn runtime(&self) -> MutexGuard<'_, HashMap<JobName, JobRuntime>> {
        self.runtime.lock().unwrap_or_else(|p| p.into_inner())
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

    /// `revs` of `job` as scheduling and SLA see them at `now`: revisions
    /// dated after `now` count as dated when first found (see
    /// [`FutureDated`]). Each is logged once, as a warning, when found.
    pub fn dated<'a>(&self, job: &JobName, revs: &'a [RevisionMeta], now: DateTime<Utc>) -> Dated<'a> {
        let mut all = self.future.lock().unwrap_or_else(|p| p.into_inner());
        // Most jobs have none: nothing is kept for them.
        let mut mine = all.remove(job).unwrap_or_default();
        let dated = mine.date(revs, now);
        if !mine.is_empty() {
            all.insert(job.clone(), mine);
        }
        drop(all);
        for id in &dated.found {
            let at = revs.iter().find(|r| r.id == *id).map(|r| r.timestamp);
            tracing::warn!(
                job = %job, rev = %id, timestamp = ?at, now = %now,
                "revision dated after the server's clock (the clock stepped back?): \
                 scheduling and SLA count it as dated now until its date is reached"
            );
        }
        dated
    }

    pub fn job_runtime(&self, job: &JobName) -> JobRuntime {
        self.runtime().get(job).cloned().unwrap_or_default()
    }

    /// Revisions that must not be removed now: the parent of a running push
    /// and everything being read.
    pub fn protected(&self, job: &JobName) -> BTreeSet<RevisionId> {
        let rt = self.runtime();
        let Some(r) = rt.get(job) else {
            return BTreeSet::new();
        };
        r.readers
            .keys()
            .copied()
            .chain(r.push.iter().filter_map(|(_, parent)| *parent))
            .collect()
    }

    /// Takes the job's push slot (one push or copy per job at a time), or
    /// fails with `Busy`; cleared when the guard drops. Its base is named
    /// with [`PushGuard::set_parent`] inside the transaction that chose it.
    pub fn try_start_push(self: &Arc<Self>, job: &JobName, id: RevisionId) -> Result<PushGuard> {
        let mut rt = self.runtime();
        let r = rt.entry(job.clone()).or_default();
        if r.push.is_some() {
            return Err(backy_common::Error::busy(format!(
                "job {job} is busy: another push is running"
            )));
        }
        r.push = Some((id, None));
        Ok(PushGuard {
            server: self.clone(),
            job: job.clone(),
        })
    }

    /// Registers a reader of a revision; cleared when the guard drops.
    pub fn start_read(self: &Arc<Self>, job: &JobName, id: RevisionId) -> ReadGuard {
        *self
            .runtime()
            .entry(job.clone())
            .or_default()
            .readers
            .entry(id)
            .or_default() += 1;
        ReadGuard {
            server: self.clone(),
            job: job.clone(),
            id,
        }
    }

    /// Records how a push of `job` (as the client named it) ended, for
    /// configured jobs only: a peer cannot grow this table with made-up names.
    pub fn record_push_outcome<T>(&self, job: &str, rev: &str, result: &Result<T>) {
        let Ok(name) = JobName::new(job) else { return };
        if !self.config().jobs.contains_key(&name) {
            return;
        }
        let outcome = match result {
            Ok(_) => Ok(()),
            Err(e) => Err(e.message.clone()),
        };
        self.record_outcome(&name, &outcome);
        if result.is_err() {
            if let Some(r) = self.runtime().get_mut(&name) {
                r.last_failed_rev = rev.parse().ok();
            }
        }
    }

    /// A push that failed on the client: counted, unless the server already
    /// counted the same attempt (`rev`), whose reason the client's then
    /// replaces (it knows better why its stream broke). Returns the
    /// consecutive failures now.
    pub fn record_client_failure(&self, job: &JobName, rev: Option<RevisionId>, error: &str) -> u32 {
        let failures = self.count_client_failure(job, rev, error);
        self.metrics.push_failed_on_client();
        self.index.notify();
        failures
    }

    fn count_client_failure(&self, job: &JobName, rev: Option<RevisionId>, error: &str) -> u32 {
        let error = crate::text::clip(error);
        let mut rt = self.runtime();
        let r = rt.entry(job.clone()).or_default();
        let now = Utc::now();
        if rev.is_none() || r.last_failed_rev != rev || r.failures == 0 {
            r.failures = r.failures.saturating_add(1);
        }
        r.last_failure = Some(now);
        r.last_outcome = Some(now);
        r.last_error = error;
        r.last_failed_rev = rev;
        r.failures
    }

    pub fn record_outcome(&self, job: &JobName, result: &std::result::Result<(), String>) {
        {
            let mut rt = self.runtime();
            let r = rt.entry(job.clone()).or_default();
            r.last_outcome = Some(Utc::now());
            match result {
                Ok(()) => {
                    r.failures = 0;
                    r.last_error.clear();
                }
                Err(e) => {
                    r.failures = r.failures.saturating_add(1);
                    r.last_failure = Some(Utc::now());
                    r.last_error = crate::text::clip(e);
                }
            }
        }
        // After the update: agents woken by it plan with the new counts.
        self.index.notify();
    }
}

impl Server {
    /// An agent reported a failure for an order given at `ordered_at`: count
    /// it unless the push itself already reached the server and was recorded.
    pub fn record_agent_failure(&self, job: &JobName, ordered_at: DateTime<Utc>, error: &str) {
        let already = self
            .runtime()
            .get(job)
            .and_then(|r| r.last_outcome)
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

pub struct PushGuard {
    server: Arc<Server>,
    job: JobName,
}

impl PushGuard {
    /// Names the revision the push builds on: protected from expiry and
    /// forget until the guard drops. Call inside the job's transaction.
    pub fn set_parent(&self, parent: Option<RevisionId>) {
        if let Some(r) = self.server.runtime().get_mut(&self.job) {
            if let Some(p) = r.push.as_mut() {
                p.1 = parent;
            }
        }
    }
}

impl Drop for PushGuard {
    fn drop(&mut self) {
        if let Some(r) = self.server.runtime().get_mut(&self.job) {
            r.push = None;
        }
    }
}

pub struct ReadGuard {
    server: Arc<Server>,
    job: JobName,
    id: RevisionId,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        if let Some(r) = self.server.runtime().get_mut(&self.job) {
            if let Some(n) = r.readers.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    r.readers.remove(&self.id);
                }
            }
        }
    }
}
