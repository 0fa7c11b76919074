//! The vhost-pump sidecar of an attachment: found, launched detached from the plugin under a
//! small supervisor (this same binary, `vhost-pump-cni supervise SPEC`), waited for, and stopped.
//!
//! The supervisor runs in its own session with its output in the attachment's log. It starts
//! vhost-pump, applies the socket's owner and mode once the socket exists (server mode), then
//! writes vhost-pump's pid file: the pid file appearing is the plugin's signal that the daemon
//! is up. If vhost-pump dies during its first start, the supervisor exits with an error (ADD
//! reports it with the log's tail); later deaths are logged and the daemon is restarted with
//! backoff, so the socket comes back after a crash. vhost-pump gets SIGTERM if the supervisor
//! dies. Pids are only signalled after checking their command line, so a recycled pid is never
//! hit.
//!
//! A restart brings the socket back, but not a frontend that does not reconnect: QEMU under Kata
//! runtime-go gets a client chardev without `reconnect`, so once its connection is cut the guest
//! has no network until the pod is recreated. The supervisor counts restarts in a status file
//! (CHECK reads it) and, for such frontends, says so in the log at each restart.
//!
//! Once vhost-pump is up the supervisor sleeps in `sigwait` for SIGCHLD or a stop signal: an
//! idle attachment costs no wake-ups.
//!
//! The log usually lives under `/run`, in RAM, so its size is capped ([`LOG_LIMIT`]): vhost-pump's
//! stdout and stderr reach it through a pipe that a thread of the supervisor copies, counting
//! bytes, and the log is emptied once it grows past the limit. The copier sleeps in `read` while
//! the daemon is quiet, so the cap costs nothing on an idle attachment.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::config::{SocketPerms, VhostUserMode};
use super::error::{code, CniError};
use super::ipam::is_executable;
use super::state::{write_atomic, AttachmentPaths};

/// File name of the daemon.
pub const DAEMON_NAME: &str = "vhost-pump";
/// First argument that turns the plugin binary into a supervisor.
pub const SUPERVISE_ARG: &str = "supervise";
/// A daemon that lives this long in client mode has started.
const CLIENT_STARTUP: Duration = Duration::from_millis(700);
/// Server mode: how long the daemon has to create its socket before the supervisor gives up
/// on the first start.
const SERVER_STARTUP: Duration = Duration::from_secs(30);
/// The log is emptied when it grows past this (checked as the daemon's output is copied into
/// it, and at each restart).
pub const LOG_LIMIT: u64 = 8 << 20;
/// The copier looks at the log's size after every this many bytes.
const LOG_CHECK_EVERY: u64 = 64 << 10;

/// What the supervisor runs, written by the plugin next to the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// vhost-pump binary.
    pub daemon: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its pid file.
    pub pid_file: PathBuf,
    /// The socket.
    pub socket: PathBuf,
    /// Server or client.
    pub mode: VhostUserMode,
    /// Owner and mode applied to the socket in server mode.
    pub perms: SocketPerms,
    /// Whether the frontend reconnects after a restart (false for QEMU under Kata runtime-go).
    #[serde(default = "yes")]
    pub frontend_reconnects: bool,
    /// Where the supervisor records restarts.
    #[serde(default)]
    pub status_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

/// What the supervisor records about the daemon's life, for CHECK.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarStatus {
    /// Restarts after the first successful start.
    pub restarts: u32,
    /// How the daemon last ended, if it did.
    pub last_exit: Option<String>,
    /// When it was last (re)started, seconds since the epoch.
    pub last_start: u64,
}

impl SidecarStatus {
    /// Reads a status file; a missing or unreadable one reads as no restarts.
    pub fn load(path: &Path) -> SidecarStatus {
        fs::read(path)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }

    fn save(&self, path: &Path) {
        let data = serde_json::to_vec(self).unwrap_or_default();
        if let Err(e) = write_atomic(path, &data, 0o644) {
            say(format_args!("cannot write {}: {e}", path.display()));
        }
    }
}

