//! What to tell an operator when the server's user cannot open a file it
//! needs: pure decisions. The server (`server/src/access.rs`) asks the
//! kernel, as that user, which paths it may open, stats the one that
//! stopped it, and words the fix here (docs/DESIGN.md, "Packaging and
//! service units").

use std::path::Path;

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

/// The user a systemd unit runs its service as: the last `User=` of its
/// `[Service]` section, reading `texts` (the unit file, then its drop-ins)
/// in the order systemd does. `None`: root (no `User=`, or one reset by an
/// empty `User=`).
pub fn unit_user<'a>(texts: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut user = None;
    for text in texts {
        let mut in_service = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_service = line == "[Service]";
            } else if in_service {
                if let Some((key, value)) = line.split_once('=') {
                    if key.trim() == "User" {
                        let value = value.trim();
                        user = (!value.is_empty() && value != "root").then(|| value.to_string());
                    }
                }
            }
        }
    }
    user
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
    fn ancestors_outermost_first() {
        assert_eq!(
            ancestors(Path::new("/etc/backy/server.key")),
            [Path::new("/"), Path::new("/etc"), Path::new("/etc/backy")]
        );
        assert_eq!(ancestors(Path::new("key")), Vec::<&Path>::new());
        assert_eq!(ancestors(Path::new("a/key")), [Path::new("a")]);
    }
}
