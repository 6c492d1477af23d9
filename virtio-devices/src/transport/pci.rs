//! The virtio 1.x PCI transport ("modern" device): one 64-bit memory BAR
//! holding the common configuration, ISR, device configuration, notification
//! area and the MSI-X table, each announced by a vendor capability.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::BusDevice;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActiveQueue, QueueInterrupt, VirtioDevice};
use crate::log_budget::LogBudget;
use crate::pci::msix::{self, MsiRouter, MsixTable};
use crate::pci::{Bar, PciConfiguration, PciDevice, PciIdentity};
use crate::GuestMemoryMmap;

const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const VIRTIO_PCI_SUBSYSTEM: u16 = 0x40;

/// Layout of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_SIZE: u64 = 0x1000;
/// MSI-X table entries fit in 0x4000-0x5fff.
const MAX_VECTORS: u16 = 512;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;
const NO_VECTOR: u16 = 0xffff;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Registers guest notification addresses with KVM (ioeventfd), so a queue
/// kick wakes the device thread directly.
pub trait IoEventRegistrar: Send + Sync {
    fn register(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
    fn unregister(&self, evt: &EventFd, addr: u64) -> io::Result<()>;
}

/// What the driver configured for one queue.
#[derive(Clone, Copy)]
struct QueueSetup {
    max_size: u16,
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueSetup {
    fn new(max_size: u16) -> Self {
        QueueSetup {
            max_size,
            size: max_size,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// Interrupts of an activated device: its MSI-X table and the vectors the
/// driver chose.
struct PciInterrupt {
    msix: Arc<Mutex<MsixTable>>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    isr: Arc<AtomicU8>,
}

impl PciInterrupt {
    fn raise(&self, vector: u16, isr: u8) {
        self.isr.fetch_or(isr, Ordering::SeqCst);
        if vector != NO_VECTOR {
            lock(&self.msix).trigger(vector);
        }
    }
}

impl QueueInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        let vector = self.queue_vectors.get(usize::from(queue)).copied();
        self.raise(vector.unwrap_or(NO_VECTOR), ISR_QUEUE);
    }

    fn signal_config(&self) {
        self.raise(self.config_vector, ISR_CONFIG);
    }
}

pub struct VirtioPciDevice {
    id: String,
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    bar: Bar,
    msix: Arc<Mutex<MsixTable>>,
    msix_cap: usize,
    ioevents: Arc<dyn IoEventRegistrar>,
    notify: Vec<EventFd>,
    mem: GuestMemoryMmap,
    isr: Arc<AtomicU8>,
    offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueSetup>,
    active: bool,
    warnings: LogBudget,
}

impl VirtioPciDevice {
    /// Wraps `device` with its BAR at `bar_addr` (BAR_SIZE-aligned).
    pub fn new(
        id: String,
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        mem: GuestMemoryMmap,
        router: Arc<dyn MsiRouter>,
        ioevents: Arc<dyn IoEventRegistrar>,
    ) -> io::Result<Self> {
        let max_sizes = device.queue_max_sizes();
        let vectors = (max_sizes.len() + 1).min(usize::from(MAX_VECTORS)) as u16;
        let device_type = device.device_type();
        let (class, subclass) = match device_type {
            1 => (0x02, 0x00), // network controller
            2 => (0x01, 0x80), // mass storage
            3 => (0x07, 0x80), // communication
            _ => (0xff, 0x00),
        };
        let mut config = PciConfiguration::new(PciIdentity {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device_type as u16,
            revision: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: VIRTIO_PCI_SUBSYSTEM,
        });
        config.add_mem64_bar(0, bar_addr, BAR_SIZE);
        for (cfg_type, offset, len) in [
            (CFG_COMMON, COMMON_OFFSET, REGION_SIZE),
            (CFG_ISR, ISR_OFFSET, REGION_SIZE),
            (CFG_DEVICE, DEVICE_OFFSET, REGION_SIZE),
        ] {
            config.add_capability(&virtio_cap(cfg_type, offset, len, 16), &[]);
        }
        let mut notify_cap = virtio_cap(CFG_NOTIFY, NOTIFY_OFFSET, REGION_SIZE, 20).to_vec();
        notify_cap.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config.add_capability(&notify_cap, &[]);
        let msix_cap = config.add_capability(
            &msix::capability(vectors, 0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32),
            // Enable and function-mask bits of message control.
            &[(0, 0xc000_0000)],
        );

        let notify = max_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        for (q, evt) in notify.iter().enumerate() {
            ioevents.register(evt, notify_addr(bar_addr, q))?;
        }
        let offered = device.features()
            | VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX;
        Ok(VirtioPciDevice {
            id,
            config,
            device,
            bar: Bar {
                index: 0,
                addr: bar_addr,
                size: BAR_SIZE,
            },
            msix: Arc::new(Mutex::new(MsixTable::new(vectors, router)?)),
            msix_cap,
            ioevents,
            notify,
            mem,
            isr: Arc::new(AtomicU8::new(0)),
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues: max_sizes.into_iter().map(QueueSetup::new).collect(),
            active: false,
            warnings: LogBudget::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.device.counters()
    }

    fn selected(&mut self) -> Option<&mut QueueSetup> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&self, offset: u64) -> u64 {
        let q = self.queues.get(usize::from(self.queue_select));
        let qf = |f: fn(&QueueSetup) -> u64| q.map(f).unwrap_or(0);
        match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.offered & 0xffff_ffff,
                1 => self.offered >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => qf(|q| u64::from(q.size)),
            0x1a => q
                .map(|q| u64::from(q.vector))
                .unwrap_or(u64::from(NO_VECTOR)),
            0x1c => qf(|q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_select),
            0x20 => qf(|q| q.desc),
            0x24 => qf(|q| q.desc >> 32),
            0x28 => qf(|q| q.avail),
            0x2c => qf(|q| q.avail >> 32),
            0x30 => qf(|q| q.used),
            0x34 => qf(|q| q.used >> 32),
            _ => 0,
        }
    }

    fn common_write(&mut self, offset: u64, value: u64, len: usize) {
        let set_lo = |old: u64| (old & !0xffff_ffff) | (value & 0xffff_ffff);
        let set_hi = |old: u64| (old & 0xffff_ffff) | (value << 32);
        // Queue setup is frozen once the driver is running.
        let frozen = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            0x00 => self.device_feature_select = value as u32,
            0x08 => self.driver_feature_select = value as u32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = set_lo(self.driver_features),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
                _ => {}
            },
            0x10 => self.config_vector = value as u16,
            0x14 => self.set_status(value as u8),
            0x16 => self.queue_select = value as u16,
            _ if frozen => log::debug!("{}: queue write at {offset:#x} while running", self.id),
            0x18 => {
                if let Some(q) = self.selected() {
                    q.size = value as u16;
                }
            }
            0x1a => {
                if let Some(q) = self.selected() {
                    q.vector = value as u16;
                }
            }
            0x1c => {
                if let Some(q) = self.selected() {
                    q.enabled = value == 1;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => {
                let Some(q) = self.selected() else { return };
                let field = match offset & !0x7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.avail,
                    _ => &mut q.used,
                };
                *field = match (offset % 8, len) {
                    (0, 8) => value,
                    (0, _) => set_lo(*field),
                    _ => set_hi(*field),
                };
            }
            _ => log::debug!("{}: ignored common config write at {offset:#x}", self.id),
        }
    }

    fn set_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let newly = status & !self.status;
        self.status = status;
        if newly & STATUS_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.offered;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                log::log!(
                    self.warnings.level(),
                    "{}: driver features {:#x} refused (offered {:#x})",
                    self.id,
                    self.driver_features,
                    self.offered
                );
                self.status &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 && self.status & STATUS_FEATURES_OK != 0 && !self.active {
            if let Err(e) = self.activate() {
                log::log!(
                    self.warnings.level(),
                    "{}: {e}; the device needs a reset",
                    self.id
                );
                self.status |= STATUS_NEEDS_RESET;
            }
        }
        if newly & STATUS_FAILED != 0 {
            log::log!(
                self.warnings.level(),
                "{}: the driver gave up on the device",
                self.id
            );
        }
    }

