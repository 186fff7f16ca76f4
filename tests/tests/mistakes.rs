//! Operator mistakes end to end, on btrfs with real server and client
//! processes: each either refuses loudly and changes nothing, or keeps the
//! data (issue "No backup is ever lost by a mistake").

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use support::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command failed with exit 1 and one line naming `code` and `needle`.
fn refused(out: &Output, code: &str, needle: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "must fail: {err}{}", stdout(out));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(code) && err.contains(needle),
        "want {code} and {needle:?}: {err}"
    );
    err
}

/// Restores `spec` of `job` to a new file and returns its hash.
fn restored_hash(server: &Server, dir: &Path, job: &str, spec: &str) -> String {
    let target = dir.join(format!("restored-{}.img", uuid::Uuid::new_v4().simple()));
    server.client_ok(&["restore", job, "-r", spec, target.to_str().unwrap()]);
    let hash = file_hash(&target);
    std::fs::remove_file(&target).unwrap();
    hash
}

/// `backy-server --config CONFIG ARGS...`.
fn server_cmd(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("backy-server"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("running backy-server")
}

const DAILY: &str = "
listen: 127.0.0.1:0
base-dir: BASE
schedules:
  s: {daily: {interval: 1d, keep: 3}}
jobs:
  vm1: {schedule: s, source: {type: file, path: IMG}}
";

/// Items 1 and 2: tags outside the schedule are refused by push and tags
/// (naming the schedule's tags) unless the operator insists; a revision is
/// never committed only to be expired; no revision is left untagged; dry
/// runs change nothing.
#[test]
fn unscheduled_tags_are_refused_and_nothing_committed_is_expired() {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let img = fs.mount.join("vm1.img");
    make_image(&img, 16 * MIB, &[(0, 2 * MIB), (9 * MIB, MIB)]);
    let server = Server::start_config(
        &fs.mount.join("base"),
        &DAILY.replace("IMG", img.to_str().unwrap()),
    );
    server.client_ok(&["push", "vm1"]);
    let first = server.revisions("vm1");
    assert_eq!(first.len(), 1);

    // Item 1: refused, nothing pushed or expired.
    let before = server.snapshot_tree();
    let out = server.client(&["push", "vm1", "--force", "--tags", "pre-upgrade", "--json"]);
    refused(
        &out,
        "INVALID_ARGUMENT",
        "tag pre-upgrade not in the job's schedule (daily)",
    );
    assert!(stderr(&out).contains("--allow-unscheduled"), "{}", stderr(&out));
    assert_eq!(server.snapshot_tree(), before, "a refused push changes nothing");

    // Insisting keeps it: committed, nothing expired, restorable by its tag.
    write_at(&img, 12 * MIB, &pattern(1, 4096));
    let text = server.client_ok(&[
        "push",
        "vm1",
        "--force",
        "--tags",
        "pre-upgrade",
        "--allow-unscheduled",
        "--json",
    ]);
    let pushed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(pushed["expired"], serde_json::json!([]), "{pushed}");
    let pre = pushed["revision"]["id"].as_str().unwrap().to_string();
    assert_eq!(server.short_ids("vm1").last(), Some(&pre));
    assert_eq!(
        restored_hash(&server, &fs.mount, "vm1", "pre-upgrade"),
        file_hash(&img)
    );

    // Item 2: tags outside the schedule, or none at all, are refused.
    let before = server.snapshot_tree();
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
    // Dry runs answer and change nothing.
    let text = server.client_ok(&["tags", "vm1", "-r", "1", "add", "manual:keep", "--dry-run"]);
    assert!(
        text.contains("would tag") && text.contains("daily,manual:keep"),
        "{text}"
    );
    let text = server.client_ok(&["forget", "vm1", "-r", "all", "--dry-run"]);
    assert_eq!(text.matches("would forget").count(), 2, "{text}");
    let text = server.client_ok(&["distrust", "vm1", "-r", "0", "--dry-run"]);
    assert!(
        text.contains("would distrust") && text.contains("dry run"),
        "{text}"
    );
    assert_eq!(
        server.snapshot_tree(),
        before,
        "refusals and dry runs change nothing"
    );

    // The expiry at start (and every periodic one) leaves the unscheduled
    // tag alone: only the expiry after a commit strips it.
    let mut server = server;
    server.restart();
    assert_eq!(server.short_ids("vm1").len(), 2);
    assert_eq!(
        Vec::from_iter(tags_of(&server.revisions("vm1")[1])),
        ["pre-upgrade"]
    );

    // The next backup's expiry removes it, says why, and keeps the new one.
    let mark = server.log_mark();
    let text = server.client_ok(&["push", "vm1", "--force", "--json"]);
    let pushed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(pushed["expired"].as_array().unwrap().len(), 1, "{pushed}");
    let line = server.wait_log(mark, "expiry: deleted revision");
    assert!(line.contains("pre-upgrade is not in the schedule"), "{line}");
    assert!(!server.short_ids("vm1").contains(&pre));
}

/// Item 3: a schedule whose tag is renamed, plus a restart and a reload,
/// deletes nothing until a backup under the new name has committed; the
/// dry run shows what that backup's expiry will do.
#[test]
fn a_renamed_schedule_deletes_nothing_before_a_new_backup() {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let img = fs.mount.join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let config = DAILY.replace("IMG", img.to_str().unwrap());
    let mut server = Server::start_config(&fs.mount.join("base"), &config);
    server.client_ok(&["push", "vm1"]);
    for i in 0..2u64 {
        write_at(&img, i * 4096, &pattern(i + 10, 4096));
        server.client_ok(&["push", "vm1", "--force"]);
    }
    let before = server.short_ids("vm1");
    assert_eq!(before.len(), 3);
    let hashes: Vec<String> = before
        .iter()
        .map(|id| file_hash(&server.base.join("vm1").join(id)))
        .collect();

    // daily -> nightly, then a restart (expiry at start) and a reload.
    let renamed = std::fs::read_to_string(&server.config_path)
        .unwrap()
        .replace("daily:", "nightly:");
    std::fs::write(&server.config_path, &renamed).unwrap();
    server.restart();
    let mark = server.log_mark();
    server.hup();
    server.wait_log(mark, "reloaded");
    assert_eq!(
        server.short_ids("vm1"),
        before,
        "nothing deleted by a config change"
    );
    for (id, hash) in before.iter().zip(&hashes) {
        assert_eq!(&file_hash(&server.base.join("vm1").join(id)), hash);
    }

    // The dry run names the pending tags and what the next backup's expiry
    // deletes; it changes nothing.
    let tree = server.snapshot_tree();
    let out = server_cmd(&server.config_path, &["expire", "--dry-run", "vm1"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("next periodic expiry: deletes nothing"), "{text}");
    assert!(
        text.contains("tags outside the schedule (daily) on 3 revisions"),
        "{text}"
    );
    assert!(
        text.contains("after the next backup (tags nightly): deletes 3"),
        "{text}"
    );
    assert_eq!(text.matches("daily is not in the schedule").count(), 3, "{text}");
    assert_eq!(server.snapshot_tree(), tree);

    // The first backup under the new name commits, then the old ones go.
    let text = server.client_ok(&["push", "vm1", "--force", "--json"]);
    let pushed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(pushed["expired"].as_array().unwrap().len(), 3, "{pushed}");
    let after = server.revisions("vm1");
    assert_eq!(after.len(), 1);
    assert_eq!(Vec::from_iter(tags_of(&after[0])), ["nightly"]);
    assert_eq!(
        restored_hash(&server, &fs.mount, "vm1", "latest"),
        file_hash(&img)
    );
}

/// Item 4: `schedule:` is required; `schedule: none` means manual pushes
/// only, nothing expires, and `check` says so; a job never backed up is
/// CRITICAL once past its first SLA window.
#[test]
fn every_job_has_a_schedule_or_says_none() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let missing = dir.path().join("missing.yaml");
    std::fs::write(
        &missing,
        format!(
            "base-dir: {}\ninsecure-plaintext: true\njobs:\n  vm1: {{}}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = server_cmd(&missing, &["check-config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("missing field `schedule`") && stderr(&out).contains("schedule: none"),
        "{}",
        stderr(&out)
    );

    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nschedules:\n  fast: {{often: {{interval: 1s, keep: 1}}}}\n\
         jobs:\n  manual: {{schedule: none, source: {{type: file, path: {img}}}}}\n  \
         orphan: {{schedule: fast, client: nobody}}\n",
        img = img.display()
    );
    let server = Server::start_config(&dir.path().join("store"), &config);
    let check = |job: &str| {
        let out = server.client(&["check", job]);
        (out.status.code(), stdout(&out))
    };
    let (code, text) = check("manual");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("manual: no schedule and never backed up"), "{text}");
    // A push of a job without schedule always runs; nothing expires.
    server.client_ok(&["push", "manual"]);
    server.client_ok(&["push", "manual"]);
    assert_eq!(server.short_ids("manual").len(), 2);
    let (code, text) = check("manual");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("1 job without schedule (manual pushes only)"),
        "{text}"
    );
    let human = server.client_ok(&["status", "manual"]);
    assert!(human.contains("schedule: none (manual pushes only"), "{human}");
    let out = server_cmd(&server.config_path, &["expire", "--dry-run"]);
    assert!(
        stdout(&out).contains("manual: no schedule: nothing expires"),
        "{}",
        stdout(&out)
    );

    // The orphan has one SLA window (1.5 s) from when the server first
    // knew it, then is CRITICAL.
    let mut last = String::new();
    wait_for("the orphan to turn CRITICAL", Duration::from_secs(20), || {
        let (code, text) = check("orphan");
        last = text;
        code == Some(2)
    });
    assert!(last.contains("orphan: no backup yet"), "{last}");
}

