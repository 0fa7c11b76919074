//! Guest memory that vanishes under us costs one session, not the process.
//!
//! A frontend hands over its memory as files that we map. It may shrink such a file afterwards
//! (or a hugetlbfs pool may run dry), and our next access to a page past the new end raises
//! SIGBUS, which by default kills the process and every port in it. Sealing cannot be
//! required: Kata's QEMU backs guest memory with plain `/dev/shm` files.
//!
//! So the process installs one SIGBUS handler. Each session registers the host ranges of the
//! guest memory it mapped, with the fd of its frontend connection. When a fault hits a
//! registered range, the handler maps a private zero page over the faulting page (so the
//! access completes, reading zeros), shuts the session's frontend socket down (the session
//! ends, its mappings go with it) and counts the fault. A fault anywhere else is not ours: the
//! previous handler (std's) is put back and the access faults again, as before.
//!
//! Everything the handler touches is a fixed table of atomics; it calls only `mmap`,
//! `shutdown` and `sigaction`, which are system calls, and allocates nothing.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// How many guest ranges can be registered at once, over all sessions.
const SLOTS: usize = 2048;

struct Slot {
    /// 0: free or being written.
    len: AtomicUsize,
    start: AtomicUsize,
    /// The session (0: none).
    owner: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    len: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    owner: AtomicU64::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// Sessions: the token, frontend fd and fault count of each live session, in a slot it claims
/// (a token is never reused, so a long-lived session keeps its slot whatever others do).
const SESSIONS: usize = 256;
#[allow(clippy::declare_interior_mutable_const)]
const NO_FD: AtomicI32 = AtomicI32::new(-1);
static SESSION_FD: [AtomicI32; SESSIONS] = [NO_FD; SESSIONS];
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static SESSION_TOKEN: [AtomicU64; SESSIONS] = [ZERO; SESSIONS];
static SESSION_FAULTS: [AtomicU64; SESSIONS] = [ZERO; SESSIONS];

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
/// The page size, read once at install (the handler calls nothing it need not).
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static FAULTS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
/// Writers of the table take this; the handler never does.
static WRITERS: Mutex<()> = Mutex::new(());

/// The handler that was installed before ours, for faults that are not ours.
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();

/// Guest memory faults recovered since the process started.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// Installs the process-wide handler (once; later calls do nothing). Returns whether it is in
/// place.
pub fn install() -> bool {
    static OK: AtomicUsize = AtomicUsize::new(0);
    INSTALL.call_once(|| {
        // SAFETY: sysconf is a plain system-configuration query.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is a valid starting point; we fill handler, flags and
        // mask before use. PREVIOUS is written once, here, before the handler can run (it is
        // installed by this same call), and only read by the handler afterwards.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_sigbus;
            sa.sa_sigaction = handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            let prev = std::ptr::addr_of_mut!(PREVIOUS).cast::<libc::sigaction>();
            if libc::sigaction(libc::SIGBUS, &sa, prev) == 0 {
                OK.store(1, Ordering::Relaxed);
            }
        }
    });
    OK.load(Ordering::Relaxed) == 1
}

/// One session's registration: its guest ranges and its frontend connection. Dropping it
/// forgets both.
#[derive(Debug)]
pub struct FaultScope {
    token: u64,
    /// The session slot it claimed; `None` when all were taken (faults in its memory are still
    /// recovered, but its socket is not shut down and nothing is counted).
    slot: Option<usize>,
}

