//! Reads and plain writes of RADOS objects: data, xattrs, omap.

use super::cluster::{c_string, IoCtx};
use super::error::{check, CephError, Result};
use super::ffi::OmapIter;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int};
use std::ptr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The largest read a single call asks for (librados returns the length
/// read as an `int`).
const READ_CHUNK: usize = 16 << 20;

/// An object's size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectStat {
    pub size: u64,
    pub mtime: SystemTime,
}

/// One page of omap entries, and whether more follow it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OmapPage {
    pub entries: Vec<(String, Vec<u8>)>,
    pub more: bool,
}

impl IoCtx {
    fn oid(&self, op: &'static str, oid: &str) -> Result<std::ffi::CString> {
        c_string(op, oid, oid)
    }

    /// `len` bytes at `offset`, fewer where the object ends; ENOENT for a
    /// missing object.
    pub fn read_range(&self, oid: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let o = self.oid("rados_read", oid)?;
        let mut buf = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let want = (len - done).min(READ_CHUNK);
            // SAFETY: `buf[done..done + want]` is writable; `o` outlives the call.
            let rc = unsafe {
                (self.api().rados_read)(
                    self.raw(),
                    o.as_ptr(),
                    buf[done..].as_mut_ptr().cast::<c_char>(),
                    want,
                    offset + done as u64,
                )
            };
            let got = check(rc.into(), "rados_read", || oid.to_string())? as usize;
            done += got.min(want);
            if got < want {
                break;
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// The whole object.
    pub fn read(&self, oid: &str) -> Result<Vec<u8>> {
        let size = self.stat(oid)?.size;
        let len = usize::try_from(size).map_err(|_| CephError::Invalid {
            op: "rados_read",
            target: oid.to_string(),
            reason: format!("{size} bytes do not fit in memory"),
        })?;
        self.read_range(oid, 0, len)
    }

    /// Replaces the object's data with `data` (creates it if missing).
    pub fn write_full(&self, oid: &str, data: &[u8]) -> Result<()> {
        let o = self.oid("rados_write_full", oid)?;
        // SAFETY: `data` and `o` outlive the call.
        let rc = unsafe {
            (self.api().rados_write_full)(self.raw(), o.as_ptr(), data.as_ptr().cast(), data.len())
        };
        check(rc.into(), "rados_write_full", || oid.to_string())?;
        Ok(())
    }

    pub fn stat(&self, oid: &str) -> Result<ObjectStat> {
        let o = self.oid("rados_stat", oid)?;
        let (mut size, mut mtime) = (0u64, 0 as libc::time_t);
        // SAFETY: both out-pointers are valid; `o` outlives the call.
        let rc = unsafe { (self.api().rados_stat)(self.raw(), o.as_ptr(), &mut size, &mut mtime) };
        check(rc.into(), "rados_stat", || oid.to_string())?;
        let mtime = UNIX_EPOCH + Duration::from_secs(u64::try_from(mtime).unwrap_or(0));
        Ok(ObjectStat { size, mtime })
    }

    pub fn remove(&self, oid: &str) -> Result<()> {
        let o = self.oid("rados_remove", oid)?;
        // SAFETY: `o` outlives the call.
        let rc = unsafe { (self.api().rados_remove)(self.raw(), o.as_ptr()) };
        check(rc.into(), "rados_remove", || oid.to_string())?;
        Ok(())
    }

    /// Xattr `name` of the object: ENODATA when the object has no such
    /// xattr, ENOENT when there is no object.
    pub fn getxattr(&self, oid: &str, name: &str) -> Result<Vec<u8>> {
        let target = || format!("{oid} xattr {name}");
        let o = self.oid("rados_getxattr", oid)?;
        let n = c_string("rados_getxattr", &target(), name)?;
        // librados answers ERANGE when the buffer is short: grow and retry.
        let mut cap = 256usize;
        loop {
            let mut buf = vec![0u8; cap];
            // SAFETY: `buf` holds `cap` writable bytes; strings outlive the call.
            let rc = unsafe {
                (self.api().rados_getxattr)(self.raw(), o.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), cap)
            };
            match check(rc.into(), "rados_getxattr", target) {
                Ok(len) => {
                    buf.truncate(len as usize);
                    return Ok(buf);
                }
                Err(e) if e.errno() == Some(libc::ERANGE) && cap < 64 << 20 => cap *= 16,
                Err(e) => return Err(e),
            }
        }
    }

    /// One page of the object's omap: at most `max` entries with keys
    /// starting with `prefix`, after key `start_after` (`""`: from the
    /// first).
    pub fn omap_page(&self, oid: &str, prefix: &str, start_after: &str, max: u64) -> Result<OmapPage> {
        let target = || format!("{oid} omap");
        let after = c_string("rados_read_op_omap_get_vals2", &target(), start_after)?;
        let pre = c_string("rados_read_op_omap_get_vals2", &target(), prefix)?;
        let mut more = 0u8;
        let more_ptr: *mut u8 = &mut more;
        let entries = self.read_omap("rados_read_op_omap_get_vals2", oid, |api, op, iter, rval| {
            // SAFETY: strings and out-pointers outlive the operate call.
            unsafe {
                (api.rados_read_op_omap_get_vals2)(
                    op,
                    after.as_ptr(),
                    pre.as_ptr(),
                    max,
                    iter,
                    more_ptr,
                    rval,
                )
            }
        })?;
        Ok(OmapPage {
            entries,
            more: more != 0,
        })
    }

    /// Every omap entry with keys starting with `prefix`, in key order,
    /// read in pages of `page` entries.
    pub fn omap_values(&self, oid: &str, prefix: &str, page: u64) -> Result<Vec<(String, Vec<u8>)>> {
        let mut all: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            let start_after = all.last().map(|(k, _)| k.as_str()).unwrap_or("");
            let p = self.omap_page(oid, prefix, start_after, page.max(1))?;
            let empty = p.entries.is_empty();
            all.extend(p.entries);
            if !p.more || empty {
                return Ok(all);
            }
        }
    }

