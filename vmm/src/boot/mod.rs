//! Loading a guest payload: the kernel (PVH ELF or bzImage), the initramfs and
//! the command line, plus the memory map each boot protocol hands the guest.

pub mod footprint;
pub mod linux;
pub mod pvh;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIGH_RAM_START, MMIO_HOLE_START,
    PCI_MMCONFIG_SIZE, PCI_MMCONFIG_START,
};
use crate::memory::GuestMemoryMmap;
use crate::prefault::Prefault;
use footprint::Footprint;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel kite can boot (neither a PVH ELF nor a bzImage): {reason}")]
    NotAKernel { path: PathBuf, reason: String },
    #[error("ELF kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry(PathBuf),
    #[error("bzImage {0} does not support the 64-bit boot protocol")]
    NotBzImage64(PathBuf),
    #[error("cannot load kernel {path}: {reason}")]
    LoadKernel { path: PathBuf, reason: String },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitramfsTooBig { path: PathBuf, size: u64 },
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot data to guest memory: {0}")]
    GuestMemory(String),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh { entry: GuestAddress },
    /// 64-bit long mode on identity page tables, `rsi` = `boot_params`.
    Linux64 { entry: GuestAddress },
}

/// What a boot needs, taken from `PayloadConfig`.
pub struct Payload<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
}

/// An initramfs placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct InitramfsRegion {
    pub addr: GuestAddress,
    pub size: u64,
}

/// e820 types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The memory map both boot protocols hand the guest: (start, size, type).
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIGH_RAM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map.push((PCI_MMCONFIG_START, PCI_MMCONFIG_SIZE, E820_RESERVED));
    map.sort_unstable();
    map
}