/// Item 5: a source smaller than the last revision is refused unless the
/// operator says --allow-shrink; a 0-byte source always; refusals count as
/// failed pushes.
#[test]
fn a_shrunken_source_is_refused() {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let img = fs.mount.join("vm1.img");
    make_image(&img, 32 * MIB, &[(0, MIB), (20 * MIB, MIB)]);
    let server = Server::start(&fs.mount.join("base"), "  vm1: {schedule: none}\n");
    let src = img.to_str().unwrap();
    server.client_ok(&["push", "vm1", "--source", src]);

    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let before = server.snapshot_tree();
    let out = server.client(&["push", "vm1", "--source", src]);
    refused(&out, "FAILED_PRECONDITION", "--allow-shrink");
    assert!(
        stderr(&out).contains("16.00 MiB") && stderr(&out).contains("32.00 MiB"),
        "{}",
        stderr(&out)
    );
    assert_eq!(server.snapshot_tree(), before);
    assert_eq!(server.status_json("vm1")["jobs"][0]["failures"], 1);

    std::fs::File::create(&img).unwrap();
    let out = server.client(&["push", "vm1", "--source", src, "--allow-shrink"]);
    refused(&out, "INVALID_ARGUMENT", "the source is empty (0 bytes)");
    assert_eq!(server.snapshot_tree(), before);

    make_image(&img, 16 * MIB, &[(MIB, MIB)]);
    server.client_ok(&["push", "vm1", "--source", src, "--allow-shrink"]);
    let revs = server.revisions("vm1");
    assert_eq!(revs.len(), 2);
    assert_eq!(revs[1]["size"], 16 * MIB);
    assert_eq!(
        restored_hash(&server, &fs.mount, "vm1", "latest"),
        file_hash(&img)
    );
    assert_eq!(server.status_json("vm1")["jobs"][0]["failures"], 0);
}

