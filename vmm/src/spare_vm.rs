//! A KVM VM made ahead of time, so that `vm.create` does not wait for
//! KVM_CREATE_VM (a third of a millisecond or more: KVM sets up the VM's
//! MMU and its kernel objects).
//!
//! While the VMM has no VM, a thread creates an empty one (no memory, no
//! irqchip, no vCPUs: nothing that depends on the config) and leaves it
//! ready; building a VM takes it, or makes one on the spot when there is
//! none. At most one spare exists, and none while a VM does.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{Kvm, VmFd};

/// A VM being made (or made) in the background.
#[derive(Default)]
pub struct SpareVm {
    pending: Option<JoinHandle<Result<VmFd, kvm_ioctls::Error>>>,
}

impl SpareVm {
    /// Starts making a spare unless one is on its way.
    pub fn prepare(&mut self, kvm: &Arc<Kvm>) {
        if self.pending.is_some() {
            return;
        }
        let kvm = kvm.clone();
        let spawned = std::thread::Builder::new()
            .name("kite-spare-vm".into())
            .spawn(move || kvm.create_vm());
        match spawned {
            Ok(handle) => self.pending = Some(handle),
            // Not fatal: VMs are then made when needed.
            Err(e) => log::debug!("no spare VM: cannot start its thread: {e}"),
        }
    }

    /// The spare, waiting for it if it is still being made, or a new VM.
    pub fn take(&mut self, kvm: &Kvm) -> Result<VmFd, kvm_ioctls::Error> {
        match self.pending.take().map(JoinHandle::join) {
            Some(Ok(Ok(fd))) => Ok(fd),
            Some(Ok(Err(e))) => {
                log::debug!("the spare VM failed ({e}); making one now");
                kvm.create_vm()
            }
            Some(Err(_)) => {
                log::warn!("the spare VM's thread panicked; making a VM now");
                kvm.create_vm()
            }
            None => kvm.create_vm(),
        }
    }
}
