//! Where in guest memory a kernel will be written and run, read from its
//! headers before it is loaded, so that those pages can be faulted in
//! alongside the load (see [`crate::prefault`]). A guess that is wrong costs
//! only time: nothing here decides where anything is loaded.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use crate::layout::HIGH_RAM_START;

/// ELF program headers beyond this many are not looked at.
const MAX_PHDRS: u64 = 64;
/// ELF64 header and program header fields.
const E_PHOFF: usize = 0x20;
const E_PHENTSIZE: usize = 0x36;
const E_PHNUM: usize = 0x38;
const P_PADDR: usize = 0x18;
const P_MEMSZ: usize = 0x28;
const PT_LOAD: u32 = 1;
/// Setup header fields (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HDR_MAGIC: usize = 0x202;
const HDR_VERSION: usize = 0x206;
const INITRD_ADDR_MAX: usize = 0x22c;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;
const SETUP_HEADER_END: usize = 0x264;

/// The memory a kernel's boot writes first, and how high its initramfs may go.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Guest-physical ranges, in the order to fault them in: last loaded
    /// first, so that the loader, going forwards, meets the faulting halfway.
    pub kernel: Vec<Range<u64>>,
    /// The highest address the initramfs may end at.
    pub initrd_addr_max: u64,
}

impl Footprint {
    /// Reads `kernel`'s headers: an ELF's PT_LOAD segments (their bss
    /// included: the kernel clears it first thing), or a bzImage's
    /// compressed image and the range its setup header says the
    /// decompressed kernel needs. Empty for anything else.
    pub fn of(kernel: &File) -> Footprint {
        let mut head = [0u8; SETUP_HEADER_END];
        let Ok(n) = kernel.read_at(&mut head, 0) else {
            return Footprint::default();
        };
        let head = &head[..n];
        if head.starts_with(b"\x7fELF") {
            Footprint {
                kernel: elf_segments(kernel, head),
                initrd_addr_max: u64::MAX,
            }
        } else {
            bzimage(kernel, head).unwrap_or_default()
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The PT_LOAD segments of a 64-bit little-endian ELF, last first.
fn elf_segments(file: &File, ehdr: &[u8]) -> Vec<Range<u64>> {
    let parse = || -> Option<Vec<Range<u64>>> {
        if ehdr.get(4..6)? != [2, 1] {
            return None;
        }
        let phoff = u64_at(ehdr, E_PHOFF)?;
        let phentsize = u64::from(u16_at(ehdr, E_PHENTSIZE)?);
        let phnum = u64::from(u16_at(ehdr, E_PHNUM)?).min(MAX_PHDRS);
        if phentsize < (P_MEMSZ + 8) as u64 {
            return None;
        }
        let mut phdrs = vec![0u8; (phentsize * phnum) as usize];
        file.read_exact_at(&mut phdrs, phoff).ok()?;
        let mut segments: Vec<Range<u64>> = phdrs
            .chunks_exact(phentsize as usize)
            .filter(|ph| u32_at(ph, 0) == Some(PT_LOAD))
            .filter_map(|ph| {
                let paddr = u64_at(ph, P_PADDR)?;
                Some(paddr..paddr.checked_add(u64_at(ph, P_MEMSZ)?)?)
            })
            .collect();
        segments.reverse();
        Some(segments)
    };
    parse().unwrap_or_default()
}

/// A bzImage is loaded at [`HIGH_RAM_START`] and decompresses itself to
/// its preferred address (2.10+ headers say where and how much it needs).
fn bzimage(file: &File, hdr: &[u8]) -> Option<Footprint> {
    if hdr.get(HDR_MAGIC..HDR_MAGIC + 4)? != b"HdrS" {
        return None;
    }
    // A setup_sects of 0 means 4.
    let sects = match *hdr.get(SETUP_SECTS)? {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (sects + 1) * 512;
    let image = file.metadata().ok()?.len().saturating_sub(setup_size);
    let mut kernel = Vec::new();
    if u16_at(hdr, HDR_VERSION)? >= 0x20a {
        let pref = u64_at(hdr, PREF_ADDRESS)?.max(HIGH_RAM_START);
        kernel.push(pref..pref.checked_add(u64::from(u32_at(hdr, INIT_SIZE)?))?);
    }
    kernel.push(HIGH_RAM_START..HIGH_RAM_START.saturating_add(image));
    Some(Footprint {
        kernel,
        initrd_addr_max: u64::from(u32_at(hdr, INITRD_ADDR_MAX)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::tests::file_with;

    fn put(b: &mut [u8], at: usize, v: &[u8]) {
        b[at..at + v.len()].copy_from_slice(v);
    }

    #[test]
    fn elf_segments_last_first() {
        let mut elf = vec![0u8; 64 + 3 * 56];
        put(&mut elf, 0, b"\x7fELF\x02\x01");
        put(&mut elf, E_PHOFF, &64u64.to_le_bytes());
        put(&mut elf, E_PHENTSIZE, &56u16.to_le_bytes());
        put(&mut elf, E_PHNUM, &3u16.to_le_bytes());
        for (i, (ty, paddr, memsz)) in [
            (1u32, 0x100_0000u64, 0x20_0000u64),
            (4, 0, 0x100),
            (1, 0x130_0000, 0x1000),
        ]
        .into_iter()
        .enumerate()
        {
            let ph = 64 + i * 56;
            put(&mut elf, ph, &ty.to_le_bytes());
            put(&mut elf, ph + P_PADDR, &paddr.to_le_bytes());
            put(&mut elf, ph + P_MEMSZ, &memsz.to_le_bytes());
        }
        let file = file_with(&elf);
        let fp = Footprint::of(file.as_file());
        assert_eq!(
            fp.kernel,
            vec![0x130_0000..0x130_1000, 0x100_0000..0x120_0000]
        );
        assert_eq!(fp.initrd_addr_max, u64::MAX);
        // A segment that wraps around is left out, not trusted.
        put(&mut elf, 64 + P_MEMSZ, &u64::MAX.to_le_bytes());
        let file = file_with(&elf);
        assert_eq!(
            Footprint::of(file.as_file()).kernel,
            vec![0x130_0000..0x130_1000]
        );
    }

    #[test]
    fn bzimage_image_and_decompression_range() {
        let mut bz = vec![0u8; 0x2000];
        put(&mut bz, SETUP_SECTS, &[3]);
        put(&mut bz, HDR_MAGIC, b"HdrS");
        put(&mut bz, HDR_VERSION, &0x20fu16.to_le_bytes());
        put(&mut bz, INITRD_ADDR_MAX, &0x7fff_ffffu32.to_le_bytes());
        put(&mut bz, PREF_ADDRESS, &0x100_0000u64.to_le_bytes());
        put(&mut bz, INIT_SIZE, &0x40_0000u32.to_le_bytes());
        let file = file_with(&bz);
        let fp = Footprint::of(file.as_file());
        assert_eq!(
            fp.kernel,
            vec![
                0x100_0000..0x140_0000,
                HIGH_RAM_START..HIGH_RAM_START + 0x2000 - 4 * 512
            ]
        );
        assert_eq!(fp.initrd_addr_max, 0x7fff_ffff);
    }

    #[test]
    fn anything_else_has_no_footprint() {
        for bytes in [&b""[..], b"not a kernel", b"\x7fELF\x01\x01"] {
            let file = file_with(bytes);
            assert!(Footprint::of(file.as_file()).kernel.is_empty());
        }
    }
}
