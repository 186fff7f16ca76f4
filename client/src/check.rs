//! `check`: a monitoring probe with Nagios plugin exit codes.

use backy_proto::StatusReply;

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

/// The state and one-line summary of a status reply: CRITICAL when a job
/// is past its SLA; WARNING for distrusted revisions or failing pushes.
pub fn evaluate(reply: &StatusReply) -> (State, String) {
    let mut state = State::Ok;
    let mut problems = Vec::new();
    for job in &reply.jobs {
        if !job.schedule.is_empty() && !job.sla_ok {
            state = state.max(State::Critical);
            if job.revisions.is_empty() {
                problems.push(format!("{}: no backup yet", job.job));
            } else {
                problems.push(format!(
                    "{}: SLA violated, {}s overdue",
                    job.job, job.sla_overdue_secs
                ));
            }
        }
        let distrusted = job.revisions.iter().filter(|r| r.trust == "distrusted").count();
        if distrusted > 0 {
            state = state.max(State::Warning);
            problems.push(format!("{}: {distrusted} distrusted revisions", job.job));
        }
        if job.failures > 0 {
            state = state.max(State::Warning);
            problems.push(format!("{}: {} failed pushes in a row", job.job, job.failures));
        }
    }
    let summary = if problems.is_empty() {
        format!("{} jobs, all within SLA", reply.jobs.len())
    } else {
        problems.join("; ")
    };
    (state, format!("BACKY {}: {summary}", state.label()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_proto::{JobStatus, RevisionInfo};

    fn job(name: &str, sla_ok: bool, failures: u32, trust: &str) -> JobStatus {
        JobStatus {
            job: name.into(),
            schedule: "default".into(),
            sla_ok,
            failures,
            revisions: vec![RevisionInfo {
                trust: trust.into(),
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
            let (state, line) = evaluate(&StatusReply { jobs });
            assert_eq!(state, want, "{line}");
            assert!(line.contains(text), "{line}");
        }
    }
}
