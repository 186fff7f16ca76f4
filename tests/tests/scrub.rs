//! The background scrub re-reads stored revisions on its own, throttled:
//! a flipped byte makes a revision distrusted (and the next push a full
//! one), a clean one becomes verified.

mod support;

use std::os::unix::fs::FileExt;
use support::*;

#[test]
fn scrub_finds_a_flipped_byte_and_verifies_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    let img2 = dir.path().join("vm2.img");
    make_image(&img, 32 * MIB, &[(0, 24 * MIB)]);
    make_image(&img2, 32 * MIB, &[(4 * MIB, 20 * MIB)]);
    // Due two seconds after commit; 8 MiB/s, so 32 MiB take 4 s.
    let server = Server::start_config(
        &base,
        "listen: 127.0.0.1:0\nbase-dir: BASE\nscrub: {interval: 2s, rate: 8M}\njobs:\n  vm1: {schedule: none}\n  vm2: {schedule: none}\n",
    );
    server.client_ok(&["push", "vm1", "--source", img.to_str().unwrap()]);
    server.client_ok(&["push", "vm2", "--source", img2.to_str().unwrap()]);
    let bad = &server.revisions("vm1")[0];
    let id = bad["id"].as_str().unwrap().to_string();
    let stored = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(base.join("vm1").join(&id))
        .unwrap();
    let mut byte = [0u8; 1];
    stored.read_exact_at(&mut byte, 13 * MIB + 7).unwrap();
    stored.write_all_at(&[byte[0] ^ 0x20], 13 * MIB + 7).unwrap();
    stored.sync_all().unwrap();

    let trust = |job: &str| server.revisions(job)[0]["trust"].as_str().unwrap().to_string();
    wait_for(
        "scrub to distrust vm1 and verify vm2",
        std::time::Duration::from_secs(60),
        || trust("vm1") == "distrusted" && trust("vm2") == "verified",
    );
    let good = &server.revisions("vm2")[0];
    let committed = chrono::DateTime::parse_from_rfc3339(good["timestamp"].as_str().unwrap()).unwrap();
    let verified = chrono::DateTime::parse_from_rfc3339(good["verified_at"].as_str().unwrap()).unwrap();
    let took = (verified - committed).num_milliseconds();
    assert!(
        took >= 6000,
        "due after 2 s, then 32 MiB at 8 MiB/s: verified after {took} ms"
    );

    // The distrusted revision is no parent: the next push rewrites every block.
    let out = server.client_ok(&["--json", "push", "vm1", "--source", img.to_str().unwrap()]);
    let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pushed["bytes_sent"].as_u64(), Some(24 * MIB));
    let target = dir.path().join("r.img");
    server.client_ok(&["restore", "vm1", target.to_str().unwrap()]);
    assert_eq!(file_hash(&target), file_hash(&img));
}

#[test]
fn verify_source_compares_a_revision_with_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.img");
    make_image(&img, 40 * MIB + 512, &[(0, 30 * MIB)]);
    let server = Server::start(&dir.path().join("store"), "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", img.to_str().unwrap()]);
    let src = img.to_str().unwrap();

    let out = server.client_ok(&["verify", "vm1", "--source", src]);
    assert!(
        out.contains("all 11 blocks") && out.contains("equal the source"),
        "{out}"
    );
    let out = server.client_ok(&["--json", "verify", "vm1", "--source", src, "--sample", "30"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let n = v["blocks_compared"].as_u64().unwrap();
    assert!((1..11).contains(&n), "a sample compares some blocks: {n}");
    assert_eq!(v["differing"], serde_json::json!([]));

    // The source moved on: the difference is reported with its block, exit 1.
    write_at(&img, 21 * MIB + 3, b"changed");
    let out = server.client(&["verify", "vm1", "--source", src]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 of all 11 blocks differ from the source at offsets [20971520]"),
        "{text}"
    );
    // Trust is left alone: only the stored data can be distrusted.
    assert_eq!(server.revisions("vm1")[0]["trust"], "trusted");

    // A source of another size is not the state the revision came from.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let out = server.client(&["verify", "vm1", "--source", src]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the source has 8388608 bytes"), "{err}");
}
