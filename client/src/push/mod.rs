//! `push`: ask the server for a plan, read the source the way its kind
//! needs, and stream what changed since the parent revision.
//!
//! This file plans and picks the kind; `file` reads files, block devices
//! and qemu disks through `Source`, `rbd` reads Ceph RBD images as
//! `rbd export-diff` streams. Both import `shared` and not each other;
//! `shared` imports neither.

mod file;
mod group;
mod not_due;
pub mod rbd;
mod shared;

pub use group::{push_group, GroupArgs, GroupPushed};
pub use not_due::not_due_line;
pub use shared::{rebase, PushArgs, Pushed};

use crate::connect::{status_error, Client};
use crate::progress::Progress;
use crate::source;
use backy_common::config::ClientConfig;
use backy_common::manifest::check_block_size;
use backy_common::revision::check_tag;
use backy_common::source::SourceSpec;
use backy_common::{fault, Error, JobName, Result, RevisionId};
use backy_proto::{PlanReply, PlanRequest};
use std::time::Instant;

/// Runs a push; `None` when the job is not due (and nothing was done).
pub async fn push(client: &mut Client, args: &PushArgs, progress: &dyn Progress) -> Result<Option<Pushed>> {
    let started = Instant::now();
    let job = args.job.as_str();
    for tag in &args.tags {
        check_tag(tag)?;
    }
    let plan = client
        .plan(PlanRequest {
            job: job.to_string(),
            force: args.force,
            tags: args.tags.clone(),
            allow_unscheduled: args.allow_unscheduled,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if !plan.due {
        // The caller tells a person (not_due_line); cron wants silence.
        tracing::debug!(job, reason = %plan.reason, "not due");
        return Ok(None);
    }
    let parent = crate::view::revision_id(&plan.parent_id);
    let plan_id = plan.new_id.clone();
    tracing::info!(job, reason = %plan.reason, tags = ?plan.tags, %parent, "due");
    check_plan(&plan)?;
    fault::point("client.planned");
    let plan = match check_keys(client, args, plan).await {
        Ok(plan) => plan,
        Err(e) => {
            report_failure(client, job, &plan_id, &e).await;
            return Err(e);
        }
    };
    match push_planned(client, args, &plan, progress, started).await {
        Ok(pushed) => Ok(Some(pushed)),
        Err(e) => {
            report_failure(client, job, &plan.new_id, &e).await;
            Err(e)
        }
    }
}

/// Tells the server that a planned push failed, so its status, check and
/// backoff count every failed attempt, also those that never reached it
/// (missing source, hook or rbd failure). Best effort: the push's own
/// error is what the caller reports.
async fn report_failure(client: &mut Client, job: &str, rev_id: &str, error: &Error) {
    let report = backy_proto::FailureReport {
        job: job.to_string(),
        rev_id: rev_id.to_string(),
        error: error.message.clone(),
    };
    if let Err(status) = client.report_failure(report).await {
        tracing::warn!(
            job,
            "could not report the failure to the server: {}",
            status.message()
        );
    }
}

/// The push after a due plan: the source's kind decides how it is read.
async fn push_planned(
    client: &mut Client,
    args: &PushArgs,
    plan: &PlanReply,
    progress: &dyn Progress,
    started: Instant,
) -> Result<Pushed> {
    let job = args.job.as_str();

    let spec = source_spec(
        job,
        args.source.as_deref(),
        args.configured.as_ref(),
        &args.config_name,
    )?;
    match spec {
        SourceSpec::CephRbd { .. } => rbd::push(client, args, plan, &spec, progress, started).await,
        _ => file::push(client, args, plan, &spec, progress, started).await,
    }
}

/// Refuses, before anything is read or sent, a push whose key does not
/// continue the parent's (docs/encryption.md): incremental on a parent of
/// another key would mix two keys in one image. With `--new-key` the push
/// is a full one (no parent, no resume), which starts the new chain.
async fn check_keys(client: &mut Client, args: &PushArgs, mut plan: PlanReply) -> Result<PlanReply> {
    let job = args.job.as_str();
    let ours = args.key.as_ref().map(|k| *k.check());
    if ours.is_some() {
        let protocol = crate::connect::server_protocol(client).await?;
        if protocol < backy_proto::ENCRYPTION_PROTOCOL {
            return Err(Error::precondition(format!(
                "job {job} is encrypted, and the server speaks protocol {protocol}: it would not record \
                 the key check; upgrade backy-server (protocol {} or newer)",
                backy_proto::ENCRYPTION_PROTOCOL
            )));
        }
    }
    let parent = backy_common::encryption::parse_key_check(&plan.parent_key_check)
        .map_err(|e| Error::internal(format!("server sent a bad plan: {}", e.message)))?;
    if plan.parent_id.is_empty() {
        return Ok(plan);
    }
    if args.new_key {
        tracing::info!(job, "--new-key: a full push, not relative to the parent revision");
        plan.parent_id.clear();
        plan.parent_snapshot.clear();
        plan.parent_key_check.clear();
        plan.resume = false;
        return Ok(plan);
    }
    if let Some(why) = backy_common::encryption::key_change(parent.as_ref(), ours.as_ref()) {
        return Err(Error::precondition(format!(
            "job {job}: {why}: push --new-key to start a full backup with {} (docs/encryption.md)",
            if ours.is_some() { "this key" } else { "no key" }
        )));
    }
    Ok(plan)
}

fn check_plan(plan: &PlanReply) -> Result<()> {
    let bad = |why: String| Error::internal(format!("server sent a bad plan: {why}"));
    plan.new_id
        .parse::<RevisionId>()
        .map_err(|e| bad(format!("new id: {e}")))?;
    if !plan.parent_id.is_empty() {
        plan.parent_id
            .parse::<RevisionId>()
            .map_err(|e| bad(format!("parent id: {e}")))?;
    }
    check_block_size(plan.block_size).map_err(|e| bad(e.message))
}

/// The source to read: the command line's, else the one this hypervisor's
/// client config lists for the job. Nothing else: the server never says
/// what a hypervisor reads or runs.
pub fn source_spec(
    job: &str,
    cli: Option<&str>,
    configured: Option<&SourceSpec>,
    config_name: &str,
) -> Result<SourceSpec> {
    match (cli, configured) {
        (Some(s), _) => SourceSpec::from_cli(s, source::is_block_device),
        (None, Some(spec)) => Ok(spec.clone()),
        (None, None) => Err(Error::invalid(format!(
            "job {job} is not listed in {config_name} (jobs: {job}: source: ...) and no --source \
             was given: this hypervisor does not back it up"
        ))),
    }
}

/// Refuses, before asking the server anything, a push without `--source`
/// of a job this hypervisor's config does not list (a mistyped name
/// would otherwise meet the server's refusal for another client's job).
pub fn check_listed(
    job: &JobName,
    source: Option<&str>,
    config: &ClientConfig,
    config_name: &str,
) -> Result<()> {
    if source.is_some() || config.source_of(job).is_some() {
        return Ok(());
    }
    let jobs: Vec<&str> = config.jobs.keys().map(JobName::as_str).collect();
    let listed = if jobs.is_empty() {
        "it lists no jobs".to_string()
    } else {
        format!("jobs: {}", jobs.join(", "))
    };
    Err(Error::invalid(format!(
        "no job {job} in {config_name}; {listed} (or give --source)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_from_cli_or_client_config() {
        let block = SourceSpec::Block {
            path: "/dev/x".into(),
            hooks: Default::default(),
        };
        let s = source_spec("vm1", Some("disk.img"), Some(&block), "client.yaml").unwrap();
        assert_eq!(s.kind(), "file");
        let s = source_spec("vm1", None, Some(&block), "client.yaml").unwrap();
        assert_eq!(s, block);
        let e = source_spec("vm1", None, None, "/etc/backy/client.yaml").unwrap_err();
        assert!(
            e.message
                .starts_with("job vm1 is not listed in /etc/backy/client.yaml"),
            "{}",
            e.message
        );
    }

    #[test]
    fn plan_checks() {
        let good = PlanReply {
            due: true,
            new_id: RevisionId::new_random().uuid().to_string(),
            block_size: 4 << 20,
            ..PlanReply::default()
        };
        assert!(check_plan(&good).is_ok());
        for bad in [
            PlanReply {
                new_id: String::new(),
                ..good.clone()
            },
            PlanReply {
                parent_id: "x".into(),
                ..good.clone()
            },
            PlanReply {
                block_size: 1000,
                ..good.clone()
            },
        ] {
            assert!(check_plan(&bad).is_err(), "{bad:?}");
        }
    }
}
