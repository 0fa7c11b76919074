//! The network configuration the runtime passes on stdin: serde types for what the conflist
//! says, and their validation into a [`NetConf`] the commands use. Unknown top-level keys are
//! ignored (runtimes add their own); unknown keys or values inside `hostPort` are refused with
//! code 2, malformed values with code 7.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use vhost_net_backend::config::{
    queue_size_ok, MAX_MTU, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE, MIN_MTU, MIN_QUEUE_SIZE,
};
use vhost_net_backend::MacAddr;

use super::error::{code, CniError};
use super::version::CniVersion;
use crate::netdev::IfName;

/// Default directory for sockets, logs and state.
pub const DEFAULT_SOCKET_DIR: &str = "/run/vhost-pump";
/// Default Kata `dan_conf` directory.
pub const DEFAULT_DAN_CONF_DIR: &str = "/run/kata-containers/dans";
/// Longest socket path: `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// What a socket path adds to `socketDir`: `/<12 hex digits>/vu.sock`.
pub const SOCKET_SUFFIX_LEN: usize = 1 + 12 + "/vu.sock".len();

/// Who creates the vhost-user socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VhostUserMode {
    /// vhost-pump listens; the VMM connects (QEMU, Cloud Hypervisor).
    Server,
    /// The VMM listens (Kata runtime-rs with Dragonball); vhost-pump connects and reconnects.
    Client,
}

/// Which Kata runtime consumes the attachment (`"kata"`). Kata takes a vhost-user network
/// device from an outside backend on exactly two paths, and each wants something different:
///
/// | value | Kata runtime × hypervisor | how Kata finds the socket | who listens |
/// |---|---|---|---|
/// | `go` | runtime-go + QEMU | netns scan: a non-physical link with address A and a socket at `/tmp/vhostuser_<A>/vhu.sock` | vhost-pump |
/// | `rs` | runtime-rs + Dragonball | DAN file `{danConfDir}/{sandbox}.json`, device type `vhost-user` | Dragonball |
/// | `none` | (no Kata) | the result's `socketPath` | per `vhostUserMode` |
///
/// Every other pairing (runtime-rs with QEMU, Cloud Hypervisor or Firecracker; runtime-go with
/// Cloud Hypervisor or Firecracker; runtime-go reading a DAN `vhost-user` device) drops the
/// device or fails the sandbox in Kata, so there is no value for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KataRuntime {
    /// Kata runtime-go + QEMU: a dummy link in the pod netns, vhost-pump listening on
    /// `/tmp/vhostuser_<IP>/vhu.sock`, one queue pair, no DAN file.
    Go,
    /// Kata runtime-rs + Dragonball: a DAN file entry, vhost-pump connecting to the socket
    /// Dragonball creates.
    Rs,
    /// No Kata files: a plain vhost-user socket reported in the result.
    None,
}

impl KataRuntime {
    /// The configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            KataRuntime::Go => "go",
            KataRuntime::Rs => "rs",
            KataRuntime::None => "none",
        }
    }
}

/// Node-daemon mode (`"daemon"`): ports live in a node-wide vhost-pump reached through its
/// control socket instead of in per-attachment sidecars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeDaemonConf {
    /// The daemon's control socket (`vhost-pump --control PATH`).
    pub control: PathBuf,
}

/// Mode of a macvlan made on the master interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MacvlanMode {
    /// Macvlans on one master talk to each other directly.
    Bridge,
    /// Isolated from other macvlans.
    Private,
    /// Traffic between macvlans hairpins through the external switch.
    Vepa,
    /// The macvlan takes over the master (one per master).
    Passthru,
}

impl MacvlanMode {
    /// The `ip link ... type macvlan mode` word.
    pub fn as_str(self) -> &'static str {
        match self {
            MacvlanMode::Bridge => "bridge",
            MacvlanMode::Private => "private",
            MacvlanMode::Vepa => "vepa",
            MacvlanMode::Passthru => "passthru",
        }
    }
}

