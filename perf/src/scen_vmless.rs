//! Scenario `vmless`: a DPDK virtio-user frontend (`dpdk-testpmd`, no VM) attached to each
//! backend under test, the backend's host port in a lab namespace.
//!
//! - guest TX: the frontend runs `txonly`; frames are counted by the kernel on the host port
//!   (`rx_packets` of the tap, or of the veth peer).
//! - guest RX: the lab's AF_PACKET generator injects frames into the host port from the kernel
//!   side at the highest rate it can; the frontend runs `rxonly` and counts them.
//! - NDR (guest RX only): binary search on the generator's offered rate for the highest rate
//!   with zero loss. testpmd's txonly has no rate limit, so there is no NDR for guest TX.
//!
//! - 64 KiB TSO frames (vhost-pump backends), both ways (see [`crate::gso`]): guest → host, a
//!   raw vhost-user frontend keeps 256 TSO frames in flight, Gbit/s of what the host interface
//!   received; host → guest, an AF_PACKET sender with virtio-net headers injects them into the
//!   host interface's far side, Gbit/s of what a raw frontend's RX ring got. DPDK's backends
//!   have no GSO path here: their PMDs carry no GSO metadata.
//!
//! Backends in the same run, same pinning: the kernel floors (write loops with no virtqueue
//! into a tap by `writev` and by io_uring, and into an AF_PACKET TX ring on a veth; see
//! [`crate::floor`]), vhost-pump tap mode, vhost-pump AF_PACKET mode on a veth, DPDK's
//! `net_vhost` + `net_tap`, DPDK's `net_vhost` + `net_af_packet` on a veth.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::daemon::{self, DaemonOpts, Port, StartError};
use crate::floor::Method;
use crate::gen::{GenConfig, Generator};
use crate::record::{Record, Status};
use crate::sys::{self, IfCounters, Netns, Proc, Usage};
use crate::testpmd::{self, Testpmd, TestpmdOpts};
use crate::{Lab, RunOpts};

/// The backends of this scenario (`kernel-floor-*`: the kernel's own limits, see
/// [`crate::floor`]).
pub const BACKENDS: [&str; 7] = [
    "kernel-floor-tap",
    "kernel-floor-tap-uring",
    "kernel-floor-afpacket",
    "vhost-pump-tap",
    "vhost-pump-afpacket",
    "dpdk-vhost-tap",
    "dpdk-vhost-afpacket",
];

const NS: &str = "vmless";
/// Host-side interface names.
const TAP: &str = "vpvt0";
const VETH_A: &str = "vpva0";
const VETH_B: &str = "vpvb0";
const DPDK_TAP: &str = "vpdt0";
const FLOOR_TAP: &str = "vpft0";

/// Number of records this scenario will produce with `opts`.
pub fn planned(opts: &RunOpts) -> u64 {
    let wanted = |b: &str| opts.backends.is_empty() || opts.backends.iter().any(|x| x == b);
    let n_backends = BACKENDS
        .iter()
        .filter(|b| !b.starts_with("kernel-floor") && wanted(b))
        .count() as u64;
    let sizes = opts.sizes.len() as u64;
    let ndr = if opts.no_ndr {
        0
    } else {
        opts.ndr_sizes.len() as u64
    };
    // The floors: guest → host only, one queue.
    let floors = BACKENDS
        .iter()
        .filter(|b| b.starts_with("kernel-floor") && wanted(b))
        .count() as u64;
    let floor = floors * sizes;
    // Two 64 KiB TSO figures (both directions) per vhost-pump backend and queue count.
    let gso = BACKENDS
        .iter()
        .filter(|b| b.starts_with("vhost-pump") && wanted(b))
        .count() as u64
        * opts.queues.len() as u64
        * 2;
    n_backends * opts.queues.len() as u64 * (2 * sizes + ndr) + floor + gso
}

/// What to measure on one backend.
pub struct Plan {
    /// Scenario name in the records.
    pub scenario: &'static str,
    /// Test name of the throughput records.
    pub test: &'static str,
    /// Frame sizes.
    pub sizes: Vec<u32>,
    /// Frame sizes to run an NDR search at.
    pub ndr_sizes: Vec<u32>,
}

/// The backend under test, running.
struct Running {
    /// Processes whose CPU is the backend's.
    pids: Vec<u32>,
    /// Host-side interface: where guest TX frames are counted and guest RX frames injected.
    host_if: String,
    _procs: Vec<Proc>,
    _pmd: Option<Testpmd>,
}

