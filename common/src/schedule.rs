//! Schedules: due computation, expiry and SLA (docs/DESIGN.md, "Schedules").
//!
//! Everything here is a pure function of a schedule, a job's committed
//! revisions and an injected `now`: no clock, no I/O. The scheduler, the
//! `Plan` RPC, expiry and `status` all call the same functions, so they
//! agree, and tests can walk through time.
//!
//! Times are whole seconds on the unix grid; a tag's slots are the instants
//! `k·interval + offset` for every integer `k`.

use crate::config::{Schedule, TagRule};
use crate::id::RevisionId;
use crate::revision::{is_manual_tag, RevisionMeta, Trust};
use crate::units::Interval;
use chrono::{DateTime, TimeDelta, Utc};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::time::Duration;

/// A catch-up is not started when a regular slot is at most this far away:
/// the slot will carry the missed tags instead.
pub const CATCH_UP_GRACE: Duration = Duration::from_secs(5 * 60);

/// Upper bound of the failure backoff (6 hours).
pub const MAX_BACKOFF: Duration = Duration::from_secs(360 * 60);

/// Key-derivation context of the spread hash. Changing it moves every job's
/// slots, so it is part of the on-disk/operational format.
const SPREAD_CONTEXT: &str = "backy 2026 schedule spread v1";

/// A job's fixed offset in seconds, in `[0, longest interval)`, so that jobs
/// sharing a schedule do not all start at once.
///
/// Derived from the job name with BLAKE3 (not `std`'s hasher, whose output
/// may change between Rust releases and would move every job's slots).
/// An empty schedule gives 0.
pub fn spread_offset(job: &str, schedule: &Schedule) -> u64 {
    let longest = schedule.values().map(|r| r.interval.secs()).max().unwrap_or(0);
    if longest == 0 {
        return 0;
    }
    let [b0, b1, b2, b3, b4, b5, b6, b7, ..] = blake3::derive_key(SPREAD_CONTEXT, job.as_bytes());
    u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]) % longest
}

/// The first slot of a tag *strictly after* `after`: the smallest
/// `k·interval + offset` (unix seconds) that is `> after`.
///
/// Strict, so that a revision stamped exactly on a slot has served it.
/// `None` when the interval is zero (no grid) or the slot lies beyond
/// chrono's range (hundreds of millennia away: never).
pub fn next_slot(interval: Interval, offset: u64, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let step = i128::from(interval.secs());
    if step == 0 {
        return None;
    }
    let phase = i128::from(offset) % step;
    // The grid is whole seconds: a grid point `g` is after `a` seconds plus
    // any fraction exactly when `g > a`, so the fraction can be dropped.
    let a = i128::from(after.timestamp());
    let slot = phase + ((a - phase).div_euclid(step) + 1) * step;
    DateTime::from_timestamp(i64::try_from(slot).ok()?, 0)
}

/// A job's recent failures, as the server counts them. Reset `consecutive`
/// to 0 after every successful push.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailureState {
    /// Failed pushes since the last successful one.
    pub consecutive: u32,
    /// When the most recent of them failed.
    pub last_failure: Option<DateTime<Utc>>,
}

impl FailureState {
    /// `min(2^N, 360)` minutes after N consecutive failures; zero for none.
    pub fn backoff(&self) -> Duration {
        backoff(self.consecutive)
    }

    /// The earliest time another push may start; `None` without failures
    /// (or without a recorded failure time).
    pub fn retry_at(&self) -> Option<DateTime<Utc>> {
        if self.consecutive == 0 {
            return None;
        }
        let last = self.last_failure?;
        Some(add(last, self.backoff()).unwrap_or(DateTime::<Utc>::MAX_UTC))
    }
}

/// `min(2^n, 360)` minutes; zero for `n == 0`.
pub fn backoff(n: u32) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    // 2^9 minutes already exceed the cap; never shift further.
    let minutes = (1u64 << n.min(9)).min(MAX_BACKOFF.as_secs() / 60);
    Duration::from_secs(minutes * 60)
}

/// Whether a job is due, and if not, when it will be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueState {
    /// A push should start now.
    pub due_now: bool,
    /// The tags the push now carries; empty unless `due_now`.
    pub tags: BTreeSet<String>,
    /// When the job is due next: `now` if `due_now`; `None` if never (an
    /// empty schedule, or no representable slot).
    pub next_due: Option<DateTime<Utc>>,
    /// The tags a push at `next_due` would carry (equal to `tags` if `due_now`).
    pub next_tags: BTreeSet<String>,
    /// One line for logs and `PlanReply.reason`.
    pub reason: String,
}

/// Decides whether a job is due (docs/DESIGN.md, "Schedules").
///
/// `offset` is [`spread_offset`] of the job; `revisions` are all of its
/// committed revisions in any order, distrusted ones included.
///
/// * No revisions at all: due now with every tag of the schedule.
/// * A tag's slot is the first grid point after the newest revision (of
///   any trust) carrying that tag, or, if none carries it, after
///   `now - CATCH_UP_GRACE` (a fixed point to wait for: see below). A tag
///   whose slot is `<= now` has passed without a backup and is due now;
///   all of them go together, joined by the missed tags.
/// * Otherwise the job's next slot is the earliest slot over its tags, and
///   every tag whose slot is that same instant is due then.
/// * A tag is missed when no trusted (not distrusted) revision carrying it
///   is younger than its interval. With missed tags (and some history) the
///   job is due now with the missed tags if its next slot is more than
///   [`CATCH_UP_GRACE`] away; otherwise the missed tags join that slot.
/// * After failures, nothing is due before [`FailureState::retry_at`].
///
/// The slot reference is per tag, so a push carrying other tags (manual,
/// catch-up) never makes a tag skip its slot. A revision's timestamp must
/// come from the server's clock: one stamped before its slot would leave
/// the slot "passed" and the job due again.
pub fn due(
    schedule: &Schedule,
    offset: u64,
    revisions: &[RevisionMeta],
    failures: &FailureState,
    now: DateTime<Utc>,
) -> DueState {
    let (when, tags, mut reason) = ideal(schedule, offset, revisions, now);
    let mut next_due = when;
    if let (Some(t), Some(retry)) = (next_due, failures.retry_at()) {
        if retry > t {
            next_due = Some(retry);
            let _ = write!(
                reason,
                "; backing off after {} consecutive failure(s) until {retry}",
                failures.consecutive
            );
        }
    }
    let due_now = next_due.is_some_and(|t| t <= now);
    DueState {
        due_now,
        tags: if due_now { tags.clone() } else { BTreeSet::new() },
        next_due: if due_now { Some(now) } else { next_due },
        next_tags: tags,
        reason,
    }
}

/// [`due`] without the failure backoff: when and with which tags.
fn ideal(
    schedule: &Schedule,
    offset: u64,
    revisions: &[RevisionMeta],
    now: DateTime<Utc>,
) -> (Option<DateTime<Utc>>, BTreeSet<String>, String) {
    if schedule.is_empty() {
        return (None, BTreeSet::new(), "the schedule has no tags".into());
    }
    if revisions.is_empty() {
        let all = schedule.keys().cloned().collect();
        return (Some(now), all, "first backup: all tags".into());
    }
    let mut slots: BTreeMap<&str, DateTime<Utc>> = BTreeMap::new();
    let mut missed = BTreeSet::new();
    for (tag, rule) in schedule {
        let carriers = || revisions.iter().filter(|r| r.tags.contains(tag));
        let newest = carriers().map(|r| r.timestamp).max();
        // A tag no revision carries has no slot of its own yet. Counted
        // from `now`, its slot would move with every look and, for
        // intervals of 5 minutes or less, stay within the grace forever.
        // So a grid point less than [`CATCH_UP_GRACE`] ago counts as its
        // passed slot: the original waited for a slot that close and ran
        // at it; with no record of that decision, the point just passed
        // stands for it (issue 27, item 7).
        let reference = newest.or_else(|| sub(now, CATCH_UP_GRACE)).unwrap_or(now);
        if let Some(slot) = next_slot(rule.interval, offset, reference) {
            slots.insert(tag, slot);
        }
        let young = |r: &&RevisionMeta| {
            r.trust != Trust::Distrusted
                && add(r.timestamp, rule.interval.as_duration()).is_none_or(|end| end > now)
        };
        if !carriers().any(|r| young(&r)) {
            missed.insert(tag.clone());
        }
    }

    let passed: BTreeSet<String> = slots
        .iter()
        .filter(|(_, &s)| s <= now)
        .map(|(&t, _)| t.to_owned())
        .collect();
    if let Some(earliest) = slots.values().filter(|&&s| s <= now).min() {
        let reason = format!("slot {earliest} passed without a backup ({})", join(&passed));
        let reason = with_missed(reason, &missed, &passed);
        return (Some(now), &passed | &missed, reason);
    }

    let upcoming = slots.values().min().copied();
    let at_upcoming: BTreeSet<String> = slots
        .iter()
        .filter(|(_, &s)| Some(s) == upcoming)
        .map(|(&t, _)| t.to_owned())
        .collect();
    match upcoming {
        _ if missed.is_empty() => {
            let reason = match upcoming {
                Some(u) => format!("next slot {u} ({})", join(&at_upcoming)),
                None => "no slot within the calendar's range".into(),
            };
            (upcoming, at_upcoming, reason)
        }
        Some(u) if add(now, CATCH_UP_GRACE).is_none_or(|limit| u <= limit) => {
            let reason = format!(
                "missed {} join the slot {u} ({}), less than 5 minutes away",
                join(&missed),
                join(&at_upcoming)
            );
            (Some(u), &at_upcoming | &missed, reason)
        }
        _ => {
            let reason = format!("catch-up: missed {}", join(&missed));
            (Some(now), missed, reason)
        }
    }
}

