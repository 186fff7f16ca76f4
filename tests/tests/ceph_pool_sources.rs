//! A Ceph RBD source pushed into a server on a Ceph pool store (issue 36:
//! "everything works on it", the sources part), through real processes on
//! the one-node test cluster (BACKY_TEST_CEPH_CONF): the VM's image in pool
//! `rbd` (the hypervisor's admin identity), the backups in a namespace the
//! server's confined identity alone may touch.
//!
//! - a full push and an incremental one (from `rbd export-diff` between the
//!   source's snapshots: only changed objects read) land as snapshots equal
//!   to the source's snapshots, byte for byte;
//! - a restore of the newest equals the source's snapshot.

mod confined;
mod support;

use confined::{ceph_conf, ok, Confined};
use serde_json::Value;
use std::path::Path;
use support::*;

/// The VM's image in pool `rbd`, removed with its snapshots on drop.
struct SourceImage<'a> {
    pool: &'a Confined,
    spec: String,
}

impl SourceImage<'_> {
    fn snapshots(&self) -> Vec<String> {
        let out = ok(
            self.pool
                .admin("rbd", &["snap", "ls", "--format", "json", &self.spec]),
            "rbd snap ls",
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn export(&self, snap: &str) -> Vec<u8> {
        ok(
            self.pool.admin(
                "rbd",
                &["export", "--no-progress", &format!("{}@{snap}", self.spec), "-"],
            ),
            "rbd export",
        )
    }
}

impl Drop for SourceImage<'_> {
    fn drop(&mut self) {
        let _ = self
            .pool
            .admin("rbd", &["snap", "purge", "--no-progress", &self.spec]);
        let _ = self.pool.admin("rbd", &["rm", "--no-progress", &self.spec]);
    }
}

fn config(conf: &Path, pool: &Confined, image: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\n{}jobs:\n  vm1:\n    schedule: none\n    source: {{type: ceph-rbd, pool: rbd, image: {image}, conf: {}}}\n",
        pool.store_yaml(),
        conf.display(),
    )
}

fn push(server: &Server) -> Value {
    serde_json::from_str(&server.client_ok(&["push", "vm1", "--force", "--json"])).unwrap()
}

#[test]
fn an_rbd_source_pushes_incrementally_into_a_pool() {
    must_be_root();
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "src");
    let dir = tempfile::tempdir().unwrap();
    // The VM's disk: 20 MiB, data in three places.
    let file = dir.path().join("vm.img");
    make_image(&file, 20 * MIB, &[]);
    write_at(&file, 0, &pattern(1, (2 * MIB) as usize));
    write_at(&file, 9 * MIB + 5, &pattern(2, 100_000));
    write_at(&file, 20 * MIB - 4096, &pattern(3, 4096));
    let image = format!("backy-pool-src-{}", std::process::id());
    let src = SourceImage {
        pool: &pool,
        spec: format!("rbd/{image}"),
    };
    ok(
        pool.admin(
            "rbd",
            &["import", "--no-progress", file.to_str().unwrap(), &src.spec],
        ),
        "rbd import",
    );
    let server = Server::start_config(&dir.path().join("backy"), &config(&conf, &pool, &image));

    let first = push(&server);
    let id1 = first["revision"]["id"].as_str().unwrap().to_string();
    // Four objects change: 4 KiB in the second, overwritten in the third.
    let out = pool.admin(
        "rbd",
        &[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4096",
            "--io-threads",
            "1",
            "--io-total",
            "16384",
            "--io-pattern",
            "seq",
            &src.spec,
        ],
    );
    ok(out, "rbd bench");
    let second = push(&server);
    let id2 = second["revision"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        second["revision"]["parent_id"].as_str(),
        Some(id1.as_str()),
        "the second push is incremental: {second}"
    );
    let read2 = second["bytes_read"].as_u64().unwrap();
    assert!(
        read2 <= 4 * MIB,
        "an incremental push reads only the changed objects from rbd export-diff: {read2}"
    );

    // Each stored snapshot equals the source's snapshot of that push.
    let stored = pool.snapshots("vm1");
    assert_eq!(stored.len(), 2, "{stored:?}");
    let source_snaps = src.snapshots();
    for (id, snap) in [(&id1, &stored[0]), (&id2, &stored[1])] {
        let theirs = format!("backy-{id}");
        // The source keeps only the newest push's snapshot (the next
        // push's parent): compare the newest with the source's.
        if source_snaps.contains(&theirs) {
            assert!(
                pool.export("vm1", Some(snap)) == src.export(&theirs),
                "stored snapshot {snap} equals the source's {theirs}"
            );
        }
    }
    assert!(
        source_snaps.contains(&format!("backy-{id2}")),
        "the source keeps the newest push's snapshot: {source_snaps:?}"
    );
    let target = dir.path().join("restored.img");
    server.client_ok(&["restore", "vm1", "-r", "latest", target.to_str().unwrap()]);
    assert!(
        std::fs::read(&target).unwrap() == src.export(&format!("backy-{id2}")),
        "the restore equals the source's snapshot"
    );
    // The first revision is the VM's disk as imported.
    assert!(
        pool.export("vm1", Some(&stored[0])) == std::fs::read(&file).unwrap(),
        "the first stored snapshot equals the disk as it was"
    );
}
