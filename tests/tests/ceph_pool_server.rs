//! A server whose revisions live in a Ceph pool (`store: {type: ceph-rbd}`,
//! issue 36's first slice, docs/DESIGN.md "Ceph pool store"), through real
//! `backy-server` and `backy-client` processes on the one-node test cluster
//! (BACKY_TEST_CEPH_CONF), as a cephx identity confined to one namespace:
//!
//! - a full push and an incremental push by scan become snapshots: `rbd
//!   export` of each equals the source at that time, and nothing lands
//!   under base-dir;
//! - restores of both equal the sources;
//! - a second server started fresh on the same pool lists the same job and
//!   revisions, and restores the same bytes;
//! - a rollback restore through the second server gives the revision;
//! - the first server holds the job's lease: a push through the second is
//!   refused naming the holder, and the client sends it to the holder;
//!   stopped (SIGTERM), the first releases it and the second pushes at
//!   once;
//! - a push that dies before its end frame leaves no revision; the writes
//!   it left in the image's head make the next push full, equal to the
//!   source;
//! - `check-config` names the store; `backy-server expire` and `dedup`
//!   (the filesystem store's) are refused with one line.
//! - tags, distrust and forget change the records in the pool with the
//!   filesystem store's checks and messages; a distrusted revision is no
//!   parent; a forget removes snapshot and record; a protected snapshot and
//!   a server not holding the lease change nothing;
//! - verify marks a clean revision verified, and reports and distrusts one
//!   whose stored digests do not match its data; the background scrub does
//!   the same on the lease holder only;
//! - expiry after a commit removes exactly what the schedule says;
//! - a retention-locked revision's snapshot is protected, and it survives
//!   expiry, forget and a config without the lock.
//!
//! Two servers in front of the pool with a short lease (`store: lease`):
//!
//! - a holder killed with kill -9 in the middle of a push: the other server
//!   refuses the job naming it while its lease lasts, takes it over after
//!   (the take-over time is printed), fences it, and the half push is no
//!   revision; the next push completes and restores equal; the killed
//!   server restarted cannot take the job (its push lands through the
//!   holder);
//! - a holder frozen (SIGSTOP) after its lease check, right before its
//!   commit: taken over and fenced; continued, its commit is refused
//!   (blocklisted) and nothing of it is a revision or a snapshot.
//!
//! A push through a server not holding the job's lease is sent by the
//! client to the holder the refusal names; client.yaml's `server:` list
//! is tried in order when a connection fails.

mod confined;
mod support;

use confined::{ceph_conf, ok, Confined};
use std::path::Path;
use support::*;

const MIB: u64 = 1 << 20;

fn config(pool: &Confined) -> String {
    format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\n{}jobs:\n  vm1: {{schedule: none}}\n",
        pool.store_yaml(),
    )
}

