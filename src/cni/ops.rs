//! The commands: ADD, DEL, CHECK, STATUS and GC. ADD records each thing in the attachment's
//! state before making it, so one teardown serves a failed ADD, DEL and GC alike.
//!
//! What ADD makes depends on `"kata"` (see [`KataRuntime`]): always addresses, a host port and
//! a backend (a sidecar, or a port on the node daemon); for runtime-go also the pod-netns link
//! and the socket where Kata looks for it; for runtime-rs the DAN entry.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;
use vhost_net_backend::MacAddr;

use super::config::{HostPortConf, KataRuntime, NetConf, VhostUserMode};
use super::dan::{self, DanDevice};
use super::env::{AttachmentId, CniEnv};
use super::error::{code, io_error, CniError};
use super::hostport;
use super::ipam::{delegate_config, Delegate};
use super::lock::{FileLock, LockError};
use super::nodedaemon;
use super::podlink::{self, PodLinkSpec};
use super::result::{CniResult, Interface};
use super::sidecar::{self, SidecarSpec, SidecarStatus};
use super::sockstate;
use super::state::{
    attachment_key, macvlan_name, tap_name, AttachmentPaths, AttachmentState, Layout,
    NodePortState, PodLinkState, PortState,
};
use super::version::CniVersion;
use crate::config::{HostSpec, PortSpec};

/// How long a command waits for another one on the same attachment.
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

fn lock_error(e: LockError) -> CniError {
    match e {
        LockError::Busy(_) => CniError::new(code::TRY_AGAIN, e.to_string()),
        LockError::Io { .. } => CniError::new(code::IO, e.to_string()),
    }
}

fn lock(paths: &AttachmentPaths) -> Result<FileLock, CniError> {
    FileLock::acquire(&paths.lock, LOCK_TIMEOUT).map_err(lock_error)
}

/// The guest MAC: `runtimeConfig.mac`, else `MAC` in `CNI_ARGS`, else a stable locally
/// administered address derived from container id and interface name.
fn choose_mac(conf: &NetConf, env: &CniEnv, id: &AttachmentId) -> Result<MacAddr, CniError> {
    if let Some(m) = conf.runtime_mac {
        return Ok(m);
    }
    if let Some(m) = env.arg("MAC") {
        return m.parse().map_err(|e| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS MAC={m:?} is not a unicast MAC address: {e}"),
            )
        });
    }
    Ok(MacAddr::local_from_seed(
        format!("{}/{}", id.container_id, id.ifname).as_bytes(),
    ))
}

/// ADD: IPAM, host port, sidecar, DAN entry; everything undone on any failure.
pub fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let id = env.attachment()?;
    let cni_path = env.cni_path()?;
    let daemon = match conf.daemon {
        None => Some(sidecar::find_daemon(
            conf.vhost_pump_path.as_deref(),
            &cni_path,
        )?),
        Some(_) => None,
    };
    let ipam = conf
        .ipam
        .as_ref()
        .map(|i| Delegate::find(&i.plugin, &cni_path))
        .transpose()?;
    let mac = choose_mac(conf, env, &id)?;
    let layout = Layout::new(&conf.socket_dir);
    layout.create()?;
    let key = attachment_key(&id);
    let mut paths = layout.paths(&key);
    let guard = lock(&paths)?;
    if let Some(st) = AttachmentState::load(&paths.state)? {
        return Err(CniError::new(
            code::ALREADY_EXISTS,
            format!(
                "container {} already has interface {} in network {} (socket {}); DEL it first",
                st.container_id,
                st.ifname,
                st.network,
                st.socket_path.display()
            ),
        ));
    }
    let mut st = AttachmentState {
        network: conf.name.clone(),
        container_id: id.container_id.clone(),
        ifname: id.ifname.clone(),
        netns: env.netns.clone(),
        key,
        socket_path: paths.socket.clone(),
        mode: conf.mode,
        mac: mac.to_string(),
        mtu: None,
        queues: conf.queues,
        queue_size: conf.queue_size,
        ipam_config: None,
        port: None,
        dan_file: None,
        kata: conf.kata,
        pod_link: None,
        node_port: None,
        result: None,
    };
    st.save(&paths.state)?;
    let mut supervisor = None;
    let added = add_steps(
        env,
        conf,
        &mut paths,
        daemon.as_deref(),
        ipam.as_ref(),
        &mut st,
        &mut supervisor,
    );
    match added {
        Ok(v) => {
            drop(guard);
            Ok(v)
        }
        Err(e) => {
            tracing::warn!(error = %e, "ADD failed; rolling back");
            let paths = st.paths(&layout);
            for t in teardown(&paths, Some(&st), conf, &cni_path, supervisor.as_mut(), &[]) {
                tracing::warn!(error = %t, "rollback step failed");
            }
            guard.remove();
            Err(e)
        }
    }
}

