//! One virtual machine: the KVM VM with its interrupt controllers, guest
//! memory, the platform devices on their buses, the loaded payload and the
//! vCPUs. Built whole by [`Vm::new`], then started, paused and stopped.

use std::sync::Arc;

use api::config::VmConfig;
use block::DiskImage;
use devices::VmEventSender;
use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use virtio_devices::pci::root::PCI_CONFIG_ADDRESS_PORT;

use crate::boot::{self, BootError, Payload};
use crate::coalesced_pio::CoalescedPio;
use crate::console::{ConsoleError, Consoles};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::prefault::Prefault;
use crate::vcpu::VcpuThreads;
use crate::x86::{self, CpuError};

/// Intel VT needs these two pages for real-mode emulation; keep them out of RAM.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error(transparent)]
    Mptable(#[from] crate::mptable::MptableError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error("cannot open a console's output: {0}")]
    ConsoleOutput(std::io::Error),
    #[error("cannot start vCPU threads: {0}")]
    Threads(std::io::Error),
    #[error("the VM has no kernel to boot")]
    NoKernel,
}

impl VmError {
    /// True when the request (not the host) is at fault: a bad kernel,
    /// initramfs or command line.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            VmError::Boot(_)
                | VmError::NoKernel
                | VmError::Console(_)
                | VmError::Devices(DeviceError::Config(_))
        )
    }
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

enum Threads {
    /// Built, not started yet.
    Ready(Vec<VcpuFd>),
    /// Started; dropping them stops and joins the threads.
    Running(VcpuThreads),
    Stopped,
}

pub struct Vm {
    // Field order is drop order: vCPU threads stop first, memory goes before
    // the VM fd.
    threads: Threads,
    _prefault: Prefault,
    coalesced: Option<Arc<CoalescedPio>>,
    devices: DeviceManager,
    events: VmEventSender,
    memory: GuestMemoryMmap,
    fd: Arc<VmFd>,
}

/// The part of a VM that depends on nothing but its memory size: the KVM VM
/// with guest memory registered, the in-kernel irqchip, vCPU 0 and the ring
/// of queued port writes. It is most of the cost of building a VM on KVM, so
/// [`crate::spare_vm::SpareVm`] makes one ahead of time.
pub struct VmCore {
    // Field order is drop order: the vCPU and memory go before the VM fd.
    vcpu0: VcpuFd,
    coalesced: Option<CoalescedPio>,
    memory: GuestMemoryMmap,
    fd: VmFd,
}

/// The host ends of a VM's devices: its consoles, and the disk images
/// `vm.create` opened (none for a later build, which opens them again).
pub struct HostEnds<'a> {
    pub consoles: &'a Consoles,
    pub disks: Vec<Box<dyn DiskImage>>,
}

impl VmCore {
    pub fn new(kvm: &Kvm, memory_size: u64) -> Result<VmCore, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("create the KVM VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set the identity map address"))?;
        // Memory slots first: once an in-kernel irqchip exists, every slot
        // change waits for an SRCU grace period (about 5 ms here).
        let memory = memory::create_guest_memory(memory_size, true)?;
        memory::register_with_kvm(&fd, &memory)?;
        // In-kernel PIC, I/O APIC and local APICs. No in-kernel PIT: the
        // platform is ACPI hardware-reduced, so guests use the local APIC
        // timer, and KVM takes ~13 ms to tear a PIT down.
        fd.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let vcpu0 = fd.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
        let coalesced = CoalescedPio::new(&fd, &vcpu0, PCI_CONFIG_ADDRESS_PORT as u16, 4)?;
        Ok(VmCore {
            vcpu0,
            coalesced,
            memory,
            fd,
        })
    }

    #[cfg(test)]
    pub fn memory_size(&self) -> u64 {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.memory.iter().map(|r| r.len()).sum()
    }
}

fn payload(config: &VmConfig) -> Result<Payload<'_>, VmError> {
    Ok(Payload {
        kernel: config.payload.kernel.as_deref().ok_or(VmError::NoKernel)?,
        initramfs: config.payload.initramfs.as_deref(),
        cmdline: config.payload.cmdline.as_deref().unwrap_or(""),
    })
}

/// Drops `vm` (a KVM VM, or what will yield one) on a thread of its own:
/// KVM takes milliseconds to tear a VM down, which nobody need wait for.
pub(crate) fn close_in_background<T: Send + 'static>(vm: T) {
    let spawned = std::thread::Builder::new()
        .name("kite-vm-close".into())
        .spawn(move || drop(vm));
    if let Err(e) = spawned {
        log::warn!("closed a KVM VM in the foreground: {e}");
    }
}

