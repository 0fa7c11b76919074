//! Test doubles for the device logic: anonymous guest memory, a driver-side view of split
//! virtqueues built on `virtio_queue::mock::MockSplitQueue`, and in-memory host queues and ports
//! that move bytes through the raw iovecs the device hands them, like a tap would.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic};

use crate::dirty::{GuestMemoryMmap, VringMutex};

use crate::features::{GuestOffloads, HostCapabilities};
use crate::port::{HostPort, HostQueue, TxDrops};

/// Size of the anonymous guest memory of every test.
pub const MEM_SIZE: usize = 16 << 20;
/// Guest address of the first (RX) ring.
pub const RX_RING: u64 = 0x0;
/// Guest address of the second (TX) ring.
pub const TX_RING: u64 = 0x1_0000;
/// Start of the buffer area of the RX ring's driver.
pub const RX_BUFS: u64 = 0x10_0000;
/// Start of the buffer area of the TX ring's driver.
pub const TX_BUFS: u64 = 0x80_0000;
/// Size of each driver's buffer area.
pub const BUF_AREA: u64 = 0x70_0000;

/// Descriptor flag: device-writable.
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: another descriptor follows.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the descriptor points to an indirect table.
pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Anonymous guest memory: the plain map (whose clones share the mapping) for the driver side,
/// and the atomic wrapper the device side uses.
pub fn guest_memory() -> (GuestMemoryMmap, GuestMemoryAtomic<GuestMemoryMmap>) {
    let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let atomic = GuestMemoryAtomic::new(gm.clone());
    (gm, atomic)
}

/// A bit of `u64` feature space.
pub const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Offset of the used ring from the start of a driver's ring area.
///
/// `MockSplitQueue` places its used ring at `avail.end()`, which adds the avail ring's entry
/// count rather than its byte size, so the second half of its avail ring overlaps the used ring.
/// The drivers here use the mock's descriptor table and avail ring, and a used ring of their own.
const USED_RING_OFFSET: u64 = 0x2000;

/// The guest driver's side of one split virtqueue (at most 256 entries).
pub struct Driver<'a> {
    /// The descriptor table and avail ring in guest memory.
    pub mock: MockSplitQueue<'a, GuestMemoryMmap>,
    used_addr: GuestAddress,
    mem: &'a GuestMemoryMmap,
    size: u16,
    next_desc: u16,
    next_buf: u64,
    buf_end: u64,
}

impl<'a> Driver<'a> {
    /// A queue of `size` entries at `ring`, with buffers allocated from `bufs`.
    pub fn new(mem: &'a GuestMemoryMmap, ring: u64, size: u16, bufs: u64) -> Self {
        assert!(size <= 256);
        let mock = MockSplitQueue::create(mem, GuestAddress(ring), size);
        let used_addr = GuestAddress(ring + USED_RING_OFFSET);
        assert!(mock.avail_addr().0 + 6 + 2 * u64::from(size) <= used_addr.0);
        Driver {
            mock,
            used_addr,
            mem,
            size,
            next_desc: 0,
            next_buf: bufs,
            buf_end: bufs + BUF_AREA,
        }
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// A device-side vring over this queue, ready and enabled.
    pub fn vring(&self, mem: &GuestMemoryAtomic<GuestMemoryMmap>) -> VringMutex {
        let v = VringMutex::new(mem.clone(), self.size).unwrap();
        v.set_queue_info(
            self.mock.desc_table_addr().0,
            self.mock.avail_addr().0,
            self.used_addr.0,
        )
        .unwrap();
        v.set_queue_size(self.size);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    /// Allocates `len` bytes of buffer space (16-byte aligned), filled with `0xee`.
    pub fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_buf;
        self.next_buf = (addr + len as u64 + 15) & !15;
        assert!(self.next_buf <= self.buf_end, "test buffer area exhausted");
        self.mem
            .write_slice(&vec![0xee; len], GuestAddress(addr))
            .unwrap();
        addr
    }

    /// Writes descriptor `index` as is.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = SplitDescriptor::new(addr, len, flags, next);
        self.mock
            .desc_table()
            .store(index, RawDescriptor::from(d))
            .unwrap();
    }

    /// Takes the next `n` descriptor indexes (wrapping around the table).
    pub fn take_descs(&mut self, n: usize) -> Vec<u16> {
        (0..n)
            .map(|_| {
                let i = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                i
            })
            .collect()
    }

    /// Offers the chain starting at `head` in the avail ring.
    pub fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        self.mock
            .avail()
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// The avail ring's `idx`.
    pub fn avail_idx(&self) -> u16 {
        self.mock.avail().idx().load()
    }

