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
    /// A QEMU disk: a qcow2 image of a stopped guest, or a running
    /// guest's disk node through QMP; persistent dirty bitmaps make an
    /// incremental push read only what changed since its parent.
    Qemu(QemuSpec),
}

/// A `type: qemu` source: exactly one of `image:` or `qmp:` (with `node:`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawQemuSpec", into = "RawQemuSpec")]
pub struct QemuSpec {
    pub disk: QemuDisk,
    pub hooks: Hooks,
}

/// Where a qemu source's disk is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QemuDisk {
    /// A qcow2 file no QEMU has open, read through `qemu-nbd`.
    Image(PathBuf),
    /// A disk of a running QEMU, read through its QMP socket and NBD
    /// server from a point-in-time (fleecing) view.
    Running {
        qmp: PathBuf,
        /// The block node, or the drive id (`query-block` device) or guest
        /// device whose medium it is.
        node: String,
        /// Where the fleecing overlay lives (default: /var/tmp); it holds
        /// the old data of what the guest overwrites during the backup.
        scratch_dir: Option<PathBuf>,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawQemuSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    qmp: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scratch_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Hooks::is_empty")]
    hooks: Hooks,
}

impl TryFrom<RawQemuSpec> for QemuSpec {
    type Error = String;

    fn try_from(raw: RawQemuSpec) -> std::result::Result<Self, String> {
        let disk = match (raw.image, raw.qmp, raw.node) {
            (Some(image), None, None) => {
                if raw.scratch_dir.is_some() {
                    return Err("scratch-dir is for a running guest (qmp:), not an image".into());
                }
                QemuDisk::Image(image)
            }
            (None, Some(qmp), Some(node)) if !node.is_empty() => QemuDisk::Running {
                qmp,
                node,
                scratch_dir: raw.scratch_dir,
            },
            (None, Some(_), _) => {
                return Err("a qmp: source needs node: (the disk's block node or drive id)".into())
            }
            (Some(_), Some(_), _) => {
                return Err("give either image: (a stopped guest) or qmp: (a running one), not both".into())
            }
            (Some(_), None, Some(_)) => return Err("node: goes with qmp:, not image:".into()),
            (None, None, _) => return Err(
                "a qemu source needs image: (a stopped guest's qcow2) or qmp: and node: (a running guest)"
                    .into(),
            ),
        };
        Ok(QemuSpec {
            disk,
            hooks: raw.hooks,
        })
    }
}

impl From<QemuSpec> for RawQemuSpec {
    fn from(spec: QemuSpec) -> Self {
        let mut raw = RawQemuSpec {
            image: None,
            qmp: None,
            node: None,
            scratch_dir: None,
            hooks: spec.hooks,
        };
        match spec.disk {
            QemuDisk::Image(image) => raw.image = Some(image),
            QemuDisk::Running {
                qmp,
                node,
                scratch_dir,
            } => {
                raw.qmp = Some(qmp);
                raw.node = Some(node);
                raw.scratch_dir = scratch_dir;
            }
        }
        raw
    }
}

impl QemuSpec {
    pub fn image(image: impl Into<PathBuf>) -> Self {
        QemuSpec {
            disk: QemuDisk::Image(image.into()),
            hooks: Hooks::default(),
        }
    }

