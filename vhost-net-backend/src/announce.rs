//! The frame a device sends on its guest's behalf after a live migration: a broadcast reverse
//! ARP request from the guest's MAC (what QEMU itself sends for NICs it emulates). Switches and
//! bridges on the host side learn from its source address that the guest is now behind this
//! port; the frame needs no IP address, so it works for any guest.

/// EtherType of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Shortest Ethernet frame without its FCS: the RARP payload is padded to this.
const MIN_FRAME: usize = 60;
/// RARP operation "request reverse".
const OP_REQUEST_REVERSE: u16 = 3;

/// A broadcast RARP "request reverse" frame from `mac`, asking for `mac`'s own address.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    // Hardware Ethernet (1), protocol IPv4, address lengths 6 and 4.
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&OP_REQUEST_REVERSE.to_be_bytes());
    // Sender and target: the guest's MAC, no IP address.
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(MIN_FRAME, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
        assert!(f[42..].iter().all(|&b| b == 0));
    }
}
