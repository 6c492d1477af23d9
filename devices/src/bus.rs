//! An address bus (port I/O or MMIO) mapping ranges to devices. It is built
//! before the vCPUs start and then only read, so lookups take no lock on the bus.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {base:#x} has zero length")]
    Empty { base: u64 },
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, r)| b + r.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Range)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((addr - base, range))
    }

    /// Dispatches a read; returns false when no device is at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, range)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device is at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, range)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if a previous holder panicked: device state stays usable
/// and one bad access must not take the whole VMM down.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 8).unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), 0x104, 8),
            Err(BusError::Overlap { base: 0x104, len: 8 })
        );
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), 0xfc, 8),
            Err(BusError::Overlap { base: 0xfc, len: 8 })
        );
        bus.insert(Arc::new(Mutex::new(Echo(0))), 0x108, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 12);
        assert!(bus.write(0x100, &[40]));
        assert!(bus.read(0x107, &mut b));
        assert_eq!(b[0], 47);
        assert!(!bus.read(0xff, &mut b));
        assert!(!bus.read(0x110, &mut b));
    }
}
