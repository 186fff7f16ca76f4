//! Building `status` replies: one job with its revisions, or a summary per
//! job for a whole host. Both read the index, never the disk.

use crate::job::JobRuntime;
use crate::state::Server;
use crate::storage::JobDir;
use backy_common::config::{ServerConfig, NO_SCHEDULE};
use backy_common::revision::{RevisionMeta, Trust};
use backy_common::space::Usage;
use backy_common::{JobName, Result};
use backy_proto::{
    JobStatus, JobSummary, ReplicaFetch, ReplicaState, RevisionChunk, RevisionInfo, Space, StatusReply,
    StatusRequest, StoreSpace,
};
use prost::Message;

/// What status says about a job besides its revisions.
pub struct Health {
    pub schedule: String,
    pub storage: i32,
    pub sla_ok: bool,
    pub sla_overdue_secs: i64,
    pub sla_window_secs: u64,
    pub next_due: Option<backy_proto::prost_types::Timestamp>,
    pub next_tags: Vec<String>,
    pub runtime: JobRuntime,
    /// Revisions dated after the server's clock.
    pub future: Vec<String>,
}

impl Health {
    /// `job`'s status with these fields filled in (the rest: the caller's
    /// store).
    pub fn status(self, job: &str) -> JobStatus {
        JobStatus {
            job: job.to_string(),
            schedule: self.schedule,
            storage: self.storage,
            running: self.runtime.push.is_some(),
            sla_ok: self.sla_ok,
            sla_overdue_secs: self.sla_overdue_secs,
            sla_window_secs: self.sla_window_secs,
            next_due: self.next_due,
            next_tags: self.next_tags,
            failures: self.runtime.failures,
            last_error: self.runtime.last_error,
            future_revisions: self.future,
            ..JobStatus::default()
        }
    }

    /// `job`'s summary with these fields filled in.
    pub fn summary(self, job: &str) -> JobSummary {
        JobSummary {
            job: job.to_string(),
            schedule: self.schedule,
            storage: self.storage,
            running: self.runtime.push.is_some(),
            sla_ok: self.sla_ok,
            sla_overdue_secs: self.sla_overdue_secs,
            sla_window_secs: self.sla_window_secs,
            next_due: self.next_due,
            next_tags: self.next_tags,
            failures: self.runtime.failures,
            last_error: self.runtime.last_error,
            future_revisions: self.future,
            ..JobSummary::default()
        }
    }
}

