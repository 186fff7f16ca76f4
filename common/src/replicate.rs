//! Pull replication: a second server keeping a copy of another's
//! revisions. What one round fetches and from which base, what the replica
//! removes when it mirrors the source's expiry, and how far behind it is.
//! Pure: the replica's worker does the I/O.
//!
//! Rules (docs/DESIGN.md, "Replication"):
//! - revisions are copied oldest first, under the same id, so "the same
//!   revision" means the same id on both servers;
//! - a revision distrusted on the source is not copied (partial ones are
//!   never listed);
//! - each copy is based on the newest revision both servers hold that is
//!   older than it and that the replica trusts; only blocks whose digests
//!   differ from that base travel; without one, everything does;
//! - mirroring the source's expiry removes a copy only once the source has
//!   a newer trusted revision not dated after the replica's clock, never
//!   the replica's newest trusted copy, never one dated after its clock
//!   and never one tagged `manual:`: a source that lost everything (or
//!   answers with an empty list, or lists only decoys) costs the replica
//!   nothing;
//! - the source's order must increase: a revision the replica lacks that
//!   is dated before its newest copy of the job, or one it holds that the
//!   source lists under another date, is not copied ([`out_of_order`]);
//! - a copy the replica distrusted (a scrub found it damaged) is fetched
//!   again when the source lists it trusted under the same date
//!   ([`Transfer::replace`]);
//! - a replica copies only the jobs it lists, by name or prefix, and no
//!   more than its bound of them ([`select`]).

use crate::config::Schedule;
use crate::id::RevisionId;
use crate::job::JobName;
use crate::manifest::Manifest;
use crate::ranges::GRANULE;
use crate::revision::{is_manual_tag, RevisionMeta, Trust};
use crate::schedule::ExpiryRun;
use chrono::{DateTime, Utc};
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::time::Duration;

/// A revision as one side lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub id: RevisionId,
    pub timestamp: DateTime<Utc>,
    pub trust: Trust,
    pub tags: BTreeSet<String>,
}

/// One revision to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub id: RevisionId,
    /// The revision both sides hold that the transfer is relative to;
    /// `None`: a full transfer.
    pub base: Option<RevisionId>,
    /// The replica holds this id distrusted: the fresh copy replaces it.
    pub replace: bool,
}

/// One entry of a replica's `jobs:` list: a job's name, or every job whose
/// name starts with a prefix (written `web-*`; `*` alone: every job).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobPattern {
    Name(JobName),
    Prefix(String),
}

impl JobPattern {
    pub fn parse(text: &str) -> crate::Result<Self> {
        match text.strip_suffix('*') {
            Some(prefix) => {
                // What a prefix may hold is what a name may: checked with a
                // letter appended (an empty prefix is `*`, every job).
                if !prefix.is_empty() {
                    JobName::new(&format!("{prefix}x"))
                        .map_err(|e| e.context(format!("job prefix {text:?}")))?;
                }
                Ok(JobPattern::Prefix(prefix.to_string()))
            }
            None => Ok(JobPattern::Name(JobName::new(text)?)),
        }
    }

    pub fn matches(&self, job: &JobName) -> bool {
        match self {
            JobPattern::Name(n) => n == job,
            JobPattern::Prefix(p) => job.as_str().starts_with(p.as_str()),
        }
    }
}

/// Whether any of `patterns` lists `job`.
pub fn listed_by(patterns: &[JobPattern], job: &JobName) -> bool {
    patterns.iter().any(|p| p.matches(job))
}

/// The jobs of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Named jobs (whether the source lists them or not), then the
    /// source's jobs a prefix matches, in name order, up to the bound.
    pub jobs: Vec<JobName>,
    /// Jobs a prefix matched beyond the bound: not copied.
    pub excess: usize,
}

