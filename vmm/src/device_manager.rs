//! Creates and owns a VM's devices: the legacy PC devices on the port and
//! MMIO buses, the PCI root, and the virtio devices behind it. It also wires
//! them to KVM (irq lines, irqfds, ioeventfds, MSI routes).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use api::config::{DiskConfig, ImageType, VmConfig};
use api::DeviceNode;
use block::DiskImage;
use devices::acpi_pm::{AcpiSleep, ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_LEN};
use devices::bus::lock;
use devices::cmos::{Cmos, CMOS_PORT, CMOS_PORT_LEN};
use devices::ged::{Ged, GED_MMIO_LEN, GED_POWER_BUTTON};
use devices::i8042::{I8042, I8042_DATA_PORT};
use devices::serial::{IrqTrigger, Serial, SerialOutput, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use devices::{Bus, BusDevice, BusError, VmEventSender};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_devices::net::{random_mac, HostConfig, Net, Offloads, Tap};
use virtio_devices::pci::root::{
    PciConfigIo, PciConfigMmio, ECAM_BUS0_SIZE, PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_PORTS_LEN,
};
use virtio_devices::pci::{PciRoot, PciRootError};
use virtio_devices::transport::pci::BAR_SIZE;
use virtio_devices::transport::{IoEventRegistrar, VirtioPciDevice};
use virtio_devices::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleSink;
use crate::interrupts::KvmMsiRouter;
use crate::layout::{
    GED_IRQ, GED_MMIO_START, PCI_MMCONFIG_START, PCI_MMIO32_END, PCI_MMIO32_START,
};
use crate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot place {device} on the bus: {source}")]
    Bus {
        device: &'static str,
        source: BusError,
    },
    #[error("cannot wire {device} to KVM: {source}")]
    Kvm {
        device: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pci(#[from] PciRootError),
    #[error("no room left in the PCI MMIO window for {0}")]
    NoMmioSpace(String),
    /// The configuration asks for something that cannot be had (a missing
    /// disk image, a locked one, an unreadable entropy source): the client's
    /// to fix.
    #[error("{0}")]
    Config(String),
}

/// Registers ioeventfds on the VM.
struct KvmIoEvents(Arc<VmFd>);

impl IoEventRegistrar for KvmIoEvents {
    fn register(&self, evt: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(std::io::Error::other)
    }

    fn unregister(&self, evt: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(std::io::Error::other)
    }
}

/// A virtio device on the PCI bus.
struct VirtioSlot {
    id: String,
    slot: usize,
    device: Arc<Mutex<VirtioPciDevice>>,
}

pub struct DeviceManager {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    serial: Option<Arc<Mutex<Serial>>>,
    ged: Arc<Mutex<Ged>>,
    pci: Arc<Mutex<PciRoot>>,
    virtio: Vec<VirtioSlot>,
    fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    msi: Arc<KvmMsiRouter>,
    next_bar: u64,
}

impl DeviceManager {
    /// The platform devices every VM has. `serial_out` None means no COM1.
    pub fn new(
        fd: Arc<VmFd>,
        mem: GuestMemoryMmap,
        serial_out: Option<SerialOutput>,
        events: &VmEventSender,
    ) -> Result<DeviceManager, DeviceError> {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial = match serial_out {
            Some(out) => {
                let line = fd.clone();
                let irq = IrqTrigger(Box::new(move || pulse_irq_line(&line, COM1_IRQ)));
                let serial = Arc::new(Mutex::new(Serial::new(irq, out)));
                insert(&pio, serial.clone(), COM1_PORT, COM1_PORT_LEN, "COM1")?;
                Some(serial)
            }
            None => None,
        };
        insert(
            &pio,
            Arc::new(Mutex::new(I8042::new(events.clone()))),
            I8042_DATA_PORT,
            5,
            "i8042",
        )?;
        insert(
            &pio,
            Arc::new(Mutex::new(Cmos::default())),
            CMOS_PORT,
            CMOS_PORT_LEN,
            "CMOS",
        )?;
        insert(
            &pio,
            Arc::new(Mutex::new(AcpiSleep::new(events.clone()))),
            ACPI_SLEEP_PORT,
            ACPI_SLEEP_PORT_LEN,
            "ACPI sleep/reset",
        )?;
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK)
            .and_then(|e| {
                fd.register_irqfd(&e, GED_IRQ)
                    .map_err(std::io::Error::other)
                    .map(|()| e)
            })
            .map_err(|source| DeviceError::Kvm {
                device: "GED".into(),
                source,
            })?;
        let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
        insert(&mmio, ged.clone(), GED_MMIO_START, GED_MMIO_LEN, "GED")?;

        let pci = Arc::new(Mutex::new(PciRoot::new(&mmio)));
        insert(
            &pio,
            Arc::new(Mutex::new(PciConfigIo(pci.clone()))),
            PCI_CONFIG_ADDRESS_PORT,
            PCI_CONFIG_PORTS_LEN,
            "PCI config ports",
        )?;
        insert(
            &mmio,
            Arc::new(Mutex::new(PciConfigMmio(pci.clone()))),
            PCI_MMCONFIG_START,
            ECAM_BUS0_SIZE,
            "PCI ECAM",
        )?;
        Ok(DeviceManager {
            pio,
            mmio,
            serial,
            ged,
            pci,
            virtio: Vec::new(),
            msi: Arc::new(KvmMsiRouter::new(fd.clone())),
            fd,
            mem,
            next_bar: PCI_MMIO32_START,
        })
    }

    /// Adds the virtio devices `config` asks for; `console` is where the
    /// virtio-console writes (off: no device); `opened` are the disk images
    /// already open, in order (the others are opened here).
    pub fn add_configured(
        &mut self,
        config: &VmConfig,
        console: &ConsoleSink,
        opened: Vec<Box<dyn DiskImage>>,
    ) -> Result<(), DeviceError> {
        let mut opened = opened.into_iter();
        // vm.create names every device (VmConfig::name_devices).
        let named = |id: &Option<String>, what: &str| {
            id.clone()
                .ok_or_else(|| DeviceError::Config(format!("a {what} has no id")))
        };
        for disk in &config.disks {
            let id = named(&disk.id, "disk")?;
            let image = match opened.next() {
                Some(image) => image,
                None => open_disk(disk)?,
            };
            let serial = disk.serial.clone().unwrap_or_else(|| id.clone());
            let dev = virtio_devices::block::Block::new(
                id.clone(),
                image,
                disk.readonly,
                disk.num_queues,
                disk.queue_size,
                serial,
            )
            .map_err(|e| DeviceError::Config(e.to_string()))?;
            self.add_virtio(id, Box::new(dev))?;
        }
        for net in &config.net {
            let id = named(&net.id, "NIC")?;
            let config_err = |e: &dyn std::fmt::Display| DeviceError::Config(format!("{id}: {e}"));
            let taps = match &net.fds {
                Some(fds) => Tap::from_fds(fds, net.mtu),
                None => Tap::open_or_create(
                    net.tap.as_deref(),
                    &HostConfig {
                        ip: net.ip,
                        netmask: net.mask,
                        mac: net.host_mac.map(|m| m.0),
                        mtu: net.mtu,
                    },
                    net.queue_pairs(),
                ),
            }
            .map_err(|e| config_err(&e))?;
            // vm.create gives every device a MAC; a random one is a fallback.
            let mac = net.mac.map(|m| m.0).unwrap_or_else(random_mac);
            let offloads = Offloads {
                csum: net.offload_csum,
                tso: net.offload_tso,
                ufo: net.offload_ufo,
            };
            let dev = Net::new(id.clone(), taps, mac, net.mtu, offloads, net.queue_size)
                .map_err(|e| config_err(&e))?;
            self.add_virtio(id, Box::new(dev))?;
        }
        let rng = virtio_devices::rng::Rng::new(config.rng.src.clone())
            .map_err(|e| rng_error(&config.rng.src, e))?;
        let rng_id = config.rng.id.clone().unwrap_or_else(|| "__rng".into());
        self.add_virtio(rng_id, Box::new(rng))?;
        let console_io = console.writer().and_then(|out| Ok((out, console.input()?)));
        match console_io {
            Ok((Some(out), input)) => {
                let dev = virtio_devices::console::Console::new(out, input);
                self.add_virtio("__console".into(), Box::new(dev))?;
            }
            Ok((None, _)) => {}
            Err(e) => return Err(DeviceError::Config(format!("virtio-console: {e}"))),
        }
        Ok(())
    }

    /// Puts a virtio device on the PCI bus.
    pub fn add_virtio(
        &mut self,
        id: String,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceError> {
        let bar = self.next_bar;
        if bar + BAR_SIZE > PCI_MMIO32_END {
            return Err(DeviceError::NoMmioSpace(id));
        }
        self.next_bar += BAR_SIZE;
        let kvm_err = |source| DeviceError::Kvm {
            device: id.clone(),
            source,
        };
        let pci_device = VirtioPciDevice::new(
            id.clone(),
            device,
            bar,
            self.mem.clone(),
            self.msi.clone(),
            Arc::new(KvmIoEvents(self.fd.clone())),
        )
        .map_err(kvm_err)?;
        let device = Arc::new(Mutex::new(pci_device));
        let slot = lock(&self.pci).add(device.clone())?;
        log::info!("{id}: PCI 0000:00:{slot:02x}.0, BAR at {bar:#x}");
        self.virtio.push(VirtioSlot { id, slot, device });
        Ok(())
    }

    pub fn power_button(&self) -> std::io::Result<()> {
        lock(&self.ged).notify(GED_POWER_BUTTON)
    }

    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        match &self.serial {
            Some(s) => lock(s).enqueue_input(bytes),
            None => 0,
        }
    }

    /// Per-device counters, keyed by device id.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.virtio
            .iter()
            .map(|v| (v.id.clone(), lock(&v.device).counters()))
            .collect()
    }

    /// The devices as `vm.info` lists them.
    pub fn device_tree(&self) -> BTreeMap<String, DeviceNode> {
        self.virtio
            .iter()
            .map(|v| (v.id.clone(), DeviceNode::pci(v.id.clone(), v.slot as u8)))
            .collect()
    }
}

