//! A vhost-user port attached to a switch: the [`HostPort`] the device sees instead of a tap.
//!
//! Guest TX: the port's vring worker calls [`HostQueue::send`], which forwards the frame
//! ([`Switch::forward`]) straight from the guest's TX buffers into the receivers' inboxes; the
//! sending worker does the work, so ports never wait on a switch thread. Guest RX: frames for
//! the port wait in its [`Inbox`]; the inbox's eventfd is queue pair 0's `rx_fd`, so the port's
//! own worker wakes and copies them into its guest's RX buffers (with dirty-page logging and
//! `EVENT_IDX` like any host port). Other queue pairs only transmit.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use vhost_net_backend::{GuestOffloads, HostCapabilities, HostPort, HostQueue};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Frame, Member, Switch};
use crate::frame::{IovWriter, VNET_HDR_LEN};

/// Most frames waiting in one inbox.
pub const INBOX_FRAMES: usize = 1024;
/// Most bytes waiting in one inbox (a 64 KiB GSO frame counts whole).
pub const INBOX_BYTES: usize = 16 << 20;

/// Frames waiting for one member, each `[10-byte virtio_net_hdr][Ethernet frame]`, with an
/// eventfd that is signalled when the inbox goes from empty to not empty.
pub struct Inbox {
    q: Mutex<InboxQ>,
    event: EventFd,
}

#[derive(Default)]
struct InboxQ {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Emptied buffers kept for reuse, so a steady stream allocates nothing.
    spare: Vec<Vec<u8>>,
}

