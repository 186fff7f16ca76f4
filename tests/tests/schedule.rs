//! Server-owned schedules end to end: agents for two client identities
//! receive orders when their jobs are due, expiry removes exactly what it
//! should from disk, status shows SLA and next due, and a server killed
//! mid-run loses nothing while the agents reconnect.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use support::*;

const CONFIG: &str = "
listen: 127.0.0.1:PORT
base-dir: BASE
schedules:
  fast:
    often: {interval: 2s, keep: 2}
    rarely: {interval: 6s, keep: 1}
jobs:
  vm1: {schedule: fast, client: hv01, source: {type: file, path: IMG1}}
  vm2: {schedule: fast, client: hv02, source: {type: file, path: IMG2}}
  vm3: {schedule: fast, client: nobody, source: {type: file, path: IMG1}}
";

/// A revision as first listed: its timestamp and tags then.
type Sighting = (chrono::DateTime<chrono::Utc>, BTreeSet<String>);

/// Records every revision of `job` listed now that was not seen before;
/// returns the listing when it was stable (the same twice in a row: no
/// commit or expiry ran while it was read).
fn sight(
    server: &Server,
    job: &str,
    seen: &mut std::collections::BTreeMap<String, Sighting>,
) -> Option<Vec<serde_json::Value>> {
    let first = server.revisions(job);
    let listed = server.revisions(job);
    for r in first.iter().chain(&listed) {
        let at = chrono::DateTime::parse_from_rfc3339(r["timestamp"].as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc);
        seen.entry(r["id"].as_str().unwrap().to_string())
            .or_insert_with(|| (at, tags_of(r)));
    }
    let key = |l: &[serde_json::Value]| -> Vec<(String, BTreeSet<String>)> {
        l.iter()
            .map(|r| (r["id"].as_str().unwrap().to_string(), tags_of(r)))
            .collect()
    };
    (key(&first) == key(&listed)).then_some(listed)
}

/// Expiry removed nothing it had to keep: per tag, the newest `keep`
/// revisions ever seen with it and every one younger than `keep ×
/// interval` (at `now`, after `listed` was taken) are listed with it still.
fn assert_expiry_kept(
    seen: &std::collections::BTreeMap<String, Sighting>,
    listed: &[serde_json::Value],
    rules: &[(&str, i64, usize)],
    now: chrono::DateTime<chrono::Utc>,
) {
    let listed: std::collections::BTreeMap<String, BTreeSet<String>> = listed
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), tags_of(r)))
        .collect();
    for &(tag, interval_secs, keep) in rules {
        let mut with: Vec<(&chrono::DateTime<chrono::Utc>, &String)> = seen
            .iter()
            .filter(|(_, (_, tags))| tags.contains(tag))
            .map(|(id, (at, _))| (at, id))
            .collect();
        with.sort();
        let window = chrono::Duration::seconds(interval_secs * keep as i64);
        for (i, (at, id)) in with.iter().rev().enumerate() {
            if i < keep || **at > now - window {
                assert!(
                    listed.get(*id).is_some_and(|t| t.contains(tag)),
                    "{id} ({at}) must keep {tag:?}: among the newest {keep} or inside {window}; listed {listed:?}"
                );
            }
        }
    }
}

fn ids(server: &Server, job: &str) -> Vec<String> {
    server.short_ids(job)
}

/// Every listed revision has its image, manifest and metadata, and no file
/// in the job directory belongs to anything unlisted. Agents may commit
/// (or expiry delete) meanwhile: a revision's files appear just before the
/// listing names it, so the check takes a listing that did not change
/// while the directory was read, retried until one agrees.
fn assert_files_match_listing(server: &Server, base: &Path, job: &str) {
    let files = || -> BTreeSet<String> {
        std::fs::read_dir(base.join(job))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.') && n != "latest")
            .collect()
    };
    let want_of = |listed: &[String]| -> BTreeSet<String> {
        listed
            .iter()
            .flat_map(|id| [id.clone(), format!("{id}.digests"), format!("{id}.rev")])
            .collect()
    };
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let agreed = (0..200).any(|_| {
        let before = ids(server, job);
        let have = files();
        let after = ids(server, job);
        last = (have, want_of(&after));
        before == after && last.0 == last.1
    });
    assert!(
        agreed,
        "{job}: files on disk vs listed revisions: {:?} vs {:?}",
        last.0, last.1
    );
}

