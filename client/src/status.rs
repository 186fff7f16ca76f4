//! `status`: the revisions and health of jobs, as a table for people or
//! JSON for scripts. Formatting is pure: a reply in, text out.

use crate::connect::Client;
use crate::view::{
    non_empty, rfc3339, storage_name, store_line, trust_name, used_bytes, RevisionView, SpaceView, StoreView,
};
use backy_common::config::NO_SCHEDULE;
use backy_common::escape::escape;
use backy_common::units::format_bytes;
use backy_common::{JobName, Result};
use backy_proto::{JobStatus, RevisionInfo, StatusReply};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::fmt::Write;

/// One job with every revision, streamed (no message limit; see
/// proto/src/listing.rs for servers that predate the stream).
pub async fn fetch(client: &mut Client, job: &JobName) -> Result<StatusReply> {
    let job = backy_proto::listing::job_status(client, job.as_str()).await?;
    // A stream has no reply of its own: each job's header carries the store.
    Ok(StatusReply {
        store: job.store,
        jobs: vec![job],
    })
}

/// The table, per job; ages relative to `now`.
pub fn format_status(reply: &StatusReply, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    for (i, job) in reply.jobs.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        format_job(&mut out, job, now);
    }
    if reply.jobs.is_empty() {
        out.push_str("no jobs\n");
    }
    if let Some(store) = &reply.store {
        out.push_str(&store_line(store));
    }
    out
}

fn format_job(out: &mut String, job: &JobStatus, now: DateTime<Utc>) {
    let _ = writeln!(out, "== {} (storage: {})", job.job, storage_name(job.storage));
    if job.storage() == backy_proto::StorageMode::Copy {
        out.push_str("storage: copy, not CoW (filesystem without reflink)\n");
    }
    let header = [
        "Date (UTC)",
        "ID",
        "Size",
        "Sent",
        "Exclusive",
        "Duration",
        "Tags",
        "Trust",
    ];
    let rows: Vec<[String; 8]> = job.revisions.iter().map(|r| row(r, now)).collect();
    table(out, &header, &rows);
    if rows.is_empty() {
        out.push_str("(no revisions)\n");
    }
    out.push_str("== Summary\n");
    let _ = writeln!(
        out,
        "{}, {} data (estimated: bytes written)",
        backy_common::units::count(rows.len() as u64, "revision"),
        format_bytes(data_bytes(job)),
    );
    out.push_str(&space_line(job));
    format_locks(out, &job.revisions, now);
    if job.running {
        out.push_str("a push is running\n");
    }
    // A replica's copy takes no pushes: its schedule, if any, only keeps
    // copies here (see `format_replica`), and nothing is ever due.
    let copy = job.replica.as_ref().is_some_and(|r| !r.own_job);
    if job.schedule == NO_SCHEDULE && !copy {
        out.push_str("schedule: none (manual pushes only: nothing expires, no SLA)\n");
    } else if has_schedule(&job.schedule) {
        if copy {
            let _ = writeln!(out, "schedule: {} (keeps the copies here)", job.schedule);
        } else {
            let _ = writeln!(out, "schedule: {}", job.schedule);
        }
        if job.sla_ok {
            out.push_str("SLA: OK\n");
        } else if job.revisions.is_empty() {
            out.push_str("SLA: TOO OLD (no revisions yet)\n");
        } else if job.sla_overdue_secs <= 0 {
            out.push_str("SLA: TOO OLD (no trusted revision)\n");
        } else {
            let overdue = job.sla_overdue_secs.unsigned_abs();
            let _ = writeln!(out, "SLA: TOO OLD (overdue {})", human_secs(overdue));
        }
        if job.next_due.is_some() && !copy {
            let _ = writeln!(
                out,
                "next: {} ({})",
                utc_time(&job.next_due, now),
                job.next_tags.join(",")
            );
        }
    }
    if !job.future_revisions.is_empty() {
        let _ = writeln!(
            out,
            "warning: dated after the server's clock: {} (scheduling and SLA count them as dated when found)",
            job.future_revisions.join(", ")
        );
    }
    if let Some(warning) = crate::view::audit_warning(job.revisions.last()) {
        let _ = writeln!(out, "warning: {warning}");
    }
    if job.failures > 0 {
        let _ = writeln!(
            out,
            "{} in a row",
            backy_common::units::count(u64::from(job.failures), "failure")
        );
    }
    if let Some(r) = &job.replica {
        format_replica(out, r, now);
    }
    for f in &job.fetched_by {
        let short = f.revision.get(..8).unwrap_or(&f.revision);
        let _ = writeln!(
            out,
            "fetched by replica {}: {short} at {}",
            f.replica,
            utc_time(&f.at, now)
        );
    }
    if !job.last_error.is_empty() {
        let _ = writeln!(out, "last error: {}", escape(&job.last_error));
    }
}

