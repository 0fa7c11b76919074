//! Batched completion of split-virtqueue chains.
//!
//! `Queue::add_used` stores the used index after every element, so a frontend that polls the
//! index from another core (DPDK's virtio-user, a guest under load) takes a cache-line miss per
//! frame. [`UsedBatch`] writes each element as its chain completes and publishes the index once
//! per batch. Whether to interrupt the driver is then decided over everything published since
//! the batch began, with the same rule `Queue::needs_notification` applies (virtio 1.2 §2.7.10:
//! `VIRTIO_RING_F_EVENT_IDX`'s `used_event`, else the avail ring's `NO_INTERRUPT` flag).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Bytes before the first used element: `flags` and `idx`.
const USED_RING_HEADER: u64 = 4;
/// Size of one used element (`id`, `len`).
const USED_ELEM_SIZE: u64 = 8;
/// Bytes before the first avail ring entry: `flags` and `idx`.
const AVAIL_RING_HEADER: u64 = 4;
/// Avail ring flag: the driver wants no interrupts (without `EVENT_IDX`).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Why a chain could not be completed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsedError {
    /// The chain's head index is not a descriptor of this ring: it has no used entry to take.
    #[error("head index {0} is beyond the ring")]
    BadHead(u16),
    /// The used ring is not (entirely) in guest memory.
    #[error("used ring outside guest memory")]
    BadAddress,
}

/// Used elements of one queue written since the last publish, and the used index the current
/// notification window started at.
#[derive(Debug)]
pub struct UsedBatch {
    /// Elements written after `q.next_used()` but not yet visible to the driver.
    pending: u16,
    /// `next_used` when the window began: the driver has been told about everything before it.
    window_start: u16,
}

impl UsedBatch {
    /// Starts a batch (and a notification window) at the queue's current used index.
    pub fn new(q: &Queue) -> Self {
        Self {
            pending: 0,
            window_start: q.next_used(),
        }
    }

