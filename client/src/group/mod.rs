//! Groups as the hypervisor's `client.yaml` names them (docs/DESIGN.md,
//! "Groups"): the server knows only jobs, so everything that treats a
//! group's disks together (status, check, restore, verify, the agent's
//! pushes) starts here, from the config's member list and each member's
//! revisions with the instant they record.

pub mod restore;
pub mod status;
pub mod verify;

use crate::connect::Client;
use crate::push::GroupArgs;
use backy_common::config::{ClientConfig, ClientGroup};
use backy_common::instants::{instants, GroupInstantView, Taken};
use backy_common::revision::GroupInstant;
use backy_common::tracker_audit::SamplePercent;
use backy_common::{Error, JobName, Result};
use backy_proto::JobStatus;
use std::sync::Arc;

/// The group `name` names in `config`, if it names one.
pub fn of<'a>(config: &'a ClientConfig, name: &JobName) -> Option<&'a ClientGroup> {
    config.groups.get(name)
}

/// The group `job` is a member of, if any.
pub fn containing<'a>(config: &'a ClientConfig, job: &JobName) -> Option<(&'a JobName, &'a ClientGroup)> {
    config.groups.iter().find(|(_, g)| g.jobs.contains(job))
}

/// A group's members as the server reports them, and its instants.
pub struct Members {
    pub name: JobName,
    pub jobs: Vec<JobName>,
    /// Each member's status, in the group's order.
    pub statuses: Vec<JobStatus>,
    /// Newest first.
    pub instants: Vec<GroupInstantView>,
}

impl Members {
    /// Asks the server for every member's revisions.
    pub async fn fetch(client: &mut Client, name: &JobName, group: &ClientGroup) -> Result<Members> {
        let mut statuses = Vec::new();
        for job in &group.jobs {
            let reply = crate::status::fetch(client, job)
                .await
                .map_err(|e| e.context(format!("group {name}: member {job}")))?;
            statuses.extend(reply.jobs.into_iter().filter(|j| j.job == job.as_str()));
        }
        let mut taken = Vec::new();
        for (job, status) in group.jobs.iter().zip(&statuses) {
            for r in &status.revisions {
                let Some(g) = &r.group else { continue };
                taken.push(Taken {
                    job: job.clone(),
                    revision: crate::view::short_id(r).into_owned(),
                    time: r.timestamp.as_ref().and_then(backy_proto::datetime),
                    group: GroupInstant {
                        name: g.name.clone(),
                        instant: g.instant.clone(),
                        disks: g.disks,
                    },
                });
            }
        }
        Ok(Members {
            name: name.clone(),
            jobs: group.jobs.clone(),
            instants: instants(name.as_str(), &group.jobs, &taken),
            statuses,
        })
    }
}

/// What the caller adds to a group push's arguments (the command line's
/// flags; the agent's defaults).
#[derive(Default)]
pub struct PushOptions {
    pub force: bool,
    pub tags: Vec<String>,
    pub allow_unscheduled: bool,
    pub allow_shrink: bool,
    /// Replaces every member's own audit sample.
    pub audit_sample: Option<SamplePercent>,
    pub bwlimit: Option<Arc<crate::bwlimit::Limiter>>,
    pub new_key: bool,
}

/// The arguments of `push GROUP` from the config: each member's source,
/// audit sample and key.
pub fn push_args(
    config: &ClientConfig,
    name: &JobName,
    config_name: &str,
    options: PushOptions,
) -> Result<GroupArgs> {
    let group = of(config, name)
        .ok_or_else(|| Error::invalid(format!("{name} is not a group in {config_name} (groups:)")))?;
    let mut members = Vec::new();
    let mut keys = std::collections::BTreeMap::new();
    for job in &group.jobs {
        let source = config
            .source_of(job)
            .ok_or_else(|| Error::invalid(format!("group {name}: member {job} is not listed under jobs:")))?;
        members.push((job.clone(), source.clone()));
        if let Some(key) = crate::encryption::job_key(config.encryption_of(job))? {
            keys.insert(job.clone(), key);
        }
    }
    Ok(GroupArgs {
        group: name.clone(),
        config: group.clone(),
        members,
        config_name: config_name.to_string(),
        force: options.force,
        tags: options.tags,
        allow_unscheduled: options.allow_unscheduled,
        allow_shrink: options.allow_shrink,
        audit_samples: group
            .jobs
            .iter()
            .map(|j| {
                (
                    j.clone(),
                    options.audit_sample.unwrap_or_else(|| config.audit_sample_of(j)),
                )
            })
            .collect(),
        bwlimit: options.bwlimit,
        keys,
        new_key: options.new_key,
    })
}
