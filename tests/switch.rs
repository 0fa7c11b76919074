//! The userspace switch against a running daemon: vhost-user ports of one `[[switch]]`, driven
//! by the scripted frontend of `testkit::vhost_driver` over memfd guest memory, with frames
//! checked byte for byte where they arrive and the switch's counters (`ctl stats`) and
//! forwarding table (`ctl fdb`) checked against what was sent.
//!
//! - Delivery: flooding of unknown and group destinations to every other port, learning, known
//!   unicast to its one port only, never back to the sender, every frame exactly once.
//! - VLANs: access ports only see their VLAN; a trunk gets frames tagged and its tagged frames
//!   leave untagged; frames a port may not send are refused and counted.
//! - A MAC flood from random sources keeps the table within `fdb_max` and the addresses
//!   learned before it forwarding.
//! - Port security on a switch port.
//! - Ports removed, added again and reconnected while traffic flows; a frame for a port whose
//!   frontend is gone is dropped (`drop_not_running`), not kept for the next session.
//! - A tap uplink: frames from a port leave through it, frames injected into it reach the port.
//! - An AF_PACKET uplink on one end of a veth pair: the same, seen from the far end.
//!
//! Each test runs the daemon (`--config` with a `[[switch]]`, `--control`) in a private network
//! namespace (`testkit::netns`); the tests run one at a time. Need root (network namespaces, a
//! tap): skipped otherwise, failed under `CI=true`. Run:
//! `cargo test --release --test switch -- --nocapture`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use testkit::netns::{
    self, can_run, daemon_bin, ether_frame, in_new_netns, wait_until, Daemon, PacketSocket,
    ETHERTYPE_EXPERIMENTAL, PACKET_OUTGOING,
};
use testkit::vhost_driver::*;

/// vhost-user ring indexes of the first queue pair.
const RX: u32 = 0;
const TX: u32 = 1;
/// Ring size of the test's sessions.
const QSIZE: u16 = 64;
/// RX buffers each session keeps posted: descriptor `i` is always buffer `i`.
const RX_BUFS: u16 = 64;
/// Size of one RX buffer (`RX_BUFS` of them fill the RX ring's buffer area exactly).
const RX_BUF_LEN: u32 = 2048;
/// What a receiver's virtio-net header must be: the sender's all-zero 10 bytes and
/// `num_buffers` = 1 (VERSION_1 without MRG_RXBUF).
const RX_HDR: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
/// How long nothing more must arrive before a port is taken to have received everything.
const QUIET: Duration = Duration::from_millis(150);
/// The broadcast address.
const BCAST: [u8; 6] = [0xff; 6];

/// The tests share two cores: one daemon at a time keeps their timing meaningful.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the test lock (a test that panicked holding it does not stop the others).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The MAC of test port number `n`.
fn mac(n: u8) -> [u8; 6] {
    [0x02, 0x73, 0x77, 0x00, 0x00, n]
}

/// A MAC as `ctl` and config files write it.
fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An Ethernet frame (no virtio-net header), zero-padded to 60 bytes.
fn frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    ether_frame(dst, src, ethertype, payload)
}

/// A payload that names its frame: `id` big-endian, then `len - 4` bytes derived from it.
fn payload(id: u32, len: usize) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend((0..len.saturating_sub(4)).map(|i| (i as u8).wrapping_mul(7) ^ (id as u8)));
    p
}

/// An experimental-EtherType frame from `src` to `dst` carrying [`payload`] `id`, its length
/// varying with `id`.
fn data(dst: [u8; 6], src: [u8; 6], id: u32) -> Vec<u8> {
    frame(
        dst,
        src,
        ETHERTYPE_EXPERIMENTAL,
        &payload(id, 46 + (id as usize % 5) * 37),
    )
}

/// `f` with an 802.1Q tag of VLAN `vid` (priority 0) inserted after the addresses.
fn tagged(f: &[u8], vid: u16) -> Vec<u8> {
    let mut t = f[..12].to_vec();
    t.extend_from_slice(&[0x81, 0x00]);
    t.extend_from_slice(&vid.to_be_bytes());
    t.extend_from_slice(&f[12..]);
    t
}

/// One frame in a line: addresses, EtherType or tag, length and the first payload bytes.
fn describe(f: &[u8]) -> String {
    if f.len() < 14 {
        return format!("runt {f:02x?}");
    }
    let at = if f[12..14] == [0x81, 0x00] { 18 } else { 14 };
    format!(
        "{} <- {} [{:02x?}] len {} payload {:02x?}",
        mac_text(f[0..6].try_into().unwrap()),
        mac_text(f[6..12].try_into().unwrap()),
        &f[12..at.min(f.len())],
        f.len(),
        &f[at.min(f.len())..(at + 6).min(f.len())]
    )
}

/// [`describe`] for a list of frames, one per line.
fn describe_all(frames: &[Vec<u8>]) -> String {
    frames
        .iter()
        .map(|f| format!("\n    {}", describe(f)))
        .collect()
}

/// A daemon serving one or more switches and their ports from a config file, with a control
/// socket, in the caller's network namespace.
struct Switchd {
    daemon: Daemon,
    dir: PathBuf,
    control: PathBuf,
}

impl Switchd {
    /// Writes `config(dir)` to a config file in a fresh work directory (kept in the target
    /// dir, with the daemon's log), starts the daemon on it and waits for its control socket
    /// (made after every port of the file has started).
    fn start(tag: &str, config: impl FnOnce(&Path) -> String) -> Switchd {
        let dir = netns::target_workdir(&format!("switch-{tag}"));
        let control = dir.join("control.sock");
        let file = dir.join("switch.toml");
        std::fs::write(&file, config(&dir)).unwrap();
        let log = dir.join("daemon.log");
        let mut daemon = Daemon::spawn(
            &[
                "--config",
                file.to_str().unwrap(),
                "--control",
                control.to_str().unwrap(),
            ],
            &log,
        )
        .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", daemon_bin()));
        let up = wait_until(Duration::from_secs(10), || {
            control.exists() || daemon.try_wait().is_ok_and(|s| s.is_some())
        });
        daemon.assert_alive();
        assert!(
            up && control.exists(),
            "the daemon did not come up\n{}",
            daemon.log_text()
        );
        Switchd {
            daemon,
            dir,
            control,
        }
    }

