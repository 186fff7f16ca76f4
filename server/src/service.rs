//! The gRPC service: thin handlers that decode, validate frame order, and
//! hand the work to blocking code that knows nothing of gRPC.

use crate::audit;
use crate::auth::{self, Action, Caller, StreamLimiter};
use crate::executor::{Reserved, StreamExecutor};
use crate::push::Step;
use crate::state::Server;
use crate::storage::PushEnd;
use crate::text::clip;
use crate::wire::to_status;
use crate::work::Gate;
use backy_common::manifest::Digest;
use backy_common::{Error, Result};
use backy_proto::backy_server::Backy;
use backy_proto::push_frame::Frame;
use backy_proto::*;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// How many decoded frames may wait between network and disk.
const FRAMES_IN_FLIGHT: usize = 8;
/// Granule answers (and the final reply) waiting for the client.
const ANSWERS_IN_FLIGHT: usize = 16;

/// Set when dropped: a handler tonic drops because its client left.
#[derive(Default)]
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
/// How long a client may take to close its stream after the end frame.
const END_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// The interceptor: checks the protocol, authenticates, stores the
/// caller; a failed authentication is a (rate-limited) audit line.
pub fn interceptor(
    server: Arc<Server>,
) -> impl FnMut(Request<()>) -> std::result::Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        auth::check_protocol(&req)?;
        let caller = auth::authenticate(&server.config(), &req).inspect_err(|status| {
            let peer = req
                .remote_addr()
                .map_or_else(|| "unknown".to_string(), |a| a.to_string());
            let who = audit::Refused {
                identity: "",
                peer: &peer,
                action: "authenticate",
                job: "",
            };
            audit::refused(&server, who, audit::Refusal::Authentication, &status.message());
        })?;
        if let Some(peer) = req.remote_addr() {
            let config = server.config();
            // Open mode (no identities): one local user, no per-identity cap.
            let identity = (!config.clients.is_empty()).then_some(caller.name.as_str());
            let cap = config.limits.connections_per_client as usize;
            if let Err(e) = server.connections.prove(peer, identity, cap) {
                let status = Status::resource_exhausted(e.to_string());
                let peer = peer.to_string();
                let who = audit::Refused {
                    identity: &caller.name,
                    peer: &peer,
                    action: "connect",
                    job: "",
                };
                audit::refused(&server, who, audit::Refusal::Permit, &status.message());
                return Err(status);
            }
        }
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

#[derive(Clone)]
pub struct Service {
    pub server: Arc<Server>,
    /// Open streams per identity (limits: streams-per-client).
    pub streams: Arc<StreamLimiter>,
    /// The threads long streams run on (limits: max-streams).
    pub executor: Arc<StreamExecutor>,
}

impl Service {
    pub fn new(server: Arc<Server>) -> Self {
        Service {
            server,
            streams: Arc::default(),
            executor: Arc::default(),
        }
    }

    /// The authenticated caller, if it may do `action` to `job`.
    /// `what` names the request in the audit line of a refusal.
    fn check<T>(
        &self,
        req: &Request<T>,
        job: &str,
        action: Action,
        what: &str,
    ) -> std::result::Result<Caller, Status> {
        let caller = auth::caller(req)?;
        if let Err(status) = auth::authorize(&self.server.config(), &caller, job, action, what) {
            audit::record(&caller, what, job, "", audit::Outcome::Failed(&status.message()));
            return Err(status);
        }
        Ok(caller)
    }

    /// Refuses `what` when revisions live in a Ceph pool, which does not
    /// do it yet (FAILED_PRECONDITION, one line).
    fn refuse_on_pool(&self, what: &str) -> std::result::Result<(), Status> {
        match self.server.pool() {
            Some(_) => Err(to_status(crate::pool_serve::unsupported(what))),
            None => Ok(()),
        }
    }

    /// A stream permit of `caller`, counted as an open stream of `kind`;
    /// a refusal is audited.
    fn permit(&self, caller: &Caller, kind: &'static str) -> std::result::Result<Permit, Status> {
        let limit = self.server.config().limits.streams_per_client;
        let limit = self.streams.acquire(caller, limit).inspect_err(|status| {
            let who = audit::Refused {
                identity: &caller.name,
                peer: &caller.peer,
                action: kind,
                job: "",
            };
            audit::refused(&self.server, who, audit::Refusal::Permit, &status.message());
        })?;
        Ok(Permit {
            _limit: limit,
            _active: self.server.metrics.stream(kind),
        })
    }

    /// `job`, or with none every job `caller` may see, decided before
    /// anything is read.
    fn visible(&self, caller: &Caller, job: String) -> Vec<String> {
        if !job.is_empty() {
            return vec![job];
        }
        let config = self.server.config();
        config
            .jobs
            .keys()
            .filter(|name| auth::may_see(&config, caller, name, Action::Read))
            .map(ToString::to_string)
            .collect()
    }

    /// A thread of the stream executor for a long stream of `kind`,
    /// reserved before the stream opens: refused with RESOURCE_EXHAUSTED at
    /// the bound, and the refusal audited like a refused permit.
    fn reserve(&self, caller: &Caller, kind: &'static str) -> std::result::Result<Reserved, Status> {
        let limit = self.server.config().limits.max_streams as usize;
        self.executor
            .reserve(limit)
            .map_err(to_status)
            .inspect_err(|status| {
                let who = audit::Refused {
                    identity: &caller.name,
                    peer: &caller.peer,
                    action: kind,
                    job: "",
                };
                audit::refused(&self.server, who, audit::Refusal::Permit, &status.message());
            })
    }

