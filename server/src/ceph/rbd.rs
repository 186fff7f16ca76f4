//! RBD images through librbd: what the `rbd` tool cannot give the store
//! cheaply (block reads of a snapshot, watchers) and the snapshot calls
//! that need no process per call.
//!
//! An [`Image`] is `Send` (it may move to a blocking thread) but not
//! `Sync`: one thread uses an open image at a time; open one per reader.

use super::cluster::{c_string, IoCtx};
use super::error::{check, CephError, Result};
use super::ffi::{self, ImageWatcher, RawImage, RbdApi, SnapInfo};
use std::ffi::{c_int, c_void, CStr};
use std::ptr;

/// `RBD_FEATURE_*` (librbd's features.h).
pub mod features {
    pub const LAYERING: u64 = 1 << 0;
    pub const EXCLUSIVE_LOCK: u64 = 1 << 2;
    pub const OBJECT_MAP: u64 = 1 << 3;
    pub const FAST_DIFF: u64 = 1 << 4;
    pub const DEEP_FLATTEN: u64 = 1 << 5;
}

/// The features of a job's image: layering, which `rbd snap protect` (the
/// retention lock) requires; object-map and fast-diff, so that
/// `rbd diff --from-snap` (a cut push's leftovers) and `rbd du` (space per
/// revision) read a map instead of probing every object; and
/// exclusive-lock, which the object map requires. No deep-flatten: backy makes no
/// clones.
pub const JOB_IMAGE_FEATURES: u64 =
    features::LAYERING | features::EXCLUSIVE_LOCK | features::OBJECT_MAP | features::FAST_DIFF;

/// The largest read one call asks for.
const READ_CHUNK: usize = 16 << 20;

/// A snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: u64,
    /// The image's size when the snapshot was taken.
    pub size: u64,
    pub name: String,
}

/// A range that differs between two snapshots ([`Image::diff_iterate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    /// `false`: the range was discarded (reads zeros).
    pub exists: bool,
}

/// A client instance watching an image (it has it open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watcher {
    /// What a taker blocklists.
    pub address: String,
    /// The client instance's global id (`client.<id>`).
    pub id: i64,
    pub cookie: u64,
}

impl IoCtx {
    /// Creates a thin image of `size` bytes with `features`
    /// ([`JOB_IMAGE_FEATURES`] for a job). EEXIST if it exists.
    pub fn rbd_create(&self, name: &str, size: u64, features: u64) -> Result<()> {
        let api = ffi::rbd()?;
        let n = c_string("rbd_create2", name, name)?;
        // 0: the default object size (4 MiB).
        let mut order: c_int = 0;
        // SAFETY: `n` and `order` outlive the call.
        let rc = unsafe { (api.rbd_create2)(self.raw(), n.as_ptr(), size, features, &mut order) };
        check(rc.into(), "rbd_create2", || name.to_string())?;
        Ok(())
    }

    /// Removes an image; ENOTEMPTY while it has snapshots, EBUSY while
    /// watched.
    pub fn rbd_remove(&self, name: &str) -> Result<()> {
        let api = ffi::rbd()?;
        let n = c_string("rbd_remove", name, name)?;
        // SAFETY: `n` outlives the call.
        let rc = unsafe { (api.rbd_remove)(self.raw(), n.as_ptr()) };
        check(rc.into(), "rbd_remove", || name.to_string())?;
        Ok(())
    }
}

/// An open image: its head (writable) or a snapshot (read-only).
pub struct Image {
    api: &'static RbdApi,
    raw: RawImage,
    name: String,
    /// librbd keeps using the client instance behind the context.
    _io: IoCtx,
}

// SAFETY: librbd's image handle may be used from any one thread at a time;
// not Sync, so never from two at once.
unsafe impl Send for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("name", &self.name).finish()
    }
}

/// Held across every `rbd_open*` and `rbd_close` of this process: librbd
/// (Ceph 18) was seen to hang for good in an open while another image of
/// the same client instance opened or closed at the same time, its
/// completion thread locking a mutex of a freed context (two pushes
/// sealing at once through one server, in a namespace made minutes
/// before). Opens and closes are a few round trips each; reads and writes
/// on open images are not serialised.
static OPEN_CLOSE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_close_lock() -> std::sync::MutexGuard<'static, ()> {
    OPEN_CLOSE.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Image {
    fn drop(&mut self) {
        let _serial = open_close_lock();
        // SAFETY: opened by rbd_open*; used by no one else. A failed close
        // leaves nothing to undo.
        unsafe { (self.api.rbd_close)(self.raw) };
    }
}

impl Image {
    /// Opens the image's head for writing (snapshots, resize).
    pub fn open(io: &IoCtx, name: &str) -> Result<Image> {
        Image::open_with(io, name, None, false)
    }

    /// Opens the image read-only, at snapshot `snap` or the head: it takes
    /// no exclusive lock and never writes.
    pub fn open_read_only(io: &IoCtx, name: &str, snap: Option<&str>) -> Result<Image> {
        Image::open_with(io, name, snap, true)
    }

