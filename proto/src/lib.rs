//! The wire protocol between `backy-client` and `backy-server`, and the
//! conversions between wire messages and the domain types of
//! `backy-common` (kept here, once, so neither side repeats them).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("backy.v1");
}

mod convert;

pub use v1::*;
