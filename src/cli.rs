//! Command-line contract of the `vhost-pump` daemon. Other tools and tests depend on these flags.

use std::path::PathBuf;

use clap::Parser;
use vhost_net_backend::MacAddr;

/// Serve a VM's virtio-net device over a vhost-user socket from a host tap or interface.
#[derive(Debug, Parser)]
#[command(name = "vhost-pump", version, about)]
#[command(group(clap::ArgGroup::new("host_port").required(true).args(["tap", "af_packet"])))]
pub struct Args {
    /// vhost-user socket path (listened on, or connected to with --client).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Tap device to attach to, created in the current network namespace if missing.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,

    /// Existing host interface (veth, macvlan, NIC) to attach to with AF_PACKET sockets.
    #[arg(long, value_name = "IFNAME")]
    pub af_packet: Option<String>,

    /// Number of RX/TX queue pairs (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub queues: u16,

    /// Largest virtqueue size the frontend may use (a power of two).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Guest MAC address [default: a stable locally administered address derived from --socket].
    #[arg(long, value_name = "MAC")]
    pub mac: Option<MacAddr>,

    /// MTU shown to the guest and set on the host port [default: the port's MTU].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(68..=65500))]
    pub mtu: Option<u16>,

    /// Connect to the socket (the VMM listens) instead of listening; reconnect forever.
    #[arg(long)]
    pub client: bool,

    /// After work, keep polling this many microseconds before sleeping (0 = never poll).
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub busy_poll_us: u32,

    /// Log filter: error, warn, info, debug, trace (or a tracing filter directive).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(64..=32768).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two between 64 and 32768"));
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

    #[test]
    fn defaults_and_flags() {
        let a = parse(&["--socket", "/tmp/s", "--tap", "t0"]).unwrap();
        assert_eq!(
            (a.queues, a.queue_size, a.busy_poll_us, a.client),
            (1, 1024, 50, false)
        );
        let a = parse(&[
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
        let a = parse(&["--socket", "/s", "--af-packet", "veth0"]).unwrap();
        assert_eq!((a.tap, a.af_packet.as_deref()), (None, Some("veth0")));
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["--socket", "/s", "--tap", "t", "--queues", "0"][..],
            &["--socket", "/s", "--tap", "t", "--queues", "17"],
            &["--socket", "/s", "--tap", "t", "--queue-size", "100"],
            &["--socket", "/s", "--tap", "t", "--mac", "01:00:00:00:00:01"],
            &["--socket", "/s", "--tap", "t", "--mtu", "10"],
            &["--socket", "/s"],
            &["--tap", "t"],
            &["--socket", "/s", "--tap", "t", "--af-packet", "eth0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
