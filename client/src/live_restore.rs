//! Live restore: a running guest whose disk node reads a backup is copied
//! into a local target while it runs, then QEMU moves the guest onto the
//! target and the backup's node is closed. The QMP steps and why they are
//! these are in [`backy_common::qmp::mirror`]; here they run, each undone
//! if a later one fails, so that a failed live restore leaves the guest on
//! its source as it was.
//!
//! What serves the source node is the caller's business ([`mirror_into`]
//! takes a node name): a backy export of a revision, or any NBD server.

use crate::qmp::{Qmp, QmpError};
use crate::restore::target::holds_data;
use backy_common::qmp::mirror::{self as m, JobState, TargetDriver};
use backy_common::qmp::{self as q, BlockNode};
use backy_common::units::format_bytes;
use backy_common::{Error, Result};
use serde::Serialize;
use serde_json::json;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How [`mirror_into`] runs.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Bytes per second for the background copy (guest writes are not
    /// limited); `None`: as fast as source and target go.
    pub speed: Option<u64>,
    /// Overwrite a target that holds data.
    pub force: bool,
    /// A job whose progress stands still this long fails (the deadline
    /// restarts whenever it moves).
    pub stall_timeout: Duration,
    /// How often the job's progress is asked for.
    pub poll_interval: Duration,
    /// Set from elsewhere (a signal) to stop: the job is cancelled and the
    /// guest stays on its source.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            speed: None,
            force: false,
            stall_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_millis(200),
            stop: None,
        }
    }
}

/// A completed live restore.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorReport {
    /// The node the guest read, now closed.
    pub node: String,
    pub target: PathBuf,
    /// The guest's disk node from now on.
    pub target_node: String,
    pub size: u64,
    /// Bytes QEMU copied: the image, plus what guest writes dirtied again.
    pub bytes_copied: u64,
    pub duration_secs: f64,
    /// The source node and the nodes only it used, gone from QEMU.
    pub removed_nodes: Vec<String>,
    /// Source nodes QEMU would not delete, with its reason (the guest
    /// runs on the target regardless).
    pub left_nodes: Vec<String>,
}

impl fmt::Display for MirrorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "live-restored node {} ({}) into {}: {} copied in {:.1} s; the guest's disk is now node {}",
            self.node,
            format_bytes(self.size),
            self.target.display(),
            format_bytes(self.bytes_copied),
            self.duration_secs,
            self.target_node
        )?;
        for left in &self.left_nodes {
            write!(f, "\nwarning: source node not removed: {left}")?;
        }
        Ok(())
    }
}

