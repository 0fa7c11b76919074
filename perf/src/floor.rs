//! The kernel floor of the tap path: the most frames per second any userspace backend could
//! push into a tap on this machine. A plain loop writes the same frame, behind a zeroed
//! 12-byte virtio-net header, into a tap with `writev`, from one thread pinned to the backend's
//! core, with no virtqueue at all; the tap's `rx_packets` count what the kernel took. The
//! `vmless` scenario reports it as backend `kernel-floor-tap` next to the real backends, so
//! every guest → tap figure can be read as a fraction of it.
//!
//! The writer runs as `vhost-pump-perf floor-writer` inside the lab's namespace (the tap lives
//! there), started and stopped by the scenario.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Length of the virtio-net header written before each frame (`virtio_net_hdr_v1`).
const HDR: usize = 12;

/// Attaches to tap `name` (created with `vnet_hdr` by the caller) and writes `frame_len`-byte
/// broadcast frames into it for `secs` seconds; prints how many `writev` calls succeeded.
pub fn write_loop(name: &str, frame_len: usize, secs: f64) -> Result<()> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {name:?} too long");
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own, on our tun fd.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    let hdr_len: libc::c_int = HDR as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads the int we pass, on our tun fd.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETVNETHDRSZ");
    }
    let hdr = [0u8; HDR];
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[0x02, 0x70, 0x66, 0, 0, 1]);
    frame.extend_from_slice(&0x88b5u16.to_be_bytes());
    frame.resize(frame_len.max(60), 0x5a);
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        },
    ];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut written = 0u64;
    while Instant::now() < end {
        for _ in 0..256 {
            // SAFETY: both iovecs point at our live buffers.
            if unsafe { libc::writev(tun.as_raw_fd(), iov.as_ptr(), 2) } > 0 {
                written += 1;
            }
        }
    }
    println!("{written}");
    Ok(())
}
