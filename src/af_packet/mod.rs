//! The AF_PACKET host port: attaches a guest to an existing host interface (veth, macvlan,
//! bridge, NIC) without a tap in between.
//!
//! # Design
//!
//! Two `SOCK_RAW` AF_PACKET sockets per queue pair, each with one memory-mapped ring: a
//! receiving socket bound to the interface with `ETH_P_ALL` (RX ring), and a send-only socket
//! bound with protocol 0 (TX ring). Split because every frame the kernel frees from a TX ring
//! runs the socket's write-space wake-up, and the receiving socket is always watched (the
//! worker's epoll); nobody watches the send-only one.
//!
//! - **TPACKET_V2**, not V3. V3 packs frames densely into blocks and hands a block to user space
//!   only when it is full or its retire timer (`tp_retire_blk_tov`, millisecond granularity)
//!   expires, so a lone frame — a ping, a TCP ACK — waits up to that timeout: latency the guest
//!   sees on every request/response exchange. V2 releases every frame to user space the moment
//!   it is written, and wakes the worker per frame (edge-triggered, so the worker drains the
//!   ring in one go). V3 also cannot transmit from blocks, so V2 serves both directions the same
//!   way. The price is fixed-size slots (below).
//! - **`PACKET_VNET_HDR`**: a 10-byte `struct virtio_net_hdr` precedes every frame in both rings,
//!   so GSO and checksum metadata cross in both directions: a 64 KiB TSO frame from the guest
//!   leaves as one skb (segmented by the kernel only where the path needs it), and GSO skbs from
//!   the host (e.g. a local TCP sender behind a veth) reach the guest whole. The guest's header
//!   is 12 bytes with VERSION_1/MRG_RXBUF ([`HostPort::configure`] says which): on receive the
//!   10 kernel bytes are followed by 2 zero bytes (`num_buffers`, filled in by the caller), on
//!   transmit the last 2 bytes are dropped. What the kernel delivers is checked against the
//!   guest's negotiated offloads: partial checksums are completed in software for a guest
//!   without GUEST_CSUM, and GSO frames of a kind the guest did not accept are dropped and
//!   counted (AF_PACKET, unlike a tap, cannot be told to segment for us).
//! - **Ring sizes.** RX slots are 2 KiB (512 per 1 MiB block, 16 blocks: 8192 slots, 16 MiB),
//!   enough for any MTU-1500 frame, so the ring absorbs ~10 ms of small-frame traffic at
//!   0.8 Mpps while the worker is descheduled (255 GSO-sized slots lost 90 % of a 64-byte flood
//!   on a busy 2-core host). A larger frame (GSO, jumbo) is handled with
//!   `PACKET_COPY_THRESH`: the kernel puts its start in the slot, marks it `TP_STATUS_COPY` and
//!   queues the whole skb on the socket (bounded by an 8 MiB receive buffer); the queue reads
//!   it with `recvmsg` (VLAN tag from `PACKET_AUXDATA`) into a bounce buffer and delivers it
//!   like a slot. Slot claim and queueing happen under one kernel lock, so slots and queued
//!   frames pair up in order. TX slots hold a whole 64 KiB GSO frame plus headers (15 per
//!   block, 4 blocks: 60 slots, 4 MiB). A frame over 64 KiB (BIG TCP), or a large one while the
//!   queue is full, is dropped and counted (`rx_truncated`), never delivered cut.
//! - **Receive** copies the next ready slot (header + frame, with a VLAN tag the kernel moved
//!   into metadata put back) into the guest's buffers in one pass and returns the slot to the
//!   kernel; a frame larger than the buffers is dropped (`InvalidInput`, counted by the caller).
//!   Slots are taken in ring order, except that one the kernel claimed but has not filled yet
//!   (another CPU is still writing it) does not hold up later, already filled ones: they are
//!   consumed and kept, and every slot goes back to the kernel in order (module `cursor`).
//!   Frames the kernel drops because the ring is full are counted and logged.
//! - **Transmit** copies each guest frame of a burst into the next free TX slot and marks it
//!   `TP_STATUS_SEND_REQUEST`; at the end of the burst ([`HostQueue::flush`]) one
//!   `send(fd, NULL, 0, MSG_DONTWAIT)` hands them all to the kernel, which builds the skbs
//!   around the ring pages: one system call per burst, not per frame. Flush waits until the
//!   kernel has taken every frame of the burst: when it could not yet (socket buffer full,
//!   driver queue stopped), or no slot is free for the next frame, the queue sleeps in
//!   `poll(POLLOUT)` and kicks again, bounded by [`TX_STALL`], so no frame the guest gave is
//!   lost to a transient condition and a dead device cannot wedge the worker. A frame the kernel
//!   refuses (`TP_STATUS_WRONG_FORMAT`, e.g. a GSO header it rejects) stops the kernel at its
//!   slot: it is counted, the frames behind it move down one slot and are kicked again, so the
//!   ring never stalls and nothing is lost silently (hence no `PACKET_LOSS`, which would drop
//!   such frames uncounted). Frames dropped after `send` accepted them are reported by
//!   `flush`, and the worker moves them from its sent to its dropped counters.
//! - `PACKET_QDISC_BYPASS` (straight to the driver), `PACKET_IGNORE_OUTGOING` (the port never
//!   receives its own transmissions; frames marked `PACKET_OUTGOING` are skipped anyway on
//!   kernels without it), and promiscuous membership (`PACKET_MR_PROMISC`) so frames for the
//!   guest's MAC reach the socket on interfaces that filter (bridges, NICs); the kernel releases
//!   the membership when the socket closes. Past the qdisc the kernel drops a GSO frame the
//!   device cannot take whole, so on an interface with TCP segmentation offload off (read with
//!   `ETHTOOL_GTSO` when the port opens) the guest is not offered HOST_TSO4/6 and segments
//!   itself. Turning TSO off on the interface while a guest runs is not followed.
//! - **MAC filter** (optional, [`AfPacketPort::open_filtered`]): a classic BPF socket filter on
//!   each receiving socket, attached before it is bound, passes frames whose destination is the
//!   guest's MAC or a group address and drops the rest in the kernel, before they take a slot.
//!   Sockets built on a re-created interface get it too.
//! - **Multiqueue**: with more than one queue pair the sockets join one `PACKET_FANOUT_HASH`
//!   group (a kernel-chosen unique id per port), so each flow lands on one queue pair.
//! - **Link changes** are followed by a per-port watcher thread (netlink link events; it sleeps
//!   otherwise), which keeps a shared link state, logs each transition once with the frames
//!   dropped meanwhile, and re-attaches: when the interface is deleted (or moved away) and an
//!   interface of the same name appears and is up, it builds new sockets and a new fan-out
//!   group and hands them to the queues, which swap them in on their own thread. While the
//!   link is down or gone, transmits fail at once (counted by the caller, never retried in a
//!   loop); the kernel resumes reception by itself when a downed interface comes back up. The
//!   watcher exists because the queue workers run sandboxed (no capabilities, no interface
//!   ioctls): everything a worker does is ring memory, `send`, `recvmsg`, `poll`,
//!   `epoll_wait` and `getsockopt`. Nothing spins: every wait is an fd or bounded.
//!
//! # Kernel limits worth knowing
//!
//! - A GSO skb whose type `virtio_net_hdr_from_skb` cannot describe (SCTP, ESP; TCP and UDP_L4
//!   are fine) is dropped by the kernel before it reaches the ring; in the kernels read for
//!   this (`tpacket_rcv`), that drop path also leaves the slot's owner bit set, which would stop
//!   a V2 ring. Not reproducible here (no SCTP in the test kernel); watch for a queue whose RX
//!   stops while the kernel keeps counting drops.
//! - Tunnel GSO skbs (e.g. VXLAN over the interface) are described by their inner TCP type; the
//!   guest receives them as such.