/// Runs the scenario.
pub fn run(lab: &mut Lab) -> Result<()> {
    let plan = Plan {
        scenario: "vmless",
        test: "throughput",
        sizes: lab.opts.sizes.clone(),
        ndr_sizes: if lab.opts.no_ndr {
            vec![]
        } else {
            lab.opts.ndr_sizes.clone()
        },
    };
    for queues in lab.opts.queues.clone() {
        for backend in BACKENDS {
            if !lab.wants(backend) || sys::interrupted() {
                continue;
            }
            measure_backend(lab, backend, queues, &plan);
        }
    }
    Ok(())
}

/// Measures `backend` with `queues` queue pairs per `plan`; a setup failure becomes one failed
/// (or unavailable) record per planned measurement, so the table shows the gap.
pub fn measure_backend(lab: &mut Lab, backend: &str, queues: u32, plan: &Plan) {
    // Jumbo frames need a 9000-byte MTU everywhere, the others run at the default 1500: one
    // backend start per group.
    for (jumbo, mtu) in [(false, 1500u32), (true, 9000)] {
        let pick = |v: &[u32]| -> Vec<u32> {
            v.iter().copied().filter(|s| (*s > 1518) == jumbo).collect()
        };
        let group = Plan {
            scenario: plan.scenario,
            test: plan.test,
            sizes: pick(&plan.sizes),
            ndr_sizes: pick(&plan.ndr_sizes),
        };
        if group.sizes.is_empty() && group.ndr_sizes.is_empty() {
            continue;
        }
        if sys::interrupted() {
            return;
        }
        measure_group(lab, backend, queues, mtu, &group);
    }
}

fn measure_group(lab: &mut Lab, backend: &str, queues: u32, mtu: u32, plan: &Plan) {
    if backend.starts_with("kernel-floor") {
        if queues == 1 {
            measure_floor(lab, backend, mtu, plan);
        }
        return;
    }
    lab.begin();
    lab.status(format!(
        "{}: starting {backend} (queues={queues}, mtu={mtu})",
        plan.scenario
    ));
    if let Err(e) = run_backend(lab, backend, queues, mtu, plan) {
        let (status, msg) = match e.downcast_ref::<Unavailable>() {
            Some(u) => (Status::Unavailable, u.0.clone()),
            None => (Status::Failed, format!("{e:#}")),
        };
        for dir in ["guest-tx", "guest-rx"] {
            for &size in &plan.sizes {
                let mut r = base_record(plan, plan.test, backend, dir, size, queues);
                r.fail(status, msg.clone());
                lab.record(r);
            }
        }
        for &size in &plan.ndr_sizes {
            let mut r = base_record(plan, "ndr", backend, "guest-rx", size, queues);
            r.fail(status, msg.clone());
            lab.record(r);
        }
    }
}

/// Marks a backend that cannot run here (as opposed to one that broke).
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

fn base_record(
    plan: &Plan,
    test: &str,
    backend: &str,
    dir: &str,
    size: u32,
    queues: u32,
) -> Record {
    let mut r = Record::new(plan.scenario, test, backend, dir);
    r.frame_size = size;
    r.queues = queues;
    r
}

/// The floor `backend` stands for: how its writer reaches the kernel, and a description for
/// the record's commands.
fn floor_method(backend: &str) -> Option<(Method, &'static str)> {
    match backend {
        "kernel-floor-tap" => Some((Method::Writev, "one writev per frame into a tap")),
        "kernel-floor-tap-uring" => Some((
            Method::Uring,
            "writevs into a tap, 32 per io_uring submission",
        )),
        "kernel-floor-afpacket" => Some((
            Method::TxRing,
            "AF_PACKET TX ring on a veth, 32 slots per send, qdisc bypass",
        )),
        _ => None,
    }
}

