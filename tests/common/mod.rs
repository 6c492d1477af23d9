//! Shared helpers for kite's integration tests: start the real `kite` binary,
//! talk HTTP to its API socket, find the guests, build initramfs overlays.
#![allow(dead_code)]

pub mod netns;
pub mod pty;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

pub fn kite_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kite"))
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kite-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The Linux test guest. On the development/CI machines it is the kernel in
/// `../shared/guests/linux-pvm/`; elsewhere set `KITE_TEST_KERNEL` (PVH
/// vmlinux), `KITE_TEST_BZIMAGE`, `KITE_TEST_INITRAMFS` and, if needed,
/// `KITE_TEST_CMDLINE` (default `console=ttyS0 quiet`, plus `pvm` when the
/// host's KVM is kvm_pvm).
pub struct LinuxGuest {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
}

pub fn linux_guest() -> LinuxGuest {
    let shared = repo_root().join("../shared/guests/linux-pvm");
    let path = |var: &str, file: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| shared.join(file))
    };
    let cmdline = std::env::var("KITE_TEST_CMDLINE").unwrap_or_else(|_| {
        if Path::new("/sys/module/kvm_pvm").exists() {
            "console=ttyS0 quiet pvm".into()
        } else {
            "console=ttyS0 quiet".into()
        }
    });
    let guest = LinuxGuest {
        vmlinux: path("KITE_TEST_KERNEL", "vmlinux"),
        bzimage: path("KITE_TEST_BZIMAGE", "bzImage"),
        initramfs: path("KITE_TEST_INITRAMFS", "initrd.cpio.gz"),
        cmdline,
    };
    for p in [&guest.vmlinux, &guest.bzimage, &guest.initramfs] {
        assert!(p.exists(), "test guest file {} is missing", p.display());
    }
    guest
}

/// Builds the purpose-built guests in `tests/guests/` once per test binary.
pub fn test_guest(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let out = repo_root().join("target/test-guests");
        fs::create_dir_all(&out).unwrap();
        let status = Command::new("sh")
            .arg(repo_root().join("tests/guests/build.sh"))
            .arg(&out)
            .status()
            .expect("run tests/guests/build.sh");
        assert!(status.success(), "building the test guests failed");
        out
    });
    let path = dir.join(format!("{name}.elf"));
    assert!(path.exists(), "no test guest {}", path.display());
    path
}

/// Writes `base` followed by an uncompressed newc cpio holding `files`
/// (name, mode, content). The kernel unpacks both; later files win, so this
/// replaces e.g. `/init` of the stock initramfs.
pub fn initramfs_overlay(base: &Path, files: &[(&str, u32, &[u8])], out: &Path) {
    let mut data = fs::read(base).unwrap();
    // Each archive must start 4-byte aligned.
    while !data.len().is_multiple_of(4) {
        data.push(0);
    }
    let mut cpio = Vec::new();
    let mut entry = |name: &str, mode: u32, content: &[u8], ino: u32| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 1, 0, content.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        cpio.extend_from_slice(header.as_bytes());
        cpio.extend_from_slice(name.as_bytes());
        cpio.push(0);
        while !cpio.len().is_multiple_of(4) {
            cpio.push(0);
        }
        cpio.extend_from_slice(content);
        while !cpio.len().is_multiple_of(4) {
            cpio.push(0);
        }
    };
    for (i, (name, mode, content)) in files.iter().enumerate() {
        entry(name, *mode, content, 1000 + i as u32);
    }
    entry("TRAILER!!!", 0, &[], 0);
    data.extend_from_slice(&cpio);
    fs::write(out, data).unwrap();
}

/// An initramfs whose `/init` is `script` (busybox sh, `$B` = /bin/busybox,
/// /proc, /sys and /dev mounted first).
pub fn initramfs_with_init(guest: &LinuxGuest, script: &str, out: &Path) {
    let init = format!(
        "#!/bin/busybox sh\nB=/bin/busybox\n$B mount -t proc proc /proc\n$B mount -t sysfs sysfs /sys\n$B mount -t devtmpfs devtmpfs /dev 2>/dev/null\n{script}\n"
    );
    initramfs_overlay(
        &guest.initramfs,
        &[("init", 0o100755, init.as_bytes())],
        out,
    );
}

/// One HTTP request on a fresh connection; returns status and body.
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    raw_http(socket, req.as_bytes())
}

/// Sends raw bytes, reads until the server closes; parses status and body.
pub fn raw_http(socket: &Path, bytes: &[u8]) -> (u16, String) {
    raw_exchange(socket, bytes, true)
}