    /// The socket of port `name` (see [`port_toml`]).
    fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// `vhost-pump ctl ARGS` answered as JSON.
    #[track_caller]
    fn json(&self, args: &[&str]) -> serde_json::Value {
        netns::ctl_json(&self.control, args)
    }

    /// `vhost-pump ctl ARGS` that answers nothing; fails the test when it fails.
    #[track_caller]
    fn ctl(&self, args: &[&str]) {
        netns::ctl_ok(&self.control, args);
    }

    /// Every port's switch counters (the `"switch"` object of `ctl stats`), by port name,
    /// without the `switch` and `member` names.
    #[track_caller]
    fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        netns::switch_counters(&self.control)
    }

    /// Switch counter `name` of port `port`.
    #[track_caller]
    fn counter(&self, port: &str, name: &str) -> u64 {
        let all = self.counters();
        let c = all
            .get(port)
            .unwrap_or_else(|| panic!("no switch port {port} in {all:?}"));
        *c.get(name)
            .unwrap_or_else(|| panic!("{port}: no counter {name} in {c:?}"))
    }

    /// Port `port`'s `dir` ("rx" or "tx") drop counter `reason`, summed over its queues.
    #[track_caller]
    fn queue_drops(&self, port: &str, dir: &str, reason: &str) -> u64 {
        let v = self.json(&["stats", port]);
        v[0]["queues"]
            .as_array()
            .unwrap_or_else(|| panic!("stats {port}: {v}"))
            .iter()
            .map(|q| q[dir]["drops"][reason].as_u64().unwrap())
            .sum()
    }

    /// Whether a frontend is connected to port `port`.
    fn connected(&self, port: &str) -> bool {
        self.json(&["stats", port])[0]["connected"] == true
    }

    /// The forwarding table of switch `sw` as `(vlan, mac, member)`, in `ctl fdb`'s order.
    #[track_caller]
    fn fdb(&self, sw: &str) -> Vec<(u64, String, String)> {
        let v = self.json(&["fdb", sw]);
        v.as_array()
            .unwrap_or_else(|| panic!("fdb: {v}"))
            .iter()
            .map(|e| {
                (
                    e["vlan"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("fdb entry {e}")),
                    e["mac"].as_str().unwrap_or_default().to_string(),
                    e["member"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

/// A `[[port]]` table for port `name` on switch `sw` with MAC `m`, its socket
/// `DIR/NAME.sock`, and `extra` TOML lines.
fn port_toml(dir: &Path, name: &str, sw: &str, m: [u8; 6], extra: &str) -> String {
    format!(
        "\n[[port]]\nname = \"{name}\"\nsocket = \"{}/{name}.sock\"\n\
         host = {{ kind = \"switch\", name = \"{sw}\" }}\nmac = \"{}\"\n{extra}\n",
        dir.display(),
        mac_text(m)
    )
}

/// The guest side of one port: a frontend session with RX and TX rings, and every RX buffer
/// posted.
struct Vm {
    name: &'static str,
    s: Session,
    /// Entries of the RX used ring read so far.
    seen: u16,
}

/// Guest address of RX buffer `id`.
fn rx_buf(id: u16) -> u64 {
    BUF_BASE + u64::from(id) * u64::from(RX_BUF_LEN)
}

/// Posts RX buffers `ids` (descriptor `i` is buffer `i`, device-writable) and kicks.
fn post_rx(s: &mut Session, ids: impl IntoIterator<Item = u16>) {
    let Session { mem, rings, .. } = s;
    let ring = rings.iter_mut().find(|r| r.index == RX).expect("RX ring");
    let mut any = false;
    for id in ids {
        ring.set_desc(mem, id, rx_buf(id), RX_BUF_LEN, DESC_WRITE, 0);
        ring.publish(mem, id);
        any = true;
    }
    if any {
        ring.kick();
    }
}

impl Vm {
    /// Connects to `socket` like a VMM, sets up RX and TX and posts all RX buffers.
    fn connect(name: &'static str, socket: &Path) -> Vm {
        let mut s = Session::good(socket, &[RX, TX], QSIZE)
            .unwrap_or_else(|e| panic!("{name}: session on {}: {e}", socket.display()));
        post_rx(&mut s, 0..RX_BUFS);
        Vm { name, s, seen: 0 }
    }

    /// Sends one Ethernet frame (a zero virtio-net header in front) and waits for the device to
    /// take it.
    #[track_caller]
    fn send(&mut self, eth: &[u8]) {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(eth);
        if let Err(e) = self.s.send_frame(TX, &f) {
            panic!("{}: send {}: {e}", self.name, describe(eth));
        }
    }

    /// Sends `frames` a ring's worth per kick, waiting for each batch to be taken.
    #[track_caller]
    fn send_burst(&mut self, frames: &[Vec<u8>]) {
        let Session { mem, rings, .. } = &mut self.s;
        let ring = rings.iter_mut().find(|r| r.index == TX).expect("TX ring");
        for batch in frames.chunks(usize::from(QSIZE)) {
            for eth in batch {
                let mut f = vec![0u8; VNET_HDR_LEN];
                f.extend_from_slice(eth);
                ring.push_tx(mem, &f);
            }
            ring.kick();
            let target = ring.avail_idx();
            assert!(
                ring.wait_used(mem, target, Duration::from_secs(5)),
                "{}: TX used idx {} never reached {target}",
                self.name,
                ring.used_idx(mem)
            );
        }
    }

    /// The frames received since the last call (after the virtio-net header, which must be
    /// [`RX_HDR`]), their buffers posted again.
    #[track_caller]
    fn received(&mut self) -> Vec<Vec<u8>> {
        let Session { mem, rings, .. } = &mut self.s;
        let ring = rings.iter_mut().find(|r| r.index == RX).expect("RX ring");
        let used = ring.used_idx(mem);
        let mut frames = Vec::new();
        let mut done = Vec::new();
        while self.seen != used {
            let (id, len) = ring.used_elem(mem, self.seen);
            self.seen = self.seen.wrapping_add(1);
            assert!(
                id < u32::from(RX_BUFS) && len as usize >= VNET_HDR_LEN && len <= RX_BUF_LEN,
                "{}: used entry id {id} len {len}",
                self.name
            );
            let id = id as u16;
            let b = mem.read(rx_buf(id), len as usize);
            assert_eq!(
                b[..VNET_HDR_LEN],
                RX_HDR,
                "{}: virtio-net header of {}",
                self.name,
                describe(&b[VNET_HDR_LEN..])
            );
            frames.push(b[VNET_HDR_LEN..].to_vec());
            done.push(id);
        }
        post_rx(&mut self.s, done);
        frames
    }

    /// Frames received until there are at least `n` or `timeout` passes.
    fn collect(&mut self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut got = self.received();
        while got.len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            got.extend(self.received());
        }
        got
    }

    /// Receives until nothing has arrived for `QUIET` (at most 10 s); returns how many frames.
    fn drain(&mut self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        let mut last = Instant::now();
        while last.elapsed() < QUIET && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
            let k = self.received().len();
            if k > 0 {
                n += k;
                last = Instant::now();
            }
        }
        n
    }
}

/// Checks that every port of `vms` receives exactly the frames of `want` (same index), in
/// that order, byte for byte, and nothing more within [`QUIET`].
#[track_caller]
fn expect_frames(vms: &mut [&mut Vm], want: &[Vec<Vec<u8>>], what: &str) {
    assert_eq!(vms.len(), want.len());
    let mut got: Vec<Vec<Vec<u8>>> = vms
        .iter_mut()
        .zip(want)
        .map(|(vm, w)| vm.collect(w.len(), Duration::from_secs(5)))
        .collect();
    std::thread::sleep(QUIET);
    for (vm, g) in vms.iter_mut().zip(&mut got) {
        g.extend(vm.received());
    }
    for ((vm, g), w) in vms.iter().zip(&got).zip(want) {
        assert!(
            g == w,
            "{what}: port {} received {} frames, expected {}:\n  got:{}\n  expected:{}",
            vm.name,
            g.len(),
            w.len(),
            describe_all(g),
            describe_all(w)
        );
    }
}

/// Checks the forwarding counters of every named port and that every drop counter and
/// `learn_refused` is zero.
#[track_caller]
fn expect_counters(d: &Switchd, want: &BTreeMap<&str, [u64; 4]>, what: &str) {
    let all = d.counters();
    for (port, w) in want {
        let c = all
            .get(*port)
            .unwrap_or_else(|| panic!("{what}: no switch port {port} in {all:?}"));
        let got = ["forwarded", "flooded", "received", "learned"].map(|k| c[k]);
        assert_eq!(
            &got, w,
            "{what}: port {port} [forwarded, flooded, received, learned]; all: {c:?}"
        );
        for (k, n) in c {
            if k.starts_with("drop_") || k == "learn_refused" {
                assert_eq!(*n, 0, "{what}: port {port} {k}; all: {c:?}");
            }
        }
    }
}

#[test]
fn two_and_four_ports_deliver_exactly_once() {
    if !can_run("two_and_four_ports_deliver_exactly_once") {
        return;
    }
    let _serial = serial();
    in_new_netns(|| {
        const NAMES: [&str; 4] = ["a", "b", "c", "d"];
        let d = Switchd::start("deliver", |dir| {
            let mut t = "[[switch]]\nname = \"sw0\"\n".to_string();
            for (i, n) in NAMES.iter().enumerate() {
                t += &port_toml(dir, n, "sw0", mac(i as u8 + 1), "");
            }
            t
        });
        let [mut a, mut b, mut c, mut dd] = NAMES.map(|n| Vm::connect(n, &d.socket(n)));
        let macs: [[u8; 6]; 4] = [mac(1), mac(2), mac(3), mac(4)];
        // [forwarded, flooded, received, learned] as the switch should count them.
        let mut want: BTreeMap<&str, [u64; 4]> = NAMES.iter().map(|n| (*n, [0; 4])).collect();
        let (fwd, flood, recv, learn) = (0, 1, 2, 3);
        let none = Vec::<Vec<u8>>::new;

        // (i) Nothing learned yet: a's frame for b floods to b, c and d, not back to a.
        let f = data(macs[1], macs[0], 1);
        a.send(&f);
        expect_frames(
            &mut [&mut a, &mut b, &mut c, &mut dd],
            &[none(), vec![f.clone()], vec![f.clone()], vec![f.clone()]],
            "(i) unknown unicast",
        );
        want.get_mut("a").unwrap()[flood] += 1;
        want.get_mut("a").unwrap()[learn] += 1;
        for p in ["b", "c", "d"] {
            want.get_mut(p).unwrap()[recv] += 1;
        }
        expect_counters(&d, &want, "(i)");

        // (ii) a was learned: b's answer goes to a only.
        let f = data(macs[0], macs[1], 2);
        b.send(&f);
        expect_frames(
            &mut [&mut a, &mut b, &mut c, &mut dd],
            &[vec![f], none(), none(), none()],
            "(ii) known unicast",
        );
        want.get_mut("b").unwrap()[fwd] += 1;
        want.get_mut("b").unwrap()[learn] += 1;
        want.get_mut("a").unwrap()[recv] += 1;
        expect_counters(&d, &want, "(ii)");
        let fdb = d.fdb("sw0");
        assert_eq!(
            fdb,
            vec![
                (0, mac_text(macs[0]), "a".to_string()),
                (0, mac_text(macs[1]), "b".to_string()),
            ],
            "fdb after a and b sent"
        );

        // (iii) 100 frames a -> b: all of them, in order, at b only.
        let frames: Vec<Vec<u8>> = (0..100).map(|i| data(macs[1], macs[0], 1000 + i)).collect();
        for f in &frames {
            a.send(f);
        }
        expect_frames(
            &mut [&mut a, &mut b, &mut c, &mut dd],
            &[none(), frames, none(), none()],
            "(iii) 100 frames a -> b",
        );
        want.get_mut("a").unwrap()[fwd] += 100;
        want.get_mut("b").unwrap()[recv] += 100;
        expect_counters(&d, &want, "(iii)");

        // c and d introduce themselves to a (known), then every ordered pair exchanges one
        // frame: each arrives at its destination only, once.
        let mut vms = [&mut a, &mut b, &mut c, &mut dd];
        for x in [2usize, 3] {
            let f = data(macs[0], macs[x], 2000 + x as u32);
            vms[x].send(&f);
            let mut w = vec![none(), none(), none(), none()];
            w[0].push(f);
            expect_frames(
                &mut vms,
                &w,
                &format!("{} introduces itself to a", NAMES[x]),
            );
            want.get_mut(NAMES[x]).unwrap()[fwd] += 1;
            want.get_mut(NAMES[x]).unwrap()[learn] += 1;
            want.get_mut("a").unwrap()[recv] += 1;
        }
        assert_eq!(
            d.fdb("sw0"),
            (0..4)
                .map(|i| (0, mac_text(macs[i]), NAMES[i].to_string()))
                .collect::<Vec<_>>(),
            "fdb after all four sent"
        );
        let mut w = vec![none(), none(), none(), none()];
        for x in 0..4 {
            for y in 0..4 {
                if x == y {
                    continue;
                }
                let f = data(macs[y], macs[x], 3000 + (x * 4 + y) as u32);
                vms[x].send(&f);
                w[y].push(f);
                want.get_mut(NAMES[x]).unwrap()[fwd] += 1;
                want.get_mut(NAMES[y]).unwrap()[recv] += 1;
            }
        }
        expect_frames(&mut vms, &w, "(iv) every ordered pair");
        expect_counters(&d, &want, "(iv)");

        // (v) A broadcast from c reaches a, b and d once each, not c.
        let f = data(BCAST, macs[2], 4000);
        vms[2].send(&f);
        let mut w = vec![vec![f.clone()]; 4];
        w[2].clear();
        expect_frames(&mut vms, &w, "(v) broadcast from c");
        want.get_mut("c").unwrap()[flood] += 1;
        for p in ["a", "b", "d"] {
            want.get_mut(p).unwrap()[recv] += 1;
        }
        expect_counters(&d, &want, "(v)");

        // (vi) A frame for an address learned on its sender is not sent back (nor anywhere):
        // dropped and counted.
        let f = data(macs[3], macs[3], 5000);
        vms[3].send(&f);
        expect_frames(&mut vms, &[none(), none(), none(), none()], "(vi) d -> d");
        assert_eq!(d.counter("d", "drop_same_member"), 1, "(vi)");
        println!("four ports: every frame delivered once, counters {want:?}");
        drop(d);
    });
}

#[test]
fn vlans_isolate_and_trunks_tag() {
    if !can_run("vlans_isolate_and_trunks_tag") {
        return;
    }
    let _serial = serial();
    in_new_netns(|| {
        let d = Switchd::start("vlan", |dir| {
            "[[switch]]\nname = \"sw0\"\n".to_string()
                + &port_toml(dir, "a", "sw0", mac(1), "vlan = 10")
                + &port_toml(dir, "b", "sw0", mac(2), "vlan = 10")
                + &port_toml(dir, "c", "sw0", mac(3), "vlan = 20")
                + &port_toml(dir, "t", "sw0", mac(4), "trunk = [10, 20]")
        });
        let [mut a, mut b, mut c, mut t] =
            ["a", "b", "c", "t"].map(|n| Vm::connect(n, &d.socket(n)));
        let none = Vec::<Vec<u8>>::new;
        let drop_vlan = |p: &str| d.counter(p, "drop_vlan");

        // A broadcast from a (VLAN 10): b untagged, t tagged with VID 10, not c.
        let f = data(BCAST, mac(1), 1);
        a.send(&f);
        let mut vms = [&mut a, &mut b, &mut c, &mut t];
        let got_t = vms[3].collect(1, Duration::from_secs(5));
        assert_eq!(got_t.len(), 1, "t: {}", describe_all(&got_t));
        let g = &got_t[0];
        assert_eq!(g.len(), f.len() + 4, "t: {}", describe(g));
        assert_eq!(g[..12], f[..12], "t: addresses");
        assert_eq!(g[12..14], [0x81, 0x00], "t: TPID");
        assert_eq!(u16::from_be_bytes([g[14], g[15]]) & 0x0fff, 10, "t: VID");
        assert_eq!(g[14] >> 5, 0, "t: a pushed tag has priority 0");
        assert_eq!(g[16..], f[12..], "t: the rest of the frame");
        expect_frames(
            &mut vms,
            &[none(), vec![f.clone()], none(), none()],
            "broadcast from a on VLAN 10",
        );

        // A tagged broadcast from t on VLAN 20 reaches c untagged, exactly the frame minus
        // the tag, and not a or b.
        let plain = data(BCAST, mac(4), 2);
        let f = tagged(&plain, 20);
        vms[3].send(&f);
        expect_frames(
            &mut vms,
            &[none(), none(), vec![plain], none()],
            "tagged broadcast from t on VLAN 20",
        );

        // Known unicast over the trunk: t -> a on VLAN 10 arrives untagged at a only.
        let plain = data(mac(1), mac(4), 3);
        vms[3].send(&tagged(&plain, 10));
        expect_frames(
            &mut vms,
            &[vec![plain], none(), none(), none()],
            "t -> a on VLAN 10",
        );

        // Learning is per VLAN: a's MAC is unknown on VLAN 20, so c's frame to it floods on
        // VLAN 20 (to t, tagged 20) and never reaches a.
        let plain = data(mac(1), mac(3), 4);
        vms[2].send(&plain);
        expect_frames(
            &mut vms,
            &[none(), none(), none(), vec![tagged(&plain, 20)]],
            "c -> a's MAC on VLAN 20",
        );
        let fdb = d.fdb("sw0");
        for entry in [
            (10, mac_text(mac(1)), "a".to_string()),
            (10, mac_text(mac(4)), "t".to_string()),
            (20, mac_text(mac(3)), "c".to_string()),
            (20, mac_text(mac(4)), "t".to_string()),
        ] {
            assert!(fdb.contains(&entry), "{entry:?} not in {fdb:?}");
        }
        assert_eq!(fdb.len(), 4, "{fdb:?}");

        // Frames a port may not send are refused and counted: untagged from the trunk, of a
        // VLAN the trunk does not carry, tagged from an access port.
        let (t0, a0) = (drop_vlan("t"), drop_vlan("a"));
        vms[3].send(&data(BCAST, mac(4), 5));
        assert_eq!(drop_vlan("t"), t0 + 1, "untagged frame from the trunk");
        vms[3].send(&tagged(&data(BCAST, mac(4), 6), 30));
        assert_eq!(drop_vlan("t"), t0 + 2, "VLAN 30 from a trunk of 10 and 20");
        vms[0].send(&tagged(&data(BCAST, mac(1), 7), 10));
        assert_eq!(drop_vlan("a"), a0 + 1, "tagged frame from an access port");
        expect_frames(
            &mut vms,
            &[none(), none(), none(), none()],
            "refused frames",
        );
        let all = d.counters();
        assert_eq!(all["b"]["drop_vlan"] + all["c"]["drop_vlan"], 0, "{all:?}");
        assert_eq!(
            [
                all["a"]["flooded"],
                all["t"]["flooded"],
                all["t"]["forwarded"],
                all["c"]["flooded"]
            ],
            [1, 1, 1, 1],
            "{all:?}"
        );
        assert_eq!(
            [
                all["a"]["received"],
                all["b"]["received"],
                all["c"]["received"],
                all["t"]["received"]
            ],
            [1, 1, 1, 2],
            "{all:?}"
        );
        // The refused frames are the port's TX drops too (the host side rejected them).
        assert_eq!(
            [
                d.queue_drops("t", "tx", "host_rejected"),
                d.queue_drops("a", "tx", "host_rejected")
            ],
            [2, 1],
            "TX host_rejected drops of t and a"
        );
        println!("VLANs: access ports isolated, trunk tagged both ways, 3 refused frames counted");
        drop(d);
    });
}

/// Frames port f sends from random source MACs in the MAC-flood test.
const MAC_FLOOD: u32 = 100_000;

#[test]
fn mac_flood_stays_bounded_and_others_keep_forwarding() {
    if !can_run("mac_flood_stays_bounded_and_others_keep_forwarding") {
        return;
    }
    let _serial = serial();
    in_new_netns(|| {
        let mut d = Switchd::start("macflood", |dir| {
            "[[switch]]\nname = \"sw0\"\nfdb_max = 256\nflood_pps = 0\n".to_string()
                + &port_toml(dir, "a", "sw0", mac(1), "")
                + &port_toml(dir, "b", "sw0", mac(2), "")
                + &port_toml(dir, "f", "sw0", mac(6), "")
        });
        let [mut a, mut b, mut f] = ["a", "b", "f"].map(|n| Vm::connect(n, &d.socket(n)));
        // a and b are learned before the flood.
        let x = data(mac(2), mac(1), 1);
        a.send(&x);
        let y = data(mac(1), mac(2), 2);
        b.send(&y);
        expect_frames(
            &mut [&mut a, &mut b, &mut f],
            &[vec![y], vec![x.clone()], vec![x]],
            "a and b introduce themselves",
        );

        // Distinct, random-looking locally administered unicast sources (an odd multiplier
        // is a bijection of u32).
        let frames: Vec<Vec<u8>> = (0..MAC_FLOOD)
            .map(|i| {
                let r = i.wrapping_mul(0x9e37_79b1).to_be_bytes();
                let src = [0x0a, 0xf1, r[0], r[1], r[2], r[3]];
                frame(BCAST, src, ETHERTYPE_EXPERIMENTAL, &payload(i, 46))
            })
            .collect();
        let t = Instant::now();
        f.send_burst(&frames);
        let took = t.elapsed();
        d.daemon.assert_alive();
        let fdb = d.fdb("sw0");
        assert!(
            fdb.len() <= 256,
            "fdb has {} entries, fdb_max 256",
            fdb.len()
        );
        for (m, member) in [(mac(1), "a"), (mac(2), "b")] {
            assert!(
                fdb.contains(&(0, mac_text(m), member.to_string())),
                "{member}'s address was pushed out of the table by the flood"
            );
        }
        let all = d.counters();
        let cf = &all["f"];
        assert!(
            cf["learn_refused"] >= u64::from(MAC_FLOOD) - 256,
            "f learn_refused: {cf:?}"
        );
        assert_eq!(
            cf["learned"] + cf["learn_refused"],
            u64::from(MAC_FLOOD),
            "each of f's sources learned or refused: {cf:?}"
        );
        assert_eq!(cf["flooded"], u64::from(MAC_FLOOD), "{cf:?}");
        for p in ["a", "b"] {
            let c = &all[p];
            assert_eq!(
                c["received"] + c["drop_inbox_full"],
                u64::from(MAC_FLOOD) + 1,
                "{p}: every flooded frame queued or dropped for a full inbox: {c:?}"
            );
        }

        // The flood is drained; a's next frame reaches b, and only b.
        let (na, nb) = (a.drain(), b.drain());
        let x = data(mac(2), mac(1), 3);
        a.send(&x);
        expect_frames(
            &mut [&mut a, &mut b, &mut f],
            &[vec![], vec![x], vec![]],
            "a -> b after the flood",
        );
        let fwd = d.counter("a", "forwarded");
        assert_eq!(fwd, 1, "a -> b forwarded, not flooded");
        println!(
            "{MAC_FLOOD} frames from random sources in {took:?}: fdb {} entries, f learned {} \
             refused {}, a drained {na} b {nb} ({} / {} dropped for full inboxes); a -> b \
             still forwarded",
            fdb.len(),
            cf["learned"],
            cf["learn_refused"],
            all["a"]["drop_inbox_full"],
            all["b"]["drop_inbox_full"],
        );
        drop(d);
    });
}

#[test]
fn spoofed_source_is_dropped_with_port_security() {
    if !can_run("spoofed_source_is_dropped_with_port_security") {
        return;
    }
    let _serial = serial();
    in_new_netns(|| {
        let d = Switchd::start("portsec", |dir| {
            "[[switch]]\nname = \"sw0\"\n".to_string()
                + &port_toml(dir, "a", "sw0", mac(1), "port_security = true")
                + &port_toml(dir, "b", "sw0", mac(2), "")
                + &port_toml(dir, "c", "sw0", mac(3), "")
        });
        let [mut a, mut b, mut c] = ["a", "b", "c"].map(|n| Vm::connect(n, &d.socket(n)));
        // b and c are known, so a spoofed unicast would be forwarded if it got through.
        let y = data(BCAST, mac(2), 1);
        b.send(&y);
        expect_frames(
            &mut [&mut a, &mut b, &mut c],
            &[vec![y.clone()], vec![], vec![y]],
            "b's broadcast",
        );
        let z = data(BCAST, mac(3), 1);
        c.send(&z);
        expect_frames(
            &mut [&mut a, &mut b, &mut c],
            &[vec![z.clone()], vec![z], vec![]],
            "c's broadcast",
        );
        let spoofed = [
            data(mac(2), mac(9), 2),
            data(BCAST, mac(9), 3),
            data(BCAST, [0x02, 0x73, 0x77, 0, 0, 0x81], 4),
        ];
        for f in &spoofed {
            a.send(f);
        }
        expect_frames(
            &mut [&mut a, &mut b, &mut c],
            &[vec![], vec![], vec![]],
            "spoofed frames",
        );
        assert_eq!(d.queue_drops("a", "tx", "spoofed_source"), 3);
        let ca = d.counters()["a"].clone();
        assert_eq!(
            [ca["forwarded"], ca["flooded"], ca["learned"]],
            [0, 0, 0],
            "spoofed frames reached the switch: {ca:?}"
        );
        assert!(
            !d.fdb("sw0").iter().any(|e| e.1 == mac_text(mac(9))),
            "the spoofed source was learned"
        );
        // a's own MAC goes through.
        let x = data(mac(2), mac(1), 5);
        a.send(&x);
        expect_frames(
            &mut [&mut a, &mut b, &mut c],
            &[vec![], vec![x], vec![]],
            "a's own frame",
        );
        assert_eq!(d.queue_drops("a", "tx", "spoofed_source"), 3);
        assert_eq!(d.counter("a", "forwarded"), 1);
        // One burst to two receivers: each frame leaves with its own checked header and
        // addresses, although the switch copies the burst only at its end.
        let burst: Vec<Vec<u8>> = (0..16)
            .map(|i| data(mac(2 + (i % 2) as u8), mac(1), 10 + i))
            .collect();
        a.send_burst(&burst);
        let (to_b, to_c): (Vec<_>, Vec<_>) = burst.into_iter().partition(|f| f[5] == 2);
        expect_frames(
            &mut [&mut a, &mut b, &mut c],
            &[vec![], to_b, to_c],
            "a burst to b and c",
        );
        println!(
            "port security: 3 spoofed frames dropped and counted, a's own frames delivered, a \
             burst to two receivers arrives intact"
        );
        drop(d);
    });
}

#[test]
fn port_removal_and_reconnect_mid_traffic() {
    if !can_run("port_removal_and_reconnect_mid_traffic") {
        return;
    }
    let _serial = serial();
    in_new_netns(|| {
        let mut d = Switchd::start("reconnect", |dir| {
            "[[switch]]\nname = \"sw0\"\n".to_string()
                + &port_toml(dir, "a", "sw0", mac(1), "")
                + &port_toml(dir, "b", "sw0", mac(2), "")
                + &port_toml(dir, "c", "sw0", mac(3), "")
        });
        let [mut a, mut b, mut c] = ["a", "b", "c"].map(|n| Vm::connect(n, &d.socket(n)));
        let x = data(mac(2), mac(1), 1);
        a.send(&x);
        let y = data(mac(1), mac(2), 2);
        b.send(&y);
        expect_frames(
            &mut [&mut a, &mut b, &mut c],
            &[vec![y], vec![x.clone()], vec![x]],
            "a and b exchange frames",
        );

        // b is removed while a keeps sending to it: before, a's frames are forwarded to b;
        // after, b's address is forgotten and they flood to c.
        let before = d.counters()["a"].clone();
        let removed = AtomicBool::new(false);
        let sent = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                let mut sent = Vec::new();
                let mut after = 0;
                while after < 50 && sent.len() < 900 {
                    if removed.load(Ordering::SeqCst) {
                        after += 1;
                    }
                    let f = data(mac(2), mac(1), 10_000 + sent.len() as u32);
                    a.send(&f);
                    sent.push(f);
                    std::thread::sleep(Duration::from_micros(500));
                }
                sent
            });
            std::thread::sleep(Duration::from_millis(50));
            d.ctl(&["remove", "b"]);
            removed.store(true, Ordering::SeqCst);
            sender.join().unwrap()
        });
        assert!(
            b.s.fe.closed_by_peer(Duration::from_secs(5)),
            "b's session outlived the port"
        );
        drop(b);
        let fdb = d.fdb("sw0");
        assert!(
            !fdb.iter().any(|e| e.1 == mac_text(mac(2))),
            "b's address outlived the port: {fdb:?}"
        );
        let after = d.counters()["a"].clone();
        let flooded = after["flooded"] - before["flooded"];
        let forwarded = after["forwarded"] - before["forwarded"];
        assert_eq!(
            flooded + forwarded,
            sent.len() as u64,
            "a's frames while b went: {before:?} -> {after:?}"
        );
        assert!(
            flooded >= 50,
            "{flooded} of a's frames flooded after b went"
        );
        // c got exactly the flooded ones: the tail of what a sent.
        let tail = sent[sent.len() - flooded as usize..].to_vec();
        expect_frames(
            &mut [&mut a, &mut c],
            &[vec![], tail],
            "a's frames for b's address after b was removed",
        );
        d.daemon.assert_alive();

        // c still gets a's broadcasts.
        let z = data(BCAST, mac(1), 3);
        a.send(&z);
        expect_frames(&mut [&mut a, &mut c], &[vec![], vec![z]], "a's broadcast");

        // b comes back on the same socket; a -> b delivers again (flooded until b is learned
        // anew), and b -> a.
        let sock_b = d.socket("b");
        d.ctl(&[
            "add",
            "--name",
            "b",
            "--socket",
            sock_b.to_str().unwrap(),
            "--switch",
            "sw0",
            "--mac",
            &mac_text(mac(2)),
        ]);
        let mut b = Vm::connect("b", &sock_b);
        let x = data(mac(2), mac(1), 4);
        a.send(&x);
        let y = data(mac(1), mac(2), 5);
        b.send(&y);
        expect_frames(
            &mut [&mut a, &mut b, &mut c],
            &[vec![y], vec![x.clone()], vec![x]],
            "a and b after b was added again",
        );
        let x = data(mac(2), mac(1), 6);
        a.send(&x);
        expect_frames(
            &mut [&mut a, &mut b, &mut c],
            &[vec![], vec![x], vec![]],
            "a -> b once b is learned again",
        );

        // a's frontend goes away; c sends to a's (still learned) address meanwhile; a
        // reconnects and c <-> a works.
        drop(a);
        assert!(
            wait_until(Duration::from_secs(5), || !d.connected("a")),
            "the daemon did not notice a's frontend leave"
        );
        let a_before = d.counters()["a"].clone();
        let stale = data(mac(1), mac(3), 7);
        c.send(&stale);
        let a_gone = d.counters()["a"].clone();
        let mut a = Vm::connect("a", &d.socket("a"));
        let fresh = data(mac(1), mac(3), 8);
        c.send(&fresh);
        let mut got_a = a.collect(1, Duration::from_secs(5));
        while !got_a.contains(&fresh) && got_a.len() < 4 {
            let more = a.collect(1, Duration::from_secs(2));
            if more.is_empty() {
                break;
            }
            got_a.extend(more);
        }
        std::thread::sleep(QUIET);
        got_a.extend(a.received());
        assert!(
            got_a.contains(&fresh),
            "c -> a after a reconnected: a got{}",
            describe_all(&got_a)
        );
        let w = data(mac(3), mac(1), 9);
        a.send(&w);
        expect_frames(
            &mut [&mut b, &mut c],
            &[vec![], vec![w]],
            "a -> c after a reconnected",
        );
        let stats = d.json(&["stats"]);
        assert_eq!(stats.as_array().map(Vec::len), Some(3), "{stats}");
        d.daemon.assert_alive();

        // The switch's contract: a frame for a port whose frontend is gone is dropped and
        // counted (`drop_not_running`), not queued for whoever connects next.
        // (The first switch kept `running` from port creation on, so such a frame waited in
        // the inbox and went to the next session; sessions now tell the host queue.)
        let not_running = a_gone["drop_not_running"] - a_before["drop_not_running"];
        let queued = a_gone["received"] - a_before["received"];
        assert!(
            (not_running, queued) == (1, 0) && got_a == [fresh.clone()],
            "a frame for a while its frontend was gone: drop_not_running +{not_running} \
             (want +1), received +{queued} (want +0); a's next session received{}\n  \
             (want only{})",
            describe_all(&got_a),
            describe_all(&[fresh])
        );
        println!(
            "b removed under traffic ({} frames, {flooded} flooded after), added back and \
             reconnected; a reconnected",
            sent.len()
        );
        drop(d);
    });
}

