//! `type: qemu`: a QEMU disk read over NBD with the parent revision's
//! persistent dirty bitmap, so an incremental push reads only the granules
//! written since the parent.
//!
//! Two ways to the disk, one reader ([`QemuSource`]):
//!
//! - [`image`]: the qcow2 file of a stopped guest, through a
//!   `qemu-nbd --read-only` of our own, bitmaps changed with `qemu-img`;
//! - [`running`]: a disk node of a running QEMU, through its QMP socket:
//!   image fleecing gives a point-in-time view, QEMU's own NBD server
//!   exports it, bitmaps are changed in QMP transactions.
//!
//! Each revision leaves a bitmap `backy-<revision id>` recording every
//! write since its instant. The session ([`Session`]) removes the parent's
//! on commit and the new one on failure, so exactly one bitmap, the
//! newest revision's, is left between pushes. Without a usable parent
//! bitmap the push reads everything and compares with the parent's
//! digests, and says why.

pub mod image;
pub mod running;

use super::Source;
use crate::nbd::{NbdClient, NbdClientError, STATUS_LEN};
use backy_common::nbd::reply::select;
use backy_common::nbd::{CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP_PREFIX, STATE_DIRTY, STATE_HOLE};
use backy_common::ranges::{round_out, Extent, GRANULE};
use backy_common::source::{Hooks, QemuDisk, QemuSpec};
use backy_common::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A push's hold on the disk (or, for a group, the disks): undoes on
/// drop what a failed push set up.
pub enum Session {
    Image(image::ImageSession),
    Running(running::RunningSession),
}

impl Session {
    /// The revision is committed: the parent's bitmap is no longer needed
    /// (the new one records from this push's instant on).
    pub fn commit(self) -> Result<()> {
        self.finish(&[true])
    }

    /// The pushes are over; `committed[i]`: disk `i`'s revision was.
    pub fn finish(self, committed: &[bool]) -> Result<()> {
        match self {
            Session::Image(s) if committed.first() == Some(&true) => s.commit(),
            Session::Image(s) => {
                drop(s);
                Ok(())
            }
            Session::Running(s) => s.finish(committed),
        }
    }

    /// Whether disk `index`'s view is still its instant (asked after it
    /// was read, before its revision is committed).
    pub fn check_intact(&mut self, index: usize) -> Result<()> {
        match self {
            // qemu-nbd reads a bitmap-marked image nobody writes.
            Session::Image(_) => Ok(()),
            Session::Running(s) => s.check_intact(index),
        }
    }
}

/// A session the pushes of its disks share: each asks it whether its
/// view is intact before committing, the caller finishes it. Dropping
/// the last handle undoes the push (as a failed one).
#[derive(Clone)]
pub struct Shared(Arc<Mutex<Option<Session>>>);

impl Shared {
    pub fn new(session: Session) -> Self {
        Shared(Arc::new(Mutex::new(Some(session))))
    }

    fn take(&self) -> Option<Session> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub fn check_intact(&self, index: usize) -> Result<()> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(session) => session.check_intact(index),
            None => Err(Error::internal("the push's hold on QEMU is gone")),
        }
    }

    /// See [`Session::finish`]; a second call does nothing.
    pub fn finish(&self, committed: &[bool]) -> Result<()> {
        self.take().map_or(Ok(()), |s| s.finish(committed))
    }

    /// Undoes the push now, in this thread (the process may exit next).
    pub fn abort(&self) {
        drop(self.take());
    }
}

/// What [`open`] prepared.
pub struct Opened {
    pub session: Session,
    pub source: QemuSource,
    /// Why the push reads everything although it has a parent revision.
    pub full_read_reason: Option<String>,
}

/// Prepares a push of revision `rev_id` (child of `parent_id`, empty for
/// none) of `job`, running the source's hooks around the backup instant.
/// Blocking: run it off the async workers.
pub fn open(spec: &QemuSpec, job: &str, rev_id: &str, parent_id: &str) -> Result<Opened> {
    let mut env = vec![
        ("BACKY_JOB".to_string(), job.to_string()),
        ("BACKY_REVISION".to_string(), short_id(rev_id)),
    ];
    match &spec.disk {
        QemuDisk::Image(image) => {
            env.push(("BACKY_SOURCE".into(), image.display().to_string()));
            let hooks = super::hooks::HookRunner::new(&spec.hooks, env);
            image::open(image, hooks, rev_id, parent_id)
        }
        QemuDisk::Running {
            qmp,
            node,
            scratch_dir,
        } => {
            env.push(("BACKY_SOURCE".into(), qmp.display().to_string()));
            env.push(("BACKY_NODE".into(), node.clone()));
            let hooks = super::hooks::HookRunner::new(&spec.hooks, env);
            let disk = running::DiskRequest {
                node: node.clone(),
                scratch_dir: scratch_dir_of(scratch_dir.as_deref()),
                rev_id: rev_id.to_string(),
                parent_id: parent_id.to_string(),
            };
            let (session, mut opened) = running::open(qmp, &[disk], hooks)?;
            let one = opened
                .pop()
                .ok_or_else(|| Error::internal("QEMU opened no disk"))?;
            Ok(Opened {
                session,
                source: one.source,
                full_read_reason: one.full_read_reason,
            })
        }
    }
}

