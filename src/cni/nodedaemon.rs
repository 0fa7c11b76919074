//! Node-daemon mode (`"daemon": {"control": PATH}`): the attachment's port lives in a node-wide
//! `vhost-pump` (run by the DaemonSet with `--control` and `--metrics`) instead of in a sidecar
//! of its own, so one process and one metrics endpoint serve every pod on the node. The plugin
//! talks to it over the daemon's control socket: `add` when the attachment is made (it returns
//! once the port is listening or dialling), `remove` on DEL, `stats` for CHECK.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{code, CniError};
use crate::config::PortSpec;
use crate::control::{self, Request, Response};
use crate::ports::PortStats;

/// The node daemon's name for the port of the attachment with `key`.
pub fn port_name(key: &str) -> String {
    format!("cni-{key}")
}

/// Node-daemon failures.
#[derive(Debug, thiserror::Error)]
pub enum NodeDaemonError {
    /// The control socket could not be used.
    #[error("cannot reach the node daemon at {path}: {source} (is the vhost-pump DaemonSet running with --control {path}?)")]
    Unreachable {
        /// Control socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The daemon refused the request.
    #[error("the node daemon at {path} refused to {what} port {port}: {error}")]
    Refused {
        /// Control socket.
        path: PathBuf,
        /// Operation.
        what: &'static str,
        /// Port name.
        port: String,
        /// The daemon's message.
        error: String,
    },
}

impl From<NodeDaemonError> for CniError {
    fn from(e: NodeDaemonError) -> CniError {
        CniError::new(code::SIDECAR, e.to_string())
    }
}

fn ask(control: &Path, req: &Request, timeout: Duration) -> Result<Response, NodeDaemonError> {
    control::request_within(control, req, Some(timeout)).map_err(|source| {
        NodeDaemonError::Unreachable {
            path: control.into(),
            source,
        }
    })
}

/// Adds `spec` to the node daemon; returns once the port serves its socket.
pub fn add(control: &Path, spec: PortSpec, timeout: Duration) -> Result<(), NodeDaemonError> {
    let port = spec.name.clone();
    let r = ask(control, &Request::Add { port: spec }, timeout)?;
    if r.ok {
        Ok(())
    } else {
        Err(NodeDaemonError::Refused {
            path: control.into(),
            what: "add",
            port,
            error: r.error.unwrap_or_default(),
        })
    }
}

/// Makes sure the node daemon runs switch `name`, creating it (with `uplink_tap` as its
/// uplink) if it does not; losing a race with a concurrent ADD that created it is fine.
pub fn ensure_switch(
    control: &Path,
    name: &str,
    uplink_tap: Option<&str>,
    timeout: Duration,
) -> Result<(), NodeDaemonError> {
    let listed = ask(control, &Request::ListSwitches, timeout)?;
    if listed
        .switches
        .as_ref()
        .is_some_and(|s| s.iter().any(|s| s.name == name))
    {
        return Ok(());
    }
    let switch = crate::switch::SwitchSpec {
        uplinks: uplink_tap
            .map(|t| crate::switch::UplinkSpec {
                kind: crate::switch::UplinkKind::Tap,
                name: t.into(),
                vlan: None,
                trunk: Vec::new(),
            })
            .into_iter()
            .collect(),
        ..crate::switch::SwitchSpec::named(name)
    };
    let r = ask(control, &Request::AddSwitch { switch }, timeout)?;
    let raced = r
        .error
        .as_deref()
        .is_some_and(|e| e.contains("already exists"));
    if r.ok || raced {
        Ok(())
    } else {
        Err(NodeDaemonError::Refused {
            path: control.into(),
            what: "add-switch",
            port: name.into(),
            error: r.error.unwrap_or_default(),
        })
    }
}

/// The port's counters and state; `None` when the daemon has no such port.
pub fn stats(
    control: &Path,
    name: &str,
    timeout: Duration,
) -> Result<Option<PortStats>, NodeDaemonError> {
    if !has_port(control, name, timeout)? {
        return Ok(None);
    }
    let r = ask(
        control,
        &Request::Stats {
            name: Some(name.into()),
        },
        timeout,
    )?;
    Ok(r.stats.and_then(|s| s.into_iter().next()))
}

fn has_port(control: &Path, name: &str, timeout: Duration) -> Result<bool, NodeDaemonError> {
    let r = ask(control, &Request::List, timeout)?;
    Ok(r.ports.unwrap_or_default().iter().any(|p| p.name == name))
}

/// Removes the port. A port (or a daemon) that is already gone is fine: a daemon that is not
/// running serves no port, and one restarted since lost its ports.
pub fn remove(control: &Path, name: &str, timeout: Duration) -> Result<(), NodeDaemonError> {
    let gone = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        )
    };
    let r = match control::request_within(
        control,
        &Request::Remove { name: name.into() },
        Some(timeout),
    ) {
        Ok(r) => r,
        Err(e) if gone(&e) => {
            tracing::warn!(control = %control.display(), error = %e, "node daemon not running; its port {name} is gone with it");
            return Ok(());
        }
        Err(source) => {
            return Err(NodeDaemonError::Unreachable {
                path: control.into(),
                source,
            })
        }
    };
    if r.ok || !has_port(control, name, timeout)? {
        return Ok(());
    }
    Err(NodeDaemonError::Refused {
        path: control.into(),
        what: "remove",
        port: name.into(),
        error: r.error.unwrap_or_default(),
    })
}
