//! Serving jobs whose revisions live in a Ceph pool (`store: {type:
//! ceph-rbd}`; issue 36, first slice): plan, push (whole blocks through
//! `PoolPush`), manifest, status and restore, each on `crate::pool`;
//! tags, distrust and forget ([`change`]), verify ([`verify`]) and
//! expiry on the lease holder ([`expire`]).
//! Everything else is refused on such a store with one line
//! ([`unsupported`]); docs/DESIGN.md "Ceph pool store" lists what.
//!
//! The server takes a job's lease at its first push (or change, or
//! verify) and keeps it
//! (renewed by [`spawn_renewal`], released at shutdown): one server per
//! pool for now, no take-over or redirects yet.

pub mod change;
pub mod expire;
pub mod verify;

use crate::ceph::LeaseKeeper;
use crate::pool::{PoolConfig, PoolPush, PoolStore};
use crate::push::{Received, Step};
use crate::state::Server;
use backy_common::config::{CephStoreConfig, ServerConfig, NO_SCHEDULE};
use backy_common::lease::LeaseTimes;
use backy_common::manifest::Manifest;
use backy_common::revision::RevisionMeta;
use backy_common::spec::Spec;
use backy_common::{granules, Error, JobName, Result, RevisionId, DEFAULT_BLOCK_SIZE, MAX_FRAME_DATA};
use backy_proto::restore_frame::Frame;
use backy_proto::{
    JobStatus, JobSummary, ManifestChunk, PlanReply, PlanRequest, PushBegin, RestoreFrame, RevisionInfo,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// The lease: 30 s, renewed every 10 s, writes stop 5 s before it could
/// expire (docs/DESIGN.md "The lease and fencing").
const LEASE: (u64, u64, u64) = (30_000, 10_000, 5_000);
/// Bounds every call to the cluster.
const OP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The pool store of a server and the leases it holds.
pub struct PoolBackend {
    pub store: PoolStore,
    /// Names this server in lock records ("held by server NAME").
    name: String,
    times: LeaseTimes,
    keepers: Mutex<HashMap<JobName, Arc<Mutex<LeaseKeeper>>>>,
}

/// One line for what a pool store does not do yet (FAILED_PRECONDITION).
pub fn unsupported(what: &str) -> Error {
    Error::precondition(format!(
        "{what} is not supported on a ceph-rbd store yet (docs/DESIGN.md, \"Ceph pool store\")"
    ))
}

impl PoolBackend {
    /// Connects as the configured identity (blocks).
    pub fn open(c: &CephStoreConfig, listen: &str) -> Result<PoolBackend> {
        let store = PoolStore::open(PoolConfig {
            conf: c.conf.clone(),
            id: c.id.clone(),
            keyring: c.keyring.clone(),
            pool: c.pool.clone(),
            namespace: c.namespace.clone(),
            op_timeout: Some(OP_TIMEOUT),
        })?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown-host".to_string());
        let times = LeaseTimes::new(LEASE.0, LEASE.1, LEASE.2)
            .map_err(|e| Error::internal(format!("lease times: {e}")))?;
        Ok(PoolBackend {
            store,
            name: format!("{host} {listen}"),
            times,
            keepers: Mutex::default(),
        })
    }

    fn keepers(&self) -> std::sync::MutexGuard<'_, HashMap<JobName, Arc<Mutex<LeaseKeeper>>>> {
        self.keepers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's lease, taken now if this server does not hold it.
    fn lease(&self, job: &JobName) -> Result<Arc<Mutex<LeaseKeeper>>> {
        if let Some(k) = self.keepers().get(job) {
            return Ok(k.clone());
        }
        let mut keeper = self.store.keeper(job, &self.name, self.times);
        keeper
            .take()
            .map_err(|e| Error::from(crate::pool::PoolError::from(e)).context(format!("job {job}")))?;
        tracing::info!(job = %job, epoch = keeper.epoch(), "took the job's lease in the pool");
        let keeper = Arc::new(Mutex::new(keeper));
        self.keepers().insert(job.clone(), keeper.clone());
        Ok(keeper)
    }

    /// Renews every held lease; a lost one is dropped (the next push
    /// takes it again, or is refused while another server holds it).
    pub fn renew_all(&self) {
        let held: Vec<_> = self
            .keepers()
            .iter()
            .map(|(j, k)| (j.clone(), k.clone()))
            .collect();
        for (job, keeper) in held {
            let renewed = lock(&keeper).renew();
            if let Err(e) = renewed {
                tracing::warn!(job = %job, "lost the job's lease: {e}");
                self.keepers().remove(&job);
            }
        }
    }

    /// Releases every held lease (shutdown).
    pub fn release_all(&self) {
        let held: Vec<_> = self.keepers().drain().collect();
        for (job, keeper) in held {
            if let Err(e) = lock(&keeper).release() {
                tracing::warn!(job = %job, "releasing the job's lease: {e}");
            }
        }
    }

    /// The job's revisions, oldest first.
    pub fn revisions(&self, job: &JobName) -> Result<Vec<RevisionMeta>> {
        Ok(self.store.revisions(job)?)
    }

    /// The revision `spec` names.
    /// `job` (a name from a request, which the server's config must list)
    /// and its revision `spec`.
    pub fn resolve_request(&self, server: &Server, job: &str, spec: &str) -> Result<(JobName, RevisionMeta)> {
        let job = JobName::new(job)?;
        server.config().job(&job)?;
        let meta = self.resolve(&job, spec)?;
        Ok((job, meta))
    }

    pub fn resolve(&self, job: &JobName, spec: &str) -> Result<RevisionMeta> {
        let spec = Spec::parse(if spec.is_empty() { "latest" } else { spec })?;
        let revs = self.revisions(job)?;
        let i = spec
            .resolve_one(&revs)
            .map_err(|e| e.context(format!("job {job}")))?;
        revs.get(i)
            .cloned()
            .ok_or_else(|| Error::internal("spec resolved outside the revision list"))
    }

    /// Whether the image's head holds writes beyond `parent` (a push that
    /// died): then only a full push gives the right revision.
    fn head_dirty(&self, job: &JobName, parent: &RevisionMeta) -> Result<bool> {
        Ok(!self.store.head_changes(job, &parent.id)?.is_empty())
    }
}

fn lock(k: &Mutex<LeaseKeeper>) -> std::sync::MutexGuard<'_, LeaseKeeper> {
    k.lock().unwrap_or_else(|p| p.into_inner())
}