fn add_steps(
    env: &CniEnv,
    conf: &NetConf,
    paths: &mut AttachmentPaths,
    daemon: Option<&Path>,
    ipam: Option<&Delegate>,
    st: &mut AttachmentState,
    supervisor: &mut Option<Child>,
) -> Result<Value, CniError> {
    // 1. Addresses.
    let ipam_result = match ipam {
        Some(d) => {
            let cfg = delegate_config(&conf.raw, conf.version);
            st.ipam_config = Some(cfg.clone());
            st.save(&paths.state)?;
            d.add(&cfg)?
        }
        None => CniResult::default(),
    };

    // 2. Host port.
    let (port, mtu) = match &conf.host_port {
        HostPortConf::Tap { bridge, is_gateway } => {
            hostport::ensure_bridge(bridge, conf.mtu)?;
            let mtu = match conf.mtu {
                Some(m) => m,
                None => hostport::mtu(bridge)?,
            };
            let port = PortState::Tap {
                name: tap_name(&st.key),
                bridge: bridge.clone(),
                multi_queue: conf.queues > 1,
            };
            st.port = Some(port.clone());
            st.mtu = Some(mtu);
            st.save(&paths.state)?;
            hostport::create_tap(port.name(), conf.queues > 1, mtu, bridge)?;
            if *is_gateway {
                for ip in &ipam_result.ips {
                    if let Some(gw) = ip.gateway {
                        let net = IpNet::new(gw, ip.address.prefix_len()).map_err(|e| {
                            CniError::new(code::IPAM, format!("bad gateway {gw}: {e}"))
                        })?;
                        hostport::add_gateway(bridge, net)?;
                    }
                }
            }
            (port, mtu)
        }
        HostPortConf::AfPacket { master, macvlan } => {
            let mtu = match conf.mtu {
                Some(m) => m,
                None => hostport::mtu(master)?,
            };
            let port = match macvlan {
                Some(mode) => PortState::Macvlan {
                    name: macvlan_name(&st.key),
                    master: master.clone(),
                    mode: *mode,
                },
                None => PortState::Existing {
                    name: master.clone(),
                },
            };
            st.port = Some(port.clone());
            st.mtu = Some(mtu);
            st.save(&paths.state)?;
            match &port {
                PortState::Macvlan { name, mode, .. } => {
                    hostport::create_macvlan(name, master, *mode, &st.mac, mtu)?
                }
                _ => {
                    if !hostport::exists(master) {
                        return Err(hostport::HostPortError::Missing(master.clone()).into());
                    }
                }
            }
            (port, mtu)
        }
        HostPortConf::Switch {
            switch, uplink_tap, ..
        } => {
            let port = PortState::Switch {
                switch: switch.clone(),
            };
            let mtu = conf.mtu.unwrap_or(1500);
            st.port = Some(port.clone());
            st.mtu = Some(mtu);
            st.save(&paths.state)?;
            if let Some(node) = &conf.daemon {
                nodedaemon::ensure_switch(
                    &node.control,
                    switch,
                    uplink_tap.as_deref(),
                    conf.ready_timeout,
                )?;
            }
            // The uplink tap is the pods' way to the node: it carries their gateway.
            if let Some(tap) = uplink_tap {
                hostport::set_up(tap)?;
                for ip in &ipam_result.ips {
                    if let Some(gw) = ip.gateway {
                        let net = IpNet::new(gw, ip.address.prefix_len()).map_err(|e| {
                            CniError::new(code::IPAM, format!("bad gateway {gw}: {e}"))
                        })?;
                        hostport::add_gateway(tap, net)?;
                    }
                }
            }
            (port, mtu)
        }
    };

    // 3. Kata runtime-go: the socket goes where Kata looks for it, and the pod netns gets the
    //    link Kata turns into the guest's interface.
    if conf.kata == KataRuntime::Go {
        let ip = ipam_result
            .ips
            .first()
            .map(|i| i.address.addr())
            .ok_or_else(|| {
                CniError::new(
                    code::IPAM,
                    "the IPAM plugin returned no address; kata \"go\" needs one (Kata finds the \
                 socket as /tmp/vhostuser_<address>/vhu.sock)",
                )
            })?;
        let socket = podlink::kata_socket_path(ip);
        let netns = PathBuf::from(env.netns.clone().unwrap_or_default());
        // Refuse what is someone else's before recording it as ours (a teardown removes what
        // the state names).
        refuse_if_served(&socket)?;
        if podlink::inspect(&netns, &st.ifname)?.is_some() {
            return Err(podlink::PodLinkError::Exists {
                netns,
                ifname: st.ifname.clone(),
            }
            .into());
        }
        paths.socket_dir = socket.parent().map(Path::to_path_buf).unwrap_or_default();
        paths.socket = socket.clone();
        st.socket_path = socket;
        st.pod_link = Some(PodLinkState {
            netns: netns.clone(),
            ifname: st.ifname.clone(),
            kind: podlink::LINK_KINDS[0].into(),
        });
        st.save(&paths.state)?;
        let spec = PodLinkSpec {
            ifname: st.ifname.clone(),
            mac: st.mac.clone(),
            mtu,
            addrs: ipam_result.ips.iter().map(|i| i.address).collect(),
            routes: ipam_result
                .routes
                .iter()
                .map(|r| {
                    (
                        r.dst,
                        r.gw.or_else(|| ipam_result.gateway_for(&r.dst.addr())),
                    )
                })
                .collect(),
        };
        let kind = podlink::create(&netns, &spec)?;
        if let Some(l) = st.pod_link.as_mut() {
            l.kind = kind.into();
        }
        st.save(&paths.state)?;
    }

    // 4. The socket's directory.
    make_socket_dir(conf, paths)?;

    // 5. The backend: a sidecar, or a port on the node daemon.
    let af_packet = matches!(port, PortState::Macvlan { .. } | PortState::Existing { .. });
    match (&conf.daemon, daemon) {
        (Some(node), _) => {
            let name = nodedaemon::port_name(&st.key);
            st.node_port = Some(NodePortState {
                control: node.control.clone(),
                name: name.clone(),
                started_ns: None,
            });
            st.save(&paths.state)?;
            let spec = PortSpec {
                name,
                socket: paths.socket.clone(),
                host: match &port {
                    PortState::Tap { name, .. } => HostSpec::Tap(name.clone()),
                    PortState::Switch { switch } => HostSpec::Switch(switch.clone()),
                    PortState::Macvlan { name, .. } | PortState::Existing { name } => {
                        HostSpec::AfPacket(name.clone())
                    }
                },
                queues: conf.queues,
                queue_size: conf.queue_size,
                mac: st.mac.parse().ok(),
                mtu: Some(mtu),
                mac_filter: af_packet,
                port_security: conf.port_security,
                // Kata does not migrate its VMs.
                live_migration: false,
                client: conf.mode == VhostUserMode::Client,
                busy_poll_us: conf.busy_poll_us.unwrap_or(10),
                tap_tx: Default::default(),
                socket_owner: conf.perms.uid.map(|u| u.to_string()),
                socket_group: conf.perms.gid.map(|g| g.to_string()),
                socket_mode: Some(format!("{:04o}", conf.perms.mode)),
                vlan: match &conf.host_port {
                    HostPortConf::Switch { vlan, .. } => *vlan,
                    _ => None,
                },
                trunk: Vec::new(),
            };
            let port_name = spec.name.clone();
            nodedaemon::add(&node.control, spec, conf.ready_timeout)?;
            let started = nodedaemon::stats(&node.control, &port_name, conf.ready_timeout)?
                .map(|s| s.started_ns);
            if let Some(n) = st.node_port.as_mut() {
                n.started_ns = started;
            }
            st.save(&paths.state)?;
        }
        (None, Some(daemon)) => start_sidecar(conf, paths, daemon, st, &port, mtu, supervisor)?,
        (None, None) => {
            return Err(CniError::new(
                code::SIDECAR,
                "no vhost-pump binary and no node daemon configured",
            ))
        }
    }

    // 6. Kata runtime-rs: the DAN entry.
    if conf.kata == KataRuntime::Rs {
        let dev = DanDevice::vhost_user(
            &st.ifname,
            &st.mac,
            &paths.socket,
            conf.queues,
            conf.queue_size,
            mtu,
            &ipam_result,
        );
        st.dan_file = Some(dan::dan_path(&conf.dan_conf_dir, &st.container_id));
        st.save(&paths.state)?;
        dan::upsert(&conf.dan_conf_dir, &st.container_id, &dev)?;
    }

    // 7. The result.
    let result = build_result(conf, env, st, &port, mtu, ipam_result)?;
    st.result = Some(result.clone());
    st.save(&paths.state)?;
    Ok(result.render(conf.version))
}

