//! Agents in front of a Ceph pool (issue 36, docs/DESIGN.md "Agents in
//! front of a pool"), through real `backy-server` and `backy-client`
//! processes on the one-node test cluster (BACKY_TEST_CEPH_CONF):
//!
//! - schedules are evaluated on a pool: a due job is ordered, a push of a
//!   job that is not due runs nothing;
//! - a job whose lease another server holds is not ordered by the server
//!   the agent reached: that server names the holder, the agent holds a
//!   session there too, and the holder orders the job;
//! - a free job is ordered by the server that takes its lease, and stays
//!   with it;
//! - a job handed to another server (`backy-server hand-over`) is ordered
//!   there once due, through the agent's session with it.

mod confined;
mod support;

use confined::{ceph_conf, Confined};
use std::time::Duration;
use support::*;

const MIB: u64 = 1 << 20;

/// Two jobs of client hv01 on a daily schedule, in the pool.
fn config(pool: &Confined, img1: &std::path::Path, img2: &std::path::Path) -> String {
    format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\n{}  lease: 6s\n  lease-renewal: 2s\n  lease-margin: 1s\n\
         schedules:\n  s: {{daily: {{interval: 1d, keep: 3}}}}\njobs:\n  \
         vm1: {{schedule: s, client: hv01, source: {{type: file, path: {}}}}}\n  \
         vm2: {{schedule: s, client: hv01, source: {{type: file, path: {}}}}}\n",
        pool.store_yaml(),
        img1.display(),
        img2.display()
    )
}

fn tags_of(rev: &serde_json::Value) -> Vec<String> {
    rev["tags"]
        .as_array()
        .map(|t| t.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

#[test]
fn an_agent_is_sent_to_the_server_holding_its_job_and_schedules_decide() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "agent");
    let dir = tempfile::tempdir().unwrap();
    let (img1, img2) = (dir.path().join("vm1.img"), dir.path().join("vm2.img"));
    make_image(&img1, 8 * MIB, &[(0, MIB)]);
    make_image(&img2, 8 * MIB, &[(2 * MIB, MIB)]);
    let text = config(&pool, &img1, &img2);
    let a = Server::start_config(&dir.path().join("a"), &text);
    let b = Server::start_config(&dir.path().join("b"), &text);

    // B holds vm2, which has no revision (pushed through B, then
    // forgotten): its first backup is due.
    b.client_ok(&["push", "vm2"]);
    b.client_ok(&["forget", "vm2", "-r", "all"]);
    assert!(b.revisions("vm2").is_empty());
    assert_eq!(pool.lease_holder("vm2").as_deref(), Some(b.url.as_str()));
    assert_eq!(pool.lease_holder("vm1"), None, "nobody holds vm1 yet");

    // The agent knows only A.
    let (a_mark, b_mark) = (a.log_mark(), b.log_mark());
    let mut agent = a.agent(&["agent", "--name", "hv01", "-v"]);
    wait_for("vm1's and vm2's daily revisions", Duration::from_secs(60), || {
        let daily = |job: &str| b.revisions(job).iter().any(|r| tags_of(r) == ["daily"]);
        daily("vm1") && daily("vm2")
    });
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "the job is held by {}: holding a session there too",
            b.url
        )),
        "the agent followed vm2 to B:\n{log}"
    );
    let ordered = |lines: Vec<String>, job: &str| {
        lines
            .iter()
            .any(|l| l.contains("ordering push") && l.contains(&format!("job={job}")))
    };
    assert!(ordered(a.log_lines(a_mark), "vm1"), "A ordered vm1");
    assert!(!ordered(a.log_lines(a_mark), "vm2"), "A did not order vm2");
    assert!(ordered(b.log_lines(b_mark), "vm2"), "B ordered vm2");
    assert!(!ordered(b.log_lines(b_mark), "vm1"), "B did not order vm1");
    assert!(
        a.log_lines(a_mark)
            .iter()
            .any(|l| l.contains("job held by another server") && l.contains("job=vm2")),
        "A sent the agent to B for vm2"
    );
    assert_eq!(pool.lease_holder("vm1").as_deref(), Some(a.url.as_str()));
    assert_eq!(pool.lease_holder("vm2").as_deref(), Some(b.url.as_str()));
    assert_eq!(b.revisions("vm2").len(), 1);

    // Nothing is due now: a push runs nothing, through either server.
    for (server, job) in [(&a, "vm1"), (&b, "vm2"), (&b, "vm1")] {
        let out = server.client(&["-v", "push", job]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.contains(&format!("{job} is not due")),
            "{job} through {}: {stdout}",
            server.url
        );
    }
    assert_eq!(a.revisions("vm1").len(), 1);
    assert_eq!(a.revisions("vm2").len(), 1);

    // Status through either server says what the schedule says: within
    // the SLA, the next daily due later, within a day.
    for server in [&a, &b] {
        let text = server.client_ok(&["--json", "status", "vm1"]);
        let status: serde_json::Value = serde_json::from_str(&text).unwrap();
        let job = &status["jobs"][0];
        assert_eq!(job["sla_ok"], true, "{job}");
        assert_eq!(job["next_tags"], serde_json::json!(["daily"]), "{job}");
        let next = chrono::DateTime::parse_from_rfc3339(job["next_due"].as_str().unwrap()).unwrap();
        let in_ = next.with_timezone(&chrono::Utc) - chrono::Utc::now();
        assert!(
            in_ > chrono::Duration::zero() && in_ <= chrono::Duration::hours(24),
            "next due in {in_}: {job}"
        );
        server.client_ok(&["check", "vm1"]);
    }

    // vm1 handed from A to B, then made due (its revision forgotten): B
    // orders it through the agent's session there, A sends the agent on.
    let (a_mark, b_mark) = (a.log_mark(), b.log_mark());
    let out = std::process::Command::new(bin("backy-server"))
        .args([
            "--config",
            a.config_path.to_str().unwrap(),
            "hand-over",
            "vm1",
            "--to",
            &b.url,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("B to hold vm1", Duration::from_secs(30), || {
        pool.lease_holder("vm1").as_deref() == Some(b.url.as_str())
    });
    b.client_ok(&["forget", "vm1", "-r", "all"]);
    wait_for("vm1's daily revision through B", Duration::from_secs(90), || {
        b.revisions("vm1").len() == 1
    });
    assert!(ordered(b.log_lines(b_mark), "vm1"), "B ordered vm1");
    assert!(!ordered(a.log_lines(a_mark), "vm1"), "A did not order vm1");
    assert_eq!(pool.lease_holder("vm1").as_deref(), Some(b.url.as_str()));
    agent.terminate();
}
