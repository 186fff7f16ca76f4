//! `push GROUP`: the disks of one VM taken at one instant, then each
//! pushed as its own job (docs/DESIGN.md, "Groups").
//!
//! 1. a plan per member; none due: nothing happens; any due: the others
//!    are planned forced (the group is one instant, so all or none);
//! 2. the instant, the group's hooks around it: for running QEMU disks one
//!    QMP transaction over every disk; for Ceph RBD images every `rbd snap
//!    create` inside the one freeze window the hooks make;
//! 3. each disk pushed in turn from its view, its revision recording the
//!    group, the instant and how many disks it has; a disk that fails is
//!    reported as a failed push of its job, the others go on;
//! 4. tidying: a committed QEMU disk's parent bitmap goes, a failed disk's
//!    new one (its parent's still covers everything since its parent); a
//!    committed RBD snapshot replaces the older ones, a failed one goes.
//!
//! The instant is complete when every disk committed; otherwise the
//! revisions that did stay valid (each is its disk at the instant) and
//! the push fails, saying which disks are missing.

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

/// Records a member's outcome; a failure is reported to the server as a
/// failed push of its job.
async fn outcome(
    client: &mut Client,
    group: &str,
    job: &JobName,
    plan: &PlanReply,
    pushed: Result<Pushed>,
) -> DiskOutcome {
    match pushed {
        Ok(pushed) => DiskOutcome {
            job: job.to_string(),
            pushed: Some(pushed),
            error: None,
        },
        Err(e) => {
            tracing::error!(group, job = job.as_str(), "{}", e.message);
            report_failure(client, job.as_str(), &plan.new_id, &e).await;
            DiskOutcome {
                job: job.to_string(),
                pushed: None,
                error: Some(e.message),
            }
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
    let mut outcomes = Vec::new();
    for (((job, _), plan), (image, snap)) in args.members.iter().zip(plans).zip(&images) {
        let member = member_args(args, job, plan, &wire);
        let pushed = rbd::push_snapshot(
            client,
            job.as_str(),
            &member,
            plan,
            image,
            snap,
            progress,
            started,
        )
        .await;
        let (image2, snap2, ok) = (image.clone(), snap.clone(), pushed.is_ok());
        let tidy = rbd::blocking(move || {
            // A committed snapshot is its disk's next parent; a failed
            // one's is no use.
            if ok {
                rbd::rotate(&image2, &snap2)
            } else {
                image2.snap_remove(&snap2)
            }
        })
        .await;
        if let Err(e) = tidy {
            tracing::warn!(group, job = job.as_str(), "{}", e.message);
        }
        outcomes.push(outcome(client, group, job, plan, pushed).await);
    }
    let cleaned = rbd::blocking(move || hooks.cleanup()).await;
    if let Err(e) = cleaned {
        tracing::warn!(group, "cleanup hook: {}", e.message);
    }
    Ok(GroupPushed {
        group: group.to_string(),
        instant: instant.to_string(),
        complete: outcomes.iter().all(|o| o.pushed.is_some()),
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
    let mut outcomes = Vec::new();
    let mut committed = Vec::new();
    for (index, (((job, _), plan), disk)) in args.members.iter().zip(plans).zip(opened).enumerate() {
        let member = member_args(args, job, plan, &wire);
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
        committed.push(pushed.is_ok());
        outcomes.push(outcome(client, group, job, plan, pushed).await);
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
