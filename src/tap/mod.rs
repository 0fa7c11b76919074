//! The tap host port: a Linux tap device (created or attached by name) with one queue fd per
//! queue pair, virtio-net headers on every frame, and offloads programmed from the guest's choice.
//! Guest frames go into the tap with one `writev` each, or batched through io_uring
//! ([`uring`], the default where the kernel allows it).

pub mod uring;

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use vhost_net_backend::{GuestOffloads, HostCapabilities, HostPort, HostQueue, TxDrops};

use crate::config::TapTx;
use crate::netdev::{self, IfName};
use uring::UringTx;

const TUN_PATH: &str = "/dev/net/tun";

use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_USO4, TUN_F_USO6};

/// Most iovecs one readv/writev takes (Linux UIO_MAXIOV).
const MAX_IOV: usize = 1024;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun could not be opened.
    #[error("cannot open {TUN_PATH}: {0} (is the tun module loaded and the device node present?)")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach to tap {name}: {source}{hint}")]
    Attach {
        /// Interface name.
        name: String,
        /// Cause.
        source: io::Error,
        /// What to check.
        hint: &'static str,
    },
    /// An ioctl on the tap failed.
    #[error("cannot configure tap {name} ({what}): {source}")]
    Configure {
        /// Interface name.
        name: String,
        /// Which setting.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// The interface name is invalid.
    #[error(transparent)]
    Name(#[from] netdev::NameError),
    /// Reading or setting link state failed.
    #[error(transparent)]
    Link(#[from] netdev::LinkError),
    /// `tap_tx = "io-uring"` was asked for and the kernel refused a ring.
    #[error(
        "cannot set up io_uring for tap {name}: {source} (kernel.io_uring_disabled, a container's \
         seccomp profile or a kernel older than 5.10; tap_tx = \"writev\" works everywhere)"
    )]
    Uring {
        /// Interface name.
        name: String,
        /// Cause.
        source: io::Error,
    },
}

/// What a queue is made of until its worker takes it: the tap fd and its io_uring, if any.
type QueueParts = (OwnedFd, Option<UringTx>);

/// A tap device with `queues` queue fds.
pub struct TapPort {
    name: IfName,
    ctl: OwnedFd,
    queues: Mutex<Vec<Option<QueueParts>>>,
    caps: HostCapabilities,
    mtu: u16,
    /// The virtio-net header length the guest negotiated, shared with the queues.
    hdr_len: Arc<AtomicUsize>,
}

impl TapPort {
    /// Attaches to tap `name` or creates it (in the current network namespace) with `queues`
    /// queues, brings it up, and applies `mtu` when given. Without `mtu`, the device's MTU is used.
    /// `tx` chooses how guest frames are written (see [`TapTx`]); the io_uring rings are set up
    /// here, on the calling (privileged) thread.
    pub fn open(name: &str, queues: usize, mtu: Option<u16>, tx: TapTx) -> Result<Self, TapError> {
        let ifname = IfName::new(name)?;
        let existed = netdev::exists(&ifname);
        let mut fds = Vec::with_capacity(queues);
        for _ in 0..queues {
            fds.push(Self::open_queue(&ifname, queues > 1)?);
        }
        let ctl = fds[0].try_clone().map_err(|source| TapError::Configure {
            name: name.into(),
            what: "dup",
            source,
        })?;
        let mut rings = Vec::with_capacity(queues);
        for fd in &fds {
            rings.push(match tx {
                TapTx::Writev => None,
                TapTx::IoUring => Some(UringTx::new(fd.as_raw_fd()).map_err(|source| {
                    TapError::Uring {
                        name: name.into(),
                        source,
                    }
                })?),
                TapTx::Auto => match UringTx::new(fd.as_raw_fd()) {
                    Ok(u) => Some(u),
                    Err(e) => {
                        tracing::info!(tap = name, error = %e, "io_uring unavailable, writing with writev");
                        None
                    }
                },
            });
        }
        let io_uring = rings.iter().all(Option::is_some);
        let port = TapPort {
            name: ifname.clone(),
            caps: HostCapabilities {
                uso: netdev::tun_set_offload(&ctl, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6).is_ok(),
                // A tap takes GSO frames from userspace whatever its own features.
                no_host_tso: false,
            },
            ctl,
            queues: Mutex::new(fds.into_iter().zip(rings).map(Some).collect()),
            mtu: 0,
            hdr_len: Arc::new(AtomicUsize::new(12)),
        };
        // Until the guest says otherwise, the tap hands us plain, checksummed frames.
        port.set_offload_flags(0)?;
        port.set_hdr_len(12)?;
        if let Some(m) = mtu {
            netdev::set_mtu(&ifname, m)?;
        }
        netdev::set_up(&ifname)?;
        let mtu = netdev::mtu(&ifname)?;
        tracing::info!(
            tap = name,
            existed,
            queues,
            mtu,
            uso = port.caps.uso,
            io_uring,
            "tap ready"
        );
        Ok(TapPort { mtu, ..port })
    }

