//! `block::qcow2::header::Header::parse` on arbitrary bytes.
//!
//! Input layout: an 8-byte big-endian file length, then the header bytes
//! (what `read_header` passes: the first cluster of the file, or all of it
//! when shorter — but any length is fed here). Inputs shorter than 8 bytes
//! are parsed with the file length equal to their own length.
//!
//! Must never panic. On success the header's tables must lie inside the
//! claimed file, which is checked here too.
#![no_main]

use block::qcow2::header::Header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (file_len, buf) = match data.split_first_chunk::<8>() {
        Some((len, rest)) => (u64::from_be_bytes(*len), rest),
        None => (data.len() as u64, data),
    };
    if let Ok(h) = Header::parse(buf, file_len) {
        let cs = h.cluster_size();
        assert!(cs.is_power_of_two() && (512..=2 << 20).contains(&cs));
        let l1_end = h.l1_table_offset.saturating_add(u64::from(h.l1_size) * 8);
        assert!(
            h.l1_size == 0 || l1_end <= file_len,
            "L1 table past end of file"
        );
        let rt_end = h
            .refcount_table_offset
            .saturating_add(u64::from(h.refcount_table_clusters) * cs);
        assert!(rt_end <= file_len, "refcount table past end of file");
    }
});
