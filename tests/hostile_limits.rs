//! Resource limits against hostile or careless clients:
//!
//! - a flood of idle metrics connections, with the soft `RLIMIT_NOFILE` of 1024 systemd gives a
//!   service, must leave the daemon serving (a new vhost-user session, a scrape, a control
//!   `list`) at a small CPU and fd cost; the figures are printed;
//! - idle and slow metrics and control clients are dropped after the read timeout, a control
//!   client that takes no responses after the write timeout;
//! - the daemon raises its soft `RLIMIT_NOFILE` to the hard limit;
//! - the sidecar supervisor keeps the attachment log under its cap while vhost-pump runs;
//! - a port whose thread cannot be sandboxed is not served (unless `--no-sandbox`).
//!
//! The flood and sandbox tests need root (network namespace, tap): skipped otherwise, failed
//! under `CI=true`. Run with `--nocapture` to see the figures.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testkit::netns::{self, TempDir};
use testkit::vhost_driver::{tx_frame, Session};
use vhost_pump::control::{self, Request};

const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-pump");
const PLUGIN: &str = env!("CARGO_BIN_EXE_vhost-pump-cni");
/// vhost-user index of the first TX ring.
const TX: u32 = 1;
const SRC_MAC: [u8; 6] = [0x02, 0x6c, 0x69, 0x6d, 0x69, 0x74];

/// A daemon (or supervisor) child with its log, killed on drop; the log is printed if the test
/// fails.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `path` exists; panics if the process exits first or 10 s pass.
    fn wait_for(&mut self, path: &Path) {
        let t = Instant::now();
        while !path.exists() {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("exited ({s}) before {} appeared", path.display());
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{} never appeared",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- log {} ---\n{}",
                self.log.display(),
                tail(&self.log_text(), 60)
            );
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How the test starts the daemon.
#[derive(Default)]
struct Start {
    /// Soft `RLIMIT_NOFILE` to start it with (the hard limit is left as it is).
    nofile_soft: Option<u64>,
    /// A seccomp filter installed before exec (inherited by every thread of the daemon).
    filter: Option<seccompiler::BpfProgram>,
}

/// Spawns `program args` with its output in `log`, dying with the calling thread.
fn spawn(program: &str, args: &[&str], log: &Path, how: Start) -> Proc {
    let file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    netns::kill_with_parent_thread(&mut cmd);
    if let Some(soft) = how.nofile_soft {
        let (_, hard) = nofile_limits_self();
        // SAFETY: getrlimit/setrlimit are async-signal-safe and only touch the stack struct.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if let Some(filter) = how.filter {
        // SAFETY: apply_filter makes two system calls (prctl, seccomp) on a program built before
        // the fork; nothing is allocated on its success path, and its error is an OS error.
        unsafe {
            cmd.pre_exec(move || {
                seccompiler::apply_filter(&filter)
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))
            });
        }
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {program}: {e}"));
    Proc {
        child,
        log: log.into(),
    }
}

/// (soft, hard) `RLIMIT_NOFILE` of this process.
fn nofile_limits_self() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    (lim.rlim_cur, lim.rlim_max)
}

/// Makes room for `n` open files in this process (the clients of the flood), raising the hard
/// limit too when root.
fn ensure_own_nofile(n: u64) {
    let (soft, hard) = nofile_limits_self();
    if soft >= n {
        return;
    }
    let lim = libc::rlimit {
        rlim_cur: n.max(soft),
        rlim_max: hard.max(n),
    };
    // SAFETY: setrlimit only reads the struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(
        rc,
        0,
        "cannot raise RLIMIT_NOFILE to {n}: {}",
        std::io::Error::last_os_error()
    );
}

/// (soft, hard) "Max open files" of process `pid`, from /proc/PID/limits.
fn nofile_limits(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

/// Open file descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Connects to a Unix socket, retrying while it is not listening yet.
fn connect_unix(path: &Path) -> UnixStream {
    let t = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if t.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

/// How long the daemon takes to close `s` (EOF or reset), or `None` if it is still open after
/// `limit`.
fn closed_after(s: &mut impl Read, started: Instant, limit: Duration) -> Option<Duration> {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if started.elapsed() >= limit {
                    return None;
                }
            }
            Err(_) => return Some(started.elapsed()),
        }
    }
}

