//! The host side of a device, as the data path sees it: one endpoint per queue pair that moves
//! whole frames (virtio-net header first) between guest memory and the host.
//!
//! Tap devices and AF_PACKET sockets implement these traits in the `vhost-pump` package; the
//! device logic never knows which one it talks to.

use std::io;
use std::os::fd::RawFd;

use crate::features::{GuestOffloads, HostCapabilities};

/// Most iovecs one `readv`/`writev` takes on Linux (UIO_MAXIOV): the default bound of
/// [`HostQueue::max_iovecs`].
pub const MAX_IOVECS: usize = 1024;

/// One queue pair's host endpoint, used by exactly one worker thread.
pub trait HostQueue: Send {
    /// The fd that becomes readable when a frame waits for the guest. It is registered
    /// edge-triggered, so `recv` is called until it returns `WouldBlock`.
    fn rx_fd(&self) -> RawFd;

    /// A second fd, registered edge-triggered on its own (never nested in another epoll set),
    /// that becomes readable when the queue wants `recv` called again although `rx_fd` may
    /// report nothing. A port whose `rx_fd` is a nested epoll set arms it after busy drains:
    /// edges of nested sets have been seen lost under overload. Default: none.
    fn recheck_fd(&self) -> Option<RawFd> {
        None
    }

    /// Most iovecs [`HostQueue::recv`] takes. The worker never offers more: a frame is placed in
    /// at most this many guest buffers, and one that does not fit in them is dropped.
    fn max_iovecs(&self) -> usize {
        MAX_IOVECS
    }

    /// Reads one frame, virtio-net header first, into `iov` (1 to [`HostQueue::max_iovecs`]
    /// entries). Returns its length (header included), or `WouldBlock` when no frame waits. A
    /// frame that does not fit must be consumed, dropped and reported as an error of kind
    /// `InvalidInput`, never truncated: the worker offers the same buffers to the next frame.
    ///
    /// # Safety
    /// Every entry of `iov` must describe memory that is valid for writes for its whole length
    /// for the duration of the call.
    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;

    /// Sends one frame, virtio-net header first, gathered from `iov`. Errors of kind
    /// `InvalidInput` mean the frame itself was refused (e.g. a malformed GSO header).
    ///
    /// # Safety
    /// Every entry of `iov` must describe memory that is valid for reads for its whole length
    /// for the duration of the call.
    unsafe fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;

    /// Hands every frame accepted by `send` since the last flush to the host, and reports those
    /// it then had to drop. The worker calls it after each burst of `send`s, before it tells the
    /// guest the burst is done, so a port may queue frames in `send` and pay one system call per
    /// burst. Ports whose `send` transmits at once keep the default (nothing to do).
    fn flush(&mut self) -> TxDrops {
        TxDrops::default()
    }

    /// Told when a frontend session starts using the queue (guest memory arrived) and when it
    /// ends (the device was reset). Ports that queue frames for the guest themselves drop them
    /// while no session runs. Default: nothing.
    fn set_active(&mut self, _active: bool) {}

    /// True when [`HostQueue::flush`] must run while the burst's TX buffers are still the
    /// device's (before the guest gets them back), because `send` kept pointers into them and
    /// `flush` reads them (a switch that copies frames straight into another guest, a tap
    /// written through io_uring). The iovecs `send` was given stay valid, and the bytes behind
    /// them unchanged, until `flush` returns. Default: false (the guest gets its
    /// buffers back first, and `send` must not keep them).
    fn flush_before_release(&self) -> bool {
        false
    }
}

/// Where [`crate::NetBackend::deliver_with`] takes frames from: called with the guest RX
/// buffers of one frame (at most [`HostQueue::max_iovecs`] iovecs), it writes one frame,
/// virtio-net header first, and returns its length, or `WouldBlock` when it has no more.
/// Returning `InvalidInput` drops a frame that did not fit (the buffers are reused).
pub type RxSourceFn<'a> = dyn FnMut(&[libc::iovec]) -> io::Result<usize> + 'a;

/// Frames a [`HostQueue`] accepted in `send` and dropped later, in `flush`, by cause.
/// Bytes are Ethernet frame bytes, without the virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxDrops {
    /// Frames the host refused (the kernel found them malformed).
    pub rejected: u64,
    /// Bytes of the refused frames.
    pub rejected_bytes: u64,
    /// Frames lost to the host (interface down or gone, a transmit queue that stayed stuck).
    pub failed: u64,
    /// Bytes of the lost frames.
    pub failed_bytes: u64,
}

impl TxDrops {
    /// True when nothing was dropped.
    pub fn is_empty(&self) -> bool {
        self.rejected == 0 && self.failed == 0
    }

    /// Adds `other`'s drops to these.
    pub fn add(&mut self, other: TxDrops) {
        self.rejected += other.rejected;
        self.rejected_bytes += other.rejected_bytes;
        self.failed += other.failed;
        self.failed_bytes += other.failed_bytes;
    }
}

/// A host port: the set of queue endpoints plus the port-wide settings the guest controls.
pub trait HostPort: Send + Sync {
    /// What the host side supports, to narrow the features offered to the guest.
    fn capabilities(&self) -> HostCapabilities;

    /// Applies the guest's negotiated header length and receive offloads to the port.
    fn configure(&self, vnet_hdr_len: usize, offloads: GuestOffloads) -> io::Result<()>;

    /// Takes the endpoint of queue pair `pair` (each is taken once, by its worker).
    fn take_queue(&self, pair: usize) -> io::Result<Box<dyn HostQueue>>;
}