/// Copies node `node` of the QEMU behind `qmp` (the node a guest's device
/// reads, possibly a format node over an NBD client node) into `target`
/// while the guest runs, moves the guest onto the target, and deletes the
/// source node and the nodes only it used (closing its NBD connection).
/// `target` is a block device or a file of exactly the node's size, or a
/// path that does not exist yet (created at that size); one holding data
/// needs `opts.force`; one another process has open is refused. QEMU opens
/// nothing by path: backy opens the target and passes the descriptor.
/// `progress(done, total)` follows the copy (`total` grows with guest
/// writes). On failure the guest is left on its source and nothing of this
/// run stays in QEMU; a target created here is removed.
pub fn mirror_into(
    qmp: &mut Qmp,
    node: &str,
    target: &Path,
    opts: &MirrorOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<MirrorReport> {
    let started = Instant::now();
    let nodes = q::parse_nodes(&qmp.execute("query-named-block-nodes", Some(json!({"flat": true})))?)?;
    let devices = q::parse_devices(&qmp.execute("query-block", None)?)?;
    let source: BlockNode = q::resolve_node(&nodes, &devices, node)?.clone();
    let size = source.image.virtual_size;
    // Taken now: the job puts a filter above the node, not below.
    let subtree = match qmp.execute("x-debug-query-block-graph", None) {
        Ok(graph) => m::owned_subtree(&graph, &source.node_name)?,
        Err(QmpError::Refused { desc, .. }) => {
            tracing::warn!(
                "QEMU has no block graph to ask ({desc}): only node {} will be removed",
                source.node_name
            );
            vec![source.node_name.clone()]
        }
        Err(e) => return Err(e.into()),
    };
    let opened = open_target(target, size, opts.force)?;
    let name = m::run_name(seed());
    let mut run = Run {
        qmp,
        name: name.clone(),
        fdset: None,
        target_node: false,
        job: false,
        created: opened.created.clone(),
        done: false,
        opts,
    };
    let bytes_copied = run.copy(&source.node_name, &opened, &mut progress)?;
    run.done = true;
    let qmp = &mut *run.qmp;
    let (removed_nodes, left_nodes) = remove_source(qmp, &subtree)?;
    Ok(MirrorReport {
        node: source.node_name,
        target: opened.path,
        target_node: name,
        size,
        bytes_copied,
        duration_secs: started.elapsed().as_secs_f64(),
        removed_nodes,
        left_nodes,
    })
}

/// A different name on each run (QEMU keeps the target node).
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let hash = blake3::hash(&[nanos.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The target, open read-write, checked.
struct OpenedTarget {
    file: File,
    path: PathBuf,
    driver: TargetDriver,
    /// Created by this run: removed if it fails.
    created: Option<PathBuf>,
}

fn open_target(path: &Path, size: u64, force: bool) -> Result<OpenedTarget> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("examining {shown}"), e)),
    };
    let Some(meta) = meta else {
        return create_target(path, size);
    };
    let device = meta.file_type().is_block_device();
    if !device && !meta.is_file() {
        return Err(Error::invalid(format!(
            "{shown} is neither a regular file nor a block device"
        )));
    }
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if device {
        // O_EXCL on a block device fails while it is mounted or held by
        // another device (LVM, RAID).
        options.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
    }
    let mut file = options.open(path).map_err(|e| match e.raw_os_error() {
        Some(16) => Error::busy(format!(
            "{shown} is in use (mounted or held by another device): not restoring onto it"
        )),
        _ => Error::io(format!("opening {shown}"), e),
    })?;
    let have = if device {
        crate::source::block::device_size(&mut file, path)?
    } else {
        meta.len()
    };
    if have != size {
        return Err(Error::invalid(format!(
            "{shown} holds {have} bytes, the source node has {size}: a live restore needs a target of \
             exactly its size (or a path that does not exist yet, created at that size)"
        )));
    }
    refuse_locked(&file, path)?;
    if !force && holds_data(&file, size).map_err(|e| Error::io(format!("reading {shown}"), e))? {
        return Err(Error::exists(format!(
            "{shown} holds data: give --force to overwrite it"
        )));
    }
    let real = std::fs::canonicalize(path).map_err(|e| Error::io(format!("resolving {shown}"), e))?;
    Ok(OpenedTarget {
        file,
        path: real,
        driver: if device {
            TargetDriver::HostDevice
        } else {
            TargetDriver::File
        },
        created: None,
    })
}

/// A new sparse file of `size` bytes, private (0600).
fn create_target(path: &Path, size: u64) -> Result<OpenedTarget> {
    let shown = path.display();
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{shown} names no file")))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
    let real = dir.join(name);
    // A mistyped device path must not become a file in /dev.
    if real.starts_with("/dev") {
        return Err(Error::not_found(format!(
            "{} does not exist (a path under /dev is restored only onto an existing block device)",
            real.display()
        )));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&real)
        .map_err(|e| Error::io(format!("creating {}", real.display()), e))?;
    if let Err(e) = file.set_len(size) {
        let _ = std::fs::remove_file(&real);
        return Err(Error::io(format!("sizing {}", real.display()), e));
    }
    Ok(OpenedTarget {
        file,
        path: real.clone(),
        driver: TargetDriver::File,
        created: Some(real),
    })
}

/// Refuses a target another process holds a lock on: QEMU and qemu-nbd
/// lock the images they have open (byte-range locks; a test write lock
/// over the whole file conflicts with any of theirs, and is let go at once).
fn refuse_locked(file: &File, path: &Path) -> Result<()> {
    use rustix::fs::{fcntl_lock, FlockOperation};
    match fcntl_lock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            fcntl_lock(file, FlockOperation::NonBlockingUnlock)
                .map_err(|e| Error::io(format!("unlocking {}", path.display()), e.into()))?;
            Ok(())
        }
        Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::ACCESS => Err(Error::busy(format!(
            "{} is in use (another process, a QEMU or qemu-nbd, has it open and locked): not restoring onto it",
            path.display()
        ))),
        Err(e) => Err(Error::io(format!("locking {}", path.display()), e.into())),
    }
}

