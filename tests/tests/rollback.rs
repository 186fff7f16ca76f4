//! Rollback (delta restore) end to end, real server and client processes
//! on btrfs: restoring a revision onto a target of its size that has since
//! changed reads the target, fetches only the granules that differ and
//! writes only those; a loop device rolls back the same way; a target of
//! another size is refused in one line unless `--full` replaces it; and
//! `--full` restores everything as before.

mod support;

use std::path::{Path, PathBuf};
use support::*;

const G: u64 = 64 << 10;
const MIB: u64 = 1 << 20;
/// The image: 64 MiB, data in its first 40 MiB.
const SIZE: u64 = 64 * MIB;
const DATA: u64 = 40 * MIB;

struct World {
    server: Server,
    work: PathBuf,
    src: PathBuf,
    /// The revision rolled back to and its image's hash.
    rev: String,
    rev_hash: String,
    _fs: LoopFs,
}

fn world() -> World {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let work = fs.mount.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let src = work.join("vm1.img");
    make_image(&src, SIZE, &[(0, DATA)]);
    let server = Server::start(&fs.mount.join("base"), "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let rev = server.revisions("vm1")[0]["id"].as_str().unwrap().to_string();
    World {
        rev_hash: file_hash(&src),
        server,
        work,
        src,
        rev,
        _fs: fs,
    }
}

/// Changes the image after the revision: one 4 KiB write inside each of
/// `n` granules spread over the data, one write into the hole (the
/// revision has zeros there: zeroed locally, nothing fetched); returns the
/// bytes of the changed data granules.
fn change(path: &Path, n: u64) -> u64 {
    for i in 0..n {
        let offset = i * (DATA / n) / G * G + (i % 16) * 4096;
        write_at(path, offset, &pattern(1000 + i, 4096));
    }
    write_at(path, DATA + 3 * MIB, &pattern(7, 4096));
    n * G
}

/// `restore --json` of the revision onto `target` with `extra` arguments.
fn restore_json(w: &World, target: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json", "restore", "vm1", "-r", &w.rev, target];
    args.extend_from_slice(extra);
    let out = w.server.client_ok(&args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in the restore result: {v}"))
}

#[test]
fn rollback_of_a_file_fetches_only_changed_granules() {
    must_be_root();
    let w = world();
    let target = w.work.join("target.img");
    sparse_copy(&w.src, &target);
    let changed = change(&target, 20);
    assert_ne!(file_hash(&target), w.rev_hash);
    let t = target.to_str().unwrap();

    // Without --force an existing file is still refused.
    let out = w.server.client(&["restore", "vm1", "-r", &w.rev, t]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));

    let r = restore_json(&w, t, &["--force"]);
    assert_eq!(file_hash(&target), w.rev_hash, "rolled back to the revision");
    assert_eq!(r["mode"], "rollback", "{r}");
    assert_eq!(
        field(&r, "fetched_bytes"),
        changed,
        "only the changed granules travel"
    );
    assert_eq!(field(&r, "read_bytes"), SIZE, "the target is read once");
    // The changed granules, and the granule zeroed in the hole.
    assert_eq!(field(&r, "written_bytes"), changed + G);

    // Nothing differs now: nothing travels or is written.
    let r = restore_json(&w, t, &["--force"]);
    assert_eq!((field(&r, "fetched_bytes"), field(&r, "written_bytes")), (0, 0));

    // The human line says what was read, fetched and written.
    change(&target, 3);
    let line = w
        .server
        .client_ok(&["restore", "vm1", "-r", &w.rev, t, "--force"]);
    assert!(
        line.contains("rolled back")
            && line.contains("read 64.00 MiB")
            && line.contains("fetched 192.00 KiB"),
        "{line}"
    );
    assert_eq!(file_hash(&target), w.rev_hash);

    // --full restores everything, as before.
    change(&target, 3);
    let r = restore_json(&w, t, &["--force", "--full"]);
    assert_eq!(r["mode"], "full", "{r}");
    assert_eq!(field(&r, "fetched_bytes"), DATA);
    assert_eq!(file_hash(&target), w.rev_hash);
}

#[test]
fn rollback_of_a_loop_device() {
    must_be_root();
    let w = world();
    let disk = w.work.join("disk.raw");
    sparse_copy(&w.src, &disk);
    let changed = change(&disk, 10);
    let dev = LoopDev::attach(&disk);
    let r = restore_json(&w, dev.path(), &["--force"]);
    assert_eq!(r["mode"], "rollback", "{r}");
    assert_eq!(field(&r, "fetched_bytes"), changed);
    assert_eq!(field(&r, "read_bytes"), SIZE);
    drop(dev);
    assert_eq!(file_hash(&disk), w.rev_hash, "the device holds the revision");
}

#[test]
fn a_target_of_another_size_is_refused() {
    must_be_root();
    let w = world();
    let target = w.work.join("bigger.img");
    sparse_copy(&w.src, &target);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap()
        .set_len(SIZE + MIB)
        .unwrap();
    let before = file_hash(&target);
    let t = target.to_str().unwrap();
    let out = w.server.client(&["restore", "vm1", "-r", &w.rev, t, "--force"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("67108864") && err.contains("68157440") && err.contains("--full"),
        "{err}"
    );
    assert_eq!(file_hash(&target), before, "refused: untouched");

    // A loop device of another size too.
    let dev = LoopDev::attach(&target);
    let out = w
        .server
        .client(&["restore", "vm1", "-r", &w.rev, dev.path(), "--force"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--full"), "{err}");
    drop(dev);
    assert_eq!(file_hash(&target), before, "refused: untouched");

    // --full replaces the file at the revision's size, as before.
    let r = restore_json(&w, t, &["--force", "--full"]);
    assert_eq!(r["mode"], "full", "{r}");
    assert_eq!(std::fs::metadata(&target).unwrap().len(), SIZE);
    assert_eq!(file_hash(&target), w.rev_hash);
}

/// A hostile rollback request is refused before anything is read: blocks
/// out of order, too many, digests of the wrong length, or mixed with a
/// replica's base.
#[test]
fn hostile_rollback_requests_are_refused() {
    use backy_proto::backy_client::BackyClient;
    use backy_proto::{GranuleDigests, RestoreRequest};
    must_be_root();
    let w = world();
    let digests = vec![0u8; 64 * 16];
    let of = |blocks: &[u64]| -> Vec<GranuleDigests> {
        blocks
            .iter()
            .map(|&block| GranuleDigests {
                block,
                digests: digests.clone(),
                ..Default::default()
            })
            .collect()
    };
    let many: Vec<u64> = (0..1025).map(|i| i % 16).collect();
    let cases = [
        (of(&[2, 1]), String::new(), "out of order"),
        (of(&[3, 3]), String::new(), "out of order"),
        (of(&[16]), String::new(), "the revision has 16"),
        (of(&many), String::new(), "at most 1024"),
        (
            vec![GranuleDigests {
                block: 0,
                digests: vec![0; 15],
                ..Default::default()
            }],
            String::new(),
            "granule digests of 15 bytes",
        ),
        (of(&[0]), w.rev.clone(), "cannot be combined"),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = BackyClient::connect(w.server.url.clone())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20);
        for (granules, base, want) in cases {
            let request = RestoreRequest {
                job: "vm1".into(),
                revision: w.rev.clone(),
                base,
                granules,
                ..Default::default()
            };
            let status = match c.restore(request).await {
                Err(s) => s,
                Ok(r) => r.into_inner().message().await.expect_err(want),
            };
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{want}: {status:?}");
            assert!(status.message().contains(want), "{want}: {}", status.message());
        }
    });
}
