//! Who is calling, and what they may do.
//!
//! An interceptor authenticates every request (bearer token and/or client
//! certificate) and puts the [`Caller`] into the request's extensions; the
//! handlers then ask [`authorize`] once they know the job. Unknown jobs are
//! refused exactly like other clients' jobs, so a client cannot probe which
//! jobs exist.

use backy_common::config::{Role, ServerConfig};
use backy_common::token::{cert_fingerprint, check_token, TokenHash, AUTH_HEADER};
use backy_common::JobName;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tonic::{Request, Status};

/// An authenticated identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    /// Whose stream budget a request spends: the identity's, or in open
    /// mode (no identities) the connection's, so a site of many agents on
    /// one host is not capped at one budget.
    pub limit_key: String,
    /// The peer's address, for the audit trail.
    pub peer: String,
}

/// What a request does to a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Status and check.
    Read,
    /// Reading stored data: manifests and restore streams.
    Fetch,
    /// Adding: plan, push, verify, adding schedule or `manual:` tags, a
    /// client's failure report. Nothing stored is deleted, and no tag a
    /// revision holds is taken away.
    Append,
    /// Removing revisions or tags, or making expiry remove them: forget,
    /// distrust, tags set/remove, `--allow-unscheduled` on plan, push and
    /// tags; their dry runs too (a dry run answers as the request would).
    Remove,
}

/// The identity of a request, or UNAUTHENTICATED. With no clients
/// configured (only allowed on plaintext loopback) everyone is `local`
/// with every right, as on a single host.
pub fn authenticate<T>(config: &ServerConfig, req: &Request<T>) -> Result<Caller, Status> {
    if config.clients.is_empty() {
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        return Ok(Caller {
            name: "local".into(),
            role: Role::Admin,
            limit_key: format!("connection {peer}"),
            peer,
        });
    }
    let peer = req.remote_addr();
    // The service logs the refusal (as a rate-limited audit line).
    let fail = |reason: &str| Status::unauthenticated(reason.to_string());
    let by_token = match req.metadata().get(AUTH_HEADER) {
        None => None,
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| fail("authorization header is not text"))?;
            let token = text
                .strip_prefix("Bearer ")
                .ok_or_else(|| fail("authorization header must be 'Bearer TOKEN'"))?;
            let token = check_token(token).map_err(|e| fail(&e.message))?;
            Some(identity_of_token(config, token).ok_or_else(|| fail("invalid token"))?)
        }
    };
    let by_cert = match req.peer_certs() {
        None => None,
        Some(certs) => match certs.first() {
            None => None,
            Some(leaf) => {
                let fp = cert_fingerprint(leaf);
                config
                    .clients
                    .iter()
                    .find(|(_, id)| id.cert_fingerprint.as_deref() == Some(fp.as_str()))
                    .map(|(name, _)| name)
            }
        },
    };
    let name = match (by_token, by_cert) {
        (Some(t), Some(c)) if t != c => {
            return Err(fail(
                "token and client certificate belong to different identities",
            ))
        }
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => {
            return Err(fail(
                "missing credentials: give a token (--token-file) or a known client certificate",
            ))
        }
    };
    let role = config.clients.get(name).map(|c| c.role).unwrap_or(Role::ReadOnly);
    Ok(Caller {
        name: name.clone(),
        role,
        limit_key: format!("identity {name}"),
        peer: peer.map(|a| a.to_string()).unwrap_or_else(|| "unknown".into()),
    })
}

/// The identity a (well-formed) token belongs to. Compares with every
/// identity, each in constant time, so the time taken does not depend on
/// which one matched.
pub fn identity_of_token<'a>(config: &'a ServerConfig, token: &str) -> Option<&'a String> {
    let mut found = None;
    for (name, id) in &config.clients {
        let Some(hash) = id.token_hash.as_deref().and_then(|h| TokenHash::parse(h).ok()) else {
            continue;
        };
        if hash.matches(token) {
            found = Some(name);
        }
    }
    found
}