/// A kernel floor (see [`crate::floor`]): a write loop pinned to the backend's core, frames
/// counted by the port's receiving side (the tap, or the veth's peer).
fn measure_floor(lab: &mut Lab, backend: &str, mtu: u32, plan: &Plan) {
    let Some((method, how)) = floor_method(backend) else {
        return;
    };
    lab.begin();
    lab.status(format!("{}: {backend} (mtu={mtu})", plan.scenario));
    let (port, counted) = match method {
        Method::TxRing => (VETH_A, VETH_B),
        Method::Writev | Method::Uring => (FLOOR_TAP, FLOOR_TAP),
    };
    let ns = match Netns::create(NS).and_then(|ns| {
        match method {
            // Offloads as vhost-pump's AF_PACKET backend gets them in this scenario.
            Method::TxRing => veth_pair(&ns, VETH_A, VETH_B, mtu, !veth_offloads_on())?,
            Method::Writev | Method::Uring => {
                ns.ip(&["tuntap", "add", FLOOR_TAP, "mode", "tap", "vnet_hdr"])?;
                ns.ip(&["link", "set", FLOOR_TAP, "mtu", &mtu.to_string(), "up"])?;
            }
        }
        Ok(ns)
    }) {
        Ok(ns) => ns,
        Err(e) => {
            for &size in &plan.sizes {
                let mut r = base_record(plan, plan.test, backend, "guest-tx", size, 1);
                r.fail(Status::Failed, format!("{e:#}"));
                lab.record(r);
            }
            return;
        }
    };
    let setup = sys::peek_cmds();
    let d = lab.duration(plan.scenario);
    let method_arg = format!("{method:?}")
        .to_lowercase()
        .replace("txring", "tx-ring");
    for &size in &plan.sizes {
        if sys::interrupted() {
            return;
        }
        let mut r = base_record(plan, plan.test, backend, "guest-tx", size, 1);
        r.duration_s = d.as_secs_f64();
        let res = (|| -> Result<()> {
            let exe = std::env::current_exe()?;
            let secs = (settle(d) + d + Duration::from_millis(500)).as_secs_f64();
            let argv = [
                "taskset".to_string(),
                "-c".into(),
                lab.cpus.backend.to_string(),
                exe.to_string_lossy().into_owned(),
                "floor-writer".into(),
                "--method".into(),
                method_arg.clone(),
                "--port".into(),
                port.into(),
                "--frame-len".into(),
                (size - 4).to_string(),
                "--secs".into(),
                format!("{secs:.3}"),
            ];
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            let mut p = Proc::spawn(
                backend,
                ns.cmd(&refs),
                &lab.log(&format!("vmless-{backend}-{size}")),
            )?;
            std::thread::sleep(settle(d));
            let c0 = ns.counters(counted)?;
            let u0 = Usage::now(&[p.pid()]);
            std::thread::sleep(d);
            let c1 = ns.counters(counted)?;
            let u = Usage::now(&[p.pid()]).since(&u0);
            let t = std::time::Instant::now();
            while p.exited().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let received = c1.rx_packets - c0.rx_packets;
            if received == 0 {
                bail!("no frame reached {counted}");
            }
            fill(lab, &mut r, received, received, u, size);
            Ok(())
        })();
        if let Err(e) = res {
            r.fail(Status::Failed, format!("{e:#}"));
        }
        let mut cmds = setup.clone();
        cmds.push(format!(
            "vhost-pump-perf floor-writer --method {method_arg} --port {port} --frame-len {} ({how}, pinned to the backend core)",
            size - 4
        ));
        r.commands = cmds;
        lab.record(r);
    }
}

/// `VHOST_PUMP_PERF_VETH_OFFLOADS=on` leaves the veth's offloads on for vhost-pump's AF_PACKET
/// backend (DPDK's af_packet PMD needs them off, so by default both get them off): with TSO
/// off the port does not offer HOST_TSO, and the 64 KiB TSO figure cannot be taken.
fn veth_offloads_on() -> bool {
    std::env::var("VHOST_PUMP_PERF_VETH_OFFLOADS").is_ok_and(|v| v == "on")
}

fn veth_pair(ns: &Netns, a: &str, b: &str, mtu: u32, offloads_off: bool) -> Result<()> {
    ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
    for i in [a, b] {
        ns.ip(&["link", "set", i, "mtu", &mtu.to_string(), "up"])?;
        if offloads_off {
            // DPDK's af_packet PMD needs the veth's checksum/TSO offloads off: it carries
            // no checksum or GSO metadata, so offloaded frames arrive with bad checksums.
            ns.exec(&[
                "ethtool", "-K", i, "rx", "off", "tx", "off", "tso", "off", "gso", "off", "gro",
                "off",
            ])?;
        }
    }
    Ok(())
}

