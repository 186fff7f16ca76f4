//! `restore`: fetch a revision's manifest, stream its image, check every
//! block against the manifest as it arrives, and write it to a file or a
//! block device.
//!
//! Frames go from the network to a blocking writer thread through a
//! bounded channel, so a slow disk slows the stream instead of filling
//! memory.

mod check;
mod rbd;
mod rollback;
pub(crate) mod target;

use crate::connect::{status_error, Client};
use crate::progress::Progress;
use crate::view::{short_id, RevisionView};
use backy_common::encryption::Key;
use backy_common::spec::Spec;
use backy_common::units::format_bytes;
use backy_common::{Error, JobName, Result};
use backy_proto::restore_frame::Frame;
use backy_proto::{RestoreFrame, RestoreRequest};
use check::StreamCheck;
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;
use std::time::Instant;
use target::Target;
pub use target::STDOUT;
use tokio::sync::mpsc;

/// Frames buffered between the network and the disk (at most 1 MiB each).
const FRAMES_IN_FLIGHT: usize = 16;

#[derive(Debug, Clone)]
pub struct RestoreArgs {
    pub job: JobName,
    /// Revision spec.
    pub revision: String,
    pub target: PathBuf,
    pub force: bool,
    /// Restore every block even onto a target of the revision's size
    /// (no rollback); replaces a target of another size.
    pub full: bool,
    /// No note on standard error when rolling back.
    pub quiet: bool,
    /// The job's encryption key: an encrypted revision is decrypted with
    /// it, and refused without it or with another.
    pub key: Option<std::sync::Arc<backy_common::encryption::Key>>,
}

/// How a restore went about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every block from the server.
    Full,
    /// Only what differs in a target of the revision's size.
    Rollback,
}

/// A completed restore.
#[derive(Debug, Serialize)]
pub struct Restored {
    pub job: String,
    pub revision: RevisionView,
    pub target: PathBuf,
    pub data_bytes: u64,
    pub mode: Mode,
    /// Bytes of the target read locally (a rollback reads all of it).
    pub read_bytes: u64,
    /// Data bytes that came from the server.
    pub fetched_bytes: u64,
    /// Bytes of the target written or zeroed (a full restore: its data
    /// bytes; zeros there become holes or zeroed ranges).
    pub written_bytes: u64,
    pub duration_secs: f64,
    /// Offsets of blocks that did not match the manifest (only when a
    /// distrusted revision was restored anyway).
    pub damaged_blocks: Vec<u64>,
}

impl fmt::Display for Restored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mode == Mode::Rollback {
            return write!(
                f,
                "{}: rolled back {} to revision {} ({}): read {} locally, fetched {}, wrote {} in {:.1} s",
                self.job,
                self.target.display(),
                self.revision.id,
                format_bytes(self.revision.size),
                format_bytes(self.read_bytes),
                format_bytes(self.fetched_bytes),
                format_bytes(self.written_bytes),
                self.duration_secs
            );
        }
        write!(
            f,
            "{}: restored revision {} ({}, {} data) to {} in {:.1} s",
            self.job,
            self.revision.id,
            format_bytes(self.revision.size),
            format_bytes(self.data_bytes),
            if self.target.as_os_str() == STDOUT {
                "standard output".into()
            } else {
                self.target.display().to_string()
            },
            self.duration_secs
        )?;
        if !self.damaged_blocks.is_empty() {
            write!(
                f,
                "\nwarning: {} the manifest (offsets {:?}): the revision is damaged there",
                backy_common::units::blocks_not_matching(self.damaged_blocks.len() as u64),
                self.damaged_blocks
            )?;
        }
        Ok(())
    }
}

pub async fn restore(client: &mut Client, args: &RestoreArgs, progress: &dyn Progress) -> Result<Restored> {
    prepare(client, args).await?.run(client, progress).await
}

