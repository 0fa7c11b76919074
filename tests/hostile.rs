//! A hostile vhost-user frontend against one running daemon.
//!
//! One `vhost-pump --config` daemon serves two tap ports, A and B, in a private network
//! namespace (`ip netns add`), with a control socket. The test's own frontend
//! (`testkit::vhost_driver`) attacks port A, one connection per case: malformed and truncated
//! messages, unknown requests, absurd sizes, bad memory tables, out-of-range vring indexes and
//! sizes, hostile descriptor chains (outside memory, overflowing, loops, nested and bad
//! indirect tables, longer than the ring, avail index jumps), disconnects mid-message, file
//! descriptor floods, and two frontends at once. After every case: the daemon is alive, port B
//! passes traffic (a fresh session sends a frame; tap B's rx_packets grows) and so does a fresh
//! session on port A. Drops are checked through `vhost-pump ctl stats A`.
//!
//! Every case prints one `case NAME: OUTCOME` line (run with `--nocapture` to see them).
//! Needs root (netns, taps): skipped otherwise, failed under `CI=true`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::vhost_driver::*;

const NS: &str = "vp-hostile";
const TAP_A: &str = "vph-a";
const TAP_B: &str = "vph-b";
const SRC_MAC: [u8; 6] = [0x02, 0x68, 0x6f, 0x73, 0x74, 0x01];
/// Ring size the test's sessions use (the daemon allows up to 1024).
const QSIZE: u16 = 64;
/// vhost-user ring indexes of the first queue pair.
const RX: u32 = 0;
const TX: u32 = 1;

fn missing_prereqs() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, tap devices)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("iproute2's `ip` is not available".into()),
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns(argv: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", NS]).args(argv);
    c
}

/// The namespace, removed on drop.
struct Netns;

impl Netns {
    fn create() -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", NS])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", NS]));
        run(&mut in_ns(&["ip", "link", "set", "lo", "up"]));
        // No IPv6: the kernel then sends nothing of its own on the taps.
        for knob in ["all", "default"] {
            run(&mut in_ns(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{knob}.disable_ipv6=1"),
            ]));
        }
        Netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
    }
}

