//! A QMP client on a QEMU's Unix socket: commands matched to their
//! replies by id, events kept until someone waits for them, a deadline on
//! every wait, and file descriptors passed with a command (SCM_RIGHTS) so
//! that QEMU opens nothing of ours by path (it may run as another user,
//! confined by AppArmor).
//!
//! Blocking on purpose: a push talks to QMP a dozen times, from the
//! blocking thread that also opens and cleans up the source.

use backy_common::qmp::{command_line, parse_message, Message};
use backy_common::{Error, ErrorKind};
use serde_json::Value;
use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// QEMU greets a client as it accepts it: a longer silence means another
/// client holds the socket.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest line read from QEMU (a `query-named-block-nodes` of a VM
/// with many disks is tens of KiB).
const MAX_LINE: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP {path}: {context}: {source}")]
    Io {
        path: String,
        context: String,
        source: std::io::Error,
    },
    #[error("QMP {path}: no {what} within {secs} s{hint}")]
    Timeout {
        path: String,
        what: String,
        secs: f64,
        hint: &'static str,
    },
    /// QEMU serves one monitor client at a time; a second is accepted by
    /// the kernel and never greeted.
    #[error("QMP socket {path} busy (another client is connected): no greeting within {secs} s")]
    Busy { path: String, secs: f64 },
    /// QEMU refused a command; `desc` is its reason.
    #[error("QEMU refused {command}: {desc}")]
    Refused {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP {0}: {1}")]
    Protocol(String, Error),
    #[error("QMP {path}: the connection is out of step after an earlier error")]
    Broken { path: String },
}

impl From<QmpError> for Error {
    fn from(e: QmpError) -> Self {
        let kind = match &e {
            QmpError::Refused { .. } => ErrorKind::FailedPrecondition,
            QmpError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            QmpError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                ErrorKind::PermissionDenied
            }
            _ => ErrorKind::Unavailable,
        };
        Error {
            kind,
            message: e.to_string(),
            reason: backy_common::Reason::Unspecified,
            redirect: None,
        }
    }
}

pub type Result<T, E = QmpError> = std::result::Result<T, E>;

