//! Just enough of the i8042 keyboard controller for the classic reset: a
//! guest writing 0xFE (pulse reset line) to the command port reboots the VM.

use crate::bus::BusDevice;
use crate::vm_event::{VmEvent, VmEventSender};

pub const I8042_DATA_PORT: u64 = 0x60;
pub const I8042_COMMAND_PORT: u64 = 0x64;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    events: VmEventSender,
}

impl I8042 {
    pub fn new(events: VmEventSender) -> Self {
        I8042 { events }
    }
}

/// Registered at 0x60 with length 5 so one device covers both ports; offset 4 is
/// the command/status port. Reads return 0: no keyboard data, buffers empty.
impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_PORT - I8042_DATA_PORT && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("guest reset through the i8042");
            self.events.send(VmEvent::Reset);
        }
    }
}
