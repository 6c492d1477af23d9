//! Building GDT entries and the matching KVM segment registers.

use kvm_bindings::kvm_segment;

/// Encodes a descriptor from access/flags bits (`flags` = 0xF0FF mask of
/// flags nibble and access byte), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The segment register a CPU would hold after loading GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff);
    let limit = if bit(55) == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment_from_gdt(e, 1);
        assert_eq!((s.base, s.limit, s.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (s.type_, s.present, s.l, s.db, s.g, s.s),
            (0xb, 1, 1, 0, 1, 1)
        );
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.type_, tss.s, tss.g), (0x67, 0xb, 0, 0));
    }
}
