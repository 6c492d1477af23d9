//! qcow2 tests against images made and checked by qemu-img / qemu-io.

use std::path::{Path, PathBuf};

use super::*;
use crate::testutil::{
    assert_bytes_eq, assert_qemu_check_clean, create_qcow2, pattern, qemu_contents, qemu_img,
    qemu_io, Rng, TempDir,
};
use crate::{open_image, OpenOptions, MAX_BACKING_DEPTH};

const MIB: u64 = 1 << 20;

fn rw() -> OpenOptions {
    OpenOptions::default()
}

fn ro() -> OpenOptions {
    OpenOptions {
        readonly: true,
        ..Default::default()
    }
}

fn open_rw(path: &Path) -> Box<dyn DiskImage> {
    open_image(path, &rw()).unwrap_or_else(|e| panic!("{e}"))
}

fn open_err(path: &Path, opts: &OpenOptions) -> BlockError {
    match open_image(path, opts) {
        Ok(_) => panic!("{} opened but should have been refused", path.display()),
        Err(e) => e,
    }
}

fn read_all(img: &mut dyn DiskImage) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap_or_else(|e| panic!("{e}"));
    buf
}

fn write(img: &mut dyn DiskImage, model: &mut [u8], offset: u64, data: &[u8]) {
    img.write_at(data, offset).unwrap_or_else(|e| panic!("{e}"));
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

/// Closes nothing itself: checks the closed image with qemu-img check and
/// compares qemu's view of its contents with `model`.
fn assert_qemu_agrees(path: &Path, model: &[u8]) {
    assert_qemu_check_clean(path);
    assert_bytes_eq(
        &qemu_contents(path, "qcow2"),
        model,
        "qemu-img convert output",
    );
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Writes a fixed set of awkward requests: unaligned, spanning clusters,
/// whole clusters, at the very end; checks them before and after reopening,
/// and with qemu.
fn exercise(create_opts: &str, size: u64) {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("disk.qcow2"), size, create_opts);
    let mut model = vec![0u8; size as usize];
    let mut img = open_rw(&path);
    assert_eq!(img.size(), size);
    assert!(!img.supports_discard());
    let cs = {
        let probe = Qcow2Image::from_file(File::open(&path).unwrap(), &path, &ro()).unwrap();
        probe.cluster_size()
    };
    let writes: Vec<(u64, usize)> = vec![
        (0, 512),
        (1, 1),
        (cs - 100, 300),
        (3 * cs + 1, (2 * cs + 7) as usize),
        (size / 3 + 4096, 65_536 + 3),
        (size / 2, cs as usize),
        (size - 1000, 1000),
        (size - 1, 1),
        (100, 10),
        (size / 3 + 5000, 4096),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        write(img.as_mut(), &mut model, off, &pattern(len, i as u64 + 100));
        let mut back = vec![0u8; len];
        img.read_at(&mut back, off).unwrap();
        assert_bytes_eq(
            &back,
            &model[off as usize..off as usize + len],
            "read after write",
        );
    }
    img.flush().unwrap();
    assert_bytes_eq(&read_all(img.as_mut()), &model, "whole image before close");
    drop(img);
    assert_qemu_agrees(&path, &model);
    let mut img = open_image(&path, &ro()).unwrap();
    assert_bytes_eq(&read_all(img.as_mut()), &model, "whole image after reopen");
}

#[test]
fn v3_default_64k_clusters() {
    exercise("", 24 * MIB + 1536);
}

#[test]
fn v2_compat_0_10() {
    exercise("compat=0.10", 24 * MIB + 1536);
}

#[test]
fn cluster_size_4k() {
    exercise("cluster_size=4096", 24 * MIB + 1536);
}

#[test]
fn cluster_size_2m() {
    exercise("cluster_size=2M", 24 * MIB + 1536);
}

#[test]
fn cluster_size_512() {
    exercise("cluster_size=512", 4 * MIB + 1536);
}

#[test]
fn reads_what_qemu_wrote_and_qemu_reads_what_we_wrote() {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("disk.qcow2"), 8 * MIB, "");
    qemu_io(&path, "qcow2", "write -P 0xab 0 64k");
    qemu_io(&path, "qcow2", "write -P 0xcd 1000000 5000");
    let mut model = vec![0u8; 8 * MIB as usize];
    model[..65536].fill(0xab);
    model[1_000_000..1_005_000].fill(0xcd);
    let mut img = open_rw(&path);
    assert_bytes_eq(&read_all(img.as_mut()), &model, "qemu-io data");
    // Overwrite part of qemu's cluster in place, and add one of our own.
    write(img.as_mut(), &mut model, 30_000, &pattern(10_000, 1));
    write(img.as_mut(), &mut model, 3 * MIB, &pattern(70_000, 2));
    drop(img);
    assert_qemu_agrees(&path, &model);
}

