//! Block-device sources with snapshot hooks, on loop devices standing in
//! for LVM (no device-mapper here): the pre-snapshot hook makes a
//! point-in-time copy of the "origin volume" and attaches it as a loop
//! device (as `lvcreate --snapshot` would), the cleanup hook detaches and
//! removes it (as `lvremove` would). Full and incremental pushes, restores
//! onto another loop device, compared byte for byte.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use support::*;

/// A loop device over a file; detached on drop.
/// Loop devices attached to `file`.
fn attached(file: &Path) -> String {
    let out = Command::new("losetup").arg("-j").arg(file).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Copies a device's contents into a file (what the source held at a push).
fn copy_device(dev: &Path, to: &Path) {
    let status = Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .arg(format!("of={}", to.display()))
        .args(["bs=1M", "conv=sparse", "status=none"])
        .status()
        .unwrap();
    assert!(status.success());
}

fn push_json(server: &Server) -> (String, u64) {
    let out = server.client_ok(&["push", "vm1", "--force", "--json"]);
    let v: Value = serde_json::from_str(&out).expect("push --json");
    (
        v["revision"]["id"].as_str().unwrap().to_string(),
        v["bytes_sent"].as_u64().unwrap(),
    )
}

#[test]
fn loop_device_with_snapshot_hooks() {
    must_be_root();
    let fs = LoopFs::new("btrfs", 1 << 30);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let size = 16 * BLOCK;
    let origin_img = w.join("origin.img");
    make_image(
        &origin_img,
        size,
        &[(0, 100_000), (5 * BLOCK - 10, 20), (size - 4096, 4096)],
    );
    let origin = LoopDev::attach(&origin_img);
    let snap_img = w.join("snap.img");
    let link = w.join("vm1-snap");
    let log = w.join("hooks.log");
    let job = format!(
        "  vm1:\n    schedule: none\n    source:\n      type: block\n      path: {link}\n      hooks:\n        \
         pre-snapshot: 'test ! -e {log}.fail && sync && dd if={origin} of={snap} bs=1M conv=sparse status=none && \
         ln -s $(losetup -f --show {snap}) {link} && echo pre $BACKY_JOB >> {log}'\n        \
         post-snapshot: 'echo post >> {log}'\n        \
         cleanup: 'losetup -d $(readlink {link}) && rm {link} {snap} && echo cleanup >> {log}'\n        \
         hook-timeout: 30\n",
        link = link.display(),
        origin = origin.dev.display(),
        snap = snap_img.display(),
        log = log.display(),
    );
    let server = Server::start(&fs.mount.join("base"), &job);

    let v1 = w.join("v1.img");
    copy_device(&origin.dev, &v1);
    let (id1, _) = push_json(&server);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre vm1\npost\ncleanup\n");
    assert!(!link.exists() && !snap_img.exists(), "the snapshot is cleaned up");
    assert_eq!(attached(&snap_img), "", "no loop device left on the snapshot");

    // Changes in three blocks: unaligned, across a boundary, the last byte.
    write_at(&origin.dev, 2 * BLOCK + 77, &pattern(1, 5000));
    write_at(&origin.dev, 8 * BLOCK - 100, &pattern(2, 200));
    write_at(&origin.dev, size - 1, &[0xAA]);
    let v2 = w.join("v2.img");
    copy_device(&origin.dev, &v2);
    let (id2, sent2) = push_json(&server);
    // Of the four changed blocks only their changed 64 KiB granules: one
    // for each write, two for the one across a block boundary; each
    // block's digest (32 bytes: the btrfs store offers deduplication); and
    // the granule digests (64 of 16 bytes) of the one block whose parent
    // data was not zeros (15: blocks 2, 7 and 8 held nothing).
    assert_eq!(
        sent2,
        4 * (64 << 10) + 4 * 32 + 1024,
        "the changed granules, nothing else"
    );
    assert!(!link.exists());
    let revs = server.revisions("vm1");
    assert_eq!(revs[1]["source_type"], "block");

    // Restore each revision onto a loop device and compare.
    let target_img = w.join("target.img");
    std::fs::File::create(&target_img).unwrap().set_len(size).unwrap();
    let target = LoopDev::attach(&target_img);
    for (i, (id, want)) in [(&id1, &v1), (&id2, &v2)].into_iter().enumerate() {
        let dev = target.dev.to_str().unwrap();
        // The blank device takes the first restore as it is; once it holds
        // data, overwriting it needs --force.
        if i == 0 {
            server.client_ok(&["restore", "vm1", "-r", id, dev]);
        } else {
            let out = server.client(&["restore", "vm1", "-r", id, dev]);
            assert_eq!(out.status.code(), Some(1));
            assert!(String::from_utf8_lossy(&out.stderr).contains("holds data: give --force"));
            server.client_ok(&["restore", "vm1", "-r", id, dev, "--force"]);
        }
        let back = w.join(format!("back-{id}"));
        copy_device(&target.dev, &back);
        assert_eq!(
            file_hash(&back),
            file_hash(want),
            "revision {id} restored onto a block device"
        );
    }

    // A failing pre-snapshot hook fails the push; post-snapshot still runs.
    std::fs::write(w.join("hooks.log.fail"), "").unwrap();
    std::fs::remove_file(&log).unwrap();
    let out = server.client(&["push", "vm1", "--force"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pre-snapshot hook") && err.contains("(exit 1)"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "post\n");
    assert_eq!(server.revisions("vm1").len(), 2);
}
