//! Hostile peers against the session machinery around the relay (not against the device):
//!
//! - a local process squatting the abstract names the daemon once used for its private
//!   channel to the request handler, and racing to connect to any private socket it can find;
//! - a frontend that pipelines thousands of requests and never reads the replies;
//! - a VMM (client mode) that accepts the daemon's connection and closes it at once, forever;
//! - a frontend that hands the daemon more file descriptors than a session needs;
//! - and, for all of them, what a compromised session thread would find: the threads that
//!   serve a session run as an unprivileged identity with no capability, and those that parse
//!   frontend or guest input cannot make or connect a socket.
//!
//! Each test runs its own daemon with a tap in a private network namespace
//! (`testkit::netns::in_new_netns`). Needs root and /dev/net/tun: skipped otherwise, failed under
//! `CI=true`. Run: `cargo test --release --test hostile_session -- --nocapture`.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use testkit::netns::{self, can_run, in_new_netns, Daemon, TempDir};
use testkit::vhost_driver::*;

const TAP: &str = "vphs0";
const SRC_MAC: [u8; 6] = [0x02, 0x68, 0x73, 0x00, 0x00, 0x01];
const QSIZE: u16 = 64;
const TX: u32 = 1;
/// The identity port threads switch to by default (`--sandbox-uid`, `--sandbox-gid`).
const SANDBOX_ID: u32 = 65530;

/// A server-mode daemon on `dir/vu.sock` with a control socket at `dir/control.sock`.
fn start_daemon(dir: &TempDir) -> (Daemon, PathBuf, PathBuf) {
    let sock = dir.join("vu.sock");
    let control = dir.join("control.sock");
    let d = Daemon::start(
        &sock,
        TAP,
        &["--control", control.to_str().unwrap()],
        &dir.join("daemon.log"),
    );
    assert!(
        netns::wait_until(Duration::from_secs(10), || control.exists()),
        "control socket never appeared"
    );
    (d, sock, control)
}

/// `vhost-pump ctl stats`: the one port's object.
fn stats(control: &Path) -> serde_json::Value {
    netns::ctl_json(control, &["stats"])[0].clone()
}

