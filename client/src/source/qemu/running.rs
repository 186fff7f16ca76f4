//! The `qmp:` mode: disk nodes of a running QEMU, read from a
//! point-in-time view while the guest keeps writing.
//!
//! Everything goes through QMP: while QEMU runs, the image is locked
//! against qemu-img and qemu-nbd, and bitmaps it added are not even in the
//! file yet. The steps and why they are in this order are in
//! [`backy_common::qmp`]; here they run, each undone by [`Drop`] if a
//! later one fails:
//!
//! 1. an exclusive lock per QMP socket (QEMU has one NBD server, so the
//!    pushes of one VM take turns), then the remains of a backy process
//!    that died mid-push are removed;
//! 2. a fleecing overlay per disk: a qcow2 created in `scratch-dir`,
//!    unlinked at once and handed to QEMU as a file descriptor (`add-fd`),
//!    so QEMU needs no access to the directory and nothing is left if
//!    anyone dies; a guard under it keeps a full scratch from failing the
//!    guest's writes (it fails the push instead, [`RunningSession::check_intact`]);
//! 3. hooks `pre-snapshot`, the backup-instant transaction (every disk of
//!    a group in the one transaction), `post-snapshot`;
//! 4. QEMU's NBD server on a listening socket we made and hand over
//!    (`getfd`), exporting each overlay with its frozen parent bitmap.

use super::{QemuSource, Session};
use crate::qmp::{Qmp, QmpError};
use crate::source::hooks::HookRunner;
use backy_common::qmp::{self as q, BlockNode, Leftovers, Names};
use backy_common::units::format_bytes;
use backy_common::{Error, Result};
use serde_json::json;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where the fleecing overlay goes unless the job says.
pub const DEFAULT_SCRATCH_DIR: &str = "/var/tmp";
/// Bound on each QMP reply or event.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// Below this much free space in the scratch directory (or the disk's
/// size, if smaller) a push does not start: the overlay's own metadata
/// needs some, and a backup that surely fails is not worth starting. More
/// is only a warning: a scratch that fills up fails the push, never the
/// guest's writes (the guard, [`q::overlay_args`]).
const MIN_SCRATCH_FREE: u64 = 16 << 20;

/// One disk to back up from the instant: the node as configured, where
/// its overlay goes, and the revision it becomes.
#[derive(Debug, Clone)]
pub struct DiskRequest {
    pub node: String,
    pub scratch_dir: PathBuf,
    pub rev_id: String,
    pub parent_id: String,
}

/// What a disk of the session is in QEMU.
struct Disk {
    names: Names,
    node: String,
    new_bitmap: String,
    /// The parent's bitmap, when it was usable (and frozen for the export).
    parent_bitmap: Option<String>,
    persistent: bool,
}

/// What this push set up in QEMU, to be torn down in reverse.
#[derive(Debug, Default)]
struct Built {
    fdsets: Vec<u64>,
    /// Overlays added, of the first disks.
    overlays: usize,
    /// The transaction ran: the jobs, the new bitmaps and (with a parent
    /// bitmap) the frozen copies exist.
    instant: bool,
    nbd_server: bool,
    /// Exports added, of the first disks.
    exports: usize,
}

/// One push's hold on the disks of a running QEMU; see the module docs.
pub struct RunningSession {
    qmp: Qmp,
    disks: Vec<Disk>,
    built: Built,
    /// `finish` ran: nothing is left for `drop` to undo.
    finished: bool,
    _dir: tempfile::TempDir,
    /// The lock on this QEMU, released after everything else.
    _lock: File,
    /// `cleanup` runs after teardown, when the session is dropped.
    hooks: HookRunner,
}

/// A disk's view, ready to read, and why it is read whole (if it is).
pub struct OpenedDisk {
    pub source: QemuSource,
    pub full_read_reason: Option<String>,
}

