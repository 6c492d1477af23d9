//! The qcow2 header: parsing and validation.
//!
//! Everything here is derived from bytes an attacker may control (a guest can
//! write a qcow2 header into a raw image; images get downloaded), so every
//! field is range-checked before use and all arithmetic on header values is
//! checked. [`Header::parse`] needs only the first cluster of the file and the
//! file's length, which also makes it a convenient fuzz target.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// "QFI\xfb" at offset 0.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Size of the version 2 header, and where its header extensions start.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Smallest version 3 header (`header_length` may be larger).
pub const V3_MIN_HEADER_LENGTH: u32 = 104;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// qemu's limits, which bound the memory kite spends on these tables whatever
/// the header claims.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;

/// Longest backing file name qemu writes or accepts.
const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// Incompatible features kite understands well enough to open the image
/// (whether it then may write is decided in [`super::Qcow2Image`]). The
/// compression-type bit only changes how compressed clusters decode, and
/// kite reads no compressed clusters at all.
const KNOWN_INCOMPAT: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION_TYPE;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// Offsets of header fields that kite rewrites.
pub const OFFSET_REFCOUNT_TABLE: u64 = 48;
pub const OFFSET_AUTOCLEAR_FEATURES: u64 = 88;

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Damaged, truncated, or not qcow2 at all.
    Corrupt(String),
    /// A valid image using something kite does not implement.
    Unsupported(String),
}

/// A validated qcow2 header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub header_length: u32,
    /// The backing file name exactly as stored (relative names are relative
    /// to the image's directory).
    pub backing_file: Option<PathBuf>,
    /// From the backing-format header extension, if present.
    pub backing_format: Option<String>,
}

fn be32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_be_bytes(b)
}

fn be64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_be_bytes(b)
}

fn corrupt<T>(msg: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Corrupt(msg.into()))
}

fn unsupported<T>(msg: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Unsupported(msg.into()))
}

