//! backy's client library: the flows `backy-client` runs (push, restore,
//! status, verify, agent) over a connection to `backy-server`, for the
//! binary, which adds argument parsing, output and exit codes, and for
//! tests that drive them against a real server. Progress goes through the
//! [`progress::Progress`] the caller injects.

pub mod agent;
pub mod audit;
pub mod bwlimit;
pub mod changed_ranges;
pub mod check;
pub mod encryption;
pub mod export;
pub mod frames;
pub mod group;
pub mod live_restore;
pub mod manifest;
pub mod nbd;
pub mod output;
pub mod progress;
pub mod push;
pub mod qmp;
pub mod restore;
pub mod revisions;
pub mod scan;
pub mod settings;
pub mod source;
pub mod source_check;
pub mod status;
pub mod summary;
pub mod view;

pub use backy_proto::connect;
