//! Sharing a range of one file with another: `FICLONERANGE` (the data
//! becomes the source's) and `FIDEDUPERANGE` (the kernel compares the two
//! ranges under its locks and shares them only if equal), on btrfs, XFS
//! and others with reflinks. Elsewhere both say [`unsupported`] and the
//! caller writes the bytes itself.

use backy_common::{Error, Result};
use std::fs::File;
use std::os::fd::AsRawFd;

/// `FICLONERANGE`: `_IOW(0x94, 13, struct file_clone_range)` (linux/fs.h).
const FICLONERANGE: u32 = 0x4020_940D;
/// `FIDEDUPERANGE`: `_IOWR(0x94, 54, struct file_dedupe_range)`; the size
/// in the number is that of the header without its array.
const FIDEDUPERANGE: u32 = 0xC018_9436;
/// `FILE_DEDUPE_RANGE_DIFFERS` (linux/fs.h); 0 is `..._SAME`.
const DEDUPE_DIFFERS: i32 = 1;
/// Bytes asked for per `FIDEDUPERANGE`: btrfs caps one call at 16 MiB and
/// reports what it did in `bytes_deduped`; the loop goes on from there.
const DEDUPE_CHUNK: u64 = 16 << 20;

/// `struct file_clone_range`.
#[repr(C)]
struct CloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}
const _: () = assert!(std::mem::size_of::<CloneRange>() == 32);

/// `struct file_dedupe_range_info`.
#[repr(C)]
#[derive(Default)]
struct DedupeInfo {
    dest_fd: i64,
    dest_offset: u64,
    bytes_deduped: u64,
    status: i32,
    reserved: u32,
}
const _: () = assert!(std::mem::size_of::<DedupeInfo>() == 32);

/// `struct file_dedupe_range` with one destination.
#[repr(C)]
#[derive(Default)]
struct DedupeRange {
    src_offset: u64,
    src_length: u64,
    dest_count: u16,
    reserved1: u16,
    reserved2: u32,
    info: [DedupeInfo; 1],
}
const _: () = assert!(std::mem::size_of::<DedupeRange>() == 24 + 32);
const _: () = assert!(FIDEDUPERANGE >> 16 & 0x3FFF == 24);
const _: () = assert!(FICLONERANGE >> 16 & 0x3FFF == 32);

/// Errors by which a filesystem or a pair of files says "no sharing here":
/// no reflinks (`EOPNOTSUPP`, `ENOTTY`, `ENOSYS`), another filesystem
/// (`EXDEV`), offsets or length not on the filesystem's block size or
/// files of another kind (`EINVAL`), an immutable or swap file (`EPERM`,
/// `ETXTBSY`).
pub fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EOPNOTSUPP
                | libc::ENOTTY
                | libc::ENOSYS
                | libc::EXDEV
                | libc::EINVAL
                | libc::EPERM
                | libc::ETXTBSY
        )
    )
}

/// Makes `dst[dst_offset..+len]` share the extents of
/// `src[src_offset..+len]`, whatever `dst` held there. The error is the
/// kernel's; see [`unsupported`].
pub fn clone_range(
    src: &File,
    src_offset: u64,
    len: u64,
    dst: &File,
    dst_offset: u64,
) -> std::io::Result<()> {
    let arg = CloneRange {
        src_fd: src.as_raw_fd() as i64,
        src_offset,
        src_length: len,
        dest_offset: dst_offset,
    };
    // SAFETY: `arg` is a `struct file_clone_range`, read only; both files
    // are open.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE as _, &arg as *const CloneRange) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What [`dedupe_range`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DedupeOutcome {
    /// The ranges were equal and now share these many bytes of extents.
    Deduped(u64),
    /// The ranges' bytes differ (a stale hint, or a concurrent change):
    /// nothing after the difference was shared.
    Differs,
    /// The filesystem or these files cannot share (see [`unsupported`]).
    Unsupported,
}