/// How the guest's frames reach the host (`hostPort`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPortConf {
    /// A persistent tap per attachment, enslaved to `bridge` (created if missing).
    Tap {
        /// Bridge name.
        bridge: String,
        /// Put the IPAM gateway addresses on the bridge (and enable forwarding).
        is_gateway: bool,
    },
    /// AF_PACKET on a macvlan of `master` (or on `master` itself when `macvlan` is `None`).
    AfPacket {
        /// Existing host interface.
        master: String,
        /// Mode of the per-attachment macvlan, `None` to use the master directly.
        macvlan: Option<MacvlanMode>,
    },
    /// A port of the node daemon's userspace switch `switch` (created on first use, with
    /// `uplink_tap` as its uplink when given): pods on one node talk VM to VM without the
    /// kernel. Needs the node daemon (`daemon`).
    Switch {
        /// Switch name.
        switch: String,
        /// The pod's access VLAN.
        vlan: Option<u16>,
        /// Tap the switch is given as uplink when the plugin creates it.
        uplink_tap: Option<String>,
    },
}

/// Ownership and mode for the socket (server mode) or its directory (client mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketPerms {
    /// Owner uid.
    pub uid: Option<u32>,
    /// Group gid.
    pub gid: Option<u32>,
    /// Permission bits.
    pub mode: u32,
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    /// Container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// The delegated IPAM plugin section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamConf {
    /// `ipam.type`: the plugin's file name in `CNI_PATH`.
    pub plugin: String,
}

/// A validated network configuration.
#[derive(Clone, Debug)]
pub struct NetConf {
    /// The version the runtime asked for.
    pub version: CniVersion,
    /// Network name.
    pub name: String,
    /// IPAM delegate, if any.
    pub ipam: Option<IpamConf>,
    /// Host side.
    pub host_port: HostPortConf,
    /// Queue pairs.
    pub queues: u16,
    /// Virtqueue size.
    pub queue_size: u16,
    /// MTU, if set (else the host port's).
    pub mtu: Option<u16>,
    /// Socket direction.
    pub mode: VhostUserMode,
    /// The Kata runtime that consumes the attachment.
    pub kata: KataRuntime,
    /// Node-daemon mode: add ports to this daemon instead of starting sidecars.
    pub daemon: Option<NodeDaemonConf>,
    /// Sockets, logs, pid and state files live here.
    pub socket_dir: PathBuf,
    /// Kata `dan_conf`.
    pub dan_conf_dir: PathBuf,
    /// Socket ownership and mode.
    pub perms: SocketPerms,
    /// Explicit vhost-pump binary.
    pub vhost_pump_path: Option<PathBuf>,
    /// `--busy-poll-us` for the sidecar.
    pub busy_poll_us: Option<u32>,
    /// Drop guest frames whose source MAC is not the guest's (`portSecurity`, default on).
    pub port_security: bool,
    /// `--log-level` for the sidecar.
    pub log_level: String,
    /// How long ADD waits for the sidecar.
    pub ready_timeout: Duration,
    /// `runtimeConfig.mac`.
    pub runtime_mac: Option<MacAddr>,
    /// `prevResult`, as given.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// The whole configuration as received (handed to the IPAM plugin).
    pub raw: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    ipam: Option<Value>,
    host_port: Option<Value>,
    queues: Option<u64>,
    queue_size: Option<u64>,
    mtu: Option<u64>,
    vhost_user_mode: Option<String>,
    kata: Option<Value>,
    daemon: Option<Value>,
    socket_dir: Option<PathBuf>,
    dan_conf_dir: Option<PathBuf>,
    socket_owner: Option<Value>,
    socket_group: Option<Value>,
    socket_mode: Option<Value>,
    vhost_pump_path: Option<PathBuf>,
    busy_poll_us: Option<u32>,
    port_security: Option<bool>,
    log_level: Option<String>,
    ready_timeout_ms: Option<u64>,
    runtime_config: Option<RawRuntimeConfig>,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Deserialize)]
