//! The report of a results directory: `results.md` (tables and headline ratios) and plots
//! (`*.svg`, and `*.png` when a TrueType font is available for the bitmap backend).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::record::{self, Record, Status};

/// File name of the Markdown report.
pub const TABLE: &str = "results.md";

/// Formats a figure with about three significant digits.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

fn cell(r: &Record, key: &str) -> String {
    match r.status {
        Status::Ok => r.get(key).map(fmt_num).unwrap_or_else(|| "–".into()),
        _ => "–".into(),
    }
}

/// The kernel floor a guest → host figure is measured against: the `writev` loop for a tap,
/// the TX ring for AF_PACKET, same frame size, same run.
fn floor_of<'a>(r: &Record, recs: &'a [Record]) -> Option<&'a Record> {
    if r.direction != "guest-tx" || r.backend.starts_with("kernel-floor") {
        return None;
    }
    let floor = if r.backend.ends_with("-tap") {
        "kernel-floor-tap"
    } else if r.backend.ends_with("-afpacket") {
        "kernel-floor-afpacket"
    } else {
        return None;
    };
    vmless_throughput(recs, floor, "guest-tx", r.frame_size)
}

/// `r`'s Mpps as a percentage of its kernel floor (see [`floor_of`]), or a dash.
fn of_floor(r: &Record, recs: &[Record]) -> String {
    match (
        r.status,
        r.get("mpps"),
        floor_of(r, recs).and_then(|f| f.get("mpps")),
    ) {
        (Status::Ok, Some(m), Some(f)) if f > 0.0 => format!("{:.0}", 100.0 * m / f),
        _ => "–".into(),
    }
}

fn status_cell(r: &Record) -> String {
    match r.status {
        Status::Ok => "ok".into(),
        Status::Unavailable => format!(
            "unavailable: {}",
            one_line(r.error.as_deref().unwrap_or(""))
        ),
        Status::Failed => format!("failed: {}", one_line(r.error.as_deref().unwrap_or(""))),
    }
}

fn one_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("").replace('|', "/");
    if l.chars().count() > 120 {
        l.chars().take(117).collect::<String>() + "..."
    } else {
        l
    }
}

fn table(out: &mut String, header: &[&str], rows: Vec<Vec<String>>) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "|{}|",
        header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out.push('\n');
}

