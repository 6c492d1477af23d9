//! COM1: a 16550A-compatible UART (vm-superio's 8250 model) on the port bus.
//! Its interrupt is an EventFd that the VMM registers as an irqfd.

use std::io::{self, Write};

use crate::bus::BusDevice;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial as Uart, Trigger};

/// COM1's base port and IRQ on a PC.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const COM1_PORT_LEN: u64 = 8;

/// Raises the UART's interrupt. The VMM injects it synchronously from the
/// thread that caused it (a vCPU writing THR, the host feeding input): the
/// guest's 8250 driver sends queued output from its transmit interrupt, and
/// an interrupt that arrives late loses the last lines before a power-off.
pub struct IrqTrigger(pub Box<dyn Fn() -> io::Result<()> + Send>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        (self.0)()
    }
}

/// Where the guest's serial output goes. Every byte is written through at
/// once: a console must show a prompt that has no newline yet.
pub type SerialOutput = Box<dyn Write + Send>;

pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, SerialOutput>,
}

impl Serial {
    pub fn new(irq: IrqTrigger, out: SerialOutput) -> Self {
        Serial {
            uart: Uart::new(irq, out),
        }
    }

    /// Feeds host input (e.g. from stdin) to the guest; returns how many bytes
    /// fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [b] = data {
            *b = self.uart.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b] = data {
            if let Err(e) = self.uart.write(offset as u8, *b) {
                log::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_receives_input() {
        let out = Capture::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let trigger_fd = irq.try_clone().unwrap();
        let trigger = IrqTrigger(Box::new(move || trigger_fd.write(1)));
        let mut s = Serial::new(trigger, Box::new(out.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");
        // Enable the receive interrupt, then input raises it and can be read back.
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        // Wider accesses are ignored, not a panic.
        s.write(0, &[1, 2]);
        let mut w = [0xffu8; 2];
        s.read(0, &mut w);
        assert_eq!(w, [0, 0]);
    }
}
