//! `status GROUP` and `check GROUP`: the group's instants across its
//! members, newest first, each complete or not, and each member's own
//! state in a line. Formatting is pure: members in, text out.

use super::Members;
use crate::check::{self, JobHealth, State};
use crate::status::{has_schedule, utc_time};
use backy_common::escape::escape;
use backy_common::instants::{why_incomplete, GroupInstantView};
use backy_common::units::count;
use backy_proto::JobStatus;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// `status GROUP --json`.
#[derive(Debug, Serialize)]
pub struct GroupStatusView {
    pub group: String,
    pub jobs: Vec<String>,
    /// Newest first.
    pub instants: Vec<InstantView>,
    pub members: Vec<MemberView>,
}

/// One instant of the group.
#[derive(Debug, Serialize)]
pub struct InstantView {
    pub instant: String,
    /// The earliest of its revisions' times.
    pub time: Option<String>,
    pub complete: bool,
    /// Member → its revision of the instant.
    pub revisions: BTreeMap<String, String>,
    /// Members without one.
    pub missing: Vec<String>,
    /// The disk counts its revisions recorded.
    pub disks: Vec<u32>,
}

/// A member's own state, as `status` without a job shows it per line.
#[derive(Debug, Serialize)]
pub struct MemberView {
    pub job: String,
    pub schedule: Option<String>,
    /// `null` without a schedule.
    pub sla_ok: Option<bool>,
    pub revisions: usize,
    pub newest: Option<String>,
    pub newest_time: Option<String>,
    pub failures: u32,
    pub running: bool,
    pub last_error: Option<String>,
}

impl From<&GroupInstantView> for InstantView {
    fn from(i: &GroupInstantView) -> Self {
        InstantView {
            instant: i.instant.clone(),
            time: i
                .time
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            complete: i.complete,
            revisions: i
                .revisions
                .iter()
                .map(|(j, r)| (j.to_string(), r.clone()))
                .collect(),
            missing: i.missing.iter().map(|j| j.to_string()).collect(),
            disks: i.disks.clone(),
        }
    }
}

impl From<&JobStatus> for MemberView {
    fn from(j: &JobStatus) -> Self {
        let newest = j.revisions.last();
        MemberView {
            job: j.job.clone(),
            schedule: crate::view::non_empty(&j.schedule),
            sla_ok: has_schedule(&j.schedule).then_some(j.sla_ok),
            revisions: j.revisions.len(),
            newest: newest.map(|r| crate::view::short_id(r).into_owned()),
            newest_time: newest.and_then(|r| crate::view::rfc3339(&r.timestamp)),
            failures: j.failures,
            running: j.running,
            last_error: crate::view::non_empty(&j.last_error),
        }
    }
}

impl From<&Members> for GroupStatusView {
    fn from(m: &Members) -> Self {
        GroupStatusView {
            group: m.name.to_string(),
            jobs: m.jobs.iter().map(|j| j.to_string()).collect(),
            instants: m.instants.iter().map(InstantView::from).collect(),
            members: m.statuses.iter().map(MemberView::from).collect(),
        }
    }
}

/// The table of instants, then a line per member; ages relative to `now`.
pub fn format(m: &Members, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let names: Vec<&str> = m.jobs.iter().map(|j| j.as_str()).collect();
    let _ = writeln!(out, "== group {} ({})", m.name, names.join(", "));
    let mut header = vec!["Date (UTC)", "Instant", "State"];
    header.extend(names.iter().copied());
    let rows: Vec<Vec<String>> = m
        .instants
        .iter()
        .map(|i| {
            let mut row = vec![
                utc_time(&i.time.map(|t| backy_proto::timestamp(&t)), now),
                i.instant.clone(),
                if i.complete { "complete" } else { "INCOMPLETE" }.to_string(),
            ];
            for job in &m.jobs {
                let rev = i.revisions.iter().find(|(j, _)| j == job);
                row.push(rev.map_or_else(|| "-".to_string(), |(_, r)| r.clone()));
            }
            row
        })
        .collect();
    table(&mut out, &header, &rows);
    if rows.is_empty() {
        out.push_str("(no instants: push the group to take one)\n");
    }
    if let Some(i) = m.instants.first().filter(|i| !i.complete) {
        let _ = writeln!(
            out,
            "warning: the newest instant is incomplete: {}",
            why_incomplete(i, m.jobs.len())
        );
    }
    out.push_str("== Members\n");
    for j in &m.statuses {
        out.push_str(&member_line(j, now));
    }
    out
}