    /// The MTU the device has now.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    fn open_queue(name: &IfName, multi_queue: bool) -> Result<OwnedFd, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        if let Err(source) = netdev::tun_set_iff(&file, name, multi_queue) {
            let hint = match source.raw_os_error() {
                Some(libc::EPERM) => " (creating or attaching a tap needs CAP_NET_ADMIN)",
                Some(libc::EINVAL) => {
                    " (an existing tap must match the queue mode: multi_queue exactly when --queues > 1)"
                }
                Some(libc::EBUSY) => " (the tap is already attached by another process)",
                _ => "",
            };
            return Err(TapError::Attach {
                name: name.as_str().into(),
                source,
                hint,
            });
        }
        Ok(file.into())
    }

    fn set_offload_flags(&self, flags: libc::c_uint) -> Result<(), TapError> {
        netdev::tun_set_offload(&self.ctl, flags).map_err(|source| TapError::Configure {
            name: self.name.as_str().into(),
            what: "TUNSETOFFLOAD",
            source,
        })
    }

    fn set_hdr_len(&self, len: libc::c_int) -> Result<(), TapError> {
        netdev::tun_set_vnet_hdr_sz(&self.ctl, len).map_err(|source| TapError::Configure {
            name: self.name.as_str().into(),
            what: "TUNSETVNETHDRSZ",
            source,
        })
    }
}

/// Maps the guest's receive offloads to TUNSETOFFLOAD flags.
pub fn tun_offload_flags(o: GuestOffloads, caps: HostCapabilities) -> libc::c_uint {
    let mut f = 0;
    if o.csum {
        f |= TUN_F_CSUM;
        if o.tso4 {
            f |= TUN_F_TSO4;
        }
        if o.tso6 {
            f |= TUN_F_TSO6;
        }
        if o.tso_ecn && (o.tso4 || o.tso6) {
            f |= TUN_F_TSO_ECN;
        }
        if caps.uso && o.uso4 {
            f |= TUN_F_USO4;
        }
        if caps.uso && o.uso6 {
            f |= TUN_F_USO6;
        }
    }
    f
}

impl HostPort for TapPort {
    fn capabilities(&self) -> HostCapabilities {
        self.caps
    }

    fn configure(&self, vnet_hdr_len: usize, offloads: GuestOffloads) -> io::Result<()> {
        let len = libc::c_int::try_from(vnet_hdr_len)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.set_hdr_len(len).map_err(io::Error::other)?;
        self.hdr_len.store(vnet_hdr_len, Relaxed);
        self.set_offload_flags(tun_offload_flags(offloads, self.caps))
            .map_err(io::Error::other)
    }

    fn take_queue(&self, pair: usize) -> io::Result<Box<dyn HostQueue>> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let (fd, uring) = queues
            .get_mut(pair)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such tap queue"))?;
        Ok(Box::new(TapQueue {
            fd,
            uring,
            hdr_len: self.hdr_len.clone(),
            name: self.name.as_str().into(),
            late: TxDrops::default(),
            rx_iov: Vec::with_capacity(8),
            overflow: [0; 1],
        }))
    }
}

/// One tap queue fd.
pub struct TapQueue {
    fd: OwnedFd,
    /// The io_uring guest frames are written through; none: one `writev` per frame.
    uring: Option<UringTx>,
    hdr_len: Arc<AtomicUsize>,
    name: String,
    /// Frames lost by a ring given up, for the next flush.
    late: TxDrops,
    /// The iovecs of one `readv`: the guest's, then one byte of `overflow`.
    rx_iov: Vec<libc::iovec>,
    /// Catches the first byte past the guest's buffers. A tap cuts a frame longer than the
    /// buffers of a read to their size and reports only what it copied; a byte landing here
    /// tells that the frame did not fit.
    overflow: [u8; 1],
}

