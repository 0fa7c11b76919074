//! Turns a guest descriptor chain into host iovecs, checking every descriptor against guest
//! memory. This is the only place guest addresses become host pointers.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::dirty::GuestMemoryMmap;

use crate::stats::DropReason;

/// Most descriptors one chain may have (Linux uses at most MAX_SKB_FRAGS + 2 per frame).
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Direction the device uses a chain in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device reads the buffers (TX: guest → host).
    Read,
    /// The device writes the buffers (RX: host → guest).
    Write,
}

/// Appends host iovecs for every descriptor of `chain` to `iov` and returns the chain's total
/// length. On error, `iov` is restored to its previous length.
///
/// Rejected: descriptors of the wrong direction, addresses outside guest memory or overflowing,
/// chains that end in a broken `next` link (loops, bad indexes, bad indirect tables: the
/// iterator stops early while the last descriptor still says "next"), and chains with more than
/// [`MAX_CHAIN_DESCRIPTORS`] descriptors or longer than `max_len` bytes.
pub fn collect_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    access: Access,
    max_len: usize,
    iov: &mut Vec<libc::iovec>,
) -> Result<usize, DropReason>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let start = iov.len();
    let result = collect_inner(chain, mem, access, max_len, iov);
    if result.is_err() {
        iov.truncate(start);
    }
    result
}

fn collect_inner<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    access: Access,
    max_len: usize,
    iov: &mut Vec<libc::iovec>,
) -> Result<usize, DropReason>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut total = 0usize;
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(DropReason::BadChain);
        }
        if desc.is_write_only() != (access == Access::Write) {
            return Err(DropReason::WrongDirection);
        }
        last_has_next = desc.has_next();
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        total = total.checked_add(len).ok_or(DropReason::Oversize)?;
        if total > max_len {
            return Err(DropReason::Oversize);
        }
        desc.addr()
            .0
            .checked_add(len as u64)
            .ok_or(DropReason::BadAddress)?;
        let mut covered = 0usize;
        for slice in mem.get_slices(GuestAddress(desc.addr().0), len) {
            let slice = slice.map_err(|_| DropReason::BadAddress)?;
            // The pointer stays valid for as long as the caller keeps `mem` (the mapping) alive;
            // plain mmap regions need no guard beyond that.
            let base = slice.ptr_guard_mut().as_ptr();
            covered += slice.len();
            iov.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: slice.len(),
            });
        }
        if covered != len {
            return Err(DropReason::BadAddress);
        }
    }
    if count == 0 || last_has_next {
        return Err(DropReason::BadChain);
    }
    Ok(total)
}

/// Writes `bytes` at byte `offset` of the buffer described by `iov`. Returns false when the
/// buffer is too short.
///
/// # Safety
/// Every entry of `iov` must describe memory valid for writes.
pub unsafe fn write_at(iov: &[libc::iovec], mut offset: usize, bytes: &[u8]) -> bool {
    let mut src = bytes;
    for v in iov {
        if src.is_empty() {
            break;
        }
        if offset >= v.iov_len {
            offset -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - offset).min(src.len());
        for (i, b) in src[..n].iter().enumerate() {
            // SAFETY: offset + i < iov_len, inside a buffer the caller guarantees writable.
            // Guest memory is shared with another process, so write volatile bytes.
            unsafe { std::ptr::write_volatile(v.iov_base.cast::<u8>().add(offset + i), *b) };
        }
        src = &src[n..];
        offset = 0;
    }
    src.is_empty()
}

/// Reads `out.len()` bytes from byte `offset` of the buffer described by `iov`. Returns false
/// when the buffer is too short (`out` is then partly filled).
///
/// # Safety
/// Every entry of `iov` must describe memory valid for reads.
pub unsafe fn read_at(iov: &[libc::iovec], mut offset: usize, out: &mut [u8]) -> bool {
    let mut dst = &mut out[..];
    for v in iov {
        if dst.is_empty() {
            break;
        }
        if offset >= v.iov_len {
            offset -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - offset).min(dst.len());
        for (i, b) in dst[..n].iter_mut().enumerate() {
            // SAFETY: offset + i < iov_len, inside a buffer the caller guarantees readable.
            // Guest memory is shared with another process, so read volatile bytes.
            *b = unsafe { std::ptr::read_volatile(v.iov_base.cast::<u8>().add(offset + i)) };
        }
        dst = &mut dst[n..];
        offset = 0;
    }
    dst.is_empty()
}

