//! The ports one daemon serves: each is a host port, a device and a serving thread, started
//! and stopped independently so that one port's failure or removal never touches the others.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use vhost_net_backend::{DropReason, HostPort, NetBackend, NetConfig};

use crate::af_packet::{AfPacketPort, AfPacketSnapshot, AfPacketStatus};
use crate::config::{HostSpec, PortSpec, MAX_PORTS};
use crate::handoff::HandoffDir;
use crate::server::{self, ServeControl, SessionStats};
use crate::switch::frame_edit::VlanMode;
use crate::switch::port::SwitchPort;
use crate::switch::{Member, MemberSnapshot, Switch, SwitchSet, SwitchSpec};
use crate::tap::TapPort;

/// Errors starting or managing a port.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The specification is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A port of that name already runs.
    #[error("a port named {0:?} already exists")]
    Duplicate(String),
    /// Another port uses the socket path.
    #[error("socket {0} is already used by port {1:?}")]
    SocketInUse(String, String),
    /// No such port.
    #[error("no port named {0:?}")]
    NotFound(String),
    /// Too many ports.
    #[error("this daemon already serves {MAX_PORTS} ports")]
    TooMany,
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
    /// The AF_PACKET port could not be opened.
    #[error(transparent)]
    AfPacket(#[from] crate::af_packet::AfPacketError),
    /// The switch is missing, or could not take the port.
    #[error(transparent)]
    Switch(#[from] crate::switch::SwitchError),
    /// The device could not be built.
    #[error(transparent)]
    Backend(#[from] vhost_net_backend::BackendError),
    /// The socket could not be set up.
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// The private channel to the request handler could not be set up.
    #[error(transparent)]
    Handoff(#[from] crate::handoff::HandoffError),
    /// Socket ownership or permissions could not be applied.
    #[error("socket {path}: {message}")]
    Permissions {
        /// Socket path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The state file (`--state-file`) could not be written.
    #[error("cannot write state file {path}: {message}")]
    StateFile {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The serving thread could not start.
    #[error("cannot start the serving thread: {0}")]
    Thread(std::io::Error),
    /// The serving thread could not sandbox itself, so the port is not served.
    #[error(
        "cannot sandbox the port's thread ({0}); not serving it unsandboxed \
         (--no-sandbox turns the sandbox off)"
    )]
    Sandbox(crate::sandbox::SandboxError),
}

/// A port being served.
pub struct RunningPort {
    spec: PortSpec,
    backend: Arc<NetBackend>,
    /// The AF_PACKET port's link state and counters (none for a tap port).
    af_packet: Option<AfPacketStatus>,
    /// A switch port's switch and membership.
    switch: Option<(Arc<Switch>, Arc<Member>)>,
    ctl: Arc<ServeControl>,
    /// The socket file is this port's to remove when it stops (server mode, not inherited).
    owns_socket: bool,
    thread: Option<JoinHandle<()>>,
    /// The private channel's directory, removed after the thread ends (the sandboxed thread
    /// cannot remove files).
    handoff_dir: Option<HandoffDir>,
    started_ns: u64,
}

impl RunningPort {
    /// Opens the host port, builds the device, binds (or starts connecting to) the socket and
    /// starts serving in a thread of its own.
    pub fn start(spec: PortSpec) -> Result<Self, PortError> {
        Self::start_with(spec, None, &SwitchSet::default())
    }

    /// Like [`RunningPort::start`], but serves `inherited`, a listening socket someone else
    /// made and keeps (systemd socket activation, libvirt): it is neither bound, nor changed,
    /// nor removed when the port stops. A switch port attaches to its switch in `switches`.
    pub fn start_with(
        spec: PortSpec,
        inherited: Option<UnixListener>,
        switches: &SwitchSet,
    ) -> Result<Self, PortError> {
        spec.validate()?;
        let owns_socket = !spec.client && inherited.is_none();
        // A busy socket is refused before the host port is touched: a second daemon started by
        // mistake must not attach to a running daemon's tap (that would reset the offloads and
        // MTU the first one's guest relies on). The socket itself is bound last, so that once
        // it exists the port is ready to serve.
        if owns_socket {
            server::check_free(&spec.socket)?;
        }
        let Device {
            backend,
            af_packet,
            switch,
        } = Self::build_device(&spec, switches)?;
        // Created here, while the thread may still create directories: see crate::handoff.
        let (handoff_dir, handoff) = crate::handoff::create(spec.socket.parent())?;
        let listener = match inherited {
            Some(l) => Some(l),
            None if spec.client => None,
            None => {
                let l = server::bind(&spec.socket)?;
                if let Err(e) = apply_socket_permissions(&spec) {
                    let _ = std::fs::remove_file(&spec.socket);
                    return Err(e);
                }
                Some(l)
            }
        };
        // Non-blocking: the loop polls it, and another process sharing an inherited listener
        // may take a connection between the poll and the accept.
        if let Some(l) = &listener {
            l.set_nonblocking(true)
                .map_err(|source| server::ServerError::Io {
                    what: "cannot make non-blocking",
                    path: spec.socket.clone(),
                    source,
                })?;
        }
        let ctl = Arc::new(ServeControl::default());
        let (b, c, socket, name) = (
            backend.clone(),
            ctl.clone(),
            spec.socket.clone(),
            spec.name.clone(),
        );
        // In client mode the VMM's socket is connected to by a dialer thread that keeps the
        // daemon's identity: the VMM's socket is usually root's, out of the sandboxed port
        // thread's reach. It connects to that one path only, when the port thread asks.
        let dialer = if spec.client {
            Some(
                server::Dialer::spawn(&spec.name, spec.socket.clone())
                    .map_err(PortError::Thread)?,
            )
        } else {
            None
        };
        // The thread reports whether it could sandbox itself before it serves anything; one
        // that could not ends there (fail closed), and so does the port's start.
        let (sandboxed_tx, sandboxed_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("port-{}", spec.name))
            .spawn(move || {
                let span = tracing::info_span!("port", name = %name);
                let _g = span.enter();
                let sandboxed = crate::sandbox::enter();
                let refused = sandboxed.is_err();
                let _ = sandboxed_tx.send(sandboxed);
                if refused {
                    return;
                }
                match (listener, dialer) {
                    (Some(l), _) => server::serve_listener(&l, &b, &handoff, &c),
                    (None, Some(d)) => server::serve_client(&socket, &d, &b, &handoff, &c),
                    (None, None) => {}
                }
            })
            .map_err(PortError::Thread)?;
        let refused = match sandboxed_rx.recv() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(PortError::Sandbox(e)),
            Err(_) => Some(PortError::Thread(std::io::Error::other(
                "the serving thread ended before it could serve",
            ))),
        };
        if let Some(e) = refused {
            let _ = thread.join();
            if owns_socket {
                let _ = std::fs::remove_file(&spec.socket);
            }
            return Err(e);
        }
        tracing::info!(
            port = %spec.name,
            socket = %spec.socket.display(),
            mode = if spec.client { "client" } else { "server" },
            mac = %spec.mac(),
            queues = spec.queues,
            mtu = backend.config().mtu,
            port_security = spec.port_security,
            "port ready"
        );
        Ok(RunningPort {
            spec,
            backend,
            af_packet,
            switch,
            ctl,
            owns_socket,
            thread: Some(thread),
            handoff_dir: Some(handoff_dir),
            started_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        })
    }

    /// The device, with a handle on an AF_PACKET port's link state and counters, or on a
    /// switch port's membership.
    fn build_device(spec: &PortSpec, switches: &SwitchSet) -> Result<Device, PortError> {
        let queues = usize::from(spec.queues);
        let mut af_packet = None;
        let mut switch = None;
        let (port, mtu): (Arc<dyn HostPort>, u16) = match &spec.host {
            HostSpec::Tap(name) => {
                let tap = TapPort::open(name, queues, spec.mtu, spec.tap_tx)?;
                let mtu = tap.mtu();
                (Arc::new(tap), mtu)
            }
            HostSpec::AfPacket(ifname) => {
                let only = spec.mac_filter.then(|| spec.mac());
                let p = AfPacketPort::open_filtered(ifname, queues, spec.mtu, only)?;
                af_packet = Some(p.status());
                let mtu = p.mtu();
                (Arc::new(p), mtu)
            }
            HostSpec::Switch(name) => {
                let sw = switches.get(name)?;
                let member = sw
                    .attach(&spec.name, VlanMode::of(spec.vlan, &spec.trunk))
                    .map_err(crate::switch::SwitchError::Io)?;
                switch = Some((sw.clone(), member.clone()));
                let mtu = spec.mtu.unwrap_or(1500);
                (Arc::new(SwitchPort::new(sw, member, queues)), mtu)
            }
        };
        let config = NetConfig {
            mac: spec.mac(),
            mtu,
            queue_pairs: queues,
            max_queue_size: spec.queue_size,
            port_security: spec.port_security,
            live_migration: spec.live_migration,
        };
        let busy = Duration::from_micros(u64::from(spec.busy_poll_us));
        let backend = Arc::new(NetBackend::new(config, port, busy)?);
        backend.set_request_thread_hook(crate::sandbox::harden_port_descendant);
        if let Some((_, m)) = &switch {
            m.set_device(&backend);
        }
        Ok(Device {
            backend,
            af_packet,
            switch,
        })
    }

    /// The port's specification.
    pub fn spec(&self) -> &PortSpec {
        &self.spec
    }

    /// Stops serving: ends the session, closes the socket (removing its file in server mode)
    /// and releases the host port.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Wakes the serving loop, wherever it waits, and cuts the session.
        self.ctl.stop();
        if std::mem::take(&mut self.owns_socket) {
            let _ = std::fs::remove_file(&self.spec.socket);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Off the switch now, even if the device lingers until its last user lets go.
        if let Some((sw, m)) = &self.switch {
            sw.detach(m.id);
        }
        self.handoff_dir.take();
    }

    /// A snapshot of the port's state and counters.
    pub fn stats(&self) -> PortStats {
        PortStats {
            name: self.spec.name.clone(),
            socket: self.spec.socket.display().to_string(),
            connected: self.ctl.connected(),
            started_ns: self.started_ns,
            acked_features: self.backend.acked_features_now(),
            sessions: self.ctl.counters().snapshot(),
            queues: self
                .backend
                .stats()
                .iter()
                .map(|q| QueuePairStats {
                    rx: DirectionSnapshot::of(&q.rx),
                    tx: DirectionSnapshot::of(&q.tx),
                    busy_wakeups: q.busy_wakeups.load(Relaxed),
                    idle_wakeups: q.idle_wakeups.load(Relaxed),
                    rx_ring_full: q.rx_ring_full.load(Relaxed),
                })
                .collect(),
            af_packet: self.af_packet.as_ref().map(AfPacketStatus::snapshot),
            switch: self
                .switch
                .as_ref()
                .map(|(sw, m)| m.counters.snapshot(&sw.spec().name, &m.name)),
        }
    }
}

/// What [`RunningPort::build_device`] makes.
struct Device {
    backend: Arc<NetBackend>,
    af_packet: Option<AfPacketStatus>,
    switch: Option<(Arc<Switch>, Arc<Member>)>,
}

impl Drop for RunningPort {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Counters of one direction, as numbers.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DirectionSnapshot {
    /// Frames delivered.
    pub frames: u64,
    /// Bytes delivered.
    pub bytes: u64,
    /// Notifications sent to the guest.
    pub notifications: u64,
    /// Drops by reason name.
    pub drops: BTreeMap<String, u64>,
}

/// A counter of a snapshot: metric stem, help text, and how to read it.
pub type Counter<T> = (&'static str, &'static str, fn(&T) -> u64);

impl DirectionSnapshot {
    /// The plain counters of one direction (drops, labelled by reason, are apart). The
    /// metrics endpoint renders each as `vhost_pump_<stem>_total{port,queue,dir}`.
    pub const COUNTERS: [Counter<DirectionSnapshot>; 3] = [
        (
            "frames",
            "Frames delivered (rx: to the guest, tx: from the guest).",
            |d| d.frames,
        ),
        (
            "bytes",
            "Bytes delivered, without the virtio-net header.",
            |d| d.bytes,
        ),
        ("notifications", "Guest notifications sent.", |d| {
            d.notifications
        }),
    ];

    fn of(d: &vhost_net_backend::stats::DirectionStats) -> Self {
        DirectionSnapshot {
            frames: d.frames.load(Relaxed),
            bytes: d.bytes.load(Relaxed),
            notifications: d.notifications.load(Relaxed),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name().to_string(), d.drops_of(*r)))
                .collect(),
        }
    }
}

impl QueuePairStats {
    /// The per-queue-pair counters besides each direction's. The metrics endpoint renders
    /// each as `vhost_pump_<stem>_total{port,queue}`, except that the two wake-up counters
    /// share `vhost_pump_wakeups_total` with a `kind` label.
    pub const COUNTERS: [Counter<QueuePairStats>; 3] = [
        (
            "rx_ring_full",
            "Times host frames waited for guest RX buffers.",
            |q| q.rx_ring_full,
        ),
        ("busy_wakeups", "Worker wake-ups that found work.", |q| {
            q.busy_wakeups
        }),
        ("idle_wakeups", "Worker wake-ups that found none.", |q| {
            q.idle_wakeups
        }),
    ];
}

/// Counters of one queue pair.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct QueuePairStats {
    /// Host → guest.
    pub rx: DirectionSnapshot,
    /// Guest → host.
    pub tx: DirectionSnapshot,
    /// Wake-ups that found work.
    pub busy_wakeups: u64,
    /// Wake-ups that found none.
    pub idle_wakeups: u64,
    /// Times host frames waited for guest RX buffers.
    #[serde(default)]
    pub rx_ring_full: u64,
}

