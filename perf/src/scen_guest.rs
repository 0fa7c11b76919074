//! Scenario `guest-tcp`: a real QEMU guest (TCG: nested KVM does not boot here) running iperf3
//! against a server on the host side, 1 and 4 streams, both directions, plus ICMP round-trip
//! percentiles. Paths in the same run:
//!
//! - `vhost-pump-tap`: QEMU vhost-user → vhost-pump → tap (host netns side has the address).
//! - `vhost-pump-afpacket`: QEMU vhost-user → vhost-pump → AF_PACKET on a veth; the peer has the
//!   address.
//! - `dpdk-vhost-afpacket`: QEMU vhost-user → `dpdk-testpmd` (`net_vhost0` forwarding to
//!   `net_af_packet0`) on the same veth: DPDK's own AF_PACKET path. It passes no GSO or
//!   checksum metadata between the ring and the socket, so it only works with every offload
//!   off: the virtio-net device offers none (the guest segments and checksums itself) and the
//!   veth's offloads are off (no GSO or partial-checksum skbs reach the PMD).
//! - `qemu-tap`: QEMU's own `-netdev tap,vhost=off` (no /dev/vhost-net here).
//! - `kata-tcfilter`: Kata's default: a veth pair whose pod end lives in a second namespace,
//!   `tc ... matchall action mirred egress redirect` both ways between it and a tap that QEMU's
//!   tap netdev uses.
//!
//! With a TCG guest the vCPU is the bottleneck: these runs show function, CPU cost per Gbit and
//! latency, not a backend's ceiling.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::daemon::{self, DaemonOpts, Port, StartError};
use crate::guest::{GuestOpts, NetKind, QemuGuest};
use crate::record::{Record, Status};
use crate::scen_vmless::Unavailable;
use crate::sys::{self, Netns, Proc, Usage};
use crate::testpmd::{Testpmd, TestpmdOpts};
use crate::{ping, Lab, RunOpts};

/// The paths of this scenario.
pub const PATHS: [&str; 5] = [
    "vhost-pump-tap",
    "vhost-pump-afpacket",
    "dpdk-vhost-afpacket",
    "qemu-tap",
    "kata-tcfilter",
];

const HOST_IP: &str = "10.253.0.1";
const GUEST_IP: &str = "10.253.0.2";
const GUEST_MAC: &str = "52:54:00:76:70:02";

/// Records this scenario will produce.
pub fn planned(opts: &RunOpts) -> u64 {
    let n = PATHS
        .iter()
        .filter(|b| opts.backends.is_empty() || opts.backends.iter().any(|x| x == *b))
        .count() as u64;
    n * (2 * opts.streams.len() as u64 + 1)
}

/// Runs the scenario.
pub fn run(lab: &mut Lab) -> Result<()> {
    for path in PATHS {
        if !lab.wants(path) || sys::interrupted() {
            continue;
        }
        lab.begin();
        lab.status(format!("guest-tcp: booting a guest on {path}"));
        if let Err(e) = run_path(lab, path) {
            let (status, msg) = match e.downcast_ref::<Unavailable>() {
                Some(u) => (Status::Unavailable, u.0.clone()),
                None => (Status::Failed, format!("{e:#}")),
            };
            // One record per planned measurement, so that the table shows the gap.
            for &streams in &lab.opts.streams.clone() {
                for dir in ["guest-tx", "guest-rx"] {
                    let mut r = tcp_record(path, dir, streams);
                    r.fail(status, msg.clone());
                    lab.record(r);
                }
            }
            let mut r = Record::new("guest-tcp", "ping", path, "-");
            r.fail(status, msg);
            lab.record(r);
        }
    }
    Ok(())
}

fn tcp_record(path: &str, dir: &str, streams: u32) -> Record {
    let mut r = Record::new("guest-tcp", "tcp", path, dir);
    r.streams = streams;
    r
}

