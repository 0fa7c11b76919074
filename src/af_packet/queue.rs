//! One queue pair's endpoint: the sockets' RX and TX rings, driven by the queue's worker
//! thread. Only ring memory, `send`, `recvmsg`, `poll`, `epoll_wait`, `getsockopt` and `read`
//! are used here: the worker runs sandboxed. Link changes come from the port's watcher.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_net_backend::features::MAX_GSO_FRAME;
use vhost_net_backend::{HostQueue, TxDrops};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::cursor::RxCursor;
use super::sys::{
    status, Optional, PacketSocket, SetupError, TPACKET2_HDRLEN, TPACKET2_HDR_ALIGNED,
    TX_DATA_OFFSET,
};
use super::{AfPacketCounters, Link, Shared, RX_RING, TX_RING, TX_STALL};
use crate::frame::{
    iov_len, prepare_rx, prepare_tx, IovReader, IovWriter, RxRefusal, VlanTag, VnetHdr, ETH_HLEN,
    VLAN_HLEN, VNET_HDR_LEN,
};

/// Epoll tokens of the queue's private set.
const TOKEN_SOCKET: u64 = 0;
const TOKEN_WAKE: u64 = 1;
/// How long after a drain that found frames the ring is looked at once more, wake-up or not
/// (any drain that found frames: the lost wake-up was seen after small drains too).
const RECHECK_DELAY: Duration = Duration::from_millis(2);
/// How far consumption may run ahead of an unfilled slot.
const MAX_AHEAD: usize = RX_RING.frame_nr() / 2;
/// How many slots past an empty one are checked for frames filled out of order (by other CPUs).
const PEEK: usize = 8;
/// The bounce buffer: a virtio-net header and the largest frame the device moves.
const RX_BOUNCE: usize = VNET_HDR_LEN + MAX_GSO_FRAME + 8;
/// How often the kernel's RX drop counter is read.
const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// What became of one RX slot.
enum Rx {
    /// Delivered, this many bytes (header included).
    Frame(usize),
    /// Not for the guest (our own transmission on an old kernel); take the next one.
    Skip,
    /// Dropped; the caller counts it.
    Drop,
}

/// The VLAN tag the kernel moved out of a frame into its metadata, if any.
fn vlan_tag(status: u32, tci: u16, tpid: u16) -> Option<VlanTag> {
    (status & libc::TP_STATUS_VLAN_VALID != 0).then_some(VlanTag {
        tpid: if status & libc::TP_STATUS_VLAN_TPID_VALID != 0 && tpid != 0 {
            tpid
        } else {
            0x8100
        },
        tci,
    })
}

/// One queue pair's AF_PACKET socket and rings.
pub struct AfPacketQueue {
    pair: usize,
    shared: Arc<Shared>,
    sock: PacketSocket,
    /// Which RX slot comes next (tolerates slots filled out of order).
    rx: RxCursor,
    /// Next TX slot to write (a count; slot = count % ring size).
    tx_head: usize,
    /// First TX slot written that the kernel has not taken yet.
    tx_kernel: usize,
    /// Frames accepted by `send` and dropped since, for the next `flush` to report.
    late: TxDrops,
    /// The fd the worker watches: a private epoll set with the socket and the watcher's
    /// doorbell, so the socket can be replaced under an unchanged fd.
    ep: Epoll,
    wake: EventFd,
    /// Looks at the ring once more after a busy drain (see [`AfPacketQueue::recv`]).
    recheck: TimerFd,
    /// A frame was delivered since the ring was last found empty.
    drained: bool,
    /// A transmit timed out and nothing got through since: don't wait again.
    tx_stalled: bool,
    /// Where a frame too large for an RX slot is read from the socket's queue.
    bounce: Box<[u8]>,
    last_stats: Instant,
}