// SAFETY: `rx_iov` holds pointers only during one `recv` call and is cleared before reuse;
// the fd and the byte are plain data.
unsafe impl Send for TapQueue {}

fn map_io(r: isize) -> io::Result<usize> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(match e.raw_os_error() {
            // A frame that does not fit the buffers (read) or a malformed frame (write).
            Some(libc::EFAULT) | Some(libc::EINVAL) | Some(libc::EMSGSIZE) => {
                io::Error::new(io::ErrorKind::InvalidInput, e)
            }
            _ => e,
        })
    } else {
        Ok(r as usize)
    }
}

impl HostQueue for TapQueue {
    fn rx_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn max_iovecs(&self) -> usize {
        // One is kept for the overflow byte.
        MAX_IOV - 1
    }

    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if iov.is_empty() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // More iovecs than `max_iovecs` are never offered; should they be, the frame goes into
        // the first ones (or is dropped) rather than being left in the tap for the same
        // buffers to be offered again.
        let iov = &iov[..iov.len().min(MAX_IOV - 1)];
        let capacity = iov
            .iter()
            .map(|v| v.iov_len)
            .fold(0usize, usize::saturating_add);
        self.rx_iov.clear();
        self.rx_iov.extend_from_slice(iov);
        self.rx_iov.push(libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: self.overflow.len(),
        });
        // SAFETY: the caller guarantees the guest iovecs are valid for writes; the last one is
        // `overflow`, ours for the call; the count is at most MAX_IOV and fits c_int.
        let r = map_io(unsafe {
            libc::readv(
                self.fd.as_raw_fd(),
                self.rx_iov.as_ptr(),
                self.rx_iov.len() as libc::c_int,
            )
        });
        self.rx_iov.clear();
        match r {
            // The tap consumed the frame and cut it: dropped, never handed on truncated (no
            // allocation: a guest's tiny buffers can make every frame take this path).
            Ok(n) if n > capacity => Err(io::ErrorKind::InvalidInput.into()),
            r => r,
        }
    }

    unsafe fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if iov.is_empty() || iov.len() > MAX_IOV {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        if let Some(u) = self.uring.as_mut() {
            // SAFETY: with a ring, `flush_before_release` is true: the worker keeps the burst's
            // buffers (and its port-security copies) unchanged until `flush` returns.
            match unsafe { u.send(iov, self.hdr_len.load(Relaxed)) } {
                Ok(n) => return Ok(n),
                Err(e) => self.ring_broken(e),
            }
            // This frame was not queued: it is written below.
        }
        // SAFETY: the caller guarantees every iovec is valid for reads; the count fits c_int.
        map_io(unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) })
    }

    fn flush(&mut self) -> TxDrops {
        if let Some(u) = self.uring.as_mut() {
            match u.flush(self.hdr_len.load(Relaxed)) {
                Ok(d) => self.late.add(d),
                Err(e) => self.ring_broken(e),
            }
        }
        std::mem::take(&mut self.late)
    }

    fn flush_before_release(&self) -> bool {
        self.uring.is_some()
    }
}

impl TapQueue {
    /// Gives up the ring for `writev` after a submission failure; the frames it lost are
    /// reported by the next flush.
    fn ring_broken(&mut self, e: uring::RingBroken) {
        tracing::warn!(tap = %self.name, error = %e, "io_uring failed, writing with writev from now on");
        if let Some(mut u) = self.uring.take() {
            self.late.add(u.take_late());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_mapping_follows_guest_and_host() {
        let all = GuestOffloads {
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
            uso4: true,
            uso6: true,
        };
        let no_uso = HostCapabilities::default();
        assert_eq!(
            tun_offload_flags(all, no_uso),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        assert_eq!(
            tun_offload_flags(
                all,
                HostCapabilities {
                    uso: true,
                    ..Default::default()
                },
            ) & (TUN_F_USO4 | TUN_F_USO6),
            TUN_F_USO4 | TUN_F_USO6
        );
        assert_eq!(tun_offload_flags(GuestOffloads::default(), no_uso), 0);
        let tso_no_csum = GuestOffloads {
            tso4: true,
            ..Default::default()
        };
        assert_eq!(tun_offload_flags(tso_no_csum, no_uso), 0);
    }
}
