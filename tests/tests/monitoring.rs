//! Monitoring end to end (issue 16): a real server with `http-listen`,
//! real pushes, a restore, a verify, a failed push and an expiry; then
//! `/metrics` parsed by the official Prometheus Python client's parser
//! and its values checked, health over HTTP and gRPC, the status page's
//! HTML, and both pages rendered by headless Chromium.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::*;

/// The address the server logged for its HTTP listener.
fn http_addr(server: &Server) -> String {
    let line = server.wait_log(0, "http listener on ");
    line.split("http listener on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string()
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with(addr, path, None);
    (status, body)
}

/// A Python with the official Prometheus client (Debian's
/// python3-prometheus-client, which scripts/test.sh installs).
fn python_with_prometheus_client() -> &'static str {
    for python in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(python)
            .args(["-c", "import prometheus_client.parser"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return python;
        }
    }
    panic!(
        "no python3 with prometheus_client: apt-get install python3-prometheus-client (scripts/test.sh does)"
    );
}

/// One sample: name and labels → value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses an exposition with `prometheus_client.parser` (which refuses a
/// malformed one) and returns every sample; also checks each family's type
/// against the name conventions.
fn parse_metrics(text: &str) -> Samples {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    if fam.type == "counter":
        assert not fam.name.endswith("_total"), fam.name  # the parser strips it
    for s in fam.samples:
        out.append([s.name, s.labels, s.value, fam.type])
json.dump(out, sys.stdout)
"#;
    let mut child = Command::new(python_with_prometheus_client())
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<(String, BTreeMap<String, String>, f64, String)> =
        serde_json::from_slice(&out.stdout).unwrap();
    let mut samples = Samples::new();
    for (name, labels, value, kind) in list {
        match kind.as_str() {
            "counter" => assert!(name.ends_with("_total") || name.ends_with("_created"), "{name}"),
            "gauge" | "histogram" => {}
            other => panic!("{name}: unexpected type {other}"),
        }
        assert!(name.starts_with("backy_"), "{name}");
        samples.insert((name, labels), value);
    }
    samples
}

fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples.get(&(name.to_string(), labels)).copied()
}

