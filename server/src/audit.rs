//! The audit trail: one `info` line (target `backy::audit`) for every
//! request that changes state or reads data, with who asked (identity and
//! peer address), what (action, job, revision) and how it ended. Tokens and
//! other secrets never appear: the caller is named by identity only.
//!
//! Every value is quoted and escaped (`identity="hv01" ... outcome="failed:
//! ..."`): text a peer wrote cannot end its value, start a line or add a
//! `key=value` pair of its own.
//!
//! Refusals before a request reaches a job (failed authentication, stream
//! permits refused) are `warn` audit lines limited per peer address: the first few
//! per interval are logged, the rest counted, then one summary line says
//! how many were left out (backy_common::throttle).

use crate::auth::Caller;
use crate::state::Server;
use crate::text::quoted;
use std::fmt::Display;
use std::time::Instant;

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
            Outcome::Failed(e) => format!("failed: {e}"),
        }
    }
}

/// Records one request.
pub fn record(caller: &Caller, action: &str, job: &str, revision: &str, outcome: Outcome<'_>) {
    line(
        false,
        &caller.name,
        &caller.peer,
        action,
        job,
        revision,
        &outcome.text(),
    );
}

/// One audit line, every value quoted.
fn line(warn: bool, identity: &str, peer: &str, action: &str, job: &str, revision: &str, outcome: &str) {
    let (identity, peer, action) = (quoted(identity), quoted(peer), quoted(action));
    let (job, rev, outcome) = (quoted(job), quoted(revision), quoted(outcome));
    if warn {
        tracing::warn!(
            target: "backy::audit",
            identity = %identity, peer = %peer, action = %action,
            job = %job, rev = %rev, outcome = %outcome,
            "audit"
        );
    } else {
        tracing::info!(
            target: "backy::audit",
            identity = %identity, peer = %peer, action = %action,
            job = %job, rev = %rev, outcome = %outcome,
            "audit"
        );
    }
}

/// What a refusal was, for the counts of suppressed lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No or bad credentials (gRPC or HTTP).
    Authentication,
    /// An identity's open streams are at its limit.
    Permit,
}

impl Refusal {
    fn kind(self) -> &'static str {
        match self {
            Refusal::Authentication => "authentication",
            Refusal::Permit => "stream permit",
        }
    }
}

/// Who was refused: an identity, or `""` before authentication.
pub struct Refused<'a> {
    pub identity: &'a str,
    /// The peer's address (`IP:PORT`, or "unknown").
    pub peer: &'a str,
    pub action: &'a str,
    pub job: &'a str,
}

/// Records a refusal, unless its peer had its share of lines in this
/// interval (then it is counted for the summary).
pub fn refused(server: &Server, who: Refused<'_>, kind: Refusal, why: &dyn Display) {
    let key = peer_key(who.peer);
    let admit = {
        let mut throttle = server.refusals.lock().unwrap_or_else(|p| p.into_inner());
        throttle.admit(key, kind.kind(), Instant::now())
    };
    if let Some(summary) = admit.summary {
        suppressed(&summary);
    }
    if admit.log {
        let outcome = format!("refused: {why}");
        line(true, who.identity, who.peer, who.action, who.job, "", &outcome);
    }
}

/// Logs the summaries of intervals that ended; the server calls it on a
/// timer, so a flood that stopped is still counted.
pub fn flush_refusals(server: &Server) {
    let summaries = {
        let mut throttle = server.refusals.lock().unwrap_or_else(|p| p.into_inner());
        throttle.flush(Instant::now())
    };
    for s in &summaries {
        suppressed(s);
    }
}

fn suppressed(summary: &backy_common::throttle::Summary<String>) {
    let peer = summary.peer.as_deref().unwrap_or("other peers");
    line(true, "", peer, "refusals", "", "", &summary.text());
}

/// The throttle's key: the peer's IP address (every port of one host is
/// one peer).
fn peer_key(peer: &str) -> String {
    peer.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| peer.to_string())
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
