//! What peers can do to the server's log and to an operator's terminal
//! (issue 28, items 10 and 11): peer text is logged quoted and escaped, one
//! line, and cannot forge an audit record; `backy-client` prints it
//! escaped; refusals are rate-limited per peer, with a count of what was
//! suppressed, and are audit lines; `/readyz` names no path to a caller
//! without credentials.

mod support;

use backy_common::token::{generate_token, hash_token, AUTH_HEADER};
use backy_proto::backy_client::BackyClient;
use backy_proto::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;
use tonic::Code;

/// A failure report shaped to forge a second audit record on its own
/// line, clear the screen and print a green "BACKY OK", then reverse the
/// rest of the line (U+202E).
const HOSTILE: &str = "disk gone\n2026-01-01T00:00:00Z  INFO backy::audit: audit identity=\"admin\" \
     peer=\"10.0.0.1:1\" action=\"forget\" job=\"vm1\" rev=\"all\" outcome=\"ok\" FORGED=1 \
     \x1b[2J\x1b[32mBACKY OK\x1b[0m \u{202e}kO\u{2066}";

/// The `key="value"` pairs after an audit line's message, each value
/// quoted with backslash escapes, decoded; `None` when the rest is not
/// exactly such pairs.
fn audit_fields(line: &str) -> Option<Vec<(String, String)>> {
    let mut rest = line.split_once("backy::audit: audit ")?.1;
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => {
                    chars.next()?;
                }
                (i, '"') => break i,
                _ => {}
            }
        };
        let value = backy_common::escape::unquote(&format!("\"{}\"", &after[..end]))?;
        fields.push((key.to_string(), value));
        rest = after[end + 1..].strip_prefix(' ').unwrap_or(&after[end + 1..]);
    }
    Some(fields)
}

fn no_raw_control(text: &str, what: &str) {
    for c in ['\x1b', '\u{202e}', '\u{2066}', '\x07'] {
        assert!(!text.contains(c), "{what} has a raw {c:?}: {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_report_is_logged_and_printed_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("store"), "  vm1: {schedule: none}\n");
    let mark = server.log_mark();
    let mut client = BackyClient::connect(server.url.clone()).await.expect("connect");
    client
        .report_failure(FailureReport {
            job: "vm1".into(),
            rev_id: String::new(),
            error: HOSTILE.into(),
        })
        .await
        .expect("report_failure");
    server.wait_log(mark, "push failed on the client");
    let lines = server.log_lines(mark);
    let all = lines.join("\n");
    no_raw_control(&all, "the server log");
    // Every line that carries the report's text is one the server wrote
    // for the report: no line of its own, no forged record.
    for line in lines
        .iter()
        .filter(|l| l.contains("FORGED") || l.contains("BACKY OK"))
    {
        assert!(
            line.contains("action=\"report-failure\"") || line.contains("push failed on the client"),
            "a line made by the peer's text:\n{all}"
        );
    }
    let audit: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("backy::audit") && l.contains("report-failure"))
        .collect();
    assert_eq!(audit.len(), 1, "{all}");
    let fields = audit_fields(audit[0]).unwrap_or_else(|| panic!("not key=\"value\" pairs: {}", audit[0]));
    let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["identity", "peer", "action", "job", "rev", "outcome"],
        "{}",
        audit[0]
    );
    // The report's text, whole, in the outcome: escaped on the line,
    // the same text once decoded.
    assert_eq!(fields[5].1, HOSTILE, "{}", audit[0]);
    for escaped in [
        "\\n2026-01-01",
        "\\u{1b}[2J\\u{1b}[32mBACKY OK",
        "\\u{202e}kO\\u{2066}",
    ] {
        assert!(audit[0].contains(escaped), "{escaped} not in {}", audit[0]);
    }
    let warning = lines
        .iter()
        .find(|l| l.contains("push failed on the client"))
        .expect("warning");
    assert!(warning.contains("\\u{1b}[2J"), "{warning}");

    // The operator's terminal: the escaped form, not the bytes.
    let text = server.client_ok(&["status", "vm1"]);
    no_raw_control(&text, "backy-client status");
    let error_line = text
        .lines()
        .find(|l| l.starts_with("last error:"))
        .unwrap_or_else(|| panic!("no last error in {text}"));
    assert!(
        error_line.contains("\\u{1b}[2J\\u{1b}[32mBACKY OK"),
        "{error_line}"
    );
    assert!(error_line.contains("\\u{202e}kO\\u{2066}"), "{error_line}");
}

/// A token-checking server with one admin identity; returns it with the token.
fn server_with_identities(base: &Path, http: bool) -> (Server, String) {
    let token = generate_token();
    let http = if http { "http-listen: 127.0.0.1:0\n" } else { "" };
    let server = Server::start_config(
        base,
        &format!(
            "listen: 127.0.0.1:0\n{http}base-dir: BASE\n\
             clients:\n  ops: {{role: admin, token-hash: '{}'}}\n\
             jobs:\n  vm1: {{schedule: none}}\n",
            hash_token(&token).unwrap()
        ),
    );
    (server, token)
}

