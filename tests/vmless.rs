//! VM-less end-to-end tests: DPDK's virtio-user (`dpdk-testpmd`) is the vhost-user frontend, the
//! daemon moves frames between its rings and its host port, and the test counts frames on both
//! ends. The host port is a tap, or AF_PACKET on one end of a veth pair (`--af-packet`), watched
//! from the other end.
//!
//! - guest TX: testpmd `txonly` → daemon → tap (or veth); the tap's (the far veth end's)
//!   `rx_packets` must match testpmd's TX-packets (minus at most one ring of frames in flight
//!   when testpmd stops).
//! - guest RX: frames sent out of the tap (into the far veth end) with an AF_PACKET socket →
//!   daemon → testpmd `rxonly`; testpmd must receive every one of them.
//!
//! Each test runs the daemon and testpmd in a private network namespace; the tests take turns
//! (testpmd busy-polls a core). Needs root, /dev/net/tun and `dpdk-testpmd` (Debian `dpdk`):
//! skipped otherwise, failed under `CI=true`. Run: `cargo test --test vmless -- --nocapture`.
//! Rates printed are informational (debug builds are much slower than release).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use testkit::guest::skip_or_fail;
use testkit::netns::{
    self, if_stats, in_new_netns, settled_if_stats, udp_frame, wait_child, wait_until, Daemon,
    IfStats, PacketSocket, TempDir,
};

const TAP: &str = "vpvl0";
/// The veth pair of the AF_PACKET tests: the daemon attaches to the first, the test watches the
/// second.
const VETH: (&str, &str) = ("vpvla", "vpvlb");
/// Pace of the frames injected towards an AF_PACKET port: its RX ring (255 slots) absorbs a
/// worker delay of 25 ms at this rate, where a tap's frames are paced on what the daemon read.
const AF_PACKET_RX_PPS: u64 = 10_000;
const MAC: [u8; 6] = [0x02, 0x56, 0x50, 0x00, 0x01, 0x01];
const MAC_STR: &str = "02:56:50:00:01:01";
const PEER_MAC: [u8; 6] = [0x02, 0x56, 0x50, 0x00, 0x01, 0xfe];
/// virtio-user ring size.
const QSIZE: u64 = 1024;
/// How long testpmd forwards in the TX tests.
const FORWARD_TIME: Duration = Duration::from_secs(3);
/// Frames injected in the RX tests.
const RX_FRAMES: u64 = 20_000;
/// Most frames queued in the tap and not yet read by the daemon while injecting (the tap's
/// own queue holds 500 per queue and drops beyond).
const RX_MAX_IN_FLIGHT: u64 = 256;

/// testpmd busy-polls a core: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn testpmd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("dpdk-testpmd"))
        .find(|p| p.is_file())
}

/// Reports and returns false when the tests cannot run here.
fn can_run(test: &str) -> bool {
    let why = netns::missing_prereqs().or_else(|| {
        testpmd_binary()
            .is_none()
            .then(|| "dpdk-testpmd not found in PATH (Debian package dpdk)".to_string())
    });
    match why {
        Some(why) => {
            skip_or_fail(test, &why);
            false
        }
        None => true,
    }
}

/// Forwarding statistics testpmd prints when it stops.
#[derive(Debug, Default)]
struct FwdStats {
    rx: u64,
    tx: u64,
    /// (RX-packets, TX-packets) per forwarding stream (one per queue), when there are several.
    streams: Vec<(u64, u64)>,
}

/// The number after `key` in `line` ("RX-packets: 123").
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn parse_fwd_stats(out: &str) -> Option<FwdStats> {
    let acc = out.rfind("Accumulated forward statistics for all ports")?;
    let mut lines = out[acc..].lines().skip(1);
    let rx = field(lines.next()?, "RX-packets:")?;
    let tx = field(lines.next()?, "TX-packets:")?;
    let mut streams = Vec::new();
    let mut it = out.lines();
    while let Some(l) = it.next() {
        if l.contains("Forward Stats for RX Port=") {
            let s = it.next()?;
            streams.push((field(s, "RX-packets:")?, field(s, "TX-packets:")?));
        }
    }
    Some(FwdStats { rx, tx, streams })
}

/// A `dpdk-testpmd` with one virtio-user port on the daemon's socket. Non-interactive testpmd
/// with `--stats-period` runs until SIGINT; stdin is held open anyway (it exits on EOF in other
/// modes). Killed on drop.
struct Testpmd {
    child: Child,
    _stdin: Option<ChildStdin>,
    out: PathBuf,
    prefix: String,
}

