//! Virtio transports. Only PCI for now.

pub mod pci;

pub use pci::{IoEventRegistrar, VirtioPciDevice};
