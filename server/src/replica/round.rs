//! The replica's worker: every `interval` (and on a reload) it reads the
//! source's list of each copied job, fetches what it owes oldest first,
//! mirrors the source's expiry where the job has no schedule here, and
//! records how far behind each copy is.

use super::copy::{copy, Copied};
use crate::job::Txn;
use crate::state::Server;
use crate::storage::JobDir;
use backy_common::access::Need;
use backy_common::config::ReplicateConfig;
use backy_common::replicate::{self, JobPattern, Listed, Owed};
use backy_common::revision::RevisionMeta;
use backy_common::{Error, JobName, Result, RevisionId};
use backy_proto::connect::{connect_within, status_error, Client, CredentialFiles, Credentials};
use backy_proto::{JobsRequest, RevisionInfo};
use chrono::Utc;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Starts the worker; it idles while the configuration has no
/// `replicate:` and follows reloads.
pub fn spawn(server: Arc<Server>) {
    tokio::spawn(async move {
        loop {
            let config = server.config();
            let wait = match &config.replicate {
                Some(r) => {
                    round(&server, r).await;
                    r.interval.as_duration()
                }
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = server.replication.wake.notified() => {}
            }
        }
    });
}

/// What one round did, for its log line.
#[derive(Default)]
struct Tally {
    jobs: usize,
    copied: usize,
    received: u64,
    failed: usize,
    expired: usize,
    /// A source named another owner for a job: the configuration follows
    /// once, at the round's end.
    owners_changed: bool,
}