fn start_backend(lab: &Lab, ns: &Netns, backend: &str, queues: u32, mtu: u32) -> Result<Running> {
    let sock = daemon::socket(lab, &format!("vmless-{backend}"));
    let cpu = lab.cpus.backend;
    match backend {
        "vhost-pump-tap" | "vhost-pump-afpacket" => {
            let (port, host_if) = if backend == "vhost-pump-tap" {
                (Port::Tap(TAP.into()), TAP.to_string())
            } else {
                veth_pair(ns, VETH_A, VETH_B, mtu, !veth_offloads_on())?;
                (Port::AfPacket(VETH_A.into()), VETH_B.to_string())
            };
            let o = DaemonOpts {
                port,
                socket: sock,
                queues,
                mtu: Some(mtu),
                cpu: Some(cpu),
                mac: None,
                name: format!("vmless-{backend}-q{queues}"),
            };
            let p = match daemon::start(lab, ns, &o) {
                Ok(p) => p,
                Err(StartError::Refused(m)) if backend == "vhost-pump-afpacket" => {
                    return Err(Unavailable(m).into())
                }
                Err(e) => bail!("{e}"),
            };
            if backend == "vhost-pump-tap" {
                ns.ip(&["link", "set", TAP, "up"])?;
            }
            Ok(Running {
                pids: vec![p.pid()],
                host_if,
                _procs: vec![p],
                _pmd: None,
            })
        }
        "dpdk-vhost-tap" | "dpdk-vhost-afpacket" => {
            let (port1, host_if) = if backend == "dpdk-vhost-tap" {
                (format!("net_tap0,iface={DPDK_TAP}"), DPDK_TAP.to_string())
            } else {
                veth_pair(ns, VETH_A, VETH_B, mtu, true)?;
                // As deep a ring as vhost-pump's (8192 slots; DPDK's default is 512), so ring
                // depth is not what differs. Frames must hold a whole jumbo frame (defaults:
                // 2048-byte frames).
                let ring = if mtu > 1500 {
                    ",framecnt=8192,blocksz=16384,framesz=10240"
                } else {
                    ",framecnt=8192"
                };
                (
                    format!("net_af_packet0,iface={VETH_A},qpairs={queues},qdisc_bypass=1{ring}"),
                    VETH_B.to_string(),
                )
            };
            let o = TestpmdOpts {
                name: format!("vpperf-be-{}", std::process::id()),
                lcores: lab.cpus.testpmd(cpu).0,
                main_lcore: lab.cpus.testpmd(cpu).1,
                vdevs: vec![
                    format!("net_vhost0,iface={},queues={queues}", sock.display()),
                    port1,
                ],
                app_args: vec![
                    "--forward-mode=io".into(),
                    "--nb-cores=1".into(),
                    format!("--rxq={queues}"),
                    format!("--txq={queues}"),
                    "--burst=32".into(),
                    // net_vhost cannot scatter: for jumbo frames, mbufs that hold a whole one.
                    if mtu > 1500 {
                        "--total-num-mbufs=32768".into()
                    } else {
                        "--total-num-mbufs=65536".into()
                    },
                    format!("--max-pkt-len={}", mtu + 18),
                    if mtu > 1500 {
                        "--mbuf-size=10368".into()
                    } else {
                        "--mbuf-size=2176".into()
                    },
                    "--no-lsc-interrupt".into(),
                ],
                log: lab.log(&format!("vmless-{backend}-q{queues}-testpmd")),
                mem_mib: 1024,
            };
            let mut pmd = Testpmd::start(ns, &o)?;
            // testpmd stays up when a port fails to start: look at what it said.
            let said = std::fs::read_to_string(&o.log).unwrap_or_default();
            if let Some(l) = said.lines().find(|l| l.contains("> device max frame size")) {
                return Err(Unavailable(format!("DPDK {backend}: {}", l.trim())).into());
            }
            if let Some(l) = said.lines().find(|l| l.contains("Fail to configure port")) {
                bail!("DPDK {backend}: {}", l.trim());
            }
            pmd.start_fwd()?;
            if backend == "dpdk-vhost-tap" {
                ns.ip(&["link", "set", DPDK_TAP, "mtu", &mtu.to_string(), "up"])?;
            }
            if !sock.exists() {
                bail!("DPDK vhost did not create {}", sock.display());
            }
            Ok(Running {
                pids: vec![pmd.pid()],
                host_if,
                _procs: vec![],
                _pmd: Some(pmd),
            })
        }
        _ => bail!("unknown backend {backend}"),
    }
}

/// testpmd options for frames larger than one mbuf: scattered RX, multi-segment TX.
fn jumbo_args(mtu: u32) -> Vec<String> {
    if mtu > 1500 {
        vec!["--enable-scatter".into(), "--tx-offloads=0x8000".into()]
    } else {
        vec![]
    }
}

