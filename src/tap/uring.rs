//! Guest frames into a tap through io_uring: each frame of a TX burst becomes one `writev`
//! request in the submission ring, and the burst's flush submits them all with one
//! `io_uring_enter` and takes their results. A tap write completes inline (it never waits), so
//! this saves one system call entry and exit (and its seccomp check) per frame and nothing
//! else changes: the kernel takes the same path into the tap. The lab's
//! `kernel-floor-tap-uring` measures what that is worth on a machine.
//!
//! The frames are read by the kernel only at flush, so the queue asks to be flushed before the
//! guest gets the burst's buffers back (`HostQueue::flush_before_release`).
//!
//! **Sandbox.** io_uring requests are not seen by seccomp, so the ring is locked down before a
//! worker ever holds it: it is created disabled by the privileged thread that opens the port,
//! restricted to `WRITEV` requests with no request flags and no further `io_uring_register`
//! operation, and only then enabled. The worker's seccomp filter allows `io_uring_enter` and
//! not `io_uring_setup` or `io_uring_register`: a worker thread taken over could use the ring
//! for `writev` on its own descriptors, which seccomp lets it do directly anyway.
//!
//! The tap fd is not a registered ("fixed") file on purpose: the ring's file table is torn
//! down asynchronously after the ring is closed, so a registered tap stayed attached for a
//! moment after the port (or the process) was gone, and a daemon restarted at once could not
//! attach its tap again (`EBUSY`).

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, register::Restriction, types, IoUring};
use vhost_net_backend::TxDrops;

/// Requests in flight at most: a burst is at most 32 frames; more are submitted early.
const ENTRIES: u32 = 64;
/// Iovecs of the requests in flight at most (a frame has up to 1024).
const ARENA: usize = 4096;
/// Failed `io_uring_enter` calls in a row (EAGAIN, EBUSY, no progress) before the ring is
/// given up for `writev`.
const RETRIES: u32 = 1000;

/// A queue's io_uring and the requests of the burst in flight.
pub struct UringTx {
    /// The tap queue fd, owned by the queue.
    tap: RawFd,
    ring: IoUring,
    /// The iovecs of the queued requests; never grows past its capacity while any is queued
    /// (the requests point into it).
    iovs: Vec<libc::iovec>,
    /// Frame lengths of the queued requests, virtio-net header included, by `user_data`.
    lens: Vec<usize>,
    /// Drops found by the last drain, for the next flush.
    late: TxDrops,
}

// SAFETY: the iovecs point into guest memory (or the worker's own copies) only between a
// `send` and the flush that completes it, on the one worker thread that owns the queue.
unsafe impl Send for UringTx {}

