//! The kernel side: a queue's AF_PACKET sockets with their mmap'd RX and TX rings, and the small
//! syscalls around it (fan-out, statistics, link state and link events).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crate::frame::VNET_HDR_LEN;

/// `TPACKET_V2` of `enum tpacket_versions`.
const TPACKET_V2: libc::c_int = 1;
/// `TPACKET_ALIGNMENT`.
const TPACKET_ALIGNMENT: usize = 16;
/// `sizeof(struct tpacket2_hdr)` rounded to `TPACKET_ALIGNMENT`: where the `sockaddr_ll` of an
/// RX frame sits, and where a TX frame's data (our vnet header) starts.
pub const TPACKET2_HDR_ALIGNED: usize = 32;
/// `TPACKET2_HDRLEN`: the aligned header plus `struct sockaddr_ll`.
pub const TPACKET2_HDRLEN: usize = TPACKET2_HDR_ALIGNED + mem::size_of::<libc::sockaddr_ll>();
/// Offset of a TX frame's data: `tp_hdrlen - sizeof(struct sockaddr_ll)` (no PACKET_TX_HAS_OFF).
pub const TX_DATA_OFFSET: usize = TPACKET2_HDRLEN - mem::size_of::<libc::sockaddr_ll>();
/// Offset of a received frame's MAC header in the worst case the ring must hold: the kernel
/// puts it at `TPACKET_ALIGN(TPACKET2_HDRLEN + 16) + vnet header - mac length`, and needs at
/// most this much before the frame data.
pub const RX_MAX_MAC_OFFSET: usize = align(TPACKET2_HDRLEN + 16) + VNET_HDR_LEN;

const fn align(x: usize) -> usize {
    (x + TPACKET_ALIGNMENT - 1) & !(TPACKET_ALIGNMENT - 1)
}

/// Shape of one ring: `block_nr` blocks of `block_size` bytes, each holding
/// `frames_per_block` frame slots of `frame_size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGeometry {
    /// Bytes per block (a multiple of the page size; the kernel allocates a power of two
    /// pages per block, so powers of two waste nothing).
    pub block_size: usize,
    /// Number of blocks.
    pub block_nr: usize,
    /// Bytes per frame slot (a multiple of 16).
    pub frame_size: usize,
    /// Frame slots per block.
    pub frames_per_block: usize,
}

impl RingGeometry {
    /// The ring with `block_nr` blocks of `block_size` bytes whose slots each hold at least
    /// `min_frame` bytes, the spare space of a block spread over its slots.
    ///
    /// # Panics
    /// If a block cannot hold one such slot (a programming error in the constants).
    pub const fn new(min_frame: usize, block_size: usize, block_nr: usize) -> Self {
        let frames_per_block = block_size / align(min_frame);
        assert!(frames_per_block > 0 && block_nr > 0);
        let frame_size = (block_size / frames_per_block) & !(TPACKET_ALIGNMENT - 1);
        RingGeometry {
            block_size,
            block_nr,
            frame_size,
            frames_per_block,
        }
    }

    /// Number of frame slots.
    pub const fn frame_nr(&self) -> usize {
        self.block_nr * self.frames_per_block
    }

    /// Bytes of the ring in the mapping.
    pub const fn bytes(&self) -> usize {
        self.block_size * self.block_nr
    }

    /// Offset of slot `idx` from the start of the ring.
    pub const fn offset(&self, idx: usize) -> usize {
        (idx / self.frames_per_block) * self.block_size
            + (idx % self.frames_per_block) * self.frame_size
    }

    fn req(&self) -> io::Result<libc::tpacket_req> {
        let c = |v: usize| libc::c_uint::try_from(v).map_err(io::Error::other);
        Ok(libc::tpacket_req {
            tp_block_size: c(self.block_size)?,
            tp_block_nr: c(self.block_nr)?,
            tp_frame_size: c(self.frame_size)?,
            tp_frame_nr: c(self.frame_nr())?,
        })
    }
}

/// A failed step of socket setup.
#[derive(Debug)]
pub struct SetupError {
    /// Which step.
    pub what: &'static str,
    /// Cause.
    pub source: io::Error,
}

fn step<T>(what: &'static str, r: io::Result<T>) -> Result<T, SetupError> {
    r.map_err(|source| SetupError { what, source })
}

