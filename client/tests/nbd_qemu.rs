//! The NBD client against a real `qemu-nbd` (from qemu-utils) serving a
//! qcow2 image over a Unix socket: block status (`base:allocation` and a
//! persistent dirty bitmap) after known writes, and reads, several in
//! flight, compared with `qemu-img convert -O raw`. Plus a scripted hostile
//! peer for what a real server never sends.

use backy_client::nbd::{NbdClient, NbdClientError, READ_DEPTH, STATUS_LEN};
use backy_common::nbd::reply::{select, StatusExtent};
use backy_common::nbd::{NbdError, CONTEXT_BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE};
use backy_common::ranges::Extent;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (is qemu-utils installed?)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `len` bytes of `pattern` at `offset` through qemu (which marks
/// enabled persistent bitmaps dirty).
fn qemu_write(img: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P 0x{pattern:02x} {offset} {len}");
    run("qemu-io", &["-f", "qcow2", "-c", &cmd, path_str(img)]);
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A `qemu-nbd` serving an image read-only on a private socket; killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(dir: &Path, img: &Path, bitmap: Option<&str>) -> Self {
        let socket = dir.join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["--read-only", "--persistent", "-f", "qcow2"])
            .arg(format!("--socket={}", socket.display()));
        if let Some(b) = bitmap {
            cmd.args(["-B", b]);
        }
        let child = cmd
            .arg(img)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd (is qemu-utils installed?)");
        let mut server = QemuNbd { child, socket };
        let start = Instant::now();
        while !server.socket.exists() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("qemu-nbd exited: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image(dir: &Path, size: u64) -> PathBuf {
    let img = dir.join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&img), &size.to_string()],
    );
    img
}

fn ext(offset: u64, len: u64) -> Extent {
    Extent { offset, len }
}

#[tokio::test]
async fn block_status_shows_data_and_exactly_the_dirty_granules() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 8 * MIB);
    // Before the bitmap: data, not dirty.
    qemu_write(&img, 0x11, MIB, 128 * KIB);
    run("qemu-img", &["bitmap", "--add", path_str(&img), "b1"]);
    // After: 10 bytes inside one 64 KiB granule, 2 bytes across a granule
    // boundary, and a whole granule-aligned 64 KiB.
    qemu_write(&img, 0x55, 3 * MIB + 100, 10);
    qemu_write(&img, 0x66, 6 * MIB - 1, 2);
    qemu_write(&img, 0x77, MIB + 64 * KIB, 64 * KIB);

    let server = QemuNbd::start(dir.path(), &img, Some("b1"));
    let contexts = [CONTEXT_BASE_ALLOCATION, "qemu:dirty-bitmap:b1"];
    let mut c = NbdClient::connect_unix(&server.socket, "", &contexts)
        .await
        .unwrap();
    assert_eq!(c.export().size, 8 * MIB);
    assert_eq!(c.contexts().len(), 2);
    let all = c.block_status_all(STATUS_LEN).await.unwrap();
    for extents in &all {
        check_cover(extents, 8 * MIB);
    }
    // qcow2 allocates 64 KiB clusters: the written clusters are data.
    let data = select(&all[0], |f| f & STATE_HOLE == 0);
    assert_eq!(
        data,
        vec![
            ext(MIB, 128 * KIB),
            ext(3 * MIB, 64 * KIB),
            ext(6 * MIB - 64 * KIB, 128 * KIB)
        ]
    );
    let dirty = select(&all[1], |f| f & STATE_DIRTY != 0);
    assert_eq!(
        dirty,
        vec![
            ext(MIB + 64 * KIB, 64 * KIB),
            ext(3 * MIB, 64 * KIB),
            ext(6 * MIB - 64 * KIB, 128 * KIB)
        ]
    );
    // Small queries walk the same map.
    let small = c.block_status_all(192 * 1024).await.unwrap();
    assert_eq!(small, all);
    c.disconnect().await.unwrap();
}

/// Extents in order, touching, each non-empty, covering `0..size`.
fn check_cover(extents: &[StatusExtent], size: u64) {
    let mut at = 0;
    for e in extents {
        assert!(e.offset == at && e.len > 0, "{extents:?}");
        at = e.end();
    }
    assert_eq!(at, size);
}