async fn round(server: &Arc<Server>, r: &ReplicateConfig) {
    let started = Instant::now();
    let mut tally = Tally::default();
    match connect(r).await {
        Err(e) => {
            tracing::error!(source = %r.source, "replication: {e}");
            for job in server.replication.copied(&server.config()) {
                server
                    .replication
                    .update(&job, |s| s.last_error = e.message.clone());
            }
            tally.failed = 1;
        }
        Ok(mut client) => match names(server, &mut client, r).await {
            Err(e) => {
                tracing::error!(source = %r.source, "replication: listing the source's jobs: {e}");
                tally.failed = 1;
            }
            Ok(names) => {
                for name in names {
                    tally.jobs += 1;
                    if let Some(why) = server.replication.refused(&server.config(), &name) {
                        // A job of this server's own: never converted.
                        tracing::error!(job = %name, source = %r.source, "replication: {why}");
                        server.replication.update(&name, |s| s.last_error = why.clone());
                        tally.failed += 1;
                        continue;
                    }
                    if let Err(e) = job_round(server, &client, &name, &mut tally).await {
                        tracing::error!(job = %name, source = %r.source, "replication: {e}");
                        server
                            .replication
                            .update(&name, |s| s.last_error = e.message.clone());
                        tally.failed += 1;
                    }
                }
            }
        },
    }
    if tally.owners_changed {
        server.replace_config((*server.config()).clone());
    }
    if let Err(e) = server.replication.save() {
        tracing::error!("replication: saving its state: {e}");
    }
    tracing::info!(
        source = %r.source,
        jobs = tally.jobs,
        copied = tally.copied,
        received = tally.received,
        expired = tally.expired,
        failed = tally.failed,
        "replication round done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

async fn connect(r: &ReplicateConfig) -> Result<Client> {
    let creds = Credentials::load(&CredentialFiles {
        token_file: r.token_file.as_deref(),
        ca: r.ca.as_deref(),
        cert: r.cert.as_deref(),
        key: r.key.as_deref(),
        tls_server_name: r.tls_server_name.as_deref(),
    })
    .map_err(|e| with_fix(e, r))?;
    connect_within(&r.source, &creds, Duration::from_secs(30)).await
}

/// A credential file this server's user may not read: the log line, status
/// and check then say which, and what to run (as `check-config` does).
fn with_fix(e: Error, r: &ReplicateConfig) -> Error {
    if e.kind != backy_common::ErrorKind::PermissionDenied {
        return e;
    }
    let files = [
        ("replica token file", &r.token_file, Need::Secret),
        ("replica CA certificate", &r.ca, Need::Public),
        ("replica client certificate", &r.cert, Need::Public),
        ("replica client key", &r.key, Need::Secret),
    ];
    let fix = files
        .into_iter()
        .find_map(|(what, path, need)| crate::access::denied(what, path.as_deref()?, need, None));
    match fix {
        Some(message) => Error { message, ..e },
        None => e,
    }
}

/// The jobs of this round: the names `r` lists, and the source's jobs its
/// prefixes match, no more than `max-jobs` (the excess is reported). Jobs
/// found in earlier rounds that the source no longer lists stay copies
/// while they hold revisions here (their copies are kept; the round says
/// the source no longer lists them) and are forgotten otherwise.
async fn names(server: &Arc<Server>, client: &mut Client, r: &ReplicateConfig) -> Result<Vec<JobName>> {
    let patterns = r.patterns()?;
    if patterns.iter().all(|p| matches!(p, JobPattern::Name(_))) {
        return Ok(replicate::select(&patterns, r.max_jobs, &[], &BTreeSet::new()).jobs);
    }
    let mut stream = client
        .jobs(JobsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut on_source = Vec::new();
    let mut seen = 0usize;
    while let Some(summary) = stream.message().await.map_err(status_error)? {
        seen += 1;
        // Names are checked only when a prefix matches them: a source's
        // other jobs are none of this server's business.
        if let Ok(name) = JobName::new(&summary.job) {
            if replicate::listed_by(&patterns, &name) {
                on_source.push(name);
            }
        }
    }
    let known = server.replication.known();
    let selection = replicate::select(&patterns, r.max_jobs, &on_source, &known);
    if selection.excess > 0 {
        tracing::warn!(
            source = %r.source, listed = seen, excess = selection.excess,
            "replication: the source lists more than max-jobs ({}) jobs to copy: {} not copied",
            r.max_jobs, selection.excess
        );
    }
    let config = server.config();
    let mut jobs = selection.jobs;
    // Jobs of this server's own that a prefix matches are recorded too:
    // the records say they are refused (see `Replication::refused`).
    let new: Vec<JobName> = jobs.iter().filter(|n| !known.contains(*n)).cloned().collect();
    let changed = server.replication.found(&new);
    let mut forgotten = Vec::new();
    for name in &known {
        if jobs.contains(name) || !replicate::listed_by(&patterns, name) {
            continue;
        }
        let dir = JobDir::new(&config.base_dir, name.clone());
        let held = dir.revisions().map(|r| r.len()).unwrap_or(0);
        if held == 0 {
            server.replication.forget(name);
            forgotten.push(name.clone());
        } else {
            server.replication.update(name, |s| {
                s.last_error =
                    format!("the source no longer lists job {name}; the {held} copies here are kept")
            });
        }
    }
    if changed || !forgotten.is_empty() {
        // New or forgotten jobs: the configuration follows (directories,
        // status).
        let mut next = (*config).clone();
        // Only those the configuration does not list (its owner is no
        // configuration).
        next.jobs.retain(|n, j| {
            let listed = backy_common::config::JobConfig {
                copy_owner: None,
                ..j.clone()
            } != Default::default();
            !forgotten.contains(n) || listed
        });
        server.replace_config(next);
        for name in new
            .iter()
            .filter(|n| server.replication.copies(&server.config(), n))
        {
            if let Err(e) = JobDir::new(&config.base_dir, name.clone()).ensure() {
                tracing::error!(job = %name, "replication: {e}");
            }
        }
    }
    let config = server.config();
    jobs.retain(|n| {
        server.replication.copies(&config, n) || server.replication.refused(&config, n).is_some()
    });
    Ok(jobs)
}

fn listed(m: &RevisionMeta) -> Listed {
    Listed {
        id: m.id,
        timestamp: m.timestamp,
        trust: m.trust,
        tags: m.tags.clone(),
    }
}

/// One job: what the source lists, the copies it owes, its expiry.
async fn job_round(server: &Arc<Server>, client: &Client, name: &JobName, tally: &mut Tally) -> Result<()> {
    // Streamed: no message limit (proto/src/listing.rs).
    let status = backy_proto::listing::job_status(&mut client.clone(), name.as_str()).await?;
    // Who pushes the job there may read and restore its copy here.
    let owner = crate::replication::jobs::owner_of(&status.client);
    tally.owners_changed |= server.replication.owned(name, owner);
    let infos: Vec<RevisionInfo> = status.revisions;
    let at = Utc::now();
    let metas: Vec<RevisionMeta> = infos.iter().map(RevisionMeta::try_from).collect::<Result<_>>()?;
    let source: Vec<Listed> = metas.iter().map(listed).collect();
    let by_id: HashMap<RevisionId, RevisionInfo> = metas.iter().map(|m| m.id).zip(infos).collect();
    let job = server.job(name.as_str())?;
    let config = server.config();
    let job_config = config.job(name).ok();
    let owed = match job_config.and_then(|j| config.schedule_of(j)) {
        Some(schedule) => Owed::Newer {
            schedule,
            lock: job_config
                .and_then(|j| config.retention_lock_of(j))
                .map(|l| l.as_duration()),
        },
        None => Owed::All,
    };
    let here = held(server, &job).await?;
    // Before anything lands: this directory holds a copy (see
    // `crate::replication::jobs::own_job`). A pool has no job directory.
    if server.pool().is_none() {
        let source_url = config.replicate.as_ref().map_or("", |r| r.source.as_str());
        crate::replication::jobs::mark_copy(job.path(), source_url)?;
    }
    let disordered = replicate::out_of_order(&source, &here, owed, at);
    let transfers = replicate::plan(&source, &here, owed, at);
    let handle = tokio::runtime::Handle::current();
    let mut failure = None;
    for transfer in transfers {
        let Some(info) = by_id.get(&transfer.id).cloned() else {
            continue;
        };
        let (s, c, j, h) = (server.clone(), client.clone(), job.clone(), handle.clone());
        let copied = tokio::task::spawn_blocking(move || match s.pool() {
            Some(pool) => super::pool_copy::copy(&s, &pool, c, &h, j.name(), transfer, &info),
            None => copy(&s, c, &h, &j, transfer, &info),
        })
        .await
        .map_err(|e| Error::internal(format!("a copy panicked: {e}")))?;
        match copied {
            Ok(Copied {
                meta,
                received,
                resumed_at,
            }) => {
                tracing::info!(
                    job = %name, rev = %meta.id, base = ?transfer.base.map(|b| b.short()),
                    received, resumed_at, "copied revision"
                );
                tally.copied += 1;
                tally.received += received;
            }
            Err(e) => {
                // Later revisions wait: they would be copied on a base this
                // one should have been, and the order is the guarantee.
                failure = Some(e.context(format!("copying revision {}", transfer.id)));
                break;
            }
        }
    }
    let here = held(server, &job).await?;
    // Not on a pool yet: its copies stay until removed there.
    if owed == Owed::All && failure.is_none() && server.pool().is_none() {
        tally.expired += mirror_expiry(server, &job, &source, &here, at).await?;
    }
    if failure.is_none() && !disordered.is_empty() {
        // Named, but bounded: a source may list thousands.
        const NAMED: usize = 5;
        let mut list: Vec<String> = disordered.iter().take(NAMED).map(|id| id.to_string()).collect();
        if disordered.len() > NAMED {
            list.push(format!("and {} more", disordered.len() - NAMED));
        }
        failure = Some(Error::precondition(format!(
            "{} revisions not copied, out of the source's order (dated before this replica's \
             newest copy, or held here under another date): {}",
            disordered.len(),
            list.join(", ")
        )));
    }
    let here = held(server, &job).await?;
    let lag = replicate::lag(&source, &here, owed, at);
    server.replication.listed(name, at, &lag);
    match failure {
        Some(e) => Err(e),
        None => {
            server.replication.update(name, |s| s.last_error.clear());
            Ok(())
        }
    }
}

/// The revisions this server holds of `job`.
async fn held(server: &Arc<Server>, job: &JobDir) -> Result<Vec<Listed>> {
    let (s, j) = (server.clone(), job.clone());
    tokio::task::spawn_blocking(move || match s.pool() {
        Some(pool) => Ok(pool.revisions(j.name())?.iter().map(listed).collect()),
        None => Ok(s.jobs.indexed(&j)?.revisions.iter().map(listed).collect()),
    })
    .await
    .map_err(|e| Error::internal(format!("reading the index panicked: {e}")))?
}

/// Removes the copies the source expired (see
/// [`replicate::mirror_expiry`]), but none in use; returns how many.
async fn mirror_expiry(
    server: &Arc<Server>,
    job: &JobDir,
    source: &[Listed],
    here: &[Listed],
    now: chrono::DateTime<Utc>,
) -> Result<usize> {
    let doomed = replicate::mirror_expiry(source, here, now);
    if doomed.is_empty() {
        return Ok(0);
    }
    let (s, j, source) = (server.clone(), job.clone(), source.to_vec());
    tokio::task::spawn_blocking(move || -> Result<usize> {
        let mut txn = Txn::begin(&s.jobs, &j)?;
        let protected = txn.protected();
        // Decided again from what is on disk now, not from the listing the
        // round began with.
        let here: Vec<Listed> = txn.revisions().iter().map(listed).collect();
        // Copies under this server's retention lock stay (Txn::delete would
        // refuse them, and with them the rest).
        let doomed: Vec<RevisionId> = replicate::mirror_expiry(&source, &here, now)
            .into_iter()
            .filter(|id| !protected.contains(id))
            .filter(|id| txn.get(id).and_then(|m| m.locked_at(now)).is_none())
            .collect();
        txn.delete(&doomed)?;
        for id in &doomed {
            tracing::info!(job = %j.name(), rev = %id, "replication: deleted revision (expired on the source)");
        }
        txn.point_latest("latest");
        Ok(doomed.len())
    })
    .await
    .map_err(|e| Error::internal(format!("mirrored expiry panicked: {e}")))?
}
