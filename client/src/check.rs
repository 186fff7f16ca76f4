//! `check`: a monitoring probe with Nagios plugin exit codes.

use backy_common::config::NO_SCHEDULE;
use backy_proto::{JobStatus, JobSummary};

/// Nagios plugin states, in increasing severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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
    pub failures: u32,
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
            failures: j.failures,
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
            failures: j.failures,
        }
    }
}

/// The state and one-line summary of some jobs: CRITICAL when a job is
/// past its SLA (a job never backed up gets one SLA window from when the
/// server first knew it); WARNING for distrusted revisions, failing pushes,
/// and a job without schedule that was never backed up. Jobs without a
/// schedule have no SLA: they are counted apart.
pub fn evaluate(jobs: &[JobHealth]) -> (State, String) {
    let mut state = State::Ok;
    let mut problems = Vec::new();
    let mut manual = 0;
    for job in jobs {
        // Older servers send an empty name for "no schedule".
        if job.schedule == NO_SCHEDULE || job.schedule.is_empty() {
            if job.revisions == 0 {
                state = state.max(State::Warning);
                problems.push(format!("{}: no schedule and never backed up", job.job));
            } else {
                manual += 1;
            }
        } else if !job.sla_ok {
            state = state.max(State::Critical);
            if job.revisions == 0 {
                problems.push(format!("{}: no backup yet", job.job));
            } else {
                problems.push(format!(
                    "{}: SLA violated, {}s overdue",
                    job.job, job.sla_overdue_secs
                ));
            }
        }
        if job.distrusted > 0 {
            state = state.max(State::Warning);
            problems.push(format!("{}: {} distrusted revisions", job.job, job.distrusted));
        }
        if job.failures > 0 {
            state = state.max(State::Warning);
            problems.push(format!("{}: {} failed pushes in a row", job.job, job.failures));
        }
    }
    let summary = if problems.is_empty() {
        let scheduled = jobs.len() - manual;
        let manual_jobs = format!(
            "{manual} job{} without schedule (manual pushes only)",
            if manual == 1 { "" } else { "s" }
        );
        match (scheduled, manual) {
            (_, 0) => format!("{scheduled} jobs, all within SLA"),
            (0, _) => manual_jobs,
            _ => format!("{scheduled} jobs, all within SLA; {manual_jobs}"),
        }
    } else {
        problems.join("; ")
    };
    (state, format!("BACKY {}: {summary}", state.label()))
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
            failures,
            revisions: vec![RevisionInfo {
                trust: trust as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        let cases = [
            (
                vec![job("a", true, 0, "trusted")],
                State::Ok,
                "1 jobs, all within SLA",
            ),
            (
                vec![job("a", true, 2, "verified")],
                State::Warning,
                "a: 2 failed pushes",
            ),
            (
                vec![job("a", true, 0, "distrusted")],
                State::Warning,
                "a: 1 distrusted",
            ),
            (
                vec![job("a", true, 1, "trusted"), job("b", false, 0, "trusted")],
                State::Critical,
                "b: SLA violated",
            ),
        ];
        for (jobs, want, text) in cases {
            let health: Vec<JobHealth> = jobs.iter().map(JobHealth::from).collect();
            let (state, line) = evaluate(&health);
            assert_eq!(state, want, "{line}");
            assert!(line.contains(text), "{line}");
        }
    }
}
