//! A VM core ([`VmCore`]: the KVM VM, its memory slots, irqchip and vCPU 0)
//! made ahead of time, so that `vm.create` does not wait for KVM. On these
//! machines that is over half a millisecond: KVM_CREATE_VM sets up the MMU,
//! a memory slot allocates its reverse maps, KVM_CREATE_VCPU its state.
//!
//! In API mode, whenever there is no VM, a thread makes one sized like the
//! last VM (or for the default size): the next VM, a boot after
//! `vm.shutdown` or a `vm.create` after `vm.delete`, most likely has the same.
//! A core of another size is closed in the background and one made on the
//! spot. A spare costs the kernel's share of an idle VM (mostly reverse maps,
//! about 2 MiB per GiB of guest memory); its guest memory is never touched,
//! so it adds nothing to the VMM's RSS.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::Kvm;

use crate::vm::{close_in_background, VmCore, VmError};

/// A core being made (or made) in the background.
struct Pending {
    memory_size: u64,
    thread: JoinHandle<Result<VmCore, VmError>>,
}

#[derive(Default)]
pub struct SpareVm {
    pending: Option<Pending>,
}

impl SpareVm {
    /// Starts making a core for `memory_size` bytes unless one is on its way.
    pub fn prepare(&mut self, kvm: &Arc<Kvm>, memory_size: u64) {
        if self.pending.is_some() {
            return;
        }
        let kvm = kvm.clone();
        let spawned = std::thread::Builder::new()
            .name("kite-spare-vm".into())
            .spawn(move || VmCore::new(&kvm, memory_size));
        match spawned {
            Ok(thread) => {
                self.pending = Some(Pending {
                    memory_size,
                    thread,
                })
            }
            // Not fatal: cores are then made when needed.
            Err(e) => log::debug!("no spare VM: cannot start its thread: {e}"),
        }
    }

    /// A core for `memory_size` bytes: the spare if it has that size (waiting
    /// for it if it is still being made), otherwise a new one.
    pub fn take(&mut self, kvm: &Kvm, memory_size: u64) -> Result<VmCore, VmError> {
        let Some(pending) = self.pending.take() else {
            return VmCore::new(kvm, memory_size);
        };
        if pending.memory_size != memory_size {
            log::debug!(
                "the spare VM has {} MiB, not {} MiB; making a VM now",
                pending.memory_size >> 20,
                memory_size >> 20
            );
            close_in_background(pending.thread);
            return VmCore::new(kvm, memory_size);
        }
        match pending.thread.join() {
            Ok(Ok(core)) => Ok(core),
            Ok(Err(e)) => {
                log::debug!("the spare VM failed ({e}); making one now");
                VmCore::new(kvm, memory_size)
            }
            Err(_) => {
                log::warn!("the spare VM's thread panicked; making a VM now");
                VmCore::new(kvm, memory_size)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_is_used_only_for_its_memory_size() {
        let kvm = Arc::new(Kvm::new().unwrap());
        let mut spare = SpareVm::default();
        spare.prepare(&kvm, 64 << 20);
        assert_eq!(spare.take(&kvm, 64 << 20).unwrap().memory_size(), 64 << 20);
        assert!(spare.pending.is_none());
        spare.prepare(&kvm, 64 << 20);
        assert_eq!(spare.take(&kvm, 32 << 20).unwrap().memory_size(), 32 << 20);
        // Without a spare, a core is made on the spot.
        assert_eq!(spare.take(&kvm, 16 << 20).unwrap().memory_size(), 16 << 20);
    }
}
