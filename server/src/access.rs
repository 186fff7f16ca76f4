//! Whether the server's user can open every file the server needs:
//! `check-config` asks the kernel as that user (a child process that
//! drops to it), and start-up words its own refusals the same way. The
//! advice itself is `backy_common::access` (docs/DESIGN.md, "Packaging
//! and service units").

use anyhow::{bail, Context};
use backy_common::access::{advice, ancestors, Blocked, Facts, Need, Who};
use backy_common::config::ServerConfig;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The packaged unit (packaging/systemd/backy-server.service), whose
/// `User=` (with the operator's drop-ins) `check-config` checks as.
const UNIT: &str = "backy-server.service";

/// Where systemd looks for units, most important first.
const UNIT_DIRS: [&str; 4] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// The installed unit: its file and drop-ins, in the order systemd reads
/// them.
pub struct Unit {
    texts: Vec<String>,
}

impl Unit {
    /// `None` when no `backy-server.service` is installed.
    pub fn installed() -> Option<Unit> {
        let main = UNIT_DIRS
            .iter()
            .find_map(|d| std::fs::read_to_string(Path::new(d).join(UNIT)).ok())?;
        // Drop-ins by file name; a name in a more important directory wins.
        let mut dropins = std::collections::BTreeMap::new();
        for dir in UNIT_DIRS.iter().rev() {
            let Ok(entries) = std::fs::read_dir(Path::new(dir).join(format!("{UNIT}.d"))) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().ends_with(".conf") {
                    if let Ok(text) = std::fs::read_to_string(entry.path()) {
                        dropins.insert(name, text);
                    }
                }
            }
        }
        Some(Unit {
            texts: std::iter::once(main).chain(dropins.into_values()).collect(),
        })
    }

    fn texts(&self) -> impl Iterator<Item = &str> {
        self.texts.iter().map(String::as_str)
    }

    /// Its `User=`; `None`: root.
    pub fn user(&self) -> Option<String> {
        backy_common::access::unit_user(self.texts())
    }

    /// One line per path its sandbox keeps from the server
    /// (`ProtectSystem=strict` without the store in `ReadWritePaths=`,
    /// `ProtectHome=`, `PrivateTmp=`).
    pub fn sandbox_problems(&self, wanted: &[Wanted]) -> Vec<String> {
        let sandbox = backy_common::access::unit_sandbox(self.texts());
        wanted
            .iter()
            .filter_map(|w| backy_common::access::sandbox_refusal(&sandbox, &w.what, &w.path, w.need))
            .collect()
    }
}

/// A user account, resolved through NSS (`/etc/passwd`, LDAP, ...).
pub struct Account {
    pub who: Who,
    uid: u32,
    gid: u32,
    gids: Vec<libc::gid_t>,
}

impl Account {
    /// The user `name`, or `None` when there is none.
    pub fn named(name: &str) -> anyhow::Result<Option<Account>> {
        let cname = CString::new(name).context("a user name has no NUL byte")?;
        let Some((name, uid, gid)) =
            // SAFETY: the buffers are valid for the call (see `passwd`).
            passwd(|pw, buf, len, found| unsafe { libc::getpwnam_r(cname.as_ptr(), pw, buf, len, found) })
        else {
            return Ok(None);
        };
        Ok(Some(Account::new(name, uid, gid)))
    }

    /// The user this process runs as.
    pub fn current() -> Account {
        // SAFETY: no arguments, cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        // SAFETY: as in `named`.
        let name = passwd(|pw, buf, len, found| unsafe { libc::getpwuid_r(uid, pw, buf, len, found) })
            .map_or_else(|| uid.to_string(), |(n, _, _)| n);
        let mut account = Account::new(name, uid, gid);
        // This process's own groups, not the database's.
        // SAFETY: a null list with size 0 asks for the count.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut gids = vec![0; n.max(0) as usize];
        // SAFETY: `gids` holds `n` entries.
        let n = unsafe { libc::getgroups(n, gids.as_mut_ptr()) };
        gids.truncate(n.max(0) as usize);
        account.who.groups = gids.iter().map(|g| group_name(*g)).collect();
        account.gids = gids;
        account
    }

    fn new(name: String, uid: u32, gid: u32) -> Account {
        let gids = group_list(&name, gid);
        Account {
            who: Who {
                group: group_name(gid),
                groups: gids.iter().map(|g| group_name(*g)).collect(),
                name,
            },
            uid,
            gid,
            gids,
        }
    }
}