fn with_missed(mut reason: String, missed: &BTreeSet<String>, already: &BTreeSet<String>) -> String {
    let extra: BTreeSet<String> = missed - already;
    if !extra.is_empty() {
        let _ = write!(reason, "; with missed {}", join(&extra));
    }
    reason
}

fn join(tags: &BTreeSet<String>) -> String {
    tags.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// `t + d`, `None` beyond chrono's range.
pub(crate) fn add(t: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    t.checked_add_signed(TimeDelta::from_std(d).ok()?)
}

/// `t - d`, `None` beyond chrono's range.
fn sub(t: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    t.checked_sub_signed(TimeDelta::from_std(d).ok()?)
}

/// Which expiry run this is: it decides what may happen to tags that are
/// not (or no longer) in the job's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiryRun {
    /// Right after `committed` was committed under the current schedule.
    /// Only this run strips tags outside the schedule (not from `committed`
    /// itself, which an operator may have tagged so knowingly), as the
    /// original expired only after a successful backup: a renamed schedule
    /// plus a restart then cannot wipe a job before a new backup exists.
    AfterCommit(RevisionId),
    /// At start, on reload and on the timer: schedule tags age out; tags
    /// outside the schedule wait for the next commit.
    Periodic,
}

/// Why expiry removed a tag from a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagRemoval {
    /// A schedule tag older than `keep × interval` and not among its newest
    /// `keep` carriers.
    Aged { tag: String, rule: TagRule },
    /// Neither in the schedule nor `manual:`.
    NotInSchedule { tag: String },
}

impl fmt::Display for TagRemoval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagRemoval::Aged { tag, rule } => write!(
                f,
                "{tag} ran out (older than {} x {} and not among its newest {})",
                rule.keep, rule.interval, rule.keep
            ),
            TagRemoval::NotInSchedule { tag } => write!(f, "{tag} is not in the schedule"),
        }
    }
}

/// Why a revision without tags after expiry stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// The job's newest revision that is not distrusted: never deleted.
    NewestTrusted,
    /// In use by a push (as its parent) or a restore.
    InUse,
    /// Under its retention lock until then (docs/DESIGN.md, "Retention
    /// lock").
    Locked { until: DateTime<Utc> },
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Held::NewestTrusted => write!(f, "the newest revision that is not distrusted"),
            Held::InUse => write!(f, "in use by a push or a restore"),
            Held::Locked { until } => write!(
                f,
                "locked until {} (retention-lock)",
                until.format("%Y-%m-%d %H:%M:%S UTC")
            ),
        }
    }
}

/// What expiry does to a job's revisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpiryPlan {
    /// Every revision that stays, with its tags after expiry.
    pub kept: BTreeMap<RevisionId, BTreeSet<String>>,
    /// The kept revisions whose tags changed: rewrite their metadata.
    pub retagged: BTreeSet<RevisionId>,
    /// Revisions left without tags (and not held): remove them.
    pub deleted: BTreeSet<RevisionId>,
    /// Per revision, the tags removed and why (deleted and retagged ones).
    pub removals: BTreeMap<RevisionId, Vec<TagRemoval>>,
    /// Revisions left without tags that stay, and why.
    pub held: BTreeMap<RevisionId, Held>,
    /// Tags outside the schedule that a periodic run left alone: they go
    /// with the expiry after the next commit.
    pub pending: BTreeMap<RevisionId, BTreeSet<String>>,
}

impl ExpiryPlan {
    /// Whether applying the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.retagged.is_empty() && self.deleted.is_empty()
    }

    /// The records to rewrite: each retagged revision of `revisions` that
    /// stays, with its tags after expiry.
    pub fn retagged_records(&self, revisions: &[RevisionMeta]) -> Vec<RevisionMeta> {
        revisions
            .iter()
            .filter(|m| self.retagged.contains(&m.id) && !self.deleted.contains(&m.id))
            .filter_map(|m| {
                self.kept.get(&m.id).map(|tags| RevisionMeta {
                    tags: tags.clone(),
                    ..m.clone()
                })
            })
            .collect()
    }

    /// One line on why `id` is deleted (for logs and dry runs).
    pub fn reason(&self, id: &RevisionId) -> String {
        match self.removals.get(id) {
            Some(r) if !r.is_empty() => r.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            _ => "it has no tags".to_string(),
        }
    }
}

/// Expiry (docs/DESIGN.md, "Expiry"): for each schedule tag, of all but its
/// newest `keep` carriers, the tag is removed from those older than
/// `keep × interval`; after a commit, tags neither in the schedule nor
/// `manual:` are removed too (see [`ExpiryRun`]); revisions left without
/// tags are deleted.
///
/// So each tag keeps at least its newest `keep` revisions and everything
/// inside its window; `manual:` tags never expire. Trust does not matter
/// for tags: a distrusted revision counts like any other.
///
/// Never deleted, even without tags (kept with none, and gone at the first
/// run after that stops being true): the job's newest revision that is not
/// distrusted (a job always keeps its last good backup, whatever the
/// config says), and `protected` revisions (the parent of a push in flight,
/// a revision being restored), and revisions under their retention lock
/// at `now` (`locked_until`, whatever their tags). Their tags expire like
/// any other's, which keeps tags a function of time and schedule alone.
///
/// An empty schedule expires nothing (like a job without a schedule): a
/// schedule without tags is a configuration error, never a reason to delete.
/// Ids are assumed unique; the plan is idempotent (running it on its own
/// result changes nothing).
pub fn expire(
    schedule: &Schedule,
    revisions: &[RevisionMeta],
    now: DateTime<Utc>,
    protected: &BTreeSet<RevisionId>,
    run: ExpiryRun,
) -> ExpiryPlan {
    if schedule.is_empty() {
        let kept = revisions.iter().map(|r| (r.id, r.tags.clone())).collect();
        return ExpiryPlan {
            kept,
            ..ExpiryPlan::default()
        };
    }
    let mut removals: Vec<Vec<TagRemoval>> = vec![Vec::new(); revisions.len()];
    let mut pending: BTreeMap<RevisionId, BTreeSet<String>> = BTreeMap::new();
    let mut new_tags: Vec<BTreeSet<String>> = Vec::with_capacity(revisions.len());
    for (i, r) in revisions.iter().enumerate() {
        let mut tags = r.tags.clone();
        for tag in &r.tags {
            if is_manual_tag(tag) || schedule.contains_key(tag.as_str()) {
                continue;
            }
            match run {
                ExpiryRun::AfterCommit(committed) if committed != r.id => {
                    tags.remove(tag);
                    removals[i].push(TagRemoval::NotInSchedule { tag: tag.clone() });
                }
                _ => {
                    pending.entry(r.id).or_default().insert(tag.clone());
                }
            }
        }
        new_tags.push(tags);
    }

    for (tag, rule) in schedule {
        if is_manual_tag(tag) {
            continue; // manual tags never expire, even if a schedule names one
        }
        let mut carriers: Vec<usize> = (0..revisions.len())
            .filter(|&i| revisions[i].tags.contains(tag))
            .collect();
        carriers.sort_by_key(|&i| (revisions[i].timestamp, revisions[i].id));
        let keep = usize::try_from(rule.keep).unwrap_or(usize::MAX);
        let expirable = carriers.len().saturating_sub(keep);
        // No representable cutoff means the window reaches before any time.
        let window = rule.interval.secs().checked_mul(u64::from(rule.keep));
        let Some(cutoff) = window.and_then(|w| sub(now, Duration::from_secs(w))) else {
            continue;
        };
        for &i in &carriers[..expirable] {
            if revisions[i].timestamp < cutoff {
                if let (Some(tags), Some(why)) = (new_tags.get_mut(i), removals.get_mut(i)) {
                    tags.remove(tag);
                    why.push(TagRemoval::Aged {
                        tag: tag.clone(),
                        rule: *rule,
                    });
                }
            }
        }
    }

    let newest_trusted = revisions
        .iter()
        .filter(|r| r.trust.usable_as_parent())
        .max_by_key(|r| (r.timestamp, r.id))
        .map(|r| r.id);
    let mut plan = ExpiryPlan {
        pending,
        ..ExpiryPlan::default()
    };
    for ((rev, tags), why) in revisions.iter().zip(new_tags).zip(removals) {
        if tags.is_empty() {
            let held = if newest_trusted == Some(rev.id) {
                Some(Held::NewestTrusted)
            } else if protected.contains(&rev.id) {
                Some(Held::InUse)
            } else {
                rev.locked_at(now).map(|until| Held::Locked { until })
            };
            match held {
                Some(h) => {
                    plan.held.insert(rev.id, h);
                }
                None => {
                    plan.deleted.insert(rev.id);
                    plan.removals.insert(rev.id, why);
                    continue;
                }
            }
        }
        if tags != rev.tags {
            plan.retagged.insert(rev.id);
            plan.removals.insert(rev.id, why);
        }
        plan.kept.insert(rev.id, tags);
    }
    plan
}

/// Revisions dated after the server's clock, and when the server found
/// each (docs/DESIGN.md, "Schedules"). Such a revision (the clock jumped
/// forward while it was made, then came back; or a copy from a server
/// whose clock runs ahead) would put its tags' next slots and the SLA
/// deadline after its date: no backup and no alarm until then. Scheduling
/// and SLA count it as dated when it was found (at start-up or after the
/// clock stepped back) until its date is reached; `status` and `check`
/// name it.
///
/// Found times live in memory: after a restart they are found again, at
/// start-up. Pure: `now` is given by the caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FutureDated {
    found: BTreeMap<RevisionId, DateTime<Utc>>,
}

/// A job's revisions as scheduling and SLA see them at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Dated<'a> {
    /// Every revision, those dated after `now` re-dated to when they were
    /// found (never after `now`); in the order given.
    pub revisions: Cow<'a, [RevisionMeta]>,
    /// The revisions dated after `now`, in the order given.
    pub future: Vec<RevisionId>,
    /// Those of them found by this call (to warn about once).
    pub found: Vec<RevisionId>,
}

