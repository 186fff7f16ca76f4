//! The status page: server-rendered HTML with inline CSS and SVG, no
//! script and no external asset, so it works offline and from a browser
//! on a jump host. Built from the same summaries and job status as the
//! `status` RPC (`crate::status`). Every text from outside the code (job
//! names, tags, errors, schedule names) goes through [`esc`].

use crate::auth::{self, Action, Caller};
use crate::state::Server;
use backy_common::config::{Schedule, NO_SCHEDULE};
use backy_common::units::format_bytes;
use backy_common::{JobName, Result};
use backy_proto::prost_types::Timestamp;
use backy_proto::{JobStatus, JobSummary, ReplicaState, RevisionInfo, Space, StatusRequest, Trust};
use chrono::{DateTime, Utc};
use std::fmt::Write;

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// How a job stands, as a word, a CSS class (its colour) and a rank
/// (problems first).
struct State {
    word: &'static str,
    class: &'static str,
    rank: u8,
}

fn state(schedule: &str, sla_ok: bool, revisions: u32, any_trusted: bool, failures: u32) -> State {
    let (word, class) = match (sla_ok, schedule == NO_SCHEDULE) {
        (false, _) if revisions == 0 => ("no backup", "bad"),
        (false, _) if !any_trusted => ("distrusted", "bad"),
        (false, _) => ("too old", "bad"),
        (true, _) if failures > 0 => ("failing", "warn"),
        (true, true) => ("no schedule", "none"),
        (true, false) if revisions == 0 => ("no backup yet", "warn"),
        (true, false) => ("OK", "ok"),
    };
    let rank = match class {
        "bad" => 0,
        "warn" => 1,
        "ok" => 2,
        _ => 3,
    };
    State { word, class, rank }
}

