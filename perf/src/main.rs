//! `vhost-pump-perf`: the throughput lab. Measures vhost-pump against the alternatives in one run
//! on one machine (VM-less DPDK frontends, a QEMU guest, idle ports, scaling), writes one JSON
//! record per measurement, a Markdown table and plots.
//!
//! ```text
//! vhost-pump-perf run [--scenario NAME]... [--sizes 64,512,1518,9000] [--duration 10s]
//!                     [--queues 1,2] [--out DIR]
//! vhost-pump-perf report DIR
//! ```
//! Everything runs inside network namespaces named `vpperf-*` that the lab creates and deletes.

mod daemon;
use testkit::guest;
mod floor;
mod gen;
mod gso;
mod ping;
mod record;
mod report;
mod scen_guest;
mod scen_idle;
mod scen_scale;
mod scen_soak;
mod scen_switch;
mod scen_vmless;
mod sys;
mod testpmd;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use record::{Record, Sink, Status};
use sys::Machine;

/// Throughput lab for vhost-pump.
#[derive(Debug, Parser)]
#[command(name = "vhost-pump-perf", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run scenarios (default: the quick suite, about 5 minutes) and write results + report.
    Run(Box<RunOpts>),
    /// Rebuild the Markdown table and plots from a results directory.
    Report {
        /// Results directory (holding records.jsonl).
        dir: PathBuf,
    },
    /// The kernel-floor writer the `vmless` scenario runs (see `kernel-floor-tap`).
    #[command(hide = true)]
    FloorWriter {
        /// How to reach the kernel.
        #[arg(long, value_enum, default_value = "writev")]
        method: floor::Method,
        /// Tap (made with `vnet_hdr`) or interface to write into.
        #[arg(long)]
        port: String,
        /// Ethernet frame length.
        #[arg(long)]
        frame_len: usize,
        /// How long to write.
        #[arg(long)]
        secs: f64,
    },
}

/// Options of `run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunOpts {
    /// Scenario to run: vmless, guest-tcp, idle, scale, soak, switch (repeatable; default:
    /// vmless, guest-tcp, idle, scale).
    #[arg(long = "scenario", value_name = "NAME", value_parser = ["vmless", "guest-tcp", "idle", "scale", "soak", "switch"])]
    pub scenarios: Vec<String>,
    /// Frame sizes in bytes including FCS, for vmless [default: 64,512,1518].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub sizes: Vec<u32>,
    /// Measurement window of each figure, e.g. 10s, 500ms [default: 3s vmless, 5s guest-tcp
    /// and idle].
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub duration: Option<Duration>,
    /// Queue pairs for vmless [default: 1].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub queues: Vec<u32>,
    /// Results directory [default: perf/results/<date-time> in the workspace].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Only these backends/paths (repeatable): kernel-floor-tap, kernel-floor-tap-uring, kernel-floor-afpacket, vhost-pump-tap, vhost-pump-afpacket,
    /// dpdk-vhost-tap, dpdk-vhost-afpacket, qemu-tap, kata-tcfilter, vhost-pump-switch,
    /// vhost-pump-bridge.
    #[arg(long = "backend", value_name = "NAME")]
    pub backends: Vec<String>,
    /// Skip the NDR searches.
    #[arg(long)]
    pub no_ndr: bool,
    /// Frame sizes for the NDR search [default: 64].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub ndr_sizes: Vec<u32>,
    /// Binary-search steps of each NDR search.
    #[arg(long, default_value_t = 7, value_name = "N")]
    pub ndr_steps: u32,
    /// Length of each NDR trial [default: 1s].
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub ndr_trial: Option<Duration>,
    /// Idle ports per daemon count N (idle scenario).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,8,32",
        value_name = "LIST"
    )]
    pub idle_ports: Vec<u32>,
    /// Port counts of the scale scenario (one daemon process per port).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,8,32,64",
        value_name = "LIST"
    )]
    pub scale_ports: Vec<u32>,
    /// TCP stream counts of guest-tcp.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,4",
        value_name = "LIST"
    )]
    pub streams: Vec<u32>,
    /// guest-tcp: QEMU accelerator, `tcg` or `kvm` (`-cpu host`; needs a working /dev/kvm)
    /// [default: $VHOST_PUMP_QEMU_ACCEL, else tcg].
    #[arg(long, value_parser = ["tcg", "kvm"], value_name = "ACCEL")]
    pub accel: Option<String>,
    /// guest-tcp: the iperf3 sender uses sendfile (`iperf3 -Z`), so it copies no payload and
    /// the guest's per-byte work is what the path's offloads leave it (with TSO + checksum
    /// offload nothing; without them the checksum of every byte). Run into its own directory.
    #[arg(long)]
    pub iperf_sendfile: bool,
    /// Pings per guest-tcp path (latency percentiles).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub pings: u32,
    /// The vhost-pump daemon [default: next to this binary, built with cargo if missing].
    #[arg(long, value_name = "PATH")]
    pub vhost_pump: Option<PathBuf>,
    /// Do not run tests/setup/install-deps.sh (packages are known to be there).
    #[arg(long)]
    pub no_install: bool,
    /// Extra flag for every vhost-pump daemon, e.g. `--daemon-arg=--busy-poll-us=0`
    /// (repeatable): to compare a knob's setting, run twice into two directories.
    #[arg(long = "daemon-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub daemon_args: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms, 1m)"))?;
    if !(v > 0.0 && v < 86400.0) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// The workspace the lab was built from (holds tests/setup and the daemon's sources).
