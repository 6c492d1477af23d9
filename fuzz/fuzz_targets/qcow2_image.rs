//! `block::Qcow2Image` on an arbitrary file: open, a few reads and writes,
//! flush, drop.
//!
//! Input layout: the whole input is written as the image file, so a plain
//! qcow2 image is a valid seed. Its last `CTRL_LEN` bytes (which are also
//! part of the file; the seeds append them after the image) choose how the
//! image is opened and what is done with it:
//!
//! ```text
//! ctrl[0]      bit 0: open with O_DIRECT (falls back when the filesystem refuses)
//!              bit 1: open read-only
//!              bit 2: when a read-write open is refused, retry read-only
//!              bit 3: extend the file (sparse, with zeros) to 1 << (19 + bits 4-6)
//!                     bytes, 512 KiB to 64 MiB, so that new clusters land where
//!                     the refcount table must grow
//! ctrl[1..]    OPS operations of OP_LEN bytes each:
//!              kind (u8), shift (u8), offset (u32 BE), length / 4 (u16 BE)
//! ```
//!
//! Offsets are `offset << shift` (so that far-away L1 entries are reached)
//! modulo the disk size; lengths are capped at `MAX_IO` and at the end of the
//! disk, which keeps each iteration cheap whatever size the header claims.
//!
//! The image lives in `$TMPDIR/kite-fuzz-qcow2-<pid>/image.qcow2`, rewritten
//! each iteration. Next to it are two backing files an image may name:
//! `base.raw` (64 KiB of a byte pattern) and `base.qcow2` (a small qcow2
//! image with data, from `seeds/base.qcow2`).
//!
//! Must never panic: every error must come back as a `BlockError`. Also
//! checked: a write or write-zeroes that succeeded reads back as written
//! (its last cluster; see `check_readback`), and reads past the end fail.
//!
//! `KITE_FUZZ_VERBOSE=1` prints what each input did (to check seeds, or to
//! see what a crashing input does: `cargo fuzz run qcow2_image <file>`).
#![no_main]

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use block::{DiskImage, OpenOptions, Qcow2Image};
use libfuzzer_sys::fuzz_target;

mod common;
use common::verbose;

const OPS: usize = 4;
const OP_LEN: usize = 8;
const CTRL_LEN: usize = 1 + OPS * OP_LEN;
/// Largest read or write: from 64 clusters of 2 KiB down to part of one 2 MiB cluster.
const MAX_IO: u64 = 128 << 10;

const BASE_QCOW2: &[u8] = include_bytes!("../seeds/base.qcow2");

/// The image path, creating its directory and backing files on first use.
fn image_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kite-fuzz-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cannot create the fuzz directory");
        let pattern: Vec<u8> = (0..64 << 10).map(|i: u32| (i % 251) as u8 | 1).collect();
        std::fs::write(dir.join("base.raw"), pattern).expect("cannot write base.raw");
        std::fs::write(dir.join("base.qcow2"), BASE_QCOW2).expect("cannot write base.qcow2");
        dir.join("image.qcow2")
    })
}

/// Replaces the image file's contents with `data`, then extends it to
/// `min_len` bytes if it is shorter.
fn write_image(data: &[u8], min_len: u64) {
    let mut f = FsOpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(image_path())
        .expect("cannot create the fuzz image file");
    f.write_all(data).expect("cannot write the fuzz image file");
    if min_len > data.len() as u64 {
        f.set_len(min_len)
            .expect("cannot extend the fuzz image file");
    }
}

fn open_file(readonly: bool, direct: bool) -> File {
    let open = |flags| {
        FsOpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(flags)
            .open(image_path())
    };
    if direct {
        if let Ok(f) = open(libc::O_DIRECT) {
            return f;
        }
    }
    open(0).expect("cannot open the fuzz image file")
}

