//! The NBD export end to end, with real tools on real sockets: a real
//! server on btrfs, `backy-client export` as its own process, and
//! `qemu-img`, `qemu-io`, `nbdinfo`, `nbdfuse` and QEMU as the readers.
//! What must hold: the bytes served are the revision's, holes are
//! reported as holes, a damaged stored block is an I/O error and never
//! other bytes, writes through the overlay never reach the server, and a
//! server that goes away and comes back costs errors, not wrong data.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use support::*;

const MIB: u64 = 1 << 20;
/// The image: 48 MiB, data in 0..20 MiB and 28..36 MiB, holes elsewhere.
const SIZE: u64 = 48 * MIB;
const EXTENTS: [(u64, u64); 2] = [(0, 20 * MIB), (28 * MIB, 8 * MIB)];

struct World {
    server: Server,
    work: PathBuf,
    /// The image of the first revision, kept as it was pushed.
    frozen: PathBuf,
    /// The first revision's short id (a second one exists after it).
    rev: String,
    _fs: LoopFs,
}

/// A server with two revisions of vm1 (the second with changes), on a
/// fixed port so that it can come back on the same address.
fn world() -> World {
    let fs = LoopFs::new("btrfs", 1 << 30);
    let work = fs.mount.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let src = work.join("vm1.img");
    make_image(&src, SIZE, &EXTENTS);
    let config = format!(
        "listen: 127.0.0.1:{}\nbase-dir: BASE\njobs:\n  vm1: {{schedule: none}}\n",
        free_port()
    );
    let server = Server::start_config(&fs.mount.join("base"), &config);
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap()]);
    let frozen = work.join("rev1.img");
    sparse_copy(&src, &frozen);
    write_at(&src, 3 * MIB, &pattern(99, 8192));
    server.client_ok(&["push", "vm1", "--source", src.to_str().unwrap(), "--force"]);
    let rev = server.short_ids("vm1")[0].clone();
    World {
        server,
        work,
        frozen,
        rev,
        _fs: fs,
    }
}

