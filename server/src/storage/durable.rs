//! Durable file replacement: every metadata write goes through here, so a
//! crash leaves the old file or the new one, never half of either.

use backy_common::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Default mode of every file the server creates.
pub const FILE_MODE: u32 = 0o600;
/// Default mode of every directory the server creates.
pub const DIR_MODE: u32 = 0o700;

use std::sync::atomic::{AtomicU32, Ordering};
static FILE_MODE_NOW: AtomicU32 = AtomicU32::new(FILE_MODE);
static DIR_MODE_NOW: AtomicU32 = AtomicU32::new(DIR_MODE);

/// Sets the modes from the config (`file-mode: 0640` → 0640 and 0750),
/// once at start. Revision images hold whole VM disks: never world-readable.
pub fn set_modes(file: u32, dir: u32) {
    FILE_MODE_NOW.store(file & 0o750, Ordering::Relaxed);
    DIR_MODE_NOW.store(dir & 0o750, Ordering::Relaxed);
}

/// Mode for new files.
pub fn file_mode() -> u32 {
    FILE_MODE_NOW.load(Ordering::Relaxed)
}

fn dir_mode() -> u32 {
    DIR_MODE_NOW.load(Ordering::Relaxed)
}

/// Writes `bytes` to `path`: temp file in the same directory, fsync,
/// rename over the target, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_all(&[(path, bytes)])
}

/// Writes a manifest to `path` like [`write_atomic`], streaming it (memory
/// stays at one buffer however large the image); returns its BLAKE3.
pub fn write_manifest(
    path: &Path,
    manifest: &backy_common::manifest::Manifest,
) -> Result<backy_common::manifest::Digest> {
    let dir = parent_of(path)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".tmp.{name}.{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let f = create_new(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
        let digest = manifest
            .write_to(&mut w)
            .and_then(|d| w.flush().map(|()| d))
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        drop(w);
        f.sync_all()
            .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io(format!("renaming {} to {}", tmp.display(), path.display()), e))?;
        fsync_dir(dir)?;
        Ok(digest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes several files so that a failure leaves all of them as they were
/// (except a failing rename, which the kernel all but never refuses once
/// the data is on disk): every temp file is written and synced first, then
/// all are renamed into place, then the directories are synced.
pub fn write_atomic_all(files: &[(&Path, &[u8])]) -> Result<()> {
    let mut staged: Vec<(PathBuf, &Path)> = Vec::with_capacity(files.len());
    let result = (|| {
        for (path, bytes) in files {
            let dir = parent_of(path)?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
            let tmp = dir.join(format!(".tmp.{name}.{}", uuid::Uuid::new_v4().simple()));
            let mut f = create_new(&tmp)?;
            staged.push((tmp.clone(), path));
            f.write_all(bytes)
                .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
            f.sync_all()
                .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
        }
        backy_common::fault::fail("durable.staged")?;
        while let Some((tmp, path)) = staged.pop() {
            if let Err(e) = std::fs::rename(&tmp, path) {
                staged.push((tmp.clone(), path));
                return Err(Error::io(
                    format!("renaming {} to {}", tmp.display(), path.display()),
                    e,
                ));
            }
        }
        let mut dirs: Vec<&Path> = files.iter().filter_map(|(p, _)| p.parent()).collect();
        dirs.dedup();
        for d in dirs {
            fsync_dir(d)?;
        }
        Ok(())
    })();
    for (tmp, _) in staged {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Opens a lock file for reading and writing, creating it with the
/// server's file mode if missing (never truncating what it holds).
pub fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(file_mode())
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// Creates a new file with the server's file mode; fails if it exists.
pub fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(file_mode())
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

#[cfg(test)]
thread_local! {
    /// The directories this thread synced, for tests that a change made it.
    static SYNCED: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Makes a directory entry change (create, rename, unlink) durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    SYNCED.with(|s| s.borrow_mut().push(dir.to_path_buf()));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// Creates a directory (and parents) with the server's directory mode;
/// each new one is synced into its parent, or a crash could lose its entry
/// (and everything later written below it).
pub fn create_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        if d.as_os_str().is_empty() || d.is_dir() {
            break;
        }
        missing.push(d);
        at = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(dir_mode()).create(d) {
            Ok(()) => {}
            // Made meanwhile by another request: synced below all the same.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(Error::io(format!("creating directory {}", d.display()), e)),
        }
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => fsync_dir(p)?,
            _ => fsync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// Points `link` at `target` atomically (new link under a temp name, then
/// rename), so people reading `latest` never see it missing or half-made.
pub fn replace_symlink(link: &Path, target: &str) -> Result<()> {
    replace_symlink_unsynced(link, target)?;
    fsync_dir(parent_of(link)?)
}

/// [`replace_symlink`] without syncing the directory: for start-up, which
/// makes every job's links and then syncs the filesystem once
/// ([`sync_filesystem`]).
pub fn replace_symlink_unsynced(link: &Path, target: &str) -> Result<()> {
    let dir = parent_of(link)?;
    let tmp = dir.join(format!(".tmp.link.{}", uuid::Uuid::new_v4().simple()));
    std::os::unix::fs::symlink(target, &tmp)
        .map_err(|e| Error::io(format!("creating symlink {}", tmp.display()), e))?;
    if let Err(e) = std::fs::rename(&tmp, link) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("replacing {}", link.display()), e));
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temp file and a rename like
/// [`write_atomic`], without any fsync: for start-up's many small files,
/// made durable together by one [`sync_filesystem`] before serving. A
/// crash before that may leave the file missing or empty; its readers
/// take both as not written (start-up writes it again).
pub fn write_unsynced(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".tmp.{name}.{}", uuid::Uuid::new_v4().simple()));
    let result = create_new(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)
                .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))
        })
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .map_err(|e| Error::io(format!("renaming {} to {}", tmp.display(), path.display()), e))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates one directory (its parent exists) with the server's directory
/// mode, without syncing its parent (see [`write_unsynced`]); an existing
/// one is left as it is.
pub fn create_dir_unsynced(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(dir_mode()).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(Error::io(format!("creating directory {}", dir.display()), e)),
    }
}

