//! `verify GROUP`: the server re-reads every member's revision of an
//! instant (as `verify JOB -r REV` does each); an instant is good when
//! it is complete and every revision of it verified.

use super::Members;
use crate::connect::Client;
use crate::revisions::{self, Verified};
use backy_common::instants::{select, why_incomplete};
use backy_common::Result;
use serde::Serialize;
use std::fmt;

#[derive(Debug, Serialize)]
pub struct GroupVerified {
    pub group: String,
    pub instants: Vec<InstantVerified>,
}

#[derive(Debug, Serialize)]
pub struct InstantVerified {
    pub instant: String,
    pub complete: bool,
    /// What an incomplete instant lacks; `null` when complete.
    pub incomplete: Option<String>,
    /// Each member's revision of it, verified.
    pub disks: Vec<Verified>,
}

impl GroupVerified {
    /// Every instant complete and every revision of it verified.
    pub fn all_ok(&self) -> bool {
        self.instants
            .iter()
            .all(|i| i.complete && i.disks.iter().all(Verified::all_ok))
    }
}

impl fmt::Display for GroupVerified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, i) in self.instants.iter().enumerate() {
            if n > 0 {
                writeln!(f)?;
            }
            for d in &i.disks {
                writeln!(f, "{d}")?;
            }
            let good = i.disks.iter().all(Verified::all_ok);
            match (&i.incomplete, good) {
                (Some(why), _) => write!(f, "group {}: instant {} INCOMPLETE: {why}", self.group, i.instant)?,
                (None, true) => write!(f, "group {}: instant {} OK", self.group, i.instant)?,
                (None, false) => write!(f, "group {}: instant {} DAMAGED", self.group, i.instant)?,
            }
        }
        Ok(())
    }
}

/// Verifies the instants `spec` names (`latest`: the newest complete one,
/// `all`, or an instant id or a prefix of one).
pub async fn verify(client: &mut Client, members: &Members, spec: &str) -> Result<GroupVerified> {
    let chosen = select(members.name.as_str(), &members.instants, spec)?;
    let mut out = GroupVerified {
        group: members.name.to_string(),
        instants: Vec::new(),
    };
    for i in chosen {
        let mut disks = Vec::new();
        for (job, rev) in &i.revisions {
            disks.push(revisions::verify(client, job, rev).await?);
        }
        out.instants.push(InstantVerified {
            instant: i.instant.clone(),
            complete: i.complete,
            incomplete: (!i.complete).then(|| why_incomplete(i, members.jobs.len())),
            disks,
        });
    }
    Ok(out)
}