impl AfPacketQueue {
    /// The endpoint of queue pair `pair` over `sock`.
    pub fn new(pair: usize, shared: Arc<Shared>, sock: PacketSocket) -> Result<Self, SetupError> {
        let setup = |what| move |source| SetupError { what, source };
        let ep = Epoll::new().map_err(setup("epoll_create"))?;
        let wake = shared.wakers[pair].try_clone().map_err(setup("dup"))?;
        ep.ctl(
            ControlOperation::Add,
            sock.fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_SOCKET),
        )
        .map_err(setup("epoll_ctl"))?;
        ep.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )
        .map_err(setup("epoll_ctl"))?;
        let recheck = TimerFd::new().map_err(|e| setup("timerfd_create")(e.into()))?;
        Ok(AfPacketQueue {
            pair,
            shared,
            sock,
            rx: RxCursor::new(RX_RING.frame_nr(), MAX_AHEAD, PEEK),
            tx_head: 0,
            tx_kernel: 0,
            late: TxDrops::default(),
            ep,
            wake,
            recheck,
            drained: false,
            tx_stalled: false,
            bounce: vec![0; RX_BOUNCE].into_boxed_slice(),
            last_stats: Instant::now(),
        })
    }

    /// Which optional socket settings took effect.
    pub fn optional(&self) -> Optional {
        self.sock.optional()
    }

    // ---- receive ----

    /// Copies RX slot `frame` (status `st`) into `iov`.
    ///
    /// # Safety
    /// `frame` must be a slot of this socket's RX ring owned by user space (TP_STATUS_USER);
    /// every iovec must be valid for writes for its length.
    unsafe fn deliver(&mut self, frame: *mut u8, st: u32, iov: &[libc::iovec]) -> Rx {
        let c = &self.shared.counters;
        // SAFETY: the slot belongs to us until we hand it back; it starts with a tpacket2_hdr
        // followed (at its aligned size) by a sockaddr_ll, both plain old data.
        let (h, pkttype) = unsafe {
            let h = std::ptr::read(frame.cast::<libc::tpacket2_hdr>());
            let sll = std::ptr::read(frame.add(TPACKET2_HDR_ALIGNED).cast::<libc::sockaddr_ll>());
            (h, sll.sll_pkttype)
        };
        if st & libc::TP_STATUS_COPY != 0 {
            // The slot holds the start; the whole frame waits on the socket's queue.
            // SAFETY: the caller vouches for the iovecs.
            return unsafe { self.deliver_copied(pkttype == libc::PACKET_OUTGOING, iov) };
        }
        if pkttype == libc::PACKET_OUTGOING {
            return Rx::Skip;
        }
        let (mac, snap, len) = (
            usize::from(h.tp_mac),
            h.tp_snaplen as usize,
            h.tp_len as usize,
        );
        if snap < len {
            c.rx_truncated.fetch_add(1, Relaxed);
            return Rx::Drop;
        }
        if mac < TPACKET2_HDRLEN + VNET_HDR_LEN
            || mac + snap > RX_RING.frame_size
            || snap < ETH_HLEN
        {
            c.rx_malformed.fetch_add(1, Relaxed);
            return Rx::Drop;
        }
        // SAFETY: both ranges lie inside the slot (checked above), which we own.
        let (vnet, data) = unsafe {
            let raw = &*frame.add(mac - VNET_HDR_LEN).cast::<[u8; VNET_HDR_LEN]>();
            (
                VnetHdr::parse(raw),
                std::slice::from_raw_parts_mut(frame.add(mac), snap),
            )
        };
        let vlan = vlan_tag(st, h.tp_vlan_tci, h.tp_vlan_tpid);
        // SAFETY: the caller vouches for the iovecs; `data` is our slot, disjoint from them.
        unsafe { Self::finish(&self.shared, vnet, data, vlan, iov) }
    }

    /// Delivers the frame a `TP_STATUS_COPY` slot stands for: reads it whole from the socket's
    /// queue into the bounce buffer (one slot, one queued frame: the kernel claims the slot and
    /// queues the frame under one lock), then as any slot. `outgoing`: only consume it.
    ///
    /// # Safety
    /// Every iovec must be valid for writes for its length.
    unsafe fn deliver_copied(&mut self, outgoing: bool, iov: &[libc::iovec]) -> Rx {
        let c = &self.shared.counters;
        let got = match self.sock.recv_copied(&mut self.bounce) {
            Ok(got) => got,
            // The kernel could not describe the frame's GSO type in a virtio-net header.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                c.rx_gso_refused.fetch_add(1, Relaxed);
                return Rx::Drop;
            }
            Err(_) => {
                c.rx_malformed.fetch_add(1, Relaxed);
                return Rx::Drop;
            }
        };
        if outgoing {
            return Rx::Skip;
        }
        if got.truncated {
            c.rx_truncated.fetch_add(1, Relaxed);
            return Rx::Drop;
        }
        if got.len < VNET_HDR_LEN + ETH_HLEN {
            c.rx_malformed.fetch_add(1, Relaxed);
            return Rx::Drop;
        }
        c.rx_copied.fetch_add(1, Relaxed);
        let (raw, data) = self.bounce[..got.len].split_at_mut(VNET_HDR_LEN);
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr.copy_from_slice(raw);
        let vlan = got
            .aux
            .and_then(|a| vlan_tag(a.tp_status, a.tp_vlan_tci, a.tp_vlan_tpid));
        // SAFETY: the caller vouches for the iovecs; `data` is our bounce buffer.
        unsafe { Self::finish(&self.shared, VnetHdr::parse(&hdr), data, vlan, iov) }
    }

    /// Checks a received frame against the guest's offloads and writes header and frame (with
    /// its VLAN tag put back) into `iov`.
    ///
    /// # Safety
    /// Every iovec must be valid for writes for its length and must not overlap `data`.
    unsafe fn finish(
        shared: &Shared,
        mut vnet: VnetHdr,
        data: &mut [u8],
        vlan: Option<VlanTag>,
        iov: &[libc::iovec],
    ) -> Rx {
        let c = &shared.counters;
        let snap = data.len();
        let offloads = shared.offloads();
        let partial = vnet.flags & crate::frame::F_NEEDS_CSUM != 0;
        match prepare_rx(&mut vnet, data, offloads, vlan.is_some()) {
            Ok(()) => {}
            Err(RxRefusal::Gso) => {
                c.rx_gso_refused.fetch_add(1, Relaxed);
                return Rx::Drop;
            }
            Err(RxRefusal::CsumOffsets) => {
                c.rx_malformed.fetch_add(1, Relaxed);
                return Rx::Drop;
            }
        }
        if partial && !offloads.csum {
            c.rx_csum_completed.fetch_add(1, Relaxed);
        }
        let hdr_len = shared.hdr_len();
        let total = hdr_len + snap + if vlan.is_some() { VLAN_HLEN } else { 0 };
        if iov_len(iov) < total {
            c.rx_too_big.fetch_add(1, Relaxed);
            return Rx::Drop;
        }
        let mut hdr = [0u8; 16];
        hdr[..VNET_HDR_LEN].copy_from_slice(&vnet.to_bytes());
        let mut w = IovWriter::new(iov);
        // SAFETY: the caller guarantees the iovecs are writable guest memory, which cannot
        // overlap our ring or stack; their total length was checked above.
        unsafe {
            w.put(&hdr[..hdr_len.min(hdr.len())]);
            match vlan {
                Some(t) => {
                    w.put(&data[..12]);
                    w.put(&t.to_bytes());
                    w.put(&data[12..]);
                }
                None => {
                    w.put(data);
                }
            }
        }
        Rx::Frame(total)
    }

    // ---- transmit ----
    //
    // Slots are counted (slot = count % ring size). `tx_kernel..tx_head` are the frames
    // written and marked TP_STATUS_SEND_REQUEST that the kernel has not taken yet; the kernel
    // looks at them only inside our own `send(2)` (this thread), starting at `tx_kernel`, and
    // stops at the first slot not marked. Before `tx_kernel`, slots are the kernel's until it
    // marks them available again (the skb was freed: at once on a veth, on TX completion on a
    // NIC).

    /// The status word of TX slot `idx`.
    fn tx_status(&self, idx: usize) -> u32 {
        // SAFETY: `tx_frame` points at a slot of the live TX ring.
        unsafe { status(self.sock.tx_frame(idx)) }.load(Acquire)
    }

    /// True when TX slot `idx` may be filled (the kernel is done with it).
    fn tx_free(&self, idx: usize) -> bool {
        self.tx_status(idx) & (libc::TP_STATUS_SEND_REQUEST | libc::TP_STATUS_SENDING) == 0
    }

    /// Frames written but not taken by the kernel yet.
    fn tx_pending(&self) -> usize {
        self.tx_head - self.tx_kernel
    }

    /// The guest frame's length in TX slot `idx`, without the vnet header.
    fn tx_frame_bytes(&self, idx: usize) -> u64 {
        // SAFETY: the slot starts with a tpacket2_hdr (plain old data) that only we write.
        let h = unsafe { std::ptr::read(self.sock.tx_frame(idx).cast::<libc::tpacket2_hdr>()) };
        u64::from(h.tp_len).saturating_sub(VNET_HDR_LEN as u64)
    }

    /// Moves `tx_kernel` past the slots the kernel took (sending or sent).
    fn reap(&mut self) {
        while self.tx_kernel < self.tx_head {
            let st = self.tx_status(self.tx_kernel);
            if st & (libc::TP_STATUS_SEND_REQUEST | libc::TP_STATUS_WRONG_FORMAT) != 0 {
                break;
            }
            self.tx_kernel += 1;
        }
    }

    /// Takes back every pending frame, counted as lost (in `late` and `counter`), so the ring
    /// and the kernel's position agree again. Only called between kicks, when the kernel does
    /// not look at pending slots.
    fn drop_pending(&mut self, counter: fn(&AfPacketCounters) -> &AtomicU64) {
        let n = self.tx_pending() as u64;
        for idx in self.tx_kernel..self.tx_head {
            self.late.failed_bytes += self.tx_frame_bytes(idx);
            // SAFETY: a pending slot of the live TX ring; the kernel does not own it.
            unsafe { status(self.sock.tx_frame(idx)) }.store(libc::TP_STATUS_AVAILABLE, Release);
        }
        self.late.failed += n;
        counter(&self.shared.counters).fetch_add(n, Relaxed);
        self.tx_head = self.tx_kernel;
    }

    /// The kernel refused the frame at `tx_kernel` (marked it `TP_STATUS_WRONG_FORMAT`, e.g. a
    /// GSO header it rejects, and stopped there). Counts it and closes the gap: the frames
    /// behind it move down one slot, so the kernel, which resumes at the refused slot, finds
    /// them in order.
    fn refuse_at_kernel(&mut self) {
        let k = self.tx_kernel;
        self.late.rejected += 1;
        self.late.rejected_bytes += self.tx_frame_bytes(k);
        self.shared.counters.tx_refused.fetch_add(1, Relaxed);
        for idx in k..self.tx_head - 1 {
            let (dst, src) = (self.sock.tx_frame(idx), self.sock.tx_frame(idx + 1));
            // SAFETY: two distinct pending slots of the live TX ring (the kernel looks at
            // neither outside our `send(2)`); the copy stays within the written part of the
            // source slot (tp_len bytes at TX_DATA_OFFSET, bounded by the slot size when it
            // was written).
            unsafe {
                let h = std::ptr::read(src.cast::<libc::tpacket2_hdr>());
                let len = (h.tp_len as usize).min(TX_RING.frame_size - TX_DATA_OFFSET);
                std::ptr::copy_nonoverlapping(
                    src.add(TX_DATA_OFFSET),
                    dst.add(TX_DATA_OFFSET),
                    len,
                );
                std::ptr::addr_of_mut!((*dst.cast::<libc::tpacket2_hdr>()).tp_len).write(h.tp_len);
                status(dst).store(libc::TP_STATUS_SEND_REQUEST, Release);
            }
        }
        let last = self.sock.tx_frame(self.tx_head - 1);
        // SAFETY: a pending slot of the live TX ring, now empty.
        unsafe { status(last) }.store(libc::TP_STATUS_AVAILABLE, Release);
        self.tx_head -= 1;
    }

    /// Kicks the kernel to take the pending frames and accounts for what it did: frames it
    /// refused are counted and the rest kicked again; the interface being down or gone drops
    /// the pending frames (counted) and ends the attempt; congestion leaves them pending, for
    /// the caller's bounded wait.
    fn kick(&mut self) -> io::Result<()> {
        loop {
            let r = self.sock.kick();
            self.reap();
            if self.tx_pending() > 0
                && self.tx_status(self.tx_kernel) & libc::TP_STATUS_WRONG_FORMAT != 0
            {
                self.refuse_at_kernel();
                continue;
            }
            let Err(e) = r else {
                return Ok(());
            };
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Ok(()),
                Some(libc::ENETDOWN) | Some(libc::ENXIO) | Some(libc::ENODEV) => {
                    self.drop_pending(|c| &c.tx_link_down);
                    Err(e)
                }
                _ => {
                    self.drop_pending(|c| &c.tx_failed);
                    Err(e)
                }
            };
        }
    }

    /// Waits (bounded by [`TX_STALL`]) until `done` holds, kicking the kernel and sleeping on
    /// POLLOUT. At the deadline the pending frames are dropped (counted).
    fn wait_tx(&mut self, done: impl Fn(&Self) -> bool) -> io::Result<()> {
        let deadline = Instant::now()
            + if self.tx_stalled {
                Duration::ZERO
            } else {
                TX_STALL
            };
        loop {
            self.kick()?;
            if done(self) {
                self.tx_stalled = false;
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                self.tx_stalled = true;
                self.drop_pending(|c| &c.tx_stalled);
                if done(self) {
                    return Ok(());
                }
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not free an AF_PACKET TX slot in time",
                ));
            }
            self.sock
                .wait_writable((deadline - now).min(Duration::from_millis(1)));
        }
    }

    // ---- events ----

    /// Swaps in the socket the watcher opened on a re-created interface.
    fn take_replacement(&mut self) -> bool {
        let Some(sock) = self.shared.take_replacement(self.pair) else {
            return false;
        };
        let _ = self.ep.ctl(
            ControlOperation::Delete,
            self.sock.fd(),
            EpollEvent::default(),
        );
        // Adding reports frames that arrived since the watcher bound the socket.
        if let Err(e) = self.ep.ctl(
            ControlOperation::Add,
            sock.fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_SOCKET),
        ) {
            tracing::error!(
                interface = self.shared.name(),
                queue = self.pair,
                error = %e,
                "cannot watch the new socket"
            );
        }
        // Frames still pending in the old ring never reach the new interface.
        self.drop_pending(|c| &c.tx_link_down);
        self.sock = sock;
        self.rx.reset();
        self.tx_head = 0;
        self.tx_kernel = 0;
        self.tx_stalled = false;
        true
    }

    /// Handles what the private epoll set reports: a socket error (cleared; the watcher
    /// follows the link), the watcher's doorbell (a replacement socket), and now and then the
    /// kernel's RX drop counter. Returns true when the ring may hold frames the last look
    /// missed: the socket was replaced, or reported readable.
    ///
    /// The readable report matters: taking it here empties the private set, so the worker's
    /// epoll (which polls this set before reporting it) no longer sees the wake-up it queued.
    /// A frame the kernel wrote just after the caller looked would otherwise wait for the next
    /// wake-up, and if it filled the ring there is none: the kernel drops further frames
    /// without waking anyone, and the queue would stall for good.
    fn poll_events(&mut self) -> bool {
        let mut events = [EpollEvent::default(); 4];
        let n = self.ep.wait(0, &mut events).unwrap_or(0);
        let mut look_again = false;
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_SOCKET => {
                    if ev.event_set().contains(EventSet::ERROR) {
                        let _ = self.sock.take_error();
                    }
                    look_again |= ev.event_set().contains(EventSet::IN);
                }
                TOKEN_WAKE => {
                    let _ = self.wake.read();
                    look_again |= self.take_replacement();
                }
                _ => {}
            }
        }
        if self.last_stats.elapsed() >= STATS_INTERVAL {
            self.last_stats = Instant::now();
            if let Ok((_, drops)) = self.sock.take_stats() {
                if drops > 0 {
                    self.shared
                        .counters
                        .rx_ring_full
                        .fetch_add(u64::from(drops), Relaxed);
                    tracing::warn!(
                        interface = self.shared.name(),
                        queue = self.pair,
                        drops,
                        "RX ring full: the kernel dropped frames for the guest"
                    );
                }
            }
        }
        look_again
    }
}

