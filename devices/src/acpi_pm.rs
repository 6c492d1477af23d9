//! The ACPI hardware-reduced sleep/reset port, at the same port and with the
//! same values as Cloud Hypervisor: writing 0x34 (SLP_TYP=5 for S5, SLP_EN)
//! to 0x600 powers off, writing 1 resets. There is no PM timer: a
//! hardware-reduced platform has none (the FADT fields are to be ignored),
//! and guests keep time with kvm-clock and the TSC.

use crate::bus::BusDevice;
use crate::vm_event::{VmEvent, VmEventSender};

/// Sleep control (0x600, also the FADT reset register) and sleep status (0x601).
pub const ACPI_SLEEP_PORT: u64 = 0x600;
pub const ACPI_SLEEP_PORT_LEN: u64 = 8;
/// Value the FADT advertises for the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP for S5 as the DSDT's `_S5_` says, shifted into place, plus SLP_EN.
pub const ACPI_S5_SLEEP_VALUE: u8 = (5 << 2) | (1 << 5);

pub struct AcpiSleep {
    events: VmEventSender,
}

impl AcpiSleep {
    pub fn new(events: VmEventSender) -> Self {
        AcpiSleep { events }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        match data.first() {
            Some(&ACPI_RESET_VALUE) => {
                log::info!("guest reset through the ACPI reset register");
                self.events.send(VmEvent::Reset);
            }
            Some(&ACPI_S5_SLEEP_VALUE) => {
                log::info!("guest powered off (ACPI S5)");
                self.events.send(VmEvent::PowerOff);
            }
            other => log::debug!("ignored ACPI sleep control write {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn s5_and_reset_values_raise_events() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut dev = AcpiSleep::new(VmEventSender::new(tx, wake.clone()));
        dev.write(0, &[0x34]);
        dev.write(0, &[1]);
        dev.write(0, &[0x99]);
        dev.write(1, &[0x34]);
        assert_eq!(rx.try_recv(), Ok(VmEvent::PowerOff));
        assert_eq!(rx.try_recv(), Ok(VmEvent::Reset));
        assert!(rx.try_recv().is_err());
        assert_eq!(wake.read().unwrap(), 2);
    }
}
