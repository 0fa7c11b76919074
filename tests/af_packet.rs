//! The AF_PACKET host port (`--af-packet IFNAME`).
//!
//! VM-less tests drive the port's queues directly (the `HostQueue` calls the device's workers
//! make) inside a private network namespace with a veth pair, and check frames, offload
//! metadata, drops, fan-out and link changes against the kernel on the other end. QEMU tests
//! boot the test guest on the daemon: a veth whose peer sits in another namespace with an IP
//! (ping, iperf3 both ways with TSO, GSO-sized frames on the veth), a macvlan with the guest's
//! MAC, two queue pairs with fan-out, and the interface going down, up, away and back. One
//! daemon test without a guest follows the link state and counters through `ctl stats` and the
//! metrics endpoint.
//!
//! Need root (and QEMU for the guest tests): skipped with a reason otherwise, failed under
//! `CI=true`. The guest tests take a lock so only one TCG guest runs at a time.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::guest::{self, ethtool_stat as stat, iperf_mbps, GuestOpts, QemuGuest};
use testkit::netns::{self, in_new_netns, ip, target_workdir as workdir, PacketSocket as Peer};
use vhost_net_backend::{GuestOffloads, HostPort, HostQueue, MacAddr};
use vhost_pump::af_packet::AfPacketPort;

// ---------------------------------------------------------------------------------------------
// Frames and helpers for the VM-less tests
// ---------------------------------------------------------------------------------------------

const A: &str = "vpa0";
const B: &str = "vpb0";
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0xbb, 1];
const HDR: usize = 12;
/// Slots of the port's RX ring (`RX_RING` in src/af_packet/mod.rs).
const RX_SLOTS: u64 = 8192;

const ALL: GuestOffloads = GuestOffloads::TCP;

/// A veth pair A <-> B in the current (private) namespace, both up.
fn veth_pair() {
    ip(&["link", "add", A, "type", "veth", "peer", "name", B]);
    ip(&["link", "set", A, "up"]);
    ip(&["link", "set", B, "up"]);
}

fn vnet(
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum: Option<(u16, u16)>,
    hdr_len: u16,
) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    let (s, o) = csum.unwrap_or((0, 0));
    h[6..8].copy_from_slice(&s.to_le_bytes());
    h[8..10].copy_from_slice(&o.to_le_bytes());
    h
}

fn sum16(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|c| (u64::from(c[0]) << 8) | u64::from(*c.get(1).unwrap_or(&0)))
        .sum()
}

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// An Ethernet/IPv4/TCP frame of `len` bytes from B to A with a valid IP checksum. The TCP
/// checksum field holds the pseudo-header sum (a CHECKSUM_PARTIAL frame) when `partial`,
/// else the full, valid checksum.
fn tcp_frame(len: usize, seed: u8, partial: bool) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&MAC_A);
    f[6..12].copy_from_slice(&MAC_B);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[10, 9, 0, 2]);
    f[30..34].copy_from_slice(&[10, 9, 0, 1]);
    let c = !fold(sum16(&f[14..34]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&5201u16.to_be_bytes());
    f[38..42].copy_from_slice(&7u32.to_be_bytes());
    f[46] = 0x50;
    f[47] = 0x10;
    f[48..50].copy_from_slice(&0xffffu16.to_be_bytes());
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    let tcp_len = (len - 34) as u64;
    let pseudo = sum16(&f[26..34]) + 6 + tcp_len;
    let field = if partial {
        fold(pseudo)
    } else {
        !fold(pseudo + sum16(&f[34..]))
    };
    f[50..52].copy_from_slice(&field.to_be_bytes());
    f
}

fn tcp_checksum_ok(f: &[u8]) -> bool {
    let tcp_len = (f.len() - 34) as u64;
    fold(sum16(&f[26..34]) + 6 + tcp_len + sum16(&f[34..])) == 0xffff
}

/// A raw AF_PACKET socket with `PACKET_VNET_HDR` on the peer: injects frames with GSO and
/// checksum metadata, as a local TCP stack would hand them to the veth.
struct VnetSender(OwnedFd);

impl VnetSender {
    fn open(ifname: &str) -> VnetSender {
        let ifindex = netns::if_index(ifname).unwrap();
        // SAFETY: socket(2) with constant arguments; checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: PACKET_VNET_HDR reads one int from a live reference.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(r, 0, "PACKET_VNET_HDR: {}", io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain old data; zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex;
        // SAFETY: a valid sockaddr_ll of the stated length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
        VnetSender(fd)
    }

    fn send(&self, hdr: [u8; 10], frame: &[u8]) {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut _,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut _,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at live buffers of their lengths.
        let n = unsafe { libc::writev(self.0.as_raw_fd(), iov.as_ptr(), 2) };
        assert_eq!(
            n as usize,
            10 + frame.len(),
            "send: {}",
            io::Error::last_os_error()
        );
    }
}

fn wait_fd(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) > 0 }
}

/// Receives one frame (header first) into `buf` the way a worker does: `recv` until a frame or
/// `WouldBlock`, then sleep on the queue's fd. Errors other than `WouldBlock` are returned.
fn recv_into(q: &mut dyn HostQueue, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points at `buf`, live and exclusive while it is in use.
    unsafe { recv_iov(q, &iov, timeout) }
}

/// [`recv_into`] with iovecs.
///
/// # Safety
/// The iovecs must be valid for writes for their lengths during the call.
unsafe fn recv_iov(
    q: &mut dyn HostQueue,
    iov: &[libc::iovec],
    timeout: Duration,
) -> io::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: the caller vouches for the iovecs.
        match unsafe { q.recv(iov) } {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        wait_fd(q.rx_fd(), left.min(Duration::from_millis(50)));
    }
}

/// Sends header + frame through the queue, split over a few iovecs like a guest chain, and
/// flushes: a frame dropped after `send` took it is reported like a refused send.
fn send(q: &mut dyn HostQueue, hdr: &[u8], frame: &[u8]) -> io::Result<usize> {
    let r = send_queued(q, hdr, frame);
    let late = q.flush();
    if late.rejected > 0 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    if late.failed > 0 {
        return Err(io::Error::other("dropped after send"));
    }
    r
}

/// Sends header + frame through the queue without flushing (one frame of a burst).
fn send_queued(q: &mut dyn HostQueue, hdr: &[u8], frame: &[u8]) -> io::Result<usize> {
    let cut = frame.len().min(20);
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut _,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: frame.as_ptr() as *mut _,
            iov_len: cut,
        },
        libc::iovec {
            iov_base: frame[cut..].as_ptr() as *mut _,
            iov_len: frame.len() - cut,
        },
    ];
    // SAFETY: the iovecs point at live buffers of their lengths.
    unsafe { q.send(&iov) }
}

/// The next frame the peer receives (not one it sent itself).
fn peer_recv(peer: &Peer, timeout: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.recv(&mut buf, left).unwrap() {
            Some((n, t)) if t != netns::PACKET_OUTGOING => return Some(buf[..n].to_vec()),
            Some(_) => continue,
            None => return None,
        }
    }
}

fn open_port(queues: usize, offloads: GuestOffloads) -> (AfPacketPort, Vec<Box<dyn HostQueue>>) {
    let port = AfPacketPort::open(A, queues, None).expect("open the AF_PACKET port");
    port.configure(HDR, offloads).unwrap();
    let qs = (0..queues).map(|i| port.take_queue(i).unwrap()).collect();
    (port, qs)
}

