//! Push of a source read through [`Source`] (a file, a block device, or a
//! qemu disk over NBD): scan it against the baseline and stream the changed
//! ranges.
//!
//! The source is read in a blocking thread that hands frames to the gRPC
//! request stream through a bounded channel: a slow network or server slows
//! the reading down instead of filling memory.

use super::shared::{
    answers_from, baseline, check_committed, join, push_exchange, rebase, stream_closed, Audited, PushArgs,
    Pushed, FRAMES_IN_FLIGHT,
};
use crate::audit::AuditPlan;
use crate::connect::Client;
use crate::progress::Progress;
use crate::scan::{self, Scanned};
use crate::source::qemu::Shared;
use crate::source::{self, Source};
use crate::view::RevisionView;
use backy_common::manifest::Manifest;
use backy_common::source::SourceSpec;
use backy_common::tracker_audit;
use backy_common::{fault, Error, Result};
use backy_proto::push_frame::Frame;
use backy_proto::{PlanReply, PushBegin, PushEnd, PushFrame};
use std::time::Instant;
use tokio::sync::mpsc;

/// Runs a push of a file, block device or qemu source for a due plan.
pub(super) async fn push(
    client: &mut Client,
    args: &PushArgs,
    plan: &PlanReply,
    spec: &SourceSpec,
    progress: &dyn Progress,
    started: Instant,
) -> Result<Pushed> {
    let job = args.job.as_str();
    // Hooks run here (pre-snapshot may take long): off the async workers.
    if let SourceSpec::Qemu(qemu_spec) = spec {
        let (qemu_spec, job, id, parent) = (
            qemu_spec.clone(),
            job.to_string(),
            plan.new_id.clone(),
            plan.parent_id.clone(),
        );
        let opened = tokio::task::spawn_blocking(move || source::qemu::open(&qemu_spec, &job, &id, &parent))
            .await
            .map_err(|e| Error::internal(format!("opening the source: {e}")))??;
        let shared = Shared::new(opened.session);
        let hold = Hold {
            shared: shared.clone(),
            index: 0,
            finish: true,
        };
        let pushed = push_source(
            client,
            args,
            plan,
            Box::new(opened.source),
            Some(hold),
            opened.full_read_reason,
            progress,
            started,
        )
        .await;
        // A failure removes the new bitmap, in this thread on purpose (the
        // process may exit right after the error).
        shared.abort();
        return pushed;
    }
    let (spec, job, id) = (spec.clone(), job.to_string(), plan.new_id.clone());
    let source = tokio::task::spawn_blocking(move || source::open(&spec, &job, &id))
        .await
        .map_err(|e| Error::internal(format!("opening the source: {e}")))??;
    push_source(client, args, plan, source, None, None, progress, started).await
}

/// A disk's share of a qemu session: asked whether its view is intact
/// before its revision is committed; `finish`: this push alone uses the
/// session, and finishes it once its revision is committed (a group's
/// caller finishes it after all its disks).
pub(crate) struct Hold {
    pub shared: Shared,
    pub index: usize,
    pub finish: bool,
}

