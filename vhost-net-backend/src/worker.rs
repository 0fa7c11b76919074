//! One queue pair's worker: moves frames between its host queue and the guest's RX/TX rings.
//!
//! A worker is only ever driven by its own thread (through [`crate::NetBackend`]'s per-worker
//! mutex, which the control thread takes only for setup), so the hot path shares no lock.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use crate::dirty::{GuestMemoryMmap, VringMutex};

use crate::features::{mrg_rxbuf, vnet_hdr_len, GuestOffloads, MAX_GSO_FRAME};
use crate::port::HostQueue;
use crate::rx::{RxBuffers, Slot};
use crate::security::SourceCheck;
use crate::stats::{DropReason, QueueStats};
use crate::tx::{send_chain, NotSent, TxBurst};
use crate::used::{UsedBatch, UsedError};

/// Frames moved per direction before the other direction gets its turn.
const BUDGET: usize = 256;
/// TX chains gathered behind one read of the avail index.
const TX_BATCH: usize = 32;
// A host queue that reads a burst's frames at flush needs each frame's port-security copy to
// last the whole burst.
const _: () = assert!(TX_BATCH <= crate::security::HEAD_COPIES);
/// Received frames between two used-index updates of the RX ring.
const RX_BATCH: usize = 32;

/// Per-direction index inside a worker's pair of vrings.
const RX: usize = 0;
const TX: usize = 1;

/// Frames and bytes (without the virtio-net header) one TX pass handed to the host.
#[derive(Default)]
struct TxSent {
    frames: u64,
    bytes: u64,
}

/// What a pass over one direction found.
#[derive(Clone, Copy, Default)]
struct Pass {
    /// Frames moved.
    moved: usize,
    /// Work remains that this pass left for the next one.
    more: bool,
}

/// True when the guest's avail index claims at most a ring's worth of new entries. With a bogus
/// index, `pop_descriptor_chain` yields nothing while `enable_notification` keeps reporting new
/// entries, so a loop trusting the latter would spin forever.
fn avail_idx_sane(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| idx.0.wrapping_sub(q.next_avail()) <= q.size())
}

/// The state of one queue pair.
pub struct QueuePairWorker {
    port: Box<dyn HostQueue>,
    stats: Arc<QueueStats>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    vrings: Option<[VringMutex; 2]>,
    rx_bufs: RxBuffers,
    /// The host queue's [`HostQueue::max_iovecs`].
    rx_max_iov: usize,
    /// The TX burst being sent.
    tx: TxBurst,
    /// The host queue may hold frames (cleared when `recv` says `WouldBlock`).
    host_readable: bool,
    hdr_len: usize,
    mergeable: bool,
    /// `VHOST_F_LOG_ALL` acked: guest memory written directly is marked in the dirty log.
    logging: bool,
    max_frame: usize,
    mtu: u16,
    busy_poll: Duration,
    /// Port security: the source address guest frames must carry.
    source_check: Option<SourceCheck>,
    log: crate::log::Limiter,
}

// SAFETY: `tx` only holds pointers into guest memory during one TX burst and is cleared after
// it; everything else is Send.
unsafe impl Send for QueuePairWorker {}

impl QueuePairWorker {
    /// A worker for one host queue.
    pub fn new(
        port: Box<dyn HostQueue>,
        stats: Arc<QueueStats>,
        mtu: u16,
        busy_poll: Duration,
    ) -> Self {
        let mut w = QueuePairWorker {
            rx_max_iov: port.max_iovecs(),
            port,
            stats,
            mem: None,
            vrings: None,
            rx_bufs: RxBuffers::default(),
            tx: TxBurst::default(),
            host_readable: true,
            hdr_len: 12,
            mergeable: false,
            logging: false,
            max_frame: 0,
            mtu,
            busy_poll,
            source_check: None,
            log: crate::log::Limiter::default(),
        };
        w.set_features(0);
        w
    }

    /// Port security: with `Some(mac)`, guest frames whose Ethernet source is not `mac` are
    /// dropped (counted as [`DropReason::SpoofedSource`]) before they reach the host.
    pub fn set_source_mac(&mut self, mac: Option<[u8; 6]>) {
        self.source_check = mac.map(SourceCheck::new);
    }

    /// The port-security MAC, for tests.
    #[cfg(test)]
    pub(crate) fn source_mac(&self) -> Option<[u8; 6]> {
        self.source_check.as_ref().map(SourceCheck::mac)
    }

    /// The negotiated header length and MRG_RXBUF, for tests.
    #[cfg(test)]
    pub(crate) fn header(&self) -> (usize, bool) {
        (self.hdr_len, self.mergeable)
    }

    /// The host queue's receive fd.
    pub fn host_fd(&self) -> std::os::fd::RawFd {
        self.port.rx_fd()
    }

    /// The host queue's recheck fd, if it has one (see [`crate::HostQueue::recheck_fd`]).
    pub fn host_recheck_fd(&self) -> Option<std::os::fd::RawFd> {
        self.port.recheck_fd()
    }

    /// Forgets the previous frontend's session.
    pub fn reset(&mut self) {
        self.rx_bufs.clear();
        self.vrings = None;
        self.mem = None;
        self.host_readable = true;
        self.set_features(0);
        self.port.set_active(false);
    }

    /// Applies the guest's acked features.
    pub fn set_features(&mut self, acked: u64) {
        self.hdr_len = vnet_hdr_len(acked);
        self.mergeable = mrg_rxbuf(acked);
        self.logging = acked & crate::features::VHOST_F_LOG_ALL != 0;
        let frame = if GuestOffloads::from_features(acked).any_gso() {
            MAX_GSO_FRAME
        } else {
            usize::from(self.mtu) + 14 + 4
        };
        self.max_frame = frame;
    }

