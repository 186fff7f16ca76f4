//! Pull replication's worker (docs/DESIGN.md, "Replication"): on a
//! replica, the rounds that copy a source's revisions. What it remembers
//! (the jobs it copies, what each replica fetched) is
//! [`crate::replication`].

mod copy;
mod round;

pub use round::spawn;