fn must(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

/// The data bytes a push --json reported.
fn received(push_json: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(push_json).unwrap();
    v["revision"]["bytes_received"].as_u64().expect("bytes_received")
}

const CONFIG: &str = r#"
listen: 127.0.0.1:0
http-listen: 127.0.0.1:0
base-dir: BASE
schedules:
  s: {daily: {interval: 1d, keep: 3}, weekly: {interval: 7d, keep: 4}}
  twice-a-day: {daily: {interval: 12h, keep: 10}}
jobs:
  vm1: {schedule: s, source: {type: file, path: IMG1}}
  vm2: {schedule: s, source: {type: file, path: MISSING}}
  vm3: {schedule: none, source: {type: file, path: IMG1}}
  vm4: {schedule: s}
  vm5: {schedule: s}
  job00000: {schedule: twice-a-day}
"#;

const HOSTILE_TAG: &str = "manual:<i>&\"keep\"'";

#[test]
fn metrics_health_and_the_status_page_show_the_store() {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let base = fs.mount.join("base");
    std::fs::create_dir_all(&base).unwrap();
    // job00000: revisions 1..5 days old, made in the server's formats; its
    // newest (a minute old) removed, so the job is a day behind a 12 h
    // schedule (SLA 18 h): "too old".
    let fixture = Command::new(bin("examples/scale_fixture"))
        .arg(&base)
        .args(["1", "6"])
        .output()
        .unwrap();
    assert!(fixture.status.success(), "{fixture:?}");
    let old = base.join("job00000");
    let newest = std::fs::read_link(old.join("latest")).unwrap();
    std::fs::remove_file(old.join(format!("{}.rev", newest.display()))).unwrap();
    // vm5 has been known for three days and never backed up: "no backup".
    std::fs::create_dir_all(base.join("vm5")).unwrap();
    let since = (chrono::Utc::now() - chrono::TimeDelta::days(3)).to_rfc3339();
    std::fs::write(base.join("vm5/.since"), format!("{since}\n")).unwrap();

    let img = fs.mount.join("vm1.img");
    make_image(&img, 16 * MIB, &[(0, 2 * MIB), (9 * MIB, MIB)]);
    // The reason of vm2's failure names its source: markup must be escaped.
    let missing = fs.mount.join("no<such>&\"disk\".img");
    let config = CONFIG
        .replace("IMG1", img.to_str().unwrap())
        .replace("MISSING", missing.to_str().unwrap());
    let server = Server::start_config(&base, &config);
    let addr = http_addr(&server);

    // vm1: a backup, one under a tag outside the schedule, and one whose
    // expiry deletes that (reason: not in the schedule); vm3 once.
    let mut bytes_in = received(&server.client_ok(&["push", "vm1", "--json"]));
    write_at(&img, 12 * MIB, &pattern(1, 4096));
    bytes_in += received(&server.client_ok(&[
        "push",
        "vm1",
        "--force",
        "--tags",
        "pre-upgrade",
        "--allow-unscheduled",
        "--json",
    ]));
    write_at(&img, 13 * MIB, &pattern(2, 4096));
    let text = server.client_ok(&[
        "push",
        "vm1",
        "--force",
        "--tags",
        &format!("daily,{HOSTILE_TAG}"),
        "--json",
    ]);
    bytes_in += received(&text);
    let pushed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(pushed["expired"].as_array().unwrap().len(), 1, "{pushed}");
    bytes_in += received(&server.client_ok(&["push", "vm3", "--json"]));
    // vm2 fails on the client (no source) and is reported.
    let out = server.client(&["push", "vm2"]);
    assert!(!out.status.success());
    // A restore and a verify of vm1; one of job00000's revisions distrusted.
    let restored = fs.mount.join("restored.img");
    server.client_ok(&["restore", "vm1", restored.to_str().unwrap()]);
    assert_eq!(file_hash(&restored), file_hash(&img));
    server.client_ok(&["verify", "vm1"]);
    server.client_ok(&["distrust", "job00000", "-r", "2"]);

    // A scrape never waits for FIEMAP: the jobs' space comes from a count
    // the first scrape queued for the background.
    wait_for("vm1's space in /metrics", Duration::from_secs(60), || {
        get(&addr, "/metrics")
            .1
            .contains("backy_job_used_bytes{backy_job=\"vm1\"}")
    });
    // /metrics: valid exposition format, and the values are the store's.
    let (status, head, text) = http_get_with(&addr, "/metrics", None);
    assert_eq!(status, 200, "{text}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let m = parse_metrics(&text);
    // Issue 29, item 3: the job's label is backy's own; `job` is the label
    // Prometheus gives every target (a sample's `job` would become
    // `exported_job` under default scrape settings).
    let with_job_label: Vec<_> = m
        .keys()
        .filter(|(_, labels)| labels.contains_key("job"))
        .collect();
    assert!(
        with_job_label.is_empty(),
        "samples labelled job: {with_job_label:?}"
    );
    let job = |name: &str, j: &str| value(&m, name, &[("backy_job", j)]);
    assert_eq!(job("backy_job_revisions", "vm1"), Some(2.0));
    assert_eq!(job("backy_job_revisions", "vm3"), Some(1.0));
    assert_eq!(job("backy_job_revisions", "vm4"), Some(0.0));
    assert_eq!(job("backy_job_revisions", "job00000"), Some(5.0));
    assert_eq!(job("backy_job_distrusted_revisions", "job00000"), Some(1.0));
    assert_eq!(must(&m, "backy_revisions", &[]), 8.0);
    assert_eq!(job("backy_job_consecutive_failures", "vm2"), Some(1.0));
    assert_eq!(job("backy_job_consecutive_failures", "vm1"), Some(0.0));
    assert_eq!(job("backy_job_logical_bytes", "vm1"), Some((16 * MIB) as f64));
    // Issue 29, item 6: what the job really takes (shared extents once).
    let used = job("backy_job_used_bytes", "vm1").unwrap();
    assert!(used >= (3 * MIB) as f64, "{used}");
    assert_eq!(
        Some(used),
        job("backy_job_exclusive_bytes", "vm1")
            .zip(job("backy_job_shared_bytes", "vm1"))
            .map(|(e, s)| e + s)
    );
    assert!(job("backy_job_total_bytes", "vm1").unwrap() >= used);
    assert!(must(&m, "backy_base_dir_used_bytes", &[]) >= used);
    for (j, ok) in [
        ("vm1", 1.0),
        ("vm3", 1.0),
        ("vm4", 1.0),
        ("vm5", 0.0),
        ("job00000", 0.0),
    ] {
        assert_eq!(job("backy_job_sla_ok", j), Some(ok), "{j}");
    }
    let newest = server.revisions("vm1").pop().unwrap();
    let made = chrono::DateTime::parse_from_rfc3339(newest["timestamp"].as_str().unwrap()).unwrap();
    let last = job("backy_job_last_success_timestamp_seconds", "vm1").unwrap();
    assert!((last - made.timestamp() as f64).abs() < 1.0, "{last} vs {made}");
    assert_eq!(job("backy_job_last_success_timestamp_seconds", "vm4"), None);
    assert_eq!(
        job("backy_job_last_push_received_bytes", "vm1"),
        newest["bytes_received"].as_f64()
    );
    assert!(job("backy_job_next_due_timestamp_seconds", "vm1").is_some());
    assert_eq!(job("backy_job_next_due_timestamp_seconds", "vm3"), None);
    assert_eq!(must(&m, "backy_pushes_total", &[("outcome", "committed")]), 4.0);
    assert_eq!(
        must(&m, "backy_pushes_total", &[("outcome", "client_failed")]),
        1.0
    );
    assert_eq!(must(&m, "backy_push_duration_seconds_count", &[]), 4.0);
    assert_eq!(must(&m, "backy_received_bytes_total", &[]), bytes_in as f64);
    assert_eq!(
        must(
            &m,
            "backy_expired_revisions_total",
            &[("reason", "not_in_schedule")]
        ),
        1.0
    );
    assert_eq!(must(&m, "backy_restores_total", &[("outcome", "completed")]), 1.0);
    assert_eq!(must(&m, "backy_restore_duration_seconds_count", &[]), 1.0);
    // The image's data: 3 MiB of pattern and two 4 KiB writes, each in
    // a 64 KiB granule that goes as data (all-zero granules go as zero
    // ranges).
    assert_eq!(
        must(&m, "backy_sent_bytes_total", &[]),
        (3 * MIB + 2 * 65536) as f64
    );
    assert_eq!(must(&m, "backy_verifies_total", &[("outcome", "clean")]), 1.0);
    assert!(must(&m, "backy_verify_checked_bytes_total", &[]) > 0.0);
    assert!(must(&m, "backy_base_dir_free_bytes", &[]) > 0.0);
    assert!(must(&m, "backy_base_dir_size_bytes", &[]) >= must(&m, "backy_base_dir_free_bytes", &[]));
    assert_eq!(must(&m, "backy_jobs", &[]), 6.0);
    let build = m
        .keys()
        .find(|(n, _)| n == "backy_build_info")
        .expect("build info");
    assert!(build.1.contains_key("version"), "{build:?}");

    // Health over HTTP and gRPC.
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(grpc_health(&server.url, ""), 1, "SERVING");
    assert_eq!(grpc_health(&server.url, "backy.v1.Backy"), 1, "SERVING");

    // The overview: every job, its state as a word, problems first.
    let (status, html) = get(&addr, "/");
    assert_eq!(status, 200);
    let rows: Vec<(String, String)> = html
        .split("<tr data-job=\"")
        .skip(1)
        .map(|r| {
            let job = r.split('"').next().unwrap().to_string();
            let state = r
                .split("data-state=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            (job, state.to_string())
        })
        .collect();
    let order: Vec<(&str, &str)> = rows.iter().map(|(j, s)| (j.as_str(), s.as_str())).collect();
    assert_eq!(
        order,
        [
            ("job00000", "too old"),
            ("vm5", "no backup"),
            ("vm2", "failing"),
            ("vm4", "no backup yet"),
            ("vm1", "OK"),
            ("vm3", "no schedule"),
        ],
        "{html}"
    );
    assert!(html.contains("no&lt;such&gt;&amp;"), "{html}");
    assert!(!html.contains("no<such>"), "unescaped error in {html}");
    assert_no_external_assets(&html);

    // A job page: one mark per revision, the hostile tag escaped.
    let (status, page) = get(&addr, "/job/vm1");
    assert_eq!(status, 200);
    assert_eq!(page.matches("<g class=\"rev").count(), 2, "{page}");
    assert_eq!(page.matches("<tr data-rev=").count(), 2);
    assert!(
        page.contains("manual:&lt;i&gt;&amp;&quot;keep&quot;&#39;"),
        "{page}"
    );
    assert!(!page.contains("<i>&"), "unescaped tag in {page}");
    assert_eq!(page.matches("class=\"horizon\"").count(), 2, "daily and weekly");
    let (_, old) = get(&addr, "/job/job00000");
    assert_eq!(old.matches("<g class=\"rev").count(), 5);
    assert_eq!(old.matches("<g class=\"rev distrusted\"").count(), 1);
    assert_eq!(get(&addr, "/job/nope").0, 404);
    assert_eq!(get(&addr, "/job/..%2fetc").0, 404);
    assert_eq!(get(&addr, "/nothing-here").0, 404);

    // Rendered by a real browser: no error, one SVG mark per revision.
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("monitoring");
    std::fs::create_dir_all(&out_dir).unwrap();
    let dom = chromium(&addr, "/", &out_dir.join("status-page.png"));
    assert_eq!(dom.matches("<tr data-job=").count(), 6, "{dom}");
    let dom = chromium(&addr, "/job/vm1", &out_dir.join("job-page.png"));
    assert_eq!(dom.matches("<g class=\"rev").count(), 2, "{dom}");
    let dom = chromium(&addr, "/job/job00000", &out_dir.join("job-page-old.png"));
    assert_eq!(dom.matches("<g class=\"rev").count(), 5, "{dom}");
}

/// The status page loads nothing from elsewhere (works offline).
fn assert_no_external_assets(html: &str) {
    let without_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    for needle in ["http://", "https://", "<script", "src="] {
        assert!(!without_ns.contains(needle), "{needle} in {html}");
    }
}

/// Renders `path` in headless Chromium: a screenshot to `png` and the DOM
/// as the browser built it. Fails on a non-zero exit or an empty page.
fn chromium(addr: &str, path: &str, png: &Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}{path}");
    let run = |extra: &[String]| {
        let out = Command::new("timeout")
            .arg("120")
            .arg(chromium_binary())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("running chromium (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "chromium failed on {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let _ = std::fs::remove_file(png);
    run(&[format!("--screenshot={}", png.display())]);
    let shot = std::fs::read(png).expect("chromium wrote the screenshot");
    assert!(
        shot.starts_with(b"\x89PNG\r\n\x1a\n") && shot.len() > 10_000,
        "{png:?}"
    );
    let dom = String::from_utf8(run(&["--dump-dom".to_string()]).stdout).unwrap();
    assert!(dom.contains("</main>"), "the page loaded: {dom}");
    dom
}

fn chromium_binary() -> &'static str {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or("chromium")
}

/// The gRPC health service's answer for `service` (1: SERVING).
fn grpc_health(url: &str, service: &str) -> i32 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let reply = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("health check");
        reply.into_inner().status
    })
}

/// `/readyz` says 503 once SIGTERM came, while open streams (an agent's)
/// drain, and a gRPC health watch hears NOT_SERVING; `/healthz` stays 200
/// (the process lives).
#[test]
fn readyz_fails_while_the_server_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_config(
        &dir.path().join("store"),
        "listen: 127.0.0.1:0\nhttp-listen: 127.0.0.1:0\nbase-dir: BASE\njobs:\n  vm1: {schedule: none, client: hv01}\n",
    );
    let addr = http_addr(&server);
    assert_eq!(get(&addr, "/readyz").0, 200);
    let mark = server.log_mark();
    let _agent = server.agent(&["agent", "--name", "hv01"]);
    server.wait_log(mark, "agent connected");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut watch = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        tonic_health::pb::health_client::HealthClient::new(channel)
            .watch(tonic_health::pb::HealthCheckRequest {
                service: "backy.v1.Backy".into(),
            })
            .await
            .expect("watch")
            .into_inner()
    });
    let mut next = || {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), watch.message()).await })
            .expect("a health update in time")
            .expect("the watch stream")
            .expect("a message")
            .status
    };
    assert_eq!(next(), 1, "SERVING");
    let mark = server.log_mark();
    let pid = rustix::process::Pid::from_raw(server.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    // The agent's stream keeps the server in its grace period.
    server.wait_log(mark, "stopping: open streams get");
    assert_eq!(
        get(&addr, "/readyz"),
        (503, "not ready: shutting down\n".to_string())
    );
    assert_eq!(get(&addr, "/healthz").0, 200);
    assert_eq!(next(), 2, "NOT_SERVING");
    assert!(!server.wait_exit(), "exits by itself");
}