impl Testpmd {
    fn start(dir: &TempDir, socket: &Path, queues: u16, fwd: &[&str]) -> Testpmd {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "vhost-pump-vmless-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let vdev = format!(
            "net_virtio_user0,path={},queues={queues},queue_size={QSIZE},mrg_rxbuf=1,in_order=1",
            socket.display()
        );
        // Main lcore on CPU 0, the forwarding lcore on CPU 1 if there is one.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let lcores = format!("0@0,1@{}", usize::from(cpus > 1));
        let q = queues.to_string();
        let out = dir.join(&format!("{prefix}.log"));
        let file = File::create(&out).unwrap();
        let mut cmd = Command::new(testpmd_binary().expect("dpdk-testpmd"));
        cmd.args(["--lcores", &lcores, "--no-pci", "--no-huge", "-m", "1024"])
            .args([
                "--no-shconf",
                "--file-prefix",
                &prefix,
                "--vdev",
                &vdev,
                "--",
            ])
            .args([
                "--auto-start",
                "--stats-period=1",
                "--nb-cores=1",
                "--burst=32",
            ])
            .args(["--total-num-mbufs=32768", "--rxq", &q, "--txq", &q])
            .args(fwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file));
        netns::kill_with_parent_thread(&mut cmd);
        let mut child = cmd.spawn().expect("spawn dpdk-testpmd");
        let stdin = child.stdin.take();
        Testpmd {
            child,
            _stdin: stdin,
            out,
            prefix,
        }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    /// Waits until the port is up (vhost-user negotiation done) and forwarding runs.
    fn wait_forwarding(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            // Non-interactive testpmd prints "No commandline core given, start packet
            // forwarding", interactive --auto-start "Start automatic packet forwarding".
            if out.contains("start packet forwarding")
                || out.contains("Start automatic packet forwarding")
            {
                return;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("dpdk-testpmd exited ({s}) before forwarding:\n{out}");
            }
            if Instant::now() >= deadline {
                panic!("dpdk-testpmd not forwarding after {timeout:?}:\n{out}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops testpmd with SIGINT and returns its final forwarding statistics.
    fn stop(mut self) -> FwdStats {
        netns::signal(self.child.id(), libc::SIGINT).expect("SIGINT testpmd");
        let status = wait_child(&mut self.child, Duration::from_secs(20)).unwrap();
        let out = self.output();
        let Some(status) = status else {
            panic!("dpdk-testpmd did not exit within 20 s of SIGINT:\n{out}");
        };
        parse_fwd_stats(&out).unwrap_or_else(|| {
            panic!("no forwarding statistics in dpdk-testpmd's output ({status}):\n{out}")
        })
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // EAL leaves its runtime directory behind even with --no-shconf (and, when killed, the
        // sockets in it).
        let _ = fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
        if std::thread::panicking() {
            eprintln!("--- dpdk-testpmd output ---\n{}", self.output());
        }
    }
}

fn per_second(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// The daemon's host port, and the interface where the test sees the other side of it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Host {
    /// A tap the daemon creates; the test sends out of it and counts what the daemon wrote.
    /// Guest frames go in through io_uring (the default where the kernel has it).
    Tap,
    /// The same with one `writev` per frame (`--tap-tx writev`).
    TapWritev,
    /// AF_PACKET on `VETH.0`; the test sends into and counts at `VETH.1`.
    AfPacket,
}

impl Host {
    /// The interface the test watches and injects on.
    fn far_end(self) -> &'static str {
        match self {
            Host::Tap | Host::TapWritev => TAP,
            Host::AfPacket => VETH.1,
        }
    }
}

/// Runs `f` in a private namespace with a daemon (`queues` pairs, host port `host`) listening
/// on a fresh socket, one test at a time.
fn with_daemon(test: &str, host: Host, queues: u16, f: impl FnOnce(&TempDir, &mut Daemon) + Send) {
    if !can_run(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    in_new_netns(|| {
        let dir = TempDir::new("vmless");
        let q = queues.to_string();
        let mut args = vec!["--queues", &q, "--mac", MAC_STR];
        let port = match host {
            Host::Tap => ("--tap", TAP),
            Host::TapWritev => {
                args.extend(["--tap-tx", "writev"]);
                ("--tap", TAP)
            }
            Host::AfPacket => {
                netns::ip(&[
                    "link", "add", VETH.0, "type", "veth", "peer", "name", VETH.1,
                ]);
                for end in [VETH.0, VETH.1] {
                    netns::ip(&["link", "set", end, "up"]);
                }
                ("--af-packet", VETH.0)
            }
        };
        let mut d = Daemon::start_on(&dir.join("vu.sock"), port, &args, &dir.join("daemon.log"));
        f(&dir, &mut d);
        d.assert_alive();
    });
}

/// Guest TX: testpmd sends `frame_len`-byte frames on `queues` queues for `time`; the tap (the
/// far veth end) must have received them.
fn tx_round(
    test: &str,
    dir: &TempDir,
    d: &mut Daemon,
    host: Host,
    queues: u16,
    frame_len: u64,
    time: Duration,
) {
    let sock = d.socket.clone().unwrap();
    let far = host.far_end();
    let base = if_stats(far).unwrap();
    let txpkts = format!("--txpkts={frame_len}");
    let mut tp = Testpmd::start(dir, &sock, queues, &["--forward-mode=txonly", &txpkts]);
    tp.wait_forwarding(Duration::from_secs(20));

    let (t0, s0, c0) = (Instant::now(), if_stats(far).unwrap(), d.cpu_time());
    std::thread::sleep(time);
    let (t1, s1, c1) = (Instant::now(), if_stats(far).unwrap(), d.cpu_time());
    let st = tp.stop();
    let total = settled_if_stats(far, Duration::from_millis(300), Duration::from_secs(5))
        .unwrap()
        .since(&base);
    d.assert_alive();

    let window = t1 - t0;
    let pps = per_second(s1.rx_packets - s0.rx_packets, window);
    eprintln!(
        "{test}: testpmd TX-packets {} (streams {:?}); {far} rx_packets {} rx_bytes {}; \
             steady rate {:.0} kpps = {:.2} Gbit/s, daemon CPU {:.0}% (debug={})",
        st.tx,
        st.streams,
        total.rx_packets,
        total.rx_bytes,
        pps / 1e3,
        pps * frame_len as f64 * 8.0 / 1e9,
        100.0 * (c1 - c0).as_secs_f64() / window.as_secs_f64(),
        cfg!(debug_assertions),
    );
    assert!(st.tx >= 1000, "testpmd sent only {} frames", st.tx);
    assert!(
        total.rx_packets > 0,
        "no frame reached {far}: {total:?}\n{}",
        d.log_text()
    );
    assert!(
        total.rx_packets <= st.tx,
        "{far} got {} frames, more than the {} testpmd sent",
        total.rx_packets,
        st.tx
    );
    let in_flight = u64::from(queues) * QSIZE;
    let expected = st.tx.saturating_sub(in_flight) * 9 / 10;
    assert!(
        total.rx_packets >= expected,
        "{far} got {} of {} frames (want >= {expected}: 90% of those not in flight); \
             rx_dropped {}",
        total.rx_packets,
        st.tx,
        total.rx_dropped
    );
    assert_eq!(
        total.rx_bytes,
        total.rx_packets * frame_len,
        "every frame on {far} is exactly {frame_len} bytes"
    );
    if queues > 1 {
        assert_eq!(st.streams.len(), usize::from(queues), "{st:?}");
        for (i, (_, tx)) in st.streams.iter().enumerate() {
            assert!(*tx > 1000, "queue {i} sent only {tx} frames: {st:?}");
        }
    }
}

/// Guest RX: `n` frames sent out of the tap, or into the far veth end (spread over 64 UDP flows,
/// so over the port's queues) must all reach testpmd.
fn rx_round(test: &str, dir: &TempDir, d: &mut Daemon, host: Host, queues: u16, n: u64) {
    let sock = d.socket.clone().unwrap();
    let mut tp = Testpmd::start(dir, &sock, queues, &["--forward-mode=rxonly"]);
    tp.wait_forwarding(Duration::from_secs(20));

    let frames: Vec<Vec<u8>> = (0..64u16)
        .map(|i| {
            udp_frame(
                MAC,
                PEER_MAC,
                ([10, 98, 0, 1], [10, 98, 0, 2]),
                (20000 + i, 9),
                60,
            )
        })
        .collect();
    let far = host.far_end();
    let sender = PacketSocket::sender(far).expect("AF_PACKET socket on the far end");
    let base = if_stats(far).unwrap();
    let (t0, c0) = (Instant::now(), d.cpu_time());
    let deadline = t0 + Duration::from_secs(15);
    let mut sent = 0u64;
    let mut max_in_flight = 0u64;
    while sent < n {
        if host == Host::AfPacket {
            // What the daemon has read is not visible on the veth: a fixed pace.
            let due = (t0.elapsed().as_secs_f64() * AF_PACKET_RX_PPS as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let burst = 32.min(n - sent);
            for _ in 0..burst {
                sender
                    .send(&frames[(sent % 64) as usize])
                    .expect("send into the veth");
                sent += 1;
            }
            continue;
        }
        // Pace on what the daemon has read (tx_packets) or the tap dropped (tx_dropped).
        let now = if_stats(TAP).unwrap().since(&base);
        let in_flight = sent.saturating_sub(now.tx_packets + now.tx_dropped);
        max_in_flight = max_in_flight.max(in_flight);
        if in_flight + 32 > RX_MAX_IN_FLIGHT {
            assert!(
                Instant::now() < deadline,
                "the daemon stopped reading the tap: {sent} sent, {now:?}"
            );
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        for _ in 0..32.min(n - sent) {
            sender
                .send(&frames[(sent % 64) as usize])
                .expect("send into the tap");
            sent += 1;
        }
    }
    let read_all = wait_until(Duration::from_secs(5), || {
        let s = if_stats(far).unwrap().since(&base);
        s.tx_packets + s.tx_dropped >= n
    });
    let (t1, c1) = (Instant::now(), d.cpu_time());
    let tap: IfStats = if_stats(far).unwrap().since(&base);
    // testpmd polls all the time; give it a moment for the last frames.
    std::thread::sleep(Duration::from_millis(300));
    let st = tp.stop();
    d.assert_alive();

    let window = t1 - t0;
    eprintln!(
        "{test}: injected {sent}; {far} tx_packets {} tx_dropped {} (max in flight \
             {max_in_flight}); testpmd RX-packets {} (streams {:?}); {:.0} kpps, daemon CPU \
             {:.0}% (debug={})",
        tap.tx_packets,
        tap.tx_dropped,
        st.rx,
        st.streams,
        per_second(tap.tx_packets, window) / 1e3,
        100.0 * (c1 - c0).as_secs_f64() / window.as_secs_f64(),
        cfg!(debug_assertions),
    );
    assert!(read_all, "not all frames left {far}: {tap:?}");
    assert_eq!(
        tap.tx_dropped, 0,
        "the tap dropped frames although the sender kept at most {RX_MAX_IN_FLIGHT} \
             queued: the daemon stalled"
    );
    assert!(
        st.rx >= n,
        "testpmd received {} of {n} frames sent out of {far} ({tap:?})\n{}",
        st.rx,
        d.log_text()
    );
    // Nothing else transmits on the tap (IPv6 is off in the namespace).
    assert!(
        st.rx <= n + 16,
        "testpmd received {} frames, {n} were sent",
        st.rx
    );
    if queues > 1 {
        assert_eq!(st.streams.len(), usize::from(queues), "{st:?}");
        for (i, (rx, _)) in st.streams.iter().enumerate() {
            assert!(
                *rx > n / 20,
                "queue {i} received only {rx} frames (64 flows spread over the tap's \
                     queues): {st:?}"
            );
        }
    }
}

#[test]
fn guest_tx_64_byte_frames_reach_the_tap() {
    let t = "guest_tx_64_byte_frames_reach_the_tap";
    with_daemon(t, Host::Tap, 1, |dir, d| {
        tx_round(t, dir, d, Host::Tap, 1, 64, FORWARD_TIME)
    });
}

#[test]
fn guest_tx_1500_byte_frames_reach_the_tap() {
    let t = "guest_tx_1500_byte_frames_reach_the_tap";
    with_daemon(t, Host::Tap, 1, |dir, d| {
        tx_round(t, dir, d, Host::Tap, 1, 1500, FORWARD_TIME);
        assert!(
            d.log_text().contains("io_uring=true"),
            "the tap is not written through io_uring:\n{}",
            d.log_text()
        );
    });
}

#[test]
fn guest_tx_with_one_writev_per_frame_reaches_the_tap() {
    let t = "guest_tx_with_one_writev_per_frame_reaches_the_tap";
    with_daemon(t, Host::TapWritev, 1, |dir, d| {
        tx_round(t, dir, d, Host::TapWritev, 1, 64, FORWARD_TIME);
        assert!(
            d.log_text().contains("io_uring=false"),
            "--tap-tx writev still uses io_uring:\n{}",
            d.log_text()
        );
    });
}

#[test]
fn guest_rx_frames_from_the_tap_reach_testpmd() {
    let t = "guest_rx_frames_from_the_tap_reach_testpmd";
    with_daemon(t, Host::Tap, 1, |dir, d| {
        rx_round(t, dir, d, Host::Tap, 1, RX_FRAMES)
    });
}

#[test]
fn two_queue_pairs_guest_tx_on_both_queues() {
    let t = "two_queue_pairs_guest_tx_on_both_queues";
    with_daemon(t, Host::Tap, 2, |dir, d| {
        tx_round(t, dir, d, Host::Tap, 2, 64, FORWARD_TIME)
    });
}

#[test]
fn two_queue_pairs_guest_rx_on_both_queues() {
    let t = "two_queue_pairs_guest_rx_on_both_queues";
    with_daemon(t, Host::Tap, 2, |dir, d| {
        rx_round(t, dir, d, Host::Tap, 2, RX_FRAMES)
    });
}

#[test]
fn testpmd_sessions_repeat_on_one_daemon() {
    // One daemon, three frontend lifetimes (a VM restarting): each new testpmd must get a
    // working device whatever the previous one left behind (held RX buffers, ring state).
    let t = "testpmd_sessions_repeat_on_one_daemon";
    with_daemon(t, Host::Tap, 2, |dir, d| {
        let short = Duration::from_millis(1500);
        tx_round(&format!("{t} (1: tx)"), dir, d, Host::Tap, 2, 64, short);
        rx_round(&format!("{t} (2: rx)"), dir, d, Host::Tap, 2, 5000);
        tx_round(&format!("{t} (3: tx)"), dir, d, Host::Tap, 2, 1500, short);
        rx_round(&format!("{t} (4: rx)"), dir, d, Host::Tap, 2, 5000);
    });
}

/// Frames injected in the AF_PACKET RX tests (one second at the fixed pace).
const AF_PACKET_RX_FRAMES: u64 = AF_PACKET_RX_PPS;

#[test]
fn af_packet_guest_tx_64_and_1500_byte_frames_reach_the_far_veth_end() {
    let t = "af_packet_guest_tx_64_and_1500_byte_frames_reach_the_far_veth_end";
    with_daemon(t, Host::AfPacket, 1, |dir, d| {
        tx_round(
            &format!("{t} (64)"),
            dir,
            d,
            Host::AfPacket,
            1,
            64,
            FORWARD_TIME,
        );
        tx_round(
            &format!("{t} (1500)"),
            dir,
            d,
            Host::AfPacket,
            1,
            1500,
            FORWARD_TIME,
        );
    });
}

#[test]
fn af_packet_guest_rx_frames_from_the_far_veth_end_reach_testpmd() {
    let t = "af_packet_guest_rx_frames_from_the_far_veth_end_reach_testpmd";
    with_daemon(t, Host::AfPacket, 1, |dir, d| {
        rx_round(t, dir, d, Host::AfPacket, 1, AF_PACKET_RX_FRAMES)
    });
}

#[test]
fn af_packet_two_queue_pairs_fan_out_both_directions() {
    let t = "af_packet_two_queue_pairs_fan_out_both_directions";
    with_daemon(t, Host::AfPacket, 2, |dir, d| {
        tx_round(
            &format!("{t} (tx)"),
            dir,
            d,
            Host::AfPacket,
            2,
            64,
            FORWARD_TIME,
        );
        rx_round(
            &format!("{t} (rx)"),
            dir,
            d,
            Host::AfPacket,
            2,
            AF_PACKET_RX_FRAMES,
        );
    });
}

#[test]
fn testpmd_stats_parser() {
    let out = "\
  ------- Forward Stats for RX Port= 0/Queue= 0 -> TX Port= 0/Queue= 0 -------
  RX-packets: 5              TX-packets: 315264         TX-dropped: 47280448
  ------- Forward Stats for RX Port= 0/Queue= 1 -> TX Port= 0/Queue= 1 -------
  RX-packets: 7              TX-packets: 433775         TX-dropped: 47161937
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 12             RX-dropped: 0             RX-total: 12
  TX-packets: 749039         TX-dropped: 94442385      TX-total: 95191424
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 12             RX-dropped: 0             RX-total: 12
  TX-packets: 749039         TX-dropped: 94442385      TX-total: 95191424
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
";
    let s = parse_fwd_stats(out).unwrap();
    assert_eq!((s.rx, s.tx), (12, 749_039));
    assert_eq!(s.streams, vec![(5, 315_264), (7, 433_775)]);
    assert!(parse_fwd_stats("Bye...").is_none());
}