/// State and counters of one port.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PortStats {
    /// Port name.
    pub name: String,
    /// Socket path.
    pub socket: String,
    /// A frontend is connected.
    pub connected: bool,
    /// When this instance of the port started (nanoseconds since the epoch): a different value
    /// under the same name means the port was re-created, e.g. by a daemon restart, and the
    /// frontend's connection of before is gone.
    #[serde(default)]
    pub started_ns: u64,
    /// Virtio features the guest acked in the current session.
    pub acked_features: u64,
    /// Per queue pair.
    pub queues: Vec<QueuePairStats>,
    /// Session events: refused peers, stalled frontends, fd budgets exceeded.
    #[serde(default)]
    pub sessions: SessionStats,
    /// AF_PACKET ports only: the interface, its link state and the port's own counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub af_packet: Option<AfPacketSnapshot>,
    /// A switch port's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<MemberSnapshot>,
}

/// All ports of the daemon.
#[derive(Default)]
pub struct PortRegistry {
    ports: Mutex<BTreeMap<String, RunningPort>>,
    switches: SwitchSet,
    remembered: Mutex<Option<Remembered>>,
}

/// The ports added at run time (`ctl add`) that a restarted daemon starts again, and the file
/// that keeps them (`--state-file`).
struct Remembered {
    path: PathBuf,
    names: BTreeSet<String>,
    switches: BTreeSet<String>,
}