mod cursor;
mod queue;
mod sys;
mod watcher;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost_net_backend::features::{MAX_GSO_FRAME, VNET_HDR_LEN_LEGACY, VNET_HDR_LEN_V1};
use vhost_net_backend::{GuestOffloads, HostCapabilities, HostPort, HostQueue, MacAddr};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::netdev::{self, IfName};

use self::queue::AfPacketQueue;
use self::sys::{PacketSocket, RingGeometry, SetupError, RX_MAX_MAC_OFFSET, TX_DATA_OFFSET};
use self::watcher::Watcher;
use crate::frame::VNET_HDR_LEN;

/// Bytes per ring block: a power of two, so the kernel's power-of-two page allocation wastes
/// nothing, large enough for 15 GSO-sized slots.
const BLOCK_SIZE: usize = 1 << 20;
/// RX ring: 16 blocks of 512 slots = 8192 frames (16 MiB).
const RX_BLOCKS: usize = 16;
/// Bytes per RX slot: an Ethernet frame of up to 1958 bytes after the kernel's headers (any
/// MTU-1500 frame, VLAN-tagged or not); larger ones arrive through the socket's queue.
const RX_SLOT: usize = 2048;
/// TX ring: 4 blocks of 15 slots = 60 frames.
const TX_BLOCKS: usize = 4;
/// Slack for tags the kernel may leave in the frame data (a second VLAN header).
const SLOT_SLACK: usize = 8;

