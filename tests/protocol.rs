//! The daemon's vhost-user protocol and process contract, driven in-process: the `vhost` crate's
//! `Frontend` plays the VMM against the real `vhost-pump` binary, and the test writes the virtio
//! split rings into a memfd-backed "guest memory" itself.
//!
//! Every daemon runs with its tap in a private network namespace (`testkit::netns`), so tests run
//! in parallel and leave nothing behind. Needs root and /dev/net/tun: skipped otherwise, failed
//! under `CI=true`. Run: `cargo test --test protocol -- --nocapture`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use testkit::netns::{
    self, can_run, daemon_bin, ether_frame, if_stats, in_new_netns, settled_if_stats, udp_frame,
    wait_until, Daemon, PacketSocket, TempDir, ETHERTYPE_EXPERIMENTAL, PACKET_OUTGOING,
};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const TAP: &str = "vptap0";
const MAC: [u8; 6] = [0x02, 0x56, 0x50, 0x00, 0x00, 0x01];
const MAC_STR: &str = "02:56:50:00:00:01";
const PEER_MAC: [u8; 6] = [0x02, 0x56, 0x50, 0x00, 0x00, 0xfe];
const BROADCAST: [u8; 6] = [0xff; 6];

/// Ring size the test frontend uses.
const QSIZE: u16 = 256;
/// Size of the test's guest memory.
const MEM_SIZE: usize = 1 << 20;
/// Per-ring area: descriptor table, avail ring (+0x1000), used ring (+0x2000).
const RING_STRIDE: u64 = 0x8000;
/// Packet buffers start here; each ring has `BUFS_PER_RING` buffers of `BUF_LEN` bytes.
const BUF_BASE: u64 = 0x40000;
const BUF_LEN: u32 = 2048;
const BUFS_PER_RING: u16 = 64;
/// RX buffers each RX ring gets when a session starts.
const RX_POSTED: u16 = 32;
/// `virtio_net_hdr_v1`, with `num_buffers` at offset 10.
const HDR_LEN: usize = 12;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Longest a frontend connection may stay open (see [`Conn`]).
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);

const fn bit(b: u32) -> u64 {
    1 << b
}

// ------------------------------------------------------------------------------------------
// Guest memory and split rings written by hand.

/// A memfd shared with the daemon, mapped here at guest physical address 0.
struct GuestMem {
    mem: GuestMemoryMmap,
    host: u64,
}

impl GuestMem {
    fn new() -> GuestMem {
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vhost-pump-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64).expect("size the memfd");
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("map guest memory");
        let host = mem.get_host_address(GuestAddress(0)).expect("host address") as u64;
        GuestMem { mem, host }
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        let region = self
            .mem
            .find_region(GuestAddress(0))
            .expect("the one region");
        VhostUserMemoryRegionInfo::from_guest_region(region).expect("memfd-backed region")
    }
}

/// One split virtqueue in [`GuestMem`], driven the way a guest driver would.
struct Vring<'m> {
    mem: &'m GuestMem,
    index: usize,
    avail_idx: u16,
    /// Used entries already looked at.
    seen_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl<'m> Vring<'m> {
    fn new(mem: &'m GuestMem, index: usize) -> Self {
        Vring {
            mem,
            index,
            avail_idx: 0,
            seen_used: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }
    }

    fn desc_gpa(&self) -> u64 {
        self.index as u64 * RING_STRIDE
    }

    fn avail_gpa(&self) -> u64 {
        self.desc_gpa() + 0x1000
    }

    fn used_gpa(&self) -> u64 {
        self.desc_gpa() + 0x2000
    }

    fn buf_gpa(&self, slot: u16) -> u64 {
        BUF_BASE
            + self.index as u64 * u64::from(BUFS_PER_RING) * u64::from(BUF_LEN)
            + u64::from(slot % BUFS_PER_RING) * u64::from(BUF_LEN)
    }

    fn is_tx(&self) -> bool {
        self.index % 2 == 1
    }

    /// SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL, in QEMU's order.
    fn setup(&self, fe: &Frontend) {
        self.setup_pausing(fe, Duration::ZERO);
    }

    /// [`Vring::setup`] with `pause` between SET_VRING_KICK and SET_VRING_CALL.
    fn setup_pausing(&self, fe: &Frontend, pause: Duration) {
        let i = self.index;
        fe.set_vring_num(i, QSIZE).expect("SET_VRING_NUM");
        fe.set_vring_base(i, 0).expect("SET_VRING_BASE");
        let h = self.mem.host;
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: h + self.desc_gpa(),
            used_ring_addr: h + self.used_gpa(),
            avail_ring_addr: h + self.avail_gpa(),
            log_addr: None,
        };
        fe.set_vring_addr(i, &cfg).expect("SET_VRING_ADDR");
        fe.set_vring_kick(i, &self.kick).expect("SET_VRING_KICK");
        std::thread::sleep(pause);
        fe.set_vring_call(i, &self.call).expect("SET_VRING_CALL");
    }

    /// Makes descriptor `slot` (= the avail slot) available: one buffer at `addr`.
    fn push(&mut self, addr: u64, len: u32, flags: u16) {
        let m = &self.mem.mem;
        let slot = self.avail_idx % QSIZE;
        let d = GuestAddress(self.desc_gpa() + 16 * u64::from(slot));
        m.write_obj(addr, d).unwrap();
        m.write_obj(len, GuestAddress(d.0 + 8)).unwrap();
        m.write_obj(flags, GuestAddress(d.0 + 12)).unwrap();
        m.write_obj(0u16, GuestAddress(d.0 + 14)).unwrap();
        m.write_obj(
            slot,
            GuestAddress(self.avail_gpa() + 4 + 2 * u64::from(slot)),
        )
        .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.store(
            self.avail_idx,
            GuestAddress(self.avail_gpa() + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    /// Queues one frame for transmission (a zero virtio-net header, then the frame).
    fn queue_frame(&mut self, frame: &[u8]) {
        let buf = self.buf_gpa(self.avail_idx % QSIZE);
        self.mem
            .mem
            .write_slice(&[0u8; HDR_LEN], GuestAddress(buf))
            .unwrap();
        self.mem
            .mem
            .write_slice(frame, GuestAddress(buf + HDR_LEN as u64))
            .unwrap();
        self.push(buf, (HDR_LEN + frame.len()) as u32, 0);
    }

    /// Posts `n` device-writable receive buffers.
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let buf = self.buf_gpa(self.avail_idx % QSIZE);
            self.push(buf, BUF_LEN, VIRTQ_DESC_F_WRITE);
        }
    }

    fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .mem
            .load(GuestAddress(self.used_gpa() + 2), Ordering::Acquire)
            .unwrap()
    }

    /// Waits until the used index reaches `n`.
    fn wait_used(&self, n: u16, timeout: Duration) -> bool {
        wait_until(timeout, || self.used_idx() == n)
    }

    /// Whether the device signalled the call eventfd since the last look.
    fn take_call(&self) -> bool {
        self.call.read().is_ok_and(|n| n > 0)
    }

    /// Used entries not yet looked at: (descriptor id, written length, buffer contents).
    fn take_used(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let m = &self.mem.mem;
        let end = self.used_idx();
        let mut out = Vec::new();
        while self.seen_used != end {
            let e = self.used_gpa() + 4 + 8 * u64::from(self.seen_used % QSIZE);
            let id: u32 = m.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(e + 4)).unwrap();
            let d = self.desc_gpa() + 16 * u64::from(id);
            let addr: u64 = m.read_obj(GuestAddress(d)).unwrap();
            let mut data = vec![0u8; (len as usize).min(BUF_LEN as usize)];
            m.read_slice(&mut data, GuestAddress(addr)).unwrap();
            out.push((id, len, data));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}