/// Name of a known incompatible feature bit.
fn incompat_name(bit: u32) -> Option<&'static str> {
    match bit {
        0 => Some("dirty"),
        1 => Some("corrupt"),
        2 => Some("external data file"),
        3 => Some("compression type"),
        4 => Some("extended L2 entries"),
        _ => None,
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses and validates the header. `buf` holds the start of the file
    /// (at least its first cluster, or the whole file if it is shorter);
    /// `file_len` is the file's length, against which the tables are checked.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        if buf.len() < 4 || buf[..4] != MAGIC {
            return corrupt("not a qcow2 image (bad magic)");
        }
        if buf.len() < V2_HEADER_LENGTH as usize {
            return corrupt(format!(
                "file is truncated: {} bytes, too short for a qcow2 header",
                buf.len()
            ));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return unsupported(format!(
                "qcow2 version {version} is not supported (only versions 2 and 3 are)"
            ));
        }
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let cluster_bits = be32(buf, 20);
        let size = be64(buf, 24);
        let crypt_method = be32(buf, 32);
        let l1_size = be32(buf, 36);
        let l1_table_offset = be64(buf, 40);
        let refcount_table_offset = be64(buf, 48);
        let refcount_table_clusters = be32(buf, 56);
        let nb_snapshots = be32(buf, 60);

        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return corrupt(format!(
                "invalid cluster_bits {cluster_bits} (must be {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS})"
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        // Only the first cluster holds header data; the file may be shorter.
        let hdr = &buf[..buf.len().min(cluster_size as usize)];

        let (incompatible_features, compatible_features, autoclear_features, header_length) =
            if version == 2 {
                (0, 0, 0, V2_HEADER_LENGTH)
            } else {
                if hdr.len() < V3_MIN_HEADER_LENGTH as usize {
                    return corrupt(format!(
                        "file is truncated: {} bytes, too short for a qcow2 version 3 header",
                        hdr.len()
                    ));
                }
                let refcount_order = be32(hdr, 96);
                if refcount_order != 4 {
                    return unsupported(format!(
                        "refcount_order {refcount_order} is not supported (only 4, 16-bit refcounts, is)"
                    ));
                }
                let header_length = be32(hdr, 100);
                if header_length < V3_MIN_HEADER_LENGTH || !header_length.is_multiple_of(8) {
                    return corrupt(format!("invalid header_length {header_length}"));
                }
                if u64::from(header_length) > cluster_size {
                    return corrupt(format!(
                        "header_length {header_length} is larger than a cluster"
                    ));
                }
                if header_length as usize > hdr.len() {
                    return corrupt(format!(
                        "file is truncated: {} bytes, shorter than its {header_length}-byte header",
                        hdr.len()
                    ));
                }
                (be64(hdr, 72), be64(hdr, 80), be64(hdr, 88), header_length)
            };

        if crypt_method != 0 {
            return unsupported(format!(
                "encrypted images are not supported (crypt_method {crypt_method})"
            ));
        }

        // Header extensions sit between the header and the backing file name
        // (or the end of the first cluster).
        let ext_start = header_length as usize;
        let mut ext_end = hdr.len();
        if backing_file_offset != 0 {
            match usize::try_from(backing_file_offset) {
                Ok(off) if off >= ext_start && off < hdr.len() => ext_end = off,
                _ => {
                    return corrupt(format!(
                        "backing file name offset {backing_file_offset:#x} is outside the header cluster"
                    ))
                }
            }
        }
        let exts = parse_extensions(&hdr[ext_start..ext_end])?;

        let unknown = incompatible_features & !KNOWN_INCOMPAT;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = incompat_name(bit)
                .map(str::to_owned)
                .or_else(|| exts.feature_name(0, bit));
            let name = name.map(|n| format!(" ({n})")).unwrap_or_default();
            return unsupported(format!(
                "incompatible feature bit {bit}{name} is not supported"
            ));
        }

        let backing_file = if backing_file_offset != 0 {
            if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
                return corrupt(format!(
                    "invalid backing file name length {backing_file_size}"
                ));
            }
            let start = ext_end; // == backing_file_offset, checked above
            let end = start + backing_file_size as usize;
            if end > hdr.len() {
                return corrupt("backing file name extends past the header cluster");
            }
            let name = &hdr[start..end];
            if name.contains(&0) {
                return corrupt("backing file name contains a NUL byte");
            }
            Some(PathBuf::from(OsString::from_vec(name.to_vec())))
        } else {
            None
        };

        // The L1 table must cover the virtual size...
        let l2_entries = cluster_size / 8;
        let bytes_per_l1_entry = cluster_size * l2_entries; // at most 2^39
        let needed_l1 = size.div_ceil(bytes_per_l1_entry);
        if needed_l1 > MAX_L1_BYTES / 8 {
            return unsupported(format!(
                "virtual size {size} is too large for {cluster_size}-byte clusters"
            ));
        }
        if u64::from(l1_size) < needed_l1 {
            return corrupt(format!(
                "L1 table has {l1_size} entries, too few for the virtual size {size} (needs {needed_l1})"
            ));
        }
        // ...and lie within the file, so its size is bounded by the file's.
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return corrupt(format!("L1 table of {l1_size} entries is too large"));
        }
        check_table(
            "L1 table",
            l1_table_offset,
            l1_bytes,
            cluster_size,
            file_len,
        )?;

        let refcount_table_bytes = u64::from(refcount_table_clusters) * cluster_size;
        if refcount_table_clusters == 0 {
            return corrupt("refcount table is empty");
        }
        if refcount_table_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return corrupt(format!(
                "refcount table of {refcount_table_clusters} clusters is too large"
            ));
        }
        check_table(
            "refcount table",
            refcount_table_offset,
            refcount_table_bytes,
            cluster_size,
            file_len,
        )?;

        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            incompatible_features,
            compatible_features,
            autoclear_features,
            header_length,
            backing_file,
            backing_format: exts.backing_format,
        })
    }
}

/// Checks that a table of `len` bytes at `offset` is cluster aligned, does not
/// overlap the header cluster, and ends within the file.
fn check_table(
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), HeaderError> {
    if len == 0 {
        return Ok(());
    }
    if !offset.is_multiple_of(cluster_size) {
        return corrupt(format!(
            "{what} offset {offset:#x} is not aligned to a cluster"
        ));
    }
    if offset < cluster_size {
        return corrupt(format!("{what} overlaps the header"));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => corrupt(format!("{what} extends past the end of the file")),
    }
}

/// What kite uses from the header extensions.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    /// Raw feature name table entries: 48 bytes each.
    feature_names: Vec<u8>,
}

impl Extensions {
    /// Looks up the name the image itself gives a feature bit.
    fn feature_name(&self, kind: u8, bit: u32) -> Option<String> {
        self.feature_names
            .chunks_exact(48)
            .find(|e| e[0] == kind && u32::from(e[1]) == bit)
            .map(|e| {
                let name = &e[2..];
                let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                String::from_utf8_lossy(&name[..len]).into_owned()
            })
    }
}

