//! Making a new revision's image from its parent: a reflink clone where the
//! filesystem shares extents (btrfs, XFS, ZFS ≥ 2.2), else a sparse copy.

use backy_common::revision::StorageMode;
use backy_common::{Error, Result};
use rustix::fs::SeekFrom;
use rustix::io::Errno;
use std::fs::File;
use std::os::fd::AsFd;

/// Clones `src` into the empty file `dst`; returns how.
pub fn clone_or_copy(src: &File, dst: &File) -> Result<StorageMode> {
    match rustix::fs::ioctl_ficlone(dst, src) {
        Ok(()) => Ok(StorageMode::Reflink),
        Err(e) if reflink_unsupported(e) => {
            sparse_copy(src, dst)?;
            Ok(StorageMode::Copy)
        }
        Err(e) => Err(Error::io("cloning parent revision", e.into())),
    }
}

/// Errors by which a filesystem says "no reflinks here".
fn reflink_unsupported(e: Errno) -> bool {
    [
        Errno::OPNOTSUPP,
        Errno::INVAL,
        Errno::XDEV,
        Errno::NOTTY,
        Errno::PERM,
        Errno::NOSYS,
    ]
    .contains(&e)
}

/// Copies only the data segments of `src` (found with SEEK_DATA/SEEK_HOLE),
/// so holes stay holes, using `copy_file_range` (in-kernel, no user copy).
pub fn sparse_copy(src: &File, dst: &File) -> Result<()> {
    let len = src
        .metadata()
        .map_err(|e| Error::io("reading parent size", e))?
        .len();
    dst.set_len(len)
        .map_err(|e| Error::io("sizing new revision", e))?;
    sparse_copy_range(src, dst, 0, len)
}

/// Copies the data segments of `src` within `start..end` to the same
/// offsets of `dst`, which must be a hole there. On btrfs and XFS the
/// kernel turns `copy_file_range` into a reflink, so the data is shared.
pub fn sparse_copy_range(src: &File, dst: &File, start: u64, end: u64) -> Result<()> {
    let mut pos = start;
    while pos < end {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) if d < end => d,
            Ok(_) | Err(Errno::NXIO) => break, // no data after pos
            Err(e) => return Err(Error::io("seeking data in parent", e.into())),
        };
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))
            .map_err(|e| Error::io("seeking hole in parent", e.into()))?
            .min(end);
        copy_range(src, dst, data, hole - data)?;
        pos = hole;
    }
    Ok(())
}

fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = offset + done;
        let mut off_out = offset + done;
        let want = (len - done).min(1 << 30) as usize;
        let n = rustix::fs::copy_file_range(
            src.as_fd(),
            Some(&mut off_in),
            dst.as_fd(),
            Some(&mut off_out),
            want,
        )
        .map_err(|e| Error::io("copying parent data", e.into()))?;
        if n == 0 {
            return Err(Error::internal("parent revision shrank while being copied"));
        }
        done += n as u64;
    }
    Ok(())
}