#[test]
fn zero_clusters_read_as_zeros_and_can_be_rewritten() {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("disk.qcow2"), 4 * MIB, "");
    qemu_io(&path, "qcow2", "write -P 0x11 0 256k");
    // A preallocated zero cluster (offset kept) and a plain one.
    qemu_io(&path, "qcow2", "write -z 0 64k");
    qemu_io(&path, "qcow2", "write -z -u 128k 64k");
    let mut model = vec![0u8; 4 * MIB as usize];
    model[..256 * 1024].fill(0x11);
    model[..65536].fill(0);
    model[128 * 1024..192 * 1024].fill(0);
    let mut img = open_rw(&path);
    assert_bytes_eq(&read_all(img.as_mut()), &model, "zero clusters");
    write(img.as_mut(), &mut model, 1000, &pattern(3000, 5));
    write(img.as_mut(), &mut model, 130_000, &pattern(3000, 6));
    img.write_zeroes(200_000, 100_000, false).unwrap();
    model[200_000..300_000].fill(0);
    assert_bytes_eq(&read_all(img.as_mut()), &model, "after rewriting");
    drop(img);
    assert_qemu_agrees(&path, &model);
}

#[test]
fn write_zeroes_over_data() {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("disk.qcow2"), 4 * MIB, "cluster_size=4096");
    let mut model = vec![0u8; 4 * MIB as usize];
    let mut img = open_rw(&path);
    write(img.as_mut(), &mut model, 0, &pattern(MIB as usize, 8));
    img.write_zeroes(1234, 100_000, true).unwrap();
    model[1234..101_234].fill(0);
    img.write_zeroes(2 * MIB, MIB, false).unwrap(); // never written: stays unallocated
    assert!(matches!(
        img.discard(0, 4096),
        Err(BlockError::Unsupported { .. })
    ));
    assert_bytes_eq(&read_all(img.as_mut()), &model, "after write_zeroes");
    drop(img);
    assert_qemu_agrees(&path, &model);
    // The megabyte zeroed without ever being written stayed unallocated.
    let map = qemu_img(&["map", "--output=json", path.to_str().unwrap()]);
    let unallocated = format!(
        "\"start\": {MIB}, \"length\": {}, \"depth\": 0, \"present\": false",
        3 * MIB
    );
    assert!(map.contains(&unallocated), "{map}");
}

/// A base image (raw or qcow2) filled with a pattern and an overlay on it.
fn backing_setup(dir: &TempDir, base_format: &str, size: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let base_data = pattern(size as usize, 77);
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, &base_data).unwrap();
    let base = if base_format == "raw" {
        raw
    } else {
        let base = dir.path().join("base.qcow2");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            base.to_str().unwrap(),
        ]);
        base
    };
    let overlay = dir.path().join("overlay.qcow2");
    // A relative backing name, resolved against the overlay's directory.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.file_name().unwrap().to_str().unwrap(),
        "-F",
        base_format,
        overlay.to_str().unwrap(),
    ]);
    (base, overlay, base_data)
}

fn backing_file_test(base_format: &str) {
    let dir = TempDir::new();
    let size = 6 * MIB;
    let (base, overlay, base_data) = backing_setup(&dir, base_format, size);
    let base_before = sha(&base);
    let mut model = base_data.clone();
    let mut img = open_rw(&overlay);
    assert_eq!(img.size(), size);
    assert_bytes_eq(
        &read_all(img.as_mut()),
        &model,
        "reads fall through to the base",
    );
    // Partial-cluster writes must keep the base's bytes around them.
    write(img.as_mut(), &mut model, 100, &pattern(50, 1));
    write(img.as_mut(), &mut model, 65_536 * 3 - 10, &pattern(20, 2));
    write(img.as_mut(), &mut model, 2 * MIB, &pattern(65_536, 3));
    write(img.as_mut(), &mut model, size - 7, &pattern(7, 4));
    img.write_zeroes(4 * MIB + 3, 70_000, false).unwrap();
    model[(4 * MIB + 3) as usize..(4 * MIB + 70_003) as usize].fill(0);
    assert_bytes_eq(&read_all(img.as_mut()), &model, "overlay after writes");
    // The base is shared-locked: it cannot be opened for writing meanwhile.
    assert!(matches!(
        open_image(&base, &rw()),
        Err(BlockError::Locked { .. })
    ));
    open_image(&base, &ro()).unwrap();
    drop(img);
    assert_eq!(sha(&base), base_before, "the base image changed");
    assert_qemu_agrees(&overlay, &model);
    let mut img = open_image(&overlay, &ro()).unwrap();
    assert_bytes_eq(&read_all(img.as_mut()), &model, "overlay after reopen");
}

