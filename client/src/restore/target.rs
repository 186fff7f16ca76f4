//! Where a restore writes: a block device in place, or a sparse file that
//! appears under its name only once it is complete and on disk.

use backy_common::ranges::is_all_zero;
use backy_common::writeback::Flusher;
use backy_common::{Error, Result};
use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tempfile::NamedTempFile;

/// Whether a device holds anything but zeros where data usually is: its
/// first 4 MiB (partition tables, superblocks, LVM labels), its last MiB
/// (GPT backup, RAID superblocks) and 64 samples of 64 KiB spread over the
/// rest. Empty devices read as zeros everywhere, so this asks no `--force`
/// for a new volume and catches one in use.
pub(crate) fn holds_data(file: &File, size: u64) -> std::io::Result<bool> {
    const HEAD: u64 = 4 << 20;
    const TAIL: u64 = 1 << 20;
    const SAMPLE: u64 = 64 << 10;
    const SAMPLES: u64 = 64;
    let mut ranges = vec![(0, HEAD.min(size)), (size.saturating_sub(TAIL), TAIL.min(size))];
    let stride = size / (SAMPLES + 1);
    ranges.extend((1..=SAMPLES).map(|i| (i * stride, SAMPLE.min(size - i * stride))));
    let mut buf = vec![0u8; HEAD as usize];
    for (offset, len) in ranges {
        let buf = &mut buf[..len as usize];
        file.read_exact_at(buf, offset)?;
        if !is_all_zero(buf) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Opens a block device for reading and writing, exclusively: O_EXCL on a
/// block device fails while it is mounted or held by another device (LVM,
/// RAID), so a disk in use is never overwritten.
pub fn open_device(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(16) => Error::busy(format!(
                "{} is in use (mounted or held by another device): not restoring onto it",
                path.display()
            )),
            _ => Error::io(format!("opening {}", path.display()), e),
        })
}

/// The target name for standard output.
pub const STDOUT: &str = "-";

/// Zeros written per call when a device cannot zero a range by itself.
const ZERO_CHUNK: usize = 1 << 20;

/// The canonical absolute path a new file `path` would get: its directory
/// resolved (it must exist), its name kept.
fn resolve_new(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} names no file", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
    Ok(dir.join(name))
}

pub enum Target {
    /// Written in place; every byte of the image is written (zero ranges
    /// too), nothing beyond it is touched.
    Device {
        file: File,
        path: PathBuf,
        zeros: Vec<u8>,
    },
    /// A temporary file next to the target, renamed over it at the end.
    /// Dropping it uncommitted removes it. Written back as it fills, so the
    /// final `fsync` does not wait for the whole image.
    File {
        tmp: NamedTempFile,
        path: PathBuf,
        writeback: Flusher,
    },
    /// Standard output (`-`), written in order, zeros too: for a pipe into
    /// `ssh` or `qemu-img convert`. Never a terminal.
    Stdout {
        out: std::io::BufWriter<File>,
        path: PathBuf,
        position: u64,
        zeros: Vec<u8>,
    },
    /// A Ceph RBD image (`rbd:POOL/IMAGE`), written by `rbd import-diff`.
    Rbd {
        target: Box<super::rbd::RbdTarget>,
        path: PathBuf,
    },
}

