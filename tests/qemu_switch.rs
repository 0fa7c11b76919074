//! Three real QEMU guests on one userspace switch (`[[switch]]`), with a tap uplink to the
//! host:
//!
//! - `g1` and `g2` (access VLAN 10) ping each other and carry an iperf3 TCP stream g1 → g2;
//!   their frames go from one guest's TX buffers into the other's RX buffers inside the daemon.
//! - `g3` (access VLAN 20) has an address in the same IPv4 subnet on purpose: VLAN isolation,
//!   not routing, must keep it out. It cannot ping g1 or g2, and its interface receives nothing
//!   at all while the others talk (nothing else is on VLAN 20).
//! - The host side of the uplink tap (`vlan = 10` on the uplink: its untagged frames are VLAN
//!   10) pings g1 and g2, and not g3.
//! - `ctl fdb` has g1's, g2's and the tap's addresses on VLAN 10 on the right members, `ctl
//!   stats` counts switched frames on g1 and g2 and nothing delivered to g3, the guests' kernels
//!   logged no virtio errors, and the daemon is still running at the end.
//!
//! Round-trip times and the iperf3 rate are printed as `FIGURE` lines (TCG guests: the figures
//! measure the emulator more than the switch).
//!
//! The daemon (`--config` with the switch and its three ports, `--control`) runs in a private
//! network namespace (`testkit::netns::in_new_netns`), where it creates the uplink tap; the
//! guests run in parallel and reach the daemon through its socket files. Needs root, network
//! namespaces, /dev/net/tun, QEMU and the test guest built by `tests/setup/build-guest.sh`
//! (cached; built on first use): skipped otherwise, failed under `CI=true`. About 25 s
//! with TCG on two cores (boots take 5-10 s each here; the timeouts allow far slower). Run:
//! `CI=true cargo test --release --test qemu_switch -- --nocapture`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::guest::{self, iperf_mbps, CmdOutput, GuestOpts, QemuGuest};
use testkit::netns::{self, in_new_netns, wait_until, Daemon};

/// The switch.
const SWITCH: &str = "sw0";
/// The uplink tap the daemon creates in its namespace.
const UPLINK: &str = "vpqs-up0";
/// The host's address on the uplink tap.
const HOST_IP: &str = "10.77.0.254";
/// How long three TCG guests sharing two cores may take to boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Timeout of one guest command.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// One guest and its switch port.
#[derive(Clone, Copy, Debug)]
struct Vm {
    /// Port name (also the guest's label).
    name: &'static str,
    /// The port's `mac`, and the guest's.
    mac: &'static str,
    /// The guest's address (a /24).
    ip: &'static str,
    /// The port's access VLAN.
    vlan: u16,
}

/// The three guests: g1 and g2 on VLAN 10 with the uplink, g3 alone on VLAN 20.
const VMS: [Vm; 3] = [
    Vm {
        name: "g1",
        mac: "02:71:73:00:00:01",
        ip: "10.77.0.1",
        vlan: 10,
    },
    Vm {
        name: "g2",
        mac: "02:71:73:00:00:02",
        ip: "10.77.0.2",
        vlan: 10,
    },
    Vm {
        name: "g3",
        mac: "02:71:73:00:00:03",
        ip: "10.77.0.3",
        vlan: 20,
    },
];

/// The daemon's config: switch `sw0` with the uplink tap on VLAN 10, and one port per guest
/// (socket `DIR/NAME.sock`).
fn config_toml(dir: &Path) -> String {
    let mut t = format!(
        "[[switch]]\nname = \"{SWITCH}\"\n\
         uplinks = [{{ kind = \"tap\", name = \"{UPLINK}\", vlan = 10 }}]\n"
    );
    for vm in VMS {
        t += &format!(
            "\n[[port]]\nname = \"{name}\"\nsocket = \"{sock}\"\n\
             host = {{ kind = \"switch\", name = \"{SWITCH}\" }}\nmac = \"{mac}\"\nvlan = {vlan}\n",
            name = vm.name,
            sock = socket(dir, vm).display(),
            mac = vm.mac,
            vlan = vm.vlan,
        );
    }
    t
}

