//! Client-side encryption end to end on btrfs (docs/encryption.md): the
//! stored revision is ciphertext that an independent AES-XTS (Python's
//! `cryptography`, python3-cryptography) and `backy-client decrypt`
//! turn back into the source; full, scanning and changed-ranges pushes
//! cost only their changes (extents shared with the parent); restores to
//! a file and to standard output give the source; server verify and
//! scrub work without the key; a wrong or missing key is refused with
//! nothing written, and `--new-key` starts a full chain.

mod support;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

/// The zero-granule unit: a 64 KiB granule of zeros stays a hole.
const G: u64 = 64 << 10;

/// Decrypts a stored image with Python's `cryptography` (OpenSSL's
/// AES-XTS), written from docs/encryption.md alone.
const PYTHON_DECRYPT: &str = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = open(sys.argv[1], 'rb').read()
assert len(key) == 64
with open(sys.argv[2], 'rb') as src, open(sys.argv[3], 'wb') as out:
    index = 0
    while True:
        unit = src.read(4096)
        if not unit:
            break
        if unit.count(0) == len(unit):
            out.write(unit)
        else:
            d = Cipher(algorithms.AES(key), modes.XTS(index.to_bytes(16, 'little'))).decryptor()
            out.write(d.update(unit) + d.finalize())
        index += 1
"#;

fn python_decrypt(key: &Path, stored: &Path, out: &Path) {
    // The interpreter scripts/test-deps.sh installs the module for.
    let status = ["/usr/bin/python3", "python3"].iter().find_map(|py| {
        Command::new(py)
            .args(["-c", PYTHON_DECRYPT])
            .arg(key)
            .arg(stored)
            .arg(out)
            .status()
            .ok()
            .filter(|s| s.success())
    });
    assert!(
        status.is_some(),
        "no python3 with cryptography decrypted it (apt-get install python3-cryptography; scripts/test-deps.sh does)"
    );
}

struct World {
    server: Server,
    base: PathBuf,
    work: PathBuf,
    src: PathBuf,
    _fs: LoopFs,
}

impl World {
    fn new(server_config: &str) -> Self {
        let fs = LoopFs::new("btrfs", 2 << 30);
        let base = fs.mount.join("backy");
        let work = fs.mount.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let src = work.join("vm1.img");
        // Data, holes, a block of data with zero granules inside, and a
        // size that ends in a short unit (a multiple of 512, not of 4096).
        make_image(
            &src,
            40 * MIB + 1536,
            &[(0, 9 * MIB), (20 * MIB, 4 * MIB), (40 * MIB, 1536)],
        );
        write_at(&src, 21 * MIB, &[0u8; 2 * G as usize]);
        let server = Server::start_config(&base, server_config);
        World {
            server,
            base,
            work,
            src,
            _fs: fs,
        }
    }

    /// Points the job's `encryption:` at `key` (or none) in client.yaml.
    fn use_key(&self, key: Option<&Path>) {
        let mut yaml = format!(
            "jobs:\n  vm1:\n    source: {{type: file, path: {}}}\n",
            self.src.display()
        );
        if let Some(key) = key {
            yaml.push_str(&format!("    encryption: {{key-file: {}}}\n", key.display()));
        }
        std::fs::write(&self.server.client_config, yaml).unwrap();
    }

    fn keygen(&self, name: &str) -> PathBuf {
        let path = self.work.join(name);
        let out = self.server.client_ok(&["keygen", path.to_str().unwrap()]);
        assert!(out.contains("key check"), "{out}");
        path
    }

    fn push(&self, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--json", "push", "vm1"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.server.client_ok(&args)).unwrap()
    }

    fn stored(&self, rev: &serde_json::Value) -> PathBuf {
        self.base.join("vm1").join(rev["id"].as_str().unwrap())
    }

    /// The newest revision is the source: decrypted by Python and by
    /// `backy-client decrypt`, restored to a file and to stdout.
    fn check_newest(&self, key: &Path) {
        let revs = self.server.revisions("vm1");
        let stored = self.stored(revs.last().unwrap());
        let want = file_hash(&self.src);
        assert_ne!(
            file_hash(&stored),
            want,
            "the stored revision is not the plaintext"
        );
        let py = self.work.join("py.img");
        python_decrypt(key, &stored, &py);
        assert_eq!(file_hash(&py), want, "Python's AES-XTS decrypts it to the source");
        let ours = self.work.join("ours.img");
        self.server.client_ok(&[
            "decrypt",
            "--key-file",
            key.to_str().unwrap(),
            stored.to_str().unwrap(),
            ours.to_str().unwrap(),
        ]);
        assert_eq!(file_hash(&ours), want, "backy-client decrypt");
        let restored = self.work.join("restored.img");
        self.server
            .client_ok(&["restore", "vm1", restored.to_str().unwrap()]);
        assert_eq!(file_hash(&restored), want, "restore to a file");
        let out = self.server.client(&["restore", "vm1", "-"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            blake3::hash(&out.stdout).to_hex().to_string(),
            want,
            "restore to standard output"
        );
        for f in [py, ours, restored] {
            std::fs::remove_file(f).unwrap();
        }
    }
}

fn refused(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "wanted {needle:?} in: {err}");
}