/// Files below `dir` (recursively), as paths relative to it.
fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn pushes_land_as_snapshots_restore_equal_and_a_fresh_server_sees_them() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "srv");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let base = dir.path().join("backy");
    let server = Server::start_config(&base, &config(&pool));

    // 4 MiB blocks: data in blocks 0, 2 and the short last one, a hole in 1.
    let size = 13 * MIB + 12345;
    let src = work.join("src.img");
    make_image(&src, size, &[]);
    write_at(&src, 0, &pattern(1, (3 * MIB) as usize));
    write_at(&src, 8 * MIB + 777, &pattern(2, MIB as usize));
    write_at(&src, 12 * MIB, &pattern(3, (MIB + 12345) as usize));
    let v1 = std::fs::read(&src).unwrap();
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    // One changed block: the incremental push sends that block only.
    write_at(&src, 8 * MIB + 100, &pattern(4, 4096));
    let v2 = std::fs::read(&src).unwrap();
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    let revs = server.revisions("vm1");
    assert_eq!(revs.len(), 2, "{revs:?}");
    // Data bytes sent (zero granules go as zero ranges): about all of v1's
    // 5 MiB of data, then at most the changed block.
    let first_sent = revs[0]["bytes_received"].as_u64().unwrap();
    assert!((5 * MIB..6 * MIB).contains(&first_sent), "{revs:?}");
    assert_eq!(
        revs[1]["parent_id"], revs[0]["id"],
        "the second push is incremental"
    );
    assert_eq!(revs[1]["changed_blocks"], 1, "{revs:?}");
    let second_sent = revs[1]["bytes_received"].as_u64().unwrap();
    assert!(
        (4096..=4 * MIB).contains(&second_sent),
        "the incremental push sent within its one changed block: {revs:?}"
    );
    let snaps = pool.snapshots("vm1");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert!(
        pool.export("vm1", Some(&snaps[0])) == v1,
        "rbd export of the first snapshot equals v1"
    );
    assert!(
        pool.export("vm1", Some(&snaps[1])) == v2,
        "rbd export of the second snapshot equals v2"
    );
    // The pool holds the revisions: base-dir holds no image.
    let local = files_below(&base);
    assert!(
        !local.iter().any(|f| f.starts_with("vm1/")),
        "nothing of vm1 under base-dir: {local:?}"
    );

    for (spec, want) in [("1", &v1), ("latest", &v2)] {
        let target = work.join(format!("restored-{spec}.img"));
        server.client_ok(&["restore", "vm1", "-r", spec, target.to_str().unwrap()]);
        assert!(std::fs::read(&target).unwrap() == *want, "restore -r {spec}");
    }

    // A second server, fresh base-dir, same pool: the same job and revisions.
    let base2 = dir.path().join("backy2");
    let second = Server::start_config(&base2, &config(&pool));
    assert_eq!(second.revisions("vm1"), revs);
    let target = work.join("restored-second.img");
    second.client_ok(&["restore", "vm1", "-r", "1", target.to_str().unwrap()]);
    assert!(
        std::fs::read(&target).unwrap() == v1,
        "restore through the second server"
    );
    let all = second.client_ok(&["status", "--json"]);
    assert!(all.contains("\"vm1\""), "status of every job names vm1: {all}");

    // A rollback through the second server (tests/tests/ceph_pool_restore.rs
    // checks what travels): the existing target of the revision's size.
    let rollback = work.join("rollback.img");
    std::fs::write(&rollback, &v2).unwrap();
    second.client_ok(&["restore", "vm1", "-r", "1", "--force", rollback.to_str().unwrap()]);
    assert!(std::fs::read(&rollback).unwrap() == v1, "rolled back to r1");
    assert_eq!(server.revisions("vm1"), revs);
    assert_eq!(pool.snapshots("vm1"), snaps);

    // The first server holds vm1's lease: a push through the second is
    // refused naming the holder, and the client sends it there (once).
    write_at(&src, 100, &pattern(5, 4096));
    let v3 = std::fs::read(&src).unwrap();
    let (first_mark, second_mark) = (server.log_mark(), second.log_mark());
    second.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    server.wait_log(first_mark, "committed revision to the pool");
    assert!(
        !second
            .log_lines(second_mark)
            .iter()
            .any(|l| l.contains("committed revision")),
        "the second server committed nothing"
    );
    let followed = second.revisions("vm1");
    assert_eq!(followed.len(), 3, "{followed:?}");
    assert_eq!(followed[2]["parent_id"], revs[1]["id"]);
    let snaps = pool.snapshots("vm1");
    assert!(
        pool.export("vm1", Some(&snaps[2])) == v3,
        "rbd export of the third snapshot equals v3"
    );

    // Stopped, the first server releases the lease: the second takes it at
    // once (not after the lease's 30 s) and pushes incrementally.
    let mut server = server;
    server.terminate();
    write_at(&src, 200, &pattern(7, 4096));
    let v3b = std::fs::read(&src).unwrap();
    second.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let now = second.revisions("vm1");
    assert_eq!(now.len(), 4, "{now:?}");
    assert_eq!(now[3]["parent_id"], followed[2]["id"]);
    let snaps = pool.snapshots("vm1");
    assert!(
        pool.export("vm1", Some(&snaps[3])) == v3b,
        "rbd export of the fourth snapshot equals the source"
    );

    // A push that dies before its end frame leaves no revision, but writes
    // in the image's head: the next push is planned full and equals the
    // source.
    for at in [0, 5 * MIB, 9 * MIB] {
        write_at(&src, at, &pattern(6, (3 * MIB) as usize));
    }
    let v4 = std::fs::read(&src).unwrap();
    let mark = second.log_mark();
    let out = second.client_env(
        &[("BACKY_FAULT", "client.before-end")],
        &["push", "vm1", "--source", src.to_str().unwrap()],
    );
    assert!(!out.status.success());
    second.wait_log(mark, "push failed");
    assert_eq!(pool.snapshots("vm1"), snaps, "no snapshot of the dead push");
    assert_eq!(second.revisions("vm1"), now, "no revision of the dead push");
    let head = ok(
        pool.tool(
            "rbd",
            &[
                "diff",
                "--from-snap",
                &snaps[3],
                &format!("rbd/{}/vm1", pool.namespace),
            ],
            b"",
        ),
        "rbd diff",
    );
    assert!(!head.is_empty(), "the dead push wrote into the head");
    second.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let after = second.revisions("vm1");
    assert_eq!(after.len(), 5, "{after:?}");
    assert!(after[4]["parent_id"].is_null(), "planned full: {after:?}");
    let snaps = pool.snapshots("vm1");
    assert!(
        pool.export("vm1", Some(&snaps[4])) == v4,
        "rbd export after the dead push equals v4"
    );
    assert!(
        pool.export("vm1", Some(&snaps[3])) == v3b,
        "the earlier snapshot is untouched"
    );

    // check-config names the store; the filesystem store's commands are
    // refused with one line.
    let check = |args: &[&str]| {
        std::process::Command::new(bin("backy-server"))
            .arg("--config")
            .arg(&second.config_path)
            .args(args)
            .output()
            .unwrap()
    };
    let out = check(&["check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("storage ceph-rbd pool rbd (not contacted)"),
        "{stdout}"
    );
    for (args, what) in [
        (&["expire", "--dry-run"][..], "backy-server expire"),
        (&["dedup"][..], "backy-server dedup"),
    ] {
        let out = check(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("{what} is not supported on a ceph-rbd store yet")),
            "{stderr}"
        );
    }
    assert_eq!(pool.snapshots("vm1"), snaps);
}