fn start_frontend(lab: &Lab, ns: &Netns, backend: &str, queues: u32, mtu: u32) -> Result<Testpmd> {
    let sock = daemon::socket(lab, &format!("vmless-{backend}"));
    let o = TestpmdOpts {
        name: format!("vpperf-fe-{}", std::process::id()),
        lcores: lab.cpus.testpmd(lab.cpus.frontend).0,
        main_lcore: lab.cpus.testpmd(lab.cpus.frontend).1,
        vdevs: vec![format!(
            "net_virtio_user0,path={},queues={queues},queue_size=1024,mrg_rxbuf=1,in_order=1",
            sock.display()
        )],
        app_args: vec![
            "--forward-mode=rxonly".into(),
            "--nb-cores=1".into(),
            format!("--rxq={queues}"),
            format!("--txq={queues}"),
            "--burst=32".into(),
            "--total-num-mbufs=65536".into(),
            format!("--max-pkt-len={}", mtu + 18),
            "--mbuf-size=2176".into(),
            "--no-lsc-interrupt".into(),
        ]
        .into_iter()
        .chain(jumbo_args(mtu))
        .collect(),
        log: lab.log(&format!("vmless-{backend}-q{queues}-frontend")),
        mem_mib: 1024,
    };
    let mut fe = Testpmd::start(ns, &o)?;
    fe.wait_link_up(1, Duration::from_secs(15))
        .context("frontend link")?;
    Ok(fe)
}

fn run_backend(lab: &mut Lab, backend: &str, queues: u32, mtu: u32, plan: &Plan) -> Result<()> {
    let ns = Netns::create(NS)?;
    let be = start_backend(lab, &ns, backend, queues, mtu)?;
    let mut fe = start_frontend(lab, &ns, backend, queues, mtu)?;
    let setup = sys::peek_cmds();
    let d = lab.duration(plan.scenario);

    for &size in &plan.sizes {
        if sys::interrupted() {
            return Ok(());
        }
        lab.status(format!(
            "{} {backend} guest-tx {size}B q={queues}",
            plan.scenario
        ));
        let mut r = base_record(plan, plan.test, backend, "guest-tx", size, queues);
        r.duration_s = d.as_secs_f64();
        let mut cmds = setup.clone();
        cmds.push(format!(
            "testpmd> set txpkts {}; set fwd txonly; start  # frame {size} B incl. FCS",
            testpmd::txpkts(size as usize - 4)
        ));
        if let Err(e) = guest_tx(lab, &ns, &be, &mut fe, size, d, &mut r) {
            r.fail(Status::Failed, format!("{e:#}"));
            let _ = fe.stop_fwd();
        }
        r.commands = cmds;
        lab.record(r);
    }
    for &size in &plan.sizes {
        if sys::interrupted() {
            return Ok(());
        }
        lab.status(format!(
            "{} {backend} guest-rx {size}B q={queues}",
            plan.scenario
        ));
        let mut r = base_record(plan, plan.test, backend, "guest-rx", size, queues);
        r.duration_s = d.as_secs_f64();
        let mut cmds = setup.clone();
        cmds.push("testpmd> set fwd rxonly; start".into());
        let gen = gen_config(lab, &ns, &be, size, None);
        cmds.push(gen.describe());
        let res = guest_rx(lab, &be, &mut fe, &gen, d, &mut r);
        if let Err(e) = res {
            r.fail(Status::Failed, format!("{e:#}"));
            let _ = fe.stop_fwd();
        }
        r.commands = cmds;
        lab.record(r);
    }
    {
        for &size in &plan.ndr_sizes {
            if sys::interrupted() {
                return Ok(());
            }
            lab.status(format!(
                "{} {backend} NDR guest-rx {size}B q={queues}",
                plan.scenario
            ));
            let mut r = base_record(plan, "ndr", backend, "guest-rx", size, queues);
            let mut cmds = setup.clone();
            cmds.push("testpmd> set fwd rxonly; start".into());
            cmds.push(gen_config(lab, &ns, &be, size, Some(0.0)).describe());
            if let Err(e) = ndr(lab, &ns, &be, &mut fe, size, &mut r) {
                r.fail(Status::Failed, format!("{e:#}"));
                let _ = fe.stop_fwd();
            }
            r.commands = cmds;
            lab.record(r);
        }
    }
    fe.quit();
    // 64 KiB TSO frames guest → host: a raw frontend on the same socket (testpmd has gone).
    if backend.starts_with("vhost-pump")
        && plan.test == "throughput"
        && mtu <= 1500
        && !plan.sizes.is_empty()
        && !sys::interrupted()
    {
        lab.status(format!("{} {backend} guest-tx 64 KiB TSO", plan.scenario));
        let mut r = gso_record(
            plan,
            backend,
            "guest-tx",
            queues,
            d,
            &setup,
            "raw vhost-user frontend (CSUM+HOST_TSO4) keeping 256 TCP/IPv4 TSO frames of 65014 B \
             in flight; bytes counted by the host interface"
                .to_string(),
        );
        let sock = daemon::socket(lab, &format!("vmless-{backend}"));
        let res = crate::gso::send_to_host(&sock, || {
            let c0 = ns.counters(&be.host_if)?;
            let u0 = Usage::now(&be.pids);
            std::thread::sleep(d);
            let c1 = ns.counters(&be.host_if)?;
            let u = Usage::now(&be.pids).since(&u0);
            let gbps = (c1.rx_bytes - c0.rx_bytes) as f64 * 8.0 / u.wall_s / 1e9;
            if c1.rx_packets == c0.rx_packets {
                bail!("no TSO frame reached {}", be.host_if);
            }
            r.metric("gbps", gbps);
            r.metric("backend_cpu_pct", u.cpu_pct);
            if u.cpu_pct > 0.0 {
                r.metric("gbps_per_core", gbps / (u.cpu_pct / 100.0));
            }
            // Frames as the host counted them: one per GSO frame, or per segment after GRO.
            r.metric(
                "host_frames_per_s",
                (c1.rx_packets - c0.rx_packets) as f64 / u.wall_s,
            );
            Ok(())
        });
        if let Err(e) = res {
            gso_failed(&mut r, &e);
        }
        lab.record(r);

        // 64 KiB TSO frames host → guest: injected into the host interface's far side.
        lab.status(format!("{} {backend} guest-rx 64 KiB TSO", plan.scenario));
        let host = crate::gso::HostSide {
            netns: std::path::Path::new("/run/netns").join(ns.name()),
            ifname: be.host_if.clone(),
            cpu: Some(lab.cpus.generator),
        };
        let mut r = gso_record(
            plan,
            backend,
            "guest-rx",
            queues,
            d,
            &setup,
            format!(
                "AF_PACKET sender (PACKET_VNET_HDR) on {} in {}, pinned to CPU {}: \
                 TCP/IPv4 TSO frames of 65014 B as fast as it can; raw vhost-user frontend \
                 (GUEST_CSUM+GUEST_TSO4, 256 buffers of 66 KiB) counting what the guest got",
                host.ifname,
                host.netns.display(),
                lab.cpus.generator
            ),
        );
        let res = crate::gso::receive_from_host(&sock, &host, d, |d| {
            let u0 = Usage::now(&be.pids);
            std::thread::sleep(d);
            let u = Usage::now(&be.pids).since(&u0);
            r.metric("backend_cpu_pct", u.cpu_pct);
            Ok(())
        });
        match res {
            Ok(g) if g.frames > 0 => {
                let gbps = g.bytes as f64 * 8.0 / g.secs / 1e9;
                r.metric("gbps", gbps);
                let cpu = r.metrics.get("backend_cpu_pct").copied().unwrap_or(0.0);
                if cpu > 0.0 {
                    r.metric("gbps_per_core", gbps / (cpu / 100.0));
                }
                r.metric("guest_frames_per_s", g.frames as f64 / g.secs);
            }
            Ok(_) => {
                r.fail(Status::Failed, "no frame reached the guest");
            }
            Err(e) => gso_failed(&mut r, &e),
        }
        lab.record(r);
    }
    drop(be);
    drop(ns);
    Ok(())
}

