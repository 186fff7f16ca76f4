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
//! - an operation not supported on a pool yet (a rollback) is refused
//!   with one line naming it, FAILED_PRECONDITION, and changes nothing;
//! - the first server holds the job's lease: a push through the second is
//!   refused naming the holder; stopped (SIGTERM), the first releases it
//!   and the second pushes at once;
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
//!   whose stored digests do not match its data;
//! - expiry after a commit removes exactly what the schedule says;
//! - a retention-locked revision's snapshot is protected, and it survives
//!   expiry, forget and a config without the lock.

mod confined;
mod support;

use confined::{ceph_conf, ok, Confined};
use std::path::Path;
use support::*;

const MIB: u64 = 1 << 20;

fn config(conf: &Path, pool: &Confined) -> String {
    format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nstore:\n  type: ceph-rbd\n  conf: {}\n  id: {}\n  keyring: {}\n  pool: rbd\n  namespace: {}\njobs:\n  vm1: {{schedule: none}}\n",
        conf.display(),
        pool.id,
        pool.keyring.display(),
        pool.namespace
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
    let server = Server::start_config(&base, &config(&conf, &pool));

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
    let second = Server::start_config(&base2, &config(&conf, &pool));
    assert_eq!(second.revisions("vm1"), revs);
    let target = work.join("restored-second.img");
    second.client_ok(&["restore", "vm1", "-r", "1", target.to_str().unwrap()]);
    assert!(
        std::fs::read(&target).unwrap() == v1,
        "restore through the second server"
    );
    let all = second.client_ok(&["status", "--json"]);
    assert!(all.contains("\"vm1\""), "status of every job names vm1: {all}");

    // Not supported on a pool yet: refused, one line, nothing changed. A
    // rollback: the existing target of the revision's size, --force.
    let rollback = work.join("rollback.img");
    std::fs::write(&rollback, &v2).unwrap();
    let out = server.client(&["restore", "vm1", "-r", "1", "--force", rollback.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The client says first what it is about to do; then one error line.
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    assert!(
        lines[0].contains("a rollback (granules) is not supported on a ceph-rbd store yet"),
        "{stderr}"
    );
    assert!(lines[0].ends_with("(FAILED_PRECONDITION)"), "{stderr}");
    assert!(std::fs::read(&rollback).unwrap() == v2, "the target is untouched");
    assert_eq!(server.revisions("vm1"), revs);
    assert_eq!(pool.snapshots("vm1"), snaps);

    // The first server holds vm1's lease: a push through the second is
    // refused naming the holder, and changes nothing.
    write_at(&src, 100, &pattern(5, 4096));
    let v3 = std::fs::read(&src).unwrap();
    let out = second.client(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("held by server"), "{stderr}");
    assert!(stderr.contains("(ABORTED)"), "{stderr}");
    assert_eq!(pool.snapshots("vm1"), snaps);
    assert_eq!(second.revisions("vm1"), revs);

    // Stopped, the first server releases the lease: the second takes it at
    // once (not after the lease's 30 s) and pushes incrementally.
    let mut server = server;
    server.terminate();
    second.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let now = second.revisions("vm1");
    assert_eq!(now.len(), 3, "{now:?}");
    assert_eq!(now[2]["parent_id"], revs[1]["id"]);
    let snaps = pool.snapshots("vm1");
    assert!(
        pool.export("vm1", Some(&snaps[2])) == v3,
        "rbd export of the third snapshot equals v3"
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
                &snaps[2],
                &format!("rbd/{}/vm1", pool.namespace),
            ],
            b"",
        ),
        "rbd diff",
    );
    assert!(!head.is_empty(), "the dead push wrote into the head");
    second.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let after = second.revisions("vm1");
    assert_eq!(after.len(), 4, "{after:?}");
    assert!(after[3]["parent_id"].is_null(), "planned full: {after:?}");
    let snaps = pool.snapshots("vm1");
    assert!(
        pool.export("vm1", Some(&snaps[3])) == v4,
        "rbd export after the dead push equals v4"
    );
    assert!(
        pool.export("vm1", Some(&snaps[2])) == v3,
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

/// A job on a schedule (tags are checked against it) on the pool.
fn scheduled_config(conf: &Path, pool: &Confined) -> String {
    config(conf, pool).replace(
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
    let server = Server::start_config(&dir.path().join("backy"), &scheduled_config(&conf, &pool));
    let size = 9 * MIB;
    let src = work.join("src.img");
    make_image(&src, size, &[]);
    let push = |n: u64| {
        write_at(&src, n * MIB, &pattern(n, 4096));
        server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
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
    let second = Server::start_config(&dir.path().join("backy2"), &scheduled_config(&conf, &pool));
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
    use backy_common::manifest::{digest, Manifest};
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "ver");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let server = Server::start_config(&dir.path().join("backy"), &config(&conf, &pool));
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
    let piece = format!("backy.job.vm1@{id}.digests.0");
    let bytes_path = work.join("piece");
    ok(
        pool.rados(&["get", &piece, bytes_path.to_str().unwrap()]),
        "rados get",
    );
    let bytes = std::fs::read(&bytes_path).unwrap();
    let mut manifest = Manifest::decode(&bytes, "piece").unwrap();
    let old = hex::encode(manifest.file_digest());
    manifest.set(2, digest(b"not block 2")).unwrap();
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
    let server = Server::start_config(&dir.path().join("backy"), &scheduled_config(&conf, &pool));
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
    let out = push(4, &[]);
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
    let unlocked = scheduled_config(&conf, &pool);
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
