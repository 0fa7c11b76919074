//! Kernel floors: the most frames per second any userspace backend could push into a host
//! port on this machine. A plain loop writes the same frame over and over, from one thread
//! pinned to the backend's core, with no virtqueue at all; the host port's peer counts what
//! the kernel took. The `vmless` scenario reports each as a backend of its own next to the
//! real backends, so every guest → host figure can be read as a fraction of its floor:
//! - `kernel-floor-tap`: `writev` of a zeroed 12-byte virtio-net header and the frame into a
//!   tap, one system call per frame (what a backend writing frame by frame does);
//! - `kernel-floor-tap-uring`: the same `writev`s submitted [`URING_BATCH`] at a time through
//!   io_uring, one system call per batch: the only batched way into a tap the kernel offers,
//!   measured to see whether a backend could go past the `writev` floor;
//! - `kernel-floor-afpacket`: an AF_PACKET socket's TX ring (`PACKET_TX_RING`, TPACKET_V2,
//!   10-byte virtio-net header whose `hdr_len` covers the frame, qdisc bypass, as vhost-pump's
//!   AF_PACKET port sets it up),
//!   [`RING_BATCH`] slots marked per non-blocking `send`, on one end of a veth.
//!
//! The writer runs as `vhost-pump-perf floor-writer` inside the lab's namespace (the port lives
//! there), started and stopped by the scenario.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Length of the virtio-net header a tap takes before each frame (`virtio_net_hdr_v1`).
const TAP_HDR: usize = 12;
/// Length of the virtio-net header an AF_PACKET socket takes (`struct virtio_net_hdr`).
const PACKET_HDR: usize = 10;
/// `writev`s per io_uring submission.
pub const URING_BATCH: usize = 32;
/// TX ring slots handed to the kernel per `send`.
pub const RING_BATCH: usize = 32;
/// TX ring: slots of 2 KiB (any MTU-1500 frame), 32 per 64 KiB block, 8 blocks.
const RING_SLOT: usize = 2048;
const RING_BLOCK: usize = 64 << 10;
const RING_BLOCKS: usize = 8;
/// `TPACKET_V2` of `enum tpacket_versions`.
const TPACKET_V2: libc::c_int = 1;
/// Offset of a TX slot's data: the aligned `tpacket2_hdr` (see the daemon's AF_PACKET port).
const RING_DATA: usize = 32;

/// How the floor writer reaches the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// One `writev` per frame into a tap.
    Writev,
    /// `writev`s into a tap, batched through io_uring.
    Uring,
    /// An AF_PACKET TX ring on an interface.
    TxRing,
}

/// The frame written: the lab generator's UDP/IPv4 frame of `len` (at least 60) bytes, to a
/// unicast address that is not the receiving interface's, as testpmd's `txonly` sends: the
/// kernel drops it where it drops the backends' frames, so the floors cost what theirs do.
fn frame(len: usize) -> Vec<u8> {
    crate::gen::build_frame(len, 1024)
}

/// Writes `frame_len`-byte frames into `port` by `method` for `secs` seconds; prints how many
/// the kernel accepted.
pub fn write_loop(method: Method, port: &str, frame_len: usize, secs: f64) -> Result<()> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let frame = frame(frame_len);
    let written = match method {
        Method::Writev => writev_loop(&open_tap(port)?, &frame, end),
        Method::Uring => uring_loop(&open_tap(port)?, &frame, end)?,
        Method::TxRing => tx_ring_loop(port, &frame, end)?,
    };
    println!("{written}");
    Ok(())
}

/// Attaches to tap `name` (created with `vnet_hdr` by the caller) with a 12-byte header.
fn open_tap(name: &str) -> Result<File> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {name:?} too long");
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own, on our tun fd.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    let hdr_len = TAP_HDR as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads the int we pass, on our tun fd.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETVNETHDRSZ");
    }
    Ok(tun)
}

/// The header and frame as the two iovecs of one `writev`.
fn tap_iov(hdr: &[u8; TAP_HDR], frame: &[u8]) -> [libc::iovec; 2] {
    [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        },
    ]
}

fn writev_loop(tun: &File, frame: &[u8], end: Instant) -> u64 {
    let hdr = [0u8; TAP_HDR];
    let iov = tap_iov(&hdr, frame);
    let mut written = 0u64;
    while Instant::now() < end {
        for _ in 0..256 {
            // SAFETY: both iovecs point at our live buffers.
            if unsafe { libc::writev(tun.as_raw_fd(), iov.as_ptr(), 2) } > 0 {
                written += 1;
            }
        }
    }
    written
}

