//! Scenario `idle`: N attached but idle ports (N = 1, 8, 32 by default). For vhost-pump, N
//! daemons (one port each: a tap, or AF_PACKET on one end of a veth pair whose other end is
//! up) with one DPDK virtio-user frontend attached to all of them in `rxonly` mode; next to it DPDK's vhost PMD (`net_vhost` + `net_tap` per port, `io` mode).
//! Reports the backend's CPU% and wake-ups per second (voluntary + involuntary context
//! switches of all its threads) over the window, and its memory with the ports attached.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::daemon::{self, DaemonOpts, Port};
use crate::record::{Record, Status};
use crate::sys::{self, Netns, Proc, Usage};
use crate::testpmd::{Testpmd, TestpmdOpts};
use crate::{Lab, RunOpts};

/// Backends of this scenario.
pub const BACKENDS: [&str; 3] = ["vhost-pump-tap", "vhost-pump-afpacket", "dpdk-vhost-tap"];

/// DPDK's build limit on ports per process (Debian's 22.11: 32).
const MAX_ETHPORTS: u32 = 32;

/// Records this scenario will produce.
pub fn planned(opts: &RunOpts) -> u64 {
    let n = BACKENDS
        .iter()
        .filter(|b| opts.backends.is_empty() || opts.backends.iter().any(|x| x == *b))
        .count() as u64;
    n * opts.idle_ports.len() as u64
}

/// Runs the scenario.
pub fn run(lab: &mut Lab) -> Result<()> {
    for &n in &lab.opts.idle_ports.clone() {
        for backend in BACKENDS {
            if !lab.wants(backend) || sys::interrupted() {
                continue;
            }
            lab.begin();
            lab.status(format!("idle: {backend} with {n} ports"));
            let mut r = Record::new("idle", "idle", backend, "-");
            r.ports = n;
            r.duration_s = lab.duration("idle").as_secs_f64();
            if let Err(e) = run_one(lab, backend, n, &mut r) {
                let status = if e
                    .downcast_ref::<crate::scen_vmless::Unavailable>()
                    .is_some()
                {
                    Status::Unavailable
                } else {
                    Status::Failed
                };
                r.fail(status, format!("{e:#}"));
            }
            lab.record(r);
        }
    }
    Ok(())
}

fn frontend(lab: &Lab, ns: &Netns, n: u32) -> Result<Testpmd> {
    let vdevs = (0..n)
        .map(|i| {
            format!(
                "net_virtio_user{i},path={},queues=1,queue_size=256",
                daemon::socket(lab, &format!("idle{i}")).display()
            )
        })
        .collect();
    let o = TestpmdOpts {
        name: format!("vpperf-idle-fe-{}", std::process::id()),
        lcores: lab.cpus.testpmd(lab.cpus.frontend).0,
        main_lcore: lab.cpus.testpmd(lab.cpus.frontend).1,
        vdevs,
        app_args: vec![
            "--forward-mode=rxonly".into(),
            "--nb-cores=1".into(),
            "--rxd=256".into(),
            "--txd=256".into(),
            format!("--total-num-mbufs={}", 8192 + n * 1024),
            "--no-lsc-interrupt".into(),
        ],
        log: lab.log(&format!("idle-{n}-frontend")),
        mem_mib: 1024,
    };
    let mut fe = Testpmd::start(ns, &o)?;
    fe.wait_link_up(n as u16, Duration::from_secs(30))?;
    fe.start_fwd()?;
    Ok(fe)
}

