//! End to end with a real QEMU guest on vhost-pump's tap mode: ping, iperf3 TCP both
//! directions with TSO on in the guest, two queue pairs carrying traffic, 9000-byte MTU frames,
//! and a backend killed and restarted while the guest runs (QEMU reconnects).
//!
//! The daemon and its tap live in a private network namespace; the guest talks to the tap's
//! kernel side there. Needs root and QEMU: skipped otherwise, failed under `CI=true`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::guest::{self, ethtool_stat as stat, iperf_mbps, GuestOpts, NetKind, QemuGuest};
use testkit::netns::{target_workdir as workdir, KillOnDrop as Proc, NamedNetns as Netns};

const HOST_IP: &str = "10.252.0.1";
const GUEST_CIDR: &str = "10.252.0.2/24";
const TAP: &str = "vpe2e0";

fn start_daemon(ns: &Netns, socket: &Path, log: &Path, extra: &[&str]) -> Proc {
    let _ = std::fs::remove_file(socket);
    let p = spawn_daemon(ns, socket, log, TAP, extra);
    let t = Instant::now();
    while !socket.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "daemon did not create {}; log: {}",
            socket.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn spawn_daemon(ns: &Netns, socket: &Path, log: &Path, tap: &str, extra: &[&str]) -> Proc {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("daemon log");
    let mut argv = vec![
        env!("CARGO_BIN_EXE_vhost-pump"),
        "--socket",
        socket.to_str().unwrap(),
        "--tap",
        tap,
    ];
    argv.extend_from_slice(extra);
    let child = ns
        .cmd(&argv)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn vhost-pump");
    Proc(child)
}

#[test]
fn qemu_guest_over_tap_mode() {
    if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail("qemu_guest_over_tap_mode", &why);
        return;
    }
    let dir = workdir("qemu-e2e");
    let socket = dir.join("vu.sock");
    let log = dir.join("vhost-pump.log");
    let ns = Netns::create("vp-e2e");
    // A persistent tap, as an operator or a CNI plugin would make it: it outlives the daemon,
    // so its address survives the backend restart below.
    ns.exec(&[
        "ip",
        "tuntap",
        "add",
        "dev",
        TAP,
        "mode",
        "tap",
        "multi_queue",
    ]);
    ns.exec(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    let daemon_args = ["--queues", "2", "--mtu", "9000", "--log-level", "info"];
    let mut daemon = start_daemon(&ns, &socket, &log, &daemon_args);
    let _iperf = ns.spawn_quiet(&["iperf3", "-s"]);

    let mut opts = GuestOpts::vhost_user(&socket, 2);
    opts.net = NetKind::VhostUser {
        socket: socket.clone(),
        queues: 2,
        reconnect: true,
    };
    opts.ip = Some(GUEST_CIDR.into());
    opts.mtu = Some(9000);
    opts.vcpus = 2;
    opts.name = "e2e".into();
    let mut vm = QemuGuest::start(&opts).expect("start QEMU");
    let boot = vm.wait_ready(Duration::from_secs(90)).expect("guest ready");
    eprintln!(
        "guest ready after {boot:.2?}; logs in {}",
        vm.log_dir().display()
    );
    let t = Duration::from_secs(60);

    let ping = vm.run(&format!("ping -c 3 -W 5 {HOST_IP}"), t).unwrap();
    assert!(ping.contains(" 0% packet loss"), "ping failed:\n{ping}");

    let offload = vm.run_ok("ethtool -k eth0", t).unwrap();
    assert!(
        offload.contains("tcp-segmentation-offload: on"),
        "TSO not on in the guest:\n{offload}"
    );
    let channels = vm.run_ok("ethtool -l eth0", t).unwrap();
    let current = channels
        .split("Current hardware settings")
        .nth(1)
        .unwrap_or("");
    assert!(
        current.contains("Combined:\t2"),
        "2 queue pairs not active:\n{channels}"
    );

    // Jumbo frames: the guest's MTU comes from the device's config space.
    let mtu = vm.run_ok("cat /sys/class/net/eth0/mtu", t).unwrap();
    assert_eq!(mtu.trim(), "9000");
    let big = vm
        .run(&format!("ping -c 3 -W 5 -s 8900 {HOST_IP}"), t)
        .unwrap();
    assert!(
        big.contains(" 0% packet loss"),
        "9000-byte MTU ping failed:\n{big}"
    );

    // TCP both directions, 4 streams so both queue pairs carry traffic.
    let up = vm
        .run_ok(&format!("iperf3 -c {HOST_IP} -t 3 -P 4 -f m"), t)
        .unwrap();
    let up_mbps = iperf_mbps(&up).unwrap_or_else(|| panic!("no iperf3 result:\n{up}"));
    let down = vm
        .run_ok(&format!("iperf3 -c {HOST_IP} -t 3 -P 4 -f m -R"), t)
        .unwrap();
    let down_mbps = iperf_mbps(&down).unwrap_or_else(|| panic!("no iperf3 result:\n{down}"));
    eprintln!("iperf3 guest->host {up_mbps} Mbit/s, host->guest {down_mbps} Mbit/s (TCG guest)");
    assert!(up_mbps > 1.0 && down_mbps > 1.0);

    let stats = vm.run_ok("ethtool -S eth0", t).unwrap();
    for q in ["rx_queue_0_packets", "rx_queue_1_packets"] {
        assert!(stat(&stats, q) > 0, "{q} carried nothing:\n{stats}");
    }
    assert!(
        stat(&stats, "tx_queue_0_packets") + stat(&stats, "tx_queue_1_packets") > 1000,
        "guest TX counters too low:\n{stats}"
    );
    // GSO frames crossed the tap: average host->guest frame well above the MTU would need
    // GSO; check the tap's TX (towards the guest) bytes per packet exceed a plain 1500 MTU frame.
    let tx_bytes: u64 = ns
        .exec(&["cat", &format!("/sys/class/net/{TAP}/statistics/tx_bytes")])
        .trim()
        .parse()
        .unwrap();
    let tx_packets: u64 = ns
        .exec(&[
            "cat",
            &format!("/sys/class/net/{TAP}/statistics/tx_packets"),
        ])
        .trim()
        .parse()
        .unwrap();
    eprintln!("tap tx: {tx_bytes} bytes in {tx_packets} packets");
    assert!(
        tx_bytes / tx_packets.max(1) > 1500,
        "no large frames reached the guest"
    );

    // Kill the backend under a running guest; a new one takes over and traffic resumes.
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    drop(daemon);
    daemon = start_daemon(&ns, &socket, &log, &daemon_args);
    let resumed = vm
        .run(
            &format!("for i in $(seq 1 30); do ping -c 1 -W 1 {HOST_IP} >/dev/null && echo RESUMED && break; done"),
            Duration::from_secs(90),
        )
        .unwrap();
    assert!(
        resumed.contains("RESUMED"),
        "traffic did not resume after a backend restart:\n{resumed}\nlog:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let after = vm.run(&format!("ping -c 3 -W 5 {HOST_IP}"), t).unwrap();
    assert!(
        after.contains(" 0% packet loss"),
        "ping after restart:\n{after}"
    );
    let after_tcp = vm
        .run_ok(&format!("iperf3 -c {HOST_IP} -t 2 -f m"), t)
        .unwrap();
    assert!(
        iperf_mbps(&after_tcp).is_some_and(|m| m > 1.0),
        "TCP after restart:\n{after_tcp}"
    );
    drop(daemon);
}

/// `--client`: QEMU listens (as Kata Dragonball does), vhost-pump connects. The daemon is
/// started before the VMM and waits for the socket; it reconnects after its own restart and
/// after the VMM is replaced by a new one on the same socket.
#[test]
fn qemu_guest_client_mode() {
    if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail("qemu_guest_client_mode", &why);
        return;
    }
    const CTAP: &str = "vpcli0";
    const CHOST: &str = "10.253.0.1";
    let dir = workdir("qemu-client");
    let socket = dir.join("vmm.sock");
    let log = dir.join("vhost-pump.log");
    let ns = Netns::create("vp-client");
    ns.exec(&["ip", "tuntap", "add", "dev", CTAP, "mode", "tap"]);
    ns.exec(&["ip", "addr", "add", &format!("{CHOST}/24"), "dev", CTAP]);
    let args = ["--client", "--log-level", "info"];
    // Started first: the socket does not exist yet.
    let mut daemon = spawn_daemon(&ns, &socket, &log, CTAP, &args);

    let mut opts = GuestOpts::vhost_user(&socket, 1);
    opts.vhost_user_server = true;
    opts.ip = Some("10.253.0.2/24".into());
    opts.name = "client".into();
    let t = Duration::from_secs(60);
    let ping_ok = |vm: &mut QemuGuest, what: &str| {
        let out = vm
            .run(
                &format!("for i in $(seq 1 60); do ping -c 1 -W 1 {CHOST} >/dev/null && echo PING-OK && break; done"),
                Duration::from_secs(90),
            )
            .unwrap();
        assert!(
            out.contains("PING-OK"),
            "{what}: no ping\n{out}\nlog:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };

    let mut vm = QemuGuest::start(&opts).expect("start QEMU");
    vm.wait_ready(Duration::from_secs(90)).expect("guest ready");
    ping_ok(&mut vm, "first connection");

    // The backend restarts; it finds the VMM's socket again.
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    drop(daemon);
    daemon = spawn_daemon(&ns, &socket, &log, CTAP, &args);
    ping_ok(&mut vm, "after a backend restart");

    // The VMM is replaced (a VM restart): the same daemon serves the new one.
    vm.kill().unwrap();
    drop(vm);
    let _ = std::fs::remove_file(&socket);
    let mut vm = QemuGuest::start(&opts).expect("restart QEMU");
    vm.wait_ready(Duration::from_secs(90))
        .expect("second guest ready");
    ping_ok(&mut vm, "after a VMM restart");
    let out = vm.run(&format!("ping -c 3 -W 5 {CHOST}"), t).unwrap();
    assert!(out.contains(" 0% packet loss"), "{out}");
    drop(daemon);
}

/// A TCP stream keeps running while the backend is SIGKILLed and restarted twice: QEMU
/// reconnects, the ring state is resumed from the frontend, the guest never reboots.
#[test]
fn tcp_survives_backend_restarts() {
    if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail("tcp_survives_backend_restarts", &why);
        return;
    }
    const RTAP: &str = "vprst0";
    const RHOST: &str = "10.254.0.1";
    let dir = workdir("qemu-restart");
    let socket = dir.join("vu.sock");
    let log = dir.join("vhost-pump.log");
    let ns = Netns::create("vp-restart");
    ns.exec(&["ip", "tuntap", "add", "dev", RTAP, "mode", "tap"]);
    ns.exec(&["ip", "addr", "add", &format!("{RHOST}/24"), "dev", RTAP]);
    let _iperf = ns.spawn_quiet(&["iperf3", "-s"]);
    let start = |ns: &Netns| {
        let _ = std::fs::remove_file(&socket);
        let p = spawn_daemon(ns, &socket, &log, RTAP, &["--log-level", "info"]);
        let t = Instant::now();
        while !socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(10), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    };
    let mut daemon = start(&ns);
    let mut opts = GuestOpts::vhost_user(&socket, 1);
    opts.net = NetKind::VhostUser {
        socket: socket.clone(),
        queues: 1,
        reconnect: true,
    };
    opts.ip = Some("10.254.0.2/24".into());
    opts.name = "restart".into();
    let mut vm = QemuGuest::start(&opts).expect("start QEMU");
    vm.wait_ready(Duration::from_secs(90)).expect("guest ready");
    let t = Duration::from_secs(60);
    let boot_id = vm.run_ok("cat /proc/sys/kernel/random/boot_id", t).unwrap();
    vm.run_ok(
        &format!("iperf3 -c {RHOST} -t 16 -f m > /tmp/iperf.log 2>&1 &"),
        t,
    )
    .unwrap();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(4));
        let _ = daemon.0.kill();
        let _ = daemon.0.wait();
        drop(daemon);
        std::thread::sleep(Duration::from_millis(500));
        daemon = start(&ns);
    }
    let out = vm
        .run_ok("wait; cat /tmp/iperf.log", Duration::from_secs(90))
        .unwrap();
    eprintln!("{out}");
    assert!(
        !out.contains("error"),
        "iperf3 failed across restarts:\n{out}"
    );
    let mbps = iperf_mbps(&out).unwrap_or_else(|| panic!("no iperf3 result:\n{out}"));
    assert!(mbps > 1.0, "{out}");
    let after = vm.run_ok("cat /proc/sys/kernel/random/boot_id", t).unwrap();
    assert_eq!(boot_id, after, "the guest rebooted");
    let sessions = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        sessions.matches("frontend connected").count() >= 3,
        "expected 3 sessions:\n{sessions}"
    );
    drop(daemon);
}
