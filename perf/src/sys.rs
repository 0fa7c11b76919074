//! Host plumbing: network namespaces, child processes killed on drop, `/proc` readings
//! (CPU time, context switches, memory), interface counters and the machine description.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Prefix of every network namespace the lab creates (and may delete).
pub const NETNS_PREFIX: &str = "vpperf-";

/// Everything to clean up if the run is interrupted: child pids and namespaces.
#[derive(Default)]
struct Registry {
    pids: Vec<u32>,
    netns: Vec<String>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Set once SIGINT/SIGTERM arrived; long loops poll it.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether the run was interrupted by a signal.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Installs SIGINT/SIGTERM handling: kill the children this process started (by pid) and delete
/// the namespaces it created, then exit with status 130.
pub fn install_signal_cleanup() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                INTERRUPTED.store(true, Ordering::Relaxed);
                eprintln!("\nvhost-pump-perf: interrupted, cleaning up");
                cleanup_all();
                std::process::exit(130);
            }
        })?;
    Ok(())
}

/// Kills every registered child and deletes every registered namespace.
pub fn cleanup_all() {
    let (pids, netns) = {
        let mut r = registry().lock().unwrap();
        (std::mem::take(&mut r.pids), std::mem::take(&mut r.netns))
    };
    for pid in pids {
        // SAFETY: kill(2) with a pid this process spawned and a valid signal number.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    for ns in netns {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// Command log

fn cmdlog() -> &'static Mutex<Vec<String>> {
    static L: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    L.get_or_init(Default::default)
}

/// Appends a command line (or a description of an in-process action) to the log that the next
/// result records carry.
pub fn log_cmd(line: impl Into<String>) {
    cmdlog().lock().unwrap().push(line.into());
}

/// The commands logged since the last [`take_cmds`]/[`clear_cmds`], in order, without clearing.
pub fn peek_cmds() -> Vec<String> {
    cmdlog().lock().unwrap().clone()
}

/// Clears the command log.
pub fn clear_cmds() {
    cmdlog().lock().unwrap().clear();
}

/// Quotes arguments into one shell-like line (for logs only; nothing runs it through a shell).
pub fn shell_join<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| {
            let a = a.as_ref();
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=,./:@+%".contains(c))
            {
                a.to_string()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe(cmd: &Command) -> String {
    let mut v = vec![cmd.get_program().to_string_lossy().into_owned()];
    v.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    shell_join(&v)
}

/// Runs `argv` to completion, logs it, and fails with its stderr if it fails. Returns stdout.
pub fn run(argv: &[&str]) -> Result<String> {
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..]);
    run_cmd(&mut c)
}

/// Runs a prepared command like [`run`].
pub fn run_cmd(c: &mut Command) -> Result<String> {
    let line = describe(c);
    log_cmd(line.clone());
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {line}"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `argv`, ignoring failure and output (cleanup steps); not logged.
pub fn run_quiet(argv: &[&str]) {
    let _ = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// A named network namespace `vpperf-<suffix>`, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `vpperf-<pid>-<suffix>` (deleting a stale one of that name first), with `lo` up.
    /// The pid keeps concurrent lab runs (e.g. a CI smoke test) apart.
    pub fn create(suffix: &str) -> Result<Netns> {
        let name = format!("{NETNS_PREFIX}{}-{suffix}", std::process::id());
        if Path::new("/run/netns").join(&name).exists() {
            run_quiet(&["ip", "netns", "del", &name]);
        }
        run(&["ip", "netns", "add", &name])?;
        registry().lock().unwrap().netns.push(name.clone());
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME argv...` (not yet run).
    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Runs `argv` in the namespace; fails with its stderr.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        run_cmd(&mut self.cmd(argv))
    }

    /// Runs `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        run_cmd(&mut c)
    }

    /// Runs `f` on a thread whose network namespace is this one: sockets it opens and
    /// processes it spawns live here.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
        let path = Path::new("/run/netns").join(&self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&path)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| bail!("thread in netns {} panicked", self.name))
        })
    }

    /// Kernel counters of `ifname` in this namespace (from `/proc/thread-self/net/dev`).
    pub fn counters(&self, ifname: &str) -> Result<IfCounters> {
        let ifname = ifname.to_string();
        self.enter(move || {
            let text = fs::read_to_string("/proc/thread-self/net/dev")?;
            parse_net_dev(&text, &ifname).with_context(|| format!("no interface {ifname}"))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        run_quiet(&["ip", "netns", "del", &self.name]);
        registry().lock().unwrap().netns.retain(|n| n != &self.name);
    }
}

/// Moves the calling thread into the network namespace at `path` (`/run/netns/NAME`).
pub fn enter_netns(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns(2) on an open namespace fd; affects only the calling thread's netns.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Deletes namespaces left over by earlier, killed runs: `vpperf-<pid>-*` whose lab process
/// no longer exists.
pub fn delete_stale_netns() {
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = n.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                run_quiet(&["ip", "netns", "del", &n]);
            }
        }
    }
}

