//! Command-line contract of the `vhost-pump` daemon. Other tools and tests depend on these flags.
//!
//! One port from flags: `vhost-pump --socket-path PATH (--tap NAME | --af-packet IFNAME) ...`
//! (`--socket` is an alias; `--fd FDNUM` serves an inherited listening socket instead);
//! many from a file: `vhost-pump --config FILE`; a running daemon is managed with
//! `vhost-pump ctl add|remove|list|stats`.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use vhost_net_backend::config::{
    queue_size_ok, DEFAULT_QUEUE_SIZE, MAX_MTU, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE, MIN_MTU,
    MIN_QUEUE_SIZE,
};
use vhost_net_backend::MacAddr;

use crate::config::{HostSpec, PortSpec, TapTx};

/// Serve a VM's virtio-net device over a vhost-user socket from a host tap or interface.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-pump",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// Manage a running daemon through its control socket.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The port to serve (when not using --config).
    #[command(flatten)]
    pub port: PortArgs,

    /// TOML file with one `[[port]]` table per port, instead of the port flags.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket", "fd", "tap", "af_packet", "switch"])]
    pub config: Option<PathBuf>,

    /// Serve a control socket here, for `vhost-pump ctl`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Keep the ports added with `ctl add` in FILE (rewritten on every add and remove) and
    /// start them again when the daemon restarts: the node daemon's memory of its pods.
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,

    /// Serve Prometheus metrics over HTTP on HOST:PORT (or unix:PATH).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Log filter: error, warn, info, debug, trace (or a tracing filter directive)
    /// [default: $RUST_LOG, else info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Print the backend's capabilities as the JSON object the vhost-user specification
    /// defines for backend programs (`{"type": "net"}`) and exit; other flags are ignored.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Do not sandbox port threads (seccomp filter, dropped capabilities); for debugging.
    #[arg(long)]
    pub no_sandbox: bool,

    /// User id port threads switch to when the daemon runs as root (an id no account uses).
    #[arg(long, value_name = "UID", default_value_t = crate::sandbox::DEFAULT_ID,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub sandbox_uid: u32,

    /// Group id port threads switch to when the daemon runs as root.
    #[arg(long, value_name = "GID", default_value_t = crate::sandbox::DEFAULT_ID,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub sandbox_gid: u32,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags describing one port.
