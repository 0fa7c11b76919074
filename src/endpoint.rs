//! The accept loop shared by the control socket and the metrics endpoint, built so that clients
//! which connect and then dawdle cannot exhaust the daemon's file descriptors or CPU:
//!
//! - At most [`Limits::max_conns`] connections are open at once. When they are all taken, the
//!   oldest one still waiting for its request is closed to make room: a flood of idle
//!   connections then cannot lock out a client that sends its request straight away. When every
//!   open connection is being answered, the newcomer gets a short refusal and is closed.
//! - Handlers give a client [`Limits::read_timeout`] to send each request and
//!   [`Limits::write_timeout`] to take each response (see [`Slot`]).
//! - An accept error (`EMFILE`, `ENFILE`, `ENOMEM`, ...) leaves the connection in the kernel's
//!   queue, so retrying at once would spin: the loop pauses instead, 10 ms growing to 1 s.
//! - Everything a peer can provoke is logged through a [`RateLimiter`]: the first line, then
//!   at most one per 10 s carrying the number of lines held back.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::ratelimit::RateLimiter;

/// First pause after an accept error.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after accept errors.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Peer-provoked log lines of one kind: at most one per this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Limits of one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once.
    pub max_conns: usize,
    /// How long a client has to send a request (each one, on a connection that sends several).
    pub read_timeout: Duration,
    /// How long a client has to take a response.
    pub write_timeout: Duration,
}

/// A listening socket the loop takes connections from.
pub(crate) trait Listener {
    /// An accepted connection.
    type Conn: Conn;
    /// The next connection.
    fn next_conn(&self) -> impl Future<Output = io::Result<Self::Conn>>;
}

/// What the loop needs of a connection besides handing it over.
pub(crate) trait Conn: Send + 'static {
    /// Writes what fits of `msg` without waiting; errors are ignored (a refusal note).
    fn try_send(&self, msg: &[u8]);
}

