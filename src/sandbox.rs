//! Least privilege for the threads that handle untrusted input.
//!
//! Each port's serving thread — and the relay, request-handler and vring worker threads it
//! spawns, which inherit its restrictions — drops every capability, sets `no_new_privs` and
//! installs a seccomp allowlist before it reads a single byte from a frontend. The main and
//! control threads keep their privileges because adding a port at runtime still needs them.
//!
//! Syscalls outside the allowlist fail with `EPERM` instead of killing the process: a missed
//! rare path then degrades into an error on one port rather than taking every port down.
//!
//! The sandbox fails closed: it is on unless [`disable`] was called (`--no-sandbox`), and a port
//! thread that cannot restrict itself ([`enter`] fails) does not serve; its port fails to start.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// On by default: only an explicit [`disable`] lets port threads run unrestricted.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Errors installing the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Capabilities could not be dropped.
    #[error("cannot drop capabilities: {0}")]
    Caps(String),
    /// The filter could not be built or installed.
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
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

// ioctl requests a port thread may issue: tun offload/header settings and non-blocking mode.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;

fn allowed_syscalls() -> Vec<libc::c_long> {
    vec![
        // I/O on sockets, tap fds, eventfds.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
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
        // Sessions: accept/connect the frontend, the private relay socket pair.
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_socket,
        libc::SYS_bind,
        libc::SYS_listen,
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
    let err = |e: &dyn std::fmt::Display| SandboxError::Seccomp(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls()
        .into_iter()
        .map(|s| (s, Vec::new()))
        .collect();
    let ioctl_rules = [TUNSETOFFLOAD, TUNSETVNETHDRSZ, FIONBIO, FIOCLEX]
        .into_iter()
        .map(|req| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| err(&e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
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

/// Restricts the calling thread (and every thread it spawns later).
pub fn restrict_current_thread() -> Result<(), SandboxError> {
    use caps::CapSet;
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Ambient] {
        caps::clear(None, set).map_err(|e| SandboxError::Caps(e.to_string()))?;
    }
    caps::clear(None, CapSet::Permitted).map_err(|e| SandboxError::Caps(e.to_string()))?;
    let filter = build_filter()?;
    // apply_filter sets no_new_privs first, as seccomp requires without CAP_SYS_ADMIN.
    seccompiler::apply_filter(&filter).map_err(|e| SandboxError::Seccomp(e.to_string()))
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

    #[test]
    fn on_by_default_and_a_failure_is_reported_not_ignored() {
        // Nothing in the library tests turns the sandbox off.
        assert!(enabled());
        let failing = || Err(SandboxError::Seccomp("denied".into()));
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
            let mut rules = BTreeMap::new();
            rules.insert(libc::SYS_seccomp, Vec::new());
            let deny: BpfProgram = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EPERM as u32),
                std::env::consts::ARCH.try_into().unwrap(),
            )
            .unwrap()
            .try_into()
            .unwrap();
            seccompiler::apply_filter(&deny).unwrap();
            enter_with(true, restrict_current_thread)
        })
        .join()
        .unwrap();
        assert!(matches!(err, Err(SandboxError::Seccomp(_))), "{err:?}");
    }
}
