//! `push GROUP`: the disks of one VM taken at one instant, each pushed
//! as its own job, committed together (docs/DESIGN.md, "Groups").
//!
//! 1. a plan per member; none due: nothing happens; any due: the others
//!    are planned forced (the group is one instant, so all or none);
//! 2. the instant, the group's hooks around it: for running QEMU disks one
//!    QMP transaction over every disk; for Ceph RBD images every `rbd snap
//!    create` inside the one freeze window the hooks make;
//! 3. each disk pushed in turn from its view with `hold`: the server
//!    checks and seals its revision but does not publish it;
//! 4. `CommitGroup`: every disk pushed, the server publishes all of them
//!    under one revision time; a disk failed, the client aborts and the
//!    server drops every held one: none is committed, and each member's
//!    failure is reported;
//! 5. tidying: committed, the QEMU disks' parent bitmaps go and the RBD
//!    snapshots replace the older ones; not committed, the new bitmaps
//!    and snapshots go (the parents' still cover everything since).

use super::file::{push_source, Hold};
use super::rbd;
use super::shared::{PushArgs, Pushed};
use super::{check_plan, report_failure};
use crate::connect::{status_error, Client};
use crate::progress::Progress;
use crate::source::hooks::HookRunner;
use crate::source::qemu::{self, running::DiskRequest, Shared};
use crate::source::rbd::{Rbd, SNAP_PREFIX};
use backy_common::config::ClientGroup;
use backy_common::revision::check_tag;
use backy_common::source::{QemuDisk, SourceSpec};
use backy_common::{Error, JobName, Result, RevisionId};
use backy_proto::{GroupCommit, GroupInstant, GroupMember, PlanReply, PlanRequest};
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
    /// Each member's share of its tracker's unchanged blocks re-read
    /// (issue 34's audit; the flag, else the job's, else the client's).
    pub audit_samples: std::collections::BTreeMap<JobName, backy_common::tracker_audit::SamplePercent>,
    /// The process's bandwidth limit, shared by the members' pushes.
    pub bwlimit: Option<std::sync::Arc<crate::bwlimit::Limiter>>,
    /// Each encrypted member's key (client.yaml `encryption:`).
    pub keys: std::collections::BTreeMap<JobName, std::sync::Arc<backy_common::encryption::Key>>,
    /// Start new key chains: full pushes whatever the parents' keys.
    pub new_key: bool,
}

