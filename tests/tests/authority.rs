//! Who may remove backups (issue 28, "Authority"): a hypervisor's token
//! only adds. Every call and flag that deletes revisions or drops tags (and
//! so lets expiry delete them) is refused with PERMISSION_DENIED, one line
//! naming the role it needs, an audit line, and not one byte changed in the
//! store; the same calls work for an operator or an admin.

mod support;

use backy_common::token::{generate_token, hash_token};
use backy_proto::backy_client::BackyClient;
use backy_proto::push_frame::Frame;
use backy_proto::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use support::*;
use tonic::Code;

/// The refusal's reason, as the CLI prints it.
const NEEDS: &str = "needs role operator or admin";

fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, token).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

/// A store with jobs vm1 and vm2 of hypervisor hv01 (daily, keep 3) and
/// identities `name: role` (plus extra YAML per identity), each with a
/// token file named after it.
struct Site {
    dir: tempfile::TempDir,
    server: Server,
    img: PathBuf,
    tokens: Vec<(String, String)>,
}

impl Site {
    fn new(identities: &[(&str, &str)], extra_jobs: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let img = d.join("vm.img");
        make_image(&img, 24 * MIB, &[(0, 6 * MIB), (12 * MIB, 4 * MIB)]);
        let mut clients = String::new();
        let mut tokens = Vec::new();
        for (name, fields) in identities {
            let token = generate_token();
            clients.push_str(&format!(
                "  {name}: {{token-hash: '{}'{fields}}}\n",
                hash_token(&token).unwrap()
            ));
            let file = token_file(d, &format!("{name}.token"), &token);
            tokens.push((name.to_string(), file.display().to_string()));
        }
        let config = format!(
            "listen: 127.0.0.1:0\nbase-dir: BASE\nclients:\n{clients}\
             schedules:\n  s: {{daily: {{interval: 1d, keep: 3}}}}\n\
             jobs:\n  vm1: {{schedule: s, client: hv01, source: {{type: file, path: {img}}}}}\n  \
             vm2: {{schedule: s, client: hv01, source: {{type: file, path: {img}}}}}\n{extra}",
            img = img.display(),
            extra = extra_jobs.replace("IMG", &img.display().to_string()),
        );
        let base = d.join("backy");
        std::fs::create_dir_all(&base).unwrap();
        let server = Server::start_config(&base, &config);
        Site {
            dir,
            server,
            img,
            tokens,
        }
    }

    /// `backy-client --token-file WHO.token ARGS`.
    fn run(&self, who: &str, args: &[&str]) -> Output {
        let file = &self.tokens.iter().find(|(n, _)| n == who).expect("identity").1;
        let mut all = vec!["--token-file", file.as_str()];
        all.extend_from_slice(args);
        self.server.client(&all)
    }