impl Target {
    /// Opens the target for an image of `size` bytes. An existing non-empty
    /// file is replaced only with `force`.
    pub fn open(path: &Path, size: u64, force: bool) -> Result<Target> {
        if path.as_os_str() == STDOUT {
            return Self::stdout();
        }
        if let Some(spec) = path.to_str().and_then(|p| p.strip_prefix("rbd:")) {
            return Ok(Target::Rbd {
                target: Box::new(super::rbd::RbdTarget::open(spec, size, force)?),
                path: path.to_path_buf(),
            });
        }
        let meta = match std::fs::metadata(path) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("examining {}", path.display()), e)),
        };
        match meta {
            Some(m) if m.file_type().is_block_device() => Self::device(path, size, force),
            Some(m) if m.is_file() => {
                if m.len() > 0 && !force {
                    return Err(Error::exists(format!(
                        "{} exists and is not empty: give --force to replace it",
                        path.display()
                    )));
                }
                // Replace what a symlink points to, as `dd of=` would.
                let real = std::fs::canonicalize(path)
                    .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
                Self::file(&real, size, Some(&m))
            }
            Some(_) => Err(Error::invalid(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            ))),
            None => {
                // A mistyped device path must not become a file in /dev, also
                // when typed relative to it or through a symlink.
                let real = resolve_new(path)?;
                if real.starts_with("/dev") {
                    return Err(Error::not_found(format!(
                        "{} does not exist (a path under /dev is restored only onto an existing block device)",
                        real.display()
                    )));
                }
                Self::file(&real, size, None)
            }
        }
    }

    fn device(path: &Path, size: u64, force: bool) -> Result<Target> {
        let mut file = open_device(path)?;
        let device_size = crate::source::block::device_size(&mut file, path)?;
        if device_size < size {
            return Err(Error::invalid(format!(
                "{} holds {device_size} bytes, the image needs {size}",
                path.display()
            )));
        }
        if !force
            && holds_data(&file, device_size)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        {
            return Err(Error::exists(format!(
                "{} holds data: give --force to overwrite it",
                path.display()
            )));
        }
        Ok(Target::Device {
            file,
            path: path.to_path_buf(),
            zeros: Vec::new(),
        })
    }

    fn stdout() -> Result<Target> {
        use std::io::IsTerminal;
        use std::os::fd::AsFd;
        let stdout = std::io::stdout();
        if stdout.is_terminal() {
            return Err(Error::invalid(
                "not writing a disk image to a terminal: redirect or pipe standard output, or name a file",
            ));
        }
        let fd = stdout
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating standard output", e))?;
        Ok(Target::Stdout {
            out: std::io::BufWriter::with_capacity(ZERO_CHUNK, File::from(fd)),
            path: PathBuf::from(STDOUT),
            position: 0,
            zeros: Vec::new(),
        })
    }

    /// A file replacing `replaced` (when there is one) gets its owner,
    /// group and mode before any data is fetched, so a restore that cannot
    /// keep them fails at once.
    fn file(path: &Path, size: u64, replaced: Option<&std::fs::Metadata>) -> Result<Target> {
        let name = path
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{} names no file", path.display())))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.backy-restore-", name.to_string_lossy()))
            .rand_bytes(6)
            .tempfile_in(dir)
            .map_err(|e| Error::io(format!("creating a temporary file in {}", dir.display()), e))?;
        // Disk images are private by default (the temporary file is 0600);
        // a replaced file keeps its owner, group and mode (a VM's image is
        // often owned by the hypervisor's user).
        if let Some(old) = replaced {
            use std::os::unix::fs::MetadataExt;
            let ours = tmp
                .as_file()
                .metadata()
                .map_err(|e| Error::io(format!("examining {}", tmp.path().display()), e))?;
            if (ours.uid(), ours.gid()) != (old.uid(), old.gid()) {
                std::os::unix::fs::fchown(tmp.as_file(), Some(old.uid()), Some(old.gid())).map_err(|e| {
                    Error::io(
                        format!(
                            "giving the restored file the owner {}:{} of {} (restore as root, or remove the file first)",
                            old.uid(),
                            old.gid(),
                            path.display()
                        ),
                        e,
                    )
                })?;
            }
            // After chown, which may clear set-id bits.
            tmp.as_file()
                .set_permissions(Permissions::from_mode(old.mode() & 0o7777))
                .map_err(|e| Error::io(format!("setting permissions of {}", tmp.path().display()), e))?;
        }
        // All holes until data arrives: zeros cost no space.
        tmp.as_file()
            .set_len(size)
            .map_err(|e| Error::io(format!("sizing {}", tmp.path().display()), e))?;
        let writeback = Flusher::new(tmp.as_file());
        Ok(Target::File {
            tmp,
            path: path.to_path_buf(),
            writeback,
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Target::Device { path, .. }
            | Target::File { path, .. }
            | Target::Stdout { path, .. }
            | Target::Rbd { path, .. } => path,
        }
    }

    /// Writes a data range. Into a file, all-zero data stays a hole.
    pub fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Target::Device { file, path, .. } => write_at(file, path, offset, data),
            Target::File { .. } if is_all_zero(data) => Ok(()),
            Target::File { tmp, writeback, .. } => {
                write_at(tmp.as_file(), tmp.path(), offset, data)?;
                writeback.wrote(data.len() as u64);
                Ok(())
            }
            Target::Rbd { target, .. } => target.write_data(offset, data),
            Target::Stdout {
                out, position, zeros, ..
            } => {
                stdout_advance(out, position, zeros, offset)?;
                stdout_write(out, position, data)
            }
        }
    }

    /// Makes a range zero: a device's old contents must go; a new file's
    /// holes are zero already.
    pub fn write_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        let (file, path, zeros) = match self {
            Target::Device { file, path, zeros } => (file, path, zeros),
            Target::Rbd { target, .. } => return target.write_zero(offset, len),
            Target::File { .. } => return Ok(()),
            Target::Stdout {
                out, position, zeros, ..
            } => {
                stdout_advance(out, position, zeros, offset)?;
                return stdout_advance(out, position, zeros, offset + len);
            }
        };
        let flags = rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(&*file, flags, offset, len).is_ok() {
            return Ok(());
        }
        // Not supported, or not aligned to the device's sectors: write them.
        if zeros.is_empty() {
            zeros.resize(ZERO_CHUNK, 0);
        }
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(ZERO_CHUNK as u64) as usize;
            write_at(file, path, at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes the restore durable, and for a file puts it in place.
    pub fn commit(self) -> Result<()> {
        match self {
            Target::Rbd { target, .. } => target.commit(),
            Target::Stdout { mut out, .. } => {
                use std::io::Write;
                out.flush()
                    .map_err(|e| Error::io("writing to standard output", e))
            }
            Target::Device { file, path, .. } => file
                .sync_all()
                .map_err(|e| Error::io(format!("flushing {}", path.display()), e)),
            Target::File {
                tmp,
                path,
                mut writeback,
            } => {
                writeback.finish();
                tmp.as_file()
                    .sync_all()
                    .map_err(|e| Error::io(format!("flushing {}", tmp.path().display()), e))?;
                tmp.persist(&path)
                    .map_err(|e| Error::io(format!("renaming the restore to {}", path.display()), e.error))?;
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| Error::io(format!("flushing directory {}", dir.display()), e))
            }
        }
    }
}

