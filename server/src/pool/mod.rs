//! The Ceph pool store's backend (issue 36, docs/DESIGN.md "Ceph pool
//! store"): jobs, revision records and manifests in a RADOS pool (or
//! namespace), one RBD image per job and one snapshot per revision, on the
//! server's binding (`crate::ceph`). The server calls it through
//! `crate::pool_serve` (push, status, restore); `crate::job::Txn` does not
//! know it yet.
//!
//! - `names.rs`: the objects and keys of the pool layout;
//! - `store.rs`: [`PoolStore`]: open, jobs, records, manifests, reads,
//!   a cut push's head writes (step 2);
//! - `parts.rs`: manifests in objects of at most 4 MiB, checked on read;
//! - `blocks.rs`: a push's block digests from the bytes as they pass;
//! - `tool.rs`: `rbd import-diff` fed by a `DiffWriter`;
//! - `push.rs`: [`PoolPush`]: a push's stream, checks and commit;
//! - `delete.rs`: deletion with its journal, orphan removal;
//! - `space.rs`: what a job takes in the pool, as `rbd du` counts it;
//! - `handovers.rs`: the operator's hand-over requests (`backy.handovers`);
//! - `fence.rs`: blocklisting a job's previous holder and its writers;
//! - `error.rs`: [`PoolError`], by kind.
//!
//! Every call blocks on the cluster: async callers use `spawn_blocking`.

mod blocks;
mod delete;
mod error;
mod fence;
mod handovers;
pub mod names;
mod parts;
mod push;
mod space;
mod store;
mod tool;

pub use error::{PoolError, Result};
pub use handovers::Stored as StoredHandover;
pub use parts::part_count;
pub use push::{PoolPush, PoolSealed};
pub use space::{JobSpace, SnapshotSpace};
pub use store::{PoolConfig, PoolStore, RevisionReader};
pub use tool::RbdTool;

// A push moves to a blocking thread and back: everything it holds is Send.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<PoolStore>();
    send::<PoolPush>();
    send::<PoolSealed>();
    send::<RevisionReader>();
};