    /// Sets the guest memory map.
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        self.mem = Some(mem);
        self.port.set_active(true);
    }

    /// Places frames `src` writes into the guest's RX buffers, from the calling thread, until
    /// `src` has no more or the guest has no room: for frames another thread of this process
    /// holds (a switch copying straight from one guest into another). Does nothing before the
    /// worker has run once in this session (it does not know the rings yet).
    pub fn rx_from(&mut self, src: &mut crate::port::RxSourceFn<'_>) {
        let (Some(vrings), Some(mem)) = (
            self.vrings.clone(),
            self.mem.as_ref().map(|m| m.memory().into_inner()),
        ) else {
            return;
        };
        for _ in 0..64 {
            if !self
                .process_rx_from(&vrings[RX], &mem, Some(&mut *src))
                .more
            {
                break;
            }
        }
    }

    /// Delivers what the host queue holds for the guest now, from the calling thread: for a
    /// host queue fed by another thread of this process (a switch), which calls this after
    /// queueing frames instead of waking this worker's thread. Does nothing before the worker
    /// has run once in this session.
    pub fn rx_now(&mut self) {
        let (Some(vrings), Some(mem)) = (
            self.vrings.clone(),
            self.mem.as_ref().map(|m| m.memory().into_inner()),
        ) else {
            return;
        };
        self.host_readable = true;
        // Bounded: a queue refilled as fast as it is drained goes back to its own thread.
        for _ in 0..4 {
            if !self.process_rx(&vrings[RX], &mem).more {
                break;
            }
        }
    }

    /// Gives held RX buffers back before the frontend reads the ring base of `queue`
    /// (0 = RX, 1 = TX of this pair).
    pub fn stop(&mut self, queue: usize) {
        if queue == RX {
            if let Some(v) = &self.vrings {
                let mut state = v[RX].get_mut();
                self.rx_bufs.give_back(state.get_queue_mut());
            } else {
                self.rx_bufs.clear();
            }
        }
    }

    /// Handles one wake-up: a kick on a ring or the host queue becoming readable. Runs both
    /// directions until neither has work, then busy-polls for `busy_poll` before sleeping.
    pub fn handle(&mut self, host_event: bool, vrings: &[VringMutex]) {
        if vrings.len() < 2 {
            return;
        }
        if self.vrings.is_none() {
            self.vrings = Some([vrings[RX].clone(), vrings[TX].clone()]);
        }
        if host_event {
            self.host_readable = true;
        }
        let Some(mem) = self.mem.as_ref().map(|m| m.memory().into_inner()) else {
            return;
        };
        let mut last_work = Instant::now();
        let mut found_work = false;
        loop {
            let tx = self.process_tx(&vrings[TX], &mem);
            let rx = self.process_rx(&vrings[RX], &mem);
            if tx.moved + rx.moved > 0 {
                found_work = true;
                last_work = Instant::now();
            }
            if tx.more || rx.more {
                continue;
            }
            if self.busy_poll.is_zero() || last_work.elapsed() >= self.busy_poll {
                break;
            }
            // Busy-poll: look at the host queue again without waiting for epoll.
            self.host_readable = true;
            std::hint::spin_loop();
        }
        let counter = if found_work {
            &self.stats.busy_wakeups
        } else {
            &self.stats.idle_wakeups
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn process_tx(&mut self, vring: &VringMutex, mem: &Arc<GuestMemoryMmap>) -> Pass {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Pass::default();
        }
        let mut pass = Pass::default();
        let q: &mut Queue = state.get_queue_mut();
        let max_len = self.hdr_len + MAX_GSO_FRAME;
        // Passes in a row that popped nothing although the ring said it had entries: a guest
        // can make avail entries unreadable (ring in a memory hole) while `idx` moves on, and
        // must not be able to keep this loop spinning.
        let mut empty_passes = 0;
        let mut sent = TxSent::default();
        let mut used = UsedBatch::new(q);
        'ring: loop {
            let _ = q.disable_notification(mem.as_ref());
            let moved_before = pass.moved;
            loop {
                let room = TX_BATCH.min(BUDGET - pass.moved);
                self.tx.gather(q, mem, max_len, room);
                if self.tx.chains.is_empty() {
                    break;
                }
                let ring_broken = self.send_burst(q, mem, &mut used, &mut sent);
                pass.moved += self.tx.chains.len();
                self.tx.clear();
                if ring_broken {
                    break 'ring;
                }
                if pass.moved >= BUDGET {
                    pass.more = true;
                    break 'ring;
                }
            }
            match q.enable_notification(mem.as_ref()) {
                Ok(true) if avail_idx_sane(q, mem) && empty_passes < 2 => {
                    if pass.moved == moved_before {
                        empty_passes += 1;
                    }
                    continue;
                }
                _ => break,
            }
        }
        self.stats
            .tx
            .frames
            .fetch_add(sent.frames, std::sync::atomic::Ordering::Relaxed);
        self.stats
            .tx
            .bytes
            .fetch_add(sent.bytes, std::sync::atomic::Ordering::Relaxed);
        if pass.moved > 0 && used.needs_notification(q, mem.as_ref()) {
            let _ = state.signal_used_queue();
            self.stats
                .tx
                .notifications
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        pass
    }

    /// Sends the frames of the gathered burst, gives the guest its chains back with one index
    /// update, then flushes the host queue once. True when the used ring turned out to be
    /// unwritable (the rest of the ring is left alone).
    fn send_burst(
        &mut self,
        q: &mut Queue,
        mem: &Arc<GuestMemoryMmap>,
        used: &mut UsedBatch,
        sent: &mut TxSent,
    ) -> bool {
        let mut ring_broken = false;
        // Out of `self` for the loop (no allocation: the vectors move), so drops can go
        // through `tx_drop`; put back below.
        let burst = std::mem::take(&mut self.tx);
        for c in &burst.chains {
            let iov = &burst.iov[c.iov.clone()];
            // SAFETY: the iovecs were just built from guest memory that `mem` keeps mapped for
            // the whole burst.
            match unsafe {
                send_chain(
                    self.port.as_mut(),
                    self.source_check.as_mut(),
                    self.hdr_len,
                    c,
                    iov,
                )
            } {
                Ok(len) => {
                    sent.frames += 1;
                    sent.bytes += len as u64;
                }
                Err(NotSent::Dropped(reason)) => self.tx_drop(reason),
                Err(NotSent::HostError(e)) => {
                    self.log.warn("tx", &e);
                    self.tx_drop(DropReason::HostError);
                }
            }
            match used.push(q, mem.as_ref(), c.head, 0) {
                Ok(()) => {}
                // A head index beyond the ring (counted as a bad chain above) has no used
                // entry to take; the chains behind it are still served.
                Err(UsedError::BadHead(_)) => {}
                Err(UsedError::BadAddress) => {
                    self.tx_drop(DropReason::BadAddress);
                    ring_broken = true;
                    break;
                }
            }
        }
        self.tx = burst;
        // A host queue that reads the burst's buffers in `flush` gets it before the guest gets
        // them back.
        let early = self.port.flush_before_release();
        let late = if early {
            self.port.flush()
        } else {
            crate::TxDrops::default()
        };
        // The guest gets the burst's buffers back with one index update, before the flush
        // below spends its time in the kernel.
        if used.publish(q, mem.as_ref()).is_err() {
            self.tx_drop(DropReason::BadAddress);
            ring_broken = true;
        }
        // One flush per burst; frames it still loses move from the sent to the dropped
        // counters.
        let late = if early { late } else { self.port.flush() };
        if !late.is_empty() {
            sent.frames = sent.frames.saturating_sub(late.rejected + late.failed);
            sent.bytes = sent
                .bytes
                .saturating_sub(late.rejected_bytes + late.failed_bytes);
            for _ in 0..late.rejected {
                self.tx_drop(DropReason::HostRejected);
            }
            for _ in 0..late.failed {
                self.tx_drop(DropReason::HostError);
            }
        }
        ring_broken
    }

    /// Sends `frame`, an Ethernet frame the device makes itself (an announcement), out of the
    /// host queue behind an empty virtio-net header, under the same port-security check as
    /// guest frames. Counted like a guest frame sent, or dropped.
    pub(crate) fn inject(&mut self, frame: &[u8]) -> io::Result<()> {
        let hdr = [0u8; 12];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: self.hdr_len.min(hdr.len()),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        let hdr_len = self.hdr_len;
        let checked = match self.source_check.as_mut() {
            // SAFETY: both iovecs describe local buffers alive for the whole call.
            Some(c) => unsafe { c.check(&iov, hdr_len) }.map(<[libc::iovec]>::to_vec),
            None => Some(iov.to_vec()),
        };
        let Some(iov) = checked else {
            self.tx_drop(DropReason::SpoofedSource);
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "source address is not the port's MAC",
            ));
        };
        // SAFETY: the iovecs describe `hdr` and `frame` (or the security check's own copy),
        // all alive until the call returns.
        let sent = unsafe { self.port.send(&iov) };
        let drops = self.port.flush();
        match sent {
            Ok(_) if drops.is_empty() => {
                self.stats
                    .tx
                    .frames
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.stats
                    .tx
                    .bytes
                    .fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Ok(_) => {
                self.tx_drop(DropReason::HostError);
                Err(io::Error::other("the host port dropped the frame"))
            }
            Err(e) => {
                self.tx_drop(DropReason::HostError);
                Err(e)
            }
        }
    }

    fn tx_drop(&mut self, reason: DropReason) {
        self.stats.tx.drop(reason);
        self.log.drop("tx", reason);
    }

    fn rx_drop(&mut self, reason: DropReason) {
        self.stats.rx.drop(reason);
        self.log.drop("rx", reason);
    }

    fn process_rx(&mut self, vring: &VringMutex, mem: &Arc<GuestMemoryMmap>) -> Pass {
        self.process_rx_from(vring, mem, None)
    }

    /// Fills the guest's RX buffers from the host queue, or from `external` when given (frames
    /// another thread of this process hands over, see [`QueuePairWorker::rx_from`]).
    fn process_rx_from(
        &mut self,
        vring: &VringMutex,
        mem: &Arc<GuestMemoryMmap>,
        mut external: Option<&mut crate::port::RxSourceFn<'_>>,
    ) -> Pass {
        let mut pass = Pass::default();
        if external.is_none() && !self.host_readable {
            return pass;
        }
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return pass;
        }
        let q: &mut Queue = state.get_queue_mut();
        let need = self.hdr_len + self.max_frame;
        let _ = q.disable_notification(mem.as_ref());
        let mut starved_retries = 0;
        // Completed chains are published every RX_BATCH frames, when the guest has to post
        // more buffers, and at the end of the pass: one used-index store per batch.
        let mut used = UsedBatch::new(q);
        let mut unpublished = 0;
        // Host frames taken this pass, delivered or dropped: frames the guest's buffers cannot
        // take are consumed too, and a flood of them must not keep the ring locked for good.
        let mut taken = 0;
        loop {
            if taken >= BUDGET {
                pass.more = true;
                break;
            }
            if unpublished >= RX_BATCH {
                let _ = used.publish(q, mem.as_ref());
                unpublished = 0;
            }
            let (iov, capacity) = match self.rx_bufs.prepare(
                q,
                mem,
                &mut used,
                need,
                self.mergeable,
                self.rx_max_iov,
                &self.stats.rx,
            ) {
                Slot::Ready(iov, capacity) => (iov, capacity),
                Slot::Starved => {
                    if starved_retries == 0 {
                        self.stats
                            .rx_ring_full
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // The guest refills what it sees used: show it everything first. Then ask
                    // it for a kick when it posts buffers; re-check for a race. Bounded
                    // retries: see `empty_passes` in process_tx. Notifications stay enabled
                    // when we give up, so the guest's next buffer wakes us.
                    let _ = used.publish(q, mem.as_ref());
                    unpublished = 0;
                    match q.enable_notification(mem.as_ref()) {
                        Ok(true) if avail_idx_sane(q, mem) && starved_retries < 2 => {
                            starved_retries += 1;
                            let _ = q.disable_notification(mem.as_ref());
                            continue;
                        }
                        _ => break,
                    }
                }
            };
            let got = match external.as_mut() {
                Some(f) => f(iov),
                // SAFETY: the iovecs come from `RxBuffers`, which keeps the memory map they
                // point into alive while it holds them.
                None => unsafe { self.port.recv(iov) },
            };
            match got {
                // A longer frame than the buffers offered would be a host queue that truncates:
                // never completed (that would hand the guest a cut frame), dropped like one
                // that did not fit, and the buffers wait for the next frame.
                Ok(len) if len >= self.hdr_len && len <= capacity => {
                    let hdr_has_num_buffers = self.hdr_len > crate::features::VNET_HDR_LEN_LEGACY;
                    self.rx_bufs.complete(
                        q,
                        mem,
                        &mut used,
                        len,
                        hdr_has_num_buffers,
                        self.logging,
                    );
                    unpublished += 1;
                    self.stats.rx.frame(len - self.hdr_len);
                    pass.moved += 1;
                    taken += 1;
                    starved_retries = 0;
                }
                Ok(len) if len > capacity => {
                    self.rx_drop(DropReason::Oversize);
                    taken += 1;
                }
                Ok(_) => {
                    self.stats.rx.drop(DropReason::HostError);
                    taken += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if external.is_none() {
                        self.host_readable = false;
                    }
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    self.rx_drop(DropReason::Oversize);
                    taken += 1;
                }
                Err(e) => {
                    self.stats.rx.drop(DropReason::HostError);
                    self.log.warn("rx", &e);
                    break;
                }
            }
        }
        // A used ring outside guest memory fails every write alike; chains already pushed
        // stay unpublished and the guest sees a stuck ring it broke itself.
        let _ = used.publish(q, mem.as_ref());
        if pass.moved > 0 && used.needs_notification(q, mem.as_ref()) {
            let _ = state.signal_used_queue();
            self.stats
                .rx
                .notifications
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        pass
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::mpsc;

    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::port::TxDrops;
    use crate::testing::*;

    const V1: u64 = bit(VIRTIO_F_VERSION_1);
    const MRG: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);
    const GSO: u64 = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);

    /// One queue pair: the guest's two rings, the device's vrings and worker, the host side.
    struct Pair<'a> {
        rx: Driver<'a>,
        tx: Driver<'a>,
        vrings: [VringMutex; 2],
        worker: QueuePairWorker,
        host: FakeQueue,
        stats: Arc<QueueStats>,
    }

    fn pair<'a>(
        gm: &'a GuestMemoryMmap,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        sizes: (u16, u16),
        mtu: u16,
        acked: u64,
    ) -> Pair<'a> {
        let rx = Driver::new(gm, RX_RING, sizes.0, RX_BUFS);
        let tx = Driver::new(gm, TX_RING, sizes.1, TX_BUFS);
        let vrings = [rx.vring(mem), tx.vring(mem)];
        let host = FakeQueue::default();
        let stats = Arc::new(QueueStats::default());
        let mut worker =
            QueuePairWorker::new(Box::new(host.clone()), stats.clone(), mtu, Duration::ZERO);
        worker.set_memory(mem.clone());
        worker.set_features(acked);
        Pair {
            rx,
            tx,
            vrings,
            worker,
            host,
            stats,
        }
    }

    impl Pair<'_> {
        fn run(&mut self, host_event: bool) {
            self.worker.handle(host_event, &self.vrings);
        }

        fn next_avail(&self, q: usize) -> u16 {
            self.vrings[q].queue_next_avail()
        }
    }

    /// A call eventfd installed on `vring`; the returned end reads the interrupts signalled.
    fn install_call(vring: &VringMutex) -> EventFd {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let fd = efd.try_clone().unwrap().into_raw_fd();
        // SAFETY: `fd` was just duplicated and is owned by nothing else; the File takes it.
        vring.set_call(Some(unsafe { File::from_raw_fd(fd) }));
        efd
    }

    fn interrupts(efd: &EventFd) -> u64 {
        efd.read().unwrap_or(0)
    }

    fn num_buffers(d: &Driver<'_>, addr: u64) -> u16 {
        let b = d.read(addr + crate::features::NUM_BUFFERS_OFFSET as u64, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    // ---- TX ----

    #[test]
    fn tx_frame_split_over_descriptors_reaches_host_byte_exact() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        let call = install_call(&p.vrings[TX]);
        let f1 = frame(12, 12 + 60, 1);
        let f2 = frame(12, 12 + 1514, 2);
        // Header alone, then 20 bytes, then the rest; and a header split across descriptors.
        let h1 = p.tx.add_tx(&f1, &[12, 20, 0]);
        let h2 = p.tx.add_tx(&f2, &[5, 1000, 0]);
        p.run(false);

        assert_eq!(p.host.sent(), vec![f1, f2]);
        assert_eq!(p.host.state().send_iovecs, vec![3, 3]);
        assert_eq!(
            p.tx.all_used(),
            vec![(u32::from(h1), 0), (u32::from(h2), 0)]
        );
        assert_eq!(p.next_avail(TX), 2);
        assert_eq!(p.stats.tx.frames.load(Relaxed), 2);
        assert_eq!(p.stats.tx.bytes.load(Relaxed), 60 + 1514);
        assert_eq!(p.stats.tx.total_drops(), 0);
        assert_eq!(p.stats.tx.notifications.load(Relaxed), 1);
        assert_eq!(interrupts(&call), 1);
        assert_eq!(p.stats.busy_wakeups.load(Relaxed), 1);

        // Nothing new: an idle wake-up, no interrupt.
        p.run(false);
        assert_eq!(p.stats.idle_wakeups.load(Relaxed), 1);
        assert_eq!(interrupts(&call), 0);
    }

    #[test]
    fn tx_port_security_passes_only_the_ports_source_address() {
        let mac = [0x02, 0, 0, 0, 0, 0x42];
        for (acked, hdr) in [(V1, 12), (0, 10)] {
            let (gm, mem) = guest_memory();
            let mut p = pair(&gm, &mem, (16, 16), 1500, acked);
            p.worker.set_source_mac(Some(mac));
            let from = |src: [u8; 6], seed| {
                let mut f = frame(hdr, hdr + 60, seed);
                f[hdr + 6..hdr + 12].copy_from_slice(&src);
                f
            };
            let other = [0x02, 0, 0, 0, 0, 0x43];
            let good = from(mac, 1);
            let good_split = from(mac, 2);
            let mut heads = vec![
                p.tx.add_tx(&good, &[0]),
                p.tx.add_tx(&from(other, 3), &[0]),
                // Header, then a descriptor ending inside the source address.
                p.tx.add_tx(&good_split, &[hdr, 9, 0]),
                p.tx.add_tx(&from(other, 4), &[3, hdr + 5, 1, 0]),
                p.tx.add_tx(&from([0xff; 6], 5), &[0]),
            ];
            // Shorter than a header and an Ethernet header: a runt, whatever its bytes.
            heads.push(p.tx.add_tx(&from(mac, 6)[..hdr + 13], &[0]));
            p.run(false);
            assert_eq!(p.host.sent(), vec![good, good_split], "header {hdr}");
            let s = &p.stats.tx;
            assert_eq!(s.drops_of(DropReason::SpoofedSource), 3);
            assert_eq!(s.drops_of(DropReason::Runt), 1);
            assert_eq!(s.frames.load(Relaxed), 2);
            assert_eq!(
                p.tx.all_used(),
                heads.iter().map(|&h| (u32::from(h), 0)).collect::<Vec<_>>()
            );
            // Turned off, any source passes.
            p.worker.set_source_mac(None);
            let spoofed = from(other, 7);
            p.tx.add_tx(&spoofed, &[0]);
            p.run(false);
            assert_eq!(p.host.sent().last(), Some(&spoofed));
        }
    }

    #[test]
    fn tx_legacy_header_is_ten_bytes() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, 0);
        let runt = frame(10, 10 + 13, 1);
        let min = frame(10, 10 + 14, 2);
        p.tx.add_tx(&runt, &[0]);
        p.tx.add_tx(&min, &[0]);
        p.run(false);
        assert_eq!(p.host.sent(), vec![min]);
        assert_eq!(p.stats.tx.drops_of(DropReason::Runt), 1);
        assert_eq!(p.stats.tx.bytes.load(Relaxed), 14);
        assert_eq!(p.tx.used_idx(), 2);
    }

    #[test]
    fn tx_hostile_chains_are_counted_returned_and_do_not_block_good_ones() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 256), 1500, V1);
        let size = p.tx.size();
        let good = frame(12, 12 + 64, 9);
        let mut expect_used = Vec::new();
        fn add_good(p: &mut Pair<'_>, good: &[u8], expect_used: &mut Vec<(u32, u32)>) {
            let h = p.tx.add_tx(good, &[30, 0]);
            expect_used.push((u32::from(h), 0));
        }
        // A device-writable descriptor in a TX chain.
        let a = p.tx.alloc(100);
        let h = p.tx.add_chain(&[(a, 12, 0), (a + 12, 88, WRITE)]);
        expect_used.push((u32::from(h), 0));
        add_good(&mut p, &good, &mut expect_used);
        // Entirely outside guest memory.
        let h = p.tx.add_chain(&[(MEM_SIZE as u64 + 0x1000, 100, 0)]);
        expect_used.push((u32::from(h), 0));
        add_good(&mut p, &good, &mut expect_used);
        // Starting inside, ending outside guest memory.
        let h = p.tx.add_chain(&[(MEM_SIZE as u64 - 10, 100, 0)]);
        expect_used.push((u32::from(h), 0));
        add_good(&mut p, &good, &mut expect_used);
        // addr + len overflows u64.
        let h = p.tx.add_chain(&[(a, 12, 0), (u64::MAX - 10, 100, 0)]);
        expect_used.push((u32::from(h), 0));
        add_good(&mut p, &good, &mut expect_used);
        // Shorter than the header plus an Ethernet header, and empty.
        let h = p.tx.add_tx(&frame(12, 12 + 13, 3), &[12, 0]);
        expect_used.push((u32::from(h), 0));
        let h = p.tx.add_chain(&[(a, 0, 0)]);
        expect_used.push((u32::from(h), 0));
        add_good(&mut p, &good, &mut expect_used);
        // A loop: two descriptors pointing at each other.
        let d = p.tx.take_descs(2);
        p.tx.set_desc(d[0], a, 50, NEXT, d[1]);
        p.tx.set_desc(d[1], a, 50, NEXT, d[0]);
        p.tx.publish(d[0]);
        expect_used.push((u32::from(d[0]), 0));
        add_good(&mut p, &good, &mut expect_used);
        // A next index past the end of the table.
        let d = p.tx.take_descs(1);
        p.tx.set_desc(d[0], a, 50, NEXT, size + 3);
        p.tx.publish(d[0]);
        expect_used.push((u32::from(d[0]), 0));
        add_good(&mut p, &good, &mut expect_used);
        // A descriptor marked as last is fine after a long but legal chain of 64 ...
        let segs: Vec<_> = (0..64).map(|i| (a + i, 1, 0)).collect();
        let h = p.tx.add_chain(&segs);
        expect_used.push((u32::from(h), 0));
        // ... but 65 descriptors are too many.
        let segs: Vec<_> = (0..65).map(|i| (a + i, 1, 0)).collect();
        let h = p.tx.add_chain(&segs);
        expect_used.push((u32::from(h), 0));
        add_good(&mut p, &good, &mut expect_used);
        // Longer than any frame.
        let big = p.tx.alloc(12 + MAX_GSO_FRAME + 1);
        let h = p.tx.add_chain(&[(big, (12 + MAX_GSO_FRAME + 1) as u32, 0)]);
        expect_used.push((u32::from(h), 0));
        add_good(&mut p, &good, &mut expect_used);
        // Indirect table whose length is not a multiple of 16, and an indirect in an indirect.
        let h = p.tx.add_chain(&[(a, 20, INDIRECT)]);
        expect_used.push((u32::from(h), 0));
        let table = p.tx.alloc(32);
        gm.write_obj(
            RawDescriptor::from(SplitDescriptor::new(table, 32, INDIRECT, 0)),
            GuestAddress(table),
        )
        .unwrap();
        let h = p.tx.add_chain(&[(table, 16, INDIRECT)]);
        expect_used.push((u32::from(h), 0));
        add_good(&mut p, &good, &mut expect_used);
        // A head index past the end of the table: nothing can be returned for it.
        p.tx.publish(size + 7);
        add_good(&mut p, &good, &mut expect_used);

        p.run(false);

        let sent = p.host.sent();
        // Eleven good frames, plus the 64-descriptor chain (in 8th position).
        assert_eq!(sent.len(), 12);
        let sixty_four = p.tx.read(a, 64);
        for (i, f) in sent.iter().enumerate() {
            assert_eq!(f, if i == 7 { &sixty_four } else { &good }, "frame {i}");
        }
        assert_eq!(p.tx.all_used(), expect_used);
        assert_eq!(p.next_avail(TX), p.tx.avail_idx());
        let s = &p.stats.tx;
        assert_eq!(s.drops_of(DropReason::WrongDirection), 1);
        assert_eq!(s.drops_of(DropReason::BadAddress), 3);
        assert_eq!(s.drops_of(DropReason::Runt), 2);
        assert_eq!(s.drops_of(DropReason::BadChain), 6);
        assert_eq!(s.drops_of(DropReason::Oversize), 1);
        assert_eq!(s.total_drops(), 13);
        assert_eq!(s.frames.load(Relaxed), 12);
    }

    #[test]
    fn tx_indirect_chain_is_sent() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        let f = frame(12, 12 + 100, 4);
        let buf = p.tx.alloc(f.len());
        gm.write_slice(&f, GuestAddress(buf)).unwrap();
        let table = p.tx.alloc(48);
        let descs = [
            SplitDescriptor::new(buf, 12, NEXT, 1),
            SplitDescriptor::new(buf + 12, 50, NEXT, 2),
            SplitDescriptor::new(buf + 62, 50, 0, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            gm.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let h = p.tx.add_chain(&[(table, 48, INDIRECT)]);
        p.run(false);
        assert_eq!(p.host.sent(), vec![f]);
        assert_eq!(p.tx.all_used(), vec![(u32::from(h), 0)]);
    }

    #[test]
    fn tx_host_refusals_are_counted_and_chains_returned() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.host.state().send_error = Some(io::ErrorKind::InvalidInput);
        p.tx.add_tx(&frame(12, 100, 1), &[0]);
        p.run(false);
        p.host.state().send_error = Some(io::ErrorKind::BrokenPipe);
        p.tx.add_tx(&frame(12, 100, 2), &[0]);
        p.run(false);
        p.host.state().send_error = None;
        let ok = frame(12, 100, 3);
        p.tx.add_tx(&ok, &[0]);
        p.run(false);
        assert_eq!(p.host.sent(), vec![ok]);
        assert_eq!(p.stats.tx.drops_of(DropReason::HostRejected), 1);
        assert_eq!(p.stats.tx.drops_of(DropReason::HostError), 1);
        assert_eq!(p.stats.tx.frames.load(Relaxed), 1);
        assert_eq!(p.tx.used_idx(), 3);
    }

    #[test]
    fn tx_drops_reported_by_flush_move_from_sent_to_dropped() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        for seed in 1..=3 {
            p.tx.add_tx(&frame(12, 100, seed), &[0]);
        }
        // The host took all three, then refused one and lost another.
        p.host.state().flush_drops = TxDrops {
            rejected: 1,
            rejected_bytes: 88,
            failed: 1,
            failed_bytes: 88,
        };
        p.run(false);
        assert_eq!(p.host.sent().len(), 3);
        assert_eq!(p.host.state().flushes, 1, "one flush per burst");
        assert_eq!(p.stats.tx.frames.load(Relaxed), 1);
        assert_eq!(p.stats.tx.bytes.load(Relaxed), 88);
        assert_eq!(p.stats.tx.drops_of(DropReason::HostRejected), 1);
        assert_eq!(p.stats.tx.drops_of(DropReason::HostError), 1);
        assert_eq!(p.tx.used_idx(), 3);
    }

    #[test]
    fn tx_disabled_or_not_ready_ring_is_left_alone() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        let f = frame(12, 100, 1);
        p.tx.add_tx(&f, &[0]);
        p.vrings[TX].set_enabled(false);
        p.run(false);
        p.vrings[TX].set_enabled(true);
        p.vrings[TX].set_queue_ready(false);
        p.run(false);
        assert!(p.host.sent().is_empty());
        assert_eq!(p.tx.used_idx(), 0);
        p.vrings[TX].set_queue_ready(true);
        p.run(false);
        assert_eq!(p.host.sent(), vec![f]);
    }

    #[test]
    fn tx_without_memory_does_nothing() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.worker.reset();
        p.tx.add_tx(&frame(12, 100, 1), &[0]);
        p.run(false);
        assert!(p.host.sent().is_empty());
        p.worker.set_memory(mem.clone());
        p.run(false);
        assert_eq!(p.host.sent().len(), 1);
    }

    #[test]
    fn tx_event_idx_suppresses_interrupts_until_used_event() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.vrings[TX].set_queue_event_idx(true);
        let call = install_call(&p.vrings[TX]);
        // The guest wants an interrupt once used idx moves past 4.
        p.tx.set_used_event(4);
        for i in 0..3 {
            p.tx.add_tx(&frame(12, 100, i), &[0]);
        }
        p.run(false);
        assert_eq!(p.host.sent().len(), 3);
        assert_eq!(interrupts(&call), 0);
        assert_eq!(p.stats.tx.notifications.load(Relaxed), 0);
        // The device asks for a kick at the next avail entry.
        assert_eq!(p.tx.avail_event(), 3);
        for i in 0..3 {
            p.tx.add_tx(&frame(12, 100, i), &[0]);
        }
        p.run(false);
        assert_eq!(p.tx.used_idx(), 6);
        assert_eq!(interrupts(&call), 1);
        assert_eq!(p.stats.tx.notifications.load(Relaxed), 1);
    }

    #[test]
    fn tx_more_than_a_budget_in_one_wakeup() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 256), 1500, V1);
        for i in 0..256 {
            p.tx.add_tx(&frame(12, 60, i as u8), &[0]);
        }
        p.run(false);
        assert_eq!(p.host.sent().len(), 256);
        assert_eq!(p.tx.used_idx(), 256);
        // Around the ring again, so ring indexes wrap.
        for round in 0..3u8 {
            for i in 0..200u8 {
                p.tx.add_tx(&frame(12, 60, i ^ round), &[0]);
            }
            p.run(false);
        }
        assert_eq!(p.host.sent().len(), 856);
        assert_eq!(p.tx.used_idx(), 856);
        assert_eq!(p.stats.tx.frames.load(Relaxed), 856);
    }

    /// Runs `handle` on another thread and fails if it does not return (a spinning worker).
    fn handle_returns(mut worker: QueuePairWorker, vrings: [VringMutex; 2]) -> QueuePairWorker {
        let (done, wait) = mpsc::channel();
        std::thread::spawn(move || {
            worker.handle(true, &vrings);
            let _ = done.send(worker);
        });
        wait.recv_timeout(Duration::from_secs(10))
            .expect("the worker never returned from handle()")
    }

    #[test]
    fn tx_avail_index_beyond_queue_size_does_not_spin() {
        let (gm, mem) = guest_memory();
        let p = pair(&gm, &mem, (16, 16), 1500, V1);
        // The guest claims 17 new entries on a 16-entry ring.
        p.tx.set_avail_idx(17);
        let Pair {
            worker,
            vrings,
            host,
            stats,
            tx,
            ..
        } = p;
        handle_returns(worker, vrings);
        assert!(host.sent().is_empty());
        assert_eq!(stats.tx.frames.load(Relaxed), 0);
        assert_eq!(tx.used_idx(), 0);
    }

    #[test]
    fn rx_avail_index_beyond_queue_size_does_not_spin() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.rx.add_rx(1536);
        p.rx.set_avail_idx(17);
        p.host.push(frame(12, 100, 1));
        let Pair {
            worker,
            vrings,
            host,
            stats,
            rx,
            ..
        } = p;
        handle_returns(worker, vrings);
        assert_eq!(host.pending(), 1);
        assert_eq!(stats.rx.frames.load(Relaxed), 0);
        assert_eq!(rx.used_idx(), 0);
    }

    // ---- RX ----

    #[test]
    fn rx_without_mrg_rxbuf_lands_in_one_chain() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        let call = install_call(&p.vrings[RX]);
        // A header descriptor and a data descriptor, like Linux's small-buffer mode.
        let hdr = p.rx.alloc(12);
        let data = p.rx.alloc(1518);
        let head = p.rx.add_chain(&[(hdr, 12, WRITE), (data, 1518, WRITE)]);
        let f = frame(12, 12 + 100, 5);
        p.host.push(f.clone());
        p.run(true);

        assert_eq!(p.rx.all_used(), vec![(u32::from(head), 112)]);
        assert_eq!(num_buffers(&p.rx, hdr), 1);
        let mut expect = f.clone();
        expect[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(p.rx.read(hdr, 12), expect[..12]);
        assert_eq!(p.rx.read(data, 100), expect[12..]);
        // Nothing written past the frame.
        assert_eq!(p.rx.read(data + 100, 4), vec![0xee; 4]);
        // The whole chain was offered to the host.
        assert_eq!(p.host.state().recv_capacity, vec![12 + 1518]);
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 1);
        assert_eq!(p.stats.rx.bytes.load(Relaxed), 100);
        assert_eq!(p.stats.rx.total_drops(), 0);
        assert_eq!(p.stats.rx.notifications.load(Relaxed), 1);
        assert_eq!(interrupts(&call), 1);
    }

    #[test]
    fn rx_legacy_header_has_no_num_buffers() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, 0);
        let (head, buf) = p.rx.add_rx(1536);
        let f = frame(10, 10 + 60, 6);
        p.host.push(f.clone());
        p.run(true);
        // Bytes 10..12 are frame data, not a num_buffers field.
        assert_eq!(p.rx.read(buf, f.len()), f);
        assert_eq!(p.rx.all_used(), vec![(u32::from(head), 70)]);
        assert_eq!(p.stats.rx.bytes.load(Relaxed), 60);
    }

    #[test]
    fn rx_from_an_external_source_fills_guest_buffers_until_they_run_out() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1 | MRG);
        let bufs: Vec<(u16, u64)> = (0..3).map(|_| p.rx.add_rx(1536)).collect();
        // The worker learns its rings on its first run.
        p.run(false);
        let readable = p.worker.host_readable;
        let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(12, 12 + 60 + i, i as u8)).collect();
        let mut next = 0;
        let mut src = |iov: &[libc::iovec]| -> io::Result<usize> {
            let Some(f) = frames.get(next) else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            next += 1;
            let mut at = 0;
            for v in iov {
                let n = v.iov_len.min(f.len() - at);
                // SAFETY: the worker hands over writable guest buffers for this call.
                unsafe { std::ptr::copy_nonoverlapping(f[at..].as_ptr(), v.iov_base.cast(), n) };
                at += n;
            }
            Ok(f.len())
        };
        p.worker.rx_from(&mut src);
        // Three buffers: three frames delivered, the source asked no more of.
        assert_eq!(next, 3);
        for (i, (_, buf)) in bufs.iter().enumerate() {
            assert_eq!(p.rx.read(*buf + 12, 60 + i), frames[i][12..]);
        }
        assert_eq!(p.rx.all_used().len(), 3);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 3);
        // The host queue was not read, and what the worker knows of it did not change.
        assert!(p.host.state().recv_capacity.is_empty());
        assert_eq!(p.worker.host_readable, readable);
    }

    #[test]
    fn rx_used_index_moves_once_per_batch_and_before_waiting_for_buffers() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (128, 16), 1500, V1 | MRG);
        let call = install_call(&p.vrings[RX]);
        for _ in 0..70 {
            p.rx.add_rx(1536);
        }
        p.run(false);
        let idx_at = p.rx.used_idx_addr();
        let f = frame(12, 12 + 60, 7);
        // The used index the guest could see when each frame was handed over.
        let mut seen: Vec<u16> = Vec::new();
        let mut src = |iov: &[libc::iovec]| -> io::Result<usize> {
            if seen.len() == 100 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            seen.push(gm.read_obj(idx_at).unwrap());
            // SAFETY: the worker hands over writable guest buffers for this call.
            unsafe { std::ptr::copy_nonoverlapping(f.as_ptr(), iov[0].iov_base.cast(), f.len()) };
            Ok(f.len())
        };
        p.worker.rx_from(&mut src);
        let expect: Vec<u16> = (0..70u16)
            .map(|k| k / RX_BATCH as u16 * RX_BATCH as u16)
            .collect();
        assert_eq!(seen, expect, "one index update per {RX_BATCH} frames");
        // Out of buffers: all 70 are published before the device waits for more, with one
        // interrupt for the pass.
        assert_eq!(p.rx.used_idx(), 70);
        assert_eq!(p.rx.all_used().len(), 70);
        assert_eq!(interrupts(&call), 1);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 70);
        assert_eq!(p.stats.rx_ring_full.load(Relaxed), 1);
    }

    #[test]
    fn rx_legacy_with_mrg_rxbuf_has_num_buffers() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, MRG);
        let (_, buf) = p.rx.add_rx(1536);
        p.host.push(frame(12, 12 + 60, 6));
        p.run(true);
        assert_eq!(num_buffers(&p.rx, buf), 1);
        assert_eq!(p.stats.rx.bytes.load(Relaxed), 60);
    }

    #[test]
    fn rx_mrg_rxbuf_spreads_a_large_frame_over_buffers() {
        let (gm, mem) = guest_memory();
        // GSO acked: a frame may be 64 KiB, so 43 buffers of 1536 bytes are held per frame.
        let mut p = pair(&gm, &mem, (64, 16), 1500, V1 | MRG | GSO);
        let bufs: Vec<(u16, u64)> = (0..48).map(|_| p.rx.add_rx(1536)).collect();
        let big = frame(12, 12 + 5000, 7);
        let small = frame(12, 12 + 60, 8);
        p.host.push(big.clone());
        p.host.push(small.clone());
        p.run(true);

        let used = p.rx.all_used();
        let ids: Vec<u32> = bufs.iter().take(5).map(|b| u32::from(b.0)).collect();
        assert_eq!(
            used,
            vec![
                (ids[0], 1536),
                (ids[1], 1536),
                (ids[2], 1536),
                (ids[3], 5012 - 3 * 1536),
                (ids[4], 72),
            ]
        );
        assert_eq!(num_buffers(&p.rx, bufs[0].1), 4);
        assert_eq!(num_buffers(&p.rx, bufs[4].1), 1);
        let mut got = Vec::new();
        for b in &bufs[..4] {
            got.extend(p.rx.read(b.1, 1536));
        }
        got.truncate(big.len());
        let mut expect = big.clone();
        expect[10..12].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(got, expect);
        // Buffers 2..4 start with frame data, not with a header.
        assert_eq!(p.rx.read(bufs[1].1, 16), big[1536..1536 + 16]);
        let mut expect = small.clone();
        expect[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(p.rx.read(bufs[4].1, small.len()), expect);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 2);
        assert_eq!(p.stats.rx.bytes.load(Relaxed), 5060);
        // Every recv was offered room for the largest frame.
        assert!(p
            .host
            .state()
            .recv_capacity
            .iter()
            .all(|&c| c >= 12 + MAX_GSO_FRAME));
        // The buffers taken ahead of the next frame go back to the guest on stop.
        assert_eq!(p.worker.rx_bufs.held(), 43);
        assert_eq!(p.next_avail(RX), 48);
        p.worker.stop(RX);
        assert_eq!(p.next_avail(RX), 5);
        assert_eq!(p.worker.rx_bufs.held(), 0);
        // Stopping TX leaves RX alone.
        p.worker.stop(TX);
        assert_eq!(p.next_avail(RX), 5);
    }

    #[test]
    fn rx_mrg_rxbuf_uses_a_full_ring_smaller_than_a_gso_frame() {
        let (gm, mem) = guest_memory();
        // Eight buffers hold less than a 64 KiB frame, but they are all the guest can give.
        let mut p = pair(&gm, &mem, (8, 16), 1500, V1 | MRG | GSO);
        let bufs: Vec<(u16, u64)> = (0..8).map(|_| p.rx.add_rx(1536)).collect();
        p.host.push(frame(12, 12 + 5000, 7));
        p.run(true);
        assert_eq!(p.rx.used_idx(), 4);
        assert_eq!(num_buffers(&p.rx, bufs[0].1), 4);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 1);
    }

    #[test]
    fn rx_mrg_rxbuf_uses_a_full_table_of_multi_descriptor_chains() {
        let (gm, mem) = guest_memory();
        // Two-descriptor chains: a 16-entry table holds only 8 of them, far less than a GSO
        // frame, yet that is all the guest can post, so the device must use them.
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1 | MRG | GSO);
        for _ in 0..8 {
            let a = p.rx.alloc(1536);
            let b = p.rx.alloc(1536);
            p.rx.add_chain(&[(a, 1536, WRITE), (b, 1536, WRITE)]);
        }
        p.host.push(frame(12, 12 + 5000, 7));
        p.run(true);
        assert_eq!(p.rx.used_idx(), 2);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 1);
    }

    #[test]
    fn rx_mrg_rxbuf_without_gso_needs_one_mtu_frame_of_buffers() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1 | MRG);
        // Two 1024-byte buffers: together they hold a 1500-MTU frame.
        let a = p.rx.add_rx(1024);
        let b = p.rx.add_rx(1024);
        let f = frame(12, 12 + 1514, 3);
        p.host.push(f.clone());
        p.run(true);
        assert_eq!(
            p.rx.all_used(),
            vec![(u32::from(a.0), 1024), (u32::from(b.0), 1526 - 1024)]
        );
        assert_eq!(num_buffers(&p.rx, a.1), 2);
        assert_eq!(p.rx.read(b.1, 1526 - 1024), f[1024..]);
    }

    #[test]
    fn rx_starvation_keeps_the_frame_until_buffers_come() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.vrings[RX].set_queue_event_idx(true);
        let f1 = frame(12, 12 + 80, 1);
        let f2 = frame(12, 12 + 90, 2);
        p.host.push(f1.clone());
        p.host.push(f2.clone());

        // No buffers at all.
        p.run(true);
        assert_eq!(p.host.pending(), 2);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 0);
        assert_eq!(p.stats.rx.total_drops(), 0);
        assert_eq!(p.stats.rx_ring_full.load(Relaxed), 1);
        assert_eq!(p.rx.used_idx(), 0);

        // One buffer: one frame goes, the other waits, and the device asks for a kick.
        let (h1, b1) = p.rx.add_rx(1536);
        p.run(false);
        assert_eq!(p.rx.all_used(), vec![(u32::from(h1), 92)]);
        assert_eq!(p.rx.read(b1, 12 + 80)[12..], f1[12..]);
        assert_eq!(p.host.pending(), 1);
        assert_eq!(p.rx.avail_event(), 1);
        assert_eq!(p.stats.rx.total_drops(), 0);

        // The guest's kick (no host event) delivers the waiting frame.
        let (h2, b2) = p.rx.add_rx(1536);
        p.run(false);
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.rx.used(1), (u32::from(h2), 102));
        assert_eq!(p.rx.read(b2, 12 + 90)[12..], f2[12..]);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 2);
    }

    #[test]
    fn rx_starvation_without_event_idx_reenables_kicks() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.rx.add_rx(1536);
        p.host.push(frame(12, 100, 1));
        p.host.push(frame(12, 100, 2));
        p.run(true);
        assert_eq!(p.host.pending(), 1);
        // VRING_USED_F_NO_NOTIFY is clear: the guest will kick when it posts a buffer.
        assert_eq!(p.rx.used_flags(), 0);
        p.rx.add_rx(1536);
        p.run(false);
        assert_eq!(p.host.pending(), 0);
    }

    #[test]
    fn rx_after_host_drained_waits_for_host_event() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.rx.add_rx(1536);
        p.rx.add_rx(1536);
        p.run(true);
        // The host said WouldBlock; a frame arriving now is picked up on the host's event.
        p.host.push(frame(12, 100, 1));
        p.run(false);
        assert_eq!(p.host.pending(), 1);
        p.run(true);
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.rx.used_idx(), 1);
    }

    #[test]
    fn rx_give_back_rewinds_next_avail_by_held_chains() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1 | MRG | GSO);
        for _ in 0..10 {
            p.rx.add_rx(1536);
        }
        // Ten buffers are not enough for a GSO frame: all held, nothing used.
        p.host.push(frame(12, 100, 1));
        p.run(true);
        assert_eq!(p.host.pending(), 1);
        assert_eq!(p.next_avail(RX), 10);
        assert_eq!(p.worker.rx_bufs.held(), 10);
        p.worker.stop(RX);
        assert_eq!(p.next_avail(RX), 0);
        // A new session resumes from the given-back position and sees the same buffers.
        p.rx.add_rx(1536);
        p.worker.stop(RX);
        p.worker.set_features(V1);
        p.run(true);
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.rx.used(0).1, 100);
        // One buffer is taken ahead for the next frame.
        assert_eq!(p.next_avail(RX), 2);
        assert_eq!(p.worker.rx_bufs.held(), 1);
    }

    #[test]
    fn rx_give_back_across_ring_wrap() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (4, 16), 1500, V1 | MRG);
        // Several laps around a 4-entry ring; one frame per buffer.
        for lap in 0..5u8 {
            for _ in 0..4 {
                p.rx.add_rx(1536);
            }
            for i in 0..4 {
                p.host.push(frame(12, 100, lap ^ i));
            }
            p.run(true);
            assert_eq!(p.host.pending(), 0, "lap {lap}");
        }
        assert_eq!(p.rx.used_idx(), 20);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 20);
        // Two held buffers taken across the wrap of the 16-bit index space go back exactly.
        p.vrings[RX].set_queue_next_avail(u16::MAX - 1);
        p.vrings[RX]
            .get_mut()
            .get_queue_mut()
            .set_next_used(u16::MAX - 1);
        p.rx.set_avail_idx(u16::MAX - 1);
        p.rx.add_rx(1024);
        p.rx.add_rx(1024);
        assert_eq!(p.rx.avail_idx(), 0);
        p.run(true);
        assert_eq!(p.worker.rx_bufs.held(), 2);
        assert_eq!(p.next_avail(RX), 0);
        p.worker.stop(RX);
        assert_eq!(p.next_avail(RX), u16::MAX - 1);
    }

    #[test]
    fn rx_bad_chain_is_returned_empty_and_counted() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        let a = p.rx.alloc(1536);
        let bad = p.rx.add_chain(&[(a, 1536, 0)]);
        let outside = p.rx.add_chain(&[(MEM_SIZE as u64, 1536, WRITE)]);
        let (good, buf) = p.rx.add_rx(1536);
        let f = frame(12, 12 + 50, 1);
        p.host.push(f);
        p.run(true);
        assert_eq!(
            p.rx.all_used(),
            vec![
                (u32::from(bad), 0),
                (u32::from(outside), 0),
                (u32::from(good), 62)
            ]
        );
        assert_eq!(p.stats.rx.drops_of(DropReason::WrongDirection), 1);
        assert_eq!(p.stats.rx.drops_of(DropReason::BadAddress), 1);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 1);
        // The read-only buffer was not written.
        assert_eq!(p.rx.read(a, 16), vec![0xee; 16]);
        assert_eq!(num_buffers(&p.rx, buf), 1);
    }

    #[test]
    fn rx_bad_chain_behind_held_buffers_keeps_ring_order() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1 | MRG);
        // 1024-byte buffers: two are needed for an MTU frame, and a bad chain sits between.
        let (g1, _) = p.rx.add_rx(1024);
        let a = p.rx.alloc(1024);
        let bad = p.rx.add_chain(&[(a, 1024, 0)]);
        let (g2, b2) = p.rx.add_rx(1024);
        p.host.push(frame(12, 100, 1));
        p.host.push(frame(12, 200, 2));
        p.run(true);
        // The first frame takes the held buffer; the bad chain is returned only after it.
        assert_eq!(
            p.rx.all_used(),
            vec![(u32::from(g1), 100), (u32::from(bad), 0)]
        );
        // One 1024-byte buffer is less than an MTU frame: the second frame waits for more.
        assert_eq!(p.host.pending(), 1);
        p.rx.add_rx(1024);
        p.run(false);
        // Used in ring order: the first buffer, the bad chain, then the second buffer.
        assert_eq!(
            p.rx.all_used(),
            vec![
                (u32::from(g1), 100),
                (u32::from(bad), 0),
                (u32::from(g2), 200)
            ]
        );
        assert_eq!(num_buffers(&p.rx, b2), 1);
        assert_eq!(p.stats.rx.drops_of(DropReason::WrongDirection), 1);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 2);
    }

    #[test]
    fn rx_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_reused() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        let (head, buf) = p.rx.add_rx(256);
        let ok = frame(12, 12 + 100, 2);
        p.host.push(frame(12, 12 + 1000, 1));
        p.host.push(ok.clone());
        p.run(true);
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.stats.rx.drops_of(DropReason::Oversize), 1);
        assert_eq!(p.rx.all_used(), vec![(u32::from(head), 112)]);
        assert_eq!(p.rx.read(buf + 12, 100), ok[12..]);
    }

    #[test]
    fn rx_tiny_buffers_past_the_iovec_limit_never_stall_the_queue() {
        // 32 chains, each an indirect table of 64 one-byte buffers: 2048 bytes, enough for an
        // MTU frame, but in twice as many iovecs as the host queue takes in one read.
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (256, 16), 1500, V1 | MRG);
        p.host.state().max_iov = Some(1024);
        let chains: Vec<_> = (0..32).map(|_| p.rx.add_indirect_rx(64, 1)).collect();
        for i in 0..3 {
            p.host.push(frame(12, 12 + 1514, i));
        }
        let small = frame(12, 12 + 60, 9);
        p.host.push(small.clone());
        p.run(true);
        {
            let s = p.host.state();
            assert_eq!(
                s.too_many_iovecs, 0,
                "offered more iovecs than the queue takes"
            );
            assert_eq!(s.max_recv_iovecs, 1024);
        }
        // The big frames do not fit in 1024 bytes: consumed and counted, not retried.
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.stats.rx.drops_of(DropReason::Oversize), 3);
        assert_eq!(p.stats.rx.total_drops(), 3);
        // The same buffers take the next frame that fits: 72 bytes over 64 + 8 of them.
        assert_eq!(p.stats.rx.frames.load(Relaxed), 1);
        assert_eq!(
            p.rx.all_used(),
            vec![(u32::from(chains[0].0), 64), (u32::from(chains[1].0), 8)]
        );
        let got: Vec<u8> = chains[0]
            .1
            .iter()
            .chain(&chains[1].1[..8])
            .map(|&a| p.rx.read(a, 1)[0])
            .collect();
        assert_eq!(got[10..12], [2, 0], "num_buffers");
        assert_eq!(got[12..], small[12..]);
        // Another round: the held buffers keep serving.
        p.host.push(frame(12, 12 + 1514, 4));
        p.host.push(small.clone());
        p.run(true);
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.stats.rx.drops_of(DropReason::Oversize), 4);
        assert_eq!(p.stats.rx.frames.load(Relaxed), 2);
        assert_eq!(p.host.state().too_many_iovecs, 0);
    }

    #[test]
    fn rx_a_frame_reported_longer_than_the_buffers_is_dropped() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.host.state().cut_long_frames = true;
        let (head, buf) = p.rx.add_rx(256);
        let ok = frame(12, 12 + 100, 2);
        for i in 0..300 {
            p.host.push(frame(12, 12 + 1000, i as u8));
        }
        p.host.push(ok.clone());
        p.run(true);
        // More drops than a pass's budget: all consumed, then the frame that fits lands.
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.stats.rx.drops_of(DropReason::Oversize), 300);
        assert_eq!(p.rx.all_used(), vec![(u32::from(head), 112)]);
        assert_eq!(p.rx.read(buf + 12, 100), ok[12..]);
    }

    #[test]
    fn rx_host_errors_are_counted_and_buffers_kept() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        let (head, _) = p.rx.add_rx(1536);
        // A frame shorter than the header, then a failing recv.
        p.host.push(vec![0; 5]);
        p.run(true);
        assert_eq!(p.stats.rx.drops_of(DropReason::HostError), 1);
        p.host.state().recv_error = Some(io::ErrorKind::ConnectionReset);
        p.host.push(frame(12, 100, 1));
        p.run(true);
        assert_eq!(p.stats.rx.drops_of(DropReason::HostError), 2);
        assert_eq!(p.host.pending(), 1);
        assert_eq!(p.rx.used_idx(), 0);
        // Interrupted is retried at once.
        p.host.state().recv_error = Some(io::ErrorKind::Interrupted);
        p.run(true);
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.rx.all_used(), vec![(u32::from(head), 100)]);
        assert_eq!(p.stats.rx.drops_of(DropReason::HostError), 2);
    }

    #[test]
    fn rx_event_idx_suppresses_interrupts_until_used_event() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.vrings[RX].set_queue_event_idx(true);
        let call = install_call(&p.vrings[RX]);
        p.rx.set_used_event(2);
        for _ in 0..4 {
            p.rx.add_rx(1536);
        }
        for i in 0..2 {
            p.host.push(frame(12, 100, i));
        }
        p.run(true);
        assert_eq!(p.rx.used_idx(), 2);
        assert_eq!(interrupts(&call), 0);
        p.host.push(frame(12, 100, 3));
        p.run(true);
        assert_eq!(p.rx.used_idx(), 3);
        assert_eq!(interrupts(&call), 1);
        assert_eq!(p.stats.rx.notifications.load(Relaxed), 1);
    }

    #[test]
    fn rx_more_than_a_budget_waits_for_buffers_not_frames() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (256, 16), 1500, V1);
        for _ in 0..256 {
            p.rx.add_rx(128);
        }
        for i in 0..300 {
            p.host.push(frame(12, 100, i as u8));
        }
        p.run(true);
        assert_eq!(p.rx.used_idx(), 256);
        assert_eq!(p.host.pending(), 44);
        assert_eq!(p.stats.rx.total_drops(), 0);
    }

    #[test]
    fn rx_memory_change_gives_held_buffers_back() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1 | MRG | GSO);
        for _ in 0..4 {
            p.rx.add_rx(1536);
        }
        p.host.push(frame(12, 100, 1));
        p.run(true);
        assert_eq!(p.worker.rx_bufs.held(), 4);
        // The frontend remaps the same guest memory: held pointers are stale.
        mem.lock().unwrap().replace(gm.clone());
        p.worker.set_features(V1 | MRG);
        p.run(true);
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.rx.used_idx(), 1);
        assert_eq!(p.rx.used(0).1, 100);
    }

    #[test]
    fn reset_forgets_the_session() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1 | MRG | GSO);
        p.rx.add_rx(1536);
        p.host.push(frame(12, 100, 1));
        p.run(true);
        assert_eq!(p.worker.rx_bufs.held(), 1);
        p.worker.reset();
        assert_eq!(p.worker.rx_bufs.held(), 0);
        assert_eq!(p.worker.hdr_len, 10);
        assert!(!p.worker.mergeable);
        // stop() without vrings is harmless.
        p.worker.stop(RX);
        // Handling without the two vrings of a pair does nothing.
        p.worker.set_memory(mem.clone());
        p.worker.handle(true, &p.vrings[..1]);
        assert_eq!(p.host.pending(), 1);
    }

    #[test]
    fn features_set_header_length_and_frame_limits() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 9000, 0);
        assert_eq!((p.worker.hdr_len, p.worker.mergeable), (10, false));
        assert_eq!(p.worker.max_frame, 9000 + 18);
        p.worker.set_features(V1 | MRG | GSO);
        assert_eq!((p.worker.hdr_len, p.worker.mergeable), (12, true));
        assert_eq!(p.worker.max_frame, MAX_GSO_FRAME);
        // Segmentation offloads without checksum offload do not count.
        p.worker.set_features(V1 | bit(VIRTIO_NET_F_GUEST_TSO4));
        assert_eq!(p.worker.max_frame, 9018);
        let _ = &mut p;
    }

    #[test]
    fn busy_poll_picks_up_host_frames_without_an_event() {
        let (gm, mem) = guest_memory();
        let mut p = pair(&gm, &mem, (16, 16), 1500, V1);
        p.worker.busy_poll = Duration::from_millis(300);
        p.rx.add_rx(1536);
        p.rx.add_rx(1536);
        p.run(true);
        // The host queue is drained; a frame arriving during the busy-poll window is received
        // although no host event comes.
        let host = p.host.clone();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            host.push(frame(12, 100, 1));
        });
        let start = Instant::now();
        p.run(false);
        pusher.join().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert_eq!(p.host.pending(), 0);
        assert_eq!(p.rx.used_idx(), 1);
        // The first wake-up found nothing; the second found the frame.
        assert_eq!(p.stats.idle_wakeups.load(Relaxed), 1);
        assert_eq!(p.stats.busy_wakeups.load(Relaxed), 1);
    }
}
