//! The per-job lock (`<job>/.lock`, flock): one writer per job at a time,
//! across threads and processes alike.

use backy_common::{Error, ErrorKind, Result};
use rustix::fs::FlockOperation;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(super::durable::file_mode())
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(JobLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::busy(format!(
                "job {job} is busy: another push or change is running"
            ))),
            Err(e) => Err(Error::io(format!("locking {}", path.display()), e.into())),
        }
    }
}
