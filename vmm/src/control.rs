//! The control loop: the one thread that owns the VM. It waits (epoll) on the
//! API command channel, on VM events from devices and vCPUs, and on stdin when
//! the serial console is the terminal, and does what each asks.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use api::config::{ConsoleConfig, ConsoleMode, VmConfig};
use api::{
    ApiAction, ApiError, ApiReply, ApiRequest, ApiResponse, VmInfo, VmState, VmmPingResponse,
};
use block::DiskImage;
use crossbeam_channel::Receiver;
use devices::{VmEvent, VmEventSender};
use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::console::{Consoles, RawTerminal};
use crate::spare_vm::SpareVm;
use crate::vm::{HostEnds, Vm, VmError};
use crate::VmmError;

const TOKEN_API: u64 = 0;
const TOKEN_VM_EVENT: u64 = 1;
const TOKEN_STDIN: u64 = 2;

/// Why the control loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmExit {
    /// `vmm.shutdown`, or the command channel closed.
    Shutdown,
    /// The guest powered off and no API is serving (CLI mode).
    GuestPoweredOff,
    /// The guest failed and no API is serving (CLI mode).
    GuestFailed(String),
}

/// The created VM: its config, its console, and the running machine if any.
struct Instance {
    config: VmConfig,
    state: VmState,
    /// Opened (their files created or emptied) by the first build, then
    /// kept: a rebooted guest writes on where it left off.
    consoles: Option<Consoles>,
    /// Disk images `vm.create` opened (and locked), for the first build.
    disks: Vec<Box<dyn DiskImage>>,
    vm: Option<Vm>,
    /// Building the machine ahead of `vm.boot` failed; `vm.boot` tries again.
    build_failed: bool,
}

/// Builds VMs on KVM, from a spare core when there is one.
struct VmBuilder {
    kvm: Arc<Kvm>,
    /// What KVM supports, read once per process at the first build: it takes
    /// KVM half a millisecond, which the API socket need not wait for.
    cpuid: Option<CpuId>,
    spare: SpareVm,
    /// Memory size of the last VM built: the likely size of the next.
    last_size: u64,
    events: VmEventSender,
}

impl VmBuilder {
    fn build(&mut self, inst: &mut Instance) -> Result<Vm, VmError> {
        let cpuid = match &mut self.cpuid {
            Some(cpuid) => cpuid,
            none => none.insert(crate::x86::cpuid::supported_cpuid(&self.kvm)?),
        };
        let size = inst.config.memory.size;
        let core = self.spare.take(&self.kvm, size)?;
        self.last_size = size;
        let consoles = match &mut inst.consoles {
            Some(consoles) => consoles,
            first => first.insert(Consoles::open(&inst.config.serial, &inst.config.console)?),
        };
        let host = HostEnds {
            consoles,
            disks: std::mem::take(&mut inst.disks),
        };
        Vm::new(core, cpuid, &inst.config, host, self.events.clone())
    }
}

pub struct ControlLoop {
    builder: VmBuilder,
    epoll: Epoll,
    api_rx: Receiver<ApiRequest>,
    api_wake: Arc<EventFd>,
    event_rx: Receiver<VmEvent>,
    event_wake: Arc<EventFd>,
    instance: Option<Instance>,
    /// In CLI mode (no API) the process ends with the guest.
    exit_with_guest: bool,
    stdin_registered: bool,
    _raw_terminal: Option<RawTerminal>,
}

