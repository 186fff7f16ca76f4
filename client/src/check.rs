//! `check`: a monitoring probe with Nagios plugin exit codes.

use crate::status::human_secs;
use backy_common::config::NO_SCHEDULE;
use backy_common::units::count;
use backy_proto::{JobStatus, JobSummary, ReplicaState};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// Nagios plugin states, in increasing severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl State {
    pub fn label(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }
}

/// What `check` needs of a job, from a job's status or a host's summaries.
#[derive(Clone, Debug)]
pub struct JobHealth<'a> {
    pub job: &'a str,
    pub schedule: &'a str,
    pub revisions: usize,
    pub distrusted: usize,
    pub sla_ok: bool,
    pub sla_overdue_secs: i64,
    /// How old the newest trusted revision may get; 0 without a schedule.
    pub sla_window_secs: u64,
    pub newest_trusted: Option<DateTime<Utc>>,
    pub failures: u32,
    /// On a replica: how its copy stands (its lag replaces the SLA).
    pub replica: Option<&'a ReplicaState>,
    /// Ids of revisions dated after the server's clock.
    pub future: &'a [String],
    /// The newest revision's change tracker missed writes (its audit).
    pub tracker: Option<String>,
}

impl<'a> From<&'a JobStatus> for JobHealth<'a> {
    fn from(j: &'a JobStatus) -> Self {
        JobHealth {
            job: &j.job,
            schedule: &j.schedule,
            revisions: j.revisions.len(),
            distrusted: j.revisions.iter().filter(|r| crate::view::distrusted(r)).count(),
            sla_ok: j.sla_ok,
            sla_overdue_secs: j.sla_overdue_secs,
            sla_window_secs: j.sla_window_secs,
            newest_trusted: j
                .revisions
                .iter()
                .filter(|r| !crate::view::distrusted(r))
                .filter_map(|r| r.timestamp.as_ref().and_then(backy_proto::datetime))
                .max(),
            failures: j.failures,
            replica: j.replica.as_ref(),
            future: &j.future_revisions,
            tracker: crate::view::audit_warning(j.revisions.last()),
        }
    }
}

impl<'a> From<&'a JobSummary> for JobHealth<'a> {
    fn from(j: &'a JobSummary) -> Self {
        JobHealth {
            job: &j.job,
            schedule: &j.schedule,
            revisions: j.revisions as usize,
            distrusted: j.distrusted as usize,
            sla_ok: j.sla_ok,
            sla_overdue_secs: j.sla_overdue_secs,
            sla_window_secs: j.sla_window_secs,
            newest_trusted: j.newest_trusted.as_ref().and_then(backy_proto::datetime),
            failures: j.failures,
            replica: j.replica.as_ref(),
            future: &j.future_revisions,
            tracker: crate::view::audit_warning(j.newest.as_ref()),
        }
    }
}

/// One job's verdict.
#[derive(Debug, Serialize)]
pub struct JobCheck {
    pub job: String,
    pub state: State,
    /// Why the state is not OK, one reason per entry.
    pub problems: Vec<String>,
    /// Age of the newest trusted revision; `null` without one.
    pub age_secs: Option<u64>,
    /// The age at which the job turns CRITICAL; `null` without a schedule.
    pub sla_window_secs: Option<u64>,
    pub revisions: usize,
    pub distrusted: usize,
    pub failures: u32,
    /// On a replica: how far behind the source its copy is; `null`
    /// elsewhere.
    pub lag_secs: Option<u64>,
}

/// The verdict on some jobs: the worst state, a one-line summary, and each
/// job's own verdict.
#[derive(Debug, Serialize)]
pub struct Report {
    pub state: State,
    /// The process exit status (Nagios plugin convention).
    pub exit_code: u8,
    pub summary: String,
    pub jobs: Vec<JobCheck>,
    /// Checked every job of a host (performance data as counts), not one.
    #[serde(skip)]
    pub host: bool,
}