#[test]
fn backing_file_raw() {
    backing_file_test("raw");
}

#[test]
fn backing_file_qcow2() {
    backing_file_test("qcow2");
}

#[test]
fn backing_file_smaller_than_overlay_reads_zeros_past_its_end() {
    let dir = TempDir::new();
    let base = dir.path().join("base.raw");
    let base_data = pattern(100_000, 9);
    std::fs::write(&base, &base_data).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        overlay.to_str().unwrap(),
        "1M",
    ]);
    let mut model = vec![0u8; MIB as usize];
    model[..100_000].copy_from_slice(&base_data);
    let mut img = open_rw(&overlay);
    assert_bytes_eq(&read_all(img.as_mut()), &model, "short backing file");
    write(img.as_mut(), &mut model, 99_990, &pattern(20, 1));
    drop(img);
    assert_qemu_agrees(&overlay, &model);
}

#[test]
fn random_io_matches_model() {
    // 4 KiB clusters over 128 MiB: more L2 tables than the cache holds.
    random_io("cluster_size=4096", 128 * MIB, None, 1);
    // v2, default clusters.
    random_io("compat=0.10", 32 * MIB, None, 2);
    // 512-byte clusters: refcount blocks and refcount table growth.
    random_io("cluster_size=512", 12 * MIB, None, 3);
}

#[test]
fn random_io_over_backing_file() {
    random_io("", 16 * MIB, Some("raw"), 4);
    random_io("cluster_size=4096", 16 * MIB, Some("qcow2"), 5);
}

/// ~200 random reads, writes, write-zeroes, flushes and reopens against an
/// in-memory model, ending with qemu-img check and a full comparison.
fn random_io(create_opts: &str, size: u64, base_format: Option<&str>, seed: u64) {
    let dir = TempDir::new();
    let (path, mut model) = match base_format {
        Some(format) => {
            let (_, overlay, base_data) = backing_setup(&dir, format, size);
            (overlay, base_data)
        }
        None => (
            create_qcow2(&dir.path().join("disk.qcow2"), size, create_opts),
            vec![0u8; size as usize],
        ),
    };
    let mut rng = Rng::new(seed);
    let mut img = open_rw(&path);
    for step in 0..200 {
        let len = match rng.below(4) {
            0 => 1 + rng.below(512),
            1 => 1 + rng.below(8192),
            2 => 1 + rng.below(256 * 1024),
            _ => 4096 * (1 + rng.below(64)),
        };
        let mut offset = rng.below(size - len + 1);
        if rng.below(2) == 0 {
            offset &= !4095;
        }
        match rng.below(20) {
            0..=10 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                write(img.as_mut(), &mut model, offset, &data);
            }
            11..=16 => {
                let mut back = vec![0u8; len as usize];
                img.read_at(&mut back, offset).unwrap();
                let want = &model[offset as usize..(offset + len) as usize];
                assert_bytes_eq(&back, want, &format!("step {step}: read {len} at {offset}"));
            }
            17 => {
                img.write_zeroes(offset, len, rng.below(2) == 0).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            18 => img.flush().unwrap(),
            _ => {
                drop(img);
                img = open_rw(&path);
            }
        }
    }
    assert_bytes_eq(&read_all(img.as_mut()), &model, "final contents");
    drop(img);
    assert_qemu_agrees(&path, &model);
}

#[test]
fn refcount_table_grows() {
    // 512-byte clusters: one refcount block covers 128 KiB and qemu's
    // one-cluster refcount table 8 MiB, so 12 MiB of data needs new blocks
    // and a bigger table.
    let dir = TempDir::new();
    let size = 16 * MIB;
    let path = create_qcow2(&dir.path().join("disk.qcow2"), size, "cluster_size=512");
    let mut model = vec![0u8; size as usize];
    let mut img = open_rw(&path);
    let chunk = pattern(MIB as usize, 12);
    for i in 0..12 {
        write(img.as_mut(), &mut model, i * MIB + 17, &chunk);
    }
    drop(img);
    let info = qemu_img(&["info", path.to_str().unwrap()]);
    assert!(info.contains("cluster_size: 512"), "{info}");
    assert_qemu_agrees(&path, &model);
    let hdr = std::fs::read(&path).unwrap();
    let table_clusters = u32::from_be_bytes(hdr[56..60].try_into().unwrap());
    assert!(table_clusters > 1, "refcount table did not grow");
}

