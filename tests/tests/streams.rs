//! Long streams cannot starve short calls, and no reply has a size cap
//! (issue 28, items 7 and 8): pushes held open fill the stream executor
//! while `status`, `plan` and `tags` still answer at once; a job with
//! thousands of revisions is shown whole by `status JOB` and `--json`,
//! and listed whole by a replica.

mod support;

use backy_proto::backy_client::BackyClient;
use backy_proto::push_frame::Frame;
use backy_proto::*;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;
use tonic::Code;

/// More revisions than one 1 MiB message holds (~207 B each).
const REVISIONS: usize = 6_000;

/// A store of one job `job00000` with `revisions` revisions, written
/// directly (server/examples/scale_fixture.rs), not pushed.
fn fixture(base: &std::path::Path, revisions: usize) {
    let out = Command::new(bin("examples/scale_fixture"))
        .arg(base)
        .args(["1", &revisions.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `status JOB` of a `schedule: none` job with 6,000 revisions: the table
/// and `--json` carry every one (one unary reply capped near 1 MiB could
/// not).
#[test]
fn status_of_a_job_with_6000_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    fixture(&base, REVISIONS);
    let server = Server::start_config(
        &base,
        "listen: 127.0.0.1:0\nbase-dir: BASE\nscrub: {enabled: false}\njobs:\n  job00000: {schedule: none}\n",
    );
    let out = server.client(&["status", "job00000"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("== Summary\n6000 revisions, "), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&server.client_ok(&["status", "job00000", "--json"])).unwrap();
    let jobs = json["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    let revisions = jobs[0]["revisions"].as_array().unwrap();
    assert_eq!(revisions.len(), REVISIONS);
    // Oldest first, each once.
    let stamps: Vec<&str> = revisions
        .iter()
        .map(|r| r["timestamp"].as_str().unwrap())
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "oldest first");
    let ids: std::collections::BTreeSet<&str> = revisions.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), REVISIONS);
}

/// A client and a server of protocol 2 (without `StatusStream`, posed by
/// BACKY_FAULT): `status JOB` asks the one-message `Status` and works for
/// a small job; a job that outgrew one message fails with one line that
/// says which side to upgrade.
#[test]
fn status_from_a_server_of_protocol_2() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    fixture(&base, REVISIONS);
    let mut server = Server::start_config(
        &base,
        "listen: 127.0.0.1:0\nbase-dir: BASE\nscrub: {enabled: false}\n\
         jobs:\n  job00000: {schedule: none}\n  small: {schedule: none}\n",
    );
    server.restart_with_env(&[("BACKY_FAULT", "mode:protocol-2")]);
    let small: serde_json::Value =
        serde_json::from_str(&server.client_ok(&["status", "small", "--json"])).unwrap();
    assert_eq!(small["jobs"][0]["job"], "small");
    assert_eq!(small["jobs"][0]["revisions"], serde_json::json!([]));
    let out = server.client(&["status", "job00000"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(
            "backy-client: error: the server predates StatusStream (protocol 3) and sends a job's \
             revisions in one message, which job job00000 outgrew: upgrade backy-server: "
        ) && stderr.trim_end().ends_with("(OUT_OF_RANGE)")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
}

/// A replica reads the whole listing of a source job with 6,000
/// revisions: its round succeeds (it holds a newer revision of its own
/// and keeps its own retention, so it owes nothing and copies nothing).
#[test]
fn a_replica_lists_a_source_job_with_6000_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let source_base = dir.path().join("source");
    fixture(&source_base, REVISIONS);
    let source = Server::start_config(
        &source_base,
        "listen: 127.0.0.1:0\nbase-dir: BASE\nscrub: {enabled: false}\njobs:\n  job00000: {schedule: none}\n",
    );
    // The replica's own revision is made after the source's: newer.
    let replica_base = dir.path().join("replica");
    fixture(&replica_base, 1);
    // A copy of an earlier round (its directory marked as one), not a job
    // of the replica's own, which a replica never copies into.
    std::fs::write(replica_base.join("job00000/.copy"), format!("{}\n", source.url)).unwrap();
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nscrub: {{enabled: false}}\n\
         replicate: {{source: '{}', interval: 1h, jobs: [job00000]}}\n\
         schedules:\n  s: {{daily: {{interval: 1d, keep: 7}}}}\n\
         jobs:\n  job00000: {{schedule: s}}\n",
        source.url
    );
    let replica = Server::start_config(&replica_base, &config);
    let mut job = serde_json::Value::Null;
    wait_for("the replica's first round", Duration::from_secs(60), || {
        job = replica.status_json("job00000")["jobs"][0].clone();
        !job["replica"]["last_round"].is_null() || !job["replica"]["last_error"].is_null()
    });
    assert_eq!(job["replica"]["last_error"], serde_json::Value::Null, "{job}");
    assert_eq!(job["replica"]["missing"], 0, "{job}");
    assert_eq!(job["revisions"].as_array().unwrap().len(), 1, "{job}");
}

