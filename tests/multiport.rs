//! One daemon, many ports: a TOML config with two tap ports and a broken one, the control
//! socket (`vhost-pump ctl list|stats|add|remove`), the Prometheus endpoint, and isolation —
//! removing or breaking one port never stops traffic on another. Traffic comes from DPDK's
//! virtio-user frontend (`dpdk-testpmd`, no VM). Needs root: skipped outside CI, failed in CI.

use testkit::netns::{ctl_json, KillOnDrop as Proc, NamedNetns};

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ctl(control: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-pump"))
        .args(["ctl", "--control", control.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

/// Guest-TX frames from DPDK's virtio-user frontend for `secs` seconds.
fn testpmd_tx(socket: &Path, prefix: &str, secs: u64) {
    let mut child = Command::new("dpdk-testpmd")
        .args([
            "-l",
            "0,1",
            "--no-pci",
            "--no-huge",
            "-m",
            "512",
            "--no-shconf",
        ])
        .arg(format!("--file-prefix={prefix}"))
        .arg("--iova-mode=va")
        .arg("--vdev")
        .arg(format!(
            "net_virtio_user0,path={},queues=1,queue_size=256",
            socket.display()
        ))
        .args(["--", "--forward-mode=txonly", "--txpkts=64", "--auto-start"])
        .args(["--total-num-mbufs=8192"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dpdk-testpmd (tests/setup/install-deps.sh installs it)");
    std::thread::sleep(Duration::from_secs(secs));
    drop(child.stdin.take());
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn tx_frames(stats: &serde_json::Value, port: &str) -> u64 {
    stats
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port)
        .map(|p| {
            p["queues"]
                .as_array()
                .unwrap()
                .iter()
                .map(|q| q["tx"]["frames"].as_u64().unwrap())
                .sum()
        })
        .unwrap_or(0)
}

fn http_get(sock: &Path, path: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn config_file_control_socket_metrics_and_isolation() {
    if let Some(why) = testkit::guest::missing_prereqs() {
        testkit::guest::skip_or_fail("multiport", &why);
        return;
    }
    let dir = testkit::netns::target_workdir("multiport");
    let d = dir.display();
    let config = dir.join("ports.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[port]]
name = "m0"
socket = "{d}/m0.sock"
host = {{ kind = "tap", name = "vpm0" }}

[[port]]
name = "m1"
socket = "{d}/m1.sock"
host = {{ kind = "tap", name = "vpm1" }}
socket_mode = "0600"

[[port]]
name = "broken"
socket = "{d}/broken.sock"
host = {{ kind = "af-packet", name = "nosuchif0" }}
"#
        ),
    )
    .unwrap();
    let control = dir.join("control.sock");
    let metrics = dir.join("metrics.sock");
    let ns = NamedNetns::create("vp-multi");
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let mut daemon = Proc(
        ns.cmd(&[
            env!("CARGO_BIN_EXE_vhost-pump"),
            "--config",
            config.to_str().unwrap(),
        ])
        .args(["--control", control.to_str().unwrap()])
        .args(["--metrics", &format!("unix:{}", metrics.display())])
        .args(["--log-format", "json"])
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    wait_for(&control);
    wait_for(&metrics);

    // The broken port did not keep the others from starting.
    let list = ctl_json(&control, &["list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["m0", "m1"]);
    assert!(!dir.join("broken.sock").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("m1.sock"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let mode = std::fs::metadata(dir.join("m0.sock"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);

    // The threads that face frontends run sandboxed: no capabilities, a seccomp filter.
    let pid = daemon.0.id();
    let port_thread = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| t.ok())
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "port-m0")
        })
        .expect("a port-m0 thread");
    let status = std::fs::read_to_string(port_thread.path().join("status")).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");

    testpmd_tx(&dir.join("m0.sock"), "vpmulti0", 2);
    let stats = ctl_json(&control, &["stats"]);
    let first = tx_frames(&stats, "m0");
    assert!(first > 1000, "m0 carried {first} frames");
    assert_eq!(tx_frames(&stats, "m1"), 0);
    let text = http_get(&metrics, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(&format!(
            "vhost_pump_frames_total{{port=\"m0\",queue=\"0\",dir=\"tx\"}} {first}"
        )),
        "{text}"
    );
    assert!(http_get(&metrics, "/nope").starts_with("HTTP/1.1 404"));

    // Remove m1 and add m2 at runtime; m0 keeps working throughout.
    assert!(ctl(&control, &["remove", "m1"]).status.success());
    assert!(
        !dir.join("m1.sock").exists(),
        "removed port left its socket"
    );
    let m2 = dir.join("m2.sock");
    let add = ctl(
        &control,
        &[
            "add",
            "--name",
            "m2",
            "--socket",
            m2.to_str().unwrap(),
            "--tap",
            "vpm2",
        ],
    );
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    assert!(m2.exists());
    let dup = ctl(
        &control,
        &[
            "add",
            "--name",
            "m2",
            "--socket",
            m2.to_str().unwrap(),
            "--tap",
            "vpm2",
        ],
    );
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let gone = ctl(&control, &["remove", "m1"]);
    assert!(!gone.status.success());
    testpmd_tx(&dir.join("m0.sock"), "vpmulti1", 2);
    let stats = ctl_json(&control, &["stats", "m0"]);
    assert!(
        tx_frames(&stats, "m0") > first,
        "m0 stopped passing traffic"
    );

    // SIGTERM: clean exit, sockets removed.
    assert!(Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    for s in ["m0.sock", "m2.sock", "control.sock"] {
        assert!(!dir.join(s).exists(), "{s} left behind");
    }

    // Structured logs: one JSON object per line, the broken port's error among them.
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|v| v["level"].is_string() && v["fields"].is_object()));
    assert!(
        lines
            .iter()
            .any(|v| v["level"] == "ERROR" && v["fields"]["port"] == "broken"),
        "{log}"
    );
}
