//! What the switch reads from and does to one frame, without syscalls: the Ethernet addresses
//! and 802.1Q tag, a member's VLAN mode (which frames it takes in, which it carries out, tagged
//! or not), and the copy from the sender's iovecs into a receiver's buffer that pushes or pops
//! the tag and fixes the virtio-net header's offsets to match.

use crate::frame::{
    IovReader, IovWriter, VnetHdr, ETH_HLEN, F_NEEDS_CSUM, VLAN_HLEN, VNET_HDR_LEN,
};

use super::fdb::Mac;

/// 802.1Q tag protocol identifier.
pub const TPID_8021Q: u16 = 0x8100;
/// Largest VLAN id (4095 is reserved).
pub const MAX_VLAN: u16 = 4094;

/// The Ethernet facts forwarding needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthInfo {
    /// Destination address.
    pub dst: Mac,
    /// Source address.
    pub src: Mac,
    /// VLAN id of an 802.1Q tag, if the frame carries one.
    pub tag: Option<u16>,
}

impl EthInfo {
    /// Parses the first bytes of a frame (at least [`ETH_HLEN`]; [`ETH_HLEN`] +
    /// [`VLAN_HLEN`] to see a tag). None for a runt.
    pub fn parse(b: &[u8]) -> Option<EthInfo> {
        if b.len() < ETH_HLEN {
            return None;
        }
        let mut dst = [0; 6];
        let mut src = [0; 6];
        dst.copy_from_slice(&b[0..6]);
        src.copy_from_slice(&b[6..12]);
        let tag = match b.get(12..16) {
            Some(t) if u16::from_be_bytes([t[0], t[1]]) == TPID_8021Q => {
                Some(u16::from_be_bytes([t[2], t[3]]) & 0x0fff)
            }
            _ => None,
        };
        Some(EthInfo { dst, src, tag })
    }
}

/// True for group (broadcast and multicast) addresses.
pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// How a member takes part in VLANs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VlanMode {
    /// Untagged frames, all on VLAN `0` (no VLAN given) or on the given VLAN; tagged frames
    /// from the member are refused.
    Access(u16),
    /// Tagged frames of the listed VLANs, both ways; untagged ones are refused.
    Trunk(Vec<u16>),
}

impl Default for VlanMode {
    fn default() -> Self {
        VlanMode::Access(0)
    }
}

impl VlanMode {
    /// The mode for a port's `vlan` / `trunk` settings.
    pub fn of(vlan: Option<u16>, trunk: &[u16]) -> VlanMode {
        if trunk.is_empty() {
            VlanMode::Access(vlan.unwrap_or(0))
        } else {
            VlanMode::Trunk(trunk.to_vec())
        }
    }

    /// The VLAN a frame from this member belongs to, or None when the member may not send it.
    pub fn ingress(&self, tag: Option<u16>) -> Option<u16> {
        match (self, tag) {
            (VlanMode::Access(v), None) => Some(*v),
            (VlanMode::Trunk(allowed), Some(t)) if allowed.contains(&t) => Some(t),
            _ => None,
        }
    }

    /// True when frames of VLAN `vid` go out of this member.
    pub fn carries(&self, vid: u16) -> bool {
        match self {
            VlanMode::Access(v) => *v == vid,
            VlanMode::Trunk(allowed) => allowed.contains(&vid),
        }
    }

    /// True when frames go out of this member tagged.
    pub fn tags(&self) -> bool {
        matches!(self, VlanMode::Trunk(_))
    }
}

/// What a receiver's guest gets as the virtio-net header of a frame copied straight into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxHeader {
    /// This header; the frame is copied as it is (tag edits aside).
    Direct(VnetHdr),
    /// The guest cannot take the frame's segmentation offload: drop it.
    Refused,
    /// The checksum must be completed in software first (a guest without checksum offload):
    /// not on the direct path.
    Complete,
}

/// The header for frame `f` going to a receiver with `offloads`, before the tag edits
/// [`write_edited`] makes: like [`crate::frame::prepare_rx`], without touching the frame.
pub fn rx_header(f: &super::Frame, o: vhost_net_backend::GuestOffloads) -> RxHeader {
    use crate::frame::{gso_ok, strip_unnegotiated};
    let mut h = f.hdr;
    if !gso_ok(h.gso_type, o) {
        return RxHeader::Refused;
    }
    if h.flags & F_NEEDS_CSUM != 0 && !o.csum {
        return RxHeader::Complete;
    }
    strip_unnegotiated(&mut h, o);
    RxHeader::Direct(h)
}

