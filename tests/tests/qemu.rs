//! `type: qemu` end to end: a qcow2 image of a stopped guest pushed
//! through qemu-nbd with real server and client processes. The first push
//! reads the image's data, later ones only the granules the parent's
//! persistent dirty bitmap names; restores equal `qemu-img convert -O raw`
//! of the image at the push's instant; a failed push leaves the parent's
//! bitmap and no new one; an unusable parent bitmap means a full read that
//! says why.

mod support;

use std::path::Path;
use std::process::Command;
use support::*;

const G: u64 = 64 << 10;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_write(img: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P 0x{pattern:02x} {offset} {len}");
    run("qemu-io", &["-f", "qcow2", "-c", &cmd, img.to_str().unwrap()]);
}

/// The image's persistent bitmaps: (name, flags).
fn bitmaps(img: &Path) -> Vec<(String, Vec<String>)> {
    let info: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["info", "--output=json", img.to_str().unwrap()],
    ))
    .unwrap();
    let list = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (b["name"].as_str().unwrap().to_string(), flags)
        })
        .collect()
}

fn names(img: &Path) -> Vec<String> {
    bitmaps(img).into_iter().map(|(n, _)| n).collect()
}

fn raw_copy(img: &Path, to: &Path) {
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            img.to_str().unwrap(),
            to.to_str().unwrap(),
        ],
    );
}

fn push(server: &Server, env: &[(&str, &str)]) -> std::process::Output {
    server.client_env(env, &["--json", "push", "vm1"])
}

fn pushed(server: &Server) -> serde_json::Value {
    let out = push(server, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The job's revision ids, oldest first.
fn revision_ids(server: &Server) -> Vec<String> {
    server
        .revisions("vm1")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn check_restore(server: &Server, dir: &Path, id: &str, want: &Path) {
    let out = dir.join(format!("restored-{id}"));
    server.client_ok(&["restore", "vm1", "-r", id, out.to_str().unwrap()]);
    assert_eq!(
        file_hash(&out),
        file_hash(want),
        "revision {id} restores to the image at its push"
    );
}

#[test]
fn pushes_read_the_dirty_granules_and_keep_one_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"],
    );
    qemu_write(&img, 0x11, 0, 8 * MIB);
    qemu_write(&img, 0x22, 40 * MIB, 4 * MIB);
    let base = dir.path().join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let log = dir.path().join("hooks.log");
    let fail = dir.path().join("fail-pre");
    let jobs = format!(
        "  vm1: {{schedule: none, source: {{type: qemu, image: {}, hooks: {{\
         pre-snapshot: 'echo pre $BACKY_SOURCE >> {l}; test ! -e {f}', \
         post-snapshot: 'echo post >> {l}', cleanup: 'echo cleanup >> {l}'}}}}}}\n",
        img.display(),
        l = log.display(),
        f = fail.display()
    );
    let server = Server::start(&base, &jobs);

    // Full push: the data extents are read, holes skipped.
    let first = pushed(&server);
    eprintln!(
        "full push: read {} sent {}",
        first["bytes_read"], first["bytes_sent"]
    );
    assert_eq!(first["bytes_sent"].as_u64(), Some(12 * MIB));
    assert!(first.get("full_read").is_none(), "{first}");
    let ids = revision_ids(&server);
    assert_eq!(names(&img), [format!("backy-{}", ids[0])]);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("pre {}\npost\ncleanup\n", img.display())
    );
    // A failing pre-snapshot hook: no push, no new bitmap, and the guest
    // is still thawed.
    std::fs::write(&fail, "").unwrap();
    let out = push(&server, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pre-snapshot hook"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(names(&img), [format!("backy-{}", ids[0])]);
    let hooks_ran = format!("pre {}\npost\ncleanup\n", img.display());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), hooks_ran.repeat(2));
    std::fs::remove_file(&fail).unwrap();
    let raw1 = dir.path().join("at1.raw");
    raw_copy(&img, &raw1);

    // Five granules written: inside one, across a granule boundary, and
    // two whole ones in a hole.
    qemu_write(&img, 0x55, 3 * MIB + 100, 10);
    qemu_write(&img, 0x66, 41 * MIB - 1, 2);
    qemu_write(&img, 0x77, 60 * MIB, 2 * G);
    let raw2 = dir.path().join("at2.raw");
    raw_copy(&img, &raw2);
    let second = pushed(&server);
    eprintln!(
        "incremental push: read {} sent {}",
        second["bytes_read"], second["bytes_sent"]
    );
    assert_eq!(second["bytes_sent"].as_u64(), Some(5 * G));
    // Only the three 4 MiB blocks holding them were read.
    assert_eq!(second["bytes_read"].as_u64(), Some(3 * BLOCK));
    let ids = revision_ids(&server);
    assert_eq!(ids.len(), 2);
    assert_eq!(
        names(&img),
        [format!("backy-{}", ids[1])],
        "the parent's bitmap is gone, the new one stays"
    );
    check_restore(&server, dir.path(), &ids[0], &raw1);
    check_restore(&server, dir.path(), &ids[1], &raw2);

    // A push failing mid-read: the parent's bitmap stays, no new one.
    qemu_write(&img, 0x88, 20 * MIB, G);
    let out = push(&server, &[("BACKY_FAULT", "error:client.qemu-read")]);
    assert!(!out.status.success());
    assert_eq!(names(&img), [format!("backy-{}", ids[1])]);
    assert_eq!(server.revisions("vm1").len(), 2);

    // The retry still knows that write; a bitmap a crashed push left
    // behind goes with the parent's.
    run(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "backy-crashed"],
    );
    let raw3 = dir.path().join("at3.raw");
    raw_copy(&img, &raw3);
    let third = pushed(&server);
    assert_eq!(third["bytes_sent"].as_u64(), Some(G));
    let ids = revision_ids(&server);
    assert_eq!(names(&img), [format!("backy-{}", ids[2])]);
    check_restore(&server, dir.path(), &ids[2], &raw3);

    // A disabled parent bitmap is not trusted: the push reads all data,
    // compares with the parent's digests, sends the change, says why.
    let parent = format!("backy-{}", ids[2]);
    run(
        "qemu-img",
        &["bitmap", "--disable", img.to_str().unwrap(), &parent],
    );
    qemu_write(&img, 0x99, 5 * MIB, G);
    let raw4 = dir.path().join("at4.raw");
    raw_copy(&img, &raw4);
    let fourth = pushed(&server);
    eprintln!(
        "fallback push: read {} sent {} ({})",
        fourth["bytes_read"], fourth["bytes_sent"], fourth["full_read"]
    );
    assert!(
        fourth["full_read"].as_str().unwrap().contains("disabled"),
        "{fourth}"
    );
    // Without known ranges a changed block goes through the granule
    // exchange: its digests, then the changed granule (README: How it works).
    assert_eq!(fourth["bytes_sent"].as_u64(), Some(G + 1024));
    assert!(fourth["bytes_read"].as_u64().unwrap() >= 12 * MIB);
    let ids = revision_ids(&server);
    assert_eq!(names(&img), [format!("backy-{}", ids[3])]);
    check_restore(&server, dir.path(), &ids[3], &raw4);

    // The push line says why it read everything.
    run(
        "qemu-img",
        &[
            "bitmap",
            "--remove",
            img.to_str().unwrap(),
            &format!("backy-{}", ids[3]),
        ],
    );
    let line = server.client_ok(&["push", "vm1", "--force"]);
    assert!(
        line.contains(&format!("(read whole: the image has no bitmap backy-{})", ids[3])),
        "{line}"
    );
    let ids = revision_ids(&server);
    assert_eq!(names(&img), [format!("backy-{}", ids[4])]);
}

