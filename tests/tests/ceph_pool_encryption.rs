//! Client-side encryption on a Ceph pool store (docs/encryption.md,
//! docs/DESIGN.md "Ceph pool store"), through real `backy-server` and
//! `backy-client` processes on the one-node test cluster
//! (BACKY_TEST_CEPH_CONF): the snapshots hold ciphertext that `backy-client
//! decrypt` turns back into the source; an incremental push sends only the
//! changed blocks; restores give the source; the server verifies without
//! the key; another key or none is refused with nothing written.

mod confined;
mod support;

use confined::{ceph_conf, Confined};
use support::*;

const MIB: u64 = 1 << 20;

fn refused(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "wanted {needle:?} in: {err}");
}

#[test]
fn encrypted_pushes_into_a_pool_restore_and_refuse_other_keys() {
    let Some(conf) = ceph_conf() else { return };
    let pool = Confined::new(&conf, "enc");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let server = Server::start_config(
        &dir.path().join("backy"),
        &format!(
            "listen: 127.0.0.1:0\nbase-dir: BASE\n{}jobs:\n  vm1: {{schedule: none}}\n",
            pool.store_yaml()
        ),
    );
    let src = work.join("vm1.img");
    make_image(&src, 20 * MIB, &[(0, 5 * MIB), (12 * MIB, MIB)]);
    let use_key = |key: Option<&std::path::Path>| {
        let mut yaml = format!(
            "jobs:\n  vm1:\n    source: {{type: file, path: {}}}\n",
            src.display()
        );
        if let Some(key) = key {
            yaml.push_str(&format!("    encryption: {{key-file: {}}}\n", key.display()));
        }
        std::fs::write(&server.client_config, yaml).unwrap();
    };
    let keygen = |name: &str| {
        let path = work.join(name);
        server.client_ok(&["keygen", path.to_str().unwrap()]);
        path
    };
    let push = || -> serde_json::Value {
        serde_json::from_str(&server.client_ok(&["--json", "push", "vm1"])).unwrap()
    };
    let key = keygen("vm1.key");
    use_key(Some(&key));

    // The snapshot is ciphertext; decrypted it is the source, and a
    // restore gives the source.
    let check_newest = || {
        let id = server.short_ids("vm1").last().unwrap().clone();
        let stored = work.join("stored.img");
        std::fs::write(&stored, pool.export("vm1", Some(&id))).unwrap();
        let want = file_hash(&src);
        assert_ne!(file_hash(&stored), want, "the snapshot is not the plaintext");
        let plain = work.join("plain.img");
        server.client_ok(&[
            "decrypt",
            "--key-file",
            key.to_str().unwrap(),
            stored.to_str().unwrap(),
            plain.to_str().unwrap(),
        ]);
        assert_eq!(file_hash(&plain), want, "backy-client decrypt of rbd export");
        let restored = work.join("restored.img");
        server.client_ok(&["restore", "vm1", restored.to_str().unwrap()]);
        assert_eq!(file_hash(&restored), want, "restore");
        for f in [stored, plain, restored] {
            std::fs::remove_file(f).unwrap();
        }
    };
    let full = push();
    assert_eq!(full["revision"]["parent_id"], serde_json::Value::Null);
    check_newest();

    // An incremental: one changed block goes, whole.
    write_at(&src, 3 * MIB + 100, &pattern(1, 4096));
    let inc = push();
    assert!(inc["revision"]["parent_id"].is_string(), "{inc}");
    let sent = inc["bytes_sent"].as_u64().unwrap();
    assert!(sent <= 4 * MIB + 4096, "one block: {sent}");
    check_newest();
    let text = server.client_ok(&["verify", "vm1", "-r", "all"]);
    assert_eq!(
        text.matches(": OK").count(),
        2,
        "verified without the key: {text}"
    );

    // Another key, and none: refused before anything is written.
    let snaps = pool.snapshots("vm1");
    let other = keygen("other.key");
    use_key(Some(&other));
    refused(&server.client(&["push", "vm1", "--force"]), "another key");
    use_key(None);
    refused(&server.client(&["push", "vm1", "--force"]), "has no key");
    assert_eq!(server.revisions("vm1").len(), 2, "nothing was committed");
    assert_eq!(pool.snapshots("vm1"), snaps, "no snapshot was made");

    // --new-key starts a full chain under the other key.
    use_key(Some(&other));
    let rotated: serde_json::Value =
        serde_json::from_str(&server.client_ok(&["--json", "push", "vm1", "--new-key"])).unwrap();
    assert_eq!(
        rotated["revision"]["parent_id"],
        serde_json::Value::Null,
        "{rotated}"
    );
    let restored = work.join("rotated.img");
    server.client_ok(&["restore", "vm1", restored.to_str().unwrap()]);
    assert_eq!(file_hash(&restored), file_hash(&src));
}