impl PortRegistry {
    /// A registry that keeps the ports added with [`PortRegistry::add_remembered`] in `path`
    /// (a `--config` file of `[[port]]` tables, rewritten atomically on every change).
    pub fn with_state_file(path: &Path) -> Self {
        PortRegistry {
            remembered: Mutex::new(Some(Remembered {
                path: path.into(),
                names: BTreeSet::new(),
                switches: BTreeSet::new(),
            })),
            ..Default::default()
        }
    }

    /// Starts a port and, with a state file, remembers it across daemon restarts.
    pub fn add_remembered(&self, spec: PortSpec) -> Result<(), PortError> {
        let name = spec.name.clone();
        self.add(spec)?;
        let remembered = self.remember(|names| {
            names.insert(name.clone());
        });
        if remembered.is_err() {
            // A port that would not come back after a restart is refused, not half-kept.
            let _ = self.remove(&name);
        }
        remembered
    }

    /// Starts the ports a state file kept; the file is rewritten once at the end, without the
    /// ports that failed (so a crash while restoring loses nothing).
    pub fn restore(&self, specs: Vec<PortSpec>) -> Vec<(String, Result<(), PortError>)> {
        let results: Vec<_> = specs
            .into_iter()
            .map(|spec| (spec.name.clone(), self.add(spec)))
            .collect();
        self.remember_started(&results, |names, _, ok| names.extend(ok));
        results
    }