/// One run's state in QEMU; dropped before `done`, it undoes itself.
struct Run<'a> {
    qmp: &'a mut Qmp,
    /// The target node's name, the job's id and the fd set's `opaque`.
    name: String,
    fdset: Option<u64>,
    target_node: bool,
    job: bool,
    created: Option<PathBuf>,
    done: bool,
    opts: &'a MirrorOptions,
}

impl Run<'_> {
    /// Target node, job, wait until ready, pivot; returns the bytes copied.
    fn copy(
        &mut self,
        source: &str,
        target: &OpenedTarget,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<u64> {
        let added = self
            .qmp
            .execute_with_fd("add-fd", json!({"opaque": self.name}), target.file.as_fd())?;
        let fdset = added["fdset-id"]
            .as_u64()
            .ok_or_else(|| Error::unavailable(format!("QEMU's add-fd returned no fdset-id: {added}")))?;
        self.fdset = Some(fdset);
        self.qmp.execute(
            "blockdev-add",
            Some(m::target_args(&self.name, fdset, target.driver)),
        )?;
        self.target_node = true;
        self.qmp.execute(
            "blockdev-mirror",
            Some(m::mirror_args(&self.name, source, &self.name, self.opts.speed)),
        )?;
        self.job = true;
        let ready = self.wait(Phase::Ready, progress)?;
        self.qmp.execute("job-complete", Some(json!({"id": self.name})))?;
        let completed = self.wait(Phase::Completed, progress)?;
        Ok(completed.max(ready))
    }

    /// Polls the job until `phase`; returns the bytes copied then. Fails
    /// when the job fails, is cancelled by someone else, or stands still
    /// for the stall timeout.
    fn wait(&mut self, phase: Phase, progress: &mut impl FnMut(u64, u64)) -> Result<u64> {
        let name = self.name.clone();
        let ours = |d: &serde_json::Value| d["device"] == name.as_str();
        let mut last = (u64::MAX, Instant::now());
        loop {
            // Once job-complete is sent the switch is QEMU's: let it finish.
            let stop = self.opts.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
            if phase == Phase::Ready && stop {
                return Err(Error::unavailable("stopped: the guest stays on its source"));
            }
            let jobs = self.qmp.execute("query-block-jobs", None)?;
            let state = m::find_job(&jobs, &self.name)?;
            // Events arrive with the replies; the terminal ones first.
            if let Some(data) = self.qmp.take_event("BLOCK_JOB_COMPLETED", ours) {
                self.job = false;
                if let Some(error) = m::completion_error(&data) {
                    return Err(Error::unavailable(format!(
                        "QEMU's mirror job failed: {error}; the guest stays on its source"
                    )));
                }
                if phase == Phase::Ready {
                    return Err(Error::unavailable(
                        "QEMU's mirror job ended before it was ready; the guest stays on its source",
                    ));
                }
                let done = data["offset"].as_u64().unwrap_or(0);
                progress(done, data["len"].as_u64().unwrap_or(done));
                return Ok(done);
            }
            if self.qmp.take_event("BLOCK_JOB_CANCELLED", ours).is_some() {
                self.job = false;
                return Err(Error::unavailable(
                    "QEMU's mirror job was cancelled (not by backy); the guest stays on its source",
                ));
            }
            let Some(JobState {
                offset, len, ready, ..
            }) = state
            else {
                // Gone without its event: only a QEMU bug or another client
                // dismissing it gets here.
                self.job = false;
                return Err(Error::unavailable(format!(
                    "QEMU's mirror job {} is gone without saying how it ended",
                    self.name
                )));
            };
            progress(offset, len);
            if phase == Phase::Ready && ready {
                return Ok(offset);
            }
            if offset != last.0 {
                last = (offset, Instant::now());
            } else if last.1.elapsed() > self.opts.stall_timeout {
                return Err(Error::unavailable(format!(
                    "QEMU's mirror job made no progress for {} s ({} of {} copied): giving up; \
                     the guest stays on its source",
                    self.opts.stall_timeout.as_secs(),
                    format_bytes(offset),
                    format_bytes(len)
                )));
            }
            std::thread::sleep(self.opts.poll_interval);
        }
    }

    /// Cancels the job, removes the target node and its descriptor, and a
    /// target file created here. Every step is tried.
    fn undo(&mut self) {
        if std::mem::take(&mut self.job) {
            if let Err(e) = cancel(self.qmp, &self.name, self.opts.stall_timeout) {
                tracing::warn!("QEMU cleanup, cancelling mirror job {}: {e}", self.name);
            }
        }
        if std::mem::take(&mut self.target_node) {
            if let Err(e) = self
                .qmp
                .execute("blockdev-del", Some(json!({"node-name": self.name})))
            {
                tracing::warn!("QEMU cleanup, removing target node {}: {e}", self.name);
            }
        }
        if let Some(fdset) = self.fdset.take() {
            if let Err(e) = self.qmp.execute("remove-fd", Some(json!({"fdset-id": fdset}))) {
                tracing::warn!("QEMU cleanup, closing the target's descriptor: {e}");
            }
        }
        if let Some(path) = self.created.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("removing {}: {e}", path.display());
            }
        }
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.undo();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ready,
    Completed,
}