/// Walks the header extensions in `area`: each is a 4-byte type, a 4-byte
/// length, and data padded to 8 bytes; type 0 ends the list. Unknown
/// extensions are skipped; one that overruns the area is corruption.
fn parse_extensions(area: &[u8]) -> Result<Extensions, HeaderError> {
    let mut exts = Extensions::default();
    let mut off = 0usize;
    while area.len() - off >= 8 {
        let ext_type = be32(area, off);
        let len = be32(area, off + 4) as usize;
        if ext_type == EXT_END {
            break;
        }
        let data_start = off + 8;
        let Some(data_end) = data_start.checked_add(len).filter(|&e| e <= area.len()) else {
            return corrupt(format!(
                "header extension {ext_type:#010x} ({len} bytes) overruns the header"
            ));
        };
        let data = &area[data_start..data_end];
        match ext_type {
            EXT_BACKING_FORMAT => {
                let name = String::from_utf8_lossy(data).into_owned();
                exts.backing_format = Some(name.trim_end_matches('\0').to_owned());
            }
            EXT_FEATURE_NAMES => exts.feature_names = data.to_vec(),
            _ => {}
        }
        // Data is padded to a multiple of 8; the padding may be cut short by
        // the end of the area, which simply ends the walk.
        off = data_start + len.div_ceil(8) * 8;
        if off > area.len() {
            break;
        }
    }
    Ok(exts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header in a 64 KiB cluster: 1 GiB disk, L1 at
    /// cluster 3, refcount table at cluster 1.
    fn v3_header() -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[36..40].copy_from_slice(&2u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        h[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    const FILE_LEN: u64 = 4 << 16;

    fn err(h: &[u8]) -> HeaderError {
        Header::parse(h, FILE_LEN).unwrap_err()
    }

    #[test]
    fn parses_minimal_header() {
        let h = Header::parse(&v3_header(), FILE_LEN).unwrap();
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.cluster_size(), 65536);
        assert!(h.backing_file.is_none());
    }

    #[test]
    fn refuses_bad_fields() {
        let mut h = v3_header();
        h[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(matches!(err(&h), HeaderError::Corrupt(m) if m.contains("cluster_bits 30")));

        let mut h = v3_header();
        h[96..100].copy_from_slice(&3u32.to_be_bytes());
        assert!(matches!(err(&h), HeaderError::Unsupported(m) if m.contains("refcount_order 3")));

        let mut h = v3_header();
        h[100..104].copy_from_slice(&100u32.to_be_bytes());
        assert!(matches!(err(&h), HeaderError::Corrupt(_)));

        let mut h = v3_header();
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        assert!(matches!(err(&h), HeaderError::Corrupt(m) if m.contains("too few")));

        let mut h = v3_header();
        h[40..48].copy_from_slice(&((3u64 << 16) + 8).to_be_bytes());
        assert!(matches!(err(&h), HeaderError::Corrupt(m) if m.contains("not aligned")));

        let mut h = v3_header();
        h[56..60].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(err(&h), HeaderError::Corrupt(m) if m.contains("too large")));

        let mut h = v3_header();
        h[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(err(&h), HeaderError::Unsupported(_)));

        let mut h = v3_header();
        h[72..80].copy_from_slice(&(1u64 << 5).to_be_bytes());
        assert!(matches!(err(&h), HeaderError::Unsupported(m) if m.contains("bit 5")));
    }

    #[test]
    fn reads_backing_name_and_extensions() {
        let mut h = v3_header();
        // Backing format extension "qcow2", then an unknown one, then end.
        let mut off = 104;
        h[off..off + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h[off + 4..off + 8].copy_from_slice(&5u32.to_be_bytes());
        h[off + 8..off + 13].copy_from_slice(b"qcow2");
        off += 16;
        h[off..off + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        h[off + 4..off + 8].copy_from_slice(&3u32.to_be_bytes());
        off += 16;
        h[off..off + 8].fill(0);
        let name = b"../base.img";
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h[512..512 + name.len()].copy_from_slice(name);
        let hdr = Header::parse(&h, FILE_LEN).unwrap();
        assert_eq!(hdr.backing_file.unwrap(), PathBuf::from("../base.img"));
        assert_eq!(hdr.backing_format.as_deref(), Some("qcow2"));
    }

    #[test]
    fn refuses_overrunning_extension() {
        let mut h = v3_header();
        h[104..108].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        h[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(err(&h), HeaderError::Corrupt(m) if m.contains("overruns")));
    }

    #[test]
    fn arbitrary_prefixes_never_panic() {
        let base = v3_header();
        for len in 0..200 {
            let _ = Header::parse(&base[..len], FILE_LEN);
        }
        let mut rng = crate::testutil::Rng::new(42);
        for _ in 0..20_000 {
            let mut h = base[..512].to_vec();
            for _ in 0..1 + rng.below(6) {
                let i = rng.below(h.len() as u64) as usize;
                h[i] = rng.next() as u8;
            }
            let _ = Header::parse(&h, rng.below(1 << 40));
        }
    }
}
