//! Port specifications: what one vhost-user port is made of, from CLI flags, a TOML config file
//! (`vhost-pump --config FILE`, one `[[port]]` table per port) or a control-socket request.
//! Everything here is untrusted input and is validated before anything is created.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vhost_net_backend::config::{
    queue_size_ok, DEFAULT_QUEUE_SIZE, MAX_MTU, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE, MIN_MTU,
    MIN_QUEUE_SIZE,
};
use vhost_net_backend::MacAddr;

/// Most ports one process serves.
pub const MAX_PORTS: usize = 64;
/// Longest path a Unix socket address can hold (sun_path minus the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Errors in a port specification or config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message (with line and column).
        message: String,
    },
    /// A field value is out of range.
    #[error("port {port:?}: {message}")]
    Invalid {
        /// Port name.
        port: String,
        /// What is wrong.
        message: String,
    },
}

/// Which host port backs the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "name")]
pub enum HostSpec {
    /// A tap device (attached, or created in the current network namespace).
    Tap(String),
    /// An existing interface used through AF_PACKET sockets.
    AfPacket(String),
    /// A port of the daemon's userspace switch of that name (see [`crate::switch`]).
    Switch(String),
}

/// How a tap port writes guest frames into the tap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TapTx {
    /// io_uring where the kernel allows it, else `writev`.
    #[default]
    Auto,
    /// One io_uring submission per burst of frames (one `writev` request each); the port
    /// fails to start where io_uring is unavailable.
    IoUring,
    /// One `writev` system call per frame.
    Writev,
}

impl TapTx {
    fn is_auto(&self) -> bool {
        *self == TapTx::Auto
    }
}

fn default_queues() -> u16 {
    1
}
fn default_true() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn default_queue_size() -> u16 {
    DEFAULT_QUEUE_SIZE
}
fn default_busy_poll() -> u32 {
    10
}

/// One vhost-user port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Unique name (used in logs, metrics and `ctl`).
    pub name: String,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Host side.
    pub host: HostSpec,
    /// Queue pairs.
    #[serde(default = "default_queues")]
    pub queues: u16,
    /// Largest virtqueue size.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Guest MAC (default: derived from the socket path).
    #[serde(default, with = "mac_text")]
    pub mac: Option<MacAddr>,
    /// Guest MTU.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// AF_PACKET ports: receive only frames for `mac` (required) and broadcast/multicast.
    #[serde(default)]
    pub mac_filter: bool,
    /// Port security: drop guest frames whose Ethernet source is not `mac` (required).
    /// Left out of files and requests when off, so older daemons still read them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub port_security: bool,
    /// Offer dirty-page logging so the frontend can live-migrate the guest (default: on).
    /// Written out only when off.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub live_migration: bool,
    /// Connect to the socket instead of listening.
    #[serde(default)]
    pub client: bool,
    /// Busy-poll window after work, in microseconds.
    #[serde(default = "default_busy_poll")]
    pub busy_poll_us: u32,
    /// Tap ports: how frames are written into the tap. Written out only when not `auto`.
    #[serde(default, skip_serializing_if = "TapTx::is_auto")]
    pub tap_tx: TapTx,
    /// Owner (user name or uid) of the server socket.
    #[serde(default)]
    pub socket_owner: Option<String>,
    /// Group (name or gid) of the server socket.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Permission bits of the server socket, octal (default 0660).
    #[serde(default)]
    pub socket_mode: Option<String>,
    /// Switch ports: the access VLAN (untagged frames; none: VLAN 0, the switch's untagged
    /// network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Switch ports: a trunk carrying these VLANs tagged, instead of an access VLAN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trunk: Vec<u16>,
}

/// MAC addresses as "02:00:00:00:00:01" text in config files and requests.
mod mac_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use vhost_net_backend::MacAddr;

    pub fn serialize<S: Serializer>(mac: &Option<MacAddr>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            Some(m) => s.serialize_some(&m.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MacAddr>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The `--config` file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Switches, before the ports that attach to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switch: Vec<crate::switch::SwitchSpec>,
    /// Ports to serve.
    #[serde(default)]
    pub port: Vec<PortSpec>,
}

impl DaemonConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })
    }

    /// The file text for these ports (what [`DaemonConfig::parse`] reads back).
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string(self).map_err(|e| e.to_string())
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: DaemonConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        if cfg.port.len() > MAX_PORTS {
            return Err(ConfigError::Invalid {
                port: String::new(),
                message: format!("{} ports given, at most {MAX_PORTS}", cfg.port.len()),
            });
        }
        for (i, s) in cfg.switch.iter().enumerate() {
            s.validate().map_err(|e| ConfigError::Invalid {
                port: String::new(),
                message: e.to_string(),
            })?;
            if cfg.switch[..i].iter().any(|o| o.name == s.name) {
                return Err(ConfigError::Invalid {
                    port: String::new(),
                    message: format!("duplicate switch name {:?}", s.name),
                });
            }
        }
        for (i, p) in cfg.port.iter().enumerate() {
            p.validate()?;
            if cfg.port[..i].iter().any(|q| q.name == p.name) {
                return Err(p.invalid("duplicate port name"));
            }
            if cfg.port[..i].iter().any(|q| q.socket == p.socket) {
                return Err(p.invalid("socket path used by another port"));
            }
        }
        Ok(cfg)
    }
}

