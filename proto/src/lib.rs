//! The wire protocol between `backy-client` and `backy-server`, and the
//! conversions between wire messages and the domain types of
//! `backy-common` (kept here, once, so neither side repeats them).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("backy.v1");
}

pub mod connect;
mod convert;
pub mod listing;

pub use convert::{
    datetime, error_detail, error_detail_to, error_of_detail, group_instant, model_audit, model_storage,
    redirect_of_detail, source_kind, source_kind_name, timestamp, wire_audit, wire_group, wire_storage,
};
pub use prost_types;
pub use v1::*;

/// This build's protocol version, raised with each extension (a client
/// uses what the server's allows).
/// 2: `PushExchange`, the granule exchange of changed blocks.
/// 3: `StatusStream`, status without a message limit.
/// 4: `RestoreRequest.granules`, rollback (delta restore); `ReadGranules`,
///    the NBD export's ranged reads.
/// 5: deduplicated transfer: `GranuleDigests.block_digest`,
///    `GranulesWanted.held`, `PlanReply.dedup`.
/// 6: client-side encryption's key check values: `PushBegin.key_check`,
///    `PlanReply.parent_key_check`, `RevisionInfo.key_check`; the change
///    tracker's audit (`PushEnd.audit`, `RevisionInfo.audit`) and group
///    instants (`PushBegin.group`, `RevisionInfo.group`), which an older
///    server drops (the revision is still right; only the record is lost).
/// 7: group commits: `PushBegin.hold` and `CommitGroup` (a group push
///    commits every disk or none).
pub const PROTOCOL: u32 = 7;
/// The first protocol whose servers take `PushExchange`; a client uses it
/// only with such a server, and pushes whole blocks through `Push` to older
/// ones.
pub const GRANULE_PROTOCOL: u32 = 2;
/// The first protocol whose servers take `StatusStream`; with older ones
/// a client asks `Status` (one message, which a large job outgrows).
pub const STATUS_STREAM_PROTOCOL: u32 = 3;
/// The first protocol whose servers honour `RestoreRequest.granules`; an
/// older server would send the whole image, so a client restores in full.
pub const ROLLBACK_PROTOCOL: u32 = 4;
/// The first protocol whose servers answer `ReadGranules` (the NBD export
/// needs it; there is no fallback).
pub const EXPORT_PROTOCOL: u32 = 4;
/// The first protocol whose servers answer `GranuleDigests.block_digest`
/// (deduplicated transfer); older ones would ignore it.
pub const DEDUP_PROTOCOL: u32 = 5;
/// The first protocol whose servers record `PushBegin.key_check`: an older
/// one would drop it and take an incremental push of another key, so an
/// encrypted push needs at least this.
pub const ENCRYPTION_PROTOCOL: u32 = 6;
/// The first protocol whose servers hold a group's revisions until
/// `CommitGroup`; a group push needs it (older ones would commit each disk
/// as it arrives).
pub const GROUP_COMMIT_PROTOCOL: u32 = 7;
/// The oldest client protocol a server of this build accepts from a
/// client that declares one.
pub const MIN_CLIENT_PROTOCOL: u32 = 1;
/// The oldest server protocol a client of this build works with.
pub const MIN_SERVER_PROTOCOL: u32 = 1;
/// Request metadata carrying the client's protocol version.
pub const PROTOCOL_HEADER: &str = "backy-protocol";
/// Agent response metadata naming the client identity the server took the
/// agent's session for (an agent may leave its name to the server).
pub const AGENT_HEADER: &str = "backy-agent";
/// Request metadata carrying the client's software version.
pub const VERSION_HEADER: &str = "backy-version";
/// This build's software version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    /// README names the protocol this build speaks and the oldest peers it
    /// works with (issue 29, item 11: it said 1 while servers reported 2).
    #[test]
    fn readme_names_this_protocol() {
        let readme = include_str!("../../README.md")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let said = format!(
            "This build speaks protocol {} (protocol 1 plus `PushExchange`, the granule exchange, \
             `StatusStream`, status without a message limit, `RestoreRequest.granules`, rollback, \
             `ReadGranules`, the export's ranged reads, `GranuleDigests.block_digest`, \
             deduplicated transfer, `PushBegin.key_check`, client-side encryption, `PushBegin.hold` and \
             `CommitGroup`, group pushes that commit every disk or none) and works with peers of protocol {} and newer",
            super::PROTOCOL,
            super::MIN_CLIENT_PROTOCOL.min(super::MIN_SERVER_PROTOCOL)
        );
        assert!(readme.contains(&said), "README lacks: {said}");
    }
}
