//! The decisions of a job's lease among several servers in front of one
//! Ceph pool (issue 36; docs/DESIGN.md "Ceph pool store"), as a pure state
//! machine: the caller passes the time and stores the result.
//!
//! A job is written by one server at a time: its lease holder. A lease
//! lasts `duration` from when it was taken or last renewed; an expired lease
//! may be taken by any server. Every take gives a new, larger `epoch` (the
//! fencing token): a holder commits a revision only with the epoch it was
//! given, so a server that lost its lease (it stalled, was partitioned, came
//! back after a kill) is refused at commit even if it still believes it
//! holds the job.
//!
//! Time is milliseconds on one clock for every decision about one stored
//! lease (in the pool: the OSD's, which judges a `rados lock` duration).
//! A holder's own deadline, on its own clock, is [`LeaseTimes::stop_writing_at`].
//! The pool's side is `server/src/ceph/lease_keeper.rs` (the lock, the
//! epoch and holder xattrs) and `server/src/pool_serve.rs` (renewal,
//! take-over with fencing).

/// Milliseconds on the deciding clock.
pub type Millis = u64;

/// A job's lease as stored: the last epoch handed out, and who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lease {
    /// The epoch of the last take; 0 before the first.
    pub epoch: u64,
    /// Absent: never taken, or released.
    pub holder: Option<Holder>,
}

/// The server holding a lease and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub server: String,
    pub expires_at: Millis,
}

/// Why a lease operation was refused. The stored lease is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("the job's lease is held by {holder} until {expires_at} ms")]
    HeldBy { holder: String, expires_at: Millis },
    #[error(
        "lease epoch {yours} was lost: the lease is at epoch {current}{}",
        held_by(holder)
    )]
    Lost {
        yours: u64,
        current: u64,
        holder: Option<String>,
    },
    #[error("lease epoch {epoch} expired at {expired_at} ms")]
    Expired { epoch: u64, expired_at: Millis },
    #[error("the lease duration must be more than 0 ms")]
    ZeroDuration,
    #[error("the lease epoch cannot grow past {}", u64::MAX)]
    EpochExhausted,
    #[error("lease margin {margin} ms must be less than the duration {duration} ms")]
    MarginTooLarge { margin: Millis, duration: Millis },
    #[error(
        "lease renewal after {renew_after} ms must be more than 0 and less than the duration \
         less the margin ({limit} ms)"
    )]
    RenewalOutOfRange { renew_after: Millis, limit: Millis },
}

fn held_by(holder: &Option<String>) -> String {
    match holder {
        Some(h) => format!(", held by {h}"),
        None => ", released".into(),
    }
}

impl Lease {
    /// Whether nobody holds the lease at `now` (never taken, released, or
    /// expired: `expires_at` itself is already expired).
    pub fn is_free(&self, now: Millis) -> bool {
        self.holder.as_ref().is_none_or(|h| now >= h.expires_at)
    }

    /// Takes a free lease for `server`, with the next epoch. A server may
    /// take its own unexpired lease again (it restarted and lost its
    /// epoch): the new epoch fences its previous incarnation.
    pub fn take(&self, server: &str, now: Millis, duration: Millis) -> Result<Lease, LeaseError> {
        if duration == 0 {
            return Err(LeaseError::ZeroDuration);
        }
        if let Some(h) = &self.holder {
            if now < h.expires_at && h.server != server {
                return Err(LeaseError::HeldBy {
                    holder: h.server.clone(),
                    expires_at: h.expires_at,
                });
            }
        }
        let epoch = self.epoch.checked_add(1).ok_or(LeaseError::EpochExhausted)?;
        Ok(Lease {
            epoch,
            holder: Some(Holder {
                server: server.to_string(),
                expires_at: now.saturating_add(duration),
            }),
        })
    }

    /// Hands the lease from its holder (`server` at `epoch`) to `to`, with
    /// the next epoch: the `backy-server` command that moves a job.
    pub fn hand_over(
        &self,
        server: &str,
        epoch: u64,
        to: &str,
        now: Millis,
        duration: Millis,
    ) -> Result<Lease, LeaseError> {
        self.check_held(server, epoch, now)?;
        Lease {
            epoch: self.epoch,
            holder: None,
        }
        .take(to, now, duration)
    }

