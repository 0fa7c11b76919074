//! Descriptor chains over arbitrary guest memory contents.
//!
//! Guest memory is 64 KiB in two 32 KiB regions that are *not* contiguous in the host: each sits
//! between `PROT_NONE` pages, so a host pointer that strays past a region — including code that
//! assumed two regions adjacent in guest address space are adjacent in the host — faults at once.
//! Every iovec the device passes to the host queue, or gets from `collect_chain`, is also checked
//! to lie inside one region.
//!
//! Input format (all little endian; missing bytes read as zero):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | flags: bit 0 MRG_RXBUF, bit 1 VERSION_1, bit 2 guest GSO (GUEST_CSUM + GUEST_TSO4), bit 3 a 4 KiB hole between the regions in guest address space, bit 4 EVENT_IDX, bit 5 TX ring addresses from the input |
//! | 1, 2 | TX and RX queue sizes: `1 << (b % 9)` |
//! | 3 | bits 0-2: frames waiting in the host queue; bits 3-7: `collect_chain` max_len selector |
//! | 4.. | one u16 length per host frame |
//! | then, with flag bit 5 | TX descriptor table, avail ring, used ring guest addresses (3 × u16) |
//! | rest | patches of guest memory: `u16 address, u8 length, bytes`; a patch of length 0 runs the device once (the guest changing rings between kicks) |
//!
//! Fixed layout otherwise: TX ring at 0x0000 (avail 0x1000, used 0x1400), RX ring at 0x2000
//! (avail 0x3000, used 0x3400); buffers anywhere.
//!
//! After the patches: `collect_chain` over every TX avail entry in both directions, then the
//! worker handles a host event and kicks, gives its RX buffers back (as before
//! GET_VRING_BASE) and runs again.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vhost_net_backend::chain::{collect_chain, Access};
use vhost_net_backend::dirty::{GuestMemoryMmap, VringMutex};
use vhost_net_backend::port::HostQueue;
use vhost_net_backend::stats::{DropReason, QueueStats};
use vhost_net_backend::worker::QueuePairWorker;
use vhost_user_backend::VringT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestRegionMmap, MmapRegion};

const PAGE: usize = 4096;
/// Size of each of the two guest memory regions.
pub const REGION: usize = 32 * 1024;
/// guard | region 0 | gap | region 1 | guard; everything but the regions is PROT_NONE.
const ARENA: usize = PAGE + REGION + PAGE + REGION + PAGE;
/// Largest frame the device may hand to the host (header + 64 KiB GSO frame + Ethernet/VLAN).
const MAX_TX: usize = 12 + 65535 + 14 + 4;

/// TX ring (vhost-user ring 1) default layout.
pub const TX_DESC: u64 = 0x0000;
pub const TX_AVAIL: u64 = 0x1000;
pub const TX_USED: u64 = 0x1400;
/// RX ring (vhost-user ring 0) layout.
pub const RX_DESC: u64 = 0x2000;
pub const RX_AVAIL: u64 = 0x3000;
pub const RX_USED: u64 = 0x3400;

/// Input flag bits.
pub const F_MRG_RXBUF: u8 = 1;
pub const F_VERSION_1: u8 = 2;
pub const F_GSO: u8 = 4;
pub const F_HOLE: u8 = 8;
pub const F_EVENT_IDX: u8 = 16;
pub const F_TX_ADDRS: u8 = 32;

struct Arena(usize);

