//! Push, restore and status over real gRPC against the in-memory fake
//! server: the client's whole pipeline (threads, channels, streams) short of
//! the real server's storage.

use crate::fake_server::Fake;
use crate::push::{push, PushArgs};
use crate::restore::{restore, RestoreArgs};
use backy_common::{ErrorKind, JobName};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

const BS: u32 = 64 << 10;
const B: u64 = BS as u64;

fn push_args(source: Option<&Path>) -> PushArgs {
    PushArgs {
        job: JobName::new("vm1").unwrap(),
        source: source.map(|p| p.display().to_string()),
        configured: None,
        config_name: "client.yaml".into(),
        force: false,
        tags: Vec::new(),
        allow_unscheduled: false,
        allow_shrink: false,
        changed_ranges: None,
    }
}

fn restore_args(revision: &str, target: &Path) -> RestoreArgs {
    RestoreArgs {
        job: JobName::new("vm1").unwrap(),
        revision: revision.into(),
        target: target.to_path_buf(),
        force: false,
    }
}

/// A sparse image: `size` bytes with `data` written at each offset.
fn write_image(path: &Path, size: u64, data: &[(u64, &[u8])]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (offset, bytes) in data {
        f.write_all_at(bytes, *offset).unwrap();
    }
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_restore_round_trip() {
    let (fake, mut client) = Fake::start(BS).await;
    let (_dir, dir) = temp();
    let src = dir.join("disk.img");
    let size = 32 * B + 100;
    write_image(&src, size, &[(5 * B + 3, &[1u8; 1000]), (32 * B + 10, b"tail")]);

    // Full backup: only the two blocks with data travel.
    let first = push(&mut client, &push_args(Some(&src)), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.bytes_sent, B + 100);
    assert_eq!(fake.state().last_push_data, [(5 * B, B as usize), (32 * B, 100)]);
    assert_eq!(first.revision.size, size);
    assert_eq!(first.revision.source_type, "file");
    let v1 = std::fs::read(&src).unwrap();

    // One byte changed: one block travels.
    patch(&src, 20 * B + 7, b"x");
    let second = push(&mut client, &push_args(Some(&src)), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fake.state().last_push_data, [(20 * B, B as usize)]);
    assert_eq!(
        second.revision.parent_id.as_deref(),
        Some(first.revision.id.as_str())
    );
    let v2 = std::fs::read(&src).unwrap();

    // Grown image: only the old short last block changes.
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(40 * B)
        .unwrap();
    push(&mut client, &push_args(Some(&src)), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fake.state().last_push_data, [(32 * B, B as usize)]);
    let v3 = std::fs::read(&src).unwrap();

    for (spec, want) in [("latest", &v3), ("1", &v2), (first.revision.id.as_str(), &v1)] {
        let out = dir.join(format!("restored-{spec}.img"));
        let restored = restore(&mut client, &restore_args(spec, &out), false)
            .await
            .unwrap();
        assert_eq!(&std::fs::read(&out).unwrap(), want, "{spec}");
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            allocated <= 4 * B,
            "{spec}: restore is sparse ({allocated} bytes allocated)"
        );
        assert!(restored.data_bytes <= 3 * B, "{}", restored.data_bytes);
    }

    let reply = crate::status::fetch(&mut client, None).await.unwrap();
    let text = crate::status::format_status(&reply);
    assert!(text.contains("3 revisions"), "{text}");
    assert!(text.contains(&second.revision.short_id), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_blocks_travel_in_small_frames() {
    let bs = 4u32 << 20;
    let (fake, mut client) = Fake::start(bs).await;
    let (_dir, dir) = temp();
    let src = dir.join("disk.img");
    let data: Vec<u8> = (0..9u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&src, &data).unwrap();
    let pushed = push(&mut client, &push_args(Some(&src)), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pushed.bytes_sent, data.len() as u64);
    let frames = fake.state().last_push_data.clone();
    assert_eq!(frames.len(), 9);
    assert!(frames.iter().all(|f| f.1 == 1 << 20));
    let out = dir.join("out.img");
    restore(&mut client, &restore_args("latest", &out), false)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_due_does_nothing_and_source_comes_from_the_server() {
    let (fake, mut client) = Fake::start(BS).await;
    let (_dir, dir) = temp();
    let src = dir.join("disk.img");
    write_image(&src, 3 * B, &[(0, b"boot")]);
    fake.state().due = false;
    assert!(push(&mut client, &push_args(None), false)
        .await
        .unwrap()
        .is_none());
    assert!(fake.state().revisions.is_empty());

    fake.state().due = true;
    let e = push(&mut client, &push_args(None), false).await.unwrap_err();
    assert!(
        e.message.starts_with("job vm1 is not listed in client.yaml"),
        "{}",
        e.message
    );
    let mut args = push_args(None);
    args.configured = Some(backy_common::source::SourceSpec::File {
        path: src.clone(),
        hooks: Default::default(),
    });
    let pushed = push(&mut client, &args, false).await.unwrap().unwrap();
    assert_eq!(pushed.bytes_sent, B);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_reach_the_operator() {
    let (fake, mut client) = Fake::start(BS).await;
    let (_dir, dir) = temp();
    let src = dir.join("disk.img");
    write_image(&src, 64 * B, &[(0, &[3u8; 64 << 10])]);

    let mut args = push_args(Some(&src));
    args.job = JobName::new("vm9").unwrap();
    let e = push(&mut client, &args, false).await.unwrap_err();
    assert_eq!(e.message, "unknown job vm9 (NOT_FOUND)");
    assert_eq!(e.kind, ErrorKind::NotFound);

    fake.state().fail_push = Some(tonic::Status::resource_exhausted("disk full"));
    let e = push(&mut client, &push_args(Some(&src)), false)
        .await
        .unwrap_err();
    assert_eq!(e.message, "disk full (RESOURCE_EXHAUSTED)");
    assert!(fake.state().revisions.is_empty());

    let e = push(&mut client, &push_args(Some(&dir.join("missing.img"))), false)
        .await
        .unwrap_err();
    assert!(e.message.contains("missing.img"), "{}", e.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_restore_streams_leave_no_file() {
    let (fake, mut client) = Fake::start(BS).await;
    let (_dir, dir) = temp();
    let src = dir.join("disk.img");
    write_image(&src, 8 * B, &[(2 * B, b"data"), (7 * B, b"more")]);
    push(&mut client, &push_args(Some(&src)), false)
        .await
        .unwrap()
        .unwrap();
    let out = dir.join("out.img");

    fake.state().corrupt_restore = true;
    let e = restore(&mut client, &restore_args("latest", &out), false)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::DataLoss);
    assert!(
        e.message.contains(&format!("block at offset {}", 2 * B)),
        "{}",
        e.message
    );

    fake.state().corrupt_restore = false;
    fake.state().truncate_restore = true;
    let e = restore(&mut client, &restore_args("latest", &out), false)
        .await
        .unwrap_err();
    assert!(e.message.contains("ended early"), "{}", e.message);

    let e = restore(&mut client, &restore_args("7", &out), false)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = restore(&mut client, &restore_args("all", &out), false)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);

    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["disk.img"]);

    // An existing file needs --force; with it the restore replaces it.
    fake.state().truncate_restore = false;
    std::fs::write(&out, b"precious").unwrap();
    let e = restore(&mut client, &restore_args("latest", &out), false)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    let mut args = restore_args("latest", &out);
    args.force = true;
    restore(&mut client, &args, false).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}