/// What a crash (kill -9) would leave: the file as the kernel has it, with
/// whatever was not flushed still in memory lost. It must be consistent —
/// qemu-img check may find leaked clusters (status 3) but no corruption —
/// and hold everything flushed.
#[test]
fn crash_before_flush_leaks_at_worst() {
    let dir = TempDir::new();
    let size = 8 * MIB;
    let path = create_qcow2(&dir.path().join("disk.qcow2"), size, "cluster_size=4096");
    let mut model = vec![0u8; size as usize];
    let mut img = open_rw(&path);
    write(img.as_mut(), &mut model, 0, &pattern(300_000, 1));
    img.flush().unwrap();
    let flushed = model.clone();
    // New clusters (and a new L2 table), never flushed.
    write(
        img.as_mut(),
        &mut model,
        5 * MIB + 100,
        &pattern(200_000, 2),
    );
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&path, &crashed).unwrap();
    drop(img);

    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", crashed.to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "expected leaks only:\n{report}");
    assert!(report.contains("leaked clusters"), "{report}");
    assert_bytes_eq(&qemu_contents(&crashed, "qcow2"), &flushed, "crashed image");
    // The cleanly closed original has everything.
    assert_qemu_agrees(&path, &model);
}

#[test]
fn direct_io_qcow2() {
    let dir = TempDir::new();
    let size = 8 * MIB;
    let path = create_qcow2(&dir.path().join("disk.qcow2"), size, "cluster_size=4096");
    let opts = OpenOptions {
        direct: true,
        ..Default::default()
    };
    let mut model = vec![0u8; size as usize];
    let mut img = open_image(&path, &opts).unwrap();
    write(img.as_mut(), &mut model, 777, &pattern(100_000, 1));
    write(img.as_mut(), &mut model, size - 3, &pattern(3, 2));
    img.flush().unwrap();
    assert_bytes_eq(&read_all(img.as_mut()), &model, "direct qcow2");
    drop(img);
    assert_qemu_agrees(&path, &model);
}

#[test]
fn locking_and_qemu_interplay() {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("disk.qcow2"), MIB, "");
    let img = open_rw(&path);
    assert!(matches!(
        open_image(&path, &ro()),
        Err(BlockError::Locked { .. })
    ));
    // qemu's own locks conflict with ours too.
    let out = std::process::Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-img opened an image kite holds");
    drop(img);
    assert_qemu_check_clean(&path);
}

#[test]
fn compressed_clusters_are_unsupported_not_a_panic() {
    let dir = TempDir::new();
    let raw = dir.path().join("data.raw");
    // Compressible data: qemu stores incompressible clusters uncompressed.
    let text: Vec<u8> = b"kite compresses well. "
        .iter()
        .copied()
        .cycle()
        .take(MIB as usize)
        .collect();
    std::fs::write(&raw, text).unwrap();
    let path = dir.path().join("compressed.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let mut img = open_rw(&path);
    let mut buf = vec![0u8; 4096];
    let err = img.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(err, BlockError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("compressed"), "{err}");
    let err = img.write_at(&buf, 0).unwrap_err();
    assert!(matches!(err, BlockError::Unsupported { .. }), "{err}");
    drop(img);
    assert_qemu_check_clean(&path);
}

#[test]
fn snapshots_dirty_and_corrupt_images_open_read_only() {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("snap.qcow2"), MIB, "");
    qemu_img(&["snapshot", "-c", "s1", path.to_str().unwrap()]);
    let err = open_err(&path, &rw());
    assert!(err.to_string().contains("internal snapshots"), "{err}");
    open_image(&path, &ro()).unwrap();

    for (bit, word) in [(0u64, "dirty"), (1, "corrupt")] {
        let path = create_qcow2(&dir.path().join(format!("bit{bit}.qcow2")), MIB, "");
        patch(&path, 72, &(1u64 << bit).to_be_bytes());
        let err = open_err(&path, &rw());
        assert!(err.to_string().contains(word), "{err}");
        let mut img = open_image(&path, &ro()).unwrap();
        read_all(img.as_mut());
    }
}

