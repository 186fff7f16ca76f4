//! The one place where model errors become gRPC statuses.

use backy_common::{Error, ErrorKind};
use tonic::{Code, Status};

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
    Status::new(code_of(e.kind), crate::service::clip(&e.message))
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
