//! A hostile guest's RX buffers, and port security, against a running daemon.
//!
//! Each test runs a `vhost-pump` daemon in a private network namespace, on a tap or on one end
//! of a veth pair (AF_PACKET), with a control socket, and drives it with the scripted frontend
//! of `testkit::vhost_driver` over a memfd.
//!
//! - Tiny-buffer flood: with MRG_RXBUF acked, the guest posts 32 RX chains, each an indirect
//!   table of 64 one-byte buffers, and full-size frames arrive from the host. They cannot be
//!   placed in the buffers one read of the host port takes: each must be read from the host and
//!   counted as an `oversize` drop, no thread may spin, a second, well-behaved session on the
//!   same port must receive frames, and SIGTERM must end the daemon promptly.
//! - Port security (`--port-security`): guest frames from another source MAC are dropped and
//!   counted as `spoofed_source`; frames from the port's MAC come out of the host port.
//!
//! Need root (network namespaces, taps, veths): skipped otherwise, failed under `CI=true`.

use std::path::Path;
use std::time::{Duration, Instant};

use testkit::netns::{self, ether_frame, Daemon, PacketSocket, ETHERTYPE_EXPERIMENTAL};
use testkit::vhost_driver::*;

/// The guest's MAC (`--mac`).
const GUEST_MAC: [u8; 6] = [0x02, 0x72, 0x78, 0, 0, 1];
/// A host on the wire.
const PEER_MAC: [u8; 6] = [0x02, 0x72, 0x78, 0, 0, 9];
/// Ring size of the test's sessions.
const QSIZE: u16 = 64;
/// vhost-user ring indexes of the first queue pair.
const RX: u32 = 0;
const TX: u32 = 1;
/// The hostile guest's RX chains, and the one-byte buffers in each chain's indirect table.
const TINY_CHAINS: u16 = 32;
const TINY_PER_CHAIN: u16 = 64;
/// Full-size frames injected while the tiny buffers are posted.
const FLOOD: u64 = 200;

/// Where the daemon's port sits and where the test reaches the wire.
#[derive(Clone, Copy, Debug)]
enum Host {
    /// A tap: frames sent into it reach the daemon; what the daemon writes is received on it.
    Tap,
    /// One end of a veth pair (AF_PACKET); the test uses the other end.
    AfPacket,
}

impl Host {
    const PORT_IF: &'static str = "vphrx0";
    const PEER_IF: &'static str = "vphrx1";

    /// Creates the interfaces (in the caller's namespace); returns the daemon's host flag and
    /// the interface the test injects into and sniffs on.
    fn setup(self) -> ((&'static str, &'static str), &'static str) {
        match self {
            // The daemon creates the tap.
            Host::Tap => (("--tap", Self::PORT_IF), Self::PORT_IF),
            Host::AfPacket => {
                netns::ip(&[
                    "link",
                    "add",
                    Self::PORT_IF,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    Self::PEER_IF,
                ]);
                netns::ip(&["link", "set", Self::PORT_IF, "up"]);
                netns::ip(&["link", "set", Self::PEER_IF, "up"]);
                (("--af-packet", Self::PORT_IF), Self::PEER_IF)
            }
        }
    }
}

fn prereqs(test: &str) -> bool {
    if let Some(why) = netns::missing_prereqs() {
        testkit::guest::skip_or_fail(test, &why);
        return false;
    }
    true
}

