//! A minimal vhost-user *frontend* written from scratch over a raw `UnixStream`, for tests that
//! must say things a well-behaved frontend never would.
//!
//! Three layers:
//! - [`Frontend`]: messages. [`Frontend::send`] frames any request code with any flags, body and
//!   file descriptors (SCM_RIGHTS); [`Frontend::send_bytes`] writes raw bytes (truncated or
//!   malformed messages); the typed helpers (`set_mem_table`, `set_vring_addr`, ...) build
//!   well-formed bodies from explicit fields, so a test can put any value in any field.
//! - [`GuestMem`]: "guest memory", a memfd (`memfd_create` + `ftruncate` + `mmap(MAP_SHARED)`)
//!   mapped here and handed to the backend; guest physical address 0 is the start of the memfd
//!   and the "frontend virtual address" of a GPA is where this process mapped it, like QEMU.
//! - [`Ring`]: one split virtqueue laid out in that memory, with descriptors and avail entries
//!   written by hand (any value, including hostile ones), a kick and a call eventfd.
//!
//! [`Session::good`] strings them together into a session like a VMM's, with `REPLY_ACK` so
//! every request is confirmed (or refused) synchronously.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user request codes (front-end to back-end), named as in the vhost-user specification.
#[allow(missing_docs)]
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Header flag: protocol version 1 (always set).
pub const F_VERSION_1: u32 = 0x1;
/// Header flag: this message is a reply.
pub const F_REPLY: u32 = 0x4;
/// Header flag: the sender wants a REPLY_ACK.
pub const F_NEED_REPLY: u32 = 0x8;

/// Virtio feature bit: mergeable receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// Virtio feature bit: indirect descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// vhost-user feature bit: protocol features are negotiated.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Virtio feature bit: virtio 1.0 (modern) device.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Protocol feature bit: multiqueue.
pub const PROTO_MQ: u32 = 0;
/// Protocol feature bit: REPLY_ACK.
pub const PROTO_REPLY_ACK: u32 = 3;
/// Protocol feature bit: device config space access.
pub const PROTO_CONFIG: u32 = 9;
/// Protocol feature bit: ADD_MEM_REG / REM_MEM_REG.
pub const PROTO_CONFIGURE_MEM_SLOTS: u32 = 15;

/// Split-ring descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Split-ring descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;
/// Split-ring descriptor flag: the buffer is a table of descriptors.
pub const DESC_INDIRECT: u16 = 4;

/// Size of a vhost-user message header.
pub const HDR_LEN: usize = 12;
/// `virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;

