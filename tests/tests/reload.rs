//! SIGHUP re-reads the server config: new jobs and schedule tags take
//! effect at once, a push running across the reload is not dropped and
//! commits, and a bad file or one changing what is fixed at start
//! (base-dir, listen, transport) is refused while the old config stays.

mod support;

use backy_proto::backy_client::BackyClient;
use backy_proto::push_frame::Frame;
use backy_proto::*;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CONFIG: &str = "
listen: 127.0.0.1:0
base-dir: BASE
insecure-plaintext: true
schedules:
  s: {daily: {interval: 1d, keep: 3}}
jobs:
  vm1: {schedule: s}
";

/// Rewrites the running server's config file (keeping its mode).
fn rewrite(server: &Server, text: &str) {
    let text = text.replace("BASE", &server.base.display().to_string());
    std::fs::write(&server.config_path, text).expect("rewrite config");
}

/// Rewrites the config, sends SIGHUP and returns the server's reload line.
fn reload(server: &Server, text: &str) -> String {
    rewrite(server, text);
    let mark = server.log_mark();
    server.hup();
    server.wait_log(mark, "reload")
}

fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_dropping_a_running_push() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    make_image(&img, 24 * MIB, &[(0, 6 * MIB), (16 * MIB, 2 * MIB)]);
    let srv = std::sync::Arc::new({
        let base = base.clone();
        blocking(move || Server::start_config(&base, CONFIG))
            .await
            .unwrap()
    });
    let s = srv.clone();
    let src = img.display().to_string();
    let parent = blocking(move || {
        s.client_ok(&["push", "vm1", "--source", &src]);
        s.revisions("vm1")[0]["id"].as_str().unwrap().to_string()
    })
    .await
    .unwrap();

    // Hold a push open across the reloads: begin and one frame, no end.
    let new_id = uuid::Uuid::new_v4().to_string();
    let mut client = BackyClient::connect(srv.url.clone()).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    let frames = [
        Frame::Begin(PushBegin {
            job: "vm1".into(),
            rev_id: new_id.clone(),
            parent_id: parent.clone(),
            size: 24 * MIB,
            block_size: 4 << 20,
            tags: vec!["daily".into()],
            source_kind: SourceKind::File as i32,
            ..Default::default()
        }),
        Frame::Data(DataRange {
            offset: 0,
            data: vec![1; 4096],
        }),
    ];
    for f in frames {
        tx.send(PushFrame { frame: Some(f) }).await.unwrap();
    }
    let held = tokio::spawn(async move { client.push(ReceiverStream::new(rx)).await });
    let s = srv.clone();
    blocking(move || {
        wait_for("the held push to run", std::time::Duration::from_secs(20), || {
            s.status_json("vm1")["jobs"][0]["running"] == true
        })
    })
    .await
    .unwrap();

    let s = srv.clone();
    blocking(move || {
        // A new job and a new schedule tag take effect at once.
        let grown = CONFIG
            .replace("keep: 3}}", "keep: 3}, weekly: {interval: 7d, keep: 2}}")
            + "  vm2: {schedule: s}\n";
        let line = reload(&s, &grown);
        assert!(line.contains("reloaded"), "{line}");
        assert!(s.revisions("vm2").is_empty(), "vm2 is known now");
        assert_eq!(s.status_json("vm1")["jobs"][0]["running"], true, "the push runs on");

        // A file that does not validate is refused; the old config stays.
        let line = reload(&s, &format!("{grown}  vm3: {{schedule: nope}}\n"));
        assert!(
            line.contains("unknown schedule") && line.contains("keeping the old configuration"),
            "{line}"
        );
        let out = s.client(&["status", "vm3"]);
        assert_eq!(out.status.code(), Some(1), "vm3 was not taken");
        assert!(s.revisions("vm2").is_empty(), "vm2 is still known");

        // What is fixed at start cannot change by reload.
        let moved = grown.replace("base-dir: BASE", "base-dir: /elsewhere") + "  vm3: {schedule: none}\n";
        let line = reload(&s, &moved);
        assert!(
            line.contains("base-dir cannot change without a restart"),
            "{line}"
        );
        let tls = grown.replace(
            "insecure-plaintext: true",
            "tls: {cert: /etc/backy/c.pem, key: /etc/backy/k.pem}\n\
             clients: {hv01: {token-hash: \"blake3:0000000000000000000000000000000000000000000000000000000000000000\"}}",
        );
        let line = reload(&s, &tls);
        assert!(
            line.contains("tls, insecure-plaintext cannot change without a restart"),
            "{line}"
        );
        assert_eq!(s.client(&["status", "vm3"]).status.code(), Some(1));
        rewrite(&s, &grown);
    })
    .await
    .unwrap();

    // The held push, begun before every reload, ends and commits.
    let mut sum = backy_common::checksum::StreamChecksum::new();
    sum.data(0, &[1; 4096]);
    let job_dir = srv.base.join("vm1");
    let end = Frame::End(PushEnd {
        stream_checksum: sum.finish().to_vec(),
        manifest_digest: manifest_digest_after(
            Some((&job_dir.join(&parent), &job_dir.join(format!("{parent}.digests")))),
            24 * MIB,
            4 << 20,
            &[(0, &[1u8; 4096][..])],
        ),
        audit: None,
    });
    tx.send(PushFrame { frame: Some(end) }).await.unwrap();
    drop(tx);
    let reply = held.await.unwrap().expect("the held push commits").into_inner();
    assert_eq!(reply.revision.unwrap().id, new_id);

    let s = srv.clone();
    blocking(move || {
        let revs = s.revisions("vm1");
        assert_eq!(revs.len(), 2);
        let stored = s.base.join("vm1").join(revs[1]["id"].as_str().unwrap());
        write_at(&img, 0, &[1; 4096]);
        assert_eq!(
            file_hash(&stored),
            file_hash(&img),
            "parent plus the pushed range"
        );
        s.client_ok(&["verify", "vm1", "-r", "all"]);
        // The job added by the reload backs up like any other.
        s.client_ok(&["push", "vm2", "--source", img.to_str().unwrap()]);
        let vm2 = s.revisions("vm2");
        assert_eq!(vm2.len(), 1);
        let tags = vm2[0]["tags"].as_array().unwrap();
        assert_eq!(
            tags.len(),
            2,
            "the first backup carries every tag, weekly too: {tags:?}"
        );
    })
    .await
    .unwrap();
}
