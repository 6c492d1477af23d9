//! ACPI Generic Event Device: how a hardware-reduced ACPI platform tells the
//! guest about events such as the power button. The VMM sets a bit in the
//! device's register and raises its interrupt; the DSDT's `_EVT` method reads
//! the register and notifies the matching ACPI device.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Size of the GED's MMIO register window.
pub const GED_MMIO_LEN: u64 = 0x10;
/// Register bit for "power button pressed".
pub const GED_POWER_BUTTON: u32 = 1 << 3;

pub struct Ged {
    irq: EventFd,
    pending: u32,
}

impl Ged {
    pub fn new(irq: EventFd) -> Self {
        Ged { irq, pending: 0 }
    }

    /// Latches `event` and interrupts the guest.
    pub fn notify(&mut self, event: u32) -> std::io::Result<()> {
        self.pending |= event;
        self.irq.write(1)
    }
}

impl BusDevice for Ged {
    /// Reading the register returns the pending events and clears them.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.pending.to_le_bytes());
            self.pending = 0;
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_latches_until_read() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut g = Ged::new(irq.try_clone().unwrap());
        g.notify(GED_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut d = [0u8; 4];
        g.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), GED_POWER_BUTTON);
        g.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
    }
}
