//! A connected librados client instance and its I/O contexts.
//!
//! Thread safety: librados's cluster handle and an I/O context are safe to
//! use from several threads at once for I/O once set up (librados.h: only
//! changing an I/O context's settings is not thread-safe, and this binding
//! sets the namespace once, before the context is shared). So [`Cluster`]
//! and [`IoCtx`] are `Send + Sync` and cheap to clone (reference-counted);
//! the client instance is shut down when the last clone of either is
//! dropped. Every call blocks until the cluster answers (bounded by
//! [`ClusterConfig::op_timeout`]): async callers use `spawn_blocking`.

use super::error::{check, CephError, Result};
use super::ffi::{self, RadosApi, RawIoCtx};
use super::mon;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

/// How to reach the cluster and as whom.
#[derive(Debug, Clone)]
pub struct ClusterConfig<'a> {
    /// A ceph.conf naming the monitors.
    pub conf: &'a Path,
    /// The cephx id, without `client.` (`backy-server`).
    pub id: &'a str,
    /// A keyring file; `None`: the one ceph.conf names (or the default).
    pub keyring: Option<&'a Path>,
    /// Fail a call that gets no answer in this time (ETIMEDOUT) instead of
    /// blocking until the cluster is back: also bounds connecting.
    pub op_timeout: Option<Duration>,
}

/// A path as a NUL-terminated C string, byte for byte (not only UTF-8).
fn c_path(op: &'static str, target: &str, path: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| CephError::Invalid {
        op,
        target: target.to_string(),
        reason: format!("{} contains a NUL byte", path.display()),
    })
}

/// A NUL-terminated copy of `s`, or the typed error naming the call.
pub(crate) fn c_string(op: &'static str, target: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| CephError::Invalid {
        op,
        target: target.to_string(),
        reason: format!("{s:?} contains a NUL byte"),
    })
}

struct Handle {
    api: &'static RadosApi,
    raw: ffi::Rados,
}

// SAFETY: a connected rados_t may be used from any thread, concurrently
// (see the module comment); it is only shut down in Drop, with no clone left.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by rados_create; nothing uses it any more.
        unsafe { (self.api.rados_shutdown)(self.raw) }
    }
}

/// One librados client instance: one address, one lock owner, one entry
/// to blocklist.
#[derive(Clone)]
pub struct Cluster(Arc<Handle>);

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("instance_id", &self.instance_id())
            .finish()
    }
}

impl Cluster {
    /// Loads librados (first use), reads `conf`, sets the identity and
    /// connects.
    pub fn connect(config: &ClusterConfig<'_>) -> Result<Cluster> {
        let api = ffi::rados()?;
        let target = || format!("as client.{} with {}", config.id, config.conf.display());
        let id = c_string("rados_create", &target(), config.id)?;
        let mut raw: ffi::Rados = ptr::null_mut();
        // SAFETY: `raw` receives the handle; `id` outlives the call.
        check(
            unsafe { (api.rados_create)(&mut raw, id.as_ptr()) }.into(),
            "rados_create",
            target,
        )?;
        // From here the handle is shut down on every path.
        let cluster = Cluster(Arc::new(Handle { api, raw }));
        let conf = c_path("rados_conf_read_file", &target(), config.conf)?;
        // SAFETY: a created, unconnected handle; `conf` outlives the call.
        check(
            unsafe { (api.rados_conf_read_file)(raw, conf.as_ptr()) }.into(),
            "rados_conf_read_file",
            target,
        )?;
        if let Some(keyring) = config.keyring {
            let k = c_path("rados_conf_set", "keyring", keyring)?;
            cluster.conf_set_c("keyring", &k)?;
        }
        if let Some(timeout) = config.op_timeout {
            let secs = timeout.as_secs().max(1).to_string();
            for option in [
                "rados_osd_op_timeout",
                "rados_mon_op_timeout",
                "client_mount_timeout",
            ] {
                cluster.conf_set(option, &secs)?;
            }
        }
        // SAFETY: a configured handle.
        check(
            unsafe { (api.rados_connect)(raw) }.into(),
            "rados_connect",
            target,
        )?;
        Ok(cluster)
    }

