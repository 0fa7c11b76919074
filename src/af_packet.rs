//! The AF_PACKET host port: attaches a guest to an existing host interface (veth, macvlan, NIC).
//!
//! Placeholder: the ring-based implementation lands with the AF_PACKET issue.

use std::io;

use vhost_net_backend::{GuestOffloads, HostCapabilities, HostPort, HostQueue};

/// Errors opening an AF_PACKET port.
#[derive(Debug, thiserror::Error)]
pub enum AfPacketError {
    /// Not available yet.
    #[error("--af-packet is not implemented yet")]
    Unsupported,
}

/// An AF_PACKET port on one interface.
pub struct AfPacketPort {
    mtu: u16,
}

impl AfPacketPort {
    /// Opens `queues` AF_PACKET sockets on `ifname`.
    pub fn open(_ifname: &str, _queues: usize, _mtu: Option<u16>) -> Result<Self, AfPacketError> {
        Err(AfPacketError::Unsupported)
    }

    /// The MTU used for the guest.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }
}

impl HostPort for AfPacketPort {
    fn capabilities(&self) -> HostCapabilities {
        HostCapabilities::default()
    }

    fn configure(&self, _vnet_hdr_len: usize, _offloads: GuestOffloads) -> io::Result<()> {
        Ok(())
    }

    fn take_queue(&self, _pair: usize) -> io::Result<Box<dyn HostQueue>> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}
