//! What `/metrics` answers (README "Monitoring"): the server's counters
//! ([`crate::metrics`]) and, computed at scrape time, store-wide values and
//! the per-job gauges of the jobs the caller may see, from the job
//! summaries `status` builds, so thousands of jobs cost nothing between
//! scrapes.

use crate::auth::{self, Action, Caller};
use crate::state::Server;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// The server-wide metrics, registered once (handles share the counters).
pub fn registry(server: &Arc<Server>) -> Registry {
    let mut r = Registry::default();
    server.metrics.register(&mut r);
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
            gauge(
                &mut e,
                "backy_base_dir_used_bytes",
                "Bytes used on the base dir's filesystem (as df counts them)",
                fs.f_blocks.saturating_sub(fs.f_bfree).saturating_mul(frsize),
            )?;
        }
        gauge(&mut e, "backy_jobs", "Configured jobs", config.jobs.len() as u64)?;
        // The digest index (deduplication): 64 shard headers read.
        if let Some(Ok(stats)) = server.jobs.hints.index().map(|i| i.stats()) {
            gauge(
                &mut e,
                "backy_dedup_index_entries",
                "Block digests in the store's deduplication index",
                stats.live,
            )?;
            gauge(
                &mut e,
                "backy_dedup_index_bytes",
                "Bytes of the deduplication index's files (read a bucket at a time, never held in memory)",
                stats.bytes,
            )?;
        }
        // Scrub progress: revisions whose last check (a verify, or the
        // commit) is older than scrub.interval. On a pool, every job's
        // records (the backlog of the fleet; each holder scrubs its own).
        let interval =
            chrono::Duration::from_std(config.scrub.interval.as_duration()).unwrap_or(chrono::Duration::MAX);
        let now = chrono::Utc::now();
        let pool = server.pool();
        let (mut total, mut due) = (0u64, 0u64);
        let mut count = |revs: &[backy_common::revision::RevisionMeta]| {
            for r in revs {
                total += 1;
                let checked = r.verified_at.unwrap_or(r.timestamp);
                if checked.checked_add_signed(interval).is_some_and(|t| t <= now) {
                    due += 1;
                }
            }
        };
        for name in config.jobs.keys() {
            match &pool {
                Some(pool) => {
                    if let Ok(revs) = pool.revisions(name) {
                        count(&revs);
                    }
                }
                None => {
                    let job = crate::storage::JobDir::new(&config.base_dir, name.clone());
                    if let Ok(entry) = server.jobs.indexed(&job) {
                        count(&entry.revisions);
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
        let last = server.metrics.scrub_last();
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
                "backy_job_used_bytes",
                "Disk the job's revisions take, each shared extent once: exclusive + shared (absent when the filesystem cannot tell)",
                vec![],
            ),
            (
                "backy_job_exclusive_bytes",
                "Bytes in extents of the job's files that no other file references (absent when unknown)",
                vec![],
            ),
            (
                "backy_job_shared_bytes",
                "Bytes in shared extents of the job's files, each physical extent once (absent when unknown)",
                vec![],
            ),
            (
                "backy_job_total_bytes",
                "Bytes in extents of the job's files, shared ones counted per file (absent when unknown)",
                vec![],
            ),
            (
                "backy_job_disk_bytes",
                "Bytes the job's revisions take on disk after compression, each extent once (absent when nothing is compressed or the filesystem cannot tell)",
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
            (
                "backy_job_tracker_missed_blocks",
                "Sampled blocks the change tracker of the newest revision's push called unchanged that differed (absent when it audited none)",
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
                s.space
                    .as_ref()
                    .map(|u| u.exclusive_bytes.saturating_add(u.shared_bytes) as f64),
                s.space.as_ref().map(|u| u.exclusive_bytes as f64),
                s.space.as_ref().map(|u| u.shared_bytes as f64),
                s.space.as_ref().map(|u| u.total_bytes as f64),
                s.space
                    .as_ref()
                    .and_then(|u| (u.disk_bytes > 0).then_some(u.disk_bytes as f64)),
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
                newest.and_then(|n| n.audit.as_ref()).map(|a| a.mismatched as f64),
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
                ConstGauge::new(v).encode(m.encode_family(&[("backy_job", job)])?)?;
            }
        }
        Ok(())
    }
}
