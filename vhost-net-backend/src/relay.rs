//! A message-level relay between a vhost-user frontend and the `vhost` crate's request handler
//! that fixes one ordering incompatibility with QEMU.
//!
//! Why this exists: QEMU's virtio-net (7.2 and 10.0 alike) sends `SET_VRING_ENABLE` for each ring
//! *before* `SET_FEATURES`, and never again after it. The `vhost` crate's `BackendReqHandler`
//! (0.18) rejects that message while `VHOST_USER_F_PROTOCOL_FEATURES` is not yet acked and drops
//! the connection; and once the feature is acked, rings start disabled, so merely ignoring the
//! early message would leave the device dead. Rather than re-implementing the whole protocol
//! handler, we keep the crate's handler (and its validation of every message) and put this relay
//! in front of it: early enables are answered here, remembered, and replayed to the handler once
//! they are legal (after `SET_FEATURES`) *and* their ring is set up: it has its kick and its call
//! descriptor. The second condition matters as much as the first. QEMU's kick eventfd starts
//! signalled, so a ring enabled at `SET_VRING_KICK` starts moving frames at once, before the
//! `SET_VRING_CALL` that QEMU sends next: the interrupts for those frames go nowhere, and with
//! `VIRTIO_RING_F_EVENT_IDX` the device then believes the guest was told and never tells it
//! again. That stalls a guest that comes up on a ring with work already queued: the
//! destination of a live migration, a guest whose backend restarted, or a boot with frames
//! waiting in the tap. DPDK's vhost library uses the same rule for a ring to be ready.
//!
//! A second mismatch comes with multiqueue: QEMU drives each queue pair as its own vhost device
//! over the one connection, and with `CONFIGURE_MEM_SLOTS` each of them sends `ADD_MEM_REG` for
//! every guest RAM region, so the backend sees the same region added once per queue pair (the
//! library then fails with "memory regions intersect"). The relay keeps a use count per region:
//! only the first add and the last remove reach the handler, the others are acknowledged here.
//!
//! Everything else passes through unchanged, with its file descriptors, within two limits:
//!
//! - *Flow control.* The relay holds at most one message per direction. A frontend that
//!   pipelines requests and never reads the replies fills its socket; a write to it that finds
//!   no room for [`FRONTEND_SEND_TIMEOUT`] ends the session ([`RelayError::FrontendStalled`]).
//!   Whichever direction ends first shuts down both sockets, which makes every blocked read and
//!   write of the session return (the relay's and the request handler's), so the port goes on
//!   to the next frontend.
//! - *File descriptors.* The relay tallies the descriptors the handler keeps for the session
//!   (one per memory region, one per vring kick/call/err, one per other request that carries
//!   one) and refuses a message that would take the tally over the session's budget
//!   ([`Limits`]); the slot count announced in the reply to `GET_MAX_MEM_SLOTS` is lowered to
//!   the budget's memory share, so a frontend that follows it never gets there.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR_LEN: usize = 12;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// SEND_RARP requests a session may have announced; QEMU sends a handful after a migration,
/// so more is a frontend flooding the host port with broadcasts: those are answered, not sent.
pub const MAX_ANNOUNCEMENTS: usize = 16;
/// More remembered early enables than this is not a real frontend.
const MAX_PENDING_ENABLES: usize = 64;
/// Body of ADD/REM_MEM_REG: 8 bytes of padding, then guest address, size, user address, offset.
const MEM_REG_BODY: usize = 40;
/// Low byte of a vring fd request's body: the ring index (the rest are flags).
const VRING_IDX_MASK: u64 = 0xff;

/// How long a write to the frontend may wait for room in its socket before the frontend counts
/// as not reading its replies.
pub const FRONTEND_SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a write to the request handler may wait. A safety net: the handler stops reading
/// only while its replies cannot be delivered, which the frontend's timeout resolves.
pub const HANDLER_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Memory regions a session may have, announced as the reply to `GET_MAX_MEM_SLOTS` (the
/// library itself announces 509; QEMU needs one per RAM region, a handful without hotplug).
pub const MEM_SLOTS: usize = 64;
/// Descriptors per vring the handler keeps: kick, call, err.
const FDS_PER_RING: usize = 3;
/// Descriptors beyond memory and vrings: log base and fd, backend request channel, inflight
/// area, device state, and some slack.
const OTHER_FDS: usize = 8;

/// What one session may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory regions (one descriptor each); also the slot count announced to the frontend.
    pub mem_slots: usize,
    /// Descriptors the handler may keep for the session at once, memory regions included.
    pub max_fds: usize,
    /// See [`FRONTEND_SEND_TIMEOUT`].
    pub frontend_send_timeout: Duration,
    /// See [`HANDLER_SEND_TIMEOUT`].
    pub handler_send_timeout: Duration,
    /// Rings of the device (two per queue pair).
    pub rings: usize,
}

impl Limits {
    /// The limits for a device with `queue_pairs` RX/TX queue pairs.
    pub fn for_queue_pairs(queue_pairs: usize) -> Self {
        Limits {
            mem_slots: MEM_SLOTS,
            max_fds: MEM_SLOTS + FDS_PER_RING * 2 * queue_pairs + OTHER_FDS,
            frontend_send_timeout: FRONTEND_SEND_TIMEOUT,
            handler_send_timeout: HANDLER_SEND_TIMEOUT,
            rings: 2 * queue_pairs,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::for_queue_pairs(1)
    }
}

/// Why a relayed session ended other than by a peer closing its socket.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The frontend left replies unread until its socket was full.
    #[error("the frontend stopped reading replies (no room for one in {0:?}); disconnected it")]
    FrontendStalled(Duration),
    /// The request handler stopped reading requests.
    #[error("the request handler stopped reading requests (no room for one in {0:?})")]
    HandlerStalled(Duration),
    /// The frontend handed over more file descriptors than a session may keep.
    #[error(
        "refused: the frontend would leave {held} file descriptors ({what}) with the session, \
         over its budget of {budget}"
    )]
    FdBudget {
        /// Which budget: memory regions, or all descriptors.
        what: &'static str,
        /// The tally the message would have made.
        held: usize,
        /// The budget.
        budget: usize,
    },
    /// The frontend broke the protocol in a way the relay refuses.
    #[error("{0}")]
    Protocol(String),
    /// Socket error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl RelayError {
    /// True for the ends a peer causes by going away, which are not failures.
    fn is_hang_up(&self) -> bool {
        matches!(self, RelayError::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
        ))
    }
}