struct RawRuntimeConfig {
    mac: Option<String>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

fn unsupported(msg: impl Into<String>) -> CniError {
    CniError::new(code::UNSUPPORTED_FIELD, msg)
}

/// Reads `cniVersion` from a decoded configuration: code 7 when missing, 1 when unsupported.
pub fn version_of(v: &Value) -> Result<CniVersion, CniError> {
    let s = v
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("cniVersion is missing or not a string"))?;
    CniVersion::parse(s).ok_or_else(|| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {s:?} is not supported; this plugin speaks {}",
                CniVersion::supported_list()
            ),
        )
    })
}

impl NetConf {
    /// Validates a decoded configuration.
    pub fn from_value(v: Value) -> Result<NetConf, CniError> {
        if !v.is_object() {
            return Err(invalid("the network configuration must be a JSON object"));
        }
        let version = version_of(&v)?;
        let raw: RawConf = serde_json::from_value(v.clone())
            .map_err(|e| invalid(format!("invalid network configuration: {e}")))?;

        let name = raw.name.ok_or_else(|| invalid("name is missing"))?;
        if !valid_network_name(&name) {
            return Err(invalid(format!(
                "name {name:?} must be letters, digits, '_', '.', '-' and start with a letter or digit"
            )));
        }
        if raw.plugin_type.as_deref().unwrap_or("").is_empty() {
            return Err(invalid("type is missing"));
        }
        let ipam = raw.ipam.map(parse_ipam).transpose()?;
        let host_port = parse_host_port(
            raw.host_port
                .as_ref()
                .ok_or_else(|| invalid("hostPort is missing (kind \"tap\" or \"af-packet\")"))?,
        )?;

        let queues = match raw.queues {
            None => 1,
            Some(q) if (1..=MAX_QUEUE_PAIRS as u64).contains(&q) => q as u16,
            Some(q) => {
                return Err(invalid(format!(
                    "queues {q} must be between 1 and {MAX_QUEUE_PAIRS}"
                )))
            }
        };
        let queue_size = match raw.queue_size {
            None => 256,
            Some(q) if queue_size_ok(q) => q as u16,
            Some(q) => {
                return Err(invalid(format!(
                    "queueSize {q} must be a power of two between {MIN_QUEUE_SIZE} and \
                     {MAX_QUEUE_SIZE}"
                )))
            }
        };
        let mtu = match raw.mtu {
            None => None,
            Some(m) if (u64::from(MIN_MTU)..=u64::from(MAX_MTU)).contains(&m) => Some(m as u16),
            Some(m) => {
                return Err(invalid(format!(
                    "mtu {m} must be between {MIN_MTU} and {MAX_MTU}"
                )))
            }
        };
        let kata = match raw.kata.as_ref().map(|k| k.as_str().ok_or(k)) {
            None | Some(Ok("go")) => KataRuntime::Go,
            Some(Ok("rs")) => KataRuntime::Rs,
            Some(Ok("none")) => KataRuntime::None,
            Some(Err(other)) => {
                return Err(invalid(format!(
                    "kata must be a string (\"go\", \"rs\" or \"none\"), not {other}"
                )))
            }
            Some(Ok(other)) => {
                return Err(unsupported(format!(
                    "kata {other:?} is not supported: use \"go\" (Kata runtime-go + QEMU), \"rs\" \
                     (Kata runtime-rs + Dragonball) or \"none\" (no Kata files); Kata takes no \
                     vhost-user network device from an outside backend with any other runtime \
                     and hypervisor"
                )))
            }
        };
        let mode = match raw.vhost_user_mode.as_deref() {
            None => match kata {
                KataRuntime::Rs => VhostUserMode::Client,
                KataRuntime::Go | KataRuntime::None => VhostUserMode::Server,
            },
            Some("server") => VhostUserMode::Server,
            Some("client") => VhostUserMode::Client,
            Some(other) => {
                return Err(unsupported(format!(
                    "vhostUserMode {other:?} is not supported: use \"server\" or \"client\""
                )))
            }
        };
        match (kata, mode) {
            (KataRuntime::Go, VhostUserMode::Client) => {
                return Err(invalid(
                    "kata \"go\" with vhostUserMode \"client\" cannot work: Kata runtime-go \
                     starts QEMU as the client of the socket (no server option), so vhost-pump \
                     must listen; drop vhostUserMode, or use kata \"rs\" (Dragonball listens) \
                     or \"none\"",
                ))
            }
            (KataRuntime::Rs, VhostUserMode::Server) => {
                return Err(invalid(
                    "kata \"rs\" with vhostUserMode \"server\" cannot work: Kata runtime-rs \
                     refuses a vhost-user DAN device whose socket already exists, because \
                     Dragonball creates it and listens; vhost-pump must connect (drop \
                     vhostUserMode: \"client\" is the default with kata \"rs\")",
                ))
            }
            _ => {}
        }
        if kata == KataRuntime::Go && queues != 1 {
            return Err(invalid(format!(
                "kata \"go\" takes one queue pair, not {queues}: Kata runtime-go gives QEMU's \
                 vhost-user netdev no queues= and its device no mq=on, so a guest would use one \
                 pair anyway"
            )));
        }
        if kata == KataRuntime::Go && ipam.is_none() {
            return Err(invalid(
                "kata \"go\" needs an ipam section: Kata runtime-go finds the socket through \
                 the address of the pod's interface (/tmp/vhostuser_<address>/vhu.sock)",
            ));
        }
        let daemon = raw.daemon.as_ref().map(parse_daemon).transpose()?;
        let socket_dir = absolute_dir(raw.socket_dir, DEFAULT_SOCKET_DIR, "socketDir")?;
        let len = socket_dir.as_os_str().len();
        if len + SOCKET_SUFFIX_LEN > MAX_SOCKET_PATH {
            return Err(invalid(format!(
                "socketDir {} is {len} bytes long; socket paths under it would exceed the {MAX_SOCKET_PATH}-byte \
                 limit of a unix socket (use at most {} bytes)",
                socket_dir.display(),
                MAX_SOCKET_PATH - SOCKET_SUFFIX_LEN
            )));
        }
        let dan_conf_dir = absolute_dir(raw.dan_conf_dir, DEFAULT_DAN_CONF_DIR, "danConfDir")?;
        let perms = SocketPerms {
            uid: raw
                .socket_owner
                .as_ref()
                .map(|v| resolve_id(v, Path::new("/etc/passwd"), "socketOwner"))
                .transpose()?,
            gid: raw
                .socket_group
                .as_ref()
                .map(|v| resolve_id(v, Path::new("/etc/group"), "socketGroup"))
                .transpose()?,
            mode: match &raw.socket_mode {
                None => 0o660,
                Some(Value::String(s)) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| {
                        invalid(format!(
                            "socketMode {s:?} is not an octal mode like \"0660\""
                        ))
                    })?,
                Some(other) => {
                    return Err(invalid(format!(
                        "socketMode {other} must be a string holding an octal mode, like \"0660\""
                    )))
                }
            },
        };
        if let Some(p) = &raw.vhost_pump_path {
            if !p.is_absolute() {
                return Err(invalid(format!(
                    "vhostPumpPath {} must be an absolute path",
                    p.display()
                )));
            }
        }
        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        if log_level.is_empty() || log_level.chars().any(char::is_whitespace) {
            return Err(invalid(format!(
                "logLevel {log_level:?} is not a log filter"
            )));
        }
        let ready_timeout = match raw.ready_timeout_ms {
            None => Duration::from_secs(10),
            Some(ms @ 100..=300_000) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(invalid(format!(
                    "readyTimeoutMs {ms} must be between 100 and 300000"
                )))
            }
        };
        let runtime_mac = raw
            .runtime_config
            .and_then(|r| r.mac)
            .map(|m| {
                m.parse::<MacAddr>().map_err(|e| {
                    invalid(format!(
                        "runtimeConfig.mac {m:?} is not a unicast MAC address: {e}"
                    ))
                })
            })
            .transpose()?;
        if matches!(host_port, HostPortConf::Switch { .. }) && daemon.is_none() {
            return Err(invalid(
                "hostPort.kind \"switch\" needs the node daemon (\"daemon\": {\"control\": ...}): \
                 the switch lives in it",
            ));
        }
        Ok(NetConf {
            version,
            name,
            ipam,
            host_port,
            queues,
            queue_size,
            mtu,
            mode,
            kata,
            daemon,
            socket_dir,
            dan_conf_dir,
            perms,
            vhost_pump_path: raw.vhost_pump_path,
            busy_poll_us: raw.busy_poll_us,
            port_security: raw.port_security.unwrap_or(true),
            log_level,
            ready_timeout,
            runtime_mac,
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
            raw: v,
        })
    }
}

