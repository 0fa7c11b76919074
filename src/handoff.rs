//! The private channel between the relay and the `vhost` crate's request handler.
//!
//! `VhostUserDaemon` (vhost-user-backend 0.24) only runs a connection it makes or accepts
//! itself: `start` accepts the first pending connection of a `Listener`, `start_client`
//! connects to a path. `BackendReqHandler::from_stream` would take a socketpair, but the daemon
//! has no public way to run a handler built that way, so a socketpair is out.
//!
//! An abstract socket is out too: abstract names have no permissions, so any process in the
//! network namespace could bind the name first (no session starts) or connect first (and be
//! served as the frontend, past the relay's checks and the real socket's mode).
//!
//! What is left, and what this module does: each port owns a listening socket in a directory
//! of its own, created with mode 0700 (`mkdtemp`) under the temporary directory while the port
//! is set up, before its thread is sandboxed (the sandbox allows neither `mkdir` nor `unlink`).
//! The directory and socket are removed when the port stops; a port holds a `flock` on a file
//! in its directory, so that directories left behind by a daemon that died (the lock is free)
//! are recognised and removed when a port is set up. For each session the handler
//! connects to that socket (`start_client`) and the relay accepts the connection itself,
//! instead of letting the library accept from a listener (`start`): that way the relay looks at
//! every pending connection's credentials (`SO_PEERCRED`) *before* anything is served, takes
//! the one made by this process, and refuses the others. Only a process that sees the
//! directory and may enter it despite its mode (`CAP_DAC_OVERRIDE` or `CAP_DAC_READ_SEARCH`)
//! can connect at all; such a process could also replace the socket, but it could as well
//! trace the daemon, which is beyond what this guards against.
//!
//! When port threads run under the sandbox's unprivileged identity
//! ([`crate::sandbox::port_identity`]) the directory and socket belong to that identity instead
//! of root (the handler connects as it, with no capability left to pass a root-only mode), and
//! the peer check accepts that uid besides the daemon's own (the pid must be ours either way).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest socket path that fits `sockaddr_un` with its terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Name prefix of the private directories (`mkdtemp` adds six characters).
const DIR_PREFIX: &str = "vhost-pump-handoff.";
/// The socket in a private directory.
const SOCKET_NAME: &str = "h";
/// The file a live port holds locked in its private directory.
const LOCK_NAME: &str = "lock";
/// Most pending connections looked at while waiting for the handler's: more than a listen
/// backlog holds.
const MAX_PENDING: usize = 4096;

/// Errors of the private channel.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// No private directory could be created.
    #[error("cannot create a private directory for the request handler's socket: {0}")]
    Dir(String),
    /// The listening socket could not be set up.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// `accept` failed.
    #[error("accept on the private channel failed: {0}")]
    Accept(io::Error),
    /// The request handler could not connect.
    #[error("the request handler could not connect to the private channel: {0}")]
    Start(String),
    /// The handler's connection was not among the pending ones.
    #[error(
        "the request handler's connection is not on the private channel (refused {refused} \
         other connection(s))"
    )]
    HandlerMissing {
        /// Connections from other processes refused meanwhile.
        refused: u64,
    },
}

/// The private directory and its socket file; removes both when dropped. Owned by the port
/// outside its sandboxed thread, because removing files is not allowed inside.
#[derive(Debug)]
pub struct HandoffDir {
    dir: PathBuf,
    socket: PathBuf,
    /// Locked for as long as the port lives; closed (unlocked) last, after the removal.
    lock: Option<File>,
}

impl HandoffDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for HandoffDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        if self.lock.is_some() {
            let _ = std::fs::remove_file(self.dir.join(LOCK_NAME));
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove private directory");
        }
    }
}

/// The listening end of the private channel, used by the port's serving thread.
#[derive(Debug)]
pub struct Handoff {
    listener: UnixListener,
    socket: String,
    pid: u32,
    /// The uids a connection of this process may come from: the port threads' (the handler
    /// connects as that) and the daemon's own.
    uids: [u32; 2],
    refused: AtomicU64,
}

