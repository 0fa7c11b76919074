//! Scenario `switch`: VM to VM through the backend, VM-less. Two `dpdk-testpmd` frontends
//! are the guests, each with one virtio-user port and a fixed MAC: the receiver first sends a
//! few frames (so a learning switch knows where it is), then counts in `rxonly`; the sender
//! runs `txonly` to the receiver's MAC. The figure is what the receiver counted per second.
//! Both frontends poll the same core (the frontend core), the backend has the other; so that
//! the receiver's turns on that core do not decide the figure, rings are 4096 entries deep (a
//! 1024-entry ring fills while the sender has the core, and every backend then drops alike).
//!
//! Backends, same run, same pinning:
//! - `vhost-pump-switch`: one daemon, both ports on its userspace switch (`[[switch]]`);
//! - `vhost-pump-bridge`: one daemon, two tap ports on a Linux bridge (the kernel path
//!   vhost-pump users have without the switch);
//! - `dpdk-vhost-io`: DPDK `testpmd` forwarding between two `net_vhost` ports (`io` mode,
//!   polling the backend core; it does not learn, it forwards port to port).
//!
//! Then, both guests still attached and quiet, the backend's idle CPU; then 64 KiB TSO
//! frames between two raw frontends on the same ports (see [`crate::gso`]), in Gbit/s.
//!
//! (testpmd's `flowgen` would send both ways from one process, but Debian 12's DPDK 22.11 sends
//! it from a fixed MAC on every port, which no learning switch can follow.)

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::record::{Record, Status};
use crate::sys::{self, Netns, Proc, Usage};
use crate::testpmd::{self, Testpmd, TestpmdOpts};
use crate::{daemon, gso, Lab, RunOpts};

/// The backends of this scenario.
pub const BACKENDS: [&str; 3] = ["vhost-pump-switch", "vhost-pump-bridge", "dpdk-vhost-io"];

const NS: &str = "switch";
const MACS: [&str; 2] = ["02:70:73:00:00:01", "02:70:73:00:00:02"];
const TAPS: [&str; 2] = ["vpsw0", "vpsw1"];
const BRIDGE: &str = "vpswbr";
/// Ring size of both guests.
const RING: u32 = 4096;

/// Records this scenario produces (one per size, an idle and a GSO figure, per backend).
pub fn planned(opts: &RunOpts) -> u64 {
    let backends = BACKENDS.iter().filter(|b| wants(opts, b)).count() as u64;
    backends * (sizes(opts).len() as u64 + 2)
}

fn wants(opts: &RunOpts, b: &str) -> bool {
    opts.backends.is_empty() || opts.backends.iter().any(|x| x == b)
}

fn sizes(opts: &RunOpts) -> Vec<u32> {
    opts.sizes.iter().copied().filter(|s| *s <= 1518).collect()
}

/// Runs the scenario.
pub fn run(lab: &mut Lab) -> Result<()> {
    for backend in BACKENDS {
        if !lab.wants(backend) || sys::interrupted() {
            continue;
        }
        lab.begin();
        lab.status(format!("switch: starting {backend}"));
        if let Err(e) = run_backend(lab, backend) {
            for size in sizes(&lab.opts) {
                let mut r = record(backend, size);
                r.fail(Status::Failed, format!("{e:#}"));
                lab.record(r);
            }
        }
    }
    Ok(())
}

fn record(backend: &str, size: u32) -> Record {
    let mut r = Record::new("switch", "vm-to-vm", backend, "a-to-b");
    r.frame_size = size;
    r.queues = 1;
    r
}

/// The backend: its processes (whose CPU counts) and what keeps it running.
struct Backend {
    pids: Vec<u32>,
    _proc: Option<Proc>,
    _pmd: Option<Testpmd>,
}

fn sockets(lab: &Lab) -> [std::path::PathBuf; 2] {
    [0, 1].map(|i| daemon::socket(lab, &format!("switch-{i}")))
}

