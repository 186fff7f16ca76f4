//! Handing a job's lease from one server to another in front of one Ceph
//! pool (`backy-server hand-over`, issue 36 part 4; docs/DESIGN.md
//! "Handing a job over"), through real `backy-server` and `backy-client`
//! processes on the one-node test cluster (BACKY_TEST_CEPH_CONF), as a
//! cephx identity confined to one namespace, with a short lease:
//!
//! - refusals (a filesystem store, an unknown job, a URL that is no
//!   server's, a reservation too short) are one line, exit 1, and record
//!   nothing;
//! - A holds the job (its lock record names A); `hand-over vm1 --to B`
//!   says A released it and B holds it now; the lock record names B, the
//!   request is gone from `backy.handovers`; a push through A is refused
//!   naming B and the client's push lands through B; status through A and
//!   B agree; handing the job to its holder is a no-op that says so;
//! - a hand-over while a push runs on the holder waits for it: the command
//!   says the holder has not released it (exit 3), new pushes through the
//!   holder are refused naming the target, the running push commits, then
//!   the holder releases and the target takes the job;
//! - a hand-over to a server that never comes: the holder releases, the
//!   job is refused elsewhere naming the target while reserved, and after
//!   the reservation the next push through A takes the job back and
//!   removes the request;
//! - a request is removed only while it is the one read: a hand-over
//!   recorded again meanwhile stays (`omap_cmp` in the removing op).

mod confined;
mod support;

use confined::{ceph_conf, Confined};
use std::path::Path;
use std::process::Output;
use support::*;

const MIB: u64 = 1 << 20;

/// A server config on the pool with a short lease: renewal rounds every
/// second, so hand-overs take about a second.
fn config(pool: &Confined) -> String {
    format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\n{}  lease: 6s\n  lease-renewal: 2s\n  lease-margin: 1s\n  \
         op-timeout: 10s\njobs:\n  vm1: {{schedule: none}}\n  vm2: {{schedule: none}}\n",
        pool.store_yaml(),
    )
}

/// `backy-server --config CONFIG hand-over ARGS`.
fn hand_over(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(bin("backy-server"))
        .arg("--config")
        .arg(config)
        .arg("hand-over")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running backy-server hand-over")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The jobs with a hand-over request in the pool.
fn requests(pool: &Confined) -> Vec<String> {
    let out = pool.rados(&["listomapkeys", "backy.handovers"]);
    if !out.status.success() {
        assert!(
            stderr(&out).contains("No such file or directory"),
            "{}",
            stderr(&out)
        );
        return Vec::new();
    }
    stdout(&out).lines().map(String::from).collect()
}

/// A refusal of the command: exit 1, one line naming `needle`.
fn refused(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} in {err}");
    assert!(stdout(out).is_empty(), "{}", stdout(out));
}

fn push_source(server: &Server, src: &Path) -> Output {
    server.client(&["-v", "push", "vm1", "--source", src.to_str().unwrap()])
}

