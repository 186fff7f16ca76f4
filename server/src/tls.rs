//! TLS settings of the server, and the start-up checks on secret files.

use anyhow::{bail, Context};
use backy_common::config::ServerConfig;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Refuses a secret file others may read (mode o+r).
pub fn refuse_world_readable(path: &Path, what: &str) -> anyhow::Result<()> {
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {what} {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        bail!(
            "{what} {} is world-readable (mode {:04o}): run chmod o-rwx on it",
            path.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

/// The TLS acceptor settings, or `None` for (validated) loopback plaintext.
/// Also refuses a world-readable config holding token hashes.
pub fn server_tls(config: &ServerConfig, config_path: &Path) -> anyhow::Result<Option<ServerTlsConfig>> {
    if config.clients.values().any(|c| c.token_hash.is_some()) {
        refuse_world_readable(config_path, "config file with token hashes")?;
    }
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    refuse_world_readable(&tls.key, "TLS key")?;
    let read = |p: &Path, what: &str| {
        std::fs::read(p).with_context(|| format!("reading TLS {what} {}", p.display()))
    };
    let cert = read(&tls.cert, "certificate")?;
    let key = read(&tls.key, "key")?;
    for (bytes, what, path) in [(&cert, "CERTIFICATE", &tls.cert), (&key, "PRIVATE KEY", &tls.key)] {
        if !String::from_utf8_lossy(bytes).contains(&format!("{what}-----")) {
            bail!("{} is not a PEM file with a {what}", path.display());
        }
    }
    let mut out = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &tls.client_ca {
        out = out.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(Some(out))
}
