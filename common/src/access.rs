//! What to tell an operator when the server's user cannot open a file it
//! needs: pure decisions. The server (`server/src/access.rs`) asks the
//! kernel, as that user, which paths it may open, stats the one that
//! stopped it, and words the fix here (docs/DESIGN.md, "Packaging and
//! service units").

use std::path::{Path, PathBuf};

/// What the server does with a path, which decides the fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Reads it; anyone may (a certificate, a CA): mode 0644.
    Public,
    /// Reads it; only the service and its group may (a token, a client
    /// key): 0640 with the service's group.
    Secret,
    /// A secret whose mode the server checks at start (the TLS key, a
    /// config with token hashes): 0600, or 0640 only with the group
    /// named in `secrets-group:`.
    CheckedSecret,
    /// Creates files in it (`base-dir`): owned by the service's user.
    Store,
}

/// A file's owner, group (names) and permission bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub owner: String,
    pub group: String,
    pub mode: u32,
}

/// The user the server runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Who {
    pub name: String,
    /// The primary group.
    pub group: String,
    /// Every group of the user, the primary one included.
    pub groups: Vec<String>,
}

impl Who {
    fn is_in(&self, group: &str) -> bool {
        self.group == group || self.groups.iter().any(|g| g == group)
    }
}

/// Where the kernel stopped the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked<'a> {
    /// A directory on the way that the user may not enter.
    Dir(&'a Path, Facts),
    /// The path itself.
    Target(Facts),
}

/// One line: `WHAT PATH: user U cannot read it (owner:group mode): run
/// `FIX``, the fix in shell commands an operator can paste.
pub fn advice(
    what: &str,
    path: &Path,
    need: Need,
    blocked: &Blocked<'_>,
    who: &Who,
    secrets_group: Option<&str>,
) -> String {
    let p = path.display();
    let user = &who.name;
    let facts = |f: &Facts| format!("{}:{} {:04o}", f.owner, f.group, f.mode & 0o7777);
    match blocked {
        Blocked::Dir(dir, f) => {
            let d = dir.display();
            let fix = if who.is_in(&f.group) {
                format!("chmod g+x {d}")
            } else {
                format!("chmod o+x {d}")
            };
            format!(
                "{what} {p}: user {user} cannot enter {d} ({}): run `{fix}`",
                facts(f)
            )
        }
        Blocked::Target(f) => {
            let (verb, fix) = match need {
                Need::Public => ("read", format!("chmod 644 {p}")),
                Need::Secret | Need::CheckedSecret => {
                    let group = secrets_group.unwrap_or(&who.group);
                    let mut fix = format!("chgrp {group} {p}; chmod 640 {p}");
                    if !who.is_in(group) {
                        fix.push_str(&format!("; usermod -a -G {group} {user}"));
                    }
                    if need == Need::CheckedSecret && secrets_group.is_none() {
                        fix.push_str(&format!("` and set `secrets-group: {group}"));
                    }
                    ("read", fix)
                }
                Need::Store => ("write", format!("chown {user}:{} {p}", who.group)),
            };
            format!(
                "{what} {p}: user {user} cannot {verb} it ({}): run `{fix}`",
                facts(f)
            )
        }
    }
}

/// The directories above `path`, outermost first (`/`, `/etc`,
/// `/etc/backy` for `/etc/backy/server.key`): each must be enterable.
pub fn ancestors(path: &Path) -> Vec<&Path> {
    let mut out: Vec<&Path> = path
        .ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    out.reverse();
    out
}

/// The `[Service]` settings of a unit, reading `texts` (the unit file,
/// then its drop-ins) in the order systemd does: later ones win.
fn service_settings<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<(&'a str, &'a str)> {
    let mut out = Vec::new();
    for text in texts {
        let mut in_service = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_service = line == "[Service]";
            } else if in_service && !line.starts_with(['#', ';']) {
                if let Some((key, value)) = line.split_once('=') {
                    out.push((key.trim(), value.trim()));
                }
            }
        }
    }
    out
}

/// The user a systemd unit runs its service as: the last `User=`. `None`:
/// root (no `User=`, or one reset by an empty `User=`).
pub fn unit_user<'a>(texts: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut user = None;
    for (key, value) in service_settings(texts) {
        if key == "User" {
            user = (!value.is_empty() && value != "root").then(|| value.to_string());
        }
    }
    user
}

/// What a unit's sandbox does to the files its service sees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// `ProtectSystem=strict`: everything read-only but `read_write`.
    pub strict: bool,
    pub read_write: Vec<PathBuf>,
    /// `ProtectHome=`: `yes`/`tmpfs` hide /home, /root and /run/user,
    /// `read-only` keeps them from being written.
    pub home: Option<String>,
    /// `PrivateTmp=yes`: /tmp and /var/tmp are the unit's own, empty.
    pub private_tmp: bool,
}

fn yes(value: &str) -> bool {
    matches!(value, "yes" | "true" | "on" | "1")
}

