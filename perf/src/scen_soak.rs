//! Scenario `soak` (not in the quick suite): one vhost-pump process serving 8 ports (from a
//! `--config` file) under mixed-size host → guest traffic for 10 minutes (or `--duration`).
//! Each port's tap gets frames from the lab's rate-limited generator, with frame sizes rotated
//! between ports every minute; one DPDK virtio-user frontend (`rxonly`) drains all ports.
//!
//! Checks, reported as metrics: the daemon's RSS stays flat (first vs last sample, max), and
//! every frame is accounted for: frames the taps passed to the daemon = frames received by the
//! frontend + drops the daemon counted (`vhost-pump ctl stats`) + frames the frontend missed.
//! Frames the generator offered but the taps' own queues dropped (the daemon fell behind) are
//! reported too, as `tap_drops`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::gen::{GenConfig, Generator};
use crate::record::{Record, Status};
use crate::sys::{self, Netns, Proc};
use crate::testpmd::{Testpmd, TestpmdOpts};
use crate::Lab;

/// Ports in the soak.
const PORTS: usize = 8;
/// Frame sizes rotated over the ports (wire size without FCS).
const SIZES: [usize; 6] = [60, 124, 508, 1020, 1514, 252];
/// Offered rate per port.
const RATE_PPS: f64 = 5_000.0;
/// How often sizes rotate and RSS is sampled.
const PERIOD: Duration = Duration::from_secs(60);

/// Records this scenario produces.
pub fn planned() -> u64 {
    1
}

/// Runs the scenario.
pub fn run(lab: &mut Lab) -> Result<()> {
    lab.begin();
    let mut r = Record::new("soak", "soak", "vhost-pump-tap", "guest-rx");
    r.ports = PORTS as u32;
    let d = lab.opts.duration.unwrap_or(Duration::from_secs(600));
    r.duration_s = d.as_secs_f64();
    lab.status(format!("soak: {PORTS} ports for {d:?}"));
    if let Err(e) = run_inner(lab, d, &mut r) {
        r.fail(Status::Failed, format!("{e:#}"));
    }
    lab.record(r);
    Ok(())
}

fn tap(i: usize) -> String {
    format!("vps{i}")
}

