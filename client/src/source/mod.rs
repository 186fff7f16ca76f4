//! Where a push reads from: a point-in-time disk image, read block by block
//! in a blocking thread.
//!
//! [`Source`] is what the scanner needs from any kind of source. Image files
//! and block devices are read whole (skipping holes where the filesystem
//! reports them); sources that know their own changes since the parent's
//! snapshot (Ceph RBD diffs, QEMU dirty bitmaps) report them through
//! [`Source::changed_extents`] so only those blocks are read.

pub mod block;
pub mod file;
pub mod hooks;
pub mod page_cache;
pub mod process;
pub mod qemu;
pub mod rbd;
pub mod rbd_nbd;

use backy_common::ranges::Extent;
use backy_common::source::SourceSpec;
use backy_common::{Error, Result};
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

/// A disk image to back up.
pub trait Source: Send {
    /// The source type recorded in the revision (`file`, `block`, ...).
    fn kind(&self) -> &'static str;

    /// Source-side snapshot the data comes from; empty when there is none.
    fn snapshot(&self) -> &str {
        ""
    }

    /// Image size in bytes.
    fn size(&self) -> u64;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// The first region at or after `offset` that may hold data; `None`
    /// when only holes remain. Bytes outside such regions read as zeros.
    /// A source that cannot tell reports everything as data.
    fn next_data(&mut self, offset: u64) -> Result<Option<Extent>> {
        let size = self.size();
        Ok((offset < size).then(|| Extent {
            offset,
            len: size - offset,
        }))
    }

    /// Whether a block that is partly hole is read region by region, its
    /// holes zero-filled in memory instead of read: for sources whose
    /// [`Source::next_data`] is exact and cheap to ask, and whose holes
    /// cost something to read (a file's: the kernel fills a page of zeros
    /// for each). Others (devices, NBD) read such a block whole.
    fn reads_data_only(&self) -> bool {
        false
    }

    /// A hint that `len` bytes at `offset` are read soon: sources that can
    /// start fetching them in the background do (the default does nothing).
    fn will_need(&mut self, _offset: u64, _len: u64) {}

    /// Extents that may differ from the parent revision's snapshot, when the
    /// source tracks them: every byte outside them equals the parent's, so
    /// only blocks they touch are read and only their bytes inside them are
    /// sent. `None`: unknown, so every block is compared (and sent whole).
    fn changed_extents(&mut self) -> Result<Option<Vec<Extent>>> {
        Ok(None)
    }
}

/// Opens the source a spec names for revision `rev_id` of `job`, running
/// its hooks first: `pre-snapshot` (which may create the snapshot `path`
/// names, e.g. `lvcreate --snapshot`), then `post-snapshot`. `cleanup` runs
/// when the returned source is dropped.
pub fn open(spec: &SourceSpec, job: &str, rev_id: &str) -> Result<Box<dyn Source>> {
    let path = match spec {
        SourceSpec::File { path, .. } | SourceSpec::Block { path, .. } => path,
        SourceSpec::CephRbd { .. } => {
            // Pushes read them as diffs (push::rbd); there is no block access.
            return Err(Error::invalid(
                "a ceph-rbd source cannot be read block by block (only files and block devices can)",
            ));
        }
        SourceSpec::Qemu(_) => {
            // Pushes read them over NBD with their bitmaps (qemu::open).
            return Err(Error::invalid(
                "a qemu source is read by push only (over NBD, from a point-in-time view); compare a restored image instead",
            ));
        }
    };
    if spec.hooks().is_empty() {
        return open_path(path);
    }
    let short = rev_id
        .parse::<backy_common::RevisionId>()
        .map(|id| id.short())
        .unwrap_or_else(|_| rev_id.to_string());
    let env = vec![
        ("BACKY_JOB".to_string(), job.to_string()),
        ("BACKY_REVISION".to_string(), short),
        ("BACKY_SOURCE".to_string(), path.display().to_string()),
    ];
    let mut hooks = hooks::HookRunner::new(spec.hooks(), env);
    hooks.pre_snapshot()?;
    hooks.post_snapshot()?;
    let inner = open_path(path)?;
    Ok(Box::new(Hooked { inner, _hooks: hooks }))
}

/// A source read between its hooks; dropping it runs `cleanup`.
struct Hooked {
    inner: Box<dyn Source>,
    _hooks: hooks::HookRunner,
}

impl Source for Hooked {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn snapshot(&self) -> &str {
        self.inner.snapshot()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn next_data(&mut self, offset: u64) -> Result<Option<Extent>> {
        self.inner.next_data(offset)
    }

    fn reads_data_only(&self) -> bool {
        self.inner.reads_data_only()
    }

    fn will_need(&mut self, offset: u64, len: u64) {
        self.inner.will_need(offset, len)
    }

