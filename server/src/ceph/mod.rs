//! The server's binding of Ceph's librados and librbd C APIs: what the
//! pool store (issue 36, docs/DESIGN.md "Ceph pool store") stands on.
//!
//! - Loaded at run time (`loader.rs`, `ffi.rs`): `librados.so.2` and
//!   `librbd.so.1` are opened on first use, so a server on a filesystem
//!   store starts on a host without Ceph; a missing library is
//!   [`LoadError`] with the package to install.
//! - [`CephError`] (`error.rs`): operation, object and errno, with kinds
//!   (`is_not_found`, `is_busy`, `is_compare_failed`, `is_blocklisted`).
//! - [`Cluster`] and [`IoCtx`] (`cluster.rs`): a client instance, its
//!   address, monitor commands and the blocklist; `Send + Sync`.
//! - Objects (`object.rs`), atomic [`WriteOp`]s (`write_op.rs`), locks
//!   (`lock.rs`), images and snapshots (`rbd.rs`).
//! - [`LeaseKeeper`] (`lease_keeper.rs`): a job's lease on a lock and an
//!   epoch xattr, deciding with `backy_common::lease`.
//!
//! Every call blocks until the cluster answers: from async code, call
//! through `tokio::task::spawn_blocking`.

mod cluster;
mod error;
mod ffi;
mod lease_keeper;
mod loader;
mod lock;
pub mod mon;
mod object;
mod rbd;
mod write_op;

pub use cluster::{Cluster, ClusterConfig, IoCtx};
pub use error::{errno_name, CephError, EBLOCKLISTED};
pub use lease_keeper::{same_instance, KeeperError, LeaseKeeper, EPOCH_XATTR, HOLDER_XATTR, LEASE_LOCK};
pub use loader::LoadError;
pub use lock::{LockInfo, LockRequest, Locker};
pub use object::{ObjectStat, OmapPage};
pub use rbd::{features, DiffExtent, Image, Snapshot, Watcher, JOB_IMAGE_FEATURES};
pub use write_op::{WriteOp, XattrCmp};

/// Loads librados and librbd now (they load on first use otherwise): a
/// pool store's start-up check, so a missing library fails there with its
/// remedy rather than at the first job.
pub fn load() -> Result<(), LoadError> {
    ffi::rados()?;
    ffi::rbd()?;
    Ok(())
}
