//! `push` of a Ceph RBD image: snapshot it (between the job's hooks), let
//! Ceph say what changed since the parent's snapshot, and send exactly that.
//! Every push ends with the new image's manifest (the end-to-end check):
//! the parent's manifest from the server with the digests of the blocks
//! that changed.
//!
//! * Incremental: `rbd diff --from-snap backy-<parent>` (metadata only)
//!   names the changed ranges; `rbd export-diff --from-snap … --whole-object`
//!   brings every RADOS object that changed whole, so each block in it is
//!   digested; of a changed block only the changed ranges are sent. Costs
//!   over a plain diff: the parent's manifest (32 bytes a block) and
//!   reading changed objects whole (at most one object per changed range
//!   more than the changed bytes).
//! * Full (no parent, or its snapshot is gone, or blocks that span RADOS
//!   objects, or a resize whose edge blocks no changed object covers):
//!   `rbd export-diff` of the whole snapshot, which carries only the
//!   extents that exist in Ceph. The extents are assembled into blocks,
//!   digested and compared with the parent's manifest when there is one,
//!   so unchanged blocks stay shared on the server; with a parent
//!   snapshot only its changed ranges are sent.
//! * Audit (issue 34): before Ceph's changes are trusted, a sample of the
//!   blocks they leave out is read from the new snapshot through qemu-nbd
//!   and compared with the parent's manifest; a block that differs makes
//!   the push a full one (without `--from-snap`) against that manifest.
//!
//! Nothing is committed unless the diff stream ended with its end marker
//! and `rbd` exited 0. After a commit the older `backy-*` snapshots go; a
//! failed push removes the snapshot it made.

use super::shared::{self, Audited, PushArgs, Pushed, FRAMES_IN_FLIGHT};
use crate::audit::AuditPlan;
use crate::connect::Client;
use crate::progress::Progress;
use crate::scan::{self, Scanned, Scanner};
use crate::source::hooks::HookRunner;
use crate::source::process::{describe, Running};
use crate::source::rbd::{Rbd, SNAP_PREFIX};
use crate::source::rbd_nbd::RbdSnapshot;
use crate::source::Source;
use crate::view::RevisionView;
use backy_common::encryption::Key;
use backy_common::manifest::Manifest;
use backy_common::ranges::Extent;
use backy_common::rbd_diff::{DiffReader, Record};
use backy_common::source::SourceSpec;
use backy_common::{fault, tracker_audit, Error, Result, RevisionId};
use backy_proto::push_frame::Frame;
use backy_proto::{PlanReply, PushBegin, PushEnd, PushFrame};
use std::io::BufReader;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long `rbd export-diff` may take to exit once its stream ended.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Pipe buffer between `rbd` and the parser.
const PIPE_BUFFER: usize = 1 << 20;

/// What the diff reader produced.
pub struct Streamed {
    pub bytes_read: u64,
    pub bytes_sent: u64,
    /// The new manifest and the stream checksum.
    pub scanned: Scanned,
}

/// Which diff a push reads.
#[derive(Debug)]
pub enum Diff {
    /// Every extent of the snapshot, each block compared with the
    /// baseline; `known`: Ceph's changes since the parent's snapshot, the
    /// only bytes of a changed block that need to go.
    Full { known: Option<Vec<Extent>> },
    /// The objects changed since snapshot `from`, whole; `known` as above.
    Incremental { from: String, known: Vec<Extent> },
}

/// Runs a push of a ceph-rbd source for a due plan.
pub async fn push(
    client: &mut Client,
    args: &PushArgs,
    plan: &PlanReply,
    spec: &SourceSpec,
    progress: &dyn Progress,
    started: Instant,
) -> Result<Pushed> {
    let job = args.job.as_str();
    let rbd = Rbd::from_spec(spec)?;
    let new_id: RevisionId = plan.new_id.parse()?;
    let snap = format!("{SNAP_PREFIX}{}", new_id.short());
    let env = vec![
        ("BACKY_JOB".to_string(), job.to_string()),
        ("BACKY_REVISION".to_string(), new_id.short()),
        ("BACKY_SNAPSHOT".to_string(), rbd.snap_spec(&snap)),
    ];
    let hooks = HookRunner::new(spec.hooks(), env);
    let (mut hooks, taken) = blocking({
        let (rbd, snap) = (rbd.clone(), snap.clone());
        move || {
            let mut hooks = hooks;
            let taken = take_snapshot(&mut hooks, &rbd, &snap);
            Ok((hooks, taken))
        }
    })
    .await?;
    taken?;
    fault::point("client.snapshot");

    let result = push_snapshot(client, job, args, plan, &rbd, &snap, progress, started).await;
    let (rbd2, snap2) = (rbd.clone(), snap.clone());
    let after = blocking(move || {
        let tidy = match &result {
            // The new snapshot is the next push's parent; older ones are
            // no use any more.
            Ok(_) => rotate(&rbd2, &snap2),
            Err(_) => rbd2.snap_remove(&snap2),
        };
        let cleaned = hooks.cleanup();
        Ok((result, tidy, cleaned))
    })
    .await?;
    let (result, tidy, cleaned) = after;
    if let Err(e) = tidy {
        // The push's outcome stands; leftover snapshots only cost space and
        // are removed by the next successful push.
        tracing::warn!("{}", e.message);
    }
    let pushed = result?;
    cleaned?;
    Ok(pushed)
}

