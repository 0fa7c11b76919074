//! The control socket: add, remove, list and inspect ports of a running daemon.
//!
//! Protocol: one JSON request per line, one JSON response per line, e.g.
//! `{"op":"stats","name":"vm0"}` → `{"ok":true,"stats":[...]}` or `{"ok":false,"error":"..."}`.
//! The server runs on a small tokio runtime of its own (control plane only); port start/stop
//! run on its blocking pool so a slow operation never stalls other clients.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};

use crate::config::PortSpec;
use crate::endpoint::{self, Limits, Slot};
use crate::ports::{PortRegistry, PortStats};
use crate::switch::{FdbView, SwitchSpec};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// Most control connections open at once.
pub const MAX_CONNS: usize = 16;
/// How long a client has to send each request (an idle connection is closed after this).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take each response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

const LIMITS: Limits = Limits {
    max_conns: MAX_CONNS,
    read_timeout: READ_TIMEOUT,
    write_timeout: WRITE_TIMEOUT,
};

/// Sent to a connection turned away because every connection is busy.
const REFUSAL: &[u8] = b"{\"ok\":false,\"error\":\"too many control connections; try again\"}\n";

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Start a new port.
    Add {
        /// Its specification.
        port: PortSpec,
    },
    /// Stop and remove a port.
    Remove {
        /// Port name.
        name: String,
    },
    /// List the ports.
    List,
    /// Counters of one port, or all.
    Stats {
        /// Port name; all ports when absent.
        #[serde(default)]
        name: Option<String>,
    },
    /// Start a switch.
    AddSwitch {
        /// Its specification.
        switch: SwitchSpec,
    },
    /// Stop a switch no port uses.
    RemoveSwitch {
        /// Switch name.
        name: String,
    },
    /// List the switches.
    ListSwitches,
    /// A switch's forwarding table.
    Fdb {
        /// Switch name.
        name: String,
    },
}

/// A control response.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    /// The request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Ports, for `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
    /// Counters, for `stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Vec<PortStats>>,
    /// Switches, for `list-switches`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switches: Option<Vec<SwitchSpec>>,
    /// A forwarding table, for `fdb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fdb: Option<Vec<FdbView>>,
}

impl Response {
    fn error(e: impl std::fmt::Display) -> Self {
        Response {
            error: Some(e.to_string()),
            ..Default::default()
        }
    }

    fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }
}

/// Carries out one request against the registry.
pub fn handle(registry: &PortRegistry, req: Request) -> Response {
    match req {
        Request::Add { port } => match registry.add_remembered(port) {
            Ok(()) => Response::ok(),
            Err(e) => Response::error(e),
        },
        Request::Remove { name } => match registry.remove(&name) {
            Ok(()) => Response::ok(),
            Err(e) => Response::error(e),
        },
        Request::List => Response {
            ports: Some(registry.list()),
            ..Response::ok()
        },
        Request::Stats { name } => match registry.stats(name.as_deref()) {
            Ok(s) => Response {
                stats: Some(s),
                ..Response::ok()
            },
            Err(e) => Response::error(e),
        },
        Request::AddSwitch { switch } => match registry.add_switch(switch) {
            Ok(()) => Response::ok(),
            Err(e) => Response::error(e),
        },
        Request::RemoveSwitch { name } => match registry.remove_switch(&name) {
            Ok(()) => Response::ok(),
            Err(e) => Response::error(e),
        },
        Request::ListSwitches => Response {
            switches: Some(registry.switches().specs()),
            ..Response::ok()
        },
        Request::Fdb { name } => match registry.switches().get(&name) {
            Ok(sw) => Response {
                fdb: Some(sw.fdb()),
                ..Response::ok()
            },
            Err(e) => Response::error(e),
        },
    }
}