/// A restore checked and ready to write: the revision found, its manifest
/// and key checked, the target examined and opened (a new file only under
/// a temporary name, a device opened exclusively, nothing written yet).
/// Dropping it writes nothing (a temporary file or an RBD image made for
/// it goes): a group restore prepares every disk before it writes any.
pub struct Prepared {
    args: RestoreArgs,
    started: Instant,
    info: backy_proto::RevisionInfo,
    manifest: backy_common::manifest::Manifest,
    meta: backy_common::revision::RevisionMeta,
    short: String,
    key: Option<std::sync::Arc<Key>>,
    way: Way,
}

/// How the target is brought to the revision.
enum Way {
    /// A target of the revision's size: only what differs is fetched.
    Rollback(Box<dyn rollback::Local>),
    /// Everything streamed into the opened target.
    Full(Target),
}

impl Prepared {
    /// The revision it restores.
    pub fn revision(&self) -> &backy_proto::RevisionInfo {
        &self.info
    }
}

/// Every check of a restore, and the target opened; nothing written.
pub async fn prepare(client: &mut Client, args: &RestoreArgs) -> Result<Prepared> {
    let started = Instant::now();
    let job = args.job.as_str();
    if Spec::parse(&args.revision)? == Spec::All {
        return Err(Error::invalid("'all' is not allowed here: name one revision"));
    }
    let (info, manifest) = crate::manifest::fetch(client, job, &args.revision).await?;
    // The server's account of the revision, checked as the model reads it.
    let meta = backy_common::revision::RevisionMeta::try_from(&info)?;
    let short = short_id(&info).to_string();
    // Before the target is looked at: the right key, or no restore.
    let key = crate::encryption::revision_key(job, &short, &info.key_check, args.key.as_ref())?;
    // A target of the revision's size that exists: roll it back (a target
    // of another size is refused here unless --full). Not an encrypted
    // revision: its digests are of ciphertext, the target's of plaintext.
    let in_place = if key.is_some() {
        None
    } else {
        let (path, size, force, full) = (args.target.clone(), info.size, args.force, args.full);
        let (snapshot, block_size) = (info.source_snapshot.clone(), info.block_size);
        tokio::task::spawn_blocking(move || {
            rollback::plan(&path, size, force, full, Some((snapshot.as_str(), block_size)))
        })
        .await
        .map_err(|e| Error::internal(format!("examining the restore target: {e}")))??
    };
    let mut rollback = None;
    if let Some(in_place) = in_place {
        let distrusted = meta.trust == backy_common::revision::Trust::Distrusted;
        let server_can = crate::connect::server_protocol(client).await? >= backy_proto::ROLLBACK_PROTOCOL;
        if !distrusted && server_can {
            rollback = Some(in_place);
        }
        // Otherwise dropped: a distrusted revision is restored in full
        // (damage is reported block by block there); an older server
        // would send everything.
    }
    let way = match rollback {
        Some(in_place) => Way::Rollback(in_place),
        // Before the stream starts: a refused target costs no transfer.
        // Opening an rbd target runs `rbd info`/`rbd create`: off the
        // async workers.
        None => {
            let (path, size, force) = (args.target.clone(), info.size, args.force);
            Way::Full(
                tokio::task::spawn_blocking(move || Target::open(&path, size, force))
                    .await
                    .map_err(|e| Error::internal(format!("opening the restore target: {e}")))??,
            )
        }
    };
    Ok(Prepared {
        args: args.clone(),
        started,
        info,
        manifest,
        meta,
        short,
        key,
        way,
    })
}

