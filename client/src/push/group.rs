//! `push GROUP`: the disks of one VM taken at one instant, then each
//! pushed as its own job (docs/DESIGN.md, "Groups").
//!
//! 1. a plan per member; none due: nothing happens; any due: the others
//!    are planned forced (the group is one instant, so all or none);
//! 2. the instant: one QMP transaction over every disk, the group's hooks
//!    around it;
//! 3. each disk pushed in turn from its view, its revision recording the
//!    group, the instant and how many disks it has; a disk that fails is
//!    reported as a failed push of its job, the others go on;
//! 4. the bitmaps: a committed disk's parent bitmap goes, a failed disk's
//!    new one (its parent's still covers everything since its parent).
//!
//! The instant is complete when every disk committed; otherwise the
//! revisions that did stay valid (each is its disk at the instant) and
//! the push fails, saying which disks are missing.

use super::file::{push_source, Hold};
use super::shared::{PushArgs, Pushed};
use super::{check_plan, report_failure};
use crate::connect::{status_error, Client};
use crate::progress::Progress;
use crate::source::qemu::{self, running::DiskRequest, Shared};
use backy_common::config::ClientGroup;
use backy_common::revision::check_tag;
use backy_common::source::{QemuDisk, SourceSpec};
use backy_common::{Error, JobName, Result, RevisionId};
use backy_proto::{GroupInstant, PlanReply, PlanRequest};
use serde::Serialize;
use std::fmt;
use std::time::Instant;

/// A group push as the command line asks for it.
#[derive(Debug, Clone)]
pub struct GroupArgs {
    pub group: JobName,
    pub config: ClientGroup,
    /// The members' sources, in the group's order.
    pub members: Vec<(JobName, SourceSpec)>,
    pub config_name: String,
    pub force: bool,
    pub tags: Vec<String>,
    pub allow_unscheduled: bool,
    pub allow_shrink: bool,
}

/// What a group push did.
#[derive(Debug, Serialize)]
pub struct GroupPushed {
    pub group: String,
    pub instant: String,
    /// Every disk's revision committed.
    pub complete: bool,
    pub disks: Vec<DiskOutcome>,
}

#[derive(Debug, Serialize)]
pub struct DiskOutcome {
    pub job: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pushed: Option<Pushed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl fmt::Display for GroupPushed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let done = self.disks.iter().filter(|d| d.pushed.is_some()).count();
        for d in &self.disks {
            match (&d.pushed, &d.error) {
                (Some(p), _) => writeln!(f, "{p}")?,
                (None, Some(e)) => writeln!(f, "{}: failed: {e}", d.job)?,
                (None, None) => writeln!(f, "{}: not pushed", d.job)?,
            }
        }
        let state = if self.complete { "complete" } else { "INCOMPLETE" };
        write!(
            f,
            "group {}: instant {} {state} ({done} of {} disks)",
            self.group,
            self.instant,
            self.disks.len()
        )
    }
}

/// Runs a group push; `None` when none of its jobs is due.
pub async fn push_group(
    client: &mut Client,
    args: &GroupArgs,
    progress: &dyn Progress,
) -> Result<Option<GroupPushed>> {
    let started = Instant::now();
    for tag in &args.tags {
        check_tag(tag)?;
    }
    let group = args.group.as_str();
    let mut plans = Vec::new();
    for (job, _) in &args.members {
        plans.push(plan(client, args, job, args.force).await?);
    }
    if !plans.iter().any(|p| p.due) {
        tracing::debug!(group, "no job of the group is due");
        return Ok(None);
    }
    // One instant for all: a member not due is taken along (forced, with
    // its next slot's tags).
    for (i, (job, _)) in args.members.iter().enumerate() {
        if !plans[i].due {
            tracing::info!(group, job = job.as_str(), "not due, taken along with the group");
            plans[i] = plan(client, args, job, true).await?;
        }
        check_plan(&plans[i])?;
    }
    let instant = RevisionId::new_random().short();
    tracing::info!(group, instant, disks = plans.len(), "group push");
    match group_planned(client, args, &plans, &instant, progress, started).await {
        Ok(pushed) => Ok(Some(pushed)),
        Err(e) => {
            // Nothing was pushed (the instant was not taken): every
            // member's planned push failed.
            for ((job, _), plan) in args.members.iter().zip(&plans) {
                report_failure(client, job.as_str(), &plan.new_id, &e).await;
            }
            Err(e)
        }
    }
}

