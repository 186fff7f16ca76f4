//! Where the client finds its server: `--server`/`BACKY_SERVER`, else the
//! config file, else the default address.

use backy_common::config::{ClientConfig, DEFAULT_CLIENT_CONFIG, DEFAULT_LISTEN};
use backy_common::{Error, Result};
use std::path::Path;

/// Loads the config file: the one given (which must exist), else the
/// default one when present.
pub fn load(explicit: Option<&Path>) -> Result<ClientConfig> {
    let path = match explicit {
        Some(p) => p,
        None if Path::new(DEFAULT_CLIENT_CONFIG).exists() => Path::new(DEFAULT_CLIENT_CONFIG),
        None => return Ok(ClientConfig::default()),
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
    ClientConfig::from_yaml(&text, &path.display().to_string())
}

/// How to name the client config in messages: the file given, else the
/// default path (said to be absent when it is).
pub fn config_name(explicit: Option<&Path>) -> String {
    match explicit {
        Some(p) => p.display().to_string(),
        None if Path::new(DEFAULT_CLIENT_CONFIG).exists() => DEFAULT_CLIENT_CONFIG.to_string(),
        None => format!("{DEFAULT_CLIENT_CONFIG} (absent)"),
    }
}

/// The server URLs to try, in order: `--server`, else the config's
/// `server` (one or a list), else the default address.
pub fn server_urls(flag: Option<&str>, config: &ClientConfig) -> Vec<String> {
    match (flag, &config.server) {
        (Some(url), _) => vec![url.to_string()],
        (None, Some(servers)) => servers.urls().to_vec(),
        (None, None) => vec![format!("http://{DEFAULT_LISTEN}")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let cfg = ClientConfig {
            server: Some("http://backup:6023".into()),
            ..ClientConfig::default()
        };
        assert_eq!(server_urls(Some("http://x:1"), &cfg), ["http://x:1"]);
        assert_eq!(server_urls(None, &cfg), ["http://backup:6023"]);
        assert_eq!(
            server_urls(None, &ClientConfig::default()),
            ["http://127.0.0.1:6023"]
        );
    }

    #[test]
    fn explicit_config_must_exist_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(Some(&dir.path().join("none.yaml"))).unwrap_err();
        assert!(e.message.starts_with("reading config"), "{}", e.message);
        let path = dir.path().join("client.yaml");
        std::fs::write(&path, "server: http://b:7\n").unwrap();
        assert_eq!(load(Some(&path)).unwrap().server, Some("http://b:7".into()));
        std::fs::write(&path, "server: [\"http://a:7\", \"http://b:7\"]\n").unwrap();
        let cfg = load(Some(&path)).unwrap();
        assert_eq!(server_urls(None, &cfg), ["http://a:7", "http://b:7"]);
        std::fs::write(&path, "server: []\n").unwrap();
        assert!(load(Some(&path)).unwrap_err().message.contains("at least one"));
        std::fs::write(&path, "sever: x\n").unwrap();
        assert!(load(Some(&path)).unwrap_err().message.contains("unknown field"));
    }
}