/// The RX ring: slots sized for MTU-1500 frames, so that the ring holds thousands of small
/// frames; a larger frame (GSO, jumbo) is marked `TP_STATUS_COPY` in its slot and read whole
/// from the socket's queue.
pub(crate) const RX_RING: RingGeometry = RingGeometry::new(RX_SLOT, BLOCK_SIZE, RX_BLOCKS);
/// The TX ring: a slot holds the vnet header and the largest frame the guest may send.
pub(crate) const TX_RING: RingGeometry = RingGeometry::new(
    TX_DATA_OFFSET + VNET_HDR_LEN + MAX_GSO_FRAME + SLOT_SLACK,
    BLOCK_SIZE,
    TX_BLOCKS,
);

// Every slot holds a whole frame: the kernel puts an RX frame's MAC header at most
// RX_MAX_MAC_OFFSET into its slot, and a TX frame's data at TX_DATA_OFFSET.
const _: () = assert!(RX_RING.frame_size >= RX_MAX_MAC_OFFSET + 1522 + SLOT_SLACK);
const _: () = assert!(TX_RING.frame_size >= TX_DATA_OFFSET + VNET_HDR_LEN + MAX_GSO_FRAME);

/// How long a transmit may wait for the kernel to free a TX slot or take a frame before the
/// frame is dropped (a wedged driver queue, a device that stopped completing transmissions).
pub const TX_STALL: Duration = Duration::from_millis(100);

/// Errors opening an AF_PACKET port.
#[derive(Debug, thiserror::Error)]
pub enum AfPacketError {
    /// The interface name is invalid.
    #[error(transparent)]
    Name(#[from] netdev::NameError),
    /// No interface of that name in this network namespace.
    #[error("interface {0} does not exist in this network namespace")]
    NoSuchInterface(String),
    /// Reading the interface's settings failed.
    #[error(transparent)]
    Link(#[from] netdev::LinkError),
    /// Setting up a queue's socket failed.
    #[error("cannot set up AF_PACKET queue {queue} on {name} ({what}): {source}{hint}")]
    Socket {
        /// Interface name.
        name: String,
        /// Queue pair.
        queue: usize,
        /// Which step.
        what: &'static str,
        /// Cause.
        source: io::Error,
        /// What to check.
        hint: &'static str,
    },
}

impl AfPacketError {
    fn socket(name: &IfName, queue: usize, e: SetupError) -> Self {
        let hint = match e.source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => " (AF_PACKET sockets need CAP_NET_RAW)",
            Some(libc::ENOMEM) => " (the kernel could not allocate the ring memory)",
            Some(libc::EINVAL) if e.what == "PACKET_FANOUT" => {
                " (multiqueue needs the interface up when the port opens)"
            }
            Some(libc::ENOPROTOOPT) | Some(libc::EINVAL) => {
                " (this kernel lacks a needed AF_PACKET feature: TPACKET_V2 rings with \
                 PACKET_VNET_HDR need Linux >= 4.6)"
            }
            _ => "",
        };
        AfPacketError::Socket {
            name: name.as_str().into(),
            queue,
            what: e.what,
            source: e.source,
            hint,
        }
    }
}

/// Declares the AF_PACKET counters once, as `name: "help"`: the live [`AfPacketCounters`], the
/// plain [`AfPacketSnapshot`] (`ctl stats` JSON) and the `(name, help, value)` list the
/// metrics endpoint renders all come from this one table.
macro_rules! af_packet_counters {
    ($($name:ident: $help:literal,)*) => {
        /// Port-wide counters of events the data path's own counters do not see (they count
        /// what `recv`/`send` report; these say why).
        #[derive(Debug, Default)]
        pub struct AfPacketCounters {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of an AF_PACKET port's interface, link state and
        /// [`AfPacketCounters`], as plain numbers.
        #[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct AfPacketSnapshot {
            /// Interface name.
            pub interface: String,
            /// Link state.
            pub link: LinkState,
            $(#[doc = $help] #[serde(default)] pub $name: u64,)*
        }

        impl AfPacketSnapshot {
            /// Every counter as `(name, description, value)`, in a fixed order.
            pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name),)*]
            }
        }

        impl AfPacketCounters {
            fn snapshot(&self, interface: String, link: LinkState) -> AfPacketSnapshot {
                AfPacketSnapshot {
                    interface,
                    link,
                    $($name: self.$name.load(Relaxed),)*
                }
            }
        }
    };
}

