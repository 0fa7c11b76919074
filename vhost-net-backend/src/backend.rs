//! [`NetBackend`]: the virtio-net device as a `vhost-user-backend` backend.
//!
//! One worker thread per queue pair; each worker's state sits behind its own mutex so workers
//! never contend with each other (the `&self` backend trait, not the `RwLock`-wrapped `Mut` one).
//! The backend outlives frontend connections: the host queues, counters and identity stay, and
//! [`NetBackend::reset`] forgets the previous session.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vm_memory::GuestMemoryAtomic;

use crate::dirty::{DirtyLog, GuestMemoryMmap, VringMutex};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::EventFd;

use crate::config::NetConfig;
use crate::features::{offered_features, offered_protocol_features, vnet_hdr_len, GuestOffloads};
use crate::port::HostPort;
use crate::stats::QueueStats;
use crate::worker::QueuePairWorker;

/// Errors setting up a device.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The host port could not hand out a queue.
    #[error("cannot open host queue {pair}: {source}")]
    HostQueue {
        /// Queue pair index.
        pair: usize,
        /// Cause.
        source: io::Error,
    },
    /// Registering a host fd with a worker's epoll failed.
    #[error("cannot register host queue {pair} with its worker: {source}")]
    Register {
        /// Queue pair index.
        pair: usize,
        /// Cause.
        source: io::Error,
    },
    /// The configuration is out of range.
    #[error("invalid device configuration: {0}")]
    Config(String),
}

/// A worker thread's exit event: one eventfd behind both halves.
///
/// vhost-user-backend 0.24 (`VringEpollHandler::new`) registers the consumer's descriptor with
/// the worker's epoll through `into_raw_fd` and never closes it, while it keeps the notifier for
/// as long as the worker's epoll handler lives. With the usual pair (an eventfd and a dup of
/// it) the dup leaks: one descriptor per worker thread and session, until a frontend that
/// reconnects often enough exhausts the fd table. Here the notifier owns the one descriptor and
/// closes it when the library drops the handler.
fn exit_event_pair() -> io::Result<(EventConsumer, EventNotifier)> {
    let fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?.into_raw_fd();
    // SAFETY: `fd` is a fresh eventfd that nothing else owns; the notifier takes ownership.
    let notifier = unsafe { EventNotifier::from_raw_fd(fd) };
    // SAFETY: the consumer shares the notifier's descriptor. The library only ever turns it
    // back into a raw fd without closing it (see above), so the descriptor is closed once, by
    // the notifier. The test `exit_events_are_closed_once_and_not_leaked` guards this.
    let consumer = unsafe { EventConsumer::from_raw_fd(fd) };
    Ok((consumer, notifier))
}

/// Epoll token of a worker's host queue (tokens up to `num_queues` belong to the library).
fn host_token(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

/// The virtio-net device.
pub struct NetBackend {
    config: NetConfig,
    port: Arc<dyn HostPort>,
    workers: Vec<Mutex<QueuePairWorker>>,
    stats: Vec<Arc<QueueStats>>,
    acked: AtomicU64,
    /// The session's info lines go to debug level (the caller rate-limits session logs).
    quiet: AtomicBool,
    /// The current session's [`crate::sigbus::FaultScope`] token (0: none): guest memory
    /// mapped for it is registered there.
    fault_token: AtomicU64,
    /// See [`NetBackend::set_request_thread_hook`].
    request_thread_hook: std::sync::OnceLock<fn() -> bool>,
    /// The session's guest memory, whose regions' dirty logs follow `VHOST_F_LOG_ALL`.
    memory: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// `SET_FEATURES` arrived in this session.
    features_set: AtomicBool,
    /// A `SEND_RARP` that came before `SET_FEATURES` (see [`NetBackend::announce`]).
    pending_announce: Mutex<Option<[u8; 6]>>,
}

/// What became of a `SEND_RARP` request ([`NetBackend::announce`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announced {
    /// The RARP frame went out of the host port.
    Sent,
    /// Kept until the guest's features are set.
    Deferred,
    /// Nothing to send: the guest announces itself (`VIRTIO_NET_F_GUEST_ANNOUNCE`).
    ByGuest,
}

impl Announced {
    /// `sent`, `deferred` or `by_guest`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Announced::Sent => "sent",
            Announced::Deferred => "deferred",
            Announced::ByGuest => "by_guest",
        }
    }
}

