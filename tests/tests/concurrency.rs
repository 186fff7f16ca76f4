//! While a push is running: a second push of the same job is refused,
//! status/restore/verify keep working, and the push's parent cannot be
//! forgotten. A full filesystem fails a push cleanly and keeps everything
//! stored before.

mod support;

use backy_proto::backy_client::BackyClient;
use backy_proto::push_frame::Frame;
use backy_proto::*;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_push_blocks_only_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    // More data than the server buffers ahead, so a restore stays open.
    make_image(&img, 96 * MIB, &[(0, 64 * MIB)]);
    let server = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || Server::start(&base, "  vm1: {schedule: none}\n"))
            .await
            .unwrap()
    };
    let srv = std::sync::Arc::new(server);
    let run = |args: Vec<String>| {
        let srv = srv.clone();
        tokio::task::spawn_blocking(move || srv.client(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let out = run(vec![
        "push".into(),
        "vm1".into(),
        "--source".into(),
        img.display().to_string(),
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let parent = srv.revisions("vm1")[0]["id"].as_str().unwrap().to_string();

    // Hold a push open: begin plus one frame, no end.
    let mut client = BackyClient::connect(srv.url.clone()).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(PushFrame {
        frame: Some(Frame::Begin(PushBegin {
            job: "vm1".into(),
            rev_id: uuid::Uuid::new_v4().to_string(),
            parent_id: parent.clone(),
            size: 32 * MIB,
            block_size: 4 << 20,
            source_kind: SourceKind::File as i32,
            // Smaller than its parent, on purpose.
            allow_shrink: true,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    tx.send(PushFrame {
        frame: Some(Frame::Data(DataRange {
            offset: 0,
            data: vec![1; 4096],
        })),
    })
    .await
    .unwrap();
    let held = tokio::spawn(async move { client.push(ReceiverStream::new(rx)).await });
    wait_for_running(&srv).await;

    // A second push of the same job is refused at once with a clear error.
    let out = run(vec![
        "push".into(),
        "vm1".into(),
        "--source".into(),
        img.display().to_string(),
    ])
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("busy") && err.contains("ABORTED"), "{err}");
    // Status, restore and verify work meanwhile.
    assert_eq!(srv.status_json("vm1")["jobs"][0]["running"], true);
    let target = dir.path().join("r.img");
    let out = run(vec!["restore".into(), "vm1".into(), target.display().to_string()])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "restore during a push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(file_hash(&target), file_hash(&img));
    let out = run(vec!["verify".into(), "vm1".into()]).await.unwrap();
    assert!(
        out.status.success(),
        "verify during a push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The base of the running push cannot be forgotten (it is in use).
    let out = run(vec!["forget".into(), "vm1".into(), "-r".into(), "latest".into()])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(srv.revisions("vm1").len(), 1);

    // Dropping the held stream without an end frame commits nothing.
    drop(tx);
    let res = held.await.unwrap();
    assert!(res.is_err(), "a push without end frame fails");
    assert_eq!(srv.revisions("vm1").len(), 1);
    let out = run(vec![
        "push".into(),
        "vm1".into(),
        "--source".into(),
        img.display().to_string(),
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the next push works: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A revision being restored cannot be forgotten: hold a restore stream
    // open after its first frame.
    let mut client = BackyClient::connect(srv.url.clone()).await.unwrap();
    let mut stream = client
        .restore(RestoreRequest {
            job: "vm1".into(),
            revision: "0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let out = run(vec!["forget".into(), "vm1".into(), "-r".into(), "0".into()])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains("FAILED_PRECONDITION"),
        "{err}"
    );
    drop(stream);
    assert_eq!(srv.revisions("vm1").len(), 2);
}

async fn wait_for_running(srv: &std::sync::Arc<Server>) {
    let srv = srv.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(
            "the held push to be running",
            std::time::Duration::from_secs(20),
            || srv.status_json("vm1")["jobs"][0]["running"] == true,
        )
    })
    .await
    .unwrap();
}

#[test]
fn full_disk_fails_the_push_cleanly() {
    let fs = LoopFs::new("btrfs", 400 << 20);
    let base = fs.mount.join("backy");
    let work = tempfile::tempdir().unwrap();
    let small = work.path().join("small.img");
    let big = work.path().join("big.img");
    make_image(&small, 64 * MIB, &[(0, 16 * MIB)]);
    make_image(&big, 1 << 30, &[(0, 900 * MIB)]);
    let server = Server::start(&base, "  vm1: {schedule: none}\n  vm2: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", small.to_str().unwrap()]);
    let before = server.snapshot_tree();

    let out = server.client(&["push", "vm2", "--source", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no space left") && err.contains("RESOURCE_EXHAUSTED"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one-line reason: {err}");

    // The failed revision left nothing; the earlier one is intact; the
    // server keeps serving.
    wait_for(".partial cleaned", std::time::Duration::from_secs(20), || {
        std::fs::read_dir(base.join("vm2/.partial"))
            .map(|d| d.count() == 0)
            .unwrap_or(true)
    });
    assert!(server.revisions("vm2").is_empty());
    let after: Vec<_> = server
        .snapshot_tree()
        .into_iter()
        .filter(|(p, _, _)| !p.starts_with("vm2"))
        .collect();
    let before: Vec<_> = before
        .into_iter()
        .filter(|(p, _, _)| !p.starts_with("vm2"))
        .collect();
    assert_eq!(after, before, "vm1 unchanged");
    server.client_ok(&["verify", "vm1"]);
    let target = work.path().join("r.img");
    server.client_ok(&["restore", "vm1", target.to_str().unwrap()]);
    assert_eq!(file_hash(&target), file_hash(&small));
    server.client_ok(&["push", "vm1", "--force", "--source", small.to_str().unwrap()]);
}