/// The whole story with both servers up: refusals, a hand-over of a held
/// job, clients following to the new holder, a no-op hand-over.
#[test]
fn a_job_is_handed_over_and_its_pushes_follow_to_the_target() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "hand");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let a = Server::start_config(&dir.path().join("a"), &config(&pool));
    let b = Server::start_config(&dir.path().join("b"), &config(&pool));
    a.wait_log(0, &format!("name in lock records and hand-overs: {}", a.url));

    let src = work.join("src.img");
    make_image(&src, 8 * MIB, &[]);
    write_at(&src, 0, &pattern(1, MIB as usize));
    a.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    assert_eq!(pool.lease_holder("vm1").as_deref(), Some(a.url.as_str()));

    // Refusals: one line, exit 1, nothing recorded.
    let fs_config = work.join("fs.yaml");
    std::fs::write(
        &fs_config,
        format!(
            "listen: 127.0.0.1:0\nbase-dir: {}\ninsecure-plaintext: true\njobs:\n  vm1: {{schedule: none}}\n",
            work.display()
        ),
    )
    .unwrap();
    refused(
        &hand_over(&fs_config, &["vm1", "--to", &b.url]),
        "backy-server hand-over moves jobs between servers in front of one ceph-rbd pool; ",
    );
    refused(
        &hand_over(&a.config_path, &["vm1", "vm9", "--to", &b.url]),
        &format!("unknown job vm9 in {}", a.config_path.display()),
    );
    for bad in [
        "ftp://backup02:6023",
        "backup02:6023",
        "http://b:6023/x",
        "http://",
    ] {
        refused(
            &hand_over(&a.config_path, &["vm1", "--to", bad]),
            &format!("--to {bad:?}: give the target server's URL"),
        );
    }
    refused(
        &hand_over(&a.config_path, &["vm1", "--to", &b.url, "--reserve", "3s"]),
        "--reserve 3 s is shorter than two lease renewals (4 s, store: lease-renewal)",
    );
    assert_eq!(requests(&pool), Vec::<String>::new(), "nothing recorded");
    assert_eq!(pool.lease_holder("vm1").as_deref(), Some(a.url.as_str()));

    // The hand-over: A releases, B takes the job at its next round.
    let (a_mark, b_mark) = (a.log_mark(), b.log_mark());
    let started = std::time::Instant::now();
    let out = hand_over(&a.config_path, &["vm1", "--to", &b.url]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("job vm1: released by {}, now held by {}\n", a.url, b.url)
    );
    println!("hand-over to a live server: {:.1} s", took.as_secs_f64());
    assert_eq!(pool.lease_holder("vm1").as_deref(), Some(b.url.as_str()));
    assert_eq!(requests(&pool), Vec::<String>::new(), "B removed the request");
    a.wait_log(a_mark, "released the job's lease to hand it over");
    b.wait_log(b_mark, "took the job handed over to this server");
    assert!(
        !b.log_lines(b_mark)
            .iter()
            .any(|l| l.contains("fenced") || l.contains("took the job over from")),
        "a clean release: nobody fenced"
    );

    // A push through A is refused naming B (its holder now); the client's
    // push lands there.
    write_at(&src, 3 * MIB, &pattern(2, MIB as usize));
    let v2 = std::fs::read(&src).unwrap();
    let (a_mark, b_mark) = (a.log_mark(), b.log_mark());
    let out = push_source(&a, &src);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("held by server {} ", b.url))
            && err.contains(&format!("pushing through {}", b.url)),
        "refused naming B, followed there: {err}"
    );
    b.wait_log(b_mark, "committed revision to the pool");
    assert!(
        !a.log_lines(a_mark)
            .iter()
            .any(|l| l.contains("committed revision")),
        "A committed nothing"
    );
    let revs = b.revisions("vm1");
    assert_eq!(revs.len(), 2, "{revs:?}");
    assert_eq!(a.revisions("vm1"), revs, "status through A and B agree");
    let snaps = pool.snapshots("vm1");
    assert!(
        pool.export("vm1", Some(&snaps[1])) == v2,
        "the snapshot equals the source"
    );
    assert_eq!(pool.lease_holder("vm1").as_deref(), Some(b.url.as_str()));

    // Handing the job to its holder changes nothing and says so.
    let out = hand_over(&b.config_path, &["vm1", "--to", &format!("{}/", b.url)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("job vm1: already held by {}: nothing to hand over\n", b.url)
    );
    assert_eq!(requests(&pool), Vec::<String>::new());
    assert_eq!(pool.lease_holder("vm1").as_deref(), Some(b.url.as_str()));

    // A job nobody holds is reserved at once and taken by the target at its
    // next round.
    assert_eq!(pool.lease_holder("vm2"), None);
    let out = hand_over(&a.config_path, &["vm2", "--to", &a.url]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("job vm2: now held by {}\n", a.url));
    assert_eq!(pool.lease_holder("vm2").as_deref(), Some(a.url.as_str()));
}