    pub fn running(qmp: impl Into<PathBuf>, node: impl Into<String>) -> Self {
        QemuSpec {
            disk: QemuDisk::Running {
                qmp: qmp.into(),
                node: node.into(),
                scratch_dir: None,
            },
            hooks: Hooks::default(),
        }
    }
}

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
            SourceSpec::Qemu(_) => "qemu",
        }
    }

    pub fn hooks(&self) -> &Hooks {
        match self {
            SourceSpec::File { hooks, .. }
            | SourceSpec::Block { hooks, .. }
            | SourceSpec::CephRbd { hooks, .. } => hooks,
            SourceSpec::Qemu(q) => &q.hooks,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Error::invalid(format!("bad source spec: {e}")))
    }

    /// Parses a command-line source: a path (file or block device, decided
    /// by the caller's `is_block` probe), `rbd:POOL/IMAGE`, `qemu:IMAGE` or
    /// `qmp:SOCKET:NODE` (a running guest's disk).
    pub fn from_cli(s: &str, is_block: impl Fn(&str) -> bool) -> Result<Self> {
        if let Some(image) = s.strip_prefix("qemu:") {
            if image.is_empty() {
                return Err(Error::invalid(format!("bad qemu source {s:?}: use qemu:IMAGE")));
            }
            return Ok(SourceSpec::Qemu(QemuSpec::image(image)));
        }
        if let Some(rest) = s.strip_prefix("qmp:") {
            return match rest.rsplit_once(':') {
                Some((socket, node)) if !socket.is_empty() && !node.is_empty() => {
                    Ok(SourceSpec::Qemu(QemuSpec::running(socket, node)))
                }
                _ => Err(Error::invalid(format!(
                    "bad qmp source {s:?}: use qmp:SOCKET:NODE (the QMP socket, the disk's node or drive id)"
                ))),
            };
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
        assert_eq!(q, SourceSpec::Qemu(QemuSpec::image("/vm/disk.qcow2")));
        assert!(q.hooks().is_empty());
        assert!(SourceSpec::from_cli("qemu:", |_| false).is_err());
        let y: SourceSpec = serde_yaml::from_str("{type: qemu, image: /vm/disk.qcow2}").unwrap();
        assert_eq!(y, q);
        let r = SourceSpec::from_cli("qmp:/run/vm1.qmp:drive-virtio-disk0", |_| false).unwrap();
        assert_eq!(
            r,
            SourceSpec::Qemu(QemuSpec::running("/run/vm1.qmp", "drive-virtio-disk0"))
        );
        for bad in ["qmp:", "qmp:/run/vm1.qmp", "qmp::disk0", "qmp:/run/vm1.qmp:"] {
            let e = SourceSpec::from_cli(bad, |_| false).unwrap_err();
            assert!(e.message.contains("use qmp:SOCKET:NODE"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn qemu_yaml_forms() {
        let yaml = "{type: qemu, qmp: /run/vm1.qmp, node: disk0, scratch-dir: /srv/tmp, \
                    hooks: {pre-snapshot: 'virsh domfsfreeze vm1'}}";
        let s: SourceSpec = serde_yaml::from_str(yaml).unwrap();
        let SourceSpec::Qemu(q) = &s else { panic!("{s:?}") };
        assert_eq!(
            q.disk,
            QemuDisk::Running {
                qmp: "/run/vm1.qmp".into(),
                node: "disk0".into(),
                scratch_dir: Some("/srv/tmp".into())
            }
        );
        assert_eq!(s.hooks().pre_snapshot.as_deref(), Some("virsh domfsfreeze vm1"));
        assert_eq!(SourceSpec::from_json(&s.to_json()).unwrap(), s);
        let img: SourceSpec =
            serde_yaml::from_str("{type: qemu, image: x, hooks: {cleanup: 'true'}}").unwrap();
        assert_eq!(SourceSpec::from_json(&img.to_json()).unwrap(), img);
        for (bad, want) in [
            ("{type: qemu}", "needs image:"),
            ("{type: qemu, qmp: /q}", "needs node:"),
            ("{type: qemu, qmp: /q, node: ''}", "needs node:"),
            ("{type: qemu, image: x, qmp: /q, node: d}", "not both"),
            ("{type: qemu, image: x, node: d}", "node: goes with qmp:"),
            (
                "{type: qemu, image: x, scratch-dir: /t}",
                "scratch-dir is for a running guest",
            ),
            ("{type: qemu, image: x, colour: red}", "unknown field `colour`"),
        ] {
            let e = serde_yaml::from_str::<SourceSpec>(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
