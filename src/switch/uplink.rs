//! An uplink: a tap or AF_PACKET host port joined to a switch, driven by a thread of its own.
//!
//! The thread sleeps in epoll on the host queue's fd, the uplink's inbox and a stop eventfd.
//! Frames from the host are forwarded into the switch from the thread's buffer; frames for the
//! host are written from the inbox, one flush per burst. The thread is sandboxed like a port
//! thread (it handles guests' frames) once its host queue is open.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost_net_backend::{GuestOffloads, HostPort, HostQueue};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::frame_edit::VlanMode;
use super::{Member, Switch, UplinkKind, UplinkSpec, MAX_FRAME};
use crate::frame::VNET_HDR_LEN;

const TOKEN_HOST: u64 = 0;
const TOKEN_INBOX: u64 = 1;
const TOKEN_STOP: u64 = 2;
/// Frames taken from one side before looking at the other.
const BURST: usize = 256;

/// A running uplink.
pub struct Uplink {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    switch: Arc<Switch>,
    member: Arc<Member>,
}

/// Offloads the uplink asks of its device: checksum and TCP segmentation offload, so a guest's
/// TSO frame leaves unsegmented and the host's arrive whole.
const OFFLOADS: GuestOffloads = GuestOffloads::TCP;

impl Uplink {
    /// Opens the device, joins the switch and starts the thread.
    pub fn start(sw: &Arc<Switch>, spec: &UplinkSpec) -> Result<Uplink, String> {
        let port: Arc<dyn HostPort> = match spec.kind {
            UplinkKind::Tap => {
                // writev: the uplink hands its inbox buffers back right after `send`.
                Arc::new(
                    crate::tap::TapPort::open(&spec.name, 1, None, crate::config::TapTx::Writev)
                        .map_err(|e| e.to_string())?,
                )
            }
            UplinkKind::AfPacket => Arc::new(
                crate::af_packet::AfPacketPort::open(&spec.name, 1, None)
                    .map_err(|e| e.to_string())?,
            ),
        };
        port.configure(VNET_HDR_LEN, OFFLOADS)
            .map_err(|e| format!("cannot set the virtio-net header and offloads: {e}"))?;
        let queue = port.take_queue(0).map_err(|e| e.to_string())?;
        let member = sw
            .attach(
                &format!("uplink:{}", spec.name),
                VlanMode::of(spec.vlan, &spec.trunk),
            )
            .map_err(|e| e.to_string())?;
        member.rx.set(VNET_HDR_LEN, OFFLOADS);
        member.rx.running.store(true, Relaxed);
        let fail = |e: String| {
            sw.detach(member.id);
            e
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| fail(e.to_string()))?;
        let stop_fd = stop.try_clone().map_err(|e| fail(e.to_string()))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (sw2, m2) = (sw.clone(), member.clone());
        let thread = std::thread::Builder::new()
            .name(format!("uplink-{}", spec.name))
            .spawn(move || {
                let sandboxed = crate::sandbox::enter().and_then(|()| crate::sandbox::harden());
                let ok = sandboxed.is_ok();
                let _ = ready_tx.send(sandboxed.map_err(|e| e.to_string()));
                if ok {
                    // Keeps the device (and an AF_PACKET port's watcher) alive while it runs.
                    let _port = port;
                    if let Err(e) = run(&sw2, &m2, queue, &stop_fd) {
                        tracing::error!(member = %m2.name, error = %e, "uplink stopped");
                    }
                }
            })
            .map_err(|e| fail(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(fail(format!("cannot sandbox the uplink thread: {e}")));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(fail("the uplink thread ended at once".into()));
            }
        }
        tracing::info!(switch = %sw.spec.name, uplink = %spec.name, "uplink ready");
        Ok(Uplink {
            stop,
            thread: Some(thread),
            switch: sw.clone(),
            member,
        })
    }

    /// Stops the thread and leaves the switch.
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.switch.detach(self.member.id);
    }
}

fn add(ep: &Epoll, fd: RawFd, token: u64) -> io::Result<()> {
    ep.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token),
    )
}

fn run(
    sw: &Switch,
    member: &Member,
    mut queue: Box<dyn HostQueue>,
    stop: &EventFd,
) -> io::Result<()> {
    let ep = Epoll::new()?;
    add(&ep, queue.rx_fd(), TOKEN_HOST)?;
    if let Some(fd) = queue.recheck_fd() {
        add(&ep, fd, TOKEN_HOST)?;
    }
    add(&ep, member.inbox.fd(), TOKEN_INBOX)?;
    add(&ep, stop.as_raw_fd(), TOKEN_STOP)?;
    let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME];
    let mut touched = Vec::new();
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        // Both sides are drained (edge-triggered) before sleeping again, a burst at a time.
        loop {
            let mut host_more = false;
            for _ in 0..BURST {
                let iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: `iov` covers `buf`, ours and live for the call.
                match unsafe { queue.recv(&iov) } {
                    Ok(n) => {
                        let iov = [libc::iovec {
                            iov_base: buf.as_mut_ptr().cast(),
                            iov_len: n.min(buf.len()),
                        }];
                        // SAFETY: as above; `n` bytes of `buf` were written.
                        let _ = unsafe { sw.forward(member, &iov, VNET_HDR_LEN, &mut touched) };
                        host_more = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        host_more = false;
                        break;
                    }
                    // A frame the device refused to hand over whole: dropped by the port.
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => host_more = true,
                    Err(e) => return Err(e),
                }
            }
            for m in touched.drain(..) {
                m.deliver_now();
            }
            let mut sent = 0;
            while sent < BURST {
                let Some(f) = member.inbox.pop() else {
                    break;
                };
                let iov = [libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                }];
                // SAFETY: `iov` covers the inbox buffer, ours and live for the call. Errors
                // are the device's to count; the frame is gone either way.
                let _ = unsafe { queue.send(&iov) };
                member.inbox.give_back(f);
                sent += 1;
            }
            if sent > 0 {
                queue.flush();
            }
            if !host_more && sent < BURST {
                break;
            }
        }
        let n = match ep.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if events[..n].iter().any(|e| e.data() == TOKEN_STOP) {
            return Ok(());
        }
    }
}
