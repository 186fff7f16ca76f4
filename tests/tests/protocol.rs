//! The protocol's contract: versions exchanged first (an incompatible pair
//! fails with one line naming both), and clients that act on the typed
//! details of an error, never on its wording.

mod support;

use backy_proto::backy_client::BackyClient;
use backy_proto::*;
use std::path::Path;
use support::*;
use tonic::Code;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_versions_fail_with_one_line_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("store");
    let mut server = tokio::task::spawn_blocking(move || Server::start(&base, "  vm1: {schedule: none}\n"))
        .await
        .unwrap();

    // A client declaring a protocol this server no longer accepts.
    let mut c = BackyClient::connect(server.url.clone()).await.unwrap();
    let mut req = tonic::Request::new(StatusRequest { job: "vm1".into() });
    req.metadata_mut().insert(PROTOCOL_HEADER, "0".parse().unwrap());
    req.metadata_mut()
        .insert(VERSION_HEADER, "0.0.1".parse().unwrap());
    let e = c.status(req).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        format!(
            "backy-client 0.0.1 speaks protocol 0; this backy-server {VERSION} speaks {PROTOCOL} and \
             accepts {MIN_CLIENT_PROTOCOL} or newer: upgrade backy-client"
        )
    );
    assert_eq!(
        error_of_detail(e.details()),
        Some((
            backy_common::ErrorKind::FailedPrecondition,
            backy_common::Reason::IncompatibleVersion
        ))
    );
    // The same request declaring this build's protocol is served.
    let mut req = tonic::Request::new(StatusRequest { job: "vm1".into() });
    req.metadata_mut().insert(PROTOCOL_HEADER, PROTOCOL.into());
    c.status(req).await.unwrap();
    let hello = c
        .hello(HelloRequest {
            protocol: PROTOCOL,
            version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((hello.protocol, hello.version.as_str()), (PROTOCOL, VERSION));

    // A server too old for this client: the client says so and stops.
    let out = tokio::task::spawn_blocking(move || {
        server.restart_with_env(&[("BACKY_FAULT", "mode:protocol-0")]);
        server.client(&["status", "vm1"])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "backy-server {VERSION} speaks protocol 0; this backy-client {VERSION} speaks protocol {PROTOCOL} \
             and needs {MIN_SERVER_PROTOCOL} or newer: upgrade backy-server"
        )),
        "{err}"
    );
}

fn write_ranges(path: &Path, ranges: &[(u64, u64)]) {
    let text: String = ranges.iter().map(|(o, l)| format!("{o} {l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// The client explains a manifest mismatch after a `--changed-ranges`
/// push from the error's typed reason: with every server message reworded
/// it explains it the same way.
#[test]
fn clients_act_on_error_details_not_on_wording() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("vm1.img");
    make_image(&src, 16 * MIB, &[(0, 8 * MIB)]);
    let mut server = Server::start(&dir.path().join("store"), "  vm1: {schedule: none}\n");
    let img = src.to_str().unwrap();
    server.client_ok(&["push", "vm1", "--source", img]);
    // Two writes in one block, granules apart; the list names only the first.
    write_at(&src, MIB, &pattern(1, 4096));
    write_at(&src, MIB + (256 << 10), &pattern(2, 4096));
    let list = dir.path().join("ranges");
    write_ranges(&list, &[(MIB, 4096)]);
    let push = |server: &Server| {
        server.client(&[
            "push",
            "vm1",
            "--source",
            img,
            "--changed-ranges",
            list.to_str().unwrap(),
        ])
    };
    for reworded in [false, true] {
        if reworded {
            server.restart_with_env(&[("BACKY_FAULT", "mode:reword-errors")]);
        }
        let out = push(&server);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(
            err.contains("does not name every byte written since the parent revision")
                && err.contains("DATA_LOSS"),
            "reworded {reworded}: {err}"
        );
        assert_eq!(err.contains("reworded for a test"), reworded, "{err}");
        assert_eq!(server.revisions("vm1").len(), 1, "nothing committed");
    }
}