    /// Writes the used element of chain `head` (`len` bytes written by the device). Publishes
    /// first if the ring is full of unpublished elements, so none is ever overwritten.
    pub fn push<M: GuestMemory>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), UsedError> {
        let size = q.size();
        if head >= size {
            return Err(UsedError::BadHead(head));
        }
        if self.pending >= size {
            self.publish(q, mem)?;
        }
        let slot = (Wrapping(q.next_used()) + Wrapping(self.pending)).0 % size;
        let addr = GuestAddress(q.used_ring())
            .checked_add(USED_RING_HEADER + u64::from(slot) * USED_ELEM_SIZE)
            .ok_or(UsedError::BadAddress)?;
        // `struct virtq_used_elem { le32 id; le32 len; }` as one little-endian u64.
        let elem = u64::from(head) | (u64::from(len) << 32);
        mem.write_obj(elem.to_le(), addr)
            .map_err(|_| UsedError::BadAddress)?;
        self.pending += 1;
        Ok(())
    }

    /// Makes the written elements visible: one release store of the used index.
    pub fn publish<M: GuestMemory>(&mut self, q: &mut Queue, mem: &M) -> Result<(), UsedError> {
        if self.pending == 0 {
            return Ok(());
        }
        let next = Wrapping(q.next_used()) + Wrapping(self.pending);
        let idx = GuestAddress(q.used_ring())
            .checked_add(2)
            .ok_or(UsedError::BadAddress)?;
        mem.store(u16::to_le(next.0), idx, Ordering::Release)
            .map_err(|_| UsedError::BadAddress)?;
        q.set_next_used(next.0);
        self.pending = 0;
        Ok(())
    }

    /// Whether the driver wants an interrupt for what was published since the window began;
    /// starts a new window. Unreadable driver fields mean "notify": a lost interrupt stalls the
    /// guest, a spurious one costs it nothing.
    pub fn needs_notification<M: GuestMemory>(&mut self, q: &Queue, mem: &M) -> bool {
        let old = Wrapping(self.window_start);
        let new = Wrapping(q.next_used());
        self.window_start = new.0;
        let avail = GuestAddress(q.avail_ring());
        if !q.event_idx_enabled() {
            return match mem.load::<u16>(avail, Ordering::Acquire) {
                Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
                Err(_) => true,
            };
        }
        // The used index store must be visible before `used_event` is read, or an update of
        // `used_event` the driver made meanwhile could be missed (virtio 1.2 §2.7.10).
        fence(Ordering::SeqCst);
        let used_event = avail
            .checked_add(AVAIL_RING_HEADER + 2 * u64::from(q.size()))
            .and_then(|a| mem.load::<u16>(a, Ordering::Acquire).ok());
        match used_event {
            Some(e) => new - Wrapping(u16::from_le(e)) - Wrapping(1) < new - old,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const SIZE: u16 = 16;

    fn setup() -> (GuestMemoryMmap, Queue, u64, u64) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, SIZE);
        let mut q: Queue = mock.create_queue().unwrap();
        // The mock's used ring overlaps the end of its avail ring (`used_event`): use our own.
        q.set_used_ring_address(Some(0x8000), Some(0));
        let (avail, used) = (q.avail_ring(), q.used_ring());
        (mem, q, avail, used)
    }

    fn used_idx(mem: &GuestMemoryMmap, used: u64) -> u16 {
        mem.read_obj(GuestAddress(used + 2)).unwrap()
    }

    fn elem(mem: &GuestMemoryMmap, used: u64, slot: u64) -> (u32, u32) {
        let a = used + USED_RING_HEADER + slot * USED_ELEM_SIZE;
        (
            mem.read_obj(GuestAddress(a)).unwrap(),
            mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    #[test]
    fn elements_become_visible_only_on_publish_with_one_index_update() {
        let (mem, mut q, _, used) = setup();
        let mut b = UsedBatch::new(&q);
        for head in [3u16, 5, 7] {
            b.push(&mut q, &mem, head, 100 + u32::from(head)).unwrap();
        }
        assert_eq!(used_idx(&mem, used), 0, "nothing published yet");
        assert_eq!(q.next_used(), 0);
        b.publish(&mut q, &mem).unwrap();
        assert_eq!(used_idx(&mem, used), 3);
        assert_eq!(q.next_used(), 3);
        assert_eq!(elem(&mem, used, 0), (3, 103));
        assert_eq!(elem(&mem, used, 2), (7, 107));
    }

    #[test]
    fn bad_head_is_refused_and_takes_no_slot() {
        let (mem, mut q, _, used) = setup();
        let mut b = UsedBatch::new(&q);
        assert_eq!(b.push(&mut q, &mem, SIZE, 0), Err(UsedError::BadHead(SIZE)));
        b.push(&mut q, &mem, 1, 0).unwrap();
        b.publish(&mut q, &mem).unwrap();
        assert_eq!(used_idx(&mem, used), 1);
        assert_eq!(elem(&mem, used, 0), (1, 0));
    }

    #[test]
    fn a_full_ring_of_pending_elements_is_published_before_it_wraps() {
        let (mem, mut q, _, used) = setup();
        let mut b = UsedBatch::new(&q);
        for i in 0..SIZE + 2 {
            b.push(&mut q, &mem, i % SIZE, u32::from(i)).unwrap();
        }
        assert_eq!(used_idx(&mem, used), SIZE, "first ring's worth published");
        b.publish(&mut q, &mem).unwrap();
        assert_eq!(used_idx(&mem, used), SIZE + 2);
        assert_eq!(elem(&mem, used, 1), (1, u32::from(SIZE) + 1));
    }

    #[test]
    fn used_ring_outside_memory_is_an_error_not_a_write() {
        let (mem, mut q, _, _) = setup();
        q.set_used_ring_address(Some(0xffff_fff0), Some(0));
        let mut b = UsedBatch::new(&q);
        assert_eq!(b.push(&mut q, &mem, 0, 0), Err(UsedError::BadAddress));
    }

    #[test]
    fn event_idx_notifies_when_used_event_falls_inside_the_window() {
        let (mem, mut q, avail, _) = setup();
        q.set_event_idx(true);
        let used_event = GuestAddress(avail + AVAIL_RING_HEADER + 2 * u64::from(SIZE));
        // The driver asks to hear when entry 4 (the fifth) is used.
        mem.write_obj(4u16, used_event).unwrap();
        let mut b = UsedBatch::new(&q);
        for i in 0..4 {
            b.push(&mut q, &mem, i, 0).unwrap();
        }
        b.publish(&mut q, &mem).unwrap();
        assert!(
            !b.needs_notification(&q, &mem),
            "entries 0..4 do not reach used_event"
        );
        b.push(&mut q, &mem, 4, 0).unwrap();
        b.push(&mut q, &mem, 5, 0).unwrap();
        b.publish(&mut q, &mem).unwrap();
        assert!(
            b.needs_notification(&q, &mem),
            "entry 4 was used in this window"
        );
        b.push(&mut q, &mem, 6, 0).unwrap();
        b.publish(&mut q, &mem).unwrap();
        assert!(
            !b.needs_notification(&q, &mem),
            "already told about entry 4"
        );
    }

    #[test]
    fn without_event_idx_the_no_interrupt_flag_decides() {
        let (mem, mut q, avail, _) = setup();
        let mut b = UsedBatch::new(&q);
        b.push(&mut q, &mem, 0, 0).unwrap();
        b.publish(&mut q, &mem).unwrap();
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, GuestAddress(avail))
            .unwrap();
        assert!(!b.needs_notification(&q, &mem));
        mem.write_obj(0u16, GuestAddress(avail)).unwrap();
        assert!(b.needs_notification(&q, &mem));
    }

    #[test]
    fn agrees_with_add_used_and_needs_notification_of_virtio_queue() {
        // The same completions through both paths, for every used_event: same index, same
        // elements, same decision.
        for event in 0..12u16 {
            let (mem_a, mut qa, avail_a, used_a) = setup();
            let (mem_b, mut qb, avail_b, used_b) = setup();
            for (mem, q, avail) in [(&mem_a, &mut qa, avail_a), (&mem_b, &mut qb, avail_b)] {
                q.set_event_idx(true);
                let at = GuestAddress(avail + AVAIL_RING_HEADER + 2 * u64::from(SIZE));
                mem.write_obj(event, at).unwrap();
            }
            let mut b = UsedBatch::new(&qb);
            for round in 0..3u16 {
                for i in 0..3 {
                    let head = round * 3 + i;
                    qa.add_used(&mem_a, head, u32::from(head)).unwrap();
                    b.push(&mut qb, &mem_b, head, u32::from(head)).unwrap();
                }
                b.publish(&mut qb, &mem_b).unwrap();
                assert_eq!(
                    qa.needs_notification(&mem_a).unwrap(),
                    b.needs_notification(&qb, &mem_b),
                    "used_event {event}, round {round}"
                );
                assert_eq!(used_idx(&mem_a, used_a), used_idx(&mem_b, used_b));
            }
            for slot in 0..9 {
                assert_eq!(elem(&mem_a, used_a, slot), elem(&mem_b, used_b, slot));
            }
        }
    }
}
