//! A group's instants from its members' revisions (docs/DESIGN.md,
//! "Groups"): the server knows only jobs, each revision of a group push
//! records `{name, instant, disks}`; the client, which knows the group's
//! members from its config, puts the members' revisions of one instant
//! together and says whether the instant is complete.

use crate::revision::GroupInstant;
use crate::{Error, JobName, Result};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// One member's revision that carries a group instant.
#[derive(Clone, Debug)]
pub struct Taken {
    pub job: JobName,
    /// The revision's id as shown (22 characters).
    pub revision: String,
    pub time: Option<DateTime<Utc>>,
    pub group: GroupInstant,
}

/// Every member's revision of one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupInstantView {
    pub instant: String,
    /// The earliest of its revisions' times.
    pub time: Option<DateTime<Utc>>,
    /// Member → its revision of the instant, in the group's order.
    pub revisions: Vec<(JobName, String)>,
    /// Members without a revision of the instant.
    pub missing: Vec<JobName>,
    /// The disk counts its revisions recorded (one value when sane).
    pub disks: Vec<u32>,
    /// Every member has a revision of it and each recorded the group's
    /// size: restorable as a whole.
    pub complete: bool,
}

/// The instants of group `name` among `taken`, newest first. A revision
/// of another group (a job moved between groups) is left out; a member
/// with two revisions of one instant (a replica's copy carried over, a
/// hand-made copy) counts once, its first.
pub fn instants(name: &str, members: &[JobName], taken: &[Taken]) -> Vec<GroupInstantView> {
    let mut by_instant: BTreeMap<&str, Vec<&Taken>> = BTreeMap::new();
    for t in taken.iter().filter(|t| t.group.name == name) {
        by_instant.entry(&t.group.instant).or_default().push(t);
    }
    let mut out: Vec<GroupInstantView> = by_instant
        .into_iter()
        .map(|(instant, revs)| {
            let mut revisions = Vec::new();
            let mut missing = Vec::new();
            for m in members {
                match revs.iter().find(|t| &t.job == m) {
                    Some(t) => revisions.push((m.clone(), t.revision.clone())),
                    None => missing.push(m.clone()),
                }
            }
            let mut disks: Vec<u32> = revs.iter().map(|t| t.group.disks).collect();
            disks.sort_unstable();
            disks.dedup();
            let complete = missing.is_empty() && disks == [members.len() as u32];
            GroupInstantView {
                instant: instant.to_string(),
                time: revs.iter().filter_map(|t| t.time).min(),
                revisions,
                missing,
                disks,
                complete,
            }
        })
        .collect();
    // Newest first; an instant without a time last, by id for a stable order.
    out.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.instant.cmp(&b.instant)));
    out
}

/// What an instant lacks, for a refusal: `vm1-b has no revision of it`,
/// `its revisions recorded 3 disks, the group has 2`.
pub fn why_incomplete(i: &GroupInstantView, members: usize) -> String {
    let mut why = Vec::new();
    if !i.missing.is_empty() {
        let names: Vec<&str> = i.missing.iter().map(JobName::as_str).collect();
        why.push(format!(
            "{} {} no revision of it",
            names.join(", "),
            if names.len() == 1 { "has" } else { "have" }
        ));
    }
    if i.disks != [members as u32] {
        let recorded: Vec<String> = i.disks.iter().map(u32::to_string).collect();
        why.push(format!(
            "its revisions recorded {} disks, the group has {members}",
            recorded.join(" and ")
        ));
    }
    why.join("; ")
}