#[test]
fn soft_nofile_limit_is_raised_to_the_hard_limit() {
    let (_, hard) = nofile_limits_self();
    if hard <= 1024 {
        testkit::guest::skip_or_fail(
            "soft_nofile_limit_is_raised_to_the_hard_limit",
            &format!("the hard RLIMIT_NOFILE is {hard}: nothing to raise"),
        );
        return;
    }
    let dir = TempDir::new("limits-nofile");
    let control = dir.join("control.sock");
    let mut d = spawn(
        DAEMON,
        &[
            "--control",
            control.to_str().unwrap(),
            "--log-level",
            "debug",
        ],
        &dir.join("daemon.log"),
        Start {
            nofile_soft: Some(1024),
            ..Default::default()
        },
    );
    d.wait_for(&control);
    let (soft, hard_seen) = nofile_limits(d.pid());
    println!("daemon started with soft 1024, hard {hard}: /proc/PID/limits says soft {soft}, hard {hard_seen}");
    assert_eq!(
        (soft, hard_seen),
        (hard, hard),
        "the daemon kept its soft RLIMIT_NOFILE"
    );
    assert!(
        d.log_text().contains("raised RLIMIT_NOFILE"),
        "no debug line about the new limit"
    );
}

/// A named client behaviour, returning when the daemon closed the connection.
type Case<'a> = (&'a str, Box<dyn FnOnce() -> Option<Duration> + Send + 'a>);

#[test]
fn idle_and_slow_metrics_and_control_clients_are_dropped_after_the_read_timeout() {
    let dir = TempDir::new("limits-idle");
    let (control, metrics) = (dir.join("control.sock"), dir.join("metrics.sock"));
    let mut d = spawn(
        DAEMON,
        &[
            "--control",
            control.to_str().unwrap(),
            "--metrics",
            &format!("unix:{}", metrics.display()),
        ],
        &dir.join("daemon.log"),
        Start::default(),
    );
    d.wait_for(&control);
    d.wait_for(&metrics);
    // Closed by the timeout: not at once, and not much after it.
    let timeout = vhost_pump::metrics::READ_TIMEOUT.max(control::READ_TIMEOUT);
    let limit = timeout + Duration::from_secs(4);
    let results: Vec<(&str, Option<Duration>)> = std::thread::scope(|s| {
        let cases: Vec<Case<'_>> = vec![
            (
                "metrics, nothing sent",
                Box::new(|| {
                    let mut c = connect_unix(&metrics);
                    c.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    closed_after(&mut c, Instant::now(), limit)
                }),
            ),
            (
                "metrics, request sent one byte every 400 ms",
                Box::new(|| {
                    let mut c = connect_unix(&metrics);
                    let t = Instant::now();
                    let mut w = c.try_clone().unwrap();
                    std::thread::spawn(move || {
                        for b in b"GET /metrics HTTP/1.1\r\nHost: a-very-slow-client\r\n".iter() {
                            if w.write_all(&[*b]).is_err() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(400));
                        }
                    });
                    c.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    closed_after(&mut c, t, limit)
                }),
            ),
            (
                "control, nothing sent",
                Box::new(|| {
                    let mut c = connect_unix(&control);
                    c.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    closed_after(&mut c, Instant::now(), limit)
                }),
            ),
            (
                "control, idle after one answered request",
                Box::new(|| {
                    let mut c = connect_unix(&control);
                    c.write_all(b"{\"op\":\"list\"}\n").unwrap();
                    let mut r = BufReader::new(c.try_clone().unwrap());
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    assert!(line.contains("\"ok\":true"), "{line}");
                    let t = Instant::now();
                    c.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    closed_after(&mut c, t, limit)
                }),
            ),
        ];
        let handles: Vec<_> = cases
            .into_iter()
            .map(|(name, f)| (name, s.spawn(f)))
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| (name, h.join().unwrap()))
            .collect()
    });
    for (name, r) in &results {
        println!("{name}: closed by the daemon after {r:?} (read timeout {timeout:?})");
    }
    for (name, r) in results {
        let Some(after) = r else {
            panic!("{name}: still open {limit:?} later");
        };
        assert!(
            after >= timeout - Duration::from_millis(500),
            "{name}: closed after {after:?}, before the read timeout"
        );
    }
    // The daemon still answers.
    let r = control::request_within(&control, &Request::List, Some(Duration::from_secs(5)));
    assert!(r.is_ok_and(|r| r.ok));
}

