//! The librados and librbd C functions the binding calls, declared by hand
//! from Ceph's `include/rados/librados.h` and `include/rbd/librbd.h`
//! (release 16 and later keep these signatures) and looked up at run time
//! by their versioned library file names (docs/DESIGN.md "Ceph pool store",
//! "How backy talks to Ceph"). Only the functions used are declared.

use super::loader::{Library, LoadError};
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

pub(crate) type Rados = *mut c_void;
pub(crate) type RawIoCtx = *mut c_void;
pub(crate) type RawWriteOp = *mut c_void;
pub(crate) type RawReadOp = *mut c_void;
pub(crate) type OmapIter = *mut c_void;
pub(crate) type RawImage = *mut c_void;

/// `rbd_snap_info_t`.
#[repr(C)]
pub(crate) struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// `rbd_image_watcher_t`.
#[repr(C)]
pub(crate) struct ImageWatcher {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

/// `LIBRADOS_LOCK_FLAG_RENEW` (librados.h; "MAY_RENEW" in cls_lock).
pub(crate) const LOCK_FLAG_MAY_RENEW: u8 = 1;

/// The library file names: the runtime packages' (librados2, librbd1),
/// not the `-dev` packages' unversioned links.
pub(crate) const LIBRADOS: &str = "librados.so.2";
pub(crate) const LIBRBD: &str = "librbd.so.1";

/// A struct of function pointers and its loader, from C-like declarations.
macro_rules! api {
    ($(#[$meta:meta])* $name:ident { $( fn $f:ident ( $($arg:ident : $ty:ty),* $(,)? ) $( -> $ret:ty )?; )* }) => {
        $(#[$meta])*
        #[allow(non_snake_case)]
        pub(crate) struct $name {
            $( pub $f: unsafe extern "C" fn($($ty),*) $(-> $ret)?, )*
        }

        impl $name {
            pub(crate) fn load(library: &str) -> Result<Self, LoadError> {
                let lib = Library::open(library)?;
                Ok($name {
                    $(
                        // SAFETY: the symbol is the C function declared
                        // above, whose signature this pointer type spells.
                        $f: unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(
                                lib.symbol(stringify!($f))?,
                            )
                        },
                    )*
                })
            }
        }
    };
}

api! {
    /// librados.
    RadosApi {
        fn rados_create(cluster: *mut Rados, id: *const c_char) -> c_int;
        fn rados_conf_read_file(cluster: Rados, path: *const c_char) -> c_int;
        fn rados_conf_set(cluster: Rados, option: *const c_char, value: *const c_char) -> c_int;
        fn rados_connect(cluster: Rados) -> c_int;
        fn rados_shutdown(cluster: Rados);
        fn rados_getaddrs(cluster: Rados, addrs: *mut *mut c_char) -> c_int;
        fn rados_get_instance_id(cluster: Rados) -> u64;
        fn rados_buffer_free(buf: *mut c_char);
        fn rados_mon_command(
            cluster: Rados,
            cmd: *mut *const c_char,
            cmdlen: usize,
            inbuf: *const c_char,
            inbuflen: usize,
            outbuf: *mut *mut c_char,
            outbuflen: *mut usize,
            outs: *mut *mut c_char,
            outslen: *mut usize,
        ) -> c_int;
        fn rados_ioctx_create(cluster: Rados, pool: *const c_char, io: *mut RawIoCtx) -> c_int;
        fn rados_ioctx_set_namespace(io: RawIoCtx, namespace: *const c_char);
        fn rados_ioctx_destroy(io: RawIoCtx);
        fn rados_read(io: RawIoCtx, oid: *const c_char, buf: *mut c_char, len: usize, off: u64) -> c_int;
        fn rados_write_full(io: RawIoCtx, oid: *const c_char, buf: *const c_char, len: usize) -> c_int;
        fn rados_stat(io: RawIoCtx, oid: *const c_char, size: *mut u64, mtime: *mut libc::time_t) -> c_int;
        fn rados_remove(io: RawIoCtx, oid: *const c_char) -> c_int;
        fn rados_getxattr(
            io: RawIoCtx,
            oid: *const c_char,
            name: *const c_char,
            buf: *mut c_char,
            len: usize,
        ) -> c_int;
        fn rados_create_read_op() -> RawReadOp;
        fn rados_release_read_op(op: RawReadOp);
        fn rados_read_op_omap_get_vals2(
            op: RawReadOp,
            start_after: *const c_char,
            filter_prefix: *const c_char,
            max_return: u64,
            iter: *mut OmapIter,
            more: *mut u8,
            rval: *mut c_int,
        );
        fn rados_read_op_omap_get_vals_by_keys2(
            op: RawReadOp,
            keys: *const *const c_char,
            num_keys: usize,
            key_lens: *const usize,
            iter: *mut OmapIter,
            rval: *mut c_int,
        );
        fn rados_read_op_operate(op: RawReadOp, io: RawIoCtx, oid: *const c_char, flags: c_int) -> c_int;
        fn rados_omap_get_next2(
            iter: OmapIter,
            key: *mut *mut c_char,
            val: *mut *mut c_char,
            key_len: *mut usize,
            val_len: *mut usize,
        ) -> c_int;
        fn rados_omap_get_end(iter: OmapIter);
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
        fn rados_write_op_create(op: RawWriteOp, exclusive: c_int, category: *const c_char);
        fn rados_write_op_write_full(op: RawWriteOp, buf: *const c_char, len: usize);
        fn rados_write_op_omap_set2(
            op: RawWriteOp,
            keys: *const *const c_char,
            vals: *const *const c_char,
            key_lens: *const usize,
            val_lens: *const usize,
            num: usize,
        );
        fn rados_write_op_omap_cmp2(
            op: RawWriteOp,
            key: *const c_char,
            comparison: u8,
            value: *const c_char,
            key_len: usize,
            value_len: usize,
            prval: *mut c_int,
        );
        fn rados_write_op_omap_rm_keys2(
            op: RawWriteOp,
            keys: *const *const c_char,
            key_lens: *const usize,
            num: usize,
        );
        fn rados_write_op_operate(
            op: RawWriteOp,
            io: RawIoCtx,
            oid: *const c_char,
            mtime: *mut libc::time_t,
            flags: c_int,
        ) -> c_int;
        fn rados_lock_exclusive(
            io: RawIoCtx,
            oid: *const c_char,
            name: *const c_char,
            cookie: *const c_char,
            desc: *const c_char,
            duration: *mut libc::timeval,
            flags: u8,
        ) -> c_int;
        fn rados_unlock(io: RawIoCtx, oid: *const c_char, name: *const c_char, cookie: *const c_char) -> c_int;
        fn rados_list_lockers(
            io: RawIoCtx,
            oid: *const c_char,
            name: *const c_char,
            exclusive: *mut c_int,
            tag: *mut c_char,
            tag_len: *mut usize,
            clients: *mut c_char,
            clients_len: *mut usize,
            cookies: *mut c_char,
            cookies_len: *mut usize,
            addrs: *mut c_char,
            addrs_len: *mut usize,
        ) -> libc::ssize_t;
        fn rados_break_lock(
            io: RawIoCtx,
            oid: *const c_char,
            name: *const c_char,
            client: *const c_char,
            cookie: *const c_char,
        ) -> c_int;
    }
}

api! {
    /// librbd.
    RbdApi {
        fn rbd_create2(io: RawIoCtx, name: *const c_char, size: u64, features: u64, order: *mut c_int) -> c_int;
        fn rbd_remove(io: RawIoCtx, name: *const c_char) -> c_int;
        fn rbd_open(io: RawIoCtx, name: *const c_char, image: *mut RawImage, snap: *const c_char) -> c_int;
        fn rbd_open_read_only(io: RawIoCtx, name: *const c_char, image: *mut RawImage, snap: *const c_char) -> c_int;
        fn rbd_close(image: RawImage) -> c_int;
        fn rbd_get_size(image: RawImage, size: *mut u64) -> c_int;
        fn rbd_get_features(image: RawImage, features: *mut u64) -> c_int;
        fn rbd_resize(image: RawImage, size: u64) -> c_int;
        fn rbd_read2(image: RawImage, ofs: u64, len: usize, buf: *mut c_char, op_flags: c_int) -> libc::ssize_t;
        fn rbd_snap_list(image: RawImage, snaps: *mut SnapInfo, max_snaps: *mut c_int) -> c_int;
        fn rbd_snap_list_end(snaps: *mut SnapInfo);
        fn rbd_snap_create(image: RawImage, name: *const c_char) -> c_int;
        fn rbd_snap_remove(image: RawImage, name: *const c_char) -> c_int;
        fn rbd_snap_protect(image: RawImage, name: *const c_char) -> c_int;
        fn rbd_snap_unprotect(image: RawImage, name: *const c_char) -> c_int;
        fn rbd_snap_is_protected(image: RawImage, name: *const c_char, is_protected: *mut c_int) -> c_int;
        fn rbd_watchers_list(image: RawImage, watchers: *mut ImageWatcher, max: *mut usize) -> c_int;
        fn rbd_watchers_list_cleanup(watchers: *mut ImageWatcher, num: usize);
        fn rbd_diff_iterate2(
            image: RawImage,
            fromsnapname: *const c_char,
            ofs: u64,
            len: u64,
            include_parent: u8,
            whole_object: u8,
            cb: Option<unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int>,
            arg: *mut c_void,
        ) -> c_int;
    }
}

static RADOS: OnceLock<Result<RadosApi, LoadError>> = OnceLock::new();
static RBD: OnceLock<Result<RbdApi, LoadError>> = OnceLock::new();

/// librados, loaded on first use (a failure is remembered).
pub(crate) fn rados() -> Result<&'static RadosApi, LoadError> {
    RADOS
        .get_or_init(|| RadosApi::load(LIBRADOS))
        .as_ref()
        .map_err(Clone::clone)
}

/// librbd, loaded on first use (a failure is remembered).
pub(crate) fn rbd() -> Result<&'static RbdApi, LoadError> {
    RBD.get_or_init(|| RbdApi::load(LIBRBD))
        .as_ref()
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apis_load_from_the_runtime_libraries() {
        // Every declared function is in the installed libraries. A host
        // without them (no ceph-common) cannot tell: skipped there; CI and
        // the test hosts have them.
        for result in [rados().map(drop), rbd().map(drop)] {
            match result {
                Ok(()) => {}
                Err(LoadError::Library { library, detail }) => {
                    println!("SKIPPED: {library} is not installed ({detail})")
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn a_bogus_library_name_is_the_typed_error() {
        let err = RadosApi::load("librados-backy-bogus.so.2")
            .err()
            .expect("no such library");
        assert!(matches!(err, LoadError::Library { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("install ceph-common (librados2, librbd1)"),
            "{err}"
        );
        // librbd's functions are not in librados: the first missing one is named.
        let err = RbdApi::load(LIBRADOS).err().expect("librados has no rbd_create2");
        assert!(err.to_string().contains("has no function rbd_create2"), "{err}");
    }
}