/// With client identities, page and metrics need a client's token (bearer
/// or basic auth) and show a hypervisor only its jobs; health needs none.
#[test]
fn page_and_metrics_follow_the_status_access_rules() {
    use backy_common::token::{generate_token, hash_token};
    let (hv, ro) = (generate_token(), generate_token());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_config(
        &dir.path().join("store"),
        &format!(
            "listen: 127.0.0.1:0\nhttp-listen: 127.0.0.1:0\nbase-dir: BASE\n\
             clients:\n  hv01: {{token-hash: '{}'}}\n  mon: {{role: read-only, token-hash: '{}'}}\n\
             jobs:\n  vm1: {{schedule: none, client: hv01}}\n  vm2: {{schedule: none}}\n",
            hash_token(&hv).unwrap(),
            hash_token(&ro).unwrap()
        ),
    );
    let addr = http_addr(&server);
    for path in ["/", "/metrics", "/job/vm1"] {
        let (status, head, _) = http_get_with(&addr, path, None);
        assert_eq!(status, 401, "{path}");
        assert!(
            head.contains("WWW-Authenticate: Basic") || head.contains("www-authenticate: Basic"),
            "{head}"
        );
        let bad = format!("Bearer {}", generate_token());
        assert_eq!(http_get_with(&addr, path, Some(&bad)).0, 401, "{path}");
    }
    assert_eq!(get(&addr, "/healthz").0, 200);
    assert_eq!(get(&addr, "/readyz").0, 200);

    let jobs_in = |auth: &str| {
        let (status, _, text) = http_get_with(&addr, "/metrics", Some(auth));
        assert_eq!(status, 200, "{text}");
        let m = parse_metrics(&text);
        let mut jobs: Vec<String> = m
            .keys()
            .filter(|(n, _)| n == "backy_job_revisions")
            .filter_map(|(_, l)| l.get("backy_job").cloned())
            .collect();
        jobs.sort();
        jobs
    };
    assert_eq!(jobs_in(&format!("Bearer {ro}")), ["vm1", "vm2"]);
    assert_eq!(jobs_in(&format!("Bearer {hv}")), ["vm1"]);
    // Basic auth, as a browser sends it: any user, the token as password.
    let basic = format!("Basic {}", base64_encode(&format!("prometheus:{ro}")));
    assert_eq!(jobs_in(&basic), ["vm1", "vm2"]);
    let hv_auth = format!("Bearer {hv}");
    let (status, _, page) = http_get_with(&addr, "/", Some(&hv_auth));
    assert_eq!(status, 200);
    assert!(
        page.contains("data-job=\"vm1\"") && !page.contains("data-job=\"vm2\""),
        "{page}"
    );
    assert_eq!(http_get_with(&addr, "/job/vm2", Some(&hv_auth)).0, 404);
    assert_eq!(http_get_with(&addr, "/job/vm1", Some(&hv_auth)).0, 200);
}