/// An info line of the session, or a debug line when the session's logging is rate-limited.
macro_rules! session_info {
    ($quiet:expr, $($arg:tt)+) => {
        if $quiet {
            tracing::debug!($($arg)+)
        } else {
            tracing::info!($($arg)+)
        }
    };
}

/// One vhost-user message with the file descriptors that came with it.
struct Message {
    hdr: [u8; HDR_LEN],
    body: Vec<u8>,
    files: Vec<File>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }

    fn new(request: u32, flags: u32, body: Vec<u8>) -> Self {
        let mut hdr = [0u8; HDR_LEN];
        hdr[0..4].copy_from_slice(&request.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        // Bodies built here are at most 8 bytes.
        hdr[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Message {
            hdr,
            body,
            files: Vec::new(),
        }
    }
}

/// Reads exactly `buf.len()` bytes, collecting any file descriptors that arrive. Returns
/// `Ok(false)` on a clean end of stream before the first byte.
fn read_exact_fds(sock: &UnixStream, buf: &mut [u8], files: &mut Vec<File>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let mut fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
        let mut iov = [libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        }];
        // SAFETY: the iovec describes the unread tail of `buf`, which we borrow mutably.
        let (n, nfds) = match unsafe { sock.recv_with_fds(&mut iov, &mut fds) } {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        };
        for fd in fds.iter().take(nfds) {
            // SAFETY: recvmsg just gave us ownership of these descriptors.
            files.push(unsafe { File::from_raw_fd(*fd) });
        }
        // Every recvmsg can bring new descriptors: without a bound per message, a frontend
        // sending its body a byte at a time could pin the whole process's fd table (every
        // port's) for as long as it keeps the message unfinished.
        if files.len() > MAX_ATTACHED_FD_ENTRIES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_ATTACHED_FD_ENTRIES} file descriptors with one message"),
            ));
        }
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the socket in the middle of a message",
            ));
        }
        got += n;
    }
    Ok(true)
}

fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut files = Vec::new();
    if !read_exact_fds(sock, &mut hdr, &mut files)? {
        return Ok(None);
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message body of {size} bytes exceeds {MAX_MSG_SIZE}"),
        ));
    }
    let mut body = vec![0u8; size];
    if size > 0 && !read_exact_fds(sock, &mut body, &mut files)? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the socket after a message header",
        ));
    }
    Ok(Some(Message { hdr, body, files }))
}

fn write_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let mut data = Vec::with_capacity(HDR_LEN + msg.body.len());
    data.extend_from_slice(&msg.hdr);
    data.extend_from_slice(&msg.body);
    let fds: Vec<RawFd> = msg.files.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < data.len() {
        let chunk: &[u8] = &data[sent..];
        let fds_now: &[RawFd] = if sent == 0 { &fds } else { &[] };
        match sock.send_with_fds(&[chunk], fds_now) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => sent += n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
    Ok(())
}

/// Writes `msg`, turning a write that timed out for lack of room into `stalled(timeout)`.
fn send(
    sock: &UnixStream,
    msg: &Message,
    timeout: Duration,
    stalled: fn(Duration) -> RelayError,
) -> Result<(), RelayError> {
    write_message(sock, msg).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => stalled(timeout),
        _ => e.into(),
    })
}

/// The descriptors the request handler keeps for the session, as far as the relay can tell:
/// those of the memory regions, and one for each (request, ring) whose descriptor replaces the
/// one sent before (vring kick/call/err per ring, log, backend channel, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FdTally {
    mem: usize,
    kept: BTreeSet<(u32, u32)>,
}

impl FdTally {
    fn total(&self) -> usize {
        self.mem + self.kept.len()
    }
}

/// The relay's view of the session: whether features are set, enables held until then, memory
/// regions and the descriptors the handler keeps.
#[derive(Default)]
struct Session {
    features_set: bool,
    /// `SET_VRING_ENABLE`s held back (ring index, value), the latest per ring.
    pending: Vec<(u32, u32)>,
    /// Rings that have their kick / call descriptor since they were last stopped.
    kicked: BTreeSet<u32>,
    called: BTreeSet<u32>,
    /// Memory regions added through ADD_MEM_REG, keyed by (guest address, size, user address),
    /// with the number of vhost devices of the frontend that added them.
    regions: Vec<([u64; 3], u32)>,
    /// End of guest physical memory (highest region end) announced so far: a dirty log must
    /// cover it.
    mem_end: u64,
    fds: FdTally,
    limits: Limits,
    /// Per-session info lines go to debug (the session log is rate-limited).
    quiet: bool,
    /// The MAC of a SEND_RARP just answered, for the caller to announce.
    announce: Option<[u8; 6]>,
    /// SEND_RARP requests honoured so far (at most [`MAX_ANNOUNCEMENTS`]).
    announced: usize,
}

/// A change to the tracked memory regions that a forwarded message makes.
enum RegionChange {
    Added([u64; 3]),
    Removed(usize),
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Byte offsets of the region entries (guest address, size, user address, mmap offset) in the
/// body of a SET_MEM_TABLE (num_regions, padding, then the entries) or ADD_MEM_REG (padding,
/// then one entry); none for any other message or a body too short for what it announces.
fn region_entries(msg: &Message) -> impl Iterator<Item = usize> {
    let count = if msg.request() == FrontendReq::SET_MEM_TABLE as u32 && msg.body.len() >= 8 {
        let n = u32::from_le_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]);
        (n as usize).min((msg.body.len() - 8) / 32)
    } else if msg.request() == FrontendReq::ADD_MEM_REG as u32 && msg.body.len() == MEM_REG_BODY {
        1
    } else {
        0
    };
    (0..count).map(|i| 8 + 32 * i)
}

/// The highest guest physical address + 1 of the regions in a SET_MEM_TABLE or ADD_MEM_REG.
fn regions_end(msg: &Message) -> u64 {
    region_entries(msg)
        .map(|at| u64_at(&msg.body, at).saturating_add(u64_at(&msg.body, at + 8)))
        .max()
        .unwrap_or(0)
}

