//! Starting the vhost-pump daemon under test in a lab namespace.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::sys::{self, Netns, Proc};
use crate::Lab;

/// The daemon's host port.
#[derive(Clone, Debug)]
pub enum Port {
    /// `--tap NAME`.
    Tap(String),
    /// `--af-packet IFNAME`.
    AfPacket(String),
}

/// Why the daemon did not come up.
#[derive(Debug)]
pub enum StartError {
    /// It exited on its own before serving (it refused the configuration); its message.
    Refused(String),
    /// Anything else.
    Other(anyhow::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Refused(m) => write!(f, "the daemon refused to start: {m}"),
            StartError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

/// Options of one daemon.
#[derive(Clone, Debug)]
pub struct DaemonOpts {
    /// Host port.
    pub port: Port,
    /// Socket path.
    pub socket: PathBuf,
    /// `--queues`.
    pub queues: u32,
    /// `--mtu`.
    pub mtu: Option<u32>,
    /// Pin with `taskset -c CPU`.
    pub cpu: Option<usize>,
    /// `--mac` (the guest's address).
    pub mac: Option<String>,
    /// Log name.
    pub name: String,
}

/// Starts the daemon in `ns` and waits for its socket.
pub fn start(lab: &Lab, ns: &Netns, o: &DaemonOpts) -> Result<Proc, StartError> {
    let _ = std::fs::remove_file(&o.socket);
    let mut argv: Vec<String> = Vec::new();
    if let Some(cpu) = o.cpu {
        argv.extend(["taskset".into(), "-c".into(), cpu.to_string()]);
    }
    argv.push(lab.vhost_pump.to_string_lossy().into_owned());
    argv.extend(["--socket".into(), o.socket.to_string_lossy().into_owned()]);
    match &o.port {
        Port::Tap(n) => argv.extend(["--tap".into(), n.clone()]),
        Port::AfPacket(n) => argv.extend(["--af-packet".into(), n.clone()]),
    }
    argv.extend(["--queues".into(), o.queues.to_string()]);
    if let Some(m) = o.mtu {
        argv.extend(["--mtu".into(), m.to_string()]);
    }
    if let Some(mac) = &o.mac {
        argv.extend(["--mac".into(), mac.clone()]);
    }
    argv.extend(["--log-level".into(), "warn".into()]);
    argv.extend(lab.opts.daemon_args.iter().cloned());
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let log = lab.log(&o.name);
    let mut p = Proc::spawn(&o.name, ns.cmd(&refs), &log).map_err(StartError::Other)?;
    match sys::wait_for_path(&mut p, &o.socket, Duration::from_secs(15)) {
        Ok(()) => Ok(p),
        Err(e) => {
            if p.exited().is_some() {
                let tail = p.log_tail(3);
                let msg = tail
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("exited without a message")
                    .to_string();
                Err(StartError::Refused(strip_ansi(&msg)))
            } else {
                Err(StartError::Other(e))
            }
        }
    }
}

/// Removes ANSI colour sequences from a log line.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Socket path for `name` in the lab's socket directory.
pub fn socket(lab: &Lab, name: &str) -> PathBuf {
    lab.sockdir.join(format!("{name}.sock"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_colours() {
        assert_eq!(super::strip_ansi("\u{1b}[2mx\u{1b}[0m y"), "x y");
    }
}
