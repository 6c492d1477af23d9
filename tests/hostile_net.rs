//! A hostile virtio-net driver: `tests/guests/net_hostile.c` (see its header
//! for every case) finds kite's virtio-net function on the PCI bus, sets it
//! up by itself and sends malformed transmit chains (a descriptor loop, a
//! buffer outside guest memory, a device-writable buffer, an empty chain, a
//! 200 KiB frame, a bare header) and posts malformed receive buffers (device
//! readable, outside guest memory, smaller than the header), which frames
//! the host sends to the TAP use up. Then a valid frame must still go out.
//!
//! kite runs inside a network namespace of its own (`kite-hn-<pid>-<n>`,
//! deleted when the test ends, also on a panic) with a TAP at 10.201.0.1/24;
//! a thread of this process joins the namespace and sends UDP broadcasts to
//! 10.201.0.255, so the TAP always has frames for the guest.

mod common;

use std::fs;
use std::io::Read;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;

/// Generous: CI machines may be loaded (a run takes about a second here).
const T: Duration = Duration::from_secs(90);

/// Every transmit case, in order; each must be reported (completed or not).
const TX_CASES: &[&str] = &[
    "tx-valid",
    "tx-loop",
    "tx-hole",
    "tx-writable",
    "tx-empty",
    "tx-oversized",
    "tx-hdr-only",
    "tx-after-bad",
    "tx-final",
];

/// Receive buffers no frame may be written into.
const RX_BAD: &[&str] = &["rx-readable", "rx-hole", "rx-tiny"];

/// A network namespace of this test process, deleted when dropped.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> NetNs {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kite-hn-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run `ip netns add` (is iproute2 installed?)");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NetNs { name }
    }

    /// `ip netns exec <ns> <program>`: a command that runs in the namespace.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// The names of the namespace's interfaces.
    fn links(&self) -> Vec<String> {
        let out = self
            .command("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip link show in {}", self.name);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .collect()
    }

    /// Sends UDP broadcasts into the namespace's 10.201.0.0/24 every 50 ms
    /// until `stop` is set (errors, e.g. before the TAP exists, are ignored).
    fn broadcast(&self, stop: Arc<AtomicBool>) -> JoinHandle<u32> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns only changes this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_broadcast(true).unwrap();
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                if socket.send_to(b"KITE-HOST-FRAME", "10.201.0.255:9").is_ok() {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            sent
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// The guest's line for case `name` (`TX name ...`, `RX name ...` or
/// `NO-COMPLETION name`); exactly one must exist.
fn report<'a>(out: &'a str, name: &str) -> &'a str {
    let found: Vec<&str> = out
        .lines()
        .filter(|l| l.split(' ').nth(1) == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "case {name} reported {found:?}:\n{out}");
    found[0]
}

#[test]
fn hostile_virtio_net() {
    let ns = NetNs::new();
    let kernel = test_guest("net_hostile");
    let mut child = ns
        .command(kite_bin())
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "size=128M",
            "--serial",
            "tty",
            "--net",
            "tap=hn0,ip=10.201.0.1,mask=255.255.255.0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = ns.broadcast(stop.clone());
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let status = match wait_child(&mut child, T) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            child.wait().unwrap()
        }
    };
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let out = t_out.join().unwrap();
    let err = t_err.join().unwrap();

    assert!(
        status.signal().is_none(),
        "kite hung and was killed after {T:?}; stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        status.success(),
        "kite exited with {status}; stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "kite panicked:\n{err}");
    for line in ["SETUP offered-hi=", "PHASE rx", "PHASE final"] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    assert!(
        out.contains("NET-HOSTILE-DONE"),
        "guest did not finish:\n{out}"
    );

    // Every transmit chain, good or bad, is returned (kite uses length 0).
    for name in TX_CASES {
        assert_eq!(
            report(&out, name),
            format!("TX {name} len=0"),
            "transmit case {name}:\n{out}"
        );
    }
    // Malformed receive buffers come back empty or not at all.
    for name in RX_BAD {
        let line = report(&out, name);
        assert!(
            line == format!("RX {name} len=0") || line == format!("NO-COMPLETION {name}"),
            "receive case {name}: {line}\n{out}"
        );
    }
    report(&out, "rx-valid");
    eprintln!("hostile_net: {sent} broadcasts sent");

    // kite's TAP went away with it.
    let links = ns.links();
    assert!(
        links.iter().all(|l| l == "lo"),
        "interfaces left in the namespace: {links:?}"
    );
}
