//! The few librados calls tests/tests/ceph_pool.rs makes to prove what the
//! `rados` tool cannot show: a lock renewed by one long-lived client
//! instance, and a write that applies only if an xattr still holds the
//! expected epoch. Hand-written declarations of librados's C API, linked
//! by the library's versioned file name, so no librados-dev is needed
//! (the design's choice for the store, docs/DESIGN.md "Ceph pool store").
//! Test-only: errors are librados's negative errno values.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::time::Duration;

type Rados = *mut c_void;
type RawIoCtx = *mut c_void;
type RawWriteOp = *mut c_void;

/// `struct timeval` on 64-bit Linux.
#[repr(C)]
struct Timeval {
    sec: i64,
    usec: i64,
}

const LOCK_FLAG_MAY_RENEW: u8 = 1;
const CMPXATTR_OP_EQ: u8 = 1;

#[link(name = "librados.so.2", kind = "dylib", modifiers = "+verbatim")]
extern "C" {
    fn rados_create(cluster: *mut Rados, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: Rados, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: Rados, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_connect(cluster: Rados) -> c_int;
    fn rados_shutdown(cluster: Rados);
    fn rados_getaddrs(cluster: Rados, addrs: *mut *mut c_char) -> c_int;
    fn rados_buffer_free(buf: *mut c_char);
    fn rados_ioctx_create(cluster: Rados, pool: *const c_char, io: *mut RawIoCtx) -> c_int;
    fn rados_ioctx_set_namespace(io: RawIoCtx, namespace: *const c_char);
    fn rados_ioctx_destroy(io: RawIoCtx);
    fn rados_lock_exclusive(
        io: RawIoCtx,
        oid: *const c_char,
        name: *const c_char,
        cookie: *const c_char,
        desc: *const c_char,
        duration: *mut Timeval,
        flags: u8,
    ) -> c_int;
    fn rados_create_write_op() -> RawWriteOp;
    fn rados_release_write_op(op: RawWriteOp);
    fn rados_write_op_cmpxattr(
        op: RawWriteOp,
        name: *const c_char,
        comparison: u8,
        value: *const c_char,
        len: usize,
    );
    fn rados_write_op_setxattr(op: RawWriteOp, name: *const c_char, value: *const c_char, len: usize);
    fn rados_write_op_omap_set(
        op: RawWriteOp,
        keys: *const *const c_char,
        vals: *const *const c_char,
        lens: *const usize,
        num: usize,
    );
    fn rados_write_op_operate(
        op: RawWriteOp,
        io: RawIoCtx,
        oid: *const c_char,
        mtime: *mut i64,
        flags: c_int,
    ) -> c_int;
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL in test strings")
}

fn check(rc: c_int) -> Result<(), i32> {
    if rc < 0 {
        Err(rc)
    } else {
        Ok(())
    }
}

/// One connected client instance (one address, one lock owner).
pub struct Cluster(Rados);

impl Cluster {
    pub fn connect(conf: &Path, id: &str, keyring: &Path) -> Result<Cluster, i32> {
        let mut handle: Rados = std::ptr::null_mut();
        // SAFETY: `handle` is written by rados_create; strings outlive the calls.
        check(unsafe { rados_create(&mut handle, c(id).as_ptr()) })?;
        let cluster = Cluster(handle);
        let conf = c(conf.to_str().expect("UTF-8 path"));
        let keyring = c(keyring.to_str().expect("UTF-8 path"));
        // SAFETY: a created, not yet connected handle.
        unsafe {
            check(rados_conf_read_file(handle, conf.as_ptr()))?;
            check(rados_conf_set(handle, c("keyring").as_ptr(), keyring.as_ptr()))?;
            check(rados_connect(handle))?;
        }
        Ok(cluster)
    }

    /// This instance's address, as lock records and blocklists name it.
    pub fn address(&self) -> Result<String, i32> {
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: a connected handle; `out` is freed with rados_buffer_free.
        check(unsafe { rados_getaddrs(self.0, &mut out) })?;
        let s = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
        unsafe { rados_buffer_free(out) };
        Ok(s)
    }

    pub fn ioctx(&self, pool: &str, namespace: &str) -> Result<IoCtx<'_>, i32> {
        let mut io: RawIoCtx = std::ptr::null_mut();
        // SAFETY: a connected handle; `io` is destroyed on drop, before it.
        check(unsafe { rados_ioctx_create(self.0, c(pool).as_ptr(), &mut io) })?;
        unsafe { rados_ioctx_set_namespace(io, c(namespace).as_ptr()) };
        Ok(IoCtx { io, _cluster: self })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: every IoCtx borrowed this and is gone.
        unsafe { rados_shutdown(self.0) }
    }
}

pub struct IoCtx<'a> {
    io: RawIoCtx,
    _cluster: &'a Cluster,
}

impl IoCtx<'_> {
    /// `rados_lock_exclusive`; `renew`: the same owner may extend it.
    pub fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        duration: Duration,
        renew: bool,
    ) -> Result<(), i32> {
        let mut tv = Timeval {
            sec: duration.as_secs() as i64,
            usec: i64::from(duration.subsec_micros()),
        };
        let flags = if renew { LOCK_FLAG_MAY_RENEW } else { 0 };
        // SAFETY: valid io context; strings and `tv` outlive the call.
        check(unsafe {
            rados_lock_exclusive(
                self.io,
                c(oid).as_ptr(),
                c(name).as_ptr(),
                c(cookie).as_ptr(),
                c("").as_ptr(),
                &mut tv,
                flags,
            )
        })
    }

    /// One write op: if `expect` is given, xattr `attr` must equal it
    /// (else nothing of the op applies, -ECANCELED); then sets `attr` to
    /// `set` and the omap entries.
    pub fn write_if(
        &self,
        oid: &str,
        attr: &str,
        expect: Option<&str>,
        set: Option<&str>,
        omap: &[(&str, &str)],
    ) -> Result<(), i32> {
        let attr_c = c(attr);
        let expect = expect.map(c);
        let set = set.map(c);
        let keys: Vec<CString> = omap.iter().map(|(k, _)| c(k)).collect();
        let vals: Vec<CString> = omap.iter().map(|(_, v)| c(v)).collect();
        let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        let val_ptrs: Vec<*const c_char> = vals.iter().map(|v| v.as_ptr()).collect();
        let lens: Vec<usize> = omap.iter().map(|(_, v)| v.len()).collect();
        // SAFETY: every buffer lives until the op is operated and released.
        unsafe {
            let op = rados_create_write_op();
            if let Some(e) = &expect {
                rados_write_op_cmpxattr(
                    op,
                    attr_c.as_ptr(),
                    CMPXATTR_OP_EQ,
                    e.as_ptr(),
                    e.as_bytes().len(),
                );
            }
            if let Some(s) = &set {
                rados_write_op_setxattr(op, attr_c.as_ptr(), s.as_ptr(), s.as_bytes().len());
            }
            if !omap.is_empty() {
                rados_write_op_omap_set(
                    op,
                    key_ptrs.as_ptr(),
                    val_ptrs.as_ptr(),
                    lens.as_ptr(),
                    omap.len(),
                );
            }
            let rc = rados_write_op_operate(op, self.io, c(oid).as_ptr(), std::ptr::null_mut(), 0);
            rados_release_write_op(op);
            check(rc)
        }
    }
}

impl Drop for IoCtx<'_> {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create, used by no one else.
        unsafe { rados_ioctx_destroy(self.io) }
    }
}
