//! The connection to `backy-server`, and turning gRPC statuses into the
//! model's one-line errors.

use backy_common::{Error, ErrorKind, Result, MAX_MESSAGE_BYTES};
use backy_proto::backy_client::BackyClient;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// The generated client over a plain channel.
pub type Client = BackyClient<Channel>;

/// Connects eagerly, so an unreachable server is reported as such before
/// any work starts.
pub async fn connect(url: &str) -> Result<Client> {
    if !url.contains("://") {
        return Err(Error::invalid(format!(
            "bad server URL {url:?}: give a URL like http://backup01:6023"
        )));
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::invalid(format!("bad server URL {url:?}: {}", chain(&e))))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        // Windows of several 1 MiB frames, so a stream never waits for the
        // peer's window update between two frames; larger HTTP/2 frames
        // cut the per-frame work.
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(32 << 20)
        .max_frame_size(1 << 20);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Error::unavailable(format!("cannot connect to {url}: {}", chain(&e))))?;
    Ok(BackyClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A server's answer as a one-line error: its message plus the code name,
/// e.g. `unknown job vm9 (NOT_FOUND)`.
pub fn status_error(status: Status) -> Error {
    let message = status.message().trim();
    let message = if message.is_empty() {
        status.code().description()
    } else {
        message
    };
    Error {
        kind: kind_of(status.code()),
        message: format!("{} ({})", one_line(message), code_name(status.code())),
    }
}

fn kind_of(code: Code) -> ErrorKind {
    match code {
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::Aborted => ErrorKind::Busy,
        Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        Code::DataLoss => ErrorKind::DataLoss,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        Code::PermissionDenied => ErrorKind::PermissionDenied,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// The canonical gRPC name of a code, as operators see it in other tools.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its sources joined on one line: tonic's transport errors
/// say only "transport error" at the top.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    one_line(&out)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_becomes_one_line_error() {
        let e = status_error(Status::not_found("unknown job vm9"));
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "unknown job vm9 (NOT_FOUND)");
        let e = status_error(Status::data_loss("checksum\nmismatch"));
        assert_eq!(e.message, "checksum mismatch (DATA_LOSS)");
        assert_eq!(e.kind, ErrorKind::DataLoss);
        let e = status_error(Status::new(Code::Unavailable, ""));
        assert!(e.message.ends_with("(UNAVAILABLE)"), "{}", e.message);
        assert!(e.kind.is_retryable());
    }

    #[tokio::test]
    async fn bad_url_and_refused_connection() {
        let e = connect("not a url").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{}", e.message);
        // Port 1 on localhost: nobody listens there.
        let e = connect("http://127.0.0.1:1").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(
            e.message.starts_with("cannot connect to http://127.0.0.1:1: "),
            "{}",
            e.message
        );
        assert!(!e.message.contains('\n'));
    }
}