impl Prepared {
    /// Writes the target: rolls it back, or streams the revision into it.
    pub async fn run(self, client: &mut Client, progress: &dyn Progress) -> Result<Restored> {
        let Prepared {
            args,
            started,
            info,
            manifest,
            meta,
            short,
            key,
            way,
        } = self;
        let job = args.job.as_str();
        let target = match way {
            Way::Rollback(in_place) => {
                if !args.quiet {
                    eprintln!(
                        "backy-client: {} has the revision's size: rolling it back (reading it, fetching only what differs; --full restores everything)",
                        args.target.display()
                    );
                }
                let bar = progress.start(job, info.size);
                let moved = rollback::run(client, job, &info, manifest, in_place, bar.clone()).await;
                bar.finish();
                let moved = moved?;
                return Ok(Restored {
                    job: job.to_string(),
                    revision: RevisionView::from(&info),
                    target: args.target.clone(),
                    data_bytes: moved.fetched,
                    mode: Mode::Rollback,
                    read_bytes: moved.read,
                    fetched_bytes: moved.fetched,
                    written_bytes: moved.written,
                    duration_secs: started.elapsed().as_secs_f64(),
                    damaged_blocks: Vec::new(),
                });
            }
            Way::Full(target) => target,
        };
        tracing::info!(job, revision = %short, size = info.size, target = %args.target.display(), "restoring");

        // The full id, so both calls name the same revision even if a new one
        // was committed in between.
        let request = RestoreRequest {
            job: job.to_string(),
            revision: info.id.clone(),
            ..Default::default()
        };
        let mut stream = client.restore(request).await.map_err(status_error)?.into_inner();
        match stream.message().await.map_err(status_error)? {
            Some(RestoreFrame {
                frame: Some(Frame::Begin(begin)),
            }) if begin.id == info.id && begin.size == info.size => {}
            Some(_) => {
                return Err(Error::data_loss(format!(
                    "restore stream did not start with revision {short}"
                )))
            }
            None => return Err(Error::data_loss("restore stream ended early")),
        }

        let bar = progress.start(job, info.size);
        let writer_bar = bar.clone();
        let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
        // A distrusted revision (a verify found damage) is still restored block
        // by block, with a warning, rather than refused: it may be the best copy
        // there is.
        let check = if meta.trust == backy_common::revision::Trust::Distrusted {
            eprintln!(
            "backy-client: warning: revision {short} is distrusted; restoring it anyway and reporting damaged blocks"
        );
            StreamCheck::tolerant(manifest, &short)
        } else {
            StreamCheck::new(manifest, &short)
        };
        let writer = tokio::task::spawn_blocking(move || {
            write_stream(rx, check, target, key.as_deref(), |pos| writer_bar.set(pos))
        });
        let received = forward(&mut stream, &tx).await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Error::internal(format!("restore writer failed: {e}")));
        bar.finish();
        // A server error explains why the writer saw the stream end early.
        received?;
        let (data_bytes, damaged_blocks) = written??;
        Ok(Restored {
            job: job.to_string(),
            revision: RevisionView::from(&info),
            target: args.target.clone(),
            data_bytes,
            mode: Mode::Full,
            read_bytes: 0,
            fetched_bytes: data_bytes,
            written_bytes: data_bytes,
            duration_secs: started.elapsed().as_secs_f64(),
            damaged_blocks,
        })
    }
}

/// Hands frames to the writer until the stream ends or the writer stops
/// (its own error then says why).
async fn forward(stream: &mut tonic::Streaming<RestoreFrame>, tx: &mpsc::Sender<Frame>) -> Result<()> {
    loop {
        let message = tokio::select! {
            _ = tx.closed() => return Ok(()),
            message = stream.message() => message.map_err(status_error)?,
        };
        let Some(message) = message else {
            return Ok(());
        };
        let frame = message
            .frame
            .ok_or_else(|| Error::data_loss("empty frame in restore stream"))?;
        if tx.send(frame).await.is_err() {
            return Ok(());
        }
    }
}

