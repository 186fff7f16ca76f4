//! The one place where model errors become gRPC statuses.

use backy_common::{Error, ErrorKind};
use std::sync::OnceLock;
use tonic::{Code, Status};

/// The store's directory, kept out of what peers read: the server's
/// layout is not theirs to know; its log keeps the full paths.
static STORE: OnceLock<String> = OnceLock::new();

/// Called once at start with the config's `base-dir`.
pub fn hide_store_path(base_dir: &std::path::Path) {
    let _ = STORE.set(format!(
        "{}/",
        base_dir.display().to_string().trim_end_matches('/')
    ));
}

pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Busy => Code::Aborted,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The status a peer gets; its message is one line of at most 1 KiB,
/// whatever the error quoted (a peer's input is echoed only in part).
pub fn to_status(e: Error) -> Status {
    let message = match STORE.get() {
        Some(store) => e.message.replace(store.as_str(), ""),
        None => e.message,
    };
    let message = if backy_common::fault::mode("reword-errors") {
        // Tests: clients must not depend on the wording.
        format!("reworded for a test ({:?})", e.kind)
    } else {
        message
    };
    Status::with_details(
        code_of(e.kind),
        crate::text::clip(&message),
        backy_proto::error_detail_to(e.kind, e.reason, e.redirect.as_deref()).into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_aborted_and_message_kept() {
        let s = to_status(Error::busy("job vm1 is busy"));
        assert_eq!(s.code(), Code::Aborted);
        assert_eq!(s.message(), "job vm1 is busy");
    }
}
