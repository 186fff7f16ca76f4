//! Background writeback of a large file being written from a stream: a
//! revision on the server, a restore on the client. The one piece of file
//! I/O both edges share, so it lives here once.
//!
//! Without it the kernel starts writing the data only when its dirty
//! limits are reached or at the final `fsync`, so the disk idles while data
//! arrives and the commit then waits for all of it. A helper thread asks
//! the kernel to write the file out (`sync_file_range`) every few MiB, so
//! writing overlaps receiving and the final `fsync` finds little left.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

/// Bytes written between two writeback requests.
const FLUSH_EVERY: u64 = 32 << 20;

pub struct Flusher {
    tx: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    unflushed: u64,
}

impl Flusher {
    /// A flusher for `file`; without a thread (a failed `dup` or spawn),
    /// it does nothing and the final `fsync` does all the work.
    pub fn new(file: &File) -> Flusher {
        let idle = Flusher {
            tx: None,
            thread: None,
            unflushed: 0,
        };
        let Ok(file) = file.try_clone() else {
            return idle;
        };
        let (tx, rx) = sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    write_out(&file);
                }
            });
        match spawned {
            Ok(thread) => Flusher {
                tx: Some(tx),
                thread: Some(thread),
                unflushed: 0,
            },
            Err(_) => idle,
        }
    }

    /// Counts written bytes; every [`FLUSH_EVERY`] wakes the thread. Never
    /// blocks: a request while one is pending is merged into it.
    pub fn wrote(&mut self, bytes: u64) {
        self.unflushed += bytes;
        if self.unflushed < FLUSH_EVERY {
            return;
        }
        self.unflushed = 0;
        if let Some(tx) = &self.tx {
            match tx.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => self.tx = None,
            }
        }
    }

    /// Stops the thread (after its current request).
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Writes the file's dirty pages out and waits for them: a hint for
/// throughput, not durability (the commit's `fsync` provides that), so
/// errors are left for the `fsync` to report.
fn write_out(file: &File) {
    let flags =
        libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscall on a file descriptor this thread owns (its
    // `File` outlives the call); offset 0 and length 0 mean the whole file.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, flags);
    }
}
