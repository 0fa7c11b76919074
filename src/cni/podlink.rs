//! The link Kata runtime-go looks for in the pod's network namespace (`"kata": "go"`).
//!
//! Kata runtime-go scans the pod netns when it starts a sandbox. A link that is not a physical
//! NIC, has an address A, and for which `/tmp/vhostuser_<A>/vhu.sock` exists becomes a
//! vhost-user endpoint: QEMU gets that socket as a client chardev and the link's MAC as the
//! device's `mac=`, and the guest gets the link's addresses, routes and MTU. So the link only
//! has to *describe* the guest interface: a dummy device carries it, and no frame ever crosses
//! it (the frames go guest ↔ vhost-pump ↔ host port). On kernels built without the dummy
//! driver an `ifb` device stands in (also virtual, so Kata's physical-NIC test passes it by).
//!
//! Kata also copies the link's `IFF_NOARP` flag to the guest interface, and both dummy and ifb
//! devices are created with it: left on, the guest would never resolve its gateway. ARP is
//! switched on explicitly.
//!
//! The link is made over route netlink with a socket opened inside the pod netns
//! ([`Rtnl::in_netns`]), so the plugin's threads never leave the host netns.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::{LinkDummy, LinkIfb, LinkUnspec};

use super::error::{code, CniError};
use super::rtnl::{Rtnl, RtnlError};
use crate::netdev::IfName;
use vhost_net_backend::MacAddr;

/// Prefix of the directory Kata runtime-go probes for each address of a pod link.
pub const KATA_SOCKET_PREFIX: &str = "/tmp/vhostuser_";
/// File name of the socket in that directory.
pub const KATA_SOCKET_NAME: &str = "vhu.sock";

/// The socket path Kata runtime-go probes for address `ip`: `/tmp/vhostuser_<ip>/vhu.sock`,
/// with the address in its canonical text form (IPv6 compressed, as Go prints it).
pub fn kata_socket_path(ip: IpAddr) -> PathBuf {
    PathBuf::from(format!("{KATA_SOCKET_PREFIX}{ip}")).join(KATA_SOCKET_NAME)
}

/// Pod-link failures.
#[derive(Debug, thiserror::Error)]
pub enum PodLinkError {
    /// A netlink request in the pod netns failed.
    #[error("in network namespace {netns}: {source}")]
    Netlink {
        /// Namespace.
        netns: PathBuf,
        /// Cause.
        #[source]
        source: RtnlError,
    },
    /// The guest MAC is not `aa:bb:cc:dd:ee:ff`.
    #[error("invalid MAC address {0:?}")]
    Mac(String),
    /// The interface name is taken in the pod netns.
    #[error("the pod network namespace {netns} already has an interface {ifname}")]
    Exists {
        /// Namespace.
        netns: PathBuf,
        /// Name.
        ifname: String,
    },
    /// Bad interface name.
    #[error(transparent)]
    Name(#[from] crate::netdev::NameError),
}

impl From<PodLinkError> for CniError {
    fn from(e: PodLinkError) -> CniError {
        CniError::new(code::POD_LINK, e.to_string())
    }
}

/// What the pod link carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLinkSpec {
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The guest MAC (QEMU's `mac=`).
    pub mac: String,
    /// The guest MTU.
    pub mtu: u16,
    /// Addresses with their prefix.
    pub addrs: Vec<IpNet>,
    /// Routes: destination and next hop (`None`: on-link).
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// Link kinds tried in order: the dummy driver, else ifb.
pub const LINK_KINDS: [&str; 2] = ["dummy", "ifb"];

impl PodLinkSpec {
    /// The link message that makes the link as a `kind` device (one of [`LINK_KINDS`]), down.
    fn link_message(&self, kind: &str, mac: Vec<u8>) -> LinkMessage {
        let n = &self.ifname;
        let mtu = self.mtu.into();
        if kind == "ifb" {
            LinkIfb::new(n).address(mac).mtu(mtu).build()
        } else {
            LinkDummy::new(n).address(mac).mtu(mtu).build()
        }
    }
}

/// What CHECK reads back from the pod netns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodLinkInfo {
    /// Link kind (`dummy`), if any.
    pub kind: Option<String>,
    /// `IFF_NOARP` is set (Kata would give the guest interface no ARP).
    pub noarp: bool,
    /// MAC address.
    pub mac: Option<String>,
    /// MTU.
    pub mtu: u32,
    /// Addresses with prefix.
    pub addrs: Vec<IpNet>,
}

/// Opens a netlink socket in `netns`, with errors naming the namespace.
fn open(netns: &Path) -> Result<Rtnl, PodLinkError> {
    Rtnl::in_netns(netns).map_err(in_ns(netns))
}

/// Wraps a netlink error with the namespace it happened in.
fn in_ns(netns: &Path) -> impl Fn(RtnlError) -> PodLinkError + '_ {
    move |source| PodLinkError::Netlink {
        netns: netns.into(),
        source,
    }
}

