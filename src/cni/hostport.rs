//! The host side of an attachment: a persistent tap enslaved to a bridge, or a macvlan on a
//! master interface (or the master itself) for AF_PACKET. Taps are made persistent here
//! (TUNSETPERSIST), so they outlive sidecar restarts and the daemon only attaches to them;
//! links, bridges and addresses are handled with iproute2's `ip`.

use std::fs::OpenOptions;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::Command;

use ipnet::IpNet;
use serde::Deserialize;

use super::config::MacvlanMode;
use super::error::{code, CniError};
use crate::netdev::{self, IfName};

/// Host port failures.
#[derive(Debug, thiserror::Error)]
pub enum HostPortError {
    /// iproute2 is missing.
    #[error(
        "the `ip` command (iproute2) was not found in /usr/sbin, /sbin, /usr/bin, /bin or PATH"
    )]
    NoIpCommand,
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// Arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// The tap could not be created.
    #[error("cannot create tap {name}: {source}{hint}")]
    Tap {
        /// Tap name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
        /// What to check.
        hint: &'static str,
    },
    /// A required interface is missing.
    #[error("interface {0} does not exist")]
    Missing(String),
    /// Bad interface name.
    #[error(transparent)]
    Name(#[from] netdev::NameError),
    /// Link setting failure.
    #[error(transparent)]
    Link(#[from] netdev::LinkError),
    /// A sysctl could not be set.
    #[error("cannot enable forwarding ({path}): {source}")]
    Forwarding {
        /// The /proc file.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl From<HostPortError> for CniError {
    fn from(e: HostPortError) -> CniError {
        CniError::new(code::HOST_PORT, e.to_string())
    }
}

/// Where `ip` is.
pub fn ip_command() -> Result<PathBuf, HostPortError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join("ip"))
        .find(|p| super::ipam::is_executable(p))
        .ok_or(HostPortError::NoIpCommand)
}

