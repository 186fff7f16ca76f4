//! What a server on a Ceph pool store reports (issue 36, docs/DESIGN.md
//! "Space on a pool"), through real `backy-server`/`backy-client`
//! processes on the one-node test cluster (BACKY_TEST_CEPH_CONF):
//!
//! - `status --json` gives each revision's space as `rbd du` counts it
//!   (the objects holding its data, those it added over the revision
//!   before) and the job's (each object once): equal to `rbd du`'s own
//!   figures for the image's snapshots;
//! - the status page and `/metrics` answer from the pool: the job, its
//!   revision count and its newest revision, the store named.

mod confined;
mod support;

use confined::{ceph_conf, ok, Confined};
use support::*;

const MIB: u64 = 1 << 20;

fn config(pool: &Confined) -> String {
    format!(
        "listen: 127.0.0.1:0\nhttp-listen: 127.0.0.1:0\nbase-dir: BASE\n{}jobs:\n  vm1: {{schedule: none}}\n",
        pool.store_yaml(),
    )
}

fn http_addr(server: &Server) -> String {
    let line = server.wait_log(0, "http listener on ");
    line.split("http listener on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string()
}

/// `rbd du`'s used bytes per snapshot name (and "" for the head).
fn rbd_du(pool: &Confined, image: &str) -> Vec<(String, u64)> {
    let out = ok(
        pool.tool("rbd", &["du", "--format", "json", &pool.spec(image)], b""),
        "rbd du",
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["snapshot"].as_str().unwrap_or("").to_string(),
                i["used_size"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn status_gives_rbd_du_space_and_the_page_and_metrics_read_the_pool() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "sta");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("backy");
    let server = Server::start_config(&base, &config(&pool));
    let src = dir.path().join("src.img");

    // 4 MiB objects: data in objects 0, 2 and 3 (the short last one).
    let size = 13 * MIB + 12345;
    make_image(&src, size, &[]);
    write_at(&src, 0, &pattern(1, (3 * MIB) as usize));
    write_at(&src, 8 * MIB + 777, &pattern(2, MIB as usize));
    write_at(&src, 12 * MIB, &pattern(3, (MIB + 12345) as usize));
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    // One object changed, one newly written.
    write_at(&src, 8 * MIB + 100, &pattern(4, 4096));
    write_at(&src, 4 * MIB, &pattern(5, 4096));
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    let status: serde_json::Value =
        serde_json::from_str(&server.client_ok(&["status", "vm1", "--json"])).unwrap();
    let job = &status["jobs"][0];
    let revs = job["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 2, "{status}");
    let du = rbd_du(&pool, "vm1");
    let snaps = pool.snapshots("vm1");
    for (rev, snap) in revs.iter().zip(&snaps) {
        let used = du
            .iter()
            .find(|(s, _)| s == snap)
            .unwrap_or_else(|| panic!("rbd du lists {snap}: {du:?}"))
            .1;
        assert_eq!(
            rev["space"]["exclusive_bytes"].as_u64(),
            Some(used),
            "what revision {snap} added is rbd du's used: {rev} {du:?}"
        );
    }
    // Whole objects (the last one ends with the image): the first revision
    // holds 0, 2, 3; the second adds 1 and a changed 2, and holds 0 to 3.
    let (obj, last) = (4 * MIB, size - 12 * MIB);
    let space = |r: usize, what: &str| revs[r]["space"][what].as_u64();
    assert_eq!(space(0, "total_bytes"), Some(2 * obj + last), "{status}");
    assert_eq!(space(0, "exclusive_bytes"), Some(2 * obj + last), "{status}");
    assert_eq!(space(1, "total_bytes"), Some(size), "{status}");
    assert_eq!(space(1, "exclusive_bytes"), Some(2 * obj), "{status}");
    assert_eq!(space(1, "shared_bytes"), Some(obj + last), "{status}");
    let all_used: u64 = du.iter().map(|(_, u)| u).sum();
    assert_eq!(
        job["space"]["exclusive_bytes"].as_u64(),
        Some(all_used),
        "the job uses what rbd du counts over its snapshots and head: {status} {du:?}"
    );

    let addr = http_addr(&server);
    let (code, _, page) = http_get_with(&addr, "/", None);
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("vm1"), "the page lists the job: {page}");
    assert!(
        page.contains(&format!("store: ceph-rbd pool rbd namespace {}", pool.namespace)),
        "the page names the store: {page}"
    );
    let (code, _, page) = http_get_with(&addr, "/job/vm1", None);
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains(revs[1]["id"].as_str().unwrap()),
        "the job page shows the newest revision: {page}"
    );
    let (code, _, metrics) = http_get_with(&addr, "/metrics", None);
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.lines().any(|l| l == "backy_revisions 2"),
        "metrics count the pool's revisions: {metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("backy_job_revisions{backy_job=\"vm1\"} 2")),
        "per-job metrics come from the pool: {metrics}"
    );
}
