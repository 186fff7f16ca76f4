//! Prometheus metrics (README "Monitoring"). Counters and histograms are
//! updated where the work happens, through the few hooks here; everything
//! per job is computed at scrape time from the index, the way `status` is
//! (`crate::status::summary`), so thousands of jobs cost nothing between
//! scrapes.

use crate::auth::{self, Action, Caller};
use crate::state::Server;
use backy_common::schedule::TagRemoval;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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

/// The server-wide metrics, registered once (handles share the counters).
pub fn registry(server: &Arc<Server>) -> Registry {
    let m = &server.metrics;
    let mut r = Registry::default();
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
    r.register_collector(Box::new(HostCollector(server.clone())));
    r
}

/// The per-job metrics `caller` may see, computed now (a registry per
/// scrape: the caller decides which jobs are in it).
pub fn job_registry(server: &Arc<Server>, caller: &Caller) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(JobCollector {
        server: server.clone(),
        caller: caller.clone(),
    }));
    r
}

/// Encodes the server-wide and the caller's per-job metrics in the
/// Prometheus text format (0.0.4).
pub fn render(host: &Registry, server: &Arc<Server>, caller: &Caller) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, host)?;
    prometheus_client::encoding::prometheus_text::encode(&mut out, &job_registry(server, caller))?;
    Ok(out)
}

fn gauge<V>(e: &mut DescriptorEncoder, name: &str, help: &str, value: V) -> Result<(), std::fmt::Error>
where
    ConstGauge<V>: EncodeMetric,
{
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// Store-wide values read at scrape time.
struct HostCollector(Arc<Server>);

impl std::fmt::Debug for HostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostCollector")
    }
}

impl Collector for HostCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let server = &self.0;
        let config = server.config();
        let info = ConstGauge::new(1i64);
        let mut m = e.encode_descriptor(
            "backy_build_info",
            "The running backy-server: version and protocol as labels",
            None,
            info.metric_type(),
        )?;
        let labels = [
            ("version", backy_proto::VERSION.to_string()),
            ("protocol", backy_proto::PROTOCOL.to_string()),
        ];
        info.encode(m.encode_family(&labels)?)?;
        if let Ok(fs) = rustix::fs::statvfs(&config.base_dir) {
            let frsize = fs.f_frsize.max(1);
            gauge(
                &mut e,
                "backy_base_dir_free_bytes",
                "Bytes available to the server on the base dir's filesystem",
                fs.f_bavail.saturating_mul(frsize),
            )?;
            gauge(
                &mut e,
                "backy_base_dir_size_bytes",
                "Size of the base dir's filesystem",
                fs.f_blocks.saturating_mul(frsize),
            )?;
        }
        gauge(&mut e, "backy_jobs", "Configured jobs", config.jobs.len() as u64)?;
        // Scrub progress: revisions whose last check (a verify, or the
        // commit) is older than scrub.interval.
        let interval =
            chrono::Duration::from_std(config.scrub.interval.as_duration()).unwrap_or(chrono::Duration::MAX);
        let now = chrono::Utc::now();
        let (mut total, mut due) = (0u64, 0u64);
        for name in config.jobs.keys() {
            let job = crate::storage::JobDir::new(&config.base_dir, name.clone());
            if let Ok(entry) = server.indexed(&job) {
                for r in &entry.revisions {
                    total += 1;
                    let checked = r.verified_at.unwrap_or(r.timestamp);
                    if checked.checked_add_signed(interval).is_some_and(|t| t <= now) {
                        due += 1;
                    }
                }
            }
        }
        gauge(
            &mut e,
            "backy_revisions",
            "Committed revisions of all jobs",
            total,
        )?;
        gauge(
            &mut e,
            "backy_scrub_due_revisions",
            "Revisions not checked within scrub.interval (the scrub's backlog)",
            due,
        )?;
        let last = server.metrics.scrub_last.load(Ordering::Relaxed);
        if last > 0 {
            gauge(
                &mut e,
                "backy_scrub_last_timestamp_seconds",
                "When the background scrub last finished a revision",
                last,
            )?;
        }
        Ok(())
    }
}

