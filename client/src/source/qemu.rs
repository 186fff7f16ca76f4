//! `type: qemu`: a qcow2 image of a stopped guest, read through a
//! `qemu-nbd --read-only` this client starts on a private Unix socket.
//!
//! Order of operations (qemu-img refuses to change an image a qemu-nbd
//! holds open):
//!
//! 1. `qemu-img info`: the format (qcow2: bitmaps need it) and the parent
//!    revision's bitmap `backy-<parent id>`, usable only when enabled and
//!    consistent;
//! 2. `qemu-img bitmap --add IMAGE backy-<new id>`: the backup instant,
//!    from which the next push's changes are recorded;
//! 3. `qemu-nbd` exporting the image with the parent's bitmap; block
//!    status gives the data extents (`base:allocation`) and the dirty ones
//!    (`qemu:dirty-bitmap:backy-<parent id>`), which become the source's
//!    changed extents;
//! 4. after the push, qemu-nbd is killed, then on commit the parent's
//!    bitmap (and any other `backy-*` one, left by a crashed push) is
//!    removed ([`QemuSession::commit`]), on failure the new one (dropping
//!    the session).
//!
//! Without a usable parent bitmap the push reads everything and compares
//! with the parent's digests, and says why. A running guest (QMP, backup
//! fleecing) is not handled here: its image is locked by QEMU, and the
//! `qemu-img info` in step 1 fails saying so.

use super::Source;
use crate::nbd::{NbdClient, NbdClientError, READ_DEPTH, STATUS_LEN};
use backy_common::nbd::reply::select;
use backy_common::nbd::{CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP_PREFIX, STATE_DIRTY, STATE_HOLE};
use backy_common::qemu::{bitmap_name, ImageInfo};
use backy_common::ranges::{round_out, Extent, GRANULE};
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
        return Err(Error::unavailable(format!(
            "{cmd} {}: {}",
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
pub struct QemuSession {
    image: PathBuf,
    new_bitmap: String,
    nbd: Option<Child>,
    committed: bool,
    _dir: tempfile::TempDir,
}

impl QemuSession {
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
        // The parent's bitmap, and any left by pushes that crashed before
        // they could remove theirs: only the new one is ever needed again.
        let info = image_info(&self.image)?;
        let keep = [self.new_bitmap.clone()];
        for old in info.stray_backy_bitmaps(&keep) {
            bitmap(&self.image, "--remove", &old.name)?;
        }
        Ok(())
    }
}

impl Drop for QemuSession {
    fn drop(&mut self) {
        self.stop_nbd();
        if !self.committed {
            // The push failed: its bitmap marks an instant no revision has.
            if let Err(e) = bitmap(&self.image, "--remove", &self.new_bitmap) {
                tracing::warn!("could not remove bitmap {}: {}", self.new_bitmap, e.message);
            }
        }
    }
}

/// The image read through qemu-nbd.
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

/// What [`open`] prepared.
pub struct Opened {
    pub session: QemuSession,
    pub source: QemuSource,
    /// Why the push reads everything although it has a parent revision.
    pub full_read_reason: Option<String>,
}

/// Prepares a push of revision `rev_id` (child of `parent_id`, empty for
/// none) from `image`. Blocking: run it off the async workers.
pub fn open(image: &Path, rev_id: &str, parent_id: &str) -> Result<Opened> {
    let info = image_info(image)?;
    if info.format != "qcow2" {
        return Err(Error::invalid(format!(
            "{}: a qemu source must be a qcow2 image (persistent dirty bitmaps need it), not {}",
            image.display(),
            info.format
        )));
    }
    let parent = info.parent_bitmap(parent_id).map(|b| b.name.clone());
    let new_bitmap = bitmap_name(rev_id);
    if info.bitmap(&new_bitmap).is_some() {
        // Left by an earlier attempt at this revision: this one's instant is now.
        bitmap(image, "--remove", &new_bitmap)?;
    }
    bitmap(image, "--add", &new_bitmap)?;
    let dir = tempfile::Builder::new()
        .prefix("backy-qemu-")
        .tempdir()
        .map_err(|e| Error::io("creating a directory for the qemu-nbd socket", e))?;
    let mut session = QemuSession {
        image: image.to_path_buf(),
        new_bitmap: new_bitmap.clone(),
        nbd: None,
        committed: false,
        _dir: dir,
    };
    let socket = session._dir.path().join("nbd.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--read-only", "-f", "qcow2"])
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

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the NBD runtime", e))?;
    let dirty_context = parent
        .as_ref()
        .ok()
        .map(|n| format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{n}"));
    let mut contexts = vec![CONTEXT_BASE_ALLOCATION];
    contexts.extend(dirty_context.as_deref());
    let (client, status) = rt.block_on(async {
        let mut client = NbdClient::connect_unix(&socket, "", &contexts).await?;
        let status = client.block_status_all(STATUS_LEN).await?;
        Ok::<_, NbdClientError>((client, status))
    })?;
    let size = client.export().size;
    if size != info.virtual_size {
        return Err(Error::internal(format!(
            "qemu-nbd exports {size} bytes of {}, qemu-img says {}",
            image.display(),
            info.virtual_size
        )));
    }
    let data = status
        .first()
        .map(|s| select(s, |f| f & STATE_HOLE == 0))
        .unwrap_or_default();
    // Whole 64 KiB granules whatever the bitmap's granularity: blocks are
    // split no finer than for range lists (README: How it works).
    let changed = status
        .get(1)
        .map(|s| round_out(&select(s, |f| f & STATE_DIRTY != 0), GRANULE, size));
    let full_read_reason = match (&parent, parent_id.is_empty()) {
        (Err(why), false) => Some(why.clone()),
        _ => None,
    };
    Ok(Opened {
        session,
        source: QemuSource {
            rt,
            client,
            size,
            data,
            changed,
            bitmap: new_bitmap,
        },
        full_read_reason,
    })
}

fn wait_for_socket(session: &mut QemuSession, socket: &Path) -> Result<()> {
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
        let want = Extent {
            offset,
            len: buf.len() as u64,
        };
        let client = &mut self.client;
        self.rt
            .block_on(client.read_extents(&[want], READ_DEPTH, |at, data| {
                let start = (at - offset) as usize;
                match buf.get_mut(start..start + data.len()) {
                    Some(dst) => {
                        dst.copy_from_slice(&data);
                        Ok(())
                    }
                    None => Err(Error::internal("NBD read outside the buffer")),
                }
            }))
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