/// Threads of a process (`/proc/PID/status`).
fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads:")
}

/// 600 pushes held open after their begin frame (each would hold a thread
/// for as long as its client keeps it open): the stream executor takes
/// `max-streams` of them and refuses the rest at once with
/// RESOURCE_EXHAUSTED; `status`, `plan` and `tags` answer within 2 s
/// meanwhile (they used to queue behind the pushes for the blocking pool's
/// 512 threads until the pushes' idle timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_answer_while_long_streams_fill_the_server() {
    const PUSHES: usize = 600;
    const MAX_STREAMS: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let mut config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nscrub: {{enabled: false}}\n\
         limits: {{streams-per-client: 1000, idle-timeout: 90s, max-streams: {MAX_STREAMS}}}\n\
         jobs:\n  quiet: {{schedule: none}}\n"
    );
    for j in 0..PUSHES {
        config.push_str(&format!("  vm{j}: {{schedule: none}}\n"));
    }
    let server = tokio::task::spawn_blocking(move || Server::start_config(&base, &config))
        .await
        .unwrap();
    // At most 64 streams per connection: 10 connections of 60 pushes.
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(BackyClient::connect(server.url.clone()).await.unwrap());
    }
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut held = Vec::new();
    for j in 0..PUSHES {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(PushFrame {
            frame: Some(Frame::Begin(PushBegin {
                job: format!("vm{j}"),
                rev_id: uuid::Uuid::new_v4().to_string(),
                size: 8 << 20,
                block_size: 4 << 20,
                source_kind: SourceKind::File as i32,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        held.push(tx);
        let mut c = channels[j % channels.len()].clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let result = c.push(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
            let _ = done.send(result.map(|_| ()));
        });
    }
    // Until every push holds a server thread or was refused: either the
    // executor refused all beyond its bound, or (without one) the runtime's
    // blocking pool of 512 threads is full.
    let pid = server.pid();
    let mut refused = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        while let Ok(result) = done_rx.try_recv() {
            refused.push(result.expect_err("a held push cannot succeed"));
        }
        if refused.len() >= PUSHES - MAX_STREAMS || threads(pid) >= 512 {
            break;
        }
        assert!(Instant::now() < deadline, "pushes neither held nor refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut c = channels[0].clone();
    let within = Duration::from_secs(2);
    let started = Instant::now();
    let status = tokio::time::timeout(within, c.status(StatusRequest { job: "quiet".into() }))
        .await
        .expect("status did not answer within 2 s while streams filled the server")
        .unwrap()
        .into_inner();
    assert_eq!(status.jobs[0].job, "quiet");
    let plan = tokio::time::timeout(
        within,
        c.plan(PlanRequest {
            job: "quiet".into(),
            force: true,
            ..Default::default()
        }),
    )
    .await
    .expect("plan did not answer within 2 s while streams filled the server")
    .unwrap()
    .into_inner();
    assert!(plan.due);
    let tags = tokio::time::timeout(
        within,
        c.tags(TagsRequest {
            job: "quiet".into(),
            revisions: "latest".into(),
            action: tags_request::Action::Add as i32,
            tags: vec!["manual:x".into()],
            dry_run: true,
            ..Default::default()
        }),
    )
    .await
    .expect("tags did not answer within 2 s while streams filled the server")
    .unwrap_err();
    assert_eq!(tags.code(), Code::NotFound, "{tags:?}");
    eprintln!("status, plan, tags answered in {:?}", started.elapsed());

    // The streams beyond the bound were refused at once, and say why.
    assert_eq!(refused.len(), PUSHES - MAX_STREAMS);
    for e in &refused {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains(&format!(
                "the server runs {MAX_STREAMS} streams at once (limits: max-streams)"
            )),
            "{e:?}"
        );
    }
    // Each refusal is a (rate-limited) audit line naming the bound.
    let audit = server.wait_log(0, "limits: max-streams");
    assert!(
        audit.contains("audit") && audit.contains("action=\"push\""),
        "{audit}"
    );
    // The held pushes end when their clients go away.
    drop(held);
    let mut ended = refused.len();
    while ended < PUSHES {
        tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
            .await
            .expect("a dropped push ends")
            .unwrap()
            .unwrap_err();
        ended += 1;
    }
}