/// A 64 KiB TSO record of `backend` in direction `dir`: the scenario's setup commands, then
/// `how` the frames were sent.
fn gso_record(
    plan: &Plan,
    backend: &str,
    dir: &str,
    queues: u32,
    d: Duration,
    setup: &[String],
    how: String,
) -> Record {
    let mut r = base_record(
        plan,
        "gso",
        backend,
        dir,
        crate::gso::FRAME_LEN as u32,
        queues,
    );
    r.duration_s = d.as_secs_f64();
    r.commands = setup.to_vec();
    r.commands.push(how);
    r
}

/// Records why a TSO figure could not be taken: a port that does not offer the offloads (an
/// AF_PACKET port on a veth with TSO off, as DPDK's PMD needs it) is unavailable, not broken.
fn gso_failed(r: &mut Record, e: &anyhow::Error) {
    let msg = format!("{e:#}");
    if msg.contains("features") && msg.contains("lack") {
        r.fail(
            Status::Unavailable,
            format!(
                "the port does not offer TSO here ({msg}); for AF_PACKET on the lab's veth, \
                 run with VHOST_PUMP_PERF_VETH_OFFLOADS=on"
            ),
        );
    } else {
        r.fail(Status::Failed, msg);
    }
}

fn gen_config(lab: &Lab, ns: &Netns, be: &Running, size: u32, rate: Option<f64>) -> GenConfig {
    GenConfig {
        ifname: be.host_if.clone(),
        netns: std::path::Path::new("/run/netns").join(ns.name()),
        frame_len: size as usize - 4,
        rate_pps: rate,
        flows: 16,
        cpu: Some(lab.cpus.generator),
    }
}

