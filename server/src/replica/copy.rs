//! One transfer: a source revision copied here under its own id, as a
//! reflink clone of the base with the source's differing granules written
//! in, every touched block re-digested, committed only if the manifest is
//! the source's. An interrupted transfer keeps its last checkpoint and
//! resumes from there (the push resume machinery).

use crate::job::Txn;
use crate::state::Server;
use crate::storage::{JobDir, NewRevision, NewRevisionSpec};
use crate::work::Gate;
use backy_common::replicate::Transfer;
use backy_common::revision::{RevisionMeta, Trust};
use backy_common::{fault, Error, Result};
use backy_proto::connect::{status_error, Client};
use backy_proto::restore_frame::Frame;
use backy_proto::{RestoreRequest, RevisionInfo};
use std::sync::Arc;

/// What the source says of a revision, held to what a push of it would
/// have to satisfy: a hostile or broken source gets no further than a
/// hostile client.
pub(super) fn check_listing(
    config: &backy_common::config::ServerConfig,
    job: &backy_common::JobName,
    target: &RevisionMeta,
) -> Result<()> {
    let max = config
        .job(job)
        .ok()
        .and_then(|j| j.max_size)
        .unwrap_or(crate::push::DEFAULT_MAX_SIZE)
        .min(backy_common::manifest::MAX_IMAGE_SIZE);
    if target.block_size != backy_common::DEFAULT_BLOCK_SIZE {
        return Err(Error::invalid(format!(
            "revision {}: block size {} is not this server's {}",
            target.id,
            target.block_size,
            backy_common::DEFAULT_BLOCK_SIZE
        )));
    }
    if target.size == 0 || target.size > max {
        return Err(Error::exhausted(format!(
            "revision {}: image size {} is outside 1..={max} bytes (max-size)",
            target.id, target.size
        )));
    }
    if target.tags.len() > crate::revisions::MAX_TAGS {
        return Err(Error::invalid(format!(
            "revision {}: more than {} tags",
            target.id,
            crate::revisions::MAX_TAGS
        )));
    }
    // The form only: a copy keeps the source's tags, even one that revision
    // specs misread (`check-config` names those on both servers).
    for tag in &target.tags {
        backy_common::revision::check_tag_format(tag)
            .map_err(|e| e.context(format!("revision {}", target.id)))?;
    }
    backy_common::revision::check_source_snapshot(&target.source.snapshot)
        .map_err(|e| e.context(format!("revision {}", target.id)))?;
    // This server never commits a revision dated after its clock: refused
    // before anything travels, copied in a later round.
    let now = chrono::Utc::now();
    if target.timestamp > now {
        return Err(Error::precondition(format!(
            "revision {} is dated {}, after this server's clock ({now}): not copied before then",
            target.id, target.timestamp
        )));
    }
    Ok(())
}

/// Publishes a fresh copy (verified on arrival: its manifest is the
/// source's) in place of the distrusted copy of the same id, in one
/// transaction: the distrusted copy goes through [`Txn::delete`] (so every
/// rule that guards a deletion holds), the fresh one is published. The job
/// is never without a trusted copy it had: the one replaced was not.
fn replace_distrusted(
    server: &Server,
    job: &JobDir,
    sealed: crate::storage::Sealed,
    slot: &crate::job::PushGuard,
) -> Result<RevisionMeta> {
    let id = sealed.meta().id;
    let mut txn = Txn::begin(&server.jobs, job)?;
    match txn.get(&id) {
        Some(held) if held.trust == Trust::Distrusted => txn.delete(&[id])?,
        Some(_) => return Err(Error::exists(format!("revision {id} is here already, trusted"))),
        None => {}
    }
    let config = server.config();
    let lock = config
        .job(job.name())
        .ok()
        .and_then(|j| config.retention_lock_of(j));
    let meta = txn.publish(sealed, lock)?;
    slot.set_parent(None);
    tracing::info!(job = %job.name(), rev = %id, "replication: replaced a distrusted copy with a fresh, verified one");
    txn.point_latest("latest");
    Ok(meta)
}