/// The vhost-user socket of `vm`'s port.
fn socket(dir: &Path, vm: Vm) -> PathBuf {
    dir.join(format!("{}.sock", vm.name))
}

/// QEMU options for `vm`: one queue pair on its port, its MAC and address, 256 MiB (what the
/// other small-guest tests use).
fn guest_opts(dir: &Path, vm: Vm) -> GuestOpts {
    let mut o = GuestOpts::vhost_user(socket(dir, vm), 1);
    o.mac = vm.mac.into();
    o.ip = Some(format!("{}/24", vm.ip));
    o.memory_mib = 256;
    o.name = format!("qswitch-{}", vm.name);
    o
}

/// Starts the daemon on `config` with control socket `control` (in the caller's namespace)
/// and waits until it serves every port and the control socket, and the uplink tap exists.
fn start_daemon(dir: &Path, config: &Path, control: &Path) -> Daemon {
    let log = dir.join("daemon.log");
    let mut daemon = Daemon::spawn(
        &[
            "--config",
            config.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
            "--log-level",
            "info",
        ],
        &log,
    )
    .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", netns::daemon_bin()));
    // The control socket is made after every port of the file has started.
    let up = wait_until(Duration::from_secs(10), || {
        control.exists() || daemon.try_wait().is_ok_and(|s| s.is_some())
    });
    daemon.assert_alive();
    assert!(up, "the daemon did not come up\n{}", daemon.log_text());
    for vm in VMS {
        assert!(
            socket(dir, vm).exists(),
            "no socket for port {}\n{}",
            vm.name,
            daemon.log_text()
        );
    }
    assert!(
        netns::if_exists(UPLINK),
        "the daemon did not create {UPLINK}\n{}",
        daemon.log_text()
    );
    daemon
}

/// What busybox `ping` reported: packets sent and received, and the average round trip in
/// ms (from `round-trip min/avg/max = a/b/c ms`; absent when nothing came back).
#[derive(Clone, Copy, Debug, PartialEq)]
struct PingResult {
    sent: u32,
    received: u32,
    avg_ms: Option<f64>,
}

/// Parses busybox `ping` output (`N packets transmitted, M packets received, ...`).
fn parse_ping(out: &str) -> Option<PingResult> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse::<u32>().ok());
    let (sent, received) = (nums.next()?, nums.next()?);
    let avg_ms = out
        .lines()
        .find(|l| l.starts_with("round-trip"))
        .and_then(|l| l.split(" = ").nth(1))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.parse().ok());
    Some(PingResult {
        sent,
        received,
        avg_ms,
    })
}

/// Asserts that a ping (`what`) got every reply; returns the average round trip in ms.
#[track_caller]
fn assert_ping_ok(what: &str, out: &str, ok: bool) -> f64 {
    let r = parse_ping(out);
    assert!(
        ok && r.is_some_and(|r| r.sent > 0 && r.received == r.sent),
        "{what}: expected every reply, got {r:?}:\n{out}"
    );
    r.and_then(|r| r.avg_ms).unwrap_or(f64::NAN)
}

/// Asserts that a ping (`what`) got no reply at all. busybox `ping` either reports 100% loss
/// or, once the kernel's ARP resolution has failed, dies on `sendto: Host is unreachable`;
/// both are failures, and neither shows a `bytes from` line.
#[track_caller]
fn assert_ping_fails(what: &str, out: &str, ok: bool) {
    let r = parse_ping(out);
    assert!(
        !ok && !out.contains("bytes from") && r.is_none_or(|r| r.received == 0),
        "{what}: expected no reply, got {r:?}:\n{out}"
    );
}

/// Starts busybox `ping -c COUNT -W WAIT TARGET` in the caller's network namespace (the
/// host has no `ping` binary; the other tests use busybox's too).
fn host_ping(target: &str, count: u32, wait: u32) -> Child {
    Command::new("busybox")
        .args(["ping", "-c", &count.to_string(), "-W", &wait.to_string()])
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run busybox ping: {e}"))
}

/// Waits for a [`host_ping`]; returns its output (stdout then stderr) and whether it succeeded.
fn host_ping_result(child: Child) -> (String, bool) {
    let out = child.wait_with_output().expect("busybox ping");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, out.status.success())
}