/// The caller the interceptor stored with the request.
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("request was not authenticated"))
}

/// Whether `caller` may do `action` to `job`: INVALID_ARGUMENT for a bad
/// name, PERMISSION_DENIED outside its jobs, and PERMISSION_DENIED naming
/// the role needed when it may reach the job but not remove from it.
/// `what` names the request in that reason (e.g. `forget --dry-run`).
pub fn authorize(
    config: &ServerConfig,
    caller: &Caller,
    job: &str,
    action: Action,
    what: &str,
) -> Result<(), Status> {
    let name = JobName::new(job).map_err(|e| Status::invalid_argument(e.message))?;
    if may_see(config, caller, &name, action) {
        return Ok(());
    }
    let name_of = &caller.name;
    Err(Status::permission_denied(match caller.role {
        Role::ReadOnly => format!("identity {name_of} is read-only: it may only read status"),
        Role::Replica if matches!(action, Action::Append | Action::Remove) => {
            format!("identity {name_of} is a replica: it may read status and revisions, not change them")
        }
        // Its copy on a replica: read and restore only.
        Role::Hypervisor if copy_owned(config, caller, &name) => format!(
            "job {job} is a copy of another server's here: identity {name_of} may read and restore it; \
             {} goes to the source",
            crate::text::clip(what)
        ),
        // Its own job (else it is told nothing of it, as below).
        Role::Hypervisor if action == Action::Remove && may_see(config, caller, &name, Action::Append) => {
            format!(
                "identity {name_of} is a hypervisor, which only adds backups: {} needs role operator or admin",
                crate::text::clip(what)
            )
        }
        _ => format!("identity {name_of} may not access job {job}"),
    }))
}

/// The rule itself, without logging (also filters `status` of all jobs).
pub fn may_see(config: &ServerConfig, caller: &Caller, job: &JobName, action: Action) -> bool {
    let identity = config.clients.get(&caller.name);
    // A replica's or operator's `jobs:` list; every job when unset.
    let listed = || {
        config.jobs.contains_key(job)
            && identity
                .and_then(|c| c.jobs.as_ref())
                .is_none_or(|jobs| jobs.contains(job))
    };
    match caller.role {
        Role::Admin => true,
        Role::Operator => listed(),
        Role::ReadOnly => action == Action::Read,
        Role::Hypervisor => {
            let own = config
                .jobs
                .get(job)
                .is_some_and(|j| j.client.as_deref() == Some(caller.name.as_str()));
            (own && (action != Action::Remove || identity.is_some_and(|c| c.may_remove)))
                || (matches!(action, Action::Read | Action::Fetch) && copy_owned(config, caller, job))
        }
        Role::Replica => matches!(action, Action::Read | Action::Fetch) && listed(),
    }
}

/// Whether `job` is a copy (on a replica) whose source named `caller` as
/// its client: that identity may read and restore it, nothing more.
fn copy_owned(config: &ServerConfig, caller: &Caller, job: &JobName) -> bool {
    config
        .jobs
        .get(job)
        .is_some_and(|j| j.client.is_none() && j.copy_owner.as_deref() == Some(caller.name.as_str()))
}

/// An agent may run only under its own name (admins under any).
pub fn authorize_agent(caller: &Caller, agent: &str) -> Result<(), Status> {
    match caller.role {
        Role::Admin => Ok(()),
        Role::Hypervisor if caller.name == agent => Ok(()),
        _ => Err(Status::permission_denied(format!(
            "identity {} may not run an agent named {}",
            caller.name,
            crate::text::clip(agent)
        ))),
    }
}

/// Open streams per identity, bounded so one client cannot hold every
/// worker (others' pushes keep working).
#[derive(Default)]
pub struct StreamLimiter {
    open: Mutex<HashMap<String, u32>>,
}

/// One open stream; released when dropped.
pub struct StreamPermit {
    limiter: Arc<StreamLimiter>,
    name: String,
}

