//! Guest RAM: anonymous host memory, split around the 32-bit MMIO hole and
//! registered with KVM as one memory slot per region.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Allocate {
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot build the guest memory map: {0}")]
    Map(String),
    #[error("KVM refused memory slot {slot}: {source}")]
    Slot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges for `size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), size - low));
    }
    ranges
}

/// Guest RAM below this address stays on small pages: the VMM writes the
/// boot tables there before the guest runs, and a huge page would first be
/// zeroed whole (about 0.3 ms on a nested host) for a few kilobytes of tables.
const SMALL_PAGES_END: u64 = 2 << 20;

/// Maps `size` bytes of guest RAM. Pages are only backed when the guest (or
/// the loader) touches them, so a big, idle guest costs little host memory.
/// `thp` asks for transparent huge pages, which make guest page faults cheaper.
pub fn create_guest_memory(size: u64, thp: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let mapping = MmapRegion::build(None, len as usize, prot, flags)
            .map_err(|source| MemoryError::Allocate { size, source })?;
        let small = SMALL_PAGES_END.saturating_sub(start.0).min(len);
        if thp && small < len {
            // SAFETY: the range lies within the mapping we just made and own;
            // madvise only changes how the kernel backs it.
            let ret = unsafe {
                libc::madvise(
                    mapping.as_ptr().add(small as usize).cast(),
                    (len - small) as usize,
                    libc::MADV_HUGEPAGE,
                )
            };
            if ret != 0 {
                log::debug!("MADV_HUGEPAGE refused: {}", std::io::Error::last_os_error());
            }
        }
        let region = GuestRegionMmap::new(mapping, start)
            .ok_or_else(|| MemoryError::Map(format!("region at {:#x} overflows", start.0)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))
}

/// Gives KVM one slot per region.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the VM
        // keeps for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Slot { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(
            big[1],
            (GuestAddress(MMIO_HOLE_END), (4 << 30) - MMIO_HOLE_START)
        );
    }

    #[test]
    fn memory_is_usable() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(16 << 20, false).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(mem.read_obj::<u32>(GuestAddress(16 << 20)).is_err());
    }
}