/// Prepares the push of `disks` of the QEMU at `qmp_path` from one
/// instant (one transaction), `hooks` around it. Blocking.
pub fn open(qmp_path: &Path, disks: &[DiskRequest], hooks: HookRunner) -> Result<(Session, Vec<OpenedDisk>)> {
    let lock = lock(qmp_path)?;
    let mut qmp = Qmp::connect(qmp_path, QMP_TIMEOUT)?;
    q::check_version(qmp.version())?;
    clear_leftovers(&mut qmp)?;
    let nodes = query_nodes(&mut qmp)?;
    let devices = q::parse_devices(&qmp.execute("query-block", None)?)?;
    let mut resolved: Vec<(BlockNode, std::result::Result<String, String>)> = Vec::new();
    for req in disks {
        let disk = q::resolve_node(&nodes, &devices, &req.node)?.clone();
        if resolved.iter().any(|(d, _)| d.node_name == disk.node_name) {
            return Err(Error::invalid(format!(
                "node {} is named twice in one push (as {})",
                disk.node_name, req.node
            )));
        }
        let parent = q::parent_bitmap(&disk, &req.parent_id).map(|b| b.name.clone().unwrap_or_default());
        resolved.push((disk, parent));
    }
    let mut session_disks = Vec::new();
    for (i, ((disk, parent), req)) in resolved.iter().zip(disks).enumerate() {
        let new_bitmap = backy_common::qemu::bitmap_name(&req.rev_id);
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
        session_disks.push(Disk {
            names: Names::of(i),
            node: disk.node_name.clone(),
            new_bitmap,
            parent_bitmap: parent.clone().ok(),
            persistent,
        });
    }
    let mut overlays = Vec::new();
    for ((disk, _), req) in resolved.iter().zip(disks) {
        overlays.push(create_overlay(&req.scratch_dir, disk.image.virtual_size)?);
    }
    let dir = tempfile::Builder::new()
        .prefix("backy-qmp-")
        .tempdir()
        .map_err(|e| Error::io("creating a directory for the NBD socket", e))?;
    let mut session = RunningSession {
        qmp,
        disks: session_disks,
        built: Built::default(),
        finished: false,
        _dir: dir,
        _lock: lock,
        hooks,
    };
    session.build(&overlays)?;
    drop(overlays);

    let socket = session._dir.path().join("nbd.sock");
    let mut opened = Vec::new();
    for ((disk, parent), (req, d)) in resolved.iter().zip(disks.iter().zip(&session.disks)) {
        let frozen = d.parent_bitmap.is_some().then_some(q::FROZEN_BITMAP);
        let source = QemuSource::connect(&socket, &d.names.export_name, frozen, &d.new_bitmap)?;
        if source.size != disk.image.virtual_size {
            return Err(Error::internal(format!(
                "QEMU exports {} bytes of node {}, which has {}",
                source.size, disk.node_name, disk.image.virtual_size
            )));
        }
        let full_read_reason = match (parent, req.parent_id.is_empty()) {
            (Err(why), false) => Some(why.clone()),
            _ => None,
        };
        opened.push(OpenedDisk {
            source,
            full_read_reason,
        });
    }
    Ok((Session::Running(session), opened))
}

impl RunningSession {
    /// Steps 2 to 4 of the module docs.
    fn build(&mut self, overlays: &[File]) -> Result<()> {
        for (overlay, disk) in overlays.iter().zip(&self.disks) {
            let fdset =
                self.qmp
                    .execute_with_fd("add-fd", json!({"opaque": q::FDSET_OPAQUE}), overlay.as_fd())?;
            let fdset = fdset["fdset-id"]
                .as_u64()
                .ok_or_else(|| Error::unavailable(format!("QEMU's add-fd returned no fdset-id: {fdset}")))?;
            self.built.fdsets.push(fdset);
            let file_size = overlay
                .metadata()
                .map_err(|e| Error::io("the fleecing overlay's size", e))?
                .len();
            self.qmp.execute(
                "blockdev-add",
                Some(q::overlay_args(&disk.names, fdset, &disk.node, file_size)),
            )?;
            self.built.overlays += 1;
        }

        self.hooks.pre_snapshot()?;
        let instant: Vec<q::InstantDisk<'_>> = self
            .disks
            .iter()
            .map(|d| q::InstantDisk {
                names: &d.names,
                node: &d.node,
                new_bitmap: &d.new_bitmap,
                parent_bitmap: d.parent_bitmap.as_deref(),
                persistent: d.persistent,
            })
            .collect();
        self.qmp
            .execute("transaction", Some(q::begin_transaction(&instant)))?;
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
        for disk in &self.disks {
            self.qmp.execute(
                "block-export-add",
                Some(q::export_args(
                    &disk.names,
                    &disk.node,
                    disk.parent_bitmap.is_some(),
                )),
            )?;
            self.built.exports += 1;
            tracing::debug!(node = disk.node, "fleecing export ready");
        }
        Ok(())
    }

    /// Whether disk `index`'s view still is its instant: its fleecing job
    /// runs and its scratch took every write of old data. Asked after the
    /// disk was read and before the revision is committed; the round trip
    /// brings in the events QEMU sent meanwhile.
    pub fn check_intact(&mut self, index: usize) -> Result<()> {
        let Some(disk) = self.disks.get(index) else {
            return Err(Error::internal(format!("no disk {index} in this push")));
        };
        let jobs = self.qmp.execute("query-block-jobs", None)?;
        let failed = self.qmp.take_event(q::SCRATCH_FAILURE_EVENT, |d| {
            q::scratch_failure(&disk.names, d).is_some()
        });
        if let Some(why) = failed.and_then(|d| q::scratch_failure(&disk.names, &d)) {
            tracing::error!(node = disk.node, "{why}");
            return Err(Error::exhausted(format!("node {}: {why}", disk.node)));
        }
        let running = jobs
            .as_array()
            .into_iter()
            .flatten()
            .any(|j| j["device"] == disk.names.job.as_str());
        if !running {
            return Err(Error::unavailable(format!(
                "node {}: the fleecing job {} ended before the push read the disk (someone cancelled it?): \
                 its view is no longer one instant",
                disk.node, disk.names.job
            )));
        }
        Ok(())
    }