/// The uplink tap of the uplink test.
const UPLINK: &str = "vpsw-up0";

/// The test's frames `sniff` sees coming from the switch (not outgoing ones, which the test
/// sent itself): at least `n` within 5 s, then whatever follows until quiet.
fn from_switch(sniff: &PacketSocket, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let wait = if got.len() >= n {
            QUIET
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match sniff.recv(&mut buf, wait).unwrap() {
            Some((len, kind)) => {
                let f = &buf[..len];
                if kind != PACKET_OUTGOING
                    && f.len() >= 14
                    && f[12..14] == ETHERTYPE_EXPERIMENTAL.to_be_bytes()
                {
                    got.push(f.to_vec());
                }
            }
            None => return got,
        }
    }
}

#[test]
fn uplink_reaches_the_host() {
    if !can_run("uplink_reaches_the_host") {
        return;
    }
    let _serial = serial();
    in_new_netns(|| {
        let d = Switchd::start("uplink", |dir| {
            format!(
                "[[switch]]\nname = \"sw0\"\nuplinks = [{{ kind = \"tap\", name = \"{UPLINK}\" }}]\n"
            ) + &port_toml(dir, "a", "sw0", mac(1), "")
                + &port_toml(dir, "b", "sw0", mac(2), "")
        });
        assert!(
            netns::if_exists(UPLINK),
            "the daemon did not create {UPLINK}"
        );
        netns::ip(&["link", "set", UPLINK, "up"]);
        let sniff = PacketSocket::sniffer(UPLINK).unwrap();
        let inject = PacketSocket::sender(UPLINK).unwrap();
        // What the daemon wrote into the tap (the test's own frames are outgoing).
        let from_switch = |n: usize| from_switch(&sniff, n);
        let [mut a, mut b] = ["a", "b"].map(|n| Vm::connect(n, &d.socket(n)));
        let peer = [0x02, 0x73, 0x77, 0, 0, 0x99];

        // A broadcast from a leaves through the tap (and reaches b).
        let f = data(BCAST, mac(1), 1);
        a.send(&f);
        let out = from_switch(1);
        assert_eq!(out, vec![f.clone()], "on the tap:{}", describe_all(&out));
        expect_frames(&mut [&mut a, &mut b], &[vec![], vec![f]], "a's broadcast");

        // A host frame for a, injected into the tap, reaches a only.
        let g = data(mac(1), peer, 2);
        inject.send(&g).unwrap();
        expect_frames(&mut [&mut a, &mut b], &[vec![g], vec![]], "host -> a");
        let fdb = d.fdb("sw0");
        let up = format!("uplink:{UPLINK}");
        assert!(
            fdb.contains(&(0, mac_text(peer), up.clone())),
            "the host's address is not learned on {up}: {fdb:?}"
        );

        // a's answer to the host leaves through the tap only.
        let h = data(peer, mac(1), 3);
        a.send(&h);
        let out = from_switch(1);
        assert_eq!(out, vec![h], "on the tap:{}", describe_all(&out));
        expect_frames(&mut [&mut a, &mut b], &[vec![], vec![]], "a -> host");
        let ca = d.counters()["a"].clone();
        assert_eq!(
            [ca["flooded"], ca["forwarded"], ca["received"]],
            [1, 1, 1],
            "{ca:?}"
        );
        println!(
            "uplink {UPLINK}: a's broadcast and unicast out of the tap, the host's frame to a"
        );
        drop(d);
    });
}

