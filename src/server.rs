//! The vhost-user side of the daemon: owns the socket (server or client mode) and serves one
//! frontend at a time, forever, so the process outlives VM restarts.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vhost_net_backend::NetBackend;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::handoff::{Handoff, HandoffError};
use crate::relay::{self, RelayError};

/// Errors of the vhost-user socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process is serving this socket.
    #[error("socket {0} is in use by another process (a live listener answered)")]
    Busy(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Filesystem or socket error.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A thread of the session (or of the control socket) could not be started.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// The thread's name.
        name: String,
        /// Cause.
        source: io::Error,
    },
    /// A thread of the session panicked.
    #[error("the {0} thread panicked")]
    ThreadPanicked(String),
    /// The vhost-user library refused to set up a session. Its message only: the library's
    /// error type is not `Sync` (it can carry a thread's panic payload).
    #[error("vhost-user session setup failed: {0}")]
    Daemon(String),
    /// The device could not register its host queues with the session's workers.
    #[error("vhost-user session setup failed: {0}")]
    Device(#[source] vhost_net_backend::BackendError),
    /// The request handler's thread could not restrict itself (fail closed).
    #[error("the request handler thread could not restrict itself")]
    HandlerNotRestricted,
    /// The private channel to the request handler failed.
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    /// The relay ended the session.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// The descriptor given with `--fd` is not a listening Unix stream socket.
    #[error("file descriptor {fd} is not a listening Unix stream socket: {reason}")]
    NotAListener {
        /// The descriptor number.
        fd: i32,
        /// What is wrong with it.
        reason: String,
    },
    /// A session thread could not restrict itself, so the session was not served.
    #[error("session not served: {0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// Reads an integer socket option of `fd`.
fn sockopt_int(fd: i32, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given; a bad fd is an error.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes over `fd`, a listening Unix stream socket inherited from whoever started the daemon
/// (`--fd`: systemd socket activation, libvirt), after checking that it is one. Returns it
/// with the path it is bound to (`@name` for an abstract socket, `fd:N` for an unnamed one),
/// which names the port in logs and stats.
pub fn adopt_listener(fd: i32) -> Result<(UnixListener, PathBuf), ServerError> {
    let bad = |reason: String| ServerError::NotAListener { fd, reason };
    let opt = |name, what: &str| {
        sockopt_int(fd, libc::SOL_SOCKET, name).map_err(|e| bad(format!("{what}: {e}")))
    };
    // SAFETY: F_GETFD on any integer only reads the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    // SAFETY: fstat writes one stat into `st`, which we own; zeroed is a valid stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket".into()));
    }
    if opt(libc::SO_DOMAIN, "SO_DOMAIN")? != libc::AF_UNIX {
        return Err(bad("not a Unix socket".into()));
    }
    if opt(libc::SO_TYPE, "SO_TYPE")? != libc::SOCK_STREAM {
        return Err(bad("not a stream socket".into()));
    }
    if opt(libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? == 0 {
        return Err(bad("not listening".into()));
    }
    // SAFETY: F_SETFD only changes the close-on-exec flag of a descriptor checked above.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is an open listening Unix stream socket (checked above) that the
    // command line hands to this process to own.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    let path = match listener.local_addr() {
        Ok(a) => match (
            a.as_pathname(),
            std::os::linux::net::SocketAddrExt::as_abstract_name(&a),
        ) {
            (Some(p), _) => p.to_path_buf(),
            (None, Some(name)) => PathBuf::from(format!("@{}", String::from_utf8_lossy(name))),
            (None, None) => PathBuf::from(format!("fd:{fd}")),
        },
        Err(_) => PathBuf::from(format!("fd:{fd}")),
    };
    Ok((listener, path))
}

/// Fails when a live listener answers at `path` or a non-socket sits there; a stale socket or
/// nothing at all is fine. Lets a daemon refuse a busy socket before it touches anything else.
pub fn check_free(path: &Path) -> Result<(), ServerError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => Err(ServerError::Busy(path.to_path_buf())),
            Err(_) => Ok(()),
        },
        Ok(_) => Err(ServerError::NotASocket(path.to_path_buf())),
        Err(_) => Ok(()),
    }
}

/// Binds the server socket at `path`: creates parent directories, replaces a stale socket file,
/// refuses a live one or a non-socket.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let io_err = |what, source| ServerError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_err("cannot create directory for", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::Busy(path.to_path_buf())),
            Err(_) => {
                tracing::info!(socket = %path.display(), "replacing stale socket");
                std::fs::remove_file(path).map_err(|e| io_err("cannot remove stale socket", e))?;
            }
        },
        Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect", e)),
    }
    UnixListener::bind(path).map_err(|e| io_err("cannot listen on", e))
}