/// Per-job gauges from the job summaries `status` builds.
struct JobCollector {
    server: Arc<Server>,
    caller: Caller,
}

impl std::fmt::Debug for JobCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobCollector")
            .field("caller", &self.caller)
            .finish()
    }
}

/// One gauge family with a sample per job.
type PerJob<'a> = (&'static str, &'static str, Vec<(&'a str, f64)>);

impl Collector for JobCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let config = self.server.config();
        let summaries: Vec<_> = config
            .jobs
            .keys()
            .filter(|n| auth::may_see(&config, &self.caller, n, Action::Read))
            .filter_map(|n| match crate::status::summary(&self.server, &config, n) {
                Ok(s) => Some(s),
                Err(err) => {
                    tracing::warn!(job = %n, "metrics: {err}");
                    None
                }
            })
            .collect();
        let ts = |t: &Option<backy_proto::prost_types::Timestamp>| {
            t.as_ref().map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
        };
        let mut families: Vec<PerJob> = vec![
            (
                "backy_job_last_success_timestamp_seconds",
                "When the job's newest revision was made (absent without revisions)",
                vec![],
            ),
            (
                "backy_job_sla_ok",
                "1 while the newest trusted revision is within the SLA (always 1 without schedule)",
                vec![],
            ),
            (
                "backy_job_sla_overdue_seconds",
                "How far the job is past its SLA deadline",
                vec![],
            ),
            ("backy_job_revisions", "Committed revisions of the job", vec![]),
            (
                "backy_job_distrusted_revisions",
                "Revisions of the job that failed a verify",
                vec![],
            ),
            (
                "backy_job_logical_bytes",
                "Image size of the job's newest revision",
                vec![],
            ),
            (
                "backy_job_allocated_bytes",
                "Bytes allocated on disk by the job's files (shared extents counted per file)",
                vec![],
            ),
            (
                "backy_job_consecutive_failures",
                "Push failures since the job's last success",
                vec![],
            ),
            (
                "backy_job_last_push_duration_seconds",
                "Duration of the push that made the newest revision",
                vec![],
            ),
            (
                "backy_job_last_push_received_bytes",
                "Data bytes the push of the newest revision sent",
                vec![],
            ),
            (
                "backy_job_next_due_timestamp_seconds",
                "When the job is next due (absent without schedule)",
                vec![],
            ),
            ("backy_job_running", "1 while a push of the job runs", vec![]),
            (
                "backy_job_replica_lag_seconds",
                "On a replica: how far its copy of the job is behind the source (absent elsewhere)",
                vec![],
            ),
            (
                "backy_job_replica_missing_revisions",
                "On a replica: source revisions not copied yet, as of the last round (absent elsewhere)",
                vec![],
            ),
            (
                "backy_job_replica_failing",
                "On a replica: 1 while rounds fail for the job (absent elsewhere)",
                vec![],
            ),
        ];
        for s in &summaries {
            let newest = s.newest.as_ref();
            let values = [
                newest.and_then(|n| ts(&n.timestamp)),
                Some(f64::from(u8::from(s.sla_ok))),
                Some(s.sla_overdue_secs as f64),
                Some(f64::from(s.revisions)),
                Some(f64::from(s.distrusted)),
                newest.map(|n| n.size as f64),
                Some(s.allocated_bytes as f64),
                Some(f64::from(s.failures)),
                newest.map(|n| n.duration_secs),
                newest.map(|n| n.bytes_received as f64),
                ts(&s.next_due),
                Some(f64::from(u8::from(s.running))),
                s.replica.as_ref().map(|r| r.lag_secs as f64),
                s.replica.as_ref().map(|r| f64::from(r.missing)),
                s.replica
                    .as_ref()
                    .map(|r| f64::from(u8::from(!r.last_error.is_empty()))),
            ];
            for (family, value) in families.iter_mut().zip(values) {
                if let Some(v) = value {
                    family.2.push((s.job.as_str(), v));
                }
            }
        }
        for (name, help, samples) in families {
            let mut m =
                e.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for (job, v) in samples {
                ConstGauge::new(v).encode(m.encode_family(&[("job", job)])?)?;
            }
        }
        Ok(())
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