/// The daemon and where to reach it.
struct Env {
    daemon: Child,
    dir: PathBuf,
    sock_a: PathBuf,
    sock_b: PathBuf,
    control: PathBuf,
    log: PathBuf,
    _ns: Netns,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

fn wait_for(path: &Path, child: &mut Child, log: &Path) {
    let t = Instant::now();
    while !path.exists() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!(
                "daemon exited ({s}) before {} appeared:\n{}",
                path.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Env {
    fn start() -> Env {
        let dir = testkit::netns::target_workdir("hostile");
        let d = dir.display();
        let config = dir.join("ports.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[[port]]
name = "A"
socket = "{d}/a.sock"
host = {{ kind = "tap", name = "{TAP_A}" }}

[[port]]
name = "B"
socket = "{d}/b.sock"
host = {{ kind = "tap", name = "{TAP_B}" }}
"#
            ),
        )
        .unwrap();
        let ns = Netns::create();
        let log = dir.join("daemon.log");
        let control = dir.join("control.sock");
        let mut daemon = in_ns(&[env!("CARGO_BIN_EXE_vhost-pump")])
            .args(["--config", config.to_str().unwrap()])
            .args(["--control", control.to_str().unwrap()])
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
        for p in [&control, &sock_a, &sock_b] {
            wait_for(p, &mut daemon, &log);
        }
        Env {
            daemon,
            dir,
            sock_a,
            sock_b,
            control,
            log,
            _ns: ns,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn assert_alive(&mut self, case: &str) {
        if let Some(s) = self.daemon.try_wait().unwrap() {
            panic!(
                "case {case}: the daemon died ({s})\n--- daemon log tail ---\n{}",
                self.log_tail()
            );
        }
    }

    fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// rx_packets of a tap: frames the daemon wrote into it (guest TX).
    fn tap_rx(&self, tap: &str) -> u64 {
        run(&mut in_ns(&[
            "cat",
            &format!("/sys/class/net/{tap}/statistics/rx_packets"),
        ]))
        .trim()
        .parse()
        .unwrap()
    }

    /// `vhost-pump ctl stats PORT`, the port's object.
    fn stats(&self, port: &str) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_vhost-pump"))
            .args(["ctl", "--control", self.control.to_str().unwrap()])
            .args(["stats", port])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl stats {port}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0].clone()
    }

    /// Drops of `reason` in direction `dir` ("rx"/"tx") of port `port`, summed over queues.
    fn drops(&self, port: &str, dir: &str) -> Drops {
        let s = self.stats(port);
        let mut d = Drops::default();
        for q in s["queues"].as_array().unwrap() {
            for (k, v) in q[dir]["drops"].as_object().unwrap() {
                *d.0.entry(k.clone()).or_default() += v.as_u64().unwrap();
            }
            d.1 += q[dir]["frames"].as_u64().unwrap();
        }
        d
    }

    /// Waits until `dir` drops of `reason` on port A grew by at least `n` since `before`.
    fn wait_drops(&self, before: &Drops, dir: &str, reason: &str, n: u64) -> Drops {
        let t = Instant::now();
        loop {
            let now = self.drops("A", dir);
            if now.of(reason) >= before.of(reason) + n {
                return now;
            }
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "{dir} {reason} drops stayed at {} (wanted +{n}); all now: {:?}",
                now.of(reason),
                now.0
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A fresh, well-behaved session on `socket` sends a frame that comes out of `tap`.
    fn port_passes_traffic(&self, socket: &Path, tap: &str) -> Result<(), String> {
        let before = self.tap_rx(tap);
        let mut s = Session::good(socket, &[TX], QSIZE)
            .map_err(|e| format!("good session on {}: {e}", socket.display()))?;
        send_and_see(self, &mut s, tap, before)
    }

    /// The checks after every case.
    fn healthy(&mut self, case: &str) {
        self.assert_alive(case);
        for (name, sock, tap) in [
            ("B", self.sock_b.clone(), TAP_B),
            ("A", self.sock_a.clone(), TAP_A),
        ] {
            if let Err(e) = self.port_passes_traffic(&sock, tap) {
                self.assert_alive(case);
                panic!(
                    "case {case}: port {name} no longer passes traffic: {e}\n--- daemon log tail ---\n{}",
                    self.log_tail()
                );
            }
        }
        self.assert_alive(case);
    }

    /// CPU time (user + system) the daemon used so far, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat(5), counted from the state field (3).
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn fd_limit(&self) -> usize {
        let text = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).unwrap();
        text.lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024)
    }
}

/// Drops by reason, and frames.
#[derive(Clone, Debug, Default)]
struct Drops(std::collections::BTreeMap<String, u64>, u64);

impl Drops {
    fn of(&self, reason: &str) -> u64 {
        self.0.get(reason).copied().unwrap_or(0)
    }
    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// Sends one good frame in session `s` (TX ring) and waits for `tap`'s rx_packets to pass
/// `before`.
fn send_and_see(env: &Env, s: &mut Session, tap: &str, before: u64) -> Result<(), String> {
    s.send_frame(TX, &tx_frame(SRC_MAC, 100, 7))
        .map_err(|e| format!("frame not consumed: {e}"))?;
    let t = Instant::now();
    while env.tap_rx(tap) <= before {
        if t.elapsed() > Duration::from_secs(3) {
            return Err(format!("{tap} rx_packets stayed at {before}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// What happened to a request the daemon should refuse.
fn refused(r: std::io::Result<()>, what: &str) -> String {
    match r {
        Ok(()) => panic!("{what}: accepted"),
        Err(e) if e.to_string().contains("refused") => "refused (nack)".into(),
        Err(e) => format!("refused (connection closed: {})", e.kind()),
    }
}

/// Asserts the daemon hangs up on `fe` within 3 s.
fn expect_hangup(fe: &Frontend, what: &str) -> String {
    assert!(
        fe.closed_by_peer(Duration::from_secs(3)),
        "{what}: the daemon kept the connection open"
    );
    "connection closed by the daemon".into()
}

/// A connection that negotiated features (with REPLY_ACK) but has no memory table yet.
fn negotiated(env: &Env) -> Frontend {
    let mut fe = Frontend::connect(&env.sock_a).unwrap();
    let offered = fe.get_features().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        proto & ((1 << PROTO_REPLY_ACK) | (1 << PROTO_CONFIGURE_MEM_SLOTS) | (1 << PROTO_CONFIG)),
    )
    .unwrap();
    fe.set_owner().unwrap();
    let want = (1u64 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES);
    assert_eq!(offered & want, want);
    fe.set_features(want).unwrap();
    fe
}

/// Runs one TX data-path case on port A: `build` writes descriptors (and returns how many
/// chains it published), the ring is kicked, the drops of `reason` must grow by that many,
/// and a good frame on the same ring afterwards must still pass.
fn tx_case(env: &Env, reason: &str, build: impl FnOnce(&mut Ring, &GuestMem) -> u64) -> String {
    let mut s = Session::good(&env.sock_a, &[TX], QSIZE).unwrap();
    let before = env.drops("A", "tx");
    let n = {
        let Session { mem, rings, .. } = &mut s;
        let ring = &mut rings[0];
        let n = build(ring, mem);
        ring.kick();
        n
    };
    let after = env.wait_drops(&before, "tx", reason, n);
    assert_eq!(
        after.total() - before.total(),
        n,
        "other drops counted too: {:?} -> {:?}",
        before.0,
        after.0
    );
    assert_eq!(after.1, before.1, "a bad chain was sent as a frame");
    // The ring keeps working after the bad chains.
    let rx_before = env.tap_rx(TAP_A);
    send_and_see(env, &mut s, TAP_A, rx_before).unwrap();
    format!("{n} chain(s) dropped as {reason}; the ring still works")
}

/// One chain whose head is a single descriptor.
fn one_desc(ring: &mut Ring, mem: &GuestMem, addr: u64, len: u32, flags: u16) -> u64 {
    let d = ring.take_desc();
    ring.set_desc(mem, d, addr, len, flags, 0);
    ring.publish(mem, d);
    1
}

/// Sends one frame into tap `tap` from inside the namespace (host → guest traffic).
fn inject(tap: &str, frame: &[u8]) {
    let (tap, frame) = (tap.to_string(), frame.to_vec());
    std::thread::spawn(move || {
        let ns = File::open(format!("/run/netns/{NS}")).unwrap();
        // SAFETY: setns on a namespace fd affects only this thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: the fd was just created and is owned here.
        let _guard = unsafe { File::from_raw_fd(fd) };
        let name = std::ffi::CString::new(tap).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0);
        // SAFETY: sockaddr_ll is plain data; zeroed is valid.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: buffer and address are valid for the stated lengths.
        let n = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    })
    .join()
    .unwrap();
}

struct Cases {
    env: Env,
    lines: Vec<String>,
}

impl Cases {
    fn case(&mut self, name: &str, f: impl FnOnce(&Env) -> String) {
        let outcome = f(&self.env);
        self.env.healthy(name);
        let line = format!("case {name}: {outcome}; daemon alive, ports A and B pass traffic");
        println!("{line}");
        self.lines.push(line);
    }
}

/// The tests of this file share the namespace name: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn hostile_frontend_cannot_hurt_the_daemon_or_other_ports() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = missing_prereqs() {
        testkit::guest::skip_or_fail("hostile", &why);
        return;
    }
    let started = Instant::now();
    let env = Env::start();
    let mut c = Cases {
        env,
        lines: Vec::new(),
    };
    c.env.healthy("baseline");

    // ---- Malformed and truncated messages -------------------------------------------------
    c.case("header only, then close", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        fe.send_bytes(&header(req::SET_FEATURES, F_VERSION_1, 8), &[])
            .unwrap();
        // The body never comes; the daemon waits for it, then sees the close.
        assert!(!fe.closed_by_peer(Duration::from_millis(200)));
        "daemon waits for the body, session ends on close".into()
    });
    c.case("truncated header (5 bytes), then close", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        fe.send_bytes(&header(req::GET_FEATURES, F_VERSION_1, 0)[..5], &[])
            .unwrap();
        "session ends on close".into()
    });
    c.case("body shorter than size, then close", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        let mut m = header(req::SET_MEM_TABLE, F_VERSION_1, 40).to_vec();
        m.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb]);
        let mem = GuestMem::new(4096).unwrap();
        fe.send_bytes(&m, &[mem.fd()]).unwrap();
        "session ends on close, the fd is released".into()
    });
    c.case("size 4097 (> 4096)", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        fe.send_bytes(&header(req::SET_MEM_TABLE, F_VERSION_1, 4097), &[])
            .unwrap();
        expect_hangup(&fe, "size 4097")
    });
    c.case("size u32::MAX", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        fe.send_bytes(&header(req::SET_FEATURES, F_VERSION_1, u32::MAX), &[])
            .unwrap();
        expect_hangup(&fe, "size u32::MAX")
    });
    c.case("unknown request codes (0, 999, 0xffffffff)", |env| {
        for code in [0u32, 999, u32::MAX] {
            let fe = Frontend::connect(&env.sock_a).unwrap();
            fe.send(code, F_VERSION_1, &[], &[]).unwrap();
            expect_hangup(&fe, &format!("request {code}"));
        }
        "each: connection closed by the daemon".into()
    });
    c.case("unknown request with a 4096-byte body", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        fe.send(4242, F_VERSION_1, &[0x5a; 4096], &[]).unwrap();
        expect_hangup(&fe, "request 4242")
    });
    c.case("wrong body size for SET_FEATURES (4 bytes)", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        fe.send(req::SET_FEATURES, F_VERSION_1, &[1, 2, 3, 4], &[])
            .unwrap();
        expect_hangup(&fe, "short SET_FEATURES")
    });
    c.case("bad header flags (version 0, reply bit set)", |env| {
        for flags in [0u32, F_VERSION_1 | F_REPLY] {
            let fe = Frontend::connect(&env.sock_a).unwrap();
            fe.send(req::GET_FEATURES, flags, &[], &[]).unwrap();
            expect_hangup(&fe, &format!("flags {flags:#x}"));
        }
        "each: connection closed by the daemon".into()
    });
    c.case("fds attached to a request that takes none", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        let mem = GuestMem::new(4096).unwrap();
        fe.send(req::GET_FEATURES, F_VERSION_1, &[], &[mem.fd(), mem.fd()])
            .unwrap();
        expect_hangup(&fe, "GET_FEATURES with fds")
    });
    c.case("64 KiB of pseudo-random bytes", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let junk: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        // The daemon may hang up before all of it is written.
        let _ = fe.send_bytes(&junk, &[]);
        expect_hangup(&fe, "random bytes")
    });
    c.case(
        "GET_CONFIG past the config space, then with offset + size overflowing",
        |env| {
            let fe = negotiated(env);
            let get_config = |offset: u32, size: u32| {
                let mut body = offset.to_le_bytes().to_vec();
                body.extend_from_slice(&size.to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                body.extend_from_slice(&vec![0u8; size as usize]);
                fe.send(req::GET_CONFIG, F_VERSION_1, &body, &[]).unwrap();
            };
            get_config(3000, 1000);
            let (r, _, reply) = fe.recv().unwrap();
            assert_eq!(r, req::GET_CONFIG);
            // An empty payload is the protocol's way of saying "no".
            assert_eq!(reply.len(), 12, "config reply {reply:?}");
            get_config(0xffff_fff0, 4080);
            let closed = expect_hangup(&fe, "GET_CONFIG overflow");
            format!("past the end: empty reply; overflowing: {closed}")
        },
    );

    // ---- Bad memory tables ----------------------------------------------------------------
    c.case("memory table: overlapping regions", |env| {
        let fe = negotiated(env);
        let mem = GuestMem::new(1 << 20).unwrap();
        let r0 = mem.region();
        let r1 = MemRegion {
            gpa: 0x8_0000,
            ..mem.region()
        };
        refused(
            fe.set_mem_table(&[r0, r1], &[mem.fd(), mem.fd()]),
            "overlap",
        )
    });
    c.case("memory table: zero-size region", |env| {
        let fe = negotiated(env);
        let mem = GuestMem::new(1 << 20).unwrap();
        let r = MemRegion {
            size: 0,
            ..mem.region()
        };
        refused(fe.set_mem_table(&[r], &[mem.fd()]), "zero size")
    });
    c.case("memory table: guest address + size overflows", |env| {
        let fe = negotiated(env);
        let mem = GuestMem::new(1 << 20).unwrap();
        let r = MemRegion {
            gpa: u64::MAX - 0xfff,
            ..mem.region()
        };
        refused(fe.set_mem_table(&[r], &[mem.fd()]), "gpa overflow")
    });
    c.case("memory table: 33 regions (limit 32)", |env| {
        let fe = negotiated(env);
        let mem = GuestMem::new(33 * 4096).unwrap();
        let regions: Vec<MemRegion> = (0..33u64)
            .map(|i| MemRegion {
                gpa: i * 0x10_0000,
                size: 4096,
                uva: mem.uva(i * 4096),
                offset: i * 4096,
            })
            .collect();
        refused(fe.set_mem_table(&regions, &[mem.fd(); 33]), "33 regions")
    });
    c.case("memory table: 2 regions, 1 fd", |env| {
        let fe = negotiated(env);
        let mem = GuestMem::new(1 << 20).unwrap();
        let r1 = MemRegion {
            gpa: 0x1000_0000,
            ..mem.region()
        };
        refused(
            fe.set_mem_table(&[mem.region(), r1], &[mem.fd()]),
            "fd count",
        )
    });
    c.case("memory table: an eventfd instead of a memory fd", |env| {
        let fe = negotiated(env);
        let mem = GuestMem::new(1 << 20).unwrap();
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        refused(
            fe.set_mem_table(&[mem.region()], &[efd.as_raw_fd()]),
            "eventfd region",
        )
    });
    c.case("memory table: mmap offset past the end of the fd", |env| {
        let fe = negotiated(env);
        let mem = GuestMem::new(1 << 20).unwrap();
        let r = MemRegion {
            offset: 1 << 30,
            ..mem.region()
        };
        // Accepted, the first touch of that memory would raise SIGBUS in the daemon.
        let res = fe.set_mem_table(&[r], &[mem.fd()]);
        refused(res, "offset past EOF")
    });
    c.case(
        "memory table: region extends past the end of the fd",
        |env| {
            let fe = negotiated(env);
            let mem = GuestMem::new(1 << 20).unwrap();
            let r = MemRegion {
                offset: 0x8_0000,
                ..mem.region()
            };
            let res = fe.set_mem_table(&[r], &[mem.fd()]);
            refused(res, "region past EOF")
        },
    );
    c.case("ADD_MEM_REG: 600 distinct regions", |env| {
        let fe = negotiated(env);
        let mem = GuestMem::new(1 << 20).unwrap();
        let mut accepted = 0u64;
        let mut outcome = String::new();
        for i in 0..600u64 {
            let r = MemRegion {
                gpa: i << 21,
                size: 4096,
                uva: mem.uva(0) + (i << 21),
                offset: 0,
            };
            match fe.add_mem_reg(&r, mem.fd()) {
                Ok(()) => accepted += 1,
                Err(e) => {
                    outcome = format!("{accepted} accepted, then refused ({e})");
                    break;
                }
            }
        }
        assert!(!outcome.is_empty(), "all 600 regions accepted");
        assert!(accepted <= 509, "{accepted} regions accepted");
        outcome
    });

    // ---- Out-of-range vring indexes and sizes -----------------------------------------------
    for (what, index, num) in [
        ("SET_VRING_NUM 0", TX, 0u32),
        ("SET_VRING_NUM 3 (not a power of two)", TX, 3),
        ("SET_VRING_NUM 65535", TX, 65535),
        ("SET_VRING_NUM 2048 (> queue_size 1024)", TX, 2048),
        ("SET_VRING_NUM on ring 99", 99, 64),
    ] {
        c.case(what, |env| {
            let s = Session::good(&env.sock_a, &[], QSIZE).unwrap();
            refused(s.fe.set_vring_num(index, num), what)
        });
    }
    for (what, request, body) in [
        (
            "SET_VRING_BASE on ring 99",
            req::SET_VRING_BASE,
            vring_state(99, 0),
        ),
        (
            "SET_VRING_ENABLE on ring 99",
            req::SET_VRING_ENABLE,
            vring_state(99, 1),
        ),
        ("SET_VRING_ADDR on ring 99", req::SET_VRING_ADDR, {
            let mut b = vring_state(99, 0);
            b.extend_from_slice(&words(&[0, 0, 0, 0]));
            b
        }),
    ] {
        c.case(what, |env| {
            let s = Session::good(&env.sock_a, &[], QSIZE).unwrap();
            refused(s.fe.call(request, &body, &[]), what)
        });
    }
    c.case("SET_VRING_KICK/CALL on ring 99", |env| {
        let s = Session::good(&env.sock_a, &[], QSIZE).unwrap();
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let a = refused(
            s.fe.set_vring_fd(req::SET_VRING_KICK, 99, efd.as_raw_fd()),
            "kick 99",
        );
        let s = Session::good(&env.sock_a, &[], QSIZE).unwrap();
        let b = refused(
            s.fe.set_vring_fd(req::SET_VRING_CALL, 99, efd.as_raw_fd()),
            "call 99",
        );
        format!("kick: {a}; call: {b}")
    });
    c.case("GET_VRING_BASE on ring 99", |env| {
        let s = Session::good(&env.sock_a, &[], QSIZE).unwrap();
        match s.fe.get_vring_base(99) {
            Ok(v) => panic!("GET_VRING_BASE 99 answered {v}"),
            Err(e) => format!("refused ({})", e.kind()),
        }
    });
    c.case("SET_VRING_ADDR outside every region", |env| {
        let s = Session::good(&env.sock_a, &[], QSIZE).unwrap();
        s.fe.set_vring_num(TX, 64).unwrap();
        refused(
            s.fe.set_vring_addr(TX, 0x1000, 0x2000, 0x3000),
            "addr outside",
        )
    });
    c.case("SET_VRING_ADDR with a misaligned descriptor table", |env| {
        let s = Session::good(&env.sock_a, &[], QSIZE).unwrap();
        s.fe.set_vring_num(TX, 64).unwrap();
        let m = &s.mem;
        refused(
            s.fe.set_vring_addr(TX, m.uva(0x101), m.uva(0x2000), m.uva(0x1000)),
            "misaligned",
        )
    });
    c.case("100 early SET_VRING_ENABLEs before SET_FEATURES", |env| {
        let fe = Frontend::connect(&env.sock_a).unwrap();
        fe.get_features().unwrap();
        let mut closed = false;
        for i in 0..100 {
            if fe
                .send(req::SET_VRING_ENABLE, F_VERSION_1, &vring_state(i, 1), &[])
                .is_err()
            {
                closed = true;
                break;
            }
        }
        assert!(closed || fe.closed_by_peer(Duration::from_secs(3)));
        "connection closed by the daemon".into()
    });

    // ---- Hostile descriptor chains (TX) --------------------------------------------------------
    let end = SESSION_MEM as u64;
    c.case("TX descriptor outside guest memory", |env| {
        tx_case(env, "bad_address", |r, m| one_desc(r, m, 2 * end, 100, 0))
    });
    c.case("TX descriptor straddling the end of memory", |env| {
        tx_case(env, "bad_address", |r, m| one_desc(r, m, end - 10, 100, 0))
    });
    c.case("TX descriptor address overflow (u64::MAX - 10)", |env| {
        tx_case(env, "bad_address", |r, m| {
            one_desc(r, m, u64::MAX - 10, 100, 0)
        })
    });
    c.case("TX descriptor loop (0 -> 1 -> 0)", |env| {
        tx_case(env, "bad_chain", |r, m| {
            let (a, b) = (r.take_desc(), r.take_desc());
            r.set_desc(m, a, BUF_BASE, 60, DESC_NEXT, b);
            r.set_desc(m, b, BUF_BASE, 60, DESC_NEXT, a);
            r.publish(m, a);
            1
        })
    });
    c.case("TX descriptor pointing at itself", |env| {
        tx_case(env, "bad_chain", |r, m| {
            let a = r.take_desc();
            r.set_desc(m, a, BUF_BASE, 60, DESC_NEXT, a);
            r.publish(m, a);
            1
        })
    });
    c.case("TX next index beyond the table (next = 500)", |env| {
        tx_case(env, "bad_chain", |r, m| {
            let a = r.take_desc();
            r.set_desc(m, a, BUF_BASE, 60, DESC_NEXT, 500);
            r.publish(m, a);
            1
        })
    });
    c.case("TX nested indirect tables", |env| {
        tx_case(env, "bad_chain", |r, m| {
            let (t1, t2) = (0x3_0000, 0x3_1000);
            Ring::set_indirect(m, t1, 0, t2, 32, DESC_INDIRECT, 0);
            Ring::set_indirect(m, t2, 0, BUF_BASE, 60, 0, 0);
            one_desc(r, m, t1, 16, DESC_INDIRECT)
        })
    });
    c.case("TX indirect table of bad length (17, 0)", |env| {
        tx_case(env, "bad_chain", |r, m| {
            let t = 0x3_0000;
            Ring::set_indirect(m, t, 0, BUF_BASE, 60, 0, 0);
            one_desc(r, m, t, 17, DESC_INDIRECT) + one_desc(r, m, t, 0, DESC_INDIRECT)
        })
    });
    c.case("TX indirect table outside memory", |env| {
        tx_case(env, "bad_chain", |r, m| {
            one_desc(r, m, 4 * end, 32, DESC_INDIRECT)
        })
    });
    c.case("TX indirect table with a loop inside", |env| {
        tx_case(env, "bad_chain", |r, m| {
            let t = 0x3_0000;
            Ring::set_indirect(m, t, 0, BUF_BASE, 60, DESC_NEXT, 1);
            Ring::set_indirect(m, t, 1, BUF_BASE, 60, DESC_NEXT, 0);
            one_desc(r, m, t, 32, DESC_INDIRECT)
        })
    });
    c.case(
        "TX chain longer than the ring (indirect, 200 entries > 64)",
        |env| {
            tx_case(env, "bad_chain", |r, m| {
                let t = 0x3_0000;
                for i in 0..200u16 {
                    let last = i == 199;
                    Ring::set_indirect(
                        m,
                        t,
                        i,
                        BUF_BASE + u64::from(i),
                        1,
                        if last { 0 } else { DESC_NEXT },
                        i + 1,
                    );
                }
                one_desc(r, m, t, 200 * 16, DESC_INDIRECT)
            })
        },
    );
    c.case(
        "TX chain through every ring slot and back (64 + loop)",
        |env| {
            tx_case(env, "bad_chain", |r, m| {
                let first = r.take_desc();
                let mut prev = first;
                for _ in 1..QSIZE {
                    let d = r.take_desc();
                    r.set_desc(m, prev, BUF_BASE, 1, DESC_NEXT, d);
                    prev = d;
                }
                r.set_desc(m, prev, BUF_BASE, 1, DESC_NEXT, first);
                r.publish(m, first);
                1
            })
        },
    );
    c.case("TX head index beyond the ring (avail entry 500)", |env| {
        tx_case(env, "bad_chain", |r, m| {
            r.publish(m, 500);
            1
        })
    });
    c.case("TX device-writable descriptor", |env| {
        tx_case(env, "wrong_direction", |r, m| {
            one_desc(r, m, BUF_BASE, 100, DESC_WRITE)
        })
    });
    c.case("TX runt (zero-length descriptor)", |env| {
        tx_case(env, "runt", |r, m| one_desc(r, m, BUF_BASE, 0, 0))
    });
    c.case("TX 256 KiB frame (oversize)", |env| {
        tx_case(env, "oversize", |r, m| {
            one_desc(r, m, 0x4_0000, 0x4_0000, 0)
        })
    });
    c.case("TX a whole ring of bad chains in one kick", |env| {
        tx_case(env, "bad_address", |r, m| {
            (0..QSIZE - 1)
                .map(|i| one_desc(r, m, 2 * end + u64::from(i), 100, 0))
                .sum()
        })
    });
    c.case("TX avail idx jump (+1000 on a 64-entry ring)", |env| {
        let mut s = Session::good(&env.sock_a, &[TX], QSIZE).unwrap();
        let before = env.drops("A", "tx");
        let Session { mem, rings, .. } = &mut s;
        let ring = &mut rings[0];
        let sane = ring.avail_idx();
        ring.set_avail_idx(mem, sane.wrapping_add(1000));
        let cpu0 = env.cpu_ticks();
        for _ in 0..20 {
            ring.kick();
            std::thread::sleep(Duration::from_millis(25));
        }
        let burned = env.cpu_ticks() - cpu0;
        assert!(
            burned < 25,
            "the daemon burned {burned} ticks in 0.5 s with a bogus avail idx"
        );
        assert_eq!(
            ring.used_idx(mem),
            sane,
            "entries consumed past a bogus idx"
        );
        // The guest repairs its index: the ring works again.
        ring.set_avail_idx(mem, sane);
        let rx_before = env.tap_rx(TAP_A);
        send_and_see(env, &mut s, TAP_A, rx_before).unwrap();
        assert_eq!(env.drops("A", "tx").total(), before.total());
        format!("nothing consumed, {burned} CPU ticks in 0.5 s (no spin); ring works after repair")
    });
    c.case("TX avail idx jump to just past a full ring (+65)", |env| {
        let mut s = Session::good(&env.sock_a, &[TX], QSIZE).unwrap();
        let Session { mem, rings, .. } = &mut s;
        let ring = &mut rings[0];
        let sane = ring.avail_idx();
        ring.set_avail_idx(mem, sane.wrapping_add(QSIZE + 1));
        ring.kick();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ring.used_idx(mem), sane);
        ring.set_avail_idx(mem, sane);
        let rx_before = env.tap_rx(TAP_A);
        send_and_see(env, &mut s, TAP_A, rx_before).unwrap();
        "nothing consumed; ring works after repair".into()
    });

    // ---- Hostile RX buffers ----------------------------------------------------------------------
    c.case(
        "RX: bad buffers (outside memory, read-only, loop), then a good one",
        |env| {
            let mut s = Session::good(&env.sock_a, &[RX, TX], QSIZE).unwrap();
            let before = env.drops("A", "rx");
            let Session { mem, rings, .. } = &mut s;
            let ring = &mut rings[0];
            one_desc(ring, mem, 2 * end, 2048, DESC_WRITE);
            one_desc(ring, mem, BUF_BASE, 2048, 0);
            let (a, b) = (ring.take_desc(), ring.take_desc());
            ring.set_desc(mem, a, BUF_BASE, 100, DESC_WRITE | DESC_NEXT, b);
            ring.set_desc(mem, b, BUF_BASE, 100, DESC_WRITE | DESC_NEXT, a);
            ring.publish(mem, a);
            ring.kick();
            let frame = {
                let mut f = vec![0xff; 6];
                f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9]);
                f.extend_from_slice(&0x88b5u16.to_be_bytes());
                f.extend_from_slice(&[0x42; 50]);
                f
            };
            inject(TAP_A, &frame);
            env.wait_drops(&before, "rx", "bad_address", 1);
            env.wait_drops(&before, "rx", "wrong_direction", 1);
            let after = env.wait_drops(&before, "rx", "bad_chain", 1);
            assert_eq!(after.total() - before.total(), 3, "{:?}", after.0);
            assert!(ring.wait_used(mem, 3, Duration::from_secs(2)));
            for i in 0..3 {
                assert_eq!(ring.used_elem(mem, i).1, 0, "bad buffer {i} used with data");
            }
            // A good buffer now gets the waiting frame.
            let buf = ring.alloc(2048);
            one_desc(ring, mem, buf, 2048, DESC_WRITE);
            ring.kick();
            assert!(
                ring.wait_used(mem, 4, Duration::from_secs(3)),
                "frame never arrived"
            );
            let (_, len) = ring.used_elem(mem, 3);
            assert_eq!(len as usize, VNET_HDR_LEN + frame.len());
            assert_eq!(mem.read(buf + VNET_HDR_LEN as u64, frame.len()), frame);
            "3 bad buffers returned empty and counted; the frame lands in the next good buffer"
                .into()
        },
    );

    // ---- Disconnects -----------------------------------------------------------------------------
    c.case(
        "disconnect in the middle of SET_MEM_TABLE (with fd)",
        |env| {
            let fe = negotiated(env);
            let mem = GuestMem::new(1 << 20).unwrap();
            let body = Frontend::mem_table_body(&[mem.region()]);
            let mut m = header(req::SET_MEM_TABLE, F_VERSION_1, body.len() as u32).to_vec();
            m.extend_from_slice(&body[..body.len() / 2]);
            fe.send_bytes(&m, &[mem.fd()]).unwrap();
            "session ends".into()
        },
    );
    c.case(
        "disconnect mid-traffic (64 frames queued, then close)",
        |env| {
            let mut s = Session::good(&env.sock_a, &[RX, TX], QSIZE).unwrap();
            let Session { mem, rings, .. } = &mut s;
            for _ in 0..16 {
                let b = rings[0].alloc(2048);
                one_desc(&mut rings[0], mem, b, 2048, DESC_WRITE);
            }
            rings[0].kick();
            for i in 0..QSIZE - 1 {
                rings[1].push_tx(mem, &tx_frame(SRC_MAC, 60 + usize::from(i), 1));
            }
            rings[1].kick();
            inject(TAP_A, &[0xffu8; 60]);
            drop(s);
            "session ends".into()
        },
    );
    c.case("shutdown(write) right after SET_FEATURES", |env| {
        let fe = negotiated(env);
        fe.socket().shutdown(std::net::Shutdown::Write).unwrap();
        expect_hangup(&fe, "half-closed")
    });

    // ---- File descriptor flood ---------------------------------------------------------------------
    c.case(
        "fd flood: 32 fds with every byte of a 4 KiB message, held open",
        |env| {
            let fe = Frontend::connect(&env.sock_a).unwrap();
            // Once answered, the session holds all the fds it needs.
            fe.get_features().unwrap();
            let fds_before = env.open_fds();
            let limit = env.fd_limit();
            let mem = GuestMem::new(4096).unwrap();
            let fds: Vec<RawFd> = vec![mem.fd(); 32];
            // As many as would leave the daemon 3 free fds if it kept them all (the body has room
            // for 4096 chunks).
            let mut left = limit.saturating_sub(fds_before + 3).min(32 * 4097);
            let mut sent = 0;
            let mut msg = header(req::SET_MEM_TABLE, F_VERSION_1, 4096).to_vec();
            while left > 0 {
                let n = left.min(32);
                if fe.send_bytes(&msg, &fds[..n]).is_err() {
                    break;
                }
                msg = vec![0];
                sent += n;
                left -= n;
            }
            // Let the daemon take in whatever it is going to take.
            let mut held = env.open_fds();
            let t = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let now = env.open_fds();
                if now == held || t.elapsed() > Duration::from_secs(3) {
                    break;
                }
                held = now;
            }
            let held = held.saturating_sub(fds_before);
            // While the connection stays open, port B must still be able to start a session.
            let b = env.port_passes_traffic(&env.sock_b, TAP_B);
            assert!(
                b.is_ok() && held < 64,
                "port A's frontend sent {sent} fds in one unfinished message (fd limit {limit}); \
             the daemon holds {held} extra fds; port B: {b:?}"
            );
            let closed = fe.closed_by_peer(Duration::from_secs(3));
            assert!(closed, "connection that sent {sent} fds left open");
            format!(
                "connection closed once one message carried more than 32 fds ({held} extra \
                 fds left in the daemon); port B unaffected"
            )
        },
    );

    // ---- Two frontends at once --------------------------------------------------------------
    c.case("two frontends at once", |env| {
        let mut first = Session::good(&env.sock_a, &[TX], QSIZE).unwrap();
        let second = Frontend::connect(&env.sock_a).unwrap();
        second
            .send(req::GET_FEATURES, F_VERSION_1, &[], &[])
            .unwrap();
        second
            .socket()
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let early = second.recv();
        assert!(
            early.is_err(),
            "second frontend served while the first is connected"
        );
        // The first keeps working.
        let before = env.tap_rx(TAP_A);
        send_and_see(env, &mut first, TAP_A, before).unwrap();
        drop(first);
        // Then the second one is served.
        second
            .socket()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (r, _, body) = second.recv().unwrap();
        assert_eq!((r, body.len()), (req::GET_FEATURES, 8));
        "the second waits (queued) while the first runs undisturbed, then is served".into()
    });
    c.case(
        "two frontends at once, the first one hostile and idle",
        |env| {
            let idle = Frontend::connect(&env.sock_a).unwrap();
            idle.send_bytes(&header(req::GET_FEATURES, F_VERSION_1, 0)[..3], &[])
                .unwrap();
            let second = Frontend::connect(&env.sock_a).unwrap();
            second
                .send(req::GET_FEATURES, F_VERSION_1, &[], &[])
                .unwrap();
            drop(idle);
            let (r, _, _) = second.recv().unwrap();
            assert_eq!(r, req::GET_FEATURES);
            "the second is served once the first goes away".into()
        },
    );

    let took = started.elapsed();
    println!("{} hostile cases in {took:.1?}", c.lines.len());
    let _ = std::fs::write(c.env.dir.join("cases.txt"), c.lines.join("\n") + "\n");
    c.env.assert_alive("end");
}

