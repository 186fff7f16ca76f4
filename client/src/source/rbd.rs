//! Ceph RBD images through the `rbd` command line tool: snapshots, the
//! `export-diff` stream, image creation and `import-diff` for restores.
//! Everything runs in user space; no kernel mapping.

use super::process::{self, Running};
use backy_common::source::SourceSpec;
use backy_common::{Error, Result};
use serde::Deserialize;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Prefix of the snapshots backy creates; `backy-<revision id>`.
pub const SNAP_PREFIX: &str = "backy-";

/// Time allowed for a metadata command (snap create/ls/rm, info, create).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// One image and how to reach its cluster.
#[derive(Clone, Debug)]
pub struct Rbd {
    pool: String,
    namespace: Option<String>,
    image: String,
    conf: Option<PathBuf>,
    id: Option<String>,
    keyring: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Info {
    size: u64,
    object_size: u64,
    /// Given only with the striping feature.
    stripe_unit: Option<u64>,
    stripe_count: Option<u64>,
}

#[derive(Deserialize)]
struct DiffExtent {
    offset: u64,
    length: u64,
}

#[derive(Deserialize)]
struct Snap {
    name: String,
}

impl Rbd {
    pub fn from_spec(spec: &SourceSpec) -> Result<Rbd> {
        let SourceSpec::CephRbd {
            pool,
            image,
            namespace,
            conf,
            id,
            keyring,
            ..
        } = spec
        else {
            return Err(Error::internal(format!("{} source is not ceph-rbd", spec.kind())));
        };
        for (what, v) in [("pool", pool), ("image", image)] {
            check_name(what, v)?;
        }
        if let Some(ns) = namespace {
            check_name("namespace", ns)?;
        }
        Ok(Rbd {
            pool: pool.clone(),
            namespace: namespace.clone().filter(|n| !n.is_empty()),
            image: image.clone(),
            conf: conf.clone(),
            id: id.clone(),
            keyring: keyring.clone(),
        })
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    pub fn image(&self) -> &str {
        &self.image
    }

    pub fn conf(&self) -> Option<&std::path::Path> {
        self.conf.as_deref()
    }

    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    pub fn keyring(&self) -> Option<&std::path::Path> {
        self.keyring.as_deref()
    }

    /// `pool/[namespace/]image`.
    pub fn image_spec(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }

    pub fn snap_spec(&self, snap: &str) -> String {
        format!("{}@{snap}", self.image_spec())
    }

    /// `rbd` with the cluster options and the given arguments.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("rbd");
        if let Some(c) = &self.conf {
            cmd.arg("--conf").arg(c);
        }
        if let Some(id) = &self.id {
            cmd.arg("--id").arg(id);
        }
        if let Some(k) = &self.keyring {
            cmd.arg("--keyring").arg(k);
        }
        cmd.args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<Vec<u8>> {
        let what = format!("`rbd {}`", args.join(" "));
        process::output(self.command(args), what, COMMAND_TIMEOUT)
    }

    /// The size of the image, or of one of its snapshots.
    pub fn size(&self, snap: Option<&str>) -> Result<u64> {
        let spec = snap.map_or_else(|| self.image_spec(), |s| self.snap_spec(s));
        let out = self.run(&["info", "--format", "json", &spec])?;
        let info: Info = serde_json::from_slice(&out)
            .map_err(|e| Error::internal(format!("`rbd info {spec}` printed unexpected JSON: {e}")))?;
        Ok(info.size)
    }

    /// Whether every block of `block_size` bytes lies in one RADOS object
    /// (objects a whole number of blocks, no fancy striping): then a
    /// whole-object diff covers every block it touches whole.
    pub fn objects_hold_whole_blocks(&self, snap: &str, block_size: u64) -> Result<bool> {
        let spec = self.snap_spec(snap);
        let out = self.run(&["info", "--format", "json", &spec])?;
        let info: Info = serde_json::from_slice(&out)
            .map_err(|e| Error::internal(format!("`rbd info {spec}` printed unexpected JSON: {e}")))?;
        let plain = info.stripe_count.unwrap_or(1) <= 1 || info.stripe_unit == Some(info.object_size);
        Ok(plain && block_size > 0 && info.object_size.is_multiple_of(block_size))
    }

    /// The ranges changed between snapshot `from` and `snap` (`rbd diff`:
    /// metadata only, no data read).
    pub fn changed_extents(&self, from: &str, snap: &str) -> Result<Vec<backy_common::ranges::Extent>> {
        let spec = self.snap_spec(snap);
        let out = self.run(&["diff", "--from-snap", from, "--format", "json", &spec])?;
        let extents: Vec<DiffExtent> = serde_json::from_slice(&out)
            .map_err(|e| Error::internal(format!("`rbd diff {spec}` printed unexpected JSON: {e}")))?;
        Ok(extents
            .into_iter()
            .map(|e| backy_common::ranges::Extent {
                offset: e.offset,
                len: e.length,
            })
            .collect())
    }

    /// Whether the image exists (other failures are errors). `rbd` exits
    /// with the errno it failed with: ENOENT (2) for a missing image or pool.
    pub fn exists(&self) -> Result<bool> {
        let spec = self.image_spec();
        let mut cmd = self.command(&["info", "--format", "json", &spec]);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let mut running = process::spawn(cmd, format!("`rbd info {spec}`"))?;
        match running.wait(COMMAND_TIMEOUT)? {
            Some(s) if s.success() => Ok(true),
            Some(s) if s.code() == Some(ENOENT) => Ok(false),
            status => {
                let tail = running.stderr_tail();
                Err(Error::unavailable(match status {
                    Some(s) => format!("`rbd info {spec}` failed ({}){tail}", process::describe(s)),
                    None => format!("`rbd info {spec}` did not finish in time{tail}"),
                }))
            }
        }
    }

    pub fn create(&self, size: u64) -> Result<()> {
        self.run(&["create", "--size", &format!("{size}B"), &self.image_spec()])
            .map(drop)
    }

    pub fn remove(&self) -> Result<()> {
        self.run(&["rm", "--no-progress", &self.image_spec()]).map(drop)
    }

    pub fn snapshots(&self) -> Result<Vec<String>> {
        let spec = self.image_spec();
        let out = self.run(&["snap", "ls", "--format", "json", &spec])?;
        let snaps: Vec<Snap> = serde_json::from_slice(&out)
            .map_err(|e| Error::internal(format!("`rbd snap ls {spec}` printed unexpected JSON: {e}")))?;
        Ok(snaps.into_iter().map(|s| s.name).collect())
    }

    pub fn snap_create(&self, snap: &str) -> Result<()> {
        self.run(&["snap", "create", "--no-progress", &self.snap_spec(snap)])
            .map(drop)
    }

    pub fn snap_remove(&self, snap: &str) -> Result<()> {
        self.run(&["snap", "rm", "--no-progress", &self.snap_spec(snap)])
            .map(drop)
    }

    /// Starts `rbd export-diff [--from-snap FROM --whole-object] IMAGE@SNAP
    /// -`; read the diff from the child's stdout. From a snapshot, every
    /// object changed since comes whole (its digests need all its bytes).
    pub fn export_diff(&self, from: Option<&str>, snap: &str) -> Result<Running> {
        let to = self.snap_spec(snap);
        let mut args = vec!["export-diff", "--no-progress"];
        if let Some(f) = from {
            args.extend(["--from-snap", f, "--whole-object"]);
        }
        args.extend([to.as_str(), "-"]);
        let mut cmd = self.command(&args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        process::spawn(cmd, format!("`rbd {}`", args.join(" ")))
    }

    /// Starts `rbd export-diff --from-snap FROM --whole-object IMAGE -`:
    /// every object changed since `from` up to the image as it is now,
    /// whole.
    pub fn export_diff_to_head(&self, from: &str) -> Result<Running> {
        let spec = self.image_spec();
        let args = [
            "export-diff",
            "--no-progress",
            "--from-snap",
            from,
            "--whole-object",
            spec.as_str(),
            "-",
        ];
        let mut cmd = self.command(&args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        process::spawn(cmd, format!("`rbd {}`", args.join(" ")))
    }

    /// Starts `rbd export IMAGE -` (the image as it is now); read it from
    /// the child's stdout.
    pub fn export(&self) -> Result<Running> {
        let spec = self.image_spec();
        let args = ["export", "--no-progress", spec.as_str(), "-"];
        let mut cmd = self.command(&args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        process::spawn(cmd, format!("`rbd {}`", args.join(" ")))
    }

    /// Starts `rbd import-diff - IMAGE`; write the diff to the child's stdin.
    pub fn import_diff(&self) -> Result<Running> {
        let spec = self.image_spec();
        let args = ["import-diff", "--no-progress", "-", spec.as_str()];
        let mut cmd = self.command(&args);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        process::spawn(cmd, format!("`rbd {}`", args.join(" ")))
    }
}

/// The exit status `rbd` gives for "no such image or pool".
const ENOENT: i32 = 2;

/// Pool, namespace and image names go on a command line: no option-like or
/// path-like names.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok =
        !name.is_empty() && !name.starts_with('-') && !name.contains(['/', '@', '\0']) && name.len() <= 256;
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!("bad rbd {what} name {name:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_names() {
        let spec = SourceSpec::from_cli("rbd:rbd/vm1", |_| false).unwrap();
        let r = Rbd::from_spec(&spec).unwrap();
        assert_eq!(r.snap_spec("backy-x"), "rbd/vm1@backy-x");
        let spec: SourceSpec =
            serde_yaml::from_str("{type: ceph-rbd, pool: p, namespace: ns, image: i, id: backup}").unwrap();
        let r = Rbd::from_spec(&spec).unwrap();
        assert_eq!(r.image_spec(), "p/ns/i");
        let args: Vec<String> = r
            .command(&["info"])
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["--id", "backup", "info"]);
        for bad in ["rbd:rbd/-x", "rbd:rbd/a@b", "rbd:-p/x"] {
            let spec = SourceSpec::from_cli(bad, |_| false).unwrap();
            assert!(Rbd::from_spec(&spec).is_err(), "{bad}");
        }
    }
}
