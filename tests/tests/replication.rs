//! Two servers, each on its own btrfs: a source with a `replica`
//! identity over TLS, and a replica whose worker copies the source's
//! revisions. What travels is what changed; the copies share extents,
//! restore byte for byte with the source gone, survive either side being
//! killed mid-transfer, and follow the retention rules.

mod support;

use backy_common::token::{generate_token, hash_token};
use serde_json::Value;
use std::path::{Path, PathBuf};
use support::*;

const G: u64 = 64 << 10;

fn secret(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// A source and (once started) its replica, on two btrfs filesystems.
struct Pair {
    dir: tempfile::TempDir,
    source: Server,
    _source_fs: LoopFs,
    replica_fs: LoopFs,
    /// `--ca ... --token-file ...` of the hypervisor on the source (with
    /// `may-remove: true`: the tests forget and distrust there).
    hv: Vec<String>,
    replicate: String,
    img: PathBuf,
}

impl Pair {
    /// `jobs` of the source (vm1, vm2 of hv01); `replica_jobs` of the
    /// replica's `replicate:` list.
    fn new(source_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::new("backy test CA");
        let ca_file = d.join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let (cert, key, _) = ca.sign(&["127.0.0.1", "localhost"], false, false);
        std::fs::write(d.join("server.pem"), cert).unwrap();
        secret(&d.join("server.key"), &key);
        let (hv, rep) = (generate_token(), generate_token());
        let hv_file = secret(&d.join("hv.token"), &hv);
        let rep_file = secret(&d.join("rep.token"), &rep);
        let img = d.join("vm1.img");
        make_image(&img, 48 * MIB, &[(0, 24 * MIB), (32 * MIB, 8 * MIB)]);
        let source_fs = LoopFs::new("btrfs", 700 << 20);
        let replica_fs = LoopFs::new("btrfs", 700 << 20);
        let port = free_port();
        let config = format!(
            "listen: 127.0.0.1:{port}\nbase-dir: BASE\n\
             tls: {{cert: {d}/server.pem, key: {d}/server.key}}\n\
             clients:\n  hv01: {{token-hash: '{}', may-remove: true}}\n  offsite: {{role: replica, token-hash: '{}'}}\n\
             schedules:\n  s: {{daily: {{interval: 1d, keep: 20}}}}\n\
             jobs:\n  vm1: {{schedule: s, client: hv01, source: {{type: file, path: {img}}}}}\n  \
             vm2: {{schedule: s, client: hv01, source: {{type: file, path: {img}}}}}\n{source_extra}",
            hash_token(&hv).unwrap(),
            hash_token(&rep).unwrap(),
            d = d.display(),
            img = img.display(),
        );
        let mut source = Server::start_config(&source_fs.mount, &config);
        source.url = source.url.replace("http://", "https://");
        let replicate = format!(
            "replicate: {{source: 'https://127.0.0.1:{port}', ca: {}, token-file: {rep_file}, interval: 1h, jobs: [vm1, vm2]}}\n",
            ca_file.display()
        );
        Pair {
            hv: vec![
                "--ca".into(),
                ca_file.display().to_string(),
                "--token-file".into(),
                hv_file,
            ],
            dir,
            source,
            _source_fs: source_fs,
            replica_fs,
            replicate,
            img,
        }
    }

    fn hv(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = self.hv.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        self.source.client_ok(&all)
    }

    fn push(&self, job: &str) -> String {
        let out = self.hv(&["--json", "push", job, "--force"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["revision"]["id"].as_str().unwrap().to_string()
    }

    fn source_revisions(&self, job: &str) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.hv(&["--json", "status", job])).unwrap();
        v["jobs"][0]["revisions"].as_array().unwrap().clone()
    }

    /// The replica: plaintext on loopback for its own callers, `extra`
    /// added to its config (jobs with their own schedules, resume).
    fn replica(&self, extra: &str) -> Server {
        let base = self.replica_fs.mount.join("store");
        std::fs::create_dir_all(&base).unwrap();
        let config = format!("listen: 127.0.0.1:0\nbase-dir: BASE\n{}{extra}", self.replicate);
        Server::start_config(&base, &config)
    }

    /// A copy of the image as it is now (what a revision must restore to).
    fn keep_image(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        sparse_copy(&self.img, &path);
        path
    }
}

/// Waits for the next round's end after `mark`; returns the lines of
/// revisions copied in it.
fn round(server: &Server, mark: usize) -> Vec<String> {
    server.wait_log(mark, "replication round done");
    server
        .log_lines(mark)
        .into_iter()
        .filter(|l| l.contains("copied revision"))
        .collect()
}

/// A number `key=N` in a log line.
fn field(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("{key} in {line}"));
    line[at + key.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn ids(revs: &[Value]) -> Vec<String> {
    revs.iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Scattered 4 KiB writes, one per `stride`: the "1%" change set.
fn scatter(img: &Path, seed: u8, count: u64, stride: u64) {
    for i in 0..count {
        write_at(img, 1024 * 1024 + i * stride, &[seed.wrapping_add(i as u8); 4096]);
    }
}

/// The replica's `/metrics` (plain HTTP on loopback, open mode).
fn metrics(server: &Server) -> String {
    use std::io::{Read, Write};
    let line = server.wait_log(0, "http listener on ");
    let addr = line
        .split("http listener on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn restore_equals(server: &Server, job: &str, id: &str, want: &Path, dir: &Path) {
    let out = dir.join(format!("restored-{id}.img"));
    let _ = std::fs::remove_file(&out);
    server.client_ok(&["restore", job, "-r", id, out.to_str().unwrap()]);
    assert_eq!(
        file_hash(&out),
        file_hash(want),
        "revision {id} of {job} restores byte-identical"
    );
}

#[test]
fn a_chain_is_copied_incrementally_and_restores_from_the_replica_alone() {
    let mut p = Pair::new("");
    let mut kept = Vec::new();
    p.push("vm1");
    kept.push(p.keep_image("r1.img"));
    // The "1%" change: twelve 4 KiB writes, each in its own granule.
    scatter(&p.img, 1, 12, 3 * MIB + 4096);
    p.push("vm1");
    kept.push(p.keep_image("r2.img"));
    scatter(&p.img, 7, 12, 3 * MIB + 4096);
    write_at(&p.img, 44 * MIB, b"into the hole");
    p.push("vm1");
    kept.push(p.keep_image("r3.img"));
    let on_source = p.source_revisions("vm1");
    assert_eq!(on_source.len(), 3);

    let replica = p.replica("http-listen: 127.0.0.1:0\n");
    let copied = round(&replica, 0);
    // vm1 and vm2 (both listed; vm2 has nothing yet).
    assert_eq!(copied.len(), 3, "{copied:?}");
    let received: Vec<u64> = copied.iter().map(|l| field(l, "received")).collect();
    assert_eq!(received[0], 32 * MIB, "the full copy: the data, not the holes");
    assert_eq!(received[1], 12 * G, "only the changed granules: {received:?}");
    assert_eq!(received[2], 13 * G, "only the changed granules: {received:?}");

    // Same ids, timestamps, tags and manifests.
    let here = replica.revisions("vm1");
    assert_eq!(ids(&here), ids(&on_source));
    for (a, b) in here.iter().zip(&on_source) {
        for key in ["timestamp", "tags", "manifest_digest", "size"] {
            assert_eq!(a[key], b[key], "{key} of {}", a["id"]);
        }
    }
    // The copies share extents: three 48 MiB images cost about one.
    let (total, exclusive) = btrfs_du(&replica.base.join("vm1"));
    assert!(total >= 3 * 32 * MIB, "three images of 32 MiB data each: {total}");
    assert!(
        exclusive < 8 * MIB,
        "the copies share their unchanged extents: {exclusive} exclusive of {total}"
    );

    // The source records what the replica fetched.
    let status: Value = serde_json::from_str(&p.hv(&["--json", "status", "vm1"])).unwrap();
    let fetched = &status["jobs"][0]["fetched_by"];
    assert_eq!(fetched[0]["replica"], "offsite", "{status}");
    assert_eq!(fetched[0]["revision"], on_source[2]["id"]);

    // The replica's status: nothing missing, its source named.
    let mine = replica.status_json("vm1");
    let state = &mine["jobs"][0]["replica"];
    assert_eq!(state["missing"], 0, "{mine}");
    assert!(state["source"]
        .as_str()
        .unwrap()
        .starts_with("https://127.0.0.1:"));
    let check = replica.client(&["check", "vm1"]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let metrics_now = metrics(&replica);
    for line in [
        "backy_job_replica_missing_revisions{backy_job=\"vm1\"} 0",
        "backy_job_replica_failing{backy_job=\"vm1\"} 0",
        "backy_job_replica_lag_seconds{backy_job=\"vm1\"} ",
    ] {
        assert!(metrics_now.contains(line), "{line} in\n{metrics_now}");
    }

    // A copied job takes no pushes.
    let out = replica.client(&["push", "vm1", "--force", "--source", p.img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a copy of https://127.0.0.1:"), "{err}");

    // The source gone: every revision restores from the replica alone,
    // and verifies there.
    p.source.kill();
    for (id, want) in ids(&on_source).iter().zip(&kept) {
        restore_equals(&replica, "vm1", id, want, p.dir.path());
    }
    let verified: Value =
        serde_json::from_str(&replica.client_ok(&["verify", "vm1", "-r", "all", "--json"])).unwrap();
    let clean: Vec<&Value> = verified["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == true)
        .collect();
    assert_eq!(clean.len(), 3, "{verified}");
    // And the replica says it cannot reach the source.
    let mark = replica.log_mark();
    replica.hup();
    replica.wait_log(mark, "replication round done");
    let check = replica.client(&["check", "vm1"]);
    let line = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{line}");
    assert!(
        line.contains("vm1: replication failing: cannot connect to https://127.0.0.1:"),
        "{line}"
    );
    assert!(metrics(&replica).contains("backy_job_replica_failing{backy_job=\"vm1\"} 1"));
}

#[test]
fn an_interrupted_copy_resumes_and_nothing_half_done_is_visible() {
    let mut p = Pair::new("");
    let mut replica = p.replica("resume: {checkpoint: 1M}\n");
    round(&replica, 0);
    let a = p.push("vm1");
    let ra = p.keep_image("a.img");

    // The replica dies (as by kill -9) at the 10th data frame of its copy.
    replica.restart_with_env(&[("BACKY_FAULT", "replica.frame@10")]);
    assert!(replica.wait_exit(), "the replica aborted mid-copy");
    let partial = replica.base.join("vm1/.partial");
    assert!(
        std::fs::read_dir(&partial).unwrap().count() > 0,
        "a checkpoint was kept"
    );
    let mark = replica.log_mark();
    replica.restart();
    let copied = round(&replica, mark);
    assert_eq!(copied.len(), 1, "{copied:?}");
    let (received, at) = (field(&copied[0], "received"), field(&copied[0], "resumed_at"));
    assert!(
        at >= 4 * MIB && at % (4 * MIB) == 0,
        "resumed at a block boundary: {}",
        copied[0]
    );
    // All data below 24 MiB: what came before the checkpoint is not sent again.
    assert_eq!(received, 32 * MIB - at, "only the rest travels: {}", copied[0]);
    assert_eq!(ids(&replica.revisions("vm1")), vec![a.clone()]);
    restore_equals(&replica, "vm1", &a, &ra, p.dir.path());

    // The source dies at its 3rd data frame of the next copy.
    scatter(&p.img, 3, 12, 3 * MIB + 4096);
    let b = p.push("vm1");
    let rb = p.keep_image("b.img");
    p.source
        .restart_with_env(&[("BACKY_FAULT", "restore.data-sent@3")]);
    let mark = replica.log_mark();
    replica.hup();
    let line = replica.wait_log(mark, "replication round done");
    assert!(line.contains("copied=0") && !line.contains("failed=0"), "{line}");
    assert!(p.source.wait_exit(), "the source aborted mid-stream");
    // Nothing half-copied is visible on the replica.
    assert_eq!(
        ids(&replica.revisions("vm1")),
        vec![a.clone()],
        "only complete revisions"
    );
    let status = replica.status_json("vm1");
    let error = status["jobs"][0]["replica"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains(&format!("copying revision {b}")), "{error}");

    p.source.restart();
    let mark = replica.log_mark();
    replica.hup();
    let copied = round(&replica, mark);
    assert_eq!(copied.len(), 1, "{copied:?}");
    assert!(field(&copied[0], "received") <= 12 * G, "{}", copied[0]);
    assert_eq!(ids(&replica.revisions("vm1")), vec![a, b.clone()]);
    restore_equals(&replica, "vm1", &b, &rb, p.dir.path());
    let status = replica.status_json("vm1");
    assert_eq!(
        status["jobs"][0]["replica"]["last_error"],
        Value::Null,
        "{status}"
    );
}

#[test]
fn distrusted_revisions_stay_behind_and_retention_is_mirrored_or_the_replicas_own() {
    let p = Pair::new("");
    let a = p.push("vm1");
    let b = p.push("vm1");
    let a2 = p.push("vm2");
    let b2 = p.push("vm2");
    // vm1 mirrors the source; vm2 keeps its copies by its own schedule.
    let replica =
        p.replica("schedules: {long: {daily: {interval: 1d, keep: 30}}}\njobs:\n  vm2: {schedule: long}\n");
    assert_eq!(round(&replica, 0).len(), 4);
    assert_eq!(ids(&replica.revisions("vm1")), vec![a.clone(), b.clone()]);
    assert_eq!(ids(&replica.revisions("vm2")), vec![a2.clone(), b2.clone()]);

    // On the source: a forgotten, c distrusted, d pushed, c2 pushed.
    p.hv(&["forget", "vm1", "-r", &a]);
    scatter(&p.img, 5, 4, 5 * MIB);
    let c = p.push("vm1");
    p.hv(&["distrust", "vm1", "-r", &c]);
    scatter(&p.img, 9, 4, 5 * MIB);
    let d = p.push("vm1");
    let rd = p.keep_image("d.img");
    let c2 = p.push("vm2");
    // Removed on the replica (as its own expiry would): it stays removed,
    // although the source still has it.
    replica.client_ok(&["forget", "vm2", "-r", &a2]);

    let mark = replica.log_mark();
    replica.hup();
    let copied = round(&replica, mark);
    assert_eq!(copied.len(), 2, "d and c2, not the distrusted c: {copied:?}");
    // a is gone (the source expired it and has newer); c never came.
    assert_eq!(ids(&replica.revisions("vm1")), vec![b.clone(), d.clone()]);
    // d came relative to b: the changes of c and d, no more.
    let d_line = copied.iter().find(|l| l.contains("job=vm1")).unwrap();
    assert!(field(d_line, "received") <= 8 * G, "{d_line}");
    restore_equals(&replica, "vm1", &d, &rd, p.dir.path());
    assert_eq!(ids(&replica.revisions("vm2")), vec![b2, c2]);
    let state = &replica.status_json("vm2")["jobs"][0]["replica"];
    assert_eq!(state["own_retention"], true, "{state}");
    assert_eq!(state["missing"], 0, "{state}");
    // a2, expired here and still on the source, is not owed: no error
    // calls it out of order (issue 29, item 5).
    assert!(state["last_error"].is_null(), "{state}");
}

#[test]
fn a_copy_that_does_not_verify_on_arrival_commits_nothing_and_is_retried() {
    let p = Pair::new("");
    let a = p.push("vm1");
    let ra = p.keep_image("a.img");
    // A byte of the stored revision flipped on the source, behind its back:
    // its manifest still says what was pushed.
    let stored = p._source_fs.mount.join("vm1").join(&a);
    let flip = |path: &Path| {
        let mut byte = [0u8; 1];
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, 5 * MIB).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[!byte[0]], 5 * MIB).unwrap();
    };
    flip(&stored);
    let replica = p.replica("");
    let line = replica.wait_log(0, "replication round done");
    assert!(line.contains("copied=0") && !line.contains("failed=0"), "{line}");
    assert!(replica.revisions("vm1").is_empty(), "nothing committed");
    let partial = replica.base.join("vm1/.partial");
    assert_eq!(
        std::fs::read_dir(&partial).unwrap().count(),
        0,
        "nothing kept of it"
    );
    let status = replica.status_json("vm1");
    let error = status["jobs"][0]["replica"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("the stored image's manifest differs from the source server's"),
        "{error}"
    );
    assert_eq!(replica.client(&["check", "vm1"]).status.code(), Some(1));

    // Repaired on the source: the next round copies it.
    flip(&stored);
    let mark = replica.log_mark();
    replica.hup();
    assert_eq!(round(&replica, mark).len(), 1);
    restore_equals(&replica, "vm1", &a, &ra, p.dir.path());
}

/// Issue 27, item 6: a source revision dated after the replica's clock
/// (the source's clock had jumped ahead) is not copied before its date:
/// the replica never commits one. The round fails naming it, `check` warns,
/// and it stays owed; the source names it in its own status.
#[test]
fn a_source_revision_dated_after_the_replicas_clock_waits_and_is_named() {
    let mut p = Pair::new("");
    let a = p.push("vm1");
    let b = p.push("vm1");
    p.source.kill();
    let rev = p._source_fs.mount.join("vm1").join(format!("{b}.rev"));
    let ahead = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let text: String = std::fs::read_to_string(&rev)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("timestamp:") {
                format!("timestamp: {ahead}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&rev, text).unwrap();
    p.source.restart();
    p.source.url = p.source.url.replace("http://", "https://");
    let status: Value = serde_json::from_str(&p.hv(&["--json", "status", "vm1"])).unwrap();
    assert_eq!(
        status["jobs"][0]["future_revisions"],
        serde_json::json!([b]),
        "{status}"
    );

    let replica = p.replica("");
    let line = replica.wait_log(0, "replication round done");
    assert!(line.contains("copied=1") && !line.contains("failed=0"), "{line}");
    assert_eq!(ids(&replica.revisions("vm1")), vec![a]);
    let state = &replica.status_json("vm1")["jobs"][0]["replica"];
    assert_eq!(state["missing"], 1, "{state}");
    let error = state["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("revision {b} is dated")) && error.contains("after this server's clock"),
        "{error}"
    );
    let check = replica.client(&["check", "vm1"]);
    assert_eq!(
        check.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert!(
        replica
            .base
            .join("vm1/.partial")
            .read_dir()
            .unwrap()
            .next()
            .is_none(),
        "nothing fetched of it"
    );
}

/// Issue 29, item 5: the source lost, the hypervisor restores its job from
/// the replica under its own identity there (same name, its own token) and
/// with no job mapping in the replica's config: a copy keeps the owner the
/// source recorded, across a restart of the replica. The owner may read
/// and restore its copies, nothing else; another identity gets nothing.
#[test]
fn the_hypervisor_restores_its_copy_from_the_replica_without_a_mapping() {
    let mut p = Pair::new("");
    let a = p.push("vm1");
    let want = p.keep_image("a.img");
    let d = p.dir.path().to_path_buf();
    let (hv, other) = (generate_token(), generate_token());
    let hv_file = secret(&d.join("hv-at-replica.token"), &hv);
    let other_file = secret(&d.join("hv02-at-replica.token"), &other);
    let mut replica = p.replica(&format!(
        "clients:\n  hv01: {{token-hash: '{}', may-remove: true}}\n  hv02: {{token-hash: '{}'}}\n",
        hash_token(&hv).unwrap(),
        hash_token(&other).unwrap()
    ));
    let copied = round(&replica, 0);
    assert_eq!(copied.len(), 1, "{copied:?}");
    p.source.kill();
    // The owner is remembered, not asked for again.
    let mark = replica.log_mark();
    replica.restart();
    replica.wait_log(mark, "replication round done");

    let run = |token: &str, args: &[&str]| {
        let mut all = vec!["--token-file", token];
        all.extend_from_slice(args);
        replica.client(&all)
    };
    let text = |out: &std::process::Output| {
        format!(
            "exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let out = run(&hv_file, &["--json", "status", "vm1"]);
    assert_eq!(out.status.code(), Some(0), "status as hv01: {}", text(&out));
    let status: Value = serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let revs = status["jobs"][0]["revisions"].as_array().unwrap();
    assert_eq!(ids(revs), vec![a.clone()], "{status}");
    assert_eq!(status["jobs"][0]["replica"]["owner"], "hv01", "{status}");

    let target = d.join("restored-by-hv01.img");
    let out = run(&hv_file, &["restore", "vm1", "-r", &a, target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "restore as hv01: {}", text(&out));
    assert_eq!(file_hash(&target), file_hash(&want), "restores byte-identical");

    // Read and restore only: no push, no forget (though hv01 may remove
    // on its own jobs), and the copy is untouched.
    let img = p.img.to_str().unwrap().to_string();
    for args in [
        vec!["push", "vm1", "--force", "--source", img.as_str()],
        vec!["forget", "vm1", "-r", a.as_str()],
        vec!["tags", "vm1", "-r", a.as_str(), "add", "manual:x"],
    ] {
        let out = run(&hv_file, &args);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {all}");
        assert!(
            all.contains("PERMISSION_DENIED") && all.contains("copy"),
            "{args:?}: {all}"
        );
    }
    let out = run(&hv_file, &["--json", "status", "vm1"]);
    let status: Value = serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(
        ids(status["jobs"][0]["revisions"].as_array().unwrap()),
        vec![a.clone()]
    );

    // Another hypervisor is told nothing of it.
    let out = run(&other_file, &["status", "vm1"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("may not access job vm1"), "{all}");
}

/// A change tracker caught missing writes on the source stays visible on
/// the replica: its copy carries the audit, and the replica's `check` warns.
#[test]
fn a_replica_keeps_the_sources_audit_of_a_lying_tracker() {
    let p = Pair::new("");
    p.push("vm1");
    // Named: the write at 1 MiB. Missed: the one at 20 MiB.
    write_at(&p.img, MIB, &[7u8; 4096]);
    write_at(&p.img, 20 * MIB, &[8u8; 4096]);
    let list = p.dir.path().join("ranges");
    std::fs::write(&list, format!("{} 4096\n", MIB)).unwrap();
    let list = list.display().to_string();
    let out = p.hv(&[
        "--json",
        "push",
        "vm1",
        "--force",
        "--changed-ranges",
        &list,
        "--audit-sample",
        "100%",
    ]);
    let pushed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pushed["audit"]["mismatched"].as_u64(), Some(1), "{pushed}");

    let replica = p.replica("");
    let copied = round(&replica, 0);
    assert_eq!(copied.len(), 2, "{copied:?}");
    let here = replica.revisions("vm1");
    for key in ["tracker", "sampled", "mismatched"] {
        assert_eq!(here[1]["audit"][key], pushed["audit"][key], "{key}: {}", here[1]);
    }
    assert_eq!(
        here[0]["audit"],
        Value::Null,
        "the full push relied on no tracker"
    );
    let check = replica.client(&["check", "vm1"]);
    let line = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{line}");
    assert!(line.contains("missed writes: 1 of"), "{line}");
}

/// An encrypted job (docs/encryption.md) is copied like any other, without
/// the key: only the changed granules travel, the copies keep the key
/// check, and they restore on the replica with the key alone.
#[test]
fn an_encrypted_job_is_copied_incrementally_and_restores_with_its_key() {
    let mut p = Pair::new("");
    let key = p.dir.path().join("vm1.key");
    p.source.client_ok(&["keygen", key.to_str().unwrap()]);
    std::fs::write(
        &p.source.client_config,
        format!(
            "jobs:\n  vm1:\n    source: {{type: file, path: {}}}\n    encryption: {{key-file: {}}}\n",
            p.img.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut kept = vec![];
    p.push("vm1");
    kept.push(p.keep_image("e1.img"));
    scatter(&p.img, 3, 12, 3 * MIB + 4096);
    p.push("vm1");
    kept.push(p.keep_image("e2.img"));
    let on_source = p.source_revisions("vm1");
    let check = on_source[0]["key_check"].as_str().unwrap().to_string();

    let replica = p.replica("");
    let copied = round(&replica, 0);
    assert_eq!(copied.len(), 2, "{copied:?}");
    assert_eq!(field(&copied[0], "received"), 32 * MIB, "data, not holes");
    assert_eq!(field(&copied[1], "received"), 12 * G, "only the changed granules");
    let here = replica.revisions("vm1");
    assert_eq!(ids(&here), ids(&on_source));
    for r in &here {
        assert_eq!(r["key_check"].as_str(), Some(check.as_str()), "{r}");
    }
    let (_, exclusive) = btrfs_du(&replica.base.join("vm1").join(here[1]["id"].as_str().unwrap()));
    assert!(
        exclusive <= 12 * G,
        "the copy shares its parent's extents: {exclusive}"
    );
    p.source.kill();
    for (id, want) in ids(&on_source).iter().zip(&kept) {
        let stored = replica.base.join("vm1").join(id);
        assert_ne!(file_hash(&stored), file_hash(want), "ciphertext on the replica");
        let out = p.dir.path().join(format!("replica-{id}.img"));
        replica.client_ok(&[
            "restore",
            "vm1",
            "-r",
            id,
            "--key-file",
            key.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            file_hash(&out),
            file_hash(want),
            "revision {id} restores from the replica"
        );
    }
    replica.client_ok(&["verify", "vm1", "-r", "all"]);
}