/// Renews the held leases on time until the process ends.
pub fn spawn_renewal(pool: Arc<PoolBackend>) {
    let every = std::time::Duration::from_millis(pool.times.renew_after / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let p = pool.clone();
            let _ = tokio::task::spawn_blocking(move || p.renew_all()).await;
        }
    });
}

/// The configured job `name`; unknown jobs are `NotFound`.
fn job_name(server: &Server, name: &str) -> Result<JobName> {
    let name = JobName::new(name)?;
    server.config().job(&name)?;
    Ok(name)
}

/// Plans a push. Schedules are not evaluated on a pool yet: every push
/// runs, with the given tags or else every tag of the job's schedule.
pub fn plan(server: &Server, pool: &PoolBackend, req: &PlanRequest) -> Result<PlanReply> {
    let job = job_name(server, &req.job)?;
    let config = server.config();
    let schedule = config.schedule_of(config.job(&job)?);
    crate::revisions::check_tags(&req.tags, schedule, req.allow_unscheduled)?;
    let revs = pool.revisions(&job)?;
    let mut reason = "ceph-rbd store: schedules are not evaluated yet, every push runs".to_string();
    let mut parent = crate::plan::choose_parent(&revs);
    if let Some(p) = parent {
        if pool.head_dirty(&job, p)? {
            reason.push_str("; a push that died left writes in the image: this one is full");
            parent = None;
        }
    }
    let tags = match (req.tags.is_empty(), schedule) {
        (true, Some(s)) => s.keys().cloned().collect(),
        _ => req.tags.clone(),
    };
    Ok(PlanReply {
        due: true,
        tags,
        parent_id: parent.map(|p| p.id.uuid().to_string()).unwrap_or_default(),
        parent_snapshot: parent.map(|p| p.source.snapshot.clone()).unwrap_or_default(),
        parent_size: parent.map(|p| p.size).unwrap_or(0),
        parent_key_check: Vec::new(),
        block_size: DEFAULT_BLOCK_SIZE,
        new_id: RevisionId::new_random().uuid().to_string(),
        reason,
        resume: false,
        resume_size: 0,
        resume_checkpoint: 0,
        dedup: false,
    })
}

