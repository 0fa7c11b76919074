//! Per-frame logic without syscalls, shared by the AF_PACKET port and the switch: the 10-byte
//! `struct virtio_net_hdr`, what a guest's negotiated offloads allow in each direction,
//! software checksum completion, VLAN tags, and copying between guest iovecs and buffers.

use vhost_net_backend::GuestOffloads;

/// Size of `struct virtio_net_hdr`, the header AF_PACKET puts before (RX) and expects before
/// (TX) every frame with `PACKET_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;
/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Length of an 802.1Q tag.
pub const VLAN_HLEN: usize = 4;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is partial.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was verified.
pub const F_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_*` values.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation (USO).
pub const GSO_UDP_L4: u8 = 5;
/// ECN flag ORed into `gso_type`.
pub const GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr`, fields in host order (the wire format is little endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers to copy into the linear part of the skb (a hint).
    pub hdr_len: u16,
    /// Segment size for GSO frames.
    pub gso_size: u16,
    /// Where checksumming starts, from the start of the Ethernet header.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the 10-byte little-endian header.
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    /// The 10-byte little-endian header.
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Why a frame from the host cannot be given to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxRefusal {
    /// A GSO frame of a kind the guest did not accept (no GUEST_TSO4/6/USO for it).
    Gso,
    /// The checksum offsets point past the end of the frame.
    CsumOffsets,
}

/// Offset of the transport header of an untagged Ethernet frame carrying IPv4 or IPv6 (without
/// extension headers), if it is one.
fn l4_offset(frame: &[u8]) -> Option<usize> {
    match (frame.get(12..14)?, frame.get(ETH_HLEN)?) {
        ([0x08, 0x00], v) if v >> 4 == 4 => Some(ETH_HLEN + usize::from(v & 0xf) * 4),
        ([0x86, 0xdd], v) if v >> 4 == 6 => {
            matches!(frame.get(ETH_HLEN + 6)?, 6 | 17).then_some(ETH_HLEN + 40)
        }
        _ => None,
    }
}

/// True when a guest with offloads `o` takes frames of `gso_type` (no GSO, or a segmentation
/// offload it negotiated).
pub fn gso_ok(gso_type: u8, o: GuestOffloads) -> bool {
    match gso_type & !GSO_ECN {
        GSO_NONE => true,
        GSO_TCPV4 => o.tso4,
        GSO_TCPV6 => o.tso6,
        GSO_UDP_L4 => o.uso4 || o.uso6,
        _ => false,
    }
}

/// Clears what a guest with offloads `o` did not negotiate: the ECN flag of a GSO type (only
/// its own resegmentation would use it) and `DATA_VALID` (without checksum offload).
pub fn strip_unnegotiated(h: &mut VnetHdr, o: GuestOffloads) {
    if h.gso_type & GSO_ECN != 0 && !o.tso_ecn {
        h.gso_type &= !GSO_ECN;
    }
    if !o.csum {
        h.flags &= !F_DATA_VALID;
    }
}

/// Makes the header and frame acceptable to a guest with offloads `o`, in place: completes a
/// partial checksum in software when the guest takes none, drops flags the guest did not
/// negotiate, and moves the checksum offsets past a VLAN tag that will be reinserted before the
/// payload (`vlan_inserted`; the frame is still untagged here). Kernels differ on whether
/// `csum_start` already counts such a tag; the transport header's position decides, defaulting
/// to untagged. GSO frames of a kind the guest cannot take are refused (they would be larger
/// than its MTU).
pub fn prepare_rx(
    h: &mut VnetHdr,
    frame: &mut [u8],
    o: GuestOffloads,
    vlan_inserted: bool,
) -> Result<(), RxRefusal> {
    if !gso_ok(h.gso_type, o) {
        return Err(RxRefusal::Gso);
    }
    strip_unnegotiated(h, o);
    let mut shift = vlan_inserted;
    if h.flags & F_NEEDS_CSUM != 0 {
        let mut start = usize::from(h.csum_start);
        if vlan_inserted && l4_offset(frame).is_some_and(|l4| l4 + VLAN_HLEN == start) {
            // This kernel already counted the tag.
            start -= VLAN_HLEN;
            shift = false;
        }
        let at = start + usize::from(h.csum_offset);
        if at + 2 > frame.len() {
            return Err(RxRefusal::CsumOffsets);
        }
        if !o.csum {
            complete_checksum(frame, start, at);
            h.flags &= !F_NEEDS_CSUM;
        }
    }
    if shift {
        if h.flags & F_NEEDS_CSUM != 0 {
            h.csum_start = h.csum_start.saturating_add(VLAN_HLEN as u16);
        }
        if h.hdr_len != 0 {
            h.hdr_len = h.hdr_len.saturating_add(VLAN_HLEN as u16);
        }
    }
    Ok(())
}

/// Why a frame from the guest is refused before it reaches the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxRefusal {
    /// A GSO type the device never offered (UFO, USO without host support, unknown values).
    GsoType,
    /// A GSO frame with a zero segment size.
    GsoSize,
    /// The checksum offsets point past the end of the frame.
    CsumOffsets,
}