/// The revisions still under their retention lock at `now`: how many,
/// until when the last is locked, and when the next unlocks.
fn format_locks(out: &mut String, revisions: &[RevisionInfo], now: DateTime<Utc>) {
    let mut locked: Vec<DateTime<Utc>> = revisions
        .iter()
        .filter_map(|r| r.locked_until.as_ref().and_then(backy_proto::datetime))
        .filter(|until| *until > now)
        .collect();
    locked.sort();
    let (Some(next), Some(last)) = (locked.first(), locked.last()) else {
        return;
    };
    let at = |t: &DateTime<Utc>| utc_time(&Some(backy_proto::timestamp(t)), now);
    let _ = write!(
        out,
        "retention lock: {} locked until {} at the latest",
        backy_common::units::count(locked.len() as u64, "revision"),
        at(last)
    );
    if locked.len() > 1 {
        let _ = write!(out, "; the next unlocks {}", at(next));
    }
    out.push('\n');
}

fn format_replica(out: &mut String, r: &backy_proto::ReplicaState, now: DateTime<Utc>) {
    if r.own_job {
        // Listed for copying, but this server's own: it says why below.
        let _ = writeln!(out, "not a copy of {} (a job of this server's own)", r.source);
    } else {
        let retention = if r.own_retention {
            "its own schedule keeps the copies"
        } else {
            "mirrors the source's expiry"
        };
        let _ = writeln!(
            out,
            "copy of {} ({retention}; takes no pushes: they go to the source)",
            r.source
        );
        if !r.owner.is_empty() {
            let _ = writeln!(
                out,
                "owner: {} (may read and restore it here, as the source recorded)",
                escape(&r.owner)
            );
        }
    }
    let behind = if r.missing == 0 {
        "nothing to copy".to_string()
    } else {
        format!(
            "{} not copied yet",
            backy_common::units::count(u64::from(r.missing), "revision")
        )
    };
    let _ = writeln!(
        out,
        "lag: {} ({behind}; warning from {}, critical from {}); source last read: {}",
        human_secs(r.lag_secs),
        human_secs(r.lag_warning_secs),
        human_secs(r.lag_critical_secs),
        utc_time(&r.last_round, now)
    );
    if !r.last_error.is_empty() {
        let _ = writeln!(out, "replication failing: {}", escape(&r.last_error));
    }
}

fn row(r: &RevisionInfo, now: DateTime<Utc>) -> [String; 8] {
    [
        utc_time(&r.timestamp, now),
        crate::view::short_id(r).into_owned(),
        format_bytes(r.size),
        format_bytes(r.bytes_received),
        // What deleting the revision alone would free; `?`: unknown.
        r.space
            .as_ref()
            .map_or_else(|| "?".to_string(), |s| format_bytes(s.exclusive_bytes)),
        format!("{:.0}s", r.duration_secs),
        escape(&r.tags.join(",")),
        trust_name(r.trust).to_string(),
    ]
}