/// Session events of one port, counted since the port started.
#[derive(Debug, Default)]
pub struct SessionCounters {
    started: AtomicU64,
    refused_peers: AtomicU64,
    stalled_frontends: AtomicU64,
    fd_budget_exceeded: AtomicU64,
    memory_faults: AtomicU64,
    refused_requests: AtomicU64,
}

/// [`SessionCounters`] as numbers (`ctl stats`, metrics).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionStats {
    /// Frontend sessions started.
    pub started: u64,
    /// Connections on the private request-handler channel that did not come from this
    /// process, refused.
    pub refused_peers: u64,
    /// Frontends disconnected because they stopped reading their replies.
    pub stalled_frontends: u64,
    /// Sessions ended for handing over more file descriptors than their budget.
    pub fd_budget_exceeded: u64,
    /// Sessions ended because their guest memory vanished under an access (SIGBUS: a memory
    /// file shrunk after it was handed over).
    #[serde(default)]
    pub memory_faults: u64,
    /// Sessions ended because the relay refused a malformed or out-of-bounds request (e.g. a
    /// dirty log outside its file, a ring size that is not a power of two).
    #[serde(default)]
    pub refused_requests: u64,
}

impl SessionStats {
    /// The counters as (name, help, value), in a fixed order.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 6] {
        [
            ("started", "Frontend sessions started.", self.started),
            (
                "refused_peers",
                "Connections from other processes refused on the private request-handler channel.",
                self.refused_peers,
            ),
            (
                "stalled_frontends",
                "Frontends disconnected for not reading their replies.",
                self.stalled_frontends,
            ),
            (
                "fd_budget_exceeded",
                "Sessions ended for handing over more file descriptors than their budget.",
                self.fd_budget_exceeded,
            ),
            (
                "memory_faults",
                "Sessions ended because their guest memory vanished under an access.",
                self.memory_faults,
            ),
            (
                "refused_requests",
                "Sessions ended because the relay refused a malformed request.",
                self.refused_requests,
            ),
        ]
    }
}

impl SessionCounters {
    /// The current values.
    pub fn snapshot(&self) -> SessionStats {
        SessionStats {
            started: self.started.load(Ordering::Relaxed),
            refused_peers: self.refused_peers.load(Ordering::Relaxed),
            stalled_frontends: self.stalled_frontends.load(Ordering::Relaxed),
            fd_budget_exceeded: self.fd_budget_exceeded.load(Ordering::Relaxed),
            memory_faults: self.memory_faults.load(Ordering::Relaxed),
            refused_requests: self.refused_requests.load(Ordering::Relaxed),
        }
    }

    fn count_end(&self, r: &Result<(), ServerError>) {
        let counter = match r {
            Err(ServerError::Relay(RelayError::FrontendStalled(_))) => &self.stalled_frontends,
            Err(ServerError::Relay(RelayError::FdBudget { .. })) => &self.fd_budget_exceeded,
            Err(ServerError::Relay(RelayError::Protocol(_))) => &self.refused_requests,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lets another thread stop a serving loop and see whether a frontend is connected.
pub struct ServeControl {
    stopped: AtomicBool,
    /// Wakes a server loop waiting for a frontend. The listener itself is never shut down to
    /// wake it: an inherited listener (`--fd`) is shared with whoever handed it over (systemd
    /// keeps listening on it for the next activation).
    wake: Option<EventFd>,
    active: Mutex<Option<UnixStream>>,
    counters: SessionCounters,
    log: Mutex<SessionLog>,
}

impl Default for ServeControl {
    fn default() -> Self {
        ServeControl {
            stopped: AtomicBool::new(false),
            // Without it (no eventfd left) the loop looks at the stop flag a few times a second.
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).ok(),
            active: Mutex::default(),
            counters: SessionCounters::default(),
            log: Mutex::default(),
        }
    }
}

impl ServeControl {
    /// Asks the loop to end, wakes it if it waits for a frontend and cuts the current session.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(w) = &self.wake {
            let _ = w.write(1);
        }
        if let Some(s) = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// True once [`ServeControl::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// True while a frontend session is up.
    pub fn connected(&self) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The port's session counters.
    pub fn counters(&self) -> &SessionCounters {
        &self.counters
    }

    fn set_active(&self, s: Option<UnixStream>) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Sleeps for `d`, in small steps so that a stop request is seen quickly.
    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.is_stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    /// Whether the session starting now may log its info lines (see [`SessionLog`]).
    fn admit_session_log(&self) -> bool {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now())
    }
}

