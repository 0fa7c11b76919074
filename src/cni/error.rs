//! The CNI error result: a code from the spec's table (or ours, 100 and up), a message a person
//! can act on, and details. Every module's own error converts into it with the right code.

use serde_json::json;

use super::version::CniVersion;

/// Error codes of CNI spec 1.1.0 §"Error" and this plugin's own (100 and up).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field (or field value) in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid or missing environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content (stdin is not JSON).
    pub const DECODE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (a lock is held by another invocation).
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// A delegated IPAM plugin failed without a usable error of its own.
    pub const IPAM: u32 = 100;
    /// The host port (tap, bridge, macvlan) could not be set up.
    pub const HOST_PORT: u32 = 101;
    /// The vhost-pump sidecar could not be started or did not become ready.
    pub const SIDECAR: u32 = 102;
    /// The Kata DAN file could not be written.
    pub const DAN: u32 = 103;
    /// ADD for an attachment that already exists.
    pub const ALREADY_EXISTS: u32 = 104;
    /// CHECK found the attachment unhealthy.
    pub const CHECK_FAILED: u32 = 105;
    /// The link in the pod's network namespace (Kata runtime-go) could not be made.
    pub const POD_LINK: u32 = 106;
}

/// A CNI error result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// Spec or plugin error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation (may be empty).
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg`, no details.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Prefixes the message with context.
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }

    /// The error JSON printed on stdout.
    pub fn to_json(&self, version: CniVersion) -> serde_json::Value {
        let mut v = json!({
            "cniVersion": version.as_str(),
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

/// Shorthand for an I/O failure on a path.
pub(crate) fn io_error(what: &str, path: &std::path::Path, e: std::io::Error) -> CniError {
    CniError::new(code::IO, format!("{what} {}: {e}", path.display()))
}