/// Network names: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn valid_network_name(s: &str) -> bool {
    s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

fn absolute_dir(p: Option<PathBuf>, default: &str, key: &str) -> Result<PathBuf, CniError> {
    let p = p.unwrap_or_else(|| PathBuf::from(default));
    if !p.is_absolute() {
        return Err(invalid(format!(
            "{key} {} must be an absolute path",
            p.display()
        )));
    }
    Ok(p)
}

fn parse_ipam(v: Value) -> Result<IpamConf, CniError> {
    let t = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("ipam.type is missing"))?;
    if t.is_empty() || t.contains('/') || t == "." || t == ".." {
        return Err(invalid(format!(
            "ipam.type {t:?} must be a plugin file name found in CNI_PATH"
        )));
    }
    Ok(IpamConf { plugin: t.into() })
}

fn parse_daemon(v: &Value) -> Result<NodeDaemonConf, CniError> {
    let obj = v.as_object().ok_or_else(|| {
        invalid("daemon must be an object like {\"control\": \"/run/vhost-pump/node.sock\"}")
    })?;
    for k in obj.keys() {
        if k != "control" {
            return Err(unsupported(format!(
                "daemon.{k} is not supported; known keys: control"
            )));
        }
    }
    let control = match obj.get("control") {
        Some(Value::String(s)) => PathBuf::from(s),
        Some(other) => {
            return Err(invalid(format!(
                "daemon.control must be a string, not {other}"
            )))
        }
        None => {
            return Err(invalid(
                "daemon.control is missing (the node daemon's control socket)",
            ))
        }
    };
    if !control.is_absolute() || control.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(invalid(format!(
            "daemon.control {} must be an absolute path of at most {MAX_SOCKET_PATH} bytes",
            control.display()
        )));
    }
    Ok(NodeDaemonConf { control })
}

