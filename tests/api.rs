//! The REST API end to end: the real `kite` binary serving `--api-socket`,
//! driven over HTTP like a Cloud Hypervisor client would, with the `counter`
//! guest (READY within milliseconds, then `COUNT <n>` every ~20 ms) as the VM.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Generous: CI machines may be loaded.
const T: Duration = Duration::from_secs(30);

/// Every endpoint kite serves, with its method.
const VM_ACTIONS: &[&str] = &[
    "vm.boot",
    "vm.pause",
    "vm.resume",
    "vm.shutdown",
    "vm.reboot",
    "vm.power-button",
];

/// Checks an error reply: the status, and a non-empty body that is a JSON
/// array of strings (Cloud Hypervisor's error shape) mentioning every
/// `needle` (case-insensitive). Returns the joined message.
#[track_caller]
fn assert_error(reply: (u16, String), status: u16, needles: &[&str], what: &str) -> String {
    let (code, body) = reply;
    assert_eq!(code, status, "{what}: wanted {status}, got {code}: {body}");
    assert!(
        !body.trim().is_empty(),
        "{what}: {status} with an empty body"
    );
    let parsed: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {body}"));
    let items = parsed
        .as_array()
        .unwrap_or_else(|| panic!("{what}: error body is not a JSON array: {body}"));
    assert!(!items.is_empty(), "{what}: empty error array");
    let mut message = String::new();
    for item in items {
        let s = item
            .as_str()
            .unwrap_or_else(|| panic!("{what}: error array holds a non-string: {body}"));
        assert!(!s.trim().is_empty(), "{what}: empty error string: {body}");
        message.push_str(s);
        message.push('\n');
    }
    let lower = message.to_lowercase();
    for needle in needles {
        assert!(
            lower.contains(&needle.to_lowercase()),
            "{what}: error does not mention {needle:?}: {message}"
        );
    }
    message
}

