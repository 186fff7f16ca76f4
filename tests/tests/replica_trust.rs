//! Issue 28 ("Independent replica"): the real backy-server as a replica of
//! a hostile source, a test double speaking the source's side of the
//! protocol that lies: a local job's name, distrusted decoys dated later,
//! a revision dated in the year 9000, thousands of names. Nothing local is
//! deleted or converted, the bounds hold, and status and check say why.

mod support;

use backy_common::revision::{RevisionMeta, SourceInfo, Stats, StorageMode, Trust};
use backy_common::{RevisionId, DEFAULT_BLOCK_SIZE};
use backy_proto::backy_server::{Backy, BackyServer};
use backy_proto::restore_frame::Frame;
use backy_proto::*;
use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use support::*;
use tonic::{Request, Response, Status};

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

const SIZE: u64 = DEFAULT_BLOCK_SIZE as u64;

/// One revision the double lists, with its image if it can serve one.
#[derive(Clone)]
struct Rev {
    info: RevisionInfo,
    data: Option<Vec<u8>>,
}

impl Rev {
    /// As `status --json` shows it.
    fn id(&self) -> String {
        self.info.id.parse::<RevisionId>().unwrap().to_string()
    }
}

/// A valid revision (its image is one block of `fill`), or a decoy
/// (`trust` distrusted, no image).
fn rev(at: DateTime<Utc>, trust: Trust, fill: u8) -> Rev {
    let data = vec![fill; SIZE as usize];
    let digest = manifest_digest_after(None, SIZE, DEFAULT_BLOCK_SIZE, &[(0, &data)]);
    let meta = RevisionMeta {
        id: RevisionId::new_random(),
        timestamp: at,
        parent: None,
        size: SIZE,
        block_size: DEFAULT_BLOCK_SIZE,
        tags: ["daily".to_string()].into(),
        trust,
        verified_at: None,
        source: SourceInfo {
            kind: "file".into(),
            snapshot: String::new(),
            group: None,
        },
        stats: Stats::default(),
        manifest_digest: hex::encode(digest),
        storage: StorageMode::default(),
        locked_until: None,
        key_check: None,
    };
    Rev {
        info: RevisionInfo::from(&meta),
        data: (trust != Trust::Distrusted).then_some(data),
    }
}

/// What the double shows: job names and each job's revisions.
#[derive(Default)]
struct Listing {
    jobs: BTreeMap<String, Vec<Rev>>,
}

#[derive(Clone, Default)]
struct Liar(Arc<Mutex<Listing>>);

impl Liar {
    fn set(&self, jobs: Vec<(String, Vec<Rev>)>) {
        self.0.lock().unwrap().jobs = jobs.into_iter().collect();
    }
}

fn no<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not a source's call"))
}