/// Pushes an opened source for a due plan.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn push_source(
    client: &mut Client,
    args: &PushArgs,
    plan: &PlanReply,
    mut source: Box<dyn Source>,
    qemu: Option<Hold>,
    full_read: Option<String>,
    progress: &dyn Progress,
    started: Instant,
) -> Result<Pushed> {
    let job = args.job.as_str();
    if let Some(why) = &full_read {
        tracing::info!(job, "reading the whole disk: {why}");
    }
    let size = source.size();
    if args.key.is_some() {
        backy_common::encryption::check_size(size).map_err(|e| e.context(format!("job {job}")))?;
    }
    if let Some(path) = &args.changed_ranges {
        let changed = crate::changed_ranges::read(path, size)?;
        if plan.parent_id.is_empty() {
            tracing::info!(
                job,
                "no parent revision: a full backup reads everything, not just the changed ranges"
            );
        }
        source = Box::new(crate::changed_ranges::KnownChanges::new(source, changed));
    }
    // A qemu source's instant is taken anew by each attempt (the fleecing
    // view or bitmap of the last one is gone): blocks from an earlier
    // attempt would mix two instants.
    let resumable = qemu.is_none();
    let resume = plan.resume && plan.resume_size == size && resumable;
    if plan.resume && !resume {
        if resumable {
            tracing::info!(
                job,
                "not resuming the interrupted push: it had {} bytes, the source now {size}",
                plan.resume_size
            );
        } else {
            tracing::info!(
                job,
                "not resuming the interrupted push: a qemu source is read from a new instant"
            );
        }
    }
    let baseline = if resume {
        tracing::info!(
            job,
            checkpoint = plan.resume_checkpoint,
            "resuming interrupted push"
        );
        let (_, partial) = crate::manifest::fetch_resume(client, job, &plan.new_id).await?;
        rebase(partial, plan.block_size, size)?
    } else {
        baseline(client, job, plan, size).await?
    };
    fault::point("client.manifest");

    let begin = PushBegin {
        job: job.to_string(),
        rev_id: plan.new_id.clone(),
        parent_id: plan.parent_id.clone(),
        size,
        block_size: plan.block_size,
        tags: plan.tags.clone(),
        source_kind: backy_proto::source_kind(source.kind()) as i32,
        source_snapshot: source.snapshot().to_string(),
        force: args.force,
        resume,
        resumable,
        allow_unscheduled: args.allow_unscheduled,
        allow_shrink: args.allow_shrink,
        group: args.group.clone(),
        hold: args.group.is_some(),
        key_check: args.key.as_ref().map(|k| k.check().to_vec()).unwrap_or_default(),
    };
    let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
    tx.send(PushFrame {
        frame: Some(Frame::Begin(begin)),
    })
    .await
    .map_err(|_| stream_closed())?;

    let bar = progress.start(job, size);
    let reader_bar = bar.clone();
    let has_parent = !plan.parent_id.is_empty();
    // The tracker whose list of changes the push trusts, if any: audited.
    let tracker = if args.changed_ranges.is_some() {
        Some(tracker_audit::CHANGED_RANGES)
    } else if qemu.is_some() && full_read.is_none() {
        Some(tracker_audit::QEMU_BITMAP)
    } else {
        None
    };
    let audit = tracker
        .filter(|_| has_parent && !args.audit_sample.is_off())
        .map(|tracker| AuditPlan {
            tracker,
            percent: args.audit_sample,
            seed: tracker_audit::seed_of(plan.new_id.as_bytes()),
        });
    let limiter = args.bwlimit.clone();
    // The granule exchange compares with a parent and needs a server that
    // speaks it; the fault mode poses as an older client (tests of the
    // whole-block push). A full push goes through Push as always.
    let protocol = crate::connect::server_protocol(client).await?;
    // Blocks the server holds already (deduplication, protocol 5) are not
    // sent: it says so per block in the exchange, a full push's too.
    let dedup = plan.dedup && protocol >= backy_proto::DEDUP_PROTOCOL;
    let exchange =
        (has_parent || dedup) && !fault::mode("whole-blocks") && protocol >= backy_proto::GRANULE_PROTOCOL;
    let (answers_tx, answers_rx) = mpsc::channel(scan::EXCHANGE_WINDOW + 1);
    let answers = exchange.then(|| (answers_from(answers_rx), dedup));
    let intact = qemu.as_ref().map(|h| (h.shared.clone(), h.index));
    let key = args.key.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let intact = || match &intact {
            Some((shared, index)) => shared.check_intact(*index),
            None => Ok(()),
        };
        let reading = Reading {
            has_parent,
            audit,
            limiter,
            key,
        };
        read_source(&mut *source, baseline, reading, answers, &tx, intact, |pos| {
            reader_bar.set(pos)
        })
    });
    let frames = crate::frames::with_keepalive(rx);
    let joined = if exchange {
        join(reader, push_exchange(client, frames, answers_tx)).await
    } else {
        join(reader, client.push(frames)).await
    };
    fault::point("client.replied");
    bar.finish();
    let ((scanned, audited), reply) = joined.map_err(|e| match (&args.changed_ranges, e.kind) {
        // With a complete range list the server's digests of the blocks it
        // patched equal the ones read here; otherwise the list missed writes.
        (Some(path), backy_common::ErrorKind::DataLoss) if e.reason == backy_common::Reason::ManifestMismatch => e.context(
            format!(
                "{} does not name every byte written since the parent revision (push without --changed-ranges to scan everything)",
                path.display()
            ),
        ),
        _ => e,
    })?;
    tracing::info!(
        job,
        bytes_read = scanned.bytes_read,
        bytes_sent = scanned.bytes_sent,
        digest_bytes = scanned.digest_bytes,
        changed_blocks = scanned.changed_blocks,
        "pushed"
    );
    let revision = reply
        .revision
        .ok_or_else(|| Error::internal("server reply names no revision"))?;
    if let Some(hold) = qemu.filter(|h| h.finish) {
        // Committed on the server: the parent's bitmap has served. Failing
        // to drop it only leaves a bitmap behind.
        let done = tokio::task::spawn_blocking(move || hold.shared.finish(&[true])).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(
                job,
                "could not remove the parent revision's bitmap: {}",
                e.message
            );
        }
    }
    check_committed(&revision, &scanned)?;
    Ok(Pushed {
        job: job.to_string(),
        revision: RevisionView::from(&revision),
        bytes_read: scanned.bytes_read,
        bytes_sent: scanned.bytes_sent,
        duration_secs: started.elapsed().as_secs_f64(),
        expired: reply
            .expired
            .iter()
            .map(|id| crate::view::revision_id(id))
            .collect(),
        resumed_at: resume.then_some(plan.resume_checkpoint),
        full_read,
        audit: audited,
    })
}