impl NetBackend {
    /// Builds the device over `port`, taking one host queue per queue pair.
    pub fn new(
        config: NetConfig,
        port: Arc<dyn HostPort>,
        busy_poll: Duration,
    ) -> Result<Self, BackendError> {
        if config.queue_pairs == 0 || config.queue_pairs > crate::config::MAX_QUEUE_PAIRS {
            return Err(BackendError::Config(format!(
                "queue pairs must be 1..={}, got {}",
                crate::config::MAX_QUEUE_PAIRS,
                config.queue_pairs
            )));
        }
        let mut workers = Vec::with_capacity(config.queue_pairs);
        let mut stats = Vec::with_capacity(config.queue_pairs);
        for pair in 0..config.queue_pairs {
            let q = port
                .take_queue(pair)
                .map_err(|source| BackendError::HostQueue { pair, source })?;
            let s = Arc::new(QueueStats::default());
            let mut w = QueuePairWorker::new(q, s.clone(), config.mtu, busy_poll);
            w.set_source_mac(config.port_security.then_some(config.mac.0));
            workers.push(Mutex::new(w));
            stats.push(s);
        }
        Ok(NetBackend {
            config,
            port,
            workers,
            stats,
            acked: AtomicU64::new(0),
            quiet: AtomicBool::new(false),
            fault_token: AtomicU64::new(0),
            request_thread_hook: std::sync::OnceLock::new(),
            memory: Mutex::new(None),
            features_set: AtomicBool::new(false),
            pending_announce: Mutex::new(None),
        })
    }

    /// The device's static configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Counters, one entry per queue pair.
    pub fn stats(&self) -> &[Arc<QueueStats>] {
        &self.stats
    }

    /// Features the guest acked in the current session.
    pub fn acked_features_now(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Delivers the frames queue pair `pair`'s host queue holds to the guest from the calling
    /// thread, unless that pair's worker is busy (then its own thread, woken by the host
    /// queue's fd, delivers them). For host queues fed by other threads of this process (the
    /// switch): a sender calls it once per burst, so switched frames reach the guest without
    /// waking another thread. Returns true when it ran.
    pub fn poll_rx(&self, pair: usize) -> bool {
        self.try_worker(pair).map(|mut w| w.rx_now()).is_some()
    }

    /// Worker `pair`, unless another thread holds it (never waits).
    fn try_worker(&self, pair: usize) -> Option<MutexGuard<'_, QueuePairWorker>> {
        match self.workers.get(pair)?.try_lock() {
            Ok(w) => Some(w),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Places frames `src` writes into queue pair `pair`'s guest RX buffers from the calling
    /// thread (see [`crate::port::RxSourceFn`]), unless that pair's worker is busy: then
    /// returns false and nothing was taken from `src`. For a switch copying frames straight
    /// from one guest's TX buffers into another's RX buffers.
    pub fn deliver_with(&self, pair: usize, src: &mut crate::port::RxSourceFn<'_>) -> bool {
        self.try_worker(pair).map(|mut w| w.rx_from(src)).is_some()
    }

    fn worker(&self, pair: usize) -> Option<MutexGuard<'_, QueuePairWorker>> {
        // A poisoned lock means a worker panicked mid-frame; its state is still structurally
        // valid (held buffers are re-derived from the ring), so keep serving.
        self.workers
            .get(pair)
            .map(|w| w.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Turns the dirty log of every guest memory region on or off, as `VHOST_F_LOG_ALL` is
    /// acked or not (see [`crate::dirty`]).
    fn apply_logging(&self) {
        let on = self.acked.load(Ordering::Relaxed) & crate::features::VHOST_F_LOG_ALL != 0;
        if let Some(m) = self
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            crate::dirty::set_logging(&vm_memory::GuestAddressSpace::memory(m), on);
        }
    }

    /// Announces the guest at `mac` on the host side after a migration (the vhost-user
    /// `SEND_RARP` request): sends a broadcast RARP frame from `mac` out of the host port, so
    /// switches and bridges learn the guest's new location at once. Nothing is sent when the
    /// guest announces itself (`VIRTIO_NET_F_GUEST_ANNOUNCE` negotiated). With port security a
    /// `mac` other than the port's is dropped and counted like a spoofed guest frame. Returns
    /// whether a frame was sent.
    ///
    /// Before the guest's features are set the announcement waits for them (it goes out when
    /// `SET_FEATURES` arrives): the host port's virtio-net header length is only known then,
    /// and QEMU sends `SEND_RARP` on a migration's destination before it starts the device.
    pub fn announce(&self, mac: [u8; 6]) -> std::io::Result<Announced> {
        let mut pending = self
            .pending_announce
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !self.features_set.load(Ordering::Acquire) {
            *pending = Some(mac);
            return Ok(Announced::Deferred);
        }
        drop(pending);
        let acked = self.acked.load(Ordering::Relaxed);
        if acked & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_ANNOUNCE) != 0 {
            return Ok(Announced::ByGuest);
        }
        let frame = crate::announce::rarp_frame(mac);
        let Some(mut w) = self.worker(0) else {
            return Err(io::Error::other("the device has no queue pair"));
        };
        w.inject(&frame).map(|()| Announced::Sent)
    }

    /// Sends the announcement [`NetBackend::announce`] kept for the guest's features.
    fn announce_pending(&self) {
        let pending = self
            .pending_announce
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mac) = pending {
            match self.announce(mac) {
                Ok(how) if self.quiet.load(Ordering::Relaxed) => tracing::debug!(
                    mac = %crate::MacAddr(mac),
                    outcome = how.as_str(),
                    "guest announced after migration (SEND_RARP, once the device was set up)"
                ),
                Ok(how) => tracing::info!(
                    mac = %crate::MacAddr(mac),
                    outcome = how.as_str(),
                    "guest announced after migration (SEND_RARP, once the device was set up)"
                ),
                Err(e) => tracing::warn!(
                    mac = %crate::MacAddr(mac),
                    error = %e,
                    "guest announcement (SEND_RARP) not sent"
                ),
            }
        }
    }

