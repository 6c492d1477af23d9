//! A hostile virtio-net driver: `tests/guests/net_hostile.c` (see its header
//! for every case) finds kite's virtio-net function on the PCI bus, sets it
//! up by itself and sends malformed transmit chains (a descriptor loop, a
//! buffer outside guest memory, a device-writable buffer, an empty chain, a
//! 200 KiB frame, a bare header) and posts malformed receive buffers (device
//! readable, outside guest memory, smaller than the header), which frames
//! the host sends to the TAP use up. Then a valid frame must still go out.
//!
//! kite runs inside a network namespace of its own (`kite-test-<pid>-<n>`,
//! deleted when the test ends, also on a panic) with a TAP at 10.201.0.1/24;
//! a thread of this process joins the namespace and sends UDP broadcasts to
//! 10.201.0.255, so the TAP always has frames for the guest.

mod common;

use std::io::Read;
use std::net::UdpSocket;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::netns::NetNs;
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

/// Sends UDP broadcasts into `ns`'s 10.201.0.0/24 every 50 ms until `stop`
/// is set (errors, e.g. before the TAP exists, are ignored).
fn broadcast(ns: &NetNs, stop: Arc<AtomicBool>) -> JoinHandle<u32> {
    ns.spawn(move || {
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
    let sender = broadcast(&ns, stop.clone());
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
