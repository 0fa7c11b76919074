//! Live migration of a real QEMU guest between two vhost-pump ports on one host, as two hosts on
//! one LAN: each port's tap is enslaved to the same bridge, and the source and destination QEMU
//! processes each have their own port. During the migration the host streams a known block of
//! data to the guest over TCP; the guest writes it to a file. After it:
//!
//! - the stream completed, and the file on the destination has the right size and checksum (a
//!   received frame the source backend wrote without logging it would have reached the
//!   destination stale: the checksum catches it);
//! - the bridge's forwarding entry for the guest's MAC points at the destination's tap within
//!   a second (the destination announced the guest: `SEND_RARP`);
//! - ping loss over the migration is reported.
//!
//! Needs root and QEMU 8.0 or later ([`guest::migration_qemu`]): under TCG, QEMU 7.2 (Debian
//! 12's) corrupts a guest that receives traffic while it migrates, with its own tap device as
//! much as with any vhost-user backend, so on Debian 12 the test runs QEMU 10 from
//! bookworm-backports, unpacked into a cache by `tests/setup/fetch-qemu.sh`. Under TCG the
//! migration takes about 10 s (48 MiB of non-zero guest memory at 16 MiB/s while 24 MiB stream
//! in); the guest has 256 MiB.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::guest::{self, hmp, GuestOpts, NetKind, QemuGuest};
use testkit::netns::{target_workdir as workdir, KillOnDrop as Proc, NamedNetns as Netns};

const NETNS: &str = "vp-migrate";
const BRIDGE: &str = "vpmigbr0";
const SRC_TAP: &str = "vpmigsrc0";
const DST_TAP: &str = "vpmigdst0";
const HOST_IP: &str = "10.253.0.1";
const GUEST_IP: &str = "10.253.0.2";
const GUEST_MAC: &str = "52:54:00:4d:49:47";
/// Bytes streamed to the guest during the migration.
const STREAM_BYTES: usize = 24 << 20;
const STREAM_PORT: u16 = 5000;

fn spawn_daemon(ns: &Netns, socket: &Path, tap: &str, log: &Path) -> Proc {
    let _ = std::fs::remove_file(log);
    let socket_arg = socket.to_str().unwrap();
    let args = [
        "--socket-path",
        socket_arg,
        "--tap",
        tap,
        "--mac",
        GUEST_MAC,
    ];
    ns.spawn_daemon(&args, socket, log)
}

fn guest_opts(qemu: &guest::Qemu, socket: &Path, monitor: PathBuf, name: &str) -> GuestOpts {
    let mut o = GuestOpts::vhost_user(socket, 1);
    o.qemu = Some(qemu.clone());
    o.net = NetKind::VhostUser {
        socket: socket.to_path_buf(),
        queues: 1,
        reconnect: false,
    };
    o.mac = GUEST_MAC.into();
    o.ip = Some(format!("{GUEST_IP}/24"));
    o.memory_mib = 256;
    o.monitor_socket = Some(monitor);
    // Under TCG the guest's TSC does not survive a migration well: with it as clocksource the
    // guest on the destination can sit in soft lockups for minutes. HPET moves with the VM.
    o.kernel_args = vec!["tsc=unstable".into(), "clocksource=hpet".into()];
    o.name = name.into();
    o
}