/// A job's health from its revisions (from the index, or from the pool);
/// `since`: when the store first knew the job (the first backup's grace).
pub fn health(
    server: &Server,
    config: &ServerConfig,
    job: &JobName,
    revs: &[RevisionMeta],
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Health> {
    let job_cfg = config.job(job)?;
    let now = chrono::Utc::now();
    let dated = server.jobs.activity.dated(job, revs, now);
    // A copy takes no pushes: its schedule only keeps copies, nothing is
    // ever due.
    let copy = server.is_copy(job);
    let sched = config.schedule_of(job_cfg).map(|s| {
        let sla = backy_common::schedule::sla(s, &dated.revisions, now, since);
        let due = (!copy).then(|| crate::schedule::due_state(server, job, s, revs));
        (sla, due)
    });
    let storage = revs.last().map(|r| r.storage).unwrap_or(server.storage_mode);
    Ok(Health {
        schedule: job_cfg
            .schedule
            .clone()
            .unwrap_or_else(|| NO_SCHEDULE.to_string()),
        storage: backy_proto::wire_storage(storage) as i32,
        sla_ok: sched.as_ref().is_none_or(|(sla, _)| sla.ok),
        sla_overdue_secs: sched.as_ref().map_or(0, |(sla, _)| sla.overdue.as_secs() as i64),
        sla_window_secs: config
            .schedule_of(job_cfg)
            .and_then(backy_common::schedule::sla_window)
            .map_or(0, |w| w.as_secs()),
        next_due: sched
            .as_ref()
            .and_then(|(_, due)| due.as_ref()?.next_due)
            .map(|t| backy_proto::timestamp(&t)),
        next_tags: sched
            .as_ref()
            .and_then(|(_, due)| due.as_ref())
            .map(|due| due.next_tags.iter().cloned().collect())
            .unwrap_or_default(),
        runtime: server.jobs.activity.job_runtime(job),
        future: dated.future.iter().map(ToString::to_string).collect(),
    })
}

/// One job with every revision (`req.job`), or every job (the status
/// page; old clients get only the jobs they may see, see [`of_jobs`]).
pub fn status(server: &Server, req: &StatusRequest) -> Result<StatusReply> {
    let names: Vec<String> = if req.job.is_empty() {
        server.config().jobs.keys().map(|j| j.to_string()).collect()
    } else {
        vec![req.job.clone()]
    };
    of_jobs(server, &names)
}

/// The named jobs, each with every revision, in one reply.
pub fn of_jobs(server: &Server, names: &[String]) -> Result<StatusReply> {
    let config = server.config();
    let mut jobs = Vec::with_capacity(names.len());
    for name in names {
        let (mut job, revs) = header(server, &config, name)?;
        job.revisions = revs.revisions;
        jobs.push(job);
    }
    Ok(StatusReply {
        jobs,
        // On a pool the base dir holds no revision.
        store: server.pool().is_none().then(|| store_space(&config)).flatten(),
    })
}

fn wire_space(u: &Usage, on_disk: Option<u64>) -> Space {
    Space {
        total_bytes: u.total,
        exclusive_bytes: u.exclusive,
        shared_bytes: u.shared,
        disk_bytes: on_disk.unwrap_or(0),
    }
}

/// The store's filesystem; `None` (and logged) when statvfs fails.
fn store_space(config: &ServerConfig) -> Option<StoreSpace> {
    crate::storage::space::store_space(&config.base_dir)
        .inspect_err(|e| tracing::warn!("store space unknown: {e}"))
        .ok()
        .map(|s| StoreSpace {
            size_bytes: s.size,
            used_bytes: s.used,
        })
}

/// Revisions per message of a status stream, by encoded size: far below
/// the message limit, whatever a revision's tags and snapshot name hold.
const CHUNK_BYTES: usize = 256 << 10;

/// A job's revisions, oldest first, in chunks of at most [`CHUNK_BYTES`]
/// (a revision alone may be larger: it is bounded by its fields' limits).
pub fn chunks(revisions: &[RevisionInfo]) -> impl Iterator<Item = RevisionChunk> + '_ {
    let mut rest = revisions.iter().peekable();
    std::iter::from_fn(move || {
        rest.peek()?;
        let mut chunk = RevisionChunk::default();
        let mut bytes = 0;
        while let Some(info) = rest.next_if(|_| chunk.revisions.is_empty() || bytes < CHUNK_BYTES) {
            let info = info.clone();
            bytes += info.encoded_len() + 4;
            chunk.revisions.push(info);
        }
        Some(chunk)
    })
}

/// A job's revisions as status sends them, oldest first: their metadata
/// and what each takes on disk.
pub struct Revisions {
    pub revisions: Vec<RevisionInfo>,
}