impl HostQueue for AfPacketQueue {
    fn rx_fd(&self) -> RawFd {
        self.ep.as_raw_fd()
    }

    fn recheck_fd(&self) -> Option<RawFd> {
        Some(self.recheck.as_raw_fd())
    }

    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        loop {
            let sock = &self.sock;
            self.rx.release_consumed(|slot| {
                // SAFETY: a slot of the live RX ring that we consumed; handing it back to the
                // kernel ends our use of it.
                unsafe { status(sock.rx_frame(slot)) }.store(libc::TP_STATUS_KERNEL, Release);
            });
            let picked = self.rx.pick(|slot| {
                // SAFETY: `rx_frame` points at a slot of the live RX ring.
                unsafe { status(sock.rx_frame(slot)) }.load(Acquire) & libc::TP_STATUS_USER != 0
            });
            let Some(slot) = picked else {
                if self.poll_events() {
                    continue;
                }
                // After a drain that found frames, look again shortly whether or not a wake-up
                // comes. Under overload Linux 6.18 was seen to leave frames in the ring, the
                // private epoll set readable, and no edge reaching the worker's set (which
                // nests it); a ring left full that way would never wake anyone again. The
                // timer sits in the worker's set directly (`recheck_fd`), and re-arming it
                // resets its expiry count. Idle queues never arm it.
                if std::mem::take(&mut self.drained) {
                    let _ = self.recheck.reset(RECHECK_DELAY, None);
                }
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let frame = self.sock.rx_frame(slot);
            // SAFETY: a slot of the live RX ring.
            let st = unsafe { status(frame) }.load(Acquire);
            // SAFETY: the slot is ours (TP_STATUS_USER); the caller vouches for the iovecs.
            let r = unsafe { self.deliver(frame, st, iov) };
            if self.rx.consumed(slot) {
                // SAFETY: as above; handing the slot back to the kernel ends our use of it.
                unsafe { status(frame) }.store(libc::TP_STATUS_KERNEL, Release);
            }
            match r {
                Rx::Frame(len) => {
                    self.drained = true;
                    return Ok(len);
                }
                Rx::Skip => continue,
                Rx::Drop => return Err(io::ErrorKind::InvalidInput.into()),
            }
        }
    }