/// Left-aligned columns two spaces apart, the last one unpadded.
pub(crate) fn table<const N: usize>(out: &mut String, header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 < N {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            } else {
                text.push_str(cell);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
}

/// A wire time as status shows it, UTC, with how long ago it was (or how
/// soon it will be) beside it: `2026-11-28 10:07:51 (2d 4h ago)`;
/// `unknown` when absent.
pub(crate) fn utc_time(t: &Option<backy_proto::prost_types::Timestamp>, now: DateTime<Utc>) -> String {
    let Some(t) = t.as_ref().and_then(backy_proto::datetime) else {
        return "unknown".to_string();
    };
    let date = t.format("%Y-%m-%d %H:%M:%S");
    let secs = (now - t).num_seconds();
    if secs >= 0 {
        format!("{date} ({} ago)", human_secs(secs.unsigned_abs()))
    } else {
        format!("{date} (in {})", human_secs(secs.unsigned_abs()))
    }
}

/// Seconds overdue as `--json` shows them: 0 within the SLA, `null` for a
/// job without schedule and for a broken SLA with no deadline to count
/// from (no trusted revision yet), so a positive number always goes with
/// `sla_ok: false` and 0 with `true`.
pub(crate) fn overdue_json(scheduled: bool, sla_ok: bool, overdue: i64) -> Option<i64> {
    match (scheduled, sla_ok) {
        (false, _) => None,
        (true, true) => Some(0),
        (true, false) => (overdue > 0).then_some(overdue),
    }
}

/// `45s`, `12m`, `3h`, `2d 4h`: the two largest units.
pub fn human_secs(secs: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (name, len) in UNITS {
        if rest >= len {
            parts.push(format!("{}{name}", rest / len));
            rest %= len;
        } else if !parts.is_empty() {
            // Keep the two units adjacent: "2d 0h" would read oddly.
            break;
        }
        if parts.len() == 2 {
            break;
        }
    }
    if parts.is_empty() {
        "0s".to_string()
    } else {
        parts.join(" ")
    }
}

/// What the job takes on disk, shared extents once (as `btrfs filesystem
/// du -s` of its revisions), and after compression where btrfs compressed
/// some of it; or that the filesystem cannot tell.
fn space_line(job: &JobStatus) -> String {
    match &job.space {
        Some(s) => format!(
            "space: {} used ({} exclusive, {} shared; {} counted per file{})\n",
            format_bytes(used_bytes(s)),
            format_bytes(s.exclusive_bytes),
            format_bytes(s.shared_bytes),
            format_bytes(s.total_bytes),
            match s.disk_bytes {
                0 => String::new(),
                d => format!("; {} on disk after compression", format_bytes(d)),
            }
        ),
        None if job.revisions.is_empty() => String::new(),
        None => "space unknown (the filesystem does not map extents)\n".to_string(),
    }
}

/// Estimated data of a job: what each revision wrote.
fn data_bytes(job: &JobStatus) -> u64 {
    job.revisions.iter().map(|r| r.bytes_written).sum()
}

/// `status --json`.
#[derive(Debug, Serialize, PartialEq)]
pub struct StatusView {
    pub jobs: Vec<JobView>,
    /// The store's filesystem; `null` when the server did not say.
    pub store: Option<StoreView>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct JobView {
    pub job: String,
    pub storage: String,
    /// Shared extents counted per file: an upper bound (see `space`).
    pub allocated_bytes: u64,
    /// The job's revisions as `btrfs filesystem du -s` counts them; `null`
    /// when the filesystem cannot tell.
    pub space: Option<SpaceView>,
    /// Sum of the revisions' bytes written.
    pub data_bytes: u64,
    pub running: bool,
    /// `null` (like the SLA and next fields) when the job has no schedule.
    pub schedule: Option<String>,
    pub sla_ok: Option<bool>,
    pub sla_overdue_secs: Option<i64>,
    /// How old the newest trusted revision may get before the SLA breaks.
    pub sla_window_secs: Option<u64>,
    pub next_due: Option<String>,
    pub next_tags: Vec<String>,
    pub failures: u32,
    pub last_error: Option<String>,
    /// On a replica: how its copy of the job stands; `null` elsewhere.
    pub replica: Option<ReplicaView>,
    /// On a source: what each replica last fetched.
    pub fetched_by: Vec<FetchView>,
    /// Ids of revisions dated after the server's clock (scheduling and SLA
    /// count them as dated when the server found them).
    pub future_revisions: Vec<String>,
    /// Oldest first.
    pub revisions: Vec<RevisionView>,
}

/// A replica's copy of a job (`status --json`, `replica`).
#[derive(Debug, Serialize, PartialEq)]
pub struct ReplicaView {
    pub source: String,
    pub newest: Option<String>,
    pub missing: u32,
    pub lag_secs: u64,
    pub lag_warning_secs: u64,
    pub lag_critical_secs: u64,
    pub last_round: Option<String>,
    pub last_error: Option<String>,
    pub own_retention: bool,
    /// The identity the source named as the job's client: it may read
    /// and restore the copies here; `null`: none.
    pub owner: Option<String>,
    /// Listed for copying but a job of this server's own: not a copy.
    pub own_job: bool,
}

impl From<&backy_proto::ReplicaState> for ReplicaView {
    fn from(r: &backy_proto::ReplicaState) -> Self {
        ReplicaView {
            source: r.source.clone(),
            newest: rfc3339(&r.newest),
            missing: r.missing,
            lag_secs: r.lag_secs,
            lag_warning_secs: r.lag_warning_secs,
            lag_critical_secs: r.lag_critical_secs,
            last_round: rfc3339(&r.last_round),
            last_error: non_empty(&r.last_error),
            own_retention: r.own_retention,
            owner: non_empty(&r.owner),
            own_job: r.own_job,
        }
    }
}

/// What a replica fetched from this server (`status --json`, `fetched_by`).
#[derive(Debug, Serialize, PartialEq)]
pub struct FetchView {
    pub replica: String,
    pub revision: String,
    pub at: Option<String>,
}

/// Whether a job with this schedule name has a schedule (and so an SLA
/// and a next due time). Older servers send an empty name for "none".
pub(crate) fn has_schedule(schedule: &str) -> bool {
    !schedule.is_empty() && schedule != NO_SCHEDULE
}

impl From<&StatusReply> for StatusView {
    fn from(reply: &StatusReply) -> Self {
        StatusView {
            jobs: reply.jobs.iter().map(JobView::from).collect(),
            store: reply.store.as_ref().map(StoreView::from),
        }
    }
}

impl From<&JobStatus> for JobView {
    fn from(j: &JobStatus) -> Self {
        let scheduled = has_schedule(&j.schedule);
        JobView {
            job: j.job.clone(),
            storage: storage_name(j.storage).to_string(),
            allocated_bytes: j.allocated_bytes,
            space: j.space.as_ref().map(SpaceView::from),
            data_bytes: data_bytes(j),
            running: j.running,
            schedule: non_empty(&j.schedule),
            sla_ok: scheduled.then_some(j.sla_ok),
            sla_overdue_secs: overdue_json(scheduled, j.sla_ok, j.sla_overdue_secs),
            sla_window_secs: (scheduled && j.sla_window_secs > 0).then_some(j.sla_window_secs),
            next_due: rfc3339(&j.next_due),
            next_tags: j.next_tags.clone(),
            failures: j.failures,
            last_error: non_empty(&j.last_error),
            replica: j.replica.as_ref().map(ReplicaView::from),
            fetched_by: j
                .fetched_by
                .iter()
                .map(|f| FetchView {
                    replica: f.replica.clone(),
                    revision: f.revision.clone(),
                    at: rfc3339(&f.at),
                })
                .collect(),
            future_revisions: j.future_revisions.clone(),
            revisions: j.revisions.iter().map(RevisionView::from).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(rfc3339: &str) -> backy_proto::prost_types::Timestamp {
        backy_proto::timestamp(
            &chrono::DateTime::parse_from_rfc3339(rfc3339)
                .unwrap()
                .with_timezone(&chrono::Utc),
        )
    }

    fn rev(short: &str, time: &str, size: u64, sent: u64, secs: f64, tags: &[&str]) -> RevisionInfo {
        RevisionInfo {
            id: format!("uuid-{short}"),
            short_id: short.into(),
            timestamp: Some(ts(time)),
            size,
            bytes_received: sent,
            bytes_written: sent,
            duration_secs: secs,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            trust: backy_proto::Trust::Trusted as i32,
            storage: backy_proto::StorageMode::Reflink as i32,
            space: Some(space(size, size.min(1 << 30), size.saturating_sub(1 << 30))),
            ..RevisionInfo::default()
        }
    }

    fn space(total: u64, exclusive: u64, shared: u64) -> backy_proto::Space {
        backy_proto::Space {
            total_bytes: total,
            exclusive_bytes: exclusive,
            shared_bytes: shared,
            disk_bytes: 0,
        }
    }

    fn sample() -> StatusReply {
        StatusReply {
            jobs: vec![
                JobStatus {
                    job: "vm1".into(),
                    revisions: vec![
                        rev(
                            "3xkM1",
                            "2026-11-28T10:07:51Z",
                            20 << 30,
                            20 << 30,
                            252.4,
                            &["daily", "weekly"],
                        ),
                        rev(
                            "4abc2",
                            "2026-11-29T10:07:51+00:00",
                            20 << 30,
                            20 << 20,
                            3.0,
                            &["daily"],
                        ),
                    ],
                    storage: backy_proto::StorageMode::Reflink as i32,
                    allocated_bytes: 40 << 30,
                    space: Some(space(40 << 30, 2 << 30, 19 << 30)),
                    ..JobStatus::default()
                },
                JobStatus {
                    job: "vm2".into(),
                    storage: backy_proto::StorageMode::Copy as i32,
                    schedule: "default".into(),
                    sla_ok: false,
                    sla_overdue_secs: 3 * 3600 + 5,
                    next_due: Some(ts("2026-11-30T00:00:00Z")),
                    next_tags: vec!["daily".into(), "weekly".into()],
                    failures: 2,
                    last_error: "cannot open /dev/x".into(),
                    running: true,
                    ..JobStatus::default()
                },
            ],
            store: Some(backy_proto::StoreSpace {
                size_bytes: 100 << 30,
                used_bytes: 30 << 30,
            }),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-29T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// Issue 28: the revisions still locked at `now`, until when the last
    /// is, and when the next unlocks; a passed lock is not shown.
    #[test]
    fn locks_still_holding_are_summed_up() {
        let locked = |short: &str, until: &str| RevisionInfo {
            locked_until: Some(ts(until)),
            ..rev(short, "2026-11-28T10:00:00Z", 1, 1, 1.0, &["daily"])
        };
        let revs = [
            locked("a", "2026-11-29T11:00:00Z"),
            locked("b", "2026-11-29T14:00:00Z"),
            locked("c", "2026-11-29T13:00:00Z"),
            rev("d", "2026-11-29T10:00:00Z", 1, 1, 1.0, &[]),
        ];
        let mut out = String::new();
        format_locks(&mut out, &revs, now());
        assert_eq!(
            out,
            "retention lock: 2 revisions locked until 2026-11-29 14:00:00 (in 2h) at the latest; \
             the next unlocks 2026-11-29 13:00:00 (in 1h)\n"
        );
        let mut out = String::new();
        format_locks(&mut out, &revs[..1], now());
        assert_eq!(out, "", "a lock that has passed");
    }

    #[test]
    fn table_text() {
        let want = "\
== vm1 (storage: reflink)
Date (UTC)                        ID     Size       Sent       Exclusive  Duration  Tags          Trust
2026-11-28 10:07:51 (1d 1h ago)   3xkM1  20.00 GiB  20.00 GiB  1.00 GiB   252s      daily,weekly  trusted
2026-11-29 10:07:51 (1h 52m ago)  4abc2  20.00 GiB  20.00 MiB  1.00 GiB   3s        daily         trusted
== Summary
2 revisions, 20.02 GiB data (estimated: bytes written)
space: 21.00 GiB used (2.00 GiB exclusive, 19.00 GiB shared; 40.00 GiB counted per file)

== vm2 (storage: copy)
storage: copy, not CoW (filesystem without reflink)
Date (UTC)  ID  Size  Sent  Exclusive  Duration  Tags  Trust
(no revisions)
== Summary
0 revisions, 0 B data (estimated: bytes written)
a push is running
schedule: default
SLA: TOO OLD (no revisions yet)
next: 2026-11-30 00:00:00 (in 12h) (daily,weekly)
2 failures in a row
last error: cannot open /dev/x
store: 30.00 GiB of 100.00 GiB used (the whole filesystem)
";
        assert_eq!(format_status(&sample(), now()), want);
        assert_eq!(format_status(&StatusReply::default(), now()), "no jobs\n");
    }

    /// Issue 29, item 5: a replica's copy takes no pushes: no next due
    /// time (a copy with its own schedule had "next: ... (0s ago)"), no
    /// "manual pushes only" (a copy without one); it says it is a copy,
    /// how it keeps revisions, and that pushes go to the source.
    #[test]
    fn a_copy_is_no_job_to_push() {
        let copy = |schedule: &str, own_retention: bool| JobStatus {
            job: "vm5".into(),
            revisions: vec![rev("5xyz", "2026-11-29T11:00:00Z", 1, 1, 1.0, &["weekly"])],
            schedule: schedule.into(),
            sla_ok: true,
            next_due: Some(ts("2026-11-29T12:00:00Z")),
            next_tags: vec!["weekly".into()],
            replica: Some(backy_proto::ReplicaState {
                source: "https://backup1:7807".into(),
                own_retention,
                ..Default::default()
            }),
            ..JobStatus::default()
        };
        let text = |j: JobStatus| {
            format_status(
                &StatusReply {
                    jobs: vec![j],
                    ..Default::default()
                },
                now(),
            )
        };
        let own = text(copy("weekly", true));
        assert!(!own.contains("next:"), "{own}");
        assert!(
            own.contains("\nschedule: weekly (keeps the copies here)\n"),
            "{own}"
        );
        assert!(
            own.contains("\ncopy of https://backup1:7807 (its own schedule keeps the copies; takes no pushes: they go to the source)\n"),
            "{own}"
        );
        let mirrored = text(copy(NO_SCHEDULE, false));
        assert!(!mirrored.contains("manual pushes only"), "{mirrored}");
        assert!(!mirrored.contains("schedule:"), "{mirrored}");
        assert!(
            mirrored.contains("\ncopy of https://backup1:7807 (mirrors the source's expiry; takes no pushes: they go to the source)\n"),
            "{mirrored}"
        );
    }

    #[test]
    fn overdue_sla() {
        let reply = StatusReply {
            jobs: vec![JobStatus {
                job: "vm3".into(),
                revisions: vec![rev("5xyz", "2026-11-01T00:00:00Z", 1, 1, 1.0, &["daily"])],
                schedule: "default".into(),
                sla_overdue_secs: 2 * 86400 + 5 * 3600,
                ..JobStatus::default()
            }],
            ..StatusReply::default()
        };
        let text = format_status(&reply, now());
        assert!(text.contains("\nSLA: TOO OLD (overdue 2d 5h)\n"), "{text}");
        assert!(!text.contains("next:"), "{text}");
    }

    #[test]
    fn json_keys_are_stable() {
        let v = serde_json::to_value(StatusView::from(&sample())).unwrap();
        let vm1 = &v["jobs"][0];
        assert_eq!(vm1["job"], "vm1");
        assert_eq!(vm1["data_bytes"], (20u64 << 30) + (20 << 20));
        assert!(vm1["schedule"].is_null() && vm1["sla_ok"].is_null());
        assert_eq!(vm1["revisions"][0]["id"], "3xkM1");
        assert_eq!(
            vm1["revisions"][0]["tags"],
            serde_json::json!(["daily", "weekly"])
        );
        assert!(vm1["revisions"][0]["parent_id"].is_null());
        assert_eq!(
            vm1["space"],
            serde_json::json!({
                "total_bytes": 40u64 << 30,
                "exclusive_bytes": 2u64 << 30,
                "shared_bytes": 19u64 << 30,
                "used_bytes": 21u64 << 30,
            })
        );
        assert_eq!(vm1["revisions"][1]["space"]["exclusive_bytes"], 1u64 << 30);
        assert_eq!(v["store"]["used_bytes"], 30u64 << 30);
        let vm2 = &v["jobs"][1];
        assert_eq!(vm2["sla_ok"], false);
        assert_eq!(vm2["sla_overdue_secs"], 3 * 3600 + 5);
        assert_eq!(vm2["last_error"], "cannot open /dev/x");
        assert!(vm2["space"].is_null(), "no revisions, nothing counted");
    }

    #[test]
    fn unknown_space_is_said_not_invented() {
        let mut reply = sample();
        reply.jobs.truncate(1);
        reply.jobs[0].space = None;
        reply.jobs[0].revisions[0].space = None;
        reply.store = None;
        let text = format_status(&reply, now());
        assert!(text.contains("\nspace unknown ("), "{text}");
        assert!(text.contains("  ?  "), "{text}");
        assert!(!text.contains("store:"), "{text}");
    }

    /// Issue 31, item 6: a compressed store shows what the job takes on
    /// disk after compression, in the space line and in JSON; otherwise
    /// neither says anything about compression.
    #[test]
    fn compressed_bytes_are_shown_only_when_there_are_some() {
        let mut reply = sample();
        reply.jobs.truncate(1);
        let text = format_status(&reply, now());
        assert!(!text.contains("compression"), "{text}");
        let json = serde_json::to_value(JobView::from(&reply.jobs[0])).unwrap();
        assert!(json["space"].get("disk_bytes").is_none(), "{json}");

        reply.jobs[0].space.as_mut().unwrap().disk_bytes = 3 << 29;
        let text = format_status(&reply, now());
        assert!(
            text.contains(
                "space: 21.00 GiB used (2.00 GiB exclusive, 19.00 GiB shared; \
                 40.00 GiB counted per file; 1.50 GiB on disk after compression)\n"
            ),
            "{text}"
        );
        let json = serde_json::to_value(JobView::from(&reply.jobs[0])).unwrap();
        assert_eq!(json["space"]["disk_bytes"], 3u64 << 29, "{json}");
    }

    #[test]
    fn overdue_agrees_with_the_sla() {
        assert_eq!(overdue_json(false, false, 0), None, "no schedule: no SLA");
        assert_eq!(overdue_json(true, true, 0), Some(0));
        assert_eq!(overdue_json(true, false, 3600), Some(3600));
        assert_eq!(
            overdue_json(true, false, 0),
            None,
            "broken, no deadline to count from"
        );
    }

    #[test]
    fn human_durations() {
        for (secs, want) in [
            (0, "0s"),
            (45, "45s"),
            (60, "1m"),
            (3 * 3600 + 5, "3h"),
            (3 * 3600 + 120, "3h 2m"),
            (2 * 86400 + 4 * 3600 + 9, "2d 4h"),
            (86400 + 60, "1d"),
        ] {
            assert_eq!(human_secs(secs), want, "{secs}");
        }
    }
}