    fn open_with(io: &IoCtx, name: &str, snap: Option<&str>, read_only: bool) -> Result<Image> {
        let api = ffi::rbd()?;
        let label = match snap {
            Some(s) => format!("{name}@{s}"),
            None => name.to_string(),
        };
        let op = if read_only {
            "rbd_open_read_only"
        } else {
            "rbd_open"
        };
        let n = c_string(op, &label, name)?;
        let s = snap.map(|s| c_string(op, &label, s)).transpose()?;
        let s_ptr = s.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut raw: RawImage = ptr::null_mut();
        let open = if read_only {
            api.rbd_open_read_only
        } else {
            api.rbd_open
        };
        let rc = {
            let _serial = open_close_lock();
            // SAFETY: strings outlive the call; `raw` receives the handle.
            unsafe { open(io.raw(), n.as_ptr(), &mut raw, s_ptr) }
        };
        check(rc.into(), op, || label.clone())?;
        Ok(Image {
            api,
            raw,
            name: label,
            _io: io.clone(),
        })
    }

    fn target(&self) -> String {
        self.name.clone()
    }

    fn snap_target(&self, snap: &str) -> String {
        format!("{}@{snap}", self.name)
    }

    /// The size of the opened head or snapshot.
    pub fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image; `size` is written.
        let rc = unsafe { (self.api.rbd_get_size)(self.raw, &mut size) };
        check(rc.into(), "rbd_get_size", || self.target())?;
        Ok(size)
    }

    /// The image's feature bits ([`features`]).
    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: an open image; `f` is written.
        let rc = unsafe { (self.api.rbd_get_features)(self.raw, &mut f) };
        check(rc.into(), "rbd_get_features", || self.target())?;
        Ok(f)
    }

    /// `len` bytes at `offset`, fewer where the image ends (unwritten
    /// ranges read as zeros).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let done = self.read_into(offset, &mut buf)?;
        buf.truncate(done);
        Ok(buf)
    }

    /// Reads into `buf` from `offset`; returns the bytes read, fewer than
    /// `buf.len()` only where the image ends.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let len = buf.len();
        let mut done = 0usize;
        while done < len {
            let want = (len - done).min(READ_CHUNK);
            // SAFETY: `buf[done..done + want]` is writable.
            let rc = unsafe {
                (self.api.rbd_read2)(
                    self.raw,
                    offset + done as u64,
                    want,
                    buf[done..].as_mut_ptr().cast(),
                    0,
                )
            };
            let got = check(rc as i64, "rbd_read2", || {
                format!("{} at {}", self.name, offset + done as u64)
            })?;
            let got = (got as usize).min(want);
            done += got;
            if got < want {
                break;
            }
        }
        Ok(done)
    }

    /// The extents of the opened snapshot (or head) that differ from
    /// snapshot `from` (`None`: from an empty image), within
    /// `offset..offset + len`, merged and in order (`rbd_diff_iterate2`).
    /// `whole_object`: whole objects, read from the object map (cheap, but
    /// coarse); otherwise the extents the OSDs track, which cover at least
    /// every write (an object new since `from` counts from its start).
    /// Each extent says whether it holds data (`true`) or was discarded.
    pub fn diff_iterate(
        &self,
        from: Option<&str>,
        offset: u64,
        len: u64,
        whole_object: bool,
    ) -> Result<Vec<DiffExtent>> {
        let op = "rbd_diff_iterate2";
        let target = || match from {
            Some(f) => format!("{} from {f}", self.name),
            None => self.name.clone(),
        };
        let from_c = from.map(|f| c_string(op, &target(), f)).transpose()?;
        let from_ptr = from_c.as_ref().map_or(ptr::null(), |f| f.as_ptr());
        let mut out: Vec<DiffExtent> = Vec::new();
        unsafe extern "C" fn collect(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the `Vec` passed below, alive and not
            // otherwise borrowed for the whole call.
            let out = unsafe { &mut *arg.cast::<Vec<DiffExtent>>() };
            let exists = exists != 0;
            match out.last_mut() {
                Some(last) if last.offset + last.len == offset && last.exists == exists => {
                    last.len += len as u64
                }
                _ => out.push(DiffExtent {
                    offset,
                    len: len as u64,
                    exists,
                }),
            }
            0
        }
        // SAFETY: an open image; `from_c` and `out` outlive the call, which
        // calls `collect` synchronously before returning.
        let rc = unsafe {
            (self.api.rbd_diff_iterate2)(
                self.raw,
                from_ptr,
                offset,
                len,
                0,
                u8::from(whole_object),
                Some(collect),
                (&mut out as *mut Vec<DiffExtent>).cast(),
            )
        };
        check(rc.into(), op, target)?;
        Ok(out)
    }

    /// The image's snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        // librbd answers ERANGE with the count it needs (one more than the
        // snapshots: a terminating entry).
        let mut max: c_int = 16;
        for _ in 0..8 {
            let cap = usize::try_from(max).unwrap_or(0).max(1);
            let mut infos: Vec<SnapInfo> = (0..cap)
                .map(|_| SnapInfo {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            // SAFETY: `infos` holds `max` entries; filled entries' names are
            // freed by rbd_snap_list_end after they are copied.
            let rc = unsafe { (self.api.rbd_snap_list)(self.raw, infos.as_mut_ptr(), &mut max) };
            match check(rc.into(), "rbd_snap_list", || self.target()) {
                Ok(count) => {
                    let count = (count as usize).min(cap);
                    let snaps = infos[..count]
                        .iter()
                        .map(|i| {
                            let name = if i.name.is_null() {
                                String::new()
                            } else {
                                // SAFETY: librbd's NUL-terminated name.
                                unsafe { CStr::from_ptr(i.name) }.to_string_lossy().into_owned()
                            };
                            Snapshot {
                                id: i.id,
                                size: i.size,
                                name,
                            }
                        })
                        .collect();
                    // SAFETY: the list librbd filled, ended once.
                    unsafe { (self.api.rbd_snap_list_end)(infos.as_mut_ptr()) };
                    return Ok(snaps);
                }
                Err(e) if e.errno() == Some(libc::ERANGE) => max = max.max(cap as c_int + 1),
                Err(e) => return Err(e),
            }
        }
        Err(CephError::Reply {
            op: "rbd_snap_list",
            target: self.target(),
            reason: "the list kept growing".into(),
        })
    }

    fn snap_call(
        &self,
        op: &'static str,
        snap: &str,
        f: unsafe extern "C" fn(RawImage, *const std::ffi::c_char) -> c_int,
    ) -> Result<()> {
        let s = c_string(op, &self.snap_target(snap), snap)?;
        // SAFETY: an open image; `s` outlives the call.
        let rc = unsafe { f(self.raw, s.as_ptr()) };
        check(rc.into(), op, || self.snap_target(snap))?;
        Ok(())
    }

    /// EEXIST if the name is taken.
    pub fn snap_create(&self, snap: &str) -> Result<()> {
        self.snap_call("rbd_snap_create", snap, self.api.rbd_snap_create)
    }

    /// EBUSY while the snapshot is protected.
    pub fn snap_remove(&self, snap: &str) -> Result<()> {
        self.snap_call("rbd_snap_remove", snap, self.api.rbd_snap_remove)
    }

    /// Keeps the snapshot from being removed (the retention lock). EBUSY if
    /// it is protected already.
    pub fn snap_protect(&self, snap: &str) -> Result<()> {
        self.snap_call("rbd_snap_protect", snap, self.api.rbd_snap_protect)
    }

    /// EINVAL if it is not protected.
    pub fn snap_unprotect(&self, snap: &str) -> Result<()> {
        self.snap_call("rbd_snap_unprotect", snap, self.api.rbd_snap_unprotect)
    }

    pub fn snap_is_protected(&self, snap: &str) -> Result<bool> {
        let op = "rbd_snap_is_protected";
        let s = c_string(op, &self.snap_target(snap), snap)?;
        let mut p: c_int = 0;
        // SAFETY: an open image; `s` and `p` outlive the call.
        let rc = unsafe { (self.api.rbd_snap_is_protected)(self.raw, s.as_ptr(), &mut p) };
        check(rc.into(), op, || self.snap_target(snap))?;
        Ok(p != 0)
    }

    /// Grows or shrinks the head.
    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: an open image.
        let rc = unsafe { (self.api.rbd_resize)(self.raw, size) };
        check(rc.into(), "rbd_resize", || self.target())?;
        Ok(())
    }

    /// The client instances watching the image: every open handle, this
    /// one included.
    pub fn watchers(&self) -> Result<Vec<Watcher>> {
        let mut max: usize = 8;
        for _ in 0..8 {
            let cap = max.max(1);
            let mut list: Vec<ImageWatcher> = (0..cap)
                .map(|_| ImageWatcher {
                    addr: ptr::null_mut(),
                    id: 0,
                    cookie: 0,
                })
                .collect();
            max = cap;
            // SAFETY: `list` holds `max` entries; filled ones are cleaned up
            // by rbd_watchers_list_cleanup after they are copied.
            let rc = unsafe { (self.api.rbd_watchers_list)(self.raw, list.as_mut_ptr(), &mut max) };
            match check(rc.into(), "rbd_watchers_list", || self.target()) {
                Ok(_) => {
                    let count = max.min(cap);
                    let watchers = list[..count]
                        .iter()
                        .map(|w| Watcher {
                            address: if w.addr.is_null() {
                                String::new()
                            } else {
                                // SAFETY: librbd's NUL-terminated address.
                                unsafe { CStr::from_ptr(w.addr) }.to_string_lossy().into_owned()
                            },
                            id: w.id,
                            cookie: w.cookie,
                        })
                        .collect();
                    // SAFETY: the `count` entries librbd filled, cleaned once.
                    unsafe { (self.api.rbd_watchers_list_cleanup)(list.as_mut_ptr(), count) };
                    return Ok(watchers);
                }
                Err(e) if e.errno() == Some(libc::ERANGE) => max = max.max(cap + 1),
                Err(e) => return Err(e),
            }
        }
        Err(CephError::Reply {
            op: "rbd_watchers_list",
            target: self.target(),
            reason: "the list kept growing".into(),
        })
    }
}
