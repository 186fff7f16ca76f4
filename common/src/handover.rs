//! Handing a job's lease from one server to another in front of a Ceph pool
//! (issue 36; docs/DESIGN.md "Handing a job over"): the operator's request as
//! stored in the pool, and what each server and the `backy-server
//! hand-over` command make of it. Pure: the caller reads the request and
//! the lock record and passes the time.
//!
//! A request names the target server by the URL it names itself by in lock
//! records, and reserves the job for it until a deadline. While it stands:
//! the holder refuses new work on the job (naming the target), releases the
//! lease once its running work ended, and every other server refuses the
//! job naming the target; the target takes the lease (at its next lease
//! round or request) and removes the request. Past the deadline the request
//! is ignored: a target that never comes strands no job.

use chrono::{DateTime, SecondsFormat, Utc};

/// A stored hand-over request of one job (the value of its key in the
/// pool's `backy.handovers` omap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The server to hand the job to, as it names itself (a lock cookie).
    pub to: String,
    pub requested: DateTime<Utc>,
    /// The job is reserved for `to` until then; after, the request is ignored.
    pub until: DateTime<Utc>,
    /// Who asked (`user@host`), for the servers' log.
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "--to {0:?}: give the target server's URL as it names itself in lock records and its log \
         (http://HOST:PORT or https://HOST:PORT)"
    )]
    BadTarget(String),
    #[error("hand-over request of job {job}: {detail}")]
    BadRequest { job: String, detail: String },
}

impl Request {
    /// The stored form: `key: value` lines.
    pub fn encode(&self) -> String {
        let t = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
        format!(
            "to: {}\nrequested: {}\nuntil: {}\nby: {}\n",
            self.to,
            t(&self.requested),
            t(&self.until),
            self.by.replace('\n', " ")
        )
    }

    /// Reads a stored request of `job`; unknown keys are ignored (a newer
    /// version may add some).
    pub fn decode(job: &str, raw: &[u8]) -> Result<Request, HandoverError> {
        let bad = |detail: String| HandoverError::BadRequest {
            job: job.to_string(),
            detail,
        };
        let text = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8".into()))?;
        let (mut to, mut requested, mut until, mut by) = (None, None, None, String::new());
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Some((key, value)) = line.split_once(':') else {
                return Err(bad(format!("line {line:?} is no `key: value`")));
            };
            let value = value.trim();
            let time = |v: &str| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| bad(format!("{key} {v:?}: {e}")))
            };
            match key.trim() {
                "to" => to = Some(value.to_string()),
                "requested" => requested = Some(time(value)?),
                "until" => until = Some(time(value)?),
                "by" => by = value.to_string(),
                _ => {}
            }
        }
        let missing = |k: &str| bad(format!("no {k}"));
        Ok(Request {
            to: to.ok_or_else(|| missing("to"))?,
            requested: requested.ok_or_else(|| missing("requested"))?,
            until: until.ok_or_else(|| missing("until"))?,
            by,
        })
    }

    /// Whether the request still applies at `now` (its deadline not reached).
    pub fn stands(&self, now: DateTime<Utc>) -> bool {
        now < self.until
    }
}

/// The URL `url` names a server by, checked (`http://` or `https://`,
/// then a host and an optional port, nothing after): a trailing `/` is
/// dropped, so it compares with the names servers give themselves.
pub fn check_target(url: &str) -> Result<String, HandoverError> {
    let bad = || HandoverError::BadTarget(url.to_string());
    let trimmed = url.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(bad)?;
    if rest.is_empty()
        || rest
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/?#@".contains(c))
    {
        return Err(bad());
    }
    // `[v6]`, `[v6]:port`, `host` or `host:port`.
    let port = match rest.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            if host.is_empty() || !(after.is_empty() || after.starts_with(':')) {
                return Err(bad());
            }
            after.strip_prefix(':')
        }
        None => match rest.split_once(':') {
            Some((host, port)) if !host.is_empty() => Some(port),
            Some(_) => return Err(bad()),
            None => None,
        },
    };
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad());
        }
    }
    Ok(trimmed.to_string())
}

