//! Port writes that KVM queues instead of exiting. A PCI configuration access
//! is a write of the address to 0xCF8 and a read or write at 0xCFC: the first
//! needs no answer and only matters to later exits, so KVM can append it to a
//! ring page shared with the VMM, and a vCPU thread applies the queued writes,
//! in order, before it serves its next exit. That halves the exits of a
//! guest's PCI enumeration, each of which costs microseconds (QEMU does the
//! same with 0xCF8).

use std::ptr::{addr_of, addr_of_mut, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use devices::Bus;
use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, VcpuFd, VmFd};

use crate::vm::{kvm_err, VmError};

/// The VM's ring of queued port writes.
pub struct CoalescedPio {
    ring: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    /// Entries the ring page holds.
    entries: u32,
    /// One vCPU thread drains at a time, so writes are applied in order.
    drain: Mutex<()>,
}

// SAFETY: the ring is a page of shared memory that the kernel appends to.
// Its two indices are only accessed atomically; entries are read, and
// `first` moved, only while holding `drain`.
unsafe impl Send for CoalescedPio {}
// SAFETY: as for Send.
unsafe impl Sync for CoalescedPio {}

impl CoalescedPio {
    /// Maps the VM's ring (through any of its vCPUs) and has KVM queue writes
    /// to the `len` ports from `port`. `None` when KVM cannot queue port
    /// writes: they then exit as usual.
    pub fn new(vm: &VmFd, vcpu: &VcpuFd, port: u16, len: u32) -> Result<Option<Self>, VmError> {
        if !vm.check_extension(Cap::CoalescedPio) {
            log::debug!("KVM cannot queue port writes; they exit as usual");
            return Ok(None);
        }
        // SAFETY: sysconf has no memory effects.
        let page_size =
            usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).map_err(|_| {
                VmError::Kvm {
                    what: "find the page size",
                    source: kvm_ioctls::Error::last(),
                }
            })?;
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page_size as libc::off_t;
        // SAFETY: a fresh shared mapping of one page of the vCPU fd at the
        // offset where KVM provides the ring; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(vcpu),
                offset,
            )
        };
        let ring = NonNull::new(addr)
            .filter(|a| a.as_ptr() != libc::MAP_FAILED)
            .ok_or_else(|| VmError::Kvm {
                what: "map the coalesced I/O ring",
                source: kvm_ioctls::Error::last(),
            })?
            .cast();
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        let entries = ((page_size - header) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        let this = CoalescedPio {
            ring,
            page_size,
            entries,
            drain: Mutex::new(()),
        };
        vm.register_coalesced_mmio(IoEventAddress::Pio(u64::from(port)), len)
            .map_err(kvm_err("queue port writes"))?;
        Ok(Some(this))
    }

    fn first(&self) -> &AtomicU32 {
        // SAFETY: `first` lies in the mapped page, is 4-aligned, and is only
        // accessed atomically while the mapping lives (as long as `self`).
        unsafe { AtomicU32::from_ptr(addr_of_mut!((*self.ring.as_ptr()).first)) }
    }

    fn last(&self) -> &AtomicU32 {
        // SAFETY: as for `first`; the kernel moves `last` as it appends.
        unsafe { AtomicU32::from_ptr(addr_of_mut!((*self.ring.as_ptr()).last)) }
    }

    /// Applies the queued writes to `pio`, oldest first. Called before every
    /// exit is served, so the guest never sees their effect late.
    pub fn drain(&self, pio: &Bus) {
        if self.first().load(Ordering::Relaxed) == self.last().load(Ordering::Acquire) {
            return;
        }
        let _one_at_a_time = devices::bus::lock(&self.drain);
        loop {
            let first = self.first().load(Ordering::Relaxed);
            let last = self.last().load(Ordering::Acquire);
            if first == last {
                return;
            }
            if first >= self.entries {
                // Only this process writes `first`; never read past the page.
                log::error!("coalesced I/O ring index {first} out of range; ring reset");
                self.first().store(last % self.entries, Ordering::Release);
                return;
            }
            // SAFETY: `first` < `entries`, so the entry lies within the
            // mapped page; the kernel wrote it before publishing `last`
            // (read with Acquire above).
            let entry = unsafe {
                addr_of!((*self.ring.as_ptr()).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>()
                    .add(first as usize)
                    .read_volatile()
            };
            let len = (entry.len as usize).min(entry.data.len());
            if !pio.write(entry.phys_addr, &entry.data[..len]) {
                log::trace!("queued write to unhandled port {:#x}", entry.phys_addr);
            }
            self.first()
                .store((first + 1) % self.entries, Ordering::Release);
        }
    }
}

impl Drop for CoalescedPio {
    fn drop(&mut self) {
        // SAFETY: the page was mapped in `new` with this size and nothing
        // refers to it once `self` goes.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.page_size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;
    use kvm_ioctls::{Kvm, VcpuExit};
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    /// Records the values written to it.
    struct Recorder(Arc<Mutex<Vec<u32>>>);

    impl BusDevice for Recorder {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            let mut v = [0u8; 4];
            v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
            self.0.lock().unwrap().push(u32::from_le_bytes(v));
        }
    }

    #[test]
    fn queued_writes_arrive_in_order_even_past_a_full_ring() {
        const PORT: u16 = 0xcf8;
        const WRITES: u32 = 400; // more than a 4 KiB ring holds (170)
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let mem = crate::memory::create_guest_memory(1 << 20, false).unwrap();
        crate::memory::register_with_kvm(&vm, &mem).unwrap();
        #[rustfmt::skip]
        let code: [u8; 20] = [
            0x66, 0xb9, 0x90, 0x01, 0x00, 0x00, // mov ecx, 400
            0xba, 0xf8, 0x0c,                   // mov dx, 0xcf8
            0x66, 0x31, 0xc0,                   // xor eax, eax
            0x66, 0xef,                         // loop: out dx, eax
            0x66, 0x40,                         // inc eax
            0x66, 0x49,                         // dec ecx
            0x75, 0xf8,                         // jnz loop
        ];
        mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0xf4u8, GuestAddress(0x1000 + code.len() as u64))
            .unwrap(); // hlt
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let Some(ring) = CoalescedPio::new(&vm, &vcpu, PORT, 4).unwrap() else {
            panic!("KVM_CAP_COALESCED_PIO is missing");
        };
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();

        let seen = Arc::new(Mutex::new(Vec::new()));
        let bus = Bus::new();
        bus.insert(
            Arc::new(Mutex::new(Recorder(seen.clone()))),
            u64::from(PORT),
            4,
        )
        .unwrap();
        let mut exits = 0;
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(port, data) => {
                    // The ring was full: the write exits, after those queued.
                    ring.drain(&bus);
                    bus.write(u64::from(port), data);
                    exits += 1;
                }
                VcpuExit::Hlt => {
                    ring.drain(&bus);
                    break;
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        assert_eq!(*seen.lock().unwrap(), (0..WRITES).collect::<Vec<_>>());
        assert!(
            exits < WRITES as usize / 2,
            "{exits} of {WRITES} writes exited"
        );
    }
}