fn skip_vmless(test: &str) -> bool {
    if let Some(why) = netns::missing_prereqs() {
        guest::skip_or_fail(test, &why);
        return true;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// VM-less tests
// ---------------------------------------------------------------------------------------------

#[test]
fn vmless_frames_cross_both_ways_byte_exact() {
    if skip_vmless("vmless_frames_cross_both_ways_byte_exact") {
        return;
    }
    in_new_netns(|| {
        veth_pair();
        let (port, mut qs) = open_port(1, ALL);
        assert_eq!(port.mtu(), 1500);
        let q = qs[0].as_mut();
        let peer = Peer::sniffer(B).unwrap();

        // Guest -> host: the 12-byte guest header is cut to the kernel's 10 bytes.
        let f = netns::udp_frame(MAC_B, MAC_A, ([10, 9, 0, 2], [10, 9, 0, 1]), (1, 2), 300);
        assert_eq!(send(q, &[0u8; HDR], &f).unwrap(), HDR + f.len());
        assert_eq!(
            peer_recv(&peer, Duration::from_secs(2)).as_deref(),
            Some(&f[..])
        );

        // Our own transmission is not received back.
        let mut buf = vec![0u8; 70_000];
        let r = recv_into(q, &mut buf, Duration::from_millis(200));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);

        // Host -> guest: 10 kernel bytes + 2 zero bytes (num_buffers), then the frame.
        let g = netns::udp_frame(MAC_A, MAC_B, ([10, 9, 0, 1], [10, 9, 0, 2]), (3, 4), 1514);
        peer.send(&g).unwrap();
        let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
        assert_eq!(n, HDR + g.len());
        assert_eq!(&buf[10..12], &[0, 0]);
        assert_eq!(buf[1], 0, "no GSO on a plain frame");
        assert_eq!(&buf[HDR..n], &g[..]);

        // A VLAN tag the kernel moved into metadata is put back in place.
        let mut tagged = MAC_A.to_vec();
        tagged.extend_from_slice(&MAC_B);
        tagged.extend_from_slice(&[0x81, 0x00, 0x20, 0x64, 0x88, 0xb5]);
        tagged.extend((0..100u8).map(|i| i ^ 0x5a));
        peer.send(&tagged).unwrap();
        let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
        assert_eq!(
            &buf[HDR..n],
            &tagged[..],
            "VLAN frame not restored byte for byte"
        );

        // The legacy 10-byte header (no VERSION_1, no MRG_RXBUF).
        port.configure(10, ALL).unwrap();
        peer.send(&g).unwrap();
        let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
        assert_eq!(n, 10 + g.len());
        assert_eq!(&buf[10..n], &g[..]);
        assert_eq!(send(q, &[0u8; 10], &f).unwrap(), 10 + f.len());
        assert_eq!(
            peer_recv(&peer, Duration::from_secs(2)).as_deref(),
            Some(&f[..])
        );
        assert!(port.configure(14, ALL).is_err());
    });
}

#[test]
fn vmless_gso_and_checksum_metadata_pass_through() {
    if skip_vmless("vmless_gso_and_checksum_metadata_pass_through") {
        return;
    }
    in_new_netns(|| {
        veth_pair();
        let (port, mut qs) = open_port(1, ALL);
        let q = qs[0].as_mut();
        let peer = Peer::sniffer(B).unwrap();
        let mut buf = vec![0u8; 70_000];

        // Guest -> host: a 60 KB TSO frame leaves as one GSO skb.
        let big = tcp_frame(60_000, 1, true);
        let mut h = vnet(1, 1, 1448, Some((34, 16)), 54).to_vec();
        h.extend_from_slice(&[0, 0]);
        let before = netns::if_stats(B).unwrap();
        assert_eq!(send(q, &h, &big).unwrap(), HDR + big.len());
        let got = peer_recv(&peer, Duration::from_secs(2)).expect("GSO frame not received");
        assert_eq!(got.len(), big.len(), "the GSO frame was segmented or cut");
        assert_eq!(&got[54..], &big[54..]);
        let d = netns::settled_if_stats(B, Duration::from_millis(100), Duration::from_secs(2))
            .unwrap()
            .since(&before);
        assert_eq!((d.rx_packets, d.rx_bytes), (1, big.len() as u64));

        // Host -> guest: a GSO frame from the host reaches the guest whole, metadata intact.
        let tx = VnetSender::open(B);
        tx.send(vnet(1, 1, 1448, Some((34, 16)), 54), &big);
        let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
        assert_eq!(n, HDR + big.len());
        assert_eq!(buf[1], 1, "gso_type TCPV4");
        assert_eq!(u16::from_le_bytes([buf[4], buf[5]]), 1448, "gso_size");
        assert_eq!(buf[0] & 1, 1, "NEEDS_CSUM");
        assert_eq!(u16::from_le_bytes([buf[6], buf[7]]), 34, "csum_start");
        assert_eq!(u16::from_le_bytes([buf[8], buf[9]]), 16, "csum_offset");
        assert_eq!(&buf[HDR + 54..n], &big[54..]);
        // It does not fit an RX slot: the slot stood for it, the socket's queue carried it.
        assert_eq!(port.counters().rx_copied.load(Relaxed), 1);

        // The same through the queue with a VLAN tag: the kernel's metadata for it (auxdata)
        // puts the tag back, and the GSO header follows it.
        let mut big_tagged = big[..12].to_vec();
        big_tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x09]);
        big_tagged.extend_from_slice(&big[12..]);
        tx.send(vnet(1, 1, 1448, Some((38, 16)), 58), &big_tagged);
        let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
        assert_eq!(n, HDR + big_tagged.len());
        assert_eq!(&buf[HDR..HDR + 16], &big_tagged[..16], "tag not restored");
        assert_eq!(&buf[HDR + 58..n], &big_tagged[58..]);
        assert_eq!(u16::from_le_bytes([buf[6], buf[7]]), 38, "csum_start");
        assert_eq!(port.counters().rx_copied.load(Relaxed), 2);

        // Small frames around big ones keep their order (slots and queue are in step).
        let mut order = Vec::new();
        for i in 0..6u8 {
            let f = if i % 2 == 0 {
                tcp_frame(100 + usize::from(i), 3, false)
            } else {
                big.clone()
            };
            let h = if i % 2 == 0 {
                vnet(0, 0, 0, None, 0)
            } else {
                vnet(1, 1, 1448, Some((34, 16)), 54)
            };
            tx.send(h, &f);
            order.push(f.len());
        }
        for (i, want) in order.iter().enumerate() {
            let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
            assert_eq!(n - HDR, *want, "frame {i} out of order");
        }
        assert_eq!(port.counters().rx_copied.load(Relaxed), 5);

        // A guest without TSO cannot take it: dropped, counted, never cut; traffic goes on.
        let csum_only = GuestOffloads {
            csum: true,
            ..Default::default()
        };
        port.configure(HDR, csum_only).unwrap();
        tx.send(vnet(1, 1, 1448, Some((34, 16)), 54), &big);
        let r = recv_into(q, &mut buf, Duration::from_secs(2));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(port.counters().rx_gso_refused.load(Relaxed), 1);

        // A partial checksum is passed on to a guest with GUEST_CSUM ...
        let small = tcp_frame(200, 2, true);
        tx.send(vnet(1, 0, 0, Some((34, 16)), 0), &small);
        let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
        assert_eq!(buf[0] & 1, 1);
        assert_eq!(&buf[HDR..n], &small[..]);
        // ... and completed for a guest without it.
        port.configure(HDR, GuestOffloads::default()).unwrap();
        tx.send(vnet(1, 0, 0, Some((34, 16)), 0), &small);
        let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
        assert_eq!(
            buf[0], 0,
            "flags must be clear for a guest without GUEST_CSUM"
        );
        assert!(tcp_checksum_ok(&buf[HDR..n]), "checksum not completed");
        assert_eq!(&buf[HDR + 54..n], &small[54..]);
        assert_eq!(port.counters().rx_csum_completed.load(Relaxed), 1);

        // A tagged frame with a partial checksum: the tag goes back in and the checksum offsets
        // follow it (the guest sees the frame as it was on the wire).
        let mut tagged = small[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        tagged.extend_from_slice(&small[12..]);
        port.configure(HDR, csum_only).unwrap();
        tx.send(vnet(1, 0, 0, Some((38, 16)), 0), &tagged);
        let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
        assert_eq!(&buf[HDR..n], &tagged[..], "tagged frame not restored");
        assert_eq!(
            u16::from_le_bytes([buf[6], buf[7]]),
            38,
            "csum_start of a tagged frame"
        );
        port.configure(HDR, GuestOffloads::default()).unwrap();
        tx.send(vnet(1, 0, 0, Some((38, 16)), 0), &tagged);
        let n = recv_into(q, &mut buf, Duration::from_secs(2)).unwrap();
        let mut untagged = buf[HDR..HDR + 12].to_vec();
        untagged.extend_from_slice(&buf[HDR + 16..n]);
        assert!(
            tcp_checksum_ok(&untagged),
            "checksum of a tagged frame not completed"
        );

        // Guest frames the device never offered are refused before the kernel.
        let ufo = vnet(1, 3, 1448, Some((34, 6)), 0);
        let mut h = ufo.to_vec();
        h.extend_from_slice(&[0, 0]);
        let r = send(q, &h, &small);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let bad_csum = vnet(1, 0, 0, Some((190, 16)), 0);
        let mut h = bad_csum.to_vec();
        h.extend_from_slice(&[0, 0]);
        let r = send(q, &h, &small);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(port.counters().tx_refused.load(Relaxed), 2);

        // A header only the kernel refuses (the checksum starts inside the Ethernet header):
        // reported, not lost silently, and the ring keeps going.
        let odd = vnet(1, 1, 1448, Some((10, 16)), 54);
        let mut h = odd.to_vec();
        h.extend_from_slice(&[0, 0]);
        let r = send(q, &h, &big);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(port.counters().tx_refused.load(Relaxed), 3);

        // The same frame in the middle of a burst: counted, and the frames on both sides of it
        // leave in order.
        let f1 = netns::udp_frame(MAC_B, MAC_A, ([10, 9, 0, 2], [10, 9, 0, 1]), (7, 9), 64);
        let f2 = netns::udp_frame(MAC_B, MAC_A, ([10, 9, 0, 2], [10, 9, 0, 1]), (8, 9), 64);
        send_queued(q, &[0u8; HDR], &f1).unwrap();
        assert_eq!(send_queued(q, &h, &big).unwrap(), HDR + big.len());
        send_queued(q, &[0u8; HDR], &f2).unwrap();
        let late = q.flush();
        assert_eq!(
            (late.rejected, late.rejected_bytes, late.failed),
            (1, big.len() as u64, 0)
        );
        assert_eq!(port.counters().tx_refused.load(Relaxed), 4);
        assert_eq!(peer_recv(&peer, Duration::from_secs(2)), Some(f1));
        assert_eq!(peer_recv(&peer, Duration::from_secs(2)), Some(f2));

        // A burst longer than the TX ring: all of it leaves, in order, with one flush.
        let burst: Vec<_> = (0..150u16)
            .map(|i| netns::udp_frame(MAC_B, MAC_A, ([10, 9, 0, 2], [10, 9, 0, 1]), (i, 10), 64))
            .collect();
        for f in &burst {
            send_queued(q, &[0u8; HDR], f).unwrap();
        }
        assert!(q.flush().is_empty());
        for (i, f) in burst.iter().enumerate() {
            assert_eq!(
                peer_recv(&peer, Duration::from_secs(2)).as_ref(),
                Some(f),
                "burst frame {i}"
            );
        }
        for i in 0..100u16 {
            let f = netns::udp_frame(MAC_B, MAC_A, ([10, 9, 0, 2], [10, 9, 0, 1]), (i, 9), 64);
            send(q, &[0u8; HDR], &f).unwrap();
            assert_eq!(
                peer_recv(&peer, Duration::from_secs(2)),
                Some(f),
                "frame {i}"
            );
        }
    });
}