#[test]
fn a_raw_image_is_read_whole_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.raw");
    make_image(&img, 16 * MIB, &[(0, 4 * MIB)]);
    let base = dir.path().join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let jobs = format!(
        "  vm1: {{schedule: none, source: {{type: qemu, image: {}}}}}\n",
        img.display()
    );
    let server = Server::start(&base, &jobs);
    let first = pushed(&server);
    assert!(first.get("full_read").is_none(), "{first}");
    assert_eq!(first["bytes_sent"].as_u64(), Some(4 * MIB));
    write_at(&img, 9 * MIB, b"changed");
    let second = pushed(&server);
    let why = second["full_read"].as_str().unwrap_or_default();
    assert!(
        why.ends_with("vm1.raw is a raw image: dirty bitmaps persist only in qcow2"),
        "{second}"
    );
    // The changed block, found by comparing digests: its granule digests,
    // then the changed granule (README: How it works).
    assert_eq!(second["bytes_sent"].as_u64(), Some(G + 1024));
    let id = server.revisions("vm1")[1]["id"].as_str().unwrap().to_string();
    check_restore(&server, dir.path(), &id, &img);
}

/// An encrypted job (docs/encryption.md) with a qcow2 source: the bitmap
/// names the dirty granules, each goes encrypted whole, and every
/// revision restores (with the key) to the image at its push, while the
/// stored one is ciphertext.
#[test]
fn an_encrypted_qemu_job_sends_the_dirty_granules_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"],
    );
    qemu_write(&img, 0x11, 0, 8 * MIB);
    let base = dir.path().join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let server = Server::start(&base, "  vm1: {schedule: none}\n");
    let key = dir.path().join("vm1.key");
    server.client_ok(&["keygen", key.to_str().unwrap()]);
    std::fs::write(
        &server.client_config,
        format!(
            "jobs:\n  vm1:\n    source: {{type: qemu, image: {}}}\n    encryption: {{key-file: {}}}\n",
            img.display(),
            key.display()
        ),
    )
    .unwrap();
    let first = pushed(&server);
    assert_eq!(first["bytes_sent"].as_u64(), Some(8 * MIB));
    let v1 = dir.path().join("v1.raw");
    raw_copy(&img, &v1);
    // 4 KiB writes: each sends its whole granule (its ciphertext depends on
    // all of it), one into a hole too.
    qemu_write(&img, 0x33, 3 * MIB + 4096, 4096);
    qemu_write(&img, 0x44, 30 * MIB, 4096);
    let second = pushed(&server);
    assert_eq!(second["bytes_sent"].as_u64(), Some(2 * G), "{second}");
    assert!(second.get("full_read").is_none(), "{second}");
    let v2 = dir.path().join("v2.raw");
    raw_copy(&img, &v2);
    let ids = revision_ids(&server);
    let stored = base.join("vm1").join(&ids[1]);
    assert_ne!(file_hash(&stored), file_hash(&v2), "ciphertext on the server");
    check_restore(&server, dir.path(), &ids[0], &v1);
    check_restore(&server, dir.path(), &ids[1], &v2);
}
