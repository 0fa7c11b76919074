//! The Kata "Directly Attachable Network" file `{danConfDir}/{sandbox id}.json`: one entry per
//! interface of the sandbox, in the schema Kata runtime-rs parses (the portable subset the Go
//! runtime reads too: `guest_mac` and `mtu` always set, CIDR addresses, no neighbours).
//!
//! Several interfaces of one sandbox (one ADD each, maybe concurrent) share the file: every
//! change happens under a per-sandbox lock and replaces the file atomically, and entries this
//! plugin did not write are kept as they are.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{code, CniError};
use super::lock::{FileLock, LockError};
use super::result::CniResult;
use super::state::write_atomic;

/// How long an ADD/DEL waits for another one on the same sandbox.
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// One device entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DanDevice {
    /// Interface name (CNI_IFNAME).
    pub name: String,
    /// Guest MAC.
    pub guest_mac: String,
    /// The host device.
    pub device: DanDeviceKind,
    /// Addresses and routes for the guest.
    pub network_info: DanNetworkInfo,
}

/// The host device of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum DanDeviceKind {
    /// A vhost-user socket.
    #[serde(rename = "vhost-user")]
    VhostUser {
        /// Socket path.
        path: String,
        /// Queue pairs.
        queue_num: u32,
        /// Virtqueue size.
        queue_size: u32,
    },
}

/// Guest network settings of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DanNetworkInfo {
    /// The interface.
    pub interface: DanInterface,
    /// Routes through it.
    pub routes: Vec<DanRoute>,
}

/// Guest interface settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DanInterface {
    /// Addresses in CIDR notation.
    pub ip_addresses: Vec<String>,
    /// MTU.
    pub mtu: u64,
    /// Link type (unused for vhost-user).
    pub ntype: String,
    /// Link flags.
    pub flags: u32,
}

/// A guest route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DanRoute {
    /// Destination CIDR.
    pub dest: String,
    /// Next hop, or empty for an on-link route.
    pub gateway: String,
    /// Preferred source, or empty.
    pub source: String,
    /// Route scope.
    pub scope: u32,
}

impl DanDevice {
    /// The entry of a vhost-user interface configured with `ipam`'s addresses and routes
    /// (routes without a next hop go through the gateway of their family, as the CNI spec
    /// leaves to the plugin).
    pub fn vhost_user(
        name: &str,
        guest_mac: &str,
        socket: &Path,
        queues: u16,
        queue_size: u16,
        mtu: u16,
        ipam: &CniResult,
    ) -> DanDevice {
        DanDevice {
            name: name.into(),
            guest_mac: guest_mac.into(),
            device: DanDeviceKind::VhostUser {
                path: socket.to_string_lossy().into_owned(),
                queue_num: u32::from(queues),
                queue_size: u32::from(queue_size),
            },
            network_info: DanNetworkInfo {
                interface: DanInterface {
                    ip_addresses: ipam.ips.iter().map(|i| i.address.to_string()).collect(),
                    mtu: u64::from(mtu),
                    ntype: String::new(),
                    flags: 0,
                },
                routes: ipam
                    .routes
                    .iter()
                    .map(|r| DanRoute {
                        dest: r.dst.to_string(),
                        gateway: r
                            .gw
                            .or_else(|| ipam.gateway_for(&r.dst.addr()))
                            .map(|g| g.to_string())
                            .unwrap_or_default(),
                        source: String::new(),
                        scope: 0,
                    })
                    .collect(),
            },
        }
    }
}

/// DAN file failures.
#[derive(Debug, thiserror::Error)]
pub enum DanError {
    /// Filesystem error.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The existing file is not a DAN config.
    #[error("{path} is not a DAN config ({why}); remove or fix it")]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The sandbox lock.
    #[error(transparent)]
    Lock(#[from] LockError),
}

impl From<DanError> for CniError {
    fn from(e: DanError) -> CniError {
        let c = match &e {
            DanError::Lock(LockError::Busy(_)) => code::TRY_AGAIN,
            _ => code::DAN,
        };
        CniError::new(c, e.to_string())
    }
}

/// The DAN file of `sandbox`.
pub fn dan_path(dir: &Path, sandbox: &str) -> PathBuf {
    dir.join(format!("{sandbox}.json"))
}

fn lock(dir: &Path, sandbox: &str) -> Result<FileLock, DanError> {
    Ok(FileLock::acquire(
        &dir.join(format!(".{sandbox}.lock")),
        LOCK_TIMEOUT,
    )?)
}

fn read(path: &Path) -> Result<Option<Value>, DanError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DanError::Io {
                what: "cannot read",
                path: path.into(),
                source,
            })
        }
    };
    let v: Value = serde_json::from_slice(&data).map_err(|e| DanError::Corrupt {
        path: path.into(),
        why: e.to_string(),
    })?;
    if !v.get("devices").is_some_and(Value::is_array) {
        return Err(DanError::Corrupt {
            path: path.into(),
            why: "no \"devices\" array".into(),
        });
    }
    Ok(Some(v))
}

