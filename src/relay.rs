//! A message-level relay between a vhost-user frontend and the `vhost` crate's request handler
//! that fixes one ordering incompatibility with QEMU.
//!
//! Why this exists: QEMU's virtio-net (7.2 and 10.0 alike) sends `SET_VRING_ENABLE` for each ring
//! *before* `SET_FEATURES`, and never again after it. The `vhost` crate's `BackendReqHandler`
//! (0.18) rejects that message while `VHOST_USER_F_PROTOCOL_FEATURES` is not yet acked and drops
//! the connection; and once the feature is acked, rings start disabled, so merely ignoring the
//! early message would leave the device dead. Rather than re-implementing the whole protocol
//! handler, we keep the crate's handler (and its validation of every message) and put this relay
//! in front of it: early enables are answered here, remembered, and replayed to the handler right
//! after `SET_FEATURES`, when they are legal.
//!
//! A second mismatch comes with multiqueue: QEMU drives each queue pair as its own vhost device
//! over the one connection, and with `CONFIGURE_MEM_SLOTS` each of them sends `ADD_MEM_REG` for
//! every guest RAM region, so the backend sees the same region added once per queue pair (the
//! library then fails with "memory regions intersect"). The relay keeps a use count per region:
//! only the first add and the last remove reach the handler, the others are acknowledged here.
//!
//! Everything else passes through unchanged, with its file descriptors.

use std::fs::File;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR_LEN: usize = 12;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// More remembered early enables than this is not a real frontend.
const MAX_PENDING_ENABLES: usize = 64;
/// Body of ADD/REM_MEM_REG: 8 bytes of padding, then guest address, size, user address, offset.
const MEM_REG_BODY: usize = 40;
/// Most distinct memory regions tracked: the slot count the library announces (GET_MAX_MEM_SLOTS).
const MAX_REGIONS: usize = 509;

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

/// The relay's view of the session: whether features are set, and enables held until then.
#[derive(Default)]
struct Session {
    features_set: bool,
    pending: Vec<(u32, u32)>,
    /// Memory regions added through ADD_MEM_REG, keyed by (guest address, size, user address),
    /// with the number of vhost devices of the frontend that added them.
    regions: Vec<([u64; 3], u32)>,
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Refuses memory regions that would map past the end of their file. The library maps them
/// without looking (mmap allows it), and the first access to such a page raises SIGBUS: with
/// the sandbox's seccomp filter the signal handler cannot reset itself and the thread faults
/// forever at 100% CPU, and without it the whole process dies with every port. Only regular
/// files (memfd, tmpfs, hugetlbfs) have a size to check; other fds go to the library as they are.
/// A frontend that shrinks the file after this check can still cause the fault.
fn check_regions_within_files(msg: &Message) -> io::Result<()> {
    // SET_MEM_TABLE: num_regions, padding, then (guest address, size, user address, offset)
    // per region; ADD_MEM_REG: padding, then one region.
    let (first, count) = if msg.request() == FrontendReq::SET_MEM_TABLE as u32 {
        if msg.body.len() < 8 {
            return Ok(());
        }
        let n = u32::from_le_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]);
        (8, (n as usize).min((msg.body.len() - 8) / 32))
    } else if msg.body.len() == MEM_REG_BODY {
        (8, 1)
    } else {
        return Ok(());
    };
    for (i, file) in msg.files.iter().enumerate().take(count) {
        let at = first + 32 * i;
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

fn ack(msg: &Message) -> Option<Message> {
    (msg.flags() & FLAG_NEED_REPLY != 0)
        .then(|| Message::new(msg.request(), FLAG_VERSION_1 | FLAG_REPLY, vec![0; 8]))
}

impl Session {
    /// Decides what to do with a frontend message: the messages to pass to the handler, and a
    /// reply to send straight back.
    fn on_frontend(&mut self, msg: Message) -> io::Result<(Vec<Message>, Option<Message>)> {
        let req = msg.request();
        if req == FrontendReq::SET_VRING_ENABLE as u32 && !self.features_set && msg.body.len() == 8
        {
            let index = u32::from_le_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]);
            let num = u32::from_le_bytes([msg.body[4], msg.body[5], msg.body[6], msg.body[7]]);
            self.pending.retain(|(i, _)| *i != index);
            if self.pending.len() >= MAX_PENDING_ENABLES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "too many SET_VRING_ENABLE messages before SET_FEATURES",
                ));
            }
            self.pending.push((index, num));
            tracing::debug!(index, num, "holding SET_VRING_ENABLE until SET_FEATURES");
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
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("SET_VRING_NUM {num} is not a power of two"),
                ));
            }
        }
        let is_add = req == FrontendReq::ADD_MEM_REG as u32;
        if req == FrontendReq::SET_MEM_TABLE as u32 || is_add {
            check_regions_within_files(&msg)?;
        }
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
                (true, None) => {
                    if self.regions.len() >= MAX_REGIONS {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "too many memory regions",
                        ));
                    }
                    tracing::info!(
                        gpa = format!("{:#x}", key[0]),
                        size = key[1],
                        "guest memory region added"
                    );
                    self.regions.push((key, 1));
                }
                (false, Some(i)) if self.regions[i].1 > 1 => {
                    self.regions[i].1 -= 1;
                    return Ok((Vec::new(), ack(&msg)));
                }
                (false, Some(i)) => {
                    tracing::info!(
                        gpa = format!("{:#x}", key[0]),
                        "guest memory region removed"
                    );
                    self.regions.swap_remove(i);
                }
                // Removing an unknown region: let the handler refuse it.
                (false, None) => {}
            }
        }
        if req == FrontendReq::SET_MEM_TABLE as u32 {
            // A whole new table replaces every region added one by one.
            self.regions.clear();
        }
        let mut out = vec![msg];
        if req == FrontendReq::SET_FEATURES as u32 && !self.features_set {
            self.features_set = true;
            for (index, num) in self.pending.drain(..) {
                let mut body = index.to_le_bytes().to_vec();
                body.extend_from_slice(&num.to_le_bytes());
                out.push(Message::new(
                    FrontendReq::SET_VRING_ENABLE as u32,
                    FLAG_VERSION_1,
                    body,
                ));
            }
        }
        Ok((out, None))
    }
}