// ------------------------------------------------------------------------------------------
// vhost-user sessions.

/// The raw side of a frontend connection, with a watchdog: the `vhost` crate's frontend waits
/// for replies forever (it retries `EAGAIN`, so socket timeouts do not help), so a daemon that
/// stops answering would hang the test. After `SESSION_TIMEOUT` the watchdog shuts the socket
/// down, which turns the hang into an error.
struct Conn {
    raw: UnixStream,
    done: Option<mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

/// Connects to the daemon's socket; returns the frontend and a raw handle on the same stream
/// (for messages the `Frontend` API refuses to send, like an early SET_VRING_ENABLE). The
/// connection closes when both are dropped.
fn connect(socket: &Path, vrings: u64) -> (Frontend, Conn) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
        }
    };
    let raw = stream.try_clone().unwrap();
    let guard = stream.try_clone().unwrap();
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(SESSION_TIMEOUT) {
            eprintln!(
                "watchdog: frontend session still open after {SESSION_TIMEOUT:?}; closing it"
            );
            let _ = guard.shutdown(Shutdown::Both);
        }
    });
    let conn = Conn {
        raw,
        done: Some(done),
        watchdog: Some(watchdog),
    };
    (Frontend::from_stream(stream, vrings), conn)
}

/// Sends SET_VRING_ENABLE on the raw stream, bypassing the `Frontend`'s own check that
/// PROTOCOL_FEATURES was acked (QEMU sends it before SET_FEATURES). With `need_reply`, reads and
/// checks the REPLY_ACK.
fn raw_set_vring_enable(conn: &Conn, index: u32, enable: bool, need_reply: bool) {
    let req = FrontendReq::SET_VRING_ENABLE as u32;
    let flags: u32 = 0x1 | if need_reply { 0x8 } else { 0 };
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&req.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&index.to_le_bytes());
    msg.extend_from_slice(&u32::from(enable).to_le_bytes());
    (&conn.raw).write_all(&msg).expect("send SET_VRING_ENABLE");
    if need_reply {
        let mut reply = [0u8; 20];
        (&conn.raw)
            .read_exact(&mut reply)
            .expect("REPLY_ACK for an early SET_VRING_ENABLE (did the daemon drop the session?)");
        let word = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().unwrap());
        assert_eq!(word(0), req, "reply to another request");
        assert_ne!(word(4) & 0x4, 0, "REPLY flag missing");
        assert_eq!(word(8), 8, "reply body size");
        assert_eq!(&reply[12..], &[0u8; 8], "non-zero REPLY_ACK status");
    }
}

/// Protocol features the test frontend wants (and the daemon must offer).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RARP
        // Offered unless --no-live-migration; sessions take it when it is there.
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// Virtio features a simple guest driver acks (no receive offloads: one 2 KiB buffer holds a
/// frame).
fn guest_features(offered: u64) -> u64 {
    offered
        & (bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MTU)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
}

/// A session of one queue pair up to SET_OWNER: protocol features negotiated, guest features
/// not set yet. Returns the frontend, its raw handle and the features the device offers.
fn owned_session(socket: &Path) -> (Frontend, Conn, u64) {
    let (mut fe, conn) = connect(socket, 2);
    let offered = fe.get_features().expect("GET_FEATURES");
    let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(proto & wanted_protocol_features())
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_owner().expect("SET_OWNER");
    (fe, conn, offered)
}

/// A session set up the way QEMU's virtio-net does: protocol features first, SET_VRING_ENABLE
/// for every ring *before* SET_FEATURES, memory through ADD_MEM_REG (CONFIGURE_MEM_SLOTS), and
/// no SET_VRING_ENABLE after the rings are configured.
fn qemu_style_session<'m>(
    socket: &Path,
    pairs: usize,
    mem: &'m GuestMem,
) -> (Frontend, Conn, Vec<Vring<'m>>) {
    let vrings = 2 * pairs;
    let (mut fe, conn) = connect(socket, vrings as u64);
    let offered = fe.get_features().expect("GET_FEATURES");
    let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(proto & wanted_protocol_features())
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().expect("GET_QUEUE_NUM"), vrings as u64);
    fe.set_owner().expect("SET_OWNER");
    // The early enables: one asking for a REPLY_ACK, the others not (QEMU sends them without).
    for i in 0..vrings {
        raw_set_vring_enable(&conn, i as u32, true, i == 0);
    }
    fe.set_features(guest_features(offered))
        .expect("SET_FEATURES after early SET_VRING_ENABLE (connection dropped?)");
    assert!(
        fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS") > 8,
        "CONFIGURE_MEM_SLOTS offered, so more than the legacy 8 regions"
    );
    fe.add_mem_region(&mem.region()).expect("ADD_MEM_REG");
    let mut rings: Vec<Vring<'m>> = (0..vrings).map(|i| Vring::new(mem, i)).collect();
    for r in &rings {
        r.setup(&fe);
    }
    post_rx_buffers(&mut rings);
    (fe, conn, rings)
}