#[test]
fn autoclear_bits_are_cleared_on_write_open() {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("disk.qcow2"), MIB, "");
    patch(&path, 88, &(1u64 << 7).to_be_bytes());
    open_image(&path, &ro()).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap()[88..96],
        (1u64 << 7).to_be_bytes()
    );
    drop(open_rw(&path));
    assert_eq!(std::fs::read(&path).unwrap()[88..96], [0u8; 8]);
}

// ---- images that must be refused at open ----

/// Overwrites bytes of a file in place.
fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    data[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

/// Creates a 64 KiB-cluster image, lets `damage` patch it, and returns the
/// error opening it (through the qcow2 entry point, so that damage to the
/// magic is not taken for a raw image).
fn refused(damage: impl FnOnce(&Path)) -> BlockError {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("bad.qcow2"), 16 * MIB, "");
    damage(&path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    match Qcow2Image::from_file(file, &path, &rw()) {
        Ok(_) => panic!("damaged image was accepted"),
        Err(e) => {
            assert!(
                e.to_string().contains("bad.qcow2"),
                "error does not name the file: {e}"
            );
            e
        }
    }
}

fn assert_msg(err: &BlockError, needle: &str) {
    assert!(
        err.to_string().contains(needle),
        "expected {needle:?} in: {err}"
    );
}

#[test]
fn refuses_truncated_files() {
    let err = refused(|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(90)
            .unwrap()
    });
    assert_msg(&err, "truncated");
    let err = refused(|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(40)
            .unwrap()
    });
    assert_msg(&err, "truncated");
    // Header intact, tables cut off.
    let err = refused(|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(65536 + 100)
            .unwrap()
    });
    assert_msg(&err, "extends past the end of the file");
}

#[test]
fn refuses_bad_magic() {
    let err = refused(|p| patch(p, 0, b"QFI\0"));
    assert!(matches!(err, BlockError::Corrupt { .. }));
    assert_msg(&err, "bad magic");
}

#[test]
fn refuses_version_1() {
    let err = refused(|p| patch(p, 4, &1u32.to_be_bytes()));
    assert!(matches!(err, BlockError::Unsupported { .. }));
    assert_msg(&err, "version 1");
}

#[test]
fn refuses_huge_l1_size() {
    let err = refused(|p| patch(p, 36, &u32::MAX.to_be_bytes()));
    assert_msg(&err, "L1 table");
    let err = refused(|p| patch(p, 36, &(1u32 << 20).to_be_bytes()));
    assert_msg(&err, "L1 table extends past the end of the file");
}

#[test]
fn refuses_l1_past_eof() {
    let err = refused(|p| patch(p, 40, &(1u64 << 40).to_be_bytes()));
    assert_msg(&err, "L1 table extends past the end of the file");
    let err = refused(|p| patch(p, 40, &(u64::MAX - 0xffff).to_be_bytes()));
    assert_msg(&err, "L1 table extends past the end of the file");
}

#[test]
fn refuses_bad_l1_and_refcount_entries() {
    // qemu-img create puts the refcount table at cluster 1, its first block
    // at cluster 2 and the L1 table at cluster 3.
    let err = refused(|p| patch(p, 3 * 65536, &(0x8000_0000_0001_0200u64).to_be_bytes()));
    assert_msg(&err, "not aligned");
    let err = refused(|p| patch(p, 3 * 65536, &(0x8000_00ff_0000_0000u64).to_be_bytes()));
    assert_msg(&err, "past the end of the file");
    let err = refused(|p| patch(p, 65536 + 8, &(1u64 << 50).to_be_bytes()));
    assert_msg(&err, "refcount block");
}

#[test]
fn refuses_cluster_bits_30() {
    let err = refused(|p| patch(p, 20, &30u32.to_be_bytes()));
    assert_msg(&err, "cluster_bits 30");
}

#[test]
fn refuses_encryption() {
    let err = refused(|p| patch(p, 32, &1u32.to_be_bytes()));
    assert!(matches!(err, BlockError::Unsupported { .. }));
    assert_msg(&err, "encrypted");
}

#[test]
fn refuses_unknown_incompatible_feature() {
    let err = refused(|p| patch(p, 72, &(1u64 << 9).to_be_bytes()));
    assert!(matches!(err, BlockError::Unsupported { .. }));
    assert_msg(&err, "incompatible feature bit 9");
}

