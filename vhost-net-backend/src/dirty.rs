//! Dirty-page logging for live migration, and the guest memory types that carry it.
//!
//! During a live migration the frontend (QEMU) copies guest RAM to the destination while the
//! guest runs, and copies again every page written since. It learns which pages the backend
//! wrote from a shared bitmap, one bit per 4 KiB page of guest physical memory: the log. The
//! frontend hands the log over with `SET_LOG_BASE` (protocol feature `LOG_SHMFD`) and turns
//! logging on and off with the `VHOST_F_LOG_ALL` feature bit in `SET_FEATURES`. A page the
//! backend writes without marking it arrives stale at the destination: a received frame
//! silently corrupted, or a used ring that goes backwards.
//!
//! The backend writes guest memory in two ways, and both are covered:
//! - through vm-memory (used ring elements and index, ring copies): every region of
//!   [`GuestMemoryMmap`] carries a [`DirtyLog`], which vm-memory marks on each write;
//! - through raw pointers (`readv` from the tap and copies from an AF_PACKET ring into guest
//!   buffers): [`mark_written`] marks what a received frame occupied.
//!
//! [`DirtyLog`] wraps the `vhost-user-backend` crate's replaceable bitmap (the crate maps the
//! frontend's log, checks that it covers every region, and swaps it in on `SET_LOG_BASE`) and
//! adds an on/off switch the device flips from `VHOST_F_LOG_ALL`: the crate leaves the bitmap
//! in place after logging is turned off, and writing into a log the frontend no longer reads
//! would be wasted work at best. With logging off a write costs one relaxed load, and slices of
//! the log are references, so an access through vm-memory touches no reference count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Guest memory whose regions log the pages the backend writes (see the module doc).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyLog>;
/// The device's view of guest memory, replaced as a whole when the frontend changes it.
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemoryMmap>;
/// A vring over [`GuestMemoryAtomic`].
pub type VringMutex = vhost_user_backend::VringMutex<GuestMemoryAtomic>;

#[derive(Debug, Default)]
struct Shared {
    /// `VHOST_F_LOG_ALL` is acked: writes are marked.
    on: AtomicBool,
    log: BitmapMmapRegion,
}

/// The dirty log of one guest memory region. Slices of it (what vm-memory hands around with
/// every access) are plain references: no reference count is touched per access.
#[derive(Clone, Debug, Default)]
pub struct DirtyLog {
    shared: Arc<Shared>,
}

impl DirtyLog {
    /// Turns marking on or off (`VHOST_F_LOG_ALL` acked or not).
    pub fn set_logging(&self, on: bool) {
        self.shared.on.store(on, Ordering::Release);
    }

    /// True while marking is on.
    pub fn logging(&self) -> bool {
        self.shared.on.load(Ordering::Relaxed)
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.logging() {
            self.shared.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.shared.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.shared.log.replace(bitmap);
    }
}

/// Turns marking on or off in every region of `mem`.
pub fn set_logging(mem: &GuestMemoryMmap, on: bool) {
    for r in mem.iter() {
        let region: &vm_memory::MmapRegion<DirtyLog> = r;
        region.bitmap().set_logging(on);
    }
}

/// Marks the first `len` bytes described by `iov` (host pointers into `mem`, as
/// [`crate::chain::collect_chain`] made them) as written. Pointers outside `mem` are ignored.
pub fn mark_written(mem: &GuestMemoryMmap, iov: &[libc::iovec], mut len: usize) {
    for v in iov {
        if len == 0 {
            break;
        }
        let n = len.min(v.iov_len);
        len -= n;
        let ptr = v.iov_base as usize;
        for r in mem.iter() {
            let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
                continue;
            };
            let start = host as usize;
            let size = r.len() as usize;
            if ptr >= start && ptr - start < size {
                r.bitmap().mark_dirty(ptr - start, n);
                break;
            }
        }
    }
}