#[test]
fn vmless_no_host_tso_on_an_interface_without_tso() {
    // The port sends past the qdisc, where the kernel drops GSO frames a device without TSO
    // cannot take whole: on such an interface the guest is not offered HOST_TSO and segments
    // itself (found by the lab's 64 KiB TSO figure: every frame was lost on a veth with TSO
    // off).
    if skip_vmless("vmless_no_host_tso_on_an_interface_without_tso") {
        return;
    }
    in_new_netns(|| {
        veth_pair();
        let run = |args: &[&str]| {
            let st = std::process::Command::new("ethtool")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ethtool {args:?}");
        };
        run(&["-K", A, "tso", "off"]);
        let port = AfPacketPort::open(A, 1, None).unwrap();
        assert!(
            port.capabilities().no_host_tso,
            "TSO off: HOST_TSO must not be offered"
        );
        drop(port);
        run(&["-K", A, "tso", "on"]);
        let port = AfPacketPort::open(A, 1, None).unwrap();
        assert!(
            !port.capabilities().no_host_tso,
            "TSO on: HOST_TSO is offered"
        );
    });
}

#[test]
fn vmless_frames_larger_than_the_buffers_are_dropped_not_cut() {
    if skip_vmless("vmless_frames_larger_than_the_buffers_are_dropped_not_cut") {
        return;
    }
    in_new_netns(|| {
        veth_pair();
        let (port, mut qs) = open_port(1, ALL);
        let q = qs[0].as_mut();
        let peer = Peer::sender(B).unwrap();
        let big = netns::udp_frame(MAC_A, MAC_B, ([10, 9, 0, 1], [10, 9, 0, 2]), (5, 6), 1000);
        let small = netns::udp_frame(MAC_A, MAC_B, ([10, 9, 0, 1], [10, 9, 0, 2]), (7, 8), 200);
        peer.send(&big).unwrap();
        peer.send(&small).unwrap();
        let mut buf = vec![0u8; 512];
        let r = recv_into(q, &mut buf, Duration::from_secs(2));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // Buffers split over several iovecs, like mergeable RX buffers.
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 412];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs point at `a` and `b`, live and exclusive for the call.
        let n = unsafe { recv_iov(q, &iov, Duration::from_secs(2)) }
            .expect("the next frame is delivered");
        assert_eq!(n, HDR + small.len());
        let mut got = a[HDR..].to_vec();
        got.extend_from_slice(&b[..n - a.len()]);
        assert_eq!(got, small);
        assert_eq!(port.counters().rx_too_big.load(Relaxed), 1);
    });
}

#[test]
fn vmless_two_queues_fan_out_flows_and_promiscuity_is_released() {
    if skip_vmless("vmless_two_queues_fan_out_flows_and_promiscuity_is_released") {
        return;
    }
    in_new_netns(|| {
        veth_pair();
        let promiscuity = || {
            let out = ip(&["-d", "link", "show", A]);
            let w: Vec<&str> = out.split_whitespace().collect();
            let i = w
                .iter()
                .position(|x| *x == "promiscuity")
                .expect("promiscuity");
            w[i + 1].parse::<u32>().unwrap()
        };
        assert_eq!(promiscuity(), 0);
        let (port, mut qs) = open_port(2, ALL);
        assert_eq!(
            promiscuity(),
            2,
            "each queue's socket holds a promiscuous membership"
        );
        let peer = Peer::sender(B).unwrap();
        const FLOWS: u16 = 64;
        for p in 0..FLOWS {
            let f = netns::udp_frame(
                MAC_A,
                MAC_B,
                ([10, 9, 0, 1], [10, 9, 0, 2]),
                (1000 + p, 2000),
                100,
            );
            peer.send(&f).unwrap();
        }
        let mut counts = [0u32; 2];
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(3);
        while counts.iter().sum::<u32>() < u32::from(FLOWS) && Instant::now() < deadline {
            for (i, q) in qs.iter_mut().enumerate() {
                while recv_into(q.as_mut(), &mut buf, Duration::from_millis(20)).is_ok() {
                    counts[i] += 1;
                }
            }
        }
        assert_eq!(counts.iter().sum::<u32>(), u32::from(FLOWS), "{counts:?}");
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "fan-out used one queue: {counts:?}"
        );
        // Both queues transmit.
        let sniff = Peer::sniffer(B).unwrap();
        for (i, q) in qs.iter_mut().enumerate() {
            let f = netns::udp_frame(
                MAC_B,
                MAC_A,
                ([10, 9, 0, 2], [10, 9, 0, 1]),
                (9, i as u16),
                80,
            );
            send(q.as_mut(), &[0u8; HDR], &f).unwrap();
            assert_eq!(peer_recv(&sniff, Duration::from_secs(2)), Some(f));
        }
        drop(qs);
        drop(port);
        assert_eq!(promiscuity(), 0, "promiscuous membership not released");
    });
}