fn check_keys(obj: &Map<String, Value>, kind: &str, allowed: &[&str]) -> Result<(), CniError> {
    for (k, v) in obj {
        if !allowed.contains(&k.as_str()) {
            return Err(unsupported(format!(
                "hostPort.{k} ({v}) is not supported for kind {kind:?}; known keys: {}",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

fn string_field(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!(
            "hostPort.{key} must be a string, not {other}"
        ))),
    }
}

fn bool_field(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, CniError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(format!(
            "hostPort.{key} must be true or false, not {other}"
        ))),
    }
}

fn ifname_field(obj: &Map<String, Value>, key: &str) -> Result<String, CniError> {
    let name =
        string_field(obj, key)?.ok_or_else(|| invalid(format!("hostPort.{key} is missing")))?;
    IfName::new(&name).map_err(|e| invalid(format!("hostPort.{key}: {e}")))?;
    Ok(name)
}

fn parse_host_port(v: &Value) -> Result<HostPortConf, CniError> {
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("hostPort must be an object with a \"kind\""))?;
    let kind = string_field(obj, "kind")?.ok_or_else(|| {
        invalid("hostPort.kind is missing (\"tap\", \"af-packet\" or \"switch\")")
    })?;
    match kind.as_str() {
        "tap" => {
            check_keys(obj, "tap", &["kind", "bridge", "isGateway"])?;
            Ok(HostPortConf::Tap {
                bridge: ifname_field(obj, "bridge")?,
                is_gateway: bool_field(obj, "isGateway")?.unwrap_or(false),
            })
        }
        "af-packet" => {
            check_keys(
                obj,
                "af-packet",
                &["kind", "master", "macvlan", "macvlanMode"],
            )?;
            let master = ifname_field(obj, "master")?;
            let mode = match string_field(obj, "macvlanMode")?.as_deref() {
                None | Some("bridge") => MacvlanMode::Bridge,
                Some("private") => MacvlanMode::Private,
                Some("vepa") => MacvlanMode::Vepa,
                Some("passthru") => MacvlanMode::Passthru,
                Some(other) => {
                    return Err(unsupported(format!(
                        "hostPort.macvlanMode {other:?} is not supported: use bridge, private, vepa or passthru"
                    )))
                }
            };
            let macvlan = bool_field(obj, "macvlan")?.unwrap_or(true).then_some(mode);
            Ok(HostPortConf::AfPacket { master, macvlan })
        }
        "switch" => {
            check_keys(obj, "switch", &["kind", "switch", "vlan", "uplinkTap"])?;
            let switch = string_field(obj, "switch")?.unwrap_or_else(|| "pods".into());
            crate::switch::SwitchSpec::named(&switch)
                .validate()
                .map_err(|e| invalid(format!("hostPort.switch: {e}")))?;
            let vlan = match obj.get("vlan") {
                None => None,
                Some(v) => Some(
                    v.as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|n| (1..=crate::switch::frame_edit::MAX_VLAN).contains(n))
                        .ok_or_else(|| invalid(format!("hostPort.vlan {v} must be 1 to 4094")))?,
                ),
            };
            let uplink_tap = match obj.get("uplinkTap") {
                None => None,
                Some(_) => Some(ifname_field(obj, "uplinkTap")?),
            };
            Ok(HostPortConf::Switch {
                switch,
                vlan,
                uplink_tap,
            })
        }
        other => Err(unsupported(format!(
            "hostPort.kind {other:?} is not supported: use \"tap\", \"af-packet\" or \"switch\""
        ))),
    }
}

