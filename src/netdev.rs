//! Small helpers for host network interfaces: validated names, link up, MTU.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_cstr().as_ptr()) != 0 }
}

#[repr(C)]
union IfReqData {
    flags: libc::c_short,
    mtu: libc::c_int,
    _pad: [u8; 24],
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: IfReqData,
}

impl IfReq {
    fn new(name: &IfName) -> Self {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: IfReqData { _pad: [0; 24] },
        };
        for (d, s) in r.name.iter_mut().zip(name.as_cstr().to_bytes()) {
            *d = *s as libc::c_char;
        }
        r
    }
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

fn ifreq_ioctl(
    name: &IfName,
    what: &'static str,
    req: libc::c_ulong,
    r: &mut IfReq,
) -> Result<(), LinkError> {
    let err = |source| LinkError {
        name: name.as_str().into(),
        what,
        source,
    };
    let sock = ctl_socket().map_err(err)?;
    // SAFETY: the SIOC[GS]IF* requests used here read/write a `struct ifreq`, which IfReq
    // mirrors (16-byte name + 24-byte union) and which lives for the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), req, r as *mut IfReq) };
    if rc < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Brings the interface up.
pub fn set_up(name: &IfName) -> Result<(), LinkError> {
    let mut r = IfReq::new(name);
    ifreq_ioctl(name, "read flags", libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { r.data.flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    r.data.flags = flags | libc::IFF_UP as libc::c_short;
    ifreq_ioctl(name, "bring up", libc::SIOCSIFFLAGS, &mut r)
}

/// Reads the interface MTU.
pub fn mtu(name: &IfName) -> Result<u16, LinkError> {
    let mut r = IfReq::new(name);
    ifreq_ioctl(name, "read the MTU", libc::SIOCGIFMTU, &mut r)?;
    // SAFETY: SIOCGIFMTU filled the mtu member.
    let m = unsafe { r.data.mtu };
    Ok(u16::try_from(m).unwrap_or(u16::MAX))
}

/// Sets the interface MTU.
pub fn set_mtu(name: &IfName, mtu: u16) -> Result<(), LinkError> {
    let mut r = IfReq::new(name);
    r.data.mtu = libc::c_int::from(mtu);
    ifreq_ioctl(name, "set the MTU", libc::SIOCSIFMTU, &mut r)
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
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
