//! Route netlink for the CNI plugin: links, addresses and routes in the host network
//! namespace or in a pod's, through the `rtnetlink` crate, so the plugin needs no iproute2 and
//! gets the kernel's errno instead of a command's text.
//!
//! A netlink socket stays in the network namespace it was opened in, so [`Rtnl::in_netns`]
//! opens it from a short-lived thread that has entered the pod's namespace with setns(2); the
//! calling thread (and every other thread of the plugin) never leaves the host namespace. The
//! plugin is a short-lived process, so each [`Rtnl`] drives its socket on its own single-thread
//! tokio runtime and its methods block.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, RouteMessageBuilder};
use vhost_net_backend::MacAddr;

/// Netlink failures.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    /// The namespace file could not be opened or entered.
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The netlink socket (or its runtime) could not be set up.
    #[error("cannot open a route netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused a request.
    #[error("{op}: {source}")]
    Kernel {
        /// What was asked, in `ip`'s words.
        op: String,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// The answer could not be understood.
    #[error("{op}: {detail}")]
    Protocol {
        /// What was asked.
        op: String,
        /// What went wrong.
        detail: String,
    },
}

impl RtnlError {
    /// The errno the kernel answered with, if this is a refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Kernel { source, .. } | RtnlError::Netns { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    fn of(op: impl Into<String>, e: rtnetlink::Error) -> Self {
        match e {
            rtnetlink::Error::NetlinkError(m) => RtnlError::Kernel {
                op: op.into(),
                source: m.to_io(),
            },
            other => RtnlError::Protocol {
                op: op.into(),
                detail: other.to_string(),
            },
        }
    }
}

/// What the plugin reads back about a link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// MTU.
    pub mtu: u32,
    /// MAC address, `aa:bb:...` (lower case).
    pub mac: Option<String>,
    /// Index of the bridge (or other master) it is enslaved to.
    pub master: Option<u32>,
    /// Link kind (`tun`, `macvlan`, `bridge`, `dummy`, ...).
    pub kind: Option<String>,
    /// `IFF_NOARP` is set.
    pub noarp: bool,
    /// `IFF_UP` is set.
    pub up: bool,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            noarp: m.header.flags.contains(LinkFlags::Noarp),
            up: m.header.flags.contains(LinkFlags::Up),
            ..Link::default()
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::Mtu(v) => link.mtu = *v,
                LinkAttribute::Address(b) => {
                    if let Ok(m) = <[u8; 6]>::try_from(b.as_slice()) {
                        link.mac = Some(MacAddr(m).to_string());
                    }
                }
                LinkAttribute::Controller(i) => link.master = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// A route netlink socket in one network namespace, with blocking methods.
pub struct Rtnl {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Rtnl {
    /// A socket in this thread's network namespace (the host's, for the plugin).
    pub fn here() -> Result<Rtnl, RtnlError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(RtnlError::Socket)?;
        let (conn, handle, _) = {
            let _in_runtime = rt.enter();
            rtnetlink::new_connection().map_err(RtnlError::Socket)?
        };
        rt.spawn(conn);
        Ok(Rtnl { rt, handle })
    }

    /// A socket in the network namespace at `netns` (`CNI_NETNS`).
    pub fn in_netns(netns: &Path) -> Result<Rtnl, RtnlError> {
        let ns = File::open(netns).map_err(|source| RtnlError::Netns {
            path: netns.into(),
            source,
        })?;
        let open = || -> Result<Rtnl, RtnlError> {
            // SAFETY: setns(2) on an open namespace file descriptor only changes the network
            // namespace of this thread, which is ours and ends once the socket is open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(RtnlError::Netns {
                    path: netns.into(),
                    source: io::Error::last_os_error(),
                });
            }
            Rtnl::here()
        };
        std::thread::scope(|s| {
            s.spawn(open).join().unwrap_or_else(|_| {
                Err(RtnlError::Socket(io::Error::other(
                    "the namespace thread panicked",
                )))
            })
        })
    }

    /// The link called `name`; `None` when there is none.
    pub fn link(&self, name: &str) -> Result<Option<Link>, RtnlError> {
        let op = format!("ip link show dev {name}");
        let r = self.rt.block_on(async {
            self.handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_next()
                .await
        });
        match r {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) => match RtnlError::of(op, e) {
                e if e.errno() == Some(libc::ENODEV) => Ok(None),
                e => Err(e),
            },
        }
    }

    /// The name of the link with index `index`; `None` when there is none.
    pub fn link_name(&self, index: u32) -> Result<Option<String>, RtnlError> {
        let op = format!("ip link show index {index}");
        let r = self.rt.block_on(async {
            self.handle
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next()
                .await
        });
        match r {
            Ok(m) => Ok(m.and_then(|m| {
                m.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n),
                    _ => None,
                })
            })),
            Err(e) => match RtnlError::of(op, e) {
                e if e.errno() == Some(libc::ENODEV) => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Creates a link (`ip link add`); `what` names it in errors.
    pub fn add_link(&self, what: &str, msg: LinkMessage) -> Result<(), RtnlError> {
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(|e| RtnlError::of(format!("ip link add {what}"), e))
    }

    /// Changes a link (`ip link set`); `what` names the change in errors.
    pub fn set_link(&self, what: &str, msg: LinkMessage) -> Result<(), RtnlError> {
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(|e| RtnlError::of(format!("ip link set {what}"), e))
    }

    /// Deletes the link with index `index`.
    pub fn delete_link(&self, index: u32) -> Result<(), RtnlError> {
        self.rt
            .block_on(self.handle.link().del(index).execute())
            .map_err(|e| RtnlError::of(format!("ip link del index {index}"), e))
    }

    /// The addresses (with prefix) on link `index`.
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNet>, RtnlError> {
        let r: Result<Vec<_>, _> = self.rt.block_on(
            self.handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect(),
        );
        let msgs = r.map_err(|e| RtnlError::of(format!("ip addr show index {index}"), e))?;
        Ok(msgs
            .iter()
            // The filter is applied by the kernel only when strict checking is on.
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = ip.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                IpNet::new(ip, m.header.prefix_len).ok()
            })
            .collect())
    }

    /// Adds `addr` to link `index`; `nodad` skips IPv6 duplicate address detection.
    pub fn add_address(&self, index: u32, addr: IpNet, nodad: bool) -> Result<(), RtnlError> {
        let mut req = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        if nodad {
            req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        self.rt
            .block_on(req.execute())
            .map_err(|e| RtnlError::of(format!("ip addr add {addr} dev index {index}"), e))
    }

    /// Adds a route to `dst` out of link `index`, through `via` or on-link.
    pub fn add_route(&self, dst: IpNet, via: Option<IpAddr>, index: u32) -> Result<(), RtnlError> {
        let op = match via {
            Some(gw) => format!("ip route add {dst} via {gw} dev index {index}"),
            None => format!("ip route add {dst} dev index {index}"),
        };
        let bad = |detail: String| RtnlError::Protocol {
            op: op.clone(),
            detail,
        };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| bad(e.to_string()))?
            .output_interface(index);
        b = match via {
            Some(gw) => b.gateway(gw).map_err(|e| bad(e.to_string()))?,
            // What `ip route add DST dev IF` does for a route with no next hop.
            None => b.scope(RouteScope::Link),
        };
        self.rt
            .block_on(self.handle.route().add(b.build()).execute())
            .map_err(|e| RtnlError::of(op, e))
    }
}
