//! ICMP echo round-trip times from a lab namespace (a raw socket; no `ping` binary needed).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Round trips in microseconds of the replies received, and how many requests were sent.
pub struct PingResult {
    /// RTT of each reply, µs.
    pub rtts_us: Vec<f64>,
    /// Requests sent.
    pub sent: u32,
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` echo requests to `dst` one after the other (each waits for its reply up to
/// 1 s), `interval` apart, from a thread in the namespace at `netns`.
pub fn ping(
    netns: &Path,
    dst: std::net::Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<PingResult> {
    let netns = netns.to_path_buf();
    std::thread::scope(|s| {
        s.spawn(move || -> Result<PingResult> {
            crate::sys::enter_netns(&netns)?;
            // SAFETY: plain socket(2) call.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            if fd < 0 {
                bail!("raw ICMP socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            let _ =
                crate::sys::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv);
            // SAFETY: sockaddr_in is plain data.
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sa.sin_family = libc::AF_INET as u16;
            sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
            let id = (std::process::id() & 0xffff) as u16;
            let mut rtts = Vec::new();
            let mut buf = [0u8; 2048];
            for seq in 0..count {
                let mut pkt = vec![0u8; 64];
                pkt[0] = 8;
                pkt[4..6].copy_from_slice(&id.to_be_bytes());
                pkt[6..8].copy_from_slice(&(seq as u16).to_be_bytes());
                let c = checksum(&pkt);
                pkt[2..4].copy_from_slice(&c.to_be_bytes());
                let t0 = Instant::now();
                // SAFETY: sendto with a live buffer and sockaddr_in.
                let rc = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        pkt.as_ptr().cast(),
                        pkt.len(),
                        0,
                        (&sa as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if rc < 0 {
                    bail!("sendto {dst}: {}", std::io::Error::last_os_error());
                }
                while t0.elapsed() < Duration::from_secs(1) {
                    // SAFETY: recv into a live buffer of the given length.
                    let n = unsafe {
                        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n <= 0 {
                        continue;
                    }
                    let n = n as usize;
                    let ihl = usize::from(buf[0] & 0x0f) * 4;
                    if n < ihl + 8 {
                        continue;
                    }
                    let icmp = &buf[ihl..n];
                    if icmp[0] == 0
                        && u16::from_be_bytes([icmp[4], icmp[5]]) == id
                        && u16::from_be_bytes([icmp[6], icmp[7]]) == seq as u16
                    {
                        rtts.push(t0.elapsed().as_secs_f64() * 1e6);
                        break;
                    }
                }
                std::thread::sleep(interval);
            }
            Ok(PingResult {
                rtts_us: rtts,
                sent: count,
            })
        })
        .join()
        .unwrap_or_else(|_| bail!("ping thread panicked"))
    })
}

/// The `p`-th percentile (0..=100) of `v` (nearest rank).
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_checksum() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        let mut p = vec![8u8, 0, 0, 0, 0, 1, 0, 1];
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&p), 0);
    }
}