/// The VMM still serves: the HTTP thread (vmm.ping) and the control loop
/// (vm.info goes through it) both answer.
#[track_caller]
fn assert_serving(kite: &Kite, vm_exists: bool, after: &str) {
    let (code, body) = kite.api("GET", "vmm.ping", None);
    assert_eq!(code, 200, "vmm.ping after {after}: {body}");
    let (code, body) = kite.api("GET", "vm.info", None);
    let want = if vm_exists { 200 } else { 404 };
    assert_eq!(code, want, "vm.info after {after}: {body}");
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Waits until the file at `path` is longer than `than` bytes.
#[track_caller]
fn wait_growth(path: &Path, than: u64, timeout: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let len = file_len(path);
        if len > than {
            return len;
        }
        assert!(
            start.elapsed() < timeout,
            "{} stayed at {len} bytes for {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `path` holds `needle` at least `n` times.
#[track_caller]
fn wait_count(path: &Path, needle: &str, n: usize, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if count(&text, needle) >= n {
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "{needle:?} seen {} times (wanted {n}) in {} after {timeout:?}:\n{}",
            count(&text, needle),
            path.display(),
            tail(&text)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tail(text: &str) -> &str {
    let cut = text.len().saturating_sub(2000);
    let cut = (cut..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[cut..]
}

/// The last whole `COUNT <n>` line the file holds (a pause may stop the
/// guest mid-line).
fn last_count(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("COUNT "))
        .find_map(|n| n.trim().parse().ok())
}

fn counter_config(serial: &Path) -> String {
    vm_config(&test_guest("counter"), None, "console=ttyS0", 1, 64, serial)
}

#[test]
fn ping_reports_versions_pid_and_features() {
    let kite = Kite::start_api(&[]);
    let (code, body) = kite.api("GET", "vmm.ping", None);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("vmm.ping body is JSON");
    assert!(
        v["build_version"].as_str().is_some_and(|s| !s.is_empty()),
        "build_version: {body}"
    );
    assert!(
        v["version"].as_str().is_some_and(|s| !s.is_empty()),
        "version: {body}"
    );
    assert_eq!(
        v["pid"].as_i64(),
        Some(i64::from(kite.child.id())),
        "pid: {body}"
    );
    assert!(v["features"].is_array(), "features: {body}");
    // A second ping answers the same.
    let (code, again) = kite.api("GET", "vmm.ping", None);
    assert_eq!((code, &again), (200, &body));
}

#[test]
fn vm_endpoints_before_create() {
    let kite = Kite::start_api(&[]);
    for endpoint in VM_ACTIONS {
        assert_error(
            kite.api("PUT", endpoint, None),
            404,
            &["not created"],
            endpoint,
        );
    }
    for endpoint in ["vm.info", "vm.counters"] {
        assert_error(
            kite.api("GET", endpoint, None),
            404,
            &["not created"],
            endpoint,
        );
    }
    // Deleting nothing is fine (as in Cloud Hypervisor).
    let (code, body) = kite.api("PUT", "vm.delete", None);
    assert_eq!(code, 204, "vm.delete without a VM: {body}");
    assert_serving(&kite, false, "the 404s");
}

#[test]
fn vm_lifecycle() {
    let mut kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.log");
    let config = counter_config(&serial);

    // Create.
    kite.put_ok("vm.create", Some(&config));
    assert_error(
        kite.api("PUT", "vm.create", Some(&config)),
        409,
        &["already"],
        "second vm.create",
    );
    let (code, body) = kite.api("GET", "vm.info", None);
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Created", "{body}");
    let sent: Value = serde_json::from_str(&config).unwrap();
    let echoed = &info["config"];
    assert_eq!(echoed["cpus"]["boot_vcpus"], 1, "{body}");
    assert_eq!(echoed["cpus"]["max_vcpus"], 1, "{body}");
    assert_eq!(echoed["memory"]["size"], sent["memory"]["size"], "{body}");
    assert_eq!(
        echoed["payload"]["kernel"], sent["payload"]["kernel"],
        "{body}"
    );
    assert_eq!(
        echoed["payload"]["cmdline"], sent["payload"]["cmdline"],
        "{body}"
    );
    assert_eq!(echoed["serial"]["mode"], "File", "{body}");
    assert_eq!(echoed["serial"]["file"], sent["serial"]["file"], "{body}");
    assert_eq!(echoed["console"]["mode"], "Off", "{body}");
    if let Some(size) = info.get("memory_actual_size") {
        assert_eq!(size, &sent["memory"]["size"], "{body}");
    }
    for endpoint in ["vm.pause", "vm.resume", "vm.shutdown", "vm.power-button"] {
        assert_error(
            kite.api("PUT", endpoint, None),
            405,
            &["Created"],
            &format!("{endpoint} when Created"),
        );
    }
    assert_eq!(kite.state(), "Created");

    // Boot.
    kite.put_ok("vm.boot", None);
    assert_eq!(kite.state(), "Running");
    wait_for_file(&serial, "COUNT 1\n", T);
    assert_error(
        kite.api("PUT", "vm.boot", None),
        405,
        &["Running"],
        "vm.boot when Running",
    );
    assert_error(
        kite.api("PUT", "vm.resume", None),
        405,
        &["Running"],
        "vm.resume when Running",
    );

    // Pause: the guest stops printing as soon as vm.pause answers.
    kite.put_ok("vm.pause", None);
    assert_eq!(kite.state(), "Paused");
    let paused_len = file_len(&serial);
    let paused_count = last_count(&serial).expect("a COUNT line");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        file_len(&serial),
        paused_len,
        "serial output grew while the VM was paused"
    );
    assert_error(
        kite.api("PUT", "vm.pause", None),
        405,
        &["Paused"],
        "vm.pause when Paused",
    );
    // As on Cloud Hypervisor: the press waits for the guest to run again.
    let (code, body) = kite.api("PUT", "vm.power-button", None);
    assert_eq!(code, 204, "vm.power-button when Paused: {body}");
    assert_error(
        kite.api("PUT", "vm.boot", None),
        405,
        &["Paused"],
        "vm.boot when Paused",
    );

    // Resume: the count goes on from where it stopped.
    kite.put_ok("vm.resume", None);
    assert_eq!(kite.state(), "Running");
    wait_growth(&serial, paused_len, T);
    wait_for_file(&serial, &format!("COUNT {}\n", paused_count + 2), T);
    let text = fs::read_to_string(&serial).unwrap();
    assert_eq!(count(&text, "READY"), 1, "resume restarted the guest");

    // Counters: a JSON object (kite has no devices with counters yet).
    let (code, body) = kite.api("GET", "vm.counters", None);
    assert_eq!(code, 200, "{body}");
    let counters: Value = serde_json::from_str(&body).expect("vm.counters is JSON");
    assert!(counters.is_object(), "vm.counters: {body}");

    // Reboot: the guest starts over, into the same serial file.
    kite.put_ok("vm.reboot", None);
    assert_eq!(kite.state(), "Running");
    wait_count(&serial, "READY", 2, T);
    // The count starts again from 0 after the second READY.
    let text = wait_count(&serial, "COUNT 1\n", 2, T);
    let after_reboot = &text[text.rfind("READY").unwrap()..];
    assert!(after_reboot.contains("COUNT 0\n"), "{}", tail(&text));

    // Shutdown, and booting again from Shutdown.
    kite.put_ok("vm.shutdown", None);
    assert_eq!(kite.state(), "Shutdown");
    let stopped_len = file_len(&serial);
    assert_error(
        kite.api("PUT", "vm.shutdown", None),
        405,
        &["Shutdown"],
        "vm.shutdown when Shutdown",
    );
    for endpoint in ["vm.pause", "vm.resume", "vm.power-button"] {
        assert_error(
            kite.api("PUT", endpoint, None),
            405,
            &["Shutdown"],
            &format!("{endpoint} when Shutdown"),
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        file_len(&serial),
        stopped_len,
        "serial output grew after vm.shutdown"
    );
    kite.put_ok("vm.boot", None);
    assert_eq!(kite.state(), "Running");
    wait_count(&serial, "READY", 3, T);
    wait_count(&serial, "COUNT 1\n", 3, T);

    // Power button while Running: accepted (the guest has no ACPI to act on it).
    let (code, body) = kite.api("PUT", "vm.power-button", None);
    assert_eq!(code, 204, "vm.power-button when Running: {body}");

    // Delete, then create again.
    kite.put_ok("vm.delete", None);
    assert_error(
        kite.api("GET", "vm.info", None),
        404,
        &[],
        "vm.info after delete",
    );
    assert_error(
        kite.api("PUT", "vm.boot", None),
        404,
        &[],
        "vm.boot after delete",
    );
    let serial2 = kite.dir.path("serial2.log");
    kite.put_ok("vm.create", Some(&counter_config(&serial2)));
    assert_eq!(kite.state(), "Created");
    kite.put_ok("vm.boot", None);
    wait_for_file(&serial2, "COUNT 1\n", T);

    // vmm.shutdown with a running VM: 204, exit 0, socket gone.
    let (code, body) = kite.api("PUT", "vmm.shutdown", None);
    assert_eq!(code, 204, "vmm.shutdown: {body}");
    let status = kite
        .wait_exit(T)
        .expect("kite did not exit after vmm.shutdown");
    assert!(status.success(), "kite exited with {status}");
    assert!(
        !kite.socket.exists(),
        "the API socket {} is still there after exit",
        kite.socket.display()
    );
}

#[test]
fn delete_while_paused_and_reboot_while_paused() {
    let kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.log");
    // Two vCPUs: the second waits for a SIPI that never comes, inside
    // KVM_RUN, and must still pause, stop and be torn down.
    let two = vm_config(&test_guest("counter"), None, "", 2, 64, &serial);
    kite.put_ok("vm.create", Some(&two));
    kite.put_ok("vm.boot", None);
    wait_for_file(&serial, "COUNT 0\n", T);
    kite.put_ok("vm.pause", None);
    // Reboot is allowed from Paused and leaves the VM running.
    kite.put_ok("vm.reboot", None);
    assert_eq!(kite.state(), "Running");
    wait_count(&serial, "READY", 2, T);
    kite.put_ok("vm.pause", None);
    kite.put_ok("vm.delete", None);
    assert_serving(&kite, false, "vm.delete of a paused VM");
    kite.put_ok("vm.create", Some(&two));
    kite.put_ok("vm.boot", None);
    wait_for_file(&serial, "COUNT 0\n", T);
    kite.put_ok("vm.pause", None);
    let len = file_len(&serial);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(file_len(&serial), len, "output grew while paused (2 vCPUs)");
    kite.put_ok("vm.resume", None);
    wait_growth(&serial, len, T);
    kite.put_ok("vm.shutdown", None);
    kite.put_ok("vm.delete", None);
    assert_serving(&kite, false, "vm.delete of a shut-down VM");
}

#[test]
fn boot_after_the_kernel_file_went_away() {
    // The kernel is read again on every boot; if it is gone by then, vm.boot
    // (and vm.reboot) fail with a client error naming it, the VM stays
    // Shutdown, and it boots once the file is back.
    let kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.log");
    let kernel = kite.dir.path("kernel.elf");
    fs::copy(test_guest("counter"), &kernel).unwrap();
    let config = vm_config(&kernel, None, "", 1, 64, &serial);
    kite.put_ok("vm.create", Some(&config));
    kite.put_ok("vm.boot", None);
    wait_for_file(&serial, "COUNT 0\n", T);
    kite.put_ok("vm.shutdown", None);
    fs::remove_file(&kernel).unwrap();
    let path = kernel.display().to_string();
    assert_error(
        kite.api("PUT", "vm.boot", None),
        400,
        &[&path],
        "vm.boot without its kernel",
    );
    assert_eq!(kite.state(), "Shutdown");
    assert_serving(&kite, true, "a failed vm.boot");
    fs::copy(test_guest("counter"), &kernel).unwrap();
    kite.put_ok("vm.boot", None);
    assert_eq!(kite.state(), "Running");
    wait_count(&serial, "READY", 2, T);

    // vm.reboot: the old VM stops, the new one cannot be built.
    fs::remove_file(&kernel).unwrap();
    assert_error(
        kite.api("PUT", "vm.reboot", None),
        400,
        &[&path],
        "vm.reboot without its kernel",
    );
    assert_eq!(kite.state(), "Shutdown");
    assert_serving(&kite, true, "a failed vm.reboot");
    fs::copy(test_guest("counter"), &kernel).unwrap();
    kite.put_ok("vm.boot", None);
    wait_count(&serial, "READY", 3, T);
    kite.put_ok("vm.delete", None);
}

#[test]
fn a_kernel_that_only_looks_like_one_is_refused_at_boot() {
    // vm.create checks a kernel's first bytes and answers; the machine is
    // built after the answer. A file with an ELF header and nothing behind it
    // passes the check, fails the build, and vm.boot says why (a client
    // error, the VM still Created) until the file is a kernel.
    let kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.log");
    let kernel = kite.dir.path("kernel.elf");
    fs::write(&kernel, b"\x7fELF truncated").unwrap();
    let config = vm_config(&kernel, None, "", 1, 64, &serial);
    kite.put_ok("vm.create", Some(&config));
    assert_eq!(kite.state(), "Created");
    let path = kernel.display().to_string();
    for _ in 0..2 {
        assert_error(
            kite.api("PUT", "vm.boot", None),
            400,
            &[&path],
            "vm.boot of a truncated ELF",
        );
        assert_eq!(kite.state(), "Created");
        assert_serving(&kite, true, "a failed vm.boot");
    }
    fs::copy(test_guest("counter"), &kernel).unwrap();
    kite.put_ok("vm.boot", None);
    wait_for_file(&serial, "COUNT 0\n", T);
    assert_eq!(kite.state(), "Running");
    kite.put_ok("vm.delete", None);
}

#[test]
fn bad_vm_configs_are_refused() {
    let kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.log");
    let not_a_kernel = kite.dir.path("not-a-kernel.txt");
    fs::write(&not_a_kernel, "this is a text file, not a kernel\n").unwrap();
    let missing = kite.dir.path("no-such-kernel");
    // Sparse: 32 MiB of zeros without writing them.
    let huge_initramfs = kite.dir.path("huge.cpio");
    fs::File::create(&huge_initramfs)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();

    let base = || -> Value { serde_json::from_str(&counter_config(&serial)).unwrap() };
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = base();
        f(&mut v);
        v.to_string()
    };

    let cases: Vec<(&str, Option<String>, Vec<String>)> = vec![
        ("no body", None, vec!["VmConfig".into()]),
        (
            "invalid JSON",
            Some(r#"{"payload": {"kernel": "#.into()),
            vec!["invalid".into()],
        ),
        ("JSON array", Some("[1, 2]".into()), vec!["invalid".into()]),
        (
            "memory.size of the wrong type",
            Some(with(&|v| v["memory"] = json!({"size": "big"}))),
            vec!["big".into()],
        ),
        (
            "cpus.boot_vcpus of the wrong type",
            Some(with(&|v| v["cpus"]["boot_vcpus"] = json!("two"))),
            vec!["two".into()],
        ),
        (
            "missing payload",
            Some(with(&|v| {
                v.as_object_mut().unwrap().remove("payload");
            })),
            vec!["payload".into()],
        ),
        (
            "payload without a kernel",
            Some(with(&|v| v["payload"] = json!({"cmdline": "x"}))),
            vec!["payload.kernel".into()],
        ),
        (
            "unknown top-level field",
            Some(with(&|v| v["bogus_field"] = json!(1))),
            vec!["bogus_field".into()],
        ),
        (
            "unknown nested field",
            Some(with(&|v| v["memory"]["bogus_knob"] = json!(true))),
            vec!["bogus_knob".into()],
        ),
        (
            "disk image that does not exist",
            Some(with(&|v| {
                v["disks"] = json!([{"path": "/nonexistent/kite-disk.img"}])
            })),
            vec!["/nonexistent/kite-disk.img".into()],
        ),
        (
            "disk queue size not a power of two",
            Some(with(&|v| {
                v["disks"] = json!([{"path": "/tmp/x", "queue_size": 100}])
            })),
            vec!["queue_size".into()],
        ),
        (
            "pmem (not built yet)",
            Some(with(&|v| v["pmem"] = json!([{"file": "/tmp/x"}]))),
            vec!["pmem".into()],
        ),
        (
            "net with a TAP name over 15 bytes",
            Some(with(&|v| {
                v["net"] = json!([{"tap": "kite-tap-name-too-long"}])
            })),
            vec!["tap".into()],
        ),
        (
            "kernel that does not exist",
            Some(with(&|v| v["payload"]["kernel"] = json!(missing))),
            vec![missing.display().to_string()],
        ),
        (
            "kernel that is not a kernel",
            Some(with(&|v| v["payload"]["kernel"] = json!(not_a_kernel))),
            vec![not_a_kernel.display().to_string()],
        ),
        (
            "kernel command line over the limit",
            Some(with(&|v| {
                v["payload"]["cmdline"] = json!("a".repeat(100_000))
            })),
            vec!["command line".into()],
        ),
        (
            "initramfs that does not exist",
            Some(with(&|v| v["payload"]["initramfs"] = json!(missing))),
            vec![missing.display().to_string()],
        ),
        (
            "initramfs bigger than guest memory",
            Some(with(&|v| {
                v["payload"]["initramfs"] = json!(huge_initramfs);
                v["memory"]["size"] = json!(16 << 20);
            })),
            vec![huge_initramfs.display().to_string()],
        ),
        (
            "memory size 0",
            Some(with(&|v| v["memory"]["size"] = json!(0))),
            vec!["memory".into()],
        ),
        (
            "memory bigger than the host (1 PiB)",
            Some(with(&|v| v["memory"]["size"] = json!(1u64 << 50))),
            vec!["memory".into()],
        ),
        (
            "boot_vcpus 0",
            Some(with(&|v| {
                v["cpus"] = json!({"boot_vcpus": 0, "max_vcpus": 1})
            })),
            vec!["boot_vcpus".into()],
        ),
        (
            "boot_vcpus > max_vcpus",
            Some(with(&|v| {
                v["cpus"] = json!({"boot_vcpus": 3, "max_vcpus": 2})
            })),
            vec!["boot_vcpus".into(), "max_vcpus".into()],
        ),
        (
            "max_vcpus 255",
            Some(with(&|v| {
                v["cpus"] = json!({"boot_vcpus": 1, "max_vcpus": 255})
            })),
            vec!["255".into()],
        ),
        (
            "max_vcpus 4096",
            Some(with(&|v| {
                v["cpus"] = json!({"boot_vcpus": 1, "max_vcpus": 4096})
            })),
            vec!["4096".into()],
        ),
        (
            "serial mode File without a file",
            Some(with(&|v| v["serial"] = json!({"mode": "File"}))),
            vec!["serial".into(), "file".into()],
        ),
        (
            "serial mode unknown",
            Some(with(&|v| v["serial"] = json!({"mode": "Loud"}))),
            vec!["Loud".into()],
        ),
        (
            "serial file in a directory that does not exist",
            Some(with(
                &|v| v["serial"] = json!({"mode": "File", "file": "/nonexistent-dir/serial.log"}),
            )),
            vec!["/nonexistent-dir/serial.log".into()],
        ),
    ];

    for (what, body, needles) in &cases {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let reply = kite.api("PUT", "vm.create", body.as_deref());
        let message = assert_error(reply, 400, &needles, what);
        eprintln!("{what}: {}", message.trim());
        // A refused config leaves no VM behind and the VMM serving.
        assert_serving(&kite, false, what);
    }

    // After all that, a good config still works.
    kite.put_ok("vm.create", Some(&counter_config(&serial)));
    kite.put_ok("vm.boot", None);
    wait_for_file(&serial, "COUNT 0\n", T);
    assert_eq!(kite.state(), "Running");
}

#[test]
fn http_level_errors() {
    let kite = Kite::start_api(&[]);
    let sock = &kite.socket;

    // Unknown endpoints: 404 naming the path.
    for path in ["/api/v1/vm.bogus", "/api/v1/", "/api/v2/vmm.ping", "/"] {
        assert_error(http(sock, "GET", path, None), 404, &[path], path);
        assert_serving(&kite, false, path);
    }

    // Wrong methods: 405.
    for (method, endpoint) in [
        ("GET", "vm.create"),
        ("PUT", "vmm.ping"),
        ("POST", "vm.boot"),
        ("DELETE", "vm.info"),
        ("GET", "vmm.shutdown"),
    ] {
        let what = format!("{method} {endpoint}");
        let body = (method == "PUT").then_some("{}");
        assert_error(kite.api(method, endpoint, body), 405, &[], &what);
        assert_serving(&kite, false, &what);
    }

    // Garbage instead of HTTP: 400.
    for (what, bytes) in [
        (
            "garbage bytes",
            &b"\x00\x01\x02\xff\xfe garbage \r\n\r\n"[..],
        ),
        ("no HTTP version", &b"GET /api/v1/vmm.ping\r\n\r\n"[..]),
        (
            "bad header line",
            &b"GET /api/v1/vmm.ping HTTP/1.1\r\nno colon here\r\n\r\n"[..],
        ),
        (
            "bad Content-Length",
            &b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: ten\r\n\r\n"[..],
        ),
    ] {
        let reply = raw_exchange(sock, bytes, true);
        assert_error(reply, 400, &[], what);
        assert_serving(&kite, false, what);
    }

    // A body over the limit (1 MiB, api/src/http.rs MAX_BODY): 413, whether
    // the client sends the body or only announces it.
    const MAX_BODY: usize = 1 << 20;
    let too_big = MAX_BODY + 1;
    let head = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {too_big}\r\n\r\n"
    );
    let reply = raw_exchange(sock, head.as_bytes(), true);
    assert_error(reply, 413, &["limit"], "announced body over the limit");
    assert_serving(&kite, false, "announced body over the limit");
    let mut whole = head.into_bytes();
    whole.extend(std::iter::repeat_n(b' ', too_big));
    let reply = raw_exchange(sock, &whole, true);
    assert_error(reply, 413, &["limit"], "body over the limit");
    assert_serving(&kite, false, "body over the limit");

    // A body of exactly the limit is read (and refused as a config, 400).
    let mut at_limit = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {MAX_BODY}\r\n\r\n"
    )
    .into_bytes();
    at_limit.extend(std::iter::repeat_n(b' ', MAX_BODY));
    let reply = raw_exchange(sock, &at_limit, true);
    assert_error(reply, 400, &[], "whitespace body at the limit");
    assert_serving(&kite, false, "a body at the limit");

    // The client announces 100 bytes, sends 10 and hangs up: no crash.
    let truncated = b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"payload\"";
    let (code, body) = raw_exchange(sock, truncated, true);
    assert!(
        code == 0 || code == 400,
        "truncated body: got {code} {body}"
    );
    assert_serving(&kite, false, "a truncated body");

    // The client hangs up half-way through the head: no crash.
    raw_exchange(sock, b"PUT /api/v1/vm.cre", true);
    assert_serving(&kite, false, "a truncated head");

    // Connect and hang up without a byte: no crash.
    drop(UnixStream::connect(sock).unwrap());
    assert_serving(&kite, false, "an empty connection");

    // Keep-alive: several requests on one connection all get answers.
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let one = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut reader = Vec::new();
    for i in 0..3 {
        s.write_all(one).unwrap();
        let mut buf = [0u8; 4096];
        let start = Instant::now();
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed after {i} keep-alive requests");
            reader.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reader);
            if count(&text, "HTTP/1.1 200") > i && text.ends_with('}') {
                break;
            }
            assert!(start.elapsed() < T, "no answer to keep-alive request {i}");
        }
    }

    // An idle keep-alive connection (s, still open) does not hold up
    // another client.
    let start = Instant::now();
    assert_serving(&kite, false, "keep-alive requests");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "an idle keep-alive connection held up another client for {:?}",
        start.elapsed()
    );
    drop(s);
}

