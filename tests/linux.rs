//! End-to-end tests that boot the Linux test guest (`linux_guest()`: on the
//! development/CI machines the PVM-patched kernel in
//! `../shared/guests/linux-pvm/`, elsewhere `KITE_TEST_KERNEL` etc.) under the
//! real `kite` binary, through the CLI and through the REST API, and judge
//! every run by what the guest prints on its serial console.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pty::pty_session;
use common::*;

/// Per-step timeout; generous because CI machines may be loaded.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A token added to the guest command line so the echo of it is unambiguous.
const TOKEN: &str = "kite.test=matrix42";

/// Waits until the guest's console has sent everything written to it:
/// busybox `stty` sets the (unchanged) terminal attributes with TCSETSW,
/// which drains the output first. The custom `/init`s below use it before
/// `reboot -f`, so a marker line is whole before the guest restarts.
const DRAIN: &str = "$B stty onlcr";

/// An initramfs whose `/init` is `script` (see `initramfs_with_init`).
fn custom_init(dir: &TempDir, script: &str) -> std::path::PathBuf {
    let path = dir.path("initramfs");
    initramfs_with_init(&linux_guest(), script, &path);
    path
}

/// Checks the stock test guest's report: it came up once, saw `cpus` vCPUs,
/// a MemTotal between 80 % and 100 % of `mem_mib`, exactly `cmdline`, and
/// finished.
fn check_guest_report(out: &str, cpus: u32, mem_mib: u64, cmdline: &str) {
    assert_eq!(
        count_lines(out, "KITE-GUEST-UP"),
        1,
        "no (or more than one) KITE-GUEST-UP:\n{out}"
    );
    let n = field(out, "KITE-CPUS: ").unwrap_or_else(|| panic!("no KITE-CPUS line:\n{out}"));
    assert_eq!(
        n.trim(),
        cpus.to_string(),
        "guest saw the wrong number of vCPUs:\n{out}"
    );
    let mem =
        field(out, "KITE-MEM: MemTotal:").unwrap_or_else(|| panic!("no KITE-MEM line:\n{out}"));
    let kb: u64 = mem
        .trim()
        .strip_suffix("kB")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot parse MemTotal {mem:?}"));
    let configured_kb = mem_mib * 1024;
    assert!(
        kb <= configured_kb && kb * 100 >= configured_kb * 80,
        "MemTotal {kb} kB does not fit {mem_mib} MiB of guest memory:\n{out}"
    );
    let seen =
        field(out, "KITE-CMDLINE: ").unwrap_or_else(|| panic!("no KITE-CMDLINE line:\n{out}"));
    assert_eq!(
        seen, cmdline,
        "the guest's /proc/cmdline differs from the one passed"
    );
    assert_eq!(
        count_lines(out, "KITE-GUEST-DONE"),
        1,
        "no KITE-GUEST-DONE:\n{out}"
    );
}

/// Boots `kernel` through the CLI with `--serial tty` and checks the report.
fn cli_boot(kernel: &Path, cpus: u32, mem_mib: u64) {
    let guest = linux_guest();
    let initramfs = guest.initramfs.clone();
    let cmdline = format!("{} {TOKEN}", guest.cmdline);
    let cpus_arg = format!("boot={cpus}");
    let mem_arg = format!("size={mem_mib}M");
    let start = Instant::now();
    let out = run_kite(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--cpus",
            &cpus_arg,
            "--memory",
            &mem_arg,
            "--serial",
            "tty",
            "--console",
            "off",
        ],
        TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kite {} {cpus} vCPUs {mem_mib} MiB exited with {} after {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        kernel.display(),
        out.status,
        start.elapsed()
    );
    check_guest_report(&stdout, cpus, mem_mib, &cmdline);
}

#[test]
fn vmlinux_1cpu_128m() {
    cli_boot(&linux_guest().vmlinux, 1, 128);
}

#[test]
fn vmlinux_1cpu_512m() {
    cli_boot(&linux_guest().vmlinux, 1, 512);
}

#[test]
fn vmlinux_2cpu_1g() {
    cli_boot(&linux_guest().vmlinux, 2, 1024);
}

#[test]
fn vmlinux_4cpu_1g() {
    cli_boot(&linux_guest().vmlinux, 4, 1024);
}

#[test]
fn vmlinux_2cpu_2g() {
    cli_boot(&linux_guest().vmlinux, 2, 2048);
}

#[test]
fn bzimage_1cpu_512m() {
    cli_boot(&linux_guest().bzimage, 1, 512);
}

#[test]
fn bzimage_2cpu_1g() {
    cli_boot(&linux_guest().bzimage, 2, 1024);
}

/// `kite --api-socket` with a booted VM (vmlinux, `initramfs`, the guest's
/// command line, serial to a file in the test's directory).
fn api_vm(initramfs: &Path, cpus: u8, mem_mib: u64) -> (Kite, std::path::PathBuf) {
    let guest = linux_guest();
    let kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.txt");
    let config = vm_config(
        &guest.vmlinux,
        Some(initramfs),
        &guest.cmdline,
        cpus,
        mem_mib,
        &serial,
    );
    kite.put_ok("vm.create", Some(&config));
    kite.put_ok("vm.boot", None);
    (kite, serial)
}

