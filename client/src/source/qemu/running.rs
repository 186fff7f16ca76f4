//! The `qmp:` mode: a disk node of a running QEMU, read from a
//! point-in-time view while the guest keeps writing.
//!
//! Everything goes through QMP: while QEMU runs, the image is locked
//! against qemu-img and qemu-nbd, and bitmaps it added are not even in the
//! file yet. The steps and why they are in this order are in
//! [`backy_common::qmp`]; here they run, each undone by [`Drop`] if a
//! later one fails:
//!
//! 1. an exclusive lock per QMP socket (QEMU has one NBD server, so the
//!    disks of one VM are backed up one after another), then the remains
//!    of a backy process that died mid-push are removed;
//! 2. the fleecing overlay: a qcow2 created in `scratch-dir`, unlinked at
//!    once and handed to QEMU as a file descriptor (`add-fd`), so QEMU
//!    needs no access to the directory and nothing is left if anyone dies;
//! 3. hooks `pre-snapshot`, the backup-instant transaction, `post-snapshot`;
//! 4. QEMU's NBD server on a listening socket we made and hand over
//!    (`getfd`), exporting the overlay with the frozen parent bitmap.

use super::{Opened, QemuSource, Session};
use crate::qmp::{Qmp, QmpError};
use crate::source::hooks::HookRunner;
use backy_common::qmp::{self as q, BlockNode, Leftovers};
use backy_common::units::format_bytes;
use backy_common::{Error, Result};
use serde_json::json;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where the fleecing overlay goes unless the job says.
pub const DEFAULT_SCRATCH_DIR: &str = "/var/tmp";
/// Bound on each QMP reply or event.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// Below this much free space in the scratch directory a push does not
/// start: the guest's writes during the backup would fail first.
const MIN_SCRATCH_FREE: u64 = 1 << 30;

/// What this push set up in QEMU, to be torn down in reverse.
#[derive(Debug, Default)]
struct Built {
    fdset: Option<u64>,
    overlay: bool,
    /// The transaction ran: the job, the new bitmap and (with a parent
    /// bitmap) the frozen copy exist.
    instant: bool,
    nbd_server: bool,
    export: bool,
}

/// One push's hold on a running disk; see the module docs.
pub struct RunningSession {
    qmp: Qmp,
    node: String,
    new_bitmap: String,
    /// The parent's bitmap, when it was usable (and frozen for the export).
    parent_bitmap: Option<String>,
    built: Built,
    committed: bool,
    _dir: tempfile::TempDir,
    /// The lock on this QEMU, released after everything else.
    _lock: File,
    /// `cleanup` runs after teardown, when the session is dropped.
    hooks: HookRunner,
}