/// Which instants `spec` names: `latest` the newest complete one, `all`
/// every one, else the one whose id starts with `spec` (unique).
pub fn select<'a>(
    name: &str,
    instants: &'a [GroupInstantView],
    spec: &str,
) -> Result<Vec<&'a GroupInstantView>> {
    match spec {
        "latest" => instants
            .iter()
            .find(|i| i.complete)
            .map(|i| vec![i])
            .ok_or_else(|| match instants.first() {
                None => no_instant(name),
                Some(_) => Error::not_found(format!(
                    "group {name} has no complete instant ({} incomplete): name one with -r to act on its \
                     disks anyway",
                    instants.len()
                )),
            }),
        "all" if instants.is_empty() => Err(no_instant(name)),
        "all" => Ok(instants.iter().collect()),
        prefix => {
            let found: Vec<&GroupInstantView> = instants
                .iter()
                .filter(|i| i.instant.starts_with(prefix))
                .collect();
            match found.len() {
                1 => Ok(found),
                0 => Err(Error::not_found(format!("group {name} has no instant {prefix}"))),
                n => Err(Error::invalid(format!(
                    "{prefix} names {n} instants of group {name}: give more of the id"
                ))),
            }
        }
    }
}

fn no_instant(name: &str) -> Error {
    Error::not_found(format!("group {name} has no instant yet (push {name} takes one)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(s: &str) -> JobName {
        JobName::new(s).unwrap()
    }

    fn taken(j: &str, rev: &str, secs: i64, group: &str, instant: &str, disks: u32) -> Taken {
        Taken {
            job: job(j),
            revision: rev.into(),
            time: DateTime::from_timestamp(secs, 0),
            group: GroupInstant {
                name: group.into(),
                instant: instant.into(),
                disks,
            },
        }
    }

    #[test]
    fn puts_members_together_newest_first() {
        let members = [job("a"), job("b")];
        let all = [
            taken("a", "ra1", 100, "vm1", "I1", 2),
            taken("b", "rb1", 101, "vm1", "I1", 2),
            taken("a", "ra2", 200, "vm1", "I2", 2),
            taken("b", "rb2", 201, "other", "I2", 2),
            taken("a", "ra3", 300, "vm1", "I3", 3),
            taken("b", "rb3", 301, "vm1", "I3", 3),
        ];
        let got = instants("vm1", &members, &all);
        let ids: Vec<&str> = got.iter().map(|i| i.instant.as_str()).collect();
        assert_eq!(ids, ["I3", "I2", "I1"]);
        assert!(got[2].complete);
        assert_eq!(
            got[2].revisions,
            [(job("a"), "ra1".into()), (job("b"), "rb1".into())]
        );
        assert_eq!(got[2].time, DateTime::from_timestamp(100, 0));
        assert!(!got[1].complete, "b's revision is of another group");
        assert_eq!(got[1].missing, [job("b")]);
        assert_eq!(why_incomplete(&got[1], 2), "b has no revision of it");
        assert!(!got[0].complete, "taken when the group had 3 disks");
        assert_eq!(
            why_incomplete(&got[0], 2),
            "its revisions recorded 3 disks, the group has 2"
        );
    }

    #[test]
    fn selects_by_spec() {
        let members = [job("a")];
        let all = [
            taken("a", "r1", 100, "g", "Abc", 1),
            taken("a", "r2", 200, "g", "Abd", 2),
        ];
        let got = instants("g", &members, &all);
        assert_eq!(
            select("g", &got, "latest").unwrap()[0].instant,
            "Abc",
            "newest complete"
        );
        assert_eq!(select("g", &got, "Abd").unwrap()[0].instant, "Abd");
        assert_eq!(select("g", &got, "all").unwrap().len(), 2);
        assert!(select("g", &got, "Ab")
            .unwrap_err()
            .message
            .contains("names 2 instants"));
        assert!(select("g", &got, "X")
            .unwrap_err()
            .message
            .contains("no instant X"));
        let incomplete = instants("g", &[job("a"), job("b")], &all);
        assert!(select("g", &incomplete, "latest")
            .unwrap_err()
            .message
            .contains("no complete instant (2 incomplete)"));
        for spec in ["latest", "all"] {
            assert!(select("g", &[], spec)
                .unwrap_err()
                .message
                .contains("no instant yet"));
        }
    }
}