/// Frames without GSO up to this length are copied whole into the skb's linear area.
///
/// `hdr_len` tells the kernel how much of a TX ring frame to copy into the skb head; the rest
/// becomes page fragments that point into the ring. Those fragments are zero-copy only as far
/// as a NIC: a veth, macvlan or bridge port copies them into freshly allocated pages before
/// the frame crosses into the peer (`skb_orphan_frags_rx`), a page allocation per frame.
/// Copying an MTU-sized frame into the head costs less than that everywhere.
pub const TX_LINEAR_MAX: usize = 2048;

/// Checks a guest header against what the device offered and normalises it for the kernel:
/// `hdr_len` is a hint the kernel refuses when larger than the frame, so it is clamped;
/// frames without GSO up to [`TX_LINEAR_MAX`] get the whole frame as `hdr_len`; and
/// `DATA_VALID` (meaningless on transmit) is cleared.
pub fn prepare_tx(h: &mut VnetHdr, frame_len: usize, uso: bool) -> Result<(), TxRefusal> {
    match h.gso_type & !GSO_ECN {
        GSO_NONE => {}
        GSO_TCPV4 | GSO_TCPV6 => {}
        GSO_UDP_L4 if uso => {}
        _ => return Err(TxRefusal::GsoType),
    }
    if h.gso_type != GSO_NONE && h.gso_size == 0 {
        return Err(TxRefusal::GsoSize);
    }
    if h.flags & F_NEEDS_CSUM != 0
        && usize::from(h.csum_start) + usize::from(h.csum_offset) + 2 > frame_len
    {
        return Err(TxRefusal::CsumOffsets);
    }
    h.flags &= !F_DATA_VALID;
    if usize::from(h.hdr_len) > frame_len || (h.gso_type == GSO_NONE && frame_len <= TX_LINEAR_MAX)
    {
        h.hdr_len = u16::try_from(frame_len).unwrap_or(u16::MAX);
    }
    Ok(())
}

/// One's-complement sum of `data` as big-endian 16-bit words (an odd last byte is padded),
/// not yet folded.
pub fn ones_sum(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        sum += (v >> 48) + ((v >> 32) & 0xffff) + ((v >> 16) & 0xffff) + (v & 0xffff);
    }
    let mut words = chunks.remainder().chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a one's-complement sum to 16 bits.
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Completes a partial checksum like the kernel's `skb_checksum_help`: the field at `at`
/// holds the pseudo-header sum; the one's complement of the sum from `start` to the end of the
/// frame goes there (0 is sent as 0xffff).
pub fn complete_checksum(frame: &mut [u8], start: usize, at: usize) {
    let c = !fold(ones_sum(&frame[start..]));
    let c = if c == 0 { 0xffff } else { c };
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// An 802.1Q/802.1ad tag to put back into a frame whose tag the kernel moved into metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanTag {
    /// Tag protocol identifier (0x8100 or 0x88a8).
    pub tpid: u16,
    /// Tag control information.
    pub tci: u16,
}