/// Seconds of the short lease the take-over test runs with
/// (`store: lease`), so a take-over takes seconds, not the default 30.
const LEASE_SECS: u64 = 6;

/// A server config on the pool with a short lease.
fn short_lease_config(pool: &Confined) -> String {
    let keys =
        format!("  lease: {LEASE_SECS}s\n  lease-renewal: 2s\n  lease-margin: 1s\n  op-timeout: 10s\n");
    config(pool).replace("jobs:\n", &format!("{keys}jobs:\n"))
}

/// `backy-client ARGS` through `server`, running in the background.
fn spawn_client(server: &Server, args: &[&str]) -> std::process::Child {
    std::process::Command::new(bin("backy-client"))
        .arg("--server")
        .arg(&server.url)
        .arg("--config")
        .arg(&server.client_config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting backy-client")
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(pid, sig).expect("signal to backy-server");
}

/// Pushes through `server` until it takes the job's lease: each refused
/// push must be ABORTED naming `holder` (the client then fails to reach
/// the holder it follows to: dead, or frozen and not answering within
/// `--timeout 2`). At least one refusal is required (the holder's lease
/// still lasted). Returns the time from `since` to the push that was let
/// through.
fn push_until_taken(
    server: &Server,
    src: &Path,
    holder: &str,
    since: std::time::Instant,
) -> std::time::Duration {
    let mut refused = 0;
    let deadline = since + std::time::Duration::from_secs(3 * LEASE_SECS + 10);
    loop {
        let started = std::time::Instant::now();
        let out = server.client(&["--timeout", "2", "push", "vm1", "--source", src.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            assert!(refused > 0, "refused while the holder's lease lasted");
            return started - since;
        }
        assert!(
            stderr.contains(&format!("held by server {holder} "))
                && stderr.contains("(ABORTED)")
                && stderr.contains(&format!("following it to {holder}")),
            "refused naming {holder}, which does not answer: {stderr}"
        );
        refused += 1;
        assert!(std::time::Instant::now() < deadline, "never taken over: {stderr}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Several servers in front of one pool (issue 36 part 3): a holder killed
/// mid-push, and a holder frozen after its lease check, are taken over by
/// the other server after the lease, fenced, and nothing of theirs becomes
/// a revision.
#[test]
fn a_dead_or_frozen_holder_is_taken_over_after_its_lease_and_fenced() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "take");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let config = short_lease_config(&pool);
    let mut a = Server::start_config(&dir.path().join("a"), &config);
    let mut b = Server::start_config(&dir.path().join("b"), &config);
    assert_ne!(a.url, b.url);

    let size = 16 * MIB;
    let src = work.join("src.img");
    make_image(&src, size, &[]);
    write_at(&src, 0, &pattern(1, MIB as usize));
    let v1 = std::fs::read(&src).unwrap();
    b.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let revs = a.revisions("vm1");
    assert_eq!(revs.len(), 1, "status through A shows B's push: {revs:?}");
    // Stopped, B releases the lease: A may take it at once.
    b.terminate();

    // A is killed with kill -9 in the middle of a push: stopped at its
    // fourth data frame (the client's data half sent), then SIGKILL.
    a.restart_with_env(&[("BACKY_FAULT", "stop:pool.frame@4")]);
    write_at(&src, 0, &pattern(2, size as usize));
    let v2 = std::fs::read(&src).unwrap();
    let dying = spawn_client(&a, &["push", "vm1", "--source", src.to_str().unwrap()]);
    wait_stopped(a.pid());
    let a_url = a.url.clone();
    a.kill();
    let killed = std::time::Instant::now();
    let out = dying.wait_with_output().unwrap();
    assert!(!out.status.success(), "the push through the killed server failed");

    // B refuses the job while A's lease lasts (naming A), then takes it
    // over; the half push is no revision, and B's push completes.
    b.restart();
    let taken = push_until_taken(&b, &src, &a_url, killed);
    println!(
        "take-over after kill -9 of the holder: {:.1} s (lease {LEASE_SECS} s, renewed every 2 s)",
        taken.as_secs_f64()
    );
    assert!(
        taken < std::time::Duration::from_secs(LEASE_SECS + 3),
        "taken within the lease and a poll: {taken:?}"
    );
    b.wait_log(0, "fenced the job's previous holder");
    let revs = b.revisions("vm1");
    assert_eq!(revs.len(), 2, "the half push is no revision: {revs:?}");
    assert!(
        revs[1]["parent_id"].is_null(),
        "the dirty head made it full: {revs:?}"
    );
    let snaps = pool.snapshots("vm1");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert!(pool.export("vm1", Some(&snaps[0])) == v1);
    assert!(pool.export("vm1", Some(&snaps[1])) == v2);
    let target = work.join("restored-v2.img");
    b.client_ok(&["restore", "vm1", "-r", "latest", target.to_str().unwrap()]);
    assert!(std::fs::read(&target).unwrap() == v2, "restore through B");

    // A restarted cannot take the job B holds: it refuses naming B, and
    // the client's push lands through B.
    a.restart_with_env(&[("BACKY_FAULT", "stop:lease.checked")]);
    write_at(&src, 5 * MIB, &pattern(3, MIB as usize));
    let v3 = std::fs::read(&src).unwrap();
    let (a_mark, b_mark) = (a.log_mark(), b.log_mark());
    a.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    b.wait_log(b_mark, "committed revision to the pool");
    assert!(
        !a.log_lines(a_mark)
            .iter()
            .any(|l| l.contains("committed revision")),
        "A committed nothing"
    );
    let revs = b.revisions("vm1");
    assert_eq!(revs.len(), 3, "{revs:?}");

    // The holder that did not die: B releases, A takes the lease and is
    // frozen after its lease check, right before its commit. B takes over
    // after the lease and fences A; continued, A's commit is refused.
    b.terminate();
    write_at(&src, 7 * MIB, &pattern(8, 4096));
    let frozen = spawn_client(&a, &["push", "vm1", "--source", src.to_str().unwrap()]);
    wait_stopped(a.pid());
    let stopped = std::time::Instant::now();
    b.restart();
    write_at(&src, 9 * MIB, &pattern(4, MIB as usize));
    let v4 = std::fs::read(&src).unwrap();
    let taken = push_until_taken(&b, &src, &a.url, stopped);
    println!("take-over from a frozen holder: {:.1} s", taken.as_secs_f64());
    signal(a.pid(), rustix::process::Signal::CONT);
    let out = frozen.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("the frozen holder's push after SIGCONT: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ESHUTDOWN") || stderr.contains("lease epoch"),
        "refused as blocklisted or by the epoch: {stderr}"
    );
    let after = b.revisions("vm1");
    assert_eq!(after.len(), 4, "{after:?}");
    assert_eq!(after[..3], revs[..], "B's revisions intact");
    let snaps = pool.snapshots("vm1");
    let ids: Vec<&str> = after.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(snaps.len(), 4, "no snapshot of A's push: {snaps:?} {ids:?}");
    for (snap, want) in snaps.iter().zip([&v1, &v2, &v3, &v4]) {
        assert!(pool.export("vm1", Some(snap)) == *want, "snapshot {snap}");
    }
}

/// A push reaching a server that does not hold the job's lease is
/// refused naming the holder (in the error's details) and the client
/// sends it there once; client.yaml's `server:` list is tried in order
/// when a connection fails.
#[test]
fn a_push_through_another_server_follows_to_the_lease_holder() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "follow");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let a = Server::start_config(&dir.path().join("a"), &config(&pool));
    let b = Server::start_config(&dir.path().join("b"), &config(&pool));

    let src = work.join("src.img");
    make_image(&src, 8 * MIB, &[]);
    write_at(&src, 0, &pattern(1, MIB as usize));
    a.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    // A holds vm1: through B, with a dead server listed first.
    write_at(&src, 5 * MIB, &pattern(2, MIB as usize));
    let v2 = std::fs::read(&src).unwrap();
    let client_yaml = work.join("client.yaml");
    let dead = format!("http://127.0.0.1:{}", free_port());
    std::fs::write(&client_yaml, format!("server: [\"{dead}\", \"{}\"]\n", b.url)).unwrap();
    let (a_mark, b_mark) = (a.log_mark(), b.log_mark());
    let out = std::process::Command::new(bin("backy-client"))
        .args(["-v", "--config", client_yaml.to_str().unwrap()])
        .args(["push", "vm1", "--source", src.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("pushing through {}", a.url)),
        "followed to A: {stderr}"
    );
    assert!(
        stderr.contains("trying the next server"),
        "the dead server first: {stderr}"
    );
    a.wait_log(a_mark, "committed revision to the pool");
    assert!(
        !b.log_lines(b_mark)
            .iter()
            .any(|l| l.contains("committed revision")),
        "B committed nothing"
    );
    let revs = b.revisions("vm1");
    assert_eq!(
        revs.len(),
        2,
        "status through B shows the push through A: {revs:?}"
    );
    let snaps = pool.snapshots("vm1");
    assert!(pool.export("vm1", Some(&snaps[1])) == v2);

    // Without a server to follow to (--server names B only, and B is
    // refused again by A's lease): the push through B is followed too.
    write_at(&src, 0, &pattern(3, 4096));
    let out = b.client(&["push", "vm1", "--source", src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(b.revisions("vm1").len(), 3);
}

/// A job on a schedule (tags are checked against it) on the pool.
fn scheduled_config(pool: &Confined) -> String {
    config(pool).replace(
        "jobs:\n  vm1: {schedule: none}\n",
        "schedules:\n  s: {daily: {interval: 1d, keep: 3}}\njobs:\n  vm1: {schedule: s}\n",
    )
}

/// A refusal: exit 1, one line on stderr with the gRPC code and `needle`.
fn refused(out: &std::process::Output, code: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "must fail: {stderr}");
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "one line: {stderr}"
    );
    assert!(
        stderr.contains(&format!("({code})")) && stderr.contains(needle),
        "want {code} and {needle:?}: {stderr}"
    );
}