impl Vm {
    /// Builds the whole VM from `config` on `core`, made for the config's
    /// memory size. `cpuid` is what KVM supports (read once per process);
    pub fn new(
        core: VmCore,
        cpuid: &CpuId,
        config: &VmConfig,
        host: HostEnds,
        events: VmEventSender,
    ) -> Result<Vm, VmError> {
        let VmCore {
            vcpu0,
            coalesced,
            memory,
            fd,
        } = core;
        let fd = Arc::new(fd);
        let parts = Self::build(&fd, &memory, vcpu0, cpuid, config, host, &events);
        let (vcpus, devices, prefault) = match parts {
            Ok(parts) => parts,
            Err(e) => {
                // A bad kernel or disk must not keep the caller waiting for
                // KVM's teardown of the half-built VM.
                drop(memory);
                close_in_background(fd);
                return Err(e);
            }
        };
        Ok(Vm {
            threads: Threads::Ready(vcpus),
            _prefault: prefault,
            coalesced: coalesced.map(Arc::new),
            devices,
            events,
            memory,
            fd,
        })
    }

    /// What `vm.create` does on the host before it answers, so that most
    /// bad configs are refused there and not at the build: checks the
    /// payload and the entropy source, and opens (and locks) the disk images,
    /// which the first build takes over.
    pub fn prepare(config: &VmConfig) -> Result<Vec<Box<dyn DiskImage>>, VmError> {
        boot::check_payload(&payload(config)?, config.memory.size)?;
        Ok(crate::device_manager::open_backends(config)?)
    }

    /// Adds devices, tables, payload and vCPUs to the KVM VM `fd`.
    fn build(
        fd: &Arc<VmFd>,
        mem: &GuestMemoryMmap,
        vcpu0: VcpuFd,
        cpuid: &CpuId,
        config: &VmConfig,
        host: HostEnds,
        events: &VmEventSender,
    ) -> Result<(Vec<VcpuFd>, DeviceManager, Prefault), VmError> {
        let started = std::time::Instant::now();
        let serial_out = host
            .consoles
            .serial
            .writer()
            .map_err(VmError::ConsoleOutput)?;
        let mut devices = DeviceManager::new(fd.clone(), mem.clone(), serial_out, events)?;
        devices.add_configured(config, &host.consoles.virtio, host.disks)?;

        let cpus = &config.cpus;
        let rsdp = crate::acpi::create_acpi_tables(mem, cpus.boot_vcpus, cpus.max_vcpus)?;
        crate::mptable::write_mptable(mem, cpus.boot_vcpus)?;
        let (entry, prefault) = boot::load_payload(mem, &payload(config)?, rsdp)?;

        let mut vcpus = Vec::with_capacity(usize::from(cpus.boot_vcpus));
        vcpus.push(vcpu0);
        for id in 1..cpus.boot_vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            vcpus.push(vcpu);
        }
        for (id, vcpu) in (0..).zip(&vcpus) {
            x86::cpuid::set_cpuid(vcpu, cpuid, id, cpus.boot_vcpus)?;
            x86::regs::setup_common(vcpu, id)?;
            if id == 0 {
                x86::regs::setup_boot_vcpu(vcpu, mem, entry)?;
            }
        }
        log::info!(
            "VM built in {:?}: {} vCPUs, {} MiB, entry {entry:?}",
            started.elapsed(),
            cpus.boot_vcpus,
            config.memory.size >> 20
        );
        Ok((vcpus, devices, prefault))
    }

    /// Starts the vCPU threads; the guest runs from here on.
    pub fn start(&mut self) -> Result<(), VmError> {
        if let Threads::Ready(vcpus) = std::mem::replace(&mut self.threads, Threads::Stopped) {
            let threads = VcpuThreads::start(
                vcpus,
                self.coalesced.clone(),
                self.devices.pio.clone(),
                self.devices.mmio.clone(),
                self.events.clone(),
            )
            .map_err(VmError::Threads)?;
            self.threads = Threads::Running(threads);
        }
        Ok(())
    }

    /// Whether the vCPU threads were ever started.
    pub fn started(&self) -> bool {
        !matches!(self.threads, Threads::Ready(_))
    }

    pub fn pause(&self) {
        if let Threads::Running(t) = &self.threads {
            t.pause();
        }
    }

    pub fn resume(&self) {
        if let Threads::Running(t) = &self.threads {
            t.resume();
        }
    }

    /// Stops the vCPUs and frees guest memory now; the KVM VM itself, which
    /// takes KVM 10-30 ms to tear down, is closed in the background.
    pub fn dispose(self) {
        let Vm {
            threads,
            _prefault,
            coalesced,
            devices,
            events,
            memory,
            fd,
        } = self;
        drop((threads, _prefault, coalesced, devices, events, memory));
        close_in_background(fd);
    }

    /// Presses the ACPI power button.
    pub fn power_button(&self) -> std::io::Result<()> {
        self.devices.power_button()
    }

    /// Gives host input to the guest's serial port.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.devices.serial_input(bytes)
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }
}
