//! kite's PCI bus and virtio devices. Guests see virtio 1.x devices over PCI
//! (as on Cloud Hypervisor): each queue has its own MSI-X vector, delivered
//! with irqfd, and guest notifications arrive on ioeventfds, so the data path
//! runs on device threads without exits to the VMM's vCPU loop.

pub mod block;
pub mod console;
pub mod device;
mod log_budget;
pub mod net;
pub mod pci;
pub mod rng;
#[cfg(test)]
mod test_util;
pub mod transport;
pub mod worker;

pub use device::{ActivateError, QueueInterrupt, VirtioDevice};

/// Guest memory as the VMM maps it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
