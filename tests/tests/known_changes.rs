//! `push --changed-ranges FILE` end to end on btrfs: only the named bytes
//! of the blocks they touch travel, the revision equals the source, and a
//! range list that misses a write or does not parse commits nothing.

mod support;

use std::path::Path;
use support::*;

/// The granule the client rounds ranges to (the smallest block size).
const GRANULE: u64 = 64 << 10;

fn write_ranges(path: &Path, ranges: &[(u64, u64)]) {
    let mut text = String::from("# offset length\n");
    for (offset, len) in ranges {
        text.push_str(&format!("{offset} {len}\n"));
    }
    std::fs::write(path, text).unwrap();
}

fn push_ranges(server: &Server, src: &Path, ranges: &Path) -> std::process::Output {
    server.client(&[
        "--json",
        "push",
        "vm1",
        "--source",
        src.to_str().unwrap(),
        "--changed-ranges",
        ranges.to_str().unwrap(),
    ])
}

#[test]
fn only_the_named_bytes_travel_and_a_short_list_commits_nothing() {
    let fs = LoopFs::new("btrfs", 2 << 30);
    let base = fs.mount.join("backy");
    let work = fs.mount.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let src = work.join("vm1.img");
    make_image(&src, 256 * MIB + 4096, &[(0, 40 * MIB), (100 * MIB, 60 * MIB)]);
    let server = Server::start(&base, "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    // Writes inside data, across a block boundary, into a hole, and the
    // last bytes; a whole granule zeroed over data.
    let writes: &[(u64, u64)] = &[
        (3 * MIB + 100, 4096),
        (2 * BLOCK - 1000, 3000),
        (80 * MIB, 10),
        (256 * MIB + 4000, 96),
    ];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        write_at(&src, offset, &pattern(i as u64 + 50, len as usize));
    }
    write_at(&src, 120 * MIB, &[0; GRANULE as usize]);
    let mut ranges = writes.to_vec();
    ranges.push((120 * MIB, GRANULE));
    let list = work.join("ranges");
    write_ranges(&list, &ranges);
    let out = push_ranges(&server, &src, &list);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Whole granules of data: one each for the first and third write, two
    // for the one across blocks, the last one cut at the image's end; the
    // zeroed granule travels as a zero range.
    assert_eq!(pushed["bytes_sent"].as_u64(), Some(4 * GRANULE + 4096));
    // Only the touched blocks were read.
    assert_eq!(pushed["bytes_read"].as_u64(), Some(5 * BLOCK + 4096));
    let revs = server.revisions("vm1");
    assert_eq!(revs.len(), 2);
    let stored = base.join("vm1").join(revs[1]["id"].as_str().unwrap());
    assert_eq!(file_hash(&stored), file_hash(&src), "the revision is the source");
    server.client_ok(&["verify", "vm1", "-r", "all"]);

    // A write the list does not name, in a block it touches: the client
    // reads that block whole, the server patches only the named granule,
    // their digests differ, and nothing is committed. (A missed write in
    // a block the list does not touch is found only by the audit's sample:
    // see the next test.)
    write_at(&src, 10 * MIB, &pattern(77, 4096));
    write_at(&src, 11 * MIB, &pattern(78, 4096));
    write_ranges(&list, &[(10 * MIB, 4096)]);
    let before = server.snapshot_tree();
    let out = push_ranges(&server, &src, &list);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not name every byte written since the parent revision")
            && err.contains("DATA_LOSS"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one-line reason: {err}");
    wait_for(".partial cleaned", std::time::Duration::from_secs(20), || {
        std::fs::read_dir(base.join("vm1/.partial")).unwrap().count() == 0
    });
    assert_eq!(server.revisions("vm1").len(), 2, "nothing committed");

    // A list that does not parse is refused before anything is sent.
    std::fs::write(&list, "0 4096\n12 x\n").unwrap();
    let out = push_ranges(&server, &src, &list);
    assert_eq!(out.status.code(), Some(1));
    // Pushed with --json: the failure is a JSON document on stderr.
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).expect("a JSON failure");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("line 2") && message.contains("\"x\""), "{err}");
    assert_eq!(
        server.snapshot_tree(),
        before,
        "refused pushes change nothing stored"
    );

    // Without the list the push scans everything and catches up.
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let revs = server.revisions("vm1");
    let stored = base.join("vm1").join(revs[2]["id"].as_str().unwrap());
    assert_eq!(file_hash(&stored), file_hash(&src));
}

