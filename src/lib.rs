//! vhost-pump: a vhost-user virtio-net backend that serves a VM's network from a host tap or an
//! AF_PACKET socket on a host interface. The device data path lives in the `vhost-net-backend` crate; this
//! package holds the host ports, the vhost-user socket handling and the command line.

pub mod af_packet;
pub mod cli;
pub mod cni;
pub mod config;
pub mod control;
pub mod endpoint;
pub mod frame;
pub mod handoff;
pub mod metrics;
pub mod netdev;
pub mod ports;
pub mod ratelimit;
pub use vhost_net_backend::relay;
pub mod sandbox;
pub mod server;
pub mod switch;
pub mod tap;