/// What a group push did.
#[derive(Debug, Serialize)]
pub struct GroupPushed {
    pub group: String,
    pub instant: String,
    /// Every disk's revision committed (otherwise none was).
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
        if self.complete {
            write!(
                f,
                "group {}: instant {} committed ({done} disks)",
                self.group, self.instant
            )
        } else {
            write!(
                f,
                "group {}: instant {} NOT COMMITTED: no disk of it was kept",
                self.group, self.instant
            )
        }
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
    let protocol = crate::connect::server_protocol(client).await?;
    if protocol < backy_proto::GROUP_COMMIT_PROTOCOL {
        return Err(Error::precondition(format!(
            "group {group}: the server speaks protocol {protocol}; a group push needs {} \
             (it commits every disk or none): upgrade backy-server",
            backy_proto::GROUP_COMMIT_PROTOCOL
        )));
    }
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

/// Steps 2 to 4 of the module docs, for the kind of the group's disks;
/// an error here means no disk was pushed.
async fn group_planned(
    client: &mut Client,
    args: &GroupArgs,
    plans: &[PlanReply],
    instant: &str,
    progress: &dyn Progress,
    started: Instant,
) -> Result<GroupPushed> {
    match args.members.first() {
        Some((_, SourceSpec::CephRbd { .. })) => {
            group_rbd(client, args, plans, instant, progress, started).await
        }
        _ => group_qemu(client, args, plans, instant, progress, started).await,
    }
}

/// A member's push arguments: its job, the plan's tags, the instant.
fn member_args(args: &GroupArgs, job: &JobName, plan: &PlanReply, wire: &GroupInstant) -> PushArgs {
    PushArgs {
        job: job.clone(),
        source: None,
        configured: None,
        config_name: args.config_name.clone(),
        force: true,
        tags: plan.tags.clone(),
        allow_unscheduled: args.allow_unscheduled,
        allow_shrink: args.allow_shrink,
        changed_ranges: None,
        audit_sample: args.audit_samples.get(job).copied().unwrap_or_default(),
        bwlimit: args.bwlimit.clone(),
        key: args.keys.get(job).cloned(),
        new_key: args.new_key,
        group: Some(wire.clone()),
    }
}

fn wire_instant(args: &GroupArgs, instant: &str) -> GroupInstant {
    GroupInstant {
        name: args.group.to_string(),
        instant: instant.to_string(),
        disks: args.members.len() as u32,
    }
}

/// Step 4 of the module docs: commits the instant when every disk was
/// pushed and held, else aborts it; every member not committed is
/// reported as a failed push of its job. Returns whether it committed.
async fn finish(
    client: &mut Client,
    args: &GroupArgs,
    wire: &GroupInstant,
    plans: &[PlanReply],
    pushed: Vec<Result<Pushed>>,
) -> (bool, Vec<DiskOutcome>) {
    let group = args.group.as_str();
    let failed: Vec<String> = args
        .members
        .iter()
        .zip(&pushed)
        .filter(|(_, p)| p.is_err())
        .map(|((job, _), _)| job.to_string())
        .collect();
    let members = args
        .members
        .iter()
        .zip(plans)
        .map(|((job, _), plan)| GroupMember {
            job: job.to_string(),
            rev_id: plan.new_id.clone(),
        })
        .collect();
    let request = GroupCommit {
        group: Some(wire.clone()),
        members,
        abort: !failed.is_empty(),
    };
    let disk_failed = || {
        Error::precondition(format!(
            "not committed: {} of the group failed",
            failed.join(", ")
        ))
    };
    let committed = match client.commit_group(request).await {
        Ok(reply) if failed.is_empty() => Ok(reply.into_inner()),
        Ok(_) => Err(disk_failed()),
        Err(status) if failed.is_empty() => Err(status_error(status).context("committing the group")),
        Err(status) => {
            tracing::warn!(group, "aborting the group push: {}", status.message());
            Err(disk_failed())
        }
    };
    let mut outcomes = Vec::new();
    match committed {
        Ok(reply) => {
            let expired: Vec<String> = reply.expired;
            for (pushed, info) in pushed.into_iter().zip(reply.revisions) {
                if let Ok(mut pushed) = pushed {
                    // The revision time is the group's now.
                    pushed.revision = crate::view::RevisionView::from(&info);
                    pushed.expired = expired.clone();
                    outcomes.push(DiskOutcome {
                        job: pushed.job.clone(),
                        pushed: Some(pushed),
                        error: None,
                    });
                }
            }
            (true, outcomes)
        }
        Err(why) => {
            for (((job, _), plan), pushed) in args.members.iter().zip(plans).zip(pushed) {
                let error = match pushed {
                    Err(e) => e,
                    Ok(_) => why.clone(),
                };
                tracing::error!(group, job = job.as_str(), "{}", error.message);
                report_failure(client, job.as_str(), &plan.new_id, &error).await;
                outcomes.push(DiskOutcome {
                    job: job.to_string(),
                    pushed: None,
                    error: Some(error.message),
                });
            }
            (false, outcomes)
        }
    }
}

/// Ceph RBD images: their snapshots inside one freeze window (the group's
/// hooks), then each pushed from its snapshot.
async fn group_rbd(
    client: &mut Client,
    args: &GroupArgs,
    plans: &[PlanReply],
    instant: &str,
    progress: &dyn Progress,
    started: Instant,
) -> Result<GroupPushed> {
    let group = args.group.as_str();
    let mut images = Vec::new();
    for ((_, spec), plan) in args.members.iter().zip(plans) {
        let rbd = Rbd::from_spec(spec)?;
        let id: RevisionId = plan.new_id.parse()?;
        images.push((rbd, format!("{SNAP_PREFIX}{}", id.short())));
    }
    let snaps: Vec<String> = images.iter().map(|(r, s)| r.snap_spec(s)).collect();
    let env = vec![
        ("BACKY_JOB".to_string(), group.to_string()),
        ("BACKY_REVISION".to_string(), instant.to_string()),
        ("BACKY_SNAPSHOT".to_string(), snaps.join(" ")),
    ];
    let hooks = HookRunner::new(&args.config.hooks, env);
    let taking = images.clone();
    let (mut hooks, taken) = rbd::blocking(move || {
        let mut hooks = hooks;
        let taken = rbd::take_snapshots(&mut hooks, &taking);
        Ok((hooks, taken))
    })
    .await?;
    taken?;
    let wire = wire_instant(args, instant);
    let mut pushed = Vec::new();
    for (((job, _), plan), (image, snap)) in args.members.iter().zip(plans).zip(&images) {
        let member = member_args(args, job, plan, &wire);
        pushed.push(
            rbd::push_snapshot(
                client,
                job.as_str(),
                &member,
                plan,
                image,
                snap,
                progress,
                started,
            )
            .await,
        );
    }
    let (complete, outcomes) = finish(client, args, &wire, plans, pushed).await;
    for (image, snap) in images {
        let tidy = rbd::blocking(move || {
            // A committed snapshot is its disk's next parent; one of an
            // instant not committed is no use.
            if complete {
                rbd::rotate(&image, &snap)
            } else {
                image.snap_remove(&snap)
            }
        })
        .await;
        if let Err(e) = tidy {
            tracing::warn!(group, "{}", e.message);
        }
    }
    let cleaned = rbd::blocking(move || hooks.cleanup()).await;
    if let Err(e) = cleaned {
        tracing::warn!(group, "cleanup hook: {}", e.message);
    }
    Ok(GroupPushed {
        group: group.to_string(),
        instant: instant.to_string(),
        complete,
        disks: outcomes,
    })
}

/// Running QEMU disks: one transaction, then each read from its view.
async fn group_qemu(
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
    let wire = wire_instant(args, instant);
    let mut pushed = Vec::new();
    for (index, (((job, _), plan), disk)) in args.members.iter().zip(plans).zip(opened).enumerate() {
        let member = member_args(args, job, plan, &wire);
        let hold = Hold {
            shared: shared.clone(),
            index,
            finish: false,
        };
        pushed.push(
            push_source(
                client,
                &member,
                plan,
                Box::new(disk.source),
                Some(hold),
                disk.full_read_reason,
                progress,
                started,
            )
            .await,
        );
    }
    let (complete, outcomes) = finish(client, args, &wire, plans, pushed).await;
    let flags = vec![complete; outcomes.len()];
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
        complete,
        disks: outcomes,
    })
}