/// Writes zeros on standard output up to `offset`. The stream comes in
/// order, so going back is an error (a pipe cannot seek).
fn stdout_advance(
    out: &mut std::io::BufWriter<File>,
    position: &mut u64,
    zeros: &mut Vec<u8>,
    offset: u64,
) -> Result<()> {
    if offset < *position {
        return Err(Error::data_loss(format!(
            "restore stream went back to offset {offset} (at {position}): standard output cannot seek"
        )));
    }
    if offset > *position && zeros.is_empty() {
        zeros.resize(ZERO_CHUNK, 0);
    }
    while *position < offset {
        let n = (offset - *position).min(ZERO_CHUNK as u64) as usize;
        stdout_write(out, position, &zeros[..n])?;
    }
    Ok(())
}

fn stdout_write(out: &mut std::io::BufWriter<File>, position: &mut u64, data: &[u8]) -> Result<()> {
    use std::io::Write;
    out.write_all(data)
        .map_err(|e| Error::io("writing to standard output", e))?;
    *position += data.len() as u64;
    Ok(())
}

fn write_at(file: &File, path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    file.write_all_at(data, offset)
        .map_err(|e| Error::io(format!("writing {} at offset {offset}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::ErrorKind;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("backy-restore"))
            .collect()
    }

    #[test]
    fn file_restore_is_sparse_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.img");
        let mut t = Target::open(&path, 64 * MIB, false).unwrap();
        assert!(!path.exists(), "nothing at the target before commit");
        t.write_data(0, &vec![0u8; MIB as usize]).unwrap();
        t.write_data(10 * MIB, &vec![3u8; MIB as usize]).unwrap();
        t.write_zero(11 * MIB, 53 * MIB).unwrap();
        t.commit().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        assert!(
            meta.blocks() * 512 <= 2 * MIB,
            "allocated {}",
            meta.blocks() * 512
        );
        assert_eq!(meta.mode() & 0o777, 0o600);
        let data = std::fs::read(&path).unwrap();
        assert!(data[..10 * MIB as usize].iter().all(|&b| b == 0));
        assert!(data[10 * MIB as usize..11 * MIB as usize].iter().all(|&b| b == 3));
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn dropped_restore_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.img");
        let mut t = Target::open(&path, MIB, false).unwrap();
        t.write_data(0, &[1, 2, 3]).unwrap();
        assert_eq!(leftovers(dir.path()).len(), 1);
        drop(t);
        assert!(leftovers(dir.path()).is_empty());
        assert!(!path.exists());
    }

    #[test]
    fn existing_files_need_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.img");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        let e = Target::open(&path, MIB, false).err().unwrap();
        assert_eq!(e.kind, ErrorKind::AlreadyExists);
        assert!(e.message.contains("--force"), "{}", e.message);

        // Through a symlink, the file it points to is replaced.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let mut t = Target::open(&link, 4, true).unwrap();
        t.write_data(0, b"new!").unwrap();
        t.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new!");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);

        // An empty file is fair game.
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(Target::open(&empty, 1, false).is_ok());

        let e = Target::open(dir.path(), 1, true).err().unwrap();
        assert!(e.message.contains("neither"), "{}", e.message);
        let e = Target::open(Path::new("/nonexistent/dir/x.img"), 1, false)
            .err()
            .unwrap();
        assert!(e.message.contains("resolving /nonexistent/dir"), "{}", e.message);
    }
}