/// One job's status without its revisions, and its revisions (from the
/// filesystem store's index, or from the pool).
pub fn header(server: &Server, config: &ServerConfig, name: &str) -> Result<(JobStatus, Revisions)> {
    if let Some(pool) = server.pool() {
        let (status, revisions) = crate::pool_serve::header(server, &pool, config, name)?;
        return Ok((status, Revisions { revisions }));
    }
    let job = server.job(name)?;
    let entry = server.jobs.indexed(&job)?;
    let h = health(server, config, job.name(), &entry.revisions, entry.since)?;
    let space = server.jobs.space(&job, &entry);
    let revisions = entry
        .revisions
        .iter()
        .map(|r| RevisionInfo {
            space: space
                .revisions
                .get(&r.id)
                .map(|u| wire_space(u, space.revisions_on_disk.get(&r.id).copied())),
            ..RevisionInfo::from(r)
        })
        .collect();
    let status = JobStatus {
        space: space.job.as_ref().map(|u| wire_space(u, space.job_on_disk)),
        store: store_space(config),
        allocated_bytes: entry.allocated_bytes(&job),
        replica: replica_state(server, config, job.name()),
        fetched_by: server
            .fetched
            .of(job.name())
            .into_iter()
            .map(|(replica, f)| ReplicaFetch {
                replica,
                revision: f.revision.to_string(),
                at: Some(backy_proto::timestamp(&f.at)),
            })
            .collect(),
        // Its owner, for a replica of this server (see proto/backy.proto).
        client: config
            .job(job.name())
            .ok()
            .and_then(|j| j.client.clone().or_else(|| j.copy_owner.clone()))
            .unwrap_or_default(),
        ..h.status(name)
    };
    Ok((status, Revisions { revisions }))
}

/// On a replica, how its copy of `job` stands.
fn replica_state(server: &Server, config: &ServerConfig, job: &JobName) -> Option<ReplicaState> {
    let r = config.replicate.as_ref()?;
    // A listed job of this server's own is not a copy; its state says why.
    let refused = server.replication.refused(config, job);
    let refused_here = refused.is_some();
    if refused.is_none() && !server.replication.copies(config, job) {
        return None;
    }
    let now = chrono::Utc::now();
    let mut s = server.replication.get(job);
    if let Some(why) = refused {
        s.last_error = why;
    }
    let entry = server
        .jobs
        .indexed(&JobDir::new(&config.base_dir, job.clone()))
        .ok();
    Some(ReplicaState {
        source: r.source.clone(),
        newest: entry
            .and_then(|e| e.revisions.iter().map(|r| r.timestamp).max())
            .map(|t| backy_proto::timestamp(&t)),
        missing: s.missing,
        lag_secs: server.replication.lag(job, now).as_secs(),
        last_round: s.last_round.map(|t| backy_proto::timestamp(&t)),
        last_error: s.last_error,
        lag_warning_secs: r.lag_warning.secs(),
        lag_critical_secs: r.lag_critical.secs(),
        own_retention: config.job(job).is_ok_and(|j| j.schedule.is_some()),
        owner: config
            .job(job)
            .ok()
            .and_then(|j| j.copy_owner.clone())
            .unwrap_or_default(),
        own_job: refused_here,
    })
}

/// The summary of one job.
pub fn summary(server: &Server, config: &ServerConfig, name: &JobName) -> Result<JobSummary> {
    if let Some(pool) = server.pool() {
        return crate::pool_serve::summary(server, &pool, config, name);
    }
    let job = JobDir::new(&config.base_dir, name.clone());
    let entry = server.jobs.indexed(&job)?;
    let h = health(server, config, job.name(), &entry.revisions, entry.since)?;
    let revs = &entry.revisions;
    let newest_trusted = revs
        .iter()
        .rev()
        .find(|r| r.trust != Trust::Distrusted)
        .map(|r| backy_proto::timestamp(&r.timestamp));
    Ok(JobSummary {
        revisions: u32::try_from(revs.len()).unwrap_or(u32::MAX),
        distrusted: u32::try_from(revs.iter().filter(|r| r.trust == Trust::Distrusted).count())
            .unwrap_or(u32::MAX),
        newest: revs.last().map(RevisionInfo::from),
        newest_trusted,
        data_bytes: revs.iter().map(|r| r.stats.bytes_written).sum(),
        allocated_bytes: entry.allocated_bytes(&job),
        // The last count: a host's summaries never wait for FIEMAP.
        space: server
            .jobs
            .last_space(&job, &entry)
            .and_then(|s| s.job.as_ref().map(|u| wire_space(u, s.job_on_disk))),
        store: store_space(config),
        replica: replica_state(server, config, name),
        ..h.summary(name.as_str())
    })
}