fn arena() -> usize {
    static A: OnceLock<Arena> = OnceLock::new();
    A.get_or_init(|| {
        // SAFETY: a fresh private anonymous mapping, checked below; never unmapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ARENA,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "{}", io::Error::last_os_error());
        for i in 0..2 {
            // SAFETY: the range lies inside the mapping just made.
            let rc = unsafe {
                libc::mprotect(
                    p.cast::<u8>().add(region_offset(i)).cast(),
                    REGION,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        }
        Arena(p as usize)
    })
    .0
}

fn region_offset(i: usize) -> usize {
    PAGE + i * (REGION + PAGE)
}

fn region_host(i: usize) -> *mut u8 {
    (arena() + region_offset(i)) as *mut u8
}

/// True when `[ptr, ptr + len)` lies inside one guest memory region.
pub fn in_guest(ptr: *const u8, len: usize) -> bool {
    let p = ptr as usize;
    (0..2).any(|i| {
        let start = region_host(i) as usize;
        p >= start && p.checked_add(len).is_some_and(|end| end <= start + REGION)
    })
}

fn check_iov(iov: &[libc::iovec]) {
    for v in iov {
        assert!(
            v.iov_len == 0 || in_guest(v.iov_base.cast(), v.iov_len),
            "iovec {:p}+{} outside guest memory",
            v.iov_base,
            v.iov_len
        );
    }
}

/// Fresh (zeroed) guest memory over the arena: region 0 at guest address 0, region 1 right
/// after it or after a 4 KiB hole.
fn guest_memory(hole: bool) -> GuestMemoryMmap {
    let regions = (0..2)
        .map(|i| {
            // SAFETY: the region is a read-write part of the arena, which is never unmapped.
            unsafe { std::ptr::write_bytes(region_host(i), 0, REGION) };
            // SAFETY: as above; the MmapRegion does not own (or unmap) it.
            let m = unsafe {
                MmapRegion::build_raw(
                    region_host(i),
                    REGION,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .expect("raw region");
            let gpa = (i * REGION + if hole && i == 1 { PAGE } else { 0 }) as u64;
            GuestRegionMmap::new(m, GuestAddress(gpa)).expect("region")
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).expect("guest memory")
}

/// An in-memory host queue that checks every iovec it is handed.
#[derive(Clone, Default)]
pub struct CheckingQueue(Arc<Mutex<QueueState>>);

#[derive(Default)]
struct QueueState {
    to_guest: VecDeque<Vec<u8>>,
    sent: usize,
    hdr_len: usize,
}

impl HostQueue for CheckingQueue {
    fn rx_fd(&self) -> RawFd {
        -1
    }

    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        check_iov(iov);
        let mut s = self.0.lock().unwrap();
        let Some(frame) = s.to_guest.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let capacity: usize = iov.iter().map(|v| v.iov_len).sum();
        if frame.len() > capacity {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too big"));
        }
        let mut rest = &frame[..];
        for v in iov {
            let n = v.iov_len.min(rest.len());
            // SAFETY: checked above to lie inside guest memory, which is mapped read-write.
            unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), v.iov_base.cast(), n) };
            rest = &rest[n..];
        }
        Ok(frame.len())
    }

    unsafe fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        check_iov(iov);
        let mut s = self.0.lock().unwrap();
        let mut total = 0usize;
        let mut sum = 0u8;
        for v in iov {
            for i in 0..v.iov_len {
                // SAFETY: checked above to lie inside guest memory.
                sum ^= unsafe { std::ptr::read_volatile(v.iov_base.cast::<u8>().add(i)) };
            }
            total += v.iov_len;
        }
        std::hint::black_box(sum);
        assert!(
            total >= s.hdr_len + 14 && total <= MAX_TX,
            "frame of {total} bytes sent (header {})",
            s.hdr_len
        );
        s.sent += 1;
        Ok(total)
    }
}

/// Little-endian reader that yields zeros past the end.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn vring(
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    size: u16,
    addrs: (u64, u64, u64),
    event_idx: bool,
) -> Option<VringMutex> {
    let v = VringMutex::new(mem.clone(), 256).ok()?;
    // Misaligned addresses are refused here, as the vhost-user handler refuses them.
    v.set_queue_info(addrs.0, addrs.1, addrs.2).ok()?;
    v.set_queue_size(size);
    v.set_queue_event_idx(event_idx);
    v.set_queue_ready(true);
    v.set_enabled(true);
    Some(v)
}