    fn activate(&mut self) -> Result<(), crate::ActivateError> {
        let bad = |reason: String| crate::ActivateError::BadSetup {
            device: self.id.clone(),
            reason,
        };
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (i, setup) in self.queues.iter().enumerate() {
            if !setup.enabled {
                continue;
            }
            let mut queue =
                Queue::new(setup.max_size).map_err(|e| bad(format!("queue {i}: {e:?}")))?;
            queue
                .try_set_size(setup.size)
                .map_err(|e| bad(format!("queue {i} size {}: {e:?}", setup.size)))?;
            queue
                .try_set_desc_table_address(GuestAddress(setup.desc))
                .map_err(|e| bad(format!("queue {i} descriptor table: {e:?}")))?;
            queue
                .try_set_avail_ring_address(GuestAddress(setup.avail))
                .map_err(|e| bad(format!("queue {i} available ring: {e:?}")))?;
            queue
                .try_set_used_ring_address(GuestAddress(setup.used))
                .map_err(|e| bad(format!("queue {i} used ring: {e:?}")))?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(bad(format!("queue {i} rings are outside guest memory")));
            }
            let notify = self.notify[i]
                .try_clone()
                .map_err(|e| bad(format!("queue {i} eventfd: {e}")))?;
            active.push(ActiveQueue {
                index: i as u16,
                queue,
                notify,
            });
        }
        let interrupt = Arc::new(PciInterrupt {
            msix: self.msix.clone(),
            queue_vectors: self.queues.iter().map(|q| q.vector).collect(),
            config_vector: self.config_vector,
            isr: self.isr.clone(),
        });
        self.device
            .activate(self.mem.clone(), interrupt, active, self.driver_features)?;
        self.active = true;
        log::info!(
            "{}: activated, features {:#x}",
            self.id,
            self.driver_features
        );
        Ok(())
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            *q = QueueSetup::new(q.max_size);
        }
        self.status = 0;
        self.driver_features = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        self.isr.store(0, Ordering::SeqCst);
        log::debug!("{}: reset", self.id);
    }
}

