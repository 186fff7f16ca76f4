//! TLS settings of the server, and the start-up checks on secret files.

use anyhow::{bail, Context};
use backy_common::access::Need;
use backy_common::config::ServerConfig;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Refuses a secret file that anyone but its owner may read, except by
/// the operator's `secrets-group`: mode 0600, or 0640 with that group.
pub fn check_secret_mode(path: &Path, what: &str, secrets_group: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| crate::access::io_error(e, what, path, Need::CheckedSecret, secrets_group))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        bail!(
            "{what} {} is world-readable (mode {mode:04o}): run chmod o-rwx on it",
            path.display()
        );
    }
    if mode & 0o070 == 0 {
        return Ok(());
    }
    let allowed = match secrets_group {
        Some(name) if mode & 0o070 == 0o040 => group_id(name)? == meta.gid(),
        _ => false,
    };
    if !allowed {
        bail!(
            "{what} {} is open to its group (mode {mode:04o}, gid {}): make it 0600, or 0640 \
             owned by the group named in secrets-group:",
            path.display(),
            meta.gid()
        );
    }
    Ok(())
}

/// The gid of group `name`, through NSS (`/etc/group`, LDAP, ...).
fn group_id(name: &str) -> anyhow::Result<u32> {
    let cname = std::ffi::CString::new(name).context("secrets-group: a group name has no NUL byte")?;
    let mut size = 4096;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: zeroed is a valid `group` (plain pointers and ints),
        // which getgrnam_r fills in.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, `buf.len()` is its
        // size, and `group` is read only while `buf` lives.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut group,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || found.is_null() {
            bail!("secrets-group: no group named {name:?} on this host");
        }
        return Ok(group.gr_gid);
    }
}

/// The TLS acceptor settings, or `None` for (validated) loopback plaintext.
/// Also refuses a config holding token hashes that others may read.
pub fn server_tls(config: &ServerConfig, config_path: &Path) -> anyhow::Result<Option<ServerTlsConfig>> {
    let group = config.secrets_group.as_deref();
    if config.clients.values().any(|c| c.token_hash.is_some()) {
        check_secret_mode(config_path, "config file with token hashes", group)?;
    }
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    check_secret_mode(&tls.key, "TLS key", group)?;
    // A refusal names the user, the file and what to run (start-up runs
    // as the service's user, which root's check-config cannot see).
    let read = |p: &Path, what: &str, need| {
        std::fs::read(p).map_err(|e| crate::access::io_error(e, &format!("TLS {what}"), p, need, group))
    };
    let cert = read(&tls.cert, "certificate", Need::Public)?;
    let key = read(&tls.key, "key", Need::CheckedSecret)?;
    for (bytes, what, path) in [(&cert, "CERTIFICATE", &tls.cert), (&key, "PRIVATE KEY", &tls.key)] {
        if !String::from_utf8_lossy(bytes).contains(&format!("{what}-----")) {
            bail!("{} is not a PEM file with a {what}", path.display());
        }
    }
    let mut out = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &tls.client_ca {
        out = out.client_ca_root(Certificate::from_pem(read(ca, "client CA", Need::Public)?));
    }
    Ok(Some(out))
}
