//! Which RX slot to consume next, when the kernel fills slots out of order.
//!
//! The kernel claims TPACKET_V2 slots strictly in ring order, but with several CPUs receiving
//! at once a later slot can be filled before an earlier one (the earlier CPU is still copying,
//! or was preempted). A consumer that only ever looks at the next slot in order stalls behind
//! such a hole while the ring fills up and the kernel drops frames. This cursor consumes past a
//! hole, and comes back to the hole when it is filled, but gives slots back to the kernel only
//! in order: the kernel reuses slots in order, and a slot it reaches must be one we are done
//! with, not one we skipped.
//!
//! Slots are counted (slot = count % ring size): everything before `head` is back with the
//! kernel; each slot from `head` to `next` is either consumed and held, or a hole.

/// Out-of-order consumption with in-order release over a ring of `n` slots.
pub struct RxCursor {
    n: usize,
    head: usize,
    next: usize,
    held: Vec<bool>,
    max_ahead: usize,
    peek: usize,
}

impl RxCursor {
    /// A cursor at slot 0 of an `n`-slot ring that runs at most `max_ahead` slots past a hole
    /// and looks `peek` slots past an empty one for frames filled out of order.
    pub fn new(n: usize, max_ahead: usize, peek: usize) -> Self {
        RxCursor {
            n,
            head: 0,
            next: 0,
            held: vec![false; n],
            max_ahead: max_ahead.min(n / 2),
            peek,
        }
    }

    /// Starts over at slot 0 (a new ring).
    pub fn reset(&mut self) {
        self.head = 0;
        self.next = 0;
        self.held.iter_mut().for_each(|h| *h = false);
    }

    /// Gives back (`release`) the consumed slots at the head, in order.
    pub fn release_consumed(&mut self, mut release: impl FnMut(usize)) {
        while self.head < self.next && self.held[self.head % self.n] {
            self.held[self.head % self.n] = false;
            release(self.head);
            self.head += 1;
        }
    }

    /// The next slot to consume, given which slots hold a frame (`ready`), or None when there
    /// is nothing to consume now. Call [`release_consumed`](Self::release_consumed) first.
    pub fn pick(&mut self, ready: impl Fn(usize) -> bool) -> Option<usize> {
        loop {
            let ahead = self.next - self.head;
            if ahead > 0 && ready(self.head) {
                // A hole at the head, filled now.
                return Some(self.head);
            }
            if ahead < self.max_ahead && ready(self.next) {
                return Some(self.next);
            }
            // A frame in a later slot means the kernel already claimed this one: it is a hole
            // (being filled by another CPU). Move past it and come back when it is filled.
            if ahead + self.peek < self.max_ahead && (1..=self.peek).any(|k| ready(self.next + k)) {
                self.next += 1;
                continue;
            }
            return None;
        }
    }

