//! `push`: ask the server for a plan, scan the source against the parent's
//! manifest, and stream the changed ranges.
//!
//! The source is read in a blocking thread that hands frames to the gRPC
//! request stream through a bounded channel: a slow network or server slows
//! the reading down instead of filling memory.

pub mod rbd;

use crate::connect::{status_error, Client};
use crate::progress::Progress;
use crate::scan::{self, Scanned};
use crate::source::{self, Source};
use crate::view::{short_id, RevisionView};
use backy_common::manifest::{check_block_size, Manifest};
use backy_common::revision::check_tag;
use backy_common::source::SourceSpec;
use backy_common::units::format_bytes;
use backy_common::{fault, Error, JobName, Result, RevisionId};
use backy_proto::push_event::Event;
use backy_proto::push_frame::Frame;
use backy_proto::{
    GranulesWanted, PlanReply, PlanRequest, PushBegin, PushEnd, PushFrame, PushReply, RevisionInfo,
};
use serde::Serialize;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};

/// Frames in flight between the reader and the network: at most this many
/// MiB of data wait in memory.
pub(crate) const FRAMES_IN_FLIGHT: usize = 16;

/// The reader's error when the request stream is gone; the server's status
/// then says why.
/// The sender's error when the push stream closed under it: the RPC's
/// own outcome then says why.
pub(crate) fn stream_closed() -> Error {
    Error::unavailable("push stream closed").with_reason(backy_common::Reason::StreamClosed)
}

#[derive(Debug, Clone)]
pub struct PushArgs {
    pub job: JobName,
    /// A path (file or block device), `rbd:POOL/IMAGE` or `qemu:IMAGE`; default:
    /// `configured`.
    pub source: Option<String>,
    /// The job's source (with its hooks) in this hypervisor's client
    /// config, if it lists the job; never anything the server sent.
    pub configured: Option<SourceSpec>,
    /// The client config's name, for the error when neither is given.
    pub config_name: String,
    pub force: bool,
    pub tags: Vec<String>,
    /// Accept tags outside the job's schedule (they go with the expiry
    /// after the next backup).
    pub allow_unscheduled: bool,
    /// Accept a source smaller than the last revision.
    pub allow_shrink: bool,
    /// A file of byte ranges changed since the parent revision: only the
    /// blocks they touch are read (see [`crate::changed_ranges`]).
    pub changed_ranges: Option<std::path::PathBuf>,
}

/// A committed push.
#[derive(Debug, Serialize)]
pub struct Pushed {
    pub job: String,
    pub revision: RevisionView,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub duration_secs: f64,
    pub expired: Vec<String>,
    /// Where an interrupted push of this revision was resumed.
    pub resumed_at: Option<u64>,
    /// Why a source that tracks its changes was read whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_read: Option<String>,
}

impl fmt::Display for Pushed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: revision {} committed, {} image, {} sent in {:.1} s",
            self.job,
            self.revision.id,
            format_bytes(self.revision.size),
            format_bytes(self.bytes_sent),
            self.duration_secs
        )?;
        if let Some(at) = self.resumed_at {
            write!(f, " (resumed at {})", format_bytes(at))?;
        }
        if let Some(why) = &self.full_read {
            write!(f, " (read whole: {why})")?;
        }
        match self.expired.len() {
            0 => Ok(()),
            n => write!(
                f,
                ", {} expired",
                backy_common::units::count(n as u64, "old revision")
            ),
        }
    }
}