impl ControlLoop {
    pub fn new(
        api_rx: Receiver<ApiRequest>,
        api_wake: Arc<EventFd>,
        exit_with_guest: bool,
    ) -> Result<ControlLoop, VmmError> {
        let kvm = Arc::new(Kvm::new().map_err(VmmError::Kvm)?);
        crate::vcpu::register_kick_signal().map_err(VmmError::Signal)?;
        let epoll = Epoll::new().map_err(VmmError::Epoll)?;
        let event_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Epoll)?);
        let (tx, event_rx) = crossbeam_channel::unbounded();
        let events = VmEventSender::new(tx, event_wake.clone());
        for (fd, token) in [
            (api_wake.as_raw_fd(), TOKEN_API),
            (event_wake.as_raw_fd(), TOKEN_VM_EVENT),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VmmError::Epoll)?;
        }
        Ok(ControlLoop {
            builder: VmBuilder {
                kvm,
                cpuid: None,
                spare: SpareVm::default(),
                last_size: api::config::DEFAULT_MEMORY_SIZE,
                events,
            },
            epoll,
            api_rx,
            api_wake,
            event_rx,
            event_wake,
            instance: None,
            exit_with_guest,
            stdin_registered: false,
            _raw_terminal: None,
        })
    }

    pub fn run(mut self) -> VmmExit {
        let mut ready = [EpollEvent::default(); 4];
        loop {
            self.prepare_spare();
            let n = match self.epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("epoll failed: {e}");
                    return VmmExit::Shutdown;
                }
            };
            for ev in &ready[..n] {
                let exit = match ev.data() {
                    TOKEN_API => self.handle_api(),
                    TOKEN_VM_EVENT => self.handle_vm_events(),
                    TOKEN_STDIN => {
                        self.handle_stdin();
                        None
                    }
                    _ => None,
                };
                if let Some(exit) = exit {
                    self.teardown();
                    return exit;
                }
            }
        }
    }

    fn teardown(&mut self) {
        if let Some(inst) = self.instance.take() {
            if let Some(vm) = inst.vm {
                vm.dispose();
            }
        }
    }

    fn handle_api(&mut self) -> Option<VmmExit> {
        let _ = self.api_wake.read();
        while let Ok(req) = self.api_rx.try_recv() {
            let shutdown = matches!(req.action, ApiAction::VmmShutdown);
            log::debug!("API request: {:?}", req.action);
            let reply = self.dispatch(req.action);
            if let Err(e) = &reply {
                log::warn!("API request failed: {e}");
            }
            // The client may have gone away; that is not the VMM's problem.
            let _ = req.reply.send(reply);
            self.build_ahead();
            if shutdown {
                return Some(VmmExit::Shutdown);
            }
        }
        None
    }

    fn dispatch(&mut self, action: ApiAction) -> ApiReply {
        match action {
            ApiAction::VmmPing => Ok(ApiResponse::Ping(VmmPingResponse {
                build_version: env!("CARGO_PKG_VERSION").into(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: i64::from(std::process::id()),
                features: vec!["kvm".into()],
            })),
            ApiAction::VmmShutdown => {
                self.teardown();
                Ok(ApiResponse::Empty)
            }
            ApiAction::VmCreate(config) => self.create(*config),
            ApiAction::VmBoot => self.boot(),
            ApiAction::VmInfo => {
                let inst = self.instance.as_ref().ok_or(ApiError::VmNotCreated)?;
                let device_tree = inst
                    .vm
                    .as_ref()
                    .map(|vm| vm.devices().device_tree())
                    .unwrap_or_default();
                Ok(ApiResponse::Info(Box::new(VmInfo {
                    config: inst.config.clone(),
                    state: inst.state,
                    memory_actual_size: inst.config.memory.size,
                    device_tree,
                })))
            }
            ApiAction::VmCounters => {
                let inst = self.instance.as_ref().ok_or(ApiError::VmNotCreated)?;
                let counters = inst
                    .vm
                    .as_ref()
                    .map(|vm| vm.devices().counters())
                    .unwrap_or_default();
                Ok(ApiResponse::Counters(counters))
            }
            ApiAction::VmPause => {
                let inst = instance_in(&mut self.instance, "pause", &[VmState::Running])?;
                if let Some(vm) = &inst.vm {
                    vm.pause();
                }
                inst.state = VmState::Paused;
                Ok(ApiResponse::Empty)
            }
            ApiAction::VmResume => {
                let inst = instance_in(&mut self.instance, "resume", &[VmState::Paused])?;
                if let Some(vm) = inst.vm.as_mut() {
                    // A guest reset while paused leaves a fresh VM not started yet.
                    if vm.started() {
                        vm.resume();
                    } else {
                        vm.start().map_err(vm_api_error)?;
                    }
                }
                inst.state = VmState::Running;
                Ok(ApiResponse::Empty)
            }
            ApiAction::VmShutdown => {
                instance_in(
                    &mut self.instance,
                    "shut down",
                    &[VmState::Running, VmState::Paused],
                )?;
                self.stop_vm();
                Ok(ApiResponse::Empty)
            }
            ApiAction::VmReboot => {
                instance_in(
                    &mut self.instance,
                    "reboot",
                    &[VmState::Running, VmState::Paused],
                )?;
                self.reboot(false).map_err(vm_api_error)?;
                Ok(ApiResponse::Empty)
            }
            ApiAction::VmPowerButton => {
                let inst = instance_in(
                    &mut self.instance,
                    "press the power button of",
                    // A paused guest sees the press when it runs again.
                    &[VmState::Running, VmState::Paused],
                )?;
                if let Some(vm) = &inst.vm {
                    vm.power_button()
                        .map_err(|e| ApiError::Internal(format!("power button: {e}")))?;
                }
                Ok(ApiResponse::Empty)
            }
            ApiAction::VmDelete => {
                self.teardown();
                self.drain_vm_events();
                Ok(ApiResponse::Empty)
            }
        }
    }

    fn create(&mut self, mut config: VmConfig) -> ApiReply {
        if self.instance.is_some() {
            return Err(ApiError::VmAlreadyCreated);
        }
        // A NIC keeps its MAC across reboots, and vm.info shows it.
        for net in &mut config.net {
            net.mac
                .get_or_insert_with(|| api::config::MacAddr(virtio_devices::net::random_mac()));
        }
        config
            .validate()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        config.name_devices();
        crate::host::check_fits(&config).map_err(ApiError::BadRequest)?;
        let disks = Vm::prepare(&config).map_err(vm_api_error)?;
        Consoles::check(&config.serial, &config.console)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let tty = |c: &ConsoleConfig| c.mode == ConsoleMode::Tty;
        if tty(&config.serial) || tty(&config.console) {
            self.attach_terminal(tty(&config.serial));
        }
        self.instance = Some(Instance {
            config,
            state: VmState::Created,
            consoles: None,
            disks,
            vm: None,
            build_failed: false,
        });
        Ok(ApiResponse::Empty)
    }

    /// Builds the machine of a VM just created, once `vm.create` has been
    /// answered: the client need not wait for KVM, and the `vm.boot` that
    /// usually follows finds the machine ready. A build that fails here is
    /// tried again by `vm.boot`, which reports the error.
    fn build_ahead(&mut self) {
        let Some(inst) = self.instance.as_mut() else {
            return;
        };
        if inst.state != VmState::Created || inst.vm.is_some() || inst.build_failed {
            return;
        }
        // The HTTP thread, just woken with the answer, may share this core:
        // let it pass the answer on before the build takes the core.
        std::thread::yield_now();
        match self.builder.build(inst) {
            Ok(vm) => inst.vm = Some(vm),
            Err(e) => {
                log::warn!("cannot build the VM (vm.boot will say why): {e}");
                inst.build_failed = true;
            }
        }
    }

    fn boot(&mut self) -> ApiReply {
        let inst = instance_in(
            &mut self.instance,
            "boot",
            &[VmState::Created, VmState::Shutdown],
        )?;
        if inst.vm.is_none() {
            // Not built ahead (that failed, or vm.boot came first), or
            // booting again after a shutdown: build the machine now.
            let vm = self.builder.build(inst);
            inst.vm = Some(vm.map_err(vm_api_error)?);
        }
        if let Some(vm) = inst.vm.as_mut() {
            vm.start().map_err(vm_api_error)?;
        }
        inst.state = VmState::Running;
        log::info!("VM booted");
        Ok(ApiResponse::Empty)
    }

    /// Stops the running VM and frees it; the config stays for another boot.
    fn stop_vm(&mut self) {
        if let Some(inst) = self.instance.as_mut() {
            let vm = inst.vm.take();
            inst.state = VmState::Shutdown;
            // The next VM's core is made while this one is taken apart.
            self.prepare_spare();
            if let Some(vm) = vm {
                vm.dispose();
            }
        }
        // Events the stopped VM raised on its way down no longer apply.
        self.drain_vm_events();
    }

    /// Replaces the machine with a fresh one and starts it. With
    /// `keep_paused`, a paused VM stays paused and the new machine starts on
    /// `vm.resume`: a guest reset that raced with `vm.pause` must not resume it.
    fn reboot(&mut self, keep_paused: bool) -> Result<(), VmError> {
        let Some(paused) = self
            .instance
            .as_ref()
            .map(|i| keep_paused && i.state == VmState::Paused)
        else {
            return Ok(());
        };
        self.stop_vm();
        let Some(inst) = self.instance.as_mut() else {
            return Ok(());
        };
        let mut vm = self.builder.build(inst)?;
        if !paused {
            vm.start()?;
        }
        inst.vm = Some(vm);
        inst.state = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        log::info!("VM rebooted");
        Ok(())
    }

    fn drain_vm_events(&mut self) {
        let _ = self.event_wake.read();
        while self.event_rx.try_recv().is_ok() {}
    }

    fn handle_vm_events(&mut self) -> Option<VmmExit> {
        let _ = self.event_wake.read();
        while let Ok(event) = self.event_rx.try_recv() {
            match event {
                VmEvent::PowerOff => {
                    self.stop_vm();
                    log::info!("guest powered off");
                    if self.exit_with_guest {
                        return Some(VmmExit::GuestPoweredOff);
                    }
                }
                VmEvent::Reset => {
                    if let Err(e) = self.reboot(true) {
                        log::error!("guest reset failed: {e}");
                        self.stop_vm();
                        if self.exit_with_guest {
                            return Some(VmmExit::GuestFailed(format!("reboot failed: {e}")));
                        }
                    }
                }
                VmEvent::Failed(why) => {
                    self.stop_vm();
                    log::error!("guest failed: {why}; the VM is shut down");
                    if self.exit_with_guest {
                        return Some(VmmExit::GuestFailed(why));
                    }
                }
            }
        }
        None
    }

    /// Starts making a spare core for the next VM, sized like the last one,
    /// when there is no VM to compete with (making one slows a booting
    /// guest) and the VMM is not about to exit with its guest.
    fn prepare_spare(&mut self) {
        let live_vm = self.instance.as_ref().is_some_and(|i| i.vm.is_some());
        if !self.exit_with_guest && !live_vm {
            let b = &mut self.builder;
            b.spare.prepare(&b.kvm, b.last_size);
        }
    }

    /// Puts the terminal in raw mode for a tty console; COM1 reads stdin
    /// here, virtio-console on its own device thread.
    fn attach_terminal(&mut self, serial_input: bool) {
        if self._raw_terminal.is_none() {
            self._raw_terminal = RawTerminal::enable();
        }
        if self.stdin_registered || !serial_input {
            return;
        }
        let fd = std::io::stdin().as_raw_fd();
        match self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, TOKEN_STDIN),
        ) {
            Ok(()) => self.stdin_registered = true,
            // A regular file or /dev/null cannot be polled: no serial input then.
            Err(e) => log::debug!("stdin not pollable, no serial input: {e}"),
        }
    }

    fn handle_stdin(&mut self) {
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                let fd = std::io::stdin().as_raw_fd();
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                self.stdin_registered = false;
            }
            Ok(n) => {
                if let Some(vm) = self.instance.as_ref().and_then(|i| i.vm.as_ref()) {
                    vm.serial_input(&buf[..n]);
                }
            }
        }
    }
}

fn vm_api_error(e: VmError) -> ApiError {
    if e.is_client_error() {
        ApiError::BadRequest(e.to_string())
    } else {
        ApiError::Internal(e.to_string())
    }
}

/// The instance, if its state is one of `allowed` (404 or 405 otherwise).
fn instance_in<'a>(
    instance: &'a mut Option<Instance>,
    action: &'static str,
    allowed: &[VmState],
) -> Result<&'a mut Instance, ApiError> {
    let inst = instance.as_mut().ok_or(ApiError::VmNotCreated)?;
    if !allowed.contains(&inst.state) {
        return Err(ApiError::InvalidState {
            action,
            state: inst.state,
        });
    }
    Ok(inst)
}
