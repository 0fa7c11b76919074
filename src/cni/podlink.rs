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
//! The commands run as one `ip -batch` inside the pod netns: a short-lived thread enters the
//! namespace with setns(2) and starts `ip` from there (a child starts in its creator thread's
//! network namespace), so the plugin's other threads never leave the host netns.

use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde::Deserialize;

use super::error::{code, CniError};
use super::hostport::{self, HostPortError};
use crate::netdev::IfName;

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
    /// The netns file could not be opened or entered.
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        /// `CNI_NETNS`.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// iproute2 is missing.
    #[error(transparent)]
    NoIp(#[from] HostPortError),
    /// `ip` could not run or failed.
    #[error("`ip {args}` in {netns} failed: {stderr}")]
    Ip {
        /// Arguments (or the batch).
        args: String,
        /// Namespace.
        netns: PathBuf,
        /// What it printed.
        stderr: String,
    },
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
    /// The `ip -batch` lines that make the link as a `kind` device.
    fn batch(&self, kind: &str) -> String {
        let n = &self.ifname;
        let mut b = format!(
            "link add name {n} address {} mtu {} type {kind}\n\
             link set dev {n} arp on\n",
            self.mac, self.mtu
        );
        for a in &self.addrs {
            // No duplicate address detection: nothing answers on a dummy, and Kata must not
            // read a tentative address.
            let nodad = if a.addr().is_ipv6() { " nodad" } else { "" };
            b.push_str(&format!("address add {a} dev {n}{nodad}\n"));
        }
        b.push_str(&format!("link set dev {n} up\n"));
        for (dst, via) in &self.routes {
            // The family follows from the destination.
            match via {
                Some(gw) => b.push_str(&format!("route add {dst} via {gw} dev {n}\n")),
                None => b.push_str(&format!("route add {dst} dev {n}\n")),
            }
        }
        b
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

#[derive(Deserialize)]
struct IpAddrShow {
    #[serde(default)]
    flags: Vec<String>,
    mtu: Option<u32>,
    address: Option<String>,
    linkinfo: Option<IpLinkInfo>,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Deserialize)]
struct IpLinkInfo {
    info_kind: Option<String>,
}

#[derive(Deserialize)]
struct IpAddrInfo {
    local: Option<IpAddr>,
    prefixlen: Option<u8>,
}

/// Runs `ip ARGS` (with `stdin` fed to it) inside the network namespace at `netns`.
fn ip_in(netns: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, PodLinkError> {
    let ip = hostport::ip_command()?;
    let ns = File::open(netns).map_err(|source| PodLinkError::Netns {
        path: netns.into(),
        source,
    })?;
    let fail = |stderr: String| PodLinkError::Ip {
        args: match stdin {
            Some(b) => format!("-batch - <<< {:?}", b.trim_end()),
            None => args.join(" "),
        },
        netns: netns.into(),
        stderr,
    };
    let run = || -> Result<std::process::Output, PodLinkError> {
        // SAFETY: setns(2) on an open namespace file descriptor only changes this thread's
        // network namespace; the thread is ours and ends right after the command.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
            return Err(PodLinkError::Netns {
                path: netns.into(),
                source: io::Error::last_os_error(),
            });
        }
        let mut child = Command::new(&ip)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(e.to_string()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|e| fail(e.to_string()))?;
        }
        child.wait_with_output().map_err(|e| fail(e.to_string()))
    };
    let out = std::thread::scope(|s| {
        s.spawn(run)
            .join()
            .unwrap_or_else(|_| Err(fail("the namespace thread panicked".into())))
    })?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Facts about `ifname` in `netns`; `None` when it does not exist.
pub fn inspect(netns: &Path, ifname: &str) -> Result<Option<PodLinkInfo>, PodLinkError> {
    IfName::new(ifname)?;
    let out = match ip_in(netns, &["-j", "-d", "address", "show", "dev", ifname], None) {
        Ok(o) => o,
        Err(PodLinkError::Ip { stderr, .. }) if stderr.contains("does not exist") => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let links: Vec<IpAddrShow> = serde_json::from_str(&out).map_err(|e| PodLinkError::Ip {
        args: format!("-j -d address show dev {ifname}"),
        netns: netns.into(),
        stderr: format!("unreadable JSON: {e}"),
    })?;
    Ok(links.into_iter().next().map(|l| PodLinkInfo {
        kind: l.linkinfo.and_then(|i| i.info_kind),
        noarp: l.flags.iter().any(|f| f == "NOARP"),
        mac: l.address,
        mtu: l.mtu.unwrap_or(0),
        addrs: l
            .addr_info
            .iter()
            .filter_map(|a| IpNet::new(a.local?, a.prefixlen?).ok())
            .collect(),
    }))
}

/// Creates the link `spec` describes in `netns`, with its addresses and routes, and returns
/// its kind (see [`LINK_KINDS`]). A link of that name already there is refused (it is someone
/// else's: ours are removed on failure).
pub fn create(netns: &Path, spec: &PodLinkSpec) -> Result<&'static str, PodLinkError> {
    IfName::new(&spec.ifname)?;
    if inspect(netns, &spec.ifname)?.is_some() {
        return Err(PodLinkError::Exists {
            netns: netns.into(),
            ifname: spec.ifname.clone(),
        });
    }
    let mut last = None;
    for kind in LINK_KINDS {
        match ip_in(netns, &["-batch", "-"], Some(&spec.batch(kind))) {
            Ok(_) => return Ok(kind),
            Err(e) => {
                let _ = delete(netns, &spec.ifname);
                let missing_driver = matches!(&e,
                    PodLinkError::Ip { stderr, .. } if stderr.contains("Unknown device type"));
                if !missing_driver {
                    return Err(e);
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(PodLinkError::Exists {
        netns: netns.into(),
        ifname: spec.ifname.clone(),
    }))
}

/// Deletes `ifname` from `netns`; a namespace or link already gone is fine.
pub fn delete(netns: &Path, ifname: &str) -> Result<(), PodLinkError> {
    IfName::new(ifname)?;
    if !netns.exists() {
        return Ok(());
    }
    match ip_in(netns, &["link", "del", "dev", ifname], None) {
        Err(PodLinkError::Ip { stderr, .. })
            if stderr.contains("Cannot find device") || stderr.contains("does not exist") =>
        {
            Ok(())
        }
        Err(PodLinkError::Netns { source, .. })
            if source.raw_os_error() == Some(libc::ENOENT)
                || source.raw_os_error() == Some(libc::EINVAL) =>
        {
            // The pod's namespace is gone (or the path no longer is a namespace): so is the link.
            Ok(())
        }
        r => r.map(drop),
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

    #[test]
    fn batch_makes_a_dummy_with_addresses_and_routes() {
        let spec = PodLinkSpec {
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:05".into(),
            mtu: 1450,
            addrs: vec![
                "10.1.0.5/24".parse().unwrap(),
                "fd00::5/64".parse().unwrap(),
            ],
            routes: vec![
                (
                    "0.0.0.0/0".parse().unwrap(),
                    Some("10.1.0.1".parse().unwrap()),
                ),
                ("fd01::/64".parse().unwrap(), None),
            ],
        };
        assert_eq!(
            spec.batch("dummy"),
            "link add name eth0 address 02:00:00:00:00:05 mtu 1450 type dummy\n\
             link set dev eth0 arp on\n\
             address add 10.1.0.5/24 dev eth0\n\
             address add fd00::5/64 dev eth0 nodad\n\
             link set dev eth0 up\n\
             route add 0.0.0.0/0 via 10.1.0.1 dev eth0\n\
             route add fd01::/64 dev eth0\n"
        );
    }
}