/// Why a frame could not be copied for a receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditError {
    /// The iovecs held fewer bytes than the frame length given.
    Short,
    /// The frame is too short to carry the tag it claims.
    Runt,
}

/// The header a receiver gets for a frame edited by `tagged_in` → `tag_out`: `csum_start` and
/// `hdr_len` move with the bytes before them; and the length change.
fn edited_header(mut hdr: VnetHdr, tagged_in: bool, tag_out: bool) -> (VnetHdr, isize) {
    let delta: isize = match (tagged_in, tag_out) {
        (true, false) => -(VLAN_HLEN as isize),
        (false, true) => VLAN_HLEN as isize,
        _ => 0,
    };
    if delta != 0 {
        let shift = |v: u16| u16::try_from((v as isize + delta).max(0)).unwrap_or(u16::MAX);
        if hdr.flags & F_NEEDS_CSUM != 0 {
            hdr.csum_start = shift(hdr.csum_start);
        }
        if hdr.hdr_len != 0 {
            hdr.hdr_len = shift(hdr.hdr_len);
        }
    }
    (hdr, delta)
}

/// Writes a frame of `frame_len` bytes (after a virtio-net header the reader has already
/// passed) to `w` as `[virtio_net_hdr][frame]`: `hdr` (edited, see below) padded with zeros to
/// `hdr_len` bytes, then the frame copied straight from the reader, tagged with `vid` when
/// `tag_out` and with its tag removed when it had one (`tagged_in`) and must leave untagged.
/// The header's `csum_start` and `hdr_len` move with the bytes before them. Returns the length
/// written.
///
/// # Safety
/// The reader's iovecs must be valid for reads and the writer's for writes, for their whole
/// lengths, and must not overlap.
#[allow(clippy::too_many_arguments)]
pub unsafe fn write_edited(
    reader: &mut IovReader<'_>,
    hdr: VnetHdr,
    frame_len: usize,
    tagged_in: bool,
    tag_out: Option<u16>,
    hdr_len: usize,
    w: &mut IovWriter<'_>,
) -> Result<usize, EditError> {
    if frame_len < ETH_HLEN || (tagged_in && frame_len < ETH_HLEN + VLAN_HLEN) {
        return Err(EditError::Runt);
    }
    let (hdr, delta) = edited_header(hdr, tagged_in, tag_out.is_some());
    let pad = [0u8; 2];
    let mut macs = [0u8; 12];
    let mut old = [0u8; VLAN_HLEN];
    // SAFETY: the caller vouches for both sides' iovecs; the small arrays are ours.
    unsafe {
        if !(w.put(&hdr.to_bytes()) && w.put(&pad[..hdr_len.saturating_sub(VNET_HDR_LEN).min(2)])) {
            return Err(EditError::Short);
        }
        if reader.read(&mut macs) != 12 || !w.put(&macs) {
            return Err(EditError::Short);
        }
        let mut rest = frame_len - 12;
        if tagged_in {
            if reader.read(&mut old) != VLAN_HLEN {
                return Err(EditError::Short);
            }
            rest -= VLAN_HLEN;
        }
        if let Some(vid) = tag_out {
            // Keep the priority bits of a tag the frame had, set the VLAN.
            let pcp = if tagged_in {
                u16::from_be_bytes([old[2], old[3]]) & 0xf000
            } else {
                0
            };
            let tci = pcp | (vid & 0x0fff);
            let t = TPID_8021Q.to_be_bytes();
            let c = tci.to_be_bytes();
            if !w.put(&[t[0], t[1], c[0], c[1]]) {
                return Err(EditError::Short);
            }
        }
        if !w.put_from(reader, rest) {
            return Err(EditError::Short);
        }
    }
    Ok(hdr_len.clamp(VNET_HDR_LEN, VNET_HDR_LEN + 2) + frame_len.saturating_add_signed(delta))
}