/// A hand-over while a push runs on the holder: the push is never cut;
/// the holder releases once it committed.
#[test]
fn a_hand_over_waits_for_the_push_running_on_the_holder() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "busy");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let a = Server::start_config(&dir.path().join("a"), &config(&pool));
    let b = Server::start_config(&dir.path().join("b"), &config(&pool));

    // The push through A stops itself (the client, not the server: A keeps
    // renewing) at its third data frame, A holding the job's lease.
    let src = work.join("src.img");
    make_image(&src, 16 * MIB, &[]);
    write_at(&src, 0, &pattern(1, (16 * MIB) as usize));
    let v1 = std::fs::read(&src).unwrap();
    let a_mark = a.log_mark();
    let running = std::process::Command::new(bin("backy-client"))
        .env("BACKY_FAULT", "stop:client.frame@3")
        .args(["--server", &a.url, "--config"])
        .arg(&a.client_config)
        .args(["push", "vm1", "--source", src.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_stopped(running.id());
    a.wait_log(a_mark, "took the job's lease in the pool");

    // The holder does not release while the push runs: exit 3, and the
    // request stands.
    let out = hand_over(&a.config_path, &["vm1", "--to", &b.url, "--wait", "3s"]);
    assert_eq!(out.status.code(), Some(3), "{}{}", stdout(&out), stderr(&out));
    let line = stdout(&out);
    assert!(
        line.starts_with(&format!(
            "job vm1: {} has not released it within 3 s (work on the job still runs there); the \
             request stands until ",
            a.url
        )),
        "{line}"
    );
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert_eq!(requests(&pool), ["vm1"]);
    assert_eq!(pool.lease_holder("vm1").as_deref(), Some(a.url.as_str()));
    a.wait_log(a_mark, "handing the job over");

    // New work through the holder is refused naming the target, which
    // refuses too (nowhere to go yet): the push fails, nothing changes.
    let other = work.join("other.img");
    make_image(&other, 4 * MIB, &[]);
    let out = push_source(&a, &other);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("job vm1: handed over to server {}", b.url)),
        "{err}"
    );
    assert!(
        err.contains(&format!("{} has not released it yet", a.url)),
        "the target says the holder still holds it: {err}"
    );

    // Continued, the running push commits on A; then A releases and B
    // takes the job.
    let pid = rustix::process::Pid::from_raw(running.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    let out = running.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the running push completed: {}",
        stderr(&out)
    );
    let committed = a.wait_log(a_mark, "committed revision to the pool");
    let released = a.wait_log(a_mark, "released the job's lease to hand it over");
    let lines = a.log_lines(a_mark);
    let at = |l: &str| lines.iter().position(|x| x == l).unwrap();
    assert!(at(&committed) < at(&released), "released after the commit");
    let b_mark = 0;
    b.wait_log(b_mark, "took the job handed over to this server");
    wait_for("B to hold vm1", std::time::Duration::from_secs(10), || {
        pool.lease_holder("vm1").as_deref() == Some(b.url.as_str())
    });
    assert_eq!(requests(&pool), Vec::<String>::new());
    let revs = b.revisions("vm1");
    assert_eq!(revs.len(), 1, "{revs:?}");
    let snaps = pool.snapshots("vm1");
    assert!(
        pool.export("vm1", Some(&snaps[0])) == v1,
        "the push through A landed whole"
    );
}

