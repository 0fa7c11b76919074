//! IPAM delegation: runs the plugin named by `ipam.type` from `CNI_PATH` with our environment
//! (`CNI_COMMAND` set per call) and the whole network configuration on stdin, as the spec says.
//!
//! Older IPAM plugins (Debian's host-local speaks up to 1.0.0) refuse a 1.1.0 configuration;
//! 1.1.0 changed nothing an IPAM plugin returns, so ADD/DEL/CHECK hand them the configuration
//! with `cniVersion` "1.0.0" and read the answer as ours. STATUS and GC exist only in 1.1.0 and
//! are forwarded only to plugins whose VERSION answer lists it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::error::{code, CniError};
use super::result::CniResult;
use super::version::CniVersion;

/// Failures of the delegated plugin.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// No executable of that name in `CNI_PATH`.
    #[error("IPAM plugin {plugin:?} not found in CNI_PATH ({path})")]
    NotFound {
        /// Plugin name.
        plugin: String,
        /// The search path.
        path: String,
    },
    /// It could not be run.
    #[error("cannot run IPAM plugin {plugin}: {source}")]
    Spawn {
        /// Plugin path.
        plugin: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// It answered with a CNI error.
    #[error("IPAM plugin {plugin} {command} failed: {msg}")]
    Failed {
        /// Plugin name.
        plugin: String,
        /// Command.
        command: String,
        /// Its error code, if it printed one.
        code: Option<u32>,
        /// Its message.
        msg: String,
        /// Its details and stderr.
        details: String,
    },
    /// Its answer could not be read.
    #[error("IPAM plugin {plugin} {command} printed an unreadable result: {why}")]
    BadOutput {
        /// Plugin name.
        plugin: String,
        /// Command.
        command: String,
        /// What was wrong.
        why: String,
    },
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> CniError {
        let msg = e.to_string();
        match e {
            IpamError::Failed {
                code: c, details, ..
            } => CniError::new(c.unwrap_or(code::IPAM), msg).with_details(details),
            _ => CniError::new(code::IPAM, msg),
        }
    }
}

/// A resolved IPAM plugin.
#[derive(Clone, Debug)]
pub struct Delegate {
    name: String,
    path: PathBuf,
}

/// The configuration the IPAM plugin gets for `asked`: the runtime's, with `cniVersion`
/// lowered to 1.0.0 when 1.1.0 was asked.
pub fn delegate_config(conf: &Value, asked: CniVersion) -> Value {
    let mut v = conf.clone();
    if asked == CniVersion::V1_1_0 {
        v["cniVersion"] = Value::from(CniVersion::V1_0_0.as_str());
    }
    v
}

impl Delegate {
    /// Finds `name` in `dirs`.
    pub fn find(name: &str, dirs: &[PathBuf]) -> Result<Delegate, IpamError> {
        dirs.iter()
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
            .map(|path| Delegate {
                name: name.to_string(),
                path,
            })
            .ok_or_else(|| IpamError::NotFound {
                plugin: name.to_string(),
                path: std::env::join_paths(dirs)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            })
    }

    /// Runs the plugin with `command`; `env` overrides (`None` removes a variable). Returns
    /// stdout on success.
    pub fn exec(
        &self,
        command: &str,
        config: &Value,
        env: &[(&str, Option<&str>)],
    ) -> Result<Vec<u8>, IpamError> {
        let mut cmd = Command::new(&self.path);
        cmd.env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let spawn_err = |source| IpamError::Spawn {
            plugin: self.path.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let input = serde_json::to_vec(config).unwrap_or_default();
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that exits without reading (VERSION) closes the pipe: not an error.
            let _ = stdin.write_all(&input);
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() {
            if !stderr.is_empty() {
                tracing::debug!(plugin = %self.name, %command, %stderr, "IPAM stderr");
            }
            return Ok(out.stdout);
        }
        let err: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        let code = err
            .as_ref()
            .and_then(|e| e.get("code"))
            .and_then(Value::as_u64)
            .and_then(|c| u32::try_from(c).ok());
        let field = |k: &str| {
            err.as_ref()
                .and_then(|e| e.get(k))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let mut msg = field("msg");
        if msg.is_empty() {
            msg = format!("exited with {}", out.status);
        }
        let details = [field("details"), stderr]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Err(IpamError::Failed {
            plugin: self.name.clone(),
            command: command.to_string(),
            code,
            msg,
            details,
        })
    }

    /// ADD: allocates addresses.
    pub fn add(&self, config: &Value) -> Result<CniResult, IpamError> {
        let out = self.exec("ADD", config, &[])?;
        let v: Value = serde_json::from_slice(&out).map_err(|e| self.bad("ADD", e))?;
        CniResult::parse(&v).map_err(|e| self.bad("ADD", e))
    }

    /// DEL: releases them (idempotent in well-behaved plugins).
    pub fn del(&self, config: &Value, env: &[(&str, Option<&str>)]) -> Result<(), IpamError> {
        self.exec("DEL", config, env).map(drop)
    }

    /// CHECK.
    pub fn check(&self, config: &Value) -> Result<(), IpamError> {
        self.exec("CHECK", config, &[]).map(drop)
    }

    /// Whether the plugin's VERSION answer lists `v`.
    pub fn supports(&self, v: CniVersion) -> bool {
        let probe = serde_json::json!({ "cniVersion": v.as_str() });
        self.exec("VERSION", &probe, &[])
            .ok()
            .and_then(|out| serde_json::from_slice::<Value>(&out).ok())
            .and_then(|a| {
                a.get("supportedVersions")?
                    .as_array()
                    .map(|l| l.iter().any(|s| s.as_str() == Some(v.as_str())))
            })
            .unwrap_or(false)
    }

    fn bad(&self, command: &str, e: impl std::fmt::Display) -> IpamError {
        IpamError::BadOutput {
            plugin: self.name.clone(),
            command: command.into(),
            why: e.to_string(),
        }
    }
}

/// True for a regular file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lowers_only_1_1_0() {
        let c = json!({"cniVersion": "1.1.0", "ipam": {"type": "host-local"}});
        assert_eq!(
            delegate_config(&c, CniVersion::V1_1_0)["cniVersion"],
            "1.0.0"
        );
        let c = json!({"cniVersion": "0.4.0"});
        assert_eq!(
            delegate_config(&c, CniVersion::V0_4_0)["cniVersion"],
            "0.4.0"
        );
    }

    #[test]
    fn missing_plugin() {
        let e = Delegate::find("no-such-ipam", &[PathBuf::from("/nonexistent")]).unwrap_err();
        assert!(matches!(e, IpamError::NotFound { .. }));
        assert_eq!(CniError::from(e).code, code::IPAM);
    }
}