    /// Overwrites the avail ring's `idx`.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mock.avail().idx().store(idx);
    }

    /// Writes a chain of `(addr, len, flags)` descriptors (NEXT links added) into fresh
    /// descriptor slots, without publishing it. Returns the head index.
    pub fn write_chain(&mut self, segs: &[(u64, u32, u16)]) -> u16 {
        let idx = self.take_descs(segs.len());
        for (i, &(addr, len, flags)) in segs.iter().enumerate() {
            match idx.get(i + 1) {
                Some(&next) => self.set_desc(idx[i], addr, len, flags | NEXT, next),
                None => self.set_desc(idx[i], addr, len, flags & !NEXT, 0),
            }
        }
        idx[0]
    }

    /// Writes and publishes a chain of `(addr, len, flags)` descriptors. Returns the head index.
    pub fn add_chain(&mut self, segs: &[(u64, u32, u16)]) -> u16 {
        let head = self.write_chain(segs);
        self.publish(head);
        head
    }

    /// Places `bytes` into fresh buffers split into pieces of the given lengths (the last piece
    /// takes the rest) and publishes them as one device-readable chain. Returns the head index.
    pub fn add_tx(&mut self, bytes: &[u8], pieces: &[usize]) -> u16 {
        let mut segs = Vec::new();
        let mut rest = bytes;
        for (i, &p) in pieces.iter().enumerate() {
            let n = if i + 1 == pieces.len() { rest.len() } else { p };
            let addr = self.alloc(n);
            self.mem
                .write_slice(&rest[..n], GuestAddress(addr))
                .unwrap();
            segs.push((addr, n as u32, 0));
            rest = &rest[n..];
        }
        assert!(rest.is_empty());
        self.add_chain(&segs)
    }

    /// Publishes one device-writable buffer of `len` bytes. Returns its head index and address.
    pub fn add_rx(&mut self, len: u32) -> (u16, u64) {
        let addr = self.alloc(len as usize);
        (self.add_chain(&[(addr, len, WRITE)]), addr)
    }

    /// Publishes one device-writable chain made of an indirect table of `count` buffers of
    /// `len` bytes each. Returns its head index and the buffers' addresses.
    pub fn add_indirect_rx(&mut self, count: u16, len: u32) -> (u16, Vec<u64>) {
        let table = self.alloc(16 * usize::from(count));
        let mut bufs = Vec::with_capacity(usize::from(count));
        for i in 0..count {
            let buf = self.alloc(len as usize);
            bufs.push(buf);
            let flags = if i + 1 < count { WRITE | NEXT } else { WRITE };
            let d = SplitDescriptor::new(buf, len, flags, i + 1);
            self.mem
                .write_obj(
                    RawDescriptor::from(d),
                    GuestAddress(table + 16 * u64::from(i)),
                )
                .unwrap();
        }
        (
            self.add_chain(&[(table, 16 * u32::from(count), INDIRECT)]),
            bufs,
        )
    }

    /// The used ring's `idx`.
    /// Where the used ring's index lives, to read it while the driver is borrowed elsewhere.
    pub fn used_idx_addr(&self) -> GuestAddress {
        self.used_addr.unchecked_add(2)
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used_addr.unchecked_add(2)).unwrap()
    }

    /// Used ring entry `i` (taken modulo the queue size): (descriptor id, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let addr = self.used_addr.0 + 4 + 8 * u64::from(i % self.size);
        let e: VirtqUsedElem = self.mem.read_obj(GuestAddress(addr)).unwrap();
        (e.id(), e.len())
    }

    /// Every used entry so far: (descriptor id, length).
    pub fn all_used(&self) -> Vec<(u32, u32)> {
        (0..self.used_idx()).map(|i| self.used(i)).collect()
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY while the device does not want kicks).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(self.used_addr).unwrap()
    }

    /// The `avail_event` field the device writes at the end of the used ring (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let addr = self.used_addr.0 + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Sets the `used_event` field at the end of the avail ring (EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        let addr = self.mock.avail_addr().0 + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(v, GuestAddress(addr)).unwrap();
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// What a [`FakeQueue`] holds: frames waiting for the guest, frames the guest sent, and
/// injected failures.
#[derive(Default)]
pub struct FakeQueueState {
    /// Frames (virtio-net header first) waiting to be received by the guest.
    pub to_guest: VecDeque<Vec<u8>>,
    /// Frames (virtio-net header first) the guest sent.
    pub from_guest: Vec<Vec<u8>>,
    /// Total buffer length offered to every `recv` call that found a frame.
    pub recv_capacity: Vec<usize>,
    /// Number of iovecs of every `send` call.
    pub send_iovecs: Vec<usize>,
    /// Fails every `send` with this error kind (the frame is not captured).
    pub send_error: Option<io::ErrorKind>,
    /// Fails the next `recv` with this error kind.
    pub recv_error: Option<io::ErrorKind>,
    /// Reported (once) by the next `flush`: frames `send` took and the host dropped later.
    pub flush_drops: TxDrops,
    /// Number of `flush` calls.
    pub flushes: usize,
    /// The queue's iovec limit (`max_iovecs`; default: the library's).
    pub max_iov: Option<usize>,
    /// `recv` calls refused for offering more than `max_iov` iovecs: like a `readv` past
    /// UIO_MAXIOV, the frame stays queued.
    pub too_many_iovecs: usize,
    /// Largest number of iovecs offered to `recv`.
    pub max_recv_iovecs: usize,
    /// A frame longer than the buffers is cut to their size and reported with its full length
    /// (as some taps do), instead of being refused.
    pub cut_long_frames: bool,
}

