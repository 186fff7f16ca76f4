//! A job's status with all its revisions, read from a server (by
//! `backy-client status JOB` and by a replica reading its source): through
//! `StatusStream`, which has no message limit, or through the one-message
//! `Status` of servers that predate it (protocol 2 and older answer
//! `StatusStream` with UNIMPLEMENTED).

use crate::connect::{status_error, Client};
use crate::job_status_part::Part;
use crate::{JobStatus, JobStatusPart, StatusRequest};
use backy_common::{Error, Result};
use tonic::Code;

/// The status of `job` with every revision, oldest first.
pub async fn job_status(client: &mut Client, job: &str) -> Result<JobStatus> {
    let request = StatusRequest { job: job.to_string() };
    let mut stream = match client.status_stream(request.clone()).await {
        Ok(reply) => reply.into_inner(),
        Err(s) if s.code() == Code::Unimplemented => return one_message(client, request).await,
        Err(s) => return Err(status_error(s)),
    };
    let mut parts = Assembly::new(job);
    while let Some(part) = stream.message().await.map_err(status_error)? {
        parts.add(part)?;
    }
    parts.finish()
}

/// From a server of protocol 2 or older.
async fn one_message(client: &mut Client, request: StatusRequest) -> Result<JobStatus> {
    let job = request.job.clone();
    let reply = client.status(request).await.map_err(|s| {
        let too_large = matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted);
        let e = status_error(s);
        if too_large {
            e.context(format!(
                "the server predates StatusStream (protocol {}) and sends a job's revisions in one \
                 message, which job {job} outgrew: upgrade backy-server",
                crate::STATUS_STREAM_PROTOCOL
            ))
        } else {
            e
        }
    })?;
    reply
        .into_inner()
        .jobs
        .into_iter()
        .find(|j| j.job == job)
        .ok_or_else(|| Error::not_found(format!("the server did not list job {job}")))
}

/// A job's status put together from its parts, checking their order.
struct Assembly<'a> {
    job: &'a str,
    status: Option<JobStatus>,
}

impl<'a> Assembly<'a> {
    fn new(job: &'a str) -> Self {
        Assembly { job, status: None }
    }

    fn add(&mut self, part: JobStatusPart) -> Result<()> {
        let broken = |what: &str| {
            Error::internal(format!(
                "the server's status stream of job {} is broken: {what}",
                self.job
            ))
        };
        match (part.part, &mut self.status) {
            (Some(Part::Header(header)), None) if header.job == self.job && header.revisions.is_empty() => {
                self.status = Some(header);
            }
            (Some(Part::Header(_)), _) => return Err(broken("an unexpected job header")),
            (Some(Part::Revisions(chunk)), Some(status)) => status.revisions.extend(chunk.revisions),
            (Some(Part::Revisions(_)), None) => return Err(broken("revisions before the job's header")),
            (None, _) => return Err(broken("an empty part")),
        }
        Ok(())
    }

    fn finish(self) -> Result<JobStatus> {
        self.status
            .ok_or_else(|| Error::not_found(format!("the server did not list job {}", self.job)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RevisionChunk, RevisionInfo};

    fn header(job: &str) -> JobStatusPart {
        JobStatusPart {
            part: Some(Part::Header(JobStatus {
                job: job.into(),
                ..Default::default()
            })),
        }
    }

    fn chunk(ids: &[&str]) -> JobStatusPart {
        JobStatusPart {
            part: Some(Part::Revisions(RevisionChunk {
                revisions: ids
                    .iter()
                    .map(|id| RevisionInfo {
                        id: id.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            })),
        }
    }

    #[test]
    fn parts_make_the_job_in_order_and_out_of_order_parts_are_refused() {
        let mut a = Assembly::new("vm1");
        for part in [header("vm1"), chunk(&["a", "b"]), chunk(&[]), chunk(&["c"])] {
            a.add(part).unwrap();
        }
        let status = a.finish().unwrap();
        let ids: Vec<&str> = status.revisions.iter().map(|r| r.id.as_str()).collect();
        assert_eq!((status.job.as_str(), ids), ("vm1", vec!["a", "b", "c"]));

        let mut a = Assembly::new("vm1");
        let e = a.add(chunk(&["a"])).unwrap_err();
        assert_eq!(
            e.message,
            "the server's status stream of job vm1 is broken: revisions before the job's header"
        );
        assert!(Assembly::new("vm1").add(header("vm2")).is_err(), "another job");
        let mut a = Assembly::new("vm1");
        a.add(header("vm1")).unwrap();
        assert!(a.add(header("vm1")).is_err(), "a second header");
        let e = Assembly::new("vm1").finish().unwrap_err();
        assert_eq!(e.message, "the server did not list job vm1");
    }
}
