//! Advisory locks on RADOS objects (`cls_lock`): exclusive, with a
//! duration after which the OSD treats them as free, renewable by the
//! same client instance and cookie.

use super::cluster::{c_string, IoCtx};
use super::error::{check, CephError, Result};
use super::ffi::LOCK_FLAG_MAY_RENEW;
use std::ffi::c_int;
use std::ptr;
use std::time::Duration;

/// One holder of a lock as the lock record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    /// The client instance (`client.4123`).
    pub client: String,
    pub cookie: String,
    /// The instance's address: what a taker blocklists.
    pub address: String,
}

/// A lock's record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LockInfo {
    pub exclusive: bool,
    pub tag: String,
    pub lockers: Vec<Locker>,
}

/// An exclusive lock request.
#[derive(Debug, Clone, Copy)]
pub struct LockRequest<'a> {
    /// The lock's name on the object (several locks may share one object).
    pub name: &'a str,
    /// Tells this owner's locks apart (the owner is client instance and
    /// cookie).
    pub cookie: &'a str,
    pub description: &'a str,
    /// `None`: held until unlocked or broken.
    pub duration: Option<Duration>,
    /// The same owner may lock again, extending the duration (renewal);
    /// without it the same owner gets EEXIST.
    pub may_renew: bool,
}

/// The NUL-terminated strings `count` lockers' buffers hold, in order.
fn split_nul(buf: &[u8], count: usize, what: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(count);
    let mut rest = buf;
    for i in 0..count {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| format!("{what} {i} of {count} is not terminated"))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|e| format!("{what} {i}: {e}"))?;
        out.push(s.to_string());
        rest = &rest[end + 1..];
    }
    Ok(out)
}

/// The record from `rados_list_lockers`' buffers.
fn parse_lockers(
    count: usize,
    exclusive: bool,
    tag: &[u8],
    clients: &[u8],
    cookies: &[u8],
    addrs: &[u8],
) -> std::result::Result<LockInfo, String> {
    let tag_end = tag.iter().position(|&b| b == 0).unwrap_or(tag.len());
    let tag = String::from_utf8_lossy(&tag[..tag_end]).into_owned();
    let clients = split_nul(clients, count, "client")?;
    let cookies = split_nul(cookies, count, "cookie")?;
    let addrs = split_nul(addrs, count, "address")?;
    let lockers = clients
        .into_iter()
        .zip(cookies)
        .zip(addrs)
        .map(|((client, cookie), address)| Locker {
            client,
            cookie,
            address,
        })
        .collect();
    Ok(LockInfo {
        exclusive,
        tag,
        lockers,
    })
}