/// Items 6 and 7: a device that holds data needs --force; one in use is
/// refused; a mistyped /dev path is never created as a file; README's dd
/// recipe for devices restores exactly (no conv=sparse leaving old data).
#[test]
fn restores_onto_devices_need_force_and_never_create_files_in_dev() {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let img = fs.mount.join("vm1.img");
    make_image(&img, 16 * MIB, &[(0, MIB), (8 * MIB, MIB)]);
    let server = Server::start(&fs.mount.join("base"), "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", img.to_str().unwrap()]);

    // A device with old data everywhere.
    let disk = fs.mount.join("disk.raw");
    std::fs::write(&disk, pattern(7, (16 * MIB) as usize)).unwrap();
    let old = file_hash(&disk);
    let dev = LoopDev::attach(&disk);
    let out = server.client(&["restore", "vm1", dev.path()]);
    refused(&out, dev.path(), "holds data: give --force");
    assert_eq!(file_hash(&disk), old, "refused: the device is untouched");
    server.client_ok(&["restore", "vm1", dev.path(), "--force"]);
    assert_eq!(file_hash(&disk), file_hash(&img));

    // An all-zero device needs no --force.
    let blank = fs.mount.join("blank.raw");
    std::fs::File::create(&blank).unwrap().set_len(16 * MIB).unwrap();
    let blank_dev = LoopDev::attach(&blank);
    server.client_ok(&["restore", "vm1", blank_dev.path()]);
    assert_eq!(file_hash(&blank), file_hash(&img));

    // A mounted device is refused even with --force.
    let out = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE"])
        .arg(&fs.mount)
        .output()
        .unwrap();
    let mounted = stdout(&out).trim().to_string();
    assert!(mounted.starts_with("/dev/loop"), "{mounted}");
    let out = server.client(&["restore", "vm1", &mounted, "--force"]);
    refused(&out, "in use", "not restoring onto it");

    // A mistyped device path: an error, and no file appears in /dev.
    let typo = format!("/dev/backy-test-{}", uuid::Uuid::new_v4().simple());
    let out = server.client(&["restore", "vm1", &typo]);
    refused(&out, &typo, "does not exist");
    assert!(!Path::new(&typo).exists());

    // README's dd recipe for a device, run as written, leaves no old data.
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let recipe = readme
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("dd if=latest of=/dev/"))
        .expect("README gives a dd recipe for a device");
    assert!(!recipe.contains("conv=sparse"), "{recipe}");
    std::fs::write(&disk, pattern(8, (16 * MIB) as usize)).unwrap();
    let target = recipe
        .split_whitespace()
        .find_map(|w| w.strip_prefix("of="))
        .unwrap();
    let cmd = recipe.replace(target, dev.path());
    let out = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .current_dir(server.base.join("vm1"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{cmd}: {}", stderr(&out));
    assert_eq!(file_hash(&disk), file_hash(&img), "{cmd} restores exactly");
}

/// Item 8: a late failure (after the commit or after a change applied)
/// never fails the call; a failure before a change applies changes nothing.
#[test]
fn late_failures_never_fail_what_was_done() {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let img = fs.mount.join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let mut server = Server::start_config(
        &fs.mount.join("base"),
        &DAILY.replace("IMG", img.to_str().unwrap()),
    );
    server.client_ok(&["push", "vm1"]);
    server.client_ok(&["push", "vm1", "--force"]);

    server.restart_with_env(&[("BACKY_FAULT", "error:push.after-commit")]);
    let mark = server.log_mark();
    server.client_ok(&["push", "vm1", "--force"]);
    assert!(server
        .wait_log(mark, "after the commit")
        .contains("injected fault"));
    assert_eq!(server.short_ids("vm1").len(), 3, "committed and kept");
    assert_eq!(server.status_json("vm1")["jobs"][0]["failures"], 0);

    server.restart_with_env(&[("BACKY_FAULT", "error:tags.applied")]);
    server.client_ok(&["tags", "vm1", "-r", "0", "add", "manual:a"]);
    assert_eq!(
        Vec::from_iter(tags_of(&server.revisions("vm1")[2])),
        ["daily", "manual:a"]
    );

    server.restart_with_env(&[("BACKY_FAULT", "error:distrust.applied")]);
    server.client_ok(&["distrust", "vm1", "-r", "1"]);
    assert_eq!(server.revisions("vm1")[1]["trust"], "distrusted");

    server.restart_with_env(&[("BACKY_FAULT", "error:forget.applied")]);
    let victim = server.short_ids("vm1")[0].clone();
    server.client_ok(&["forget", "vm1", "-r", &victim]);
    assert!(!server.short_ids("vm1").contains(&victim));

    // Failing before the rename: nothing changes, the error says so.
    server.restart_with_env(&[("BACKY_FAULT", "error:durable.staged")]);
    let before = server.snapshot_tree();
    let out = server.client(&["tags", "vm1", "-r", "all", "add", "manual:b"]);
    refused(&out, "INTERNAL", "injected fault at durable.staged");
    assert_eq!(server.snapshot_tree(), before);

    // The data files of the forgotten revision are gone by the next start.
    server.restart();
    assert!(!server.base.join("vm1").join(&victim).exists());
}

/// Item 9: a push that fails on the client (missing source, failing hook)
/// is counted by the server: status, check and backoff see it.
#[test]
fn client_side_failures_reach_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let jobs = format!(
        "  vm1: {{schedule: none}}\n  vm2: {{schedule: none, source: {{type: file, path: {}, \
         hooks: {{pre-snapshot: 'echo no snapshot today >&2; exit 3'}}}}}}\n",
        img.display()
    );
    let server = Server::start(&dir.path().join("store"), &jobs);
    let out = server.client(&["push", "vm1", "--source", "/nonexistent/vm1.img"]);
    assert_eq!(out.status.code(), Some(1));
    let job = &server.status_json("vm1")["jobs"][0];
    assert_eq!(job["failures"], 1, "{job}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/vm1.img"),
        "{job}"
    );

    let out = server.client(&["push", "vm2"]);
    assert_eq!(out.status.code(), Some(1));
    let job = &server.status_json("vm2")["jobs"][0];
    assert_eq!(job["failures"], 1, "{job}");
    assert!(
        job["last_error"].as_str().unwrap().contains("pre-snapshot"),
        "{job}"
    );
    let check = server.client(&["check"]);
    assert_eq!(check.status.code(), Some(1), "{}", stdout(&check));
    assert!(
        stdout(&check).contains("vm2: 1 failed push in a row"),
        "{}",
        stdout(&check)
    );

    server.client_ok(&["push", "vm1", "--source", img.to_str().unwrap()]);
    assert_eq!(server.status_json("vm1")["jobs"][0]["failures"], 0);
}

