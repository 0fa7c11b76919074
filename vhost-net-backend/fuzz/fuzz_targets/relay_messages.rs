//! Arbitrary bytes (and a few memfds) from a vhost-user frontend through the message relay.
//! The input format is described in `vhost_net_backend_fuzz::relay`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_net_backend_fuzz::relay::run(data);
});