    /// The values of `keys` that the object's omap has.
    pub fn omap_get(&self, oid: &str, keys: &[&str]) -> Result<BTreeMap<String, Vec<u8>>> {
        let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr().cast()).collect();
        let key_lens: Vec<usize> = keys.iter().map(|k| k.len()).collect();
        let entries = self.read_omap(
            "rados_read_op_omap_get_vals_by_keys2",
            oid,
            |api, op, iter, rval| {
                // SAFETY: the key arrays (pointers and lengths, no NUL needed)
                // outlive the operate call.
                unsafe {
                    (api.rados_read_op_omap_get_vals_by_keys2)(
                        op,
                        key_ptrs.as_ptr(),
                        keys.len(),
                        key_lens.as_ptr(),
                        iter,
                        rval,
                    )
                }
            },
        )?;
        Ok(entries.into_iter().collect())
    }

    /// Runs a read op with one omap step (`add` adds it) and drains the
    /// iterator it fills.
    fn read_omap(
        &self,
        op_name: &'static str,
        oid: &str,
        add: impl FnOnce(&super::ffi::RadosApi, super::ffi::RawReadOp, *mut OmapIter, *mut c_int),
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let api = self.api();
        let o = self.oid(op_name, oid)?;
        let target = || format!("{oid} omap");
        let mut iter: OmapIter = ptr::null_mut();
        let mut rval: c_int = 0;
        // SAFETY: the op is released on every path below; the iterator is
        // ended after draining; `rval` is written by the operate call.
        unsafe {
            let op = (api.rados_create_read_op)();
            add(api, op, &mut iter, &mut rval);
            let rc = (api.rados_read_op_operate)(op, self.raw(), o.as_ptr(), 0);
            let result = check(rc.into(), op_name, target)
                .and_then(|_| check(rval.into(), op_name, target))
                .and_then(|_| drain(api, iter, oid));
            if !iter.is_null() {
                (api.rados_omap_get_end)(iter);
            }
            (api.rados_release_read_op)(op);
            result
        }
    }
}

/// The entries of an omap iterator (not ended here).
///
/// # Safety
/// `iter` is null or an iterator filled by a successful read op.
unsafe fn drain(api: &super::ffi::RadosApi, iter: OmapIter, oid: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if iter.is_null() {
        return Ok(out);
    }
    loop {
        let (mut k, mut v) = (ptr::null_mut::<c_char>(), ptr::null_mut::<c_char>());
        let (mut kl, mut vl) = (0usize, 0usize);
        let rc = (api.rados_omap_get_next2)(iter, &mut k, &mut v, &mut kl, &mut vl);
        check(rc.into(), "rados_omap_get_next2", || format!("{oid} omap"))?;
        if k.is_null() {
            return Ok(out);
        }
        // The pointers are valid until the next call: copy now.
        let key = std::slice::from_raw_parts(k.cast::<u8>(), kl).to_vec();
        let value = if v.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(v.cast::<u8>(), vl).to_vec()
        };
        let key = String::from_utf8(key).map_err(|e| CephError::Reply {
            op: "rados_omap_get_next2",
            target: format!("{oid} omap"),
            reason: format!("a key is not UTF-8: {e}"),
        })?;
        out.push((key, value));
    }
}