    /// Remembers the names that started in `results` (through `keep`), rewriting the state
    /// file once.
    fn remember_started(
        &self,
        results: &[(String, Result<(), PortError>)],
        keep: impl FnOnce(&mut BTreeSet<String>, &mut BTreeSet<String>, Vec<String>),
    ) {
        let ok: Vec<String> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(n, _)| n.clone())
            .collect();
        if let Err(e) = self.remember_both(|ports, switches| keep(ports, switches, ok)) {
            tracing::error!(error = %e, "state file not rewritten");
        }
    }

    fn remember(&self, change: impl FnOnce(&mut BTreeSet<String>)) -> Result<(), PortError> {
        self.remember_both(|names, _| change(names))
    }

    fn remember_both(
        &self,
        change: impl FnOnce(&mut BTreeSet<String>, &mut BTreeSet<String>),
    ) -> Result<(), PortError> {
        let mut guard = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = guard.as_mut() else {
            return Ok(());
        };
        change(&mut r.names, &mut r.switches);
        let switches: Vec<SwitchSpec> = self
            .switches
            .specs()
            .into_iter()
            .filter(|s| r.switches.contains(&s.name))
            .collect();
        r.switches.retain(|n| switches.iter().any(|s| &s.name == n));
        let specs: Vec<PortSpec> = {
            let ports = self.lock();
            r.names.retain(|n| ports.contains_key(n));
            r.names
                .iter()
                .filter_map(|n| ports.get(n))
                .map(|p| p.spec.clone())
                .collect()
        };
        let text = crate::config::DaemonConfig {
            switch: switches,
            port: specs,
        }
        .to_toml()
        .map_err(|message| PortError::StateFile {
            path: r.path.display().to_string(),
            message,
        })?;
        crate::cni::state::write_atomic(&r.path, text.as_bytes(), 0o600).map_err(|e| {
            PortError::StateFile {
                path: r.path.display().to_string(),
                message: e.to_string(),
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RunningPort>> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a port; refuses duplicates of name or socket.
    pub fn add(&self, spec: PortSpec) -> Result<(), PortError> {
        self.add_with(spec, None)
    }

    /// Starts a port serving an inherited listening socket (see [`RunningPort::start_with`]).
    pub fn add_inherited(&self, spec: PortSpec, listener: UnixListener) -> Result<(), PortError> {
        self.add_with(spec, Some(listener))
    }

    fn add_with(&self, spec: PortSpec, inherited: Option<UnixListener>) -> Result<(), PortError> {
        spec.validate()?;
        {
            let ports = self.lock();
            if ports.contains_key(&spec.name) {
                return Err(PortError::Duplicate(spec.name));
            }
            if let Some(p) = ports.values().find(|p| p.spec.socket == spec.socket) {
                return Err(PortError::SocketInUse(
                    spec.socket.display().to_string(),
                    p.spec.name.clone(),
                ));
            }
            if ports.len() >= MAX_PORTS {
                return Err(PortError::TooMany);
            }
        }
        // Started outside the lock: opening a port can take a while and must not block others.
        let running = RunningPort::start_with(spec, inherited, &self.switches)?;
        let mut ports = self.lock();
        let name = running.spec.name.clone();
        if ports.contains_key(&name) {
            return Err(PortError::Duplicate(name));
        }
        ports.insert(name, running);
        Ok(())
    }

    /// Stops and removes a port.
    pub fn remove(&self, name: &str) -> Result<(), PortError> {
        let port = self
            .lock()
            .remove(name)
            .ok_or_else(|| PortError::NotFound(name.into()))?;
        port.stop();
        tracing::info!(port = name, "port removed");
        self.remember(|names| {
            names.remove(name);
        })
    }

    /// The specifications of all ports.
    pub fn list(&self) -> Vec<PortSpec> {
        self.lock().values().map(|p| p.spec.clone()).collect()
    }

    /// Counters of one port, or of all.
    pub fn stats(&self, name: Option<&str>) -> Result<Vec<PortStats>, PortError> {
        let ports = self.lock();
        match name {
            Some(n) => ports
                .get(n)
                .map(|p| vec![p.stats()])
                .ok_or_else(|| PortError::NotFound(n.into())),
            None => Ok(ports.values().map(RunningPort::stats).collect()),
        }
    }

    /// Stops every port, then every switch.
    pub fn stop_all(&self) {
        let ports = std::mem::take(&mut *self.lock());
        for (_, p) in ports {
            p.stop();
        }
        self.switches.stop_all();
    }

    /// The daemon's switches.
    pub fn switches(&self) -> &SwitchSet {
        &self.switches
    }

    /// Starts a switch (from the config file: not remembered in the state file).
    pub fn add_switch_unremembered(&self, spec: SwitchSpec) -> Result<(), PortError> {
        Ok(self.switches.add(spec)?)
    }

    /// Starts a switch and, with a state file, remembers it across daemon restarts.
    pub fn add_switch(&self, spec: SwitchSpec) -> Result<(), PortError> {
        let name = spec.name.clone();
        self.switches.add(spec)?;
        let remembered = self.remember_both(|_, switches| {
            switches.insert(name.clone());
        });
        if remembered.is_err() {
            let _ = self.switches.remove(&name);
        }
        remembered
    }

    /// Stops a switch no port uses.
    pub fn remove_switch(&self, name: &str) -> Result<(), PortError> {
        self.switches.remove(name)?;
        self.remember_both(|_, switches| {
            switches.remove(name);
        })
    }

    /// Starts the switches a state file kept (before its ports).
    pub fn restore_switches(&self, specs: Vec<SwitchSpec>) -> Vec<(String, Result<(), PortError>)> {
        let results: Vec<_> = specs
            .into_iter()
            .map(|s| {
                (
                    s.name.clone(),
                    self.switches.add(s).map_err(PortError::from),
                )
            })
            .collect();
        self.remember_started(&results, |_, switches, ok| switches.extend(ok));
        results
    }
}

fn lookup_id(name: &str, user: bool) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let cname = CString::new(name).map_err(|_| format!("invalid name {name:?}"))?;
    let mut buf = vec![0 as libc::c_char; 16384];
    if user {
        // SAFETY: passwd is plain old data; zeroed is a valid initial value.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and the buffer length is exact.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            )
        };
        if rc != 0 || out.is_null() {
            return Err(format!("no user named {name:?}"));
        }
        Ok(pw.pw_uid)
    } else {
        // SAFETY: group is plain old data; zeroed is a valid initial value.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and the buffer length is exact.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut gr,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            )
        };
        if rc != 0 || out.is_null() {
            return Err(format!("no group named {name:?}"));
        }
        Ok(gr.gr_gid)
    }
}

