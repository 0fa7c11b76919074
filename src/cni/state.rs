//! What the plugin made for each attachment, on disk, so DEL, CHECK and GC know what to remove
//! or verify even after the netns, the runtime's cache or a half-done ADD are gone.
//!
//! Layout under `socketDir` (one 12-hex-digit key per container id + interface name):
//! ```text
//! <key>/vu.sock            the vhost-user socket (the directory holds nothing else; in client
//!                          mode it is handed to the VMM's user so the VMM can create the socket)
//! .state/<key>.json        AttachmentState
//! .state/<key>.lock        per-attachment lock
//! .state/<key>.log         vhost-pump's and its supervisor's log
//! .state/<key>.pid         vhost-pump's pid
//! .state/<key>.supervisor.pid, .state/<key>.sidecar.json   the supervisor's pid and orders
//! .state/<key>.status.json the supervisor's record of vhost-pump restarts
//! ```
//! With `"kata": "go"` the socket is where Kata runtime-go looks instead,
//! `/tmp/vhostuser_<IP>/vhu.sock`; the state file records it.
//! Names of host interfaces derive from the key too (`vp<key>` taps, `vm<key>` macvlans), so a
//! DEL without state still finds them.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::{KataRuntime, MacvlanMode, VhostUserMode};
use super::env::AttachmentId;
use super::error::{io_error, CniError};
use super::result::CniResult;

/// The short, stable key of an attachment: 48 bits of FNV-1a over container id and ifname.
pub fn attachment_key(id: &AttachmentId) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id
        .container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(id.ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// Paths of one attachment.
#[derive(Clone, Debug)]
pub struct AttachmentPaths {
    /// The key.
    pub key: String,
    /// Directory holding only the socket.
    pub socket_dir: PathBuf,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// State file.
    pub state: PathBuf,
    /// Lock file.
    pub lock: PathBuf,
    /// Sidecar log.
    pub log: PathBuf,
    /// vhost-pump pid file.
    pub pid: PathBuf,
    /// Supervisor pid file.
    pub supervisor_pid: PathBuf,
    /// The supervisor's orders.
    pub sidecar_spec: PathBuf,
    /// The supervisor's restart record.
    pub status: PathBuf,
}

/// The directories under `socketDir`.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `socket_dir`.
    pub fn new(socket_dir: &Path) -> Layout {
        Layout {
            root: socket_dir.to_path_buf(),
        }
    }

    /// Directory of state, logs, pid and lock files.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(".state")
    }

    /// Creates `socketDir` (0755) and its state directory (0700).
    pub fn create(&self) -> Result<(), CniError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(|e| io_error("cannot create socketDir", &self.root, e))?;
        let s = self.state_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&s)
            .map_err(|e| io_error("cannot create", &s, e))
    }

    /// Paths of the attachment with `key`.
    pub fn paths(&self, key: &str) -> AttachmentPaths {
        let st = self.state_dir();
        let socket_dir = self.root.join(key);
        AttachmentPaths {
            key: key.to_string(),
            socket: socket_dir.join("vu.sock"),
            socket_dir,
            state: st.join(format!("{key}.json")),
            lock: st.join(format!("{key}.lock")),
            log: st.join(format!("{key}.log")),
            pid: st.join(format!("{key}.pid")),
            supervisor_pid: st.join(format!("{key}.supervisor.pid")),
            sidecar_spec: st.join(format!("{key}.sidecar.json")),
            status: st.join(format!("{key}.status.json")),
        }
    }

    /// Every state file present (for GC).
    pub fn state_files(&self) -> Vec<PathBuf> {
        let Ok(rd) = fs::read_dir(self.state_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.to_string_lossy();
                p.extension().is_some_and(|e| e == "json")
                    && !name.ends_with(".sidecar.json")
                    && !name.ends_with(".status.json")
            })
            .collect();
        v.sort();
        v
    }
}

/// Name of the tap of the attachment with `key`.
pub fn tap_name(key: &str) -> String {
    format!("vp{key}")
}

/// Name of the macvlan of the attachment with `key`.
pub fn macvlan_name(key: &str) -> String {
    format!("vm{key}")
}

/// The host port an attachment uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PortState {
    /// A tap we created, enslaved to `bridge`.
    Tap {
        /// Tap name.
        name: String,
        /// Bridge.
        bridge: String,
        /// Created with IFF_MULTI_QUEUE.
        multi_queue: bool,
    },
    /// A macvlan we created on `master`.
    Macvlan {
        /// Macvlan name.
        name: String,
        /// Lower device.
        master: String,
        /// Mode.
        mode: MacvlanMode,
    },
    /// An existing interface used as is (nothing to remove).
    Existing {
        /// Interface name.
        name: String,
    },
    /// A port of the node daemon's switch (no host interface).
    Switch {
        /// Switch name.
        switch: String,
    },
}