/// A passwd lookup through `call` (a `getpw*_r`): (name, uid, gid).
fn passwd(
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> libc::c_int,
) -> Option<(String, u32, u32)> {
    let mut size = 4096;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: zeroed is a valid `passwd` (pointers and ints), which the
        // call fills in; its strings point into `buf`, read while it lives.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pw, buf.as_mut_ptr(), buf.len(), &mut found);
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || found.is_null() {
            return None;
        }
        // SAFETY: on success pw_name is a NUL-terminated string in `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
        return Some((name.to_string_lossy().into_owned(), pw.pw_uid, pw.pw_gid));
    }
}

/// The groups of `user` (with its primary `gid`) in the group database.
fn group_list(user: &str, gid: u32) -> Vec<libc::gid_t> {
    let Ok(cname) = CString::new(user) else {
        return vec![gid];
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut gids = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: `gids` holds `count` entries; the call sets `count`.
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, gids.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            gids.truncate(count.max(0) as usize);
            return gids;
        }
        if count <= n || count > 1 << 16 {
            return vec![gid];
        }
        n = count;
    }
}

/// The name of group `gid`, or its number.
fn group_name(gid: u32) -> String {
    let mut size = 4096;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: as in `passwd`, for a `group`.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, `buf.len()` its size.
        let rc = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || found.is_null() {
            return gid.to_string();
        }
        // SAFETY: on success gr_name is a NUL-terminated string in `buf`.
        return unsafe { std::ffi::CStr::from_ptr(gr.gr_name) }
            .to_string_lossy()
            .into_owned();
    }
}

/// The name of user `uid`, or its number.
fn user_name(uid: u32) -> String {
    // SAFETY: as in `Account::named`.
    passwd(|pw, buf, len, found| unsafe { libc::getpwuid_r(uid, pw, buf, len, found) })
        .map_or_else(|| uid.to_string(), |(n, _, _)| n)
}

/// Owner, group and mode of `path` (as this process sees it).
fn facts(path: &Path) -> Option<Facts> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Facts {
        owner: user_name(meta.uid()),
        group: group_name(meta.gid()),
        mode: meta.mode(),
    })
}

/// A path the server opens, what it is called in the config, and why.
pub struct Wanted {
    pub what: String,
    pub path: PathBuf,
    pub need: Need,
}

/// Every path the server opens: the config, TLS files, the replica's
/// token, CA and key, and the store.
pub fn wanted(config: &ServerConfig, config_path: &Path) -> Vec<Wanted> {
    let mut out = Vec::new();
    let mut add = |what: &str, path: &Path, need| {
        out.push(Wanted {
            what: what.to_string(),
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            need,
        })
    };
    let hashes = config.clients.values().any(|c| c.token_hash.is_some());
    add(
        "config file",
        config_path,
        if hashes { Need::CheckedSecret } else { Need::Secret },
    );
    if let Some(tls) = &config.tls {
        add("TLS certificate", &tls.cert, Need::Public);
        add("TLS key", &tls.key, Need::CheckedSecret);
        if let Some(ca) = &tls.client_ca {
            add("TLS client CA", ca, Need::Public);
        }
    }
    if let Some(r) = &config.replicate {
        let files = [
            ("replica CA certificate", &r.ca, Need::Public),
            ("replica token file", &r.token_file, Need::Secret),
            ("replica client certificate", &r.cert, Need::Public),
            ("replica client key", &r.key, Need::Secret),
        ];
        for (what, path, need) in files {
            if let Some(p) = path {
                add(what, p, need);
            }
        }
    }
    add("base-dir", &config.base_dir, Need::Store);
    out
}

#[derive(Clone, Copy)]
enum Probe {
    /// Search permission on a directory.
    Enter,
    Read,
    /// Create files in a directory.
    Write,
}

/// For each of `probes`, 0 if `account` may do it, else the errno; asked
/// of the kernel by a child process that becomes `account` (so ACLs,
/// every directory on the way and NSS groups count as they will for the
/// server). `account` `None`: as this process, without a child.
fn probe(account: Option<&Account>, probes: &[(CString, Probe)]) -> anyhow::Result<Vec<i32>> {
    let mut results = vec![0i32; probes.len()];
    let Some(account) = account else {
        run_probes(probes, &mut results);
        return Ok(results);
    };
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe for the access check");
    }
    // SAFETY: the child calls nothing but system calls on memory prepared
    // here (no allocation, no lock), then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork for the access check");
    }
    if pid == 0 {
        // SAFETY: the child of a fork: only system calls, then _exit.
        unsafe {
            libc::close(fds[0]);
            let dropped = libc::setgroups(account.gids.len(), account.gids.as_ptr()) == 0
                && libc::setgid(account.gid) == 0
                && libc::setuid(account.uid) == 0;
            if dropped {
                run_probes(probes, &mut results);
            }
            let bytes = std::slice::from_raw_parts(results.as_ptr().cast::<u8>(), results.len() * 4);
            let mut sent = 0;
            while dropped && sent < bytes.len() {
                let n = libc::write(fds[1], bytes[sent..].as_ptr().cast(), bytes.len() - sent);
                if n <= 0 {
                    break;
                }
                sent += n as usize;
            }
            libc::_exit(if dropped { 0 } else { 2 });
        }
    }
    // SAFETY: fds[1] is ours and closed once; fds[0] is owned by the File.
    unsafe { libc::close(fds[1]) };
    let mut pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    let mut bytes = Vec::new();
    let read = std::io::Read::read_to_end(&mut pipe, &mut bytes);
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is valid for the call.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    read.context("reading the access check's answer")?;
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 || bytes.len() != results.len() * 4 {
        bail!(
            "could not become user {} to check its access (check-config runs as root for that)",
            account.who.name
        );
    }
    for (r, b) in results.iter_mut().zip(bytes.chunks_exact(4)) {
        *r = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(results)
}