fn run_one(lab: &mut Lab, backend: &str, n: u32, r: &mut Record) -> Result<()> {
    let ns = Netns::create("idle")?;
    let mut daemons: Vec<Proc> = Vec::new();
    let mut _pmd: Option<Testpmd> = None;
    let pids: Vec<u32> = match backend {
        "vhost-pump-tap" | "vhost-pump-afpacket" => {
            for i in 0..n {
                let port = if backend == "vhost-pump-tap" {
                    Port::Tap(format!("vpi{i}"))
                } else {
                    let (a, b) = (format!("vpia{i}"), format!("vpib{i}"));
                    ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
                    ns.ip(&["link", "set", &b, "up"])?;
                    Port::AfPacket(a)
                };
                let o = DaemonOpts {
                    port,
                    socket: daemon::socket(lab, &format!("idle{i}")),
                    queues: 1,
                    mtu: None,
                    cpu: None,
                    mac: None,
                    name: format!("idle-{n}-vhost-pump-{i}"),
                };
                daemons.push(daemon::start(lab, &ns, &o).map_err(|e| anyhow::anyhow!("{e}"))?);
            }
            daemons.iter().map(Proc::pid).collect()
        }
        "dpdk-vhost-tap" => {
            if 2 * n > MAX_ETHPORTS {
                return Err(crate::scen_vmless::Unavailable(format!(
                    "{n} ports need {} DPDK ports in one testpmd (net_vhost + net_tap each); this \
                     DPDK build allows {MAX_ETHPORTS}",
                    2 * n
                ))
                .into());
            }
            let mut vdevs = Vec::new();
            for i in 0..n {
                vdevs.push(format!(
                    "net_vhost{i},iface={},queues=1",
                    daemon::socket(lab, &format!("idle{i}")).display()
                ));
                vdevs.push(format!("net_tap{i},iface=vpdi{i}"));
            }
            let o = TestpmdOpts {
                name: format!("vpperf-idle-be-{}", std::process::id()),
                lcores: lab.cpus.testpmd(lab.cpus.backend).0,
                main_lcore: lab.cpus.testpmd(lab.cpus.backend).1,
                vdevs,
                app_args: vec![
                    "--forward-mode=io".into(),
                    "--nb-cores=1".into(),
                    "--rxd=256".into(),
                    "--txd=256".into(),
                    format!("--total-num-mbufs={}", 8192 + n * 2048),
                    "--no-lsc-interrupt".into(),
                ],
                log: lab.log(&format!("idle-{n}-dpdk-backend")),
                mem_mib: 1024,
            };
            let mut pmd = Testpmd::start(&ns, &o)?;
            pmd.start_fwd()?;
            for i in 0..n {
                let s = daemon::socket(lab, &format!("idle{i}"));
                if !s.exists() {
                    bail!("DPDK vhost did not create {}", s.display());
                }
            }
            let pid = pmd.pid();
            _pmd = Some(pmd);
            vec![pid]
        }
        _ => bail!("unknown backend {backend}"),
    };
    let fe = frontend(lab, &ns, n)?;
    // Let attachment work (and the taps' IPv6 autoconfiguration chatter) settle first.
    std::thread::sleep(Duration::from_secs(1));
    let d = lab.duration("idle");
    let u0 = Usage::now(&pids);
    std::thread::sleep(d);
    let u = Usage::now(&pids).since(&u0);
    let (mut rss, mut pss) = (0u64, 0u64);
    for &p in &pids {
        let (a, b) = sys::memory_kib(p).unwrap_or((0, 0));
        rss += a;
        pss += b;
    }
    r.metric("backend_cpu_pct", u.cpu_pct);
    r.metric("backend_cpu_pct_per_port", u.cpu_pct / f64::from(n));
    r.metric("wakeups_per_s", u.wakeups_per_s);
    r.metric("machine_busy_pct", u.machine_busy_pct);
    r.metric("wakeups_per_s_per_port", u.wakeups_per_s / f64::from(n));
    r.metric("rss_kib", rss as f64);
    r.metric("rss_kib_per_port", rss as f64 / f64::from(n));
    r.metric("pss_kib_per_port", pss as f64 / f64::from(n));
    r.metric("processes", pids.len() as f64);
    fe.quit();
    drop(_pmd);
    drop(daemons);
    drop(ns);
    Ok(())
}
