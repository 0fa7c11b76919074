//! `dpdk-testpmd` in interactive mode, driven over its stdin/stdout pipes.
//!
//! DPDK 22.11 quirks: `--no-huge` cannot be combined with `--in-memory`, so we pass
//! `--no-huge -m 1024 --no-shconf --file-prefix X` (not
//! `--in-memory`); a non-interactive testpmd exits on stdin EOF, so we run `-i` with a piped
//! stdin we keep open, type commands and read their output (`show port stats N`).

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{ChildStdin, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys::{self, Netns, Proc};

/// Counters of one testpmd port (the lab reads some of them).
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PortStats {
    /// Frames received.
    pub rx_packets: u64,
    /// Frames the NIC missed.
    pub rx_missed: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

#[derive(Default)]
struct Output {
    buf: Mutex<(Vec<u8>, bool)>,
    grew: Condvar,
}

/// How to start one testpmd.
#[derive(Clone, Debug)]
pub struct TestpmdOpts {
    /// Label (also the `--file-prefix`).
    pub name: String,
    /// `-l` list.
    pub lcores: String,
    /// `--main-lcore`.
    pub main_lcore: usize,
    /// `--vdev` arguments.
    pub vdevs: Vec<String>,
    /// Application arguments after `--` (besides `-i`).
    pub app_args: Vec<String>,
    /// Log file for everything it prints.
    pub log: PathBuf,
    /// Memory in MiB (`-m`).
    pub mem_mib: u32,
}

/// A running interactive testpmd; quit (and killed if needed) on drop.
pub struct Testpmd {
    proc: Proc,
    stdin: Option<ChildStdin>,
    out: Arc<Output>,
    cursor: usize,
}

impl Testpmd {
    /// Starts testpmd in `ns` and waits for its first prompt (ports initialised).
    pub fn start(ns: &Netns, o: &TestpmdOpts) -> Result<Testpmd> {
        // testpmd's printf output is block-buffered on a pipe: line-buffer it (stdbuf execs the
        // program, so the pid stays testpmd's).
        let mut argv: Vec<String> = vec![
            "stdbuf".into(),
            "-oL".into(),
            "dpdk-testpmd".into(),
            "-l".into(),
            o.lcores.clone(),
            "--main-lcore".into(),
            o.main_lcore.to_string(),
            "--no-pci".into(),
            "--no-huge".into(),
            "-m".into(),
            o.mem_mib.to_string(),
            "--no-shconf".into(),
            "--file-prefix".into(),
            o.name.clone(),
            "--iova-mode=va".into(),
            "--log-level=7".into(),
        ];
        for v in &o.vdevs {
            argv.push("--vdev".into());
            argv.push(v.clone());
        }
        argv.push("--".into());
        argv.push("-i".into());
        argv.extend(o.app_args.iter().cloned());
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut cmd = ns.cmd(&refs);
        let cmdline = format!("ip netns exec {} {}", ns.name(), sys::shell_join(&argv));
        sys::log_cmd(cmdline.clone());
        let mut log = File::create(&o.log).with_context(|| format!("{}", o.log.display()))?;
        let _ = writeln!(log, "# {cmdline}");
        let stderr = log.try_clone()?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .with_context(|| format!("cannot start {cmdline}"))?;
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().context("stdout")?;
        let out = Arc::new(Output::default());
        let sink = out.clone();
        std::thread::Builder::new()
            .name(format!("{}-out", o.name))
            .spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    let n = match stdout.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let _ = log.write_all(&chunk[..n]);
                    let mut b = sink.buf.lock().unwrap();
                    b.0.extend_from_slice(&chunk[..n]);
                    sink.grew.notify_all();
                }
                sink.buf.lock().unwrap().1 = true;
                sink.grew.notify_all();
            })?;
        let proc = Proc::adopt(&o.name, child, &o.log);
        let mut t = Testpmd {
            proc,
            stdin,
            out,
            cursor: 0,
        };
        t.wait_for("testpmd> ", Duration::from_secs(60))
            .with_context(|| format!("{} did not start", o.name))?;
        Ok(t)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Types one command.
    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(line.as_bytes())?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// Types a command and waits for the next prompt; returns what it printed.
    pub fn command(&mut self, line: &str, timeout: Duration) -> Result<String> {
        self.send(line)?;
        // The echo of the command comes first, then its output, then a new prompt.
        self.wait_for("testpmd> ", timeout)
    }

    /// Waits until `marker` appears after the cursor; returns the text up to it.
    fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut b = self.out.buf.lock().unwrap();
        loop {
            if let Some(pos) = find(&b.0[self.cursor..], marker.as_bytes()) {
                let end = self.cursor + pos + marker.len();
                let text = String::from_utf8_lossy(&b.0[self.cursor..end]).into_owned();
                self.cursor = end;
                return Ok(text);
            }
            if b.1 {
                drop(b);
                bail!(
                    "{} exited before printing {marker:?}: {}",
                    self.proc.name,
                    self.proc.log_tail(8)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                drop(b);
                bail!(
                    "{}: timed out waiting for {marker:?}: {}",
                    self.proc.name,
                    self.proc.log_tail(8)
                );
            }
            b = self.out.grew.wait_timeout(b, deadline - now).unwrap().0;
        }
    }

    /// `show port stats PORT`, parsed.
    pub fn port_stats(&mut self, port: u16) -> Result<PortStats> {
        let t = Duration::from_secs(10);
        self.send(&format!("show port stats {port}"))?;
        self.wait_for(&format!("NIC statistics for port {port} "), t)?;
        let mut text = String::from("NIC statistics for port\n");
        text += &self.wait_for("TX-bytes:", t)?;
        text += &self.wait_for("\n", t)?;
        self.wait_for("testpmd> ", t)?;
        parse_port_stats(&text).with_context(|| format!("no port stats in {text:?}"))
    }

    /// Waits until ports `0..n` report link up (a vhost port is up once a frontend attached).
    pub fn wait_link_up(&mut self, ports: u16, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            let mut up = true;
            for p in 0..ports {
                let text =
                    self.command(&format!("show port summary {p}"), Duration::from_secs(10))?;
                if !text.contains(" up ") {
                    up = false;
                }
            }
            if up {
                return Ok(());
            }
            if t.elapsed() > timeout {
                bail!("{}: links not up after {timeout:?}", self.proc.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `start` forwarding.
    pub fn start_fwd(&mut self) -> Result<()> {
        self.command("start", Duration::from_secs(20)).map(|_| ())
    }

    /// `stop` forwarding.
    pub fn stop_fwd(&mut self) -> Result<()> {
        self.command("stop", Duration::from_secs(20)).map(|_| ())
    }

    /// Quits (closing stdin) and waits a little, then kills.
    pub fn quit(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.send("quit");
        self.stdin = None;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if self.proc.exited().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc.stop();
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn num_after(text: &str, key: &str) -> Option<u64> {
    let i = text.find(key)? + key.len();
    text[i..].split_whitespace().next()?.parse().ok()
}

/// Parses the block printed by `show port stats N`.
pub fn parse_port_stats(text: &str) -> Option<PortStats> {
    let start = text.find("NIC statistics for port")?;
    let t = &text[start..];
    Some(PortStats {
        rx_packets: num_after(t, "RX-packets:")?,
        rx_missed: num_after(t, "RX-missed:").unwrap_or(0),
        rx_bytes: num_after(t, "RX-bytes:").unwrap_or(0),
        tx_packets: num_after(t, "TX-packets:")?,
        tx_bytes: num_after(t, "TX-bytes:").unwrap_or(0),
    })
}

/// `--txpkts` value for a frame of `len` bytes (without FCS): segments of at most 2048 bytes,
/// so that jumbo frames fit the default mbufs.
pub fn txpkts(len: usize) -> String {
    let mut segs = Vec::new();
    let mut left = len;
    while left > 0 {
        let s = left.min(2048);
        segs.push(s.to_string());
        left -= s;
    }
    segs.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stats_block() {
        let t = "show port stats 0\n\n  ######################## NIC statistics for port 0  ########################\n  RX-packets: 6          RX-missed: 0          RX-bytes:  516\n  RX-errors: 0\n  RX-nombuf:  0         \n  TX-packets: 408737     TX-errors: 0          TX-bytes:  24524220\n\n  Throughput (since last show)\n  Rx-pps:            0          Rx-bps:            0\n  Tx-pps:            0          Tx-bps:            0\n  ############################################################################\ntestpmd> ";
        let s = parse_port_stats(t).unwrap();
        assert_eq!(
            (s.rx_packets, s.rx_bytes, s.tx_packets, s.tx_bytes),
            (6, 516, 408737, 24524220)
        );
        assert_eq!(txpkts(60), "60");
        assert_eq!(txpkts(8996), "2048,2048,2048,2048,804");
    }
}
