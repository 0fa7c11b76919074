//! The vhost-user side of the daemon: owns the socket (server or client mode) and serves one
//! frontend at a time, forever, so the process outlives VM restarts.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_net_backend::NetBackend;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::relay;

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
    /// The vhost-user library refused to start a session.
    #[error("vhost-user session setup failed: {0}")]
    Session(String),
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

/// Lets another thread stop a serving loop and see whether a frontend is connected.
#[derive(Default)]
pub struct ServeControl {
    stopped: AtomicBool,
    active: Mutex<Option<UnixStream>>,
}

impl ServeControl {
    /// Asks the loop to end and cuts the current session. A server loop blocked in `accept`
    /// also needs its listener shut down (see [`crate::ports`]).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
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

    fn set_active(&self, s: Option<UnixStream>) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
}

/// Serves frontends that connect to `listener`, one after the other, until stopped.
pub fn serve_listener(listener: &UnixListener, backend: &Arc<NetBackend>, ctl: &ServeControl) {
    while !ctl.is_stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                if ctl.is_stopped() {
                    break;
                }
                tracing::info!("frontend connected");
                end_session(serve_connection(stream, backend, ctl));
            }
            Err(_) if ctl.is_stopped() => break,
            Err(e) => {
                tracing::error!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Connects to `path` (the frontend is the server), waiting for it to appear, and reconnects
/// with backoff after every session, until stopped.
pub fn serve_client(path: &Path, backend: &Arc<NetBackend>, ctl: &ServeControl) {
    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);
    let mut backoff = MIN;
    let mut waiting_logged = false;
    while !ctl.is_stopped() {
        match UnixStream::connect(path) {
            Ok(stream) => {
                tracing::info!(socket = %path.display(), "connected to frontend");
                backoff = MIN;
                waiting_logged = false;
                end_session(serve_connection(stream, backend, ctl));
            }
            Err(e) => {
                if !waiting_logged {
                    tracing::info!(socket = %path.display(), error = %e, "waiting for the frontend socket");
                    waiting_logged = true;
                }
                // Sleep in small steps so a stop request is seen quickly.
                let until = std::time::Instant::now() + backoff;
                while std::time::Instant::now() < until && !ctl.is_stopped() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                backoff = (backoff * 2).min(MAX);
            }
        }
    }
}

fn end_session(r: Result<(), ServerError>) {
    match r {
        Ok(()) => tracing::info!("frontend disconnected"),
        Err(e) => tracing::warn!(error = %e, "session ended"),
    }
}

/// A listener on a private abstract socket and a stream connected to it: how the relay hands a
/// connection to the library's request handler.
fn private_pair() -> io::Result<(Listener, UnixStream)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    use std::os::linux::net::SocketAddrExt;
    let name = format!(
        "vhost-pump/{}/{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let stream = UnixStream::connect_addr(&addr)?;
    Ok((Listener::from(listener), stream))
}

/// Logs the device's counters (cumulative over sessions), one line per queue pair.
fn log_counters(backend: &NetBackend) {
    use std::sync::atomic::Ordering::Relaxed;
    for (pair, q) in backend.stats().iter().enumerate() {
        tracing::info!(
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

/// Serves one frontend connection until it ends.
pub fn serve_connection(
    frontend: UnixStream,
    backend: &Arc<NetBackend>,
    ctl: &ServeControl,
) -> Result<(), ServerError> {
    backend.reset();
    ctl.set_active(frontend.try_clone().ok());
    let result = serve_session(frontend, backend);
    ctl.set_active(None);
    result
}

fn serve_session(frontend: UnixStream, backend: &Arc<NetBackend>) -> Result<(), ServerError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("vhost-pump".into(), backend.clone(), mem)
        .map_err(|e| ServerError::Session(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    backend
        .register_host_queues(&handlers)
        .map_err(|e| ServerError::Session(e.to_string()))?;
    let (mut listener, to_handler) =
        private_pair().map_err(|e| ServerError::Session(e.to_string()))?;
    daemon
        .start(&mut listener)
        .map_err(|e| ServerError::Session(e.to_string()))?;
    drop(listener);
    let relayed = relay::run(frontend, to_handler);
    let waited = daemon.wait();
    for h in &handlers {
        h.send_exit_event();
    }
    if let Err(e) = waited {
        tracing::debug!(error = %e, "request handler ended");
    }
    log_counters(backend);
    relayed.map_err(|e| ServerError::Session(e.to_string()))
}
