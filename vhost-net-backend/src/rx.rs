//! Receive side (host → guest): guest buffers held between frames, and the frame placement
//! that spreads one frame over several buffers (MRG_RXBUF) with a single `recv`.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::dirty::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use crate::chain::{collect_chain, write_at, Access};
use crate::features::NUM_BUFFERS_OFFSET;
use crate::stats::{DirectionStats, DropReason};
use crate::used::UsedBatch;

/// A guest receive chain taken from the avail ring but not yet filled.
#[derive(Clone, Copy, Debug)]
struct HeldChain {
    head: u16,
    iov_count: usize,
    capacity: usize,
}

/// Receive buffers the device took from the guest, in avail-ring order.
///
/// Buffers are taken ahead of frames so that one `recv` can land a frame of unknown size across
/// several of them. They are always the most recently popped chains, so giving them back is a
/// matter of moving the queue's `next_avail` back by their count.
#[derive(Default)]
pub struct RxBuffers {
    chains: VecDeque<HeldChain>,
    iov: VecDeque<libc::iovec>,
    capacity: usize,
    /// The memory map the held iovecs point into; kept alive while they are held.
    mem: Option<Arc<GuestMemoryMmap>>,
    scratch: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `iov` point into guest memory owned by `mem` (an `Arc` of a
// thread-safe mmap); they are only dereferenced by the worker that owns this value.
unsafe impl Send for RxBuffers {}

/// Outcome of offering one frame slot to the host port.
pub enum Slot<'a> {
    /// Buffers for a whole frame, and their total length; pass them to the host port's `recv`.
    Ready(&'a [libc::iovec], usize),
    /// The guest has not posted enough buffers; wait for its next kick.
    Starved,
}

impl RxBuffers {
    /// Number of held chains.
    pub fn held(&self) -> usize {
        self.chains.len()
    }

    /// Forgets every held buffer without touching a queue (the queue is gone).
    pub fn clear(&mut self) {
        self.chains.clear();
        self.iov.clear();
        self.capacity = 0;
        self.mem = None;
    }

    /// Gives every held buffer back to the guest's avail ring, so `next_avail` is exact again
    /// (before GET_VRING_BASE, or when guest memory changes under the held pointers).
    pub fn give_back(&mut self, queue: &mut Queue) {
        let n = self.chains.len() as u16;
        queue.set_next_avail(queue.next_avail().wrapping_sub(n));
        self.clear();
    }

    /// Takes chains from the avail ring until `need` bytes are held (or one chain, without
    /// MRG_RXBUF), and tells whether a frame can be received now. Malformed chains are returned
    /// to the guest as used with length 0 (into `used`, published by the caller) and counted.
    ///
    /// At most `max_iov` iovecs are offered for one frame (the host queue's limit). Gathering
    /// stops there: buffers beyond it could not take any of the frame, so a guest posting many
    /// tiny buffers gets frames that fit the first `max_iov` of them, and the rest are dropped
    /// by the host queue (never retried on the same buffers).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<GuestMemoryMmap>,
        used: &mut UsedBatch,
        need: usize,
        mergeable: bool,
        max_iov: usize,
        stats: &DirectionStats,
    ) -> Slot<'_> {
        if self.mem.as_ref().is_some_and(|m| !Arc::ptr_eq(m, mem)) {
            self.give_back(queue);
        }
        let max_iov = max_iov.max(1);
        let want_more = |s: &Self| {
            if mergeable {
                s.capacity < need && s.iov.len() < max_iov
            } else {
                s.chains.is_empty()
            }
        };
        // A malformed chain behind held ones cannot be returned out of order (held chains must
        // stay the most recently popped), so it waits, and the held buffers are used as they are.
        let mut blocked = false;
        while want_more(self) {
            let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) else {
                break;
            };
            let head = chain.head_index();
            self.scratch.clear();
            let result = collect_chain(chain, mem, Access::Write, usize::MAX, &mut self.scratch);
            match result {
                Ok(capacity) if capacity > 0 => {
                    self.mem.get_or_insert_with(|| mem.clone());
                    self.chains.push_back(HeldChain {
                        head,
                        iov_count: self.scratch.len(),
                        capacity,
                    });
                    self.iov.extend(self.scratch.iter().copied());
                    self.capacity += capacity;
                }
                _ if !self.chains.is_empty() => {
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    blocked = true;
                    break;
                }
                bad => {
                    stats.drop(bad.err().unwrap_or(DropReason::BadChain));
                    // A used-ring write failure means the ring itself is outside memory; the
                    // next avail read fails the same way, so there is nothing more to do.
                    let _ = used.push(queue, mem.as_ref(), head, 0);
                }
            }
        }
        let ready = if mergeable {
            // When the guest gave every buffer it can, waiting cannot help: use what is held.
            // The descriptor table is the limit: another chain as long as the longest held one
            // would not fit (iovecs are at least one per descriptor, so this errs early). So is
            // the host queue's iovec limit: buffers past it cannot take any of the frame.
            let table_full = || {
                let longest = self.chains.iter().map(|c| c.iov_count).max().unwrap_or(0);
                self.iov.len() + longest > usize::from(queue.size())
            };
            self.capacity >= need
                || (!self.chains.is_empty()
                    && (blocked || self.iov.len() >= max_iov || table_full()))
        } else {
            !self.chains.is_empty()
        };
        if !ready {
            return Slot::Starved;
        }
        // Hand out the iovecs of the chains a maximal frame could need, up to `max_iov`.
        let mut iov_count = 0;
        let mut cap = 0;
        for c in &self.chains {
            iov_count += c.iov_count;
            cap += c.capacity;
            if !mergeable || cap >= need {
                break;
            }
        }
        let iov = self.iov.make_contiguous();
        if iov_count > max_iov {
            // The last chain offered is cut short; `complete` still counts it right, because a
            // frame that fits lies within the offered iovecs, which start at chain boundaries.
            iov_count = max_iov;
            cap = iov[..iov_count].iter().map(|v| v.iov_len).sum();
        }
        Slot::Ready(&iov[..iov_count], cap)
    }

    /// Completes a received frame of `len` bytes (header included, at most the capacity the
    /// last [`RxBuffers::prepare`] offered) into the held chains, writing `num_buffers` into the
    /// header when `hdr_has_num_buffers`. With `log` (a migration is running), marks what the
    /// frame occupies in the dirty log after the last write into it and before the used ring
    /// says it is there. The chains go into `used`: the guest sees them when the caller
    /// publishes it. Returns the number of chains used.
    pub fn complete(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        used_ring: &mut UsedBatch,
        len: usize,
        hdr_has_num_buffers: bool,
        log: bool,
    ) -> usize {
        let mut remaining = len;
        let mut used = 0usize;
        for c in &self.chains {
            used += 1;
            if remaining <= c.capacity {
                break;
            }
            remaining -= c.capacity;
        }
        if hdr_has_num_buffers {
            let first = self.chains.front().map_or(0, |c| c.iov_count);
            let (a, _) = self.iov.as_slices();
            let n = u16::try_from(used).unwrap_or(u16::MAX).to_le_bytes();
            // SAFETY: the held iovecs point into guest memory kept mapped by `self.mem`.
            unsafe { write_at(&a[..first.min(a.len())], NUM_BUFFERS_OFFSET, &n) };
        }
        if log {
            // Written through raw pointers, which vm-memory cannot see. Marked after the last
            // write: a page marked earlier could be copied (and its mark consumed) by the
            // frontend before that write, and reach the destination stale.
            let (a, b) = self.iov.as_slices();
            let in_a = a.iter().map(|v| v.iov_len).sum::<usize>().min(len);
            crate::dirty::mark_written(mem, a, in_a);
            crate::dirty::mark_written(mem, b, len - in_a);
        }
        let mut remaining = len;
        for _ in 0..used {
            let Some(c) = self.chains.pop_front() else {
                break;
            };
            let n = remaining.min(c.capacity);
            remaining -= n;
            self.iov.drain(..c.iov_count);
            self.capacity -= c.capacity;
            // u32: a chain's capacity is the sum of u32 descriptor lengths, bounded below.
            let _ = used_ring.push(queue, mem, c.head, u32::try_from(n).unwrap_or(u32::MAX));
        }
        if self.chains.is_empty() {
            self.mem = None;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use vhost_user_backend::VringT;
    use vm_memory::GuestAddressSpace;

    use super::*;
    use crate::testing::*;

    #[test]
    fn mergeable_prepare_takes_and_offers_only_what_a_frame_needs() {
        let (gm, mem) = guest_memory();
        let mut d = Driver::new(&gm, RX_RING, 16, RX_BUFS);
        let bufs: Vec<_> = (0..4).map(|_| d.add_rx(1000)).collect();
        let vring = d.vring(&mem);
        let m = mem.memory().into_inner();
        let stats = DirectionStats::default();
        let mut rx = RxBuffers::default();
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        let mut u = UsedBatch::new(q);

        let Slot::Ready(iov, _) = rx.prepare(q, &m, &mut u, 1500, true, 1024, &stats) else {
            panic!("starved with buffers posted");
        };
        assert_eq!(iov.len(), 2);
        assert_eq!(rx.held(), 2);
        assert_eq!(q.next_avail(), 2);
        assert_eq!(rx.complete(q, &m, &mut u, 1200, true, false), 2);
        assert_eq!(rx.held(), 0);
        assert!(
            d.all_used().is_empty(),
            "the guest sees nothing before publish"
        );
        u.publish(q, m.as_ref()).unwrap();
        assert_eq!(
            d.all_used(),
            vec![(u32::from(bufs[0].0), 1000), (u32::from(bufs[1].0), 200)]
        );
        assert_eq!(d.read(bufs[0].1 + 10, 2), vec![2, 0]);

        // The two remaining buffers; a frame of exactly one buffer uses one.
        let Slot::Ready(..) = rx.prepare(q, &m, &mut u, 1500, true, 1024, &stats) else {
            panic!("starved with buffers posted");
        };
        assert_eq!(rx.complete(q, &m, &mut u, 1000, false, false), 1);
        // Without a num_buffers field nothing is written into the header area.
        assert_eq!(d.read(bufs[2].1 + 10, 2), vec![0xee, 0xee]);
        // One buffer of 1000 bytes left, 1500 needed, ring not full: starved, still held.
        assert!(matches!(
            rx.prepare(q, &m, &mut u, 1500, true, 1024, &stats),
            Slot::Starved
        ));
        assert_eq!(rx.held(), 1);
        rx.give_back(q);
        assert_eq!(q.next_avail(), 3);
        assert_eq!(stats.total_drops(), 0);
    }

    #[test]
    fn empty_chains_are_returned_and_counted() {
        let (gm, mem) = guest_memory();
        let mut d = Driver::new(&gm, RX_RING, 16, RX_BUFS);
        let a = d.alloc(16);
        let empty = d.add_chain(&[(a, 0, WRITE)]);
        let (good, _) = d.add_rx(2048);
        let vring = d.vring(&mem);
        let m = mem.memory().into_inner();
        let stats = DirectionStats::default();
        let mut rx = RxBuffers::default();
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        let mut u = UsedBatch::new(q);
        let Slot::Ready(iov, _) = rx.prepare(q, &m, &mut u, 1500, false, 1024, &stats) else {
            panic!("starved with a good buffer posted");
        };
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_len, 2048);
        assert_eq!(stats.drops_of(DropReason::BadChain), 1);
        assert_eq!(rx.complete(q, &m, &mut u, 100, true, false), 1);
        u.publish(q, m.as_ref()).unwrap();
        assert_eq!(
            d.all_used(),
            vec![(u32::from(empty), 0), (u32::from(good), 100)]
        );
    }
}