/// The relay checks each memory region against its file's size when the region arrives, but a
/// frontend can shrink the file afterwards (Kata's QEMU uses plain /dev/shm files, so sealing
/// cannot be required). The daemon's next access to the vanished pages raises SIGBUS: the
/// guest-memory fault handler ends that session only (`memory_faults` counts it), the process
/// lives and the port serves the next frontend.
#[test]
fn memory_file_shrunk_after_mem_table() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = missing_prereqs() {
        testkit::guest::skip_or_fail("hostile (shrunk memory file)", &why);
        return;
    }
    let mut env = Env::start();
    env.healthy("baseline");
    {
        let mut s = Session::good(&env.sock_a, &[TX], QSIZE).unwrap();
        let Session { mem, rings, .. } = &mut s;
        rings[0].push_tx(mem, &tx_frame(SRC_MAC, 100, 3));
        // SAFETY: shrinks our own memfd; nothing here touches the mapping afterwards.
        assert_eq!(unsafe { libc::ftruncate(mem.fd(), 0) }, 0);
        rings[0].kick();
        std::thread::sleep(Duration::from_millis(300));
    }
    let cpu0 = env.cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let burned = env.cpu_ticks() - cpu0;
    assert!(
        burned < 25,
        "the daemon burned {burned} ticks in 0.5 s after the shrink"
    );
    env.healthy("memory file shrunk after SET_MEM_TABLE");
    assert_eq!(
        env.stats("A")["sessions"]["memory_faults"],
        1,
        "the fault is counted against the session's port"
    );
    assert_eq!(env.stats("B")["sessions"]["memory_faults"], 0);
}