/// Runs a whole push into the pool (see [`crate::push::run`], whose checks
/// it repeats): the lease, orphans and dead deletions first, then the
/// ranges into `PoolPush`, committed under the lease. The granule exchange
/// is answered "every granule wanted": whole changed blocks come.
pub fn push(
    server: Arc<Server>,
    pool: &PoolBackend,
    begin: PushBegin,
    mut rx: mpsc::Receiver<Step>,
    mut answer: Option<crate::push::Answer>,
) -> Result<Received> {
    let job = job_name(&server, &begin.job)?;
    let config = server.config();
    let job_cfg = config.job(&job)?;
    let id: RevisionId = begin
        .rev_id
        .parse()
        .map_err(|e: Error| e.context("push: rev_id"))?;
    if begin.resume {
        return Err(unsupported("resuming a push"));
    }
    if begin.group.is_some() || begin.hold {
        return Err(unsupported("a group push"));
    }
    if !begin.key_check.is_empty() {
        return Err(unsupported("a client-encrypted push"));
    }
    if begin.block_size != DEFAULT_BLOCK_SIZE {
        return Err(Error::invalid(format!(
            "block size {} is not this server's {DEFAULT_BLOCK_SIZE}",
            begin.block_size
        )));
    }
    backy_common::revision::check_source_snapshot(&begin.source_snapshot)?;
    let max = job_cfg.max_size.unwrap_or(crate::push::DEFAULT_MAX_SIZE);
    if begin.size > max {
        return Err(Error::exhausted(format!(
            "image size {} exceeds job {job}'s limit of {max} bytes (max-size)",
            begin.size
        )));
    }
    if begin.size == 0 || begin.size > backy_common::manifest::MAX_IMAGE_SIZE {
        return Err(Error::invalid(format!(
            "job {job}: image size {} is out of range",
            begin.size
        )));
    }
    let tags = crate::push::check_tags(&begin.tags, config.schedule_of(job_cfg), begin.allow_unscheduled)?;
    // One push per job on this server; the lease keeps other servers out.
    let _running = server.jobs.activity.try_start_push(&job, id)?;
    let keeper = pool.lease(&job)?;
    pool.store.add_job(&job)?;
    {
        let mut k = lock(&keeper);
        pool.store.finish_deletions(&mut k, &job)?;
        let removed = pool.store.clean_orphans(&mut k, &job, &[])?;
        if !removed.is_empty() {
            tracing::warn!(job = %job, orphans = removed.len(), "removed snapshots without a record");
        }
    }
    let revs = pool.revisions(&job)?;
    let parent = match crate::push::check_against_stored(&job, id, &begin, &revs)? {
        None => None,
        Some(meta) => {
            if pool.head_dirty(&job, meta)? {
                return Err(Error::precondition(format!(
                "job {job}: a push that died left writes in the image; run the push again (it will be full)"
            )));
            }
            let manifest = pool.store.manifest(&job, meta)?;
            Some((meta.clone(), manifest))
        }
    };
    // Protected from forget before the keeper's lock is taken to begin
    // (see `change::forget`).
    let parent_id = parent.as_ref().map(|(m, _)| m.id);
    _running.set_parent(parent_id);
    let spec = crate::push::new_revision_spec(&begin, id, tags, None, None);
    let mut rev = {
        let k = lock(&keeper);
        PoolPush::begin(
            &pool.store,
            &k,
            &job,
            spec,
            parent.as_ref().map(|(m, f)| (m, f.clone())),
        )?
    };
    let block_len = |block: u64| {
        let start = block * u64::from(DEFAULT_BLOCK_SIZE);
        begin
            .size
            .saturating_sub(start)
            .min(u64::from(DEFAULT_BLOCK_SIZE))
    };
    let (meta, expired) = loop {
        match rx.blocking_recv() {
            Some(Step::Data(offset, data)) => rev.data(offset, &data)?,
            Some(Step::Zero(offset, len)) => rev.zero(offset, len)?,
            Some(Step::Granules(block, _, _)) => {
                let Some(answer) = answer.as_mut() else {
                    return Err(Error::invalid("granule digests outside the granule exchange"));
                };
                if block_len(block) == 0 {
                    return Err(Error::invalid(format!(
                        "granule digests of block {block} past the end"
                    )));
                }
                // No granule digests are kept in the pool yet: every
                // granule of a changed block is wanted.
                if answer(block, granules::all_wanted(block_len(block)), false).is_err() {
                    return Err(gone());
                }
            }
            Some(Step::End(end)) => {
                // Sealing waits for rbd and reads blocks back: without the
                // keeper's lock, so its renewal goes on meanwhile.
                let mut sealed = rev.seal(&end)?;
                // This server's lock for the job, from the revision's time.
                if let Some(lock) = config.retention_lock_of(job_cfg) {
                    sealed.set_locked_until(Some(backy_common::revision::lock_end(
                        sealed.meta().timestamp,
                        lock,
                    )?));
                }
                let mut k = lock(&keeper);
                change::check_parent(pool, &job, parent_id)?;
                let meta = sealed.publish(&mut k)?;
                if meta.locked_until.is_some() {
                    // The record's lock already refuses every deletion
                    // through backy; the protection keeps `rbd snap rm`
                    // out too. Retried by the expiry round if it fails.
                    if let Err(e) = pool.store.protect(&job, &meta.id) {
                        tracing::error!(job = %job, rev = %meta.id, "rbd snap protect of a locked revision: {e}");
                    }
                }
                // Published: the parent expires like any other from here.
                _running.set_parent(None);
                let expired = expire::after_commit(&server, pool, &job, &mut k, meta.id);
                break (meta, expired);
            }
            Some(Step::Abort(why)) => return Err(Error::invalid(why)),
            None => return Err(gone()),
        }
    };
    tracing::info!(
        job = %job, rev = %meta.id, size = meta.size, received = meta.stats.bytes_received,
        changed_blocks = meta.stats.changed_blocks, "committed revision to the pool"
    );
    Ok(Received {
        meta,
        expired,
        held: false,
    })
}