#[tokio::test]
async fn reads_with_many_in_flight_match_qemu_img_convert() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 6 * MIB + 512 * KIB);
    qemu_write(&img, 0x55, 0, 4 * KIB);
    qemu_write(&img, 0x66, 2 * MIB - 3, 7);
    qemu_write(&img, 0x77, 5 * MIB, 1536 * KIB);
    let raw = dir.path().join("disk.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            path_str(&img),
            path_str(&raw),
        ],
    );
    let want = std::fs::read(&raw).unwrap();

    let server = QemuNbd::start(dir.path(), &img, None);
    let mut c = NbdClient::connect_unix(&server.socket, "", &[]).await.unwrap();
    let size = c.export().size;
    assert_eq!(size, want.len() as u64);
    // One read, with data and holes in it.
    let got = c.read_at(2 * MIB - 4096, 8192).await.unwrap();
    assert_eq!(got, want[(2 * MIB - 4096) as usize..(2 * MIB + 4096) as usize]);
    // The whole image in 64 KiB pieces, 8 in flight, plus one run of
    // several maximal requests: every piece lands where it belongs.
    let pieces: Vec<Extent> = (0..size / (64 * KIB))
        .map(|i| ext(i * 64 * KIB, 64 * KIB))
        .collect();
    let mut got = vec![0xeeu8; size as usize];
    let mut calls = 0;
    c.read_extents(&pieces, READ_DEPTH, |offset, data| {
        calls += 1;
        got[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok::<_, NbdClientError>(())
    })
    .await
    .unwrap();
    assert_eq!(calls, pieces.len());
    assert!(got == want, "reads differ from qemu-img convert");
    let mut got = vec![0xeeu8; size as usize];
    c.read_extents(&[ext(0, size)], READ_DEPTH, |offset, data| {
        got[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok::<_, NbdClientError>(())
    })
    .await
    .unwrap();
    assert!(got == want, "large reads differ from qemu-img convert");
    // Requests outside the export are refused before they are sent, and
    // leave the connection usable.
    assert!(c.read_at(size - 512, 1024).await.is_err());
    // A sink error stops the reads; the connection stays usable.
    let stop = c
        .read_extents(&pieces, READ_DEPTH, |_, _| {
            Err::<(), _>(NbdClientError::from(NbdError::InvalidRequest("stop".into())))
        })
        .await;
    assert!(stop.is_err());
    assert_eq!(c.read_at(0, 512).await.unwrap(), want[..512]);
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_missing_bitmap_is_an_error_not_a_full_backup() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), MIB);
    run("qemu-img", &["bitmap", "--add", path_str(&img), "b1"]);
    let server = QemuNbd::start(dir.path(), &img, Some("b1"));
    let contexts = [CONTEXT_BASE_ALLOCATION, "qemu:dirty-bitmap:other"];
    let e = NbdClient::connect_unix(&server.socket, "", &contexts)
        .await
        .err()
        .expect("an error");
    assert!(e.to_string().contains("qemu:dirty-bitmap:other"), "{e}");
    let e = NbdClient::connect_unix(&server.socket, "no-such-export", &[])
        .await
        .err()
        .expect("an error");
    assert!(e.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{e}");
}

/// A scripted server: a valid handshake for a 1 MiB export, then `reply`
/// after the first request, then silence.
async fn hostile(reply: impl Fn(u64) -> Vec<u8> + Send + 'static) -> NbdClient<tokio::io::DuplexStream> {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let mut greeting = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
        greeting.extend(0x4948_4156_454f_5054u64.to_be_bytes());
        greeting.extend(3u16.to_be_bytes());
        server.write_all(&greeting).await?;
        let mut flags = [0u8; 4];
        server.read_exact(&mut flags).await?;
        loop {
            let mut h = [0u8; 16];
            server.read_exact(&mut h).await?;
            let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let mut data = vec![0u8; len as usize];
            server.read_exact(&mut data).await?;
            let rep = |reply: u32, payload: &[u8]| {
                let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
                r.extend(option.to_be_bytes());
                r.extend(reply.to_be_bytes());
                r.extend((payload.len() as u32).to_be_bytes());
                r.extend(payload);
                r
            };
            if option == 7 {
                let mut info = vec![0, 0];
                info.extend(MIB.to_be_bytes());
                info.extend(3u16.to_be_bytes());
                server.write_all(&rep(3, &info)).await?;
                server.write_all(&rep(1, &[])).await?;
                break;
            }
            server.write_all(&rep(1, &[])).await?;
        }
        let mut req = [0u8; 28];
        server.read_exact(&mut req).await?;
        let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap_or_default());
        server.write_all(&reply(cookie)).await?;
        // Keep the stream open: the client must fail on what it got.
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, std::io::Error>(())
    });
    NbdClient::handshake(client, "", &[]).await.unwrap()
}

#[tokio::test]
async fn hostile_replies_are_errors() {
    use backy_common::nbd::wire::{encode_chunk, Chunk};
    type Case = (&'static str, Box<dyn Fn(u64) -> Vec<u8> + Send>);
    let cases: Vec<Case> = vec![
        (
            "unknown cookie",
            Box::new(|c| encode_chunk(1, c + 1, &Chunk::Hole { offset: 0, len: 512 })),
        ),
        (
            "data outside the request",
            Box::new(|c| {
                encode_chunk(
                    1,
                    c,
                    &Chunk::Data {
                        offset: 512,
                        data: &[0; 512],
                    },
                )
            }),
        ),
        (
            "a 4 GiB chunk",
            Box::new(|c| {
                let mut b = encode_chunk(1, c, &Chunk::Hole { offset: 0, len: 512 });
                b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                b
            }),
        ),
        (
            "garbage",
            Box::new(|_| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
        ),
    ];
    for (name, reply) in cases {
        let mut c = hostile(reply).await;
        let e = tokio::time::timeout(Duration::from_secs(10), c.read_at(0, 512))
            .await
            .expect("no hang")
            .expect_err(name);
        assert!(matches!(e, NbdClientError::Protocol(_)), "{name}: {e}");
        // The connection is out of step: later calls fail at once.
        assert!(
            matches!(c.read_at(0, 512).await, Err(NbdClientError::Broken)),
            "{name}"
        );
    }
}
