//! kite's VMM: the control loop that owns the VM, the VM itself (KVM, guest
//! memory, devices, vCPU threads) and the boot code.
//!
//! Embedders drive it through [`Vmm`]; the kite binary and its HTTP server
//! send the very same commands.

pub mod acpi;
pub mod boot;
pub mod coalesced_pio;
pub mod console;
pub mod control;
pub mod device_manager;
pub mod host;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod prefault;
pub mod spare_vm;
pub mod vcpu;
pub mod vm;
pub mod x86;

use std::sync::Arc;
use std::thread::JoinHandle;

use api::config::VmConfig;
use api::{ApiAction, ApiError, ApiResponse, ApiSender, VmInfo};
use vmm_sys_util::eventfd::EventFd;

pub use control::VmmExit;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("cannot set up the control loop's event polling: {0}")]
    Epoll(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot start the control loop thread: {0}")]
    Thread(std::io::Error),
    #[error("the control loop panicked")]
    Panicked,
}

/// A running VMM: a control-loop thread and the channel to it.
pub struct Vmm {
    sender: ApiSender,
    thread: JoinHandle<VmmExit>,
}

impl Vmm {
    /// Starts the control loop. With `exit_with_guest`, the loop ends when the
    /// guest powers off or fails (the CLI without an API socket).
    pub fn start(exit_with_guest: bool) -> Result<Vmm, VmmError> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Epoll)?);
        let (sender, rx) = ApiSender::channel(wake.clone());
        let control = control::ControlLoop::new(rx, wake, exit_with_guest)?;
        let thread = std::thread::Builder::new()
            .name("kite-vmm".into())
            .spawn(move || control.run())
            .map_err(VmmError::Thread)?;
        Ok(Vmm { sender, thread })
    }

    /// The command channel, e.g. for the HTTP server.
    pub fn sender(&self) -> ApiSender {
        self.sender.clone()
    }

    fn empty(&self, action: ApiAction) -> Result<(), ApiError> {
        self.sender.send(action).map(|_| ())
    }

    pub fn create(&self, config: VmConfig) -> Result<(), ApiError> {
        self.empty(ApiAction::VmCreate(Box::new(config)))
    }

    pub fn boot(&self) -> Result<(), ApiError> {
        self.empty(ApiAction::VmBoot)
    }

    pub fn pause(&self) -> Result<(), ApiError> {
        self.empty(ApiAction::VmPause)
    }

    pub fn resume(&self) -> Result<(), ApiError> {
        self.empty(ApiAction::VmResume)
    }

    /// Shuts the VM down (the VMM keeps running).
    pub fn shutdown(&self) -> Result<(), ApiError> {
        self.empty(ApiAction::VmShutdown)
    }

    pub fn info(&self) -> Result<VmInfo, ApiError> {
        match self.sender.send(ApiAction::VmInfo)? {
            ApiResponse::Info(info) => Ok(*info),
            other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Waits for the control loop to end and says why it did.
    pub fn wait(self) -> Result<VmmExit, VmmError> {
        self.thread.join().map_err(|_| VmmError::Panicked)
    }

    /// Ends the VMM (and the VM with it) and waits for it.
    pub fn stop(self) -> Result<VmmExit, VmmError> {
        // If the loop is already gone, waiting is all there is to do.
        let _ = self.sender.send(ApiAction::VmmShutdown);
        self.wait()
    }
}
