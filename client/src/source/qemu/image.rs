//! The `image:` mode: a qcow2 image of a stopped guest, read through a
//! `qemu-nbd --read-only` this client starts on a private Unix socket.
//!
//! Order of operations (qemu-img refuses to change an image a qemu-nbd
//! holds open):
//!
//! 1. `qemu-img info`: the format (qcow2: bitmaps need it) and the parent
//!    revision's bitmap `backy-<parent id>`, usable only when enabled and
//!    consistent;
//! 2. hooks `pre-snapshot`, `qemu-img bitmap --add IMAGE backy-<new id>`
//!    (the backup instant), `post-snapshot`;
//! 3. `qemu-nbd` exporting the image with the parent's bitmap;
//! 4. after the push, qemu-nbd is killed, then on commit the parent's
//!    bitmap (and any other `backy-*` one, left by a crashed push) is
//!    removed ([`ImageSession::commit`]), on failure the new one (dropping
//!    the session).
//!
//! A running guest's image is locked by QEMU: step 1 fails saying so (use
//! the `qmp:` mode, [`super::running`]).

use super::{Opened, QemuSource, Session};
use crate::source::hooks::HookRunner;
use backy_common::qemu::{bitmap_name, ImageInfo};
use backy_common::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long qemu-nbd may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {cmd} (is qemu-utils installed?)"), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Another process holds the image: most often the guest runs.
        let hint = if stderr.contains("lock") {
            "; if the guest is running, back it up through QMP: qmp: SOCKET and node: NODE \
             in client.yaml, or --source qmp:SOCKET:NODE"
        } else {
            ""
        };
        return Err(Error::unavailable(format!(
            "{cmd} {}: {}{hint}",
            args.first().map(|a| a.to_string_lossy()).unwrap_or_default(),
            stderr.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn image_info(image: &Path) -> Result<ImageInfo> {
    let out = run(
        "qemu-img",
        &["info".as_ref(), "--output=json".as_ref(), image.as_os_str()],
    )?;
    ImageInfo::from_json(&out).map_err(|e| e.context(image.display()))
}

fn bitmap(image: &Path, op: &str, name: &str) -> Result<()> {
    run(
        "qemu-img",
        &["bitmap".as_ref(), op.as_ref(), image.as_os_str(), name.as_ref()],
    )
    .map(drop)
}

/// The image and its bitmaps around one push; see the module docs.
pub struct ImageSession {
    image: PathBuf,
    /// None for formats without bitmaps.
    new_bitmap: Option<String>,
    nbd: Option<Child>,
    committed: bool,
    _dir: tempfile::TempDir,
    /// Dropped last: `cleanup` runs once the image is released.
    hooks: HookRunner,
}

impl ImageSession {
    fn stop_nbd(&mut self) {
        if let Some(mut child) = self.nbd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The revision is committed: the parent's bitmap is no longer needed
    /// (the new one records from this push's instant on).
    pub fn commit(mut self) -> Result<()> {
        self.stop_nbd();
        self.committed = true;
        let Some(new_bitmap) = self.new_bitmap.clone() else {
            return Ok(());
        };
        // The parent's bitmap, and any left by pushes that crashed before
        // they could remove theirs: only the new one is ever needed again.
        let info = image_info(&self.image)?;
        let keep = [new_bitmap];
        for old in info.stray_backy_bitmaps(&keep) {
            bitmap(&self.image, "--remove", &old.name)?;
        }
        Ok(())
    }
}

impl Drop for ImageSession {
    fn drop(&mut self) {
        self.stop_nbd();
        if let Some(name) = self.new_bitmap.as_deref().filter(|_| !self.committed) {
            // The push failed: its bitmap marks an instant no revision has.
            if let Err(e) = bitmap(&self.image, "--remove", name) {
                tracing::warn!("could not remove bitmap {name}: {}", e.message);
            }
        }
    }
}

/// Prepares a push of revision `rev_id` (child of `parent_id`, empty for
/// none) from `image`. Blocking: run it off the async workers.
pub fn open(image: &Path, mut hooks: HookRunner, rev_id: &str, parent_id: &str) -> Result<Opened> {
    let info = image_info(image)?;
    // Other formats (raw, vmdk, ...) are read whole and compared with the
    // parent's digests every time: only qcow2 stores bitmaps.
    let qcow2 = info.format == "qcow2";
    let parent = if qcow2 {
        info.parent_bitmap(parent_id).map(|b| b.name.clone())
    } else {
        Err(format!(
            "{} is a {} image: dirty bitmaps persist only in qcow2",
            image.display(),
            info.format
        ))
    };
    let new_bitmap = qcow2.then(|| bitmap_name(rev_id));
    if let Some(name) = new_bitmap.as_deref().filter(|n| info.bitmap(n).is_some()) {
        // Left by an earlier attempt at this revision: this one's instant is now.
        bitmap(image, "--remove", name)?;
    }
    hooks.pre_snapshot()?;
    if let Some(name) = &new_bitmap {
        bitmap(image, "--add", name)?;
    }
    let dir = tempfile::Builder::new()
        .prefix("backy-qemu-")
        .tempdir()
        .map_err(|e| Error::io("creating a directory for the qemu-nbd socket", e))?;
    let mut session = ImageSession {
        image: image.to_path_buf(),
        new_bitmap: new_bitmap.clone(),
        nbd: None,
        committed: false,
        _dir: dir,
        hooks,
    };
    // With the session owning the new bitmap: a failing thaw removes it.
    session.hooks.post_snapshot()?;
    let socket = session._dir.path().join("nbd.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--read-only", "-f", &info.format])
        .arg(format!("--socket={}", socket.display()));
    if let Ok(name) = &parent {
        cmd.arg("-B").arg(name);
    }
    let child = cmd
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| Error::io("starting qemu-nbd (is qemu-utils installed?)", e))?;
    session.nbd = Some(child);
    wait_for_socket(&mut session, &socket)?;

    let label = new_bitmap.as_deref().unwrap_or_default();
    let source = QemuSource::connect(&socket, "", parent.as_deref().ok(), label)?;
    if source.size != info.virtual_size {
        return Err(Error::internal(format!(
            "qemu-nbd exports {} bytes of {}, qemu-img says {}",
            source.size,
            image.display(),
            info.virtual_size
        )));
    }
    let full_read_reason = match (&parent, parent_id.is_empty()) {
        (Err(why), false) => Some(why.clone()),
        _ => None,
    };
    Ok(Opened {
        session: Session::Image(session),
        source,
        full_read_reason,
    })
}

fn wait_for_socket(session: &mut ImageSession, socket: &Path) -> Result<()> {
    let start = Instant::now();
    while !socket.exists() {
        if let Some(child) = session.nbd.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                session.nbd = None;
                return Err(Error::unavailable(format!(
                    "qemu-nbd exited ({status}) before serving {}",
                    session.image.display()
                )));
            }
        }
        if start.elapsed() > START_TIMEOUT {
            return Err(Error::unavailable("qemu-nbd did not start listening in 30 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
