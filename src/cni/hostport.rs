//! The host side of an attachment: a persistent tap enslaved to a bridge, or a macvlan on a
//! master interface (or the master itself) for AF_PACKET. Taps are made persistent here
//! (TUNSETPERSIST), so they outlive sidecar restarts and the daemon only attaches to them;
//! links, bridges and addresses are set up over route netlink ([`super::rtnl`]).

use std::fs::OpenOptions;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;

use ipnet::IpNet;
use rtnetlink::packet_route::link::MacVlanMode;
use rtnetlink::{LinkBridge, LinkMacVlan, LinkUnspec};

use super::config::MacvlanMode;
use super::error::{code, CniError};
use super::rtnl::{Rtnl, RtnlError};
use crate::netdev::{self, IfName};
use vhost_net_backend::MacAddr;

/// Host port failures.
#[derive(Debug, thiserror::Error)]
pub enum HostPortError {
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] RtnlError),
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
    /// A MAC address is not `aa:bb:cc:dd:ee:ff`.
    #[error("invalid MAC address {0:?}")]
    Mac(String),
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

/// Facts about `name`; `None` if it does not exist.
pub fn link(name: &str) -> Result<Option<LinkInfo>, HostPortError> {
    IfName::new(name)?;
    let nl = Rtnl::here()?;
    let Some(l) = nl.link(name)? else {
        return Ok(None);
    };
    let master = match l.master {
        Some(i) => nl.link_name(i)?,
        None => None,
    };
    Ok(Some(LinkInfo {
        mtu: l.mtu,
        mac: l.mac,
        master,
        kind: l.kind,
    }))
}

/// The index of `name`, or [`HostPortError::Missing`].
fn index_of(nl: &Rtnl, name: &str) -> Result<u32, HostPortError> {
    nl.link(name)?
        .map(|l| l.index)
        .ok_or_else(|| HostPortError::Missing(name.into()))
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
    let nl = Rtnl::here()?;
    if nl.link(name)?.is_none() {
        let mut b = LinkBridge::new(name);
        if let Some(m) = mtu {
            b = b.mtu(m.into());
        }
        // Concurrent ADDs race to create it: losing the race is fine.
        match nl.add_link(&format!("{name} type bridge"), b.build()) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            r => r?,
        }
    }
    let index = index_of(&nl, name)?;
    pin_mac(&nl, name, index)?;
    nl.set_link(
        &format!("dev {name} up"),
        LinkUnspec::new_with_index(index).up().build(),
    )?;
    Ok(())
}

/// Gives bridge `name` its current MAC as a set address, unless it has one. A bridge whose
/// address was never set takes the lowest MAC of its ports and changes it as pods come and go;
/// every guest's ARP entry for the gateway would then go stale each time a pod leaves.
fn pin_mac(nl: &Rtnl, name: &str, index: u32) -> Result<(), HostPortError> {
    // addr_assign_type 3: NET_ADDR_SET (someone set it; leave it alone).
    let kind = std::fs::read_to_string(format!("/sys/class/net/{name}/addr_assign_type"));
    if kind.is_ok_and(|k| k.trim() == "3") {
        return Ok(());
    }
    let Some(mac) = nl.link(name)?.and_then(|l| l.mac) else {
        return Ok(());
    };
    let bytes = mac
        .parse::<MacAddr>()
        .map_err(|_| HostPortError::Mac(mac.clone()))?
        .0
        .to_vec();
    nl.set_link(
        &format!("dev {name} address {mac}"),
        LinkUnspec::new_with_index(index).address(bytes).build(),
    )?;
    Ok(())
}

/// Brings link `name` up.
pub fn set_up(name: &str) -> Result<(), HostPortError> {
    IfName::new(name)?;
    let nl = Rtnl::here()?;
    let index = index_of(&nl, name)?;
    nl.set_link(
        &format!("dev {name} up"),
        LinkUnspec::new_with_index(index).up().build(),
    )?;
    Ok(())
}

/// Puts `addr` (gateway address with the subnet's prefix) on `bridge` unless present, and
/// enables forwarding for its family.
pub fn add_gateway(bridge: &str, addr: IpNet) -> Result<(), HostPortError> {
    let nl = Rtnl::here()?;
    let index = index_of(&nl, bridge)?;
    let present = nl.addresses(index)?.iter().any(|a| a.addr() == addr.addr());
    if !present {
        // Concurrent ADDs race to add it: losing the race is fine.
        match nl.add_address(index, addr, false) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            r => r?,
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
    let nl = Rtnl::here()?;
    let bridge_index = index_of(&nl, bridge)?;
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
    let r = index_of(&nl, name).and_then(|index| {
        let msg = LinkUnspec::new_with_index(index)
            .mtu(mtu.into())
            .controller(bridge_index)
            .up()
            .build();
        Ok(nl.set_link(&format!("dev {name} mtu {mtu} master {bridge} up"), msg)?)
    });
    if r.is_err() {
        let _ = delete(name);
    }
    r
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
    let bytes = mac
        .parse::<MacAddr>()
        .map_err(|_| HostPortError::Mac(mac.into()))?
        .0
        .to_vec();
    let nl = Rtnl::here()?;
    let master_index = index_of(&nl, master)?;
    if nl.link(name)?.is_some() {
        delete(name)?;
    }
    let nl_mode = match mode {
        MacvlanMode::Bridge => MacVlanMode::Bridge,
        MacvlanMode::Private => MacVlanMode::Private,
        MacvlanMode::Vepa => MacVlanMode::Vepa,
        MacvlanMode::Passthru => MacVlanMode::Passthrough,
    };
    // Created up: if bringing it up fails, the kernel does not keep the link.
    let msg = LinkMacVlan::new(name, master_index, nl_mode)
        .address(bytes)
        .mtu(mtu.into())
        .up()
        .build();
    nl.add_link(
        &format!(
            "link {master} name {name} address {mac} mtu {mtu} type macvlan mode {}",
            mode.as_str()
        ),
        msg,
    )?;
    Ok(())
}

/// Deletes link `name` if it exists.
pub fn delete(name: &str) -> Result<(), HostPortError> {
    IfName::new(name)?;
    let nl = Rtnl::here()?;
    let Some(l) = nl.link(name)? else {
        return Ok(());
    };
    match nl.delete_link(l.index) {
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
        r => Ok(r?),
    }
}