/// The veth pair of the AF_PACKET uplink test: the switch's uplink end and the far end.
const AFP_UPLINK: &str = "vpswa0";
const AFP_PEER: &str = "vpswa1";

#[test]
fn af_packet_uplink_reaches_the_far_veth_end() {
    if !can_run("af_packet_uplink_reaches_the_far_veth_end") {
        return;
    }
    let _serial = serial();
    in_new_netns(|| {
        // The uplink opens an existing interface: the pair is there before the daemon starts.
        netns::ip(&[
            "link", "add", AFP_UPLINK, "type", "veth", "peer", "name", AFP_PEER,
        ]);
        netns::ip(&["link", "set", AFP_UPLINK, "up"]);
        netns::ip(&["link", "set", AFP_PEER, "up"]);
        let mut d = Switchd::start("af-packet-uplink", |dir| {
            format!(
                "[[switch]]\nname = \"sw0\"\n\
                 uplinks = [{{ kind = \"af-packet\", name = \"{AFP_UPLINK}\" }}]\n"
            ) + &port_toml(dir, "a", "sw0", mac(1), "")
        });
        let sniff = PacketSocket::sniffer(AFP_PEER).unwrap();
        let inject = PacketSocket::sender(AFP_PEER).unwrap();
        // What arrived at the far end from the switch (the test's own injections are
        // outgoing there).
        let from_switch = |n: usize| from_switch(&sniff, n);
        let mut a = Vm::connect("a", &d.socket("a"));
        let before = d.counters()["a"].clone();
        let peer = [0x02, 0x73, 0x77, 0, 0, 0x98];

        // A broadcast from a leaves through vpswa0 and comes out at vpswa1, not back to a.
        let f = data(BCAST, mac(1), 1);
        a.send(&f);
        let out = from_switch(1);
        assert_eq!(out, vec![f], "at {AFP_PEER}:{}", describe_all(&out));
        expect_frames(&mut [&mut a], &[vec![]], "a's broadcast");

        // A frame for a injected at vpswa1 reaches a.
        let g = data(mac(1), peer, 2);
        inject.send(&g).unwrap();
        expect_frames(&mut [&mut a], &[vec![g]], "far end -> a");
        let out = from_switch(0);
        assert!(
            out.is_empty(),
            "the frame for a came back out at {AFP_PEER}:{}",
            describe_all(&out)
        );
        let fdb = d.fdb("sw0");
        let up = format!("uplink:{AFP_UPLINK}");
        assert!(
            fdb.contains(&(0, mac_text(peer), up.clone())),
            "the far end's address is not learned on {up}: {fdb:?}"
        );

        let after = d.counters()["a"].clone();
        let delta = |k: &str| after[k] - before[k];
        assert_eq!(
            [delta("received"), delta("flooded"), delta("forwarded")],
            [1, 1, 0],
            "a's [received, flooded, forwarded] went {before:?} -> {after:?}"
        );
        d.daemon.assert_alive();
        println!(
            "af-packet uplink {AFP_UPLINK}: a's broadcast out at {AFP_PEER}, {AFP_PEER}'s frame \
             to a, learned on {up}"
        );
        drop(d);
    });
}