/// Sessions whose lines are logged in each [`SESSION_LOG_WINDOW`]; later ones log at debug.
const SESSION_LOG_BURST: u32 = 5;
/// See [`SESSION_LOG_BURST`].
const SESSION_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Keeps the lines sessions log bounded whatever a peer does: in each window, the first
/// [`SESSION_LOG_BURST`] sessions log as usual, later ones only at debug level, and the next
/// window starts with one line counting them.
#[derive(Debug, Default)]
struct SessionLog {
    window: Option<Instant>,
    logged: u32,
    quiet: u64,
}

impl SessionLog {
    /// Called as a session starts: true when its lines are logged.
    fn admit(&mut self, now: Instant) -> bool {
        let expired = self
            .window
            .is_none_or(|start| now.duration_since(start) >= SESSION_LOG_WINDOW);
        if expired {
            if self.quiet > 0 {
                tracing::info!(
                    sessions = self.quiet,
                    window_s = SESSION_LOG_WINDOW.as_secs(),
                    "more sessions than the log allows; their lines went to debug level"
                );
            }
            *self = SessionLog {
                window: Some(now),
                logged: 0,
                quiet: 0,
            };
        }
        if self.logged < SESSION_LOG_BURST {
            self.logged += 1;
            true
        } else {
            self.quiet += 1;
            false
        }
    }
}

/// An info line of a session, or a debug line when its logging is rate-limited.
macro_rules! session_info {
    ($verbose:expr, $($arg:tt)+) => {
        if $verbose {
            tracing::info!($($arg)+)
        } else {
            tracing::debug!($($arg)+)
        }
    };
}

/// The wait before reconnecting in client mode.
#[derive(Debug)]
struct Reconnect {
    delay: Duration,
}

impl Reconnect {
    /// First wait after a short session or a failed connection.
    const MIN: Duration = Duration::from_millis(50);
    /// Longest wait.
    const MAX: Duration = Duration::from_secs(3);
    /// Sessions at least this long reconnect at once and reset the wait.
    const LONG_SESSION: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Reconnect { delay: Self::MIN }
    }

    /// The wait after a connection attempt failed; the next one doubles.
    fn after_failed_connect(&mut self) -> Duration {
        let d = self.delay;
        self.delay = (self.delay * 2).min(Self::MAX);
        d
    }

    /// The wait after a session that lasted `lasted`: none after a long one, else as after a
    /// failed attempt, so a peer that closes at once cannot make the loop spin.
    fn after_session(&mut self, lasted: Duration) -> Duration {
        if lasted >= Self::LONG_SESSION {
            self.delay = Self::MIN;
            Duration::ZERO
        } else {
            self.after_failed_connect()
        }
    }
}

/// Waits until `listener` has a connection to accept (true) or the loop is asked to stop.
fn wait_for_frontend(listener: &UnixListener, ctl: &ServeControl) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: ctl.wake.as_ref().map_or(-1, |w| w.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let timeout = if ctl.wake.is_some() { -1 } else { 200 };
    // SAFETY: `fds` is an array of two pollfd we own, and its length is passed; poll ignores
    // the entry whose fd is -1.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
    n > 0 && fds[0].revents != 0 && !ctl.is_stopped()
}

