//! A job's lease in the pool: `common/src/lease.rs`'s decisions on a real
//! `cls_lock` with a duration and the job object's `epoch` xattr (the
//! fencing token). The decisions stay in the pure module; this file does
//! the I/O (docs/DESIGN.md "Ceph pool store", "The lease and fencing").
//!
//! - take: lock (exclusive, with the duration), then compare-and-set the
//!   epoch to the next value in one write op;
//! - renew: lock again with the renew flag from the same client instance,
//!   then check that the epoch is still ours (a taker may have come and
//!   gone while we were away);
//! - commit: only before the holder's own deadline (send time of the last
//!   successful take or renewal plus the duration less the margin), and
//!   only by a write op that compares the epoch first: a holder that lost
//!   the lease is refused with nothing applied, even when its clock says
//!   it still holds.
//!
//! Calls block on the cluster: async callers use `spawn_blocking`.

use super::cluster::IoCtx;
use super::error::CephError;
use super::lock::{LockRequest, Locker};
use super::write_op::{WriteOp, XattrCmp};
use backy_common::lease::{Holder, Lease, LeaseError, LeaseTimes, Millis};
use std::time::{Duration, Instant};

/// The lock's name on a job object.
pub const LEASE_LOCK: &str = "lease";
/// The job object's xattr holding the last epoch handed out (decimal).
pub const EPOCH_XATTR: &str = "epoch";
/// The job object's xattr naming the holder of that epoch (client,
/// address and cookie, one a line; empty once released): what a taker
/// fences. The lock record cannot tell: the OSD drops an expired locker
/// from it on every read.
pub const HOLDER_XATTR: &str = "holder";

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// A decision of the lease's state machine: lost, expired, exhausted.
    #[error("lease of {oid}: {source}")]
    Lease {
        oid: String,
        #[source]
        source: LeaseError,
    },
    /// Another client instance holds the lock.
    #[error("lease of {oid}: held by {}", describe(.holder))]
    Busy { oid: String, holder: Option<Locker> },
    #[error("lease of {oid}: this server does not hold it")]
    NotHeld { oid: String },
    #[error("lease of {oid}: epoch xattr {value:?} is not a number")]
    BadEpoch { oid: String, value: String },
    #[error(transparent)]
    Ceph(#[from] CephError),
}

fn describe(holder: &Option<Locker>) -> String {
    match holder {
        Some(l) => format!("server {} ({} at {})", l.cookie, l.client, l.address),
        None => "another server".into(),
    }
}

impl KeeperError {
    /// The lease was lost to another server (its epoch moved on).
    pub fn is_lost(&self) -> bool {
        matches!(
            self,
            KeeperError::Lease {
                source: LeaseError::Lost { .. },
                ..
            }
        )
    }

    /// The holder's own deadline passed without a renewal.
    pub fn is_expired(&self) -> bool {
        matches!(
            self,
            KeeperError::Lease {
                source: LeaseError::Expired { .. },
                ..
            }
        )
    }

    pub fn is_busy(&self) -> bool {
        matches!(self, KeeperError::Busy { .. })
    }

    /// The holder's URL when another server holds the lease: its cookie,
    /// if it is one (`http://` or `https://`).
    pub fn holder_url(&self) -> Option<&str> {
        match self {
            KeeperError::Busy { holder: Some(l), .. }
                if l.cookie.starts_with("https://") || l.cookie.starts_with("http://") =>
            {
                Some(&l.cookie)
            }
            _ => None,
        }
    }