#[derive(Debug, Clone, ClapArgs)]
#[command(group(clap::ArgGroup::new("host_port").args(["tap", "af_packet", "switch"])))]
pub struct PortArgs {
    /// vhost-user socket path (listened on, or connected to with --client).
    #[arg(long = "socket-path", visible_alias = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Serve the listening Unix socket inherited as file descriptor FDNUM (systemd socket
    /// activation, or a socket libvirt opened), instead of --socket-path. The daemon neither
    /// changes nor removes it.
    #[arg(long, value_name = "FDNUM", conflicts_with_all = ["socket", "client", "socket_owner",
          "socket_group", "socket_mode"], value_parser = clap::value_parser!(i32).range(0..))]
    pub fd: Option<i32>,

    /// Tap device to attach to, created in the current network namespace if missing.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,

    /// Existing host interface (veth, macvlan, NIC) to attach to with AF_PACKET sockets.
    #[arg(long, value_name = "IFNAME")]
    pub af_packet: Option<String>,

    /// Attach to the daemon's userspace switch NAME instead of a host device: frames to other
    /// ports of the switch never cross the kernel. On the daemon's command line the switch is
    /// made with default settings; with `ctl add` it must exist (`[[switch]]` in --config, or
    /// `ctl add-switch`).
    #[arg(long, value_name = "NAME")]
    pub switch: Option<String>,

    /// With --switch: the port's access VLAN (1-4094; frames untagged in the guest).
    #[arg(
        long,
        value_name = "VID",
        requires = "switch",
        conflicts_with = "trunk"
    )]
    pub vlan: Option<u16>,

    /// With --switch: make the port a trunk carrying these VLANs tagged (comma-separated).
    #[arg(
        long,
        value_name = "VID,...",
        requires = "switch",
        value_delimiter = ','
    )]
    pub trunk: Vec<u16>,

    /// Number of RX/TX queue pairs (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUE_PAIRS as i64))]
    pub queues: u16,

    /// Largest virtqueue size the frontend may use (a power of two).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE,
          value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Guest MAC address [default: a stable locally administered address derived from the socket path].
    #[arg(long, value_name = "MAC")]
    pub mac: Option<MacAddr>,

    /// With --af-packet: receive only frames for --mac (required; the MAC the VMM gives the
    /// guest) and broadcast/multicast, dropped in the kernel before the ring, so a guest on a
    /// shared bridge, macvlan or NIC does not see other hosts' unicast traffic.
    #[arg(long)]
    pub mac_filter: bool,

    /// Drop frames from the guest whose Ethernet source address is not --mac (required; the
    /// MAC the VMM gives the guest), so a guest cannot send as another host. Counted as
    /// `spoofed_source` drops.
    #[arg(long)]
    pub port_security: bool,

    /// Do not offer dirty-page logging (VHOST_F_LOG_ALL, LOG_SHMFD): QEMU then refuses to
    /// live-migrate, save or snapshot the guest. Offered by default.
    #[arg(long)]
    pub no_live_migration: bool,

    /// Accepted for compatibility: live migration is on by default.
    #[arg(long, hide = true, conflicts_with = "no_live_migration")]
    pub live_migration: bool,

    /// MTU shown to the guest [default: the host port's MTU]; in tap mode also set on the tap.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(MIN_MTU as i64..=MAX_MTU as i64))]
    pub mtu: Option<u16>,

    /// Connect to the socket (the VMM listens) instead of listening; reconnect forever.
    #[arg(long)]
    pub client: bool,

    /// After work, keep polling this many microseconds before sleeping (0 = never poll).
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub busy_poll_us: u32,

    /// Tap mode: write guest frames into the tap through io_uring, one submission per burst
    /// (`io-uring`), or with one `writev` per frame (`writev`); `auto` uses io_uring where the
    /// kernel allows it.
    #[arg(long, value_enum, value_name = "HOW", default_value_t = TapTx::Auto)]
    pub tap_tx: TapTx,

    /// Owner (user name or uid) of the server socket.
    #[arg(long, value_name = "USER")]
    pub socket_owner: Option<String>,

    /// Group (name or gid) of the server socket.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Permission bits of the server socket [default: 0660].
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
}

/// Port flags that do not describe a port.
#[derive(Debug, thiserror::Error)]
pub enum PortArgsError {
    /// `--fd` given where only a socket path can work.
    #[error(
        "--fd names a descriptor of the daemon's own process: it is for the daemon's command \
         line, not for ports added with `ctl add`"
    )]
    FdNotHere,
    /// No socket.
    #[error("--socket-path is required")]
    NoSocket,
    /// No host side.
    #[error("one of --tap, --af-packet or --switch is required")]
    NoHostPort,
    /// The port the flags describe is not valid.
    #[error(transparent)]
    Invalid(#[from] crate::config::ConfigError),
}

impl PortArgs {
    /// The port these flags describe, named `name`.
    pub fn to_spec(&self, name: &str) -> Result<PortSpec, PortArgsError> {
        if self.fd.is_some() {
            return Err(PortArgsError::FdNotHere);
        }
        let socket = self.socket.clone().ok_or(PortArgsError::NoSocket)?;
        self.to_spec_at(name, socket)
    }

    /// The port these flags describe, named `name`, serving `socket` (the path of an inherited
    /// listening socket with --fd).
    pub fn to_spec_at(&self, name: &str, socket: PathBuf) -> Result<PortSpec, PortArgsError> {
        let host = match (&self.tap, &self.af_packet, &self.switch) {
            (Some(t), _, _) => HostSpec::Tap(t.clone()),
            (None, Some(i), _) => HostSpec::AfPacket(i.clone()),
            (None, None, Some(s)) => HostSpec::Switch(s.clone()),
            (None, None, None) => return Err(PortArgsError::NoHostPort),
        };
        let spec = PortSpec {
            name: name.into(),
            socket,
            host,
            queues: self.queues,
            queue_size: self.queue_size,
            mac: self.mac,
            mtu: self.mtu,
            mac_filter: self.mac_filter,
            port_security: self.port_security,
            live_migration: !self.no_live_migration,
            client: self.client,
            busy_poll_us: self.busy_poll_us,
            tap_tx: self.tap_tx,
            socket_owner: self.socket_owner.clone(),
            socket_group: self.socket_group.clone(),
            socket_mode: self.socket_mode.clone(),
            vlan: self.vlan,
            trunk: self.trunk.clone(),
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Talk to a running daemon's control socket.
    Ctl(CtlArgs),
}

/// `vhost-pump ctl`.
#[derive(Debug, ClapArgs)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/vhost-pump/control.sock"
    )]
    pub control: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub op: CtlOp,
}

