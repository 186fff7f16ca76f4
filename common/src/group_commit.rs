//! Whether a group commit may go ahead, and under which revision time
//! (docs/DESIGN.md, "Groups"). Pure: the server passes what it holds and
//! what the client asks to commit.

use crate::{Error, Result, RevisionId};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// Checks that `requested` (job, revision) names exactly the `disks`
/// revisions held for the instant, each job once: a commit of fewer disks
/// than the push took would be an incomplete instant, which is what a
/// group commit exists to prevent.
pub fn check_members(
    disks: u32,
    requested: &[(String, RevisionId)],
    held: &BTreeMap<String, RevisionId>,
) -> Result<()> {
    if requested.len() != disks as usize {
        return Err(Error::invalid(format!(
            "a group commit names {} disks but the instant has {disks}",
            requested.len()
        )));
    }
    let mut seen = BTreeMap::new();
    for (job, id) in requested {
        if seen.insert(job.as_str(), id).is_some() {
            return Err(Error::invalid(format!(
                "job {job} is named twice in the group commit"
            )));
        }
    }
    for (job, id) in &seen {
        match held.get(*job) {
            Some(h) if h == *id => {}
            Some(h) => {
                return Err(Error::precondition(format!(
                    "job {job}: the instant holds revision {h}, not {id}; nothing was committed"
                )))
            }
            None => {
                return Err(Error::precondition(format!(
                    "job {job}: no revision of this instant is held (its push failed or never \
                     arrived); nothing was committed"
                )))
            }
        }
    }
    if let Some(job) = held.keys().find(|j| !seen.contains_key(j.as_str())) {
        return Err(Error::invalid(format!(
            "job {job} holds a revision of the instant but is not named in the group commit"
        )));
    }
    Ok(())
}

/// One held disk as the revision time is chosen: its job, when its push
/// began, and when its parent (if any) was taken.
#[derive(Debug, Clone)]
pub struct Timed<'a> {
    pub job: &'a str,
    pub timestamp: DateTime<Utc>,
    pub parent: Option<DateTime<Utc>>,
}

/// The one revision time of the instant: the earliest disk's, the
/// closest to the instant (every disk's push began after it). Each disk's
/// parent must be older: a parent newer than that was committed by
/// another push while the group's ran, and the group's revision would sort
/// before its own parent.
pub fn revision_time(disks: &[Timed<'_>]) -> Result<DateTime<Utc>> {
    let time = disks
        .iter()
        .map(|d| d.timestamp)
        .min()
        .ok_or_else(|| Error::invalid("a group commit of no disks"))?;
    if let Some(d) = disks.iter().find(|d| d.parent.is_some_and(|p| p >= time)) {
        return Err(Error::precondition(format!(
            "job {}: its parent revision is newer than the group's instant (another push \
             committed during the group push); nothing was committed, run the group push again",
            d.job
        )));
    }
    Ok(time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn id(n: u8) -> RevisionId {
        format!("{}", uuid::Uuid::from_bytes([n; 16]))
            .parse()
            .expect("an id")
    }

    fn held(pairs: &[(&str, u8)]) -> BTreeMap<String, RevisionId> {
        pairs.iter().map(|(j, n)| (j.to_string(), id(*n))).collect()
    }

    fn asked(pairs: &[(&str, u8)]) -> Vec<(String, RevisionId)> {
        pairs.iter().map(|(j, n)| (j.to_string(), id(*n))).collect()
    }

    #[test]
    fn members_must_be_exactly_the_held_disks() {
        let h = held(&[("a", 1), ("b", 2)]);
        // (requested disks, the instant's disk count, the refusal expected)
        type Row = (&'static [(&'static str, u8)], u32, Option<&'static str>);
        let table: &[Row] = &[
            (&[("a", 1), ("b", 2)], 2, None),
            (&[("b", 2), ("a", 1)], 2, None),
            (&[("a", 1)], 2, Some("names 1 disks but the instant has 2")),
            (&[("a", 1)], 1, Some("job b holds a revision")),
            (&[("a", 1), ("a", 1)], 2, Some("named twice")),
            (&[("a", 1), ("b", 3)], 2, Some("holds revision")),
            (&[("a", 1), ("c", 3)], 2, Some("job c: no revision")),
            (&[("a", 1), ("b", 2), ("c", 3)], 2, Some("names 3 disks")),
        ];
        for (req, disks, want) in table {
            let got = check_members(*disks, &asked(req), &h);
            match want {
                None => assert!(got.is_ok(), "{req:?}: {got:?}"),
                Some(w) => {
                    let e = got.expect_err(&format!("{req:?} must be refused"));
                    assert!(e.message.contains(w), "{req:?}: {}", e.message);
                }
            }
        }
    }

    #[test]
    fn the_revision_time_is_the_earliest_disks_after_every_parent() {
        let t = |s: i64| Utc.timestamp_opt(1_700_000_000 + s, 0).single().expect("time");
        let disks = [
            Timed {
                job: "a",
                timestamp: t(10),
                parent: Some(t(0)),
            },
            Timed {
                job: "b",
                timestamp: t(12),
                parent: None,
            },
        ];
        assert_eq!(revision_time(&disks).expect("time"), t(10));
        // b's parent was committed after a's push began.
        let raced = [
            disks[0].clone(),
            Timed {
                job: "b",
                timestamp: t(12),
                parent: Some(t(11)),
            },
        ];
        let e = revision_time(&raced).expect_err("a parent after the instant");
        assert!(
            e.message.starts_with("job b: its parent revision is newer"),
            "{}",
            e.message
        );
        assert!(revision_time(&[]).is_err());
    }
}