/// A session set up the way DPDK's virtio-user does: SET_FEATURES first, SET_MEM_TABLE, the
/// rings, then SET_VRING_ENABLE for each ring.
fn dpdk_style_session<'m>(
    socket: &Path,
    pairs: usize,
    mem: &'m GuestMem,
) -> (Frontend, Conn, Vec<Vring<'m>>) {
    let vrings = 2 * pairs;
    let (mut fe, conn) = connect(socket, vrings as u64);
    let offered = fe.get_features().expect("GET_FEATURES");
    fe.set_owner().expect("SET_OWNER");
    let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(proto & wanted_protocol_features())
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().expect("GET_QUEUE_NUM"), vrings as u64);
    fe.set_features(guest_features(offered))
        .expect("SET_FEATURES");
    fe.set_mem_table(&[mem.region()]).expect("SET_MEM_TABLE");
    let mut rings: Vec<Vring<'m>> = (0..vrings).map(|i| Vring::new(mem, i)).collect();
    for r in &rings {
        r.setup(&fe);
    }
    for i in 0..vrings {
        fe.set_vring_enable(i, true).expect("SET_VRING_ENABLE");
    }
    post_rx_buffers(&mut rings);
    (fe, conn, rings)
}

fn post_rx_buffers(rings: &mut [Vring<'_>]) {
    for r in rings.iter_mut().filter(|r| !r.is_tx()) {
        r.post_rx(RX_POSTED);
        r.kick();
    }
}

/// Sends frames on every TX ring and checks they reach the tap byte for byte; injects frames
/// into the tap and checks they land in the RX rings with a correct header. `tag` makes the
/// frames of each call unique.
fn exercise_rings(rings: &mut [Vring<'_>], tag: &str) {
    let sniffer = PacketSocket::sniffer(TAP).expect("AF_PACKET sniffer on the tap");
    let before = if_stats(TAP).unwrap();

    // Guest TX: pair p sends p + 2 frames.
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for (p, pair) in rings.chunks_mut(2).enumerate() {
        let tx = &mut pair[1];
        for k in 0..p + 2 {
            let payload = format!("vhost-pump protocol test {tag}: pair {p} frame {k}");
            let frame = ether_frame(BROADCAST, MAC, ETHERTYPE_EXPERIMENTAL, payload.as_bytes());
            tx.queue_frame(&frame);
            sent.push(frame);
        }
        tx.kick();
    }
    for (p, pair) in rings.chunks_mut(2).enumerate() {
        let tx = &mut pair[1];
        let want = tx.avail_idx;
        assert!(
            tx.wait_used(want, Duration::from_secs(5)),
            "{tag}: TX ring {} used {} of {want} descriptors",
            tx.index,
            tx.used_idx()
        );
        let used = tx.take_used();
        assert_eq!(
            used.len(),
            p + 2,
            "{tag}: TX ring {} used entries",
            tx.index
        );
        assert!(
            wait_until(Duration::from_secs(2), || tx.take_call()),
            "{tag}: no used-buffer notification on TX ring {}",
            tx.index
        );
    }
    let mut missing: Vec<Vec<u8>> = sent.clone();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !missing.is_empty() && Instant::now() < deadline {
        let Some((n, kind)) = sniffer.recv(&mut buf, Duration::from_millis(200)).unwrap() else {
            continue;
        };
        if kind == PACKET_OUTGOING {
            continue;
        }
        if let Some(i) = missing.iter().position(|f| f[..] == buf[..n]) {
            missing.swap_remove(i);
        }
    }
    assert!(
        missing.is_empty(),
        "{tag}: {} of {} guest frames never showed up on the tap (or arrived altered)",
        missing.len(),
        sent.len()
    );
    let after = settled_if_stats(TAP, Duration::from_millis(100), Duration::from_secs(2)).unwrap();
    let d = after.since(&before);
    assert_eq!(d.rx_packets, sent.len() as u64, "{tag}: tap rx_packets");
    assert_eq!(
        d.rx_bytes,
        sent.iter().map(|f| f.len() as u64).sum::<u64>(),
        "{tag}: tap rx_bytes"
    );

    // Guest RX: frames sent out of the tap by the kernel, spread over flows (and so over the
    // tap's queues when there are several).
    let sender = PacketSocket::sender(TAP).expect("AF_PACKET sender on the tap");
    let mut injected: HashMap<Vec<u8>, usize> = HashMap::new();
    for k in 0..8u16 {
        let f = udp_frame(
            MAC,
            PEER_MAC,
            ([10, 99, 0, 1], [10, 99, 0, 2]),
            (40000 + k * 7, 9),
            60 + usize::from(k) * 10,
        );
        sender.send(&f).expect("inject a frame into the tap");
        *injected.entry(f).or_default() += 1;
    }
    let total = injected.values().sum::<usize>();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got < total && Instant::now() < deadline {
        for r in rings.iter_mut().filter(|r| !r.is_tx()) {
            for (id, len, data) in r.take_used() {
                got += 1;
                assert!(
                    len as usize > HDR_LEN,
                    "{tag}: RX ring {} used entry {id} has length {len}",
                    r.index
                );
                let num_buffers = u16::from_le_bytes([data[10], data[11]]);
                assert_eq!(num_buffers, 1, "{tag}: num_buffers of a small frame");
                let frame = data[HDR_LEN..].to_vec();
                match injected.get_mut(&frame) {
                    Some(n) if *n > 0 => *n -= 1,
                    _ => panic!(
                        "{tag}: RX ring {} delivered an unexpected frame of {} bytes: {:02x?}",
                        r.index,
                        frame.len(),
                        &frame[..frame.len().min(64)]
                    ),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        got, total,
        "{tag}: frames injected into the tap that reached the RX rings"
    );
    assert!(
        rings.iter().filter(|r| !r.is_tx()).any(|r| r.take_call()),
        "{tag}: no used-buffer notification on any RX ring"
    );
}

// ------------------------------------------------------------------------------------------
// Tests.

#[test]
fn features_protocol_features_queue_count_and_config() {
    if !can_run("features_protocol_features_queue_count_and_config") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-features");

        // Two queue pairs, explicit MAC and MTU.
        let sock = dir.join("two.sock");
        let _d = Daemon::start(
            &sock,
            TAP,
            &[
                "--queues",
                "2",
                "--mac",
                MAC_STR,
                "--mtu",
                "9000",
                "--no-live-migration",
            ],
            &dir.join("two.log"),
        );
        let (mut fe, conn) = connect(&sock, 4);
        let f = fe.get_features().expect("GET_FEATURES");
        for (name, b) in [
            ("VERSION_1", VIRTIO_F_VERSION_1),
            ("MRG_RXBUF", VIRTIO_NET_F_MRG_RXBUF),
            ("EVENT_IDX", VIRTIO_RING_F_EVENT_IDX),
            ("CSUM", VIRTIO_NET_F_CSUM),
            ("GUEST_CSUM", VIRTIO_NET_F_GUEST_CSUM),
            ("GUEST_TSO4", VIRTIO_NET_F_GUEST_TSO4),
            ("HOST_TSO4", VIRTIO_NET_F_HOST_TSO4),
            ("MAC", VIRTIO_NET_F_MAC),
            ("MTU", VIRTIO_NET_F_MTU),
            ("STATUS", VIRTIO_NET_F_STATUS),
            ("MQ", VIRTIO_NET_F_MQ),
        ] {
            assert_ne!(f & bit(b), 0, "feature {name} missing from {f:#x}");
        }
        // No dirty-page logging with --no-live-migration.
        assert_eq!(
            f & (1 << 26),
            0,
            "VHOST_F_LOG_ALL offered with --no-live-migration"
        );
        assert_ne!(
            f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0,
            "PROTOCOL_FEATURES missing"
        );
        let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let always = wanted_protocol_features() - VhostUserProtocolFeatures::LOG_SHMFD;
        assert!(
            proto.contains(always),
            "protocol features {proto:?} lack some of {always:?}"
        );
        assert!(
            !proto.contains(VhostUserProtocolFeatures::LOG_SHMFD),
            "LOG_SHMFD offered with --no-live-migration"
        );
        fe.set_protocol_features(always)
            .expect("SET_PROTOCOL_FEATURES");
        assert_eq!(fe.get_queue_num().expect("GET_QUEUE_NUM"), 4);
        let (_, cfg) = fe
            .get_config(0, 12, VhostUserConfigFlags::empty(), &[0u8; 12])
            .expect("GET_CONFIG");
        assert_eq!(&cfg[0..6], &MAC, "config-space MAC");
        let status = u16::from_le_bytes([cfg[6], cfg[7]]);
        assert_ne!(
            status & VIRTIO_NET_S_LINK_UP as u16,
            0,
            "link not up in status"
        );
        assert_eq!(
            u16::from_le_bytes([cfg[8], cfg[9]]),
            2,
            "max_virtqueue_pairs"
        );
        assert_eq!(
            u16::from_le_bytes([cfg[10], cfg[11]]),
            9000,
            "config-space MTU"
        );
        assert_eq!(netns::if_mtu(TAP).unwrap(), 9000, "tap MTU");
        // A partial read inside the config space works as well (QEMU reads field by field).
        let (_, mtu) = fe
            .get_config(10, 2, VhostUserConfigFlags::empty(), &[0u8; 2])
            .expect("GET_CONFIG of the mtu field");
        assert_eq!(mtu, 9000u16.to_le_bytes().to_vec());
        drop((fe, conn));

        // One queue pair, defaults: no MQ, the tap's MTU, a local unicast MAC.
        let sock = dir.join("one.sock");
        let _d1 = Daemon::start(&sock, "vptap1", &[], &dir.join("one.log"));
        let (mut fe, _conn) = connect(&sock, 2);
        let f = fe.get_features().expect("GET_FEATURES");
        assert_eq!(
            f & bit(VIRTIO_NET_F_MQ),
            0,
            "MQ offered with one queue pair"
        );
        assert_ne!(f & (1 << 26), 0, "VHOST_F_LOG_ALL not offered by default");
        let proto = fe.get_protocol_features().unwrap();
        assert!(
            proto.contains(VhostUserProtocolFeatures::LOG_SHMFD),
            "LOG_SHMFD not offered by default: {proto:?}"
        );
        fe.set_protocol_features(wanted_protocol_features())
            .unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), 2);
        let (_, cfg) = fe
            .get_config(0, 12, VhostUserConfigFlags::empty(), &[0u8; 12])
            .unwrap();
        assert_eq!(
            cfg[0] & 0x03,
            0x02,
            "default MAC must be local unicast: {cfg:02x?}"
        );
        assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
    });
}

#[test]
fn qemu_enable_order_then_rings_move_frames_and_sessions_repeat() {
    if !can_run("qemu_enable_order_then_rings_move_frames_and_sessions_repeat") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-rings");
        let sock = dir.join("vu.sock");
        let mut d = Daemon::start(
            &sock,
            TAP,
            &["--queues", "2", "--mac", MAC_STR],
            &dir.join("daemon.log"),
        );

        // Session 1: QEMU's message order.
        {
            let mem = GuestMem::new();
            let (fe, _conn, mut rings) = qemu_style_session(&sock, 2, &mem);
            exercise_rings(&mut rings, "qemu-order");
            // Stopping the rings reports where the device is: every TX descriptor consumed,
            // and RX buffers taken ahead of frames handed back (next_avail == used).
            for r in &rings {
                let base = fe.get_vring_base(r.index).expect("GET_VRING_BASE");
                let want = if r.is_tx() { r.avail_idx } else { r.used_idx() };
                assert_eq!(
                    base,
                    u32::from(want),
                    "GET_VRING_BASE of ring {} (avail {}, used {})",
                    r.index,
                    r.avail_idx,
                    r.used_idx()
                );
            }
        }
        d.assert_alive();

        // Session 2 on the same daemon, DPDK's order, fresh memory.
        {
            let mem = GuestMem::new();
            let (_fe, _conn, mut rings) = dpdk_style_session(&sock, 2, &mem);
            exercise_rings(&mut rings, "second-session");
        }
        d.assert_alive();

        // Session 3: QEMU's order again (a VM reboot), to be sure nothing from the earlier
        // sessions (held enables, features, memory) leaks into the next one.
        {
            let mem = GuestMem::new();
            let (_fe, _conn, mut rings) = qemu_style_session(&sock, 2, &mem);
            exercise_rings(&mut rings, "third-session");
        }
        d.assert_alive();
    });
}

