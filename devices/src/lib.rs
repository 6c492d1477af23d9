//! kite's legacy platform devices. Each device answers port or MMIO accesses
//! through [`bus::BusDevice`]; devices that end or restart the VM say so with a
//! [`vm_event::VmEvent`].

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod serial;
pub mod vm_event;

pub use bus::{Bus, BusDevice, BusError};
pub use vm_event::{VmEvent, VmEventSender};