async fn plan(client: &mut Client, args: &GroupArgs, job: &JobName, force: bool) -> Result<PlanReply> {
    Ok(client
        .plan(PlanRequest {
            job: job.to_string(),
            force,
            tags: args.tags.clone(),
            allow_unscheduled: args.allow_unscheduled,
        })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// Steps 2 to 4 of the module docs; an error here means no disk was
/// pushed.
async fn group_planned(
    client: &mut Client,
    args: &GroupArgs,
    plans: &[PlanReply],
    instant: &str,
    progress: &dyn Progress,
    started: Instant,
) -> Result<GroupPushed> {
    let group = args.group.as_str();
    let mut socket = None;
    let mut disks = Vec::new();
    for ((job, spec), plan) in args.members.iter().zip(plans) {
        let SourceSpec::Qemu(q) = spec else {
            return Err(Error::invalid(format!(
                "group {group}: job {job} is not a running QEMU disk"
            )));
        };
        let QemuDisk::Running {
            qmp,
            node,
            scratch_dir,
        } = &q.disk
        else {
            return Err(Error::invalid(format!(
                "group {group}: job {job} is not a running QEMU disk"
            )));
        };
        socket.get_or_insert(qmp.clone());
        disks.push(DiskRequest {
            node: node.clone(),
            scratch_dir: qemu::scratch_dir_of(scratch_dir.as_deref()),
            rev_id: plan.new_id.clone(),
            parent_id: plan.parent_id.clone(),
        });
    }
    let socket = socket.ok_or_else(|| Error::invalid(format!("group {group} has no jobs")))?;
    let (hooks, name, id) = (args.config.hooks.clone(), group.to_string(), instant.to_string());
    let (session, opened) =
        tokio::task::spawn_blocking(move || qemu::open_group(&socket, &disks, &hooks, &name, &id))
            .await
            .map_err(|e| Error::internal(format!("opening the group's disks: {e}")))??;
    let shared = Shared::new(session);
    let wire = GroupInstant {
        name: group.to_string(),
        instant: instant.to_string(),
        disks: args.members.len() as u32,
    };
    let mut outcomes = Vec::new();
    let mut committed = Vec::new();
    for (index, (((job, _), plan), disk)) in args.members.iter().zip(plans).zip(opened).enumerate() {
        let member = PushArgs {
            job: job.clone(),
            source: None,
            configured: None,
            config_name: args.config_name.clone(),
            force: true,
            tags: plan.tags.clone(),
            allow_unscheduled: args.allow_unscheduled,
            allow_shrink: args.allow_shrink,
            changed_ranges: None,
            group: Some(wire.clone()),
        };
        let hold = Hold {
            shared: shared.clone(),
            index,
            finish: false,
        };
        let pushed = push_source(
            client,
            &member,
            plan,
            Box::new(disk.source),
            Some(hold),
            disk.full_read_reason,
            progress,
            started,
        )
        .await;
        match pushed {
            Ok(pushed) => {
                committed.push(true);
                outcomes.push(DiskOutcome {
                    job: job.to_string(),
                    pushed: Some(pushed),
                    error: None,
                });
            }
            Err(e) => {
                tracing::error!(group, job = job.as_str(), "{}", e.message);
                report_failure(client, job.as_str(), &plan.new_id, &e).await;
                committed.push(false);
                outcomes.push(DiskOutcome {
                    job: job.to_string(),
                    pushed: None,
                    error: Some(e.message),
                });
            }
        }
    }
    let flags = committed.clone();
    let done = tokio::task::spawn_blocking(move || shared.finish(&flags)).await;
    if let Ok(Err(e)) = done {
        tracing::warn!(
            group,
            "could not remove every bitmap the push left: {}",
            e.message
        );
    }
    Ok(GroupPushed {
        group: group.to_string(),
        instant: instant.to_string(),
        complete: committed.iter().all(|c| *c),
        disks: outcomes,
    })
}
