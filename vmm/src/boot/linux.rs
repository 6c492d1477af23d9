//! The Linux x86 64-bit boot protocol for bzImage kernels: a `boot_params`
//! page built from the image's setup header.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, GuestAddress};

use super::{e820_map, BootError, CmdlineRegion, InitramfsRegion};
use crate::layout::ZERO_PAGE_START;
use crate::memory::GuestMemoryMmap;

/// `xloadflags`: the kernel has a 64-bit entry point at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1;
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// "Undefined" boot loader id, as the boot protocol asks of unlisted loaders.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_LOADED_HIGH: u8 = 1;
const CAN_USE_HEAP: u8 = 0x80;
const HEAP_END_PTR: u16 = 0xfe00;

pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mut hdr: setup_header,
    cmdline: CmdlineRegion,
    initramfs: Option<InitramfsRegion>,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= KERNEL_LOADED_HIGH | CAN_USE_HEAP;
    hdr.heap_end_ptr = HEAP_END_PTR;
    hdr.cmd_line_ptr = cmdline.addr.raw_value() as u32;
    hdr.cmdline_size = cmdline.size;
    if let Some(initrd) = initramfs {
        hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp.raw_value(),
        ..Default::default()
    };
    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootError::GuestMemory("too many e820 entries".into()));
    }
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::GuestMemory(format!("boot_params: {e}")))
}