fn tags_of(rev: &serde_json::Value) -> Vec<String> {
    rev["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("tags of {rev}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// Tags, distrust and forget change the records in the pool (what a
/// fresh server reads) with the filesystem store's checks and messages:
/// tags outside the schedule or none at all are refused, a dry run
/// changes nothing, a distrusted revision is no parent of the next push,
/// a forget removes the snapshot and the record, a protected snapshot is
/// refused whole, and a server not holding the lease changes nothing.
#[test]
fn tags_distrust_and_forget_change_the_records_in_the_pool() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "chg");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let server = Server::start_config(&dir.path().join("backy"), &scheduled_config(&pool));
    let size = 9 * MIB;
    let src = work.join("src.img");
    make_image(&src, size, &[]);
    // Forced: the schedule makes only the first push of a day due.
    let push = |n: u64| {
        write_at(&src, n * MIB, &pattern(n, 4096));
        server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap(), "--force"]);
        std::fs::read(&src).unwrap()
    };
    let v1 = push(1);
    let _v2 = push(2);
    let revs = server.revisions("vm1");
    let ids = server.short_ids("vm1");
    assert_eq!(ids, pool.snapshots("vm1"), "one snapshot per revision");
    assert_eq!(tags_of(&revs[0]), ["daily"]);

    // Refused as on the filesystem: one line, nothing changed.
    let out = server.client(&["tags", "vm1", "-r", "1", "set", "keepme"]);
    refused(
        &out,
        "INVALID_ARGUMENT",
        "tag keepme not in the job's schedule (daily)",
    );
    let out = server.client(&["tags", "vm1", "-r", "1", "set"]);
    refused(&out, "INVALID_ARGUMENT", "would be left without tags");
    let out = server.client(&["tags", "vm1", "-r", "1", "remove", "daily"]);
    refused(&out, "INVALID_ARGUMENT", "use forget to delete a revision");
    let out = server.client(&["forget", "vm1", "-r", "7"]);
    assert_eq!(out.status.code(), Some(1));
    let text = server.client_ok(&["tags", "vm1", "-r", "1", "add", "manual:keep", "--dry-run"]);
    assert!(
        text.contains("would tag") && text.contains("daily,manual:keep"),
        "{text}"
    );
    let text = server.client_ok(&["forget", "vm1", "-r", "all", "--dry-run"]);
    assert_eq!(text.matches("would forget").count(), 2, "{text}");
    let text = server.client_ok(&["distrust", "vm1", "-r", "0", "--dry-run"]);
    assert!(text.contains("would distrust"), "{text}");
    assert_eq!(
        server.revisions("vm1"),
        revs,
        "refusals and dry runs change nothing"
    );
    assert_eq!(pool.snapshots("vm1"), ids);

    // Tags: add, then remove, written to the records in the pool.
    server.client_ok(&["tags", "vm1", "-r", "1", "add", "manual:keep"]);
    let now = server.revisions("vm1");
    assert_eq!(tags_of(&now[0]), ["daily", "manual:keep"]);
    assert_eq!(tags_of(&now[1]), ["daily"]);
    // A fresh server reads the same from the pool.
    let second = Server::start_config(&dir.path().join("backy2"), &scheduled_config(&pool));
    assert_eq!(second.revisions("vm1"), now);
    server.client_ok(&["tags", "vm1", "-r", &ids[0], "remove", "manual:keep"]);
    assert_eq!(tags_of(&server.revisions("vm1")[0]), ["daily"]);

    // The second server does not hold the job's lease: refused, nothing changed.
    for args in [
        &["distrust", "vm1", "-r", "0"][..],
        &["forget", "vm1", "-r", "0"][..],
        &["tags", "vm1", "-r", "0", "add", "manual:x"][..],
    ] {
        refused(&second.client(args), "ABORTED", "held by server");
    }
    assert_eq!(second.revisions("vm1"), server.revisions("vm1"));

    // Distrust the newest: it is no parent of the next push, whose
    // revision still equals the source.
    server.client_ok(&["distrust", "vm1", "-r", "0"]);
    let now = server.revisions("vm1");
    assert_eq!(now[1]["trust"], "distrusted", "{now:?}");
    assert_eq!(now[0]["trust"], revs[0]["trust"]);
    let v3 = push(3);
    let now = server.revisions("vm1");
    assert_eq!(now.len(), 3);
    assert_ne!(
        now[2]["parent_id"], now[1]["id"],
        "a distrusted revision is no parent: {now:?}"
    );
    let snaps = pool.snapshots("vm1");
    assert!(pool.export("vm1", Some(&snaps[2])) == v3);

    // Forget the distrusted one: its snapshot and record go, the others stay.
    let text = server.client_ok(&["forget", "vm1", "-r", &ids[1]]);
    assert!(text.contains(&ids[1]), "{text}");
    let after = server.short_ids("vm1");
    assert_eq!(after, [ids[0].clone(), snaps[2].clone()]);
    assert_eq!(pool.snapshots("vm1"), after, "rbd snap ls: the snapshot is gone");
    let listed = ok(
        pool.rados(&["listomapkeys", "backy.job.vm1"]),
        "rados listomapkeys",
    );
    let listed = String::from_utf8_lossy(&listed);
    assert!(!listed.contains(&ids[1]), "no record left: {listed}");
    assert!(!listed.contains("deleting"), "no journal left: {listed}");
    let target = work.join("restored.img");
    server.client_ok(&["restore", "vm1", "-r", &ids[0], target.to_str().unwrap()]);
    assert!(
        std::fs::read(&target).unwrap() == v1,
        "the older revision restores as before"
    );

    // A protected snapshot (rbd snap protect) is refused whole.
    let protected = format!("{}@{}", pool.spec("vm1"), ids[0]);
    ok(
        pool.tool("rbd", &["snap", "protect", &protected], b""),
        "rbd snap protect",
    );
    let out = server.client(&["forget", "vm1", "-r", "all"]);
    refused(
        &out,
        "FAILED_PRECONDITION",
        "is protected (rbd snap protect); nothing was deleted",
    );
    assert_eq!(pool.snapshots("vm1"), after, "nothing deleted");
    assert_eq!(server.short_ids("vm1"), after);
    ok(
        pool.tool("rbd", &["snap", "unprotect", &protected], b""),
        "rbd snap unprotect",
    );
}