fn is_direct(file: &File) -> bool {
    // SAFETY: F_GETFL takes no pointer argument and only returns the flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

fn try_open(readonly: bool, direct: bool) -> Result<Qcow2Image, block::BlockError> {
    let file = open_file(readonly, direct);
    let opts = OpenOptions {
        readonly,
        // Must say whether the file really is O_DIRECT.
        direct: is_direct(&file),
        format: None,
    };
    Qcow2Image::from_file(file, image_path(), &opts)
}

struct Op {
    kind: u8,
    offset: u64,
    len: u64,
}

fn decode_ops(ctrl: &[u8], size: u64) -> Vec<Op> {
    ctrl.chunks_exact(OP_LEN)
        .map(|b| {
            let shift = u32::from(b[1] % 48);
            let raw = u64::from(u32::from_be_bytes([b[2], b[3], b[4], b[5]]));
            let offset = if size == 0 { 0 } else { (raw << shift) % size };
            let len = u64::from(u16::from_be_bytes([b[6], b[7]])) * 4;
            let len = len.min(MAX_IO).min(size - offset);
            Op {
                kind: b[0],
                offset,
                len,
            }
        })
        .collect()
}

/// The byte written at guest offset `pos` by write number `seed`: it varies
/// with the position, so misplaced data shows.
fn pattern(pos: u64, seed: u8) -> u8 {
    (pos.wrapping_mul(0x9e37_79b9) >> 13) as u8 ^ seed
}

/// After a write (or write-zeroes) that succeeded, reads back its last
/// cluster's worth and checks it reads as written. Only the last cluster:
/// a hostile image may map two guest clusters to one host cluster, and then
/// the last one written wins.
fn check_readback(img: &mut Qcow2Image, op: &Op, seed: Option<u8>) {
    if op.len == 0 {
        return;
    }
    let end = op.offset + op.len;
    let start = op.offset.max((end - 1) & !(img.cluster_size() - 1));
    let mut got = vec![0u8; (end - start) as usize];
    match img.read_at(&mut got, start) {
        Ok(()) => {
            for (i, &b) in got.iter().enumerate() {
                let pos = start + i as u64;
                let want = seed.map_or(0, |seed| pattern(pos, seed));
                assert_eq!(
                    b,
                    want,
                    "guest byte {pos:#x} reads back as {b:#04x}, not {want:#04x}, \
                     right after a successful {} of {} bytes at {:#x}",
                    if seed.is_some() {
                        "write"
                    } else {
                        "write-zeroes"
                    },
                    op.len,
                    op.offset
                );
            }
        }
        Err(e) => {
            if verbose() {
                eprintln!("read back after a successful write failed: {e}");
            }
        }
    }
}

fn exercise(img: &mut Qcow2Image, ops: &[Op]) {
    let size = img.size();
    let mut buf = vec![0u8; MAX_IO as usize];
    for (i, op) in ops.iter().enumerate() {
        let len = op.len as usize;
        let seed = op.kind ^ i as u8;
        let r = match op.kind % 8 {
            0..=2 => img.read_at(&mut buf[..len], op.offset),
            3..=5 => {
                for (j, b) in buf[..len].iter_mut().enumerate() {
                    *b = pattern(op.offset + j as u64, seed);
                }
                img.write_at(&buf[..len], op.offset)
            }
            6 => img.write_zeroes(op.offset, op.len, op.kind & 8 != 0),
            _ => img.flush(),
        };
        if verbose() {
            eprintln!(
                "op {i}: kind {} offset {:#x} len {}: {r:?}",
                op.kind % 8,
                op.offset,
                op.len
            );
        }
        if r.is_ok() {
            match op.kind % 8 {
                3..=5 => check_readback(img, op, Some(seed)),
                6 => check_readback(img, op, None),
                _ => {}
            }
        }
    }
    // Requests past the end must be refused, not served.
    assert!(img.read_at(&mut buf[..1], size).is_err());
    let r = img.flush();
    if verbose() {
        eprintln!("flush: {r:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let ctrl = &data[data.len().saturating_sub(CTRL_LEN)..];
    let flags = ctrl.first().copied().unwrap_or(0);
    let min_len = if flags & 8 != 0 {
        1u64 << (19 + ((flags >> 4) & 7))
    } else {
        0
    };
    write_image(data, min_len);
    let direct = flags & 1 != 0;
    let readonly = flags & 2 != 0;
    let retry_ro = flags & 4 != 0;
    let mut result = try_open(readonly, direct);
    if result.is_err() && !readonly && retry_ro {
        result = try_open(true, direct);
    }
    match result {
        Ok(mut img) => {
            if verbose() {
                eprintln!(
                    "opened: size {} cluster {} backing {} (flags {flags:#x})",
                    img.size(),
                    img.cluster_size(),
                    img.has_backing_file()
                );
            }
            let ops = decode_ops(ctrl.get(1..).unwrap_or(&[]), img.size());
            exercise(&mut img, &ops);
            // Dropping writes back dirty metadata too.
        }
        Err(e) => {
            if verbose() {
                eprintln!("refused: {e}");
            }
        }
    }
});