/// A per-session event counter of the port (`sessions.NAME` in `ctl stats`).
fn session_counter(control: &Path, name: &str) -> u64 {
    let s = stats(control);
    s["sessions"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no sessions.{name} in {s}"))
}

/// A well-behaved frontend: negotiates, sets up the TX ring, has one frame consumed and stops
/// the ring (GET_VRING_BASE).
fn good_session(sock: &Path) -> Result<(), String> {
    let mut s = Session::good(sock, &[TX], QSIZE).map_err(|e| format!("setup: {e}"))?;
    s.send_frame(TX, &tx_frame(SRC_MAC, 100, 9))
        .map_err(|e| format!("frame: {e}"))?;
    let base =
        s.fe.get_vring_base(TX)
            .map_err(|e| format!("GET_VRING_BASE: {e}"))?;
    if base != 1 {
        return Err(format!("GET_VRING_BASE {base}, expected 1"));
    }
    Ok(())
}

/// What the open fds of process `pid` refer to, sorted.
fn fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Asserts the daemon burns almost no CPU over one quiet second; returns what it used.
fn assert_idle(d: &Daemon, when: &str) -> Duration {
    let before = d.cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = d.cpu_time().saturating_sub(before);
    assert!(
        used < Duration::from_millis(100),
        "{when}: the daemon used {used:?} of CPU in one idle second (spinning?)"
    );
    used
}

// ---------------------------------------------------------------------------------------------

/// Connects to every private listener found in the namespace and records whether any of those
/// connections is ever answered like a frontend (it must not be).
struct Racer {
    connects: AtomicU64,
    denied: AtomicU64,
    served: AtomicU64,
    found: std::sync::Mutex<Vec<String>>,
}

impl Racer {
    fn new() -> Racer {
        Racer {
            connects: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            served: AtomicU64::new(0),
            found: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Races until `stop`: looks for listening sockets that are not `public`, connects, sends
    /// GET_FEATURES on each connection and watches for a reply. Keeps at most 8 open at once.
    fn run(&self, public: &[PathBuf], squatted: &[String], stop: &AtomicBool) {
        let mut held: Vec<UnixStream> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            for name in unix_listeners() {
                let ours = public.iter().any(|p| p.to_str() == Some(name.as_str()))
                    || squatted.contains(&name);
                if ours {
                    continue;
                }
                {
                    let mut found = self.found.lock().unwrap();
                    if !found.contains(&name) {
                        found.push(name.clone());
                    }
                }
                if held.len() >= 8 {
                    continue;
                }
                let conn = match name.strip_prefix('@') {
                    Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes())
                        .and_then(|a| UnixStream::connect_addr(&a)),
                    None => UnixStream::connect(&name),
                };
                match conn {
                    Ok(s) => {
                        self.connects.fetch_add(1, Ordering::Relaxed);
                        let _ = (&s).write_all(&header(req::GET_FEATURES, F_VERSION_1, 0));
                        let _ = s.set_nonblocking(true);
                        held.push(s);
                    }
                    Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                        self.denied.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
            held.retain(|s| {
                let mut b = [0u8; 64];
                match (&*s).read(&mut b) {
                    Ok(0) => false,
                    Ok(_) => {
                        self.served.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    Err(e) => e.kind() == ErrorKind::WouldBlock,
                }
            });
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Makes the calling thread (only) an unprivileged user: uid and gid 65534, no capabilities.
fn become_nobody() {
    // SAFETY: raw setresgid/setresuid change the credentials of the calling thread only (the
    // libc wrappers would change every thread of the test process); plain integer arguments.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
            0
        );
        assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
        assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
    }
}

#[test]
fn private_channel_cannot_be_squatted_or_reached_by_other_processes() {
    if !can_run("private_channel_cannot_be_squatted_or_reached_by_other_processes") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("hs-private");
        let (mut d, sock, control) = start_daemon(&dir);
        // The names the daemon derived from its pid and a session counter.
        let squatted: Vec<String> = (0..256)
            .map(|n| format!("vhost-pump/{}/{n}", d.pid()))
            .collect();
        let _squatters: Vec<UnixListener> = squatted
            .iter()
            .map(|n| {
                let addr = SocketAddr::from_abstract_name(n.as_bytes()).unwrap();
                UnixListener::bind_addr(&addr).unwrap_or_else(|e| panic!("bind @{n}: {e}"))
            })
            .collect();
        let squatted: Vec<String> = squatted.iter().map(|n| format!("@{n}")).collect();
        let public = [sock.clone(), control.clone()];
        let (root, nobody) = (Racer::new(), Racer::new());
        let stop = AtomicBool::new(false);
        let outcomes = std::thread::scope(|s| {
            s.spawn(|| root.run(&public, &squatted, &stop));
            s.spawn(|| {
                become_nobody();
                nobody.run(&public, &squatted, &stop)
            });
            let outcomes: Vec<Result<(), String>> = (0..6).map(|_| good_session(&sock)).collect();
            stop.store(true, Ordering::Relaxed);
            outcomes
        });
        d.assert_alive();
        for (i, o) in outcomes.iter().enumerate() {
            if let Err(e) = o {
                panic!(
                    "session {i} failed with the names squatted and racers around: {e}\n\
                     --- daemon log ---\n{}",
                    d.log_text()
                );
            }
        }
        // One more session: it clears whatever the racers left queued.
        good_session(&sock).unwrap();
        let found = root.found.lock().unwrap().clone();
        let (connects, served) = (
            root.connects.load(Ordering::Relaxed),
            root.served.load(Ordering::Relaxed),
        );
        let (n_connects, n_denied) = (
            nobody.connects.load(Ordering::Relaxed),
            nobody.denied.load(Ordering::Relaxed),
        );
        let refused = session_counter(&control, "refused_peers");
        println!(
            "private listeners found: {found:?}; root racer: {connects} connections, {served} \
             served; unprivileged racer: {n_connects} connections, {n_denied} denied; daemon \
             refused {refused} peers"
        );
        assert_eq!(served, 0, "a racer was served on the private channel");
        assert_eq!(
            n_connects, 0,
            "an unprivileged process reached the private channel"
        );
        assert!(
            connects == 0 || refused > 0,
            "the root racer connected {connects} times, the daemon counted no refused peer"
        );
        // Whatever the channel is, it is nothing another user can reach: a 0700 directory of
        // the identity the port threads run as.
        for name in &found {
            assert!(!name.starts_with('@'), "private channel {name} is abstract");
            let parent = Path::new(name).parent().unwrap();
            let md = std::fs::metadata(parent).unwrap();
            assert_eq!(
                (md.permissions().mode() & 0o777, md.uid()),
                (0o700, SANDBOX_ID),
                "directory of {name}"
            );
        }
        assert!(
            connects == 0 || d.log_text().contains("refused a connection"),
            "no log line for the refused peers"
        );
    });
}

// ---------------------------------------------------------------------------------------------

/// Pipelines GET_FEATURES on a fresh connection without reading anything, until one write
/// has waited `jam` (the pipeline is full; a blocked writer is only woken once the buffer has
/// drained to a quarter, so it may then still succeed) or fails (the daemon gave up on us), or
/// `max` requests are out.
fn flood(sock: &Path, jam: Duration, max: usize) -> (UnixStream, usize) {
    let s = UnixStream::connect(sock).unwrap();
    s.set_write_timeout(Some(jam)).unwrap();
    let msg = header(req::GET_FEATURES, F_VERSION_1, 0);
    let mut sent = 0;
    while sent < max {
        let t = Instant::now();
        let ok = (&s).write_all(&msg).is_ok();
        if !ok || t.elapsed() >= jam {
            break;
        }
        sent += 1;
    }
    (s, sent)
}

#[test]
fn frontend_that_never_reads_replies_does_not_wedge_the_port() {
    if !can_run("frontend_that_never_reads_replies_does_not_wedge_the_port") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("hs-flood");
        let (mut d, sock, control) = start_daemon(&dir);
        good_session(&sock).unwrap();
        let threads = |d: &Daemon| {
            std::fs::read_dir(format!("/proc/{}/task", d.pid()))
                .map(|r| r.count())
                .unwrap_or(0)
        };
        let threads_idle = threads(&d);

        // 1. Flood, then hang up.
        let (s, sent) = flood(&sock, Duration::from_millis(300), 20_000);
        let _ = s.shutdown(Shutdown::Both);
        drop(s);
        let t = Instant::now();
        let served = good_session(&sock);
        let after_hangup = t.elapsed();
        d.assert_alive();
        assert!(
            served.is_ok() && after_hangup < Duration::from_secs(5),
            "after {sent} unread GET_FEATURES and a hang-up, the next frontend: {served:?} \
             after {after_hangup:?}\n--- daemon log ---\n{}",
            d.log_text()
        );
        let cpu1 = assert_idle(&d, "after the flood and hang-up");
        // Hanging up is not stalling: nothing waited for the send timeout.
        let stalled_by_hangup = session_counter(&control, "stalled_frontends");

        // 2. Flood and stay connected, never reading: the daemon gives up on us, and a queued
        // frontend gets served.
        let (s, sent2) = flood(&sock, Duration::from_millis(300), 20_000);
        let t = Instant::now();
        let next = Frontend::connect(&sock).unwrap();
        next.socket()
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        next.send(req::GET_FEATURES, F_VERSION_1, &[], &[]).unwrap();
        let reply = next.recv();
        let waited = t.elapsed();
        assert!(
            matches!(reply, Ok((r, _, ref b)) if r == req::GET_FEATURES && b.len() == 8),
            "queued frontend behind a non-reading one: {reply:?} after {waited:?}\n\
             --- daemon log ---\n{}",
            d.log_text()
        );
        // The stalled frontend was disconnected: its socket ends after the replies that fit.
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let closed = loop {
            match (&s).read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        assert!(closed, "the non-reading frontend is still connected");
        drop(next);
        drop(s);
        good_session(&sock).unwrap();
        let cpu2 = assert_idle(&d, "after the stalled frontend");
        let stalled = session_counter(&control, "stalled_frontends") - stalled_by_hangup;
        let logged = d.log_text().matches("stopped reading").count() as u64;
        assert_eq!(stalled, 1, "stalled frontends counted");
        assert_eq!(
            logged,
            stalled + stalled_by_hangup,
            "one log line per stalled frontend, not per message"
        );
        assert!(
            netns::wait_until(Duration::from_secs(10), || threads(&d) <= threads_idle),
            "threads: {} idle before, {} now",
            threads_idle,
            threads(&d)
        );
        println!(
            "flood 1: {sent} unread requests, hang-up, next frontend served after \
             {after_hangup:?}, CPU {cpu1:?}/s; flood 2: {sent2} unread requests, connection \
             kept, queued frontend served after {waited:?}, CPU {cpu2:?}/s; stalled counted: \
             {stalled_by_hangup} after the hang-up, {stalled} for the kept connection; threads \
             {threads_idle}"
        );
    });
}

// ---------------------------------------------------------------------------------------------

#[test]
fn client_mode_backs_off_from_a_vmm_that_hangs_up_at_once() {
    if !can_run("client_mode_backs_off_from_a_vmm_that_hangs_up_at_once") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("hs-client");
        let vmm_sock = dir.join("vmm.sock");
        let vmm = UnixListener::bind(&vmm_sock).unwrap();
        vmm.set_nonblocking(true).unwrap();
        let log = dir.join("daemon.log");
        let mut d = Daemon::spawn(
            &[
                "--socket",
                vmm_sock.to_str().unwrap(),
                "--tap",
                TAP,
                "--client",
            ],
            &log,
        )
        .unwrap();
        let accept = |until: Instant| -> Option<UnixStream> {
            while Instant::now() < until {
                match vmm.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        return Some(s);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            None
        };
        let first = accept(Instant::now() + Duration::from_secs(10)).expect("never connected");
        drop(first);
        // Accept and hang up at once, for three seconds.
        let t = Instant::now();
        let mut connections = 1;
        while let Some(s) = accept(t + Duration::from_secs(3)) {
            drop(s);
            connections += 1;
        }
        d.assert_alive();
        let text = d.log_text();
        let lines = text.lines().count();
        assert!(
            (2..20).contains(&connections),
            "{connections} connections in 3 s against a VMM that hangs up at once\n\
             --- daemon log (first 40 lines) ---\n{}",
            text.lines().take(40).collect::<Vec<_>>().join("\n")
        );
        assert!(
            lines < 40,
            "{lines} log lines after {connections} short sessions\n--- daemon log ---\n{}",
            text.lines().take(60).collect::<Vec<_>>().join("\n")
        );
        // A VMM that behaves gets served again once it answers.
        let s = accept(Instant::now() + Duration::from_secs(10)).expect("daemon gave up");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (&s).write_all(&header(req::GET_FEATURES, F_VERSION_1, 0))
            .unwrap();
        let mut reply = [0u8; 20];
        (&s).read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &req::GET_FEATURES.to_le_bytes());
        println!("{connections} connections in 3 s, {lines} log lines");
    });
}