fn notify_addr(bar_addr: u64, queue: usize) -> u64 {
    bar_addr + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}

/// A `virtio_pci_cap` pointing into BAR 0.
fn virtio_cap(cfg_type: u8, offset: u64, len: u64, cap_len: u8) -> [u8; 16] {
    let mut cap = [0u8; 16];
    cap[0] = CAP_VENDOR;
    cap[2] = cap_len;
    cap[3] = cfg_type;
    cap[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
    cap[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    cap
}

fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | u64::from(*b) << (8 * i))
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let region = offset & !(REGION_SIZE - 1);
        let at = offset - region;
        match region {
            COMMON_OFFSET => {
                let value = self.common_read(at);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (value >> (8 * i)) as u8;
                }
            }
            ISR_OFFSET => {
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    // Reading the ISR acknowledges it.
                    *b = self.isr.swap(0, Ordering::SeqCst);
                }
            }
            DEVICE_OFFSET => self.device.read_config(at, data),
            MSIX_TABLE_OFFSET | 0x5000 => {
                lock(&self.msix).read_table(offset - MSIX_TABLE_OFFSET, data)
            }
            MSIX_PBA_OFFSET => lock(&self.msix).read_pba(at, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let region = offset & !(REGION_SIZE - 1);
        let at = offset - region;
        match region {
            COMMON_OFFSET => self.common_write(at, le_value(data), data.len()),
            DEVICE_OFFSET => self.device.write_config(at, data),
            NOTIFY_OFFSET => {
                // Only reached when the ioeventfd did not catch the write.
                let q = (at / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(evt) = self.notify.get(q) {
                    let _ = evt.write(1);
                }
            }
            MSIX_TABLE_OFFSET | 0x5000 => {
                lock(&self.msix).write_table(offset - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        if reg == self.msix_cap / 4 {
            let ctrl = (self.config.read(reg) >> 16) as u16;
            lock(&self.msix).set_control(ctrl);
        }
    }

    fn bars(&self) -> (bool, Vec<Bar>) {
        (
            self.config.memory_enabled(),
            self.config.programmed_bars().collect(),
        )
    }

    fn bar_moved(&mut self, old: Bar, new: Bar) {
        for (q, evt) in self.notify.iter().enumerate() {
            if let Err(e) = self.ioevents.unregister(evt, notify_addr(old.addr, q)) {
                log::warn!("{}: cannot unregister ioeventfd: {e}", self.id);
            }
            if let Err(e) = self.ioevents.register(evt, notify_addr(new.addr, q)) {
                log::warn!("{}: cannot register ioeventfd: {e}", self.id);
            }
        }
        self.bar = new;
    }
}

impl Drop for VirtioPciDevice {
    /// Stops the device's threads. The ioeventfds stay registered: they go
    /// with the VM, and unregistering each one would make tearing a VM down
    /// wait for a KVM grace period per queue.
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}
