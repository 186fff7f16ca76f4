//! The one error type of the model, with a kind that decides the gRPC status
//! code (mapped once, at the server's edge), whether retrying can help, and
//! the one-line message an operator sees.

use std::fmt;

/// What went wrong, in terms an operator and a peer can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request itself is malformed (bad name, offset out of range, ...).
    InvalidArgument,
    /// No such job or revision.
    NotFound,
    /// Something with that identity exists already.
    AlreadyExists,
    /// The request is well-formed but the state does not allow it now
    /// (frames out of order, parent changed, spec ambiguous).
    FailedPrecondition,
    /// Another operation holds the job (a push is running).
    Busy,
    /// Out of disk space or over a limit.
    ResourceExhausted,
    /// Data did not arrive or is not stored intact (checksum mismatch).
    DataLoss,
    /// No or bad credentials.
    Unauthenticated,
    /// Valid credentials, not allowed for this job.
    PermissionDenied,
    /// The peer or a subprocess went away; retrying may help.
    Unavailable,
    /// A bug or an unexpected local failure.
    Internal,
}

impl ErrorKind {
    /// The name programs see (`--json` errors): snake_case, stable.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::Busy => "busy",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::DataLoss => "data_loss",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }

    /// Whether running the same operation again later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Busy | ErrorKind::Unavailable | ErrorKind::ResourceExhausted
        )
    }
}

/// What exactly went wrong, for programs: code branches on this and on
/// the kind, never on the message, which is for people and may change. It
/// crosses the wire in each error status's details (`ErrorDetail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reason {
    /// Nothing more specific than the kind.
    #[default]
    Unspecified,
    /// The stored image's manifest differs from the one the client computed
    /// (with a range list: the list missed a write).
    ManifestMismatch,
    /// The data received does not match the client's stream checksum.
    StreamChecksumMismatch,
    /// The client's push stream closed while it was still sending: the
    /// RPC's own outcome says why.
    StreamClosed,
    /// Client and server speak protocol versions that do not overlap.
    IncompatibleVersion,
}

impl Reason {
    /// The name programs see (`--json` errors); `None` when unspecified.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Reason::Unspecified => None,
            Reason::ManifestMismatch => Some("manifest_mismatch"),
            Reason::StreamChecksumMismatch => Some("stream_checksum_mismatch"),
            Reason::StreamClosed => Some("stream_closed"),
            Reason::IncompatibleVersion => Some("incompatible_version"),
        }
    }
}

/// An error of the model: a kind, a one-line human message, and for the
/// cases programs tell apart, a [`Reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub reason: Reason,
    /// The URL of the server that serves this request instead (the job's
    /// lease holder in front of a shared pool): a client may send the same
    /// request there once.
    pub redirect: Option<String>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

macro_rules! ctor {
    ($($name:ident => $kind:ident),* $(,)?) => {
        impl Error {
            $(
                #[doc = concat!("An error of kind [`ErrorKind::", stringify!($kind), "`].")]
                pub fn $name(message: impl Into<String>) -> Self {
                    Error { kind: ErrorKind::$kind, message: message.into(), reason: Reason::Unspecified, redirect: None }
                }
            )*
        }
    };
}

ctor! {
    invalid => InvalidArgument,
    not_found => NotFound,
    exists => AlreadyExists,
    precondition => FailedPrecondition,
    busy => Busy,
    exhausted => ResourceExhausted,
    data_loss => DataLoss,
    unauthenticated => Unauthenticated,
    denied => PermissionDenied,
    unavailable => Unavailable,
    internal => Internal,
}

impl Error {
    /// Wraps an I/O error with what was being done; ENOSPC/EDQUOT become
    /// [`ErrorKind::ResourceExhausted`] so that a full disk says so.
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(28) | Some(122) | Some(27) => ErrorKind::ResourceExhausted, // ENOSPC, EDQUOT, EFBIG
            _ => match err.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                _ => ErrorKind::Internal,
            },
        };
        let msg = if err.raw_os_error() == Some(27) {
            format!("{context}: larger than the filesystem allows for one file ({err})")
        } else if kind == ErrorKind::ResourceExhausted {
            format!("{context}: no space left on device ({err})")
        } else {
            format!("{context}: {err}")
        };
        Error {
            kind,
            message: msg,
            reason: Reason::Unspecified,
            redirect: None,
        }
    }

    /// The same error, naming the server to send the request to instead.
    pub fn with_redirect(mut self, url: impl Into<String>) -> Self {
        self.redirect = Some(url.into());
        self
    }

    /// The same error, marked with `reason` for programs.
    pub fn with_reason(mut self, reason: Reason) -> Self {
        self.reason = reason;
        self
    }

    /// Prefixes the message with more context, keeping the kind.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_resource_exhausted() {
        let e = Error::io("writing x", std::io::Error::from_raw_os_error(28));
        assert_eq!(e.kind, ErrorKind::ResourceExhausted);
        assert!(e.message.contains("no space left"), "{}", e.message);
        assert!(e.kind.is_retryable());
    }

    #[test]
    fn context_keeps_kind() {
        let e = Error::not_found("no revision abc").context("job vm1");
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.to_string(), "job vm1: no revision abc");
    }
}
