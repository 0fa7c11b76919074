//! 64 KiB TCP segmentation offload (TSO) frames through a backend without a VM, over raw
//! vhost-user frontends (`testkit::vhost_driver`) with memfd memory, no DPDK (whose PMDs carry
//! no GSO metadata):
//! - guest → guest (the `switch` scenario, [`measure`]) and guest → host ([`send_to_host`]):
//!   the sender acks `CSUM` + `HOST_TSO4` and keeps its TX ring full of one 64 KiB TCP/IPv4
//!   frame with a TSO header (`gso_size` 1448, partial checksum);
//! - host → guest ([`receive_from_host`]): a thread in the lab's namespace sends the same frame,
//!   virtio-net header first (`PACKET_VNET_HDR`), into the host interface through AF_PACKET,
//!   as a GSO packet the kernel keeps whole where the path allows it (and segments where not).
//!
//! The receiving guest acks `GUEST_CSUM` + `GUEST_TSO4` without mergeable buffers, so it posts
//! 66 KiB buffers, and waits for interrupts between batches. The figure is what it got, in
//! Gbit/s of Ethernet frame bytes: a backend that keeps the frame whole moves one descriptor
//! per 44 segments.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use testkit::vhost_driver::{Session, DESC_WRITE, VNET_HDR_LEN};

use crate::gen;

/// Virtio-net feature bits.
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_HOST_TSO4: u64 = 1 << 11;

/// Ring entries of both guests.
const RING: u16 = 256;
/// Guest memory of each session.
const MEM: usize = 32 << 20;
/// Where the frame buffers start (past the rings).
const BUFS: u64 = 1 << 20;
/// Receive buffer per chain: a whole GSO frame and its header.
const RX_BUF: u64 = 66 * 1024;
/// Ethernet frame length of the TSO frame (IPv4 total length 65000).
pub const FRAME_LEN: usize = 14 + 65_000;

