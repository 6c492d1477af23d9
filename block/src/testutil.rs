//! Helpers shared by the tests: temporary directories, data patterns, a
//! tiny PRNG, and wrappers around the qemu-img / qemu-io binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("kite-block-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: deterministic and good enough to pick offsets and fill
/// buffers, without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes, different for each seed, never all zero.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    Rng::new(seed).fill(&mut buf);
    buf
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is qemu-utils installed?)"));
    out
}

/// Runs `qemu-img ARGS`, panicking with its output if it fails.
pub fn qemu_img(args: &[&str]) -> String {
    let out = run(Command::new("qemu-img").args(args));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `qemu-img create -f qcow2 [-o OPTS] PATH SIZE`.
pub fn create_qcow2(path: &Path, size: u64, opts: &str) -> PathBuf {
    let p = path.to_str().unwrap();
    let size = size.to_string();
    if opts.is_empty() {
        qemu_img(&["create", "-q", "-f", "qcow2", p, &size]);
    } else {
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p, &size]);
    }
    path.to_path_buf()
}

/// Asserts that `qemu-img check` finds neither corruption nor leaks (its
/// exit status is 0 only then: 2 means corruption, 3 leaks).
pub fn assert_qemu_check_clean(path: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path));
    assert!(
        out.status.success(),
        "qemu-img check {} (status {:?}):\n{}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest-visible contents of an image according to qemu, via
/// `qemu-img convert -O raw`.
pub fn qemu_contents(path: &Path, format: &str) -> Vec<u8> {
    let out_path = path.with_extension("converted.raw");
    qemu_img(&[
        "convert",
        "-f",
        format,
        "-O",
        "raw",
        path.to_str().unwrap(),
        out_path.to_str().unwrap(),
    ]);
    let data = std::fs::read(&out_path).unwrap();
    std::fs::remove_file(&out_path).unwrap();
    data
}

/// Runs `qemu-io -f FORMAT -c CMD PATH`.
pub fn qemu_io(path: &Path, format: &str, cmd: &str) {
    let out = run(Command::new("qemu-io")
        .args(["-f", format, "-c", cmd])
        .arg(path));
    assert!(
        out.status.success(),
        "qemu-io -c {cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts two byte slices are equal, reporting the first difference rather
/// than dumping megabytes.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#04x}, expected {:#04x}",
            actual[i], expected[i]
        );
    }
}