fn settle(d: Duration) -> Duration {
    (d / 3).clamp(Duration::from_millis(300), Duration::from_secs(1))
}

/// Fills throughput, CPU and cycles metrics from a window.
fn fill(lab: &Lab, r: &mut Record, packets: u64, offered: u64, u: sys::UsageDelta, size: u32) {
    let pps = packets as f64 / u.wall_s;
    r.metric("mpps", pps / 1e6);
    r.metric("gbps", pps * f64::from(size) * 8.0 / 1e9);
    r.metric("offered_mpps", offered as f64 / u.wall_s / 1e6);
    r.metric("backend_cpu_pct", u.cpu_pct);
    r.metric("backend_wakeups_per_s", u.wakeups_per_s);
    r.metric("machine_busy_pct", u.machine_busy_pct);
    if packets > 0 {
        r.metric(
            "cycles_per_packet",
            u.cpu_s * lab.machine.cpu_mhz * 1e6 / packets as f64,
        );
    }
    // Frames per busy core: what the backend would move if each of its busy cores were given
    // to it whole (the scaling figure: aggregate Mpps over the cores it kept busy).
    if u.cpu_pct > 0.0 {
        r.metric("mpps_per_core", pps / 1e6 / (u.cpu_pct / 100.0));
    }
}

fn guest_tx(
    lab: &Lab,
    ns: &Netns,
    be: &Running,
    fe: &mut Testpmd,
    size: u32,
    d: Duration,
    r: &mut Record,
) -> Result<()> {
    let t = Duration::from_secs(10);
    fe.command(
        &format!("set txpkts {}", testpmd::txpkts(size as usize - 4)),
        t,
    )?;
    fe.command("set fwd txonly", t)?;
    let c_start = ns.counters(&be.host_if)?;
    let s_start = fe.port_stats(0)?;
    fe.start_fwd()?;
    std::thread::sleep(settle(d));
    let c0 = ns.counters(&be.host_if)?;
    let s0 = fe.port_stats(0)?;
    let u0 = Usage::now(&be.pids);
    std::thread::sleep(d);
    let c1 = ns.counters(&be.host_if)?;
    let u1 = Usage::now(&be.pids);
    let s1 = fe.port_stats(0)?;
    fe.stop_fwd()?;
    std::thread::sleep(Duration::from_millis(300));
    let c_end: IfCounters = ns.counters(&be.host_if)?;
    let s_end = fe.port_stats(0)?;
    let u = u1.since(&u0);
    let received = c1.rx_packets - c0.rx_packets;
    fill(lab, r, received, s1.tx_packets - s0.tx_packets, u, size);
    let sent_total = s_end.tx_packets - s_start.tx_packets;
    let recv_total = c_end.rx_packets - c_start.rx_packets;
    r.metric("sent", sent_total as f64);
    r.metric("received", recv_total as f64);
    r.metric("loss_pct", loss_pct(sent_total, recv_total));
    if received == 0 {
        bail!("no frames reached the host port {}", be.host_if);
    }
    Ok(())
}

fn loss_pct(sent: u64, received: u64) -> f64 {
    if sent == 0 {
        return 0.0;
    }
    100.0 * sent.saturating_sub(received) as f64 / sent as f64
}

fn guest_rx(
    _lab: &Lab,
    be: &Running,
    fe: &mut Testpmd,
    gen: &GenConfig,
    d: Duration,
    r: &mut Record,
) -> Result<()> {
    let t = Duration::from_secs(10);
    fe.command("set fwd rxonly", t)?;
    fe.start_fwd()?;
    let s_start = fe.port_stats(0)?;
    let g = Generator::start(gen.clone())?;
    std::thread::sleep(settle(d));
    let g0 = g.sent();
    let s0 = fe.port_stats(0)?;
    let u0 = Usage::now(&be.pids);
    std::thread::sleep(d);
    let g1 = g.sent();
    let u1 = Usage::now(&be.pids);
    let s1 = fe.port_stats(0)?;
    let errors = g.errors();
    let sent_total = g.stop();
    std::thread::sleep(Duration::from_millis(300));
    let s_end = fe.port_stats(0)?;
    fe.stop_fwd()?;
    let u = u1.since(&u0);
    let received = s1.rx_packets - s0.rx_packets;
    fill(_lab, r, received, g1 - g0, u, gen.frame_len as u32 + 4);
    let recv_total = s_end.rx_packets - s_start.rx_packets;
    r.metric("sent", sent_total as f64);
    r.metric("received", recv_total as f64);
    r.metric("generator_errors", errors as f64);
    r.metric("loss_pct", loss_pct(sent_total, recv_total));
    if received == 0 {
        bail!("the frontend received nothing from {}", be.host_if);
    }
    Ok(())
}

