//! Replication from a server on a Ceph pool store to a server on a
//! filesystem store (issue 36, docs/DESIGN.md "Served from a pool"),
//! through real processes: the pool server (one-node test cluster,
//! BACKY_TEST_CEPH_CONF, a confined cephx identity) is the source, a
//! server on btrfs copies its job with `replicate:`:
//!
//! - the first round copies the revision whole; the copy restores to the
//!   source's bytes with the same id;
//! - after an incremental push on the pool, the next round receives only
//!   the changed block (a restore relative to the copy it holds) and the
//!   copy restores byte for byte; the copies share extents on btrfs.

mod confined;
mod support;

use confined::{ceph_conf, Confined};
use serde_json::Value;
use support::*;

fn source_config(pool: &Confined, port: u16) -> String {
    format!(
        "listen: 127.0.0.1:{port}\nbase-dir: BASE\n{}jobs:\n  vm1: {{schedule: none}}\n",
        pool.store_yaml(),
    )
}

fn revisions(server: &Server) -> Vec<Value> {
    let v: Value = serde_json::from_str(&server.client_ok(&["status", "vm1", "--json"])).unwrap();
    v["jobs"][0]["revisions"].as_array().unwrap().clone()
}

/// The copied-revision lines of the next round after `mark`.
fn round(server: &Server, mark: usize) -> Vec<String> {
    server.wait_log(mark, "replication round done");
    server
        .log_lines(mark)
        .into_iter()
        .filter(|l| l.contains("copied revision"))
        .collect()
}

fn received(line: &str) -> u64 {
    let at = line
        .find("received=")
        .unwrap_or_else(|| panic!("received in {line}"));
    line[at + 9..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_filesystem_replica_copies_a_pool_job_incrementally() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "rep");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let source = Server::start_config(&dir.path().join("source"), &source_config(&pool, port));
    let src = dir.path().join("src.img");
    let size = 24 * MIB;
    make_image(&src, size, &[]);
    write_at(&src, 0, &pattern(1, (10 * MIB) as usize));
    write_at(&src, 16 * MIB, &pattern(2, (4 * MIB) as usize));
    let v1 = std::fs::read(&src).unwrap();
    source.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    let fs = LoopFs::new("btrfs", 400 << 20);
    let base = fs.mount.join("store");
    std::fs::create_dir_all(&base).unwrap();
    let replica = Server::start_config(
        &base,
        &format!(
            "listen: 127.0.0.1:0\nbase-dir: BASE\nreplicate: {{source: 'http://127.0.0.1:{port}', interval: 1h, jobs: [vm1]}}\n"
        ),
    );
    let first = round(&replica, 0);
    assert_eq!(first.len(), 1, "the first round copies the revision: {first:?}");
    let on_source = revisions(&source);
    let copied = revisions(&replica);
    assert_eq!(copied.len(), 1, "{copied:?}");
    assert_eq!(copied[0]["id"], on_source[0]["id"]);
    assert_eq!(copied[0]["manifest_digest"], on_source[0]["manifest_digest"]);
    let target = dir.path().join("r1.img");
    replica.client_ok(&["restore", "vm1", "-r", "latest", target.to_str().unwrap()]);
    assert!(std::fs::read(&target).unwrap() == v1, "the copy restores to v1");

    // One block changed on the source: the next round receives that block.
    write_at(&src, 17 * MIB, &pattern(3, 4096));
    let v2 = std::fs::read(&src).unwrap();
    source.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let mark = replica.log_mark();
    replica.hup();
    let second = round(&replica, mark);
    assert_eq!(
        second.len(),
        1,
        "the second round copies the new revision: {second:?}"
    );
    let got = received(&second[0]);
    assert!(
        (4096..=4 * MIB).contains(&got),
        "only the changed block travels (relative to the copy of v1): {}",
        second[0]
    );
    let copied = revisions(&replica);
    assert_eq!(copied.len(), 2, "{copied:?}");
    assert_eq!(copied[1]["id"], revisions(&source)[1]["id"]);
    let target = dir.path().join("r2.img");
    replica.client_ok(&["restore", "vm1", "-r", "latest", target.to_str().unwrap()]);
    assert!(
        std::fs::read(&target).unwrap() == v2,
        "the second copy restores to v2"
    );
    // 14 MiB of data each: the second copy adds at most its changed block.
    let (_, exclusive) = btrfs_du(&base.join("vm1").join(copied[1]["id"].as_str().unwrap()));
    assert!(
        exclusive <= 4 * MIB,
        "the second copy shares its parent's unchanged extents: {exclusive} exclusive"
    );
}

