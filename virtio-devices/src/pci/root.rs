//! PCI bus 0: slot 0 is the host bridge, devices fill the other slots.
//! Configuration space is reached through the legacy 0xCF8/0xCFC port pair
//! and the memory-mapped ECAM window. When a guest (re)programs a BAR with
//! memory decoding on, the root moves the device on the MMIO bus.

use std::sync::{Arc, Mutex, Weak};

use devices::bus::lock;
use devices::{Bus, BusDevice, BusError};

use super::{Bar, PciConfiguration, PciDevice, PciIdentity};
use crate::log_budget::LogBudget;

pub const PCI_CONFIG_ADDRESS_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_PORTS_LEN: u64 = 8;
/// ECAM size for bus 0: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS0_SIZE: u64 = 1 << 20;
const SLOTS: usize = 32;
const CONFIG_ENABLE: u32 = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum PciRootError {
    #[error("no free PCI slot on bus 0")]
    NoSlot,
    #[error("the MMIO bus is gone")]
    NoBus,
    #[error("cannot map BAR {index} of PCI device {slot:02x}.0 at {addr:#x}: {source}")]
    MapBar {
        slot: usize,
        index: usize,
        addr: u64,
        source: BusError,
    },
}

/// A device in a slot: its config side and its BAR side (the same object).
struct Slot {
    config: Arc<Mutex<dyn PciDevice>>,
    bars: Arc<Mutex<dyn BusDevice>>,
    /// BARs as currently mapped on the MMIO bus.
    mapped: Vec<Bar>,
}

/// The host bridge at 00:00.0: identity only.
struct HostBridge(PciConfiguration);

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.0.read(reg)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.0.write(reg, offset, data);
    }
    fn bars(&self) -> (bool, Vec<Bar>) {
        (false, Vec::new())
    }
}

impl BusDevice for HostBridge {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    /// Weak: the MMIO bus holds the root (its ECAM window), and a strong
    /// reference back would keep the whole VM's devices alive forever.
    mmio: Weak<Bus>,
    /// The 0xCF8 address register.
    config_address: u32,
    warnings: LogBudget,
}

impl PciRoot {
    pub fn new(mmio: &Arc<Bus>) -> Self {
        let bridge = Arc::new(Mutex::new(HostBridge(PciConfiguration::new(PciIdentity {
            vendor: 0x8086,
            device: 0x0d57,
            revision: 0,
            class: 0x06,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        }))));
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            config: bridge.clone(),
            bars: bridge,
            mapped: Vec::new(),
        });
        PciRoot {
            slots,
            mmio: Arc::downgrade(mmio),
            config_address: 0,
            warnings: LogBudget::default(),
        }
    }

    /// Puts `device` in the next free slot and maps its BARs; returns the slot.
    pub fn add<T: PciDevice + BusDevice + 'static>(
        &mut self,
        device: Arc<Mutex<T>>,
    ) -> Result<usize, PciRootError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciRootError::NoSlot)?;
        let (_, bars) = lock(&device).bars();
        let mmio = self.mmio.upgrade().ok_or(PciRootError::NoBus)?;
        for bar in &bars {
            mmio.insert(device.clone(), bar.addr, bar.size)
                .map_err(|source| PciRootError::MapBar {
                    slot,
                    index: bar.index,
                    addr: bar.addr,
                    source,
                })?;
        }
        self.slots[slot] = Some(Slot {
            config: device.clone(),
            bars: device,
            mapped: bars,
        });
        Ok(slot)
    }

    fn config_read(&mut self, slot: usize, function: usize, reg: usize) -> u32 {
        match self.slots.get(slot) {
            Some(Some(s)) if function == 0 => lock(&s.config).config_read(reg),
            _ => 0xffff_ffff,
        }
    }

    fn config_write(
        &mut self,
        slot: usize,
        function: usize,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        if function != 0 {
            return;
        }
        let (enabled, bars) = {
            let mut dev = lock(&s.config);
            dev.config_write(reg, offset, data);
            dev.bars()
        };
        let Some(mmio) = self.mmio.upgrade().filter(|_| enabled) else {
            return;
        };
        // Move any BAR the guest reprogrammed while decoding is on.
        for (mapped, new) in s.mapped.iter_mut().zip(bars) {
            if *mapped == new {
                continue;
            }
            if new.addr == 0 || new.addr.checked_add(new.size).is_none() {
                continue;
            }
            let _ = mmio.remove(mapped.addr);
            match mmio.insert(s.bars.clone(), new.addr, new.size) {
                Ok(()) => {
                    log::info!(
                        "PCI {slot:02x}.0: BAR {} moved {:#x} -> {:#x}",
                        new.index,
                        mapped.addr,
                        new.addr
                    );
                    lock(&s.config).bar_moved(*mapped, new);
                    *mapped = new;
                }
                Err(e) => {
                    log::log!(
                        self.warnings.level(),
                        "PCI {slot:02x}.0: cannot move BAR {} to {:#x}: {e}",
                        new.index,
                        new.addr
                    );
                    // Keep it where it was.
                    let _ = mmio.insert(s.bars.clone(), mapped.addr, mapped.size);
                }
            }
        }
    }
}

/// Splits an ECAM offset into (bus, slot, function, byte offset in space).
fn ecam_decode(offset: u64) -> (u64, usize, usize, usize) {
    (
        offset >> 20,
        ((offset >> 15) & 0x1f) as usize,
        ((offset >> 12) & 0x7) as usize,
        (offset & 0xfff) as usize,
    )
}

fn extract(value: u32, offset: usize, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = (value >> (((offset + i) % 4) * 8)) as u8;
    }
}

/// The root on the port bus: 0xCF8 address, 0xCFC-0xCFF data.
pub struct PciConfigIo(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut root = lock(&self.0);
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&root.config_address.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        let addr = root.config_address;
        let in_reg = (offset - 4) as usize;
        if addr & CONFIG_ENABLE == 0 || (addr >> 16) & 0xff != 0 || in_reg + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        let (slot, function, reg) = (
            ((addr >> 11) & 0x1f) as usize,
            ((addr >> 8) & 0x7) as usize,
            ((addr & 0xfc) >> 2) as usize,
        );
        let value = root.config_read(slot, function, reg);
        extract(value, in_reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut root = lock(&self.0);
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                root.config_address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            return;
        }
        let addr = root.config_address;
        let in_reg = (offset - 4) as usize;
        if addr & CONFIG_ENABLE == 0 || (addr >> 16) & 0xff != 0 || in_reg + data.len() > 4 {
            return;
        }
        let (slot, function, reg) = (
            ((addr >> 11) & 0x1f) as usize,
            ((addr >> 8) & 0x7) as usize,
            ((addr & 0xfc) >> 2) as usize,
        );
        root.config_write(slot, function, reg, in_reg, data);
    }
}

/// The root on the MMIO bus: the ECAM window for bus 0.
pub struct PciConfigMmio(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, function, at) = ecam_decode(offset);
        if bus != 0 || at % 4 + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        let value = lock(&self.0).config_read(slot, function, at / 4);
        extract(value, at % 4, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, slot, function, at) = ecam_decode(offset);
        if bus != 0 || at % 4 + data.len() > 4 {
            return;
        }
        lock(&self.0).config_write(slot, function, at / 4, at % 4, data);
    }
}