/// An edge on ISA interrupt `irq`, injected at once (KVM_IRQ_LINE).
/// Opens `config`'s disk images (checking format and backing chain, taking
/// their locks) and checks that its entropy source opens.
pub fn open_backends(config: &VmConfig) -> Result<Vec<Box<dyn DiskImage>>, DeviceError> {
    let disks = config
        .disks
        .iter()
        .map(open_disk)
        .collect::<Result<_, _>>()?;
    std::fs::File::open(&config.rng.src).map_err(|e| rng_error(&config.rng.src, e))?;
    Ok(disks)
}

fn open_disk(disk: &DiskConfig) -> Result<Box<dyn DiskImage>, DeviceError> {
    let opts = block::OpenOptions {
        readonly: disk.readonly,
        direct: disk.direct,
        format: disk.image_type.map(|t| match t {
            ImageType::Raw => block::ImageFormat::Raw,
            ImageType::Qcow2 => block::ImageFormat::Qcow2,
        }),
    };
    block::open_image(&disk.path, &opts).map_err(|e| DeviceError::Config(e.to_string()))
}

fn rng_error(src: &Path, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Config(format!("entropy source {}: {e}", src.display()))
}

fn pulse_irq_line(fd: &VmFd, irq: u32) -> std::io::Result<()> {
    fd.set_irq_line(irq, true)
        .and_then(|()| fd.set_irq_line(irq, false))
        .map_err(std::io::Error::other)
}

fn insert(
    bus: &Bus,
    device: Arc<Mutex<dyn BusDevice>>,
    base: u64,
    len: u64,
    name: &'static str,
) -> Result<(), DeviceError> {
    bus.insert(device, base, len)
        .map_err(|source| DeviceError::Bus {
            device: name,
            source,
        })
}
