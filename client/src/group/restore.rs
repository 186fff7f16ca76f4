//! `restore GROUP`: every disk of one instant, each to its own target,
//! through the single-job restore. Every disk is prepared first (its
//! revision, manifest and key checked, its target examined and opened,
//! nothing written): a refusal of any leaves every target untouched. Then
//! the disks are written one after the other; a failure names its disk
//! and the disks already restored.

use super::Members;
use crate::connect::Client;
use crate::progress::Progress;
use crate::restore::{self, RestoreArgs, Restored, STDOUT};
use backy_common::encryption::Key;
use backy_common::instants::{select, why_incomplete};
use backy_common::{Error, JobName, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

pub struct GroupRestoreArgs {
    /// The instant: `latest` (the newest complete one), or an instant id or
    /// a prefix of one.
    pub instant: String,
    /// Each member's target.
    pub targets: BTreeMap<JobName, PathBuf>,
    pub force: bool,
    pub full: bool,
    pub quiet: bool,
    /// Each encrypted member's key.
    pub keys: BTreeMap<JobName, Arc<Key>>,
}

#[derive(Debug, Serialize)]
pub struct GroupRestored {
    pub group: String,
    pub instant: String,
    pub disks: Vec<Restored>,
}

impl fmt::Display for GroupRestored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.disks {
            writeln!(f, "{d}")?;
        }
        write!(
            f,
            "group {}: restored instant {} ({})",
            self.group,
            self.instant,
            backy_common::units::count(self.disks.len() as u64, "disk")
        )
    }
}

/// Each member's target: `--target JOB=PATH` where given, else `DIR/JOB`
/// under `--to DIR`; every member needs one, each its own.
pub fn targets(
    members: &[JobName],
    group: &JobName,
    to: Option<&std::path::Path>,
    given: &[(JobName, PathBuf)],
) -> Result<BTreeMap<JobName, PathBuf>> {
    let mut out = BTreeMap::new();
    for (job, path) in given {
        if !members.contains(job) {
            return Err(Error::invalid(format!(
                "--target {job}=...: {job} is not a member of group {group}"
            )));
        }
        if out.insert(job.clone(), path.clone()).is_some() {
            return Err(Error::invalid(format!("--target names {job} twice")));
        }
    }
    for job in members {
        if !out.contains_key(job) {
            match to {
                Some(dir) => {
                    out.insert(job.clone(), dir.join(job.as_str()));
                }
                None => {
                    return Err(Error::invalid(format!(
                        "group {group}: no target for {job}: give --to DIR (each disk to DIR/JOB) or \
                         --target {job}=PATH"
                    )))
                }
            }
        }
    }
    let mut seen = BTreeMap::new();
    for (job, path) in &out {
        if path.as_os_str() == STDOUT {
            return Err(Error::invalid(format!(
                "{job}: a group restores each disk to its own target, not standard output"
            )));
        }
        if let Some(other) = seen.insert(path.clone(), job) {
            return Err(Error::invalid(format!(
                "{other} and {job} both restore to {}: each disk needs its own target",
                path.display()
            )));
        }
    }
    Ok(out)
}

pub async fn restore(
    client: &mut Client,
    members: &Members,
    args: &GroupRestoreArgs,
    progress: &dyn Progress,
) -> Result<GroupRestored> {
    let group = members.name.as_str();
    if args.instant == "all" {
        return Err(Error::invalid("'all' is not allowed here: name one instant"));
    }
    let instant = select(group, &members.instants, &args.instant)?[0];
    if !instant.complete {
        return Err(Error::precondition(format!(
            "group {group}: instant {} is incomplete ({}): nothing restored; restore its disks one by one \
             with restore JOB -r REV if that is what you want",
            instant.instant,
            why_incomplete(instant, members.jobs.len())
        )));
    }
    // Every disk prepared before any is written.
    let mut prepared = Vec::new();
    for (job, rev) in &instant.revisions {
        let target = args
            .targets
            .get(job)
            .ok_or_else(|| Error::invalid(format!("group {group}: no target for {job}")))?;
        let single = RestoreArgs {
            job: job.clone(),
            revision: rev.clone(),
            target: target.clone(),
            force: args.force,
            full: args.full,
            quiet: args.quiet,
            key: args.keys.get(job).cloned(),
        };
        let ready = restore::prepare(client, &single).await.map_err(|e| {
            e.context(format!(
                "group {group}: {job} (revision {rev} to {}); nothing restored",
                target.display()
            ))
        })?;
        prepared.push((job.clone(), ready));
    }
    let mut disks = Vec::new();
    let mut rest = prepared.into_iter();
    while let Some((job, ready)) = rest.next() {
        let rev = crate::view::short_id(ready.revision()).into_owned();
        match ready.run(client, progress).await {
            Ok(restored) => disks.push(restored),
            Err(e) => {
                let done: Vec<String> = disks
                    .iter()
                    .map(|d| format!("{} to {}", d.job, d.target.display()))
                    .collect();
                let untouched: Vec<String> = rest.map(|(j, _)| j.to_string()).collect();
                let mut said = format!("group {group}: restoring {job} (revision {rev}) failed");
                if !done.is_empty() {
                    said.push_str(&format!("; restored before it: {}", done.join(", ")));
                }
                if !untouched.is_empty() {
                    said.push_str(&format!("; not started: {}", untouched.join(", ")));
                }
                return Err(e.context(said));
            }
        }
    }
    Ok(GroupRestored {
        group: group.to_string(),
        instant: instant.instant.clone(),
        disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(s: &str) -> JobName {
        JobName::new(s).unwrap()
    }

    #[test]
    fn every_member_gets_its_own_target() {
        let (g, m) = (job("vm1"), [job("a"), job("b")]);
        let dir = std::path::Path::new("/r");
        let t = targets(&m, &g, Some(dir), &[(job("b"), "/dev/x".into())]).unwrap();
        assert_eq!(t[&job("a")], PathBuf::from("/r/a"));
        assert_eq!(t[&job("b")], PathBuf::from("/dev/x"));
        let e = targets(&m, &g, None, &[(job("a"), "/x".into())]).unwrap_err();
        assert!(e.message.contains("no target for b"), "{}", e.message);
        let e = targets(&m, &g, None, &[(job("a"), "/x".into()), (job("b"), "/x".into())]).unwrap_err();
        assert!(e.message.contains("a and b both restore to /x"), "{}", e.message);
        let e = targets(&m, &g, Some(dir), &[(job("c"), "/x".into())]).unwrap_err();
        assert!(e.message.contains("c is not a member"), "{}", e.message);
        let e = targets(&m, &g, Some(dir), &[(job("a"), "-".into())]).unwrap_err();
        assert!(e.message.contains("not standard output"), "{}", e.message);
    }
}