fn gone() -> Error {
    Error::unavailable("push stream ended before its end frame; nothing was committed")
}

/// Streams a revision's manifest from its pieces in the pool.
pub fn stream_manifest(
    pool: &PoolBackend,
    job: &JobName,
    meta: &RevisionMeta,
    tx: &mpsc::Sender<std::result::Result<ManifestChunk, tonic::Status>>,
) {
    match pool.store.manifest(job, meta) {
        Ok(m) => crate::restore::send_manifest(RevisionInfo::from(meta), &m, tx),
        Err(e) => {
            let _ = tx.blocking_send(Err(crate::wire::to_status(e.into())));
        }
    }
}

/// Streams a whole revision read from its snapshot (librbd), zero blocks
/// as zero ranges; `from`: a resumed restore's block-aligned offset.
/// `Ok(false)`: the receiver went away.
pub fn stream_image(
    server: &Server,
    pool: &PoolBackend,
    job: &JobName,
    meta: &RevisionMeta,
    from: u64,
    tx: mpsc::Sender<std::result::Result<RestoreFrame, tonic::Status>>,
) -> Result<bool> {
    // In use: a forget through this server is refused meanwhile.
    let _reading = server.jobs.activity.start_read(job, meta.id);
    let send = |frame: Frame| {
        let n = match &frame {
            Frame::Data(d) => d.data.len(),
            _ => 0,
        };
        let sent = tx.blocking_send(Ok(RestoreFrame { frame: Some(frame) })).is_ok();
        if sent {
            server.metrics.sent(n);
        }
        sent
    };
    let result = (|| -> Result<bool> {
        let manifest: Manifest = pool.store.manifest(job, meta)?;
        if !from.is_multiple_of(u64::from(meta.block_size)) || from > meta.size {
            return Err(Error::invalid(format!(
                "resume offset {from}: must be a multiple of the block size {} within the image's {} bytes",
                meta.block_size, meta.size
            )));
        }
        let reader = pool.store.open_revision(job, &meta.id)?;
        let size = reader.size()?;
        if size != meta.size {
            return Err(Error::data_loss(format!(
                "job {job}: snapshot {} has {size} bytes, the revision says {}",
                meta.id, meta.size
            )));
        }
        if !send(Frame::Begin(RevisionInfo::from(meta))) {
            return Ok(false);
        }
        let mut out = crate::restore::Frames::new(send);
        for block in from / u64::from(meta.block_size)..manifest.block_count() {
            let (offset, len) = (manifest.block_offset(block), manifest.block_len(block));
            if manifest.is_zero(block) {
                if !out.zero(offset, len) {
                    return Ok(false);
                }
                continue;
            }
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(MAX_FRAME_DATA as u64) as usize;
                let mut data = vec![0u8; n];
                let got = reader.read_at(pos, &mut data)?;
                if got != n {
                    return Err(Error::data_loss(format!(
                        "job {job}: snapshot {} ends at {} within the revision's {} bytes",
                        meta.id,
                        pos + got as u64,
                        meta.size
                    )));
                }
                if !out.data(pos, data) {
                    return Ok(false);
                }
                pos += n as u64;
            }
        }
        Ok(out.end())
    })();
    if let Err(e) = &result {
        tracing::error!(job = %job, rev = %meta.id, "restore failed: {e}");
        let _ = tx.blocking_send(Err(crate::wire::to_status(e.clone())));
    }
    result
}