af_packet_counters! {
    rx_truncated: "Frames too large for the device (over 64 KiB, e.g. BIG TCP), or for a slot \
        while the socket's queue for such frames was full (dropped, never delivered cut).",
    rx_gso_refused: "GSO frames of a kind the guest did not negotiate (dropped).",
    rx_too_big: "Frames larger than the guest's buffers (dropped).",
    rx_malformed: "Frames with inconsistent ring or checksum metadata (dropped).",
    rx_csum_completed: "Partial checksums completed in software for a guest without GUEST_CSUM.",
    rx_ring_full: "Frames the kernel dropped because the AF_PACKET RX ring was full.",
    tx_refused: "Guest frames refused before transmission (bad GSO header, oversize).",
    tx_link_down: "Guest frames dropped because the interface was down or gone.",
    tx_stalled: "Guest frames dropped after waiting for the kernel to take them.",
    tx_failed: "Guest frames dropped because the kernel failed their transmission otherwise.",
    reattached: "Times a queue rebuilt its socket on a re-created interface.",
    rx_copied: "Frames larger than an RX ring slot (GSO, jumbo), delivered through the \
        socket's queue.",
}

/// Link state, kept by the watcher and read by the queues (to fail transmits fast).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Link {
    Up = 0,
    Down = 1,
    Gone = 2,
}

/// State shared by the port, its queues and its link watcher.
pub(crate) struct Shared {
    name: IfName,
    queues: usize,
    /// Receive only frames for this MAC (and group addresses); sockets built on re-attach too.
    only_mac: Option<[u8; 6]>,
    hdr_len: AtomicUsize,
    offloads: AtomicU8,
    link: AtomicU8,
    /// One eventfd per queue, in the queue's epoll set: the watcher's doorbell.
    wakers: Vec<EventFd>,
    /// Sockets on a re-created interface, waiting for their queue to take them.
    replacements: Mutex<Vec<Option<PacketSocket>>>,
    counters: AfPacketCounters,
}

impl Shared {
    fn new(name: IfName, queues: usize, only_mac: Option<[u8; 6]>) -> io::Result<Self> {
        Ok(Shared {
            name,
            queues,
            only_mac,
            hdr_len: AtomicUsize::new(VNET_HDR_LEN_V1),
            offloads: AtomicU8::new(0),
            link: AtomicU8::new(Link::Up as u8),
            wakers: (0..queues)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<io::Result<_>>()?,
            replacements: Mutex::new((0..queues).map(|_| None).collect()),
            counters: AfPacketCounters::default(),
        })
    }

    pub(crate) fn hdr_len(&self) -> usize {
        self.hdr_len.load(Relaxed)
    }

    pub(crate) fn offloads(&self) -> GuestOffloads {
        let b = self.offloads.load(Relaxed);
        let has = |i: u8| b & (1 << i) != 0;
        GuestOffloads {
            csum: has(0),
            tso4: has(1),
            tso6: has(2),
            tso_ecn: has(3),
            uso4: has(4),
            uso6: has(5),
        }
    }

    fn set_offloads(&self, o: GuestOffloads) {
        let bits = [o.csum, o.tso4, o.tso6, o.tso_ecn, o.uso4, o.uso6]
            .iter()
            .enumerate()
            .fold(0u8, |acc, (i, on)| acc | (u8::from(*on) << i));
        self.offloads.store(bits, Relaxed);
    }

    pub(crate) fn link(&self) -> Link {
        match self.link.load(Relaxed) {
            1 => Link::Down,
            2 => Link::Gone,
            _ => Link::Up,
        }
    }

    /// Takes the replacement socket for queue `pair`, if the watcher left one.
    pub(crate) fn take_replacement(&self, pair: usize) -> Option<PacketSocket> {
        self.replacements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(pair)
            .and_then(Option::take)
    }

    pub(crate) fn name(&self) -> &str {
        self.name.as_str()
    }
}

