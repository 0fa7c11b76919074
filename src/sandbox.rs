//! Least privilege for the threads that handle untrusted input.
//!
//! Two layers, both per thread (Linux keeps credentials, seccomp filters and Landlock domains
//! per thread; the threads a thread spawns inherit them):
//!
//! - **The port thread** ([`enter`]) accepts frontends, starts each session's request handler
//!   and waits for the session to end. Before it reads a single byte from a frontend it
//!   switches to an unprivileged identity ([`port_identity`], uid and gid 65530 by default, an
//!   id no account owns) where the kernel allows it, drops every capability, sets
//!   `no_new_privs`, confines itself with Landlock (no abstract Unix socket and no signal
//!   outside its own domain) and installs a seccomp allowlist. The allowlist still lets it
//!   make Unix sockets and connect: the request handler's private channel
//!   ([`crate::handoff`]) is a socket it must connect to. Under the unprivileged identity the
//!   only pathname sockets it can reach are those that identity may write, which on a host is
//!   the private channel the daemon made for it (and any socket left world-writable).
//! - **The threads that parse untrusted input** — the relay that reads the frontend's
//!   messages, the request handler, and the vring workers that read descriptor chains —
//!   stack a second filter ([`harden`]) that refuses creating, connecting, binding and
//!   accepting sockets altogether: they work only on descriptors they already hold or are
//!   handed.
//!
//! The main, control and metrics threads keep their privileges, because adding a port at
//! runtime still needs them, and they read no frontend input.
//!
//! Syscalls outside the allowlist fail with `EPERM` instead of killing the process: a missed
//! rare path then degrades into an error on one port rather than taking every port down.
//!
//! The sandbox fails closed: it is on unless [`disable`] was called (`--no-sandbox`), and a port
//! thread that cannot restrict itself ([`enter`] fails) does not serve; its port fails to start.
//! Only the identity switch and Landlock are best effort: a kernel without Landlock, or a user
//! namespace without a mapping for the sandbox id, leaves those two out (logged once).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// On by default: only an explicit [`disable`] lets port threads run unrestricted.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Default uid and gid of port threads: an id no account owns on a usual host (below the range
/// systemd hands to dynamic users, above the ids distributions give to accounts, and not
/// 65534, `nobody`, which other services use).
pub const DEFAULT_ID: u32 = 65530;

static UID: AtomicU32 = AtomicU32::new(DEFAULT_ID);
static GID: AtomicU32 = AtomicU32::new(DEFAULT_ID);
/// Whether this process can switch a thread to the sandbox identity, found out once.
static IDENTITY: OnceLock<Option<Identity>> = OnceLock::new();

