//! systemd's readiness protocol (`sd_notify`), so a `Type=notify` unit is
//! "active" exactly when the server accepts connections: `READY=1` once it
//! listens, `RELOADING=1` … `READY=1` around a SIGHUP reload, `STOPPING=1`
//! when it stops. Datagrams go to `$NOTIFY_SOCKET` (a path, or `@name` for
//! an abstract socket); without that variable nothing is sent. A message
//! that cannot be sent is logged, never fatal: serving matters more.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an @abstract name")]
    BadAddress(String),
    #[error("NOTIFY_SOCKET {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A socket to send state changes to the service manager.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `Ok(None)` when it is unset or empty (not
    /// started by systemd, or by a unit that is not `Type=notify`).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::new(&v.to_string_lossy()).map(Some),
        }
    }

    /// For the socket at `addr`: an absolute path, or `@name` (Linux
    /// abstract namespace).
    pub fn new(addr: &str) -> Result<Notifier, NotifyError> {
        let io = |source| NotifyError::Io {
            addr: addr.to_string(),
            source,
        };
        let target = if let Some(name) = addr.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?
        } else if addr.starts_with('/') {
            SocketAddr::from_pathname(addr).map_err(io)?
        } else {
            return Err(NotifyError::BadAddress(addr.to_string()));
        };
        let socket = UnixDatagram::unbound().map_err(io)?;
        // systemd reads its socket promptly; should it not, a state change
        // is dropped rather than stalling the thread that reports it.
        socket
            .set_write_timeout(Some(Duration::from_secs(1)))
            .map_err(io)?;
        Ok(Notifier {
            socket,
            addr: target,
            name: addr.to_string(),
        })
    }

    /// Sends one message: newline-separated `KEY=VALUE` assignments.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Io {
                addr: self.name.clone(),
                source,
            })
    }
}

/// The process's notifier, from the environment at first use.
fn notifier() -> Option<&'static Notifier> {
    static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
    NOTIFIER
        .get_or_init(|| {
            Notifier::from_env().unwrap_or_else(|e| {
                tracing::warn!("systemd notification disabled: {e}");
                None
            })
        })
        .as_ref()
}

/// Sends `state` when running under a `Type=notify` unit; logs a failure.
pub fn notify(state: &str) {
    if let Some(n) = notifier() {
        if let Err(e) = n.send(state) {
            tracing::warn!("systemd notification {:?} not sent: {e}", first_line(state));
        }
    }
}

/// `STATUS=` text: one line (systemd shows it in `systemctl status`).
pub fn status_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The server listens and serves.
pub fn ready(status: &str) {
    notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS={}",
        std::process::id(),
        status_line(status)
    ));
}

/// A reload starts; end it with [`ready`]. The timestamp lets systemd
/// match it with the reload it asked for (newer versions require it).
pub fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the configuration"
    ));
}

/// The server stops.
pub fn stopping(status: &str) {
    notify(&format!("STOPPING=1\nSTATUS={}", status_line(status)));
}

fn first_line(state: &str) -> &str {
    state.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.send("READY=1\nSTATUS=x").unwrap();
        assert_eq!(received(&socket), "READY=1\nSTATUS=x");
    }

    #[test]
    fn sends_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("backy-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .send("STOPPING=1")
            .unwrap();
        assert_eq!(received(&socket), "STOPPING=1");
    }

    #[test]
    fn refuses_a_relative_address_and_reports_a_missing_socket() {
        assert!(matches!(
            Notifier::new("run/notify"),
            Err(NotifyError::BadAddress(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let e = Notifier::new(missing.to_str().unwrap())
            .unwrap()
            .send("READY=1")
            .unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
    }

    #[test]
    fn status_is_one_line() {
        assert_eq!(status_line("a\n  b\tc "), "a b c");
    }
}
