//! Pull replication (docs/DESIGN.md, "Replication"). On a replica: the
//! worker that copies a source's revisions, and what `status` says of the
//! copies. On a source: the record of what each replica fetched.

mod copy;
pub mod fetched;
mod round;
pub mod state;

pub use fetched::FetchLog;
pub use round::spawn;
pub use state::Replication;