/// Runs `probes`, only system calls (safe in a forked child).
fn run_probes(probes: &[(CString, Probe)], results: &mut [i32]) {
    for ((path, probe), result) in probes.iter().zip(results.iter_mut()) {
        // SAFETY: `path` is NUL-terminated; a descriptor opened is closed.
        let ok = unsafe {
            match probe {
                Probe::Enter => libc::access(path.as_ptr(), libc::X_OK) == 0,
                Probe::Write => libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) == 0,
                Probe::Read => {
                    // Non-blocking: a FIFO must not hang the check.
                    let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK);
                    fd >= 0 && libc::close(fd) == 0
                }
            }
        };
        // SAFETY: errno of this thread.
        *result = if ok {
            0
        } else {
            unsafe { *libc::__errno_location() }
        };
    }
}

/// One line per file `account` cannot use as the server will (none: all
/// is well); `account` `None`: this process's user.
pub fn problems(
    account: Option<&Account>,
    wanted: &[Wanted],
    secrets_group: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let who = match account {
        Some(a) => a.who.clone(),
        None => Account::current().who,
    };
    let mut probes = Vec::new();
    let mut spans = Vec::new();
    for w in wanted {
        let start = probes.len();
        for dir in ancestors(&w.path) {
            probes.push((c_path(dir)?, Probe::Enter, dir.to_path_buf()));
        }
        let last = if w.need == Need::Store {
            Probe::Write
        } else {
            Probe::Read
        };
        probes.push((c_path(&w.path)?, last, w.path.clone()));
        spans.push(start..probes.len());
    }
    let asked: Vec<(CString, Probe)> = probes.iter().map(|(c, p, _)| (c.clone(), *p)).collect();
    let results = probe(account, &asked)?;
    let mut out = Vec::new();
    for (w, span) in wanted.iter().zip(spans) {
        let Some(i) = span.clone().find(|&i| results[i] != 0) else {
            continue;
        };
        let errno = results[i];
        let path = &probes[i].2;
        let is_target = i + 1 == span.end;
        let denied = matches!(errno, libc::EACCES | libc::EPERM);
        let found = if is_target {
            facts(path)
        } else {
            facts(path).filter(|_| denied)
        };
        out.push(match (denied, found) {
            (true, Some(f)) if is_target => {
                advice(&w.what, &w.path, w.need, &Blocked::Target(f), &who, secrets_group)
            }
            (true, Some(f)) => advice(
                &w.what,
                &w.path,
                w.need,
                &Blocked::Dir(path, f),
                &who,
                secrets_group,
            ),
            _ => format!(
                "{} {}: user {} cannot open it: {}",
                w.what,
                w.path.display(),
                who.name,
                std::io::Error::from_raw_os_error(errno)
            ),
        });
    }
    Ok(out)
}

fn c_path(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).with_context(|| format!("{} has a NUL byte", path.display()))
}

/// An I/O error on `path` as start-up reports it: a permission refusal
/// says which user, which directory or file, and what to run.
pub fn io_error(
    err: std::io::Error,
    what: &str,
    path: &Path,
    need: Need,
    secrets_group: Option<&str>,
) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::PermissionDenied {
        if let Some(line) = denied(what, path, need, secrets_group) {
            return anyhow::anyhow!(line);
        }
    }
    anyhow::Error::new(err).context(format!("reading {what} {}", path.display()))
}

/// Why this process may not use `path` as `need` says, with the fix; `None`
/// when it may (or the check itself failed).
pub fn denied(what: &str, path: &Path, need: Need, secrets_group: Option<&str>) -> Option<String> {
    let wanted = [Wanted {
        what: what.to_string(),
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        need,
    }];
    problems(None, &wanted, secrets_group).ok()?.into_iter().next()
}