/// Whether two server URLs name the same server (scheme and host
/// compare without case).
pub fn same_server(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// What server `me`, which does not hold a job's lease, makes of the job's
/// request when asked to take the lease (a push, plan or change through it,
/// or its own lease round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForTaker {
    /// No request stands: the lease is taken (or refused) as without one;
    /// a lapsed request is removed once taken.
    Free,
    /// Reserved for another server: refuse, naming it.
    Reserved(String),
    /// Reserved for this server: take it once its holder let it go, then
    /// remove the request.
    Mine,
}

pub fn for_taker(request: Option<&Request>, me: &str, now: DateTime<Utc>) -> ForTaker {
    match request {
        Some(r) if r.stands(now) && same_server(&r.to, me) => ForTaker::Mine,
        Some(r) if r.stands(now) => ForTaker::Reserved(r.to.clone()),
        _ => ForTaker::Free,
    }
}

/// What server `me`, holding a job's lease, makes of the job's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForHolder {
    /// Nothing asked: keep the job.
    Keep,
    /// Hand the job to this server: refuse new work naming it, and
    /// release the lease once the work running on the job ended.
    Leave(String),
    /// A request that no longer applies (lapsed, or for `me`, which holds
    /// the job already): remove it.
    Stale,
}

pub fn for_holder(request: Option<&Request>, me: &str, now: DateTime<Utc>) -> ForHolder {
    match request {
        None => ForHolder::Keep,
        Some(r) if r.stands(now) && !same_server(&r.to, me) => ForHolder::Leave(r.to.clone()),
        Some(_) => ForHolder::Stale,
    }
}

/// Where a hand-over stands as the command sees it, from the lease's
/// holder when it was asked (`before`) and now (`now`), by their URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The target held the job when asked: nothing to do.
    AlreadyHeld,
    /// The target holds the job now.
    Taken,
    /// The holder let the job go; the target has not taken it yet.
    Released,
    /// Nobody held the job; the target has not taken it yet.
    Reserved,
    /// The holder still holds the job (work running on it).
    Waiting,
    /// Another server than the target holds it now (the request was
    /// overwritten, or lapsed and the job taken).
    Elsewhere(String),
}

impl Progress {
    /// Whether the command stops waiting for this job.
    pub fn settled(&self) -> bool {
        matches!(
            self,
            Progress::AlreadyHeld | Progress::Taken | Progress::Elsewhere(_)
        )
    }

    /// Whether the hand-over went as asked (exit status 0): the target
    /// holds the job, or it is free and reserved for the target.
    pub fn done(&self) -> bool {
        matches!(
            self,
            Progress::AlreadyHeld | Progress::Taken | Progress::Released | Progress::Reserved
        )
    }
}

pub fn progress(before: Option<&str>, now: Option<&str>, to: &str) -> Progress {
    let is_target = |h: Option<&str>| h.is_some_and(|h| same_server(h, to));
    if is_target(before) {
        return Progress::AlreadyHeld;
    }
    match now {
        _ if is_target(now) => Progress::Taken,
        None if before.is_none() => Progress::Reserved,
        None => Progress::Released,
        Some(h) if before.is_some_and(|b| same_server(b, h)) => Progress::Waiting,
        Some(h) => Progress::Elsewhere(h.to_string()),
    }
}

/// A time as the command prints it: the clock time if today (UTC), else
/// with the date.
pub fn clock(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    if t.date_naive() == now.date_naive() {
        t.format("%H:%M:%S UTC").to_string()
    } else {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    }
}

/// The command's line for one job.
pub struct Line<'a> {
    pub job: &'a str,
    pub to: &'a str,
    /// Who held the lease when asked.
    pub before: Option<&'a str>,
    pub progress: &'a Progress,
    /// The request's deadline.
    pub until: DateTime<Utc>,
    pub now: DateTime<Utc>,
    /// How long the command waited, in seconds.
    pub waited: u64,
    /// A standing request for another server that the command withdrew
    /// (handing a job to its holder).
    pub withdrawn: Option<&'a str>,
}

