//! KVM interrupt routing. KVM keeps one table mapping each GSI to an irqchip
//! pin or an MSI message, and replaces it whole on every update; this module
//! owns that table: the PC's legacy routes (GSIs 0-23 to the PIC and I/O
//! APIC, as KVM sets them by default) plus one MSI route per device vector.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use virtio_devices::pci::msix::{MsiMessage, MsiRouter, MsiVector};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are the I/O APIC's pins.
const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;

struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// Routes device MSI vectors through KVM GSIs.
pub struct KvmMsiRouter {
    fd: Arc<VmFd>,
    table: Mutex<Table>,
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.addr as u32;
    e.u.msi.address_hi = (msg.addr >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

impl KvmMsiRouter {
    pub fn new(fd: Arc<VmFd>) -> Self {
        KvmMsiRouter {
            fd,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    fn apply(&self, table: &Table) -> io::Result<()> {
        let mut entries = Vec::with_capacity((IOAPIC_PINS + PIC_PINS) as usize + table.msi.len());
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < PIC_PINS {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip_route(gsi, chip, gsi % 8));
            }
        }
        entries.extend(table.msi.iter().map(|(gsi, msg)| msi_route(*gsi, *msg)));
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        self.fd.set_gsi_routing(&routing).map_err(io::Error::other)
    }
}

impl MsiRouter for KvmMsiRouter {
    fn allocate(&self, count: u16) -> io::Result<Vec<MsiVector>> {
        let mut table = devices::bus::lock(&self.table);
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let gsi = table.next_gsi;
            table.next_gsi += 1;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
            self.fd
                .register_irqfd(&irqfd, gsi)
                .map_err(io::Error::other)?;
            vectors.push(MsiVector { gsi, irqfd });
        }
        Ok(vectors)
    }

    fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut table = devices::bus::lock(&self.table);
        let changed = match msg {
            Some(m) => table.msi.insert(gsi, m) != Some(m),
            None => table.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.apply(&table)?;
        }
        Ok(())
    }
}
