//! Monitor commands the binding sends, as the JSON the monitor parses
//! (Ceph 16: `osd blocklist` with `blocklistop` add|rm, `addr` an entity
//! address, optional `expire` in seconds as a float).

use std::time::Duration;

/// `ceph osd blocklist add ADDR [EXPIRE]`.
pub fn blocklist_add(addr: &str, expire: Option<Duration>) -> String {
    let mut cmd = serde_json::json!({
        "prefix": "osd blocklist",
        "blocklistop": "add",
        "addr": addr,
    });
    if let Some(e) = expire {
        cmd["expire"] = serde_json::json!(e.as_secs_f64());
    }
    cmd.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocklist_add_is_the_monitors_json() {
        let parse = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
        assert_eq!(
            parse(blocklist_add("10.0.0.1:0/3141", None)),
            serde_json::json!({"prefix": "osd blocklist", "blocklistop": "add", "addr": "10.0.0.1:0/3141"})
        );
        assert_eq!(
            parse(blocklist_add(
                "10.0.0.1:0/3141",
                Some(Duration::from_millis(90_500))
            )),
            serde_json::json!({"prefix": "osd blocklist", "blocklistop": "add",
                               "addr": "10.0.0.1:0/3141", "expire": 90.5})
        );
        // Quotes in an address cannot break out of the string.
        assert_eq!(parse(blocklist_add("a\"b", None))["addr"], "a\"b");
    }
}