#[test]
fn pipelined_and_expect_continue_requests() {
    let kite = Kite::start_api(&[]);
    let sock = &kite.socket;

    // Two requests in one write: two answers, in order.
    let two = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(two).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let first = text.find("HTTP/1.1 200").expect("no answer to the ping");
    let second = text.find("HTTP/1.1 404").expect("no answer to vm.info");
    assert!(first < second, "answers out of order:\n{text}");

    // curl sends `Expect: 100-continue` with larger bodies and waits for the
    // interim answer before sending the body.
    let serial = kite.dir.path("serial.log");
    let config = counter_config(&serial);
    let head = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        config.len()
    );
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        interim.starts_with("HTTP/1.1 100"),
        "no 100 Continue: {interim:?}"
    );
    s.write_all(config.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 204"), "vm.create: {text}");
    assert_eq!(kite.state(), "Created");
}

#[test]
fn concurrent_clients_during_state_changes() {
    let kite = Kite::start_api(&[]);
    let serial = kite.dir.path("serial.log");
    kite.put_ok("vm.create", Some(&counter_config(&serial)));
    kite.put_ok("vm.boot", None);
    wait_for_file(&serial, "COUNT 0\n", T);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let socket = kite.socket.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let endpoint = ["vmm.ping", "vm.info", "vm.counters"][i];
                    let (code, body) = http(&socket, "GET", &format!("/api/v1/{endpoint}"), None);
                    assert_eq!(code, 200, "{endpoint}: {body}");
                    let v: Value = serde_json::from_str(&body)
                        .unwrap_or_else(|e| panic!("{endpoint}: not JSON ({e}): {body}"));
                    if endpoint == "vm.info" {
                        let state = v["state"].as_str().unwrap_or_default();
                        assert!(
                            ["Running", "Paused"].contains(&state),
                            "vm.info state {state:?}"
                        );
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    for _ in 0..10 {
        kite.put_ok("vm.pause", None);
        kite.put_ok("vm.resume", None);
        kite.put_ok("vm.reboot", None);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let n = r.join().expect("a reader thread failed");
        assert!(n > 0, "a reader got no answer");
    }
    // A reboot may come before the previous guest got to READY, so only the
    // last boot is sure to show: READY, then the count from 0 again.
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(&serial).unwrap_or_default();
        let last = text.rfind("READY").map_or("", |i| &text[i..]);
        if count(&text, "READY") >= 2 && last.contains("COUNT 1\n") {
            break;
        }
        assert!(
            start.elapsed() < T,
            "no count after the last reboot:\n{}",
            tail(&text)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(kite.state(), "Running");
    kite.put_ok("vm.shutdown", None);
}
