//! Opening a shared library at run time (`dlopen`), so that the server
//! starts on a host without Ceph's libraries and fails only when a Ceph
//! store is used. Libraries are opened once and never closed: the function
//! pointers taken from them stay valid for the life of the process.

use std::ffi::{c_void, CStr, CString};

/// Why a library or one of its functions could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("{library} cannot be loaded ({detail}): install ceph-common (librados2, librbd1)")]
    Library { library: String, detail: String },
    #[error(
        "{library} has no function {symbol} ({detail}): install a Ceph of release 16 or newer \
         (ceph-common, librados2, librbd1)"
    )]
    Symbol {
        library: String,
        symbol: String,
        detail: String,
    },
}

/// An opened library, never unloaded.
pub(crate) struct Library {
    name: String,
    handle: *mut c_void,
}

/// The last `dlerror` message of this thread (glibc keeps it per thread).
fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until
    // the next dl* call on this thread; it is copied at once.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown dlopen error".into()
    } else {
        unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
    }
}

impl Library {
    /// Opens `name` (a file name searched the way the dynamic linker
    /// searches, e.g. `librados.so.2`).
    pub(crate) fn open(name: &str) -> Result<Library, LoadError> {
        let missing = |detail: String| LoadError::Library {
            library: name.to_string(),
            detail,
        };
        let c_name = CString::new(name).map_err(|_| missing("a NUL byte in the name".into()))?;
        // SAFETY: a NUL-terminated name; the handle is kept for ever.
        let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(missing(dl_error()));
        }
        Ok(Library {
            name: name.to_string(),
            handle,
        })
    }

    /// The address of function `symbol`, never null.
    pub(crate) fn symbol(&self, symbol: &str) -> Result<*mut c_void, LoadError> {
        let missing = |detail: String| LoadError::Symbol {
            library: self.name.clone(),
            symbol: symbol.to_string(),
            detail,
        };
        let c_symbol = CString::new(symbol).map_err(|_| missing("a NUL byte in the name".into()))?;
        // SAFETY: an open handle (never closed) and a NUL-terminated name.
        let address = unsafe { libc::dlsym(self.handle, c_symbol.as_ptr()) };
        if address.is_null() {
            return Err(missing(dl_error()));
        }
        Ok(address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_names_itself_and_the_remedy() {
        let err = Library::open("librados-backy-missing.so.2")
            .err()
            .expect("no such library");
        assert!(
            matches!(&err, LoadError::Library { library, .. } if library == "librados-backy-missing.so.2")
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("librados-backy-missing.so.2 cannot be loaded ("),
            "{msg}"
        );
        assert!(
            msg.ends_with("): install ceph-common (librados2, librbd1)"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn a_missing_function_is_named() {
        // The C library is always there; this function is not.
        let libc = Library::open("libc.so.6").expect("libc");
        assert!(libc.symbol("strlen").is_ok());
        let err = libc.symbol("rados_backy_missing").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("libc.so.6 has no function rados_backy_missing ("),
            "{err}"
        );
    }
}