fn start_backend(lab: &Lab, ns: &Netns, backend: &str) -> Result<Backend> {
    let socks = sockets(lab);
    for s in &socks {
        let _ = std::fs::remove_file(s);
    }
    if backend == "dpdk-vhost-io" {
        let (lcores, main) = lab.cpus.testpmd(lab.cpus.backend);
        let o = TestpmdOpts {
            name: format!("vpperf-swbe-{}", std::process::id()),
            lcores,
            main_lcore: main,
            vdevs: (0..2)
                .map(|i| format!("net_vhost{i},iface={},queues=1", socks[i].display()))
                .collect(),
            app_args: vec![
                "--forward-mode=io".into(),
                "--nb-cores=1".into(),
                "--burst=32".into(),
                "--total-num-mbufs=65536".into(),
                "--mbuf-size=2176".into(),
                "--no-lsc-interrupt".into(),
            ],
            log: lab.log("switch-dpdk-backend"),
            mem_mib: 1024,
        };
        let mut pmd = Testpmd::start(ns, &o)?;
        pmd.start_fwd()?;
        for s in &socks {
            if !s.exists() {
                bail!("DPDK vhost did not create {}", s.display());
            }
        }
        return Ok(Backend {
            pids: vec![pmd.pid()],
            _proc: None,
            _pmd: Some(pmd),
        });
    }
    let mut conf = String::new();
    if backend == "vhost-pump-switch" {
        conf += "[[switch]]\nname = \"sw0\"\nflood_pps = 0\n\n";
    }
    for i in 0..2 {
        let host = if backend == "vhost-pump-switch" {
            "{ kind = \"switch\", name = \"sw0\" }".to_string()
        } else {
            format!("{{ kind = \"tap\", name = \"{}\" }}", TAPS[i])
        };
        conf += &format!(
            "[[port]]\nname = \"p{i}\"\nsocket = \"{}\"\nhost = {host}\nmac = \"{}\"\n\
             queue_size = {RING}\n\n",
            socks[i].display(),
            MACS[i]
        );
    }
    let path = lab.out.join(format!("{backend}.toml"));
    std::fs::write(&path, &conf)?;
    let mut argv = vec![
        "taskset".to_string(),
        "-c".into(),
        lab.cpus.backend.to_string(),
        lab.vhost_pump.to_string_lossy().into_owned(),
        "--config".into(),
        path.to_string_lossy().into_owned(),
        "--log-level".into(),
        "warn".into(),
    ];
    argv.extend(lab.opts.daemon_args.iter().cloned());
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut p = Proc::spawn(backend, ns.cmd(&refs), &lab.log(backend))?;
    for s in &socks {
        sys::wait_for_path(&mut p, s, Duration::from_secs(15))?;
    }
    if backend == "vhost-pump-bridge" {
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        for t in TAPS {
            ns.ip(&["link", "set", t, "master", BRIDGE, "up"])?;
        }
        ns.ip(&["link", "set", BRIDGE, "up"])?;
    }
    Ok(Backend {
        pids: vec![p.pid()],
        _proc: Some(p),
        _pmd: None,
    })
}

/// Frontend `i` (0: the sender, 1: the receiver), sending to the other's MAC when it sends.
fn start_frontend(lab: &Lab, ns: &Netns, i: usize) -> Result<Testpmd> {
    let (lcores, main) = lab.cpus.testpmd(lab.cpus.frontend);
    let o = TestpmdOpts {
        name: format!("vpperf-sw{i}-{}", std::process::id()),
        lcores,
        main_lcore: main,
        vdevs: vec![format!(
            "net_virtio_user0,path={},queues=1,queue_size={RING},mrg_rxbuf=1,in_order=1,mac={}",
            sockets(lab)[i].display(),
            MACS[i]
        )],
        app_args: vec![
            "--forward-mode=rxonly".into(),
            "--nb-cores=1".into(),
            format!("--rxd={RING}"),
            "--burst=32".into(),
            "--total-num-mbufs=65536".into(),
            "--mbuf-size=2176".into(),
            "--no-lsc-interrupt".into(),
            format!("--eth-peer=0,{}", MACS[1 - i]),
        ],
        log: lab.log(&format!("switch-frontend-{i}")),
        mem_mib: 1024,
    };
    let mut fe = Testpmd::start(ns, &o)?;
    fe.wait_link_up(1, Duration::from_secs(15))
        .context("frontend link")?;
    Ok(fe)
}

