//! The client library's flows (push, restore, status) driven directly
//! against a real `backy-server` process: what a full and an incremental
//! push send, restores of every revision, a push that is not due, sources
//! from the client config only, server refusals reaching the operator, and
//! bad restore streams leaving no file behind.

mod support;

use backy_client::connect::{connect_with, Client, Credentials};
use backy_client::progress::Silent;
use backy_client::push::{push, PushArgs};
use backy_client::restore::{restore, RestoreArgs};
use backy_common::ranges::GRANULE;
use backy_common::source::SourceSpec;
use backy_common::{ErrorKind, JobName};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use support::*;

fn push_args(job: &str, source: Option<&Path>) -> PushArgs {
    PushArgs {
        job: JobName::new(job).unwrap(),
        source: source.map(|p| p.display().to_string()),
        configured: None,
        config_name: "client.yaml".into(),
        force: true,
        tags: Vec::new(),
        allow_unscheduled: false,
        allow_shrink: false,
        changed_ranges: None,
        audit_sample: Default::default(),
        bwlimit: None,
        group: None,
        key: None,
        new_key: false,
    }
}

fn restore_args(revision: &str, target: &Path) -> RestoreArgs {
    RestoreArgs {
        job: JobName::new("vm1").unwrap(),
        revision: revision.into(),
        target: target.to_path_buf(),
        force: false,
        full: false,
        quiet: true,
        key: None,
    }
}

async fn start(jobs: &str) -> (tempfile::TempDir, Server, Client) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let jobs = jobs.to_string();
    let server = tokio::task::spawn_blocking(move || Server::start(&base, &jobs))
        .await
        .unwrap();
    let client = connect_with(&server.url, &Credentials::default()).await.unwrap();
    (dir, server, client)
}

/// The granule digests of one changed 4 MiB block in the exchange.
const DIGESTS: u64 = 64 * 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_restore_round_trip() {
    let (dir, server, mut client) = start("  vm1: {schedule: none}\n").await;
    let src = dir.path().join("disk.img");
    let size = 32 * BLOCK + 100;
    make_image(&src, size, &[]);
    write_at(&src, 5 * BLOCK + 3, &[1u8; 1000]);
    write_at(&src, 32 * BLOCK + 10, b"tail");

    // Full backup: the granule with data and the short last block travel.
    let first = push(&mut client, &push_args("vm1", Some(&src)), &Silent)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.bytes_sent, GRANULE + 100);
    assert_eq!(
        first.revision.bytes_received,
        GRANULE + 100,
        "the server got what was sent"
    );
    assert_eq!(first.revision.size, size);
    assert_eq!(first.revision.source_type, "file");
    let v1 = std::fs::read(&src).unwrap();

    // One byte changed: one granule travels, after the granule digests of
    // its block (64 of 16 bytes).
    write_at(&src, 20 * BLOCK + 7, b"x");
    let second = push(&mut client, &push_args("vm1", Some(&src)), &Silent)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.bytes_sent, GRANULE + DIGESTS);
    assert_eq!(second.revision.bytes_received, GRANULE);
    assert_eq!(
        second.revision.parent_id.as_deref(),
        Some(first.revision.id.as_str())
    );
    let v2 = std::fs::read(&src).unwrap();

    // Grown image: the old short last block grows; nothing else is sent.
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(40 * BLOCK)
        .unwrap();
    let third = push(&mut client, &push_args("vm1", Some(&src)), &Silent)
        .await
        .unwrap()
        .unwrap();
    // The grown block differs from the parent's short one, but its data
    // granule is the parent's bytes on the server already: only the
    // block's granule digests travel.
    assert_eq!(third.bytes_sent, DIGESTS, "the grown block's digests");
    let v3 = std::fs::read(&src).unwrap();

    for (spec, want) in [("latest", &v3), ("1", &v2), (first.revision.id.as_str(), &v1)] {
        let out = dir.path().join(format!("restored-{spec}.img"));
        let restored = restore(&mut client, &restore_args(spec, &out), &Silent)
            .await
            .unwrap();
        assert!(
            &std::fs::read(&out).unwrap() == want,
            "{spec}: restored bytes differ"
        );
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            allocated <= 4 * GRANULE,
            "{spec}: restore is sparse ({allocated} bytes allocated)"
        );
        assert!(restored.data_bytes <= 3 * GRANULE, "{}", restored.data_bytes);
    }

    let reply = backy_client::status::fetch(&mut client, &JobName::new("vm1").unwrap())
        .await
        .unwrap();
    let text = backy_client::status::format_status(&reply, chrono::Utc::now());
    assert!(text.contains("3 revisions"), "{text}");
    assert!(text.contains(&second.revision.id), "{text}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_due_does_nothing_and_the_source_comes_from_the_client_config() {
    let jobs = "  vm1: {schedule: s}\n";
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nschedules:\n  s: {{daily: {{interval: 1d, keep: 3}}}}\njobs:\n{jobs}"
    );
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let server = tokio::task::spawn_blocking(move || Server::start_config(&base, &config))
        .await
        .unwrap();
    let mut client = connect_with(&server.url, &Credentials::default()).await.unwrap();
    let src = dir.path().join("disk.img");
    make_image(&src, 3 * BLOCK, &[]);
    write_at(&src, 0, b"boot");

    // The job's entry in the client config: the first backup is due.
    let mut args = push_args("vm1", None);
    args.force = false;
    args.configured = Some(SourceSpec::File {
        path: src.clone(),
        hooks: Default::default(),
    });
    let pushed = push(&mut client, &args, &Silent).await.unwrap().unwrap();
    assert_eq!(pushed.bytes_sent, GRANULE);
    // Backed up a moment ago: not due, nothing happens.
    assert!(push(&mut client, &args, &Silent).await.unwrap().is_none());
    // Neither --source nor a client.yaml entry: nothing is read or sent,
    // even when forced.
    args.configured = None;
    args.force = true;
    let e = push(&mut client, &args, &Silent).await.unwrap_err();
    assert!(
        e.message.starts_with("job vm1 is not listed in client.yaml"),
        "{}",
        e.message
    );
    assert_eq!(server.revisions("vm1").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refusals_reach_the_operator() {
    let (dir, server, mut client) = start("  vm1: {schedule: none, max-size: 1M}\n").await;
    let src = dir.path().join("disk.img");
    make_image(&src, 64 * MIB, &[(0, MIB)]);

    let e = push(&mut client, &push_args("vm9", Some(&src)), &Silent)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(
        e.message.contains("vm9") && e.message.ends_with("(NOT_FOUND)"),
        "{}",
        e.message
    );

    let e = push(&mut client, &push_args("vm1", Some(&src)), &Silent)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::ResourceExhausted);
    assert!(
        e.message.contains("max-size") && e.message.ends_with("(RESOURCE_EXHAUSTED)"),
        "{}",
        e.message
    );
    assert!(server.revisions("vm1").is_empty());

    let missing = dir.path().join("missing.img");
    let e = push(&mut client, &push_args("vm1", Some(&missing)), &Silent)
        .await
        .unwrap_err();
    assert!(e.message.contains("missing.img"), "{}", e.message);
}