/// Sidecar failures.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// No vhost-pump binary.
    #[error("{0}")]
    NotFound(String),
    /// The supervisor could not be started.
    #[error("cannot start the sidecar supervisor {exe}: {source}")]
    Spawn {
        /// The binary.
        exe: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// vhost-pump exited during its first start.
    #[error("vhost-pump exited during startup ({status}); log {log_path}:\n{log}")]
    Exited {
        /// The supervisor's exit status.
        status: ExitStatus,
        /// Log path.
        log_path: PathBuf,
        /// Last lines of the log.
        log: String,
    },
    /// It did not get ready in time.
    #[error("vhost-pump did not {what} within {timeout:?}; log {log_path}:\n{log}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The bound.
        timeout: Duration,
        /// Log path.
        log_path: PathBuf,
        /// Last lines of the log.
        log: String,
    },
    /// A file could not be written or changed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl From<SidecarError> for CniError {
    fn from(e: SidecarError) -> CniError {
        CniError::new(code::SIDECAR, e.to_string())
    }
}

/// Finds vhost-pump: `explicit` (the `vhostPumpPath` key), else next to this binary, else in
/// `CNI_PATH`, else in `PATH`.
pub fn find_daemon(explicit: Option<&Path>, cni_path: &[PathBuf]) -> Result<PathBuf, SidecarError> {
    if let Some(p) = explicit {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(SidecarError::NotFound(format!(
                "vhostPumpPath {} is not an executable file",
                p.display()
            )))
        };
    }
    let next_to_us = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let path = std::env::var_os("PATH").unwrap_or_default();
    next_to_us
        .into_iter()
        .chain(cni_path.iter().cloned())
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(DAEMON_NAME))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            SidecarError::NotFound(format!(
                "{DAEMON_NAME} binary not found next to the plugin, in CNI_PATH or in PATH; \
                 install it there or set vhostPumpPath"
            ))
        })
}

/// Starts the supervisor for `spec` (detached: own session, stdio on the log). Returns it as
/// our child so the caller can see it exit while waiting.
pub fn launch(spec: &SidecarSpec, paths: &AttachmentPaths) -> Result<Child, SidecarError> {
    let io_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| SidecarError::Io { what, path, source }
    };
    let data = serde_json::to_vec_pretty(spec).unwrap_or_default();
    write_atomic(&paths.sidecar_spec, &data, 0o600)
        .map_err(io_err("cannot write", &paths.sidecar_spec))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&paths.log)
        .map_err(io_err("cannot open", &paths.log))?;
    let log2 = log.try_clone().map_err(io_err("cannot open", &paths.log))?;
    let exe = std::env::current_exe().map_err(|source| SidecarError::Spawn {
        exe: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let mut cmd = Command::new(&exe);
    cmd.arg(SUPERVISE_ARG)
        .arg(&paths.sidecar_spec)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|source| SidecarError::Spawn { exe, source })?;
    write_atomic(
        &paths.supervisor_pid,
        format!("{}\n", child.id()).as_bytes(),
        0o644,
    )
    .map_err(io_err("cannot write", &paths.supervisor_pid))?;
    Ok(child)
}