/// Facts about `ifname` in `netns`; `None` when it does not exist.
pub fn inspect(netns: &Path, ifname: &str) -> Result<Option<PodLinkInfo>, PodLinkError> {
    IfName::new(ifname)?;
    let nl = open(netns)?;
    let Some(l) = nl.link(ifname).map_err(in_ns(netns))? else {
        return Ok(None);
    };
    let addrs = nl.addresses(l.index).map_err(in_ns(netns))?;
    Ok(Some(PodLinkInfo {
        kind: l.kind,
        noarp: l.noarp,
        mac: l.mac,
        mtu: l.mtu,
        addrs,
    }))
}

/// Creates the link `spec` describes in `netns`, with its addresses and routes, and returns
/// its kind (see [`LINK_KINDS`]). A link of that name already there is refused (it is someone
/// else's: ours are removed on failure).
pub fn create(netns: &Path, spec: &PodLinkSpec) -> Result<&'static str, PodLinkError> {
    IfName::new(&spec.ifname)?;
    let mac = spec
        .mac
        .parse::<MacAddr>()
        .map_err(|_| PodLinkError::Mac(spec.mac.clone()))?
        .0
        .to_vec();
    let nl = open(netns)?;
    let err = in_ns(netns);
    if nl.link(&spec.ifname).map_err(&err)?.is_some() {
        return Err(PodLinkError::Exists {
            netns: netns.into(),
            ifname: spec.ifname.clone(),
        });
    }
    let n = &spec.ifname;
    let mut last = None;
    for kind in LINK_KINDS {
        let what = format!("name {n} address {} mtu {} type {kind}", spec.mac, spec.mtu);
        match nl.add_link(&what, spec.link_message(kind, mac.clone())) {
            Ok(()) => {}
            // Kernels without the driver answer EOPNOTSUPP ("Unknown device type").
            Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
                last = Some(err(e));
                continue;
            }
            Err(e) => return Err(err(e)),
        }
        let r = configure(&nl, spec).map_err(&err);
        if r.is_err() {
            let _ = delete(netns, n);
        }
        return r.map(|()| kind);
    }
    Err(last.unwrap_or(PodLinkError::Exists {
        netns: netns.into(),
        ifname: spec.ifname.clone(),
    }))
}

/// Turns ARP on for the new link, puts the addresses of `spec` on it, brings it up and adds
/// the routes (which need it up). The order matters: brought up while still `IFF_NOARP` and
/// switched to ARP after, the link was seen keeping its link-local IPv6 address tentative for
/// a second, and Kata must not read a tentative address.
fn configure(nl: &Rtnl, spec: &PodLinkSpec) -> Result<(), RtnlError> {
    let n = &spec.ifname;
    let Some(link) = nl.link(n)? else {
        return Err(RtnlError::Protocol {
            op: format!("ip link show dev {n}"),
            detail: "the link vanished right after it was made".into(),
        });
    };
    let set = |what: &str, b: rtnetlink::LinkMessageBuilder<LinkUnspec>| {
        nl.set_link(&format!("dev {n} {what}"), b.build())
    };
    set("arp on", LinkUnspec::new_with_index(link.index).arp(true))?;
    for a in &spec.addrs {
        // No duplicate address detection: nothing answers on a dummy, and Kata must not
        // read a tentative address.
        nl.add_address(link.index, *a, a.addr().is_ipv6())?;
    }
    set("up", LinkUnspec::new_with_index(link.index).up())?;
    for (dst, via) in &spec.routes {
        nl.add_route(*dst, *via, link.index)?;
    }
    Ok(())
}

/// Deletes `ifname` from `netns`; a namespace or link already gone is fine.
pub fn delete(netns: &Path, ifname: &str) -> Result<(), PodLinkError> {
    IfName::new(ifname)?;
    if !netns.exists() {
        return Ok(());
    }
    let nl = match Rtnl::in_netns(netns) {
        Ok(nl) => nl,
        // The pod's namespace is gone (or the path no longer is a namespace): so is the link.
        Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EINVAL)) => return Ok(()),
        Err(e) => return Err(in_ns(netns)(e)),
    };
    let Some(l) = nl.link(ifname).map_err(in_ns(netns))? else {
        return Ok(());
    };
    match nl.delete_link(l.index) {
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
        r => r.map_err(in_ns(netns)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_use_canonical_addresses() {
        assert_eq!(
            kata_socket_path("10.88.0.5".parse().unwrap()),
            Path::new("/tmp/vhostuser_10.88.0.5/vhu.sock")
        );
        assert_eq!(
            kata_socket_path("fd00:0:0::0:5".parse().unwrap()),
            Path::new("/tmp/vhostuser_fd00::5/vhu.sock")
        );
    }
}