/// Refuses memory regions that would map past the end of their file. The library maps them
/// without looking (mmap allows it), and the first access to such a page raises SIGBUS: with
/// the sandbox's seccomp filter the signal handler cannot reset itself and the thread faults
/// forever at 100% CPU, and without it the whole process dies with every port. Only regular
/// files (memfd, tmpfs, hugetlbfs) have a size to check; other fds go to the library as they are.
/// A frontend that shrinks the file after this check can still cause the fault.
fn check_regions_within_files(msg: &Message) -> io::Result<()> {
    for (i, (file, at)) in msg.files.iter().zip(region_entries(msg)).enumerate() {
        let (size, offset) = (u64_at(&msg.body, at + 8), u64_at(&msg.body, at + 24));
        let md = file.metadata()?;
        if !md.file_type().is_file() {
            continue;
        }
        if offset.checked_add(size).is_none_or(|end| end > md.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "memory region {i} (offset {offset:#x}, size {size:#x}) extends past the end \
                     of its file ({:#x} bytes)",
                    md.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses a `SET_LOG_BASE` whose dirty log is not entirely inside its file: the library maps
/// it without looking, and marking a page past the end of the file would raise SIGBUS. The
/// library itself refuses a log too small for guest memory.
fn check_log_base(msg: &Message, mem_end: u64) -> Result<(), RelayError> {
    // Body: mmap_size, mmap_offset; one descriptor: the log.
    if msg.body.len() != 16 || msg.files.len() != 1 {
        return Err(RelayError::Protocol(format!(
            "SET_LOG_BASE with a body of {} bytes and {} descriptors (expected 16 and 1)",
            msg.body.len(),
            msg.files.len()
        )));
    }
    let (size, offset) = (u64_at(&msg.body, 0), u64_at(&msg.body, 8));
    let md = msg.files[0].metadata()?;
    if !md.file_type().is_file() {
        return Err(RelayError::Protocol(
            "SET_LOG_BASE: the log is not a regular file (memfd or shared-memory file)".into(),
        ));
    }
    // One bit per 4 KiB page of guest physical memory.
    let covers = size.saturating_mul(8).saturating_mul(4096);
    if covers < mem_end {
        return Err(RelayError::Protocol(format!(
            "SET_LOG_BASE: a log of {size} bytes covers {covers:#x} bytes of guest memory, \
             which ends at {mem_end:#x}"
        )));
    }
    if size == 0 || offset.checked_add(size).is_none_or(|end| end > md.len()) {
        return Err(RelayError::Protocol(format!(
            "SET_LOG_BASE: log (offset {offset:#x}, size {size:#x}) not within its file ({:#x} \
             bytes)",
            md.len()
        )));
    }
    Ok(())
}

fn ack(msg: &Message) -> Option<Message> {
    (msg.flags() & FLAG_NEED_REPLY != 0)
        .then(|| Message::new(msg.request(), FLAG_VERSION_1 | FLAG_REPLY, vec![0; 8]))
}

impl Session {
    /// Decides what to do with a frontend message: the messages to pass to the handler, and a
    /// reply to send straight back.
    fn on_frontend(&mut self, msg: Message) -> Result<(Vec<Message>, Option<Message>), RelayError> {
        let req = msg.request();
        if req == FrontendReq::SEND_RARP as u32 {
            // Answered here: the `vhost` crate's handler does not know this request. The body
            // is the guest's MAC in the first six bytes of a u64.
            if msg.body.len() != 8 || !msg.files.is_empty() {
                return Err(RelayError::Protocol(format!(
                    "SEND_RARP with a body of {} bytes and {} descriptors (expected 8 and 0)",
                    msg.body.len(),
                    msg.files.len()
                )));
            }
            if self.announced < MAX_ANNOUNCEMENTS {
                self.announced += 1;
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&msg.body[..6]);
                self.announce = Some(mac);
            } else if self.announced == MAX_ANNOUNCEMENTS {
                self.announced += 1;
                tracing::warn!(
                    max = MAX_ANNOUNCEMENTS,
                    "frontend keeps sending SEND_RARP; no more announcements this session"
                );
            }
            return Ok((Vec::new(), ack(&msg)));
        }
        if req == FrontendReq::SET_VRING_ENABLE as u32 && msg.body.len() == 8 {
            let index = u32::from_le_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]);
            let num = u32::from_le_bytes([msg.body[4], msg.body[5], msg.body[6], msg.body[7]]);
            self.pending.retain(|(i, _)| *i != index);
            // Legal and harmless now: passed through (a disable needs no ring set up, and the
            // handler refuses a ring the device does not have).
            let no_such_ring = usize::try_from(index).map_or(true, |i| i >= self.limits.rings);
            if self.features_set && (num == 0 || no_such_ring || self.ring_set_up(index)) {
                return Ok((vec![msg], None));
            }
            if self.pending.len() >= MAX_PENDING_ENABLES {
                return Err(RelayError::Protocol(
                    "too many SET_VRING_ENABLE messages held (before SET_FEATURES or before \
                     their ring is set up)"
                        .into(),
                ));
            }
            self.pending.push((index, num));
            tracing::debug!(
                index,
                num,
                "holding SET_VRING_ENABLE until SET_FEATURES and the ring's kick and call"
            );
            let reply = (msg.flags() & FLAG_NEED_REPLY != 0).then(|| {
                Message::new(
                    req,
                    FLAG_VERSION_1 | FLAG_REPLY,
                    0u64.to_le_bytes().to_vec(),
                )
            });
            return Ok((Vec::new(), reply));
        }
        if req == FrontendReq::SET_VRING_NUM as u32 && msg.body.len() == 8 {
            // Split rings only (no VIRTIO_F_RING_PACKED): the size must be a power of two. The
            // library's queue would silently keep its previous size, so device and driver would
            // disagree about where the rings end.
            let num = u32::from_le_bytes([msg.body[4], msg.body[5], msg.body[6], msg.body[7]]);
            if !num.is_power_of_two() {
                return Err(RelayError::Protocol(format!(
                    "SET_VRING_NUM {num} is not a power of two"
                )));
            }
        }
        if req == FrontendReq::SET_LOG_BASE as u32 {
            check_log_base(&msg, self.mem_end)?;
        }
        let is_add = req == FrontendReq::ADD_MEM_REG as u32;
        if req == FrontendReq::SET_MEM_TABLE as u32 || is_add {
            check_regions_within_files(&msg)?;
            let end = regions_end(&msg);
            self.mem_end = if is_add { self.mem_end.max(end) } else { end };
        }
        let mut change = None;
        if (is_add || req == FrontendReq::REM_MEM_REG as u32) && msg.body.len() == MEM_REG_BODY {
            let key = [
                u64_at(&msg.body, 8),
                u64_at(&msg.body, 16),
                u64_at(&msg.body, 24),
            ];
            let pos = self.regions.iter().position(|(k, _)| *k == key);
            match (is_add, pos) {
                (true, Some(i)) => {
                    self.regions[i].1 += 1;
                    return Ok((Vec::new(), ack(&msg)));
                }
                (true, None) => change = Some(RegionChange::Added(key)),
                (false, Some(i)) if self.regions[i].1 > 1 => {
                    self.regions[i].1 -= 1;
                    return Ok((Vec::new(), ack(&msg)));
                }
                (false, Some(i)) => change = Some(RegionChange::Removed(i)),
                // Removing an unknown region: let the handler refuse it.
                (false, None) => {}
            }
        }
        let fds = self.fds_after(&msg, matches!(change, Some(RegionChange::Removed(_))));
        self.check_budget(&fds)?;
        self.fds = fds;
        match change {
            Some(RegionChange::Added(key)) => {
                session_info!(
                    self.quiet,
                    gpa = format!("{:#x}", key[0]),
                    size = key[1],
                    "guest memory region added"
                );
                self.regions.push((key, 1));
            }
            Some(RegionChange::Removed(i)) => {
                session_info!(
                    self.quiet,
                    gpa = format!("{:#x}", self.regions[i].0[0]),
                    "guest memory region removed"
                );
                self.regions.swap_remove(i);
            }
            None => {}
        }
        if req == FrontendReq::SET_MEM_TABLE as u32 {
            // A whole new table replaces every region added one by one.
            self.regions.clear();
        }
        let ring = (msg.body.len() == 8).then(|| u32::from(msg.body[0]));
        match ring {
            // Bits 0-7 of the body are the ring index (bit 8: no descriptor, polling).
            Some(i) if req == FrontendReq::SET_VRING_KICK as u32 => {
                self.kicked.insert(i);
            }
            Some(i) if req == FrontendReq::SET_VRING_CALL as u32 => {
                self.called.insert(i);
            }
            // A stopped ring loses its descriptors in the handler.
            Some(i) if req == FrontendReq::GET_VRING_BASE as u32 => {
                self.kicked.remove(&i);
                self.called.remove(&i);
            }
            _ => {}
        }
        if req == FrontendReq::SET_FEATURES as u32 {
            self.features_set = true;
        }
        let mut out = vec![msg];
        out.extend(self.release_enables());
        Ok((out, None))
    }

    /// True once ring `index` has both its kick and its call descriptor.
    fn ring_set_up(&self, index: u32) -> bool {
        self.kicked.contains(&index) && self.called.contains(&index)
    }

    /// True once both rings of the queue pair of ring `index` are set up.
    fn pair_set_up(&self, index: u32) -> bool {
        self.ring_set_up(index) && self.ring_set_up(index ^ 1)
    }

    /// The held enables that may go to the handler now, in the order they came. A held enable
    /// waits for its whole queue pair: QEMU sets up one pair (one vhost device) at a time, and
    /// an interrupt sent while it is still between the pair's two rings was seen to get lost
    /// on the destination of a migration (QEMU 10.0, TCG) — the kernel's vhost-net, too, only
    /// starts a pair once both rings are configured.
    fn release_enables(&mut self) -> Vec<Message> {
        if !self.features_set || self.pending.is_empty() {
            return Vec::new();
        }
        let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|&(index, num)| num == 0 || self.pair_set_up(index));
        self.pending = held;
        ready
            .into_iter()
            .map(|(index, num)| {
                let mut body = index.to_le_bytes().to_vec();
                body.extend_from_slice(&num.to_le_bytes());
                Message::new(FrontendReq::SET_VRING_ENABLE as u32, FLAG_VERSION_1, body)
            })
            .collect()
    }

    /// The descriptor tally once the handler has taken `msg` (which `removes_region`, for a
    /// REM_MEM_REG of the last user of a region).
    fn fds_after(&self, msg: &Message, removes_region: bool) -> FdTally {
        let req = msg.request();
        let n = msg.files.len();
        let mut t = self.fds.clone();
        if req == FrontendReq::SET_MEM_TABLE as u32 {
            t.mem = n;
        } else if req == FrontendReq::ADD_MEM_REG as u32 {
            t.mem += n;
        } else if req == FrontendReq::REM_MEM_REG as u32 {
            // The descriptor sent with the removal itself is not kept.
            if removes_region {
                t.mem = t.mem.saturating_sub(1);
            }
        } else if [
            FrontendReq::SET_VRING_KICK,
            FrontendReq::SET_VRING_CALL,
            FrontendReq::SET_VRING_ERR,
        ]
        .iter()
        .any(|r| *r as u32 == req)
        {
            let index = if msg.body.len() >= 8 {
                u64_at(&msg.body, 0) & VRING_IDX_MASK
            } else {
                0
            };
            // Without a descriptor (the NOFD flag), the ring's earlier one is released.
            if n == 0 {
                t.kept.remove(&(req, index as u32));
            } else {
                t.kept.insert((req, index as u32));
            }
        } else if n > 0 {
            t.kept.insert((req, 0));
        }
        t
    }

    fn check_budget(&self, t: &FdTally) -> Result<(), RelayError> {
        if t.mem > self.limits.mem_slots {
            return Err(RelayError::FdBudget {
                what: "memory regions",
                held: t.mem,
                budget: self.limits.mem_slots,
            });
        }
        if t.total() > self.limits.max_fds {
            return Err(RelayError::FdBudget {
                what: "in all",
                held: t.total(),
                budget: self.limits.max_fds,
            });
        }
        Ok(())
    }
}