/// Lines that report one refused request (not a summary).
fn refusal_lines(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| l.contains("authentication failed") || l.contains("action=\"authenticate\""))
        .filter(|l| !l.contains("suppressed"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_is_rate_limited_and_counted() {
    const REQUESTS: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let (server, _token) = server_with_identities(&dir.path().join("store"), false);
    let mark = server.log_mark();
    let bad = format!("Bearer {}", generate_token());
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let header: tonic::metadata::MetadataValue<_> = bad.parse().unwrap();
    let mut client = BackyClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert(AUTH_HEADER, header.clone());
        Ok(req)
    });
    let started = Instant::now();
    for _ in 0..REQUESTS {
        let e = client
            .status(StatusRequest { job: "vm1".into() })
            .await
            .expect_err("a bad token is refused");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the flood took {:?}",
        started.elapsed()
    );
    // The summary comes when the peer's interval ends.
    let summary = server.wait_log(mark, "suppressed");
    let lines = server.log_lines(mark);
    let refusals = refusal_lines(&lines);
    assert!(
        !refusals.is_empty() && refusals.len() <= 10,
        "{} refusal lines for {REQUESTS} requests:\n{}",
        refusals.len(),
        lines.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
    // Refusals are audit lines: who (no identity), from where, what.
    let audit = refusals
        .iter()
        .find(|l| l.contains("backy::audit"))
        .unwrap_or_else(|| panic!("no audit line for a refused authentication: {}", refusals[0]));
    let fields = audit_fields(audit).unwrap_or_else(|| panic!("not key=\"value\" pairs: {audit}"));
    let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(get("action"), Some("authenticate"), "{audit}");
    assert!(get("peer").is_some_and(|p| p.starts_with("127.0.0.1")), "{audit}");
    assert!(
        get("outcome").is_some_and(|o| o.contains("invalid token")),
        "{audit}"
    );
    // The summary counts exactly what was not logged.
    assert!(summary.contains("backy::audit"), "{summary}");
    let count: usize = summary
        .split("suppressed ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {summary}"));
    assert!(summary.contains("refusals from 127.0.0.1"), "{summary}");
    let suppressed_total: usize = server
        .log_lines(mark)
        .iter()
        .filter(|l| l.contains("suppressed"))
        .filter_map(|l| {
            l.split("suppressed ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(count > 0);
    assert_eq!(
        suppressed_total + refusals.len(),
        REQUESTS,
        "logged {} and suppressed {suppressed_total}",
        refusals.len()
    );
}

/// Plain HTTP/1.1 GET: (status, body).
fn http_get(addr: &str, path: &str, authorization: Option<&str>) -> (u16, String) {
    let (status, _, body) = http_get_with(addr, path, authorization);
    (status, body)
}

/// A read-only bind mount over a directory, undone on drop.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn over(dir: &Path) -> Self {
        must_be_root();
        for args in [
            vec!["--bind", dir.to_str().unwrap(), dir.to_str().unwrap()],
            vec!["-o", "remount,bind,ro", dir.to_str().unwrap()],
        ] {
            let out = Command::new("mount").args(&args).output().expect("mount");
            assert!(
                out.status.success(),
                "mount {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ReadOnly(dir.to_path_buf())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn readyz_names_no_path_without_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store-secret-path");
    std::fs::create_dir(&base).unwrap();
    let (server, token) = server_with_identities(&base, true);
    let line = server.wait_log(0, "http listener on ");
    let addr = line
        .split("http listener on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address")
        .to_string();
    assert_eq!(http_get(&addr, "/readyz", None), (200, "ready\n".to_string()));
    let _ro = ReadOnly::over(&base);
    let (status, body) = http_get(&addr, "/readyz", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not writable"), "{body}");
    assert!(
        !body.contains("store-secret-path") && !body.contains('/'),
        "{body}"
    );
    // A client with credentials gets the detail.
    let (status, body) = http_get(&addr, "/readyz", Some(&format!("Bearer {token}")));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&base.display().to_string()), "{body}");
}

/// The HTTP listener's refusals share the per-peer limit.
#[test]
fn http_refusals_are_rate_limited_too() {
    const REQUESTS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let (server, _token) = server_with_identities(&dir.path().join("store"), true);
    let line = server.wait_log(0, "http listener on ");
    let addr = line
        .split("http listener on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address")
        .to_string();
    let mark = server.log_mark();
    let bad = format!("Bearer {}", generate_token());
    for _ in 0..REQUESTS {
        assert_eq!(http_get(&addr, "/metrics", Some(&bad)).0, 401);
    }
    let summary = server.wait_log(mark, "suppressed");
    let lines = server.log_lines(mark);
    let refusals: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("action=\"http authenticate\""))
        .collect();
    assert!(
        !refusals.is_empty() && refusals.len() <= 5,
        "{} refusal lines for {REQUESTS} requests",
        refusals.len()
    );
    assert!(
        refusals[0].contains("outcome=\"refused: invalid token\""),
        "{}",
        refusals[0]
    );
    let want = format!("suppressed {} refusals from 127.0.0.1", REQUESTS - refusals.len());
    assert!(summary.contains(&want), "{summary}");
}