impl PortState {
    /// The interface vhost-pump attaches to (the switch's name for a switch port).
    pub fn name(&self) -> &str {
        match self {
            PortState::Tap { name, .. }
            | PortState::Macvlan { name, .. }
            | PortState::Existing { name } => name,
            PortState::Switch { switch } => switch,
        }
    }
}

/// Everything made for one attachment. Fields are filled *before* the thing they name is
/// created, so a teardown after any failure removes what may exist.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentState {
    /// Network name (GC only touches its own network's attachments).
    pub network: String,
    /// Container (sandbox) id.
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
    /// `CNI_NETNS` at ADD.
    pub netns: Option<String>,
    /// Attachment key.
    pub key: String,
    /// Socket path.
    pub socket_path: PathBuf,
    /// Socket direction.
    pub mode: VhostUserMode,
    /// Guest MAC.
    pub mac: String,
    /// MTU, once known.
    pub mtu: Option<u16>,
    /// Queue pairs.
    pub queues: u16,
    /// Virtqueue size.
    pub queue_size: u16,
    /// The configuration handed to the IPAM plugin, once IPAM ADD was attempted.
    pub ipam_config: Option<Value>,
    /// The host port, once its creation was attempted.
    pub port: Option<PortState>,
    /// The DAN file, once written to.
    pub dan_file: Option<PathBuf>,
    /// The Kata runtime the attachment was made for.
    #[serde(default = "default_kata")]
    pub kata: KataRuntime,
    /// The link in the pod netns (Kata runtime-go), once its creation was attempted.
    #[serde(default)]
    pub pod_link: Option<PodLinkState>,
    /// Node-daemon mode: the daemon and the port's name there, once the port was requested.
    #[serde(default)]
    pub node_port: Option<NodePortState>,
    /// The full result once ADD completed.
    pub result: Option<CniResult>,
}

/// State files written before the `kata` key existed were DAN attachments.
fn default_kata() -> KataRuntime {
    KataRuntime::Rs
}

/// The pod-side link of a Kata runtime-go attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodLinkState {
    /// The pod's netns file (`CNI_NETNS`).
    pub netns: PathBuf,
    /// Link name (`CNI_IFNAME`).
    pub ifname: String,
    /// Link kind (`dummy`, or `ifb` on kernels without the dummy driver).
    #[serde(default = "default_link_kind")]
    pub kind: String,
}

fn default_link_kind() -> String {
    "dummy".into()
}

/// A port on the node daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePortState {
    /// The daemon's control socket.
    pub control: PathBuf,
    /// The port's name there.
    pub name: String,
    /// When the daemon started the port (its `started_ns`): another value later means the port
    /// was re-created (daemon restart) and the frontend's old connection is gone.
    #[serde(default)]
    pub started_ns: Option<u64>,
}

impl AttachmentState {
    /// Loads a state file; `Ok(None)` when absent.
    pub fn load(path: &Path) -> Result<Option<AttachmentState>, CniError> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                CniError::new(
                    super::error::code::IO,
                    format!("corrupt state file {}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("cannot read", path, e)),
        }
    }

    /// Saves atomically.
    pub fn save(&self, path: &Path) -> Result<(), CniError> {
        let data = serde_json::to_vec_pretty(self).unwrap_or_default();
        write_atomic(path, &data, 0o600).map_err(|e| io_error("cannot write", path, e))
    }

    /// The attachment's paths under `layout`, with the socket where this attachment has it.
    pub fn paths(&self, layout: &Layout) -> AttachmentPaths {
        let mut p = layout.paths(&self.key);
        if let Some(dir) = self.socket_path.parent() {
            p.socket_dir = dir.to_path_buf();
            p.socket = self.socket_path.clone();
        }
        p
    }

    /// The attachment identity.
    pub fn id(&self) -> AttachmentId {
        AttachmentId {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// Writes `data` to a temporary file next to `path`, syncs it, and renames it over `path`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_stable_and_distinct() {
        let a = AttachmentId {
            container_id: "c".repeat(64),
            ifname: "eth0".into(),
        };
        let b = AttachmentId {
            ifname: "eth1".into(),
            ..a.clone()
        };
        let ka = attachment_key(&a);
        assert_eq!(ka.len(), 12);
        assert_eq!(ka, attachment_key(&a));
        assert_ne!(ka, attachment_key(&b));
        assert!(tap_name(&ka).len() <= 15);
        let p = Layout::new(Path::new("/run/vhost-pump")).paths(&ka);
        assert_eq!(
            p.socket.as_os_str().len(),
            "/run/vhost-pump".len() + super::super::config::SOCKET_SUFFIX_LEN
        );
    }
}
