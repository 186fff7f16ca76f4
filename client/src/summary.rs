//! `status` and `check` of a whole host: one summary per job, streamed by
//! the server (`Jobs`), so thousands of jobs never meet a message limit.
//! Formatting is pure: summaries in, text out.

use crate::connect::{status_error, Client};
use crate::status::{has_schedule, human_secs, overdue_json, table, utc_time};
use crate::view::{
    non_empty, rfc3339, storage_name, store_line, used_bytes, RevisionView, SpaceView, StoreView,
};
use backy_common::config::NO_SCHEDULE;
use backy_common::units::{count, format_bytes};
use backy_common::Result;
use backy_proto::{JobSummary, JobsRequest};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// Every job the caller may see, in name order.
pub async fn fetch_all(client: &mut Client) -> Result<Vec<JobSummary>> {
    let mut stream = client
        .jobs(JobsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = Vec::new();
    while let Some(summary) = stream.message().await.map_err(status_error)? {
        out.push(summary);
    }
    Ok(out)
}

/// One line per job: its SLA, newest backup and its age, when it is next
/// due, how many revisions and how much disk it has, and failures; ages
/// relative to `now`. Then a total.
pub fn format_summaries(jobs: &[JobSummary], now: DateTime<Utc>) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_string();
    }
    let header = [
        "Job",
        "Schedule",
        "SLA",
        "Last backup (UTC)",
        "Next due (UTC)",
        "Revs",
        "Used",
        "Failures",
    ];
    let rows: Vec<[String; 8]> = jobs.iter().map(|j| row(j, now)).collect();
    let mut out = String::new();
    table(&mut out, &header, &rows);
    let revisions: u64 = jobs.iter().map(|j| u64::from(j.revisions)).sum();
    // backy clones only within a job, so the jobs' uses add up (extents an
    // outside deduplication shares between jobs would count per job).
    let used: Option<u64> = jobs
        .iter()
        .map(|j| match &j.space {
            Some(s) => Some(used_bytes(s)),
            None if j.revisions == 0 => Some(0),
            None => None,
        })
        .sum();
    let late = jobs
        .iter()
        .filter(|j| has_schedule(&j.schedule) && !j.sla_ok)
        .count();
    out.push_str(&format!(
        "{}, {}, {}; {late} past their SLA\n",
        count(jobs.len() as u64, "job"),
        count(revisions, "revision"),
        used.map_or_else(
            || "space unknown".to_string(),
            |u| format!("{} used", format_bytes(u))
        )
    ));
    if let Some(store) = jobs.iter().find_map(|j| j.store.as_ref()) {
        out.push_str(&store_line(store));
    }
    out
}

/// A job's real use, `-` without revisions, `unknown` where the
/// filesystem cannot tell.
fn used_cell(j: &JobSummary) -> String {
    match &j.space {
        Some(s) => format_bytes(used_bytes(s)),
        None if j.revisions == 0 => "-".into(),
        None => "unknown".into(),
    }
}

fn row(j: &JobSummary, now: DateTime<Utc>) -> [String; 8] {
    let last = j
        .newest
        .as_ref()
        .map(|r| utc_time(&r.timestamp, now))
        .unwrap_or_else(|| "-".into());
    // A copy takes no pushes: its schedule, if any, only keeps copies.
    let copy = j.replica.as_ref().is_some_and(|r| !r.own_job);
    let next = if copy {
        "never (a copy)".into()
    } else if j.next_due.is_none() {
        "-".into()
    } else {
        format!("{} {}", utc_time(&j.next_due, now), j.next_tags.join(","))
    };
    let mut failures = j.failures.to_string();
    if j.running {
        failures.push_str(" (running)");
    }
    [
        j.job.clone(),
        if copy && !has_schedule(&j.schedule) {
            "copy".into()
        } else if j.schedule.is_empty() {
            NO_SCHEDULE.into()
        } else {
            j.schedule.clone()
        },
        sla_state(j),
        last,
        next,
        j.revisions.to_string(),
        used_cell(j),
        failures,
    ]
}