fn run_backend(lab: &mut Lab, backend: &str) -> Result<()> {
    let ns = Netns::create(NS)?;
    let be = start_backend(lab, &ns, backend)?;
    let mut tx = start_frontend(lab, &ns, 0)?;
    let mut rx = start_frontend(lab, &ns, 1)?;
    let t = Duration::from_secs(10);
    // The receiver announces itself (a learning switch, a bridge), then only counts.
    rx.command("set fwd txonly", t)?;
    rx.start_fwd()?;
    std::thread::sleep(Duration::from_millis(100));
    rx.stop_fwd()?;
    rx.command("set fwd rxonly", t)?;
    rx.start_fwd()?;
    tx.command("set fwd txonly", t)?;
    let setup = sys::peek_cmds();
    let d = lab.duration("vmless");
    for size in sizes(&lab.opts) {
        if sys::interrupted() {
            break;
        }
        lab.status(format!("switch {backend} {size}B"));
        let mut r = record(backend, size);
        r.duration_s = d.as_secs_f64();
        let mut cmds = setup.clone();
        cmds.push(format!(
            "sender testpmd> set txpkts {}; set fwd txonly; start  # {size} B incl. FCS; \
             receiver testpmd> set fwd rxonly; start",
            testpmd::txpkts(size as usize - 4)
        ));
        let res = (|| -> Result<()> {
            tx.command(
                &format!("set txpkts {}", testpmd::txpkts(size as usize - 4)),
                t,
            )?;
            tx.start_fwd()?;
            std::thread::sleep((d / 3).clamp(Duration::from_millis(300), Duration::from_secs(1)));
            let (rx0, tx0) = (rx.port_stats(0)?.rx_packets, tx.port_stats(0)?.tx_packets);
            let u0 = Usage::now(&be.pids);
            std::thread::sleep(d);
            let (rx1, tx1) = (rx.port_stats(0)?.rx_packets, tx.port_stats(0)?.tx_packets);
            let u = Usage::now(&be.pids).since(&u0);
            tx.stop_fwd()?;
            if rx1 == rx0 {
                bail!("no frame crossed the backend");
            }
            let pps = (rx1 - rx0) as f64 / u.wall_s;
            r.metric("mpps", pps / 1e6);
            r.metric("gbps", pps * f64::from(size) * 8.0 / 1e9);
            r.metric("offered_mpps", (tx1 - tx0) as f64 / u.wall_s / 1e6);
            r.metric("backend_cpu_pct", u.cpu_pct);
            r.metric("backend_wakeups_per_s", u.wakeups_per_s);
            Ok(())
        })();
        if let Err(e) = res {
            r.fail(Status::Failed, format!("{e:#}"));
            let _ = tx.stop_fwd();
        }
        r.commands = cmds;
        lab.record(r);
    }
    // Idle: both guests attached, nothing sent.
    if !sys::interrupted() {
        lab.status(format!("switch {backend} idle"));
        let mut r = Record::new("switch", "idle", backend, "-");
        r.queues = 1;
        r.duration_s = d.as_secs_f64();
        std::thread::sleep(Duration::from_millis(300));
        let u0 = Usage::now(&be.pids);
        std::thread::sleep(d);
        let u = Usage::now(&be.pids).since(&u0);
        r.metric("backend_cpu_pct", u.cpu_pct);
        r.metric("backend_wakeups_per_s", u.wakeups_per_s);
        r.commands = setup.clone();
        lab.record(r);
    }
    tx.quit();
    rx.quit();
    // 64 KiB TSO frames, raw frontends on the same ports (testpmd has gone).
    if !sys::interrupted() {
        lab.status(format!("switch {backend} 64 KiB TSO"));
        let mut r = Record::new("switch", "gso", backend, "a-to-b");
        r.frame_size = gso::FRAME_LEN as u32;
        r.queues = 1;
        r.duration_s = d.as_secs_f64();
        let mut cmds = setup.clone();
        cmds.push(
            "raw vhost-user frontends: sender CSUM+HOST_TSO4 keeps 256 TSO frames of 65014 B \
             in flight; receiver GUEST_CSUM+GUEST_TSO4, 66 KiB buffers"
                .into(),
        );
        r.commands = cmds;
        if backend == "dpdk-vhost-io" {
            let _ = r.fail(
                Status::Unavailable,
                "not measured: the net_vhost ports here have 2 KiB mbufs and no TSO offload \
                 (tso=0), so a 64 KiB TSO frame cannot cross testpmd's io forwarding whole",
            );
        } else {
            let socks = sockets(lab);
            let mac = |m: &str| -> [u8; 6] {
                let mut b = [0u8; 6];
                for (i, p) in m.split(':').enumerate() {
                    b[i] = u8::from_str_radix(p, 16).unwrap_or(0);
                }
                b
            };
            let pids = be.pids.clone();
            let mut usage = None;
            let res = gso::measure(&socks[0], &socks[1], mac(MACS[0]), mac(MACS[1]), d, |d| {
                let u0 = Usage::now(&pids);
                std::thread::sleep(d);
                usage = Some(Usage::now(&pids).since(&u0));
                Ok(())
            });
            match (res, usage) {
                (Ok(g), Some(u)) if g.frames > 0 => {
                    let gbps = g.bytes as f64 * 8.0 / g.secs / 1e9;
                    r.metric("gbps", gbps);
                    r.metric("mpps", g.frames as f64 / g.secs / 1e6);
                    r.metric("backend_cpu_pct", u.cpu_pct);
                    if u.cpu_pct > 0.0 {
                        r.metric("gbps_per_core", gbps / (u.cpu_pct / 100.0));
                    }
                }
                (Ok(_), _) => {
                    r.fail(Status::Failed, "no TSO frame crossed the backend");
                }
                (Err(e), _) => {
                    r.fail(Status::Failed, format!("{e:#}"));
                }
            }
        }
        lab.record(r);
    }
    drop(be);
    drop(ns);
    Ok(())
}
