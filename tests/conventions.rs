//! The vhost-user specification's conventions for backend programs, as management tools use
//! them: `--socket-path`, `--fd FDNUM` (a listening socket made by someone else: a test here,
//! and systemd's own `systemd-socket-activate`), `--print-capabilities`, and `RUST_LOG`.
//!
//! Daemons run with their tap in a private network namespace (`testkit::netns`). Needs root and
//! /dev/net/tun (and `systemd-socket-activate` for one test): skipped otherwise, failed under
//! `CI=true`. Run: `cargo test --test conventions -- --nocapture`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testkit::netns::{
    self, can_run, daemon_bin, if_stats, in_new_netns, kill_with_parent_thread, wait_child,
    wait_until, TempDir,
};
use testkit::vhost_driver::{tx_frame, Session};

const TAP: &str = "vpconv0";
const SRC_MAC: [u8; 6] = [0x02, 0x63, 0x6f, 0x00, 0x00, 0x01];
const TX: u32 = 1;
const QSIZE: u16 = 64;

/// A frontend negotiates, has one frame sent out of the tap, and stops the ring.
fn frame_reaches_the_tap(sock: &Path) -> Result<(), String> {
    // Connected first: a socket-activated daemon (and its tap) only starts on a connection.
    let mut s = Session::good(sock, &[TX], QSIZE).map_err(|e| format!("setup: {e}"))?;
    // What the daemon writes into the tap, the tap interface receives.
    let before = if_stats(TAP).map_err(|e| e.to_string())?.rx_packets;
    s.send_frame(TX, &tx_frame(SRC_MAC, 100, 3))
        .map_err(|e| format!("frame: {e}"))?;
    let base = s.fe.get_vring_base(TX).map_err(|e| e.to_string())?;
    if base != 1 {
        return Err(format!("GET_VRING_BASE {base}, expected 1"));
    }
    let sent = wait_until(Duration::from_secs(5), || {
        if_stats(TAP).is_ok_and(|s| s.rx_packets > before)
    });
    if !sent {
        return Err("the frame never left the tap".into());
    }
    Ok(())
}

