//! A file's extent data items as btrfs stores them, for the bytes its data
//! takes on disk after compression (counted by `backy_common::ondisk`;
//! docs/DESIGN.md, "Space"). FIEMAP reports logical lengths only; the
//! on-disk size of a compressed extent is in the file's EXTENT_DATA items
//! of the subvolume tree, which `BTRFS_IOC_TREE_SEARCH_V2` returns (as
//! `compsize` reads them). The tree search needs CAP_SYS_ADMIN; without it,
//! or off btrfs, the filesystem cannot tell and the answer is `None`.

use super::JobDir;
use backy_common::ondisk::{DataItem, OnDisk};
use backy_common::{Error, Result, RevisionId};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `BTRFS_SUPER_MAGIC` (linux/magic.h).
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// `BTRFS_IOC_TREE_SEARCH_V2`: `_IOWR(0x94, 17, struct
/// btrfs_ioctl_search_args_v2)` (linux/btrfs.h), 112 bytes.
const BTRFS_IOC_TREE_SEARCH_V2: u32 = 0xC070_9411;
/// `BTRFS_EXTENT_DATA_KEY` (linux/btrfs_tree.h).
const EXTENT_DATA_KEY: u32 = 108;
/// Result buffer per ioctl: many items, and far more than one item (an
/// inline one is at most a sector) needs.
const BUF_BYTES: usize = 64 * 1024;

/// `struct btrfs_ioctl_search_key`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: [u64; 4],
}

/// `struct btrfs_ioctl_search_args_v2` with a [`BUF_BYTES`] buffer.
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf_size: u64,
    buf: [u64; BUF_BYTES / 8],
}

const _: () = assert!(std::mem::size_of::<SearchKey>() == 104);
const _: () = assert!(std::mem::size_of::<SearchArgs>() == 112 + BUF_BYTES);

/// `struct btrfs_ioctl_search_header`: transid, objectid, offset (u64),
/// type, len (u32), in host byte order.
const HEADER_BYTES: usize = 32;
/// `struct btrfs_file_extent_item` (packed, little-endian): the bytes up
/// to and including `type`; inline data follows them.
const ITEM_HEAD_BYTES: usize = 21;
/// ... and with `disk_bytenr`, `disk_num_bytes`, `offset`, `num_bytes`.
const ITEM_REG_BYTES: usize = 53;

/// The extent data items of the file at `path`; `None` when the
/// filesystem cannot tell (not btrfs, or no right to search its trees).
pub fn data_items(path: &Path) -> Result<Option<Vec<DataItem>>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {} to read its extents", path.display()), e))?;
    let fs = rustix::fs::fstatfs(&file)
        .map_err(|e| Error::io(format!("statfs of {}", path.display()), e.into()))?;
    if !is_btrfs(&fs) {
        return Ok(None);
    }
    let ino = file
        .metadata()
        .map_err(|e| Error::io(format!("stat of {}", path.display()), e))?
        .ino();
    let mut args = Box::new(SearchArgs {
        key: SearchKey::default(),
        buf_size: 0,
        buf: [0; BUF_BYTES / 8],
    });
    let mut items = Vec::new();
    let mut next_offset = 0u64;
    loop {
        args.key = SearchKey {
            // 0: the subvolume `file` is in.
            tree_id: 0,
            min_objectid: ino,
            max_objectid: ino,
            min_offset: next_offset,
            max_offset: u64::MAX,
            min_transid: 0,
            max_transid: u64::MAX,
            min_type: EXTENT_DATA_KEY,
            max_type: EXTENT_DATA_KEY,
            nr_items: u32::MAX,
            ..SearchKey::default()
        };
        args.buf_size = BUF_BYTES as u64;
        // SAFETY: `args` is a `struct btrfs_ioctl_search_args_v2` whose
        // buffer holds `buf_size` bytes, all the kernel writes; `file` is
        // open.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                BTRFS_IOC_TREE_SEARCH_V2 as _,
                &mut *args as *mut SearchArgs,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES | libc::ENOTTY | libc::EOPNOTSUPP) => Ok(None),
                _ => Err(Error::io(
                    format!("searching the extents of {}", path.display()),
                    e,
                )),
            };
        }
        // SAFETY: the buffer is plain bytes; u64 has no invalid values.
        let buf: &[u8] = unsafe { std::slice::from_raw_parts(args.buf.as_ptr().cast::<u8>(), BUF_BYTES) };
        let found = args.key.nr_items;
        let last = parse(buf, found, ino, &mut items).map_err(|what| {
            Error::io(
                format!("reading the extents of {}", path.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidData, what),
            )
        })?;
        match last {
            Some(offset) if offset < u64::MAX => next_offset = offset + 1,
            _ => return Ok(Some(items)),
        }
    }
}

#[allow(clippy::unnecessary_cast)] // f_type's width differs by target.
/// Whether `path` lies on btrfs (`false` when that cannot be told: its
/// files' data then cannot be read either).
pub fn on_btrfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|fs| is_btrfs(&fs))
}

// `f_type` is i64 here, narrower on other targets.
#[allow(clippy::unnecessary_cast)]
fn is_btrfs(fs: &rustix::fs::StatFs) -> bool {
    fs.f_type as i64 == BTRFS_SUPER_MAGIC
}