/// A range of the revision as the source sent it.
pub(super) enum Received {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Streams `request` from the source into `sink` until its end frame: the
/// begin frame must name `info` (id and manifest digest), a source that
/// sends nothing for `limits.idle-timeout` is given up on like a silent
/// pusher, and reading no faster than `replicate.bwlimit` (one limit for
/// every copy from the source: they run one at a time) holds the source
/// back too (the stream's flow control). An error leaves the sink where
/// it got.
pub(super) fn receive(
    server: &Server,
    client: &Client,
    handle: &tokio::runtime::Handle,
    request: RestoreRequest,
    info: &RevisionInfo,
    mut sink: impl FnMut(Received) -> Result<()>,
) -> Result<()> {
    let config = server.config();
    let limit = &server.replica_bwlimit;
    limit.set_rate(config.replicate.as_ref().and_then(|r| r.bwlimit));
    let idle = config.limits.idle_timeout.as_duration();
    let mut client = client.clone();
    let next = |stream: &mut tonic::Streaming<backy_proto::RestoreFrame>| {
        handle.block_on(async {
            match tokio::time::timeout(idle, stream.message()).await {
                Ok(m) => m.map_err(status_error),
                Err(_) => Err(Error::unavailable(format!(
                    "the source sent nothing for {} s",
                    idle.as_secs()
                ))),
            }
        })
    };
    let mut stream = handle
        .block_on(client.restore(request))
        .map_err(status_error)?
        .into_inner();
    loop {
        let frame = next(&mut stream)?
            .ok_or_else(|| Error::unavailable("the source's stream ended before its end frame"))?
            .frame
            .ok_or_else(|| Error::invalid("an empty frame from the source"))?;
        match frame {
            Frame::Begin(b) if b.id != info.id || b.manifest_digest != info.manifest_digest => {
                return Err(Error::precondition(format!(
                    "the source sent revision {} ({}) for {} ({})",
                    b.id, b.manifest_digest, info.id, info.manifest_digest
                )))
            }
            Frame::Begin(_) => {}
            Frame::Data(d) => {
                limit.wait(d.data.len() as u64);
                sink(Received::Data(d.offset, d.data))?;
            }
            Frame::Zero(z) => sink(Received::Zero(z.offset, z.length))?,
            Frame::End(_) => return Ok(()),
        }
    }
}

/// What one transfer did.
pub struct Copied {
    pub meta: RevisionMeta,
    /// Data bytes received in this session (a resumed one: only the rest).
    pub received: u64,
    /// Where this session started (non-zero: it resumed).
    pub resumed_at: u64,
}

/// Copies `info` (the source's listing of `transfer.id`) into `job`. Runs
/// on a blocking thread; the stream is read through `handle`.
pub fn copy(
    server: &Arc<Server>,
    client: Client,
    handle: &tokio::runtime::Handle,
    job: &JobDir,
    transfer: Transfer,
    info: &RevisionInfo,
) -> Result<Copied> {
    let config = server.config();
    let target = RevisionMeta::try_from(info)?;
    check_listing(&config, job.name(), &target)?;
    // As a client's would be: a lying source could otherwise put any text
    // into `status`.
    if let Some(audit) = &target.stats.audit {
        audit.check()?;
    }
    let expected = hex::decode(&info.manifest_digest)
        .map_err(|_| Error::invalid(format!("revision {}: bad manifest digest", target.id)))?;
    let running = server.jobs.activity.try_start_push(job.name(), target.id)?;
    let txn = Txn::begin(&server.jobs, job)?;
    match txn.get(&target.id) {
        // A copy this server distrusted: a fresh one replaces it (see
        // `replace_distrusted`).
        Some(held) if transfer.replace && held.trust == Trust::Distrusted => {}
        Some(_) => return Err(Error::exists(format!("revision {} is here already", target.id))),
        None => {}
    }
    let base = match transfer.base {
        None => None,
        Some(id) => Some(txn.get(&id).cloned().ok_or_else(|| {
            Error::precondition(format!(
                "base revision {id} is no longer here; the next round plans again"
            ))
        })?),
    };
    let window = config.resume.window.as_duration();
    let resumable = job
        .resumable(window, chrono::Utc::now())
        .filter(|r| r.id == target.id && r.parent == transfer.base && r.size == target.size);
    txn.clean_leftovers_for_push(resumable.as_ref().map(|r| r.id))?;
    // Under the lock: expiry and mirroring keep the base from here on.
    running.set_parent(transfer.base);
    drop(txn);
    let parent = match &base {
        Some(meta) => Some((meta, job.manifest(meta)?)),
        None => None,
    };
    let spec = NewRevisionSpec::copy_of(&target);
    let stopping = server.clone();
    let gate = Gate::new(
        server.work.clone(),
        "replication",
        Arc::new(move || stopping.stopping.load(std::sync::atomic::Ordering::Relaxed)),
    );
    let checkpoint_every = config.resume.enabled.then_some(config.resume.checkpoint);
    let (mut rev, from) = match &resumable {
        Some(record) => {
            tracing::info!(job = %job.name(), rev = %target.id, checkpoint = record.checkpoint, "resuming a copy");
            let rev = NewRevision::resume(job, spec, record, parent, checkpoint_every, gate)?;
            (rev, record.checkpoint)
        }
        None => (
            NewRevision::create(job, spec, parent, server.storage_mode, checkpoint_every, gate)?,
            0,
        ),
    };
    // Blocks other revisions here hold already are shared once written.
    if let Some(sources) = crate::dedup::source::StoredBlocks::for_push(
        &config,
        server.storage_mode,
        &server.jobs.hints,
        job.name(),
        target.block_size,
    ) {
        rev = rev.with_sources(Box::new(sources));
    }
    let request = RestoreRequest {
        job: job.name().to_string(),
        revision: target.id.to_string(),
        base: transfer.base.map(|b| b.to_string()).unwrap_or_default(),
        from,
        granules: Vec::new(),
    };
    let mut received = 0u64;
    let outcome = receive(server, &client, handle, request, info, |frame| match frame {
        Received::Data(offset, data) => {
            received += data.len() as u64;
            rev.data(offset, &data)?;
            fault::point("replica.frame");
            Ok(())
        }
        Received::Zero(offset, len) => rev.zero(offset, len),
    });
    if let Err(e) = outcome {
        // A broken connection or a source gone: keep what arrived for the
        // next round. Anything else (a bad frame): nothing is kept.
        if e.kind.is_retryable() {
            if let Some(at) = rev.suspend()? {
                let kept = backy_common::units::format_bytes(at);
                return Err(Error {
                    message: format!("{}; {kept} kept for resuming", e.message),
                    ..e
                });
            }
        }
        return Err(e);
    }
    let sealed = rev.commit_copy(target.timestamp, &expected, target.stats.audit.clone())?;
    let meta = if transfer.replace {
        replace_distrusted(server, job, sealed, &running)?
    } else {
        crate::push::publish_and_expire(server, job, sealed, &running, "replica.after-commit")?.0
    };
    drop(running);
    server.metrics.received(received as usize);
    Ok(Copied {
        meta,
        received,
        resumed_at: from,
    })
}
