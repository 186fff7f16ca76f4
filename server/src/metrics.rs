//! The server's Prometheus counters and histograms (README "Monitoring"),
//! updated where the work happens through the few hooks here. What a
//! scrape adds at read time (store and per-job gauges) is
//! [`crate::scrape`].

use backy_common::schedule::TagRemoval;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One label, with values from a closed set (never peer-supplied text).
type Label = [(&'static str, &'static str); 1];

/// What the server counts while it works. Cheap to update: atomics.
#[derive(Debug)]
pub struct Metrics {
    pushes: Family<Label, Counter>,
    push_seconds: Histogram,
    restores: Family<Label, Counter>,
    restore_seconds: Histogram,
    verifies: Family<Label, Counter>,
    verify_seconds: Histogram,
    verify_bytes: Counter,
    received_bytes: Counter,
    sent_bytes: Counter,
    expired: Family<Label, Counter>,
    scrubbed: Family<Label, Counter>,
    scrub_bytes: Counter,
    scrub_bad_blocks: Counter,
    scrub_last: Arc<AtomicI64>,
    streams: Family<Label, Gauge>,
}

/// Durations from 0.1 s to about 7 hours, ×4 per bucket.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 4.0, 10))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            pushes: Family::default(),
            push_seconds: duration_histogram(),
            restores: Family::default(),
            restore_seconds: duration_histogram(),
            verifies: Family::default(),
            verify_seconds: duration_histogram(),
            verify_bytes: Counter::default(),
            received_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            expired: Family::default(),
            scrubbed: Family::default(),
            scrub_bytes: Counter::default(),
            scrub_bad_blocks: Counter::default(),
            scrub_last: Arc::default(),
            streams: Family::default(),
        }
    }
}

/// An open stream of one kind; the gauge goes down when it drops.
pub struct ActiveStream(Gauge);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// A push stream ended: committed (with its duration) or failed.
    pub fn push_done(&self, committed: bool, took: Duration) {
        let outcome = if committed { "committed" } else { "failed" };
        self.pushes.get_or_create(&[("outcome", outcome)]).inc();
        if committed {
            self.push_seconds.observe(took.as_secs_f64());
        }
    }

    /// A push that failed on the client (its report, or an agent's).
    pub fn push_failed_on_client(&self) {
        self.pushes.get_or_create(&[("outcome", "client_failed")]).inc();
    }

    /// Data a push brought in (frame payloads as received).
    pub fn received(&self, bytes: usize) {
        self.received_bytes.inc_by(bytes as u64);
    }

    /// Data a restore sent out.
    pub fn sent(&self, bytes: usize) {
        self.sent_bytes.inc_by(bytes as u64);
    }

    /// A restore ended: "completed", "cancelled" (the client left) or "failed".
    pub fn restore_done(&self, outcome: &'static str, took: Duration) {
        self.restores.get_or_create(&[("outcome", outcome)]).inc();
        if outcome == "completed" {
            self.restore_seconds.observe(took.as_secs_f64());
        }
    }

    /// One revision verified on request: `bad_blocks` `None` when it failed.
    pub fn verify_done(&self, bad_blocks: Option<usize>, bytes: u64, took: Duration) {
        let outcome = match bad_blocks {
            None => "failed",
            Some(0) => "clean",
            Some(_) => "mismatch",
        };
        self.verifies.get_or_create(&[("outcome", outcome)]).inc();
        self.verify_bytes.inc_by(bytes);
        self.verify_seconds.observe(took.as_secs_f64());
    }

    /// One revision scrubbed: `bad_blocks` `None` when it failed.
    pub fn scrub_done(&self, bad_blocks: Option<usize>, bytes: u64) {
        let outcome = match bad_blocks {
            None => "failed",
            Some(0) => "clean",
            Some(_) => "mismatch",
        };
        self.scrubbed.get_or_create(&[("outcome", outcome)]).inc();
        self.scrub_bytes.inc_by(bytes);
        self.scrub_bad_blocks.inc_by(bad_blocks.unwrap_or(0) as u64);
        self.scrub_last
            .store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
    }

    /// Expiry deleted a revision; `removals` are the tags it lost and why.
    pub fn expired(&self, removals: Option<&Vec<TagRemoval>>) {
        self.expired
            .get_or_create(&[("reason", expiry_reason(removals))])
            .inc();
    }

    /// Counts an open stream of `kind` (push, restore, verify, manifest,
    /// jobs, agent) until the returned guard drops.
    pub fn stream(&self, kind: &'static str) -> ActiveStream {
        let g = self.streams.get_or_create(&[("kind", kind)]).clone();
        g.inc();
        ActiveStream(g)
    }
}