/// One NDR trial at `rate` pps: `(sent, received, backend usage)`.
fn trial(
    be: &Running,
    fe: &mut Testpmd,
    gen: &GenConfig,
    rate: f64,
    len: Duration,
) -> Result<(u64, u64, sys::UsageDelta)> {
    let mut g = gen.clone();
    g.rate_pps = Some(rate);
    let s0 = fe.port_stats(0)?;
    let u0 = Usage::now(&be.pids);
    let gen = Generator::start(g)?;
    std::thread::sleep(len);
    let sent = gen.stop();
    let u1 = Usage::now(&be.pids);
    std::thread::sleep(Duration::from_millis(200));
    let s1 = fe.port_stats(0)?;
    Ok((sent, s1.rx_packets - s0.rx_packets, u1.since(&u0)))
}

fn ndr(
    lab: &Lab,
    ns: &Netns,
    be: &Running,
    fe: &mut Testpmd,
    size: u32,
    r: &mut Record,
) -> Result<()> {
    let len = lab.opts.ndr_trial.unwrap_or(Duration::from_secs(1));
    r.duration_s = len.as_secs_f64();
    let t = Duration::from_secs(10);
    fe.command("set fwd rxonly", t)?;
    fe.start_fwd()?;
    let gen = gen_config(lab, ns, be, size, None);
    // The ceiling: what the generator offers at full speed for this size.
    let (sent, received, u_max) = {
        let s0 = fe.port_stats(0)?;
        let u0 = Usage::now(&be.pids);
        let g = Generator::start(gen.clone())?;
        std::thread::sleep(len);
        let sent = g.stop();
        let u1 = Usage::now(&be.pids);
        std::thread::sleep(Duration::from_millis(200));
        let s1 = fe.port_stats(0)?;
        (sent, s1.rx_packets - s0.rx_packets, u1.since(&u0))
    };
    let max_rate = sent as f64 / len.as_secs_f64();
    let mut trials = vec![serde_json::json!({
        "offered_pps": max_rate, "sent": sent, "received": received, "unlimited": true
    })];
    let (mut lo, mut hi) = (0.0f64, max_rate);
    let mut best: Option<(f64, sys::UsageDelta)> = None;
    if sent > 0 && received >= sent {
        // Lossless at the generator's full speed: the NDR is at least that (generator-bound).
        best = Some((max_rate, u_max));
    } else {
        for _ in 0..lab.opts.ndr_steps {
            if sys::interrupted() {
                break;
            }
            let rate = if best.is_none() && trials.len() == 1 {
                // Start at what was actually received at full speed.
                (received as f64 / len.as_secs_f64()).max(hi / 64.0)
            } else {
                (lo + hi) / 2.0
            };
            let (sent, recv, u) = trial(be, fe, &gen, rate, len)?;
            let ok = sent > 0 && recv >= sent;
            trials.push(serde_json::json!({
                "offered_pps": rate, "sent": sent, "received": recv, "zero_loss": ok,
                "backend_cpu_pct": u.cpu_pct
            }));
            if ok {
                lo = rate;
                best = Some((rate, u));
            } else {
                hi = rate;
            }
        }
    }
    fe.stop_fwd()?;
    r.extra = serde_json::json!({ "trials": trials, "generator_max_pps": max_rate });
    r.metric("generator_max_mpps", max_rate / 1e6);
    match best {
        Some((rate, u)) => {
            r.metric("ndr_mpps", rate / 1e6);
            r.metric("ndr_gbps", rate * f64::from(size) * 8.0 / 1e9);
            r.metric("mpps", rate / 1e6);
            r.metric("gbps", rate * f64::from(size) * 8.0 / 1e9);
            if u.wall_s > 0.0 {
                r.metric("backend_cpu_pct", u.cpu_pct);
                r.metric(
                    "cycles_per_packet",
                    u.cpu_s * lab.machine.cpu_mhz * 1e6 / (rate * u.wall_s),
                );
            }
        }
        None => {
            r.metric("ndr_mpps", 0.0);
            r.extra["note"] =
                serde_json::json!(format!("no zero-loss rate found down to {:.0} pps", hi));
        }
    }
    Ok(())
}