/// How the blocking side reads.
struct Reading {
    has_parent: bool,
    /// The tracker to audit before its changes are trusted.
    audit: Option<AuditPlan>,
    limiter: Option<std::sync::Arc<crate::bwlimit::Limiter>>,
    /// The job's encryption key: blocks are digested (and sent) encrypted.
    key: Option<std::sync::Arc<backy_common::encryption::Key>>,
}

/// The blocking side: the tracker's audit, the scan, then the end marker.
fn read_source(
    source: &mut dyn Source,
    baseline: Manifest,
    reading: Reading,
    answers: Option<(scan::Answers, bool)>,
    tx: &mpsc::Sender<PushFrame>,
    intact: impl FnOnce() -> Result<()>,
    progress: impl FnMut(u64),
) -> Result<(Scanned, Option<Audited>)> {
    let send = |frame| {
        if let Some(limiter) = &reading.limiter {
            limiter.wait(crate::bwlimit::frame_bytes(&frame));
        }
        let sent = tx
            .blocking_send(PushFrame { frame: Some(frame) })
            .map_err(|_| stream_closed());
        fault::point("client.frame");
        sent
    };
    // Known changes are relative to the parent's snapshot: without a parent
    // everything is compared with zeros.
    let mut changed = if reading.has_parent {
        source.changed_extents()?
    } else {
        None
    };
    let mut audited = None;
    if let (Some(extents), Some(plan)) = (&changed, &reading.audit) {
        let started = Instant::now();
        let outcome = crate::audit::run(source, &baseline, extents, plan, reading.key.as_deref())?;
        let secs = started.elapsed().as_secs_f64();
        if outcome.failed() {
            tracing::warn!(
                tracker = plan.tracker,
                sampled = outcome.sampled,
                mismatched = outcome.mismatched,
                "{outcome}: the change tracker missed writes; reading the whole source"
            );
            changed = None;
        } else {
            tracing::info!(
                tracker = plan.tracker,
                sampled = outcome.sampled,
                mismatched = outcome.mismatched,
                secs,
                "{outcome}"
            );
        }
        audited = Some(Audited { outcome, secs });
    }
    let scanned = scan::scan(
        source,
        baseline,
        changed,
        answers,
        reading.key.as_deref(),
        send,
        progress,
    )?;
    // Everything is read: a view that stopped being its instant on the way
    // (a qemu guest's fleecing scratch full) must not become a revision.
    intact()?;
    fault::point("client.before-end");
    send(Frame::End(PushEnd {
        stream_checksum: scanned.checksum.to_vec(),
        manifest_digest: scanned.manifest.file_digest().to_vec(),
        audit: audited.as_ref().map(|a| backy_proto::wire_audit(&a.outcome)),
    }))?;
    Ok((scanned, audited))
}