#[test]
fn vmless_link_down_up_delete_and_recreate() {
    if skip_vmless("vmless_link_down_up_delete_and_recreate") {
        return;
    }
    in_new_netns(|| {
        veth_pair();
        let (port, mut qs) = open_port(1, ALL);
        let q = qs[0].as_mut();
        let f = netns::udp_frame(MAC_B, MAC_A, ([10, 9, 0, 2], [10, 9, 0, 1]), (1, 1), 100);
        let g = netns::udp_frame(MAC_A, MAC_B, ([10, 9, 0, 1], [10, 9, 0, 2]), (2, 2), 100);
        let mut buf = vec![0u8; 2048];
        let sniff = Peer::sniffer(B).unwrap();
        send(q, &[0; HDR], &f).unwrap();
        assert!(peer_recv(&sniff, Duration::from_secs(2)).is_some());

        // Down: transmits fail at once, and the queue's fd does not keep waking the worker.
        ip(&["link", "set", A, "down"]);
        let t = Instant::now();
        let r = send(q, &[0; HDR], &f);
        assert!(r.is_err(), "send on a downed interface succeeded");
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "send blocked {:?}",
            t.elapsed()
        );
        let mut wakeups = 0;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(600) {
            if wait_fd(q.rx_fd(), Duration::from_millis(50)) {
                wakeups += 1;
                let _ = recv_into(q, &mut buf, Duration::ZERO);
            }
            let _ = send(q, &[0; HDR], &f);
        }
        assert!(wakeups < 10, "{wakeups} wake-ups while down");
        assert!(port.counters().tx_link_down.load(Relaxed) >= 1);

        // Up: traffic resumes both ways without reopening anything.
        ip(&["link", "set", A, "up"]);
        let ok = netns::wait_until(Duration::from_secs(3), || send(q, &[0; HDR], &f).is_ok());
        assert!(ok, "transmit did not resume after the interface came up");
        assert!(peer_recv(&sniff, Duration::from_secs(2)).is_some());
        let peer = Peer::sender(B).unwrap();
        let n = inject_until_received(&peer, &g, q, &mut buf);
        assert_eq!(&buf[HDR..n], &g[..]);

        // Deleted: transmits fail; re-created under the same name: the port re-attaches.
        drop((sniff, peer));
        ip(&["link", "del", A]);
        let failed = netns::wait_until(Duration::from_secs(2), || send(q, &[0; HDR], &f).is_err());
        assert!(failed);
        std::thread::sleep(Duration::from_millis(200));
        veth_pair();
        let sniff = Peer::sniffer(B).unwrap();
        let back = netns::wait_until(Duration::from_secs(5), || {
            let _ = recv_into(q, &mut buf, Duration::from_millis(20));
            send(q, &[0; HDR], &f).is_ok()
        });
        assert!(
            back,
            "the port did not re-attach to the re-created interface"
        );
        assert_eq!(port.counters().reattached.load(Relaxed), 1);
        assert!(peer_recv(&sniff, Duration::from_secs(2)).is_some());
        let peer = Peer::sender(B).unwrap();
        let n = inject_until_received(&peer, &g, q, &mut buf);
        assert_eq!(&buf[HDR..n], &g[..]);
    });
}

/// An epoll set watching `fd` edge-triggered, as the worker watches a queue.
struct EdgeWatch(OwnedFd);

impl EdgeWatch {
    fn new(fd: RawFd) -> EdgeWatch {
        // SAFETY: epoll_create1 with a constant flag; checked below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0, "epoll_create1: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: a valid epoll fd, a valid fd and a live event.
        let r = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        assert_eq!(r, 0, "epoll_ctl: {}", io::Error::last_os_error());
        EdgeWatch(ep)
    }

    /// Watches `fd` too, edge-triggered.
    fn add(&self, fd: RawFd) {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 1,
        };
        // SAFETY: a valid epoll fd, a valid fd and a live event.
        let r = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        assert_eq!(r, 0, "epoll_ctl: {}", io::Error::last_os_error());
    }

    /// True when the set reported `fd` within `timeout`.
    fn wait(&self, timeout: Duration) -> bool {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for one event, which the kernel fills.
        let n =
            unsafe { libc::epoll_wait(self.0.as_raw_fd(), &mut ev, 1, timeout.as_millis() as i32) };
        n > 0
    }
}