impl FutureDated {
    /// Dates `revisions` at `now`: remembers those dated after `now` not
    /// seen before as found at `now`, forgets those no longer in the
    /// future (or gone).
    pub fn date<'a>(&mut self, revisions: &'a [RevisionMeta], now: DateTime<Utc>) -> Dated<'a> {
        let future: Vec<RevisionId> = revisions
            .iter()
            .filter(|r| r.timestamp > now)
            .map(|r| r.id)
            .collect();
        self.found.retain(|id, _| future.contains(id));
        if future.is_empty() {
            return Dated {
                revisions: Cow::Borrowed(revisions),
                future,
                found: Vec::new(),
            };
        }
        let mut found = Vec::new();
        for id in &future {
            self.found.entry(*id).or_insert_with(|| {
                found.push(*id);
                now
            });
        }
        let redated = revisions
            .iter()
            .map(|r| match self.found.get(&r.id) {
                // A clock that stepped back again may be before the time
                // found: never date a revision after `now`.
                Some(&at) if r.timestamp > now => RevisionMeta {
                    timestamp: at.min(now),
                    ..r.clone()
                },
                _ => r.clone(),
            })
            .collect();
        Dated {
            revisions: Cow::Owned(redated),
            future,
            found,
        }
    }

    /// Whether nothing is remembered (the job has no future-dated revision).
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }
}

/// Whether a job meets its service level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sla {
    pub ok: bool,
    /// Timestamp of the newest revision that is not distrusted.
    pub newest_trusted: Option<DateTime<Utc>>,
    /// When the SLA breaks without a new backup: `newest_trusted + 1.5 ×
    /// shortest interval`. `None` with no trusted revision, an empty
    /// schedule, or a deadline beyond chrono's range.
    pub deadline: Option<DateTime<Utc>>,
    /// How far `now` is past the deadline; zero when ok, and zero when
    /// there is no trusted revision to measure from.
    pub overdue: Duration,
}

/// How old the newest trusted revision may get: 1.5 × the shortest
/// interval. `None` for an empty schedule, which sets no expectation.
pub fn sla_window(schedule: &Schedule) -> Option<Duration> {
    let shortest = schedule.values().map(|r| r.interval.secs()).min()?;
    // 1.5 × in milliseconds, so odd second counts stay exact.
    u64::try_from(u128::from(shortest) * 1500)
        .ok()
        .map(Duration::from_millis)
}