/// A guest that comes up on rings with work already queued (the destination of a live
/// migration, a guest whose backend restarted) gets the interrupt for that work. QEMU's kick
/// eventfd starts signalled and its SET_VRING_CALL comes after SET_VRING_KICK: a ring enabled
/// before it has its call descriptor moves frames whose interrupt goes nowhere, and with
/// EVENT_IDX the device never sends it again, so the guest's receive path stalls for good.
#[test]
fn ring_started_with_work_waiting_interrupts_the_guest() {
    if !can_run("ring_started_with_work_waiting_interrupts_the_guest") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-restart");
        let sock = dir.join("vu.sock");
        let mut d = Daemon::start(&sock, TAP, &["--mac", MAC_STR], &dir.join("daemon.log"));
        let mem = GuestMem::new();
        let (fe, conn, offered) = owned_session(&sock);
        for i in 0..2 {
            raw_set_vring_enable(&conn, i, true, false);
        }
        let features = guest_features(offered);
        assert_ne!(features & bit(VIRTIO_RING_F_EVENT_IDX), 0);
        fe.set_features(features).expect("SET_FEATURES");
        fe.set_mem_table(&[mem.region()]).expect("SET_MEM_TABLE");
        let mut rx = Vring::new(&mem, 0);
        let tx = Vring::new(&mem, 1);
        // What the guest left behind: receive buffers posted, and a frame waiting in the tap.
        rx.post_rx(RX_POSTED);
        rx.kick();
        tx.kick();
        let frame = udp_frame(
            MAC,
            PEER_MAC,
            ([10, 99, 0, 1], [10, 99, 0, 2]),
            (40000, 9),
            200,
        );
        let sender = PacketSocket::sender(TAP).expect("AF_PACKET sender on the tap");
        sender.send(&frame).expect("inject a frame into the tap");
        // QEMU's order, with time between the kick and the call for the device to move.
        for r in [&rx, &tx] {
            r.setup_pausing(&fe, Duration::from_millis(300));
        }
        assert!(
            rx.wait_used(1, Duration::from_secs(5)),
            "the waiting frame was not delivered (used index {})",
            rx.used_idx()
        );
        let used = rx.take_used();
        assert_eq!(&used[0].2[HDR_LEN..], &frame[..], "the delivered frame");
        assert!(
            wait_until(Duration::from_secs(2), || rx.take_call()),
            "the frame was delivered but the guest was never interrupted"
        );
        d.assert_alive();
    });
}