/// Lowers the slot count in the handler's reply to GET_MAX_MEM_SLOTS to the session's budget.
fn clamp_reply(msg: &mut Message, limits: &Limits) {
    if msg.request() == FrontendReq::GET_MAX_MEM_SLOTS as u32
        && msg.flags() & FLAG_REPLY != 0
        && msg.body.len() == 8
    {
        let slots = u64_at(&msg.body, 0).min(limits.mem_slots as u64);
        msg.body.copy_from_slice(&slots.to_le_bytes());
    }
}

/// Both sockets of a session, shut down once by whichever direction ends first.
struct Ends {
    frontend: UnixStream,
    handler: UnixStream,
    closed: AtomicBool,
}

impl Ends {
    /// Shuts both sockets down; true for the first caller, whose reason ends the session.
    fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::SeqCst);
        let _ = self.handler.shutdown(Shutdown::Both);
        let _ = self.frontend.shutdown(Shutdown::Both);
        first
    }
}

/// Asks the request handler for its features before any frontend message reaches it, and
/// returns them. The handler answers from the thread that will serve the session; the first
/// call into the device from that thread is where the thread restricts itself (the hook
/// installed with [`crate::NetBackend::set_request_thread_hook`]), so after this the handler
/// thread is confined no matter what the frontend sends first. A handler that offers no
/// features at all could not restrict itself.
pub fn probe_handler(handler: &UnixStream, timeout: Duration) -> Result<u64, RelayError> {
    handler.set_read_timeout(Some(timeout))?;
    handler.set_write_timeout(Some(timeout))?;
    let req = FrontendReq::GET_FEATURES as u32;
    send(
        handler,
        &Message::new(req, FLAG_VERSION_1, Vec::new()),
        timeout,
        RelayError::HandlerStalled,
    )?;
    let reply = read_message(handler)?.ok_or_else(|| {
        RelayError::Protocol("the request handler closed the channel before its first reply".into())
    })?;
    handler.set_read_timeout(None)?;
    if reply.request() != req || reply.flags() & FLAG_REPLY == 0 || reply.body.len() != 8 {
        return Err(RelayError::Protocol(
            "the request handler's first reply is not the features it was asked for".into(),
        ));
    }
    Ok(u64_at(&reply.body, 0))
}

