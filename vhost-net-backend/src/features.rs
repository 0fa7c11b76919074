//! Virtio-net feature bits this device offers, and what the guest's choice means for the host port.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of `virtio_net_hdr_v1` (with `num_buffers`), used with VERSION_1 or MRG_RXBUF.
pub const VNET_HDR_LEN_V1: usize = 12;
/// Size of the legacy `virtio_net_hdr` without `num_buffers`.
pub const VNET_HDR_LEN_LEGACY: usize = 10;
/// Offset of `num_buffers` inside `virtio_net_hdr_v1`.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame the device ever moves: a 64 KiB GSO frame plus an Ethernet and a VLAN header.
pub const MAX_GSO_FRAME: usize = 65535 + 14 + 4;

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Offloads the host port can take over from the guest (the guest's GUEST_* choice, seen from the
/// host: what the port may hand to the guest unsegmented or without a checksum).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestOffloads {
    /// Partial checksums may be delivered (GUEST_CSUM).
    pub csum: bool,
    /// TCP over IPv4 segmentation offload (GUEST_TSO4).
    pub tso4: bool,
    /// TCP over IPv6 segmentation offload (GUEST_TSO6).
    pub tso6: bool,
    /// ECN bit on TSO frames (GUEST_ECN).
    pub tso_ecn: bool,
    /// UDP segmentation offload over IPv4 (GUEST_USO4).
    pub uso4: bool,
    /// UDP segmentation offload over IPv6 (GUEST_USO6).
    pub uso6: bool,
}

impl GuestOffloads {
    /// Checksum and TCP segmentation offloads (with ECN), no UDP segmentation: what a Linux
    /// guest usually negotiates.
    pub const TCP: GuestOffloads = GuestOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        tso_ecn: true,
        uso4: false,
        uso6: false,
    };

    /// Derives the offloads from the guest's acked virtio-net features.
    pub fn from_features(acked: u64) -> Self {
        let has = |b: u32| acked & bit(b) != 0;
        let csum = has(VIRTIO_NET_F_GUEST_CSUM);
        // The spec only allows segmentation offloads together with checksum offload.
        GuestOffloads {
            csum,
            tso4: csum && has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: csum && has(VIRTIO_NET_F_GUEST_TSO6),
            tso_ecn: csum && has(VIRTIO_NET_F_GUEST_ECN),
            uso4: csum && has(VIRTIO_NET_F_GUEST_USO4),
            uso6: csum && has(VIRTIO_NET_F_GUEST_USO6),
        }
    }

    /// True when the guest accepts frames larger than its MTU (any segmentation offload).
    pub fn any_gso(&self) -> bool {
        self.tso4 || self.tso6 || self.uso4 || self.uso6
    }
}

/// What the host side can do, which narrows the features offered to the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCapabilities {
    /// The host port can deliver and accept USO frames (Linux >= 6.2 taps).
    pub uso: bool,
    /// The host port cannot take TCP segmentation offload frames from the guest (an
    /// AF_PACKET port on an interface without TSO: the kernel drops GSO frames sent past the
    /// qdisc to such a device), so HOST_TSO4/6 and HOST_ECN are not offered and the guest
    /// segments itself.
    pub no_host_tso: bool,
}

/// `VHOST_F_LOG_ALL` (bit 26): the frontend may ask for every guest memory write to be logged
/// (live migration, see [`crate::dirty`]). Offered, with the `LOG_SHMFD` protocol feature, only
/// when [`crate::NetConfig::live_migration`] is set.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// Virtio-net (and transport) features offered for a device with `queue_pairs` queue pairs.
pub fn offered_features(queue_pairs: usize, caps: HostCapabilities) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_NOTIFY_ON_EMPTY)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_MTU)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if !caps.no_host_tso {
        f |= bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6) | bit(VIRTIO_NET_F_HOST_ECN);
    }
    if caps.uso {
        f |= bit(VIRTIO_NET_F_GUEST_USO4)
            | bit(VIRTIO_NET_F_GUEST_USO6)
            | bit(VIRTIO_NET_F_HOST_USO);
    }
    if queue_pairs > 1 {
        f |= bit(VIRTIO_NET_F_MQ);
    }
    f
}

/// vhost-user protocol features this backend speaks.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        // SEND_RARP: announce the guest after a migration (answered by the daemon's relay,
        // see NetBackend::announce).
        | VhostUserProtocolFeatures::RARP
}

/// Length of the per-frame virtio-net header for the acked features.
pub fn vnet_hdr_len(acked: u64) -> usize {
    if acked & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        VNET_HDR_LEN_V1
    } else {
        VNET_HDR_LEN_LEGACY
    }
}

/// True when the guest acked mergeable receive buffers.
pub fn mrg_rxbuf(acked: u64) -> bool {
    acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segmentation_needs_checksum() {
        let acked = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(
            GuestOffloads::from_features(acked),
            GuestOffloads::default()
        );
        let o = GuestOffloads::from_features(acked | bit(VIRTIO_NET_F_GUEST_CSUM));
        assert!(o.csum && o.tso4 && o.tso6 && !o.uso4 && o.any_gso());
    }

    #[test]
    fn mq_and_uso_follow_config() {
        let one = offered_features(1, HostCapabilities::default());
        assert_eq!(one & bit(VIRTIO_NET_F_MQ), 0);
        assert_eq!(one & bit(VIRTIO_NET_F_HOST_USO), 0);
        let two = offered_features(
            2,
            HostCapabilities {
                uso: true,
                ..Default::default()
            },
        );
        assert_ne!(two & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(two & bit(VIRTIO_NET_F_GUEST_USO4), 0);
    }

    #[test]
    fn host_tso_is_offered_unless_the_port_cannot_take_it() {
        let tso = bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6);
        assert_eq!(offered_features(1, HostCapabilities::default()) & tso, tso);
        let no = offered_features(
            1,
            HostCapabilities {
                no_host_tso: true,
                ..Default::default()
            },
        );
        assert_eq!(no & (tso | bit(VIRTIO_NET_F_HOST_ECN)), 0);
        // The guest still gets checksum offload and its own receive offloads.
        assert_ne!(no & bit(VIRTIO_NET_F_CSUM), 0);
        assert_ne!(no & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
    }

    #[test]
    fn header_length() {
        assert_eq!(vnet_hdr_len(bit(VIRTIO_F_VERSION_1)), 12);
        assert_eq!(vnet_hdr_len(bit(VIRTIO_NET_F_MRG_RXBUF)), 12);
        assert_eq!(vnet_hdr_len(0), 10);
    }
}