#[test]
fn second_daemon_on_a_live_socket_fails_with_in_use() {
    if !can_run("second_daemon_on_a_live_socket_fails_with_in_use") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-busy");
        let sock = dir.join("vu.sock");
        let mut first = Daemon::start(&sock, TAP, &[], &dir.join("first.log"));
        // A frontend is connected while the second daemon probes the socket.
        let (fe, conn) = connect(&sock, 2);
        fe.get_features().expect("GET_FEATURES on the first daemon");

        let log = dir.join("second.log");
        let mut second = Daemon::spawn(
            &["--socket", sock.to_str().unwrap(), "--tap", "vptap1"],
            &log,
        )
        .expect("spawn the second daemon");
        let status = second
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("the second daemon must exit on its own");
        let msg = second.log_text();
        assert!(
            !status.success(),
            "second daemon exited with {status}: {msg}"
        );
        assert!(
            msg.contains("in use"),
            "second daemon's error must say the socket is in use: {msg:?}"
        );
        assert!(
            msg.contains(sock.to_str().unwrap()),
            "error names the socket: {msg:?}"
        );
        // The first daemon and its socket are untouched and it keeps serving.
        first.assert_alive();
        assert!(sock.exists(), "the live socket was removed");
        drop((fe, conn));
        let (fe, _conn) = connect(&sock, 2);
        assert_ne!(
            fe.get_features().expect("GET_FEATURES after the probe") & bit(VIRTIO_F_VERSION_1),
            0
        );
        first.assert_alive();
    });
}

#[test]
fn stale_socket_is_replaced_and_a_non_socket_is_refused() {
    if !can_run("stale_socket_is_replaced_and_a_non_socket_is_refused") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-stale");

        // A socket file nobody listens on (its listener is gone).
        let sock = dir.join("nested/dir/vu.sock");
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        assert!(
            UnixStream::connect(&sock).is_err(),
            "the stale socket answered"
        );
        let mut d = Daemon::start(&sock, TAP, &[], &dir.join("stale.log"));
        let (fe, conn) = connect(&sock, 2);
        assert_ne!(
            fe.get_features().expect("GET_FEATURES") & bit(VIRTIO_F_VERSION_1),
            0
        );
        d.assert_alive();
        drop((fe, conn));
        drop(d);

        // A regular file is not replaced.
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"precious").unwrap();
        let mut d = Daemon::spawn(
            &["--socket", file.to_str().unwrap(), "--tap", "vptap1"],
            &dir.join("file.log"),
        )
        .unwrap();
        let status = d
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("daemon must exit");
        assert!(
            !status.success(),
            "daemon accepted a regular file as its socket"
        );
        assert!(
            d.log_text().contains("not a socket"),
            "error must say why: {:?}",
            d.log_text()
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    });
}

