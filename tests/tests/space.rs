//! Space accounting end to end (issue 29, item 6): on btrfs, a full push
//! and a small incremental share their unchanged extents, and status says
//! so the way `btrfs filesystem du` does: per revision total, exclusive and
//! shared; per job total, exclusive and set shared (each physical extent
//! once) and the job's real use; the store's used bytes. Checked against
//! the real `btrfs filesystem du --raw` on the same files; XFS shares the
//! same way. On a filesystem without FIEMAP, status says "unknown" instead
//! of inventing numbers.

mod support;

use std::path::Path;
use std::process::Command;
use support::*;

/// Bytes of data in the source image.
const DATA: u64 = 48 * BLOCK;
/// Bytes the incremental push changes.
const CHANGE: u64 = 2 * BLOCK;

/// `btrfs filesystem du -s --raw` of each path: (total, exclusive, set shared).
fn du(paths: &[&Path]) -> Vec<(u64, u64, u64)> {
    let out = Command::new("btrfs")
        .args(["filesystem", "du", "-s", "--raw"])
        .args(paths)
        .output()
        .expect("running btrfs filesystem du");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .skip(1)
        .map(|line| {
            let n: Vec<u64> = line
                .split_whitespace()
                .take(3)
                .map(|n| n.parse().unwrap_or_else(|_| panic!("btrfs du line {line:?}")))
                .collect();
            (n[0], n[1], n[2])
        })
        .collect()
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} is not a number in {v}"))
}

/// A full push of [`DATA`] bytes and an incremental changing [`CHANGE`]
/// bytes, on a fresh filesystem of `kind`; checks that status counts the
/// job as one image plus the change and returns its `status --json`.
fn full_and_change(kind: &str) -> (LoopFs, Server, serde_json::Value) {
    let fs = LoopFs::new(kind, 2 << 30);
    let base = fs.mount.join("backy");
    let work = fs.mount.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let src = work.join("vm1.img");
    make_image(&src, 64 * BLOCK, &[(0, DATA)]);
    let server = Server::start(&base, "  vm1: {schedule: none}\n");
    let push = || server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    push();
    write_at(&src, 5 * BLOCK, &pattern(77, CHANGE as usize));
    push();
    // What the filesystem holds is settled: the server synced every file.
    Command::new("sync").status().unwrap();

    let status = server.status_json("vm1");
    let job = &status["jobs"][0];
    let space = &job["space"];
    assert!(space.is_object(), "{kind}: no job space in {job}");
    let used = field(space, "used_bytes");
    eprintln!("{kind}: job space {space}; store {}", status["store"]);
    // One image plus the change, not two images.
    assert!(
        (DATA..=DATA + CHANGE + 4 * MIB).contains(&used),
        "{kind}: job uses {used} bytes for {DATA} bytes of data and a {CHANGE}-byte change"
    );
    assert!(field(space, "total_bytes") >= 2 * DATA - CHANGE);
    assert_eq!(
        used,
        field(space, "exclusive_bytes") + field(space, "shared_bytes")
    );
    // The second revision owns about the change.
    let excl2 = field(&job["revisions"][1]["space"], "exclusive_bytes");
    assert!(excl2 <= CHANGE + MIB, "{kind}: revision 2 owns {excl2} bytes");
    (fs, server, status)
}

#[test]
fn xfs_status_counts_shared_extents_once() {
    // Bound, so they drop in reverse: the server stops before the unmount.
    let (_fs, _server, _status) = full_and_change("xfs");
}

#[test]
fn btrfs_status_reports_shared_extents_once_as_btrfs_du_does() {
    let (fs, server, status) = full_and_change("btrfs");
    let base = fs.mount.join("backy");
    let job = &status["jobs"][0];
    let space = &job["space"];
    let used = field(space, "used_bytes");

    // Each revision as `btrfs filesystem du` sees its files.
    let dir = base.join("vm1");
    let revs = job["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 2);
    for rev in revs {
        let id = rev["id"].as_str().unwrap();
        let files = [
            dir.join(id),
            dir.join(format!("{id}.digests")),
            dir.join(format!("{id}.rev")),
        ];
        let paths: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
        let per_file = du(&paths);
        let total: u64 = per_file.iter().map(|d| d.0).sum();
        let exclusive: u64 = per_file.iter().map(|d| d.1).sum();
        let s = &rev["space"];
        assert!(s.is_object(), "no space for revision {id}: {rev}");
        assert_eq!(field(s, "total_bytes"), total, "revision {id} total");
        assert_eq!(field(s, "exclusive_bytes"), exclusive, "revision {id} exclusive");
        assert_eq!(
            field(s, "shared_bytes"),
            total - exclusive,
            "revision {id} shared"
        );
    }

    // The job as `btrfs filesystem du -s` of its directory.
    let (total, exclusive, set_shared) = du(&[&dir])[0];
    assert_eq!(field(space, "total_bytes"), total, "job total");
    assert_eq!(field(space, "exclusive_bytes"), exclusive, "job exclusive");
    assert_eq!(field(space, "shared_bytes"), set_shared, "job set shared");

    // The store's real use: the filesystem's used bytes (df), which hold
    // the job (and the work directory's source image).
    let store = &status["store"];
    let store_used = field(store, "used_bytes");
    let st = rustix::fs::statvfs(&base).unwrap();
    let fs_used = (st.f_blocks - st.f_bfree) * st.f_frsize;
    assert!(store_used >= used, "store used {store_used} < job use {used}");
    assert!(
        store_used.abs_diff(fs_used) <= 16 * MIB,
        "store used {store_used} vs statvfs {fs_used}"
    );

    // The host's summary says the same once its background count (queued
    // by the first summary) is in.
    let mut host = serde_json::Value::Null;
    wait_for(
        "the job's space in the host summary",
        std::time::Duration::from_secs(60),
        || {
            host = serde_json::from_str(&server.client_ok(&["status", "--json"])).unwrap();
            host["jobs"][0]["space"] == *space
        },
    );
    assert_eq!(host["store"]["size_bytes"], store["size_bytes"]);

    // People read the same numbers.
    let text = server.client_ok(&["status", "vm1"]);
    assert!(
        text.contains("exclusive") && text.contains("shared"),
        "status does not say exclusive/shared:\n{text}"
    );
    assert!(
        !text.contains(" allocated"),
        "status still says allocated:\n{text}"
    );
}

#[test]
fn status_says_unknown_where_the_filesystem_has_no_fiemap() {
    must_be_root();
    // tmpfs implements no FIEMAP.
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("tmpfs");
    std::fs::create_dir(&mount).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mount);
    let base = mount.join("backy");
    let src = dir.path().join("vm1.img");
    make_image(&src, 8 * BLOCK, &[(0, 2 * BLOCK)]);
    let server = Server::start(&base, "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    let status = server.status_json("vm1");
    let job = &status["jobs"][0];
    assert!(job["space"].is_null(), "space invented: {job}");
    assert!(job["revisions"][0]["space"].is_null(), "space invented: {job}");
    let text = server.client_ok(&["status", "vm1"]);
    assert!(
        text.contains("space unknown"),
        "status does not say the space is unknown:\n{text}"
    );
}