/// Regression (found by the fuzzer): a guest that places its TX avail ring at guest physical
/// address 0 (or so that the ring's `idx` is readable but its entries lie outside guest
/// memory) used to make the port's worker spin forever: `Queue::pop_descriptor_chain` yields
/// nothing while `enable_notification` keeps reporting new entries. The worker now gives up
/// after two empty passes and waits for the next kick.
#[test]
fn avail_ring_at_guest_address_zero() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = missing_prereqs() {
        testkit::guest::skip_or_fail("hostile (avail ring at GPA 0)", &why);
        return;
    }
    let mut env = Env::start();
    env.healthy("baseline");
    {
        let mut s = Session::negotiate(&env.sock_a).unwrap();
        let mut ring = Ring::new(TX, QSIZE);
        // The descriptor table keeps its place; the avail ring moves to 0, over nothing else.
        ring.avail = 0;
        ring.setup(&s.fe, &s.mem).unwrap();
        ring.push_tx(&s.mem, &tx_frame(SRC_MAC, 100, 5));
        ring.kick();
        s.rings.push(ring);
        std::thread::sleep(Duration::from_millis(300));
        let cpu0 = env.cpu_ticks();
        std::thread::sleep(Duration::from_millis(500));
        let burned = env.cpu_ticks() - cpu0;
        assert!(burned < 25, "the daemon burned {burned} ticks in 0.5 s");
    }
    env.healthy("avail ring at GPA 0");
}
