//! What every push kind shares: its arguments and outcome, the baseline
//! the source is compared with, the request stream's plumbing and the
//! commit check. It imports no push kind, so the kinds never import each
//! other.

use crate::connect::{status_error, Client};
use crate::scan::{self, Scanned};
use crate::view::{short_id, RevisionView};
use backy_common::manifest::Manifest;
use backy_common::source::SourceSpec;
use backy_common::units::format_bytes;
use backy_common::{Error, JobName, Result, RevisionId};
use backy_proto::push_event::Event;
use backy_proto::{GranulesWanted, PlanReply, PushFrame, PushReply, RevisionInfo};
use serde::Serialize;
use std::fmt;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};

/// Frames in flight between the reader and the network: at most this many
/// MiB of data wait in memory.
pub(crate) const FRAMES_IN_FLIGHT: usize = 16;

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
    /// Share of the blocks a change tracker calls unchanged that are read
    /// again and compared with the parent (issue 34); 0 turns it off.
    pub audit_sample: backy_common::tracker_audit::SamplePercent,
    /// The process's bandwidth limit, shared by its pushes.
    pub bwlimit: Option<std::sync::Arc<crate::bwlimit::Limiter>>,
    /// The group push this disk's revision is part of (set by the group
    /// push, recorded in the revision).
    pub group: Option<backy_proto::GroupInstant>,
    /// The job's encryption key (client.yaml `encryption:`); `None`: the
    /// image is stored in the clear.
    pub key: Option<std::sync::Arc<backy_common::encryption::Key>>,
    /// Start a new key chain: a full push whatever the parent's key.
    pub new_key: bool,
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
    /// The audit of the change tracker the push relied on; absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<Audited>,
}

/// A change tracker's audit and what it cost.
#[derive(Debug, Serialize)]
pub struct Audited {
    #[serde(flatten)]
    pub outcome: backy_common::tracker_audit::AuditOutcome,
    pub secs: f64,
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
        if self.revision.bytes_deduplicated > 0 {
            write!(
                f,
                " ({} held by the server already)",
                format_bytes(self.revision.bytes_deduplicated)
            )?;
        }
        if let Some(at) = self.resumed_at {
            write!(f, " (resumed at {})", format_bytes(at))?;
        }
        if let Some(why) = &self.full_read {
            write!(f, " (read whole: {why})")?;
        }
        if let Some(a) = &self.audit {
            write!(f, "; {} in {:.1} s", a.outcome, a.secs)?;
            if a.outcome.failed() {
                write!(f, ": the tracker missed writes, so the whole source was read")?;
            }
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

/// The `PushExchange` call: relays the server's granule answers to the
/// scanner and resolves to its final reply, like `Push`.
pub(crate) async fn push_exchange(
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
pub(crate) fn answers_from(mut rx: mpsc::Receiver<GranulesWanted>) -> scan::Answers {
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

fn flatten<T>(joined: std::result::Result<Result<T>, JoinError>) -> Result<T> {
    joined.map_err(|e| Error::internal(format!("source reader failed: {e}")))?
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

    fn scanned() -> Scanned {
        Scanned {
            manifest: Manifest::zeroed(0, 64 << 10).unwrap(),
            checksum: [0; 32],
            bytes_read: 0,
            bytes_sent: 0,
            digest_bytes: 0,
            changed_blocks: 0,
            bytes_held: 0,
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
            audit: None,
        };
        assert_eq!(
            pushed.to_string(),
            "vm1: revision 3xKabc committed, 4.00 GiB image, 42.00 MiB sent in 2.3 s, 2 old revisions expired"
        );
        let audited = |mismatched| Pushed {
            job: "vm1".into(),
            revision: pushed.revision.clone(),
            bytes_read: 0,
            bytes_sent: 42 << 20,
            duration_secs: 2.34,
            expired: Vec::new(),
            resumed_at: None,
            full_read: None,
            audit: Some(Audited {
                outcome: backy_common::tracker_audit::AuditOutcome {
                    tracker: "qemu-bitmap".into(),
                    sampled: 82,
                    mismatched,
                },
                secs: 0.42,
            }),
        };
        assert_eq!(
            audited(0).to_string(),
            "vm1: revision 3xKabc committed, 4.00 GiB image, 42.00 MiB sent in 2.3 s; QEMU dirty bitmap \
             audit: 82 unchanged blocks re-read, 0 differ in 0.4 s"
        );
        assert!(audited(1)
            .to_string()
            .ends_with("1 differ in 0.4 s: the tracker missed writes, so the whole source was read"));
    }
}