/// Which jobs a replica copies: every name it lists, and the source's
/// jobs its prefixes match, at most `max_jobs` in all (jobs it already
/// copies, `known`, first: a new name never pushes an old copy out).
pub fn select(
    patterns: &[JobPattern],
    max_jobs: usize,
    on_source: &[JobName],
    known: &BTreeSet<JobName>,
) -> Selection {
    let mut jobs: Vec<JobName> = patterns
        .iter()
        .filter_map(|p| match p {
            JobPattern::Name(n) => Some(n.clone()),
            JobPattern::Prefix(_) => None,
        })
        .collect();
    let mut matched: Vec<&JobName> = on_source
        .iter()
        .filter(|n| !jobs.contains(n) && listed_by(patterns, n))
        .collect();
    matched.sort_by_key(|n| (!known.contains(*n), *n));
    matched.dedup();
    let room = max_jobs.saturating_sub(jobs.len());
    let excess = matched.len().saturating_sub(room);
    jobs.extend(matched.into_iter().take(room).cloned());
    jobs.sort();
    jobs.dedup();
    Selection { jobs, excess }
}

fn oldest_first(revs: &[Listed]) -> Vec<&Listed> {
    let mut sorted: Vec<&Listed> = revs.iter().collect();
    sorted.sort_by_key(|r| (r.timestamp, r.id));
    sorted
}

/// Which of the source's revisions a replica owes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owed<'a> {
    /// Every one it lacks (it mirrors the source's expiry, so a copy it
    /// lacks was lost or forgotten here, and is fetched again).
    All,
    /// Only those newer than its newest (its own schedule expires copies
    /// the source may still have: those must not come back), and of
    /// those, none its own expiry would delete at once ([`short_lived`]).
    Newer {
        /// The job's schedule here.
        schedule: &'a Schedule,
        /// Its retention lock here, if any.
        lock: Option<Duration>,
    },
}

/// Of `candidates` (revisions one round would copy, oldest first), those
/// that with its own retention the replica would delete at once: at the
/// expiry after a later commit of the same round, none of its tags is
/// left (tags outside the schedule go then, schedule tags with `keep`
/// newer carriers that are older than `keep × interval` too) and no
/// retention lock holds it. The round's newest candidate is always copied:
/// it is the replica's newest copy until the next round, whatever its
/// tags. The replica's own expiry decides ([`crate::schedule::expire`]),
/// over what it holds and the candidates.
pub fn short_lived(
    candidates: &[&Listed],
    replica: &[Listed],
    schedule: &Schedule,
    lock: Option<Duration>,
    now: DateTime<Utc>,
) -> BTreeSet<RevisionId> {
    let Some(newest) = candidates.iter().max_by_key(|r| (r.timestamp, r.id)) else {
        return BTreeSet::new();
    };
    let meta = |r: &Listed| RevisionMeta {
        id: r.id,
        timestamp: r.timestamp,
        parent: None,
        size: 0,
        block_size: 0,
        tags: r.tags.clone(),
        trust: r.trust,
        verified_at: None,
        source: Default::default(),
        stats: Default::default(),
        manifest_digest: String::new(),
        storage: Default::default(),
        locked_until: lock.and_then(|l| crate::schedule::add(r.timestamp, l)),
        key_check: None,
    };
    let all: Vec<RevisionMeta> = replica
        .iter()
        .chain(candidates.iter().copied())
        .map(meta)
        .collect();
    let plan = crate::schedule::expire(
        schedule,
        &all,
        now,
        &BTreeSet::new(),
        ExpiryRun::AfterCommit(newest.id),
    );
    candidates
        .iter()
        .filter(|r| r.id != newest.id && plan.deleted.contains(&r.id))
        .map(|r| r.id)
        .collect()
}

/// Source revisions a round does not copy because the source's order
/// does not hold: a revision the replica lacks dated before its newest
/// copy of the job (a source inserting history), or one both hold that the
/// source lists under another date (a source re-dating history). Copies
/// dated after `now` do not count as the newest (see [`plan`]). With
/// [`Owed::Newer`] a revision lacked here and older than the newest copy
/// is not owed at all (this replica's expiry removed it, or left it out as
/// [`short_lived`]): only re-dated ones count.
pub fn out_of_order(
    source: &[Listed],
    replica: &[Listed],
    owed: Owed,
    now: DateTime<Utc>,
) -> Vec<RevisionId> {
    let here: HashMap<RevisionId, &Listed> = replica.iter().map(|r| (r.id, r)).collect();
    let newest_held = replica
        .iter()
        .filter(|r| r.timestamp <= now)
        .map(|r| (r.timestamp, r.id))
        .max();
    oldest_first(source)
        .into_iter()
        .filter(|r| match here.get(&r.id) {
            Some(h) => h.timestamp != r.timestamp,
            None => owed == Owed::All && newest_held.is_some_and(|n| (r.timestamp, r.id) < n),
        })
        .map(|r| r.id)
        .collect()
}