impl Line<'_> {
    pub fn text(&self) -> String {
        let (job, to) = (self.job, self.to);
        let until = clock(self.until, self.now);
        let before = self.before.unwrap_or("?");
        match self.progress {
            Progress::AlreadyHeld => match self.withdrawn {
                Some(w) => format!(
                    "job {job}: already held by {to}: nothing to hand over; the request for {w} is withdrawn"
                ),
                None => format!("job {job}: already held by {to}: nothing to hand over"),
            },
            Progress::Taken => match self.before {
                Some(b) => format!("job {job}: released by {b}, now held by {to}"),
                None => format!("job {job}: now held by {to}"),
            },
            Progress::Released => format!(
                "job {job}: released by {before}; {to} takes it at its next lease round or push \
                 (reserved until {until})"
            ),
            Progress::Reserved => format!(
                "job {job}: held by no server; reserved for {to} until {until} (it takes it at its \
                 next lease round or push)"
            ),
            Progress::Waiting => format!(
                "job {job}: {before} has not released it within {} s (work on the job still runs \
                 there); the request stands until {until}",
                self.waited
            ),
            Progress::Elsewhere(h) => {
                format!("job {job}: now held by {h}, not {to} (the request was replaced or lapsed)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn request(to: &str, until: &str) -> Request {
        Request {
            to: to.into(),
            requested: at("2026-12-08T01:00:00Z"),
            until: at(until),
            by: "root@admin01".into(),
        }
    }

    #[test]
    fn a_request_round_trips_and_a_bad_one_says_why() {
        let r = request("http://b:6023", "2026-12-08T01:02:00Z");
        let text = r.encode();
        assert_eq!(
            text,
            "to: http://b:6023\nrequested: 2026-12-08T01:00:00Z\nuntil: 2026-12-08T01:02:00Z\nby: root@admin01\n"
        );
        assert_eq!(Request::decode("vm1", text.as_bytes()), Ok(r.clone()));
        let newer = format!("{text}reason: maintenance\n");
        assert_eq!(Request::decode("vm1", newer.as_bytes()), Ok(r));
        let cases: [(&[u8], &str); 4] = [
            (b"\xff", "hand-over request of job vm1: not UTF-8"),
            (
                b"to b",
                "hand-over request of job vm1: line \"to b\" is no `key: value`",
            ),
            (
                b"to: http://b\nrequested: 2026-12-08T01:00:00Z\n",
                "hand-over request of job vm1: no until",
            ),
            (
                b"to: x\nuntil: soon\n",
                "hand-over request of job vm1: until \"soon\": ",
            ),
        ];
        for (raw, message) in cases {
            let e = Request::decode("vm1", raw).unwrap_err().to_string();
            assert!(e.starts_with(message), "{e}");
        }
    }

    #[test]
    fn a_request_stands_until_its_deadline() {
        let r = request("http://b:6023", "2026-12-08T01:02:00Z");
        assert!(r.stands(at("2026-12-08T01:01:59Z")));
        assert!(!r.stands(at("2026-12-08T01:02:00Z")));
    }

    #[test]
    fn targets_are_server_urls() {
        let good = [
            ("http://127.0.0.1:6023", "http://127.0.0.1:6023"),
            ("https://backup02:6023/", "https://backup02:6023"),
            ("https://[::1]:7", "https://[::1]:7"),
            ("https://[fd00::2]", "https://[fd00::2]"),
            ("https://backup02", "https://backup02"),
        ];
        for (url, checked) in good {
            assert_eq!(check_target(url).as_deref(), Ok(checked), "{url}");
        }
        for url in [
            "",
            "backup02:6023",
            "ftp://backup02:6023",
            "http://",
            "http://:6023",
            "http://b:0",
            "http://b:65536",
            "http://b:port",
            "http://b:6023/path",
            "http://user@b:6023",
            "http://b 2:6023",
            "https://[::1",
            "https://[::1]x",
            "https://[]:1",
        ] {
            assert_eq!(
                check_target(url),
                Err(HandoverError::BadTarget(url.into())),
                "{url}"
            );
        }
        assert!(same_server("https://Backup02:6023", "https://backup02:6023"));
        assert!(!same_server("https://backup02:6023", "https://backup02:6024"));
    }

    #[test]
    fn who_does_what_with_a_request() {
        let now = at("2026-12-08T01:01:00Z");
        let to_b = request("http://b", "2026-12-08T01:02:00Z");
        let lapsed = request("http://b", "2026-12-08T01:01:00Z");
        let cases: Vec<(&str, Option<&Request>, &str, ForTaker)> = vec![
            ("no request", None, "http://a", ForTaker::Free),
            (
                "for another",
                Some(&to_b),
                "http://a",
                ForTaker::Reserved("http://b".into()),
            ),
            ("for me", Some(&to_b), "http://b", ForTaker::Mine),
            ("for me, other case", Some(&to_b), "HTTP://B", ForTaker::Mine),
            ("lapsed, for another", Some(&lapsed), "http://a", ForTaker::Free),
            ("lapsed, for me", Some(&lapsed), "http://b", ForTaker::Free),
        ];
        for (name, r, me, expected) in cases {
            assert_eq!(for_taker(r, me, now), expected, "taker: {name}");
        }
        let cases: Vec<(&str, Option<&Request>, &str, ForHolder)> = vec![
            ("no request", None, "http://a", ForHolder::Keep),
            (
                "hand it over",
                Some(&to_b),
                "http://a",
                ForHolder::Leave("http://b".into()),
            ),
            ("for me, the holder", Some(&to_b), "http://b", ForHolder::Stale),
            ("lapsed", Some(&lapsed), "http://a", ForHolder::Stale),
        ];
        for (name, r, me, expected) in cases {
            assert_eq!(for_holder(r, me, now), expected, "holder: {name}");
        }
    }

    #[test]
    fn progress_and_its_lines() {
        let (a, b, c) = (Some("http://a"), Some("http://b"), Some("http://c"));
        let cases = [
            (b, b, Progress::AlreadyHeld),
            (b, None, Progress::AlreadyHeld),
            (a, b, Progress::Taken),
            (None, b, Progress::Taken),
            (a, None, Progress::Released),
            (None, None, Progress::Reserved),
            (a, a, Progress::Waiting),
            (a, c, Progress::Elsewhere("http://c".into())),
            (None, c, Progress::Elsewhere("http://c".into())),
        ];
        for (before, now, expected) in cases {
            assert_eq!(
                progress(before, now, "http://b"),
                expected,
                "{before:?} -> {now:?}"
            );
        }
        // (settled: the command stops waiting; done: exit status 0)
        let table = [
            (Progress::AlreadyHeld, true, true),
            (Progress::Taken, true, true),
            (Progress::Released, false, true),
            (Progress::Reserved, false, true),
            (Progress::Waiting, false, false),
            (Progress::Elsewhere("x".into()), true, false),
        ];
        for (p, settled, done) in table {
            assert_eq!((p.settled(), p.done()), (settled, done), "{p:?}");
        }

        let now = at("2026-12-08T01:01:00Z");
        let line = |before, progress: &Progress, withdrawn| {
            Line {
                job: "vm1",
                to: "http://b",
                before,
                progress,
                until: at("2026-12-08T01:03:00Z"),
                now,
                waited: 30,
                withdrawn,
            }
            .text()
        };
        let lines = [
            (
                line(b, &Progress::AlreadyHeld, None),
                "job vm1: already held by http://b: nothing to hand over",
            ),
            (
                line(b, &Progress::AlreadyHeld, Some("http://c")),
                "job vm1: already held by http://b: nothing to hand over; the request for http://c is withdrawn",
            ),
            (line(a, &Progress::Taken, None), "job vm1: released by http://a, now held by http://b"),
            (line(None, &Progress::Taken, None), "job vm1: now held by http://b"),
            (
                line(a, &Progress::Released, None),
                "job vm1: released by http://a; http://b takes it at its next lease round or push \
                 (reserved until 01:03:00 UTC)",
            ),
            (
                line(None, &Progress::Reserved, None),
                "job vm1: held by no server; reserved for http://b until 01:03:00 UTC (it takes it \
                 at its next lease round or push)",
            ),
            (
                line(a, &Progress::Waiting, None),
                "job vm1: http://a has not released it within 30 s (work on the job still runs \
                 there); the request stands until 01:03:00 UTC",
            ),
            (
                line(a, &Progress::Elsewhere("http://c".into()), None),
                "job vm1: now held by http://c, not http://b (the request was replaced or lapsed)",
            ),
        ];
        for (got, want) in lines {
            assert_eq!(got, want);
        }
        assert_eq!(clock(at("2026-12-09T00:00:01Z"), now), "2026-12-09 00:00:01 UTC");
    }
}