/// One QMP connection in command mode.
pub struct Qmp {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
    /// Events read while waiting for something else, oldest first.
    events: Vec<(String, Value)>,
    timeout: Duration,
    version: (u64, u64, u64),
    broken: bool,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode. `timeout`
    /// bounds every later wait for a reply or an event.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let shown = path.display().to_string();
        let io = |context: &str| {
            let (path, context) = (shown.clone(), context.to_string());
            move |source| QmpError::Io {
                path,
                context,
                source,
            }
        };
        let writer = UnixStream::connect(path).map_err(io("connecting"))?;
        let reader = writer.try_clone().map_err(io("cloning the socket"))?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            writer,
            reader: BufReader::new(reader),
            next_id: 1,
            events: Vec::new(),
            timeout,
            version: (0, 0, 0),
            broken: false,
        };
        // QEMU serves one monitor client at a time: a second one is
        // accepted by the kernel but never greeted.
        let wait = GREETING_TIMEOUT.min(timeout);
        let deadline = Instant::now() + wait;
        loop {
            let greeting = qmp.read_message(deadline, "greeting", "").map_err(|e| match e {
                QmpError::Timeout { path, .. } => QmpError::Busy {
                    path,
                    secs: wait.as_secs_f64(),
                },
                e => e,
            })?;
            match greeting {
                Message::Greeting { version } => {
                    qmp.version = version;
                    break;
                }
                // A QEMU that is starting may send one (RESUME) first.
                Message::Event { name, data } => qmp.events.push((name, data)),
                other => {
                    return Err(QmpError::Protocol(
                        shown,
                        Error::unavailable(format!("expected the QMP greeting, got {other:?}")),
                    ))
                }
            }
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_inner(command, arguments, None)
    }

    /// Runs a command that takes a file descriptor (`add-fd`, `getfd`):
    /// the descriptor travels with the command's bytes.
    pub fn execute_with_fd(&mut self, command: &str, arguments: Value, fd: BorrowedFd<'_>) -> Result<Value> {
        self.execute_inner(command, Some(arguments), Some(fd))
    }

    /// Waits for event `name` whose data `matches`, including one that
    /// arrived before the command that caused it returned.
    pub fn wait_event(&mut self, name: &str, matches: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(i) = self.events.iter().position(|(n, d)| n == name && matches(d)) {
                return Ok(self.events.remove(i).1);
            }
            match self.read_message(deadline, &format!("{name} event"), "")? {
                Message::Event { name, data } => self.events.push((name, data)),
                other => tracing::debug!("QMP: unexpected {other:?} while waiting for {name}"),
            }
        }
    }

    /// Takes event `name` whose data `matches` if it has already arrived
    /// (events come in with the replies to other commands); never waits.
    pub fn take_event(&mut self, name: &str, matches: impl Fn(&Value) -> bool) -> Option<Value> {
        let i = self.events.iter().position(|(n, d)| n == name && matches(d))?;
        Some(self.events.remove(i).1)
    }

    fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value> {
        if self.broken {
            return Err(QmpError::Broken {
                path: self.path.display().to_string(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let line = command_line(id, command, arguments.as_ref());
        tracing::debug!(command, "QMP");
        let sent = match fd {
            Some(fd) => send_with_fd(&self.writer, line.as_bytes(), fd),
            None => self.writer.write_all(line.as_bytes()),
        };
        if let Err(source) = sent {
            self.broken = true;
            return Err(QmpError::Io {
                path: self.path.display().to_string(),
                context: format!("sending {command}"),
                source,
            });
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.read_message(deadline, &format!("reply to {command}"), "")? {
                Message::Event { name, data } => self.events.push((name, data)),
                Message::Return { id: Some(got), value } if got == id => return Ok(value),
                Message::Failure {
                    id: Some(got),
                    class,
                    desc,
                } if got == id => {
                    return Err(QmpError::Refused {
                        command: command.to_string(),
                        class,
                        desc,
                    })
                }
                other => tracing::debug!("QMP: ignoring {other:?} while waiting for reply {id}"),
            }
        }
    }

    fn read_message(&mut self, deadline: Instant, what: &str, hint: &'static str) -> Result<Message> {
        let path = self.path.display().to_string();
        let timeout = || QmpError::Timeout {
            path: path.clone(),
            what: what.to_string(),
            secs: self.timeout.as_secs_f64(),
            hint,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.broken = true;
            return Err(timeout());
        }
        let set = self.reader.get_ref().set_read_timeout(Some(left));
        let mut line = Vec::new();
        let read = set.and_then(|()| (&mut self.reader).take(MAX_LINE).read_until(b'\n', &mut line));
        match read {
            Ok(0) => {
                self.broken = true;
                Err(QmpError::Io {
                    path,
                    context: format!("waiting for the {what}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "QEMU closed the connection",
                    ),
                })
            }
            Ok(_) if !line.ends_with(b"\n") => {
                self.broken = true;
                Err(QmpError::Protocol(
                    path,
                    Error::unavailable(format!("a message longer than {MAX_LINE} bytes")),
                ))
            }
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                parse_message(text.trim_end()).map_err(|e| {
                    self.broken = true;
                    QmpError::Protocol(path, e)
                })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.broken = true;
                Err(timeout())
            }
            Err(source) => {
                self.broken = true;
                Err(QmpError::Io {
                    path,
                    context: format!("waiting for the {what}"),
                    source,
                })
            }
        }
    }
}

/// Writes `bytes` with `fd` attached to the first byte.
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("no room for the file descriptor"));
    }
    let sent = sendmsg(stream, &[IoSlice::new(bytes)], &mut control, SendFlags::empty())?;
    // The descriptor went with the first chunk; the rest is plain bytes.
    let mut rest = bytes.get(sent..).unwrap_or_default();
    let mut stream = stream;
    while !rest.is_empty() {
        let n = stream.write(rest)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        rest = &rest[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake monitor for the transport only (real QEMU: tests/tests/qemu.rs).
    fn monitor(script: impl FnOnce(UnixStream) + Send + 'static) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            script(stream)
        });
        (dir, path)
    }

    fn lines(stream: &UnixStream) -> impl Iterator<Item = Value> + '_ {
        BufReader::new(stream)
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
    }

    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}}, \"capabilities\": []}}\n";

    #[test]
    fn replies_by_id_and_events_kept_for_later() {
        let (_dir, path) = monitor(|s| {
            let mut w = s.try_clone().unwrap();
            w.write_all(GREETING).unwrap();
            for cmd in lines(&s) {
                let id = &cmd["id"];
                let reply = match cmd["execute"].as_str().unwrap() {
                    "qmp_capabilities" => format!("{{\"return\": {{}}, \"id\": {id}}}\n"),
                    // The event comes before the reply; a stale reply first.
                    "block-export-del" => format!(
                        "{{\"return\": {{}}, \"id\": 999}}\n{{\"event\": \"BLOCK_EXPORT_DELETED\", \"data\": {{\"id\": \"x\"}}}}\n{{\"return\": {{}}, \"id\": {id}}}\n"
                    ),
                    "boom" => format!("{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no\"}}, \"id\": {id}}}\n"),
                    // Never answered.
                    _ => continue,
                };
                w.write_all(reply.as_bytes()).unwrap();
            }
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.version(), (10, 0, 2));
        qmp.execute("block-export-del", Some(serde_json::json!({"id": "x"})))
            .unwrap();
        let data = qmp
            .wait_event("BLOCK_EXPORT_DELETED", |d| d["id"] == "x")
            .unwrap();
        assert_eq!(data["id"], "x");
        match qmp.execute("boom", None).unwrap_err() {
            QmpError::Refused { command, desc, .. } => {
                assert_eq!((command.as_str(), desc.as_str()), ("boom", "no"))
            }
            e => panic!("{e}"),
        }
        // The monitor stops answering: a bounded wait, then the connection
        // is not used again.
        qmp.timeout = Duration::from_millis(200);
        let e = qmp.execute("hang", None).unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(matches!(
            qmp.execute("x", None).unwrap_err(),
            QmpError::Broken { .. }
        ));
    }

    #[test]
    fn a_busy_monitor_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        // Listening, never greeting: what a second client of QEMU sees.
        let _listener = UnixListener::bind(&path).unwrap();
        let e = Qmp::connect(&path, Duration::from_millis(200)).err().unwrap();
        assert!(
            e.to_string()
                .contains("busy (another client is connected): no greeting within 0.2 s"),
            "{e}"
        );
        let e: Error = Qmp::connect(&dir.path().join("none"), Duration::from_secs(1))
            .err()
            .unwrap()
            .into();
        assert_eq!(e.kind, ErrorKind::NotFound);
    }

    #[test]
    fn descriptors_travel_with_the_command() {
        let (_dir, path) = monitor(|s| {
            let mut w = s.try_clone().unwrap();
            w.write_all(GREETING).unwrap();
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            loop {
                use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
                let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let n = recvmsg(
                    &s,
                    &mut [std::io::IoSliceMut::new(&mut buf)],
                    &mut control,
                    RecvFlags::empty(),
                )
                .unwrap()
                .bytes;
                if n == 0 {
                    return;
                }
                let fds: usize = control
                    .drain()
                    .map(|m| match m {
                        RecvAncillaryMessage::ScmRights(fds) => fds.count(),
                        _ => 0,
                    })
                    .sum();
                seen.extend_from_slice(&buf[..n]);
                while let Some(end) = seen.iter().position(|b| *b == b'\n') {
                    let cmd: Value = serde_json::from_slice(&seen[..end]).unwrap();
                    seen.drain(..=end);
                    let reply = format!("{{\"return\": {{\"fds\": {fds}}}, \"id\": {}}}\n", cmd["id"]);
                    w.write_all(reply.as_bytes()).unwrap();
                }
            }
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let file = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd;
        let r = qmp
            .execute_with_fd("add-fd", serde_json::json!({}), file.as_fd())
            .unwrap();
        assert_eq!(r["fds"], 1);
        assert_eq!(qmp.execute("query-fdsets", None).unwrap()["fds"], 0);
    }
}