/// A vhost-user message header as bytes.
pub fn header(request: u32, flags: u32, size: u32) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0..4].copy_from_slice(&request.to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

/// Little-endian concatenation of u64 words (most vhost-user bodies).
pub fn words(ws: &[u64]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// `struct vhost_vring_state`: index and number.
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One memory region of SET_MEM_TABLE / ADD_MEM_REG, field by field.
#[derive(Clone, Copy, Debug)]
pub struct MemRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The frontend's virtual address of the region (what SET_VRING_ADDR addresses refer to).
    pub uva: u64,
    /// Offset of the region in the file.
    pub offset: u64,
}

impl MemRegion {
    fn bytes(&self) -> Vec<u8> {
        words(&[self.gpa, self.size, self.uva, self.offset])
    }
}

/// A frontend connection.
pub struct Frontend {
    sock: UnixStream,
    /// Set after REPLY_ACK was negotiated: requests then carry NEED_REPLY and wait for the ack.
    pub reply_ack: bool,
}

impl Frontend {
    /// Connects to a backend socket, retrying `ECONNREFUSED`/`ENOENT` for up to 5 s. Reads and
    /// writes time out after 5 s, so a backend that stops answering fails the test instead of
    /// hanging it.
    pub fn connect(path: &Path) -> io::Result<Frontend> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        sock.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Frontend {
            sock,
            reply_ack: false,
        })
    }

    /// The socket, for timeouts, shutdowns and raw I/O.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Writes `bytes` as they are, with `fds` attached to the first byte.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut sent = 0;
        while sent < bytes.len() {
            let fds_now: &[RawFd] = if sent == 0 { fds } else { &[] };
            let n = self
                .sock
                .send_with_fds(&[&bytes[sent..]], fds_now)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += n;
        }
        Ok(())
    }

    /// Sends one message: a header with `request`, `flags` and the body's length, the body,
    /// and `fds`.
    pub fn send(&self, request: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut m = header(request, flags, body.len() as u32).to_vec();
        m.extend_from_slice(body);
        self.send_bytes(&m, fds)
    }

    /// Reads one reply: (request, flags, body).
    pub fn recv(&self) -> io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; HDR_LEN];
        (&self.sock).read_exact(&mut h)?;
        let request = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(h[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
        if size > 4096 {
            return Err(proto_err(format!("reply body of {size} bytes")));
        }
        let mut body = vec![0u8; size];
        (&self.sock).read_exact(&mut body)?;
        Ok((request, flags, body))
    }

    fn recv_reply_to(&self, request: u32) -> io::Result<Vec<u8>> {
        let (r, flags, body) = self.recv()?;
        if r != request || flags & F_REPLY == 0 {
            return Err(proto_err(format!(
                "expected a reply to {request}, got request {r} flags {flags:#x}"
            )));
        }
        Ok(body)
    }

    /// Sends a request that has no reply of its own; with REPLY_ACK, waits for the ack and
    /// turns a refusal into an error.
    pub fn call(&self, request: u32, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let flags = F_VERSION_1 | if self.reply_ack { F_NEED_REPLY } else { 0 };
        self.send(request, flags, body, fds)?;
        if self.reply_ack {
            let b = self.recv_reply_to(request)?;
            let v = u64::from_le_bytes(
                b.get(..8)
                    .ok_or_else(|| proto_err("short ack"))?
                    .try_into()
                    .unwrap(),
            );
            if v != 0 {
                return Err(proto_err(format!("request {request} refused (ack {v})")));
            }
        }
        Ok(())
    }

    /// Sends a request whose reply carries one u64 (GET_FEATURES and the like).
    pub fn get_u64(&self, request: u32) -> io::Result<u64> {
        self.send(request, F_VERSION_1, &[], &[])?;
        let b = self.recv_reply_to(request)?;
        if b.len() != 8 {
            return Err(proto_err(format!("reply of {} bytes", b.len())));
        }
        Ok(u64::from_le_bytes(b[..].try_into().unwrap()))
    }

    /// GET_FEATURES.
    pub fn get_features(&self) -> io::Result<u64> {
        self.get_u64(req::GET_FEATURES)
    }

    /// SET_OWNER.
    pub fn set_owner(&self) -> io::Result<()> {
        self.call(req::SET_OWNER, &[], &[])
    }

    /// SET_FEATURES.
    pub fn set_features(&self, f: u64) -> io::Result<()> {
        self.call(req::SET_FEATURES, &words(&[f]), &[])
    }

    /// GET_PROTOCOL_FEATURES.
    pub fn get_protocol_features(&self) -> io::Result<u64> {
        self.get_u64(req::GET_PROTOCOL_FEATURES)
    }

    /// SET_PROTOCOL_FEATURES; turns on acks for later requests when REPLY_ACK is in `f`.
    pub fn set_protocol_features(&mut self, f: u64) -> io::Result<()> {
        self.call(req::SET_PROTOCOL_FEATURES, &words(&[f]), &[])?;
        self.reply_ack = f & (1 << PROTO_REPLY_ACK) != 0;
        Ok(())
    }

    /// The body of SET_MEM_TABLE for `regions` (num_regions, padding, then the regions).
    pub fn mem_table_body(regions: &[MemRegion]) -> Vec<u8> {
        let mut b = (regions.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        for r in regions {
            b.extend_from_slice(&r.bytes());
        }
        b
    }

    /// SET_MEM_TABLE with one fd per region.
    pub fn set_mem_table(&self, regions: &[MemRegion], fds: &[RawFd]) -> io::Result<()> {
        self.call(req::SET_MEM_TABLE, &Self::mem_table_body(regions), fds)
    }

    /// ADD_MEM_REG (padding, then the region).
    pub fn add_mem_reg(&self, region: &MemRegion, fd: RawFd) -> io::Result<()> {
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&region.bytes());
        self.call(req::ADD_MEM_REG, &b, &[fd])
    }

    /// SET_VRING_NUM.
    pub fn set_vring_num(&self, index: u32, num: u32) -> io::Result<()> {
        self.call(req::SET_VRING_NUM, &vring_state(index, num), &[])
    }

    /// SET_VRING_BASE.
    pub fn set_vring_base(&self, index: u32, base: u32) -> io::Result<()> {
        self.call(req::SET_VRING_BASE, &vring_state(index, base), &[])
    }

    /// GET_VRING_BASE (stops the ring).
    pub fn get_vring_base(&self, index: u32) -> io::Result<u32> {
        self.send(
            req::GET_VRING_BASE,
            F_VERSION_1,
            &vring_state(index, 0),
            &[],
        )?;
        let b = self.recv_reply_to(req::GET_VRING_BASE)?;
        if b.len() != 8 {
            return Err(proto_err("GET_VRING_BASE reply size"));
        }
        Ok(u32::from_le_bytes(b[4..8].try_into().unwrap()))
    }

    /// SET_VRING_ADDR with frontend virtual addresses (index, flags, desc, used, avail, log).
    pub fn set_vring_addr(&self, index: u32, desc: u64, used: u64, avail: u64) -> io::Result<()> {
        let mut b = index.to_le_bytes().to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&words(&[desc, used, avail, 0]));
        self.call(req::SET_VRING_ADDR, &b, &[])
    }

    /// SET_VRING_KICK / SET_VRING_CALL with an fd (the ring index in the low byte).
    pub fn set_vring_fd(&self, request: u32, index: u32, fd: RawFd) -> io::Result<()> {
        self.call(request, &words(&[u64::from(index & 0xff)]), &[fd])
    }

    /// SET_VRING_ENABLE.
    pub fn set_vring_enable(&self, index: u32, enable: bool) -> io::Result<()> {
        self.call(
            req::SET_VRING_ENABLE,
            &vring_state(index, enable as u32),
            &[],
        )
    }

    /// True when the backend has closed the connection: a read returns EOF (or the connection
    /// is reset) within `timeout`.
    pub fn closed_by_peer(&self, timeout: Duration) -> bool {
        let _ = self.sock.set_read_timeout(Some(timeout));
        let mut b = [0u8; 64];
        let deadline = Instant::now() + timeout;
        loop {
            match (&self.sock).read(&mut b) {
                Ok(0) => return true,
                Ok(_) if Instant::now() < deadline => continue,
                Ok(_) => return false,
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    )
                }
            }
        }
    }
}

