//! How many log lines of refused requests one peer may cause: the first
//! few per interval are logged, the rest only counted, and when the
//! interval ends one summary says how many were left out. A flood from one
//! address then costs a handful of lines per interval instead of thousands
//! a second (which the journal would drop, audit lines of others included).
//!
//! Memory is bounded: at most [`Limits::peers`] peers are tracked one by
//! one; refusals from further peers, while the table is full, share one
//! window of their own. Pure: the caller passes the time.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The rate and the table's size.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Lines logged per peer and interval.
    pub lines: u32,
    pub interval: Duration,
    /// Peers tracked one by one.
    pub peers: usize,
}

impl Limits {
    /// The server's: 5 lines per peer every 10 s, 4,096 peers.
    pub const REFUSALS: Limits = Limits {
        lines: 5,
        interval: Duration::from_secs(10),
        peers: 4096,
    };
}

/// One peer's current interval.
#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    /// Refusals not logged, by kind (a handful of kinds).
    suppressed: Vec<(&'static str, u64)>,
}

impl Window {
    fn new(now: Instant) -> Self {
        Window {
            start: now,
            logged: 0,
            suppressed: Vec::new(),
        }
    }

    fn summary<K>(self, peer: Option<K>, now: Instant) -> Option<Summary<K>> {
        let total: u64 = self.suppressed.iter().map(|(_, n)| n).sum();
        (total > 0).then(|| Summary {
            peer,
            suppressed: total,
            kinds: self.suppressed,
            secs: now.saturating_duration_since(self.start).as_secs_f64().ceil() as u64,
        })
    }
}

/// Refusals that were counted instead of logged.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary<K> {
    /// `None`: peers beyond the table, together.
    pub peer: Option<K>,
    pub suppressed: u64,
    /// The same count by kind.
    pub kinds: Vec<(&'static str, u64)>,
    /// How long the interval was, in whole seconds (rounded up).
    pub secs: u64,
}

impl<K: std::fmt::Display> Summary<K> {
    /// "suppressed N refusals from PEER in the last S s (KIND N, ...)".
    pub fn text(&self) -> String {
        let from = match &self.peer {
            Some(p) => p.to_string(),
            None => "other peers (too many to track each)".to_string(),
        };
        let kinds: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        format!(
            "suppressed {} refusals from {from} in the last {} s ({})",
            self.suppressed,
            self.secs,
            kinds.join(", ")
        )
    }
}

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub struct Admit<K> {
    /// Log this refusal's line.
    pub log: bool,
    /// A summary of the peer's previous interval, to log first.
    pub summary: Option<Summary<K>>,
}

/// Per-peer windows.
#[derive(Debug)]
pub struct Throttle<K> {
    limits: Limits,
    peers: HashMap<K, Window>,
    others: Option<Window>,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    pub fn new(limits: Limits) -> Self {
        Throttle {
            limits,
            peers: HashMap::new(),
            others: None,
        }
    }

    /// A refusal of kind `kind` from `peer` at `now`.
    pub fn admit(&mut self, peer: K, kind: &'static str, now: Instant) -> Admit<K> {
        let interval = self.limits.interval;
        let ended = |w: &Window| now.saturating_duration_since(w.start) >= interval;
        let mut summary = None;
        if self.peers.get(&peer).is_some_and(ended) {
            summary = self
                .peers
                .remove(&peer)
                .and_then(|w| w.summary(Some(peer.clone()), now));
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.limits.peers {
            // Make room from ended windows: a peer whose window ended and
            // who suppressed nothing needs no summary; one that did keeps
            // its place until the next flush reports it.
            self.peers.retain(|_, w| !(ended(w) && w.suppressed.is_empty()));
        }
        let window = if self.peers.contains_key(&peer) || self.peers.len() < self.limits.peers {
            self.peers.entry(peer).or_insert_with(|| Window::new(now))
        } else {
            if self.others.as_ref().is_some_and(ended) {
                summary = self.others.take().and_then(|w| w.summary(None, now));
            }
            self.others.get_or_insert_with(|| Window::new(now))
        };
        let log = window.logged < self.limits.lines;
        if log {
            window.logged += 1;
        } else {
            match window.suppressed.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => *n += 1,
                None => window.suppressed.push((kind, 1)),
            }
        }
        Admit { log, summary }
    }