/// Credentials of a connected peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PeerCred {
    pid: i32,
    uid: u32,
}

fn peer_cred(s: &UnixStream) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain old data; zeroed is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
    })
}

/// Takes an exclusive `flock` on `f` without waiting; false when someone else holds it.
fn try_lock(f: &File) -> io::Result<bool> {
    // SAFETY: flock on an open descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Creates the lock file of a fresh private directory, already locked when it appears under
/// its name (so that a sweep never takes a directory being set up for a stale one).
fn lock_dir(dir: &Path) -> io::Result<File> {
    let tmp = dir.join(".lock");
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    if !try_lock(&f)? {
        return Err(io::Error::other(
            "a fresh lock file is locked by someone else",
        ));
    }
    std::fs::rename(&tmp, dir.join(LOCK_NAME))?;
    Ok(f)
}

/// True when `md` describes a directory only this user (or the sandbox identity) can enter.
fn is_private_dir(md: &std::fs::Metadata, euid: u32) -> bool {
    let owner_ok =
        md.uid() == euid || crate::sandbox::port_identity().is_some_and(|id| id.uid == md.uid());
    md.is_dir() && owner_ok && md.permissions().mode() & 0o077 == 0
}

/// Hands the directory and socket to the identity port threads run as, if any; returns the
/// uid the request handler will connect with.
fn give_to_port_threads(dir: &Path, socket: &Path) -> io::Result<u32> {
    match crate::sandbox::port_identity() {
        Some(id) => {
            for p in [socket, dir] {
                std::os::unix::fs::lchown(p, Some(id.uid), Some(id.gid))?;
            }
            Ok(id.uid)
        }
        // SAFETY: geteuid has no preconditions.
        None => Ok(unsafe { libc::geteuid() }),
    }
}

/// Removes the private directories under `base` that a daemon left behind when it died
/// without stopping its ports: those of this user whose lock file nobody holds. Directories
/// without a lock file (being set up right now) and anything else are left alone. Returns how
/// many were removed.
pub fn sweep_stale(base: &Path) -> usize {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_bytes()
            .starts_with(DIR_PREFIX.as_bytes())
        {
            continue;
        }
        let dir = entry.path();
        match std::fs::symlink_metadata(&dir) {
            Ok(md) if is_private_dir(&md, euid) => {}
            _ => continue,
        }
        let Ok(lock) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(LOCK_NAME))
        else {
            continue;
        };
        if !try_lock(&lock).unwrap_or(false) {
            continue;
        }
        let _ = std::fs::remove_file(dir.join(SOCKET_NAME));
        let _ = std::fs::remove_file(dir.join(LOCK_NAME));
        if std::fs::remove_dir(&dir).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            base = %base.display(),
            removed,
            "removed private directories of daemons that are gone"
        );
    }
    removed
}