/// Verify on a pool re-reads the snapshot and compares it with the
/// manifest: a clean revision is marked verified; one whose stored digests
/// do not match its data (a manifest rewritten behind backy's back, with
/// its record's manifest digest, so the manifest itself reads as intact)
/// is reported DAMAGED naming the block, exit 1, and is distrusted, as on
/// the filesystem store.
#[test]
fn verify_reads_the_snapshot_and_distrusts_a_revision_whose_digests_do_not_match() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "ver");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let server = Server::start_config(&dir.path().join("backy"), &config(&pool));
    // Data in blocks 0 and 2, a hole in block 1.
    let size = 12 * MIB;
    let src = work.join("src.img");
    make_image(&src, size, &[]);
    write_at(&src, 0, &pattern(1, MIB as usize));
    write_at(&src, 9 * MIB, &pattern(2, MIB as usize));
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let id = server.short_ids("vm1")[0].clone();

    let text = server.client_ok(&["verify", "vm1"]);
    assert!(
        text.contains(&format!("vm1: {id}: OK, 12.00 MiB checked, now verified")),
        "{text}"
    );
    let revs = server.revisions("vm1");
    assert_eq!(revs[0]["trust"], "verified", "{revs:?}");

    // Block 2's digest in the manifest no longer matches its data; the
    // record names the rewritten manifest's digest.
    corrupt_digest(&pool, &work, &id, 2);

    let out = server.client(&["verify", "vm1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "vm1: {id}: DAMAGED: 1 block does not match the manifest (offsets [{}]), now distrusted",
            8 * MIB
        )),
        "{stdout}"
    );
    let revs = server.revisions("vm1");
    assert_eq!(revs[0]["trust"], "distrusted", "{revs:?}");
    assert_eq!(
        pool.snapshots("vm1"),
        std::slice::from_ref(&id),
        "verify removes nothing"
    );

    // The snapshot itself is untouched (only its digests were rewritten).
    assert!(pool.export("vm1", Some(&id)) == std::fs::read(&src).unwrap());
}