/// Options the kernel may not support; recorded so the port can report them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Optional {
    /// PACKET_QDISC_BYPASS is on.
    pub qdisc_bypass: bool,
    /// PACKET_IGNORE_OUTGOING is on (else outgoing frames are skipped by `sll_pkttype`).
    pub ignore_outgoing: bool,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: the kernel reads `size_of::<T>()` bytes from a live reference; every T used here
    // is the plain-old-data struct or int the option expects.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn getsockopt<T: Default>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut val = T::default();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into a live, exclusive `T`, a plain-old-data
    // type for the options used here.
    cvt(unsafe { libc::getsockopt(fd, level, name, (&mut val as *mut T).cast(), &mut len) })?;
    Ok(val)
}

/// A shared mapping of a socket's ring, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps the `len` bytes of ring that socket `fd` set up.
    fn new(fd: RawFd, len: usize) -> Result<Mapping, SetupError> {
        // SAFETY: a fresh shared mapping of the socket's ring; the result is checked and owned
        // by the returned value, which unmaps it on drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(SetupError {
                what: "mmap of a ring",
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(map.cast::<u8>()).ok_or_else(|| SetupError {
            what: "mmap of a ring",
            source: io::Error::other("null mapping"),
        })?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping created in `new`, unmapped only here; no
        // reference into it outlives the owning PacketSocket.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A fresh AF_PACKET socket (protocol 0: it hears nothing until bound to a protocol) using
/// TPACKET_V2 and virtio-net headers.
fn packet_socket() -> Result<OwnedFd, SetupError> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    let raw = step("socket", cvt(raw))?;
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (s, one): (RawFd, libc::c_int) = (fd.as_raw_fd(), 1);
    step(
        "PACKET_VERSION",
        setsockopt(s, libc::SOL_PACKET, libc::PACKET_VERSION, &TPACKET_V2),
    )?;
    step(
        "PACKET_VNET_HDR",
        setsockopt(s, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one),
    )?;
    Ok(fd)
}

/// Binds AF_PACKET socket `fd` to interface `ifindex` and protocol `proto` (host order; 0
/// binds for sending only).
fn bind(fd: RawFd, ifindex: libc::c_int, proto: u16) -> Result<(), SetupError> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as libc::c_ushort;
    addr.sll_protocol = proto.to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: `addr` is a valid sockaddr_ll and the length matches it.
    let r = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    step("bind", cvt(r)).map(drop)
}

/// A classic BPF socket filter that passes frames whose destination MAC is `mac` or a group
/// address (the I/G bit: broadcast and multicast) and drops every other frame.
pub fn mac_filter_program(mac: [u8; 6]) -> [libc::sock_filter; 8] {
    use libc::{BPF_ABS, BPF_B, BPF_H, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let hi = u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]);
    let lo = u32::from(u16::from_be_bytes([mac[4], mac[5]]));
    // Jump offsets count from the next instruction.
    [
        op(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0),   // 0: A = dst[0..4]
        op(BPF_JMP | BPF_JEQ | BPF_K, hi, 0, 2), // 1: == mac[0..4]? 2 : 4
        op(BPF_LD | BPF_H | BPF_ABS, 4, 0, 0),   // 2: A = dst[4..6]
        op(BPF_JMP | BPF_JEQ | BPF_K, lo, 2, 0), // 3: == mac[4..6]? 6 : 4
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 0),   // 4: A = dst[0]
        op(BPF_JMP | BPF_JSET | BPF_K, 1, 0, 1), // 5: group bit? 6 : 7
        op(BPF_RET | BPF_K, u32::MAX, 0, 0),     // 6: pass, whole frame
        op(BPF_RET | BPF_K, 0, 0, 0),            // 7: drop
    ]
}

/// Receive buffer of the RX socket: what frames too large for a slot may occupy while they
/// wait for `recv_copied` (about 100 GSO frames of 64 KiB).
pub const RX_COPY_QUEUE: usize = 8 << 20;

/// A frame read by [`PacketSocket::recv_copied`].
#[derive(Clone, Copy, Debug)]
pub struct Copied {
    /// Bytes of virtio-net header and frame; more than the buffer when `truncated`.
    pub len: usize,
    /// The frame did not fit the buffer (only its start is there).
    pub truncated: bool,
    /// The kernel's metadata (VLAN tag moved out of the data).
    pub aux: Option<libc::tpacket_auxdata>,
}