#[cfg(test)]
mod tests {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::Bytes;

    use super::*;
    use crate::testing::*;

    /// Writes `segs` as one chain in a fresh 128-entry queue at guest address 0 and collects it.
    fn collect(
        gm: &GuestMemoryMmap,
        segs: &[(u64, u32, u16)],
        access: Access,
        max_len: usize,
        iov: &mut Vec<libc::iovec>,
    ) -> Result<usize, DropReason> {
        let mut d = Driver::new(gm, 0, 128, RX_BUFS);
        d.add_chain(segs);
        let mut q: Queue = d.mock.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(gm).unwrap();
        collect_chain(chain, gm, access, max_len, iov)
    }

    fn host(gm: &GuestMemoryMmap, addr: u64) -> *mut libc::c_void {
        gm.get_host_address(GuestAddress(addr)).unwrap().cast()
    }

    fn dummy() -> libc::iovec {
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 7,
        }
    }

    #[test]
    fn descriptors_become_host_iovecs_appended_to_the_list() {
        let (gm, _) = guest_memory();
        let mut iov = vec![dummy()];
        let a = 0x20_0000;
        let b = 0x30_0000;
        let segs = [(a, 12, WRITE), (a + 12, 0, WRITE), (b, 100, WRITE)];
        assert_eq!(
            collect(&gm, &segs, Access::Write, usize::MAX, &mut iov),
            Ok(112)
        );
        assert_eq!(iov.len(), 3);
        assert_eq!((iov[1].iov_base, iov[1].iov_len), (host(&gm, a), 12));
        assert_eq!((iov[2].iov_base, iov[2].iov_len), (host(&gm, b), 100));
    }

    #[test]
    fn a_descriptor_across_two_regions_gives_two_iovecs() {
        let gm = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
        ])
        .unwrap();
        let mut iov = Vec::new();
        let at = 0x10_0000 - 8;
        assert_eq!(
            collect(&gm, &[(at, 16, 0)], Access::Read, 16, &mut iov),
            Ok(16)
        );
        assert_eq!(iov.len(), 2);
        assert_eq!((iov[0].iov_base, iov[0].iov_len), (host(&gm, at), 8));
        assert_eq!((iov[1].iov_base, iov[1].iov_len), (host(&gm, 0x10_0000), 8));
    }

    #[test]
    fn a_descriptor_over_a_hole_is_a_bad_address_and_the_list_is_restored() {
        let gm = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        let mut iov = vec![dummy()];
        let segs = [(0x8_0000, 64, 0), (0x10_0000 - 8, 16, 0)];
        assert_eq!(
            collect(&gm, &segs, Access::Read, usize::MAX, &mut iov),
            Err(DropReason::BadAddress)
        );
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_len, 7);
        // Entirely in the hole.
        assert_eq!(
            collect(
                &gm,
                &[(0x18_0000, 1, 0)],
                Access::Read,
                usize::MAX,
                &mut iov
            ),
            Err(DropReason::BadAddress)
        );
    }

    #[test]
    fn direction_is_enforced_both_ways() {
        let (gm, _) = guest_memory();
        let mut iov = Vec::new();
        let a = 0x20_0000;
        let mixed = [(a, 12, 0), (a + 12, 12, WRITE)];
        assert_eq!(
            collect(&gm, &mixed, Access::Read, usize::MAX, &mut iov),
            Err(DropReason::WrongDirection)
        );
        assert_eq!(
            collect(&gm, &mixed, Access::Write, usize::MAX, &mut iov),
            Err(DropReason::WrongDirection)
        );
        assert!(iov.is_empty());
    }

    #[test]
    fn length_limit() {
        let (gm, _) = guest_memory();
        let mut iov = Vec::new();
        let a = 0x20_0000;
        let segs = [(a, 60, 0), (a + 60, 40, 0)];
        assert_eq!(collect(&gm, &segs, Access::Read, 100, &mut iov), Ok(100));
        iov.clear();
        assert_eq!(
            collect(&gm, &segs, Access::Read, 99, &mut iov),
            Err(DropReason::Oversize)
        );
        assert!(iov.is_empty());
    }

    #[test]
    fn at_most_64_descriptors() {
        let (gm, _) = guest_memory();
        let mut iov = Vec::new();
        let a = 0x20_0000;
        let segs: Vec<_> = (0..64).map(|i| (a + 8 * i, 8, 0)).collect();
        assert_eq!(
            collect(&gm, &segs, Access::Read, usize::MAX, &mut iov),
            Ok(512)
        );
        assert_eq!(iov.len(), 64);
        iov.clear();
        let segs: Vec<_> = (0..65).map(|i| (a + 8 * i, 8, 0)).collect();
        assert_eq!(
            collect(&gm, &segs, Access::Read, usize::MAX, &mut iov),
            Err(DropReason::BadChain)
        );
        assert!(iov.is_empty());
    }

    #[test]
    fn broken_links_are_bad_chains() {
        let (gm, _) = guest_memory();
        let a = 0x20_0000;
        let d = Driver::new(&gm, 0, 16, RX_BUFS);
        // A loop, a next index out of the table, and a descriptor pointing at itself.
        d.set_desc(0, a, 8, NEXT, 1);
        d.set_desc(1, a, 8, NEXT, 0);
        d.publish(0);
        d.set_desc(2, a, 8, NEXT, 16);
        d.publish(2);
        d.set_desc(3, a, 8, NEXT, 3);
        d.publish(3);
        let mut q: Queue = d.mock.create_queue().unwrap();
        let mut iov = Vec::new();
        for _ in 0..3 {
            let chain = q.pop_descriptor_chain(&gm).unwrap();
            assert_eq!(
                collect_chain(chain, &gm, Access::Read, usize::MAX, &mut iov),
                Err(DropReason::BadChain)
            );
            assert!(iov.is_empty());
        }
    }

    #[test]
    fn indirect_tables() {
        let (gm, _) = guest_memory();
        let a = 0x20_0000;
        let table = 0x30_0000;
        for (i, (addr, len, flags, next)) in [
            (a, 12, NEXT, 1),
            (a + 100, 20, NEXT, 2),
            (a + 200, 30, 0, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let d = virtio_queue::desc::split::Descriptor::new(addr, len, flags, next);
            gm.write_obj(
                virtio_queue::desc::RawDescriptor::from(d),
                GuestAddress(table + 16 * i as u64),
            )
            .unwrap();
        }
        let mut iov = Vec::new();
        let r = collect(
            &gm,
            &[(table, 48, INDIRECT)],
            Access::Read,
            usize::MAX,
            &mut iov,
        );
        assert_eq!(r, Ok(62));
        assert_eq!(iov.len(), 3);
        assert_eq!(iov[1].iov_base, host(&gm, a + 100));
        iov.clear();
        // A table whose last entry still says "next" past its end.
        let r = collect(
            &gm,
            &[(table, 32, INDIRECT)],
            Access::Read,
            usize::MAX,
            &mut iov,
        );
        assert_eq!(r, Err(DropReason::BadChain));
        // A table outside guest memory.
        let r = collect(
            &gm,
            &[(MEM_SIZE as u64, 48, INDIRECT)],
            Access::Read,
            usize::MAX,
            &mut iov,
        );
        assert_eq!(r, Err(DropReason::BadChain));
        assert!(iov.is_empty());
    }

    #[test]
    fn write_at_spans_iovecs_and_refuses_short_buffers() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 8];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: both iovecs describe live local arrays of their stated lengths.
        assert!(unsafe { write_at(&iov, 3, &[1, 2, 3]) });
        // SAFETY: as above.
        assert!(!unsafe { write_at(&iov, 11, &[9, 9]) });
        // SAFETY: as above.
        assert!(!unsafe { write_at(&iov, 20, &[9]) });
        // SAFETY: as above.
        assert!(unsafe { write_at(&iov, 0, &[]) });
        assert_eq!(a, [0, 0, 0, 1]);
        assert_eq!(b, [2, 3, 0, 0, 0, 0, 0, 9]);
    }

    #[test]
    fn read_at_spans_iovecs_and_refuses_short_buffers() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5, 6, 7];
        let iov = [
            libc::iovec {
                iov_base: a.as_ptr().cast_mut().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            },
        ];
        let mut out = [0u8; 3];
        // SAFETY: both iovecs describe live local arrays of their stated lengths.
        assert!(unsafe { read_at(&iov, 2, &mut out) });
        assert_eq!(out, [3, 4, 5]);
        // SAFETY: as above.
        assert!(!unsafe { read_at(&iov, 6, &mut out) });
        assert_eq!(out[0], 7);
        // SAFETY: as above.
        assert!(unsafe { read_at(&iov, 7, &mut []) });
    }
}