/// Runs `cmd` in `vm`, failing the test (naming `who`) if the console does not answer.
#[track_caller]
fn run(vm: &mut QemuGuest, who: &str, cmd: &str) -> CmdOutput {
    vm.run(cmd, CMD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{who}: {cmd:?}: {e}"))
}

/// The guest's eth0 receive counter.
#[track_caller]
fn rx_packets(vm: &mut QemuGuest, who: &str) -> u64 {
    let out = run(vm, who, "cat /sys/class/net/eth0/statistics/rx_packets");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{who}: rx_packets: {out}"))
}

/// Bytes the receiver got, from the `receiver` line of `iperf3` output (`12.3 MBytes`).
fn iperf_received_bytes(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.contains("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| w.ends_with("Bytes"))?;
    let scale = match words[i] {
        "Bytes" => 1.0,
        "KBytes" => 1024.0,
        "MBytes" => 1024.0 * 1024.0,
        "GBytes" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v: f64 = words.get(i.checked_sub(1)?)?.parse().ok()?;
    Some(v * scale)
}

/// Every switch port's counters (the `"switch"` object of `ctl stats`), by port name.
#[track_caller]
fn switch_counters(control: &Path) -> BTreeMap<String, BTreeMap<String, u64>> {
    netns::switch_counters(control)
}

/// The forwarding table of `sw` as `(vlan, mac, member)`.
#[track_caller]
fn fdb(control: &Path, sw: &str) -> Vec<(u64, String, String)> {
    let v = netns::ctl_json(control, &["fdb", sw]);
    v.as_array()
        .unwrap_or_else(|| panic!("fdb: {v}"))
        .iter()
        .map(|e| {
            (
                e["vlan"].as_u64().unwrap_or(u64::MAX),
                e["mac"].as_str().unwrap_or_default().to_lowercase(),
                e["member"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The MAC address of `ifname` in the caller's namespace (`link/ether` of `ip -o link`).
fn if_mac(ifname: &str) -> String {
    let text = netns::ip(&["-o", "link", "show", "dev", ifname]);
    let mut words = text.split_whitespace();
    words
        .find(|w| *w == "link/ether")
        .and_then(|_| words.next())
        .unwrap_or_else(|| panic!("no link/ether in {text:?}"))
        .to_lowercase()
}

/// The virtio lines of the guest's kernel log, and those among them that look like trouble.
fn virtio_trouble(vm: &mut QemuGuest, who: &str) -> (String, Vec<String>) {
    let out = run(vm, who, "dmesg | grep -i virtio");
    let bad = out
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            ["error", "bad", "not a head", "unexpected"]
                .iter()
                .any(|w| l.contains(w))
        })
        .map(str::to_string)
        .collect();
    (out.output, bad)
}

#[test]
fn two_guests_on_a_switch() {
    const NAME: &str = "two_guests_on_a_switch";
    if let Some(why) = guest::missing_prereqs().or_else(netns::missing_prereqs) {
        guest::skip_or_fail(NAME, &why);
        return;
    }
    // Build (or find in the cache) the guest before any timing starts.
    if let Err(e) = guest::try_guest_dir() {
        guest::skip_or_fail(NAME, &format!("no test guest: {e}"));
        return;
    }
    let t0 = Instant::now();
    in_new_netns(|| {
        let dir = netns::target_workdir("qemu-switch");
        let config = dir.join("switch.toml");
        std::fs::write(&config, config_toml(&dir)).unwrap();
        let control = dir.join("control.sock");
        let mut daemon = start_daemon(&dir, &config, &control);
        netns::ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", UPLINK]);
        netns::ip(&["link", "set", UPLINK, "up"]);
        let tap_mac = if_mac(UPLINK);

        // The three QEMUs start at once and boot in parallel; then each is waited for in turn.
        let [mut g1, mut g2, mut g3] = VMS.map(|vm| {
            QemuGuest::start(&guest_opts(&dir, vm))
                .unwrap_or_else(|e| panic!("{}: cannot start QEMU: {e}", vm.name))
        });
        for (vm, spec) in [&mut g1, &mut g2, &mut g3].into_iter().zip(VMS) {
            let boot = vm
                .wait_ready(BOOT_TIMEOUT)
                .unwrap_or_else(|e| panic!("{} not ready: {e}\n{}", spec.name, daemon.log_text()));
            eprintln!(
                "{} ready after {boot:.1?}; logs in {}",
                spec.name,
                vm.log_dir().display()
            );
        }
        eprintln!(
            "FIGURE qemu switch: 3 guests booted in parallel in {:.1?} (TCG)",
            t0.elapsed()
        );
        let g3_rx_before = rx_packets(&mut g3, "g3");

        // Step 1 (and 3, 4): g1 <-> g2 both ways, g3 towards both, the host towards all
        // three, at the same time.
        let t_ping = Instant::now();
        let host_pings: Vec<(&str, Child)> = vec![
            ("10.77.0.1", host_ping("10.77.0.1", 3, 5)),
            ("10.77.0.2", host_ping("10.77.0.2", 3, 5)),
            ("10.77.0.3", host_ping("10.77.0.3", 3, 1)),
        ];
        let (g1_ping, g2_ping, g3_pings) = std::thread::scope(|s| {
            let a = s.spawn(|| run(&mut g1, "g1", "ping -c 5 -W 5 10.77.0.2"));
            let b = s.spawn(|| run(&mut g2, "g2", "ping -c 5 -W 5 10.77.0.1"));
            let c = s.spawn(|| {
                [
                    run(&mut g3, "g3", "ping -c 3 -W 1 10.77.0.1"),
                    run(&mut g3, "g3", "ping -c 3 -W 1 10.77.0.2"),
                    run(&mut g3, "g3", &format!("ping -c 3 -W 1 {HOST_IP}")),
                ]
            });
            (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
        });
        let host_results: Vec<(&str, (String, bool))> = host_pings
            .into_iter()
            .map(|(ip, child)| (ip, host_ping_result(child)))
            .collect();
        eprintln!("ping phase took {:.1?}", t_ping.elapsed());

        let rtt12 = assert_ping_ok("g1 -> g2", &g1_ping, g1_ping.success());
        let rtt21 = assert_ping_ok("g2 -> g1", &g2_ping, g2_ping.success());
        eprintln!("FIGURE qemu switch g1->g2 ping: avg {rtt12:.3} ms (3 guests and the host pinging at once, TCG)");
        eprintln!("FIGURE qemu switch g2->g1 ping: avg {rtt21:.3} ms (3 guests and the host pinging at once, TCG)");
        for (out, target) in g3_pings.iter().zip(["g1", "g2", "the host"]) {
            assert_ping_fails(&format!("g3 (VLAN 20) -> {target}"), out, out.success());
        }
        for (ip, (out, ok)) in &host_results {
            if *ip == "10.77.0.3" {
                assert_ping_fails("host -> g3 (VLAN 20)", out, *ok);
            } else {
                let rtt = assert_ping_ok(&format!("host -> {ip}"), out, *ok);
                eprintln!("FIGURE qemu switch host->{ip} ping (uplink tap): avg {rtt:.3} ms (3 guests and the host pinging at once, TCG)");
            }
        }

        // Step 2: TCP g1 -> g2 through the switch.
        let t_iperf = Instant::now();
        run(&mut g2, "g2", "iperf3 -s -1 >/tmp/iperf-s.log 2>&1 &");
        let client = run(
            &mut g1,
            "g1",
            "for i in 1 2 3 4 5; do iperf3 -c 10.77.0.2 -t 5 -f m && break; sleep 1; done",
        );
        let server = g2
            .run("wait; cat /tmp/iperf-s.log", Duration::from_secs(30))
            .map(|o| o.output)
            .unwrap_or_else(|e| format!("(no server log: {e})"));
        eprintln!("iperf3 phase took {:.1?}", t_iperf.elapsed());
        let bytes = iperf_received_bytes(&client);
        assert!(
            bytes.is_some_and(|b| b > 0.0),
            "iperf3 g1 -> g2: nothing received ({bytes:?}):\n{client}\n--- server ---\n{server}"
        );
        let mbps = iperf_mbps(&client)
            .unwrap_or_else(|| panic!("no iperf3 rate:\n{client}\n--- server ---\n{server}"));
        eprintln!(
            "FIGURE qemu switch g1->g2 iperf3: {mbps} Mbit/s ({:.1} MiB in 5 s, TCG)",
            bytes.unwrap_or(0.0) / (1024.0 * 1024.0)
        );

        // Step 3: g3 saw none of it: nothing else is on VLAN 20, so not one frame.
        let g3_rx_after = rx_packets(&mut g3, "g3");
        eprintln!("g3 eth0 rx_packets: {g3_rx_before} before, {g3_rx_after} after");

        // Step 5: the switch's view.
        let counters = switch_counters(&control);
        for (port, c) in &counters {
            eprintln!("switch counters {port}: {c:?}");
        }
        let table = fdb(&control, SWITCH);
        eprintln!("fdb {SWITCH}: {table:?}");
        let up_member = format!("uplink:{UPLINK}");
        for (vlan, mac, member) in [
            (10, VMS[0].mac.to_string(), "g1"),
            (10, VMS[1].mac.to_string(), "g2"),
            (10, tap_mac.clone(), up_member.as_str()),
        ] {
            assert!(
                table.contains(&(vlan, mac.clone(), member.to_string())),
                "fdb {SWITCH}: no ({vlan}, {mac}, {member}) in {table:?}"
            );
        }
        assert!(
            table
                .iter()
                .all(|(vlan, mac, _)| *vlan == 10 || *mac == VMS[2].mac),
            "only g3's address may be learned outside VLAN 10: {table:?}"
        );
        let get = |port: &str, name: &str| -> u64 {
            let c = counters
                .get(port)
                .unwrap_or_else(|| panic!("no switch port {port} in {counters:?}"));
            *c.get(name)
                .unwrap_or_else(|| panic!("{port}: no counter {name} in {c:?}"))
        };
        for port in ["g1", "g2"] {
            assert!(
                get(port, "forwarded") > 0,
                "{port}: nothing forwarded: {counters:?}"
            );
        }
        for port in ["g1", "g2", "g3"] {
            for bad in ["drop_malformed", "drop_offload", "drop_inbox_full"] {
                assert_eq!(get(port, bad), 0, "{port}: {bad}: {counters:?}");
            }
        }
        assert_eq!(
            get("g3", "received"),
            0,
            "the switch queued frames for g3 (alone on VLAN 20): {counters:?}"
        );
        assert_eq!(
            g3_rx_after - g3_rx_before,
            0,
            "g3 (alone on VLAN 20) received frames while g1, g2 and the host talked on VLAN 10"
        );

        // Step 6: no virtio trouble in the guests, and the daemon still runs.
        for (vm, who) in [(&mut g1, "g1"), (&mut g2, "g2"), (&mut g3, "g3")] {
            let (lines, bad) = virtio_trouble(vm, who);
            assert!(
                bad.is_empty(),
                "{who}: virtio trouble in dmesg: {bad:?}\n{lines}"
            );
        }
        daemon.assert_alive();
        eprintln!("{NAME}: passed in {:.1?}", t0.elapsed());
    });
}

#[test]
fn ping_and_iperf_parsers() {
    let ok = "PING 10.77.0.2 (10.77.0.2): 56 data bytes\n\
              64 bytes from 10.77.0.2: seq=0 ttl=64 time=1.234 ms\n\n\
              --- 10.77.0.2 ping statistics ---\n\
              5 packets transmitted, 5 packets received, 0% packet loss\n\
              round-trip min/avg/max = 0.421/0.512/0.630 ms\n";
    assert_eq!(
        parse_ping(ok),
        Some(PingResult {
            sent: 5,
            received: 5,
            avg_ms: Some(0.512)
        })
    );
    let lost = "3 packets transmitted, 0 packets received, 100% packet loss\n";
    assert_eq!(
        parse_ping(lost),
        Some(PingResult {
            sent: 3,
            received: 0,
            avg_ms: None
        })
    );
    assert_eq!(parse_ping("ping: sendto: Host is unreachable\n"), None);
    let iperf = "[  5]   0.00-5.00   sec  21.2 MBytes  35.5 Mbits/sec    0             sender\n\
                 [  5]   0.00-5.04   sec  21.0 MBytes  35.0 Mbits/sec                  receiver\n";
    assert_eq!(iperf_received_bytes(iperf), Some(21.0 * 1024.0 * 1024.0));
}