/// Opens one socket per queue pair on interface `ifindex`, joined in one hash fan-out group
/// (a new, kernel-chosen id) when there are several, with the port's MAC filter if it has one.
/// On failure, the failing queue's index.
pub(crate) fn open_sockets(
    ifindex: libc::c_int,
    shared: &Shared,
) -> Result<Vec<PacketSocket>, (usize, SetupError)> {
    let (queues, only_mac) = (shared.queues, shared.only_mac);
    let mut socks: Vec<PacketSocket> = Vec::with_capacity(queues);
    let mut group = None;
    for pair in 0..queues {
        let s = PacketSocket::open(ifindex, RX_RING, TX_RING, only_mac).map_err(|e| (pair, e))?;
        if queues > 1 {
            let joined = match group {
                None => s.fanout_create().map(|id| group = Some(id)),
                Some(id) => s.fanout_join(id),
            };
            joined.map_err(|source| {
                (
                    pair,
                    SetupError {
                        what: "PACKET_FANOUT",
                        source,
                    },
                )
            })?;
        }
        socks.push(s);
    }
    Ok(socks)
}

/// An AF_PACKET port on one interface: one socket and ring pair per queue pair.
pub struct AfPacketPort {
    shared: Arc<Shared>,
    queues: Mutex<Vec<Option<AfPacketQueue>>>,
    mtu: u16,
    /// The interface had TCP segmentation offload off when the port opened.
    no_tso: bool,
    /// Stopped and joined when the port is dropped.
    _watcher: Option<Watcher>,
}

impl AfPacketPort {
    /// Opens `queues` AF_PACKET sockets on the existing interface `ifname`, bringing it up if
    /// it is down. The guest MTU is `mtu` when given (the interface's own MTU is left alone),
    /// else the interface's.
    pub fn open(ifname: &str, queues: usize, mtu: Option<u16>) -> Result<Self, AfPacketError> {
        Self::open_filtered(ifname, queues, mtu, None)
    }

    /// As [`open`](Self::open); with `only_mac`, the port receives only frames addressed to
    /// that MAC (the guest's) or to broadcast/multicast: on a shared bridge, macvlan or NIC the
    /// guest does not see, and the port does not copy, other hosts' unicast traffic.
    pub fn open_filtered(
        ifname: &str,
        queues: usize,
        mtu: Option<u16>,
        only_mac: Option<MacAddr>,
    ) -> Result<Self, AfPacketError> {
        let name = IfName::new(ifname)?;
        let ifindex = crate::netdev::index(name.as_cstr())
            .ok_or_else(|| AfPacketError::NoSuchInterface(ifname.into()))?;
        let if_mtu = netdev::mtu(&name)?;
        if let Err(e) = netdev::set_up(&name) {
            tracing::warn!(interface = ifname, error = %e, "cannot bring the interface up");
        }
        let guest_mtu = mtu.unwrap_or(if_mtu);
        if guest_mtu > if_mtu {
            tracing::warn!(
                interface = ifname,
                guest_mtu,
                interface_mtu = if_mtu,
                "the guest MTU exceeds the interface's: the kernel drops larger frames"
            );
        }
        let queues = queues.max(1);
        let sock_err = |(q, e)| AfPacketError::socket(&name, q, e);
        let only_mac = only_mac.map(|m| m.0);
        let shared = Shared::new(name.clone(), queues, only_mac).map_err(|source| {
            sock_err((
                0,
                SetupError {
                    what: "eventfd",
                    source,
                },
            ))
        })?;
        let shared = Arc::new(shared);
        let socks = open_sockets(ifindex, &shared).map_err(sock_err)?;
        let probe = socks[0].probe();
        let mut qs = Vec::with_capacity(queues);
        for (pair, sock) in socks.into_iter().enumerate() {
            qs.push(
                AfPacketQueue::new(pair, shared.clone(), sock).map_err(|e| sock_err((pair, e)))?,
            );
        }
        let watcher = probe.and_then(|p| Watcher::spawn(shared.clone(), ifindex, p));
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    interface = ifname,
                    error = %e,
                    "cannot watch the interface: link changes will not be followed"
                );
                None
            }
        };
        let opt = qs.first().map(|q| q.optional()).unwrap_or_default();
        tracing::info!(
            interface = ifname,
            ifindex,
            queues = qs.len(),
            mtu = guest_mtu,
            rx_slots = RX_RING.frame_nr(),
            tx_slots = TX_RING.frame_nr(),
            slot_bytes = RX_RING.frame_size,
            qdisc_bypass = opt.qdisc_bypass,
            ignore_outgoing = opt.ignore_outgoing,
            mac_filter = only_mac.map(|m| MacAddr(m).to_string()),
            "af_packet port ready"
        );
        Ok(AfPacketPort {
            shared,
            queues: Mutex::new(qs.into_iter().map(Some).collect()),
            mtu: guest_mtu,
            no_tso: netdev::tso_enabled(&name) == Some(false),
            _watcher: watcher,
        })
    }

    /// The MTU used for the guest.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        self.shared.name()
    }

    /// The port's own counters (drops by cause, link events).
    pub fn counters(&self) -> &AfPacketCounters {
        &self.shared.counters
    }
}