/// A job's status from the pool: its revisions; what the pool does not
/// keep yet (space, schedules' due times) is left empty.
pub fn header(
    server: &Server,
    pool: &PoolBackend,
    config: &ServerConfig,
    name: &str,
) -> Result<(JobStatus, Vec<RevisionInfo>)> {
    let job = job_name(server, name)?;
    let job_cfg = config.job(&job)?;
    let revs = pool.revisions(&job)?;
    let runtime = server.jobs.activity.job_runtime(&job);
    let status = JobStatus {
        job: name.to_string(),
        schedule: job_cfg
            .schedule
            .clone()
            .unwrap_or_else(|| NO_SCHEDULE.to_string()),
        storage: backy_proto::wire_storage(backy_common::revision::StorageMode::Reflink) as i32,
        running: runtime.push.is_some(),
        sla_ok: true,
        failures: runtime.failures,
        last_error: runtime.last_error,
        client: job_cfg.client.clone().unwrap_or_default(),
        ..JobStatus::default()
    };
    Ok((status, revs.iter().map(RevisionInfo::from).collect()))
}

/// A job's summary from the pool (see [`header`]).
pub fn summary(
    server: &Server,
    pool: &PoolBackend,
    config: &ServerConfig,
    name: &JobName,
) -> Result<JobSummary> {
    let (status, revs) = header(server, pool, config, name.as_str())?;
    Ok(JobSummary {
        job: status.job,
        schedule: status.schedule,
        revisions: u32::try_from(revs.len()).unwrap_or(u32::MAX),
        newest: revs.last().cloned(),
        newest_trusted: revs.last().and_then(|r| r.timestamp),
        storage: status.storage,
        running: status.running,
        sla_ok: true,
        failures: status.failures,
        last_error: status.last_error,
        ..JobSummary::default()
    })
}