thread_local! {
    /// This thread has stacked the socket-less filter.
    static HARDENED: Cell<bool> = const { Cell::new(false) };
    /// This thread is a port thread (it keeps the right to connect to the private channel).
    static PORT_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The unprivileged identity port threads switch to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Errors installing the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Capabilities could not be dropped.
    #[error("cannot drop capabilities: {0}")]
    Caps(#[source] caps::errors::CapsError),
    /// The filter could not be built or installed.
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(#[source] seccompiler::Error),
    /// The thread could not switch to the sandbox identity although the process can.
    #[error("cannot switch to uid/gid {uid}/{gid}: {source}")]
    Identity {
        /// Target uid.
        uid: u32,
        /// Target gid.
        gid: u32,
        /// Cause.
        source: std::io::Error,
    },
    /// Landlock is there but refused the ruleset.
    #[error("cannot apply the Landlock scopes: {0}")]
    Landlock(#[source] landlock::RulesetError),
}

/// Turns the sandbox on for port threads started from now on (the default).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Turns the sandbox off for port threads started from now on (`--no-sandbox`).
pub fn disable() {
    ENABLED.store(false, Ordering::SeqCst);
}

/// True when port threads sandbox themselves.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Sets the uid and gid port threads switch to (`--sandbox-uid`, `--sandbox-gid`). Takes effect
/// only before the first port starts.
pub fn set_identity(uid: u32, gid: u32) {
    UID.store(uid, Ordering::SeqCst);
    GID.store(gid, Ordering::SeqCst);
}

/// Switches the calling thread (only: the raw syscalls, not libc's process-wide wrappers) to
/// `id`, with no supplementary groups.
fn switch_thread_identity(id: Identity) -> std::io::Result<()> {
    let check = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // The raw syscalls change the calling thread's credentials only (libc's wrappers would
    // change every thread's). Groups and gid go first, while the thread may still change them.
    // SAFETY: setgroups with a zero count reads no memory.
    check(unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::syscall(libc::SYS_setresgid, id.gid, id.gid, id.gid) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::syscall(libc::SYS_setresuid, id.uid, id.uid, id.uid) })
}

/// The identity port threads run as: `None` when the sandbox is off, the daemon does not run
/// as root (its threads are unprivileged already), or the kernel refuses the switch (a user
/// namespace without a mapping for the id; logged once). Found out once, with a probe thread.
pub fn port_identity() -> Option<Identity> {
    if !enabled() {
        return None;
    }
    *IDENTITY.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let id = Identity {
            uid: UID.load(Ordering::SeqCst),
            gid: GID.load(Ordering::SeqCst),
        };
        let probe = std::thread::Builder::new()
            .name("sandbox-probe".into())
            .spawn(move || switch_thread_identity(id))
            .map(|t| t.join());
        match probe {
            Ok(Ok(Ok(()))) => Some(id),
            Ok(Ok(Err(e))) => {
                tracing::warn!(
                    uid = id.uid,
                    gid = id.gid,
                    error = %e,
                    "port threads keep uid 0: the kernel refuses the sandbox identity here (a \
                     user namespace without a mapping for it?)"
                );
                None
            }
            _ => {
                tracing::warn!("port threads keep uid 0: the identity probe thread failed");
                None
            }
        }
    })
}

// ioctl requests a port thread may issue: tun offload/header settings (the numbers the tap
// code uses, from `netdev`) and non-blocking / close-on-exec mode.
const TUNSETOFFLOAD: u64 = crate::netdev::TUNSETOFFLOAD;
const TUNSETVNETHDRSZ: u64 = crate::netdev::TUNSETVNETHDRSZ;
const FIONBIO: u64 = libc::FIONBIO;
const FIOCLEX: u64 = libc::FIOCLEX;

fn allowed_syscalls() -> Vec<libc::c_long> {
    vec![
        // I/O on sockets, tap fds, eventfds.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        // Tap queues written through io_uring (see `crate::tap::uring`): the ring is set up and
        // locked down before the thread is sandboxed, so neither io_uring_setup nor
        // io_uring_register is allowed.
        libc::SYS_io_uring_enter,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        // The AF_PACKET queue's recheck timer (armed after busy drains).
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        // Sessions: accept the frontend, connect the request handler to the private channel
        // (`socket` is allowed for AF_UNIX only, below). No bind or listen: every listening
        // socket is made before the thread is sandboxed.
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        // Memory: allocation, guest memory maps, thread stacks.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        // Threads.
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_prctl,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_tgkill,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        // std's SIGSEGV/SIGBUS handler restores the default action before re-raising; without
        // it a fault (e.g. a frontend shrinking its memory file) would spin instead of ending.
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // Time and randomness.
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
    ]
}

fn build_filter() -> Result<BpfProgram, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.into());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls()
        .into_iter()
        .map(|s| (s, Vec::new()))
        .collect();
    let ioctl_rules = [TUNSETOFFLOAD, TUNSETVNETHDRSZ, FIONBIO, FIOCLEX]
        .into_iter()
        .map(|req| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    let unix_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(err)?;
    rules.insert(libc::SYS_socket, vec![unix_only]);
    // Stacking a further filter ([`harden`]), which can only take rights away.
    let add_filter = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(libc::SECCOMP_SET_MODE_FILTER),
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(err)?;
    rules.insert(libc::SYS_seccomp, vec![add_filter]);
    compile(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )
}

