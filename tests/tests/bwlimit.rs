//! Bandwidth limits (issue 34, item 4) with real processes: a push held at
//! `--bwlimit`, an agent's concurrent pushes sharing the client's
//! `bwlimit`, and a replica's copies held at `replicate.bwlimit`; each
//! transfer is sized to take about 10 s at the limit, its measured rate
//! must be within 10 % of it, and the same transfer without a limit must
//! be faster than the limit.

mod support;

use backy_common::token::{generate_token, hash_token};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

/// The limit of every test: 6 MiB a second.
const LIMIT: u64 = 6 * MIB;

fn secret(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// An image of `size` bytes of data (no zeros, nothing shared).
fn image(path: &Path, size: u64, seed: u64) {
    std::fs::write(path, pattern(seed, size as usize)).unwrap();
}

fn within_10_percent(what: &str, rate: f64) {
    let limit = LIMIT as f64;
    eprintln!(
        "{what}: {:.2} MiB/s (limit {:.2} MiB/s)",
        rate / MIB as f64,
        limit / MIB as f64
    );
    assert!(
        (rate - limit).abs() <= limit * 0.10,
        "{what}: {:.2} MiB/s is not within 10 % of {:.2} MiB/s",
        rate / MIB as f64,
        limit / MIB as f64
    );
}

fn pushed(out: std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_push_is_held_at_its_limit() {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let work = fs.mount.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (a, b) = (work.join("a.img"), work.join("b.img"));
    image(&a, 60 * MIB, 1);
    image(&b, 60 * MIB, 2);
    let server = Server::start(
        &fs.mount.join("backy"),
        "  vm1: {schedule: none}\n  vm2: {schedule: none}\n",
    );

    // Without a limit: faster than the limit.
    let started = Instant::now();
    let free = pushed(server.client(&["--json", "push", "vm2", "--source", b.to_str().unwrap()]));
    let secs = started.elapsed().as_secs_f64();
    // The data, and each block's digest (deduplication asks about it).
    let sent = free["bytes_sent"].as_u64().unwrap();
    assert!((60 * MIB..60 * MIB + 4096).contains(&sent), "{free}");
    let rate = sent as f64 / secs;
    eprintln!("unlimited push: {:.1} MiB/s", rate / MIB as f64);
    assert!(rate > LIMIT as f64 * 1.1, "{rate}");

    // --bwlimit 6M: about 10 s.
    let started = Instant::now();
    let held = pushed(server.client(&[
        "--json",
        "push",
        "vm1",
        "--source",
        a.to_str().unwrap(),
        "--bwlimit",
        "6M",
    ]));
    let secs = started.elapsed().as_secs_f64();
    let sent = held["bytes_sent"].as_u64().unwrap();
    assert!((60 * MIB..60 * MIB + 4096).contains(&sent), "{held}");
    within_10_percent("push --bwlimit 6M", sent as f64 / secs);
    let revs = server.revisions("vm1");
    let stored = fs.mount.join("backy/vm1").join(revs[0]["id"].as_str().unwrap());
    assert_eq!(file_hash(&stored), file_hash(&a));

    // A bad rate is refused before anything is asked.
    let out = server.client(&[
        "push",
        "vm1",
        "--source",
        a.to_str().unwrap(),
        "--bwlimit",
        "fast",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad bandwidth limit \"fast\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// When a revision's push started and ended on the server, and its bytes.
fn span(r: &Value) -> (DateTime<Utc>, DateTime<Utc>, u64) {
    let start: DateTime<Utc> = r["timestamp"].as_str().unwrap().parse().unwrap();
    let secs = r["duration_secs"].as_f64().unwrap();
    let end = start + chrono::Duration::milliseconds((secs * 1000.0) as i64);
    (start, end, r["bytes_received"].as_u64().unwrap())
}

#[test]
fn an_agents_concurrent_pushes_share_the_client_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (d.join("a.img"), d.join("b.img"));
    image(&a, 30 * MIB, 3);
    image(&b, 30 * MIB, 4);
    let fs = LoopFs::new("btrfs", 1 << 30);
    let hv = generate_token();
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nschedules:\n  s: {{daily: {{interval: 1d, keep: 3}}}}\n\
         clients:\n  hv01: {{token-hash: '{}'}}\n\
         jobs:\n  vm1: {{schedule: s, client: hv01, source: {{type: file, path: {}}}}}\n  \
         vm2: {{schedule: s, client: hv01, source: {{type: file, path: {}}}}}\n",
        hash_token(&hv).unwrap(),
        a.display(),
        b.display()
    );
    let server = Server::start_config(&fs.mount, &config);
    let hv = secret(&d.join("hv.token"), &hv);
    // The limit in client.yaml: one bucket for the agent's process.
    let mut client_yaml = std::fs::read_to_string(&server.client_config).unwrap();
    client_yaml.push_str("bwlimit: 6M\n");
    std::fs::write(&server.client_config, client_yaml).unwrap();

    let mut agent = server.agent(&["--token-file", &hv, "agent", "--workers", "2"]);
    let committed = |job: &str| {
        let status = server.client_ok(&["--token-file", &hv, "--json", "status", job]);
        let status: Value = serde_json::from_str(&status).unwrap();
        status["jobs"][0]["revisions"][0].clone()
    };
    wait_for("both ordered pushes to commit", Duration::from_secs(120), || {
        committed("vm1").is_object() && committed("vm2").is_object()
    });
    agent.terminate();
    let (s1, e1, n1) = span(&committed("vm1"));
    let (s2, e2, n2) = span(&committed("vm2"));
    assert_eq!(n1 + n2, 60 * MIB);
    // They ran at the same time, for most of their span...
    let whole = (e1.max(e2) - s1.min(s2)).num_milliseconds() as f64 / 1000.0;
    let both = (e1.min(e2) - s1.max(s2)).num_milliseconds() as f64 / 1000.0;
    assert!(both > whole / 2.0, "concurrent for {both} s of {whole} s");
    // ...and together at the one limit.
    within_10_percent("two concurrent agent pushes", (n1 + n2) as f64 / whole);
}

#[test]
fn a_replicas_copies_are_held_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("vm1.img");
    image(&img, 60 * MIB, 5);
    let source_fs = LoopFs::new("btrfs", 700 << 20);
    let replica_fs = LoopFs::new("btrfs", 700 << 20);
    let (hv, rep) = (generate_token(), generate_token());
    let hv_file = secret(&d.join("hv.token"), &hv);
    let rep_file = secret(&d.join("rep.token"), &rep);
    let port = free_port();
    let config = format!(
        "listen: 127.0.0.1:{port}\nbase-dir: BASE\n\
         clients:\n  hv01: {{token-hash: '{}'}}\n  offsite: {{role: replica, token-hash: '{}'}}\n\
         schedules:\n  s: {{daily: {{interval: 1d, keep: 20}}}}\n\
         jobs:\n  vm1: {{schedule: s, client: hv01, source: {{type: file, path: {}}}}}\n",
        hash_token(&hv).unwrap(),
        hash_token(&rep).unwrap(),
        img.display(),
    );
    let source = Server::start_config(&source_fs.mount, &config);
    source.client_ok(&["--token-file", &hv_file, "push", "vm1", "--force"]);

    // Two replicas of the same source: one limited, one not.
    let replica = |name: &str, extra: &str| {
        let base = replica_fs.mount.join(name);
        std::fs::create_dir_all(&base).unwrap();
        let config = format!(
            "listen: 127.0.0.1:0\nbase-dir: BASE\nreplicate: {{source: 'http://127.0.0.1:{port}', \
             token-file: {rep_file}, interval: 1h, jobs: [vm1]{extra}}}\n"
        );
        Server::start_config(&base, &config)
    };
    let copied = |server: &Server| {
        let revs = server.revisions("vm1");
        revs.first().cloned()
    };
    let free = replica("free", "");
    let mut got = None;
    wait_for("the unlimited copy", Duration::from_secs(60), || {
        got = copied(&free);
        got.is_some()
    });
    let (_, _, n) = span(got.as_ref().unwrap());
    assert_eq!(n, 60 * MIB);
    let secs = got.as_ref().unwrap()["duration_secs"].as_f64().unwrap();
    eprintln!("unlimited copy: {:.1} MiB/s", n as f64 / secs / MIB as f64);
    assert!(n as f64 / secs > LIMIT as f64 * 1.1);
    drop(free);

    let held = replica("held", ", bwlimit: 6M");
    let started = Instant::now();
    let mut got = None;
    wait_for("the limited copy", Duration::from_secs(60), || {
        got = copied(&held);
        got.is_some()
    });
    let waited = started.elapsed().as_secs_f64();
    let (_, _, n) = span(got.as_ref().unwrap());
    assert_eq!(n, 60 * MIB);
    let secs = got.as_ref().unwrap()["duration_secs"].as_f64().unwrap();
    assert!(secs <= waited, "{secs} {waited}");
    within_10_percent("replicate.bwlimit 6M", n as f64 / secs);
    let stored = replica_fs
        .mount
        .join("held/vm1")
        .join(got.unwrap()["id"].as_str().unwrap());
    assert_eq!(file_hash(&stored), file_hash(&img));
}
