//! An in-memory stand-in for `backy-server` that follows the protocol
//! closely enough to run the client's push, restore and status flows over
//! real gRPC in unit tests. It keeps images in memory; the real server's
//! storage, scheduling and expiry are not modelled.

use crate::connect::{connect, Client};
use backy_common::checksum::StreamChecksum;
use backy_common::manifest::{digest, Manifest};
use backy_common::ranges::is_all_zero;
use backy_common::{RevisionId, MAX_FRAME_DATA};
use backy_proto::backy_server::{Backy, BackyServer};
use backy_proto::*;
use std::sync::{Arc, Mutex, MutexGuard};
use tonic::{Request, Response, Status, Streaming};

pub struct Rev {
    pub info: RevisionInfo,
    pub image: Vec<u8>,
}

/// Knobs and recorded state of the fake.
pub struct State {
    pub due: bool,
    pub block_size: u32,
    /// Returned to the next push after its begin frame.
    pub fail_push: Option<Status>,
    /// Flip a byte in the first data frame of restores.
    pub corrupt_restore: bool,
    /// Stop restores before the end marker.
    pub truncate_restore: bool,
    pub revisions: Vec<Rev>,
    /// Data frames of the last push: (offset, len).
    pub last_push_data: Vec<(u64, usize)>,
}

#[derive(Clone)]
pub struct Fake(pub Arc<Mutex<State>>);

type Stream<T> = tokio_stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