/// pre-snapshot hook, `rbd snap create`, post-snapshot hook (which runs
/// whenever the pre-snapshot hook ran).
fn take_snapshot(hooks: &mut HookRunner, rbd: &Rbd, snap: &str) -> Result<()> {
    // The plan reuses the id of an interrupted push; a snapshot its killed
    // client left behind is stale.
    if rbd.snapshots()?.iter().any(|s| s == snap) {
        tracing::info!(snapshot = %rbd.snap_spec(snap), "removing the stale snapshot of an interrupted push");
        rbd.snap_remove(snap)?;
    }
    let taken = hooks.pre_snapshot().and_then(|()| rbd.snap_create(snap));
    let post = hooks.post_snapshot();
    match (taken, post) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => {
            // Taken while the hooks failed: not a consistent snapshot.
            let _ = rbd.snap_remove(snap);
            Err(e)
        }
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// A group's snapshots inside one freeze window: its pre-snapshot hook,
/// `rbd snap create` of every image, post-snapshot hook. All or none:
/// a failure removes those taken.
pub(super) fn take_snapshots(hooks: &mut HookRunner, images: &[(Rbd, String)]) -> Result<()> {
    for (rbd, snap) in images {
        if rbd.snapshots()?.iter().any(|s| s == snap) {
            tracing::info!(snapshot = %rbd.snap_spec(snap), "removing the stale snapshot of an interrupted push");
            rbd.snap_remove(snap)?;
        }
    }
    let mut taken = Vec::new();
    let mut created = hooks.pre_snapshot();
    if created.is_ok() {
        for (rbd, snap) in images {
            created = rbd.snap_create(snap);
            if created.is_err() {
                break;
            }
            taken.push((rbd, snap));
        }
    }
    let post = hooks.post_snapshot();
    let result = created.and(post);
    if result.is_err() {
        for (rbd, snap) in taken {
            let _ = rbd.snap_remove(snap);
        }
    }
    result
}

/// Removes every `backy-*` snapshot of the image but `keep`.
pub(super) fn rotate(rbd: &Rbd, keep: &str) -> Result<()> {
    for old in rbd.snapshots()? {
        if old.starts_with(SNAP_PREFIX) && old != keep {
            tracing::info!(snapshot = %rbd.snap_spec(&old), "removing old snapshot");
            rbd.snap_remove(&old)?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn push_snapshot(
    client: &mut Client,
    job: &str,
    args: &PushArgs,
    plan: &PlanReply,
    rbd: &Rbd,
    snap: &str,
    progress: &dyn Progress,
    started: Instant,
) -> Result<Pushed> {
    let (size, from) = blocking({
        let (rbd, snap, plan) = (rbd.clone(), snap.to_string(), plan.clone());
        move || {
            let size = rbd.size(Some(&snap))?;
            Ok((size, parent_snapshot(&rbd, &plan)?))
        }
    })
    .await?;
    if args.key.is_some() {
        backy_common::encryption::check_size(size).map_err(|e| e.context(format!("job {job}")))?;
    }
    let baseline = shared::baseline(client, job, plan, size).await?;
    let audit = (!args.audit_sample.is_off()).then(|| AuditPlan {
        tracker: tracker_audit::CEPH_RBD_DIFF,
        percent: args.audit_sample,
        seed: tracker_audit::seed_of(plan.new_id.as_bytes()),
    });
    let (baseline, diff, audited) = blocking({
        let (rbd, snap, key) = (rbd.clone(), snap.to_string(), args.key.clone());
        move || {
            let diff = choose_diff(&rbd, from, &snap, &baseline)?;
            let (diff, audited) = audit_diff(&rbd, &snap, &baseline, diff, audit.as_ref(), key.as_deref())?;
            Ok((baseline, diff, audited))
        }
    })
    .await?;
    tracing::info!(
        job,
        snapshot = %rbd.snap_spec(snap),
        from = match &diff {
            Diff::Incremental { from, .. } => from.as_str(),
            Diff::Full { .. } => "(full)",
        },
        size,
        "reading rbd snapshot"
    );

    let begin = PushBegin {
        job: job.to_string(),
        rev_id: plan.new_id.clone(),
        parent_id: plan.parent_id.clone(),
        size,
        block_size: plan.block_size,
        tags: plan.tags.clone(),
        source_kind: backy_proto::SourceKind::CephRbd as i32,
        source_snapshot: snap.to_string(),
        force: args.force,
        // rbd pushes start afresh: the snapshot of a broken attempt is
        // removed with it, so there is nothing to resume from.
        resume: false,
        resumable: false,
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
    .map_err(|_| shared::stream_closed())?;

    // A full read goes through the granule exchange when the server speaks
    // it: against a parent whose snapshot is gone only differing granules
    // travel, and blocks the server holds already (deduplication,
    // protocol 5) not at all. A diff from the parent's snapshot sends
    // Ceph's changed objects as always.
    let protocol = crate::connect::server_protocol(client).await?;
    let dedup = plan.dedup && protocol >= backy_proto::DEDUP_PROTOCOL;
    let exchange = matches!(diff, Diff::Full { known: None })
        && (dedup || !plan.parent_id.is_empty())
        && !fault::mode("whole-blocks")
        && protocol >= backy_proto::GRANULE_PROTOCOL;
    let (answers_tx, answers_rx) = mpsc::channel(scan::EXCHANGE_WINDOW + 1);
    let answers = exchange.then(|| (shared::answers_from(answers_rx), dedup));
    let bar = progress.start(job, size);
    let reader_bar = bar.clone();
    let (rbd, snap) = (rbd.clone(), snap.to_string());
    let key = args.key.clone();
    let limiter = args.bwlimit.clone();
    let wire = audited.as_ref().map(|a| backy_proto::wire_audit(&a.outcome));
    let reader = tokio::task::spawn_blocking(move || {
        let send = |frame| {
            if let Some(limiter) = &limiter {
                limiter.wait(crate::bwlimit::frame_bytes(&frame));
            }
            let sent = tx
                .blocking_send(PushFrame { frame: Some(frame) })
                .map_err(|_| shared::stream_closed());
            fault::point("client.frame");
            sent
        };
        let streamed = export(&rbd, &diff, &snap, baseline, answers, key, wire, send, |pos| {
            reader_bar.set(pos)
        })?;
        Ok(streamed)
    });
    let frames = crate::frames::with_keepalive(rx);
    let joined = if exchange {
        shared::join(reader, shared::push_exchange(client, frames, answers_tx)).await
    } else {
        shared::join(reader, client.push(frames)).await
    };
    fault::point("client.replied");
    bar.finish();
    let (streamed, reply) = joined?;
    tracing::info!(
        job,
        bytes_read = streamed.bytes_read,
        bytes_sent = streamed.bytes_sent,
        "pushed"
    );
    let revision = reply
        .revision
        .ok_or_else(|| Error::internal("server reply names no revision"))?;
    shared::check_committed(&revision, &streamed.scanned)?;
    Ok(Pushed {
        job: job.to_string(),
        revision: RevisionView::from(&revision),
        bytes_read: streamed.bytes_read,
        bytes_sent: streamed.bytes_sent,
        duration_secs: started.elapsed().as_secs_f64(),
        expired: reply.expired,
        resumed_at: None,
        full_read: None,
        audit: audited,
    })
}

/// The parent's snapshot when an incremental diff from it is possible.
fn parent_snapshot(rbd: &Rbd, plan: &PlanReply) -> Result<Option<String>> {
    let parent = &plan.parent_snapshot;
    if plan.parent_id.is_empty() || !parent.starts_with(SNAP_PREFIX) {
        return Ok(None);
    }
    if rbd.snapshots()?.iter().any(|s| s == parent) {
        Ok(Some(parent.clone()))
    } else {
        tracing::warn!(
            snapshot = %rbd.snap_spec(parent),
            "the parent revision's snapshot is gone: full backup"
        );
        Ok(None)
    }
}

/// The diff to read for snapshot `snap`: from the parent's snapshot
/// `from` when the whole objects it brings hold every block whose digest
/// changes. `baseline` is the parent's manifest resized to the snapshot.
fn choose_diff(rbd: &Rbd, from: Option<String>, snap: &str, baseline: &Manifest) -> Result<Diff> {
    let Some(from) = from else {
        return Ok(Diff::Full { known: None });
    };
    let known = rbd.changed_extents(&from, snap)?;
    let bs = baseline.block_size() as u64;
    if !rbd.objects_hold_whole_blocks(snap, bs)? {
        tracing::warn!(
            snapshot = %rbd.snap_spec(snap),
            "blocks of {bs} bytes span RADOS objects (larger blocks than objects, or striping): reading the whole snapshot"
        );
        return Ok(Diff::Full { known: Some(known) });
    }
    // A resize changes the length of the old last block (and makes a new
    // partial one): unless it was zeros, its digest needs bytes that only a
    // changed object there would bring.
    let parent_size = rbd.size(Some(&from))?;
    let edge = baseline
        .resize_touched(parent_size)
        .into_iter()
        .find(|&b| !baseline.is_zero(b) && !known.iter().any(|e| touches(e, b, bs)));
    if let Some(b) = edge {
        tracing::info!(
            snapshot = %rbd.snap_spec(snap),
            "resized from {parent_size} bytes and block {b} unchanged in Ceph: reading the whole snapshot"
        );
        return Ok(Diff::Full { known: Some(known) });
    }
    Ok(Diff::Incremental { from, known })
}

/// The audit of Ceph's diff (issue 34): a sample of the blocks it calls
/// unchanged is read from the new snapshot (through qemu-nbd, see
/// `source::rbd_nbd`) and compared with the parent's digests. One that
/// differs is a write the diff missed: the push then reads the whole
/// snapshot and compares every block with the parent instead.
fn audit_diff(
    rbd: &Rbd,
    snap: &str,
    baseline: &Manifest,
    diff: Diff,
    plan: Option<&AuditPlan>,
    key: Option<&Key>,
) -> Result<(Diff, Option<Audited>)> {
    let (Some(plan), Diff::Incremental { known, .. } | Diff::Full { known: Some(known) }) = (plan, &diff)
    else {
        return Ok((diff, None));
    };
    let started = Instant::now();
    let mut reader = RbdSnapshot::open(rbd, snap)?;
    if reader.size() != baseline.image_size() {
        return Err(Error::internal(format!(
            "qemu-nbd exports {} bytes of {}, rbd says {}",
            reader.size(),
            rbd.snap_spec(snap),
            baseline.image_size()
        )));
    }
    let outcome = crate::audit::run(&mut reader, baseline, known, plan, key)?;
    drop(reader);
    let secs = started.elapsed().as_secs_f64();
    let diff = if outcome.failed() {
        tracing::warn!(
            tracker = plan.tracker,
            sampled = outcome.sampled,
            mismatched = outcome.mismatched,
            "{outcome}: the change tracker missed writes; reading the whole snapshot"
        );
        Diff::Full { known: None }
    } else {
        tracing::info!(
            tracker = plan.tracker,
            sampled = outcome.sampled,
            mismatched = outcome.mismatched,
            secs,
            "{outcome}"
        );
        diff
    };
    Ok((diff, Some(Audited { outcome, secs })))
}

/// Whether extent `e` touches block `b` of `bs` bytes.
fn touches(e: &Extent, b: u64, bs: u64) -> bool {
    e.len > 0 && e.offset / bs <= b && b <= (e.end() - 1) / bs
}

/// Runs `rbd export-diff`, streams its records as frames, checks that the
/// stream was complete and `rbd` exited 0, then sends the end frame.
/// `baseline`: the parent's manifest resized to the snapshot (zeros
/// without a parent), which the blocks read are compared with. `key`:
/// the job's encryption key (blocks are encrypted before that).
/// `audit`: the outcome of the audit of the diff, for the end frame.
#[allow(clippy::too_many_arguments)]
pub fn export(
    rbd: &Rbd,
    diff: &Diff,
    snap: &str,
    baseline: Manifest,
    exchange: Option<(scan::Answers, bool)>,
    key: Option<std::sync::Arc<Key>>,
    audit: Option<backy_proto::TrackerAudit>,
    mut send: impl FnMut(Frame) -> Result<()>,
    progress: impl FnMut(u64),
) -> Result<Streamed> {
    let (from, size) = match diff {
        Diff::Incremental { from, .. } => (Some(from.as_str()), baseline.image_size()),
        Diff::Full { .. } => (None, baseline.image_size()),
    };
    let mut running = rbd.export_diff(from, snap)?;
    let stdout = running
        .child
        .stdout
        .take()
        .ok_or_else(|| Error::internal("rbd export-diff has no stdout"))?;
    let mut reader = DiffReader::new(BufReader::with_capacity(PIPE_BUFFER, stdout));
    let parsed = read_header(&mut reader, from, snap, size).and_then(|()| match diff {
        Diff::Full { known } => full(
            &mut reader,
            baseline,
            known.clone(),
            exchange,
            key,
            &mut send,
            progress,
        ),
        Diff::Incremental { known, .. } => {
            incremental(&mut reader, baseline, known, key, &mut send, progress)
        }
    });
    // Closing the pipe stops an `rbd` we no longer listen to.
    drop(reader);
    let status = running.wait(EXIT_TIMEOUT)?;
    let (streamed, checksum) = match parsed {
        Err(e) if e.reason == backy_common::Reason::StreamClosed => return Err(e),
        Err(e) => return Err(explain(&mut running, status, e)),
        Ok(done) => done,
    };
    match status {
        Some(s) if s.success() => {}
        _ => {
            let e = Error::unavailable("its diff stream looked complete");
            return Err(explain(&mut running, status, e));
        }
    }
    fault::point("client.before-end");
    send(Frame::End(PushEnd {
        stream_checksum: checksum.to_vec(),
        manifest_digest: streamed.scanned.manifest.file_digest().to_vec(),
        audit,
    }))?;
    Ok(streamed)
}

/// The error to report when the stream or `rbd` failed: `rbd`'s own exit
/// status and message first when it failed, the stream's error otherwise.
fn explain(running: &mut Running, status: Option<std::process::ExitStatus>, stream: Error) -> Error {
    let stderr = running.stderr_tail();
    let what = running.what().to_string();
    match status {
        Some(s) if s.code().is_some_and(|c| c != 0) => Error::unavailable(format!(
            "{what} failed ({}){stderr}; nothing was committed ({})",
            describe(s),
            stream.message
        )),
        Some(s) if !s.success() => Error::unavailable(format!(
            "{what} failed ({}){stderr}; nothing was committed ({})",
            describe(s),
            stream.message
        )),
        None => Error::unavailable(format!(
            "{what} did not exit after its stream ended and was killed{stderr}; nothing was committed"
        )),
        Some(_) => Error {
            message: format!("{what}: {}; nothing was committed", stream.message),
            ..stream
        },
    }
}

/// The metadata records: the snapshots must be the ones asked for and the
/// size the snapshot's.
fn read_header<R: std::io::Read>(
    diff: &mut DiffReader<R>,
    from: Option<&str>,
    snap: &str,
    size: u64,
) -> Result<()> {
    let mut seen_from = None;
    let mut seen_to = None;
    loop {
        match diff.next_record()? {
            Some(Record::Header { .. }) | Some(Record::SnapProtected(_)) => {}
            Some(Record::FromSnap(s)) => seen_from = Some(s),
            Some(Record::ToSnap(s)) => seen_to = Some(s),
            Some(Record::Size(s)) if s != size => {
                return Err(Error::data_loss(format!(
                    "rbd diff: size record says {s} bytes, the snapshot has {size}"
                )))
            }
            Some(Record::Size(_)) => break,
            Some(other) => {
                return Err(Error::data_loss(format!(
                    "rbd diff: {other:?} before the size record"
                )))
            }
            None => return Err(Error::data_loss("rbd diff: stream ended before the size record")),
        }
    }
    if seen_from.as_deref() != from || seen_to.as_deref() != Some(snap) {
        return Err(Error::data_loss(format!(
            "rbd diff: goes from {seen_from:?} to {seen_to:?}, expected {from:?} to {snap:?}"
        )));
    }
    Ok(())
}

/// Incremental: whole changed objects (ascending, as `rbd` sends them)
/// assembled into blocks, each digested and compared with `baseline`; the
/// blocks no record touches keep the parent's digests. Every block `known`
/// touches must have come whole, or the manifest would be the parent's
/// where Ceph says the image changed.
fn incremental<R: std::io::Read>(
    diff: &mut DiffReader<R>,
    baseline: Manifest,
    known: &[Extent],
    key: Option<std::sync::Arc<Key>>,
    send: &mut impl FnMut(Frame) -> Result<()>,
    mut progress: impl FnMut(u64),
) -> Result<(Streamed, [u8; 32])> {
    let size = baseline.image_size();
    let bs = baseline.block_size() as u64;
    let mut scanner = Scanner::new(baseline, send)
        .with_known_changes(known.to_vec())
        .with_zero_granule(PAGE as u64)
        .with_key(key);
    let mut buf = vec![0u8; bs as usize];
    // The block being assembled and how many of its bytes have come.
    let mut open: Option<(u64, u64)> = None;
    let mut visited: Vec<u64> = Vec::new();
    let mut bytes_read = 0u64;
    loop {
        let (offset, len, data) = match diff.next_record()? {
            Some(Record::Data { offset, len }) => (offset, len, true),
            Some(Record::Zero { offset, len }) => (offset, len, false),
            Some(Record::End) => break,
            Some(other) => {
                return Err(Error::data_loss(format!(
                    "rbd diff: unexpected {other:?} record among the extents"
                )))
            }
            None => return Err(Error::data_loss("rbd diff: stream ended without end marker")),
        };
        let end = offset.checked_add(len).filter(|&e| e <= size).ok_or_else(|| {
            Error::data_loss(format!(
                "rbd diff: extent at {offset} of {len} bytes beyond the image"
            ))
        })?;
        let mut at = offset;
        while at < end {
            let index = at / bs;
            let within = at - index * bs;
            let block_len = scanner.manifest().block_len(index);
            let n = (end - at).min(block_len - within);
            if open.is_none() && visited.last().is_some_and(|&v| v >= index) {
                return Err(Error::data_loss(format!(
                    "rbd diff: the extent at {at} comes after later ones (records out of order)"
                )));
            }
            match open {
                Some((i, filled)) if i == index && filled == within => {}
                None if within == 0 => {}
                _ => {
                    return Err(Error::data_loss(format!(
                        "rbd diff: whole-object records leave block {} partly covered",
                        open.map_or(index, |(i, _)| i)
                    )))
                }
            }
            if !data && within == 0 && n == block_len {
                scanner.hole(index)?;
                open = None;
            } else {
                let part = &mut buf[within as usize..(within + n) as usize];
                if data {
                    let got = diff.read_data(part)?;
                    if got as u64 != n {
                        return Err(Error::internal(format!("rbd diff: read {got} of {n} bytes")));
                    }
                    bytes_read += n;
                } else {
                    part.fill(0);
                }
                if within + n < block_len {
                    open = Some((index, within + n));
                } else {
                    scanner.block(index, &buf[..block_len as usize])?;
                    open = None;
                }
            }
            if open.is_none() {
                visited.push(index);
                progress(index * bs + block_len);
            }
            at += n;
        }
    }
    if let Some((i, _)) = open {
        return Err(Error::data_loss(format!(
            "rbd diff: whole-object records leave block {i} partly covered"
        )));
    }
    for e in known.iter().filter(|e| e.len > 0 && e.offset < size) {
        let last = (e.end().min(size) - 1) / bs;
        if let Some(b) = (e.offset / bs..=last).find(|b| visited.binary_search(b).is_err()) {
            return Err(Error::data_loss(format!(
                "rbd diff: block {b} changed, but the whole-object diff does not carry it"
            )));
        }
    }
    let scanned = scanner.finish()?;
    let checksum = scanned.checksum;
    let streamed = Streamed {
        bytes_read,
        bytes_sent: scanned.bytes_sent,
        scanned,
    };
    Ok((streamed, checksum))
}

/// Granularity of zero detection in the changed ranges sent.
const PAGE: usize = 4096;

/// Full: the extents that exist, assembled into blocks (everything else
/// reads as zeros) and compared with `baseline` by the scanner.
fn full<R: std::io::Read>(
    diff: &mut DiffReader<R>,
    baseline: Manifest,
    known: Option<Vec<Extent>>,
    exchange: Option<(scan::Answers, bool)>,
    key: Option<std::sync::Arc<Key>>,
    send: &mut impl FnMut(Frame) -> Result<()>,
    progress: impl FnMut(u64),
) -> Result<(Streamed, [u8; 32])> {
    let (block_size, count) = (baseline.block_size() as u64, baseline.block_count());
    let scanner = match (known, exchange) {
        (Some(known), _) => Scanner::new(baseline, send)
            .with_known_changes(known)
            .with_zero_granule(PAGE as u64),
        // Through the granule exchange: with a parent only the granules
        // that differ travel, and with deduplication (protocol 5) no
        // block the server holds already.
        (None, Some((answers, dedup))) => {
            let scanner = Scanner::new(baseline, send).with_exchange(answers);
            if dedup {
                scanner.with_dedup()
            } else {
                scanner
            }
        }
        (None, None) => Scanner::new(baseline, send),
    }
    .with_key(key);
    let mut blocks = Blocks {
        block_size,
        count,
        buf: vec![0u8; block_size as usize],
        current: 0,
        filled: false,
        scanner,
        progress,
    };
    let mut bytes_read = 0u64;
    loop {
        match diff.next_record()? {
            Some(Record::Data { offset, len }) => {
                let end = offset + len;
                let mut at = offset;
                while at < end {
                    let index = at / blocks.block_size;
                    if index < blocks.current {
                        return Err(Error::data_loss(format!(
                            "rbd diff: the extent at {at} comes after later ones (images with \
                             fancy striping are not supported)"
                        )));
                    }
                    blocks.advance(index)?;
                    let within = (at - index * blocks.block_size) as usize;
                    let n = (end - at).min(blocks.block_size - within as u64) as usize;
                    let got = diff.read_data(&mut blocks.buf[within..within + n])?;
                    if got != n {
                        return Err(Error::internal(format!("rbd diff: read {got} of {n} bytes")));
                    }
                    blocks.filled = true;
                    bytes_read += n as u64;
                    at += n as u64;
                }
            }
            // A full diff has nothing to zero: absent extents read as zeros.
            Some(Record::Zero { .. }) => {}
            Some(Record::End) => {
                blocks.advance(blocks.count)?;
                let scanned = blocks.scanner.finish()?;
                let checksum = scanned.checksum;
                let streamed = Streamed {
                    bytes_read,
                    bytes_sent: scanned.bytes_sent,
                    scanned,
                };
                return Ok((streamed, checksum));
            }
            Some(other) => {
                return Err(Error::data_loss(format!(
                    "rbd diff: unexpected {other:?} record among the extents"
                )))
            }
            None => return Err(Error::data_loss("rbd diff: stream ended without end marker")),
        }
    }
}

/// Blocks of a full backup being assembled from the diff's extents.
struct Blocks<E, P> {
    block_size: u64,
    count: u64,
    buf: Vec<u8>,
    /// The block being assembled, and whether any extent touched it.
    current: u64,
    filled: bool,
    scanner: Scanner<E>,
    progress: P,
}

impl<E: FnMut(Frame) -> Result<()>, P: FnMut(u64)> Blocks<E, P> {
    /// Hands every block before `upto` to the scanner: the current one as
    /// assembled, the ones no extent touched as holes.
    fn advance(&mut self, upto: u64) -> Result<()> {
        while self.current < upto {
            if self.filled {
                let len = self.scanner.manifest().block_len(self.current) as usize;
                self.scanner.block(self.current, &self.buf[..len])?;
                self.buf.fill(0);
                self.filled = false;
            } else {
                self.scanner.hole(self.current)?;
            }
            self.current += 1;
            (self.progress)(self.current * self.block_size);
        }
        Ok(())
    }
}

/// Runs blocking work (the `rbd` tool, hooks) off the async threads.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("blocking task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::checksum::StreamChecksum;
    use backy_common::manifest::digest;
    use backy_common::ErrorKind;

    const BS: u32 = 64 << 10;

    /// A v1 diff stream from `from` to `to` of an image of `size` bytes.
    fn stream(size: u64, writes: &[(u64, Vec<u8>)], zeros: &[(u64, u64)]) -> Vec<u8> {
        let mut s = b"rbd diff v1\n".to_vec();
        for (tag, name) in [(b'f', "backy-a"), (b't', "backy-b")] {
            s.push(tag);
            s.extend_from_slice(&(name.len() as u32).to_le_bytes());
            s.extend_from_slice(name.as_bytes());
        }
        s.push(b's');
        s.extend_from_slice(&size.to_le_bytes());
        for (off, data) in writes {
            s.push(b'w');
            s.extend_from_slice(&off.to_le_bytes());
            s.extend_from_slice(&(data.len() as u64).to_le_bytes());
            s.extend_from_slice(data);
        }
        for (off, len) in zeros {
            s.push(b'z');
            s.extend_from_slice(&off.to_le_bytes());
            s.extend_from_slice(&len.to_le_bytes());
        }
        s.push(b'e');
        s
    }

    /// Applies frames to an image, checking the stream checksum.
    fn apply(image: &mut [u8], frames: &[Frame], checksum: [u8; 32]) {
        let mut c = StreamChecksum::new();
        for f in frames {
            match f {
                Frame::Data(d) => {
                    c.data(d.offset, &d.data);
                    image[d.offset as usize..d.offset as usize + d.data.len()].copy_from_slice(&d.data);
                }
                Frame::Zero(z) => {
                    c.zero(z.offset, z.length);
                    image[z.offset as usize..(z.offset + z.length) as usize].fill(0);
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert_eq!(c.finish(), checksum);
    }

    /// The manifest of a whole image.
    fn manifest_of(image: &[u8]) -> Manifest {
        let mut m = Manifest::zeroed(image.len() as u64, BS).unwrap();
        for (b, block) in image.chunks(BS as usize).enumerate() {
            m.set(b as u64, digest(block)).unwrap();
        }
        m
    }

    fn run_incremental(
        raw: &[u8],
        parent: Manifest,
        known: &[Extent],
    ) -> Result<(Streamed, [u8; 32], Vec<Frame>)> {
        let size = parent.image_size();
        let mut diff = DiffReader::new(raw);
        read_header(&mut diff, Some("backy-a"), "backy-b", size)?;
        let mut frames = Vec::new();
        let (streamed, checksum) = incremental(
            &mut diff,
            parent,
            known,
            None,
            &mut |f| {
                frames.push(f);
                Ok(())
            },
            |_| {},
        )?;
        Ok((streamed, checksum, frames))
    }

    #[test]
    fn incremental_digests_whole_objects_and_sends_the_changes() {
        let bs = BS as usize;
        let size = 4 * BS as u64 + 100;
        let parent = vec![7u8; size as usize];
        let mut now = parent.clone();
        now[bs + 1000..bs + 1010].fill(9);
        now[2 * bs + 5..2 * bs + 8].copy_from_slice(&[1, 2, 3]);
        now[4 * bs..].fill(0);
        // Objects of one block: 1 and 2 changed, the last (100 bytes)
        // discarded.
        let raw = stream(
            size,
            &[
                (BS as u64, now[bs..2 * bs].to_vec()),
                (2 * BS as u64, now[2 * bs..3 * bs].to_vec()),
            ],
            &[(4 * BS as u64, 100)],
        );
        let known = [
            Extent {
                offset: BS as u64 + 1000,
                len: 10,
            },
            Extent {
                offset: 2 * BS as u64 + 5,
                len: 3,
            },
            Extent {
                offset: 4 * BS as u64,
                len: 10,
            },
        ];
        let (streamed, checksum, frames) = run_incremental(&raw, manifest_of(&parent), &known).unwrap();
        assert_eq!(streamed.bytes_read, 2 * BS as u64);
        assert_eq!(streamed.bytes_sent, 13, "only the changed bytes go");
        assert_eq!(streamed.scanned.manifest, manifest_of(&now));
        let mut image = parent.clone();
        apply(&mut image, &frames, checksum);
        assert!(image == now);

        // A changed block the whole-object diff does not bring, or brings
        // in part, is refused: its digest would be the parent's.
        let mut more = known.to_vec();
        more.push(Extent {
            offset: 3 * BS as u64 + 5,
            len: 1,
        });
        let e = run_incremental(&raw, manifest_of(&parent), &more).err().unwrap();
        assert_eq!(e.kind, ErrorKind::DataLoss);
        assert!(e.message.contains("block 3 changed"), "{}", e.message);
        // Records out of order are refused too.
        let disorder = stream(
            size,
            &[(2 * BS as u64, now[2 * bs..3 * bs].to_vec())],
            &[(0, BS as u64)],
        );
        let e = run_incremental(&disorder, manifest_of(&parent), &[])
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::DataLoss);
        assert!(e.message.contains("out of order"), "{}", e.message);
        let partial = stream(size, &[(BS as u64, vec![9u8; 100])], &[]);
        let e = run_incremental(&partial, manifest_of(&parent), &[])
            .err()
            .unwrap();
        assert!(e.message.contains("block 1 partly covered"), "{}", e.message);
    }

    #[test]
    fn full_compares_blocks_with_the_parent() {
        let size = 4 * BS as u64 + 100;
        // The parent: block 0 as now, block 1 with data that is gone now.
        let block0 = vec![5u8; BS as usize];
        let mut parent = Manifest::zeroed(size, BS).unwrap();
        parent.set(0, digest(&block0)).unwrap();
        parent.set(1, digest(&vec![6u8; BS as usize])).unwrap();
        let writes = vec![
            (0, block0.clone()),
            (3 * BS as u64 - 10, vec![8u8; 20]),
            (size - 1, vec![1]),
        ];
        let raw = stream(size, &writes, &[]);
        let mut diff = DiffReader::new(&raw[..]);
        read_header(&mut diff, Some("backy-a"), "backy-b", size).unwrap();
        let mut frames = Vec::new();
        let (streamed, checksum) = full(
            &mut diff,
            parent,
            None,
            None,
            None,
            &mut |f| {
                frames.push(f);
                Ok(())
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(streamed.bytes_read, BS as u64 + 21);
        // Block 0 is unchanged, block 1 zeroed, blocks 2, 3 and the tail sent.
        assert_eq!(streamed.bytes_sent, 2 * BS as u64 + 100);
        let mut image = vec![0u8; size as usize];
        image[..BS as usize].copy_from_slice(&block0);
        image[BS as usize..2 * BS as usize].fill(6);
        apply(&mut image, &frames, checksum);
        let mut want = vec![0u8; size as usize];
        want[..BS as usize].copy_from_slice(&block0);
        want[3 * BS as usize - 10..3 * BS as usize + 10].fill(8);
        want[size as usize - 1] = 1;
        assert!(image == want);
        let scanned = streamed.scanned;
        for b in 0..5 {
            let o = b * BS as usize;
            let end = (o + BS as usize).min(size as usize);
            assert_eq!(
                scanned.manifest.get(b as u64),
                Some(&digest(&want[o..end])),
                "block {b}"
            );
        }
    }

    #[test]
    fn broken_streams_fail_before_the_end() {
        let size = 2 * BS as u64;
        let good = stream(size, &[(10, vec![1u8; 5000])], &[(BS as u64, 10)]);
        for cut in [20, 60, 100, good.len() - 1] {
            for is_full in [false, true] {
                let mut diff = DiffReader::new(&good[..cut]);
                let mut frames = 0;
                let r = read_header(&mut diff, Some("backy-a"), "backy-b", size).and_then(|()| {
                    let send = &mut |_| {
                        frames += 1;
                        Ok(())
                    };
                    let zeros = Manifest::zeroed(size, BS).unwrap();
                    if is_full {
                        full(&mut diff, zeros, None, None, None, send, |_| {}).map(drop)
                    } else {
                        incremental(&mut diff, zeros, &[], None, send, |_| {}).map(drop)
                    }
                });
                let e = r.unwrap_err();
                assert_eq!(e.kind, ErrorKind::DataLoss, "cut {cut}: {}", e.message);
            }
        }
        // The wrong snapshots or size are refused.
        let mut diff = DiffReader::new(&good[..]);
        let e = read_header(&mut diff, None, "backy-b", size).unwrap_err();
        assert!(e.message.contains("expected None"), "{}", e.message);
        let mut diff = DiffReader::new(&good[..]);
        let e = read_header(&mut diff, Some("backy-a"), "backy-b", size + 1).unwrap_err();
        assert!(e.message.contains("size record says"), "{}", e.message);
    }
}