/// Starts the supervised vhost-pump of the attachment and waits until it serves.
fn start_sidecar(
    conf: &NetConf,
    paths: &AttachmentPaths,
    daemon: &Path,
    st: &AttachmentState,
    port: &PortState,
    mtu: u16,
    supervisor: &mut Option<Child>,
) -> Result<(), CniError> {
    let mut args = vec![
        "--socket".to_string(),
        paths.socket.to_string_lossy().into_owned(),
    ];
    match port {
        PortState::Tap { name, .. } => args.extend(["--tap".into(), name.clone()]),
        // The plugin knows the guest MAC: drop other hosts' unicast in the kernel.
        PortState::Macvlan { name, .. } | PortState::Existing { name } => {
            args.extend(["--af-packet".into(), name.clone(), "--mac-filter".into()])
        }
        // Refused at configuration time: a switch lives in the node daemon.
        PortState::Switch { .. } => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "a switch port needs the node daemon",
            ))
        }
    }
    args.extend([
        "--queues".into(),
        conf.queues.to_string(),
        "--queue-size".into(),
        conf.queue_size.to_string(),
        "--mac".into(),
        st.mac.clone(),
        "--mtu".into(),
        mtu.to_string(),
        "--log-level".into(),
        conf.log_level.clone(),
    ]);
    match conf.mode {
        VhostUserMode::Client => args.push("--client".into()),
        // vhost-pump applies these itself each time it creates the socket.
        VhostUserMode::Server => {
            if let Some(uid) = conf.perms.uid {
                args.extend(["--socket-owner".into(), uid.to_string()]);
            }
            if let Some(gid) = conf.perms.gid {
                args.extend(["--socket-group".into(), gid.to_string()]);
            }
            args.extend(["--socket-mode".into(), format!("{:04o}", conf.perms.mode)]);
        }
    }
    if let Some(us) = conf.busy_poll_us {
        args.extend(["--busy-poll-us".into(), us.to_string()]);
    }
    if conf.port_security {
        // The guest may only send as itself.
        args.push("--port-security".into());
    }
    let spec = SidecarSpec {
        daemon: daemon.to_path_buf(),
        args,
        pid_file: paths.pid.clone(),
        socket: paths.socket.clone(),
        mode: conf.mode,
        perms: conf.perms,
        // QEMU under Kata runtime-go connects once, without reconnect.
        frontend_reconnects: conf.kata != KataRuntime::Go,
        status_file: Some(paths.status.clone()),
    };
    let child = supervisor.insert(sidecar::launch(&spec, paths)?);
    sidecar::wait_ready(child, &spec, paths, conf.ready_timeout)?;
    if conf.mode == VhostUserMode::Server {
        sidecar::apply_perms(&paths.socket, &conf.perms, conf.perms.mode).map_err(|e| {
            CniError::new(
                code::SIDECAR,
                format!("cannot set owner/mode of {}: {e}", paths.socket.display()),
            )
        })?;
    }
    Ok(())
}