/// Issue 34: a range list that misses a write in a block it does not
/// touch. With the audit at 100 % every block the list calls unchanged is
/// read again, the missed write is found, the push reads the whole source
/// (the revision is the source, byte for byte), the revision records the
/// audit and `check` and `status` warn. An honest list at the default
/// sample then audits clean and the warning goes.
#[test]
fn the_audit_catches_a_list_that_misses_a_write() {
    let fs = LoopFs::new("btrfs", 2 << 30);
    let base = fs.mount.join("backy");
    let work = fs.mount.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let src = work.join("vm1.img");
    make_image(&src, 64 * MIB, &[(0, 64 * MIB)]);
    let server = Server::start(&base, "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    // Named: block 1. Missed: block 9 (never read without the audit).
    write_at(&src, BLOCK + 100, &pattern(61, 4096));
    write_at(&src, 9 * BLOCK + 7, &pattern(62, 4096));
    let list = work.join("ranges");
    write_ranges(&list, &[(BLOCK + 100, 4096)]);
    let out = server.client(&[
        "--json",
        "push",
        "vm1",
        "--source",
        src.to_str().unwrap(),
        "--changed-ranges",
        list.to_str().unwrap(),
        "--audit-sample",
        "100%",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 16 blocks, 1 named: the other 15 re-read, block 9 differs.
    assert_eq!(pushed["audit"]["tracker"], "changed-ranges", "{pushed}");
    assert_eq!(pushed["audit"]["sampled"].as_u64(), Some(15), "{pushed}");
    assert_eq!(pushed["audit"]["mismatched"].as_u64(), Some(1), "{pushed}");
    // Then the whole source was read.
    assert_eq!(pushed["bytes_read"].as_u64(), Some(64 * MIB), "{pushed}");
    let revs = server.revisions("vm1");
    assert_eq!(revs.len(), 2);
    assert_eq!(revs[1]["audit"]["mismatched"].as_u64(), Some(1), "{}", revs[1]);
    let stored = base.join("vm1").join(revs[1]["id"].as_str().unwrap());
    assert_eq!(file_hash(&stored), file_hash(&src), "the revision is the source");
    server.client_ok(&["verify", "vm1", "-r", "last"]);

    // check and status warn, naming the tracker.
    let check = server.client(&["check", "vm1"]);
    let line = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{line}");
    assert!(
        line.starts_with("BACKY WARNING: vm1: change tracker --changed-ranges file missed writes: 1 of 15 sampled unchanged blocks differ"),
        "{line}"
    );
    let status = server.client_ok(&["status", "vm1"]);
    assert!(
        status.contains("warning: change tracker --changed-ranges file missed writes"),
        "{status}"
    );
    // The whole host's check says it too.
    let check = server.client(&["check"]);
    assert_eq!(check.status.code(), Some(1));

    // An honest list at the default sample (0.5 %: one block of 15).
    write_at(&src, 3 * BLOCK, &pattern(63, 4096));
    write_ranges(&list, &[(3 * BLOCK, 4096)]);
    let out = push_ranges(&server, &src, &list);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pushed["audit"]["sampled"].as_u64(), Some(1), "{pushed}");
    assert_eq!(pushed["audit"]["mismatched"].as_u64(), Some(0), "{pushed}");
    assert_eq!(
        pushed["bytes_read"].as_u64(),
        Some(BLOCK),
        "only the named block: {pushed}"
    );
    let revs = server.revisions("vm1");
    let stored = base.join("vm1").join(revs[2]["id"].as_str().unwrap());
    assert_eq!(file_hash(&stored), file_hash(&src));
    let check = server.client(&["check", "vm1"]);
    let line = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{line}");

    // 0 turns the audit off: nothing re-read, nothing recorded.
    write_ranges(&list, &[(3 * BLOCK, 4096)]);
    let out = server.client(&[
        "--json",
        "push",
        "vm1",
        "--source",
        src.to_str().unwrap(),
        "--changed-ranges",
        list.to_str().unwrap(),
        "--audit-sample",
        "0",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(pushed.get("audit").is_none(), "{pushed}");
    assert!(server.revisions("vm1")[3].get("audit").is_none());
    // A bad sample is refused before anything is asked.
    let out = server.client(&[
        "push",
        "vm1",
        "--source",
        src.to_str().unwrap(),
        "--audit-sample",
        "150%",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside 0% to 100%"));
}
