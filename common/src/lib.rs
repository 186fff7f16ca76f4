//! backy's model: the types and pure logic both `backy-server` and
//! `backy-client` need. No sockets, no async runtime, no process spawning;
//! the only I/O is through `std::io::Read`/`Write` handed in by the caller,
//! except [`writeback`], a writeback hint for files the caller opened,
//! which both edges use.

pub mod access;
pub mod allocator;
pub mod block_proof;
pub mod blockset;
pub mod bwlimit;
pub mod checksum;
pub mod config;
pub mod config_reference;
pub mod dedup_index;
pub mod encryption;
pub mod error;
pub mod escape;
pub mod fault;
pub mod framer;
pub mod fuzz_plan;
pub mod granules;
pub mod group_commit;
pub mod handover;
pub mod id;
pub mod instants;
pub mod job;
pub mod lease;
pub mod logging;
pub mod manifest;
pub mod nbd;
pub mod ondisk;
pub mod qemu;
pub mod qmp;
pub mod ranges;
pub mod rbd_diff;
pub mod replicate;
pub mod resume;
pub mod revision;
mod revision_fast;
pub mod rollback;
pub mod schedule;
pub mod scrub;
pub mod source;
pub mod space;
pub mod spec;
pub mod throttle;
pub mod token;
pub mod tracker_audit;
pub mod units;
pub mod writeback;

pub use error::{Error, ErrorKind, Reason, Result};
pub use id::RevisionId;
pub use job::JobName;

/// Default block size for digests: Ceph's default object size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4 << 20;
/// Largest data payload of one push or restore frame.
pub const MAX_FRAME_DATA: usize = 1 << 20;
/// Cap on any one gRPC message (a frame plus its envelope).
pub const MAX_MESSAGE_BYTES: usize = MAX_FRAME_DATA + (64 << 10);