    unsafe fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let hdr_len = self.shared.hdr_len();
        let total = iov_len(iov);
        let max = TX_RING.frame_size - TX_DATA_OFFSET - VNET_HDR_LEN;
        if total < hdr_len + ETH_HLEN || total - hdr_len > max {
            self.shared.counters.tx_refused.fetch_add(1, Relaxed);
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let frame_len = total - hdr_len;
        let mut r = IovReader::new(iov);
        let mut raw = [0u8; VNET_HDR_LEN];
        // SAFETY: the caller guarantees the iovecs are readable; `raw` is a local buffer.
        unsafe {
            r.read(&mut raw);
            r.read_raw(std::ptr::null_mut(), hdr_len - VNET_HDR_LEN);
        }
        let mut vnet = VnetHdr::parse(&raw);
        if prepare_tx(&mut vnet, frame_len, false).is_err() {
            self.shared.counters.tx_refused.fetch_add(1, Relaxed);
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let errno = match self.shared.link() {
            Link::Up => 0,
            Link::Down => libc::ENETDOWN,
            Link::Gone => {
                // The watcher may have a new socket waiting.
                self.poll_events();
                if self.shared.link() == Link::Gone {
                    libc::ENXIO
                } else {
                    0
                }
            }
        };
        if errno != 0 {
            self.shared.counters.tx_link_down.fetch_add(1, Relaxed);
            return Err(io::Error::from_raw_os_error(errno));
        }
        // The slot at `tx_head` is in use when the ring is full of pending frames, or still
        // being sent from (a NIC completes transmissions later).
        let n = TX_RING.frame_nr();
        if self.tx_pending() >= n || !self.tx_free(self.tx_head) {
            self.wait_tx(|q| q.tx_pending() < n && q.tx_free(q.tx_head))?;
        }
        let frame = self.sock.tx_frame(self.tx_head);
        // SAFETY: the slot is free (the kernel does not touch it until we mark it), and holds
        // TX_DATA_OFFSET + VNET_HDR_LEN + `max` bytes; the iovecs are readable guest memory
        // disjoint from the ring.
        unsafe {
            let data = frame.add(TX_DATA_OFFSET);
            std::ptr::copy_nonoverlapping(vnet.to_bytes().as_ptr(), data, VNET_HDR_LEN);
            r.read_raw(data.add(VNET_HDR_LEN), frame_len);
            let h = frame.cast::<libc::tpacket2_hdr>();
            std::ptr::addr_of_mut!((*h).tp_len).write((VNET_HDR_LEN + frame_len) as u32);
            status(frame).store(libc::TP_STATUS_SEND_REQUEST, Release);
        }
        // Handed to the kernel by the next `flush` (one system call per burst).
        self.tx_head += 1;
        Ok(total)
    }

    fn flush(&mut self) -> TxDrops {
        if self.tx_pending() > 0 {
            // Errors are accounted for in `late` (frames dropped) and the port's counters.
            let _ = self.wait_tx(|q| q.tx_pending() == 0);
        }
        std::mem::take(&mut self.late)
    }
}
