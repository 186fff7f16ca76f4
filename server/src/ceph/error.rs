//! The binding's one error type: which operation on which object or image
//! failed, with the errno Ceph returned, so callers branch on kinds
//! (`is_not_found`, `is_busy`, ...) and never on message text.

use super::loader::LoadError;
use std::io;

/// A failed librados or librbd call.
#[derive(Debug, thiserror::Error)]
pub enum CephError {
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A call returned a negative errno.
    #[error("{op} {target}: {} ({})", errno_text(.errno), errno_name(.errno))]
    Call {
        op: &'static str,
        /// The object, image, snapshot or lock the call was about.
        target: String,
        errno: i32,
    },
    /// A monitor command was refused; `status` is the monitor's reason.
    #[error("{command}: {} ({}): {status}", errno_text(.errno), errno_name(.errno))]
    MonCommand {
        command: String,
        errno: i32,
        status: String,
    },
    /// An argument Ceph cannot take (a name with a NUL byte, a size past
    /// what the C API counts).
    #[error("{op} {target}: {reason}")]
    Invalid {
        op: &'static str,
        target: String,
        reason: String,
    },
    /// Ceph answered something the binding cannot read (not UTF-8, not
    /// the expected layout).
    #[error("{op} {target}: unreadable reply: {reason}")]
    Reply {
        op: &'static str,
        target: String,
        reason: String,
    },
}

pub type Result<T, E = CephError> = std::result::Result<T, E>;

/// `ESHUTDOWN`: what every op of a blocklisted client instance returns.
pub const EBLOCKLISTED: i32 = libc::ESHUTDOWN;

impl CephError {
    /// The errno of a failed call or monitor command.
    pub fn errno(&self) -> Option<i32> {
        match self {
            CephError::Call { errno, .. } | CephError::MonCommand { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The errno as an `io::Error` (its kind and text).
    pub fn io_error(&self) -> Option<io::Error> {
        self.errno().map(io::Error::from_raw_os_error)
    }

    /// ENOENT: no such object, image, snapshot, lock or locker.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }

    /// EEXIST: it exists already (an exclusive create; the same owner
    /// locking again without the renew flag).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// EBUSY: a lock held by another owner; a protected snapshot.
    pub fn is_busy(&self) -> bool {
        self.errno() == Some(libc::EBUSY)
    }

    /// ECANCELED: a write op's comparison failed; nothing of it applied.
    pub fn is_compare_failed(&self) -> bool {
        self.errno() == Some(libc::ECANCELED)
    }

    /// ESHUTDOWN: this client instance is blocklisted (fenced).
    pub fn is_blocklisted(&self) -> bool {
        self.errno() == Some(EBLOCKLISTED)
    }

    /// EPERM or EACCES: the cephx identity may not do this.
    pub fn is_denied(&self) -> bool {
        matches!(self.errno(), Some(libc::EPERM | libc::EACCES))
    }

    /// ENODATA: no such xattr.
    pub fn is_no_data(&self) -> bool {
        self.errno() == Some(libc::ENODATA)
    }

    /// The libraries are not installed (or too old).
    pub fn is_missing_library(&self) -> bool {
        matches!(self, CephError::Load(_))
    }
}

/// A negative return code as a `Call` error; non-negative is success.
pub(crate) fn check(rc: i64, op: &'static str, target: impl FnOnce() -> String) -> Result<u64> {
    if rc < 0 {
        let errno = i32::try_from(-rc).unwrap_or(libc::EIO);
        Err(CephError::Call {
            op,
            target: target(),
            errno,
        })
    } else {
        Ok(rc as u64)
    }
}

fn errno_text(errno: &i32) -> String {
    // io::Error's text carries " (os error N)": keep the strerror part.
    let text = io::Error::from_raw_os_error(*errno).to_string();
    match text.rfind(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// The symbolic name of the errnos Ceph returns to a client.
pub fn errno_name(errno: &i32) -> String {
    let name = match *errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EDQUOT => "EDQUOT",
        libc::ECANCELED => "ECANCELED",
        other => return format!("errno {other}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(errno: i32) -> CephError {
        CephError::Call {
            op: "lock_exclusive",
            target: "backy.job.vm1 lock lease".into(),
            errno,
        }
    }

    #[test]
    fn kinds_follow_the_errno() {
        type Kind = fn(&CephError) -> bool;
        let cases: [(i32, Kind); 7] = [
            (libc::ENOENT, CephError::is_not_found),
            (libc::EEXIST, CephError::is_exists),
            (libc::EBUSY, CephError::is_busy),
            (libc::ECANCELED, CephError::is_compare_failed),
            (libc::ESHUTDOWN, CephError::is_blocklisted),
            (libc::EPERM, CephError::is_denied),
            (libc::ENODATA, CephError::is_no_data),
        ];
        for (errno, kind) in cases {
            assert!(kind(&call(errno)), "errno {errno}");
            assert!(!kind(&call(libc::EIO)), "EIO is not errno {errno}'s kind");
        }
        assert_eq!(call(108).io_error().map(|e| e.raw_os_error()), Some(Some(108)));
    }

    #[test]
    fn messages_name_the_call_the_target_and_the_errno() {
        assert_eq!(
            call(libc::EBUSY).to_string(),
            "lock_exclusive backy.job.vm1 lock lease: Device or resource busy (EBUSY)"
        );
        assert_eq!(
            call(libc::ESHUTDOWN).to_string(),
            "lock_exclusive backy.job.vm1 lock lease: Cannot send after transport endpoint shutdown (ESHUTDOWN)"
        );
        assert_eq!(errno_name(&4095), "errno 4095");
    }

    #[test]
    fn check_passes_counts_and_types_errors() {
        assert_eq!(check(7, "read", || "o".into()).unwrap(), 7);
        let err = check(-125, "operate", || "o".into()).unwrap_err();
        assert!(err.is_compare_failed());
    }
}
