//! The stream executor: the threads long blocking stream work runs on (a
//! push's writer, a restore, a verify, a manifest or status listing), apart
//! from the runtime's blocking pool that unary calls (plan, status, tags,
//! …) use. Such work holds its thread for as long as its client keeps
//! the stream open, hours for a large push, so sharing one pool let a few
//! hundred streams queue every short call behind them.
//!
//! Bounded, and a stream beyond the bound is refused at once with
//! RESOURCE_EXHAUSTED rather than queued: a queued stream would wait for
//! another to end, which may take hours, while its client cannot tell a
//! slow server from a dead one; a refusal is retried by clients and agents
//! with backoff. The slot is reserved before the stream opens and given
//! back when its thread ends.

use backy_common::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Default)]
pub struct StreamExecutor {
    running: AtomicUsize,
}

/// A reserved thread of the executor: spawn the stream's work on it, or
/// drop it to give the slot back.
pub struct Reserved {
    executor: Arc<StreamExecutor>,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.executor.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last stream ended: the buffers it left free go back to
            // the kernel (the allocator keeps them while streams run).
            backy_common::allocator::release_free();
        }
    }
}

/// The result of work spawned on the executor.
pub type Joined<T> = tokio::sync::oneshot::Receiver<T>;

impl StreamExecutor {
    /// Streams running (or reserved) now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// A slot for one stream, if fewer than `limit` run.
    pub fn reserve(self: &Arc<Self>, limit: usize) -> Result<Reserved> {
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| {
                Error::exhausted(format!(
                    "the server runs {limit} streams at once (limits: max-streams): try again later"
                ))
            })?;
        Ok(Reserved {
            executor: self.clone(),
        })
    }
}

impl Reserved {
    /// Runs `work` on a thread of its own; the slot is given back when it
    /// returns (or panics). Its result arrives through the receiver (closed
    /// without a value if it panicked).
    pub fn spawn<T: Send + 'static>(self, work: impl FnOnce() -> T + Send + 'static) -> Result<Joined<T>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("backy-stream".into())
            .spawn(move || {
                let _slot = self;
                let _ = tx.send(work());
            })
            .map_err(|e| Error::unavailable(format!("starting a stream thread: {e}")))?;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::error::ErrorKind;

    #[test]
    fn the_bound_refuses_and_a_finished_stream_frees_its_slot() {
        let executor = Arc::new(StreamExecutor::default());
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let first = executor.reserve(2).unwrap();
        let second = executor.reserve(2).unwrap();
        let e = executor.reserve(2).err().unwrap();
        assert_eq!(e.kind, ErrorKind::ResourceExhausted);
        assert_eq!(
            e.message,
            "the server runs 2 streams at once (limits: max-streams): try again later"
        );
        drop(second);
        assert_eq!(executor.running(), 1);
        let done = first
            .spawn(move || {
                wait.recv().unwrap();
                7
            })
            .unwrap();
        assert_eq!(executor.running(), 1, "the thread holds the slot");
        release.send(()).unwrap();
        assert_eq!(done.blocking_recv().unwrap(), 7);
        // The slot comes back as the thread ends, just after its result.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while executor.running() != 0 {
            assert!(std::time::Instant::now() < deadline, "slot not given back");
            std::thread::yield_now();
        }
        let panicked = executor.reserve(1).unwrap().spawn(|| panic!("test")).unwrap();
        assert!(panicked.blocking_recv().is_err());
        while executor.running() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "slot of a panic not given back"
            );
            std::thread::yield_now();
        }
    }
}
