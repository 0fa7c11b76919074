//! Per-queue-pair counters: frames, bytes, notifications and drops by reason.
//!
//! Counters are plain relaxed atomics owned by one worker thread and read by anyone.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a frame or a descriptor chain was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// A descriptor points outside guest memory, or its address overflows.
    BadAddress = 0,
    /// The chain is malformed: a loop, a broken `next`, a bad indirect table, too many descriptors.
    BadChain,
    /// The chain has descriptors of the wrong direction (device-writable on TX, readable on RX).
    WrongDirection,
    /// A TX frame shorter than the virtio-net header plus an Ethernet header.
    Runt,
    /// A frame larger than the other side can take.
    Oversize,
    /// The host port refused a frame from the guest (e.g. a bad GSO header).
    HostRejected,
    /// A frame from the host port arrived while the guest had no buffer for it.
    NoRxBuffer,
    /// Reading from or writing to the host port failed for another reason.
    HostError,
    /// With port security: a guest frame whose Ethernet source is not the port's MAC.
    SpoofedSource,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 9] = [
        DropReason::BadAddress,
        DropReason::BadChain,
        DropReason::WrongDirection,
        DropReason::Runt,
        DropReason::Oversize,
        DropReason::HostRejected,
        DropReason::NoRxBuffer,
        DropReason::HostError,
        DropReason::SpoofedSource,
    ];

    /// A stable snake_case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::BadAddress => "bad_address",
            DropReason::BadChain => "bad_chain",
            DropReason::WrongDirection => "wrong_direction",
            DropReason::Runt => "runt",
            DropReason::Oversize => "oversize",
            DropReason::HostRejected => "host_rejected",
            DropReason::NoRxBuffer => "no_rx_buffer",
            DropReason::HostError => "host_error",
            DropReason::SpoofedSource => "spoofed_source",
        }
    }
}

/// Counters of one direction of one queue pair.
#[derive(Debug, Default)]
pub struct DirectionStats {
    /// Frames delivered.
    pub frames: AtomicU64,
    /// Bytes delivered (Ethernet frame bytes, without the virtio-net header).
    pub bytes: AtomicU64,
    /// Guest notifications (interrupts) sent, or kicks received.
    pub notifications: AtomicU64,
    /// Drops, indexed by `DropReason as usize`.
    pub drops: [AtomicU64; DropReason::ALL.len()],
}

impl DirectionStats {
    /// Adds one delivered frame of `bytes` bytes.
    #[inline]
    pub fn frame(&self, bytes: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts one drop.
    #[inline]
    pub fn drop(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Total drops of all reasons.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.load(Ordering::Relaxed)).sum()
    }

    /// Drops of one reason.
    pub fn drops_of(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }
}

/// Counters of one queue pair. RX is host→guest, TX is guest→host.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Host → guest.
    pub rx: DirectionStats,
    /// Guest → host.
    pub tx: DirectionStats,
    /// Times the worker woke up and found work.
    pub busy_wakeups: AtomicU64,
    /// Times the worker woke up and found nothing to do.
    pub idle_wakeups: AtomicU64,
    /// Times frames waited because the guest's RX ring had no room (ring-full events).
    pub rx_ring_full: AtomicU64,
}
