//! Keeps the lab from rotting: runs a tiny version of every scenario (seconds each, one backend
//! or path where possible) and checks that the JSON records and the Markdown table exist with
//! the expected fields. Figures are never asserted.
//!
//! Needs root (namespaces, taps, AF_PACKET) and the lab's packages (the harness installs them
//! with tests/setup/install-deps.sh): skipped with a printed reason outside CI, failed under
//! `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn skip_or_fail(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("perf smoke test cannot run under CI: {reason}");
    }
    eprintln!("SKIPPED perf smoke test: {reason}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The daemon binary: next to the lab's binary (built by `cargo test --workspace` for the
/// daemon's own tests), else built into a private target dir (a nested build in the shared one
/// would wait for the lock this `cargo test` holds).
fn daemon_binary() -> Result<PathBuf, String> {
    let perf = PathBuf::from(env!("CARGO_BIN_EXE_vhost-pump-perf"));
    let next = perf.with_file_name("vhost-pump");
    if next.is_file() {
        return Ok(next);
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("daemon-build");
    eprintln!(
        "building the vhost-pump daemon into {} (not found next to {})",
        target.display(),
        perf.display()
    );
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "-p",
            "vhost-pump",
            "--bin",
            "vhost-pump",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(workspace())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !st.success() {
        return Err(format!("cargo build of the daemon failed: {st}"));
    }
    Ok(target.join("debug/vhost-pump"))
}

fn has(v: &Value, path: &[&str]) -> bool {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return false,
        }
    }
    true
}

#[test]
fn tiny_suite_writes_records_table_and_plots() {
    if !is_root() {
        skip_or_fail("needs root (network namespaces, taps, AF_PACKET sockets)");
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        skip_or_fail("/dev/net/tun is missing");
        return;
    }
    let daemon = match daemon_binary() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("perf-smoke");
    let _ = std::fs::remove_dir_all(&out);
    let lab = env!("CARGO_BIN_EXE_vhost-pump-perf");
    let args = [
        "run",
        "--scenario",
        "vmless",
        "--scenario",
        "guest-tcp",
        "--scenario",
        "idle",
        "--scenario",
        "scale",
        "--backend",
        "vhost-pump-tap",
        "--sizes",
        "64",
        "--duration",
        "1s",
        "--ndr-trial",
        "300ms",
        "--ndr-steps",
        "2",
        "--idle-ports",
        "1",
        "--scale-ports",
        "1,2",
        "--streams",
        "1",
        "--pings",
        "10",
    ];
    let t = std::time::Instant::now();
    let st = Command::new(lab)
        .args(args)
        .arg("--out")
        .arg(&out)
        .arg("--vhost-pump")
        .arg(&daemon)
        .stdin(Stdio::null())
        .status()
        .expect("run vhost-pump-perf");
    eprintln!("tiny suite took {:.1?}", t.elapsed());
    assert!(st.success(), "vhost-pump-perf run failed: {st}");

    // Records: one JSON object per line, with the identifying fields, the machine, versions and
    // commands; every measurement either ok (with its figures) or explained.
    let text = std::fs::read_to_string(out.join("records.jsonl")).expect("records.jsonl");
    let recs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut gso_rx = 0;
    for r in &recs {
        for k in [
            "scenario",
            "test",
            "backend",
            "direction",
            "frame_size",
            "queues",
            "ports",
            "duration_s",
            "status",
            "metrics",
            "commands",
        ] {
            assert!(has(r, &[k]), "record without {k}: {r}");
        }
        for k in ["cpu_model", "nproc", "kernel", "versions"] {
            assert!(has(r, &["machine", k]), "record without machine.{k}: {r}");
        }
        assert!(
            has(r, &["machine", "versions", "vhost-pump"]),
            "no vhost-pump version: {r}"
        );
        let status = r["status"].as_str().unwrap();
        assert_ne!(status, "failed", "a measurement failed: {r}");
        if status != "ok" {
            assert!(
                r["error"].is_string(),
                "non-ok record without a reason: {r}"
            );
            continue;
        }
        assert!(
            !r["commands"].as_array().unwrap().is_empty(),
            "record without commands: {r}"
        );
        let scenario = r["scenario"].as_str().unwrap();
        let test = r["test"].as_str().unwrap();
        seen.insert((scenario.to_string(), test.to_string()));
        let floor = r["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with("kernel-floor"));
        let want: &[&str] = match (scenario, test) {
            // The floor has no sender to count losses against.
            ("vmless", "throughput") if floor => {
                &["mpps", "gbps", "backend_cpu_pct", "cycles_per_packet"]
            }
            ("vmless", "throughput") | ("scale", "queues") => &[
                "mpps",
                "gbps",
                "loss_pct",
                "backend_cpu_pct",
                "cycles_per_packet",
            ],
            ("vmless", "ndr") => &["ndr_mpps", "generator_max_mpps"],
            ("vmless", "gso") if r["direction"] == "guest-rx" => {
                gso_rx += 1;
                &["gbps", "backend_cpu_pct", "guest_frames_per_s"]
            }
            ("vmless", "gso") => &["gbps", "backend_cpu_pct", "host_frames_per_s"],
            ("guest-tcp", "tcp") => &["gbps", "backend_cpu_pct", "host_cpu_pct"],
            ("guest-tcp", "ping") => &["rtt_p50_us", "rtt_p99_us"],
            ("idle", "idle") => &["backend_cpu_pct", "wakeups_per_s", "rss_kib_per_port"],
            ("scale", "memory") => &["rss_kib_per_port", "pss_kib_per_port"],
            other => panic!("unexpected record kind {other:?}"),
        };
        for k in want {
            assert!(
                has(r, &["metrics", k]),
                "{scenario}/{test} without {k}: {r}"
            );
        }
    }
    assert_eq!(
        gso_rx, 1,
        "one host → guest TSO record expected; records:\n{text}"
    );
    for kind in [
        ("vmless", "throughput"),
        ("vmless", "ndr"),
        ("vmless", "gso"),
        ("guest-tcp", "tcp"),
        ("guest-tcp", "ping"),
        ("idle", "idle"),
        ("scale", "memory"),
        ("scale", "queues"),
    ] {
        assert!(
            seen.contains(&(kind.0.to_string(), kind.1.to_string())),
            "no ok record of {kind:?}; records:\n{text}"
        );
    }

    // The report, rebuilt from the saved records by `report`.
    std::fs::remove_file(out.join("results.md")).unwrap();
    let st = Command::new(lab)
        .arg("report")
        .arg(&out)
        .status()
        .expect("run report");
    assert!(st.success());
    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    for heading in [
        "## vmless",
        "### NDR",
        "## guest-tcp",
        "## idle",
        "## scale: memory",
        "## scale: queue pairs",
    ] {
        assert!(md.contains(heading), "results.md lacks {heading:?}:\n{md}");
    }
    for col in [
        "| backend | direction | frame B |",
        "Mpps",
        "Gbit/s",
        "loss %",
        "cycles/pkt",
        "p99 µs",
        "wake-ups/s",
        "RSS KiB per port",
    ] {
        assert!(md.contains(col), "results.md lacks {col:?}:\n{md}");
    }
    assert!(
        md.contains("| vhost-pump-tap | guest-tx | 64 |"),
        "no vmless row:\n{md}"
    );
    for plot in ["vmless-throughput.svg", "cpu-per-gbit.svg"] {
        let p = out.join(plot);
        let svg = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(svg.contains("<svg"), "{plot} is not an SVG");
    }
}
