//! [`NetBackend`]: the virtio-net device as a `vhost-user-backend` backend.
//!
//! One worker thread per queue pair; each worker's state sits behind its own mutex so workers
//! never contend with each other (the `&self` backend trait, not the `RwLock`-wrapped `Mut` one).
//! The backend outlives frontend connections: the host queues, counters and identity stay, and
//! [`NetBackend::reset`] forgets the previous session.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringMutex};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

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
            workers.push(Mutex::new(QueuePairWorker::new(
                q,
                s.clone(),
                config.mtu,
                busy_poll,
            )));
            stats.push(s);
        }
        Ok(NetBackend {
            config,
            port,
            workers,
            stats,
            acked: AtomicU64::new(0),
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

    fn worker(&self, pair: usize) -> Option<MutexGuard<'_, QueuePairWorker>> {
        // A poisoned lock means a worker panicked mid-frame; its state is still structurally
        // valid (held buffers are re-derived from the ring), so keep serving.
        self.workers
            .get(pair)
            .map(|w| w.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Forgets the previous frontend session before serving a new one.
    pub fn reset(&self) {
        self.acked.store(0, Ordering::Relaxed);
        for pair in 0..self.workers.len() {
            if let Some(mut w) = self.worker(pair) {
                w.reset();
            }
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
        }
        Ok(())
    }

    fn num_queues_inner(&self) -> usize {
        self.config.queue_pairs * 2
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        self.num_queues_inner()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.config.max_queue_size)
    }

    fn features(&self) -> u64 {
        offered_features(self.config.queue_pairs, self.port.capabilities())
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        let offloads = GuestOffloads::from_features(features);
        if let Err(e) = self.port.configure(vnet_hdr_len(features), offloads) {
            tracing::error!(error = %e, "cannot apply the guest's offloads to the host port");
        } else {
            tracing::info!(features = format!("{features:#x}"), ?offloads, "guest features set");
        }
        for pair in 0..self.workers.len() {
            if let Some(mut w) = self.worker(pair) {
                w.set_features(features);
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        offered_protocol_features()
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings track EVENT_IDX themselves.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read_config(offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        for pair in 0..self.workers.len() {
            if let Some(mut w) = self.worker(pair) {
                w.set_memory(mem.clone());
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.config.queue_pairs).map(|p| 0b11u64 << (2 * p)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
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