/// Deterministic pseudo-random bytes (xorshift), so a stale page shows as a wrong checksum.
fn stream_data(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// md5 of `data`, as `md5sum` prints it, computed by the host's md5sum.
fn md5_hex(data: &[u8], dir: &Path) -> String {
    let f = dir.join("stream.bin");
    std::fs::write(&f, data).unwrap();
    let out = std::process::Command::new("md5sum")
        .arg(&f)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Sends `data` to the guest from inside the namespace, paced over about `over`, and returns
/// the bytes written (the connection is closed for writing at the end).
fn send_paced(data: Vec<u8>, over: Duration) -> std::thread::JoinHandle<Result<usize, String>> {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/run/netns/{NETNS}")).map_err(|e| e.to_string())?;
        // SAFETY: setns on a namespace file we hold open; it moves only this thread.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mut s = TcpStream::connect((GUEST_IP, STREAM_PORT)).map_err(|e| e.to_string())?;
        // A guest broken by the migration (stale pages) must fail the test, not hang it.
        s.set_write_timeout(Some(Duration::from_secs(30)))
            .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(30))))
            .map_err(|e| e.to_string())?;
        let chunk = 256 << 10;
        let pause = over / (data.len() / chunk).max(1) as u32;
        let mut sent = 0;
        for c in data.chunks(chunk) {
            s.write_all(c)
                .map_err(|e| format!("after {sent} bytes: {e}"))?;
            sent += c.len();
            std::thread::sleep(pause);
        }
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        // Wait for the guest to close its end (it has read everything).
        let mut sink = [0u8; 64];
        let _ = std::io::Read::read(&mut s, &mut sink);
        Ok(sent)
    })
}