    /// Sets a function run whenever the thread serving vhost-user requests asks the device for
    /// its features or protocol features, before it answers: a daemon uses it to restrict that
    /// thread, which the `vhost` crate spawns without a hook of its own. When it returns false
    /// the device offers nothing, so the session cannot go on. Only the first call has effect.
    pub fn set_request_thread_hook(&self, hook: fn() -> bool) {
        let _ = self.request_thread_hook.set(hook);
    }

    /// Runs the request-thread hook, if any.
    fn request_thread_ok(&self) -> bool {
        self.request_thread_hook.get().is_none_or(|h| h())
    }

    /// Whether the current session logs its info lines (`false`: at debug level instead).
    pub fn set_session_logging(&self, verbose: bool) {
        self.quiet.store(!verbose, Ordering::Relaxed);
    }

    /// Forgets the previous frontend session before serving a new one.
    pub fn reset(&self) {
        self.acked.store(0, Ordering::Relaxed);
        self.features_set.store(false, Ordering::Release);
        *self
            .pending_announce
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        *self.memory.lock().unwrap_or_else(|p| p.into_inner()) = None;
        for pair in 0..self.workers.len() {
            if let Some(mut w) = self.worker(pair) {
                w.reset();
            }
        }
    }

    /// Ties the device's guest memory to a session's [`crate::sigbus::FaultScope`] (`None`:
    /// no session): the memory mapped while it is set is registered there, so a fault in it
    /// ends that session instead of the process.
    pub fn set_fault_scope(&self, scope: Option<&crate::sigbus::FaultScope>) {
        self.fault_token
            .store(scope.map_or(0, |s| s.token()), Ordering::Release);
    }