/// Waits until the daemon is up (its pid file exists and, in server mode, the socket accepts a
/// connection), the supervisor exits (startup failed), or `timeout` passes.
pub fn wait_ready(
    supervisor: &mut Child,
    spec: &SidecarSpec,
    paths: &AttachmentPaths,
    timeout: Duration,
) -> Result<(), SidecarError> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = supervisor.try_wait() {
            return Err(SidecarError::Exited {
                status,
                log_path: paths.log.clone(),
                log: log_tail(&paths.log, 15),
            });
        }
        if paths.pid.exists() {
            match spec.mode {
                VhostUserMode::Client => return Ok(()),
                VhostUserMode::Server => {
                    if UnixStream::connect(&spec.socket).is_ok() {
                        return Ok(());
                    }
                }
            }
        }
        if start.elapsed() > timeout {
            return Err(SidecarError::Timeout {
                what: match spec.mode {
                    VhostUserMode::Server => "accept connections on its socket",
                    VhostUserMode::Client => "start",
                },
                timeout,
                log_path: paths.log.clone(),
                log: log_tail(&paths.log, 15),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Liveness of an attachment's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Supervisor pid, if running.
    pub supervisor: Option<u32>,
    /// vhost-pump pid, if running.
    pub daemon: Option<u32>,
}

/// Which of the attachment's processes run (`socket`: the attachment's socket path).
pub fn liveness(paths: &AttachmentPaths, socket: &Path) -> Liveness {
    let (sup, daemon) = needles(paths, socket);
    Liveness {
        supervisor: verified_pid(&paths.supervisor_pid, &sup),
        daemon: verified_pid(&paths.pid, &daemon),
    }
}

/// What the command lines of the supervisor and of vhost-pump contain: the supervisor's spec
/// file, and `--socket PATH` (a VMM's command line may name the socket too, never so).
fn needles(paths: &AttachmentPaths, socket: &Path) -> (String, String) {
    (
        format!("{SUPERVISE_ARG} {}", paths.sidecar_spec.display()),
        format!("--socket {}", socket.display()),
    )
}

/// Stops the supervisor (which stops vhost-pump) and, if it is still there, vhost-pump.
/// Best effort; a process already gone is fine.
pub fn stop(paths: &AttachmentPaths, socket: &Path, own_child: Option<&mut Child>) {
    // Without a pid file (a crash right after the start), look the processes up by the paths
    // their command lines carry, which are unique to this attachment.
    let (sup_needle, daemon_needle) = needles(paths, socket);
    let sup =
        verified_pid(&paths.supervisor_pid, &sup_needle).or_else(|| pid_by_cmdline(&sup_needle));
    let daemon =
        verified_pid(&paths.pid, &daemon_needle).or_else(|| pid_by_cmdline(&daemon_needle));
    if let Some(pid) = sup {
        terminate(pid, Duration::from_secs(3));
    }
    if let Some(child) = own_child {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Some(pid) = daemon {
        if alive(pid) {
            terminate(pid, Duration::from_secs(2));
        }
    }
    let _ = fs::remove_file(&paths.supervisor_pid);
    let _ = fs::remove_file(&paths.pid);
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
fn terminate(pid: u32, grace: Duration) {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a verified pid; no memory is passed.
    unsafe { libc::kill(p, libc::SIGTERM) };
    let t = Instant::now();
    while alive(pid) && t.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(10));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGKILL) };
        let t = Instant::now();
        while alive(pid) && t.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// True if `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Whether the command line of `pid` contains `needle` (arguments joined by spaces).
fn cmdline_has(pid: u32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        String::from_utf8_lossy(&c)
            .replace('\0', " ")
            .contains(needle)
    })
}

/// The pid in `pid_file` if that process runs and its command line contains `needle`.
fn verified_pid(pid_file: &Path, needle: &str) -> Option<u32> {
    let pid: u32 = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    (alive(pid) && cmdline_has(pid, needle)).then_some(pid)
}

/// A running process (not us) whose command line contains `needle`.
fn pid_by_cmdline(needle: &str) -> Option<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| *pid != me && alive(*pid) && cmdline_has(*pid, needle))
}

