//! Turns a guest descriptor chain into host iovecs, checking every descriptor against guest
//! memory. This is the only place guest addresses become host pointers.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