#[test]
fn bad_flags_exit_2_with_a_one_line_message() {
    // Flag errors are reported before any privileged work, so this needs no root. As root it
    // still runs in a private namespace, in case a bad flag were accepted and a tap created.
    let body = || {
        let dir = TempDir::new("proto-flags");
        let sock = dir.join("never.sock");
        let s = sock.to_str().unwrap();
        let cases: Vec<Vec<&str>> = vec![
            vec!["--socket", s, "--tap", "t0", "--queues", "0"],
            vec!["--socket", s, "--tap", "t0", "--queues", "17"],
            vec!["--socket", s, "--tap", "t0", "--queue-size", "100"],
            vec!["--socket", s, "--tap", "t0", "--queue-size", "65536"],
            vec!["--socket", s, "--tap", "t0", "--mac", "01:00:00:00:00:01"],
            vec!["--socket", s, "--tap", "t0", "--mac", "zz"],
            vec!["--socket", s, "--tap", "t0", "--mtu", "10"],
            vec!["--socket", s, "--tap", "t0", "--busy-poll-us", "x"],
            vec!["--socket", s, "--tap", "t0", "--log-level", "[[["],
            vec!["--socket", s, "--tap", "t0", "--bogus"],
            vec!["--socket", s],
            vec!["--tap", "t0"],
            vec![],
        ];
        for args in &cases {
            let mut child = Command::new(daemon_bin())
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run the daemon");
            let Some(status) = netns::wait_child(&mut child, Duration::from_secs(10)).unwrap()
            else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?}: the daemon accepted these flags and kept running");
            };
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                status.code(),
                Some(2),
                "{args:?}: exit status {status}, stderr {stderr:?}"
            );
            assert!(
                out.stdout.is_empty(),
                "{args:?}: stdout {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(
                lines.len(),
                1,
                "{args:?}: want one stderr line, got {stderr:?}"
            );
            assert!(
                lines[0].starts_with("vhost-pump: ") && lines[0].len() > "vhost-pump: ".len() + 10,
                "{args:?}: message {:?}",
                lines[0]
            );
            assert!(!sock.exists(), "{args:?}: a socket was created");
        }
        // Help and version are not errors.
        for flag in ["--help", "--version"] {
            let out = Command::new(daemon_bin()).arg(flag).output().unwrap();
            assert!(out.status.success(), "{flag}: {}", out.status);
            assert!(!out.stdout.is_empty(), "{flag} printed nothing");
        }
    };
    if netns::missing_prereqs().is_none() {
        in_new_netns(body);
    } else {
        body();
    }
}

#[test]
fn sigterm_removes_the_socket_and_exits_0() {
    if !can_run("sigterm_removes_the_socket_and_exits_0") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-sigterm");
        for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
            let sock = dir.join(&format!("{name}.sock"));
            let mut d = Daemon::start(&sock, TAP, &[], &dir.join(&format!("{name}.log")));
            // With a frontend in the middle of a session.
            let mem = GuestMem::new();
            let (_fe, _conn, mut rings) = dpdk_style_session(&sock, 1, &mem);
            rings[1].queue_frame(&ether_frame(BROADCAST, MAC, ETHERTYPE_EXPERIMENTAL, b"bye"));
            rings[1].kick();
            assert!(
                rings[1].wait_used(1, Duration::from_secs(5)),
                "session not working"
            );
            d.signal(sig).unwrap();
            let status = d
                .wait_timeout(Duration::from_secs(5))
                .unwrap()
                .unwrap_or_else(|| panic!("daemon still running 5 s after {name}"));
            assert_eq!(status.code(), Some(0), "{name}: exit status {status}");
            assert!(
                !sock.exists(),
                "{name}: socket {} left behind",
                sock.display()
            );
        }
    });
}

/// Tap offload flags the kernel shows for `ifname` (`ethtool -k`), or `None` without ethtool.
fn tap_offloads(ifname: &str) -> Option<String> {
    let out = Command::new("ethtool").args(["-k", ifname]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let keep: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tx-checksumming:") || l.contains("tx-tcp-segmentation:"))
        .map(str::trim)
        .collect();
    out.status.success().then(|| keep.join(", "))
}

#[test]
fn second_instance_on_the_same_tap_leaves_the_running_one_alone() {
    // A second `vhost-pump` started with the same --socket and --tap (e.g. a unit started
    // twice) must fail on the socket before touching the tap: attaching new queues to the
    // running daemon's multi-queue tap would reset its offloads (TUNSETOFFLOAD 0) and apply
    // its own --mtu, leaving the first daemon's guest with a tap that no longer matches what
    // it negotiated.
    if !can_run("second_instance_on_the_same_tap_leaves_the_running_one_alone") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-same-tap");
        let sock = dir.join("vu.sock");
        let mut first = Daemon::start(&sock, TAP, &["--queues", "2"], &dir.join("first.log"));
        // A guest that takes TSO4: the daemon programs the tap's offloads.
        let (mut fe, _conn) = connect(&sock, 4);
        let offered = fe.get_features().unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(proto & wanted_protocol_features())
            .unwrap();
        let tso = offered & (bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4));
        fe.set_features(guest_features(offered) | tso).unwrap();
        fe.get_queue_num().unwrap(); // a round trip: SET_FEATURES has been handled
        let mtu_before = netns::if_mtu(TAP).unwrap();
        let offloads_before = tap_offloads(TAP);

        let mut second = Daemon::spawn(
            &[
                "--socket",
                sock.to_str().unwrap(),
                "--tap",
                TAP,
                "--queues",
                "2",
                "--mtu",
                "1400",
            ],
            &dir.join("second.log"),
        )
        .unwrap();
        let status = second.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            status.is_some_and(|s| !s.success()),
            "second instance: {status:?}"
        );
        assert!(
            second.log_text().contains("in use"),
            "{}",
            second.log_text()
        );
        first.assert_alive();
        assert_eq!(
            netns::if_mtu(TAP).unwrap(),
            mtu_before,
            "the failed second instance changed the running tap's MTU"
        );
        assert_eq!(
            tap_offloads(TAP),
            offloads_before,
            "the failed second instance changed the running tap's offloads"
        );
    });
}