/// Serves frontends that connect to `listener`, one after the other, until stopped, handing
/// each to a request handler over `handoff`.
pub fn serve_listener(
    listener: &UnixListener,
    backend: &Arc<NetBackend>,
    handoff: &Handoff,
    ctl: &ServeControl,
) {
    while !ctl.is_stopped() {
        if !wait_for_frontend(listener, ctl) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if ctl.is_stopped() {
                    break;
                }
                let verbose = ctl.admit_session_log();
                session_info!(verbose, "frontend connected");
                serve_connection(stream, backend, handoff, ctl, verbose);
            }
            Err(_) if ctl.is_stopped() => break,
            // Someone else sharing the listener took the connection first.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::error!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Connects to one fixed socket path on request, from a thread of its own that keeps the
/// daemon's identity and privileges (it is never sandboxed). The sandboxed port thread of a
/// client-mode port asks it for each connection to the VMM's socket; the path is fixed when the
/// dialer starts, so a port thread can only ever get connections to its own VMM.
#[derive(Debug)]
pub struct Dialer {
    requests: std::sync::mpsc::Sender<std::sync::mpsc::SyncSender<io::Result<UnixStream>>>,
}

impl Dialer {
    /// Starts the dialer thread for `path`; it ends when the `Dialer` is dropped.
    pub fn spawn(port: &str, path: PathBuf) -> io::Result<Dialer> {
        let (tx, rx) =
            std::sync::mpsc::channel::<std::sync::mpsc::SyncSender<io::Result<UnixStream>>>();
        std::thread::Builder::new()
            .name(format!("dial-{port}"))
            .spawn(move || {
                while let Ok(reply) = rx.recv() {
                    let _ = reply.send(UnixStream::connect(&path));
                }
            })?;
        Ok(Dialer { requests: tx })
    }

    /// Connects to the dialer's path.
    pub fn connect(&self) -> io::Result<UnixStream> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.requests
            .send(tx)
            .map_err(|_| io::Error::other("the dialer thread is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("the dialer thread is gone"))?
    }
}

/// Connects to `path` through `dialer` (the frontend is the server), waiting for it to appear,
/// and reconnects until stopped: at once after a session of a second or more, after a growing
/// wait (up to a few seconds) after shorter ones and failed attempts.
pub fn serve_client(
    path: &Path,
    dialer: &Dialer,
    backend: &Arc<NetBackend>,
    handoff: &Handoff,
    ctl: &ServeControl,
) {
    let mut reconnect = Reconnect::new();
    let mut waiting_logged = false;
    while !ctl.is_stopped() {
        let wait = match dialer.connect() {
            Ok(stream) => {
                waiting_logged = false;
                let verbose = ctl.admit_session_log();
                session_info!(verbose, socket = %path.display(), "connected to frontend");
                let began = Instant::now();
                serve_connection(stream, backend, handoff, ctl, verbose);
                reconnect.after_session(began.elapsed())
            }
            Err(e) => {
                if !waiting_logged {
                    tracing::info!(socket = %path.display(), error = %e, "waiting for the frontend socket");
                    waiting_logged = true;
                }
                reconnect.after_failed_connect()
            }
        };
        ctl.sleep(wait);
    }
}

/// Logs the device's counters (cumulative over sessions), one line per queue pair.
fn log_counters(backend: &NetBackend, verbose: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    for (pair, q) in backend.stats().iter().enumerate() {
        session_info!(
            verbose,
            pair,
            rx_frames = q.rx.frames.load(Relaxed),
            rx_bytes = q.rx.bytes.load(Relaxed),
            rx_drops = q.rx.total_drops(),
            tx_frames = q.tx.frames.load(Relaxed),
            tx_bytes = q.tx.bytes.load(Relaxed),
            tx_drops = q.tx.total_drops(),
            "counters"
        );
    }
}

/// Serves one frontend connection until it ends, logging how it ended (at debug level unless
/// `verbose`) and counting what the session did wrong.
pub fn serve_connection(
    frontend: UnixStream,
    backend: &Arc<NetBackend>,
    handoff: &Handoff,
    ctl: &ServeControl,
    verbose: bool,
) {
    backend.reset();
    backend.set_session_logging(verbose);
    ctl.counters.started.fetch_add(1, Ordering::Relaxed);
    ctl.set_active(frontend.try_clone().ok());
    // A guest memory fault (SIGBUS) during the session shuts this socket down: the session
    // ends, the process and the other ports go on. The scope holds its own descriptor of the
    // socket, so the number it shuts down is never reused while it is registered.
    let fault_sock = frontend.try_clone().ok();
    let scope = fault_sock
        .as_ref()
        .map(|s| vhost_net_backend::sigbus::FaultScope::new(s.as_raw_fd()));
    backend.set_fault_scope(scope.as_ref());
    let refused_before = handoff.refused();
    let result = serve_session(frontend, backend, handoff, verbose);
    ctl.set_active(None);
    // Release what the session left with the device (guest memory and its descriptors, the
    // rings' eventfds) now rather than when the next frontend comes.
    backend.reset();
    // The guest memory is unmapped: its ranges can be forgotten.
    backend.set_fault_scope(None);
    let faulted = scope.as_ref().map_or(0, |s| s.faults());
    drop(scope);
    drop(fault_sock);
    if faulted > 0 {
        ctl.counters.memory_faults.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            faults = faulted,
            "guest memory vanished under the session (a memory file shrunk after it was handed \
             over?); session ended"
        );
    }
    ctl.counters.refused_peers.fetch_add(
        handoff.refused().saturating_sub(refused_before),
        Ordering::Relaxed,
    );
    ctl.counters.count_end(&result);
    match result {
        Ok(()) => session_info!(verbose, "frontend disconnected"),
        Err(e) if verbose => tracing::warn!(error = %e, "session ended"),
        Err(e) => tracing::debug!(error = %e, "session ended"),
    }
}

/// Stops a started request handler and the vring workers when a session ends, however it ends.
struct Running<'a> {
    daemon: &'a mut VhostUserDaemon<Arc<NetBackend>>,
    handlers: Vec<Arc<vhost_user_backend::VringEpollHandler<Arc<NetBackend>>>>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // Unblocks a handler that is still connected (a failed setup); harmless otherwise.
        self.daemon.request_shutdown();
        if let Err(e) = self.daemon.wait() {
            tracing::debug!(error = %e, "request handler ended");
        }
        for h in &self.handlers {
            h.send_exit_event();
        }
    }
}