/// Prepares a push of revision `rev_id` from node `node` of the QEMU at
/// `qmp_path`. Blocking.
pub fn open(
    qmp_path: &Path,
    node: &str,
    scratch_dir: &Path,
    hooks: HookRunner,
    rev_id: &str,
    parent_id: &str,
) -> Result<Opened> {
    let lock = lock(qmp_path)?;
    let mut qmp = Qmp::connect(qmp_path, QMP_TIMEOUT)?;
    q::check_version(qmp.version())?;
    clear_leftovers(&mut qmp)?;
    let nodes = query_nodes(&mut qmp)?;
    let devices = q::parse_devices(&qmp.execute("query-block", None)?)?;
    let disk = q::resolve_node(&nodes, &devices, node)?.clone();
    let parent = q::parent_bitmap(&disk, parent_id).map(|b| b.name.clone().unwrap_or_default());
    let new_bitmap = backy_common::qemu::bitmap_name(rev_id);
    // Bitmaps persist in qcow2 only; elsewhere (raw) they live in QEMU's
    // memory: incremental while QEMU runs, a full read after a restart
    // (the missing parent bitmap is the reason the push gives).
    let persistent = disk.drv == "qcow2";
    if !persistent {
        tracing::warn!(
            node = disk.node_name,
            drv = disk.drv,
            "not a qcow2 node: its bitmaps do not survive a restart of QEMU (then a push reads everything)"
        );
    }
    if disk.bitmaps.iter().any(|b| b.named(&new_bitmap)) {
        // Left by an earlier attempt at this revision: this one's instant is now.
        qmp.execute(
            "block-dirty-bitmap-remove",
            Some(json!({"node": disk.node_name, "name": new_bitmap})),
        )?;
    }
    let overlay = create_overlay(scratch_dir, disk.image.virtual_size)?;
    let dir = tempfile::Builder::new()
        .prefix("backy-qmp-")
        .tempdir()
        .map_err(|e| Error::io("creating a directory for the NBD socket", e))?;
    let mut session = RunningSession {
        qmp,
        node: disk.node_name.clone(),
        new_bitmap: new_bitmap.clone(),
        parent_bitmap: parent.clone().ok(),
        built: Built::default(),
        committed: false,
        _dir: dir,
        _lock: lock,
        hooks,
    };
    session.build(&overlay, &disk, persistent)?;
    drop(overlay);

    let socket = session._dir.path().join("nbd.sock");
    let frozen = session.parent_bitmap.is_some().then_some(q::FROZEN_BITMAP);
    let source = QemuSource::connect(&socket, q::EXPORT_NAME, frozen, &new_bitmap)?;
    if source.size != disk.image.virtual_size {
        return Err(Error::internal(format!(
            "QEMU exports {} bytes of node {}, which has {}",
            source.size, disk.node_name, disk.image.virtual_size
        )));
    }
    let full_read_reason = match (parent, parent_id.is_empty()) {
        (Err(why), false) => Some(why),
        _ => None,
    };
    Ok(Opened {
        session: Session::Running(session),
        source,
        full_read_reason,
    })
}