// ---------------------------------------------------------------------------------------------

#[test]
fn session_holding_too_many_fds_is_ended_and_its_fds_released() {
    if !can_run("session_holding_too_many_fds_is_ended_and_its_fds_released") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("hs-fds");
        let (mut d, sock, control) = start_daemon(&dir);
        good_session(&sock).unwrap();
        let pid = d.pid();
        let settle = || {
            let mut last = open_fd_count(pid);
            let t = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let now = open_fd_count(pid);
                if now == last || t.elapsed() > Duration::from_secs(3) {
                    return now;
                }
                last = now;
            }
        };
        let baseline = settle();
        let fds_idle = fd_targets(pid);

        let mut fe = Frontend::connect(&sock).unwrap();
        let offered = fe.get_features().unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            proto & ((1 << PROTO_REPLY_ACK) | (1 << PROTO_CONFIGURE_MEM_SLOTS)),
        )
        .unwrap();
        fe.set_owner().unwrap();
        let want = (1u64 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES);
        assert_eq!(offered & want, want);
        fe.set_features(want).unwrap();
        let slots = fe.get_u64(req::GET_MAX_MEM_SLOTS).unwrap();
        let mem = GuestMem::new(1 << 20).unwrap();
        // A table of 8 regions, then one region after the other.
        let table: Vec<MemRegion> = (0..8u64)
            .map(|i| MemRegion {
                gpa: i << 21,
                size: 4096,
                uva: mem.uva(0) + (i << 21),
                offset: 0,
            })
            .collect();
        fe.set_mem_table(&table, &[mem.fd(); 8]).unwrap();
        let mut accepted = 0u64;
        let mut peak = 0;
        let mut refusal = None;
        for i in 8..300u64 {
            let r = MemRegion {
                gpa: i << 21,
                size: 4096,
                uva: mem.uva(0) + (i << 21),
                offset: 0,
            };
            match fe.add_mem_reg(&r, mem.fd()) {
                Ok(()) => accepted += 1,
                Err(e) => {
                    refusal = Some(e);
                    break;
                }
            }
            peak = peak.max(open_fd_count(pid));
        }
        let held = peak.saturating_sub(baseline);
        assert!(
            refusal.is_some() && held < 128,
            "8 table regions then {accepted} ADD_MEM_REG accepted; the daemon held {held} fds \
             over its idle {baseline} (announced {slots} slots)"
        );
        assert!(
            fe.closed_by_peer(Duration::from_secs(3)),
            "the session that went over its fd budget was not ended"
        );
        drop(fe);
        drop(mem);
        let after = settle();
        d.assert_alive();
        assert!(
            netns::wait_until(Duration::from_secs(5), || open_fd_count(pid) <= baseline),
            "fds: {baseline} idle before, {after} after the session ended\nbefore: \
             {fds_idle:?}\nafter: {:?}",
            fd_targets(pid)
        );
        assert!(session_counter(&control, "fd_budget_exceeded") >= 1);
        assert!(d.log_text().contains("file descriptors"));
        good_session(&sock).unwrap();
        println!(
            "announced {slots} memory slots; 8 table regions + {accepted} ADD_MEM_REG accepted, \
             then refused ({}); peak {peak} fds (idle {baseline}, +{held}); {after} after",
            refusal.unwrap()
        );
    });
}

