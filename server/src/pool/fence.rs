//! Fencing a job's previous lease holder when its lease is taken over
//! (docs/DESIGN.md "The lease and fencing"): the client instance the lock
//! record named, and every other writer of the job's image (its watchers:
//! an `rbd import-diff` the old holder started), are blocklisted, so
//! nothing of theirs lands in the pool from then on. The epoch comparison
//! at commit refuses their records whatever the blocklist does.

use super::error::Result;
use super::names;
use super::store::PoolStore;
use crate::ceph::{same_instance, Image, Locker};
use backy_common::JobName;

impl PoolStore {
    /// Blocklists `previous` (the holder the take replaced) and
    /// the image's watchers, except this server's own instance. Returns
    /// the addresses blocklisted. Call it right after taking the lease,
    /// before anything reads or writes the image's head.
    pub fn fence(&self, job: &JobName, previous: &Locker) -> Result<Vec<String>> {
        let own = self.cluster().instance_addr()?;
        let mut addresses = vec![previous.address.clone()];
        match Image::open(self.io(), names::image_name(job)) {
            Ok(head) => addresses.extend(head.watchers()?.into_iter().map(|w| w.address)),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        addresses.retain(|a| !a.is_empty() && !same_instance(&own, a));
        addresses.sort();
        addresses.dedup();
        for address in &addresses {
            // Ceph's default expiry (an hour): long past any lease; the
            // fenced process must reconnect (restart) to work again.
            self.cluster().blocklist_add(address, None)?;
        }
        Ok(addresses)
    }
}