/// A hand-over to a server that never comes strands no job: after the
/// reservation, a push takes the job again.
#[test]
fn a_hand_over_to_a_server_that_never_comes_lapses() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "lapse");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let a = Server::start_config(&dir.path().join("a"), &config(&pool));
    let b = Server::start_config(&dir.path().join("b"), &config(&pool));

    let src = work.join("src.img");
    make_image(&src, 8 * MIB, &[]);
    write_at(&src, 0, &pattern(1, MIB as usize));
    a.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    let dead = format!("http://127.0.0.1:{}", free_port());
    let asked = chrono::Utc::now();
    let out = hand_over(
        &a.config_path,
        &["vm1", "--to", &dead, "--reserve", "6s", "--wait", "2s"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.starts_with(&format!(
            "job vm1: released by {}; {dead} takes it at its next lease round or push (reserved until ",
            a.url
        )),
        "{line}"
    );
    assert_eq!(pool.lease_holder("vm1"), None, "released");
    assert_eq!(requests(&pool), ["vm1"], "the reservation stands");

    // Reserved: through B the push is refused naming the dead target, which
    // the client cannot reach.
    write_at(&src, 0, &pattern(2, MIB as usize));
    let v2 = std::fs::read(&src).unwrap();
    let out = b.client(&["--timeout", "2", "push", "vm1", "--source", src.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("job vm1: handed over to server {dead}"))
            && err.contains(&format!("following it to {dead}")),
        "{err}"
    );
    assert_eq!(pool.lease_holder("vm1"), None);

    // Past the reservation (6 s from the request), A takes the job back at
    // the next push and removes the request.
    let lapsed = asked + chrono::Duration::seconds(7);
    wait_for(
        "the reservation to pass",
        std::time::Duration::from_secs(20),
        || chrono::Utc::now() > lapsed,
    );
    let a_mark = a.log_mark();
    let out = push_source(&a, &src);
    assert!(out.status.success(), "{}", stderr(&out));
    a.wait_log(a_mark, "took the job after its hand-over lapsed");
    assert_eq!(pool.lease_holder("vm1").as_deref(), Some(a.url.as_str()));
    assert_eq!(
        requests(&pool),
        Vec::<String>::new(),
        "the lapsed request is gone"
    );
    let revs = b.revisions("vm1");
    assert_eq!(revs.len(), 2, "{revs:?}");
    let snaps = pool.snapshots("vm1");
    assert!(pool.export("vm1", Some(&snaps[1])) == v2);
}

/// A request is removed only while it is the one read (`omap_cmp` in the
/// removing op): a hand-over recorded again meanwhile stays.
#[test]
fn a_request_is_removed_only_while_unchanged() {
    use backy_common::handover::Request;
    use backy_server::pool::{PoolConfig, PoolStore};
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "cmp");
    let store = PoolStore::open(PoolConfig {
        conf: conf.clone(),
        id: pool.id.clone(),
        keyring: Some(pool.keyring.clone()),
        pool: "rbd".into(),
        namespace: Some(pool.namespace.clone()),
        op_timeout: Some(std::time::Duration::from_secs(30)),
    })
    .expect("open the pool store as the confined identity");
    let vm1 = backy_common::JobName::new("vm1").unwrap();
    assert_eq!(store.handover(&vm1).unwrap(), None, "no object yet");
    assert!(store.handovers().unwrap().is_empty());
    // Whole seconds: the stored form keeps no fraction.
    let now = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap();
    let request = |to: &str| Request {
        to: to.into(),
        requested: now,
        until: now + chrono::Duration::seconds(60),
        by: "root@test".into(),
    };
    store
        .request_handovers(&[(vm1.clone(), request("http://b:1"))])
        .unwrap();
    let first = store.handover(&vm1).unwrap().expect("recorded");
    assert_eq!(first.request, request("http://b:1"));
    store
        .request_handovers(&[(vm1.clone(), request("http://c:1"))])
        .unwrap();
    assert!(
        !store.withdraw_handover(&vm1, &first).unwrap(),
        "changed since: kept"
    );
    let second = store.handover(&vm1).unwrap().expect("still there");
    assert_eq!(second.request.to, "http://c:1");
    assert_eq!(store.handovers().unwrap().len(), 1);
    assert!(store.withdraw_handover(&vm1, &second).unwrap());
    assert_eq!(store.handover(&vm1).unwrap(), None);
    assert!(
        !store.withdraw_handover(&vm1, &second).unwrap(),
        "gone: nothing to remove"
    );
    assert_eq!(requests(&pool), Vec::<String>::new());
}