#[test]
fn client_mode_connects_reconnects_and_leaves_the_socket_on_sigterm() {
    if !can_run("client_mode_connects_reconnects_and_leaves_the_socket_on_sigterm") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-client");
        let sock = dir.join("vmm.sock");
        let log = dir.join("daemon.log");
        // The daemon starts before the VMM's socket exists and waits for it.
        let mut d = Daemon::spawn(
            &["--socket", sock.to_str().unwrap(), "--tap", TAP, "--client"],
            &log,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        d.assert_alive();
        let listener = UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        let accept = |what: &str| -> UnixStream {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        return s;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(
                            Instant::now() < deadline,
                            "{what}: the daemon never connected"
                        );
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("{what}: accept: {e}"),
                }
            }
        };
        for round in ["first connection", "reconnection"] {
            let stream = accept(round);
            let fe = Frontend::from_stream(stream, 2);
            let f = fe
                .get_features()
                .expect("GET_FEATURES over the daemon's connection");
            assert_ne!(f & bit(VIRTIO_F_VERSION_1), 0, "{round}: features {f:#x}");
            drop(fe); // The VMM goes away; the daemon must come back.
        }
        d.signal(libc::SIGTERM).unwrap();
        let status = d.wait_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(0), "exit after SIGTERM");
        assert!(
            sock.exists(),
            "a client-mode daemon removed the VMM's socket"
        );
    });
}

/// Sends SEND_RARP for `mac` on the raw stream, with NEED_REPLY, and checks the REPLY_ACK.
fn raw_send_rarp(conn: &Conn, mac: [u8; 6]) {
    let req = FrontendReq::SEND_RARP as u32;
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&req.to_le_bytes());
    msg.extend_from_slice(&(0x1u32 | 0x8).to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&mac);
    msg.extend_from_slice(&[0, 0]);
    (&conn.raw).write_all(&msg).expect("send SEND_RARP");
    let mut reply = [0u8; 20];
    (&conn.raw)
        .read_exact(&mut reply)
        .expect("REPLY_ACK for SEND_RARP (did the daemon drop the session?)");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), req);
    assert_eq!(&reply[12..], &[0u8; 8], "non-zero REPLY_ACK status");
}

/// RARP frames from `src` the sniffer sees within `wait`.
fn rarp_frames_from(sniffer: &PacketSocket, src: [u8; 6], wait: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match sniffer.recv(&mut buf, left).unwrap() {
            Some((n, _)) if n >= 14 && buf[12..14] == [0x80, 0x35] && buf[6..12] == src => {
                got.push(buf[..n].to_vec())
            }
            Some(_) => {}
            None => break,
        }
    }
    got
}

#[test]
fn send_rarp_announces_the_guest_on_the_host_port() {
    if !can_run("send_rarp_announces_the_guest_on_the_host_port") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-rarp");
        let sock = dir.join("rarp.sock");
        let control = dir.join("control.sock");
        let _d = Daemon::start(
            &sock,
            TAP,
            &[
                "--mac",
                MAC_STR,
                "--port-security",
                "--control",
                control.to_str().unwrap(),
            ],
            &dir.join("rarp.log"),
        );
        let mem = GuestMem::new();
        let (mut fe, conn, mut rings) = qemu_style_session(&sock, 1, &mem);
        let proto = fe.get_protocol_features().unwrap();
        assert!(proto.contains(VhostUserProtocolFeatures::RARP), "{proto:?}");
        let sniffer = PacketSocket::sniffer(TAP).expect("AF_PACKET sniffer on the tap");
        // What QEMU sends on the migration's destination, for the guest's MAC.
        raw_send_rarp(&conn, MAC);
        let seen = rarp_frames_from(&sniffer, MAC, Duration::from_secs(2));
        assert_eq!(
            seen.len(),
            1,
            "one RARP frame from the guest's MAC on the tap"
        );
        let f = &seen[0];
        assert_eq!(&f[0..6], &BROADCAST, "broadcast");
        assert_eq!(
            &f[14..22],
            &[0, 1, 8, 0, 6, 4, 0, 3],
            "RARP request-reverse header"
        );
        assert_eq!((&f[22..28], &f[32..38]), (&MAC[..], &MAC[..]));
        // With port security, another MAC is not announced: counted like a spoofed frame.
        let other = [0x02, 0x56, 0x50, 0x00, 0x00, 0x99];
        raw_send_rarp(&conn, other);
        assert!(rarp_frames_from(&sniffer, other, Duration::from_millis(500)).is_empty());
        let v = netns::ctl_json(&control, &["stats"]);
        let q = &v[0]["queues"][0]["tx"];
        assert_eq!(q["drops"]["spoofed_source"], 1, "{q}");
        assert_eq!(
            q["frames"], 1,
            "the announcement counts as a frame sent: {q}"
        );
        // The session goes on: frames still cross both ways.
        exercise_rings(&mut rings, "after-rarp");
        drop(fe);
    });
}

/// QEMU sends SEND_RARP on a migration's destination before it starts the device: the
/// announcement waits for SET_FEATURES (the host port's header length is only known then) and
/// then goes out correctly framed.
#[test]
fn send_rarp_before_the_device_starts_goes_out_once_features_are_set() {
    if !can_run("send_rarp_before_the_device_starts_goes_out_once_features_are_set") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("proto-rarp-early");
        let sock = dir.join("rarp.sock");
        let _d = Daemon::start(&sock, TAP, &["--mac", MAC_STR], &dir.join("rarp.log"));
        let (fe, conn, offered) = owned_session(&sock);
        let sniffer = PacketSocket::sniffer(TAP).expect("AF_PACKET sniffer on the tap");
        raw_send_rarp(&conn, MAC);
        assert!(
            rarp_frames_from(&sniffer, MAC, Duration::from_millis(300)).is_empty(),
            "announced before the guest's features were set"
        );
        fe.set_features(guest_features(offered))
            .expect("SET_FEATURES");
        let seen = rarp_frames_from(&sniffer, MAC, Duration::from_secs(2));
        assert_eq!(seen.len(), 1, "one RARP frame once the features are set");
        let f = &seen[0];
        assert_eq!(&f[0..6], &BROADCAST, "broadcast");
        assert_eq!(&f[6..12], &MAC[..], "from the guest's MAC");
        assert_eq!(
            &f[12..22],
            &[0x80, 0x35, 0, 1, 8, 0, 6, 4, 0, 3],
            "RARP ethertype and request-reverse header"
        );
        drop(conn);
    });
}

/// `VHOST_F_LOG_ALL`: the frontend asks for guest memory writes to be logged.
const F_LOG_ALL: u64 = 1 << 26;
/// Pages of the test's guest memory, one bit each in the dirty log.
const LOG_PAGES: usize = MEM_SIZE / 4096;