/// SLA (docs/DESIGN.md, "Schedules"): violated when the newest trusted
/// revision is older than 1.5 × the shortest interval of the schedule
/// (exactly at the deadline is still ok). A job without any revision has
/// one such window from `since` (when the server first knew the job) to
/// make its first backup; without `since`, or with only distrusted
/// revisions, it violates the SLA at once. An empty schedule sets no expectation: ok.
pub fn sla(
    schedule: &Schedule,
    revisions: &[RevisionMeta],
    now: DateTime<Utc>,
    since: Option<DateTime<Utc>>,
) -> Sla {
    let newest_trusted = revisions
        .iter()
        .filter(|r| r.trust != Trust::Distrusted)
        .map(|r| r.timestamp)
        .max();
    let Some(limit) = sla_window(schedule) else {
        return Sla {
            ok: true,
            newest_trusted,
            deadline: None,
            overdue: Duration::ZERO,
        };
    };
    // The grace window is for a job's first backup, not for one whose
    // revisions are all distrusted.
    let first_window = if revisions.is_empty() { since } else { None };
    let Some(start) = newest_trusted.or(first_window) else {
        return Sla {
            ok: false,
            newest_trusted,
            deadline: None,
            overdue: Duration::ZERO,
        };
    };
    let deadline = add(start, limit);
    let overdue = deadline
        .and_then(|d| (now - d).to_std().ok())
        .unwrap_or(Duration::ZERO);
    Sla {
        ok: deadline.is_none_or(|d| now <= d),
        newest_trusted,
        deadline,
        overdue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TagRule;
    use proptest::prelude::*;
    use uuid::Uuid;

    const DAY: u64 = 86400;
    /// Daily slots at 10:00 UTC; weekly ones on Thursdays 10:00 (the epoch
    /// was a Thursday), e.g. 2026-05-07 and 2026-05-14.
    const TEN_AM: u64 = 10 * 3600;

    fn t(s: &str) -> DateTime<Utc> {
        let s = if s.len() == 16 {
            format!("{s}:00")
        } else {
            s.to_owned()
        };
        let naive = chrono::NaiveDateTime::parse_from_str(&s, "%Y-%m-%d %H:%M:%S")
            .unwrap_or_else(|e| panic!("bad test time {s:?}: {e}"));
        naive.and_utc()
    }

    fn schedule(rules: &[(&str, u64, u32)]) -> Schedule {
        rules
            .iter()
            .map(|&(tag, secs, keep)| {
                let rule = TagRule {
                    interval: Interval::from_secs(secs),
                    keep,
                };
                (tag.to_owned(), rule)
            })
            .collect()
    }

    fn daily_weekly() -> Schedule {
        schedule(&[("daily", DAY, 9), ("weekly", 7 * DAY, 5)])
    }

    fn meta(id: RevisionId, timestamp: DateTime<Utc>, tags: &[&str], trust: Trust) -> RevisionMeta {
        RevisionMeta {
            id,
            timestamp,
            parent: None,
            size: 1 << 20,
            block_size: 1 << 20,
            tags: tags.iter().map(|s| s.to_string()).collect(),
            trust,
            verified_at: None,
            source: Default::default(),
            stats: Default::default(),
            manifest_digest: String::new(),
            storage: Default::default(),
            locked_until: None,
            key_check: None,
        }
    }

    fn rev(ts: &str, tags: &[&str]) -> RevisionMeta {
        meta(RevisionId::new_random(), t(ts), tags, Trust::Trusted)
    }

    fn distrusted(ts: &str, tags: &[&str]) -> RevisionMeta {
        meta(RevisionId::new_random(), t(ts), tags, Trust::Distrusted)
    }

    /// The expiry after committing a revision that is not among those given.
    fn after_commit() -> ExpiryRun {
        ExpiryRun::AfterCommit(RevisionId::from(Uuid::nil()))
    }

    fn set(tags: &[&str]) -> BTreeSet<String> {
        tags.iter().map(|s| s.to_string()).collect()
    }

    fn no_failures() -> FailureState {
        FailureState::default()
    }

    /// A week of regular backups, each a few seconds after its slot, the
    /// last weekly one on Thursday 2026-05-07.
    fn regular_history() -> Vec<RevisionMeta> {
        vec![
            rev("2026-04-30 10:00:05", &["daily", "weekly"]),
            rev("2026-05-06 10:00:05", &["daily"]),
            rev("2026-05-07 10:00:05", &["daily", "weekly"]),
            rev("2026-05-08 10:00:05", &["daily"]),
            rev("2026-05-09 10:00:05", &["daily"]),
        ]
    }

    #[test]
    fn due_table() {
        struct Case {
            name: &'static str,
            schedule: Schedule,
            revisions: Vec<RevisionMeta>,
            failures: FailureState,
            now: &'static str,
            due_now: bool,
            tags: &'static [&'static str],
            next_due: Option<&'static str>,
            reason: &'static str,
        }
        let mut with_distrusted_weekly = regular_history();
        with_distrusted_weekly[2].trust = Trust::Distrusted;
        let failed = |n: u32, at: &str| FailureState {
            consecutive: n,
            last_failure: Some(t(at)),
        };
        let cases = vec![
            Case {
                name: "first backup carries all tags",
                schedule: daily_weekly(),
                revisions: vec![],
                failures: no_failures(),
                now: "2026-05-10 03:17",
                due_now: true,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-10 03:17"),
                reason: "first backup",
            },
            Case {
                name: "just before the daily slot",
                schedule: daily_weekly(),
                revisions: regular_history(),
                failures: no_failures(),
                now: "2026-05-10 09:59:59",
                due_now: false,
                tags: &["daily"],
                next_due: Some("2026-05-10 10:00"),
                reason: "next slot",
            },
            Case {
                name: "on the daily slot",
                schedule: daily_weekly(),
                revisions: regular_history(),
                failures: no_failures(),
                now: "2026-05-10 10:00",
                due_now: true,
                tags: &["daily"],
                next_due: Some("2026-05-10 10:00"),
                reason: "passed without a backup (daily)",
            },
            Case {
                name: "weekly coincides with daily",
                schedule: daily_weekly(),
                revisions: {
                    let mut h = regular_history();
                    for d in 10..=13 {
                        h.push(rev(&format!("2026-05-{d} 10:00:05"), &["daily"]));
                    }
                    h
                },
                failures: no_failures(),
                now: "2026-05-14 09:00",
                due_now: false,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-14 10:00"),
                reason: "next slot",
            },
            Case {
                name: "weekly and daily due together on the slot",
                schedule: daily_weekly(),
                revisions: {
                    let mut h = regular_history();
                    for d in 10..=13 {
                        h.push(rev(&format!("2026-05-{d} 10:00:05"), &["daily"]));
                    }
                    h
                },
                failures: no_failures(),
                now: "2026-05-14 10:00:30",
                due_now: true,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-14 10:00:30"),
                reason: "slot 2026-05-14 10:00:00 UTC passed",
            },
            Case {
                name: "after downtime every passed tag is due",
                schedule: daily_weekly(),
                revisions: vec![
                    rev("2026-04-30 10:00:05", &["daily", "weekly"]),
                    rev("2026-05-05 10:00:05", &["daily"]),
                ],
                failures: no_failures(),
                now: "2026-05-10 08:00",
                due_now: true,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-10 08:00"),
                reason: "slot 2026-05-06 10:00:00 UTC passed",
            },
            Case {
                name: "catch-up: distrusted weekly does not count, slot 2h away",
                schedule: daily_weekly(),
                revisions: with_distrusted_weekly.clone(),
                failures: no_failures(),
                now: "2026-05-10 08:00",
                due_now: true,
                tags: &["weekly"],
                next_due: Some("2026-05-10 08:00"),
                reason: "catch-up: missed weekly",
            },
            Case {
                name: "catch-up: 5 min 1 s to the slot",
                schedule: daily_weekly(),
                revisions: with_distrusted_weekly.clone(),
                failures: no_failures(),
                now: "2026-05-10 09:54:59",
                due_now: true,
                tags: &["weekly"],
                next_due: Some("2026-05-10 09:54:59"),
                reason: "catch-up",
            },
            Case {
                name: "no catch-up: exactly 5 min to the slot, missed tag joins it",
                schedule: daily_weekly(),
                revisions: with_distrusted_weekly.clone(),
                failures: no_failures(),
                now: "2026-05-10 09:55",
                due_now: false,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-10 10:00"),
                reason: "missed weekly join the slot",
            },
            Case {
                name: "no catch-up: 1 min to the slot",
                schedule: daily_weekly(),
                revisions: with_distrusted_weekly.clone(),
                failures: no_failures(),
                now: "2026-05-10 09:59",
                due_now: false,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-10 10:00"),
                reason: "less than 5 minutes away",
            },
            Case {
                name: "the slot then carries the missed tag",
                schedule: daily_weekly(),
                revisions: with_distrusted_weekly.clone(),
                failures: no_failures(),
                now: "2026-05-10 10:00",
                due_now: true,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-10 10:00"),
                reason: "with missed weekly",
            },
            Case {
                name: "a tag new to the schedule is caught up",
                schedule: schedule(&[
                    ("daily", DAY, 9),
                    ("weekly", 7 * DAY, 5),
                    ("monthly", 30 * DAY, 4),
                ]),
                revisions: regular_history(),
                failures: no_failures(),
                now: "2026-05-09 12:00",
                due_now: true,
                tags: &["monthly"],
                next_due: Some("2026-05-09 12:00"),
                reason: "catch-up: missed monthly",
            },
            Case {
                name: "only distrusted revisions: catch-up with all tags",
                schedule: daily_weekly(),
                revisions: vec![distrusted("2026-05-09 10:00:05", &["daily", "weekly"])],
                failures: no_failures(),
                now: "2026-05-09 12:00",
                due_now: true,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-09 12:00"),
                reason: "catch-up",
            },
            Case {
                name: "manual and unknown tags are not schedule history",
                schedule: daily_weekly(),
                revisions: vec![rev("2026-05-09 10:00:05", &["manual:x", "hourly"])],
                failures: no_failures(),
                now: "2026-05-09 12:00",
                due_now: true,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-09 12:00"),
                reason: "catch-up",
            },
            Case {
                name: "a manual push after a slot does not hide it",
                schedule: daily_weekly(),
                revisions: {
                    let mut h = regular_history();
                    h.push(rev("2026-05-10 10:30", &["manual:before-upgrade"]));
                    h
                },
                failures: no_failures(),
                now: "2026-05-10 10:31",
                due_now: true,
                tags: &["daily"],
                next_due: Some("2026-05-10 10:31"),
                reason: "passed",
            },
            Case {
                name: "backoff N=1: 2 minutes",
                schedule: daily_weekly(),
                revisions: vec![],
                failures: failed(1, "2026-05-10 03:00"),
                now: "2026-05-10 03:01:59",
                due_now: false,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-10 03:02"),
                reason: "backing off after 1 consecutive failure(s)",
            },
            Case {
                name: "backoff N=1 over",
                schedule: daily_weekly(),
                revisions: vec![],
                failures: failed(1, "2026-05-10 03:00"),
                now: "2026-05-10 03:02",
                due_now: true,
                tags: &["daily", "weekly"],
                next_due: Some("2026-05-10 03:02"),
                reason: "first backup",
            },
            Case {
                name: "backoff N=2: 4 minutes",
                schedule: daily_weekly(),
                revisions: regular_history(),
                failures: failed(2, "2026-05-10 10:01"),
                now: "2026-05-10 10:02",
                due_now: false,
                tags: &["daily"],
                next_due: Some("2026-05-10 10:05"),
                reason: "backing off after 2",
            },
            Case {
                name: "backoff N=9: capped at 360 minutes",
                schedule: daily_weekly(),
                revisions: regular_history(),
                failures: failed(9, "2026-05-10 10:01"),
                now: "2026-05-10 16:00:59",
                due_now: false,
                tags: &["daily"],
                next_due: Some("2026-05-10 16:01"),
                reason: "backing off after 9",
            },
            Case {
                name: "backoff N=u32::MAX: capped, no overflow",
                schedule: daily_weekly(),
                revisions: regular_history(),
                failures: failed(u32::MAX, "2026-05-10 10:01"),
                now: "2026-05-10 16:01",
                due_now: true,
                tags: &["daily"],
                next_due: Some("2026-05-10 16:01"),
                reason: "passed",
            },
            Case {
                name: "backoff ending before the next slot changes nothing",
                schedule: daily_weekly(),
                revisions: regular_history(),
                failures: failed(3, "2026-05-10 08:00"),
                now: "2026-05-10 08:05",
                due_now: false,
                tags: &["daily"],
                next_due: Some("2026-05-10 10:00"),
                reason: "next slot",
            },
            Case {
                name: "empty schedule is never due",
                schedule: Schedule::new(),
                revisions: regular_history(),
                failures: no_failures(),
                now: "2026-05-10 10:00",
                due_now: false,
                tags: &[],
                next_due: None,
                reason: "no tags",
            },
        ];
        for c in cases {
            let now = t(c.now);
            let d = due(&c.schedule, TEN_AM, &c.revisions, &c.failures, now);
            let name = c.name;
            assert_eq!(d.due_now, c.due_now, "{name}: {d:?}");
            assert_eq!(d.next_tags, set(c.tags), "{name}: {d:?}");
            assert_eq!(d.tags, if c.due_now { set(c.tags) } else { set(&[]) }, "{name}");
            assert_eq!(d.next_due, c.next_due.map(t), "{name}: {d:?}");
            assert!(d.reason.contains(c.reason), "{name}: reason {:?}", d.reason);
        }
    }

    /// Issue 27, item 7: a minutely tag added to a job with daily
    /// revisions falls due at once, and then every minute. Before, no
    /// revision carried it, so its slot was the next grid point after
    /// `now`, always less than 5 minutes away: "missed minutely join the
    /// slot ..." at every look, forever.
    #[test]
    fn a_short_tag_added_to_a_job_falls_due() {
        let s = schedule(&[("daily", DAY, 9), ("minutely", 60, 5)]);
        let mut revs = regular_history();
        let mut now = t("2026-05-10 02:30:20");
        let d = due(&s, TEN_AM, &revs, &no_failures(), now);
        assert!(d.due_now, "{d:?}");
        assert_eq!(d.tags, set(&["minutely"]), "{d:?}");
        // Then on its own interval, walking the clock in 10 s steps.
        revs.push(rev("2026-05-10 02:30:20", &["minutely"]));
        let mut pushed = Vec::new();
        while now < t("2026-05-10 02:35") {
            now += TimeDelta::seconds(10);
            let d = due(&s, TEN_AM, &revs, &no_failures(), now);
            if d.due_now {
                assert_eq!(d.tags, set(&["minutely"]), "{now}: {d:?}");
                revs.push(meta(RevisionId::new_random(), now, &["minutely"], Trust::Trusted));
                pushed.push(now.format("%H:%M:%S").to_string());
            }
        }
        assert_eq!(
            pushed,
            ["02:31:00", "02:32:00", "02:33:00", "02:34:00", "02:35:00"]
        );
        // Intervals of more than 5 minutes keep the original's rule: a new
        // tag whose grid point is less than 5 minutes away waits for it.
        let s = schedule(&[("daily", DAY, 9), ("hourly", 3600, 5)]);
        let d = due(
            &s,
            TEN_AM,
            &regular_history(),
            &no_failures(),
            t("2026-05-10 02:57"),
        );
        assert!(!d.due_now, "{d:?}");
        assert_eq!(d.next_due, Some(t("2026-05-10 03:00")), "{d:?}");
        assert_eq!(d.next_tags, set(&["hourly"]), "{d:?}");
        let d = due(
            &s,
            TEN_AM,
            &regular_history(),
            &no_failures(),
            t("2026-05-10 03:00:01"),
        );
        assert!(d.due_now && d.tags == set(&["hourly"]), "{d:?}");
        let d = due(
            &s,
            TEN_AM,
            &regular_history(),
            &no_failures(),
            t("2026-05-10 02:50"),
        );
        assert!(d.due_now && d.reason.contains("catch-up: missed hourly"), "{d:?}");
    }

    /// Issue 27, item 6, with a fake clock: it jumps an hour forward, a
    /// push commits (stamped by that clock), it comes back. The revision
    /// counts as dated when found until its date is reached, so the hourly
    /// rhythm and the SLA go on; before, the next slot and the SLA deadline
    /// were after its date (the job stopped for an hour, `check` said OK).
    #[test]
    fn a_clock_step_forward_and_back_does_not_stop_the_job() {
        let s = schedule(&[("hourly", 3600, 5)]);
        let mut found = FutureDated::default();
        let mut revs = vec![rev("2026-05-10 09:00:05", &["hourly"])];
        // 09:30: the clock jumps to 10:30; the 10:00 slot has passed.
        let now = t("2026-05-10 10:30");
        let dated = found.date(&revs, now);
        assert!(dated.future.is_empty() && dated.found.is_empty());
        assert!(due(&s, 0, &dated.revisions, &no_failures(), now).due_now);
        let ahead = rev("2026-05-10 10:30", &["hourly"]);
        revs.push(ahead.clone());
        // The clock comes back: 09:31.
        let now = t("2026-05-10 09:31");
        let dated = found.date(&revs, now);
        assert_eq!(dated.future, [ahead.id]);
        assert_eq!(dated.found, [ahead.id], "found now: warn once");
        let d = due(&s, 0, &dated.revisions, &no_failures(), now);
        assert_eq!(d.next_due, Some(t("2026-05-10 10:00")), "{d:?}");
        let sla_now = sla(&s, &dated.revisions, now, None);
        assert_eq!(sla_now.deadline, Some(t("2026-05-10 11:01")), "{sla_now:?}");
        assert_eq!(dated.revisions[1].timestamp, now);
        assert_eq!(dated.revisions[0], revs[0]);
        // 10:00:05: still in the future, still dated when found: due.
        let now = t("2026-05-10 10:00:05");
        let dated = found.date(&revs, now);
        assert_eq!(
            (dated.future.as_slice(), dated.found.as_slice()),
            ([ahead.id].as_slice(), [].as_slice())
        );
        assert_eq!(dated.revisions[1].timestamp, t("2026-05-10 09:31"));
        let d = due(&s, 0, &dated.revisions, &no_failures(), now);
        assert!(d.due_now && d.tags == set(&["hourly"]), "{d:?}");
        // Two hours without a push: the SLA breaks at 11:01, not 12:00.
        let now = t("2026-05-10 10:20");
        let dated = found.date(&revs, now);
        assert!(sla(&s, &dated.revisions, now, None).ok);
        let later = t("2026-05-10 11:01:01");
        let dated_later = FutureDated {
            found: found.found.clone(),
        }
        .date(&revs, t("2026-05-10 10:29"));
        assert!(!sla(&s, &dated_later.revisions, later, None).ok);
        revs.push(rev("2026-05-10 10:20", &["hourly"]));
        // Its date reached: an ordinary revision again, forgotten.
        let now = t("2026-05-10 10:45");
        let dated = found.date(&revs, now);
        assert!(dated.future.is_empty() && found.is_empty());
        assert_eq!(dated.revisions, revs.as_slice());
        assert_eq!(
            due(&s, 0, &dated.revisions, &no_failures(), now).next_due,
            Some(t("2026-05-10 11:00"))
        );
        // A second step back, before the time it was found: never dated
        // after `now`.
        let mut found = FutureDated::default();
        found.date(&revs, t("2026-05-10 09:31"));
        let now = t("2026-05-10 08:00");
        let dated = found.date(&revs, now);
        assert_eq!(dated.future.len(), 3);
        assert_eq!(dated.found.len(), 1, "the 09:00:05 one is new");
        assert!(dated.revisions.iter().all(|r| r.timestamp <= now));
    }

    #[test]
    fn backoff_steps() {
        let minutes: Vec<u64> = [0, 1, 2, 3, 8, 9, 10, 64, u32::MAX]
            .into_iter()
            .map(|n| backoff(n).as_secs() / 60)
            .collect();
        assert_eq!(minutes, [0, 2, 4, 8, 256, 360, 360, 360, 360]);
        let no_time = FailureState {
            consecutive: 3,
            last_failure: None,
        };
        assert_eq!(no_time.retry_at(), None);
    }

    #[test]
    fn next_slot_examples() {
        let daily = Interval::from_secs(DAY);
        let at = |s| next_slot(daily, TEN_AM, t(s));
        assert_eq!(at("2026-05-10 09:59:59"), Some(t("2026-05-10 10:00")));
        assert_eq!(
            at("2026-05-10 10:00"),
            Some(t("2026-05-11 10:00")),
            "strictly after"
        );
        let just_after = t("2026-05-10 09:59:59") + TimeDelta::milliseconds(999);
        assert_eq!(next_slot(daily, TEN_AM, just_after), Some(t("2026-05-10 10:00")));
        // The offset is taken modulo the interval: 3.5 days on a daily grid is noon.
        assert_eq!(
            next_slot(daily, 3 * DAY + DAY / 2, t("2026-05-10 10:00")),
            Some(t("2026-05-10 12:00"))
        );
        let weekly = Interval::from_secs(7 * DAY);
        assert_eq!(
            next_slot(weekly, TEN_AM, t("2026-05-10 10:00")),
            Some(t("2026-05-14 10:00"))
        );
        // Before the epoch, too.
        assert_eq!(
            next_slot(daily, TEN_AM, t("1969-12-31 11:00")),
            Some(t("1970-01-01 10:00"))
        );
        assert_eq!(next_slot(Interval::from_secs(0), 0, t("2026-05-10 10:00")), None);
        assert_eq!(
            next_slot(Interval::from_secs(u64::MAX), 0, t("2026-05-10 10:00")),
            None
        );
        assert_eq!(next_slot(daily, 0, DateTime::<Utc>::MAX_UTC), None);
    }

    #[test]
    fn spread_examples() {
        let s = daily_weekly();
        let offset = spread_offset("vm1", &s);
        assert!(offset < 7 * DAY);
        // Pinned: a different value moves every deployed job's slots.
        assert_eq!(offset, PINNED_VM1_OFFSET);
        assert_ne!(spread_offset("vm2", &s), offset);
        assert_eq!(spread_offset("vm1", &Schedule::new()), 0);
        assert_eq!(spread_offset("vm1", &schedule(&[("x", 1, 1)])), 0);
    }
    const PINNED_VM1_OFFSET: u64 = 152_224;

    /// The expiry rule's worked example: six daily revisions, keep 5.
    #[test]
    fn expiry_worked_example() {
        let s = schedule(&[("daily", DAY, 5)]);
        let now = t("2026-05-10 10:00");
        let none = BTreeSet::new();
        let mut revs: Vec<RevisionMeta> = [
            "2026-05-06 10:00",
            "2026-05-06 11:00",
            "2026-05-07 10:00",
            "2026-05-08 10:00",
            "2026-05-09 10:00",
            "2026-05-10 10:00",
        ]
        .into_iter()
        .map(|ts| rev(ts, &["daily"]))
        .collect();
        let plan = expire(&s, &revs, now, &none, after_commit());
        assert!(plan.is_noop(), "{plan:?}");
        assert_eq!(plan.kept.len(), 6);

        let old = rev("2026-05-04 11:00", &["daily"]);
        revs.push(old.clone());
        let plan = expire(&s, &revs, now, &none, after_commit());
        assert_eq!(plan.deleted, [old.id].into());
        assert!(plan.retagged.is_empty());
        assert_eq!(plan.kept.len(), 6);

        revs.pop();
        let mixed = rev("2026-05-04 11:00", &["daily", "manual:x", "unknown"]);
        revs.push(mixed.clone());
        let plan = expire(&s, &revs, now, &none, after_commit());
        assert!(plan.deleted.is_empty());
        assert_eq!(plan.retagged, [mixed.id].into());
        assert_eq!(plan.kept[&mixed.id], set(&["manual:x"]));
    }

    /// A renamed schedule (daily -> nightly) and a restart: the periodic
    /// runs delete nothing for tags that left the schedule; the expiry after
    /// the first commit under the new name does, keeping the new revision.
    #[test]
    fn renamed_schedule_waits_for_a_commit() {
        let nightly = schedule(&[("nightly", DAY, 3)]);
        let now = t("2026-05-10 10:00");
        let revs: Vec<RevisionMeta> = (1..=6)
            .map(|d| rev(&format!("2026-05-0{d} 10:00"), &["daily"]))
            .collect();
        let none = BTreeSet::new();
        let plan = expire(&nightly, &revs, now, &none, ExpiryRun::Periodic);
        assert!(plan.is_noop(), "{plan:?}");
        assert_eq!(plan.pending.len(), 6);
        assert!(plan.pending.values().all(|t| *t == set(&["daily"])));

        let mut revs = revs;
        let new = rev("2026-05-10 10:00", &["nightly"]);
        revs.push(new.clone());
        let plan = expire(&nightly, &revs, now, &none, ExpiryRun::AfterCommit(new.id));
        assert_eq!(plan.deleted.len(), 6);
        assert_eq!(plan.kept.keys().collect::<Vec<_>>(), [&new.id]);
        let old = revs[0].id;
        assert_eq!(plan.reason(&old), "daily is not in the schedule");
    }

    /// The newest trusted revision stays whatever its tags; a distrusted
    /// newer one does not count; a committed revision keeps tags outside
    /// the schedule in its own expiry (the operator insisted on them).
    #[test]
    fn the_newest_trusted_revision_is_never_deleted() {
        let s = schedule(&[("daily", DAY, 1)]);
        let now = t("2026-05-10 10:00");
        let none = BTreeSet::new();
        let good = rev("2026-05-01 10:00", &["daily"]);
        let older = rev("2026-04-30 10:00", &["daily"]);
        let bad = distrusted("2026-05-09 10:00", &["daily"]);
        let revs = vec![older.clone(), good.clone(), bad.clone()];
        for run in [ExpiryRun::Periodic, after_commit()] {
            let plan = expire(&s, &revs, now, &none, run);
            assert_eq!(plan.deleted, [older.id].into(), "{run:?}");
            assert_eq!(plan.kept[&good.id], set(&[]));
            assert_eq!(plan.held[&good.id], Held::NewestTrusted);
            assert_eq!(plan.kept[&bad.id], set(&["daily"]));
            assert_eq!(
                plan.reason(&older.id),
                "daily ran out (older than 1 x 1d and not among its newest 1)"
            );
        }

        let untagged = rev("2026-05-10 09:00", &[]);
        let plan = expire(
            &s,
            std::slice::from_ref(&untagged),
            now,
            &none,
            ExpiryRun::Periodic,
        );
        assert!(plan.is_noop() && plan.held[&untagged.id] == Held::NewestTrusted);

        let pre = rev("2026-05-10 10:00", &["pre-upgrade"]);
        let plan = expire(
            &s,
            &[good.clone(), pre.clone()],
            now,
            &none,
            ExpiryRun::AfterCommit(pre.id),
        );
        assert_eq!(plan.kept[&pre.id], set(&["pre-upgrade"]));
        assert_eq!(plan.kept[&good.id], set(&["daily"]));
    }

    /// Issue 28: a revision under its retention lock is never deleted by
    /// expiry, whatever its tags (aged out under a shortened schedule,
    /// stripped as outside the schedule); its tags expire as always, and
    /// once the lock has passed it goes.
    #[test]
    fn a_locked_revision_is_kept_whatever_its_tags() {
        let s = schedule(&[("daily", DAY, 1)]);
        let now = t("2026-05-10 10:00");
        let until = t("2026-05-10 10:01");
        let none = BTreeSet::new();
        let locked = |ts: &str, tags: &[&str], until: DateTime<Utc>| RevisionMeta {
            locked_until: Some(until),
            ..rev(ts, tags)
        };
        let aged = locked("2026-05-01 10:00", &["daily"], until);
        let stray = locked("2026-05-02 10:00", &["junk"], until);
        let passed = locked("2026-05-03 10:00", &["daily"], now);
        let newest = rev("2026-05-10 09:00", &["daily"]);
        let revs = vec![aged.clone(), stray.clone(), passed.clone(), newest.clone()];
        for run in [ExpiryRun::Periodic, ExpiryRun::AfterCommit(newest.id)] {
            let plan = expire(&s, &revs, now, &none, run);
            assert_eq!(plan.deleted, [passed.id].into(), "{run:?}");
            assert_eq!(plan.held[&aged.id], Held::Locked { until }, "{run:?}");
            assert_eq!(plan.kept[&aged.id], set(&[]), "its tag expired: {run:?}");
            assert!(plan.retagged.contains(&aged.id));
        }
        let plan = expire(&s, &revs, now, &none, ExpiryRun::AfterCommit(newest.id));
        assert_eq!(plan.held[&stray.id], Held::Locked { until });
        assert_eq!(
            plan.held[&stray.id].to_string(),
            "locked until 2026-05-10 10:01:00 UTC (retention-lock)"
        );
        // The lock ends at `until`: from then on they expire as usual.
        let plan = expire(&s, &revs, until, &none, ExpiryRun::AfterCommit(newest.id));
        assert_eq!(plan.deleted, [aged.id, stray.id, passed.id].into());
        assert!(plan.held.is_empty(), "{plan:?}");
    }

    #[test]
    fn expiry_table() {
        let now = t("2026-05-10 10:00");
        // (name, schedule, revisions as (time, tags), protected indexes,
        //  expected tags per revision, None = deleted)
        type Expected = &'static [Option<&'static [&'static str]>];
        type Revs = Vec<(&'static str, &'static [&'static str])>;
        let cases: Vec<(&str, Schedule, Revs, Vec<usize>, Expected)> = vec![
            (
                "window boundary: exactly keep × interval old stays",
                schedule(&[("daily", DAY, 2)]),
                vec![
                    ("2026-05-08 10:00", &["daily"]),
                    ("2026-05-08 09:59:59", &["daily"]),
                    ("2026-05-09 10:00", &["daily"]),
                    ("2026-05-10 10:00", &["daily"]),
                ],
                vec![],
                &[Some(&["daily"]), None, Some(&["daily"]), Some(&["daily"])],
            ),
            (
                "keep boundary: the newest keep stay however old",
                schedule(&[("daily", DAY, 3)]),
                vec![
                    ("2026-01-01 10:00", &["daily"]),
                    ("2026-01-02 10:00", &["daily"]),
                    ("2026-01-03 10:00", &["daily"]),
                    ("2026-01-04 10:00", &["daily"]),
                ],
                vec![],
                &[None, Some(&["daily"]), Some(&["daily"]), Some(&["daily"])],
            ),
            (
                "a revision losing one tag stays for another",
                schedule(&[("daily", DAY, 1), ("weekly", 7 * DAY, 2)]),
                vec![
                    ("2026-05-07 10:00", &["daily", "weekly"]),
                    ("2026-05-08 10:00", &["daily"]),
                    ("2026-05-10 10:00", &["daily"]),
                ],
                vec![],
                &[Some(&["weekly"]), None, Some(&["daily"])],
            ),
            (
                "manual tags never expire",
                schedule(&[("daily", DAY, 1)]),
                vec![
                    ("2020-01-01 00:00", &["manual:forever"]),
                    ("2020-01-02 00:00", &["daily", "manual:x"]),
                    ("2026-05-10 10:00", &["daily"]),
                ],
                vec![],
                &[Some(&["manual:forever"]), Some(&["manual:x"]), Some(&["daily"])],
            ),
            (
                "unknown tags go, even on new revisions",
                schedule(&[("daily", DAY, 1)]),
                vec![
                    ("2026-05-10 09:00", &["hourly"]),
                    ("2026-05-10 10:00", &["daily", "monthly"]),
                ],
                vec![],
                &[None, Some(&["daily"])],
            ),
            (
                "untagged revisions go",
                schedule(&[("daily", DAY, 1)]),
                vec![("2026-05-10 09:00", &[]), ("2026-05-10 10:00", &["daily"])],
                vec![],
                &[None, Some(&["daily"])],
            ),
            (
                "protected revisions stay, with their tags expired",
                schedule(&[("daily", DAY, 1)]),
                vec![
                    ("2026-05-01 10:00", &["daily", "unknown"]),
                    ("2026-05-02 10:00", &["daily"]),
                    ("2026-05-10 10:00", &["daily"]),
                ],
                vec![0],
                &[Some(&[]), None, Some(&["daily"])],
            ),
            (
                "empty schedule expires nothing",
                Schedule::new(),
                vec![("2000-01-01 00:00", &["daily"]), ("2000-01-01 00:00", &[])],
                vec![],
                &[Some(&["daily"]), Some(&[])],
            ),
            (
                "huge windows do not overflow",
                schedule(&[("daily", u64::MAX, u32::MAX)]),
                vec![("2000-01-01 00:00", &["daily"]), ("2000-01-02 00:00", &["daily"])],
                vec![],
                &[Some(&["daily"]), Some(&["daily"])],
            ),
        ];
        for (name, s, revs, protected, expected) in cases {
            let revs: Vec<RevisionMeta> = revs.iter().map(|(ts, tags)| rev(ts, tags)).collect();
            let protected: BTreeSet<RevisionId> = protected.iter().map(|&i| revs[i].id).collect();
            let plan = expire(&s, &revs, now, &protected, after_commit());
            for (r, want) in revs.iter().zip(expected) {
                match want {
                    None => assert!(
                        plan.deleted.contains(&r.id),
                        "{name}: {} kept: {plan:?}",
                        r.timestamp
                    ),
                    Some(tags) => {
                        assert_eq!(plan.kept.get(&r.id), Some(&set(tags)), "{name}: {}", r.timestamp);
                        assert_eq!(plan.retagged.contains(&r.id), set(tags) != r.tags, "{name}");
                    }
                }
            }
            assert_eq!(plan.kept.len() + plan.deleted.len(), revs.len(), "{name}");
        }
    }

    #[test]
    fn sla_table() {
        let now = t("2026-05-10 10:00");
        let s = daily_weekly();
        // (name, schedule, revisions, ok, newest trusted, whole seconds overdue)
        type Case = (
            &'static str,
            Schedule,
            Vec<RevisionMeta>,
            bool,
            Option<&'static str>,
            u64,
        );
        let cases: Vec<Case> = vec![
            ("no revisions", s.clone(), vec![], false, None, 0),
            (
                "only distrusted",
                s.clone(),
                vec![distrusted("2026-05-10 09:00", &["daily"])],
                false,
                None,
                0,
            ),
            (
                "fresh",
                s.clone(),
                vec![rev("2026-05-10 09:00", &["daily"])],
                true,
                Some("2026-05-10 09:00"),
                0,
            ),
            (
                "exactly 1.5 × shortest interval old",
                s.clone(),
                vec![rev("2026-05-08 22:00", &["weekly"])],
                true,
                Some("2026-05-08 22:00"),
                0,
            ),
            (
                "one second more",
                s.clone(),
                vec![rev("2026-05-08 21:59:59", &["weekly"])],
                false,
                Some("2026-05-08 21:59:59"),
                1,
            ),
            (
                "a newer distrusted revision does not help",
                s.clone(),
                vec![
                    rev("2026-05-07 10:00", &["daily"]),
                    distrusted("2026-05-10 09:00", &["daily"]),
                ],
                false,
                Some("2026-05-07 10:00"),
                36 * 3600,
            ),
            (
                "odd seconds stay exact",
                schedule(&[("x", 3, 1)]),
                vec![rev("2026-05-10 09:59:55", &["x"])],
                false,
                Some("2026-05-10 09:59:55"),
                0, // 5 s old, limit 4.5 s: overdue 0.5 s
            ),
            (
                "empty schedule sets no expectation",
                Schedule::new(),
                vec![],
                true,
                None,
                0,
            ),
        ];
        for (name, s, revs, ok, newest, overdue_secs) in cases {
            let r = sla(&s, &revs, now, None);
            assert_eq!(r.ok, ok, "{name}: {r:?}");
            assert_eq!(r.newest_trusted, newest.map(t), "{name}");
            assert_eq!(r.overdue.as_secs(), overdue_secs, "{name}: {r:?}");
        }
        let r = sla(
            &schedule(&[("x", 3, 1)]),
            &[rev("2026-05-10 09:59:55", &["x"])],
            now,
            None,
        );
        assert_eq!(r.overdue, Duration::from_millis(500));
        assert_eq!(
            r.deadline,
            Some(t("2026-05-10 09:59:59") + TimeDelta::milliseconds(500))
        );
    }

    /// A new job has one SLA window from when the server first knew it.
    #[test]
    fn a_new_job_has_one_window_for_its_first_backup() {
        let now = t("2026-05-10 10:00");
        let s = daily_weekly();
        let r = sla(&s, &[], now, Some(t("2026-05-09 10:00")));
        assert!(r.ok && r.newest_trusted.is_none(), "{r:?}");
        assert_eq!(r.deadline, Some(t("2026-05-10 22:00")));
        let r = sla(&s, &[], now, Some(t("2026-05-08 10:00")));
        assert!(!r.ok);
        assert_eq!(r.overdue, Duration::from_secs(12 * 3600));
        // A revision, even an old one, is measured from, not `since`; only
        // distrusted ones: no grace.
        let r = sla(&s, &[rev("2026-05-01 10:00", &["daily"])], now, Some(now));
        assert!(!r.ok);
        let r = sla(&s, &[distrusted("2026-05-10 09:00", &["daily"])], now, Some(now));
        assert!(!r.ok);
    }

    // ---- properties ----

    fn arb_time() -> impl Strategy<Value = DateTime<Utc>> {
        // 2000..2100, whole seconds or with a sub-second part.
        (
            946_684_800i64..4_102_444_800,
            prop_oneof![Just(0u32), 0u32..1_000_000_000],
        )
            .prop_map(|(s, n)| DateTime::from_timestamp(s, n).unwrap_or(DateTime::<Utc>::MIN_UTC))
    }

    const TAGS: [&str; 4] = ["hourly", "daily", "weekly", "monthly"];
    const PERIODS: [u64; 6] = [3600, 6 * 3600, DAY, 7 * DAY, 30 * DAY, 90 * 60];

    fn arb_schedule() -> impl Strategy<Value = Schedule> {
        proptest::collection::btree_map(
            proptest::sample::select(TAGS.to_vec()).prop_map(String::from),
            (proptest::sample::select(PERIODS.to_vec()), 1u32..6).prop_map(|(secs, keep)| TagRule {
                interval: Interval::from_secs(secs),
                keep,
            }),
            1..4,
        )
    }

    /// Revisions within ~100 days before `now`, tags from the schedule's
    /// pool plus manual and unknown ones.
    fn arb_revisions(now: DateTime<Utc>) -> impl Strategy<Value = Vec<RevisionMeta>> {
        let tag = proptest::sample::select(vec![
            "hourly", "daily", "weekly", "monthly", "manual:a", "manual:b", "yearly",
        ]);
        proptest::collection::vec(
            (
                0i64..100 * DAY as i64,
                proptest::collection::btree_set(tag, 0..4),
                proptest::bool::weighted(0.15),
            ),
            0..40,
        )
        .prop_map(move |items| {
            items
                .into_iter()
                .enumerate()
                .map(|(i, (age, tags, bad))| {
                    let trust = if bad { Trust::Distrusted } else { Trust::Trusted };
                    let id = RevisionId::from(Uuid::from_u128(i as u128 + 1));
                    let tags: Vec<&str> = tags.into_iter().collect();
                    meta(id, now - TimeDelta::seconds(age), &tags, trust)
                })
                .collect()
        })
    }

    fn arb_job() -> impl Strategy<Value = (Schedule, DateTime<Utc>, Vec<RevisionMeta>, u64)> {
        (arb_schedule(), arb_time(), any::<u64>())
            .prop_flat_map(|(s, now, off)| (Just(s), Just(now), arb_revisions(now), Just(off)))
    }

    fn apply(revs: &[RevisionMeta], plan: &ExpiryPlan) -> Vec<RevisionMeta> {
        revs.iter()
            .filter_map(|r| {
                let tags = plan.kept.get(&r.id)?;
                Some(RevisionMeta {
                    tags: tags.clone(),
                    ..r.clone()
                })
            })
            .collect()
    }

    proptest! {
        #[test]
        fn next_slot_is_the_first_grid_point_after(
            after in arb_time(),
            secs in 1u64..100 * DAY,
            offset: u64,
        ) {
            let i = Interval::from_secs(secs);
            let slot = next_slot(i, offset, after).unwrap();
            prop_assert!(slot > after);
            prop_assert_eq!((i128::from(slot.timestamp()) - i128::from(offset)).rem_euclid(secs.into()), 0);
            prop_assert!(slot - TimeDelta::seconds(secs as i64) <= after);
        }

        #[test]
        fn spread_is_in_range_and_stable(job in "[a-z0-9][a-z0-9._-]{0,63}", s in arb_schedule()) {
            let longest = s.values().map(|r| r.interval.secs()).max().unwrap();
            let offset = spread_offset(&job, &s);
            prop_assert!(offset < longest);
            prop_assert_eq!(offset, spread_offset(&job, &s.clone()));
        }

        #[test]
        fn expiry_invariants((s, now, revs, _) in arb_job(), protect in proptest::collection::vec(any::<bool>(), 40)) {
            let protected: BTreeSet<RevisionId> =
                revs.iter().zip(&protect).filter(|(_, &p)| p).map(|(r, _)| r.id).collect();
            let plan = expire(&s, &revs, now, &protected, after_commit());
            prop_assert_eq!(plan.kept.len() + plan.deleted.len(), revs.len());
            for r in &revs {
                let after = plan.kept.get(&r.id);
                prop_assert_eq!(after.is_none(), plan.deleted.contains(&r.id));
                if protected.contains(&r.id) {
                    prop_assert!(after.is_some(), "protected revision deleted");
                }
                let after = after.cloned().unwrap_or_default();
                prop_assert!(after.is_subset(&r.tags), "expiry never adds tags");
                prop_assert_eq!(plan.retagged.contains(&r.id), plan.kept.contains_key(&r.id) && after != r.tags);
                for tag in &r.tags {
                    if is_manual_tag(tag) {
                        prop_assert!(after.contains(tag), "manual tag {} removed", tag);
                    }
                    if let Some(rule) = s.get(tag) {
                        let window = TimeDelta::seconds((rule.interval.secs() * u64::from(rule.keep)) as i64);
                        if now - r.timestamp <= window {
                            prop_assert!(after.contains(tag), "{} removed inside its window", tag);
                        }
                    }
                }
            }
            // The newest `keep` carriers of each tag keep it.
            for (tag, rule) in &s {
                let mut carriers: Vec<&RevisionMeta> = revs.iter().filter(|r| r.tags.contains(tag)).collect();
                carriers.sort_by_key(|r| std::cmp::Reverse((r.timestamp, r.id)));
                for r in carriers.iter().take(rule.keep as usize) {
                    prop_assert!(plan.kept.get(&r.id).is_some_and(|t| t.contains(tag)));
                }
            }
            // Idempotent.
            let again = expire(&s, &apply(&revs, &plan), now, &protected, after_commit());
            prop_assert!(again.is_noop(), "second run changed {:?}", again);
            prop_assert_eq!(&again.kept, &plan.kept);
        }

        /// Whatever the schedule and history: the newest trusted revision
        /// survives every run; a periodic run under a changed schedule
        /// (revisions tagged under another) removes no tag outside it, so
        /// it never acts on a config change before a commit; a committed
        /// revision keeps the tags outside the schedule it was committed
        /// with; both runs are idempotent.
        #[test]
        fn expiry_is_safe(
            (s, now, revs, _) in arb_job(),
            changed in arb_schedule(),
            committed in any::<proptest::sample::Index>(),
        ) {
            let none = BTreeSet::new();
            let newest = revs
                .iter()
                .filter(|r| r.trust != Trust::Distrusted)
                .max_by_key(|r| (r.timestamp, r.id))
                .map(|r| r.id);
            let c = (!revs.is_empty()).then(|| revs[committed.index(revs.len())].id);
            let runs = [ExpiryRun::Periodic, ExpiryRun::AfterCommit(c.unwrap_or_else(RevisionId::new_random))];
            for schedule in [&s, &changed] {
                for run in runs {
                    let plan = expire(schedule, &revs, now, &none, run);
                    if let Some(n) = newest {
                        prop_assert!(plan.kept.contains_key(&n), "newest trusted deleted ({:?})", run);
                    }
                    for r in &revs {
                        let after = plan.kept.get(&r.id).cloned().unwrap_or_default();
                        for tag in &r.tags {
                            let unscheduled = !is_manual_tag(tag) && !schedule.contains_key(tag);
                            if unscheduled && (run == ExpiryRun::Periodic || run == ExpiryRun::AfterCommit(r.id)) {
                                prop_assert!(after.contains(tag), "{} removed by {:?}", tag, run);
                            }
                        }
                    }
                    let again = expire(schedule, &apply(&revs, &plan), now, &none, run);
                    prop_assert!(again.is_noop(), "second {:?} run changed {:?}", run, again);
                }
            }
        }

        /// A push of the due tags, stamped now, satisfies the schedule: no
        /// backup loop.
        #[test]
        fn a_due_push_settles_the_job((s, now, revs, offset) in arb_job()) {
            let d = due(&s, offset, &revs, &FailureState::default(), now);
            prop_assert!(d.tags.iter().all(|t| s.contains_key(t)));
            prop_assert!(d.next_tags.iter().all(|t| s.contains_key(t)));
            prop_assert!(!d.next_tags.is_empty());
            let next = d.next_due.unwrap();
            if d.due_now {
                prop_assert_eq!(next, now);
                prop_assert_eq!(&d.tags, &d.next_tags);
                let mut revs = revs.clone();
                let tags: Vec<&str> = d.tags.iter().map(String::as_str).collect();
                revs.push(meta(RevisionId::new_random(), now, &tags, Trust::Trusted));
                let again = due(&s, offset, &revs, &FailureState::default(), now);
                prop_assert!(!again.due_now, "due again right after the push: {:?} then {:?}", d, again);
            } else {
                prop_assert!(next > now && d.tags.is_empty());
            }
        }

        /// A missed tag is never put off by more than the grace period.
        #[test]
        fn missed_tags_are_not_postponed((s, now, revs, offset) in arb_job()) {
            let d = due(&s, offset, &revs, &FailureState::default(), now);
            for (tag, rule) in &s {
                let young = revs.iter().any(|r| {
                    r.tags.contains(tag)
                        && r.trust != Trust::Distrusted
                        && now - r.timestamp < TimeDelta::seconds(rule.interval.secs() as i64)
                });
                if !young {
                    prop_assert!(d.next_tags.contains(tag), "{} missed but not planned: {:?}", tag, d);
                    prop_assert!(d.next_due.unwrap() <= now + TimeDelta::minutes(5));
                }
            }
        }

        /// Issue 27, item 6: whatever revisions are dated ahead of the
        /// clock (up to a year) when they are found, the job is due again
        /// within its shortest interval (plus the catch-up grace, for a tag
        /// no revision carries) and the SLA deadline is at most its window
        /// away.
        #[test]
        fn future_dated_revisions_do_not_stop_the_job(
            (s, now, revs, offset) in arb_job(),
            ahead in proptest::collection::vec((any::<bool>(), 1i64..366 * DAY as i64), 40),
        ) {
            let shortest = s.values().map(|r| r.interval.secs()).min().unwrap();
            // Still ahead one shortest interval later.
            let revs: Vec<RevisionMeta> = revs
                .into_iter()
                .zip(&ahead)
                .map(|(r, &(moved, by))| if moved {
                    RevisionMeta { timestamp: now + TimeDelta::seconds(shortest as i64 + by), ..r }
                } else {
                    r
                })
                .collect();
            let mut found = FutureDated::default();
            let dated = found.date(&revs, now);
            prop_assert!(dated.revisions.iter().all(|r| r.timestamp <= now));
            let then = now + TimeDelta::seconds(shortest as i64);
            let later = found.date(&revs, then);
            prop_assert!(later.found.is_empty());
            let d = due(&s, offset, &later.revisions, &FailureState::default(), then);
            let grace = TimeDelta::from_std(CATCH_UP_GRACE).unwrap();
            prop_assert!(d.next_due.is_some_and(|t| t <= then + grace), "{:?}", d);
            let window = TimeDelta::from_std(sla_window(&s).unwrap()).unwrap();
            if let Some(deadline) = sla(&s, &dated.revisions, now, None).deadline {
                prop_assert!(deadline <= now + window);
            }
        }

        /// Backoff never lets a push start before `last_failure + backoff`.
        #[test]
        fn backoff_holds((s, now, revs, offset) in arb_job(), n in 0u32..20, ago in 0i64..8 * 3600) {
            let last = now - TimeDelta::seconds(ago);
            let f = FailureState { consecutive: n, last_failure: Some(last) };
            let d = due(&s, offset, &revs, &f, now);
            let plain = due(&s, offset, &revs, &FailureState::default(), now);
            let retry = last + TimeDelta::from_std(backoff(n)).unwrap();
            prop_assert_eq!(d.due_now, plain.due_now && retry <= now);
            prop_assert_eq!(&d.next_tags, &plain.next_tags);
            prop_assert_eq!(d.next_due, plain.next_due.map(|p| if d.due_now { p } else { p.max(retry) }));
        }

    }

    /// A tag pool for schedules that change: intervals from a minute to
    /// months.
    fn arb_pool() -> impl Strategy<Value = Vec<(String, TagRule)>> {
        const SECS: [u64; 12] = [
            60,
            120,
            180,
            300,
            420,
            600,
            3600,
            90 * 60,
            6 * 3600,
            DAY,
            7 * DAY,
            30 * DAY,
        ];
        proptest::collection::vec((proptest::sample::select(SECS.to_vec()), 1u32..4), 2..6).prop_map(
            |rules| {
                rules
                    .into_iter()
                    .enumerate()
                    .map(|(i, (secs, keep))| {
                        let rule = TagRule {
                            interval: Interval::from_secs(secs),
                            keep,
                        };
                        (format!("t{i}"), rule)
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Issue 27, item 7. A scheduler that pushes the due tags (with up
        /// to `latency` of delay after each due time) while tags are added
        /// to and removed from the schedule at random times: no tag of the
        /// current schedule goes without a revision for more than its
        /// interval (plus the latency), counted from its newest revision or
        /// from when it was added, whichever is later.
        #[test]
        fn no_tag_is_deferred_past_its_interval(
            pool in arb_pool(),
            first in proptest::collection::vec(any::<bool>(), 6),
            changes in proptest::collection::vec((1i64..4 * DAY as i64, any::<proptest::sample::Index>()), 0..12),
            start in arb_time(),
            job in "[a-z]{1,8}",
            latency in 0i64..20,
        ) {
            let latency = TimeDelta::seconds(latency);
            let mut added: BTreeMap<String, DateTime<Utc>> = pool
                .iter()
                .zip(&first)
                .filter(|(_, &on)| on)
                .map(|((tag, _), _)| (tag.clone(), start))
                .collect();
            if added.is_empty() {
                added.insert(pool[0].0.clone(), start);
            }
            let mut change_at = start;
            let mut changes: Vec<(DateTime<Utc>, usize)> = changes
                .iter()
                .map(|(gap, which)| {
                    change_at += TimeDelta::seconds(*gap);
                    (change_at, which.index(pool.len()))
                })
                .collect();
            changes.reverse();
            let mut revs: Vec<RevisionMeta> = Vec::new();
            let mut now = start;
            for _ in 0..300 {
                let s: Schedule = pool
                    .iter()
                    .filter(|(tag, _)| added.contains_key(tag))
                    .map(|(tag, rule)| (tag.clone(), *rule))
                    .collect();
                let offset = spread_offset(&job, &s);
                for (tag, rule) in &s {
                    let newest = revs
                        .iter()
                        .filter(|r| r.tags.contains(tag))
                        .map(|r| r.timestamp)
                        .max();
                    let since = newest.map_or(added[tag], |n| n.max(added[tag]));
                    let limit = TimeDelta::seconds(rule.interval.secs() as i64) + latency;
                    prop_assert!(
                        now - since <= limit,
                        "{} ({}) without a revision from {} to {}: {:?}",
                        tag, rule.interval, since, now, due(&s, offset, &revs, &FailureState::default(), now)
                    );
                }
                let d = due(&s, offset, &revs, &FailureState::default(), now);
                if d.due_now {
                    let tags: Vec<&str> = d.tags.iter().map(String::as_str).collect();
                    let new = meta(RevisionId::new_random(), now, &tags, Trust::Trusted);
                    let id = new.id;
                    revs.push(new);
                    let plan = expire(&s, &revs, now, &BTreeSet::new(), ExpiryRun::AfterCommit(id));
                    revs = apply(&revs, &plan);
                }
                let d = due(&s, offset, &revs, &FailureState::default(), now);
                prop_assert!(!d.due_now, "due again after the push: {:?}", d);
                let next = d.next_due.unwrap() + latency;
                match changes.last() {
                    Some(&(at, which)) if at <= next => {
                        changes.pop();
                        now = at.max(now);
                        let tag = &pool[which].0;
                        // Added, or removed (but never the last one:
                        // that one is added again at once).
                        if added.remove(tag).is_none() || added.is_empty() {
                            added.insert(tag.clone(), now);
                        }
                    }
                    _ => now = next,
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Simulating a scheduler that ticks every `step`, pushes when due
        /// and expires after each push: every tag is served at its slots
        /// (never more often), and its newest revision never ages past
        /// interval + step.
        #[test]
        fn simulated_scheduler_keeps_the_rhythm(
            s in arb_schedule(),
            start in arb_time(),
            job in "[a-z]{1,8}",
            step_secs in prop_oneof![Just(60i64), Just(300), Just(17)],
        ) {
            let offset = spread_offset(&job, &s);
            let longest = s.values().map(|r| r.interval.secs()).max().unwrap() as i64;
            // At most ~2000 ticks, so long schedules stay quick.
            let step = TimeDelta::seconds(step_secs.max(longest / 1000));
            let end = start + TimeDelta::seconds(2 * longest);
            let mut revs: Vec<RevisionMeta> = Vec::new();
            let mut pushes: BTreeMap<String, u64> = BTreeMap::new();
            let mut now = start;
            while now < end {
                let d = due(&s, offset, &revs, &FailureState::default(), now);
                if d.due_now {
                    if !revs.is_empty() {
                        // Every scheduled push after the first happens within
                        // one step of a slot of each of its tags.
                        for tag in &d.tags {
                            let i = s[tag].interval;
                            let slot = next_slot(i, offset, now - step).unwrap();
                            prop_assert!(slot <= now, "{} pushed off-slot at {}", tag, now);
                        }
                    }
                    for tag in &d.tags {
                        *pushes.entry(tag.clone()).or_default() += 1;
                    }
                    let tags: Vec<&str> = d.tags.iter().map(String::as_str).collect();
                    revs.push(meta(RevisionId::new_random(), now, &tags, Trust::Trusted));
                    let plan = expire(&s, &revs, now, &BTreeSet::new(), after_commit());
                    revs = apply(&revs, &plan);
                }
                for (tag, rule) in &s {
                    let newest = revs.iter().filter(|r| r.tags.contains(tag)).map(|r| r.timestamp).max();
                    let newest = newest.unwrap();
                    prop_assert!(now - newest <= TimeDelta::seconds(rule.interval.secs() as i64) + step);
                }
                now += step;
            }
            for (tag, rule) in &s {
                let most = 2 * longest as u64 / rule.interval.secs() + 2;
                prop_assert!(pushes[tag] <= most, "{} pushed {} times, at most {} expected", tag, pushes[tag], most);
            }
        }
    }
}