impl RunningSession {
    /// Steps 2 to 4 of the module docs.
    fn build(&mut self, overlay: &File, disk: &BlockNode, persistent: bool) -> Result<()> {
        let fdset =
            self.qmp
                .execute_with_fd("add-fd", json!({"opaque": q::FDSET_OPAQUE}), overlay.as_fd())?;
        let fdset = fdset["fdset-id"]
            .as_u64()
            .ok_or_else(|| Error::unavailable(format!("QEMU's add-fd returned no fdset-id: {fdset}")))?;
        self.built.fdset = Some(fdset);
        self.qmp
            .execute("blockdev-add", Some(q::overlay_args(fdset, &self.node)))?;
        self.built.overlay = true;

        self.hooks.pre_snapshot()?;
        let instant = q::begin_transaction(
            &self.node,
            &self.new_bitmap,
            self.parent_bitmap.as_deref(),
            persistent,
        );
        self.qmp.execute("transaction", Some(instant))?;
        self.built.instant = true;
        self.hooks.post_snapshot()?;

        let socket = self._dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket)
            .map_err(|e| Error::io(format!("listening on {}", socket.display()), e))?;
        self.qmp
            .execute_with_fd("getfd", json!({"fdname": q::NBD_LISTENER_FD}), listener.as_fd())?;
        let started = self.qmp.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "fd", "data": {"str": q::NBD_LISTENER_FD}}})),
        );
        if let Err(e) = started {
            // The descriptor stays with the monitor unless it is closed.
            let _ = self
                .qmp
                .execute("closefd", Some(json!({"fdname": q::NBD_LISTENER_FD})));
            return Err(match e {
                QmpError::Refused { desc, .. } if desc.contains("already running") => {
                    Error::precondition(format!(
                        "QEMU already runs an NBD server that backy did not start ({desc}); \
                     backy needs QEMU's NBD server for the time of a push"
                    ))
                }
                e => e.into(),
            });
        }
        self.built.nbd_server = true;
        self.qmp.execute(
            "block-export-add",
            Some(q::export_args(&self.node, self.parent_bitmap.is_some())),
        )?;
        self.built.export = true;
        tracing::debug!(node = disk.node_name, "fleecing export ready");
        Ok(())
    }

    /// Removes the export, the NBD server, the job and the overlay (in
    /// that order: each holds the next). Every step is tried; the first
    /// failure is returned.
    fn teardown(&mut self) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut note = |step: &str, r: std::result::Result<(), QmpError>| {
            if let Err(e) = r {
                tracing::warn!("QEMU cleanup, {step}: {e}");
                first.get_or_insert(Error::from(e));
            }
        };
        if std::mem::take(&mut self.built.export) {
            // Hard: our NBD client may still be connected.
            let r = self
                .qmp
                .execute(
                    "block-export-del",
                    Some(json!({"id": q::EXPORT_ID, "mode": "hard"})),
                )
                .and_then(|_| {
                    self.qmp
                        .wait_event("BLOCK_EXPORT_DELETED", |d| d["id"] == q::EXPORT_ID)
                })
                .map(drop);
            note("deleting the export", r);
        }
        if std::mem::take(&mut self.built.nbd_server) {
            note(
                "stopping the NBD server",
                self.qmp.execute("nbd-server-stop", None).map(drop),
            );
        }
        if self.built.instant {
            note("cancelling the fleecing job", cancel_job(&mut self.qmp));
        }
        if std::mem::take(&mut self.built.overlay) {
            note(
                "removing the fleecing overlay",
                self.qmp
                    .execute("blockdev-del", Some(json!({"node-name": q::FLEECE_NODE})))
                    .map(drop),
            );
        }
        if let Some(fdset) = self.built.fdset.take() {
            note(
                "closing the overlay's descriptor",
                self.qmp
                    .execute("remove-fd", Some(json!({"fdset-id": fdset})))
                    .map(drop),
            );
        }
        first.map_or(Ok(()), Err)
    }

    /// The revision is committed: the parent's bitmap and the frozen copy
    /// go, and any `backy-*` bitmap crashed pushes or a crashed QEMU left.
    pub fn commit(mut self) -> Result<()> {
        self.committed = true;
        let torn = self.teardown();
        let mut result = torn;
        if std::mem::take(&mut self.built.instant) && self.parent_bitmap.is_some() {
            let commit = q::commit_transaction(&self.node, self.parent_bitmap.as_deref());
            if let Err(e) = self.qmp.execute("transaction", Some(commit)) {
                result = result.and(Err(e.into()));
            }
        }
        let nodes = query_nodes(&mut self.qmp)?;
        if let Some(disk) = nodes.iter().find(|n| n.node_name == self.node) {
            for stray in q::stray_bitmaps(disk, &self.new_bitmap) {
                tracing::info!(
                    bitmap = stray,
                    node = self.node,
                    "removing a bitmap no revision needs"
                );
                let removed = self.qmp.execute(
                    "block-dirty-bitmap-remove",
                    Some(json!({"node": self.node, "name": stray})),
                );
                if let Err(e) = removed {
                    result = result.and(Err(e.into()));
                }
            }
        }
        result
    }
}

impl Drop for RunningSession {
    /// A failed push: tear down, and remove the new bitmap (it marks an
    /// instant no revision has); the parent's keeps recording.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let _ = self.teardown();
        if std::mem::take(&mut self.built.instant) {
            let abort = q::abort_transaction(&self.node, &self.new_bitmap, self.parent_bitmap.is_some());
            if let Err(e) = self.qmp.execute("transaction", Some(abort)) {
                tracing::warn!("could not remove bitmap {}: {e}", self.new_bitmap);
            }
        }
    }
}

fn query_nodes(qmp: &mut Qmp) -> Result<Vec<BlockNode>> {
    q::parse_nodes(&qmp.execute("query-named-block-nodes", Some(json!({"flat": true})))?)
}

