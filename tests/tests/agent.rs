//! The agent against a server with identities: it takes the name its
//! credentials prove when given none, and a permanent refusal backs off
//! (capped exponential) with the reason logged once (issue 29, item 1).

mod support;

use backy_common::token::{generate_token, hash_token};
use std::path::Path;
use std::time::Duration;
use support::*;

fn token_file(dir: &Path, name: &str, token: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, token).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// A server with identities hv01 (owning vm1) and mon (read-only); the
/// token files of both.
fn setup(dir: &Path) -> (Server, String, String) {
    let img = dir.join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let (hv, mon) = (generate_token(), generate_token());
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nschedules:\n  s: {{daily: {{interval: 1d, keep: 3}}}}\n\
         clients:\n  hv01: {{token-hash: '{}'}}\n  mon: {{role: read-only, token-hash: '{}'}}\n\
         jobs:\n  vm1: {{schedule: s, client: hv01, source: {{type: file, path: {}}}}}\n",
        hash_token(&hv).unwrap(),
        hash_token(&mon).unwrap(),
        img.display()
    );
    let server = Server::start_config(&dir.join("store"), &config);
    let hv = token_file(dir, "hv.token", &hv);
    let mon = token_file(dir, "mon.token", &mon);
    (server, hv, mon)
}

#[test]
fn an_agent_without_a_name_takes_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (server, hv, _) = setup(dir.path());
    let mut agent = server.agent(&["--token-file", &hv, "agent"]);
    wait_for("the ordered push to commit", Duration::from_secs(60), || {
        let status = server.client_ok(&["--token-file", &hv, "--json", "status", "vm1"]);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["jobs"][0]["revisions"]
            .as_array()
            .is_some_and(|r| r.len() == 1)
    });
    agent.terminate();
    let log = agent.log();
    assert!(log.contains("as hv01"), "{log}");
    assert!(!log.contains("may not run an agent"), "{log}");
}

#[test]
fn a_refused_agent_backs_off_and_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _, mon) = setup(dir.path());
    // A read-only identity may run no agent: a permanent refusal.
    let mut agent = server.agent(&["--token-file", &mon, "agent", "--name", "hv01"]);
    wait_for("the agent to back off to 4 s", Duration::from_secs(20), || {
        agent.log().contains("reconnecting in 4 s")
    });
    agent.terminate();
    let log = agent.log();
    let refusals = log.matches("may not run an agent named hv01").count();
    assert_eq!(refusals, 1, "the reason is logged once while it lasts:\n{log}");
    for wait in [
        "reconnecting in 1 s",
        "reconnecting in 2 s",
        "reconnecting in 4 s",
    ] {
        assert!(log.contains(wait), "{wait}:\n{log}");
    }
}