/// Relays one frontend connection to the handler until either side closes or `limits` are
/// broken. `quiet` turns the session's info lines into debug lines. Returns why the session
/// ended: `Ok` when a peer closed (or went away), an error when the relay ended it.
pub fn run(
    frontend: UnixStream,
    handler: UnixStream,
    limits: &Limits,
    quiet: bool,
) -> Result<(), RelayError> {
    run_with(frontend, handler, limits, quiet, &|_| {})
}

/// [`run`], calling `announce` with the MAC of each `SEND_RARP` the frontend sends (after a
/// migration), up to [`MAX_ANNOUNCEMENTS`] per session.
pub fn run_with(
    frontend: UnixStream,
    handler: UnixStream,
    limits: &Limits,
    quiet: bool,
    announce: &dyn Fn([u8; 6]),
) -> Result<(), RelayError> {
    frontend.set_write_timeout(Some(limits.frontend_send_timeout))?;
    handler.set_write_timeout(Some(limits.handler_send_timeout))?;
    let ends = Arc::new(Ends {
        frontend: frontend.try_clone()?,
        handler: handler.try_clone()?,
        closed: AtomicBool::new(false),
    });
    let frontend_tx = Arc::new(Mutex::new(frontend.try_clone()?));
    let handler_rx = handler.try_clone()?;
    let (back_tx, back_ends, back_limits) = (frontend_tx.clone(), ends.clone(), limits.clone());
    let back = std::thread::Builder::new()
        .name("vu-relay-reply".into())
        .spawn(move || {
            let result = (|| -> Result<(), RelayError> {
                while let Some(mut msg) = read_message(&handler_rx)? {
                    clamp_reply(&mut msg, &back_limits);
                    let sock = back_tx.lock().unwrap_or_else(|p| p.into_inner());
                    send(
                        &sock,
                        &msg,
                        back_limits.frontend_send_timeout,
                        RelayError::FrontendStalled,
                    )?;
                }
                Ok(())
            })();
            (back_ends.close(), result)
        })?;

    let mut session = Session {
        limits: limits.clone(),
        quiet,
        ..Session::default()
    };
    let forward = (|| -> Result<(), RelayError> {
        while let Some(msg) = read_message(&frontend)? {
            let (to_handler, reply) = session.on_frontend(msg)?;
            if let Some(mac) = session.announce.take() {
                announce(mac);
            }
            for m in &to_handler {
                send(
                    &handler,
                    m,
                    limits.handler_send_timeout,
                    RelayError::HandlerStalled,
                )?;
            }
            if let Some(r) = reply {
                let sock = frontend_tx.lock().unwrap_or_else(|p| p.into_inner());
                send(
                    &sock,
                    &r,
                    limits.frontend_send_timeout,
                    RelayError::FrontendStalled,
                )?;
            }
        }
        Ok(())
    })();
    let forward_first = ends.close();
    // The reply thread returns at once now: its socket is shut down.
    let (back_first, back) = back.join().unwrap_or_else(|_| {
        (
            false,
            Err(io::Error::other("relay reply thread panicked").into()),
        )
    });
    // The first direction to end tells why; the other one only saw the shutdown.
    let result = if back_first && !forward_first {
        back
    } else {
        forward
    };
    match result {
        Err(e) if e.is_hang_up() => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enable(index: u32, num: u32, flags: u32) -> Message {
        let mut body = index.to_le_bytes().to_vec();
        body.extend_from_slice(&num.to_le_bytes());
        Message::new(FrontendReq::SET_VRING_ENABLE as u32, flags, body)
    }

    #[test]
    fn early_enables_are_held_until_features_and_their_ring_is_set_up() {
        let mut s = Session::default();
        let (out, reply) = s.on_frontend(enable(0, 1, FLAG_VERSION_1)).unwrap();
        assert!(out.is_empty() && reply.is_none());
        let (out, reply) = s
            .on_frontend(enable(1, 1, FLAG_VERSION_1 | FLAG_NEED_REPLY))
            .unwrap();
        assert!(out.is_empty());
        let reply = reply.expect("need_reply gets an ack");
        assert_eq!(reply.flags() & FLAG_REPLY, FLAG_REPLY);
        assert_eq!(reply.body, vec![0; 8]);
        // A later message for ring 0 overrides the first one.
        s.on_frontend(enable(0, 0, FLAG_VERSION_1)).unwrap();
        let features = Message::new(FrontendReq::SET_FEATURES as u32, FLAG_VERSION_1, vec![0; 8]);
        let (out, _) = s.on_frontend(features).unwrap();
        // The disable of ring 0 is legal now; ring 1 has no kick or call yet.
        assert_eq!(
            requests(&out),
            vec![
                FrontendReq::SET_FEATURES as u32,
                FrontendReq::SET_VRING_ENABLE as u32
            ]
        );
        assert_eq!(&out[1].body[..], &[0, 0, 0, 0, 0, 0, 0, 0]);
        // Ring 1: its kick alone is not enough (the call would come too late for the first
        // interrupts), nor its kick and call while the other ring of its pair has neither.
        let (out, _) = s
            .on_frontend(ring_fd(FrontendReq::SET_VRING_KICK, 1))
            .unwrap();
        assert_eq!(requests(&out), vec![FrontendReq::SET_VRING_KICK as u32]);
        let (out, _) = s
            .on_frontend(ring_fd(FrontendReq::SET_VRING_CALL, 1))
            .unwrap();
        assert_eq!(requests(&out), vec![FrontendReq::SET_VRING_CALL as u32]);
        // After SET_FEATURES, an enable of a ring without descriptors waits for them too.
        let (out, reply) = s.on_frontend(enable(0, 1, FLAG_VERSION_1)).unwrap();
        assert!(out.is_empty() && reply.is_none());
        // Call first this time: the message that completes the pair brings both enables.
        s.on_frontend(ring_fd(FrontendReq::SET_VRING_CALL, 0))
            .unwrap();
        let (out, _) = s
            .on_frontend(ring_fd(FrontendReq::SET_VRING_KICK, 0))
            .unwrap();
        assert_eq!(
            requests(&out),
            vec![
                FrontendReq::SET_VRING_KICK as u32,
                FrontendReq::SET_VRING_ENABLE as u32,
                FrontendReq::SET_VRING_ENABLE as u32
            ]
        );
        assert_eq!(&out[1].body[..], &[1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&out[2].body[..], &[0, 0, 0, 0, 1, 0, 0, 0]);
        // A ring the device does not have goes to the handler, which refuses it.
        let (out, reply) = s.on_frontend(enable(99, 1, FLAG_VERSION_1)).unwrap();
        assert_eq!(out.len(), 1);
        assert!(reply.is_none());
        // An enable of a set-up ring passes straight through.
        let (out, reply) = s.on_frontend(enable(0, 1, FLAG_VERSION_1)).unwrap();
        assert_eq!(out.len(), 1);
        assert!(reply.is_none());
        // A stopped ring (GET_VRING_BASE) needs its descriptors again.
        let stop = Message::new(
            FrontendReq::GET_VRING_BASE as u32,
            FLAG_VERSION_1,
            vec![0; 8],
        );
        s.on_frontend(stop).unwrap();
        let (out, _) = s.on_frontend(enable(0, 1, FLAG_VERSION_1)).unwrap();
        assert!(out.is_empty());
        s.on_frontend(ring_fd(FrontendReq::SET_VRING_KICK, 0))
            .unwrap();
        let (out, _) = s
            .on_frontend(ring_fd(FrontendReq::SET_VRING_CALL, 0))
            .unwrap();
        assert_eq!(requests(&out).len(), 2);
    }

    fn requests(out: &[Message]) -> Vec<u32> {
        out.iter().map(Message::request).collect()
    }

    /// SET_VRING_KICK or SET_VRING_CALL for `index` (with the no-descriptor flag: the relay
    /// only looks at the index).
    fn ring_fd(req: FrontendReq, index: u8) -> Message {
        let body = (u64::from(index) | 0x100).to_le_bytes().to_vec();
        Message::new(req as u32, FLAG_VERSION_1, body)
    }

    fn mem_reg(req: FrontendReq, gpa: u64, flags: u32) -> Message {
        let mut body = vec![0u8; 8];
        for v in [gpa, 0x1000, 0x7f00_0000_0000 + gpa, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        Message::new(req as u32, flags, body)
    }

    #[test]
    fn regions_added_per_queue_pair_reach_the_handler_once() {
        let mut s = Session::default();
        let f = FLAG_VERSION_1 | FLAG_NEED_REPLY;
        let (out, reply) = s
            .on_frontend(mem_reg(FrontendReq::ADD_MEM_REG, 0, f))
            .unwrap();
        assert_eq!((out.len(), reply.is_none()), (1, true));
        // The second queue pair's device adds the same region: acked here, not forwarded.
        let (out, reply) = s
            .on_frontend(mem_reg(FrontendReq::ADD_MEM_REG, 0, f))
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(reply.unwrap().body, vec![0; 8]);
        let (out, _) = s
            .on_frontend(mem_reg(FrontendReq::ADD_MEM_REG, 0x10_0000, f))
            .unwrap();
        assert_eq!(out.len(), 1);
        // Removal reaches the handler only when the last user removes it.
        let (out, _) = s
            .on_frontend(mem_reg(FrontendReq::REM_MEM_REG, 0, f))
            .unwrap();
        assert!(out.is_empty());
        let (out, _) = s
            .on_frontend(mem_reg(FrontendReq::REM_MEM_REG, 0, f))
            .unwrap();
        assert_eq!(out.len(), 1);
        let (out, _) = s
            .on_frontend(mem_reg(FrontendReq::REM_MEM_REG, 0, f))
            .unwrap();
        assert_eq!(
            out.len(),
            1,
            "an unknown region goes to the handler, which refuses it"
        );
    }

    #[test]
    fn flood_of_early_enables_is_refused() {
        let mut s = Session::default();
        for i in 0..MAX_PENDING_ENABLES as u32 {
            s.on_frontend(enable(i, 1, FLAG_VERSION_1)).unwrap();
        }
        assert!(s.on_frontend(enable(9999, 1, FLAG_VERSION_1)).is_err());
    }

    #[test]
    fn send_rarp_is_answered_here_and_announcements_are_capped() {
        let mac = [0x02, 0xaa, 0, 0, 0, 1];
        let rarp = |flags, body: Vec<u8>| Message::new(FrontendReq::SEND_RARP as u32, flags, body);
        let mut body = mac.to_vec();
        body.extend_from_slice(&[0, 0]);
        let mut s = Session::default();
        for i in 0..MAX_ANNOUNCEMENTS + 3 {
            let (to_handler, reply) = s
                .on_frontend(rarp(FLAG_VERSION_1 | FLAG_NEED_REPLY, body.clone()))
                .unwrap();
            assert!(to_handler.is_empty(), "the handler does not know SEND_RARP");
            let reply = reply.expect("REPLY_ACK asked for");
            assert_eq!(
                (reply.request(), reply.body),
                (FrontendReq::SEND_RARP as u32, vec![0; 8])
            );
            let expected = (i < MAX_ANNOUNCEMENTS).then_some(mac);
            assert_eq!(s.announce.take(), expected, "request {i}");
        }
        // Without NEED_REPLY: no reply.
        let mut s = Session::default();
        let (_, reply) = s.on_frontend(rarp(FLAG_VERSION_1, body.clone())).unwrap();
        assert!(reply.is_none());
        assert_eq!(s.announce, Some(mac));
        // A body that is not one u64 is refused.
        for bad in [vec![], vec![0; 6], vec![0; 16]] {
            assert!(Session::default()
                .on_frontend(rarp(FLAG_VERSION_1, bad))
                .is_err());
        }
    }

    fn memfd(len: u64) -> File {
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"relay-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn mem_table(regions: &[(u64, u64)], files: Vec<File>) -> Message {
        let mut body = (regions.len() as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        for (i, (size, offset)) in regions.iter().enumerate() {
            for v in [0x10_0000 * i as u64, *size, 0x7f00_0000_0000, *offset] {
                body.extend_from_slice(&v.to_le_bytes());
            }
        }
        let mut m = Message::new(FrontendReq::SET_MEM_TABLE as u32, FLAG_VERSION_1, body);
        m.files = files;
        m
    }

    #[test]
    fn dirty_logs_must_lie_in_their_file_and_cover_guest_memory() {
        let log_base = |size: u64, offset: u64, file: Option<File>| {
            let mut body = size.to_le_bytes().to_vec();
            body.extend_from_slice(&offset.to_le_bytes());
            let mut m = Message::new(FrontendReq::SET_LOG_BASE as u32, FLAG_VERSION_1, body);
            m.files = file.into_iter().collect();
            m
        };
        let mut s = Session::default();
        // Two regions of 1 MiB, at 0 and 1 MiB: 512 pages, 64 bytes of log.
        let table = mem_table(
            &[(1 << 20, 0), (1 << 20, 0)],
            vec![memfd(1 << 20), memfd(1 << 20)],
        );
        s.on_frontend(table).unwrap();
        assert_eq!(s.mem_end, 2 << 20);
        assert!(s.on_frontend(log_base(64, 0, Some(memfd(4096)))).is_ok());
        for (what, m) in [
            ("too small", log_base(32, 0, Some(memfd(4096)))),
            ("past the file", log_base(64, 4096, Some(memfd(4096)))),
            ("no descriptor", log_base(64, 0, None)),
        ] {
            assert!(
                matches!(s.on_frontend(m), Err(RelayError::Protocol(_))),
                "{what}"
            );
        }
    }

    #[test]
    fn regions_past_the_end_of_their_file_are_refused() {
        let mut s = Session::default();
        let ok = mem_table(
            &[(0x1000, 0), (0x1000, 0x1000)],
            vec![memfd(0x2000), memfd(0x2000)],
        );
        assert_eq!(s.on_frontend(ok).unwrap().0.len(), 1);
        for (size, offset) in [(0x1000, 0x1000_0000), (0x2000, 0x1000), (0x1000, u64::MAX)] {
            let bad = mem_table(
                &[(0x1000, 0), (size, offset)],
                vec![memfd(0x2000), memfd(0x2000)],
            );
            assert!(
                s.on_frontend(bad).is_err(),
                "size {size:#x} offset {offset:#x}"
            );
        }
        // ADD_MEM_REG too.
        let mut add = mem_reg(FrontendReq::ADD_MEM_REG, 0, FLAG_VERSION_1);
        add.files = vec![memfd(0x800)];
        assert!(s.on_frontend(add).is_err());
        let mut add = mem_reg(FrontendReq::ADD_MEM_REG, 0, FLAG_VERSION_1);
        add.files = vec![memfd(0x1000)];
        assert_eq!(s.on_frontend(add).unwrap().0.len(), 1);
    }

    #[test]
    fn vring_sizes_must_be_powers_of_two() {
        let mut s = Session::default();
        let num = |n: u32| {
            let mut body = 1u32.to_le_bytes().to_vec();
            body.extend_from_slice(&n.to_le_bytes());
            Message::new(FrontendReq::SET_VRING_NUM as u32, FLAG_VERSION_1, body)
        };
        for bad in [0, 3, 100, 65535] {
            assert!(s.on_frontend(num(bad)).is_err(), "{bad}");
        }
        // Range checks against the device's maximum stay with the library.
        for good in [1, 256, 32768, 65536] {
            assert_eq!(s.on_frontend(num(good)).unwrap().0.len(), 1, "{good}");
        }
    }

    #[test]
    fn more_than_32_fds_with_one_message_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = memfd(16);
        let fds = [f.as_raw_fd(); MAX_ATTACHED_FD_ENTRIES];
        let mut hdr = [0u8; HDR_LEN];
        hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
        a.send_with_fds(&[&hdr[..]], &fds).unwrap();
        // One byte of body at a time, each with one more descriptor.
        a.send_with_fds(&[&[0u8][..]], &fds[..1]).unwrap();
        let err = read_message(&b).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Exactly 32 is fine.
        let (a, b) = UnixStream::pair().unwrap();
        a.send_with_fds(&[&hdr[..]], &fds[..16]).unwrap();
        a.send_with_fds(&[&[0u8; 8][..]], &fds[..16]).unwrap();
        assert_eq!(read_message(&b).unwrap().unwrap().files.len(), 32);
    }

    #[test]
    fn oversized_message_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut hdr = [0u8; HDR_LEN];
        hdr[8..12].copy_from_slice(&(MAX_MSG_SIZE as u32 + 1).to_le_bytes());
        write_message(
            &a,
            &Message {
                hdr,
                body: Vec::new(),
                files: Vec::new(),
            },
        )
        .unwrap();
        assert_eq!(
            read_message(&b).err().map(|e| e.kind()),
            Some(io::ErrorKind::InvalidData)
        );
        drop(a);
        let (c, d) = UnixStream::pair().unwrap();
        drop(c);
        assert!(read_message(&d).unwrap().is_none());
    }

    fn with_files(mut m: Message, n: usize) -> Message {
        m.files = (0..n).map(|_| memfd(0x1000)).collect();
        m
    }

    fn add_region(gpa: u64) -> Message {
        with_files(mem_reg(FrontendReq::ADD_MEM_REG, gpa, FLAG_VERSION_1), 1)
    }

    fn vring_fd(req: FrontendReq, index: u64, with_fd: bool) -> Message {
        let flags = if with_fd { 0 } else { 0x100 };
        let m = Message::new(
            req as u32,
            FLAG_VERSION_1,
            (index | flags).to_le_bytes().to_vec(),
        );
        with_files(m, usize::from(with_fd))
    }

    #[test]
    fn memory_regions_over_the_slot_budget_are_refused() {
        let mut s = Session::default();
        let slots = s.limits.mem_slots as u64;
        // A table, replaced by another: the tally follows the latest one.
        let table = |n: usize| {
            let regions: Vec<(u64, u64)> = (0..n).map(|_| (0x1000, 0)).collect();
            let files = (0..n).map(|_| memfd(0x1000)).collect();
            mem_table(&regions, files)
        };
        s.on_frontend(table(8)).unwrap();
        s.on_frontend(table(4)).unwrap();
        assert_eq!(s.fds.mem, 4);
        for i in 0..slots - 4 {
            s.on_frontend(add_region(0x10_0000 * (i + 1))).unwrap();
        }
        // The same region from a second queue pair's device costs nothing.
        s.on_frontend(add_region(0x10_0000)).unwrap();
        assert_eq!(s.fds.mem as u64, slots);
        let err = s
            .on_frontend(add_region(0x1_0000_0000))
            .err()
            .expect("refused");
        assert!(
            matches!(err, RelayError::FdBudget { held, budget, .. } if held as u64 == slots + 1 && budget as u64 == slots),
            "{err}"
        );
        // Removing a region (its last user) makes room again.
        let mut s2 = Session::default();
        for i in 0..slots {
            s2.on_frontend(add_region(0x10_0000 * i)).unwrap();
        }
        let rem = with_files(mem_reg(FrontendReq::REM_MEM_REG, 0, FLAG_VERSION_1), 1);
        s2.on_frontend(rem).unwrap();
        s2.on_frontend(add_region(0x1_0000_0000)).unwrap();
    }

    #[test]
    fn replaced_descriptors_do_not_add_up_but_new_kinds_do() {
        let mut s = Session::default();
        for _ in 0..100 {
            for req in [FrontendReq::SET_VRING_KICK, FrontendReq::SET_VRING_CALL] {
                s.on_frontend(vring_fd(req, 0, true)).unwrap();
                s.on_frontend(vring_fd(req, 1, true)).unwrap();
            }
        }
        assert_eq!(s.fds.total(), 4);
        // NOFD releases the ring's descriptor.
        s.on_frontend(vring_fd(FrontendReq::SET_VRING_CALL, 1, false))
            .unwrap();
        assert_eq!(s.fds.total(), 3);
        // Descriptors on ever new request codes or ring indexes add up until the budget ends.
        let budget = s.limits.max_fds;
        let mut refused = None;
        for code in 100..400u32 {
            let m = with_files(Message::new(code, FLAG_VERSION_1, vec![0; 8]), 1);
            if let Err(e) = s.on_frontend(m) {
                refused = Some((code, e));
                break;
            }
        }
        let (code, err) = refused.expect("refused");
        assert_eq!((code - 100) as usize, budget - 3);
        assert!(err.to_string().contains("file descriptors"), "{err}");
    }

    #[test]
    fn announced_memory_slots_are_lowered_to_the_budget() {
        let limits = Limits::default();
        let mut m = Message::new(
            FrontendReq::GET_MAX_MEM_SLOTS as u32,
            FLAG_VERSION_1 | FLAG_REPLY,
            509u64.to_le_bytes().to_vec(),
        );
        clamp_reply(&mut m, &limits);
        assert_eq!(u64_at(&m.body, 0), MEM_SLOTS as u64);
        let mut other = Message::new(
            FrontendReq::GET_FEATURES as u32,
            FLAG_VERSION_1 | FLAG_REPLY,
            509u64.to_le_bytes().to_vec(),
        );
        clamp_reply(&mut other, &limits);
        assert_eq!(u64_at(&other.body, 0), 509);
    }

    /// A stand-in for the request handler: answers every request with an 8-byte reply until
    /// its socket fails; returns how many it answered.
    fn echo_handler(sock: UnixStream) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut answered = 0;
            while let Ok(Some(m)) = read_message(&sock) {
                let r = Message::new(m.request(), FLAG_VERSION_1 | FLAG_REPLY, vec![0; 8]);
                if write_message(&sock, &r).is_err() {
                    break;
                }
                answered += 1;
            }
            answered
        })
    }

    /// Pipelines GET_FEATURES on `sock` without reading, until a write waits 300 ms.
    fn flood(sock: &UnixStream) -> usize {
        sock.set_write_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let m = Message::new(FrontendReq::GET_FEATURES as u32, FLAG_VERSION_1, Vec::new());
        let mut n = 0;
        while n < 100_000 && write_message(sock, &m).is_ok() {
            n += 1;
        }
        n
    }

    fn short_limits() -> Limits {
        Limits {
            frontend_send_timeout: std::time::Duration::from_millis(500),
            ..Limits::default()
        }
    }

    #[test]
    fn frontend_that_never_reads_is_disconnected_and_everything_unblocks() {
        let (fe, fe_relay) = UnixStream::pair().unwrap();
        let (h_relay, h) = UnixStream::pair().unwrap();
        let handler = echo_handler(h);
        let relay = std::thread::spawn(move || run(fe_relay, h_relay, &short_limits(), true));
        let sent = flood(&fe);
        assert!(sent > 100, "{sent}");
        // The frontend stays connected and never reads: the relay gives up on it.
        let t = std::time::Instant::now();
        let result = relay.join().unwrap();
        assert!(
            matches!(result, Err(RelayError::FrontendStalled(_))),
            "{result:?}"
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        // The handler's blocked reply returned too.
        assert!(handler.join().unwrap() > 0);
        drop(fe);
    }

    #[test]
    fn frontend_hanging_up_with_replies_unread_unblocks_everything() {
        let (fe, fe_relay) = UnixStream::pair().unwrap();
        let (h_relay, h) = UnixStream::pair().unwrap();
        let handler = echo_handler(h);
        let limits = Limits {
            frontend_send_timeout: std::time::Duration::from_secs(60),
            handler_send_timeout: std::time::Duration::from_secs(60),
            ..Limits::default()
        };
        let relay = std::thread::spawn(move || run(fe_relay, h_relay, &limits, true));
        flood(&fe);
        drop(fe);
        let t = std::time::Instant::now();
        assert!(relay.join().unwrap().is_ok());
        handler.join().unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
