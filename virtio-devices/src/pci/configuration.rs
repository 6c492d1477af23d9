//! A type-0 PCI configuration space: identity registers, the command
//! register, 64-bit memory BARs (with the sizing protocol) and a capability
//! list. Which bits a guest may write is kept in a mask next to the registers.

/// Dword registers in the 4 KiB (PCIe) configuration space.
pub const CONFIG_DWORDS: usize = 1024;
const COMMAND_REG: usize = 1;
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_BUS_MASTER: u32 = 1 << 2;
const STATUS_CAP_LIST: u32 = 1 << 20;
const BAR0_REG: usize = 4;
const BAR_MEM64: u32 = 0b100;
const SUBSYSTEM_REG: usize = 11;
const CAP_PTR_REG: usize = 13;
const FIRST_CAP_OFFSET: usize = 0x40;

/// Identity of a PCI function.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A 64-bit memory BAR: where the guest put it and how big it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
}

pub struct PciConfiguration {
    regs: [u32; CONFIG_DWORDS],
    writable: [u32; CONFIG_DWORDS],
    bars: Vec<Bar>,
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfiguration {
    pub fn new(id: PciIdentity) -> Self {
        let mut regs = [0u32; CONFIG_DWORDS];
        let mut writable = [0u32; CONFIG_DWORDS];
        regs[0] = u32::from(id.vendor) | u32::from(id.device) << 16;
        // Memory space and bus master enable are the command bits we honour.
        writable[COMMAND_REG] = COMMAND_MEMORY | COMMAND_BUS_MASTER;
        regs[2] = u32::from(id.revision)
            | u32::from(id.prog_if) << 8
            | u32::from(id.subclass) << 16
            | u32::from(id.class) << 24;
        regs[SUBSYSTEM_REG] = u32::from(id.subsystem_vendor) | u32::from(id.subsystem) << 16;
        // Interrupt line is scratch space for the guest.
        writable[15] = 0xff;
        PciConfiguration {
            regs,
            writable,
            bars: Vec::new(),
            next_cap: FIRST_CAP_OFFSET,
            last_cap: None,
        }
    }

    /// Adds a 64-bit memory BAR at `addr` (size a power of two, addr aligned).
    pub fn add_mem64_bar(&mut self, index: usize, addr: u64, size: u64) {
        debug_assert!(size.is_power_of_two() && addr.is_multiple_of(size) && index < 5);
        let reg = BAR0_REG + index;
        self.regs[reg] = (addr as u32) | BAR_MEM64;
        self.regs[reg + 1] = (addr >> 32) as u32;
        let mask = !(size - 1);
        self.writable[reg] = mask as u32 & !0xf;
        self.writable[reg + 1] = (mask >> 32) as u32;
        self.bars.push(Bar { index, addr, size });
    }

    /// Appends a capability (its bytes from the ID on; the next pointer is
    /// filled in here) and returns its offset. `writable` marks bytes the guest
    /// may change, by offset within the capability.
    pub fn add_capability(&mut self, bytes: &[u8], writable: &[(usize, u32)]) -> usize {
        let offset = self.next_cap;
        for (i, b) in bytes.iter().enumerate() {
            self.set_byte(offset + i, *b);
        }
        self.set_byte(offset + 1, 0);
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.regs[CAP_PTR_REG] = offset as u32;
                self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        for (at, mask) in writable {
            self.writable[(offset + at) / 4] |= mask;
        }
        self.last_cap = Some(offset);
        self.next_cap = (offset + bytes.len()).next_multiple_of(4);
        offset
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Guest write of `data` at byte `offset` within dword `reg`.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= CONFIG_DWORDS || offset + data.len() > 4 {
            return;
        }
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << ((offset + i) * 8);
            mask |= 0xff << ((offset + i) * 8);
        }
        let writable = self.writable[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !writable) | (value & writable);
    }

    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_REG] & COMMAND_MEMORY != 0
    }

    /// Where the guest has put each BAR now (registers, not what is mapped).
    pub fn programmed_bars(&self) -> impl Iterator<Item = Bar> + '_ {
        self.bars.iter().map(|b| {
            let reg = BAR0_REG + b.index;
            let addr = u64::from(self.regs[reg] & !0xf) | u64::from(self.regs[reg + 1]) << 32;
            Bar { addr, ..*b }
        })
    }

    /// Bytes of a register range, for capability structures the device reads back.
    pub fn read_byte(&self, offset: usize) -> u8 {
        (self.read(offset / 4) >> ((offset % 4) * 8)) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciIdentity {
        PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 1,
            subclass: 0x80,
            prog_if: 0,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn bar_sizing_and_moving() {
        let mut c = PciConfiguration::new(id());
        c.add_mem64_bar(0, 0xc000_0000, 0x8000);
        assert_eq!(c.read(4), 0xc000_0004);
        c.write(4, 0, &0xffff_ffffu32.to_le_bytes());
        c.write(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read(4), 0xffff_8004);
        assert_eq!(c.read(5), 0xffff_ffff);
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        c.write(5, 0, &1u32.to_le_bytes());
        let bar = c.programmed_bars().next().unwrap();
        assert_eq!((bar.addr, bar.size), (0x1_d000_0000, 0x8000));
        // Identity registers are read-only.
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read(0), 0x1042_1af4);
    }

    #[test]
    fn capabilities_are_linked() {
        let mut c = PciConfiguration::new(id());
        let a = c.add_capability(&[0x11, 0, 1, 2], &[]);
        let b = c.add_capability(&[0x09, 0, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(c.read(13) & 0xff, a as u32);
        assert_eq!(c.read_byte(a + 1), b as u8);
        assert_eq!(c.read_byte(b + 1), 0);
        assert_ne!(c.read(1) & STATUS_CAP_LIST, 0);
        c.write(1, 0, &[0x06, 0]);
        assert!(c.memory_enabled());
    }
}
