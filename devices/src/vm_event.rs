//! Events that end or restart the VM, raised by devices and vCPU threads and
//! handled by the control loop.

use std::sync::Arc;

use crossbeam_channel::Sender;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042).
    Reset,
    /// A vCPU hit something it cannot go on from (triple fault, emulation
    /// failure, unhandled exit); the text says what.
    Failed(String),
}

/// Sends [`VmEvent`]s to the control loop and wakes it.
#[derive(Clone)]
pub struct VmEventSender {
    tx: Sender<VmEvent>,
    wake: Arc<EventFd>,
}

impl VmEventSender {
    pub fn new(tx: Sender<VmEvent>, wake: Arc<EventFd>) -> Self {
        VmEventSender { tx, wake }
    }

    pub fn send(&self, event: VmEvent) {
        log::debug!("vm event: {event:?}");
        // The control loop outlives every VM; if it is gone the process is exiting.
        if self.tx.send(event).is_ok() {
            if let Err(e) = self.wake.write(1) {
                log::error!("cannot wake the control loop: {e}");
            }
        }
    }
}