impl Listener for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn next_conn(&self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn next_conn(&self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Conn for tokio::net::TcpStream {
    fn try_send(&self, msg: &[u8]) {
        let _ = self.try_write(msg);
    }
}

impl Conn for tokio::net::UnixStream {
    fn try_send(&self, msg: &[u8]) {
        let _ = self.try_write(msg);
    }
}

/// The growing pause after accept errors.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }

    /// The pause to take now; the next one is twice as long, up to [`BACKOFF_MAX`].
    fn pause(&mut self) -> Duration {
        let d = self.next;
        self.next = d.saturating_mul(2).min(BACKOFF_MAX);
        d
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Accept errors that concern one connection only (it failed before we took it): the next
/// accept may succeed at once, so no pause.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// The open connections, oldest first.
#[derive(Default)]
struct Table {
    next_id: u64,
    open: BTreeMap<u64, Entry>,
}

struct Entry {
    /// Waiting for a request (may be closed to make room).
    waiting: bool,
    /// Dropping it cancels the connection's task.
    _cancel: oneshot::Sender<()>,
}

enum Admission {
    /// Room was found (`evicted`: by closing the oldest waiting connection).
    Admitted {
        id: u64,
        cancelled: oneshot::Receiver<()>,
        evicted: bool,
    },
    /// Every connection is being answered.
    Full,
}

impl Table {
    fn admit(&mut self, max: usize) -> Admission {
        let mut evicted = false;
        if self.open.len() >= max {
            let oldest = self.open.iter().find(|(_, e)| e.waiting).map(|(id, _)| *id);
            match oldest {
                Some(id) => {
                    // Dropping the entry drops its sender, which ends the task.
                    self.open.remove(&id);
                    evicted = true;
                }
                None => return Admission::Full,
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(
            id,
            Entry {
                waiting: true,
                _cancel: tx,
            },
        );
        Admission::Admitted {
            id,
            cancelled: rx,
            evicted,
        }
    }
}

struct Shared {
    endpoint: &'static str,
    limits: Limits,
    table: Mutex<Table>,
    accept_log: RateLimiter,
    refused_log: RateLimiter,
    client_log: RateLimiter,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's place in the table, handed to its handler; dropping it frees the place.
pub(crate) struct Slot {
    id: u64,
    shared: Arc<Shared>,
}

impl Slot {
    /// The endpoint's limits.
    pub(crate) fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// The connection waits for a request: it may be closed to make room for a newcomer.
    pub(crate) fn waiting(&self) {
        self.set_waiting(true);
    }

    /// The connection's request is being answered: it keeps its place.
    pub(crate) fn answering(&self) {
        self.set_waiting(false);
    }

    fn set_waiting(&self, waiting: bool) {
        if let Some(e) = self.shared.table().open.get_mut(&self.id) {
            e.waiting = waiting;
        }
    }

    /// Logs, rate-limited and at debug level, why the client was dropped or refused something.
    pub(crate) fn trouble(&self, what: &str, error: Option<&dyn std::fmt::Display>) {
        if let Some(suppressed) = self.shared.client_log.check() {
            let endpoint = self.shared.endpoint;
            match error {
                // Quoted: a request error may carry the peer's bytes.
                Some(e) => {
                    tracing::debug!(endpoint, error = ?e.to_string(), suppressed, "client: {what}")
                }
                None => tracing::debug!(endpoint, suppressed, "client: {what}"),
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.table().open.remove(&self.id);
    }
}

/// Accepts connections on `listener` forever, running `handler` on each in a task of its own
/// within the limits (see the module docs). `refusal` is sent to a connection turned away.
pub(crate) async fn serve<L, H, F>(
    endpoint: &'static str,
    listener: L,
    limits: Limits,
    refusal: &'static [u8],
    handler: H,
) where
    L: Listener,
    H: Fn(L::Conn, Slot) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let shared = Arc::new(Shared {
        endpoint,
        limits,
        table: Mutex::default(),
        accept_log: RateLimiter::new(1, LOG_INTERVAL),
        refused_log: RateLimiter::new(1, LOG_INTERVAL),
        client_log: RateLimiter::new(1, LOG_INTERVAL),
    });
    let mut backoff = Backoff::new();
    loop {
        let conn = match listener.next_conn().await {
            Ok(c) => {
                backoff.reset();
                c
            }
            Err(e) if is_per_connection(&e) => {
                if let Some(suppressed) = shared.client_log.check() {
                    tracing::debug!(endpoint, error = %e, suppressed, "a connection failed before it was accepted");
                }
                continue;
            }
            Err(e) => {
                let pause = backoff.pause();
                if let Some(suppressed) = shared.accept_log.check() {
                    tracing::warn!(endpoint, error = %e, ?pause, suppressed, "cannot accept connections; pausing");
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let admission = shared.table().admit(limits.max_conns);
        match admission {
            Admission::Full => {
                conn.try_send(refusal);
                if let Some(suppressed) = shared.refused_log.check() {
                    tracing::warn!(
                        endpoint,
                        max = limits.max_conns,
                        suppressed,
                        "every connection is busy; refused a new one"
                    );
                }
            }
            Admission::Admitted {
                id,
                cancelled,
                evicted,
            } => {
                let slot = Slot {
                    id,
                    shared: shared.clone(),
                };
                if evicted {
                    slot.trouble(
                        "closed the oldest connection still waiting for its request, to make room",
                        None,
                    );
                }
                let work = handler(conn, slot);
                tokio::spawn(async move {
                    tokio::select! {
                        biased;
                        _ = cancelled => {}
                        () = work => {}
                    }
                });
                // Let the new connection read a request that is already there, and an evicted
                // one close its socket, before the next accept: without this a burst of queued
                // connections would be accepted (and evict each other) before any task ran,
                // and fds would pile up past the cap.
                tokio::task::yield_now().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn backoff_doubles_up_to_a_second_and_resets() {
        let mut b = Backoff::new();
        let ms: Vec<u128> = (0..9).map(|_| b.pause().as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.pause(), Duration::from_millis(10));
    }

    #[test]
    fn accept_errors_that_pause() {
        let raw = io::Error::from_raw_os_error;
        for e in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::ENOBUFS,
            libc::EINVAL,
        ] {
            assert!(!is_per_connection(&raw(e)), "{e}");
        }
        for e in [libc::ECONNABORTED, libc::EINTR, libc::EPROTO] {
            assert!(is_per_connection(&raw(e)), "{e}");
        }
    }

    #[test]
    fn a_full_table_evicts_the_oldest_waiting_connection_or_refuses() {
        let mut t = Table::default();
        let id = |a: Admission| match a {
            Admission::Admitted { id, evicted, .. } => (id, evicted),
            Admission::Full => panic!("refused"),
        };
        assert_eq!(id(t.admit(2)), (0, false));
        assert_eq!(id(t.admit(2)), (1, false));
        // 0 is being answered: 1 is the oldest waiting one.
        t.open.get_mut(&0).unwrap().waiting = false;
        assert_eq!(id(t.admit(2)), (2, true));
        assert_eq!(t.open.keys().copied().collect::<Vec<_>>(), [0, 2]);
        t.open.get_mut(&2).unwrap().waiting = false;
        assert!(matches!(t.admit(2), Admission::Full));
        assert!(matches!(Table::default().admit(0), Admission::Full));
    }

    /// A listener whose accept always fails, counting the attempts.
    struct Failing(Arc<AtomicUsize>);

    impl Listener for Failing {
        type Conn = tokio::net::UnixStream;
        async fn next_conn(&self) -> io::Result<Self::Conn> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Err(io::Error::from_raw_os_error(libc::EMFILE))
        }
    }

    fn limits(max_conns: usize, timeout: Duration) -> Limits {
        Limits {
            max_conns,
            read_timeout: timeout,
            write_timeout: timeout,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn accept_errors_pause_instead_of_spinning() {
        let calls = Arc::new(AtomicUsize::new(0));
        let l = Failing(calls.clone());
        let run = serve(
            "test",
            l,
            limits(1, Duration::from_secs(1)),
            b"",
            |_, _| async {},
        );
        // 10 + 20 + 40 + 80 + 160 ms of pauses fit in 400 ms, the next 320 do not.
        let _ = tokio::time::timeout(Duration::from_millis(400), run).await;
        let n = calls.load(Ordering::Relaxed);
        assert_eq!(n, 6, "accept attempts in 400 ms of EMFILE");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idle_connections_make_room_and_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        let a = answered.clone();
        // Echo one line per connection, with the read timeout.
        tokio::spawn(serve(
            "test",
            l,
            limits(2, Duration::from_millis(300)),
            b"busy\n",
            move |mut c: tokio::net::UnixStream, slot: Slot| {
                let a = a.clone();
                async move {
                    let mut b = [0u8; 16];
                    let r = tokio::time::timeout(slot.limits().read_timeout, c.read(&mut b)).await;
                    let Ok(Ok(n @ 1..)) = r else {
                        return;
                    };
                    slot.answering();
                    a.fetch_add(1, Ordering::Relaxed);
                    let _ = c.write_all(&b[..n]).await;
                }
            },
        ));
        let connect = || tokio::net::UnixStream::connect(&path);
        let eof_within = |mut c: tokio::net::UnixStream, d: Duration| async move {
            let mut b = [0u8; 8];
            matches!(tokio::time::timeout(d, c.read(&mut b)).await, Ok(Ok(0)))
        };
        let idle1 = connect().await.unwrap();
        let idle2 = connect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A third client that asks at once is served: the oldest idle one makes room.
        let mut asker = connect().await.unwrap();
        asker.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        asker.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hi");
        assert!(eof_within(idle1, Duration::from_millis(100)).await);
        // The other idle one is closed by the read timeout.
        let t = Instant::now();
        assert!(eof_within(idle2, Duration::from_secs(2)).await);
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(answered.load(Ordering::Relaxed), 1);
    }
}
