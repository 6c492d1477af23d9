//! End-to-end tests of kite's virtio devices (virtio-blk over raw and qcow2
//! images, virtio-rng, virtio-console) with the Linux test guest's own
//! drivers as their clients.
//!
//! Most tests put a shell script at the start of a small read-only "script
//! disk" (`/dev/vda`) and boot with `kite.exec=vda`, so the stock initramfs
//! runs it; the disks under test follow as `/dev/vdb`, `/dev/vdc`, ... Each
//! script prints `KITE-*` marker lines on the serial console, and every test
//! judges both what the guest printed and what reached the host files.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pty::pty_session;
use common::*;
use serde_json::{json, Value};

/// Per-step timeout; generous because CI machines may be loaded.
const TIMEOUT: Duration = Duration::from_secs(30);

const MIB: u64 = 1 << 20;

/// Ends every script: a last marker, then `stty` (TCSETSW waits until the
/// console has sent everything) so no line is cut by the power-off.
const SCRIPT_END: &str = "echo KITE-SCRIPT-END\n$B stty onlcr\n$B poweroff -f\n";

// ---------------------------------------------------------------------------
// Guest side: scripts and their output
// ---------------------------------------------------------------------------

/// The guest's command line with `kite.exec=vda`.
fn exec_cmdline() -> String {
    format!("{} kite.exec=vda", linux_guest().cmdline)
}

/// The `--kernel/--initramfs/--cmdline/--cpus/--memory` arguments plus the
/// script disk (read-only, so `/dev/vda`) for a CLI run.
fn cli_args(script: &Path, cpus: u32) -> Vec<String> {
    let guest = linux_guest();
    vec![
        "--kernel".into(),
        guest.vmlinux.display().to_string(),
        "--initramfs".into(),
        guest.initramfs.display().to_string(),
        "--cmdline".into(),
        exec_cmdline(),
        "--cpus".into(),
        format!("boot={cpus}"),
        "--memory".into(),
        "size=256M".into(),
        "--disk".into(),
        format!("path={},readonly=on", script.display()),
    ]
}