/// `OK`, `TOO OLD 3h 5m`, `NO BACKUP`, `NO TRUSTED`, `-` (no schedule) or,
/// for a replica's copy, `COPY lag 4m`.
fn sla_state(j: &JobSummary) -> String {
    if let Some(r) = &j.replica {
        // A copy: its lag behind the source stands for the SLA.
        let state = if r.lag_secs >= r.lag_critical_secs {
            " (CRITICAL)"
        } else if r.lag_secs >= r.lag_warning_secs || !r.last_error.is_empty() {
            " (WARNING)"
        } else {
            ""
        };
        format!("COPY lag {}{state}", human_secs(r.lag_secs))
    } else if !has_schedule(&j.schedule) {
        "-".into()
    } else if j.sla_ok {
        "OK".into()
    } else if j.revisions == 0 {
        "NO BACKUP".into()
    } else if j.sla_overdue_secs <= 0 {
        "NO TRUSTED".into()
    } else {
        format!("TOO OLD {}", human_secs(j.sla_overdue_secs.unsigned_abs()))
    }
}

/// `status --json` of a whole host.
#[derive(Debug, Serialize)]
pub struct SummariesView {
    pub jobs: Vec<SummaryView>,
    /// The store's filesystem; `null` when the server did not say.
    pub store: Option<StoreView>,
}

#[derive(Debug, Serialize)]
pub struct SummaryView {
    pub job: String,
    pub schedule: String,
    pub revisions: u32,
    pub distrusted: u32,
    pub newest: Option<RevisionView>,
    pub newest_trusted: Option<String>,
    pub data_bytes: u64,
    /// Shared extents counted per file: an upper bound (see `space`).
    pub allocated_bytes: u64,
    /// As in `status JOB --json`.
    pub space: Option<SpaceView>,
    pub storage: String,
    pub running: bool,
    /// `null` (like the next fields) when the job has no schedule.
    pub sla_ok: Option<bool>,
    pub sla_overdue_secs: Option<i64>,
    /// How old the newest trusted revision may get before the SLA breaks.
    pub sla_window_secs: Option<u64>,
    pub next_due: Option<String>,
    pub next_tags: Vec<String>,
    pub failures: u32,
    pub last_error: Option<String>,
    /// On a replica: how its copy stands; `null` elsewhere.
    pub replica: Option<crate::status::ReplicaView>,
}

impl From<&[JobSummary]> for SummariesView {
    fn from(jobs: &[JobSummary]) -> Self {
        SummariesView {
            jobs: jobs.iter().map(SummaryView::from).collect(),
            store: jobs.iter().find_map(|j| j.store.as_ref()).map(StoreView::from),
        }
    }
}