    /// Extends the holder's lease to `now + duration`. A lease that lapsed
    /// but that nobody took since is renewed too: no other server wrote
    /// under a newer epoch.
    pub fn renew(
        &self,
        server: &str,
        epoch: u64,
        now: Millis,
        duration: Millis,
    ) -> Result<Lease, LeaseError> {
        if duration == 0 {
            return Err(LeaseError::ZeroDuration);
        }
        self.check_epoch(server, epoch)?;
        Ok(Lease {
            epoch,
            holder: Some(Holder {
                server: server.to_string(),
                expires_at: now.saturating_add(duration),
            }),
        })
    }

    /// Gives the lease up: free at once, its epoch kept so that the next
    /// take is still a newer one.
    pub fn release(&self, server: &str, epoch: u64) -> Result<Lease, LeaseError> {
        self.check_epoch(server, epoch)?;
        Ok(Lease { epoch, holder: None })
    }

    /// Whether `server` may commit a revision at `now` with `epoch`: it
    /// holds the lease at exactly that epoch and the lease has not expired.
    pub fn may_commit(&self, server: &str, epoch: u64, now: Millis) -> Result<(), LeaseError> {
        self.check_held(server, epoch, now)
    }

    fn check_held(&self, server: &str, epoch: u64, now: Millis) -> Result<(), LeaseError> {
        let expires_at = self.check_epoch(server, epoch)?;
        if now >= expires_at {
            return Err(LeaseError::Expired {
                epoch,
                expired_at: expires_at,
            });
        }
        Ok(())
    }

    /// The holder's expiry when `server` holds the lease at `epoch`.
    fn check_epoch(&self, server: &str, epoch: u64) -> Result<Millis, LeaseError> {
        match &self.holder {
            Some(h) if h.server == server && self.epoch == epoch => Ok(h.expires_at),
            other => Err(LeaseError::Lost {
                yours: epoch,
                current: self.epoch,
                holder: other.as_ref().map(|h| h.server.clone()),
            }),
        }
    }
}

/// A holder's timing, on its own clock. The holder cannot know when the
/// deciding clock saw its request, only when it sent it: counting from the
/// send, less a margin for clock rate differences, it stops writing before
/// any other server can take the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    pub duration: Millis,
    /// Renew this long after the last successful take or renewal was sent.
    pub renew_after: Millis,
    /// Stop writing this long before the lease could expire.
    pub margin: Millis,
}

impl LeaseTimes {
    /// Checks that a holder renews before it must stop writing.
    pub fn new(duration: Millis, renew_after: Millis, margin: Millis) -> Result<Self, LeaseError> {
        if margin >= duration {
            return Err(LeaseError::MarginTooLarge { margin, duration });
        }
        let limit = duration - margin;
        if renew_after == 0 || renew_after >= limit {
            return Err(LeaseError::RenewalOutOfRange { renew_after, limit });
        }
        Ok(LeaseTimes {
            duration,
            renew_after,
            margin,
        })
    }

    /// When to renew, for a take or renewal sent at `sent_at`.
    pub fn renew_at(&self, sent_at: Millis) -> Millis {
        sent_at.saturating_add(self.renew_after)
    }