/// Cancels the job without a pivot and waits (bounded) until it is gone.
fn cancel(qmp: &mut Qmp, job: &str, within: Duration) -> Result<()> {
    match qmp.execute("block-job-cancel", Some(json!({"device": job, "force": true}))) {
        Ok(_) => {}
        Err(QmpError::Refused { desc, .. })
            if desc.contains("not found") || desc.contains("No active block job") =>
        {
            return Ok(())
        }
        Err(e) => return Err(e.into()),
    }
    let deadline = Instant::now() + within;
    while m::find_job(&qmp.execute("query-block-jobs", None)?, job)?.is_some() {
        if Instant::now() > deadline {
            return Err(Error::unavailable(format!(
                "mirror job {job} still there {} s after its cancel",
                within.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Deletes the replaced source nodes, parents first. A node already gone
/// (one a `-drive` owned goes with the job) counts as removed; one QEMU
/// will not delete is reported with its reason.
fn remove_source(qmp: &mut Qmp, subtree: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let mut left = Vec::new();
    for node in subtree {
        match qmp.execute("blockdev-del", Some(json!({"node-name": node}))) {
            Ok(_) => {}
            Err(QmpError::Refused { desc, .. }) if desc.contains("Failed to find node") => {}
            Err(QmpError::Refused { desc, .. }) => {
                tracing::warn!(node, "QEMU did not remove the source node: {desc}");
                left.push(format!("{node}: {desc}"));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let nodes = q::parse_nodes(&qmp.execute("query-named-block-nodes", Some(json!({"flat": true})))?)?;
    let removed = subtree
        .iter()
        .filter(|n| !nodes.iter().any(|have| &have.node_name == *n))
        .cloned()
        .collect();
    Ok((removed, left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_before_anything_happens() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.img");
        let t = open_target(&new, 1 << 20, false).unwrap();
        assert_eq!(std::fs::metadata(&new).unwrap().len(), 1 << 20);
        assert_eq!(
            (t.driver, t.created.as_deref()),
            (TargetDriver::File, Some(&*new))
        );

        let e = open_target(&new, 2 << 20, false).err().unwrap();
        assert_eq!(e.kind, backy_common::ErrorKind::InvalidArgument);
        assert!(
            e.message
                .contains("holds 1048576 bytes, the source node has 2097152"),
            "{}",
            e.message
        );

        // Right size, zeros: no --force needed; data: needed.
        assert!(open_target(&new, 1 << 20, false).unwrap().created.is_none());
        std::fs::write(&new, vec![7u8; 1 << 20]).unwrap();
        let e = open_target(&new, 1 << 20, false).err().unwrap();
        assert!(
            e.message.ends_with("holds data: give --force to overwrite it"),
            "{}",
            e.message
        );
        assert!(open_target(&new, 1 << 20, true).is_ok());

        let e = open_target(Path::new("/dev/backy-no-such-disk"), 1 << 20, false)
            .err()
            .unwrap();
        assert_eq!(e.kind, backy_common::ErrorKind::NotFound);
        assert!(open_target(dir.path(), 1 << 20, false).is_err());
    }

    #[test]
    fn report_line() {
        let r = MirrorReport {
            node: "disk0".into(),
            target: "/var/lib/vms/vm1.img".into(),
            target_node: "backy-live-0000abcd".into(),
            size: 64 << 20,
            bytes_copied: 65 << 20,
            duration_secs: 3.25,
            removed_nodes: vec!["disk0".into(), "nbd0".into()],
            left_nodes: vec![],
        };
        assert_eq!(
            r.to_string(),
            "live-restored node disk0 (64.00 MiB) into /var/lib/vms/vm1.img: 65.00 MiB copied in 3.2 s; \
             the guest's disk is now node backy-live-0000abcd"
        );
    }
}