fn base64_encode(text: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// With `tls:` the HTTP listener speaks HTTPS with the server's
/// certificate (plain HTTP gets nothing), and asks for a client's token.
#[test]
fn the_http_listener_serves_https_with_the_tls_certificate() {
    use backy_common::token::{generate_token, hash_token};
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "backy test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
    let key_file = dir.path().join("server.key");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let token = generate_token();
    let server = Server::start_config(
        &dir.path().join("store"),
        &format!(
            "listen: 127.0.0.1:0\nhttp-listen: 127.0.0.1:0\nbase-dir: BASE\n\
             tls: {{cert: {d}/server.pem, key: {d}/server.key}}\n\
             clients:\n  mon: {{role: read-only, token-hash: '{}'}}\n\
             jobs:\n  vm1: {{schedule: none}}\n",
            hash_token(&token).unwrap(),
            d = dir.path().display()
        ),
    );
    let addr = http_addr(&server);
    assert!(server.wait_log(0, "http listener on ").contains("https://"));
    let curl = |scheme: &str, path: &str, auth: Option<&str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "-w", "\n%{http_code}", "--cacert"])
            .arg(&ca_file)
            .arg(format!("{scheme}://{addr}{path}"));
        if let Some(a) = auth {
            cmd.args(["-H", &format!("Authorization: {a}")]);
        }
        cmd.output().expect("curl")
    };
    let out = curl("https", "/metrics", Some(&format!("Bearer {token}")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "{body}");
    let m = parse_metrics(body);
    assert_eq!(
        value(&m, "backy_job_revisions", &[("backy_job", "vm1")]),
        Some(0.0)
    );
    let out = curl("https", "/", None);
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\n401"), "{out:?}");
    let out = curl("https", "/healthz", None);
    assert!(
        String::from_utf8_lossy(&out.stdout).ends_with("ok\n\n200"),
        "{out:?}"
    );
    // Plain HTTP to the TLS port: no answer.
    let out = curl("http", "/healthz", None);
    assert!(!String::from_utf8_lossy(&out.stdout).ends_with("200"), "{out:?}");
}