    /// `forget` or `distrust` (`name`): both need the right to remove,
    /// run `change` on the job's transaction, and audit what they did.
    async fn remove_or_distrust(
        &self,
        req: Request<RevisionsRequest>,
        name: &str,
        change: fn(
            &Server,
            &crate::storage::JobDir,
            &str,
            crate::revisions::Apply,
        ) -> Result<Vec<backy_common::revision::RevisionMeta>>,
        on_pool: fn(
            &Server,
            &crate::pool_serve::PoolBackend,
            &str,
            &str,
            crate::revisions::Apply,
        ) -> Result<Vec<backy_common::revision::RevisionMeta>>,
    ) -> std::result::Result<Response<RevisionsReply>, Status> {
        let action = if req.get_ref().dry_run {
            format!("{name} --dry-run")
        } else {
            name.to_string()
        };
        let caller = self.check(&req, &req.get_ref().job, Action::Remove, &action)?;
        let server = self.server.clone();
        let req = req.into_inner();
        let (job, spec) = (req.job.clone(), req.revisions.clone());
        let result = blocking(move || match server.pool() {
            Some(pool) => {
                let changed = on_pool(&server, &pool, &req.job, &req.revisions, apply(req.dry_run));
                // The filesystem's index wakes agents on its own; a pool
                // job's change does it here (a forget may make it due).
                server.jobs.index.notify();
                changed
            }
            None => {
                let job = server.job(&req.job)?;
                change(&server, &job, &req.revisions, apply(req.dry_run))
            }
        })
        .await;
        audit_changed(&caller, &action, &job, &spec, &result);
        result.map(revisions_reply)
    }