/// A running `backy-client export`.
struct Export {
    child: Child,
    uri: String,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Export {
    fn start(w: &World, rev: &str, extra: &[&str]) -> Export {
        let socket = w.work.join(format!("export-{}.sock", rand_suffix()));
        let mut args = vec!["-r", rev, "--socket", socket.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (export, _) = spawn_export(w, &args)
            .unwrap_or_else(|o| panic!("export: {}", String::from_utf8_lossy(&o.stderr)));
        assert_eq!(export.uri, format!("nbd+unix:///vm1?socket={}", socket.display()));
        export
    }

    /// SIGTERM, and the summary it printed.
    fn stop(mut self) -> serde_json::Value {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let status = self.child.wait().expect("wait");
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        assert!(status.success(), "export exited {status:?}: {rest}");
        serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("summary {rest:?}: {e}"))
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn tool(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (scripts/test-deps.sh installs it)"))
}

fn tool_ok(cmd: &str, args: &[&str]) -> String {
    let out = tool(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img convert` of the export into `out`, which must succeed.
fn convert(uri: &str, out: &Path) {
    tool_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", uri, out.to_str().unwrap()],
    );
}

/// `len` bytes at `offset` read through the export with `qemu-img dd`
/// (64 KiB blocks).
fn read_range(uri: &str, dir: &Path, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let out_path = dir.join(format!("range-{}.bin", rand_suffix()));
    let bs = 64 << 10;
    let out = tool(
        "qemu-img",
        &[
            "dd",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("bs={bs}"),
            &format!("skip={}", offset / bs),
            // qemu-img dd counts the skipped blocks too.
            &format!("count={}", (offset + len) / bs),
            &format!("if={uri}"),
            &format!("of={}", out_path.display()),
        ],
    );
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let data = std::fs::read(&out_path).unwrap();
    std::fs::remove_file(&out_path).unwrap();
    Ok(data)
}

/// The error of a read that must fail (its bytes are never printed).
fn read_fails(uri: &str, dir: &Path, offset: u64, len: u64) -> String {
    match read_range(uri, dir, offset, len) {
        Ok(_) => panic!("the read of {len} bytes at {offset} returned data"),
        Err(e) => e,
    }
}

fn bytes_of(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len as usize];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

#[test]
fn qemu_img_reads_the_revision_and_nbdinfo_sees_its_holes() {
    must_be_root();
    let w = world();
    let export = Export::start(&w, &w.rev, &[]);

    let copy = w.work.join("copy.img");
    convert(&export.uri, &copy);
    assert_eq!(
        file_hash(&copy),
        file_hash(&w.frozen),
        "the first revision, byte for byte"
    );
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &export.uri,
            w.frozen.to_str().unwrap(),
        ],
    );

    // base:allocation: the revision's zero blocks (4 MiB) are holes.
    let map = tool_ok("nbdinfo", &["--map", "--json", &export.uri]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut holes = Vec::new();
    let mut data = Vec::new();
    for e in map.as_array().expect("extents") {
        let (offset, len, kind) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        );
        if kind == 3 {
            holes.push((offset, len));
        } else {
            assert_eq!(kind, 0, "data or hole+zero only: {e}");
            data.push((offset, len));
        }
    }
    assert_eq!(holes, vec![(20 * MIB, 8 * MIB), (36 * MIB, 12 * MIB)], "{map}");
    assert_eq!(data, vec![(0, 20 * MIB), (28 * MIB, 8 * MIB)], "{map}");

    // Not writable: a write is refused, nothing changes.
    let out = tool("qemu-io", &["-f", "raw", "-c", "write -P 0xab 0 4k", &export.uri]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("read-only") || text.contains("Operation not permitted"),
        "{text}"
    );

    let served = export.stop();
    // qemu-img convert skipped the holes: only data was fetched.
    assert_eq!(served["fetched_bytes"].as_u64(), Some(28 * MIB), "{served}");
    assert_eq!(served["failed_fetches"].as_u64(), Some(0), "{served}");
}

#[test]
fn a_damaged_stored_block_is_an_io_error_never_other_bytes() {
    must_be_root();
    let w = world();
    // One byte flipped in the stored image, inside block 2 (8..12 MiB).
    let stored = w.server.base.join("vm1").join(&w.rev);
    let mut b = bytes_of(&stored, 10 * MIB + 12345, 1);
    b[0] ^= 0x40;
    write_at(&stored, 10 * MIB + 12345, &b);
    let export = Export::start(&w, &w.rev, &[]);

    // The damaged granule, another granule of the same block (its
    // chaining values now prove nothing), and the whole image: errors.
    for (offset, len) in [(10 * MIB, 64 << 10), (8 * MIB, 64 << 10)] {
        let err = read_fails(&export.uri, &w.work, offset, len);
        assert!(err.contains("Input/output error"), "{err}");
    }
    let copy = w.work.join("copy.img");
    let out = tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &export.uri,
            copy.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "a copy through a damaged block must fail");
    // Undamaged blocks read right, before and after the damaged one.
    for (offset, len) in [(0, MIB), (12 * MIB, MIB), (30 * MIB, 256 << 10)] {
        let got = read_range(&export.uri, &w.work, offset, len).expect("an intact block reads");
        assert!(got == bytes_of(&w.frozen, offset, len), "bytes at {offset}");
    }
    let served = export.stop();
    assert!(served["failed_fetches"].as_u64().unwrap() >= 2, "{served}");
}

#[test]
fn the_export_recovers_when_the_server_comes_back() {
    must_be_root();
    let mut w = world();
    let export = Export::start(&w, &w.rev, &["--cache-mib", "16"]);
    assert_eq!(
        read_range(&export.uri, &w.work, 0, MIB).unwrap(),
        bytes_of(&w.frozen, 0, MIB)
    );

    w.server.kill();
    // Not cached (beyond the read-ahead of the first read), server gone:
    // an error, not zeros or stale bytes.
    let err = read_fails(&export.uri, &w.work, 32 * MIB, MIB);
    assert!(err.contains("Input/output error"), "{err}");

    w.server.restart();
    let got = read_range(&export.uri, &w.work, 32 * MIB, MIB).expect("the server is back");
    assert!(got == bytes_of(&w.frozen, 32 * MIB, MIB));
    let copy = w.work.join("copy.img");
    convert(&export.uri, &copy);
    assert_eq!(file_hash(&copy), file_hash(&w.frozen));
    export.stop();
}

/// Single files out of a revision: `nbdfuse` shows the export as a file,
/// which mounts read-only through a loop device (this machine has no
/// kernel NBD device; `/dev/fuse` is enough).
#[test]
fn files_come_out_of_a_revision_through_nbdfuse() {
    must_be_root();
    let fs = LoopFs::new("btrfs", 1 << 30);
    let work = fs.mount.join("work");
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "vm1\n").unwrap();
    let big = pattern(42, 3 << 20);
    std::fs::write(tree.join("data.bin"), &big).unwrap();
    let img = work.join("vm1.img");
    tool_ok(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext4",
            "-d",
            tree.to_str().unwrap(),
            img.to_str().unwrap(),
            "64M",
        ],
    );
    let server = Server::start(&fs.mount.join("base"), "  vm1: {schedule: none}\n");
    server.client_ok(&["push", "vm1", "--source", img.to_str().unwrap()]);
    let w = World {
        rev: server.short_ids("vm1")[0].clone(),
        server,
        frozen: img,
        work: work.clone(),
        _fs: fs,
    };
    let export = Export::start(&w, &w.rev, &[]);

    let fuse = work.join("fuse");
    let files = work.join("files");
    std::fs::create_dir_all(&fuse).unwrap();
    std::fs::create_dir_all(&files).unwrap();
    let pidfile = work.join("nbdfuse.pid");
    let nbdfuse = Command::new("nbdfuse")
        .args(["-r", "-P"])
        .arg(&pidfile)
        .arg(&fuse)
        .arg(&export.uri)
        .stdin(Stdio::null())
        .spawn()
        .expect("nbdfuse (libnbd-bin)");
    struct Unmount(PathBuf, PathBuf, Child);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.1).status();
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = self.2.wait();
        }
    }
    let mounted = Unmount(fuse.clone(), files.clone(), nbdfuse);
    // nbdfuse writes its pid file once the file is there to be read.
    wait_for("nbdfuse to serve", Duration::from_secs(30), || pidfile.exists());
    let image = fuse.join("nbd");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 64 << 20);
    tool_ok(
        "mount",
        &[
            "-o",
            "ro,loop,noload",
            image.to_str().unwrap(),
            files.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(files.join("etc/hostname")).unwrap(),
        "vm1\n"
    );
    assert!(
        std::fs::read(files.join("data.bin")).unwrap() == big,
        "data.bin as stored"
    );
    drop(mounted);
    let served = export.stop();
    assert_eq!(served["failed_fetches"].as_u64(), Some(0), "{served}");
}

/// `ReadGranules` checks every field before it reads: blocks beyond the
/// revision, empty or oversized runs, runs past the block, chaining values
/// of a one-granule block, unknown revisions and jobs.
#[test]
fn hostile_range_requests_are_refused_before_anything_is_read() {
    must_be_root();
    let w = world();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let id = w.rev.clone();
    rt.block_on(async {
        use backy_proto::backy_client::BackyClient;
        use backy_proto::ReadGranulesRequest;
        let mut c = BackyClient::connect(w.server.url.clone())
            .await
            .unwrap()
            .max_decoding_message_size(4 << 20);
        let req = |block: u64, first: u32, n: u32, cvs: bool| ReadGranulesRequest {
            job: "vm1".into(),
            revision: id.clone(),
            block,
            first_granule: first,
            granules: n,
            chaining_values: cvs,
        };
        let ok = c
            .read_granules(req(1, 3, 2, true))
            .await
            .expect("a good request")
            .into_inner();
        assert_eq!(ok.data.len(), 128 << 10);
        assert_eq!(ok.chaining_values.len(), 64 * 32);
        assert!(ok.data == bytes_of(&w.frozen, 4 * MIB + 3 * (64 << 10), 128 << 10));
        let cases = [
            (
                req(12, 0, 1, false),
                tonic::Code::InvalidArgument,
                "beyond the revision",
            ),
            (req(0, 0, 0, false), tonic::Code::InvalidArgument, "granules 0..0"),
            (
                req(0, 0, 17, false),
                tonic::Code::InvalidArgument,
                "at most 16 per call",
            ),
            (
                req(0, 60, 5, false),
                tonic::Code::InvalidArgument,
                "granules 60..65 of a block of 64",
            ),
            (
                req(0, u32::MAX, 2, false),
                tonic::Code::InvalidArgument,
                "of a block of 64",
            ),
            (
                ReadGranulesRequest {
                    revision: "nope".into(),
                    ..req(0, 0, 1, false)
                },
                tonic::Code::InvalidArgument,
                "revision",
            ),
            (
                ReadGranulesRequest {
                    job: "vm9".into(),
                    ..req(0, 0, 1, false)
                },
                tonic::Code::NotFound,
                "vm9",
            ),
        ];
        for (request, code, want) in cases {
            let status = c.read_granules(request).await.expect_err(want);
            assert_eq!(status.code(), code, "{want}: {status:?}");
            assert!(status.message().contains(want), "{want}: {}", status.message());
        }
    });
}

/// Spawns `backy-client --json export vm1 ARGS` and returns it with its
/// ready document, or its output if it ended instead.
fn spawn_export(w: &World, args: &[&str]) -> Result<(Export, serde_json::Value), Output> {
    let mut child = Command::new(bin("backy-client"))
        .args(["--server", &w.server.url, "--config"])
        .arg(&w.server.client_config)
        .args(["--json", "export", "vm1"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting backy-client export");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut export = Export {
        child,
        uri: String::new(),
        stdout,
    };
    let mut line = String::new();
    export
        .stdout
        .read_line(&mut line)
        .expect("reading the ready line");
    if line.is_empty() {
        let child = std::mem::replace(&mut export.child, Command::new("true").spawn().unwrap());
        return Err(child.wait_with_output().unwrap());
    }
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    export.uri = ready["uri"].as_str().expect("uri").to_string();
    Ok((export, ready))
}

/// The export has no authentication of its own: TCP only on loopback, and
/// its Unix socket only for its own user (mode 0600, and the peer's uid
/// checked should the mode be widened).
#[test]
fn the_export_listens_on_loopback_only_and_its_socket_serves_its_user_only() {
    must_be_root();
    let w = world();
    let Err(out) = spawn_export(&w, &["-r", &w.rev, "--listen", "0.0.0.0:10809"]) else {
        panic!("an export on 0.0.0.0 must be refused")
    };
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback only"), "{err}");

    let port = free_port();
    let (export, ready) = spawn_export(&w, &["-r", &w.rev, "--listen", &format!("127.0.0.1:{port}")])
        .unwrap_or_else(|o| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    assert_eq!(ready["uri"], format!("nbd://127.0.0.1:{port}/vm1"));
    let copy = w.work.join("tcp.img");
    convert(&export.uri, &copy);
    assert_eq!(file_hash(&copy), file_hash(&w.frozen));
    export.stop();

    // A socket where another user could reach it (/tmp), its mode widened.
    let socket = std::env::temp_dir().join(format!("backy-export-test-{}.sock", std::process::id()));
    let (export, _) = spawn_export(&w, &["-r", &w.rev, "--socket", socket.to_str().unwrap()])
        .unwrap_or_else(|o| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is private");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = tool(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "nbdinfo",
            "--size",
            &export.uri,
        ],
    );
    assert!(!out.status.success(), "another user must not be served");
    // Root is.
    assert_eq!(
        tool_ok("nbdinfo", &["--size", &export.uri]).trim(),
        SIZE.to_string()
    );
    export.stop();
    assert!(!socket.exists(), "the socket is removed when the export ends");
}
