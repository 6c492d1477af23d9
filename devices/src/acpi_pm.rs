//! The ACPI hardware-reduced sleep/reset port and PM timer, at the same ports
//! and with the same values as Cloud Hypervisor: writing 0x34 (SLP_TYP=5 for
//! S5, SLP_EN) to 0x600 powers off, writing 1 resets; 0x608 is the PM timer.

use std::time::Instant;

use crate::bus::BusDevice;
use crate::vm_event::{VmEvent, VmEventSender};

/// Sleep control (0x600, also the FADT reset register) and sleep status (0x601).
pub const ACPI_SLEEP_PORT: u64 = 0x600;
pub const ACPI_SLEEP_PORT_LEN: u64 = 8;
/// Value the FADT advertises for the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP for S5 as the DSDT's `_S5_` says, shifted into place, plus SLP_EN.
pub const ACPI_S5_SLEEP_VALUE: u8 = (5 << 2) | (1 << 5);

pub const ACPI_PM_TIMER_PORT: u64 = 0x608;
pub const ACPI_PM_TIMER_LEN: u64 = 4;
const PM_TIMER_HZ: u128 = 3_579_545;

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

/// A free-running 32-bit counter at 3.579545 MHz.
pub struct AcpiPmTimer {
    start: Instant,
}

impl Default for AcpiPmTimer {
    fn default() -> Self {
        AcpiPmTimer {
            start: Instant::now(),
        }
    }
}

impl BusDevice for AcpiPmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let ticks = (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u32;
        let bytes = ticks.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
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

    #[test]
    fn pm_timer_advances() {
        let mut t = AcpiPmTimer::default();
        let mut a = [0u8; 4];
        t.read(0, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut b = [0u8; 4];
        t.read(0, &mut b);
        assert!(u32::from_le_bytes(b) > u32::from_le_bytes(a));
    }
}