impl IoCtx {
    /// Takes (or, with `may_renew`, renews) an exclusive lock on `oid`,
    /// creating the object if missing. EBUSY: another owner holds it.
    pub fn lock_exclusive(&self, oid: &str, req: &LockRequest<'_>) -> Result<()> {
        let target = || format!("{oid} lock {}", req.name);
        let op = "rados_lock_exclusive";
        let (o, n) = (c_string(op, &target(), oid)?, c_string(op, &target(), req.name)?);
        let cookie = c_string(op, &target(), req.cookie)?;
        let desc = c_string(op, &target(), req.description)?;
        let mut tv = req.duration.map(|d| libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(d.subsec_micros()),
        });
        let tv_ptr = tv.as_mut().map_or(ptr::null_mut(), |t| t as *mut libc::timeval);
        let flags = if req.may_renew { LOCK_FLAG_MAY_RENEW } else { 0 };
        // SAFETY: strings and the timeval outlive the call.
        let rc = unsafe {
            (self.api().rados_lock_exclusive)(
                self.raw(),
                o.as_ptr(),
                n.as_ptr(),
                cookie.as_ptr(),
                desc.as_ptr(),
                tv_ptr,
                flags,
            )
        };
        check(rc.into(), op, target)?;
        Ok(())
    }

    /// Releases this instance's lock with `cookie`; ENOENT if it holds none.
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<()> {
        let target = || format!("{oid} lock {name}");
        let op = "rados_unlock";
        let (o, n, c) = (
            c_string(op, &target(), oid)?,
            c_string(op, &target(), name)?,
            c_string(op, &target(), cookie)?,
        );
        // SAFETY: strings outlive the call.
        let rc = unsafe { (self.api().rados_unlock)(self.raw(), o.as_ptr(), n.as_ptr(), c.as_ptr()) };
        check(rc.into(), op, target)?;
        Ok(())
    }

    /// Removes another instance's lock (`client` and `cookie` from
    /// [`IoCtx::list_lockers`]). It does not fence that instance: blocklist
    /// it first.
    pub fn break_lock(&self, oid: &str, name: &str, client: &str, cookie: &str) -> Result<()> {
        let target = || format!("{oid} lock {name} of {client}");
        let op = "rados_break_lock";
        let (o, n) = (c_string(op, &target(), oid)?, c_string(op, &target(), name)?);
        let (cl, c) = (c_string(op, &target(), client)?, c_string(op, &target(), cookie)?);
        // SAFETY: strings outlive the call.
        let rc = unsafe {
            (self.api().rados_break_lock)(self.raw(), o.as_ptr(), n.as_ptr(), cl.as_ptr(), c.as_ptr())
        };
        check(rc.into(), op, target)?;
        Ok(())
    }

    /// The lock's record: who holds it, with which cookie, from where.
    /// Expired holders may still be listed until the next lock call on the
    /// object clears them.
    pub fn list_lockers(&self, oid: &str, name: &str) -> Result<LockInfo> {
        let target = || format!("{oid} lock {name}");
        let op = "rados_list_lockers";
        let (o, n) = (c_string(op, &target(), oid)?, c_string(op, &target(), name)?);
        // librados answers ERANGE with the lengths it needs: retry once
        // more with them (a locker may come between the two calls).
        let mut lens = [64usize; 4];
        for _ in 0..8 {
            let mut bufs = lens.map(|l| vec![0u8; l]);
            let [tag_len, clients_len, cookies_len, addrs_len] = &mut lens;
            let mut exclusive: c_int = 0;
            let [tag, clients, cookies, addrs] = &mut bufs;
            // SAFETY: each buffer holds the length passed with it.
            let rc = unsafe {
                (self.api().rados_list_lockers)(
                    self.raw(),
                    o.as_ptr(),
                    n.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    tag_len,
                    clients.as_mut_ptr().cast(),
                    clients_len,
                    cookies.as_mut_ptr().cast(),
                    cookies_len,
                    addrs.as_mut_ptr().cast(),
                    addrs_len,
                )
            };
            match check(rc as i64, op, target) {
                Ok(count) => {
                    let trim = |b: &[u8], l: usize| b[..l.min(b.len())].to_vec();
                    return parse_lockers(
                        count as usize,
                        exclusive != 0,
                        &trim(tag, *tag_len),
                        &trim(clients, *clients_len),
                        &trim(cookies, *cookies_len),
                        &trim(addrs, *addrs_len),
                    )
                    .map_err(|reason| CephError::Reply {
                        op,
                        target: target(),
                        reason,
                    });
                }
                Err(e) if e.errno() == Some(libc::ERANGE) => {
                    lens = lens.map(|l| l.max(1));
                }
                Err(e) => return Err(e),
            }
        }
        Err(CephError::Reply {
            op,
            target: target(),
            reason: "the record kept growing".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockers_parse_from_nul_separated_buffers() {
        let info = parse_lockers(
            2,
            false,
            b"t\0",
            b"client.41\0client.42\0",
            b"a\0b\0",
            b"127.0.0.1:0/1\x00127.0.0.1:0/2\0",
        )
        .unwrap();
        assert_eq!(info.tag, "t");
        assert!(!info.exclusive);
        assert_eq!(
            info.lockers,
            [
                Locker {
                    client: "client.41".into(),
                    cookie: "a".into(),
                    address: "127.0.0.1:0/1".into()
                },
                Locker {
                    client: "client.42".into(),
                    cookie: "b".into(),
                    address: "127.0.0.1:0/2".into()
                },
            ]
        );
        // No lockers: empty buffers but the tag's NUL.
        let free = parse_lockers(0, true, b"\0", b"", b"", b"").unwrap();
        assert!(free.lockers.is_empty() && free.exclusive);
    }

    #[test]
    fn a_short_or_unterminated_buffer_is_an_error_not_a_panic() {
        let err = parse_lockers(2, true, b"\0", b"client.41\0", b"a\0b\0", b"x\0y\0").unwrap_err();
        assert_eq!(err, "client 1 of 2 is not terminated");
        let err = parse_lockers(1, true, b"\0", b"client.41", b"a\0", b"x\0").unwrap_err();
        assert_eq!(err, "client 0 of 1 is not terminated");
        assert!(parse_lockers(1, true, b"\0", b"\xff\0", b"a\0", b"x\0").is_err());
    }
}
