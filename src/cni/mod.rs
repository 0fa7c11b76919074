//! `vhost-pump-cni`: a CNI plugin (spec 1.1.0; also 0.3.x, 0.4.0, 1.0.0) that gives a Kata
//! sandbox (or any VMM) a vhost-user network device served by vhost-pump, on the paths Kata's
//! runtimes really consume (`"kata"`, see [`config::KataRuntime`]):
//! - runtime-go + QEMU: a dummy link in the pod netns carrying the guest's MAC, addresses,
//!   routes and MTU, and vhost-pump listening on `/tmp/vhostuser_<IP>/vhu.sock`;
//! - runtime-rs + Dragonball: a "Directly Attachable Network" file entry, vhost-pump dialling
//!   the socket Dragonball listens on;
//! - none: just the socket, reported in the result.
//!
//! ADD delegates addresses to the IPAM plugin, makes the host port (a persistent tap on a
//! bridge, or a macvlan for AF_PACKET), starts the backend (a supervised per-attachment
//! vhost-pump, or a port on the node-wide daemon), then what Kata needs. DEL, CHECK, STATUS and
//! GC work from per-attachment state kept under `socketDir`.
//!
//! Files: [`env`] and [`config`] read the invocation, [`ops`] runs the commands over
//! [`ipam`], [`hostport`], [`podlink`] (both over [`rtnl`]), [`sidecar`], [`nodedaemon`] and
//! [`dan`], keeping [`state`]; [`sockstate`] reads socket liveness; [`result`] and [`error`] are the answers.

pub mod config;
pub mod dan;
pub mod env;
pub mod error;
pub mod hostport;
pub mod ipam;
pub mod lock;
pub mod nodedaemon;
pub mod ops;
pub mod podlink;
pub mod result;
pub mod rtnl;
pub mod sidecar;
pub mod sockstate;
pub mod state;
pub mod version;

use serde_json::Value;

use self::config::{version_of, NetConf};
use self::env::{CniEnv, Command};
use self::error::{code, CniError};
use self::version::CniVersion;

/// What the plugin prints and how it exits.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// JSON for stdout, if any.
    pub stdout: Option<Value>,
    /// Exit successfully?
    pub success: bool,
}

/// Runs one CNI invocation: `env` and the bytes read from stdin.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Outcome {
    let mut version = CniVersion::LATEST;
    match dispatch(env, stdin, &mut version) {
        Ok(out) => Outcome {
            stdout: out,
            success: true,
        },
        Err(e) => Outcome {
            stdout: Some(e.to_json(version)),
            success: false,
        },
    }
}

fn dispatch(
    env: &CniEnv,
    stdin: &[u8],
    version: &mut CniVersion,
) -> Result<Option<Value>, CniError> {
    let command = env.command()?;
    if command == Command::Version {
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| CniVersion::parse(v.get("cniVersion")?.as_str()?));
        return Ok(Some(CniVersion::version_answer(asked)));
    }
    // The environment first: its errors name the variable, whatever stdin holds.
    match command {
        Command::Add | Command::Check => {
            env.attachment()?;
            env.require_netns()?;
            env.cni_path()?;
        }
        Command::Del => {
            env.attachment()?;
            env.cni_path()?;
        }
        Command::Gc | Command::Status => {
            env.cni_path()?;
        }
        Command::Version => {}
    }
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            format!("cannot decode the network configuration on stdin as JSON: {e}"),
        )
    })?;
    if let Ok(v) = version_of(&value) {
        *version = v;
    }
    let conf = NetConf::from_value(value)?;
    match command {
        Command::Add => ops::add(env, &conf).map(Some),
        Command::Del => ops::del(env, &conf).map(|()| None),
        Command::Check => ops::check(env, &conf).map(|()| None),
        Command::Status => ops::status(env, &conf).map(|()| None),
        Command::Gc => ops::gc(env, &conf).map(|()| None),
        Command::Version => unreachable!("answered above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> CniEnv {
        CniEnv::from_vars(vars.iter().map(|(k, v)| (k.into(), v.into())))
    }

    #[test]
    fn version_and_early_errors() {
        let out = run(
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.4.0"}"#,
        );
        assert!(out.success);
        assert_eq!(out.stdout.unwrap()["cniVersion"], "0.4.0");

        let out = run(&env(&[]), b"{}");
        assert!(!out.success);
        assert_eq!(out.stdout.unwrap()["code"], code::INVALID_ENV);

        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_PATH", "/nonexistent"),
        ];
        let out = run(&env(&add), b"not json");
        assert_eq!(out.stdout.unwrap()["code"], code::DECODE);
        let out = run(
            &env(&add),
            br#"{"cniVersion":"0.1.0","name":"n","type":"t"}"#,
        );
        let v = out.stdout.unwrap();
        assert_eq!(v["code"], code::INCOMPATIBLE_VERSION);
        assert_eq!(v["cniVersion"], "1.1.0");
    }
}
