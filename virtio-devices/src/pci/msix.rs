//! MSI-X: the vector table and pending-bit array a device exposes in a BAR,
//! and the capability's enable/mask bits. Each vector has its own GSI whose
//! route the VMM points at the vector's message; raising a vector writes
//! that GSI's irqfd, so interrupts reach the guest without a VM exit.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub const MSIX_CAP_ID: u8 = 0x11;
const TABLE_ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// The message a vector sends: where to write and what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// One vector's interrupt line into KVM.
pub struct MsiVector {
    pub gsi: u32,
    pub irqfd: EventFd,
}

/// What the VMM provides for MSI: vectors (a GSI wired to an irqfd each) and
/// routing a GSI to a message.
pub trait MsiRouter: Send + Sync {
    fn allocate(&self, count: u16) -> io::Result<Vec<MsiVector>>;
    /// Routes `gsi` to `msg`, or removes its route with None.
    fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
}

#[derive(Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.ctrl & ENTRY_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.addr_lo) | u64::from(self.addr_hi) << 32,
            data: self.data,
        }
    }
}

pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<MsiVector>,
    router: Arc<dyn MsiRouter>,
}

impl MsixTable {
    pub fn new(count: u16, router: Arc<dyn MsiRouter>) -> io::Result<Self> {
        let vectors = router.allocate(count)?;
        Ok(MsixTable {
            entries: vec![
                Entry {
                    ctrl: ENTRY_MASKED,
                    ..Default::default()
                };
                usize::from(count)
            ],
            pending: vec![false; usize::from(count)],
            enabled: false,
            function_masked: false,
            vectors,
            router,
        })
    }

    pub fn len(&self) -> u16 {
        self.entries.len() as u16
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the table, for the BAR; 4- or 8-byte accesses.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (index, field) = (
            (offset / TABLE_ENTRY_SIZE) as usize,
            offset % TABLE_ENTRY_SIZE,
        );
        let Some(e) = self.entries.get(index) else {
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.ctrl];
        for (i, b) in data.iter_mut().enumerate() {
            let at = field as usize + i;
            if let Some(w) = words.get(at / 4) {
                *b = (w >> ((at % 4) * 8)) as u8;
            }
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (index, field) = (
            (offset / TABLE_ENTRY_SIZE) as usize,
            offset % TABLE_ENTRY_SIZE,
        );
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        let was_masked = entry.masked();
        for (i, b) in data.iter().enumerate() {
            let at = field as usize + i;
            let word = match at / 4 {
                0 => &mut entry.addr_lo,
                1 => &mut entry.addr_hi,
                2 => &mut entry.data,
                3 => &mut entry.ctrl,
                _ => continue,
            };
            let shift = (at % 4) * 8;
            *word = (*word & !(0xff << shift)) | (u32::from(*b) << shift);
        }
        let unmasked = was_masked && !entry.masked();
        self.update_route(index);
        if unmasked {
            self.deliver_pending(index);
        }
    }

    /// The pending-bit array: one bit per vector.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }

    /// The capability's message control word changed.
    pub fn set_control(&mut self, ctrl: u16) {
        let was_active = self.enabled && !self.function_masked;
        self.enabled = ctrl & CTRL_ENABLE != 0;
        self.function_masked = ctrl & CTRL_FUNCTION_MASK != 0;
        let active = self.enabled && !self.function_masked;
        if active != was_active {
            for i in 0..self.entries.len() {
                self.update_route(i);
            }
        }
        if active && !was_active {
            for i in 0..self.entries.len() {
                self.deliver_pending(i);
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn update_route(&self, index: usize) {
        let (Some(entry), Some(vector)) = (self.entries.get(index), self.vectors.get(index)) else {
            return;
        };
        let msg = (self.enabled && !entry.masked()).then(|| entry.message());
        if let Err(e) = self.router.route(vector.gsi, msg) {
            log::warn!("MSI-X vector {index}: cannot route GSI {}: {e}", vector.gsi);
        }
    }

    fn deliver_pending(&mut self, index: usize) {
        if self.pending.get(index).copied().unwrap_or(false) {
            self.pending[index] = false;
            self.trigger(index as u16);
        }
    }

    /// Raises `vector`, or marks it pending while it or the function is masked.
    pub fn trigger(&mut self, vector: u16) {
        let index = usize::from(vector);
        let Some(entry) = self.entries.get(index) else {
            return;
        };
        if !self.enabled {
            return;
        }
        if self.function_masked || entry.masked() {
            self.pending[index] = true;
            return;
        }
        if let Err(e) = self.vectors[index].irqfd.write(1) {
            log::warn!("MSI-X vector {index}: cannot signal irqfd: {e}");
        }
    }
}

/// The MSI-X capability bytes for a table of `count` vectors in BAR `bar` at
/// `table_offset`, pending bits at `pba_offset`.
pub fn capability(count: u16, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 12] {
    let mut cap = [0u8; 12];
    cap[0] = MSIX_CAP_ID;
    cap[2..4].copy_from_slice(&(count - 1).to_le_bytes());
    cap[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
    cap[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
    cap
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeRouter(Mutex<Vec<(u32, Option<MsiMessage>)>>);
    impl MsiRouter for FakeRouter {
        fn allocate(&self, count: u16) -> io::Result<Vec<MsiVector>> {
            (0..count)
                .map(|i| {
                    Ok(MsiVector {
                        gsi: 24 + u32::from(i),
                        irqfd: EventFd::new(libc::EFD_NONBLOCK)?,
                    })
                })
                .collect()
        }
        fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let router = Arc::new(FakeRouter::default());
        let mut t = MsixTable::new(2, router.clone()).unwrap();
        t.set_control(CTRL_ENABLE);
        t.write_table(16, &0xfee0_0000u32.to_le_bytes());
        t.write_table(24, &0x41u32.to_le_bytes());
        t.trigger(1);
        assert!(t.vectors[1].irqfd.read().is_err(), "masked vector fired");
        let mut pba = [0u8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        t.write_table(28, &0u32.to_le_bytes());
        assert_eq!(t.vectors[1].irqfd.read().unwrap(), 1);
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        let last = *router.0.lock().unwrap().last().unwrap();
        assert_eq!(
            last,
            (
                25,
                Some(MsiMessage {
                    addr: 0xfee0_0000,
                    data: 0x41
                })
            )
        );
        let mut word = [0u8; 4];
        t.read_table(24, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0x41);
        // Out-of-range accesses are ignored.
        t.write_table(4096, &[1, 2, 3, 4]);
        t.trigger(7);
    }
}