/// Syscalls the threads that parse untrusted input never make: they hold every socket they
/// use already.
const SOCKET_SYSCALLS: [libc::c_long; 7] = [
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
];

/// The filter [`harden`] stacks: everything the first filter allows, minus [`SOCKET_SYSCALLS`].
fn build_hardening_filter() -> Result<BpfProgram, SandboxError> {
    let rules = SOCKET_SYSCALLS.iter().map(|&s| (s, Vec::new())).collect();
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.into());
    let arch = std::env::consts::ARCH.try_into().map_err(err)?;
    let filter = SeccompFilter::new(rules, mismatch, matched, arch).map_err(err)?;
    filter.try_into().map_err(err)
}

/// Confines the calling thread with Landlock's scopes: no connection to an abstract Unix
/// socket and no signal to a process outside its own domain. Best effort: a kernel without
/// Landlock (or older than 6.12) leaves the thread as it was, logged once.
fn apply_landlock_scopes() -> Result<(), SandboxError> {
    use landlock::{Ruleset, RulesetAttr, RulesetStatus, Scope};
    static LOGGED: AtomicBool = AtomicBool::new(false);
    let status = Ruleset::default()
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map_err(SandboxError::Landlock)?;
    if status.ruleset != RulesetStatus::FullyEnforced && !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "Landlock scopes not enforced by this kernel (needs 6.12 with Landlock on): port \
             threads can still reach abstract Unix sockets"
        );
    }
    Ok(())
}

/// Sandboxes the calling port thread, unless the sandbox is off. An error means the sandbox
/// could not be applied and the thread must not go on to serve.
pub fn enter() -> Result<(), SandboxError> {
    enter_with(enabled(), restrict_current_thread)
}

fn enter_with(
    enabled: bool,
    restrict: impl FnOnce() -> Result<(), SandboxError>,
) -> Result<(), SandboxError> {
    if enabled {
        restrict()
    } else {
        Ok(())
    }
}

/// Restricts the calling thread (and every thread it spawns later) as a port thread: the
/// sandbox identity ([`port_identity`]), no capabilities, Landlock scopes, the seccomp
/// allowlist.
pub fn restrict_current_thread() -> Result<(), SandboxError> {
    use caps::CapSet;
    if let Some(id) = port_identity() {
        switch_thread_identity(id).map_err(|source| SandboxError::Identity {
            uid: id.uid,
            gid: id.gid,
            source,
        })?;
    }
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Ambient] {
        caps::clear(None, set).map_err(SandboxError::Caps)?;
    }
    caps::clear(None, CapSet::Permitted).map_err(SandboxError::Caps)?;
    // Landlock first: the seccomp allowlist has no Landlock syscalls. restrict_self sets
    // no_new_privs, as Landlock (and seccomp) require without CAP_SYS_ADMIN.
    apply_landlock_scopes()?;
    let filter = build_filter()?;
    seccompiler::apply_filter(&filter).map_err(SandboxError::Seccomp)?;
    PORT_THREAD.with(|p| p.set(true));
    Ok(())
}

/// Stacks the socket-less filter on the calling thread (and the threads it spawns later), unless
/// the sandbox is off or the thread has it already. Call at the start of every thread that
/// parses untrusted input.
pub fn harden() -> Result<(), SandboxError> {
    if !enabled() || HARDENED.with(Cell::get) {
        return Ok(());
    }
    harden_now()
}

fn harden_now() -> Result<(), SandboxError> {
    let filter = build_hardening_filter()?;
    seccompiler::apply_filter(&filter).map_err(SandboxError::Seccomp)?;
    HARDENED.with(|h| h.set(true));
    Ok(())
}