fn ctl_drops(lab: &Lab, ns: &Netns, control: &std::path::Path) -> Result<u64> {
    let out = ns.exec(&[
        &lab.vhost_pump.to_string_lossy(),
        "ctl",
        "--control",
        &control.to_string_lossy(),
        "stats",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ctl stats output")?;
    let mut drops = 0;
    for port in v.as_array().into_iter().flatten() {
        for q in port["queues"].as_array().into_iter().flatten() {
            for dir in ["rx", "tx"] {
                if let Some(m) = q[dir]["drops"].as_object() {
                    drops += m.values().filter_map(|x| x.as_u64()).sum::<u64>();
                }
            }
        }
    }
    Ok(drops)
}

fn if_counter(ns: &Netns, ifname: &str, name: &str) -> u64 {
    ns.exec(&["cat", &format!("/sys/class/net/{ifname}/statistics/{name}")])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn run_inner(lab: &mut Lab, d: Duration, r: &mut Record) -> Result<()> {
    let ns = Netns::create("soak")?;
    let mut config = String::new();
    for i in 0..PORTS {
        let _ = writeln!(
            config,
            "[[port]]\nname = \"s{i}\"\nsocket = \"{}\"\nhost = {{ kind = \"tap\", name = \"{}\" }}\n",
            crate::daemon::socket(lab, &format!("soak{i}")).display(),
            tap(i)
        );
    }
    let cfg_path = lab.out.join("soak-ports.toml");
    std::fs::write(&cfg_path, config)?;
    let control = lab.sockdir.join("soak-control.sock");
    let argv = [
        lab.vhost_pump.to_string_lossy().into_owned(),
        "--config".into(),
        cfg_path.to_string_lossy().into_owned(),
        "--control".into(),
        control.to_string_lossy().into_owned(),
        "--log-level".into(),
        "warn".into(),
    ];
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut daemon = Proc::spawn("soak-vhost-pump", ns.cmd(&refs), &lab.log("soak-daemon"))?;
    sys::wait_for_path(&mut daemon, &control, Duration::from_secs(15))?;
    let pid = daemon.pid();

    let vdevs = (0..PORTS)
        .map(|i| {
            format!(
                "net_virtio_user{i},path={},queues=1,queue_size=256",
                crate::daemon::socket(lab, &format!("soak{i}")).display()
            )
        })
        .collect();
    let o = TestpmdOpts {
        name: format!("vpperf-soak-fe-{}", std::process::id()),
        lcores: lab.cpus.testpmd(lab.cpus.frontend).0,
        main_lcore: lab.cpus.testpmd(lab.cpus.frontend).1,
        vdevs,
        app_args: vec![
            "--forward-mode=rxonly".into(),
            "--nb-cores=1".into(),
            "--rxd=256".into(),
            "--txd=256".into(),
            "--total-num-mbufs=32768".into(),
            "--no-lsc-interrupt".into(),
        ],
        log: lab.log("soak-frontend"),
        mem_mib: 1024,
    };
    let mut fe = Testpmd::start(&ns, &o)?;
    fe.wait_link_up(PORTS as u16, Duration::from_secs(30))?;
    fe.start_fwd()?;
    std::thread::sleep(Duration::from_secs(1));

    let port_totals = |fe: &mut Testpmd| -> Result<(u64, u64)> {
        let mut rx = 0;
        let mut missed = 0;
        for p in 0..PORTS as u16 {
            let s = fe.port_stats(p)?;
            rx += s.rx_packets;
            missed += s.rx_missed;
        }
        Ok((rx, missed))
    };
    let (rx0, missed0) = port_totals(&mut fe)?;
    let tap_drops0: u64 = (0..PORTS)
        .map(|i| if_counter(&ns, &tap(i), "tx_dropped"))
        .sum();
    let tap_tx0: u64 = (0..PORTS)
        .map(|i| if_counter(&ns, &tap(i), "tx_packets"))
        .sum();
    let drops0 = ctl_drops(lab, &ns, &control)?;

    let mut rss = Vec::new();
    let mut sent = 0u64;
    let start = Instant::now();
    let mut round = 0usize;
    while start.elapsed() < d && !sys::interrupted() {
        let gens = (0..PORTS)
            .map(|i| {
                Generator::start(GenConfig {
                    ifname: tap(i),
                    netns: std::path::Path::new("/run/netns").join(ns.name()),
                    frame_len: SIZES[(i + round) % SIZES.len()],
                    rate_pps: Some(RATE_PPS),
                    flows: 16,
                    cpu: Some(lab.cpus.generator),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let left = d.saturating_sub(start.elapsed());
        std::thread::sleep(left.min(PERIOD));
        sent += gens.into_iter().map(Generator::stop).sum::<u64>();
        rss.push(sys::memory_kib(pid)?.0);
        lab.status(format!(
            "soak: {:?} of {d:?}, RSS {} KiB",
            start.elapsed().as_secs(),
            rss.last().copied().unwrap_or(0)
        ));
        round += 1;
    }
    // Let in-flight frames land before counting.
    std::thread::sleep(Duration::from_secs(1));
    let (rx1, missed1) = port_totals(&mut fe)?;
    let tap_drops: u64 = (0..PORTS)
        .map(|i| if_counter(&ns, &tap(i), "tx_dropped"))
        .sum::<u64>()
        - tap_drops0;
    let tap_tx: u64 = (0..PORTS)
        .map(|i| if_counter(&ns, &tap(i), "tx_packets"))
        .sum::<u64>()
        - tap_tx0;
    let daemon_drops = ctl_drops(lab, &ns, &control)? - drops0;
    let received = rx1 - rx0;
    let missed = missed1 - missed0;
    let accounted = received + daemon_drops + missed;
    if daemon.exited().is_some() {
        bail!("the daemon exited during the soak");
    }
    fe.quit();
    drop(daemon);

    r.metric("sent", sent as f64);
    r.metric("tap_tx_packets", tap_tx as f64);
    r.metric("received", received as f64);
    r.metric("daemon_drops", daemon_drops as f64);
    r.metric("tap_drops", tap_drops as f64);
    r.metric("frontend_missed", missed as f64);
    r.metric("unaccounted", tap_tx as f64 - accounted as f64);
    let first = rss.first().copied().unwrap_or(0);
    let last = rss.last().copied().unwrap_or(0);
    r.metric("rss_first_kib", first as f64);
    r.metric("rss_last_kib", last as f64);
    r.metric("rss_max_kib", rss.iter().copied().max().unwrap_or(0) as f64);
    r.metric("rss_growth_kib", last as f64 - first as f64);
    r.commands.push(format!(
        "{} (8 ports, mixed sizes {SIZES:?} at {RATE_PPS} pps each, rotated every {PERIOD:?})",
        refs.join(" ")
    ));
    if accounted != tap_tx {
        r.fail(
            Status::Failed,
            format!(
                "the taps passed {tap_tx} frames to the daemon but {accounted} are accounted for"
            ),
        );
    }
    Ok(())
}