/// `vm1-a: 3 revisions, newest 3xK… 2026-… (5m ago); schedule: none; 1 failure in a row; last error: …`
fn member_line(j: &JobStatus, now: DateTime<Utc>) -> String {
    let mut line = format!("{}: {}", j.job, count(j.revisions.len() as u64, "revision"));
    if let Some(r) = j.revisions.last() {
        let _ = write!(
            line,
            ", newest {} {}",
            crate::view::short_id(r),
            utc_time(&r.timestamp, now)
        );
    }
    if has_schedule(&j.schedule) {
        let sla = if j.sla_ok { "OK" } else { "TOO OLD" };
        let _ = write!(line, "; schedule: {}, SLA {sla}", j.schedule);
    } else {
        line.push_str("; schedule: none");
    }
    if j.running {
        line.push_str("; a push is running");
    }
    if j.failures > 0 {
        let _ = write!(line, "; {} in a row", count(u64::from(j.failures), "failure"));
    }
    if !j.last_error.is_empty() {
        let _ = write!(line, "; last error: {}", escape(&j.last_error));
    }
    line.push('\n');
    line
}

/// Left-aligned columns two spaces apart (as many as the group has
/// members), the last one unpadded.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `check GROUP`: every member as `check JOB` judges it, and WARNING when
/// the newest instant is incomplete (or there is none): the group cannot
/// be restored as it last was.
pub fn evaluate(m: &Members, now: DateTime<Utc>) -> check::Report {
    let health: Vec<JobHealth> = m.statuses.iter().map(JobHealth::from).collect();
    let mut report = check::evaluate(&health, now);
    let problem = match m.instants.first() {
        None => Some(format!("group {}: no instant yet", m.name)),
        Some(i) if !i.complete => Some(format!(
            "group {}: newest instant {} incomplete ({})",
            m.name,
            i.instant,
            why_incomplete(i, m.jobs.len())
        )),
        Some(_) => None,
    };
    let summary = match (&problem, report.state) {
        (Some(p), State::Ok) => p.clone(),
        (Some(p), _) => format!("{p}; {}", report.summary),
        (None, _) => match m.instants.first() {
            Some(i) => format!(
                "group {}: newest instant {} complete ({}); {}",
                m.name,
                i.instant,
                count(m.jobs.len() as u64, "disk"),
                report.summary
            ),
            None => report.summary.clone(),
        },
    };
    if problem.is_some() {
        report.state = report.state.max(State::Warning);
        report.exit_code = report.state as u8;
    }
    report.summary = summary;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::instants::{instants, Taken};
    use backy_common::revision::GroupInstant;
    use backy_common::JobName;
    use backy_proto::RevisionInfo;

    fn job(s: &str) -> JobName {
        JobName::new(s).unwrap()
    }

    fn members(b_has_newest: bool) -> Members {
        let t = |secs| DateTime::from_timestamp(secs, 0);
        let take = |j: &str, r: &str, s, i: &str| Taken {
            job: job(j),
            revision: r.into(),
            time: t(s),
            group: GroupInstant {
                name: "vm1".into(),
                instant: i.into(),
                disks: 2,
            },
        };
        let mut taken = vec![
            take("a", "RA1", 100, "I1"),
            take("b", "RB1", 100, "I1"),
            take("a", "RA2", 200, "I2"),
        ];
        if b_has_newest {
            taken.push(take("b", "RB2", 200, "I2"));
        }
        let status = |j: &str, n: usize| JobStatus {
            job: j.into(),
            schedule: "none".into(),
            revisions: vec![RevisionInfo::default(); n],
            ..JobStatus::default()
        };
        let jobs = vec![job("a"), job("b")];
        Members {
            name: job("vm1"),
            instants: instants("vm1", &jobs, &taken),
            jobs,
            statuses: vec![status("a", 2), status("b", 1 + usize::from(b_has_newest))],
        }
    }

    #[test]
    fn lists_instants_and_members() {
        let now = DateTime::from_timestamp(300, 0).unwrap();
        let text = format(&members(false), now);
        assert!(text.starts_with("== group vm1 (a, b)\n"), "{text}");
        assert!(text.contains("I2       INCOMPLETE  RA2  -\n"), "{text}");
        assert!(text.contains("I1       complete    RA1  RB1\n"), "{text}");
        assert!(text.contains("warning: the newest instant is incomplete: b has no revision of it"));
        assert!(text.contains("a: 2 revisions"), "{text}");
    }

    #[test]
    fn check_warns_on_an_incomplete_newest_instant() {
        let now = DateTime::from_timestamp(300, 0).unwrap();
        let bad = evaluate(&members(false), now);
        assert_eq!((bad.state, bad.exit_code), (State::Warning, 1));
        assert!(bad
            .summary
            .starts_with("group vm1: newest instant I2 incomplete (b has no revision of it)"));
        let good = evaluate(&members(true), now);
        assert_eq!(good.exit_code, 0, "{}", good.summary);
        assert!(good
            .summary
            .starts_with("group vm1: newest instant I2 complete (2 disks)"));
    }
}