/// Issue 27 item 8: a push whose reply is lost after the commit fails on
/// the client, which reports the failure; the server, which committed the
/// revision, ignores the report (and logs why): no failure counted, `check`
/// clean, no backoff.
#[test]
fn a_failure_report_for_a_committed_revision_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let mut server = Server::start(&dir.path().join("store"), "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", img.to_str().unwrap()]);

    server.restart_with_env(&[("BACKY_FAULT", "mode:lose-reply")]);
    let mark = server.log_mark();
    let out = server.client(&["push", "vm1", "--force", "--source", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("reply to a committed push is lost"),
        "{}",
        stderr(&out)
    );
    let ids = server.short_ids("vm1");
    assert_eq!(ids.len(), 2, "the second push committed");
    // The client reported before it exited.
    let job = &server.status_json("vm1")["jobs"][0];
    assert_eq!(job["failures"], 0, "{job}");
    assert!(job["last_error"].is_null(), "{job}");
    let line = server.wait_log(mark, "failure report");
    assert!(line.contains(&ids[1]) && line.contains("committed"), "{line}");
    let check = server.client(&["check", "vm1"]);
    assert_eq!(check.status.code(), Some(0), "{}", stdout(&check));

    // A report for a revision that never committed still counts.
    server.restart();
    let out = server.client(&["push", "vm1", "--force", "--source", "/nonexistent/vm1.img"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(server.status_json("vm1")["jobs"][0]["failures"], 1);
}

/// Issue 27 item 10: the device guard looks at the target's canonical
/// path: a relative name typed in /dev (or reached through a symlink to
/// /dev) that does not exist is refused, and nothing is created.
#[test]
fn a_relative_target_in_dev_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let server = Server::start(&dir.path().join("store"), "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", img.to_str().unwrap()]);
    std::os::unix::fs::symlink("/dev", dir.path().join("devlink")).unwrap();

    let name = format!("backy-test-{}", uuid::Uuid::new_v4().simple());
    let via_link = format!("devlink/{name}");
    for (cwd, target) in [
        (Path::new("/dev"), name.as_str()),
        (dir.path(), via_link.as_str()),
    ] {
        let out = Command::new(bin("backy-client"))
            .current_dir(cwd)
            .arg("--server")
            .arg(&server.url)
            .arg("--config")
            .arg(&server.client_config)
            .args(["restore", "vm1", target])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        refused(&out, &format!("/dev/{name}"), "does not exist");
        let leftovers: Vec<_> = std::fs::read_dir("/dev")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(&name))
            .collect();
        assert_eq!(leftovers, Vec::<String>::new(), "in {}: {target}", cwd.display());
    }
}