impl Inbox {
    /// An empty inbox.
    pub fn new() -> io::Result<Inbox> {
        Ok(Inbox {
            q: Mutex::new(InboxQ::default()),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboxQ> {
        self.q.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A buffer to build a frame in (a spare one when there is one).
    pub fn buffer(&self) -> Vec<u8> {
        self.lock().spare.pop().unwrap_or_default()
    }

    /// Signals the eventfd (the receiver's thread wakes and takes what waits).
    pub fn signal(&self) {
        // Cannot fail short of a counter overflow; a missed wake-up is caught by the next.
        let _ = self.event.write(1);
    }

    /// Queues `frame`; gives it back when the inbox is full. With `wake`, an inbox that was
    /// empty signals its eventfd; without, the caller delivers or signals itself.
    pub fn push(&self, frame: Vec<u8>, wake: bool) -> Result<(), Vec<u8>> {
        let was_empty = {
            let mut q = self.lock();
            if q.frames.len() >= INBOX_FRAMES || q.bytes + frame.len() > INBOX_BYTES {
                return Err(frame);
            }
            q.bytes += frame.len();
            q.frames.push_back(frame);
            q.frames.len() == 1
        };
        if was_empty && wake {
            self.signal();
        }
        Ok(())
    }

    /// Returns a buffer that is done with (kept for reuse up to a bound).
    pub fn give_back(&self, mut buf: Vec<u8>) {
        let mut q = self.lock();
        if q.spare.len() < 64 && buf.capacity() <= 128 << 10 {
            buf.clear();
            q.spare.push(buf);
        }
    }

    /// Takes the oldest frame. When the inbox is empty the eventfd is reset first and the
    /// queue looked at again, so a frame pushed meanwhile is either taken now or signalled
    /// anew: no wake-up is lost.
    pub fn pop(&self) -> Option<Vec<u8>> {
        if let Some(f) = self.pop_now() {
            return Some(f);
        }
        let _ = self.event.read();
        self.pop_now()
    }

    fn pop_now(&self) -> Option<Vec<u8>> {
        let mut q = self.lock();
        let f = q.frames.pop_front()?;
        q.bytes -= f.len();
        Some(f)
    }

    /// Drops every waiting frame; returns how many.
    pub fn clear(&self) -> usize {
        let mut q = self.lock();
        let n = q.frames.len();
        q.frames.clear();
        q.bytes = 0;
        n
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The eventfd.
    pub fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

/// The receive side of a member as the senders see it: its header length and offloads, as its
/// guest negotiated them.
#[derive(Default)]
pub struct RxSettings {
    hdr_len: AtomicUsize,
    offloads: AtomicU8,
    /// A queue of this member is running (a frontend is attached and started it).
    pub running: AtomicBool,
}

impl RxSettings {
    /// Records the guest's negotiated header length and receive offloads.
    pub fn set(&self, hdr_len: usize, o: GuestOffloads) {
        let bits = u8::from(o.csum)
            | u8::from(o.tso4) << 1
            | u8::from(o.tso6) << 2
            | u8::from(o.tso_ecn) << 3
            | u8::from(o.uso4) << 4
            | u8::from(o.uso6) << 5;
        self.offloads.store(bits, Relaxed);
        self.hdr_len.store(hdr_len, Relaxed);
    }

    /// The guest's receive offloads.
    pub fn offloads(&self) -> GuestOffloads {
        let b = self.offloads.load(Relaxed);
        GuestOffloads {
            csum: b & 1 != 0,
            tso4: b & 2 != 0,
            tso6: b & 4 != 0,
            tso_ecn: b & 8 != 0,
            uso4: b & 16 != 0,
            uso6: b & 32 != 0,
        }
    }

    /// The guest's virtio-net header length (10 or 12).
    pub fn hdr_len(&self) -> usize {
        self.hdr_len.load(Relaxed).max(VNET_HDR_LEN)
    }
}

/// A vhost-user port's host side on a switch.
pub struct SwitchPort {
    switch: Arc<Switch>,
    member: Arc<Member>,
    queues: usize,
}

impl SwitchPort {
    /// Attaches a port with `queues` queue pairs to `switch` as `member`.
    pub fn new(switch: Arc<Switch>, member: Arc<Member>, queues: usize) -> SwitchPort {
        SwitchPort {
            switch,
            member,
            queues,
        }
    }
}

impl Drop for SwitchPort {
    fn drop(&mut self) {
        self.switch.detach(self.member.id);
    }
}

impl HostPort for SwitchPort {
    fn capabilities(&self) -> HostCapabilities {
        HostCapabilities::default()
    }

    fn configure(&self, vnet_hdr_len: usize, offloads: GuestOffloads) -> io::Result<()> {
        self.member.rx.set(vnet_hdr_len, offloads);
        Ok(())
    }

    fn take_queue(&self, pair: usize) -> io::Result<Box<dyn HostQueue>> {
        if pair >= self.queues {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // Only queue pair 0 receives; the others get an eventfd nobody signals.
        let idle = if pair == 0 {
            None
        } else {
            Some(EventFd::new(EFD_NONBLOCK)?)
        };
        Ok(Box::new(SwitchQueue {
            switch: self.switch.clone(),
            member: self.member.clone(),
            idle,
            hdr_len: self.member.rx.hdr_len(),
            staged: Vec::new(),
            iovs: Vec::new(),
            targets: Vec::new(),
            spare: Vec::new(),
        }))
    }
}

/// One queue pair of a switch port.
pub struct SwitchQueue {
    switch: Arc<Switch>,
    member: Arc<Member>,
    /// For queue pairs other than 0: an eventfd that never fires.
    idle: Option<EventFd>,
    hdr_len: usize,
    /// The burst's frames, each with its range in `iovs`: pointers into the guest's TX
    /// buffers, valid until `flush` returns (see [`HostQueue::flush_before_release`]).
    staged: Vec<(std::ops::Range<usize>, Frame)>,
    iovs: Vec<libc::iovec>,
    /// Each receiver of the burst with the indexes of its frames in `staged`, in order.
    targets: Vec<(Arc<Member>, Vec<u32>)>,
    /// Emptied index lists of earlier bursts, reused so a steady stream allocates nothing.
    spare: Vec<Vec<u32>>,
}

// SAFETY: `iovs` only holds pointers into guest memory during one TX burst (from `send` to the
// end of `flush`, which clears it); everything else is Send.
unsafe impl Send for SwitchQueue {}

impl Drop for SwitchQueue {
    fn drop(&mut self) {
        if self.idle.is_none() {
            self.member.rx.running.store(false, Relaxed);
            self.member.inbox.clear();
        }
    }
}

impl HostQueue for SwitchQueue {
    fn rx_fd(&self) -> RawFd {
        match &self.idle {
            Some(e) => e.as_raw_fd(),
            None => self.member.inbox.fd(),
        }
    }

    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if self.idle.is_some() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let Some(buf) = self.member.inbox.pop() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let pad_len = (self.member.rx.hdr_len() - VNET_HDR_LEN).min(2);
        let mut w = IovWriter::new(iov);
        // The 10-byte header, then zeros up to the guest's header length (num_buffers is the
        // device's to write), then the frame.
        let pad = [0u8; 2];
        // SAFETY: the worker hands us writable guest buffers for the duration of the call;
        // the inbox buffer is ours and does not overlap guest memory.
        let fits = unsafe {
            w.put(&buf[..VNET_HDR_LEN]) && w.put(&pad[..pad_len]) && w.put(&buf[VNET_HDR_LEN..])
        };
        let len = buf.len() + pad_len;
        self.member.inbox.give_back(buf);
        if !fits {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        Ok(len)
    }

    unsafe fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if self.hdr_len != self.member.rx.hdr_len() {
            self.hdr_len = self.member.rx.hdr_len();
        }
        let index = self.staged.len() as u32;
        let (targets, spare) = (&mut self.targets, &mut self.spare);
        // SAFETY: the worker hands us readable guest buffers, which stay the device's until
        // our `flush` returns (`flush_before_release`).
        let f = unsafe {
            self.switch.decide(&self.member, iov, self.hdr_len, |m, _| {
                match targets.iter_mut().find(|(t, _)| t.id == m.id) {
                    Some((_, v)) => v.push(index),
                    None => {
                        let mut v = spare.pop().unwrap_or_default();
                        v.push(index);
                        targets.push((m.clone(), v));
                    }
                }
            })
        }?;
        let start = self.iovs.len();
        self.iovs.extend_from_slice(iov);
        self.staged.push((start..self.iovs.len(), f));
        Ok(f.total)
    }

    fn flush(&mut self) -> vhost_net_backend::TxDrops {
        // The burst's frames go to each receiver in one pass, straight into its guest when it
        // can take them now.
        let mut targets = std::mem::take(&mut self.targets);
        for (m, mut which) in targets.drain(..) {
            // SAFETY: the staged iovecs point into this guest's TX buffers, still the device's
            // until this flush returns.
            unsafe {
                self.switch
                    .deliver_staged(&m, &self.staged, &self.iovs, &which)
            };
            which.clear();
            self.spare.push(which);
        }
        self.targets = targets;
        self.staged.clear();
        self.iovs.clear();
        vhost_net_backend::TxDrops::default()
    }

    fn flush_before_release(&self) -> bool {
        true
    }

    fn set_active(&mut self, active: bool) {
        if self.idle.is_none() {
            // Frames queued while no guest was there are stale either way.
            self.member.inbox.clear();
            self.member.rx.running.store(active, Relaxed);
        }
    }
}
