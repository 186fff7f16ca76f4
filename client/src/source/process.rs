//! External commands (hooks, `rbd`): run in their own process group so a
//! timeout can stop a shell and everything it started, with their exit
//! status always checked and the end of their stderr kept for the message.

use backy_common::{Error, Result};
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How much of a command's stderr is kept for error messages.
const STDERR_TAIL: usize = 2048;

/// How often a bounded wait looks at the child.
const POLL: Duration = Duration::from_millis(20);

/// A running command whose stderr is collected in the background.
pub struct Running {
    pub child: Child,
    stderr: Option<JoinHandle<Vec<u8>>>,
    what: String,
}

/// Starts `cmd` in a new process group with stderr captured; stdin and
/// stdout are as the caller configured them.
pub fn spawn(mut cmd: Command, what: impl Into<String>) -> Result<Running> {
    let what = what.into();
    cmd.stderr(Stdio::piped()).process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("starting {what}"), e))?;
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut tail = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            tail
        })
    });
    Ok(Running { child, stderr, what })
}

impl Running {
    /// Waits up to `timeout`, then kills the whole process group. Returns
    /// an error unless the command exited 0; the message names the command,
    /// its exit status and the end of its stderr.
    pub fn finish(mut self, timeout: Duration) -> Result<()> {
        let status = self.wait(timeout)?;
        let stderr = self.stderr_tail();
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(Error::unavailable(format!(
                "{} failed ({}){}",
                self.what,
                describe(s),
                stderr
            ))),
            None => Err(Error::unavailable(format!(
                "{} did not finish within {} s and was killed{}",
                self.what,
                timeout.as_secs(),
                stderr
            ))),
        }
    }

    /// The exit status, or `None` after killing the group at the timeout.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(Some(status)),
                Ok(None) if Instant::now() >= deadline => {
                    self.kill();
                    return Ok(None);
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => return Err(Error::io(format!("waiting for {}", self.what), e)),
            }
        }
    }

    /// Kills the process group and reaps the child.
    pub fn kill(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `": <last line(s) of stderr>"`, or empty; waits for the stderr pipe to
    /// close, so call it once the process is gone.
    pub fn stderr_tail(&mut self) -> String {
        let raw = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let text = String::from_utf8_lossy(&raw);
        // Progress lines end in '\r'; keep the last few real lines.
        let lines: Vec<&str> = text
            .split(['\n', '\r'])
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let start = lines.len().saturating_sub(3);
        match lines[start..].join("; ") {
            s if s.is_empty() => String::new(),
            s => format!(": {}", s.chars().take(STDERR_TAIL).collect::<String>()),
        }
    }

    pub fn what(&self) -> &str {
        &self.what
    }
}

/// "exit 2" or "killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// Runs `cmd` to completion and returns its stdout.
pub fn output(mut cmd: Command, what: impl Into<String>, timeout: Duration) -> Result<Vec<u8>> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut running = spawn(cmd, what)?;
    let mut stdout = running.child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out);
        }
        out
    });
    running.finish(timeout)?;
    reader
        .join()
        .map_err(|_| Error::internal("stdout reader panicked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn status_stderr_and_timeout() {
        let out = output(sh("echo hi"), "echo", Duration::from_secs(10)).unwrap();
        assert_eq!(out, b"hi\n");
        let e = output(sh("echo oops >&2; exit 3"), "the hook", Duration::from_secs(10)).unwrap_err();
        assert_eq!(e.message, "the hook failed (exit 3): oops");
        // The shell's child holds stderr open: the group kill must get it too.
        let started = Instant::now();
        let e = output(sh("sleep 30; echo"), "slow", Duration::from_millis(200)).unwrap_err();
        assert!(
            e.message.starts_with("slow did not finish within 0 s"),
            "{}",
            e.message
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
