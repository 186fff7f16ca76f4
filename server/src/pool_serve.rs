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
//! (renewed by [`spawn_renewal`], released at shutdown). Several servers
//! may stand in front of one pool: a push reaching a server while another
//! holds the job is refused (ABORTED) naming the holder's URL; once the
//! holder's lease expired (it died or froze), the next push takes the job
//! over and fences the old holder first ([`PoolBackend::lease`]). An
//! operator moves a job to another server with `backy-server hand-over`
//! ([`handover`], [`handover_command`]).

pub mod agent;
pub mod change;
pub mod expire;
mod handover;
pub mod handover_command;
pub mod verify;

use crate::ceph::{LeaseKeeper, Locker};
use crate::pool::{JobSpace, PoolConfig, PoolPush, PoolStore, SnapshotSpace};
use crate::push::{Received, Step};
use crate::state::Server;
use backy_common::config::{CephStoreConfig, ServerConfig};
use backy_common::lease::LeaseTimes;
use backy_common::manifest::Manifest;
use backy_common::revision::RevisionMeta;
use backy_common::spec::Spec;
use backy_common::{granules, Error, JobName, Result, RevisionId, DEFAULT_BLOCK_SIZE, MAX_FRAME_DATA};
use backy_proto::restore_frame::Frame;
use backy_proto::{
    GranuleDigests, JobStatus, JobSummary, ManifestChunk, PlanReply, PlanRequest, PushBegin, RestoreFrame,
    RevisionInfo, Space,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// The pool store of a server and the leases it holds.
pub struct PoolBackend {
    pub store: PoolStore,
    /// Names this server in lock records ("held by server NAME"): the
    /// URL clients reach it by, set once bound ([`PoolBackend::set_address`]).
    name: Mutex<String>,
    times: LeaseTimes,
    keepers: Mutex<HashMap<JobName, Arc<Mutex<LeaseKeeper>>>>,
    /// Jobs taken over from a holder this server has not fenced yet (the
    /// blocklist failed): no write until it is.
    unfenced: Mutex<HashMap<JobName, Locker>>,
    /// Jobs being handed over to or from this server.
    handovers: handover::Handovers,
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
            op_timeout: Some(c.op_timeout.as_duration()),
        })?;
        let host = host_name();
        // The store's lease, lease-renewal and lease-margin (docs/DESIGN.md
        // "The lease and fencing"), checked at parse.
        let times = c.lease_times()?;
        Ok(PoolBackend {
            store,
            name: Mutex::new(format!("{host} {listen}")),
            times,
            keepers: Mutex::default(),
            unfenced: Mutex::default(),
            handovers: Default::default(),
        })
    }

    /// Names this server by the URL clients reach it at (`bound`: the
    /// listener's address, the port the kernel chose for port 0; an
    /// unspecified address is named by the host name), before any lease.
    pub fn set_address(&self, bound: std::net::SocketAddr, tls: bool) {
        let name = advertised(bound, tls, &host_name());
        tracing::info!("this server's name in lock records and hand-overs: {name}");
        *lock_map(&self.name) = name;
    }

    fn keepers(&self) -> std::sync::MutexGuard<'_, HashMap<JobName, Arc<Mutex<LeaseKeeper>>>> {
        self.keepers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's lease, taken now if this server does not hold it: free,
    /// released, or expired. Taking over an expired lease fences its
    /// previous holder first (see [`PoolStore::fence`]), so the caller may
    /// clean the head and write. While another server holds it, or the
    /// job is handed over to another server: `Busy` (ABORTED), with that
    /// server's URL in `redirect`.
    pub fn lease(&self, job: &JobName) -> Result<Arc<Mutex<LeaseKeeper>>> {
        let held = self.keepers().get(job).cloned();
        if let Some(k) = held {
            self.refuse_if_leaving(job)?;
            self.fence_pending(job)?;
            return Ok(k);
        }
        let take = self.check_take(job)?;
        let context = |e: crate::pool::PoolError| Error::from(e).context(format!("job {job}"));
        let name = lock_map(&self.name).clone();
        let mut keeper = self.store.keeper(job, &name, self.times);
        let started = std::time::Instant::now();
        keeper
            .take()
            .map_err(|e| self.take_refused(job, &take, context(e.into())))?;
        tracing::info!(job = %job, epoch = keeper.epoch(), "took the job's lease in the pool");
        let previous = keeper.previous_holder().cloned();
        let keeper = Arc::new(Mutex::new(keeper));
        self.keepers().insert(job.clone(), keeper.clone());
        self.taken(job, take);
        if let Some(previous) = previous {
            // It held the job and did not release it: its lease expired.
            tracing::warn!(
                job = %job, holder = %previous.cookie, client = %previous.client,
                address = %previous.address, "took the job over from its previous holder"
            );
            lock_map(&self.unfenced).insert(job.clone(), previous);
            self.fence_pending(job)?;
            tracing::info!(job = %job, ms = started.elapsed().as_millis() as u64, "took over and fenced");
        }
        Ok(keeper)
    }

    /// Refuses (`Busy`, naming the holder's URL for the client to follow)
    /// when another server holds `job`'s lease now, or the job is handed
    /// over to another server (naming that one): a plan there is wasted.
    /// A free or expired lease is no refusal: the push takes it.
    pub fn refuse_if_held_elsewhere(&self, job: &JobName) -> Result<()> {
        if self.keepers().contains_key(job) {
            return self.refuse_if_leaving(job);
        }
        let take = self.check_take(job)?;
        let name = lock_map(&self.name).clone();
        let keeper = self.store.keeper(job, &name, self.times);
        let context = |e: crate::pool::PoolError| Error::from(e).context(format!("job {job}"));
        // The OSD lists no expired locker: one listed holds the lease now.
        let Some(holder) = keeper.holder().map_err(|e| context(e.into()))? else {
            return Ok(());
        };
        let own = self
            .store
            .cluster()
            .instance_addr()
            .map_err(|e| context(e.into()))?;
        if crate::ceph::same_instance(&own, &holder.address) {
            return Ok(());
        }
        let refused = context(
            crate::ceph::KeeperError::Busy {
                oid: crate::pool::names::job_object(job),
                holder: Some(holder),
            }
            .into(),
        );
        Err(self.take_refused(job, &take, refused))
    }

    /// Fences the previous holder of a job taken over, if not done yet.
    fn fence_pending(&self, job: &JobName) -> Result<()> {
        let Some(previous) = lock_map(&self.unfenced).get(job).cloned() else {
            return Ok(());
        };
        let fenced = self.store.fence(job, &previous).map_err(|e| {
            Error::from(e).context(format!(
                "job {job}: fencing its previous holder {} ({} at {})",
                previous.cookie, previous.client, previous.address
            ))
        })?;
        tracing::warn!(job = %job, addresses = ?fenced, "fenced the job's previous holder (blocklisted)");
        lock_map(&self.unfenced).remove(job);
        Ok(())
    }

    /// The jobs whose lease this server holds now.
    pub fn held_jobs(&self) -> Vec<JobName> {
        self.keepers().keys().cloned().collect()
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

    /// The base of a restore (a revision of `job` the caller holds, by
    /// id): `None` when not asked for; gone is NOT_FOUND, as on a
    /// filesystem store.
    pub fn base(&self, job: &JobName, base: &str) -> Result<Option<RevisionMeta>> {
        if base.is_empty() {
            return Ok(None);
        }
        let id: RevisionId = base.parse().map_err(|e: Error| e.context("base"))?;
        self.revisions(job)?
            .into_iter()
            .find(|r| r.id == id)
            .map(Some)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "job {job}: base revision {id} no longer exists (ask without a base)"
                ))
            })
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

    /// Readies `job` for a new revision (a push's or a replica's copy):
    /// its lease, its entry in the job list, deletions a crash left
    /// unfinished and snapshots without a record removed.
    pub(crate) fn prepare_write(&self, job: &JobName) -> Result<Arc<Mutex<LeaseKeeper>>> {
        let keeper = self.lease(job)?;
        self.store.add_job(job)?;
        let mut k = lock(&keeper);
        self.store.finish_deletions(&mut k, job)?;
        let removed = self.store.clean_orphans(&mut k, job, &[])?;
        if !removed.is_empty() {
            tracing::warn!(job = %job, orphans = removed.len(), "removed snapshots without a record");
        }
        drop(k);
        Ok(keeper)
    }

    /// Whether the image's head holds writes beyond `parent` (a push that
    /// died): then only a full push gives the right revision.
    pub(crate) fn head_dirty(&self, job: &JobName, parent: &RevisionMeta) -> Result<bool> {
        Ok(!self.store.head_changes(job, &parent.id)?.is_empty())
    }
}