/// Refusals after which [`FakeQueue::recv`] fails hard, so that a worker that keeps offering
/// the same refused buffers ends its pass and a test fails instead of hanging.
pub const REFUSALS_BEFORE_RESET: usize = 1000;

/// An in-memory host queue; clones share the same state.
#[derive(Clone, Default)]
pub struct FakeQueue(pub Arc<Mutex<FakeQueueState>>);

impl FakeQueue {
    /// The shared state.
    pub fn state(&self) -> MutexGuard<'_, FakeQueueState> {
        self.0.lock().unwrap()
    }

    /// Queues a frame for the guest.
    pub fn push(&self, frame: Vec<u8>) {
        self.state().to_guest.push_back(frame);
    }

    /// Frames still waiting for the guest.
    pub fn pending(&self) -> usize {
        self.state().to_guest.len()
    }

    /// Frames the guest sent so far.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.state().from_guest.clone()
    }
}

impl HostQueue for FakeQueue {
    fn rx_fd(&self) -> RawFd {
        -1
    }

    fn max_iovecs(&self) -> usize {
        self.state().max_iov.unwrap_or(crate::port::MAX_IOVECS)
    }

    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut s = self.state();
        if let Some(kind) = s.recv_error.take() {
            return Err(kind.into());
        }
        s.max_recv_iovecs = s.max_recv_iovecs.max(iov.len());
        if s.max_iov.is_some_and(|m| iov.len() > m) && !s.to_guest.is_empty() {
            s.too_many_iovecs += 1;
            if s.too_many_iovecs >= REFUSALS_BEFORE_RESET {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let Some(frame) = s.to_guest.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let capacity: usize = iov.iter().map(|v| v.iov_len).sum();
        s.recv_capacity.push(capacity);
        if frame.len() > capacity && !s.cut_long_frames {
            // Like a tap: the frame is consumed and dropped, never truncated.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame does not fit",
            ));
        }
        let mut rest = &frame[..];
        for v in iov {
            if rest.is_empty() {
                break;
            }
            let n = v.iov_len.min(rest.len());
            // SAFETY: the caller guarantees every iovec is valid for writes of `iov_len` bytes,
            // and `n <= iov_len`; the source is a local vector that cannot overlap guest memory.
            unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), v.iov_base.cast::<u8>(), n) };
            rest = &rest[n..];
        }
        Ok(frame.len())
    }

    unsafe fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut s = self.state();
        s.send_iovecs.push(iov.len());
        if let Some(kind) = s.send_error {
            return Err(io::Error::new(kind, "injected send error"));
        }
        let mut frame = Vec::new();
        for v in iov {
            if v.iov_len == 0 {
                continue;
            }
            // SAFETY: the caller guarantees every iovec is valid for reads of `iov_len` bytes
            // (and a non-empty one has a non-null base).
            let bytes = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
            frame.extend_from_slice(bytes);
        }
        let n = frame.len();
        s.from_guest.push(frame);
        Ok(n)
    }

    fn flush(&mut self) -> TxDrops {
        let mut s = self.state();
        s.flushes += 1;
        std::mem::take(&mut s.flush_drops)
    }
}

/// An in-memory host port handing out [`FakeQueue`]s and recording `configure` calls.
#[derive(Default)]
pub struct FakePort {
    /// Capabilities reported.
    pub caps: HostCapabilities,
    /// One queue per pair; `take_queue` fails for pairs beyond.
    pub queues: Vec<FakeQueue>,
    /// Every `configure` call: (header length, offloads).
    pub configured: Mutex<Vec<(usize, GuestOffloads)>>,
    /// Every `take_queue` call.
    pub taken: Mutex<Vec<usize>>,
    /// `configure` fails when set.
    pub configure_fails: bool,
}

impl FakePort {
    /// A port with `pairs` queues.
    pub fn new(pairs: usize) -> Self {
        FakePort {
            queues: (0..pairs).map(|_| FakeQueue::default()).collect(),
            ..FakePort::default()
        }
    }
}

impl HostPort for FakePort {
    fn capabilities(&self) -> HostCapabilities {
        self.caps
    }

    fn configure(&self, vnet_hdr_len: usize, offloads: GuestOffloads) -> io::Result<()> {
        self.configured
            .lock()
            .unwrap()
            .push((vnet_hdr_len, offloads));
        if self.configure_fails {
            return Err(io::Error::other("injected configure error"));
        }
        Ok(())
    }

    fn take_queue(&self, pair: usize) -> io::Result<Box<dyn HostQueue>> {
        self.taken.lock().unwrap().push(pair);
        self.queues
            .get(pair)
            .cloned()
            .map(|q| Box::new(q) as Box<dyn HostQueue>)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
}

/// A frame of `len` bytes (virtio-net header of `hdr_len` zero bytes first, then a counting
/// pattern seeded by `seed`).
pub fn frame(hdr_len: usize, len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; hdr_len];
    f.extend((0..len - hdr_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}