/// Makes `fd` the child's descriptor 3, without close-on-exec. For a `pre_exec` hook: only
/// async-signal-safe calls.
fn dup_to_3(fd: i32) -> std::io::Result<()> {
    // SAFETY: dup2 and fcntl take plain integers. dup2 onto itself leaves the flags alone, so
    // the close-on-exec flag is cleared explicitly when `fd` already is 3.
    let rc = unsafe {
        if fd == 3 {
            libc::fcntl(3, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, 3)
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `program args` with no stdin, stdout and stderr appended to `log`, killed when the spawning
/// thread ends.
fn logged(program: &str, args: &[&str], log: &Path) -> Command {
    let out = File::options().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out));
    kill_with_parent_thread(&mut cmd);
    cmd
}

/// Spawns `program args` with `listener` as its descriptor 3 (and nothing else inherited),
/// output appended to `log`.
fn spawn_with_fd3(program: &str, args: &[&str], listener: &UnixListener, log: &Path) -> Child {
    let mut cmd = logged(program, args, log);
    let fd = listener.as_raw_fd();
    // SAFETY: runs between fork and exec and only calls async-signal-safe functions.
    unsafe {
        cmd.pre_exec(move || dup_to_3(fd));
    }
    cmd.spawn().unwrap()
}

fn stop(child: &mut Child) -> Option<i32> {
    // SAFETY: kill with our own child's pid, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_child(child, Duration::from_secs(10))
        .unwrap()
        .and_then(|s| s.code())
}

#[test]
fn inherited_listener_is_served_and_left_to_its_owner() {
    if !can_run("inherited_listener_is_served_and_left_to_its_owner") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("conv-fd");
        let sock = dir.join("made-by-the-test.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let control = dir.join("control.sock");
        let log = dir.join("daemon.log");
        let mut d = spawn_with_fd3(
            daemon_bin(),
            &[
                "--fd",
                "3",
                "--tap",
                TAP,
                "--control",
                control.to_str().unwrap(),
            ],
            &listener,
            &log,
        );
        assert!(
            wait_until(Duration::from_secs(10), || control.exists()),
            "daemon did not come up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        for round in 0..2 {
            frame_reaches_the_tap(&sock).unwrap_or_else(|e| {
                panic!(
                    "session {round} on the inherited socket: {e}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        }
        // The port is named by the inherited socket's path.
        let stats = netns::ctl_json(&control, &["stats"]);
        assert_eq!(stats[0]["socket"], sock.to_str().unwrap(), "{stats}");
        assert_eq!(stop(&mut d), Some(0), "exit status after SIGTERM");
        // The socket is still the test's: not removed, still listening.
        assert!(sock.exists(), "the daemon removed a socket it did not make");
        let mut c = UnixStream::connect(&sock).expect("the inherited socket stopped listening");
        let (mut a, _) = listener.accept().unwrap();
        c.write_all(b"still mine").unwrap();
        let mut got = [0u8; 10];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still mine");
    });
}

#[test]
fn systemd_socket_activation_hands_the_socket_over() {
    if !can_run("systemd_socket_activation_hands_the_socket_over") {
        return;
    }
    let Ok(activate) = which("systemd-socket-activate") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-socket-activate missing in CI (package systemd)"
        );
        println!("skipping: no systemd-socket-activate");
        return;
    };
    in_new_netns(|| {
        let dir = TempDir::new("conv-systemd");
        let sock = dir.join("activated.sock");
        let log = dir.join("daemon.log");
        // What the unit pair in deploy/systemd does: systemd listens, and starts the service
        // with the socket as descriptor 3 on the first connection.
        let sock_arg = sock.to_str().unwrap();
        let args = ["-l", sock_arg, daemon_bin(), "--fd", "3", "--tap", TAP];
        let mut cmd = logged(&activate, &args, &log);
        let mut child = cmd.spawn().unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || sock.exists()),
            "systemd-socket-activate did not listen"
        );
        frame_reaches_the_tap(&sock).unwrap_or_else(|e| {
            panic!(
                "socket-activated session: {e}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("port ready"), "{text}");
        assert_eq!(stop(&mut child), Some(0), "{text}");
    });
}

fn which(name: &str) -> Result<String, ()> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .ok_or(())
}

#[test]
fn bad_inherited_descriptors_are_refused_with_a_reason() {
    if !can_run("bad_inherited_descriptors_are_refused_with_a_reason") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("conv-badfd");
        let run = |args: &[&str], fd3: Option<&dyn AsRawFd>| {
            let mut cmd = Command::new(daemon_bin());
            cmd.args(args).stdin(Stdio::null());
            kill_with_parent_thread(&mut cmd);
            if let Some(f) = fd3 {
                let fd = f.as_raw_fd();
                // SAFETY: as in spawn_with_fd3.
                unsafe {
                    cmd.pre_exec(move || dup_to_3(fd));
                }
            }
            let out = cmd.output().unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        };
        let file = File::create(dir.join("plain-file")).unwrap();
        let (connected, _peer) = UnixStream::pair().unwrap();
        let dgram = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let cases: [(&str, Option<&dyn AsRawFd>, &str); 4] = [
            ("closed", None, "Bad file descriptor"),
            ("file", Some(&file), "not a socket"),
            ("connected stream", Some(&connected), "not listening"),
            ("datagram", Some(&dgram), "not a stream socket"),
        ];
        for (what, fd, reason) in cases {
            let (code, err) = run(&["--fd", "3", "--tap", TAP], fd);
            assert_eq!(code, Some(2), "{what}: {err}");
            assert!(
                err.starts_with("vhost-pump: --fd 3:") && err.contains(reason),
                "{what}: {err:?} lacks {reason:?}"
            );
            assert_eq!(err.lines().count(), 1, "{what}: {err:?}");
        }
        // --fd is exclusive with a path, and meaningless for `ctl add`.
        let (code, err) = run(
            &["--fd", "3", "--socket-path", "/tmp/x", "--tap", TAP],
            None,
        );
        assert_eq!(code, Some(2), "{err}");
        let (code, err) = run(
            &["ctl", "add", "--name", "p", "--fd", "3", "--tap", TAP],
            None,
        );
        assert_ne!(code, Some(0), "{err}");
        assert!(err.contains("--fd"), "{err}");
        assert!(!netns::if_exists(TAP), "a refused start touched the tap");
    });
}

#[test]
fn print_capabilities_is_json_and_ignores_everything_else() {
    for args in [
        &["--print-capabilities"][..],
        &["--tap", "x", "--print-capabilities", "--no-such-flag"][..],
    ] {
        let out = Command::new(daemon_bin()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {:?}", out.stdout));
        assert_eq!(v, serde_json::json!({"type": "net"}), "{args:?}");
        assert!(out.stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn socket_path_flag_and_rust_log_are_honoured() {
    if !can_run("socket_path_flag_and_rust_log_are_honoured") {
        return;
    }
    in_new_netns(|| {
        let dir = TempDir::new("conv-log");
        let sock = dir.join("vu.sock");
        let log = dir.join("daemon.log");
        let args = ["--socket-path", sock.to_str().unwrap(), "--tap", TAP];
        let mut cmd = logged(daemon_bin(), &args, &log);
        cmd.env("RUST_LOG", "debug");
        let mut child = cmd.spawn().unwrap();
        assert!(wait_until(Duration::from_secs(10), || sock.exists()));
        frame_reaches_the_tap(&sock).unwrap();
        assert_eq!(stop(&mut child), Some(0));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(" DEBUG "),
            "RUST_LOG=debug without --log-level: no debug line in {text}"
        );
        // --log-level wins over RUST_LOG.
        let out = Command::new(daemon_bin())
            .args([
                "--log-level",
                "not a [valid filter",
                "--socket-path",
                "/x",
                "--tap",
                TAP,
            ])
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --log-level"));
    });
}