/// CRITICAL when a job is past its SLA (a job never backed up gets one SLA
/// window from when the server first knew it); WARNING for distrusted
/// revisions, revisions dated after the server's clock, a newest revision
/// whose change tracker missed writes (its audit), failing pushes,
/// and a job without schedule that was never backed up. Jobs without a schedule have no SLA: they are counted apart.
pub fn evaluate(jobs: &[JobHealth], now: DateTime<Utc>) -> Report {
    let checks: Vec<JobCheck> = jobs.iter().map(|j| check_job(j, now)).collect();
    let state = checks.iter().map(|c| c.state).max().unwrap_or(State::Ok);
    let problems: Vec<&str> = checks
        .iter()
        .flat_map(|c| c.problems.iter().map(String::as_str))
        .collect();
    let summary = if problems.is_empty() {
        let copies = checks.iter().filter(|c| c.lag_secs.is_some()).count() as u64;
        let manual = checks
            .iter()
            .filter(|c| c.sla_window_secs.is_none() && c.lag_secs.is_none())
            .count() as u64;
        let scheduled = checks.len() as u64 - manual - copies;
        let mut parts = Vec::new();
        if scheduled > 0 || checks.is_empty() {
            parts.push(format!("{}, all within SLA", count(scheduled, "job")));
        }
        if copies > 0 {
            parts.push(format!(
                "{} from another server, within their lag",
                count(copies, "copied job")
            ));
        }
        if manual > 0 {
            parts.push(format!(
                "{} without schedule (manual pushes only)",
                count(manual, "job")
            ));
        }
        parts.join("; ")
    } else {
        problems.join("; ")
    };
    Report {
        state,
        exit_code: state as u8,
        summary,
        jobs: checks,
        host: false,
    }
}

/// [`evaluate`] of every job of a host: the performance data are counts
/// whatever the number of jobs, so a graph keeps its labels.
pub fn evaluate_host(jobs: &[JobHealth], now: DateTime<Utc>) -> Report {
    Report {
        host: true,
        ..evaluate(jobs, now)
    }
}

fn check_job(job: &JobHealth, now: DateTime<Utc>) -> JobCheck {
    let mut state = State::Ok;
    let mut problems = Vec::new();
    // Older servers send an empty name for "no schedule".
    let scheduled = !(job.schedule == NO_SCHEDULE || job.schedule.is_empty()) && job.replica.is_none();
    if let Some(r) = job.replica {
        let (warn, crit) = (r.lag_warning_secs, r.lag_critical_secs);
        let lag = human_secs(r.lag_secs);
        let behind = if r.missing > 0 {
            format!("{} not copied yet", count(u64::from(r.missing), "revision"))
        } else {
            "source not read".to_string()
        };
        if crit > 0 && r.lag_secs >= crit {
            state = state.max(State::Critical);
            problems.push(format!(
                "{}: copy {lag} behind ({behind}; critical from {})",
                job.job,
                human_secs(crit)
            ));
        } else if warn > 0 && r.lag_secs >= warn {
            state = state.max(State::Warning);
            problems.push(format!(
                "{}: copy {lag} behind ({behind}; warning from {})",
                job.job,
                human_secs(warn)
            ));
        }
        if !r.last_error.is_empty() {
            state = state.max(State::Warning);
            problems.push(format!(
                "{}: replication failing: {}",
                job.job,
                backy_common::escape::escape(&r.last_error)
            ));
        }
    } else if !scheduled {
        if job.revisions == 0 {
            state = state.max(State::Warning);
            problems.push(format!("{}: no schedule and never backed up", job.job));
        }
    } else if !job.sla_ok {
        state = state.max(State::Critical);
        if job.revisions == 0 {
            problems.push(format!("{}: no backup yet", job.job));
        } else if job.sla_overdue_secs > 0 {
            problems.push(format!(
                "{}: SLA violated, overdue {}",
                job.job,
                human_secs(job.sla_overdue_secs.unsigned_abs())
            ));
        } else {
            problems.push(format!("{}: SLA violated, no trusted revision", job.job));
        }
    }
    if job.distrusted > 0 {
        state = state.max(State::Warning);
        problems.push(format!(
            "{}: {}",
            job.job,
            count(job.distrusted as u64, "distrusted revision")
        ));
    }
    if !job.future.is_empty() {
        state = state.max(State::Warning);
        problems.push(format!(
            "{}: {} dated after the server's clock ({}), counted as dated when found",
            job.job,
            count(job.future.len() as u64, "revision"),
            job.future.join(", ")
        ));
    }
    if let Some(warning) = &job.tracker {
        state = state.max(State::Warning);
        problems.push(format!("{}: {warning}", job.job));
    }
    if job.failures > 0 {
        state = state.max(State::Warning);
        problems.push(format!(
            "{}: {} in a row",
            job.job,
            count(u64::from(job.failures), "failed push")
        ));
    }
    JobCheck {
        job: job.job.to_string(),
        state,
        problems,
        age_secs: job
            .newest_trusted
            .map(|t| (now - t).num_seconds().max(0).unsigned_abs()),
        sla_window_secs: (scheduled && job.sla_window_secs > 0).then_some(job.sla_window_secs),
        revisions: job.revisions,
        distrusted: job.distrusted,
        failures: job.failures,
        lag_secs: job.replica.map(|r| r.lag_secs),
    }
}