/// What one path needs kept alive while the guest runs.
/// Fields drop in order: the daemon first, the namespaces last.
struct Setup {
    /// Daemon (vhost-pump paths).
    daemon: Option<Proc>,
    /// DPDK's backend (dpdk-vhost-* paths).
    pmd: Option<Testpmd>,
    /// Guest network options.
    net: NetKind,
    /// Extra `-device virtio-net-pci` properties.
    device_props: Vec<String>,
    /// Namespace QEMU runs in.
    qemu_ns: Option<Netns>,
    /// The host-side namespace (iperf3 server, ping source).
    host: Netns,
}

fn setup_path(lab: &Lab, path: &str) -> Result<Setup> {
    let host = Netns::create("gh")?;
    let cidr = format!("{HOST_IP}/24");
    match path {
        "vhost-pump-tap" | "vhost-pump-afpacket" => {
            let sock = daemon::socket(lab, "guest");
            let port = if path == "vhost-pump-tap" {
                Port::Tap("vpgt0".into())
            } else {
                host.ip(&[
                    "link", "add", "vpga0", "type", "veth", "peer", "name", "vpgb0",
                ])?;
                host.ip(&["link", "set", "vpga0", "up"])?;
                host.ip(&["link", "set", "vpgb0", "up"])?;
                Port::AfPacket("vpga0".into())
            };
            let o = DaemonOpts {
                port,
                socket: sock.clone(),
                queues: 1,
                mtu: None,
                cpu: None,
                mac: Some(GUEST_MAC.into()),
                name: format!("guest-{path}"),
            };
            let p = match daemon::start(lab, &host, &o) {
                Ok(p) => p,
                Err(StartError::Refused(m)) if path == "vhost-pump-afpacket" => {
                    return Err(Unavailable(m).into())
                }
                Err(e) => bail!("{e}"),
            };
            let addr_if = if path == "vhost-pump-tap" {
                "vpgt0"
            } else {
                "vpgb0"
            };
            host.ip(&["addr", "add", &cidr, "dev", addr_if])?;
            host.ip(&["link", "set", addr_if, "up"])?;
            Ok(Setup {
                host,
                qemu_ns: None,
                daemon: Some(p),
                pmd: None,
                device_props: Vec::new(),
                net: NetKind::VhostUser {
                    socket: sock,
                    queues: 1,
                    reconnect: false,
                },
            })
        }
        "dpdk-vhost-afpacket" => {
            let sock = daemon::socket(lab, "guest-dpdk");
            host.ip(&[
                "link", "add", "vpga0", "type", "veth", "peer", "name", "vpgb0",
            ])?;
            host.ip(&["link", "set", "vpga0", "up"])?;
            for end in ["vpga0", "vpgb0"] {
                host.exec(&[
                    "ethtool", "-K", end, "rx", "off", "tx", "off", "tso", "off", "gso", "off",
                    "gro", "off",
                ])?;
            }
            let cpu = lab.cpus.backend;
            let o = TestpmdOpts {
                name: format!("vpperf-gbe-{}", std::process::id()),
                lcores: lab.cpus.testpmd(cpu).0,
                main_lcore: lab.cpus.testpmd(cpu).1,
                vdevs: vec![
                    format!("net_vhost0,iface={},queues=1", sock.display()),
                    // framecnt: as deep a ring as vhost-pump's (8192 slots).
                    "net_af_packet0,iface=vpga0,qpairs=1,qdisc_bypass=1,framecnt=8192".into(),
                ],
                app_args: vec![
                    "--forward-mode=io".into(),
                    "--nb-cores=1".into(),
                    "--rxq=1".into(),
                    "--txq=1".into(),
                    "--burst=32".into(),
                    "--total-num-mbufs=65536".into(),
                    "--max-pkt-len=1518".into(),
                    "--mbuf-size=2176".into(),
                    "--no-lsc-interrupt".into(),
                ],
                log: lab.log("guest-dpdk-vhost-afpacket-testpmd"),
                mem_mib: 1024,
            };
            let mut pmd = Testpmd::start(&host, &o)?;
            pmd.start_fwd()?;
            if !sock.exists() {
                bail!("DPDK vhost did not create {}", sock.display());
            }
            host.ip(&["addr", "add", &cidr, "dev", "vpgb0"])?;
            host.ip(&["link", "set", "vpgb0", "up"])?;
            Ok(Setup {
                host,
                qemu_ns: None,
                daemon: None,
                pmd: Some(pmd),
                device_props: [
                    "csum",
                    "guest_csum",
                    "host_tso4",
                    "host_tso6",
                    "host_ecn",
                    "host_ufo",
                    "guest_tso4",
                    "guest_tso6",
                    "guest_ecn",
                    "guest_ufo",
                ]
                .iter()
                .map(|p| format!("{p}=off"))
                .collect(),
                net: NetKind::VhostUser {
                    socket: sock,
                    queues: 1,
                    reconnect: false,
                },
            })
        }
        "qemu-tap" => {
            host.ip(&["tuntap", "add", "dev", "vpgq0", "mode", "tap"])?;
            host.ip(&["addr", "add", &cidr, "dev", "vpgq0"])?;
            host.ip(&["link", "set", "vpgq0", "up"])?;
            Ok(Setup {
                host,
                qemu_ns: None,
                daemon: None,
                pmd: None,
                device_props: Vec::new(),
                net: NetKind::Tap {
                    ifname: "vpgq0".into(),
                },
            })
        }
        "kata-tcfilter" => {
            // Host side: the CNI veth's host end with the peer address; pod netns: its other
            // end plus the tap, joined by tc mirred redirects both ways (Kata "tcfilter").
            let pod = Netns::create("gpod")?;
            host.ip(&[
                "link", "add", "vpkh0", "type", "veth", "peer", "name", "vpkp0",
            ])?;
            host.ip(&["link", "set", "vpkp0", "netns", pod.name()])?;
            host.ip(&["addr", "add", &cidr, "dev", "vpkh0"])?;
            host.ip(&["link", "set", "vpkh0", "up"])?;
            pod.ip(&["tuntap", "add", "dev", "vpkt0", "mode", "tap"])?;
            pod.ip(&["link", "set", "vpkp0", "up"])?;
            pod.ip(&["link", "set", "vpkt0", "up"])?;
            // Kata's own filter is `u32 match u8 0 0` (match everything); `matchall` does the
            // same where the u32 classifier is missing.
            for (from, to) in [("vpkp0", "vpkt0"), ("vpkt0", "vpkp0")] {
                pod.exec(&["tc", "qdisc", "add", "dev", from, "ingress"])?;
                let head = [
                    "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all",
                ];
                let tail = ["action", "mirred", "egress", "redirect", "dev", to];
                let u32_filter = [&head[..], &["u32", "match", "u8", "0", "0"], &tail[..]].concat();
                if pod.exec(&u32_filter).is_err() {
                    pod.exec(&[&head[..], &["matchall"], &tail[..]].concat())?;
                }
            }
            Ok(Setup {
                host,
                qemu_ns: Some(pod),
                daemon: None,
                pmd: None,
                device_props: Vec::new(),
                net: NetKind::Tap {
                    ifname: "vpkt0".into(),
                },
            })
        }
        _ => bail!("unknown path {path}"),
    }
}

