//! Fuzz harnesses for vhost-pump, shared by the `cargo fuzz` targets (`fuzz_targets/`) and the
//! regression tests (`tests/regressions.rs`, which replay every file under `regressions/`).
//!
//! - [`chains`]: descriptor chains over arbitrary guest memory contents, through
//!   `chain::collect_chain` and both directions of a `QueuePairWorker` with an in-memory host
//!   queue. Guest memory sits between `PROT_NONE` guard pages, and every iovec the device hands
//!   out is checked to lie inside guest memory, so a stray access crashes the run.
//! - [`relay`]: arbitrary frontend bytes (plus memfds) through `vhost_net_backend::relay::run`.

pub mod chains;
pub mod relay;