/// Guest memory: a memfd mapped shared into this process.
pub struct GuestMem {
    file: File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is process-wide; accesses go through volatile reads and writes.
unsafe impl Send for GuestMem {}
// SAFETY: as above.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    /// A memfd of `len` bytes (a multiple of the page size), mapped at GPA 0.
    pub fn new(len: usize) -> io::Result<GuestMem> {
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vhost-driver".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: plain ftruncate on our own fd.
        if unsafe { libc::ftruncate(file.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh shared mapping of the whole file; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(GuestMem {
            file,
            ptr: ptr.cast(),
            len,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for memory of no size (never: [`GuestMem::new`] refuses it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The frontend virtual address of guest address `gpa`.
    pub fn uva(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }

    /// The whole memfd as one region at GPA 0.
    pub fn region(&self) -> MemRegion {
        MemRegion {
            gpa: 0,
            size: self.len as u64,
            uva: self.uva(0),
            offset: 0,
        }
    }

    fn check(&self, gpa: u64, n: usize) -> usize {
        let end = gpa.checked_add(n as u64).expect("address overflow");
        assert!(
            end <= self.len as u64,
            "guest access {gpa:#x}+{n} outside memory"
        );
        gpa as usize
    }

    /// Writes bytes at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let off = self.check(gpa, bytes.len());
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: bounds checked above; the mapping lives as long as `self`.
            unsafe { std::ptr::write_volatile(self.ptr.add(off + i), *b) };
        }
    }

    /// Reads `n` bytes at `gpa`.
    pub fn read(&self, gpa: u64, n: usize) -> Vec<u8> {
        let off = self.check(gpa, n);
        // SAFETY: bounds checked above; the mapping lives as long as `self`.
        (0..n)
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) })
            .collect()
    }

    /// Reads a little-endian u16 at `gpa`, in one load when it is aligned (ring indexes are):
    /// read byte by byte, an index the device is updating could be seen half old, half new.
    pub fn read_u16(&self, gpa: u64) -> u16 {
        let off = self.check(gpa, 2);
        if off % 2 == 0 {
            // SAFETY: bounds checked above, 2-byte aligned; the mapping lives as long as
            // `self`, and the other side only accesses the field whole.
            let a = unsafe { &*self.ptr.add(off).cast::<std::sync::atomic::AtomicU16>() };
            return u16::from_le(a.load(Ordering::Acquire));
        }
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Writes a little-endian u16 at `gpa`, in one store when it is aligned (see
    /// [`GuestMem::read_u16`]).
    pub fn write_u16(&self, gpa: u64, v: u16) {
        let off = self.check(gpa, 2);
        if off % 2 == 0 {
            // SAFETY: as in `read_u16`.
            let a = unsafe { &*self.ptr.add(off).cast::<std::sync::atomic::AtomicU16>() };
            a.store(v.to_le(), Ordering::Release);
            return;
        }
        self.write(gpa, &v.to_le_bytes());
    }

    /// Fills the whole memory with `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: the whole mapping, which lives as long as `self`.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.len) };
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Bytes of guest memory reserved for each ring's descriptor table, avail and used rings.
pub const RING_AREA: u64 = 0x8000;
/// First byte of guest memory used for packet buffers.
pub const BUF_BASE: u64 = 0x40000;
/// Buffer space per ring.
pub const BUF_AREA: u64 = 0x20000;

/// One split virtqueue in [`GuestMem`]: descriptor table at `RING_AREA * index`, avail ring
/// 0x1000 after it, used ring 0x2000 after it (room for 256 entries).
pub struct Ring {
    /// vhost-user ring index (0 = RX, 1 = TX of the first queue pair).
    pub index: u32,
    /// Entries.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the avail ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
    /// The kick eventfd (driver → device).
    pub kick: EventFd,
    /// The call eventfd (device → driver).
    pub call: EventFd,
    avail_idx: u16,
    next_desc: u16,
    next_buf: u64,
    buf_end: u64,
}

impl Ring {
    /// A ring of `size` (≤ 256) entries for vhost-user ring `index` (≤ 7).
    pub fn new(index: u32, size: u16) -> Ring {
        assert!(size <= 256 && index < 8);
        let base = RING_AREA * u64::from(index);
        let bufs = BUF_BASE + BUF_AREA * u64::from(index);
        Ring {
            index,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            avail_idx: 0,
            next_desc: 0,
            next_buf: bufs,
            buf_end: bufs + BUF_AREA,
        }
    }

    /// Sends SET_VRING_NUM/BASE/ADDR/KICK/CALL and SET_VRING_ENABLE for this ring.
    pub fn setup(&self, fe: &Frontend, mem: &GuestMem) -> io::Result<()> {
        fe.set_vring_num(self.index, u32::from(self.size))?;
        fe.set_vring_base(self.index, 0)?;
        fe.set_vring_addr(
            self.index,
            mem.uva(self.desc),
            mem.uva(self.used),
            mem.uva(self.avail),
        )?;
        fe.set_vring_fd(req::SET_VRING_CALL, self.index, self.call.as_raw_fd())?;
        fe.set_vring_fd(req::SET_VRING_KICK, self.index, self.kick.as_raw_fd())?;
        fe.set_vring_enable(self.index, true)
    }

    /// Writes descriptor `i` as given (no checks: hostile values welcome).
    pub fn set_desc(&self, mem: &GuestMem, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        mem.write(self.desc + 16 * u64::from(i), &d);
    }

    /// Writes a 16-byte descriptor into an indirect table at `table` (entry `i`).
    pub fn set_indirect(
        mem: &GuestMem,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        mem.write(table + 16 * u64::from(i), &d);
    }

    /// Takes the next free descriptor slot (wrapping).
    pub fn take_desc(&mut self) -> u16 {
        let i = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.size;
        i
    }

    /// Allocates `len` bytes of buffer space (wrapping around the ring's buffer area).
    pub fn alloc(&mut self, len: usize) -> u64 {
        let len = (len as u64 + 15) & !15;
        assert!(len <= BUF_AREA);
        if self.next_buf + len > self.buf_end {
            self.next_buf = self.buf_end - BUF_AREA;
        }
        let a = self.next_buf;
        self.next_buf += len;
        a
    }

    /// Puts `head` in the next avail slot and publishes it (avail idx + 1).
    pub fn publish(&mut self, mem: &GuestMem, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        mem.write_u16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Writes the avail ring's idx as given (hostile jumps), remembering it.
    pub fn set_avail_idx(&mut self, mem: &GuestMem, idx: u16) {
        self.avail_idx = idx;
        fence(Ordering::SeqCst);
        mem.write_u16(self.avail + 2, idx);
        fence(Ordering::SeqCst);
    }

    /// The avail idx this driver wrote last.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Copies `frame` (virtio-net header first) into a fresh buffer, writes a one-descriptor
    /// chain for it and publishes it. Returns the head.
    pub fn push_tx(&mut self, mem: &GuestMem, frame: &[u8]) -> u16 {
        let a = self.alloc(frame.len());
        mem.write(a, frame);
        let d = self.take_desc();
        self.set_desc(mem, d, a, frame.len() as u32, 0, 0);
        self.publish(mem, d);
        d
    }

    /// Kicks the device.
    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    /// The used ring's idx.
    pub fn used_idx(&self, mem: &GuestMem) -> u16 {
        fence(Ordering::SeqCst);
        mem.read_u16(self.used + 2)
    }

    /// Used entry `i` (mod size): (id, len).
    pub fn used_elem(&self, mem: &GuestMem, i: u16) -> (u32, u32) {
        let b = mem.read(self.used + 4 + 8 * u64::from(i % self.size), 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }

    /// Waits until the used idx reaches `target` (wrapping compare).
    pub fn wait_used(&self, mem: &GuestMem, target: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let u = self.used_idx(mem);
            if target.wrapping_sub(u) == 0 || target.wrapping_sub(u) > 0x8000 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A broadcast Ethernet frame with `virtio_net_hdr_v1` (zeros) in front, `len` bytes of
/// Ethernet frame in all (at least 60), using the local experimental EtherType.
pub fn tx_frame(src_mac: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let len = len.max(60);
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_add(seed)));
    f
}

/// A whole frontend session: connection, guest memory and rings.
pub struct Session {
    /// The connection.
    pub fe: Frontend,
    /// Guest memory.
    pub mem: GuestMem,
    /// The rings set up so far.
    pub rings: Vec<Ring>,
}

/// Size of the guest memory of [`Session::good`].
pub const SESSION_MEM: usize = 1 << 20;

impl Session {
    /// Negotiates like a VMM (GET_FEATURES, GET/SET_PROTOCOL_FEATURES with REPLY_ACK, SET_OWNER,
    /// SET_FEATURES with VERSION_1, INDIRECT_DESC and PROTOCOL_FEATURES) and sends the memory
    /// table, without any ring.
    pub fn negotiate(path: &Path) -> io::Result<Session> {
        Session::negotiate_with(path, 0, SESSION_MEM)
    }

    /// [`Session::negotiate`] with the feature bits `extra` acked too (refused when the device
    /// does not offer them) and `mem_len` bytes of guest memory.
    pub fn negotiate_with(path: &Path, extra: u64, mem_len: usize) -> io::Result<Session> {
        let mut fe = Frontend::connect(path)?;
        let offered = fe.get_features()?;
        let want = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | extra;
        if offered & want != want {
            return Err(proto_err(format!("features {offered:#x} lack {want:#x}")));
        }
        let proto = fe.get_protocol_features()?;
        let reply_ack = 1u64 << PROTO_REPLY_ACK;
        fe.set_protocol_features(proto & (reply_ack | (1 << PROTO_MQ)))?;
        fe.set_owner()?;
        fe.set_features(want)?;
        let mem = GuestMem::new(mem_len)?;
        fe.set_mem_table(&[mem.region()], &[mem.fd()])?;
        Ok(Session {
            fe,
            mem,
            rings: Vec::new(),
        })
    }

    /// [`Session::negotiate`], then sets up the rings `indexes` with `size` entries each.
    pub fn good(path: &Path, indexes: &[u32], size: u16) -> io::Result<Session> {
        Session::good_with(path, indexes, size, 0, SESSION_MEM)
    }

    /// [`Session::negotiate_with`], then sets up the rings `indexes` with `size` entries each.
    pub fn good_with(
        path: &Path,
        indexes: &[u32],
        size: u16,
        extra: u64,
        mem_len: usize,
    ) -> io::Result<Session> {
        let mut s = Session::negotiate_with(path, extra, mem_len)?;
        for &i in indexes {
            let r = Ring::new(i, size);
            r.setup(&s.fe, &s.mem)?;
            s.rings.push(r);
        }
        Ok(s)
    }

    /// The ring with vhost-user index `index`.
    pub fn ring(&mut self, index: u32) -> &mut Ring {
        self.rings
            .iter_mut()
            .find(|r| r.index == index)
            .expect("ring set up")
    }

    /// Sends `frame` (virtio-net header first) on TX ring `index`, kicks, and waits for the
    /// device to return a buffer (the used idx to move by one: after a hostile avail entry the
    /// device may have skipped, used can lag behind avail for good).
    pub fn send_frame(&mut self, index: u32, frame: &[u8]) -> io::Result<()> {
        let Session { mem, rings, .. } = self;
        let ring = rings
            .iter_mut()
            .find(|r| r.index == index)
            .expect("ring set up");
        let target = ring.used_idx(mem).wrapping_add(1);
        ring.push_tx(mem, frame);
        ring.kick();
        if ring.wait_used(mem, target, Duration::from_secs(5)) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "ring {index}: used idx {} never reached {target}",
                    ring.used_idx(mem)
                ),
            ))
        }
    }
}

/// Writes `bytes` one `write` per call to `sock`, ignoring errors (peer may be gone).
pub fn write_ignoring_errors(mut sock: &UnixStream, bytes: &[u8]) {
    let _ = sock.write_all(bytes);
}

/// Number of open file descriptors of process `pid` (entries of `/proc/PID/fd`).
pub fn open_fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The names of the listening unix sockets in the calling thread's network namespace, from
/// `/proc/thread-self/net/unix`: filesystem paths as they are, abstract names with a leading
/// `@`. Unnamed sockets are left out.
pub fn unix_listeners() -> Vec<String> {
    const ACCEPTCON: u32 = 0x10000;
    let text = std::fs::read_to_string("/proc/thread-self/net/unix").unwrap_or_default();
    let mut names: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let name = f.get(7)?;
            (flags & ACCEPTCON != 0).then(|| name.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}