/// Refuses `socket` when a backend serves it: connecting works (a listener in any network
/// namespace), or this namespace's socket table shows a listener (one that stopped accepting).
fn refuse_if_served(socket: &Path) -> Result<(), CniError> {
    let served =
        std::os::unix::net::UnixStream::connect(socket).is_ok() || sockstate::of(socket).listening;
    if !served {
        return Ok(());
    }
    Err(CniError::new(
        code::ALREADY_EXISTS,
        format!(
            "{} is already served by another backend (an attachment of another network with \
             the same address?)",
            socket.display()
        ),
    ))
}

/// Makes the directory that holds only the socket. Server mode: readable by the VMM's user
/// (0755 under `socketDir`; 0700 under /tmp for Kata runtime-go, opened to `socketOwner` and
/// `socketGroup` when given). Client mode: also writable by it, so the VMM can create its
/// socket there.
fn make_socket_dir(conf: &NetConf, paths: &AttachmentPaths) -> Result<(), CniError> {
    let dir = &paths.socket_dir;
    let (mode, perms) = match (conf.mode, conf.kata) {
        (VhostUserMode::Server, KataRuntime::Go) => {
            let mut mode = 0o700;
            if conf.perms.gid.is_some() && conf.perms.mode & 0o060 != 0 {
                mode |= 0o010;
            }
            (mode, Some(conf.perms))
        }
        (VhostUserMode::Server, _) => (0o755, None),
        (VhostUserMode::Client, _) => (sidecar::client_dir_mode(conf.perms.mode), Some(conf.perms)),
    };
    // Whatever is at the path already: a live socket is another backend's (refused); anything
    // else is a leftover (a crash, or a squatter in a world-writable /tmp) and goes. A symlink
    // is removed, never followed.
    if let Ok(md) = fs::symlink_metadata(dir) {
        let sock = dir.join(paths.socket.file_name().unwrap_or_default());
        if md.is_dir() {
            refuse_if_served(&sock)?;
        }
        let r = if md.is_dir() {
            fs::remove_dir_all(dir)
        } else {
            fs::remove_file(dir)
        };
        r.map_err(|e| io_error("cannot clear", dir, e))?;
    }
    // Not recursive: creating the last component ourselves is what makes it ours.
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|e| io_error("cannot create", parent, e))?;
    }
    fs::DirBuilder::new()
        .mode(mode)
        .create(dir)
        .map_err(|e| io_error("cannot create", dir, e))?;
    sidecar::apply_perms(dir, &perms.unwrap_or_default(), mode)
        .map_err(|e| io_error("cannot set owner/mode of", dir, e))
}