// ---------------------------------------------------------------------------------------------

/// The lines of `/proc/PID/task/TID/status` the sandbox shows in.
#[derive(Debug)]
struct TaskCreds {
    name: String,
    uid: u32,
    gid: u32,
    cap_eff: u64,
    no_new_privs: bool,
    seccomp_filters: u32,
}

fn task_creds(pid: u32) -> Vec<TaskCreds> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|r| r.trim().to_string())
                .unwrap_or_else(|| panic!("no {k} in {status}"))
        };
        let first = |k: &str| field(k).split_whitespace().next().unwrap().parse().unwrap();
        v.push(TaskCreds {
            name: field("Name:"),
            uid: first("Uid:"),
            gid: first("Gid:"),
            cap_eff: u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
            no_new_privs: field("NoNewPrivs:") == "1",
            seccomp_filters: field("Seccomp_filters:").parse().unwrap(),
        });
    }
    v
}

#[test]
fn session_threads_are_unprivileged_and_input_threads_make_no_socket() {
    if !can_run("session_threads_are_unprivileged_and_input_threads_make_no_socket") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("hs-creds");
        let (mut d, sock, _control) = start_daemon(&dir);
        // A session in progress: negotiated, TX ring running, one frame through.
        let mut s = Session::good(&sock, &[TX], QSIZE).unwrap();
        s.send_frame(TX, &tx_frame(SRC_MAC, 100, 9)).unwrap();
        let tasks = task_creds(d.pid());
        println!("{tasks:#?}");
        let sandboxed: Vec<&TaskCreds> = tasks.iter().filter(|t| t.seccomp_filters > 0).collect();
        // The port thread; the session thread's children: vring worker(s); the request handler;
        // the relay's two threads.
        assert!(
            sandboxed.len() >= 5,
            "expected the port, worker, handler and relay threads under seccomp: {tasks:#?}"
        );
        for t in &sandboxed {
            assert_eq!(
                (t.uid, t.gid, t.cap_eff, t.no_new_privs),
                (SANDBOX_ID, SANDBOX_ID, 0, true),
                "thread {t:?}"
            );
        }
        let ports: Vec<&&TaskCreds> = sandboxed
            .iter()
            .filter(|t| t.name.starts_with("port-"))
            .collect();
        assert_eq!(ports.len(), 1, "one port thread: {sandboxed:#?}");
        assert_eq!(ports[0].seccomp_filters, 1, "the port thread keeps connect");
        for t in sandboxed.iter().filter(|t| !t.name.starts_with("port-")) {
            assert_eq!(
                t.seccomp_filters, 2,
                "thread {t:?} parses frontend or guest input: it must have the socket-less \
                 filter stacked"
            );
        }
        // The main thread (and the control plane) keep root: ports can still be added.
        let main = tasks
            .iter()
            .find(|t| t.seccomp_filters == 0)
            .expect("unsandboxed main thread");
        assert_eq!(main.uid, 0);
        // The session goes on working after all that.
        let base = s.fe.get_vring_base(TX).unwrap();
        assert_eq!(base, 1);
        drop(s);
        good_session(&sock).unwrap();
        d.assert_alive();
    });
}