/// Binds the control socket (mode 0600) and serves it from a background thread, within
/// [`MAX_CONNS`] connections and the [`READ_TIMEOUT`] / [`WRITE_TIMEOUT`] a client gets (see
/// [`crate::endpoint`]).
pub fn spawn(path: &Path, registry: Arc<PortRegistry>) -> Result<(), crate::server::ServerError> {
    use std::os::unix::fs::PermissionsExt;
    let listener = crate::server::bind(path)?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    listener
        .set_nonblocking(true)
        .map_err(|e| crate::server::ServerError::Io {
            what: "cannot configure",
            path: path.into(),
            source: e,
        })?;
    let path: PathBuf = path.into();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "control socket runtime failed");
                    return;
                }
            };
            rt.block_on(serve(listener, registry));
            let _ = std::fs::remove_file(path);
        })
        .map_err(|source| crate::server::ServerError::Thread {
            name: "control".into(),
            source,
        })?;
    Ok(())
}

async fn serve(listener: std::os::unix::net::UnixListener, registry: Arc<PortRegistry>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "control socket unusable");
            return;
        }
    };
    let handler = move |stream, slot| session(stream, slot, registry.clone());
    endpoint::serve("control", listener, LIMITS, REFUSAL, handler).await;
}

/// Serves one control connection: requests one per line, each answered before the next is read.
async fn session(stream: tokio::net::UnixStream, slot: Slot, registry: Arc<PortRegistry>) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = AsyncBufReader::new(rd.take(MAX_REQUEST as u64 * 16)).lines();
    loop {
        slot.waiting();
        let line = match tokio::time::timeout(slot.limits().read_timeout, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                slot.trouble("cannot read the request", Some(&e));
                break;
            }
            Err(_) => {
                slot.trouble("no request within the read timeout", None);
                break;
            }
        };
        slot.answering();
        let resp = if line.len() > MAX_REQUEST {
            Response::error(format!("request longer than {MAX_REQUEST} bytes"))
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    let r = registry.clone();
                    tokio::task::spawn_blocking(move || handle(&r, req))
                        .await
                        .unwrap_or_else(Response::error)
                }
                Err(e) => Response::error(format!("bad request: {e}")),
            }
        };
        if let Some(e) = resp
            .error
            .as_deref()
            .filter(|e| e.starts_with("bad request"))
        {
            slot.trouble("bad request", Some(&e));
        }
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        match tokio::time::timeout(slot.limits().write_timeout, wr.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                slot.trouble("cannot send the response", Some(&e));
                break;
            }
            Err(_) => {
                slot.trouble("response not taken within the write timeout", None);
                break;
            }
        }
    }
}

/// Sends one request to a daemon's control socket and returns its response.
pub fn request(path: &Path, req: &Request) -> std::io::Result<Response> {
    request_within(path, req, None)
}

/// Like [`request`], but gives up when a read or write takes longer than `timeout`.
pub fn request_within(
    path: &Path,
    req: &Request,
    timeout: Option<std::time::Duration>,
) -> std::io::Result<Response> {
    let mut s = StdUnixStream::connect(path)?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(timeout)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reader = BufReader::new(s);
    let mut resp = String::new();
    reader.read_line(&mut resp)?;
    if resp.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without answering",
        ));
    }
    serde_json::from_str(&resp).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        let r: Request = serde_json::from_str(r#"{"op":"stats"}"#).unwrap();
        assert!(matches!(r, Request::Stats { name: None }));
        let r: Request = serde_json::from_str(r#"{"op":"remove","name":"vm0"}"#).unwrap();
        assert!(matches!(r, Request::Remove { name } if name == "vm0"));
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        let add = r#"{"op":"add","port":{"name":"a","socket":"/tmp/a.sock","host":{"kind":"tap","name":"t0"}}}"#;
        assert!(matches!(
            serde_json::from_str::<Request>(add).unwrap(),
            Request::Add { .. }
        ));
    }

    #[test]
    fn registry_errors_become_error_responses() {
        let reg = PortRegistry::default();
        let r = handle(
            &reg,
            Request::Remove {
                name: "nope".into(),
            },
        );
        assert!(!r.ok);
        assert!(r.error.unwrap().contains("nope"));
        let r = handle(&reg, Request::List);
        assert!(r.ok && r.ports.unwrap().is_empty());
        let r = handle(
            &reg,
            Request::Stats {
                name: Some("x".into()),
            },
        );
        assert!(!r.ok);
    }
}