impl Fake {
    /// Starts the fake on a free local port and connects a client to it.
    pub async fn start(block_size: u32) -> (Fake, Client) {
        let fake = Fake(Arc::new(Mutex::new(State {
            due: true,
            block_size,
            fail_push: None,
            corrupt_restore: false,
            truncate_restore: false,
            revisions: Vec::new(),
            last_push_data: Vec::new(),
        })));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = BackyServer::new(fake.clone())
            .max_decoding_message_size(backy_common::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(backy_common::MAX_MESSAGE_BYTES);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let client = connect(&format!("http://{addr}")).await.unwrap();
        (fake, client)
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn find(&self, spec: &str) -> Result<(RevisionInfo, Vec<u8>), Status> {
        let st = self.state();
        let n = st.revisions.len();
        let index = match spec {
            "latest" => n.checked_sub(1),
            s if s.len() < 4 => s.parse::<usize>().ok().and_then(|k| n.checked_sub(k + 1)),
            s => st.revisions.iter().position(|r| r.info.id == s),
        };
        let rev = index
            .and_then(|i| st.revisions.get(i))
            .ok_or_else(|| Status::not_found(format!("no revision matches {spec:?}")))?;
        Ok((rev.info.clone(), rev.image.clone()))
    }
}

fn manifest_of(image: &[u8], bs: u32) -> Manifest {
    let mut m = Manifest::zeroed(image.len() as u64, bs).unwrap();
    for (i, b) in image.chunks(bs as usize).enumerate() {
        m.set(i as u64, digest(b)).unwrap();
    }
    m
}

#[tonic::async_trait]
impl Backy for Fake {
    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            protocol: backy_proto::PROTOCOL,
            min_client_protocol: backy_proto::MIN_CLIENT_PROTOCOL,
            version: backy_proto::VERSION.into(),
        }))
    }

    async fn plan(&self, request: Request<PlanRequest>) -> Result<Response<PlanReply>, Status> {
        let req = request.into_inner();
        if req.job != "vm1" {
            return Err(Status::not_found(format!("unknown job {}", req.job)));
        }
        let st = self.state();
        let parent = st.revisions.last().map(|r| &r.info);
        Ok(Response::new(PlanReply {
            due: st.due || req.force,
            tags: if req.tags.is_empty() {
                vec!["daily".into()]
            } else {
                req.tags
            },
            parent_id: parent.map(|p| p.id.clone()).unwrap_or_default(),
            parent_snapshot: String::new(),
            parent_size: parent.map(|p| p.size).unwrap_or(0),
            block_size: st.block_size,
            new_id: RevisionId::new_random().uuid().to_string(),
            reason: "test".into(),
            ..PlanReply::default()
        }))
    }

    type ManifestStream = Stream<ManifestChunk>;

    async fn manifest(
        &self,
        request: Request<ManifestRequest>,
    ) -> Result<Response<Self::ManifestStream>, Status> {
        let (info, image) = self.find(&request.into_inner().revision)?;
        let bytes = manifest_of(&image, info.block_size).encode();
        let mut chunks: Vec<Result<ManifestChunk, Status>> = bytes
            .chunks(100)
            .map(|c| {
                Ok(ManifestChunk {
                    revision: None,
                    data: c.to_vec(),
                })
            })
            .collect();
        if let Some(Ok(first)) = chunks.first_mut() {
            first.revision = Some(info);
        }
        Ok(Response::new(tokio_stream::iter(chunks)))
    }

    async fn push(&self, request: Request<Streaming<PushFrame>>) -> Result<Response<PushReply>, Status> {
        use push_frame::Frame;
        let mut stream = request.into_inner();
        let Some(PushFrame {
            frame: Some(Frame::Begin(begin)),
        }) = stream.message().await?
        else {
            return Err(Status::failed_precondition("push must start with begin"));
        };
        if let Some(status) = self.state().fail_push.take() {
            return Err(status);
        }
        let mut image = if begin.parent_id.is_empty() {
            Vec::new()
        } else {
            self.find(&begin.parent_id)?.1
        };
        image.resize(begin.size as usize, 0);
        let mut checksum = StreamChecksum::new();
        let mut data_frames = Vec::new();
        let end = loop {
            let frame = stream
                .message()
                .await?
                .ok_or_else(|| Status::data_loss("push ended without end marker"))?;
            match frame.frame {
                Some(Frame::Data(d)) => {
                    let o = d.offset as usize;
                    let slot = image
                        .get_mut(o..o + d.data.len())
                        .ok_or_else(|| Status::invalid_argument("data beyond size"))?;
                    slot.copy_from_slice(&d.data);
                    checksum.data(d.offset, &d.data);
                    data_frames.push((d.offset, d.data.len()));
                }
                Some(Frame::Zero(z)) => {
                    let o = z.offset as usize;
                    image
                        .get_mut(o..o + z.length as usize)
                        .ok_or_else(|| Status::invalid_argument("zeros beyond size"))?
                        .fill(0);
                    checksum.zero(z.offset, z.length);
                }
                Some(Frame::End(end)) => break end,
                Some(Frame::Keepalive(_)) => {}
                _ => return Err(Status::failed_precondition("unexpected frame")),
            }
        };
        if end.stream_checksum != checksum.finish() {
            return Err(Status::data_loss("stream checksum mismatch"));
        }
        let manifest = manifest_of(&image, begin.block_size);
        if end.manifest_digest != manifest.file_digest() {
            return Err(Status::data_loss("manifest digest mismatch"));
        }
        let id: RevisionId = begin
            .rev_id
            .parse()
            .map_err(|_| Status::invalid_argument("bad id"))?;
        let info = RevisionInfo {
            id: begin.rev_id.clone(),
            short_id: id.short(),
            timestamp: Some(backy_proto::prost_types::Timestamp {
                seconds: 1_778_407_200,
                nanos: 0,
            }),
            parent_id: begin.parent_id,
            size: begin.size,
            block_size: begin.block_size,
            tags: begin.tags,
            trust: backy_proto::Trust::Trusted as i32,
            source_kind: begin.source_kind,
            bytes_received: data_frames.iter().map(|f| f.1 as u64).sum(),
            manifest_digest: hex::encode(manifest.file_digest()),
            storage: backy_proto::StorageMode::Reflink as i32,
            ..RevisionInfo::default()
        };
        let mut st = self.state();
        st.last_push_data = data_frames;
        st.revisions.push(Rev {
            info: info.clone(),
            image,
        });
        Ok(Response::new(PushReply {
            revision: Some(info),
            expired: Vec::new(),
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let st = self.state();
        Ok(Response::new(StatusReply {
            jobs: vec![JobStatus {
                job: "vm1".into(),
                revisions: st.revisions.iter().map(|r| r.info.clone()).collect(),
                storage: backy_proto::StorageMode::Reflink as i32,
                ..JobStatus::default()
            }],
        }))
    }

    type RestoreStream = Stream<RestoreFrame>;

    async fn restore(
        &self,
        request: Request<RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        use restore_frame::Frame;
        let (info, image) = self.find(&request.into_inner().revision)?;
        let (corrupt, truncate) = {
            let st = self.state();
            (st.corrupt_restore, st.truncate_restore)
        };
        let mut frames = vec![Frame::Begin(info.clone())];
        let mut sent = 0;
        for (i, block) in image.chunks(info.block_size as usize).enumerate() {
            let offset = i as u64 * info.block_size as u64;
            if is_all_zero(block) {
                frames.push(Frame::Zero(ZeroRange {
                    offset,
                    length: block.len() as u64,
                }));
                continue;
            }
            for (j, piece) in block.chunks(MAX_FRAME_DATA).enumerate() {
                let mut data = piece.to_vec();
                if corrupt && sent == 0 {
                    data[0] ^= 1;
                }
                sent += data.len() as u64;
                frames.push(Frame::Data(DataRange {
                    offset: offset + (j * MAX_FRAME_DATA) as u64,
                    data,
                }));
            }
        }
        if truncate {
            frames.pop();
        } else {
            frames.push(Frame::End(RestoreEnd { bytes_sent: sent }));
        }
        let items: Vec<_> = frames
            .into_iter()
            .map(|f| Ok(RestoreFrame { frame: Some(f) }))
            .collect();
        Ok(Response::new(tokio_stream::iter(items)))
    }

    type VerifyStream = Stream<VerifyReport>;

    async fn verify(&self, _: Request<VerifyRequest>) -> Result<Response<Self::VerifyStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn distrust(&self, _: Request<RevisionsRequest>) -> Result<Response<RevisionsReply>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn tags(&self, _: Request<TagsRequest>) -> Result<Response<RevisionsReply>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn forget(&self, _: Request<RevisionsRequest>) -> Result<Response<RevisionsReply>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type JobsStream = Stream<JobSummary>;

    async fn jobs(&self, _: Request<JobsRequest>) -> Result<Response<Self::JobsStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn report_failure(&self, _: Request<FailureReport>) -> Result<Response<FailureReply>, Status> {
        Ok(Response::new(FailureReply { failures: 1 }))
    }

    type AgentStream = Stream<AgentOrder>;

    async fn agent(&self, _: Request<Streaming<AgentReport>>) -> Result<Response<Self::AgentStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}