#[test]
fn a_port_from_flags_on_a_switch_gets_the_switch_and_others_join_it() {
    // `vhost-pump --socket S --switch sw9 --control C`: the daemon makes `sw9` with default
    // settings; `ctl add --switch sw9` puts a second port on it and frames cross.
    if !can_run("a_port_from_flags_on_a_switch_gets_the_switch_and_others_join_it") {
        return;
    }
    let _serial = serial();
    in_new_netns(|| {
        let dir = netns::target_workdir("switch-flags");
        let control = dir.join("control.sock");
        let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
        let mac_a = mac_text(mac(1));
        let mut daemon = Daemon::spawn(
            &[
                "--socket",
                sa.to_str().unwrap(),
                "--switch",
                "sw9",
                "--mac",
                &mac_a,
                "--control",
                control.to_str().unwrap(),
            ],
            &dir.join("daemon.log"),
        )
        .unwrap();
        let up = wait_until(Duration::from_secs(10), || control.exists());
        daemon.assert_alive();
        assert!(up, "no control socket\n{}", daemon.log_text());
        let switches = netns::ctl_json(&control, &["switches"]);
        assert_eq!(switches[0]["name"], "sw9", "{switches}");
        assert_eq!(switches[0]["fdb_max"], 8192, "{switches}");
        let mac_b = mac_text(mac(2));
        netns::ctl_ok(
            &control,
            &[
                "add",
                "--name",
                "b",
                "--socket",
                sb.to_str().unwrap(),
                "--switch",
                "sw9",
                "--mac",
                &mac_b,
            ],
        );
        let mut a = Vm::connect("a", &sa);
        let mut b = Vm::connect("b", &sb);
        // b first, so the switch knows where it is; then a's unicast reaches b only.
        b.send(&data(mac(1), mac(2), 1));
        assert_eq!(
            a.collect(1, Duration::from_secs(5)),
            [data(mac(1), mac(2), 1)]
        );
        let f = data(mac(2), mac(1), 2);
        a.send(&f);
        assert_eq!(
            b.collect(1, Duration::from_secs(5)),
            [f],
            "b did not get a's frame"
        );
        // A switch with a port cannot be removed.
        let out = std::process::Command::new(daemon_bin())
            .args([
                "ctl",
                "--control",
                control.to_str().unwrap(),
                "remove-switch",
                "sw9",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("still has ports attached"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        daemon.assert_alive();
    });
}