/// Rewrites the stored digest of `block` of revision `id` of vm1 (its
/// manifest piece, and the record's manifest digest to match), so the
/// manifest reads as intact and only the block's data disagrees with it.
fn corrupt_digest(pool: &Confined, work: &Path, id: &str, block: u64) {
    use backy_common::manifest::{digest, Manifest};
    let piece = format!("backy.job.vm1@{id}.digests.0");
    let bytes_path = work.join("piece");
    ok(
        pool.rados(&["get", &piece, bytes_path.to_str().unwrap()]),
        "rados get",
    );
    let bytes = std::fs::read(&bytes_path).unwrap();
    let mut manifest = Manifest::decode(&bytes, "piece").unwrap();
    let old = hex::encode(manifest.file_digest());
    manifest.set(block, digest(b"not this block")).unwrap();
    let mut wrong = Vec::new();
    let new = hex::encode(manifest.write_to(&mut wrong).unwrap());
    std::fs::write(&bytes_path, &wrong).unwrap();
    ok(
        pool.rados(&["put", &piece, bytes_path.to_str().unwrap()]),
        "rados put",
    );
    let key = format!("rev.{id}");
    let record_path = work.join("record");
    ok(
        pool.rados(&["getomapval", "backy.job.vm1", &key, record_path.to_str().unwrap()]),
        "rados getomapval",
    );
    let record = std::fs::read_to_string(&record_path).unwrap();
    assert!(record.contains(&old), "{record}");
    let record = record.replace(&old, &new);
    ok(
        pool.tool(
            "rados",
            &[
                "-p",
                "rbd",
                "-N",
                &pool.namespace,
                "setomapval",
                "backy.job.vm1",
                &key,
            ],
            record.as_bytes(),
        ),
        "rados setomapval",
    );
}