fn build_result(
    conf: &NetConf,
    env: &CniEnv,
    st: &AttachmentState,
    port: &PortState,
    mtu: u16,
    ipam: CniResult,
) -> Result<CniResult, CniError> {
    // A plugin before us in the list: keep its result and add ours.
    let mut r = match &conf.prev_result {
        Some(p) => CniResult::parse(p).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("prevResult is not a CNI result: {e}"),
            )
        })?,
        None => CniResult::default(),
    };
    let host_iface = |name: &str| -> Result<Interface, CniError> {
        let info = hostport::link(name)?.unwrap_or_default();
        Ok(Interface {
            name: name.to_string(),
            mac: info.mac,
            ..Default::default()
        })
    };
    if let PortState::Tap { bridge, .. } = port {
        r.interfaces.push(host_iface(bridge)?);
    }
    r.interfaces.push(host_iface(port.name())?);
    let guest = r.interfaces.len();
    r.interfaces.push(Interface {
        name: st.ifname.clone(),
        mac: Some(st.mac.clone()),
        mtu: Some(u32::from(mtu)),
        sandbox: env.netns.clone(),
        socket_path: Some(st.socket_path.to_string_lossy().into_owned()),
    });
    r.ips.extend(ipam.ips.into_iter().map(|mut ip| {
        ip.interface = Some(guest);
        ip
    }));
    r.routes.extend(ipam.routes);
    if ipam.dns != Default::default() {
        r.dns = ipam.dns;
    } else if r.dns == Default::default() {
        if let Some(d) = conf.raw.get("dns") {
            r.dns = serde_json::from_value(d.clone()).unwrap_or_default();
        }
    }
    Ok(r)
}

/// Undoes an attachment as far as it exists: backend, socket directory, pod link, DAN entry,
/// host port, IPAM allocation and state files. Best effort: every step runs; the failures are
/// returned. Without `st` (no state left), names derived from the key and the given `conf` are
/// used. The socket directory goes before the address is released: once released, the address
/// (and so a Kata runtime-go socket path) may belong to the next pod.
fn teardown(
    paths: &AttachmentPaths,
    st: Option<&AttachmentState>,
    conf: &NetConf,
    cni_path: &[PathBuf],
    own_child: Option<&mut Child>,
    ipam_env: &[(&str, Option<&str>)],
) -> Vec<CniError> {
    let mut errs = Vec::new();
    let node_port = match st {
        Some(s) => s.node_port.clone(),
        None => conf.daemon.as_ref().map(|d| NodePortState {
            control: d.control.clone(),
            name: nodedaemon::port_name(&paths.key),
            started_ns: None,
        }),
    };
    match node_port {
        Some(n) => {
            if let Err(e) = nodedaemon::remove(&n.control, &n.name, conf.ready_timeout) {
                errs.push(e.into());
            }
        }
        None => sidecar::stop(paths, &paths.socket, own_child),
    }

    if let Err(e) = fs::remove_dir_all(&paths.socket_dir) {
        if e.kind() != io::ErrorKind::NotFound {
            errs.push(io_error("cannot remove", &paths.socket_dir, e));
        }
    }

    if let Some(l) = st.and_then(|s| s.pod_link.as_ref()) {
        if let Err(e) = podlink::delete(&l.netns, &l.ifname) {
            errs.push(e.into());
        }
    }

    let dan_dir = match st {
        Some(s) => s.dan_file.as_deref().and_then(Path::parent),
        None => (conf.kata == KataRuntime::Rs).then_some(conf.dan_conf_dir.as_path()),
    };
    if let Some(dir) = dan_dir {
        if let Some(id) = st
            .map(AttachmentState::id)
            .or_else(|| ids_from_env(ipam_env))
        {
            if let Err(e) = dan::remove(dir, &id.container_id, &id.ifname) {
                errs.push(CniError::from(e));
            }
        }
    }

    let links: Vec<String> = match st {
        Some(s) => match &s.port {
            Some(PortState::Tap { name, .. }) | Some(PortState::Macvlan { name, .. }) => {
                vec![name.clone()]
            }
            _ => Vec::new(),
        },
        // Our names: whatever carries them is ours.
        None => vec![tap_name(&paths.key), macvlan_name(&paths.key)],
    };
    for l in links {
        if let Err(e) = hostport::delete(&l) {
            errs.push(e.into());
        }
    }

    let ipam_cfg = match st {
        Some(s) => s.ipam_config.clone(),
        None => conf
            .ipam
            .as_ref()
            .map(|_| delegate_config(&conf.raw, conf.version)),
    };
    if let Some(cfg) = ipam_cfg {
        let plugin = cfg
            .get("ipam")
            .and_then(|i| i.get("type"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match Delegate::find(&plugin, cni_path) {
            Ok(d) => {
                if let Err(e) = d.del(&cfg, ipam_env) {
                    errs.push(e.into());
                }
            }
            Err(e) => errs.push(e.into()),
        }
    }

    for f in [&paths.sidecar_spec, &paths.status, &paths.log, &paths.state] {
        if let Err(e) = fs::remove_file(f) {
            if e.kind() != io::ErrorKind::NotFound {
                errs.push(io_error("cannot remove", f, e));
            }
        }
    }
    errs
}

fn ids_from_env(env: &[(&str, Option<&str>)]) -> Option<AttachmentId> {
    let get = |k: &str| env.iter().find(|(n, _)| *n == k).and_then(|(_, v)| *v);
    Some(AttachmentId {
        container_id: get("CNI_CONTAINERID")?.to_string(),
        ifname: get("CNI_IFNAME")?.to_string(),
    })
}

/// DEL: idempotent, best effort; works without state, netns or a completed ADD.
pub fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let id = env.attachment()?;
    let cni_path = if conf.ipam.is_some() {
        env.cni_path()?
    } else {
        Vec::new()
    };
    let layout = Layout::new(&conf.socket_dir);
    layout.create()?;
    let key_paths = layout.paths(&attachment_key(&id));
    let guard = lock(&key_paths)?;
    let st = AttachmentState::load(&key_paths.state).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "ignoring unreadable state");
        None
    });
    let paths = st.as_ref().map_or(key_paths, |s| s.paths(&layout));
    let ids = [
        ("CNI_CONTAINERID", Some(id.container_id.as_str())),
        ("CNI_IFNAME", Some(id.ifname.as_str())),
    ];
    let errs = teardown(&paths, st.as_ref(), conf, &cni_path, None, &ids);
    guard.remove();
    match errs.into_iter().next() {
        Some(e) => Err(e.context("DEL incomplete (retry DEL)")),
        None => Ok(()),
    }
}