fn write(path: &Path, v: &Value) -> Result<(), DanError> {
    let data = serde_json::to_vec_pretty(v).unwrap_or_default();
    write_atomic(path, &data, 0o644).map_err(|source| DanError::Io {
        what: "cannot write",
        path: path.into(),
        source,
    })
}

/// Adds or replaces (by name) the entry of `dev` in the sandbox's file, keeping entries sorted
/// by name (runtime-rs names guest interfaces by position). Returns the file's path.
pub fn upsert(dir: &Path, sandbox: &str, dev: &DanDevice) -> Result<PathBuf, DanError> {
    fs::create_dir_all(dir).map_err(|source| DanError::Io {
        what: "cannot create",
        path: dir.into(),
        source,
    })?;
    let _lock = lock(dir, sandbox)?;
    let path = dan_path(dir, sandbox);
    let mut v = read(&path)?.unwrap_or_else(|| json!({ "netns": current_netns(), "devices": [] }));
    let entry = serde_json::to_value(dev).unwrap_or_default();
    if let Some(devs) = v["devices"].as_array_mut() {
        devs.retain(|d| d.get("name").and_then(Value::as_str) != Some(&dev.name));
        devs.push(entry);
        devs.sort_by(|a, b| {
            let n = |d: &Value| {
                d.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            n(a).cmp(&n(b))
        });
    }
    write(&path, &v)?;
    Ok(path)
}

/// Removes the entry named `name`; removes the file when no entry is left. Absent file or
/// entry: nothing to do.
pub fn remove(dir: &Path, sandbox: &str, name: &str) -> Result<(), DanError> {
    if !dir.is_dir() {
        return Ok(());
    }
    let path = dan_path(dir, sandbox);
    if !path.exists() {
        return Ok(());
    }
    let lock = lock(dir, sandbox)?;
    let Some(mut v) = read(&path)? else {
        lock.remove();
        return Ok(());
    };
    let devs = v["devices"].as_array_mut().expect("checked by read");
    let before = devs.len();
    devs.retain(|d| d.get("name").and_then(Value::as_str) != Some(name));
    if devs.is_empty() {
        fs::remove_file(&path).map_err(|source| DanError::Io {
            what: "cannot remove",
            path: path.clone(),
            source,
        })?;
        lock.remove();
    } else if devs.len() != before {
        write(&path, &v)?;
    }
    Ok(())
}

/// The entry named `name`, if the file has one this plugin can read.
pub fn find(dir: &Path, sandbox: &str, name: &str) -> Result<Option<DanDevice>, DanError> {
    let path = dan_path(dir, sandbox);
    let Some(v) = read(&path)? else {
        return Ok(None);
    };
    Ok(v["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|d| DanDevice::deserialize(d).ok()))
}

/// The netns the devices live in, for the file's `netns`: `null` in the host's (init's) netns,
/// else the named netns (`/run/netns/*`) that is ours, if any.
pub fn current_netns() -> Option<String> {
    let ino = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let ours = ino(Path::new("/proc/self/ns/net"))?;
    if ino(Path::new("/proc/1/ns/net")) == Some(ours) {
        return None;
    }
    fs::read_dir("/run/netns")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| ino(p) == Some(ours))
        .map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::result::{IpConfig, Route};

    fn dev(name: &str) -> DanDevice {
        let ipam = CniResult {
            ips: vec![IpConfig {
                address: "10.9.0.5/24".parse().unwrap(),
                gateway: Some("10.9.0.1".parse().unwrap()),
                interface: None,
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
            }],
            ..Default::default()
        };
        DanDevice::vhost_user(
            name,
            "02:00:00:00:00:05",
            Path::new("/s"),
            2,
            256,
            1500,
            &ipam,
        )
    }

    #[test]
    fn merge_and_remove() {
        let dir = std::env::temp_dir().join(format!("vp-dan-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        upsert(&dir, "sb", &dev("eth1")).unwrap();
        let p = upsert(&dir, "sb", &dev("eth0")).unwrap();
        upsert(&dir, "sb", &dev("eth0")).unwrap();
        let v: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        let names: Vec<_> = v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["eth0", "eth1"]);
        let d = &v["devices"][0];
        assert_eq!(d["network_info"]["routes"][0]["gateway"], "10.9.0.1");
        assert_eq!(d["device"]["type"], "vhost-user");
        assert_eq!(find(&dir, "sb", "eth1").unwrap(), Some(dev("eth1")));
        remove(&dir, "sb", "eth0").unwrap();
        assert!(p.exists());
        remove(&dir, "sb", "eth1").unwrap();
        remove(&dir, "sb", "eth1").unwrap();
        assert!(!p.exists());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "lock file left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
