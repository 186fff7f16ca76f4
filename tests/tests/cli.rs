//! The command line as an operator meets it: exit codes for bad arguments,
//! `--quiet`, `--timeout`, restoring to standard output, `check`'s
//! performance data and JSON, JSON documents and failures, help examples,
//! counts, ages in `status`, a replaced file keeping its owner, and log
//! lines journald can file by priority. Real server and client processes.

mod support;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A server with `vm1` (daily schedule) backed by a 12 MiB sample image.
fn one_job(dir: &Path) -> (Server, PathBuf) {
    let img = dir.join("vm1.img");
    make_image(&img, 12 * MIB, &[(0, 3 * MIB), (8 * MIB, MIB)]);
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nschedules:\n  s: {{daily: {{interval: 1d, keep: 3}}}}\n\
         jobs:\n  vm1: {{schedule: s, source: {{type: file, path: {}}}}}\n",
        img.display()
    );
    (Server::start_config(&dir.join("store"), &config), img)
}

/// A server config (plaintext on a loopback port 0, base-dir `DIR/store`)
/// with `rest` (schedules, jobs) for servers the test starts itself;
/// returns its path.
fn plaintext_config(dir: &Path, rest: &str) -> PathBuf {
    let base = dir.join("store");
    std::fs::create_dir(&base).unwrap();
    let config = dir.join("server.yaml");
    let text = format!(
        "listen: 127.0.0.1:0\nbase-dir: {}\ninsecure-plaintext: true\n{rest}",
        base.display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn client_bare(args: &[&str]) -> Output {
    Command::new(bin("backy-client"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running backy-client")
}

fn server_bare(args: &[&str]) -> Output {
    Command::new(bin("backy-server"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running backy-server")
}

/// Usage errors exit 2 on both binaries (3, UNKNOWN, for `check`, whose
/// callers read exit codes as states); --help exits 0; with --json the
/// failure is a JSON document on stderr.
#[test]
fn bad_arguments_exit_2_and_3_for_check() {
    for args in [
        &["push"][..],
        &["restore", "vm1"],
        &["status", "--no-such-flag"],
        &["push", "../x"],
        &["--timeout", "0", "status"],
    ] {
        let out = client_bare(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("error:"), "{args:?}: {}", stderr(&out));
    }
    for args in [
        &["check", "--bogus"][..],
        &["--server", "http://x:1", "check", "a", "b"],
    ] {
        let out = client_bare(args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
    }
    let out = client_bare(&["push", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_str(stderr(&out).trim()).expect("one JSON document");
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["error"]["kind"], "usage");
    assert!(doc["error"]["message"].as_str().unwrap().contains("JOB"), "{doc}");
    assert_eq!(client_bare(&["--help"]).status.code(), Some(0));
    assert_eq!(client_bare(&["restore", "--help"]).status.code(), Some(0));

    assert_eq!(server_bare(&["--no-such-flag"]).status.code(), Some(2));
    assert_eq!(
        server_bare(&["expire"]).status.code(),
        Some(2),
        "--dry-run is required"
    );
    assert_eq!(server_bare(&["--help"]).status.code(), Some(0));
}

/// `check-config --config x` and `--config x check-config` are the same,
/// and counts agree with their numbers.
#[test]
fn check_config_takes_config_on_either_side_and_counts_right() {
    let dir = tempfile::tempdir().unwrap();
    let config = plaintext_config(
        dir.path(),
        "schedules:\n  s: {daily: {interval: 1d, keep: 3}}\njobs:\n  vm1: {schedule: s}\n",
    );
    let path = config.to_str().unwrap();
    for args in [
        ["check-config", "--config", path],
        ["--config", path, "check-config"],
    ] {
        let out = server_bare(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(
            stdout(&out).contains(": OK (1 job, 1 schedule, storage "),
            "{args:?}: {}",
            stdout(&out)
        );
    }
}

/// distrust's and forget's help each show their own examples.
#[test]
fn help_examples_belong_to_their_command() {
    let distrust = stdout(&client_bare(&["distrust", "--help"]));
    let forget = stdout(&client_bare(&["forget", "--help"]));
    assert!(distrust.contains("backy-client distrust vm1"), "{distrust}");
    assert!(!distrust.contains("backy-client forget"), "{distrust}");
    assert!(forget.contains("backy-client forget vm1"), "{forget}");
    assert!(!forget.contains("backy-client distrust"), "{forget}");
}

/// --quiet: a successful push prints nothing at all (cron mails nothing);
/// a failing one still says why on stderr and exits 1.
#[test]
fn quiet_push_is_silent_unless_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _img) = one_job(dir.path());
    let out = server.client(&["push", "vm1", "--quiet"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!((stdout(&out), stderr(&out)), (String::new(), String::new()));
    assert_eq!(server.revisions("vm1").len(), 1, "the push happened");

    let out = server.client(&[
        "push",
        "vm1",
        "-q",
        "--force",
        "--source",
        "/nonexistent/disk.img",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
}

/// A push that is not due: silent for cron (no terminal, no -v), one line
/// saying when it is due and that --force pushes now with -v or on a
/// terminal (a pty from `script`); exit 0 either way, nothing pushed.
#[test]
fn a_push_not_due_says_when_on_a_terminal_or_with_v() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _img) = one_job(dir.path());
    server.client_ok(&["push", "vm1"]);
    assert_eq!(server.revisions("vm1").len(), 1, "the first push is due");

    let out = server.client(&["push", "vm1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!((stdout(&out), stderr(&out)), (String::new(), String::new()));

    let out = server.client(&["push", "vm1", "-v"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = stdout(&out);
    assert_eq!(said.lines().count(), 1, "{said:?} {}", stderr(&out));
    assert_not_due_line(&said);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));

    let out = server.client(&["push", "vm1", "-v", "--quiet"]);
    assert!(out.status.code() == Some(2), "-q and -v conflict");

    let line = format!(
        "{} --server {} --config {} push vm1",
        bin("backy-client").display(),
        server.url,
        server.client_config.display()
    );
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("running script (util-linux)");
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let drawn = stdout(&out);
    assert_eq!(drawn.trim_end().lines().count(), 1, "{drawn:?}");
    assert_not_due_line(&drawn);
    assert_eq!(server.revisions("vm1").len(), 1, "nothing was pushed");
}

/// `vm1 is not due until 2026-12-07 00:00:00 UTC (in 5h 54m; daily);
/// --force pushes now`
fn assert_not_due_line(said: &str) {
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%d");
    let today = chrono::Utc::now().format("%Y-%m-%d");
    assert!(said.starts_with("vm1 is not due until "), "{said:?}");
    assert!(
        said.contains(&format!("until {tomorrow} ")) || said.contains(&format!("until {today} ")),
        "{said:?}"
    );
    assert!(said.contains("UTC (in "), "{said:?}");
    assert!(said.contains("daily"), "{said:?}");
    assert!(said.trim_end().ends_with("; --force pushes now"), "{said:?}");
}

/// A host that accepts connections but never answers: the client gives up
/// after --timeout, naming the URL, instead of waiting for HTTP/2 to give
/// up after most of a minute.
#[test]
fn a_silent_server_times_out_naming_the_url() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    // Accepted by the kernel (backlog), never read or answered.
    let client = bin("backy-client");
    let started = Instant::now();
    let out = Command::new(client)
        .args(["--server", &url, "--timeout", "2", "status"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&url) && err.contains("within 2 s"), "{err}");
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");

    let out = client_bare(&["--server", &url, "--timeout", "1", "--json", "status"]);
    let doc: serde_json::Value = serde_json::from_str(stderr(&out).trim()).expect("JSON on stderr");
    assert_eq!(doc["error"]["kind"], "unavailable");
    assert_eq!(doc["error"]["retryable"], true);
    drop(silent);
}

/// `restore JOB -` writes the image to stdout byte for byte (zeros too),
/// the report to stderr; a terminal is refused before anything is fetched.
#[test]
fn restore_to_stdout_streams_the_image_and_refuses_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (server, img) = one_job(dir.path());
    server.client_ok(&["push", "vm1"]);

    let mut child = Command::new(bin("backy-client"))
        .args(["--server", &server.url, "--config"])
        .arg(&server.client_config)
        .args(["restore", "vm1", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut image = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut image).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(image.len() as u64, 12 * MIB);
    assert!(
        image == std::fs::read(&img).unwrap(),
        "the streamed image equals the source"
    );
    assert!(stderr(&out).contains("restored revision"), "{}", stderr(&out));
    assert!(stderr(&out).contains("to standard output"), "{}", stderr(&out));

    // On a terminal (a pty from `script`): refused, nothing written.
    let line = format!(
        "{} --server {} restore vm1 -",
        bin("backy-client").display(),
        server.url
    );
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .output()
        .expect("running script (util-linux)");
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("not writing a disk image to a terminal"), "{text}");
    assert!(text.len() < 1000, "no image data on the terminal");
}

/// Restoring over an existing file keeps its owner, group and mode.
#[test]
fn restore_over_a_file_keeps_owner_group_and_mode() {
    must_be_root();
    let dir = tempfile::tempdir().unwrap();
    let (server, img) = one_job(dir.path());
    server.client_ok(&["push", "vm1"]);
    let target = dir.path().join("vm1-restored.img");
    std::fs::write(&target, b"old contents").unwrap();
    std::os::unix::fs::chown(&target, Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();

    // Of another size: replaced only with --full (issue 30: refused
    // otherwise, as a rollback needs the same size).
    server.client_ok(&["restore", "vm1", "--force", "--full", target.to_str().unwrap()]);
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(file_hash(&target), file_hash(&img));
}

/// `check`: Nagios performance data on the line, `--json` with the verdict
/// per job; every `--json` document carries `"schema": 1`, and ids have one
/// form (the 22-character one that names files) everywhere.
#[test]
fn check_perfdata_json_documents_and_one_id_form() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _img) = one_job(dir.path());
    let pushed: serde_json::Value =
        serde_json::from_str(&server.client_ok(&["push", "vm1", "--json"])).unwrap();
    assert_eq!(pushed["schema"], 1);
    let id = pushed["revision"]["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 22, "{pushed}");
    assert!(
        server.base.join("vm1").join(&id).exists(),
        "the id names the file"
    );
    assert!(
        pushed["revision"].get("short_id").is_none(),
        "one id form: {pushed}"
    );

    let line = server.client_ok(&["check", "vm1"]);
    let (text, perf) = line.trim().split_once(" | ").expect("perfdata after ' | '");
    assert_eq!(text, "BACKY OK: 1 job, all within SLA");
    assert!(
        perf.starts_with("age=") && perf.contains("s;;129600;0; revisions=1;;;0; failures=0;;;0;"),
        "{perf}"
    );
    let all = server.client_ok(&["check"]);
    assert!(
        all.trim()
            .contains("| jobs=1 ok=1 warning=0 critical=0 oldest_age="),
        "{all}"
    );

    let doc: serde_json::Value = serde_json::from_str(&server.client_ok(&["check", "--json"])).unwrap();
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["state"], "OK");
    assert_eq!(doc["exit_code"], 0);
    assert_eq!(doc["jobs"][0]["job"], "vm1");
    assert_eq!(doc["jobs"][0]["sla_window_secs"], 129600);
    assert!(doc["jobs"][0]["age_secs"].as_u64().unwrap() < 600);

    for args in [
        &["status", "--json"][..],
        &["status", "vm1", "--json"],
        &["verify", "vm1", "--json"],
        &["tags", "vm1", "-r", "latest", "add", "manual:x", "--json"],
        &["distrust", "vm1", "-r", "latest", "--dry-run", "--json"],
        &["forget", "vm1", "-r", "latest", "--dry-run", "--json"],
    ] {
        let doc: serde_json::Value = serde_json::from_str(&server.client_ok(args)).unwrap();
        assert_eq!(doc["schema"], 1, "{args:?}: {doc}");
        let text = doc.to_string();
        assert!(text.contains(&id), "{args:?} names the revision {id}: {doc}");
        assert!(!text.contains("short_id"), "{args:?}: {doc}");
    }
    let status = server.status_json("vm1");
    assert_eq!(status["jobs"][0]["sla_overdue_secs"], 0, "0 goes with sla_ok");
    assert_eq!(status["jobs"][0]["sla_ok"], true);

    // A failure with --json: a document on stderr, nothing on stdout.
    let out = server.client(&["status", "nosuchjob", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).is_empty());
    let doc: serde_json::Value = serde_json::from_str(stderr(&out).trim()).unwrap();
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["error"]["kind"], "not_found");
    assert_eq!(doc["error"]["retryable"], false);
    assert!(doc["error"]["message"].as_str().unwrap().contains("nosuchjob"));
}

/// `status` without a job: one line per job with the SLA, the last backup
/// and its age, when it is next due, revisions, disk used (shared extents
/// once) and failures, then the store's use; `status JOB` shows ages
/// beside the UTC dates.
#[test]
fn status_lines_show_ages_and_what_an_operator_looks_for() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _img) = one_job(dir.path());
    server.client_ok(&["push", "vm1"]);
    let text = server.client_ok(&["status"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for column in [
        "SLA",
        "Last backup (UTC)",
        "Next due (UTC)",
        "Revs",
        "Used",
        "Failures",
    ] {
        assert!(lines[0].contains(column), "{column}: {text}");
    }
    assert!(
        lines[1].starts_with("vm1 ") && lines[1].contains(" OK "),
        "{text}"
    );
    assert!(lines[1].contains("s ago)") && lines[1].contains("(in "), "{text}");
    assert!(lines[2].starts_with("1 job, 1 revision, "), "{text}");
    assert!(lines[3].starts_with("store: "), "{text}");

    let one = server.client_ok(&["status", "vm1"]);
    assert!(one.contains(" ago)  "), "{one}");
    assert!(one.contains("\n1 revision, "), "{one}");
}

/// Under systemd (stderr is the journal, as JOURNAL_STREAM says), each log
/// line starts with its syslog priority; the plaintext warning names the
/// port actually bound. Elsewhere lines have no such prefix.
#[test]
fn journald_lines_carry_priorities() {
    let dir = tempfile::tempdir().unwrap();
    let config = plaintext_config(dir.path(), "jobs:\n  vm1: {schedule: none}\n");
    let log = dir.path().join("journal.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let mut child = Command::new(bin("backy-server"))
        .arg("--config")
        .arg(&config)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the server to listen", Duration::from_secs(30), || {
        read().contains("listening on")
    });
    let text = read();
    let _ = child.kill();
    let _ = child.wait();
    let listening = text.lines().find(|l| l.contains("listening on")).unwrap();
    assert!(listening.starts_with("<6>"), "info is priority 6: {text}");
    let port = listening.rsplit(':').next().unwrap().trim();
    assert_ne!(port, "0");
    let warning = text
        .lines()
        .find(|l| l.contains("WITHOUT TLS"))
        .expect("plaintext warning");
    assert!(warning.starts_with("<4>"), "a warning is priority 4: {text}");
    assert!(
        warning.contains(&format!("127.0.0.1:{port}")),
        "the bound port: {warning}"
    );
    assert!(text.lines().all(|l| l.starts_with('<')), "{text}");

    // Not the journal: the same line without a priority.
    let dir2 = tempfile::tempdir().unwrap();
    let (server, _img) = one_job(dir2.path());
    // wait_log: the reader thread hands the address over before it files the line.
    let line = server.wait_log(0, "listening on");
    assert!(!line.starts_with('<'), "{line}");
}

/// The agent logs at info by default, as a service should: the connection,
/// each ordered push and its outcome.
#[test]
fn the_agent_logs_connections_orders_and_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\nschedules:\n  s: {{daily: {{interval: 1d, keep: 3}}}}\n\
         jobs:\n  vm1: {{schedule: s, client: hv01, source: {{type: file, path: {}}}}}\n",
        img.display()
    );
    let server = Server::start_config(&dir.path().join("store"), &config);
    // A manual revision first: the ordered push builds on it (its parent
    // appears in the log) and is due (no daily revision yet).
    server.client_ok(&["push", "vm1", "--force", "--tags", "manual:first"]);
    let mut agent = server.agent(&["agent", "--name", "hv01"]);
    wait_for("the ordered push to commit", Duration::from_secs(60), || {
        server.revisions("vm1").len() == 2
    });
    wait_for("the agent to log the outcome", Duration::from_secs(10), || {
        agent.log().contains("push committed")
    });
    agent.terminate();
    let log = agent.log();
    assert!(log.contains("connected to http://127.0.0.1:"), "{log}");
    assert!(
        log.contains("running ordered push") && log.contains("vm1"),
        "{log}"
    );
    assert!(log.contains("INFO"), "{log}");
    // Issue 29, item 12: a scheduled order is not called forced, and ids
    // are short, as status shows them.
    assert!(!log.contains("forced"), "{log}");
    assert!(log.contains("reason="), "{log}");
    assert!(!has_uuid(&log), "a full UUID in the agent's log:\n{log}");
}

/// Whether `text` holds a UUID in its hyphenated form.
fn has_uuid(text: &str) -> bool {
    text.as_bytes().windows(36).any(|w| {
        w.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
    })
}

/// Issue 29, item 8: bash completes options after a subcommand, for both
/// binaries (clap_complete names the case arms of a hyphenated binary
/// differently from its dispatcher; the scripts are fixed up).
#[test]
fn bash_completes_options_after_a_subcommand() {
    for (binary, words, wanted) in [
        ("backy-client", "push --so", "--source"),
        ("backy-client", "restore --fo", "--force"),
        ("backy-server", "expire --dr", "--dry-run"),
    ] {
        let script = Command::new(bin(binary))
            .args(["completions", "bash"])
            .output()
            .unwrap();
        assert!(script.status.success(), "{}", stderr(&script));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("completion.bash");
        std::fs::write(&path, &script.stdout).unwrap();
        // As bash calls a completion function: COMP_WORDS, COMP_CWORD, and
        // the arguments (command, word being completed, word before it).
        let words: Vec<&str> = std::iter::once(binary).chain(words.split(' ')).collect();
        let program = format!(
            "source {path}; f=$(complete -p {binary} | sed -E 's/.*-F ([^ ]+).*/\\1/'); \
             COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; \
             $f {binary} '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            path = path.display(),
            words = words.join(" "),
            cword = words.len() - 1,
            line = words.join(" "),
            cur = words[words.len() - 1],
            prev = words[words.len() - 2],
        );
        let out = Command::new("bash").args(["-c", &program]).output().unwrap();
        assert!(out.status.success(), "{binary}: {}", stderr(&out));
        let offered: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert!(
            offered.contains(&wanted),
            "{binary} {words:?}<TAB> offers {offered:?}, not {wanted}"
        );
    }
}

/// Issue 29, item 9: a reader that goes away (`| head -c 10`) ends every
/// output quietly: no panic, no message, exit 0.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    for (binary, args) in [
        ("backy-client", "completions fish"),
        ("backy-client", "completions bash"),
        ("backy-server", "completions zsh"),
        ("backy-client", "--help"),
        ("backy-server", "hash-token --help"),
    ] {
        let program = format!(
            "set -o pipefail; {} {args} | head -c 10 > /dev/null",
            bin(binary).display()
        );
        let out = Command::new("bash").args(["-c", &program]).output().unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{binary} {args} | head -c 10: {:?}\n{}",
            out.status,
            stderr(&out)
        );
    }
}