pub fn workspace_root() -> PathBuf {
    if let Ok(p) = std::env::var("VHOST_PUMP_REPO") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// CPUs the lab pins things to.
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    /// The backend under test (daemon, DPDK vhost forwarding lcore).
    pub backend: usize,
    /// The DPDK virtio-user frontend's forwarding lcore.
    pub frontend: usize,
    /// The frame generator thread.
    pub generator: usize,
    /// Online CPUs.
    pub nproc: usize,
}

impl Cpus {
    fn for_machine(nproc: usize) -> Cpus {
        match nproc {
            0 | 1 => Cpus {
                backend: 0,
                frontend: 0,
                generator: 0,
                nproc: 1,
            },
            // Two cores: the generator has to share the backend's core (the frontend polls).
            2 => Cpus {
                backend: 0,
                frontend: 1,
                generator: 0,
                nproc,
            },
            _ => Cpus {
                backend: 1,
                frontend: 2,
                generator: 3 % nproc,
                nproc,
            },
        }
    }

    /// testpmd's `-l` list and `--main-lcore` for a forwarding lcore `fwd`: the main lcore
    /// (which only reads commands) is another core, 0 when possible.
    pub fn testpmd(&self, fwd: usize) -> (String, usize) {
        let main = if fwd != 0 { 0 } else { 1 % self.nproc.max(1) };
        if main == fwd {
            (format!("{fwd}"), main)
        } else {
            (format!("{main},{fwd}"), main)
        }
    }
}

/// Shared state of one `run`.
pub struct Lab {
    /// Options.
    pub opts: RunOpts,
    /// Results directory.
    pub out: PathBuf,
    /// Logs of every process, under `out/logs`.
    pub logs: PathBuf,
    /// Short directory for sockets (the 108-byte limit).
    pub sockdir: PathBuf,
    /// The vhost-pump daemon binary.
    pub vhost_pump: PathBuf,
    /// The guest kernel/initramfs directory (when guest-tcp runs).
    pub guest_dir: Option<PathBuf>,
    /// Machine description.
    pub machine: Machine,
    /// CPU pinning.
    pub cpus: Cpus,
    sink: Sink,
    pb: ProgressBar,
}

impl Lab {
    /// Whether backend/path `name` was selected.
    pub fn wants(&self, name: &str) -> bool {
        self.opts.backends.is_empty() || self.opts.backends.iter().any(|b| b == name)
    }

    /// Window of one figure for `scenario` (the `--duration`, else the quick-suite default).
    pub fn duration(&self, scenario: &str) -> Duration {
        self.opts.duration.unwrap_or(match scenario {
            "vmless" | "scale" => Duration::from_secs(3),
            _ => Duration::from_secs(5),
        })
    }

    /// Shows what is being measured now.
    pub fn status(&self, msg: impl Into<String>) {
        self.pb.set_message(msg.into());
    }

    /// Prints a line above the progress bar.
    pub fn say(&self, msg: impl AsRef<str>) {
        if self.pb.is_hidden() {
            eprintln!("{}", msg.as_ref());
        } else {
            self.pb.println(msg.as_ref());
        }
    }

