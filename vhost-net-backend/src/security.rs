//! Port security: the guest's TX frames must carry the port's MAC as Ethernet source address.
//!
//! The checked bytes are copied out of guest memory, and the host port is handed that copy
//! followed by the rest of the frame in place: a guest that rewrites the address after the
//! check (from another vCPU) cannot get a different one sent. Each copy stays untouched for the
//! next [`HEAD_COPIES`]` - 1` checks, so a host queue that reads a burst's frames only in its
//! `flush` (`HostQueue::flush_before_release`) finds every frame's own checked start.

use crate::chain::read_at;
use crate::features::VNET_HDR_LEN_V1;

/// Ethernet destination and source addresses.
const ETH_ADDRS: usize = 12;
/// The longest virtio-net header and the two addresses: the bytes copied and checked.
const MAX_HEAD: usize = VNET_HDR_LEN_V1 + ETH_ADDRS;

/// Checked frame starts kept at once: at least the frames of one TX burst.
pub const HEAD_COPIES: usize = 64;

/// Checks the Ethernet source address of guest frames against one MAC.
pub struct SourceCheck {
    mac: [u8; 6],
    /// The checked starts of the last [`HEAD_COPIES`] frames (virtio-net header, destination,
    /// source), used in turn.
    heads: Box<[[u8; MAX_HEAD]; HEAD_COPIES]>,
    /// The slot of `heads` the next check fills.
    next: usize,
    /// The iovecs of the current frame: `head`, then the guest's past it.
    iov: Vec<libc::iovec>,
}

// SAFETY: `iov` holds pointers only between one `check` and the send that uses its result (one
// worker thread); it is rebuilt by every `check`.
unsafe impl Send for SourceCheck {}

impl SourceCheck {
    /// A check for frames from `mac`.
    pub fn new(mac: [u8; 6]) -> Self {
        SourceCheck {
            mac,
            heads: Box::new([[0; MAX_HEAD]; HEAD_COPIES]),
            next: 0,
            iov: Vec::with_capacity(8),
        }
    }

    /// The MAC frames must come from.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// For a frame in `iov` (virtio-net header of `hdr_len` bytes first): the iovecs to send it
    /// with, whose first `hdr_len + 12` bytes are the copy checked here; `None` when the source
    /// address is not the port's MAC, or the frame is too short to have one.
    ///
    /// The result points into `self` and into the memory of `iov`; it is valid while both are.
    /// The copy its first iovec points to keeps its bytes for the next [`HEAD_COPIES`]` - 1`
    /// checks.
    ///
    /// # Safety
    /// Every entry of `iov` must describe memory valid for reads.
    pub unsafe fn check(&mut self, iov: &[libc::iovec], hdr_len: usize) -> Option<&[libc::iovec]> {
        let n = hdr_len + ETH_ADDRS;
        let slot = self.next;
        let head = self.heads[slot].get_mut(..n)?;
        // SAFETY: the caller vouches for the iovecs.
        if !unsafe { read_at(iov, 0, head) } || head[hdr_len + 6..] != self.mac {
            return None;
        }
        self.next = (slot + 1) % HEAD_COPIES;
        self.iov.clear();
        self.iov.push(libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: n,
        });
        let mut skip = n;
        for v in iov {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            self.iov.push(libc::iovec {
                iov_base: v.iov_base.cast::<u8>().wrapping_add(skip).cast(),
                iov_len: v.iov_len - skip,
            });
            skip = 0;
        }
        Some(&self.iov)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

    fn iovec(b: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }
    }

    /// The bytes `iov` describes.
    fn gather(iov: &[libc::iovec]) -> Vec<u8> {
        iov.iter()
            // SAFETY: the tests' iovecs describe live local buffers (or `SourceCheck::head`).
            .flat_map(|v| unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) })
            .copied()
            .collect()
    }

    fn frame(hdr_len: usize, src: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0u8; hdr_len];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5, 1, 2, 3, 4]);
        f
    }

    #[test]
    fn own_source_passes_whole_and_others_are_refused() {
        let mut c = SourceCheck::new(MAC);
        for hdr_len in [10, 12] {
            let mut f = frame(hdr_len, MAC);
            let want = f.clone();
            // Every split of the frame in two, including inside the header and the address.
            for cut in 0..f.len() {
                let (a, b) = f.split_at_mut(cut);
                let iov = [iovec(a), iovec(b)];
                // SAFETY: the iovecs describe the live local frame.
                let out = unsafe { c.check(&iov, hdr_len) }.expect("own source refused");
                assert_eq!(out[0].iov_len, hdr_len + 12);
                assert_eq!(gather(out), want, "cut at {cut}");
            }
            let mut f = frame(hdr_len, [2, 0, 0, 0, 0, 8]);
            let (a, b) = f.split_at_mut(hdr_len + 8);
            // SAFETY: as above.
            assert!(unsafe { c.check(&[iovec(a), iovec(b)], hdr_len) }.is_none());
        }
    }

    #[test]
    fn too_short_and_odd_headers_are_refused() {
        let mut c = SourceCheck::new(MAC);
        let mut f = frame(12, MAC);
        // SAFETY: the iovec describes the live local frame.
        assert!(unsafe { c.check(&[iovec(&mut f[..23])], 12) }.is_none());
        // SAFETY: as above.
        assert!(unsafe { c.check(&[], 12) }.is_none());
        // A header longer than any virtio-net header.
        // SAFETY: as above.
        assert!(unsafe { c.check(&[iovec(&mut f)], 64) }.is_none());
    }

    #[test]
    fn the_checked_copy_is_what_is_sent() {
        let mut c = SourceCheck::new(MAC);
        let mut f = frame(12, MAC);
        let iov = [iovec(&mut f)];
        // SAFETY: the iovec describes the live local frame.
        let out = unsafe { c.check(&iov, 12) }.unwrap();
        // The guest rewrites its source after the check: the frame sent keeps the checked one.
        // SAFETY: the iovec points at `f`, alive and not otherwise borrowed here.
        unsafe { *iov[0].iov_base.cast::<u8>().add(12 + 6 + 5) = 9 };
        assert_eq!(gather(out)[12 + 6..12 + 12], MAC);
    }

    #[test]
    fn a_bursts_checked_copies_stay_apart_until_reused() {
        let mut c = SourceCheck::new(MAC);
        // Frames to different destinations: each one's copy keeps its own destination while
        // the next HEAD_COPIES - 1 frames are checked.
        let mut frames: Vec<Vec<u8>> = (0..=HEAD_COPIES)
            .map(|i| {
                let mut f = frame(12, MAC);
                f[12 + 5] = i as u8;
                f
            })
            .collect();
        let mut firsts = Vec::new();
        for f in frames.iter_mut() {
            let iov = [iovec(f)];
            // SAFETY: the iovec describes a live local frame.
            let out = unsafe { c.check(&iov, 12) }.unwrap();
            firsts.push(out[0]);
        }
        for (i, v) in firsts[..HEAD_COPIES].iter().enumerate().skip(1) {
            let dst = gather(std::slice::from_ref(v))[12 + 5];
            assert_eq!(dst, i as u8, "copy {i} kept its frame's destination");
        }
        // The copy of frame 0 was reused by frame HEAD_COPIES.
        assert_eq!(firsts[0].iov_base, firsts[HEAD_COPIES].iov_base);
    }
}