    /// The cluster error underneath, if any (`is_blocklisted`, ...).
    pub fn ceph(&self) -> Option<&CephError> {
        match self {
            KeeperError::Ceph(e) => Some(e),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, KeeperError>;

#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    /// When the last successful take or renewal was sent (own clock).
    sent_at: Millis,
}

/// One server's hold on one job's lease, through one client instance.
#[derive(Debug)]
pub struct LeaseKeeper {
    io: IoCtx,
    oid: String,
    server: String,
    times: LeaseTimes,
    /// Millis on the holder's clock count from here.
    origin: Instant,
    held: Option<Held>,
    /// The holder before our last take, if it did not release (another
    /// client instance): the caller fences it.
    previous: Option<Locker>,
}

impl LeaseKeeper {
    /// `server` names this server in the lock record (the lock cookie):
    /// what a redirect and an operator see.
    pub fn new(io: IoCtx, oid: &str, server: &str, times: LeaseTimes) -> LeaseKeeper {
        LeaseKeeper {
            io,
            oid: oid.to_string(),
            server: server.to_string(),
            times,
            origin: Instant::now(),
            held: None,
            previous: None,
        }
    }

    fn millis(&self, at: Instant) -> Millis {
        at.saturating_duration_since(self.origin).as_millis() as Millis
    }

    fn lease_error(&self, source: LeaseError) -> KeeperError {
        KeeperError::Lease {
            oid: self.oid.clone(),
            source,
        }
    }

    fn lock(&self) -> Result<()> {
        let req = LockRequest {
            name: LEASE_LOCK,
            cookie: &self.server,
            description: "backy-server job lease",
            duration: Some(Duration::from_millis(self.times.duration)),
            may_renew: true,
        };
        match self.io.lock_exclusive(&self.oid, &req) {
            Ok(()) => Ok(()),
            Err(e) if e.is_busy() => Err(KeeperError::Busy {
                oid: self.oid.clone(),
                holder: self.holder().ok().flatten(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The stored epoch; 0 before the first take (no xattr yet).
    fn stored_epoch(&self) -> Result<u64> {
        let raw = match self.io.getxattr(&self.oid, EPOCH_XATTR) {
            Ok(v) => v,
            Err(e) if e.is_no_data() || e.is_not_found() => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let text = String::from_utf8_lossy(&raw);
        text.parse().map_err(|_| KeeperError::BadEpoch {
            oid: self.oid.clone(),
            value: text.into_owned(),
        })
    }

    /// Takes a free or expired lease: returns the new epoch. `Busy` while
    /// another instance holds it.
    pub fn take(&mut self) -> Result<u64> {
        let sent = Instant::now();
        self.lock()?;
        let current = self.stored_epoch()?;
        // The decision: the next epoch (the deciding clock is the OSD's;
        // only the epoch is used here).
        let taken = Lease {
            epoch: current,
            holder: None,
        }
        .take(&self.server, 0, self.times.duration)
        .map_err(|e| self.lease_error(e))?;
        let previous = self.stored_holder()?;
        let cluster = self.io.cluster();
        let own = cluster.instance_addr()?;
        let me = Locker {
            client: cluster.client_name(),
            cookie: self.server.clone(),
            address: own.clone(),
        };
        let cas = WriteOp::new()
            .cmpxattr(EPOCH_XATTR, XattrCmp::Eq, epoch_bytes(current).as_slice())
            .setxattr(EPOCH_XATTR, taken.epoch.to_string().as_bytes())
            .setxattr(HOLDER_XATTR, holder_bytes(&me).as_slice());
        match self.io.operate(&self.oid, &cas) {
            Ok(()) => {}
            // Our lock lapsed between lock and write and a taker bumped it.
            Err(e) if e.is_compare_failed() => {
                self.held = None;
                return Err(self.lost(current));
            }
            Err(e) => return Err(e.into()),
        }
        self.held = Some(Held {
            epoch: taken.epoch,
            sent_at: self.millis(sent),
        });
        self.previous = previous.filter(|p| !same_instance(&own, &p.address));
        Ok(taken.epoch)
    }

    /// The holder before the last take that did not release its lease:
    /// another server (or an earlier incarnation of this one) that may
    /// still write, until fenced.
    pub fn previous_holder(&self) -> Option<&Locker> {
        self.previous.as_ref()
    }

    /// The holder the job object names; `None` when released or never
    /// taken. An unreadable value names nobody (logged).
    fn stored_holder(&self) -> Result<Option<Locker>> {
        let raw = match self.io.getxattr(&self.oid, HOLDER_XATTR) {
            Ok(v) => v,
            Err(e) if e.is_no_data() || e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let parsed = parse_holder(&raw);
        if parsed.is_none() && !raw.is_empty() {
            tracing::warn!(oid = %self.oid, "lease holder xattr is unreadable: nobody to fence");
        }
        Ok(parsed)
    }

    fn lost(&self, yours: u64) -> KeeperError {
        let current = self.stored_epoch().unwrap_or(yours);
        let holder = self.holder().ok().flatten().map(|l| l.cookie);
        self.lease_error(LeaseError::Lost {
            yours,
            current,
            holder,
        })
    }

    /// Extends the held lease by its duration from now. Lost (and no
    /// longer held) if another server took the lock or the epoch moved on.
    pub fn renew(&mut self) -> Result<()> {
        let held = self.held.ok_or_else(|| KeeperError::NotHeld {
            oid: self.oid.clone(),
        })?;
        let sent = Instant::now();
        if let Err(e) = self.lock() {
            if e.is_busy() {
                self.held = None;
                return Err(self.lost(held.epoch));
            }
            return Err(e);
        }
        let stored = self.stored_epoch()?;
        let observed = Lease {
            epoch: stored,
            holder: Some(Holder {
                server: self.server.clone(),
                expires_at: Millis::MAX,
            }),
        };
        if let Err(e) = observed.renew(&self.server, held.epoch, 0, self.times.duration) {
            // Someone took and released the lease while we were away: the
            // lock we just got back is not a lease at our epoch.
            self.held = None;
            let _ = self.io.unlock(&self.oid, LEASE_LOCK, &self.server);
            return Err(self.lease_error(e));
        }
        self.held = Some(Held {
            epoch: held.epoch,
            sent_at: self.millis(sent),
        });
        Ok(())
    }

    /// Gives the lease up at once (the epoch stays: the next take is newer).
    pub fn release(&mut self) -> Result<()> {
        if self.held.is_none() {
            return Err(KeeperError::NotHeld {
                oid: self.oid.clone(),
            });
        }
        // A clean release leaves nobody for the next taker to fence. Past
        // our deadline the next taker fences us: we are going anyway.
        if let Err(e) = self.commit_if_holder(WriteOp::new().setxattr(HOLDER_XATTR, b"")) {
            tracing::warn!(oid = %self.oid, "release: the holder stays named: {e}");
        }
        self.held = None;
        match self.io.unlock(&self.oid, LEASE_LOCK, &self.server) {
            // Expired and cleared, or broken: it is free either way.
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map_err(Into::into),
        }
    }

    /// The epoch held, if any (it may have expired: see `may_write_at`).
    pub fn epoch(&self) -> Option<u64> {
        self.held.map(|h| h.epoch)
    }

    /// When the next renewal is due (own clock).
    pub fn renew_due_at(&self) -> Option<Instant> {
        self.held
            .map(|h| self.origin + Duration::from_millis(self.times.renew_at(h.sent_at)))
    }

    /// The epoch to write under at `now`, or why not: the holder's own
    /// deadline decides (`Lease::may_commit` on its clock).
    pub fn may_write_at(&self, now: Instant) -> Result<u64> {
        let held = self.held.ok_or_else(|| KeeperError::NotHeld {
            oid: self.oid.clone(),
        })?;
        let own = Lease {
            epoch: held.epoch,
            holder: Some(Holder {
                server: self.server.clone(),
                expires_at: self.times.stop_writing_at(held.sent_at),
            }),
        };
        own.may_commit(&self.server, held.epoch, self.millis(now))
            .map_err(|e| self.lease_error(e))?;
        Ok(held.epoch)
    }

    /// Applies `op` to the job object only if this server still holds the
    /// lease: its own deadline has not passed and the stored epoch is
    /// still its epoch (compared in the same op). Refused: nothing of `op`
    /// applied, and the lease is no longer held.
    pub fn commit_if_holder(&mut self, op: WriteOp) -> Result<()> {
        self.commit_if_holder_at(op, Instant::now())
    }

    /// `commit_if_holder` with the deadline judged at `now`: a process
    /// frozen between its deadline check and the write is what the epoch
    /// comparison catches (the tests pass an old `now` to be that process).
    pub fn commit_if_holder_at(&mut self, op: WriteOp, now: Instant) -> Result<()> {
        let epoch = self.may_write_at(now)?;
        // A holder frozen here, past its check, is what fencing is for.
        backy_common::fault::point("lease.checked");
        let fenced =
            op.prepend(WriteOp::new().cmpxattr(EPOCH_XATTR, XattrCmp::Eq, epoch.to_string().as_bytes()));
        match self.io.operate(&self.oid, &fenced) {
            Ok(()) => Ok(()),
            Err(e) if e.is_compare_failed() => {
                self.held = None;
                Err(self.lost(epoch))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Who holds the lease lock now (an expired holder may still show
    /// until the next lock call): a redirect's target, a fence's address.
    pub fn holder(&self) -> Result<Option<Locker>> {
        match self.io.list_lockers(&self.oid, LEASE_LOCK) {
            Ok(info) => Ok(info.lockers.into_iter().next()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// The stored form of a holder: client, address, cookie, one a line.
fn holder_bytes(l: &Locker) -> Vec<u8> {
    format!("{}\n{}\n{}", l.client, l.address, l.cookie).into_bytes()
}

fn parse_holder(raw: &[u8]) -> Option<Locker> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut lines = text.splitn(3, '\n');
    let (client, address, cookie) = (lines.next()?, lines.next()?, lines.next()?);
    (!address.is_empty()).then(|| Locker {
        client: client.to_string(),
        address: address.to_string(),
        cookie: cookie.to_string(),
    })
}

/// Whether `address` (from a lock record, a holder xattr or a watcher
/// list, with or without its `v1:`/`v2:` prefix) is one of `own`'s
/// (possibly a `[v2:...,v1:...]` vector).
pub fn same_instance(own: &str, address: &str) -> bool {
    let bare = |a: &str| {
        a.strip_prefix("v1:")
            .or_else(|| a.strip_prefix("v2:"))
            .unwrap_or(a)
            .to_string()
    };
    let address = bare(address);
    own.split([',', '[', ']'])
        .any(|a| !a.is_empty() && bare(a) == address)
}

/// The stored form of an epoch; 0 is "no xattr", which compares as empty.
fn epoch_bytes(epoch: u64) -> Vec<u8> {
    if epoch == 0 {
        Vec::new()
    } else {
        epoch.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_round_trips_and_a_bad_one_names_nobody() {
        let l = Locker {
            client: "client.4121".into(),
            cookie: "https://backup01:6023".into(),
            address: "v1:127.0.0.1:0/2237796526".into(),
        };
        assert_eq!(parse_holder(&holder_bytes(&l)), Some(l));
        assert_eq!(parse_holder(b""), None, "released");
        assert_eq!(parse_holder(b"client.1"), None);
        assert_eq!(parse_holder(b"client.1\n\nx"), None);
        assert_eq!(parse_holder(b"\xff\n1\n2"), None);
    }

    #[test]
    fn own_addresses_match_with_or_without_the_protocol() {
        let own = "[v2:127.0.0.1:0/3301,v1:127.0.0.1:0/3301]";
        assert!(same_instance(own, "127.0.0.1:0/3301"));
        assert!(same_instance(own, "v1:127.0.0.1:0/3301"));
        assert!(same_instance("127.0.0.1:0/3301", "v2:127.0.0.1:0/3301"));
        assert!(!same_instance(own, "127.0.0.1:0/3302"));
        assert!(!same_instance(own, "127.0.0.1:0/330"));
    }

    #[test]
    fn epoch_zero_is_the_missing_xattr() {
        assert_eq!(epoch_bytes(0), b"");
        assert_eq!(epoch_bytes(17), b"17");
    }
}