fn time_of(t: Option<&Timestamp>) -> Option<DateTime<Utc>> {
    t.and_then(backy_proto::datetime)
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// "3 min", "5 h 2 min", "4 d 3 h": a span of seconds for people.
fn fmt_span(secs: i64) -> String {
    let s = secs.unsigned_abs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// When a job is next due: "now" once the time has come (the agent orders
/// it, or a push by hand runs it).
fn due(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    // Summaries compute due times a moment after the page took `now`.
    if (t - now).num_seconds() <= 0 {
        "now".into()
    } else {
        age(t, now)
    }
}

fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds();
    if secs >= 0 {
        format!("{} ago", fmt_span(secs))
    } else {
        format!("in {}", fmt_span(secs))
    }
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}header a{color:#9cc3ff}
main{padding:16px 20px}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px #0002}
th,td{padding:6px 10px;text-align:left;border-bottom:1px solid #e4e6eb;vertical-align:top;white-space:nowrap}
th{background:#eceef2;font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr:hover td{background:#f7f9fc}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;white-space:nowrap}
.ok{background:#d8f3dc;color:#1b6b34}.warn{background:#fff1c2;color:#7a5a00}
.bad{background:#fbd5d5;color:#9b1c1c}.none{background:#e4e6eb;color:#4a5160}
.err{color:#9b1c1c;font-size:12px;max-width:32em;overflow-wrap:anywhere;white-space:normal;text-align:left}
.muted{color:#6b7280}.tag{display:inline-block;background:#e8eefc;color:#23408e;border-radius:4px;padding:0 5px;margin:1px;font-size:12px}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px;background:#fff;padding:12px 16px;box-shadow:0 1px 2px #0002}
dt{color:#6b7280}dd{margin:0}
h2{font-size:16px;margin:22px 0 8px}
.summary span{margin-right:14px}
svg{background:#fff;box-shadow:0 1px 2px #0002;max-width:100%;height:auto}
code{font-size:12px}
"#;

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\
         <header><h1>{}</h1><span>backy-server {}</span><a href=\"/\">all jobs</a>\
         <a href=\"/metrics\">metrics</a></header><main>{body}</main></body></html>\n",
        esc(title),
        esc(title),
        esc(backy_proto::VERSION)
    )
}

fn badge(s: &State) -> String {
    format!("<span class=\"badge {}\">{}</span>", s.class, s.word)
}

/// `/`: one row per job the caller may see, problems first.
pub fn overview(server: &Server, caller: &Caller) -> Result<String> {
    let config = server.config();
    let now = Utc::now();
    let mut rows: Vec<(State, JobSummary)> = Vec::new();
    for name in config.jobs.keys() {
        if !auth::may_see(&config, caller, name, Action::Read) {
            continue;
        }
        let s = crate::status::summary(server, &config, name)?;
        rows.push((summary_state(&s), s));
    }
    rows.sort_by(|a, b| (a.0.rank, &a.1.job).cmp(&(b.0.rank, &b.1.job)));
    let mut body = String::new();
    let count = |class: &str| rows.iter().filter(|(s, _)| s.class == class).count();
    let _ = write!(
        body,
        "<p class=\"summary\"><span>{}</span><span class=\"badge bad\">{} need attention</span> \
         <span class=\"badge warn\">{}</span> <span class=\"badge ok\">{} OK</span> \
         <span class=\"badge none\">{} without schedule</span>",
        backy_common::units::count(rows.len() as u64, "job"),
        count("bad"),
        backy_common::units::count(count("warn") as u64, "warning"),
        count("ok"),
        count("none"),
    );
    if let Some(pool) = server.pool() {
        let c = pool.store.config();
        let _ = write!(
            body,
            "<span>store: ceph-rbd pool {}{}</span>",
            esc(&c.pool),
            c.namespace
                .as_deref()
                .map(|n| format!(" namespace {}", esc(n)))
                .unwrap_or_default()
        );
    } else if let Ok(fs) = rustix::fs::statvfs(&config.base_dir) {
        let frsize = fs.f_frsize.max(1);
        let _ = write!(
            body,
            "<span>base dir: {} used, {} free of {}</span>",
            format_bytes(fs.f_blocks.saturating_sub(fs.f_bfree).saturating_mul(frsize)),
            format_bytes(fs.f_bavail.saturating_mul(frsize)),
            format_bytes(fs.f_blocks.saturating_mul(frsize))
        );
    }
    let _ = write!(body, "<span class=\"muted\">as of {}</span></p>", fmt_time(now));
    body.push_str(
        "<table><thead><tr><th>Job</th><th>State</th><th>Last backup</th><th>Age</th>\
         <th>Next due</th><th class=\"num\">Revisions</th><th class=\"num\">Size</th>\
         <th class=\"num\">Disk used</th><th class=\"num\">Failures</th></tr></thead><tbody>\n",
    );
    for (st, s) in &rows {
        body.push_str(&overview_row(st, s, now));
    }
    body.push_str("</tbody></table>");
    Ok(page("backy status", &body))
}

/// A job's real use (shared extents once) for the overview table.
fn used_cell(space: Option<&Space>, has_revisions: bool) -> String {
    match space {
        Some(s) => format_bytes(s.exclusive_bytes.saturating_add(s.shared_bytes)),
        None if has_revisions => "unknown".into(),
        None => "–".into(),
    }
}

/// The job page's disk facts, the way `btrfs filesystem du -s` counts.
fn disk_facts(space: Option<&Space>, has_revisions: bool) -> String {
    match space {
        Some(s) => format!(
            "{} used <span class=\"muted\">({} exclusive, {} shared; {} counted per file{})</span>",
            format_bytes(s.exclusive_bytes.saturating_add(s.shared_bytes)),
            format_bytes(s.exclusive_bytes),
            format_bytes(s.shared_bytes),
            format_bytes(s.total_bytes),
            // 0: nothing compressed, or the filesystem cannot tell.
            match s.disk_bytes {
                0 => String::new(),
                d => format!("; {} on disk after compression", format_bytes(d)),
            }
        ),
        None if has_revisions => {
            "unknown <span class=\"muted\">(the filesystem does not map extents)</span>".into()
        }
        None => "–".into(),
    }
}

/// A replica's copy of a job (not a listed job of its own).
fn copy_of(replica: Option<&ReplicaState>) -> Option<&ReplicaState> {
    replica.filter(|r| !r.own_job)
}

/// How a copy stands: by its lag and its last round (it takes no pushes,
/// so its source's SLA is not its to keep).
fn copy_state(r: &ReplicaState) -> State {
    let (word, class, rank) = if r.lag_secs >= r.lag_critical_secs {
        ("copy too far behind", "bad", 0)
    } else if r.lag_secs >= r.lag_warning_secs {
        ("copy lagging", "warn", 1)
    } else if !r.last_error.is_empty() {
        ("copy failing", "warn", 1)
    } else {
        ("copy OK", "ok", 2)
    };
    State { word, class, rank }
}

/// A copy's lag and what is missing, for the overview's "Next due" cell
/// (nothing is ever due: pushes go to the source).
fn copy_cell(r: &ReplicaState) -> String {
    let mut cell = format!(
        "copy, lag {} <span class=\"muted\">{} missing</span>",
        fmt_span(i64::try_from(r.lag_secs).unwrap_or(i64::MAX)),
        r.missing
    );
    if !r.last_error.is_empty() {
        let _ = write!(
            cell,
            "<div class=\"err\">replication: {}</div>",
            esc(&r.last_error)
        );
    }
    cell
}

/// The job page's replication facts: what the copy is, its lag, what is
/// missing, the last round and why it failed, and who owns it.
fn replication_facts(r: &ReplicaState, now: DateTime<Utc>) -> String {
    let span = |secs: u64| fmt_span(i64::try_from(secs).unwrap_or(i64::MAX));
    if r.own_job {
        return format!(
            "listed for copying from {}, but a job of this server's own: not copied \
             <span class=\"err\">{}</span>",
            esc(&r.source),
            esc(&r.last_error)
        );
    }
    let retention = if r.own_retention {
        "its own schedule keeps the copies"
    } else {
        "mirrors the source's expiry"
    };
    let mut out = format!(
        "copy of {} ({retention}; takes no pushes: they go to the source)<br>lag {} \
         <span class=\"muted\">(warning from {}, critical from {})</span>, {}",
        esc(&r.source),
        span(r.lag_secs),
        span(r.lag_warning_secs),
        span(r.lag_critical_secs),
        if r.missing == 0 {
            "nothing to copy".to_string()
        } else {
            format!(
                "{} not copied yet",
                backy_common::units::count(u64::from(r.missing), "revision")
            )
        },
    );
    let _ = write!(
        out,
        "; source last read: {}",
        time_of(r.last_round.as_ref()).map_or("never since start".into(), |t| format!(
            "{} ({})",
            fmt_time(t),
            age(t, now)
        ))
    );
    if !r.last_error.is_empty() {
        let _ = write!(
            out,
            "<br><span class=\"err\">failing: {}</span>",
            esc(&r.last_error)
        );
    }
    if !r.owner.is_empty() {
        let _ = write!(
            out,
            "<br>owner: {} <span class=\"muted\">(may read and restore it here)</span>",
            esc(&r.owner)
        );
    }
    out
}

/// How a job of the overview stands.
fn summary_state(s: &JobSummary) -> State {
    if let Some(r) = copy_of(s.replica.as_ref()) {
        return copy_state(r);
    }
    state(
        &s.schedule,
        s.sla_ok,
        s.revisions,
        s.newest_trusted.is_some(),
        s.failures,
    )
}

/// One row of the overview.
fn overview_row(st: &State, s: &JobSummary, now: DateTime<Utc>) -> String {
    let newest = s.newest.as_ref();
    let last = time_of(newest.and_then(|n| n.timestamp.as_ref()));
    let next = time_of(s.next_due.as_ref());
    let copy = copy_of(s.replica.as_ref());
    let mut row = String::new();
    let _ = writeln!(
        row,
        "<tr data-job=\"{job}\" data-state=\"{word}\"><td><a href=\"/job/{job}\">{job}</a>\
         <div class=\"muted\">{sched}</div></td><td>{badge}</td><td>{last}</td><td>{age}</td>\
         <td>{next}</td><td class=\"num\">{revs}{distrusted}</td><td class=\"num\">{size}</td>\
         <td class=\"num\">{alloc}</td><td class=\"num\">{failures}{error}</td></tr>",
        job = esc(&s.job),
        word = st.word,
        sched = match copy {
            Some(_) if s.schedule == NO_SCHEDULE => "copy".to_string(),
            _ => esc(&s.schedule),
        },
        badge = badge(st),
        last = last.map_or("never".into(), fmt_time),
        age = last.map_or("–".into(), |t| age(t, now)),
        next = match next {
            _ if copy.is_some() => copy.map(copy_cell).unwrap_or_default(),
            Some(t) if s.next_tags.is_empty() => due(t, now),
            Some(t) => format!(
                "{} <span class=\"muted\">{}</span>",
                due(t, now),
                esc(&s.next_tags.join(", "))
            ),
            None => "–".into(),
        },
        revs = s.revisions,
        distrusted = if s.distrusted > 0 {
            format!(" <span class=\"badge bad\">{} distrusted</span>", s.distrusted)
        } else {
            String::new()
        },
        size = newest.map_or("–".into(), |n| format_bytes(n.size)),
        alloc = used_cell(s.space.as_ref(), s.revisions > 0),
        failures = s.failures,
        error = if s.last_error.is_empty() {
            String::new()
        } else {
            format!("<div class=\"err\">{}</div>", esc(&s.last_error))
        },
    );
    row
}

/// `/job/NAME`: facts, the revision timeline and the revision table.
pub fn job(server: &Server, name: &JobName) -> Result<String> {
    let config = server.config();
    let reply = crate::status::status(
        server,
        &StatusRequest {
            job: name.to_string(),
        },
    )?;
    let Some(j) = reply.jobs.into_iter().next() else {
        return Err(backy_common::Error::not_found(format!("unknown job {name}")));
    };
    let schedule = config.job(name).ok().and_then(|c| config.schedule_of(c));
    let now = Utc::now();
    let mut body = facts(&j, schedule, now);
    body.push_str("<h2>Revision timeline</h2>");
    body.push_str(&timeline(&j, schedule, now));
    body.push_str(&revision_table(&j, now));
    Ok(page(&format!("backy: {}", j.job), &body))
}

/// The job page's facts: state, schedule, backups, failures.
fn facts(j: &JobStatus, schedule: Option<&Schedule>, now: DateTime<Utc>) -> String {
    let any_trusted = j.revisions.iter().any(|r| r.trust() != Trust::Distrusted);
    let copy = copy_of(j.replica.as_ref());
    let st = match copy {
        Some(r) => copy_state(r),
        None => state(
            &j.schedule,
            j.sla_ok,
            u32::try_from(j.revisions.len()).unwrap_or(u32::MAX),
            any_trusted,
            j.failures,
        ),
    };
    let mut body = String::new();
    let newest = j.revisions.last();
    let last = time_of(newest.and_then(|n| n.timestamp.as_ref()));
    let rules = match (schedule, copy) {
        (None, Some(_)) => "none: mirrors the source's expiry".to_string(),
        (None, None) => "none: pushed by hand, nothing expires, no SLA".to_string(),
        (Some(s), _) => {
            let rules = s
                .iter()
                .map(|(tag, r)| format!("{} every {}, keep {}", esc(tag), r.interval, r.keep))
                .collect::<Vec<_>>()
                .join("; ");
            if copy.is_some() {
                format!("{rules} (keeps the copies here)")
            } else {
                rules
            }
        }
    };
    let _ = write!(
        body,
        "<dl><dt>State</dt><dd>{badge}{sla}</dd><dt>Schedule</dt><dd>{sched}: {rules}</dd>\
         <dt>Last backup</dt><dd>{last}</dd><dt>Next due</dt><dd>{next}</dd>\
         <dt>Revisions</dt><dd>{revs}</dd><dt>Size</dt><dd>{size}</dd><dt>Disk</dt><dd>{alloc}</dd>\
         <dt>Failures</dt><dd>{failures}{error}</dd><dt>Running</dt><dd>{running}</dd>{replication}</dl>",
        badge = badge(&st),
        sla = if j.sla_window_secs > 0 {
            format!(
                " <span class=\"muted\">SLA: a trusted revision at most {} old</span>",
                fmt_span(j.sla_window_secs as i64)
            )
        } else {
            String::new()
        },
        sched = esc(&j.schedule),
        last = last.map_or("never".into(), |t| format!("{} ({})", fmt_time(t), age(t, now))),
        next = match time_of(j.next_due.as_ref()) {
            _ if copy.is_some() =>
                "– <span class=\"muted\">(a copy takes no pushes: they go to the source)</span>".into(),
            Some(t) => format!(
                "{} ({}) {}",
                fmt_time(t),
                due(t, now),
                esc(&j.next_tags.join(", "))
            ),
            None => "–".into(),
        },
        revs = j.revisions.len(),
        size = newest.map_or("–".into(), |n| format_bytes(n.size)),
        alloc = disk_facts(j.space.as_ref(), !j.revisions.is_empty()),
        failures = j.failures,
        error = if j.last_error.is_empty() {
            String::new()
        } else {
            format!(" <span class=\"err\">{}</span>", esc(&j.last_error))
        },
        running = if j.running { "a push is running" } else { "no" },
        replication = j.replica.as_ref().map_or(String::new(), |r| format!(
            "<dt>Replication</dt><dd>{}</dd>",
            replication_facts(r, now)
        )),
    );
    body
}

fn revision_table(j: &JobStatus, now: DateTime<Utc>) -> String {
    let mut out = String::from(
        "<h2>Revisions</h2><table><thead><tr><th class=\"num\">#</th><th>Id</th><th>Time</th><th>Age</th>\
         <th>Tags</th><th>Trust</th><th class=\"num\">Size</th><th class=\"num\">Received</th>\
         <th class=\"num\">Push took</th><th class=\"num\">Exclusive</th><th class=\"num\">Shared</th>\
         </tr></thead><tbody>\n",
    );
    for (n, r) in j.revisions.iter().rev().enumerate() {
        let t = time_of(r.timestamp.as_ref());
        let trust = match r.trust() {
            Trust::Distrusted => "<span class=\"badge bad\">distrusted</span>".to_string(),
            Trust::Verified => format!(
                "<span class=\"badge ok\">verified</span> <span class=\"muted\">{}</span>",
                time_of(r.verified_at.as_ref()).map_or(String::new(), |v| age(v, now))
            ),
            _ => "<span class=\"badge none\">trusted</span>".to_string(),
        };
        let trust = trust + &lock_badge(r, now);
        let _ = writeln!(
            out,
            "<tr data-rev=\"{id}\"><td class=\"num\">{n}</td><td><code>{id}</code></td><td>{time}</td>\
             <td>{age}</td><td>{tags}</td><td>{trust}</td><td class=\"num\">{size}</td>\
             <td class=\"num\">{recv}</td><td class=\"num\">{took:.1} s</td>\
             <td class=\"num\">{excl}</td><td class=\"num\">{shared}</td></tr>",
            id = esc(&r.short_id),
            time = t.map_or("?".into(), fmt_time),
            age = t.map_or("?".into(), |t| age(t, now)),
            tags = r
                .tags
                .iter()
                .map(|t| format!("<span class=\"tag\">{}</span>", esc(t)))
                .collect::<String>(),
            size = format_bytes(r.size),
            recv = format_bytes(r.bytes_received),
            took = r.duration_secs,
            excl = r
                .space
                .as_ref()
                .map_or("?".into(), |s| format_bytes(s.exclusive_bytes)),
            shared = r
                .space
                .as_ref()
                .map_or("?".into(), |s| format_bytes(s.shared_bytes)),
        );
    }
    if j.revisions.is_empty() {
        out.push_str("<tr><td colspan=\"11\" class=\"muted\">no revisions yet</td></tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// Geometry of the timeline.
const WIDTH: f64 = 960.0;
const LEFT: f64 = 150.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 24.0;
const LANE: f64 = 34.0;
const AXIS: f64 = 50.0;

/// The lanes: schedule tags (shortest interval first), then other tags the
/// revisions carry, then revisions without tags.
fn lanes(revs: &[RevisionInfo], schedule: Option<&Schedule>) -> Vec<String> {
    let mut lanes: Vec<(u64, String)> = schedule
        .map(|s| s.iter().map(|(t, r)| (r.interval.secs(), t.clone())).collect())
        .unwrap_or_default();
    lanes.sort();
    let mut lanes: Vec<String> = lanes.into_iter().map(|(_, t)| t).collect();
    let mut others: Vec<&String> = revs
        .iter()
        .flat_map(|r| &r.tags)
        .filter(|t| !lanes.contains(t))
        .collect();
    others.sort();
    others.dedup();
    lanes.extend(others.into_iter().cloned());
    if revs.iter().any(|r| r.tags.is_empty()) {
        lanes.push(String::new());
    }
    lanes
}

/// An inline SVG: time left to right, a lane per tag, one mark (a `<g
/// class="rev">`) per revision with a dot in each of its tags' lanes,
/// distrusted ones as red crosses; per schedule tag, the expiry horizon
/// (`keep × interval` back from now: older revisions lose the tag once
/// `keep` newer ones carry it) with the region behind it shaded.
fn timeline(j: &JobStatus, schedule: Option<&Schedule>, now: DateTime<Utc>) -> String {
    let revs = &j.revisions;
    let lanes = lanes(revs, schedule);
    let n_lanes = lanes.len().max(1);
    let height = TOP + LANE * n_lanes as f64 + AXIS;
    let now_s = now.timestamp() as f64;
    let times: Vec<f64> = revs
        .iter()
        .filter_map(|r| r.timestamp.as_ref())
        .map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
        .collect();
    let horizons: Vec<(String, f64, String)> = schedule
        .map(|s| {
            s.iter()
                .map(|(tag, r)| {
                    let back = r.interval.secs() as f64 * f64::from(r.keep);
                    (
                        tag.clone(),
                        now_s - back,
                        format!("keep {} × {}", r.keep, r.interval),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let earliest = times
        .iter()
        .chain(horizons.iter().map(|h| &h.1))
        .fold(now_s, |a, &b| a.min(b));
    let span = (now_s - earliest).max(3600.0);
    let (t0, t1) = (now_s - span * 1.06, now_s + span * 0.04);
    let plot = WIDTH - LEFT - RIGHT;
    let x = |t: f64| LEFT + (t - t0) / (t1 - t0) * plot;
    let lane_y = |i: usize| TOP + LANE * i as f64 + LANE / 2.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"timeline\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"system-ui,DejaVu Sans,sans-serif\" font-size=\"12\" \
         role=\"img\" aria-label=\"revision timeline of {}\">",
        esc(&j.job)
    );
    for (i, lane) in lanes.iter().enumerate() {
        let y = TOP + LANE * i as f64;
        let fill = if i % 2 == 0 { "#f7f8fa" } else { "#ffffff" };
        let label = if lane.is_empty() {
            "(no tags)".to_string()
        } else {
            esc(lane)
        };
        let _ = write!(
            svg,
            "<rect x=\"{LEFT}\" y=\"{y}\" width=\"{plot}\" height=\"{LANE}\" fill=\"{fill}\"/>\
             <text x=\"{lx}\" y=\"{ty:.1}\" text-anchor=\"end\" fill=\"#1d2330\">{label}</text>",
            lx = LEFT - 10.0,
            ty = y + LANE / 2.0 + 4.0,
        );
        if let Some((_, h, what)) = horizons.iter().find(|(t, _, _)| t == lane) {
            let hx = x(*h).max(LEFT);
            let _ = write!(
                svg,
                "<g class=\"horizon\" data-tag=\"{tag}\"><title>{tag}: {what}: older revisions lose the tag \
                 once {what_keep} newer ones carry it</title>\
                 <rect x=\"{LEFT}\" y=\"{y}\" width=\"{w:.1}\" height=\"{LANE}\" fill=\"#e9ebef\"/>\
                 <line x1=\"{hx:.1}\" x2=\"{hx:.1}\" y1=\"{y}\" y2=\"{y2}\" stroke=\"#8a93a3\" stroke-dasharray=\"4 3\"/>\
                 <text x=\"{tx:.1}\" y=\"{tyy:.1}\" fill=\"#6b7280\" font-size=\"10\">{what}</text></g>",
                tag = esc(lane),
                what_keep = what.split(' ').nth(1).unwrap_or(""),
                w = hx - LEFT,
                y2 = y + LANE,
                tx = hx + 3.0,
                tyy = y + LANE - 3.0,
            );
        }
    }
    // Time axis.
    let axis_y = TOP + LANE * n_lanes as f64;
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" x2=\"{r}\" y1=\"{axis_y}\" y2=\"{axis_y}\" stroke=\"#8a93a3\"/>",
        r = LEFT + plot
    );
    let step = [
        60.0, 300.0, 900.0, 3600.0, 10800.0, 21600.0, 43200.0, 86400.0, 172800.0, 604800.0, 1209600.0,
        2592000.0, 7776000.0, 31536000.0,
    ]
    .into_iter()
    .find(|s| (t1 - t0) / s <= 8.0)
    .unwrap_or(31536000.0);
    let mut t = (t0 / step).ceil() * step;
    while t <= t1 {
        let tx = x(t);
        let label = DateTime::from_timestamp(t as i64, 0).map_or(String::new(), |d| {
            if step >= 86400.0 {
                d.format("%b %d").to_string()
            } else {
                d.format("%H:%M").to_string()
            }
        });
        let _ = write!(
            svg,
            "<line x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{TOP}\" y2=\"{y2}\" stroke=\"#dfe2e8\"/>\
             <text x=\"{tx:.1}\" y=\"{ty}\" text-anchor=\"middle\" fill=\"#6b7280\">{label}</text>",
            y2 = axis_y + 4.0,
            ty = axis_y + 18.0,
        );
        t += step;
    }
    let nx = x(now_s);
    let _ = write!(
        svg,
        "<line x1=\"{nx:.1}\" x2=\"{nx:.1}\" y1=\"{y1}\" y2=\"{axis_y}\" stroke=\"#1d2330\" stroke-width=\"1.5\"/>\
         <text x=\"{nx:.1}\" y=\"{ty}\" text-anchor=\"middle\" fill=\"#1d2330\" font-weight=\"600\">now</text>",
        y1 = TOP - 4.0,
        ty = TOP - 8.0,
    );
    // The marks, oldest first (newer ones drawn on top), and where they
    // fall per lane, for the counts of marks drawn on one spot.
    let mut spots: Vec<Vec<f64>> = vec![Vec::new(); lanes.len()];
    for r in revs {
        let Some(ts) = r.timestamp.as_ref() else {
            continue;
        };
        let rx = x(ts.seconds as f64 + f64::from(ts.nanos) / 1e9);
        let rows: Vec<usize> = if r.tags.is_empty() {
            vec![lanes.len().saturating_sub(1)]
        } else {
            r.tags
                .iter()
                .filter_map(|t| lanes.iter().position(|l| l == t))
                .collect()
        };
        let distrusted = r.trust() == Trust::Distrusted;
        let (class, colour) = match r.trust() {
            Trust::Distrusted => ("rev distrusted", "#c81e1e"),
            Trust::Verified => ("rev verified", "#1b8a3a"),
            _ => ("rev", "#2f5fd0"),
        };
        let when = time_of(Some(ts)).map_or(String::new(), fmt_time);
        let _ = write!(
            svg,
            "<g class=\"{class}\" data-rev=\"{id}\"><title>{id} {when} [{tags}]{trust}</title>",
            id = esc(&r.short_id),
            tags = esc(&r.tags.join(", ")),
            trust = if distrusted { " DISTRUSTED" } else { "" },
        );
        if let (Some(first), Some(last)) = (rows.iter().min(), rows.iter().max()) {
            if first != last {
                let _ = write!(
                    svg,
                    "<line x1=\"{rx:.1}\" x2=\"{rx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-opacity=\"0.35\" stroke-width=\"2\"/>",
                    lane_y(*first),
                    lane_y(*last)
                );
            }
        }
        for &row in &rows {
            if let Some(spot) = spots.get_mut(row) {
                spot.push(rx);
            }
            let cy = lane_y(row);
            if distrusted {
                let _ = write!(
                    svg,
                    "<path d=\"M{a:.1} {b:.1}L{c:.1} {d:.1}M{a:.1} {d:.1}L{c:.1} {b:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/>",
                    a = rx - 6.0,
                    b = cy - 6.0,
                    c = rx + 6.0,
                    d = cy + 6.0
                );
            } else {
                let _ = write!(
                    svg,
                    "<circle cx=\"{rx:.1}\" cy=\"{cy:.1}\" r=\"6\" fill=\"{colour}\" stroke=\"#fff\" stroke-width=\"1.5\"/>"
                );
            }
        }
        svg.push_str("</g>");
    }
    for (row, xs) in spots.iter_mut().enumerate() {
        for (cx, n) in crowded(xs) {
            let _ = write!(
                svg,
                "<g class=\"cluster\" data-count=\"{n}\"><title>{n} revisions on this spot</title>\
                 <circle cx=\"{bx:.1}\" cy=\"{by:.1}\" r=\"7\" fill=\"#1d2330\"/>\
                 <text x=\"{bx:.1}\" y=\"{ty:.1}\" text-anchor=\"middle\" fill=\"#fff\" font-size=\"9\">{n}</text></g>",
                bx = cx + 7.0,
                by = lane_y(row) - 8.0,
                ty = lane_y(row) - 5.0,
            );
        }
    }
    // Legend.
    let ly = axis_y + 36.0;
    let _ = write!(
        svg,
        "<g font-size=\"11\" fill=\"#4a5160\"><circle cx=\"{a}\" cy=\"{c}\" r=\"5\" fill=\"#2f5fd0\"/>\
         <text x=\"{b}\" y=\"{ly}\">revision</text>\
         <circle cx=\"{d}\" cy=\"{c}\" r=\"5\" fill=\"#1b8a3a\"/><text x=\"{e}\" y=\"{ly}\">verified</text>\
         <path d=\"M{f0} {c0}L{f1} {c1}M{f0} {c1}L{f1} {c0}\" stroke=\"#c81e1e\" stroke-width=\"2.5\"/>\
         <text x=\"{g}\" y=\"{ly}\">distrusted</text>\
         <rect x=\"{h}\" y=\"{r0}\" width=\"16\" height=\"10\" fill=\"#e9ebef\" stroke=\"#8a93a3\" stroke-dasharray=\"3 2\"/>\
         <text x=\"{i}\" y=\"{ly}\">beyond the tag's expiry horizon (keep × interval)</text></g>",
        a = LEFT + 5.0,
        b = LEFT + 14.0,
        c = ly - 4.0,
        d = LEFT + 85.0,
        e = LEFT + 94.0,
        f0 = LEFT + 160.0,
        f1 = LEFT + 170.0,
        c0 = ly - 9.0,
        c1 = ly + 1.0,
        g = LEFT + 176.0,
        h = LEFT + 250.0,
        r0 = ly - 9.0,
        i = LEFT + 272.0,
    );
    svg.push_str("</svg>");
    svg
}

/// Marks closer than a dot's width fall on one spot: the spots holding
/// more than one mark, as (x of the first, how many).
fn crowded(xs: &mut [f64]) -> Vec<(f64, usize)> {
    const DOT: f64 = 12.0;
    xs.sort_by(f64::total_cmp);
    let mut spots: Vec<(f64, usize)> = Vec::new();
    for &x in xs.iter() {
        match spots.last_mut() {
            Some((start, n)) if x - *start < DOT => *n += 1,
            _ => spots.push((x, 1)),
        }
    }
    spots.retain(|&(_, n)| n > 1);
    spots
}

/// The revision's retention lock while it holds at `now`: until when,
/// and how long from now; empty otherwise.
fn lock_badge(r: &backy_proto::RevisionInfo, now: DateTime<Utc>) -> String {
    match time_of(r.locked_until.as_ref()) {
        Some(until) if until > now => format!(
            " <span class=\"badge none\" title=\"retention-lock: no deletion before then\">\
             locked until {}</span> <span class=\"muted\">{}</span>",
            fmt_time(until),
            age(until, now)
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_shows_while_it_holds() {
        let now: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let until: DateTime<Utc> = "2026-12-01T12:00:00Z".parse().unwrap();
        let r = backy_proto::RevisionInfo {
            locked_until: Some(backy_proto::timestamp(&until)),
            ..Default::default()
        };
        let badge = lock_badge(&r, now);
        assert!(badge.contains("locked until 2026-12-01 12:00:00 UTC"), "{badge}");
        assert!(badge.contains("in 2 h"), "{badge}");
        assert_eq!(lock_badge(&r, until), "", "passed");
        assert_eq!(lock_badge(&backy_proto::RevisionInfo::default(), now), "");
    }

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(esc("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
    }

    #[test]
    fn states_put_problems_first() {
        let s = |sched, ok, revs, trusted, fails| {
            let st = state(sched, ok, revs, trusted, fails);
            (st.word, st.rank)
        };
        assert_eq!(s("daily", false, 0, false, 0), ("no backup", 0));
        assert_eq!(s("daily", false, 3, true, 0), ("too old", 0));
        assert_eq!(s("daily", false, 3, false, 0), ("distrusted", 0));
        assert_eq!(s("daily", true, 3, true, 2), ("failing", 1));
        assert_eq!(s("daily", true, 0, false, 0), ("no backup yet", 1));
        assert_eq!(s("daily", true, 3, true, 0), ("OK", 2));
        assert_eq!(s(NO_SCHEDULE, true, 3, true, 0), ("no schedule", 3));
    }

    /// Issue 29, item 14: revisions a minute apart on a scale a daily tag
    /// sets fall on one spot; the spot says how many it holds.
    #[test]
    fn close_revisions_are_counted_on_the_timeline() {
        let now = Utc::now();
        let rev = |i: i64, tags: &[&str]| RevisionInfo {
            id: format!("id{i}"),
            short_id: format!("r{i}"),
            timestamp: Some(backy_proto::prost_types::Timestamp {
                seconds: (now - chrono::Duration::minutes(60 - i)).timestamp(),
                nanos: 0,
            }),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        let mut revisions: Vec<RevisionInfo> = (0..5).map(|i| rev(i, &["daily"])).collect();
        revisions.insert(
            0,
            RevisionInfo {
                timestamp: Some(backy_proto::prost_types::Timestamp {
                    seconds: (now - chrono::Duration::days(5)).timestamp(),
                    nanos: 0,
                }),
                ..rev(9, &["daily"])
            },
        );
        let job = JobStatus {
            job: "vm1".into(),
            revisions,
            ..Default::default()
        };
        let schedule: Schedule = [(
            "daily".to_string(),
            backy_common::config::TagRule {
                interval: backy_common::units::Interval::from_secs(86400),
                keep: 7,
            },
        )]
        .into();
        let svg = timeline(&job, Some(&schedule), now);
        assert_eq!(svg.matches("<g class=\"rev").count(), 6, "{svg}");
        assert_eq!(
            svg.matches("class=\"cluster\" data-count=\"5\"").count(),
            1,
            "{svg}"
        );
        assert!(!svg.contains("data-count=\"1\""), "{svg}");
    }

    /// Issue 29, item 5: a replica's copy takes no pushes: the page said
    /// "now weekly" for one with its own schedule and "pushed by hand" for
    /// one without, and showed nothing of its replication. Now: no due
    /// time, what keeps its revisions, its lag, what is missing and why
    /// the last round failed, and a state from its lag.
    #[test]
    fn a_copy_shows_its_replication_not_a_due_time() {
        let now: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let replica = |own_retention: bool| backy_proto::ReplicaState {
            source: "https://backup1:7807".into(),
            missing: 2,
            lag_secs: 3 * 3600,
            lag_warning_secs: 2 * 3600,
            lag_critical_secs: 86400,
            last_round: Some(backy_proto::timestamp(&(now - chrono::Duration::minutes(5)))),
            last_error: "cannot connect to https://backup1:7807".into(),
            own_retention,
            ..Default::default()
        };
        let due_now = Some(backy_proto::timestamp(&now));
        let summary = JobSummary {
            job: "vm5".into(),
            schedule: "weekly".into(),
            sla_ok: true,
            revisions: 1,
            next_due: due_now,
            next_tags: vec!["weekly".into()],
            replica: Some(replica(true)),
            ..Default::default()
        };
        let st = summary_state(&summary);
        assert_eq!((st.word, st.class), ("copy lagging", "warn"));
        let row = overview_row(&st, &summary, now);
        for want in [
            "lag 3 h 0 min",
            "2 missing",
            "cannot connect to https://backup1:7807",
        ] {
            assert!(row.contains(want), "{want} in {row}");
        }
        // No due time: "now" would start its cell ("unknown" disk use
        // holds the letters too).
        assert!(!row.contains(">now"), "{row}");

        let schedule: Schedule = [(
            "weekly".to_string(),
            backy_common::config::TagRule {
                interval: backy_common::units::Interval::from_secs(7 * 86400),
                keep: 4,
            },
        )]
        .into();
        let job = |schedule: &str, own_retention: bool| JobStatus {
            job: "vm5".into(),
            schedule: schedule.into(),
            sla_ok: true,
            next_due: due_now,
            next_tags: vec!["weekly".into()],
            replica: Some(replica(own_retention)),
            ..Default::default()
        };
        let own = facts(&job("weekly", true), Some(&schedule), now);
        for want in [
            "copy of https://backup1:7807",
            "lag 3 h 0 min",
            "2 revisions not copied yet",
            "cannot connect to https://backup1:7807",
            "takes no pushes",
        ] {
            assert!(own.contains(want), "{want} in {own}");
        }
        assert!(!own.contains("(now)"), "{own}");
        let mirrored = facts(&job(NO_SCHEDULE, false), None, now);
        assert!(!mirrored.contains("pushed by hand"), "{mirrored}");
        assert!(mirrored.contains("mirrors the source"), "{mirrored}");
    }

    #[test]
    fn spans_read_like_people_write_them() {
        assert_eq!(fmt_span(42), "42 s");
        assert_eq!(fmt_span(-300), "5 min");
        assert_eq!(fmt_span(3 * 3600 + 120), "3 h 2 min");
        assert_eq!(fmt_span(2 * 86400 + 3600), "2 d 1 h");
    }
}
