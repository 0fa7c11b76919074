//! Descriptor chains over arbitrary guest memory, through the TX and RX paths of a queue pair.
//! The input format is described in `vhost_net_backend_fuzz::chains`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vhost_net_backend_fuzz::chains::run(data);
});