/// The background scrub's work shows in the metrics: a revision with a
/// flipped byte is a mismatch (and distrusted), a clean one is counted
/// clean, and the last scrub's time is recent.
#[test]
fn scrub_outcomes_show_in_the_metrics() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, 6 * MIB)]);
    let server = Server::start_config(
        &base,
        "listen: 127.0.0.1:0\nhttp-listen: 127.0.0.1:0\nbase-dir: BASE\nscrub: {interval: 2s, rate: 0}\n\
         jobs:\n  vm1: {schedule: none}\n  vm2: {schedule: none}\n",
    );
    let addr = http_addr(&server);
    server.client_ok(&["push", "vm1", "--source", img.to_str().unwrap()]);
    server.client_ok(&["push", "vm2", "--source", img.to_str().unwrap()]);
    let id = server.short_ids("vm1")[0].clone();
    let stored = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(base.join("vm1").join(&id))
        .unwrap();
    let mut byte = [0u8; 1];
    stored.read_exact_at(&mut byte, 5 * MIB + 7).unwrap();
    stored.write_all_at(&[byte[0] ^ 0x20], 5 * MIB + 7).unwrap();
    stored.sync_all().unwrap();
    let trust = |job: &str| server.revisions(job)[0]["trust"].as_str().unwrap().to_string();
    wait_for("the scrub to check both jobs", Duration::from_secs(60), || {
        trust("vm1") == "distrusted" && trust("vm2") == "verified"
    });
    let (status, text) = get(&addr, "/metrics");
    assert_eq!(status, 200);
    let m = parse_metrics(&text);
    assert!(must(&m, "backy_scrub_revisions_total", &[("outcome", "mismatch")]) >= 1.0);
    assert!(must(&m, "backy_scrub_revisions_total", &[("outcome", "clean")]) >= 1.0);
    assert!(must(&m, "backy_scrub_mismatched_blocks_total", &[]) >= 1.0);
    assert!(must(&m, "backy_scrub_checked_bytes_total", &[]) >= (6 * MIB) as f64);
    let last = must(&m, "backy_scrub_last_timestamp_seconds", &[]);
    assert!(
        (chrono::Utc::now().timestamp() as f64 - last).abs() < 60.0,
        "{last}"
    );
    assert_eq!(
        value(&m, "backy_job_distrusted_revisions", &[("backy_job", "vm1")]),
        Some(1.0)
    );
    let (_, page) = get(&addr, "/job/vm1");
    assert_eq!(page.matches("<g class=\"rev distrusted\"").count(), 1, "{page}");
}
