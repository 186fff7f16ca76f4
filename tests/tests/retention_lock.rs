//! The retention lock (README, "Security"; docs/DESIGN.md, "Retention
//! lock"): a revision younger than its job's `retention-lock` when it was
//! committed is deleted by nothing the server does or is asked to do: not
//! by an admin's forget, not by expiry after the schedule was shortened,
//! not after the lock was removed from the config and the server
//! restarted, not by a replica mirroring its source's expiry. Once the
//! lock has passed, forget and expiry work again.

mod support;

use backy_common::token::{generate_token, hash_token};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use support::*;

fn secret(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.display().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `backy-client` with a token file (hypervisor or admin).
fn with_token(server: &Server, token: &str, args: &[&str]) -> Output {
    let mut all = vec!["--token-file", token];
    all.extend_from_slice(args);
    server.client(&all)
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pushes vm1 (forced, so it runs whatever is due); returns the new id
/// and the ids the expiry after its commit deleted.
fn push(server: &Server, hv: &str) -> (String, Vec<String>) {
    let out = ok(
        with_token(server, hv, &["--json", "push", "vm1", "--force"]),
        "push",
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let expired = v["expired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    (v["revision"]["id"].as_str().unwrap().to_string(), expired)
}

fn ids(revs: &[Value]) -> Vec<String> {
    revs.iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// `locked_until` of each revision of `job`, as `status --json` shows it.
fn locks(server: &Server, admin: &str, job: &str) -> Vec<Option<DateTime<Utc>>> {
    let out = ok(with_token(server, admin, &["--json", "status", job]), "status");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["jobs"][0]["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["locked_until"].as_str().map(|t| t.parse().unwrap()))
        .collect()
}

fn revisions(server: &Server, admin: &str, job: &str) -> Vec<Value> {
    let out = ok(with_token(server, admin, &["--json", "status", job]), "status");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["jobs"][0]["revisions"].as_array().unwrap().clone()
}

/// The steps that must happen while the lock holds take far less than
/// `LOCK`; a run slower than that fails here with that reason instead of
/// asserting something the clock already made untrue.
fn still_locked(until: DateTime<Utc>, step: &str) {
    assert!(
        Utc::now() + chrono::TimeDelta::seconds(2) < until,
        "the test took too long: the lock passed before {step}"
    );
}

const LOCK_SECS: i64 = 40;

fn config(hv: &str, admin: &str, img: &Path, schedule: &str, lock: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\n\
         clients:\n  hv01: {{token-hash: '{}'}}\n  root: {{role: admin, token-hash: '{}'}}\n\
         schedules:\n  s: {{{schedule}{lock}}}\n\
         jobs:\n  vm1: {{schedule: s, client: hv01, source: {{type: file, path: {}}}}}\n",
        hash_token(hv).unwrap(),
        hash_token(admin).unwrap(),
        img.display(),
    )
}

#[test]
fn the_lock_holds_against_forget_a_shortened_schedule_and_a_removed_lock() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, 2 * MIB)]);
    let (hv, admin) = (generate_token(), generate_token());
    let hv_file = secret(&d.join("hv.token"), &hv);
    let admin_file = secret(&d.join("admin.token"), &admin);
    let long = "daily: {interval: 1d, keep: 5}";
    let lock = format!(", retention-lock: {LOCK_SECS}s");
    let base = d.join("store");
    let mut server = Server::start_config(&base, &config(&hv, &admin, &img, long, &lock));

    let (a, _) = push(&server, &hv_file);
    write_at(&img, MIB, b"b");
    let (b, _) = push(&server, &hv_file);
    write_at(&img, MIB, b"c");
    let (c, _) = push(&server, &hv_file);
    // The lock is in each revision's record, as committed.
    let until = locks(&server, &admin_file, "vm1");
    assert_eq!(until.len(), 3);
    let first_until = until[0].expect("a is locked");
    let revs = revisions(&server, &admin_file, "vm1");
    for (r, u) in revs.iter().zip(&until) {
        let ts: DateTime<Utc> = r["timestamp"].as_str().unwrap().parse().unwrap();
        // Status shows whole seconds; the lock is the timestamp plus the
        // lock rounded up to one.
        let span = u.expect("locked") - ts;
        assert!(
            (LOCK_SECS..=LOCK_SECS + 1).contains(&span.num_seconds()),
            "{r}: {u:?}"
        );
    }
    let rev_file = std::fs::read_to_string(base.join("vm1").join(format!("{a}.rev"))).unwrap();
    assert!(rev_file.contains("locked_until:"), "{rev_file}");
    let text = ok(with_token(&server, &admin_file, &["status", "vm1"]), "status");
    assert!(text.contains("locked until"), "{text}");

    // Forget, as admin: refused, one line naming the revision and until
    // when, nothing changed on disk.
    let before = server.snapshot_tree();
    for spec in [a.as_str(), "all"] {
        let out = with_token(&server, &admin_file, &["forget", "vm1", "-r", spec]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "forget -r {spec}: {err}");
        assert!(
            err.contains("locked until") && err.contains("retention-lock") && err.lines().count() == 1,
            "forget -r {spec}: {err}"
        );
        let out = with_token(&server, &admin_file, &["--json", "forget", "vm1", "-r", spec]);
        let v: Value = serde_json::from_str(stderr(&out).trim()).unwrap();
        assert_eq!(v["error"]["kind"], "failed_precondition", "{v}");
    }
    assert_eq!(server.snapshot_tree(), before, "a refused forget changes nothing");
    still_locked(first_until, "the forgets");

    // The schedule shortened to keep 1 of 1s: the dry run keeps them and
    // says why; the expiry after the next commit deletes none of them.
    let short = "daily: {interval: 1s, keep: 1}";
    let text = config(&hv, &admin, &img, short, &lock).replace("BASE", &base.display().to_string());
    let (server_text, _) = split_config(&text);
    std::fs::write(
        &server.config_path,
        format!("{server_text}\ninsecure-plaintext: true\n"),
    )
    .unwrap();
    let mark = server.log_mark();
    server.hup();
    let line = server.wait_log(mark, "reload");
    assert!(line.contains("reloaded"), "{line}");
    // Polled: the tags age past the 1s window within a second or two.
    let dry_run = || {
        let dry = Command::new(bin("backy-server"))
            .arg("--config")
            .arg(&server.config_path)
            .args(["expire", "--dry-run", "vm1"])
            .output()
            .unwrap();
        assert!(dry.status.success(), "{}", stderr(&dry));
        String::from_utf8_lossy(&dry.stdout).into_owned()
    };
    let mut dry_text = String::new();
    wait_for(
        "the dry run to keep a for its lock",
        Duration::from_secs(20),
        || {
            dry_text = dry_run();
            dry_text
                .lines()
                .any(|l| l.contains(&a) && l.contains("kept: locked until"))
        },
    );
    assert!(dry_text.contains("deletes nothing"), "{dry_text}");
    write_at(&img, MIB, b"d");
    let (d_id, expired) = push(&server, &hv_file);
    assert!(expired.is_empty(), "expired under the lock: {expired:?}");
    let now_ids = ids(&revisions(&server, &admin_file, "vm1"));
    assert_eq!(now_ids, vec![a.clone(), b.clone(), c.clone(), d_id.clone()]);
    still_locked(first_until, "the shortened schedule's expiry");

    // The lock removed from the config and the server restarted: what was
    // committed under it stays locked; the new revision is not.
    let text = config(&hv, &admin, &img, short, "").replace("BASE", &base.display().to_string());
    let (server_text, _) = split_config(&text);
    std::fs::write(
        &server.config_path,
        format!("{server_text}\ninsecure-plaintext: true\n"),
    )
    .unwrap();
    server.restart();
    let out = with_token(&server, &admin_file, &["forget", "vm1", "-r", &b]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("locked until"), "{}", stderr(&out));
    write_at(&img, MIB, b"e");
    let (e, expired) = push(&server, &hv_file);
    // d was committed under the lock too; only what was committed without
    // one may go.
    assert!(expired.is_empty(), "expired under the lock: {expired:?}");
    let until = locks(&server, &admin_file, "vm1");
    assert_eq!(until.len(), 5);
    assert!(until[..4].iter().all(Option::is_some), "{until:?}");
    assert_eq!(until[4], None, "e was committed without a lock");
    still_locked(first_until, "the restart without the lock");

    // Once the lock has passed: forget and expiry work again.
    let last_until = until[3].unwrap();
    wait_for(
        "the locks to pass",
        Duration::from_secs(LOCK_SECS as u64 + 30),
        || Utc::now() > last_until,
    );
    ok(
        with_token(&server, &admin_file, &["forget", "vm1", "-r", &a]),
        "forget a",
    );
    write_at(&img, MIB, b"f");
    let (f, expired) = push(&server, &hv_file);
    // The expiry after this commit deletes them (or the minutely run did,
    // if it came first): nothing but expiry removes them here.
    let want = [b, c, d_id, e];
    assert!(expired.iter().all(|x| want.contains(x)), "{expired:?}");
    assert_eq!(ids(&revisions(&server, &admin_file, "vm1")), vec![f]);
}

/// A replica mirroring its source's expiry keeps a copy its own
/// `retention-lock` covers, though the source forgot it and has newer; the
/// lock of a copy is the replica's, not the source's (which has none).
#[test]
fn a_replica_keeps_locked_copies_the_source_expired() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, 2 * MIB)]);
    let (hv, rep) = (generate_token(), generate_token());
    let hv_file = secret(&d.join("hv.token"), &hv);
    let rep_file = secret(&d.join("rep.token"), &rep);
    let port = free_port();
    let source_config = format!(
        "listen: 127.0.0.1:{port}\nbase-dir: BASE\n\
         clients:\n  hv01: {{role: admin, token-hash: '{}'}}\n  offsite: {{role: replica, token-hash: '{}'}}\n\
         jobs:\n  vm1: {{schedule: none, client: hv01, source: {{type: file, path: {}}}}}\n",
        hash_token(&hv).unwrap(),
        hash_token(&rep).unwrap(),
        img.display(),
    );
    let source_base: PathBuf = d.join("source");
    let source = Server::start_config(&source_base, &source_config);
    let hv_push = |args: &[&str]| ok(with_token(&source, &hv_file, args), "source");
    let id_of = |out: String| -> String {
        let v: Value = serde_json::from_str(&out).unwrap();
        v["revision"]["id"].as_str().unwrap().to_string()
    };
    let a = id_of(hv_push(&["--json", "push", "vm1"]));
    write_at(&img, MIB, b"b");
    let b = id_of(hv_push(&["--json", "push", "vm1"]));

    let replica_config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\n\
         replicate: {{source: 'http://127.0.0.1:{port}', token-file: {rep_file}, interval: 1h, jobs: [vm1]}}\n\
         jobs:\n  vm1: {{schedule: none, retention-lock: 1h}}\n"
    );
    let replica = Server::start_config(&d.join("replica"), &replica_config);
    replica.wait_log(0, "replication round done");
    assert_eq!(ids(&replica.revisions("vm1")), vec![a.clone(), b.clone()]);
    let source_locks = locks(&source, &hv_file, "vm1");
    assert_eq!(source_locks, vec![None, None], "the source has no lock");
    let replica_locks: Vec<Option<String>> = replica
        .revisions("vm1")
        .iter()
        .map(|r| r["locked_until"].as_str().map(str::to_string))
        .collect();
    assert!(replica_locks.iter().all(Option::is_some), "{replica_locks:?}");

    // The source forgets a and has something newer: mirroring would
    // delete the copy of a; the lock keeps it.
    hv_push(&["forget", "vm1", "-r", &a]);
    write_at(&img, MIB, b"c");
    let c = id_of(hv_push(&["--json", "push", "vm1"]));
    let mark = replica.log_mark();
    replica.hup();
    let done = replica.wait_log(mark, "replication round done");
    assert!(done.contains("expired=0"), "{done}");
    assert_eq!(ids(&replica.revisions("vm1")), vec![a, b, c]);
}
