//! An address bus (port I/O or MMIO) mapping ranges to devices. Lookups take
//! a read lock; the map only changes when devices are added or a guest moves
//! a PCI BAR.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

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
    #[error("no device at bus address {0:#x}")]
    NotFound(u64),
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Range>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        let overlaps_prev = ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, r)| b + r.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// Takes the device at `base` off the bus (a guest moving a BAR).
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        ranges
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NotFound(base))
    }

    /// The device covering `addr` and the offset into it.
    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        let (base, range) = ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then(|| (addr - base, range.device.clone()))
    }

    /// Dispatches a read; returns false when no device is at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(&device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device is at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(&device).write(offset, data);
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
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 8)
            .unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), 0x104, 8),
            Err(BusError::Overlap {
                base: 0x104,
                len: 8
            })
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
        bus.remove(0x108).unwrap();
        assert!(!bus.read(0x108, &mut b));
        assert_eq!(bus.remove(0x108), Err(BusError::NotFound(0x108)));
    }
}
