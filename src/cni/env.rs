//! The `CNI_*` environment of one invocation, validated per command.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

use super::error::{code, CniError};
use crate::netdev::IfName;

/// The CNI command (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Add a container to the network.
    Add,
    /// Remove it.
    Del,
    /// Verify it.
    Check,
    /// Report whether ADD can work.
    Status,
    /// Report supported versions.
    Version,
    /// Remove attachments not in the valid list.
    Gc,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

/// The variables of one invocation, as read (not yet validated for a command).
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Option<String>,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS`.
    pub args: Option<String>,
    /// `CNI_PATH`.
    pub path: Option<String>,
}

/// The identity of one attachment: container and interface name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentId {
    /// `CNI_CONTAINERID` (the Kata sandbox id under containerd).
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl CniEnv {
    /// Reads the process environment.
    pub fn from_process() -> CniEnv {
        Self::from_vars(std::env::vars_os())
    }

    /// Reads from a list of variables (for tests).
    pub fn from_vars(vars: impl IntoIterator<Item = (OsString, OsString)>) -> CniEnv {
        let map: HashMap<String, String> = vars
            .into_iter()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, v)| k.starts_with("CNI_") && !v.is_empty())
            .collect();
        let get = |k: &str| map.get(k).cloned();
        CniEnv {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    /// The command, or error 4.
    pub fn command(&self) -> Result<Command, CniError> {
        let c = self
            .command
            .as_deref()
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"))?;
        Command::parse(c).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND={c:?} is not one of ADD, DEL, CHECK, STATUS, VERSION, GC"),
            )
        })
    }

    /// Container id and interface name, validated (error 4 naming the variables at fault).
    pub fn attachment(&self) -> Result<AttachmentId, CniError> {
        let mut bad = Vec::new();
        let cid = self.container_id.clone().unwrap_or_default();
        if !valid_container_id(&cid) {
            bad.push(if cid.is_empty() {
                "CNI_CONTAINERID is not set".to_string()
            } else {
                format!("CNI_CONTAINERID={cid:?} is not alphanumeric plus '_', '.', '-'")
            });
        }
        let ifname = self.ifname.clone().unwrap_or_default();
        if ifname.is_empty() {
            bad.push("CNI_IFNAME is not set".into());
        } else if let Err(e) = IfName::new(&ifname) {
            bad.push(format!("CNI_IFNAME: {e}"));
        }
        if !bad.is_empty() {
            return Err(CniError::new(code::INVALID_ENV, bad.join("; ")));
        }
        Ok(AttachmentId {
            container_id: cid,
            ifname,
        })
    }

    /// `CNI_NETNS`, which the spec requires for ADD and CHECK (the DAN device itself lives in
    /// the host's netns, but IPAM plugins insist on it).
    pub fn require_netns(&self) -> Result<&str, CniError> {
        self.netns
            .as_deref()
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"))
    }

    /// The plugin search path, or error 4.
    pub fn cni_path(&self) -> Result<Vec<PathBuf>, CniError> {
        let p = self.path.as_deref().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                "CNI_PATH is not set (needed to find the IPAM plugin)",
            )
        })?;
        Ok(std::env::split_paths(p)
            .filter(|d| !d.as_os_str().is_empty())
            .collect())
    }

    /// The value of `key` in `CNI_ARGS` (`K=V;K=V`).
    pub fn arg(&self, key: &str) -> Option<String> {
        self.args.as_deref()?.split(';').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    }
}

/// Container ids become file names (the DAN file): letters, digits, '_', '.', '-' only, not
/// starting with a dot, at most 255 bytes.
pub fn valid_container_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 250
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> CniEnv {
        CniEnv::from_vars(vars.iter().map(|(k, v)| (k.into(), v.into())))
    }

    #[test]
    fn command_and_attachment() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(e.command().unwrap(), Command::Add);
        assert_eq!(e.attachment().unwrap().ifname, "eth0");
        assert_eq!(env(&[]).command().unwrap_err().code, code::INVALID_ENV);
        let bad = env(&[("CNI_CONTAINERID", "../etc"), ("CNI_IFNAME", "eth0")]);
        let err = bad.attachment().unwrap_err();
        assert!(err.msg.contains("CNI_CONTAINERID"), "{err:?}");
        assert_eq!(
            env(&[("CNI_COMMAND", "ADDX")]).command().unwrap_err().code,
            4
        );
    }

    #[test]
    fn cni_args() {
        let e = env(&[(
            "CNI_ARGS",
            "IgnoreUnknown=1;MAC=02:00:00:00:00:09;K8S_POD_NAME=x",
        )]);
        assert_eq!(e.arg("MAC").as_deref(), Some("02:00:00:00:00:09"));
        assert_eq!(e.arg("NOPE"), None);
    }
}
