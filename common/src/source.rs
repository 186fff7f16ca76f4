//! Source specs: what a job backs up, as written in config or on the
//! command line.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Commands run around taking a snapshot (e.g. a guest fs-freeze/thaw, or
/// `lvcreate --snapshot` for a block device).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Hooks {
    /// Run before the snapshot; a failure aborts the push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_snapshot: Option<String>,
    /// Run after the snapshot whenever `pre-snapshot` ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_snapshot: Option<String>,
    /// Run once the source has been read, whether the push succeeded or
    /// not, whenever `pre-snapshot` ran (e.g. `lvremove` of the snapshot
    /// `pre-snapshot` made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<String>,
    /// Seconds each hook may take (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_timeout: Option<u64>,
}

/// A job's source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceSpec {
    /// A raw image file, read as it is (stop or snapshot the VM first, or
    /// use hooks).
    File {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Hooks::is_empty")]
        hooks: Hooks,
    },
    /// A block device (LVM snapshot, loop device, ...).
    Block {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Hooks::is_empty")]
        hooks: Hooks,
    },
    /// A Ceph RBD image.
    CephRbd {
        pool: String,
        image: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        /// `ceph.conf` path.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conf: Option<PathBuf>,
        /// Ceph client id (without `client.`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keyring: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Hooks::is_empty")]
        hooks: Hooks,
    },
    /// A QEMU disk image (qcow2) of a stopped guest: read through
    /// `qemu-nbd`, with a persistent dirty bitmap per revision so that an
    /// incremental push reads only what changed since its parent.
    Qemu { image: PathBuf },
}

/// No hooks (sources that take no snapshot of their own).
const NO_HOOKS: Hooks = Hooks {
    pre_snapshot: None,
    post_snapshot: None,
    cleanup: None,
    hook_timeout: None,
};

impl Hooks {
    pub fn is_empty(&self) -> bool {
        *self == Hooks::default()
    }
}

impl SourceSpec {
    /// The `type` as written in config.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSpec::File { .. } => "file",
            SourceSpec::Block { .. } => "block",
            SourceSpec::CephRbd { .. } => "ceph-rbd",
            SourceSpec::Qemu { .. } => "qemu",
        }
    }

    pub fn hooks(&self) -> &Hooks {
        match self {
            SourceSpec::File { hooks, .. }
            | SourceSpec::Block { hooks, .. }
            | SourceSpec::CephRbd { hooks, .. } => hooks,
            SourceSpec::Qemu { .. } => &NO_HOOKS,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Error::invalid(format!("bad source spec: {e}")))
    }

    /// Parses a command-line source: a path (file or block device, decided
    /// by the caller's `is_block` probe), `rbd:POOL/IMAGE` or `qemu:IMAGE`.
    pub fn from_cli(s: &str, is_block: impl Fn(&str) -> bool) -> Result<Self> {
        if let Some(image) = s.strip_prefix("qemu:") {
            if image.is_empty() {
                return Err(Error::invalid(format!("bad qemu source {s:?}: use qemu:IMAGE")));
            }
            return Ok(SourceSpec::Qemu { image: image.into() });
        }
        if let Some(rest) = s.strip_prefix("rbd:") {
            let (pool, image) = rest
                .split_once('/')
                .ok_or_else(|| Error::invalid(format!("bad rbd source {s:?}: use rbd:POOL/IMAGE")))?;
            if pool.is_empty() || image.is_empty() {
                return Err(Error::invalid(format!(
                    "bad rbd source {s:?}: use rbd:POOL/IMAGE"
                )));
            }
            return Ok(SourceSpec::CephRbd {
                pool: pool.into(),
                image: image.into(),
                namespace: None,
                conf: None,
                id: None,
                keyring: None,
                hooks: Hooks::default(),
            });
        }
        if s.is_empty() {
            return Err(Error::invalid("empty source"));
        }
        let path = PathBuf::from(s);
        Ok(if is_block(s) {
            SourceSpec::Block {
                path,
                hooks: Hooks::default(),
            }
        } else {
            SourceSpec::File {
                path,
                hooks: Hooks::default(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_forms() {
        let s: SourceSpec = serde_yaml::from_str("{type: ceph-rbd, pool: rbd, image: vm1.root}").unwrap();
        assert_eq!(s.kind(), "ceph-rbd");
        let s: SourceSpec =
            serde_yaml::from_str("{type: block, path: /dev/vg/x, hooks: {pre-snapshot: 'lvcreate -s ...'}}")
                .unwrap();
        assert_eq!(s.hooks().pre_snapshot.as_deref(), Some("lvcreate -s ..."));
        assert_eq!(SourceSpec::from_json(&s.to_json()).unwrap(), s);
        assert!(serde_yaml::from_str::<SourceSpec>("{type: nfs, path: x}").is_err());
        assert!(serde_yaml::from_str::<SourceSpec>("{type: file, path: x, colour: red}").is_err());
    }

    #[test]
    fn cli_forms() {
        let s = SourceSpec::from_cli("rbd:rbd/vm1", |_| false).unwrap();
        assert!(
            matches!(s, SourceSpec::CephRbd { ref pool, ref image, .. } if pool == "rbd" && image == "vm1")
        );
        assert_eq!(
            SourceSpec::from_cli("/dev/loop0", |_| true).unwrap().kind(),
            "block"
        );
        assert_eq!(
            SourceSpec::from_cli("disk.img", |_| false).unwrap().kind(),
            "file"
        );
        assert!(SourceSpec::from_cli("rbd:nopool", |_| false).is_err());
        let q = SourceSpec::from_cli("qemu:/vm/disk.qcow2", |_| false).unwrap();
        assert_eq!(
            q,
            SourceSpec::Qemu {
                image: "/vm/disk.qcow2".into()
            }
        );
        assert!(q.hooks().is_empty());
        assert!(SourceSpec::from_cli("qemu:", |_| false).is_err());
        let y: SourceSpec = serde_yaml::from_str("{type: qemu, image: /vm/disk.qcow2}").unwrap();
        assert_eq!(y, q);
        assert!(serde_yaml::from_str::<SourceSpec>("{type: qemu, image: x, hooks: {}}").is_err());
    }
}
