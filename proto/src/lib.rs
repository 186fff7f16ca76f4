//! The wire protocol between `backy-client` and `backy-server`.
//!
//! Only generated code lives here; validation and meaning live in
//! `backy-common`, the server and the client.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("backy.v1");
}

pub use v1::*;