fn migration_status(monitor: &Path) -> String {
    let info = hmp(monitor, "info migrate").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("Migration status:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn guest_migrates_between_two_ports_with_traffic_intact() {
    const NAME: &str = "guest_migrates_between_two_ports_with_traffic_intact";
    if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail(NAME, &why);
        return;
    }
    let qemu = match guest::migration_qemu() {
        Ok(q) => q,
        Err(e) => {
            guest::skip_or_fail(
                NAME,
                &format!("no QEMU that migrates a TCG guest intact: {e}"),
            );
            return;
        }
    };
    let dir = workdir("qemu-migration");
    let ns = Netns::create(NETNS);
    ns.exec(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
    ns.exec(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE]);
    ns.exec(&["ip", "link", "set", BRIDGE, "up"]);
    for tap in [SRC_TAP, DST_TAP] {
        ns.exec(&["ip", "tuntap", "add", "dev", tap, "mode", "tap"]);
        ns.exec(&["ip", "link", "set", tap, "master", BRIDGE]);
        ns.exec(&["ip", "link", "set", tap, "up"]);
    }
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let _src_daemon = spawn_daemon(&ns, &src_sock, SRC_TAP, &dir.join("src-daemon.log"));
    let _dst_daemon = spawn_daemon(&ns, &dst_sock, DST_TAP, &dir.join("dst-daemon.log"));
    let logs = || {
        format!(
            "--- source daemon ---\n{}\n--- destination daemon ---\n{}",
            std::fs::read_to_string(dir.join("src-daemon.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("dst-daemon.log")).unwrap_or_default()
        )
    };

    let (src_mon, dst_mon) = (dir.join("src.mon"), dir.join("dst.mon"));
    let mut src = QemuGuest::start(&guest_opts(&qemu, &src_sock, src_mon.clone(), "mig-src"))
        .expect("start source QEMU");
    let boot = src
        .wait_ready(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("source guest not ready: {e}\n{}", logs()));
    eprintln!(
        "source guest ready after {boot:.1?}; logs in {}",
        src.log_dir().display()
    );
    let incoming = dir.join("migrate.sock");
    let mut dst_opts = guest_opts(&qemu, &dst_sock, dst_mon.clone(), "mig-dst");
    dst_opts.qemu_args = vec!["-incoming".into(), format!("unix:{}", incoming.display())];
    let mut dst = QemuGuest::start(&dst_opts).expect("start destination QEMU");
    let t = Duration::from_secs(60);
    let ping = src.run(&format!("ping -c 2 -W 5 {HOST_IP}"), t).unwrap();
    assert!(
        ping.contains(" 0% packet loss"),
        "no network before migrating:\n{ping}"
    );
    // Guest memory that is not zero, so the migration copies for a few seconds while the
    // stream below writes into the guest: pages dirtied after they were copied must be copied
    // again, which only happens if the backend logged its writes.
    src.run_ok(
        "dd if=/dev/urandom of=/tmp/fill bs=1M count=48 2>/dev/null",
        t,
    )
    .unwrap();

    // The guest receives the stream into a file; the host streams for about 12 s and starts
    // the migration 2 s in.
    src.send_line(&format!("nc -l -p {STREAM_PORT} > /tmp/rx &"))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let data = stream_data(STREAM_BYTES);
    let want_md5 = md5_hex(&data, &dir);
    let sender = send_paced(data, Duration::from_secs(12));
    let mut pinger = ns
        .cmd(&[
            "busybox", "ping", "-i", "0.2", "-W", "1", "-c", "75", GUEST_IP,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    for cmd in [
        "migrate_set_parameter max-bandwidth 16M".to_string(),
        "migrate_set_parameter downtime-limit 500".to_string(),
        format!("migrate -d unix:{}", incoming.display()),
    ] {
        let out = hmp(&src_mon, &cmd).unwrap();
        assert!(
            !out.to_lowercase().contains("error"),
            "{cmd}: {out}\n{}",
            logs()
        );
    }
    let started = Instant::now();
    let status = loop {
        let s = migration_status(&src_mon);
        if s == "completed" || s == "failed" || s == "cancelled" {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "migration still {s:?} after 180 s\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    let info = hmp(&src_mon, "info migrate").unwrap_or_default();
    assert_eq!(status, "completed", "{info}\n{}", logs());
    // "downtime: 123 ms" (QEMU 7/8) or "Downtime: 123 ms" (QEMU 9+).
    let downtime = info
        .lines()
        .find_map(|l| {
            let l = l.trim().to_lowercase();
            l.strip_prefix("downtime:").map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let completed = Instant::now();
    // The LAN learns where the guest went: the bridge's entry for its MAC moves to the
    // destination's tap.
    let mut moved_after = None;
    while completed.elapsed() < Duration::from_secs(5) {
        let fdb = ns.exec(&["bridge", "fdb", "show", "br", BRIDGE]);
        if fdb
            .lines()
            .any(|l| l.starts_with(GUEST_MAC) && l.contains(&format!("dev {DST_TAP}")))
        {
            moved_after = Some(completed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let dst_stats = hmp(&dst_mon, "info status").unwrap_or_default();
    assert!(
        dst_stats.contains("running"),
        "destination not running: {dst_stats}"
    );

    let sent = sender
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the stream broke: {e}\n{}", logs()));
    assert_eq!(sent, STREAM_BYTES);
    let ping_out = {
        let _ = pinger.wait();
        let mut s = String::new();
        if let Some(mut o) = pinger.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut o, &mut s);
        }
        if let Some(mut o) = pinger.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut o, &mut s);
        }
        s
    };
    let loss = ping_out
        .lines()
        .find(|l| l.contains("packet loss"))
        .unwrap_or(&ping_out)
        .to_string();
    // On the destination now: the file the guest wrote while it moved.
    let got = dst
        .run_ok("sleep 1; wc -c < /tmp/rx; md5sum /tmp/rx", t)
        .unwrap_or_else(|e| panic!("destination guest shell: {e}\n{}", logs()));
    eprintln!(
        "migration took {took:.1?} (downtime {downtime}); bridge entry moved {moved_after:?} \
         after completion; ping: {loss}; guest file: {}",
        got.replace('\n', " ")
    );
    assert!(
        got.contains(&STREAM_BYTES.to_string()),
        "the guest received a different byte count: {got}"
    );
    assert!(
        got.contains(&want_md5),
        "the guest's file differs from what was sent (md5 {want_md5}): {got}"
    );
    let moved = moved_after.unwrap_or_else(|| {
        panic!(
            "the bridge never learned the destination's tap:\n{}",
            ns.exec(&["bridge", "fdb", "show", "br", BRIDGE])
        )
    });
    assert!(
        moved <= Duration::from_secs(1),
        "bridge entry moved only after {moved:?}"
    );
    let _ = src.kill();
    let _ = dst.kill();
}