/// Runs a push; `None` when the job is not due (and nothing was done).
pub async fn push(client: &mut Client, args: &PushArgs, progress: &dyn Progress) -> Result<Option<Pushed>> {
    let started = Instant::now();
    let job = args.job.as_str();
    for tag in &args.tags {
        check_tag(tag)?;
    }
    let plan = client
        .plan(PlanRequest {
            job: job.to_string(),
            force: args.force,
            tags: args.tags.clone(),
            allow_unscheduled: args.allow_unscheduled,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if !plan.due {
        tracing::info!(job, reason = %plan.reason, "not due");
        return Ok(None);
    }
    let parent = crate::view::revision_id(&plan.parent_id);
    tracing::info!(job, reason = %plan.reason, tags = ?plan.tags, %parent, "due");
    check_plan(&plan)?;
    fault::point("client.planned");
    match push_planned(client, args, &plan, progress, started).await {
        Ok(pushed) => Ok(Some(pushed)),
        Err(e) => {
            report_failure(client, job, &plan.new_id, &e).await;
            Err(e)
        }
    }
}

/// Tells the server that a planned push failed, so its status, check and
/// backoff count every failed attempt, also those that never reached it
/// (missing source, hook or rbd failure). Best effort: the push's own
/// error is what the caller reports.
async fn report_failure(client: &mut Client, job: &str, rev_id: &str, error: &Error) {
    let report = backy_proto::FailureReport {
        job: job.to_string(),
        rev_id: rev_id.to_string(),
        error: error.message.clone(),
    };
    if let Err(status) = client.report_failure(report).await {
        tracing::warn!(
            job,
            "could not report the failure to the server: {}",
            status.message()
        );
    }
}

/// The push after a due plan: read the source, stream, check the reply.
async fn push_planned(
    client: &mut Client,
    args: &PushArgs,
    plan: &PlanReply,
    progress: &dyn Progress,
    started: Instant,
) -> Result<Pushed> {
    let job = args.job.as_str();

    let spec = source_spec(
        job,
        args.source.as_deref(),
        args.configured.as_ref(),
        &args.config_name,
    )?;
    if let SourceSpec::CephRbd { .. } = spec {
        return rbd::push(client, args, plan, &spec, progress, started).await;
    }
    // Hooks run here (pre-snapshot may take long): off the async workers.
    let mut qemu = None;
    let mut full_read = None;
    let mut source = if let SourceSpec::Qemu(qemu_spec) = &spec {
        let (qemu_spec, job, id, parent) = (
            qemu_spec.clone(),
            job.to_string(),
            plan.new_id.clone(),
            plan.parent_id.clone(),
        );
        let opened = tokio::task::spawn_blocking(move || source::qemu::open(&qemu_spec, &job, &id, &parent))
            .await
            .map_err(|e| Error::internal(format!("opening the source: {e}")))??;
        if let Some(why) = &opened.full_read_reason {
            tracing::info!(job = args.job.as_str(), "reading the whole disk: {why}");
            full_read = opened.full_read_reason.clone();
        }
        // Dropped on any error below: that removes the new bitmap, in this
        // thread on purpose (the process may exit right after the error).
        qemu = Some(opened.session);
        Box::new(opened.source) as Box<dyn source::Source>
    } else {
        let (spec, job, id) = (spec.clone(), job.to_string(), plan.new_id.clone());
        tokio::task::spawn_blocking(move || source::open(&spec, &job, &id))
            .await
            .map_err(|e| Error::internal(format!("opening the source: {e}")))??
    };
    let size = source.size();
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
    // The granule exchange compares with a parent and needs a server that
    // speaks it; the fault mode poses as an older client (tests of the
    // whole-block push). A full push goes through Push as always.
    let exchange = has_parent
        && !fault::mode("whole-blocks")
        && crate::connect::server_protocol(client).await? >= backy_proto::GRANULE_PROTOCOL;
    let (answers_tx, answers_rx) = mpsc::channel(scan::EXCHANGE_WINDOW + 1);
    let answers = exchange.then(|| answers_from(answers_rx));
    let reader = tokio::task::spawn_blocking(move || {
        read_source(&mut *source, baseline, has_parent, answers, &tx, |pos| {
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
    let (scanned, reply) = joined.map_err(|e| match (&args.changed_ranges, e.kind) {
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
    if let Some(session) = qemu {
        // Committed on the server: the parent's bitmap has served. Failing
        // to drop it only leaves a bitmap behind.
        let done = tokio::task::spawn_blocking(move || session.commit()).await;
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
    })
}

/// Waits for both sides of a push and decides whose error to report.
pub(crate) async fn join<T, F>(mut reader: JoinHandle<Result<T>>, rpc: F) -> Result<(T, PushReply)>
where
    F: Future<Output = std::result::Result<tonic::Response<PushReply>, tonic::Status>>,
{
    let early_reply = || Error::internal("server replied before the push ended");
    tokio::pin!(rpc);
    tokio::select! {
        joined = &mut reader => match flatten(joined) {
            Ok(scanned) => Ok((scanned, rpc.await.map_err(status_error)?.into_inner())),
            // The server ended the stream: its status says why.
            Err(e) if e.reason == backy_common::Reason::StreamClosed => Err(match rpc.await {
                Err(status) => status_error(status),
                Ok(_) => early_reply(),
            }),
            // A read error. Returning drops the request, which resets the
            // stream, so the server discards the partial revision.
            Err(e) => Err(e),
        },
        reply = &mut rpc => match reply {
            // Committed: the reader has sent the end marker and is returning.
            Ok(reply) => match flatten(reader.await) {
                Ok(scanned) => Ok((scanned, reply.into_inner())),
                Err(e) if e.reason == backy_common::Reason::StreamClosed => Err(early_reply()),
                Err(e) => Err(e),
            },
            // The server failed the push, possibly because the reader failed
            // and the stream ended without its end marker: then the reader's
            // error is the one that explains. A reader still busy stops at
            // its next send; it is not waited for long.
            Err(status) => match tokio::time::timeout(Duration::from_secs(1), reader).await {
                Ok(joined) => match flatten(joined) {
                    Err(e) if e.reason != backy_common::Reason::StreamClosed => Err(e),
                    _ => Err(status_error(status)),
                },
                Err(_) => Err(status_error(status)),
            },
        },
    }
}

/// The `PushExchange` call: relays the server's granule answers to the
/// scanner and resolves to its final reply, like `Push`.
async fn push_exchange(
    client: &mut Client,
    frames: impl tokio_stream::Stream<Item = PushFrame> + Send + 'static,
    answers: mpsc::Sender<GranulesWanted>,
) -> std::result::Result<tonic::Response<PushReply>, tonic::Status> {
    let mut events = client.push_exchange(frames).await?.into_inner();
    while let Some(event) = events.message().await? {
        match event.event {
            // A scanner that has finished or failed takes no more answers;
            // the stream's end or status still decides the outcome.
            Some(Event::Wanted(wanted)) => {
                let _ = answers.send(wanted).await;
            }
            Some(Event::Done(reply)) => return Ok(tonic::Response::new(reply)),
            None => return Err(tonic::Status::internal("the server sent an empty push event")),
        }
    }
    Err(tonic::Status::internal(
        "the server ended the push without a reply",
    ))
}

/// The scanner's side of the answers channel.
fn answers_from(mut rx: mpsc::Receiver<GranulesWanted>) -> scan::Answers {
    Box::new(move |wait| {
        if wait {
            return rx.blocking_recv().map(Some).ok_or_else(stream_closed);
        }
        match rx.try_recv() {
            Ok(answer) => Ok(Some(answer)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(stream_closed()),
        }
    })
}

fn flatten<T>(joined: std::result::Result<Result<T>, JoinError>) -> Result<T> {
    joined.map_err(|e| Error::internal(format!("source reader failed: {e}")))?
}

/// The blocking side: scan, then the end marker.
fn read_source(
    source: &mut dyn Source,
    baseline: Manifest,
    has_parent: bool,
    answers: Option<scan::Answers>,
    tx: &mpsc::Sender<PushFrame>,
    progress: impl FnMut(u64),
) -> Result<Scanned> {
    let send = |frame| {
        let sent = tx
            .blocking_send(PushFrame { frame: Some(frame) })
            .map_err(|_| stream_closed());
        fault::point("client.frame");
        sent
    };
    // Known changes are relative to the parent's snapshot: without a parent
    // everything is compared with zeros.
    let changed = if has_parent {
        source.changed_extents()?
    } else {
        None
    };
    let scanned = scan::scan(source, baseline, changed, answers, send, progress)?;
    fault::point("client.before-end");
    send(Frame::End(PushEnd {
        stream_checksum: scanned.checksum.to_vec(),
        manifest_digest: scanned.manifest.file_digest().to_vec(),
    }))?;
    Ok(scanned)
}

fn check_plan(plan: &PlanReply) -> Result<()> {
    let bad = |why: String| Error::internal(format!("server sent a bad plan: {why}"));
    plan.new_id
        .parse::<RevisionId>()
        .map_err(|e| bad(format!("new id: {e}")))?;
    if !plan.parent_id.is_empty() {
        plan.parent_id
            .parse::<RevisionId>()
            .map_err(|e| bad(format!("parent id: {e}")))?;
    }
    check_block_size(plan.block_size).map_err(|e| bad(e.message))
}

/// The source to read: the command line's, else the one this hypervisor's
/// client config lists for the job. Nothing else: the server never says
/// what a hypervisor reads or runs.
pub fn source_spec(
    job: &str,
    cli: Option<&str>,
    configured: Option<&SourceSpec>,
    config_name: &str,
) -> Result<SourceSpec> {
    match (cli, configured) {
        (Some(s), _) => SourceSpec::from_cli(s, source::is_block_device),
        (None, Some(spec)) => Ok(spec.clone()),
        (None, None) => Err(Error::invalid(format!(
            "job {job} is not listed in {config_name} (jobs: {job}: source: ...) and no --source \
             was given: this hypervisor does not back it up"
        ))),
    }
}

/// What the source is compared with: the parent's manifest at the source's
/// size, or all zeros for a full backup (the server starts it from an empty
/// sparse file).
pub(crate) async fn baseline(
    client: &mut Client,
    job: &str,
    plan: &PlanReply,
    size: u64,
) -> Result<Manifest> {
    if plan.parent_id.is_empty() {
        return Manifest::zeroed(size, plan.block_size);
    }
    let (info, parent) = crate::manifest::fetch(client, job, &plan.parent_id).await?;
    if info.id.parse::<RevisionId>().ok() != plan.parent_id.parse::<RevisionId>().ok() {
        return Err(Error::internal(format!(
            "asked for parent {}, the server sent revision {}",
            plan.parent_id, info.id
        )));
    }
    rebase(parent, plan.block_size, size).map_err(|e| e.context(format!("parent {}", short_id(&info))))
}

/// The parent's manifest resized to the source. Blocks whose length
/// changes keep the old digest, so they never match and are sent.
pub fn rebase(mut parent: Manifest, block_size: u32, size: u64) -> Result<Manifest> {
    if parent.block_size() != block_size {
        return Err(Error::precondition(format!(
            "manifest block size {} differs from the job's {block_size}",
            parent.block_size()
        )));
    }
    parent.resize(size)?;
    Ok(parent)
}

/// The server's manifest must be the one we computed: otherwise the stored
/// image is not the one we read.
pub(crate) fn check_committed(revision: &RevisionInfo, scanned: &Scanned) -> Result<()> {
    let ours = hex::encode(scanned.manifest.file_digest());
    if !revision.manifest_digest.is_empty() && !revision.manifest_digest.eq_ignore_ascii_case(&ours) {
        return Err(Error::data_loss(format!(
            "revision {} was committed with manifest digest {}, but the client computed {ours}",
            short_id(revision),
            revision.manifest_digest
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::manifest::digest;
    use backy_common::ErrorKind;

    #[test]
    fn source_from_cli_or_client_config() {
        let block = SourceSpec::Block {
            path: "/dev/x".into(),
            hooks: Default::default(),
        };
        let s = source_spec("vm1", Some("disk.img"), Some(&block), "client.yaml").unwrap();
        assert_eq!(s.kind(), "file");
        let s = source_spec("vm1", None, Some(&block), "client.yaml").unwrap();
        assert_eq!(s, block);
        let e = source_spec("vm1", None, None, "/etc/backy/client.yaml").unwrap_err();
        assert!(
            e.message
                .starts_with("job vm1 is not listed in /etc/backy/client.yaml"),
            "{}",
            e.message
        );
    }

    #[test]
    fn rebase_resizes_and_checks_block_size() {
        let bs = 64 << 10;
        let mut parent = Manifest::zeroed(3 * bs as u64, bs).unwrap();
        parent.set(0, digest(b"a")).unwrap();
        let m = rebase(parent.clone(), bs, 5 * bs as u64 + 1).unwrap();
        assert_eq!(m.block_count(), 6);
        assert_eq!(m.get(0), Some(&digest(b"a")));
        let e = rebase(parent, bs * 2, 1).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    }

    #[test]
    fn plan_checks() {
        let good = PlanReply {
            due: true,
            new_id: RevisionId::new_random().uuid().to_string(),
            block_size: 4 << 20,
            ..PlanReply::default()
        };
        assert!(check_plan(&good).is_ok());
        for bad in [
            PlanReply {
                new_id: String::new(),
                ..good.clone()
            },
            PlanReply {
                parent_id: "x".into(),
                ..good.clone()
            },
            PlanReply {
                block_size: 1000,
                ..good.clone()
            },
        ] {
            assert!(check_plan(&bad).is_err(), "{bad:?}");
        }
    }

    fn scanned() -> Scanned {
        Scanned {
            manifest: Manifest::zeroed(0, 64 << 10).unwrap(),
            checksum: [0; 32],
            bytes_read: 0,
            bytes_sent: 0,
            digest_bytes: 0,
            changed_blocks: 0,
        }
    }

    /// Runs `join` with a reader that ends after `reader_ms` and an RPC that
    /// ends after `rpc_ms`.
    async fn race(
        reader_ms: u64,
        reader: Result<()>,
        rpc_ms: u64,
        rpc: std::result::Result<(), tonic::Status>,
    ) -> Result<(Scanned, PushReply)> {
        let reader = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(reader_ms));
            reader.map(|()| scanned())
        });
        let rpc = async move {
            tokio::time::sleep(Duration::from_millis(rpc_ms)).await;
            rpc.map(|()| tonic::Response::new(PushReply::default()))
        };
        join(reader, rpc).await
    }

    #[tokio::test]
    async fn join_reports_the_error_that_explains() {
        let closed = || Err(stream_closed());
        let full = || Err(tonic::Status::resource_exhausted("disk full"));
        type RpcResult = std::result::Result<(), tonic::Status>;
        type Case = (u64, Result<()>, u64, RpcResult, Option<&'static str>);
        let cases: Vec<Case> = vec![
            (0, Ok(()), 10, Ok(()), None),
            (10, Ok(()), 0, Ok(()), None),
            (0, closed(), 10, full(), Some("disk full (RESOURCE_EXHAUSTED)")),
            (10, closed(), 0, full(), Some("disk full (RESOURCE_EXHAUSTED)")),
            (
                0,
                Err(Error::io("reading x", std::io::ErrorKind::Other.into())),
                10,
                full(),
                Some("reading x"),
            ),
            (
                10,
                Err(Error::io("reading x", std::io::ErrorKind::Other.into())),
                0,
                full(),
                Some("reading x"),
            ),
            (
                10,
                closed(),
                0,
                Ok(()),
                Some("server replied before the push ended"),
            ),
            (0, Ok(()), 10, full(), Some("disk full")),
        ];
        for (reader_ms, reader, rpc_ms, rpc, want) in cases {
            let got = race(reader_ms, reader, rpc_ms, rpc).await;
            match (want, got) {
                (None, Ok(_)) => {}
                (Some(w), Err(e)) => assert!(e.message.starts_with(w), "want {w:?}, got {:?}", e.message),
                (want, got) => panic!("want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn line_names_revision_sizes_and_expiry() {
        let pushed = Pushed {
            job: "vm1".into(),
            revision: RevisionView::from(&RevisionInfo {
                short_id: "3xKabc".into(),
                size: 4 << 30,
                ..RevisionInfo::default()
            }),
            bytes_read: 0,
            bytes_sent: 42 << 20,
            duration_secs: 2.34,
            expired: vec!["a".into(), "b".into()],
            resumed_at: None,
            full_read: None,
        };
        assert_eq!(
            pushed.to_string(),
            "vm1: revision 3xKabc committed, 4.00 GiB image, 42.00 MiB sent in 2.3 s, 2 old revisions expired"
        );
    }
}