/// Prepares the push of a group's disks of the QEMU at `qmp` from one
/// instant: one transaction, the group's `hooks` around it (with
/// `BACKY_JOB` the group, `BACKY_REVISION` the instant). Blocking.
pub fn open_group(
    qmp: &Path,
    disks: &[running::DiskRequest],
    hooks: &Hooks,
    group: &str,
    instant: &str,
) -> Result<(Session, Vec<running::OpenedDisk>)> {
    let env = vec![
        ("BACKY_JOB".to_string(), group.to_string()),
        ("BACKY_REVISION".to_string(), instant.to_string()),
        ("BACKY_SOURCE".to_string(), qmp.display().to_string()),
        (
            "BACKY_NODE".to_string(),
            disks
                .iter()
                .map(|d| d.node.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ];
    running::open(qmp, disks, super::hooks::HookRunner::new(hooks, env))
}

/// Where a running disk's fleecing overlay goes.
pub fn scratch_dir_of(configured: Option<&Path>) -> PathBuf {
    configured
        .unwrap_or(Path::new(running::DEFAULT_SCRATCH_DIR))
        .to_path_buf()
}

fn short_id(rev_id: &str) -> String {
    rev_id
        .parse::<backy_common::RevisionId>()
        .map(|id| id.short())
        .unwrap_or_else(|_| rev_id.to_string())
}

/// A point-in-time view of the disk, read over NBD.
pub struct QemuSource {
    /// Drives the NBD connection from the scanner's blocking thread.
    rt: tokio::runtime::Runtime,
    client: NbdClient<tokio::net::UnixStream>,
    size: u64,
    /// Everything not a hole, in order.
    data: Vec<Extent>,
    changed: Option<Vec<Extent>>,
    bitmap: String,
}

impl QemuSource {
    /// Connects to `export` on `socket`, asking for the allocation and,
    /// with `dirty` (a bitmap of the changes since the parent), the dirty
    /// extents. `new_bitmap` is what the revision records as its snapshot.
    fn connect(socket: &Path, export: &str, dirty: Option<&str>, new_bitmap: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the NBD runtime", e))?;
        let dirty_context = dirty.map(|n| format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{n}"));
        let mut contexts = vec![CONTEXT_BASE_ALLOCATION];
        contexts.extend(dirty_context.as_deref());
        let (client, status) = rt.block_on(async {
            let mut client = NbdClient::connect_unix(socket, export, &contexts).await?;
            let status = client.block_status_all(STATUS_LEN).await?;
            Ok::<_, NbdClientError>((client, status))
        })?;
        let size = client.export().size;
        let data = status
            .first()
            .map(|s| select(s, |f| f & STATE_HOLE == 0))
            .unwrap_or_default();
        // Whole 64 KiB granules whatever the bitmap's granularity: blocks
        // are split no finer than for range lists (README: How it works).
        let changed = status
            .get(1)
            .map(|s| round_out(&select(s, |f| f & STATE_DIRTY != 0), GRANULE, size));
        Ok(QemuSource {
            rt,
            client,
            size,
            data,
            changed,
            bitmap: new_bitmap.to_string(),
        })
    }
}

impl Source for QemuSource {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    /// The bitmap recording writes from this revision's instant on.
    fn snapshot(&self) -> &str {
        &self.bitmap
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        backy_common::fault::fail("client.qemu-read")?;
        self.rt.block_on(self.client.read_into(offset, buf))
    }

    fn next_data(&mut self, offset: u64) -> Result<Option<Extent>> {
        let i = self.data.partition_point(|e| e.end() <= offset);
        Ok(self.data.get(i).map(|e| {
            let start = e.offset.max(offset);
            Extent {
                offset: start,
                len: e.end() - start,
            }
        }))
    }

    fn changed_extents(&mut self) -> Result<Option<Vec<Extent>>> {
        Ok(self.changed.take())
    }
}
