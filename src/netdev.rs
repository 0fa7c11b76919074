//! Host network interface syscalls, in one place: validated names, `struct ifreq` (libc's
//! type), interface index, link state, MTU, and the tun/tap ioctls (through vmm-sys-util's
//! ioctl helpers). The tap port, the AF_PACKET port, the CNI plugin and the sandbox's seccomp
//! allowlist all take their numbers from here, so the filter cannot drift from the code.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub use libc::{TUNSETIFF, TUNSETOFFLOAD, TUNSETPERSIST, TUNSETVNETHDRSZ};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// A validated Linux interface name (1..=15 bytes, no '/', ':' or whitespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfName(CString);

/// Why an interface name was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid interface name {0:?}: 1 to 15 characters, no '/', ':', or whitespace")]
pub struct NameError(pub String);

impl IfName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let ok = !name.is_empty()
            && name.len() < libc::IFNAMSIZ
            && name != "."
            && name != ".."
            && !name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
        if !ok {
            return Err(NameError(name.to_string()));
        }
        CString::new(name)
            .map(IfName)
            .map_err(|_| NameError(name.to_string()))
    }

    /// The name as a C string.
    pub fn as_cstr(&self) -> &CStr {
        &self.0
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

/// Whether interface `name` has TCP segmentation offload on (`ETHTOOL_GTSO`); `None` when
/// the driver does not say.
pub fn tso_enabled(name: &IfName) -> Option<bool> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_GTSO: u32 = 0x1e;
    let mut v = EthtoolValue {
        cmd: ETHTOOL_GTSO,
        data: 0,
    };
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
    let sock = ctl_socket().ok()?;
    // SAFETY: SIOCETHTOOL with an ifreq we own, whose data points at a live ethtool_value the
    // kernel reads and writes for the call only.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    (rc == 0).then_some(v.data != 0)
}

/// Errors reading or changing link settings.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} of interface {name}: {source}")]
pub struct LinkError {
    name: String,
    what: &'static str,
    #[source]
    source: io::Error,
}

/// True when an interface of this name exists in the current network namespace.
pub fn exists(name: &IfName) -> bool {
    index(name.as_cstr()).is_some()
}

/// A `struct ifreq` (libc's type) naming `name`, everything else zero.
pub fn ifreq(name: &IfName) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers, sockaddrs and a
    // pointer); all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.as_cstr().to_bytes()) {
        *d = *s as libc::c_char;
    }
    r
}

/// Index of interface `name` in the current network namespace, or None if there is none.
pub fn index(name: &CStr) -> Option<libc::c_int> {
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    libc::c_int::try_from(i).ok().filter(|i| *i > 0)
}

fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues `req` (one of the `SIOC[GS]IF*` requests, which read and write a `struct ifreq`)
/// on a control socket.
fn ifreq_ioctl(req: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
    let sock = ctl_socket()?;
    // SAFETY: the SIOC[GS]IF* requests used here read and write one `struct ifreq`, which
    // lives for the call.
    if unsafe { ioctl_with_mut_ref(&sock, req, r) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn link_ioctl(
    name: &IfName,
    what: &'static str,
    req: libc::c_ulong,
    r: &mut libc::ifreq,
) -> Result<(), LinkError> {
    ifreq_ioctl(req, r).map_err(|source| LinkError {
        name: name.as_str().into(),
        what,
        source,
    })
}

/// Brings the interface up.
pub fn set_up(name: &IfName) -> Result<(), LinkError> {
    let mut r = ifreq(name);
    link_ioctl(name, "read flags", libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    link_ioctl(name, "bring up", libc::SIOCSIFFLAGS, &mut r)
}

/// Whether interface `ifindex` exists and is administratively up.
pub fn is_up(ifindex: libc::c_int) -> io::Result<bool> {
    // SAFETY: as in `ifreq`: all-zero is a valid ifreq.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    let index = libc::c_uint::try_from(ifindex).map_err(io::Error::other)?;
    // SAFETY: if_indextoname writes at most IFNAMSIZ bytes into the name array.
    if unsafe { libc::if_indextoname(index, r.ifr_name.as_mut_ptr()) }.is_null() {
        return Err(io::Error::last_os_error());
    }
    ifreq_ioctl(libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    Ok(unsafe { r.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short != 0)
}

/// Reads the interface MTU.
pub fn mtu(name: &IfName) -> Result<u16, LinkError> {
    let mut r = ifreq(name);
    link_ioctl(name, "read the MTU", libc::SIOCGIFMTU, &mut r)?;
    // SAFETY: SIOCGIFMTU filled the mtu member.
    let m = unsafe { r.ifr_ifru.ifru_mtu };
    Ok(u16::try_from(m).unwrap_or(u16::MAX))
}

/// Sets the interface MTU.
pub fn set_mtu(name: &IfName, mtu: u16) -> Result<(), LinkError> {
    let mut r = ifreq(name);
    r.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    link_ioctl(name, "set the MTU", libc::SIOCSIFMTU, &mut r)
}

/// Attaches the `/dev/net/tun` file `tun` to tap `name` (created if it does not exist) with a
/// virtio-net header on every frame and no packet information; `multi_queue` for a tap with
/// one queue per file.
pub fn tun_set_iff(tun: &File, name: &IfName, multi_queue: bool) -> io::Result<()> {
    let mut r = ifreq(name);
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    // The flags are a short in the union; these values fit.
    r.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which lives for the call.
    if unsafe { ioctl_with_mut_ref(tun, TUNSETIFF, &mut r) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the tap of `tun` outlive its last open file (`TUNSETPERSIST`).
pub fn tun_set_persist(tun: &impl AsRawFd, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes an integer by value; no memory is passed.
    if unsafe { ioctl_with_val(tun, TUNSETPERSIST, libc::c_ulong::from(persist)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the tap's offloads (`TUN_F_*` flags): what it may hand us unsegmented or without a
/// checksum.
pub fn tun_set_offload(tun: &impl AsRawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes an integer by value; no memory is passed.
    if unsafe { ioctl_with_val(tun, TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the length of the virtio-net header in front of every frame (10 or 12).
pub fn tun_set_vnet_hdr_sz(tun: &impl AsRawFd, len: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the reference, valid for the call.
    if unsafe { ioctl_with_ref(tun, TUNSETVNETHDRSZ, &len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(IfName::new("tap0").is_ok());
        assert!(IfName::new("a-15-chars-long").is_ok());
        for bad in ["", "sixteen-chars-xx", "a/b", "a b", "a:1", ".", ".."] {
            assert!(IfName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ifreq_names_the_interface_and_has_the_kernel_size() {
        assert_eq!(std::mem::size_of::<libc::ifreq>(), 40);
        let r = ifreq(&IfName::new("tap0").unwrap());
        let name: Vec<u8> = r.ifr_name.iter().map(|c| *c as u8).collect();
        assert_eq!(&name[..5], b"tap0\0");
    }

    #[test]
    fn tun_ioctl_numbers_are_the_kernels() {
        // _IOW('T', n, int) as in <linux/if_tun.h>.
        assert_eq!(TUNSETIFF, 0x4004_54ca);
        assert_eq!(TUNSETPERSIST, 0x4004_54cb);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
        assert_eq!(TUNSETVNETHDRSZ, 0x4004_54d8);
    }
}
