//! ACPI tables for a hardware-reduced platform: RSDP -> XSDT -> FADT (-> DSDT)
//! and MADT. They tell the guest its CPUs and interrupt controllers, where
//! COM1 is, how to power off (`_S5_` plus the FADT sleep registers at port
//! 0x600), how to reset, and where power-button events come from (a GED).

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Method, Name, Notify,
    OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Store, IO,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi_pm::{ACPI_RESET_VALUE, ACPI_SLEEP_PORT};
use devices::ged::{GED_MMIO_LEN, GED_POWER_BUTTON};
use devices::serial::{COM1_IRQ, COM1_PORT};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use crate::layout::{
    ACPI_MAX_SIZE, ACPI_START, GED_IRQ, GED_MMIO_START, IOAPIC_START, LAPIC_START,
    PCI_MMCONFIG_START, PCI_MMIO32_END, PCI_MMIO32_START,
};
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"KITEVM";
const FADT_LEN: u32 = 276;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit their {ACPI_MAX_SIZE:#x}-byte window")]
    TooBig(u64),
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(String),
}

fn table_id(name: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"KITE____";
    id[4..].copy_from_slice(name);
    id
}

fn dsdt() -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, table_id(b"DSDT"), 1);

    // Each object is serialized in the statement that builds it: the AML
    // builders borrow their children.
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(COM1_PORT as u16, COM1_PORT as u16, 1, 8),
                    &Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut dsdt);

    Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut dsdt);

    // The GED raises GED_IRQ; _EVT reads (and so clears) the event register
    // and turns the power-button bit into Notify(PWRB, 0x80).
    let ged_base = GED_MMIO_START as u32;
    let ged_len = GED_MMIO_LEN as u32;
    Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&Interrupt::new(true, true, false, false, GED_IRQ)]),
            ),
            &OpRegion::new(
                "GDST".into(),
                OpRegionSpace::SystemMemory,
                &ged_base,
                &ged_len,
            ),
            &Field::new(
                "GDST".into(),
                FieldAccessType::DWord,
                FieldLockRule::NoLock,
                FieldUpdateRule::WriteAsZeroes,
                vec![FieldEntry::Named(*b"GDAT", 32)],
            ),
            &Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &Store::new(&Local(0), &Path::new("GDAT")),
                    &If::new(
                        &aml::And::new(&aml::ZERO, &Local(0), &GED_POWER_BUTTON),
                        vec![&Notify::new(&Path::new("\\_SB_.PWRB"), &0x80u8)],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut dsdt);

    // The PCI root: bus 0, config through CF8/CFC or ECAM (MCFG), BARs in
    // the 32-bit MMIO window below the ECAM window.
    let io_low = AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_high = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_END - 1) as u32,
        None,
    );
    Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &aml::ZERO),
            &Name::new("_SEG".into(), &aml::ZERO),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_BBN".into(), &aml::ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &AddressSpace::<u16>::new_bus_number(0, 0),
                    &IO::new(0xcf8, 0xcf8, 1, 8),
                    &io_low,
                    &io_high,
                    &mmio32,
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut dsdt);

    // S5 (soft off) with SLP_TYP 5, matching the value devices::acpi_pm expects.
    Name::new("_S5_".into(), &Package::new(vec![&5u8, &0u8, &0u8, &0u8])).to_aml_bytes(&mut dsdt);
    dsdt
}

fn fadt(dsdt_addr: u64) -> Sdt {
    let mut fadt = Sdt::new(*b"FACP", FADT_LEN, 6, OEM_ID, table_id(b"FACP"), 1);
    const FLAGS: usize = 112;
    const RESET_REG: usize = 116;
    const RESET_VALUE: usize = 128;
    const MINOR_VERSION: usize = 131;
    const X_DSDT: usize = 140;
    const SLEEP_CONTROL_REG: usize = 244;
    const SLEEP_STATUS_REG: usize = 256;
    const HYPERVISOR_ID: usize = 268;
    // PWR_BUTTON and SLP_BUTTON: buttons are control-method devices;
    // RESET_REG_SUP; HW_REDUCED_ACPI. A hardware-reduced platform has no PM
    // timer (its FADT fields are to be ignored; Linux would still spend 5 ms
    // verifying one at boot).
    let flags: u32 = (1 << 4) | (1 << 5) | (1 << 10) | (1 << 20);
    fadt.write(FLAGS, flags);
    fadt.write(
        RESET_REG,
        GenericAddress::io_port_address::<u8>(ACPI_SLEEP_PORT as u16),
    );
    fadt.write(RESET_VALUE, ACPI_RESET_VALUE);
    fadt.write(MINOR_VERSION, 3u8);
    fadt.write(X_DSDT, dsdt_addr);
    fadt.write(
        SLEEP_CONTROL_REG,
        GenericAddress::io_port_address::<u8>(ACPI_SLEEP_PORT as u16),
    );
    fadt.write(
        SLEEP_STATUS_REG,
        GenericAddress::io_port_address::<u8>(ACPI_SLEEP_PORT as u16 + 1),
    );
    fadt.write(HYPERVISOR_ID, *b"KITEKITE");
    fadt
}