    fn ok(&self, who: &str, args: &[&str]) -> String {
        let out = self.run(who, args);
        assert!(
            out.status.success(),
            "{who} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pushes `job` as hv01 after changing a few bytes; the new full id.
    fn push(&self, job: &str, seed: u64) -> String {
        self.push_as("hv01", job, seed)
    }

    fn push_as(&self, who: &str, job: &str, seed: u64) -> String {
        write_at(&self.img, seed * MIB, &pattern(seed, 4096));
        let out = self.ok(who, &["--json", "push", job, "--force"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["revision"]["id"].as_str().unwrap().to_string()
    }

    fn ids(&self, who: &str, job: &str) -> Vec<String> {
        let out = self.ok(who, &["--json", "status", job]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["jobs"][0]["revisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn token(&self, who: &str) -> String {
        let file = &self.tokens.iter().find(|(n, _)| n == who).expect("identity").1;
        std::fs::read_to_string(file).unwrap().trim().to_string()
    }
}

/// Every destructive call and flag there is from the command line, on `job`.
fn destructive<'a>(job: &'a str, img: &'a str) -> Vec<Vec<&'a str>> {
    vec![
        vec!["forget", job, "-r", "all"],
        vec!["forget", job, "-r", "latest"],
        vec!["forget", job, "-r", "all", "--dry-run"],
        vec!["tags", job, "-r", "all", "remove", "daily"],
        vec!["tags", job, "-r", "latest", "remove", "daily", "--dry-run"],
        vec!["tags", job, "-r", "latest", "set", "manual:x"],
        vec!["tags", job, "-r", "all", "set", "daily"],
        vec!["tags", job, "-r", "all", "set", "junk", "--allow-unscheduled"],
        vec!["tags", job, "-r", "latest", "add", "junk", "--allow-unscheduled"],
        vec!["push", job, "--force", "--tags", "junk", "--allow-unscheduled"],
        vec![
            "push",
            job,
            "--source",
            img,
            "--force",
            "--tags",
            "junk",
            "--allow-unscheduled",
        ],
        vec!["distrust", job, "-r", "latest"],
        vec!["distrust", job, "-r", "all", "--dry-run"],
    ]
}

/// Every file of `job` (revisions, images, digests, the latest link) with
/// its hash: what a refused request must leave alone.
fn job_files(server: &Server, job: &str) -> Vec<(String, u64, String)> {
    let prefix = format!("{job}/");
    let files: Vec<_> = server
        .snapshot_tree()
        .into_iter()
        .filter(|(p, _, _)| p.starts_with(&prefix))
        .collect();
    assert!(
        files.iter().filter(|(p, _, _)| p.ends_with(".rev")).count() >= 3,
        "{files:?}"
    );
    files
}

/// A raw gRPC client with `token`: what a hostile hypervisor would run
/// instead of backy-client (no plan before its push).
async fn raw(
    url: &str,
    token: &str,
) -> BackyClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor + Clone,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    BackyClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", header.clone());
        Ok(r)
    })
}

/// Plan and a push begin frame with `allow_unscheduled`, sent raw: the
/// gRPC status of each.
fn raw_unscheduled(url: &str, token: &str, job: &str) -> (tonic::Status, tonic::Status) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = raw(url, token).await;
        let plan = c
            .plan(PlanRequest {
                job: job.into(),
                force: true,
                tags: vec!["junk".into()],
                allow_unscheduled: true,
            })
            .await
            .map(|_| tonic::Status::ok("plan answered"))
            .unwrap_or_else(|s| s);
        let begin = PushFrame {
            frame: Some(Frame::Begin(PushBegin {
                job: job.into(),
                rev_id: uuid::Uuid::new_v4().to_string(),
                size: 24 * MIB,
                block_size: 4 << 20,
                tags: vec!["junk".into()],
                source_kind: SourceKind::File as i32,
                force: true,
                allow_unscheduled: true,
                ..PushBegin::default()
            })),
        };
        let push = c
            .push(tokio_stream::iter(vec![begin]))
            .await
            .map(|_| tonic::Status::ok("push answered"))
            .unwrap_or_else(|s| s);
        (plan, push)
    })
}