/// CHECK: sidecar alive, socket present, port present, DAN entry and prevResult matching,
/// IPAM CHECK.
pub fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    if conf.version < CniVersion::V0_4_0 {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, not {}",
                conf.version
            ),
        ));
    }
    let id = env.attachment()?;
    let cni_path = env.cni_path()?;
    let layout = Layout::new(&conf.socket_dir);
    let paths = layout.paths(&attachment_key(&id));
    let unknown = || {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "network {} has no attachment of container {} interface {}",
                conf.name, id.container_id, id.ifname
            ),
        )
    };
    if !paths.state.exists() {
        return Err(unknown());
    }
    let _guard = lock(&paths)?;
    let st = AttachmentState::load(&paths.state)?
        .filter(|s| s.network == conf.name)
        .ok_or_else(unknown)?;
    let Some(result) = &st.result else {
        return Err(CniError::new(
            code::CHECK_FAILED,
            "the ADD of this attachment did not complete",
        ));
    };
    let paths = st.paths(&layout);
    let mut problems = Vec::new();

    // The backend: alive, serving the socket at the exact path, and (Kata runtime-go) not
    // restarted under a QEMU that cannot reconnect.
    let sock = sockstate::of(&st.socket_path);
    let no_reconnect = |restarts: String| {
        format!(
            "vhost-pump restarted ({restarts}) and nothing is connected to {}: QEMU under Kata \
             runtime-go does not reconnect, so the pod has no network until it is recreated",
            st.socket_path.display()
        )
    };
    match &st.node_port {
        Some(n) => match nodedaemon::stats(&n.control, &n.name, conf.ready_timeout) {
            Err(e) => problems.push(e.to_string()),
            Ok(None) => problems.push(format!(
                "the node daemon at {} has no port {} (was it restarted since ADD?{})",
                n.control.display(),
                n.name,
                if st.kata == KataRuntime::Go {
                    " QEMU under Kata runtime-go does not reconnect: recreate the pod"
                } else {
                    ""
                }
            )),
            Ok(Some(s)) => {
                let recreated = n.started_ns.is_some_and(|t| t != s.started_ns);
                if st.kata == KataRuntime::Go && recreated && !s.connected {
                    problems.push(no_reconnect(format!(
                        "the node daemon re-created port {}",
                        n.name
                    )));
                }
            }
        },
        None => {
            let live = sidecar::liveness(&paths, &st.socket_path);
            if live.supervisor.is_none() {
                problems.push("the sidecar supervisor is not running".to_string());
            }
            if live.daemon.is_none() {
                problems.push(format!(
                    "vhost-pump is not running (log {}: {})",
                    paths.log.display(),
                    sidecar::log_tail(&paths.log, 3).replace('\n', " | ")
                ));
            }
            let status = SidecarStatus::load(&paths.status);
            if st.kata == KataRuntime::Go && status.restarts > 0 && sock.connections == 0 {
                problems.push(no_reconnect(format!(
                    "{} time(s) since ADD, last exit: {}",
                    status.restarts,
                    status.last_exit.as_deref().unwrap_or("unknown")
                )));
            }
        }
    }
    if st.mode == VhostUserMode::Server {
        let is_socket =
            fs::symlink_metadata(&st.socket_path).is_ok_and(|m| m.file_type().is_socket());
        if !is_socket {
            problems.push(format!("socket {} is missing", st.socket_path.display()));
        } else if !sock.listening {
            problems.push(format!(
                "nothing listens on socket {}",
                st.socket_path.display()
            ));
        }
    }
    match &st.port {
        Some(PortState::Tap { name, bridge, .. }) => match hostport::link(name)? {
            None => problems.push(format!("tap {name} is missing")),
            Some(l) if l.master.as_deref() != Some(bridge.as_str()) => problems.push(format!(
                "tap {name} is not enslaved to bridge {bridge} (master: {:?})",
                l.master
            )),
            Some(_) => {}
        },
        Some(PortState::Macvlan { name, .. }) | Some(PortState::Existing { name }) => {
            if !hostport::exists(name) {
                problems.push(format!("interface {name} is missing"));
            }
        }
        // The node daemon's port (checked below) is the whole attachment.
        Some(PortState::Switch { .. }) => {}
        None => problems.push("no host port recorded".into()),
    }
    // What Kata runtime-go's netns scan finds: the link, its MAC, addresses and MTU.
    if let Some(l) = &st.pod_link {
        match podlink::inspect(&l.netns, &l.ifname) {
            Err(e) => problems.push(e.to_string()),
            Ok(None) => problems.push(format!(
                "interface {} is missing from the pod network namespace {}",
                l.ifname,
                l.netns.display()
            )),
            Ok(Some(info)) => {
                if info.kind.as_deref() != Some(l.kind.as_str()) {
                    problems.push(format!(
                        "interface {} in the pod netns is a {:?} link, not the {} this plugin made",
                        l.ifname, info.kind, l.kind
                    ));
                }
                if info.noarp {
                    problems.push(format!(
                        "interface {} has ARP off, which Kata would copy to the guest",
                        l.ifname
                    ));
                }
                if info.mac.as_deref() != Some(st.mac.as_str()) {
                    problems.push(format!(
                        "interface {} has MAC {:?}, not the guest's {}",
                        l.ifname, info.mac, st.mac
                    ));
                }
                if Some(info.mtu) != st.mtu.map(u32::from) {
                    problems.push(format!(
                        "interface {} has MTU {}, not {:?}",
                        l.ifname, info.mtu, st.mtu
                    ));
                }
                for ip in &result.ips {
                    if !info.addrs.contains(&ip.address) {
                        problems.push(format!(
                            "interface {} lacks address {} (Kata would not find the socket)",
                            l.ifname, ip.address
                        ));
                    }
                }
            }
        }
    }
    if st.kata == KataRuntime::Rs {
        let dan_dir = st
            .dan_file
            .as_deref()
            .and_then(Path::parent)
            .unwrap_or(&conf.dan_conf_dir);
        match dan::find(dan_dir, &st.container_id, &st.ifname)? {
            None => problems.push(format!(
                "no entry for {} in {}",
                st.ifname,
                dan::dan_path(dan_dir, &st.container_id).display()
            )),
            Some(d) => {
                let socket_ok = matches!(&d.device,
                    dan::DanDeviceKind::VhostUser { path, .. } if Path::new(path) == st.socket_path);
                if !socket_ok
                    || d.guest_mac != st.mac
                    || Some(d.network_info.interface.mtu) != st.mtu.map(u64::from)
                {
                    problems.push(format!(
                        "the DAN entry of {} does not match the attachment",
                        st.ifname
                    ));
                }
            }
        }
    }
    if let Some(prev) = &conf.prev_result {
        match CniResult::parse(prev) {
            Err(e) => problems.push(format!("prevResult is unreadable: {e}")),
            Ok(p) => {
                let ours = result.interfaces.iter().find(|i| i.name == st.ifname);
                let theirs = p.interfaces.iter().find(|i| i.name == st.ifname);
                match (ours, theirs) {
                    (Some(o), Some(t)) => {
                        if t.mac.is_some() && t.mac != o.mac {
                            problems.push(format!("prevResult MAC {:?} is not {:?}", t.mac, o.mac));
                        }
                        if t.socket_path.is_some() && t.socket_path != o.socket_path {
                            problems.push("prevResult socketPath differs".into());
                        }
                    }
                    _ => problems.push(format!("prevResult has no interface {}", st.ifname)),
                }
                let addrs = |r: &CniResult| {
                    let mut v: Vec<IpNet> = r.ips.iter().map(|i| i.address).collect();
                    v.sort();
                    v
                };
                if addrs(&p) != addrs(result) {
                    problems.push("prevResult addresses differ from the attachment's".into());
                }
            }
        }
    }
    if let Some(cfg) = &st.ipam_config {
        let mut cfg = cfg.clone();
        if let Some(prev) = &conf.prev_result {
            cfg["prevResult"] = prev.clone();
        }
        let plugin = cfg["ipam"]["type"].as_str().unwrap_or_default().to_string();
        if let Err(e) = Delegate::find(&plugin, &cni_path).and_then(|d| d.check(&cfg)) {
            problems.push(e.to_string());
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::CHECK_FAILED,
            format!(
                "attachment of container {} interface {} is unhealthy: {}",
                st.container_id,
                st.ifname,
                problems.join("; ")
            ),
        ))
    }
}