pub(crate) fn lock(k: &Mutex<LeaseKeeper>) -> std::sync::MutexGuard<'_, LeaseKeeper> {
    k.lock().unwrap_or_else(|p| p.into_inner())
}

/// This host's name (`/proc/sys/kernel/hostname`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".to_string())
}

/// The URL a client reaches a server bound at `bound` by.
fn advertised(bound: std::net::SocketAddr, tls: bool, host: &str) -> String {
    let scheme = if tls { "https" } else { "http" };
    match bound.ip().is_unspecified() {
        true => format!("{scheme}://{host}:{}", bound.port()),
        false => format!("{scheme}://{bound}"),
    }
}

fn lock_map<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Renews the held leases on time, and carries out hand-overs (one read
/// of the requests per round), until the process ends.
pub fn spawn_renewal(server: Arc<Server>, pool: Arc<PoolBackend>) {
    let every = std::time::Duration::from_millis(pool.times.renew_after / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (s, p) = (server.clone(), pool.clone());
            let _ = tokio::task::spawn_blocking(move || {
                p.renew_all();
                handover::round(&p, &|job| s.config().job(job).is_ok());
            })
            .await;
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
    pool.refuse_if_held_elsewhere(&job)?;
    let revs = pool.revisions(&job)?;
    // The schedule decides as on a filesystem store; its failure backoff
    // is this server's (it starts afresh on a server that takes the job).
    let (due, tags, mut reason) = crate::plan::decide(server, &job, schedule, &revs, req);
    let mut parent = crate::plan::choose_parent(&revs);
    if let Some(p) = parent.filter(|_| due) {
        if pool.head_dirty(&job, p)? {
            reason.push_str("; a push that died left writes in the image: this one is full");
            parent = None;
        }
    }
    Ok(PlanReply {
        due,
        tags,
        parent_id: parent.map(|p| p.id.uuid().to_string()).unwrap_or_default(),
        parent_snapshot: parent.map(|p| p.source.snapshot.clone()).unwrap_or_default(),
        parent_size: parent.map(|p| p.size).unwrap_or(0),
        parent_key_check: parent
            .and_then(|p| p.key_check.as_deref())
            .and_then(|k| hex::decode(k).ok())
            .unwrap_or_default(),
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
    let keeper = pool.prepare_write(&job)?;
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
    let key_check = crate::push::check_key(&job, &begin, parent.as_ref().map(|(m, _)| m))?;
    // Protected from forget before the keeper's lock is taken to begin
    // (see `change::forget`).
    let parent_id = parent.as_ref().map(|(m, _)| m.id);
    _running.set_parent(parent_id);
    let spec = crate::push::new_revision_spec(&begin, id, tags, None, key_check);
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
            Some(Step::Data(offset, data)) => {
                rev.data(offset, &data)?;
                // A server killed or frozen in the middle of a push.
                backy_common::fault::point("pool.frame");
            }
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
/// What a restore stream is relative to (see [`stream_image`]).
pub struct Relative<'a> {
    /// A revision of the job the receiver holds (a replica).
    pub base: Option<&'a RevisionMeta>,
    /// Blocks below this offset are not sent (a copy resuming).
    pub from: u64,
    /// A rollback: the receiver's granule digests of its differing blocks.
    pub granules: &'a [GranuleDigests],
}

/// `Ok(false)`: the receiver went away. With a `base`, blocks whose digest
/// equals the base's are skipped and the others go whole; with `granules`
/// (a rollback), only those blocks, and of each the granules that differ,
/// as on a filesystem store.
pub fn stream_image(
    server: &Server,
    pool: &PoolBackend,
    job: &JobName,
    meta: &RevisionMeta,
    relative: Relative<'_>,
    tx: mpsc::Sender<std::result::Result<RestoreFrame, tonic::Status>>,
) -> Result<bool> {
    let Relative { base, from, granules } = relative;
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
        let base = base.map(|b| pool.store.manifest(job, b)).transpose()?;
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
        if !granules.is_empty() {
            if base.is_some() || from != 0 {
                return Err(Error::invalid(
                    "a rollback (granules) cannot be combined with base or from",
                ));
            }
            backy_common::rollback::check_request(
                &manifest,
                granules.iter().map(|g| (g.block, g.digests.as_slice())),
            )?;
        }
        if !send(Frame::Begin(RevisionInfo::from(meta))) {
            return Ok(false);
        }
        if !granules.is_empty() {
            let read_at = |buf: &mut [u8], at: u64| Ok(reader.read_exact_at(at, buf)?);
            return crate::restore::send_granules(
                read_at,
                &manifest,
                granules,
                crate::restore::Frames::new(send),
            );
        }
        let mut out = crate::restore::Frames::new(send);
        for block in from / u64::from(meta.block_size)..manifest.block_count() {
            let (offset, len) = (manifest.block_offset(block), manifest.block_len(block));
            if base
                .as_ref()
                .is_some_and(|b| backy_common::replicate::same_block(b, &manifest, block))
            {
                continue;
            }
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
                reader.read_exact_at(pos, &mut data)?;
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

/// A job's status from the pool: its revisions, space as `rbd du` counts
/// it, and the schedule's SLA and next due time. A job never backed up
/// has no first-backup grace here (the pool keeps no time the job was
/// first known): its SLA is missed until its first revision.
pub fn header(
    server: &Server,
    pool: &PoolBackend,
    config: &ServerConfig,
    name: &str,
) -> Result<(JobStatus, Vec<RevisionInfo>)> {
    let job = job_name(server, name)?;
    let job_cfg = config.job(&job)?;
    let revs = pool.revisions(&job)?;
    let h = crate::status::health(server, config, &job, &revs, None)?;
    let ids: Vec<_> = revs.iter().map(|r| r.id).collect();
    // Space is a convenience: a cluster that cannot say leaves it out.
    let space = pool
        .store
        .space(&job, &ids)
        .inspect_err(|e| tracing::warn!(job = %job, "space in the pool unknown: {e}"))
        .ok();
    let status = JobStatus {
        storage: backy_proto::wire_storage(backy_common::revision::StorageMode::Reflink) as i32,
        client: job_cfg.client.clone().unwrap_or_default(),
        space: space.as_ref().map(job_space),
        ..h.status(name)
    };
    let infos = revs
        .iter()
        .map(|r| RevisionInfo {
            space: space.as_ref().and_then(|s| {
                s.revisions
                    .iter()
                    .find(|(id, _)| *id == r.id)
                    .map(|(_, s)| revision_space(s))
            }),
            ..RevisionInfo::from(r)
        })
        .collect();
    Ok((status, infos))
}

/// A revision's space as `rbd du` counts it: `total` the objects holding
/// its data, `exclusive` those it added (differing from the revision
/// before), `shared` the rest (docs/DESIGN.md, "Space on a pool").
fn revision_space(s: &SnapshotSpace) -> Space {
    Space {
        total_bytes: s.data_bytes,
        exclusive_bytes: s.added_bytes,
        shared_bytes: s.data_bytes.saturating_sub(s.added_bytes),
        disk_bytes: 0,
    }
}

/// A job's: images share no object with other jobs, so all it uses (each
/// object once, the head's included) is its own.
fn job_space(s: &JobSpace) -> Space {
    Space {
        total_bytes: s.total_bytes(),
        exclusive_bytes: s.used_bytes(),
        shared_bytes: 0,
        disk_bytes: 0,
    }
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
        newest_trusted: revs
            .iter()
            .rev()
            .find(|r| r.trust != backy_proto::Trust::Distrusted as i32)
            .and_then(|r| r.timestamp),
        storage: status.storage,
        running: status.running,
        sla_ok: status.sla_ok,
        sla_overdue_secs: status.sla_overdue_secs,
        sla_window_secs: status.sla_window_secs,
        next_due: status.next_due,
        next_tags: status.next_tags,
        failures: status.failures,
        last_error: status.last_error,
        space: status.space,
        future_revisions: status.future_revisions,
        distrusted: u32::try_from(
            revs.iter()
                .filter(|r| r.trust == backy_proto::Trust::Distrusted as i32)
                .count(),
        )
        .unwrap_or(u32::MAX),
        ..JobSummary::default()
    })
}

#[cfg(test)]
mod tests {
    use super::advertised;

    #[test]
    fn a_server_is_named_by_the_url_clients_reach_it_at() {
        let cases = [
            ("127.0.0.1:6023", false, "http://127.0.0.1:6023"),
            ("[::1]:7", true, "https://[::1]:7"),
            ("0.0.0.0:6023", true, "https://backup01:6023"),
            ("[::]:6023", true, "https://backup01:6023"),
        ];
        for (bound, tls, url) in cases {
            assert_eq!(
                advertised(bound.parse().unwrap(), tls, "backup01"),
                url,
                "{bound}"
            );
        }
    }
}