/// Builds the Markdown report from records.
pub fn markdown(recs: &[Record]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# vhost-pump-perf results\n");
    if let Some(r) = recs.first() {
        let m = &r.machine;
        let _ = writeln!(
            o,
            "Machine: {} ({} CPUs, {} MiB, nominal {} MHz), kernel {}.",
            m.cpu_model, m.nproc, m.mem_mib, m.cpu_mhz, m.kernel
        );
        let versions: Vec<String> = m
            .versions
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(o, "Versions: {}.\n", versions.join("; "));
    }
    let _ = writeln!(
        o,
        "Frame sizes include the 4-byte FCS (a 64 B frame is 60 B on the tap); Gbit/s = frames × \
         size × 8. CPU% is of one core (100 = one core busy), from /proc/PID/stat; cycles/packet = \
         CPU seconds × nominal MHz ÷ frames. Only figures of the same run compare.\n"
    );

    let vm: Vec<&Record> = recs
        .iter()
        .filter(|r| r.scenario == "vmless" && r.test == "throughput")
        .collect();
    if !vm.is_empty() {
        let _ = writeln!(
            o,
            "## vmless: DPDK virtio-user frontend, no VM\n\nguest-tx: testpmd `txonly` → backend → \
             host port (counted by the kernel); guest-rx: AF_PACKET generator → host port → \
             backend → testpmd `rxonly`.\n"
        );
        let rows = vm
            .iter()
            .map(|r| {
                vec![
                    r.backend.clone(),
                    r.direction.clone(),
                    r.frame_size.to_string(),
                    r.queues.to_string(),
                    cell(r, "mpps"),
                    of_floor(r, recs),
                    cell(r, "gbps"),
                    cell(r, "offered_mpps"),
                    cell(r, "loss_pct"),
                    cell(r, "backend_cpu_pct"),
                    cell(r, "cycles_per_packet"),
                    cell(r, "machine_busy_pct"),
                    status_cell(r),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "backend",
                "direction",
                "frame B",
                "queues",
                "Mpps",
                "% of floor",
                "Gbit/s",
                "offered Mpps",
                "loss %",
                "backend CPU %",
                "cycles/pkt",
                "machine busy %",
                "status",
            ],
            rows,
        );
    }
    let gso: Vec<&Record> = recs
        .iter()
        .filter(|r| r.scenario == "vmless" && r.test == "gso")
        .collect();
    if !gso.is_empty() {
        let _ = writeln!(
            o,
            "### 64 KiB TSO frames (65014 B TCP/IPv4, gso_size 1448)\n\nguest-tx: a raw vhost-user \
             frontend keeps 256 TSO frames in flight, Gbit/s counted by the host interface; \
             guest-rx: an AF_PACKET sender with virtio-net headers injects them into the host \
             interface, Gbit/s of what the guest's RX ring got. Frames/s are as counted at the \
             receiving end (one per TSO frame when the path keeps it whole). DPDK's PMDs carry \
             no GSO metadata, so they have no such figure.\n"
        );
        let rows = gso
            .iter()
            .map(|r| {
                vec![
                    r.backend.clone(),
                    r.direction.clone(),
                    cell(r, "gbps"),
                    cell(r, "backend_cpu_pct"),
                    cell(r, "gbps_per_core"),
                    if r.direction == "guest-rx" {
                        cell(r, "guest_frames_per_s")
                    } else {
                        cell(r, "host_frames_per_s")
                    },
                    status_cell(r),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "backend",
                "direction",
                "Gbit/s",
                "backend CPU %",
                "Gbit/s per busy core",
                "frames/s",
                "status",
            ],
            rows,
        );
    }
    let ndr: Vec<&Record> = recs.iter().filter(|r| r.test == "ndr").collect();
    if !ndr.is_empty() {
        let _ = writeln!(
            o,
            "### NDR, guest-rx (highest offered rate with zero loss, binary search)\n\nguest-tx \
             has no NDR: testpmd's txonly cannot be rate-limited.\n"
        );
        let rows = ndr
            .iter()
            .map(|r| {
                vec![
                    r.backend.clone(),
                    r.frame_size.to_string(),
                    r.queues.to_string(),
                    cell(r, "ndr_mpps"),
                    cell(r, "ndr_gbps"),
                    cell(r, "backend_cpu_pct"),
                    cell(r, "cycles_per_packet"),
                    cell(r, "generator_max_mpps"),
                    status_cell(r),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "backend",
                "frame B",
                "queues",
                "NDR Mpps",
                "NDR Gbit/s",
                "CPU % at NDR",
                "cycles/pkt at NDR",
                "generator max Mpps",
                "status",
            ],
            rows,
        );
    }
    let tcp: Vec<&Record> = recs
        .iter()
        .filter(|r| r.scenario == "guest-tcp" && r.test == "tcp")
        .collect();
    if !tcp.is_empty() {
        let _ = writeln!(
            o,
            "## guest-tcp: QEMU guest (TCG), iperf3\n\nThe TCG vCPU is the bottleneck here: compare \
             CPU cost and latency more than Gbit/s. Host CPU = everything outside the guest's \
             vCPU: the daemon plus QEMU's non-vCPU threads (for QEMU's own tap and Kata, QEMU's \
             main loop does the tap I/O, but part of its virtio TX work runs in the vCPU thread; \
             Kata's tc redirect runs in kernel softirq context and is not accounted). Total = \
             host + vCPU.\n"
        );
        let rows = tcp
            .iter()
            .map(|r| {
                vec![
                    r.backend.clone(),
                    r.direction.clone(),
                    r.streams.to_string(),
                    cell(r, "gbps"),
                    cell(r, "backend_cpu_pct"),
                    cell(r, "qemu_io_cpu_pct"),
                    cell(r, "host_cpu_pct"),
                    cell(r, "qemu_vcpu_cpu_pct"),
                    cell(r, "host_cpu_pct_per_gbps"),
                    cell(r, "total_cpu_pct_per_gbps"),
                    cell(r, "tcp_retransmits"),
                    status_cell(r),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "path",
                "direction",
                "streams",
                "Gbit/s",
                "daemon or QEMU-tap CPU %",
                "QEMU I/O threads CPU %",
                "host CPU % (daemon + QEMU I/O)",
                "QEMU vCPU %",
                "host CPU % per Gbit/s",
                "total CPU % per Gbit/s",
                "retransmits",
                "status",
            ],
            rows,
        );
    }
    let ping: Vec<&Record> = recs
        .iter()
        .filter(|r| r.scenario == "guest-tcp" && r.test == "ping")
        .collect();
    if !ping.is_empty() {
        let _ = writeln!(o, "### guest-tcp: ICMP round trip host → guest\n");
        let rows = ping
            .iter()
            .map(|r| {
                vec![
                    r.backend.clone(),
                    cell(r, "pings"),
                    cell(r, "rtt_p50_us"),
                    cell(r, "rtt_p99_us"),
                    cell(r, "rtt_max_us"),
                    cell(r, "ping_loss_pct"),
                    status_cell(r),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "path", "pings", "p50 µs", "p99 µs", "max µs", "loss %", "status",
            ],
            rows,
        );
    }
    let idle: Vec<&Record> = recs.iter().filter(|r| r.scenario == "idle").collect();
    if !idle.is_empty() {
        let _ = writeln!(
            o,
            "## idle: attached but idle ports\n\nEach port has a DPDK virtio-user frontend \
             attached (`rxonly`, no traffic).\n"
        );
        let rows = idle
            .iter()
            .map(|r| {
                vec![
                    r.backend.clone(),
                    r.ports.to_string(),
                    cell(r, "backend_cpu_pct"),
                    cell(r, "backend_cpu_pct_per_port"),
                    cell(r, "wakeups_per_s"),
                    cell(r, "wakeups_per_s_per_port"),
                    cell(r, "rss_kib_per_port"),
                    status_cell(r),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "backend",
                "ports",
                "CPU % (all ports)",
                "CPU % per port",
                "wake-ups/s",
                "wake-ups/s per port",
                "RSS KiB per port (attached)",
                "status",
            ],
            rows,
        );
    }
    let soak: Vec<&Record> = recs.iter().filter(|r| r.scenario == "soak").collect();
    if !soak.is_empty() {
        let _ = writeln!(
            o,
            "## soak: 8 ports in one process, mixed-size host → guest traffic\n\nframes into \
             the daemon (tap TX) = received + daemon drops + frontend missed; tap drops are \
             frames the taps' queues dropped before the daemon; RSS sampled every minute.\n"
        );
        let rows = soak
            .iter()
            .map(|r| {
                vec![
                    fmt_num(r.duration_s),
                    cell(r, "sent"),
                    cell(r, "tap_tx_packets"),
                    cell(r, "received"),
                    cell(r, "daemon_drops"),
                    cell(r, "tap_drops"),
                    cell(r, "frontend_missed"),
                    cell(r, "unaccounted"),
                    cell(r, "rss_first_kib"),
                    cell(r, "rss_last_kib"),
                    cell(r, "rss_max_kib"),
                    status_cell(r),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "seconds",
                "generator sent",
                "tap TX (into the daemon)",
                "received",
                "daemon drops",
                "tap drops",
                "frontend missed",
                "unaccounted",
                "RSS KiB first",
                "RSS KiB last",
                "RSS KiB max",
                "status",
            ],
            rows,
        );
    }
    let mem: Vec<&Record> = recs
        .iter()
        .filter(|r| r.scenario == "scale" && r.test == "memory")
        .collect();
    if !mem.is_empty() {
        let _ = writeln!(
            o,
            "## scale: memory per port (one daemon process per port, not attached)\n"
        );
        let rows = mem
            .iter()
            .map(|r| {
                vec![
                    r.backend.clone(),
                    r.ports.to_string(),
                    cell(r, "rss_kib_per_port"),
                    cell(r, "pss_kib_per_port"),
                    cell(r, "rss_kib"),
                    status_cell(r),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "backend",
                "ports",
                "RSS KiB per port",
                "PSS KiB per port",
                "RSS KiB total",
                "status",
            ],
            rows,
        );
    }
    let q: Vec<&Record> = recs
        .iter()
        .filter(|r| r.scenario == "scale" && r.test == "queues")
        .collect();
    if !q.is_empty() {
        let _ = writeln!(
            o,
            "## scale: queue pairs (VM-less, 64 B, one frontend forwarding core)\n"
        );
        let rows = q
            .iter()
            .map(|r| {
                vec![
                    r.backend.clone(),
                    r.direction.clone(),
                    r.queues.to_string(),
                    cell(r, "mpps"),
                    cell(r, "mpps_per_core"),
                    cell(r, "loss_pct"),
                    cell(r, "backend_cpu_pct"),
                    cell(r, "cycles_per_packet"),
                    status_cell(r),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "backend",
                "direction",
                "queues",
                "Mpps",
                "Mpps per busy core",
                "loss %",
                "backend CPU %",
                "cycles/pkt",
                "status",
            ],
            rows,
        );
    }
    let ratios = ratios(recs);
    if !ratios.is_empty() {
        let _ = writeln!(
            o,
            "## Headline ratios (vhost-pump ÷ reference, same run)\n\nThroughput ratios > 1 and \
             cost ratios < 1 favour vhost-pump.\n"
        );
        table(
            &mut o,
            &["comparison", "figure", "vhost-pump", "reference", "ratio"],
            ratios,
        );
    }
    o
}

fn find(recs: &[Record], pred: impl Fn(&Record) -> bool) -> Option<&Record> {
    recs.iter().find(|r| r.status == Status::Ok && pred(r))
}

/// The good vmless throughput record of `backend` for `dir` and `size`, one queue pair.
fn vmless_throughput<'a>(
    recs: &'a [Record],
    backend: &str,
    dir: &str,
    size: u32,
) -> Option<&'a Record> {
    find(recs, |r| {
        r.scenario == "vmless"
            && r.test == "throughput"
            && r.queues == 1
            && r.backend == backend
            && r.direction == dir
            && r.frame_size == size
    })
}

/// Rows of (comparison, figure, ours, reference, ratio).
fn ratios(recs: &[Record]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut push = |what: String, fig: &str, a: f64, b: f64| {
        if b > 0.0 {
            rows.push(vec![
                what,
                fig.to_string(),
                fmt_num(a),
                fmt_num(b),
                format!("{:.2}", a / b),
            ]);
        }
    };
    // vmless, per direction and size, queues 1.
    let mut keys: Vec<(String, u32)> = recs
        .iter()
        .filter(|r| r.scenario == "vmless" && r.test == "throughput" && r.queues == 1)
        .map(|r| (r.direction.clone(), r.frame_size))
        .collect();
    keys.sort();
    keys.dedup();
    for (ours, theirs) in [
        ("vhost-pump-tap", "dpdk-vhost-tap"),
        ("vhost-pump-afpacket", "dpdk-vhost-afpacket"),
    ] {
        for (dir, size) in &keys {
            let pick = |b: &str| vmless_throughput(recs, b, dir, *size);
            if let (Some(a), Some(b)) = (pick(ours), pick(theirs)) {
                let what = format!("vmless {dir} {size} B: {ours} ÷ {theirs}");
                push(
                    what.clone(),
                    "Mpps",
                    a.get("mpps").unwrap_or(0.0),
                    b.get("mpps").unwrap_or(0.0),
                );
                if let (Some(x), Some(y)) = (a.get("cycles_per_packet"), b.get("cycles_per_packet"))
                {
                    push(what, "cycles/pkt", x, y);
                }
            }
        }
        let pick = |b: &str| {
            find(recs, |r| {
                r.test == "ndr" && r.queues == 1 && r.backend == b && r.frame_size == 64
            })
        };
        if let (Some(a), Some(b)) = (pick(ours), pick(theirs)) {
            push(
                format!("vmless NDR guest-rx 64 B: {ours} ÷ {theirs}"),
                "NDR Mpps",
                a.get("ndr_mpps").unwrap_or(0.0),
                b.get("ndr_mpps").unwrap_or(0.0),
            );
        }
    }
    // vmless guest-tx against the kernel floors.
    for (ours, floor) in [
        ("vhost-pump-tap", "kernel-floor-tap"),
        ("dpdk-vhost-tap", "kernel-floor-tap"),
        ("vhost-pump-tap", "kernel-floor-tap-uring"),
        ("vhost-pump-afpacket", "kernel-floor-afpacket"),
        ("dpdk-vhost-afpacket", "kernel-floor-afpacket"),
    ] {
        for (dir, size) in keys.iter().filter(|(d, _)| d == "guest-tx") {
            let pick = |b: &str| vmless_throughput(recs, b, dir, *size);
            if let (Some(a), Some(b)) = (pick(ours), pick(floor)) {
                push(
                    format!("vmless {dir} {size} B: {ours} ÷ {floor}"),
                    "Mpps",
                    a.get("mpps").unwrap_or(0.0),
                    b.get("mpps").unwrap_or(0.0),
                );
            }
        }
    }
    // guest-tcp.
    for (ours, theirs) in [
        ("vhost-pump-tap", "qemu-tap"),
        ("vhost-pump-tap", "kata-tcfilter"),
        ("vhost-pump-afpacket", "dpdk-vhost-afpacket"),
        ("vhost-pump-afpacket", "qemu-tap"),
        ("vhost-pump-afpacket", "kata-tcfilter"),
    ] {
        for dir in ["guest-tx", "guest-rx"] {
            for streams in [1, 4] {
                let pick = |b: &str| {
                    find(recs, |r| {
                        r.scenario == "guest-tcp"
                            && r.test == "tcp"
                            && r.backend == b
                            && r.direction == dir
                            && r.streams == streams
                    })
                };
                if let (Some(a), Some(b)) = (pick(ours), pick(theirs)) {
                    let what = format!("guest-tcp {dir} P{streams}: {ours} ÷ {theirs}");
                    push(
                        what.clone(),
                        "Gbit/s",
                        a.get("gbps").unwrap_or(0.0),
                        b.get("gbps").unwrap_or(0.0),
                    );
                    for (key, label) in [
                        ("host_cpu_pct_per_gbps", "host CPU % per Gbit/s"),
                        ("total_cpu_pct_per_gbps", "total CPU % per Gbit/s"),
                    ] {
                        if let (Some(x), Some(y)) = (a.get(key), b.get(key)) {
                            push(what.clone(), label, x, y);
                        }
                    }
                }
            }
        }
        let pick = |b: &str| {
            find(recs, |r| {
                r.scenario == "guest-tcp" && r.test == "ping" && r.backend == b
            })
        };
        if let (Some(a), Some(b)) = (pick(ours), pick(theirs)) {
            push(
                format!("guest-tcp ping: {ours} ÷ {theirs}"),
                "RTT p99 µs",
                a.get("rtt_p99_us").unwrap_or(0.0),
                b.get("rtt_p99_us").unwrap_or(0.0),
            );
        }
    }
    // idle.
    let mut ports: Vec<u32> = recs
        .iter()
        .filter(|r| r.scenario == "idle")
        .map(|r| r.ports)
        .collect();
    ports.sort();
    ports.dedup();
    for n in ports {
        let pick = |b: &str| {
            find(recs, |r| {
                r.scenario == "idle" && r.backend == b && r.ports == n
            })
        };
        if let (Some(a), Some(b)) = (pick("vhost-pump-tap"), pick("dpdk-vhost-tap")) {
            push(
                format!("idle, {n} ports: vhost-pump-tap ÷ dpdk-vhost-tap"),
                "CPU %",
                a.get("backend_cpu_pct").unwrap_or(0.0),
                b.get("backend_cpu_pct").unwrap_or(0.0),
            );
        }
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// Plots

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn color_of(backend: &str) -> RGBColor {
    let i = match backend {
        "vhost-pump-tap" => 0,
        "vhost-pump-afpacket" => 1,
        "dpdk-vhost-tap" => 2,
        "dpdk-vhost-afpacket" => 3,
        "qemu-tap" => 4,
        _ => 5,
    };
    PALETTE[i]
}

/// Finds a TrueType font for the plots' text and registers it (once).
fn ensure_font() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
        ];
        let register = || {
            for c in candidates {
                if let Ok(bytes) = std::fs::read(c) {
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                        .is_ok()
                    {
                        return true;
                    }
                }
            }
            false
        };
        if register() {
            return true;
        }
        // A fresh machine may lack fonts: install Debian's DejaVu (as root; best effort).
        eprintln!("vhost-pump-perf: no font for the plots; installing fonts-dejavu-core");
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "-q", "fonts-dejavu-core"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status();
        register()
    })
}

type Series = BTreeMap<String, Vec<(usize, f64)>>;

/// Per direction, per backend: (frame size index, value).
fn vmless_series(recs: &[Record], key: &str, sizes: &[u32]) -> BTreeMap<String, Series> {
    let mut out: BTreeMap<String, Series> = BTreeMap::new();
    for r in recs.iter().filter(|r| {
        r.scenario == "vmless" && r.test == "throughput" && r.queues == 1 && r.status == Status::Ok
    }) {
        if let (Some(v), Some(i)) = (r.get(key), sizes.iter().position(|s| *s == r.frame_size)) {
            out.entry(r.direction.clone())
                .or_default()
                .entry(r.backend.clone())
                .or_default()
                .push((i, v));
        }
    }
    out
}

fn draw_throughput<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, recs: &[Record]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e:?}");
    root.fill(&WHITE).map_err(e)?;
    let mut sizes: Vec<u32> = recs
        .iter()
        .filter(|r| r.scenario == "vmless" && r.test == "throughput")
        .map(|r| r.frame_size)
        .collect();
    sizes.sort();
    sizes.dedup();
    let (title, body) = root.split_vertically(40);
    title
        .draw_text(
            "vmless: DPDK virtio-user frontend ↔ backend ↔ host port (queues=1)",
            &("sans-serif", 20).into_text_style(&title),
            (10, 10),
        )
        .map_err(e)?;
    let panels = body.split_evenly((2, 2));
    let metrics = [("gbps", "Gbit/s"), ("mpps", "Mpps")];
    let dirs = [
        ("guest-tx", "guest TX (guest → host)"),
        ("guest-rx", "guest RX (host → guest)"),
    ];
    let n = sizes.len() as i32;
    for (row, (key, unit)) in metrics.iter().enumerate() {
        let series = vmless_series(recs, key, &sizes);
        for (col, (dir, dir_title)) in dirs.iter().enumerate() {
            let area = &panels[row * 2 + col];
            let empty = Series::new();
            let s = series.get(*dir).unwrap_or(&empty);
            let ymax = s
                .values()
                .flat_map(|v| v.iter().map(|p| p.1))
                .fold(0.0f64, f64::max)
                .max(1e-3)
                * 1.45; // headroom for the legend
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{unit}, {dir_title}"), ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(55)
                .build_cartesian_2d(-1i32..n, 0f64..ymax)
                .map_err(e)?;
            let labels = sizes.clone();
            chart
                .configure_mesh()
                .x_labels((n + 2) as usize)
                .x_label_formatter(&|x| {
                    usize::try_from(*x)
                        .ok()
                        .and_then(|i| labels.get(i))
                        .map(|s| format!("{s} B"))
                        .unwrap_or_default()
                })
                .x_desc("frame size")
                .y_desc(*unit)
                .draw()
                .map_err(e)?;
            for (backend, pts) in s {
                let c = color_of(backend);
                let pts: Vec<(i32, f64)> = pts.iter().map(|(i, v)| (*i as i32, *v)).collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                    .map_err(e)?
                    .label(backend.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
                    .map_err(e)?;
            }
            if !s.is_empty() {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperRight)
                    .label_font(("sans-serif", 12))
                    .draw()
                    .map_err(e)?;
            }
        }
    }
    root.present().map_err(e)?;
    Ok(())
}

/// (label, backend, CPU% per Gbit/s) bars.
fn cpu_bars(recs: &[Record]) -> Vec<(String, String, f64)> {
    let mut bars = Vec::new();
    // vmless at the largest frame size measured, per direction.
    let max_size = recs
        .iter()
        .filter(|r| r.scenario == "vmless" && r.test == "throughput")
        .map(|r| r.frame_size)
        .max();
    for r in recs.iter().filter(|r| r.status == Status::Ok) {
        let cpu_key = if r.scenario == "guest-tcp" {
            "host_cpu_pct"
        } else {
            "backend_cpu_pct"
        };
        let value = match (r.get(cpu_key), r.get("gbps")) {
            (Some(c), Some(g)) if g > 0.0 => c / g,
            _ => continue,
        };
        if r.scenario == "vmless"
            && r.test == "throughput"
            && r.queues == 1
            && Some(r.frame_size) == max_size
        {
            bars.push((
                format!("vmless {} {} B: {}", r.direction, r.frame_size, r.backend),
                r.backend.clone(),
                value,
            ));
        } else if r.scenario == "guest-tcp" && r.test == "tcp" && r.streams == 1 {
            bars.push((
                format!("guest-tcp {} P1: {}", r.direction, r.backend),
                r.backend.clone(),
                value,
            ));
        }
    }
    bars
}

fn draw_cpu<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, recs: &[Record]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e:?}");
    root.fill(&WHITE).map_err(e)?;
    let bars = cpu_bars(recs);
    let n = bars.len().max(1);
    let xmax = bars.iter().map(|b| b.2).fold(0.0f64, f64::max).max(1e-3) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "CPU % per Gbit/s (lower is better): vmless = backend process, guest-tcp = daemon + QEMU I/O threads",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(10)
        .build_cartesian_2d(0f64..xmax, 0f64..n as f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc("CPU % of one core per Gbit/s")
        .draw()
        .map_err(e)?;
    for (i, (label, backend, v)) in bars.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let c = color_of(backend);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y + 0.15), (*v, y + 0.85)],
                c.mix(0.45).filled(),
            )))
            .map_err(e)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{label}  ({})", fmt_num(*v)),
                (xmax * 0.01, y + 0.65),
                ("sans-serif", 13).into_font(),
            )))
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