/// A user or group given by number or by name (looked up in `db`, /etc/passwd or /etc/group).
fn resolve_id(v: &Value, db: &Path, key: &str) -> Result<u32, CniError> {
    let name = match v {
        Value::Number(n) => {
            return n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| invalid(format!("{key} {n} is not a valid id")))
        }
        Value::String(s) => s,
        other => {
            return Err(invalid(format!(
                "{key} must be a name or a number, not {other}"
            )))
        }
    };
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(db)
        .map_err(|e| invalid(format!("{key} {name:?}: cannot read {}: {e}", db.display())))?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == name).then_some(())?;
            f.nth(1)?.parse::<u32>().ok()
        })
        .ok_or_else(|| invalid(format!("{key} {name:?} is not in {}", db.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"cniVersion": "1.1.0", "name": "dan", "type": "vhost-pump-cni",
               "hostPort": {"kind": "tap", "bridge": "br-dan"},
               "ipam": {"type": "host-local"}})
    }

    fn with(key: &str, val: Value) -> Value {
        let mut v = base();
        v[key] = val;
        v
    }

    #[test]
    fn defaults() {
        let c = NetConf::from_value(base()).unwrap();
        assert_eq!((c.queues, c.queue_size, c.mtu), (1, 256, None));
        assert_eq!(c.kata, KataRuntime::Go);
        assert_eq!(c.mode, VhostUserMode::Server);
        assert_eq!(c.daemon, None);
        assert!(
            c.port_security,
            "port security is on by default for CNI ports"
        );
        assert_eq!(c.socket_dir, Path::new(DEFAULT_SOCKET_DIR));
        assert_eq!(c.perms.mode, 0o660);
        assert_eq!(
            c.host_port,
            HostPortConf::Tap {
                bridge: "br-dan".into(),
                is_gateway: false
            }
        );
    }

    #[test]
    fn switch_ports_need_the_node_daemon_and_sane_fields() {
        let sw = json!({"kind": "switch", "switch": "pods", "vlan": 12, "uplinkTap": "up0"});
        let e = NetConf::from_value(with("hostPort", sw.clone())).unwrap_err();
        assert!(e.to_string().contains("needs the node daemon"), "{e}");
        let mut v = with("hostPort", sw);
        v["daemon"] = json!({"control": "/run/vhost-pump/node.sock"});
        let c = NetConf::from_value(v.clone()).unwrap();
        assert_eq!(
            c.host_port,
            HostPortConf::Switch {
                switch: "pods".into(),
                vlan: Some(12),
                uplink_tap: Some("up0".into()),
            }
        );
        for bad in [
            json!({"kind": "switch", "vlan": 0}),
            json!({"kind": "switch", "vlan": 4095}),
            json!({"kind": "switch", "switch": "bad name"}),
            json!({"kind": "switch", "uplinkTap": "much-too-long-tap-name"}),
            json!({"kind": "switch", "bridge": "br0"}),
        ] {
            let mut b = v.clone();
            b["hostPort"] = bad.clone();
            assert!(NetConf::from_value(b).is_err(), "{bad} accepted");
        }
        // The default switch name.
        let mut d = v;
        d["hostPort"] = json!({"kind": "switch"});
        assert!(matches!(
            NetConf::from_value(d).unwrap().host_port,
            HostPortConf::Switch { ref switch, vlan: None, uplink_tap: None } if switch == "pods"
        ));
    }

    #[test]
    fn codes_for_bad_configs() {
        let cases = [
            (
                with("cniVersion", json!("0.2.0")),
                code::INCOMPATIBLE_VERSION,
            ),
            (with("queues", json!(0)), code::INVALID_CONFIG),
            (with("queues", json!("two")), code::INVALID_CONFIG),
            (with("queueSize", json!(100)), code::INVALID_CONFIG),
            (with("mtu", json!(10)), code::INVALID_CONFIG),
            (
                with("vhostUserMode", json!("both")),
                code::UNSUPPORTED_FIELD,
            ),
            (
                with("hostPort", json!({"kind": "vfio"})),
                code::UNSUPPORTED_FIELD,
            ),
            (
                with("hostPort", json!({"kind": "tap", "bridge": "b", "vlan": 3})),
                code::UNSUPPORTED_FIELD,
            ),
            (
                with("hostPort", json!({"kind": "tap"})),
                code::INVALID_CONFIG,
            ),
            (
                with(
                    "hostPort",
                    json!({"kind": "tap", "bridge": "way-too-long-bridge-name"}),
                ),
                code::INVALID_CONFIG,
            ),
            (
                with("socketDir", json!("relative/dir")),
                code::INVALID_CONFIG,
            ),
            (
                with("socketDir", json!(format!("/{}", "d".repeat(90)))),
                code::INVALID_CONFIG,
            ),
            (with("socketMode", json!("rw")), code::INVALID_CONFIG),
            (
                with("socketOwner", json!("no-such-user-here")),
                code::INVALID_CONFIG,
            ),
            (with("ipam", json!({"type": "../x"})), code::INVALID_CONFIG),
            (with("name", json!("bad name")), code::INVALID_CONFIG),
            (
                with("runtimeConfig", json!({"mac": "01:00:00:00:00:01"})),
                code::INVALID_CONFIG,
            ),
        ];
        for (v, want) in cases {
            let e = NetConf::from_value(v.clone()).unwrap_err();
            assert_eq!(e.code, want, "{v}: {e:?}");
        }
    }

    #[test]
    fn kata_paths_and_their_combinations() {
        let c = NetConf::from_value(with("kata", json!("rs"))).unwrap();
        assert_eq!((c.kata, c.mode), (KataRuntime::Rs, VhostUserMode::Client));
        let mut v = with("kata", json!("none"));
        v.as_object_mut().unwrap().remove("ipam");
        v["queues"] = json!(4);
        let c = NetConf::from_value(v).unwrap();
        assert_eq!(
            (c.kata, c.mode, c.queues),
            (KataRuntime::None, VhostUserMode::Server, 4)
        );
        let mut v = with("kata", json!("none"));
        v["vhostUserMode"] = json!("client");
        assert_eq!(NetConf::from_value(v).unwrap().mode, VhostUserMode::Client);
        let mut v = with("daemon", json!({"control": "/run/vhost-pump/node.sock"}));
        v["kata"] = json!("go");
        assert_eq!(
            NetConf::from_value(v).unwrap().daemon,
            Some(NodeDaemonConf {
                control: "/run/vhost-pump/node.sock".into()
            })
        );

        // Combinations Kata cannot use are refused, saying why.
        let refused = |v: Value, code: u32, says: &str| {
            let e = NetConf::from_value(v.clone()).unwrap_err();
            assert_eq!(e.code, code, "{v}: {e:?}");
            assert!(e.msg.contains(says), "{v}: {}", e.msg);
        };
        let mut v = with("kata", json!("go"));
        v["vhostUserMode"] = json!("client");
        refused(
            v,
            code::INVALID_CONFIG,
            "runtime-go starts QEMU as the client",
        );
        let mut v = with("kata", json!("rs"));
        v["vhostUserMode"] = json!("server");
        refused(v, code::INVALID_CONFIG, "Dragonball creates it");
        refused(
            with("queues", json!(2)),
            code::INVALID_CONFIG,
            "one queue pair",
        );
        let mut v = base();
        v.as_object_mut().unwrap().remove("ipam");
        refused(v, code::INVALID_CONFIG, "needs an ipam section");
        refused(
            with("kata", json!("clh")),
            code::UNSUPPORTED_FIELD,
            "\"rs\"",
        );
        refused(with("kata", json!(true)), code::INVALID_CONFIG, "kata");
        refused(
            with("daemon", json!({"control": "rel.sock"})),
            code::INVALID_CONFIG,
            "absolute",
        );
        refused(
            with("daemon", json!({})),
            code::INVALID_CONFIG,
            "control is missing",
        );
        refused(
            with("daemon", json!({"control": "/c.sock", "port": 1})),
            code::UNSUPPORTED_FIELD,
            "daemon.port",
        );
        refused(
            with("daemon", json!("/c.sock")),
            code::INVALID_CONFIG,
            "object",
        );
    }

    #[test]
    fn af_packet_and_perms() {
        let mut v = with("hostPort", json!({"kind": "af-packet", "master": "eth1"}));
        v["socketOwner"] = json!("root");
        v["socketGroup"] = json!(0);
        v["socketMode"] = json!("0600");
        v["vhostUserMode"] = json!("client");
        v["kata"] = json!("none");
        let c = NetConf::from_value(v).unwrap();
        assert_eq!(
            c.host_port,
            HostPortConf::AfPacket {
                master: "eth1".into(),
                macvlan: Some(MacvlanMode::Bridge)
            }
        );
        assert_eq!(
            c.perms,
            SocketPerms {
                uid: Some(0),
                gid: Some(0),
                mode: 0o600
            }
        );
        assert_eq!(c.mode, VhostUserMode::Client);
        let v = with(
            "hostPort",
            json!({"kind": "af-packet", "master": "eth1", "macvlan": false}),
        );
        assert!(matches!(
            NetConf::from_value(v).unwrap().host_port,
            HostPortConf::AfPacket { macvlan: None, .. }
        ));
    }
}