impl HostPort for AfPacketPort {
    fn capabilities(&self) -> HostCapabilities {
        HostCapabilities {
            // USO through AF_PACKET's vnet header is not verified here; never offered.
            uso: false,
            // Frames go to the driver past the qdisc (PACKET_QDISC_BYPASS), and the kernel
            // drops a GSO frame there that the device cannot take whole: on an interface
            // without TSO the guest must segment itself.
            no_host_tso: self.no_tso,
        }
    }

    fn configure(&self, vnet_hdr_len: usize, offloads: GuestOffloads) -> io::Result<()> {
        if vnet_hdr_len != VNET_HDR_LEN_LEGACY && vnet_hdr_len != VNET_HDR_LEN_V1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported virtio-net header length {vnet_hdr_len}"),
            ));
        }
        self.shared.hdr_len.store(vnet_hdr_len, Relaxed);
        self.shared.set_offloads(offloads);
        Ok(())
    }

    fn take_queue(&self, pair: usize) -> io::Result<Box<dyn HostQueue>> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let q = queues
            .get_mut(pair)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such AF_PACKET queue"))?;
        Ok(Box::new(q))
    }
}

/// An interface's link state as operators see it (`ctl stats`, metrics): `"up"`, `"down"`
/// (administratively, `IFF_UP` clear) or `"gone"` (deleted or moved to another namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// The interface is up.
    Up,
    /// The interface exists but is administratively down.
    Down,
    /// The interface no longer exists in the port's network namespace.
    Gone,
}

impl LinkState {
    /// The state's name: `up`, `down` or `gone`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::Gone => "gone",
        }
    }
}

/// A cloneable handle on an AF_PACKET port's link state and counters, for reading them
/// while the port itself belongs to the device (it keeps the port's shared state alive).
#[derive(Clone)]
pub struct AfPacketStatus {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AfPacketStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfPacketStatus")
            .field("interface", &self.shared.name())
            .finish_non_exhaustive()
    }
}

impl AfPacketStatus {
    /// The current link state and counters.
    pub fn snapshot(&self) -> AfPacketSnapshot {
        let link = match self.shared.link() {
            Link::Up => LinkState::Up,
            Link::Down => LinkState::Down,
            Link::Gone => LinkState::Gone,
        };
        self.shared
            .counters
            .snapshot(self.shared.name().to_string(), link)
    }
}

impl AfPacketPort {
    /// A handle that reads the port's link state and counters after the port has been handed
    /// to the device.
    pub fn status(&self) -> AfPacketStatus {
        AfPacketStatus {
            shared: self.shared.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_slots_fit_small_frames_tx_slots_a_whole_gso_frame() {
        assert_eq!(RX_RING.frame_nr(), 8192);
        assert_eq!(RX_RING.frame_size, RX_SLOT);
        assert_eq!(RX_RING.bytes(), 16 << 20);
        assert_eq!(TX_RING.frame_nr(), 60);
    }

    #[test]
    fn offload_bits_round_trip() {
        let s = Shared::new(IfName::new("x").unwrap(), 2, None).unwrap();
        let o = GuestOffloads {
            csum: true,
            tso4: false,
            tso6: true,
            tso_ecn: false,
            uso4: true,
            uso6: false,
        };
        s.set_offloads(o);
        assert_eq!(s.offloads(), o);
        assert_eq!(s.link(), Link::Up);
        s.link.store(Link::Gone as u8, Relaxed);
        assert_eq!(s.link(), Link::Gone);
        assert!(s.take_replacement(1).is_none());
        assert!(s.take_replacement(7).is_none());
    }
}