/// Runs `f` on a new thread that first stacks the sandbox's socket-less filter
/// ([`crate::sandbox::harden`]); threads `f` spawns inherit it.
fn on_hardened_thread<T: Send>(
    name: &str,
    f: impl FnOnce() -> Result<T, ServerError> + Send,
) -> Result<T, ServerError> {
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(s, || {
                crate::sandbox::harden()?;
                f()
            })
            .map_err(|source| ServerError::Thread {
                name: name.into(),
                source,
            })?;
        t.join()
            .unwrap_or_else(|_| Err(ServerError::ThreadPanicked(name.into())))
    })
}

fn serve_session(
    frontend: UnixStream,
    backend: &Arc<NetBackend>,
    handoff: &Handoff,
    verbose: bool,
) -> Result<(), ServerError> {
    // Built on a hardened thread: the vring workers it spawns (which read descriptor chains)
    // inherit the socket-less filter.
    let mut daemon = on_hardened_thread("vu-session", || {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        VhostUserDaemon::new("vhost-pump".into(), backend.clone(), mem)
            .map_err(|e| ServerError::Daemon(e.to_string()))
    })?;
    let handlers = daemon.get_epoll_handlers();
    let running = Running {
        daemon: &mut daemon,
        handlers,
    };
    backend
        .register_host_queues(&running.handlers)
        .map_err(ServerError::Device)?;
    // The request handler connects from this (port) thread, the only one allowed to.
    let to_handler = handoff
        .connect_handler(|path| running.daemon.start_client(path).map_err(|e| e.to_string()))?;
    let limits = relay::Limits::for_queue_pairs(backend.config().queue_pairs);
    let relayed = on_hardened_thread("vu-relay", || {
        // The handler thread restricts itself while it answers this, before any frontend
        // message reaches it.
        if relay::probe_handler(&to_handler, limits.handler_send_timeout)? == 0 {
            return Err(ServerError::HandlerNotRestricted);
        }
        let announce = |mac: [u8; 6]| match backend.announce(mac) {
            Ok(how) => session_info!(
                verbose,
                mac = %vhost_net_backend::MacAddr(mac),
                outcome = how.as_str(),
                "guest announced after migration (SEND_RARP)"
            ),
            Err(e) => tracing::warn!(
                mac = %vhost_net_backend::MacAddr(mac),
                error = %e,
                "guest announcement (SEND_RARP) not sent"
            ),
        };
        Ok(relay::run_with(
            frontend, to_handler, &limits, !verbose, &announce,
        )?)
    });
    drop(running);
    log_counters(backend, verbose);
    relayed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sessions_back_off_and_long_ones_reset() {
        let mut r = Reconnect::new();
        let waits: Vec<Duration> = (0..8)
            .map(|_| r.after_session(Duration::from_millis(10)))
            .collect();
        assert_eq!(waits[0], Reconnect::MIN);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), Reconnect::MAX);
        // What a peer closing at once gets in 3 s: a handful of sessions, not thousands.
        let mut r = Reconnect::new();
        let (mut t, mut sessions) = (Duration::ZERO, 0);
        while t < Duration::from_secs(3) {
            t += r.after_session(Duration::ZERO);
            sessions += 1;
        }
        assert!(sessions < 10, "{sessions}");
        // A real session reconnects at once and starts over.
        assert_eq!(r.after_session(Duration::from_secs(5)), Duration::ZERO);
        assert_eq!(r.after_failed_connect(), Reconnect::MIN);
    }

    #[test]
    fn session_log_admits_a_burst_per_window() {
        let mut log = SessionLog::default();
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| log.admit(t0)).count();
        assert_eq!(admitted, SESSION_LOG_BURST as usize);
        assert_eq!(log.quiet, 100 - u64::from(SESSION_LOG_BURST));
        // The next window starts over (after the summary line).
        assert!(log.admit(t0 + SESSION_LOG_WINDOW));
        assert_eq!(log.quiet, 0);
    }
}