    /// Stores a record (with the commands logged since the last `begin`), advances the bar.
    pub fn record(&mut self, mut r: Record) {
        if r.commands.is_empty() {
            r.commands = sys::peek_cmds();
        }
        self.say(summary_line(&r));
        self.pb.inc(1);
        if let Err(e) = self.sink.push(r) {
            self.say(format!("cannot write record: {e:#}"));
        }
    }

    /// Starts a new group of commands (a backend's setup).
    pub fn begin(&self) {
        sys::clear_cmds();
    }

    /// A log file path for `name`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}

fn summary_line(r: &Record) -> String {
    let mut s = format!(
        "{:<9} {:<7} {:<20} {:<8}",
        r.scenario, r.test, r.backend, r.direction
    );
    if r.frame_size > 0 {
        s += &format!(" {:>5}B", r.frame_size);
    }
    if r.streams > 0 {
        s += &format!(" P{}", r.streams);
    }
    if r.ports > 1 {
        s += &format!(" ports={}", r.ports);
    }
    if r.queues > 1 {
        s += &format!(" q={}", r.queues);
    }
    match r.status {
        Status::Ok => {
            for k in [
                "mpps",
                "gbps",
                "loss_pct",
                "ndr_mpps",
                "backend_cpu_pct",
                "wakeups_per_s",
                "rtt_p50_us",
                "rtt_p99_us",
                "rss_kib_per_port",
            ] {
                if let Some(v) = r.get(k) {
                    s += &format!(" {k}={}", report::fmt_num(v));
                }
            }
        }
        st => {
            s += &format!(
                " {:?}: {}",
                st,
                r.error
                    .as_deref()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
            )
        }
    }
    s
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a setup script of the workspace; returns its stdout.
fn setup_script(name: &str) -> Result<String> {
    let path = workspace_root().join("tests/setup").join(name);
    if !path.is_file() {
        bail!(
            "{} not found (set VHOST_PUMP_REPO to the workspace)",
            path.display()
        );
    }
    sys::log_cmd(format!("bash {}", path.display()));
    let out = Command::new("bash")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Newest modification time of the files under `dir` (recursively).
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut best = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        if t > best {
            best = t;
        }
    }
    best
}

/// Finds the daemon: `--vhost-pump`, else next to this binary (rebuilt with cargo when missing
/// or older than the sources).
fn find_vhost_pump(opt: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = opt {
        if !p.is_file() {
            bail!("--vhost-pump {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no parent dir of the executable")?;
    let candidate = dir.join("vhost-pump");
    let root = workspace_root();
    let profile = if dir.ends_with("debug") {
        "dev"
    } else {
        "release"
    };
    let built = candidate.metadata().and_then(|m| m.modified()).ok();
    let sources = ["src", "vhost-net-backend/src"]
        .iter()
        .filter_map(|d| newest_mtime(&root.join(d)))
        .max();
    let stale = match (built, sources) {
        (None, _) => true,
        (Some(b), Some(s)) => s > b,
        _ => false,
    };
    if stale && root.join("Cargo.toml").is_file() {
        eprintln!(
            "vhost-pump-perf: building the daemon (cargo build --profile {profile} -p vhost-pump)"
        );
        let st = Command::new("cargo")
            .args([
                "build",
                "--profile",
                profile,
                "-p",
                "vhost-pump",
                "--bin",
                "vhost-pump",
            ])
            .current_dir(&root)
            .stdin(Stdio::null())
            .status();
        match st {
            Ok(s) if s.success() => {}
            other if candidate.is_file() => eprintln!(
                "vhost-pump-perf: warning: rebuilding the daemon failed ({other:?}); using the \
                 existing {}",
                candidate.display()
            ),
            other => bail!("cannot build the vhost-pump daemon: {other:?}"),
        }
    }
    if candidate.is_file() {
        Ok(candidate)
    } else {
        bail!(
            "no vhost-pump binary at {} (build it, or pass --vhost-pump PATH)",
            candidate.display()
        )
    }
}

/// `YYYY-MM-DD-HHMMSS` (UTC) for the default results directory.
fn timestamp_name() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn run(mut opts: RunOpts) -> Result<()> {
    if !is_root() {
        bail!("needs root (network namespaces, taps, veths, AF_PACKET sockets)");
    }
    if opts.scenarios.is_empty() {
        opts.scenarios = ["vmless", "guest-tcp", "idle", "scale"]
            .map(String::from)
            .to_vec();
    }
    if opts.sizes.is_empty() {
        opts.sizes = vec![64, 512, 1518];
    }
    if opts.queues.is_empty() {
        opts.queues = vec![1];
    }
    if opts.ndr_sizes.is_empty() {
        opts.ndr_sizes = vec![64];
    }
    for &s in &opts.sizes {
        if !(64..=9018).contains(&s) {
            bail!("--sizes: {s} is outside 64..=9018");
        }
    }
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("perf/results").join(timestamp_name()));
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let sockdir = PathBuf::from(format!("/tmp/vpperf-{}", std::process::id()));
    std::fs::create_dir_all(&sockdir)?;

    sys::install_signal_cleanup()?;
    sys::delete_stale_netns();
    let started = Instant::now();

    eprintln!("vhost-pump-perf: setting up (packages, guest, daemon)");
    if !opts.no_install {
        setup_script("install-deps.sh")?;
    }
    let guest_dir = if opts.scenarios.iter().any(|s| s == "guest-tcp") {
        let out = setup_script("build-guest.sh")?;
        Some(PathBuf::from(out.lines().last().unwrap_or("").trim()))
    } else {
        None
    };
    let vhost_pump = find_vhost_pump(opts.vhost_pump.as_deref())?;
    let machine = Machine::detect(Some(&vhost_pump));
    let cpus = Cpus::for_machine(machine.nproc);
    std::fs::write(
        out.join("machine.json"),
        serde_json::to_string_pretty(&machine)?,
    )?;

    let total: u64 = opts
        .scenarios
        .iter()
        .map(|s| match s.as_str() {
            "vmless" => scen_vmless::planned(&opts),
            "guest-tcp" => scen_guest::planned(&opts),
            "idle" => scen_idle::planned(&opts),
            "scale" => scen_scale::planned(&opts, machine.nproc),
            "soak" => scen_soak::planned(),
            "switch" => scen_switch::planned(&opts),
            _ => 0,
        })
        .sum();
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} (eta {eta}) {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    let sink = Sink::new(&out, machine.clone())?;
    let mut lab = Lab {
        opts: opts.clone(),
        out: out.clone(),
        logs,
        sockdir: sockdir.clone(),
        vhost_pump,
        guest_dir,
        machine,
        cpus,
        sink,
        pb,
    };
    lab.say(format!(
        "results: {}  (cpu: {}, {} cores, {} MHz; daemon: {})",
        out.display(),
        lab.machine.cpu_model,
        lab.machine.nproc,
        lab.machine.cpu_mhz,
        lab.vhost_pump.display()
    ));

    for s in opts.scenarios.clone() {
        if sys::interrupted() {
            break;
        }
        let res = match s.as_str() {
            "vmless" => scen_vmless::run(&mut lab),
            "guest-tcp" => scen_guest::run(&mut lab),
            "idle" => scen_idle::run(&mut lab),
            "scale" => scen_scale::run(&mut lab),
            "soak" => scen_soak::run(&mut lab),
            "switch" => scen_switch::run(&mut lab),
            _ => Ok(()),
        };
        if let Err(e) = res {
            // A scenario-level failure (its setup broke): keep it in the results.
            let mut r = Record::new(&s, "setup", "-", "-");
            r.fail(Status::Failed, format!("{e:#}"));
            lab.record(r);
        }
    }
    lab.pb.finish_and_clear();
    let _ = std::fs::remove_dir_all(&sockdir);
    let written = lab.sink.written.len();
    eprintln!(
        "vhost-pump-perf: {written} records in {:.0?}",
        started.elapsed()
    );
    report::write(&out)?;
    eprintln!(
        "vhost-pump-perf: wrote {}, {} and plots",
        out.join(record::RECORDS).display(),
        out.join(report::TABLE).display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run(opts) => run(*opts),
        Cmd::Report { dir } => report::write(&dir).map(|_| {
            println!("{}", dir.join(report::TABLE).display());
        }),
        Cmd::FloorWriter {
            method,
            port,
            frame_len,
            secs,
        } => floor::write_loop(method, &port, frame_len, secs),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            sys::cleanup_all();
            eprintln!("vhost-pump-perf: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_names() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("0s").is_err());
        let t = timestamp_name();
        assert_eq!(t.len(), "2026-11-24-093000".len());
    }
}