/// Creates a fresh directory with mode 0700 under `base` (`mkdtemp`).
fn make_private_dir(base: &Path) -> io::Result<PathBuf> {
    let mut template = base.join(format!("{DIR_PREFIX}XXXXXX")).into_os_string();
    template.push("\0");
    let mut bytes = template.into_vec();
    // SAFETY: `bytes` is a writable NUL-terminated template ending in six X's, which mkdtemp
    // replaces in place; the pointer is valid for the call.
    let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    bytes.pop();
    let dir = PathBuf::from(std::ffi::OsString::from_vec(bytes));
    // mkdtemp creates it 0700 (less with a strict umask); anything else is not ours to trust.
    let md = std::fs::symlink_metadata(&dir)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !is_private_dir(&md, euid) {
        let _ = std::fs::remove_dir(&dir);
        return Err(io::Error::other(format!(
            "{} is not a private directory",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Creates the private channel of one port: a 0700 directory under the temporary directory
/// (or, failing that, under `fallback`, e.g. the port socket's directory) with a listening
/// socket in it. Call before the port's thread is sandboxed.
pub fn create(fallback: Option<&Path>) -> Result<(HandoffDir, Handoff), HandoffError> {
    let mut errors = Vec::new();
    let bases = std::iter::once(std::env::temp_dir()).chain(fallback.map(Path::to_path_buf));
    for base in bases {
        sweep_stale(&base);
        let dir = match make_private_dir(&base) {
            Ok(d) => d,
            Err(e) => {
                errors.push(format!("{}: {e}", base.display()));
                continue;
            }
        };
        let socket = dir.join(SOCKET_NAME);
        let mut dir_guard = HandoffDir {
            dir: dir.clone(),
            socket: socket.clone(),
            lock: None,
        };
        match lock_dir(&dir) {
            Ok(f) => dir_guard.lock = Some(f),
            Err(e) => {
                let _ = std::fs::remove_file(dir.join(".lock"));
                errors.push(format!(
                    "{}: cannot create its lock file: {e}",
                    dir.display()
                ));
                continue;
            }
        }
        let usable = socket.as_os_str().len() <= MAX_SOCKET_PATH
            && socket.to_str().is_some()
            && !socket.as_os_str().as_bytes().contains(&0);
        if !usable {
            errors.push(format!(
                "{}: path unusable for a socket (too long or not UTF-8)",
                socket.display()
            ));
            continue;
        }
        let listener = UnixListener::bind(&socket)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| HandoffError::Listen {
                path: socket.clone(),
                source,
            })?;
        let uid = give_to_port_threads(&dir, &socket).map_err(|source| HandoffError::Listen {
            path: socket.clone(),
            source,
        })?;
        let handoff = Handoff {
            listener,
            socket: socket.to_str().unwrap_or_default().to_string(),
            pid: std::process::id(),
            // SAFETY: geteuid has no preconditions.
            uids: [uid, unsafe { libc::geteuid() }],
            refused: AtomicU64::new(0),
        };
        return Ok((dir_guard, handoff));
    }
    Err(HandoffError::Dir(errors.join("; ")))
}

/// What to do with one pending connection.
enum Pending {
    /// Made by this process: the handler's.
    Ours(UnixStream),
    /// From another process (or unidentifiable): closed.
    Refused,
}

impl Handoff {
    /// The socket path the handler connects to.
    pub fn socket(&self) -> &str {
        &self.socket
    }

    /// Connections from other processes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn classify(&self, s: UnixStream, refused: &mut Vec<Option<PeerCred>>) -> Pending {
        match peer_cred(&s) {
            Ok(c) if u32::try_from(c.pid) == Ok(self.pid) && self.uids.contains(&c.uid) => {
                Pending::Ours(s)
            }
            Ok(c) => {
                refused.push(Some(c));
                Pending::Refused
            }
            Err(_) => {
                refused.push(None);
                Pending::Refused
            }
        }
    }

    /// Takes the next pending connection, if any.
    fn next_pending(&self) -> Result<Option<UnixStream>, HandoffError> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => return Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(HandoffError::Accept(e)),
            }
        }
    }

    /// Starts a request handler on the private channel: clears what is pending, lets `start`
    /// make the handler connect to [`Handoff::socket`] (e.g. `VhostUserDaemon::start_client`),
    /// then accepts the connection this process made and returns the relay's end of it.
    /// Connections from other processes are refused (closed), counted and logged once per call.
    pub fn connect_handler(
        &self,
        start: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<UnixStream, HandoffError> {
        let mut refused = Vec::new();
        // Left over: another process's connections, or ours from a session that failed after
        // its handler connected. Neither may be taken for the new handler.
        for _ in 0..MAX_PENDING {
            match self.next_pending()? {
                Some(s) => {
                    if let Pending::Ours(s) = self.classify(s, &mut refused) {
                        drop(s);
                    }
                }
                None => break,
            }
        }
        let started = start(&self.socket).map_err(HandoffError::Start);
        // A connect to a unix socket returns once the connection is queued: if the handler
        // connected, its connection is pending now.
        let mut ours = None;
        if started.is_ok() {
            for _ in 0..MAX_PENDING {
                match self.next_pending()? {
                    Some(s) => {
                        if let Pending::Ours(s) = self.classify(s, &mut refused) {
                            ours = Some(s);
                            break;
                        }
                    }
                    None => break,
                }
            }
        }
        self.report(&refused);
        started?;
        let s = ours.ok_or(HandoffError::HandlerMissing {
            refused: refused.len() as u64,
        })?;
        // Accepted sockets do not inherit the listener's O_NONBLOCK, but be explicit: the relay
        // relies on blocking I/O with timeouts.
        s.set_nonblocking(false).map_err(HandoffError::Accept)?;
        Ok(s)
    }

    fn report(&self, refused: &[Option<PeerCred>]) {
        let Some(first) = refused.first() else {
            return;
        };
        self.refused
            .fetch_add(refused.len() as u64, Ordering::Relaxed);
        let (pid, uid) = first.map_or((-1, u32::MAX), |c| (c.pid, c.uid));
        tracing::warn!(
            count = refused.len(),
            pid,
            uid,
            socket = %self.socket,
            "refused a connection on the private request-handler channel from another process"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_is_private_and_removed_on_drop() {
        let (dir, h) = create(None).unwrap();
        let md = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o700);
        assert!(Path::new(h.socket()).starts_with(dir.path()));
        let path = dir.path().to_path_buf();
        drop(h);
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn handler_connection_is_taken_and_leftovers_are_dropped() {
        let (_dir, h) = create(None).unwrap();
        // A leftover connection of this process (a failed session's) is not taken.
        let stale = UnixStream::connect(h.socket()).unwrap();
        let mut client = None;
        let relay_end = h
            .connect_handler(|path| {
                client = Some(UnixStream::connect(path).map_err(|e| e.to_string())?);
                Ok(())
            })
            .unwrap();
        let client = client.unwrap();
        use std::io::{Read, Write};
        (&client).write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        (&relay_end).read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        // The stale one was closed by the daemon side.
        let mut b = [0u8; 1];
        assert_eq!((&stale).read(&mut b).unwrap(), 0);
        assert_eq!(h.refused(), 0);
    }

    #[test]
    fn missing_handler_connection_is_an_error() {
        let (_dir, h) = create(None).unwrap();
        let err = h.connect_handler(|_| Ok(())).unwrap_err();
        assert!(matches!(err, HandoffError::HandlerMissing { refused: 0 }));
        let err = h.connect_handler(|_| Err("no".into())).unwrap_err();
        assert!(matches!(err, HandoffError::Start(_)));
    }

    #[test]
    fn connections_of_another_process_are_refused() {
        let (_dir, mut h) = create(None).unwrap();
        // Seen from a channel that belongs to pid 1, every connection made here is foreign.
        h.pid = 1;
        let early = UnixStream::connect(h.socket()).unwrap();
        let mut late = None;
        let err = h
            .connect_handler(|path| {
                late = Some(UnixStream::connect(path).map_err(|e| e.to_string())?);
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, HandoffError::HandlerMissing { refused: 2 }));
        assert_eq!(h.refused(), 2);
        use std::io::Read;
        for s in [&early, late.as_ref().unwrap()] {
            assert_eq!((&*s).read(&mut [0u8; 1]).unwrap(), 0, "refused, so closed");
        }
    }

    #[test]
    fn sweep_removes_directories_of_dead_daemons_only() {
        let base = std::env::temp_dir().join(format!("handoff-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).unwrap();
        // A live port's directory, and one whose daemon died (its lock is not held).
        let live = make_private_dir(&base).unwrap();
        let _held = lock_dir(&live).unwrap();
        let dead = make_private_dir(&base).unwrap();
        drop(lock_dir(&dead).unwrap());
        UnixListener::bind(dead.join(SOCKET_NAME)).unwrap();
        // One being set up (no lock file yet), and one that is not private.
        let fresh = make_private_dir(&base).unwrap();
        let open = base.join(format!("{DIR_PREFIX}open00"));
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(open.join(LOCK_NAME), b"").unwrap();
        assert_eq!(sweep_stale(&base), 1);
        assert!(!dead.exists());
        assert!(live.exists() && fresh.exists() && open.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