/// The sandbox settings of a unit (`texts` as for [`unit_user`]).
pub fn unit_sandbox<'a>(texts: impl IntoIterator<Item = &'a str>) -> Sandbox {
    let mut sandbox = Sandbox::default();
    for (key, value) in service_settings(texts) {
        match key {
            "ProtectSystem" => sandbox.strict = value == "strict",
            // An empty assignment resets the list; "-" and "+" are flags.
            "ReadWritePaths" if value.is_empty() => sandbox.read_write.clear(),
            "ReadWritePaths" => sandbox.read_write.extend(
                value
                    .split_whitespace()
                    .map(|p| PathBuf::from(p.trim_start_matches(['-', '+']))),
            ),
            "ProtectHome" => {
                sandbox.home = match value {
                    "read-only" | "tmpfs" => Some(value.to_string()),
                    v if yes(v) => Some("yes".to_string()),
                    _ => None,
                }
            }
            "PrivateTmp" => sandbox.private_tmp = yes(value),
            _ => {}
        }
    }
    sandbox
}

/// Why the unit's sandbox keeps the server from using `path` as `need`
/// says, with the fix; `None` when it does not.
pub fn sandbox_refusal(sandbox: &Sandbox, what: &str, path: &Path, need: Need) -> Option<String> {
    let p = path.display();
    let under = |dirs: &[&str]| dirs.iter().find(|d| path.starts_with(d)).map(|d| d.to_string());
    if let Some(home) = &sandbox.home {
        if let Some(dir) = under(&["/home", "/root", "/run/user"]) {
            if home != "read-only" || need == Need::Store {
                return Some(format!(
                    "{what} {p}: the unit hides {dir} (ProtectHome={home}): move it, e.g. to {}",
                    if need == Need::Store {
                        "/srv/backy"
                    } else {
                        "/etc/backy"
                    }
                ));
            }
        }
    }
    if sandbox.private_tmp && under(&["/tmp", "/var/tmp"]).is_some() {
        return Some(format!(
            "{what} {p}: the unit gives the server a /tmp of its own (PrivateTmp=yes): move it, e.g. to {}",
            if need == Need::Store {
                "/srv/backy"
            } else {
                "/etc/backy"
            }
        ));
    }
    if need == Need::Store && sandbox.strict && !sandbox.read_write.iter().any(|d| path.starts_with(d)) {
        let allowed: Vec<String> = sandbox
            .read_write
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        let allowed = if allowed.is_empty() {
            "nowhere".to_string()
        } else {
            format!("only in {}", allowed.join(", "))
        };
        return Some(format!(
            "{what} {p}: the unit lets the server write {allowed} (ProtectSystem=strict): run \
             `systemctl edit backy-server` and add ReadWritePaths={p} and RequiresMountsFor={p}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(groups: &[&str]) -> Who {
        Who {
            name: "backy".into(),
            group: "backy".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn facts(owner: &str, group: &str, mode: u32) -> Facts {
        Facts {
            owner: owner.into(),
            group: group.into(),
            mode,
        }
    }

    #[test]
    fn fixes_by_need_group_and_membership() {
        let p = Path::new("/etc/backy/x");
        let root600 = Blocked::Target(facts("root", "root", 0o100600));
        let backy = who(&["backy"]);
        let cases: &[(Need, &Blocked, &Who, Option<&str>, &str)] = &[
            (
                Need::Secret,
                &root600,
                &backy,
                None,
                "x /etc/backy/x: user backy cannot read it (root:root 0600): \
                 run `chgrp backy /etc/backy/x; chmod 640 /etc/backy/x`",
            ),
            (
                Need::CheckedSecret,
                &root600,
                &backy,
                Some("backy"),
                "x /etc/backy/x: user backy cannot read it (root:root 0600): \
                 run `chgrp backy /etc/backy/x; chmod 640 /etc/backy/x`",
            ),
            // The server refuses 0640 without secrets-group: say so.
            (
                Need::CheckedSecret,
                &root600,
                &backy,
                None,
                "x /etc/backy/x: user backy cannot read it (root:root 0600): \
                 run `chgrp backy /etc/backy/x; chmod 640 /etc/backy/x` and set `secrets-group: backy`",
            ),
            // A secrets-group the user is not in: add it.
            (
                Need::Secret,
                &root600,
                &backy,
                Some("ops"),
                "x /etc/backy/x: user backy cannot read it (root:root 0600): \
                 run `chgrp ops /etc/backy/x; chmod 640 /etc/backy/x; usermod -a -G ops backy`",
            ),
            (
                Need::Public,
                &root600,
                &backy,
                Some("backy"),
                "x /etc/backy/x: user backy cannot read it (root:root 0600): run `chmod 644 /etc/backy/x`",
            ),
            (
                Need::Store,
                &Blocked::Target(facts("root", "root", 0o40755)),
                &backy,
                None,
                "x /etc/backy/x: user backy cannot write it (root:root 0755): run `chown backy:backy /etc/backy/x`",
            ),
            (
                Need::Secret,
                &Blocked::Dir(Path::new("/etc/backy"), facts("root", "backy", 0o40700)),
                &backy,
                None,
                "x /etc/backy/x: user backy cannot enter /etc/backy (root:backy 0700): run `chmod g+x /etc/backy`",
            ),
            (
                Need::Public,
                &Blocked::Dir(Path::new("/etc/backy"), facts("root", "root", 0o40700)),
                &backy,
                None,
                "x /etc/backy/x: user backy cannot enter /etc/backy (root:root 0700): run `chmod o+x /etc/backy`",
            ),
        ];
        for (need, blocked, who, group, want) in cases {
            assert_eq!(&advice("x", p, *need, blocked, who, *group), want);
        }
    }

    #[test]
    fn the_units_user_is_the_last_one_set() {
        let unit = "[Unit]\nUser=no\n[Service]\n# User=commented\nUser=backy\nGroup=backy\n";
        assert_eq!(unit_user([unit]).as_deref(), Some("backy"));
        assert_eq!(
            unit_user([unit, "[Service]\nUser = store\n"]).as_deref(),
            Some("store")
        );
        assert_eq!(unit_user([unit, "[Service]\nUser=\n"]), None);
        assert_eq!(unit_user([unit, "[Install]\nUser=x\n"]).as_deref(), Some("backy"));
        assert_eq!(unit_user(["[Service]\nUser=root\n"]), None);
        assert_eq!(unit_user(["[Service]\nExecStart=/bin/true\n"]), None);
    }

    #[test]
    fn the_units_sandbox_keeps_files_from_the_server() {
        let unit = "[Service]\nUser=backy\nProtectSystem=strict\nReadWritePaths=-/srv/backy\n\
                    ProtectHome=yes\nPrivateTmp=yes\n";
        let sandbox = unit_sandbox([unit]);
        let refusal = |what, path: &str, need| sandbox_refusal(&sandbox, what, Path::new(path), need);
        assert_eq!(refusal("base-dir", "/srv/backy", Need::Store), None);
        assert_eq!(refusal("base-dir", "/srv/backy/store", Need::Store), None);
        assert_eq!(
            refusal("TLS key", "/etc/backy/server.key", Need::CheckedSecret),
            None
        );
        assert_eq!(
            refusal("base-dir", "/data/backy", Need::Store).as_deref(),
            Some(
                "base-dir /data/backy: the unit lets the server write only in /srv/backy \
                 (ProtectSystem=strict): run `systemctl edit backy-server` and add \
                 ReadWritePaths=/data/backy and RequiresMountsFor=/data/backy"
            )
        );
        // Not a prefix of a path component.
        assert!(refusal("base-dir", "/srv/backy2", Need::Store).is_some());
        assert_eq!(
            refusal("replica token file", "/root/offsite.token", Need::Secret).as_deref(),
            Some(
                "replica token file /root/offsite.token: the unit hides /root (ProtectHome=yes): \
                 move it, e.g. to /etc/backy"
            )
        );
        assert!(refusal("TLS key", "/home/ops/server.key", Need::CheckedSecret).is_some());
        assert_eq!(
            refusal("TLS key", "/tmp/server.key", Need::CheckedSecret).as_deref(),
            Some(
                "TLS key /tmp/server.key: the unit gives the server a /tmp of its own \
                 (PrivateTmp=yes): move it, e.g. to /etc/backy"
            )
        );
        // A drop-in that lifts the sandbox, or adds a path.
        let lifted = unit_sandbox([
            unit,
            "[Service]\nProtectHome=no\nPrivateTmp=no\nReadWritePaths=/data/backy\n",
        ]);
        assert_eq!(
            sandbox_refusal(&lifted, "k", Path::new("/root/k"), Need::Secret),
            None
        );
        assert_eq!(
            sandbox_refusal(&lifted, "k", Path::new("/tmp/k"), Need::Secret),
            None
        );
        assert_eq!(
            sandbox_refusal(&lifted, "b", Path::new("/data/backy"), Need::Store),
            None
        );
        assert_eq!(
            sandbox_refusal(&lifted, "b", Path::new("/srv/backy"), Need::Store),
            None
        );
        // An empty ReadWritePaths= resets the list; read-only homes stay readable.
        let reset = unit_sandbox([unit, "[Service]\nReadWritePaths=\nProtectHome=read-only\n"]);
        assert!(sandbox_refusal(&reset, "b", Path::new("/srv/backy"), Need::Store).is_some());
        assert_eq!(
            sandbox_refusal(&reset, "k", Path::new("/root/k"), Need::Secret),
            None
        );
        assert!(sandbox_refusal(&reset, "b", Path::new("/home/b"), Need::Store).is_some());
        // No sandbox: nothing to say.
        let none = unit_sandbox(["[Service]\nUser=backy\n"]);
        assert_eq!(
            sandbox_refusal(&none, "b", Path::new("/data/b"), Need::Store),
            None
        );
    }

    #[test]
    fn ancestors_outermost_first() {
        assert_eq!(
            ancestors(Path::new("/etc/backy/server.key")),
            [Path::new("/"), Path::new("/etc"), Path::new("/etc/backy")]
        );
        assert_eq!(ancestors(Path::new("key")), Vec::<&Path>::new());
        assert_eq!(ancestors(Path::new("a/key")), [Path::new("a")]);
    }
}
