//! The `kite` command line: option errors, booting the purpose-built guests
//! with each serial mode, the API socket and the log file.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Generous: CI machines may be loaded.
const T: Duration = Duration::from_secs(30);

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Runs kite and checks it ended by itself (not killed at the timeout).
#[track_caller]
fn kite(args: &[&str]) -> Output {
    let out = run_kite(args, T);
    assert!(
        out.status.signal().is_none(),
        "kite {args:?} did not exit within {T:?} ({}); stdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

/// kite refuses `args`: non-zero exit, nothing booted, and a message on
/// stderr mentioning each of `needles`. Returns stderr.
#[track_caller]
fn refused(args: &[&str], needles: &[&str]) -> String {
    let out = kite(args);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "kite {args:?} succeeded; stderr:\n{err}"
    );
    assert!(
        !err.trim().is_empty(),
        "kite {args:?} failed without a message"
    );
    for needle in needles {
        assert!(
            err.contains(needle),
            "kite {args:?}: stderr does not mention {needle:?}:\n{err}"
        );
    }
    assert!(
        !stdout(&out).contains("READY"),
        "kite {args:?} booted the guest although it failed"
    );
    err
}

fn poweroff() -> String {
    test_guest("poweroff").display().to_string()
}

#[test]
fn help_exits_zero() {
    let out = kite(&["--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for option in ["--kernel", "--api-socket", "--serial", "--cpus", "--memory"] {
        assert!(
            text.contains(option),
            "--help does not list {option}:\n{text}"
        );
    }
    let out = kite(&["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("kite"), "{}", stdout(&out));
}

#[test]
fn no_arguments_is_a_one_line_error() {
    let out = kite(&[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(
        err.trim().lines().count(),
        1,
        "expected one line on stderr:\n{err}"
    );
    assert!(
        err.contains("--kernel") || err.contains("--api-socket"),
        "stderr does not say what to give:\n{err}"
    );
}

#[test]
fn bad_kernels_are_refused() {
    let dir = TempDir::new("cli-kernel");
    refused(&["--kernel", "/nonexistent"], &["/nonexistent"]);
    let text = dir.path("not-a-kernel.txt");
    fs::write(&text, "hello, I am not a kernel\n").unwrap();
    let text = text.display().to_string();
    refused(&["--kernel", &text], &[&text]);
    let empty = dir.path("empty");
    fs::write(&empty, "").unwrap();
    let empty = empty.display().to_string();
    refused(&["--kernel", &empty], &[&empty]);
    // A directory is not a kernel either.
    let d = dir.0.display().to_string();
    refused(&["--kernel", &d], &[&d]);
}

#[test]
fn bad_options_are_refused() {
    let k = poweroff();
    refused(&["--kernel", &k, "--cpus", "boot=0"], &["boot"]);
    refused(&["--kernel", &k, "--cpus", "boot=3,max=2"], &["boot"]);
    refused(&["--kernel", &k, "--cpus", "boot=x"], &["boot=x"]);
    refused(&["--kernel", &k, "--cpus", "boot=255"], &["255"]);
    refused(&["--kernel", &k, "--memory", "size=0"], &["memory"]);
    refused(&["--kernel", &k, "--memory", "size=abc"], &["abc"]);
    refused(&["--kernel", &k, "--memory", "size=1024T"], &["1024T"]);
    refused(&["--kernel", &k, "--serial", "bogus"], &["bogus"]);
    refused(&["--kernel", &k, "--serial", "file="], &["--serial"]);
    refused(&["--kernel", &k, "--no-such-option"], &["--no-such-option"]);
    refused(&["--cmdline", "console=ttyS0"], &["--kernel"]);
    refused(&["--initramfs", "/tmp/x"], &["--kernel"]);
}

#[test]
fn poweroff_guest_on_the_terminal() {
    let start = Instant::now();
    let out = kite(&["--kernel", &poweroff(), "--serial", "tty"]);
    assert!(
        out.status.success(),
        "exit {}; stderr:\n{}",
        out.status,
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(text.contains("READY"), "stdout:\n{text}");
    assert!(text.contains("POWEROFF-NOW"), "stdout:\n{text}");
    eprintln!("poweroff guest: {:?}", start.elapsed());
}

#[test]
fn serial_to_a_file() {
    let dir = TempDir::new("cli-serial");
    let file = dir.path("serial.log");
    let arg = format!("file={}", file.display());
    let out = kite(&["--kernel", &poweroff(), "--serial", &arg]);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let text = fs::read_to_string(&file).expect("the serial file exists");
    assert!(text.contains("READY"), "serial file:\n{text}");
    assert!(
        !stdout(&out).contains("READY"),
        "guest output went to stdout too"
    );
}

#[test]
fn serial_off_and_null() {
    for mode in ["off", "null"] {
        let out = kite(&["--kernel", &poweroff(), "--serial", mode]);
        assert!(
            out.status.success(),
            "--serial {mode}: exit {}; stderr:\n{}",
            out.status,
            stderr(&out)
        );
        assert!(
            out.stdout.is_empty(),
            "--serial {mode}: stdout is not empty:\n{}",
            stdout(&out)
        );
    }
}

#[test]
fn cpus_and_memory_options_boot() {
    let out = kite(&[
        "--kernel",
        &poweroff(),
        "--cpus",
        "boot=2,max=4",
        "--memory",
        "size=64M",
        "--cmdline",
        "console=ttyS0 quiet",
    ]);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    assert!(stdout(&out).contains("READY"), "{}", stdout(&out));
}

/// Spawns `kite args...` with the API socket, waits for the socket.
fn spawn_api(args: &[&str], socket: &std::path::Path) -> std::process::Child {
    let child = Command::new(kite_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    // The socket file appears at bind(), a moment before listen().
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            start.elapsed() < T,
            "API socket never accepted a connection"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

#[test]
fn api_socket_path_form() {
    let dir = TempDir::new("cli-api");
    let socket = dir.path("api.sock");
    let arg = format!("path={}", socket.display());
    let mut child = spawn_api(&["--api-socket", &arg], &socket);
    let (code, body) = http(&socket, "GET", "/api/v1/vmm.ping", None);
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(&socket, "PUT", "/api/v1/vmm.shutdown", None);
    assert_eq!(code, 204, "{body}");
    let status = wait_child(&mut child, T);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = status.expect("kite did not exit after vmm.shutdown");
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn kernel_and_api_socket_together() {
    // The VM boots at once; when the guest powers off the VMM keeps serving.
    let dir = TempDir::new("cli-api-kernel");
    let socket = dir.path("api.sock");
    let serial = dir.path("serial.log");
    let sock = socket.display().to_string();
    let serial_arg = format!("file={}", serial.display());
    let mut child = spawn_api(
        &[
            "--api-socket",
            &sock,
            "--kernel",
            &poweroff(),
            "--serial",
            &serial_arg,
        ],
        &socket,
    );
    wait_for_file(&serial, "POWEROFF-NOW", T);
    let start = Instant::now();
    loop {
        let (code, body) = http(&socket, "GET", "/api/v1/vm.info", None);
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["state"] == "Shutdown" {
            break;
        }
        assert!(start.elapsed() < T, "state stayed {}", v["state"]);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "kite exited with the guest although it serves the API"
    );
    let (code, body) = http(&socket, "PUT", "/api/v1/vmm.shutdown", None);
    assert_eq!(code, 204, "{body}");
    let status = wait_child(&mut child, T);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(status.expect("no exit").success());
}

#[test]
fn api_socket_on_a_regular_file_is_refused() {
    let dir = TempDir::new("cli-api-file");
    let path = dir.path("not-a-socket");
    fs::write(&path, "precious data").unwrap();
    let p = path.display().to_string();
    refused(&["--api-socket", &p], &[&p]);
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        "precious data",
        "kite clobbered a regular file given as --api-socket"
    );
}

#[test]
fn log_file_with_verbose() {
    let dir = TempDir::new("cli-log");
    let log = dir.path("kite.log");
    let l = log.display().to_string();
    let out = kite(&[
        "--kernel",
        &poweroff(),
        "--serial",
        "null",
        "--log-file",
        &l,
        "-v",
    ]);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let text = fs::read_to_string(&log).expect("the log file exists");
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty(), "the log file is empty");
    assert!(
        lines.iter().all(|l| l.starts_with("kite:")),
        "unexpected log line format:\n{text}"
    );
    assert!(
        text.to_lowercase().contains("boot"),
        "log does not mention the boot:\n{text}"
    );
    assert!(
        !stderr(&out).contains("INFO"),
        "log lines went to stderr with --log-file:\n{}",
        stderr(&out)
    );
}