/// `vhost-pump ctl stats`: the first (only) port's counters of direction `dir`, summed over
/// queues: (frames, drops by reason).
fn stats(control: &Path, dir: &str) -> (u64, std::collections::BTreeMap<String, u64>) {
    let v = netns::ctl_json(control, &["stats"]);
    let mut frames = 0;
    let mut drops = std::collections::BTreeMap::new();
    for q in v[0]["queues"].as_array().unwrap() {
        frames += q[dir]["frames"].as_u64().unwrap();
        for (k, n) in q[dir]["drops"].as_object().unwrap() {
            *drops.entry(k.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    (frames, drops)
}

fn drops_of(control: &Path, dir: &str, reason: &str) -> u64 {
    stats(control, dir).1.get(reason).copied().unwrap_or(0)
}

/// A session like [`Session::good`], with MRG_RXBUF acked too.
fn mergeable_session(socket: &Path) -> std::io::Result<Session> {
    let mut fe = Frontend::connect(socket)?;
    let want = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_NET_F_MRG_RXBUF);
    let offered = fe.get_features()?;
    assert_eq!(offered & want, want, "features offered: {offered:#x}");
    let proto = fe.get_protocol_features()?;
    fe.set_protocol_features(proto & (1 << PROTO_REPLY_ACK))?;
    fe.set_owner()?;
    fe.set_features(want)?;
    let mem = GuestMem::new(SESSION_MEM)?;
    fe.set_mem_table(&[mem.region()], &[mem.fd()])?;
    let mut rings = Vec::new();
    for i in [RX, TX] {
        let r = Ring::new(i, QSIZE);
        r.setup(&fe, &mem)?;
        rings.push(r);
    }
    Ok(Session { fe, mem, rings })
}

/// Posts one RX chain: an indirect table of `count` device-writable buffers of `len` bytes.
fn post_indirect(ring: &mut Ring, mem: &GuestMem, count: u16, len: u32) {
    let table = ring.alloc(16 * usize::from(count));
    for i in 0..count {
        let buf = ring.alloc(len as usize);
        let flags = if i + 1 < count {
            DESC_WRITE | DESC_NEXT
        } else {
            DESC_WRITE
        };
        Ring::set_indirect(mem, table, i, buf, len, flags, i + 1);
    }
    let d = ring.take_desc();
    ring.set_desc(mem, d, table, 16 * u32::from(count), DESC_INDIRECT, 0);
    ring.publish(mem, d);
}

/// A broadcast frame of `len` bytes from the wire's host.
fn wire_frame(len: usize, seed: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..len - 14).map(|i| (i as u8) ^ seed).collect();
    ether_frame([0xff; 6], PEER_MAC, ETHERTYPE_EXPERIMENTAL, &payload)
}

/// CPU share of one core the daemon used over `window`.
fn cpu_share(d: &Daemon, window: Duration) -> f64 {
    let before = d.cpu_time();
    std::thread::sleep(window);
    (d.cpu_time() - before).as_secs_f64() / window.as_secs_f64()
}

fn tiny_buffer_flood(host: Host) {
    netns::in_new_netns(|| {
        let dir = netns::target_workdir(&format!("hostile_rx-{host:?}"));
        let (flag, wire) = host.setup();
        let socket = dir.join("vm.sock");
        let control = dir.join("control.sock");
        let mac = "02:72:78:00:00:01";
        let ctl = control.to_str().unwrap();
        let mut d = Daemon::start_on(
            &socket,
            flag,
            &["--control", ctl, "--mac", mac],
            &dir.join("daemon.log"),
        );
        assert!(netns::wait_until(Duration::from_secs(5), || control.exists()));
        let inject = PacketSocket::sender(wire).unwrap();

        // The hostile session: tiny buffers only.
        let mut bad = mergeable_session(&socket).unwrap();
        {
            let Session { mem, rings, .. } = &mut bad;
            for _ in 0..TINY_CHAINS {
                post_indirect(&mut rings[0], mem, TINY_PER_CHAIN, 1);
            }
            rings[0].kick();
        }
        std::thread::sleep(Duration::from_millis(100));
        let (frames0, drops0) = stats(&control, "rx");
        for i in 0..FLOOD {
            inject.send(&wire_frame(1514, i as u8)).unwrap();
        }
        // Every frame is read from the host and dropped: it does not fit in the buffers one
        // read takes (1024 bytes at most), although the guest posted 2048 bytes in all.
        let want = drops0.get("oversize").copied().unwrap_or(0) + FLOOD;
        let arrived = netns::wait_until(Duration::from_secs(5), || {
            drops_of(&control, "rx", "oversize") >= want
        });
        let share = cpu_share(&d, Duration::from_secs(1));
        assert!(
            share < 0.2,
            "{host:?}: the daemon used {:.0} % of a core with the tiny buffers posted",
            share * 100.0
        );
        let (frames, drops) = stats(&control, "rx");
        assert!(
            arrived && drops.get("oversize") == Some(&want),
            "{host:?}: {FLOOD} frames injected, oversize drops {:?} -> {:?} (want {want})",
            drops0.get("oversize"),
            drops.get("oversize"),
        );
        assert_eq!(frames, frames0, "a frame was placed in the tiny buffers");
        let bad_used = bad.rings[0].used_idx(&bad.mem);
        assert_eq!(bad_used, 0, "tiny buffers used for frames that cannot fit");
        d.assert_alive();

        // The hostile guest goes; a well-behaved one on the same port gets its frames.
        drop(bad);
        let mut good = mergeable_session(&socket)
            .unwrap_or_else(|e| panic!("{host:?}: second session refused: {e}"));
        let bufs: Vec<u64> = {
            let Session { mem, rings, .. } = &mut good;
            let bufs: Vec<u64> = (0..16)
                .map(|_| {
                    let b = rings[0].alloc(2048);
                    let d = rings[0].take_desc();
                    rings[0].set_desc(mem, d, b, 2048, DESC_WRITE, 0);
                    rings[0].publish(mem, d);
                    b
                })
                .collect();
            rings[0].kick();
            bufs
        };
        std::thread::sleep(Duration::from_millis(100));
        let sizes = [60usize, 100, 1000, 1514];
        for (i, &len) in sizes.iter().enumerate() {
            inject.send(&wire_frame(len, 0x40 + i as u8)).unwrap();
        }
        let Session { mem, rings, .. } = &good;
        assert!(
            rings[0].wait_used(mem, sizes.len() as u16, Duration::from_secs(5)),
            "{host:?}: the second session received {} of {} frames",
            rings[0].used_idx(mem),
            sizes.len()
        );
        for (i, &len) in sizes.iter().enumerate() {
            let (id, n) = rings[0].used_elem(mem, i as u16);
            assert_eq!(n as usize, VNET_HDR_LEN + len, "frame {i}");
            let got = mem.read(bufs[id as usize] + VNET_HDR_LEN as u64, len);
            assert_eq!(got, wire_frame(len, 0x40 + i as u8), "frame {i}");
        }
        let share = cpu_share(&d, Duration::from_secs(1));
        assert!(share < 0.2, "{host:?}: {:.0} % of a core", share * 100.0);

        // SIGTERM ends the daemon promptly.
        d.signal(libc::SIGTERM).unwrap();
        let t = Instant::now();
        let exit = d.wait_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            exit.is_some(),
            "{host:?}: the daemon ignored SIGTERM for 5 s"
        );
        println!(
            "{host:?}: {FLOOD} frames dropped as oversize with tiny buffers posted, CPU {:.0} %, \
             second session served, SIGTERM exit in {:?}",
            share * 100.0,
            t.elapsed()
        );
    });
}

