//! Starting and stopping: one server per store; SIGTERM ends the server
//! within its grace period even while agents hold their streams open (they
//! never end them), and an agent stopped with SIGTERM exits 0, as a
//! service manager expects.

mod support;

use std::time::{Duration, Instant};
use support::*;

#[test]
fn sigterm_stops_the_server_with_agents_connected_and_agents_exit_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        &dir.path().join("store"),
        "  vm1: {schedule: none, client: hv01}\n  vm2: {schedule: none, client: hv02}\n",
    );
    let mark = server.log_mark();
    let mut first = server.agent(&["agent", "--name", "hv01"]);
    let _second = server.agent(&["agent", "--name", "hv02"]);
    wait_for("two agents connected", Duration::from_secs(30), || {
        server
            .log_lines(mark)
            .iter()
            .filter(|l| l.contains("agent connected"))
            .count()
            >= 2
    });

    let status = first.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "an agent stopped with SIGTERM exits 0: {status:?}"
    );

    // The second agent keeps its stream open: the server still stops, after
    // at most its 10 s grace.
    let mark = server.log_mark();
    let started = Instant::now();
    let pid = rustix::process::Pid::from_raw(server.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let killed = server.wait_exit();
    let took = started.elapsed();
    assert!(!killed, "the server exited by itself");
    assert!(took < Duration::from_secs(20), "stopped in {took:?}");
    let log = server.log_lines(mark).join("\n");
    assert!(log.contains("streams still open after 10 s"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

/// A second server on a store that one already serves is refused at once
/// with the reason; the first goes on serving.
#[test]
fn a_second_server_on_the_same_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let server = Server::start(&base, "  vm1: {schedule: none}\n");
    let config = dir.path().join("second.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nbase-dir: {}\ninsecure-plaintext: true\njobs:\n  vm1: {{schedule: none}}\n",
            base.display()
        ),
    )
    .unwrap();
    let mut second = std::process::Command::new(bin("backy-server"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_for("the second server to give up", Duration::from_secs(20), || {
        status = second.try_wait().unwrap();
        status.is_some()
    });
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is in use by another backy-server (pid ") && err.contains("one server per store"),
        "{err}"
    );
    server.client_ok(&["status", "vm1"]);
}