/// Writes `results.md` and the plots into `dir` from its records; returns the table.
pub fn write(dir: &Path) -> Result<String> {
    let recs = record::load(dir)?;
    let md = markdown(&recs);
    std::fs::write(dir.join(TABLE), &md)?;
    if !ensure_font() {
        eprintln!(
            "vhost-pump-perf: no TrueType font found (apt-get install fonts-dejavu-core): plots \
             skipped"
        );
        return Ok(md);
    }
    let has_vmless = recs
        .iter()
        .any(|r| r.scenario == "vmless" && r.test == "throughput" && r.status == Status::Ok);
    if has_vmless {
        let svg = dir.join("vmless-throughput.svg");
        draw_throughput(
            SVGBackend::new(&svg, (1200, 800)).into_drawing_area(),
            &recs,
        )?;
        let png = dir.join("vmless-throughput.png");
        draw_throughput(
            BitMapBackend::new(&png, (1200, 800)).into_drawing_area(),
            &recs,
        )?;
    }
    if !cpu_bars(&recs).is_empty() {
        let h = 120 + 28 * cpu_bars(&recs).len() as u32;
        let svg = dir.join("cpu-per-gbit.svg");
        draw_cpu(SVGBackend::new(&svg, (1000, h)).into_drawing_area(), &recs)?;
        let png = dir.join("cpu-per-gbit.png");
        draw_cpu(
            BitMapBackend::new(&png, (1000, h)).into_drawing_area(),
            &recs,
        )?;
    }
    Ok(md)
}
