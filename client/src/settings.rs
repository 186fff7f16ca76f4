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

/// The server URL to use.
pub fn server_url(flag: Option<&str>, config: &ClientConfig) -> String {
    flag.or(config.server.as_deref())
        .map(str::to_string)
        .unwrap_or_else(|| format!("http://{DEFAULT_LISTEN}"))
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
        assert_eq!(server_url(Some("http://x:1"), &cfg), "http://x:1");
        assert_eq!(server_url(None, &cfg), "http://backup:6023");
        assert_eq!(
            server_url(None, &ClientConfig::default()),
            "http://127.0.0.1:6023"
        );
    }

    #[test]
    fn explicit_config_must_exist_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(Some(&dir.path().join("none.yaml"))).unwrap_err();
        assert!(e.message.starts_with("reading config"), "{}", e.message);
        let path = dir.path().join("client.yaml");
        std::fs::write(&path, "server: http://b:7\n").unwrap();
        assert_eq!(load(Some(&path)).unwrap().server.as_deref(), Some("http://b:7"));
        std::fs::write(&path, "sever: x\n").unwrap();
        assert!(load(Some(&path)).unwrap_err().message.contains("unknown field"));
    }
}