impl FaultScope {
    /// A scope for the session served on `frontend_fd` (shut down on a guest memory fault).
    pub fn new(frontend_fd: RawFd) -> FaultScope {
        install();
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let slot = SESSION_TOKEN.iter().position(|t| {
            t.compare_exchange(0, token, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        if let Some(i) = slot {
            SESSION_FAULTS[i].store(0, Ordering::Relaxed);
            SESSION_FD[i].store(frontend_fd, Ordering::Release);
        }
        FaultScope { token, slot }
    }

    /// The scope's token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Faults recovered in this session.
    pub fn faults(&self) -> u64 {
        self.slot
            .map_or(0, |i| SESSION_FAULTS[i].load(Ordering::Relaxed))
    }
}

impl Drop for FaultScope {
    fn drop(&mut self) {
        set_ranges(self.token, &[]);
        if let Some(i) = self.slot {
            SESSION_FD[i].store(-1, Ordering::Release);
            SESSION_TOKEN[i].store(0, Ordering::Release);
        }
    }
}

/// Replaces the guest ranges (host address, length) registered for session `token`. Ranges
/// that do not fit the table stay unprotected (a fault there kills the process, as without
/// this module), and the return value says how many did.
pub fn set_ranges(token: u64, ranges: &[(usize, usize)]) -> usize {
    let _w = WRITERS.lock().unwrap_or_else(|p| p.into_inner());
    for s in TABLE.iter() {
        if s.owner.load(Ordering::Relaxed) == token {
            // Length first: a slot with length 0 matches nothing.
            s.len.store(0, Ordering::Release);
            s.owner.store(0, Ordering::Release);
        }
    }
    let mut left = ranges.iter().filter(|(_, len)| *len > 0);
    let mut placed = 0;
    for s in TABLE.iter() {
        if s.owner.load(Ordering::Relaxed) != 0 {
            continue;
        }
        let Some(&(start, len)) = left.next() else {
            break;
        };
        s.owner.store(token, Ordering::Release);
        s.start.store(start, Ordering::Release);
        s.len.store(len, Ordering::Release);
        placed += 1;
    }
    placed
}

/// The registered session owning `addr`, if any. Reads each slot's length before and after its
/// start, so a slot rewritten meanwhile (length set to 0 first) is skipped.
fn owner_of(addr: usize) -> Option<u64> {
    for s in TABLE.iter() {
        let len = s.len.load(Ordering::Acquire);
        if len == 0 {
            continue;
        }
        let start = s.start.load(Ordering::Acquire);
        let owner = s.owner.load(Ordering::Acquire);
        if s.len.load(Ordering::Acquire) != len || owner == 0 {
            continue;
        }
        if addr >= start && addr - start < len {
            return Some(owner);
        }
    }
    None
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some(owner) = owner_of(addr) {
        let page = PAGE.load(Ordering::Relaxed);
        let base = addr & !(page - 1);
        // SAFETY: `base` lies in a registered guest range: a mapping of frontend memory this
        // process made and owns (vm-memory's region), which the faulting access was using.
        // Replacing that one page with a private zero page only changes what the doomed
        // session reads; the session is shut down below and its mappings are unmapped then.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            FAULTS.fetch_add(1, Ordering::Relaxed);
            let slot = SESSION_TOKEN
                .iter()
                .position(|t| t.load(Ordering::Acquire) == owner);
            if let Some(i) = slot {
                SESSION_FAULTS[i].fetch_add(1, Ordering::Relaxed);
                let fd = SESSION_FD[i].load(Ordering::Acquire);
                if fd >= 0 {
                    // SAFETY: shutdown(2) on the session's frontend socket, whose fd stays
                    // open until the scope is dropped (which clears it first).
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            }
            return;
        }
    }
    // Not ours (or the page could not be replaced): hand it to the previous handler.
    // SAFETY: PREVIOUS was filled by sigaction before this handler was installed.
    unsafe {
        let prev = &*std::ptr::addr_of!(PREVIOUS).cast::<libc::sigaction>();
        if prev.sa_sigaction == libc::SIG_DFL || prev.sa_sigaction == libc::SIG_IGN {
            // Put the default back; returning re-runs the access, which faults again.
            libc::sigaction(sig, prev, std::ptr::null_mut());
        } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(prev.sa_sigaction);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(prev.sa_sigaction);
            f(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn ranges_are_found_replaced_and_forgotten() {
        let a = FaultScope::new(-1);
        let b = FaultScope::new(-1);
        assert_eq!(
            set_ranges(a.token(), &[(0x1000_0000, 0x1000), (0x2000_0000, 0x10)]),
            2
        );
        assert_eq!(set_ranges(b.token(), &[(0x3000_0000, 0x1000)]), 1);
        assert_eq!(owner_of(0x1000_0fff), Some(a.token()));
        assert_eq!(owner_of(0x1000_1000), None);
        assert_eq!(owner_of(0x3000_0000), Some(b.token()));
        set_ranges(a.token(), &[(0x4000_0000, 0x1000)]);
        assert_eq!(owner_of(0x1000_0000), None);
        assert_eq!(owner_of(0x4000_0000), Some(a.token()));
        drop(a);
        assert_eq!(owner_of(0x4000_0000), None);
        assert_eq!(owner_of(0x3000_0000), Some(b.token()));
    }

    #[test]
    fn a_long_lived_session_keeps_its_slot_while_others_come_and_go() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let long = FaultScope::new(ours.as_raw_fd());
        for _ in 0..2 * SESSIONS {
            drop(FaultScope::new(-1));
        }
        let i = long.slot.expect("a slot");
        assert_eq!(SESSION_TOKEN[i].load(Ordering::Relaxed), long.token());
        assert_eq!(SESSION_FD[i].load(Ordering::Relaxed), ours.as_raw_fd());
        drop(long);
        drop(theirs);
    }

    /// A file mapping shrunk under us: the access reads zeros, the session's socket is shut
    /// down and the fault counted, and the process lives.
    #[test]
    fn a_vanished_page_costs_the_session_only() {
        let mut f = tempfile_in_shm();
        f.write_all(&[7u8; 8192]).unwrap();
        // SAFETY: maps our own 8 KiB file shared; unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let scope = FaultScope::new(ours.as_raw_fd());
        set_ranges(scope.token(), &[(p as usize, 8192)]);
        f.set_len(0).unwrap();
        let before = faults();
        // SAFETY: reads inside our own mapping; the page past the file's end faults and the
        // handler puts a zero page there.
        let v = unsafe { std::ptr::read_volatile(p.cast::<u8>().add(4096)) };
        assert_eq!(v, 0);
        assert_eq!(faults(), before + 1);
        assert_eq!(scope.faults(), 1);
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!(
            (&theirs).read(&mut buf).unwrap(),
            0,
            "the session's socket is shut down"
        );
        drop(scope);
        // SAFETY: our mapping from above.
        unsafe { libc::munmap(p, 8192) };
    }

    fn tempfile_in_shm() -> std::fs::File {
        let path = format!("/dev/shm/vp-sigbus-{}", std::process::id());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