    /// A push stream (`Push`, or `PushExchange` when `answers` is given:
    /// then granule digests are answered there), written by a blocking
    /// writer, up to the committed revision's reply.
    async fn receive_push(
        &self,
        req: Request<Streaming<PushFrame>>,
        answers: Option<mpsc::Sender<std::result::Result<PushEvent, Status>>>,
    ) -> std::result::Result<PushReply, Status> {
        let caller = auth::caller(&req)?;
        let _permit = self.permit(&caller, "push")?;
        let thread = self.reserve(&caller, "push")?;
        let idle = self.server.config().limits.idle_timeout.as_duration();
        let idle_error = || {
            tracing::warn!(
                identity = caller.name,
                "push stream idle for {}s: dropped",
                idle.as_secs()
            );
            Status::deadline_exceeded(format!(
                "push stream idle for {}s (limits: idle-timeout): dropped",
                idle.as_secs()
            ))
        };
        let mut stream = req.into_inner();
        let first = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| idle_error())?;
        let begin = match first? {
            Some(PushFrame {
                frame: Some(Frame::Begin(b)),
            }) => b,
            Some(_) => return Err(out_of_order("a push must start with a begin frame")),
            None => return Err(Status::invalid_argument("empty push stream")),
        };
        let job = begin.job.clone();
        let (action, what) = unscheduled_needs_remove(begin.allow_unscheduled, "push");
        if let Err(status) = auth::authorize(&self.server.config(), &caller, &job, action, what) {
            audit::record(
                &caller,
                what,
                &job,
                &begin.rev_id,
                audit::Outcome::Failed(&status.message()),
            );
            return Err(status);
        }
        let server = self.server.clone();
        let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
        // The outcome is recorded by the writer: this handler is dropped
        // when the client's connection goes away, which stops the writer's
        // block work (a commit's read-back) at the next block.
        let gone = SetOnDrop::default();
        let flag = gone.0.clone();
        let gate = Gate::new(
            server.work.clone(),
            caller.limit_key.clone(),
            Arc::new(move || flag.load(Ordering::Relaxed)),
        );
        let who = caller.clone();
        let exchange = answers.is_some();
        let answer = answers.map(|events| -> crate::push::Answer {
            Box::new(move |block, bitmap, held| {
                let wanted = GranulesWanted { block, bitmap, held };
                events
                    .blocking_send(Ok(PushEvent {
                        event: Some(push_event::Event::Wanted(wanted)),
                    }))
                    .map_err(|_| backy_common::Error::unavailable("the client stopped reading answers"))
            })
        });
        let writer = run(thread, move || {
            let (job, rev) = (begin.job.clone(), begin.rev_id.clone());
            let started = std::time::Instant::now();
            let result = match server.pool() {
                Some(pool) => crate::pool_serve::push(server.clone(), &pool, begin, rx, answer),
                None => crate::push::run(server.clone(), begin, rx, gate, answer, &who.name),
            };
            server.metrics.push_done(result.is_ok(), started.elapsed());
            if let Err(e) = &result {
                tracing::warn!(job, "push failed: {e}");
            }
            audit::result(&who, "push", &job, &rev, &result);
            // A held disk's outcome is its group commit's.
            if !result.as_ref().is_ok_and(|r| r.held) {
                server.record_push_outcome(&job, &rev, &result);
            }
            result
        })?;
        let mut protocol_error: Option<Status> = None;
        loop {
            let message = tokio::select! {
                m = tokio::time::timeout(idle, stream.message()) => m,
                // The writer stopped (it refused the begin frame, or failed):
                // its result says why, now, not after the client's silence.
                _ = tx.closed() => break,
            };
            let Ok(message) = message else {
                protocol_error = Some(idle_error());
                break;
            };
            let step = match message {
                Ok(Some(PushFrame {
                    frame: Some(Frame::Keepalive(_)),
                })) => continue,
                Ok(Some(PushFrame {
                    frame: Some(Frame::Data(d)),
                })) => {
                    self.server.metrics.received(d.data.len());
                    Step::Data(d.offset, d.data)
                }
                Ok(Some(PushFrame {
                    frame: Some(Frame::Zero(z)),
                })) => Step::Zero(z.offset, z.length),
                Ok(Some(PushFrame {
                    frame: Some(Frame::Granules(g)),
                })) => {
                    if !exchange {
                        protocol_error =
                            Some(out_of_order("granule digests belong in PushExchange, not Push"));
                        break;
                    }
                    let block_digest = match <Digest>::try_from(g.block_digest.as_slice()) {
                        Ok(d) => Some(d),
                        Err(_) if g.block_digest.is_empty() => None,
                        Err(_) => {
                            protocol_error = Some(Status::invalid_argument(format!(
                                "block digest of {} bytes: must be 32",
                                g.block_digest.len()
                            )));
                            break;
                        }
                    };
                    Step::Granules(g.block, g.digests, block_digest)
                }
                Ok(Some(PushFrame {
                    frame: Some(Frame::End(e)),
                })) => {
                    // The end frame must end the stream: check that before
                    // letting the writer commit.
                    match tokio::time::timeout(END_GRACE, stream.message()).await {
                        Ok(Ok(None)) => {}
                        Ok(Ok(Some(_))) => protocol_error = Some(out_of_order("frames after the end frame")),
                        Ok(Err(_)) | Err(_) => {
                            protocol_error = Some(Status::invalid_argument(
                                "push stream not closed after its end frame",
                            ))
                        }
                    }
                    if protocol_error.is_some() {
                        break;
                    }
                    let audit = e.audit.as_ref().map(backy_proto::model_audit);
                    if let Some(why) = audit.as_ref().and_then(|a| a.check().err()) {
                        protocol_error = Some(Status::invalid_argument(why.message));
                        break;
                    }
                    Step::End(PushEnd {
                        stream_checksum: e.stream_checksum,
                        manifest_digest: e.manifest_digest,
                        audit,
                    })
                }
                Ok(Some(PushFrame {
                    frame: Some(Frame::Begin(_)),
                })) => {
                    protocol_error = Some(out_of_order("a second begin frame"));
                    break;
                }
                Ok(Some(PushFrame { frame: None })) => {
                    protocol_error = Some(Status::invalid_argument("empty push frame"));
                    break;
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::warn!(job, "push stream broke: {status}");
                    // Transport-level refusals (e.g. a message over the size
                    // cap) keep their code; a vanished client gets nothing.
                    if matches!(
                        status.code(),
                        Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
                    ) {
                        protocol_error = Some(status);
                    }
                    break;
                }
            };
            let is_end = matches!(step, Step::End(_));
            if tx.send(step).await.is_err() || is_end {
                break; // the writer stopped (error) or has everything
            }
        }
        // Without an end step the writer keeps the partial revision for
        // resuming (the client went away) or discards it (abort).
        if let Some(p) = &protocol_error {
            let _ = tx.send(Step::Abort(p.message().to_string())).await;
        }
        drop(tx);
        let result = writer.await.map_err(|_| Status::internal("push worker failed"))?;
        if let Some(p) = protocol_error {
            return Err(p);
        }
        let crate::push::Received { meta, expired, .. } = result.map_err(to_status)?;
        // Tests: the reply lost after the commit, as a broken connection would.
        if backy_common::fault::mode("lose-reply") {
            return Err(Status::unavailable(
                "BACKY_FAULT: the reply to a committed push is lost",
            ));
        }
        Ok(PushReply {
            revision: Some(RevisionInfo::from(&meta)),
            expired: expired.iter().map(|id| id.uuid().to_string()).collect(),
        })
    }
}

/// One open stream: its caller's permit and its place in the metrics.
struct Permit {
    _limit: auth::StreamPermit,
    _active: crate::metrics::ActiveStream,
}

/// Runs a long stream's blocking work on its reserved executor thread.
fn run<T: Send + 'static>(
    thread: Reserved,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<crate::executor::Joined<T>, Status> {
    thread.spawn(work).map_err(to_status)
}

/// Runs blocking work off the async threads and maps its error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
        .map_err(to_status)
}