/// Boots the guest through the CLI with `--serial tty`, runs `script`
/// (then [`SCRIPT_END`]) from the script disk, with `disks` (values of
/// `--disk`) as `/dev/vdb`, ... and `extra` arguments. Checks that kite
/// exited successfully after the script's end; returns the serial output.
fn run_script(dir: &TempDir, script: &str, disks: &[String], cpus: u32, extra: &[&str]) -> String {
    let script_path = script_disk(dir, &format!("{script}\n{SCRIPT_END}"));
    let mut args = cli_args(&script_path, cpus);
    for d in disks {
        args.push("--disk".into());
        args.push(d.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    if !extra.contains(&"--serial") {
        args.extend(["--serial".into(), "tty".into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = Instant::now();
    let out = run_kite(&args, TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kite exited with {} after {:?}\nargs: {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status,
        start.elapsed()
    );
    assert_eq!(
        count_lines(&stdout, "KITE-SCRIPT-END"),
        1,
        "the guest script did not run to its end:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

/// Fails if a guest write reported an error (see [`put`] and [`fill`]).
#[track_caller]
fn assert_writes_ok(out: &str) {
    assert!(
        !out.contains("KITE-WRITE-FAILED"),
        "a guest write failed:\n{out}"
    );
}

/// Shell: writes `text` (no single quotes) at byte `offset` of `/dev/<dev>`
/// with `conv=fsync` (the page cache is written back and the disk flushed
/// before dd returns).
fn put(dev: &str, offset: u64, text: &str) -> String {
    assert!(!text.contains('\''));
    format!(
        "printf '%s' '{text}' | $B dd of=/dev/{dev} bs=4096 seek={offset} oflag=seek_bytes conv=notrunc,fsync 2>/dev/null || echo KITE-WRITE-FAILED {dev} {offset}\n"
    )
}

/// Shell: fills `len` bytes at `offset` of `/dev/<dev>` (both multiples of
/// 4 KiB) with the letter `byte`, with `conv=fsync`.
fn fill(dev: &str, offset: u64, len: u64, byte: u8) -> String {
    assert!(
        offset.is_multiple_of(4096) && len.is_multiple_of(4096) && byte.is_ascii_alphanumeric()
    );
    format!(
        "$B dd if=/dev/zero bs=4096 count={} 2>/dev/null | $B tr '\\000' '{}' | $B dd of=/dev/{dev} bs=4096 seek={} iflag=fullblock conv=notrunc,fsync 2>/dev/null || echo KITE-WRITE-FAILED {dev} {offset}\n",
        len / 4096,
        byte as char,
        offset / 4096
    )
}

/// Shell: prints `<prefix><the bytes at offset..offset+len of /dev/<dev>>`,
/// read with O_DIRECT from the device (offset and len multiples of 512),
/// NULs removed.
fn show(prefix: &str, dev: &str, offset: u64, len: u64) -> String {
    assert!(offset.is_multiple_of(512) && len.is_multiple_of(512));
    format!(
        "echo \"{prefix}$($B dd if=/dev/{dev} bs=512 skip={} count={} iflag=direct 2>/dev/null | $B tr -d '\\000')\"\n",
        offset / 512,
        len / 512
    )
}

/// Shell: drops the guest's cached copy of `/dev/<dev>` and prints
/// `<prefix><sha256 of the whole device>`, so what the device now returns
/// is hashed.
fn sha(prefix: &str, dev: &str) -> String {
    format!(
        "$B blockdev --flushbufs /dev/{dev}\necho \"{prefix}$($B sha256sum /dev/{dev} | $B cut -d' ' -f1)\"\n"
    )
}

// ---------------------------------------------------------------------------
// Host side: images and their contents
// ---------------------------------------------------------------------------

/// Copies `bytes` into `image` at `offset`.
fn patch(image: &mut [u8], offset: u64, bytes: &[u8]) {
    let o = offset as usize;
    image[o..o + bytes.len()].copy_from_slice(bytes);
}

/// Asserts two images are identical; on a difference, says where.
#[track_caller]
fn assert_same_image(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: the image is {} bytes, expected {}",
        actual.len(),
        expected.len()
    );
    if actual != expected {
        let first = actual
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap();
        let last = actual.len()
            - 1
            - actual
                .iter()
                .rev()
                .zip(expected.iter().rev())
                .position(|(a, b)| a != b)
                .unwrap();
        let differing = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
        let end = (first + 32).min(actual.len());
        panic!(
            "{what}: {differing} bytes differ between offsets {first:#x} and {last:#x}; at {first:#x}: got {:?}, expected {:?}",
            String::from_utf8_lossy(&actual[first..end]),
            String::from_utf8_lossy(&expected[first..end])
        );
    }
}

/// The host's sha256 of a file.
fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img (is it installed?)")
}

/// `qemu-img create -f qcow2 PATH SIZE` (plus `extra` options).
fn qcow2_create(path: &Path, size: &str, extra: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    let p = path.to_str().unwrap();
    args.push(p);
    if !size.is_empty() {
        args.push(size);
    }
    let out = qemu_img(&args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check`: the exit code and all output.
fn qcow2_check(path: &Path) -> (Option<i32>, String) {
    let out = qemu_img(&["check", path.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// `qemu-img check` finds neither errors nor leaks.
#[track_caller]
fn assert_qcow2_clean(path: &Path) {
    let (code, text) = qcow2_check(path);
    assert_eq!(code, Some(0), "qemu-img check {}:\n{text}", path.display());
    assert!(
        text.contains("No errors were found") && !text.contains("leaked"),
        "qemu-img check {}:\n{text}",
        path.display()
    );
}

/// The guest-visible contents of a qcow2 image, by `qemu-img convert`.
fn qcow2_contents(path: &Path, dir: &TempDir) -> Vec<u8> {
    let raw = dir.path(&format!(
        "{}.converted",
        path.file_name().unwrap().to_str().unwrap()
    ));
    let out = qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "qemu-img convert {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let data = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    data
}

/// Writes `data` to a new file and syncs it, so that its blocks are
/// allocated on disk.
fn write_synced(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

// ---------------------------------------------------------------------------
// 1-2: raw images
// ---------------------------------------------------------------------------

#[test]
fn raw_disk_guest_writes_reach_the_file_exactly() {
    let dir = TempDir::new("vl-raw-write");
    let disk = dir.path("data.raw");
    let size = 16 * MIB;
    let original = noise(size as usize, 1);
    write_synced(&disk, &original);

    let writes: &[(u64, &str)] = &[
        (0, "KITE-RAW-A-start-of-disk"),
        // Unaligned, crossing a sector boundary.
        (5100, "KITE-RAW-B-crosses-a-sector-boundary"),
        // Unaligned, crossing a 4 KiB page boundary.
        (3 * MIB + 4090, "KITE-RAW-C-crosses-a-page"),
        // The very last bytes of the disk.
        (size - 20, "KITE-RAW-E-disk-end!"),
    ];
    let mut script = String::new();
    for (offset, text) in writes {
        script += &put("vdb", *offset, text);
    }
    script += &fill("vdb", 8 * MIB, MIB, b'K');
    // O_DIRECT in 2 MiB writes: requests larger than the device's 1 MiB
    // I/O chunk.
    script += "$B dd if=/dev/zero bs=65536 count=32 2>/dev/null | $B tr '\\000' 'L' > /tmp/l\n";
    script += "$B dd if=/tmp/l of=/dev/vdb bs=2M seek=5 oflag=direct conv=notrunc,fsync 2>/dev/null || echo KITE-WRITE-FAILED L\n";
    script += "echo \"KITE-READ-A: $($B dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | $B head -c 24)\"\n";
    script += &sha("KITE-SHA: ", "vdb");
    script += "echo \"KITE-SIZE: $($B cat /sys/block/vdb/size)\"\n";

    let out = run_script(&dir, &script, &[format!("path={}", disk.display())], 1, &[]);
    assert_writes_ok(&out);
    assert_eq!(expect_field(&out, "KITE-SIZE: "), "32768", "{out}");
    // The start of sector 0 as the guest reads it back from the device
    // (the rest of the sector is noise, so compare the prefix).
    assert_eq!(
        expect_field(&out, "KITE-READ-A: "),
        "KITE-RAW-A-start-of-disk",
        "{out}"
    );

    let mut expected = original;
    for (offset, text) in writes {
        patch(&mut expected, *offset, text.as_bytes());
    }
    patch(&mut expected, 8 * MIB, &vec![b'K'; MIB as usize]);
    patch(&mut expected, 10 * MIB, &vec![b'L'; 2 * MIB as usize]);
    assert_same_image(
        &fs::read(&disk).unwrap(),
        &expected,
        "raw image after the guest's writes",
    );
    assert_eq!(
        expect_field(&out, "KITE-SHA: "),
        sha256_file(&disk),
        "the guest's sha256 of /dev/vdb differs from the host's of the file:\n{out}"
    );
}

#[test]
fn raw_disk_host_data_is_read_by_the_guest() {
    let dir = TempDir::new("vl-raw-read");
    let disk = dir.path("data.raw");
    // 4 MiB plus a partial sector, which the guest must not see.
    let size = 4 * MIB + 100;
    let mut original = vec![0u8; size as usize];
    let token = format!("KITE-HOST-WROTE-{}", std::process::id());
    patch(&mut original, MIB, token.as_bytes());
    patch(&mut original, 4 * MIB - 512, b"KITE-HOST-LAST-SECTOR");
    patch(&mut original, 4 * MIB, b"KITE-PARTIAL-SECTOR");
    fs::write(&disk, &original).unwrap();

    let mut script = String::new();
    script += "echo \"KITE-SIZE: $($B cat /sys/block/vdb/size)\"\n";
    script += &show("KITE-AT-1M: ", "vdb", MIB, 4096);
    script += &show("KITE-LAST: ", "vdb", 4 * MIB - 512, 512);
    script += &show("KITE-FIRST: ", "vdb", 0, 4096);
    let out = run_script(&dir, &script, &[format!("path={}", disk.display())], 1, &[]);

    assert_eq!(expect_field(&out, "KITE-SIZE: "), "8192", "{out}");
    assert_eq!(expect_field(&out, "KITE-AT-1M: "), token, "{out}");
    assert_eq!(
        expect_field(&out, "KITE-LAST: "),
        "KITE-HOST-LAST-SECTOR",
        "{out}"
    );
    assert_eq!(expect_field(&out, "KITE-FIRST: "), "", "{out}");
    assert_same_image(
        &fs::read(&disk).unwrap(),
        &original,
        "raw image only read by the guest",
    );
}

// ---------------------------------------------------------------------------
// 3-4: qcow2 images
// ---------------------------------------------------------------------------

#[test]
fn qcow2_guest_writes_are_consistent_and_exact() {
    let dir = TempDir::new("vl-qcow2");
    let disk = dir.path("d.qcow2");
    let size = 64 * MIB;
    qcow2_create(&disk, "64M", &[]);

    let writes: &[(u64, &str)] = &[
        (0, "KITE-QCOW2-A-first-cluster"),
        // Across the boundary of the first two 64 KiB clusters.
        (65536 - 10, "KITE-QCOW2-B-crosses-a-cluster"),
        (3 * MIB + 1000, "KITE-QCOW2-C-unaligned"),
        (size - 20, "KITE-QCOW2-E-the-end"),
    ];
    let mut script = String::new();
    for (offset, text) in writes {
        script += &put("vdb", *offset, text);
    }
    // 300 KiB starting 4 KiB into a cluster: partial clusters at both ends.
    script += &fill("vdb", 10 * MIB + 4096, 300 << 10, b'Q');
    script += &show("KITE-READ-C: ", "vdb", 3 * MIB, 4096);
    script += &sha("KITE-SHA: ", "vdb");
    script += "echo \"KITE-SIZE: $($B cat /sys/block/vdb/size)\"\n";

    let out = run_script(
        &dir,
        &script,
        &[format!("path={},image_type=qcow2", disk.display())],
        1,
        &[],
    );
    assert_writes_ok(&out);
    assert_eq!(expect_field(&out, "KITE-SIZE: "), "131072", "{out}");
    assert_eq!(
        expect_field(&out, "KITE-READ-C: "),
        "KITE-QCOW2-C-unaligned",
        "{out}"
    );

    assert_qcow2_clean(&disk);
    let mut expected = vec![0u8; size as usize];
    for (offset, text) in writes {
        patch(&mut expected, *offset, text.as_bytes());
    }
    patch(&mut expected, 10 * MIB + 4096, &vec![b'Q'; 300 << 10]);
    let contents = qcow2_contents(&disk, &dir);
    assert_same_image(&contents, &expected, "qcow2 image after the guest's writes");
    let converted = dir.path("expected.raw");
    fs::write(&converted, &contents).unwrap();
    assert_eq!(
        expect_field(&out, "KITE-SHA: "),
        sha256_file(&converted),
        "the guest's sha256 of /dev/vdb differs from the image's contents:\n{out}"
    );
}

#[test]
fn qcow2_overlay_reads_its_backing_file_and_leaves_it_alone() {
    let dir = TempDir::new("vl-backing");
    let base = dir.path("base.raw");
    let overlay = dir.path("ov.qcow2");
    let size = 8 * MIB;
    let mut base_data = noise(size as usize, 4);
    patch(&mut base_data, 2 * MIB, b"KITE-BASE-TOKEN-AT-2M");
    // A 512-byte text-only sector the guest can print.
    let mut text_sector = vec![0u8; 512];
    text_sector[..19].copy_from_slice(b"KITE-BASE-SECTOR-6M");
    patch(&mut base_data, 6 * MIB, &text_sector);
    fs::write(&base, &base_data).unwrap();
    let base_sha = sha256_file(&base);
    qcow2_create(&overlay, "", &["-b", base.to_str().unwrap(), "-F", "raw"]);

    let mut script = String::new();
    script += &sha("KITE-SHA-BEFORE: ", "vdb");
    script += &show("KITE-BASE-6M: ", "vdb", 6 * MIB, 512);
    // Into the cluster holding the base token: copy-on-write must keep the
    // rest of that cluster's base data.
    script += &put("vdb", 2 * MIB + 100, "KITE-OVERLAY-NEW");
    // 64 KiB over two clusters, each partially.
    script += &fill("vdb", 5 * MIB - 32768, 65536, b'O');
    script += &show("KITE-BASE-6M-AFTER: ", "vdb", 6 * MIB, 512);
    script += &sha("KITE-SHA-AFTER: ", "vdb");
    let out = run_script(
        &dir,
        &script,
        &[format!("path={}", overlay.display())],
        1,
        &[],
    );
    assert_writes_ok(&out);

    assert_eq!(
        expect_field(&out, "KITE-SHA-BEFORE: "),
        base_sha,
        "the guest does not see the backing file's data through the overlay:\n{out}"
    );
    assert_eq!(
        expect_field(&out, "KITE-BASE-6M: "),
        "KITE-BASE-SECTOR-6M",
        "{out}"
    );
    assert_eq!(
        expect_field(&out, "KITE-BASE-6M-AFTER: "),
        "KITE-BASE-SECTOR-6M",
        "{out}"
    );

    assert_same_image(&fs::read(&base).unwrap(), &base_data, "backing file");
    assert_eq!(sha256_file(&base), base_sha, "the backing file changed");
    assert_qcow2_clean(&overlay);
    let mut expected = base_data.clone();
    patch(&mut expected, 2 * MIB + 100, b"KITE-OVERLAY-NEW");
    patch(&mut expected, 5 * MIB - 32768, &[b'O'; 65536]);
    let contents = qcow2_contents(&overlay, &dir);
    assert_same_image(&contents, &expected, "overlay after the guest's writes");
    let converted = dir.path("expected.raw");
    fs::write(&converted, &contents).unwrap();
    assert_eq!(
        expect_field(&out, "KITE-SHA-AFTER: "),
        sha256_file(&converted),
        "{out}"
    );
}

// ---------------------------------------------------------------------------
// 5: read-only disks
// ---------------------------------------------------------------------------

#[test]
fn readonly_disk_refuses_writes() {
    let dir = TempDir::new("vl-ro");
    let disk = dir.path("ro.raw");
    let mut original = noise(4 * MIB as usize, 5);
    let mut sector = vec![0u8; 512];
    sector[..17].copy_from_slice(b"KITE-RO-READ-BACK");
    patch(&mut original, MIB, &sector);
    fs::write(&disk, &original).unwrap();
    let mtime = fs::metadata(&disk).unwrap().modified().unwrap();

    let script = r#"
echo "KITE-GETRO: $($B blockdev --getro /dev/vdb)"
echo "KITE-SYSFS-RO: $($B cat /sys/block/vdb/ro)"
printf 'KITE-MUST-NOT-LAND' | $B dd of=/dev/vdb bs=512 conv=notrunc,fsync 2>/dev/null
echo "KITE-DD-RC: $?"
# Even with the block layer's flag cleared, the device must refuse.
$B blockdev --setrw /dev/vdb 2>/dev/null
$B dd if=/dev/zero bs=4096 count=1 2>/dev/null | $B tr '\000' 'W' | $B dd of=/dev/vdb bs=4096 seek=1 oflag=direct conv=notrunc,fsync 2>/dev/null
echo "KITE-DD2-RC: $?"
$B blockdev --flushbufs /dev/vdb
"#
    .to_string()
        + &show("KITE-READ: ", "vdb", MIB, 512);
    let out = run_script(
        &dir,
        &script,
        &[format!("path={},readonly=on", disk.display())],
        1,
        &[],
    );
    assert_eq!(expect_field(&out, "KITE-GETRO: "), "1", "{out}");
    assert_eq!(expect_field(&out, "KITE-SYSFS-RO: "), "1", "{out}");
    assert_ne!(
        expect_field(&out, "KITE-DD-RC: "),
        "0",
        "a write to a read-only disk succeeded:\n{out}"
    );
    assert_ne!(
        expect_field(&out, "KITE-DD2-RC: "),
        "0",
        "a direct write to a read-only disk succeeded:\n{out}"
    );
    assert_eq!(
        expect_field(&out, "KITE-READ: "),
        "KITE-RO-READ-BACK",
        "{out}"
    );
    assert_same_image(&fs::read(&disk).unwrap(), &original, "read-only image");
    assert_eq!(
        fs::metadata(&disk).unwrap().modified().unwrap(),
        mtime,
        "read-only image was written"
    );
}

// ---------------------------------------------------------------------------
// 6: several disks, several queues
// ---------------------------------------------------------------------------

#[test]
fn several_disks_and_queues_with_two_vcpus() {
    let dir = TempDir::new("vl-multi");
    let b = dir.path("b.raw");
    let c = dir.path("c.raw");
    let d = dir.path("d.qcow2");
    fs::File::create(&b).unwrap().set_len(4 * MIB).unwrap();
    fs::File::create(&c).unwrap().set_len(8 * MIB).unwrap();
    qcow2_create(&d, "16M", &[]);

    // On each 2-queue disk, one writer per vCPU at the same time, with
    // O_DIRECT so that each request goes out on its submitting CPU's queue.
    // On the qcow2 disk both allocate clusters concurrently (4 KiB requests,
    // 16 per cluster; the second range is not cluster-aligned).
    let mut script = String::from(
        r#"
for d in vdb vdc vdd; do
  echo "KITE-SIZE-$d: $($B cat /sys/block/$d/size)"
  echo "KITE-VIRTIO-$d: $($B basename $($B readlink /sys/block/$d/device))"
  echo "KITE-MQ-$d: $($B ls /sys/block/$d/mq | $B tr '\n' ' ')"
done
$B dd if=/dev/zero bs=65536 count=4 2>/dev/null | $B tr '\000' 'Z' > /tmp/z
$B dd if=/dev/zero bs=65536 count=4 2>/dev/null | $B tr '\000' 'Y' > /tmp/y
$B dd if=/dev/zero bs=65536 count=32 2>/dev/null | $B tr '\000' 'P' > /tmp/p
$B dd if=/dev/zero bs=65536 count=32 2>/dev/null | $B tr '\000' 'R' > /tmp/r
$B taskset 1 $B dd if=/tmp/z of=/dev/vdc bs=4096 seek=256 oflag=direct conv=notrunc,fsync 2>/dev/null || echo KITE-WRITE-FAILED c0 &
$B taskset 2 $B dd if=/tmp/y of=/dev/vdc bs=4096 seek=512 oflag=direct conv=notrunc,fsync 2>/dev/null || echo KITE-WRITE-FAILED c1 &
$B taskset 1 $B dd if=/tmp/p of=/dev/vdd bs=4096 seek=256 oflag=direct conv=notrunc,fsync 2>/dev/null || echo KITE-WRITE-FAILED d0 &
$B taskset 2 $B dd if=/tmp/r of=/dev/vdd bs=4096 seek=1281 oflag=direct conv=notrunc,fsync 2>/dev/null || echo KITE-WRITE-FAILED d1 &
wait
for q in /sys/block/vdc/mq/*; do echo "KITE-CPULIST: $q $($B cat $q/cpu_list)"; done
"#,
    );
    script += &put("vdb", 4096 + 7, "KITE-DISK-B");
    script += &put("vdc", 7 * MIB, "KITE-DISK-C");
    script += &put("vdd", 9 * MIB + 3, "KITE-DISK-D");
    script += &show("KITE-READ-B: ", "vdb", 4096, 512);
    script += "$B grep -E 'virtio[0-9]+-' /proc/interrupts | while read l; do echo \"KITE-IRQ: $l\"; done\n";
    let out = run_script(
        &dir,
        &script,
        &[
            format!("path={},direct=on", b.display()),
            format!("path={},num_queues=2", c.display()),
            format!("path={},num_queues=2,queue_size=256", d.display()),
        ],
        2,
        &[],
    );
    assert_writes_ok(&out);
    for (dev, sectors) in [("vdb", 8192), ("vdc", 16384), ("vdd", 32768)] {
        assert_eq!(
            expect_field(&out, &format!("KITE-SIZE-{dev}: ")),
            sectors.to_string(),
            "{out}"
        );
    }
    assert_eq!(expect_field(&out, "KITE-READ-B: "), "KITE-DISK-B", "{out}");

    // One blk-mq hardware queue and one MSI-X vector per virtqueue, named
    // after it; on the 2-queue disks both vectors fired.
    let irqs = irq_lines(&out);
    for (dev, queues) in [("vdb", 1), ("vdc", 2), ("vdd", 2)] {
        let want: Vec<String> = (0..queues).map(|q| q.to_string()).collect();
        assert_eq!(
            expect_field(&out, &format!("KITE-MQ-{dev}: ")),
            format!("{} ", want.join(" ")),
            "{dev} hardware queues:\n{out}"
        );
        let virtio = expect_field(&out, &format!("KITE-VIRTIO-{dev}: "));
        let prefix = format!("{virtio}-req.");
        let vectors: Vec<&(String, u64)> = irqs
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect();
        let names: Vec<&str> = vectors.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<String> = (0..queues).map(|q| format!("{prefix}{q}")).collect();
        assert_eq!(
            names, want,
            "{dev} (num_queues={queues}) should have one MSI-X vector per queue:\n{out}"
        );
        for (name, count) in vectors {
            assert!(*count > 0, "no interrupt on {name}:\n{out}");
        }
    }

    let mut expected = vec![0u8; 4 * MIB as usize];
    patch(&mut expected, 4096 + 7, b"KITE-DISK-B");
    assert_same_image(&fs::read(&b).unwrap(), &expected, "disk b (direct=on)");
    let mut expected = vec![0u8; 8 * MIB as usize];
    patch(&mut expected, MIB, &[b'Z'; 256 << 10]);
    patch(&mut expected, 2 * MIB, &[b'Y'; 256 << 10]);
    patch(&mut expected, 7 * MIB, b"KITE-DISK-C");
    assert_same_image(&fs::read(&c).unwrap(), &expected, "disk c (two queues)");
    assert_qcow2_clean(&d);
    let mut expected = vec![0u8; 16 * MIB as usize];
    patch(&mut expected, MIB, &[b'P'; 2 << 20]);
    patch(&mut expected, 1281 * 4096, &[b'R'; 2 << 20]);
    patch(&mut expected, 9 * MIB + 3, b"KITE-DISK-D");
    assert_same_image(
        &qcow2_contents(&d, &dir),
        &expected,
        "disk d (qcow2, two queues)",
    );
}

#[test]
fn devices_work_again_after_a_guest_reboot() {
    let dir = TempDir::new("vl-reboot");
    let disk = dir.path("r.qcow2");
    let console = dir.path("console.txt");
    qcow2_create(&disk, "16M", &[]);
    // More queues than vCPUs: the guest enables only two of the four.
    let mut script = String::from(
        r#"
seen="$($B dd if=/dev/vdb bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | $B tr -d '\000')"
echo "KITE-BOOT-SAW: [$seen]"
echo "KITE-MQ: $($B ls /sys/block/vdb/mq | $B tr '\n' ' ')"
echo "KITE-RNG-BYTES: $($B dd if=/dev/hwrng bs=16 count=1 2>/dev/null | $B wc -c)"
echo "KITE-HVC-BOOT [$seen]" > /dev/hvc0
if [ "$seen" = KITE-BOOT-1-WROTE ]; then
"#,
    );
    script += &put("vdb", 2 * MIB, "KITE-BOOT-2-WROTE");
    script += "echo KITE-SECOND-BOOT-DONE\nelse\n";
    script += &put("vdb", MIB, "KITE-BOOT-1-WROTE");
    script += &fill("vdb", 3 * MIB, 256 << 10, b'M');
    script += "echo KITE-REBOOTING\n$B stty onlcr\n$B reboot -f\nfi\n";
    let console_arg = format!("file={}", console.display());
    let out = run_script(
        &dir,
        &script,
        &[format!("path={},num_queues=4,direct=on", disk.display())],
        2,
        &["--console", &console_arg],
    );
    assert_writes_ok(&out);
    assert_eq!(count_lines(&out, "KITE-GUEST-UP"), 2, "{out}");
    assert_eq!(count_lines(&out, "KITE-REBOOTING"), 1, "{out}");
    assert_eq!(count_lines(&out, "KITE-SECOND-BOOT-DONE"), 1, "{out}");
    let saw: Vec<&str> = lines(&out)
        .into_iter()
        .filter_map(|l| l.strip_prefix("KITE-BOOT-SAW: "))
        .collect();
    assert_eq!(saw, ["[]", "[KITE-BOOT-1-WROTE]"], "{out}");
    for prefix in ["KITE-MQ: ", "KITE-RNG-BYTES: "] {
        let values: Vec<&str> = lines(&out)
            .into_iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect();
        let want = if prefix == "KITE-MQ: " { "0 1 " } else { "16" };
        assert_eq!(values, [want, want], "{prefix} on both boots:\n{out}");
    }
    let hvc = fs::read_to_string(&console).unwrap().replace('\r', "");
    assert!(
        hvc.contains("KITE-HVC-BOOT []\n") && hvc.contains("KITE-HVC-BOOT [KITE-BOOT-1-WROTE]\n"),
        "the virtio-console did not carry both boots' lines:\n{hvc}"
    );

    assert_qcow2_clean(&disk);
    let mut expected = vec![0u8; 16 * MIB as usize];
    patch(&mut expected, MIB, b"KITE-BOOT-1-WROTE");
    patch(&mut expected, 2 * MIB, b"KITE-BOOT-2-WROTE");
    patch(&mut expected, 3 * MIB, &[b'M'; 256 << 10]);
    assert_same_image(
        &qcow2_contents(&disk, &dir),
        &expected,
        "qcow2 image written across a reboot",
    );
}

// ---------------------------------------------------------------------------
// 7: discard
// ---------------------------------------------------------------------------

#[test]
fn discard_frees_host_blocks() {
    let dir = TempDir::new("vl-discard");
    let b = dir.path("b.raw");
    let c = dir.path("c.raw");
    let b_data = noise(64 * MIB as usize, 7);
    let c_data = noise(32 * MIB as usize, 8);
    write_synced(&b, &b_data);
    write_synced(&c, &c_data);
    let blocks = |p: &Path| fs::metadata(p).unwrap().blocks();
    let (b_before, c_before) = (blocks(&b), blocks(&c));
    // st_blocks counts 512-byte units.
    assert!(b_before >= 64 * MIB / 512 && c_before >= 32 * MIB / 512);

    let script = r#"
echo "KITE-DISCARD-MAX: $($B cat /sys/block/vdb/queue/discard_max_bytes)"
$B blkdiscard -o 16777216 -l 33554432 /dev/vdb
echo "KITE-DISCARD-B-RC: $?"
$B blkdiscard /dev/vdc
echo "KITE-DISCARD-C-RC: $?"
"#;
    let out = run_script(
        &dir,
        script,
        &[
            format!("path={}", b.display()),
            format!("path={}", c.display()),
        ],
        1,
        &[],
    );
    let max: u64 = expect_field(&out, "KITE-DISCARD-MAX: ").parse().unwrap();
    assert!(max > 0, "the guest sees no discard support:\n{out}");
    assert_eq!(expect_field(&out, "KITE-DISCARD-B-RC: "), "0", "{out}");
    assert_eq!(expect_field(&out, "KITE-DISCARD-C-RC: "), "0", "{out}");

    let (b_after, c_after) = (blocks(&b), blocks(&c));
    let freed_b = b_before.saturating_sub(b_after) * 512;
    assert!(
        freed_b >= 30 * MIB,
        "discarding 32 MiB of b freed only {freed_b} bytes ({b_before} -> {b_after} blocks)"
    );
    assert!(
        c_after * 512 <= 2 * MIB,
        "discarding all of c left {} bytes allocated ({c_before} -> {c_after} blocks)",
        c_after * 512
    );
    // The sizes stay; b's data outside the discarded range stays.
    assert_eq!(fs::metadata(&b).unwrap().len(), 64 * MIB);
    assert_eq!(fs::metadata(&c).unwrap().len(), 32 * MIB);
    let now = fs::read(&b).unwrap();
    let (lo, hi) = (16 * MIB as usize, 48 * MIB as usize);
    assert_same_image(&now[..lo], &b_data[..lo], "b before the discarded range");
    assert_same_image(&now[hi..], &b_data[hi..], "b after the discarded range");
}

// ---------------------------------------------------------------------------
// 8: virtio-rng (through the API, for its counters)
// ---------------------------------------------------------------------------

/// A `vm.create` body: the Linux guest with `kite.exec=vda`, serial to
/// `serial`, and `disks` (the script disk must be the first).
fn api_config(serial: &Path, cpus: u8, disks: Value) -> Value {
    let guest = linux_guest();
    let mut v: Value = serde_json::from_str(&vm_config(
        &guest.vmlinux,
        Some(&guest.initramfs),
        &exec_cmdline(),
        cpus,
        256,
        serial,
    ))
    .unwrap();
    v["disks"] = disks;
    v
}

/// Shell: opens the power button's event device. Run it before telling the
/// host to press the button, so the event cannot be missed.
const OPEN_BUTTON: &str = "exec 4</dev/input/event0\n";

/// Shell: blocks until the host presses the power button (`vm.power-button`).
const WAIT_BUTTON: &str = "$B dd bs=24 count=1 <&4 >/dev/null 2>&1\n";

/// Shell: idles until the host shuts the VM down.
const IDLE: &str = "while true; do $B sleep 1; done\n";

#[test]
fn virtio_rng_feeds_hwrng() {
    let dir = TempDir::new("vl-rng");
    let script = format!(
        r#"
echo "KITE-RNG-CURRENT: $($B cat /sys/class/misc/hw_random/rng_current)"
echo "KITE-RNG-A: $($B dd if=/dev/hwrng bs=64 count=1 2>/dev/null | $B od -An -tx1 -v | $B tr -d ' \n')"
echo "KITE-RNG-B: $($B dd if=/dev/hwrng bs=64 count=1 2>/dev/null | $B od -An -tx1 -v | $B tr -d ' \n')"
{OPEN_BUTTON}echo KITE-RNG-WAIT
{WAIT_BUTTON}
echo "KITE-RNG-4K: $($B dd if=/dev/hwrng bs=4096 count=1 iflag=fullblock 2>/dev/null | $B wc -c)"
echo KITE-RNG-DONE
{IDLE}"#
    );
    let disk = script_disk(&dir, &script);
    let kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.txt");
    let mut config = api_config(&serial, 1, json!([{"path": disk, "readonly": true}]));
    config["rng"] = json!({"src": "/dev/urandom"});
    kite.put_ok("vm.create", Some(&config.to_string()));
    kite.put_ok("vm.boot", None);

    let out = wait_for_file(&serial, "KITE-RNG-WAIT\r\n", TIMEOUT);
    let before = kite.counters();
    assert!(
        expect_field(&out, "KITE-RNG-CURRENT: ").contains("virtio"),
        "hw_random does not use virtio-rng:\n{out}"
    );
    let a = expect_field(&out, "KITE-RNG-A: ");
    let b = expect_field(&out, "KITE-RNG-B: ");
    for r in [a, b] {
        assert_eq!(r.len(), 128, "not 64 bytes in hex: {r:?}\n{out}");
        assert!(r.chars().all(|c| c.is_ascii_hexdigit()), "{r:?}");
        assert!(
            r.chars().any(|c| c != '0'),
            "64 zero bytes from /dev/hwrng:\n{out}"
        );
    }
    assert_ne!(a, b, "two reads of /dev/hwrng gave the same 64 bytes");

    kite.put_ok("vm.power-button", None);
    let out = wait_for_file(&serial, "KITE-RNG-DONE\r\n", TIMEOUT);
    assert_eq!(expect_field(&out, "KITE-RNG-4K: "), "4096", "{out}");
    let after = kite.counters();
    let grown =
        counter(&after, "__rng", "entropy_bytes") - counter(&before, "__rng", "entropy_bytes");
    assert!(
        grown >= 2048,
        "reading 4096 bytes of /dev/hwrng grew __rng.entropy_bytes by only {grown}: {before} -> {after}"
    );
    assert!(counter(&after, "__rng", "requests") > counter(&before, "__rng", "requests"));
    kite.put_ok("vm.shutdown", None);
    kite.wait_state("Shutdown", TIMEOUT);
}

// ---------------------------------------------------------------------------
// 9: virtio-console
// ---------------------------------------------------------------------------

#[test]
fn virtio_console_output_to_a_file() {
    let dir = TempDir::new("vl-hvc-file");
    let console = dir.path("console.txt");
    let script = r#"
echo KITE-HVC0-HELLO > /dev/hvc0
$B seq 1 5000 > /dev/hvc0
$B stty -F /dev/hvc0 onlcr
echo KITE-HVC-WRITTEN
"#;
    let console_arg = format!("file={}", console.display());
    let out = run_script(&dir, script, &[], 1, &["--console", &console_arg]);
    assert_eq!(count_lines(&out, "KITE-HVC-WRITTEN"), 1, "{out}");
    assert_eq!(
        count_lines(&out, "KITE-HVC0-HELLO"),
        0,
        "hvc0 output on the serial port:\n{out}"
    );
    let text = fs::read_to_string(&console).unwrap().replace('\r', "");
    let mut expected = String::from("KITE-HVC0-HELLO\n");
    for i in 1..=5000 {
        expected += &format!("{i}\n");
    }
    assert!(
        text.contains(&expected),
        "the console file does not hold exactly what the guest wrote to hvc0 ({} bytes):\n{}",
        text.len(),
        &text[..text.len().min(2000)]
    );
    assert!(
        !text.contains("KITE-SCRIPT-END"),
        "serial output in the console file"
    );
}

#[test]
fn kernel_console_on_hvc0() {
    let guest = linux_guest();
    let dir = TempDir::new("vl-hvc-kernel");
    let console = dir.path("console.txt");
    let cmdline = guest.cmdline.replace("console=ttyS0", "console=hvc0");
    assert!(cmdline.contains("console=hvc0"), "{cmdline}");
    let console_arg = format!("file={}", console.display());
    let out = run_kite(
        &[
            "--kernel",
            guest.vmlinux.to_str().unwrap(),
            "--initramfs",
            guest.initramfs.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--memory",
            "size=256M",
            "--serial",
            "tty",
            "--console",
            &console_arg,
        ],
        TIMEOUT,
    );
    let text = fs::read_to_string(&console).unwrap_or_default();
    assert!(
        out.status.success(),
        "kite exited with {}; console:\n{text}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The stock /init's report, all of it on the virtio-console.
    assert_eq!(count_lines(&text, "KITE-GUEST-UP"), 1, "{text}");
    assert_eq!(expect_field(&text, "KITE-CMDLINE: "), cmdline, "{text}");
    assert_eq!(count_lines(&text, "KITE-GUEST-DONE"), 1, "{text}");
    let serial = String::from_utf8_lossy(&out.stdout);
    assert!(
        !serial.contains("KITE-GUEST-UP"),
        "the guest's console went to the serial port:\n{serial}"
    );
}

#[test]
fn virtio_console_interactive_on_a_pty() {
    let guest = linux_guest();
    let dir = TempDir::new("vl-hvc-pty");
    let serial = dir.path("serial.txt");
    let initramfs = dir.path("initramfs");
    initramfs_with_init(
        &guest,
        "echo KITE-INIT-UP\n\
         exec 3<>/dev/hvc0\n\
         echo KITE-HVC-READY >&3\n\
         $B sh <&3 >&3 2>&3\n\
         echo KITE-SHELL-EXITED\n\
         $B stty onlcr\n\
         $B poweroff -f",
        &initramfs,
    );
    let serial_arg = format!("file={}", serial.display());
    let mut cmd = Command::new(kite_bin());
    cmd.args(["--kernel", guest.vmlinux.to_str().unwrap()])
        .args(["--initramfs", initramfs.to_str().unwrap()])
        .args(["--cmdline", &guest.cmdline])
        .args(["--cpus", "boot=1", "--memory", "size=256M"])
        .args(["--serial", &serial_arg, "--console", "tty"]);
    let (status, pty) = pty_session(cmd, TIMEOUT, |pty| {
        let at = pty.wait(0, "KITE-HVC-READY");
        pty.write("echo kite-$((6*7))-hvc\n");
        let at = pty.wait(at, "kite-42-hvc");
        pty.write("echo \"KITE-CPUS-$(/bin/busybox nproc)\"\n");
        pty.wait(at, "KITE-CPUS-1");
        pty.write("exit\n");
    });
    let serial_text = fs::read_to_string(&serial).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("kite did not exit after the hvc0 shell ended; serial:\n{serial_text}")
    });
    assert!(
        status.success(),
        "kite exited with {status}; pty:\n{pty}\nserial:\n{serial_text}"
    );
    assert_eq!(
        count_lines(&serial_text, "KITE-INIT-UP"),
        1,
        "{serial_text}"
    );
    assert_eq!(
        count_lines(&serial_text, "KITE-SHELL-EXITED"),
        1,
        "{serial_text}"
    );
    assert!(
        !pty.contains("KITE-INIT-UP"),
        "serial output on the virtio-console:\n{pty}"
    );
}

// ---------------------------------------------------------------------------
// 10: FLUSH survives SIGKILL
// ---------------------------------------------------------------------------

#[test]
fn flushed_writes_survive_sigkill() {
    let dir = TempDir::new("vl-flush");
    let raw = dir.path("f.raw");
    let qcow2 = dir.path("f.qcow2");
    let serial = dir.path("serial.txt");
    fs::File::create(&raw).unwrap().set_len(16 * MIB).unwrap();
    qcow2_create(&qcow2, "64M", &[]);

    // Chunks of 64 KiB (raw) and 128 KiB (qcow2, two clusters) at offsets
    // spread over the disks, so that several L2 tables and refcount blocks
    // are needed; each letter its own.
    let raw_chunks: Vec<(u64, u8)> = (0..6u64)
        .map(|i| (i * 2 * MIB + i * 8192, b'a' + i as u8))
        .collect();
    let qcow2_chunks: Vec<(u64, u8)> = (0..12u64)
        .map(|i| (i * 5 * MIB + i * 4096, b'A' + i as u8))
        .collect();
    let mut script = String::new();
    for (offset, letter) in &raw_chunks {
        script += &fill("vdb", *offset, 65536, *letter);
    }
    for (offset, letter) in &qcow2_chunks {
        script += &fill("vdc", *offset, 131072, *letter);
    }
    script += "echo KITE-FLUSHED\n";
    script += IDLE;
    let disk = script_disk(&dir, &script);
    let mut args = cli_args(&disk, 1);
    args.extend([
        "--disk".into(),
        format!("path={}", raw.display()),
        "--disk".into(),
        format!("path={},image_type=qcow2", qcow2.display()),
        "--serial".into(),
        format!("file={}", serial.display()),
    ]);
    let mut child: Child = Command::new(kite_bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let waited = std::panic::catch_unwind(|| wait_for_file(&serial, "KITE-FLUSHED\r\n", TIMEOUT));
    // SIGKILL: nothing kite still holds in memory reaches the files now.
    child.kill().unwrap();
    child.wait().unwrap();
    let out = match waited {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e),
    };
    assert_writes_ok(&out);

    let mut expected = vec![0u8; 16 * MIB as usize];
    for (offset, letter) in &raw_chunks {
        patch(&mut expected, *offset, &[*letter; 65536]);
    }
    assert_same_image(
        &fs::read(&raw).unwrap(),
        &expected,
        "raw image after SIGKILL",
    );

    let (code, text) = qcow2_check(&qcow2);
    assert!(
        matches!(code, Some(0) | Some(3))
            && !text.contains("ERROR")
            && !text.to_lowercase().contains("corrupt"),
        "qemu-img check after SIGKILL (exit {code:?}):\n{text}"
    );
    let mut expected = vec![0u8; 64 * MIB as usize];
    for (offset, letter) in &qcow2_chunks {
        patch(&mut expected, *offset, &[*letter; 131072]);
    }
    assert_same_image(
        &qcow2_contents(&qcow2, &dir),
        &expected,
        "qcow2 image after SIGKILL",
    );
}

// ---------------------------------------------------------------------------
// 11: counters and device tree
// ---------------------------------------------------------------------------

#[test]
fn block_counters_and_device_tree() {
    let dir = TempDir::new("vl-counters");
    let data = dir.path("data.raw");
    fs::File::create(&data).unwrap().set_len(16 * MIB).unwrap();
    // The guest reads 3 MiB and writes 2 MiB with O_DIRECT (no readahead,
    // no caching), then flushes.
    let (n, m) = (3 * MIB, 2 * MIB);
    let script = format!(
        r#"
for d in /sys/bus/pci/devices/*; do echo "KITE-PCI: ${{d##*/}} $($B cat $d/vendor) $($B cat $d/device)"; done
echo "KITE-VDB-PCI: $($B basename $($B dirname $($B readlink -f /sys/block/vdb/device)))"
{OPEN_BUTTON}echo KITE-IO-READY
{WAIT_BUTTON}
$B dd if=/dev/vdb of=/dev/null bs=65536 count=48 iflag=direct 2>/dev/null || echo KITE-READ-FAILED
$B dd if=/dev/zero of=/dev/vdb bs=65536 count=32 seek=64 oflag=direct conv=notrunc,fsync 2>/dev/null || echo KITE-WRITE-FAILED
echo KITE-IO-DONE
{IDLE}"#
    );
    let disk = script_disk(&dir, &script);
    let kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.txt");
    let config = api_config(
        &serial,
        1,
        json!([{"path": disk, "readonly": true}, {"path": data, "id": "data0"}]),
    );
    kite.put_ok("vm.create", Some(&config.to_string()));
    kite.put_ok("vm.boot", None);

    let out = wait_for_file(&serial, "KITE-IO-READY\r\n", TIMEOUT);
    let before = kite.counters();
    kite.put_ok("vm.power-button", None);
    let out_done = wait_for_file(&serial, "KITE-IO-DONE\r\n", TIMEOUT);
    let after = kite.counters();
    assert!(!out_done.contains("KITE-READ-FAILED"), "{out_done}");
    assert_writes_ok(&out_done);

    let delta = |name: &str| counter(&after, "data0", name) - counter(&before, "data0", name);
    assert_eq!(
        delta("read_bytes"),
        n,
        "data0 read_bytes: {before} -> {after}"
    );
    assert_eq!(
        delta("write_bytes"),
        m,
        "data0 write_bytes: {before} -> {after}"
    );
    assert!(
        delta("read_ops") >= 1 && delta("read_ops") <= n / 512,
        "{before} -> {after}"
    );
    assert!(
        delta("write_ops") >= 1 && delta("write_ops") <= m / 512,
        "{before} -> {after}"
    );
    assert!(
        delta("flush_ops") >= 1,
        "conv=fsync sent no FLUSH: {before} -> {after}"
    );
    assert_eq!(delta("errors"), 0, "{after}");
    assert!(
        delta("queue0_requests") >= delta("read_ops") + delta("write_ops") + delta("flush_ops"),
        "{before} -> {after}"
    );
    // The read-only script disk: read at boot, never written.
    assert!(
        counter(&after, "_disk0", "read_bytes") >= SCRIPT_DISK_SIZE as u64,
        "{after}"
    );
    assert_eq!(counter(&after, "_disk0", "write_bytes"), 0, "{after}");
    assert_eq!(counter(&after, "_disk0", "write_ops"), 0, "{after}");

    // vm.info's device tree: every virtio device with a distinct PCI address
    // that the guest finds with the right virtio device id.
    let (code, body) = kite.api("GET", "vm.info", None);
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    // The config shows the id kite gave the unnamed disk, as on CH.
    assert_eq!(info["config"]["disks"][0]["id"], "_disk0", "{body}");
    let tree = info["device_tree"]
        .as_object()
        .unwrap_or_else(|| panic!("{body}"));
    let mut bdfs = Vec::new();
    for (id, pci_id) in [
        ("_disk0", "0x1042"),
        ("data0", "0x1042"),
        ("__rng", "0x1044"),
    ] {
        let node = &tree
            .get(id)
            .unwrap_or_else(|| panic!("no {id} in the device tree: {body}"));
        assert_eq!(node["id"], id, "{body}");
        let bdf = node["pci_bdf"]
            .as_str()
            .unwrap_or_else(|| panic!("{id} has no pci_bdf: {body}"));
        let b = bdf.as_bytes();
        assert!(
            bdf.len() == 12
                && bdf.starts_with("0000:00:")
                && b[10] == b'.'
                && bdf.ends_with(".0")
                && b[8..10].iter().all(u8::is_ascii_hexdigit),
            "{id}: bad pci_bdf {bdf:?}"
        );
        let seen = expect_field(&out, &format!("KITE-PCI: {bdf} "));
        assert_eq!(
            seen,
            format!("0x1af4 {pci_id}"),
            "{id} at {bdf} in the guest:\n{out}"
        );
        bdfs.push(bdf.to_string());
    }
    assert_eq!(
        expect_field(&out, "KITE-VDB-PCI: "),
        bdfs[1],
        "data0 is not /dev/vdb:\n{out}"
    );
    bdfs.sort();
    bdfs.dedup();
    assert_eq!(bdfs.len(), 3, "devices share a PCI address: {body}");
    kite.put_ok("vm.shutdown", None);
    kite.wait_state("Shutdown", TIMEOUT);

    let mut expected = vec![0u8; 16 * MIB as usize];
    // dd wrote zeros over zeros: the file must still be all zeros.
    patch(&mut expected, 4 * MIB, &vec![0u8; m as usize]);
    assert_same_image(&fs::read(&data).unwrap(), &expected, "data0");
}

// ---------------------------------------------------------------------------
// 12: bad images, locking
// ---------------------------------------------------------------------------

/// A `vm.create` body (no boot needed) with `disks`.
fn create_body(kite: &Kite, disks: Value) -> String {
    api_config(&kite.dir.path("serial.txt"), 1, disks).to_string()
}

/// An error reply: status 400 and a body mentioning every needle.
#[track_caller]
fn assert_refused(reply: (u16, String), needles: &[&str], what: &str) {
    let (code, body) = reply;
    assert_eq!(code, 400, "{what}: wanted 400, got {code}: {body}");
    for needle in needles {
        assert!(
            body.contains(needle),
            "{what}: the error does not mention {needle:?}: {body}"
        );
    }
}

/// Starts kite from the command line with `disk`, which it must refuse
/// with an error naming the file; returns that error output.
fn cli_refuses_disk(disk: &Path, what: &str) -> String {
    let guest = linux_guest();
    let arg = format!("path={}", disk.display());
    let out = run_kite(
        &[
            "--kernel",
            guest.vmlinux.to_str().unwrap(),
            "--disk",
            &arg,
            "--serial",
            "null",
        ],
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "kite booted with {what}:\n{stderr}");
    assert!(
        stderr.contains(disk.to_str().unwrap()),
        "the CLI error does not name the disk ({what}):\n{stderr}"
    );
    stderr
}

/// A qcow2 header: magic, `version`, then `rest` (the big-endian fields
/// from backing_file_offset on), in a 1 MiB file.
fn qcow2_header(version: u32, rest: &[u8]) -> Vec<u8> {
    let mut data = b"QFI\xfb".to_vec();
    data.extend_from_slice(&version.to_be_bytes());
    data.extend_from_slice(rest);
    data.resize(MIB as usize, 0);
    data
}

#[test]
fn missing_and_corrupt_images_are_refused() {
    let dir = TempDir::new("vl-bad");
    let kite = Kite::start_api(&[]);
    let missing = dir.path("no-such-disk.img");
    assert_refused(
        kite.api(
            "PUT",
            "vm.create",
            Some(&create_body(&kite, json!([{"path": missing}]))),
        ),
        &[missing.to_str().unwrap()],
        "missing disk image",
    );

    cli_refuses_disk(&missing, "a missing disk");

    // Valid magic, garbage after it.
    let garbage = dir.path("garbage.qcow2");
    fs::write(&garbage, qcow2_header(3, &[0xff; 200])).unwrap();
    // Plausible v2 header whose L1 table lies far beyond the file.
    let far_l1 = dir.path("far-l1.qcow2");
    let mut h = Vec::new();
    h.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset
    h.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
    h.extend_from_slice(&16u32.to_be_bytes()); // cluster_bits
    h.extend_from_slice(&(64 * MIB).to_be_bytes()); // size
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    h.extend_from_slice(&1u32.to_be_bytes()); // l1_size
    h.extend_from_slice(&(1u64 << 50).to_be_bytes()); // l1_table_offset
    h.extend_from_slice(&65536u64.to_be_bytes()); // refcount_table_offset
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    fs::write(&far_l1, qcow2_header(2, &h)).unwrap();
    // Just the magic.
    let truncated = dir.path("truncated.qcow2");
    fs::write(&truncated, b"QFI\xfb").unwrap();

    for path in [&garbage, &far_l1, &truncated] {
        let p = path.to_str().unwrap();
        assert_refused(
            kite.api(
                "PUT",
                "vm.create",
                Some(&create_body(&kite, json!([{"path": path}]))),
            ),
            &[p],
            p,
        );
        assert_eq!(
            kite.api("GET", "vmm.ping", None).0,
            200,
            "kite stopped serving after {p}"
        );
    }
    cli_refuses_disk(&garbage, "a corrupt qcow2");
    // Nothing was written to the refused images.
    assert_eq!(fs::read(&garbage).unwrap(), qcow2_header(3, &[0xff; 200]));
}

#[test]
fn an_image_in_use_is_locked() {
    let dir = TempDir::new("vl-lock");
    let disk = dir.path("shared.raw");
    fs::File::create(&disk).unwrap().set_len(4 * MIB).unwrap();
    let base = dir.path("base.raw");
    fs::File::create(&base).unwrap().set_len(4 * MIB).unwrap();
    let overlay = dir.path("ov.qcow2");
    qcow2_create(&overlay, "", &["-b", base.to_str().unwrap(), "-F", "raw"]);

    let first = Kite::start_api(&[]);
    let second = Kite::start_api(&[]);
    first.put_ok(
        "vm.create",
        Some(&create_body(
            &first,
            json!([{"path": disk}, {"path": overlay}]),
        )),
    );

    let reply = second.api(
        "PUT",
        "vm.create",
        Some(&create_body(&second, json!([{"path": disk}]))),
    );
    assert_refused(reply, &["locked", disk.to_str().unwrap()], "second writer");
    let reply = second.api(
        "PUT",
        "vm.create",
        Some(&create_body(
            &second,
            json!([{"path": disk, "readonly": true}]),
        )),
    );
    assert_refused(reply, &["locked"], "reader while a writer holds the image");
    // The backing file is shared: readers may join, writers may not.
    let reply = second.api(
        "PUT",
        "vm.create",
        Some(&create_body(&second, json!([{"path": base}]))),
    );
    assert_refused(
        reply,
        &["locked", base.to_str().unwrap()],
        "writer on a backing file in use",
    );
    second.put_ok(
        "vm.create",
        Some(&create_body(
            &second,
            json!([{"path": base, "readonly": true}]),
        )),
    );
    second.put_ok("vm.delete", None);

    // The CLI refuses too, naming the file.
    let stderr = cli_refuses_disk(&disk, "a locked image");
    assert!(stderr.contains("locked"), "{stderr}");

    // Deleting the VM releases the locks.
    first.put_ok("vm.delete", None);
    second.put_ok(
        "vm.create",
        Some(&create_body(
            &second,
            json!([{"path": disk}, {"path": base}]),
        )),
    );
    second.put_ok("vm.delete", None);

    // Two readers share an image.
    first.put_ok(
        "vm.create",
        Some(&create_body(
            &first,
            json!([{"path": disk, "readonly": true}]),
        )),
    );
    second.put_ok(
        "vm.create",
        Some(&create_body(
            &second,
            json!([{"path": disk, "readonly": true}]),
        )),
    );
}