/// Control operations.
#[derive(Debug, Subcommand)]
pub enum CtlOp {
    /// Start a new port.
    Add {
        /// Port name.
        #[arg(long)]
        name: String,
        /// The port.
        #[command(flatten)]
        port: PortArgs,
    },
    /// Stop and remove a port.
    Remove {
        /// Port name.
        name: String,
    },
    /// List ports.
    List,
    /// Show counters (all ports, or one).
    Stats {
        /// Port name.
        name: Option<String>,
    },
    /// Start a switch ports can attach to with --switch.
    AddSwitch(SwitchArgs),
    /// Stop a switch no port uses.
    RemoveSwitch {
        /// Switch name.
        name: String,
    },
    /// List the switches.
    Switches,
    /// Show a switch's forwarding table.
    Fdb {
        /// Switch name.
        name: String,
    },
}

/// Flags describing one switch.
#[derive(Debug, Clone, ClapArgs)]
pub struct SwitchArgs {
    /// Switch name.
    #[arg(long)]
    pub name: String,
    /// Most addresses learned at once (more are not learned, and counted).
    #[arg(long, value_name = "N", default_value_t = crate::switch::DEFAULT_FDB_MAX)]
    pub fdb_max: usize,
    /// Seconds an address is remembered after it was last seen.
    #[arg(long, value_name = "SECS", default_value_t = crate::switch::DEFAULT_AGING_SECS)]
    pub aging_secs: u64,
    /// Storm control: most flooded frames per second from one port (0: no limit).
    #[arg(long, value_name = "PPS", default_value_t = crate::switch::DEFAULT_FLOOD_PPS)]
    pub flood_pps: u32,
    /// Tap device to attach as an uplink (repeatable; created if missing).
    #[arg(long, value_name = "NAME")]
    pub uplink_tap: Vec<String>,
    /// Existing interface to attach as an uplink through AF_PACKET (repeatable).
    #[arg(long, value_name = "IFNAME")]
    pub uplink_af_packet: Vec<String>,
}

impl SwitchArgs {
    /// The switch these flags describe (uplinks untagged, on VLAN 0).
    pub fn to_spec(&self) -> crate::switch::SwitchSpec {
        use crate::switch::{UplinkKind, UplinkSpec};
        let uplink = |kind, name: &String| UplinkSpec {
            kind,
            name: name.clone(),
            vlan: None,
            trunk: Vec::new(),
        };
        crate::switch::SwitchSpec {
            name: self.name.clone(),
            fdb_max: self.fdb_max,
            aging_secs: self.aging_secs,
            flood_pps: self.flood_pps,
            uplinks: self
                .uplink_tap
                .iter()
                .map(|n| uplink(UplinkKind::Tap, n))
                .chain(
                    self.uplink_af_packet
                        .iter()
                        .map(|n| uplink(UplinkKind::AfPacket, n)),
                )
                .collect(),
        }
    }
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !queue_size_ok(n) {
        return Err(format!(
            "{n} is not a power of two between {MIN_QUEUE_SIZE} and {MAX_QUEUE_SIZE}"
        ));
    }
    Ok(n as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        let mut v = vec!["vhost-pump"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)
    }

    fn spec(args: &[&str]) -> Result<PortSpec, String> {
        let args = parse(args).map_err(|e| e.to_string())?;
        args.port.to_spec("p").map_err(|e| e.to_string())
    }

    #[test]
    fn tap_tx_flag() {
        let base = ["--socket", "/tmp/s", "--tap", "t0"];
        assert_eq!(spec(&base).unwrap().tap_tx, TapTx::Auto);
        for (v, want) in [("writev", TapTx::Writev), ("io-uring", TapTx::IoUring)] {
            let a = spec(&[&base[..], &["--tap-tx", v]].concat()).unwrap();
            assert_eq!(a.tap_tx, want);
        }
        let err = spec(&[&base[..], &["--tap-tx", "sendmmsg"]].concat()).unwrap_err();
        assert!(err.contains("io-uring"), "{err}");
    }

