//! Ceph RBD sources against a real one-node cluster (started by
//! scripts/test.sh, which exports BACKY_TEST_CEPH_CONF): full and
//! incremental pushes from `rbd export-diff`, resizes, a lost parent
//! snapshot, snapshot rotation, hooks, broken `rbd` runs, and restores into
//! files and RBD images compared with `rbd export` of the same snapshots.

mod support;

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use support::*;

/// The cluster's ceph.conf, or `None` (with the reason printed) when the
/// test command did not start one.
fn ceph_conf() -> Option<PathBuf> {
    match std::env::var_os("BACKY_TEST_CEPH_CONF") {
        Some(c) => Some(PathBuf::from(c)),
        None => {
            println!("SKIPPED: no Ceph cluster (BACKY_TEST_CEPH_CONF is unset; scripts/test.sh starts one)");
            None
        }
    }
}

/// An RBD image in pool `rbd` of the test cluster, removed (with its
/// snapshots) on drop.
struct Image {
    conf: PathBuf,
    name: String,
}

impl Image {
    fn new(conf: &Path, tag: &str, size: u64) -> Image {
        let img = Image {
            conf: conf.to_path_buf(),
            name: format!("backy-test-{}-{tag}", std::process::id()),
        };
        img.rbd_ok(&["create", "--size", &format!("{size}B"), &img.spec()]);
        img
    }

    fn spec(&self) -> String {
        format!("rbd/{}", self.name)
    }

    fn rbd(&self, args: &[&str]) -> Output {
        Command::new("rbd")
            .arg("--conf")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running rbd")
    }