/// One queue's pair of AF_PACKET sockets on one interface, each with its TPACKET_V2 ring
/// mapped: a receiving socket with the RX ring, and a send-only socket with the TX ring.
///
/// Two sockets rather than one with both rings: every frame the kernel frees from a TX ring
/// wakes the socket's waiters (`sock_def_write_space`), and the receiving socket always has
/// one, the worker's epoll. The send-only socket is watched by nobody, hears nothing (it is
/// bound to no protocol) and so costs the kernel no wake-up per frame.
pub struct PacketSocket {
    rx_map: Mapping,
    tx_map: Mapping,
    rx_fd: OwnedFd,
    tx_fd: OwnedFd,
    rx: RingGeometry,
    tx: RingGeometry,
    optional: Optional,
}

// SAFETY: the mappings are owned by this value and only touched through it; the kernel's
// concurrent access follows the ring protocol (per-slot status words), not thread affinity.
unsafe impl Send for PacketSocket {}

impl PacketSocket {
    /// Opens a queue's sockets on interface `ifindex`: TPACKET_V2, virtio-net headers, qdisc
    /// bypass, no copies of our own transmissions, the two rings, and promiscuous membership
    /// (released when the sockets close). Frames arrive from the moment this returns.
    /// With `only_mac`, the receiving socket passes only frames addressed to that MAC or to a
    /// group address (broadcast, multicast): the kernel drops the rest before the ring.
    pub fn open(
        ifindex: libc::c_int,
        rx: RingGeometry,
        tx: RingGeometry,
        only_mac: Option<[u8; 6]>,
    ) -> Result<Self, SetupError> {
        let sol = libc::SOL_PACKET;
        let one: libc::c_int = 1;

        let tx_fd = packet_socket()?;
        let t = tx_fd.as_raw_fd();
        let qdisc_bypass = setsockopt(t, sol, libc::PACKET_QDISC_BYPASS, &one).is_ok();
        // Room for a full TX ring in flight (on a NIC, slots stay busy until TX completion).
        let sndbuf = libc::c_int::try_from(tx.bytes()).unwrap_or(libc::c_int::MAX);
        if setsockopt(t, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &sndbuf).is_err() {
            let _ = setsockopt(t, libc::SOL_SOCKET, libc::SO_SNDBUF, &sndbuf);
        }
        step(
            "PACKET_TX_RING",
            tx.req()
                .and_then(|r| setsockopt(t, sol, libc::PACKET_TX_RING, &r)),
        )?;
        let tx_map = Mapping::new(t, tx.bytes())?;
        bind(t, ifindex, 0)?;

        let rx_fd = packet_socket()?;
        let r = rx_fd.as_raw_fd();
        let ignore_outgoing = setsockopt(r, sol, libc::PACKET_IGNORE_OUTGOING, &one).is_ok();
        // A frame larger than a slot goes into the slot truncated and marked TP_STATUS_COPY,
        // and whole onto the socket's receive queue, read with `recv_copied`. The queue is
        // bounded by the receive buffer: room for `RX_COPY_QUEUE` bytes of such frames.
        step(
            "PACKET_COPY_THRESH",
            setsockopt(r, sol, libc::PACKET_COPY_THRESH, &one),
        )?;
        step(
            "PACKET_AUXDATA",
            setsockopt(r, sol, libc::PACKET_AUXDATA, &one),
        )?;
        let rcvbuf = libc::c_int::try_from(RX_COPY_QUEUE).unwrap_or(libc::c_int::MAX);
        if setsockopt(r, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf).is_err() {
            let _ = setsockopt(r, libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf);
        }
        step(
            "PACKET_RX_RING",
            rx.req()
                .and_then(|req| setsockopt(r, sol, libc::PACKET_RX_RING, &req)),
        )?;
        let rx_map = Mapping::new(r, rx.bytes())?;
        if let Some(mac) = only_mac {
            // Before bind: an unbound socket hears nothing, so no frame skips the filter.
            let mut prog = mac_filter_program(mac);
            let fprog = libc::sock_fprog {
                len: prog.len() as libc::c_ushort,
                filter: prog.as_mut_ptr(),
            };
            step(
                "SO_ATTACH_FILTER (MAC filter)",
                setsockopt(r, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog),
            )?;
        }
        bind(r, ifindex, libc::ETH_P_ALL as u16)?;
        let mreq = libc::packet_mreq {
            mr_ifindex: ifindex,
            mr_type: libc::PACKET_MR_PROMISC as libc::c_ushort,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        step(
            "PACKET_ADD_MEMBERSHIP (promiscuous)",
            setsockopt(r, sol, libc::PACKET_ADD_MEMBERSHIP, &mreq),
        )?;
        Ok(PacketSocket {
            rx_map,
            tx_map,
            rx_fd,
            tx_fd,
            rx,
            tx,
            optional: Optional {
                qdisc_bypass,
                ignore_outgoing,
            },
        })
    }

    /// The receiving socket's fd.
    pub fn fd(&self) -> RawFd {
        self.rx_fd.as_raw_fd()
    }

    /// A second descriptor of the receiving socket, for watching its binding from another
    /// thread.
    pub fn probe(&self) -> io::Result<OwnedFd> {
        self.rx_fd.try_clone()
    }

    /// Which optional settings took effect.
    pub fn optional(&self) -> Optional {
        self.optional
    }

    /// Start of RX slot `idx` (modulo the ring size).
    pub fn rx_frame(&self, idx: usize) -> *mut u8 {
        let off = self.rx.offset(idx % self.rx.frame_nr());
        // SAFETY: `off` is inside the RX mapping, which is `rx.bytes()` long.
        unsafe { self.rx_map.ptr.as_ptr().add(off) }
    }

    /// Start of TX slot `idx` (modulo the ring size).
    pub fn tx_frame(&self, idx: usize) -> *mut u8 {
        let off = self.tx.offset(idx % self.tx.frame_nr());
        // SAFETY: `off` is inside the TX mapping, which is `tx.bytes()` long.
        unsafe { self.tx_map.ptr.as_ptr().add(off) }
    }

    /// Asks the kernel to transmit every slot marked `TP_STATUS_SEND_REQUEST`, without waiting.
    pub fn kick(&self) -> io::Result<()> {
        loop {
            // SAFETY: a zero-length send with a null buffer: the kernel reads no user memory
            // and takes the frames from the TX ring.
            let r = unsafe {
                libc::send(
                    self.tx_fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                )
            };
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Waits up to `timeout` for the socket to become writable (a TX slot freed) or to report
    /// an error.
    pub fn wait_writable(&self, timeout: Duration) {
        let mut p = libc::pollfd {
            fd: self.tx_fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, ms) };
    }

    /// Takes the next frame the kernel queued whole because it did not fit a slot (a slot
    /// marked `TP_STATUS_COPY` stands for it, in the same order): the virtio-net header and the
    /// frame into `buf`, without waiting.
    pub fn recv_copied(&self, buf: &mut [u8]) -> io::Result<Copied> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // Room for one cmsghdr + tpacket_auxdata, aligned for cmsghdr.
        let mut control = [0u64; 8];
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&control) as _;
        let n = loop {
            // SAFETY: `msg` points at one iovec over `buf` and at `control`, all live and
            // exclusively ours for the call; the kernel writes within their lengths.
            let r =
                unsafe { libc::recvmsg(self.fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut aux = None;
        // SAFETY: the kernel filled `msg_controllen` bytes of `control` with well-formed
        // cmsgs; CMSG_FIRSTHDR/CMSG_NXTHDR stay within them.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET
                    && (*c).cmsg_type == libc::PACKET_AUXDATA
                    && (*c).cmsg_len as usize
                        >= libc::CMSG_LEN(mem::size_of::<libc::tpacket_auxdata>() as u32) as usize
                {
                    aux = Some(std::ptr::read_unaligned(
                        libc::CMSG_DATA(c).cast::<libc::tpacket_auxdata>(),
                    ));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(Copied {
            len: n,
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0 || n > buf.len(),
            aux,
        })
    }

    /// Takes the pending socket error (SO_ERROR), e.g. ENETDOWN after the interface went down.
    pub fn take_error(&self) -> Option<io::Error> {
        match getsockopt::<libc::c_int>(self.fd(), libc::SOL_SOCKET, libc::SO_ERROR) {
            Ok(0) => None,
            Ok(e) => Some(io::Error::from_raw_os_error(e)),
            Err(e) => Some(e),
        }
    }

    /// Frames received and dropped by the kernel since the last call (the counters reset on
    /// read); drops are frames that found the RX ring full.
    pub fn take_stats(&self) -> io::Result<(u32, u32)> {
        #[derive(Default)]
        #[repr(C)]
        struct Stats {
            packets: libc::c_uint,
            drops: libc::c_uint,
        }
        let s: Stats = getsockopt(self.fd(), libc::SOL_PACKET, libc::PACKET_STATISTICS)?;
        Ok((s.packets, s.drops))
    }

    /// Creates a new hash fan-out group with a kernel-chosen id and joins it; returns the id.
    pub fn fanout_create(&self) -> io::Result<u16> {
        let arg = ((libc::PACKET_FANOUT_HASH | libc::PACKET_FANOUT_FLAG_UNIQUEID) << 16) as i32;
        setsockopt(self.fd(), libc::SOL_PACKET, libc::PACKET_FANOUT, &arg)?;
        let v: libc::c_int = getsockopt(self.fd(), libc::SOL_PACKET, libc::PACKET_FANOUT)?;
        Ok((v & 0xffff) as u16)
    }

    /// Joins the hash fan-out group `id` (same interface, same type).
    pub fn fanout_join(&self, id: u16) -> io::Result<()> {
        let arg = i32::from(id) | ((libc::PACKET_FANOUT_HASH << 16) as i32);
        setsockopt(self.fd(), libc::SOL_PACKET, libc::PACKET_FANOUT, &arg)
    }
}

/// The status word at the start of a ring slot, shared with the kernel.
///
/// # Safety
/// `frame` must point at the start of a slot of a live ring mapping.
pub unsafe fn status<'a>(frame: *mut u8) -> &'a AtomicU32 {
    // SAFETY: slots are 16-byte aligned inside a page-aligned mapping, so the u32 at offset 0
    // is aligned; the caller guarantees the mapping outlives the returned reference's use.
    unsafe { &*frame.cast::<AtomicU32>() }
}

/// The interface index an AF_PACKET socket is bound to: -1 once the interface was unregistered
/// (deleted or moved to another namespace) under it.
pub fn bound_ifindex(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `addr`, both live for the call.
    cvt(unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_ll).cast(), &mut len) })?;
    Ok(addr.sll_ifindex)
}

/// A netlink socket subscribed to link events (RTMGRP_LINK) of this network namespace.
pub struct LinkEvents(OwnedFd);

impl LinkEvents {
    /// Subscribes.
    pub fn open() -> io::Result<LinkEvents> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        })?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: `addr` is a valid sockaddr_nl and the length matches it.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        Ok(LinkEvents(fd))
    }

    /// The fd (readable when link events are queued).
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Discards every queued message. The caller re-reads the state it cares about, which
    /// also covers messages lost to a full socket buffer (ENOBUFS).
    pub fn drain(&self) {
        let mut buf = [0u8; 16384];
        loop {
            // SAFETY: receives at most `buf.len()` bytes into a live buffer; non-blocking.
            let r = unsafe {
                libc::recv(
                    self.fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::ENOBUFS) => continue,
                    _ => return,
                }
            }
        }
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (None: forever); returns which are.
pub fn wait_readable(fds: &[RawFd], timeout: Option<Duration>) -> Vec<bool> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `p` is a live array of `p.len()` pollfds for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if r <= 0 {
        return vec![false; fds.len()];
    }
    p.iter().map(|p| p.revents != 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_header_constants() {
        assert_eq!(mem::size_of::<libc::tpacket2_hdr>(), 32);
        assert_eq!(TPACKET2_HDRLEN, 52);
        assert_eq!(TX_DATA_OFFSET, 32);
        // TPACKET_ALIGN(52 + 16) + 10: the MAC header of a 14-byte Ethernet frame lands at 76.
        assert_eq!(RX_MAX_MAC_OFFSET, 90);
    }

    #[test]
    fn geometry_spreads_spare_space_and_addresses_slots() {
        let g = RingGeometry::new(65_000, 1 << 20, 3);
        assert_eq!(g.frames_per_block, 16);
        assert_eq!(g.frame_size, 65_536);
        assert_eq!(g.frame_nr(), 48);
        assert_eq!(g.bytes(), 3 << 20);
        assert_eq!(g.offset(0), 0);
        assert_eq!(g.offset(15), 15 * 65_536);
        assert_eq!(g.offset(16), 1 << 20);
        assert_eq!(g.offset(17), (1 << 20) + 65_536);

        let g = RingGeometry::new(65_643, 1 << 20, 17);
        assert_eq!(g.frames_per_block, 15);
        assert_eq!(g.frame_size % 16, 0);
        assert!(g.frame_size >= 65_643);
        assert!(g.frame_size * 15 <= 1 << 20);
        assert_eq!(g.frame_nr(), 255);
    }
}