    /// Registers the host ranges of `mem` with the current fault scope.
    fn protect_memory(&self, mem: &GuestMemoryAtomic<GuestMemoryMmap>) {
        use vm_memory::{
            GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
        };
        let token = self.fault_token.load(Ordering::Acquire);
        if token == 0 {
            return;
        }
        let guard = mem.memory();
        let ranges: Vec<(usize, usize)> = guard
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some((host as usize, r.len() as usize))
            })
            .collect();
        let placed = crate::sigbus::set_ranges(token, &ranges);
        if placed < ranges.len() {
            tracing::warn!(
                regions = ranges.len(),
                protected = placed,
                "guest memory fault table full: a shrunk memory file in the others kills the process"
            );
        }
    }

    /// Registers every host queue with its worker thread's epoll (edge-triggered). Call once
    /// per session, after the daemon is created.
    pub fn register_host_queues<T: VhostUserBackend>(
        &self,
        handlers: &[Arc<VringEpollHandler<T>>],
    ) -> Result<(), BackendError> {
        let token = host_token(self.num_queues_inner());
        for (pair, handler) in handlers.iter().enumerate() {
            let Some(w) = self.worker(pair) else { break };
            handler
                .register_listener(w.host_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED, token)
                .map_err(|source| BackendError::Register { pair, source })?;
            // Same token: a recheck is handled like a receive event.
            if let Some(fd) = w.host_recheck_fd() {
                handler
                    .register_listener(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, token)
                    .map_err(|source| BackendError::Register { pair, source })?;
            }
        }
        Ok(())
    }

    fn num_queues_inner(&self) -> usize {
        self.config.queue_pairs * 2
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = DirtyLog;
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        self.num_queues_inner()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.config.max_queue_size)
    }

    fn features(&self) -> u64 {
        if !self.request_thread_ok() {
            return 0;
        }
        let f = offered_features(self.config.queue_pairs, self.port.capabilities());
        if self.config.live_migration {
            f | crate::features::VHOST_F_LOG_ALL
        } else {
            f
        }
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        let offloads = GuestOffloads::from_features(features);
        if let Err(e) = self.port.configure(vnet_hdr_len(features), offloads) {
            tracing::error!(error = %e, "cannot apply the guest's offloads to the host port");
        } else if self.quiet.load(Ordering::Relaxed) {
            tracing::debug!(
                features = format!("{features:#x}"),
                ?offloads,
                "guest features set"
            );
        } else {
            tracing::info!(
                features = format!("{features:#x}"),
                ?offloads,
                "guest features set"
            );
        }
        for pair in 0..self.workers.len() {
            if let Some(mut w) = self.worker(pair) {
                w.set_features(features);
            }
        }
        self.apply_logging();
        self.features_set.store(true, Ordering::Release);
        self.announce_pending();
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        if !self.request_thread_ok() {
            return VhostUserProtocolFeatures::empty();
        }
        let p = offered_protocol_features();
        if self.config.live_migration {
            p | VhostUserProtocolFeatures::LOG_SHMFD
        } else {
            p
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read_config(offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.protect_memory(&mem);
        *self.memory.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem.clone());
        self.apply_logging();
        for pair in 0..self.workers.len() {
            if let Some(mut w) = self.worker(pair) {
                w.set_memory(mem.clone());
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.config.queue_pairs)
            .map(|p| 0b11u64 << (2 * p))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        exit_event_pair().ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let pair = queue_index as usize / 2;
        if let Some(mut w) = self.worker(pair) {
            w.stop(queue_index as usize % 2);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringMutex],
        thread_id: usize,
    ) -> io::Result<()> {
        let host_event = u64::from(device_event) == host_token(self.num_queues_inner());
        if let Some(mut w) = self.worker(thread_id) {
            w.handle(host_event, vrings);
        }
        // Never an error: an error here would end the worker thread for the whole session.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use vhost::vhost_user::message::VhostUserVirtioFeatures;
    use vhost_user_backend::VringT;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::*;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    use super::*;
    use crate::config::MacAddr;
    use crate::features::HostCapabilities;
    use crate::testing::*;

    fn config(pairs: usize) -> NetConfig {
        NetConfig {
            mac: MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]),
            mtu: 1500,
            queue_pairs: pairs,
            max_queue_size: 256,
            port_security: false,
            live_migration: false,
        }
    }

    fn backend(pairs: usize) -> (NetBackend, Arc<FakePort>) {
        let port = Arc::new(FakePort::new(pairs));
        let b = NetBackend::new(config(pairs), port.clone(), Duration::ZERO).unwrap();
        (b, port)
    }

    #[test]
    fn port_security_reaches_every_worker() {
        let port = Arc::new(FakePort::new(2));
        let c = NetConfig {
            port_security: true,
            ..config(2)
        };
        let b = NetBackend::new(c, port, Duration::ZERO).unwrap();
        for pair in 0..2 {
            assert_eq!(
                b.worker(pair).unwrap().source_mac(),
                Some([0x02, 0x11, 0x22, 0x33, 0x44, 0x55])
            );
        }
        let (b, _) = backend(1);
        assert_eq!(b.worker(0).unwrap().source_mac(), None);
    }

    #[test]
    fn new_takes_one_host_queue_per_pair() {
        let (b, port) = backend(3);
        assert_eq!(*port.taken.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(b.stats().len(), 3);
        assert_eq!(b.config(), &config(3));
    }

    #[test]
    fn new_rejects_bad_pair_counts_and_missing_queues() {
        let port = Arc::new(FakePort::new(1));
        for pairs in [0, crate::config::MAX_QUEUE_PAIRS + 1] {
            let r = NetBackend::new(config(pairs), port.clone(), Duration::ZERO);
            assert!(matches!(r, Err(BackendError::Config(_))));
        }
        // The port has one queue; a second pair cannot be opened.
        let r = NetBackend::new(config(2), port, Duration::ZERO);
        assert!(matches!(r, Err(BackendError::HostQueue { pair: 1, .. })));
    }

    #[test]
    fn a_failing_request_thread_hook_offers_nothing() {
        use std::sync::atomic::AtomicUsize;
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        let (ok, _) = backend(1);
        ok.set_request_thread_hook(|| {
            CALLS.fetch_add(1, Ordering::Relaxed);
            true
        });
        assert_ne!(ok.features(), 0);
        assert!(!ok.protocol_features().is_empty());
        assert_eq!(
            CALLS.load(Ordering::Relaxed),
            2,
            "run on every features request"
        );
        let (refused, _) = backend(1);
        refused.set_request_thread_hook(|| false);
        assert_eq!(refused.features(), 0);
        assert!(refused.protocol_features().is_empty());
    }

    #[test]
    fn features_offered() {
        let (one, _) = backend(1);
        let f = one.features();
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO4,
        ] {
            assert_ne!(f & bit(b), 0, "feature bit {b} not offered");
        }
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_eq!(f & bit(VIRTIO_NET_F_MQ), 0);
        assert_eq!(f & bit(VIRTIO_NET_F_GUEST_USO4), 0);

        let (two, _) = backend(2);
        assert_ne!(two.features() & bit(VIRTIO_NET_F_MQ), 0);

        let port = Arc::new(FakePort {
            caps: HostCapabilities {
                uso: true,
                ..Default::default()
            },
            ..FakePort::new(1)
        });
        let uso = NetBackend::new(config(1), port, Duration::ZERO).unwrap();
        let f = uso.features();
        for b in [
            VIRTIO_NET_F_GUEST_USO4,
            VIRTIO_NET_F_GUEST_USO6,
            VIRTIO_NET_F_HOST_USO,
        ] {
            assert_ne!(f & bit(b), 0, "feature bit {b} not offered");
        }

        let p = one.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
    }

    #[test]
    fn config_space() {
        let (b, _) = backend(2);
        let c = b.get_config(0, 12);
        assert_eq!(&c[..6], &[0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(
            u16::from_le_bytes([c[6], c[7]]),
            VIRTIO_NET_S_LINK_UP as u16
        );
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        assert_eq!(b.get_config(10, 2), 1500u16.to_le_bytes());
        assert!(b.get_config(8, 8).is_empty());
        assert!(b.get_config(u32::MAX, 1).is_empty());
    }

    #[test]
    fn queues_and_threads() {
        let (b, _) = backend(3);
        assert_eq!(b.num_queues(), 6);
        assert_eq!(b.max_queue_size(), 256);
        assert_eq!(b.queues_per_thread(), vec![0b11, 0b1100, 0b11_0000]);
        // The consumer shares the notifier's descriptor (see `exit_event_pair`): like the
        // library, give it up without closing it, or the descriptor would be closed twice.
        let (consumer, notifier) = b.exit_event(0).expect("exit event");
        let _ = std::os::fd::IntoRawFd::into_raw_fd(consumer);
        drop(notifier);
        // Host events use a token the library does not reserve (0..=num_queues).
        assert_eq!(host_token(b.num_queues()), 7);
    }

    #[test]
    fn acked_features_configure_the_host_port() {
        let (b, port) = backend(2);
        let acked = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN);
        b.acked_features(acked);
        assert_eq!(b.acked_features_now(), acked);
        b.acked_features(0);
        b.acked_features(bit(VIRTIO_NET_F_GUEST_TSO4));
        let expect = GuestOffloads::TCP;
        assert_eq!(
            *port.configured.lock().unwrap(),
            vec![
                (12, expect),
                (10, GuestOffloads::default()),
                (10, GuestOffloads::default())
            ]
        );
        // Every worker follows the features.
        for pair in 0..2 {
            assert_eq!(b.worker(pair).unwrap().header(), (10, false));
        }
        b.acked_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF));
        for pair in 0..2 {
            assert_eq!(b.worker(pair).unwrap().header(), (12, true));
        }
    }

    #[test]
    fn configure_failure_is_not_fatal() {
        let port = Arc::new(FakePort {
            configure_fails: true,
            ..FakePort::new(1)
        });
        let b = NetBackend::new(config(1), port.clone(), Duration::ZERO).unwrap();
        b.acked_features(bit(VIRTIO_F_VERSION_1));
        assert_eq!(port.configured.lock().unwrap().len(), 1);
        assert_eq!(b.worker(0).unwrap().header(), (12, false));
    }

    /// Drives two queue pairs through the backend trait, as the library's worker threads do.
    #[test]
    fn handle_event_moves_frames_per_pair() {
        let (gm, mem) = guest_memory();
        let (b, port) = backend(2);
        b.update_memory(mem.clone()).unwrap();
        b.acked_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF));
        b.set_event_idx(false);
        // Pair 1's rings (queues 2 and 3); pair 0 is never touched.
        let mut rx = Driver::new(&gm, RX_RING, 16, RX_BUFS);
        let mut tx = Driver::new(&gm, TX_RING, 16, TX_BUFS);
        let vrings = [rx.vring(&mem), tx.vring(&mem)];
        let (rx_head, rx_buf) = rx.add_rx(1536);
        rx.add_rx(1536);
        let out = frame(12, 12 + 60, 1);
        tx.add_tx(&out, &[12, 0]);
        let inbound = frame(12, 12 + 70, 2);
        port.queues[1].push(inbound.clone());

        // A TX kick (token 1 of the thread) moves the TX frame and, since the host queue has
        // not reported WouldBlock yet, the waiting RX frame.
        b.handle_event(1, EventSet::IN, &vrings, 1).unwrap();
        assert_eq!(port.queues[1].sent(), vec![out]);
        assert_eq!(port.queues[0].sent(), Vec::<Vec<u8>>::new());
        assert_eq!(rx.all_used(), vec![(u32::from(rx_head), 82)]);
        let mut expect = inbound;
        expect[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(rx.read(rx_buf, 82), expect);
        assert_eq!(b.stats()[1].tx.frames.load(Relaxed), 1);
        assert_eq!(b.stats()[1].rx.frames.load(Relaxed), 1);
        assert_eq!(b.stats()[0].tx.frames.load(Relaxed), 0);

        // The host queue said WouldBlock: an RX kick alone does not read it again, the host
        // event token does.
        port.queues[1].push(frame(12, 12 + 30, 3));
        b.handle_event(0, EventSet::IN, &vrings, 1).unwrap();
        assert_eq!(port.queues[1].pending(), 1);
        let token = host_token(b.num_queues()) as u16;
        b.handle_event(token, EventSet::IN, &vrings, 1).unwrap();
        assert_eq!(port.queues[1].pending(), 0);
        assert_eq!(rx.used_idx(), 2);

        // GET_VRING_BASE on queue 2 (pair 1's RX) gives the held buffer back.
        rx.add_rx(1536);
        port.queues[1].push(frame(12, 12 + 30, 4));
        rx.add_rx(1536);
        b.handle_event(token, EventSet::IN, &vrings, 1).unwrap();
        assert_eq!(vrings[0].queue_next_avail(), 4);
        b.stop_vring(3).unwrap();
        assert_eq!(vrings[0].queue_next_avail(), 4);
        b.stop_vring(2).unwrap();
        assert_eq!(vrings[0].queue_next_avail(), 3);
        assert_eq!(rx.used_idx(), 3);

        // A new session starts clean.
        b.reset();
        assert_eq!(b.acked_features_now(), 0);
        assert_eq!(b.worker(1).unwrap().header(), (10, false));
    }

    /// The library's handling of exit events (see `exit_event_pair`): after many devices are
    /// built and dropped with the real library, no descriptor is left behind, and none is
    /// closed twice (a double close aborts a debug test binary: std's I/O-safety check).
    #[test]
    fn exit_events_are_closed_once_and_not_leaked() {
        let count = || std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        let (b, _port) = backend(2);
        let b = Arc::new(b);
        let before = count();
        for _ in 0..64 {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let daemon =
                vhost_user_backend::VhostUserDaemon::new("test".into(), b.clone(), mem).unwrap();
            let handlers = daemon.get_epoll_handlers();
            assert_eq!(handlers.len(), 2);
            for h in &handlers {
                h.send_exit_event();
            }
            drop(handlers);
            drop(daemon);
        }
        // Other tests open descriptors meanwhile; a leak would be 128.
        let grown = count().saturating_sub(before);
        assert!(grown < 32, "{grown} descriptors more after 64 devices");
    }
}