/// Applies owner, group and mode to `path`.
pub fn apply_perms(path: &Path, perms: &SocketPerms, mode: u32) -> io::Result<()> {
    if perms.uid.is_some() || perms.gid.is_some() {
        std::os::unix::fs::chown(path, perms.uid, perms.gid)?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// The mode of the socket directory in client mode: the socket mode plus search (and, so the
/// VMM can create its socket, write) rights for whoever may use the socket.
pub fn client_dir_mode(socket_mode: u32) -> u32 {
    let mut m = 0o700;
    if socket_mode & 0o060 != 0 {
        m |= 0o070;
    }
    if socket_mode & 0o006 != 0 {
        m |= 0o007;
    }
    m
}

/// The last `n` lines of `path`.
pub fn log_tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn say(msg: impl std::fmt::Display) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    eprintln!("[{t}] vhost-pump-cni supervisor: {msg}");
}

/// The supervisor's main loop; returns the process exit code.
pub fn supervise(spec_path: &Path) -> i32 {
    let spec: SidecarSpec = match fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|d| serde_json::from_slice(&d).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            say(format_args!("cannot read {}: {e}", spec_path.display()));
            return 1;
        }
    };
    // Stop signals and SIGCHLD arrive through one iterator: polled while the daemon starts,
    // waited on (no wake-ups) once it is up.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP, SIGCHLD]) {
        Ok(s) => s,
        Err(e) => {
            say(format_args!("cannot install signal handlers: {e}"));
            return 1;
        }
    };
    let stop = AtomicBool::new(false);
    let mut status = SidecarStatus::default();
    let mut first = true;
    let mut backoff = Duration::from_millis(200);
    loop {
        cut_log();
        let started = Instant::now();
        let mut cmd = Command::new(&spec.daemon);
        // Plain log lines in the log file.
        cmd.args(&spec.args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        // The daemon's output goes through us, so the log stays under its cap.
        let pipe = match output_pipe() {
            Ok((reader, writer)) => match writer.try_clone() {
                Ok(w2) => {
                    cmd.stdout(Stdio::from(w2)).stderr(Stdio::from(writer));
                    Some(reader)
                }
                Err(e) => {
                    say(format_args!("cannot set up the log pipe: {e}"));
                    None
                }
            },
            Err(e) => {
                say(format_args!("cannot set up the log pipe: {e}"));
                None
            }
        };
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no parent memory.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        // The command holds the pipe's write ends: without this the copier never sees the end.
        drop(cmd);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                say(format_args!("cannot start {}: {e}", spec.daemon.display()));
                if first {
                    return 1;
                }
                if sleep_unless(&mut signals, &stop, backoff) {
                    return 0;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let copier = pipe.and_then(|reader| LogCopier::start(reader, LOG_LIMIT));
        say(format_args!(
            "started {} (pid {})",
            spec.daemon.display(),
            child.id()
        ));
        status.last_start = unix_now();
        if let Some(f) = &spec.status_file {
            status.save(f);
        }
        let mut up = false;
        let exit = loop {
            for sig in signals.pending() {
                if sig != SIGCHLD {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            if stop.load(Ordering::Relaxed) {
                say("stopping");
                terminate(child.id(), Duration::from_secs(3));
                let _ = child.wait();
                if let Some(c) = copier {
                    c.finish();
                }
                let _ = fs::remove_file(&spec.pid_file);
                return 0;
            }
            if let Ok(Some(exit)) = child.try_wait() {
                break exit;
            }
            if up {
                // Up: sleep until a signal (SIGCHLD when the daemon ends, or a stop).
                if let Some(sig) = signals.wait().next() {
                    if sig != SIGCHLD {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                continue;
            }
            up = match spec.mode {
                VhostUserMode::Server => spec.socket.exists(),
                VhostUserMode::Client => started.elapsed() >= CLIENT_STARTUP,
            };
            if up {
                if spec.mode == VhostUserMode::Server {
                    if let Err(e) = apply_perms(&spec.socket, &spec.perms, spec.perms.mode) {
                        say(format_args!(
                            "cannot set owner/mode of {}: {e}",
                            spec.socket.display()
                        ));
                    }
                }
                let pid = format!("{}\n", child.id());
                if let Err(e) = write_atomic(&spec.pid_file, pid.as_bytes(), 0o644) {
                    say(format_args!(
                        "cannot write {}: {e}",
                        spec.pid_file.display()
                    ));
                }
                continue;
            }
            if first && started.elapsed() > SERVER_STARTUP {
                say("vhost-pump never created its socket; giving up");
                terminate(child.id(), Duration::from_secs(3));
                let _ = child.wait();
                if let Some(c) = copier {
                    c.finish();
                }
                return 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Everything the daemon wrote is in the log before we say it ended (ADD quotes the
        // log's tail when the first start fails).
        if let Some(c) = copier {
            c.finish();
        }
        let _ = fs::remove_file(&spec.pid_file);
        say(format_args!("vhost-pump exited: {exit}"));
        if first && !up {
            return 1;
        }
        first = false;
        status.restarts = status.restarts.saturating_add(1);
        status.last_exit = Some(exit.to_string());
        if let Some(f) = &spec.status_file {
            status.save(f);
        }
        if !spec.frontend_reconnects {
            say(format_args!(
                "ERROR: the frontend of {} does not reconnect (QEMU under Kata runtime-go has no \
                 chardev reconnect): if a VM was connected, its network is gone until the pod is \
                 recreated; the restarted vhost-pump serves only new VMs",
                spec.socket.display()
            ));
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        say(format_args!("restarting in {backoff:?}"));
        if sleep_unless(&mut signals, &stop, backoff) {
            return 0;
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sleeps `d` unless a stop signal comes; true if one did (or had).
fn sleep_unless(signals: &mut Signals, stop: &AtomicBool, d: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < d {
        if signals.pending().any(|s| s != SIGCHLD) {
            stop.store(true, Ordering::Relaxed);
        }
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.load(Ordering::Relaxed)
}

/// Empties our stderr (the attachment log, opened for appending) once it is too large.
fn cut_log() {
    if let Some(log) = log_file() {
        cut_if_over(&log, LOG_LIMIT);
    }
}

/// Our stderr as a file, if it is a regular file (the attachment log).
fn log_file() -> Option<File> {
    use std::os::fd::AsFd;
    let fd = io::stderr().as_fd().try_clone_to_owned().ok()?;
    let f = File::from(fd);
    f.metadata().is_ok_and(|m| m.is_file()).then_some(f)
}

/// Empties `log` if it is larger than `limit` bytes; returns the size it had if it did. Safe
/// while others append to it: writes with `O_APPEND` continue at the new end.
fn cut_if_over(log: &File, limit: u64) -> Option<u64> {
    let len = log.metadata().ok()?.len();
    if len <= limit {
        return None;
    }
    log.set_len(0).ok()?;
    Some(len)
}

/// A pipe for the daemon's output: (read end, write end), both close-on-exec (the command
/// makes its copy of the write end the daemon's stdout and stderr).
fn output_pipe() -> io::Result<(File, std::os::fd::OwnedFd)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(r), w))
}

/// Copies `from` into `log` until the end of `from`, emptying `log` whenever a check (every
/// [`LOG_CHECK_EVERY`] bytes) finds it larger than `limit`: the log then never grows much past
/// `limit + LOG_CHECK_EVERY`. Output that cannot be written (a full disk) is dropped, so the
/// writer never blocks on the log. Returns the number of times the log was emptied.
fn copy_capped(mut from: impl Read, log: &File, limit: u64) -> u64 {
    use std::io::Write;
    let mut buf = vec![0u8; 16 << 10];
    let (mut since_check, mut cuts) = (0u64, 0u64);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return cuts,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return cuts,
        };
        let _ = (&*log).write_all(&buf[..n]);
        since_check += n as u64;
        if since_check >= LOG_CHECK_EVERY {
            since_check = 0;
            if let Some(len) = cut_if_over(log, limit) {
                cuts += 1;
                let note = format!(
                    "[{}] vhost-pump-cni supervisor: log emptied at {len} bytes (limit {limit})\n",
                    unix_now()
                );
                let _ = (&*log).write_all(note.as_bytes());
            }
        }
    }
}

/// The thread copying the daemon's output into the log.
struct LogCopier(std::thread::JoinHandle<()>);

impl LogCopier {
    /// Starts copying `from` into our stderr; none if stderr is not a log file (then the
    /// daemon's output is dropped rather than left to block the daemon) or no thread starts.
    fn start(from: File, limit: u64) -> Option<LogCopier> {
        let log = log_file().or_else(|| {
            say("stderr is not a file; the daemon's output is not kept");
            None
        });
        std::thread::Builder::new()
            .name("log".into())
            .spawn(move || match log {
                Some(log) => {
                    copy_capped(from, &log, limit);
                }
                None => {
                    let _ = io::copy(&mut &from, &mut io::sink());
                }
            })
            .map(LogCopier)
            .map_err(|e| say(format_args!("cannot start the log copier: {e}")))
            .ok()
    }

    /// Waits (at most 2 s: a process the daemon left behind may hold the pipe) until
    /// everything the daemon wrote is in the log.
    fn finish(self) {
        let t = Instant::now();
        while !self.0.is_finished() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.0.is_finished() {
            let _ = self.0.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_dir_modes() {
        assert_eq!(client_dir_mode(0o600), 0o700);
        assert_eq!(client_dir_mode(0o660), 0o770);
        assert_eq!(client_dir_mode(0o666), 0o777);
    }

    #[test]
    fn log_is_emptied_past_the_limit_and_keeps_growing_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let limit = 256 << 10;
        // 3 MiB of output, read in small pieces as from a pipe.
        let out = io::repeat(b'x').take(3 << 20);
        let mut max = 0;
        let reader = std::io::BufReader::with_capacity(4096, out);
        struct Watch<'a, R>(R, &'a Path, &'a mut u64);
        impl<R: Read> Read for Watch<'_, R> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                *self.2 = (*self.2).max(fs::metadata(self.1).unwrap().len());
                self.0.read(b)
            }
        }
        let cuts = copy_capped(Watch(reader, &path, &mut max), &log, limit);
        let len = fs::metadata(&path).unwrap().len();
        assert!(cuts >= 8, "emptied {cuts} times");
        assert!(
            max <= limit + LOG_CHECK_EVERY + 200,
            "log reached {max} bytes"
        );
        assert!(len > 0 && len <= limit + LOG_CHECK_EVERY + 200, "{len}");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("log emptied at"), "no note in the log");
        // Nothing below the limit is touched.
        let small = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("small"))
            .unwrap();
        assert_eq!(copy_capped(&b"hello\n"[..], &small, limit), 0);
        assert_eq!(cut_if_over(&small, 6), None);
        assert_eq!(cut_if_over(&small, 5), Some(6));
        assert_eq!(small.metadata().unwrap().len(), 0);
    }

    #[test]
    fn liveness_checks() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
    }
}
