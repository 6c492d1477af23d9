//! CPUID as KVM supports it, with each vCPU's APIC ID and the VM's topology
//! (one socket, one thread per core, `vcpus` cores) filled in.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use super::CpuError;

const LEAF_FEATURES: u32 = 1;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;
/// The three leaves that hold the processor's brand string.
const LEAVES_BRAND: std::ops::RangeInclusive<u32> = 0x8000_0002..=0x8000_0004;

/// Reads what KVM supports once per VM; each vCPU gets a patched copy.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| CpuError::Kvm {
            id: 0,
            what: "read supported CPUID",
            source,
        })?;
    fill_brand_string(&mut cpuid);
    Ok(cpuid)
}

/// Some KVMs report the brand string leaves empty, and the guest then names
/// its CPU by family and model alone ("19/01"); give it the host's name.
fn fill_brand_string(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if LEAVES_BRAND.contains(&e.function) && [e.eax, e.ebx, e.ecx, e.edx] == [0; 4] {
            let host = std::arch::x86_64::__cpuid(e.function);
            (e.eax, e.ebx, e.ecx, e.edx) = (host.eax, host.ebx, host.ecx, host.edx);
        }
    }
}

/// Bits needed to number `n` cores in an APIC ID.
fn core_id_bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

pub fn set_cpuid(vcpu: &VcpuFd, base: &CpuId, id: u8, vcpus: u8) -> Result<(), CpuError> {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(vcpus) << 16);
                e.ecx |= ECX_HYPERVISOR;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (TOPOLOGY_LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_id_bits(vcpus);
                        e.ebx = u32::from(vcpus);
                        e.ecx = (TOPOLOGY_LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(|source| CpuError::Kvm {
        id,
        what: "set CPUID",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brand_string_is_the_hosts() {
        let kvm = Kvm::new().unwrap();
        let cpuid = supported_cpuid(&kvm).unwrap();
        let mut brand = Vec::new();
        for leaf in LEAVES_BRAND {
            let e = cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == leaf)
                .unwrap();
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                brand.extend_from_slice(&r.to_le_bytes());
            }
        }
        let brand = String::from_utf8_lossy(&brand);
        let host = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let host = host
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .unwrap()
            .trim_start_matches([' ', '\t', ':']);
        assert_eq!(brand.trim_matches(['\0', ' ']), host.trim());
    }

    #[test]
    fn core_bits() {
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(3), 2);
        assert_eq!(core_id_bits(4), 2);
        assert_eq!(core_id_bits(5), 3);
    }
}
