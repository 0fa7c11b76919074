//! One queue pair's worker: moves frames between its host queue and the guest's RX/TX rings.
//!
//! A worker is only ever driven by its own thread (through [`crate::NetBackend`]'s per-worker
//! mutex, which the control thread takes only for setup), so the hot path shares no lock.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringMutex, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::chain::{collect_chain, Access};
use crate::features::{mrg_rxbuf, vnet_hdr_len, GuestOffloads, MAX_GSO_FRAME};
use crate::port::HostQueue;
use crate::rx::{RxBuffers, Slot};
use crate::stats::{DropReason, QueueStats};

/// Frames moved per direction before the other direction gets its turn.
const BUDGET: usize = 256;
/// Smallest frame accepted from the guest: an Ethernet header.
const MIN_FRAME: usize = 14;

/// Per-direction index inside a worker's pair of vrings.
const RX: usize = 0;
const TX: usize = 1;

/// What a pass over one direction found.
#[derive(Clone, Copy, Default)]
struct Pass {
    /// Frames moved.
    moved: usize,
    /// Work remains that this pass left for the next one.
    more: bool,
}

/// The state of one queue pair.
pub struct QueuePairWorker {
    port: Box<dyn HostQueue>,
    stats: Arc<QueueStats>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    vrings: Option<[VringMutex; 2]>,
    rx_bufs: RxBuffers,
    tx_iov: Vec<libc::iovec>,
    /// The host queue may hold frames (cleared when `recv` says `WouldBlock`).
    host_readable: bool,
    hdr_len: usize,
    mergeable: bool,
    max_frame: usize,
    mtu: u16,
    busy_poll: Duration,
    log: crate::log::Limiter,
}

// SAFETY: `tx_iov` only holds pointers between the start and the end of one TX pass and is
// cleared before reuse; everything else is Send.
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
            port,
            stats,
            mem: None,
            vrings: None,
            rx_bufs: RxBuffers::default(),
            tx_iov: Vec::with_capacity(64),
            host_readable: true,
            hdr_len: 12,
            mergeable: false,
            max_frame: 0,
            mtu,
            busy_poll,
            log: crate::log::Limiter::default(),
        };
        w.set_features(0);
        w
    }

    /// The host queue's receive fd.
    pub fn host_fd(&self) -> std::os::fd::RawFd {
        self.port.rx_fd()
    }

    /// Forgets the previous frontend's session.
    pub fn reset(&mut self) {
        self.rx_bufs.clear();
        self.vrings = None;
        self.mem = None;
        self.host_readable = true;
        self.set_features(0);
    }

    /// Applies the guest's acked features.
    pub fn set_features(&mut self, acked: u64) {
        self.hdr_len = vnet_hdr_len(acked);
        self.mergeable = mrg_rxbuf(acked);
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
        'ring: loop {
            let _ = q.disable_notification(mem.as_ref());
            while let Some(chain) = q.pop_descriptor_chain(mem.as_ref()) {
                let head = chain.head_index();
                self.tx_iov.clear();
                match collect_chain(chain, mem, Access::Read, max_len, &mut self.tx_iov) {
                    Ok(len) if len < self.hdr_len + MIN_FRAME => self.tx_drop(DropReason::Runt),
                    Ok(len) => {
                        // SAFETY: the iovecs were just built from guest memory that `mem` keeps
                        // mapped for the duration of the call.
                        match unsafe { self.port.send(&self.tx_iov) } {
                            Ok(_) => self.stats.tx.frame(len - self.hdr_len),
                            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                                self.tx_drop(DropReason::HostRejected)
                            }
                            Err(e) => {
                                self.log.warn("tx", &e);
                                self.tx_drop(DropReason::HostError)
                            }
                        }
                    }
                    Err(reason) => self.tx_drop(reason),
                }
                self.tx_iov.clear();
                if q.add_used(mem.as_ref(), head, 0).is_err() {
                    self.tx_drop(DropReason::BadAddress);
                    break 'ring;
                }
                pass.moved += 1;
                if pass.moved >= BUDGET {
                    pass.more = true;
                    break 'ring;
                }
            }
            match q.enable_notification(mem.as_ref()) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if pass.moved > 0 && q.needs_notification(mem.as_ref()).unwrap_or(true) {
            let _ = state.signal_used_queue();
            self.stats
                .tx
                .notifications
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        pass
    }

    fn tx_drop(&mut self, reason: DropReason) {
        self.stats.tx.drop(reason);
        self.log.drop("tx", reason);
    }

    fn process_rx(&mut self, vring: &VringMutex, mem: &Arc<GuestMemoryMmap>) -> Pass {
        let mut pass = Pass::default();
        if !self.host_readable {
            return pass;
        }
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return pass;
        }
        let q: &mut Queue = state.get_queue_mut();
        let need = self.hdr_len + self.max_frame;
        let _ = q.disable_notification(mem.as_ref());
        loop {
            if pass.moved >= BUDGET {
                pass.more = true;
                break;
            }
            let iov = match self.rx_bufs.prepare(q, mem, need, self.mergeable, &self.stats.rx) {
                Slot::Ready(iov) => iov,
                Slot::Starved => {
                    // Ask the guest for a kick when it posts buffers; re-check for a race.
                    match q.enable_notification(mem.as_ref()) {
                        Ok(true) => {
                            let _ = q.disable_notification(mem.as_ref());
                            continue;
                        }
                        _ => break,
                    }
                }
            };
            // SAFETY: the iovecs come from `RxBuffers`, which keeps the memory map they point
            // into alive while it holds them.
            match unsafe { self.port.recv(iov) } {
                Ok(len) if len >= self.hdr_len => {
                    let hdr_has_num_buffers = self.hdr_len > crate::features::VNET_HDR_LEN_LEGACY;
                    self.rx_bufs
                        .complete(q, mem, len, hdr_has_num_buffers);
                    self.stats.rx.frame(len - self.hdr_len);
                    pass.moved += 1;
                }
                Ok(_) => {
                    self.stats.rx.drop(DropReason::HostError);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    self.stats.rx.drop(DropReason::Oversize);
                    self.log.drop("rx", DropReason::Oversize);
                }
                Err(e) => {
                    self.stats.rx.drop(DropReason::HostError);
                    self.log.warn("rx", &e);
                    break;
                }
            }
        }
        if pass.moved > 0 && q.needs_notification(mem.as_ref()).unwrap_or(true) {
            let _ = state.signal_used_queue();
            self.stats
                .rx
                .notifications
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        pass
    }
}
