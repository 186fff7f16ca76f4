//! The client's bandwidth limit (`bwlimit` in client.yaml, `push
//! --bwlimit`): one [`Limiter`] per process, shared by every push it runs,
//! so the agent's concurrent pushes hold the one limit together. Senders
//! wait in their blocking reader threads, before a frame goes into the
//! request stream.

pub use backy_common::bwlimit::Limiter;
use backy_proto::push_frame::Frame;

/// The payload bytes of a push frame: what the limit counts.
pub fn frame_bytes(frame: &Frame) -> u64 {
    match frame {
        Frame::Data(d) => d.data.len() as u64,
        Frame::Granules(g) => (g.digests.len() + g.block_digest.len()) as u64,
        _ => 0,
    }
}