/// Relays a server stream to the response, dropping it when the client has
/// not taken a message for `idle` (a stalled reader): the producer then sees
/// its channel closed and stops, releasing its thread and stream permit.
fn stall_guarded<T: Send + 'static>(
    mut from: mpsc::Receiver<std::result::Result<T, Status>>,
    idle: std::time::Duration,
) -> ReceiverStream<std::result::Result<T, Status>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            // A caller that goes away while the producer works (a long
            // verify) is noticed now, not at the next message: dropping
            // `from` then tells the producer to stop.
            let item = tokio::select! {
                item = from.recv() => item,
                _ = tx.closed() => break,
            };
            let Some(item) = item else { break };
            match tokio::time::timeout(idle, tx.send(item)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break, // the client went away
                Err(_) => {
                    tracing::warn!("stream not read for {}s: dropped", idle.as_secs());
                    break;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

fn out_of_order(what: &str) -> Status {
    Status::invalid_argument(format!("push frames out of order: {what}"))
}

#[tonic::async_trait]
impl Backy for Service {
    async fn hello(&self, req: Request<HelloRequest>) -> std::result::Result<Response<HelloReply>, Status> {
        let req = req.into_inner();
        tracing::debug!(client_protocol = req.protocol, client_version = %crate::text::quoted(&req.version), "hello");
        Ok(Response::new(HelloReply {
            // Tests pose as older servers with these modes.
            protocol: if backy_common::fault::mode("protocol-0") {
                0
            } else if backy_common::fault::mode("protocol-1") {
                1
            } else if backy_common::fault::mode("protocol-2") {
                2
            } else {
                backy_proto::PROTOCOL
            },
            min_client_protocol: backy_proto::MIN_CLIENT_PROTOCOL,
            version: backy_proto::VERSION.to_string(),
        }))
    }

    async fn plan(&self, req: Request<PlanRequest>) -> std::result::Result<Response<PlanReply>, Status> {
        let (action, what) = unscheduled_needs_remove(req.get_ref().allow_unscheduled, "plan");
        self.check(&req, &req.get_ref().job, action, what)?;
        let server = self.server.clone();
        let req = req.into_inner();
        blocking(move || match server.pool() {
            Some(pool) => crate::pool_serve::plan(&server, &pool, &req),
            None => crate::plan::plan(&server, &req),
        })
        .await
        .map(Response::new)
    }

    type ManifestStream = BoxStream<ManifestChunk>;

    async fn manifest(
        &self,
        req: Request<ManifestRequest>,
    ) -> std::result::Result<Response<Self::ManifestStream>, Status> {
        let caller = self.check(&req, &req.get_ref().job, Action::Fetch, "manifest")?;
        let permit = self.permit(&caller, "manifest")?;
        let thread = self.reserve(&caller, "manifest")?;
        let server = self.server.clone();
        let req = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        if let Some(pool) = server.pool() {
            if req.resume {
                return Err(to_status(crate::pool_serve::unsupported("resuming a push")));
            }
            let (job_name, spec) = (req.job.clone(), req.revision.clone());
            let p = pool.clone();
            let resolved = blocking(move || p.resolve_request(&server, &req.job, &req.revision)).await;
            audit::result(&caller, "manifest", &job_name, &spec, &resolved);
            let (job, meta) = resolved?;
            run(thread, move || {
                let _permit = permit;
                crate::pool_serve::stream_manifest(&pool, &job, &meta, &tx)
            })?;
        } else if req.resume {
            // A partial revision's manifest is computed, not stored.
            let (info, manifest) = blocking(move || {
                let job = server.job(&req.job)?;
                crate::plan::resume_manifest(&server, &job, &req.revision)
            })
            .await?;
            run(thread, move || {
                let _permit = permit;
                crate::restore::send_manifest(info, &manifest, &tx)
            })?;
        } else {
            let (job_name, spec) = (req.job.clone(), req.revision.clone());
            let resolved = resolve_one(server, req.job, req.revision).await;
            audit::result(&caller, "manifest", &job_name, &spec, &resolved);
            let (job, meta) = resolved?;
            let server = self.server.clone();
            run(thread, move || {
                let _permit = permit;
                crate::restore::stream_manifest(&server, &job, &meta, &tx)
            })?;
        }
        let idle = self.server.config().limits.idle_timeout.as_duration();
        Ok(Response::new(Box::pin(stall_guarded(rx, idle))))
    }

    async fn push(
        &self,
        req: Request<Streaming<PushFrame>>,
    ) -> std::result::Result<Response<PushReply>, Status> {
        self.receive_push(req, None).await.map(Response::new)
    }

    type PushExchangeStream = BoxStream<PushEvent>;

    async fn push_exchange(
        &self,
        req: Request<Streaming<PushFrame>>,
    ) -> std::result::Result<Response<Self::PushExchangeStream>, Status> {
        // Answers wait here at most as many as a client asks ahead.
        let (tx, rx) = mpsc::channel(ANSWERS_IN_FLIGHT);
        let this = self.clone();
        tokio::spawn(async move {
            let answers = tx.clone();
            tokio::select! {
                result = this.receive_push(req, Some(answers)) => {
                    let event = result.map(|reply| PushEvent {
                        event: Some(push_event::Event::Done(reply)),
                    });
                    let _ = tx.send(event).await;
                }
                // The client went away: dropping the push stops its work
                // as a dropped `push` handler would.
                _ = tx.closed() => {}
            }
        });
        let idle = self.server.config().limits.idle_timeout.as_duration();
        Ok(Response::new(Box::pin(stall_guarded(rx, idle))))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> std::result::Result<Response<StatusReply>, Status> {
        let all = req.get_ref().job.is_empty();
        let caller = if all {
            auth::caller(&req)?
        } else {
            self.check(&req, &req.get_ref().job, Action::Read, "status")?
        };
        // All jobs (clients of protocol 1): as costly as a stream.
        let _permit = all.then(|| self.permit(&caller, "status")).transpose()?;
        let names = self.visible(&caller, req.into_inner().job);
        let server = self.server.clone();
        blocking(move || crate::status::of_jobs(&server, &names))
            .await
            .map(Response::new)
    }

    type StatusStreamStream = BoxStream<JobStatusPart>;

    async fn status_stream(
        &self,
        req: Request<StatusRequest>,
    ) -> std::result::Result<Response<Self::StatusStreamStream>, Status> {
        // Tests pose as a server of protocol 2, which lacks this call.
        if backy_common::fault::mode("protocol-2") {
            return Err(Status::unimplemented("BACKY_FAULT: no StatusStream (protocol 2)"));
        }
        let caller = if req.get_ref().job.is_empty() {
            auth::caller(&req)?
        } else {
            self.check(&req, &req.get_ref().job, Action::Read, "status")?
        };
        let permit = self.permit(&caller, "status")?;
        let thread = self.reserve(&caller, "status")?;
        let names = self.visible(&caller, req.into_inner().job);
        let server = self.server.clone();
        let (tx, rx) = mpsc::channel(4);
        run(thread, move || {
            let _permit = permit;
            let config = server.config();
            for name in names {
                let (header, entry) = match crate::status::header(&server, &config, &name) {
                    Ok(built) => built,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(to_status(e)));
                        return;
                    }
                };
                let parts = std::iter::once(job_status_part::Part::Header(header))
                    .chain(crate::status::chunks(&entry.revisions).map(job_status_part::Part::Revisions));
                for part in parts {
                    if tx.blocking_send(Ok(JobStatusPart { part: Some(part) })).is_err() {
                        return; // the caller went away
                    }
                }
            }
        })?;
        let idle = self.server.config().limits.idle_timeout.as_duration();
        Ok(Response::new(Box::pin(stall_guarded(rx, idle))))
    }

    type JobsStream = BoxStream<JobSummary>;

    async fn jobs(
        &self,
        req: Request<JobsRequest>,
    ) -> std::result::Result<Response<Self::JobsStream>, Status> {
        let caller = auth::caller(&req)?;
        let permit = self.permit(&caller, "jobs")?;
        let thread = self.reserve(&caller, "jobs")?;
        let server = self.server.clone();
        let (tx, rx) = mpsc::channel(64);
        run(thread, move || {
            let _permit = permit;
            let config = server.config();
            for name in config.jobs.keys() {
                if !auth::may_see(&config, &caller, name, Action::Read) {
                    continue;
                }
                let item = crate::status::summary(&server, &config, name).map_err(to_status);
                if tx.blocking_send(item).is_err() {
                    break; // the caller went away
                }
            }
        })?;
        let idle = self.server.config().limits.idle_timeout.as_duration();
        Ok(Response::new(Box::pin(stall_guarded(rx, idle))))
    }

    type RestoreStream = BoxStream<RestoreFrame>;

    async fn restore(
        &self,
        req: Request<RestoreRequest>,
    ) -> std::result::Result<Response<Self::RestoreStream>, Status> {
        let caller = self.check(&req, &req.get_ref().job, Action::Fetch, "restore")?;
        let permit = self.permit(&caller, "restore")?;
        let thread = self.reserve(&caller, "restore")?;
        let server = self.server.clone();
        let req = req.into_inner();
        let (job_name, spec, from) = (req.job.clone(), req.revision.clone(), req.from);
        if let Some(pool) = self.server.pool() {
            let p = pool.clone();
            let granules = req.granules.clone();
            let resolved = blocking(move || {
                let (job, meta) = p.resolve_request(&server, &req.job, &req.revision)?;
                let base = p.base(&job, &req.base)?;
                Ok((job, meta, base))
            })
            .await;
            audit::result(&caller, "restore", &job_name, &spec, &resolved);
            let (job, meta, base) = resolved?;
            let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
            let server = self.server.clone();
            let copy = caller.role == backy_common::config::Role::Replica;
            run(thread, move || {
                let _permit = permit;
                let started = std::time::Instant::now();
                let streamed = crate::pool_serve::stream_image(
                    &server,
                    &pool,
                    &job,
                    &meta,
                    crate::pool_serve::Relative {
                        base: base.as_ref(),
                        from,
                        granules: &granules,
                    },
                    tx,
                );
                if copy && matches!(streamed, Ok(true)) {
                    server.fetched.record(&job, &caller.name, meta.id);
                }
                let outcome = match &streamed {
                    Ok(true) => "completed",
                    Ok(false) => "cancelled",
                    Err(_) => "failed",
                };
                server.metrics.restore_done(outcome, started.elapsed());
                let rev = meta.id.to_string();
                match streamed {
                    Ok(true) => audit::record(&caller, "restore", job.as_str(), &rev, audit::Outcome::Ok),
                    Ok(false) => audit::record(
                        &caller,
                        "restore",
                        job.as_str(),
                        &rev,
                        audit::Outcome::Done("cancelled by the client"),
                    ),
                    Err(e) => {
                        audit::record(&caller, "restore", job.as_str(), &rev, audit::Outcome::Failed(&e))
                    }
                }
            })?;
            let idle = self.server.config().limits.idle_timeout.as_duration();
            return Ok(Response::new(Box::pin(stall_guarded(rx, idle))));
        }
        let granules = req.granules;
        let resolved = resolve_with_base(server, req.job, req.revision, req.base).await;
        let (job, meta, base) = resolved.inspect_err(|e| {
            audit::record(
                &caller,
                "restore",
                &job_name,
                &spec,
                audit::Outcome::Failed(&e.message()),
            )
        })?;
        let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
        let server = self.server.clone();
        run(thread, move || {
            let _permit = permit;
            let (name, rev) = (job.name().to_string(), meta.id.to_string());
            let started = std::time::Instant::now();
            let shared = server.clone();
            let copy =
                (caller.role == backy_common::config::Role::Replica).then(|| (job.name().clone(), meta.id));
            let streamed = crate::restore::stream_image(server, job, meta, base, from, granules, tx);
            if let (Ok(true), Some((job, id))) = (&streamed, copy) {
                shared.fetched.record(&job, &caller.name, id);
            }
            let outcome = match &streamed {
                Ok(true) => "completed",
                Ok(false) => "cancelled",
                Err(_) => "failed",
            };
            shared.metrics.restore_done(outcome, started.elapsed());
            match streamed {
                Ok(true) => audit::record(&caller, "restore", &name, &rev, audit::Outcome::Ok),
                Ok(false) => audit::record(
                    &caller,
                    "restore",
                    &name,
                    &rev,
                    audit::Outcome::Done("cancelled by the client"),
                ),
                Err(e) => audit::record(&caller, "restore", &name, &rev, audit::Outcome::Failed(&e)),
            }
        })?;
        let idle = self.server.config().limits.idle_timeout.as_duration();
        Ok(Response::new(Box::pin(stall_guarded(rx, idle))))
    }

    async fn read_granules(
        &self,
        req: Request<ReadGranulesRequest>,
    ) -> std::result::Result<Response<ReadGranulesReply>, Status> {
        // Refusals are audited; reads are not (an export makes thousands).
        self.check(&req, &req.get_ref().job, Action::Fetch, "read")?;
        let server = self.server.clone();
        let req = req.into_inner();
        let reply = blocking(move || match server.pool() {
            Some(pool) => crate::granule_read::read_pool(&server, &pool, &req),
            None => crate::granule_read::read(&server, &req),
        })
        .await?;
        Ok(Response::new(reply))
    }

    type VerifyStream = BoxStream<VerifyReport>;

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> std::result::Result<Response<Self::VerifyStream>, Status> {
        let caller = self.check(&req, &req.get_ref().job, Action::Append, "verify")?;
        let permit = self.permit(&caller, "verify")?;
        let thread = self.reserve(&caller, "verify")?;
        let server = self.server.clone();
        let req = req.into_inner();
        let (job_name, spec) = (req.job.clone(), req.revisions.clone());
        let (job, selected) = blocking(move || {
            let spec = if req.revisions.is_empty() {
                "latest"
            } else {
                &req.revisions
            };
            match server.pool() {
                Some(pool) => {
                    let (job, selected) = crate::pool_serve::verify::select(&server, &pool, &req.job, spec)?;
                    Ok((VerifyTarget::Pool(pool, job), selected))
                }
                None => {
                    let job = server.job(&req.job)?;
                    let selected = crate::revisions::select(&server, &job, spec)?;
                    Ok((VerifyTarget::Files(job), selected))
                }
            }
        })
        .await
        .inspect_err(|e| {
            audit::record(
                &caller,
                "verify",
                &job_name,
                &spec,
                audit::Outcome::Failed(&e.message()),
            )
        })?;
        let (tx, rx) = mpsc::channel(4);
        let server = self.server.clone();
        let closed = tx.clone();
        let gate = Gate::new(
            server.work.clone(),
            caller.limit_key.clone(),
            Arc::new(move || closed.is_closed()),
        );
        run(thread, move || {
            let _permit = permit;
            for meta in selected {
                let started = std::time::Instant::now();
                let on_block = |_| !tx.is_closed();
                let verified = match &job {
                    VerifyTarget::Files(job) => {
                        crate::revisions::verify(&server, job, &meta, &gate, on_block)
                    }
                    VerifyTarget::Pool(pool, job) => {
                        crate::pool_serve::verify::verify(&server, pool, job, &meta, &gate, on_block)
                    }
                };
                match &verified {
                    Ok(v) => server.metrics.verify_done(
                        Some(v.bad_blocks.len()),
                        v.bytes_checked,
                        started.elapsed(),
                    ),
                    Err(_) if tx.is_closed() => {}
                    Err(_) => server.metrics.verify_done(None, 0, started.elapsed()),
                }
                let rev = meta.id.to_string();
                match &verified {
                    Ok(v) if v.bad_blocks.is_empty() => {
                        audit::record(&caller, "verify", &job_name, &rev, audit::Outcome::Ok)
                    }
                    Ok(v) => audit::record(
                        &caller,
                        "verify",
                        &job_name,
                        &rev,
                        audit::Outcome::Done(&format!(
                            "distrusted: {} the manifest",
                            backy_common::units::blocks_not_matching(v.bad_blocks.len() as u64)
                        )),
                    ),
                    Err(e) => audit::record(&caller, "verify", &job_name, &rev, audit::Outcome::Failed(e)),
                }
                let report = match verified {
                    Ok(v) => VerifyReport {
                        ok: v.bad_blocks.is_empty(),
                        revision: Some(RevisionInfo::from(&v.meta)),
                        bytes_checked: v.bytes_checked,
                        bad_blocks: v.bad_blocks,
                        error: String::new(),
                    },
                    Err(e) if tx.is_closed() => {
                        tracing::info!(job = %job_name, rev = %meta.id, "{e}");
                        break;
                    }
                    Err(e) => VerifyReport {
                        ok: false,
                        revision: Some(RevisionInfo::from(&meta)),
                        bytes_checked: 0,
                        bad_blocks: Vec::new(),
                        error: e.message,
                    },
                };
                if tx.blocking_send(Ok(report)).is_err() {
                    break; // the caller went away; stop reading
                }
            }
        })?;
        let idle = self.server.config().limits.idle_timeout.as_duration();
        Ok(Response::new(Box::pin(stall_guarded(rx, idle))))
    }

    async fn distrust(
        &self,
        req: Request<RevisionsRequest>,
    ) -> std::result::Result<Response<RevisionsReply>, Status> {
        // A distrusted revision is no parent and no longer held as the
        // newest trusted one, so expiry may delete it: an operator's call.
        // Hypervisors report damage by `verify`, where the server checks.
        self.remove_or_distrust(
            req,
            "distrust",
            crate::revisions::distrust,
            crate::pool_serve::change::distrust,
        )
        .await
    }

    async fn tags(&self, req: Request<TagsRequest>) -> std::result::Result<Response<RevisionsReply>, Status> {
        use crate::revisions::TagAction;
        let caller = self.check(
            &req,
            &req.get_ref().job,
            tags_right(req.get_ref()),
            &tags_what(req.get_ref()),
        )?;
        let server = self.server.clone();
        let req = req.into_inner();
        let action = match tags_request::Action::try_from(req.action) {
            Ok(tags_request::Action::Set) => TagAction::Set,
            Ok(tags_request::Action::Add) => TagAction::Add,
            Ok(tags_request::Action::Remove) => TagAction::Remove,
            Ok(tags_request::Action::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "tag action {} is not one of set, add, remove",
                    req.action
                )))
            }
        };
        let (job, spec) = (req.job.clone(), req.revisions.clone());
        let what = format!(
            "tags {}{} {}",
            action.as_str(),
            if req.dry_run { " --dry-run" } else { "" },
            clip(&req.tags.join(","))
        );
        let result = blocking(move || match server.pool() {
            Some(pool) => crate::pool_serve::change::tags(&server, &pool, &req, action),
            None => {
                let job = server.job(&req.job)?;
                crate::revisions::tags(
                    &server,
                    &job,
                    &req.revisions,
                    action,
                    &req.tags,
                    req.allow_unscheduled,
                    apply(req.dry_run),
                )
            }
        })
        .await;
        audit_changed(&caller, &what, &job, &spec, &result);
        result.map(revisions_reply)
    }

    async fn forget(
        &self,
        req: Request<RevisionsRequest>,
    ) -> std::result::Result<Response<RevisionsReply>, Status> {
        self.remove_or_distrust(
            req,
            "forget",
            crate::revisions::forget,
            crate::pool_serve::change::forget,
        )
        .await
    }

    async fn report_failure(
        &self,
        req: Request<FailureReport>,
    ) -> std::result::Result<Response<FailureReply>, Status> {
        let caller = self.check(&req, &req.get_ref().job, Action::Append, "report-failure")?;
        let req = req.into_inner();
        let job = self.server.job(&req.job).map_err(to_status)?;
        audit::record(
            &caller,
            "report-failure",
            &req.job,
            &req.rev_id,
            audit::Outcome::Done(&req.error),
        );
        let rev: Option<backy_common::RevisionId> = req.rev_id.parse().ok();
        // The client failed after the commit (its reply was lost): the
        // backup exists, and counting it would warn and back off for nothing.
        if let Some(id) = rev.filter(|id| job.rev_path(id).exists()) {
            tracing::info!(
                job = %job.name(), rev = %id, error = %crate::text::quoted(&req.error),
                "ignoring the client's failure report: revision {} is committed",
                id.short()
            );
            let failures = self.server.jobs.activity.job_runtime(job.name()).failures;
            return Ok(Response::new(FailureReply { failures }));
        }
        let failures = self.server.record_client_failure(job.name(), rev, &req.error);
        tracing::warn!(
            job = %job.name(), failures, error = %crate::text::quoted(&req.error),
            "push failed on the client"
        );
        Ok(Response::new(FailureReply { failures }))
    }

    async fn commit_group(
        &self,
        req: Request<GroupCommit>,
    ) -> std::result::Result<Response<GroupCommitted>, Status> {
        let what = if req.get_ref().abort {
            "commit-group --abort"
        } else {
            "commit-group"
        };
        let caller = auth::caller(&req)?;
        self.refuse_on_pool("a group commit")?;
        let config = self.server.config();
        for m in &req.get_ref().members {
            if let Err(status) = auth::authorize(&config, &caller, &m.job, Action::Append, what) {
                audit::record(
                    &caller,
                    what,
                    &m.job,
                    &m.rev_id,
                    audit::Outcome::Failed(&status.message()),
                );
                return Err(status);
            }
        }
        let req = req.into_inner();
        let group = req
            .group
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("a group commit needs its group instant"))?;
        let group = backy_proto::group_instant(group).map_err(to_status)?;
        let members = req
            .members
            .iter()
            .map(|m| {
                let id = m
                    .rev_id
                    .parse()
                    .map_err(|e: Error| e.context(format!("job {}", m.job)))?;
                Ok((m.job.clone(), id))
            })
            .collect::<Result<Vec<_>>>()
            .map_err(to_status)?;
        let commit = crate::group::CommitRequest {
            group,
            members,
            abort: req.abort,
        };
        let (server, who) = (self.server.clone(), caller.name.clone());
        let result = blocking(move || crate::group::commit(&server, &commit, &who)).await;
        for m in &req.members {
            audit::result(&caller, what, &m.job, &m.rev_id, &result);
        }
        let (metas, expired) = result?;
        Ok(Response::new(GroupCommitted {
            revisions: metas.iter().map(RevisionInfo::from).collect(),
            expired: expired.iter().map(|id| id.uuid().to_string()).collect(),
        }))
    }

    type AgentStream = BoxStream<AgentOrder>;

    async fn agent(
        &self,
        req: Request<Streaming<AgentReport>>,
    ) -> std::result::Result<Response<Self::AgentStream>, Status> {
        let caller = auth::caller(&req)?;
        let permit = self.permit(&caller, "agent")?;
        let mut reports = req.into_inner();
        // Refused before the stream opens: the agent sees the refusal as
        // the call's status and backs off.
        let hello = crate::agent::hello(&caller, &mut reports).await?;
        let name = tonic::metadata::MetadataValue::try_from(hello.agent.as_str()).ok();
        let (tx, rx) = mpsc::channel(16);
        let server = self.server.clone();
        tokio::spawn(async move {
            let _permit = permit;
            crate::agent::serve(server, hello, reports, tx).await
        });
        let mut response = Response::new(Box::pin(ReceiverStream::new(rx)) as Self::AgentStream);
        if let Some(name) = name {
            response.metadata_mut().insert(backy_proto::AGENT_HEADER, name);
        }
        Ok(response)
    }
}