#[test]
fn agents_back_up_when_due_and_expiry_keeps_what_the_schedule_says() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img1 = dir.path().join("vm1.img");
    let img2 = dir.path().join("vm2.img");
    make_image(&img1, 64 * MIB, &[(0, MIB), (10 * MIB, 3 * MIB)]);
    make_image(&img2, 32 * MIB, &[(5 * MIB, 2 * MIB)]);
    let port = free_port();
    let config = CONFIG
        .replace("PORT", &port.to_string())
        .replace("IMG1", img1.to_str().unwrap())
        .replace("IMG2", img2.to_str().unwrap());
    let mut server = Server::start_config(&base, &config);

    let _a1 = server.agent(&["agent", "--name", "hv01", "-vv"]);
    let _a2 = server.agent(&["agent", "--name", "hv02", "--workers", "1"]);

    // Collect every revision id ever listed while the agents work, and
    // check expiry against the schedule at every sighting.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut sightings = std::collections::BTreeMap::new();
    let rules = [("often", 2, 2), ("rarely", 6, 1)];
    let mut checks = 0;
    wait_for(
        "six pushes of vm1 and three of vm2",
        Duration::from_secs(90),
        || {
            if let Some(listed) = sight(&server, "vm1", &mut sightings) {
                assert_expiry_kept(&sightings, &listed, &rules, chrono::Utc::now());
                checks += 1;
            }
            seen.extend(ids(&server, "vm1"));
            seen.extend(ids(&server, "vm2"));
            seen.len() >= 9 && !ids(&server, "vm2").is_empty()
        },
    );

    assert!(checks >= 10, "expiry checked against the schedule {checks} times");

    // The first backup carried every tag.
    // Expiry keeps: "often" newest 2 plus those within 4 s, "rarely" the
    // newest 1 plus those within 6 s; so vm1 never lists more than a few.
    let listed = ids(&server, "vm1");
    assert!(listed.len() <= 6, "expiry bounds the revisions kept: {listed:?}");
    let vm1_seen: Vec<_> = seen
        .iter()
        .filter(|id| !ids(&server, "vm2").contains(id))
        .collect();
    assert!(vm1_seen.len() > listed.len(), "some revisions were expired");
    for r in server.revisions("vm1") {
        let tags: Vec<&str> = r["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(!tags.is_empty(), "no revision is kept without tags: {r}");
        assert!(
            tags.iter().all(|t| ["often", "rarely"].contains(t)),
            "only schedule tags: {tags:?}"
        );
    }
    assert_files_match_listing(&server, &base, "vm1");
    // vm3 belongs to no connected agent: never backed up.
    assert!(ids(&server, "vm3").is_empty(), "vm3 has no agent");

    // Status: SLA OK, next due in the future with tags.
    let status = server.status_json("vm1");
    let job = &status["jobs"][0];
    assert_eq!(job["sla_ok"], true, "{job}");
    assert!(job["next_due"].as_str().is_some_and(|s| !s.is_empty()), "{job}");
    assert!(!job["next_tags"].as_array().unwrap().is_empty(), "{job}");
    let human = server.client_ok(&["status", "vm1"]);
    assert!(human.contains("SLA: OK"), "{human}");

    // Kill the server in the middle of the run; nothing committed is lost
    // and the agents reconnect and carry on.
    let before_kill: BTreeSet<String> = ids(&server, "vm2").into_iter().collect();
    server.kill();
    server.restart();
    let mut after: BTreeSet<String> = BTreeSet::new();
    wait_for("vm2 backed up after the restart", Duration::from_secs(60), || {
        after = ids(&server, "vm2").into_iter().collect();
        after.difference(&before_kill).count() >= 2
    });
    for job in ["vm1", "vm2"] {
        assert_files_match_listing(&server, &base, job);
        let partial: Vec<_> = std::fs::read_dir(base.join(job).join(".partial"))
            .unwrap()
            .collect();
        // A push may be running right now; anything in .partial is its own.
        assert!(
            partial.len() <= 2,
            "{job}: .partial holds only a running push: {partial:?}"
        );
        let verify = server.client(&["verify", job, "-r", "all"]);
        let text = String::from_utf8_lossy(&verify.stdout);
        assert!(
            verify.status.success(),
            "{job}: verify after restart:\n{text}\n{}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    // Past its first SLA window (1.5 x 2 s after the server first knew
    // it), a job never backed up is CRITICAL.
    let check = server.client(&["check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        check.status.code(),
        Some(2),
        "vm3 was never backed up: CRITICAL; {text}"
    );
    assert!(text.contains("vm3: no backup yet"), "{text}");
}

#[test]
fn tags_forget_distrust_and_forced_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    make_image(&img, 40 * MIB, &[(0, 9 * MIB), (20 * MIB, MIB)]);
    let config = "
listen: 127.0.0.1:0
base-dir: BASE
schedules:
  s: {daily: {interval: 1d, keep: 3}}
jobs:
  vm1: {schedule: s, source: {type: file, path: IMG}}
"
    .replace("IMG", img.to_str().unwrap());
    let server = Server::start_config(&base, &config);
    let src = img.to_str().unwrap();

    // First push: due (no history) with all tags.
    server.client_ok(&["push", "vm1"]);
    let revs = server.revisions("vm1");
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0]["tags"], serde_json::json!(["daily"]));
    // Not due again within the day: silent, exit 0, nothing pushed.
    let out = server.client(&["push", "vm1"]);
    assert!(out.status.success());
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "not due is silent: {out:?}"
    );
    assert_eq!(server.revisions("vm1").len(), 1);
    // Unknown tags without manual: are refused unless forced.
    let out = server.client(&["push", "vm1", "--force", "--tags", "manual:keep,daily"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        server.revisions("vm1")[1]["tags"],
        serde_json::json!(["daily", "manual:keep"])
    );

    // Tags: add, remove, set; an unknown revision is NOT_FOUND.
    server.client_ok(&["tags", "vm1", "-r", "1", "add", "manual:x"]);
    assert_eq!(
        server.revisions("vm1")[0]["tags"],
        serde_json::json!(["daily", "manual:x"])
    );
    server.client_ok(&["tags", "vm1", "-r", "1", "remove", "daily"]);
    assert_eq!(
        server.revisions("vm1")[0]["tags"],
        serde_json::json!(["manual:x"])
    );
    let out = server.client(&["tags", "vm1", "-r", "nosuchrev", "add", "manual:y"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NOT_FOUND") && err.lines().count() == 1, "{err}");

    // Distrusted revisions are never parents: with every revision
    // distrusted the next push is a full one and sends every non-zero block
    // again.
    server.client_ok(&["distrust", "vm1", "-r", "latest"]);
    let check = server.client(&["check", "vm1"]);
    assert_eq!(check.status.code(), Some(1), "a distrusted revision: WARNING");
    assert!(String::from_utf8_lossy(&check.stdout).starts_with("BACKY WARNING: vm1: 1 distrusted"));
    server.client_ok(&["distrust", "vm1", "-r", "all"]);
    assert!(server.revisions("vm1").iter().all(|r| r["trust"] == "distrusted"));
    let check = server.client(&["check", "vm1"]);
    assert_eq!(
        check.status.code(),
        Some(2),
        "no trusted revision: SLA violated, CRITICAL"
    );
    server.client_ok(&["push", "vm1", "--force", "--source", src]);
    let revs = server.revisions("vm1");
    assert_eq!(revs.len(), 3);
    assert_eq!(
        revs[2]["parent_id"],
        serde_json::Value::Null,
        "full push after distrust"
    );
    assert_eq!(
        revs[2]["bytes_received"],
        10 * MIB,
        "all data sent again (zero granules of its blocks as zero ranges)"
    );

    // Verify finds a flipped byte, marks the revision distrusted, exits 1.
    let newest = revs[2]["id"].as_str().unwrap().to_string();
    let stored = base.join("vm1").join(&newest);
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&stored).unwrap(), &mut byte, 5 * MIB + 7)
        .unwrap();
    write_at(&stored, 5 * MIB + 7, &[byte[0] ^ 0xff]);
    let out = server.client(&["verify", "vm1", "-r", &newest]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("DAMAGED") && text.contains(&(4 * MIB).to_string()),
        "{text}"
    );
    assert_eq!(server.revisions("vm1")[2]["trust"], "distrusted");
    // The first revision verifies clean: trust restored as "verified".
    let out = server.client_ok(&["verify", "vm1", "-r", "2"]);
    assert!(out.contains("OK"), "{out}");
    assert_eq!(server.revisions("vm1")[0]["trust"], "verified");

    // A distrusted revision still restores, block by block, with a warning
    // naming the damaged block.
    let target = dir.path().join("damaged.img");
    let out = server.client(&["restore", "vm1", "-r", &newest, target.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning: 1 block does not match") && text.contains(&(4 * MIB).to_string()),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("distrusted"));
    assert_eq!(
        file_hash(&target),
        file_hash(&stored),
        "restored as stored, damage included"
    );

    // `latest` (for people restoring with dd) names the newest revision.
    let latest = || std::fs::read_link(base.join("vm1").join("latest")).unwrap();
    assert_eq!(latest(), std::path::PathBuf::from(&newest));

    // Forget removes the revision and its files; `latest` follows.
    server.client_ok(&["forget", "vm1", "-r", &newest]);
    assert_eq!(server.revisions("vm1").len(), 2);
    assert!(!stored.exists());
    assert_files_match_listing(&server, &base, "vm1");
    let listed = ids(&server, "vm1");
    assert_eq!(latest(), std::path::PathBuf::from(listed.last().unwrap()));
}

/// The server decides when, the hypervisor what: an agent runs only the
/// jobs its own client.yaml lists. An order for any other job of its
/// identity runs nothing and comes back as a failure that `status` and
/// `check` show.
#[test]
fn an_agent_runs_only_the_jobs_its_client_config_lists() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let img = dir.path().join("vm1.img");
    make_image(&img, 8 * MIB, &[(0, MIB)]);
    // vm9 names hv01 as its client on the server, but hv01's client.yaml
    // (made from the jobs' `source:` entries) does not list it.
    let config = "
listen: 127.0.0.1:0
base-dir: BASE
schedules:
  fast: {often: {interval: 2s, keep: 2}}
jobs:
  vm1: {schedule: fast, client: hv01, source: {type: file, path: IMG}}
  vm9: {schedule: fast, client: hv01}
"
    .replace("IMG", img.to_str().unwrap());
    let server = Server::start_config(&base, &config);
    let client_yaml = std::fs::read_to_string(&server.client_config).unwrap();
    assert!(
        client_yaml.contains("vm1") && !client_yaml.contains("vm9"),
        "{client_yaml}"
    );
    let _agent = server.agent(&["agent", "--name", "hv01"]);
    let mut last_error = String::new();
    wait_for("vm1 backed up and vm9 refused", Duration::from_secs(60), || {
        let vm9 = server.status_json("vm9");
        last_error = vm9["jobs"][0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        !ids(&server, "vm1").is_empty() && !last_error.is_empty()
    });
    assert!(
        last_error.contains("job vm9 is not listed in") && last_error.contains("nothing was run"),
        "{last_error}"
    );
    assert!(ids(&server, "vm9").is_empty());
    let human = server.client_ok(&["status", "vm9"]);
    assert!(human.contains("not listed"), "{human}");
}