/// Parses the receiver's Mbit/s from `iperf3 -f m` output (the SUM line with -P).
pub fn iperf_mbps(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.contains("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(i.checked_sub(1)?)?.parse().ok()
}

/// TCP retransmissions from the sender line of `iperf3` output.
fn iperf_retr(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.contains("sender"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(i + 1)?.parse().ok()
}

fn run_path(lab: &mut Lab, path: &str) -> Result<()> {
    let setup = setup_path(lab, path)?;
    let iperf_log = lab.log(&format!("guest-{path}-iperf3-server"));
    let _server = Proc::spawn("iperf3 -s", setup.host.cmd(&["iperf3", "-s"]), &iperf_log)?;
    let mut opts = GuestOpts::tap("unused");
    opts.net = setup.net.clone();
    opts.device_props = setup.device_props.clone();
    opts.mac = GUEST_MAC.into();
    opts.ip = Some(format!("{GUEST_IP}/24"));
    opts.name = format!("vpperf-{path}");
    opts.guest_dir = lab.guest_dir.clone();
    match lab.opts.accel.as_deref() {
        Some("kvm") => opts.accel = crate::guest::Accel::Kvm,
        Some(_) => opts.accel = crate::guest::Accel::Tcg,
        None => {}
    }
    // Name QEMU's threads ("CPU 0/TCG", ...) so vCPU time can be told from I/O time; a second
    // -name merges with the one the guest module passes.
    opts.qemu_args = vec![
        "-name".into(),
        format!("guest=vpperf-{path},debug-threads=on"),
    ];
    let qemu_ns = setup.qemu_ns.as_ref().unwrap_or(&setup.host);
    let dir = lab
        .guest_dir
        .clone()
        .context("no guest directory (build-guest.sh did not run)")?;
    let qemu_args = opts.qemu_args(&dir)?;
    sys::log_cmd(format!(
        "ip netns exec {} {} {}",
        qemu_ns.name(),
        crate::guest::qemu_binary(),
        sys::shell_join(&qemu_args)
    ));
    // QEMU is spawned from a thread inside the namespace, so it (and its tap) live there.
    let mut vm = qemu_ns.enter(|| QemuGuest::start(&opts).map_err(anyhow::Error::from))?;
    let boot = vm
        .wait_ready(Duration::from_secs(120))
        .map_err(|e| anyhow::anyhow!("guest did not come up: {e}"))?;
    lab.say(format!(
        "guest-tcp {path}: guest ready after {boot:.1?} ({}; logs {})",
        opts.accel.name(),
        vm.log_dir().display()
    ));
    let setup_cmds = sys::peek_cmds();
    let d = lab.duration("guest-tcp");
    let secs = d.as_secs().max(1);
    let timeout = d + Duration::from_secs(60);
    // Make sure the path carries traffic before timing it.
    vm.run_ok(
        &format!("ping -c 2 -W 5 {HOST_IP}"),
        Duration::from_secs(30),
    )
    .map_err(|e| anyhow::anyhow!("no connectivity: {e}"))?;
    let mut pids = vec![];
    if let Some(p) = &setup.daemon {
        pids.push(p.pid());
    }
    if let Some(p) = &setup.pmd {
        pids.push(p.pid());
    }
    let qemu_pid = vm.pid();

    for &streams in &lab.opts.streams.clone() {
        for dir in ["guest-tx", "guest-rx"] {
            if sys::interrupted() {
                return Ok(());
            }
            lab.status(format!("guest-tcp {path} {dir} P{streams}"));
            let mut r = tcp_record(path, dir, streams);
            r.duration_s = secs as f64;
            let cmd = format!(
                "iperf3 -c {HOST_IP} -t {secs} -f m -P {streams}{}{}",
                if dir == "guest-rx" { " -R" } else { "" },
                if lab.opts.iperf_sendfile { " -Z" } else { "" }
            );
            let mut cmds = setup_cmds.clone();
            cmds.push(format!("(in the guest) {cmd}"));
            r.commands = cmds;
            let u0 = Usage::now(&pids);
            let q0 = sys::cpu_seconds_split(qemu_pid).unwrap_or((0.0, 0.0));
            let t0 = std::time::Instant::now();
            match vm.run(&cmd, timeout) {
                Ok(out) => {
                    let wall = t0.elapsed().as_secs_f64();
                    let u = Usage::now(&pids).since(&u0);
                    let q1 = sys::cpu_seconds_split(qemu_pid).unwrap_or((0.0, 0.0));
                    match iperf_mbps(&out) {
                        Some(mbps) if out.success() => {
                            let gbps = mbps / 1000.0;
                            r.metric("gbps", gbps);
                            if let Some(retr) = iperf_retr(&out) {
                                r.metric("tcp_retransmits", retr);
                            }
                            let qemu_io = 100.0 * (q1.1 - q0.1) / wall;
                            let vcpu = 100.0 * (q1.0 - q0.0) / wall;
                            r.metric("qemu_vcpu_cpu_pct", vcpu);
                            r.metric("qemu_io_cpu_pct", qemu_io);
                            // The backend's CPU: the daemon's, or QEMU's non-vCPU threads for
                            // QEMU's own tap path (its main loop does the tap I/O).
                            let backend = if pids.is_empty() {
                                qemu_io
                            } else {
                                r.metric("daemon_cpu_pct", 100.0 * u.cpu_s / wall);
                                100.0 * u.cpu_s / wall
                            };
                            r.metric("backend_cpu_pct", backend);
                            // Everything on the host outside the vCPU: daemon + QEMU I/O.
                            let host = backend + if pids.is_empty() { 0.0 } else { qemu_io };
                            r.metric("host_cpu_pct", host);
                            r.metric("machine_busy_pct", u.machine_busy_pct);
                            // All of it: daemon + every QEMU thread (with TCG the vCPU is
                            // always busy, but QEMU's own tap path also works in it).
                            let total = host + vcpu;
                            r.metric("total_cpu_pct", total);
                            if gbps > 0.0 {
                                r.metric("backend_cpu_pct_per_gbps", backend / gbps);
                                r.metric("host_cpu_pct_per_gbps", host / gbps);
                                r.metric("total_cpu_pct_per_gbps", total / gbps);
                            }
                        }
                        _ => {
                            r.fail(
                                Status::Failed,
                                format!("iperf3 failed: {}", tail(&out.output, 5)),
                            );
                        }
                    }
                }
                Err(e) => {
                    r.fail(Status::Failed, format!("iperf3 did not finish: {e}"));
                }
            }
            lab.record(r);
        }
    }

    lab.status(format!("guest-tcp {path} ping"));
    let mut r = Record::new("guest-tcp", "ping", path, "-");
    let count = lab.opts.pings.max(1);
    let mut cmds = setup_cmds.clone();
    cmds.push(format!(
        "vhost-pump-perf ICMP echo (in-process raw socket) from netns {} to {GUEST_IP}: {count} \
         requests, 10 ms apart, one outstanding",
        setup.host.name()
    ));
    r.commands = cmds;
    let host_ns = Path::new("/run/netns").join(setup.host.name());
    match ping::ping(
        &host_ns,
        GUEST_IP.parse::<Ipv4Addr>()?,
        count,
        Duration::from_millis(10),
    ) {
        Ok(p) if !p.rtts_us.is_empty() => {
            r.metric(
                "rtt_p50_us",
                ping::percentile(&p.rtts_us, 50.0).unwrap_or(0.0),
            );
            r.metric(
                "rtt_p99_us",
                ping::percentile(&p.rtts_us, 99.0).unwrap_or(0.0),
            );
            r.metric(
                "rtt_max_us",
                ping::percentile(&p.rtts_us, 100.0).unwrap_or(0.0),
            );
            r.metric(
                "ping_loss_pct",
                100.0 * f64::from(p.sent - p.rtts_us.len() as u32) / f64::from(p.sent),
            );
            r.metric("pings", f64::from(p.sent));
        }
        Ok(_) => {
            r.fail(Status::Failed, "no echo replies");
        }
        Err(e) => {
            r.fail(Status::Failed, format!("{e:#}"));
        }
    }
    lab.record(r);
    let _ = vm.kill();
    drop(setup);
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_iperf3() {
        let out = "[ ID] Interval           Transfer     Bitrate         Retr\n\
                   [SUM]   0.00-5.00   sec   600 MBytes  1006 Mbits/sec   12             sender\n\
                   [SUM]   0.00-5.00   sec   598 MBytes  1003.5 Mbits/sec                  receiver\n";
        assert_eq!(super::iperf_mbps(out), Some(1003.5));
        assert_eq!(super::iperf_retr(out), Some(12.0));
    }
}
