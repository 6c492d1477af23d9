//! The Intel MultiProcessor table, for guests that look for one before (or
//! instead of) ACPI. Linux scans low memory for it early in boot; without one
//! it searches every candidate region, which is slow where guest memory
//! accesses trap. It lists the same CPUs and I/O APIC as the MADT.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IOAPIC_START, LAPIC_START, MPTABLE_START};
use crate::memory::GuestMemoryMmap;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and FPU|APIC feature flags, as the spec's examples.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ISA_IRQS: u8 = 16;

#[derive(Debug, thiserror::Error)]
#[error("cannot write the MP table to guest memory: {0}")]
pub struct MptableError(String);

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The configuration table: header, then entries.
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus 0 IRQ n -> pin n.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, to all local APICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"KITEVM  ");
    table.extend_from_slice(b"KITE        ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

pub fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table_addr = MPTABLE_START + 16;
    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, rev 1.4
    floating[10] = checksum(&floating);
    let err = |e: vm_memory::GuestMemoryError| MptableError(e.to_string());
    mem.write_slice(&floating, GuestAddress(MPTABLE_START))
        .map_err(err)?;
    mem.write_slice(&config_table(vcpus), GuestAddress(table_addr))
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_checksum_to_zero() {
        let mem = crate::memory::create_guest_memory(16 << 20, false).unwrap();
        write_mptable(&mem, 3).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(checksum(&fp), 0);
        let table = config_table(3);
        assert_eq!(checksum(&table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 3 CPUs, bus, I/O APIC, 16 IRQs, 2 local interrupts.
        assert_eq!(count, 3 + 1 + 1 + 16 + 2);
        assert_eq!(table.len(), 44 + 3 * 20 + 20 * 8);
    }
}