/// The sender's frame: `virtio_net_hdr_v1` for TSO over IPv4, then Ethernet/IPv4/TCP from
/// `src` to `dst` with a valid IPv4 header checksum and the TCP pseudo-header sum in place.
fn tso_frame(src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = 1; // NEEDS_CSUM
    f[1] = 1; // GSO_TCPV4
    f[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    f[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    f[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    f[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let ip_len = (FRAME_LEN - 14) as u16;
    let (saddr, daddr) = ([10u8, 99, 0, 1], [10u8, 99, 0, 2]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&saddr);
    ip[16..20].copy_from_slice(&daddr);
    let sum = |b: &[u8]| -> u32 {
        b.chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum()
    };
    let fold = |mut s: u32| -> u16 {
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    };
    let c = !fold(sum(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    // Partial checksum: the pseudo-header sum, not complemented.
    let tcp_len = u32::from(ip_len) - 20;
    let pseudo = sum(&saddr) + sum(&daddr) + 6 + tcp_len;
    tcp[16..18].copy_from_slice(&fold(pseudo).to_be_bytes());
    f.extend_from_slice(&tcp);
    f.resize(VNET_HDR_LEN + FRAME_LEN, 0x5a);
    f
}

/// Keeps `tx`'s TX ring (index 1) full of its staged frame until `stop`: the sender thread.
fn spawn_sender(mut tx: Session, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || -> Result<()> {
        let Session { mem, rings, .. } = &mut tx;
        let ring = rings.iter_mut().find(|r| r.index == 1).context("tx ring")?;
        let mut next = 0u16;
        let mut in_flight = 0u16;
        let mut seen = ring.used_idx(mem);
        while !stop.load(Relaxed) {
            let used = ring.used_idx(mem);
            in_flight = in_flight.saturating_sub(used.wrapping_sub(seen));
            seen = used;
            if in_flight < RING {
                while in_flight < RING {
                    ring.publish(mem, next);
                    next = (next + 1) % RING;
                    in_flight += 1;
                }
                ring.kick();
            } else {
                std::thread::yield_now();
            }
        }
        Ok(())
    })
}

/// A sender session on `sock` with its TX ring's descriptors all pointing at one TSO frame
/// from `src` to `dst`.
fn tso_sender(sock: &Path, src: [u8; 6], dst: [u8; 6]) -> Result<Session> {
    let mut tx = Session::good_with(sock, &[0, 1], RING, F_CSUM | F_HOST_TSO4, MEM)
        .context("sender session")?;
    let frame = tso_frame(src, dst);
    tx.mem.write(BUFS, &frame);
    let Session { mem, rings, .. } = &mut tx;
    let ring = rings.iter_mut().find(|r| r.index == 1).context("tx ring")?;
    for i in 0..RING {
        ring.set_desc(mem, i, BUFS, frame.len() as u32, 0, 0);
    }
    Ok(tx)
}

/// Sends 64 KiB TSO frames from the guest at `sock` to the host side of its port for as long
/// as `during` runs (it measures what arrives, e.g. the host interface's counters).
pub fn send_to_host(sock: &Path, during: impl FnOnce() -> Result<()>) -> Result<()> {
    let tx = tso_sender(
        sock,
        [0x02, 0x70, 0x67, 0, 0, 1],
        [0x02, 0x70, 0x67, 0, 0, 2],
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = spawn_sender(tx, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let res = during();
    stop.store(true, Relaxed);
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    res
}

/// What one measurement found.
pub struct GsoFigures {
    /// Frames the receiver got.
    pub frames: u64,
    /// Ethernet bytes the receiver got.
    pub bytes: u64,
    /// Wall time.
    pub secs: f64,
}

/// A receiver session on `sock`: `RING` chains of one 66 KiB device-writable buffer each.
fn tso_receiver(sock: &Path) -> Result<Session> {
    let mut rx = Session::good_with(sock, &[0, 1], RING, F_GUEST_CSUM | F_GUEST_TSO4, MEM)
        .context("receiver session")?;
    let Session { mem, rings, .. } = &mut rx;
    let ring = rings.iter_mut().find(|r| r.index == 0).context("rx ring")?;
    for i in 0..RING {
        ring.set_desc(
            mem,
            i,
            BUFS + RX_BUF * u64::from(i),
            RX_BUF as u32,
            DESC_WRITE,
            0,
        );
        ring.publish(mem, i);
    }
    ring.kick();
    Ok(rx)
}

/// Frames and bytes a receiver thread counted so far.
#[derive(Clone, Default)]
struct Counts {
    frames: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Counts {
    fn now(&self) -> (u64, u64) {
        (self.frames.load(Relaxed), self.bytes.load(Relaxed))
    }
}

/// Takes what arrives on `rx`'s RX ring and posts the buffers again, until `stop`.
fn spawn_receiver(
    mut rx: Session,
    stop: Arc<AtomicBool>,
    counts: Counts,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || -> Result<()> {
        let Session { mem, rings, .. } = &mut rx;
        let ring = rings.iter_mut().find(|r| r.index == 0).context("rx ring")?;
        let mut seen = ring.used_idx(mem);
        while !stop.load(Relaxed) {
            let mut pfd = libc::pollfd {
                fd: ring.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the call.
            unsafe { libc::poll(&mut pfd, 1, 50) };
            let _ = ring.call.read();
            let used = ring.used_idx(mem);
            while seen != used {
                let (id, len) = ring.used_elem(mem, seen);
                counts.frames.fetch_add(1, Relaxed);
                counts
                    .bytes
                    .fetch_add(u64::from(len).saturating_sub(VNET_HDR_LEN as u64), Relaxed);
                ring.publish(mem, id as u16);
                seen = seen.wrapping_add(1);
            }
            ring.kick();
        }
        Ok(())
    })
}

/// Waits 500 ms for the stream to settle, runs `during(d)` and returns what `counts` grew by.
fn window(
    counts: &Counts,
    d: Duration,
    during: impl FnOnce(Duration) -> Result<()>,
) -> Result<GsoFigures> {
    std::thread::sleep(Duration::from_millis(500));
    let ((f0, b0), t0) = (counts.now(), Instant::now());
    during(d)?;
    let ((f1, b1), secs) = (counts.now(), t0.elapsed().as_secs_f64());
    Ok(GsoFigures {
        frames: f1 - f0,
        bytes: b1 - b0,
        secs,
    })
}

fn join(t: std::thread::JoinHandle<Result<()>>, what: &str) -> Result<()> {
    t.join().map_err(|_| anyhow::anyhow!("{what} panicked"))?
}

/// Sends 64 KiB TSO frames from the guest at `tx_sock` (MAC `src`) to the guest at `rx_sock`
/// (MAC `dst`) for `d`; `during` runs once the stream is flowing (to read CPU counters).
pub fn measure(
    tx_sock: &Path,
    rx_sock: &Path,
    src: [u8; 6],
    dst: [u8; 6],
    d: Duration,
    during: impl FnOnce(Duration) -> Result<()>,
) -> Result<GsoFigures> {
    let mut rx = tso_receiver(rx_sock)?;
    let tx = tso_sender(tx_sock, src, dst)?;
    // One frame from the receiver first, so a learning switch knows where it is.
    let hello = testkit::vhost_driver::tx_frame(dst, 60, 0);
    rx.send_frame(1, &hello).context("receiver's hello")?;

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Counts::default();
    let receiver = spawn_receiver(rx, stop.clone(), counts.clone());
    let sender = spawn_sender(tx, stop.clone());
    let res = window(&counts, d, during);
    stop.store(true, Relaxed);
    join(sender, "sender")?;
    join(receiver, "receiver")?;
    res
}

/// Where the host → guest injector sends from.
pub struct HostSide {
    /// `/run/netns/NAME` of the lab's namespace.
    pub netns: PathBuf,
    /// The interface to send into: the tap itself, or the far end of the veth.
    pub ifname: String,
    /// CPU to pin the injector to.
    pub cpu: Option<usize>,
}

/// Sends 64 KiB TSO frames from the host side into the guest at `sock` for `d`; `during` runs
/// once the stream is flowing.
pub fn receive_from_host(
    sock: &Path,
    host: &HostSide,
    d: Duration,
    during: impl FnOnce(Duration) -> Result<()>,
) -> Result<GsoFigures> {
    let rx = tso_receiver(sock)?;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Counts::default();
    let receiver = spawn_receiver(rx, stop.clone(), counts.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let injector = {
        let (stop, netns, ifname, cpu) = (
            stop.clone(),
            host.netns.clone(),
            host.ifname.clone(),
            host.cpu,
        );
        std::thread::spawn(move || -> Result<()> {
            let sock = match open_injector(&netns, &ifname, cpu) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    let _ = ready_tx.send(Err(e));
                    anyhow::bail!(msg);
                }
            };
            // The same frame behind the 10-byte `struct virtio_net_hdr` AF_PACKET takes.
            let full = tso_frame(gen::SRC_MAC, gen::DST_MAC);
            let frame = [&full[..10], &full[VNET_HDR_LEN..]].concat();
            while !stop.load(Relaxed) {
                // SAFETY: `frame` is a live buffer of the length given.
                let rc =
                    unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                if rc < 0 {
                    // A full device queue: back off briefly.
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
            Ok(())
        })
    };
    let res = match ready_rx.recv() {
        Ok(Ok(())) => window(&counts, d, during),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!("injector thread died")),
    };
    stop.store(true, Relaxed);
    join(injector, "injector")?;
    join(receiver, "receiver")?;
    res
}

/// The injector's socket: AF_PACKET on `ifname` in `netns`, virtio-net headers on; the calling
/// thread stays in `netns`, pinned to `cpu`. Through the qdisc, not past it: on an interface
/// with TSO off, only the qdisc path segments a GSO packet, past it the kernel drops it.
fn open_injector(netns: &Path, ifname: &str, cpu: Option<usize>) -> Result<std::os::fd::OwnedFd> {
    crate::sys::enter_netns(netns)?;
    if let Some(cpu) = cpu {
        crate::sys::pin_current_thread(cpu);
    }
    let fd = testkit::netns::PacketSocket::sender(ifname)
        .with_context(|| format!("AF_PACKET socket on {ifname}"))?
        .into_fd();
    crate::sys::setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR, &1)
        .context("PACKET_VNET_HDR")?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tso_frame_is_well_formed() {
        let f = tso_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        assert_eq!(f.len(), VNET_HDR_LEN + FRAME_LEN);
        let ip = &f[VNET_HDR_LEN + 14..VNET_HDR_LEN + 34];
        // A valid IPv4 header sums to 0xffff.
        let s: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        assert_eq!((s & 0xffff) + (s >> 16), 0xffff);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, FRAME_LEN - 14);
    }
}