/// Whether `dir` can hold our files (created if missing).
fn probe_dir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let probe = dir.join(format!(".vhost-pump-cni-probe.{}", std::process::id()));
    fs::write(&probe, b"").map_err(|e| format!("{} is not writable: {e}", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// STATUS: code 50 when ADD cannot work here; forwarded to an IPAM plugin that speaks 1.1.0.
pub fn status(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let cni_path = env.cni_path()?;
    let mut problems = Vec::new();
    match &conf.daemon {
        None => {
            if let Err(e) = sidecar::find_daemon(conf.vhost_pump_path.as_deref(), &cni_path) {
                problems.push(e.to_string());
            }
        }
        Some(node) => {
            if let Err(e) = crate::control::request_within(
                &node.control,
                &crate::control::Request::List,
                Some(conf.ready_timeout),
            ) {
                problems.push(format!(
                    "the node daemon's control socket {} does not answer: {e}",
                    node.control.display()
                ));
            }
        }
    }
    if let Err(e) = super::rtnl::Rtnl::here() {
        problems.push(e.to_string());
    }
    match &conf.host_port {
        HostPortConf::Tap { .. } => {
            if !Path::new("/dev/net/tun").exists() {
                problems.push("/dev/net/tun is missing (load the tun module)".into());
            }
        }
        HostPortConf::AfPacket { master, .. } => {
            if !hostport::exists(master) {
                problems.push(format!("hostPort.master {master} does not exist"));
            }
        }
        HostPortConf::Switch { .. } => {}
    }
    let mut dirs = vec![conf.socket_dir.as_path()];
    match conf.kata {
        KataRuntime::Rs => dirs.push(&conf.dan_conf_dir),
        KataRuntime::Go => dirs.push(Path::new("/tmp")),
        KataRuntime::None => {}
    }
    for d in dirs {
        if let Err(e) = probe_dir(d) {
            problems.push(e);
        }
    }
    let mut delegate = None;
    if let Some(i) = &conf.ipam {
        match Delegate::find(&i.plugin, &cni_path) {
            Ok(d) => delegate = Some(d),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        return Err(CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "vhost-pump-cni cannot add attachments: {}",
                problems.join("; ")
            ),
        ));
    }
    if let Some(d) = delegate.filter(|d| d.supports(CniVersion::V1_1_0)) {
        d.exec("STATUS", &conf.raw, &[]).map_err(|e| {
            let mut e = CniError::from(e);
            if e.code != code::NOT_AVAILABLE && e.code != 51 {
                e.code = code::NOT_AVAILABLE;
            }
            e
        })?;
    }
    Ok(())
}

/// GC: tears down this network's attachments missing from `cni.dev/valid-attachments`, then
/// forwards GC to an IPAM plugin that speaks 1.1.0.
pub fn gc(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let valid = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "GC needs cni.dev/valid-attachments"))?;
    let cni_path = env.cni_path()?;
    let layout = Layout::new(&conf.socket_dir);
    let mut errs = Vec::new();
    for file in layout.state_files() {
        let st = match AttachmentState::load(&file) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "skipping unreadable state");
                continue;
            }
        };
        let keep = valid
            .iter()
            .any(|v| v.container_id == st.container_id && v.ifname == st.ifname);
        if st.network != conf.name || keep {
            continue;
        }
        let key_paths = layout.paths(&st.key);
        let guard = match FileLock::acquire(&key_paths.lock, Duration::from_secs(5)) {
            Ok(g) => g,
            Err(e) => {
                errs.push(lock_error(e));
                continue;
            }
        };
        // It may have been deleted while we waited.
        let Ok(Some(st)) = AttachmentState::load(&key_paths.state) else {
            guard.remove();
            continue;
        };
        let paths = st.paths(&layout);
        tracing::info!(container = %st.container_id, ifname = %st.ifname, "GC: removing stale attachment");
        let ids = [
            ("CNI_CONTAINERID", Some(st.container_id.as_str())),
            ("CNI_IFNAME", Some(st.ifname.as_str())),
            ("CNI_NETNS", None),
        ];
        errs.extend(teardown(&paths, Some(&st), conf, &cni_path, None, &ids));
        guard.remove();
    }
    if let Some(i) = &conf.ipam {
        if let Ok(d) = Delegate::find(&i.plugin, &cni_path) {
            if d.supports(CniVersion::V1_1_0) {
                if let Err(e) = d.exec("GC", &conf.raw, &[]) {
                    errs.push(e.into());
                }
            }
        }
    }
    match errs.into_iter().next() {
        Some(e) => Err(e.context("GC incomplete")),
        None => Ok(()),
    }
}