/// Makes everything written to the filesystem holding `path` durable (one
/// `syncfs`: what start-up made for thousands of jobs, at the cost of one
/// sync instead of one per file and directory).
pub fn sync_filesystem(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(Error::io(
            format!("syncing the filesystem of {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn parent_of(path: &Path) -> Result<&Path> {
    path.parent()
        .ok_or_else(|| Error::internal(format!("{} has no parent directory", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.rev");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            FILE_MODE
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.rev")]);
        replace_symlink(&dir.path().join("latest"), "x.rev").unwrap();
        replace_symlink(&dir.path().join("latest"), "y").unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("latest")).unwrap(),
            Path::new("y")
        );
    }

    /// Issue 27 item 12: every directory created (the job's and its
    /// `.partial/`, below a base that is new too) is synced into its parent.
    #[test]
    fn new_directories_are_synced_into_their_parents() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let job = crate::storage::jobdir::JobDir::new(&base, backy_common::JobName::new("vm1").unwrap());
        SYNCED.with(|s| s.borrow_mut().clear());
        job.ensure().unwrap();
        let synced = SYNCED.with(|s| s.borrow().clone());
        for parent in [dir.path().to_path_buf(), base.clone(), base.join("vm1")] {
            assert!(
                synced.contains(&parent),
                "{} not synced: {synced:?}",
                parent.display()
            );
        }
        // Existing directories: nothing to sync for them.
        SYNCED.with(|s| s.borrow_mut().clear());
        create_dir(&job.partial_dir()).unwrap();
        assert_eq!(SYNCED.with(|s| s.borrow().clone()), Vec::<PathBuf>::new());
    }
}