/// The on-disk data of one revision's files (image, manifest, metadata);
/// `None` when the filesystem cannot tell.
pub fn revision_on_disk(job: &JobDir, id: &RevisionId) -> Result<Option<OnDisk>> {
    let mut items = Vec::new();
    for path in [job.image_path(id), job.digests_path(id), job.rev_path(id)] {
        match data_items(&path)? {
            Some(i) => items.extend(i),
            None => return Ok(None),
        }
    }
    Ok(Some(OnDisk::of(items)))
}

/// Reads `found` items from `buf` into `items`; the key offset of the last
/// one, `None` when there was none. Every length is checked against the
/// buffer; an item not of the file or of another type is a kernel answer
/// this code does not understand, and an error.
fn parse(
    buf: &[u8],
    found: u32,
    ino: u64,
    items: &mut Vec<DataItem>,
) -> std::result::Result<Option<u64>, String> {
    let mut pos = 0usize;
    let mut last = None;
    for _ in 0..found {
        let header = buf
            .get(pos..pos + HEADER_BYTES)
            .ok_or("search header past the buffer")?;
        let u64_at = |b: &[u8], at: usize| -> u64 {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_ne_bytes(a)
        };
        let objectid = u64_at(header, 8);
        let offset = u64_at(header, 16);
        let kind = u32::from_ne_bytes([header[24], header[25], header[26], header[27]]);
        let len = u32::from_ne_bytes([header[28], header[29], header[30], header[31]]) as usize;
        let start = pos + HEADER_BYTES;
        let item = buf
            .get(start..start.checked_add(len).ok_or("item length overflows")?)
            .ok_or("extent item past the buffer")?;
        if objectid != ino || kind != EXTENT_DATA_KEY {
            return Err(format!("unexpected item {objectid}/{kind} in the search"));
        }
        items.push(data_item(item)?);
        last = Some(offset);
        pos = start + len;
    }
    Ok(last)
}

/// One `struct btrfs_file_extent_item`.
fn data_item(item: &[u8]) -> std::result::Result<DataItem, String> {
    let le64 = |at: usize| -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&item[at..at + 8]);
        u64::from_le_bytes(a)
    };
    if item.len() < ITEM_HEAD_BYTES {
        return Err(format!("extent item of {} bytes", item.len()));
    }
    let compressed = item[16] != 0;
    match item[20] {
        // BTRFS_FILE_EXTENT_INLINE
        0 => Ok(DataItem::Inline {
            disk: (item.len() - ITEM_HEAD_BYTES) as u64,
            compressed,
        }),
        // BTRFS_FILE_EXTENT_REG, BTRFS_FILE_EXTENT_PREALLOC
        1 | 2 if item.len() >= ITEM_REG_BYTES => Ok(DataItem::Extent {
            bytenr: le64(21),
            disk: le64(29),
            compressed,
        }),
        kind => Err(format!("extent item of type {kind} and {} bytes", item.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ino: u64, offset: u64, kind: u32, len: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&7u64.to_ne_bytes());
        h.extend_from_slice(&ino.to_ne_bytes());
        h.extend_from_slice(&offset.to_ne_bytes());
        h.extend_from_slice(&kind.to_ne_bytes());
        h.extend_from_slice(&len.to_ne_bytes());
        h
    }

    fn regular(bytenr: u64, disk: u64, compression: u8) -> Vec<u8> {
        let mut i = vec![0u8; ITEM_REG_BYTES];
        i[16] = compression;
        i[20] = 1;
        i[21..29].copy_from_slice(&bytenr.to_le_bytes());
        i[29..37].copy_from_slice(&disk.to_le_bytes());
        i
    }

    #[test]
    fn items_are_read_and_every_length_checked() {
        let mut buf = header(5, 0, EXTENT_DATA_KEY, ITEM_REG_BYTES as u32);
        buf.extend(regular(1 << 20, 4096, 3));
        let mut inline = vec![0u8; ITEM_HEAD_BYTES + 10];
        inline[20] = 0;
        buf.extend(header(5, 131072, EXTENT_DATA_KEY, inline.len() as u32));
        buf.extend(inline);
        let mut items = Vec::new();
        assert_eq!(parse(&buf, 2, 5, &mut items), Ok(Some(131072)));
        assert_eq!(
            items,
            [
                DataItem::Extent {
                    bytenr: 1 << 20,
                    disk: 4096,
                    compressed: true
                },
                DataItem::Inline {
                    disk: 10,
                    compressed: false
                }
            ]
        );
        // More items claimed than the buffer holds; a length past it; a
        // short regular item; another inode's item.
        assert!(parse(&buf, 3, 5, &mut Vec::new()).is_err());
        let mut long = header(5, 0, EXTENT_DATA_KEY, u32::MAX);
        long.extend(regular(1, 1, 0));
        assert!(parse(&long, 1, 5, &mut Vec::new()).is_err());
        let mut short = header(5, 0, EXTENT_DATA_KEY, 30);
        short.extend(&regular(1, 1, 0)[..30]);
        assert!(parse(&short, 1, 5, &mut Vec::new()).is_err());
        assert!(parse(&buf, 1, 6, &mut Vec::new()).is_err());
        assert_eq!(parse(&[], 0, 5, &mut Vec::new()), Ok(None));
    }

    #[test]
    fn off_btrfs_the_filesystem_cannot_tell() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let on_btrfs = rustix::fs::statfs(dir.path()).is_ok_and(|s| is_btrfs(&s));
        if !on_btrfs {
            assert_eq!(data_items(&path).unwrap(), None);
        }
    }
}