/// Like `raw_http`, but tolerates the server closing while we still write
/// (it answers 413 before reading a too-large body), and can keep the write
/// side open.
pub fn raw_exchange(socket: &Path, bytes: &[u8], shutdown_write: bool) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    if shutdown_write {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A running `kite`, killed when dropped.
pub struct Kite {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl Kite {
    /// Starts `kite --api-socket` (plus `extra` args) and waits for the socket.
    pub fn start_api(extra: &[&str]) -> Kite {
        let dir = TempDir::new("api");
        let socket = dir.path("api.sock");
        let child = Command::new(kite_bin())
            .arg("--api-socket")
            .arg(&socket)
            .args(extra)
            .arg("--log-file")
            .arg(dir.path("kite.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let kite = Kite { child, socket, dir };
        let start = Instant::now();
        while !kite.socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "API socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        kite
    }

    pub fn api(&self, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
        http(&self.socket, method, &format!("/api/v1/{endpoint}"), body)
    }

    /// PUT that must succeed with 204.
    pub fn put_ok(&self, endpoint: &str, body: Option<&str>) {
        let (code, resp) = self.api("PUT", endpoint, body);
        assert_eq!(code, 204, "PUT {endpoint}: {resp}");
    }

    /// `vm.info`'s state field.
    pub fn state(&self) -> String {
        let (code, body) = self.api("GET", "vm.info", None);
        assert_eq!(code, 200, "vm.info: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["state"].as_str().unwrap().to_string()
    }

    pub fn wait_state(&self, want: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let s = self.state();
            if s == want {
                return;
            }
            assert!(start.elapsed() < timeout, "state stayed {s}, wanted {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path("kite.log")).unwrap_or_default()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// `vm.counters` as JSON.
    pub fn counters(&self) -> serde_json::Value {
        let (code, body) = self.api("GET", "vm.counters", None);
        assert_eq!(code, 200, "vm.counters: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Kite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `kite args...` to completion (killed after `timeout`).
pub fn run_kite(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(kite_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain pipes in threads so a chatty guest cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_child(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            child.wait().unwrap()
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Waits until `path` contains `needle`; returns the contents.
pub fn wait_for_file(path: &Path, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "{needle:?} not in {} after {timeout:?}; it holds:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `vm.create` body with serial output to `serial`.
pub fn vm_config(
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    cpus: u8,
    mem_mib: u64,
    serial: &Path,
) -> String {
    let mut payload = serde_json::json!({ "kernel": kernel, "cmdline": cmdline });
    if let Some(i) = initramfs {
        payload["initramfs"] = serde_json::json!(i);
    }
    serde_json::json!({
        "payload": payload,
        "cpus": { "boot_vcpus": cpus, "max_vcpus": cpus },
        "memory": { "size": mem_mib << 20 },
        "serial": { "mode": "File", "file": serial },
        "console": { "mode": "Off" },
    })
    .to_string()
}

// ---- Guest output and guest-side helpers shared by the Linux tests ----

/// Size of a script disk (`kite.exec=vda` reads up to 64 KiB).
pub const SCRIPT_DISK_SIZE: usize = 64 << 10;

/// The lines of a serial log, without the `\r` of the guest's `\r\n`.
pub fn lines(text: &str) -> Vec<&str> {
    text.lines().map(|l| l.trim_end_matches('\r')).collect()
}

/// `/proc/interrupts` lines `KITE-IRQ: <line>` → (name, total count).
pub fn irq_lines(out: &str) -> Vec<(String, u64)> {
    lines(out)
        .into_iter()
        .filter_map(|l| l.strip_prefix("KITE-IRQ: "))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let total = words[1..].iter().map_while(|w| w.parse::<u64>().ok()).sum();
            (words.last().unwrap().to_string(), total)
        })
        .collect()
}

/// The rest of the first line starting with `prefix`.
pub fn field<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    lines(text).into_iter().find_map(|l| l.strip_prefix(prefix))
}

/// Like [`field`], but the line must be there.
#[track_caller]
pub fn expect_field<'a>(text: &'a str, prefix: &str) -> &'a str {
    field(text, prefix).unwrap_or_else(|| panic!("no {prefix:?} line in the guest output:\n{text}"))
}

/// How many complete lines (ended by a newline) are exactly `marker`.
pub fn count_lines(text: &str, marker: &str) -> usize {
    // The last line may still be being written (a guest prints its "\r\n"
    // after the text, possibly a moment later).
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    lines(complete).into_iter().filter(|l| *l == marker).count()
}

/// Writes a script disk holding `script` (after `B=/bin/busybox`) and returns
/// its path.
pub fn script_disk(dir: &TempDir, script: &str) -> PathBuf {
    let mut data = format!("B=/bin/busybox\n{script}\n").into_bytes();
    assert!(
        data.len() < SCRIPT_DISK_SIZE,
        "guest script too long ({} bytes)",
        data.len()
    );
    data.resize(SCRIPT_DISK_SIZE, 0);
    let path = dir.path("script.img");
    fs::write(&path, data).unwrap();
    path
}

/// `len` deterministic pseudo-random bytes (xorshift64) from `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// One device counter out of [`Kite::counters`].
#[track_caller]
pub fn counter(c: &serde_json::Value, device: &str, name: &str) -> u64 {
    c[device][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {device}.{name} in {c}"))
}