    /// Removes the exports, the NBD server, the jobs and the overlays (in
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
        let exports = std::mem::take(&mut self.built.exports);
        for disk in &self.disks[..exports] {
            // Hard: our NBD client may still be connected.
            let id = disk.names.export_id.as_str();
            let r = self
                .qmp
                .execute("block-export-del", Some(json!({"id": id, "mode": "hard"})))
                .and_then(|_| self.qmp.wait_event("BLOCK_EXPORT_DELETED", |d| d["id"] == id))
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
            for disk in &self.disks {
                note(
                    "cancelling the fleecing job",
                    cancel_job(&mut self.qmp, &disk.names.job),
                );
            }
        }
        let overlays = std::mem::take(&mut self.built.overlays);
        for disk in &self.disks[..overlays] {
            note(
                "removing the fleecing overlay",
                self.qmp
                    .execute("blockdev-del", Some(json!({"node-name": disk.names.fleece})))
                    .map(drop),
            );
        }
        for fdset in std::mem::take(&mut self.built.fdsets) {
            note(
                "closing the overlay's descriptor",
                self.qmp
                    .execute("remove-fd", Some(json!({"fdset-id": fdset})))
                    .map(drop),
            );
        }
        first.map_or(Ok(()), Err)
    }

    /// The pushes are over: `committed[i]` says whether disk `i`'s revision
    /// was committed. Everything is torn down; a committed disk's parent
    /// bitmap and frozen copy go (and any `backy-*` bitmap crashed pushes
    /// or a crashed QEMU left), a failed disk's new bitmap goes (it marks
    /// an instant no revision has; the parent's keeps recording).
    pub fn finish(mut self, committed: &[bool]) -> Result<()> {
        self.finished = true;
        let mut result = self.teardown();
        if std::mem::take(&mut self.built.instant) {
            for (i, disk) in self.disks.iter().enumerate() {
                let done = committed.get(i).copied().unwrap_or(false);
                let bitmaps = if done {
                    if disk.parent_bitmap.is_none() {
                        continue;
                    }
                    q::commit_transaction(&disk.node, disk.parent_bitmap.as_deref())
                } else {
                    q::abort_transaction(&disk.node, &disk.new_bitmap, disk.parent_bitmap.is_some())
                };
                if let Err(e) = self.qmp.execute("transaction", Some(bitmaps)) {
                    tracing::warn!(node = disk.node, "could not remove a bitmap: {e}");
                    result = result.and(Err(e.into()));
                }
            }
        }
        let nodes = query_nodes(&mut self.qmp)?;
        for (i, disk) in self.disks.iter().enumerate() {
            if !committed.get(i).copied().unwrap_or(false) {
                continue;
            }
            let Some(node) = nodes.iter().find(|n| n.node_name == disk.node) else {
                continue;
            };
            for stray in q::stray_bitmaps(node, &disk.new_bitmap) {
                tracing::info!(
                    bitmap = stray,
                    node = disk.node,
                    "removing a bitmap no revision needs"
                );
                let removed = self.qmp.execute(
                    "block-dirty-bitmap-remove",
                    Some(json!({"node": disk.node, "name": stray})),
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
    /// A failed push: tear down, and remove the new bitmaps (they mark an
    /// instant no revision has); the parents' keep recording.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let _ = self.teardown();
        if std::mem::take(&mut self.built.instant) {
            for disk in &self.disks {
                let abort = q::abort_transaction(&disk.node, &disk.new_bitmap, disk.parent_bitmap.is_some());
                if let Err(e) = self.qmp.execute("transaction", Some(abort)) {
                    tracing::warn!("could not remove bitmap {}: {e}", disk.new_bitmap);
                }
            }
        }
    }
}

fn query_nodes(qmp: &mut Qmp) -> Result<Vec<BlockNode>> {
    q::parse_nodes(&qmp.execute("query-named-block-nodes", Some(json!({"flat": true})))?)
}

/// Cancels the fleecing job and waits until it is gone (its filter holds
/// the overlay until then). A job already gone is fine.
fn cancel_job(qmp: &mut Qmp, job: &str) -> std::result::Result<(), QmpError> {
    match qmp.execute("block-job-cancel", Some(json!({"device": job}))) {
        Ok(_) => qmp
            .wait_event("BLOCK_JOB_CANCELLED", |d| d["device"] == job)
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
    for job in &left.jobs {
        cancel_job(qmp, job)?;
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
            "scratch-dir {} has {} free: too little for the old data of what the guest overwrites during the backup",
            dir.display(),
            format_bytes(free)
        )));
    }
    if free < size {
        tracing::warn!(
            "scratch-dir {} has {} free, the disk is {}: the backup fails (the guest's writes do not) if the guest rewrites more than that during it",
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