/// Waits until `marker` appears as a whole line at least `n` times.
fn wait_lines(path: &Path, marker: &str, n: usize, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if count_lines(&text, marker) >= n {
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "{marker:?} seen {} times (wanted {n}) in {} after {timeout:?}; it holds:\n{text}",
            count_lines(&text, marker),
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn api_boot_shutdown_boot_again_delete() {
    let guest = linux_guest();
    let initramfs = guest.initramfs.clone();
    let mut kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.txt");
    let cmdline = format!("{} {TOKEN}", guest.cmdline);
    let config = vm_config(&guest.vmlinux, Some(&initramfs), &cmdline, 2, 512, &serial);
    kite.put_ok("vm.create", Some(&config));

    let (code, body) = kite.api("GET", "vm.info", None);
    assert_eq!(code, 200, "vm.info: {body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Created", "{body}");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2, "{body}");
    assert_eq!(info["config"]["memory"]["size"], 512u64 << 20, "{body}");
    assert_eq!(
        info["config"]["payload"]["kernel"],
        guest.vmlinux.to_str().unwrap(),
        "{body}"
    );
    assert_eq!(
        info["config"]["payload"]["cmdline"],
        cmdline.as_str(),
        "{body}"
    );

    kite.put_ok("vm.boot", None);
    wait_lines(&serial, "KITE-GUEST-DONE", 1, TIMEOUT);
    // The guest's ACPI power-off ends the VM but not the API server.
    kite.wait_state("Shutdown", TIMEOUT);
    check_guest_report(&fs::read_to_string(&serial).unwrap(), 2, 512, &cmdline);
    assert!(
        kite.child.try_wait().unwrap().is_none(),
        "kite exited when the guest powered off"
    );

    // A shut-down VM boots again; its serial output goes on in the same file.
    kite.put_ok("vm.boot", None);
    wait_lines(&serial, "KITE-GUEST-DONE", 2, TIMEOUT);
    kite.wait_state("Shutdown", TIMEOUT);
    let out = fs::read_to_string(&serial).unwrap();
    assert_eq!(count_lines(&out, "KITE-GUEST-UP"), 2, "second boot:\n{out}");

    kite.put_ok("vm.delete", None);
    let (code, body) = kite.api("GET", "vm.info", None);
    assert_eq!(code, 404, "vm.info after vm.delete: {body}");

    let (code, body) = kite.api("PUT", "vmm.shutdown", None);
    assert_eq!(code, 204, "vmm.shutdown: {body}");
    let status = kite
        .wait_exit(TIMEOUT)
        .expect("kite did not exit after vmm.shutdown");
    assert!(
        status.success(),
        "kite exited with {status}; log:\n{}",
        kite.log()
    );
}

#[test]
fn guest_reboot_restarts_the_guest() {
    let dir = TempDir::new("linux-reboot");
    let initramfs = custom_init(&dir, &format!("echo KITE-BOOT-MARK\n{DRAIN}\n$B reboot -f"));
    let (kite, serial) = api_vm(&initramfs, 1, 256);

    // The VMM restarts the guest each time; the VM stays Running throughout.
    let start = Instant::now();
    loop {
        let state = kite.state();
        let text = fs::read_to_string(&serial).unwrap_or_default();
        assert_eq!(
            state,
            "Running",
            "a guest reboot must not end the VM; serial:\n{text}\nlog:\n{}",
            kite.log()
        );
        if count_lines(&text, "KITE-BOOT-MARK") >= 3 {
            break;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "fewer than 3 boots after {TIMEOUT:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    kite.put_ok("vm.shutdown", None);
    kite.wait_state("Shutdown", TIMEOUT);
    // Nothing runs any more: no new boots.
    let before = fs::read_to_string(&serial).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let after = fs::read_to_string(&serial).unwrap();
    assert_eq!(
        before.len(),
        after.len(),
        "the guest kept running after vm.shutdown:\n{after}"
    );
}

#[test]
fn api_reboot_restarts_the_guest() {
    let dir = TempDir::new("linux-apireboot");
    let initramfs = custom_init(&dir, "echo KITE-BOOT-MARK\nwhile true; do $B sleep 1; done");
    let (kite, serial) = api_vm(&initramfs, 1, 256);

    wait_lines(&serial, "KITE-BOOT-MARK", 1, TIMEOUT);
    kite.put_ok("vm.reboot", None);
    wait_lines(&serial, "KITE-BOOT-MARK", 2, TIMEOUT);
    assert_eq!(kite.state(), "Running");
    kite.put_ok("vm.shutdown", None);
    kite.wait_state("Shutdown", TIMEOUT);
}

#[test]
fn power_button_reaches_the_guest() {
    let dir = TempDir::new("linux-button");
    let initramfs = custom_init(
        &dir,
        &format!(
            "if [ -c /dev/input/event0 ]; then echo KITE-EVENT0: present; \
             else echo KITE-EVENT0: absent; $B ls -l /dev/input; fi\n\
             echo KITE-WAIT-BUTTON\n\
             $B dd if=/dev/input/event0 bs=24 count=1 >/dev/null 2>&1\n\
             echo KITE-BUTTON-PRESSED\n\
             {DRAIN}\n\
             $B poweroff -f"
        ),
    );
    let (kite, serial) = api_vm(&initramfs, 1, 256);

    let out = wait_lines(&serial, "KITE-WAIT-BUTTON", 1, TIMEOUT);
    assert_eq!(
        field(&out, "KITE-EVENT0: "),
        Some("present"),
        "the guest has no /dev/input/event0 (no ACPI power button device):\n{out}"
    );
    // Give dd time to open the device and block in read().
    std::thread::sleep(Duration::from_millis(300));
    let out = fs::read_to_string(&serial).unwrap();
    assert_eq!(
        count_lines(&out, "KITE-BUTTON-PRESSED"),
        0,
        "dd returned without an event:\n{out}"
    );
    assert_eq!(kite.state(), "Running");

    kite.put_ok("vm.power-button", None);
    wait_lines(&serial, "KITE-BUTTON-PRESSED", 1, TIMEOUT);
    kite.wait_state("Shutdown", TIMEOUT);
}

/// The numbers of complete `KITE-COUNT <i>` lines, in order.
fn counts(text: &str) -> Vec<u64> {
    // Only lines ended by '\n': the last one may still be being written.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    lines(complete)
        .into_iter()
        .filter_map(|l| l.strip_prefix("KITE-COUNT "))
        .map(|n| {
            n.trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad counter line {n:?}"))
        })
        .collect()
}

fn assert_consecutive(nums: &[u64], text: &str) {
    for (i, n) in nums.iter().enumerate() {
        assert_eq!(*n, i as u64, "counter lines are not 0, 1, 2, ...:\n{text}");
    }
}

#[test]
fn pause_and_resume() {
    let dir = TempDir::new("linux-pause");
    let initramfs = custom_init(
        &dir,
        "i=0\nwhile true; do echo \"KITE-COUNT $i\"; i=$((i+1)); $B usleep 100000; done",
    );
    let (kite, serial) = api_vm(&initramfs, 2, 256);

    wait_lines(&serial, "KITE-COUNT 3", 1, TIMEOUT);
    let (code, body) = kite.api("PUT", "vm.resume", None);
    assert_eq!(code, 405, "vm.resume of a running VM: {body}");

    kite.put_ok("vm.pause", None);
    assert_eq!(kite.state(), "Paused");
    let (code, body) = kite.api("PUT", "vm.pause", None);
    assert_eq!(code, 405, "vm.pause of a paused VM: {body}");

    let paused = fs::read_to_string(&serial).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let later = fs::read_to_string(&serial).unwrap();
    assert_eq!(
        paused.len(),
        later.len(),
        "serial output grew while the VM was paused:\n{later}"
    );
    assert_eq!(kite.state(), "Paused");
    let before = counts(&paused);
    assert_consecutive(&before, &paused);
    let last = *before.last().expect("no counter line before the pause");

    kite.put_ok("vm.resume", None);
    assert_eq!(kite.state(), "Running");
    let start = Instant::now();
    let text = loop {
        let text = fs::read_to_string(&serial).unwrap();
        if counts(&text).len() > before.len() + 1 {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the guest did not go on counting within 3 s of vm.resume:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let after = counts(&text);
    assert_eq!(
        after[before.len()],
        last + 1,
        "the counter did not continue from {last}:\n{text}"
    );
    assert_consecutive(&after, &text);

    kite.put_ok("vm.shutdown", None);
    kite.wait_state("Shutdown", TIMEOUT);
}

#[test]
fn interactive_console_on_a_pty() {
    let guest = linux_guest();
    let cmdline = format!("{} kite.shell=1", guest.cmdline);
    let mut cmd = Command::new(kite_bin());
    cmd.args(["--kernel", guest.vmlinux.to_str().unwrap()])
        .args(["--initramfs", guest.initramfs.to_str().unwrap()])
        .args(["--cmdline", &cmdline])
        .args(["--cpus", "boot=1", "--memory", "size=256M"])
        .args(["--serial", "tty", "--console", "off"]);
    let (status, out) = pty_session(cmd, TIMEOUT, |pty| {
        let at = pty.wait(0, "# ");
        pty.write("echo kite-$((6*7))-ok\n");
        pty.wait(at, "kite-42-ok");
        pty.write("poweroff -f\n");
    });
    let status =
        status.unwrap_or_else(|| panic!("kite did not exit after the guest's poweroff -f:\n{out}"));
    assert!(
        status.success(),
        "kite exited with {status}; console:\n{out}"
    );
}