#[test]
fn refuses_extended_l2_and_external_data() {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("ext.qcow2"), MIB, "extended_l2=on");
    let err = open_err(&path, &rw());
    assert_msg(&err, "extended L2");
    let err = refused(|p| patch(p, 72, &(1u64 << 2).to_be_bytes()));
    assert_msg(&err, "external data file");
}

#[test]
fn refuses_other_refcount_widths() {
    let dir = TempDir::new();
    let path = create_qcow2(&dir.path().join("rc.qcow2"), MIB, "refcount_bits=8");
    let err = open_err(&path, &ro());
    assert_msg(&err, "refcount_order 3");
}

#[test]
fn refuses_backing_file_loop() {
    let dir = TempDir::new();
    let a = dir.path().join("a.qcow2");
    let b = create_qcow2(&dir.path().join("b.qcow2"), MIB, "");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
    ]);
    // An unsafe rebase does not open the new backing file, so it can close
    // the loop.
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
    ]);
    for opts in [rw(), ro()] {
        let err = open_err(&a, &opts);
        let mut msg = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            msg = s.to_string();
            source = s.source();
        }
        assert!(msg.contains("loops"), "{err}");
    }
    // A self-reference is a loop too.
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
    ]);
    assert_msg(&open_err(&b, &ro()), "loops");
}

#[test]
fn refuses_too_deep_backing_chains() {
    let dir = TempDir::new();
    let mut prev = create_qcow2(&dir.path().join("img0.qcow2"), MIB, "");
    for i in 1..=MAX_BACKING_DEPTH + 1 {
        let next = dir.path().join(format!("img{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            prev.to_str().unwrap(),
            "-F",
            "qcow2",
            next.to_str().unwrap(),
        ]);
        if i == MAX_BACKING_DEPTH {
            // The longest allowed chain opens.
            open_image(&next, &ro()).unwrap();
        }
        prev = next;
    }
    assert_msg(&open_err(&prev, &ro()), "deeper than");
}

#[test]
fn refuses_missing_backing_file_and_unknown_backing_format() {
    let dir = TempDir::new();
    let base = create_qcow2(&dir.path().join("base.qcow2"), MIB, "");
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "vmdk",
        top.to_str().unwrap(),
    ]);
    assert_msg(&open_err(&top, &ro()), "\"vmdk\" is not supported");
    std::fs::remove_file(&base).unwrap();
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let err = open_err(&top, &ro());
    assert!(matches!(err, BlockError::Backing { .. }), "{err}");
    assert_msg(&err, "cannot open backing file");
}

/// Mutates random bytes of a small image's metadata and opens, reads and
/// writes the result: every outcome is fine except a panic (or a hang, or
/// an absurd allocation, which would show as a failed test run).
#[test]
fn mutated_images_never_panic() {
    let dir = TempDir::new();
    let good = create_qcow2(&dir.path().join("good.qcow2"), 2 * MIB, "cluster_size=512");
    {
        let mut img = open_rw(&good);
        for i in 0..20u64 {
            img.write_at(&pattern(3000, i), i * 99_999).unwrap();
        }
    }
    let good_bytes = std::fs::read(&good).unwrap();
    let metadata_end = 64 * 512; // header, refcount table and blocks, L1, first L2s
    let path = dir.path().join("mutant.qcow2");
    let mut rng = Rng::new(2024);
    let mut opened = 0;
    for _ in 0..400 {
        let mut bytes = good_bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(metadata_end.min(bytes.len()) as u64) as usize;
            match rng.below(3) {
                0 => bytes[i] = rng.next() as u8,
                1 => bytes[i] ^= 1 << rng.below(8),
                _ => bytes[i] = 0xff,
            }
        }
        if rng.below(10) == 0 {
            bytes.truncate(rng.below(bytes.len() as u64) as usize);
        }
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let Ok(mut img) = Qcow2Image::from_file(file, &path, &rw()) else {
            continue;
        };
        opened += 1;
        let size = img.size();
        let mut buf = vec![0u8; 8192];
        for _ in 0..8 {
            if size == 0 {
                break;
            }
            let len = (1 + rng.below(8192)).min(size);
            let off = rng.below(size - len + 1);
            let _ = img.read_at(&mut buf[..len as usize], off);
            let _ = img.write_at(&buf[..len as usize], off);
        }
        let _ = img.flush();
    }
    assert!(
        opened > 0,
        "no mutant opened at all: the test checks nothing"
    );
}
