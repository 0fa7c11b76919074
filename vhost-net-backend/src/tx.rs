//! Transmit side (guest → host): a burst of guest chains gathered behind one read of the avail
//! index, each turned into host iovecs, and the sending of one chain's frame to the host
//! queue. The worker ([`crate::worker`]) drives the bursts and does the accounting: used
//! entries, counters, notifications.

use std::io;
use std::ops::Range;

use virtio_queue::{Queue, QueueOwnedT};

use crate::chain::{collect_chain, Access};
use crate::dirty::GuestMemoryMmap;
use crate::port::HostQueue;
use crate::security::SourceCheck;
use crate::stats::DropReason;

/// Smallest frame accepted from the guest: an Ethernet header.
const MIN_FRAME: usize = 14;

/// One guest chain of a TX burst.
#[derive(Clone, Debug)]
pub(crate) struct TxChain {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// Its iovecs in [`TxBurst::iov`].
    pub iov: Range<usize>,
    /// Its length (virtio-net header included), or why it is refused.
    pub gathered: Result<usize, DropReason>,
}

/// The chains of one TX burst and their iovecs; the buffers are reused from burst to burst.
/// The iovecs point into guest memory and are only valid until the burst is cleared.
#[derive(Default)]
pub(crate) struct TxBurst {
    /// Host iovecs of every gathered chain, back to back.
    pub iov: Vec<libc::iovec>,
    /// The gathered chains, in ring order.
    pub chains: Vec<TxChain>,
}

impl TxBurst {
    /// Pops up to `room` chains behind one read of the avail index and gathers each (at most
    /// `max_len` bytes). A ring the device cannot read yields no chains.
    pub fn gather(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, max_len: usize, room: usize) {
        self.clear();
        let Ok(iter) = q.iter(mem) else {
            return;
        };
        for chain in iter.take(room) {
            let head = chain.head_index();
            let start = self.iov.len();
            let gathered = collect_chain(chain, mem, Access::Read, max_len, &mut self.iov);
            self.chains.push(TxChain {
                head,
                iov: start..self.iov.len(),
                gathered,
            });
        }
    }

    /// Forgets the burst (its iovecs point into guest memory).
    pub fn clear(&mut self) {
        self.iov.clear();
        self.chains.clear();
    }
}

/// Why one chain's frame did not reach the host queue.
pub(crate) enum NotSent {
    /// Refused by a check; counted under this reason.
    Dropped(DropReason),
    /// The host queue failed; counted as [`DropReason::HostError`] and logged.
    HostError(io::Error),
}

/// Sends the frame of `chain` (gathered into `iov`, behind a `hdr_len`-byte virtio-net
/// header) to `port`, after the port-security check when there is one. Returns the frame's
/// length without the header.
///
/// # Safety
/// `iov` must describe guest memory that stays mapped for the call (as [`TxBurst::gather`]
/// made it).
pub(crate) unsafe fn send_chain(
    port: &mut dyn HostQueue,
    source_check: Option<&mut SourceCheck>,
    hdr_len: usize,
    chain: &TxChain,
    iov: &[libc::iovec],
) -> Result<usize, NotSent> {
    let len = chain.gathered.map_err(NotSent::Dropped)?;
    if len < hdr_len + MIN_FRAME {
        return Err(NotSent::Dropped(DropReason::Runt));
    }
    let iov = match source_check {
        None => iov,
        Some(c) => {
            // SAFETY: the caller guarantees the iovecs point into mapped guest memory.
            let checked = unsafe { c.check(iov, hdr_len) };
            checked.ok_or(NotSent::Dropped(DropReason::SpoofedSource))?
        }
    };
    // SAFETY: the iovecs point into guest memory mapped for the call (the caller's promise),
    // or the first one into `source_check`'s copy, untouched until its next frame.
    match unsafe { port.send(iov) } {
        Ok(_) => Ok(len - hdr_len),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            Err(NotSent::Dropped(DropReason::HostRejected))
        }
        Err(e) => Err(NotSent::HostError(e)),
    }
}
