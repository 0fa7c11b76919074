//! Private network namespaces for tests that need taps, and the tools used inside them: the
//! daemon as a child process, interface counters, and raw Ethernet frames over AF_PACKET.
//!
//! [`in_new_netns`] runs a closure on a dedicated thread that has called
//! `unshare(CLONE_NEWNET)`: a namespace is a property of the thread (task), so everything the
//! closure does — creating sockets, spawning the daemon, `ip`, `dpdk-testpmd` — happens in a
//! namespace of its own, with only `lo` (brought up) and IPv6 disabled so the kernel sends no
//! unsolicited frames on new interfaces. The namespace disappears once the thread and its
//! children are gone, so tests can run in parallel with the same interface names.
//!
//! `/sys/class/net` shows the namespace sysfs was mounted in, not the thread's, so interface
//! counters are read from `/proc/thread-self/net/dev` ([`if_stats`]).

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use crate::daemon_bin;

/// `vhost-pump ctl --control CONTROL ARGS…` answered as JSON (`stats`, `list`); fails the
/// test when the command fails.
#[track_caller]
pub fn ctl_json(control: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&ctl_ok(control, args)).unwrap()
}

/// Runs `vhost-pump ctl --control CONTROL ARGS...` and returns what it printed; fails the
/// test when the command fails.
#[track_caller]
pub fn ctl_ok(control: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(daemon_bin())
        .args(["ctl", "--control", control.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Every switch port's counters (the `"switch"` object of `ctl stats`), by port name, without
/// the `switch` and `member` names.
#[track_caller]
pub fn switch_counters(
    control: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> {
    let v = ctl_json(control, &["stats"]);
    v.as_array()
        .unwrap_or_else(|| panic!("stats: {v}"))
        .iter()
        .filter(|p| p["switch"].is_object())
        .map(|p| {
            let c = p["switch"]
                .as_object()
                .unwrap()
                .iter()
                .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
                .collect();
            (p["name"].as_str().unwrap_or_default().to_string(), c)
        })
        .collect()
}

/// Skips (or, under `CI=true`, fails) `test` when the namespace tests cannot run here; true
/// when they can.
pub fn can_run(test: &str) -> bool {
    match missing_prereqs() {
        Some(why) => {
            super::guest::skip_or_fail(test, &why);
            false
        }
        None => true,
    }
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Why tests needing a private network namespace with taps cannot run here, or `None`.
pub fn missing_prereqs() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces, tap devices)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        _ => return Some("iproute2's `ip` is not available".into()),
    }
    if let Err(e) = try_in_new_netns(|| ()) {
        return Some(format!("cannot create a network namespace: {e}"));
    }
    None
}

/// Runs `f` on a new thread inside a new, private network namespace (see the module docs) and
/// returns its result. A panic in `f` is resumed on the caller's thread.
///
/// # Panics
/// If the namespace cannot be created; check [`missing_prereqs`] first.
pub fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    try_in_new_netns(f).unwrap_or_else(|e| panic!("cannot create a network namespace: {e}"))
}

/// Like [`in_new_netns`], returning an error when the namespace cannot be set up.
pub fn try_in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(
                std::thread::current()
                    .name()
                    .map_or_else(|| "netns".to_string(), |n| format!("{n}/netns")),
            )
            .spawn_scoped(s, move || -> io::Result<T> {
                // SAFETY: unshare takes a flag word and touches no memory; it changes only the
                // calling thread's namespace membership.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                // /proc/sys/net resolves to the namespace of the calling thread.
                for knob in ["all", "default"] {
                    let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
                }
                try_ip(&["link", "set", "lo", "up"]).map_err(io::Error::other)?;
                Ok(f())
            })?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `ip ARGS` in the caller's namespace, returning its stdout or an error with its stderr.
pub fn try_ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS`, panicking on failure.
pub fn ip(args: &[&str]) -> String {
    try_ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// The MTU of `ifname`, from `ip -o link show`.
pub fn if_mtu(ifname: &str) -> io::Result<u32> {
    let text = try_ip(&["-o", "link", "show", "dev", ifname]).map_err(io::Error::other)?;
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mtu" {
            if let Some(v) = words.next().and_then(|v| v.parse().ok()) {
                return Ok(v);
            }
        }
    }
    Err(io::Error::other(format!("no mtu in {text:?}")))
}

/// Whether `ifname` exists in the caller's namespace.
pub fn if_exists(ifname: &str) -> bool {
    if_index(ifname).is_ok()
}

/// Interface counters from `/proc/net/dev`. For a tap, `rx` counts frames written to the tap fd
/// (by the backend) and `tx` counts frames the kernel queued for the fd, `tx_packets` being
/// those read from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStats {
    /// Frames received by the kernel.
    pub rx_packets: u64,
    /// Bytes received by the kernel.
    pub rx_bytes: u64,
    /// Frames dropped on receive.
    pub rx_dropped: u64,
    /// Frames transmitted by the kernel.
    pub tx_packets: u64,
    /// Bytes transmitted by the kernel.
    pub tx_bytes: u64,
    /// Frames dropped on transmit.
    pub tx_dropped: u64,
}

impl IfStats {
    /// Counter growth from `before` to `self`.
    pub fn since(&self, before: &IfStats) -> IfStats {
        IfStats {
            rx_packets: self.rx_packets - before.rx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            rx_dropped: self.rx_dropped - before.rx_dropped,
            tx_packets: self.tx_packets - before.tx_packets,
            tx_bytes: self.tx_bytes - before.tx_bytes,
            tx_dropped: self.tx_dropped - before.tx_dropped,
        }
    }
}

/// Counters of `ifname` in the calling thread's network namespace.
pub fn if_stats(ifname: &str) -> io::Result<IfStats> {
    let text = fs::read_to_string("/proc/thread-self/net/dev")?;
    parse_net_dev(&text, ifname).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{ifname} is not in /proc/thread-self/net/dev"),
        )
    })
}

/// The counters of `ifname` in the text of `/proc/net/dev`.
pub fn parse_net_dev(text: &str, ifname: &str) -> Option<IfStats> {
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        if v.len() < 16 {
            return None;
        }
        return Some(IfStats {
            rx_bytes: v[0],
            rx_packets: v[1],
            rx_dropped: v[3],
            tx_bytes: v[8],
            tx_packets: v[9],
            tx_dropped: v[11],
        });
    }
    None
}

/// Reads the counters of `ifname` until they stop changing for `quiet` (at most `timeout`).
pub fn settled_if_stats(ifname: &str, quiet: Duration, timeout: Duration) -> io::Result<IfStats> {
    let deadline = Instant::now() + timeout;
    let mut last = if_stats(ifname)?;
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = if_stats(ifname)?;
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet || Instant::now() >= deadline {
            return Ok(last);
        }
    }
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes; returns its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A fresh directory under `std::env::temp_dir()`, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `vhost-pump-TAG-PID-N`.
    pub fn new(tag: &str) -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vhost-pump-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: kill takes plain integers; the pid is our own child, not yet reaped.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the child get SIGKILL when the thread that spawns it ends — for children of an
/// [`in_new_netns`] thread, when the test ends, even if the test process is killed.
pub fn kill_with_parent_thread(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs between fork and exec and only calls prctl, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits for `child` to exit for at most `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// User plus system CPU time consumed so far by process `pid` (all its threads).
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// A `vhost-pump` daemon child process, killed on drop. Its stderr (the log) goes to a file.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    /// The `--socket` it was given, if any.
    pub socket: Option<PathBuf>,
}