/// Interface counters (the kernel's view; the lab reads some of them), parsed by the test kit.
pub use testkit::netns::{parse_net_dev, IfStats as IfCounters};

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process, stopped (SIGTERM, then SIGKILL) on drop. Its stdout/stderr go to a log file.
pub struct Proc {
    child: Child,
    /// Short label for messages.
    pub name: String,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with output to `log` (appended), logs the command line.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let cmdline = describe(&cmd);
        log_cmd(cmdline.clone());
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("cannot start {cmdline}"))?;
        Ok(Proc::adopt(name, child, log))
    }

    /// Takes ownership of an already spawned child.
    pub fn adopt(name: &str, child: Child, log: &Path) -> Proc {
        registry().lock().unwrap().pids.push(child.id());
        Proc {
            child,
            name: name.into(),
            log: log.to_path_buf(),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once it exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, up to 3 s grace, then SIGKILL; waits.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(3) {
                if self.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let pid = self.child.id();
        registry().lock().unwrap().pids.retain(|p| *p != pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `path` exists, failing early if `proc` exits.
pub fn wait_for_path(proc: &mut Proc, path: &Path, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some(st) = proc.exited() {
            bail!(
                "{} exited ({st}) before creating {}: {}",
                proc.name,
                path.display(),
                proc.log_tail(5)
            );
        }
        if t.elapsed() > timeout {
            bail!(
                "{} did not create {} within {timeout:?}: {}",
                proc.name,
                path.display(),
                proc.log_tail(5)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime+stime (ticks) from the text of a `/proc/.../stat` file.
fn stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: field 3 (state) is f[0]; utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU seconds (user+system, all threads) used so far by `pid`.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = stat_ticks(&text).context("bad /proc/PID/stat")?;
    Ok(ticks as f64 / clk_tck())
}

/// CPU seconds split by thread name class: `(vcpu, other)`; QEMU's vCPU threads are named
/// "CPU n/TCG" or "CPU n/KVM".
pub fn cpu_seconds_split(pid: u32) -> Result<(f64, f64)> {
    let (mut vcpu, mut other) = (0u64, 0u64);
    for e in fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let p = e.path();
        let Ok(stat) = fs::read_to_string(p.join("stat")) else {
            continue;
        };
        let comm = fs::read_to_string(p.join("comm")).unwrap_or_default();
        let t = stat_ticks(&stat).unwrap_or(0);
        if comm.starts_with("CPU ") {
            vcpu += t;
        } else {
            other += t;
        }
    }
    Ok((vcpu as f64 / clk_tck(), other as f64 / clk_tck()))
}

/// Voluntary + involuntary context switches of all threads of `pid` (each one is a wake-up or
/// a preemption).
pub fn context_switches(pid: u32) -> Result<u64> {
    let mut sum = 0;
    for e in fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Ok(text) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        sum += status_field(&text, "voluntary_ctxt_switches").unwrap_or(0)
            + status_field(&text, "nonvoluntary_ctxt_switches").unwrap_or(0);
    }
    Ok(sum)
}

/// A numeric field ("VmRSS:   1234 kB" → 1234) of a `/proc/PID/status` text.
pub fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `(VmRSS, Pss)` of `pid` in KiB (Pss from smaps_rollup; 0 if unavailable).
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status_field(&status, "VmRSS").unwrap_or(0);
    let pss = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| status_field(&t, "Pss"))
        .unwrap_or(0);
    Ok((rss, pss))
}

/// CPU and wake-up reading of a set of processes at one instant.
#[derive(Clone, Debug)]
pub struct Usage {
    at: Instant,
    cpu: f64,
    ctxt: u64,
    /// (busy, total) jiffies of the whole machine.
    machine: (u64, u64),
}

/// `(busy, total)` jiffies of all CPUs from `/proc/stat` (busy = total - idle - iowait).
fn machine_jiffies() -> (u64, u64) {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is included in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

impl Usage {
    /// Reads all `pids` now (missing processes count as zero).
    pub fn now(pids: &[u32]) -> Usage {
        let mut cpu = 0.0;
        let mut ctxt = 0;
        for &p in pids {
            cpu += cpu_seconds(p).unwrap_or(0.0);
            ctxt += context_switches(p).unwrap_or(0);
        }
        Usage {
            at: Instant::now(),
            cpu,
            ctxt,
            machine: machine_jiffies(),
        }
    }

    /// The difference since `earlier`.
    pub fn since(&self, earlier: &Usage) -> UsageDelta {
        let wall = (self.at - earlier.at).as_secs_f64().max(1e-9);
        let cpu = (self.cpu - earlier.cpu).max(0.0);
        UsageDelta {
            wall_s: wall,
            cpu_s: cpu,
            cpu_pct: 100.0 * cpu / wall,
            wakeups_per_s: (self.ctxt.saturating_sub(earlier.ctxt)) as f64 / wall,
            machine_busy_pct: {
                let busy = self.machine.0.saturating_sub(earlier.machine.0) as f64;
                let total = self.machine.1.saturating_sub(earlier.machine.1) as f64;
                if total > 0.0 {
                    100.0 * busy / total
                } else {
                    0.0
                }
            },
        }
    }
}

/// Difference of two [`Usage`] readings.
#[derive(Clone, Copy, Debug, Default)]
pub struct UsageDelta {
    /// Wall-clock seconds between the readings.
    pub wall_s: f64,
    /// CPU seconds used.
    pub cpu_s: f64,
    /// CPU% of one core (100 = one core busy).
    pub cpu_pct: f64,
    /// Context switches per second.
    pub wakeups_per_s: f64,
    /// How busy the whole machine was, % of all CPUs (everything: the lab, and any other
    /// tenant of a shared machine).
    pub machine_busy_pct: f64,
}

// ---------------------------------------------------------------------------------------------
// Machine description

/// What the results were measured on.
#[derive(Clone, Debug, Serialize, serde::Deserialize, Default)]
pub struct Machine {
    /// CPU model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub nproc: usize,
    /// Nominal MHz used for cycles-per-packet (from the model name's "@ x.xxGHz", else "cpu MHz").
    pub cpu_mhz: f64,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// `uname -r`.
    pub kernel: String,
    /// Host name.
    pub hostname: String,
    /// Versions of the tools under test and used.
    pub versions: BTreeMap<String, String>,
}

impl Machine {
    /// Reads the machine and tool versions (`vhost_pump` is the daemon binary).
    pub fn detect(vhost_pump: Option<&Path>) -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        let mhz = nominal_mhz(&model).unwrap_or_else(|| {
            cpuinfo
                .lines()
                .find_map(|l| {
                    l.strip_prefix("cpu MHz")
                        .and_then(|r| r.trim_start_matches([' ', '\t', ':']).parse::<f64>().ok())
                })
                .unwrap_or(0.0)
        });
        let mem = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| status_field(&t, "MemTotal"))
            .unwrap_or(0)
            / 1024;
        let mut versions = BTreeMap::new();
        let first_line = |argv: &[&str]| -> Option<String> {
            let out = Command::new(argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string)
        };
        if let Some(v) = first_line(&["qemu-system-x86_64", "--version"]) {
            versions.insert("qemu".into(), v);
        }
        if let Some(v) = first_line(&["dpkg-query", "-W", "-f=${Version}", "dpdk-dev"]) {
            versions.insert("dpdk".into(), format!("dpdk-dev {v}"));
        }
        if let Some(v) = first_line(&["iperf3", "--version"]) {
            versions.insert("iperf3".into(), v);
        }
        if let Some(p) = vhost_pump {
            if let Some(v) = first_line(&[&p.to_string_lossy(), "--version"]) {
                versions.insert("vhost-pump".into(), v);
            }
        }
        if let Some(v) = git_describe() {
            versions.insert("vhost-pump-git".into(), v);
        }
        versions.insert(
            "vhost-pump-perf".into(),
            env!("CARGO_PKG_VERSION").to_string(),
        );
        if let Ok(t) = fs::read_to_string(
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
                + "/.cache/vhost-pump/guest/kernel-version",
        ) {
            versions.insert("guest-kernel".into(), t.trim().to_string());
        }
        Machine {
            cpu_model: model,
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_mhz: mhz,
            mem_mib: mem,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            hostname: fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_string(),
            versions,
        }
    }
}

/// "Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz" → 2600.
fn nominal_mhz(model: &str) -> Option<f64> {
    let at = model.rfind('@')?;
    let s = model[at + 1..].trim();
    let ghz = s.strip_suffix("GHz")?.trim().parse::<f64>().ok()?;
    Some(ghz * 1000.0)
}

/// `git describe --always --dirty` of the workspace the lab was built from.
fn git_describe() -> Option<String> {
    let out = Command::new("git")
        .args(["-C", crate::workspace_root().to_str()?])
        .args(["describe", "--always", "--dirty"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `setsockopt(fd, level, opt, &val)` for a plain-data option value (an int, a timeval, a
/// `tpacket_req`).
pub fn setsockopt<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: &T,
) -> io::Result<()> {
    // SAFETY: the kernel reads `size_of::<T>()` bytes of `val`, a live plain-data value.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the calling thread's CPU affinity to `cpu` (best effort).
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0) targets
    // the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let dev = "Inter-|   Receive  |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n  vpt0: 100 2 0 1 0 0 0 0 300 4 0 5 0 0 0 0\n";
        let c = parse_net_dev(dev, "vpt0").unwrap();
        assert_eq!(
            (
                c.rx_bytes,
                c.rx_packets,
                c.rx_dropped,
                c.tx_bytes,
                c.tx_packets,
                c.tx_dropped
            ),
            (100, 2, 1, 300, 4, 5)
        );
        assert!(parse_net_dev(dev, "eth0").is_none());
        let stat = "123 (a b) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14";
        assert_eq!(stat_ticks(stat), Some(11 + 12));
        assert_eq!(status_field("VmRSS:\t  1234 kB\n", "VmRSS"), Some(1234));
        assert_eq!(nominal_mhz("Intel(R) Xeon(R) CPU @ 2.60GHz"), Some(2600.0));
        assert_eq!(nominal_mhz("AMD EPYC"), None);
        assert_eq!(shell_join(&["a b", "c"]), "'a b' c");
    }
}
