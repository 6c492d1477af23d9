//! Where things live in guest-physical memory and which interrupt each legacy
//! device uses. One place, so boot code, ACPI tables and devices agree.

/// GDT for the boot vCPU (PVH and 64-bit Linux entries both need one).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, then its memory map right after.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` (the "zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, 4 PDs (4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of the low RAM that the e820 map reports as usable below 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// MP table (floating pointer, then configuration table), in the BIOS area
/// where guests look for it.
pub const MPTABLE_START: u64 = 0xf0000;
/// ACPI tables, RSDP first (inside the reserved 0xa0000-0xfffff window).
pub const ACPI_START: u64 = 0xa0000;
pub const ACPI_MAX_SIZE: u64 = 0x10000;
/// Start of "high" memory, where kernels are loaded.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole below 4 GiB: RAM beyond this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Where PCI BARs go: the MMIO hole up to the ECAM window.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_END: u64 = PCI_MMCONFIG_START;
/// The PCI ECAM window (announced in e820 so the guest keeps out).
pub const PCI_MMCONFIG_START: u64 = 0xe800_0000;
pub const PCI_MMCONFIG_SIZE: u64 = 0x1000_0000;
/// Platform MMIO devices (the ACPI GED register).
pub const GED_MMIO_START: u64 = 0xfe00_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// The GED's interrupt (ISA IRQs 0-15 are edge-triggered, active-high).
pub const GED_IRQ: u32 = 5;
