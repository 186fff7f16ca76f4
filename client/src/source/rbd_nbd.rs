//! Single blocks of an RBD snapshot, for the audit of Ceph's diff (issue
//! 34): the `rbd` tool streams whole images or diffs only, so the client
//! starts `qemu-nbd --read-only` with QEMU's rbd block driver (librbd,
//! Debian package qemu-block-extra) on a private Unix socket and reads the
//! sampled blocks through its NBD client. No block status is asked for:
//! where Ceph reports holes is Ceph metadata, the very thing audited, so
//! every sampled block is read.

use super::rbd::Rbd;
use super::Source;
use crate::nbd::NbdClient;
use backy_common::{Error, Result};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long qemu-nbd may take to connect to the cluster and listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What to do when qemu-nbd cannot serve the snapshot.
const REMEDY: &str = "the audit of a Ceph source reads blocks through qemu-nbd with QEMU's rbd \
                      driver (Debian: install qemu-utils and qemu-block-extra), or set audit-sample 0";

/// How long qemu-nbd may take to close the image once our connection is
/// gone.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A snapshot exported by a qemu-nbd of our own; the server stops on drop.
pub struct RbdSnapshot {
    rt: tokio::runtime::Runtime,
    /// `None` once closed.
    client: Option<NbdClient<tokio::net::UnixStream>>,
    size: u64,
    child: Child,
    _dir: tempfile::TempDir,
}

/// The `--image-opts` of snapshot `snap`: QEMU's option syntax doubles a
/// comma inside a value.
pub fn image_opts(rbd: &Rbd, snap: &str) -> String {
    let esc = |v: &str| v.replace(',', ",,");
    let mut opts = format!(
        "driver=rbd,pool={},image={},snapshot={}",
        esc(rbd.pool()),
        esc(rbd.image()),
        esc(snap)
    );
    if let Some(ns) = rbd.namespace() {
        opts.push_str(&format!(",namespace={}", esc(ns)));
    }
    if let Some(conf) = rbd.conf() {
        opts.push_str(&format!(",conf={}", esc(&conf.to_string_lossy())));
    }
    if let Some(id) = rbd.id() {
        opts.push_str(&format!(",user={}", esc(id)));
    }
    opts
}

impl RbdSnapshot {
    /// Starts qemu-nbd on snapshot `snap` of `rbd` and connects to it.
    /// Blocking. A keyring the job names reaches librbd through
    /// `CEPH_KEYRING` (QEMU's rbd driver has no keyring option).
    pub fn open(rbd: &Rbd, snap: &str) -> Result<RbdSnapshot> {
        let spec = rbd.snap_spec(snap);
        let dir = tempfile::Builder::new()
            .prefix("backy-rbd-")
            .tempdir()
            .map_err(|e| Error::io("creating a directory for the qemu-nbd socket", e))?;
        let socket = dir.path().join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["--read-only", "--image-opts"])
            .arg(image_opts(rbd, snap))
            .arg(format!("--socket={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(k) = rbd.keyring() {
            cmd.env("CEPH_KEYRING", k);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::unavailable(format!("cannot start qemu-nbd for {spec} ({e}): {REMEDY}")))?;
        let started = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut said = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = err.read_to_string(&mut said);
                }
                let said = said.split_whitespace().collect::<Vec<_>>().join(" ");
                return Err(Error::unavailable(format!(
                    "qemu-nbd could not serve {spec} ({status}: {}): {REMEDY}",
                    said.chars().take(400).collect::<String>()
                )));
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::unavailable(format!(
                    "qemu-nbd did not serve {spec} within {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let connected = (|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::io("starting the NBD runtime", e))?;
            let client = rt.block_on(NbdClient::connect_unix(&socket, "", &[]))?;
            Ok::<_, Error>((rt, client))
        })();
        let (rt, client) = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let size = client.export().size;
        Ok(RbdSnapshot {
            rt,
            client: Some(client),
            size,
            child,
            _dir: dir,
        })
    }
}

impl Drop for RbdSnapshot {
    /// qemu-nbd exits by itself when its only client leaves, closing the
    /// image. Killed, it would leave its watch on the image header behind,
    /// and every later `rbd snap create`/`rm` would wait for the dead
    /// watcher's answer until Ceph times it out (seconds each).
    fn drop(&mut self) {
        drop(self.client.take());
        let started = Instant::now();
        while started.elapsed() < STOP_TIMEOUT {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!("qemu-nbd did not exit after its client left: killed");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Source for RbdSnapshot {
    fn kind(&self) -> &'static str {
        "ceph-rbd"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| Error::internal("the qemu-nbd connection is closed"))?;
        self.rt.block_on(client.read_into(offset, buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::source::SourceSpec;

    #[test]
    fn image_opts_name_the_snapshot_and_escape_commas() {
        let spec: SourceSpec = serde_yaml::from_str(
            "{type: ceph-rbd, pool: p, namespace: ns, image: 'a,b', id: backup, conf: '/etc/ceph/x,y.conf'}",
        )
        .unwrap();
        let r = Rbd::from_spec(&spec).unwrap();
        assert_eq!(
            image_opts(&r, "backy-1"),
            "driver=rbd,pool=p,image=a,,b,snapshot=backy-1,namespace=ns,conf=/etc/ceph/x,,y.conf,user=backup"
        );
        let spec = SourceSpec::from_cli("rbd:rbd/vm1", |_| false).unwrap();
        let r = Rbd::from_spec(&spec).unwrap();
        assert_eq!(image_opts(&r, "s"), "driver=rbd,pool=rbd,image=vm1,snapshot=s");
    }
}