/// Applies mode/owner/group to a freshly bound server socket and checks its directory: a
/// world-writable directory without the sticky bit would let anyone replace the socket.
fn apply_socket_permissions(spec: &PortSpec) -> Result<(), PortError> {
    let path = &spec.socket;
    let err = |message: String| PortError::Permissions {
        path: path.display().to_string(),
        message,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mode = std::fs::metadata(dir)
            .map_err(|e| err(format!("cannot inspect its directory: {e}")))?
            .permissions()
            .mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(err(format!(
                "its directory {} is world-writable without the sticky bit; use a private directory",
                dir.display()
            )));
        }
    }
    let mode = spec.mode()?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("cannot set mode {mode:o}: {e}")))?;
    let uid = spec
        .socket_owner
        .as_deref()
        .map(|u| lookup_id(u, true))
        .transpose()
        .map_err(err)?;
    let gid = spec
        .socket_group
        .as_deref()
        .map(|g| lookup_id(g, false))
        .transpose()
        .map_err(err)?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(path, uid, gid)
            .map_err(|e| err(format!("cannot change owner: {e}")))?;
    }
    Ok(())
}

/// Path helper for tests and callers: true when `p` names an existing socket.
pub fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::af_packet::LinkState;

    fn port_stats(af_packet: Option<AfPacketSnapshot>) -> PortStats {
        PortStats {
            name: "vm0".into(),
            socket: "/s".into(),
            connected: false,
            started_ns: 0,
            acked_features: 0,
            sessions: Default::default(),
            queues: Vec::new(),
            af_packet,
            switch: None,
        }
    }

    #[test]
    fn tap_stats_have_no_af_packet_key_and_af_packet_stats_have_every_field() {
        let tap = serde_json::to_value(port_stats(None)).unwrap();
        assert_eq!(
            tap,
            serde_json::json!({
                "name": "vm0",
                "socket": "/s",
                "connected": false,
                "started_ns": 0,
                "acked_features": 0,
                "sessions": {
                    "started": 0,
                    "refused_peers": 0,
                    "stalled_frontends": 0,
                    "fd_budget_exceeded": 0,
                    "memory_faults": 0,
                    "refused_requests": 0,
                },
                "queues": [],
            })
        );

        let snap = AfPacketSnapshot {
            interface: "veth0".into(),
            link: LinkState::Down,
            rx_truncated: 1,
            rx_gso_refused: 2,
            rx_too_big: 3,
            rx_malformed: 4,
            rx_csum_completed: 5,
            rx_ring_full: 6,
            tx_refused: 7,
            tx_link_down: 8,
            tx_stalled: 9,
            tx_failed: 11,
            reattached: 10,
            rx_copied: 12,
        };
        let afp = port_stats(Some(snap.clone()));
        let v = serde_json::to_value(&afp).unwrap();
        assert_eq!(
            v["af_packet"],
            serde_json::json!({
                "interface": "veth0",
                "link": "down",
                "rx_truncated": 1,
                "rx_gso_refused": 2,
                "rx_too_big": 3,
                "rx_malformed": 4,
                "rx_csum_completed": 5,
                "rx_ring_full": 6,
                "tx_refused": 7,
                "tx_link_down": 8,
                "tx_stalled": 9,
                "tx_failed": 11,
                "reattached": 10,
                "rx_copied": 12,
            })
        );
        // Every counter `counters()` names is a field of the JSON object, with its value.
        for (name, _, value) in snap.counters() {
            assert_eq!(v["af_packet"][name], value, "{name}");
        }
        // `ctl` parses what the daemon sends, with or without the object.
        let back: PortStats = serde_json::from_value(v).unwrap();
        assert_eq!(back, afp);
        let back: PortStats = serde_json::from_value(tap).unwrap();
        assert_eq!(back, port_stats(None));
        for (state, name) in [
            (LinkState::Up, "up"),
            (LinkState::Down, "down"),
            (LinkState::Gone, "gone"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), name);
            assert_eq!(state.as_str(), name);
        }
    }
}
