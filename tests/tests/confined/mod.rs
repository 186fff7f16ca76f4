//! A RADOS namespace and a cephx identity confined to it, on the test
//! cluster (BACKY_TEST_CEPH_CONF): what a pool store's server gets
//! (docs/DESIGN.md "Ceph pool store", least privilege). Used by
//! tests/tests/ceph_pool.rs and tests/tests/ceph_pool_store.rs.

// Shared by several test files, each using a part of it.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The cluster's ceph.conf, or `None` (with the reason printed) when the
/// test command did not start one.
pub fn ceph_conf() -> Option<PathBuf> {
    match std::env::var_os("BACKY_TEST_CEPH_CONF") {
        Some(c) => Some(PathBuf::from(c)),
        None => {
            println!("SKIPPED: no Ceph cluster (BACKY_TEST_CEPH_CONF is unset; scripts/test.sh starts one)");
            None
        }
    }
}

fn run(tool: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

pub fn ok(out: Output, what: &str) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A RADOS namespace in pool `rbd` and a cephx identity whose capabilities
/// are `profile rbd` on that namespace only: what a store's server gets.
/// Removed with everything in it on drop.
pub struct Confined {
    conf: PathBuf,
    pub namespace: String,
    pub id: String,
    pub keyring: PathBuf,
    _dir: tempfile::TempDir,
}

impl Confined {
    pub fn new(conf: &Path, tag: &str) -> Confined {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("backy-pool-{}-{tag}", std::process::id());
        let c = Confined {
            conf: conf.to_path_buf(),
            namespace: name.clone(),
            id: name.clone(),
            keyring: dir.path().join("keyring"),
            _dir: dir,
        };
        ok(
            c.admin("rbd", &["namespace", "create", &format!("rbd/{name}")]),
            "rbd namespace create",
        );
        let osd_caps = format!("profile rbd pool=rbd namespace={name}");
        let keyring = ok(
            c.admin(
                "ceph",
                &[
                    "auth",
                    "get-or-create",
                    &format!("client.{name}"),
                    "mon",
                    "profile rbd",
                    "osd",
                    &osd_caps,
                ],
            ),
            "ceph auth get-or-create",
        );
        std::fs::write(&c.keyring, keyring).unwrap();
        c
    }

    pub fn admin(&self, tool: &str, args: &[&str]) -> Output {
        let mut all = vec!["--conf", self.conf.to_str().unwrap()];
        all.extend_from_slice(args);
        run(tool, &all, b"")
    }

    /// Runs `rbd` or `rados` as the confined identity.
    pub fn tool(&self, tool: &str, args: &[&str], stdin: &[u8]) -> Output {
        let mut all = vec![
            "--conf",
            self.conf.to_str().unwrap(),
            "--id",
            &self.id,
            "--keyring",
            self.keyring.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        run(tool, &all, stdin)
    }

    pub fn rados(&self, args: &[&str]) -> Output {
        let mut all = vec!["-p", "rbd", "-N", &self.namespace];
        all.extend_from_slice(args);
        self.tool("rados", &all, b"")
    }

    /// `rbd import-diff` of `stream` into image `image` of the namespace.
    pub fn import_diff(&self, image: &str, stream: &[u8]) -> Output {
        self.tool(
            "rbd",
            &["import-diff", "--no-progress", "-", &self.spec(image)],
            stream,
        )
    }

    /// The `store:` section of a server.yaml on this namespace, as this
    /// identity.
    pub fn store_yaml(&self) -> String {
        format!(
            "store:\n  type: ceph-rbd\n  conf: {}\n  id: {}\n  keyring: {}\n  pool: rbd\n  namespace: {}\n",
            self.conf.display(),
            self.id,
            self.keyring.display(),
            self.namespace
        )
    }

    /// The cookie (the server's URL) of the lease on `job`, if held now.
    /// No job object yet (never pushed): `None`.
    pub fn lease_holder(&self, job: &str) -> Option<String> {
        let out = self.rados(&["lock", "info", &format!("backy.job.{job}"), "lease"]);
        if String::from_utf8_lossy(&out.stderr).contains("No such file or directory") {
            return None;
        }
        let out = ok(out, "rados lock info");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        v["lockers"]
            .as_array()
            .and_then(|l| l.first())
            .and_then(|l| l["cookie"].as_str())
            .map(str::to_string)
    }

    pub fn spec(&self, image: &str) -> String {
        format!("rbd/{}/{image}", self.namespace)
    }

    pub fn snapshots(&self, image: &str) -> Vec<String> {
        let out = ok(
            self.tool("rbd", &["snap", "ls", "--format", "json", &self.spec(image)], b""),
            "rbd snap ls",
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// The bytes of a snapshot (or the head), as `rbd export` reads them.
    pub fn export(&self, image: &str, snap: Option<&str>) -> Vec<u8> {
        let spec = match snap {
            Some(s) => format!("{}@{s}", self.spec(image)),
            None => self.spec(image),
        };
        ok(
            self.tool("rbd", &["export", "--no-progress", &spec, "-"], b""),
            "rbd export",
        )
    }
}

impl Drop for Confined {
    fn drop(&mut self) {
        let ns = self.namespace.clone();
        let listed = self.admin("rbd", &["ls", &format!("rbd/{ns}")]);
        for image in String::from_utf8_lossy(&listed.stdout).lines() {
            let spec = format!("rbd/{ns}/{image}");
            let _ = self.admin("rbd", &["snap", "purge", "--no-progress", &spec]);
            let _ = self.admin("rbd", &["rm", "--no-progress", &spec]);
        }
        let objects = self.admin("rados", &["-p", "rbd", "-N", &ns, "ls"]);
        for object in String::from_utf8_lossy(&objects.stdout).lines() {
            let _ = self.admin("rados", &["-p", "rbd", "-N", &ns, "rm", object]);
        }
        let _ = self.admin("rbd", &["namespace", "remove", &format!("rbd/{ns}")]);
        let _ = self.admin("ceph", &["auth", "rm", &format!("client.{}", self.id)]);
    }
}

/// Removes a blocklist entry on drop (the confined identity may add
/// entries, not remove them: only the admin lifts a fence).
pub struct Unblock<'a>(pub &'a Confined, pub String);

impl Drop for Unblock<'_> {
    fn drop(&mut self) {
        let _ = self.0.admin("ceph", &["osd", "blocklist", "rm", &self.1]);
    }
}