/// Loads kernel, command line and initramfs; says how to enter the kernel.
/// The pages they go to are faulted in on another thread meanwhile; the
/// returned handle stops that when dropped.
pub fn load_payload(
    mem: &GuestMemoryMmap,
    payload: &Payload,
    rsdp: GuestAddress,
) -> Result<(EntryPoint, Prefault), BootError> {
    let cmdline = write_cmdline(mem, payload.cmdline)?;
    let path = payload.kernel;
    let mut file = open_kernel(path)?;
    let initramfs = payload.initramfs.map(Initramfs::open).transpose()?;
    let footprint = Footprint::of(&file);
    // The initramfs is loaded last, so it is faulted in first.
    let initrd_range = initramfs.as_ref().and_then(|i| {
        let addr = initramfs_addr(mem, i.size, footprint.initrd_addr_max)?;
        Some(addr..addr + i.size)
    });
    let prefault = Prefault::start(
        mem,
        initrd_range.into_iter().chain(footprint.kernel).collect(),
    );
    let entry = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START))) {
        Ok(loaded) => {
            let entry = match loaded.pvh_boot_cap {
                loader::elf::PvhBootCapability::PvhEntryPresent(entry) => entry,
                _ => return Err(BootError::NoPvhEntry(path.to_path_buf())),
            };
            let initrd = load_initramfs(mem, initramfs, loaded.kernel_end, u64::MAX)?;
            pvh::write_start_info(mem, cmdline, initrd, rsdp)?;
            EntryPoint::Pvh { entry }
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START)))
                .map_err(|e| BootError::NotAKernel {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            let header = loaded.setup_header.ok_or_else(|| BootError::NotAKernel {
                path: path.to_path_buf(),
                reason: "no setup header".into(),
            })?;
            if header.xloadflags & linux::XLF_KERNEL_64 == 0 {
                return Err(BootError::NotBzImage64(path.to_path_buf()));
            }
            let max = u64::from(header.initrd_addr_max);
            let initrd = load_initramfs(mem, initramfs, loaded.kernel_end, max)?;
            linux::write_boot_params(mem, header, cmdline, initrd, rsdp)?;
            EntryPoint::Linux64 {
                entry: loaded.kernel_load.unchecked_add(linux::ENTRY_64_OFFSET),
            }
        }
        Err(e) => {
            return Err(BootError::LoadKernel {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    Ok((entry, prefault))
}

/// The checks of [`load_payload`] that need no guest memory, for `vm.create`
/// to answer before the VM is built: the command line; a kernel that opens
/// and starts like an ELF or a bzImage; an initramfs that opens and is
/// smaller than low RAM. Loading checks the rest.
pub fn check_payload(payload: &Payload, memory_size: u64) -> Result<(), BootError> {
    check_cmdline(payload.cmdline)?;
    let path = payload.kernel;
    let mut head = Vec::with_capacity(BZIMAGE_MAGIC_END);
    open_kernel(path)?
        .take(BZIMAGE_MAGIC_END as u64)
        .read_to_end(&mut head)
        .map_err(|source| BootError::OpenKernel {
            path: path.to_path_buf(),
            source,
        })?;
    let elf = head.starts_with(ELF_MAGIC);
    let bzimage = head.get(BZIMAGE_MAGIC_END - 4..) == Some(BZIMAGE_MAGIC);
    if !elf && !bzimage {
        return Err(BootError::NotAKernel {
            path: path.to_path_buf(),
            reason: "it starts with neither an ELF header nor a Linux setup header".into(),
        });
    }
    if let Some(path) = payload.initramfs {
        let size = File::open(path)
            .and_then(|f| f.metadata())
            .map_err(|source| BootError::ReadInitramfs {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let room = memory_size
            .min(MMIO_HOLE_START)
            .saturating_sub(HIGH_RAM_START);
        if size > room {
            return Err(BootError::InitramfsTooBig {
                path: path.to_path_buf(),
                size,
            });
        }
    }
    Ok(())
}

const ELF_MAGIC: &[u8] = b"\x7fELF";
/// A bzImage's setup header says "HdrS" at 0x202.
const BZIMAGE_MAGIC: &[u8] = b"HdrS";
const BZIMAGE_MAGIC_END: usize = 0x206;

fn open_kernel(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })
}

/// Where the command line went and how long it is (with its NUL).
#[derive(Clone, Copy, Debug)]
pub struct CmdlineRegion {
    pub addr: GuestAddress,
    pub size: u32,
}

fn check_cmdline(cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    Ok(())
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<CmdlineRegion, BootError> {
    check_cmdline(cmdline)?;
    let addr = GuestAddress(CMDLINE_START);
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, addr)
        .map_err(|e| BootError::GuestMemory(e.to_string()))?;
    Ok(CmdlineRegion {
        addr,
        size: bytes.len() as u32,
    })
}

/// An initramfs file, opened.
struct Initramfs<'a> {
    path: &'a Path,
    file: File,
    size: u64,
}

impl<'a> Initramfs<'a> {
    fn open(path: &'a Path) -> Result<Initramfs<'a>, BootError> {
        let read_err = |source| BootError::ReadInitramfs {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        Ok(Initramfs { path, file, size })
    }
}

/// Where an initramfs of `size` bytes goes: at the top of low RAM (ending at
/// or below `max_addr`), page aligned.
fn initramfs_addr(mem: &GuestMemoryMmap, size: u64, max_addr: u64) -> Option<u64> {
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.len())
        .unwrap_or(0)
        .min(MMIO_HOLE_START)
        .min(max_addr.saturating_add(1));
    Some(low_end.checked_sub(size)? & !0xfff)
}

/// Puts the initramfs at [`initramfs_addr`], above the kernel. Reads
/// straight from the file into guest memory.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    initramfs: Option<Initramfs>,
    kernel_end: u64,
    max_addr: u64,
) -> Result<Option<InitramfsRegion>, BootError> {
    let Some(Initramfs {
        path,
        mut file,
        size,
    }) = initramfs
    else {
        return Ok(None);
    };
    let too_big = || BootError::InitramfsTooBig {
        path: path.to_path_buf(),
        size,
    };
    let addr = initramfs_addr(mem, size, max_addr).ok_or_else(too_big)?;
    if addr < kernel_end {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::GuestMemory(format!("initramfs {}: {e}", path.display())))?;
    Ok(Some(InitramfsRegion {
        addr: GuestAddress(addr),
        size,
    }))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    /// A temporary file holding `bytes`.
    pub(super) fn file_with(bytes: &[u8]) -> TempFile {
        let file = TempFile::new().unwrap();
        file.as_file().write_all(bytes).unwrap();
        file
    }

    fn check(kernel: &Path, initramfs: Option<&Path>, cmdline: &str) -> Result<(), BootError> {
        let payload = Payload {
            kernel,
            initramfs,
            cmdline,
        };
        check_payload(&payload, 64 << 20)
    }

    #[test]
    fn check_payload_knows_kernels_by_their_first_bytes() {
        let elf = file_with(b"\x7fELF\x02\x01\x01");
        assert!(check(elf.as_path(), None, "console=ttyS0").is_ok());
        let mut setup = vec![0u8; BZIMAGE_MAGIC_END];
        setup[BZIMAGE_MAGIC_END - 4..].copy_from_slice(BZIMAGE_MAGIC);
        let bzimage = file_with(&setup);
        assert!(check(bzimage.as_path(), None, "").is_ok());
        let text = file_with(b"not a kernel\n");
        let err = check(text.as_path(), None, "").unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        let missing = Path::new("/nonexistent/kite-kernel");
        let err = check(missing, None, "").unwrap_err();
        assert!(matches!(err, BootError::OpenKernel { .. }), "{err}");
    }

    #[test]
    fn check_payload_refuses_what_cannot_fit() {
        let elf = file_with(b"\x7fELF");
        let err = check(elf.as_path(), None, &"a".repeat(CMDLINE_MAX_SIZE)).unwrap_err();
        assert!(matches!(err, BootError::CmdlineTooLong(_)), "{err}");
        let err = check(elf.as_path(), None, "a\0b").unwrap_err();
        assert!(matches!(err, BootError::CmdlineNul), "{err}");
        let initramfs = TempFile::new().unwrap();
        initramfs.as_file().set_len(64 << 20).unwrap();
        let err = check(elf.as_path(), Some(initramfs.as_path()), "").unwrap_err();
        assert!(matches!(err, BootError::InitramfsTooBig { .. }), "{err}");
        initramfs.as_file().set_len(1 << 20).unwrap();
        assert!(check(elf.as_path(), Some(initramfs.as_path()), "").is_ok());
    }
}
