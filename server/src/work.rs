//! The pool of heavy block work: reading a block back and hashing it at a
//! commit (a block the push wrote only part of) and verifying stored
//! blocks. A peer can make this work out of proportion to what it sends
//! (one byte per block makes the commit read and hash every block), so
//! the server does at most `slots` blocks of it at once, hands free slots
//! to the waiting callers in turn (one block each, round robin, so a
//! second caller waits for one block of the first, not for all of them)
//! and drops a waiter whose caller has gone away.

use backy_common::{Error, Result};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How often a waiter checks whether its caller is still there.
const CANCEL_POLL: Duration = Duration::from_millis(50);

pub struct WorkPool {
    slots: usize,
    state: Mutex<State>,
    turn_changed: Condvar,
}

#[derive(Default)]
struct State {
    busy: usize,
    next_ticket: u64,
    /// Tickets waiting, per caller, in arrival order.
    waiting: HashMap<String, VecDeque<u64>>,
    /// Callers with waiting tickets, in the order they are served.
    turns: VecDeque<String>,
    /// Tickets handed a slot their waiter has not picked up yet.
    granted: HashSet<u64>,
}

/// One slot of the pool, given back on drop.
pub struct Slot<'a> {
    pool: &'a WorkPool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        state.busy -= 1;
        self.pool.dispatch(&mut state);
        drop(state);
        self.pool.turn_changed.notify_all();
    }
}

impl WorkPool {
    pub fn new(slots: usize) -> Self {
        WorkPool {
            slots: slots.max(1),
            state: Mutex::new(State::default()),
            turn_changed: Condvar::new(),
        }
    }

    /// A pool as wide as the machine.
    pub fn for_this_host() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot for one block of work for `caller` (the stream
    /// budget's key: an identity, or a connection in open mode). Fails
    /// with `UNAVAILABLE` once `gone` says the caller has left.
    pub fn acquire(&self, caller: &str, gone: &dyn Fn() -> bool) -> Result<Slot<'_>> {
        let mut state = self.lock();
        if state.busy < self.slots && state.turns.is_empty() {
            state.busy += 1;
            return Ok(Slot { pool: self });
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let queue = state.waiting.entry(caller.to_string()).or_default();
        queue.push_back(ticket);
        if queue.len() == 1 {
            state.turns.push_back(caller.to_string());
        }
        loop {
            if state.granted.remove(&ticket) {
                return Ok(Slot { pool: self });
            }
            if gone() {
                self.withdraw(&mut state, caller, ticket);
                return Err(Error::unavailable(
                    "the caller went away while waiting for the block work pool",
                ));
            }
            state = self
                .turn_changed
                .wait_timeout(state, CANCEL_POLL)
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Hands free slots to waiting callers, one ticket per caller in turn.
    fn dispatch(&self, state: &mut State) {
        while state.busy < self.slots {
            let Some(caller) = state.turns.pop_front() else {
                return;
            };
            let Some(queue) = state.waiting.get_mut(&caller) else {
                continue;
            };
            let Some(ticket) = queue.pop_front() else {
                state.waiting.remove(&caller);
                continue;
            };
            if queue.is_empty() {
                state.waiting.remove(&caller);
            } else {
                state.turns.push_back(caller);
            }
            state.granted.insert(ticket);
            state.busy += 1;
        }
    }

    fn withdraw(&self, state: &mut State, caller: &str, ticket: u64) {
        if state.granted.remove(&ticket) {
            // Granted in the meantime: pass the slot on.
            state.busy -= 1;
            self.dispatch(state);
            self.turn_changed.notify_all();
            return;
        }
        if let Some(queue) = state.waiting.get_mut(caller) {
            queue.retain(|&t| t != ticket);
            if queue.is_empty() {
                state.waiting.remove(caller);
                state.turns.retain(|c| c != caller);
            }
        }
    }
}

/// Whose block work this is, and whether its caller is still there.
#[derive(Clone)]
pub struct Gate {
    pool: Arc<WorkPool>,
    caller: String,
    gone: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Gate {
    pub fn new(
        pool: Arc<WorkPool>,
        caller: impl Into<String>,
        gone: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        Gate {
            pool,
            caller: caller.into(),
            gone,
        }
    }

    /// A slot for one block of work; fails once the caller has left.
    pub fn slot(&self) -> Result<Slot<'_>> {
        if (self.gone)() {
            return Err(Error::unavailable("the caller went away: the work stopped"));
        }
        self.pool.acquire(&self.caller, &*self.gone)
    }

    /// A slot for work that keeps what a caller sent before it went away
    /// (a broken push's last checkpoint): waits its turn, never cancelled.
    pub fn slot_to_keep(&self) -> Result<Slot<'_>> {
        self.pool.acquire(&self.caller, &|| false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    fn never() -> bool {
        false
    }

    #[test]
    fn slots_bound_the_work_and_turns_alternate_between_callers() {
        let pool = Arc::new(WorkPool::new(1));
        let first = pool.acquire("a", &never).unwrap();
        let (done, order) = mpsc::channel();
        let mut threads = Vec::new();
        // Four blocks of "a" queue up first, then one of "b".
        for (i, who) in ["a", "a", "a", "a", "b"].into_iter().enumerate() {
            let (shared, done) = (pool.clone(), done.clone());
            threads.push(std::thread::spawn(move || {
                let _slot = shared.acquire(who, &never).unwrap();
                done.send(who).unwrap();
            }));
            // Each waiter is queued before the next one starts.
            while pool.lock().next_ticket <= i as u64 {
                std::thread::yield_now();
            }
        }
        drop(first);
        for t in threads {
            t.join().unwrap();
        }
        let order: Vec<&str> = order.try_iter().collect();
        assert_eq!(
            order,
            ["a", "b", "a", "a", "a"],
            "b waits for one block of a, not four"
        );
        assert_eq!(pool.lock().busy, 0);
    }

    #[test]
    fn a_waiter_whose_caller_left_gives_up_and_leaves_no_trace() {
        let pool = Arc::new(WorkPool::new(1));
        let held = pool.acquire("a", &never).unwrap();
        let gone = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (shared, gone) = (pool.clone(), gone.clone());
            std::thread::spawn(move || shared.acquire("b", &|| gone.load(Ordering::SeqCst)).map(drop))
        };
        while pool.lock().turns.is_empty() {
            std::thread::yield_now();
        }
        gone.store(true, Ordering::SeqCst);
        let err = waiter.join().unwrap().unwrap_err();
        assert_eq!(err.kind, backy_common::error::ErrorKind::Unavailable);
        let state = pool.lock();
        assert!(state.turns.is_empty() && state.waiting.is_empty() && state.granted.is_empty());
        drop(state);
        drop(held);
        assert_eq!(pool.lock().busy, 0);
        drop(pool.acquire("c", &never).unwrap());
    }
}