    /// Records that `slot` (from [`pick`](Self::pick)) was consumed. Returns true when it must
    /// be given back to the kernel now (it is the head); otherwise it is held until the holes
    /// before it are consumed.
    pub fn consumed(&mut self, slot: usize) -> bool {
        if slot == self.head {
            self.head += 1;
            self.next = self.next.max(self.head);
            true
        } else {
            self.held[slot % self.n] = true;
            self.next = self.next.max(slot + 1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status of a simulated slot.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum St {
        Kernel,
        User(u64),
    }

    /// The kernel side of a TPACKET_V2 RX ring: claims in order at `head` (dropping when the
    /// slot there is not free or still being written), fills claimed slots in any order.
    struct Kernel {
        slots: Vec<St>,
        owned: Vec<bool>,
        head: usize,
        in_flight: Vec<(usize, u64)>,
        seq: u64,
        drops: u64,
    }

    impl Kernel {
        fn new(n: usize) -> Self {
            Kernel {
                slots: vec![St::Kernel; n],
                owned: vec![false; n],
                head: 0,
                in_flight: Vec::new(),
                seq: 0,
                drops: 0,
            }
        }

        fn claim(&mut self) {
            let n = self.slots.len();
            let h = self.head % n;
            if self.slots[h] != St::Kernel || self.owned[h] {
                self.drops += 1;
                return;
            }
            self.owned[h] = true;
            self.in_flight.push((h, self.seq));
            self.seq += 1;
            self.head += 1;
        }

        fn fill(&mut self, i: usize) {
            let (slot, seq) = self.in_flight.remove(i);
            self.slots[slot] = St::User(seq);
            self.owned[slot] = false;
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Consumes everything consumable; returns the frames in consumption order.
    fn drain(c: &mut RxCursor, k: &mut Kernel, out: &mut Vec<u64>) {
        let n = k.slots.len();
        loop {
            c.release_consumed(|s| k.slots[s % n] = St::Kernel);
            let Some(slot) = c.pick(|s| matches!(k.slots[s % n], St::User(_))) else {
                return;
            };
            let St::User(seq) = k.slots[slot % n] else {
                panic!("picked an empty slot {slot}");
            };
            out.push(seq);
            if c.consumed(slot) {
                k.slots[slot % n] = St::Kernel;
            } else {
                // Held: still marked as the kernel left it.
            }
        }
    }

    #[test]
    fn a_hole_does_not_block_later_frames_and_is_taken_when_filled() {
        let n = 16;
        let mut k = Kernel::new(n);
        let mut c = RxCursor::new(n, 8, 4);
        let mut out = Vec::new();
        for _ in 0..4 {
            k.claim();
        }
        // CPU A still writes slot 0; slots 1..3 are filled.
        k.fill(3);
        k.fill(2);
        k.fill(1);
        drain(&mut c, &mut k, &mut out);
        assert_eq!(out, [1, 2, 3]);
        // Held, not released: the kernel cannot reuse them before slot 0 is done.
        assert!(matches!(k.slots[1], St::User(_)));
        k.fill(0);
        drain(&mut c, &mut k, &mut out);
        assert_eq!(out, [1, 2, 3, 0]);
        assert!(k.slots.iter().all(|s| *s == St::Kernel));
        // In-order traffic afterwards, around the ring several times.
        for _ in 0..100 {
            k.claim();
            k.fill(0);
            drain(&mut c, &mut k, &mut out);
        }
        assert_eq!(out.len(), 104);
        assert_eq!(k.drops, 0);
    }

    #[test]
    fn random_out_of_order_fills_lose_and_duplicate_nothing() {
        for seed in 1..200u64 {
            let n = 32;
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut k = Kernel::new(n);
            let mut c = RxCursor::new(n, 16, 4);
            let mut out = Vec::new();
            for _ in 0..5000 {
                match rng.below(10) {
                    0..=3 => k.claim(),
                    4..=6 if !k.in_flight.is_empty() => {
                        // Mostly the oldest claim finishes first; sometimes another CPU wins.
                        let i = if rng.below(4) == 0 {
                            rng.below(k.in_flight.len())
                        } else {
                            0
                        };
                        k.fill(i);
                    }
                    _ => drain(&mut c, &mut k, &mut out),
                }
            }
            while !k.in_flight.is_empty() {
                k.fill(0);
            }
            drain(&mut c, &mut k, &mut out);
            let mut sorted = out.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                out.len(),
                "seed {seed}: a frame was consumed twice"
            );
            assert_eq!(
                out.len() as u64,
                k.seq,
                "seed {seed}: a frame was never consumed"
            );
            assert!(
                k.slots.iter().all(|s| *s == St::Kernel),
                "seed {seed}: slots not given back"
            );
        }
    }

    #[test]
    fn an_unfilled_hole_bounds_how_far_consumption_runs_ahead() {
        let n = 32;
        let mut k = Kernel::new(n);
        let mut c = RxCursor::new(n, 8, 4);
        let mut out = Vec::new();
        for _ in 0..20 {
            k.claim();
        }
        // Fill everything but slot 0.
        for _ in 1..20 {
            k.fill(1);
        }
        drain(&mut c, &mut k, &mut out);
        // At most max_ahead - 1 slots consumed past the hole (peek stops short of the limit).
        assert!(!out.is_empty() && out.len() < 8, "{out:?}");
        k.fill(0);
        drain(&mut c, &mut k, &mut out);
        assert_eq!(out.len(), 20);
        assert!(k.slots.iter().all(|s| *s == St::Kernel));
    }
}