    /// Ends every window whose interval is over: their summaries (those
    /// that suppressed anything), and their memory freed.
    pub fn flush(&mut self, now: Instant) -> Vec<Summary<K>> {
        let interval = self.limits.interval;
        let ended = |w: &Window| now.saturating_duration_since(w.start) >= interval;
        let done: Vec<K> = self
            .peers
            .iter()
            .filter(|(_, w)| ended(w))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in done {
            if let Some(s) = self.peers.remove(&k).and_then(|w| w.summary(Some(k), now)) {
                out.push(s);
            }
        }
        if self.others.as_ref().is_some_and(ended) {
            out.extend(self.others.take().and_then(|w| w.summary(None, now)));
        }
        out
    }

    /// Peers tracked one by one now.
    pub fn tracked(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        lines: 3,
        interval: Duration::from_secs(10),
        peers: 4,
    };

    #[test]
    fn a_peer_gets_a_few_lines_then_one_summary_with_the_count() {
        let t0 = Instant::now();
        let mut t = Throttle::new(LIMITS);
        let logged = (0..1000)
            .filter(|i| {
                t.admit("a", if i % 2 == 0 { "authenticate" } else { "permit" }, t0)
                    .log
            })
            .count();
        assert_eq!(logged, 3);
        // Another peer is not held back by the first.
        assert!(t.admit("b", "authenticate", t0).log);
        assert_eq!(t.flush(t0 + Duration::from_secs(9)), vec![]);
        let s = t.flush(t0 + Duration::from_millis(10_500));
        assert_eq!(s.len(), 1, "b suppressed nothing: {s:?}");
        assert_eq!(s[0].peer, Some("a"));
        assert_eq!(s[0].suppressed, 997);
        assert_eq!(s[0].kinds, vec![("permit", 499), ("authenticate", 498)]);
        assert_eq!(
            s[0].text(),
            "suppressed 997 refusals from a in the last 11 s (permit 499, authenticate 498)"
        );
        assert_eq!(t.tracked(), 0);
        // A new interval logs again.
        assert!(t.admit("a", "authenticate", t0 + Duration::from_secs(11)).log);
    }

    #[test]
    fn the_next_refusal_after_the_interval_brings_the_summary() {
        let t0 = Instant::now();
        let mut t = Throttle::new(LIMITS);
        for _ in 0..5 {
            t.admit("a", "authenticate", t0);
        }
        let a = t.admit("a", "authenticate", t0 + Duration::from_secs(10));
        assert!(a.log);
        assert_eq!(a.summary.map(|s| s.suppressed), Some(2));
        assert_eq!(t.flush(t0 + Duration::from_secs(30)), vec![]);
    }

    #[test]
    fn many_peers_share_one_window_beyond_the_table() {
        let t0 = Instant::now();
        let mut t = Throttle::new(LIMITS);
        let mut logged = 0;
        for peer in 0..10_000u32 {
            logged += usize::from(t.admit(peer, "authenticate", t0).log);
            assert!(t.tracked() <= LIMITS.peers);
        }
        // 4 tracked peers one line each, then 3 lines for all others.
        assert_eq!(logged, 4 + 3);
        let s = t.flush(t0 + LIMITS.interval);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].peer, None);
        assert_eq!(s[0].suppressed, 10_000 - 7);
        assert!(
            s[0].text()
                .starts_with("suppressed 9993 refusals from other peers"),
            "{}",
            s[0].text()
        );
        // Ended windows make room without a flush.
        assert!(t.admit(20_000, "authenticate", t0 + 2 * LIMITS.interval).log);
        assert_eq!(t.tracked(), 1);
    }
}