/// The blocking side: check each frame, write it, and commit at the end
/// marker. Returns the data bytes received.
/// With `key`, data is checked as stored (ciphertext), then decrypted.
fn write_stream(
    mut rx: mpsc::Receiver<Frame>,
    mut check: StreamCheck,
    mut target: Target,
    key: Option<&Key>,
    mut progress: impl FnMut(u64),
) -> Result<(u64, Vec<u64>)> {
    while let Some(frame) = rx.blocking_recv() {
        match frame {
            Frame::Data(mut d) => {
                check.data(d.offset, &d.data)?;
                if let Some(key) = key {
                    key.decrypt(d.offset, &mut d.data)
                        .map_err(|e| Error::data_loss(format!("restore stream: {}", e.message)))?;
                }
                target.write_data(d.offset, &d.data)?;
            }
            Frame::Zero(z) => {
                check.zero(z.offset, z.length)?;
                target.write_zero(z.offset, z.length)?;
            }
            Frame::End(end) => check.end(end.bytes_sent)?,
            Frame::Begin(_) => return Err(Error::data_loss("restore stream starts twice")),
        }
        progress(check.position());
    }
    if !check.ended() {
        return Err(Error::data_loss(format!(
            "restore stream ended early (at offset {})",
            check.position()
        )));
    }
    tracing::debug!(target = %target.path().display(), "restore complete, committing");
    target.commit()?;
    Ok((check.data_bytes(), check.bad_blocks().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::manifest::{digest, Manifest};
    use backy_proto::{DataRange, RestoreEnd, RevisionInfo, ZeroRange};

    const BS: u32 = 64 << 10;
    const B: usize = BS as usize;

    fn manifest_of(img: &[u8]) -> Manifest {
        let mut m = Manifest::zeroed(img.len() as u64, BS).unwrap();
        for (i, b) in img.chunks(B).enumerate() {
            m.set(i as u64, digest(b)).unwrap();
        }
        m
    }

    fn frames_of(img: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        for (i, b) in img.chunks(B).enumerate() {
            let offset = (i * B) as u64;
            if b.iter().all(|&x| x == 0) {
                out.push(Frame::Zero(ZeroRange {
                    offset,
                    length: b.len() as u64,
                }));
            } else {
                out.push(Frame::Data(DataRange {
                    offset,
                    data: b.to_vec(),
                }));
            }
        }
        out
    }

    fn run(img: &[u8], frames: Vec<Frame>, path: &std::path::Path) -> Result<u64> {
        let (tx, rx) = mpsc::channel(frames.len() + 1);
        for f in frames {
            tx.try_send(f).unwrap();
        }
        drop(tx);
        let target = Target::open(path, img.len() as u64, false)?;
        write_stream(rx, StreamCheck::new(manifest_of(img), "r"), target, None, |_| {}).map(|(n, _)| n)
    }

    #[test]
    fn writes_a_checked_stream_and_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.img");
        let mut img = vec![0u8; 4 * B + 10];
        img[B..2 * B].fill(9);
        img[4 * B + 1] = 1;
        let mut frames = frames_of(&img);
        frames.push(Frame::End(RestoreEnd {
            bytes_sent: (B + 10) as u64,
        }));
        assert_eq!(run(&img, frames, &path).unwrap(), (B + 10) as u64);
        assert_eq!(std::fs::read(&path).unwrap(), img);
    }

    #[test]
    fn unfinished_or_bad_stream_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.img");
        let img = vec![7u8; 3 * B];
        let e = run(&img, frames_of(&img), &path).unwrap_err();
        assert!(e.message.contains("ended early"), "{}", e.message);
        let mut bad = frames_of(&img);
        if let Frame::Data(d) = &mut bad[1] {
            d.data[0] = 0;
        }
        let e = run(&img, bad, &path).unwrap_err();
        assert!(e.message.contains("offset 65536"), "{}", e.message);
        let mut twice = frames_of(&img);
        twice.insert(1, Frame::Begin(RevisionInfo::default()));
        assert!(run(&img, twice, &path).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn line() {
        let r = Restored {
            job: "vm1".into(),
            revision: RevisionView::from(&RevisionInfo {
                short_id: "XYZ".into(),
                size: 4 << 30,
                ..RevisionInfo::default()
            }),
            target: "/tmp/vm1.img".into(),
            data_bytes: 2 << 30,
            mode: Mode::Full,
            read_bytes: 0,
            fetched_bytes: 2 << 30,
            written_bytes: 2 << 30,
            duration_secs: 1.23,
            damaged_blocks: Vec::new(),
        };
        assert_eq!(
            r.to_string(),
            "vm1: restored revision XYZ (4.00 GiB, 2.00 GiB data) to /tmp/vm1.img in 1.2 s"
        );
    }
}
