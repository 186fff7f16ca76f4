//! The one line a person is told when a push is not due. Cron and the
//! timer units run `push` unattended and want silence; at a terminal (or
//! with `-v`) an empty answer reads like a hang or a failure.

use crate::status::human_secs;
use backy_proto::JobStatus;
use chrono::{DateTime, Utc};

/// `vm1 is not due until 2026-12-07 02:00:00 UTC (in 5h 54m; daily);
/// --force pushes now`. From the job's status (`None` when it could not
/// be read): when it is due next, with which tags, and the failures it
/// is backing off from; relative to `now`.
pub fn not_due_line(job: &str, status: Option<&JobStatus>, now: DateTime<Utc>) -> String {
    let next = status.and_then(|s| Some((s, backy_proto::datetime(s.next_due.as_ref()?)?)));
    let when = match next {
        Some((s, at)) => {
            let secs = (at - now).num_seconds().max(0).unsigned_abs();
            let mut about = vec![format!("in {}", human_secs(secs))];
            if !s.next_tags.is_empty() {
                about.push(s.next_tags.join(","));
            }
            if s.failures > 0 {
                about.push(format!(
                    "backing off after {}",
                    backy_common::units::count(u64::from(s.failures), "failure")
                ));
            }
            format!(
                " until {} UTC ({})",
                at.format("%Y-%m-%d %H:%M:%S"),
                about.join("; ")
            )
        }
        None => String::new(),
    };
    format!("{job} is not due{when}; --force pushes now")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn says_when_with_tags_and_backoff() {
        let now = at("2026-12-06T20:06:00Z");
        let mut s = JobStatus {
            job: "vm1".into(),
            next_due: Some(backy_proto::prost_types::Timestamp {
                seconds: at("2026-12-07T02:00:00Z").timestamp(),
                nanos: 0,
            }),
            next_tags: vec!["daily".into(), "weekly".into()],
            ..Default::default()
        };
        assert_eq!(
            not_due_line("vm1", Some(&s), now),
            "vm1 is not due until 2026-12-07 02:00:00 UTC (in 5h 54m; daily,weekly); --force pushes now"
        );
        s.failures = 2;
        s.next_tags.clear();
        assert_eq!(
            not_due_line("vm1", Some(&s), now),
            "vm1 is not due until 2026-12-07 02:00:00 UTC (in 5h 54m; backing off after 2 failures); --force pushes now"
        );
    }

    #[test]
    fn without_a_time_says_what_it_can() {
        let now = at("2026-12-06T20:06:00Z");
        let s = JobStatus::default();
        assert_eq!(
            not_due_line("vm1", Some(&s), now),
            "vm1 is not due; --force pushes now"
        );
        assert_eq!(
            not_due_line("vm1", None, now),
            "vm1 is not due; --force pushes now"
        );
    }
}
