//! The audit trail: one `info` line (target `backy::audit`) for every
//! request that changes state or reads data, with who asked (identity and
//! peer address), what (action, job, revision) and how it ended. Tokens and
//! other secrets never appear: the caller is named by identity only.

use crate::auth::Caller;
use std::fmt::Display;

/// How a request ended.
pub enum Outcome<'a> {
    Ok,
    /// Done, with a short account (e.g. "3 revisions", "cancelled").
    Done(&'a str),
    Failed(&'a dyn Display),
}

impl Outcome<'_> {
    fn text(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Done(s) => s.to_string(),
            Outcome::Failed(e) => format!("failed: {}", crate::text::clip(&e.to_string())),
        }
    }
}

/// Records one request.
pub fn record(caller: &Caller, action: &str, job: &str, revision: &str, outcome: Outcome<'_>) {
    let outcome = outcome.text();
    let job = crate::text::clip(job);
    let revision = crate::text::clip(revision);
    tracing::info!(
        target: "backy::audit",
        identity = %caller.name,
        peer = %caller.peer,
        action = %action,
        job = %job,
        rev = %revision,
        outcome = %outcome,
        "audit"
    );
}

/// Records the outcome of a request answered with `result`.
pub fn result<T, E: Display>(
    caller: &Caller,
    action: &str,
    job: &str,
    revision: &str,
    result: &std::result::Result<T, E>,
) {
    match result {
        Ok(_) => record(caller, action, job, revision, Outcome::Ok),
        Err(e) => record(caller, action, job, revision, Outcome::Failed(e)),
    }
}