    fn changed_extents(&mut self) -> Result<Option<Vec<Extent>>> {
        self.inner.changed_extents()
    }
}

/// Opens a path as what it is: a regular file or a block device.
pub fn open_path(path: &Path) -> Result<Box<dyn Source>> {
    let file = File::open(path).map_err(|e| Error::io(format!("opening source {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading source {}", path.display()), e))?;
    let kind = meta.file_type();
    if kind.is_file() {
        Ok(Box::new(file::FileSource::new(file, path, meta.len())))
    } else if kind.is_block_device() {
        Ok(Box::new(block::BlockSource::new(file, path)?))
    } else {
        Err(Error::invalid(format!(
            "source {} is neither a regular file nor a block device",
            path.display()
        )))
    }
}

/// Whether a command-line source path is a block device (for
/// [`SourceSpec::from_cli`]).
pub fn is_block_device(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// One positioned read of a whole buffer; a short read means the source
/// shrank under us.
fn pread_exact(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::precondition(format!(
                "source {} ended before offset {}: did it shrink while being read?",
                path.display(),
                offset + buf.len() as u64
            ))
        } else {
            Error::io(format!("reading source {} at offset {offset}", path.display()), e)
        }
    })
}

/// An in-memory source with holes and known changes, for tests of
/// everything above the source.
#[cfg(test)]
pub mod mem {
    use super::*;

    pub struct MemSource {
        pub data: Vec<u8>,
        /// Regions that hold data; everything else is a hole (reads zero).
        /// `None`: all data.
        pub regions: Option<Vec<Extent>>,
        pub changed: Option<Vec<Extent>>,
        /// [`Source::reads_data_only`].
        pub data_only: bool,
        /// Offsets read, to check holes are skipped.
        pub reads: Vec<u64>,
    }

    impl MemSource {
        pub fn new(data: Vec<u8>) -> Self {
            MemSource {
                data,
                regions: None,
                changed: None,
                data_only: false,
                reads: Vec::new(),
            }
        }
    }

    impl Source for MemSource {
        fn kind(&self) -> &'static str {
            "mem"
        }

        fn size(&self) -> u64 {
            self.data.len() as u64
        }

        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.reads.push(offset);
            let start = offset as usize;
            let src = self
                .data
                .get(start..start + buf.len())
                .ok_or_else(|| Error::internal("read beyond the end"))?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn next_data(&mut self, offset: u64) -> Result<Option<Extent>> {
            let Some(regions) = &self.regions else {
                let size = self.size();
                return Ok((offset < size).then(|| Extent {
                    offset,
                    len: size - offset,
                }));
            };
            Ok(regions.iter().find(|r| r.end() > offset).map(|r| {
                let start = r.offset.max(offset);
                Extent {
                    offset: start,
                    len: r.end() - start,
                }
            }))
        }

        fn reads_data_only(&self) -> bool {
            self.data_only
        }

        fn changed_extents(&mut self) -> Result<Option<Vec<Extent>>> {
            Ok(self.changed.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::source::Hooks;
    use backy_common::ErrorKind;

    #[test]
    fn refuses_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("snap.img");
        let log = dir.path().join("log");
        let hooked = SourceSpec::File {
            path: img.clone(),
            hooks: Hooks {
                pre_snapshot: Some(format!(
                    "echo $BACKY_JOB > {}; truncate -s 4096 {}",
                    log.display(),
                    img.display()
                )),
                cleanup: Some(format!("rm {}", img.display())),
                ..Hooks::default()
            },
        };
        let src = open(&hooked, "vm1", "x").unwrap();
        assert_eq!(src.size(), 4096);
        assert!(img.exists());
        drop(src);
        assert!(!img.exists(), "cleanup ran");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "vm1\n");

        let e = open_path(Path::new("/dev/null")).err().unwrap();
        assert!(e.message.contains("neither a regular file"), "{}", e.message);
        let e = open_path(Path::new("/nonexistent/disk.img")).err().unwrap();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(!is_block_device("/nonexistent"));
    }

    /// A source that records the hints it gets.
    struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>);

    impl Source for Recorder {
        fn kind(&self) -> &'static str {
            "file"
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&mut self, _: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn will_need(&mut self, offset: u64, len: u64) {
            self.0.lock().unwrap().push((offset, len));
        }
    }

    #[test]
    fn hooked_sources_pass_read_ahead_hints_on() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut hooked = Hooked {
            inner: Box::new(Recorder(seen.clone())),
            _hooks: hooks::HookRunner::new(&Hooks::default(), Vec::new()),
        };
        hooked.will_need(4096, 8192);
        assert_eq!(*seen.lock().unwrap(), [(4096, 8192)]);
    }
}
