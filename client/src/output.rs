//! What `--json` prints: every document is an object whose first key is
//! `"schema": 1` (docs/json.md), whether it reports a result on stdout or a
//! failure on stderr. A change that breaks a reader raises the number.

use backy_common::{Error, ErrorKind};
use serde::Serialize;

/// The version of every JSON document the client prints.
pub const SCHEMA: u32 = 1;

#[derive(Serialize)]
struct Document<'a, T: Serialize> {
    schema: u32,
    #[serde(flatten)]
    body: &'a T,
}

/// `value` (a struct) as a pretty JSON document with its schema number,
/// ending in a newline.
pub fn document<T: Serialize>(value: &T) -> serde_json::Result<String> {
    let mut text = serde_json::to_string_pretty(&Document {
        schema: SCHEMA,
        body: value,
    })?;
    text.push('\n');
    Ok(text)
}

/// `value` as a JSON document on one line (for a line a script waits
/// for, such as an export's ready line), ending in a newline.
pub fn line<T: Serialize>(value: &T) -> serde_json::Result<String> {
    let mut text = serde_json::to_string(&Document {
        schema: SCHEMA,
        body: value,
    })?;
    text.push('\n');
    Ok(text)
}

/// A failure as `--json` reports it on stderr.
#[derive(Debug, Serialize, PartialEq)]
pub struct Failure {
    /// `usage` for bad arguments, else the error's kind
    /// (`invalid_argument`, `not_found`, `unavailable`, …).
    pub kind: &'static str,
    /// What exactly went wrong, for the cases programs tell apart
    /// (`manifest_mismatch`, `incompatible_version`, …); `null` otherwise.
    pub reason: Option<&'static str>,
    /// Whether the same command may succeed when run again later.
    pub retryable: bool,
    /// The one-line message a person reads.
    pub message: String,
}

impl Failure {
    /// A failure from backy's error when the chain holds one, else an
    /// internal one with `message`.
    pub fn new(error: Option<&Error>, message: String) -> Failure {
        let kind = error.map_or(ErrorKind::Internal, |e| e.kind);
        Failure {
            kind: kind.name(),
            reason: error.and_then(|e| e.reason.name()),
            retryable: kind.is_retryable(),
            message,
        }
    }

    /// Bad arguments (the command line itself).
    pub fn usage(message: String) -> Failure {
        Failure {
            kind: "usage",
            reason: None,
            retryable: false,
            message,
        }
    }

    /// The document: `{"schema": 1, "error": {...}}`, one line.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Wrapped<'a> {
            schema: u32,
            error: &'a Failure,
        }
        serde_json::to_string(&Wrapped {
            schema: SCHEMA,
            error: self,
        })
        .unwrap_or_else(|_| format!("{{\"schema\":{SCHEMA},\"error\":{{\"kind\":\"internal\"}}}}"))
    }
}

/// Collapses a message to one line (errors are one line each).
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Thing {
        job: &'static str,
    }

    #[test]
    fn documents_start_with_their_schema() {
        let text = document(&Thing { job: "vm1" }).unwrap();
        assert!(
            text.starts_with("{\n  \"schema\": 1,\n  \"job\": \"vm1\""),
            "{text}"
        );
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn failures_carry_kind_reason_and_retry() {
        let e = Error::unavailable("cannot connect").with_reason(backy_common::Reason::StreamClosed);
        let f = Failure::new(Some(&e), "cannot connect to http://x:1".into());
        let v: serde_json::Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"schema": 1, "error": {"kind": "unavailable", "reason": "stream_closed",
                "retryable": true, "message": "cannot connect to http://x:1"}})
        );
        let f = Failure::new(None, "x".into());
        assert_eq!((f.kind, f.retryable, f.reason), ("internal", false, None));
        assert_eq!(Failure::usage("bad".into()).kind, "usage");
        assert_eq!(one_line("a\n  b c\n"), "a b c");
    }
}
