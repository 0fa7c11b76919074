//! Arbitrary frontend bytes through `vhost_net_backend::relay::run`, the daemon's first parser of
//! untrusted vhost-user messages.
//!
//! Input format:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | bits 0-1: number of memfds; bits 2-7: write chunk size (0: everything in one write, with the memfds; otherwise the memfds go with every chunk) |
//! | then | one u16 per memfd: its size in 16-byte units |
//! | rest | the bytes the frontend sends |
//!
//! A fake request handler on the other side of the relay checks that whatever the relay passes
//! on is well framed: whole messages of at most 4096 bytes with at most 32 file descriptors each.
//! The relay must return (never hang) once the frontend has sent everything and closed.

use std::fs::File;
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::thread;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR_LEN: usize = 12;
const MAX_MSG: usize = 4096;
const MAX_FDS: usize = 32;

fn memfd(len: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-relay".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("ftruncate");
    f
}

/// Reads what the relay forwards to the request handler until EOF, checking the framing.
fn fake_handler(sock: UnixStream) {
    let mut pending: Vec<u8> = Vec::new();
    let mut fds_of_message = 0usize;
    let mut buf = vec![0u8; 16384];
    loop {
        let mut fds = [-1 as RawFd; MAX_FDS + 1];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec describes `buf`, which lives across the call.
        let (n, nfds) = match unsafe { sock.recv_with_fds(&mut iov, &mut fds) } {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => panic!("relay forwarded more fds than a message may carry: {e}"),
        };
        for fd in fds.iter().take(nfds) {
            // SAFETY: recvmsg gave us these descriptors; close them.
            drop(unsafe { File::from_raw_fd(*fd) });
        }
        fds_of_message += nfds;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        // Consume whole messages.
        loop {
            if pending.len() < HDR_LEN {
                break;
            }
            let size = u32::from_le_bytes(pending[8..12].try_into().unwrap()) as usize;
            assert!(size <= MAX_MSG, "relay forwarded a {size}-byte body");
            if pending.len() < HDR_LEN + size {
                break;
            }
            assert!(
                fds_of_message <= MAX_FDS,
                "relay forwarded {fds_of_message} fds with one message"
            );
            fds_of_message = 0;
            pending.drain(..HDR_LEN + size);
        }
    }
    assert!(
        pending.is_empty(),
        "relay forwarded a partial message of {} bytes",
        pending.len()
    );
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    static SIGPIPE: OnceLock<()> = OnceLock::new();
    SIGPIPE.get_or_init(|| {
        // SAFETY: ignoring SIGPIPE process-wide, as the daemon's Rust runtime does.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
    let (&b0, mut rest) = data.split_first().unwrap_or((&0, &[]));
    let files: Vec<File> = (0..b0 & 3)
        .map(|_| {
            let (units, r) = match rest {
                [a, b, r @ ..] => (u16::from_le_bytes([*a, *b]), r),
                _ => (0, &[][..]),
            };
            rest = r;
            memfd(u64::from(units) * 16)
        })
        .collect();
    let chunk = usize::from(b0 >> 2);
    let payload = rest.to_vec();

    let (fe_ours, fe_theirs) = UnixStream::pair().expect("socketpair");
    let (h_ours, h_theirs) = UnixStream::pair().expect("socketpair");
    let handler = thread::spawn(move || fake_handler(h_ours));
    let mut replies = fe_ours.try_clone().expect("dup");
    let drain = thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = replies.read_to_end(&mut sink);
    });
    let writer = thread::spawn(move || {
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let step = if chunk == 0 {
            payload.len().max(1)
        } else {
            chunk
        };
        let mut first = true;
        for piece in payload.chunks(step) {
            let f: &[RawFd] = if first || chunk != 0 { &fds } else { &[] };
            first = false;
            if fe_ours.send_with_fds(&[piece], f).is_err() {
                break;
            }
        }
        if first && !fds.is_empty() {
            // No payload: the fds alone, with one byte.
            let _ = fe_ours.send_with_fds(&[&[0u8][..]], &fds);
        }
        let _ = fe_ours.shutdown(Shutdown::Write);
        drop(files);
    });
    let limits = vhost_net_backend::relay::Limits::default();
    let _ = vhost_net_backend::relay::run(fe_theirs, h_theirs, &limits, true);
    writer.join().expect("writer");
    drain.join().expect("drain");
    if let Err(p) = handler.join() {
        std::panic::resume_unwind(p);
    }
}