    /// When the holder must stop writing, for its last successful take or
    /// renewal sent at `sent_at`.
    pub fn stop_writing_at(&self, sent_at: Millis) -> Millis {
        sent_at.saturating_add(self.duration - self.margin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Taken = Result<Lease, LeaseError>;
    type Commit = Result<(), LeaseError>;

    fn held(server: &str, epoch: u64, expires_at: Millis) -> Lease {
        Lease {
            epoch,
            holder: Some(Holder {
                server: server.into(),
                expires_at,
            }),
        }
    }

    fn released(epoch: u64) -> Lease {
        Lease { epoch, holder: None }
    }

    fn lost(yours: u64, current: u64, holder: Option<&str>) -> LeaseError {
        LeaseError::Lost {
            yours,
            current,
            holder: holder.map(String::from),
        }
    }

    #[test]
    fn take() {
        let busy = |h: &str, at| LeaseError::HeldBy {
            holder: h.into(),
            expires_at: at,
        };
        let cases: Vec<(&str, Lease, &str, Millis, Taken)> = vec![
            ("never taken", Lease::default(), "a", 0, Ok(held("a", 1, 60))),
            ("released", released(4), "b", 10, Ok(held("b", 5, 70))),
            ("held by another", held("a", 4, 100), "b", 99, Err(busy("a", 100))),
            (
                "expired exactly now",
                held("a", 4, 100),
                "b",
                100,
                Ok(held("b", 5, 160)),
            ),
            (
                "long expired",
                held("a", 4, 100),
                "b",
                1000,
                Ok(held("b", 5, 1060)),
            ),
            (
                "own, restarted",
                held("a", 4, 100),
                "a",
                50,
                Ok(held("a", 5, 110)),
            ),
            (
                "epoch exhausted",
                released(u64::MAX),
                "a",
                0,
                Err(LeaseError::EpochExhausted),
            ),
            (
                "time saturates",
                released(0),
                "a",
                u64::MAX - 1,
                Ok(held("a", 1, u64::MAX)),
            ),
        ];
        for (name, lease, server, now, expected) in cases {
            assert_eq!(lease.take(server, now, 60), expected, "{name}");
        }
        assert_eq!(Lease::default().take("a", 0, 0), Err(LeaseError::ZeroDuration));
    }

    #[test]
    fn renew_release_and_commit() {
        let lease = held("a", 4, 100);
        type Op = fn(&Lease) -> Result<Lease, LeaseError>;
        let cases: Vec<(&str, Lease, Op, Result<Lease, LeaseError>)> = vec![
            (
                "renew in time",
                lease.clone(),
                |l| l.renew("a", 4, 50, 60),
                Ok(held("a", 4, 110)),
            ),
            (
                "renew lapsed, not taken",
                lease.clone(),
                |l| l.renew("a", 4, 500, 60),
                Ok(held("a", 4, 560)),
            ),
            (
                "renew old epoch",
                lease.clone(),
                |l| l.renew("a", 3, 50, 60),
                Err(lost(3, 4, Some("a"))),
            ),
            (
                "renew taken over",
                held("b", 5, 200),
                |l| l.renew("a", 4, 50, 60),
                Err(lost(4, 5, Some("b"))),
            ),
            (
                "renew released",
                released(4),
                |l| l.renew("a", 4, 50, 60),
                Err(lost(4, 4, None)),
            ),
            (
                "renew zero",
                lease.clone(),
                |l| l.renew("a", 4, 50, 0),
                Err(LeaseError::ZeroDuration),
            ),
            ("release", lease.clone(), |l| l.release("a", 4), Ok(released(4))),
            (
                "release by another",
                lease.clone(),
                |l| l.release("b", 4),
                Err(lost(4, 4, Some("a"))),
            ),
            (
                "hand over",
                lease.clone(),
                |l| l.hand_over("a", 4, "b", 50, 60),
                Ok(held("b", 5, 110)),
            ),
            (
                "hand over expired",
                lease.clone(),
                |l| l.hand_over("a", 4, "b", 100, 60),
                Err(LeaseError::Expired {
                    epoch: 4,
                    expired_at: 100,
                }),
            ),
            (
                "hand over by a non-holder",
                lease.clone(),
                |l| l.hand_over("b", 4, "b", 50, 60),
                Err(lost(4, 4, Some("a"))),
            ),
        ];
        for (name, lease, op, expected) in cases {
            assert_eq!(op(&lease), expected, "{name}");
        }

        let commits: Vec<(&str, &str, u64, Millis, Commit)> = vec![
            ("holder in time", "a", 4, 99, Ok(())),
            (
                "holder at expiry",
                "a",
                4,
                100,
                Err(LeaseError::Expired {
                    epoch: 4,
                    expired_at: 100,
                }),
            ),
            ("older epoch", "a", 3, 50, Err(lost(3, 4, Some("a")))),
            ("newer epoch", "a", 5, 50, Err(lost(5, 4, Some("a")))),
            ("other server", "b", 4, 50, Err(lost(4, 4, Some("a")))),
        ];
        for (name, server, epoch, now, expected) in commits {
            assert_eq!(lease.may_commit(server, epoch, now), expected, "{name}");
        }
    }

    /// The story of issue 36: A holds, stalls past its lease, B takes over,
    /// A comes back and is refused at commit and at renewal; B commits.
    #[test]
    fn a_holder_that_lost_its_lease_is_fenced() {
        let d = 60_000;
        let a = Lease::default().take("A", 0, d).unwrap();
        assert_eq!(a.epoch, 1);
        let a = a.renew("A", 1, 20_000, d).unwrap();
        assert!(!a.is_free(79_999));
        assert!(a.is_free(80_000));
        assert!(matches!(a.take("B", 79_999, d), Err(LeaseError::HeldBy { .. })));
        let b = a.take("B", 80_000, d).unwrap();
        assert_eq!(b.epoch, 2);
        assert_eq!(b.may_commit("A", 1, 80_001), Err(lost(1, 2, Some("B"))));
        assert_eq!(b.renew("A", 1, 80_001, d), Err(lost(1, 2, Some("B"))));
        assert_eq!(b.may_commit("B", 2, 80_001), Ok(()));
        // Epochs only grow, through releases too.
        let c = b.release("B", 2).unwrap().take("A", 90_000, d).unwrap();
        assert_eq!(c.epoch, 3);
        assert_eq!(
            c.to_owned().may_commit("A", 1, 90_001),
            Err(lost(1, 3, Some("A")))
        );
    }

    #[test]
    fn messages() {
        assert_eq!(
            lost(3, 4, Some("b")).to_string(),
            "lease epoch 3 was lost: the lease is at epoch 4, held by b"
        );
        assert_eq!(
            lost(3, 4, None).to_string(),
            "lease epoch 3 was lost: the lease is at epoch 4, released"
        );
        assert_eq!(
            LeaseError::HeldBy {
                holder: "srv-a".into(),
                expires_at: 5
            }
            .to_string(),
            "the job's lease is held by srv-a until 5 ms"
        );
    }

    #[test]
    fn holder_times() {
        let t = LeaseTimes::new(60_000, 20_000, 5_000).unwrap();
        assert_eq!(t.renew_at(1_000), 21_000);
        assert_eq!(t.stop_writing_at(1_000), 56_000);
        // The holder stops before the deciding clock can free the lease,
        // whenever that clock saw the request after it was sent.
        let lease = Lease::default().take("a", 1_000, t.duration).unwrap();
        assert!(!lease.is_free(t.stop_writing_at(1_000)));
        let bad = [
            (
                60_000,
                20_000,
                60_000,
                "lease margin 60000 ms must be less than the duration 60000 ms",
            ),
            (
                60_000,
                55_000,
                5_000,
                "lease renewal after 55000 ms must be more than 0 and less than the duration less \
                 the margin (55000 ms)",
            ),
            (
                60_000,
                0,
                5_000,
                "lease renewal after 0 ms must be more than 0 and less than the duration less the \
                 margin (55000 ms)",
            ),
        ];
        for (d, r, m, message) in bad {
            assert_eq!(LeaseTimes::new(d, r, m).unwrap_err().to_string(), message);
        }
    }

    proptest::proptest! {
        /// Whatever servers do in whatever order: epochs never go back, a
        /// take or hand-over always gives a new one, and at any moment at
        /// most one of all epochs ever given out may commit.
        #[test]
        fn one_committer_at_a_time(ops in proptest::collection::vec((0u8..5, 0usize..3, 0u64..50, 1u64..80), 0..40)) {
            let servers = ["a", "b", "c"];
            let mut lease = Lease::default();
            let mut now = 0;
            let mut given: Vec<(&str, u64)> = Vec::new();
            for (op, who, dt, duration) in ops {
                now += dt;
                let server = servers[who];
                let mine = given.iter().rev().find(|(s, _)| *s == server).map_or(0, |g| g.1);
                let next = match op {
                    0 => lease.take(server, now, duration),
                    1 => lease.renew(server, mine, now, duration),
                    2 => lease.release(server, mine),
                    3 => lease.hand_over(server, mine, servers[(who + 1) % 3], now, duration),
                    _ => lease.may_commit(server, mine, now).map(|()| lease.clone()),
                };
                if let Ok(next) = next {
                    proptest::prop_assert!(next.epoch >= lease.epoch);
                    if op == 0 || op == 3 {
                        proptest::prop_assert_eq!(next.epoch, lease.epoch + 1);
                        let holder = next.holder.as_ref().map(|h| h.server.as_str());
                        given.push((servers.into_iter().find(|s| Some(*s) == holder).unwrap_or("?"), next.epoch));
                    }
                    lease = next;
                }
                let committers = given.iter().filter(|(s, e)| lease.may_commit(s, *e, now).is_ok()).count();
                proptest::prop_assert!(committers <= 1, "{} may commit at {}", committers, now);
            }
        }
    }
}