/// [`write_edited`] into `out`, as `[10-byte virtio_net_hdr][frame]` (the inbox format);
/// returns the edited header.
///
/// # Safety
/// The reader's iovecs must be valid for reads for their whole length.
pub unsafe fn copy_edited(
    reader: &mut IovReader<'_>,
    hdr: VnetHdr,
    frame_len: usize,
    tagged_in: bool,
    tag_out: Option<u16>,
    out: &mut Vec<u8>,
) -> Result<VnetHdr, EditError> {
    let (edited, delta) = edited_header(hdr, tagged_in, tag_out.is_some());
    out.clear();
    out.resize(VNET_HDR_LEN + frame_len.saturating_add_signed(delta), 0);
    let iov = [libc::iovec {
        iov_base: out.as_mut_ptr().cast(),
        iov_len: out.len(),
    }];
    let mut w = IovWriter::new(&iov);
    // SAFETY: `iov` covers `out`, ours; the caller vouches for the reader.
    unsafe {
        write_edited(
            reader,
            hdr,
            frame_len,
            tagged_in,
            tag_out,
            VNET_HDR_LEN,
            &mut w,
        )
    }?;
    Ok(edited)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }
    }

    fn frame(tag: Option<u16>) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        if let Some(v) = tag {
            f.extend_from_slice(&[0x81, 0x00, 0xa0 | (v >> 8) as u8, v as u8]);
        }
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend((0..50).map(|i| i as u8));
        f
    }

    #[test]
    fn parses_addresses_and_tags() {
        let e = EthInfo::parse(&frame(Some(42))).unwrap();
        assert_eq!(e.dst, [0xff; 6]);
        assert_eq!(e.src, [2, 0, 0, 0, 0, 1]);
        assert_eq!(e.tag, Some(42));
        assert_eq!(EthInfo::parse(&frame(None)).unwrap().tag, None);
        assert!(EthInfo::parse(&[0; 13]).is_none());
        assert!(is_group(&e.dst) && !is_group(&e.src));
    }

    #[test]
    fn vlan_modes_take_and_carry() {
        let access = VlanMode::of(Some(10), &[]);
        assert_eq!(access.ingress(None), Some(10));
        assert_eq!(access.ingress(Some(10)), None);
        assert!(access.carries(10) && !access.carries(20) && !access.tags());
        let trunk = VlanMode::of(None, &[10, 20]);
        assert_eq!(trunk.ingress(Some(20)), Some(20));
        assert_eq!(trunk.ingress(Some(30)), None);
        assert_eq!(trunk.ingress(None), None);
        assert!(trunk.carries(20) && trunk.tags());
        assert_eq!(VlanMode::default().ingress(None), Some(0));
    }

    /// Runs [`copy_edited`] over `parts` (one iovec each).
    fn edit(
        parts: &[&[u8]],
        hdr: VnetHdr,
        len: usize,
        tagged_in: bool,
        tag_out: Option<u16>,
    ) -> Result<(VnetHdr, Vec<u8>), EditError> {
        let v: Vec<libc::iovec> = parts.iter().map(|p| iov(p)).collect();
        let mut out = Vec::new();
        // SAFETY: the iovecs point into the borrowed `parts`, live for the call.
        let h = unsafe {
            copy_edited(
                &mut IovReader::new(&v),
                hdr,
                len,
                tagged_in,
                tag_out,
                &mut out,
            )
        }?;
        Ok((h, out))
    }

    #[test]
    fn copies_push_pop_and_keep_tags_with_offsets() {
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            hdr_len: 54,
            ..VnetHdr::default()
        };
        let plain = frame(None);
        let tagged = frame(Some(7));

        // Push.
        let (h, out) = edit(&[&plain], hdr, plain.len(), false, Some(7)).unwrap();
        let mut pushed = frame(Some(7));
        pushed[14] &= 0x0f; // a pushed tag has priority 0
        assert_eq!(&out[VNET_HDR_LEN..], &pushed[..]);
        assert_eq!((h.csum_start, h.hdr_len), (38, 58));

        // Pop.
        let (h, out) = edit(&[&tagged], h, tagged.len(), true, None).unwrap();
        assert_eq!(&out[VNET_HDR_LEN..], &plain[..]);
        assert_eq!((h.csum_start, h.hdr_len), (34, 54));

        // Trunk to trunk keeps the tag (and its priority bits); split iovecs work.
        let parts = [&tagged[..5], &tagged[5..20], &tagged[20..]];
        let (h2, out) = edit(&parts, hdr, tagged.len(), true, Some(7)).unwrap();
        assert_eq!(&out[VNET_HDR_LEN..], &tagged[..]);
        assert_eq!(h2, hdr);

        // Short iovecs and runts are refused.
        assert_eq!(
            edit(&[&plain[..20]], hdr, plain.len(), false, None).unwrap_err(),
            EditError::Short
        );
        assert_eq!(
            edit(&[&plain[..20]], hdr, 15, true, None).unwrap_err(),
            EditError::Runt
        );
    }
}