fn uring_loop(tun: &File, frame: &[u8], end: Instant) -> Result<u64> {
    let hdr = [0u8; TAP_HDR];
    let iov = tap_iov(&hdr, frame);
    let mut ring = io_uring::IoUring::new(URING_BATCH as u32 * 2).context("io_uring_setup")?;
    let sqe = io_uring::opcode::Writev::new(io_uring::types::Fd(tun.as_raw_fd()), iov.as_ptr(), 2)
        .build();
    let mut written = 0u64;
    while Instant::now() < end {
        for _ in 0..8 {
            for _ in 0..URING_BATCH {
                // SAFETY: the entry points at `iov` and the buffers behind it, which live until
                // every submitted entry has completed (we wait for all of them below).
                unsafe { ring.submission().push(&sqe) }.context("submission queue full")?;
            }
            ring.submit_and_wait(URING_BATCH)
                .context("io_uring_enter")?;
            written += ring.completion().filter(|c| c.result() > 0).count() as u64;
        }
    }
    Ok(written)
}

fn tx_ring_loop(ifname: &str, frame: &[u8], end: Instant) -> Result<u64> {
    let name = CString::new(ifname)?;
    // SAFETY: `name` is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error()).context(format!("interface {ifname}"));
    }
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = sock.as_raw_fd();
    let set = |opt: libc::c_int, val: &libc::c_int, what: &str| -> Result<()> {
        crate::sys::setsockopt(fd, libc::SOL_PACKET, opt, val).context(what.to_string())
    };
    set(libc::PACKET_VERSION, &TPACKET_V2, "PACKET_VERSION")?;
    set(libc::PACKET_VNET_HDR, &1, "PACKET_VNET_HDR")?;
    set(libc::PACKET_QDISC_BYPASS, &1, "PACKET_QDISC_BYPASS")?;
    let req = libc::tpacket_req {
        tp_block_size: RING_BLOCK as u32,
        tp_block_nr: RING_BLOCKS as u32,
        tp_frame_size: RING_SLOT as u32,
        tp_frame_nr: (RING_BLOCKS * RING_BLOCK / RING_SLOT) as u32,
    };
    crate::sys::setsockopt(fd, libc::SOL_PACKET, libc::PACKET_TX_RING, &req)
        .context("PACKET_TX_RING")?;
    let bytes = RING_BLOCKS * RING_BLOCK;
    // SAFETY: maps the ring the kernel just allocated for this socket; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).context("mmap of the TX ring");
    }
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind reads the sockaddr_ll we own.
    if unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error()).context("bind");
    }
    let slots = bytes / RING_SLOT;
    let slot = |i: usize| -> *mut u8 {
        // SAFETY: i % slots < slots: inside the mapping of `bytes` bytes.
        unsafe { map.cast::<u8>().add((i % slots) * RING_SLOT) }
    };
    let len = PACKET_HDR + frame.len();
    if RING_DATA + len > RING_SLOT {
        bail!(
            "frame of {} bytes does not fit a {RING_SLOT}-byte slot",
            frame.len()
        );
    }
    // The data never changes: write it once into every slot.
    for i in 0..slots {
        // SAFETY: the slot holds RING_SLOT bytes and the kernel does not touch it while its
        // status says it is ours (zero, as the kernel made it).
        unsafe {
            let data = slot(i).add(RING_DATA);
            std::ptr::write_bytes(data, 0, PACKET_HDR);
            // `hdr_len` = the whole frame: the kernel copies it into the skb head instead of
            // pointing page fragments into the ring, which a veth would copy again into fresh
            // pages (the daemon's AF_PACKET port does the same for frames up to 2 KiB).
            let hdr_len = u16::try_from(frame.len())?.to_le_bytes();
            std::ptr::copy_nonoverlapping(hdr_len.as_ptr(), data.add(2), 2);
            std::ptr::copy_nonoverlapping(frame.as_ptr(), data.add(PACKET_HDR), frame.len());
            let h = slot(i).cast::<libc::tpacket2_hdr>();
            std::ptr::addr_of_mut!((*h).tp_len).write(len as u32);
        }
    }
    let status = |i: usize| -> &std::sync::atomic::AtomicU32 {
        // SAFETY: tp_status is the first, 4-byte aligned field of the slot's header, shared
        // with the kernel, which only accesses it atomically.
        unsafe { &*slot(i).cast::<std::sync::atomic::AtomicU32>() }
    };
    let mut head = 0usize;
    let mut written = 0u64;
    let result = (|| -> Result<u64> {
        while Instant::now() < end {
            for _ in 0..64 {
                let mut marked = 0;
                while marked < RING_BATCH
                    && status(head).load(std::sync::atomic::Ordering::Acquire)
                        == libc::TP_STATUS_AVAILABLE
                {
                    status(head).store(
                        libc::TP_STATUS_SEND_REQUEST,
                        std::sync::atomic::Ordering::Release,
                    );
                    head += 1;
                    marked += 1;
                }
                // Not waiting for the kernel to be done with the slots (as the daemon's port):
                // a slot is reused once its status says it is free again.
                // SAFETY: a zero-length send with a null buffer: the kernel reads no user memory
                // besides the ring.
                let n = unsafe { libc::send(fd, std::ptr::null(), 0, libc::MSG_DONTWAIT) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) {
                        return Err(e).context("send");
                    }
                } else {
                    written += (n as usize / len) as u64;
                }
            }
        }
        Ok(written)
    })();
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(map, bytes) };
    result
}
