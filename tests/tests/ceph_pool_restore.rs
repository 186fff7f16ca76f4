//! Restores from a server on a Ceph pool store beyond the plain stream
//! (issue 36: "restores ... rollback and the NBD export"), through real
//! processes on the one-node test cluster (BACKY_TEST_CEPH_CONF):
//!
//! - a rollback of a changed copy fetches only the changed granules from
//!   the snapshot and ends equal to the revision;
//! - `backy-client export` serves a pool revision over NBD: `qemu-img
//!   convert` of the export equals the revision.

mod confined;
mod support;

use confined::{ceph_conf, Confined};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use support::*;

const G: u64 = 64 << 10;

fn config(pool: &Confined) -> String {
    format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\n{}jobs:\n  vm1: {{schedule: none}}\n",
        pool.store_yaml(),
    )
}

#[test]
fn a_rollback_fetches_changed_granules_and_the_export_serves_the_snapshot() {
    must_be_root();
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "rst");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_config(&dir.path().join("backy"), &config(&pool));
    let src = dir.path().join("src.img");
    let size = 24 * MIB;
    make_image(&src, size, &[(0, 10 * MIB), (16 * MIB, 4 * MIB)]);
    let v1 = std::fs::read(&src).unwrap();
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let rev = server.short_ids("vm1")[0].clone();

    // A copy of the disk that drifted: 12 granules changed, one in a hole.
    let target = dir.path().join("target.img");
    sparse_copy(&src, &target);
    for i in 0..11u64 {
        write_at(&target, i * 900 * 1024, &pattern(500 + i, 4096));
    }
    write_at(&target, 12 * MIB, &pattern(7, 4096));
    assert!(std::fs::read(&target).unwrap() != v1);
    let out = server.client_ok(&[
        "--json",
        "restore",
        "vm1",
        "-r",
        &rev,
        target.to_str().unwrap(),
        "--force",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mode"], "rollback", "{r}");
    assert_eq!(
        r["fetched_bytes"].as_u64(),
        Some(11 * G),
        "only the changed data granules travel (the one in a hole is zeroed): {r}"
    );
    assert!(
        std::fs::read(&target).unwrap() == v1,
        "rolled back to the revision"
    );

    // The NBD export of the pool's revision.
    let socket = dir.path().join("export.sock");
    let mut export = Command::new(bin("backy-client"))
        .args(["--server", &server.url, "--config"])
        .arg(&server.client_config)
        .args(["--json", "export", "vm1", "-r", &rev, "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("backy-client export");
    let mut line = String::new();
    BufReader::new(export.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the export's ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let uri = ready["uri"].as_str().expect("uri").to_string();
    let copy = dir.path().join("via-nbd.img");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy)
        .output()
        .expect("qemu-img");
    let _ = export.kill();
    let _ = export.wait();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&copy).unwrap() == v1,
        "the export serves the revision's bytes"
    );
}