/// Cancels the fleecing job and waits until it is gone (its filter holds
/// the overlay until then). A job already gone is fine.
fn cancel_job(qmp: &mut Qmp) -> std::result::Result<(), QmpError> {
    match qmp.execute("block-job-cancel", Some(json!({"device": q::JOB_ID}))) {
        Ok(_) => qmp
            .wait_event("BLOCK_JOB_CANCELLED", |d| d["device"] == q::JOB_ID)
            .map(drop),
        Err(QmpError::Refused { desc, .. })
            if desc.contains("not found") || desc.contains("No active block job") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Removes what a backy process that died mid-push left in this QEMU
/// (we hold the lock: no other push of ours is running here).
fn clear_leftovers(qmp: &mut Qmp) -> Result<()> {
    let exports = qmp.execute("query-block-exports", None)?;
    let jobs = qmp.execute("query-block-jobs", None)?;
    let nodes = query_nodes(qmp)?;
    let left = Leftovers::find(&exports, &jobs, &nodes);
    if left.is_empty() {
        return Ok(());
    }
    tracing::warn!(?left, "removing what an interrupted backup left in QEMU");
    for id in &left.exports {
        qmp.execute("block-export-del", Some(json!({"id": id, "mode": "hard"})))?;
        qmp.wait_event("BLOCK_EXPORT_DELETED", |d| d["id"] == id.as_str())?;
    }
    // Ours, by the evidence above: backy starts the server after the
    // overlay and stops it before removing it.
    if let Err(e) = qmp.execute("nbd-server-stop", None) {
        tracing::debug!("nbd-server-stop: {e}");
    }
    if !left.jobs.is_empty() {
        cancel_job(qmp)?;
    }
    for node in &left.nodes {
        qmp.execute("blockdev-del", Some(json!({"node-name": node})))?;
    }
    for (node, name) in &left.bitmaps {
        qmp.execute(
            "block-dirty-bitmap-remove",
            Some(json!({"node": node, "name": name})),
        )?;
    }
    // The overlay's descriptor stays with QEMU while a monitor is connected.
    let sets = qmp.execute("query-fdsets", None)?;
    for id in q::our_fdsets(&sets) {
        qmp.execute("remove-fd", Some(json!({"fdset-id": id})))?;
    }
    Ok(())
}

/// An exclusive lock per QMP socket, waited for: the backups of one VM's
/// disks take turns.
fn lock(qmp_path: &Path) -> Result<File> {
    let canonical = std::fs::canonicalize(qmp_path)
        .map_err(|e| Error::io(format!("QMP socket {}", qmp_path.display()), e))?;
    let hash = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
    let path = std::env::temp_dir().join(format!("backy-qmp-{}.lock", &hash[..16]));
    let file = open_lock_file(&path)?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        tracing::info!(qmp = %qmp_path.display(), "waiting for another backup of this QEMU to end");
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io(format!("locking {}", path.display()), e.into()))?;
    }
    Ok(file)
}

fn open_lock_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| Error::io(format!("opening lock {}", path.display()), e))
}

/// A new qcow2 of `size` bytes in `dir`, open read-write and already
/// unlinked.
fn create_overlay(dir: &Path, size: u64) -> Result<File> {
    let free = rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail * s.f_frsize)
        .map_err(|e| Error::io(format!("scratch-dir {}", dir.display()), e.into()))?;
    if free < MIN_SCRATCH_FREE.min(size) {
        return Err(Error::exhausted(format!(
            "scratch-dir {} has {} free: too little for the old data of what the guest writes during the backup",
            dir.display(),
            format_bytes(free)
        )));
    }
    if free < size {
        tracing::warn!(
            "scratch-dir {} has {} free, the disk is {}: guest writes fail if it rewrites more than that during the backup",
            dir.display(),
            format_bytes(free),
            format_bytes(size)
        );
    }
    let named = tempfile::Builder::new()
        .prefix("backy-fleece-")
        .suffix(".qcow2")
        .tempfile_in(dir)
        .map_err(|e| Error::io(format!("creating the fleecing overlay in {}", dir.display()), e))?;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(named.path())
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("running qemu-img (is qemu-utils installed?)", e))?;
    if !out.status.success() {
        return Err(Error::unavailable(format!(
            "qemu-img create {}: {}",
            named.path().display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // qemu-img wrote the file by name: reopen to see its content, then
    // let the name go (the tempfile's drop unlinks it).
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(named.path())
        .map_err(|e| Error::io(format!("opening {}", named.path().display()), e))
}
