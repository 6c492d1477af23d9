//! Register state for the boot vCPU and the MSR/FPU/LAPIC state every vCPU
//! starts with.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{gdt_entry, segment_from_gdt};
use super::CpuError;
use crate::boot::EntryPoint;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, PDPT_START, PD_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
/// Stack for the 64-bit entry until the kernel sets its own.
const BOOT_STACK_POINTER: u64 = 0x8ff0;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_WRITEBACK: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { id, what, source }
}

/// State every vCPU needs, boot vCPU or not.
pub fn setup_common(vcpu: &VcpuFd, id: u8) -> Result<(), CpuError> {
    let msrs: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&msrs).map_err(|_| CpuError::Kvm {
        id,
        what: "build the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err(id, "set MSRs"))?;
    if written != msrs.as_slice().len() {
        log::warn!(
            "vCPU {id}: KVM took {written} of {} boot MSRs",
            msrs.as_slice().len()
        );
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err(id, "set FPU state"))?;

    // LINT0 delivers the legacy PIC's ExtINT, LINT1 the NMI, as firmware would set them.
    let mut lapic = vcpu
        .get_lapic()
        .map_err(kvm_err(id, "read the local APIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: &mut [u8] = bytemuck_regs(&mut lapic.regs[reg..reg + 4]);
        let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let value = (value & !0x700) | (mode << 8);
        bytes.copy_from_slice(&value.to_le_bytes());
    }
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(id, "set the local APIC"))?;
    Ok(())
}

/// `kvm_lapic_state.regs` is `[c_char; 1024]`; view a slice of it as bytes.
fn bytemuck_regs(regs: &mut [libc::c_char]) -> &mut [u8] {
    // SAFETY: c_char and u8 have the same size and alignment, and every bit
    // pattern is valid for both.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), regs.len()) }
}

/// Registers, segments and (for 64-bit entry) page tables of the boot vCPU.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), CpuError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err(0, "read sregs"))?;
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    let gdt: [u64; 4] = match entry {
        EntryPoint::Pvh { entry } => {
            regs.rip = entry.0;
            regs.rbx = PVH_INFO_START;
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            [
                0,
                gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x008b, 0, 0x67),    // TSS
            ]
        }
        EntryPoint::Linux64 { entry } => {
            regs.rip = entry.0;
            regs.rsi = ZERO_PAGE_START;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            [
                0,
                gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x808b, 0, 0xfffff), // TSS
            ]
        }
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| CpuError::GuestMemory(e.to_string()))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|e| CpuError::GuestMemory(e.to_string()))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    vcpu.set_sregs(&sregs).map_err(kvm_err(0, "set sregs"))?;
    vcpu.set_regs(&regs).map_err(kvm_err(0, "set regs"))?;
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let err = |e: vm_memory::GuestMemoryError| CpuError::GuestMemory(e.to_string());
    mem.write_obj(PDPT_START | PRESENT_RW, GuestAddress(PML4_START))
        .map_err(err)?;
    let mut pds = vec![0u8; 4 * 4096];
    for (i, chunk) in pds.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(((i as u64) << 21) | PRESENT_RW | HUGE).to_le_bytes());
    }
    mem.write_slice(&pds, GuestAddress(PD_START)).map_err(err)?;
    for i in 0..4u64 {
        mem.write_obj(
            (PD_START + i * 4096) | PRESENT_RW,
            GuestAddress(PDPT_START + i * 8),
        )
        .map_err(err)?;
    }
    Ok(())
}