/// Runs `ip ARGS`, returning stdout.
fn ip(args: &[&str]) -> Result<String, HostPortError> {
    let out = Command::new(ip_command()?)
        .args(args)
        .output()
        .map_err(|e| HostPortError::Ip {
            args: args.join(" "),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(HostPortError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether interface `name` exists here.
pub fn exists(name: &str) -> bool {
    IfName::new(name).is_ok_and(|n| netdev::exists(&n))
}

/// What CHECK and the result need to know about a link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// MTU.
    pub mtu: u32,
    /// MAC address.
    pub mac: Option<String>,
    /// Bridge or other master it is enslaved to.
    pub master: Option<String>,
    /// Link kind (`tun`, `macvlan`, `bridge`, ...).
    pub kind: Option<String>,
}

#[derive(Deserialize)]
struct IpLink {
    mtu: Option<u32>,
    address: Option<String>,
    master: Option<String>,
    linkinfo: Option<IpLinkInfo>,
}

#[derive(Deserialize)]
struct IpLinkInfo {
    info_kind: Option<String>,
}

/// Facts about `name`; `None` if it does not exist.
pub fn link(name: &str) -> Result<Option<LinkInfo>, HostPortError> {
    if !exists(name) {
        return Ok(None);
    }
    let out = ip(&["-j", "-d", "link", "show", "dev", name])?;
    let links: Vec<IpLink> = serde_json::from_str(&out).map_err(|e| HostPortError::Ip {
        args: format!("-j -d link show dev {name}"),
        stderr: format!("unreadable JSON: {e}"),
    })?;
    Ok(links.into_iter().next().map(|l| LinkInfo {
        mtu: l.mtu.unwrap_or(0),
        mac: l.address,
        master: l.master,
        kind: l.linkinfo.and_then(|i| i.info_kind),
    }))
}

/// MTU of an existing interface.
pub fn mtu(name: &str) -> Result<u16, HostPortError> {
    let n = IfName::new(name)?;
    if !netdev::exists(&n) {
        return Err(HostPortError::Missing(name.into()));
    }
    Ok(netdev::mtu(&n)?)
}

/// Creates bridge `name` if missing (with `mtu` when given) and brings it up.
pub fn ensure_bridge(name: &str, mtu: Option<u16>) -> Result<(), HostPortError> {
    IfName::new(name)?;
    if !exists(name) {
        let mut args = vec!["link", "add", "name", name];
        let m = mtu.map(|m| m.to_string());
        if let Some(m) = &m {
            args.extend(["mtu", m.as_str()]);
        }
        args.extend(["type", "bridge"]);
        // Concurrent ADDs race to create it: losing the race is fine.
        if let Err(e) = ip(&args) {
            if !exists(name) {
                return Err(e);
            }
        }
    }
    pin_mac(name)?;
    ip(&["link", "set", "dev", name, "up"]).map(drop)
}

/// Gives bridge `name` its current MAC as a set address, unless it has one. A bridge whose
/// address was never set takes the lowest MAC of its ports and changes it as pods come and go;
/// every guest's ARP entry for the gateway would then go stale each time a pod leaves.
fn pin_mac(name: &str) -> Result<(), HostPortError> {
    // addr_assign_type 3: NET_ADDR_SET (someone set it; leave it alone).
    let kind = std::fs::read_to_string(format!("/sys/class/net/{name}/addr_assign_type"));
    if kind.is_ok_and(|k| k.trim() == "3") {
        return Ok(());
    }
    let Some(mac) = link(name)?.and_then(|l| l.mac) else {
        return Ok(());
    };
    ip(&["link", "set", "dev", name, "address", &mac]).map(drop)
}

/// Puts `addr` (gateway address with the subnet's prefix) on `bridge` unless present, and
/// enables forwarding for its family.
pub fn add_gateway(bridge: &str, addr: IpNet) -> Result<(), HostPortError> {
    let present = || -> Result<bool, HostPortError> {
        let shown = ip(&["-o", "addr", "show", "dev", bridge])?;
        let want = addr.addr().to_string();
        Ok(shown
            .split_whitespace()
            .any(|w| w.split('/').next() == Some(want.as_str())))
    };
    if !present()? {
        // Concurrent ADDs race to add it: losing the race is fine.
        if let Err(e) = ip(&["addr", "add", &addr.to_string(), "dev", bridge]) {
            if !present()? {
                return Err(e);
            }
        }
    }
    let path = match addr.addr() {
        IpAddr::V4(_) => "/proc/sys/net/ipv4/ip_forward",
        IpAddr::V6(_) => "/proc/sys/net/ipv6/conf/all/forwarding",
    };
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|source| HostPortError::Forwarding {
        path: path.into(),
        source,
    })
}

/// Creates persistent tap `name` (vnet header, multi-queue when `multi_queue`), sets `mtu`,
/// enslaves it to `bridge` and brings it up. A leftover tap of that name is replaced.
pub fn create_tap(
    name: &str,
    multi_queue: bool,
    mtu: u16,
    bridge: &str,
) -> Result<(), HostPortError> {
    let ifname = IfName::new(name)?;
    if netdev::exists(&ifname) {
        delete(name)?;
    }
    let tap_err = |source: io::Error| {
        let hint = match source.raw_os_error() {
            Some(libc::EPERM) => " (needs CAP_NET_ADMIN)",
            Some(libc::ENOENT) | Some(libc::ENODEV) => " (is the tun module loaded?)",
            _ => "",
        };
        HostPortError::Tap {
            name: name.into(),
            source,
            hint,
        }
    };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(tap_err)?;
    netdev::tun_set_iff(&tun, &ifname, multi_queue).map_err(tap_err)?;
    netdev::tun_set_persist(&tun, true).map_err(tap_err)?;
    drop(tun);
    let m = mtu.to_string();
    let r = ip(&[
        "link", "set", "dev", name, "mtu", &m, "master", bridge, "up",
    ]);
    if r.is_err() {
        let _ = delete(name);
    }
    r.map(drop)
}

/// Creates macvlan `name` on `master` with the guest's MAC (so the master hands it the guest's
/// frames) and `mtu`, and brings it up. A leftover link of that name is replaced.
pub fn create_macvlan(
    name: &str,
    master: &str,
    mode: MacvlanMode,
    mac: &str,
    mtu: u16,
) -> Result<(), HostPortError> {
    IfName::new(name)?;
    if !exists(master) {
        return Err(HostPortError::Missing(master.into()));
    }
    if exists(name) {
        delete(name)?;
    }
    let m = mtu.to_string();
    ip(&[
        "link",
        "add",
        "link",
        master,
        "name",
        name,
        "address",
        mac,
        "mtu",
        &m,
        "type",
        "macvlan",
        "mode",
        mode.as_str(),
    ])?;
    let r = ip(&["link", "set", "dev", name, "up"]);
    if r.is_err() {
        let _ = delete(name);
    }
    r.map(drop)
}

/// Deletes link `name` if it exists.
pub fn delete(name: &str) -> Result<(), HostPortError> {
    if !exists(name) {
        return Ok(());
    }
    match ip(&["link", "del", "dev", name]) {
        Err(_) if !exists(name) => Ok(()),
        r => r.map(drop),
    }
}