    fn conf_set(&self, option: &str, value: &str) -> Result<()> {
        self.conf_set_c(option, &c_string("rados_conf_set", option, value)?)
    }

    fn conf_set_c(&self, option: &str, value: &CString) -> Result<()> {
        let target = || format!("{option}={}", value.to_string_lossy());
        let o = c_string("rados_conf_set", &target(), option)?;
        // SAFETY: an unconnected handle; both strings outlive the call.
        check(
            unsafe { (self.0.api.rados_conf_set)(self.0.raw, o.as_ptr(), value.as_ptr()) }.into(),
            "rados_conf_set",
            target,
        )?;
        Ok(())
    }

    /// This instance's address(es), as lock records, watcher lists and the
    /// blocklist name it (`v2:10.0.0.1:0/123456`, or a `[v2:...,v1:...]`
    /// vector).
    pub fn instance_addr(&self) -> Result<String> {
        let mut out: *mut c_char = ptr::null_mut();
        // SAFETY: a connected handle; `out` is freed below.
        check(
            unsafe { (self.0.api.rados_getaddrs)(self.0.raw, &mut out) }.into(),
            "rados_getaddrs",
            String::new,
        )?;
        if out.is_null() {
            return Err(reply("rados_getaddrs", "", "no address".into()));
        }
        // SAFETY: a NUL-terminated string from librados, copied then freed.
        let addr = unsafe { CStr::from_ptr(out) }.to_str().map(str::to_string);
        unsafe { (self.0.api.rados_buffer_free)(out) };
        addr.map_err(|e| reply("rados_getaddrs", "", e.to_string()))
    }

    /// The instance's global id: it is `client.<id>` in lock records.
    pub fn instance_id(&self) -> u64 {
        // SAFETY: a connected handle.
        unsafe { (self.0.api.rados_get_instance_id)(self.0.raw) }
    }

    /// The client name lock records give this instance (`client.4123`).
    pub fn client_name(&self) -> String {
        format!("client.{}", self.instance_id())
    }

    /// An I/O context on `pool`, in RADOS `namespace` when given.
    pub fn ioctx(&self, pool: &str, namespace: Option<&str>) -> Result<IoCtx> {
        let target = || match namespace {
            Some(ns) => format!("{pool}/{ns}"),
            None => pool.to_string(),
        };
        let pool_c = c_string("rados_ioctx_create", &target(), pool)?;
        let ns_c = namespace
            .map(|ns| c_string("rados_ioctx_set_namespace", &target(), ns))
            .transpose()?;
        let mut io: RawIoCtx = ptr::null_mut();
        // SAFETY: a connected handle; `io` is destroyed in IoInner's Drop.
        check(
            unsafe { (self.0.api.rados_ioctx_create)(self.0.raw, pool_c.as_ptr(), &mut io) }.into(),
            "rados_ioctx_create",
            target,
        )?;
        let inner = IoInner {
            api: self.0.api,
            raw: io,
            cluster: self.clone(),
        };
        if let Some(ns) = &ns_c {
            // SAFETY: a fresh context no other thread has seen yet.
            unsafe { (self.0.api.rados_ioctx_set_namespace)(io, ns.as_ptr()) };
        }
        Ok(IoCtx(Arc::new(inner)))
    }