impl Daemon {
    /// Spawns the daemon with `args`, its stdout and stderr appended to `log`. Does not wait.
    pub fn spawn(args: &[&str], log: &Path) -> io::Result<Daemon> {
        let file = File::options().create(true).append(true).open(log)?;
        let mut cmd = Command::new(daemon_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file));
        kill_with_parent_thread(&mut cmd);
        let child = cmd.spawn()?;
        let socket = args
            .iter()
            .position(|a| *a == "--socket")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from);
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
            socket,
        })
    }

    /// Spawns a server-mode daemon on `socket` with tap `tap` (plus `extra` flags), logging to
    /// `log`, and waits until it listens.
    ///
    /// # Panics
    /// If it exits or does not listen within 10 s (with its log in the message).
    pub fn start(socket: &Path, tap: &str, extra: &[&str], log: &Path) -> Daemon {
        Daemon::start_on(socket, ("--tap", tap), extra, log)
    }

    /// Like [`Daemon::start`], with the host port given as a flag and its value, e.g.
    /// `("--af-packet", "veth0")`.
    pub fn start_on(socket: &Path, host: (&str, &str), extra: &[&str], log: &Path) -> Daemon {
        let sock = socket.to_str().expect("utf-8 socket path");
        let mut args = vec!["--socket", sock, host.0, host.1];
        args.extend_from_slice(extra);
        let mut d = Daemon::spawn(&args, log)
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", daemon_bin()));
        if let Err(e) = d.wait_listening(Duration::from_secs(10)) {
            panic!(
                "daemon did not come up: {e}\n--- daemon log ---\n{}",
                d.log_text()
            );
        }
        d
    }

    /// Waits until the socket accepts connections. Does not connect to it (a connection would
    /// be a frontend session): a socket file appearing is the daemon's `bind`, and `listen`
    /// follows at once; callers retry `ECONNREFUSED` briefly.
    pub fn wait_listening(&mut self, timeout: Duration) -> io::Result<()> {
        let sock = self
            .socket
            .clone()
            .ok_or_else(|| io::Error::other("no --socket"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Err(io::Error::other(format!("daemon exited: {s}")));
            }
            if sock.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not appear", sock.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon printed so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        signal(self.pid(), sig)
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the exit for at most `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        wait_child(&mut self.child, timeout)
    }

    /// Panics (with the log) unless the daemon is still running.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(s)) = self.child.try_wait() {
            panic!(
                "daemon exited unexpectedly ({s}, signal {:?})\n--- daemon log ---\n{}",
                s.signal(),
                self.log_text()
            );
        }
    }

    /// CPU time the daemon has used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid()).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- vhost-pump log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// The index of interface `ifname` in the caller's namespace.
pub fn if_index(ifname: &str) -> io::Result<libc::c_int> {
    let name = CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::last_os_error());
    }
    libc::c_int::try_from(idx).map_err(io::Error::other)
}

/// `sll_pkttype` of a frame the kernel sent out of the interface.
pub const PACKET_OUTGOING: u8 = 4;

/// A raw AF_PACKET socket bound to one interface: sends whole Ethernet frames out of it, and
/// (when opened with [`PacketSocket::sniffer`]) receives every frame it sees.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: libc::c_int,
}

impl PacketSocket {
    fn open(ifname: &str, protocol: u16) -> io::Result<PacketSocket> {
        let ifindex = if_index(ifname)?;
        // SAFETY: socket takes plain integers; the returned fd is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(protocol.to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = protocol.to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a valid sockaddr_ll and the length matches it.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd, ifindex })
    }

    /// A send-only socket on `ifname` (protocol 0: it receives nothing).
    pub fn sender(ifname: &str) -> io::Result<PacketSocket> {
        Self::open(ifname, 0)
    }

    /// A socket on `ifname` that receives every frame (ETH_P_ALL), in both directions, with a
    /// large receive buffer.
    pub fn sniffer(ifname: &str) -> io::Result<PacketSocket> {
        let s = Self::open(ifname, libc::ETH_P_ALL as u16)?;
        let size: libc::c_int = 8 << 20;
        // SAFETY: SO_RCVBUFFORCE reads one int through the pointer, valid for the call.
        unsafe {
            libc::setsockopt(
                s.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        Ok(s)
    }

    /// The interface index the socket is bound to.
    pub fn ifindex(&self) -> libc::c_int {
        self.ifindex
    }

    /// The socket itself, for a caller that sets its own options and sends its own way.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends one Ethernet frame (header included) out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: the buffer is valid for reads of `frame.len()` bytes during the call.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                _ => return Err(e),
            }
        }
    }

    /// Receives one frame into `buf` within `timeout`: its length and `sll_pkttype`
    /// ([`PACKET_OUTGOING`] for frames the kernel sent), or `None` on timeout.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<(usize, u8)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Ok(None);
            }
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut alen = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is valid for writes of its length; `addr`/`alen` describe a
            // sockaddr_ll-sized buffer; all live for the call.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut addr as *mut libc::sockaddr_ll).cast(),
                    &mut alen,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                    _ => return Err(e),
                }
            }
            return Ok(Some((n as usize, addr.sll_pkttype)));
        }
    }
}

/// Ethertype for local experiments (IEEE 802 "local experimental ethertype 1").
pub const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;

/// An Ethernet frame `dst, src, ethertype, payload`, zero-padded to the 60-byte minimum.
pub fn ether_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len().max(46));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// An Ethernet + IPv4 + UDP frame of `frame_len` bytes (at least 60) with a correct IPv4 header
/// checksum and no UDP checksum. Varying the ports varies the flow hash (tap queue selection).
pub fn udp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    ips: ([u8; 4], [u8; 4]),
    ports: (u16, u16),
    frame_len: usize,
) -> Vec<u8> {
    let frame_len = frame_len.max(60);
    let ip_len = u16::try_from(frame_len - 14).expect("frame too long");
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&ips.0);
    ip[16..20].copy_from_slice(&ips.1);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut f = Vec::with_capacity(frame_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&ports.0.to_be_bytes());
    f.extend_from_slice(&ports.1.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    let mut i = 0u8;
    while f.len() < frame_len {
        f.push(i);
        i = i.wrapping_add(1);
    }
    f
}

/// A named network namespace (`ip netns add`), deleted on drop. Unlike [`in_new_netns`], any
/// number of processes can be started in it with [`NamedNetns::cmd`], from any thread.
pub struct NamedNetns(String);

impl NamedNetns {
    /// Creates `name` (replacing a leftover of an interrupted run) with `lo` up.
    pub fn create(name: &str) -> NamedNetns {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        let ns = NamedNetns(name.into());
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs `argv` inside the namespace.
    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(argv);
        c
    }

    /// Runs `argv` inside the namespace, panicking with its stderr on failure; returns stdout.
    pub fn exec(&self, argv: &[&str]) -> String {
        let out = self.cmd(argv).output().expect("spawn");
        assert!(
            out.status.success(),
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `argv` inside the namespace, killed when the returned value drops.
    pub fn spawn_quiet(&self, argv: &[&str]) -> KillOnDrop {
        KillOnDrop(
            self.cmd(argv)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{argv:?}: {e}")),
        )
    }

    /// Starts the daemon inside the namespace with `args` (which make it listen on `socket`),
    /// its stderr appended to `log`, and waits up to 10 s for the socket (a stale one is
    /// removed first). Killed when the returned value drops.
    pub fn spawn_daemon(&self, args: &[&str], socket: &Path, log: &Path) -> KillOnDrop {
        let _ = std::fs::remove_file(socket);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log");
        let mut argv = vec![daemon_bin()];
        argv.extend_from_slice(args);
        let child = KillOnDrop(
            self.cmd(&argv)
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .expect("spawn vhost-pump"),
        );
        assert!(
            wait_until(Duration::from_secs(10), || socket.exists()),
            "daemon did not create {}: {}",
            socket.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        child
    }

    /// A counter of an interface in the namespace (`/sys/class/net/IF/statistics/NAME`).
    pub fn if_counter(&self, ifname: &str, name: &str) -> u64 {
        self.exec(&["cat", &format!("/sys/class/net/{ifname}/statistics/{name}")])
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh, empty directory `name` under the integration tests' target tmp dir (kept after
/// the test for its logs).
pub fn target_workdir(name: &str) -> PathBuf {
    let d = crate::target_tmpdir().join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}