/// The reason label of an expiry deletion: a tag that ran out wins over one
/// outside the schedule; none removed means the revision had no tags.
fn expiry_reason(removals: Option<&Vec<TagRemoval>>) -> &'static str {
    let removals = removals.map(Vec::as_slice).unwrap_or_default();
    if removals.iter().any(|r| matches!(r, TagRemoval::Aged { .. })) {
        "aged"
    } else if removals.is_empty() {
        "untagged"
    } else {
        "not_in_schedule"
    }
}

impl Metrics {
    /// Registers the counters, histograms and gauges in `r` (handles share
    /// the values).
    pub fn register(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "backy_pushes",
            "Pushes by outcome: committed, failed (on the server), client_failed (reported by a client or agent)",
            m.pushes.clone(),
        );
        r.register(
            "backy_push_duration_seconds",
            "Duration of committed pushes as the server saw them",
            m.push_seconds.clone(),
        );
        r.register(
            "backy_restores",
            "Restores by outcome: completed, cancelled, failed",
            m.restores.clone(),
        );
        r.register(
            "backy_restore_duration_seconds",
            "Duration of completed restores",
            m.restore_seconds.clone(),
        );
        r.register(
            "backy_verifies",
            "Revisions verified on request, by outcome: clean, mismatch, failed",
            m.verifies.clone(),
        );
        r.register(
            "backy_verify_duration_seconds",
            "Duration of verifying one revision on request",
            m.verify_seconds.clone(),
        );
        r.register(
            "backy_verify_checked_bytes",
            "Bytes read and checked by verify requests",
            m.verify_bytes.clone(),
        );
        r.register(
            "backy_received_bytes",
            "Data bytes received in push streams",
            m.received_bytes.clone(),
        );
        r.register(
            "backy_sent_bytes",
            "Data bytes sent in restore streams",
            m.sent_bytes.clone(),
        );
        r.register(
            "backy_expired_revisions",
            "Revisions deleted by expiry, by reason: aged, not_in_schedule, untagged",
            m.expired.clone(),
        );
        r.register(
            "backy_scrub_revisions",
            "Revisions the background scrub checked, by outcome: clean, mismatch, failed",
            m.scrubbed.clone(),
        );
        r.register(
            "backy_scrub_checked_bytes",
            "Bytes read and checked by the background scrub",
            m.scrub_bytes.clone(),
        );
        r.register(
            "backy_scrub_mismatched_blocks",
            "Blocks the background scrub found different from their manifest",
            m.scrub_bad_blocks.clone(),
        );
        r.register(
            "backy_active_streams",
            "Open streams by kind: push, restore, verify, manifest, jobs, agent",
            m.streams.clone(),
        );
    }

    /// When the background scrub last finished a revision (0: never).
    pub fn scrub_last(&self) -> i64 {
        self.scrub_last.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_reasons_are_a_closed_set() {
        let rule = backy_common::config::TagRule {
            interval: backy_common::units::Interval::from_secs(60),
            keep: 1,
        };
        let aged = TagRemoval::Aged {
            tag: "daily".into(),
            rule,
        };
        let other = TagRemoval::NotInSchedule { tag: "x".into() };
        assert_eq!(expiry_reason(None), "untagged");
        assert_eq!(expiry_reason(Some(&vec![other.clone()])), "not_in_schedule");
        assert_eq!(expiry_reason(Some(&vec![other, aged])), "aged");
    }

    #[test]
    fn counters_encode_in_the_prometheus_text_format() {
        let m = Metrics::default();
        m.push_done(true, Duration::from_millis(300));
        m.push_done(false, Duration::from_secs(1));
        m.received(4096);
        let streams = m.stream("push");
        let mut r = Registry::default();
        r.register("backy_pushes", "p", m.pushes.clone());
        r.register("backy_push_duration_seconds", "d", m.push_seconds.clone());
        r.register("backy_received_bytes", "b", m.received_bytes.clone());
        r.register("backy_active_streams", "s", m.streams.clone());
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
        for line in [
            "# TYPE backy_pushes_total counter",
            "backy_pushes_total{outcome=\"committed\"} 1",
            "backy_pushes_total{outcome=\"failed\"} 1",
            "backy_push_duration_seconds_count 1",
            "backy_push_duration_seconds_bucket{le=\"0.4\"} 1",
            "backy_received_bytes_total 4096",
            "backy_active_streams{kind=\"push\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line:?} in\n{out}");
        }
        drop(streams);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
        assert!(out.contains("backy_active_streams{kind=\"push\"} 0"), "{out}");
    }
}