    /// Sends one monitor command (JSON) and returns its output.
    pub fn mon_command(&self, command: &str) -> Result<Vec<u8>> {
        let api = self.0.api;
        let cmd = c_string("rados_mon_command", command, command)?;
        let mut cmds = [cmd.as_ptr()];
        let (mut out, mut out_len) = (ptr::null_mut(), 0usize);
        let (mut status, mut status_len) = (ptr::null_mut(), 0usize);
        // SAFETY: one NUL-terminated command; the out buffers are librados's
        // and freed below.
        let rc = unsafe {
            (api.rados_mon_command)(
                self.0.raw,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        let take = |buf: *mut c_char, len: usize| -> Vec<u8> {
            if buf.is_null() {
                return Vec::new();
            }
            // SAFETY: librados allocated `len` bytes at `buf`; copied, freed.
            let v = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) }.to_vec();
            unsafe { (api.rados_buffer_free)(buf) };
            v
        };
        let out = take(out, out_len);
        let status = take(status, status_len);
        if rc < 0 {
            return Err(CephError::MonCommand {
                command: command.to_string(),
                errno: rc.checked_neg().unwrap_or(libc::EIO),
                status: String::from_utf8_lossy(&status).trim().to_string(),
            });
        }
        Ok(out)
    }

    /// Fences the client instance at `addr` (from a lock record or an
    /// image's watcher list): every op it sends fails with ESHUTDOWN once
    /// the OSDs have the new map, until `expire` passes (the cluster's
    /// default, an hour, when `None`). `profile rbd` allows adding an
    /// entry, not removing one.
    pub fn blocklist_add(&self, addr: &str, expire: Option<Duration>) -> Result<()> {
        self.mon_command(&mon::blocklist_add(addr, expire))?;
        Ok(())
    }
}

fn reply(op: &'static str, target: &str, reason: String) -> CephError {
    CephError::Reply {
        op,
        target: target.to_string(),
        reason,
    }
}

pub(crate) struct IoInner {
    pub(crate) api: &'static RadosApi,
    pub(crate) raw: RawIoCtx,
    cluster: Cluster,
}

// SAFETY: I/O on a context is thread-safe; its settings (the namespace)
// are fixed before it is shared (module comment). Destroyed once, in Drop.
unsafe impl Send for IoInner {}
unsafe impl Sync for IoInner {}

impl Drop for IoInner {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; no clone uses it any more.
        // The cluster handle (held by `cluster`) outlives it.
        unsafe { (self.api.rados_ioctx_destroy)(self.raw) }
    }
}

/// An I/O context: a pool (and namespace) of one client instance. Object
/// calls are in `object.rs`, locks in `lock.rs`, images in `rbd.rs`.
#[derive(Clone)]
pub struct IoCtx(pub(crate) Arc<IoInner>);

impl std::fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoCtx").finish_non_exhaustive()
    }
}

impl IoCtx {
    pub(crate) fn api(&self) -> &'static RadosApi {
        self.0.api
    }

    pub(crate) fn raw(&self) -> RawIoCtx {
        self.0.raw
    }

    /// The client instance this context belongs to.
    pub fn cluster(&self) -> &Cluster {
        &self.0.cluster
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_missing_conf_file_is_not_found() {
        let err = Cluster::connect(&ClusterConfig {
            conf: Path::new("/nonexistent/backy/ceph.conf"),
            id: "backy-server",
            keyring: None,
            op_timeout: Some(Duration::from_secs(1)),
        })
        .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(
            err.to_string().starts_with(
                "rados_conf_read_file as client.backy-server with /nonexistent/backy/ceph.conf: "
            ),
            "{err}"
        );
    }

    #[test]
    fn connecting_to_no_monitor_fails_within_the_op_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("ceph.conf");
        // Nothing listens on the discard port of loopback.
        std::fs::write(&conf, "[global]\nmon_host = 127.0.0.1:9\n").unwrap();
        let started = Instant::now();
        let err = Cluster::connect(&ClusterConfig {
            conf: &conf,
            id: "backy-server",
            keyring: Some(&dir.path().join("keyring")),
            op_timeout: Some(Duration::from_secs(2)),
        })
        .unwrap_err();
        assert!(err.errno().is_some(), "{err}");
        assert!(
            err.to_string()
                .starts_with("rados_connect as client.backy-server"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
    }
}
