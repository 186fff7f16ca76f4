//! Building `status` replies.

use crate::state::Server;
use backy_common::Result;
use backy_proto::{JobStatus, RevisionInfo, StatusReply, StatusRequest};

pub fn status(server: &Server, req: &StatusRequest) -> Result<StatusReply> {
    let config = server.config();
    let names: Vec<String> = if req.job.is_empty() {
        config.jobs.keys().map(|j| j.to_string()).collect()
    } else {
        vec![req.job.clone()]
    };
    let mut jobs = Vec::with_capacity(names.len());
    for name in names {
        let job = server.job(&name)?;
        let revs = job.revisions()?;
        let rt = server.job_runtime(job.name());
        let storage = revs.last().map(|r| r.storage).unwrap_or(server.storage_mode);
        let job_cfg = config.job(job.name())?;
        let sched = config.schedule_of(job_cfg).map(|s| {
            let sla = backy_common::schedule::sla(s, &revs, chrono::Utc::now(), job.since());
            (sla, crate::schedule::due_state(server, &job, s, &revs))
        });
        jobs.push(JobStatus {
            job: name,
            revisions: revs.iter().map(RevisionInfo::from).collect(),
            storage: storage.as_str().to_string(),
            allocated_bytes: job.allocated_bytes(),
            running: rt.push.is_some(),
            sla_ok: sched.as_ref().is_none_or(|(sla, _)| sla.ok),
            sla_overdue_secs: sched.as_ref().map_or(0, |(sla, _)| sla.overdue.as_secs() as i64),
            next_due: sched
                .as_ref()
                .and_then(|(_, due)| due.next_due)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
            next_tags: sched
                .as_ref()
                .map(|(_, due)| due.next_tags.iter().cloned().collect())
                .unwrap_or_default(),
            failures: rt.failures,
            schedule: job_cfg
                .schedule
                .clone()
                .unwrap_or_else(|| backy_common::config::NO_SCHEDULE.to_string()),
            last_error: rt.last_error,
        });
    }
    Ok(StatusReply { jobs })
}
