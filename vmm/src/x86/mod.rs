//! x86-64 vCPU state at reset: CPUID, MSRs, FPU, local APIC, and the
//! registers, segments and page tables each boot protocol expects.

pub mod cpuid;
pub mod gdt;
pub mod regs;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("vCPU {id}: cannot {what}: {source}")]
    Kvm {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot write boot page tables or GDT to guest memory: {0}")]
    GuestMemory(String),
}
