//! Scenario `scale`:
//! - memory: 1→64 ports, one vhost-pump daemon process per port (the daemon serves one port
//!   per process for now), each on its own tap, not attached: RSS and PSS per port.
//! - queues: queue pairs 1→nproc on the VM-less guest TX / guest RX path at 64 B (vhost-pump tap
//!   mode next to DPDK's vhost + tap), with the frontend's single forwarding core.

use std::time::Duration;

use anyhow::Result;

use crate::daemon::{self, DaemonOpts, Port};
use crate::record::{Record, Status};
use crate::scen_vmless::{self, Plan};
use crate::sys::{self, Netns, Proc};
use crate::{Lab, RunOpts};

/// Backends of the queue scaling part.
const QUEUE_BACKENDS: [&str; 2] = ["vhost-pump-tap", "dpdk-vhost-tap"];

fn wants(opts: &RunOpts, b: &str) -> bool {
    opts.backends.is_empty() || opts.backends.iter().any(|x| x == b)
}

/// The queue counts measured: 1..=nproc (at most 16, the daemon's limit).
fn queue_counts(nproc: usize) -> Vec<u32> {
    (1..=nproc.clamp(1, 16) as u32).collect()
}

/// Records this scenario will produce.
pub fn planned(opts: &RunOpts, nproc: usize) -> u64 {
    let mem = if wants(opts, "vhost-pump-tap") {
        opts.scale_ports.len() as u64
    } else {
        0
    };
    let b = QUEUE_BACKENDS.iter().filter(|b| wants(opts, b)).count() as u64;
    mem + b * queue_counts(nproc).len() as u64 * 2
}

/// Runs the scenario.
pub fn run(lab: &mut Lab) -> Result<()> {
    if lab.wants("vhost-pump-tap") {
        for &n in &lab.opts.scale_ports.clone() {
            if sys::interrupted() {
                return Ok(());
            }
            lab.begin();
            lab.status(format!("scale: memory of {n} ports"));
            let mut r = Record::new("scale", "memory", "vhost-pump-tap", "-");
            r.ports = n;
            if let Err(e) = memory(lab, n, &mut r) {
                r.fail(Status::Failed, format!("{e:#}"));
            }
            lab.record(r);
        }
    }
    let plan = Plan {
        scenario: "scale",
        test: "queues",
        sizes: vec![64],
        ndr_sizes: vec![],
    };
    for q in queue_counts(lab.machine.nproc) {
        for b in QUEUE_BACKENDS {
            if lab.wants(b) && !sys::interrupted() {
                scen_vmless::measure_backend(lab, b, q, &plan);
            }
        }
    }
    Ok(())
}

fn memory(lab: &mut Lab, n: u32, r: &mut Record) -> Result<()> {
    let ns = Netns::create("scale")?;
    let mut daemons: Vec<Proc> = Vec::new();
    for i in 0..n {
        let o = DaemonOpts {
            port: Port::Tap(format!("vps{i}")),
            socket: daemon::socket(lab, &format!("scale{i}")),
            queues: 1,
            mtu: None,
            cpu: None,
            mac: None,
            name: format!("scale-{n}-vhost-pump-{i}"),
        };
        daemons.push(daemon::start(lab, &ns, &o).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (mut rss, mut pss) = (0u64, 0u64);
    for d in &daemons {
        let (a, b) = sys::memory_kib(d.pid())?;
        rss += a;
        pss += b;
    }
    r.metric("rss_kib", rss as f64);
    r.metric("rss_kib_per_port", rss as f64 / f64::from(n));
    r.metric("pss_kib", pss as f64);
    r.metric("pss_kib_per_port", pss as f64 / f64::from(n));
    r.metric("processes", daemons.len() as f64);
    drop(daemons);
    drop(ns);
    Ok(())
}