/// The transfers of one round, in order: every revision the source has
/// and the replica lacks and owes (see [`Owed`]), or holds distrusted
/// (fetched again, see [`Transfer::replace`]), but distrusted ones and
/// those [`out_of_order`], oldest first, each based on the newest older revision both hold
/// (counting the ones fetched before it in this round) that the replica
/// trusts.
///
/// With [`Owed::Newer`], "newer" is measured against the replica's newest
/// revision not dated after `now`: a copy dated in the future (a source
/// whose clock had jumped ahead) would otherwise hide every revision the
/// source makes before that date, and the lag would say 0.
pub fn plan(source: &[Listed], replica: &[Listed], owed: Owed, now: DateTime<Utc>) -> Vec<Transfer> {
    let on_source: HashMap<RevisionId, &Listed> = source.iter().map(|r| (r.id, r)).collect();
    // Candidate bases: held by both, trusted here.
    let mut bases: Vec<(DateTime<Utc>, RevisionId)> = replica
        .iter()
        .filter(|r| r.trust.usable_as_parent() && on_source.contains_key(&r.id))
        .map(|r| (r.timestamp, r.id))
        .collect();
    let held: HashMap<RevisionId, &Listed> = replica.iter().map(|r| (r.id, r)).collect();
    let refused: BTreeSet<RevisionId> = out_of_order(source, replica, owed, now).into_iter().collect();
    let newest_held = replica
        .iter()
        .filter(|r| r.timestamp <= now)
        .map(|r| (r.timestamp, r.id))
        .max();
    // What the round would fetch: (revision, replacing a distrusted copy).
    let mut wanted: Vec<(&Listed, bool)> = Vec::new();
    for rev in oldest_first(source) {
        if !rev.trust.usable_as_parent() || refused.contains(&rev.id) {
            continue;
        }
        let replace = match held.get(&rev.id) {
            Some(h) if h.trust == Trust::Distrusted => true,
            Some(_) => continue,
            None => false,
        };
        if !replace
            && matches!(owed, Owed::Newer { .. })
            && newest_held.is_some_and(|n| (rev.timestamp, rev.id) <= n)
        {
            continue;
        }
        wanted.push((rev, replace));
    }
    let skipped = match owed {
        Owed::Newer { schedule, lock } => {
            let fresh: Vec<&Listed> = wanted
                .iter()
                .filter(|(_, again)| !again)
                .map(|(r, _)| *r)
                .collect();
            short_lived(&fresh, replica, schedule, lock, now)
        }
        Owed::All => BTreeSet::new(),
    };
    let mut out = Vec::new();
    for (rev, replace) in wanted {
        if skipped.contains(&rev.id) {
            continue;
        }
        let base = bases
            .iter()
            .filter(|(t, id)| (*t, *id) < (rev.timestamp, rev.id))
            .max()
            .map(|(_, id)| *id);
        out.push(Transfer {
            id: rev.id,
            base,
            replace,
        });
        bases.push((rev.timestamp, rev.id));
    }
    out
}

/// What the replica removes to mirror the source's expiry: copies the
/// source no longer lists, once the source has a newer trusted revision
/// than them (not dated after `now`: a date the replica cannot reach yet
/// proves nothing); never the replica's newest trusted copy, never one
/// dated after `now`, never one with a `manual:` tag.
pub fn mirror_expiry(source: &[Listed], replica: &[Listed], now: DateTime<Utc>) -> Vec<RevisionId> {
    let Some(source_newest) = source
        .iter()
        .filter(|r| r.trust.usable_as_parent() && r.timestamp <= now)
        .map(|r| r.timestamp)
        .max()
    else {
        return Vec::new();
    };
    let listed: BTreeSet<RevisionId> = source.iter().map(|r| r.id).collect();
    let newest_trusted_here = oldest_first(replica)
        .into_iter()
        .rfind(|r| r.trust.usable_as_parent() && r.timestamp <= now)
        .map(|r| r.id);
    oldest_first(replica)
        .into_iter()
        .filter(|r| !listed.contains(&r.id))
        .filter(|r| r.timestamp < source_newest && r.timestamp <= now)
        .filter(|r| Some(r.id) != newest_trusted_here)
        .filter(|r| !r.tags.iter().any(|t| is_manual_tag(t)))
        .map(|r| r.id)
        .collect()
}