/// For threads a port thread's code spawns without a hook of ours (the `vhost` crate's request
/// handler): hardens the calling thread if it descends from a port thread (it runs under a
/// seccomp filter) and is not one itself. Returns false only when hardening was due and failed.
pub fn harden_port_descendant() -> bool {
    if !enabled() || HARDENED.with(Cell::get) || PORT_THREAD.with(Cell::get) {
        return true;
    }
    // SAFETY: PR_GET_SECCOMP takes no pointer arguments.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode != 2 {
        // Not under a filter: the main or control thread (or a test), nothing to do.
        return true;
    }
    match harden_now() {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "cannot harden the request handler thread");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds_for_this_architecture() {
        assert!(!build_filter().unwrap().is_empty());
    }

    #[test]
    fn restricted_thread_cannot_open_files_but_can_work() {
        let r = std::thread::spawn(|| {
            restrict_current_thread().unwrap();
            // Allowed: memory, threads, eventfds.
            let v = vec![1u8; 1 << 20];
            let child = std::thread::spawn(move || v.len()).join().unwrap();
            // Denied: opening files.
            let open = std::fs::File::open("/etc/hostname");
            (child, open.err().and_then(|e| e.raw_os_error()))
        })
        .join()
        .unwrap();
        assert_eq!(r, (1 << 20, Some(libc::EPERM)));
    }

    /// Root is needed to switch identities; CI runs as root, so there a skip is a failure.
    fn can_switch_identity(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: needs root in CI"
        );
        println!("skipping {test}: needs root");
        false
    }

    fn errno<T>(r: std::io::Result<T>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    fn raw_socket(domain: libc::c_int, ty: libc::c_int) -> std::io::Result<()> {
        // SAFETY: socket takes plain integers; the descriptor, if any, is closed at once.
        let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: we own the descriptor just made.
        unsafe { libc::close(fd) };
        Ok(())
    }

    /// Landlock's ABI version here (0: none).
    fn landlock_abi() -> i64 {
        // SAFETY: a version query passes no pointer (NULL, 0, LANDLOCK_CREATE_RULESET_VERSION).
        let v = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<u8>(),
                0usize,
                1u32,
            )
        };
        v.max(0)
    }

    #[test]
    fn port_thread_is_unprivileged_and_reaches_no_socket_but_its_own() {
        if !can_switch_identity("port_thread_is_unprivileged_and_reaches_no_socket_but_its_own") {
            return;
        }
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
        use std::os::unix::prelude::*;
        let id = port_identity().expect("root can switch identities here");
        assert_eq!(
            id,
            Identity {
                uid: DEFAULT_ID,
                gid: DEFAULT_ID
            }
        );
        let base = std::env::temp_dir().join(format!("vp-sandbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).unwrap();
        // Root's socket, like the daemon's control socket or a container runtime's.
        let root_sock = base.join("root.sock");
        let _root = UnixListener::bind(&root_sock).unwrap();
        std::fs::set_permissions(&root_sock, std::fs::Permissions::from_mode(0o660)).unwrap();
        // The private channel: a directory handed to the sandbox identity.
        let own_dir = base.join("own");
        std::fs::create_dir(&own_dir).unwrap();
        let own_sock = own_dir.join("h");
        let own = UnixListener::bind(&own_sock).unwrap();
        for p in [&own_sock, &own_dir] {
            std::os::unix::fs::lchown(p, Some(id.uid), Some(id.gid)).unwrap();
        }
        std::fs::set_permissions(&own_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        // An abstract socket bound outside the sandbox (e.g. a shim's).
        let abs_name = format!("vp-sandbox-{}", std::process::id());
        let abs_addr = SocketAddr::from_abstract_name(abs_name.as_bytes()).unwrap();
        let _abs = UnixListener::bind_addr(&abs_addr).unwrap();
        let landlock = landlock_abi() >= 6;

        let (port, child, hardened) = std::thread::spawn(move || {
            restrict_current_thread().unwrap();
            // SAFETY: getuid/getgid have no preconditions (and report this thread's ids).
            let ids = unsafe { (libc::getuid(), libc::getgid()) };
            let port = (
                ids,
                errno(raw_socket(libc::AF_INET, libc::SOCK_DGRAM)),
                errno(raw_socket(libc::AF_PACKET, libc::SOCK_RAW)),
                errno(raw_socket(libc::AF_NETLINK, libc::SOCK_RAW)),
                errno(UnixStream::connect(&root_sock)),
                errno(UnixStream::connect_addr(&abs_addr)),
                UnixStream::connect(&own_sock).is_ok(),
            );
            // What the request handler does on its first request: a port thread stays as it
            // is, a thread it spawned stacks the socket-less filter.
            assert!(harden_port_descendant());
            let own_again = UnixStream::connect(&own_sock).is_ok();
            let own_sock2 = own_sock.clone();
            let child = std::thread::spawn(move || {
                assert!(harden_port_descendant());
                let connect = errno(UnixStream::connect(&own_sock2));
                let grandchild = std::thread::spawn(move || errno(UnixStream::connect(&own_sock2)))
                    .join()
                    .unwrap();
                (connect, grandchild)
            })
            .join()
            .unwrap();
            harden().unwrap();
            let hardened = (
                errno(raw_socket(libc::AF_UNIX, libc::SOCK_STREAM)),
                errno(UnixStream::connect(&own_sock)),
            );
            ((port, own_again), child, hardened)
        })
        .join()
        .unwrap();
        let _ = std::fs::remove_dir_all(&base);
        drop(own);

        let ((ids, inet, packet, netlink, root, abs, own_ok), own_again) = port;
        assert_eq!(ids, (DEFAULT_ID, DEFAULT_ID), "port thread's uid/gid");
        assert_eq!(
            (inet, packet, netlink),
            (Some(libc::EPERM), Some(libc::EPERM), Some(libc::EPERM)),
            "port threads make no socket but Unix ones"
        );
        assert_eq!(root, Some(libc::EACCES), "root's 0660 socket");
        if landlock {
            assert_eq!(abs, Some(libc::EPERM), "an abstract socket from outside");
        } else {
            println!("Landlock ABI < 6 here: abstract sockets not checked");
        }
        assert!(
            own_ok && own_again,
            "the port thread reaches its private channel"
        );
        assert_eq!(
            child,
            (Some(libc::EPERM), Some(libc::EPERM)),
            "a port thread's child after its first request, and what it spawns"
        );
        assert_eq!(hardened, (Some(libc::EPERM), Some(libc::EPERM)));
    }

    #[test]
    fn on_by_default_and_a_failure_is_reported_not_ignored() {
        // Nothing in the library tests turns the sandbox off.
        assert!(enabled());
        let failing = || Err(SandboxError::Seccomp(seccompiler::Error::EmptyFilter));
        assert!(matches!(
            enter_with(true, failing),
            Err(SandboxError::Seccomp(_))
        ));
        assert!(enter_with(false, failing).is_ok());
        assert!(enter_with(true, || Ok(())).is_ok());
    }

    #[test]
    fn restriction_fails_where_seccomp_is_denied() {
        let err = std::thread::spawn(|| {
            // A filter of our own that refuses seccomp(2), as some container runtimes do.
            let rules = BTreeMap::from([(libc::SYS_seccomp, Vec::new())]);
            let deny = compile(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EPERM as u32),
            )
            .unwrap();
            seccompiler::apply_filter(&deny).unwrap();
            enter_with(true, restrict_current_thread)
        })
        .join()
        .unwrap();
        assert!(matches!(err, Err(SandboxError::Seccomp(_))), "{err:?}");
    }
}
