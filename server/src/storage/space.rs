//! What revisions take on disk: the extents of their files (FIEMAP, whose
//! shared flag btrfs and XFS set), counted by `backy_common::space`, and
//! the store filesystem's used bytes (statvfs). docs/DESIGN.md, "Space".

use super::JobDir;
use backy_common::space::{flags, Extent, FilesSpace};
use backy_common::{Error, Result, RevisionId};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Extents asked for per ioctl.
const BATCH: usize = 512;
/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)` (linux/fs.h).
const FS_IOC_FIEMAP: u32 = 0xC020_660B;

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// `struct fiemap` with room for [`BATCH`] extents.
#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; BATCH],
}

/// Every extent of the file at `path`; `None` when its filesystem has no
/// FIEMAP (tmpfs, NFS...).
pub fn file_extents(path: &Path) -> Result<Option<Vec<Extent>>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {} to map its extents", path.display()), e))?;
    let mut map = Box::new(Fiemap {
        start: 0,
        length: 0,
        flags: 0,
        mapped_extents: 0,
        extent_count: 0,
        reserved: 0,
        extents: [FiemapExtent::default(); BATCH],
    });
    let mut out = Vec::new();
    loop {
        map.length = u64::MAX - map.start;
        map.flags = 0;
        map.mapped_extents = 0;
        map.extent_count = BATCH as u32;
        // SAFETY: `map` is a `struct fiemap` with room for `extent_count`
        // extents, which is all the kernel writes; `file` is open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *map as *mut Fiemap) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::ENOTTY) => Ok(None),
                _ => Err(Error::io(format!("mapping the extents of {}", path.display()), e)),
            };
        }
        let mapped = (map.mapped_extents as usize).min(BATCH);
        let got = &map.extents[..mapped];
        out.extend(got.iter().map(|e| Extent {
            physical: e.physical,
            length: e.length,
            flags: e.flags,
        }));
        match got.last() {
            Some(last) if last.flags & flags::LAST == 0 => {
                map.start = last.logical.saturating_add(last.length);
                if map.start == u64::MAX {
                    return Ok(Some(out));
                }
            }
            _ => return Ok(Some(out)),
        }
    }
}

/// One extent of a file as FIEMAP maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// The extents of `file` over `start..start+len`, clipped to that range
/// and given relative to `start` (so two files' ranges compare directly);
/// `None` without FIEMAP. Bounded: one batch of extents, which is plenty
/// for the ranges of one block that callers ask for; more reads as
/// "unknown" (`None`).
pub fn range_extents(file: &std::fs::File, start: u64, len: u64) -> Result<Option<Vec<Mapped>>> {
    let mut map = Box::new(Fiemap {
        start,
        length: len,
        flags: 0,
        mapped_extents: 0,
        extent_count: BATCH as u32,
        reserved: 0,
        extents: [FiemapExtent::default(); BATCH],
    });
    // SAFETY: as in `file_extents`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *map as *mut Fiemap) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOTTY) => Ok(None),
            _ => Err(Error::io("mapping the extents of a block", e)),
        };
    }
    let mapped = (map.mapped_extents as usize).min(BATCH);
    if mapped == BATCH {
        return Ok(None);
    }
    let end = start.saturating_add(len);
    Ok(Some(
        map.extents[..mapped]
            .iter()
            .filter(|e| e.logical < end && e.logical.saturating_add(e.length) > start)
            .map(|e| {
                let from = e.logical.max(start);
                let to = e.logical.saturating_add(e.length).min(end);
                Mapped {
                    logical: from - start,
                    physical: e.physical.saturating_add(from - e.logical),
                    length: to - from,
                    flags: e.flags & !flags::LAST,
                }
            })
            .collect(),
    ))
}

/// The space of one revision's files (image, manifest, metadata); `None`
/// when the filesystem cannot tell.
pub fn revision_space(job: &JobDir, id: &RevisionId) -> Result<Option<FilesSpace>> {
    let mut extents = Vec::new();
    for path in [job.image_path(id), job.digests_path(id), job.rev_path(id)] {
        match file_extents(&path)? {
            Some(e) => extents.extend(e),
            None => return Ok(None),
        }
    }
    Ok(Some(FilesSpace::of(extents)))
}

/// The store filesystem's size and used bytes (as `df` counts them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreSpace {
    pub size: u64,
    pub used: u64,
}

pub fn store_space(base: &Path) -> Result<StoreSpace> {
    let st = rustix::fs::statvfs(base)
        .map_err(|e| Error::io(format!("statvfs of {}", base.display()), e.into()))?;
    let frsize = st.f_frsize;
    Ok(StoreSpace {
        size: st.f_blocks.saturating_mul(frsize),
        used: st.f_blocks.saturating_sub(st.f_bfree).saturating_mul(frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_file_written_in_two_places_has_two_extents_of_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::File::create(&path).unwrap();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        f.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
        f.sync_all().unwrap();
        // Whatever filesystem the temp dir is on: FIEMAP or honestly none.
        if let Some(extents) = file_extents(&path).unwrap() {
            let space = FilesSpace::of(extents);
            assert_eq!(space.total, 16384, "{space:?}");
            assert_eq!(space.exclusive, 16384);
        }
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = file_extents(&dir.path().join("gone")).unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
