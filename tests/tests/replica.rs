//! The source side of replication: a `replica` identity reads status,
//! manifests and revision data of its jobs and changes nothing, and a
//! restore stream relative to a base revision the caller holds carries
//! only the blocks whose digests differ, which applied to a copy of the
//! base give the revision byte for byte.

mod support;

use backy_common::token::{generate_token, hash_token};
use backy_proto::backy_client::BackyClient;
use backy_proto::restore_frame::Frame;
use backy_proto::RestoreRequest;
use std::os::unix::fs::FileExt;
use std::path::Path;
use support::*;

fn token_file(dir: &Path, name: &str, token: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, token).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.display().to_string()
}

#[test]
fn a_replica_reads_and_fetches_only_what_changed_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("vm1.img");
    make_image(&img, 40 * MIB, &[(0, 12 * MIB), (20 * MIB, 8 * MIB)]);
    let (hv, rep) = (generate_token(), generate_token());
    let config = format!(
        "listen: 127.0.0.1:0\nbase-dir: BASE\n\
         clients:\n  hv01: {{token-hash: '{}'}}\n  offsite: {{role: replica, token-hash: '{}', jobs: [vm1]}}\n\
         jobs:\n  vm1: {{schedule: none, client: hv01, source: {{type: file, path: {}}}}}\n  \
         vm2: {{schedule: none, client: hv01, source: {{type: file, path: {}}}}}\n",
        hash_token(&hv).unwrap(),
        hash_token(&rep).unwrap(),
        img.display(),
        img.display()
    );
    let base = d.join("backy");
    std::fs::create_dir_all(&base).unwrap();
    let server = Server::start_config(&base, &config);
    let hv = token_file(d, "hv.token", &hv);
    let rep_file = token_file(d, "rep.token", &rep);
    let as_hv = |args: &[&str]| {
        let mut all = vec!["--token-file", hv.as_str()];
        all.extend_from_slice(args);
        server.client_ok(&all)
    };
    as_hv(&["push", "vm1"]);
    as_hv(&["push", "vm2"]);
    // Two blocks change: one inside the data, one in a hole.
    write_at(&img, 5 * MIB, b"changed");
    write_at(&img, 33 * MIB, b"new data");
    as_hv(&["push", "vm1"]);
    let status: serde_json::Value = serde_json::from_str(&as_hv(&["--json", "status", "vm1"])).unwrap();
    let revs = status["jobs"][0]["revisions"].as_array().unwrap().clone();
    let full = |r: &serde_json::Value| r["id"].as_str().unwrap().to_string();
    let (a, b) = (full(&revs[0]), full(&revs[1]));
    let before = server.snapshot_tree();

    // The replica: status and restore of its job, nothing that changes it.
    let as_rep = |args: &[&str]| {
        let mut all = vec!["--token-file", rep_file.as_str()];
        all.extend_from_slice(args);
        server.client(&all)
    };
    assert!(as_rep(&["status", "vm1"]).status.success());
    let restored_a = d.join("a.img");
    let out = as_rep(&["restore", "vm1", "-r", &a, restored_a.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for args in [
        vec!["push", "vm1", "--force"],
        vec!["forget", "vm1", "-r", "latest"],
        vec!["tags", "vm1", "-r", "latest", "add", "manual:x"],
        vec!["distrust", "vm1", "-r", "latest"],
        vec!["verify", "vm1"],
        vec!["status", "vm2"],
    ] {
        let out = as_rep(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("is a replica: it may read status and revisions, not change them")
                || err.contains("may not access job vm2"),
            "{args:?}: {err}"
        );
    }
    // Nothing of the jobs changed; the source only noted the fetch.
    let mut after = server.snapshot_tree();
    after.retain(|(path, _, _)| path != ".replicas-fetched.yaml");
    assert_eq!(after, before, "the replica changed nothing");
    let status: serde_json::Value = serde_json::from_str(&as_hv(&["--json", "status", "vm1"])).unwrap();
    let fetched = &status["jobs"][0]["fetched_by"];
    assert_eq!(
        (&fetched[0]["replica"], &fetched[0]["revision"]),
        (&"offsite".into(), &a.clone().into()),
        "{status}"
    );

    // B relative to A: only the two changed blocks travel.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (sent, patched) = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {rep}").parse().unwrap();
        let mut c = BackyClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", header.clone());
            Ok(r)
        })
        .max_decoding_message_size(64 << 20);
        // A base the server does not have: refused, naming it.
        let bogus = uuid::Uuid::new_v4().to_string();
        let e = c
            .restore(RestoreRequest {
                job: "vm1".into(),
                revision: b.clone(),
                base: bogus.clone(),
                from: 0,
                ..Default::default()
            })
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("no longer exists"), "{}", e.message());

        let patched = d.join("b-from-a.img");
        std::fs::copy(&restored_a, &patched).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&patched).unwrap();
        let mut stream = c
            .restore(RestoreRequest {
                job: "vm1".into(),
                revision: b.clone(),
                base: a.clone(),
                from: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut sent = 0u64;
        while let Some(frame) = stream.message().await.unwrap() {
            match frame.frame.unwrap() {
                Frame::Begin(info) => file.set_len(info.size).unwrap(),
                Frame::Data(r) => {
                    sent += r.data.len() as u64;
                    file.write_all_at(&r.data, r.offset).unwrap();
                }
                Frame::Zero(z) => file.write_all_at(&vec![0; z.length as usize], z.offset).unwrap(),
                Frame::End(_) => {}
            }
        }
        (sent, patched)
    });
    // Only the changed 64 KiB granules: the one at 5 MiB (compared with
    // the base's block) and the one in the hole (the rest of that block
    // is zeros, sent as a zero range).
    assert_eq!(sent, 2 * (64 << 10), "only the changed granules travel");
    assert_eq!(
        file_hash(&patched),
        file_hash(&img),
        "base + difference = revision"
    );
}