/// The files in `dir`, sorted, besides `only` (which must be there).
fn only_file(dir: &Path, only: &Path) -> bool {
    files_in(dir) == [only.to_path_buf()]
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_restore_streams_leave_no_file() {
    let (dir, mut server, mut client) = start("  vm1: {schedule: none}\n").await;
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let src = work.join("disk.img");
    make_image(&src, 8 * BLOCK, &[(2 * BLOCK, 3 * MIB), (7 * BLOCK, MIB)]);
    let pushed = push(&mut client, &push_args("vm1", Some(&src)), &Silent)
        .await
        .unwrap()
        .unwrap();
    let out = work.join("out.img");

    // A stored block damaged on the server's disk: the client's check
    // against the manifest refuses the restore.
    let stored = server.base.join("vm1").join(&pushed.revision.id);
    write_at(&stored, 2 * BLOCK + 10, b"rot");
    let e = restore(&mut client, &restore_args("latest", &out), &Silent)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::DataLoss);
    assert!(
        e.message.contains(&format!("block at offset {}", 2 * BLOCK)),
        "{}",
        e.message
    );
    assert!(only_file(&work, &src), "{:?}", files_in(&work));
    write_at(
        &stored,
        2 * BLOCK + 10,
        &std::fs::read(&src).unwrap()[(2 * BLOCK + 10) as usize..][..3],
    );

    // The server dies in the middle of the stream.
    let mut server = tokio::task::spawn_blocking(move || {
        server.restart_with_env(&[("BACKY_FAULT", "restore.data-sent@2")]);
        server
    })
    .await
    .unwrap();
    let mut broken = connect_with(&server.url, &Credentials::default()).await.unwrap();
    let e = restore(&mut broken, &restore_args("latest", &out), &Silent)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.kind,
            ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::DataLoss
        ),
        "{e:?}"
    );
    assert!(only_file(&work, &src), "no file left: {e}: {:?}", files_in(&work));
    server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    let mut client = connect_with(&server.url, &Credentials::default()).await.unwrap();

    let e = restore(&mut client, &restore_args("7", &out), &Silent)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = restore(&mut client, &restore_args("all", &out), &Silent)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(only_file(&work, &src), "{:?}", files_in(&work));

    // An existing file needs force; with it (and --full: it has another
    // size) the restore replaces it.
    std::fs::write(&out, b"precious").unwrap();
    let e = restore(&mut client, &restore_args("latest", &out), &Silent)
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let mut args = restore_args("latest", &out);
    args.force = true;
    let e = restore(&mut client, &args, &Silent).await.unwrap_err();
    assert!(e.message.contains("give --full"), "{}", e.message);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    args.full = true;
    restore(&mut client, &args, &Silent).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
}