#[tonic::async_trait]
impl Backy for Liar {
    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            protocol: PROTOCOL,
            min_client_protocol: 1,
            version: "liar".into(),
        }))
    }
    async fn plan(&self, _: Request<PlanRequest>) -> Result<Response<PlanReply>, Status> {
        no()
    }
    type ManifestStream = BoxStream<ManifestChunk>;
    async fn manifest(&self, _: Request<ManifestRequest>) -> Result<Response<Self::ManifestStream>, Status> {
        no()
    }
    async fn push(&self, _: Request<tonic::Streaming<PushFrame>>) -> Result<Response<PushReply>, Status> {
        no()
    }
    type PushExchangeStream = BoxStream<PushEvent>;
    async fn push_exchange(
        &self,
        _: Request<tonic::Streaming<PushFrame>>,
    ) -> Result<Response<Self::PushExchangeStream>, Status> {
        no()
    }
    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let job = req.into_inner().job;
        let listing = self.0.lock().unwrap();
        let revs = listing
            .jobs
            .get(&job)
            .ok_or_else(|| Status::not_found(format!("no job {job}")))?;
        Ok(Response::new(StatusReply {
            jobs: vec![JobStatus {
                job,
                revisions: revs.iter().map(|r| r.info.clone()).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }
    type StatusStreamStream = BoxStream<JobStatusPart>;
    /// The same listing as `status`, in parts (header, then revisions in
    /// chunks of two), as a protocol 3 source sends it.
    async fn status_stream(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<Self::StatusStreamStream>, Status> {
        let job = req.into_inner().job;
        let listing = self.0.lock().unwrap();
        let revs = listing
            .jobs
            .get(&job)
            .ok_or_else(|| Status::not_found(format!("no job {job}")))?;
        let header = JobStatus {
            job,
            ..Default::default()
        };
        let mut parts = vec![Ok(JobStatusPart {
            part: Some(job_status_part::Part::Header(header)),
        })];
        for chunk in revs.chunks(2) {
            parts.push(Ok(JobStatusPart {
                part: Some(job_status_part::Part::Revisions(RevisionChunk {
                    revisions: chunk.iter().map(|r| r.info.clone()).collect(),
                })),
            }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(parts))))
    }
    type JobsStream = BoxStream<JobSummary>;
    async fn jobs(&self, _: Request<JobsRequest>) -> Result<Response<Self::JobsStream>, Status> {
        let names: Vec<Result<JobSummary, Status>> = self
            .0
            .lock()
            .unwrap()
            .jobs
            .keys()
            .map(|job| {
                Ok(JobSummary {
                    job: job.clone(),
                    ..Default::default()
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(names))))
    }
    async fn read_granules(
        &self,
        _: Request<ReadGranulesRequest>,
    ) -> Result<Response<ReadGranulesReply>, Status> {
        Err(Status::unimplemented("a replica never reads ranges"))
    }
    type RestoreStream = BoxStream<RestoreFrame>;
    async fn restore(&self, req: Request<RestoreRequest>) -> Result<Response<Self::RestoreStream>, Status> {
        let req = req.into_inner();
        let listing = self.0.lock().unwrap();
        let rev = listing
            .jobs
            .get(&req.job)
            .and_then(|revs| {
                revs.iter()
                    .find(|r| r.info.id.parse::<RevisionId>().ok() == req.revision.parse().ok())
            })
            .cloned()
            .ok_or_else(|| Status::not_found("no such revision"))?;
        let data = rev
            .data
            .ok_or_else(|| Status::failed_precondition("distrusted"))?;
        // Frames of 1 MiB: what a message may carry.
        let mut frames = vec![Frame::Begin(rev.info.clone())];
        frames.extend(data.chunks(1 << 20).enumerate().map(|(i, c)| {
            Frame::Data(DataRange {
                offset: (i as u64) << 20,
                data: c.to_vec(),
            })
        }));
        frames.push(Frame::End(RestoreEnd { bytes_sent: SIZE }));
        let frames: Vec<Result<RestoreFrame, Status>> = frames
            .into_iter()
            .map(|f| Ok(RestoreFrame { frame: Some(f) }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(frames))))
    }
    type VerifyStream = BoxStream<VerifyReport>;
    async fn verify(&self, _: Request<VerifyRequest>) -> Result<Response<Self::VerifyStream>, Status> {
        no()
    }
    async fn distrust(&self, _: Request<RevisionsRequest>) -> Result<Response<RevisionsReply>, Status> {
        no()
    }
    async fn tags(&self, _: Request<TagsRequest>) -> Result<Response<RevisionsReply>, Status> {
        no()
    }
    async fn forget(&self, _: Request<RevisionsRequest>) -> Result<Response<RevisionsReply>, Status> {
        no()
    }
    type AgentStream = BoxStream<AgentOrder>;
    async fn agent(
        &self,
        _: Request<tonic::Streaming<AgentReport>>,
    ) -> Result<Response<Self::AgentStream>, Status> {
        no()
    }
    async fn report_failure(&self, _: Request<FailureReport>) -> Result<Response<FailureReply>, Status> {
        no()
    }
    async fn commit_group(&self, _: Request<GroupCommit>) -> Result<Response<GroupCommitted>, Status> {
        no()
    }
}

/// Serves `liar` on a loopback port on its own runtime; returns its URL.
fn serve(liar: Liar, rt: &tokio::runtime::Runtime) -> String {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(BackyServer::new(liar).max_encoding_message_size(64 << 20))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// The files of `job` under the replica's base dir (names, sizes, hashes),
/// without the lock file and `latest`.
fn files_of(server: &Server, job: &str) -> Vec<(String, u64, String)> {
    let mut all = server.snapshot_tree();
    all.retain(|(p, _, _)| {
        p.starts_with(&format!("{job}/")) && !p.ends_with(".lock") && !p.ends_with("latest")
    });
    all
}

fn ids(revs: &[Value]) -> Vec<String> {
    revs.iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Reloads the replica (it looks at its source at once) and waits for
/// the round's end.
fn next_round(replica: &Server) -> String {
    let mark = replica.log_mark();
    replica.hup();
    // Longer than `wait_log`'s deadline: a round over 3,000 names (before
    // the bound) took longer.
    let mut done = None;
    wait_for("a replication round", std::time::Duration::from_secs(120), || {
        done = replica
            .log_lines(mark)
            .into_iter()
            .find(|l| l.contains("replication round done"));
        done.is_some()
    });
    done.unwrap_or_default()
}

#[test]
fn a_hostile_source_cannot_take_over_delete_or_flood_the_replica() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let liar = Liar::default();
    let url = serve(liar.clone(), &rt);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("local1.img");
    make_image(&img, 8 * MIB, &[(0, 8 * MIB)]);
    let base = dir.path().join("replica");
    std::fs::create_dir_all(&base).unwrap();
    let replica = Server::start_config(
        &base,
        &format!(
            "listen: 127.0.0.1:0\nbase-dir: BASE\n\
             jobs:\n  local1: {{schedule: none, source: {{type: file, path: {}}}}}\n",
            img.display()
        ),
    );
    // The replica's own job, pushed three times by its hypervisor.
    for i in 0..3u8 {
        write_at(&img, 0, &[i + 1; 4096]);
        replica.client_ok(&["push", "local1", "--force"]);
    }
    let local = ids(&replica.revisions("local1"));
    assert_eq!(local.len(), 3);
    let local_files = files_of(&replica, "local1");

    // The source: the local job's name (one honest-looking revision, one
    // distrusted decoy an hour ahead), vm1 with two valid revisions, and
    // 3,000 more names.
    let now = Utc::now();
    let v1 = rev(now - Duration::hours(3), Trust::Trusted, 1);
    let v2 = rev(now - Duration::hours(2), Trust::Trusted, 2);
    let mut jobs = vec![
        (
            "local1".to_string(),
            vec![
                rev(now - Duration::minutes(30), Trust::Trusted, 7),
                rev(now + Duration::hours(1), Trust::Distrusted, 8),
            ],
        ),
        ("vm1".to_string(), vec![v1.clone(), v2.clone()]),
    ];
    jobs.extend((0..3000).map(|i| (format!("zz-spam-{i:04}"), vec![])));
    liar.set(jobs);
    let mut text = std::fs::read_to_string(&replica.config_path).unwrap();
    text.push_str(&format!(
        "replicate: {{source: '{url}', interval: 1h, jobs: ['*'], max-jobs: 50}}\n"
    ));
    std::fs::write(&replica.config_path, text).unwrap();
    let line = next_round(&replica);

    // The local job: untouched, still its own, the conflict named.
    assert_eq!(files_of(&replica, "local1"), local_files, "nothing local changed");
    assert!(line.contains("copied=2"), "v1 and v2 of vm1: {line}");
    write_at(&img, 0, &[9; 4096]);
    replica.client_ok(&["push", "local1", "--force"]);
    assert_eq!(
        replica.revisions("local1").len(),
        4,
        "the hypervisor's pushes still land"
    );
    let status = replica.status_json("local1");
    let why = status["jobs"][0]["replica"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        why.contains("local1 is a job of this server's own") && why.contains("not copied"),
        "{status}"
    );
    let check = replica.client(&["check", "local1"]);
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{out}");
    assert!(out.contains("a job of this server's own"), "{out}");
    let local_files = files_of(&replica, "local1");

    // The bound: at most max-jobs copies, the excess reported.
    let dirs = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    assert!(dirs <= 52, "{dirs} job directories");
    let all: Value = serde_json::from_str(&replica.client_ok(&["status", "--json"])).unwrap();
    let listed = all["jobs"].as_array().unwrap().len();
    assert!(listed <= 52, "{listed} status lines");
    assert!(
        replica
            .log_lines(0)
            .iter()
            .any(|l| l.contains("more than max-jobs (50)")),
        "the excess is reported"
    );
    assert_eq!(ids(&replica.revisions("vm1")), vec![v1.id(), v2.id()]);

    // The source expires v1 and v2 and lists a distrusted decoy dated
    // later, and a valid revision dated in the year 9000; the spam names
    // are gone.
    let decoy = rev(now - Duration::minutes(10), Trust::Distrusted, 3);
    let far: DateTime<Utc> = "9000-01-01T00:00:00Z".parse().unwrap();
    let y9000 = rev(far, Trust::Trusted, 4);
    liar.set(vec![
        (
            "local1".to_string(),
            vec![rev(now + Duration::hours(1), Trust::Distrusted, 8)],
        ),
        ("vm1".to_string(), vec![decoy.clone(), y9000.clone()]),
    ]);
    next_round(&replica);
    assert_eq!(
        ids(&replica.revisions("vm1")),
        vec![v1.id(), v2.id()],
        "neither a distrusted nor a future revision counts as newer"
    );
    let state = &replica.status_json("vm1")["jobs"][0]["replica"];
    let error = state["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("after this server's clock"), "{state}");
    let all: Value = serde_json::from_str(&replica.client_ok(&["status", "--json"])).unwrap();
    let names: Vec<&str> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("zz-spam-")),
        "jobs the source no longer lists, with nothing copied, are no longer listed: {names:?}"
    );

    // The replica distrusts its newest copy (as a scrub would); the source
    // lists only that revision, trusted there. The copy is fetched again
    // and verified; the older one goes only once a trusted newer copy is
    // here.
    replica.client_ok(&["distrust", "vm1", "-r", &v2.id()]);
    liar.set(vec![("vm1".to_string(), vec![v2.clone()])]);
    let line = next_round(&replica);
    assert!(line.contains("copied=1"), "{line}");
    let revs = replica.revisions("vm1");
    let trusted: Vec<String> = revs
        .iter()
        .filter(|r| r["trust"] != "distrusted")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(trusted, vec![v2.id()], "{revs:?}");
    let verified: Value =
        serde_json::from_str(&replica.client_ok(&["verify", "vm1", "-r", "all", "--json"])).unwrap();
    assert!(
        verified["revisions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["ok"] == true),
        "{verified}"
    );

    // After a restart: local1 is still the replica's own, untouched.
    let mut replica = replica;
    replica.restart();
    next_round(&replica);
    assert_eq!(files_of(&replica, "local1"), local_files, "nothing local changed");
    write_at(&img, 0, &[10; 4096]);
    replica.client_ok(&["push", "local1", "--force"]);
    assert_eq!(replica.revisions("local1").len(), 5);
}