    #[test]
    fn defaults_and_flags() {
        let a = spec(&["--socket", "/tmp/s", "--tap", "t0"]).unwrap();
        assert_eq!(
            (a.queues, a.queue_size, a.busy_poll_us, a.client),
            (1, 1024, 10, false)
        );
        let a = spec(&[
            "--socket",
            "/tmp/s",
            "--tap",
            "t0",
            "--queues",
            "2",
            "--queue-size",
            "256",
            "--mac",
            "02:00:00:00:00:01",
            "--mtu",
            "9000",
            "--client",
            "--busy-poll-us",
            "0",
        ])
        .unwrap();
        assert_eq!(a.queues, 2);
        assert_eq!(a.mtu, Some(9000));
        assert_eq!(a.mac.unwrap().to_string(), "02:00:00:00:00:01");
        assert!(a.client);
        let a = spec(&["--socket", "/s", "--af-packet", "veth0"]).unwrap();
        assert_eq!(a.host, HostSpec::AfPacket("veth0".into()));
        assert!(!a.mac_filter);
        let mac = ["--mac", "02:00:00:00:00:07"];
        let a = spec(
            &[
                &["--socket", "/s", "--af-packet", "v0", "--mac-filter"][..],
                &mac,
            ]
            .concat(),
        )
        .unwrap();
        assert!(a.mac_filter);
        assert_eq!(a.mac.unwrap().to_string(), "02:00:00:00:00:07");
    }

    #[test]
    fn mac_filter_needs_an_af_packet_port_and_the_guest_mac() {
        let e = spec(&["--socket", "/s", "--af-packet", "v0", "--mac-filter"]).unwrap_err();
        assert!(e.contains("mac_filter needs mac"), "{e}");
        let e = spec(&[
            "--socket",
            "/s",
            "--tap",
            "t0",
            "--mac-filter",
            "--mac",
            "02:00:00:00:00:07",
        ])
        .unwrap_err();
        assert!(e.contains("mac_filter is for af-packet ports"), "{e}");
    }

    #[test]
    fn port_security_needs_the_guest_mac() {
        let a = spec(&["--socket", "/s", "--tap", "t0"]).unwrap();
        assert!(!a.port_security);
        for host in [["--tap", "t0"], ["--af-packet", "v0"]] {
            let base = [&["--socket", "/s"][..], &host, &["--port-security"]].concat();
            let e = spec(&base).unwrap_err();
            assert!(e.contains("port_security needs mac"), "{e}");
            let a = spec(&[&base[..], &["--mac", "02:00:00:00:00:07"]].concat()).unwrap();
            assert!(a.port_security);
        }
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["--socket", "/s", "--tap", "t", "--queues", "0"][..],
            &["--socket", "/s", "--tap", "t", "--queues", "17"],
            &["--socket", "/s", "--tap", "t", "--queue-size", "100"],
            &["--socket", "/s", "--tap", "t", "--mac", "01:00:00:00:00:01"],
            &["--socket", "/s", "--tap", "t", "--mtu", "10"],
            &["--socket", "/s", "--tap", "t", "--socket-mode", "9"],
            &["--socket", "/s"],
            &["--tap", "t"],
            &["--socket", "/s", "--tap", "t", "--af-packet", "eth0"],
            &["--socket", "/s", "--tap", "bad/name"],
        ] {
            assert!(spec(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse(&["--config", "/c.toml", "--socket", "/s"]).is_err());
    }

    #[test]
    fn ctl_subcommands() {
        let a = parse(&["ctl", "--control", "/c", "stats", "vm0"]).unwrap();
        assert!(matches!(
            a.command,
            Some(Command::Ctl(CtlArgs {
                op: CtlOp::Stats { name: Some(_) },
                ..
            }))
        ));
        let a = parse(&["ctl", "add", "--name", "x", "--socket", "/s", "--tap", "t"]).unwrap();
        let Some(Command::Ctl(CtlArgs {
            op: CtlOp::Add { name, port },
            ..
        })) = a.command
        else {
            panic!("not an add");
        };
        assert_eq!(port.to_spec(&name).unwrap().host, HostSpec::Tap("t".into()));
    }
}