/// A memfd of `len` bytes, zeroed.
fn memfd(len: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vhost-pump-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// The pages marked dirty in `log`.
fn dirty_pages(log: &File) -> Vec<usize> {
    use std::os::unix::fs::FileExt;
    let mut bits = vec![0u8; LOG_PAGES / 8];
    log.read_exact_at(&mut bits, 0).unwrap();
    (0..LOG_PAGES)
        .filter(|p| bits[p / 8] & (1 << (p % 8)) != 0)
        .collect()
}

/// Sends one frame into the tap for the guest and waits for RX ring `rx` to use a buffer.
fn frame_to_guest(rx: &mut Vring<'_>, k: u16) {
    let before = rx.used_idx();
    let sender = PacketSocket::sender(TAP).expect("AF_PACKET sender on the tap");
    let f = udp_frame(
        MAC,
        PEER_MAC,
        ([10, 99, 0, 1], [10, 99, 0, 2]),
        (41000 + k, 9),
        200,
    );
    sender.send(&f).expect("inject a frame into the tap");
    assert!(
        rx.wait_used(before.wrapping_add(1), Duration::from_secs(5)),
        "frame {k} never reached the guest"
    );
}

#[test]
fn dirty_log_marks_what_the_backend_writes_while_logging_is_on() {
    if !can_run("dirty_log_marks_what_the_backend_writes_while_logging_is_on") {
        return;
    }
    in_new_netns(|| {
        use std::os::fd::AsRawFd;
        use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
        use vhost::VhostUserDirtyLogRegion;
        let dir = TempDir::new("proto-dirty");
        let sock = dir.join("dirty.sock");
        let control = dir.join("control.sock");
        let d = Daemon::start(
            &sock,
            TAP,
            &["--mac", MAC_STR, "--control", control.to_str().unwrap()],
            &dir.join("dirty.log"),
        );
        let mem = GuestMem::new();
        let (mut fe, conn, mut rings) = dpdk_style_session(&sock, 1, &mem);
        let offered = fe.get_features().unwrap();
        assert_ne!(offered & F_LOG_ALL, 0, "VHOST_F_LOG_ALL offered");
        assert!(fe.get_protocol_features().unwrap().contains(P::LOG_SHMFD));
        // As QEMU starts a migration: the log first, then LOG_ALL.
        let log = memfd(4096);
        fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: 4096,
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .expect("SET_LOG_BASE");
        fe.set_features(guest_features(offered) | F_LOG_ALL)
            .expect("SET_FEATURES with LOG_ALL");
        let (rx_used_page, first_buf_page) = (
            (rings[0].used_gpa() / 4096) as usize,
            (rings[0].buf_gpa(0) / 4096) as usize,
        );
        frame_to_guest(&mut rings[0], 0);
        let pages = dirty_pages(&log);
        println!("dirty pages after one received frame: {pages:?}");
        // The frame went into the first posted buffer (with a readv the library cannot see),
        // and its used entry and the used index into the RX used ring.
        assert!(
            pages.contains(&first_buf_page),
            "RX buffer page not marked: {pages:?}"
        );
        assert!(
            pages.contains(&rx_used_page),
            "RX used ring page not marked: {pages:?}"
        );
        // The device never writes TX buffers (its TX used ring it may: the avail event index).
        let tx_buf_page = (rings[1].buf_gpa(0) / 4096) as usize;
        assert!(
            !pages.contains(&tx_buf_page),
            "a TX buffer page marked: {pages:?}"
        );
        assert!(
            pages.len() <= 4,
            "more pages than one frame touches: {pages:?}"
        );
        // Logging off (migration done or cancelled): nothing is marked any more.
        fe.set_features(guest_features(offered))
            .expect("SET_FEATURES without LOG_ALL");
        std::os::unix::fs::FileExt::write_all_at(&log, &[0u8; 4096], 0).unwrap();
        frame_to_guest(&mut rings[0], 1);
        rings[0].take_used();
        assert_eq!(
            dirty_pages(&log),
            Vec::<usize>::new(),
            "marked with logging off"
        );
        drop((rings, fe, conn));

        // Hostile logs end the session, counted; the port serves the next frontend.
        let stats = || netns::ctl_json(&control, &["stats"])[0]["sessions"].clone();
        let small = memfd(16);
        for (what, size, offset, fd) in [
            ("offset past the file", 4096u64, 8192u64, log.as_raw_fd()),
            ("size past the file", 4096, 0, small.as_raw_fd()),
        ] {
            let (fe, conn, _rings) = dpdk_style_session(&sock, 1, &mem);
            let r = fe.set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: size,
                    mmap_offset: offset,
                    mmap_handle: fd,
                }),
            );
            assert!(r.is_err(), "{what}: SET_LOG_BASE accepted");
            println!("{what}: refused ({r:?})");
            drop((fe, conn));
        }
        // No descriptor at all (the message QEMU sends without LOG_SHMFD).
        {
            let (fe, conn, _rings) = dpdk_style_session(&sock, 1, &mem);
            let _ = fe.set_log_base(0, None);
            // No reply is due for this form: the session ending shows the refusal.
            let mut b = [0u8; 1];
            conn.raw
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            assert_eq!(
                (&conn.raw).read(&mut b).unwrap_or(1),
                0,
                "session not ended"
            );
            drop((fe, conn));
        }
        // A log too small for guest memory (16 bytes cover 128 pages of 256).
        let (fe, conn, _rings) = dpdk_style_session(&sock, 1, &mem);
        let r = fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: 16,
                mmap_offset: 0,
                mmap_handle: small.as_raw_fd(),
            }),
        );
        assert!(r.is_err(), "a log smaller than guest memory was accepted");
        println!("log smaller than guest memory: refused ({r:?})");
        drop((fe, conn));
        assert!(
            wait_until(Duration::from_secs(5), || stats()["refused_requests"] == 4),
            "refused_requests: {}",
            stats()
        );
        let mem2 = GuestMem::new();
        let (_fe, _conn, mut rings) = dpdk_style_session(&sock, 1, &mem2);
        println!("refused_requests counted");
        exercise_rings(&mut rings, "after-bad-logs");
        println!("next session served");
        drop(d);
    });
}