#[test]
fn encrypted_pushes_restore_share_extents_and_refuse_other_keys() {
    let w = World::new(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nscrub: {interval: 1s, rate: 256M}\njobs:\n  vm1: {schedule: none}\n",
    );
    let key = w.keygen("vm1.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = w.server.client(&["keygen", key.to_str().unwrap()]);
    refused(&again, "not replaced");
    w.use_key(Some(&key));

    // Full push.
    let full = w.push(&[]);
    let check = full["revision"]["key_check"].as_str().unwrap().to_string();
    assert_eq!(check.len(), 32, "{check}");
    let revs = w.server.revisions("vm1");
    assert_eq!(revs[0]["key_check"].as_str(), Some(check.as_str()));
    let stored = w.stored(&revs[0]);
    // Holes and zero granules stay zeros; granules of data do not.
    let f = std::fs::File::open(&stored).unwrap();
    let mut buf = vec![0u8; G as usize];
    for (offset, zero) in [
        (10 * MIB, true),
        (21 * MIB, true),
        (21 * MIB + G, true),
        (0, false),
        (22 * MIB, false),
    ] {
        f.read_exact_at(&mut buf, offset).unwrap();
        assert_eq!(buf.iter().all(|&b| b == 0), zero, "granule at {offset}");
    }
    let mut plain = vec![0u8; G as usize];
    std::fs::File::open(&w.src)
        .unwrap()
        .read_exact_at(&mut plain, 0)
        .unwrap();
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_ne!(buf, plain);
    w.check_newest(&key);

    // A scanning incremental: two small writes cost two granules, sent
    // and stored (the rest stays shared with the parent).
    write_at(&w.src, 3 * MIB + 100, &pattern(1, 4096));
    write_at(&w.src, 22 * MIB + 5, &pattern(2, 10));
    let inc = w.push(&[]);
    // Two granules and the granule digests of their two blocks.
    let sent = inc["bytes_sent"].as_u64().unwrap();
    assert!((2 * G..2 * G + 4096).contains(&sent), "{sent}");
    let revs = w.server.revisions("vm1");
    assert_eq!(revs.len(), 2);
    let (_, exclusive) = btrfs_du(&w.stored(&revs[1]));
    assert!(
        exclusive <= 2 * G,
        "the incremental shares all but its changes: {exclusive} exclusive"
    );
    w.check_newest(&key);

    // Changed ranges: the list's granules are encrypted whole (a write
    // into a hole turns a zero granule into ciphertext).
    write_at(&w.src, 30 * MIB + 4096, &pattern(3, 512));
    write_at(&w.src, 5 * MIB, &pattern(4, 100));
    let list = w.work.join("ranges");
    std::fs::write(&list, format!("{} 512\n{} 100\n", 30 * MIB + 4096, 5 * MIB)).unwrap();
    let ranged = w.push(&["--changed-ranges", list.to_str().unwrap()]);
    assert_eq!(ranged["bytes_sent"].as_u64(), Some(2 * G));
    let revs = w.server.revisions("vm1");
    let (_, exclusive) = btrfs_du(&w.stored(&revs[2]));
    assert!(exclusive <= 2 * G, "{exclusive} exclusive");
    w.check_newest(&key);

    // The server verifies and scrubs ciphertext without the key; the
    // client compares the source (encrypted with the key) too.
    w.server.client_ok(&["verify", "vm1", "-r", "all"]);
    let out = w.server.client_ok(&["verify", "vm1", "--source"]);
    assert!(out.contains("equal the source"), "{out}");
    wait_for(
        "the scrub to verify every revision",
        std::time::Duration::from_secs(60),
        || w.server.revisions("vm1").iter().all(|r| r["trust"] == "verified"),
    );

    // No rollback of an encrypted revision: onto a target of its size it
    // restores in full; the export refuses it.
    let same = w.work.join("same.img");
    sparse_copy(&w.src, &same);
    write_at(&same, 7, b"changed");
    let out = w
        .server
        .client_ok(&["--json", "restore", "vm1", same.to_str().unwrap(), "--force"]);
    let restored: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(restored["mode"], "full", "{restored}");
    assert_eq!(file_hash(&same), file_hash(&w.src));
    let socket = w.work.join("vm1.nbd");
    refused(
        &w.server
            .client(&["export", "vm1", "--socket", socket.to_str().unwrap()]),
        "the export cannot serve it",
    );

    // Another key, and no key: refused before anything is written.
    let other = w.keygen("other.key");
    w.use_key(Some(&other));
    refused(&w.server.client(&["push", "vm1", "--force"]), "push --new-key");
    refused(&w.server.client(&["push", "vm1", "--force"]), "another key");
    let target = w.work.join("never.img");
    refused(
        &w.server.client(&["restore", "vm1", target.to_str().unwrap()]),
        "encrypted with another key",
    );
    assert!(!target.exists());
    w.use_key(None);
    refused(&w.server.client(&["push", "vm1", "--force"]), "has no key");
    refused(
        &w.server.client(&["restore", "vm1", target.to_str().unwrap()]),
        "is encrypted and no key was given",
    );
    assert!(!target.exists());
    assert_eq!(w.server.revisions("vm1").len(), 3, "nothing was committed");
    // ... but --key-file restores without the config.
    w.server.client_ok(&[
        "restore",
        "vm1",
        "--key-file",
        key.to_str().unwrap(),
        target.to_str().unwrap(),
    ]);
    assert_eq!(file_hash(&target), file_hash(&w.src));

    // Rotation: --new-key makes a full push under the new key.
    w.use_key(Some(&other));
    let rotated = w.push(&["--new-key"]);
    assert_eq!(rotated["revision"]["parent_id"], serde_json::Value::Null);
    assert_ne!(rotated["revision"]["key_check"].as_str(), Some(check.as_str()));
    w.check_newest(&other);
    // The older revisions still restore with their key.
    let old = w.work.join("old.img");
    let ids = w.server.short_ids("vm1");
    w.server.client_ok(&[
        "restore",
        "vm1",
        "-r",
        &ids[2],
        "--key-file",
        key.to_str().unwrap(),
        old.to_str().unwrap(),
    ]);
    assert_eq!(file_hash(&old), file_hash(&w.src));

    // A flipped byte of ciphertext: the server's verify finds it.
    let revs = w.server.revisions("vm1");
    let stored = w.stored(&revs[3]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&stored)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, MIB + 3).unwrap();
    f.write_all_at(&[byte[0] ^ 1], MIB + 3).unwrap();
    f.sync_all().unwrap();
    let out = w.server.client(&["verify", "vm1"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(w.server.revisions("vm1")[3]["trust"], "distrusted");
}

#[test]
fn an_image_not_a_multiple_of_512_is_refused() {
    let w = World::new("listen: 127.0.0.1:0\nbase-dir: BASE\njobs:\n  vm1: {schedule: none}\n");
    let key = w.keygen("vm1.key");
    w.use_key(Some(&key));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&w.src)
        .unwrap()
        .set_len(40 * MIB + 1000)
        .unwrap();
    refused(&w.server.client(&["push", "vm1"]), "multiple of 512");
    assert!(w.server.revisions("vm1").is_empty());
    // A key file others may read is not used.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(&w.server.client(&["push", "vm1"]), "open to other users");
}

/// An encrypted push broken off (the client killed mid-stream) resumes
/// from what the server kept and sends only the remainder, encrypted as a
/// push in one go would have been; the revision restores onto a block
/// device (a loop device over a file) equal to the source.
#[test]
fn an_encrypted_push_resumes_and_restores_onto_a_device() {
    let w = World::new("listen: 127.0.0.1:0\nbase-dir: BASE\njobs:\n  vm1: {schedule: none}\n");
    // 29 MiB of data in all, in 1 MiB frames.
    write_at(&w.src, 24 * MIB, &pattern(11, 16 * MIB as usize));
    let key = w.keygen("vm1.key");
    w.use_key(Some(&key));
    let out = w
        .server
        .client_env(&[("BACKY_FAULT", "client.frame@20")], &["--json", "push", "vm1"]);
    assert_eq!(
        out.status.signal(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the broken push to fail on the server",
        std::time::Duration::from_secs(30),
        || {
            let job = &w.server.status_json("vm1")["jobs"][0];
            job["running"] == false && job["failures"].as_u64() > Some(0)
        },
    );
    assert!(w.server.revisions("vm1").is_empty(), "nothing committed");

    let pushed = w.push(&[]);
    let at = pushed["resumed_at"].as_u64().expect("the push was resumed");
    assert!(at > 0, "resumed at {at}");
    let sent = pushed["bytes_sent"].as_u64().unwrap();
    assert!(sent < 29 * MIB, "only the remainder is sent: {sent}");
    w.check_newest(&key);
    w.server.client_ok(&["verify", "vm1"]);

    // Onto a block device of the image's size.
    let blank = w.work.join("device.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(std::fs::metadata(&w.src).unwrap().len())
        .unwrap();
    let dev = LoopDev::attach(&blank);
    w.server.client_ok(&["restore", "vm1", dev.path(), "--force"]);
    assert_eq!(file_hash(&dev.dev), file_hash(&w.src), "restored onto the device");
}