/// `--allow-unscheduled` lets a revision carry tags that the expiry after
/// the next commit removes, deleting a revision left without any: so it
/// needs the right to remove. The right and the request's name.
fn unscheduled_needs_remove(allow_unscheduled: bool, request: &'static str) -> (Action, &'static str) {
    match (allow_unscheduled, request) {
        (false, _) => (Action::Append, request),
        (true, "plan") => (Action::Remove, "plan --allow-unscheduled"),
        (true, _) => (Action::Remove, "push --allow-unscheduled"),
    }
}

/// Adding tags only adds; set (which replaces), remove and
/// `--allow-unscheduled` take tags away now or at the next expiry. Dry runs
/// need the same right, so they foretell the refusal too.
fn tags_right(req: &TagsRequest) -> Action {
    let adds = tags_request::Action::try_from(req.action) == Ok(tags_request::Action::Add);
    if adds && !req.allow_unscheduled {
        Action::Append
    } else {
        Action::Remove
    }
}

/// The request's name in a refusal and its audit line: `tags set --dry-run`.
fn tags_what(req: &TagsRequest) -> String {
    let action = match tags_request::Action::try_from(req.action) {
        Ok(tags_request::Action::Set) => "set",
        Ok(tags_request::Action::Add) => "add",
        Ok(tags_request::Action::Remove) => "remove",
        Ok(tags_request::Action::Unspecified) | Err(_) => "(unknown action)",
    };
    format!(
        "tags {action}{}{}",
        if req.allow_unscheduled {
            " --allow-unscheduled"
        } else {
            ""
        },
        if req.dry_run { " --dry-run" } else { "" }
    )
}

