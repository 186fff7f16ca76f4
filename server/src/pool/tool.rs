//! The `rbd` tool as the store's identity: `rbd import-diff` applies a
//! push's stream (it creates the end snapshot only after reading the end
//! record, so a push that dies leaves none), with the store's ceph.conf,
//! cephx id and keyring, and its op timeout so no call hangs.

use super::error::{PoolError, Result};
use backy_common::rbd_diff::{DiffHeader, DiffWriter};
use std::io::{BufWriter, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

/// The child's standard input by a path (see [`ImportDiff::start`]).
const STDIN_PATH: &str = "/proc/self/fd/0";

/// The pipe's capacity asked for: a 1 MiB frame (the most fs.pipe-max-size
/// allows by default).
const PIPE_SIZE: usize = 1 << 20;

/// How the store runs `rbd`.
#[derive(Debug, Clone)]
pub struct RbdTool {
    pub conf: PathBuf,
    pub id: String,
    pub keyring: Option<PathBuf>,
    pub op_timeout: Option<Duration>,
}

impl RbdTool {
    /// `rbd` with the store's cluster, identity and timeouts.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("rbd");
        cmd.arg("--conf").arg(&self.conf).arg("--id").arg(&self.id);
        if let Some(k) = &self.keyring {
            cmd.arg("--keyring").arg(k);
        }
        if let Some(t) = self.op_timeout {
            let secs = t.as_secs().max(1).to_string();
            for option in [
                "--rados-osd-op-timeout",
                "--rados-mon-op-timeout",
                "--client-mount-timeout",
            ] {
                cmd.arg(option).arg(&secs);
            }
        }
        cmd
    }
}

/// A running `rbd import-diff - SPEC` fed by a [`DiffWriter`]. Dropped
/// without [`ImportDiff::finish`], the stream ends without its end record:
/// `rbd` fails and makes no snapshot.
pub struct ImportDiff {
    child: Child,
    writer: Option<DiffWriter<BufWriter<ChildStdin>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    spec: String,
}

impl ImportDiff {
    pub fn start(tool: &RbdTool, spec: &str, header: &DiffHeader) -> Result<ImportDiff> {
        let command = format!("rbd import-diff - {spec}");
        // The pipe by a path, not as "-": reading standard input, `rbd
        // import-diff` keeps one write in flight and waits for each before
        // it reads the next record; reading a path, it keeps
        // `rbd_concurrent_management_ops` (10) in flight, as `rbd import`
        // does (the full push of 2.4 GiB took half the time). It seeks such
        // a file only for its progress (off) and to skip records of tags it
        // does not know (none are written).
        let mut child = tool
            .command()
            .args(["import-diff", "--no-progress", STDIN_PATH, spec])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| PoolError::Tool {
                command: command.clone(),
                detail: format!("cannot run rbd: {e} (install ceph-common)"),
            })?;
        // Read stderr all along: a full pipe would stall rbd.
        let stderr = child.stderr.take().map(|mut s| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                out
            })
        });
        let stdin = child.stdin.take();
        let mut import = ImportDiff {
            child,
            writer: None,
            stderr,
            spec: spec.to_string(),
        };
        let stdin = stdin.ok_or_else(|| import.failed("no pipe to rbd".into()))?;
        // A frame's bytes fit the pipe whole: fewer wake-ups of either side
        // than the default 64 KiB. Only an optimisation: a smaller limit
        // (fs.pipe-max-size) keeps the default.
        let _ = rustix::pipe::fcntl_setpipe_size(&stdin, PIPE_SIZE);
        match DiffWriter::start(BufWriter::with_capacity(256 << 10, stdin), header) {
            Ok(w) => import.writer = Some(w),
            Err(e) => return Err(import.failed(e.to_string())),
        }
        Ok(import)
    }

    fn writer(&mut self) -> Result<&mut DiffWriter<BufWriter<ChildStdin>>> {
        self.writer
            .as_mut()
            .ok_or_else(|| PoolError::Invalid("the import stream was closed".into()))
    }

    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        match self.writer()?.data(offset, data) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(e.to_string())),
        }
    }

    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self.writer()?.zero(offset, len) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(e.to_string())),
        }
    }

    /// Writes the end record and waits for `rbd`: its success means the
    /// stream is applied and the end snapshot made.
    pub fn finish(mut self) -> Result<()> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| PoolError::Invalid("finished twice".into()))?;
        let closed = writer.finish().map(drop);
        let (status, stderr) = self.wait();
        match (closed, status) {
            (Ok(()), Some(s)) if s.success() => Ok(()),
            (closed, status) => {
                let why = closed.err().map(|e| e.to_string());
                Err(self.error(status, stderr, why))
            }
        }
    }

    /// The stream failed on our side or rbd went away: close it without
    /// its end record, wait for rbd, and say what it said.
    fn failed(&mut self, ours: String) -> PoolError {
        self.writer = None;
        let (status, stderr) = self.wait();
        self.error(status, stderr, Some(ours))
    }

    fn wait(&mut self) -> (Option<std::process::ExitStatus>, Vec<u8>) {
        self.writer = None;
        let status = self.child.wait().ok();
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        (status, stderr)
    }

    fn error(
        &self,
        status: Option<std::process::ExitStatus>,
        stderr: Vec<u8>,
        ours: Option<String>,
    ) -> PoolError {
        let text = String::from_utf8_lossy(&stderr);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        let mut detail = match status {
            Some(s) => format!("rbd {s}"),
            None => "rbd could not be waited for".into(),
        };
        if !last.is_empty() {
            detail.push_str(&format!(": {last}"));
        }
        if let Some(o) = ours {
            detail.push_str(&format!(" ({o})"));
        }
        PoolError::Tool {
            command: format!("rbd import-diff - {}", self.spec),
            detail,
        }
    }
}

impl Drop for ImportDiff {
    fn drop(&mut self) {
        if self.writer.is_some() || self.stderr.is_some() {
            // Closing the pipe before its end record makes rbd fail at
            // once ("failed to decode tag"), with no snapshot made.
            let _ = self.wait();
        }
    }
}
