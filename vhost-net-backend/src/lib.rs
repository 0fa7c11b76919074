//! The virtio-net device of vhost-pump: a pure data path over `vhost-user-backend`.
//!
//! Frames move between a guest's virtqueues and a [`HostPort`] (a tap or an AF_PACKET socket,
//! implemented elsewhere) with one copy, done by the kernel in the host port's `readv`/`writev`.
//! Guest input is untrusted: every descriptor is checked through `vm-memory`, and bad input is
//! counted per reason in [`QueueStats`], never a panic.
//!
//! [`relay`] is the first parser of a frontend's vhost-user messages: it sits between the
//! frontend and the `vhost` crate's request handler, so it lives here with the device it
//! protects, testable and fuzzable without the daemon.

pub mod announce;
pub mod backend;
pub mod chain;
pub mod config;
pub mod dirty;
pub mod features;
mod log;
pub mod port;
pub mod relay;
pub mod rx;
pub mod security;
pub mod sigbus;
pub mod stats;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
mod tx;
pub mod used;
pub mod worker;

pub use backend::{Announced, BackendError, NetBackend};
pub use config::{MacAddr, NetConfig};
pub use features::{GuestOffloads, HostCapabilities};
pub use port::{HostPort, HostQueue, RxSourceFn, TxDrops, MAX_IOVECS};
pub use stats::{DropReason, QueueStats};