#[test]
fn control_client_that_takes_no_responses_is_dropped_after_the_write_timeout() {
    let dir = TempDir::new("limits-write");
    let control = dir.join("control.sock");
    let mut d = spawn(
        DAEMON,
        &["--control", control.to_str().unwrap()],
        &dir.join("daemon.log"),
        Start::default(),
    );
    d.wait_for(&control);
    let c = connect_unix(&control);
    // 1 MiB of two-byte bad requests: about 70 bytes of error response each, far more than the
    // socket buffers hold while nobody reads.
    const LINES: usize = 512 * 1024;
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = b"x\n".repeat(32 * 1024);
        let mut sent = 0;
        while sent < LINES {
            if w.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() / 2;
        }
        sent
    });
    std::thread::sleep(control::WRITE_TIMEOUT + Duration::from_secs(3));
    // Now read what there is: the connection must end well before all answers came.
    let mut r = BufReader::new(c);
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answers = 0usize;
    let mut line = Vec::new();
    let ended = loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) => break true,
            Ok(_) => answers += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    let sent = writer.join().unwrap();
    println!(
        "control client sent {sent} of {LINES} requests without reading, then read {answers} \
         answers before the connection ended"
    );
    assert!(ended, "the connection neither ended nor answered");
    assert!(
        answers < LINES / 2,
        "the daemon waited for a client that took no responses ({answers} answers)"
    );
    let r = control::request_within(&control, &Request::List, Some(Duration::from_secs(5)));
    assert!(r.is_ok_and(|r| r.ok));
}

/// Opens up to `n` TCP connections to `addr` that send nothing, counting them in `opened`;
/// gives up after 20 failures or at `deadline`.
fn open_idle(
    addr: SocketAddr,
    n: usize,
    opened: &AtomicUsize,
    deadline: Instant,
) -> (Vec<TcpStream>, usize) {
    let (mut held, mut failed) = (Vec::with_capacity(n), 0);
    while held.len() < n && failed < 20 && Instant::now() < deadline {
        // Longer than the first SYN retransmission (1 s), for a queue that overflowed while
        // the machine was busy.
        match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(s) => {
                held.push(s);
                opened.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => failed += 1,
        }
    }
    (held, failed)
}

/// Opens `rate` connections a second to `addr` for `secs`, each held `hold` and never used,
/// counting them in `counter` too.
fn stream_idle(
    addr: SocketAddr,
    rate: u32,
    secs: f64,
    hold: Duration,
    counter: &AtomicUsize,
) -> (usize, usize) {
    let start = Instant::now();
    let mut open = std::collections::VecDeque::new();
    let (mut opened, mut failed) = (0usize, 0usize);
    let gap = Duration::from_secs(1) / rate;
    while start.elapsed().as_secs_f64() < secs {
        let due = start + gap * (opened + failed) as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(s) => {
                opened += 1;
                counter.fetch_add(1, Ordering::Relaxed);
                open.push_back((Instant::now(), s));
            }
            Err(_) => failed += 1,
        }
        while open.front().is_some_and(|(t, _)| t.elapsed() > hold) {
            open.pop_front();
        }
    }
    (opened, failed)
}

/// `GET /metrics` over TCP: the status line and the body.
fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    if out.starts_with("HTTP/1.1 200") && out.contains("vhost_pump_port_connected{port=\"main\"}") {
        Ok(out)
    } else {
        Err(format!("unexpected answer: {:?}", tail(&out, 5)))
    }
}

