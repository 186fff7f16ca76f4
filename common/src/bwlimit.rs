//! Bandwidth limits (issue 34): a token bucket that says how long a sender
//! must wait before the bytes it just took may go. Pure: the caller passes
//! the time and does the waiting. One bucket serves every sender of a
//! process (the agent's concurrent pushes share the client's limit), so
//! the limit holds for their sum.
//!
//! Takers go into debt instead of waiting for tokens to appear: each one
//! learns at once when its bytes are paid for, so concurrent takers queue
//! in the order they came, and a frame larger than the burst still goes.
//! Over any span of `t` seconds at most `rate * t + burst` bytes are let
//! through.

use crate::error::{Error, Result};
use std::time::{Duration, Instant};

/// A rate in bytes per second, written as the config's sizes: `10M` (or
/// `10M/s`) is 10 MiB a second.
pub fn parse_rate(s: &str) -> Result<u64> {
    let t = s.trim();
    let size = t.strip_suffix("/s").unwrap_or(t);
    let rate = crate::units::parse_bytes(size).map_err(|_| {
        Error::invalid(format!(
            "bad bandwidth limit {s:?}: bytes a second like 10M or 512K"
        ))
    })?;
    if rate == 0 {
        return Err(Error::invalid(format!(
            "bandwidth limit {s:?} is 0: leave it out for no limit"
        )));
    }
    Ok(rate)
}

/// Bytes let through at once after an idle spell: a tenth of a second's
/// worth, so a 30 s transfer is held within a third of a percent, and at
/// least 64 KiB.
pub fn default_burst(rate: u64) -> u64 {
    (rate / 10).max(64 << 10)
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Bytes that may go now; negative: the debt takers are waiting off.
    level: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now` of `rate` bytes a second (> 0).
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        TokenBucket {
            rate: rate.max(1),
            burst,
            level: burst as f64,
            at: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// A new rate from `now` on; the debt stays (it was taken at the old
    /// rate, and is paid off at the new one).
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(1);
        self.burst = default_burst(self.rate);
        self.level = self.level.min(self.burst as f64);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.level = (self.level + elapsed * self.rate as f64).min(self.burst as f64);
    }

    /// Takes `bytes` at `now` and returns how long the taker waits before
    /// sending them (zero while the bucket holds them).
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refill(now);
        self.level -= bytes as f64;
        if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.rate as f64)
        }
    }
}

/// A [`TokenBucket`] shared by a process's senders, which wait in their
/// own (blocking) threads: the one edge of this module that sleeps.
#[derive(Debug, Default)]
pub struct Limiter {
    /// `None`: no limit.
    bucket: std::sync::Mutex<Option<TokenBucket>>,
}

impl Limiter {
    /// A limiter of `rate` bytes a second; `None`: unlimited until set.
    pub fn new(rate: Option<u64>) -> std::sync::Arc<Self> {
        let limiter = std::sync::Arc::new(Limiter::default());
        limiter.set_rate(rate);
        limiter
    }

    /// A new rate from now on (a config read again); `None`: no limit.
    pub fn set_rate(&self, rate: Option<u64>) {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match (rate, bucket.as_mut()) {
            (None, _) => *bucket = None,
            (Some(r), Some(b)) if b.rate() == r => {}
            (Some(r), Some(b)) => b.set_rate(r, now),
            (Some(r), None) => *bucket = Some(TokenBucket::new(r, default_burst(r), now)),
        }
    }

    /// Waits (blocking the calling thread) until `bytes` may go.
    pub fn wait(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let wait = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            match bucket.as_mut() {
                Some(b) => b.take(bytes, Instant::now()),
                None => return,
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn rates_parse_as_sizes() {
        assert_eq!(parse_rate("10M").unwrap(), 10 * MIB);
        assert_eq!(parse_rate("10M/s").unwrap(), 10 * MIB);
        assert_eq!(parse_rate("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        for bad in ["", "fast", "10X", "-1M"] {
            assert!(
                parse_rate(bad)
                    .unwrap_err()
                    .message
                    .contains("bad bandwidth limit"),
                "{bad}"
            );
        }
        assert!(parse_rate("0").unwrap_err().message.contains("is 0"));
    }

    #[test]
    fn a_full_bucket_lets_the_burst_through_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(MIB, 100 << 10, t0);
        assert_eq!(b.take(100 << 10, t0), Duration::ZERO);
        // Another MiB at once: a second's debt.
        assert_eq!(b.take(MIB, t0), Duration::from_secs(1));
        // Half a second later half of it is paid.
        let t = t0 + Duration::from_millis(500);
        assert_eq!(b.take(0, t), Duration::from_millis(500));
    }

    #[test]
    fn concurrent_takers_share_one_rate() {
        // Two senders of 1 MiB frames each, each sending when its wait is
        // over: together they get the one rate.
        let rate = 4 * MIB;
        let t0 = Instant::now();
        let mut b = TokenBucket::new(rate, default_burst(rate), t0);
        let mut next = [t0, t0];
        let mut sent = 0u64;
        let end = t0 + Duration::from_secs(30);
        loop {
            let who = if next[0] <= next[1] { 0 } else { 1 };
            let now = next[who];
            if now >= end {
                break;
            }
            let wait = b.take(MIB, now);
            next[who] = now + wait;
            if next[who] < end {
                sent += MIB;
            }
        }
        let secs = 30.0;
        let got = sent as f64 / secs;
        assert!((got - rate as f64).abs() <= rate as f64 * 0.02, "{got} vs {rate}");
    }

    #[test]
    fn idle_time_fills_no_more_than_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(MIB, 64 << 10, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take(64 << 10, later), Duration::ZERO);
        assert!(b.take(MIB, later) >= Duration::from_millis(999));
    }

    #[test]
    fn a_new_rate_pays_off_the_debt_at_that_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(MIB, 0, t0);
        assert_eq!(b.take(2 * MIB, t0), Duration::from_secs(2));
        b.set_rate(2 * MIB, t0);
        assert_eq!(b.rate(), 2 * MIB);
        assert_eq!(b.take(0, t0), Duration::from_secs(1));
        // Time going backwards (another taker's older `now`) adds nothing.
        assert_eq!(b.take(0, t0 - Duration::from_millis(5)), Duration::from_secs(1));
    }
}