/// A port or switch name: 1 to 64 characters of `A-Z a-z 0-9 - _ .` (it appears in file
/// names, logs and metric labels).
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl PortSpec {
    fn invalid(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            port: self.name.clone(),
            message: message.into(),
        }
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !name_ok(&self.name) {
            return Err(self.invalid("name must be 1-64 characters of [A-Za-z0-9._-]"));
        }
        let sock = self.socket.as_os_str().len();
        if sock == 0 || sock > MAX_SOCKET_PATH {
            return Err(self.invalid(format!(
                "socket path must be 1..={MAX_SOCKET_PATH} bytes, got {sock}"
            )));
        }
        if !(1..=MAX_QUEUE_PAIRS).contains(&usize::from(self.queues)) {
            return Err(self.invalid(format!("queues must be 1..={MAX_QUEUE_PAIRS}")));
        }
        if !queue_size_ok(u64::from(self.queue_size)) {
            return Err(self.invalid(format!(
                "queue_size must be a power of two in {MIN_QUEUE_SIZE}..={MAX_QUEUE_SIZE}"
            )));
        }
        if let Some(m) = self.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&m) {
                return Err(self.invalid(format!("mtu must be {MIN_MTU}..={MAX_MTU}")));
            }
        }
        if self.busy_poll_us > 1_000_000 {
            return Err(self.invalid("busy_poll_us must be at most 1000000"));
        }
        if self.tap_tx != TapTx::Auto && !matches!(self.host, HostSpec::Tap(_)) {
            return Err(self.invalid("tap_tx is for tap ports"));
        }
        if self.mac_filter {
            if !matches!(self.host, HostSpec::AfPacket(_)) {
                return Err(self.invalid(
                    "mac_filter is for af-packet ports (a tap receives only what is routed or \
                     bridged to it)",
                ));
            }
            if self.mac.is_none() {
                return Err(self.invalid("mac_filter needs mac: the MAC the VMM gives the guest"));
            }
        }
        if self.port_security && self.mac.is_none() {
            return Err(self.invalid(
                "port_security needs mac: the MAC the VMM gives the guest, the only source \
                 address its frames may carry",
            ));
        }
        match &self.host {
            HostSpec::Tap(n) | HostSpec::AfPacket(n) => {
                crate::netdev::IfName::new(n).map_err(|e| self.invalid(e.to_string()))?;
                if self.vlan.is_some() || !self.trunk.is_empty() {
                    return Err(self.invalid("vlan and trunk are for switch ports"));
                }
            }
            HostSpec::Switch(sw) => {
                if !name_ok(sw) {
                    return Err(
                        self.invalid("switch name must be 1-64 characters of [A-Za-z0-9._-]")
                    );
                }
                crate::switch::check_vlans(self.vlan, &self.trunk).map_err(|m| self.invalid(m))?;
            }
        }
        self.mode()?;
        Ok(())
    }

    /// The socket permission bits.
    pub fn mode(&self) -> Result<u32, ConfigError> {
        match &self.socket_mode {
            None => Ok(0o660),
            Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| self.invalid(format!("socket_mode {s:?} is not octal like 0660"))),
        }
    }

    /// The guest MAC: given, or derived from the socket path.
    pub fn mac(&self) -> MacAddr {
        self.mac
            .unwrap_or_else(|| MacAddr::local_from_seed(self.socket.as_os_str().as_encoded_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[port]]
name = "vm0"
socket = "/run/vp/vm0.sock"
host = { kind = "tap", name = "vp0" }
queues = 2
mtu = 9000
socket_mode = "0600"

[[port]]
name = "vm1"
socket = "/run/vp/vm1.sock"
host = { kind = "af-packet", name = "veth1" }
client = true
mac = "02:00:00:00:00:01"
"#;

    #[test]
    fn parses_a_good_file() {
        let c = DaemonConfig::parse(GOOD).unwrap();
        assert_eq!(c.port.len(), 2);
        assert_eq!(c.port[0].host, HostSpec::Tap("vp0".into()));
        assert_eq!(c.port[0].mode().unwrap(), 0o600);
        assert_eq!(c.port[1].host, HostSpec::AfPacket("veth1".into()));
        assert_eq!(
            (
                c.port[1].queues,
                c.port[1].queue_size,
                c.port[1].busy_poll_us
            ),
            (1, 1024, 10)
        );
        assert_eq!(c.port[1].mode().unwrap(), 0o660);
        assert_eq!(c.port[1].mac().to_string(), "02:00:00:00:00:01");
        assert!(!c.port[1].mac_filter);
        let c = DaemonConfig::parse(&GOOD.replace("client = true", "mac_filter = true")).unwrap();
        assert!(c.port[1].mac_filter);
        assert!(!c.port[1].port_security);
    }

    #[test]
    fn port_security_is_read_written_only_when_on_and_needs_the_mac() {
        let c =
            DaemonConfig::parse(&GOOD.replace("client = true", "port_security = true")).unwrap();
        assert!(c.port[1].port_security);
        assert!(!c.port[0].port_security);
        let text = c.to_toml().unwrap();
        assert_eq!(text.matches("port_security").count(), 1, "{text}");
        assert_eq!(DaemonConfig::parse(&text).unwrap().port, c.port);
        let err = DaemonConfig::parse(&GOOD.replace("mtu = 9000", "port_security = true"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("port_security needs mac"), "{err}");
    }

    #[test]
    fn tap_tx_is_read_and_written_only_when_not_auto() {
        let c = DaemonConfig::parse(&GOOD.replace("mtu = 9000", "tap_tx = \"writev\"")).unwrap();
        assert_eq!(c.port[0].tap_tx, TapTx::Writev);
        assert_eq!(c.port[1].tap_tx, TapTx::Auto);
        let text = c.to_toml().unwrap();
        assert_eq!(text.matches("tap_tx").count(), 1, "{text}");
        assert_eq!(DaemonConfig::parse(&text).unwrap().port, c.port);
        let c = DaemonConfig::parse(&GOOD.replace("mtu = 9000", "tap_tx = \"io-uring\"")).unwrap();
        assert_eq!(c.port[0].tap_tx, TapTx::IoUring);
        let err = DaemonConfig::parse(&GOOD.replace("mtu = 9000", "tap_tx = \"sendmmsg\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tap_tx") || err.contains("variant"), "{err}");
        let err = DaemonConfig::parse(&GOOD.replace("client = true", "tap_tx = \"writev\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tap_tx is for tap ports"), "{err}");
    }

    #[test]
    fn refuses_bad_input() {
        let cases = [
            (GOOD.replace("queues = 2", "queues = 99"), "queues"),
            (GOOD.replace("mtu = 9000", "mtu = 1"), "mtu"),
            (
                GOOD.replace("mtu = 9000", "mtu = 9000\nmac_filter = true"),
                "mac_filter is for af-packet",
            ),
            (
                GOOD.replace("mac = \"02:00:00:00:00:01\"", "mac_filter = true"),
                "mac_filter needs mac",
            ),
            (GOOD.replace("\"0600\"", "\"999\""), "socket_mode"),
            (GOOD.replace("vm1.sock", "vm0.sock"), "socket path"),
            (GOOD.replace("name = \"vm1\"", "name = \"vm0\""), "duplicate"),
            (GOOD.replace("name = \"vm1\"", "name = \"a/b\""), "name"),
            (GOOD.replace("\"veth1\"", "\"this-name-is-too-long\""), "interface"),
            (GOOD.replace("kind = \"tap\"", "kind = \"vde\""), "unknown variant"),
            (GOOD.replace("client = true", "client = true\nbogus = 1"), "unknown field"),
            (GOOD.replace("02:00:00:00:00:01", "01:00:00:00:00:01"), "multicast"),
            ("[[port]]\nname = 3".to_string(), "invalid type"),
            (format!("{GOOD}\n[[port]]\nname = \"x\"\nsocket = \"/{}\"\nhost = {{ kind = \"tap\", name = \"t\" }}\n", "a".repeat(200)), "socket path must be"),
        ];
        for (text, want) in cases {
            let err = DaemonConfig::parse(&text).expect_err(want).to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }
}