/// What the flood test saw.
struct FloodReport {
    held: usize,
    held_failed: usize,
    held_in: Duration,
    streamed: usize,
    stream_failed: usize,
    /// When the session, scrape and list started, and how many connections were held then.
    checks_at: (Duration, usize),
    session: (Result<(), String>, Duration),
    scrape: (Result<(), String>, Duration),
    list: (Result<(), String>, Duration),
    /// The whole flood, and the daemon's CPU time in it.
    elapsed: Duration,
    cpu: Duration,
    /// The first seconds (while connections streamed in), and the daemon's CPU time in them.
    stream_elapsed: Duration,
    stream_cpu: Duration,
    fds_end: usize,
}

/// `f`'s result and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    (f(), t.elapsed())
}

#[test]
fn metrics_flood_with_1024_soft_fd_limit_leaves_the_daemon_serving() {
    const TEST: &str = "metrics_flood_with_1024_soft_fd_limit_leaves_the_daemon_serving";
    if let Some(why) = netns::missing_prereqs() {
        testkit::guest::skip_or_fail(TEST, &why);
        return;
    }
    // The test's own clients: 2,000 held plus about 1,500 streamed.
    ensure_own_nofile(8192);
    netns::in_new_netns(|| {
        const TAP: &str = "vpl-flood";
        const HELD: usize = 2000;
        let dir = TempDir::new("limits-flood");
        let (sock, control) = (dir.join("vm.sock"), dir.join("control.sock"));
        let addr: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        let mut d = spawn(
            DAEMON,
            &[
                "--socket",
                sock.to_str().unwrap(),
                "--tap",
                TAP,
                "--metrics",
                &addr.to_string(),
                "--control",
                control.to_str().unwrap(),
            ],
            &dir.join("daemon.log"),
            Start {
                nofile_soft: Some(1024),
                ..Default::default()
            },
        );
        d.wait_for(&sock);
        d.wait_for(&control);
        assert!(
            netns::wait_until(Duration::from_secs(5), || TcpStream::connect(addr).is_ok()),
            "metrics endpoint not listening"
        );
        netns::ip(&["link", "set", TAP, "up"]);
        let pid = d.pid();
        let limits = nofile_limits(pid);
        let fds_before = fd_count(pid);
        let max_fds = AtomicUsize::new(fds_before);
        let done = AtomicBool::new(false);
        let opened = AtomicUsize::new(0);
        let cpu_before = netns::cpu_time(pid).unwrap();
        let t0 = Instant::now();
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    max_fds.fetch_max(fd_count(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            // The flood: 2,000 connections opened as fast as they go and held, and meanwhile
            // 500 more a second for 3 s, each held 2 s. None sends a byte.
            let holder = s.spawn(|| {
                let r = open_idle(addr, HELD, &opened, t0 + Duration::from_secs(15));
                (r, t0.elapsed())
            });
            let streamer = s.spawn(|| {
                let r = stream_idle(addr, 500, 3.0, Duration::from_secs(2), &opened);
                (r, netns::cpu_time(pid).unwrap() - cpu_before, t0.elapsed())
            });
            // Once the daemon would be past the 1024 soft limit it started with, had it kept
            // every connection (or after 5 s): a new vhost-user session, a scrape and a control
            // request.
            netns::wait_until(Duration::from_secs(5), || {
                opened.load(Ordering::Relaxed) > 1100
            });
            let checks_at = (t0.elapsed(), opened.load(Ordering::Relaxed));
            let session = timed(|| {
                let mut s = Session::good(&sock, &[TX], 64).map_err(|e| e.to_string())?;
                s.send_frame(TX, &tx_frame(SRC_MAC, 100, 3))
                    .map_err(|e| e.to_string())?;
                s.fe.get_vring_base(TX)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            let scrape = timed(|| scrape(addr).map(|_| ()));
            let list = timed(|| {
                let timeout = Some(Duration::from_secs(5));
                match control::request_within(&control, &Request::List, timeout) {
                    Ok(r) if r.ok && r.ports.iter().flatten().any(|p| p.name == "main") => Ok(()),
                    Ok(r) => Err(format!("{r:?}")),
                    Err(e) => Err(e.to_string()),
                }
            });
            let ((streamed, stream_failed), stream_cpu, stream_elapsed) = streamer.join().unwrap();
            let ((held, held_failed), held_in) = holder.join().unwrap();
            let elapsed = t0.elapsed();
            let cpu = netns::cpu_time(pid).unwrap() - cpu_before;
            let report = FloodReport {
                held: held.len(),
                held_failed,
                held_in,
                streamed,
                stream_failed,
                checks_at,
                session,
                scrape,
                list,
                elapsed,
                cpu,
                stream_elapsed,
                stream_cpu,
                fds_end: fd_count(pid),
            };
            done.store(true, Ordering::Relaxed);
            drop(held);
            report
        });
        let share = r.cpu.as_secs_f64() / r.elapsed.as_secs_f64();
        let stream_share = r.stream_cpu.as_secs_f64() / r.stream_elapsed.as_secs_f64();
        let max_fds = max_fds.load(Ordering::Relaxed);
        println!(
            "flood: {} idle metrics connections held (opened in {:.2?}, {} failed), and {} more \
             at 500/s held 2 s each ({} failed); checks started at {:.2?}, after {} connections",
            r.held,
            r.held_in,
            r.held_failed,
            r.streamed,
            r.stream_failed,
            r.checks_at.0,
            r.checks_at.1
        );
        println!(
            "daemon CPU over the flood: {:.0} ms in {:.2?} = {:.1} % of one core; in its first \
             {:.2?}: {:.0} ms = {:.1} %",
            r.cpu.as_secs_f64() * 1000.0,
            r.elapsed,
            share * 100.0,
            r.stream_elapsed,
            r.stream_cpu.as_secs_f64() * 1000.0,
            stream_share * 100.0
        );
        println!(
            "daemon fds: {fds_before} before, at most {max_fds} during, {} at the end; \
             RLIMIT_NOFILE soft {} hard {} (started with soft 1024)",
            r.fds_end, limits.0, limits.1
        );
        for (what, (res, took)) in [
            ("vhost-user session", &r.session),
            ("metrics scrape", &r.scrape),
            ("control list", &r.list),
        ] {
            println!("{what} during the flood: {res:?} in {took:.2?}");
        }
        if let Ok(Some(s)) = d.child.try_wait() {
            panic!("the daemon died during the flood: {s}");
        }
        assert!(
            r.held_failed < HELD / 10,
            "the test could not open its idle connections ({} failed)",
            r.held_failed
        );
        assert!(r.session.0.is_ok(), "vhost-user session: {:?}", r.session.0);
        assert!(r.scrape.0.is_ok(), "scrape: {:?}", r.scrape.0);
        assert!(r.list.0.is_ok(), "control list: {:?}", r.list.0);
        assert!(
            share.max(stream_share) < 0.5,
            "the daemon used {:.0} % of a core during the flood ({:.0} % in its first {:.2?})",
            share * 100.0,
            stream_share * 100.0,
            r.stream_elapsed
        );
        // The metrics cap, one connection being accepted, and the vhost-user session's own fds
        // (its socket, the guest memory, eventfds, the relay's socket pair).
        let cap = vhost_pump::metrics::MAX_CONNS;
        assert!(
            max_fds <= fds_before + cap + 32,
            "the daemon held up to {max_fds} fds ({fds_before} before the flood, metrics cap {cap})"
        );
    });
}

/// A seccomp filter that refuses seccomp(2) itself (as a restrictive container runtime may),
/// so the daemon's port threads cannot install theirs.
fn no_seccomp_filter() -> seccompiler::BpfProgram {
    use seccompiler::{SeccompAction, SeccompFilter};
    let rules = [(libc::SYS_seccomp, Vec::new())].into_iter().collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap()
    .try_into()
    .unwrap()
}

#[test]
fn port_that_cannot_be_sandboxed_is_not_served() {
    const TEST: &str = "port_that_cannot_be_sandboxed_is_not_served";
    if let Some(why) = netns::missing_prereqs() {
        testkit::guest::skip_or_fail(TEST, &why);
        return;
    }
    netns::in_new_netns(|| {
        const TAP: &str = "vpl-sbx";
        let dir = TempDir::new("limits-sandbox");
        let sock = dir.join("vm.sock");
        let args = ["--socket", sock.to_str().unwrap(), "--tap", TAP];
        let log = dir.join("daemon.log");
        let mut d = spawn(
            DAEMON,
            &args,
            &log,
            Start {
                filter: Some(no_seccomp_filter()),
                ..Default::default()
            },
        );
        let exit = netns::wait_child(&mut d.child, Duration::from_secs(10)).unwrap();
        let text = d.log_text();
        println!(
            "seccomp(2) refused: daemon {exit:?}, socket left: {}, log:\n{}",
            sock.exists(),
            tail(&text, 5)
        );
        let Some(status) = exit else {
            panic!("the daemon serves a port it could not sandbox");
        };
        assert!(!status.success(), "{status}");
        assert!(
            text.contains("cannot sandbox") && text.contains("--no-sandbox"),
            "no clear error in the log"
        );
        assert!(
            !sock.exists(),
            "the socket of the refused port was left behind"
        );

        // --no-sandbox is the way to serve it anyway.
        let mut d = spawn(
            DAEMON,
            &[&args[..], &["--no-sandbox"]].concat(),
            &log,
            Start {
                filter: Some(no_seccomp_filter()),
                ..Default::default()
            },
        );
        d.wait_for(&sock);
        let mut s = Session::good(&sock, &[TX], 64).expect("session on the unsandboxed port");
        netns::ip(&["link", "set", TAP, "up"]);
        s.send_frame(TX, &tx_frame(SRC_MAC, 100, 5)).unwrap();
        assert!(d.child.try_wait().unwrap().is_none());
        println!("with --no-sandbox: the port serves");
    });
}

#[test]
fn sidecar_log_is_capped_while_the_daemon_runs() {
    use vhost_pump::cni::config::{SocketPerms, VhostUserMode};
    use vhost_pump::cni::sidecar::{SidecarSpec, LOG_LIMIT};
    let dir = TempDir::new("limits-sidecar");
    // A chatty stand-in for vhost-pump: 2.5 times the cap at once, then quiet but running.
    let marker = dir.join("written");
    let script = dir.join("chatty-daemon");
    let total = LOG_LIMIT * 5 / 2;
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nyes 'a line from a very chatty daemon' | head -c {total} >&2\n\
             : > '{}'\nexec sleep 60\n",
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let spec = SidecarSpec {
        daemon: script.clone(),
        args: Vec::new(),
        pid_file: dir.join("daemon.pid"),
        socket: dir.join("unused.sock"),
        mode: VhostUserMode::Client,
        perms: SocketPerms {
            uid: None,
            gid: None,
            mode: 0o600,
        },
        frontend_reconnects: true,
        status_file: None,
    };
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let log = dir.join("attachment.log");
    let mut sup = spawn(
        PLUGIN,
        &["supervise", spec_path.to_str().unwrap()],
        &log,
        Start::default(),
    );
    sup.wait_for(&spec.pid_file);
    sup.wait_for(&marker);
    // What was still in the pipe reaches the log.
    std::thread::sleep(Duration::from_millis(300));
    let daemon_pid: u32 = std::fs::read_to_string(&spec.pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        Path::new(&format!("/proc/{daemon_pid}")).exists(),
        "the stand-in daemon is gone"
    );
    let len = std::fs::metadata(&log).unwrap().len();
    let text = std::fs::read_to_string(&log).unwrap();
    println!(
        "the daemon wrote {total} bytes; the log holds {len} bytes (cap {LOG_LIMIT}); \
         emptied: {}",
        text.contains("log emptied")
    );
    assert!(
        len <= LOG_LIMIT + (128 << 10),
        "log at {len} bytes while the daemon runs"
    );
    assert!(text.contains("log emptied at"), "no note of the cut");
    assert!(
        text.contains("a line from a very chatty daemon"),
        "the daemon's output is no longer logged"
    );
    // A stop still ends both.
    netns::signal(sup.pid(), libc::SIGTERM).unwrap();
    let exit = netns::wait_child(&mut sup.child, Duration::from_secs(10)).unwrap();
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    assert!(
        netns::wait_until(Duration::from_secs(3), || !Path::new(&format!(
            "/proc/{daemon_pid}"
        ))
        .exists()),
        "the stand-in daemon outlived its supervisor's stop"
    );
}
