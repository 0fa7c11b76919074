//! A pktgen-like frame generator: one thread, an AF_PACKET socket bound to a host interface in a
//! lab namespace, `sendmmsg` in batches with `PACKET_QDISC_BYPASS`, optionally rate-limited.
//!
//! The kernel's `pktgen` module is not available everywhere (it is missing here), so the lab
//! brings its own. Frames are UDP/IPv4 with a few source ports, so multiqueue receivers spread
//! them over queues.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// MAC address the generator sends to (the guest side accepts any destination).
pub const DST_MAC: [u8; 6] = [0x02, 0x76, 0x70, 0x00, 0x00, 0x02];
/// MAC address the generator sends from.
pub const SRC_MAC: [u8; 6] = [0x02, 0x76, 0x70, 0x00, 0x00, 0x01];

const BATCH: usize = 64;

/// What to send.
#[derive(Clone, Debug)]
pub struct GenConfig {
    /// Interface to send on (in the namespace).
    pub ifname: String,
    /// `/run/netns/NAME` of the namespace.
    pub netns: PathBuf,
    /// Frame length on the wire without the 4-byte FCS (a "64-byte frame" is 60 here).
    pub frame_len: usize,
    /// Frames per second; `None` = as fast as possible.
    pub rate_pps: Option<f64>,
    /// Number of distinct UDP flows (source ports).
    pub flows: u16,
    /// CPU to pin the sending thread to.
    pub cpu: Option<usize>,
}

impl GenConfig {
    /// One-line description for the command log.
    pub fn describe(&self) -> String {
        format!(
            "vhost-pump-perf generator (in-process): AF_PACKET sendmmsg batch={BATCH} qdisc_bypass=1 \
             netns={} dev={} frame_len={} rate={} flows={} cpu={:?}",
            self.netns.display(),
            self.ifname,
            self.frame_len,
            self.rate_pps
                .map(|r| format!("{r:.0}pps"))
                .unwrap_or_else(|| "max".into()),
            self.flows,
            self.cpu
        )
    }
}

/// A running generator; stop it with [`Generator::stop`].
pub struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Generator {
    /// Starts sending. Fails if the socket cannot be set up.
    pub fn start(cfg: GenConfig) -> Result<Generator> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (s, n, e) = (stop.clone(), sent.clone(), errors.clone());
        crate::sys::log_cmd(cfg.describe());
        let thread = std::thread::Builder::new()
            .name("vpperf-gen".into())
            .spawn(move || {
                let sock = match open(&cfg) {
                    Ok(f) => {
                        let _ = ready_tx.send(Ok(()));
                        f
                    }
                    Err(err) => {
                        let msg = format!("{err:#}");
                        let _ = ready_tx.send(Err(err));
                        bail!(msg);
                    }
                };
                send_loop(sock, &cfg, &s, &n, &e);
                Ok(())
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => bail!("generator thread died"),
        }
        Ok(Generator {
            stop,
            sent,
            errors,
            thread: Some(thread),
        })
    }

    /// Frames handed to the kernel so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Failed send calls so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Stops and returns the total frames sent.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.sent()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.halt();
    }
}

fn open(cfg: &GenConfig) -> Result<OwnedFd> {
    crate::sys::enter_netns(&cfg.netns)?;
    if let Some(cpu) = cfg.cpu {
        crate::sys::pin_current_thread(cpu);
    }
    // Protocol 0: a send-only socket that never receives.
    let fd = testkit::netns::PacketSocket::sender(&cfg.ifname)
        .with_context(|| {
            format!(
                "AF_PACKET socket on {} in {}",
                cfg.ifname,
                cfg.netns.display()
            )
        })?
        .into_fd();
    // Best effort: without them the generator still sends, only slower.
    let _ = crate::sys::setsockopt(
        fd.as_raw_fd(),
        libc::SOL_PACKET,
        libc::PACKET_QDISC_BYPASS,
        &1,
    );
    let _ = crate::sys::setsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        &(4 << 20),
    );
    Ok(fd)
}

/// Builds one UDP/IPv4 frame of `len` bytes (without FCS) from source port `sport`.
pub fn build_frame(len: usize, sport: u16) -> Vec<u8> {
    let len = len.max(60);
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&DST_MAC);
    f[6..12].copy_from_slice(&SRC_MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 254, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 254, 0, 2]);
    let mut sum: u32 = 0;
    for i in (0..20).step_by(2) {
        sum += u32::from(u16::from_be_bytes([ip[i], ip[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn send_loop(
    sock: OwnedFd,
    cfg: &GenConfig,
    stop: &AtomicBool,
    sent: &AtomicU64,
    errors: &AtomicU64,
) {
    let flows = cfg.flows.max(1);
    let mut frames: Vec<Vec<u8>> = (0..flows)
        .map(|i| build_frame(cfg.frame_len, 1024 + i))
        .collect();
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|i| {
            let f = &mut frames[i % flows as usize];
            libc::iovec {
                iov_base: f.as_mut_ptr().cast(),
                iov_len: f.len(),
            }
        })
        .collect();
    // SAFETY: mmsghdr is plain data; zeroed is valid (null name, no control data).
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let start = Instant::now();
    let mut total: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut n = BATCH;
        if let Some(rate) = cfg.rate_pps {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            if due <= total {
                let ahead = (total + 1 - due) as f64 / rate;
                if ahead > 0.0002 {
                    std::thread::sleep(Duration::from_secs_f64((ahead - 0.0001).min(0.01)));
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            n = ((due - total) as usize).min(BATCH);
        }
        // SAFETY: msgs[..n] point at live iovecs, which point at live frame buffers.
        let rc = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
        if rc > 0 {
            total += rc as u64;
            sent.store(total, Ordering::Relaxed);
        } else {
            errors.fetch_add(1, Ordering::Relaxed);
            // A full device queue (ENOBUFS) or a transient error: back off briefly.
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    drop(frames);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_layout() {
        let f = build_frame(60, 1030);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 46);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 1030);
        // The IPv4 header checksums to zero.
        let mut sum: u32 = 0;
        for i in (14..34).step_by(2) {
            sum += u32::from(u16::from_be_bytes([f[i], f[i + 1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(build_frame(10, 1).len(), 60);
        assert_eq!(build_frame(1514, 1).len(), 1514);
    }
}
