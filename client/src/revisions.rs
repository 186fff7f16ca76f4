//! Commands that act on stored revisions: tags, forget, distrust, verify.
//! The server does the work under the job's lock; these only ask and report.

use crate::connect::{status_error, Client};
use crate::view::{short_id, RevisionView};
use backy_common::units::format_bytes;
use backy_common::{Error, JobName, Result};
use backy_proto::{tags_request, RevisionsRequest, TagsRequest, VerifyRequest};
use serde::Serialize;
use std::fmt;

/// What `tags` does with the given tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TagAction {
    /// Replace all tags.
    Set,
    /// Add to the tags.
    Add,
    /// Remove from the tags.
    Remove,
}

/// Revisions a command changed, for printing.
#[derive(Debug, Serialize)]
pub struct Changed {
    pub job: String,
    pub action: &'static str,
    /// Nothing was changed: `revisions` are as they would be.
    pub dry_run: bool,
    pub revisions: Vec<RevisionView>,
}

impl fmt::Display for Changed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match (self.dry_run, self.action) {
            (false, a) => a,
            (true, "tagged") => "would tag",
            (true, "forgot") => "would forget",
            (true, "distrusted") => "would distrust",
            (true, _) => "would change",
        };
        if self.revisions.is_empty() {
            write!(f, "{}: no revisions selected", self.job)?;
        }
        for (i, r) in self.revisions.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}: {} {} (tags: {}, {})",
                self.job,
                action,
                r.id,
                backy_common::escape::escape(&r.tags.join(",")),
                r.trust
            )?;
        }
        if self.dry_run {
            write!(f, "\n(dry run: nothing changed)")?;
        }
        Ok(())
    }
}

fn changed(
    job: &JobName,
    action: &'static str,
    dry_run: bool,
    reply: backy_proto::RevisionsReply,
) -> Changed {
    Changed {
        job: job.to_string(),
        action,
        dry_run,
        revisions: reply.revisions.iter().map(RevisionView::from).collect(),
    }
}

/// How a change to revisions is asked for.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChangeOptions {
    pub dry_run: bool,
    pub allow_unscheduled: bool,
}

pub async fn tags(
    client: &mut Client,
    job: &JobName,
    spec: &str,
    action: TagAction,
    tags: &[String],
    options: ChangeOptions,
) -> Result<Changed> {
    let action = match action {
        TagAction::Set => tags_request::Action::Set,
        TagAction::Add => tags_request::Action::Add,
        TagAction::Remove => tags_request::Action::Remove,
    };
    let reply = client
        .tags(TagsRequest {
            job: job.to_string(),
            revisions: spec.to_string(),
            action: action as i32,
            tags: tags.to_vec(),
            dry_run: options.dry_run,
            allow_unscheduled: options.allow_unscheduled,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(changed(job, "tagged", options.dry_run, reply))
}

pub async fn forget(client: &mut Client, job: &JobName, spec: &str, dry_run: bool) -> Result<Changed> {
    let reply = client
        .forget(RevisionsRequest {
            job: job.to_string(),
            revisions: spec.to_string(),
            dry_run,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(changed(job, "forgot", dry_run, reply))
}

pub async fn distrust(client: &mut Client, job: &JobName, spec: &str, dry_run: bool) -> Result<Changed> {
    let reply = client
        .distrust(RevisionsRequest {
            job: job.to_string(),
            revisions: spec.to_string(),
            dry_run,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(changed(job, "distrusted", dry_run, reply))
}

/// One revision's verify outcome.
#[derive(Debug, Serialize)]
pub struct VerifyLine {
    pub revision: String,
    pub ok: bool,
    pub bytes_checked: u64,
    pub bad_blocks: Vec<u64>,
    pub trust: String,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Verified {
    pub job: String,
    pub revisions: Vec<VerifyLine>,
}

impl Verified {
    pub fn all_ok(&self) -> bool {
        self.revisions.iter().all(|r| r.ok)
    }
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.revisions.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match (&r.error, r.ok) {
                (Some(e), _) => write!(f, "{}: {}: NOT VERIFIED: {e}", self.job, r.revision)?,
                (None, true) => write!(
                    f,
                    "{}: {}: OK, {} checked, now {}",
                    self.job,
                    r.revision,
                    format_bytes(r.bytes_checked),
                    r.trust
                )?,
                (None, false) => write!(
                    f,
                    "{}: {}: DAMAGED: {} the manifest (offsets {:?}), now {}",
                    self.job,
                    r.revision,
                    backy_common::units::blocks_not_matching(r.bad_blocks.len() as u64),
                    r.bad_blocks,
                    r.trust
                )?,
            }
        }
        Ok(())
    }
}

/// Asks the server to re-read revisions and compare them with their
/// manifests; a verify that could not finish says so (never a silent pass).
pub async fn verify(client: &mut Client, job: &JobName, spec: &str) -> Result<Verified> {
    let mut stream = client
        .verify(VerifyRequest {
            job: job.to_string(),
            revisions: spec.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = Verified {
        job: job.to_string(),
        revisions: Vec::new(),
    };
    while let Some(report) = stream.message().await.map_err(status_error)? {
        let info = report.revision.unwrap_or_default();
        out.revisions.push(VerifyLine {
            revision: short_id(&info).to_string(),
            ok: report.ok,
            bytes_checked: report.bytes_checked,
            bad_blocks: report.bad_blocks,
            trust: crate::view::trust_name(info.trust).to_string(),
            error: (!report.error.is_empty()).then_some(report.error),
        });
    }
    if out.revisions.is_empty() {
        return Err(Error::unavailable(format!(
            "verify of {job} ended without a report"
        )));
    }
    Ok(out)
}