/// A job moves from a filesystem store into the pool and back out: a pool
/// server replicates a filesystem server's job (each round relative to
/// the copy it holds), and a second filesystem server replicates the
/// pool's copy. Every hop keeps the revisions' ids, times, manifests and
/// trust, and every copy restores byte for byte.
#[test]
fn a_job_moves_from_a_filesystem_store_into_the_pool_and_back() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "mov");
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::new("btrfs", 600 << 20);
    let (src_port, pool_port) = (free_port(), free_port());
    let first = Server::start_config(
        &fs.mount.join("first"),
        &format!("listen: 127.0.0.1:{src_port}\nbase-dir: BASE\njobs:\n  vm1: {{schedule: none}}\n"),
    );
    let src = dir.path().join("src.img");
    make_image(&src, 24 * MIB, &[]);
    write_at(&src, 0, &pattern(11, (6 * MIB) as usize));
    write_at(&src, 20 * MIB, &pattern(12, MIB as usize));
    let v1 = std::fs::read(&src).unwrap();
    first.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);

    // Into the pool: a pool server with `replicate:` from the first.
    let pooled = Server::start_config(
        &dir.path().join("pooled"),
        &format!(
            "listen: 127.0.0.1:{pool_port}\nbase-dir: BASE\n{}replicate: {{source: 'http://127.0.0.1:{src_port}', interval: 1h, jobs: [vm1]}}\n",
        pool.store_yaml(),
        ),
    );
    assert_eq!(
        round(&pooled, 0).len(),
        1,
        "the first round copies v1 into the pool"
    );
    write_at(&src, 2 * MIB + 100, &pattern(13, 4096));
    let v2 = std::fs::read(&src).unwrap();
    first.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let mark = pooled.log_mark();
    pooled.hup();
    let second = round(&pooled, mark);
    assert_eq!(second.len(), 1, "{second:?}");
    assert!(
        received(&second[0]) <= 4 * MIB,
        "the pool's copy of v2 is relative to its copy of v1: {}",
        second[0]
    );
    let on_first = revisions(&first);
    let in_pool = revisions(&pooled);
    for key in ["id", "timestamp", "manifest_digest", "trust", "size"] {
        let a: Vec<_> = on_first.iter().map(|r| &r[key]).collect();
        let b: Vec<_> = in_pool.iter().map(|r| &r[key]).collect();
        assert_eq!(a, b, "the pool's copies keep {key}");
    }
    let snaps = pool.snapshots("vm1");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert!(
        pool.export("vm1", Some(&snaps[0])) == v1,
        "rbd export of the first copy is v1"
    );
    assert!(
        pool.export("vm1", Some(&snaps[1])) == v2,
        "rbd export of the second copy is v2"
    );

    // And back out: a filesystem server replicates the pool's copies.
    let back = Server::start_config(
        &fs.mount.join("back"),
        &format!(
            "listen: 127.0.0.1:0\nbase-dir: BASE\nreplicate: {{source: 'http://127.0.0.1:{pool_port}', interval: 1h, jobs: [vm1]}}\n"
        ),
    );
    assert_eq!(round(&back, 0).len(), 2, "both revisions come back");
    let out = revisions(&back);
    for key in ["id", "timestamp", "manifest_digest", "trust", "size"] {
        let a: Vec<_> = on_first.iter().map(|r| &r[key]).collect();
        let b: Vec<_> = out.iter().map(|r| &r[key]).collect();
        assert_eq!(a, b, "the copies back out keep {key}");
    }
    for (spec, want) in [("1", &v1), ("latest", &v2)] {
        let target = dir.path().join(format!("back-{spec}.img"));
        back.client_ok(&["restore", "vm1", "-r", spec, target.to_str().unwrap()]);
        assert!(
            std::fs::read(&target).unwrap() == *want,
            "restore -r {spec} after the round trip"
        );
    }
}