/// Pins the calling thread to CPU 0.
fn pin_to_cpu0() {
    // SAFETY: cpu_set_t is plain old data; the calls only read/write the local set.
    unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Overload with a consumer that behaves like the worker (edge-triggered wake-ups on the
/// queue's fd and its recheck timer, drain, busy-poll, sleep) and shares its CPU with the
/// sender: every frame left in the ring comes with a wake-up. The daemon once lost the last
/// wake-up before a full ring (the queue took the readable event from its private epoll set and
/// did not look at the ring again) and stalled for good under the perf harness's overload. On
/// Linux 6.18, with a consumer spending 2 µs per frame, frames were also left behind with the
/// private set readable and no edge reaching the outer set; the recheck timer, watched
/// directly, covers that. These races are timing-dependent and not reproduced every run.
#[test]
fn vmless_rx_wakes_the_worker_after_overload_bursts() {
    if skip_vmless("vmless_rx_wakes_the_worker_after_overload_bursts") {
        return;
    }
    in_new_netns(|| {
        veth_pair();
        let (port, mut qs) = open_port(1, ALL);
        let q = qs[0].as_mut();
        // The worker's set: the queue's fd and, beside it, its recheck timer.
        let watch = EdgeWatch::new(q.rx_fd());
        if let Some(fd) = q.recheck_fd() {
            watch.add(fd);
        }
        let mut buf = vec![0u8; 2048];
        let frame = |flow: u16, seq: u16| {
            let mut f =
                netns::udp_frame(MAC_A, MAC_B, ([10, 9, 0, 1], [10, 9, 0, 2]), (flow, 9), 64);
            let n = f.len();
            f[n - 2..].copy_from_slice(&seq.to_be_bytes());
            f
        };
        // A flood from a thread on the consumer's CPU: the kernel fills the ring in bursts
        // while the consumer is preempted anywhere in its receive path, ring-full included.
        // The consumer acts like the worker: drain until WouldBlock, then sleep on the edge.
        pin_to_cpu0();
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let stop = stop.clone();
            let f = frame(1, 0);
            std::thread::spawn(move || {
                pin_to_cpu0();
                let peer = Peer::sender(B).unwrap();
                let mut sent = 0u64;
                while !stop.load(Relaxed) {
                    if peer.send(&f).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        };
        let drain = |q: &mut dyn HostQueue, buf: &mut [u8]| {
            let mut n = 0u64;
            loop {
                // A flood that outruns the drain would keep it here for good.
                if n >= 4 * RX_SLOTS {
                    return (n, false, false);
                }
                let iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: one iovec over a live buffer of its length.
                match unsafe { q.recv(&iov) } {
                    Ok(len) => {
                        n += 1;
                        // A guest's share of the work per frame, more than the sender's: the
                        // ring runs full.
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_micros(4) {
                            std::hint::spin_loop();
                        }
                        if len > HDR && buf[HDR..len].ends_with(&[0xff, 0xff]) {
                            return (n, true, false);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (n, false, true),
                    Err(_) => {}
                }
            }
        };
        let mut got = 0u64;
        // Whether the last drain ended on an empty ring: a drain cut short (by its cap or the
        // deadline) leaves frames that no new wake-up announces, and the worker knows to come
        // back for them without one.
        let mut emptied = true;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if watch.wait(Duration::from_millis(100)) {
                // Drain, then busy-poll a while (as the worker does) before sleeping.
                let mut idle = Instant::now();
                // The flood may outrun the drain for good (the ring holds thousands of
                // frames): the deadline bounds this loop too.
                while idle.elapsed() < Duration::from_micros(20)
                    && t.elapsed() < Duration::from_secs(3)
                {
                    let (n, _, empty) = drain(q, &mut buf);
                    emptied = empty;
                    if n > 0 {
                        got += n;
                        idle = Instant::now();
                    }
                }
            }
        }
        stop.store(true, Relaxed);
        let sent = flood.join().unwrap();
        assert!(got > 0 && sent > got, "sent {sent}, got {got}");
        while !emptied {
            emptied = drain(q, &mut buf).2;
        }
        // Whatever is left in the ring must come with a wake-up.
        while watch.wait(Duration::from_millis(300)) {
            drain(q, &mut buf);
        }
        let (stranded, ..) = drain(q, &mut buf);
        assert_eq!(stranded, 0, "frames sat in the ring without a wake-up");
        // And new frames keep arriving with one.
        let peer = Peer::sender(B).unwrap();
        for seq in [0u16, 1, 2, 0xffff] {
            peer.send(&frame(2, seq)).unwrap();
        }
        assert!(
            watch.wait(Duration::from_secs(1)),
            "no wake-up for new frames"
        );
        assert_eq!(drain(q, &mut buf), (4, true, false));
        drop(port);
    });
}

/// Sends `frame` from the peer until the queue receives a frame (for up to 3 s): right after
/// a veth comes (back) up, the kernel re-enables its peer's transmit path asynchronously
/// (linkwatch) and drops frames sent before that.
fn inject_until_received(
    peer: &Peer,
    frame: &[u8],
    q: &mut dyn HostQueue,
    buf: &mut [u8],
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        peer.send(frame).unwrap();
        match recv_into(q, buf, Duration::from_millis(200)) {
            Ok(n) => return n,
            Err(e) if e.kind() == io::ErrorKind::TimedOut && Instant::now() < deadline => {}
            Err(e) => panic!("no frame from the peer: {e}"),
        }
    }
}

#[test]
fn vmless_bridge_master_receives_frames_for_the_guest_mac() {
    if skip_vmless("vmless_bridge_master_receives_frames_for_the_guest_mac") {
        return;
    }
    in_new_netns(|| {
        // A bridge with one port (vpc0, whose peer vpd0 plays the outside world). The port is
        // opened on the bridge device itself: a bridge hands it frames for other MACs only
        // when promiscuous, which the port's membership makes it.
        ip(&["link", "add", "vpbr0", "type", "bridge"]);
        ip(&[
            "link", "add", "vpc0", "type", "veth", "peer", "name", "vpd0",
        ]);
        ip(&["link", "set", "vpc0", "master", "vpbr0"]);
        for i in ["vpbr0", "vpc0", "vpd0"] {
            ip(&["link", "set", i, "up"]);
        }
        let port = AfPacketPort::open("vpbr0", 1, None).unwrap();
        port.configure(HDR, ALL).unwrap();
        let mut q = port.take_queue(0).unwrap();
        let outside = Peer::sniffer("vpd0").unwrap();
        let guest_mac = [0x02, 0x5e, 0, 0, 0, 0x42];
        let mut buf = vec![0u8; 2048];
        // The guest speaks first (as it would): the bridge learns its MAC behind itself.
        let hello = netns::udp_frame(MAC_B, guest_mac, ([10, 9, 0, 2], [10, 9, 0, 1]), (1, 2), 90);
        send(q.as_mut(), &[0; HDR], &hello).unwrap();
        assert_eq!(peer_recv(&outside, Duration::from_secs(2)), Some(hello));
        // A unicast frame for the guest's MAC, from outside, reaches the port.
        let to_guest =
            netns::udp_frame(guest_mac, MAC_B, ([10, 9, 0, 1], [10, 9, 0, 2]), (3, 4), 90);
        outside.send(&to_guest).unwrap();
        let n = recv_into(q.as_mut(), &mut buf, Duration::from_secs(2))
            .expect("frame for the guest MAC not received through the bridge");
        assert_eq!(&buf[HDR..n], &to_guest[..]);
    });
}

#[test]
fn vmless_mac_filter_passes_only_the_guest_mac_and_group_addresses() {
    if skip_vmless("vmless_mac_filter_passes_only_the_guest_mac_and_group_addresses") {
        return;
    }
    in_new_netns(|| {
        veth_pair();
        let guest = [0x02, 0x5e, 0, 0, 0, 0x42];
        let other = [0x02, 0x5e, 0, 0, 0, 0x43];
        let port = AfPacketPort::open_filtered(A, 1, None, Some(MacAddr(guest))).unwrap();
        port.configure(HDR, ALL).unwrap();
        let mut q = port.take_queue(0).unwrap();
        let q = q.as_mut();
        let mut buf = vec![0u8; 2048];
        let to = |dst: [u8; 6], tag: u16| {
            netns::udp_frame(dst, MAC_B, ([10, 9, 0, 1], [10, 9, 0, 2]), (tag, 9), 80)
        };
        // Expect exactly the frames for the guest's MAC, broadcast and multicast, in order.
        let check = |q: &mut dyn HostQueue, buf: &mut [u8], round: u16| {
            let peer = Peer::sender(B).unwrap();
            let frames = [
                (to(other, round), false),
                (to(guest, round + 1), true),
                (to([0xff; 6], round + 2), true),
                (to([0x01, 0x00, 0x5e, 0, 0, 0xfb], round + 3), true),
                (to(MAC_A, round + 4), false),
                (to(other, round + 5), false),
                (to(guest, round + 6), true),
            ];
            for (f, _) in &frames {
                peer.send(f).unwrap();
            }
            for (f, _) in frames.iter().filter(|(_, pass)| *pass) {
                let n = recv_into(q, buf, Duration::from_secs(2)).expect("a passing frame");
                assert_eq!(&buf[HDR..n], &f[..], "round {round}");
            }
            let late = recv_into(q, buf, Duration::from_millis(300));
            assert!(
                late.is_err(),
                "a filtered frame reached the port (round {round})"
            );
        };
        check(q, &mut buf, 100);
        // Sockets built on a re-created interface carry the filter too.
        ip(&["link", "del", A]);
        std::thread::sleep(Duration::from_millis(200));
        veth_pair();
        let f = to(MAC_B, 1);
        let back = netns::wait_until(Duration::from_secs(5), || {
            let _ = recv_into(q, &mut buf, Duration::from_millis(20));
            send(q, &[0; HDR], &f).is_ok()
        });
        assert!(back, "the port did not re-attach");
        assert_eq!(port.counters().reattached.load(Relaxed), 1);
        while recv_into(q, &mut buf, Duration::from_millis(100)).is_ok() {}
        check(q, &mut buf, 200);
    });
}

// ---------------------------------------------------------------------------------------------
// QEMU guest tests
// ---------------------------------------------------------------------------------------------

/// One TCG guest at a time: the machine has two cores.
static VM: Mutex<()> = Mutex::new(());

/// A named network namespace (unique per test and process), deleted on drop.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Netns {
        let name = format!("vpaf-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        for knob in ["all", "default"] {
            let _ = ns.try_exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{knob}.disable_ipv6=1"),
            ]);
        }
        ns
    }

    fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(argv);
        c
    }

    fn try_exec(&self, argv: &[&str]) -> Result<String, String> {
        let out = self.cmd(argv).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{argv:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn exec(&self, argv: &[&str]) -> String {
        self.try_exec(argv).unwrap_or_else(|e| panic!("{e}"))
    }

    fn counter(&self, ifname: &str, name: &str) -> u64 {
        self.exec(&["cat", &format!("/sys/class/net/{ifname}/statistics/{name}")])
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon on `--af-packet ifname` in `ns`, listening on `socket`.
struct Daemon {
    proc: Proc,
    log: PathBuf,
}

impl Daemon {
    fn start(ns: &Netns, socket: &Path, log: &Path, ifname: &str, extra: &[&str]) -> Daemon {
        let _ = std::fs::remove_file(socket);
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut argv = vec![
            env!("CARGO_BIN_EXE_vhost-pump"),
            "--socket",
            socket.to_str().unwrap(),
            "--af-packet",
            ifname,
        ];
        argv.extend_from_slice(extra);
        let child = ns
            .cmd(&argv)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            proc: Proc(child),
            log: log.to_path_buf(),
        };
        // The daemon may bind its socket before it opens the host port: wait for both.
        let t = Instant::now();
        while !(socket.exists() && d.log_text().contains("af_packet port ready")) {
            if let Ok(Some(s)) = d.proc.0.try_wait() {
                panic!("daemon exited ({s}):\n{}", d.log_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "daemon did not come up:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- vhost-pump log ---\n{}", self.log_text());
        }
    }
}

/// Checks the guest prerequisites; takes the VM lock.
fn vm_test(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail(test, &why);
        return None;
    }
    if let Err(e) = guest::try_guest_dir() {
        guest::skip_or_fail(test, &format!("cannot build the test guest: {e}"));
        return None;
    }
    Some(VM.lock().unwrap_or_else(|p| p.into_inner()))
}

const T: Duration = Duration::from_secs(60);

/// A veth pair: `a` stays in `d` (for the daemon), `b` goes to `p` with `cidr`.
fn veth_across(d: &Netns, p: &Netns, a: &str, b: &str, cidr: &str) {
    d.exec(&[
        "ip", "link", "add", a, "type", "veth", "peer", "name", b, "netns", &p.0,
    ]);
    p.exec(&["ip", "addr", "add", cidr, "dev", b]);
    p.exec(&["ip", "link", "set", b, "up"]);
    d.exec(&["ip", "link", "set", a, "up"]);
}

fn boot(opts: &GuestOpts) -> QemuGuest {
    let mut vm = QemuGuest::start(opts).expect("start QEMU");
    let boot = vm.wait_ready(Duration::from_secs(90)).expect("guest ready");
    eprintln!(
        "{}: guest ready after {boot:.2?}; logs in {}",
        opts.name,
        vm.log_dir().display()
    );
    vm
}

fn ping_ok(vm: &mut QemuGuest, ip: &str) {
    let ping = vm.run(&format!("ping -c 3 -W 5 {ip}"), T).unwrap();
    assert!(
        ping.contains(" 0% packet loss"),
        "ping {ip} failed:\n{ping}"
    );
}

#[test]
fn qemu_guest_over_veth_with_gso() {
    let Some(_vm_lock) = vm_test("qemu_guest_over_veth_with_gso") else {
        return;
    };
    let dir = workdir("afp-veth");
    let socket = dir.join("vu.sock");
    let d = Netns::create("vd");
    let p = Netns::create("vp");
    veth_across(&d, &p, "vpa0", "vpb0", "10.253.0.1/24");
    let daemon = Daemon::start(&d, &socket, &dir.join("daemon.log"), "vpa0", &[]);
    let _iperf = Proc(
        p.cmd(&["iperf3", "-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut opts = GuestOpts::vhost_user(&socket, 1);
    opts.ip = Some("10.253.0.2/24".into());
    opts.name = "afp-veth".into();
    let mut vm = boot(&opts);

    ping_ok(&mut vm, "10.253.0.1");
    let mtu = vm.run_ok("cat /sys/class/net/eth0/mtu", T).unwrap();
    assert_eq!(mtu.trim(), "1500", "guest MTU must come from the interface");
    let k = vm.run_ok("ethtool -k eth0", T).unwrap();
    assert!(
        k.contains("tcp-segmentation-offload: on"),
        "TSO off in the guest:\n{k}"
    );

    let tx0 = (
        d.counter("vpa0", "tx_bytes"),
        d.counter("vpa0", "tx_packets"),
    );
    let up = vm.run_ok("iperf3 -c 10.253.0.1 -t 3 -f m", T).unwrap();
    let up_mbps = iperf_mbps(&up).unwrap_or_else(|| panic!("no iperf3 result:\n{up}"));
    let tx1 = (
        d.counter("vpa0", "tx_bytes"),
        d.counter("vpa0", "tx_packets"),
    );
    let rx0 = vm
        .run_ok(
            "cat /sys/class/net/eth0/statistics/rx_bytes /sys/class/net/eth0/statistics/rx_packets",
            T,
        )
        .unwrap();
    let down = vm.run_ok("iperf3 -c 10.253.0.1 -t 3 -f m -R", T).unwrap();
    let down_mbps = iperf_mbps(&down).unwrap_or_else(|| panic!("no iperf3 result:\n{down}"));
    let rx1 = vm
        .run_ok(
            "cat /sys/class/net/eth0/statistics/rx_bytes /sys/class/net/eth0/statistics/rx_packets",
            T,
        )
        .unwrap();
    eprintln!(
        "AF_PACKET veth: iperf3 guest->peer {up_mbps} Mbit/s, peer->guest {down_mbps} Mbit/s (TCG guest, 1 queue pair, MTU 1500)"
    );
    assert!(up_mbps > 1.0 && down_mbps > 1.0);

    // Guest TSO frames left the veth as GSO skbs (average far above an MTU-sized frame) ...
    let (bytes, packets) = (tx1.0 - tx0.0, (tx1.1 - tx0.1).max(1));
    eprintln!("vpa0 tx during guest->peer: {bytes} bytes in {packets} packets");
    assert!(
        bytes / packets > 1500,
        "no GSO frames left the guest's side of the veth"
    );
    // ... and the host's GSO frames reached the guest unsegmented.
    let nums = |s: &str| -> Vec<u64> { s.split_whitespace().map(|v| v.parse().unwrap()).collect() };
    let (r0, r1) = (nums(&rx0), nums(&rx1));
    let (bytes, packets) = (r1[0] - r0[0], (r1[1] - r0[1]).max(1));
    eprintln!("guest eth0 rx during peer->guest: {bytes} bytes in {packets} packets");
    assert!(bytes / packets > 1500, "the guest received no GSO frames");

    let log = daemon.log_text();
    assert!(log.contains("af_packet port ready"), "{log}");
}

#[test]
fn qemu_guest_over_macvlan_with_its_own_mac() {
    let Some(_vm_lock) = vm_test("qemu_guest_over_macvlan_with_its_own_mac") else {
        return;
    };
    let dir = workdir("afp-macvlan");
    let socket = dir.join("vu.sock");
    let d = Netns::create("md");
    let p = Netns::create("mp");
    // Two bridge-mode macvlans on one parent (a veth; this kernel has no dummy driver): one
    // for the guest, whose MAC it carries, and one in the peer namespace with an address.
    let guest_mac = "02:5e:af:00:00:02";
    d.exec(&[
        "ip", "link", "add", "vppa", "type", "veth", "peer", "name", "vppb",
    ]);
    d.exec(&["ip", "link", "set", "vppa", "up"]);
    d.exec(&["ip", "link", "set", "vppb", "up"]);
    d.exec(&[
        "ip", "link", "add", "vpmv0", "link", "vppa", "address", guest_mac, "type", "macvlan",
        "mode", "bridge",
    ]);
    d.exec(&[
        "ip", "link", "add", "vpmv1", "link", "vppa", "type", "macvlan", "mode", "bridge",
    ]);
    d.exec(&["ip", "link", "set", "vpmv1", "netns", &p.0]);
    p.exec(&["ip", "addr", "add", "10.254.0.1/24", "dev", "vpmv1"]);
    p.exec(&["ip", "link", "set", "vpmv1", "up"]);
    let promiscuity = || {
        let out = d.exec(&["ip", "-d", "link", "show", "vpmv0"]);
        let w: Vec<&str> = out.split_whitespace().collect();
        let i = w.iter().position(|x| *x == "promiscuity").unwrap();
        w[i + 1].parse::<u32>().unwrap()
    };
    let daemon = Daemon::start(
        &d,
        &socket,
        &dir.join("daemon.log"),
        "vpmv0",
        &["--mac", guest_mac],
    );
    assert_eq!(promiscuity(), 1, "no promiscuous membership while serving");
    let mut opts = GuestOpts::vhost_user(&socket, 1);
    opts.ip = Some("10.254.0.2/24".into());
    opts.mac = guest_mac.into();
    opts.name = "afp-macvlan".into();
    let mut vm = boot(&opts);
    ping_ok(&mut vm, "10.254.0.1");
    // And from the other side, to the guest.
    let back = p.exec(&["busybox", "ping", "-c", "3", "-W", "5", "10.254.0.2"]);
    assert!(back.contains(" 0% packet loss"), "{back}");
    drop(vm);
    drop(daemon);
    assert_eq!(
        promiscuity(),
        0,
        "promiscuous membership not released on exit"
    );
}

#[test]
fn qemu_two_queue_pairs_fan_out() {
    let Some(_vm_lock) = vm_test("qemu_two_queue_pairs_fan_out") else {
        return;
    };
    let dir = workdir("afp-mq");
    let socket = dir.join("vu.sock");
    let d = Netns::create("qd");
    let p = Netns::create("qp");
    veth_across(&d, &p, "vpa0", "vpb0", "10.253.1.1/24");
    let _daemon = Daemon::start(
        &d,
        &socket,
        &dir.join("daemon.log"),
        "vpa0",
        &["--queues", "2"],
    );
    let _iperf = Proc(
        p.cmd(&["iperf3", "-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut opts = GuestOpts::vhost_user(&socket, 2);
    opts.ip = Some("10.253.1.2/24".into());
    opts.vcpus = 2;
    opts.name = "afp-mq".into();
    let mut vm = boot(&opts);
    ping_ok(&mut vm, "10.253.1.1");
    let ch = vm.run_ok("ethtool -l eth0", T).unwrap();
    let current = ch.split("Current hardware settings").nth(1).unwrap_or("");
    assert!(
        current.contains("Combined:\t2"),
        "2 queue pairs not active:\n{ch}"
    );

    // Flows are spread by the fan-out hash: with 8 streams per run, a run leaving a queue idle
    // happens 1 time in 128; a second run makes it negligible.
    let mut results = Vec::new();
    let mut stats = String::new();
    for _ in 0..2 {
        let out = vm
            .run_ok("iperf3 -c 10.253.1.1 -t 3 -P 8 -f m -R", T)
            .unwrap();
        results.push(iperf_mbps(&out).unwrap_or_else(|| panic!("no iperf3 result:\n{out}")));
        stats = vm.run_ok("ethtool -S eth0", T).unwrap();
        if stat(&stats, "rx_queue_0_packets") > 100 && stat(&stats, "rx_queue_1_packets") > 100 {
            break;
        }
    }
    let up = vm.run_ok("iperf3 -c 10.253.1.1 -t 3 -P 8 -f m", T).unwrap();
    let up_mbps = iperf_mbps(&up).unwrap_or_else(|| panic!("no iperf3 result:\n{up}"));
    eprintln!(
        "AF_PACKET veth, 2 queue pairs: iperf3 -P 8 peer->guest {results:?} Mbit/s, guest->peer {up_mbps} Mbit/s (TCG guest, 2 vCPUs)"
    );
    for q in ["rx_queue_0_packets", "rx_queue_1_packets"] {
        assert!(
            stat(&stats, q) > 100,
            "{q} carried (almost) nothing:\n{stats}"
        );
    }
}

#[test]
fn qemu_interface_down_up_gone_and_back() {
    let Some(_vm_lock) = vm_test("qemu_interface_down_up_gone_and_back") else {
        return;
    };
    let dir = workdir("afp-link");
    let socket = dir.join("vu.sock");
    let d = Netns::create("ld");
    let p = Netns::create("lp");
    veth_across(&d, &p, "vpa0", "vpb0", "10.253.2.1/24");
    let daemon = Daemon::start(&d, &socket, &dir.join("daemon.log"), "vpa0", &[]);
    let mut opts = GuestOpts::vhost_user(&socket, 1);
    opts.ip = Some("10.253.2.2/24".into());
    opts.name = "afp-link".into();
    let mut vm = boot(&opts);
    ping_ok(&mut vm, "10.253.2.1");

    // Down: pings fail, and the daemon stays idle while the guest keeps sending.
    d.exec(&["ip", "link", "set", "vpa0", "down"]);
    let cpu0 = netns::cpu_time(daemon.pid()).unwrap();
    let t = Instant::now();
    let down = vm.run("ping -c 10 -i 0.2 -W 1 10.253.2.1", T).unwrap();
    let cpu = netns::cpu_time(daemon.pid()).unwrap() - cpu0;
    let wall = t.elapsed();
    assert!(
        down.contains("100% packet loss"),
        "pings crossed a downed interface:\n{down}"
    );
    eprintln!("daemon CPU while the interface was down: {cpu:?} in {wall:.2?}");
    assert!(
        cpu < wall / 5,
        "daemon busy while down: {cpu:?} in {wall:?}"
    );

    d.exec(&["ip", "link", "set", "vpa0", "up"]);
    let resumed = vm
        .run(
            "for i in $(seq 1 20); do ping -c 1 -W 1 10.253.2.1 >/dev/null && echo RESUMED && break; done",
            T,
        )
        .unwrap();
    assert!(
        resumed.contains("RESUMED"),
        "no traffic after up:\n{resumed}"
    );

    // Gone: the veth pair is deleted; then re-created with the same names (and the peer's
    // MAC, which the guest's neighbour cache still holds).
    let peer_mac = p.exec(&["cat", "/sys/class/net/vpb0/address"]);
    let peer_mac = peer_mac.trim();
    d.exec(&["ip", "link", "del", "vpa0"]);
    let gone = vm.run("ping -c 3 -i 0.3 -W 1 10.253.2.1", T).unwrap();
    assert!(gone.contains("100% packet loss"), "{gone}");
    d.exec(&[
        "ip", "link", "add", "vpa0", "type", "veth", "peer", "name", "vpb0", "address", peer_mac,
        "netns", &p.0,
    ]);
    p.exec(&["ip", "addr", "add", "10.253.2.1/24", "dev", "vpb0"]);
    p.exec(&["ip", "link", "set", "vpb0", "up"]);
    d.exec(&["ip", "link", "set", "vpa0", "up"]);
    let back = vm
        .run(
            "for i in $(seq 1 20); do ping -c 1 -W 1 10.253.2.1 >/dev/null && echo BACK && break; done",
            T,
        )
        .unwrap();
    assert!(
        back.contains("BACK"),
        "no traffic after re-creation:\n{back}\n{}",
        daemon.log_text()
    );
    ping_ok(&mut vm, "10.253.2.1");
    let to_guest = p.exec(&["busybox", "ping", "-c", "3", "-W", "5", "10.253.2.2"]);
    assert!(to_guest.contains(" 0% packet loss"), "{to_guest}");

    let log = daemon.log_text();
    for line in [
        "interface is down",
        "interface is up",
        "interface disappeared",
        "re-attached to the re-created interface",
    ] {
        assert!(log.contains(line), "log lacks {line:?}:\n{log}");
    }
}

/// The counters `ctl stats` reports in a port's `af_packet` object.
const AF_PACKET_COUNTERS: [&str; 12] = [
    "rx_truncated",
    "rx_gso_refused",
    "rx_too_big",
    "rx_malformed",
    "rx_csum_completed",
    "rx_ring_full",
    "tx_refused",
    "tx_link_down",
    "tx_stalled",
    "tx_failed",
    "reattached",
    "rx_copied",
];

/// `vhost-pump ctl stats main`: the port's `af_packet` object.
fn ctl_af_packet(control: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-pump"))
        .args([
            "ctl",
            "--control",
            control.to_str().unwrap(),
            "stats",
            "main",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["af_packet"].clone()
}

/// Polls `ctl stats` until the port reports `link` (for up to 5 s); the last object.
fn wait_link(control: &Path, link: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = netns::wait_until(Duration::from_secs(5), || {
        last = ctl_af_packet(control);
        last["link"] == link
    });
    assert!(ok, "link never became {link:?}: {last:#}");
    last
}

/// `GET /metrics` over the daemon's unix metrics socket: the body.
fn metrics_text(path: &Path) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn daemon_reports_af_packet_link_and_counters_in_ctl_stats_and_metrics() {
    let test = "daemon_reports_af_packet_link_and_counters_in_ctl_stats_and_metrics";
    if skip_vmless(test) {
        return;
    }
    let dir = workdir("afp-stats");
    let (socket, control, metrics) = (
        dir.join("vu.sock"),
        dir.join("ctl.sock"),
        dir.join("metrics.sock"),
    );
    let d = Netns::create("st");
    d.exec(&["ip", "link", "add", A, "type", "veth", "peer", "name", B]);
    d.exec(&["ip", "link", "set", B, "up"]);
    let metrics_arg = format!("unix:{}", metrics.display());
    let daemon = Daemon::start(
        &d,
        &socket,
        &dir.join("daemon.log"),
        A,
        &[
            "--control",
            control.to_str().unwrap(),
            "--metrics",
            &metrics_arg,
        ],
    );
    let ready = netns::wait_until(Duration::from_secs(5), || {
        control.exists() && metrics.exists()
    });
    assert!(
        ready,
        "no control or metrics socket:\n{}",
        daemon.log_text()
    );

    // Up (the port brought the interface up), every counter present and zero.
    let a = wait_link(&control, "up");
    assert_eq!(a["interface"], A, "{a:#}");
    for c in AF_PACKET_COUNTERS {
        assert_eq!(a[c].as_u64(), Some(0), "{c} in {a:#}");
    }
    assert_eq!(
        a.as_object().unwrap().len(),
        2 + AF_PACKET_COUNTERS.len(),
        "{a:#}"
    );
    let labels = format!("{{port=\"main\",interface=\"{A}\"}}");
    let text = metrics_text(&metrics);
    assert!(
        text.contains(&format!("vhost_pump_af_packet_link_up{labels} 1")),
        "{text}"
    );
    for c in AF_PACKET_COUNTERS {
        let family = format!("vhost_pump_af_packet_{c}_total");
        assert!(
            text.contains(&format!("# TYPE {family} counter\n")),
            "{text}"
        );
        assert!(text.contains(&format!("{family}{labels} 0\n")), "{text}");
    }

    // Down, then up again.
    d.exec(&["ip", "link", "set", A, "down"]);
    wait_link(&control, "down");
    let text = metrics_text(&metrics);
    assert!(
        text.contains(&format!("vhost_pump_af_packet_link_up{labels} 0")),
        "{text}"
    );
    d.exec(&["ip", "link", "set", A, "up"]);
    wait_link(&control, "up");

    // Gone, then re-created: the port re-attaches and counts it.
    d.exec(&["ip", "link", "del", A]);
    wait_link(&control, "gone");
    d.exec(&["ip", "link", "add", A, "type", "veth", "peer", "name", B]);
    d.exec(&["ip", "link", "set", B, "up"]);
    d.exec(&["ip", "link", "set", A, "up"]);
    let a = wait_link(&control, "up");
    assert_eq!(a["reattached"], 1, "{a:#}");
    let text = metrics_text(&metrics);
    assert!(
        text.contains(&format!(
            "vhost_pump_af_packet_reattached_total{labels} 1\n"
        )),
        "{text}"
    );
}

/// One iperf3 round through the guest: (guest->peer, peer->guest) Mbit/s and the daemon's CPU
/// time over both runs.
fn iperf_round(vm: &mut QemuGuest, daemon: u32, server: &str, secs: u32) -> (f64, f64, Duration) {
    let cpu0 = netns::cpu_time(daemon).unwrap();
    let up = vm
        .run_ok(&format!("iperf3 -c {server} -t {secs} -f m"), T)
        .unwrap();
    let down = vm
        .run_ok(&format!("iperf3 -c {server} -t {secs} -f m -R"), T)
        .unwrap();
    let cpu = netns::cpu_time(daemon).unwrap() - cpu0;
    (
        iperf_mbps(&up).unwrap_or_else(|| panic!("no iperf3 result:\n{up}")),
        iperf_mbps(&down).unwrap_or_else(|| panic!("no iperf3 result:\n{down}")),
        cpu,
    )
}

/// Same-run comparison of AF_PACKET mode (veth) with tap mode: one queue pair, MTU 1500, one
/// vCPU, one TCP stream each way, alternating modes. Opt-in (`--ignored`): it measures, the
/// TCG guest being the bottleneck (under TCG the guest vCPU, not the backend, sets the pace), rather than checks.
#[test]
#[ignore]
fn qemu_iperf_af_packet_vs_tap_same_run() {
    let Some(_vm_lock) = vm_test("qemu_iperf_af_packet_vs_tap_same_run") else {
        return;
    };
    let secs = 4;
    let mut rows = Vec::new();
    for round in 0..2 {
        for mode in ["tap", "af_packet"] {
            let dir = workdir(&format!("afp-cmp-{mode}-{round}"));
            let socket = dir.join("vu.sock");
            let d = Netns::create(&format!("cd{round}{}", &mode[..1]));
            let p = Netns::create(&format!("cp{round}{}", &mode[..1]));
            let (_daemon, pid, server_ns): (Box<dyn std::any::Any>, u32, &Netns) = if mode == "tap"
            {
                d.exec(&["ip", "tuntap", "add", "dev", "vpt0", "mode", "tap"]);
                d.exec(&["ip", "addr", "add", "10.253.3.1/24", "dev", "vpt0"]);
                let argv = [
                    env!("CARGO_BIN_EXE_vhost-pump"),
                    "--socket",
                    socket.to_str().unwrap(),
                    "--tap",
                    "vpt0",
                ];
                let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
                let child = d
                    .cmd(&argv)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap();
                let t = Instant::now();
                while !socket.exists() && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let pid = child.id();
                (Box::new(Proc(child)), pid, &d)
            } else {
                veth_across(&d, &p, "vpa0", "vpb0", "10.253.3.1/24");
                let dm = Daemon::start(&d, &socket, &dir.join("daemon.log"), "vpa0", &[]);
                let pid = dm.pid();
                (Box::new(dm), pid, &p)
            };
            let _iperf = Proc(
                server_ns
                    .cmd(&["iperf3", "-s"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            let mut opts = GuestOpts::vhost_user(&socket, 1);
            opts.ip = Some("10.253.3.2/24".into());
            opts.name = format!("afp-cmp-{mode}");
            let mut vm = boot(&opts);
            ping_ok(&mut vm, "10.253.3.1");
            let (up, down, cpu) = iperf_round(&mut vm, pid, "10.253.3.1", secs);
            let line = format!(
                "round {round} {mode:>9}: guest->peer {up:6.0} Mbit/s, peer->guest {down:6.0} Mbit/s, daemon CPU {:.2} s over {} s",
                cpu.as_secs_f64(),
                2 * secs
            );
            eprintln!("{line}");
            rows.push(line);
        }
    }
    eprintln!("--- same-run comparison ---\n{}", rows.join("\n"));
}

/// Rough rates of the ring path alone, no guest: `send` of 64 B and 1500 B frames for a second
/// each (and the same through tap mode's queue, for comparison), and `recv` of frames a peer
/// thread sends into the veth one `send(2)` at a time. Opt-in (`--ignored`); prints. On a shared
/// machine the figures move a lot from run to run.
#[test]
#[ignore]
fn vmless_rates() {
    if skip_vmless("vmless_rates") {
        return;
    }
    in_new_netns(|| {
        veth_pair();
        let (port, mut qs) = open_port(1, ALL);
        let q = qs[0].as_mut();
        for len in [64usize, 1500] {
            let f = netns::udp_frame(MAC_B, MAC_A, ([10, 9, 0, 2], [10, 9, 0, 1]), (1, 2), len);
            let hdr = [0u8; HDR];
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < Duration::from_secs(1) {
                for _ in 0..1000 {
                    send(q, &hdr, &f).unwrap();
                }
                n += 1000;
            }
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "send {len:4} B: {:.2} Mpps, {:.2} Gbit/s",
                n as f64 / s / 1e6,
                n as f64 * len as f64 * 8.0 / s / 1e9
            );
        }
        // The same loop through tap mode's queue, for comparison (one writev per frame).
        {
            let tap =
                vhost_pump::tap::TapPort::open("vpt0", 1, None, vhost_pump::config::TapTx::Writev)
                    .unwrap();
            tap.configure(HDR, ALL).unwrap();
            let mut tq = tap.take_queue(0).unwrap();
            for len in [64usize, 1500] {
                let f = netns::udp_frame(MAC_B, MAC_A, ([10, 9, 0, 2], [10, 9, 0, 1]), (1, 2), len);
                let hdr = [0u8; HDR];
                let t = Instant::now();
                let mut n = 0u64;
                while t.elapsed() < Duration::from_secs(1) {
                    for _ in 0..1000 {
                        send(tq.as_mut(), &hdr, &f).unwrap();
                    }
                    n += 1000;
                }
                let s = t.elapsed().as_secs_f64();
                eprintln!("tap send {len:4} B: {:.2} Mpps", n as f64 / s / 1e6);
            }
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let peer = std::sync::Arc::new(Peer::sender(B).unwrap());
        let p2 = peer.clone();
        let s2 = stop.clone();
        let f = netns::udp_frame(MAC_A, MAC_B, ([10, 9, 0, 1], [10, 9, 0, 2]), (3, 4), 64);
        let sender = std::thread::spawn(move || {
            let mut sent = 0u64;
            while !s2.load(Relaxed) {
                let _ = p2.send(&f);
                sent += 1;
            }
            sent
        });
        let mut buf = vec![0u8; 2048];
        let t = Instant::now();
        let mut got = 0u64;
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // Busy-polling, as the worker does after work.
        let mut empty = 0u64;
        while t.elapsed() < Duration::from_secs(1) {
            // SAFETY: the iovec points at `buf`, live and exclusive for the call.
            if unsafe { q.recv(&iov) }.is_ok() {
                got += 1;
            } else {
                empty += 1;
            }
        }
        eprintln!("recv found the ring empty {empty} times");
        stop.store(true, Relaxed);
        let sent = sender.join().unwrap();
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "recv   64 B: {:.2} Mpps received, peer sent {:.2} Mpps (one send(2) per frame)",
            got as f64 / s / 1e6,
            sent as f64 / s / 1e6
        );
        // Drain, then let the stats interval pass so the kernel's drop counter gets read.
        while recv_into(q, &mut buf, Duration::from_millis(50)).is_ok() {}
        std::thread::sleep(Duration::from_secs(5));
        let _ = recv_into(q, &mut buf, Duration::from_millis(10));
        eprintln!(
            "kernel RX ring-full drops: {}",
            port.counters().rx_ring_full.load(Relaxed)
        );
    });
}
