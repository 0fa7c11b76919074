//! The port's link watcher: a thread that follows the interface through netlink link events,
//! keeps the shared link state the queues consult, logs each transition once, and re-attaches
//! the queues when an interface of the same name comes back after being deleted.
//!
//! It runs apart from the queue workers on purpose: the workers are sandboxed (no
//! capabilities, a syscall allowlist without interface ioctls), while re-attaching needs new
//! AF_PACKET sockets (CAP_NET_RAW) and interface lookups. The thread is started from the
//! privileged thread that opens the port, handles no guest input, and sleeps in `poll` until
//! the kernel reports a link change.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::sys::{self, LinkEvents};
use super::{open_sockets, Link, Shared};

/// How long to wait before retrying a failed re-attachment.
const RETRY: Duration = Duration::from_secs(1);

/// The running watcher; stopped and joined on drop.
pub struct Watcher {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching interface `ifindex`, whose binding `probe` (a descriptor of the first
    /// queue's socket) reveals.
    pub fn spawn(shared: Arc<Shared>, ifindex: libc::c_int, probe: OwnedFd) -> io::Result<Self> {
        let events = LinkEvents::open()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let mut w = Watch {
            shared,
            ifindex,
            probe,
            link: Link::Up,
            retry: false,
            back_but_down: false,
            tx_drops_at_loss: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("afp-link-{}", w.shared.name()))
            .spawn(move || {
                w.resync();
                loop {
                    let timeout = w.retry.then_some(RETRY);
                    let ready = sys::wait_readable(&[events.fd(), stop_rx.as_raw_fd()], timeout);
                    if ready[1] {
                        return;
                    }
                    events.drain();
                    w.resync();
                }
            })?;
        Ok(Watcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Watch {
    shared: Arc<Shared>,
    /// The interface instance the queues' sockets are bound to.
    ifindex: libc::c_int,
    probe: OwnedFd,
    link: Link,
    /// A re-attachment failed; try again after [`RETRY`].
    retry: bool,
    /// The "back but down" note was logged for the current absence.
    back_but_down: bool,
    /// `tx_link_down` when the link was lost, to report the drops of this outage.
    tx_drops_at_loss: u64,
}

impl Watch {
    /// Re-reads the interface's state and acts on changes.
    fn resync(&mut self) {
        self.retry = false;
        let bound = sys::bound_ifindex(self.probe.as_raw_fd()).unwrap_or(-1);
        if bound == self.ifindex {
            // Still registered: up or down. The kernel resumes the sockets by itself on up.
            let up = crate::netdev::is_up(self.ifindex).unwrap_or(false);
            self.set(if up { Link::Up } else { Link::Down });
            return;
        }
        // The interface was unregistered under the sockets; look for its return by name.
        self.set(Link::Gone);
        let Some(new) = crate::netdev::index(self.shared.name.as_cstr()) else {
            self.back_but_down = false;
            return;
        };
        if !crate::netdev::is_up(new).unwrap_or(false) {
            if !self.back_but_down {
                self.back_but_down = true;
                tracing::info!(
                    interface = self.shared.name(),
                    ifindex = new,
                    "interface is back but down; waiting for it to come up"
                );
            }
            return;
        }
        match open_sockets(new, &self.shared) {
            Ok(socks) => {
                let probe = match socks[0].probe() {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(interface = self.shared.name(), error = %e, "dup failed");
                        self.retry = true;
                        return;
                    }
                };
                {
                    let mut slots = self
                        .shared
                        .replacements
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    for (slot, sock) in slots.iter_mut().zip(socks) {
                        *slot = Some(sock);
                    }
                }
                for w in &self.shared.wakers {
                    let _ = w.write(1);
                }
                self.probe = probe;
                self.ifindex = new;
                self.back_but_down = false;
                self.shared.counters.reattached.fetch_add(1, Relaxed);
                tracing::info!(
                    interface = self.shared.name(),
                    ifindex = new,
                    queues = self.shared.queues,
                    "re-attached to the re-created interface"
                );
                self.set(Link::Up);
            }
            Err((queue, e)) => {
                tracing::warn!(
                    interface = self.shared.name(),
                    queue,
                    step = e.what,
                    error = %e.source,
                    "cannot re-attach to the interface; retrying"
                );
                self.retry = true;
            }
        }
    }

    fn set(&mut self, link: Link) {
        if self.link == link {
            return;
        }
        let was = self.link;
        self.link = link;
        self.shared.link.store(link as u8, Relaxed);
        let c = &self.shared.counters;
        let name = self.shared.name();
        match link {
            Link::Down => tracing::warn!(
                interface = name,
                "interface is down: guest frames are dropped until it is up again"
            ),
            Link::Gone => tracing::warn!(
                interface = name,
                "interface disappeared: guest frames are dropped until it returns"
            ),
            Link::Up => tracing::info!(
                interface = name,
                was = ?was,
                guest_frames_dropped = c.tx_link_down.load(Relaxed) - self.tx_drops_at_loss,
                "interface is up: traffic resumes"
            ),
        }
        if was == Link::Up {
            self.tx_drops_at_loss = c.tx_link_down.load(Relaxed);
        }
    }
}
