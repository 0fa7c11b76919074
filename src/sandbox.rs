//! Least privilege after setup: capabilities dropped and a seccomp filter for the threads that
//! handle untrusted input (port threads and their vring workers).
//!
//! Placeholder until the filter lands: nothing is restricted yet.

/// Errors restricting the process.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SandboxError(String);

/// Drops what the process no longer needs. `keep_admin`: a control socket can still add ports.
pub fn restrict_process(_keep_admin: bool) -> Result<(), SandboxError> {
    Ok(())
}
