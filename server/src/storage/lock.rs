//! The per-job lock (`<job>/.lock`, flock): one writer per job at a time,
//! across threads and processes alike; and the store's lock: one server
//! per base directory.

use backy_common::{Error, ErrorKind, Result};
use rustix::fs::FlockOperation;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

/// Held while a job is being changed; released on drop.
#[derive(Debug)]
pub struct JobLock {
    _file: File,
}

impl JobLock {
    /// Takes the lock, waiting up to `patience` for a holder to finish (short
    /// maintenance such as expiry or a tag change); then fails with
    /// [`backy_common::ErrorKind::Busy`].
    pub fn acquire(path: &Path, job: &str, patience: Duration) -> Result<Self> {
        let deadline = Instant::now() + patience;
        loop {
            match Self::try_acquire(path, job) {
                Err(e) if e.kind == ErrorKind::Busy && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }

    /// Takes the lock or fails at once with [`backy_common::ErrorKind::Busy`].
    pub fn try_acquire(path: &Path, job: &str) -> Result<Self> {
        let file = super::durable::open_lock_file(path)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(JobLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::busy(format!(
                "job {job} is busy: another push or change is running"
            ))),
            Err(e) => Err(Error::io(format!("locking {}", path.display()), e.into())),
        }
    }
}

/// Held by the serving process for its whole life: one server per store
/// (`<base-dir>/.backy-server.lock`). Two servers on one store would each
/// trust their own index and expire each other's revisions.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl StoreLock {
    /// Takes the store's lock and writes this process's id into it, or
    /// fails at once naming the holder.
    pub fn acquire(base: &Path) -> Result<Self> {
        let path = base.join(".backy-server.lock");
        let mut file = super::durable::open_lock_file(&path)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                use std::io::Write;
                let written = file
                    .set_len(0)
                    .and_then(|()| writeln!(file, "{}", std::process::id()));
                written.map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
                Ok(StoreLock { _file: file })
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                Err(Error::busy(format!(
                    "base-dir {} is in use by another backy-server (pid {}): one server per store",
                    base.display(),
                    holder.trim()
                )))
            }
            Err(e) => Err(Error::io(format!("locking {}", path.display()), e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_per_store() {
        let dir = tempfile::tempdir().unwrap();
        let held = StoreLock::acquire(dir.path()).unwrap();
        let e = StoreLock::acquire(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy);
        assert!(
            e.message.contains(&format!(
                "in use by another backy-server (pid {})",
                std::process::id()
            )),
            "{}",
            e.message
        );
        drop(held);
        StoreLock::acquire(dir.path()).unwrap();
    }
}