/// What the device did with one input (for tests of the harness itself).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Frames sent to the host (guest TX).
    pub tx_frames: u64,
    /// TX drops by `DropReason` name.
    pub tx_drops: Vec<(&'static str, u64)>,
    /// Frames delivered to the guest (guest RX).
    pub rx_frames: u64,
    /// RX drops by `DropReason` name.
    pub rx_drops: Vec<(&'static str, u64)>,
}

impl Outcome {
    /// Drops of `reason` in `dir` ("tx" or "rx").
    pub fn drops(&self, dir: &str, reason: &str) -> u64 {
        let list = if dir == "tx" {
            &self.tx_drops
        } else {
            &self.rx_drops
        };
        list.iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// One fuzz input. Panics (or faults) on a finding.
pub fn run(data: &[u8]) -> Outcome {
    run_with(data, false)
}

/// Inputs whose avail ring's `idx` is readable but whose entries are not (the ring at guest
/// address 0, or entries outside memory). They once made the worker spin forever (fixed in
/// `worker.rs`); kept so regression tests can single them out.
pub fn spins_on_known_bug(gm: &GuestMemoryMmap, avail: u64, size: u16) -> bool {
    use vm_memory::GuestMemoryBackend;
    avail == 0 || !gm.check_range(GuestAddress(avail), 4 + 2 * usize::from(size))
}

/// [`run`], optionally skipping the inputs of [`spins_on_known_bug`].
pub fn run_with(data: &[u8], skip_known_spin: bool) -> Outcome {
    let mut inp = Input(data);
    let flags = inp.u8();
    let tx_size = 1u16 << (inp.u8() % 9);
    let rx_size = 1u16 << (inp.u8() % 9);
    let b3 = inp.u8();
    let frames: Vec<Vec<u8>> = (0..b3 & 7)
        .map(|i| {
            let len = usize::from(inp.u16());
            (0..len).map(|j| (j as u8).wrapping_add(i)).collect()
        })
        .collect();
    let max_len = match b3 >> 3 {
        0 => usize::MAX,
        n => 1usize << n,
    };
    let tx_addrs = if flags & F_TX_ADDRS != 0 {
        (
            u64::from(inp.u16()),
            u64::from(inp.u16()),
            u64::from(inp.u16()),
        )
    } else {
        (TX_DESC, TX_AVAIL, TX_USED)
    };

    let gm = guest_memory(flags & F_HOLE != 0);
    if skip_known_spin && spins_on_known_bug(&gm, tx_addrs.1, tx_size) {
        return Outcome::default();
    }
    let atomic = GuestMemoryAtomic::new(gm.clone());
    let event_idx = flags & F_EVENT_IDX != 0;
    let Some(tx) = vring(&atomic, tx_size, tx_addrs, event_idx) else {
        return Outcome::default();
    };
    let rx =
        vring(&atomic, rx_size, (RX_DESC, RX_AVAIL, RX_USED), event_idx).expect("fixed RX layout");
    let vrings = [rx, tx];

    let mut acked = 0u64;
    if flags & F_MRG_RXBUF != 0 {
        acked |= 1 << 15;
    }
    if flags & F_VERSION_1 != 0 {
        acked |= 1 << 32;
    }
    if flags & F_GSO != 0 {
        acked |= (1 << 1) | (1 << 7);
    }
    let hdr_len = if acked & ((1 << 15) | (1 << 32)) != 0 {
        12
    } else {
        10
    };
    let host = CheckingQueue::default();
    {
        let mut s = host.0.lock().unwrap();
        s.to_guest = frames.into();
        s.hdr_len = hdr_len;
    }
    let stats = Arc::new(QueueStats::default());
    let mut worker =
        QueuePairWorker::new(Box::new(host.clone()), stats.clone(), 1500, Duration::ZERO);
    worker.set_memory(atomic.clone());
    worker.set_features(acked);

    // Patches; an empty one runs the device in between.
    while !inp.is_empty() {
        let addr = u64::from(inp.u16());
        let len = usize::from(inp.u8());
        if len == 0 {
            worker.handle(true, &vrings);
            continue;
        }
        let bytes = inp.bytes(len).to_vec();
        // Writes into the hole or past the end are simply lost, as a guest's would be.
        let _ = gm.write(&bytes, GuestAddress(addr));
    }

    // chain::collect_chain directly, over a queue of our own reading the TX ring.
    let mut q = Queue::new(256).expect("queue");
    q.set_size(tx_size);
    q.set_desc_table_address(Some(tx_addrs.0 as u32), Some(0));
    q.set_avail_ring_address(Some(tx_addrs.1 as u32), Some(0));
    q.set_used_ring_address(Some(tx_addrs.2 as u32), Some(0));
    q.set_ready(true);
    let mut iov = Vec::new();
    for _ in 0..u32::from(tx_size) + 1 {
        let Some(chain) = q.pop_descriptor_chain(&gm) else {
            break;
        };
        for access in [Access::Read, Access::Write] {
            iov.clear();
            if let Ok(total) = collect_chain(chain.clone(), &gm, access, max_len, &mut iov) {
                check_iov(&iov);
                let sum: usize = iov.iter().map(|v| v.iov_len).sum();
                assert_eq!(sum, total, "iovecs do not add up to the chain length");
                assert!(total <= max_len);
            } else {
                assert!(iov.is_empty(), "iovecs left behind by a refused chain");
            }
        }
    }

    // Both directions of the worker: a host event, a kick, buffers given back, once more.
    worker.handle(true, &vrings);
    worker.handle(false, &vrings);
    worker.stop(0);
    worker.handle(true, &vrings);
    worker.reset();
    drop(worker);

    let s = host.0.lock().unwrap();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let tx_frames = stats.tx.frames.load(relaxed);
    assert_eq!(
        tx_frames as usize, s.sent,
        "TX frames counted != frames sent"
    );
    let by_reason = |d: &vhost_net_backend::stats::DirectionStats| {
        DropReason::ALL
            .iter()
            .map(|r| (r.name(), d.drops_of(*r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    };
    Outcome {
        tx_frames,
        tx_drops: by_reason(&stats.tx),
        rx_frames: stats.rx.frames.load(relaxed),
        rx_drops: by_reason(&stats.rx),
    }
}
