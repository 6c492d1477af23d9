//! PCI: configuration space, MSI-X, and the root complex (bus 0) that the
//! guest reaches through ports 0xCF8/0xCFC and the ECAM window.

pub mod configuration;
pub mod msix;
pub mod root;

pub use configuration::{Bar, PciConfiguration, PciIdentity};
pub use root::{PciRoot, PciRootError};

/// A function on the PCI bus: it answers configuration accesses. Its BARs are
/// served through `devices::BusDevice` on the MMIO bus.
pub trait PciDevice: Send {
    /// Dword `reg` of configuration space.
    fn config_read(&mut self, reg: usize) -> u32;
    /// A guest write at byte `offset` of dword `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
    /// The BARs as the guest has programmed them, with whether memory
    /// decoding is on: the root maps them on the MMIO bus accordingly.
    fn bars(&self) -> (bool, Vec<Bar>);
    /// A BAR moved from `old` to `new` (e.g. to re-register ioeventfds).
    fn bar_moved(&mut self, _old: Bar, _new: Bar) {}
}