pub(crate) fn apply(dry_run: bool) -> crate::revisions::Apply {
    if dry_run {
        crate::revisions::Apply::DryRun
    } else {
        crate::revisions::Apply::Yes
    }
}

/// Where a verify reads: a job of the filesystem store, or of the pool.
enum VerifyTarget {
    Files(crate::storage::JobDir),
    Pool(Arc<crate::pool_serve::PoolBackend>, backy_common::JobName),
}

/// The job and the one revision `spec` names, resolved off the async
/// workers (manifest and restore both start here).
async fn resolve_one(
    server: Arc<Server>,
    job: String,
    spec: String,
) -> std::result::Result<(crate::storage::JobDir, backy_common::revision::RevisionMeta), Status> {
    let (job, meta, _) = resolve_with_base(server, job, spec, String::new()).await?;
    Ok((job, meta))
}

/// [`resolve_one`], and the base revision a replica holds (either id form).
async fn resolve_with_base(
    server: Arc<Server>,
    job: String,
    spec: String,
    base: String,
) -> std::result::Result<
    (
        crate::storage::JobDir,
        backy_common::revision::RevisionMeta,
        Option<backy_common::revision::RevisionMeta>,
    ),
    Status,
> {
    blocking(move || {
        let job = server.job(&job)?;
        let meta = crate::restore::resolve(&server, &job, &spec)?;
        if base.is_empty() {
            return Ok((job, meta, None));
        }
        let id: backy_common::RevisionId = base.parse().map_err(|e: Error| e.context("base"))?;
        let entry = server.jobs.indexed(&job)?;
        let base = entry
            .revisions
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!(
                    "job {}: base revision {id} no longer exists (ask without a base)",
                    job.name()
                ))
            })?;
        Ok((job, meta, Some(base)))
    })
    .await
}

/// Audits a request that changed (or, dry, would change) revisions: the
/// short ids it touched, or why it failed.
fn audit_changed(
    caller: &Caller,
    action: &str,
    job: &str,
    spec: &str,
    result: &std::result::Result<Vec<backy_common::revision::RevisionMeta>, Status>,
) {
    match result {
        Ok(metas) => {
            let ids: Vec<String> = metas.iter().map(|m| m.id.short()).collect();
            audit::record(
                caller,
                action,
                job,
                spec,
                audit::Outcome::Done(&format!("ok: {}", ids.join(","))),
            );
        }
        Err(status) => audit::record(
            caller,
            action,
            job,
            spec,
            audit::Outcome::Failed(&status.message()),
        ),
    }
}

fn revisions_reply(metas: Vec<backy_common::revision::RevisionMeta>) -> Response<RevisionsReply> {
    Response::new(RevisionsReply {
        revisions: metas.iter().map(RevisionInfo::from).collect(),
    })
}