/// Shares `src[src_offset..+len]` into `dst[dst_offset..+len]` if, and
/// only if, the kernel finds their bytes equal (it compares under its own
/// locks, so a concurrent write or a wrong hint cannot slip in). `dst`
/// must be open for writing (or owned by the caller).
pub fn dedupe_range(
    src: &File,
    src_offset: u64,
    len: u64,
    dst: &File,
    dst_offset: u64,
) -> Result<DedupeOutcome> {
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(DEDUPE_CHUNK);
        let mut arg = DedupeRange {
            src_offset: src_offset + done,
            src_length: want,
            dest_count: 1,
            info: [DedupeInfo {
                dest_fd: dst.as_raw_fd() as i64,
                dest_offset: dst_offset + done,
                ..DedupeInfo::default()
            }],
            ..DedupeRange::default()
        };
        // SAFETY: `arg` is a `struct file_dedupe_range` with room for its
        // one `dest_count` info, which is all the kernel writes; both
        // files are open.
        let rc = unsafe { libc::ioctl(src.as_raw_fd(), FIDEDUPERANGE as _, &mut arg as *mut DedupeRange) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return if unsupported(&e) {
                Ok(DedupeOutcome::Unsupported)
            } else {
                Err(Error::io("sharing equal blocks (FIDEDUPERANGE)", e))
            };
        }
        let info = &arg.info[0];
        match info.status {
            DEDUPE_DIFFERS => return Ok(DedupeOutcome::Differs),
            s if s < 0 => {
                let e = std::io::Error::from_raw_os_error(-s);
                return if unsupported(&e) {
                    Ok(DedupeOutcome::Unsupported)
                } else {
                    Err(Error::io("sharing equal blocks (FIDEDUPERANGE)", e))
                };
            }
            _ if info.bytes_deduped == 0 || info.bytes_deduped > want => {
                return Err(Error::internal(format!(
                    "FIDEDUPERANGE reported {} of {want} bytes shared",
                    info.bytes_deduped
                )))
            }
            _ => done += info.bytes_deduped,
        }
    }
    Ok(DedupeOutcome::Deduped(done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.sync_all().unwrap();
        f
    }

    /// On whatever filesystem the temp dir is: shared where it can share
    /// (and then only equal bytes), honestly unsupported where not; the
    /// end-to-end tests (tests/tests/dedup_store.rs) run both on btrfs and
    /// XFS.
    #[test]
    fn equal_ranges_are_shared_or_unsupported_and_different_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        // Past btrfs's 16 MiB per call, ending short of a page at both
        // files' ends (an image's last block).
        let block: Vec<u8> = (0..(17 << 20) + 100).map(|i: u32| (i / 4096) as u8).collect();
        let a = file(dir.path(), "a", &block);
        let b = file(dir.path(), "b", &block);
        let mut other = block.clone();
        other[(16 << 20) + 12345] ^= 1;
        let c = file(dir.path(), "c", &other);
        let same = dedupe_range(&a, 0, block.len() as u64, &b, 0).unwrap();
        #[allow(clippy::unnecessary_cast)] // f_type's width differs by target.
        let kind = rustix::fs::fstatfs(&a).unwrap().f_type as i64;
        // btrfs, XFS: they share (TMPDIR=a mount of either to see it).
        if [0x9123_683E, 0x5846_5342].contains(&kind) {
            assert_eq!(same, DedupeOutcome::Deduped(block.len() as u64));
        }
        assert!(
            matches!(same, DedupeOutcome::Deduped(n) if n == block.len() as u64)
                || same == DedupeOutcome::Unsupported,
            "{same:?}"
        );
        let differs = dedupe_range(&a, 0, block.len() as u64, &c, 0).unwrap();
        if same == DedupeOutcome::Unsupported {
            assert_eq!(differs, DedupeOutcome::Unsupported);
            let e = clone_range(&a, 0, block.len() as u64, &c, 0).unwrap_err();
            assert!(unsupported(&e), "{e}");
        } else {
            assert_eq!(differs, DedupeOutcome::Differs);
            clone_range(&a, 0, block.len() as u64, &c, 0).unwrap();
        }
        let mut back = vec![0u8; block.len()];
        c.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back == block, same != DedupeOutcome::Unsupported);
    }

    #[test]
    fn a_closed_or_foreign_descriptor_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let a = file(dir.path(), "a", b"x");
        let null = File::open("/dev/null").unwrap();
        let e = clone_range(&null, 0, 4096, &a, 0).unwrap_err();
        assert!(e.raw_os_error().is_some(), "{e}");
        let r = dedupe_range(&null, 0, 4096, &a, 0);
        assert!(matches!(r, Ok(DedupeOutcome::Unsupported) | Err(_)), "{r:?}");
    }
}