impl VlanTag {
    /// The tag as it appears on the wire.
    pub fn to_bytes(self) -> [u8; VLAN_HLEN] {
        let t = self.tpid.to_be_bytes();
        let c = self.tci.to_be_bytes();
        [t[0], t[1], c[0], c[1]]
    }
}

/// Total length of `iov`.
pub fn iov_len(iov: &[libc::iovec]) -> usize {
    iov.iter()
        .map(|v| v.iov_len)
        .fold(0usize, usize::saturating_add)
}

/// Writes consecutive byte runs into a list of iovecs.
pub struct IovWriter<'a> {
    iov: &'a [libc::iovec],
    idx: usize,
    off: usize,
}

impl<'a> IovWriter<'a> {
    /// A writer at the start of `iov`.
    pub fn new(iov: &'a [libc::iovec]) -> Self {
        IovWriter {
            iov,
            idx: 0,
            off: 0,
        }
    }

    /// Where the next byte goes and how many fit there, past exhausted iovecs; none at the
    /// end.
    fn chunk(&mut self) -> Option<(*mut u8, usize)> {
        loop {
            let v = self.iov.get(self.idx)?;
            let room = v.iov_len - self.off;
            if room > 0 {
                // `off < iov_len`: the pointer stays within the iovec.
                return Some((v.iov_base.cast::<u8>().wrapping_add(self.off), room));
            }
            self.idx += 1;
            self.off = 0;
        }
    }

    /// Appends `src`; returns false (having written a prefix) if the iovecs are too short.
    ///
    /// # Safety
    /// Every iovec must be valid for writes for its whole length, and must not overlap `src`.
    pub unsafe fn put(&mut self, mut src: &[u8]) -> bool {
        while !src.is_empty() {
            let Some((dst, room)) = self.chunk() else {
                return false;
            };
            let n = room.min(src.len());
            // SAFETY: `dst` has `room >= n` writable bytes (the caller vouches for the iovec)
            // and the source does not overlap it.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n) };
            self.off += n;
            src = &src[n..];
        }
        true
    }

    /// Copies the next `n` bytes of `r` straight into these iovecs (one copy, no buffer in
    /// between); returns false if either side ran out first.
    ///
    /// # Safety
    /// The writer's iovecs must be valid for writes and the reader's for reads, for their whole
    /// lengths, and must not overlap.
    pub unsafe fn put_from(&mut self, r: &mut IovReader<'_>, mut n: usize) -> bool {
        while n > 0 {
            let Some((dst, room)) = self.chunk() else {
                return false;
            };
            let k = room.min(n);
            // SAFETY: `dst` has `room >= k` writable bytes; the caller vouches for both sides.
            let got = unsafe { r.read_raw(dst, k) };
            self.off += got;
            n -= got;
            if got < k {
                return false;
            }
        }
        true
    }
}

/// Reads consecutive byte runs out of a list of iovecs.
pub struct IovReader<'a> {
    iov: &'a [libc::iovec],
    idx: usize,
    off: usize,
}

impl<'a> IovReader<'a> {
    /// A reader at the start of `iov`.
    pub fn new(iov: &'a [libc::iovec]) -> Self {
        IovReader {
            iov,
            idx: 0,
            off: 0,
        }
    }

