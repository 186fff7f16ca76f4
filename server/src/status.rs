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
        jobs.push(JobStatus {
            job: name,
            revisions: revs.iter().map(RevisionInfo::from).collect(),
            storage: storage.as_str().to_string(),
            allocated_bytes: job.allocated_bytes(),
            running: rt.push.is_some(),
            sla_ok: true,
            sla_overdue_secs: 0,
            next_due: String::new(),
            next_tags: Vec::new(),
            failures: rt.failures,
            schedule: config.job(job.name())?.schedule.clone().unwrap_or_default(),
            last_error: rt.last_error,
        });
    }
    Ok(StatusReply { jobs })
}
