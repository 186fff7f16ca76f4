//! backy-server as a library: storage, schedules and the gRPC service, so
//! the binary stays a thin edge and tests can reach the parts.

pub mod plan;
pub mod push;
pub mod restore;
pub mod schedule;
pub mod service;
pub mod state;
pub mod status;
pub mod storage;
pub mod wire;

use anyhow::Context;
use backy_common::config::ServerConfig;
use backy_common::revision::StorageMode;
use backy_common::MAX_MESSAGE_BYTES;
use backy_proto::backy_server::BackyServer;
use state::Server;
use std::path::PathBuf;
use std::sync::Arc;

/// Cleans leftovers of every job, then serves until SIGINT/SIGTERM.
pub async fn serve(config: ServerConfig, mode: StorageMode, _config_path: PathBuf) -> anyhow::Result<()> {
    if mode == StorageMode::Copy {
        tracing::warn!(
            base_dir = %config.base_dir.display(),
            "storage: copy, not CoW: the filesystem cannot share extents (reflink), \
             so every revision costs its full data size; use btrfs, XFS (reflink=1) or ZFS"
        );
    }
    for name in config.jobs.keys() {
        let job = storage::JobDir::new(&config.base_dir, name.clone());
        job.ensure()?;
        for p in job.clean_leftovers()? {
            tracing::info!(job = %name, "removed leftover {}", p.display());
        }
        job.update_latest()?;
    }
    let addr: std::net::SocketAddr = config.listen.parse().context("listen address")?;
    let server = Arc::new(Server::new(config, mode));
    let service = BackyServer::new(service::Service {
        server: server.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!("listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown(),
        )
        .await
        .context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