/// The ring could not be used any more; the queued frames are counted as lost.
#[derive(Debug, thiserror::Error)]
#[error("io_uring submission failed: {0}")]
pub struct RingBroken(#[source] pub io::Error);

impl UringTx {
    /// Sets up a locked-down ring for writing into `tap` (see the module doc).
    pub fn new(tap: RawFd) -> io::Result<Self> {
        let ring = IoUring::builder().setup_r_disabled().build(ENTRIES)?;
        let sub = ring.submitter();
        sub.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_allowed(0),
        ])?;
        sub.register_enable_rings()?;
        Ok(UringTx {
            tap,
            ring,
            iovs: Vec::with_capacity(ARENA),
            lens: Vec::with_capacity(ENTRIES as usize),
            late: TxDrops::default(),
        })
    }

    /// Queues one frame gathered from `iov` (1 to 1024 entries); returns its length. The
    /// ring is drained first when full.
    ///
    /// # Safety
    /// The memory `iov` describes must stay valid for reads, and unchanged, until the next
    /// [`UringTx::flush`] returns.
    pub unsafe fn send(
        &mut self,
        iov: &[libc::iovec],
        hdr_len: usize,
    ) -> Result<usize, RingBroken> {
        if self.lens.len() >= ENTRIES as usize || self.iovs.len() + iov.len() > self.iovs.capacity()
        {
            self.drain(hdr_len)?;
        }
        let start = self.iovs.len();
        self.iovs.extend_from_slice(iov);
        let total = iov
            .iter()
            .map(|v| v.iov_len)
            .fold(0usize, usize::saturating_add);
        // u32: at most 1024 iovecs per frame (checked by the caller).
        let sqe = opcode::Writev::new(
            types::Fd(self.tap),
            self.iovs[start..].as_ptr(),
            iov.len() as u32,
        )
        .build()
        .user_data(self.lens.len() as u64);
        // SAFETY: the request points into `iovs`, which is not reallocated or cleared until the
        // request completes (in `drain`), and at memory the caller keeps valid until then.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // Not reached: the ring was drained above when full.
            self.iovs.truncate(start);
            return Err(RingBroken(io::Error::other("submission ring full")));
        }
        self.lens.push(total);
        Ok(total)
    }

    /// Submits what is queued, waits for every request, and returns the frames lost since the
    /// last flush (`hdr_len`: the virtio-net header length, not counted in dropped bytes).
    pub fn flush(&mut self, hdr_len: usize) -> Result<TxDrops, RingBroken> {
        self.drain(hdr_len)?;
        Ok(std::mem::take(&mut self.late))
    }

    /// Submits and completes every queued request, accounting failures in `late`.
    fn drain(&mut self, hdr_len: usize) -> Result<(), RingBroken> {
        let n = self.lens.len();
        let mut done = 0;
        let mut tries = 0;
        while done < n {
            for cqe in self.ring.completion() {
                done += 1;
                let Some(&len) = self.lens.get(cqe.user_data() as usize) else {
                    continue;
                };
                let bytes = len.saturating_sub(hdr_len) as u64;
                match cqe.result() {
                    r if r >= 0 => {}
                    // A malformed frame (the tap refused its header), as `writev` reports it.
                    r if [libc::EINVAL, libc::EFAULT, libc::EMSGSIZE].contains(&-r) => {
                        self.late.rejected += 1;
                        self.late.rejected_bytes += bytes;
                    }
                    _ => {
                        self.late.failed += 1;
                        self.late.failed_bytes += bytes;
                    }
                }
            }
            if done >= n {
                break;
            }
            // Everything still in the submission ring goes first; then wait for the rest.
            let unsubmitted = self.ring.submission().len();
            let r = if unsubmitted > 0 {
                self.ring.submit()
            } else {
                self.ring.submit_and_wait(n - done)
            };
            // Out of kernel resources for the moment (EAGAIN, EBUSY) or nothing submitted:
            // try again, a bounded number of times; anything else ends the ring.
            let transient =
                |e: &io::Error| matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY));
            match r {
                Ok(k) if k > 0 || unsubmitted == 0 => tries = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Ok(_) if tries < RETRIES => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(e) if transient(&e) && tries < RETRIES => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Ok(_) => {
                    return Err(self.give_up(n - done, hdr_len, io::Error::other("no progress")))
                }
                Err(e) => return Err(self.give_up(n - done, hdr_len, e)),
            }
        }
        self.iovs.clear();
        self.lens.clear();
        Ok(())
    }

    /// Counts the `missing` requests that never completed as lost.
    fn give_up(&mut self, missing: usize, hdr_len: usize, e: io::Error) -> RingBroken {
        let lost: usize = self
            .lens
            .iter()
            .rev()
            .take(missing)
            .map(|l| l.saturating_sub(hdr_len))
            .sum();
        self.late.failed += missing as u64;
        self.late.failed_bytes += lost as u64;
        RingBroken(e)
    }

    /// The drops counted so far and not yet reported (after [`RingBroken`]).
    pub fn take_late(&mut self) -> TxDrops {
        std::mem::take(&mut self.late)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::squeue;
    use std::os::fd::AsRawFd;

    /// A pipe stands in for the tap: `writev` works on it the same way.
    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-int array we own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are fresh and owned by nobody else.
        unsafe {
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    /// A ring on `fd`; outside CI a kernel without io_uring skips the test, in CI it fails.
    fn ring(fd: &std::fs::File) -> Option<UringTx> {
        match UringTx::new(fd.as_raw_fd()) {
            Ok(u) => Some(u),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipped: io_uring is not available here: {e}");
                None
            }
            Err(e) => panic!("io_uring is not available: {e}"),
        }
    }

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }
    }

    #[test]
    fn a_burst_is_written_in_order_at_flush() {
        let (mut r, w) = pipe();
        let Some(mut u) = ring(&w) else {
            return;
        };
        let frames: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let hdr = [0xaau8; 2];
        for f in &frames {
            // SAFETY: `hdr` and the frames outlive the flush below.
            let n = unsafe { u.send(&[iov(&hdr), iov(f)], 2) }.unwrap();
            assert_eq!(n, 2 + f.len());
        }
        assert!(u.flush(2).unwrap().is_empty());
        let mut got = Vec::new();
        use std::io::Read;
        let want: usize = frames.iter().map(|f| f.len() + 2).sum();
        got.resize(want, 0);
        r.read_exact(&mut got).unwrap();
        let expect: Vec<u8> = frames
            .iter()
            .flat_map(|f| hdr.iter().chain(f.iter()).copied())
            .collect();
        assert_eq!(got, expect, "100 frames (past one ring) in order");
    }

    #[test]
    fn failed_writes_are_counted_by_cause() {
        let (r, w) = pipe();
        let Some(mut u) = ring(&w) else {
            return;
        };
        drop(r);
        let f = [1u8; 50];
        // SAFETY: `f` outlives the flush below.
        unsafe {
            u.send(&[iov(&f)], 10).unwrap();
            u.send(&[iov(&f)], 10).unwrap();
        }
        // Writing into a pipe without a reader fails with EPIPE: lost, not malformed. (The
        // process ignores SIGPIPE like Rust programs do.)
        let d = u.flush(10).unwrap();
        assert_eq!((d.failed, d.failed_bytes, d.rejected), (2, 80, 0));
        assert!(u.flush(10).unwrap().is_empty(), "reported once");
    }

    #[test]
    fn the_ring_refuses_other_requests_flags_and_registrations() {
        let (_r, w) = pipe();
        let Some(mut u) = ring(&w) else {
            return;
        };
        let f = [1u8; 8];
        let v = [iov(&f)];
        let mut buf = [0u8; 8];
        // A read, and a write with a request flag (linked to the next request).
        let bad = [
            opcode::Read::new(types::Fd(w.as_raw_fd()), buf.as_mut_ptr(), 8).build(),
            opcode::Writev::new(types::Fd(w.as_raw_fd()), v.as_ptr(), 1)
                .build()
                .flags(squeue::Flags::IO_LINK),
        ];
        for sqe in &bad {
            // SAFETY: the request's buffers outlive the wait below.
            unsafe { u.ring.submission().push(sqe) }.unwrap();
            u.ring.submit_and_wait(1).unwrap();
            let c = u.ring.completion().next().unwrap();
            assert_eq!(c.result(), -libc::EACCES, "restricted request");
        }
        // Registering anything is refused too.
        assert!(u.ring.submitter().register_files(&[w.as_raw_fd()]).is_err());
    }
}
