//! The host side of a device, as the data path sees it: one endpoint per queue pair that moves
//! whole frames (virtio-net header first) between guest memory and the host.
//!
//! Tap devices and AF_PACKET sockets implement these traits in the `vhost-pump` package; the
//! device logic never knows which one it talks to.

use std::io;
use std::os::fd::RawFd;

use crate::features::{GuestOffloads, HostCapabilities};

/// One queue pair's host endpoint, used by exactly one worker thread.
pub trait HostQueue: Send {
    /// The fd that becomes readable when a frame waits for the guest. It is registered
    /// edge-triggered, so `recv` is called until it returns `WouldBlock`.
    fn rx_fd(&self) -> RawFd;

    /// Reads one frame, virtio-net header first, into `iov`. Returns its length (header included),
    /// or `WouldBlock` when no frame waits. A frame that does not fit must be dropped and reported
    /// as an error of kind `InvalidInput`, never truncated.
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