#[test]
fn tiny_rx_buffers_cannot_wedge_a_tap_port() {
    if prereqs("tiny_rx_buffers_cannot_wedge_a_tap_port") {
        tiny_buffer_flood(Host::Tap);
    }
}

#[test]
fn tiny_rx_buffers_cannot_wedge_an_af_packet_port() {
    if prereqs("tiny_rx_buffers_cannot_wedge_an_af_packet_port") {
        tiny_buffer_flood(Host::AfPacket);
    }
}

fn port_security(host: Host) {
    netns::in_new_netns(|| {
        let dir = netns::target_workdir(&format!("port_security-{host:?}"));
        let (flag, wire) = host.setup();
        let socket = dir.join("vm.sock");
        let control = dir.join("control.sock");
        let ctl = control.to_str().unwrap();
        let mut d = Daemon::start_on(
            &socket,
            flag,
            &[
                "--control",
                ctl,
                "--mac",
                "02:72:78:00:00:01",
                "--port-security",
            ],
            &dir.join("daemon.log"),
        );
        assert!(netns::wait_until(Duration::from_secs(5), || control.exists()));
        let sniff = PacketSocket::sniffer(wire).unwrap();
        let mut s = Session::good(&socket, &[TX], QSIZE).unwrap();
        let other = [0x02, 0x72, 0x78, 0, 0, 2];
        // (source, sent?): spoofed sources around good ones, including a multicast source and
        // the guest's MAC with one bit flipped.
        let frames = [
            (GUEST_MAC, true),
            (other, false),
            ([0xff; 6], false),
            (GUEST_MAC, true),
            ([0x03, 0x72, 0x78, 0, 0, 1], false),
            (GUEST_MAC, true),
        ];
        for (i, (src, _)) in frames.iter().enumerate() {
            s.send_frame(TX, &tx_frame(*src, 100 + i, i as u8)).unwrap();
        }
        // What came out on the wire, in order.
        let want: Vec<Vec<u8>> = frames
            .iter()
            .enumerate()
            .filter(|(_, (_, sent))| *sent)
            .map(|(i, (src, _))| tx_frame(*src, 100 + i, i as u8)[VNET_HDR_LEN..].to_vec())
            .collect();
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(3);
        while seen.len() < want.len() + 1 && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((n, kind)) = sniff
                .recv(&mut buf, left.min(Duration::from_millis(500)))
                .unwrap()
            else {
                if seen.len() == want.len() {
                    break;
                }
                continue;
            };
            let f = &buf[..n];
            if kind != netns::PACKET_OUTGOING
                && f.len() >= 14
                && f[12..14] == ETHERTYPE_EXPERIMENTAL.to_be_bytes()
            {
                seen.push(f.to_vec());
            }
        }
        assert_eq!(seen, want, "{host:?}: frames on the wire");
        let (frames_sent, drops) = stats(&control, "tx");
        assert_eq!(frames_sent, 3);
        assert_eq!(drops.get("spoofed_source"), Some(&3), "{drops:?}");
        assert_eq!(drops.values().sum::<u64>(), 3, "{drops:?}");
        d.assert_alive();
        println!("{host:?}: 3 frames from the guest's MAC on the wire, 3 spoofed ones counted");
    });
}

#[test]
fn port_security_drops_spoofed_frames_on_a_tap() {
    if prereqs("port_security_drops_spoofed_frames_on_a_tap") {
        port_security(Host::Tap);
    }
}

#[test]
fn port_security_drops_spoofed_frames_on_af_packet() {
    if prereqs("port_security_drops_spoofed_frames_on_af_packet") {
        port_security(Host::AfPacket);
    }
}