#[test]
fn a_hypervisor_cannot_remove_anything() {
    let site = Site::new(
        &[
            ("hv01", ""),
            ("mon", ", role: read-only"),
            ("admin", ", role: admin"),
        ],
        "",
    );
    let server = &site.server;
    for seed in 1..=3 {
        site.push("vm1", seed);
    }
    site.push("vm2", 4);
    // What it may do: add backups and tags, read, verify, restore.
    site.push("vm1", 5);
    site.ok("hv01", &["tags", "vm1", "-r", "latest", "add", "manual:keep"]);
    site.ok("hv01", &["verify", "vm1", "-r", "all"]);
    let restored = site.dir.path().join("restored.img");
    site.ok("hv01", &["restore", "vm1", restored.to_str().unwrap()]);
    assert_eq!(file_hash(&restored), file_hash(&site.img));
    let ids = site.ids("hv01", "vm1");
    assert_eq!(ids.len(), 4);
    let before = job_files(server, "vm1");
    let before_all = server.snapshot_tree();

    let img = site.img.to_str().unwrap();
    let mark = server.log_mark();
    for args in destructive("vm1", img) {
        let out = site.run("hv01", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "hv01 {args:?} exits 1: {err}");
        assert!(
            err.contains("PERMISSION_DENIED") && err.contains(NEEDS),
            "hv01 {args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("hypervisor"), "names the caller's role: {err}");
        assert_eq!(job_files(server, "vm1"), before, "hv01 {args:?} changed vm1");
    }
    // The same, spoken raw: plan with allow_unscheduled, and a push whose
    // begin frame asks for it without any plan.
    let (plan, push) = raw_unscheduled(&server.url, &site.token("hv01"), "vm1");
    for (what, status) in [("plan", plan), ("push", push)] {
        assert_eq!(status.code(), Code::PermissionDenied, "raw {what}: {status:?}");
        assert!(
            status.message().contains(NEEDS) && status.message().contains("--allow-unscheduled"),
            "raw {what}: {}",
            status.message()
        );
    }
    assert_eq!(
        server.snapshot_tree(),
        before_all,
        "no refused call changed the store"
    );
    // Each refusal is an audit line naming identity, action and reason.
    let audit: Vec<String> = server
        .log_lines(mark)
        .into_iter()
        .filter(|l| l.contains("audit") && l.contains("identity=\"hv01\""))
        .collect();
    for action in [
        "forget",
        "forget --dry-run",
        "tags remove",
        "tags set",
        "distrust",
        "plan",
        "push",
    ] {
        assert!(
            audit.iter().any(|l| l.contains(&format!("action=\"{action}"))
                && l.contains("failed")
                && l.contains(NEEDS)),
            "no audit line for a refused {action}: {audit:#?}"
        );
    }
    // A read-only identity is refused too (it never changed anything).
    let out = site.run("mon", &["forget", "vm1", "-r", "all"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(job_files(server, "vm1"), before);

    // An admin may do every one of them.
    let admin_ok = |args: &[&str]| site.ok("admin", args);
    admin_ok(&["tags", "vm1", "-r", "latest", "remove", "manual:keep"]);
    admin_ok(&["tags", "vm1", "-r", &ids[0], "set", "manual:x"]);
    admin_ok(&[
        "tags",
        "vm1",
        "-r",
        "latest",
        "add",
        "junk",
        "--allow-unscheduled",
    ]);
    admin_ok(&["distrust", "vm1", "-r", "latest", "--dry-run"]);
    admin_ok(&["distrust", "vm1", "-r", "latest"]);
    admin_ok(&["forget", "vm1", "-r", &ids[0]]);
    assert_eq!(site.ids("admin", "vm1"), ids[1..].to_vec());
    admin_ok(&["forget", "vm1", "-r", "all", "--dry-run"]);
    admin_ok(&["forget", "vm1", "-r", "all"]);
    assert!(site.ids("admin", "vm1").is_empty());
    admin_ok(&[
        "push",
        "vm1",
        "--force",
        "--tags",
        "junk,daily",
        "--allow-unscheduled",
    ]);
    assert_eq!(site.ids("admin", "vm1").len(), 1);
}

#[test]
fn operators_remove_within_their_jobs_and_hypervisors_may_opt_in() {
    let site = Site::new(
        &[
            ("hv01", ""),
            ("ops", ", role: operator"),
            ("ops2", ", role: operator, jobs: [vm2]"),
            ("hvold", ", may-remove: true"),
        ],
        "  vm3: {schedule: s, client: hvold, source: {type: file, path: IMG}}\n",
    );
    let server = &site.server;
    for seed in 1..=3 {
        site.push("vm1", seed);
        site.push("vm2", seed + 3);
    }
    let vm1 = job_files(server, "vm1");
    // An operator scoped to vm2 does not reach vm1 at all.
    for args in [vec!["forget", "vm1", "-r", "latest"], vec!["status", "vm1"]] {
        let out = site.run("ops2", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "ops2 {args:?}: {err}");
        assert!(err.contains("may not access job vm1"), "ops2 {args:?}: {err}");
    }
    assert_eq!(job_files(server, "vm1"), vm1);
    // Within its scope it may remove.
    site.ok("ops2", &["tags", "vm2", "-r", "2", "set", "manual:x"]);
    site.ok("ops2", &["forget", "vm2", "-r", "latest"]);
    assert_eq!(site.ids("ops2", "vm2").len(), 2);

    // An unscoped operator: every destructive call on every job, raw too.
    let (plan, push) = raw_unscheduled(&server.url, &site.token("ops"), "vm1");
    assert_eq!(plan.code(), Code::Ok, "{plan:?}");
    assert_ne!(push.code(), Code::PermissionDenied, "{push:?}");
    let ops_ok = |args: &[&str]| site.ok("ops", args);
    ops_ok(&["distrust", "vm1", "-r", "all", "--dry-run"]);
    ops_ok(&["distrust", "vm1", "-r", "latest"]);
    ops_ok(&[
        "push",
        "vm1",
        "--force",
        "--tags",
        "junk,daily",
        "--allow-unscheduled",
    ]);
    ops_ok(&[
        "tags",
        "vm1",
        "-r",
        "latest",
        "add",
        "junk",
        "--allow-unscheduled",
    ]);
    ops_ok(&["tags", "vm1", "-r", "latest", "set", "manual:x"]);
    ops_ok(&["tags", "vm1", "-r", "all", "remove", "junk", "--dry-run"]);
    ops_ok(&["tags", "vm1", "-r", "2", "set", "daily,manual:y"]);
    ops_ok(&["tags", "vm1", "-r", "2", "remove", "manual:y"]);
    ops_ok(&["forget", "vm1", "-r", "latest"]);
    ops_ok(&["forget", "vm1", "-r", "all", "--dry-run"]);
    ops_ok(&["forget", "vm1", "-r", "all"]);
    assert!(site.ids("ops", "vm1").is_empty());
    ops_ok(&["forget", "vm2", "-r", "all"]);

    // A hypervisor with may-remove: true keeps the old rights on its own
    // jobs, and still nothing on others'.
    site.push_as("hvold", "vm3", 7);
    site.push_as("hvold", "vm3", 8);
    let out = site.run("hvold", &["status", "vm1"]);
    assert_eq!(out.status.code(), Some(1));
    site.ok("hvold", &["tags", "vm3", "-r", "latest", "set", "manual:z"]);
    site.ok("hvold", &["forget", "vm3", "-r", "all"]);
    assert!(site.ids("ops", "vm3").is_empty());
}

/// A push of `job` held for `group` (protocol 7), sent raw: 64 KiB of
/// `seed` at the start of a 24 MiB image.
async fn held_push(
    url: &str,
    token: &str,
    job: &str,
    group: &GroupInstant,
    seed: u64,
) -> Result<PushReply, tonic::Status> {
    held_push_tagged(url, token, job, group, seed, "daily").await
}

async fn held_push_tagged(
    url: &str,
    token: &str,
    job: &str,
    group: &GroupInstant,
    seed: u64,
    tag: &str,
) -> Result<PushReply, tonic::Status> {
    let (size, bs) = (24 * MIB, 4u32 << 20);
    let data = pattern(seed, 64 << 10);
    let mut sum = backy_common::checksum::StreamChecksum::new();
    sum.data(0, &data);
    let frames = vec![
        Frame::Begin(PushBegin {
            job: job.into(),
            rev_id: uuid::Uuid::new_v4().to_string(),
            size,
            block_size: bs,
            tags: vec![tag.into()],
            source_kind: SourceKind::File as i32,
            force: true,
            group: Some(group.clone()),
            hold: true,
            ..PushBegin::default()
        }),
        Frame::Data(DataRange {
            offset: 0,
            data: data.clone(),
        }),
        Frame::End(PushEnd {
            stream_checksum: sum.finish().to_vec(),
            manifest_digest: manifest_digest_after(None, size, bs, &[(0, &data)]),
            audit: None,
        }),
    ];
    let stream = tokio_stream::iter(frames.into_iter().map(|f| PushFrame { frame: Some(f) }));
    raw(url, token).await.push(stream).await.map(|r| r.into_inner())
}

/// A `CommitGroup` request of `group` naming `members` (job, revision id).
fn commit_request(group: &GroupInstant, members: &[(&str, &str)], abort: bool) -> GroupCommit {
    GroupCommit {
        group: Some(group.clone()),
        members: members
            .iter()
            .map(|(job, rev)| GroupMember {
                job: job.to_string(),
                rev_id: rev.to_string(),
            })
            .collect(),
        abort,
    }
}

async fn commit_group(url: &str, token: &str, request: GroupCommit) -> Result<GroupCommitted, tonic::Status> {
    raw(url, token)
        .await
        .commit_group(request)
        .await
        .map(|r| r.into_inner())
}

/// Issue 34 with issue 28's rules: the disks of a group instant are held
/// unlisted until their pusher commits them all. Another identity can
/// neither commit, abort nor join the instant; a commit that names too few
/// disks, or a disk not held, is refused and changes nothing (the instant
/// stays held, and the right commit still works); the commit lists every
/// disk under one revision time; an abort drops the held disks and frees
/// their jobs at once.
#[test]
fn a_group_instant_is_committed_whole_and_only_by_its_pusher() {
    let site = Site::new(
        &[("hv01", ""), ("hv02", "")],
        "  vm3: {schedule: s, client: hv02, source: {type: file, path: IMG}}\n",
    );
    let url = site.server.url.clone();
    let (t1, t2) = (site.token("hv01"), site.token("hv02"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let group = GroupInstant {
        name: "vm".into(),
        instant: backy_common::RevisionId::new_random().short(),
        disks: 2,
    };
    let commit = |members: &[(&str, &str)], abort: bool| commit_request(&group, members, abort);
    let r1 = rt.block_on(held_push(&url, &t1, "vm1", &group, 1)).unwrap();
    let id1 = r1.revision.unwrap().id;
    assert!(site.ids("hv01", "vm1").is_empty(), "a held disk is not listed");

    // Another identity: not on hv01's jobs, not on its own with hv01's instant.
    let e = rt
        .block_on(commit_group(
            &url,
            &t2,
            commit(&[("vm1", &id1), ("vm3", &id1)], true),
        ))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = rt
        .block_on(commit_group(
            &url,
            &t2,
            commit(&[("vm3", &id1), ("vm3", &id1)], true),
        ))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("another client identity"), "{e:?}");
    let e = rt.block_on(held_push(&url, &t2, "vm3", &group, 3)).unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "joining another's instant: {e:?}"
    );
    assert!(site.ids("hv02", "vm3").is_empty());

    // hv01's own mistakes: refused, nothing changed, still held.
    let e = rt
        .block_on(commit_group(&url, &t1, commit(&[("vm1", &id1)], false)))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let fake = uuid::Uuid::new_v4().to_string();
    let e = rt
        .block_on(commit_group(
            &url,
            &t1,
            commit(&[("vm1", &id1), ("vm2", &fake)], false),
        ))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains("job vm2: no revision of this instant is held"),
        "{e:?}"
    );
    assert!(site.ids("hv01", "vm1").is_empty() && site.ids("hv01", "vm2").is_empty());

    // The second disk, then the commit: both listed at one time.
    let r2 = rt.block_on(held_push(&url, &t1, "vm2", &group, 2)).unwrap();
    let id2 = r2.revision.unwrap().id;
    let done = rt
        .block_on(commit_group(
            &url,
            &t1,
            commit(&[("vm1", &id1), ("vm2", &id2)], false),
        ))
        .unwrap();
    assert_eq!(done.revisions.len(), 2);
    assert_eq!(
        done.revisions[0].timestamp, done.revisions[1].timestamp,
        "one revision time"
    );
    let short = |id: &str| id.parse::<backy_common::RevisionId>().unwrap().short();
    assert_eq!(site.ids("hv01", "vm1"), [short(&id1)]);
    assert_eq!(site.ids("hv01", "vm2"), [short(&id2)]);
    let e = rt
        .block_on(commit_group(
            &url,
            &t1,
            commit(&[("vm1", &id1), ("vm2", &id2)], false),
        ))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "committed once: {e:?}");

    // An abort: the held disk goes, its job takes a push at once.
    let group = GroupInstant {
        instant: backy_common::RevisionId::new_random().short(),
        ..group
    };
    let r = rt.block_on(held_push(&url, &t1, "vm1", &group, 4)).unwrap();
    let id = r.revision.unwrap().id;
    let partial = site.server.base.join("vm1").join(".partial");
    assert_eq!(
        std::fs::read_dir(&partial).unwrap().count(),
        2,
        "image and manifest held"
    );
    let request = commit_request(&group, &[("vm1", id.as_str()), ("vm2", id.as_str())], true);
    let aborted = rt.block_on(commit_group(&url, &t1, request)).unwrap();
    assert!(aborted.revisions.is_empty());
    assert_eq!(
        std::fs::read_dir(&partial).unwrap().count(),
        0,
        "the held files went"
    );
    assert_eq!(site.ids("hv01", "vm1"), [short(&id1)]);
    site.push("vm1", 5);
    assert_eq!(site.ids("hv01", "vm1").len(), 2, "the job's push slot is free");

    // A held push needs its instant.
    let bare = GroupInstant::default();
    let e = rt.block_on(held_push(&url, &t1, "vm1", &bare, 6)).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}

/// Issue 34: expiry treats a group's instants as one. Two jobs on one
/// schedule (`often`: every second, keep 2) get instant after instant by
/// group commits; after every commit both list exactly the same instants,
/// until the first instant has expired from both.
#[test]
fn group_instants_expire_together() {
    let dir = tempfile::tempdir().unwrap();
    let token = generate_token();
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nclients:\n  hv01: {{token-hash: '{}'}}\n\
         schedules:\n  fast: {{often: {{interval: 1s, keep: 2}}}}\n\
         jobs:\n  vm1: {{schedule: fast, client: hv01}}\n  vm2: {{schedule: fast, client: hv01}}\n",
        hash_token(&token).unwrap()
    );
    let base = dir.path().join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let server = Server::start_config(&base, &config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let file = token_file(dir.path(), "hv01.token", &token);
    let instants = |job: &str| -> std::collections::BTreeSet<String> {
        let out = server.client(&["--token-file", file.to_str().unwrap(), "--json", "status", job]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["jobs"][0]["revisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["group"]["instant"].as_str().unwrap().to_string())
            .collect()
    };
    let mut first = None;
    let mut commits = 0;
    wait_for(
        "the first instant to expire",
        std::time::Duration::from_secs(60),
        || {
            commits += 1;
            let group = GroupInstant {
                name: "vm".into(),
                instant: backy_common::RevisionId::new_random().short(),
                disks: 2,
            };
            let mut ids = Vec::new();
            for job in ["vm1", "vm2"] {
                let reply = rt
                    .block_on(held_push_tagged(
                        &server.url,
                        &token,
                        job,
                        &group,
                        commits,
                        "often",
                    ))
                    .unwrap();
                ids.push(reply.revision.unwrap().id);
            }
            let request = commit_request(&group, &[("vm1", &ids[0]), ("vm2", &ids[1])], false);
            rt.block_on(commit_group(&server.url, &token, request)).unwrap();
            let first = first.get_or_insert(group.instant);
            let (a, b) = (instants("vm1"), instants("vm2"));
            assert_eq!(
                a, b,
                "after commit {commits}: every instant kept or expired on both disks"
            );
            assert!(a.len() >= (commits as usize).min(2), "the newest two stay: {a:?}");
            !a.contains(first.as_str())
        },
    );
    assert!(commits >= 3, "{commits} commits");
}