    /// Copies the next `len` bytes to `dst` (or skips them when `dst` is null); returns the
    /// number of bytes copied, less than `len` only at the end of the iovecs.
    ///
    /// # Safety
    /// Every iovec must be valid for reads for its whole length; a non-null `dst` must be valid
    /// for writes of `len` bytes and must not overlap the iovecs.
    pub unsafe fn read_raw(&mut self, dst: *mut u8, len: usize) -> usize {
        let mut done = 0;
        while done < len {
            let Some(v) = self.iov.get(self.idx) else {
                break;
            };
            let avail = v.iov_len - self.off;
            if avail == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = avail.min(len - done);
            if !dst.is_null() {
                // SAFETY: the caller guarantees both ranges are valid and disjoint; `off + n`
                // stays within the iovec and `done + n <= len`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.iov_base.cast::<u8>().add(self.off),
                        dst.add(done),
                        n,
                    );
                }
            }
            self.off += n;
            done += n;
        }
        done
    }

    /// Copies the next `dst.len()` bytes into `dst`; returns the number copied.
    ///
    /// # Safety
    /// Every iovec must be valid for reads for its whole length.
    pub unsafe fn read(&mut self, dst: &mut [u8]) -> usize {
        // SAFETY: `dst` is a live, exclusive buffer of its length; the caller vouches for the
        // iovecs.
        unsafe { self.read_raw(dst.as_mut_ptr(), dst.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// UDP fragmentation offload (UFO), never offered to the guest.
    const GSO_UDP: u8 = 3;

    fn iovs(bufs: &mut [Vec<u8>]) -> Vec<libc::iovec> {
        bufs.iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect()
    }

    #[test]
    fn header_round_trip_is_little_endian() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 0x81, 66, 0, 0xa8, 0x05, 34, 0, 16, 0]);
        assert_eq!(VnetHdr::parse(&b), h);
    }

    /// An IPv4/TCP frame whose TCP checksum field holds the pseudo-header sum, as the kernel
    /// hands out CHECKSUM_PARTIAL frames.
    fn partial_tcp_frame(payload: usize) -> (Vec<u8>, u16) {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12] = 0x08;
        f[14] = 0x45;
        let ip_len = (20 + 20 + payload) as u16;
        f[16..18].copy_from_slice(&ip_len.to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34..36].copy_from_slice(&1234u16.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f[46] = 0x50;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let tcp_len = 20 + payload as u64;
        let pseudo = ones_sum(&f[26..34]) + 6 + tcp_len;
        let p = fold(pseudo);
        f[50..52].copy_from_slice(&p.to_be_bytes());
        (f, p)
    }

    /// Verifies a TCP checksum the way a receiver does: the full sum must fold to 0xffff.
    fn tcp_checksum_ok(f: &[u8]) -> bool {
        let tcp_len = (f.len() - 34) as u64;
        let sum = ones_sum(&f[26..34]) + 6 + tcp_len + ones_sum(&f[34..]);
        fold(sum) == 0xffff
    }

    #[test]
    fn partial_checksum_is_completed_for_a_guest_without_csum() {
        for payload in [0usize, 1, 7, 100, 1459] {
            let (mut f, _) = partial_tcp_frame(payload);
            assert!(!tcp_checksum_ok(&f));
            let mut h = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: 34,
                csum_offset: 16,
                ..Default::default()
            };
            prepare_rx(&mut h, &mut f, GuestOffloads::default(), false).unwrap();
            assert!(tcp_checksum_ok(&f), "payload {payload}");
            assert_eq!(h.flags, 0);
        }
    }

    #[test]
    fn partial_checksum_is_left_to_a_guest_with_csum() {
        let (mut f, p) = partial_tcp_frame(10);
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        let o = GuestOffloads {
            csum: true,
            ..Default::default()
        };
        prepare_rx(&mut h, &mut f, o, false).unwrap();
        assert_eq!(h.flags, F_NEEDS_CSUM);
        assert_eq!(&f[50..52], &p.to_be_bytes());
    }

    #[test]
    fn gso_frames_need_the_matching_guest_offload() {
        let mut f = vec![0u8; 100];
        let tso4 = GuestOffloads {
            csum: true,
            tso4: true,
            ..Default::default()
        };
        let mut h = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..Default::default()
        };
        assert_eq!(prepare_rx(&mut h, &mut f, tso4, false), Ok(()));
        for t in [GSO_TCPV6, GSO_UDP, GSO_UDP_L4, 0x42] {
            let mut h = VnetHdr {
                gso_type: t,
                gso_size: 1448,
                ..Default::default()
            };
            assert_eq!(
                prepare_rx(&mut h, &mut f, tso4, false),
                Err(RxRefusal::Gso),
                "{t}"
            );
        }
        let mut h = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..Default::default()
        };
        assert_eq!(
            prepare_rx(&mut h, &mut f, GuestOffloads::default(), false),
            Err(RxRefusal::Gso)
        );
        // ECN is stripped for a guest that did not ask for it.
        let mut h = VnetHdr {
            gso_type: GSO_TCPV4 | GSO_ECN,
            gso_size: 1448,
            ..Default::default()
        };
        prepare_rx(&mut h, &mut f, tso4, false).unwrap();
        assert_eq!(h.gso_type, GSO_TCPV4);
    }

    #[test]
    fn rx_checksum_offsets_are_bounded_and_shifted_for_vlan() {
        let mut f = vec![0u8; 60];
        let csum = GuestOffloads {
            csum: true,
            ..Default::default()
        };
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 50,
            csum_offset: 16,
            ..Default::default()
        };
        assert_eq!(
            prepare_rx(&mut h, &mut f, csum, false),
            Err(RxRefusal::CsumOffsets)
        );
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM | F_DATA_VALID,
            csum_start: 34,
            csum_offset: 6,
            hdr_len: 42,
            ..Default::default()
        };
        prepare_rx(&mut h, &mut f, csum, true).unwrap();
        assert_eq!((h.csum_start, h.csum_offset, h.hdr_len), (38, 6, 46));
        let mut h = VnetHdr {
            flags: F_DATA_VALID,
            ..Default::default()
        };
        prepare_rx(&mut h, &mut f, GuestOffloads::default(), false).unwrap();
        assert_eq!(h.flags, 0);
    }

    #[test]
    fn vlan_checksum_offsets_work_with_either_kernel_convention() {
        let csum = GuestOffloads {
            csum: true,
            ..Default::default()
        };
        // csum_start relative to the untagged frame (34): shifted past the tag.
        let (mut f, _) = partial_tcp_frame(20);
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        prepare_rx(&mut h, &mut f, csum, true).unwrap();
        assert_eq!(h.csum_start, 38);
        // Already counting the tag (38): kept, and completion uses the untagged position.
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 38,
            csum_offset: 16,
            ..Default::default()
        };
        prepare_rx(&mut h, &mut f, csum, true).unwrap();
        assert_eq!(h.csum_start, 38);
        let (mut f, _) = partial_tcp_frame(20);
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 38,
            csum_offset: 16,
            ..Default::default()
        };
        prepare_rx(&mut h, &mut f, GuestOffloads::default(), true).unwrap();
        assert!(tcp_checksum_ok(&f));
        // IPv6 and non-IP frames.
        let mut v6 = vec![0u8; 100];
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        v6[14] = 0x60;
        v6[20] = 6;
        assert_eq!(l4_offset(&v6), Some(54));
        v6[20] = 0;
        assert_eq!(l4_offset(&v6), None);
        assert_eq!(l4_offset(&[0u8; 10]), None);
    }

    #[test]
    fn tx_headers_are_checked_and_normalised() {
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM | F_DATA_VALID,
            gso_type: GSO_TCPV6,
            gso_size: 1440,
            hdr_len: 200,
            csum_start: 54,
            csum_offset: 16,
        };
        prepare_tx(&mut h, 100, false).unwrap();
        assert_eq!((h.flags, h.hdr_len), (F_NEEDS_CSUM, 100));
        let bad = [
            (GSO_UDP, 1400, 0, TxRefusal::GsoType),
            (GSO_UDP_L4, 1400, 0, TxRefusal::GsoType),
            (9, 1400, 0, TxRefusal::GsoType),
            (GSO_TCPV4, 0, 0, TxRefusal::GsoSize),
            (GSO_NONE, 0, F_NEEDS_CSUM, TxRefusal::CsumOffsets),
        ];
        for (gso_type, gso_size, flags, why) in bad {
            let mut h = VnetHdr {
                flags,
                gso_type,
                gso_size,
                csum_start: 90,
                csum_offset: 9,
                ..Default::default()
            };
            assert_eq!(prepare_tx(&mut h, 100, false), Err(why));
        }
        let mut h = VnetHdr {
            gso_type: GSO_UDP_L4,
            gso_size: 1400,
            ..Default::default()
        };
        assert_eq!(prepare_tx(&mut h, 100, true), Ok(()));
    }

    #[test]
    fn tx_frames_without_gso_go_linear_up_to_the_limit() {
        let plain = VnetHdr {
            hdr_len: 14,
            ..Default::default()
        };
        for (len, want) in [
            (60, 60),
            (1514, 1514),
            (TX_LINEAR_MAX, TX_LINEAR_MAX as u16),
            (TX_LINEAR_MAX + 1, 14),
            (9014, 14),
        ] {
            let mut h = plain;
            prepare_tx(&mut h, len, false).unwrap();
            assert_eq!(h.hdr_len, want, "frame of {len} bytes");
        }
        // GSO frames keep the guest's header length: their payload stays in page fragments.
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            hdr_len: 66,
            csum_start: 34,
            csum_offset: 16,
        };
        prepare_tx(&mut h, 1500, false).unwrap();
        assert_eq!(h.hdr_len, 66);
    }

    #[test]
    fn checksum_sum_handles_odd_lengths() {
        assert_eq!(ones_sum(&[0x12]), 0x1200);
        assert_eq!(ones_sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
        let data: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
        let simple: u64 = data
            .chunks(2)
            .map(|c| u64::from(c[0]) << 8 | u64::from(*c.get(1).unwrap_or(&0)))
            .sum();
        assert_eq!(fold(ones_sum(&data)), fold(simple));
    }

    #[test]
    fn iov_writer_and_reader_cross_buffer_boundaries() {
        let mut bufs = vec![vec![0u8; 3], vec![], vec![0u8; 5], vec![0u8; 4]];
        let iov = iovs(&mut bufs);
        assert_eq!(iov_len(&iov), 12);
        let mut w = IovWriter::new(&iov);
        // SAFETY: the iovecs point into `bufs`, alive and untouched for the block.
        unsafe {
            assert!(w.put(&[1, 2]));
            assert!(w.put(&[3, 4, 5, 6]));
            assert!(w.put(&[7, 8, 9, 10, 11, 12]));
            assert!(!w.put(&[13]));
        }
        assert_eq!(bufs[0], [1, 2, 3]);
        assert_eq!(bufs[2], [4, 5, 6, 7, 8]);
        assert_eq!(bufs[3], [9, 10, 11, 12]);

        let iov = iovs(&mut bufs);
        let mut r = IovReader::new(&iov);
        let mut a = [0u8; 2];
        let mut b = [0u8; 20];
        // SAFETY: as above.
        unsafe {
            assert_eq!(r.read(&mut a), 2);
            assert_eq!(r.read_raw(std::ptr::null_mut(), 3), 3);
            assert_eq!(r.read(&mut b), 7);
        }
        assert_eq!(a, [1, 2]);
        assert_eq!(&b[..7], &[6, 7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn vlan_tag_bytes() {
        let t = VlanTag {
            tpid: 0x8100,
            tci: 0x2005,
        };
        assert_eq!(t.to_bytes(), [0x81, 0x00, 0x20, 0x05]);
    }
}