/// The background scrub on a pool: the lease holder re-reads its jobs'
/// snapshots (marking a clean revision verified, distrusting one whose
/// digests do not match); a server not holding the job leaves it alone.
#[test]
fn the_scrub_runs_on_the_holder_and_distrusts_a_damaged_revision() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "scr");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let text = config(&pool).replace("jobs:\n", "scrub: {interval: 1s, rate: 256M}\njobs:\n");
    let a = Server::start_config(&dir.path().join("a"), &text);
    let b = Server::start_config(&dir.path().join("b"), &text);
    let src = work.join("src.img");
    make_image(&src, 12 * MIB, &[]);
    write_at(&src, 9 * MIB, &pattern(2, MIB as usize));
    let b_mark = b.log_mark();
    a.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let id = a.short_ids("vm1")[0].clone();
    wait_for(
        "A's scrub to verify the revision",
        std::time::Duration::from_secs(30),
        || a.revisions("vm1")[0]["trust"] == "verified",
    );

    corrupt_digest(&pool, &work, &id, 2);
    wait_for(
        "A's scrub to distrust the revision",
        std::time::Duration::from_secs(30),
        || a.revisions("vm1")[0]["trust"] == "distrusted",
    );
    a.wait_log(
        0,
        "scrub: revision distrusted: 1 block does not match the manifest",
    );
    assert!(
        !b.log_lines(b_mark).iter().any(|l| l.contains("scrub:")),
        "B holds no lease: it scrubs nothing"
    );
    assert!(
        pool.export("vm1", Some(&id)) == std::fs::read(&src).unwrap(),
        "the scrub changes no data"
    );
}

