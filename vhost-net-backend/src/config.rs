//! The device's identity (MAC, MTU, queue pairs) and its virtio-net configuration space.

use std::fmt;
use std::str::FromStr;

use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacParseError {
    /// Not six colon-separated hex octets.
    #[error("invalid MAC address {0:?}: expected six hex octets like 02:00:00:00:00:01")]
    Syntax(String),
    /// The group bit is set: a multicast address cannot be a device address.
    #[error("MAC address {0} is multicast: the lowest bit of the first octet must be 0")]
    Multicast(MacAddr),
}

impl MacAddr {
    /// A locally administered unicast address derived from `seed` (stable for the same seed).
    pub fn local_from_seed(seed: &[u8]) -> Self {
        // FNV-1a: a tiny stable hash, enough to spread addresses.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        MacAddr([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError::Syntax(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        let mac = MacAddr(out);
        if out[0] & 1 != 0 {
            return Err(MacParseError::Multicast(mac));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Smallest MTU accepted (IPv4 minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU accepted: the largest frame still fits a 64 KiB buffer.
pub const MAX_MTU: u16 = 65500;
/// Largest number of queue pairs (each pair is one worker thread).
pub const MAX_QUEUE_PAIRS: usize = 16;
/// Smallest ring size a port accepts (a power of two).
pub const MIN_QUEUE_SIZE: u16 = 64;
/// Largest ring size a port accepts: the split ring's limit.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The daemon's default largest ring size.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// True for a ring size a port accepts: a power of two in
/// [`MIN_QUEUE_SIZE`]`..=`[`MAX_QUEUE_SIZE`].
pub fn queue_size_ok(n: u64) -> bool {
    (u64::from(MIN_QUEUE_SIZE)..=u64::from(MAX_QUEUE_SIZE)).contains(&n) && n.is_power_of_two()
}

/// Static description of one virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Guest MAC address, shown in config space.
    pub mac: MacAddr,
    /// Guest MTU, shown in config space.
    pub mtu: u16,
    /// Number of RX/TX queue pairs.
    pub queue_pairs: usize,
    /// Largest queue size the frontend may choose.
    pub max_queue_size: u16,
    /// Port security: drop guest frames whose Ethernet source address is not `mac`.
    pub port_security: bool,
    /// Offer dirty-page logging (`VHOST_F_LOG_ALL`, `LOG_SHMFD`), which lets the frontend
    /// live-migrate the guest (see [`crate::dirty`]). Off: QEMU refuses to migrate.
    pub live_migration: bool,
}

impl NetConfig {
    /// The `virtio_net_config` layout: `mac[6]`, status, max_virtqueue_pairs, mtu (little endian).
    pub fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        // queue_pairs is bounded by MAX_QUEUE_PAIRS at construction.
        let pairs = u16::try_from(self.queue_pairs).unwrap_or(u16::MAX);
        c[8..10].copy_from_slice(&pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Returns `size` bytes of config space from `offset`, or an empty vector when out of range.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= space.len() => space[start..end].to_vec(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse_and_print() {
        let m: MacAddr = "02:AB:cd:00:11:22".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:cd:00:11:22");
        assert!("02:ab:cd:00:11".parse::<MacAddr>().is_err());
        assert!("02:ab:cd:00:11:22:33".parse::<MacAddr>().is_err());
        assert!("zz:ab:cd:00:11:22".parse::<MacAddr>().is_err());
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacParseError::Multicast(_))
        ));
    }

    #[test]
    fn seeded_mac_is_local_unicast_and_stable() {
        let a = MacAddr::local_from_seed(b"sock-a");
        assert_eq!(a, MacAddr::local_from_seed(b"sock-a"));
        assert_ne!(a, MacAddr::local_from_seed(b"sock-b"));
        assert_eq!(a.0[0] & 0x03, 0x02);
    }

    #[test]
    fn config_space_layout_and_bounds() {
        let c = NetConfig {
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            mtu: 9000,
            queue_pairs: 2,
            max_queue_size: 1024,
            port_security: false,
            live_migration: false,
        };
        assert_eq!(c.read_config(0, 6), vec![2, 0, 0, 0, 0, 1]);
        assert_eq!(c.read_config(6, 2), vec![1, 0]);
        assert_eq!(c.read_config(8, 2), vec![2, 0]);
        assert_eq!(c.read_config(10, 2), 9000u16.to_le_bytes().to_vec());
        assert!(c.read_config(10, 4).is_empty());
        assert!(c.read_config(u32::MAX, 2).is_empty());
    }
}
