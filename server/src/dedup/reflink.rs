//! STUB (replaced by the dedup-index branch).
use backy_common::{Error, Result};
use std::fs::File;
use std::os::fd::AsRawFd;

#[repr(C)]
struct CloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

pub fn clone_range(src: &File, src_offset: u64, len: u64, dst: &File, dst_offset: u64) -> Result<()> {
    let arg = CloneRange {
        src_fd: src.as_raw_fd() as i64,
        src_offset,
        src_length: len,
        dest_offset: dst_offset,
    };
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE as _, &arg) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::EINVAL | libc::EXDEV | libc::ENOTTY)
        ) {
            return Err(Error::precondition("unsupported"));
        }
        return Err(Error::io("cloning a range", e));
    }
    Ok(())
}

pub fn unsupported(e: &Error) -> bool {
    e.kind == backy_common::ErrorKind::FailedPrecondition
}

pub enum DedupeOutcome {
    Deduped(u64),
    Differs,
    Unsupported,
}

pub fn dedupe_range(
    _src: &File,
    _src_offset: u64,
    _len: u64,
    _dst: &File,
    _dst_offset: u64,
) -> Result<DedupeOutcome> {
    Ok(DedupeOutcome::Unsupported)
}
