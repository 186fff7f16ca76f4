//! Pull replication's worker (docs/DESIGN.md, "Replication"): on a
//! replica, the rounds that copy a source's revisions. What it remembers
//! (the jobs it copies, what each replica fetched) is
//! [`crate::replication`]. Copies land in the filesystem store
//! (`copy.rs`) or in a Ceph pool store (`pool_copy.rs`).

mod copy;
mod pool_copy;
mod round;

pub use round::spawn;