/// Relays one frontend connection to the handler until either side closes. Returns the reason
/// the session ended (`Ok` for an orderly close by the frontend).
pub fn run(frontend: UnixStream, handler: UnixStream) -> io::Result<()> {
    let frontend_tx = Arc::new(Mutex::new(frontend.try_clone()?));
    let handler_rx = handler.try_clone()?;
    let back_tx = frontend_tx.clone();
    let back = std::thread::Builder::new()
        .name("vu-relay-reply".into())
        .spawn(move || {
            let result = (|| -> io::Result<()> {
                while let Some(msg) = read_message(&handler_rx)? {
                    let sock = back_tx.lock().unwrap_or_else(|p| p.into_inner());
                    write_message(&sock, &msg)?;
                }
                Ok(())
            })();
            // The handler ended the session (or failed): close the frontend side too.
            let sock = back_tx.lock().unwrap_or_else(|p| p.into_inner());
            let _ = sock.shutdown(Shutdown::Both);
            result
        })?;

    let mut session = Session::default();
    let forward = (|| -> io::Result<()> {
        while let Some(msg) = read_message(&frontend)? {
            let (to_handler, reply) = session.on_frontend(msg)?;
            for m in &to_handler {
                write_message(&handler, m)?;
            }
            if let Some(r) = reply {
                let sock = frontend_tx.lock().unwrap_or_else(|p| p.into_inner());
                write_message(&sock, &r)?;
            }
        }
        Ok(())
    })();
    let _ = handler.shutdown(Shutdown::Both);
    let _ = frontend.shutdown(Shutdown::Both);
    let back = back.join().unwrap_or(Ok(()));
    forward.and(back.or_else(|e| {
        // The handler closing its side after the frontend left is the normal end.
        if e.kind() == io::ErrorKind::NotConnected {
            Ok(())
        } else {
            Err(e)
        }
    }))
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
    fn early_enables_are_held_and_replayed_after_features() {
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
        let reqs: Vec<u32> = out.iter().map(Message::request).collect();
        assert_eq!(
            reqs,
            vec![
                FrontendReq::SET_FEATURES as u32,
                FrontendReq::SET_VRING_ENABLE as u32,
                FrontendReq::SET_VRING_ENABLE as u32
            ]
        );
        assert_eq!(&out[1].body[..], &[1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&out[2].body[..], &[0, 0, 0, 0, 0, 0, 0, 0]);
        // After SET_FEATURES, enables pass straight through.
        let (out, reply) = s.on_frontend(enable(0, 1, FLAG_VERSION_1)).unwrap();
        assert_eq!(out.len(), 1);
        assert!(reply.is_none());
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
}