impl Report {
    /// The plugin's output line: `BACKY STATE: summary | perfdata`.
    pub fn line(&self) -> String {
        format!(
            "BACKY {}: {} | {}",
            self.state.label(),
            self.summary,
            self.perfdata()
        )
    }

    /// Nagios performance data. One job: the age of its newest trusted
    /// revision with the SLA window as the critical threshold (`U` when
    /// there is none), its revisions and failures. Several: counts by
    /// state, and the oldest newest-trusted-revision among them.
    pub fn perfdata(&self) -> String {
        let age = |c: &JobCheck| match c.age_secs {
            Some(a) => format!("{a}s"),
            None => "U".to_string(),
        };
        if let (false, [one]) = (self.host, &self.jobs[..]) {
            let crit = one.sla_window_secs.map(|w| w.to_string()).unwrap_or_default();
            return format!(
                "age={};;{crit};0; revisions={};;;0; failures={};;;0;",
                age(one),
                one.revisions,
                one.failures
            );
        }
        let by = |s: State| self.jobs.iter().filter(|c| c.state == s).count();
        let oldest = self
            .jobs
            .iter()
            .filter(|c| c.sla_window_secs.is_some())
            .filter_map(|c| c.age_secs)
            .max()
            .map_or("U".to_string(), |a| format!("{a}s"));
        format!(
            "jobs={} ok={} warning={} critical={} oldest_age={oldest};;;0;",
            self.jobs.len(),
            by(State::Ok),
            by(State::Warning),
            by(State::Critical)
        )
    }
}

