//! Scenario `switch`: VM-to-VM through the backend, VM-less. One `dpdk-testpmd` is both
//! "guests": two virtio-user ports (fixed MACs) in `flowgen` (sending and counting what arrives), each sending to the other's MAC
//! (`--eth-peer`), so frames cross the backend both ways at once; the figure is the sum of what
//! the two ports received per second.
//!
//! Backends, same run, same pinning:
//! - `vhost-pump-switch`: one daemon, both ports on its userspace switch (`[[switch]]`);
//! - `vhost-pump-bridge`: two tap ports of one daemon on a Linux bridge (the kernel path
//!   vhost-pump users have without the switch).
//!
//! DPDK `testpmd` forwarding between two `net_vhost` ports is not measured yet.
//!
//! Known limit: Debian 12's testpmd (DPDK 22.11) `flowgen` was seen sending from one MAC on
//! both ports, so the switch never learns the peers and floods every frame (the bridge path is
//! hurt the same way); until the frontend sends from each port's own MAC, these figures are a
//! flooding worst case, not the learned-unicast rate.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::record::{Record, Status};
use crate::sys::{self, Netns, Proc, Usage};
use crate::testpmd::{self, Testpmd, TestpmdOpts};
use crate::{daemon, Lab, RunOpts};

/// The backends of this scenario.
pub const BACKENDS: [&str; 2] = ["vhost-pump-switch", "vhost-pump-bridge"];

const NS: &str = "switch";
const MACS: [&str; 2] = ["02:70:73:00:00:01", "02:70:73:00:00:02"];
const TAPS: [&str; 2] = ["vpsw0", "vpsw1"];
const BRIDGE: &str = "vpswbr";

/// Records this scenario produces.
pub fn planned(opts: &RunOpts) -> u64 {
    let backends = BACKENDS.iter().filter(|b| wants(opts, b)).count() as u64;
    backends * sizes(opts).len() as u64
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
    let mut r = Record::new("switch", "vm-to-vm", backend, "both");
    r.frame_size = size;
    r.queues = 1;
    r
}

fn start_backend(lab: &Lab, ns: &Netns, backend: &str) -> Result<Proc> {
    let socks = [0, 1].map(|i| daemon::socket(lab, &format!("switch-{i}")));
    for s in &socks {
        let _ = std::fs::remove_file(s);
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
            "[[port]]\nname = \"p{i}\"\nsocket = \"{}\"\nhost = {host}\nmac = \"{}\"\n\n",
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
    Ok(p)
}

fn start_frontend(lab: &Lab, ns: &Netns) -> Result<Testpmd> {
    let vdevs = (0..2)
        .map(|i| {
            format!(
                "net_virtio_user{i},path={},queues=1,queue_size=1024,mrg_rxbuf=1,in_order=1,mac={}",
                daemon::socket(lab, &format!("switch-{i}")).display(),
                MACS[i]
            )
        })
        .collect();
    let o = TestpmdOpts {
        name: format!("vpperf-sw-{}", std::process::id()),
        lcores: lab.cpus.testpmd(lab.cpus.frontend).0,
        main_lcore: lab.cpus.testpmd(lab.cpus.frontend).1,
        vdevs,
        app_args: vec![
            "--forward-mode=flowgen".into(),
            "--nb-cores=1".into(),
            "--burst=32".into(),
            "--total-num-mbufs=65536".into(),
            "--mbuf-size=2176".into(),
            "--no-lsc-interrupt".into(),
            format!("--eth-peer=0,{}", MACS[1]),
            format!("--eth-peer=1,{}", MACS[0]),
        ],
        log: lab.log("switch-frontend"),
        mem_mib: 1024,
    };
    let mut fe = Testpmd::start(ns, &o)?;
    fe.wait_link_up(2, Duration::from_secs(15))
        .context("frontend links")?;
    Ok(fe)
}

fn run_backend(lab: &mut Lab, backend: &str) -> Result<()> {
    let ns = Netns::create(NS)?;
    let be = start_backend(lab, &ns, backend)?;
    let mut fe = start_frontend(lab, &ns)?;
    let setup = sys::peek_cmds();
    let d = lab.duration("vmless");
    let t = Duration::from_secs(10);
    for size in sizes(&lab.opts) {
        if sys::interrupted() {
            break;
        }
        lab.status(format!("switch {backend} {size}B"));
        let mut r = record(backend, size);
        r.duration_s = d.as_secs_f64();
        let mut cmds = setup.clone();
        cmds.push(format!(
            "testpmd> set txpkts {}; start  # both ports flowgen (send to each other, count and drop what arrives), {size} B incl. FCS",
            testpmd::txpkts(size as usize - 4)
        ));
        let res = (|| -> Result<()> {
            fe.command(
                &format!("set txpkts {}", testpmd::txpkts(size as usize - 4)),
                t,
            )?;
            fe.start_fwd()?;
            std::thread::sleep((d / 3).clamp(Duration::from_millis(300), Duration::from_secs(1)));
            let rx = |fe: &mut Testpmd| -> Result<(u64, u64)> {
                let (a, b) = (fe.port_stats(0)?, fe.port_stats(1)?);
                Ok((a.rx_packets + b.rx_packets, a.tx_packets + b.tx_packets))
            };
            let (rx0, tx0) = rx(&mut fe)?;
            let u0 = Usage::now(&[be.pid()]);
            std::thread::sleep(d);
            let (rx1, tx1) = rx(&mut fe)?;
            let u = Usage::now(&[be.pid()]).since(&u0);
            fe.stop_fwd()?;
            let pps = (rx1 - rx0) as f64 / u.wall_s;
            if rx1 == rx0 {
                bail!("no frame crossed the backend");
            }
            r.metric("mpps", pps / 1e6);
            r.metric("gbps", pps * f64::from(size) * 8.0 / 1e9);
            r.metric("offered_mpps", (tx1 - tx0) as f64 / u.wall_s / 1e6);
            r.metric("backend_cpu_pct", u.cpu_pct);
            r.metric("backend_wakeups_per_s", u.wakeups_per_s);
            Ok(())
        })();
        if let Err(e) = res {
            r.fail(Status::Failed, format!("{e:#}"));
            let _ = fe.stop_fwd();
        }
        r.commands = cmds;
        lab.record(r);
    }
    fe.quit();
    drop(be);
    drop(ns);
    Ok(())
}