/// Local APIC for every possible vCPU (boot ones enabled, the rest present for
/// hotplug), the I/O APIC, and COM1's interrupt source override.
fn madt(boot_vcpus: u8, max_vcpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, table_id(b"MADT"), 1);
    madt.write(36, LAPIC_START as u32);
    for id in 0..max_vcpus {
        let enabled = u32::from(id < boot_vcpus);
        // Processor Local APIC: type 0, length 8, UID, APIC ID, flags.
        madt.append_slice(&[0, 8, id, id]);
        madt.append_slice(&enabled.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id 0, reserved, address, GSI base 0.
    madt.append_slice(&[1, 12, 0, 0]);
    madt.append_slice(&(IOAPIC_START as u32).to_le_bytes());
    madt.append_slice(&0u32.to_le_bytes());
    // Interrupt source override: ISA bus, IRQ 4 -> GSI 4, conforming flags.
    madt.append_slice(&[2, 10, 0, COM1_IRQ as u8]);
    madt.append_slice(&COM1_IRQ.to_le_bytes());
    madt.append_slice(&0u16.to_le_bytes());
    madt
}

/// Writes all tables and returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    boot_vcpus: u8,
    max_vcpus: u8,
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = rsdp_addr + Rsdp::len() as u64;
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = next.next_multiple_of(8);
        let end = addr + bytes.len() as u64;
        if end > ACPI_START + ACPI_MAX_SIZE {
            return Err(AcpiError::TooBig(end - ACPI_START));
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::GuestMemory(e.to_string()))?;
        next = end;
        Ok(addr)
    };

    let dsdt_addr = place(dsdt().as_slice())?;
    let fadt_addr = place(fadt(dsdt_addr).as_slice())?;
    let madt_addr = place(madt(boot_vcpus, max_vcpus).as_slice())?;
    let mut mcfg = MCFG::new(OEM_ID, table_id(b"MCFG"), 1);
    mcfg.add_ecam(PCI_MMCONFIG_START, 0, 0, 0);
    let mut mcfg_bytes = Vec::new();
    mcfg.to_aml_bytes(&mut mcfg_bytes);
    let mcfg_addr = place(&mcfg_bytes)?;
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes)?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(rsdp.as_bytes(), GuestAddress(rsdp_addr))
        .map_err(|e| AcpiError::GuestMemory(e.to_string()))?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = crate::memory::create_guest_memory(16 << 20, false).unwrap();
        let rsdp = create_acpi_tables(&mem, 2, 4).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let read_table = |addr: u64| {
            let mut hdr = [0u8; 8];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&t), "checksum of {:?}", &t[..4]);
            t
        };
        let xsdt = read_table(xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = read_table(entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        // Hardware-reduced, so no PM timer (PM_TMR_BLK, X_PM_TMR_BLK).
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & 1 << 20, 0);
        assert!(fadt[76..80].iter().chain(&fadt[208..220]).all(|&b| b == 0));
        let dsdt = read_table(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert_eq!(&read_table(entries[2])[..4], b"MCFG");
        assert!(dsdt.windows(4).any(|w| w == b"PCI0"));
        let madt = read_table(entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        // 4 local APICs, 2 of them enabled.
        let lapics: Vec<&[u8]> = madt[44..].chunks(8).take(4).collect();
        assert!(lapics.iter().all(|l| l[0] == 0 && l[1] == 8));
        assert_eq!(lapics.iter().filter(|l| l[4] & 1 == 1).count(), 2);
    }
}
