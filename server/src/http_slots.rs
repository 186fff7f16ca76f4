//! The HTTP listener's connection slots. A connection holds a slot from
//! accept to close, but only while a request is being answered is it
//! "busy"; one waiting for a request head (silent, slow, or an idle
//! keep-alive) is closed, oldest first, when a new connection needs its
//! slot. So silent connections cannot keep `/healthz` out: a new one always
//! gets in unless every slot is answering a request (which takes
//! milliseconds).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Every slot, in accept order.
pub struct Slots {
    max: usize,
    inner: Mutex<Inner>,
    /// A slot was freed (the accept loop may wait for one).
    freed: Notify,
}

#[derive(Default)]
struct Inner {
    next: u64,
    held: BTreeMap<u64, Signals>,
}

/// What a connection shares with its slot.
#[derive(Clone, Default)]
struct Signals {
    busy: Arc<AtomicBool>,
    evicted: Arc<Notify>,
}

/// One connection's slot; freed when dropped.
pub struct Slot {
    id: u64,
    signals: Signals,
    slots: Arc<Slots>,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Slots {
            max,
            inner: Mutex::new(Inner::default()),
            freed: Notify::new(),
        })
    }

    /// A slot for a new connection: a free one, else the oldest
    /// connection's that is not answering a request (it is closed), else
    /// the first to be freed.
    pub async fn take(self: &Arc<Self>) -> Slot {
        loop {
            if let Some(slot) = self.try_take() {
                return slot;
            }
            // Every slot is answering a request: one ends soon. The
            // timeout only guards against a missed wake-up.
            let _ = tokio::time::timeout(Duration::from_millis(50), self.freed.notified()).await;
        }
    }

    fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.held.len() >= self.max {
            let oldest_waiting = inner
                .held
                .iter()
                .find(|(_, s)| !s.busy.load(Ordering::SeqCst))
                .map(|(id, _)| *id)?;
            if let Some(s) = inner.held.remove(&oldest_waiting) {
                s.evicted.notify_one();
            }
        }
        let id = inner.next;
        inner.next += 1;
        let signals = Signals::default();
        inner.held.insert(id, signals.clone());
        Some(Slot {
            id,
            signals,
            slots: self.clone(),
        })
    }
}

impl Slot {
    /// A handle for the request handler to mark the connection busy.
    pub fn busy_flag(&self) -> BusyFlag {
        BusyFlag(self.signals.busy.clone())
    }

    /// Completes when the slot was given to a newer connection.
    pub async fn evicted(&self) {
        self.signals.evicted.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.held.remove(&self.id);
        drop(inner);
        self.slots.freed.notify_one();
    }
}

/// Sets a connection busy from within its request handler.
#[derive(Clone)]
pub struct BusyFlag(Arc<AtomicBool>);

impl BusyFlag {
    pub fn answering(&self) -> Answering {
        self.0.store(true, Ordering::SeqCst);
        Answering(self.0.clone())
    }
}

/// A request being answered; the connection is idle again when dropped.
pub struct Answering(Arc<AtomicBool>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_connection_waiting_for_a_request_gives_its_slot() {
        let slots = Slots::new(3);
        let a = slots.take().await;
        let b = slots.take().await;
        let c = slots.take().await;
        let _answering = a.busy_flag().answering();
        // Full: a is answering, so b (the oldest waiting) is closed.
        let d = slots.take().await;
        tokio::time::timeout(Duration::from_secs(1), b.evicted())
            .await
            .expect("b evicted");
        assert!(tokio::time::timeout(Duration::from_millis(20), a.evicted())
            .await
            .is_err());
        // Every slot busy: the next waits until one is freed.
        let (_c_busy, _d_busy) = (c.busy_flag().answering(), d.busy_flag().answering());
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take().await.id }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "all slots busy: it waits");
        drop(b);
        drop(a);
        let id = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a slot after one is freed")
            .unwrap();
        assert_eq!(id, 4);
    }
}