/// Whether `block` of `target` holds what the same block of `base` does,
/// so a receiver that starts from its copy of `base` needs nothing for it.
pub fn same_block(base: &Manifest, target: &Manifest, block: u64) -> bool {
    base.block_size() == target.block_size()
        && base.block_offset(block) < base.image_size()
        && base.block_len(block) == target.block_len(block)
        && base.get(block).is_some()
        && base.get(block) == target.get(block)
}

/// The byte ranges, in runs of whole granules (the last may be short),
/// where `target` differs from `base` (two versions of one block).
pub fn differing_granules(base: &[u8], target: &[u8]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    let g = GRANULE as usize;
    for start in (0..target.len()).step_by(g) {
        let end = (start + g).min(target.len());
        if base.get(start..end) == Some(&target[start..end]) {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

/// How far a replica is behind its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lag {
    /// Copyable source revisions the replica does not have.
    pub missing: usize,
    /// Age of the oldest of them: how long the replica has been incomplete
    /// (zero when nothing is missing).
    pub behind: Duration,
    /// The newest revision the replica holds that the source also has or
    /// had (by timestamp), if any.
    pub newest_replicated: Option<DateTime<Utc>>,
}

pub fn lag(source: &[Listed], replica: &[Listed], owed: Owed, now: DateTime<Utc>) -> Lag {
    let missing: BTreeSet<RevisionId> = plan(source, replica, owed, now).iter().map(|t| t.id).collect();
    let missing: Vec<&Listed> = oldest_first(source)
        .into_iter()
        .filter(|r| missing.contains(&r.id))
        .collect();
    let behind = missing
        .first()
        .map(|r| (now - r.timestamp).to_std().unwrap_or_default())
        .unwrap_or_default();
    Lag {
        missing: missing.len(),
        behind,
        newest_replicated: replica.iter().map(|r| r.timestamp).max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M")
            .unwrap()
            .and_utc()
    }

    /// Revisions named by a letter; the same letter is the same id on both sides.
    fn id(c: char) -> RevisionId {
        let mut bytes = [0u8; 16];
        bytes[15] = c as u8;
        RevisionId::from(uuid::Uuid::from_bytes(bytes))
    }

    fn rev(c: char, when: &str, trust: Trust, tags: &[&str]) -> Listed {
        Listed {
            id: id(c),
            timestamp: at(when),
            trust,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// With a schedule here that expires nothing (an empty one).
    fn newer() -> Owed<'static> {
        static NONE: Schedule = Schedule::new();
        Owed::Newer {
            schedule: &NONE,
            lock: None,
        }
    }

    fn ok(c: char, when: &str) -> Listed {
        rev(c, when, Trust::Trusted, &["daily"])
    }

    fn t(c: char, base: Option<char>) -> Transfer {
        Transfer {
            id: id(c),
            base: base.map(id),
            replace: false,
        }
    }

    /// A transfer that replaces the replica's distrusted copy.
    fn again(c: char, base: Option<char>) -> Transfer {
        Transfer {
            replace: true,
            ..t(c, base)
        }
    }

    #[test]
    fn plans() {
        let a = ok('a', "2026-12-01 01:00");
        let b = ok('b', "2026-12-02 01:00");
        let c = ok('c', "2026-12-03 01:00");
        let d = ok('d', "2026-12-04 01:00");
        let bad = |r: &Listed| Listed {
            trust: Trust::Distrusted,
            ..r.clone()
        };
        type Case = (&'static str, Vec<Listed>, Vec<Listed>, Vec<Transfer>);
        let cases: Vec<Case> = vec![
            ("empty source: nothing", vec![], vec![a.clone()], vec![]),
            (
                "first round: full, then each on the one before, oldest first",
                vec![c.clone(), a.clone(), b.clone()],
                vec![],
                vec![t('a', None), t('b', Some('a')), t('c', Some('b'))],
            ),
            (
                "up to date: nothing",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b.clone()],
                vec![],
            ),
            (
                "the newest common base",
                vec![a.clone(), b.clone(), c.clone(), d.clone()],
                vec![a.clone(), b.clone()],
                vec![t('c', Some('b')), t('d', Some('c'))],
            ),
            (
                "a base the source expired is no base",
                vec![c.clone(), d.clone()],
                vec![a.clone(), b.clone()],
                vec![t('c', None), t('d', Some('c'))],
            ),
            (
                "distrusted on the source: not copied, not a base",
                vec![a.clone(), bad(&b), c.clone()],
                vec![a.clone()],
                vec![t('c', Some('a'))],
            ),
            (
                "distrusted here: not a base, fetched again in order",
                vec![a.clone(), b.clone(), c.clone()],
                vec![a.clone(), bad(&b)],
                vec![again('b', Some('a')), t('c', Some('b'))],
            ),
            (
                "distrusted here and on the source: not fetched again",
                vec![a.clone(), bad(&b)],
                vec![a.clone(), bad(&b)],
                vec![],
            ),
            (
                "an older gap is not filled: the source's order must increase",
                vec![a.clone(), b.clone(), c.clone()],
                vec![a.clone(), c.clone()],
                vec![],
            ),
            (
                "a revision inserted before the newest copy: refused",
                vec![a.clone(), b.clone(), ok('x', "2026-12-01 12:00")],
                vec![a.clone(), b.clone()],
                vec![],
            ),
            (
                "a held revision re-dated by the source: not replaced, not a reason to copy",
                vec![a.clone(), ok('b', "2026-12-04 09:00")],
                vec![a.clone(), bad(&b)],
                vec![],
            ),
            (
                "dated after the replica's clock: planned (the copy refuses it, naming it)",
                vec![a.clone(), ok('y', "9000-01-01 00:00")],
                vec![a.clone()],
                vec![t('y', Some('a'))],
            ),
        ];
        for (name, source, replica, want) in cases {
            assert_eq!(
                plan(&source, &replica, Owed::All, at("2026-12-05 01:00")),
                want,
                "{name}"
            );
        }
        // With its own schedule, what the replica expired stays expired;
        // newer ones still come, on the newest common base.
        let own = |s: &[Listed], r: &[Listed]| plan(s, r, newer(), at("2026-12-05 01:00"));
        assert_eq!(
            own(&[a.clone(), b.clone(), c.clone()], &[a.clone(), c.clone()]),
            vec![]
        );
        // ... and is not out of order either: the replica's own expiry
        // deleted it (with its mirror, the same gap is inserted history).
        let now = at("2026-12-05 01:00");
        let lacked = [a.clone(), b.clone(), c.clone()];
        let kept = [a.clone(), c.clone()];
        assert_eq!(out_of_order(&lacked, &kept, newer(), now), vec![]);
        assert_eq!(out_of_order(&lacked, &kept, Owed::All, now), vec![id('b')]);
        assert_eq!(
            own(
                &[a.clone(), b.clone(), c.clone(), d.clone()],
                std::slice::from_ref(&b)
            ),
            vec![t('c', Some('b')), t('d', Some('c'))]
        );
        assert_eq!(
            own(&[a.clone(), b.clone()], &[]),
            vec![t('a', None), t('b', Some('a'))]
        );
    }

    /// Issue 29, item 5: with its own schedule a replica copied revisions
    /// its expiry deleted at the next commit of the same round (tags it
    /// does not keep, or schedule tags already aged out). Those are left
    /// out; the round's newest always comes (it is the newest copy until
    /// the next round); what the source's order allows is unchanged.
    #[test]
    fn short_lived_revisions_are_not_copied_to_be_deleted() {
        let rule = |days: u64, keep: u32| crate::config::TagRule {
            interval: crate::units::Interval::from_secs(days * 86400),
            keep,
        };
        let daily: Schedule = [("daily".to_string(), rule(1, 2))].into();
        let now = at("2026-12-10 12:00");
        let d = |c: char, when: &str| rev(c, when, Trust::Trusted, &["daily"]);
        let h = |c: char, when: &str| rev(c, when, Trust::Trusted, &["hourly"]);
        let m = rev(
            'm',
            "2026-12-10 09:30",
            Trust::Trusted,
            &["hourly", "manual:keep"],
        );
        type Case = (
            &'static str,
            Vec<Listed>,
            Vec<Listed>,
            Option<Duration>,
            Vec<Transfer>,
        );
        let cases: Vec<Case> = vec![
            (
                "tags the replica does not keep: only the newest comes",
                vec![
                    h('a', "2026-12-10 09:00"),
                    h('b', "2026-12-10 10:00"),
                    h('c', "2026-12-10 11:00"),
                ],
                vec![],
                None,
                vec![t('c', None)],
            ),
            (
                "kept tags come, unkept ones between them do not",
                vec![
                    d('a', "2026-12-10 01:00"),
                    h('b', "2026-12-10 09:00"),
                    h('c', "2026-12-10 10:00"),
                ],
                vec![],
                None,
                vec![t('a', None), t('c', Some('a'))],
            ),
            (
                "a manual: tag never expires",
                vec![m.clone(), h('c', "2026-12-10 10:00")],
                vec![],
                None,
                vec![t('m', None), t('c', Some('m'))],
            ),
            (
                "a schedule tag aged out behind keep newer carriers",
                vec![
                    d('a', "2026-12-01 01:00"),
                    d('b', "2026-12-09 01:00"),
                    d('c', "2026-12-10 01:00"),
                ],
                vec![],
                None,
                vec![t('b', None), t('c', Some('b'))],
            ),
            (
                "inside keep × interval a schedule tag stays, however many carry it",
                vec![
                    d('a', "2026-12-09 13:00"),
                    d('b', "2026-12-09 18:00"),
                    d('c', "2026-12-10 01:00"),
                ],
                vec![d('x', "2026-12-09 12:30")],
                None,
                vec![t('a', None), t('b', Some('a')), t('c', Some('b'))],
            ),
            (
                "a retention lock here holds them: copied",
                vec![h('a', "2026-12-10 09:00"), h('b', "2026-12-10 10:00")],
                vec![],
                Some(Duration::from_secs(86400)),
                vec![t('a', None), t('b', Some('a'))],
            ),
        ];
        for (name, source, replica, lock, want) in cases {
            let owed = Owed::Newer {
                schedule: &daily,
                lock,
            };
            assert_eq!(plan(&source, &replica, owed, now), want, "{name}");
            let l = lag(&source, &replica, owed, now);
            assert_eq!(l.missing, want.len(), "{name}: only those are owed");
            // Once the round is done, what was left out is neither owed
            // nor out of order.
            let done: Vec<Listed> = source
                .iter()
                .filter(|r| want.iter().any(|t| t.id == r.id))
                .cloned()
                .collect();
            let here: Vec<Listed> = replica.iter().chain(&done).cloned().collect();
            assert_eq!(plan(&source, &here, owed, now), vec![], "{name}: next round");
            assert_eq!(
                out_of_order(&source, &here, owed, now),
                vec![],
                "{name}: next round"
            );
        }
        // Mirroring copies what the source lists, whatever its tags.
        let hs = [h('a', "2026-12-10 09:00"), h('b', "2026-12-10 10:00")];
        assert_eq!(
            plan(&hs, &[], Owed::All, now),
            vec![t('a', None), t('b', Some('a'))]
        );
    }

    #[test]
    fn mirroring_expiry() {
        let a = ok('a', "2026-12-01 01:00");
        let b = ok('b', "2026-12-02 01:00");
        let c = ok('c', "2026-12-03 01:00");
        let m = rev('m', "2026-11-01 01:00", Trust::Trusted, &["manual:keep"]);
        let ids = |v: Vec<RevisionId>| -> Vec<RevisionId> { v };
        let now = at("2026-12-06 01:00");
        let mirror_expiry = |s: &[Listed], r: &[Listed]| mirror_expiry(s, r, now);
        // The source expired a: it goes, b stays (listed), m stays (manual).
        assert_eq!(
            mirror_expiry(
                &[b.clone(), c.clone()],
                &[m.clone(), a.clone(), b.clone(), c.clone()]
            ),
            ids(vec![id('a')])
        );
        // A source that lists nothing (wiped, or a cut listing) removes nothing.
        assert!(mirror_expiry(&[], &[a.clone(), b.clone()]).is_empty());
        // Not before the source has something newer.
        assert!(mirror_expiry(std::slice::from_ref(&a), std::slice::from_ref(&b)).is_empty());
        // Never the replica's newest, even when the source has newer ones.
        let e = ok('e', "2026-12-05 01:00");
        assert!(mirror_expiry(std::slice::from_ref(&e), std::slice::from_ref(&c)).is_empty());
        assert_eq!(
            mirror_expiry(std::slice::from_ref(&e), &[b.clone(), c.clone()]),
            ids(vec![id('b')])
        );
        // Issue 28: what the source says may not steer the replica's retention.
        let bad = |r: &Listed| Listed {
            trust: Trust::Distrusted,
            ..r.clone()
        };
        let future = ok('y', "9000-01-01 00:00");
        type Case = (&'static str, Vec<Listed>, Vec<Listed>, Vec<RevisionId>);
        let cases: Vec<Case> = vec![
            (
                "a distrusted decoy dated later is not newer",
                vec![bad(&e)],
                vec![a.clone(), b.clone(), c.clone()],
                vec![],
            ),
            (
                "a revision dated after the replica's clock is not newer",
                vec![future.clone()],
                vec![a.clone(), b.clone(), c.clone()],
                vec![],
            ),
            (
                "never the newest trusted copy, though a distrusted one is newer",
                vec![e.clone()],
                vec![a.clone(), b.clone(), bad(&c)],
                vec![id('a'), id('c')],
            ),
            (
                "never a copy dated after the replica's clock",
                vec![e.clone()],
                vec![b.clone(), future.clone()],
                vec![],
            ),
            (
                "the source's trusted newer revision still expires the rest",
                vec![bad(&e), c.clone()],
                vec![a.clone(), b.clone(), c.clone()],
                vec![id('a'), id('b')],
            ),
        ];
        for (name, source, here, want) in cases {
            assert_eq!(mirror_expiry(&source, &here), want, "{name}");
        }
    }

    #[test]
    fn only_listed_jobs_and_no_more_than_the_bound() {
        let n = |s: &str| JobName::new(s).unwrap();
        let pats =
            |l: &[&str]| -> Vec<JobPattern> { l.iter().map(|p| JobPattern::parse(p).unwrap()).collect() };
        let source: Vec<JobName> = ["vm1", "web-1", "web-2", "web-3", "db"]
            .iter()
            .map(|s| n(s))
            .collect();
        let none = BTreeSet::new();
        type Case = (
            &'static str,
            Vec<&'static str>,
            usize,
            BTreeSet<JobName>,
            Vec<&'static str>,
            usize,
        );
        let cases: Vec<Case> = vec![
            (
                "names only: just those, listed or not",
                vec!["vm1", "gone"],
                1000,
                none.clone(),
                vec!["gone", "vm1"],
                0,
            ),
            (
                "a prefix",
                vec!["web-*"],
                1000,
                none.clone(),
                vec!["web-1", "web-2", "web-3"],
                0,
            ),
            (
                "the bound, excess counted",
                vec!["*"],
                2,
                none.clone(),
                vec!["db", "vm1"],
                3,
            ),
            (
                "names count against the bound but always stay",
                vec!["vm1", "web-*"],
                2,
                none.clone(),
                vec!["vm1", "web-1"],
                2,
            ),
            (
                "jobs copied before keep their place",
                vec!["web-*"],
                1,
                [n("web-3")].into(),
                vec!["web-3"],
                2,
            ),
        ];
        for (name, p, max, known, want, excess) in cases {
            let got = select(&pats(&p), max, &source, &known);
            let want: Vec<JobName> = want.iter().map(|s| n(s)).collect();
            assert_eq!((got.jobs, got.excess), (want, excess), "{name}");
        }
        assert!(JobPattern::parse("../x*").is_err());
        assert!(JobPattern::parse("a*b").is_err());
        assert_eq!(JobPattern::parse("*").unwrap(), JobPattern::Prefix(String::new()));
    }

    #[test]
    fn blocks_the_base_already_has() {
        let bs = 64 << 10;
        let n = bs as usize;
        let mut base = Manifest::zeroed(3 * bs as u64 + 100, bs).unwrap();
        let mut target = Manifest::zeroed(4 * bs as u64, bs).unwrap();
        for b in 0..3 {
            base.set(b, crate::manifest::digest(&vec![b as u8 + 1; n]))
                .unwrap();
            target
                .set(b, crate::manifest::digest(&vec![b as u8 + 1; n]))
                .unwrap();
        }
        target.set(1, crate::manifest::digest(b"changed")).unwrap();
        let same: Vec<bool> = (0..4).map(|b| same_block(&base, &target, b)).collect();
        // Block 3: base's short tail of 100 bytes, the target's full block.
        assert_eq!(same, [true, false, true, false]);
        let other = Manifest::zeroed(4 * bs as u64, 2 * bs).unwrap();
        assert!(!same_block(&other, &target, 0), "block sizes differ");
    }

    #[test]
    fn only_differing_granules_travel() {
        let g = GRANULE as usize;
        let base = vec![1u8; 4 * g + 10];
        let mut target = base.clone();
        assert!(differing_granules(&base, &target).is_empty());
        target[g + 5] = 9;
        target[2 * g] = 9;
        target[4 * g + 9] = 9;
        assert_eq!(
            differing_granules(&base, &target),
            vec![g..3 * g, 4 * g..4 * g + 10]
        );
        // A shorter base: what it lacks differs.
        assert_eq!(differing_granules(&base[..g], &base[..2 * g]), vec![g..2 * g]);
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_missing_revision() {
        let a = ok('a', "2026-12-01 01:00");
        let b = ok('b', "2026-12-02 01:00");
        let c = ok('c', "2026-12-03 01:00");
        let now = at("2026-12-03 07:00");
        let l = lag(
            &[a.clone(), b.clone(), c.clone()],
            std::slice::from_ref(&a),
            Owed::All,
            now,
        );
        assert_eq!(l.missing, 2);
        assert_eq!(l.behind, Duration::from_secs(30 * 3600));
        assert_eq!(l.newest_replicated, Some(a.timestamp));
        let l = lag(&[a.clone(), b.clone()], &[a.clone(), b.clone()], Owed::All, now);
        assert_eq!((l.missing, l.behind), (0, Duration::ZERO));
        // Distrusted revisions are not owed.
        let bad = Listed {
            trust: Trust::Distrusted,
            ..c.clone()
        };
        assert_eq!(
            lag(&[a.clone(), bad], std::slice::from_ref(&a), Owed::All, now).missing,
            0
        );
        assert_eq!(lag(&[], &[], Owed::All, now).newest_replicated, None);
        // A copy expired here under its own schedule is not owed.
        assert_eq!(
            lag(&[a.clone(), b.clone()], std::slice::from_ref(&b), newer(), now).missing,
            0
        );
        // An older revision the replica lacks is out of order: not owed.
        assert_eq!(lag(&[a, b.clone()], &[b], Owed::All, now).missing, 0);
    }

    /// Issue 27, item 6: a replica with its own schedule copied a revision
    /// dated in the future (the source's clock had jumped ahead). The
    /// source's later revisions are older than it: before, none was owed,
    /// nothing was copied, and the lag said 0.
    #[test]
    fn a_future_dated_copy_does_not_hide_what_is_owed() {
        let a = ok('a', "2026-12-03 01:00");
        let ahead = ok('f', "2026-12-03 09:00");
        let b = ok('b', "2026-12-03 05:00");
        let now = at("2026-12-03 07:00");
        let source = [a.clone(), ahead.clone(), b.clone()];
        let here = [a.clone(), ahead.clone()];
        let l = lag(&source, &here, newer(), now);
        assert_eq!((l.missing, l.behind), (1, Duration::from_secs(2 * 3600)), "{l:?}");
        // Once its date is reached it is an ordinary copy again: what the
        // replica's schedule expired before it stays expired.
        let l = lag(&source, &here, newer(), at("2026-12-03 09:00"));
        assert_eq!(l.missing, 0, "{l:?}");
    }
}
