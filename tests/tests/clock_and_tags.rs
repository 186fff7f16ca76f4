//! Issue 27, items 6, 7 and 9 end to end: a revision dated after the
//! server's clock is named by `status` and `check` and does not stop the
//! job; a short schedule tag added by a reload falls due at once; tags a
//! revision spec would misread are refused, and `check-config` names
//! stored ones.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

/// Rewrites one field line (`timestamp: ...`, `tags:` and its list) of a
/// stored `.rev`, as an older server or a stepped clock could have left it.
fn edit_rev(base: &Path, job: &str, id: &str, edit: impl FnOnce(&str) -> String) {
    let path = base.join(job).join(format!("{id}.rev"));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(&text)).unwrap();
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_revision_dated_in_the_future_is_named_and_does_not_stop_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let config = "
listen: 127.0.0.1:0
base-dir: BASE
schedules:
  s: {often: {interval: 4s, keep: 3}}
jobs:
  vm1: {schedule: s, source: {type: file, path: IMG}}
"
    .replace("IMG", img.to_str().unwrap());
    let mut server = Server::start_config(&base, &config);
    server.client_ok(&["push", "vm1"]);
    let id = server.short_ids("vm1")[0].clone();

    // The clock was an hour ahead when it was made: dated in the future.
    server.kill();
    let ahead = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    edit_rev(&base, "vm1", &id, |text| {
        text.lines()
            .map(|l| {
                if l.starts_with("timestamp:") {
                    format!("timestamp: {ahead}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    });
    let mark = server.log_mark();
    server.restart();

    let status = server.status_json("vm1");
    assert_eq!(
        status["jobs"][0]["future_revisions"],
        serde_json::json!([id]),
        "{status}"
    );
    let human = server.client_ok(&["status", "vm1"]);
    assert!(
        human.contains(&format!("warning: dated after the server's clock: {id}")),
        "{human}"
    );
    let check = server.client(&["check", "vm1"]);
    assert_eq!(check.status.code(), Some(1), "WARNING: {}", stdout(&check));
    assert!(
        stdout(&check).starts_with(&format!(
            "BACKY WARNING: vm1: 1 revision dated after the server's clock ({id}), counted as dated when found"
        )),
        "{}",
        stdout(&check)
    );
    let warned = server.wait_log(mark, "revision dated after the server's clock");
    assert!(warned.contains(&id), "{warned}");

    // Counted as dated when found (at start): due again within its 4 s
    // interval, not an hour later.
    let next_due = status["jobs"][0]["next_due"].as_str().unwrap();
    let next_due = chrono::DateTime::parse_from_rfc3339(next_due).unwrap();
    assert!(
        next_due <= chrono::Utc::now() + chrono::Duration::seconds(4),
        "next due {next_due}: {status}"
    );
    wait_for(
        "a push due after the future-dated revision",
        Duration::from_secs(20),
        || {
            server.client_ok(&["push", "vm1"]);
            server.short_ids("vm1").len() == 2
        },
    );
}

#[test]
fn a_minutely_tag_added_by_a_reload_falls_due_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let config = "
listen: 127.0.0.1:0
base-dir: BASE
schedules:
  quick: {daily: {interval: 1d, keep: 3}}
jobs:
  vm1: {schedule: quick, source: {type: file, path: IMG}}
"
    .replace("IMG", img.to_str().unwrap());
    let server = Server::start_config(&base, &config);
    server.client_ok(&["push", "vm1"]);
    let text = std::fs::read_to_string(&server.config_path)
        .unwrap()
        .replace("daily:", "minutely: {interval: 1m, keep: 5}\n    daily:");
    assert!(text.contains("minutely"), "{text}");
    std::fs::write(&server.config_path, text).unwrap();
    let mark = server.log_mark();
    server.hup();
    server.wait_log(mark, "reload");

    // Before: "not due ... missed minutely join the slot ... less than 5
    // minutes away", at every look.
    let out = server.client_ok(&["push", "vm1", "-v"]);
    let revs = server.revisions("vm1");
    assert_eq!(revs.len(), 2, "due at once: {out}");
    assert_eq!(tags_of(&revs[1]), ["minutely".to_string()].into());
    // And not again before its next slot.
    let status = server.status_json("vm1");
    assert_eq!(
        status["jobs"][0]["next_tags"],
        serde_json::json!(["minutely"]),
        "{status}"
    );
}

#[test]
fn tags_that_specs_misread_are_refused_and_check_config_names_stored_ones() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let config = "
listen: 127.0.0.1:0
base-dir: BASE
schedules:
  s: {daily: {interval: 1d, keep: 3}}
jobs:
  vm1: {schedule: s, source: {type: file, path: IMG}}
"
    .replace("IMG", img.to_str().unwrap());
    let mut server = Server::start_config(&base, &config);
    server.client_ok(&["push", "vm1"]);
    let id = server.short_ids("vm1")[0].clone();

    for (tag, read_as) in [
        ("1", "revision number 1"),
        ("all", "every revision"),
        ("last", "the newest revision"),
    ] {
        let out = server.client(&["tags", "vm1", "-r", "latest", "add", tag, "--allow-unscheduled"]);
        assert_eq!(out.status.code(), Some(1), "{tag}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "tag \"{tag}\" cannot be used: revision specs read it as {read_as}"
            )),
            "{tag}: {}",
            stderr(&out)
        );
        let out = server.client(&["push", "vm1", "--force", "--tags", tag, "--allow-unscheduled"]);
        assert_eq!(out.status.code(), Some(1), "{tag}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("revision specs read it as"),
            "{tag}: {}",
            stderr(&out)
        );
    }
    assert_eq!(server.short_ids("vm1"), std::slice::from_ref(&id));

    // A store from before the rule: check-config names the tag, as a
    // warning; the revision stays usable and the tag can be removed.
    server.kill();
    edit_rev(&base, "vm1", &id, |text| {
        text.replace("tags:\n", "tags:\n- '1'\n")
    });
    let check_config = |path: &Path| {
        Command::new(bin("backy-server"))
            .args(["--config", path.to_str().unwrap(), "check-config"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = check_config(&server.config_path);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "warning: job vm1, revision {id}: tag \"1\" cannot be used: revision specs read it as revision number 1"
        )),
        "{}",
        stderr(&out)
    );
    server.restart();
    assert_eq!(
        tags_of(&server.revisions("vm1")[0]),
        ["1".to_string(), "daily".to_string()].into()
    );
    server.client_ok(&["tags", "vm1", "-r", &id, "remove", "1"]);
    assert_eq!(tags_of(&server.revisions("vm1")[0]), ["daily".to_string()].into());

    // A schedule tag specs misread is refused at load.
    let text = std::fs::read_to_string(&server.config_path)
        .unwrap()
        .replace("daily:", "'7':");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, text).unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = check_config(&bad);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("tag \"7\" cannot be used: revision specs read it as revision number 7"),
        "{}",
        stderr(&out)
    );
}