    fn rbd_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.rbd(args);
        assert!(
            out.status.success(),
            "rbd {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Writes and discards exact ranges through `rbd import-diff`.
    fn apply(&self, size: u64, writes: &[(u64, Vec<u8>)], discards: &[(u64, u64)]) {
        let mut diff = b"rbd diff v1\n".to_vec();
        diff.push(b's');
        diff.extend_from_slice(&size.to_le_bytes());
        for (off, data) in writes {
            diff.push(b'w');
            diff.extend_from_slice(&off.to_le_bytes());
            diff.extend_from_slice(&(data.len() as u64).to_le_bytes());
            diff.extend_from_slice(data);
        }
        for (off, len) in discards {
            diff.push(b'z');
            diff.extend_from_slice(&off.to_le_bytes());
            diff.extend_from_slice(&len.to_le_bytes());
        }
        diff.push(b'e');
        let mut child = Command::new("rbd")
            .arg("--conf")
            .arg(&self.conf)
            .args(["import-diff", "--no-progress", "-", &self.spec()])
            .stdin(Stdio::piped())
            .spawn()
            .expect("rbd import-diff");
        child.stdin.take().unwrap().write_all(&diff).unwrap();
        assert!(child.wait().unwrap().success(), "rbd import-diff failed");
    }

    fn resize(&self, size: u64) {
        self.rbd_ok(&[
            "resize",
            "--no-progress",
            "--allow-shrink",
            "--size",
            &format!("{size}B"),
            &self.spec(),
        ]);
    }

    fn snapshots(&self) -> Vec<String> {
        let out = self.rbd_ok(&["snap", "ls", "--format", "json", &self.spec()]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn backy_snapshots(&self) -> Vec<String> {
        self.snapshots()
            .into_iter()
            .filter(|s| s.starts_with("backy-"))
            .collect()
    }

    /// `rbd export` of a snapshot (or the head) into a file.
    fn export(&self, snap: Option<&str>, to: &Path) {
        let spec = match snap {
            Some(s) => format!("{}@{s}", self.spec()),
            None => self.spec(),
        };
        let _ = std::fs::remove_file(to);
        self.rbd_ok(&["export", "--no-progress", &spec, to.to_str().unwrap()]);
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.rbd(&["snap", "purge", "--no-progress", &self.spec()]);
        let _ = self.rbd(&["rm", "--no-progress", &self.spec()]);
    }
}

/// A push with `--json`: (short id, bytes read, bytes sent).
fn push_json(server: &Server, env: &[(&str, &str)], job: &str) -> (String, u64, u64) {
    push_args(server, env, &["push", job, "--force", "--json"])
}

fn push_args(server: &Server, env: &[(&str, &str)], args: &[&str]) -> (String, u64, u64) {
    let out = server.client_env(env, args);
    assert!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("push --json");
    (
        v["revision"]["id"].as_str().unwrap().to_string(),
        v["bytes_read"].as_u64().unwrap(),
        v["bytes_sent"].as_u64().unwrap(),
    )
}

fn job_yaml(img: &Image, extra: &str) -> String {
    format!(
        "  vm1:\n    schedule: none\n    source: {{type: ceph-rbd, pool: rbd, image: {}, conf: {}{extra}}}\n",
        img.name,
        img.conf.display()
    )
}

#[test]
fn full_incremental_resize_lost_snapshot_and_restores() {
    must_be_root();
    let Some(conf) = ceph_conf() else { return };
    let fs = LoopFs::new("btrfs", 2 << 30);
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("hooks.log");
    let size = 10 * BLOCK + 8192;
    let img = Image::new(&conf, "main", size);
    let hooks = format!(
        ", hooks: {{pre-snapshot: 'echo pre $BACKY_SNAPSHOT >> {0}', post-snapshot: 'echo post >> {0}', hook-timeout: 20}}",
        log.display()
    );
    let server = Server::start(&fs.mount.join("base"), &job_yaml(&img, &hooks));
    // (short id, the snapshot's export) of every revision.
    let mut revisions: Vec<(String, PathBuf)> = Vec::new();
    let record = |revisions: &mut Vec<(String, PathBuf)>, id: &str| {
        assert_eq!(
            img.backy_snapshots(),
            [format!("backy-{id}")],
            "exactly one backy snapshot"
        );
        let file = work.path().join(format!("export-{}", revisions.len()));
        img.export(Some(&format!("backy-{id}")), &file);
        revisions.push((id.to_string(), file));
    };

    // Full: unaligned writes, one across an object boundary, the last block.
    let writes1 = vec![
        (0, pattern(1, 100_000)),
        (BLOCK - 1000, pattern(2, 5000)),
        (5 * BLOCK + 7, pattern(3, MIB as usize)),
        (size - 4096, pattern(4, 4096)),
    ];
    let data1: u64 = writes1.iter().map(|w| w.1.len() as u64).sum();
    img.apply(size, &writes1, &[]);
    let (id1, read1, sent1) = push_json(&server, &[], "vm1");
    println!("full push: {read1} bytes read, {sent1} bytes sent ({data1} bytes written to the image)");
    // Only what exists in Ceph is read: a full diff reports each object
    // that exists from its start to its last written byte.
    let object_spans = BLOCK + 4000 + (MIB + 7) + 8192;
    assert!(read1 >= data1 && read1 <= object_spans, "read {read1}");
    assert!(sent1 >= data1 && sent1 <= 5 * BLOCK, "sent {sent1}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("pre {}@backy-{id1}\npost\n", img.spec())
    );
    record(&mut revisions, &id1);

    // Incremental: small unaligned writes, across a boundary, the last
    // bytes, a discard of a whole object.
    let writes2 = vec![
        (2 * BLOCK + 123, pattern(5, 4096)),
        (3 * BLOCK - 50, pattern(6, 100)),
        (size - 10, pattern(7, 10)),
    ];
    let changed2: u64 = writes2.iter().map(|w| w.1.len() as u64).sum();
    img.apply(size, &writes2, &[(5 * BLOCK, BLOCK)]);
    let (id2, read2, sent2) = push_json(&server, &[], "vm1");
    println!("incremental push: {read2} bytes read, {sent2} bytes sent ({changed2} bytes changed)");
    assert!(
        sent2 >= changed2 && sent2 <= changed2 + 64 * 1024,
        "an incremental push sends about the changed bytes: {sent2} for {changed2}"
    );
    // The objects changed since the parent snapshot are read whole, for
    // the digests of the new manifest (issue 27 item 11): objects 2 and 3
    // and the last one (8192 bytes); the discarded object 5 reads nothing.
    assert_eq!(read2, 2 * BLOCK + 8192, "only the changed objects are read");
    record(&mut revisions, &id2);

    // verify --source reads the newest revision's own snapshot whole and
    // finds it equal; the older revision's snapshot is gone (rotated).
    let out = server.client_ok(&["verify", "vm1", "--source"]);
    assert!(
        out.contains(&format!("revision {id2}: all 11 blocks")) && out.contains("equal the source"),
        "{out}"
    );
    let out = server.client(&["verify", "vm1", "-r", &id1, "--source"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("backy-{id1} is gone")), "{err}");

    // Grow, write in the new part and at an old object's start.
    let grown = 13 * BLOCK + 12_288;
    img.resize(grown);
    let writes3 = vec![(grown - 5000, pattern(8, 5000)), (11 * BLOCK, pattern(9, 65536))];
    img.apply(grown, &writes3, &[]);
    let (id3, _, sent3) = push_json(&server, &[], "vm1");
    assert!(sent3 <= 5000 + 65536 + 64 * 1024, "grow sent {sent3}");
    record(&mut revisions, &id3);

    // Shrink into the middle of a written object.
    let shrunk = 5 * BLOCK + 4096;
    img.resize(shrunk);
    let (id4, _, sent4) = push_args(
        &server,
        &[],
        &["push", "vm1", "--force", "--allow-shrink", "--json"],
    );
    assert!(sent4 <= 64 * 1024, "shrink sent {sent4}");
    record(&mut revisions, &id4);

    // The parent's snapshot is gone: a full backup, still right.
    img.rbd_ok(&[
        "snap",
        "rm",
        "--no-progress",
        &format!("{}@backy-{id4}", img.spec()),
    ]);
    img.apply(shrunk, &[(4096, pattern(10, 8192))], &[]);
    let (id5, read5, _) = push_json(&server, &[], "vm1");
    assert!(
        read5 > 100_000,
        "a full read after the parent snapshot was lost: {read5}"
    );
    record(&mut revisions, &id5);

    let revs = server.revisions("vm1");
    assert_eq!(revs.len(), 5);
    for (i, (id, export)) in revisions.iter().enumerate() {
        let target = work.path().join(format!("restored-{i}"));
        server.client_ok(&["restore", "vm1", "-r", id, target.to_str().unwrap()]);
        assert_eq!(
            file_hash(&target),
            file_hash(export),
            "revision {i} ({id}) restores as exported"
        );
        assert_eq!(revs[i]["source_type"], "ceph-rbd", "{:?}", revs[i]);
    }

    // Restore into RBD images: fresh, refused over an existing one, forced.
    let target = Image {
        conf: conf.clone(),
        name: format!("backy-test-{}-restored", std::process::id()),
    };
    let rbd_target = format!("rbd:{}", target.spec());
    let env = [("CEPH_CONF", conf.to_str().unwrap())];
    let out = server.client_env(&env, &["restore", "vm1", "-r", &revisions[2].0, &rbd_target]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back = work.path().join("back");
    target.export(None, &back);
    assert_eq!(file_hash(&back), file_hash(&revisions[2].1));
    // Sparse: only the data was written.
    let du: Value =
        serde_json::from_slice(&target.rbd_ok(&["diff", "--format", "json", &target.spec()])).unwrap();
    let written: u64 = du
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        written < 4 * BLOCK,
        "restored image holds {written} bytes of extents"
    );

    let out = server.client_env(&env, &["restore", "vm1", "-r", &revisions[0].0, &rbd_target]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    // The image has revision 2's size, not revision 0's: a rollback is
    // refused in one line, --full replaces it (issue 30).
    let out = server.client_env(
        &env,
        &["restore", "vm1", "-r", &revisions[0].0, &rbd_target, "--force"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("give --full") && err.lines().count() == 1, "{err}");
    let out = server.client_env(
        &env,
        &[
            "restore",
            "vm1",
            "-r",
            &revisions[0].0,
            &rbd_target,
            "--force",
            "--full",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    target.export(None, &back);
    assert_eq!(file_hash(&back), file_hash(&revisions[0].1));
}

/// Rollback onto an RBD image of the revision's size (issue 30, item 4):
/// the image is read (`rbd export`), only the changed granules are fetched
/// and written (`rbd import-diff`), and it ends equal to the revision.
#[test]
fn rollback_of_an_rbd_image_fetches_only_changed_granules() {
    must_be_root();
    let Some(conf) = ceph_conf() else { return };
    let fs = LoopFs::new("btrfs", 1 << 30);
    let work = tempfile::tempdir().unwrap();
    let size = 8 * BLOCK;
    let img = Image::new(&conf, "rbsrc", size);
    img.apply(size, &[(0, pattern(1, 5 * BLOCK as usize))], &[]);
    let server = Server::start(&fs.mount.join("base"), &job_yaml(&img, ""));
    let (id, _, _) = push_json(&server, &[], "vm1");
    let want = work.path().join("want.img");
    server.client_ok(&["restore", "vm1", "-r", &id, want.to_str().unwrap()]);

    // A copy of the revision in another image, then changed: 4 KiB in each
    // of 5 granules of data, and a write where the revision has zeros.
    let target = Image::new(&conf, "rbtarget", size);
    let rbd_target = format!("rbd:{}", target.spec());
    let env = [("CEPH_CONF", conf.to_str().unwrap())];
    let out = server.client_env(
        &env,
        &["restore", "vm1", "-r", &id, &rbd_target, "--force", "--full"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let changes: Vec<(u64, Vec<u8>)> = (0..5u64)
        .map(|i| (i * BLOCK + 3 * 65536 + 4096, pattern(100 + i, 4096)))
        .chain([(6 * BLOCK + 8192, pattern(7, 4096))])
        .collect();
    target.apply(size, &changes, &[]);
    let back = work.path().join("back.img");
    target.export(None, &back);
    assert_ne!(file_hash(&back), file_hash(&want));

    let out = server.client_env(
        &env,
        &["--json", "restore", "vm1", "-r", &id, &rbd_target, "--force"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("restore --json");
    assert_eq!(v["mode"], "rollback", "{v}");
    assert_eq!(v["fetched_bytes"].as_u64(), Some(5 * 65536), "{v}");
    assert_eq!(v["read_bytes"].as_u64(), Some(size), "{v}");
    assert_eq!(v["written_bytes"].as_u64(), Some(6 * 65536), "{v}");
    target.export(None, &back);
    assert_eq!(file_hash(&back), file_hash(&want), "the image holds the revision");

    // The source image itself still has the revision's snapshot: Ceph's
    // diff from it names the changed objects, and only those are read.
    assert_eq!(img.backy_snapshots(), [format!("backy-{id}")]);
    img.apply(size, &changes, &[]);
    let source = format!("rbd:{}", img.spec());
    let out = server.client_env(&env, &["--json", "restore", "vm1", "-r", &id, &source, "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("restore --json");
    assert_eq!(v["mode"], "rollback", "{v}");
    assert_eq!(
        v["read_bytes"].as_u64(),
        Some(6 * BLOCK),
        "the 6 changed objects: {v}"
    );
    assert_eq!(v["fetched_bytes"].as_u64(), Some(5 * 65536), "{v}");
    assert_eq!(v["written_bytes"].as_u64(), Some(6 * 65536), "{v}");
    img.export(None, &back);
    assert_eq!(
        file_hash(&back),
        file_hash(&want),
        "the source holds the revision again"
    );
}

/// A fault injector standing in for `rbd`: `export-diff` runs the real
/// tool and then misbehaves as `script` says; other commands go to the
/// real `rbd`.
fn fake_rbd(dir: &Path, export_diff: &str) -> String {
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v rbd"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        "#!/bin/sh\nREAL={}\nfor a; do [ \"$a\" = export-diff ] && {{ {export_diff}; }}; done\nexec $REAL \"$@\"\n",
        real.trim()
    );
    let path = bin.join("rbd");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

#[test]
fn broken_diff_streams_and_failing_rbd_commit_nothing() {
    must_be_root();
    let Some(conf) = ceph_conf() else { return };
    let fs = LoopFs::new("btrfs", 1 << 30);
    let work = tempfile::tempdir().unwrap();
    let size = 4 * BLOCK;
    let img = Image::new(&conf, "faults", size);
    let log = work.path().join("hooks.log");
    let hooks = format!(
        ", hooks: {{pre-snapshot: 'test ! -e {0}.fail', post-snapshot: 'echo post >> {0}'}}",
        log.display()
    );
    let server = Server::start(&fs.mount.join("base"), &job_yaml(&img, &hooks));
    img.apply(size, &[(0, pattern(1, 3 * MIB as usize))], &[]);
    let (id1, _, _) = push_json(&server, &[], "vm1");
    img.apply(size, &[(2 * BLOCK + 5, pattern(2, 2 * MIB as usize))], &[]);
    let before = server.snapshot_tree();

    let cases: Vec<(&str, &str)> = vec![
        // Truncated in the middle of a data record, rbd exiting 0.
        (
            "$REAL \"$@\" | head -c 100000; exit 0",
            "truncated data record",
        ),
        // A corrupted record tag: the first data record's, after the banner
        // (12 bytes), from/to snapshot records (2 x 33) and size (9).
        (
            "$REAL \"$@\" | { dd bs=1 count=87; dd bs=1 count=1 of=/dev/null; printf X; cat; } 2>/dev/null; exit 0",
            "unknown record tag",
        ),
        // rbd itself fails: its exit status and message are reported.
        ("echo 'rbd: export-diff error: (5) Input/output error' >&2; exit 5", "(exit 5): rbd: export-diff error"),
        // A complete stream, but rbd exits non-zero afterwards.
        ("$REAL \"$@\"; exit 3", "(exit 3)"),
    ];
    for (script, want) in cases {
        let path = fake_rbd(work.path(), script);
        let out = server.client_env(&[("PATH", &path)], &["push", "vm1", "--force"]);
        let err = String::from_utf8_lossy(&out.stderr);
        println!("injected `{script}`: {}", err.trim());
        assert_eq!(out.status.code(), Some(1), "{script}: {err}");
        assert!(err.contains(want), "{script}: want {want:?} in: {err}");
        assert!(err.contains("nothing was committed"), "{err}");
        // The server drops the partial revision once it sees the stream reset.
        wait_for(
            "the partial revision to go",
            std::time::Duration::from_secs(30),
            || server.snapshot_tree() == before,
        );
        assert_eq!(
            img.backy_snapshots(),
            [format!("backy-{id1}")],
            "the failed push's snapshot is removed"
        );
    }

    // A failing pre-snapshot hook: no snapshot, post-snapshot still ran.
    std::fs::write(format!("{}.fail", log.display()), "").unwrap();
    let _ = std::fs::remove_file(&log);
    let out = server.client(&["push", "vm1", "--force"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("pre-snapshot hook") && err.contains("(exit 1)"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "post\n");
    assert_eq!(img.backy_snapshots(), [format!("backy-{id1}")]);
    std::fs::remove_file(format!("{}.fail", log.display())).unwrap();

    // And the next good push is an incremental one; this time with the
    // source on the command line and the cluster from the environment.
    let source = format!("rbd:{}", img.spec());
    let (id2, _, sent) = push_args(
        &server,
        &[("CEPH_CONF", conf.to_str().unwrap())],
        &["push", "vm1", "--force", "--json", "--source", &source],
    );
    assert!(sent <= 2 * MIB + 64 * 1024, "sent {sent}");
    assert_eq!(img.backy_snapshots(), [format!("backy-{id2}")]);
    let export = work.path().join("export");
    img.export(Some(&format!("backy-{id2}")), &export);
    let restored = work.path().join("restored");
    server.client_ok(&["restore", "vm1", restored.to_str().unwrap()]);
    assert_eq!(file_hash(&restored), file_hash(&export));
}

/// Deduplicated transfer from Ceph (issue 31): an RBD image with the same
/// data as one another job of the same client stored (a clone of one
/// template) sends, in its first push, the digests of its blocks and none
/// of their data; the server clones the stored copies, checked by digest,
/// and the revision restores to the image's export.
#[test]
fn a_first_push_of_a_template_clone_sends_no_block_the_server_holds() {
    must_be_root();
    let Some(conf) = ceph_conf() else { return };
    let fs = LoopFs::new("btrfs", 1 << 30);
    let work = tempfile::tempdir().unwrap();
    let size = 6 * BLOCK;
    let writes: Vec<(u64, Vec<u8>)> = (0..4u64)
        .map(|b| (b * BLOCK, pattern(40 + b, BLOCK as usize)))
        .collect();
    let template = Image::new(&conf, "tmpl", size);
    template.apply(size, &writes, &[]);
    let clone = Image::new(&conf, "clone", size);
    clone.apply(size, &writes, &[]);
    let source = |img: &Image| {
        format!(
            "source: {{type: ceph-rbd, pool: rbd, image: {}, conf: {}}}",
            img.name,
            img.conf.display()
        )
    };
    let server = Server::start(
        &fs.mount.join("base"),
        &format!(
            "  vm1:\n    schedule: none\n    {}\n  vm2:\n    schedule: none\n    {}\n",
            source(&template),
            source(&clone)
        ),
    );
    let (_, _, sent1) = push_json(&server, &[], "vm1");
    assert!(sent1 >= 4 * BLOCK, "the template is sent: {sent1}");
    let out = server.client(&["push", "vm2", "--force", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Four data blocks, each asked about with its 32-byte digest.
    assert_eq!(v["bytes_sent"].as_u64(), Some(4 * 32), "{v}");
    assert_eq!(
        v["revision"]["bytes_deduplicated"].as_u64(),
        Some(4 * BLOCK),
        "{v}"
    );
    let id = v["revision"]["id"].as_str().unwrap().to_string();
    let want = work.path().join("clone.img");
    clone.export(Some(&format!("backy-{id}")), &want);
    let got = work.path().join("restored.img");
    server.client_ok(&["restore", "vm2", got.to_str().unwrap()]);
    assert_eq!(file_hash(&got), file_hash(&want));
}

/// Issue 34, item 1, for Ceph: a group of two RBD images (the disks of
/// one VM) pushed by `push GROUP`: both snapshots are taken inside the one
/// freeze window the group's hooks make (the pre-snapshot hook sees
/// neither new snapshot, the post-snapshot hook both), writes to both
/// images straddle it, and each revision restores to its image's model
/// at the instant and records the same group instant. A disk the server
/// refuses fails the whole instant: none of it is committed.
#[test]
fn a_group_of_rbd_images_is_snapshotted_in_one_freeze_window() {
    must_be_root();
    let Some(conf) = ceph_conf() else { return };
    let fs = LoopFs::new("btrfs", 2 << 30);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let size = 4 * BLOCK;
    let images = [Image::new(&conf, "g0", size), Image::new(&conf, "g1", size)];
    let mut models = [vec![0u8; size as usize], vec![0u8; size as usize]];
    let write = |models: &mut [Vec<u8>; 2], i: usize, off: u64, data: Vec<u8>| {
        images[i].apply(size, &[(off, data.clone())], &[]);
        models[i][off as usize..off as usize + data.len()].copy_from_slice(&data);
    };
    let jobs: String = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            format!(
                "  vm1-{i}:\n    schedule: none\n    source: {{type: ceph-rbd, pool: rbd, image: {}, conf: {}}}\n",
                img.name,
                conf.display()
            )
        })
        .collect();
    let server = Server::start(&fs.mount.join("base"), &jobs);
    // Each hook logs how many backy snapshots each image has.
    let (log, pause, at) = (w.join("hooks.log"), w.join("pause"), w.join("at-instant"));
    let count = images
        .iter()
        .map(|img| {
            format!(
                "rbd --conf {} snap ls {} | grep -c backy- ; ",
                conf.display(),
                img.spec()
            )
        })
        .collect::<String>();
    let hook = |what: &str| {
        format!(
            "({count}echo {what}) | tr \"\\n\" \" \" >> {l}; echo >> {l}",
            l = log.display()
        )
    };
    let hold = format!(
        "if [ -e {p} ]; then touch {a}; while [ -e {a} ]; do sleep 0.05; done; fi",
        p = pause.display(),
        a = at.display()
    );
    let mut client_yaml = std::fs::read_to_string(&server.client_config).unwrap();
    client_yaml.push_str(&format!(
        "groups:\n  vm1:\n    jobs: [vm1-0, vm1-1]\n    hooks:\n      pre-snapshot: '{}'\n      \
         post-snapshot: '{}; {hold}'\n      hook-timeout: 60\n",
        hook("pre"),
        hook("post"),
    ));
    std::fs::write(&server.client_config, client_yaml).unwrap();

    // A group push with the instant held: `during` writes after it.
    let push = |models: &mut [Vec<u8>; 2], during: &dyn Fn(&mut [Vec<u8>; 2])| -> (Value, [Vec<u8>; 2]) {
        std::fs::write(&pause, "").unwrap();
        let (out, at_instant) = std::thread::scope(|s| {
            let client = s.spawn(|| server.client(&["--json", "push", "vm1"]));
            wait_for("the group's instant", std::time::Duration::from_secs(60), || {
                at.exists() || client.is_finished()
            });
            assert!(at.exists(), "the push ended before its instant");
            let at_instant = models.clone();
            during(models);
            std::fs::remove_file(&pause).unwrap();
            std::fs::remove_file(&at).unwrap();
            (client.join().unwrap(), at_instant)
        });
        assert!(
            out.status.success(),
            "group push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["complete"], true, "{doc}");
        (doc, at_instant)
    };
    let check = |doc: &Value, at_instant: &[Vec<u8>; 2]| {
        let instant = doc["instant"].as_str().unwrap();
        for (i, model) in at_instant.iter().enumerate() {
            let job = format!("vm1-{i}");
            let rev = &doc["disks"][i]["pushed"]["revision"];
            assert_eq!(
                rev["group"],
                serde_json::json!({"name": "vm1", "instant": instant, "disks": 2}),
                "{doc}"
            );
            let id = rev["id"].as_str().unwrap();
            assert_eq!(images[i].backy_snapshots(), [format!("backy-{id}")]);
            let stored = server.revisions(&job);
            assert_eq!(stored.last().unwrap()["group"], rev["group"]);
            let out = w.join(format!("restored-{id}"));
            server.client_ok(&["restore", &job, "-r", id, out.to_str().unwrap()]);
            assert!(
                std::fs::read(&out).unwrap() == *model,
                "{job} revision {id} is its image at the instant"
            );
        }
    };
    let straddle = |m: &mut [Vec<u8>; 2]| {
        // The guest thawed: its writes are after the instant, on both.
        let data = pattern(9, 70_000);
        for i in [1, 0] {
            images[i].apply(size, &[(BLOCK + 5, data.clone())], &[]);
            m[i][BLOCK as usize + 5..BLOCK as usize + 5 + data.len()].copy_from_slice(&data);
        }
    };

    // 1. Full: data on both, then the writes after the instant.
    write(&mut models, 0, 0, pattern(1, 100_000));
    write(&mut models, 1, 3 * BLOCK - 10, pattern(2, 5_000));
    let (first, at1) = push(&mut models, &straddle);
    check(&first, &at1);
    // 2. Incremental, the same again.
    write(&mut models, 0, 2 * BLOCK, pattern(3, 4096));
    write(&mut models, 1, 0, pattern(4, 10));
    let (second, at2) = push(&mut models, &straddle);
    check(&second, &at2);
    assert_ne!(first["instant"], second["instant"]);
    assert_eq!(
        second["disks"][0]["pushed"]["revision"]["parent_id"],
        first["disks"][0]["pushed"]["revision"]["id"]
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "0 0 pre \n1 1 post \n1 1 pre \n2 2 post \n",
        "both snapshots inside each freeze window"
    );
    // 3. One disk refused (its image shrank: the server refuses it after
    // the other disk was pushed and held): nothing of the instant is
    // committed, and each image keeps the snapshot of its last revision.
    let kept: Vec<Vec<String>> = images.iter().map(|i| i.backy_snapshots()).collect();
    let shrink = std::process::Command::new("rbd")
        .args([
            "--conf",
            conf.to_str().unwrap(),
            "resize",
            "--allow-shrink",
            "--size",
        ])
        .arg(format!("{}B", 3 * BLOCK))
        .arg(images[1].spec())
        .output()
        .unwrap();
    assert!(
        shrink.status.success(),
        "{}",
        String::from_utf8_lossy(&shrink.stderr)
    );
    let out = server.client(&["--json", "push", "vm1"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let third: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(third["complete"], false, "{third}");
    assert_eq!(
        third["disks"][0]["error"], "not committed: vm1-1 of the group failed",
        "{third}"
    );
    assert!(
        third["disks"][1]["error"]
            .as_str()
            .unwrap()
            .contains("the source has"),
        "{third}"
    );
    for (i, img) in images.iter().enumerate() {
        assert_eq!(
            server.revisions(&format!("vm1-{i}")).len(),
            2,
            "vm1-{i}: nothing committed"
        );
        assert_eq!(img.backy_snapshots(), kept[i], "vm1-{i}: the new snapshot went");
    }
}

/// An encrypted job (docs/encryption.md) with a Ceph RBD source: a full
/// and an incremental push from `rbd export-diff` store ciphertext that
/// decrypts to the snapshot, the incremental sends about its changed
/// granules, `verify --source` compares the encrypted snapshot, and
/// restores into a file and an RBD image equal the snapshots.
#[test]
fn an_encrypted_rbd_job_pushes_incrementally_and_restores() {
    must_be_root();
    let Some(conf) = ceph_conf() else { return };
    let fs = LoopFs::new("btrfs", 2 << 30);
    let work = tempfile::tempdir().unwrap();
    let size = 10 * BLOCK + 8192;
    let img = Image::new(&conf, "enc", size);
    let base = fs.mount.join("base");
    let server = Server::start(&base, &job_yaml(&img, ""));
    let key = work.path().join("vm1.key");
    server.client_ok(&["keygen", key.to_str().unwrap()]);
    let client_yaml = std::fs::read_to_string(&server.client_config).unwrap();
    let client_yaml = client_yaml.replace(
        "    source:",
        &format!("    encryption:\n      key-file: {}\n    source:", key.display()),
    );
    assert!(client_yaml.contains("key-file"), "{client_yaml}");
    std::fs::write(&server.client_config, client_yaml).unwrap();

    img.apply(
        size,
        &[
            (0, pattern(1, 100_000)),
            (5 * BLOCK + 7, pattern(3, MIB as usize)),
        ],
        &[],
    );
    let (id1, _, _) = push_json(&server, &[], "vm1");
    let g = 64 << 10;
    img.apply(
        size,
        &[(2 * BLOCK + 123, pattern(5, 4096)), (size - 10, pattern(7, 10))],
        &[],
    );
    let (id2, read2, sent2) = push_json(&server, &[], "vm1");
    println!("encrypted incremental: {read2} bytes read, {sent2} bytes sent");
    // Each write's granule, whole (ciphertext of a granule depends on all
    // of it); the last granule is the image's short tail.
    assert!(sent2 <= 2 * g, "sent {sent2}");
    let out = server.client_ok(&["verify", "vm1", "--source"]);
    assert!(out.contains("equal the source"), "{out}");

    let snap = work.path().join("snap.img");
    img.export(Some(&format!("backy-{id2}")), &snap);
    let revs = server.revisions("vm1");
    let stored = base.join("vm1").join(revs[1]["id"].as_str().unwrap());
    assert_ne!(file_hash(&stored), file_hash(&snap), "ciphertext on the server");
    let decrypted = work.path().join("decrypted.img");
    server.client_ok(&[
        "decrypt",
        "--key-file",
        key.to_str().unwrap(),
        stored.to_str().unwrap(),
        decrypted.to_str().unwrap(),
    ]);
    assert_eq!(file_hash(&decrypted), file_hash(&snap));
    let restored = work.path().join("restored.img");
    server.client_ok(&["restore", "vm1", restored.to_str().unwrap()]);
    assert_eq!(file_hash(&restored), file_hash(&snap));
    // Into a new RBD image.
    let target = Image {
        conf: conf.clone(),
        name: format!("backy-test-{}-enc-target", std::process::id()),
    };
    let env = [("CEPH_CONF", conf.to_str().unwrap())];
    let out = server.client_env(
        &env,
        &["restore", "vm1", "-r", &id2, &format!("rbd:{}", target.spec())],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back = work.path().join("back.img");
    target.export(None, &back);
    assert_eq!(file_hash(&back), file_hash(&snap));
    let _ = id1;
}

/// A push of `vm1` with `--json` and extra arguments; the parsed output.
fn push_value(server: &Server, env: &[(&str, &str)], extra: &[&str]) -> Value {
    let mut args = vec!["push", "vm1", "--force", "--json"];
    args.extend_from_slice(extra);
    let out = server.client_env(env, &args);
    assert!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("push --json")
}

/// Issue 34: Ceph's `rbd diff` is audited like the other change trackers.
/// The lie is made real by hand: a write after the parent revision's
/// snapshot, then that snapshot removed and taken again under its name, so
/// `rbd diff --from-snap` no longer names the write.
#[test]
fn the_audit_catches_an_rbd_diff_that_misses_a_write() {
    must_be_root();
    let Some(conf) = ceph_conf() else { return };
    let fs = LoopFs::new("btrfs", 1 << 30);
    let work = tempfile::tempdir().unwrap();
    let size = 8 * BLOCK;
    let img = Image::new(&conf, "audit", size);
    let server = Server::start(&fs.mount.join("base"), &job_yaml(&img, ""));
    img.apply(size, &[(0, pattern(1, 4096)), (5 * BLOCK, pattern(2, 8192))], &[]);
    let full = push_value(&server, &[], &[]);
    assert!(full.get("audit").is_none(), "no parent, nothing to audit: {full}");
    let id1 = full["revision"]["id"].as_str().unwrap().to_string();

    // Block 5 written "before" the parent snapshot as Ceph now sees it;
    // block 1 after it (the only change `rbd diff` names).
    let parent_snap = format!("{}@backy-{id1}", img.spec());
    img.apply(size, &[(5 * BLOCK + 100, pattern(3, 4096))], &[]);
    img.rbd_ok(&["snap", "rm", "--no-progress", &parent_snap]);
    img.rbd_ok(&["snap", "create", "--no-progress", &parent_snap]);
    img.apply(size, &[(BLOCK, pattern(4, 4096))], &[]);
    let caught = push_value(&server, &[], &["--audit-sample", "100%"]);
    println!("audit at 100 %: {}", caught["audit"]);
    assert_eq!(caught["audit"]["tracker"], "ceph-rbd-diff", "{caught}");
    assert_eq!(caught["audit"]["sampled"].as_u64(), Some(7), "{caught}");
    assert_eq!(caught["audit"]["mismatched"].as_u64(), Some(1), "{caught}");
    let id2 = caught["revision"]["id"].as_str().unwrap().to_string();
    let revs = server.revisions("vm1");
    assert_eq!(revs[1]["audit"]["mismatched"].as_u64(), Some(1), "{}", revs[1]);
    // The whole snapshot was compared: the revision holds the missed write.
    let want = work.path().join("want2");
    img.export(Some(&format!("backy-{id2}")), &want);
    let got = work.path().join("got2");
    server.client_ok(&["restore", "vm1", "-r", &id2, got.to_str().unwrap()]);
    assert_eq!(file_hash(&got), file_hash(&want), "the revision is the snapshot");
    let check = server.client(&["check", "vm1"]);
    let line = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{line}");
    assert!(
        line.starts_with("BACKY WARNING: vm1: change tracker Ceph rbd diff missed writes: 1 of 7 sampled unchanged blocks differ"),
        "{line}"
    );
    let status = server.client_ok(&["status", "vm1"]);
    assert!(
        status.contains("warning: change tracker Ceph rbd diff missed writes"),
        "{status}"
    );

    // An honest diff at the default sample (0.5 %: one block of 7).
    img.apply(size, &[(3 * BLOCK + 7, pattern(5, 100))], &[]);
    let clean = push_value(&server, &[], &[]);
    println!("audit at the default: {}", clean["audit"]);
    assert_eq!(clean["audit"]["sampled"].as_u64(), Some(1), "{clean}");
    assert_eq!(clean["audit"]["mismatched"].as_u64(), Some(0), "{clean}");
    assert_eq!(
        clean["bytes_read"].as_u64(),
        Some(BLOCK),
        "one changed object: {clean}"
    );
    let id3 = clean["revision"]["id"].as_str().unwrap().to_string();
    let (want, got) = (work.path().join("want3"), work.path().join("got3"));
    img.export(Some(&format!("backy-{id3}")), &want);
    server.client_ok(&["restore", "vm1", "-r", &id3, got.to_str().unwrap()]);
    assert_eq!(file_hash(&got), file_hash(&want));
    let check = server.client(&["check", "vm1"]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // Without qemu-nbd (a PATH with `rbd` only) the audit cannot read:
    // a one-line error naming the remedy, nothing committed; with the
    // audit off the same push goes through.
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink("/usr/bin/rbd", bin.join("rbd")).unwrap();
    let path = bin.to_str().unwrap();
    img.apply(size, &[(6 * BLOCK, pattern(6, 100))], &[]);
    let out = server.client_env(&[("PATH", path)], &["push", "vm1", "--force"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot start qemu-nbd")
            && err.contains("qemu-block-extra")
            && err.contains("audit-sample 0"),
        "{err}"
    );
    assert_eq!(server.revisions("vm1").len(), 3);
    assert_eq!(img.backy_snapshots(), [format!("backy-{id3}")]);
    let off = push_value(&server, &[("PATH", path)], &["--audit-sample", "0"]);
    assert!(off.get("audit").is_none(), "{off}");
    assert_eq!(server.revisions("vm1").len(), 4);
}
