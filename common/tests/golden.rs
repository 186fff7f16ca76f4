//! The on-disk formats, byte for byte: a `.digests` manifest and a `.rev`
//! file as this version writes them, against files checked in under
//! `tests/golden/`. A change that alters either format fails here and must
//! come with a version bump and a reader for the old files.
//! `BACKY_BLESS=1 cargo test -p backy-common --test golden` rewrites them.

use backy_common::manifest::{digest, Manifest};
use backy_common::revision::{RevisionMeta, SourceInfo, Stats, StorageMode, Trust};
use std::path::PathBuf;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check(name: &str, bytes: &[u8]) {
    let path = golden(name);
    if std::env::var_os("BACKY_BLESS").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        want == bytes,
        "{name} differs from {}: the on-disk format changed",
        path.display()
    );
}

/// 3 blocks of 64 KiB and a short one: data, zeros, data, short zeros.
fn manifest() -> Manifest {
    let bs = 64 << 10;
    let mut m = Manifest::zeroed(3 * bs as u64 + 100, bs).unwrap();
    m.set(0, digest(b"block zero")).unwrap();
    m.set(2, digest(b"block two")).unwrap();
    m
}

#[test]
fn digests_file_format() {
    let m = manifest();
    let bytes = m.encode();
    check("v1.digests", &bytes);
    // And it reads back as the same manifest.
    assert_eq!(Manifest::decode(&bytes, "golden").unwrap(), m);
}

fn golden_meta() -> RevisionMeta {
    RevisionMeta {
        id: "8e1cd8a4-5c1c-4b6e-9a43-0b2f6f1d3c7e".parse().unwrap(),
        timestamp: "2026-12-01T10:00:00Z".parse().unwrap(),
        parent: Some("1f0e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".parse().unwrap()),
        size: 3 * (64 << 10) + 100,
        block_size: 64 << 10,
        tags: ["daily".to_string(), "manual:keep".to_string()].into(),
        trust: Trust::Verified,
        verified_at: Some("2026-12-02T03:00:00Z".parse().unwrap()),
        source: SourceInfo {
            kind: "ceph-rbd".into(),
            snapshot: "backy-8e1cd8a4-5c1c-4b6e-9a43-0b2f6f1d3c7e".into(),
            group: None,
        },
        stats: Stats {
            bytes_received: 131072,
            bytes_written: 131072,
            changed_blocks: 2,
            duration: 1.5,
            bytes_deduplicated: 0,
            audit: None,
        },
        manifest_digest: hex::encode(manifest().file_digest()),
        storage: StorageMode::Reflink,
        locked_until: None,
        key_check: None,
    }
}

#[test]
fn rev_file_format() {
    let meta = golden_meta();
    let text = meta.to_yaml().unwrap();
    check("v1.rev", text.as_bytes());
    assert_eq!(RevisionMeta::from_yaml(&text, "golden").unwrap(), meta);
}

/// Issue 28: a revision under a retention lock carries `locked_until`
/// (one more line, at the end); a `.rev` without it (every older one)
/// still loads, unlocked, and one without a lock is written as before.
#[test]
fn rev_file_format_with_a_retention_lock() {
    let meta = RevisionMeta {
        locked_until: Some("2026-12-08T10:00:00Z".parse().unwrap()),
        ..golden_meta()
    };
    let text = meta.to_yaml().unwrap();
    check("v1-locked.rev", text.as_bytes());
    assert_eq!(RevisionMeta::from_yaml(&text, "golden").unwrap(), meta);
    let old = std::fs::read_to_string(golden("v1.rev")).unwrap();
    assert_eq!(
        text,
        format!("{old}locked_until: 2026-12-08T10:00:00Z\n"),
        "only the new line differs"
    );
    let loaded = RevisionMeta::from_yaml(&old, "v1.rev").unwrap();
    assert_eq!(loaded.locked_until, None);
    assert_eq!(loaded, golden_meta());
}