/// Expiry after a commit on a pool, by the schedule's rules (the pure
/// logic the filesystem store uses): a revision whose only tag is outside
/// the schedule loses it at the next commit and is deleted (snapshot,
/// record), one that also carries a `manual:` tag stays; the push's
/// `--json` names what expired.
#[test]
fn expiry_after_a_commit_removes_exactly_what_the_schedule_says() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "exp");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let server = Server::start_config(&dir.path().join("backy"), &scheduled_config(&pool));
    let src = work.join("src.img");
    make_image(&src, 9 * MIB, &[]);
    let push = |n: u64, extra: &[&str]| -> serde_json::Value {
        write_at(&src, n * MIB, &pattern(n, 4096));
        let mut args = vec!["push", "vm1", "--source", src.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&server.client_ok(&args)).unwrap()
    };
    let unscheduled = ["--force", "--tags", "adhoc", "--allow-unscheduled"];
    push(1, &unscheduled);
    let r1 = server.short_ids("vm1")[0].clone();
    // r1 is r2's parent until r2 is committed; then it has no schedule tag
    // left and goes.
    let out = push(2, &[]);
    let r2 = server.short_ids("vm1")[0].clone();
    assert_ne!(r1, r2);
    assert_eq!(out["expired"].as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(server.short_ids("vm1"), std::slice::from_ref(&r2));
    assert_eq!(
        pool.snapshots("vm1"),
        std::slice::from_ref(&r2),
        "rbd snap ls: r1's snapshot is gone"
    );
    let keys = ok(
        pool.rados(&["listomapkeys", "backy.job.vm1"]),
        "rados listomapkeys",
    );
    let keys = String::from_utf8_lossy(&keys);
    assert!(!keys.contains(&r1) && !keys.contains("deleting"), "{keys}");

    // An unscheduled tag with a manual one: the unscheduled one goes at
    // the next commit, the revision stays.
    push(3, &unscheduled);
    let r3 = server.short_ids("vm1")[1].clone();
    server.client_ok(&["tags", "vm1", "-r", &r3, "add", "manual:keep"]);
    // r2 is today's daily: only a forced push runs (with the next slot's
    // tag, daily).
    let out = push(4, &["--force"]);
    assert_eq!(out["expired"], serde_json::json!([]), "{out}");
    let revs = server.revisions("vm1");
    let ids = server.short_ids("vm1");
    assert_eq!(ids.len(), 3, "{revs:?}");
    assert_eq!(ids[..2], [r2.clone(), r3.clone()]);
    assert_eq!(
        tags_of(&revs[1]),
        ["manual:keep"],
        "adhoc expired, manual:keep stays"
    );
    assert_eq!(pool.snapshots("vm1"), ids);
    let target = work.join("restored.img");
    server.client_ok(&["restore", "vm1", target.to_str().unwrap()]);
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&src).unwrap());
}

/// A job under a retention lock on a pool: each revision's record is
/// locked from its time on and its snapshot protected (`rbd snap
/// protect`); expiry keeps a locked revision left without tags, `forget`
/// is refused with the filesystem's line, also through a server started
/// fresh with the lock removed from its config, and `rbd snap rm` by hand
/// is refused by Ceph.
#[test]
fn a_retention_locked_revision_is_protected_and_survives_expiry_forget_and_a_config_edit() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "lck");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let unlocked = scheduled_config(&pool);
    let locked = unlocked.replace("vm1: {schedule: s}", "vm1: {schedule: s, retention-lock: 1h}");
    let mut server = Server::start_config(&dir.path().join("backy"), &locked);
    let src = work.join("src.img");
    make_image(&src, 9 * MIB, &[]);
    let push = |server: &Server, n: u64, extra: &[&str]| -> serde_json::Value {
        write_at(&src, n * MIB, &pattern(n, 4096));
        let mut args = vec!["push", "vm1", "--source", src.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&server.client_ok(&args)).unwrap()
    };
    push(&server, 1, &["--force", "--tags", "adhoc", "--allow-unscheduled"]);
    let out = push(&server, 2, &[]);
    assert_eq!(
        out["expired"],
        serde_json::json!([]),
        "the locked one stays: {out}"
    );
    let revs = server.revisions("vm1");
    let ids = server.short_ids("vm1");
    assert_eq!(ids.len(), 2, "{revs:?}");
    assert!(tags_of(&revs[0]).is_empty(), "kept without tags: {revs:?}");
    assert_eq!(pool.snapshots("vm1"), ids);
    let listed = ok(
        pool.tool("rbd", &["snap", "ls", "--format", "json", &pool.spec("vm1")], b""),
        "rbd snap ls",
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed).unwrap();
    for snap in listed.as_array().unwrap() {
        assert_eq!(snap["protected"], "true", "protected: {listed}");
    }

    let first = format!("{}@{}", pool.spec("vm1"), ids[0]);
    let out = pool.tool("rbd", &["snap", "rm", "--no-progress", &first], b"");
    assert!(!out.status.success(), "rbd snap rm of a protected snapshot fails");
    let out = server.client(&["forget", "vm1", "-r", &ids[0]]);
    refused(
        &out,
        "FAILED_PRECONDITION",
        "(retention-lock); nothing was deleted",
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is locked until"));
    assert_eq!(pool.snapshots("vm1"), ids);

    // The lock lives in the record: a server started with the lock removed
    // from its config refuses the same.
    server.terminate();
    let second = Server::start_config(&dir.path().join("backy2"), &unlocked);
    let out = second.client(&["forget", "vm1", "-r", "all"]);
    refused(
        &out,
        "FAILED_PRECONDITION",
        "(retention-lock); nothing was deleted",
    );
    assert_eq!(second.short_ids("vm1"), ids);
    assert_eq!(pool.snapshots("vm1"), ids);
    for id in &ids {
        let spec = format!("{}@{id}", pool.spec("vm1"));
        ok(
            pool.tool("rbd", &["snap", "unprotect", &spec], b""),
            "rbd snap unprotect",
        );
    }
}