impl StreamLimiter {
    pub fn acquire(self: &Arc<Self>, caller: &Caller, limit: u32) -> Result<StreamPermit, Status> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(caller.limit_key.clone()).or_insert(0);
        if *n >= limit {
            return Err(Status::resource_exhausted(format!(
                "{} has {limit} streams open already (limits: streams-per-client)",
                caller.limit_key
            )));
        }
        *n += 1;
        Ok(StreamPermit {
            limiter: self.clone(),
            name: caller.limit_key.clone(),
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.name);
            }
        }
    }
}

/// Refuses a client that declares a protocol this server no longer
/// speaks, naming both versions. A request without the header (a raw gRPC
/// tool, a client from before versioning) is served: its fields say what
/// it means, and every field it can send is still checked.
pub fn check_protocol<T>(req: &Request<T>) -> Result<(), Status> {
    let header = |name: &str| req.metadata().get(name).and_then(|v| v.to_str().ok());
    let Some(declared) = header(backy_proto::PROTOCOL_HEADER) else {
        return Ok(());
    };
    let protocol: u32 = declared.trim().parse().unwrap_or(0);
    if protocol >= backy_proto::MIN_CLIENT_PROTOCOL {
        return Ok(());
    }
    let client = header(backy_proto::VERSION_HEADER).map_or_else(
        || "backy-client".to_string(),
        |v| format!("backy-client {}", crate::text::clip(v)),
    );
    let e = backy_common::Error::precondition(format!(
        "{client} speaks protocol {protocol}; this backy-server {} speaks {} and accepts {} or newer: \
         upgrade backy-client",
        backy_proto::VERSION,
        backy_proto::PROTOCOL,
        backy_proto::MIN_CLIENT_PROTOCOL
    ))
    .with_reason(backy_common::Reason::IncompatibleVersion);
    Err(crate::wire::to_status(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use backy_common::token::{generate_token, hash_token};

    fn config(hv_token: &str, ro_token: &str) -> ServerConfig {
        let text = format!(
            "listen: 127.0.0.1:1\ninsecure-plaintext: true\nbase-dir: /srv\n\
             clients:\n  hv01: {{token-hash: '{}'}}\n  mon: {{role: read-only, token-hash: '{}'}}\n\
             jobs:\n  vm1: {{schedule: none, client: hv01}}\n  vm2: {{schedule: none}}\n",
            hash_token(hv_token).unwrap(),
            hash_token(ro_token).unwrap()
        );
        ServerConfig::from_yaml(&text, "t").unwrap()
    }

    fn req(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut()
                .insert(AUTH_HEADER, format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_map_to_identities() {
        let (hv, ro) = (generate_token(), generate_token());
        let cfg = config(&hv, &ro);
        assert_eq!(authenticate(&cfg, &req(Some(&hv))).unwrap().name, "hv01");
        assert_eq!(authenticate(&cfg, &req(Some(&ro))).unwrap().role, Role::ReadOnly);
        for bad in [None, Some("short"), Some(generate_token().as_str())] {
            let e = authenticate(&cfg, &req(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        let mut r = Request::new(());
        r.metadata_mut().insert(AUTH_HEADER, hv.parse().unwrap());
        assert!(authenticate(&cfg, &r).unwrap_err().message().contains("Bearer"));
    }

    /// Issue 29, item 5: the owner a replica's copy recorded may read and
    /// fetch it, nothing else; nobody else may; a `client:` (an own job)
    /// is not overridden by an owner.
    #[test]
    fn a_copys_owner_may_read_and_restore_it_only() {
        let (hv, ro) = (generate_token(), generate_token());
        let mut cfg = config(&hv, &ro);
        let hv = authenticate(&cfg, &req(Some(&hv))).unwrap();
        let other = Caller {
            name: "hv02".into(),
            ..hv.clone()
        };
        let vm2 = JobName::new("vm2").unwrap();
        assert!(!may_see(&cfg, &hv, &vm2, Action::Read), "no owner yet");
        if let Some(j) = cfg.jobs.get_mut(&vm2) {
            j.copy_owner = Some("hv01".into());
        }
        for (action, allowed) in [
            (Action::Read, true),
            (Action::Fetch, true),
            (Action::Append, false),
            (Action::Remove, false),
        ] {
            assert_eq!(may_see(&cfg, &hv, &vm2, action), allowed, "{action:?}");
            assert!(!may_see(&cfg, &other, &vm2, action), "{action:?} by another");
        }
        let e = authorize(&cfg, &hv, "vm2", Action::Append, "push").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("is a copy of another server's here"),
            "{}",
            e.message()
        );
        // An own job's client decides, whatever an owner says.
        let vm1 = JobName::new("vm1").unwrap();
        if let Some(j) = cfg.jobs.get_mut(&vm1) {
            j.copy_owner = Some("hv02".into());
        }
        assert!(!may_see(&cfg, &other, &vm1, Action::Read));
        assert!(may_see(&cfg, &hv, &vm1, Action::Append));
    }

    #[test]
    fn jobs_belong_to_their_client() {
        let (hv, ro) = (generate_token(), generate_token());
        let cfg = config(&hv, &ro);
        let hv = authenticate(&cfg, &req(Some(&hv))).unwrap();
        let ro = authenticate(&cfg, &req(Some(&ro))).unwrap();
        assert!(authorize(&cfg, &hv, "vm1", Action::Append, "t").is_ok());
        let code = |r: Result<(), Status>| r.unwrap_err().code();
        assert_eq!(
            code(authorize(&cfg, &hv, "vm2", Action::Append, "t")),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(authorize(&cfg, &hv, "vm2", Action::Read, "t")),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(authorize(&cfg, &hv, "nope", Action::Read, "t")),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(authorize(&cfg, &hv, "../x", Action::Read, "t")),
            tonic::Code::InvalidArgument
        );
        assert!(authorize(&cfg, &ro, "vm2", Action::Read, "t").is_ok());
        assert_eq!(
            code(authorize(&cfg, &ro, "vm1", Action::Append, "t")),
            tonic::Code::PermissionDenied
        );
        assert!(authorize_agent(&hv, "hv01").is_ok());
        assert!(authorize_agent(&hv, "hv02").is_err());
        assert!(authorize_agent(&ro, "mon").is_err());
    }

    #[test]
    fn replicas_read_their_jobs_and_change_nothing() {
        let (one, all) = (generate_token(), generate_token());
        let text = format!(
            "listen: 127.0.0.1:1\ninsecure-plaintext: true\nbase-dir: /srv\n\
             clients:\n  one: {{role: replica, token-hash: '{}', jobs: [vm1]}}\n  \
             all: {{role: replica, token-hash: '{}'}}\n\
             jobs:\n  vm1: {{schedule: none}}\n  vm2: {{schedule: none}}\n",
            hash_token(&one).unwrap(),
            hash_token(&all).unwrap()
        );
        let cfg = ServerConfig::from_yaml(&text, "t").unwrap();
        let one = authenticate(&cfg, &req(Some(&one))).unwrap();
        let all = authenticate(&cfg, &req(Some(&all))).unwrap();
        let code = |r: Result<(), Status>| r.err().map(|s| s.code());
        let denied = Some(tonic::Code::PermissionDenied);
        for (who, job, action, want) in [
            (&one, "vm1", Action::Read, None),
            (&one, "vm1", Action::Fetch, None),
            (&one, "vm1", Action::Append, denied),
            (&one, "vm2", Action::Read, denied),
            (&one, "vm2", Action::Fetch, denied),
            (&all, "vm2", Action::Fetch, None),
            (&all, "vm2", Action::Append, denied),
            (&all, "vm2", Action::Remove, denied),
            (&all, "vm9", Action::Fetch, denied),
        ] {
            assert_eq!(
                code(authorize(&cfg, who, job, action, "t")),
                want,
                "{} {job} {action:?}",
                who.name
            );
        }
        let e = authorize(&cfg, &all, "vm1", Action::Append, "t").unwrap_err();
        assert!(e.message().contains("is a replica"), "{}", e.message());
        assert!(authorize_agent(&all, "all").is_err());
    }

    #[test]
    fn hypervisors_add_and_operators_remove() {
        let tokens: Vec<String> = (0..5).map(|_| generate_token()).collect();
        let text = format!(
            "listen: 127.0.0.1:1\ninsecure-plaintext: true\nbase-dir: /srv\n\
             clients:\n  hv01: {{token-hash: '{}'}}\n  old: {{may-remove: true, token-hash: '{}'}}\n  \
             ops: {{role: operator, token-hash: '{}'}}\n  ops1: {{role: operator, jobs: [vm1], token-hash: '{}'}}\n  \
             root: {{role: admin, token-hash: '{}'}}\n\
             jobs:\n  vm1: {{schedule: none, client: hv01}}\n  vm2: {{schedule: none, client: old}}\n",
            hash_token(&tokens[0]).unwrap(),
            hash_token(&tokens[1]).unwrap(),
            hash_token(&tokens[2]).unwrap(),
            hash_token(&tokens[3]).unwrap(),
            hash_token(&tokens[4]).unwrap(),
        );
        let cfg = ServerConfig::from_yaml(&text, "t").unwrap();
        let who = |i: usize| authenticate(&cfg, &req(Some(&tokens[i]))).unwrap();
        let (hv, old, ops, ops1, root) = (who(0), who(1), who(2), who(3), who(4));
        assert_eq!(ops.role, Role::Operator);
        let code = |r: Result<(), Status>| r.err().map(|s| s.code());
        let denied = Some(tonic::Code::PermissionDenied);
        for (who, job, action, want) in [
            (&hv, "vm1", Action::Append, None),
            (&hv, "vm1", Action::Fetch, None),
            (&hv, "vm1", Action::Remove, denied),
            (&hv, "vm2", Action::Remove, denied),
            (&old, "vm2", Action::Remove, None),
            (&old, "vm1", Action::Remove, denied),
            (&ops, "vm1", Action::Remove, None),
            (&ops, "vm2", Action::Remove, None),
            (&ops, "vm9", Action::Read, denied),
            (&ops1, "vm1", Action::Remove, None),
            (&ops1, "vm2", Action::Read, denied),
            (&root, "vm9", Action::Remove, None),
        ] {
            assert_eq!(
                code(authorize(&cfg, who, job, action, "forget")),
                want,
                "{} {job} {action:?}",
                who.name
            );
        }
        // The reason names the role needed on its own job, and nothing of
        // a job that is not its own.
        let own = authorize(&cfg, &hv, "vm1", Action::Remove, "forget --dry-run").unwrap_err();
        assert_eq!(
            own.message(),
            "identity hv01 is a hypervisor, which only adds backups: forget --dry-run needs role operator or admin"
        );
        let other = authorize(&cfg, &hv, "vm2", Action::Remove, "forget").unwrap_err();
        assert_eq!(other.message(), "identity hv01 may not access job vm2");
        assert!(authorize_agent(&ops, "ops").is_err(), "operators run no agent");
        assert!(authorize_agent(&old, "old").is_ok());
    }

    #[test]
    fn stream_limit_is_per_identity_and_released() {
        let limiter = Arc::new(StreamLimiter::default());
        let a = Caller {
            name: "a".into(),
            role: Role::Hypervisor,
            limit_key: "identity a".into(),
            peer: "127.0.0.1:1".into(),
        };
        let b = Caller {
            name: "b".into(),
            role: Role::Hypervisor,
            limit_key: "identity b".into(),
            peer: "127.0.0.1:2".into(),
        };
        let p1 = limiter.acquire(&a, 2).unwrap();
        let _p2 = limiter.acquire(&a, 2).unwrap();
        assert_eq!(
            limiter.acquire(&a, 2).err().unwrap().code(),
            tonic::Code::ResourceExhausted
        );
        let _q = limiter.acquire(&b, 2).unwrap();
        drop(p1);
        assert!(limiter.acquire(&a, 2).is_ok());
    }
}