impl From<&JobSummary> for SummaryView {
    fn from(j: &JobSummary) -> Self {
        let scheduled = has_schedule(&j.schedule);
        SummaryView {
            job: j.job.clone(),
            schedule: j.schedule.clone(),
            revisions: j.revisions,
            distrusted: j.distrusted,
            newest: j.newest.as_ref().map(RevisionView::from),
            newest_trusted: rfc3339(&j.newest_trusted),
            data_bytes: j.data_bytes,
            allocated_bytes: j.allocated_bytes,
            space: j.space.as_ref().map(SpaceView::from),
            storage: storage_name(j.storage).to_string(),
            running: j.running,
            sla_ok: scheduled.then_some(j.sla_ok),
            sla_overdue_secs: overdue_json(scheduled, j.sla_ok, j.sla_overdue_secs),
            sla_window_secs: (scheduled && j.sla_window_secs > 0).then_some(j.sla_window_secs),
            next_due: rfc3339(&j.next_due),
            next_tags: j.next_tags.clone(),
            failures: j.failures,
            last_error: non_empty(&j.last_error),
            replica: j.replica.as_ref().map(crate::status::ReplicaView::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_proto::RevisionInfo;

    fn ts(rfc3339: &str) -> backy_proto::prost_types::Timestamp {
        backy_proto::timestamp(
            &chrono::DateTime::parse_from_rfc3339(rfc3339)
                .unwrap()
                .with_timezone(&chrono::Utc),
        )
    }

    fn summary(job: &str, schedule: &str, revisions: u32, sla_ok: bool) -> JobSummary {
        JobSummary {
            job: job.into(),
            schedule: schedule.into(),
            revisions,
            sla_ok,
            sla_overdue_secs: if sla_ok { 0 } else { 3 * 3600 + 300 },
            newest: (revisions > 0).then(|| RevisionInfo {
                timestamp: Some(ts("2026-12-01T10:00:00Z")),
                size: 10 << 30,
                ..Default::default()
            }),
            allocated_bytes: 3 << 30,
            space: (revisions > 0).then_some(backy_proto::Space {
                total_bytes: 3 << 30,
                exclusive_bytes: 1 << 29,
                shared_bytes: 1 << 29,
                disk_bytes: 0,
            }),
            store: Some(backy_proto::StoreSpace {
                size_bytes: 10 << 30,
                used_bytes: 5 << 30,
            }),
            next_due: (schedule != "none").then(|| ts("2026-12-02T10:00:00Z")),
            next_tags: vec!["daily".into()],
            ..Default::default()
        }
    }

    #[test]
    fn one_line_per_job_and_a_total() {
        let jobs = [
            summary("vm1", "default", 18, true),
            summary("vm2", "default", 3, false),
            summary("vm3", "default", 0, false),
            summary("vm4", "none", 2, true),
        ];
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let text = format_summaries(&jobs, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        assert!(
            lines[0].starts_with("Job") && lines[0].contains("Failures"),
            "{text}"
        );
        assert!(
            lines[1].contains("vm1")
                && lines[1].contains("2026-12-01 10:00:00 (2h ago)")
                && lines[1].contains("1.00 GiB")
                && lines[1].contains("OK")
                && lines[1].contains("2026-12-02 10:00:00 (in 22h) daily"),
            "{text}"
        );
        assert!(lines[2].contains("TOO OLD 3h 5m"), "{text}");
        assert!(lines[3].contains("NO BACKUP"), "{text}");
        assert!(lines[4].contains("none") && !lines[4].contains("OK"), "{text}");
        assert_eq!(lines[5], "4 jobs, 23 revisions, 3.00 GiB used; 2 past their SLA");
        assert_eq!(
            lines[6],
            "store: 5.00 GiB of 10.00 GiB used (the whole filesystem)"
        );
        assert!(lines[3].contains(" - "), "no revisions, no use: {text}");
        assert_eq!(
            format_summaries(&jobs[..1], now).lines().nth(2),
            Some("1 job, 18 revisions, 1.00 GiB used; 0 past their SLA")
        );
        assert_eq!(format_summaries(&[], now), "no jobs\n");
    }

    /// Issue 29, item 5: a copy was listed `Next due ... (0s ago) weekly`
    /// although nothing is pushed to it (the due time of the schedule that
    /// keeps its copies): a copy is due never, and says it is a copy.
    #[test]
    fn a_copy_is_never_due() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-02T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let copy = |schedule: &str| JobSummary {
            replica: Some(backy_proto::ReplicaState {
                source: "https://backup1:7807".into(),
                lag_warning_secs: 3600,
                lag_critical_secs: 86400,
                ..Default::default()
            }),
            next_tags: vec!["weekly".into()],
            ..summary("vm5", schedule, 2, true)
        };
        let text = format_summaries(&[copy("weekly"), copy("none")], now);
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[1..3] {
            assert!(!line.contains("(0s ago)") && !line.ends_with("weekly"), "{text}");
            assert!(line.contains("COPY lag 0s"), "{text}");
        }
        assert!(lines[2].contains(" copy "), "a mirrored copy's schedule: {text}");
    }

    #[test]
    fn json_has_nulls_for_what_is_not_there() {
        let v = serde_json::to_value(SummariesView::from(&[summary("vm4", "none", 0, true)][..])).unwrap();
        let j = &v["jobs"][0];
        assert_eq!(j["job"], "vm4");
        assert!(j["sla_ok"].is_null() && j["newest"].is_null() && j["last_error"].is_null());
    }
}