/// `check --json` when the server could not be asked.
pub fn unknown(reason: &str) -> Report {
    Report {
        state: State::Unknown,
        exit_code: State::Unknown as u8,
        summary: reason.to_string(),
        jobs: Vec::new(),
        host: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_proto::RevisionInfo;

    fn job(name: &str, sla_ok: bool, failures: u32, trust: &str) -> JobStatus {
        let trust = match trust {
            "distrusted" => backy_proto::Trust::Distrusted,
            "verified" => backy_proto::Trust::Verified,
            _ => backy_proto::Trust::Trusted,
        };
        JobStatus {
            job: name.into(),
            schedule: "default".into(),
            sla_ok,
            sla_overdue_secs: if sla_ok { 0 } else { 3600 },
            sla_window_secs: 129600,
            failures,
            revisions: vec![RevisionInfo {
                trust: trust as i32,
                timestamp: Some(backy_proto::timestamp(&(now() - chrono::Duration::hours(2)))),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-02T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn table() {
        let cases = [
            (
                vec![job("a", true, 0, "trusted")],
                State::Ok,
                "1 job, all within SLA",
            ),
            (
                vec![job("a", true, 0, "trusted"), job("b", true, 0, "trusted")],
                State::Ok,
                "2 jobs, all within SLA",
            ),
            (
                vec![job("a", true, 2, "verified")],
                State::Warning,
                "a: 2 failed pushes in a row",
            ),
            (
                vec![job("a", true, 1, "verified")],
                State::Warning,
                "a: 1 failed push in a row",
            ),
            (
                vec![job("a", true, 0, "distrusted")],
                State::Warning,
                "a: 1 distrusted revision",
            ),
            (
                vec![job("a", true, 1, "trusted"), job("b", false, 0, "trusted")],
                State::Critical,
                "b: SLA violated, overdue 1h",
            ),
        ];
        for (jobs, want, text) in cases {
            let health: Vec<JobHealth> = jobs.iter().map(JobHealth::from).collect();
            let report = evaluate(&health, now());
            assert_eq!(report.state, want, "{}", report.line());
            assert_eq!(report.exit_code, want as u8);
            assert!(report.line().contains(text), "{}", report.line());
        }
    }

    #[test]
    fn a_tracker_that_missed_writes_warns_until_a_clean_audit() {
        let audited = |mismatched: u64| {
            let mut j = job("vm1", true, 0, "trusted");
            j.revisions[0].short_id = "r2".into();
            j.revisions[0].audit = Some(backy_proto::TrackerAudit {
                tracker: "qemu-bitmap".into(),
                sampled: 10,
                mismatched,
            });
            j
        };
        let bad = audited(2);
        let report = evaluate(&[JobHealth::from(&bad)], now());
        assert_eq!(report.state, State::Warning);
        assert_eq!(
            report.summary,
            "vm1: change tracker QEMU dirty bitmap missed writes: 2 of 10 sampled unchanged blocks \
             differ (revision r2 read the whole source)"
        );
        // The host's summaries carry the newest revision: the same verdict.
        let summary = JobSummary {
            job: "vm1".into(),
            schedule: "default".into(),
            sla_ok: true,
            revisions: 1,
            newest: bad.revisions.last().cloned(),
            ..Default::default()
        };
        let report = evaluate(&[JobHealth::from(&summary)], now());
        assert_eq!(report.state, State::Warning, "{}", report.line());
        // A later push whose audit was clean: no warning.
        let mut good = bad.clone();
        good.revisions.push(audited(0).revisions[0].clone());
        let report = evaluate(&[JobHealth::from(&good)], now());
        assert_eq!(report.state, State::Ok, "{}", report.line());
    }

    #[test]
    fn a_copy_is_judged_by_its_lag() {
        let copy = |lag_secs: u64, last_error: &str| JobStatus {
            schedule: "none".into(),
            replica: Some(ReplicaState {
                source: "https://b:1".into(),
                lag_secs,
                missing: 2,
                lag_warning_secs: 3600,
                lag_critical_secs: 7200,
                last_error: last_error.into(),
                ..Default::default()
            }),
            ..job("vm1", false, 0, "trusted")
        };
        let cases = [
            (
                copy(60, ""),
                State::Ok,
                "1 copied job from another server, within their lag",
            ),
            (
                copy(3600, ""),
                State::Warning,
                "vm1: copy 1h behind (2 revisions not copied yet; warning from 1h)",
            ),
            (
                copy(9000, ""),
                State::Critical,
                "vm1: copy 2h 30m behind (2 revisions not copied yet; critical from 2h)",
            ),
            (
                copy(60, "cannot connect"),
                State::Warning,
                "vm1: replication failing: cannot connect",
            ),
        ];
        for (status, state, summary) in cases {
            let r = evaluate(&[JobHealth::from(&status)], now());
            assert_eq!((r.state, r.summary.as_str()), (state, summary));
            assert_eq!(r.jobs[0].lag_secs, status.replica.as_ref().map(|r| r.lag_secs));
        }
    }

    /// Issue 27, item 6: revisions dated after the server's clock are a
    /// warning naming them, even with the SLA met.
    #[test]
    fn future_dated_revisions_are_named() {
        let status = JobStatus {
            future_revisions: vec!["3jT8kq2".into(), "9xYz".into()],
            ..job("vm1", true, 0, "trusted")
        };
        let r = evaluate(&[JobHealth::from(&status)], now());
        assert_eq!(
            (r.state, r.summary.as_str()),
            (
                State::Warning,
                "vm1: 2 revisions dated after the server's clock (3jT8kq2, 9xYz), counted as dated when found"
            )
        );
        let summary = JobSummary {
            job: "vm1".into(),
            schedule: "default".into(),
            sla_ok: true,
            future_revisions: vec!["3jT8kq2".into()],
            ..Default::default()
        };
        let r = evaluate(&[JobHealth::from(&summary)], now());
        assert_eq!(r.state, State::Warning, "{}", r.line());
        assert!(r.summary.contains("(3jT8kq2)"), "{}", r.line());
    }

    #[test]
    fn perfdata_of_one_job_and_of_many() {
        let one = [job("a", true, 0, "trusted")];
        let health: Vec<JobHealth> = one.iter().map(JobHealth::from).collect();
        assert_eq!(
            evaluate(&health, now()).line(),
            "BACKY OK: 1 job, all within SLA | age=7200s;;129600;0; revisions=1;;;0; failures=0;;;0;"
        );
        assert!(evaluate_host(&health, now())
            .line()
            .ends_with("| jobs=1 ok=1 warning=0 critical=0 oldest_age=7200s;;;0;"));
        let two = [job("a", true, 0, "trusted"), job("b", false, 1, "distrusted")];
        let health: Vec<JobHealth> = two.iter().map(JobHealth::from).collect();
        let report = evaluate_host(&health, now());
        assert!(
            report
                .line()
                .ends_with("| jobs=2 ok=1 warning=0 critical=1 oldest_age=7200s;;;0;"),
            "{}",
            report.line()
        );
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["state"], "CRITICAL");
        assert_eq!(v["exit_code"], 2);
        assert_eq!(v["jobs"][1]["state"], "CRITICAL");
        assert!(v["jobs"][1]["age_secs"].is_null(), "{v}");
        assert_eq!(v["jobs"][0]["sla_window_secs"], 129600);
    }
}
